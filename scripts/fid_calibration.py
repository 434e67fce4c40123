"""Calibrate the FID pipeline on real CIFAR-10: numbers that must come out small, and one that must be huge.

    python scripts/fid_calibration.py --data ../shared/data/cifar10 > /tmp/fid_calibration.log 2>&1

Computes the Inception features of the 10,000 test and 50,000 training images once (resumable: the
features are written chunk by chunk under --work), then reports

    FID(test 10k  vs train 50k)             small: two samples of the same distribution
    FID(random train 10k vs train 50k)      small (the subset is part of the reference set)
    FID(Gaussian-noise images vs train 50k) huge

and stores the train and test statistics in the user cache (`ddpm-hf fid-stats` reads them), under
the Hub id `uoft-cs/cifar10` (the files in --data are that dataset's parquet files), so that
`ddpm-hf evaluate --reference cifar10-train` works without a network, and under the local path.
Takes a few minutes on a GPU, two hours or more on two CPU cores. While it runs,
`--partial` reports the same numbers from the training images done so far.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

from ddpm_hf.fid import (
    FEATURE_DIM,
    PROTOCOL,
    PROTOCOL_DESCRIPTION,
    InceptionFeatures,
    cache_dir,
    dataset_identity,
    fid_from_statistics,
    kernel_inception_distance,
    load_dataset_images,
    statistics_of_features,
    stats_cache_path,
)

HUB_ID = "uoft-cs/cifar10"
RESOLUTION = 32


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _paths(work: str, name: str) -> tuple[str, str]:
    return os.path.join(work, f"{name}.npy"), os.path.join(work, f"{name}.count")


def features_of(name: str, images: torch.Tensor, extractor: InceptionFeatures, work: str, batch_size: int) -> np.ndarray:
    """Inception features N x 2048, resumed from `work/name.npy` + `work/name.count` when a run was cut short."""
    path, count_path = _paths(work, name)
    total = images.shape[0]
    if os.path.isfile(path):
        features = np.load(path, mmap_mode="r+")
        if features.shape != (total, FEATURE_DIM):
            raise SystemExit(f"{path} has shape {features.shape}, expected {(total, FEATURE_DIM)}: delete it and rerun.")
    else:
        features = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(total, FEATURE_DIM))
    done = int(open(count_path).read()) if os.path.isfile(count_path) else 0
    if done:
        log(f"{name}: resuming at {done}/{total}")
    start_time, start_done = time.time(), done
    while done < total:
        batch = images[done : done + batch_size]
        features[done : done + len(batch)] = extractor(batch).cpu().numpy()
        done += len(batch)
        features.flush()
        with open(count_path, "w") as f:
            f.write(str(done))
        if done % (batch_size * 20) == 0 or done == total:
            rate = (done - start_done) / (time.time() - start_time)
            log(f"{name}: {done}/{total} images, {rate:.1f} img/s, {(total - done) / rate / 60:.0f} min left")
    return np.asarray(features)


def features_done(name: str, work: str) -> np.ndarray:
    """The features a (possibly still running) calibration has written so far."""
    path, count_path = _paths(work, name)
    if not os.path.isfile(count_path):
        raise SystemExit(f"no features of {name} yet under {work}: run without --partial first.")
    return np.asarray(np.load(path, mmap_mode="r")[: int(open(count_path).read())])


def gaussian_noise_images(count: int, seed: int = 0) -> torch.Tensor:
    """x ~ N(0, I) in the model's [-1, 1] range, quantised like a sample: what an untrained sampler starts from."""
    x = torch.randn(count, 3, RESOLUTION, RESOLUTION, generator=torch.Generator().manual_seed(seed))
    return ((x / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.path.join("..", "shared", "data", "cifar10"), help="Folder of the CIFAR-10 parquet files.")
    parser.add_argument("--work", default=None, help="Where the features go (default: the fid-stats cache dir / calibration).")
    parser.add_argument("--batch_size", type=int, default=50)
    parser.add_argument("--num_noise", type=int, default=1000, help="Gaussian-noise images (FID is huge for any count).")
    parser.add_argument("--subset", type=int, default=10_000, help="Size of the random training subset.")
    parser.add_argument("--device", default=None)
    parser.add_argument("--max_images", type=int, default=None, help="Smoke test: first N images per split, nothing cached.")
    parser.add_argument("--partial", action="store_true", help="Report from the features computed so far (while a run is going); nothing cached.")
    args = parser.parse_args(argv)

    if not os.path.isdir(args.data):
        raise SystemExit(f"--data {args.data}: no such folder (the CIFAR-10 parquet files).")
    work = args.work or os.path.join(cache_dir(), "calibration" if args.max_images is None else f"calibration-first{args.max_images}")
    os.makedirs(work, exist_ok=True)
    extractor = InceptionFeatures(args.device)
    log(f"device {extractor.device}, {torch.get_num_threads()} threads, work dir {work}")

    names = {"test": "cifar10-test", "noise": f"noise-{args.num_noise}", "train": "cifar10-train"}
    features, seconds = {}, {}
    for part in ("test", "noise", "train"):  # noise before train, so that --partial can report early
        if args.partial:
            features[part] = features_done(names[part], work)
            continue
        if part == "noise":
            images = gaussian_noise_images(args.num_noise)
        else:
            images = load_dataset_images(args.data, part, RESOLUTION, max_images=args.max_images, progress=False)
            log(f"{part}: {images.shape[0]} images decoded")
        start = time.time()
        features[part] = features_of(names[part], images, extractor, work, args.batch_size)
        seconds[part] = round(time.time() - start, 1)
    n = {part: len(f) for part, f in features.items()}
    complete = args.max_images is None and not args.partial
    if n["train"] < 10:
        raise SystemExit(f"only {n['train']} training features so far: too few to report.")

    stats = {}
    for split in ("test", "train"):
        info = dict(source=dataset_identity(args.data), split=split, resolution=RESOLUTION, max_images=None, also_known_as=HUB_ID)
        stats[split] = statistics_of_features(features[split], keep_features=5000, info=info)
        if complete:
            for path in (stats_cache_path(HUB_ID, split, RESOLUTION), stats_cache_path(args.data, split, RESOLUTION)):
                stats[split].save(path)
                log(f"saved {path}")

    rng = np.random.default_rng(0)
    subset_size = min(args.subset, n["train"] // 2)
    subset = rng.choice(n["train"], subset_size, replace=False)
    stats["train-subset"] = statistics_of_features(features["train"][subset])
    stats["noise"] = statistics_of_features(features["noise"])

    def kid(a: np.ndarray, b: np.ndarray) -> float:
        return kernel_inception_distance(a, b, num_subsets=100, subset_size=1000)[0]

    train = f"train{n['train']}"
    results = {
        "protocol": PROTOCOL,
        "protocol_description": PROTOCOL_DESCRIPTION,
        "complete": complete,
        "num_features": n,
        f"fid_test{n['test']}_vs_{train}": fid_from_statistics(stats["test"], stats["train"]),
        f"fid_train_random{subset_size}_vs_{train}": fid_from_statistics(stats["train-subset"], stats["train"]),
        f"fid_noise{n['noise']}_vs_{train}": fid_from_statistics(stats["noise"], stats["train"]),
        f"kid_test{n['test']}_vs_{train}": kid(features["test"], features["train"]),
        f"kid_noise{n['noise']}_vs_{train}": kid(features["noise"], features["train"]),
        "seconds_features_this_run": seconds,  # a resumed run counts only the features it computed itself
        "device": str(extractor.device),
    }
    with open(os.path.join(work, "calibration.json" if complete else "calibration-partial.json"), "w") as f:
        json.dump(results, f, indent=2)
    log("results:\n" + json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

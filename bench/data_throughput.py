"""Data path: our training batches vs the per-sample PIL path, on real CIFAR-10.

ours        decode every image once into a uint8 N x 3 x R x R tensor (timed on its own), then
            `ImageBatches.batch(start, B)`: index, flip and scale on the device (CPU here; CUDA too
            with --device cuda, timed between syncs)
ours, host  the same batches when the images do not fit on the device: gathered from the memory-mapped
            cache on the host (into pinned memory on CUDA), then flipped and scaled on the device
per-sample  the diffusers example's path: `datasets` set_transform with per-sample PIL transforms
            (torchvision's when importable, else the PIL + numpy equivalent), DataLoader with 0 workers

The two alternate in one process; batches/s, img/s and the ratio are printed. The decode-once cost is
also shown as "amortised": decode time spread over one epoch of batches.

    python bench/data_throughput.py                        # ../shared/data/cifar10, or the built-in 1k subset
    python bench/data_throughput.py --batch 128 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reference_loop import REPO_ROOT, default_dataset, make_dataloader  # noqa: E402

if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)


class IndexSelectBatches:
    """A proposed variant of ImageBatches.batch, same output bit for bit: `index_select` instead of
    advanced indexing (a row copy, not a per-element gather) and the [-1, 1] scaling in place."""

    def __init__(self, batches):
        self.batches = batches

    def batch(self, start: int, size: int):
        import torch

        b = self.batches
        images = b.images.index_select(0, b.indices(start, size).to(b.images.device)).to(b.device, non_blocking=True)
        if b.random_flip:
            flip = torch.rand(size, device=b.device) < 0.5
            images = torch.where(flip[:, None, None, None], images.flip(3), images)
        return images.float().div_(127.5).sub_(1.0)


class PreflippedBatches:
    """A proposed variant, same output bit for bit: keep [images; images flipped] (twice the memory) and
    build a flipped-or-not batch with one row gather, no per-pixel select."""

    def __init__(self, batches):
        import torch

        self.batches = batches
        self.both = torch.cat([batches.images, batches.images.flip(3)]) if batches.random_flip else batches.images

    def batch(self, start: int, size: int):
        import torch

        b = self.batches
        index = b.indices(start, size).to(self.both.device)
        if b.random_flip:
            flip = torch.rand(size, device=b.device) < 0.5
            index = index + flip.to(index.device).long() * b.num_images
        return self.both.index_select(0, index).to(b.device, non_blocking=True).float().div_(127.5).sub_(1.0)


def time_ours(batches, batch_size: int, count: int, start: int, device) -> float:
    import torch

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    begin = time.perf_counter()
    for k in range(count):
        x = batches.batch(start + k * batch_size, batch_size)
    sync()
    assert x.shape[0] == batch_size
    return time.perf_counter() - begin


def time_per_sample(state: dict, count: int) -> tuple[float, int]:
    """Time `count` batches from the DataLoader in state["loader"], starting a new epoch when one ends."""
    begin, images = time.perf_counter(), 0
    for _ in range(count):
        try:
            batch = next(state["iter"])
        except StopIteration:
            state["iter"] = iter(state["loader"])
            batch = next(state["iter"])
        images += batch["input"].shape[0]
    return time.perf_counter() - begin, images


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default=None, help="default: ../shared/data/cifar10 if present, else builtin:cifar10-1k")
    parser.add_argument("--max_images", type=int, default=None, help="use only the first N images (default: all)")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--ours_batches", type=int, default=200, help="batches per timed run of our path")
    parser.add_argument("--per_sample_batches", type=int, default=10, help="batches per timed run of the per-sample path")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="where our batches are built: cpu or cuda")
    parser.add_argument("--ref_transforms", default="auto", choices=["auto", "torchvision", "pil"])
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from ddpm_hf import data as data_lib

    name = args.dataset or default_dataset()
    shown = os.path.relpath(name, REPO_ROOT) if os.path.isabs(name) else name
    dataset = data_lib.load_image_dataset(name, "train")
    if args.max_images:
        dataset = dataset.select(range(min(args.max_images, len(dataset))))
    device = torch.device(args.device)

    begin = time.perf_counter()
    decoded = data_lib.decode_images(dataset, args.resolution, progress=False)
    decode_seconds = time.perf_counter() - begin
    batches = data_lib.ImageBatches(decoded.images, seed=0, random_flip=True, device=device)
    on_host = data_lib.ImageBatches(decoded.images, seed=0, random_flip=True, device=device, max_device_gb=0.0)
    variants = {"ours": batches, "host": on_host, "index_select": IndexSelectBatches(batches), "preflipped": PreflippedBatches(batches)}
    for variant in variants.values():
        time_ours(variant, args.batch, 3, 0, device)  # warm-up
    torch.manual_seed(1)  # the same global RNG state -> the same flips
    reference = batches.batch(5 * args.batch, args.batch)
    identical = True
    for variant in variants.values():
        torch.manual_seed(1)
        identical &= torch.equal(variant.batch(5 * args.batch, args.batch), reference)

    kind, loader = make_dataloader(dataset, args.resolution, args.batch, transforms=args.ref_transforms)

    state = {"loader": loader, "iter": iter(loader)}
    next(state["iter"])  # warm-up

    rates = {name: [] for name in variants}
    ref_rates = []
    position = 3 * args.batch
    for r in range(args.rounds):
        order = ["ref", *variants] if r % 2 == 0 else [*reversed(variants), "ref"]
        for which in order:
            if which == "ref":
                seconds, _ = time_per_sample(state, args.per_sample_batches)
                ref_rates.append(args.per_sample_batches / seconds)
            else:
                seconds = time_ours(variants[which], args.batch, args.ours_batches, position, device)
                position += args.ours_batches * args.batch
                rates[which].append(args.ours_batches / seconds)
        shown_rates = "   ".join(f"{name} {values[-1]:8.1f}" for name, values in rates.items())
        print(f"round {r + 1} (batches/s): {shown_rates}   per-sample {ref_rates[-1]:7.2f}", flush=True)

    ours_rates = rates["ours"]
    ours, ref = statistics.median(ours_rates), statistics.median(ref_rates)
    proposed = {name: statistics.median(values) for name, values in rates.items() if name not in ("ours", "host")}
    host = statistics.median(rates["host"])
    epoch_batches = len(decoded.images) / args.batch
    amortised = 1.0 / (1.0 / ours + decode_seconds / epoch_batches)  # one epoch: decode once + its batches
    print()
    print(f"dataset {shown}: {len(decoded.images)} images at {args.resolution}x{args.resolution}, batch {args.batch}, our batches on {device}")
    print(f"| {'path':44s} | {'batches/s':>10s} | {'img/s':>11s} |")
    print("|" + "-" * 46 + "|" + "-" * 12 + "|" + "-" * 13 + "|")
    print(f"| {'ours: uint8 tensor + ImageBatches.batch':44s} | {ours:10.1f} | {ours * args.batch:11.0f} |")
    print(f"| {'ours, decode amortised over one epoch':44s} | {amortised:10.1f} | {amortised * args.batch:11.0f} |")
    print(f"| {'ours, gathered from the host':44s} | {host:10.1f} | {host * args.batch:11.0f} |")
    print(f"| {'per-sample ' + kind + ' transforms, DataLoader 0 workers':44s} | {ref:10.2f} | {ref * args.batch:11.0f} |")
    print(f"| {'proposed: index_select + in-place scaling':44s} | {proposed['index_select']:10.1f} | {proposed['index_select'] * args.batch:11.0f} |")
    print(f"| {'proposed: pre-flipped copy (2x memory)':44s} | {proposed['preflipped']:10.1f} | {proposed['preflipped'] * args.batch:11.0f} |")
    print(f"proposed variants give the same batches bit for bit: {identical}; threads: {torch.get_num_threads()}")
    print(f"decode once: {decode_seconds:.1f} s ({len(decoded.images) / decode_seconds:.0f} img/s)")
    print(
        f"ratio ours / per-sample: {ours / ref:.1f}x (with decoding amortised over one epoch: {amortised / ref:.1f}x); "
        f"proposed: index_select {proposed['index_select'] / ref:.1f}x, pre-flipped {proposed['preflipped'] / ref:.1f}x"
    )
    summary = {
        "dataset": shown,
        "images": len(decoded.images),
        "batch": args.batch,
        "device": str(device),
        "transforms": kind,
        "ours_batches_per_s": ours_rates,
        "placement": batches.placement,
        "host_batches_per_s": rates["host"],
        "per_sample_batches_per_s": ref_rates,
        "decode_seconds": decode_seconds,
        "ratio": ours / ref,
        "ratio_amortised": amortised / ref,
        "threads": torch.get_num_threads(),
        "proposed_batches_per_s": rates,
        "proposed_identical": bool(identical),
        "ratio_index_select": proposed["index_select"] / ref,
        "ratio_preflipped": proposed["preflipped"] / ref,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return summary


if __name__ == "__main__":
    main()

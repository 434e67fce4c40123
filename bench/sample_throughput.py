"""Sampling throughput: `ddpm_hf.sampling.generate_images` (the engine every command samples with) vs the stock
DDPMPipeline, same steps, batch and seed.

The stock pipeline runs in fp32 with one generator per image, `ddpm_hf.distributed.item_generators(seed,
range(batch))`: it then draws x_T and every step's noise per image as the engine does, so the two give the
same images. Besides images/s the table gives the largest pixel difference (in 8-bit levels, 0-255) between
each variant's images and the stock pipeline's: 0 for fp32 on CPU, a few levels for bf16. Runs alternate in
one process.

    python bench/sample_throughput.py --model tiny --batch 8 --steps 20 --variants fp32,bf16 --threads 1    # CPU
    python bench/sample_throughput.py --model ddpm-cifar10 --batch 1000 --steps 100 \\
        --variants fp32,bf16,bf16+compile --rounds 1                                                   # H200

A variant is '+'-joined: fp32 or bf16 (`autocast_dtype=torch.bfloat16`: the UNet under autocast, the
scheduler in fp32, as `ddpm-hf sample --dtype bf16`), then optionally compile (the UNet through
`torch.compile`, as `ddpm-hf sample --compile`) and oldloop: the engine's loop as it was before issue 20
(`old_loop` below: the scheduler's timesteps on the device, so that every DDPM step reads them on the host
before it draws its noise, and the device waits while the host draws), for images/s before and after on the
same machine; both loops make the same images. The UNet has random weights (seeded): speed does not depend
on them. Set-up (the first call, which compiles) happens before a variant's first timed run and is not timed.
Ctrl-C (or the SIGINT of `timeout`) ends the measurement early: the table then holds the runs that finished.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

DTYPES = ("fp32", "bf16")
OPTIONS = ("compile", "oldloop")
WARMUP_STEPS = 2  # set-up run: the full batch, a 2-step chain (compilation does not depend on the step count)


def build(model: str, resolution: int, device):
    """(UNet with seeded random weights, the paper's DDPM scheduler: linear betas, T = 1000, fixed_large)."""
    import torch
    from diffusers import DDPMScheduler

    from ddpm_hf.config import config_from_dict
    from ddpm_hf.models import build_scheduler, build_unet

    torch.manual_seed(0)
    unet = build_unet(model, resolution).to(device).eval()
    scheduler = build_scheduler(config_from_dict({"output_dir": "unused"}))
    return unet, DDPMScheduler.from_config(scheduler.config)


def sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def parse_variant(variant: str) -> tuple[str, set[str]]:
    """'bf16+compile' -> ('bf16', {'compile'}); raises SystemExit for flags that do not exist (any more)."""
    dtype, *flags = variant.split("+")
    unknown = [flag for flag in flags if flag not in OPTIONS]
    if dtype not in DTYPES or unknown:
        gone = " (graphs, devgen and nchw went with ddpm_hf/fast_sampling.py)" if {"graphs", "devgen", "nchw"} & set(flags) else ""
        raise SystemExit(f"variant {variant!r}: expected fp32 or bf16, optionally followed by +compile and/or +oldloop{gone}")
    return dtype, set(flags)


def autocast_dtype_of(dtype: str):
    import torch

    return torch.bfloat16 if dtype == "bf16" else None


def run_stock(unet, sampler, batch: int, seed: int, device):
    """The stock DDPMPipeline in fp32, one generator per image; uint8 images quantised as the engine's are."""
    import torch
    from diffusers import DDPMPipeline

    from ddpm_hf.distributed import item_generators

    pipeline = DDPMPipeline(unet=unet, scheduler=copy.deepcopy(sampler.scheduler))  # the engine's scheduler: same timesteps
    pipeline.set_progress_bar_config(disable=True)
    sync(device)
    start = time.perf_counter()
    images = pipeline(batch_size=batch, generator=item_generators(seed, range(batch)), num_inference_steps=sampler.steps, output_type="pt").images
    images = (images * 255).round().to(torch.uint8).cpu()
    sync(device)
    return images, time.perf_counter() - start


def old_loop(unet, sampler, batch: int, seed: int, autocast_dtype):
    """The engine's loop before issue 20 (commit 4e0e181), unconditional models: one batch, uint8 images."""
    import contextlib

    import torch

    from ddpm_hf.distributed import item_generators

    parameter = next(unet.parameters())
    device, dtype = parameter.device, parameter.dtype
    size, channels = unet.config.sample_size, unet.config.in_channels
    scheduler = sampler.scheduler
    step_arguments = {"eta": 0.0} if sampler.name == "ddim" else {}
    autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
    generators = item_generators(seed, range(batch))
    with torch.no_grad():
        scheduler.set_timesteps(sampler.steps, device=device)  # the timesteps on the device: each step reads them back
        x = torch.cat([torch.randn((1, channels, size, size), generator=g) for g in generators]).to(device, dtype)
        x = x * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            with autocast:
                x_in = scheduler.scale_model_input(x, t)
                model_output = unet(x_in, t).sample.to(dtype)
            if sampler.name != "ddpm" and model_output.shape[1] == 2 * channels:
                model_output = model_output[:, :channels]
            x = scheduler.step(model_output, t, x, generator=generators, **step_arguments).prev_sample
    return ((x.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def run_engine(unet, sampler, batch: int, seed: int, dtype: str, device, old: bool = False):
    """One batch of `generate_images`, as `ddpm-hf sample --batch_size BATCH` makes it on one process (or of the
    loop before issue 20, `old`)."""
    from ddpm_hf.sampling import generate_images

    sync(device)
    start = time.perf_counter()
    if old:
        images = old_loop(unet, sampler, batch, seed, autocast_dtype_of(dtype))
    else:
        ((_, images),) = list(generate_images(unet, sampler, batch, seed, batch_size=batch, autocast_dtype=autocast_dtype_of(dtype)))
    sync(device)
    return images, time.perf_counter() - start


def device_description(device) -> str:
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", choices=["ddpm-cifar10", "tiny"])
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20, help="DDPM steps of the 1000-step schedule (1000: the full chain; fewer: same cost per step)")
    parser.add_argument("--variants", default="fp32,bf16", help="comma-separated, e.g. fp32,bf16,bf16+compile")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no_stock", action="store_true", help="time only the engine's variants (the stock pipeline still runs once for the image check)")
    parser.add_argument("--device", default=None, help="default: cuda if available")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    parsed = {variant: parse_variant(variant) for variant in variants}

    import torch

    from ddpm_hf.sampling import compile_for_sampling, make_sampler

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    unet, scheduler = build(args.model, args.resolution, device)
    sampler = make_sampler(scheduler, "ddpm", args.steps)
    # 'linspace' starts a 2-step chain at t = T - 1; make_sampler refuses a 'leading' one, which would start at T / 2
    warmup_sampler = make_sampler(scheduler, "ddpm", min(WARMUP_STEPS, args.steps), timestep_spacing="linspace")
    unets, setup_seconds = {}, {}

    def prepared(variant: str):
        """The variant's UNet, set up (and compiled) by one untimed warm-up call the first time it is asked for.
        Variants that differ only in the loop share one compiled UNet."""
        dtype, flags = parsed[variant]
        key = (dtype, "compile" in flags)
        if key not in unets:
            start = time.perf_counter()
            unets[key] = compile_for_sampling(unet) if "compile" in flags else unet  # a compiled wrapper shares the weights
            run_engine(unets[key], warmup_sampler, args.batch, args.seed, dtype, device)
            run_engine(unets[key], warmup_sampler, args.batch, args.seed, dtype, device, old=True)  # the old loop's int timesteps
            setup_seconds[variant] = time.perf_counter() - start
            print(f"{variant}: set-up {setup_seconds[variant]:.1f} s (2-step batches of both loops)", flush=True)
        setup_seconds.setdefault(variant, 0.0)
        return unets[key]

    times = {name: [] for name in ["stock", *variants]}
    outputs, stock_images = {}, None
    try:
        for r in range(args.rounds):
            order = ["stock", *variants] if r % 2 == 0 else [*reversed(variants), "stock"]
            for name in order:
                if name == "stock":
                    if args.no_stock and stock_images is not None:
                        continue
                    stock_images, seconds = run_stock(unet, sampler, args.batch, args.seed, device)
                else:
                    model = prepared(name)
                    outputs[name], seconds = run_engine(model, sampler, args.batch, args.seed, parsed[name][0], device, "oldloop" in parsed[name][1])
                times[name].append(seconds)
                print(f"round {r + 1} {name:24s} {args.batch / seconds:10.2f} img/s ({seconds:.1f} s)", flush=True)
    except KeyboardInterrupt:
        print("interrupted: the table holds the runs that finished", flush=True)

    if not times["stock"]:
        print("no stock run finished: nothing to compare")
        return {}
    stock_rate = args.batch / statistics.median(times["stock"])
    print()
    print(
        f"model {args.model}, batch {args.batch}, {args.steps} DDPM steps of 1000, {device} ({device_description(device)}), "
        f"torch {torch.__version__}; engine: ddpm_hf.sampling.generate_images"
    )
    print(f"| {'sampler':34s} | {'img/s':>10s} | {'vs stock':>8s} | {'max |diff| vs stock':>19s} | {'set-up s':>8s} |")
    print("|" + "-" * 36 + "|" + "-" * 12 + "|" + "-" * 10 + "|" + "-" * 21 + "|" + "-" * 10 + "|")
    print(f"| {'stock DDPMPipeline (fp32)':34s} | {stock_rate:10.2f} | {1.0:7.2f}x | {0:19d} | {'':>8s} |")
    rows = {}
    for name in variants:
        if not times[name]:
            print(f"| {'generate_images ' + name:34s} | {'(not run)':>10s} | {'':>8s} | {'':>19s} | {'':>8s} |")
            continue
        rate = args.batch / statistics.median(times[name])
        max_diff = int((outputs[name].int() - stock_images.int()).abs().max())
        rows[name] = {
            "img_per_s": rate,
            "ratio": rate / stock_rate,
            "max_abs_diff_levels": max_diff,
            "setup_seconds": setup_seconds[name],
            "seconds": times[name],
        }
        print(f"| {'generate_images ' + name:34s} | {rate:10.2f} | {rate / stock_rate:7.2f}x | {max_diff:19d} | {setup_seconds[name]:8.1f} |")
    print("(max |diff|: the largest difference of one pixel channel, in 8-bit levels, between the variant's images and the stock ones)")
    if args.steps < 1000:
        print(f"(images/s of the full 1000-step chain: divide by {1000 / args.steps:g})")
    loop_speedup = {}  # each variant with the current loop over the same variant with the loop before issue 20
    for name, row in rows.items():
        dtype, flags = parsed[name]
        old = next((other for other in rows if parsed[other] == (dtype, flags | {"oldloop"})), None)
        if "oldloop" not in flags and old is not None:
            loop_speedup[name] = row["img_per_s"] / rows[old]["img_per_s"]
            print(f"loop before -> after issue 20, {name}: {rows[old]['img_per_s']:.2f} -> {row['img_per_s']:.2f} img/s ({loop_speedup[name]:.2f}x)")
    summary = {
        "model": args.model,
        "batch": args.batch,
        "steps": args.steps,
        "device": str(device),
        "device_name": device_description(device),
        "torch": torch.__version__,
        "stock_img_per_s": stock_rate,
        "stock_seconds": times["stock"],
        "variants": rows,
        "loop_speedup": loop_speedup,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return summary


if __name__ == "__main__":
    main()

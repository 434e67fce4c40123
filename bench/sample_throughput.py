"""Sampling throughput: ddpm_hf.fast_sampling.FastSampler vs the stock DDPMPipeline, same steps and batch.

Both start from the same seeded CPU generator (what `ddpm-hf sample` uses), so besides images/s the
table gives the largest pixel difference (in [0, 1]) between each variant's images and the stock
pipeline's: 0 for fp32 eager on CPU, bf16-rounding-sized for bf16. Runs alternate in one process.

    python bench/sample_throughput.py --model tiny --batch 8 --steps 20 --variants fp32,bf16            # CPU
    python bench/sample_throughput.py --model ddpm-cifar10 --batch 1000 --steps 1000 \\
        --variants bf16+compile+graphs --rounds 1                                                      # H200

A variant is '+'-joined flags: fp32 or bf16, then optionally compile, graphs, nchw (channels_last off; on CUDA
it is on by default), devgen (a generator on the device instead of the CPU one: faster, other images).
The UNet has random weights (seeded): speed does not depend on them.
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


def build(model: str, resolution: int, device):
    import torch
    from diffusers import DDPMScheduler

    from ddpm_hf.config import config_from_dict
    from ddpm_hf.models import build_scheduler, build_unet

    torch.manual_seed(0)
    unet = build_unet(model, resolution).to(device).eval()
    scheduler = build_scheduler(config_from_dict({"output_dir": "unused"}))  # the paper's: linear betas, T=1000, fixed_large
    return unet, DDPMScheduler.from_config(scheduler.config)


def sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def run_stock(unet, scheduler, batch: int, steps: int, seed: int, device):
    import torch
    from diffusers import DDPMPipeline

    pipeline = DDPMPipeline(unet=unet, scheduler=copy.deepcopy(scheduler))
    pipeline.set_progress_bar_config(disable=True)
    sync(device)
    start = time.perf_counter()
    images = pipeline(batch_size=batch, generator=torch.Generator("cpu").manual_seed(seed), num_inference_steps=steps, output_type="pt").images
    sync(device)
    return images, time.perf_counter() - start


def make_sampler(variant: str, unet, scheduler, steps: int, device):
    from ddpm_hf.fast_sampling import FastSampler

    flags = set(variant.split("+"))
    dtype = "bf16" if "bf16" in flags else "fp32"
    return FastSampler(
        unet,
        scheduler,
        num_inference_steps=steps,
        device=device,
        dtype=dtype,
        compile="compile" in flags,
        cuda_graphs="graphs" in flags,
        channels_last="no" if "nchw" in flags else "auto",
    )


def run_fast(sampler, variant: str, batch: int, seed: int, device):
    import torch

    generator = torch.Generator(device).manual_seed(seed) if "devgen" in variant else torch.Generator("cpu").manual_seed(seed)
    sync(device)
    start = time.perf_counter()
    images = sampler.sample(batch, generator=generator)
    sync(device)
    return images, time.perf_counter() - start


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", choices=["ddpm-cifar10", "tiny"])
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20, help="DDPM steps (1000: the full chain; fewer: 'leading' spacing, same cost per step)")
    parser.add_argument("--variants", default="fp32,bf16", help="comma-separated, e.g. fp32,bf16,bf16+compile,bf16+compile+graphs")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no_stock", action="store_true", help="time only our variants (the stock pipeline is timed once anyway for the image check)")
    parser.add_argument("--device", default=None, help="default: cuda if available")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    unet, scheduler = build(args.model, args.resolution, device)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]

    samplers, warmup_seconds = {}, {}
    for variant in variants:  # build, compile and capture outside the timed runs
        start = time.perf_counter()
        # Each sampler gets its own copy: channels_last changes a UNet's layout, and the stock pipeline keeps the plain one.
        samplers[variant] = make_sampler(variant, copy.deepcopy(unet), scheduler, args.steps, device)
        samplers[variant].warmup(args.batch)
        sync(device)
        warmup_seconds[variant] = time.perf_counter() - start
        print(
            f"{variant}: set-up {warmup_seconds[variant]:.1f} s; compile: {samplers[variant].compile_status}; CUDA graphs: {samplers[variant].cuda_graphs_status}",
            flush=True,
        )

    times = {name: [] for name in ["stock", *variants]}
    diffs = {}
    stock_images = None
    for r in range(args.rounds):
        order = ["stock", *variants] if r % 2 == 0 else [*reversed(variants), "stock"]
        for name in order:
            if name == "stock":
                if args.no_stock and stock_images is not None:
                    continue
                images, seconds = run_stock(unet, scheduler, args.batch, args.steps, args.seed, device)
                stock_images = images
            else:
                images, seconds = run_fast(samplers[name], name, args.batch, args.seed, device)
                diffs[name] = images
            times[name].append(seconds)
            print(f"round {r + 1} {name:24s} {args.batch / seconds:10.2f} img/s ({seconds:.1f} s)", flush=True)
    max_diff = {name: float((images.float().cpu() - stock_images.float().cpu()).abs().max()) for name, images in diffs.items()}

    stock_rate = args.batch / statistics.median(times["stock"])
    print()
    print(
        f"model {args.model}, batch {args.batch}, {args.steps} DDPM steps, {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else f'{torch.get_num_threads()} threads'}), torch {torch.__version__}"
    )
    print(f"| {'sampler':34s} | {'img/s':>10s} | {'vs stock':>8s} | {'max |diff| vs stock':>19s} | {'set-up s':>8s} |")
    print("|" + "-" * 36 + "|" + "-" * 12 + "|" + "-" * 10 + "|" + "-" * 21 + "|" + "-" * 10 + "|")
    print(f"| {'stock DDPMPipeline (fp32)':34s} | {stock_rate:10.2f} | {1.0:7.2f}x | {0.0:19.2e} | {'':>8s} |")
    rows = {}
    for name in variants:
        rate = args.batch / statistics.median(times[name])
        rows[name] = {
            "img_per_s": rate,
            "ratio": rate / stock_rate,
            "max_abs_diff": max_diff[name],
            "setup_seconds": warmup_seconds[name],
            "compile": samplers[name].compile_status,
            "cuda_graphs": samplers[name].cuda_graphs_status,
            "seconds": times[name],
        }
        print(f"| {'fast ' + name:34s} | {rate:10.2f} | {rate / stock_rate:7.2f}x | {max_diff[name]:19.2e} | {warmup_seconds[name]:8.1f} |")
    if args.steps < 1000:
        print(f"(images/s at the full 1000-step chain: divide by {1000 / args.steps:g})")
    summary = {
        "model": args.model,
        "batch": args.batch,
        "steps": args.steps,
        "device": str(device),
        "stock_img_per_s": stock_rate,
        "stock_seconds": times["stock"],
        "variants": rows,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return summary


if __name__ == "__main__":
    main()

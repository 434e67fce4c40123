"""`ddpm-hf evaluate` on 1 and on 2 processes (torchrun, gloo, one thread each): images/s and their ratio.

    python bench/eval_processes.py --num_samples 64 --steps 10 --rounds 2

A tiny UNet with random weights (speed does not depend on them), a few denoising steps and a small reference
folder: the work is the sampling chain plus Inception features per image, as in a real evaluation. Runs
alternate (1, 2, 1, 2, ...) so that a busy machine slows both alike; quote the ratio, not the seconds. The
target on a 2-core machine is >= 1.7x. The FID of both launches must agree (the same images).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)


def prepare(folder: str, resolution: int) -> tuple[str, str]:
    import numpy as np
    import torch
    from diffusers import DDPMPipeline, DDPMScheduler
    from PIL import Image

    from ddpm_hf.models import build_unet

    torch.manual_seed(0)
    model = os.path.join(folder, "model")
    DDPMPipeline(unet=build_unet("tiny", resolution), scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(model)
    reference = os.path.join(folder, "reference")
    os.makedirs(reference)
    rng = np.random.default_rng(0)
    for i in range(16):
        Image.fromarray(rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)).save(os.path.join(reference, f"{i:03d}.png"))
    return model, reference


def evaluate(processes: int, model: str, reference: str, output: str, args) -> tuple[float, dict]:
    arguments = ["evaluate", "--model", model, "--reference", reference, "--output", output, "--device", "cpu"]
    arguments += ["--num_samples", str(args.num_samples), "--scheduler", "ddim", "--steps", str(args.steps), "--batch_size", str(args.batch_size)]
    if processes == 1:
        command = [sys.executable, "-m", "ddpm_hf", *arguments]
    else:
        command = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone", "--nproc_per_node", str(processes), "-m", "ddpm_hf", *arguments]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO_ROOT, HF_HUB_OFFLINE="1")
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode:
        raise SystemExit(result.stderr[-3000:])
    with open(os.path.join(output, "eval.json")) as f:
        values = json.load(f)
    return args.num_samples / values["timing"]["sampling_and_features_seconds"], values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_samples", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    rates: dict[int, list[float]] = {1: [], 2: []}
    fids: dict[int, float] = {}
    with tempfile.TemporaryDirectory() as folder:
        model, reference = prepare(folder, args.resolution)
        evaluate(1, model, reference, os.path.join(folder, "warm-up"), args)  # reference statistics cached, imports warm
        for _ in range(args.rounds):
            for processes in (1, 2):
                started = time.perf_counter()
                rate, values = evaluate(processes, model, reference, os.path.join(folder, f"p{processes}"), args)
                rates[processes].append(rate)
                fids[processes] = values["fid"]
                print(
                    f"{processes} process(es): {rate:.2f} images/s of sampling + Inception (launch to exit {time.perf_counter() - started:.1f} s)", flush=True
                )
    one, two = statistics.median(rates[1]), statistics.median(rates[2])
    print(f"\n| processes | images/s (median of {args.rounds}) |\n| --- | ---: |\n| 1 | {one:.2f} |\n| 2 | {two:.2f} |")
    print(f"\nratio 2 / 1 processes: {two / one:.2f}x (target >= 1.7x); FID 1 process {fids[1]:.4f}, 2 processes {fids[2]:.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rates": rates, "ratio": two / one, "fid": fids, "settings": vars(args)}, f, indent=2)


if __name__ == "__main__":
    main()

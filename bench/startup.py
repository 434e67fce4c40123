"""Start-up: seconds from launching the process to its first optimizer step, train_ddpm.py vs a minimal
diffusers-example-like script (bench/reference_loop.py), same dataset, model and batch, alternating.

Each script runs in a fresh subprocess through this file's --child mode, which registers a global
optimizer step post-hook (torch.optim.optimizer.register_optimizer_step_post_hook) that prints the wall
clock at the first optimizer step and exits at once. Neither script is changed for the measurement.

    python bench/startup.py                                    # ../shared/data/cifar10 (else builtin:cifar10-1k), tiny UNet
    python bench/startup.py --model ddpm-cifar10 --batch 128 --rounds 3
    python bench/startup.py --launcher accelerate              # through `accelerate launch`, as the README runs training
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

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from reference_loop import REPO_ROOT, default_dataset  # noqa: E402

MARKER = "DDPM_BENCH_FIRST_STEP_AT"


def child(argv: list[str]) -> None:
    """Run `argv[0]` as __main__ with argv[1:], printing the time of the first optimizer step and exiting."""
    import runpy

    def first_step(optimizer, args, kwargs):
        print(f"{MARKER} {time.time()!r}", flush=True)
        os._exit(0)

    from torch.optim.optimizer import register_optimizer_step_post_hook

    register_optimizer_step_post_hook(first_step)
    sys.argv = list(argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))
    runpy.run_path(argv[0], run_name="__main__")
    print("the script ended without an optimizer step", file=sys.stderr)
    sys.exit(3)


def launch(command: list[str], env: dict, timeout: float) -> float:
    """Seconds from starting `command` to its first optimizer step."""
    launched = time.time()
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    for line in result.stdout.splitlines():
        if line.startswith(MARKER):
            return float(line.split()[1]) - launched
    tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
    raise RuntimeError(f"no first step from {' '.join(command)} (exit {result.returncode}):\n{tail}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default=None, help="default: ../shared/data/cifar10 if present, else builtin:cifar10-1k")
    parser.add_argument("--model", default="tiny", choices=["ddpm-cifar10", "tiny"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--launcher", default="python", choices=["python", "accelerate"])
    parser.add_argument("--device", default=None, help="cpu to force the CPU in both")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for both children (default: unset)")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    dataset = args.dataset or default_dataset()
    shown = os.path.relpath(dataset, REPO_ROOT) if os.path.isabs(dataset) else dataset
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", DIFFUSERS_VERBOSITY="error", TRANSFORMERS_VERBOSITY="error")
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    if args.launcher == "python":
        prefix = [sys.executable, os.path.join(HERE, "startup.py"), "--child"]
    else:
        prefix = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--num_processes",
            "1",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            os.path.join(HERE, "startup.py"),
            "--child",
        ]

    with tempfile.TemporaryDirectory(prefix="ddpm-startup-") as tmp:
        commands = {
            "ours": prefix
            + [
                os.path.join(REPO_ROOT, "train_ddpm.py"),
                "--preset",
                "quickstart",
                "--dataset",
                dataset,
                "--model",
                args.model,
                "--resolution",
                str(args.resolution),
                "--train_batch_size",
                str(args.batch),
                "--max_train_steps",
                "5",
                "--sample_every",
                "0",
                "--checkpoint_every",
                "0",
                "--output_dir",
                os.path.join(tmp, "ours"),
                "--overwrite",
            ],
            "reference": prefix
            + [
                os.path.join(HERE, "reference_loop.py"),
                "--dataset",
                dataset,
                "--model",
                args.model,
                "--resolution",
                str(args.resolution),
                "--batch",
                str(args.batch),
                "--steps",
                "5",
            ]
            + (["--device", "cpu"] if args.device == "cpu" else []),
        }
        times = {name: [] for name in commands}
        for r in range(args.rounds):
            for name in ("reference", "ours") if r % 2 == 0 else ("ours", "reference"):
                seconds = launch(commands[name], env, args.timeout)
                times[name].append(seconds)
                print(f"round {r + 1} {name:9s} {seconds:6.1f} s to the first step", flush=True)

    ours, ref = statistics.median(times["ours"]), statistics.median(times["reference"])
    print()
    print(f"dataset {shown}, model {args.model}, batch {args.batch}, launcher {args.launcher}, OMP_NUM_THREADS {env.get('OMP_NUM_THREADS', 'unset')}")
    print(f"| {'script':44s} | {'s to first step (median)':>24s} | {'runs':>18s} |")
    print("|" + "-" * 46 + "|" + "-" * 26 + "|" + "-" * 20 + "|")
    for label, key, value in (("train_ddpm.py --preset quickstart", "ours", ours), ("bench/reference_loop.py (example-like)", "reference", ref)):
        print(f"| {label:44s} | {value:24.1f} | {', '.join(f'{v:.1f}' for v in times[key]):>18s} |")
    print(f"ratio ours / reference: {ours / ref:.2f} (below 1: we start faster)")
    summary = {
        "dataset": shown,
        "model": args.model,
        "batch": args.batch,
        "launcher": args.launcher,
        "threads": env.get("OMP_NUM_THREADS"),
        "ours_seconds": times["ours"],
        "reference_seconds": times["reference"],
        "ratio": ours / ref,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return summary


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
    else:
        main()

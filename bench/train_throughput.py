"""Training throughput: our trainer (`ddpm_hf.training.train`) vs the diffusers-example-style loop.

Same model, global batch, precision and device; the two alternate in one process (ref, ours, ours, ref, ...)
so that drift of a shared machine hits both alike. Prints a table of img/s (and MFU on CUDA) and the ratio.

    python bench/train_throughput.py --model tiny --batch 16 --steps 5 --rounds 2 --device cpu       # CPU
    python bench/train_throughput.py --model ddpm-cifar10 --batch 128 --precision bf16 --steps 100   # H200

How each is timed
- ours: `train()` runs `(1 + intervals) * steps` steps with `logging_steps = steps`; it syncs with the device
  once per logging interval and logs img/s for that interval (`Accelerator.log` is wrapped here to read
  it). The first interval (compile, warm-up) is dropped. Set-up, decoding and the final save are outside.
- reference: `steps` untimed warm-up steps, then `intervals * steps` timed steps (it syncs every step).
MFU = img/s x training FLOP per image / peak. FLOP per image are counted with torch.utils.flop_counter
(36.3 GFLOP for the paper UNet at 32x32: 12.1 forward, twice that backward); the peak defaults to the
790 TFLOP/s of dense bf16 measured on an H200 here (--peak_tflops).

--checks runs paths of ours that only a GPU takes, eagerly, for --check_steps steps each (issue 20):
- fp16: --mixed_precision fp16 with Accelerate's GradScaler (loss scale, skipped steps, finite loss); on a CPU
  the expected outcome is the one-line refusal (Accelerate has no GradScaler there);
- channels_last_resume: a run without channels_last, checkpointed, resumed with it (CUDA's fused AdamW refuses
  optimizer moments of another memory layout than their parameter's).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reference_loop import REPO_ROOT, ReferenceLoop, default_dataset, reset_accelerate  # noqa: E402

if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)


def training_flops_per_image(model: str, resolution: int) -> float:
    """Forward + backward FLOP of one image (2 x multiply-adds), counted on the CPU with batch 2."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ddpm_hf.models import build_unet

    unet = build_unet(model, resolution)
    x, t = torch.randn(2, 3, resolution, resolution), torch.tensor([1, 500])
    with FlopCounterMode(display=False) as counter:
        unet(x, t).sample.square().mean().backward()
    return counter.get_total_flops() / 2


class LogCapture:
    """Wraps accelerate.Accelerator.log to keep every (step, values) our trainer logs."""

    def __enter__(self):
        from accelerate import Accelerator

        self.records, self._original = [], Accelerator.log
        records, original = self.records, self._original

        def log(accelerator, values, step=None, log_kwargs=None):
            records.append((step, dict(values), time.process_time()))
            return original(accelerator, values, step=step, log_kwargs=log_kwargs or {})

        Accelerator.log = log
        return self

    def __exit__(self, *exc):
        from accelerate import Accelerator

        Accelerator.log = self._original


def run_ours(args, dataset: str, output_dir: str, **overrides) -> dict:
    from ddpm_hf.config import config_from_dict
    from ddpm_hf.training import train

    reset_accelerate()
    options = dict(
        dataset=dataset,
        model=args.model,
        resolution=args.resolution,
        train_batch_size=args.batch,
        max_train_steps=(1 + args.intervals) * args.steps,
        logging_steps=args.steps,
        mixed_precision=args.precision,
        output_dir=output_dir,
        overwrite=True,
        sample_every=0,
        checkpoint_every=0,
        max_train_samples=args.max_train_samples,
        lr_warmup_steps=10,
        compile=args.compile,
        channels_last=args.channels_last,
    )
    options.update(overrides)
    if args.device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "true"
    with LogCapture() as capture:
        train(config_from_dict(options))
    logged = [(step, values, cpu) for step, values, cpu in capture.records if "img_per_s" in values]
    rates = [values["img_per_s"] for step, values, cpu in logged if step > args.steps]
    if not rates:
        raise RuntimeError("the trainer logged no img_per_s after its first interval")
    # Process CPU time between the first and the last log: the timed intervals (each log follows a device sync).
    cpu_seconds = logged[-1][2] - next(cpu for step, values, cpu in logged if step == args.steps)
    # Equal images per interval: the mean time per image is the harmonic mean of the rates.
    return {"img_per_s": len(rates) / sum(1.0 / r for r in rates), "intervals": rates, "cpu_img_per_s": len(rates) * args.steps * args.batch / cpu_seconds}


def run_logged(args, dataset: str, output_dir: str, steps: int, **overrides) -> dict:
    """Train ours for `steps` steps (eagerly unless overridden), logging every half; the last values logged."""
    from ddpm_hf.config import config_from_dict
    from ddpm_hf.training import train

    reset_accelerate()
    options = dict(
        dataset=dataset, model=args.model, resolution=args.resolution, train_batch_size=args.batch, max_train_steps=steps,
        logging_steps=max(1, steps // 2), mixed_precision=args.precision, output_dir=output_dir, overwrite=True, sample_every=0,
        checkpoint_every=0, max_train_samples=args.max_train_samples, lr_warmup_steps=10, compile="no", channels_last=args.channels_last,
    )  # fmt: skip
    options.update(overrides)
    with LogCapture() as capture:
        train(config_from_dict(options))
    return dict(capture.records[-1][1], step=capture.records[-1][0])


def run_checks(args, dataset: str, folder: str, on_cuda: bool) -> dict:
    """The --checks: each returns what it saw, or why it failed (a failing check must not lose the others)."""
    import math

    from ddpm_hf.errors import UserError

    n, results = args.check_steps, {}
    for check in (c.strip() for c in args.checks.split(";") if c.strip()):
        try:
            if check == "fp16" and not on_cuda:
                try:
                    run_logged(args, dataset, os.path.join(folder, "fp16"), 2 * n, mixed_precision="fp16")
                    results[check] = {"ok": False, "failed": "fp16 trained without a GPU"}
                except UserError as e:
                    results[check] = {"ok": "needs a CUDA GPU" in str(e), "refused": str(e)}  # the expected outcome on a CPU
            elif check == "fp16":
                values = run_logged(args, dataset, os.path.join(folder, "fp16"), 2 * n, mixed_precision="fp16")
                ok = math.isfinite(values["loss"]) and "loss_scale" in values
                results[check] = {"ok": ok, **{k: values.get(k) for k in ("step", "loss", "loss_scale", "skipped_steps", "grad_norm", "img_per_s")}}
            elif check == "channels_last_resume":
                run_dir = os.path.join(folder, "channels_last_resume")
                run_logged(args, dataset, run_dir, n, channels_last="no", checkpoint_every=n)
                values = run_logged(args, dataset, run_dir, 2 * n, channels_last="yes", resume_from_checkpoint="latest")
                results[check] = {"ok": values["step"] == 2 * n and math.isfinite(values["loss"]), "loss": values["loss"], "img_per_s": values["img_per_s"]}
            else:
                raise ValueError(f"unknown check {check!r}: fp16 or channels_last_resume")
        except Exception as e:
            results[check] = {"ok": False, "failed": f"{type(e).__name__}: {e}"}
        print(f"check {check:22s} {'ok' if results[check]['ok'] else 'FAILED'}: {results[check]}", flush=True)
    return results


def run_reference(args, dataset) -> dict:
    loop = ReferenceLoop(dataset, args.model, args.resolution, args.batch, args.precision, args.device, args.ref_transforms, seed=0)
    try:
        loop.run(args.steps)  # warm-up
        images, seconds = loop.run(args.intervals * args.steps)
    finally:
        loop.close()
    return {"img_per_s": images / seconds, "transforms": loop.transforms, "cpu_img_per_s": images / loop.last_cpu_seconds}


def describe_device(device: str | None) -> str:
    import torch

    if device != "cpu" and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads (torch {torch.__version__})"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", choices=["ddpm-cifar10", "tiny"])
    parser.add_argument("--batch", type=int, default=16, help="global batch (the paper: 128)")
    parser.add_argument("--steps", type=int, default=5, help="steps per timed interval (also the warm-up)")
    parser.add_argument("--intervals", type=int, default=2, help="timed intervals per run")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each, alternating")
    parser.add_argument("--precision", default="no", choices=["no", "fp16", "bf16"])
    parser.add_argument("--device", default=None, choices=[None, "cpu", "cuda"], help="default: cuda if available")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--dataset", default=None, help="default: ../shared/data/cifar10 if present, else builtin:cifar10-1k")
    parser.add_argument("--max_train_samples", type=int, default=10_000, help="images our trainer decodes (throughput does not depend on it)")
    parser.add_argument("--compile", default="auto", choices=["auto", "yes", "no"], help="our trainer's --compile")
    parser.add_argument("--channels_last", default="auto", choices=["auto", "yes", "no"], help="our trainer's --channels_last")
    parser.add_argument("--ref_transforms", default="auto", choices=["auto", "torchvision", "pil"])
    parser.add_argument("--peak_tflops", type=float, default=790.0, help="for MFU on CUDA (H200 dense bf16, measured)")
    parser.add_argument("--ablation", default="", help="after the rounds, one run of ours per ';'-separated variant, e.g. 'compile=no;channels_last=no'")
    parser.add_argument("--checks", default="", help="after the ablation, ';'-separated GPU paths to run: fp16, channels_last_resume")
    parser.add_argument("--check_steps", type=int, default=20, help="steps of each --checks run (eager)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from ddpm_hf.data import load_image_dataset

    dataset_name = args.dataset or default_dataset()
    shown = os.path.relpath(dataset_name, REPO_ROOT) if os.path.isabs(dataset_name) else dataset_name
    dataset = load_image_dataset(dataset_name, "train")
    if args.max_train_samples and len(dataset) > args.max_train_samples:
        dataset = dataset.select(range(args.max_train_samples))
    on_cuda = args.device != "cpu" and torch.cuda.is_available()
    flops = 36.3e9 if (args.model, args.resolution) == ("ddpm-cifar10", 32) else training_flops_per_image(args.model, args.resolution)

    results = {"ours": [], "reference": []}
    cpu_results = {"ours": [], "reference": []}  # img per second of this process's CPU time
    transforms = None
    with tempfile.TemporaryDirectory(prefix="ddpm-bench-") as tmp:
        for r in range(args.rounds):
            order = ("reference", "ours") if r % 2 == 0 else ("ours", "reference")
            for name in order:
                start = time.perf_counter()
                if name == "ours":
                    result = run_ours(args, dataset_name, os.path.join(tmp, f"ours-{r}"))
                else:
                    result = run_reference(args, dataset)
                    transforms = result["transforms"]
                results[name].append(result["img_per_s"])
                cpu_results[name].append(result["cpu_img_per_s"])
                print(
                    f"round {r + 1} {name:9s} {result['img_per_s']:10.1f} img/s, {result['cpu_img_per_s']:10.1f} img per CPU-second"
                    f"   (run took {time.perf_counter() - start:.0f} s)",
                    flush=True,
                )
        ablation = {}
        for k, variant in enumerate(v for v in args.ablation.split(";") if v.strip()):
            overrides = dict(item.split("=") for item in variant.split(","))
            try:
                ablation[variant] = run_ours(args, dataset_name, os.path.join(tmp, f"ablation-{k}"), **overrides)["img_per_s"]
                print(f"ablation  ours with {variant:28s} {ablation[variant]:10.1f} img/s", flush=True)
            except Exception as e:  # one failing variant must not lose the others
                print(f"ablation  ours with {variant}: failed ({type(e).__name__}: {e})", flush=True)
        checks = run_checks(args, dataset_name, tmp, on_cuda) if args.checks else {}
    reset_accelerate()

    ours, ref = statistics.median(results["ours"]), statistics.median(results["reference"])
    ratios = [o / f for o, f in zip(results["ours"], results["reference"])]
    print()
    print(
        f"model {args.model} ({flops / 1e9:.2f} GFLOP/img per training step), global batch {args.batch}, precision {args.precision}, {describe_device(args.device)}"
    )
    print(f"data {shown}; reference transforms: {transforms}; {args.rounds} rounds x {args.intervals} x {args.steps} timed steps")
    header = f"| {'loop':34s} | {'img/s (median)':>14s} | {'runs':>24s} |" + (" MFU |" if on_cuda else "")
    print(header)
    print("|" + "-" * 36 + "|" + "-" * 16 + "|" + "-" * 26 + "|" + ("-----|" if on_cuda else ""))
    for label, key, value in (("ours (ddpm_hf.training.train)", "ours", ours), ("reference (diffusers-example style)", "reference", ref)):
        runs = ", ".join(f"{v:.1f}" for v in results[key])
        mfu = f" {100 * value * flops / (args.peak_tflops * 1e12):.0f}% |" if on_cuda else ""
        print(f"| {label:34s} | {value:14.1f} | {runs:>24s} |{mfu}")
    for variant, value in ablation.items():
        mfu = f" {100 * value * flops / (args.peak_tflops * 1e12):.0f}% |" if on_cuda else ""
        print(f"| {'ours, ' + variant:34s} | {value:14.1f} | {'1 run':>24s} |{mfu}")
    print(f"ratio ours / reference: {ours / ref:.2f}x (per round: {', '.join(f'{x:.2f}' for x in ratios)})")
    cpu_ratios = [o / f for o, f in zip(cpu_results["ours"], cpu_results["reference"])]
    cpu_ours, cpu_ref = statistics.median(cpu_results["ours"]), statistics.median(cpu_results["reference"])
    if not on_cuda:
        print(
            f"per second of this process's CPU time (less sensitive to other load on a shared CPU): ours {cpu_ours:.1f}, "
            f"reference {cpu_ref:.1f} img/s, ratio {cpu_ours / cpu_ref:.2f}x (per round: {', '.join(f'{x:.2f}' for x in cpu_ratios)})"
        )
    summary = {
        "model": args.model,
        "batch": args.batch,
        "precision": args.precision,
        "device": describe_device(args.device),
        "dataset": shown,
        "reference_transforms": transforms,
        "flops_per_image": flops,
        "ours_img_per_s": results["ours"],
        "reference_img_per_s": results["reference"],
        "ratio_median": ours / ref,
        "ratio_per_round": ratios,
        "ours_cpu_img_per_s": cpu_results["ours"],
        "reference_cpu_img_per_s": cpu_results["reference"],
        "cpu_ratio_median": cpu_ours / cpu_ref,
        "ablation_img_per_s": ablation,
        "checks": checks,
        "threads": torch.get_num_threads(),
    }
    if on_cuda:
        summary["mfu_ours"] = ours * flops / (args.peak_tflops * 1e12)
        summary["mfu_reference"] = ref * flops / (args.peak_tflops * 1e12)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return summary


if __name__ == "__main__":
    main()

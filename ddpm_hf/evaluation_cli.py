"""`ddpm-hf evaluate`, `ddpm-hf fid` and `ddpm-hf fid-stats`: the command line, and what it prints and writes.

`evaluate`'s options become one `evaluation.EvaluateOptions` (`evaluate_options`); evaluation.py computes, on every
process, and the main process writes OUTPUT/eval.json (run_folder.RunFolder), a sweep's or the frontier's table and
plot (evaluation_sweeps.write_sweep) and prints a summary. `fid` and `fid-stats` work on image sets and statistics
files alone (fid.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re

from .arguments import bounded, local_path_or_hub_id, output_file, output_folder
from .arguments import device as device_type
from .distributed import leave_process_group
from .errors import UserError
from .evaluation import KID_FEATURES, EvaluateOptions, evaluate_fid, evaluate_frontier, evaluate_nll, evaluate_runs
from .evaluation_per_class import samples_per_class
from .evaluation_sweeps import (
    DEFAULT_FRONTIER_BUDGETS,
    FRONTIER,
    GUIDANCE_SWEEP,
    SweepKind,
    best_table,
    guidance_scales,
    nfe_budgets,
    parse_sweep,
    sweep_rows,
    sweep_table,
    write_sweep,
)
from .fid import FEATURE_DIM, PROTOCOL, REFERENCE_ALIASES, FIDStatistics, fid_from_statistics, kernel_inception_distance, resolve_reference, resolve_statistics
from .run_folder import RunFolder
from .sampling import SAMPLERS, TIMESTEP_SPACINGS

# ---------------------------------------------------------------------------------------------
# `ddpm-hf evaluate`
# ---------------------------------------------------------------------------------------------


def evaluate_options(args: argparse.Namespace) -> EvaluateOptions:
    """The options object of `ddpm-hf evaluate`'s command line: each field from the option of its name, --sweep read."""
    values = {field.name: getattr(args, field.name) for field in dataclasses.fields(EvaluateOptions)}
    if values["sweep"] is not None:
        values["sweep"] = parse_sweep(values["sweep"])
    return EvaluateOptions(**values)


def default_output_dir(model: str) -> str:
    """The model's own folder when it is local, else ./eval-<user>--<name>/."""
    if os.path.isdir(model):
        return model
    return f"eval-{re.sub(r'[^A-Za-z0-9._-]+', '-', model.replace('/', '--'))}"


def run_evaluate(args) -> None:
    """`ddpm-hf evaluate` on every process of a torchrun / `accelerate launch` run; the main process writes."""
    from .distributed import process_state

    options = evaluate_options(args)
    state = process_state(options.device, options.ddp_timeout)
    output_dir = options.output or default_output_dir(options.model)
    kind = options.sweep_kind()
    if kind is FRONTIER:
        section = evaluate_frontier(options, state)
        if state.is_main_process:
            report_sweep(section["runs"], kind, options, output_dir, section)
    elif kind is not None:
        results = evaluate_runs(options, state)
        if state.is_main_process:
            report_sweep(results, kind, options, output_dir)
    elif options.metric == "nll":
        result = evaluate_nll(options, state)
        if state.is_main_process:
            report_nll(result, options, output_dir)
    else:
        result = evaluate_fid(options, state)
        if state.is_main_process:
            report_fid(result, output_dir)
    leave_process_group()


def report_fid(result: dict, output_dir: str) -> None:
    """eval.json's top level, and one line of summary (with the per-class FIDs when there are some)."""
    path = RunFolder(output_dir).write_eval(result)
    reference = result["reference_details"]
    kid = f", KID {result['kid']:.5f} +- {result['kid_std']:.5f}" if "kid" in result else ""
    print(
        f"FID {fid_description(result)}{kid} ({samples_description(result)}{conditional_description(result)}, {sampler_description(result)}, "
        f"vs {reference['dataset']} {reference['split']} [{reference['num_images']} images]; {result['num_processes']} process(es), "
        f"{speed_description(result)}{result['timing']['wall_seconds']:.0f} s)"
    )
    note_small_sample_bias(result["num_samples"])
    if "per_class_fid" in result:
        print_per_class_fid(result)
    print(f"wrote {path}")


def fid_description(result: dict) -> str:
    """'12.3456', or with --repeats '12.3456 +- 0.2100 (min 12.1000)': the mean, standard deviation and minimum."""
    if "repeats" not in result:
        return f"{result['fid']:.4f}"
    return f"{result['fid']:.4f} +- {result['fid_std']:.4f} (min {result['fid_min']:.4f})"


def samples_description(result: dict) -> str:
    """'1000 samples', or with --repeats '3 sets of 1000 samples, seeds 0, 1000, 2000'."""
    if "repeats" not in result:
        return f"{result['num_samples']} samples"
    return f"{result['repeats']} sets of {result['num_samples']} samples, seeds {', '.join(str(s['seed']) for s in result['sets'])}"


def sampler_description(result: dict) -> str:
    """'ddim 50 steps', or with another number of network evaluations 'heun 10 steps, 19 NFE'."""
    steps = f"{result['scheduler']} {result['steps']} steps"
    return steps if result["nfe"] == result["steps"] else f"{steps}, {result['nfe']} NFE"


def speed_description(result: dict) -> str:
    """'UNet bf16 + compiled, ' when it ran so, '' for the fp32 eager default."""
    how = [result["dtype"]] if result.get("dtype", "fp32") != "fp32" else []
    how += ["compiled"] if result.get("compile") else []
    return f"UNet {' + '.join(how)}, " if how else ""


def report_sweep(results: list[dict], kind: SweepKind, options: EvaluateOptions, output_dir: str, section: dict | None = None) -> None:
    """<kind>.csv/.md/.png, eval.json section <kind> (`section`, default {"runs": results}), and the table on the
    terminal."""
    first = results[0]
    paths = write_sweep(results, output_dir, kind.title.format(model_name=os.path.basename(os.path.normpath(options.model)), **first), kind)
    section = section or {"runs": results}
    RunFolder(output_dir).write_eval(section, section=kind.name)
    if kind is GUIDANCE_SWEEP:
        per_class = samples_per_class(first["num_samples"], first["num_classes"])
        print(f"FID vs guidance scale s = 1 + w ({first['num_samples']} samples: {first['num_classes']} classes x {per_class}):")
    if kind is FRONTIER:
        print(f"Best sampler at each NFE budget ({samples_description(first)}; every run in {paths['md']}):")
        print(best_table(section["best"]))
        for skipped in section["not_run"]:
            print(f"not run: {skipped['sampler']} within {skipped['nfe_budget']} NFE ({skipped['reason']})")
    else:
        print(sweep_table(sweep_rows(results, kind), kind))
    note_small_sample_bias(options.num_samples)
    if kind is GUIDANCE_SWEEP and options.per_class_fid:
        for result in results:
            print(f"s = {result['guidance_scale']:g}: per-class FID " + ", ".join(f"{name} {value:.2f}" for name, value in result["per_class_fid"].items()))
        note_per_class_bias(first)
    print(f"wrote {paths['md']}, {paths['csv']}, {paths['png']} and {os.path.join(output_dir, 'eval.json')}")


def report_nll(result: dict, options: EvaluateOptions, output_dir: str) -> None:
    """eval.json section nll, and one line of summary."""
    path = RunFolder(output_dir).write_eval(result, section="nll")
    exact = "exact bound over all T terms" if result["exact_sum_over_t"] else f"KL sum estimated with --timestep_stride {options.timestep_stride}"
    print(
        f"NLL bound: {result['bits_per_dim']:.4f} +- {result['bits_per_dim_stderr']:.4f} bits/dim on {result['num_images']} images of {options.dataset} ({options.split}); "
        f"prior {result['prior_bits_per_dim']:.4f}, KL terms {result['kl_bits_per_dim']:.4f}, decoder {result['decoder_bits_per_dim']:.4f} ({exact})"
    )
    print(f"wrote {path}")


def note_small_sample_bias(num_images: int) -> None:
    """FID is biased upwards, the more so the fewer the images: say so where a number could mislead."""
    if num_images < FEATURE_DIM:  # below D images the covariance has rank < D: the bias is large
        print(
            f"note: fewer than {FEATURE_DIM} images in a set: FID is strongly biased upwards. Compare it only between sets of equal size; papers use 50,000 samples."
        )
    elif num_images < 50_000:
        print(f"note: {num_images:,} samples give a higher FID than the 50,000 papers use: compare only with FIDs of {num_images:,} samples.")


def conditional_description(result: dict) -> str:
    """': 10 classes x 5,000, guidance scale 1' (after "50000 samples") for a class-conditional model's result, '' else."""
    if "num_classes" not in result:
        return ""
    per_class = samples_per_class(result["num_samples"], result["num_classes"])
    return f": {result['num_classes']} classes x {per_class}, guidance scale {result['guidance_scale']:g}"


def print_per_class_fid(result: dict) -> None:
    per_class = samples_per_class(result["num_samples"], result["num_classes"])
    print(f"FID per class ({per_class} samples of each class against the reference images of that class):")
    width = max(len(name) for name in result["per_class_fid"])
    for name, value in result["per_class_fid"].items():
        print(f"  {name:<{width}}  {value:10.4f}  ({result['per_class_reference_images'][name]:,} reference images)")
    note_per_class_bias(result)


def note_per_class_bias(result: dict) -> None:
    """The small-sample note for the per-class sets, unless the one printed for all samples already says it."""
    if result["num_samples"] >= FEATURE_DIM:
        note_small_sample_bias(min(result["num_samples"] // result["num_classes"], *result["per_class_reference_images"].values()))


# ---------------------------------------------------------------------------------------------
# `ddpm-hf fid` and `ddpm-hf fid-stats`
# ---------------------------------------------------------------------------------------------


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
                resolution_option="--resolution",
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

    named = resolve_reference(args.dataset, args.split, args.resolution, option="--dataset", resolution_option="--resolution")
    dataset, split, resolution = named.source, named.split, named.resolution
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


# ---------------------------------------------------------------------------------------------
# The parsers
# ---------------------------------------------------------------------------------------------


def add_cli(subparsers) -> None:
    # ---- evaluate: one option per field of EvaluateOptions, whose defaults are the command's (set_defaults below) ----
    parser = subparsers.add_parser(
        "evaluate",
        help="FID/KID of a pipeline's samples, its NLL bound in bits/dim, or a sampler or guidance sweep; writes OUTPUT/eval.json.",
        description="Evaluate a saved pipeline (folder or Hub id). The FID protocol is described in docs/evaluation.md.",
    )
    parser.add_argument("--model", required=True, type=local_path_or_hub_id, help="Training OUTPUT_DIR (a saved pipeline) or Hub id (user/name).")
    parser.add_argument("--metric", choices=("fid", "nll"), help="fid: sample and compare with --reference; nll: the variational bound on --dataset.")
    parser.add_argument("--output", type=output_folder, help="Folder for eval.json (default: the model folder, or ./eval-<name>/ for a Hub id).")
    parser.add_argument("--seed", type=bounded(int, ge=0))
    parser.add_argument("--batch_size", type=bounded(int, ge=1), help="Images per forward pass (default: 256 on GPU, 32 on CPU; 16 for nll on CPU).")
    parser.add_argument("--device", type=device_type, help="cpu or cuda (default: cuda when available).")
    parser.add_argument("--revision", help="Hub revision of --model.")
    parser.add_argument("--ddp_timeout", type=bounded(int, ge=1), help="Seconds a process waits for the others before all exit.")
    group = parser.add_argument_group("FID")
    group.add_argument("--num_samples", type=bounded(int, ge=2), help="Generated images (50,000 for numbers comparable with papers).")
    group.add_argument("--scheduler", choices=SAMPLERS, help="Sampler: ddpm (ancestral), ddim (eta = 0) or dpmsolver (DPM-Solver++ 2M).")
    group.add_argument("--steps", type=bounded(int, ge=1), help="Denoising steps K (default: T for ddpm; required for ddim and dpmsolver).")
    group.add_argument("--timestep_spacing", choices=TIMESTEP_SPACINGS, help="Which K of the T timesteps (default: the model's).")
    group.add_argument(
        "--reference",
        type=local_path_or_hub_id,
        help=f"Reference set: {', '.join(REFERENCE_ALIASES)}, a statistics .npz, a dataset (statistics cached) or a folder of images.",
    )
    group.add_argument("--reference_split", help="Split of --reference when it is a dataset.")
    group.add_argument("--kid", action="store_true", help="Also compute KID (Binkowski et al. 2018) from 5,000 features per set.")
    group.add_argument(
        "--repeats",
        type=bounded(int, ge=1),
        help="Independent image sets per FID (seeds seed, seed + num_samples, ...): reports each FID, their mean, standard deviation and minimum.",
    )
    group.add_argument(
        "--dtype",
        choices=("fp32", "bf16"),
        help="bf16: run the UNet under bf16 autocast (GPUs); the sampler's arithmetic and the Inception network stay float32.",
    )
    group.add_argument("--compile", action="store_true", help="torch.compile the UNet first (pays off for thousands of images on a GPU; eager where it fails).")
    group.add_argument(
        "--sweep",
        metavar="SAMPLER:STEPS,...",
        help='Several samplers on one model, e.g. "ddpm:1000,ddim:50,ddim:100,dpmsolver:20": table + plot.',
    )
    group.add_argument(
        "--frontier",
        type=nfe_budgets,
        nargs="?",
        const=list(DEFAULT_FRONTIER_BUDGETS),
        metavar="NFE,...",
        help=f"FID against network evaluations for every sampler ({', '.join(SAMPLERS)}) at each budget (default {','.join(map(str, DEFAULT_FRONTIER_BUDGETS))}; "
        "ddpm also with all T steps): plot, table of the best sampler per budget.",
    )
    group = parser.add_argument_group("Class-conditional models (every class gets the same number of samples)")
    group.add_argument(
        "--guidance_scale",
        type=bounded(float, ge=0),
        help="Classifier-free guidance scale s = 1 + w (Ho & Salimans' w): 1 is plain conditional sampling (the default), 0 unconditional.",
    )
    group.add_argument(
        "--per_class_fid",
        action="store_true",
        help="Also the FID of each class's samples against the reference images of that class (--reference: a dataset with class labels). "
        "With few images per class it is strongly biased upwards: compare it only between runs of equal size.",
    )
    group.add_argument(
        "--guidance_sweep",
        type=guidance_scales,
        metavar="S,S,...",
        help='One FID per guidance scale, e.g. "0,1,2,4" (same seed, sampler and reference): table + plot of FID against s.',
    )
    group = parser.add_argument_group("NLL (--metric nll)")
    group.add_argument("--dataset", type=local_path_or_hub_id, help="Dataset for the bound (Hub id, parquet folder, ...).")
    group.add_argument("--split", help="Split for the bound (the paper: the CIFAR-10 test set).")
    group.add_argument("--num_images", type=bounded(int, ge=1), help="First N images of the split (default: all).")
    group.add_argument("--image_column")
    group.add_argument(
        "--timestep_stride",
        type=bounded(int, ge=1),
        help="1: the exact bound over all T terms. k > 1: an unbiased estimate from about k + T/k terms (faster, noisier).",
    )
    parser.set_defaults(func=run_evaluate, **{f.name: f.default for f in dataclasses.fields(EvaluateOptions) if f.default is not dataclasses.MISSING})

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

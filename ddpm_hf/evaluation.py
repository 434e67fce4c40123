"""What `ddpm-hf evaluate` computes, spread over Accelerate's processes: how good a trained pipeline is.

* FID (and optionally KID) of generated samples against reference statistics, with the sampler of
  your choice: DDPM ancestral sampling (Ho et al. 2020, Alg. 2), DDIM (Song et al. 2021, eta = 0) or
  DPM-Solver++ (Lu et al. 2022). The feature network and protocol are in ddpm_hf/fid.py.
* Several FIDs of one model in one run: against the sampler, every sampler against NFE (the frontier), or against
  the guidance scale (ddpm_hf/evaluation_sweeps.py: what each sweep varies, its table and plot).
* FID with its spread: `repeats` independent image sets (seeds seed, seed + num_samples, ...), their mean, standard
  deviation and minimum (`merge_repeats`).
* The UNet under bf16 autocast and/or torch.compile (`dtype`, `compile`) while the Inception network stays float32:
  only the UNet's forward is autocast (sampling.ReverseProcess), the features are computed outside it.
* Class-conditional models (conditioning.py): every class gets the same number of samples, with the classifier-free
  guidance scale of your choice; optionally the FID of each class against the reference images of that class
  (ddpm_hf/evaluation_per_class.py).
* The variational bound in bits/dim (Ho et al. 2020, Table 1): the terms are in ddpm_hf/nll.py.

What to compute is one `EvaluateOptions`, a field per option of `ddpm-hf evaluate` (evaluation_cli.py builds it from
the command line, and prints and writes the results); `evaluate_fid`, `evaluate_runs`, `evaluate_frontier` and
`evaluate_nll` return the dicts eval.json holds (ddpm_hf/run_folder.py). During training, --eval_every calls `fid_result`, the same code;
samplers come from `ddpm_hf.sampling.make_sampler`.
"""

from __future__ import annotations

import contextlib
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from .conditioning import balanced_labels, check_guidance, num_classes
from .distributed import DEFAULT_TIMEOUT_S, process_device
from .errors import UserError
from .evaluation_per_class import check_per_class_samples, class_reference_statistics, open_labelled_reference
from .evaluation_sweeps import FRONTIER, GUIDANCE_SWEEP, SAMPLER_SWEEP, SweepKind, best_at_budget, steps_within
from .fid import (
    PROTOCOL,
    PROTOCOL_DESCRIPTION,
    FIDStatistics,
    InceptionFeatures,
    RunningStatistics,
    compute_statistics,
    fid_from_statistics,
    kernel_inception_distance,
    load_dataset_images,
    resolve_reference,
    resolve_statistics,
)
from .sampling import SAMPLERS, CompiledOrEager, Sampler, compile_for_sampling, generate_images, load_pipeline, make_sampler, model_class_names

KID_FEATURES = 5000  # feature rows kept per set for KID (subsets of 1000, as in Binkowski et al.)


# ---------------------------------------------------------------------------------------------
# What to compute
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """One FID of an evaluation: the sampler, its steps (None: the sampler's default) and the guidance scale (None: 1).
    A frontier run gives an NFE budget instead of steps: the most steps whose network evaluations fit in it."""

    scheduler: str
    steps: int | None
    guidance_scale: float | None = None
    nfe_budget: int | None = None


@dataclass
class EvaluateOptions:
    """What `ddpm-hf evaluate` is asked for: one field per option, of the same name (`ddpm-hf evaluate --help`).

    >>> evaluate_fid(EvaluateOptions(model="user/name", num_samples=10_000, scheduler="ddim", steps=100))

    Options that cannot go together are the one-line error when the object is made. `runs()` lists the FIDs asked
    for and `sweep_kind()` the sweep they form, if any: a new kind of evaluation adds its field here, its runs there,
    and its report in evaluation_cli.py."""

    model: str  # a saved pipeline's folder or a Hub id
    metric: str = "fid"  # fid | nll
    output: str | None = None  # the folder of eval.json (evaluation_cli.default_output_dir)
    seed: int = 0
    batch_size: int | None = None  # None: 256 on GPU, 32 on CPU (16 for nll on CPU)
    device: str | None = None
    revision: str | None = None
    ddp_timeout: int = DEFAULT_TIMEOUT_S  # seconds a process waits for the others
    # ---- FID
    num_samples: int = 50_000
    scheduler: str = "ddpm"
    steps: int | None = None
    timestep_spacing: str | None = None
    reference: str = "cifar10-train"  # fid.resolve_reference
    reference_split: str = "train"
    kid: bool = False  # of a single FID: the sweeps' tables have no KID column
    repeats: int = 1  # independent image sets per FID (seeds seed, seed + num_samples, ...): mean, std and min
    dtype: str = "fp32"  # fp32 | bf16: the UNet under bf16 autocast (the Inception network stays float32)
    compile: bool = False  # torch.compile the UNet (sampling.compile_for_sampling: eager where compiling fails)
    sweep: list[tuple[str, int]] | None = None  # [(sampler, steps), ...]: evaluation_sweeps.parse_sweep
    frontier: list[int] | None = None  # NFE budgets: every sampler at each, and ddpm with all T steps
    # ---- class-conditional models
    guidance_scale: float | None = None
    per_class_fid: bool = False
    guidance_sweep: list[float] | None = None
    # ---- the bound (metric "nll")
    dataset: str = "uoft-cs/cifar10"
    split: str = "test"
    num_images: int | None = None
    image_column: str | None = None
    timestep_stride: int = 1

    def __post_init__(self):
        sweeps = [o for o, v in (("--guidance_sweep", self.guidance_sweep), ("--sweep", self.sweep), ("--frontier", self.frontier)) if v is not None]
        if len(sweeps) > 1:
            raise UserError(
                f"{sweeps[0]} and {sweeps[1]} cannot be combined: run one sweep at a time (--sweep or --frontier with --guidance_scale S sweeps samplers at one scale)."
            )
        if self.guidance_sweep is not None and self.guidance_scale is not None:
            raise UserError("--guidance_sweep sets the guidance scales itself: drop --guidance_scale.")
        if self.frontier is not None and self.steps is not None:
            raise UserError("--frontier sets every sampler's steps itself, from its NFE budgets: drop --steps.")
        if self.dtype not in ("fp32", "bf16"):
            raise UserError(f"--dtype {self.dtype}: choose fp32 or bf16.")
        if self.repeats < 1:
            raise UserError(f"--repeats {self.repeats}: give at least 1 image set.")
        if self.metric == "nll" and self.sweep_kind() is None:
            given = [o for o, v in (("--guidance_scale", self.guidance_scale), ("--guidance_sweep", self.guidance_sweep)) if v is not None]
            given += ["--per_class_fid"] if self.per_class_fid else []
            given += [f"--repeats {self.repeats}"] if self.repeats > 1 else []
            given += ["--dtype bf16"] if self.dtype != "fp32" else []  # the bound is computed in float32
            given += ["--compile"] if self.compile else []
            if given:
                raise UserError(f"{given[0]} is an option of FID, not of --metric nll: drop {given[0]}, or evaluate FID (--metric fid).")

    def sweep_kind(self) -> SweepKind | None:
        """The sweep asked for (it takes precedence over --metric), or None for a single FID or the bound."""
        if self.sweep is not None:
            return SAMPLER_SWEEP
        if self.frontier is not None:
            return FRONTIER
        if self.guidance_sweep is not None:
            return GUIDANCE_SWEEP
        return None

    def runs(self) -> list[Run]:
        """The FIDs asked for, all with the same seed and reference: one per --sweep entry, one per sampler and
        --frontier budget (and ddpm with all T steps, its default), one per --guidance_sweep scale, else one."""
        if self.sweep is not None:
            return [Run(sampler, steps, self.guidance_scale) for sampler, steps in self.sweep]
        if self.frontier is not None:
            runs = []
            for sampler in SAMPLERS:
                runs += [Run(sampler, None, self.guidance_scale, budget) for budget in self.frontier]
                if sampler == "ddpm":
                    runs.append(Run(sampler, None, self.guidance_scale))  # all T steps: the paper's sampler, the frontier's far end
            return runs
        if self.guidance_sweep is not None:
            return [Run(self.scheduler, self.steps, float(scale)) for scale in self.guidance_sweep]
        return [Run(self.scheduler, self.steps, self.guidance_scale)]

    def seeds(self) -> list[int]:
        """The seed of each image set: image i of set r is image i of seed + r * num_samples, so no two sets share an
        image (each image's noise comes from its own generator of (seed, i): distributed.item_seed)."""
        return [self.seed + r * self.num_samples for r in range(self.repeats)]


# ---------------------------------------------------------------------------------------------
# FID of a model
# ---------------------------------------------------------------------------------------------


class FIDEvaluator:
    """FID of a model's samples against fixed reference statistics.

    reference: uint8 images N x 3 x H x W, a `FIDStatistics`, a `.npz` statistics file, a reference
    alias (`cifar10-train`) or a dataset. The reference statistics are computed (or loaded) once.

    >>> evaluator = FIDEvaluator(reference_images, device="cuda")
    >>> fid = evaluator.fid_of(ema_unet, make_sampler(noise_scheduler, "ddim", 100), num_samples=10_000)
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
        self.class_references: list[FIDStatistics] | None = None  # per class, for per-class FID (evaluation_per_class.class_reference_statistics)
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

    def statistics_of(
        self,
        unet,
        sampler: Sampler,
        num_samples: int,
        seed: int = 0,
        batch_size: int | None = None,
        progress: bool = False,
        guidance_scale: float | None = None,
        autocast_dtype: torch.dtype | None = None,
    ) -> FIDStatistics:
        """Sample `num_samples` images with `sampler` (from `ddpm_hf.sampling.make_sampler`) and return their
        statistics, merged over the processes: features travel, images do not, and no image is kept in memory.
        KID keeps the features of images 0 .. keep_features - 1. info records the sampler, steps, seed and NFE.

        A class-conditional UNet makes image i of class i mod K (`conditioning.balanced_labels`: the same number of
        samples per class) with classifier-free guidance scale `guidance_scale` (None: 1, plain conditional).
        `autocast_dtype` (e.g. torch.bfloat16) runs the UNet, and only the UNet, under autocast: the images are
        quantised to uint8 and the Inception network sees them in float32, as the FID protocol wants."""
        return self.sample_statistics(unet, sampler, num_samples, seed, batch_size, progress, guidance_scale, autocast_dtype=autocast_dtype)[0]

    def sample_statistics(
        self,
        unet,
        sampler: Sampler,
        num_samples: int,
        seed: int = 0,
        batch_size: int | None = None,
        progress: bool = False,
        guidance_scale: float | None = None,
        per_class: bool = False,
        autocast_dtype: torch.dtype | None = None,
    ) -> tuple[FIDStatistics, list[FIDStatistics] | None]:
        """`statistics_of`, and with `per_class` (class-conditional UNets) also the statistics of each class's samples,
        from the same single sampling pass: the features of each class are kept (float32, on the CPU: N x 2048 in all)
        and reduced class by class at the end, merged over the processes like the statistics of all samples."""
        scale = check_guidance(unet, guidance_scale)
        classes = num_classes(unet)
        labels = balanced_labels(classes, num_samples) if classes is not None else None
        if per_class and classes is None:
            raise ValueError("per-class statistics need a class-conditional UNet")
        running = RunningStatistics(self.keep_features)
        by_class: list[list[tuple[int, torch.Tensor]]] = [[] for _ in range(classes or 0)]
        desc = f"{sampler.describe()} + Inception"
        options = dict(class_labels=labels, guidance_scale=scale) if classes is not None else {}
        for indices, batch in generate_images(
            unet, sampler, num_samples, seed, batch_size or self.batch_size, progress, desc=desc, state=self.state, autocast_dtype=autocast_dtype, **options
        ):
            for start in range(0, 0 if batch is None else batch.shape[0], self.batch_size):
                first = indices.start + start
                features = self.extractor(batch[start : start + self.batch_size])
                running.update(features, first_index=first)
                if per_class:
                    ids = torch.tensor(labels[first : first + features.shape[0]])
                    for k in ids.unique().tolist():
                        rows = (ids == k).nonzero().flatten()
                        by_class[k].append((first + int(rows[0]), features[rows.to(features.device)].cpu()))
        info = dict(sampler=sampler.name, steps=sampler.steps, nfe=sampler.nfe, seed=seed, timestep_spacing=sampler.timestep_spacing)
        if classes is not None:
            info.update(guidance_scale=scale, class_balanced=True, num_classes=classes)
        generated = running.merged(self.state).result(info)
        if not per_class:
            return generated, None
        per_class_statistics = []
        for k, parts in enumerate(by_class):  # every process reduces every class, in the same order (collectives)
            statistics = RunningStatistics()
            for first, features in parts:
                statistics.update(features.to(self.device), first_index=first)
            per_class_statistics.append(statistics.merged(self.state).result(dict(info, class_id=k)))
        return generated, per_class_statistics

    def fid_of(
        self,
        unet,
        sampler: Sampler,
        num_samples: int,
        seed: int = 0,
        batch_size: int | None = None,
        progress: bool = False,
        guidance_scale: float | None = None,
        autocast_dtype: torch.dtype | None = None,
    ) -> float:
        """FID of `num_samples` images from `unet` (put in eval mode while sampling; its mode is restored)."""
        statistics = self.statistics_of(unet, sampler, num_samples, seed, batch_size, progress, guidance_scale, autocast_dtype)
        return fid_from_statistics(statistics, self.reference)


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
    guidance_scale: float | None = None,
    per_class_fid: bool = False,
    class_names: Sequence[str] | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> dict:
    """FID (and KID) of `unet`'s samples as the dict eval.json holds (see ddpm_hf/run_folder.py).
    `ddpm-hf evaluate` and training's --eval_every both compute it here. `autocast_dtype` runs the UNet (only) under
    autocast; the result records it as `dtype` ("bf16" or "fp32") and whether the UNet ran compiled as `compile`.

    A class-conditional UNet samples every class equally often with guidance scale `guidance_scale` (None: 1); the
    result then also records `guidance_scale`, `class_balanced` and `num_classes`, and with `per_class_fid` (after
    setting `evaluator.class_references`) `per_class_fid`, the FID of each class's samples against the reference images
    of that class, by class name (`class_names`) or id."""
    classes = num_classes(unet)
    if per_class_fid and classes is None:
        raise UserError(
            "--per_class_fid needs a class-conditional model, but this one is unconditional. Train one with --class_conditional, or drop --per_class_fid."
        )
    if per_class_fid and evaluator.class_references is None:
        raise ValueError("per-class FID needs the reference statistics of each class: set evaluator.class_references first (evaluation_per_class)")
    start = time.time()
    generated, per_class = evaluator.sample_statistics(
        unet, sampler, num_samples, seed, batch_size, progress, guidance_scale, per_class_fid, autocast_dtype=autocast_dtype
    )
    seconds = time.time() - start
    result = {"fid": fid_from_statistics(generated, evaluator.reference)}
    if kid:
        if evaluator.reference.features is None:
            raise UserError(
                "--kid needs reference features, but the reference statistics hold none. Recompute them with `ddpm-hf fid-stats --keep_features 5000`, or drop --kid."
            )
        result["kid"], result["kid_std"] = kernel_inception_distance(generated.features, evaluator.reference.features)
    if per_class is not None:
        names = list(class_names) if class_names else [str(k) for k in range(classes)]
        result["per_class_fid"] = {names[k]: fid_from_statistics(per_class[k], evaluator.class_references[k]) for k in range(classes)}
    result.update(
        num_samples=num_samples,
        scheduler=sampler.name,
        steps=sampler.steps,
        nfe=sampler.nfe,
        timestep_spacing=sampler.timestep_spacing,
        batch_size=batch_size or evaluator.batch_size,
        seed=seed,
        dtype=DTYPE_NAMES[autocast_dtype],
        compile=ran_compiled(unet),
    )
    if classes is not None:
        result.update(guidance_scale=generated.info["guidance_scale"], class_balanced=True, num_classes=classes)
    result.update(
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


DTYPE_NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}  # eval.json's `dtype` of an autocast dtype


def ran_compiled(unet) -> bool:
    """Whether `unet` ran compiled: `compile_for_sampling`'s module until it fell back to eager, torch.compile's
    wrapper, or a module compiled in place (`nn.Module.compile`, as training does)."""
    if isinstance(unet, CompiledOrEager):
        return unet.compiled is not None
    return isinstance(unet, torch._dynamo.eval_frame.OptimizedModule) or getattr(unet, "_compiled_call_impl", None) is not None


def merge_repeats(sets: list[dict]) -> dict:
    """One result of several independent image sets (`fid_result`'s dicts, in seed order): `fid` is their mean,
    `fid_std` the sample standard deviation (N - 1), `fid_min` the minimum (what EDM reports of three), `repeats` the
    count and `sets` each set's seed, FID (KID) and seconds. KID likewise: `kid` the mean, `kid_std` the standard
    deviation over the sets (not over subsets, as for a single set); per-class FIDs are averaged. The rest (sampler,
    reference, ...) is the first set's, `num_samples` the size of one set, and the timing is the sum over the sets."""
    import statistics

    first = sets[0]
    fids = [s["fid"] for s in sets]
    result = dict(first, fid=statistics.fmean(fids), fid_std=statistics.stdev(fids), fid_min=min(fids), repeats=len(sets))
    result["sets"] = [
        {"seed": s["seed"], "fid": s["fid"], **{k: s[k] for k in ("kid", "kid_std") if k in s}, "seconds": s["timing"]["sampling_and_features_seconds"]}
        for s in sets
    ]
    if "kid" in first:
        kids = [s["kid"] for s in sets]
        result.update(kid=statistics.fmean(kids), kid_std=statistics.stdev(kids))
    if "per_class_fid" in first:
        result["per_class_fid"] = {name: statistics.fmean(s["per_class_fid"][name] for s in sets) for name in first["per_class_fid"]}
    seconds = sum(s["timing"]["sampling_and_features_seconds"] for s in sets)
    result["timing"] = dict(
        first["timing"], sampling_and_features_seconds=round(seconds, 2), images_per_second=round(len(sets) * first["num_samples"] / max(seconds, 1e-9), 2)
    )
    return result


def _environment(device) -> dict:
    import diffusers

    name = torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else platform.processor() or "cpu"
    return {"device": str(device), "device_name": name, "torch": torch.__version__, "diffusers": diffusers.__version__}


def _reference_description(reference: FIDStatistics, spec: str, split: str) -> dict:
    """eval.json's `reference_details`: what the statistics say they are, else what `spec` names."""
    named = resolve_reference(spec, split)
    return {
        "spec": spec,
        "dataset": reference.info.get("also_known_as") or reference.info.get("source") or named.source,
        "split": reference.info.get("split", named.split),
        "num_images": reference.num_images,
        "resolution": reference.info.get("resolution"),
        "file": reference.info.get("file"),
    }


# ---------------------------------------------------------------------------------------------
# `ddpm-hf evaluate`: a saved pipeline's FIDs and bound
# ---------------------------------------------------------------------------------------------


def load_model(model: str, device: str | None = None, revision: str | None = None, state=None):
    """(unet, scheduler) of a saved pipeline: a folder written by `save_pretrained` or a Hub id (downloaded once
    when several processes load it)."""
    with state.main_process_first() if state is not None else contextlib.nullcontext():
        pipeline = load_pipeline(model, device=device, revision=revision)
    return pipeline.unet.eval(), pipeline.scheduler


def evaluate_runs(options: EvaluateOptions, state=None) -> list[dict]:
    """One FID result per run of `options.runs()` (a sweep's, the frontier's, or the single one), all against the
    same reference statistics and seed; with `options.repeats` > 1 each is the mean of that many image sets
    (`merge_repeats`). Every option is checked before any work. With an Accelerate `state` of several processes each
    samples its share and the statistics are merged: the same results on every process."""
    return _evaluate_runs(options, state)[0]


def evaluate_frontier(options: EvaluateOptions, state=None) -> dict:
    """The frontier of `options.frontier` (NFE budgets) as eval.json's `frontier` section: `budgets`, `best` (the
    best sampler at each budget, `evaluation_sweeps.best_at_budget`), `runs` (`evaluate_runs`' results, each with its
    `nfe_budget`) and `not_run` (the samplers that no step count within a budget lets run, with make_sampler's reason)."""
    results, not_run = _evaluate_runs(options, state)
    return {"budgets": options.frontier, "best": best_at_budget(results), "runs": results, "not_run": not_run}


def _evaluate_runs(options: EvaluateOptions, state=None) -> tuple[list[dict], list[dict]]:
    """`evaluate_runs`' results, and the frontier runs left out (`_runs_and_samplers`)."""
    started = time.time()
    progress = state is None or state.is_main_process
    device = process_device(options.device, state)
    unet, scheduler = load_model(options.model, str(device), options.revision, state)
    runs, samplers, not_run = _runs_and_samplers(options, scheduler)
    classes, names, labelled = num_classes(unet), None, None
    if classes is None and options.guidance_sweep is not None:
        raise UserError(
            f"--guidance_sweep needs a class-conditional model, but {options.model} is unconditional. Train one with --class_conditional, or drop --guidance_sweep."
        )
    for run in runs:
        check_guidance(unet, run.guidance_scale)  # refuses --guidance_scale for an unconditional model
    if classes is None and options.per_class_fid:
        raise UserError(
            f"--per_class_fid needs a class-conditional model, but {options.model} is unconditional. Train one with --class_conditional, or drop --per_class_fid."
        )
    if classes is not None:
        with state.main_process_first() if state is not None else contextlib.nullcontext():
            names = model_class_names(options.model, options.revision)
    if options.per_class_fid:
        check_per_class_samples(options.num_samples, classes)
        labelled = open_labelled_reference(options.reference, options.reference_split, unet.config.sample_size, classes, names)
    batch_size = options.batch_size or (256 if device.type == "cuda" else 32)
    kid = options.kid and options.sweep_kind() is None
    evaluator = FIDEvaluator(
        options.reference,
        device,
        batch_size,
        options.reference_split,
        unet.config.sample_size,
        keep_features=KID_FEATURES if kid else 0,
        progress=progress,
        state=state,
    )
    if labelled is not None:
        evaluator.class_references = class_reference_statistics(labelled, evaluator, progress)
    reference_seconds = time.time() - started
    sampling_unet = compile_for_sampling(unet) if options.compile else unet  # compiled at its first call, once for every run
    autocast_dtype = torch.bfloat16 if options.dtype == "bf16" else None
    results = []
    for run, sampler in zip(runs, samplers):
        sets = [
            fid_result(
                evaluator,
                sampling_unet,
                sampler,
                options.num_samples,
                seed,
                batch_size,
                reference=options.reference,
                reference_split=options.reference_split,
                kid=kid,
                progress=progress,
                reference_seconds=reference_seconds,
                guidance_scale=run.guidance_scale,
                per_class_fid=options.per_class_fid,
                class_names=names,
                autocast_dtype=autocast_dtype,
            )
            for seed in options.seeds()
        ]
        result = merge_repeats(sets) if len(sets) > 1 else sets[0]
        if labelled is not None:
            result["per_class_reference_images"] = dict(zip(result["per_class_fid"], labelled.counts()))
        if options.frontier is not None:
            result["nfe_budget"] = run.nfe_budget or sampler.nfe  # ddpm with all T steps: T
        results.append(dict(result, model=options.model))
    return results, not_run


def _runs_and_samplers(options: EvaluateOptions, scheduler) -> tuple[list[Run], list[Sampler], list[dict]]:
    """The runs of `options` with their samplers, all made (and so checked) before any work, and the frontier runs
    left out. A frontier run's steps are the most whose NFE fits in its budget and that make_sampler accepts
    (`evaluation_sweeps.steps_within`); where none does (e.g. a 'leading' chain of one or two steps), the run is left
    out with make_sampler's reason, as is a run that would repeat another's sampler and steps (ddpm at a budget of T).
    Budgets above the model's T are refused."""
    num_train_timesteps = scheduler.config.num_train_timesteps
    too_large = [budget for budget in options.frontier or () if budget > num_train_timesteps]
    if too_large:
        raise UserError(
            f"--frontier {','.join(map(str, options.frontier))}: the budget {too_large[0]} exceeds the model's T = {num_train_timesteps} "
            f"network evaluations; give budgets up to {num_train_timesteps}."
        )
    runs, samplers, not_run, made = [], [], [], set()
    for run in options.runs():
        steps = run.steps
        if run.nfe_budget is not None:
            try:
                steps = steps_within(scheduler, run.scheduler, run.nfe_budget, options.timestep_spacing)
            except UserError as refusal:
                not_run.append({"sampler": run.scheduler, "nfe_budget": run.nfe_budget, "reason": str(refusal)})
                continue
        sampler = make_sampler(scheduler, run.scheduler, steps, options.timestep_spacing)
        if options.frontier is not None and (sampler.name, sampler.steps) in made:
            continue
        made.add((sampler.name, sampler.steps))
        runs.append(replace(run, steps=sampler.steps))
        samplers.append(sampler)
    return runs, samplers, not_run


def evaluate_fid(options: EvaluateOptions, state=None) -> dict:
    """FID (and KID) of a saved pipeline's samples, the single one of `options` (its sweeps aside); the dict that goes
    into eval.json (the same on every process). A class-conditional model samples every class equally often, with
    `options.guidance_scale` (None: 1); `options.per_class_fid` adds the FID of each class against the reference
    images of that class (a labelled dataset as `options.reference`); `options.repeats` > 1 makes it the mean of that
    many image sets, with `fid_std`, `fid_min` and `sets` (`merge_repeats`)."""
    started = time.time()
    (result,) = evaluate_runs(replace(options, sweep=None, frontier=None, guidance_sweep=None), state)
    result["timing"]["wall_seconds"] = round(time.time() - started, 2)
    return result


def evaluate_nll(options: EvaluateOptions, state=None) -> dict:
    """The variational bound in bits/dim of a saved pipeline on `options.dataset` (`split`); the dict for eval.json.
    With several processes each scores its share of the images (nll.bits_per_dim) and the totals are merged."""
    from .nll import bits_per_dim

    start = time.time()
    progress = state is None or state.is_main_process
    device = process_device(options.device, state)
    unet, scheduler = load_model(options.model, str(device), options.revision, state)
    with state.main_process_first() if state is not None else contextlib.nullcontext():  # decoded and cached once
        images = load_dataset_images(options.dataset, options.split, unet.config.sample_size, options.image_column, options.num_images, progress)
    batch_size = options.batch_size or (250 if device.type == "cuda" else 16)
    result = bits_per_dim(unet, scheduler, images, batch_size, options.timestep_stride, options.seed, progress=progress, state=state)
    result.update(model=options.model, dataset=options.dataset, split=options.split, seed=options.seed, batch_size=batch_size)
    result["num_processes"] = state.num_processes if state is not None else 1
    result["timing"] = {"seconds": round(time.time() - start, 2), "wall_seconds": round(time.time() - start, 2)}
    result["environment"] = _environment(device)
    return result

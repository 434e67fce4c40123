"""`ddpm-hf evaluate`, `ddpm-hf fid` and `ddpm-hf fid-stats`: how good a trained pipeline is.

* FID (and optionally KID) of generated samples against reference statistics, with the sampler of
  your choice: DDPM ancestral sampling (Ho et al. 2020, Alg. 2), DDIM (Song et al. 2021, eta = 0) or
  DPM-Solver++ (Lu et al. 2022). The feature network and protocol are in ddpm_hf/fid.py.
* The variational bound in bits/dim (Ho et al. 2020, Table 1), in ddpm_hf/nll.py.
* A sampler sweep: FID against the number of network evaluations, as a table and a plot.
* Class-conditional models (conditioning.py): every class gets the same number of samples, with the classifier-free
  guidance scale of your choice; optionally the FID of each class against the reference images of that class; and a
  guidance sweep, FID against the guidance scale s = 1 + w (Ho & Salimans 2022), as a table and a plot.

During training, --eval_every calls `fid_result`, the same code as `ddpm-hf evaluate`; samplers come from
`ddpm_hf.sampling.make_sampler`.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import platform
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .arguments import bounded, local_path_or_hub_id, output_file, output_folder
from .arguments import device as device_type
from .conditioning import balanced_labels, check_guidance, num_classes
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
    dataset_identity,
    fid_from_statistics,
    is_image_folder,
    kernel_inception_distance,
    load_dataset_images,
    resolve_statistics,
    stats_cache_path,
)
from .run_folder import RunFolder
from .sampling import SAMPLERS, TIMESTEP_SPACINGS, Sampler, generate_images, load_pipeline, make_sampler, model_class_names

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
        self.class_references: list[FIDStatistics] | None = None  # per class, for per-class FID (load_class_references)
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
    ) -> FIDStatistics:
        """Sample `num_samples` images with `sampler` (from `ddpm_hf.sampling.make_sampler`) and return their
        statistics, merged over the processes: features travel, images do not, and no image is kept in memory.
        KID keeps the features of images 0 .. keep_features - 1. info records the sampler, steps, seed and NFE.

        A class-conditional UNet makes image i of class i mod K (`conditioning.balanced_labels`: the same number of
        samples per class) with classifier-free guidance scale `guidance_scale` (None: 1, plain conditional)."""
        return self.sample_statistics(unet, sampler, num_samples, seed, batch_size, progress, guidance_scale)[0]

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
            unet, sampler, num_samples, seed, batch_size or self.batch_size, progress, desc=desc, state=self.state, **options
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
    ) -> float:
        """FID of `num_samples` images from `unet` (put in eval mode while sampling; its mode is restored)."""
        return fid_from_statistics(self.statistics_of(unet, sampler, num_samples, seed, batch_size, progress, guidance_scale), self.reference)

    def load_class_references(self, labelled: LabelledReference, progress: bool = False) -> None:
        """The statistics of the reference images of each class (`class_references[k]`), for per-class FID: from the
        cache when they are there (fid.stats_cache_path under a per-class name), else computed and cached."""
        from .data import decode_images

        labels = labelled.labels
        identity = dataset_identity(labelled.source)
        paths = [
            stats_cache_path(labelled.source, labelled.split, labelled.resolution, name=f"{identity}_class-{k}-of-{labels.num_classes}-{labels.column}")
            for k in range(labels.num_classes)
        ]
        cached = _load_all(paths)
        if cached is not None:
            self.class_references = cached
            return
        with self.state.main_process_first() if self.state is not None else contextlib.nullcontext():  # decoded and cached once
            images = decode_images(labelled.dataset, labelled.resolution, progress=progress).images
        references = []
        for k in range(labels.num_classes):
            name = labels.names[k] if labels.names else str(k)
            info = dict(source=identity, split=labelled.split, resolution=labelled.resolution, label_column=labels.column, class_id=k, class_name=name)
            references.append(
                compute_statistics(
                    images[labels.ids == k],
                    self.batch_size,
                    keep_features=0,
                    progress=progress,
                    desc=f"Reference features of class {name}",
                    info=info,
                    extractor=self.extractor,
                    state=self.state,
                )
            )
        if self.state is None or self.state.is_main_process:  # one writer
            for statistics, path in zip(references, paths):
                try:
                    statistics.save(path)
                    statistics.info["file"] = path
                except OSError as e:  # a read-only or full cache only costs the next run the computation
                    import warnings

                    warnings.warn(f"could not cache per-class FID statistics in {os.path.dirname(path)} ({e.strerror or e}); the next run computes them again.")
                    break
        self.class_references = references


def _load_all(paths: list[str]) -> list[FIDStatistics] | None:
    """The statistics in every one of `paths`, or None unless all are there and readable."""
    import zipfile

    if not all(os.path.isfile(path) for path in paths):
        return None
    try:
        return [FIDStatistics.load(path) for path in paths]
    except (UserError, zipfile.BadZipFile):
        return None


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
) -> dict:
    """FID (and KID) of `unet`'s samples as the dict eval.json holds (see ddpm_hf/run_folder.py).
    `ddpm-hf evaluate` and training's --eval_every both compute it here.

    A class-conditional UNet samples every class equally often with guidance scale `guidance_scale` (None: 1); the
    result then also records `guidance_scale`, `class_balanced` and `num_classes`, and with `per_class_fid` (after
    `evaluator.load_class_references`) `per_class_fid`, the FID of each class's samples against the reference images
    of that class, by class name (`class_names`) or id."""
    classes = num_classes(unet)
    if per_class_fid and classes is None:
        raise UserError(
            "--per_class_fid needs a class-conditional model, but this one is unconditional. Train one with --class_conditional, or drop --per_class_fid."
        )
    if per_class_fid and evaluator.class_references is None:
        raise ValueError("per-class FID needs the reference statistics of each class: call evaluator.load_class_references first")
    start = time.time()
    generated, per_class = evaluator.sample_statistics(unet, sampler, num_samples, seed, batch_size, progress, guidance_scale, per_class_fid)
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


# ---------------------------------------------------------------------------------------------
# Per-class FID: reference images with class labels
# ---------------------------------------------------------------------------------------------


@dataclass
class LabelledReference:
    """A reference dataset whose labels match a model's classes (`open_labelled_reference`); decoded only when its
    per-class statistics are not cached."""

    spec: str  # as the user gave it (an alias, a path, a Hub id)
    source: str  # the dataset it names
    split: str
    resolution: int
    dataset: object  # datasets.Dataset
    labels: object  # data.ClassLabels

    def counts(self) -> list[int]:
        return torch.bincount(self.labels.ids, minlength=self.labels.num_classes).tolist()


_PER_CLASS_FIX = "Pass as --reference a dataset with class labels (the one the model was trained on, or cifar10-train for CIFAR-10), or drop --per_class_fid."


def open_labelled_reference(
    reference: str, split: str, resolution: int, count: int, class_names: Sequence[str] | None = None, option: str = "--reference"
) -> LabelledReference:
    """Check that `reference` can give per-class FID for a model of `count` classes (named `class_names`): a dataset
    (or an alias of one, fid.REFERENCE_ALIASES) with a label column (data.find_label_column, data.read_class_labels)
    of the same classes, at least 2 images each. Statistics files and plain image folders hold no classes."""
    from .data import find_label_column, load_image_dataset, read_class_labels

    if reference.endswith(".npz"):
        raise UserError(
            f"--per_class_fid needs labelled reference images, but {option} {reference} is a statistics file, which holds no classes. {_PER_CLASS_FIX}"
        )
    source = reference
    if reference in REFERENCE_ALIASES:
        native = ALIAS_RESOLUTIONS[reference]
        if resolution is not None and resolution != native:
            raise UserError(
                f"the reference {reference} holds {native}x{native} images but the images to compare are {resolution}x{resolution}. Pass --reference with a dataset at {resolution}x{resolution}."
            )
        (source, split), resolution = REFERENCE_ALIASES[reference], native
    if is_image_folder(source):
        raise UserError(
            f"--per_class_fid needs labelled reference images, but {option} {reference} is a folder of images without class labels. {_PER_CLASS_FIX}"
        )
    dataset = load_image_dataset(source, split, option=option)
    try:
        column = find_label_column(dataset)
    except UserError:
        raise UserError(
            f"--per_class_fid needs labelled reference images, but {option} {reference} ({split}) has no column of class labels "
            f"(columns: {', '.join(dataset.column_names)}). {_PER_CLASS_FIX}"
        ) from None
    try:
        labels = read_class_labels(dataset, column)
    except UserError as error:
        reason = re.sub(r"\s*(Fix or drop such rows, or pass|Pass) --label_column NAME\.?$", "", str(error)).rstrip(".")
        raise UserError(f"--per_class_fid: the class labels of {option} {reference} ({split}) are unusable: {reason}. {_PER_CLASS_FIX}") from None
    if labels.num_classes != count:
        raise UserError(
            f"--per_class_fid: {option} {reference} ({split}) has {labels.num_classes} classes in column {column!r} but the model has {count}, "
            f"and each class's samples are compared with that class's reference images. {_PER_CLASS_FIX}"
        )
    if class_names and labels.names and list(labels.names) != list(class_names):
        raise UserError(
            f"--per_class_fid: the classes of {option} {reference} ({split}) are {', '.join(labels.names)}, but the model's are {', '.join(class_names)}. {_PER_CLASS_FIX}"
        )
    labelled = LabelledReference(reference, source, split, resolution, dataset, labels)
    scarce = [k for k, n in enumerate(labelled.counts()) if n < 2]
    if scarce:
        names = [class_names[k] if class_names else labels.names[k] if labels.names else str(k) for k in scarce]
        raise UserError(
            f"--per_class_fid: {option} {reference} ({split}) has fewer than 2 images of class {', '.join(names)}; FID needs at least 2 per set. {_PER_CLASS_FIX}"
        )
    return labelled


def check_per_class_samples(num_samples: int, count: int) -> None:
    """Balanced labels give every class num_samples // K or one more: FID needs at least 2 of each."""
    if num_samples < 2 * count:
        raise UserError(
            f"--per_class_fid needs at least 2 samples of each of the {count} classes: pass --num_samples {2 * count} or more (thousands per class for a meaningful number)."
        )


def samples_per_class(num_samples: int, count: int) -> str:
    """'500', or '499-500' when the classes share the samples unevenly (balanced_labels)."""
    low = num_samples // count
    return f"{low:,}" if num_samples % count == 0 else f"{low:,}-{low + 1:,}"


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


def _evaluate_runs(
    model: str,
    runs: list[tuple[str, int | None, float | None]],
    num_samples: int,
    batch_size: int | None,
    reference: str,
    reference_split: str,
    seed: int,
    kid: bool,
    device: str | None,
    revision: str | None,
    progress: bool,
    timestep_spacing: str | None,
    state,
    per_class_fid: bool = False,
    guidance_option: str = "--guidance_scale",
) -> list[dict]:
    """One FID result per (sampler, steps, guidance scale) of `runs`, all against the same reference statistics and
    seed; every option is checked before any work."""
    started = time.time()
    device = process_device(device, state)
    unet, scheduler = load_model(model, str(device), revision, state)
    samplers = [(make_sampler(scheduler, name, steps, timestep_spacing), scale) for name, steps, scale in runs]
    classes, names, labelled = num_classes(unet), None, None
    if classes is None and guidance_option != "--guidance_scale":
        raise UserError(
            f"{guidance_option} needs a class-conditional model, but {model} is unconditional. Train one with --class_conditional, or drop {guidance_option}."
        )
    for _, scale in samplers:
        check_guidance(unet, scale)  # refuses --guidance_scale for an unconditional model
    if classes is None and per_class_fid:
        raise UserError(
            f"--per_class_fid needs a class-conditional model, but {model} is unconditional. Train one with --class_conditional, or drop --per_class_fid."
        )
    if classes is not None:
        with state.main_process_first() if state is not None else contextlib.nullcontext():
            names = model_class_names(model, revision)
    if per_class_fid:
        check_per_class_samples(num_samples, classes)
        labelled = open_labelled_reference(reference, reference_split, unet.config.sample_size, classes, names)
    batch_size = batch_size or (256 if device.type == "cuda" else 32)
    evaluator = FIDEvaluator(
        reference, device, batch_size, reference_split, unet.config.sample_size, keep_features=KID_FEATURES if kid else 0, progress=progress, state=state
    )
    if labelled is not None:
        evaluator.load_class_references(labelled, progress)
    reference_seconds = time.time() - started
    results = []
    for chosen, scale in samplers:
        result = fid_result(
            evaluator, unet, chosen, num_samples, seed, batch_size, reference, reference_split, kid, progress, reference_seconds,
            guidance_scale=scale, per_class_fid=per_class_fid, class_names=names,
        )  # fmt: skip
        if labelled is not None:
            result["per_class_reference_images"] = dict(zip(result["per_class_fid"], labelled.counts()))
        results.append(result)
    return [dict(result, model=model) for result in results]


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
    guidance_scale: float | None = None,
    per_class_fid: bool = False,
) -> dict:
    """FID (and KID) of a saved pipeline's samples; the dict that goes into eval.json (the same on every process).
    A class-conditional model samples every class equally often, with `guidance_scale` (None: 1); `per_class_fid`
    adds the FID of each class against the reference images of that class (a labelled dataset as `reference`)."""
    started = time.time()
    (result,) = _evaluate_runs(
        model, [(sampler, steps, guidance_scale)], num_samples, batch_size, reference, reference_split, seed, kid, device, revision, progress,
        timestep_spacing, state, per_class_fid,
    )  # fmt: skip
    result["timing"]["wall_seconds"] = round(time.time() - started, 2)
    return result


# ---------------------------------------------------------------------------------------------
# Sweeps: FID against the sampler, or against the guidance scale
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


_GUIDANCE_SCALE = bounded(float, ge=0)


def guidance_scales(text: str) -> list[float]:
    """An argparse type: '0,1,2,4' -> [0.0, 1.0, 2.0, 4.0], each scale a number >= 0, none twice."""
    items = [item.strip() for item in text.split(",")]
    if not all(items):
        raise argparse.ArgumentTypeError(f'must be comma-separated guidance scales, e.g. "0,1,2,4", got {text!r}')
    scales = []
    for item in items:
        try:
            scales.append(_GUIDANCE_SCALE(item))
        except argparse.ArgumentTypeError as error:
            raise argparse.ArgumentTypeError(f'each scale {error}; e.g. "0,1,2,4"') from None
    if len(set(scales)) != len(scales):
        raise argparse.ArgumentTypeError(f"lists a guidance scale twice: {text}")
    return scales


guidance_scales.bounds = _GUIDANCE_SCALE.bounds  # each scale's (tests/test_cli_options.py)


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
    guidance_scale: float | None = None,
    per_class_fid: bool = False,
) -> list[dict]:
    """One FID per (sampler, steps), all against the same reference statistics and seed (a class-conditional model:
    balanced classes, guidance scale `guidance_scale`)."""
    return _evaluate_runs(
        model, [(sampler, steps, guidance_scale) for sampler, steps in runs], num_samples, batch_size, reference, reference_split, seed, False,
        device, revision, progress, timestep_spacing, state, per_class_fid,
    )  # fmt: skip


def evaluate_guidance_sweep(
    model: str,
    scales: Sequence[float],
    num_samples: int = 10_000,
    sampler: str = "ddpm",
    steps: int | None = None,
    batch_size: int | None = None,
    reference: str = "cifar10-train",
    reference_split: str = "train",
    seed: int = 0,
    device: str | None = None,
    revision: str | None = None,
    progress: bool = True,
    timestep_spacing: str | None = None,
    state=None,
    per_class_fid: bool = False,
) -> list[dict]:
    """One FID per classifier-free guidance scale of a class-conditional model: the same seed, sampler, reference and
    balanced classes for every scale, so that only the guidance differs."""
    return _evaluate_runs(
        model, [(sampler, steps, float(scale)) for scale in scales], num_samples, batch_size, reference, reference_split, seed, False, device,
        revision, progress, timestep_spacing, state, per_class_fid, guidance_option="--guidance_sweep",
    )  # fmt: skip


@dataclass(frozen=True)
class SweepKind:
    """What a sweep varies, and how its files show it: `name`.csv/.md/.png and eval.json section `name`."""

    name: str
    columns: tuple[tuple[str, str, str, str], ...]  # (row key, table header, cell format, alignment "---" or "---:")
    x: str  # the row key on the plot's x axis
    xlabel: str
    series: str | None  # one line per value of this row key (None: one line)
    log_x: bool


_RESULT_COLUMNS = (("sampler", "sampler", "{}", "---"), ("steps", "steps", "{}", "---:"), ("nfe", "NFE", "{}", "---:"))
_FID_COLUMNS = (("fid", "FID", "{:.2f}", "---:"), ("seconds", "seconds", "{:.0f}", "---:"))
SAMPLER_SWEEP = SweepKind("sweep", _RESULT_COLUMNS + _FID_COLUMNS, "nfe", "network evaluations per image (NFE)", "sampler", True)
GUIDANCE_SWEEP = SweepKind(
    "guidance_sweep",
    (("guidance_scale", "guidance scale s", "{:g}", "---:"), *_RESULT_COLUMNS, *_FID_COLUMNS),
    "guidance_scale",
    "guidance scale s = 1 + w",
    None,
    False,
)


def write_sweep(results: list[dict], output_dir: str, title: str, kind: SweepKind = SAMPLER_SWEEP) -> dict[str, str]:
    """<kind>.csv, <kind>.md (a Markdown table) and <kind>.png: FID against network evaluations (the sampler sweep,
    sweep.*) or against the guidance scale (guidance_sweep.*)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    os.makedirs(output_dir, exist_ok=True)
    rows = sweep_rows(results, kind)
    paths = {name: os.path.join(output_dir, f"{kind.name}.{name}") for name in ("csv", "md", "png")}
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with open(paths["md"], "w") as f:
        f.write(sweep_table(rows, kind) + "\n")

    figure, axis = plt.subplots(figsize=(6, 4), dpi=120)
    for series in dict.fromkeys(r[kind.series] for r in rows) if kind.series else [None]:
        points = sorted((r[kind.x], r["fid"]) for r in rows if kind.series is None or r[kind.series] == series)
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=series)
        for x, fid in points:
            axis.annotate(f"{fid:.2f}", (x, fid), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if kind.log_x:
        axis.set_xscale("log")
    axis.set_xticks(sorted({r[kind.x] for r in rows}))
    if kind.log_x:
        axis.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axis.set_xlabel(kind.xlabel)
    axis.set_ylabel(f"FID ({results[0]['num_samples']} samples, lower is better)")
    axis.set_title(title)
    axis.grid(True, which="both", alpha=0.3)
    if kind.series:
        axis.legend()
    figure.tight_layout()
    figure.savefig(paths["png"])
    plt.close(figure)
    return paths


def sweep_rows(results: list[dict], kind: SweepKind = SAMPLER_SWEEP) -> list[dict]:
    def value(result: dict, key: str):
        if key == "sampler":
            return result["scheduler"]
        if key == "seconds":
            return result["timing"]["sampling_and_features_seconds"]
        return result[key]

    return [{key: value(r, key) for key, *_ in kind.columns} for r in results]


def sweep_table(rows: list[dict], kind: SweepKind = SAMPLER_SWEEP) -> str:
    lines = ["| " + " | ".join(header for _, header, _, _ in kind.columns) + " |", "| " + " | ".join(align for *_, align in kind.columns) + " |"]
    lines += ["| " + " | ".join(form.format(r[key]) for key, _, form, _ in kind.columns) + " |" for r in rows]
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


def check_evaluate_options(args) -> None:
    """Options that cannot go together: one one-line error before any work."""
    if args.guidance_sweep is not None and args.sweep is not None:
        raise UserError(
            "--guidance_sweep and --sweep cannot be combined: run one sweep at a time (--sweep with --guidance_scale S sweeps samplers at one scale)."
        )
    if args.guidance_sweep is not None and args.guidance_scale is not None:
        raise UserError("--guidance_sweep sets the guidance scales itself: drop --guidance_scale.")
    if args.metric == "nll" and args.sweep is None:
        given = [o for o, v in (("--guidance_scale", args.guidance_scale), ("--guidance_sweep", args.guidance_sweep)) if v is not None]
        given += ["--per_class_fid"] if args.per_class_fid else []
        if given:
            raise UserError(f"{given[0]} is an option of FID, not of --metric nll: drop {given[0]}, or evaluate FID (--metric fid).")


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


def run_evaluate(args) -> None:
    """`ddpm-hf evaluate` on every process of a torchrun / `accelerate launch` run; the main process writes."""
    from .distributed import process_state

    check_evaluate_options(args)
    state = process_state(args.device, args.ddp_timeout)
    output_dir = args.output or default_output_dir(args.model)
    main = state.is_main_process
    if args.sweep is not None:
        runs = parse_sweep(args.sweep)
        results = evaluate_sweep(
            args.model, runs, args.num_samples, args.batch_size, args.reference, args.reference_split, args.seed, args.device, args.revision,
            progress=main, timestep_spacing=args.timestep_spacing, state=state, guidance_scale=args.guidance_scale, per_class_fid=args.per_class_fid,
        )  # fmt: skip
        if main:
            paths = write_sweep(results, output_dir, f"FID vs sampling cost: {os.path.basename(os.path.normpath(args.model))}")
            RunFolder(output_dir).write_eval({"runs": results}, section="sweep")
            print(sweep_table(sweep_rows(results)))
            note_small_sample_bias(args.num_samples)
            print(f"wrote {paths['md']}, {paths['csv']}, {paths['png']} and {os.path.join(output_dir, 'eval.json')}")
    elif args.guidance_sweep is not None:
        results = evaluate_guidance_sweep(
            args.model, args.guidance_sweep, args.num_samples, args.scheduler, args.steps, args.batch_size, args.reference, args.reference_split,
            args.seed, args.device, args.revision, progress=main, timestep_spacing=args.timestep_spacing, state=state, per_class_fid=args.per_class_fid,
        )  # fmt: skip
        if main:
            first = results[0]
            title = f"FID vs guidance: {os.path.basename(os.path.normpath(args.model))}, {first['scheduler']} {first['steps']} steps"
            paths = write_sweep(results, output_dir, title, GUIDANCE_SWEEP)
            RunFolder(output_dir).write_eval({"runs": results}, section="guidance_sweep")
            per_class = samples_per_class(first["num_samples"], first["num_classes"])
            print(f"FID vs guidance scale s = 1 + w ({first['num_samples']} samples: {first['num_classes']} classes x {per_class}):")
            print(sweep_table(sweep_rows(results, GUIDANCE_SWEEP), GUIDANCE_SWEEP))
            note_small_sample_bias(args.num_samples)
            for result in results if args.per_class_fid else []:
                print(f"s = {result['guidance_scale']:g}: per-class FID " + ", ".join(f"{name} {value:.2f}" for name, value in result["per_class_fid"].items()))
            if args.per_class_fid:
                note_per_class_bias(first)
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
            args.device, args.revision, progress=main, timestep_spacing=args.timestep_spacing, state=state, guidance_scale=args.guidance_scale,
            per_class_fid=args.per_class_fid,
        )  # fmt: skip
        if main:
            path = RunFolder(output_dir).write_eval(result)
            reference = result["reference_details"]
            kid = f", KID {result['kid']:.5f} +- {result['kid_std']:.5f}" if "kid" in result else ""
            print(
                f"FID {result['fid']:.4f}{kid} ({result['num_samples']} samples{conditional_description(result)}, {result['scheduler']} {result['steps']} steps, "
                f"vs {reference['dataset']} {reference['split']} [{reference['num_images']} images]; {result['num_processes']} process(es), "
                f"{result['timing']['wall_seconds']:.0f} s)"
            )
            note_small_sample_bias(result["num_samples"])
            if "per_class_fid" in result:
                print_per_class_fid(result)
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
        help="FID/KID of a pipeline's samples, its NLL bound in bits/dim, or a sampler or guidance sweep; writes OUTPUT/eval.json.",
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
    group = parser.add_argument_group("Class-conditional models (every class gets the same number of samples)")
    group.add_argument(
        "--guidance_scale",
        type=bounded(float, ge=0),
        default=None,
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
        default=None,
        metavar="S,S,...",
        help='One FID per guidance scale, e.g. "0,1,2,4" (same seed, sampler and reference): table + plot of FID against s.',
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

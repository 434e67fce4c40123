"""Per-class FID of a class-conditional model: which reference images each class's samples are compared with.

`--per_class_fid` compares the samples of class k (image i is of class i mod K, conditioning.balanced_labels) with
the reference images labelled k. The reference must then be a dataset whose label column holds the model's classes
(data.find_label_column, data.read_class_labels): `open_labelled_reference` checks that before any work, and
`class_reference_statistics` computes (or reads from the cache) the statistics of each class.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .errors import UserError
from .fid import FIDStatistics, ReferenceSet, compute_statistics, dataset_identity, resolve_reference, stats_cache_path


@dataclass
class LabelledReference:
    """A reference dataset whose labels match a model's classes (`open_labelled_reference`); decoded only when its
    per-class statistics are not cached."""

    reference: ReferenceSet  # what --reference names (an alias resolved to its dataset)
    dataset: object  # datasets.Dataset
    labels: object  # data.ClassLabels

    def counts(self) -> list[int]:
        return torch.bincount(self.labels.ids, minlength=self.labels.num_classes).tolist()


_PER_CLASS_FIX = "Pass as --reference a dataset with class labels (the one the model was trained on, or cifar10-train for CIFAR-10), or drop --per_class_fid."


def open_labelled_reference(
    reference: str, split: str, resolution: int, count: int, class_names: Sequence[str] | None = None, option: str = "--reference"
) -> LabelledReference:
    """Check that `reference` can give per-class FID for a model of `count` classes (named `class_names`): a dataset
    (or an alias of one, fid.resolve_reference) with a label column of the same classes, at least 2 images each.
    Statistics files and plain image folders hold no classes."""
    from .data import find_label_column, load_image_dataset, read_class_labels

    resolved = resolve_reference(reference, split, resolution, option, labelled=True)
    if resolved.is_statistics:
        raise UserError(
            f"--per_class_fid needs labelled reference images, but {option} {reference} is a statistics file, which holds no classes. {_PER_CLASS_FIX}"
        )
    if resolved.is_image_folder():
        raise UserError(
            f"--per_class_fid needs labelled reference images, but {option} {reference} is a folder of images without class labels. {_PER_CLASS_FIX}"
        )
    split = resolved.split
    dataset = load_image_dataset(resolved.source, split, option=option)
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
    labelled = LabelledReference(resolved, dataset, labels)
    scarce = [k for k, n in enumerate(labelled.counts()) if n < 2]
    if scarce:
        names = [class_names[k] if class_names else labels.names[k] if labels.names else str(k) for k in scarce]
        raise UserError(
            f"--per_class_fid: {option} {reference} ({split}) has fewer than 2 images of class {', '.join(names)}; FID needs at least 2 per set. {_PER_CLASS_FIX}"
        )
    return labelled


def class_reference_statistics(labelled: LabelledReference, evaluator, progress: bool = False) -> list[FIDStatistics]:
    """The statistics of the reference images of each class, in class order, with `evaluator`'s network, batch size and
    processes (evaluation.FIDEvaluator): from the cache when they are there (fid.stats_cache_path under a per-class
    name), else computed and cached (one writer)."""
    from .data import decode_images

    reference, labels, state = labelled.reference, labelled.labels, evaluator.state
    identity = dataset_identity(reference.source)
    paths = [
        stats_cache_path(reference.source, reference.split, reference.resolution, name=f"{identity}_class-{k}-of-{labels.num_classes}-{labels.column}")
        for k in range(labels.num_classes)
    ]
    cached = _load_all(paths)
    if cached is not None:
        return cached
    with state.main_process_first() if state is not None else contextlib.nullcontext():  # decoded and cached once
        images = decode_images(labelled.dataset, reference.resolution, progress=progress).images
    statistics = []
    for k in range(labels.num_classes):
        name = labels.names[k] if labels.names else str(k)
        info = dict(source=identity, split=reference.split, resolution=reference.resolution, label_column=labels.column, class_id=k, class_name=name)
        statistics.append(
            compute_statistics(
                images[labels.ids == k],
                evaluator.batch_size,
                keep_features=0,
                progress=progress,
                desc=f"Reference features of class {name}",
                info=info,
                extractor=evaluator.extractor,
                state=state,
            )
        )
    if state is None or state.is_main_process:  # one writer
        for class_statistics, path in zip(statistics, paths):
            try:
                class_statistics.save(path)
                class_statistics.info["file"] = path
            except OSError as e:  # a read-only or full cache only costs the next run the computation
                import warnings

                warnings.warn(f"could not cache per-class FID statistics in {os.path.dirname(path)} ({e.strerror or e}); the next run computes them again.")
                break
    return statistics


def _load_all(paths: list[str]) -> list[FIDStatistics] | None:
    """The statistics in every one of `paths`, or None unless all are there and readable."""
    import zipfile

    if not all(os.path.isfile(path) for path in paths):
        return None
    try:
        return [FIDStatistics.load(path) for path in paths]
    except (UserError, zipfile.BadZipFile):
        return None


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

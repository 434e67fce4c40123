"""Where the data flows in: a dataset -> one decoded uint8 tensor -> training batches in [-1, 1].

Each image is decoded once (any mode -> RGB, short side resized, center-cropped). Training batches
are built by indexing that tensor on the training device, then flipping and scaling there: no PIL
work and no DataLoader per step. A dataset too large for `max_in_memory_gb` is decoded once into a
memory-mapped .npy file in the user cache and batches are gathered from it.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import io
import logging
import math
import os
import re
import shutil
import socket
import warnings
from dataclasses import dataclass, replace
from importlib import resources

import numpy as np
import torch

from .arguments import is_hub_id
from .config import BUILTIN_DATASET_PREFIX
from .errors import UserError

logger = logging.getLogger(__name__)

_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# `datasets` builders whose rows can hold images (a folder of .txt or .csv files is not a dataset to train on).
_IMAGE_MODULES = ("parquet", "imagefolder", "arrow", "webdataset")


# ---------------------------------------------------------------------------------------------
# Loading: Hub id, parquet file or folder, image folder, save_to_disk folder, builtin subset
# ---------------------------------------------------------------------------------------------


def builtin_datasets() -> dict[str, str]:
    """Datasets shipped in ddpm_hf/assets/, by the name used after `builtin:`."""
    assets = resources.files("ddpm_hf") / "assets"
    return {os.path.splitext(p.name)[0]: str(p) for p in assets.iterdir() if p.name.endswith(".parquet")}


def load_image_dataset(name: str, split: str = "train", config_name: str | None = None, option: str = "--dataset"):
    """Return the `datasets.Dataset` that `--dataset name --split split` means.

    `option` is how error messages name the argument (`PATH_A`, `--reference`, ...).
    """
    if name.startswith(BUILTIN_DATASET_PREFIX):
        available = builtin_datasets()
        key = name[len(BUILTIN_DATASET_PREFIX) :]
        if key not in available:
            raise UserError(f"{option} {name}: no such built-in dataset. Built-in: {', '.join(BUILTIN_DATASET_PREFIX + k for k in available)}.")
        return _load_parquet_files({split: [available[key]]}, split, name, option)

    path = os.path.expanduser(name)
    if os.path.isfile(path):
        if not path.endswith(".parquet"):
            raise UserError(f"{option} {name} is a file but not a .parquet file. Pass a parquet file, or a folder of images or parquet files.")
        return _load_parquet_files({split: [path]}, split, name, option)
    if os.path.isdir(path):
        return _load_local_folder(path, split, name, option, config_name)
    if not is_hub_id(name):
        raise UserError(f"{option} {name}: no such file or folder. Check the path, or give a Hub dataset id like uoft-cs/cifar10.")
    return _load_hub_dataset(name, split, config_name, option)


def _load_local_folder(path: str, split: str, name: str, option: str, config_name: str | None = None):
    import datasets

    if os.path.isfile(os.path.join(path, "dataset_dict.json")) or os.path.isfile(os.path.join(path, "state.json")):
        loaded = datasets.load_from_disk(path)
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise UserError(f"{option} {name} has no split {split!r}; it has: {', '.join(loaded)}. Pass --split NAME.")
            return loaded[split]
        return loaded

    # The splits are the ones `datasets.load_dataset(path)` finds (its file-name conventions, README configs):
    # the same folder must mean the same training set here and there.
    no_data = f"{option} {name} holds no images, parquet files or save_to_disk dataset. Point it at a folder of images or parquet files."
    try:
        builder = datasets.load_dataset_builder(path, config_name)
    except FileNotFoundError:  # datasets' EmptyDatasetError: no data file at all
        raise UserError(no_data) from None
    except ValueError as e:  # e.g. several configs in its README and none chosen
        raise UserError(f"{option} {name}: {e} Pass --dataset_config NAME.") from None
    if builder.name not in _IMAGE_MODULES:
        raise UserError(no_data)
    splits = builder.config.data_files or {}
    if split not in splits:
        raise UserError(f"{option} {name} has no split {split!r}; it has: {', '.join(sorted(map(str, splits)))}. Pass --split NAME.")
    # Only this split's files: building the other splits would cost time and disk for nothing.
    return datasets.load_dataset(path, config_name, data_files={split: list(splits[split])}, split=split)


def _load_parquet_files(groups: dict[str, list[str]], split: str, name: str, option: str):
    import datasets

    if split not in groups:
        raise UserError(f"{option} {name} has no split {split!r}; it has: {', '.join(sorted(groups))}. Pass --split NAME.")
    return datasets.load_dataset("parquet", data_files={split: groups[split]}, split=split)


def _load_hub_dataset(repo_id: str, split: str, config_name: str | None, option: str):
    import datasets
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    offline_hint = f"With no network, download it elsewhere and give {option} a local path (a folder of parquet files or images, or a save_to_disk folder)."
    if not huggingface_hub.constants.HF_HUB_OFFLINE:
        # Fail in seconds, not after the datasets library's retries, when the Hub cannot be reached.
        try:
            huggingface_hub.HfApi().dataset_info(repo_id, timeout=10)
        except RepositoryNotFoundError:
            raise UserError(
                f"{option} {repo_id}: no such dataset on the Hub (or it is private: log in with `hf auth login`). Check the id, or give {option} a local path."
            ) from None
        except HfHubHTTPError as e:
            raise UserError(
                f"{option} {repo_id}: the Hub answered {e.response.status_code if e.response is not None else 'an error'}. {offline_hint}"
            ) from None
        except Exception as e:  # connection refused, DNS failure, timeout...
            raise UserError(f"{option} {repo_id}: cannot reach the Hugging Face Hub ({type(e).__name__}). {offline_hint}") from None
    try:
        return datasets.load_dataset(repo_id, config_name, split=split)
    except ValueError as e:
        if "split" in str(e).lower():
            raise UserError(f"{option} {repo_id}: {e} Pass --split NAME.") from None
        raise
    except (ConnectionError, OSError) as e:
        raise UserError(f"{option} {repo_id}: could not download it ({type(e).__name__}). {offline_hint}") from None


# ---------------------------------------------------------------------------------------------
# Decoding: once, to uint8 N x 3 x R x R
# ---------------------------------------------------------------------------------------------


def find_image_column(dataset, override: str | None = None) -> str:
    """`--image_column`, else `img` (CIFAR-10), `image`, or the only Image feature."""
    import datasets

    columns = list(dataset.column_names)
    image_features = [c for c, feature in dataset.features.items() if isinstance(feature, datasets.Image)]
    if override is not None:
        if override not in columns:
            raise UserError(f"--image_column {override}: no such column; the dataset has: {', '.join(columns)}.")
        holds = _what_column_holds(dataset, override)
        if holds is not None:
            listing = (
                f"its Image columns are: {', '.join(image_features)}" if image_features else f"it has no Image column; its columns are: {', '.join(columns)}"
            )
            raise UserError(f"--image_column {override}: column {override!r} is not an image column (it holds {holds}); {listing}. Pass --image_column NAME.")
        return override
    for candidate in ("img", "image"):
        if candidate in columns:
            return candidate
    if len(image_features) == 1:
        return image_features[0]
    found = f"several Image columns ({', '.join(image_features)})" if image_features else "no image column"
    raise UserError(f"found {found} in the dataset; its columns are: {', '.join(columns)}. Pass --image_column NAME.")


def _what_column_holds(dataset, column: str) -> str | None:
    """None for a column that `_open_image` can decode (an Image feature, or encoded bytes or file paths),
    else what it holds, for the error message. Only the first value of a non-Image column is looked at."""
    import datasets
    from PIL import Image

    feature = dataset.features[column]
    if isinstance(feature, datasets.Image):
        return None
    is_bytes_or_text = isinstance(feature, datasets.Value) and feature.dtype in ("binary", "large_binary", "string", "large_string")
    is_image_dict = isinstance(feature, dict) and ("bytes" in feature or "path" in feature)
    if not (is_bytes_or_text or is_image_dict):
        return f"{feature.dtype if isinstance(feature, datasets.Value) else type(feature).__name__} values"
    if len(dataset) == 0:
        return None  # nothing to look at: decode_images reports the empty split
    value = dataset.select_columns([column])[0][column]
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if value is None:
        return None  # an empty first cell: decoding names the row
    if isinstance(value, str):
        return None if value.lower().endswith(_IMAGE_EXTENSIONS) or os.path.isfile(value) else "text that is not an image path"
    try:
        Image.open(io.BytesIO(value))  # reads the header only
    except (OSError, ValueError, TypeError):  # UnidentifiedImageError is an OSError
        return "bytes that are not an image"
    return None


@dataclass
class ClassLabels:
    """The class of every training image (ids 0 .. K-1, row-aligned with the decoded images) and the classes' names."""

    ids: torch.Tensor  # int64, one per decoded image
    names: list[str] | None  # names[k] names class k; None for a column of bare integers
    num_classes: int  # K
    column: str

    def without_rows(self, rows: list[int]) -> ClassLabels:
        """These labels without `rows` (the rows decode_images skipped)."""
        if not rows:
            return self
        keep = torch.ones(len(self.ids), dtype=torch.bool)
        keep[torch.tensor(rows, dtype=torch.long)] = False
        return replace(self, ids=self.ids[keep])


def find_label_column(dataset, override: str | None = None) -> str:
    """`--label_column`, else `label` (CIFAR-10, image folders), else the only ClassLabel column."""
    import datasets

    columns = list(dataset.column_names)
    class_labels = [c for c, feature in dataset.features.items() if isinstance(feature, datasets.ClassLabel)]
    if override is not None:
        if override not in columns:
            raise UserError(f"--label_column {override}: no such column; the dataset has: {', '.join(columns)}.")
        return override
    if "label" in columns:
        return "label"
    if len(class_labels) == 1:
        return class_labels[0]
    found = f"several ClassLabel columns ({', '.join(class_labels)})" if class_labels else "no label column"
    raise UserError(
        f"--class_conditional needs a column of class labels, but found {found}; the dataset has: {', '.join(columns)}. "
        "Pass --label_column NAME, or train without --class_conditional."
    )


def read_class_labels(dataset, column: str) -> ClassLabels:
    """The label of every row of `column` (`ClassLabels.without_rows` drops the rows decode_images skipped).

    A ClassLabel column gives ids and names; a column of integers gives ids 0 .. max (no names); a column of strings
    gives one class per distinct string, in sorted order. A missing label (None, or -1 in a ClassLabel) or a negative
    or out-of-range id is refused with its row."""
    import datasets

    feature = dataset.features[column]
    values = dataset.select_columns([column])[column]
    names = None
    if isinstance(feature, datasets.ClassLabel):
        names = list(feature.names)
    elif isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
        names = sorted({v for v in values if v is not None})
        lookup = {name: i for i, name in enumerate(names)}
        values = [lookup.get(v) if v is not None else None for v in values]
    elif not (isinstance(feature, datasets.Value) and (feature.dtype.startswith("int") or feature.dtype.startswith("uint"))):
        kind = feature.dtype if isinstance(feature, datasets.Value) else type(feature).__name__
        raise UserError(
            f"--label_column {column}: column {column!r} holds {kind} values, not class labels (integers, strings or a ClassLabel). Pass --label_column NAME."
        )
    bad = next(((row, v) for row, v in enumerate(values) if v is None or v < 0 or (names is not None and v >= len(names))), None)
    if bad is not None:
        row, value = bad
        what = (
            "no label"
            if value is None or value == -1
            else f"label {value}, out of range" + (f" (the {len(names)} classes are ids 0..{len(names) - 1})" if names else "")
        )
        raise UserError(f"row {row} of the dataset has {what} in column {column!r}. Fix or drop such rows, or pass --label_column NAME.")
    ids = torch.tensor(list(values), dtype=torch.long)
    count = len(names) if names is not None else int(ids.max()) + 1 if len(ids) else 0
    if count < 2:
        raise UserError(f"--label_column {column}: the labels name {count} class{'es' if count != 1 else ''}; a class-conditional model needs at least 2.")
    return ClassLabels(ids=ids, names=names, num_classes=count, column=column)


_EXIF_ORIENTATION = 0x0112
_SIXTEEN_BIT_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")


def to_rgb(image):
    """Any PIL image -> upright RGB, as `datasets`' Image feature decodes it, then converted to RGB.

    EXIF orientation is applied (phone photos store the sensor's orientation and a tag to turn it by).
    16-bit samples are scaled by the type's range (65535 -> 255), whatever one image's own maximum.
    Transparent pixels become white, not whatever colour they happen to hold.
    """
    from PIL import Image, ImageOps

    if image.getexif().get(_EXIF_ORIENTATION, 1) != 1:
        image = ImageOps.exif_transpose(image)  # drops the tag: applying it twice is a no-op
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode in _SIXTEEN_BIT_MODES:  # 16-bit PNG / TIFF ("I" is how Pillow opens some of them)
        array = np.asarray(image, dtype=np.float64) * (255.0 / 65535.0)
        return Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8)).convert("RGB")
    if image.mode == "F":  # floats: PIL's own convention, 0..255
        return Image.fromarray(np.clip(np.rint(np.asarray(image)), 0, 255).astype(np.uint8)).convert("RGB")
    if image.mode == "P" or (image.mode in ("L", "RGB") and "transparency" in image.info):
        image = image.convert("RGBA")  # a palette or a colour key may mark pixels transparent
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")


def resize_and_crop(image, resolution: int):
    """Resize the short side to `resolution` (bicubic, antialiased), then center-crop a square."""
    from PIL import Image

    width, height = image.size
    if (width, height) == (resolution, resolution):
        return image
    scale = resolution / min(width, height)
    new_size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    image = image.resize(new_size, Image.Resampling.BICUBIC)
    left, top = (new_size[0] - resolution) // 2, (new_size[1] - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


@dataclass
class DecodedImages:
    images: torch.Tensor  # uint8, N x 3 x R x R (possibly backed by a memory-mapped file)
    skipped_rows: list[int]  # rows whose bytes could not be decoded (with on_corrupt="skip")
    upscaled: int  # images smaller than the resolution, upscaled
    memory_mapped: bool = False


def decode_images(
    dataset,
    resolution: int,
    image_column: str | None = None,
    on_corrupt: str = "error",
    max_in_memory_gb: float = float("inf"),
    progress: bool = True,
) -> DecodedImages:
    """Decode every image once into uint8 N x 3 x R x R."""
    import datasets
    from tqdm.auto import tqdm

    column = find_image_column(dataset, image_column)
    count = len(dataset)
    if count == 0:
        raise UserError("the dataset split is empty: no images to train on. Check --dataset and --split.")
    if isinstance(dataset.features[column], datasets.Image):
        # Read the encoded bytes ourselves: decoding happens exactly once, below.
        dataset = dataset.cast_column(column, datasets.Image(decode=False))
    column_data = dataset.select_columns([column])

    shape = (count, 3, resolution, resolution)
    size_gb = count * 3 * resolution * resolution / 1e9
    memory_mapped = size_gb > max_in_memory_gb
    cache_path = _decoded_cache_path(dataset, column, resolution, on_corrupt)
    cached = _load_decoded(cache_path, memory_mapped)
    if cached is not None:  # decoded by an earlier run: start-up skips the decoding
        storage, skipped, upscaled = cached
        _warn_about(skipped, upscaled, count, len(storage), resolution)
        return _as_decoded_images(storage, skipped, upscaled, memory_mapped)
    partial_path = None
    if memory_mapped:
        storage, partial_path = _create_memory_map(cache_path, shape)
        logger.info("dataset is %.1f GB decoded: memory-mapping it from %s", size_gb, cache_path)
    else:
        # Stored channels-first, as the model reads it: loading the cache is then a plain read, no transpose.
        storage = np.empty(shape, dtype=np.uint8)

    kept, skipped, upscaled = 0, [], 0
    try:
        for row, item in enumerate(tqdm(column_data, total=count, desc="Decoding images", disable=not progress, unit="img")):
            try:
                image = _open_image(item[column])
                image.load()
                image = to_rgb(image)
            except Exception as e:
                if on_corrupt == "skip":
                    skipped.append(row)
                    continue
                raise UserError(
                    f"row {row} of the dataset holds an image that cannot be decoded ({type(e).__name__}: {e}). Fix or drop it, or pass --on_corrupt_image skip."
                ) from None
            if min(image.size) < resolution:
                upscaled += 1
            storage[kept] = np.asarray(resize_and_crop(image, resolution)).transpose(2, 0, 1)
            kept += 1
        if kept == 0:
            raise UserError(f"none of the {count} images could be decoded. Check --dataset and --image_column.")
    except BaseException:
        if partial_path is not None:  # an error or Ctrl-C: leave no half-written file behind
            del storage
            _remove_quietly(partial_path)
        raise
    _warn_about(skipped, upscaled, count, kept, resolution)
    storage = _save_decoded(storage, kept, partial_path, cache_path, skipped, upscaled)
    return _as_decoded_images(storage, skipped, upscaled, memory_mapped)


def _warn_about(skipped: list[int], upscaled: int, count: int, kept: int, resolution: int) -> None:
    if skipped:
        warnings.warn(f"skipped {len(skipped)} of {count} images that could not be decoded (rows {skipped[:10]}{'...' if len(skipped) > 10 else ''}).")
    if upscaled:
        warnings.warn(f"{upscaled} of {kept} images are smaller than --resolution {resolution} and were upscaled; they will look blurry.")


def _as_decoded_images(storage: np.ndarray, skipped: list[int], upscaled: int, memory_mapped: bool) -> DecodedImages:
    images = torch.from_numpy(storage)  # N x 3 x R x R already: no copy
    return DecodedImages(images=images, skipped_rows=skipped, upscaled=upscaled, memory_mapped=memory_mapped)


# The decoded cache: <cache>/decoded/<key>.npy (N x 3 x R x R uint8, or more rows when some were skipped on the
# memory-mapped path: the first `kept` count) and <key>.json, written last, so that a file without its .json (a
# run killed while decoding) is never read. Several processes may decode the same dataset at once (the ranks of
# a run, two runs): each writes its own uniquely named file and renames it onto <key>.npy, which readers then
# see whole, old or new, never half-written. The key is the dataset's fingerprint, which `datasets` derives from
# the data files, the size and modification time of every image file the rows only reference by path, and
# every setting that changes the decoded pixels.


def _cache_root() -> str:
    from huggingface_hub.constants import HF_HOME

    return os.environ.get("DDPM_HF_CACHE", os.path.join(HF_HOME, "ddpm_hf"))


def _decoded_cache_path(dataset, column: str, resolution: int, on_corrupt: str) -> str:
    referenced = _referenced_files_digest(dataset, column)
    key = hashlib.sha256(f"{dataset._fingerprint}-{referenced}-{column}-{resolution}-{on_corrupt}-v3".encode()).hexdigest()[:24]
    return os.path.join(_cache_root(), "decoded", key)


def _referenced_files_digest(dataset, column: str) -> str:
    """A digest of (path, size, mtime) of the image files that rows reference by path without their bytes.

    The dataset's fingerprint covers only its own data files (a parquet of paths, an imagefolder's file list):
    an image edited in place behind such a path would otherwise be served stale from the cache.
    """
    paths = _path_only_cells(dataset.data.column(column))  # over the whole table: no bytes are read
    if paths is None or paths.null_count == len(paths):
        return "-"
    if dataset._indices is not None:  # a select()ed or shuffled dataset: its own rows only
        paths = paths.take(dataset._indices.column(0))
    digest = hashlib.sha256()
    for path in paths.to_pylist():
        if path is not None:
            try:
                stat = os.stat(path)
                digest.update(f"{os.path.abspath(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
            except OSError:
                digest.update(f"{os.path.abspath(path)}\0missing\n".encode())
    return digest.hexdigest()


def _path_only_cells(column):
    """The path of each cell that holds a path and no bytes (null elsewhere), or None for a column of neither."""
    import pyarrow as pa
    import pyarrow.compute as pc

    kind = column.type  # a ChunkedArray, worked on chunk by chunk: the image bytes are never copied
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return column
    if not pa.types.is_struct(kind) or kind.get_field_index("path") < 0:
        return None
    paths = pc.struct_field(column, "path")
    if kind.get_field_index("bytes") >= 0:
        has_bytes = pc.fill_null(pc.greater(pc.binary_length(pc.struct_field(column, "bytes")), 0), False)
        paths = pc.if_else(has_bytes, pa.scalar(None, paths.type), paths)
    return paths


def _load_decoded(cache_path: str, memory_mapped: bool):
    import json

    try:
        with open(cache_path + ".json") as f:
            meta = json.load(f)
        storage = np.load(cache_path + ".npy", mmap_mode="c" if memory_mapped else None, allow_pickle=False)
    except (OSError, ValueError):
        return None
    if storage.ndim != 4 or storage.shape[0] < meta["kept"] or storage.shape[1] != 3:
        return None
    return storage[: meta["kept"]], meta["skipped_rows"], meta["upscaled"]


def _unique_name(cache_path: str, suffix: str) -> str:
    """<key>.partial-<host>-<pid>-<random><suffix>: no two writers share it (other hosts, other threads)."""
    return f"{cache_path}.partial-{socket.gethostname()}-{os.getpid()}-{os.urandom(4).hex()}{suffix}"


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def _remove_orphans(cache_path: str) -> None:
    """Remove the partial files of dead processes of this host (a run killed while decoding): with unique names,
    nothing else would ever overwrite them."""
    if os.name != "posix":
        return
    for path in glob.glob(glob.escape(cache_path) + ".partial-*"):
        match = re.search(r"\.partial-(.+)-(\d+)-[0-9a-f]+\.[a-z]+$", path)
        if match is None or match.group(1) != socket.gethostname():
            continue
        try:
            os.kill(int(match.group(2)), 0)
        except ProcessLookupError:
            _remove_quietly(path)
        except OSError:
            pass  # alive, another user's


def _create_memory_map(cache_path: str, shape: tuple[int, ...]) -> tuple[np.ndarray, str]:
    """A new, uniquely named .npy file mapped for writing, its disk space reserved: a full disk is an error now,
    not a SIGBUS when a page of a sparse file is first written, hours into decoding."""
    folder = os.path.dirname(cache_path)
    needed_gb = math.prod(shape) / 1e9
    fixes = f"Set DDPM_HF_CACHE to a writable folder with {needed_gb:.1f} GB free, free disk space, or raise --max_in_memory_gb above {needed_gb:.1f} to decode into memory."
    try:
        os.makedirs(folder, exist_ok=True)
        _remove_orphans(cache_path)
        free = shutil.disk_usage(folder).free
    except OSError as e:
        raise UserError(f"cannot write the memory-mapped dataset to {folder} ({e.strerror or e}). {fixes}") from None
    if free < math.prod(shape):
        raise UserError(f"{folder} has {free / 1e9:.1f} GB free but the memory-mapped dataset needs {needed_gb:.1f} GB. {fixes}")
    partial_path = _unique_name(cache_path, ".npy")
    try:
        storage = np.lib.format.open_memmap(partial_path, mode="w+", dtype=np.uint8, shape=shape)
        if hasattr(os, "posix_fallocate"):
            with open(partial_path, "r+b") as f:
                try:
                    os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
                except OSError as e:
                    if e.errno in (errno.ENOSPC, errno.EDQUOT):
                        raise
                    # not supported by this file system: the free-space check above stands in
    except OSError as e:
        _remove_quietly(partial_path)
        raise UserError(f"cannot write the memory-mapped dataset to {folder} ({e.strerror or e}). {fixes}") from None
    return storage, partial_path


def _save_decoded(storage: np.ndarray, kept: int, partial_path: str | None, cache_path: str, skipped: list[int], upscaled: int) -> np.ndarray:
    """Keep the decoded images for the next run.

    In memory (`partial_path` None), a cache that cannot be written only costs that speed-up. Memory-mapped,
    `partial_path` is the decoded file: it is renamed into the cache and mapped again, copy-on-write.
    """
    import json

    memory_mapped = partial_path is not None
    folder = os.path.dirname(cache_path)
    written = [partial_path] if memory_mapped else []
    try:
        if memory_mapped:
            storage.flush()
        else:
            storage = storage[:kept]
            os.makedirs(folder, exist_ok=True)
            partial_path = _unique_name(cache_path, ".npy")
            written.append(partial_path)
            with open(partial_path, "wb") as f:
                np.save(f, storage)
        os.replace(partial_path, cache_path + ".npy")
        meta_path = _unique_name(cache_path, ".json")
        written.append(meta_path)
        with open(meta_path, "w") as f:
            json.dump({"kept": kept, "skipped_rows": skipped, "upscaled": upscaled}, f)
        os.replace(meta_path, cache_path + ".json")
    except OSError as e:
        for path in written:
            _remove_quietly(path)
        if memory_mapped:
            raise UserError(
                f"could not write the memory-mapped dataset to {folder} ({e.strerror or e}). Free disk space, set DDPM_HF_CACHE to a writable folder, or raise --max_in_memory_gb."
            ) from None
        warnings.warn(
            f"could not cache the decoded images in {folder} ({e.strerror or e}); the next run decodes them again. Set DDPM_HF_CACHE to a writable folder to keep them."
        )
        return storage
    if memory_mapped:
        # Another process may have renamed its identical file onto the same name since: either is whole.
        return np.load(cache_path + ".npy", mmap_mode="c")[:kept]
    return storage


def _open_image(value):
    from PIL import Image

    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):
        if value.get("bytes"):
            return Image.open(io.BytesIO(value["bytes"]))
        if value.get("path"):
            return Image.open(value["path"])
        raise ValueError("empty image cell")
    if isinstance(value, (bytes, bytearray)):
        return Image.open(io.BytesIO(value))
    if isinstance(value, str):
        return Image.open(value)
    if isinstance(value, np.ndarray):
        return Image.fromarray(value)
    raise ValueError(f"unsupported image value of type {type(value).__name__}")


# ---------------------------------------------------------------------------------------------
# Batches: index, flip and scale on the training device
# ---------------------------------------------------------------------------------------------


def to_model_range(images_uint8: torch.Tensor) -> torch.Tensor:
    """[0, 255] -> [-1, 1], the range the paper's x_0 lives in (Sec. 3.3)."""
    return images_uint8.float() / 127.5 - 1.0


class ImageBatches:
    """An endless, seeded stream of training images, cut into batches by position.

    Epoch e visits the images in the order randperm(N) seeded with (seed, e). Batch positions
    are absolute (step * global_batch + offset), so any step's batch can be built directly: resuming
    at step k needs no pass over the k batches before it, and the processes of a multi-process run
    read disjoint slices of the same global batch.
    """

    def __init__(
        self, images: torch.Tensor, seed: int, random_flip: bool, device: torch.device, keep_on_host: bool = False, labels: torch.Tensor | None = None
    ):
        self.num_images = n = images.shape[0]
        self.labels = labels.to(device) if labels is not None else None  # class ids, row-aligned with the images
        self._with_flips = None
        if random_flip and not keep_on_host and images.numel() <= 4e9:
            # Both orientations side by side: a flipped image is then just another row to gather, which is
            # several times faster than flipping a batch (bench/data_throughput.py). The images move to the
            # device straight into the first half, which self.images is: one extra copy of the data, not two.
            self._with_flips = torch.empty((2 * n, *images.shape[1:]), dtype=images.dtype, device=device)
            self._with_flips[:n] = images
            self._with_flips[n:] = self._with_flips[:n].flip(3)
            self.images = self._with_flips[:n]
        else:
            # In-memory datasets move to the device once; memory-mapped ones stay on the host.
            self.images = images if keep_on_host else images.to(device)
        self.seed = seed
        self.random_flip = random_flip
        self.device = device
        self._orders: dict[int, torch.Tensor] = {}

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch not in self._orders:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}
            self._orders[epoch] = torch.randperm(self.num_images, generator=generator).to(self.images.device)
        return self._orders[epoch]

    def indices(self, start: int, size: int) -> torch.Tensor:
        """Dataset indices of stream positions start .. start + size - 1."""
        first_epoch, last_epoch = start // self.num_images, (start + size - 1) // self.num_images
        parts = []
        for epoch in range(first_epoch, last_epoch + 1):
            lo = max(start, epoch * self.num_images) - epoch * self.num_images
            hi = min(start + size, (epoch + 1) * self.num_images) - epoch * self.num_images
            parts.append(self._order(epoch)[lo:hi])
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def batch_labels(self, start: int, size: int) -> torch.Tensor:
        """The class ids of the images `batch(start, size)` returns (flips keep the class)."""
        return self.labels.index_select(0, self.indices(start, size).to(self.labels.device))

    def batch(self, start: int, size: int) -> torch.Tensor:
        """Float images in [-1, 1], size x 3 x R x R, on the device; flips drawn from the global RNG."""
        index = self.indices(start, size)
        if self._with_flips is not None:
            flip = torch.rand(size, device=self.device) < 0.5
            return to_model_range(self._with_flips.index_select(0, index + flip.long() * self.num_images))
        images = self.images.index_select(0, index).to(self.device, non_blocking=True)
        if self.random_flip:
            flip = torch.rand(size, device=self.device) < 0.5
            images = torch.where(flip[:, None, None, None], images.flip(3), images)
        return to_model_range(images)

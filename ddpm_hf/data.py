"""Where the data flows in: a dataset -> one decoded uint8 tensor -> training batches in [-1, 1].

Every source (Hub id, folder, parquet file, save_to_disk folder, builtin subset) knows its splits, by the rules
`datasets` gives them, and refuses one it does not have. Each image is decoded once (any mode -> RGB, short side
resized, center-cropped) into a .npy file in the user cache, by one process per machine; every process maps that
file, so a machine holds the decoded dataset once. Training batches are built by indexing it: on the training
device when it fits there (at most half the device's free memory and `max_in_memory_gb`), else gathered from the
host through pinned memory; flipping and scaling happen on the device. No PIL work and no DataLoader per step.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import logging
import math
import os
import shutil
import warnings
from dataclasses import dataclass, replace
from datetime import timedelta
from importlib import resources

import numpy as np
import torch

from . import files
from .arguments import is_hub_id
from .config import BUILTIN_DATASET_PREFIX
from .errors import UserError

logger = logging.getLogger(__name__)

# What a file name of an image ends with, for training and for FID alike (`datasets`' imagefolder takes all of them).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
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

    Every source knows its splits, and a split it does not have is refused, listing those it has. The splits are
    the ones `datasets` gives the same source: `load_dataset(folder or Hub id)` finds them by its data-files rules
    (file and folder names, README configs); a single file, builtin ones included, names no split, so `datasets`
    calls its rows "train"; a save_to_disk folder holds a DatasetDict of named splits, or one Dataset with the split
    it was saved from (else "train"). `option` is how error messages name the argument (`PATH_A`, `--reference`, ...).
    """
    if name.startswith(BUILTIN_DATASET_PREFIX):
        available = builtin_datasets()
        key = name[len(BUILTIN_DATASET_PREFIX) :]
        if key not in available:
            raise UserError(f"{option} {name}: no such built-in dataset. Built-in: {', '.join(BUILTIN_DATASET_PREFIX + k for k in available)}.")
        return _load_data_files("parquet", {"train": [available[key]]}, split, name, option)

    path = os.path.expanduser(name)
    if os.path.isfile(path):
        if not path.endswith(".parquet"):
            raise UserError(f"{option} {name} is a file but not a .parquet file. Pass a parquet file, or a folder of images or parquet files.")
        return _load_data_files("parquet", {"train": [path]}, split, name, option)
    if os.path.isdir(path) and _is_saved_to_disk(path):
        return _load_saved_to_disk(path, split, name, option)
    if os.path.isdir(path):
        return _load_data_files(path, local_folder_splits(path, name, option, config_name), split, name, option, config_name)
    if not is_hub_id(name):
        raise UserError(f"{option} {name}: no such file or folder. Check the path, or give a Hub dataset id like uoft-cs/cifar10.")
    return _load_hub_dataset(name, split, config_name, option)


def check_split(name: str, split: str, splits, option: str = "--dataset") -> None:
    """The one refusal of a split that a source does not have."""
    if split not in splits:
        raise UserError(f"{option} {name} has no split {split!r}; it has: {', '.join(sorted(map(str, splits)))}. Pass --split NAME.")


def _is_saved_to_disk(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "dataset_dict.json")) or os.path.isfile(os.path.join(path, "state.json"))


def _load_saved_to_disk(path: str, split: str, name: str, option: str):
    import datasets

    loaded = datasets.load_from_disk(path)
    splits = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {str(loaded.split or "train"): loaded}
    check_split(name, split, splits, option)
    return splits[split]


def local_folder_splits(path: str, name: str, option: str = "--dataset", config_name: str | None = None) -> dict[str, list[str]]:
    """{split: its data files} of a local folder, as `datasets.load_dataset(path)` finds them (its file-name
    conventions, README configs): the same folder must mean the same training set here and there."""
    import datasets

    no_data = f"{option} {name} holds no images, parquet files or save_to_disk dataset. Point it at a folder of images or parquet files."
    try:
        builder = datasets.load_dataset_builder(path, config_name)
    except FileNotFoundError:  # datasets' EmptyDatasetError: no data file at all
        raise UserError(no_data) from None
    except ValueError as e:  # e.g. several configs in its README and none chosen
        raise UserError(f"{option} {name}: {e} Pass --dataset_config NAME.") from None
    if builder.name not in _IMAGE_MODULES:
        raise UserError(no_data)
    return _splits_of(builder)


def _load_data_files(source: str, splits: dict[str, list[str]], split: str, name: str, option: str, config_name: str | None = None):
    """`split` of `source` (a folder, a Hub id or a packaged builder like "parquet"), from that split's files only:
    building the other splits would cost time, downloads and disk for nothing."""
    import datasets

    check_split(name, split, splits, option)
    return datasets.load_dataset(source, config_name, data_files={split: splits[split]}, split=split)


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
        builder = datasets.load_dataset_builder(repo_id, config_name)
    except ValueError as e:  # e.g. several configs and none chosen
        raise UserError(f"{option} {repo_id}: {e} Pass --dataset_config NAME.") from None
    except (ConnectionError, OSError) as e:
        raise UserError(f"{option} {repo_id}: could not download it ({type(e).__name__}). {offline_hint}") from None
    try:  # a Hub dataset is a folder of data files: its splits follow the same rules as a local folder's
        return _load_data_files(repo_id, _splits_of(builder), split, repo_id, option, config_name)
    except (ConnectionError, OSError) as e:
        raise UserError(f"{option} {repo_id}: could not download it ({type(e).__name__}). {offline_hint}") from None


def _splits_of(builder) -> dict[str, list[str]]:
    return {str(split): list(files) for split, files in (builder.config.data_files or {}).items()}


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
    """None for a column that `open_image` can decode (an Image feature, or encoded bytes or file paths),
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
        return None if value.lower().endswith(IMAGE_EXTENSIONS) or os.path.isfile(value) else "text that is not an image path"
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
    Float samples (mode "F") are read as [0, 1] (see `_float_to_rgb`).
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
    if image.mode == "F":
        return _float_to_rgb(image)
    if image.mode == "P" or (image.mode in ("L", "RGB") and "transparency" in image.info):
        image = image.convert("RGBA")  # a palette or a colour key may mark pixels transparent
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")


# Half a uint8 step: a float that rounds to 0 or 255 is in range (0.99999994 or -1e-9 from some computation).
_FLOAT_TOLERANCE = 0.5 / 255


def _float_to_rgb(image):
    """A float image (PIL mode "F") -> RGB, its [0, 1] scaled to 0..255.

    [0, 1] is the range of float images everywhere they come from: a float array from NumPy, PyTorch or
    scikit-image, which `datasets` stores as a mode "F" TIFF and hands back untouched. PIL's own conversion would
    read them as 0..255 and clip: 0.8 would become 1, a black image. Values outside [0, 1] (a float image of
    0..255, or of any other range) are refused, not guessed: one image's maximum cannot tell 0..255 from [0, 1].
    """
    from PIL import Image

    array = np.asarray(image, dtype=np.float64)
    low, high = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
    if not (low >= -_FLOAT_TOLERANCE and high <= 1 + _FLOAT_TOLERANCE):  # NaN fails too
        raise UserError(
            f"a float image (mode F) holds values from {low:.4g} to {high:.4g}, but float images must hold values in [0, 1] "
            "(0 black, 1 white). Scale the images to [0, 1], or store them as 8- or 16-bit integers."
        )
    return Image.fromarray(np.clip(np.rint(array * 255.0), 0, 255).astype(np.uint8)).convert("RGB")


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
    # uint8, N x 3 x R x R: a copy-on-write memory map of the cache file, whose pages the processes of a machine
    # share; in this process's memory only when the cache could not be written (memory_mapped False)
    images: torch.Tensor
    skipped_rows: list[int]  # rows whose bytes could not be decoded (with on_corrupt="skip")
    upscaled: int  # images smaller than the resolution, upscaled
    memory_mapped: bool = True


def decode_images(
    dataset,
    resolution: int,
    image_column: str | None = None,
    on_corrupt: str = "error",
    max_in_memory_gb: float = float("inf"),
    progress: bool = True,
    state=None,
) -> DecodedImages:
    """Decode every image once into uint8 N x 3 x R x R, in the cache file that the next run reads instead.

    The images are decoded straight into that file and memory-mapped from it, so the processes of a machine share
    one copy (the page cache) instead of holding one each. With an Accelerate `state` of several processes, the
    first process of each machine decodes while the others wait, then they map its file. Only when the cache cannot
    be written does each process decode into its own memory, at most `max_in_memory_gb`, with a warning.
    """
    import datasets

    column = find_image_column(dataset, image_column)
    count = len(dataset)
    if count == 0:
        raise UserError("the dataset split is empty: no images to train on. Check --dataset and --split.")
    if isinstance(dataset.features[column], datasets.Image):
        # Read the encoded bytes ourselves: decoding happens exactly once, in _decode.
        dataset = dataset.cast_column(column, datasets.Image(decode=False))
    cache_path = _decoded_cache_path(dataset, column, resolution, on_corrupt)
    with _first_process_of_each_machine_first(state):
        cached = _load_decoded(cache_path)  # for the others: what the first process decoded
        if cached is None:
            return _decode(dataset.select_columns([column]), column, resolution, on_corrupt, max_in_memory_gb, cache_path, progress)
        storage, skipped, upscaled = cached
        _warn_about(skipped, upscaled, count, len(storage), resolution)
        return DecodedImages(images=torch.from_numpy(storage), skipped_rows=skipped, upscaled=upscaled)


# The first decode of a large dataset may take hours, longer than the process group's timeout (--ddp_timeout), which
# is there to notice a lost process: the others wait for it in a group of their own without that limit. A process
# that dies still ends the run: the launcher (torchrun, accelerate launch) then stops the others.
_DECODE_WAIT = timedelta(days=7)


@contextlib.contextmanager
def _first_process_of_each_machine_first(state):
    """The block runs on the first process of each machine, then on the others (Accelerate's local_main_process_first),
    however long the first one takes; after an error too, so the others meet the same error, not a time-out."""
    import torch.distributed as dist

    if state is None or state.num_processes == 1:
        yield
        return
    group = dist.new_group(backend="gloo", timeout=_DECODE_WAIT) if dist.is_available() and dist.is_initialized() else None
    wait = (lambda: dist.barrier(group=group)) if group is not None else state.wait_for_everyone
    try:
        if not state.is_local_main_process:
            wait()
        try:
            yield
        finally:
            if state.is_local_main_process:
                wait()
    finally:
        if group is not None:
            dist.destroy_process_group(group)


def _decode(column_data, column: str, resolution: int, on_corrupt: str, max_in_memory_gb: float, cache_path: str, progress: bool) -> DecodedImages:
    shape = (len(column_data), 3, resolution, resolution)  # channels first, as the model reads it: no transpose when loading
    in_memory = None
    try:
        with contextlib.ExitStack() as writing:  # the .npy takes its name in the cache when the block ends without error
            try:
                storage = _create_memory_map(writing, cache_path + ".npy", shape)
            except _CacheUnwritable as e:
                needed_gb = math.prod(shape) / 1e9
                if needed_gb > max_in_memory_gb:
                    raise UserError(
                        f"{e}. Set DDPM_HF_CACHE to a writable folder with {needed_gb:.1f} GB free, free disk space, or raise --max_in_memory_gb above {needed_gb:.1f} to decode into memory."
                    ) from None
                warnings.warn(
                    f"could not cache the decoded images: {e}. Decoding them into memory instead; the next run decodes them again. Set DDPM_HF_CACHE to a writable folder to keep them."
                )
                storage = in_memory = np.empty(shape, dtype=np.uint8)
            kept, skipped, upscaled = _decode_rows(column_data, column, resolution, on_corrupt, storage, progress)
            if in_memory is None:
                storage.flush()
            del storage
        if in_memory is None:
            with files.atomic_write(cache_path + ".json", "w") as f:  # last: the .npy is read only with it
                json.dump({"kept": kept, "skipped_rows": skipped, "upscaled": upscaled}, f)
    except OSError as e:
        raise UserError(
            f"could not write the decoded dataset to {os.path.dirname(cache_path)} ({e.strerror or e}). Free disk space, set DDPM_HF_CACHE to a writable folder, or raise --max_in_memory_gb."
        ) from None
    _warn_about(skipped, upscaled, len(column_data), kept, resolution)
    if in_memory is not None:
        return DecodedImages(images=torch.from_numpy(in_memory[:kept]), skipped_rows=skipped, upscaled=upscaled, memory_mapped=False)
    # Mapped again from the cache: another process (another machine on a shared disk, another run) may have renamed
    # its identical file onto the same name since; either is whole.
    return DecodedImages(images=torch.from_numpy(np.load(cache_path + ".npy", mmap_mode="c")[:kept]), skipped_rows=skipped, upscaled=upscaled)


def _decode_rows(column_data, column: str, resolution: int, on_corrupt: str, storage: np.ndarray, progress: bool) -> tuple[int, list[int], int]:
    """Decode every row into storage[0], storage[1], ... (skipping undecodable ones with on_corrupt="skip");
    (rows kept, rows skipped, images upscaled)."""
    from tqdm.auto import tqdm

    count = len(column_data)
    kept, skipped, upscaled = 0, [], 0
    for row, item in enumerate(tqdm(column_data, total=count, desc="Decoding images", disable=not progress, unit="img")):
        try:
            image = open_image(item[column])
            image.load()
            image = to_rgb(image)
        except UserError as e:  # readable, but not as an image to train on (e.g. floats out of range): never skipped
            raise UserError(f"row {row} of the dataset: {e}") from None
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
    return kept, skipped, upscaled


def _warn_about(skipped: list[int], upscaled: int, count: int, kept: int, resolution: int) -> None:
    if skipped:
        warnings.warn(f"skipped {len(skipped)} of {count} images that could not be decoded (rows {skipped[:10]}{'...' if len(skipped) > 10 else ''}).")
    if upscaled:
        warnings.warn(f"{upscaled} of {kept} images are smaller than --resolution {resolution} and were upscaled; they will look blurry.")


# The decoded cache: <cache>/decoded/<key>.npy (N x 3 x R x R uint8, or more rows when some were skipped: the first
# `kept` count) and <key>.json, written last, so that a file without its .json (a run killed while decoding) is
# never read. Several machines or runs may decode the same dataset at once: each writes its own uniquely named file
# (files.partial_name) and renames it onto <key>.npy, which readers then see whole, old or new, never half-written.
# The key is the dataset's fingerprint, which `datasets` derives from the data files, the size and modification
# time of every image file the rows only reference by path, and every setting that changes the decoded pixels.


def _decoded_cache_path(dataset, column: str, resolution: int, on_corrupt: str) -> str:
    referenced = _referenced_files_digest(dataset, column)
    key = hashlib.sha256(f"{dataset._fingerprint}-{referenced}-{column}-{resolution}-{on_corrupt}-v3".encode()).hexdigest()[:24]
    return os.path.join(files.cache_root(), "decoded", key)


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


def _load_decoded(cache_path: str):
    """(images, skipped rows, upscaled count) from the cache, the images memory-mapped copy-on-write; None if absent."""
    try:
        with open(cache_path + ".json") as f:
            meta = json.load(f)
        storage = np.load(cache_path + ".npy", mmap_mode="c", allow_pickle=False)
    except (OSError, ValueError):
        return None
    if storage.ndim != 4 or storage.shape[0] < meta["kept"] or storage.shape[1] != 3:
        return None
    return storage[: meta["kept"]], meta["skipped_rows"], meta["upscaled"]


class _CacheUnwritable(Exception):
    """The decoded dataset cannot be written to the cache folder (the message says why)."""


def _create_memory_map(writing: contextlib.ExitStack, path: str, shape: tuple[int, ...]) -> np.ndarray:
    """A .npy file for `path`, mapped for writing, its disk space reserved (a full disk is known now, not as a SIGBUS
    when a page of a sparse file is first written, hours into decoding). It is written under a name of its own and
    renamed to `path` when `writing` closes without an error (files.atomic_write), else removed."""
    folder = os.path.dirname(path)
    try:
        os.makedirs(folder, exist_ok=True)
        files.remove_orphans(path)
        free = shutil.disk_usage(folder).free
    except OSError as e:
        raise _CacheUnwritable(f"cannot write the decoded dataset to {folder} ({e.strerror or e})") from None
    if free < math.prod(shape):
        raise _CacheUnwritable(f"{folder} has {free / 1e9:.1f} GB free but the decoded dataset needs {math.prod(shape) / 1e9:.1f} GB")
    try:
        with contextlib.ExitStack() as attempt:  # a failure here removes the file at once
            target = attempt.enter_context(files.atomic_write(path))
            storage = np.lib.format.open_memmap(target.name, mode="w+", dtype=np.uint8, shape=shape)
            if hasattr(os, "posix_fallocate"):
                try:
                    os.posix_fallocate(target.fileno(), 0, os.fstat(target.fileno()).st_size)
                except OSError as e:
                    if e.errno in (errno.ENOSPC, errno.EDQUOT):
                        raise
                    # not supported by this file system: the free-space check above stands in
            writing.enter_context(attempt.pop_all())
    except OSError as e:
        raise _CacheUnwritable(f"cannot write the decoded dataset to {folder} ({e.strerror or e})") from None
    return storage


def open_image(value):
    """A PIL image, not yet decoded, from any value an image column holds: an Image feature's {"bytes", "path"}
    cell, encoded bytes, a file path, a decoded PIL image or a NumPy array."""
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


# What the decoded images may take of a device's free memory: the rest is for the model, its optimizer state and
# the activations, most of which are allocated after the data (Adam's moments at the first step).
DEVICE_MEMORY_SHARE = 0.5
# The mirror images are written this much at a time: never a transient copy of the whole dataset.
MIRROR_CHUNK_BYTES = 64 << 20

DEVICE_WITH_FLIPS, DEVICE, HOST = "device, with flips", "device", "host"


def free_memory(device: torch.device) -> int:
    """Bytes free on `device` now: the accelerator's free memory, for the CPU the host's."""
    if device.type == "cpu":
        names = getattr(os, "sysconf_names", {})  # free pages: POSIX systems with Linux's extension (not macOS)
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") if "SC_AVPHYS_PAGES" in names else 0
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    backend = getattr(torch, device.type, None)  # e.g. torch.xpu
    return backend.mem_get_info(device)[0] if hasattr(backend, "mem_get_info") else 0  # unknown: keep the images on the host


def device_placement(image_bytes: int, random_flip: bool, free_bytes: int, max_gb: float) -> str:
    """Where the decoded images go: DEVICE_WITH_FLIPS (the images and their mirror images, so that a flip is just
    another row to gather), DEVICE (the images), or HOST (batches gathered from the memory map through pinned
    memory). What goes on the device is at most `max_gb` and at most DEVICE_MEMORY_SHARE of its free memory."""
    budget = min(max_gb * 1e9, DEVICE_MEMORY_SHARE * free_bytes)
    if random_flip and 2 * image_bytes <= budget:
        return DEVICE_WITH_FLIPS
    return DEVICE if image_bytes <= budget else HOST


def gather_rows(images: torch.Tensor, index: torch.Tensor, device: torch.device) -> torch.Tensor:
    """images[index] (images on the host) on `device`. For an accelerator the rows are gathered into page-locked
    (pinned) memory, from which the copy runs asynchronously, alongside the model's work; PyTorch's caching host
    allocator reuses that memory only once the copy is done."""
    pinned = device.type != "cpu"
    rows = torch.empty((len(index), *images.shape[1:]), dtype=images.dtype, pin_memory=pinned)
    torch.index_select(images, 0, index, out=rows)
    return rows.to(device, non_blocking=pinned)


class ImageBatches:
    """An endless, seeded stream of training images, cut into batches by position.

    Epoch e visits the images in the order randperm(N) seeded with (seed, e). Batch positions
    are absolute (step * global_batch + offset), so any step's batch can be built directly: resuming
    at step k needs no pass over the k batches before it, and the processes of a multi-process run
    read disjoint slices of the same global batch.

    The images live where `device_placement` says: on the device (with their mirror images when that fits too),
    or on the host, where `images` (the memory map of decode_images) already is.
    """

    def __init__(
        self,
        images: torch.Tensor,
        seed: int,
        random_flip: bool,
        device: torch.device,
        labels: torch.Tensor | None = None,
        max_device_gb: float = float("inf"),
    ):
        self.num_images = n = images.shape[0]
        self.labels = labels.to(device) if labels is not None else None  # class ids, row-aligned with the images
        self.placement = device_placement(images.numel() * images.element_size(), random_flip, free_memory(device), max_device_gb)
        self._with_flips = None
        if self.placement == DEVICE_WITH_FLIPS:
            # Both orientations side by side: a flipped image is then just another row to gather, which is
            # several times faster than flipping a batch (bench/data_throughput.py).
            self._with_flips = torch.empty((2 * n, *images.shape[1:]), dtype=images.dtype, device=device)
            self._with_flips[:n].copy_(images)
            rows = max(1, MIRROR_CHUNK_BYTES // (images[0].numel() * images.element_size()))
            for start in range(0, n, rows):
                stop = min(start + rows, n)
                self._with_flips[n + start : n + stop] = self._with_flips[start:stop].flip(3)
            self.images = self._with_flips[:n]
        else:
            self.images = images.to(device) if self.placement == DEVICE else images
        logger.info("training images: %d x %s on the %s", n, tuple(images.shape[1:]), self.placement)
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
        images = self.images.index_select(0, index) if self.placement == DEVICE else gather_rows(self.images, index, self.device)
        if self.random_flip:
            flip = torch.rand(size, device=self.device) < 0.5
            images = torch.where(flip[:, None, None, None], images.flip(3), images)
        return to_model_range(images)

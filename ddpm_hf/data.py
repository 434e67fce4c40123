"""Where the data flows in: a dataset -> one decoded uint8 tensor -> training batches in [-1, 1].

Each image is decoded once (any mode -> RGB, short side resized, center-cropped). Training batches
are built by indexing that tensor on the training device, then flipping and scaling there: no PIL
work and no DataLoader per step. A dataset too large for `max_in_memory_gb` is decoded once into a
memory-mapped .npy file in the user cache and batches are gathered from it.
"""

from __future__ import annotations

import glob
import hashlib
import io
import logging
import os
import re
import warnings
from dataclasses import dataclass
from importlib import resources

import numpy as np
import torch

from .config import BUILTIN_DATASET_PREFIX
from .errors import UserError

logger = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


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
        key = name[len(BUILTIN_DATASET_PREFIX):]
        if key not in available:
            raise UserError(f"{option} {name}: no such built-in dataset. Built-in: {', '.join(BUILTIN_DATASET_PREFIX + k for k in available)}.")
        return _load_parquet_files({split: [available[key]]}, split, name, option)

    path = os.path.expanduser(name)
    if os.path.isfile(path):
        if not path.endswith(".parquet"):
            raise UserError(f"{option} {name} is a file but not a .parquet file. Pass a parquet file, or a folder of images or parquet files.")
        return _load_parquet_files({split: [path]}, split, name, option)
    if os.path.isdir(path):
        return _load_local_folder(path, split, name, option)
    if name.startswith((".", "/", "~")) or os.sep in name.strip("/").replace("/", "", 1) or not _HUB_ID.match(name):
        raise UserError(f"{option} {name}: no such file or folder. Check the path, or give a Hub dataset id like uoft-cs/cifar10.")
    return _load_hub_dataset(name, split, config_name, option)


def _load_local_folder(path: str, split: str, name: str, option: str):
    import datasets

    if os.path.isfile(os.path.join(path, "dataset_dict.json")) or os.path.isfile(os.path.join(path, "state.json")):
        loaded = datasets.load_from_disk(path)
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise UserError(f"{option} {name} has no split {split!r}; it has: {', '.join(loaded)}. Pass --split NAME.")
            return loaded[split]
        return loaded

    parquet_files = sorted(glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True))
    if parquet_files:
        return _load_parquet_files(_group_by_split(parquet_files, path), split, name, option)

    has_images = any(f.lower().endswith(_IMAGE_EXTENSIONS) for _, _, files in os.walk(path) for f in files)
    if not has_images:
        raise UserError(f"{option} {name} holds no images, parquet files or save_to_disk dataset. Point it at a folder of images or parquet files.")
    loaded = datasets.load_dataset("imagefolder", data_dir=path)
    if split not in loaded:
        raise UserError(f"{option} {name} has no split {split!r}; it has: {', '.join(loaded)}. Pass --split NAME.")
    return loaded[split]


def _group_by_split(files: list[str], root: str) -> dict[str, list[str]]:
    """Hub naming: `train-00000-of-00003.parquet`, `data/test-*.parquet` or `train/*.parquet`.
    Files that name no split all count as `train`."""
    groups: dict[str, list[str]] = {}
    for f in files:
        relative = os.path.relpath(f, root)
        match = re.match(r"^([A-Za-z][\w]*?)[-_]\d+(-of-\d+)?\.parquet$", os.path.basename(f))
        parts = relative.split(os.sep)
        if match:
            split_name = match.group(1)
        elif len(parts) > 1 and parts[-2] not in ("data",):
            split_name = parts[-2]
        else:
            split_name = "train"
        groups.setdefault(split_name, []).append(f)
    return groups


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
            raise UserError(f"{option} {repo_id}: no such dataset on the Hub (or it is private: log in with `hf auth login`). Check the id, or give {option} a local path.") from None
        except HfHubHTTPError as e:
            raise UserError(f"{option} {repo_id}: the Hub answered {e.response.status_code if e.response is not None else 'an error'}. {offline_hint}") from None
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
    if override is not None:
        if override not in columns:
            raise UserError(f"--image_column {override}: no such column; the dataset has: {', '.join(columns)}.")
        return override
    for candidate in ("img", "image"):
        if candidate in columns:
            return candidate
    image_features = [c for c, feature in dataset.features.items() if isinstance(feature, datasets.Image)]
    if len(image_features) == 1:
        return image_features[0]
    found = f"several Image columns ({', '.join(image_features)})" if image_features else "no image column"
    raise UserError(f"found {found} in the dataset; its columns are: {', '.join(columns)}. Pass --image_column NAME.")


def to_rgb(image):
    """Any PIL mode -> RGB. Transparent pixels become white, not whatever colour they happen to hold."""
    from PIL import Image

    if image.mode == "RGB":
        return image
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0, 0, 255).astype(np.uint8))
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
    from PIL import Image
    from tqdm.auto import tqdm

    column = find_image_column(dataset, image_column)
    count = len(dataset)
    if count == 0:
        raise UserError("the dataset split is empty: no images to train on. Check --dataset and --split.")
    if isinstance(dataset.features[column], datasets.Image):
        # Read the encoded bytes ourselves: decoding happens exactly once, below.
        dataset = dataset.cast_column(column, datasets.Image(decode=False))
    column_data = dataset.select_columns([column])

    size_gb = count * 3 * resolution * resolution / 1e9
    memory_mapped = size_gb > max_in_memory_gb
    cache_path = _decoded_cache_path(dataset, column, resolution, on_corrupt)
    cached = _load_decoded(cache_path, memory_mapped)
    if cached is not None:  # decoded by an earlier run: start-up skips the decoding
        storage, skipped, upscaled = cached
        _warn_about(skipped, upscaled, count, len(storage), resolution)
        return _as_decoded_images(storage, skipped, upscaled, memory_mapped)
    partial_path = cache_path + ".partial.npy"
    if memory_mapped:
        os.makedirs(os.path.dirname(cache_path), exist_ok=True)
        storage = np.lib.format.open_memmap(partial_path, mode="w+", dtype=np.uint8, shape=(count, 3, resolution, resolution))
        logger.info("dataset is %.1f GB decoded: memory-mapping it from %s", size_gb, cache_path)
    else:
        # Stored channels-first, as the model reads it: loading the cache is then a plain read, no transpose.
        storage = np.empty((count, 3, resolution, resolution), dtype=np.uint8)

    kept, skipped, upscaled = 0, [], 0
    for row, item in enumerate(tqdm(column_data, total=count, desc="Decoding images", disable=not progress, unit="img")):
        value = item[column]
        try:
            image = _open_image(value)
            image.load()
        except Exception as e:
            if on_corrupt == "skip":
                skipped.append(row)
                continue
            raise UserError(f"row {row} of the dataset holds an image that cannot be decoded ({type(e).__name__}: {e}). Fix or drop it, or pass --on_corrupt_image skip.") from None
        if min(image.size) < resolution:
            upscaled += 1
        storage[kept] = np.asarray(resize_and_crop(to_rgb(image), resolution)).transpose(2, 0, 1)
        kept += 1
    if kept == 0:
        raise UserError(f"none of the {count} images could be decoded. Check --dataset and --image_column.")
    _warn_about(skipped, upscaled, count, kept, resolution)
    storage = _save_decoded(storage, kept, partial_path, cache_path, skipped, upscaled, memory_mapped)
    return _as_decoded_images(storage, skipped, upscaled, memory_mapped)


def _warn_about(skipped: list[int], upscaled: int, count: int, kept: int, resolution: int) -> None:
    if skipped:
        warnings.warn(f"skipped {len(skipped)} of {count} images that could not be decoded (rows {skipped[:10]}{'...' if len(skipped) > 10 else ''}).")
    if upscaled:
        warnings.warn(f"{upscaled} of {kept} images are smaller than --resolution {resolution} and were upscaled; they will look blurry.")


def _as_decoded_images(storage: np.ndarray, skipped: list[int], upscaled: int, memory_mapped: bool) -> DecodedImages:
    images = torch.from_numpy(storage)  # N x 3 x R x R already: no copy
    return DecodedImages(images=images, skipped_rows=skipped, upscaled=upscaled, memory_mapped=memory_mapped)


# The decoded cache: <cache>/decoded/<key>.npy (N x 3 x R x R uint8) and <key>.json, written last, so that a
# file without its .json (a run killed while decoding) is never read. The key is the dataset's fingerprint,
# which `datasets` derives from the data files, plus every setting that changes the decoded pixels.


def _decoded_cache_path(dataset, column: str, resolution: int, on_corrupt: str) -> str:
    from huggingface_hub.constants import HF_HOME

    key = hashlib.sha256(f"{dataset._fingerprint}-{column}-{resolution}-{on_corrupt}-v2".encode()).hexdigest()[:24]
    folder = os.path.join(os.environ.get("DDPM_HF_CACHE", os.path.join(HF_HOME, "ddpm_hf")), "decoded")
    return os.path.join(folder, key)


def _load_decoded(cache_path: str, memory_mapped: bool):
    import json

    try:
        with open(cache_path + ".json") as f:
            meta = json.load(f)
        storage = np.load(cache_path + ".npy", mmap_mode="c" if memory_mapped else None, allow_pickle=False)
    except (OSError, ValueError):
        return None
    if storage.ndim != 4 or storage.shape[:2] != (meta["kept"], 3):
        return None
    return storage, meta["skipped_rows"], meta["upscaled"]


def _save_decoded(storage: np.ndarray, kept: int, partial_path: str, cache_path: str, skipped: list[int], upscaled: int, memory_mapped: bool) -> np.ndarray:
    """Keep the decoded images for the next run; a cache that cannot be written only costs that speed-up."""
    import json

    try:
        os.makedirs(os.path.dirname(cache_path), exist_ok=True)
        if memory_mapped:
            storage.flush()
            if kept < storage.shape[0]:  # skipped rows: keep only the decoded ones
                np.save(partial_path + ".trim.npy", storage[:kept])
                os.replace(partial_path + ".trim.npy", partial_path)
            del storage
        else:
            storage = storage[:kept]
            np.save(partial_path, storage)
        os.replace(partial_path, cache_path + ".npy")
        with open(cache_path + ".json.partial", "w") as f:
            json.dump({"kept": kept, "skipped_rows": skipped, "upscaled": upscaled}, f)
        os.replace(cache_path + ".json.partial", cache_path + ".json")
    except OSError as e:
        warnings.warn(f"could not cache the decoded images in {os.path.dirname(cache_path)} ({e}); the next run decodes them again.")
        if memory_mapped:
            raise UserError(f"could not write the memory-mapped dataset to {os.path.dirname(cache_path)} ({e}). Free disk space, set DDPM_HF_CACHE, or raise --max_in_memory_gb.") from None
    if memory_mapped:
        return np.load(cache_path + ".npy", mmap_mode="c")
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

    def __init__(self, images: torch.Tensor, seed: int, random_flip: bool, device: torch.device, keep_on_host: bool = False):
        self.num_images = n = images.shape[0]
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

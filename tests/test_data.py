"""Data: every kind of --dataset, any image mode, the image column, and batches on the device."""

import os
import time

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_hf.data import ImageBatches, decode_images, find_image_column, load_image_dataset, resize_and_crop, to_rgb
from ddpm_hf.errors import UserError

SHARED_CIFAR10 = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cifar10")


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Decoded images are cached per test, not in the user's cache."""
    monkeypatch.setenv("DDPM_HF_CACHE", str(tmp_path / "cache"))


def _image(mode, size=(40, 30), seed=0):
    rng = np.random.default_rng(seed)
    channels = {"L": 1, "RGB": 3, "RGBA": 4, "CMYK": 4}[mode]
    array = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    return Image.fromarray(array[..., 0] if channels == 1 else array, mode)


def test_builtin_cifar10_subset_has_the_hub_schema():
    dataset = load_image_dataset("builtin:cifar10-1k")
    assert len(dataset) == 1000 and dataset.column_names == ["img", "label"]
    assert isinstance(dataset.features["img"], datasets.Image)
    assert dataset.features["label"].names[3] == "cat"
    assert sorted(np.bincount(dataset["label"])) == [100] * 10
    decoded = decode_images(dataset, 32, progress=False)
    assert decoded.images.shape == (1000, 3, 32, 32) and decoded.images.dtype == torch.uint8


def test_parquet_folder_with_hub_split_names(tmp_path):
    source = load_image_dataset("builtin:cifar10-1k")
    source.select(range(30)).to_parquet(str(tmp_path / "train-00000-of-00002.parquet"))
    source.select(range(30, 50)).to_parquet(str(tmp_path / "train-00001-of-00002.parquet"))
    source.select(range(50, 60)).to_parquet(str(tmp_path / "test-00000-of-00001.parquet"))
    assert len(load_image_dataset(str(tmp_path), "train")) == 50
    assert len(load_image_dataset(str(tmp_path), "test")) == 10
    with pytest.raises(UserError, match="no split 'validation'.*test, train"):
        load_image_dataset(str(tmp_path), "validation")


def test_imagefolder_with_image_column_and_any_mode(tmp_path):
    for i, mode in enumerate(["L", "RGBA", "CMYK", "RGB"]):
        _image(mode, seed=i).save(tmp_path / f"{i}.{'jpg' if mode == 'CMYK' else 'png'}")
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).convert("P").save(tmp_path / "palette.png")
    dataset = load_image_dataset(str(tmp_path))
    assert find_image_column(dataset) == "image"
    decoded = decode_images(dataset, 16, progress=False)
    assert decoded.images.shape == (5, 3, 16, 16)


def test_grayscale_becomes_three_equal_channels_and_transparency_white():
    gray = to_rgb(_image("L"))
    array = np.asarray(gray)
    assert gray.mode == "RGB" and np.array_equal(array[..., 0], array[..., 1]) and np.array_equal(array[..., 1], array[..., 2])
    transparent = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert np.all(np.asarray(to_rgb(transparent)) == 255)


def test_resize_short_side_then_center_crop():
    wide = Image.new("RGB", (64, 32), (0, 0, 0))
    wide.paste((255, 255, 255), (0, 0, 16, 32))  # a white band on the far left is cropped away
    out = resize_and_crop(wide, 16)
    assert out.size == (16, 16) and np.asarray(out).max() < 30


def test_save_to_disk_folder(tmp_path):
    dataset = datasets.Dataset.from_dict(
        {"picture": [_image("RGB", (8, 8), s) for s in range(3)], "x": [1, 2, 3]},
        features=datasets.Features({"picture": datasets.Image(), "x": datasets.Value("int32")}),
    )
    datasets.DatasetDict({"train": dataset}).save_to_disk(str(tmp_path / "saved"))
    loaded = load_image_dataset(str(tmp_path / "saved"))
    assert find_image_column(loaded) == "picture"  # the only Image feature
    assert decode_images(loaded, 8, progress=False).images.shape == (3, 3, 8, 8)


def test_missing_image_column_lists_the_columns():
    dataset = datasets.Dataset.from_dict({"text": ["a"], "label": [0]})
    with pytest.raises(UserError, match="columns are: text, label. Pass --image_column"):
        find_image_column(dataset)
    with pytest.raises(UserError, match="--image_column pixels: no such column"):
        find_image_column(dataset, "pixels")


def test_image_column_that_holds_no_images_is_refused_naming_the_image_columns(tmp_path):
    picture = {"bytes": _png_bytes(_image("RGB", (8, 8))), "path": None}
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    dataset = datasets.Dataset.from_dict(
        {"img": [picture], "label": [3], "caption": ["a red car"], "file": [str(tmp_path / "a.png")], "png": [picture["bytes"]], "blob": [b"not an image"]},
        features=datasets.Features(
            {
                "img": datasets.Image(),
                "label": datasets.ClassLabel(names=[str(i) for i in range(10)]),
                "caption": datasets.Value("string"),
                "file": datasets.Value("string"),
                "png": datasets.Value("binary"),
                "blob": datasets.Value("binary"),
            }
        ),
    )
    for column, holds in (("label", "ClassLabel values"), ("caption", "text that is not an image path"), ("blob", "bytes that are not an image")):
        with pytest.raises(
            UserError,
            match=rf"^--image_column {column}: column '{column}' is not an image column \(it holds {holds}\); its Image columns are: img\. Pass --image_column NAME\.$",
        ):
            find_image_column(dataset, column)
    with pytest.raises(UserError, match="column 'label' is not an image column"):  # not "row 0 ... cannot be decoded"
        decode_images(dataset, 8, image_column="label", progress=False)
    for column in ("img", "file", "png"):  # an Image feature, file paths, encoded bytes
        assert find_image_column(dataset, column) == column
        assert decode_images(dataset, 8, image_column=column, progress=False).images.shape == (1, 3, 8, 8)
    numbers = datasets.Dataset.from_dict({"x": [1.5]})
    with pytest.raises(UserError, match=r"column 'x' is not an image column \(it holds float64 values\); it has no Image column; its columns are: x\."):
        find_image_column(numbers, "x")


def test_corrupt_image_stops_naming_the_row_or_is_skipped():
    good = {"bytes": _png_bytes(_image("RGB", (8, 8))), "path": None}
    dataset = datasets.Dataset.from_dict({"img": [good, {"bytes": b"not a png", "path": None}, good]}, features=datasets.Features({"img": datasets.Image()}))
    with pytest.raises(UserError, match="row 1 .*--on_corrupt_image skip"):
        decode_images(dataset, 8, progress=False)
    with pytest.warns(UserWarning, match="skipped 1 of 3"):
        decoded = decode_images(dataset, 8, on_corrupt="skip", progress=False)
    assert decoded.images.shape[0] == 2 and decoded.skipped_rows == [1]


def test_small_images_are_upscaled_with_a_warning():
    dataset = datasets.Dataset.from_dict({"img": [_image("RGB", (8, 8))]}, features=datasets.Features({"img": datasets.Image()}))
    with pytest.warns(UserWarning, match="smaller than --resolution 32"):
        decoded = decode_images(dataset, 32, progress=False)
    assert decoded.images.shape == (1, 3, 32, 32) and decoded.upscaled == 1


def test_empty_split_and_missing_paths_are_user_errors(tmp_path):
    empty = datasets.Dataset.from_dict({"img": []}, features=datasets.Features({"img": datasets.Image()}))
    with pytest.raises(UserError, match="empty"):
        decode_images(empty, 8, progress=False)
    with pytest.raises(UserError, match="no such file or folder"):
        load_image_dataset(str(tmp_path / "nothing-here"))
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(UserError, match="no images, parquet"):
        load_image_dataset(str(tmp_path))


def test_hub_id_without_network_fails_fast_and_names_dataset_path(monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    started = time.monotonic()
    with pytest.raises(UserError, match="give --dataset a local path"):
        load_image_dataset("uoft-cs/cifar10")
    assert time.monotonic() - started < 15


def test_batches_are_in_range_and_flip_only_when_enabled():
    images = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    images[..., :4] = 255  # left half white: a flip moves it to the right
    torch.manual_seed(0)
    plain = ImageBatches(images, seed=0, random_flip=False, device=torch.device("cpu")).batch(0, 64)
    assert plain.min() == -1 and plain.max() == 1
    assert torch.all(plain[..., :4] == 1) and torch.all(plain[..., 4:] == -1)
    flipping = ImageBatches(images, seed=0, random_flip=True, device=torch.device("cpu")).batch(0, 64)
    flipped = flipping[:, 0, 0, 0] == -1
    assert 10 < flipped.sum() < 54  # about half
    assert torch.equal(flipping[flipped], plain[flipped].flip(3))


def test_batch_stream_visits_every_image_once_per_epoch_and_is_addressable():
    images = torch.arange(10, dtype=torch.uint8).reshape(10, 1, 1, 1).expand(10, 3, 2, 2).contiguous()
    stream = ImageBatches(images, seed=3, random_flip=False, device=torch.device("cpu"))
    epoch = stream.indices(0, 10)
    assert sorted(epoch.tolist()) == list(range(10))
    assert not torch.equal(epoch, stream.indices(10, 10))  # a new order each epoch
    # a batch crossing an epoch boundary = the end of one order + the start of the next
    assert torch.equal(stream.indices(7, 6), torch.cat([epoch[7:], stream.indices(10, 3)]))
    fresh = ImageBatches(images, seed=3, random_flip=False, device=torch.device("cpu"))
    assert torch.equal(fresh.indices(13, 4), stream.indices(13, 4))  # no replay needed to resume


def test_memory_mapped_path_gives_the_same_images(tmp_path, monkeypatch):
    monkeypatch.setenv("DDPM_HF_CACHE", str(tmp_path))
    dataset = load_image_dataset("builtin:cifar10-1k").select(range(20))
    mapped = decode_images(dataset, 32, progress=False)
    assert mapped.memory_mapped
    monkeypatch.setenv("DDPM_HF_CACHE", str(tmp_path / "not_a_folder"))
    (tmp_path / "not_a_folder").write_text("")
    with pytest.warns(UserWarning, match="into memory"):
        in_memory = decode_images(dataset, 32, progress=False)
    assert not in_memory.memory_mapped and torch.equal(mapped.images, in_memory.images)
    on_host = ImageBatches(mapped.images, 0, False, torch.device("cpu"), max_device_gb=0.0)
    assert on_host.placement == "host"
    assert torch.equal(on_host.batch(0, 5), ImageBatches(in_memory.images, 0, False, torch.device("cpu")).batch(0, 5))


@pytest.mark.skipif(not os.path.isdir(SHARED_CIFAR10), reason="needs ../shared/data/cifar10")
def test_real_cifar10_parquet_folder():
    test = load_image_dataset(SHARED_CIFAR10, "test")
    assert len(test) == 10_000 and test.column_names == ["img", "label"]
    images = decode_images(test.select(range(500)), 32, progress=False).images.float() / 255
    mean = images.mean(dim=(0, 2, 3))
    assert torch.allclose(mean, torch.tensor([0.4942, 0.4851, 0.4504]), atol=0.03)


def _png_bytes(image):
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_decoded_images_are_cached_for_the_next_run(tmp_path, monkeypatch):
    import ddpm_hf.data as data

    monkeypatch.setenv("DDPM_HF_CACHE", str(tmp_path))
    dataset = load_image_dataset("builtin:cifar10-1k").select(range(12))
    first = decode_images(dataset, 16, progress=False)
    assert len(list((tmp_path / "decoded").glob("*.json"))) == 1

    def no_decoding(value):
        raise AssertionError("decoded again instead of reading the cache")

    # the pixels are PIL's, channels first (R, G, B), whether decoded now or read from the cache
    expected = torch.stack([torch.from_numpy(np.array(resize_and_crop(to_rgb(item["img"]), 16))).permute(2, 0, 1) for item in dataset])
    assert torch.equal(first.images, expected)
    monkeypatch.setattr(data, "open_image", no_decoding)
    again = decode_images(dataset, 16, progress=False)
    assert torch.equal(again.images, expected)
    with pytest.raises(UserError, match="decoded again"):
        decode_images(dataset, 8, progress=False)  # another resolution is another cache entry: decoded anew
    # a run killed while decoding leaves no .json: that file is never read
    (tmp_path / "decoded" / "orphan.npy").write_bytes(b"\x93NUMPY")
    assert data._load_decoded(str(tmp_path / "decoded" / "orphan")) is None


def test_memory_mapped_decoding_with_a_skipped_row(tmp_path, monkeypatch):
    monkeypatch.setenv("DDPM_HF_CACHE", str(tmp_path))
    good = {"bytes": _png_bytes(_image("RGB", (8, 8))), "path": None}
    dataset = datasets.Dataset.from_dict({"img": [good, {"bytes": b"broken", "path": None}, good]}, features=datasets.Features({"img": datasets.Image()}))
    with pytest.warns(UserWarning, match="skipped 1 of 3"):
        mapped = decode_images(dataset, 8, on_corrupt="skip", max_in_memory_gb=0.0, progress=False)
    assert mapped.memory_mapped and mapped.images.shape == (2, 3, 8, 8) and mapped.skipped_rows == [1]
    with pytest.warns(UserWarning, match="skipped 1 of 3"):  # from the cache, with the same warning
        again = decode_images(dataset, 8, on_corrupt="skip", max_in_memory_gb=0.0, progress=False)
    assert torch.equal(again.images, mapped.images)

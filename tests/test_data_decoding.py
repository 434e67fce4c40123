"""Decoding gives what `datasets`' Image feature gives (EXIF orientation included), converted to RGB by the
type's range of each mode, whether for training (decode_images) or for FID (a folder of images)."""

import io
import struct
import zlib

import datasets
import numpy as np
import pytest
from PIL import Image

from ddpm_hf import fid
from ddpm_hf.data import decode_images, resize_and_crop, to_rgb
from ddpm_hf.errors import UserError


@pytest.fixture(autouse=True)
def private_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("DDPM_HF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))


def _png16(array):
    """H x W x C uint16 -> a 16-bit PNG (gray, gray+alpha, RGB, RGBA), which Pillow cannot write itself."""
    height, width, channels = array.shape
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    raw = b"".join(b"\0" + row.astype(">u2").tobytes() for row in array)

    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _encoded(image, format, **options):
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def _pixels(shape, seed=0, dtype=np.uint8):
    high = np.iinfo(dtype).max + 1
    return np.random.default_rng(seed).integers(0, high, shape, dtype=np.int64).astype(dtype)


def _exif_jpeg(orientation):
    picture = np.zeros((8, 16, 3), np.uint8)
    picture[:, :4] = 255  # a white band on the left: where it ends up shows the orientation
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _encoded(Image.fromarray(picture), "JPEG", exif=exif.tobytes(), quality=95)


def _palette_with_transparency():
    image = Image.fromarray(np.arange(96, dtype=np.uint8).reshape(8, 12)).convert("P")
    return _encoded(image, "PNG", transparency=5)


CATALOGUE = {
    "EXIF-rotated JPEG (6: 90 degrees)": lambda: _exif_jpeg(6),
    "EXIF-rotated JPEG (3: 180 degrees)": lambda: _exif_jpeg(3),
    "EXIF-mirrored JPEG (5: transposed)": lambda: _exif_jpeg(5),
    "16-bit grayscale PNG": lambda: _png16(_pixels((10, 14, 1), dtype=np.uint16)),
    "16-bit grayscale PNG, dark": lambda: _png16(_pixels((10, 14, 1), dtype=np.uint16) // 512),
    "16-bit RGB PNG": lambda: _png16(_pixels((10, 14, 3), dtype=np.uint16)),
    "16-bit RGBA PNG": lambda: _png16(_pixels((10, 14, 4), dtype=np.uint16)),
    "16-bit gray+alpha PNG": lambda: _png16(_pixels((10, 14, 2), dtype=np.uint16)),
    "16-bit grayscale TIFF": lambda: _encoded(Image.fromarray(_pixels((10, 14), dtype=np.uint16)), "TIFF"),
    "LA PNG": lambda: _encoded(Image.fromarray(_pixels((10, 14, 2)), "LA"), "PNG"),
    "P PNG with a transparent index": _palette_with_transparency,
    "RGB PNG with a transparent colour": lambda: _encoded(Image.fromarray((_pixels((10, 14, 3)) // 128) * 255), "PNG", transparency=(0, 0, 0)),
    "CMYK JPEG": lambda: _encoded(Image.fromarray(_pixels((10, 14, 4)), "CMYK"), "JPEG", quality=95),
    "1-bit PNG": lambda: _encoded(Image.fromarray(_pixels((10, 14)) > 127), "PNG"),
}


@pytest.mark.parametrize("kind", CATALOGUE)
def test_decoding_matches_the_datasets_image_feature(tmp_path, kind):
    encoded = CATALOGUE[kind]()
    theirs = to_rgb(datasets.Image().decode_example({"bytes": encoded, "path": None}))
    assert theirs.mode == "RGB"
    resolution = min(theirs.size)

    dataset = datasets.Dataset.from_dict({"image": [{"bytes": encoded, "path": None}]}, features=datasets.Features({"image": datasets.Image()}))
    trained_on = decode_images(dataset, resolution, progress=False).images[0].numpy()
    np.testing.assert_array_equal(trained_on, np.asarray(resize_and_crop(theirs, resolution)).transpose(2, 0, 1))

    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "image.bin.png").write_bytes(encoded)  # the FID reader goes by extension only
    measured = fid.load_image_folder(str(tmp_path / "folder"), progress=False)[0].numpy()
    np.testing.assert_array_equal(measured, np.asarray(theirs).transpose(2, 0, 1))


def test_exif_orientation_turns_the_photo_upright():
    upright = to_rgb(Image.open(io.BytesIO(_exif_jpeg(6))))
    assert upright.size == (8, 16)  # stored 16 wide x 8 high, shown turned by 90 degrees
    top_rows = np.asarray(upright)[:4].mean()
    assert top_rows > 200 and np.asarray(upright)[4:].mean() < 60  # the white band is now on top
    assert np.array_equal(np.asarray(to_rgb(upright)), np.asarray(upright))  # the tag is gone: not turned twice


@pytest.mark.parametrize("mode", ["I;16", "I"])
def test_sixteen_bit_samples_are_scaled_by_the_type_range_not_by_the_image_maximum(mode):
    values = np.array([[0, 100, 255, 256, 257], [1000, 32768, 40000, 65000, 65535]], np.uint16)
    dark = np.array([[0, 64, 128, 255]], np.uint16)  # a dark 16-bit image: every value <= 255
    for array in (values, dark):
        image = Image.fromarray(array) if mode == "I;16" else Image.fromarray(array.astype(np.int32), "I")
        assert image.mode == mode
        rgb = np.asarray(to_rgb(image))
        expected = np.rint(array.astype(np.float64) * 255 / 65535).astype(np.uint8)
        for channel in range(3):
            np.testing.assert_array_equal(rgb[..., channel], expected)
    assert np.asarray(to_rgb(Image.fromarray(dark))).max() <= 1  # stays dark
    assert np.all(np.diff(np.asarray(to_rgb(Image.fromarray(np.arange(0, 65536, 97, dtype=np.uint16)[None])))[0, :, 0].astype(int)) >= 0)  # monotonic


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_a_transparent_colour_key_becomes_white_like_an_alpha_channel(mode):
    array = np.zeros((4, 4, 3) if mode == "RGB" else (4, 4), np.uint8)
    array[:2] = 90
    key = (0, 0, 0) if mode == "RGB" else 0
    decoded = to_rgb(Image.open(io.BytesIO(_encoded(Image.fromarray(array), "PNG", transparency=key))))
    assert np.all(np.asarray(decoded)[2:] == 255) and np.all(np.asarray(decoded)[:2] == 90)


def _float_tiff(array):
    """A float32 image (PIL mode "F") as TIFF bytes: what `datasets` stores for a 2-D float array."""
    return _encoded(Image.fromarray(array.astype(np.float32), "F"), "TIFF")


def test_float_images_are_read_as_zero_to_one_from_a_tiff_file_and_from_parquet_bytes(tmp_path):
    values = np.array([[0.0, 0.25, 0.5], [0.8, 1.0, 0.1]], np.float32)
    expected = np.rint(values.astype(np.float64) * 255).astype(np.uint8)  # 0.8 -> 204, not 1
    assert expected[1, 0] == 204
    encoded = _float_tiff(values)
    assert Image.open(io.BytesIO(encoded)).mode == "F"

    # parquet bytes, through the Image feature, as training reads them
    datasets.Dataset.from_dict({"image": [{"bytes": encoded, "path": None}]}, features=datasets.Features({"image": datasets.Image()})).to_parquet(
        str(tmp_path / "floats.parquet")
    )
    from ddpm_hf.data import load_image_dataset

    trained_on = decode_images(load_image_dataset(str(tmp_path / "floats.parquet")), 2, progress=False).images[0].numpy()
    np.testing.assert_array_equal(trained_on, np.asarray(resize_and_crop(Image.fromarray(expected).convert("RGB"), 2)).transpose(2, 0, 1))

    # a .tif file, as a FID image folder reads it
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "float.tif").write_bytes(encoded)
    measured = fid.load_image_folder(str(tmp_path / "folder"), progress=False)[0].numpy()
    for channel in measured:
        np.testing.assert_array_equal(channel, expected)


@pytest.mark.parametrize("values", [np.array([[0.0, 255.0]]), np.array([[-0.5, 0.5]]), np.array([[np.nan, 0.5]])], ids=["0..255", "negative", "NaN"])
def test_float_images_outside_zero_to_one_are_refused_in_one_line(tmp_path, values):
    encoded = _float_tiff(values)
    dataset = datasets.Dataset.from_dict({"image": [{"bytes": encoded, "path": None}] * 2}, features=datasets.Features({"image": datasets.Image()}))
    for on_corrupt in ("error", "skip"):  # not a damaged file: refused, never skipped
        with pytest.raises(
            UserError, match=r"^row 0 of the dataset: a float image \(mode F\) holds values from .* but float images must hold values in \[0, 1\]"
        ) as error:
            decode_images(dataset, 2, on_corrupt=on_corrupt, progress=False)
        assert "\n" not in str(error.value)
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "float.tiff").write_bytes(encoded)
    with pytest.raises(UserError, match=r"float\.tiff: a float image \(mode F\) .* must hold values in \[0, 1\] \(0 black, 1 white\)"):
        fid.load_image_folder(str(tmp_path / "folder"), progress=False)

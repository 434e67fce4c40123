"""The decoded-image cache and the FID statistics cache: several writers at once, an unwritable or full disk,
and keys that cover every input the pixels come from."""

import errno
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from collections import namedtuple

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_hf import data, fid
from ddpm_hf.errors import UserError


@pytest.fixture(autouse=True)
def private_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("DDPM_HF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))


def _cifar(count):
    return data.load_image_dataset("builtin:cifar10-1k").select(range(count))


def _leftovers(folder):
    return sorted(p for p in os.listdir(folder) if "partial" in p) if os.path.isdir(folder) else []


_DECODE_AT_THE_SIGNAL = textwrap.dedent(
    """
    import os, sys, time
    import numpy as np
    import ddpm_hf.data as data

    dataset = data.load_image_dataset("builtin:cifar10-1k").select(range(100))
    resize = data.resize_and_crop

    def resize_slowly(image, resolution):
        time.sleep(0.003)  # so that the two processes' decoding surely overlaps
        return resize(image, resolution)

    data.resize_and_crop = resize_slowly
    open(sys.argv[1] + ".ready", "w").close()
    while not os.path.exists(sys.argv[2]):
        time.sleep(0.005)
    decoded = data.decode_images(dataset, 16, max_in_memory_gb=0.0, progress=False)
    assert decoded.memory_mapped
    np.save(sys.argv[1], decoded.images.numpy())
    """
)


def test_two_processes_decoding_the_same_dataset_memory_mapped_both_succeed(tmp_path, monkeypatch):
    script = tmp_path / "decode.py"
    script.write_text(_DECODE_AT_THE_SIGNAL)
    go = tmp_path / "go"
    outputs = [tmp_path / f"out{i}.npy" for i in range(2)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    processes = [subprocess.Popen([sys.executable, str(script), str(out), str(go)], env=env, stderr=subprocess.PIPE, text=True) for out in outputs]
    try:
        deadline = time.monotonic() + 180
        while not all(os.path.exists(f"{out}.ready") for out in outputs):
            assert time.monotonic() < deadline and all(p.poll() is None for p in processes), "a process died while starting"
            time.sleep(0.02)
        go.touch()  # both start decoding now
        errors = [p.communicate(timeout=180)[1] for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in processes] == [0, 0], "\n".join(errors)
    first, second = (np.load(out) for out in outputs)
    monkeypatch.setenv("DDPM_HF_CACHE", str(tmp_path / "other_cache"))
    expected = data.decode_images(_cifar(100), 16, progress=False).images.numpy()
    assert np.array_equal(first, expected) and np.array_equal(second, expected)
    decoded_folder = tmp_path / "cache" / "decoded"
    assert _leftovers(decoded_folder) == []
    assert len(list(decoded_folder.glob("*.npy"))) == len(list(decoded_folder.glob("*.json"))) == 1


def test_unwritable_cache_folder_is_a_warning_in_memory_and_a_one_line_error_beyond_max_in_memory_gb(tmp_path, monkeypatch):
    # We run as root, where a read-only folder is still writable: a file where the folder should be is not.
    (tmp_path / "not_a_folder").write_text("")
    monkeypatch.setenv("DDPM_HF_CACHE", str(tmp_path / "not_a_folder"))
    dataset = _cifar(4)
    with pytest.warns(UserWarning, match="could not cache the decoded images: cannot write .*not_a_folder.*into memory.*DDPM_HF_CACHE"):
        in_memory = decode_images_quietly(dataset)
    assert in_memory.images.shape == (4, 3, 8, 8) and not in_memory.memory_mapped
    with pytest.raises(UserError, match=r"cannot write the decoded dataset to .*not_a_folder.*DDPM_HF_CACHE.*--max_in_memory_gb") as error:
        data.decode_images(dataset, 8, max_in_memory_gb=0.0, progress=False)
    assert "\n" not in str(error.value)


def decode_images_quietly(dataset, **kwargs):
    return data.decode_images(dataset, 8, progress=False, **kwargs)


def test_full_disk_is_a_one_line_error_before_decoding(tmp_path, monkeypatch):
    dataset = _cifar(4)
    usage = namedtuple("usage", "total used free")
    with monkeypatch.context() as patch:
        patch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 100, 100))
        with pytest.raises(UserError, match=r"has 0.0 GB free but the decoded dataset needs .* GB.*DDPM_HF_CACHE.*--max_in_memory_gb"):
            data.decode_images(dataset, 8, max_in_memory_gb=0.0, progress=False)
        with pytest.warns(UserWarning, match="has 0.0 GB free but the decoded dataset needs .*into memory"):  # within the limit
            assert not data.decode_images(dataset, 8, progress=False).memory_mapped

    # The space check passes but the disk fills up before the file is allocated: ENOSPC now, not SIGBUS later.
    def disk_full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", disk_full, raising=False)
    with pytest.raises(UserError, match="No space left on device.*DDPM_HF_CACHE"):
        data.decode_images(dataset, 8, max_in_memory_gb=0.0, progress=False)
    assert _leftovers(tmp_path / "cache" / "decoded") == []

    # Within --max_in_memory_gb, a cache that cannot take the file is only a warning, and leaves no half-written file.
    with pytest.warns(UserWarning, match="could not cache the decoded images: cannot write .*No space left on device"):
        decoded = data.decode_images(dataset, 8, progress=False)
    assert decoded.images.shape == (4, 3, 8, 8) and _leftovers(tmp_path / "cache" / "decoded") == []


def test_interrupted_decoding_leaves_no_partial_file_and_old_ones_are_swept(tmp_path):
    good = {"bytes": _png(np.zeros((8, 8, 3), np.uint8)), "path": None}
    dataset = datasets.Dataset.from_dict({"img": [good, {"bytes": b"broken", "path": None}]}, features=datasets.Features({"img": datasets.Image()}))
    with pytest.raises(UserError, match="row 1"):
        data.decode_images(dataset, 8, max_in_memory_gb=0.0, progress=False)
    assert _leftovers(tmp_path / "cache" / "decoded") == []

    # a process of this host killed while decoding left its partial file: the next decode removes it
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    cifar = _cifar(3)
    cache_path = data._decoded_cache_path(cifar.cast_column("img", datasets.Image(decode=False)), "img", 8, "error")
    orphan = f"{cache_path}.npy.partial-{socket.gethostname()}-{dead.pid}-0123abcd"
    alive = f"{cache_path}.npy.partial-{socket.gethostname()}-{os.getpid()}-0123abcd"
    for path in (orphan, alive):
        with open(path, "wb") as f:
            f.write(b"half")
    data.decode_images(cifar, 8, max_in_memory_gb=0.0, progress=False)
    assert not os.path.exists(orphan) and os.path.exists(alive)


def _png(array):
    import io

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("how", ["Image feature", "string column of paths"])
def test_images_referenced_by_path_are_decoded_again_when_they_change(tmp_path, monkeypatch, how):
    folder = tmp_path / "pictures"
    folder.mkdir()
    paths = [str(folder / f"{i}.png") for i in range(3)]
    for i, path in enumerate(paths):
        Image.fromarray(np.full((8, 8, 3), 10 * i, np.uint8)).save(path)
    features = datasets.Features({"image": datasets.Image() if how == "Image feature" else datasets.Value("string")})
    datasets.Dataset.from_dict({"image": paths}, features=features).to_parquet(str(tmp_path / "train.parquet"))
    assert datasets.Dataset.from_parquet(str(tmp_path / "train.parquet")).data.column("image").to_pylist()[0] in (paths[0], {"bytes": None, "path": paths[0]})

    first = data.decode_images(data.load_image_dataset(str(tmp_path / "train.parquet")), 8, image_column="image", progress=False)
    assert first.images[1].unique().tolist() == [10]

    # the same files, untouched: read from the cache, not decoded again
    real_open = data.open_image
    monkeypatch.setattr(data, "open_image", lambda value: pytest.fail("decoded again although no image changed"))
    again = data.decode_images(data.load_image_dataset(str(tmp_path / "train.parquet")), 8, image_column="image", progress=False)
    assert torch.equal(again.images, first.images)
    monkeypatch.setattr(data, "open_image", real_open)

    # one image edited in place; the parquet is unchanged
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(paths[1])
    stat = os.stat(paths[1])
    os.utime(paths[1], ns=(stat.st_atime_ns, stat.st_mtime_ns + 2_000_000_000))  # later, however coarse the clock
    edited = data.decode_images(data.load_image_dataset(str(tmp_path / "train.parquet")), 8, image_column="image", progress=False)
    assert edited.images[1].unique().tolist() == [200]
    assert torch.equal(edited.images[0], first.images[0]) and torch.equal(edited.images[2], first.images[2])
    # a subset of the rows: still keyed on the files its own rows reference
    subset = data.decode_images(data.load_image_dataset(str(tmp_path / "train.parquet")).select([1]), 8, image_column="image", progress=False)
    assert subset.images[0].unique().tolist() == [200]


def _tiny_statistics(value):
    return fid.FIDStatistics(mu=np.full(fid.FEATURE_DIM, value, np.float64), sigma=np.eye(fid.FEATURE_DIM), num_images=2)


def test_fid_statistics_written_by_two_writers_at_once_stay_whole(tmp_path, monkeypatch):
    path = str(tmp_path / "stats.npz")
    real_savez = np.savez
    nested = []

    def savez_while_another_writer_saves(file, **arrays):
        real_savez(file, **arrays)
        if not nested:  # a second process saves the same statistics between this writer's write and rename
            nested.append(1)
            _tiny_statistics(2.0).save(path)

    monkeypatch.setattr(np, "savez", savez_while_another_writer_saves)
    _tiny_statistics(1.0).save(path)
    assert nested and fid.FIDStatistics.load(path).mu[0] == 1.0  # the last rename wins, whole
    assert [p for p in os.listdir(tmp_path) if p != "stats.npz"] == []


def _fake_extractor(images):
    return images.float().flatten(1)[:, : fid.FEATURE_DIM]


def test_fid_statistics_cache_unwritable_is_a_warning_and_unreadable_is_recomputed(tmp_path, monkeypatch):
    (tmp_path / "not_a_folder").write_text("")
    monkeypatch.setenv("DDPM_HF_CACHE", str(tmp_path / "not_a_folder"))
    with pytest.warns(UserWarning, match="could not cache the FID statistics .*DDPM_HF_CACHE"):
        stats = fid.resolve_statistics("builtin:cifar10-1k", resolution=32, max_images=4, extractor=_fake_extractor, progress=False)
    assert stats.num_images == 4 and "file" not in stats.info

    monkeypatch.setenv("DDPM_HF_CACHE", str(tmp_path / "cache"))
    cached = fid.stats_cache_path("builtin:cifar10-1k", "train", 32, 4)
    os.makedirs(os.path.dirname(cached))
    with open(cached, "wb") as f:
        f.write(b"PK\x03\x04 half a zip file")
    with pytest.warns(UserWarning, match="unreadable cached statistics"):
        again = fid.resolve_statistics("builtin:cifar10-1k", resolution=32, max_images=4, extractor=_fake_extractor, progress=False)
    np.testing.assert_array_equal(again.mu, stats.mu)
    np.testing.assert_array_equal(fid.FIDStatistics.load(cached).mu, stats.mu)  # and the cache is whole again

"""Every source knows its splits and refuses one it does not have, listing those it has, by one rule (issue 24):
the splits `datasets` gives the same source. A built-in subset or a single file names no split, so it has only
"train"; asking it for "test" must not return its training images under a test name."""

import io
import os
import re
import subprocess
import sys

import datasets
import numpy as np
import pytest
from PIL import Image

from ddpm_hf import cli, fid
from ddpm_hf.data import builtin_datasets, load_image_dataset
from ddpm_hf.errors import UserError


@pytest.fixture(autouse=True)
def private_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("DDPM_HF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))


def refusal(name: str, split: str, has: str, option: str = "--dataset") -> str:
    return "^" + re.escape(f"{option} {name} has no split {split!r}; it has: {has}. Pass --split NAME.") + "$"


def _images(rows: int, first: int = 0) -> datasets.Dataset:
    images = [Image.fromarray(np.full((4, 4, 3), first + i, np.uint8)) for i in range(rows)]
    return datasets.Dataset.from_dict({"img": images}, features=datasets.Features({"img": datasets.Image()}))


def _parquet_bytes(rows: int, first: int) -> bytes:
    buffer = io.BytesIO()
    _images(rows, first).to_parquet(buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("split", ["test", "nonsense"])
def test_a_builtin_subset_has_only_its_train_split(split):
    with pytest.raises(UserError, match=refusal("builtin:cifar10-1k", split, "train")):
        load_image_dataset("builtin:cifar10-1k", split)
    assert len(load_image_dataset("builtin:cifar10-1k", "train")) == 1000


def test_a_single_parquet_file_has_only_the_train_split(tmp_path):
    _images(3).to_parquet(str(tmp_path / "rows.parquet"))
    with pytest.raises(UserError, match=refusal(str(tmp_path / "rows.parquet"), "test", "train", option="--reference")):
        load_image_dataset(str(tmp_path / "rows.parquet"), "test", option="--reference")
    assert len(load_image_dataset(str(tmp_path / "rows.parquet"), "train")) == 3


def test_a_save_to_disk_folder_has_the_splits_it_was_saved_with(tmp_path):
    datasets.DatasetDict({"train": _images(3), "validation": _images(2)}).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(UserError, match=refusal(str(tmp_path / "dict"), "test", "train, validation")):
        load_image_dataset(str(tmp_path / "dict"), "test")
    assert len(load_image_dataset(str(tmp_path / "dict"), "validation")) == 2

    # One Dataset saved from a split keeps that split's name; one that never had a split is "train".
    _images(3).to_parquet(str(tmp_path / "test.parquet"))
    datasets.load_dataset("parquet", data_files={"test": str(tmp_path / "test.parquet")}, split="test").save_to_disk(str(tmp_path / "test_split"))
    with pytest.raises(UserError, match=refusal(str(tmp_path / "test_split"), "train", "test")):
        load_image_dataset(str(tmp_path / "test_split"), "train")
    assert len(load_image_dataset(str(tmp_path / "test_split"), "test")) == 3
    _images(4).save_to_disk(str(tmp_path / "no_split"))
    with pytest.raises(UserError, match=refusal(str(tmp_path / "no_split"), "test", "train")):
        load_image_dataset(str(tmp_path / "no_split"), "test")
    assert len(load_image_dataset(str(tmp_path / "no_split"), "train")) == 4


def test_fid_stats_of_a_split_the_dataset_lacks_is_refused_and_caches_nothing(capsys):
    with pytest.raises(SystemExit) as exit_status:
        cli.main(["fid-stats", "--dataset", "builtin:cifar10-1k", "--split", "test", "--resolution", "32", "--device", "cpu"])
    assert exit_status.value.code == 2
    assert capsys.readouterr().err.strip() == "error: --dataset builtin:cifar10-1k has no split 'test'; it has: train. Pass --split NAME."
    assert not os.path.exists(fid.stats_cache_path("builtin:cifar10-1k", "test", 32))


def test_the_bound_on_the_default_test_split_of_a_train_only_dataset_is_refused(tmp_path, capsys):
    """`evaluate --metric nll` defaults to --split test: on builtin:cifar10-1k that was a "held-out" bound on training images."""
    from conftest import MICRO_UNET
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    DDPMPipeline(unet=UNet2DModel(**MICRO_UNET, sample_size=8), scheduler=DDPMScheduler(num_train_timesteps=10)).save_pretrained(tmp_path / "model")
    command = ["evaluate", "--model", str(tmp_path / "model"), "--metric", "nll", "--dataset", "builtin:cifar10-1k", "--output", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_status:
        cli.main([*command, "--device", "cpu", "--num_images", "2"])
    assert exit_status.value.code == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]  # after the pipeline's loading bar
    assert last_line == "error: --dataset builtin:cifar10-1k has no split 'test'; it has: train. Pass --split NAME."
    assert not (tmp_path / "out" / "eval.json").exists()


def test_an_image_folder_for_fid_is_read_by_its_splits(tmp_path):
    """The folder that trains as train/ + test/ is measured by split too, not as one pile of both."""
    for split, value, count in (("train", 10, 3), ("test", 200, 2)):
        (tmp_path / "pictures" / split).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(tmp_path / "pictures" / split / f"{i}.png")
    folder = str(tmp_path / "pictures")
    test = fid.load_image_folder(folder, split="test", progress=False)
    assert test.shape == (2, 3, 8, 8) and test.unique().tolist() == [200]
    assert fid.load_image_folder(folder, split="train", progress=False).unique().tolist() == [10]
    with pytest.raises(UserError, match=refusal(folder, "validation", "test, train", option="--reference")):
        fid.resolve_statistics(folder, "validation", option="--reference", progress=False)
    # A folder that names no split (samples) is all "train", as for training.
    samples = fid.load_image_folder(str(tmp_path / "pictures" / "test"), split="train", progress=False)
    assert samples.shape[0] == 2


_LOAD_FROM_THE_HUB = """
import sys
from ddpm_hf.data import load_image_dataset
from ddpm_hf.errors import UserError

test = load_image_dataset("alice/tiny", "test")
print(len(test), test[0]["img"].getpixel((0, 0))[0])
try:
    load_image_dataset("alice/tiny", "nonsense")
except UserError as error:
    print(error)
"""


def test_a_hub_dataset_has_the_splits_of_its_data_files_and_only_the_asked_one_is_downloaded(hub_server, tmp_path):
    hub_server.add_dataset("alice/tiny", {"data/train-00000-of-00001.parquet": _parquet_bytes(3, 0), "data/test-00000-of-00001.parquet": _parquet_bytes(2, 50)})
    env = dict(hub_server.env, DDPM_HF_CACHE=str(tmp_path / "cache"), HF_DATASETS_CACHE=str(tmp_path / "hf_datasets"), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", _LOAD_FROM_THE_HUB], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines() == ["2 50", "--dataset alice/tiny has no split 'nonsense'; it has: test, train. Pass --split NAME."]
    downloaded = {r.path.split("?")[0].rsplit("/", 1)[-1] for r in hub_server.requests_to("/datasets/alice/tiny/resolve/", "GET")}
    assert "test-00000-of-00001.parquet" in downloaded and "train-00000-of-00001.parquet" not in downloaded


def test_the_builtin_subset_is_one_file(tmp_path):
    """What the rule for a single file rests on: `datasets` names the rows of a file that names no split "train"."""
    assert list(datasets.load_dataset("parquet", data_files=builtin_datasets()["cifar10-1k"])) == ["train"]

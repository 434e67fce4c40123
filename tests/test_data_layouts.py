"""A local folder has the splits that `datasets.load_dataset(folder)` finds in it, whatever its layout."""

import re

import datasets
import numpy as np
import pytest
from PIL import Image

from ddpm_hf.data import load_image_dataset
from ddpm_hf.errors import UserError


@pytest.fixture(autouse=True)
def private_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("DDPM_HF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))


def _parquet(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    images = [Image.fromarray(np.full((4, 4, 3), i, np.uint8)) for i in range(rows)]
    datasets.Dataset.from_dict({"img": images}, features=datasets.Features({"img": datasets.Image()})).to_parquet(str(path))


def _pngs(folder, rows):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(rows):
        Image.fromarray(np.full((4, 4, 3), i, np.uint8)).save(folder / f"{i}.png")


_README_WITH_CONFIGS = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: "first*.parquet"
  - split: holdout
    path: "second*.parquet"
---
"""

# A clone of a Hub dataset repo (uoft-cs/cifar10's layout): a named config and recorded split sizes.
_README_OF_A_HUB_CLONE = """---
dataset_info:
  config_name: plain_text
  features:
  - name: img
    dtype: image
  splits:
  - name: train
    num_examples: 4
  - name: test
    num_examples: 2
configs:
- config_name: plain_text
  data_files:
  - split: train
    path: plain_text/train-*
  - split: test
    path: plain_text/test-*
  default: true
---
"""

# layout -> {relative path: rows}; a path ending in "/" is a folder of that many PNG files
LAYOUTS = {
    "train.parquet and test.parquet": {"train.parquet": 5, "test.parquet": 3},
    "hub shards": {"train-00000-of-00002.parquet": 2, "train-00001-of-00002.parquet": 3, "test-00000-of-00001.parquet": 1},
    "data/ shards": {"data/train-00000-of-00001.parquet": 4, "data/validation-00000-of-00001.parquet": 2},
    "split folders of parquet": {"train/a.parquet": 3, "train/b.parquet": 2, "test/a.parquet": 1},
    "split names by synonym": {"training.parquet": 3, "dev.parquet": 2, "testing.parquet": 1},
    "a single file": {"everything.parquet": 4},
    "a nested file naming no split": {"some/where/rows.parquet": 3},
    "train/ and test/ image folders": {"train/": 4, "test/": 2},
    "class folders inside split folders": {"train/cat/": 2, "train/dog/": 3, "test/cat/": 1},
    "a flat image folder": {"./": 3},
    "README configs": {"README.md": _README_WITH_CONFIGS, "first-0.parquet": 3, "second-0.parquet": 2},
    "clone of a Hub repo": {"README.md": _README_OF_A_HUB_CLONE, "plain_text/train-00000-of-00001.parquet": 4, "plain_text/test-00000-of-00001.parquet": 2},
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_local_folder_has_the_splits_that_datasets_finds(tmp_path, layout):
    root = tmp_path / "dataset"
    root.mkdir()
    for relative, rows in LAYOUTS[layout].items():
        if isinstance(rows, str):
            (root / relative).write_text(rows)
        elif relative.endswith("/"):
            _pngs(root / relative, rows)
        else:
            _parquet(root / relative, rows)
    theirs = datasets.load_dataset(str(root))
    assert len(theirs) >= 1
    for split, expected in theirs.items():
        assert len(load_image_dataset(str(root), split)) == len(expected), split
    with pytest.raises(UserError, match=re.escape(f"has no split 'nosuchsplit'; it has: {', '.join(sorted(theirs))}. Pass --split NAME.")):
        load_image_dataset(str(root), "nosuchsplit")


def test_a_folder_of_files_that_hold_no_images_is_refused(tmp_path):
    (tmp_path / "notes.csv").write_text("a,b\n1,2\n")
    with pytest.raises(UserError, match="holds no images, parquet files or save_to_disk dataset"):
        load_image_dataset(str(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no images, parquet files or save_to_disk dataset"):
        load_image_dataset(str(tmp_path / "empty"))

"""One of each small helper that several modules need (issue 21): the cache folder, the atomic writer, the list of
image extensions and image opening, each in one place (ddpm_hf/files.py, ddpm_hf/data.py) and no copy elsewhere."""

from __future__ import annotations

import ast
import os

import datasets
import numpy as np
import pytest
from PIL import Image

import ddpm_hf
from ddpm_hf import data, fid, files, inception_weights

PACKAGE_DIR = os.path.dirname(ddpm_hf.__file__)
SOURCES = {name[:-3]: open(os.path.join(PACKAGE_DIR, name)).read() for name in sorted(os.listdir(PACKAGE_DIR)) if name.endswith(".py")}


def test_atomic_write_gives_the_whole_new_file_or_keeps_the_old_one(tmp_path):
    path = tmp_path / "state.json"
    path.write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with files.atomic_write(str(path), "w") as f:
            f.write("half of the n")
            raise KeyboardInterrupt
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["state.json"]
    with files.atomic_write(str(path), "w") as f:
        f.write("new")
        f.flush()
        assert path.read_text() == "old"  # not visible until complete
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["state.json"]


def test_every_cache_is_under_the_one_cache_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("DDPM_HF_CACHE", str(tmp_path / "cache"))
    root = files.cache_root()
    assert root == str(tmp_path / "cache")
    dataset = datasets.Dataset.from_dict({"img": [np.zeros((2, 2, 3), np.uint8)]}, features=datasets.Features({"img": datasets.Image()}))
    assert os.path.dirname(data._decoded_cache_path(dataset, "img", 8, "error")) == os.path.join(root, "decoded")
    assert fid.cache_dir() == os.path.join(root, "fid-stats")
    assert inception_weights.cache_dir() == os.path.join(root, "inception")
    monkeypatch.delenv("DDPM_HF_CACHE")
    from huggingface_hub.constants import HF_HOME

    assert files.cache_root() == os.path.join(HF_HOME, "ddpm_hf")


def _string_tuples(source: str) -> list[tuple[str, ...]]:
    return [
        tuple(e.value for e in node.elts)
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Tuple) and node.elts and all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts)
    ]


def test_no_copy_of_the_shared_helpers_remains():
    # the cache folder: one module reads DDPM_HF_CACHE and HF_HOME
    assert [m for m, text in SOURCES.items() if "import HF_HOME" in text] == ["files"]
    assert [m for m, text in SOURCES.items() if 'environ.get("DDPM_HF_CACHE"' in text] == ["files"]
    # the atomic writer: the cache and run-folder modules name and rename no file of their own
    for module in ("data", "fid", "inception_weights", "run_folder"):
        assert "os.replace(" not in SOURCES[module] and ".partial-{" not in SOURCES[module], module
    # the image extensions: one list
    holders = [m for m, text in SOURCES.items() for t in _string_tuples(text) if ".png" in t and ".jpg" in t]
    assert holders == ["data"]
    # image opening (and anything else): no module imports another's private name
    private = [
        (m, alias.name)
        for m, text in SOURCES.items()
        for node in ast.walk(ast.parse(text))
        if isinstance(node, ast.ImportFrom) and node.level == 1
        for alias in node.names
        if alias.name.startswith("_")
    ]
    assert private == []


def test_training_and_fid_take_the_same_image_files(tmp_path):
    """data.py and fid.py disagreed on .gif: a folder of GIFs trained but was no image folder for FID."""
    (tmp_path / "gifs").mkdir()
    for i in range(2):
        Image.fromarray(np.full((4, 4), 40 * i, np.uint8)).save(tmp_path / "gifs" / f"{i}.gif")
    assert len(data.load_image_dataset(str(tmp_path / "gifs"))) == 2
    assert fid.is_image_folder(str(tmp_path / "gifs"))
    assert fid.load_image_folder(str(tmp_path / "gifs"), progress=False).shape == (2, 3, 4, 4)

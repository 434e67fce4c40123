"""Pushing to and pulling from the Hub, against the local Hub-compatible server of tests/hub_server.py.

`HubPusher` runs in this process with `endpoint=hub_server.url`; `ddpm-hf push` and everything that loads with
diffusers' `from_pretrained` run in subprocesses whose HF_ENDPOINT points at the server (it is read at import).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import huggingface_hub
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel
from huggingface_hub import HfApi, ModelCard, hf_hub_download
from huggingface_hub.errors import RepositoryNotFoundError
from huggingface_hub.utils import validate_repo_id
from PIL import Image

from ddpm_hf import training
from ddpm_hf.cli import main
from ddpm_hf.config import config_from_dict
from ddpm_hf.errors import UserError
from ddpm_hf.hub import HubPusher, default_repo_name
from ddpm_hf.model_card import build_model_card
from ddpm_hf.repo_contents import ALLOWED, CUSTOM_PIPELINE_FILENAME, default_custom_pipeline_file, files_to_upload
from ddpm_hf.run_folder import EVAL_FILE, TRAINING_CONFIG, RunFolder

REPO_ROOT = Path(__file__).resolve().parents[1]

# What a push of `make_output_dir(...)` must put in the repo, and nothing more.
EXPECTED_FILES = {
    "README.md",
    "model_index.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "scheduler/scheduler_config.json",
    "samples/step_0000600.png",
    "training_config.json",
    "eval.json",
    CUSTOM_PIPELINE_FILENAME,
}


# An eval.json FID result as `ddpm-hf evaluate` writes it (run_folder.FID_RESULT_KEYS).
FID_RESULT = {"fid": 123.4567, "num_samples": 1000, "scheduler": "ddim", "steps": 50, "nfe": 50, "seed": 0, "reference": "uoft-cs/cifar10 train"}


def tiny_unet(seed: int) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=16,
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    )


def save_pipeline(output_dir: Path, seed: int) -> None:
    """The pipeline of `tiny_unet(seed)` saved as training saves it, replacing the previous one."""
    training.save_pipeline(tiny_unet(seed), DDPMScheduler(num_train_timesteps=1000), str(output_dir))


def make_output_dir(path: Path, seed: int = 0, evaluation: bool = True) -> Path:
    """An OUTPUT_DIR as a quickstart run leaves it: pipeline, config, samples, checkpoints, logs, plots, eval."""
    path.mkdir(parents=True, exist_ok=True)
    save_pipeline(path, seed)
    # At the size of tiny_unet, as training records it.
    config_from_dict({"preset": "quickstart", "resolution": 16, "output_dir": str(path), "hub_token": "hf_must_never_be_uploaded"}).save(
        path / "training_config.json"
    )
    (path / "samples").mkdir()
    for step, color in ((300, "red"), (600, "blue")):
        Image.new("RGB", (64, 64), color).save(path / "samples" / f"step_{step:07d}.png")
    checkpoint = path / "checkpoints" / "checkpoint-0000600"
    checkpoint.mkdir(parents=True)
    (checkpoint / "optimizer.bin").write_bytes(os.urandom(256))
    (checkpoint / "model.safetensors").write_bytes(os.urandom(256))
    (path / "logs").mkdir()
    (path / "logs" / "events.out.tfevents.1.host").write_bytes(b"log")
    (path / "best").mkdir()
    (path / "best" / "model_index.json").write_text("{}")
    Image.new("RGB", (8, 8)).save(path / "loss.png")
    if evaluation:
        RunFolder(path).write_eval(FID_RESULT)
    return path


def pusher(hub_server, output_dir, repo_id="alice/tiny-ddpm", **kwargs) -> HubPusher:
    kwargs.setdefault("token", hub_server.token)
    kwargs.setdefault("backoff", 0.01)
    token = kwargs.pop("token")
    private = kwargs.pop("private", False)
    return HubPusher(repo_id, token, private, output_dir, endpoint=hub_server.url, **kwargs)


def digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def run_python(code: str, env: dict, timeout: int = 240) -> subprocess.CompletedProcess:
    env = dict(env, PYTHONPATH=str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)


def run_cli(args: list[str], env: dict, timeout: int = 240) -> subprocess.CompletedProcess:
    return run_python(f"import sys; from ddpm_hf.cli import main; sys.exit(main({args!r}))", env, timeout)


def cli_in_process(args: list[str], endpoint: str, monkeypatch, capsys) -> tuple[int, str, str]:
    """`ddpm-hf ARGS` in this process against `endpoint`: (exit status, stdout, stderr). Faster than `run_cli`."""
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)  # what HF_ENDPOINT sets at import
    try:
        status = main(args)
    except SystemExit as exit:
        status = exit.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


# ---- what is uploaded -----------------------------------------------------------------------------


def test_files_to_upload_is_exactly_the_allowed_set(tmp_path):
    output_dir = make_output_dir(tmp_path / "run")
    assert set(files_to_upload(output_dir)) == EXPECTED_FILES
    assert default_custom_pipeline_file() == REPO_ROOT / "pipelines" / CUSTOM_PIPELINE_FILENAME

    # No eval.json, no samples: nothing made up.
    (output_dir / "eval.json").unlink()
    for grid in (output_dir / "samples").iterdir():
        grid.unlink()
    assert set(files_to_upload(output_dir)) == EXPECTED_FILES - {"eval.json", "samples/step_0000600.png"}
    assert "checkpoints/*" not in ALLOWED and "logs/*" not in ALLOWED


def test_a_wheel_install_ships_the_custom_pipeline_and_the_card_template(tmp_path):
    # A non-editable install has no pipelines/ beside the package: setup.cfg maps it into the wheel as
    # ddpm_hf/pipelines/, where default_custom_pipeline_file() looks first. The card's template is package data.
    pytest.importorskip("setuptools")
    source, wheel_dir, site = tmp_path / "source", tmp_path / "wheel", tmp_path / "site"
    # Build from a copy: setuptools writes build/ and *.egg-info beside the sources.
    for folder in ("ddpm_hf", "pipelines"):
        shutil.copytree(REPO_ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for file in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / file, source / file)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q", "-w", str(wheel_dir)],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    (wheel,) = wheel_dir.glob("ddpm_hf-*.whl")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", str(wheel), "--no-deps", "-q", "--target", str(site)],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    found = subprocess.run(
        [sys.executable, "-c", "from ddpm_hf.repo_contents import default_custom_pipeline_file as f; print(f())"],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(site)},
    ).stdout.strip()
    assert Path(found) == site / "ddpm_hf" / "pipelines" / CUSTOM_PIPELINE_FILENAME
    assert Path(found).read_bytes() == (REPO_ROOT / "pipelines" / CUSTOM_PIPELINE_FILENAME).read_bytes()
    # The model card's template, and what `ddpm-hf push --space` uploads (ddpm_hf/space.py).
    for shipped in (Path("templates") / "model_card.md.jinja", Path("templates") / "space_readme.md.jinja", Path("space_app") / "app.py"):
        assert (site / "ddpm_hf" / shipped).read_bytes() == (REPO_ROOT / "ddpm_hf" / shipped).read_bytes()


def test_push_uploads_only_the_allowed_files(hub_server, tmp_path):
    output_dir = make_output_dir(tmp_path / "run")
    hub = pusher(hub_server, output_dir)
    assert hub.check() == "alice/tiny-ddpm"
    hub.push_final(600)

    files = hub_server.repo_files("alice/tiny-ddpm")
    assert set(files) == EXPECTED_FILES | {".gitattributes"}
    uploaded = {path for commit in hub_server.uploads["alice/tiny-ddpm"] for path in commit}
    assert uploaded == EXPECTED_FILES
    assert files["unet/diffusion_pytorch_model.safetensors"] == (output_dir / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert files[CUSTOM_PIPELINE_FILENAME] == default_custom_pipeline_file().read_bytes()
    assert b"hf_must_never_be_uploaded" not in b"".join(files.values())
    assert json.loads(files["training_config.json"])["model"] == "tiny"

    # A later push sends the newer grid and removes the old one: the repo keeps only the latest.
    Image.new("RGB", (64, 64), "green").save(output_dir / "samples" / "step_0000900.png")
    hub.push_final(900)
    files = hub_server.repo_files("alice/tiny-ddpm")
    assert {p for p in files if p.startswith("samples/")} == {"samples/step_0000900.png"}
    assert b"samples/step_0000900.png" in files["README.md"]


def test_model_card_parses_and_carries_the_metadata(hub_server, tmp_path):
    output_dir = make_output_dir(tmp_path / "run")
    hub = pusher(hub_server, output_dir, hardware="1 x Test GPU")
    hub.check()
    hub.push_final(600)

    readme = tmp_path / "README.md"
    readme.write_bytes(hub_server.repo_files("alice/tiny-ddpm")["README.md"])
    card = ModelCard.load(readme)
    assert card.data.library_name == "diffusers"
    assert card.data.pipeline_tag == "unconditional-image-generation"
    assert {"ddpm", "diffusers", "pytorch"} <= set(card.data.tags)
    assert card.data.datasets == ["uoft-cs/cifar10"]  # builtin:cifar10-1k is a subset of it
    assert card.data.license == "apache-2.0"
    (result,) = card.data.eval_results
    assert (result.task_type, result.metric_type, result.metric_value) == ("unconditional-image-generation", "fid", 123.4567)
    assert card.data.to_dict()["model-index"][0]["results"][0]["metrics"][0]["type"] == "fid"

    n_parameters = sum(p.numel() for p in tiny_unet(0).parameters())
    text = card.text
    assert f"{n_parameters:,}" in text
    assert "DDPMScheduler" in text and "T = 1000" in text
    batch = json.loads((output_dir / "training_config.json").read_text())["train_batch_size"]
    assert "| Training steps | 600 |" in text and f"| Batch size | {batch} (global) |" in text and "| Hardware | 1 x Test GPU |" in text
    assert "![samples](samples/step_0000600.png)" in text
    assert 'DDPMPipeline.from_pretrained("alice/tiny-ddpm")' in text
    assert 'custom_pipeline="ddpm_trajectory"' in text

    # Without an evaluation the card has no model-index.
    (output_dir / "eval.json").unlink()
    card = build_model_card(output_dir, "alice/tiny-ddpm")
    assert card.data.eval_results is None and "model-index" not in str(card)


# ---- tokens and repos -----------------------------------------------------------------------------


def test_private_repo_needs_the_token(hub_server, tmp_path):
    output_dir = make_output_dir(tmp_path / "run")
    hub = pusher(hub_server, output_dir, repo_id="alice/secret-ddpm", private=True)
    hub.check()
    hub.push_final(600)
    assert hub_server.repos["alice/secret-ddpm"].private

    api = HfApi(endpoint=hub_server.url)
    with pytest.raises(RepositoryNotFoundError) as error:
        hf_hub_download("alice/secret-ddpm", "model_index.json", endpoint=hub_server.url, token=False, cache_dir=tmp_path / "c1")
    assert error.value.response.status_code == 401
    with pytest.raises(RepositoryNotFoundError) as error:  # another account does not see it either
        api.model_info("alice/secret-ddpm", token=hub_server.other_token)
    assert error.value.response.status_code == 404
    path = hf_hub_download("alice/secret-ddpm", "model_index.json", endpoint=hub_server.url, token=hub_server.token, cache_dir=tmp_path / "c2")
    assert json.loads(Path(path).read_text())["_class_name"] == "DDPMPipeline"
    assert api.model_info("alice/secret-ddpm", token=hub_server.token).private


def test_the_given_token_is_used_for_every_call(hub_server, tmp_path, monkeypatch):
    # HF_TOKEN holds another account's token: the explicit one must win, on every request.
    monkeypatch.setenv("HF_TOKEN", hub_server.other_token)
    output_dir = make_output_dir(tmp_path / "run")
    hub = pusher(hub_server, output_dir)
    hub.check()
    hub.push_in_background(300)
    hub.wait()
    hub.push_final(600)
    requests = [r for r in hub_server.requests if not r.path.startswith("/__lfs/")]  # pre-signed LFS uploads carry no token
    assert len(requests) > 8
    assert {r.token for r in requests} == {hub_server.token}
    assert len(hub_server.commit_shas("alice/tiny-ddpm")) == 3  # initial commit + 2 pushes


def test_token_from_the_environment(hub_server, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", hub_server.token)
    output_dir = make_output_dir(tmp_path / "ddpm-quick")
    hub = pusher(hub_server, output_dir, repo_id=None, token=None)
    assert hub.check() == "alice/ddpm-quick"  # default repo: <user>/<folder name>
    hub.push_final()
    assert {r.token for r in hub_server.requests if not r.path.startswith("/__lfs/")} == {hub_server.token}

    monkeypatch.setenv("HF_TOKEN", "hf_not_a_token")
    with pytest.raises(UserError, match="rejected the token from HF_TOKEN"):
        pusher(hub_server, output_dir, token=None).check()
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(UserError, match="needs a token.*--hub_token.*HF_TOKEN.*hf auth login"):
        pusher(hub_server, output_dir, token=None).check()


@pytest.mark.parametrize(
    "token_kind, repo_id, message",
    [
        ("bad", "alice/tiny-ddpm", r"rejected the token given with --hub_token \(HTTP 401.*Invalid user token.*https://huggingface.co/settings/tokens"),
        ("read", "alice/tiny-ddpm", r"read-only"),
        ("good", "alice/bad name", r"--hub_model_id 'alice/bad name' is not a valid repo id"),
        ("good", "alice/x/y", r"not a valid repo id"),
        ("good", "bob/tiny-ddpm", r"belongs to 'alice', who cannot push to the namespace 'bob'.*--hub_model_id alice/tiny-ddpm"),
    ],
)
def test_bad_token_or_repo_id_fails_at_check_in_seconds(hub_server, tmp_path, token_kind, repo_id, message):
    token = {"bad": "hf_typo", "read": hub_server.read_token, "good": hub_server.token}[token_kind]
    hub = pusher(hub_server, tmp_path / "run", repo_id=repo_id, token=token)
    start = time.monotonic()
    with pytest.raises(UserError, match=message):
        hub.check()
    assert time.monotonic() - start < 5
    assert hub_server.repos == {}
    assert not hub_server.requests_to("/api/models/")  # nothing was uploaded


def test_check_accepts_an_org_and_an_existing_repo(hub_server, tmp_path):
    hub_server.create_repo("ddpm-org/shared")
    assert pusher(hub_server, tmp_path, repo_id="ddpm-org/shared").check() == "ddpm-org/shared"
    assert pusher(hub_server, tmp_path, repo_id="ddpm-org/new").check() == "ddpm-org/new"
    assert set(hub_server.repos) == {"ddpm-org/shared", "ddpm-org/new"}


def test_push_to_a_branch(hub_server, tmp_path):
    output_dir = make_output_dir(tmp_path / "run")
    hub = pusher(hub_server, output_dir, revision="experiment")
    hub.check()
    sha = hub.push_final(600)
    repo = hub_server.repos["alice/tiny-ddpm"]
    assert repo.branches["experiment"] == sha != repo.branches["main"]
    assert set(hub_server.repo_files("alice/tiny-ddpm", "main")) == {".gitattributes"}
    assert set(hub_server.repo_files("alice/tiny-ddpm", "experiment")) == EXPECTED_FILES | {".gitattributes"}


def test_push_to_a_branch_tells_how_to_load_that_branch(hub_server, tmp_path, monkeypatch, capsys):
    # main holds no pipeline: a snippet without the revision would fail.
    output_dir = make_output_dir(tmp_path / "run")
    args = ["push", str(output_dir), "--repo_id", "alice/tiny-ddpm", "--token", hub_server.token, "--revision", "dev"]
    status, out, err = cli_in_process(args, hub_server.url, monkeypatch, capsys)
    assert status == 0, err
    assert 'DDPMPipeline.from_pretrained("alice/tiny-ddpm", revision="dev")' in out
    assert "`ddpm-hf sample --model alice/tiny-ddpm --revision dev`" in out
    assert set(hub_server.repo_files("alice/tiny-ddpm", "main")) == {".gitattributes"}

    card = hub_server.repo_files("alice/tiny-ddpm", "dev")["README.md"].decode()
    loads = re.findall(r"from_pretrained\(([^)]*)\)", card)
    assert len(loads) == 3  # DDPM, DDIM and the custom pipeline
    assert all(call.startswith('"alice/tiny-ddpm", revision="dev"') for call in loads), loads
    assert "`ddpm-hf sample --model alice/tiny-ddpm --revision dev`" in card

    # On main, the snippets stay as short as before.
    card = str(build_model_card(output_dir, "alice/tiny-ddpm", revision="main"))
    assert "revision" not in card and 'DDPMPipeline.from_pretrained("alice/tiny-ddpm")' in card


@pytest.mark.parametrize(
    "folder, name",
    [
        ("my run (v2)", "my-run-v2"),
        ("Modèle  final!!", "Modele-final"),
        ("..--..", "ddpm"),
        ("x" * 120, "x" * 96),
        ("run.git", "run"),
        ("ddpm-cifar10", "ddpm-cifar10"),
    ],
)
def test_default_repo_name_is_a_valid_repo_id(folder, name):
    assert default_repo_name(Path("/somewhere") / folder) == name
    validate_repo_id(f"alice/{name}")


def test_check_derives_a_valid_repo_id_from_any_folder_name(hub_server, tmp_path):
    output_dir = make_output_dir(tmp_path / "my run (v2)")
    hub = pusher(hub_server, output_dir, repo_id=None)
    assert hub.check() == "alice/my-run-v2"
    hub.push_final(600)
    assert "model_index.json" in hub_server.repo_files("alice/my-run-v2")


# ---- failures -------------------------------------------------------------------------------------


def test_periodic_push_failure_does_not_stop_training_and_final_push_retries(hub_server, tmp_path, caplog):
    output_dir = make_output_dir(tmp_path / "run")
    hub = pusher(hub_server, output_dir)
    hub.check()
    commit_route = "/api/models/alice/tiny-ddpm/commit/"

    hub_server.fail_next(1, status=503, path_prefix=commit_route)
    with caplog.at_level(logging.WARNING, logger="ddpm_hf.hub"):
        hub.push_in_background(300)  # must not raise
        hub.wait()
    assert "background push of step 300" in caplog.text and "503" in caplog.text and "Training goes on" in caplog.text
    assert len(hub_server.commit_shas("alice/tiny-ddpm")) == 1  # nothing committed

    hub_server.fail_next(2, status=502, path_prefix=commit_route)
    hub.push_final(600)
    assert len(hub_server.requests_to(commit_route, "POST")) == 1 + 3  # the failed periodic push + 2 failures + success
    assert set(hub_server.repo_files("alice/tiny-ddpm")) == EXPECTED_FILES | {".gitattributes"}


def test_failed_final_push_is_a_user_error_that_says_how_to_retry(hub_server, tmp_path):
    output_dir = make_output_dir(tmp_path / "run")
    before = digest(output_dir)
    hub = pusher(hub_server, output_dir, max_retries=2)
    hub.check()
    hub_server.fail_next(3, status=503, path_prefix="/api/models/alice/tiny-ddpm/commit/")
    with pytest.raises(UserError) as error:
        hub.push_final(600)
    message = str(error.value)
    assert "503" in message and "intact" in message
    assert f"ddpm-hf push {output_dir} --repo_id alice/tiny-ddpm" in message
    assert len(hub_server.requests_to("/api/models/alice/tiny-ddpm/commit/", "POST")) == 3
    assert digest(output_dir) == before

    # A 4xx is not retried.
    hub_server.fail_next(1, status=403, path_prefix="/api/models/alice/tiny-ddpm/commit/")
    with pytest.raises(UserError, match="403"):
        hub.push_final(600)
    assert len(hub_server.requests_to("/api/models/alice/tiny-ddpm/commit/", "POST")) == 4


def test_background_push_returns_at_once_and_pushes_a_snapshot(hub_server, tmp_path):
    output_dir = make_output_dir(tmp_path / "run")
    weights = output_dir / "unet" / "diffusion_pytorch_model.safetensors"
    weights_at_100 = weights.read_bytes()
    hub = pusher(hub_server, output_dir)
    hub.check()

    release = hub_server.pause("/api/models/alice/tiny-ddpm/commit/")
    start = time.monotonic()
    hub.push_in_background(100)
    hub.push_in_background(200)  # waits behind 100...
    save_pipeline(output_dir, seed=1)  # training goes on and overwrites the weights
    hub.push_in_background(300)  # ...and is replaced by 300
    assert time.monotonic() - start < 5
    release.set()
    hub.wait()

    repo = hub_server.repos["alice/tiny-ddpm"]
    titles = [repo.commits[sha].title for sha in reversed(hub_server.commit_shas("alice/tiny-ddpm"))]
    assert titles == ["initial commit", "Upload pipeline (step 100)", "Upload pipeline (step 300)"]
    first, latest = hub_server.commit_shas("alice/tiny-ddpm")[1], hub_server.commit_shas("alice/tiny-ddpm")[0]
    assert hub_server.repo_files("alice/tiny-ddpm", first)["unet/diffusion_pytorch_model.safetensors"] == weights_at_100
    assert hub_server.repo_files("alice/tiny-ddpm", latest)["unet/diffusion_pytorch_model.safetensors"] == weights.read_bytes() != weights_at_100


@pytest.mark.parametrize("links", [True, False], ids=["hard-links", "no-hard-links"])
def test_a_snapshot_links_what_the_writers_replace_and_copies_the_sample_grid(hub_server, tmp_path, monkeypatch, links):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # where the snapshots go
    (tmp_path / "tmp").mkdir()
    if not links:  # another file system, or one without hard links: everything is copied

        def no_link(source, target):
            raise OSError(errno.EXDEV, "Invalid cross-device link")

        monkeypatch.setattr(os, "link", no_link)
    output_dir = make_output_dir(tmp_path / "run")
    before = {path: (output_dir / path).read_bytes() for path in ("unet/diffusion_pytorch_model.safetensors", "eval.json", "samples/step_0000600.png")}
    hub = pusher(hub_server, output_dir)
    hub.check()
    release = hub_server.pause("/api/models/alice/tiny-ddpm/commit/")
    hub.push_in_background(600)

    (snapshot,) = (tmp_path / "tmp").glob("ddpm-hf-push-*/step-600-*")
    replaced = [
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "scheduler/scheduler_config.json",
        TRAINING_CONFIG,
        EVAL_FILE,
    ]
    for path in replaced:
        assert (os.stat(snapshot / path).st_ino == os.stat(output_dir / path).st_ino) == links, path
    assert os.stat(snapshot / "samples/step_0000600.png").st_ino != os.stat(output_dir / "samples/step_0000600.png").st_ino

    # Training goes on while the push waits: the pipeline and eval.json are replaced by their writers, and a resumed
    # run rewrites the sample grid of the same step in place. The push sends the files of step 600 as they were.
    save_pipeline(output_dir, seed=1)
    RunFolder(output_dir).write_eval(dict(FID_RESULT, fid=99.0))
    with open(output_dir / "samples/step_0000600.png", "r+b") as grid:
        Image.new("RGB", (64, 64), "green").save(grid, format="PNG")
    assert all((output_dir / path).read_bytes() != content for path, content in before.items())
    release.set()
    hub.wait()
    pushed = hub_server.repo_files("alice/tiny-ddpm")
    assert pushed["unet/diffusion_pytorch_model.safetensors"] == before["unet/diffusion_pytorch_model.safetensors"]
    assert json.loads(pushed["eval.json"])["fid"] == FID_RESULT["fid"]
    assert pushed["samples/step_0000600.png"] == before["samples/step_0000600.png"]
    assert not list((tmp_path / "tmp").glob("ddpm-hf-push-*/step-*"))  # the snapshot is gone once sent


def test_push_needs_a_pipeline_folder(hub_server, tmp_path):
    (tmp_path / "empty").mkdir()
    result = run_cli(["push", str(tmp_path / "empty"), "--repo_id", "alice/x", "--token", hub_server.token], hub_server.env)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "not a saved pipeline: missing model_index.json" in result.stderr
    assert hub_server.requests == []


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_unreachable_hub_advice_fits_the_command(hub_server, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(time, "sleep", lambda seconds: None)  # the retries' back-off
    output_dir = make_output_dir(tmp_path / "run")
    unreachable = _closed_port_url()

    # `ddpm-hf push`: there is no training to run without --push_to_hub; push again.
    args = ["push", str(output_dir), "--repo_id", "alice/tiny-ddpm", "--token", hub_server.token]
    status, _, err = cli_in_process(args, unreachable, monkeypatch, capsys)
    assert status == 2 and "Traceback" not in err
    (line,) = err.strip().splitlines()
    assert line.startswith(f"error: cannot reach the Hub at {unreachable}")
    assert "--push_to_hub" not in line
    assert line.endswith(f"then run `ddpm-hf push {output_dir} --repo_id alice/tiny-ddpm` again.")

    # Training: it may go on without the Hub.
    with pytest.raises(UserError, match=r"cannot reach the Hub.*train without --push_to_hub and push later with `ddpm-hf push OUTPUT_DIR`"):
        HubPusher("alice/tiny-ddpm", hub_server.token, False, output_dir, endpoint=unreachable, backoff=0.01).check()


def test_cli_push_with_a_rejected_token_fails_with_one_line(hub_server, tmp_path):
    output_dir = make_output_dir(tmp_path / "run")
    result = run_cli(["push", str(output_dir), "--repo_id", "alice/x", "--token", "hf_typo"], hub_server.env)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: the Hub rejected the token given with --token")
    assert hub_server.repos == {}


# ---- round trips through from_pretrained ---------------------------------------------------------

LOAD_AND_COMPARE = r"""
import json, sys, torch
from diffusers import DDIMPipeline, DDPMPipeline
from safetensors.torch import load_file

spec = json.loads({spec!r})

def same_weights(pipeline, local_dir):
    local = load_file(f"{{local_dir}}/unet/diffusion_pytorch_model.safetensors")
    remote = pipeline.unet.state_dict()
    return sorted(local) == sorted(remote) and all(torch.equal(local[k], remote[k]) for k in local)

def images(pipeline, steps):
    pipeline.set_progress_bar_config(disable=True)
    return pipeline(batch_size=2, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="np").images

result = {{}}
hub = DDPMPipeline.from_pretrained(spec["repo"])
local = DDPMPipeline.from_pretrained(spec["v2"])
result["main_weights_equal"] = same_weights(hub, spec["v2"])
result["main_images_equal"] = bool((images(hub, 5) == images(local, 5)).all())

old = DDIMPipeline.from_pretrained(spec["repo"], revision=spec["first_commit"])
old_local = DDIMPipeline.from_pretrained(spec["v1"])
result["revision_weights_equal"] = same_weights(old, spec["v1"])
result["revision_differs_from_main"] = not same_weights(old, spec["v2"])
result["revision_images_equal"] = bool((images(old, 5) == images(old_local, 5)).all())

# `ddpm-hf sample --model user/name` gives the same grid as from the local folder.
from ddpm_hf import training
from ddpm_hf.cli import main
for model, out in ((spec["repo"], spec["hub_png"]), (spec["v2"], spec["local_png"])):
    main(["sample", "--model", model, "--num_images", "2", "--steps", "4", "--out", out, "--device", "cpu"])
print("RESULT " + json.dumps(result))
"""


@pytest.mark.slow
def test_round_trip_push_then_from_pretrained_is_bit_identical(hub_server, tmp_path):
    v1 = make_output_dir(tmp_path / "v1", seed=0)
    v2 = make_output_dir(tmp_path / "v2", seed=1)
    repo = "alice/tiny-ddpm"
    first_commit = pusher(hub_server, v1, repo).push_final(300)
    result = run_cli(["push", str(v2), "--repo_id", repo, "--token", hub_server.token], hub_server.env)
    assert result.returncode == 0, result.stderr
    assert f"Pushed {v2} to {hub_server.url}/{repo}" in result.stdout
    assert hub_server.commit_shas(repo)[1] == first_commit

    # A fresh cache, no token: the repo is public.
    env = dict(hub_server.env, HF_HOME=str(tmp_path / "fresh_hf_home"))
    spec = {
        "repo": repo,
        "v1": str(v1),
        "v2": str(v2),
        "first_commit": first_commit,
        "hub_png": str(tmp_path / "hub.png"),
        "local_png": str(tmp_path / "local.png"),
    }
    result = run_python(LOAD_AND_COMPARE.format(spec=json.dumps(spec)), env)
    assert result.returncode == 0, result.stderr[-3000:]
    (line,) = [text for text in result.stdout.splitlines() if text.startswith("RESULT ")]
    assert json.loads(line[len("RESULT ") :]) == {
        "main_weights_equal": True,
        "main_images_equal": True,
        "revision_weights_equal": True,
        "revision_differs_from_main": True,
        "revision_images_equal": True,
    }
    assert any(r.path.startswith(f"/{repo}/resolve/{first_commit}/") for r in hub_server.requests)
    assert (tmp_path / "hub.png").read_bytes() == (tmp_path / "local.png").read_bytes()


LOAD_CUSTOM = r"""
import json, sys, torch
from diffusers import DDPMPipeline, DiffusionPipeline

repo = sys.argv[1]
pipe = DiffusionPipeline.from_pretrained(repo, custom_pipeline="ddpm_trajectory", trust_remote_code=True)
pipe.set_progress_bar_config(disable=True)
steps = []
def callback(pipeline, step_index, timestep, tensors):
    steps.append((step_index, int(timestep), tuple(tensors["x_t"].shape)))
    return None
out = pipe(batch_size=2, num_inference_steps=6, generator=torch.Generator().manual_seed(0), output_type="np",
           callback_on_step_end=callback, return_trajectory=True)
stock = DDPMPipeline.from_pretrained(repo)
stock.set_progress_bar_config(disable=True)
reference = stock(batch_size=2, num_inference_steps=6, generator=torch.Generator().manual_seed(0), output_type="np").images
print("RESULT " + json.dumps({
    "class": type(pipe).__name__,
    "callback_steps": [s[0] for s in steps],
    "callback_shapes": sorted({s[2] for s in steps}),
    "trajectory_length": len(out.trajectory_x_t),
    "same_images_as_stock": bool((out.images == reference).all()),
    "stock_class": type(stock).__name__,
}))
"""


@pytest.mark.slow
def test_custom_pipeline_loads_from_the_repo_and_returns_the_trajectory(hub_server, tmp_path):
    output_dir = make_output_dir(tmp_path / "run")
    hub = pusher(hub_server, output_dir)
    hub.check()
    hub.push_final(600)
    files = hub_server.repo_files("alice/tiny-ddpm")
    assert json.loads(files["model_index.json"])["_class_name"] == "DDPMPipeline"  # stock diffusers still loads it

    env = dict(hub_server.env, HF_HOME=str(tmp_path / "fresh_hf_home"))
    result = subprocess.run([sys.executable, "-c", LOAD_CUSTOM, "alice/tiny-ddpm"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    (line,) = [text for text in result.stdout.splitlines() if text.startswith("RESULT ")]
    assert json.loads(line[len("RESULT ") :]) == {
        "class": "DDPMTrajectoryPipeline",
        "callback_steps": [0, 1, 2, 3, 4, 5],
        "callback_shapes": [[2, 3, 16, 16]],
        "trajectory_length": 6,
        "same_images_as_stock": True,
        "stock_class": "DDPMPipeline",
    }
    # The code came from the repo, at the revision of the weights.
    assert any(r.path.endswith(f"/{CUSTOM_PIPELINE_FILENAME}") and "/resolve/" in r.path for r in hub_server.requests)


def test_push_retries_come_from_the_environment_and_a_bad_value_is_a_one_line_error(monkeypatch):
    from ddpm_hf.hub import DEFAULT_PUSH_RETRIES, push_retries

    monkeypatch.delenv("DDPM_HF_PUSH_RETRIES", raising=False)
    assert push_retries() == DEFAULT_PUSH_RETRIES
    monkeypatch.setenv("DDPM_HF_PUSH_RETRIES", "0")
    assert push_retries() == 0
    for bad in ("-1", "two", "1.5"):
        monkeypatch.setenv("DDPM_HF_PUSH_RETRIES", bad)
        with pytest.raises(UserError, match="DDPM_HF_PUSH_RETRIES=.*whole number"):
            push_retries()

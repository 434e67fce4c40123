"""Sharing a class-conditional run: the push adds the pipeline its model_index.json names (ddpm_class_conditional.py)
and an unconditional push removes it again; the card says how to load and guide it. Against the local Hub of
tests/hub_server.py; what loads with diffusers' `from_pretrained` runs in a subprocess whose HF_ENDPOINT points at it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel
from huggingface_hub import HfApi, ModelCard
from PIL import Image
from test_hub import FID_RESULT, cli_in_process, make_output_dir, pusher

import ddpm_hf.repo_contents as repo_contents
from ddpm_hf.conditioning import CONDITIONAL_PIPELINE_FILENAME, packaged_pipeline_file
from ddpm_hf.errors import UserError
from ddpm_hf.model_card import build_model_card
from ddpm_hf.repo_contents import CUSTOM_PIPELINE_FILENAME, conditional_pipeline_file, default_custom_pipeline_file, files_to_upload, is_allowed
from ddpm_hf.run_folder import EVAL_FILE, TRAINING_CONFIG, RunFolder
from ddpm_hf.training import save_pipeline

NAMES = ["cat", "dog", "cow"]
REPO = "alice/cond-ddpm"
PIPELINE_FILES = {"model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json"}
PACKAGED = packaged_pipeline_file(CONDITIONAL_PIPELINE_FILENAME)

pytestmark = pytest.mark.usefixtures("one_thread")


def make_conditional_dir(path: Path, class_names: list[str] | None = NAMES, classes: int = len(NAMES)) -> Path:
    """A class-conditional OUTPUT_DIR as training leaves it (save_pipeline), with a config and one sample grid.
    T = 100 so that the card's 50-step DDIM usage runs on it as written."""
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8,
        block_out_channels=(8, 16),
        norm_num_groups=4,
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        num_class_embeds=classes + 1,
    )
    save_pipeline(unet, DDPMScheduler(num_train_timesteps=100), str(path), class_names=class_names)
    RunFolder(path).write_training_config({"class_conditional": True, "label_dropout": 0.2, "dataset": "builtin:cifar10-1k", "train_batch_size": 8})
    (path / "samples").mkdir()
    Image.new("RGB", (8 * 2, 8 * classes), "red").save(RunFolder(path).sample_grid_path(10))  # one row per class
    return path


# ---- what is uploaded -----------------------------------------------------------------------------


def test_only_a_conditional_run_uploads_the_conditional_pipeline(tmp_path):
    conditional = make_conditional_dir(tmp_path / "cond")
    assert set(files_to_upload(conditional)) == PIPELINE_FILES | {
        "README.md",
        "samples/step_0000010.png",
        TRAINING_CONFIG,
        CUSTOM_PIPELINE_FILENAME,
        CONDITIONAL_PIPELINE_FILENAME,
    }
    assert is_allowed(CONDITIONAL_PIPELINE_FILENAME)  # so that a later push of another run may delete it
    assert conditional_pipeline_file(conditional) == PACKAGED  # the package's copy, not the folder's
    assert default_custom_pipeline_file() == packaged_pipeline_file(CUSTOM_PIPELINE_FILENAME)

    # An unconditional run never uploads it, even with a stray copy beside its (stock) model_index.json.
    unconditional = make_output_dir(tmp_path / "uncond", evaluation=False)
    (unconditional / CONDITIONAL_PIPELINE_FILENAME).write_text("# stale\n")
    assert CONDITIONAL_PIPELINE_FILENAME not in files_to_upload(unconditional)
    assert CUSTOM_PIPELINE_FILENAME in files_to_upload(unconditional)


def test_without_the_packaged_file_the_folders_copy_goes_up_and_without_either_the_push_refuses(tmp_path, monkeypatch):
    conditional = make_conditional_dir(tmp_path / "cond")
    monkeypatch.setattr(repo_contents, "packaged_pipeline_file", lambda name: None)
    assert conditional_pipeline_file(conditional) == conditional / CONDITIONAL_PIPELINE_FILENAME
    (conditional / CONDITIONAL_PIPELINE_FILENAME).unlink()
    with pytest.raises(UserError, match="reinstall ddpm-hf"):
        files_to_upload(conditional)


def test_an_unconditional_push_removes_the_conditional_pipeline_from_the_repo(hub_server, tmp_path, monkeypatch, capsys):
    conditional = make_conditional_dir(tmp_path / "cond")
    # `ddpm-hf push` of a conditional run tells how to load it: not with DDPMPipeline.
    status, out, err = cli_in_process(["push", str(conditional), "--repo_id", REPO, "--token", hub_server.token], hub_server.url, monkeypatch, capsys)
    assert status == 0, err
    assert 'DiffusionPipeline.from_pretrained("alice/cond-ddpm", custom_pipeline="ddpm_class_conditional", trust_remote_code=True)' in out
    assert "DDPMPipeline.from_pretrained" not in out
    files = hub_server.repo_files(REPO)
    assert files[CONDITIONAL_PIPELINE_FILENAME] == PACKAGED.read_bytes()
    assert CUSTOM_PIPELINE_FILENAME in files
    assert json.loads(files["model_index.json"])["id2label"] == {str(i): name for i, name in enumerate(NAMES)}

    unconditional = make_output_dir(tmp_path / "uncond", evaluation=False)
    pusher(hub_server, unconditional, REPO).push_final()
    files = hub_server.repo_files(REPO)
    assert CONDITIONAL_PIPELINE_FILENAME not in files
    assert set(files) == PIPELINE_FILES | {"README.md", "samples/step_0000600.png", TRAINING_CONFIG, CUSTOM_PIPELINE_FILENAME, ".gitattributes"}
    assert json.loads(files["model_index.json"])["_class_name"] == "DDPMPipeline"  # untouched: stock diffusers loads it
    assert b"ddpm_class_conditional" not in files["README.md"]
    # An unconditional run's push uploaded none of it.
    assert CONDITIONAL_PIPELINE_FILENAME not in hub_server.uploads[REPO][-1]

    # And back: the conditional run's push brings it again, also from training's background push (a snapshot).
    background = pusher(hub_server, conditional, REPO)
    background.check()
    background.push_in_background(20)
    background.wait()
    assert hub_server.uploads[REPO][-1] and CONDITIONAL_PIPELINE_FILENAME in hub_server.uploads[REPO][-1]
    assert hub_server.repo_files(REPO)[CONDITIONAL_PIPELINE_FILENAME] == PACKAGED.read_bytes()


# ---- loading what was pushed ----------------------------------------------------------------------

LOAD_CONDITIONAL = r"""
import json, re, sys, torch
from diffusers import DDPMPipeline, DiffusionPipeline

repo, snapshot, folder, package_file, readme, labels = sys.argv[1:7]
labels = json.loads(labels)

def sample(pipe):
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(i) for i in range(len(labels))]
    return pipe(class_labels=labels, guidance_scale=2.0, num_inference_steps=3, generator=generators, output_type="np").images

def describe(pipe):
    images = sample(pipe)
    return {"class": type(pipe).__name__, "class_names": pipe.class_names, "shape": list(images.shape), "same_as_local": bool((images == local).all())}

local = sample(DiffusionPipeline.from_pretrained(folder, custom_pipeline=package_file, trust_remote_code=True))
result = {"snapshot": describe(DiffusionPipeline.from_pretrained(snapshot, custom_pipeline="ddpm_class_conditional", trust_remote_code=True))}
try:
    by_name = describe(DiffusionPipeline.from_pretrained(repo, custom_pipeline="ddpm_class_conditional", trust_remote_code=True))
    by_index = DiffusionPipeline.from_pretrained(repo, trust_remote_code=True)  # model_index.json names the pipeline
    namespace = {}  # the card's usage, as a user pastes it
    exec(re.search(r"```python\n(.*?)```", open(readme).read(), re.S).group(1), namespace)
    result["hub"] = {
        "by_name": by_name,
        "by_index": [type(by_index).__name__, by_index.class_names],
        "card_images": [len(namespace["images"]), list(namespace["images"][0].size)],
    }
except Exception as error:
    result["hub"] = {"error": f"{type(error).__name__}: {error}"}
try:
    DDPMPipeline.from_pretrained(repo)
    result["stock"] = "loaded"
except Exception as error:
    result["stock"] = str(error)
print("RESULT " + json.dumps(result))
"""

# Class names travel as model_index.json's `id2label` dict: diffusers' `DiffusionPipeline.download`, which
# from_pretrained runs for a Hub repo (not for a folder), takes every list there but `_class_name` for a (library,
# class) component, so a list of names would make it look for `<key>/<first name>.py` and fail.


@pytest.mark.parametrize("class_names, labels", [(None, [1, 0]), (NAMES, ["dog", 0])], ids=["ids", "names"])
def test_pushed_conditional_run_loads_from_the_hub_with_its_pipeline_and_samples_guided(hub_server, tmp_path, class_names, labels):
    conditional = make_conditional_dir(tmp_path / "cond", class_names=class_names)
    hub_pusher = pusher(hub_server, conditional, REPO)
    hub_pusher.check()
    hub_pusher.push_final(10)
    readme = tmp_path / "README.md"
    readme.write_bytes(hub_server.repo_files(REPO)["README.md"])
    snapshot = HfApi(endpoint=hub_server.url).snapshot_download(REPO, local_dir=tmp_path / "snapshot")

    env = dict(hub_server.env, HF_HOME=str(tmp_path / "fresh_hf_home"), OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run(
        [sys.executable, "-c", LOAD_CONDITIONAL, REPO, snapshot, str(conditional), str(PACKAGED), str(readme), json.dumps(labels)],
        env=env,
        cwd=tmp_path,  # no local file or folder named like the custom pipeline
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (line,) = [text for text in result.stdout.splitlines() if text.startswith("RESULT ")]
    loaded = json.loads(line[len("RESULT ") :])
    expected = {"class": "DDPMClassConditionalPipeline", "class_names": class_names, "shape": [2, 8, 8, 3], "same_as_local": True}
    # The pushed files, loaded from a folder: the pipeline file, the weights and the class names came through.
    assert loaded["snapshot"] == expected
    assert loaded["hub"] == {
        "by_name": expected,
        "by_index": ["DDPMClassConditionalPipeline", class_names],
        "card_images": [8, [8, 8]],  # 2 classes x num_images_per_label=4
    }
    assert "trust_remote_code" in loaded["stock"]  # what the card says of DDPMPipeline.from_pretrained
    # The pipeline's code came from the repo.
    assert any(r.path.endswith(f"/{CONDITIONAL_PIPELINE_FILENAME}") and "/resolve/" in r.path for r in hub_server.requests)


# ---- the model card -------------------------------------------------------------------------------


def test_card_of_a_conditional_model_says_how_to_load_and_guide_it(tmp_path):
    conditional = make_conditional_dir(tmp_path / "cond")
    per_class = {"cat": 30.0, "cow": 20.5, "1": 40.0}  # keyed by name or id
    RunFolder(conditional).write_eval(dict(FID_RESULT, fid=12.3456, guidance_scale=1.5, per_class_fid=per_class, class_balanced=True))
    card = ModelCard(str(build_model_card(conditional, REPO)))  # parses back
    text = card.text

    assert card.data.library_name == "diffusers"
    assert card.data.pipeline_tag is None  # no Hub pipeline tag is class-conditional; unconditional would be wrong
    assert {"class-conditional", "classifier-free-guidance"} <= set(card.data.tags)
    assert "unconditional-image-generation" not in set(card.data.tags)
    (result,) = card.data.eval_results
    assert (result.task_type, result.metric_value) == ("class-conditional-image-generation", 12.3456)
    assert result.metric_name == "FID (1,000 samples, ddim 50 steps, guidance scale 1.5)"

    # What it is, how it was trained, and that stock DDPMPipeline cannot run it.
    assert "class-conditional" in text and "https://arxiv.org/abs/2207.12598" in text
    assert "label dropout p = 0.2" in text and "p_uncond = 0.2" in text
    assert "`DDPMPipeline.from_pretrained` refuses this repo" in text and "`trust_remote_code`" in text
    # The classes, and the grid's rows.
    assert "| Id | Name |\n|---|---|\n| 0 | cat |\n| 1 | dog |\n| 2 | cow |" in text
    assert "Id 3 is the null label" in text
    assert "one row per class, top to bottom: 0 (cat), 1 (dog), 2 (cow)" in text
    assert "![samples](samples/step_0000010.png)" in text
    # Usage: the custom pipeline, this model's names, guidance 2.0 with 50 DDIM steps, the convention, the CLI.
    assert 'DiffusionPipeline.from_pretrained("alice/cond-ddpm", custom_pipeline="ddpm_class_conditional", trust_remote_code=True)' in text
    assert 'class_labels=["cat", "dog"], guidance_scale=2.0, num_inference_steps=50' in text
    assert "pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)" in text
    assert "`guidance_scale` is s = 1 + w" in text and "(1 + w) eps(x_t, c) - w eps(x_t, null)" in text
    assert "s = 1 is plain conditional sampling, s = 0 unconditional" in text
    assert "`ddpm-hf sample --model alice/cond-ddpm --class_labels cat,dog --guidance_scale 2.0`" in text
    # None of the unconditional usage, nor the trajectory pipeline, which gives the UNet no labels.
    assert "DDPMPipeline.from_pretrained(" not in text and "DDIMPipeline" not in text
    assert 'custom_pipeline="ddpm_trajectory"' not in text and "### The denoising trajectory" not in text
    # Evaluation: the guidance scale in the FID row, the per-class FIDs by class id.
    assert "| FID | 12.35 | 1,000 | ddim 50 steps, guidance scale 1.5 | 0 |" in text
    assert "class-balanced" in text
    assert "| Class | FID |\n|---|---|\n| 0 (cat) | 30.00 |\n| 1 (dog) | 40.00 |\n| 2 (cow) | 20.50 |" in text


def test_card_of_a_conditional_model_without_class_names_uses_ids(tmp_path):
    conditional = make_conditional_dir(tmp_path / "cond", class_names=None, classes=4)
    RunFolder(conditional).write_eval(dict(FID_RESULT, per_class_fid={str(i): 10.0 + i for i in range(4)}))
    text = build_model_card(conditional, REPO, revision="dev").text
    assert "4 classes: ids 0..3, no names" in text
    assert "one row per class, top to bottom: 0, 1, 2, 3:" in text
    assert 'DiffusionPipeline.from_pretrained("alice/cond-ddpm", revision="dev", custom_pipeline="ddpm_class_conditional", trust_remote_code=True)' in text
    assert "class_labels=[0, 1], guidance_scale=2.0, num_inference_steps=50" in text
    assert "`ddpm-hf sample --model alice/cond-ddpm --revision dev --class_labels 0,1 --guidance_scale 2.0`" in text
    assert "| 3 | 13.00 |" in text
    assert "guidance scale" not in text.split("## Evaluation")[1].split("\n\n")[1]  # eval.json did not record one


def test_card_of_an_unconditional_model_is_unchanged(tmp_path):
    unconditional = make_output_dir(tmp_path / "uncond")  # eval.json without guidance_scale or per_class_fid
    card = build_model_card(unconditional, "alice/tiny-ddpm")
    text = card.text
    assert card.data.pipeline_tag == "unconditional-image-generation"
    assert "unconditional-image-generation" in card.data.tags and "class-conditional" not in card.data.tags
    (result,) = card.data.eval_results
    assert result.task_type == "unconditional-image-generation"
    assert "It is a stock diffusers `DDPMPipeline`" in text
    assert 'DDPMPipeline.from_pretrained("alice/tiny-ddpm")' in text and 'custom_pipeline="ddpm_trajectory"' in text
    assert "| FID | 123.46 | 1,000 | ddim 50 steps | 0 |" in text
    for conditional_only in ("ddpm_class_conditional", "guidance", "## Classes", "one row per class", "label dropout", "| Class | FID |"):
        assert conditional_only not in text, conditional_only
    assert json.loads((unconditional / EVAL_FILE).read_text())["fid"] == FID_RESULT["fid"]

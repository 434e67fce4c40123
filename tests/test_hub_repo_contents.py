"""What a push leaves in the repo: the files of the run pushed and nothing of an earlier one, the card of a
best/ folder, and none of the training machine's paths. Against the local Hub of tests/hub_server.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from huggingface_hub import HfApi, ModelCard
from test_hub import FID_RESULT, make_output_dir, pusher, save_pipeline

from ddpm_hf.model_card import build_model_card
from ddpm_hf.repo_contents import CUSTOM_PIPELINE_FILENAME, hub_id, public_eval, public_training_config
from ddpm_hf.run_folder import EVAL_FILE, TRAINING_CONFIG, RunFolder

WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
PIPELINE_FILES = {"model_index.json", "unet/config.json", WEIGHTS, "scheduler/scheduler_config.json"}


# ---- a push replaces the previous one -------------------------------------------------------------


def test_a_push_leaves_no_file_of_an_earlier_run(hub_server, tmp_path):
    repo = "alice/tiny-ddpm"
    first = make_output_dir(tmp_path / "first")
    hub = pusher(hub_server, first)
    hub.check()
    hub.push_final(600)
    assert {TRAINING_CONFIG, EVAL_FILE, "samples/step_0000600.png"} <= set(hub_server.repo_files(repo))
    HfApi(endpoint=hub_server.url).upload_file(path_or_fileobj=b"by hand\n", path_in_repo="NOTES.md", repo_id=repo, token=hub_server.token)

    # Another run, never evaluated, with neither a config nor samples.
    second = make_output_dir(tmp_path / "second", seed=1, evaluation=False)
    (second / TRAINING_CONFIG).unlink()
    for grid in (second / "samples").iterdir():
        grid.unlink()
    pusher(hub_server, second).push_final()

    files = hub_server.repo_files(repo)
    # Exactly the second run's files; what the user added by hand (and .gitattributes) stays.
    assert set(files) == PIPELINE_FILES | {"README.md", CUSTOM_PIPELINE_FILENAME, ".gitattributes", "NOTES.md"}
    assert files[WEIGHTS] == (second / WEIGHTS).read_bytes()
    assert b"model-index" not in files["README.md"] and b"![samples]" not in files["README.md"]


# ---- the card of best/ ---------------------------------------------------------------------------


def test_card_of_the_best_folder_shows_how_its_fid_was_measured(hub_server, tmp_path):
    # What training's --eval_every writes: the best pipeline so far and its FID result, with the step.
    best = RunFolder(tmp_path / "run").best
    save_pipeline(Path(best.path), seed=0)
    best.write_eval(
        {"fid": 12.3456, "num_samples": 1000, "scheduler": "ddpm", "steps": 100, "nfe": 100, "seed": 0, "reference": "builtin:cifar10-1k (train)", "step": 200}
    )

    card = build_model_card(best.path, "alice/best")
    text = str(card)
    assert "None" not in text
    assert "| FID | 12.35 | 1,000 | ddpm 100 steps | 0 | builtin:cifar10-1k (train) | step 200 |" in text
    assert "| Training steps | 200 |" in text  # the weights are those of the FID's step
    (result,) = card.data.eval_results
    assert (result.metric_name, result.metric_value) == ("FID (1,000 samples, ddpm 100 steps)", 12.3456)

    # Pushed, the card and eval.json say the same.
    hub = pusher(hub_server, best.path, repo_id="alice/best")
    hub.check()
    hub.push_final()
    files = hub_server.repo_files("alice/best")
    assert "ddpm 100 steps" in files["README.md"].decode()
    assert json.loads(files[EVAL_FILE])["scheduler"] == "ddpm"


def test_card_of_an_eval_json_without_the_sampler_says_so(tmp_path):
    output_dir = make_output_dir(tmp_path / "run", evaluation=False)
    (output_dir / EVAL_FILE).write_text(json.dumps({"fid": 3.5}))  # written before FID_RESULT_KEYS existed
    text = str(build_model_card(output_dir, "alice/x"))
    assert "None" not in text and "sampler not recorded" in text


def test_a_sampler_with_other_network_evaluations_shows_them(tmp_path):
    output_dir = make_output_dir(tmp_path / "run", evaluation=False)
    RunFolder(output_dir).write_eval(dict(FID_RESULT, scheduler="dpmsolver", steps=20, nfe=21))
    assert "dpmsolver 20 steps (21 network evaluations)" in str(build_model_card(output_dir, "alice/x"))


# ---- the machine's paths stay on the machine ------------------------------------------------------


def test_local_paths_stay_on_the_machine(hub_server, tmp_path, monkeypatch):
    # Trained in project/ with relative paths, pushed from another folder.
    project = tmp_path / "project"
    (project / "data" / "imgs").mkdir(parents=True)
    (project / "unet.json").write_text("{}")
    run = make_output_dir(project / "runs" / "r1")
    config = json.loads((run / TRAINING_CONFIG).read_text())
    config.update(
        dataset="data/imgs",
        output_dir="runs/r1",
        model_config=str(project / "unet.json"),
        init_from="../base-run",
        resume_from_checkpoint=str(run / "checkpoints" / "checkpoint-0000600"),
    )
    (run / TRAINING_CONFIG).write_text(json.dumps(config))
    statistics = str(project / "stats" / "ref.npz")
    RunFolder(run).write_eval(
        dict(FID_RESULT, model=str(run), reference=statistics, reference_details={"spec": statistics, "file": statistics, "dataset": "data/imgs (train)"})
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    hub = pusher(hub_server, run)
    hub.check()
    hub.push_final(600)

    files = hub_server.repo_files("alice/tiny-ddpm")
    for name, content in files.items():
        assert str(tmp_path).encode() not in content, name
    uploaded = json.loads(files[TRAINING_CONFIG])
    assert uploaded["dataset"] == "local:imgs"  # recorded as local, never as the Hub id "data/imgs"
    assert (uploaded["output_dir"], uploaded["model_config"], uploaded["resume_from_checkpoint"]) == ("r1", "unet.json", "checkpoint-0000600")
    assert uploaded["init_from"] == "local:base-run" and uploaded["model"] == "tiny"
    evaluation = json.loads(files[EVAL_FILE])
    assert (evaluation["model"], evaluation["reference"]) == ("local:r1", "local:ref.npz")
    assert evaluation["reference_details"] == {"spec": "local:ref.npz", "file": "ref.npz", "dataset": "local:imgs (train)"}

    card = ModelCard(files["README.md"].decode())
    assert card.data.datasets is None
    assert "| Dataset | `imgs` (a local dataset, not on the Hub)" in card.text
    assert "local:ref.npz" in card.text
    # The run folder itself is untouched.
    assert json.loads((run / TRAINING_CONFIG).read_text())["dataset"] == "data/imgs"


def test_a_hub_dataset_stays_a_hub_id(tmp_path, monkeypatch):
    run = make_output_dir(tmp_path / "run")
    config = json.loads((run / TRAINING_CONFIG).read_text())
    (run / TRAINING_CONFIG).write_text(json.dumps(dict(config, dataset="uoft-cs/cifar10", init_from="alice/base")))
    monkeypatch.chdir(tmp_path)
    card = build_model_card(run, "alice/x")
    assert card.data.datasets == ["uoft-cs/cifar10"]
    assert "[`uoft-cs/cifar10`](https://huggingface.co/datasets/uoft-cs/cifar10)" in card.text
    public = public_training_config(json.loads((run / TRAINING_CONFIG).read_text()), run)
    assert (public["dataset"], public["init_from"]) == ("uoft-cs/cifar10", "alice/base")
    assert public_eval({"reference": "uoft-cs/cifar10 train", "model": "alice/x"}, run) == {"reference": "uoft-cs/cifar10 train", "model": "alice/x"}


@pytest.mark.parametrize(
    "value, expected",
    [
        ("uoft-cs/cifar10", "uoft-cs/cifar10"),
        ("data/imgs", None),  # a folder beside the run's folder
        ("./uoft-cs/cifar10", None),
        ("/data/imgs", None),
        ("~/imgs", None),
        ("a/b/c", None),
        ("data\\imgs", None),
        ("builtin:cifar10-1k", None),
        ("cifar10", None),
        ("user/bad--name", None),
        (None, None),
    ],
)
def test_hub_id(tmp_path, monkeypatch, value, expected):
    (tmp_path / "data" / "imgs").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # where the push runs does not matter
    assert hub_id(value, tmp_path / "runs" / "r1") == expected

"""`ddpm-hf evaluate` as a GPU user runs it and as careful papers report it (ddpm_hf/evaluation.py, evaluation_cli.py,
evaluation_sweeps.py): the UNet in bf16 and compiled while Inception stays float32, FID with its spread over
independent image sets (--repeats), and the frontier of FID against network evaluations for every sampler
(--frontier), the same on one and two processes.

The Inception network is the stand-in of tests/inception_stand_in.py (the real one reads a few images/s on two CPU
cores); everything around it is the real code.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import offline_env
from diffusers import DDPMScheduler, UNet2DModel
from inception_stand_in import StandInInception
from PIL import Image
from test_evaluation_conditional import SIZE, tiny_unet

from ddpm_hf import evaluation, fid, sampling
from ddpm_hf.cli import main
from ddpm_hf.evaluation_sweeps import best_at_budget
from ddpm_hf.sampling import SAMPLERS, gather_images, make_sampler
from ddpm_hf.training import save_pipeline

T = 20  # a 20-step noise schedule for 8 x 8 images: every sampler at every budget in milliseconds
REPO_ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread", "fid_stand_in")


@pytest.fixture
def model(tmp_path) -> str:
    save_pipeline(tiny_unet(classes=None), DDPMScheduler(num_train_timesteps=T), str(tmp_path / "model"))
    return str(tmp_path / "model")


@pytest.fixture
def reference(tmp_path) -> str:
    """Six real CIFAR-10 images (the subset shipped with the package) at 8 x 8, as a folder."""
    folder = tmp_path / "reference"
    folder.mkdir()
    for i, image in enumerate(fid.load_dataset_images("builtin:cifar10-1k", "train", SIZE, max_images=6, progress=False)):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i:03d}.png")
    return str(folder)


def evaluate(model: str, reference: str, output: Path, *options: str) -> dict:
    """`ddpm-hf evaluate` on the CPU in this process; returns the eval.json it wrote."""
    assert main(["evaluate", "--model", model, "--reference", reference, "--output", str(output), "--device", "cpu", *options]) == 0
    return json.loads((output / "eval.json").read_text())


# ---------------------------------------------------------------------------------------------
# What a GPU user runs: --dtype bf16 and --compile, Inception in float32
# ---------------------------------------------------------------------------------------------


def test_bf16_autocasts_the_unet_alone_and_inception_sees_float32(model, reference, tmp_path):
    """The condition that keeps FID comparable when the UNet samples in bf16: every UNet call runs under bf16
    autocast, and every call of the Inception network gets float32 input with autocast off."""
    calls = []

    def record(module, inputs, output):
        if isinstance(module, (UNet2DModel, StandInInception)):
            result = output.sample if isinstance(module, UNet2DModel) else output
            calls.append((type(module).__name__, inputs[0].dtype, torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), result.dtype))

    hook = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        result = evaluate(model, reference, tmp_path / "bf16", "--num_samples", "4", "--scheduler", "ddim", "--steps", "2", "--dtype", "bf16")
    finally:
        hook.remove()
    unet_calls = [call for call in calls if call[0] == "UNet2DModel"]
    inception_calls = [call for call in calls if call[0] == "StandInInception"]
    assert len(unet_calls) == 2  # 2 DDIM steps, one batch of 4
    assert all(autocast and dtype == torch.bfloat16 and output == torch.bfloat16 for _, _, autocast, dtype, output in unet_calls)
    assert len(inception_calls) == 2  # the reference folder, then the samples
    assert all(x == torch.float32 and not autocast and output == torch.float32 for _, x, autocast, _, output in inception_calls)
    assert (result["dtype"], result["compile"]) == ("bf16", False)


def test_compile_goes_through_compile_for_sampling_and_eval_json_records_what_ran(model, reference, tmp_path, monkeypatch):
    """--compile samples through `sampling.compile_for_sampling` (here with Dynamo's eager backend: the same
    arithmetic, no C++ compiler needed), and eval.json's `compile` says whether the UNet ran compiled: false again
    when compiling fails and sampling falls back to the eager UNet. The FID is the same all three ways."""
    compiled = []

    def compile_with(backend, unet):
        compiled.append(sampling.compile_for_sampling(unet, backend=backend))
        return compiled[-1]

    def failing_backend(graph, example_inputs):
        raise RuntimeError("no C++ compiler (simulated)")

    options = ["--num_samples", "4", "--scheduler", "ddim", "--steps", "2"]
    eager = evaluate(model, reference, tmp_path / "eager", *options)
    monkeypatch.setattr(evaluation, "compile_for_sampling", functools.partial(compile_with, "eager"))
    ran_compiled = evaluate(model, reference, tmp_path / "compiled", *options, "--compile")
    monkeypatch.setattr(evaluation, "compile_for_sampling", functools.partial(compile_with, failing_backend))
    with pytest.warns(RuntimeWarning, match="torch.compile failed"):
        fell_back = evaluate(model, reference, tmp_path / "fell-back", *options, "--compile")
    assert len(compiled) == 2 and isinstance(compiled[0], sampling.CompiledOrEager)
    assert (eager["compile"], ran_compiled["compile"], fell_back["compile"]) == (False, True, False)
    assert ran_compiled["fid"] == pytest.approx(eager["fid"], rel=1e-6) and fell_back["fid"] == pytest.approx(eager["fid"], rel=1e-6)


# ---------------------------------------------------------------------------------------------
# FID with its spread: --repeats
# ---------------------------------------------------------------------------------------------


def test_repeats_report_mean_std_and_min_of_disjoint_image_sets(model, reference, tmp_path, monkeypatch, capsys):
    """--repeats 3: three image sets with seeds seed, seed + N, seed + 2N, each exactly the images of its own seed, no
    image in two sets; eval.json has each FID, their mean, standard deviation and minimum, and so does the summary."""
    seen = []
    features = fid.InceptionFeatures.__call__
    monkeypatch.setattr(fid.InceptionFeatures, "__call__", lambda self, images: seen.append(images.clone()) or features(self, images))
    result = evaluate(
        model, reference, tmp_path / "out", "--num_samples", "4", "--batch_size", "2", "--scheduler", "ddim", "--steps", "2", "--seed", "5", "--repeats", "3"
    )

    assert result["repeats"] == 3 and result["num_samples"] == 4
    assert [s["seed"] for s in result["sets"]] == [5, 9, 13]
    fids = [s["fid"] for s in result["sets"]]
    assert len(set(fids)) == 3
    assert result["fid"] == pytest.approx(statistics.fmean(fids)) and result["fid_min"] == min(fids)
    assert result["fid_std"] == pytest.approx(statistics.stdev(fids)) and result["fid_std"] > 0
    out = capsys.readouterr().out
    assert f"+- {result['fid_std']:.4f} (min {result['fid_min']:.4f})" in out and "3 sets of 4 samples, seeds 5, 9, 13" in out

    generated = torch.cat(seen[-6:])  # after the reference: 3 sets x 2 batches of 2
    pipeline = sampling.load_pipeline(model, device="cpu")
    sampler = make_sampler(pipeline.scheduler, "ddim", 2)
    for r, seed in enumerate((5, 9, 13)):
        assert torch.equal(generated[4 * r : 4 * (r + 1)], gather_images(pipeline.unet, sampler, 4, seed, batch_size=4))
    digests = [hashlib.sha256(image.numpy().tobytes()).hexdigest() for image in generated]
    assert len(set(digests)) == 12  # no image shared between (or within) the sets


# ---------------------------------------------------------------------------------------------
# The frontier: FID against NFE for every sampler
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_frontier_on_one_and_two_processes(model, reference, tmp_path):
    """--frontier 2,4: every sampler at the most steps whose NFE fits each budget, ddpm also with all T steps; the
    plot, the table of the best sampler per budget and eval.json's section; torchrun with two gloo processes (each
    samples its share of every run) gives the one-process numbers."""
    options = ["--num_samples", "3", "--batch_size", "2", "--frontier", "2,4"]
    one = evaluate(model, reference, tmp_path / "p1", *options)["frontier"]
    torchrun = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone", "--nproc_per_node", "2"]
    launcher = [str(REPO_ROOT / "tests" / "inception_stand_in.py"), "evaluate", "--model", model, "--reference", reference, "--device", "cpu"]
    done = subprocess.run(
        [*torchrun, *launcher, *options, "--output", str(tmp_path / "p2")],
        capture_output=True,
        text=True,
        env=offline_env(DDPM_HF_CACHE=str(tmp_path / "cache")),
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    two = json.loads((tmp_path / "p2" / "eval.json").read_text())["frontier"]

    scheduler = DDPMScheduler(num_train_timesteps=T)
    expected = [(name, budget) for name in SAMPLERS for budget in (2, 4)] + [("ddpm", T)]
    assert sorted((r["scheduler"], r["nfe_budget"]) for r in one["runs"]) == sorted(expected)
    for run in one["runs"]:  # the most steps within the budget, NFE counted by the sampler
        assert run["nfe"] == make_sampler(scheduler, run["scheduler"], run["steps"]).nfe <= run["nfe_budget"]
        assert run["steps"] == T or make_sampler(scheduler, run["scheduler"], run["steps"] + 1).nfe > run["nfe_budget"]
    assert one["budgets"] == [2, 4] and one["best"] == best_at_budget(one["runs"]) and one["not_run"] == []
    for row in one["best"]:
        within = [r["fid"] for r in one["runs"] if r["nfe_budget"] == row["nfe_budget"]]
        assert row["fid"] == min(within)

    assert [r["num_processes"] for r in (one["runs"][0], two["runs"][0])] == [1, 2]
    assert [(r["scheduler"], r["steps"], r["nfe"]) for r in two["runs"]] == [(r["scheduler"], r["steps"], r["nfe"]) for r in one["runs"]]
    assert [r["fid"] for r in two["runs"]] == pytest.approx([r["fid"] for r in one["runs"]], rel=1e-9)
    assert two["best"] == [dict(row, fid=pytest.approx(row["fid"], rel=1e-9)) for row in one["best"]]

    with open(tmp_path / "p1" / "frontier.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["nfe_budget", "sampler", "steps", "nfe", "fid", "seconds"] and len(rows) == len(expected)
    table = (tmp_path / "p1" / "frontier.md").read_text()
    assert table.startswith("Best sampler at each budget:\n\n| NFE budget | best sampler | steps | NFE | FID | next best |")
    with Image.open(tmp_path / "p1" / "frontier.png") as plot:
        assert plot.format == "PNG" and plot.size[0] > 300


def test_a_budget_no_step_count_of_a_sampler_may_use_leaves_that_run_out_with_the_reason():
    """On the paper's schedule (T = 1000, 'leading' spacing) make_sampler refuses chains of one or two steps that
    would start far from noise: at a budget of 2 the frontier runs what it may (the multistep solvers and euler 2
    steps, heun 1 step: 1 NFE) and lists ddpm and ddim as not run, with make_sampler's one-line reason; at 4 every
    sampler runs."""
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    runs, samplers, not_run = evaluation._runs_and_samplers(evaluation.EvaluateOptions(model="m", frontier=[2, 4]), scheduler)
    ran = {(run.scheduler, run.nfe_budget): (sampler.steps, sampler.nfe) for run, sampler in zip(runs, samplers)}
    assert (
        ran[("unipc", 2)] == ran[("euler", 2)] == (2, 2) and ran[("heun", 2)] == (1, 1) and ran[("heun", 4)] == (2, 3) and ran[("ddpm", None)] == (1000, 1000)
    )
    assert all((name, 4) in ran for name in SAMPLERS)
    assert sorted(entry["sampler"] for entry in not_run) == ["ddim", "ddpm"]
    assert all(entry["nfe_budget"] == 2 and "timestep_spacing 'leading' starts at t = " in entry["reason"] for entry in not_run)


def test_frontier_and_repeats_mistakes_are_one_line_errors(model, reference, tmp_path, capsys):
    cases = [
        (["--frontier", "5,50"], "--frontier 5,50: the budget 50 exceeds the model's T = 20 network evaluations; give budgets up to 20."),
        (["--frontier", "--steps", "5"], "--frontier sets every sampler's steps itself"),
        (["--frontier", "--sweep", "ddim:5"], "--sweep and --frontier cannot be combined"),
        (["--frontier", "5,5"], "lists a budget twice"),
        (["--repeats", "0"], "--repeats"),
        (["--metric", "nll", "--repeats", "3"], "--repeats 3 is an option of FID, not of --metric nll"),
        (["--metric", "nll", "--dtype", "bf16"], "--dtype bf16 is an option of FID, not of --metric nll"),
    ]
    for options, message in cases:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            main(["evaluate", "--model", model, "--reference", reference, "--output", str(tmp_path / "out"), "--device", "cpu", *options])
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error: ")]  # besides, maybe, the loading progress bar
        assert exit_info.value.code == 2 and len(errors) == 1 and err.rstrip().endswith(errors[0]) and message in errors[0], (options, err)
    assert not (tmp_path / "out").exists()  # nothing written

"""FID of class-conditional models (ddpm_hf/evaluation.py, evaluation_per_class.py, evaluation_sweeps.py): balanced
classes, the guidance scale, per-class FID, the guidance sweep, and the same numbers on one and two processes.

The FID Inception network takes seconds per few images on two CPU cores, so these tests replace it by a stand-in
(tests/inception_stand_in.py: 2048 fixed random projections of the 8 x 8 average-pooled input that
fid.InceptionFeatures would feed the network). Everything around it (sampling, labels, statistics, merging, FID,
eval.json) is the real code; the network itself is tested in tests/test_evaluation.py.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import offline_env
from diffusers import DDPMScheduler, UNet2DModel
from PIL import Image

from ddpm_hf import evaluation, fid
from ddpm_hf.cli import main
from ddpm_hf.conditioning import balanced_labels
from ddpm_hf.sampling import gather_images, make_sampler
from ddpm_hf.training import save_pipeline

NAMES = ["cat", "dog", "cow"]
K, SIZE = len(NAMES), 8
REPO_ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread", "fid_stand_in")


def tiny_unet(classes: int | None = K, seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=SIZE,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        num_class_embeds=classes + 1 if classes else None,
    )


def save_model(folder: Path, classes: int | None = K, names=NAMES) -> str:
    save_pipeline(tiny_unet(classes), DDPMScheduler(num_train_timesteps=20), str(folder), class_names=names if classes else None)
    return str(folder)


def builtin_images(count: int):
    import datasets

    from ddpm_hf.data import builtin_datasets

    return datasets.load_dataset("parquet", data_files=builtin_datasets()["cifar10-1k"], split="train").select(range(count))["img"]


def labelled_dataset(folder: Path, names=NAMES, per_class: int = 4, label: bool = True) -> str:
    """A parquet dataset of per_class x len(names) CIFAR images, row i of class i mod len(names) (a ClassLabel column)."""
    import datasets

    count = per_class * len(names)
    columns = {"image": builtin_images(count)}
    features = {"image": datasets.Image()}
    if label:
        columns["label"] = [i % len(names) for i in range(count)]
        features["label"] = datasets.ClassLabel(names=list(names))
    folder.mkdir(parents=True)
    datasets.Dataset.from_dict(columns, features=datasets.Features(features)).to_parquet(str(folder / "train.parquet"))
    return str(folder)


def image_folder(folder: Path, count: int = 6) -> str:
    folder.mkdir(parents=True)
    for i, image in enumerate(builtin_images(count)):
        image.convert("RGB").resize((SIZE, SIZE)).save(folder / f"{i:03d}.png")
    return str(folder)


def cli(*argv: str) -> None:
    assert main(list(argv)) == 0


def one_line_error(argv: list[str], capsys) -> str:
    capsys.readouterr()  # what came before (progress bars of making the test's files)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]  # besides, maybe, `datasets`' progress bars
    assert exit_info.value.code == 2 and len(errors) == 1 and err.rstrip().endswith(errors[0]) and "Traceback" not in err, err
    return errors[0]


@pytest.fixture
def reference_images():
    return fid.load_dataset_images("builtin:cifar10-1k", "train", SIZE, max_images=6, progress=False)


# ---------------------------------------------------------------------------------------------
# Sampling for FID: balanced classes, the guidance scale
# ---------------------------------------------------------------------------------------------


def test_guidance_changes_the_samples_and_zero_is_the_null_label(reference_images):
    unet = tiny_unet().eval()
    sampler = make_sampler(DDPMScheduler(num_train_timesteps=20), "ddim", 3)
    evaluator = evaluation.FIDEvaluator(reference_images, device="cpu", batch_size=8)
    stats = {s: evaluator.statistics_of(unet, sampler, 6, seed=1, guidance_scale=s) for s in (0.0, 1.0, 3.0)}
    default = evaluator.statistics_of(unet, sampler, 6, seed=1)
    np.testing.assert_array_equal(default.mu, stats[1.0].mu)  # no scale given: plain conditional sampling, s = 1
    assert np.abs(stats[1.0].mu - stats[3.0].mu).max() > 1e-3  # guidance changes the samples ...
    fids = {s: fid.fid_from_statistics(v, evaluator.reference) for s, v in stats.items()}
    assert fids[1.0] != pytest.approx(fids[3.0], rel=1e-6)  # ... and their FID
    assert stats[3.0].info["guidance_scale"] == 3.0 and stats[3.0].info["class_balanced"]
    # s = 0 is the unconditional model: the samples of the null label K, sampled without guidance.
    null = gather_images(unet, sampler, 6, seed=1, batch_size=8, class_labels=[K] * 6)
    guided_zero = gather_images(unet, sampler, 6, seed=1, batch_size=8, class_labels=balanced_labels(K, 6), guidance_scale=0.0)
    assert (null.int() - guided_zero.int()).abs().max() <= 1  # the same images, up to a rounding flip of one level
    of_null = fid.compute_statistics(null, 8, progress=False, extractor=evaluator.extractor)
    np.testing.assert_allclose(stats[0.0].mu, of_null.mu, rtol=0, atol=1e-3)
    assert np.abs(stats[0.0].mu - stats[1.0].mu).max() > 10 * np.abs(stats[0.0].mu - of_null.mu).max()


def test_every_class_gets_the_same_number_of_samples(reference_images):
    unet = tiny_unet().eval()
    sampler = make_sampler(DDPMScheduler(num_train_timesteps=20), "ddim", 2)
    evaluator = evaluation.FIDEvaluator(reference_images, device="cpu", batch_size=4)
    seen: list[int] = []
    unet.register_forward_hook(lambda module, args, kwargs, output: seen.extend(kwargs["class_labels"].tolist()), with_kwargs=True)
    # The path training's --eval_every takes: fid_result with the defaults (guidance scale 1, balanced classes).
    result = evaluation.fid_result(evaluator, unet, sampler, num_samples=12, seed=0, batch_size=5)
    assert np.bincount(seen, minlength=K + 1).tolist() == [4 * 2, 4 * 2, 4 * 2, 0]  # 4 images per class, 2 steps each
    assert (result["guidance_scale"], result["class_balanced"], result["num_classes"]) == (1.0, True, K)
    assert math.isfinite(result["fid"]) and "per_class_fid" not in result
    seen.clear()
    evaluation.fid_result(evaluator, unet, sampler, num_samples=7, seed=0, batch_size=5, guidance_scale=2.0)
    # 7 images: classes 3, 2 and 2 images, each step also once with the null label (one forward pass of 2B)
    assert np.bincount(seen, minlength=K + 1).tolist() == [3 * 2, 2 * 2, 2 * 2, 7 * 2]


def test_conditional_training_evaluates_fid_with_the_defaults(tmp_path, micro_unet_config, train_in_process):
    from conftest import quick_options

    train_in_process(**quick_options(tmp_path / "run", micro_unet_config, class_conditional=True, eval_every=4, eval_num_samples=6, sample_steps=3))
    best = json.loads((tmp_path / "run" / "best" / "eval.json").read_text())
    assert math.isfinite(best["fid"]) and best["num_samples"] == 6
    assert (best["guidance_scale"], best["class_balanced"], best["num_classes"]) == (1.0, True, 10)  # the built-in CIFAR-10 subset


# ---------------------------------------------------------------------------------------------
# `ddpm-hf evaluate`: eval.json and per-class FID
# ---------------------------------------------------------------------------------------------


def test_evaluate_records_guidance_and_per_class_fid(tmp_path, capsys):
    model = save_model(tmp_path / "model")
    reference = labelled_dataset(tmp_path / "reference")
    out = tmp_path / "out"
    common = ["evaluate", "--model", model, "--num_samples", "7", "--scheduler", "ddim", "--steps", "2", "--batch_size", "4"]
    cli(*common, "--guidance_scale", "2", "--per_class_fid", "--reference", reference, "--output", str(out), "--device", "cpu")
    result = json.loads((out / "eval.json").read_text())
    assert (result["guidance_scale"], result["class_balanced"], result["num_classes"]) == (2.0, True, K)
    assert list(result["per_class_fid"]) == NAMES and all(math.isfinite(v) and v > 0 for v in result["per_class_fid"].values())
    assert result["per_class_reference_images"] == {name: 4 for name in NAMES}
    printed = capsys.readouterr().out
    assert "7 samples: 3 classes x 2-3, guidance scale 2" in printed and "FID per class" in printed and "strongly biased" in printed

    # The same numbers from the images themselves: class k's samples are images i = k mod K, its references the
    # reference rows of label k.
    unet = tiny_unet().eval()
    sampler = make_sampler(DDPMScheduler(num_train_timesteps=20), "ddim", 2)
    labels = balanced_labels(K, 7)
    samples = gather_images(unet, sampler, 7, seed=0, batch_size=4, class_labels=labels, guidance_scale=2.0)
    references = fid.load_dataset_images(reference, "train", SIZE, progress=False)
    extractor = fid.InceptionFeatures("cpu")
    for k, name in enumerate(NAMES):
        mine = fid.compute_statistics(samples[torch.tensor(labels) == k], 8, progress=False, extractor=extractor)
        theirs = fid.compute_statistics(references[torch.arange(len(references)) % K == k], 8, progress=False, extractor=extractor)
        assert result["per_class_fid"][name] == pytest.approx(fid.fid_from_statistics(mine, theirs), rel=1e-6)
    everything = fid.compute_statistics(samples, 8, progress=False, extractor=extractor)
    assert result["fid"] == pytest.approx(
        fid.fid_from_statistics(everything, fid.compute_statistics(references, 8, progress=False, extractor=extractor)), rel=1e-6
    )

    # A second run reads the per-class reference statistics from the cache and finds the same FIDs.
    cached = sorted(p.name for p in (tmp_path / "cache" / "fid-stats").iterdir() if "_class-" in p.name)
    assert len(cached) == K
    cli(*common, "--guidance_scale", "2", "--per_class_fid", "--reference", reference, "--output", str(out), "--device", "cpu")
    again = json.loads((out / "eval.json").read_text())
    assert again["per_class_fid"] == pytest.approx(result["per_class_fid"], rel=1e-6)


def test_an_unconditional_models_eval_json_is_unchanged(tmp_path):
    model = save_model(tmp_path / "model", classes=None)
    out = tmp_path / "out"
    sampling = ["--num_samples", "4", "--scheduler", "ddim", "--steps", "2", "--batch_size", "4"]
    cli("evaluate", "--model", model, *sampling, "--reference", image_folder(tmp_path / "reference"), "--output", str(out), "--device", "cpu")
    result = json.loads((out / "eval.json").read_text())
    assert math.isfinite(result["fid"])
    assert not {"guidance_scale", "class_balanced", "num_classes", "per_class_fid", "per_class_reference_images"} & set(result)


def test_per_class_fid_needs_a_reference_labelled_with_the_models_classes(tmp_path, capsys):
    model = save_model(tmp_path / "model")
    statistics = tmp_path / "reference.npz"
    fid.statistics_of_features(np.random.default_rng(0).standard_normal((4, fid.FEATURE_DIM))).save(str(statistics))
    cases = {
        labelled_dataset(tmp_path / "unlabelled", label=False): "has no column of class labels (columns: image)",
        labelled_dataset(tmp_path / "four", names=[*NAMES, "owl"], per_class=2): "has 4 classes in column 'label' but the model has 3",
        labelled_dataset(tmp_path / "others", names=["cat", "dog", "emu"]): "are cat, dog, emu, but the model's are cat, dog, cow",
        str(statistics): "is a statistics file, which holds no classes",
        image_folder(tmp_path / "folder"): "is a folder of images without class labels",
    }
    for reference, problem in cases.items():
        error = one_line_error(["evaluate", "--model", model, "--num_samples", "6", "--per_class_fid", "--reference", reference, "--device", "cpu"], capsys)
        assert "--per_class_fid" in error and problem in error and "or drop --per_class_fid" in error, error
    labelled = labelled_dataset(tmp_path / "labelled")
    error = one_line_error(["evaluate", "--model", model, "--num_samples", "5", "--per_class_fid", "--reference", labelled, "--device", "cpu"], capsys)
    assert "at least 2 samples of each of the 3 classes: pass --num_samples 6" in error
    assert not (Path(model) / "eval.json").exists()


# ---------------------------------------------------------------------------------------------
# The guidance sweep
# ---------------------------------------------------------------------------------------------


def test_guidance_sweep_writes_table_plot_and_eval_json(tmp_path, capsys):
    model = save_model(tmp_path / "model")
    reference = image_folder(tmp_path / "reference")
    out = tmp_path / "out"
    common = ["--model", model, "--num_samples", "6", "--scheduler", "ddim", "--steps", "2", "--batch_size", "6", "--reference", reference]
    cli("evaluate", *common, "--guidance_sweep", "0, 1,3", "--output", str(out), "--device", "cpu")
    with open(out / "guidance_sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(float(r["guidance_scale"]), r["sampler"], int(r["steps"]), int(r["nfe"])) for r in rows] == [
        (0, "ddim", 2, 2),
        (1, "ddim", 2, 2),
        (3, "ddim", 2, 2),
    ]
    fids = [float(r["fid"]) for r in rows]
    assert all(math.isfinite(v) and v > 0 for v in fids) and len(set(fids)) == 3
    table = (out / "guidance_sweep.md").read_text()
    assert table.startswith("| guidance scale s | sampler | steps | NFE | FID | seconds |") and "| 3 | ddim | 2 | 2 |" in table
    with Image.open(out / "guidance_sweep.png") as plot:
        assert plot.format == "PNG" and plot.size[0] > 300
    runs = json.loads((out / "eval.json").read_text())["guidance_sweep"]["runs"]
    assert [r["guidance_scale"] for r in runs] == [0.0, 1.0, 3.0] and all(r["class_balanced"] and r["seed"] == 0 for r in runs)
    assert [r["fid"] for r in runs] == pytest.approx(fids, abs=0.01)
    printed = capsys.readouterr().out
    assert "FID vs guidance scale s = 1 + w (6 samples: 3 classes x 2)" in printed and "| 1 | ddim | 2 | 2 |" in printed
    assert not (out / "sweep.csv").exists()  # the sampler sweep's files are another sweep's
    # One FID of the sweep is the FID that evaluate finds at that scale (same seed, sampler, reference), and the
    # sweep section survives the top-level result.
    cli("evaluate", *common, "--guidance_scale", "3", "--output", str(out), "--device", "cpu")
    single = json.loads((out / "eval.json").read_text())
    assert single["fid"] == pytest.approx(runs[2]["fid"], rel=1e-9) and len(single["guidance_sweep"]["runs"]) == 3


def test_guidance_on_an_unconditional_model_and_clashing_options_are_one_line_errors(tmp_path, capsys):
    unconditional = save_model(tmp_path / "model", classes=None)
    conditional = save_model(tmp_path / "conditional")
    reference = image_folder(tmp_path / "reference", count=2)
    for option in (["--guidance_scale", "2"], ["--guidance_sweep", "0,1"], ["--per_class_fid"]):
        error = one_line_error(["evaluate", "--model", unconditional, "--num_samples", "6", "--reference", reference, *option, "--device", "cpu"], capsys)
        assert f"{option[0]} needs a class-conditional model" in error and f"drop {option[0]}" in error, error
    assert one_line_error(["evaluate", "--model", unconditional, "--guidance_scale", "-1"], capsys).startswith("error: argument --guidance_scale: must be >= 0")
    clashes = {
        ("--guidance_sweep", "0,1", "--sweep", "ddim:2"): "--guidance_sweep and --sweep cannot be combined",
        ("--guidance_sweep", "0,1", "--guidance_scale", "2"): "--guidance_sweep sets the guidance scales itself",
        ("--guidance_sweep", "1,x"): "argument --guidance_sweep: each scale must be a number",
        ("--guidance_sweep", "1,1"): "lists a guidance scale twice",
        ("--metric", "nll", "--guidance_scale", "2"): "--guidance_scale is an option of FID, not of --metric nll",
    }
    for option, message in clashes.items():
        assert message in one_line_error(["evaluate", "--model", conditional, "--reference", reference, *option, "--device", "cpu"], capsys)
    assert not (Path(unconditional) / "eval.json").exists() and not (Path(conditional) / "eval.json").exists()


# ---------------------------------------------------------------------------------------------
# Two processes
# ---------------------------------------------------------------------------------------------


def test_two_processes_find_the_fid_and_per_class_fid_of_one(tmp_path):
    """`ddpm-hf evaluate --guidance_scale ... --per_class_fid` under torchrun with two gloo processes (each samples its
    share of the images, statistics merged, one writer) gives the one-process numbers."""
    model = save_model(tmp_path / "model")
    reference = labelled_dataset(tmp_path / "reference")
    # 7 images in chunks of 2: the processes get 4 and 3, and classes 3, 2 and 2 images
    options = ["--num_samples", "7", "--batch_size", "2", "--scheduler", "ddim", "--steps", "2", "--guidance_scale", "2.5", "--per_class_fid"]
    options += ["--model", model, "--reference", reference, "--device", "cpu"]
    cli("evaluate", *options, "--output", str(tmp_path / "p1"))  # one process: this one
    torchrun = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone", "--nproc_per_node", "2"]
    launcher = [str(REPO_ROOT / "tests" / "inception_stand_in.py"), "evaluate", *options, "--output", str(tmp_path / "p2")]
    done = subprocess.run([*torchrun, *launcher], capture_output=True, text=True, env=offline_env(DDPM_HF_CACHE=str(tmp_path / "cache")), timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    results = {processes: json.loads((tmp_path / f"p{processes}" / "eval.json").read_text()) for processes in (1, 2)}
    one, two = results[1], results[2]
    assert (one["num_processes"], two["num_processes"]) == (1, 2) and two["guidance_scale"] == 2.5
    assert two["fid"] == pytest.approx(one["fid"], rel=1e-9)
    assert list(two["per_class_fid"]) == NAMES and two["per_class_fid"] == pytest.approx(one["per_class_fid"], rel=1e-9)

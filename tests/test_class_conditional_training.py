"""Class-conditional training and guided sampling (Ho & Salimans 2022): the labels that reach the UNet, the saved
pipeline, the training grids, `ddpm-hf sample --class_labels --guidance_scale`, bad input, and the same run on two
gloo processes (resumed from a checkpoint). That the model learns its classes: test_class_conditional_learning.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import MICRO_UNET, REPO_ROOT, as_flags, offline_env, quick_options
from PIL import Image
from safetensors.torch import load_file

from ddpm_hf.cli import main
from ddpm_hf.conditioning import balanced_labels, drop_labels, guided_model_output, labels_in_blocks
from ddpm_hf.data import ImageBatches
from ddpm_hf.errors import UserError
from ddpm_hf.sampling import gather_images, make_sampler

PIPELINE_FILE = os.path.join(REPO_ROOT, "pipelines", "ddpm_class_conditional.py")
CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def tiny_conditional_unet(num_classes: int = 3, out_channels: int = 3, seed: int = 0):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(**dict(MICRO_UNET, out_channels=out_channels), sample_size=8, num_class_embeds=num_classes + 1)
    with torch.no_grad():  # larger class embeddings, so that the label changes the output clearly (as after training)
        unet.class_embedding.weight.mul_(5)
    return unet.eval()


def run_cli(arguments, capsys):
    """`ddpm-hf ...` in this process: (exit code, stderr lines)."""
    try:
        code = main(arguments)
    except SystemExit as exit_info:
        code = exit_info.code
    lines = capsys.readouterr().err.strip().splitlines()
    return code, [line for line in lines if not line.startswith("Loading pipeline components")]  # diffusers' loading bar


# ---- training --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def conditional_run(tmp_path_factory, one_thread_per_module):
    """A 4-step conditional run on the built-in CIFAR-10 subset (its `label` column is a ClassLabel of 10 names)."""
    from accelerate.state import AcceleratorState, GradientState

    from ddpm_hf.config import config_from_dict
    from ddpm_hf.training import train

    root = tmp_path_factory.mktemp("conditional")
    (root / "unet.json").write_text(json.dumps(MICRO_UNET))
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    options = quick_options(root / "run", str(root / "unet.json"), class_conditional=True, sample_every=4, num_sample_images=20, sample_steps=3)
    train(config_from_dict(options))
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return root / "run"


def test_the_saved_pipeline_is_the_class_conditional_one_with_the_class_names(conditional_run):
    from diffusers import DiffusionPipeline

    index = json.loads((conditional_run / "model_index.json").read_text())
    assert index["_class_name"] == ["ddpm_class_conditional", "DDPMClassConditionalPipeline"]
    assert index["id2label"] == {str(i): name for i, name in enumerate(CIFAR10_NAMES)}  # DiTPipeline's convention
    assert json.loads((conditional_run / "unet" / "config.json").read_text())["num_class_embeds"] == 11  # 10 classes + the null label
    assert (conditional_run / "ddpm_class_conditional.py").read_bytes() == open(PIPELINE_FILE, "rb").read()
    config = json.loads((conditional_run / "training_config.json").read_text())
    assert config["class_conditional"] is True and config["label_dropout"] == 0.1

    pipeline = DiffusionPipeline.from_pretrained(str(conditional_run), custom_pipeline="ddpm_class_conditional", trust_remote_code=True)
    assert pipeline.class_names == CIFAR10_NAMES
    images = pipeline(class_labels=["cat", 3], guidance_scale=2.0, num_inference_steps=3, output_type="np").images
    assert images.shape == (2, 16, 16, 3)


def test_the_training_grid_has_one_row_per_class(conditional_run):
    grid = Image.open(conditional_run / "samples" / "step_0000004.png")
    assert grid.size == (2 * 16, 10 * 16)  # 20 images asked: 10 classes x 2, one row each


def test_an_unconditional_run_saved_into_the_folder_later_leaves_no_conditional_pipeline_file(conditional_run, tmp_path):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    from ddpm_hf.training import save_pipeline

    folder = tmp_path / "folder"
    save_pipeline(tiny_conditional_unet(), DDPMScheduler(num_train_timesteps=10), str(folder), ["a", "b", "c"])
    assert (folder / "ddpm_class_conditional.py").is_file()
    save_pipeline(UNet2DModel(**MICRO_UNET, sample_size=8), DDPMScheduler(num_train_timesteps=10), str(folder))
    assert not (folder / "ddpm_class_conditional.py").exists()
    assert DDPMPipeline.from_pretrained(str(folder)).unet.config.num_class_embeds is None  # stock diffusers loads it again


def test_batch_labels_are_the_labels_of_the_batch_images():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 3, 2, 2).contiguous()  # image i is all i
    labels = torch.arange(10) % 3
    batches = ImageBatches(images, seed=0, random_flip=True, device=torch.device("cpu"), labels=labels)
    for start in (0, 7, 13):  # within an epoch and across one
        x = batches.batch(start, 6)
        image_ids = ((x[:, 0, 0, 0] + 1) * 127.5).round().long()
        assert torch.equal(batches.batch_labels(start, 6), labels[image_ids])


def test_label_dropout_replaces_labels_with_the_null_id_at_the_rate_asked():
    labels = torch.randint(0, 10, (20_000,), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    dropped = drop_labels(labels, 0.1, null_id=10)
    null = dropped == 10
    assert 0.09 < null.float().mean() < 0.11
    assert torch.equal(dropped[~null], labels[~null])
    assert torch.equal(drop_labels(labels, 0.0, 10), labels)


def test_training_reaches_the_unet_with_the_batch_labels(tmp_path, micro_unet_config, train_in_process, monkeypatch):
    """Every training forward pass gets one label per image, of the dataset's, some dropped to the null id 10."""
    from diffusers import UNet2DModel

    seen = []
    forward = UNet2DModel.forward

    def spy(self, sample, timestep, class_labels=None, **kwargs):
        if self.training:
            seen.append(None if class_labels is None else class_labels.clone())
        return forward(self, sample, timestep, class_labels=class_labels, **kwargs)

    monkeypatch.setattr(UNet2DModel, "forward", spy)
    train_in_process(**quick_options(tmp_path / "run", micro_unet_config, class_conditional=True, label_dropout=0.5, max_train_steps=6))
    assert len(seen) == 6 and all(labels is not None and labels.shape == (8,) for labels in seen)
    everything = torch.cat(seen)
    assert everything.min() >= 0 and everything.max() <= 10
    assert 0 < (everything == 10).sum() < len(everything)  # dropped at about p = 0.5, not never or always


# ---- guided sampling ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sampler, steps, variance", [("ddpm", 5, "fixed_large"), ("ddim", 4, "fixed_large"), ("ddpm", 5, "learned_range"), ("dpmsolver", 3, "learned_range")]
)
def test_the_engine_and_the_hub_pipeline_make_the_same_guided_images(tmp_path, sampler, steps, variance):
    """`ddpm-hf sample` (generate_images) and pipelines/ddpm_class_conditional.py agree image for image, with per-image
    generators: the same guidance, the same use of a learned variance, for every sampler."""
    from diffusers import DDPMScheduler, DiffusionPipeline

    from ddpm_hf.distributed import item_generators
    from ddpm_hf.training import save_pipeline

    unet = tiny_conditional_unet(out_channels=6 if variance == "learned_range" else 3)
    save_pipeline(unet, DDPMScheduler(num_train_timesteps=20, variance_type=variance), str(tmp_path / "model"), ["a", "b", "c"])
    chosen = make_sampler(DDPMScheduler(num_train_timesteps=20, variance_type=variance), sampler, steps)
    labels = [2, 0, 1, 2]
    ours = gather_images(unet, chosen, 4, seed=7, batch_size=3, class_labels=labels, guidance_scale=2.5)

    pipeline = DiffusionPipeline.from_pretrained(str(tmp_path / "model"), custom_pipeline="ddpm_class_conditional", trust_remote_code=True)
    pipeline.scheduler = type(chosen.scheduler).from_config(chosen.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    theirs = pipeline(class_labels=labels, guidance_scale=2.5, num_inference_steps=steps, generator=item_generators(7, range(4)), output_type="pt").images
    theirs = (theirs.clamp(0, 1) * 255).round().to(torch.uint8)
    assert (ours.int() - theirs.int()).abs().max() <= 1


def test_guidance_is_the_papers_mix_in_one_forward_pass():
    """(1 + w) eps(x, c) - w eps(x, null) with w = s - 1, from one UNet call of batch 2B."""
    unet = tiny_conditional_unet()
    x, t, labels = torch.randn(3, 3, 8, 8), torch.tensor(5), torch.tensor([0, 1, 2])
    calls = []
    handle = unet.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    with torch.no_grad():
        guided = guided_model_output(unet, x, t, labels, guidance_scale=3.0)
        handle.remove()
        eps_c = unet(x, t, class_labels=labels).sample
        eps_u = unet(x, t, class_labels=torch.full_like(labels, 3)).sample
    w = 3.0 - 1
    assert calls == [6]
    torch.testing.assert_close(guided, (1 + w) * eps_c - w * eps_u, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(guided_model_output(unet, x, t, labels, 0.0), eps_u, atol=1e-5, rtol=1e-5)


def test_class_shares_and_balanced_labels():
    assert labels_in_blocks([3, 5], 5) == [3, 3, 3, 5, 5]
    assert labels_in_blocks([1, 2, 0], 6) == [1, 1, 2, 2, 0, 0]
    counts = np.bincount(balanced_labels(10, 50_000))
    assert counts.tolist() == [5000] * 10


def test_an_image_depends_on_its_index_and_label_only(tmp_path):
    from diffusers import DDPMScheduler

    unet = tiny_conditional_unet()
    chosen = make_sampler(DDPMScheduler(num_train_timesteps=20), "ddpm", 4)
    together = gather_images(unet, chosen, 6, seed=3, batch_size=6, class_labels=[0, 1, 2, 0, 1, 2], guidance_scale=2.0)
    apart = gather_images(unet, chosen, 6, seed=3, batch_size=2, class_labels=[0, 1, 2, 0, 1, 2], guidance_scale=2.0)
    other_labels = gather_images(unet, chosen, 6, seed=3, batch_size=2, class_labels=[2, 1, 0, 0, 1, 2], guidance_scale=2.0)
    assert torch.equal(together, apart)
    for i in (1, 3, 4, 5):  # the same label: the same image
        assert torch.equal(other_labels[i], together[i])
    for i in (0, 2):  # the same noise, another class: another image
        assert not torch.equal(other_labels[i], together[i])


def test_sample_cli_draws_the_classes_asked_in_rows(conditional_run, tmp_path, capsys):
    out = tmp_path / "cats_dogs.png"
    code, _ = run_cli(["sample", "--model", str(conditional_run), "--class_labels", "cat,dog", "--guidance_scale", "2.0", "--num_images", "6",
                       "--scheduler", "ddim", "--steps", "3", "--save_individual", "--out", str(out), "--device", "cpu"], capsys)  # fmt: skip
    assert code == 0
    assert Image.open(out).size == (3 * 16, 2 * 16)  # two rows: cat, dog
    # image 0 (a cat) and image 3 (a dog) start from different noise; re-drawn as dog and cat they change
    swapped = tmp_path / "dogs_cats.png"
    run_cli(["sample", "--model", str(conditional_run), "--class_labels", "dog,cat", "--guidance_scale", "2.0", "--num_images", "6",
             "--scheduler", "ddim", "--steps", "3", "--save_individual", "--out", str(swapped), "--device", "cpu"], capsys)  # fmt: skip
    first = np.asarray(Image.open(tmp_path / "cats_dogs" / "00000.png"))
    assert not np.array_equal(first, np.asarray(Image.open(tmp_path / "dogs_cats" / "00000.png")))


# ---- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--class_labels", "tiger"], "--class_labels: unknown class 'tiger'. Known classes: airplane, automobile"),
        (["--class_labels", "cat,12"], "class id 12 is out of range: this model has 10 classes, ids 0..9"),
        (["--class_labels", "cat,dog,ship"], "--num_images 2 is fewer than the 3 classes asked for"),
    ],
)
def test_sample_refuses_unknown_classes_in_one_line(conditional_run, tmp_path, capsys, arguments, message):
    code, err = run_cli(["sample", "--model", str(conditional_run), "--num_images", "2", "--steps", "4", "--scheduler", "ddim",
                         "--out", str(tmp_path / "x.png"), "--device", "cpu", *arguments], capsys)  # fmt: skip
    assert code != 0 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("arguments, option", [(["--guidance_scale", "2"], "--guidance_scale"), (["--class_labels", "3"], "--class_labels")])
def test_guidance_or_labels_on_an_unconditional_model_is_a_one_line_error(tmp_path, capsys, arguments, option):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    DDPMPipeline(unet=UNet2DModel(**MICRO_UNET, sample_size=8), scheduler=DDPMScheduler(num_train_timesteps=10)).save_pretrained(tmp_path / "model")
    code, err = run_cli(["sample", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "x.png"), "--device", "cpu", *arguments], capsys)
    assert code != 0 and len(err) == 1 and f"{option} needs a class-conditional model" in err[0] and "--class_conditional" in err[0], err


def _image_folder(root, with_classes: bool):
    rng = np.random.default_rng(0)
    for i in range(8):
        folder = root / (f"class{i % 2}" if with_classes else "")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return str(root)


def _parquet(path, labels, feature=None):
    import datasets

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)) for _ in labels]
    features = datasets.Features({"img": datasets.Image(), "label": feature or datasets.Value("int64")})
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict({"img": images, "label": labels}, features=features).to_parquet(str(path))
    return str(path)


@pytest.mark.parametrize(
    "make_dataset, options, message",
    [
        (lambda root: _image_folder(root, with_classes=False), {}, "--class_conditional needs a column of class labels, but found no label column"),
        (lambda root: _image_folder(root, with_classes=True), {"label_column": "kind"}, "--label_column kind: no such column; the dataset has: image, label"),
        (lambda root: _parquet(root / "a.parquet", [0, 1, -3, 1]), {}, "row 2 of the dataset has label -3, out of range"),
        (lambda root: _parquet(root / "b.parquet", [0, 1, 1, 0], __import__("datasets").Value("float32")), {}, "holds float32 values, not class labels"),
        (lambda root: _parquet(root / "c.parquet", [0, 0, 0, 0]), {}, "the labels name 1 class; a class-conditional model needs at least 2"),
    ],
)
def test_bad_labels_stop_training_before_anything_is_written(tmp_path, micro_unet_config, train_in_process, make_dataset, options, message):
    dataset = make_dataset(tmp_path / "data")
    output = tmp_path / "run"
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(".", r"\.")):
        train_in_process(**quick_options(output, micro_unet_config, dataset=dataset, resolution=8, max_train_samples=None, train_batch_size=4,
                                         class_conditional=True, **options))  # fmt: skip
    assert not output.exists()


def test_a_missing_class_label_names_its_row(tmp_path, micro_unet_config, train_in_process):
    import datasets

    dataset = _parquet(tmp_path / "data" / "d.parquet", [0, -1, 1, 0], datasets.ClassLabel(names=["x", "y"]))
    with pytest.raises(UserError, match="row 1 of the dataset has no label in column 'label'"):
        train_in_process(**quick_options(tmp_path / "run", micro_unet_config, dataset=dataset, resolution=8, max_train_samples=None,
                                         train_batch_size=4, class_conditional=True))  # fmt: skip


def test_label_options_without_class_conditional_are_refused(tmp_path, micro_unet_config, train_in_process):
    with pytest.raises(UserError, match="--label_dropout only applies to class-conditional training: add --class_conditional"):
        train_in_process(**quick_options(tmp_path / "run", micro_unet_config, label_dropout=0.2))


def test_init_from_a_model_of_another_kind_is_refused(conditional_run, tmp_path, micro_unet_config, train_in_process):
    with pytest.raises(UserError, match="is a model of 10 classes, but this run trains an unconditional model"):
        train_in_process(**quick_options(tmp_path / "run", None, init_from=str(conditional_run)))


def test_string_labels_become_sorted_class_names(tmp_path, micro_unet_config, train_in_process):
    import datasets

    dataset = _parquet(tmp_path / "data" / "e.parquet", ["dog", "cat", "dog", "cat"], datasets.Value("string"))
    train_in_process(**quick_options(tmp_path / "run", micro_unet_config, dataset=dataset, resolution=8, max_train_samples=None,
                                     train_batch_size=4, max_train_steps=1, class_conditional=True))  # fmt: skip
    assert json.loads((tmp_path / "run" / "model_index.json").read_text())["id2label"] == {"0": "cat", "1": "dog"}


# ---- two processes -------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_process_conditional_training_resumes_exactly_and_samples_as_one_process(tmp_path, micro_unet_config):
    """Two gloo processes: a run straight to step 4, and one resumed at step 2 from the first's checkpoint, end with the
    same weights (labels and their dropout are drawn per step, whatever the process); `ddpm-hf sample --class_labels`
    writes the same files on one and on two processes."""
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")

    def launch(processes, arguments, module=False):
        target = ["-m", "ddpm_hf"] if module else [os.path.join(REPO_ROOT, "train_ddpm.py")]
        command = [sys.executable, *target] if processes == 1 else [torchrun, "--standalone", "--nproc_per_node", str(processes), *target]
        result = subprocess.run([*command, *arguments], capture_output=True, text=True, env=offline_env(), timeout=600)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
        return result

    def training(output_dir, *extra):
        options = quick_options(output_dir, micro_unet_config, class_conditional=True, label_dropout=0.3, max_train_steps=4, checkpoint_every=2, checkpoints_total_limit=2,
                                random_flip=True, dropout=0.1)  # fmt: skip
        return as_flags(options) + list(extra)

    launch(2, training(tmp_path / "straight"))
    resumed = launch(2, training(tmp_path / "resumed", "--resume_from_checkpoint", str(tmp_path / "straight" / "checkpoints" / "checkpoint-0000002")))
    assert "at step 2" in resumed.stdout
    for name in ("model.safetensors", "ema_unet.safetensors"):
        a = load_file(str(tmp_path / "straight" / "checkpoints" / "checkpoint-0000004" / name))
        b = load_file(str(tmp_path / "resumed" / "checkpoints" / "checkpoint-0000004" / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name

    files = {}
    for processes in (1, 2):
        out = tmp_path / f"p{processes}" / "grid.png"
        launch(processes, ["sample", "--model", str(tmp_path / "resumed"), "--class_labels", "cat,ship,1", "--guidance_scale", "3", "--num_images", "5",
                           "--steps", "3", "--scheduler", "ddim", "--batch_size", "2", "--save_individual", "--out", str(out), "--device", "cpu"],
               module=True)  # fmt: skip
        files[processes] = {p.name: p.read_bytes() for p in sorted((out.parent / "grid").iterdir())}
    assert len(files[1]) == 5 and files[1] == files[2]


# ---- the other commands on a conditional model --------------------------------------------------------


def test_visualize_reverse_draws_a_conditional_model(conditional_run, tmp_path, capsys):
    out = tmp_path / "reverse.png"
    code, err = run_cli(["visualize", "reverse", "--model", str(conditional_run), "--seeds", "0,1", "--scheduler", "ddim", "--steps", "3",
                         "--timesteps", "999,0", "--out", str(out), "--device", "cpu"], capsys)  # fmt: skip
    assert code == 0 and out.is_file(), err


def test_the_bound_of_a_conditional_model_is_that_of_its_null_label():
    from diffusers import DDPMScheduler

    from ddpm_hf.nll import bits_per_dim

    unet, scheduler = tiny_conditional_unet(), DDPMScheduler(num_train_timesteps=20)
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    before = bits_per_dim(unet, scheduler, images, progress=False)
    assert before["class_label"] == "null (unconditional)" and np.isfinite(before["bits_per_dim"])
    with torch.no_grad():
        unet.class_embedding.weight[0].add_(3.0)  # a class the bound does not use
    assert bits_per_dim(unet, scheduler, images, progress=False)["bits_per_dim"] == before["bits_per_dim"]
    with torch.no_grad():
        unet.class_embedding.weight[3].add_(3.0)  # the null label, id K = 3
    assert bits_per_dim(unet, scheduler, images, progress=False)["bits_per_dim"] != before["bits_per_dim"]


def test_compiling_a_conditional_unet_checks_it_with_labels(tmp_path, micro_unet_config, train_in_process, monkeypatch):
    """--compile runs one forward/backward to catch a failing compiler; that check must give a conditional UNet its
    labels, or every conditional run on a GPU would fall back to eager mode."""
    import warnings

    monkeypatch.setattr(torch, "compile", lambda fn, *args, **kwargs: fn)  # "compiles" at once, runs eagerly
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="torch.compile failed", category=RuntimeWarning)
        train_in_process(**quick_options(tmp_path / "run", micro_unet_config, class_conditional=True, compile="yes", max_train_steps=1))

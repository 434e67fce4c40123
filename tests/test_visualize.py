"""Pictures of the diffusion process: each figure is written, has its expected size, is not blank, and is labelled.

The reverse chain is the stock pipelines' chain (same seeds, same images); the forward rows follow Eq. 4.
"""

import json
import os

import numpy as np
import pytest
import torch
from conftest import quick_options
from PIL import Image

from ddpm_hf import visualize
from ddpm_hf.cli import main
from ddpm_hf.run_folder import RunFolder

pytestmark = pytest.mark.usefixtures("one_thread")


def png_size(path) -> tuple[int, int]:
    return Image.open(path).size


def pixel_std(path) -> float:
    return float(np.asarray(Image.open(path).convert("L"), dtype=np.float64).std())


def ink(path) -> float:
    """Fraction of coloured pixels. Titles, labels, ticks and frames are grey-scale: an empty labelled figure scores 0
    (while its pixel std is already ~24), a curve in colour a few thousandths, a montage of images most of the picture."""
    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.int64)
    return float(((rgb.max(axis=-1) - rgb.min(axis=-1)) > 40).mean())


def assert_not_blank(path, montage: bool) -> None:
    assert pixel_std(path) > 20, f"{path}: nearly uniform"
    assert ink(path) > (0.1 if montage else 0.001), f"{path}: labels but (almost) nothing drawn"


def figure_pixels(figure) -> tuple[int, int]:
    width, height = figure.get_size_inches() * visualize.DPI
    return round(width), round(height)


def assert_labelled(figure) -> None:
    """Every plot of the figure has a title and both axis labels (colour bars aside)."""
    axes = [a for a in figure.get_axes() if not hasattr(a, "_colorbar")]
    assert axes
    for a in axes:
        assert a.get_title() and a.get_xlabel() and a.get_ylabel(), f"unlabelled axes: title={a.get_title()!r} x={a.get_xlabel()!r} y={a.get_ylabel()!r}"


def run_cli(argv, capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def one_error_line(err: str) -> str:
    """The CLI reports a user error as a single `error: ...` line (progress bars aside)."""
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def train_micro(train_in_process, tmp_path, micro_unet_config, **overrides) -> str:
    output_dir = tmp_path / "run"
    train_in_process(**quick_options(output_dir, micro_unet_config, **overrides))
    return str(output_dir)


# ---------------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def few_images():
    from ddpm_hf.data import decode_images, load_image_dataset

    return decode_images(load_image_dataset("builtin:cifar10-1k").select(range(3)), 16, progress=False).images


def test_forward_rows_follow_eq_4_with_one_noise_per_image(few_images):
    from ddpm_hf.config import config_from_dict
    from ddpm_hf.data import to_model_range
    from ddpm_hf.mistakes import correlation
    from ddpm_hf.models import build_scheduler

    abar = build_scheduler(config_from_dict({})).alphas_cumprod
    x_0 = to_model_range(few_images)
    x_t = visualize.noised_images(x_0, abar, (0, 500, 999), seed=3)
    assert x_t.shape == (3, 3, *x_0.shape[1:])
    eps = torch.randn(x_0.shape, generator=torch.Generator().manual_seed(3))
    for k, t in enumerate((0, 500, 999)):
        assert torch.allclose(x_t[:, k], abar[t].sqrt() * x_0 + (1 - abar[t]).sqrt() * eps, atol=1e-6)
    assert correlation(x_t[:, 0], x_0) > 0.99 and abs(correlation(x_t[:, 2], x_0)) < 0.05


def test_forward_cli_writes_a_labelled_figure_one_row_per_image(tmp_path, capsys, few_images):
    from ddpm_hf.config import config_from_dict
    from ddpm_hf.models import build_scheduler

    paths = {}
    for count in (2, 3):
        paths[count] = tmp_path / f"forward{count}.png"
        code, err = run_cli(["visualize", "forward", "--num_images", str(count), "--resolution", "16", "--out", str(paths[count])], capsys)
        assert code == 0, err
        assert_not_blank(paths[count], montage=True)
    figure = visualize.forward_figure(few_images, build_scheduler(config_from_dict({})))
    assert_labelled(figure)
    assert png_size(paths[3]) == figure_pixels(figure)  # the same 3 images, 7 timesteps
    (w2, h2), (w3, h3) = png_size(paths[2]), png_size(paths[3])
    assert w2 == w3 and h3 - h2 == visualize.DPI  # one inch per image row
    # The plots show both schedules whatever is configured, and mark the configured one.
    cosine = visualize.forward_figure(few_images, build_scheduler(config_from_dict({"beta_schedule": "squaredcos_cap_v2"})))
    legend = [t.get_text() for t in cosine.get_axes()[1].get_legend().get_texts()]
    assert legend == ["linear", "cosine (configured)"]


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--timesteps", "0,1000"], "timesteps run from 0 to 999"),
        (["--timesteps", "0,a"], "whole numbers"),
        (["--num_images", "0"], "--num_images: must be >= 1, got 0"),
        (["--dataset", "./no/such/folder"], "no such file or folder"),
        (["--beta_start", "0.5"], "beta_start"),
    ],
)
def test_forward_cli_errors_say_what_to_fix(tmp_path, capsys, arguments, message):
    out = tmp_path / "forward.png"
    code, err = run_cli(["visualize", "forward", "--out", str(out), *arguments], capsys)
    assert code == 2 and message in one_error_line(err)
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# reverse
# ---------------------------------------------------------------------------------------------


K_CLASSES = 2
REVERSE_MODELS = {  # the three kinds of model issue 24 met `visualize reverse` on
    "fixed variance": ({}, {"variance_type": "fixed_large"}),
    "learned variance": ({"out_channels": 6}, {"variance_type": "learned_range"}),
    "class-conditional, learned variance": ({"out_channels": 6, "num_class_embeds": K_CLASSES + 1}, {"variance_type": "learned_range"}),
}


@pytest.fixture(scope="module")
def reverse_models(tmp_path_factory, one_thread_per_module):
    """Untrained micro pipelines (T = 50, 8x8) of each kind, saved as training saves them."""
    from conftest import MICRO_UNET
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    from ddpm_hf.conditioning import make_conditional_pipeline_folder

    folders = {}
    for kind, (unet_options, scheduler_options) in REVERSE_MODELS.items():
        torch.manual_seed(0)
        unet = UNet2DModel(**{**MICRO_UNET, **unet_options}, sample_size=8)
        folder = tmp_path_factory.mktemp("reverse_model")
        DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=50, **scheduler_options)).save_pretrained(folder)
        if "num_class_embeds" in unet_options:
            make_conditional_pipeline_folder(str(folder), ["cat", "dog"])
        folders[kind] = str(folder)
    return folders


def as_uint8(x: torch.Tensor) -> torch.Tensor:
    return ((x / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)


@pytest.mark.parametrize("kind", REVERSE_MODELS)
def test_reverse_figure_is_the_sampling_engine_for_every_sampler(kind, reverse_models, tmp_path, capsys):
    """Issue 24 item 1: the figure runs the one engine, for every sampler the factory offers (dpmsolver crashed:
    its step returns no x_0; ddim crashed on a learned variance), and seed s is image 0 of `ddpm-hf sample --seed s
    --num_images 1` with the same sampler (reverse seeded with manual_seed(s) and differed by 83/255 per pixel)."""
    from ddpm_hf.distributed import item_generators
    from ddpm_hf.sampling import SAMPLERS, gather_images, load_pipeline, make_sampler

    pipeline = load_pipeline(reverse_models[kind], device="cpu")
    conditional = "conditional" in kind
    labels, scale = ([1, 0], 2.0) if conditional else (None, 1.0)
    for name in SAMPLERS:  # the command, as a user runs it
        out = tmp_path / f"{name}.png"
        arguments = ["--class_labels", "dog,cat", "--guidance_scale", "2"] if conditional else []
        code, err = run_cli(
            ["visualize", "reverse", "--model", reverse_models[kind], "--scheduler", name, "--steps", "3", "--seeds", "4,7", "--device", "cpu", "--out", str(out), *arguments],
            capsys,
        )  # fmt: skip
        assert code == 0, (name, err)
        assert_not_blank(out, montage=True)
    for name in SAMPLERS:  # what it shows
        sampler = make_sampler(pipeline.scheduler, name, 3)
        chain = visualize.reverse_chain(pipeline.unet, sampler, [4, 7], (49, 0), class_labels=labels, guidance_scale=scale, class_names=["cat", "dog"])
        visited = [float(t) for t in sampler.scheduler.timesteps]
        assert chain.timesteps == [visited[0], visited[-1]], name
        assert chain.x_t.shape == chain.pred_x0.shape == (2, 2, 3, 8, 8) and chain.final.shape == (2, 3, 8, 8)
        assert torch.isfinite(chain.pred_x0).all(), name
        x_T = torch.randn((1, 3, 8, 8), generator=item_generators(7, range(1))[0])  # image 0 of seed 7's own generator
        scheduler = sampler.scheduler
        scheduler.set_timesteps(sampler.steps)  # x_t is what the network saw: x_T in the DDPM scale
        torch.testing.assert_close(chain.x_t[1, 0], scheduler.scale_model_input(x_T * scheduler.init_noise_sigma, scheduler.timesteps[0])[0])
        for i, seed in enumerate(chain.seeds):
            expected = gather_images(
                pipeline.unet, sampler, 1, seed, batch_size=1, class_labels=None if labels is None else [labels[i]], guidance_scale=scale
            )  # fmt: skip
            assert torch.equal(as_uint8(chain.final[i]), expected[0]), (name, seed)
    figure = visualize.reverse_figure(chain)
    assert_labelled(figure)
    if conditional:
        assert "dog" in figure.get_axes()[0].get_yticklabels()[0].get_text()


def test_reverse_seed_is_image_0_of_sample_with_that_seed(reverse_models, tmp_path, capsys):
    """The help's promise, command against command: the output column of `visualize reverse --seeds s` is the PNG of
    `ddpm-hf sample --seed s --num_images 1`, for a class-conditional model with its class and guidance."""
    from ddpm_hf.sampling import SAMPLERS, load_pipeline, make_sampler

    folder = reverse_models["class-conditional, learned variance"]
    pipeline = load_pipeline(folder, device="cpu")
    for name in SAMPLERS:  # the command, as a user runs it
        out = tmp_path / f"{name}.png"
        code, err = run_cli(
            ["sample", "--model", folder, "--scheduler", name, "--steps", "3", "--seed", "11", "--num_images", "1", "--class_labels", "dog", "--guidance_scale", "3", "--device", "cpu", "--out", str(out)],
            capsys,
        )  # fmt: skip
        assert code == 0, err
        sampler = make_sampler(pipeline.scheduler, name, 3)
        chain = visualize.reverse_chain(pipeline.unet, sampler, [11], (49, 0), class_labels=[1], guidance_scale=3.0, class_names=["cat", "dog"])
        assert chain.labels == ["dog"]
        assert np.array_equal(np.asarray(Image.open(out)), as_uint8(chain.final[0]).permute(1, 2, 0).numpy()), name


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--steps", "5000"], "must be between 1 and the model's T = 1000"),
        (["--seeds", ""], "--seeds is empty"),
        (["--timesteps", "-1"], "timesteps run from 0 to 999"),
        (["--scheduler", "nonsense"], "invalid choice: 'nonsense'"),
        (["--class_labels", "cat"], "--class_labels needs a class-conditional model"),
    ],
)
def test_reverse_cli_errors_say_what_to_fix(tmp_path, capsys, micro_unet_config, arguments, message):
    # A pipeline folder that loads: the untrained micro UNet with the paper's scheduler.
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    model = tmp_path / "model"
    unet = UNet2DModel(**json.loads(open(micro_unet_config).read()), sample_size=16)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(model)
    out = tmp_path / "reverse.png"
    code, err = run_cli(["visualize", "reverse", "--model", str(model), "--device", "cpu", "--out", str(out), *arguments], capsys)
    assert code == 2 and message in one_error_line(err)
    assert not out.exists()
    code, err = run_cli(["visualize", "reverse", "--model", str(tmp_path), "--out", str(out)], capsys)
    assert code == 2 and "not a saved pipeline" in err


# ---------------------------------------------------------------------------------------------
# figures written during training
# ---------------------------------------------------------------------------------------------


def test_training_figures_from_a_real_run(tmp_path, micro_unet_config, train_in_process):
    output_dir = train_micro(train_in_process, tmp_path, micro_unet_config, max_train_steps=6, logging_steps=1, sample_every=2)
    for name in (visualize.LOSS_FIGURE, visualize.PROGRESS_FIGURE):  # training may already have written them
        if os.path.exists(os.path.join(output_dir, name)):
            os.remove(os.path.join(output_dir, name))
    visualize.write_training_figures(output_dir)
    loss_png, progress_png = os.path.join(output_dir, visualize.LOSS_FIGURE), os.path.join(output_dir, visualize.PROGRESS_FIGURE)
    assert png_size(loss_png) == (800, 450)
    assert_not_blank(loss_png, montage=False)
    history = RunFolder(output_dir).loss_history()
    assert [s for s, _ in history] == [1, 2, 3, 4, 5, 6] and np.isfinite([loss for _, loss in history]).all()
    grids = RunFolder(output_dir).sample_grids()
    assert [s for s, _ in grids] == [2, 4, 6]
    figure = visualize.progress_figure(grids)
    assert_labelled(figure)
    assert png_size(progress_png) == figure_pixels(figure)
    assert_not_blank(progress_png, montage=True)


def test_loss_history_keeps_the_last_value_of_a_repeated_step(tmp_path):
    path = tmp_path / "loss_history.jsonl"
    lines = [{"step": 10, "loss": 1.0}, {"step": 20, "loss": 0.5}, {"step": 30, "loss": 0.4}, {"step": 20, "loss": 0.45}, {"step": 30, "loss": 0.3}]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"step": 40, "lo')  # resumed at 10; killed mid-line
    assert RunFolder(tmp_path).loss_history() == [(10, 1.0), (20, 0.45), (30, 0.3)]


def test_loss_figure_is_labelled_and_log_scaled_when_the_loss_spans_decades(tmp_path):
    steps = np.arange(1, 201) * 10
    falling = 1.0 / np.sqrt(steps) + 0.01 * np.random.default_rng(0).standard_normal(len(steps)) ** 2
    figure = visualize.loss_figure(steps, falling)
    assert_labelled(figure)
    assert figure.get_axes()[0].get_yscale() == "log"
    assert [line.get_label() for line in figure.get_axes()[0].get_lines()][1].startswith("smoothed")
    assert visualize.loss_figure(steps, 0.5 + 0.0 * steps).get_axes()[0].get_yscale() == "linear"
    path = visualize.save_figure(figure, str(tmp_path / "deep" / "loss.png"))
    assert png_size(path) == (800, 450)
    assert_not_blank(path, montage=False)


def test_smoothing_is_a_debiased_moving_average():
    assert visualize.smooth(np.full(50, 0.3), span=10) == pytest.approx(np.full(50, 0.3))  # no bias towards 0 at the start
    step = visualize.smooth(np.r_[np.ones(20), np.zeros(20)], span=5)
    assert step[19] == pytest.approx(1.0) and 0 < step[21] < 1 and step[-1] < 0.01


def test_progress_figure_subsamples_evenly_and_labels_steps(tmp_path):
    samples = tmp_path / "samples"
    samples.mkdir()
    generator = np.random.default_rng(0)
    for k in range(1, 13):
        size = 64 if k < 12 else 96  # a resumed run may change --num_sample_images
        Image.fromarray(generator.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(samples / f"step_{k * 1000:07d}.png")
    (samples / "notes.png").write_bytes(b"not a grid")
    grids = RunFolder(tmp_path).sample_grids()
    assert [s for s, _ in grids] == [k * 1000 for k in range(1, 13)]
    figure = visualize.progress_figure(grids)
    labels = [t.get_text() for t in figure.get_axes()[0].get_xticklabels()]
    assert len(labels) == visualize.MAX_PROGRESS_GRIDS and labels[0] == "step 1,000" and labels[-1] == "step 12,000"
    assert "8 of 12" in figure.get_axes()[0].get_title()
    assert_labelled(figure)
    few = visualize.progress_figure(grids[:3])
    assert figure_pixels(few)[0] < figure_pixels(figure)[0]
    path = visualize.save_figure(figure, str(tmp_path / "progress.png"))
    assert png_size(path) == figure_pixels(figure)
    assert_not_blank(path, montage=True)


def test_spread_keeps_first_and_last():
    assert visualize.spread(list(range(12)), 8) == [0, 2, 3, 5, 6, 8, 9, 11]
    assert visualize.spread([1, 2, 3], 8) == [1, 2, 3]


def test_write_training_figures_skips_what_does_not_exist_yet(tmp_path):
    visualize.write_training_figures(str(tmp_path))
    assert os.listdir(tmp_path) == []
    (tmp_path / "loss_history.jsonl").write_text(json.dumps({"step": 5, "loss": 0.9}) + "\n")
    visualize.write_training_figures(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["loss.png", "loss_history.jsonl"]


def test_the_blank_check_rejects_a_labelled_but_empty_figure(tmp_path):
    figure = visualize._new_figure(*visualize.LOSS_FIGSIZE)
    figure.subplots().set(title="Training loss", xlabel="optimizer step", ylabel="loss")
    path = visualize.save_figure(figure, str(tmp_path / "empty.png"))
    with pytest.raises(AssertionError, match="nothing drawn"):
        assert_not_blank(path, montage=False)


def test_a_damaged_sample_grid_is_a_warning_not_the_end_of_training(tmp_path):
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / "step_0000010.png").write_bytes(b"half a png")
    (tmp_path / "loss_history.jsonl").write_text(json.dumps({"step": 10, "loss": 0.9}) + "\n")
    with pytest.warns(UserWarning, match="progress.png"):
        visualize.write_training_figures(str(tmp_path))
    assert (tmp_path / "loss.png").is_file() and not (tmp_path / "progress.png").exists()

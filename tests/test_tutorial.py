"""docs/tutorial.md runs as written, and the "Four common mistakes" numbers hold.

The page follows three conventions, which this file enforces:

  - Every ```python block runs, in order, in one namespace, in an empty folder. An HTML comment right before a block,
    `<!-- tutorial-test: NAME = VALUE; NAME = VALUE -->`, replaces that block's line `NAME = ...` with a smaller value
    (a NAME the block does not assign fails the test); `<!-- tutorial-test: skip -->` skips the block.
  - A ```text block right after a ```python block is what that block prints, checked line by line.
  - Every picture the page shows, `images/NAME.png`, is written by its code, and committed in docs/images/.

`python tests/test_tutorial.py` runs the page at full scale and rewrites docs/images/ (about ten minutes on a CPU).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import sys
import tempfile

import numpy as np
import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
DOCS = os.path.join(os.path.dirname(HERE), "docs")
TUTORIAL = os.path.join(DOCS, "tutorial.md")
MAX_PNG_BYTES = 300_000

_FENCE = re.compile(r"^```(\w*)[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
_DIRECTIVE = re.compile(r"<!--\s*tutorial-test:(.*?)-->\s*\Z", re.DOTALL)
_PICTURE = re.compile(r"!\[[^\]]*\]\((images/[^)\s]+\.png)\)")


def tutorial_blocks(text: str) -> list[dict]:
    """The ```python blocks of the page: code, directive (text of the comment before it, or ''), expected output."""
    fences = list(_FENCE.finditer(text))
    blocks = []
    for i, fence in enumerate(fences):
        if fence.group(1) != "python":
            continue
        before = text[fences[i - 1].end() if i else 0 : fence.start()]
        directive = _DIRECTIVE.search(before)
        expected = None
        if i + 1 < len(fences) and fences[i + 1].group(1) == "text" and not text[fence.end() : fences[i + 1].start()].strip():
            expected = fences[i + 1].group(2)
        line = text.count("\n", 0, fence.start()) + 1
        blocks.append(dict(code=fence.group(2), directive=directive.group(1).strip() if directive else "", expected=expected, line=line))
    return blocks


def apply_directive(code: str, directive: str, line: int) -> str | None:
    """The block's code at test scale, or None to skip it."""
    if directive == "skip":
        return None
    for assignment in filter(None, (a.strip() for a in directive.split(";"))):
        name, _, value = (part.strip() for part in assignment.partition("="))
        pattern = re.compile(rf"^{re.escape(name)} = .*$", re.MULTILINE)
        if len(pattern.findall(code)) != 1:
            raise AssertionError(f"docs/tutorial.md line {line}: the directive sets {name!r}, but the block does not assign `{name} = ...` exactly once")
        code = pattern.sub(lambda _, assignment=f"{name} = {value}": assignment, code)  # a function: backslashes in the value stay literal
    return code


def run_tutorial(workdir: str, test_scale: bool) -> dict:
    """Run every block in `workdir`; returns the namespace. Checks the printed outputs the page shows."""
    from accelerate.state import AcceleratorState, GradientState

    with open(TUTORIAL) as f:
        blocks = tutorial_blocks(f.read())
    namespace: dict = {"__name__": "__tutorial__"}
    previous = os.getcwd()
    os.chdir(workdir)
    try:
        for block in blocks:
            code = apply_directive(block["code"], block["directive"], block["line"]) if test_scale else block["code"]
            if code is None:
                continue
            AcceleratorState._reset_state(reset_partial_state=True)
            GradientState._reset_state()
            printed = io.StringIO()
            try:
                with contextlib.redirect_stdout(printed):
                    exec(compile(code, f"docs/tutorial.md:{block['line']}", "exec"), namespace)
            except Exception as e:
                raise AssertionError(f"the block at docs/tutorial.md line {block['line']} failed: {type(e).__name__}: {e}") from e
            if block["expected"] is not None:
                got = [line.rstrip() for line in printed.getvalue().rstrip().splitlines()]
                want = [line.rstrip() for line in block["expected"].rstrip().splitlines()]
                assert got == want, f"docs/tutorial.md line {block['line']}: the block prints\n" + "\n".join(got) + "\nbut the page shows\n" + "\n".join(want)
    finally:
        os.chdir(previous)
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    return namespace


def produced_pictures(workdir: str, namespace: dict) -> dict[str, str]:
    """'images/NAME.png' -> the file the run wrote: images/ itself, plus the training figures of its OUTPUT_DIR."""
    from ddpm_hf.visualize import LOSS_FIGURE, PROGRESS_FIGURE

    found = {f"images/{name}": os.path.join(workdir, "images", name) for name in os.listdir(os.path.join(workdir, "images")) if name.endswith(".png")}
    for name in (LOSS_FIGURE, PROGRESS_FIGURE):
        path = os.path.join(workdir, namespace["output_dir"], name)
        if os.path.isfile(path):
            found[f"images/{name}"] = path
    return found


def assert_not_blank(path: str) -> None:
    """Not uniform (pixel std), and more than labels: some coloured pixels (text and frames are grey-scale)."""
    from PIL import Image

    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.int64)
    assert rgb.mean(axis=-1).std() > 20, f"{path} is nearly uniform"
    assert ((rgb.max(axis=-1) - rgb.min(axis=-1)) > 40).mean() > 0.001, f"{path} has labels but (almost) nothing drawn"


@pytest.mark.slow
def test_tutorial_runs_prints_what_it_shows_and_draws_every_picture(tmp_path, monkeypatch, one_thread):
    from ddpm_hf import config

    # Quickstart scale, smaller still: fewer and cheaper sample grids during the (already shortened) training.
    monkeypatch.setitem(
        config.PRESETS, "quickstart", dict(config.PRESETS["quickstart"], num_sample_images=4, sample_steps=5, checkpoint_every=0, logging_steps=1)
    )
    namespace = run_tutorial(str(tmp_path), test_scale=True)

    with open(TUTORIAL) as f:
        shown = set(_PICTURE.findall(f.read()))
    produced = produced_pictures(str(tmp_path), namespace)
    assert shown == set(produced), f"pictures shown but not drawn: {sorted(shown - set(produced))}; drawn but not shown: {sorted(set(produced) - shown)}"
    for name, path in produced.items():
        assert_not_blank(path)
        committed = os.path.join(DOCS, name)
        assert os.path.isfile(committed), f"{name} is not in docs/: run `python tests/test_tutorial.py`"
        assert os.path.getsize(committed) < MAX_PNG_BYTES, f"docs/{name} is {os.path.getsize(committed):,} bytes; keep pictures under {MAX_PNG_BYTES:,}"
        assert_not_blank(committed)
    assert namespace["result"].step == 4 and namespace["chain"].sampler == "ddpm 10 steps"  # the directives took effect


def test_directives_replace_assignments_and_refuse_unknown_names():
    code = "max_train_steps = 500  # full\nother = max_train_steps\n"
    assert apply_directive(code, "max_train_steps = 4", 1) == "max_train_steps = 4\nother = max_train_steps\n"
    assert apply_directive(code, "skip", 1) is None
    with pytest.raises(AssertionError, match="does not assign"):
        apply_directive(code, "num_steps = 4", 7)
    blocks = tutorial_blocks("<!-- tutorial-test: a = 1 -->\n```python\na = 2\nprint(a)\n```\n\n```text\n2\n```\n```python\nb = 3\n```\n")
    assert [(b["code"], b["directive"], b["expected"]) for b in blocks] == [("a = 2\nprint(a)\n", "a = 1", "2\n"), ("b = 3\n", "", None)]


# ---------------------------------------------------------------------------------------------
# The numbers of "Four common mistakes"
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cifar():
    """(uint8 images, x_0 in [-1, 1], the paper's linear schedule): what the tutorial measures on."""
    from ddpm_hf.config import config_from_dict
    from ddpm_hf.data import decode_images, load_image_dataset, to_model_range
    from ddpm_hf.models import build_scheduler

    images = decode_images(load_image_dataset("builtin:cifar10-1k"), 32, progress=False).images
    return images, to_model_range(images), build_scheduler(config_from_dict({"preset": "quickstart"}))


def test_single_beta_noising_keeps_the_image_and_the_papers_rule_removes_it(cifar):
    from ddpm_hf.losses import q_sample
    from ddpm_hf.mistakes import compare_noising_rules, correlation, noise_with_single_beta

    _, x_0, scheduler = cifar
    result = compare_noising_rules(x_0, scheduler, t=999, seed=0)
    assert result.signal_wrong == pytest.approx(0.98**0.5) and result.signal_right == pytest.approx(0.00635, abs=5e-5)
    assert result.correlation_wrong > 0.9  # the tutorial: 0.96
    assert abs(result.correlation_right) < 0.01  # the tutorial: 0.003 (sqrt(abar_999) * std(x_0) = 0.0032)
    # The curves come from three moments; noising the pixels directly gives the same correlations.
    eps = torch.randn(x_0.numel(), generator=torch.Generator().manual_seed(0), dtype=torch.float64).reshape(x_0.shape)
    x_0 = x_0.double()
    for t in (0, 250, 999):
        right = q_sample(x_0, torch.full((x_0.shape[0],), t), eps, scheduler.alphas_cumprod.double())
        assert correlation(right, x_0) == pytest.approx(result.curve_right[t], abs=1e-6)
        assert correlation(noise_with_single_beta(x_0, t, eps, scheduler.betas.double()), x_0) == pytest.approx(result.curve_wrong[t], abs=1e-6)
    assert np.all(np.diff(result.curve_right) < 0) and result.curve_wrong.min() > 0.95


def test_a_t_blind_network_has_almost_the_same_loss_but_worse_samples(cifar):
    from ddpm_hf.mistakes import GaussianToy, compare_timestep_conditioning

    _, x_0, scheduler = cifar
    s = x_0.std().item()
    result = compare_timestep_conditioning(scheduler, s)
    # Ignoring t can only lose: the t-blind optimum is above the t-aware one, at every t up to quadrature error.
    assert np.all(result.loss_per_t_blind >= result.loss_per_t_aware - 1e-6)
    assert 1.02 < result.loss_t_blind / result.loss_t_aware < 1.15  # the tutorial: 0.182 vs 0.173
    assert result.loss_per_t_blind[0] > 1.1 and result.loss_per_t_aware[0] == pytest.approx(1.0, abs=0.01)  # the tutorial: 1.23 vs 1.00
    assert result.sample_std_t_aware == pytest.approx(s, abs=0.015)  # the t-aware sampler reproduces the data's spread
    assert result.sample_std_t_blind < 0.9 * s  # the tutorial: 0.41 vs 0.50

    # The quadrature is the Monte Carlo loss of the two predictors.
    toy, generator = GaussianToy(scheduler, s), np.random.default_rng(1)
    n = 400_000
    for t in (0, 60, 300):
        eps = generator.standard_normal(n)
        x_t = np.sqrt(toy.abar[t]) * s * generator.standard_normal(n) + np.sqrt(1 - toy.abar[t]) * eps
        for predict, expected in ((toy.eps_t_blind, result.loss_per_t_blind[t]), (toy.eps_t_aware, result.loss_per_t_aware[t])):
            squared = (eps - predict(x_t, t)) ** 2
            assert squared.mean() == pytest.approx(expected, abs=4 * squared.std() / np.sqrt(n))


def test_the_wrong_reverse_denominator_collapses_samples_of_a_perfect_network(cifar):
    from diffusers import DDPMScheduler

    from ddpm_hf.mistakes import GaussianToy, compare_reverse_steps, toy_reverse_chain

    _, x_0, scheduler = cifar
    s = x_0.std().item()
    result = compare_reverse_steps(scheduler, s)
    assert result.final_std_right == pytest.approx(s, abs=0.01)  # the tutorial: 0.50
    assert result.final_std_wrong < 0.5 * s  # the tutorial: 0.17
    toy = GaussianToy(scheduler, s, grid_points=3)
    for wrong, expected in ((False, result.final_std_right), (True, result.final_std_wrong)):
        samples, stds = toy_reverse_chain(toy, toy.eps_t_aware, num_samples=20_000, seed=3, wrong_denominator=wrong)
        assert samples.std() == pytest.approx(expected, rel=0.03)
        assert stds == pytest.approx(result.std_per_t_wrong if wrong else result.std_per_t_right, rel=0.03)

    # The stock diffusers step is the right one: the same perfect network through DDPMScheduler.step.
    stock = DDPMScheduler.from_config(scheduler.config, clip_sample=False)
    stock.set_timesteps(scheduler.config.num_train_timesteps)
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(20_000, 1, 1, 1, generator=generator, dtype=torch.float64)
    for t in stock.timesteps:
        eps_hat = torch.from_numpy(toy.eps_t_aware(x.numpy(), int(t)))
        x = stock.step(eps_hat, t, x, generator=generator).prev_sample
    assert x.std().item() == pytest.approx(result.final_std_right, rel=0.03)


def test_images_in_zero_one_have_a_quarter_of_the_signal_and_show_washed_out(cifar):
    from ddpm_hf.mistakes import compare_data_ranges

    images, x_0, scheduler = cifar
    result = compare_data_ranges(images, scheduler)
    assert result.variance_right == pytest.approx(4 * result.variance_wrong, rel=1e-9)
    assert result.snr_right == pytest.approx(4 * result.snr_wrong, rel=1e-9)
    assert result.noise_wins_wrong < 0.6 * result.noise_wins_right  # the tutorial: 73 vs 145
    assert result.snr_right[result.noise_wins_right] < 1 <= result.snr_right[result.noise_wins_right - 1]
    assert result.shown_min_wrong == 0.5 and result.shown_mean_wrong == pytest.approx(0.5 + (images.double() / 255).mean().item() / 2)
    assert result.shown_mean_right == pytest.approx((x_0.double().mean().item() + 1) / 2, abs=1e-6)


# ---------------------------------------------------------------------------------------------
# Regenerating docs/images/ at full scale
# ---------------------------------------------------------------------------------------------


def main() -> None:
    torch.set_num_threads(1)
    workdir = tempfile.mkdtemp(prefix="ddpm-tutorial-")
    print(f"running docs/tutorial.md at full scale in {workdir}", file=sys.stderr)
    namespace = run_tutorial(workdir, test_scale=False)
    target = os.path.join(DOCS, "images")
    os.makedirs(target, exist_ok=True)
    for name, path in sorted(produced_pictures(workdir, namespace).items()):
        shutil.copyfile(path, os.path.join(DOCS, name))
        print(f"docs/{name}: {os.path.getsize(path):,} bytes", file=sys.stderr)
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(HERE))
    main()

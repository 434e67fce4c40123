"""`ddpm-hf demo`: the page in a real browser (headless Chromium), through gradio_client, and its mistakes.

One demo server (`ddpm-hf demo` in a process of its own) serves a tiny class-conditional model for the whole module;
every check compares what the page gives with what `ddpm-hf sample` writes for the same model, sampler, steps and
seed. The browser is driven with the functions of scripts/demo_screenshot.py (which made the README's screenshot).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import MICRO_UNET, REPO_ROOT, offline_env
from PIL import Image

from ddpm_hf.cli import main
from ddpm_hf.conditioning import make_conditional_pipeline_folder
from ddpm_hf.run_folder import RunFolder
from ddpm_hf.sampling import SAMPLERS

sys.path.insert(0, os.path.join(REPO_ROOT, "scripts"))
import demo_screenshot as browser  # noqa: E402

CLASSES = ["cat", "dog", "ship"]
T = 20  # a short chain keeps every request fast


def save_model(folder: Path, class_names=CLASSES) -> Path:
    """A tiny model as training saves it: class-conditional (with names) when `class_names` is given."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(**MICRO_UNET, sample_size=16, num_class_embeds=len(class_names) + 1 if class_names else None)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=T)).save_pretrained(folder)
    if class_names:
        make_conditional_pipeline_folder(str(folder), class_names)
    return folder


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    folder = save_model(tmp_path_factory.mktemp("demo") / "model")
    # What the side panel shows: a FID and a bound, as `ddpm-hf evaluate` writes them.
    run = RunFolder(folder)
    run.write_eval(
        {"fid": 123.4, "num_samples": 1000, "scheduler": "ddim", "steps": 10, "nfe": 10, "seed": 0, "reference": "cifar10-test", "timestep_spacing": "leading"}
    )
    run.write_eval({"bits_per_dim": 7.891, "bits_per_dim_stderr": 0.012, "num_images": 64, "dataset": "cifar10", "split": "test"}, section="nll")
    return folder


@pytest.fixture(scope="module")
def demo(model):
    """The URL of `ddpm-hf demo --model MODEL`, served for the module."""
    with browser.demo_server(str(model), env=offline_env(GRADIO_ANALYTICS_ENABLED="False")) as url:
        yield url


def sample(model: Path, out: Path, **options) -> Path:
    """`ddpm-hf sample` with these options: the grid, and each image in the folder named after it."""
    words = ["sample", "--model", str(model), "--out", str(out), "--save_individual"]
    for name, value in options.items():
        words += [f"--{name}", str(value)]
    assert main(words) == 0
    return out


def individual_images(grid: Path, count: int) -> list[np.ndarray]:
    folder = grid.with_suffix("")
    return [np.asarray(Image.open(folder / f"{i:05d}.png").convert("RGB")) for i in range(count)]


def downscale(picture: np.ndarray, size: int) -> np.ndarray:
    """Undo the page's nearest-neighbour upscaling: one pixel of each factor x factor block."""
    factor = picture.shape[0] // size
    assert factor >= 2 and picture.shape[:2] == (size * factor, size * factor)  # shown bigger than the model's 16 px
    return picture[::factor, ::factor]


def test_the_page_in_a_browser_makes_the_images_of_ddpm_hf_sample_and_shows_the_reverse_process_live(demo, model, tmp_path, one_thread):
    if browser.find_chromium() is None:
        if os.environ.get("CI"):
            pytest.fail("CI must run the browser tests: .ci/run installs Debian's chromium and chromium-driver")
        pytest.skip("no Chromium and chromedriver on PATH (not in CI): install Debian's chromium and chromium-driver to run it")
    settings = {"sampler": "dpmsolver", "steps-input": 12, "seed": 7, "num-images": 4, "class": "dog", "guidance": 2.5}
    with browser.chromium() as driver:
        driver.get(demo)
        browser.wait_for(driver, "#generate")
        assert browser.dropdown_options(driver, "class") == CLASSES
        facts = driver.find_element("css selector", "#facts").text
        assert "FID: 123.40" in facts and "bits/dim: 7.891" in facts and "license: apache-2.0" in facts

        events = browser.generate(driver, settings, num_images=4)
        pictures = browser.sample_pictures(driver)
        summary = driver.find_element("css selector", "#summary").text
        driver.save_screenshot(str(tmp_path / "demo.png"))

    # The reverse process arrived step by step, before the samples: x_t pictures and step numbers as they were computed.
    before = [event for event in events if event["samples"] == 0]
    assert len({event["live"] for event in before if event["live"]}) >= 3, events
    steps_seen = [event["step"] for event in before if event["step"] and event["step"].startswith("Step")]
    assert len(set(steps_seen)) >= 3 and steps_seen[-1].startswith("Step 12 / 12"), steps_seen
    assert any(event["samples"] == 4 for event in events)

    expected = individual_images(
        sample(model, tmp_path / "cli.png", scheduler="dpmsolver", steps=12, seed=7, num_images=4, class_labels="dog", guidance_scale=2.5), 4
    )
    assert len(pictures) == 4
    for shown, made in zip(pictures, expected):
        np.testing.assert_array_equal(downscale(shown, 16), made)
    assert "ddpm-hf sample" in summary and "--class_labels dog --guidance_scale 2.5" in summary
    screenshot = Image.open(tmp_path / "demo.png")
    assert screenshot.format == "PNG" and screenshot.size[0] >= 1000


def test_the_api_gives_the_images_and_grid_of_ddpm_hf_sample(demo, model, tmp_path, one_thread):
    from gradio_client import Client

    client = Client(demo, verbose=False)
    result = client.predict("ddpm", T, 3, 6, "ship", 1.0, api_name="/generate")
    samples, download, summary = result[3], result[4], result[5]
    grid = sample(model, tmp_path / "cli.png", scheduler="ddpm", steps=T, seed=3, num_images=6, class_labels="ship")
    np.testing.assert_array_equal(np.asarray(Image.open(download["value"]).convert("RGB")), np.asarray(Image.open(grid).convert("RGB")))
    for shown, made in zip([np.asarray(Image.open(item["image"]).convert("RGB")) for item in samples], individual_images(grid, 6), strict=True):
        np.testing.assert_array_equal(downscale(shown, 16), made)
    assert "6 images in" in summary and "ddpm 20 steps, seed 3, class ship" in summary


def test_out_of_range_input_is_a_message_and_the_server_keeps_serving(demo):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    client = Client(demo, verbose=False)
    for arguments, message in [
        (("ddim", 0, 0, 2, "cat", 1.0), "Steps 0: give between 1 and the model's T = 20."),
        (("ddim", 5, 0, 17, "cat", 1.0), "Number of images 17: give between 1 and 16."),
        (("ddim", 5, -1, 2, "cat", 1.0), "Seed -1: give a seed of 0 or more."),
        (("ddim", 5, 0, 2, "cat", 99), "Guidance scale 99: give a value between 0 and 20"),
        (("dpmsolver", 20, 0, 2, "cat", 1.0), "Steps 20: dpmsolver takes 1 to 19 steps with this model"),  # as on the Space
    ]:
        with pytest.raises(AppError, match=message):
            client.predict(*arguments, api_name="/generate")
    with pytest.raises(AppError, match="zebra"):  # not one of the dropdown's classes
        client.predict("ddim", 5, 0, 2, "zebra", 1.0, api_name="/generate")
    result = client.predict("ddim", 5, 0, 2, "cat", 1.0, api_name="/generate")
    assert len(result[3]) == 2


def test_one_generation_at_a_time_and_the_others_wait_in_line(demo):
    """Two visitors at once: the second request waits, first in line, while the first one's frames keep coming."""
    from gradio_client import Client
    from gradio_client.utils import Status

    running = (Status.PROCESSING, Status.ITERATING)
    visitors = [Client(demo, verbose=False), Client(demo, verbose=False)]  # both pages open before anyone presses
    first = visitors[0].submit("ddpm", T, 0, 16, "cat", 2.0, api_name="/generate")  # T steps: a frame each
    while first.status().code not in running:
        time.sleep(0.005)
    second = visitors[1].submit("ddim", 4, 1, 2, "dog", 1.0, api_name="/generate")
    waited = []  # the first one's frames received so far, whenever the second was seen first in line meanwhile
    while not second.done():
        ours, theirs = second.status(), first.status()
        if ours.code == Status.IN_QUEUE and ours.rank == 0 and theirs.code in running:
            waited.append(len(first.outputs()))
        time.sleep(0.005)
    assert len(first.result()[3]) == 16 and len(second.result()[3]) == 2
    # A second generation let through at once would not have waited while the first sent frame after frame.
    assert waited and waited[-1] - waited[0] >= 2, waited


def test_an_unconditional_model_streams_its_reverse_process_and_ends_with_the_images_of_ddpm_hf_sample(tmp_path, one_thread):
    """The engine side of the page, without a server: frames while it samples, then what `ddpm-hf sample` makes."""
    from ddpm_hf.demo import DemoModel
    from ddpm_hf.space import sampler_settings
    from ddpm_hf.space_app import app

    folder = save_model(tmp_path / "uncond", class_names=None)
    model = DemoModel(str(folder))
    settings = model.page_settings()
    assert settings.classes is None and list(settings.samplers) == ["auto", *SAMPLERS] and settings.default_steps == T
    on_the_space = {name: [tuple(interval) for interval in chosen["steps"]] for name, chosen in sampler_settings(folder)["samplers"].items()}
    assert settings.accepted_steps == {"auto": [(1, T)], **on_the_space} and on_the_space["dpmsolver"] == [(1, T - 1)]  # as space.json has them
    calls = []
    model.unet.register_forward_hook(lambda *_: calls.append(1))
    updates = []
    for update in model.generate(app.check_request(settings, "ddim", 10, 4, 3)):
        updates.append((update, len(calls)))
    assert [made for _, made in updates] == [*range(1, 11), 10]  # each frame as soon as its step is computed, not at the end
    updates = [update for update, _ in updates]
    frames, result = updates[:-1], updates[-1]
    assert [frame.step for frame in frames] == list(range(1, 11)) and all(frame.num_steps == 10 for frame in frames)
    assert frames[0].x_t.shape == (16 * 8, 3 * 16 * 8, 3)  # three 16 px images side by side, enlarged 8 times: 384 px wide
    assert not np.array_equal(frames[0].pred_x0, frames[-1].pred_x0)  # the prediction changes as x_t is denoised
    grid = sample(folder, tmp_path / "cli.png", scheduler="ddim", steps=10, seed=4, num_images=3)
    np.testing.assert_array_equal(np.asarray(app.grid(result.images).convert("RGB")), np.asarray(Image.open(grid).convert("RGB")))
    assert result.sampler == "ddim 10 steps"


def test_a_hub_model_shows_its_cards_metadata_and_eval_json(hub_server, model, tmp_path):
    """`ddpm-hf demo --model user/name`: the model, its card and eval.json come from the Hub (here the local one)."""
    import subprocess

    from ddpm_hf.hub import HubPusher

    HubPusher("alice/cond-ddpm", hub_server.token, False, model, endpoint=hub_server.url, command="push").push_final()
    code = "from ddpm_hf.demo import DemoModel; s = DemoModel('alice/cond-ddpm', revision='main').page_settings(); print(s.classes); print(s.facts)"
    env = dict(hub_server.env, PYTHONPATH=REPO_ROOT, OMP_NUM_THREADS="1")
    shown = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240)
    assert shown.returncode == 0, shown.stderr
    assert str(CLASSES) in shown.stdout
    assert f"[alice/cond-ddpm]({hub_server.url}/alice/cond-ddpm)" in shown.stdout
    assert "FID: 123.40" in shown.stdout and "bits/dim: 7.891" in shown.stdout and "license: apache-2.0" in shown.stdout
    assert "- FID (1,000 samples" in shown.stdout  # the card's model-index results


def test_without_gradio_the_command_says_what_to_install(model, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # as importlib sees a package that is not installed
    with pytest.raises(SystemExit) as stop:
        main(["demo", "--model", str(model)])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and 'pip install "ddpm-hf[demo]"' in err[0]


def test_a_folder_that_is_not_a_pipeline_is_the_one_line_error_before_any_server(tmp_path, capsys, monkeypatch):
    from ddpm_hf import demo

    launched = threading.Event()
    monkeypatch.setattr(demo, "build_app", lambda *args, **kwargs: launched.set())
    (tmp_path / "not-a-run").mkdir()
    with pytest.raises(SystemExit) as stop:
        main(["demo", "--model", str(tmp_path / "not-a-run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and "not a saved pipeline" in err[0]
    assert not launched.is_set()


def test_a_port_in_use_is_the_one_line_error(demo, model, capsys):
    busy = demo.rsplit(":", 1)[1]  # the module's demo server listens there
    with pytest.raises(SystemExit) as stop:
        main(["demo", "--model", str(model), "--port", busy])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and f"--port {busy}: cannot serve there" in err[0]


def test_grids_offered_for_download_are_forgotten_after_an_hour(tmp_path):
    from ddpm_hf.space_app import app

    for name, age_s in (("old", 2 * app.KEEP_FILES_S), ("new", 60)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "samples.png").write_bytes(b"png")
        os.utime(tmp_path / name / "samples.png", (time.time() - age_s, time.time() - age_s))
    app.forget_old_files(str(tmp_path))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["new"]

"""The Hub Space of a model (`ddpm-hf push OUTPUT_DIR --space USER/NAME`, ddpm_hf/space.py, ddpm_hf/space_app/app.py):
its files, its images (those of `ddpm-hf sample`, for every sampler), and the push and the app against the local Hub
(tests/hub_server.py), the app in a fresh process where ddpm_hf cannot be imported, as on a Space."""

from __future__ import annotations

import configparser
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
from conftest import REPO_ROOT
from huggingface_hub import SpaceCard
from PIL import Image
from test_demo import CLASSES, T, save_model
from test_hub import cli_in_process

from ddpm_hf.cli import main
from ddpm_hf.conditioning import CONDITIONAL_PIPELINE_NAME
from ddpm_hf.errors import UserError
from ddpm_hf.hub import HubPusher
from ddpm_hf.repo_contents import CUSTOM_PIPELINE_FILENAME, default_custom_pipeline_file
from ddpm_hf.sampling import SAMPLERS, accepted_steps, make_sampler, resolve_sampler
from ddpm_hf.space import APP_FILE, SPACE_FILES, space_files
from ddpm_hf.space_app import app

sys.path.insert(0, os.path.join(REPO_ROOT, "scripts"))
from demo_screenshot import free_port  # noqa: E402

SPACE_COLORS = {"red", "yellow", "green", "blue", "indigo", "purple", "pink", "gray"}  # what the Hub accepts


def grid_of(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def sample_grid(model: Path, out: Path, **options) -> np.ndarray:
    words = ["sample", "--model", str(model), "--out", str(out)]
    for name, value in options.items():
        words += [f"--{name}", str(value)]
    assert main(words) == 0
    return grid_of(out)


def test_the_space_has_the_hubs_configuration_and_the_app_as_it_is(tmp_path):
    model = save_model(tmp_path / "cond")
    files = space_files(model, "alice/cond-ddpm", revision="main", license="mit")
    assert sorted(files) == sorted(SPACE_FILES)

    card = SpaceCard(files["README.md"].decode())
    data = card.data.to_dict()
    assert data["sdk"] == "gradio" and data["app_file"] == "app.py" and data["models"] == ["alice/cond-ddpm"]
    from importlib.metadata import version

    assert data["sdk_version"] == version("gradio")  # the Gradio the demo ran with here
    assert data["title"] == "cond-ddpm" and data["license"] == "mit" and data["emoji"]
    assert data["colorFrom"] in SPACE_COLORS and data["colorTo"] in SPACE_COLORS
    assert 0 < len(data["short_description"]) <= 60
    assert "(https://huggingface.co/alice/cond-ddpm)" in card.text  # the Space links the model

    assert files["app.py"] == APP_FILE.read_bytes()  # the package's file, not a copy kept in a string
    setup = configparser.ConfigParser()
    setup.read(Path(REPO_ROOT) / "setup.cfg")
    bounds = {line.split(">=")[0].strip(): line.strip() for line in setup["options"]["install_requires"].splitlines() if ">=" in line}
    assert files["requirements.txt"].decode().split() == [bounds["diffusers"], bounds["torch"]]

    settings = json.loads(files["space.json"])
    assert (settings["model"], settings["revision"], settings["pipeline"]) == ("alice/cond-ddpm", "main", CONDITIONAL_PIPELINE_NAME)
    assert list(settings["samplers"]) == list(SAMPLERS)  # every sampler make_sampler offers (none refuses this model)
    steps = {name: chosen["steps"] for name, chosen in settings["samplers"].items()}
    multistep = {"dpmsolver", "unipc", "deis"}  # they repeat a timestep at K = T ('leading')
    assert steps == {name: [[1, T - 1 if name in multistep else T]] for name in SAMPLERS}
    assert (settings["default_sampler"], settings["default_steps"]) == resolve_sampler("auto", min(50, T), T)


def test_a_step_count_the_sampler_does_not_take_is_refused_naming_the_counts_it_takes():
    """The Space and the demo refuse what `ddpm-hf sample` refuses, also inside the fewest and most steps: on the
    default schedule (T = 1000, linear, 'leading') ddim K = 600 strides by 1 and starts at t = 599."""
    from diffusers import DDPMScheduler

    trained = DDPMScheduler(num_train_timesteps=1000)
    with pytest.raises(UserError, match="starts at t = 599"):
        make_sampler(trained, "ddim", 600)
    accepted = {name: accepted_steps(trained, name) for name in ("ddim", "unipc")}
    settings = app.PageSettings("m", "m", None, ["ddim", "unipc"], "unipc", 1000, accepted_steps=accepted)
    for sampler, steps, taken in [("ddim", 600, "3 to 500, 665 to 1000"), ("ddim", 2, "3 to 500, 665 to 1000"), ("unipc", 1000, "2 to 499, 664 to 999")]:
        message = f"Steps {steps}: {sampler} takes {taken} steps with this model; choose one of those step counts, or another sampler."
        with pytest.raises(app.InputError) as refused:
            app.check_request(settings, sampler, steps, 0, 1)
        assert str(refused.value) == message
    assert [app.check_request(settings, "ddim", steps, 0, 1).steps for steps in (3, 500, 665, 1000)] == [3, 500, 665, 1000]
    assert settings.steps_info() == "2 to 499, 664 to 999 (T = 1000) with unipc: it depends on the sampler"
    assert [settings.nearest_steps("unipc", steps) for steps in (1, 50, 600, 1000)] == [2, 50, 664, 999]  # the Steps field's default

    cosine = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")  # holes all along
    many = app.PageSettings("m", "m", None, ["ddim"], "ddim", 1000, accepted_steps={"ddim": accepted_steps(cosine, "ddim")})
    refused_count = next(steps for steps in range(1, 1001) if not many.takes("ddim", steps) and many.takes("ddim", steps + 1))
    with pytest.raises(app.InputError, match=r"ddim takes 18 to 58, 60 to 62, 64 to 66, \.\.\., 936 to 1000 steps") as refused:
        app.check_request(many, "ddim", 59, 0, 1)
    assert "\n" not in str(refused.value) and len(str(refused.value)) < 200
    with pytest.raises(UserError):
        make_sampler(cosine, "ddim", refused_count)
    alike = app.PageSettings("m", "m", None, ["ddim"], "ddim", 20)  # no step counts: 1 to T
    assert alike.steps_info() == "1 to 20 (T = 20)" and app.check_request(alike, "ddim", 20, 0, 1).steps == 20


def test_the_space_reads_the_step_counts_of_older_space_json_files():
    samplers = {"ddim": {"steps": [[3, 500], [665, 1000]]}, "unipc": {"min_steps": 2, "max_steps": 999}, "ddpm": {}}
    assert app.accepted_steps_in(samplers, 1000) == {"ddim": [(3, 500), (665, 1000)], "unipc": [(2, 999)], "ddpm": [(1, 1000)]}


@pytest.mark.parametrize("conditional", [False, True], ids=["unconditional", "class-conditional"])
def test_every_sampler_of_the_space_makes_the_images_of_ddpm_hf_sample(conditional, tmp_path, one_thread):
    """The Space samples with the model repo's own pipeline file and the schedulers in space.json: the same images,
    after frames of the reverse process (x_t and the predicted x_0) every few steps while it samples."""
    model = save_model(tmp_path / "model", class_names=CLASSES if conditional else None)
    if not conditional:  # the push uploads the trajectory pipeline beside the model; here it is the folder's
        (model / CUSTOM_PIPELINE_FILENAME).write_bytes(default_custom_pipeline_file().read_bytes())
    settings = json.loads(space_files(model, "alice/model")["space.json"])
    space_model = app.HubModel(dict(settings, model=str(model), revision=None))
    class_name, guidance = ("ship", 2.0) if conditional else (None, 1.0)
    for name in settings["samplers"]:
        request = app.Request(name, steps=6, seed=5, num_images=3, class_name=class_name, guidance_scale=guidance)
        *frames, result = space_model.generate(request)
        num_steps = 11 if name == "heun" else 6  # network evaluations: heun's 2K - 1
        assert frames and all(isinstance(frame, app.Frame) and frame.num_steps == num_steps for frame in frames), name
        assert [frame.step for frame in frames] == list(range(1, num_steps + 1)), name  # 25 or fewer: every one
        assert frames[0].x_t.shape == (16 * 8, 3 * 16 * 8, 3) and frames[-1].pred_x0.shape == frames[-1].x_t.shape
        # after the last step x_t is the result (in the network's scale for every sampler, euler and heun included)
        np.testing.assert_array_equal(frames[-1].x_t, app.upscale(np.asarray(app.grid(result.images).convert("RGB")), app.PREVIEW_SIDE), err_msg=name)
        assert not np.array_equal(frames[0].x_t, frames[-1].x_t) and not np.array_equal(frames[0].pred_x0, frames[-1].pred_x0), name
        options = dict(scheduler=name, steps=6, seed=5, num_images=3)
        if conditional:
            options.update(class_labels=class_name, guidance_scale=guidance)
        expected = sample_grid(model, tmp_path / f"{name}.png", **options)
        np.testing.assert_array_equal(grid_of_result(result, conditional), expected, err_msg=name)

    # A visitor who leaves (Gradio closes the generator) stops the chain at its next step.
    calls = []
    slow = space_model.pipeline.unet.register_forward_hook(lambda *_: calls.append(1) or time.sleep(0.05))  # returns None: the output stays
    updates = space_model.generate(app.Request("ddpm", steps=T, seed=0, num_images=1, class_name=class_name, guidance_scale=guidance))
    assert next(updates).step == 1
    updates.close()
    slow.remove()
    assert len(calls) <= 3, calls  # of T = 20


def grid_of_result(result, conditional: bool) -> np.ndarray:
    return np.asarray(app.grid(result.images, one_class=conditional).convert("RGB"))


def test_a_pushed_space_runs_without_ddpm_hf_and_answers_with_the_images_of_ddpm_hf_sample(hub_server, tmp_path, monkeypatch, capsys, one_thread):
    model = save_model(tmp_path / "cond-run")
    command = ["push", str(model), "--repo_id", "alice/cond-ddpm", "--space", "alice/cond-demo", "--token", hub_server.token]
    status, out, err = cli_in_process(command, hub_server.url, monkeypatch, capsys)
    assert status == 0, err
    assert f"{hub_server.url}/spaces/alice/cond-demo" in out and hub_server.token not in out + err

    # The Space holds exactly its files; the model card links the Space, the Space the model.
    uploaded = hub_server.repo_files("alice/cond-demo", repo_type="space")
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub_server.url)
    assert uploaded == {".gitattributes": uploaded[".gitattributes"], **space_files(model, "alice/cond-ddpm", "main", "apache-2.0")}
    card = hub_server.repo_files("alice/cond-ddpm")["README.md"].decode()
    assert "https://huggingface.co/spaces/alice/cond-demo" in card
    for files in (uploaded, hub_server.repo_files("alice/cond-ddpm")):
        assert not [path for path, content in files.items() if hub_server.token.encode() in content]

    # app.py as a Space runs it: a fresh process in the Space's folder, where ddpm_hf cannot be imported.
    space = tmp_path / "space"
    space.mkdir()
    for path, content in uploaded.items():
        (space / path).write_bytes(content)
    port = free_port()
    env = dict(hub_server.env, GRADIO_SERVER_NAME="127.0.0.1", GRADIO_SERVER_PORT=str(port), GRADIO_ANALYTICS_ENABLED="False", OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)
    run_as_space = "import runpy, sys; sys.modules['ddpm_hf'] = None; runpy.run_path('app.py', run_name='__main__')"
    process = subprocess.Popen([sys.executable, "-c", run_as_space], cwd=space, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = wait_until_serving(process, port)
        from gradio_client import Client
        from gradio_client.exceptions import AppError

        client = Client(url, verbose=False)
        with pytest.raises(AppError, match=r"Steps 20: dpmsolver takes 1 to 19 steps with this model"):  # K = T repeats a timestep
            client.predict("dpmsolver", T, 2, 3, "dog", 1.5, api_name="/generate")
        job = client.submit("ddim", 5, 2, 3, "dog", 1.5, api_name="/generate")  # the server goes on
        result, updates = job.result(), job.outputs()
    finally:
        process.terminate()
        output = process.communicate(timeout=30)[0]
    expected = sample_grid(model, tmp_path / "cli.png", scheduler="ddim", steps=5, seed=2, num_images=3, class_labels="dog", guidance_scale=1.5)
    np.testing.assert_array_equal(grid_of(result[4]["value"]), expected)
    # The reverse process came first, step by step: x_t and x_0 pictures and the step numbers, then the samples.
    frames = updates[:-1]
    assert [frame[2].split('"steps-done">')[1].split(",")[0] for frame in frames] == [f"Step {k} / 5" for k in range(1, 6)], output
    untouched = {"__type__": "update"}  # gr.skip(): the samples are not shown before the end
    assert all(frame[0] and frame[1] and frame[3] == untouched for frame in frames) and len(updates[-1][3]) == 3
    np.testing.assert_array_equal(grid_of(frames[-1][0])[::8, ::8], expected)  # x_t after the last step: the samples, enlarged 8 times
    assert "ddim 5 steps, seed 2" in result[5] and "ddpm-hf sample --model alice/cond-ddpm" in result[5], output


def wait_until_serving(process: subprocess.Popen, port: int, timeout: float = 240) -> str:
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"app.py exited with {process.returncode}:\n{process.communicate()[0]}")
        try:
            urllib.request.urlopen(f"{url}/config", timeout=2)
            return url
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"app.py did not serve within {timeout} s")


def test_the_space_push_retries_and_a_space_it_cannot_write_fails_before_any_upload(hub_server, tmp_path):
    model = save_model(tmp_path / "run", class_names=None)

    def pusher(space_id: str) -> HubPusher:
        return HubPusher("alice/run", hub_server.token, False, model, endpoint=hub_server.url, backoff=0.01, command="push", space_id=space_id)

    with pytest.raises(UserError, match="--space bob/demo: .*cannot push to the namespace 'bob'"):
        pusher("bob/demo").push_final()
    assert "alice/run" not in hub_server.repos and not hub_server.uploads  # checked before anything was created

    hub_server.fail_next(2, status=503, path_prefix="/api/spaces/alice/run-demo/commit")
    pusher("run-demo").push_final()  # a name alone: in the user's namespace, like --repo_id
    assert len(hub_server.requests_to("/api/spaces/alice/run-demo/commit", method="POST")) == 3
    assert set(hub_server.repo_files("alice/run-demo", repo_type="space")) == {".gitattributes", *SPACE_FILES}

    hub_server.fail_next(10, status=503, path_prefix="/api/spaces/alice/other-demo/commit")
    with pytest.raises(UserError) as failed:  # 503 after every retry
        pusher("alice/other-demo").push_final()
    message = str(failed.value)
    assert f"pushing to {hub_server.url}/spaces/alice/other-demo failed" in message and "--space alice/other-demo`" in message
    assert hub_server.token not in message

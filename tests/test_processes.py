"""Heavy commands on two gloo processes (torchrun on the CPU) give what one process gives (issue 12):
`ddpm-hf sample` the same image files, `ddpm-hf evaluate` the same FID/KID and bits/dim, training's --eval_every
the FID a one-process evaluate finds; and a process that dies ends the run, which then resumes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from conftest import MICRO_UNET, REPO_ROOT, as_flags, offline_env
from safetensors.torch import load_file

from ddpm_hf.run_folder import RunFolder

pytestmark = pytest.mark.slow


def launch(processes: int, arguments: list[str], module: bool = True, script: str | None = None) -> list[str]:
    """The command line: `python -m ddpm_hf ...` for one process, `torchrun --standalone --nproc_per_node N -m ddpm_hf ...` else;
    with `script`, that script instead of the module or train_ddpm.py."""
    target = [script] if script else ["-m", "ddpm_hf"] if module else [os.path.join(REPO_ROOT, "train_ddpm.py")]
    if processes == 1:
        return [sys.executable, *target, *arguments]
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    return [torchrun, "--standalone", "--nproc_per_node", str(processes), *target, *arguments]


def run(processes: int, arguments: list[str], module: bool = True, timeout: int = 600, script: str | None = None, **env) -> subprocess.CompletedProcess:
    result = subprocess.run(launch(processes, arguments, module, script), capture_output=True, text=True, env=offline_env(**env), timeout=timeout)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def train_script_with(folder, setup: str) -> str:
    """A script that runs the Python `setup` in its process, then train_ddpm.py as the launcher would have: a way to
    change something inside each of torchrun's processes (os.environ["RANK"] says which one it is)."""
    train_ddpm = os.path.join(REPO_ROOT, "train_ddpm.py")
    path = os.path.join(folder, "train_with_setup.py")
    with open(path, "w") as f:
        f.write(f"{textwrap.dedent(setup)}\nimport runpy, sys\nsys.argv[0] = {train_ddpm!r}\nrunpy.run_path({train_ddpm!r}, run_name='__main__')\n")
    return path


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A micro pipeline (T = 50, 16 x 16) and a 16-image parquet dataset (the first rows of the built-in subset)."""
    import datasets
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    from ddpm_hf.data import builtin_datasets

    root = tmp_path_factory.mktemp("processes")
    torch.manual_seed(0)
    unet = UNet2DModel(**MICRO_UNET, sample_size=16)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=50, variance_type="fixed_large")).save_pretrained(root / "model")
    (root / "data").mkdir()
    subset = datasets.load_dataset("parquet", data_files=builtin_datasets()["cifar10-1k"], split="train").select(range(16))
    subset.to_parquet(str(root / "data" / "train.parquet"))
    (root / "unet.json").write_text(json.dumps(MICRO_UNET))
    return root


def test_sample_writes_the_same_files_on_one_and_two_processes(workspace, tmp_path):
    outputs = {}
    for processes in (1, 2):
        out = tmp_path / f"p{processes}" / "grid.png"
        # 5 images, batch 2: chunks of 2, 2 and 1 over two processes (the count does not divide by them)
        run(processes, ["sample", "--model", str(workspace / "model"), "--num_images", "5", "--steps", "4", "--batch_size", "2",
                        "--save_individual", "--out", str(out), "--device", "cpu"])  # fmt: skip
        outputs[processes] = {p.name: p.read_bytes() for p in sorted((out.parent / "grid").iterdir())} | {"grid.png": out.read_bytes()}
    assert sorted(outputs[2]) == ["00000.png", "00001.png", "00002.png", "00003.png", "00004.png", "grid.png"]
    assert outputs[1] == outputs[2]


def test_evaluate_gives_the_same_fid_kid_and_bits_per_dim_on_one_and_two_processes(workspace, tmp_path):
    results = {}
    for processes in (1, 2):
        out = tmp_path / f"p{processes}"
        common = ["evaluate", "--model", str(workspace / "model"), "--output", str(out), "--device", "cpu", "--batch_size", "2"]
        run(processes, [*common, "--num_samples", "5", "--scheduler", "ddim", "--steps", "3", "--reference", str(workspace / "data"), "--kid"])
        run(processes, [*common, "--metric", "nll", "--dataset", str(workspace / "data"), "--split", "train", "--num_images", "3", "--timestep_stride", "10"])
        results[processes] = json.loads((out / "eval.json").read_text())
    one, two = results[1], results[2]
    assert (one["num_processes"], two["num_processes"]) == (1, 2) and two["timing"]["wall_seconds"] > 0
    assert f"{one['fid']:.4f}" == f"{two['fid']:.4f}" and one["fid"] == pytest.approx(two["fid"], rel=1e-9)
    assert one["kid"] == pytest.approx(two["kid"], rel=1e-9, abs=1e-12)
    assert two["nll"]["num_images"] == 3 and two["nll"]["num_processes"] == 2
    assert one["nll"]["per_image_bits_per_dim"] == pytest.approx(two["nll"]["per_image_bits_per_dim"], rel=1e-12)
    assert one["nll"]["bits_per_dim"] == pytest.approx(two["nll"]["bits_per_dim"], rel=1e-12)


def training_arguments(workspace, output_dir, **overrides) -> list[str]:
    options = dict(
        preset="quickstart", output_dir=str(output_dir), dataset=str(workspace / "data"), model_config=str(workspace / "unet.json"), resolution=16,
        train_batch_size=4, max_train_steps=4, lr_warmup_steps=2, logging_steps=2, sample_every=0, checkpoint_every=2, num_train_timesteps=50,
        sample_steps=4, num_sample_images=4, eval_every=2, eval_num_samples=8,
    )  # fmt: skip
    options.update(overrides)
    return as_flags(options)


def test_two_process_training_evaluates_once_and_matches_a_one_process_evaluate(workspace, tmp_path):
    output_dir = tmp_path / "run"
    result = run(2, training_arguments(workspace, output_dir, sample_every=2), module=False)
    assert result.stdout.count("FID") == 2  # steps 2 and 4, printed once each (by the main process)
    best = json.loads((output_dir / "best" / "eval.json").read_text())
    assert best["num_processes"] == 2 and best["step"] in (2, 4) and best["num_samples"] == 8
    assert sorted(p.name for p in (output_dir / "samples").iterdir()) == ["step_0000002.png", "step_0000004.png"]
    # The same EMA weights, evaluated by one process with the same sampler, seed, chunks and reference images.
    out = tmp_path / "evaluate"
    run(1, ["evaluate", "--model", str(output_dir / "best"), "--output", str(out), "--device", "cpu", "--num_samples", "8", "--batch_size", "4",
            "--scheduler", best["scheduler"], "--steps", str(best["steps"]), "--seed", str(best["seed"]), "--reference", str(workspace / "data")])  # fmt: skip
    alone = json.loads((out / "eval.json").read_text())
    assert f"{alone['fid']:.4f}" == f"{best['fid']:.4f}" and alone["fid"] == pytest.approx(best["fid"], rel=1e-6)


def test_a_killed_process_ends_the_run_and_it_resumes_from_the_last_complete_checkpoint(workspace, tmp_path):
    output_dir = tmp_path / "run"
    arguments = training_arguments(workspace, output_dir, max_train_steps=100_000, checkpoint_every=3, eval_every=0, ddp_timeout=30, checkpoints_total_limit=2)
    process = subprocess.Popen(
        launch(2, arguments, module=False), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=offline_env(), start_new_session=True
    )
    try:
        deadline = time.time() + 300
        while len(RunFolder(output_dir).checkpoints()) < 2:  # two complete checkpoints, training goes on
            assert process.poll() is None and time.time() < deadline, "training did not reach its second checkpoint"
            time.sleep(0.5)
        victim = worker_pid(process.pid, local_rank=1)
        os.kill(victim, signal.SIGKILL)
        killed_at = time.time()
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode != 0 and time.time() - killed_at < 90
    assert "SIGKILL" in stderr or "lost the others" in stderr, stderr[-3000:]
    complete = RunFolder(output_dir).checkpoints()
    assert complete, "no complete checkpoint survived"
    last_step = int(complete[-1].rsplit("-", 1)[1])
    resumed = run(2, [*training_arguments(workspace, output_dir, max_train_steps=last_step + 2, checkpoint_every=3, eval_every=0),
                      "--resume_from_checkpoint", "latest"], module=False)  # fmt: skip
    assert f"Resumed from {complete[-1]} at step {last_step}" in resumed.stdout
    assert (output_dir / "model_index.json").is_file()


def worker_pid(launcher_pid: int, local_rank: int) -> int:
    """The PID of the launcher's worker with this LOCAL_RANK: a descendant of it (read from /proc)."""

    def parent(pid: int) -> int:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])

    deadline = time.time() + 30
    while time.time() < deadline:
        for entry in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    variables = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
                if variables.get(b"LOCAL_RANK") != str(local_rank).encode():
                    continue
                ancestor = int(entry)
                while ancestor > 1 and ancestor != launcher_pid:
                    ancestor = parent(ancestor)
            except (OSError, ValueError):
                continue
            if ancestor == launcher_pid:
                return int(entry)
        time.sleep(0.2)
    raise AssertionError(f"no worker with LOCAL_RANK={local_rank} under {launcher_pid}")


# ---- issue 20: what several GPUs meet, on two gloo processes ---------------------------------------------

NAN_ON_RANK_1S_SECOND_LOSS = """
import os
from ddpm_hf import losses

if os.environ["RANK"] == "1":
    original, calls = losses.DDPMLoss.__call__, [0]

    def second_loss_is_nan(self, network, x_0, generator=None):
        calls[0] += 1
        loss = original(self, network, x_0, generator)
        return loss * float("nan") if calls[0] == 2 else loss

    losses.DDPMLoss.__call__ = second_loss_is_nan
"""


def test_a_nan_on_one_process_with_skip_nonfinite_loss_skips_that_step_on_every_process(workspace, tmp_path):
    """Without agreement, the process with the NaN skipped its backward while the other waited in DDP's all-reduce."""
    output_dir = tmp_path / "run"
    arguments = training_arguments(
        workspace, output_dir, skip_nonfinite_loss=True, max_train_steps=3, checkpoint_every=1, checkpoints_total_limit=3, eval_every=0, ddp_timeout=60
    )
    result = run(2, arguments, script=train_script_with(tmp_path, NAN_ON_RANK_1S_SECOND_LOSS), timeout=300)
    assert "Weights are identical on all 2 processes." in result.stdout
    weights = {k: load_file(str(output_dir / "checkpoints" / f"checkpoint-{k:07d}" / "model.safetensors")) for k in (1, 2, 3)}
    assert all(torch.equal(weights[1][name], weights[2][name]) for name in weights[1])  # step 1 skipped by both
    assert any(not torch.equal(weights[2][name], weights[3][name]) for name in weights[2])  # step 2 trained by both
    assert all(torch.isfinite(w).all() for w in weights[3].values())


def test_a_nan_on_one_process_stops_every_process_naming_its_step(workspace, tmp_path):
    """The weights are NaN on both after the all-reduce of step 1, so process 0's loss is NaN from step 2: the step
    named must be the first on any process (a min over processes, not a max), and no process may wait for a timeout."""
    output_dir = tmp_path / "run"
    arguments = training_arguments(workspace, output_dir, max_train_steps=6, logging_steps=3, checkpoint_every=0, eval_every=0, ddp_timeout=60)
    start = time.time()
    result = subprocess.run(
        launch(2, arguments, script=train_script_with(tmp_path, NAN_ON_RANK_1S_SECOND_LOSS)), capture_output=True, text=True, env=offline_env(), timeout=300
    )
    assert result.returncode != 0 and time.time() - start < 60, result.stderr[-3000:]
    # Both processes say so (two processes write into one stderr: a line may start after the other's progress bar).
    assert re.findall(r"error: the loss became non-finite at step (\d+)\.", result.stderr) == ["1", "1"], result.stderr[-3000:]
    assert "lost the others" not in result.stderr and not (output_dir / "model_index.json").exists()


COMPILE_AND_COUNT = """
import functools
import sys
import traceback

import torch


def backend(graph_module, example_inputs):
    # Dynamo traces, guards and recompiles as with Inductor; the graphs then run eagerly, in seconds on a CPU.
    warm_up = any(frame.name == "_compile_or_fall_back" for frame in traceback.extract_stack())
    print(f"test: compiled a graph {'in the warm-up' if warm_up else 'AFTER the warm-up'}", file=sys.stderr, flush=True)
    return graph_module.forward


real_compile = torch.compile
torch.compile = functools.wraps(real_compile)(lambda *args, **kwargs: real_compile(*args, **{**kwargs, "backend": backend}))
"""


def test_compiled_channels_last_bf16_training_on_two_processes_compiles_only_in_its_warm_up(workspace, tmp_path):
    """Issue 20's "done when": two processes with compile, channels_last and bf16 forced on train, evaluate FID,
    sample a grid, checkpoint and save the trained module itself (--use_ema false) between steps, resume, and sample:
    every graph is compiled by the warm-up (split at DDP's buckets), none later, and the replicas stay identical."""
    from PIL import Image

    from ddpm_hf.cli import main

    output_dir = tmp_path / "run"
    script = train_script_with(tmp_path, COMPILE_AND_COUNT)
    forced = dict(compile="yes", channels_last="yes", mixed_precision="bf16", use_ema="false", dropout=0.1, logging_steps=1)
    between_steps = dict(max_train_steps=3, checkpoint_every=2, sample_every=2, save_every=2, eval_every=2, eval_num_samples=2)
    first = run(2, training_arguments(workspace, output_dir, **forced, **between_steps), script=script)
    resumed = run(
        2, [*training_arguments(workspace, output_dir, **forced, max_train_steps=4, eval_every=0), "--resume_from_checkpoint", "latest"], script=script
    )
    for result in (first, resumed):
        assert result.stderr.count("test: compiled a graph in the warm-up") >= 2 and "AFTER the warm-up" not in result.stderr, result.stderr[-4000:]
        assert "Weights are identical on all 2 processes." in result.stdout
    assert first.stdout.count("FID") == 2 and (output_dir / "best" / "eval.json").is_file()  # at step 2, and at the end
    assert sorted(p.name for p in (output_dir / "samples").iterdir()) == ["step_0000002.png", "step_0000003.png"]
    assert "checkpoint-0000003 at step 3" in resumed.stdout  # the last checkpoint, written at the end
    assert json.loads((output_dir / "training_config.json").read_text())["mixed_precision"] == "bf16"
    losses = [loss for _, loss in RunFolder(output_dir).loss_history()]
    assert len(losses) == 4 and losses[-1] < losses[0], losses  # it learned
    out = tmp_path / "samples.png"
    assert main(["sample", "--model", str(output_dir), "--num_images", "4", "--steps", "3", "--out", str(out), "--device", "cpu"]) == 0
    assert Image.open(out).size == (32, 32)  # 2 x 2 images of 16 x 16

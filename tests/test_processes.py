"""Heavy commands on two gloo processes (torchrun on the CPU) give what one process gives (issue 12):
`ddpm-hf sample` the same image files, `ddpm-hf evaluate` the same FID/KID and bits/dim, training's --eval_every
the FID a one-process evaluate finds; and a process that dies ends the run, which then resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import MICRO_UNET, REPO_ROOT, as_flags, offline_env

from ddpm_hf.run_folder import RunFolder

pytestmark = pytest.mark.slow


def launch(processes: int, arguments: list[str], module: bool = True) -> list[str]:
    """The command line: `python -m ddpm_hf ...` for one process, `torchrun --standalone --nproc_per_node N -m ddpm_hf ...` else."""
    target = ["-m", "ddpm_hf"] if module else [os.path.join(REPO_ROOT, "train_ddpm.py")]
    if processes == 1:
        return [sys.executable, *target, *arguments]
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    return [torchrun, "--standalone", "--nproc_per_node", str(processes), *target, *arguments]


def run(processes: int, arguments: list[str], module: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(launch(processes, arguments, module), capture_output=True, text=True, env=offline_env(), timeout=timeout)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


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

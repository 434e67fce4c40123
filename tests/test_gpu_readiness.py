"""What a first CUDA run would meet (issue 20), each tested on the CPU through the condition that causes it: the
optimizer state's memory layout after a resume, the options a resume may not change, fp16 with its GradScaler
(torch's GradScaler runs on the CPU), dropout when fine-tuning, compiled graphs that must not compile again, and
the compile warm-up's errors. The two-process parts are in tests/test_processes.py."""

from __future__ import annotations

import functools
import json
import os

import pytest
import torch
from conftest import MICRO_UNET, quick_options
from safetensors.torch import load_file

from ddpm_hf.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def micro_pipeline(folder, sample_size: int = 16) -> str:
    """A saved MICRO_UNET pipeline to start fine-tunes from (--init_from)."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    DDPMPipeline(unet=UNet2DModel(**MICRO_UNET, sample_size=sample_size), scheduler=DDPMScheduler()).save_pretrained(str(folder))
    return str(folder)


@pytest.fixture
def prepare_in_process():
    """ddpm_hf.training.prepare_run on keyword options: the Run that training would start from."""
    from accelerate.state import AcceleratorState, GradientState

    from ddpm_hf.config import config_from_dict
    from ddpm_hf.training import prepare_run

    runs = []

    def prepare(**options):
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        runs.append(prepare_run(config_from_dict(options)))
        return runs[-1]

    yield prepare
    for run in runs:
        run.accelerator.end_training()
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture
def logged(monkeypatch):
    """Every (step, values) that training passes to Accelerator.log."""
    from accelerate import Accelerator

    records, original = [], Accelerator.log

    def log(accelerator, values, step=None, log_kwargs=None):
        records.append((step, dict(values)))
        return original(accelerator, values, step=step, log_kwargs=log_kwargs or {})

    monkeypatch.setattr(Accelerator, "log", log)
    return records


@pytest.fixture
def fp16_on_cpu(monkeypatch):
    """Accelerate's fp16 loss scaling as it is on CUDA, on the CPU: a torch GradScaler, which Accelerate creates only
    for GPUs; the scaling, unscaling, skipping and checkpointing of the scaler are Accelerate's. The float16 autocast
    itself stays off (float16 convolutions take seconds per step on a CPU), so the gradients overflow only where a
    test makes them."""
    from accelerate import Accelerator
    from accelerate.utils import AutocastKwargs

    original = Accelerator.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if self.mixed_precision == "fp16" and self.scaler is None:
            self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
            self.native_amp = True  # as on CUDA: Accelerate unscales the gradients only then
            self.autocast_handler = AutocastKwargs(enabled=False)

    monkeypatch.setattr(Accelerator, "__init__", init)


@pytest.fixture
def compiles(monkeypatch):
    """torch.compile with a backend that runs the captured graphs eagerly (seconds, not minutes, on a CPU) and
    records every graph Dynamo compiles, with the training step it happened in (None: the warm-up), and whether
    the warm-up ran the UNet in training mode."""
    from types import SimpleNamespace

    from ddpm_hf import training

    seen, where = SimpleNamespace(graphs=[], warm_up_training_mode=[]), {"step": None}

    def backend(graph_module, example_inputs):
        seen.graphs.append(where["step"])
        return graph_module.forward

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", functools.wraps(real_compile)(lambda *a, **k: real_compile(*a, **{**k, "backend": backend})))
    real_train_step = training.train_step

    def train_step(run):
        where["step"] = run.step
        real_train_step(run)
        where["step"] = "upkeep"  # saving, sampling and evaluating between steps

    monkeypatch.setattr(training, "train_step", train_step)
    real_warm_up = training._compile_or_fall_back

    def warm_up(model, *args, **kwargs):
        seen.warm_up_training_mode.append(model.training)
        return real_warm_up(model, *args, **kwargs)

    monkeypatch.setattr(training, "_compile_or_fall_back", warm_up)
    torch._dynamo.reset()
    yield seen
    torch._dynamo.reset()


# ---- defect 2: after a resume, Adam's moments have their parameter's memory layout ------------------------


@pytest.mark.parametrize("before, after", [("no", "yes"), ("yes", "no")])
def test_a_resume_gives_the_optimizer_state_each_parameters_layout(tmp_path, micro_unet_config, train_in_process, prepare_in_process, before, after):
    options = quick_options(tmp_path / "run", micro_unet_config, max_train_steps=2, checkpoint_every=2)
    train_in_process(**options, channels_last=before)
    run = prepare_in_process(**{**options, "max_train_steps": 4, "resume_from_checkpoint": "latest", "channels_last": after})
    assert run.step == 2
    moments = [(p, run.optimizer.state[p][key]) for p in run.unet.parameters() if p.ndim == 4 for key in ("exp_avg", "exp_avg_sq")]
    assert moments, "no conv parameter has optimizer state"
    expected_format = torch.channels_last if after == "yes" else torch.contiguous_format
    for parameter, moment in moments:
        assert parameter.is_contiguous(memory_format=expected_format)
        assert moment.stride() == parameter.stride()  # what CUDA's fused AdamW requires


# ---- defect 3: a resume checks the options it may not change ----------------------------------------------


def test_a_resume_with_options_that_may_not_change_is_refused_naming_them(tmp_path, micro_unet_config, train_in_process):
    options = quick_options(tmp_path / "run", micro_unet_config, max_train_steps=2, checkpoint_every=2)
    train_in_process(**options)
    before = (tmp_path / "run" / "training_config.json").read_text()
    resume = {**options, "max_train_steps": 3, "resume_from_checkpoint": "latest"}
    with pytest.raises(UserError, match=r"cannot change on resume: learning_rate \(0\.001 -> 0\.5\), mixed_precision \('no' -> 'bf16'\)\. Resume with"):
        train_in_process(**{**resume, "learning_rate": 0.5, "mixed_precision": "bf16"})
    assert (tmp_path / "run" / "training_config.json").read_text() == before  # nothing written
    # Those the README's table marks resumable may change.
    result = train_in_process(**{**resume, "compile": "no", "channels_last": "yes", "skip_nonfinite_loss": True, "logging_steps": 1, "sample_steps": 4})
    assert result.step == 3


def test_options_recorded_by_the_checkpoint_are_the_ones_checked(tmp_path, micro_unet_config, train_in_process):
    """A checkpoint resumed from elsewhere (another --output_dir) is checked against its own run's options."""
    options = quick_options(tmp_path / "run", micro_unet_config, max_train_steps=2, checkpoint_every=2)
    train_in_process(**options)
    state = json.loads((tmp_path / "run" / "checkpoints" / "checkpoint-0000002" / "training_state.json").read_text())
    recorded = json.loads((tmp_path / "run" / "training_config.json").read_text())
    assert state["fixed_options"]["learning_rate"] == recorded["learning_rate"] and "max_train_steps" not in state["fixed_options"]
    checkpoint = str(tmp_path / "run" / "checkpoints" / "checkpoint-0000002")
    moved = {**options, "output_dir": str(tmp_path / "moved"), "resume_from_checkpoint": checkpoint, "max_train_steps": 3}
    with pytest.raises(UserError, match=r"cannot change on resume: seed \(0 -> 5\)"):
        train_in_process(**moved, seed=5)
    assert train_in_process(**moved).step == 3


def test_fp16_on_a_cpu_is_refused_with_the_fix(tmp_path, micro_unet_config, train_in_process):
    """Accelerate runs fp16 on a CPU as float32 without a GradScaler: a run must not record fp16 for that."""
    with pytest.raises(UserError, match="--mixed_precision fp16 needs a CUDA GPU.*--mixed_precision bf16"):
        train_in_process(**quick_options(tmp_path / "run", micro_unet_config, mixed_precision="fp16"))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0])
def test_fp16_gradient_overflow_skips_the_update_but_not_the_schedule(tmp_path, micro_unet_config, train_in_process, fp16_on_cpu, logged, max_grad_norm):
    """An infinite gradient at step 1 (0-based): the GradScaler skips that update and halves the loss scale; the
    step's loss is logged, its infinite gradient norm is not, the learning rate follows the schedule, the norms
    logged are of the unscaled gradients (unscaled before clipping; measured, not clipped, with --max_grad_norm 0)."""
    from ddpm_hf import losses

    calls = {"n": 0}
    original = losses.DDPMLoss.__call__

    def overflow_on_the_second_call(self, network, x_0, generator=None):
        calls["n"] += 1
        loss = original(self, network, x_0, generator)
        if calls["n"] == 2:  # the gradient of this loss overflows: inf in one parameter's gradient, once
            parameter = next(network.parameters())

            def overflow(grad):
                handle.remove()
                return grad * float("inf")

            handle = parameter.register_hook(overflow)
        return loss

    steps = dict(
        max_train_steps=4, checkpoint_every=1, checkpoints_total_limit=None, logging_steps=1, lr_warmup_steps=4, dropout=0.0, max_grad_norm=max_grad_norm
    )
    train_in_process(**quick_options(tmp_path / "fp32", micro_unet_config, **steps))
    reference = {step: values for step, values in logged}
    logged.clear()
    losses.DDPMLoss.__call__ = overflow_on_the_second_call
    try:
        train_in_process(**quick_options(tmp_path / "fp16", micro_unet_config, mixed_precision="fp16", **steps))
    finally:
        losses.DDPMLoss.__call__ = original
    values = {step: values for step, values in logged}

    checkpoints = tmp_path / "fp16" / "checkpoints"
    weights = {k: load_file(str(checkpoints / f"checkpoint-{k:07d}" / "model.safetensors")) for k in (1, 2, 3)}
    assert all(torch.equal(weights[1][name], weights[2][name]) for name in weights[1])  # step 1 was skipped
    assert any(not torch.equal(weights[2][name], weights[3][name]) for name in weights[2])  # step 2 was not
    scales = {k: torch.load(checkpoints / f"checkpoint-{k:07d}" / "scaler.pt", weights_only=True)["scale"] for k in (1, 2)}
    assert scales[2] == scales[1] / 2 == 2.0**11
    assert [values[k].get("skipped_steps", 0) for k in (1, 2, 3, 4)] == [0, 1, 1, 1]  # since the start of the run
    assert [values[k]["loss_scale"] for k in (1, 2)] == [2.0**12, 2.0**11]
    assert all(torch.isfinite(torch.tensor(values[k]["loss"])) for k in (1, 2, 3, 4))  # the skipped step's loss was finite
    assert values[2]["grad_norm"] == 0.0  # its norm was infinite: nothing to average in that interval
    assert [values[k]["lr"] for k in (1, 2, 3, 4)] == [reference[k]["lr"] for k in (1, 2, 3, 4)]  # the schedule goes on
    assert json.loads((checkpoints / "checkpoint-0000004" / "training_state.json").read_text())["lr_scheduler"]["last_epoch"] == 4
    # Unscaled before clipping: the norm of the true gradient, not 4096 times it.
    assert values[1]["grad_norm"] == pytest.approx(reference[1]["grad_norm"], rel=1e-5)


def test_fp16_resume_from_a_checkpoint_without_scaler_state(tmp_path, micro_unet_config, train_in_process, fp16_on_cpu, capsys):
    options = quick_options(tmp_path / "run", micro_unet_config, mixed_precision="fp16", max_train_steps=2, checkpoint_every=2)
    train_in_process(**options)
    checkpoint = tmp_path / "run" / "checkpoints" / "checkpoint-0000002"
    os.remove(checkpoint / "scaler.pt")  # as an older version's fp16 run on a CPU (really float32) wrote it
    result = train_in_process(**{**options, "max_train_steps": 3, "resume_from_checkpoint": "latest"})
    assert result.step == 3 and "no fp16 loss-scaler state (scaler.pt); the loss scale starts afresh" in capsys.readouterr().out


# ---- defect 4 and issue 24 item 3: fine-tuning trains with dropout, at the size it is given ---------------


def test_init_from_trains_with_the_given_dropout(tmp_path, micro_unet_config, train_in_process):
    start = micro_pipeline(tmp_path / "start")
    final = {}
    for dropout in (0.0, 0.5):
        output_dir = tmp_path / f"dropout-{dropout}"
        train_in_process(**quick_options(output_dir, micro_unet_config, init_from=start, dropout=dropout, use_ema=False, max_train_steps=2))
        final[dropout] = load_file(str(output_dir / "unet" / "diffusion_pytorch_model.safetensors"))
        assert json.loads((output_dir / "unet" / "config.json").read_text())["dropout"] == dropout
    assert any(not torch.equal(final[0.0][name], final[0.5][name]) for name in final[0.0])


def test_init_from_at_another_resolution_saves_the_size_it_trained_at(tmp_path, micro_unet_config, train_in_process, capsys):
    from PIL import Image

    from ddpm_hf.cli import main

    start = micro_pipeline(tmp_path / "start", sample_size=32)
    output_dir = tmp_path / "at16"
    train_in_process(**quick_options(output_dir, micro_unet_config, init_from=start, resolution=16, max_train_steps=1))
    assert json.loads((output_dir / "unet" / "config.json").read_text())["sample_size"] == 16
    assert "was trained at 32px; this run trains and saves it at 16px" in capsys.readouterr().out
    out = tmp_path / "sample.png"
    assert main(["sample", "--model", str(output_dir), "--scheduler", "ddim", "--num_images", "1", "--steps", "10", "--device", "cpu", "--out", str(out)]) == 0
    assert Image.open(out).size == (16, 16)


# ---- defect 5 and the warm-up: a compiled training graph is compiled once ----------------------------------


def test_saving_the_pipeline_leaves_the_model_unchanged(tmp_path):
    from diffusers import DDPMScheduler, UNet2DModel

    from ddpm_hf.training import save_pipeline

    unet = UNet2DModel(**MICRO_UNET, sample_size=16)
    before = dict(unet.config)
    save_pipeline(unet, DDPMScheduler(), str(tmp_path))
    assert dict(unet.config) == before
    saved = json.loads((tmp_path / "unet" / "config.json").read_text())
    assert saved["_class_name"] == "UNet2DModel" and saved["sample_size"] == 16


def test_compiled_training_compiles_only_in_its_warm_up(tmp_path, micro_unet_config, train_in_process, compiles):
    """Train, save, sample, train... with --compile yes and --use_ema false (the grids sample the trained module
    itself), fine-tuning a saved model (which loads in eval mode): every graph is compiled by the warm-up, none by a
    training step, a save or a grid."""
    start = micro_pipeline(tmp_path / "start")
    options = dict(compile="yes", use_ema=False, init_from=start, max_train_steps=6, sample_every=2, save_every=2, logging_steps=2, dropout=0.1)
    result = train_in_process(**quick_options(tmp_path / "run", micro_unet_config, **options))
    assert result.step == 6 and len(os.listdir(tmp_path / "run" / "samples")) == 3
    assert compiles.warm_up_training_mode == [True]  # the graph that training runs: dropout on
    assert compiles.graphs, "--compile yes compiled nothing"
    assert set(compiles.graphs) == {None}, f"graphs compiled after the warm-up, at steps {[s for s in compiles.graphs if s is not None]}"


# ---- item 8: the compile warm-up's errors -------------------------------------------------------------------


def _compile_raising(error: Exception):
    def compile(fn, *args, **kwargs):
        def compiled(*a, **k):
            raise error

        return compiled

    return compile


def test_out_of_memory_in_the_compile_warm_up_is_the_one_line_error(tmp_path, micro_unet_config, train_in_process, monkeypatch):
    import warnings

    monkeypatch.setattr(torch, "compile", _compile_raising(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no "torch.compile failed"
        with pytest.raises(UserError, match=r"out of memory in the first training step: a micro-batch of 8 images of 16x16.*--gradient_accumulation_steps"):
            train_in_process(**quick_options(tmp_path / "run", micro_unet_config, compile="yes"))
    assert not (tmp_path / "run").exists()


def test_an_error_that_is_no_compilers_propagates(tmp_path, micro_unet_config, train_in_process, monkeypatch):
    monkeypatch.setattr(torch, "compile", _compile_raising(ValueError("a bug in the model")))
    with pytest.raises(ValueError, match="a bug in the model"):
        train_in_process(**quick_options(tmp_path / "run", micro_unet_config, compile="yes"))


def test_accelerate_config_launches_what_its_comments_say(tmp_path):
    """accelerate_config.yaml runs one process as shipped; the edit its comments describe (both lines), or the flags
    they give, run N; num_processes alone does not (Accelerate reads distributed_type: NO as one process)."""
    import re

    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from conftest import REPO_ROOT

    shipped = open(os.path.join(REPO_ROOT, "accelerate_config.yaml")).read()
    path = tmp_path / "accelerate_config.yaml"

    def launched(config_text: str, *flags: str) -> tuple[bool, int]:
        path.write_text(config_text)
        args, _, _ = _validate_launch_command(launch_command_parser().parse_args(["--config_file", str(path), *flags, "train_ddpm.py"]))
        return args.multi_gpu, args.num_processes

    assert launched(shipped) == (False, 1)
    documented = dict(re.findall(r"^#\s+(distributed_type|num_processes): (\S+)$", shipped, re.MULTILINE))
    assert documented == {"distributed_type": "MULTI_GPU", "num_processes": "N"}
    edited = shipped
    for key, value in documented.items():
        edited = re.sub(rf"^{key}: .*$", f"{key}: {value.replace('N', '8')}", edited, flags=re.MULTILINE)
    assert launched(edited) == (True, 8)
    flags = re.search(r"--config_file accelerate_config.yaml (--multi_gpu --num_processes) N train_ddpm.py", shipped).group(1).split()
    assert launched(shipped, *flags, "8") == (True, 8)
    assert launched(re.sub(r"^num_processes: .*$", "num_processes: 8", shipped, flags=re.MULTILINE))[0] is False  # as the comment warns


# ---- the end of a multi-process run: DDP's wrapper goes before the process group ---------------------------


def test_the_ddp_wrapper_is_freed_while_the_process_group_is_still_registered(tmp_path):
    """A two-process run hung at exit under load: its DDP Reducer, freed after destroy_process_group, dropped the gloo
    group's last reference, whose destructor joined gloo's worker threads while holding the GIL that a worker needed
    to free its last collective's tensors. training.release_replicas frees the wrapper (Accelerate's references too)
    while torch.distributed still holds the group, so that the group is destroyed by torch.distributed, which lets
    the GIL go. A one-process gloo group stands in for the many-process one: the references are what matter."""
    import gc
    import types
    import weakref

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from ddpm_hf.training import release_replicas

    class PreparedBy:  # the part of an Accelerator that release_replicas uses, holding what it prepared as Accelerate does
        num_processes = 2

        def __init__(self, model):
            self._models = [model]

        def unwrap_model(self, model):
            return model.module

        def free_memory(self):
            self._models = []

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(torch.nn.Linear(2, 2))
        ddp(torch.ones(1, 2)).sum().backward()
        run = types.SimpleNamespace(accelerator=PreparedBy(ddp), unet=ddp)
        wrapper = weakref.ref(ddp)
        del ddp
        gc.collect()
        assert wrapper() is not None  # held by the run and by "Accelerate"
        release_replicas(run)
        assert wrapper() is None, "the DDP wrapper outlives release_replicas"
        assert dist.is_initialized() and isinstance(run.unet, torch.nn.Linear)
    finally:
        dist.destroy_process_group()

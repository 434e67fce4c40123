"""Where the model learns: the Accelerate training loop, its checkpoints and the saved pipeline.

`train()` reads top to bottom: set up (`prepare_run`), then per optimizer step `train_step` and
`upkeep` (log, checkpoint, sample, evaluate, save, push: each when `due`), then `finish`. What lands in
OUTPUT_DIR is described in ddpm_hf/run_folder.py, which owns its names.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import math
import os
import shutil
import signal
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from .compilation import out_of_memory_in, warn_compile_failed
from .conditioning import ClassConditioned, class_label_arguments, drop_labels, num_classes
from .config import TrainingConfig, fixed_options, non_resumable_changes
from .distributed import all_reduce_extreme, leave_process_group
from .errors import UserError
from .run_folder import CHECKPOINT_STATE, PIPELINE_PARTS, RunFolder, read_json

EMA_WEIGHTS_FILE = "ema_unet.safetensors"
FID_BATCH_SIZE = 100  # images per process and chunk in --eval_every's FID
STOP_CHECK_EVERY = 10  # steps between the processes' agreement on a stop signal (one small all-gather)


def train(config: TrainingConfig) -> TrainingResult:
    """Train a DDPM as `config` says and save it as a DDPMPipeline in config.output_dir."""
    run = prepare_run(config)
    config = run.config  # as resolved: Accelerate's mixed precision, epochs as steps
    run.accelerator.print(
        f"Training {run.num_parameters:,} parameters on {run.batches.num_images:,} images ({config.dataset}, {config.split}) "
        f"for {config.max_train_steps:,} steps of {config.train_batch_size} images ({run.accelerator.num_processes} processes x "
        f"{config.gradient_accumulation_steps} accumulation x {run.micro_batch}) on {run.accelerator.device}."
    )
    progress = _progress_bar(run)
    stopped_by = None
    with GracefulStop() as stop, progress:  # closed on an error too, so that the error starts a line of its own
        while run.step < config.max_train_steps and stopped_by is None:
            train_step(run)
            progress.update(1)
            stopped_by = agreed_stop(run, stop)
            upkeep(run, stopping=stopped_by is not None, progress=progress)
    finish(run, stopped_by)
    return TrainingResult(output_dir=config.output_dir, step=run.step, stopped_early=run.step < config.max_train_steps)


@dataclass
class TrainingResult:
    output_dir: str
    step: int
    stopped_early: bool = False


@dataclass
class Run:
    """Everything a training run holds between steps."""

    config: TrainingConfig
    folder: RunFolder
    accelerator: Any
    unet: torch.nn.Module  # as prepared by Accelerate (DDP-wrapped with several processes)
    ema: ExponentialMovingAverage | None
    noise_scheduler: Any  # the DDPMScheduler saved with the pipeline
    loss_fn: Any
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    batches: Any  # data.ImageBatches
    training_images: torch.Tensor  # uint8, the FID reference during training
    micro_batch: int
    channels_last: bool
    hub: Any = None  # hub.HubPusher when pushing
    step: int = 0
    metrics: Metrics = field(default_factory=lambda: Metrics())
    fid_evaluator: Any = None  # built at the first evaluation
    num_parameters: int = 0
    class_labels: Any = None  # data.ClassLabels of a --class_conditional run

    @property
    def class_names(self) -> list[str] | None:
        return self.class_labels.names if self.class_labels is not None else None

    @property
    def model_to_sample(self) -> torch.nn.Module:
        """The EMA weights when kept (samples, FID and the saved pipeline use them), else the trained ones."""
        return self.ema.model if self.ema is not None else self.accelerator.unwrap_model(self.unet)


# ---------------------------------------------------------------------------------------------
# Set-up: every input is checked before anything is written
# ---------------------------------------------------------------------------------------------


def prepare_run(config: TrainingConfig) -> Run:
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler

    from . import data
    from .models import build_scheduler, count_parameters

    # Accelerate and the output folder.
    accelerator = _accelerator(config)
    config = dataclasses.replace(config, mixed_precision=accelerator.mixed_precision)  # the value used, as recorded
    device = accelerator.device
    folder = RunFolder(config.output_dir)
    micro_batch = per_process_batch_size(config, accelerator.num_processes)
    resume_path = resolve_resume_path(config, folder)
    check_output_dir(config, folder, resume_path)
    hub = _check_hub(config, accelerator) if config.push_to_hub else None  # a bad token fails now, not after hours

    # The dataset and its labels, then the model and the noise schedule: a resolution the UNet cannot take fails before decoding.
    with accelerator.main_process_first():
        dataset = data.load_image_dataset(config.dataset, config.split, config.dataset_config)
        if config.max_train_samples is not None:
            dataset = dataset.select(range(min(config.max_train_samples, len(dataset))))
    class_labels = data.read_class_labels(dataset, data.find_label_column(dataset, config.label_column)) if config.class_conditional else None
    noise_scheduler = build_scheduler(config)
    set_seed(config.seed)  # the same initial weights on every process and every run with this seed
    unet = _initial_unet(config, class_labels.num_classes if class_labels is not None else None, accelerator)
    unet.train()  # dropout on; from_pretrained (--init_from) returns a model in eval mode
    use_channels_last = _use_feature(config.channels_last, device)
    if use_channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    unet.to(device)
    ema = ExponentialMovingAverage(unet, config.ema_decay, config.ema_warmup, config.ema_inv_gamma, config.ema_power) if config.use_ema else None
    loss_fn = build_loss(config, noise_scheduler, unet, device)

    # Data: decoded once per machine into the cache (the other processes map that file), batches built on the device.
    decoded = data.decode_images(
        dataset,
        config.resolution,
        config.image_column,
        config.on_corrupt_image,
        config.max_in_memory_gb,
        progress=accelerator.is_local_main_process,
        state=accelerator.state,
    )
    if class_labels is not None:
        class_labels = class_labels.without_rows(decoded.skipped_rows)  # as the images: undecodable rows dropped
    batches = data.ImageBatches(
        decoded.images,
        config.seed,
        config.random_flip,
        device,
        labels=class_labels.ids if class_labels is not None else None,
        max_device_gb=config.max_in_memory_gb,
    )
    config = epochs_to_steps(config, len(decoded.images), accelerator)

    # Optimizer and learning-rate schedule, counted in optimizer steps. The schedule is not passed to
    # accelerator.prepare: a prepared one steps once per process, which would shorten warm-up by the GPU count.
    optimizer = torch.optim.AdamW(
        unet.parameters(),
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_epsilon,
        weight_decay=config.weight_decay,
        fused=device.type in ("cuda", "cpu"),  # fused: one kernel per step (bench/RESULTS.md)
    )
    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps, num_training_steps=config.max_train_steps)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    if _use_feature(config.compile, device):  # after prepare: the graph that training runs (autocast, DDP's buckets)
        _compile_or_fall_back(unet, micro_batch, config.resolution, use_channels_last, accelerator)

    # Only now is anything written.
    if accelerator.is_main_process:
        create_output_dir(config, folder, resuming=resume_path is not None)
    accelerator.wait_for_everyone()

    run = Run(
        config=config,
        folder=folder,
        accelerator=accelerator,
        unet=unet,
        ema=ema,
        noise_scheduler=noise_scheduler,
        loss_fn=loss_fn,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        batches=batches,
        training_images=decoded.images,
        micro_batch=micro_batch,
        channels_last=use_channels_last,
        hub=hub,
        num_parameters=count_parameters(unet),
        class_labels=class_labels,
    )
    if resume_path is not None:
        run.step = load_checkpoint(accelerator, resume_path, ema, lr_scheduler)
        match_parameter_layouts(optimizer)
        if accelerator.is_main_process:
            folder.forget_losses_after(run.step)
        accelerator.print(f"Resumed from {resume_path} at step {run.step}.")
    elif config.resume_from_checkpoint == "latest":
        accelerator.print(f"No checkpoint in {folder.checkpoints_dir} yet: starting a new run.")
    run.metrics.restart(run.step, device, accelerator.scaler)
    if accelerator.is_main_process:
        accelerator.init_trackers("ddpm", config={k: v for k, v in config.to_json_dict().items() if isinstance(v, (int, float, str, bool))})
    return run


def _accelerator(config: TrainingConfig):
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

    # Without a GPU, Accelerate only joins a torchrun/accelerate process group when told it runs on the CPU.
    trackers = {"tensorboard": ["tensorboard"], "wandb": ["wandb"], "all": ["tensorboard", "wandb"], "none": []}[config.report_to]
    for tracker in trackers:
        if importlib.util.find_spec(tracker) is None:
            raise UserError(f"--report_to {config.report_to} needs the {tracker} package: pip install {tracker}")
    on_cpu_only = not torch.cuda.is_available() and not (hasattr(torch, "xpu") and torch.xpu.is_available()) and not torch.backends.mps.is_available()
    accelerator = Accelerator(
        cpu=on_cpu_only,
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=config.output_dir, logging_dir=RunFolder(config.output_dir).file(config.logging_dir)),
        # A process that died or hangs makes the others' next collective fail after this long, not hang forever.
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=config.ddp_timeout))],
    )
    if accelerator.mixed_precision == "fp16" and accelerator.scaler is None:  # Accelerate's fp16 on a CPU: float32, no autocast, no GradScaler
        raise UserError(
            f"--mixed_precision fp16 needs a CUDA GPU: on the {accelerator.device.type} Accelerate would train in float32, without loss scaling. "
            "Use --mixed_precision bf16 (autocast on the CPU too) or no."
        )
    launched_processes = int(os.environ.get("WORLD_SIZE", accelerator.num_processes))
    if launched_processes != accelerator.num_processes:  # each process would train alone and overwrite the others
        raise UserError(
            f"launched as {launched_processes} processes, but Accelerate sees {accelerator.num_processes}. "
            "Launch with `accelerate launch` or torchrun and a matching accelerate config."
        )
    return accelerator


def epochs_to_steps(config: TrainingConfig, num_images: int, accelerator) -> TrainingConfig:
    """The diffusers example's epoch options (--num_epochs, --save_images_epochs, --save_model_epochs) as our step
    options, now that the dataset size is known: one epoch is ceil(images / global batch) optimizer steps."""
    steps_per_epoch = math.ceil(num_images / config.train_batch_size)
    changes = {}
    for epochs_option, steps_option in (("num_epochs", "max_train_steps"), ("save_images_epochs", "sample_every"), ("save_model_epochs", "save_every")):
        epochs = getattr(config, epochs_option)
        if epochs is not None:
            changes[steps_option] = epochs * steps_per_epoch
            accelerator.print(
                f"note: --{epochs_option} {epochs} is --{steps_option} {changes[steps_option]} ({steps_per_epoch} steps of {config.train_batch_size} images per epoch)."
            )
    return dataclasses.replace(config, **changes) if changes else config


def _initial_unet(config: TrainingConfig, num_classes: int | None = None, accelerator=None):
    """A new UNet of the configured architecture, or the weights of --init_from; with K classes it embeds K + 1
    labels, the last one the null label of classifier-free guidance.

    A model of --init_from gets --dropout when given, and --resolution as its sample_size: the UNet is convolutional
    (no position embedding), so it fine-tunes at any size its levels divide, and the saved pipeline must sample at
    the size it was trained at."""
    from .models import build_unet, check_resolution

    num_class_embeds = num_classes + 1 if num_classes is not None else None
    if config.init_from is None:
        return build_unet(config.model, config.resolution, config.model_config, config.dropout, config.variance_type, num_class_embeds)
    unet = _load_unet(config.init_from, **({"dropout": config.dropout} if config.dropout is not None else {}))
    check_resolution(config.resolution, len(unet.config.block_out_channels))
    if unet.config.sample_size != config.resolution:
        if accelerator is not None:
            accelerator.print(
                f"note: --init_from {config.init_from} was trained at {unet.config.sample_size}px; this run trains and saves it at {config.resolution}px (--resolution)."
            )
        unet.register_to_config(sample_size=config.resolution)
    if unet.config.num_class_embeds != num_class_embeds:
        has = f"{unet.config.num_class_embeds - 1} classes" if unet.config.num_class_embeds else "no classes (unconditional)"
        wants = f"{num_classes} classes (--class_conditional)" if num_classes is not None else "an unconditional model (no --class_conditional)"
        raise UserError(
            f"--init_from {config.init_from} is a model of {has}, but this run trains {wants}. Start from a model of the same kind, or without --init_from."
        )
    return unet


def build_loss(config: TrainingConfig, noise_scheduler, unet, device):
    """The objective of `config` (`ddpm_hf.config.resolved_loss`) for `unet`, whose output channels must fit the variance type.

    simple: DDPMLoss, L_simple (Ho et al. 2020, Eq. 14): every fixed-variance run, exactly as before learned variances.
    hybrid: HybridLoss, L_simple + lambda L_vlb with lambda = --vlb_weight (Nichol & Dhariwal 2021, Eq. 16).
    vlb:    VLBLoss, L_vlb with importance-sampled t (their Eq. 17); its history of L_t is per process and not checkpointed.
    The last two are wrapped in `SummedLossTerms`, so that the log shows L_simple and L_vlb as well as the loss.
    """
    from .config import resolved_loss
    from .losses import DDPMLoss, HybridLoss, VLBLoss
    from .models import output_channels

    in_channels, out_channels = unet.config.in_channels, unet.config.out_channels
    expected = output_channels(in_channels, config.variance_type)
    if out_channels != expected:  # --init_from; a --model_config or --model was checked before, this repeats it
        source = (
            f"--init_from {config.init_from}"
            if config.init_from
            else f"--model_config {config.model_config}"
            if config.model_config
            else f"--model {config.model}"
        )
        kind = (
            "a learned-variance model" if out_channels == 2 * in_channels else "a fixed-variance model" if out_channels == in_channels else "an unknown layout"
        )
        fix = "--variance_type learned_range" if out_channels == 2 * in_channels else "a fixed --variance_type (fixed_large or fixed_small)"
        raise UserError(
            f"{source} outputs {out_channels} channels ({kind}), but --variance_type {config.variance_type} needs {expected}. "
            f"Train it with {fix}, or start from a model of the variance type you want."
        )
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(device)
    loss = resolved_loss(config)
    if loss == "simple":
        return DDPMLoss(alphas_cumprod, config.prediction_type)
    if loss == "hybrid":
        return SummedLossTerms(HybridLoss(alphas_cumprod, config.prediction_type, config.vlb_weight))
    return SummedLossTerms(VLBLoss(alphas_cumprod, config.prediction_type))


class SummedLossTerms:
    """A loss that reports its parts in `last_terms` (HybridLoss: l_simple and l_vlb; VLBLoss: l_vlb), called as that loss,
    which sums those parts on the device after every call. `Metrics.summary` logs their means over the logging interval,
    as it does the loss: no host sync per step."""

    def __init__(self, loss):
        self.loss = loss
        self.sums: dict[str, torch.Tensor] = {}
        self.calls = 0

    def __call__(self, network, x_0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        value = self.loss(network, x_0, generator)
        for name, term in self.loss.last_terms.items():
            self.sums[name] = self.sums[name] + term.float() if name in self.sums else term.float().clone()
        self.calls += 1
        return value

    def pop_means(self) -> dict[str, torch.Tensor]:
        """Each part's mean over the calls since the last pop (device scalars), then start again."""
        means = {name: total / self.calls for name, total in self.sums.items()}
        self.sums, self.calls = {}, 0
        return means


def per_process_batch_size(config: TrainingConfig, num_processes: int) -> int:
    """--train_batch_size is the GLOBAL batch: processes x accumulation steps x per-process batch."""
    parts = num_processes * config.gradient_accumulation_steps
    if config.train_batch_size % parts:
        raise UserError(
            f"--train_batch_size {config.train_batch_size} (the global batch) does not divide by {num_processes} processes x "
            f"{config.gradient_accumulation_steps} accumulation steps. Use a multiple of {parts}, e.g. {max(parts, config.train_batch_size // parts * parts)}."
        )
    return config.train_batch_size // parts


def _use_feature(choice: str, device: torch.device) -> bool:
    return choice == "yes" or (choice == "auto" and device.type == "cuda")


# ---------------------------------------------------------------------------------------------
# The training step
# ---------------------------------------------------------------------------------------------


def train_step(run: Run) -> None:
    """One optimizer step: `gradient_accumulation_steps` micro-batches of the loss, then the LR schedule and the EMA.

    A skipped step (--skip_nonfinite_loss, or fp16 gradients that overflowed, which Accelerate's GradScaler skips)
    leaves the weights as they were but is a step all the same: the learning rate, the EMA decay and the step count
    follow the schedule, so that they stay in step with each other, the checkpoints and a resumed run.
    """
    config, accelerator = run.config, run.accelerator
    skip_step = False  # --skip_nonfinite_loss: a NaN/inf loss of any micro-batch on any process skips this step on all of them
    for micro_step in range(config.gradient_accumulation_steps):
        torch.manual_seed(_step_seed(config.seed, run.step, micro_step, accelerator.process_index))
        start = run.step * config.train_batch_size + (micro_step * accelerator.num_processes + accelerator.process_index) * run.micro_batch
        x_0 = run.batches.batch(start, run.micro_batch)
        if run.channels_last:
            x_0 = x_0.contiguous(memory_format=torch.channels_last)
        network = run.unet
        if run.class_labels is not None:  # labels dropped to the null id with probability --label_dropout
            labels = drop_labels(run.batches.batch_labels(start, run.micro_batch), config.label_dropout, run.class_labels.num_classes)
            network = ClassConditioned(run.unet, labels)
        with accelerator.accumulate(run.unet):
            with accelerator.autocast():
                loss = run.loss_fn(network, x_0)
            if config.skip_nonfinite_loss:  # one small reduction and a host sync per micro-batch, only with this flag
                skip_step = skip_step or not finite_on_every_process(loss, accelerator)
            if skip_step:  # no backward anywhere, so that no process waits in DDP's all-reduce for the others
                run.optimizer.zero_grad(set_to_none=True)  # Accelerate clears at the last micro-batch: the whole step's gradients
                continue
            accelerator.backward(loss)
            grad_norm = gradient_norm(run) if accelerator.sync_gradients else None
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
        run.metrics.add(loss, grad_norm, run.step)
    if skip_step:
        run.metrics.skipped_steps += 1
    with warnings.catch_warnings():  # torch warns when the first optimizer step was skipped; the schedule counts it on purpose
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`")
        run.lr_scheduler.step()
    if run.ema is not None:
        run.ema.update(accelerator.unwrap_model(run.unet), run.step)
    run.step += 1


def finite_on_every_process(loss: torch.Tensor, accelerator) -> bool:
    """Whether the loss is finite on every process: they all skip a step, or none does."""
    nonfinite = (~torch.isfinite(loss.detach())).to(torch.int64).reshape(1)
    return not all_reduce_extreme(nonfinite, "max", accelerator.state).item()


def gradient_norm(run: Run) -> torch.Tensor:
    """The norm of the whole gradient (one device scalar, no host sync), clipped to --max_grad_norm unless that is 0.
    Under fp16 the gradients are unscaled first (Accelerate's GradScaler), so the norm and the clipping are those of
    the true gradient; an infinite or NaN norm means the GradScaler skips this step."""
    accelerator, parameters = run.accelerator, list(run.unet.parameters())
    if run.config.max_grad_norm > 0:
        return accelerator.clip_grad_norm_(parameters, run.config.max_grad_norm)
    accelerator.unscale_gradients()
    return torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])


def _step_seed(seed: int, step: int, micro_step: int, rank: int) -> int:
    """One seed per (step, micro-step, process): noise, timesteps, flips and dropout of any step can be
    reproduced without replaying the ones before it, which makes resuming exact."""
    return (((seed * 1_000_003 + step) * 1_009 + micro_step) * 4_099 + rank) % (2**63 - 1)


NO_STEP = 2**62  # Metrics.first_nonfinite_step while every loss was finite


class Metrics:
    """Loss and gradient norm summed on the device between logs: one host sync per logging interval.

    A step the GradScaler skips (fp16 gradients that overflowed: an infinite or NaN gradient norm) counts in
    `skipped_steps` and the logged loss scale halves; its loss is logged (it was finite), its gradient norm is not.
    A step skipped by --skip_nonfinite_loss counts there too; its non-finite loss is not logged, nor has it a norm.
    """

    def __init__(self, step: int = 0, device: torch.device | str = "cpu"):
        self.restart(step, torch.device(device))

    def restart(self, step: int, device: torch.device, scaler=None) -> None:
        self.scaler = scaler  # Accelerate's GradScaler under fp16, else None
        self.loss = torch.zeros((), device=device)
        self.losses = 0  # micro-batches summed in self.loss
        self.grad_norm = torch.zeros((), device=device)
        self.grad_norms = torch.zeros((), dtype=torch.long, device=device)  # finite norms summed in self.grad_norm
        self.overflowed_steps = torch.zeros((), dtype=torch.long, device=device)
        self.first_nonfinite_step = torch.full((), NO_STEP, dtype=torch.long, device=device)
        self.skipped_steps = 0  # by --skip_nonfinite_loss
        self.since_time, self.since_step = time.perf_counter(), step

    def add(self, loss: torch.Tensor, grad_norm: torch.Tensor | None, step: int) -> None:
        """One micro-batch's loss, and the step's gradient norm at its last micro-batch."""
        self.loss += loss.detach().float()
        self.losses += 1
        if grad_norm is not None:
            finite = torch.isfinite(grad_norm)
            self.grad_norm += torch.where(finite, grad_norm.detach().float(), 0.0)
            self.grad_norms += finite
            if self.scaler is not None:
                self.overflowed_steps += ~finite
        finite_loss = torch.isfinite(loss.detach())
        self.first_nonfinite_step.copy_(torch.where(finite_loss, self.first_nonfinite_step, self.first_nonfinite_step.clamp(max=step)))

    def raise_if_nonfinite(self, accelerator=None) -> None:
        """One host sync (and, with several processes, one reduction, so that all stop together): stop with the
        first step where the loss became NaN/inf on any process."""
        first = self.first_nonfinite_step
        if accelerator is not None:
            first = all_reduce_extreme(first, "min", accelerator.state)
        bad_step = int(first.item())
        if bad_step != NO_STEP:
            raise UserError(
                f"the loss became non-finite at step {bad_step}. The last checkpoint and pipeline are kept. "
                "Lower --learning_rate, use --mixed_precision bf16 instead of fp16, or pass --skip_nonfinite_loss."
            )

    def summary(self, run: Run) -> dict[str, float]:
        """The figures of the interval since the last summary (averaged over it and over processes); starts a new one."""
        steps = run.step - self.since_step
        values = {
            # Every process sums the same number of micro-batches: skips are agreed.
            "loss": run.accelerator.reduce(self.loss, "mean").item() / self.losses if self.losses else math.nan,
            "grad_norm": (self.grad_norm / self.grad_norms.clamp(min=1)).item(),
            "lr": run.lr_scheduler.get_last_lr()[0],
            "img_per_s": steps * run.config.train_batch_size / max(time.perf_counter() - self.since_time, 1e-9),
        }
        if isinstance(run.loss_fn, SummedLossTerms):  # l_simple and l_vlb (bits/dim) of a learned-variance run
            for name, mean in run.loss_fn.pop_means().items():
                values[name] = run.accelerator.reduce(mean, "mean").item()
        if run.ema is not None:
            values["ema_decay"] = run.ema.decay_at(run.step - 1)
        skipped = self.skipped_steps + int(self.overflowed_steps.item())  # since the run (re)started
        if skipped:
            values["skipped_steps"] = skipped
        if self.scaler is not None:
            values["loss_scale"] = self.scaler.get_scale()
        self.loss.zero_()
        self.losses = 0
        self.grad_norm.zero_()
        self.grad_norms.zero_()
        self.since_time, self.since_step = time.perf_counter(), run.step
        return values


# ---------------------------------------------------------------------------------------------
# Upkeep between steps: each job runs when it is due, decided here and nowhere else
# ---------------------------------------------------------------------------------------------


def due(every: int, step: int, at_end: bool = False) -> bool:
    """A job that runs every `every` steps (0: never) is due at multiples of it, and at the end when it asks to be."""
    return every > 0 and (step % every == 0 or at_end)


def upkeep(run: Run, stopping: bool, progress=None) -> None:
    """After a step: log, checkpoint, sample, evaluate, save, push, each when due.

    Every process runs this with the same step, so the jobs that need all of them (the log's reduction, the
    checkpoint, sampling and FID, where each process takes its share) meet; saving and pushing are the main
    process's. At the end (the last step, or a stop signal) only the log and the checkpoint run here; `finish` saves
    the pipeline, draws the last grid, evaluates and pushes.
    """
    config, step, main = run.config, run.step, run.accelerator.is_main_process
    finished = step == config.max_train_steps
    at_end = finished or stopping
    checkpoint = due(config.checkpoint_every, step, at_end)
    sample, evaluate, save = (not at_end and due(every, step) for every in (config.sample_every, config.eval_every, config.save_every))
    push = not at_end and config.push_to_hub and due(config.push_every, step)
    if due(config.logging_steps, step, finished):
        log_metrics(run, progress)
    if checkpoint or sample or evaluate or save or push:
        run.metrics.raise_if_nonfinite(run.accelerator)  # nothing is written from weights that diverged
    if checkpoint:
        save_checkpoint(run.accelerator, run.folder, step, run.ema, run.lr_scheduler, config.checkpoints_total_limit, fixed_options(config))
    if sample:
        save_sample_grid(run)
    if evaluate:
        evaluate_and_keep_best(run)
    if main and (save or push):
        save_pipeline(run.model_to_sample, run.noise_scheduler, run.folder.path, run.class_names)
    if main and push:
        run.hub.push_in_background(step)  # uploads a snapshot; training does not wait


def log_metrics(run: Run, progress=None) -> None:
    run.metrics.raise_if_nonfinite(run.accelerator)
    values = run.metrics.summary(run)
    run.accelerator.log(values, step=run.step)
    if run.accelerator.is_main_process:
        run.folder.append_loss(run.step, values["loss"])
    if progress is not None:
        terms = {name: f"{values[name]:.4f}" for name in ("l_simple", "l_vlb") if name in values}
        progress.set_postfix(loss=f"{values['loss']:.4f}", **terms, lr=f"{values['lr']:.2e}", img_s=f"{values['img_per_s']:.0f}")


def save_sample_grid(run: Run) -> None:
    """The fixed-seed grid of the EMA model at this step, to samples/ and the tracker; then loss.png and progress.png."""
    import numpy as np

    from .sampling import sample_grid
    from .visualize import write_training_figures

    config = run.config
    with run.accelerator.autocast(), eager_sampling():  # every process samples its share; the main one gets the grid and writes it
        grid = sample_grid(
            run.model_to_sample, run.noise_scheduler, config.num_sample_images, config.sample_steps, config.sample_seed, config.sample_scheduler,
            state=run.accelerator.state,
        )  # fmt: skip
    if grid is None:
        return
    path = run.folder.sample_grid_path(run.step)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    grid.save(path)
    for tracker in run.accelerator.trackers:  # each tracker takes images its own way
        if tracker.name == "tensorboard":
            tracker.log_images({"samples": np.asarray(grid)[None]}, step=run.step, dataformats="NHWC")
        else:
            tracker.log_images({"samples": [np.asarray(grid)]}, step=run.step)
    write_training_figures(run.folder.path)


def eager_sampling():
    """Sampling during training runs the UNet eagerly: without --use_ema it is the trained module, compiled in place
    for training (dropout on, gradients), and calling it in eval mode under no_grad would compile another graph, on
    every process, that sampling does not need."""
    return torch.compiler.set_stance("force_eager")


def evaluate_and_keep_best(run: Run) -> None:
    """FID of the EMA model against the training images, by `evaluation.fid_result`, the code `ddpm-hf evaluate`
    runs: every process samples its share and the Inception statistics are merged. The main process keeps the best
    pipeline so far in OUTPUT_DIR/best/ with its eval.json."""
    from .evaluation import FIDEvaluator, fid_result
    from .sampling import make_sampler

    config, accelerator = run.config, run.accelerator
    batch_size = min(FID_BATCH_SIZE, math.ceil(config.eval_num_samples / accelerator.num_processes))  # every process gets a share
    if run.fid_evaluator is None:
        run.fid_evaluator = FIDEvaluator(run.training_images, device=accelerator.device, batch_size=batch_size, state=accelerator.state)
    sampler = make_sampler(run.noise_scheduler, config.sample_scheduler, config.sample_steps)
    reference = f"{config.dataset} ({config.split})"
    with eager_sampling():
        result = fid_result(run.fid_evaluator, run.model_to_sample, sampler, config.eval_num_samples, config.sample_seed, batch_size, reference)
    accelerator.log({"fid": result["fid"]}, step=run.step)
    accelerator.print(f"step {run.step}: FID {result['fid']:.4f} ({config.eval_num_samples} samples, {sampler.describe()})")
    best_fid = run.folder.best.best_fid()
    if accelerator.is_main_process and (best_fid is None or result["fid"] < best_fid):
        save_pipeline(run.model_to_sample, run.noise_scheduler, run.folder.best.path, run.class_names)
        run.folder.best.write_eval(dict(result, step=run.step))


# ---------------------------------------------------------------------------------------------
# The end
# ---------------------------------------------------------------------------------------------


def finish(run: Run, stopped_by: str | None) -> None:
    """Save the EMA pipeline; when training is complete also the last grid, the last FID and the final push."""
    accelerator, config = run.accelerator, run.config
    completed = run.step == config.max_train_steps
    run.metrics.raise_if_nonfinite(accelerator)
    if accelerator.num_processes > 1:
        _check_replicas_identical(accelerator, accelerator.unwrap_model(run.unet))
    if accelerator.is_main_process:
        save_pipeline(run.model_to_sample, run.noise_scheduler, run.folder.path, run.class_names)
        if not completed:
            how = "--resume_from_checkpoint latest" if config.checkpoint_every else "(no checkpoint: --checkpoint_every is 0)"
            print(f"Stopped by {stopped_by} at step {run.step}; to continue, run the same command with {how}.")
    if completed and config.sample_every:
        save_sample_grid(run)
    if completed and config.eval_every:
        evaluate_and_keep_best(run)
    if completed and run.hub is not None:
        run.hub.push_final(run.step)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    release_replicas(run)
    leave_process_group()


def release_replicas(run: Run) -> None:
    """Free the DDP wrapper while the process group is still registered. Freed later (when `run` goes, after
    leave_process_group), its Reducer drops the gloo group's last reference and the group's destructor joins gloo's
    worker threads while holding the GIL, which a worker needs to free the tensors of the last collective it ran: the
    process hangs at exit (seen under load). Dropped by torch.distributed itself, the group is destroyed without it."""
    import gc

    if run.accelerator.num_processes > 1:
        run.unet = run.accelerator.unwrap_model(run.unet)
        run.accelerator.free_memory()  # Accelerate's own references to what it prepared
        gc.collect()  # and any reference cycle that still holds the wrapper


def agreed_stop(run: Run, stop: GracefulStop) -> str | None:
    """The signal that stops training after this step, if any. All processes must stop at the same step, so
    with several they compare every STOP_CHECK_EVERY steps (and at the last)."""
    accelerator = run.accelerator
    if accelerator.num_processes == 1:
        return stop.requested
    if not due(STOP_CHECK_EVERY, run.step, at_end=run.step == run.config.max_train_steps):
        return None
    if accelerator.gather(torch.tensor([stop.requested is not None], device=accelerator.device)).any().item():
        return stop.requested or "a signal to another process"
    return None


def _progress_bar(run: Run):
    from tqdm.auto import tqdm

    return tqdm(
        total=run.config.max_train_steps, initial=run.step, desc="Training", unit="step", disable=not run.accelerator.is_local_main_process, dynamic_ncols=True
    )


# ---------------------------------------------------------------------------------------------
# EMA of the weights
# ---------------------------------------------------------------------------------------------


class ExponentialMovingAverage:
    """theta_ema <- decay * theta_ema + (1 - decay) * theta, after every optimizer step.

    Ho et al. 2020 (Appendix B) use a fixed decay of 0.9999. With `warmup`, the decay ramps up as
    1 - (1 + step / inv_gamma)^-power (capped at `decay`), which helps short runs. diffusers'
    EMAModel has no fixed-decay mode (it always ramps), hence this foreach version of the same update.
    """

    def __init__(self, model: torch.nn.Module, decay: float, warmup: bool = False, inv_gamma: float = 1.0, power: float = 0.75):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.warmup, self.inv_gamma, self.power = decay, warmup, inv_gamma, power

    def decay_at(self, step: int) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, 1.0 - (1.0 + step / self.inv_gamma) ** -self.power)

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        ema_params = list(self.model.parameters())
        params = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - self.decay_at(step))


# ---------------------------------------------------------------------------------------------
# Output folder, checkpoints, the saved pipeline
# ---------------------------------------------------------------------------------------------


def check_output_dir(config: TrainingConfig, folder: RunFolder, resume_path: str | None) -> None:
    """Refuse to mix two different runs in one folder unless asked to, and to resume a checkpoint with other values of
    the options a continued run may not change (resumable=False in config.py; the README's table). Writes nothing."""
    if os.path.exists(folder.path) and not os.path.isdir(folder.path):
        raise UserError(f"--output_dir {folder.path} is a file. Choose a folder.")
    if resume_path is not None:
        recorded = checkpoint_options(resume_path)
        differences = non_resumable_changes(recorded, config) if recorded is not None else []
        if differences:
            shown = ", ".join(f"{name} ({before!r} -> {after!r})" for name, before, after in differences)
            raise UserError(
                f"--resume_from_checkpoint {resume_path} continues a run of other values of options that cannot change on resume: {shown}. "
                "Resume with the values it was trained with (its training_config.json), or start a new run in another --output_dir."
            )
        return
    previous = folder.read_training_config()
    if previous is None or config.overwrite:
        return
    differences = non_resumable_changes(previous, config)
    if differences:
        shown = ", ".join(f"{name} ({before!r} -> {after!r})" for name, before, after in differences[:4])
        raise UserError(
            f"--output_dir {folder.path} holds a run of another configuration ({shown}). "
            "Pass --resume_from_checkpoint latest to continue it, --overwrite to replace it, or another --output_dir."
        )


def checkpoint_options(path: str) -> dict[str, Any] | None:
    """The options a checkpoint's run may not change: recorded in the checkpoint, or (a checkpoint of an older version)
    the training_config.json of the run folder it is in; None if neither is there."""
    recorded = (read_json(os.path.join(path, CHECKPOINT_STATE)) or {}).get("fixed_options")
    return recorded if recorded is not None else RunFolder(os.path.dirname(os.path.dirname(os.path.abspath(path)))).read_training_config()


def create_output_dir(config: TrainingConfig, folder: RunFolder, resuming: bool) -> None:
    """Make OUTPUT_DIR (clearing an old run's outputs with --overwrite) and write the configuration."""
    try:
        if config.overwrite and not resuming:
            folder.clear_training_outputs()
        os.makedirs(folder.path, exist_ok=True)
        folder.write_training_config(config.to_json_dict())
    except OSError as e:
        raise UserError(f"cannot write into --output_dir {folder.path} ({e.strerror or e}). Choose a folder you can write to.") from None


def resolve_resume_path(config: TrainingConfig, folder: RunFolder) -> str | None:
    if config.resume_from_checkpoint is None:
        return None
    if config.resume_from_checkpoint == "latest":
        checkpoints = folder.checkpoints()
        return checkpoints[-1] if checkpoints else None
    path = config.resume_from_checkpoint
    if not os.path.isfile(os.path.join(path, CHECKPOINT_STATE)):
        found = folder.checkpoints()
        hint = f" Checkpoints in {folder.path}: {', '.join(os.path.basename(c) for c in found)}." if found else ""
        raise UserError(f"--resume_from_checkpoint {path} is not a complete checkpoint folder.{hint} Pass one of them, or 'latest'.")
    return path


def save_checkpoint(accelerator, folder: RunFolder, step: int, ema, lr_scheduler, limit: int | None, options: dict | None = None) -> str:
    """Write a checkpoint atomically: into a temporary folder, renamed when complete. `options` (config.fixed_options)
    are recorded for the check of a resume."""
    import json

    from safetensors.torch import save_file

    final = folder.checkpoint_path(step)
    partial = os.path.join(os.path.dirname(final), f".partial-{os.path.basename(final)}")
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial, exist_ok=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(partial, safe_serialization=True)
        if accelerator.is_main_process:
            if ema is not None:
                save_file({k: v.contiguous() for k, v in ema.model.state_dict().items()}, os.path.join(partial, EMA_WEIGHTS_FILE))
            with open(os.path.join(partial, CHECKPOINT_STATE), "w") as f:  # last: marks the checkpoint complete
                json.dump({"step": step, "lr_scheduler": lr_scheduler.state_dict(), "fixed_options": options}, f)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)
    except OSError as e:
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
        raise UserError(
            f"could not write checkpoint {final} ({e.strerror or e}). Free disk space or fix permissions; earlier checkpoints are intact."
        ) from None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and limit is not None:
        for old in folder.checkpoints()[:-limit]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(accelerator, path: str, ema, lr_scheduler) -> int:
    import json

    from accelerate.utils.constants import SCALER_NAME
    from safetensors.torch import load_file

    scaler = accelerator.scaler
    if scaler is not None and not os.path.isfile(os.path.join(path, SCALER_NAME)):
        # A checkpoint written without a GradScaler (an older version's "fp16" on a CPU ran in float32): Accelerate's
        # load_state would look for its state. The loss scale starts afresh and settles within a few steps.
        accelerator.print(f"note: {path} holds no fp16 loss-scaler state ({SCALER_NAME}); the loss scale starts afresh.")
        accelerator.scaler = None
    try:
        accelerator.load_state(path)
    finally:
        accelerator.scaler = scaler
    with open(os.path.join(path, CHECKPOINT_STATE)) as f:
        state = json.load(f)
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    if ema is not None:
        ema.model.load_state_dict(load_file(os.path.join(path, EMA_WEIGHTS_FILE)))  # copied onto the model's device; "cpu:1" is no safetensors device
    return int(state["step"])


@torch.no_grad()
def match_parameter_layouts(optimizer) -> None:
    """Give every optimizer state tensor of a parameter's shape (Adam's exp_avg, exp_avg_sq) that parameter's memory
    layout. Loaded state keeps the layout it was saved with, which is not the parameter's when --channels_last
    differs from the checkpoint's run (or 'auto' resumes on another device); CUDA's fused AdamW refuses such pairs."""
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            state = optimizer.state.get(parameter, {})
            for key, value in state.items():
                if torch.is_tensor(value) and value.shape == parameter.shape and value.stride() != parameter.stride():
                    state[key] = torch.empty_like(parameter, dtype=value.dtype).copy_(value)


def save_pipeline(unet, scheduler, output_dir: str, class_names: list[str] | None = None) -> None:
    """Save `DDPMPipeline(unet, scheduler)` in safetensors, replacing the previous one only once complete. A
    class-conditional UNet is saved as the class-conditional pipeline, with `class_names` (conditioning.py)."""
    from diffusers import DDPMPipeline

    from .conditioning import make_conditional_pipeline_folder, num_classes

    staging = os.path.join(output_dir, ".partial-pipeline")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        DDPMPipeline(unet=_twin(unet), scheduler=scheduler).save_pretrained(staging, safe_serialization=True)
        if num_classes(unet) is not None:
            make_conditional_pipeline_folder(staging, class_names)
        for name in PIPELINE_PARTS:
            target, saved = os.path.join(output_dir, name), os.path.join(staging, name)
            if os.path.isdir(target):
                shutil.rmtree(target)
            elif os.path.isfile(target) and not os.path.exists(saved):  # a part this kind of pipeline does not have
                os.remove(target)
            if os.path.exists(saved):
                os.replace(saved, target)
    except OSError as e:
        raise UserError(
            f"could not save the pipeline into {output_dir} ({e.strerror or e}). Free disk space or fix permissions; checkpoints are intact."
        ) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _twin(unet):
    """A UNet that shares `unet`'s weights but not its config, for saving: diffusers' save_pretrained adds
    _class_name and _diffusers_version to the config it saves, in place, and a compiled training graph guards on
    that dict: saving the trained module itself (--use_ema false) would make every process's next step compile again."""
    with torch.device("meta"):  # no memory, no initialisation: the weights come next
        twin = type(unet).from_config(unet.config)
    twin.load_state_dict(unet.state_dict(), assign=True)
    return twin


def _load_unet(name_or_path: str, **config_overrides):
    """UNet weights of a saved pipeline (folder or Hub id), safetensors only; `config_overrides` (e.g. dropout)
    replace values of its config.json before the modules are built."""
    from diffusers import UNet2DModel

    try:
        return UNet2DModel.from_pretrained(name_or_path, subfolder="unet", use_safetensors=True, **config_overrides)
    except (OSError, ValueError) as e:
        raise UserError(
            f"--init_from {name_or_path}: no pipeline UNet with safetensors weights there ({str(e).splitlines()[0]}). Give a folder saved by this package or a Hub id."
        ) from None


# ---------------------------------------------------------------------------------------------
# Processes, compilation, signals
# ---------------------------------------------------------------------------------------------


def _check_hub(config: TrainingConfig, accelerator):
    """Check the token and create the repo on the main process; every process stops if that fails."""
    from accelerate.utils import broadcast_object_list

    hub, problem = None, [None]
    if accelerator.is_main_process:
        from .hub import HubPusher, describe_hardware

        hub = HubPusher(
            config.hub_model_id, config.hub_token, config.hub_private_repo, config.output_dir, hardware=describe_hardware(accelerator.num_processes)
        )
        try:
            hub.check()
        except UserError as e:
            problem = [str(e)]
    if accelerator.num_processes > 1:
        problem = broadcast_object_list(problem)
    if problem[0] is not None:
        raise UserError(problem[0])
    return hub


@torch.no_grad()
def _check_replicas_identical(accelerator, model) -> None:
    """DDP keeps one model on every process; a fingerprint per process proves it did."""
    flat = torch.cat([p.detach().double().flatten() for p in model.parameters()])
    weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device).remainder_(9973).add_(1)
    fingerprint = torch.stack([flat.sum(), (flat * weights).sum()]).unsqueeze(0)
    everyone = accelerator.gather(fingerprint)
    if not torch.equal(everyone, fingerprint.expand_as(everyone)):
        raise RuntimeError(f"the processes hold different weights at the end of training: {everyone.tolist()}")
    accelerator.print(f"Weights are identical on all {accelerator.num_processes} processes.")


TRAINING_GOES_ON = "training without it (--compile no skips the attempt)."


def _compile_or_fall_back(prepared, micro_batch: int, resolution: int, channels_last: bool, accelerator) -> bool:
    """torch.compile the UNet in place and run one training forward/backward through `prepared` (the UNet as
    accelerator.prepare returned it: under DDP, Dynamo then splits the graph at DDP's gradient buckets, as training
    needs), so that a compiler that fails (no C++ compiler or Triton, an unsupported platform: Dynamo's and Inductor's
    errors) shows now: warn and train eagerly instead. Other errors are no compiler's: running out of memory is the
    one-line error that names the fix, and anything else propagates as it is. Every process calls this together."""
    from torch._dynamo.exc import TorchDynamoException

    model = accelerator.unwrap_model(prepared)
    device = accelerator.device
    example = torch.zeros((micro_batch, model.config.in_channels, resolution, resolution), device=device)
    if channels_last:
        example = example.contiguous(memory_format=torch.channels_last)
    zeros = torch.zeros(micro_batch, dtype=torch.long, device=device)
    labels = zeros if num_classes(model) is not None else None  # a class-conditional UNet needs its labels
    try:
        model.compile()
    except Exception as error:  # torch.compile refuses this platform outright (e.g. a Python that Dynamo does not support)
        warn_compile_failed(error, TRAINING_GOES_ON)
        return False
    try:
        with accelerator.autocast():
            output = prepared(example, zeros, **class_label_arguments(labels)).sample
        output.float().square().mean().backward()
        return True
    except Exception as error:
        if out_of_memory_in(error) is not None:
            raise UserError(
                f"out of memory in the first training step: a micro-batch of {micro_batch} images of {resolution}x{resolution} per process "
                f"does not fit on {device}. Raise --gradient_accumulation_steps (the same global batch in smaller micro-batches) or lower --train_batch_size."
            ) from None
        if not isinstance(error, TorchDynamoException):
            raise
        model._compiled_call_impl = None  # set by nn.Module.compile(): back to the eager forward
        warn_compile_failed(error, TRAINING_GOES_ON)
        return False
    finally:
        model.zero_grad(set_to_none=True)


class GracefulStop:
    """Turn SIGTERM (preemption) and SIGINT (Ctrl-C) into 'finish this step, checkpoint, exit 0'."""

    def __init__(self):
        self.requested = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. a notebook worker): keep default handling
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.requested = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

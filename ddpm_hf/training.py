"""Where the model learns: the Accelerate training loop, its checkpoints and the saved pipeline.

Read top to bottom: `train()` sets up (output folder, data, model, optimizer, EMA), then runs one
optimizer step per loop iteration, and on schedule logs, samples, checkpoints and saves. What ends up
in OUTPUT_DIR:

    model_index.json, unet/, scheduler/   the EMA pipeline: DDPMPipeline.from_pretrained(OUTPUT_DIR)
    training_config.json                  the resolved configuration (no token)
    samples/step_XXXXXXX.png              fixed-seed sample grids from the EMA model
    checkpoints/checkpoint-XXXXXXX/       resumable state (model, optimizer, EMA, step, RNG)
    logs/                                 tensorboard
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import time
from dataclasses import dataclass

import torch

from .config import TrainingConfig
from .errors import UserError

CHECKPOINT_PREFIX = "checkpoint-"
TRAINING_STATE_FILE = "training_state.json"
EMA_WEIGHTS_FILE = "ema_unet.safetensors"
LOSS_HISTORY_FILE = "loss_history.jsonl"  # one {"step", "loss"} line per logging interval, for loss.png
# Options that may change between a run and its continuation without making it another run.
_RESUMABLE_CHANGES = {
    "resume_from_checkpoint", "max_train_steps", "overwrite", "config", "logging_steps", "sample_every", "checkpoint_every",
    "checkpoints_total_limit", "save_every", "push_to_hub", "hub_model_id", "hub_private_repo", "push_every", "eval_every",
    "eval_num_samples", "dataloader_num_workers", "compile", "channels_last", "num_sample_images", "sample_steps", "max_in_memory_gb",
}


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
# Output folder, checkpoints
# ---------------------------------------------------------------------------------------------


def check_output_dir(config: TrainingConfig, resuming: bool) -> None:
    """Refuse to mix two different runs in one folder unless asked to. Writes nothing."""
    saved_config = os.path.join(config.output_dir, "training_config.json")
    if os.path.exists(config.output_dir) and not os.path.isdir(config.output_dir):
        raise UserError(f"--output_dir {config.output_dir} is a file. Choose a folder.")
    if os.path.isfile(saved_config) and not resuming and not config.overwrite:
        with open(saved_config) as f:
            previous = json.load(f)
        current = config.to_json_dict()
        differences = sorted(k for k in current if k not in _RESUMABLE_CHANGES and previous.get(k) != current[k])
        if differences:
            shown = ", ".join(f"{k} ({previous.get(k)!r} -> {current[k]!r})" for k in differences[:4])
            raise UserError(
                f"--output_dir {config.output_dir} holds a run of another configuration ({shown}). "
                "Pass --resume_from_checkpoint latest to continue it, --overwrite to replace it, or another --output_dir."
            )


def create_output_dir(config: TrainingConfig, resuming: bool) -> None:
    """Make OUTPUT_DIR (clearing an old run's checkpoints, samples and logs with --overwrite) and write the config."""
    if config.overwrite and not resuming:
        for name in ("checkpoints", "samples", "logs", "best"):
            shutil.rmtree(os.path.join(config.output_dir, name), ignore_errors=True)
        for name in (LOSS_HISTORY_FILE, "loss.png", "progress.png"):
            if os.path.isfile(os.path.join(config.output_dir, name)):
                os.remove(os.path.join(config.output_dir, name))
    try:
        os.makedirs(config.output_dir, exist_ok=True)
        config.save(os.path.join(config.output_dir, "training_config.json"))
    except OSError as e:
        raise UserError(f"cannot write into --output_dir {config.output_dir} ({e.strerror or e}). Choose a folder you can write to.") from None


def list_checkpoints(output_dir: str) -> list[str]:
    """Complete checkpoints, oldest first. Incomplete ones never carry the final name (see save_checkpoint)."""
    folder = os.path.join(output_dir, "checkpoints")
    if not os.path.isdir(folder):
        return []
    names = [n for n in os.listdir(folder) if n.startswith(CHECKPOINT_PREFIX) and os.path.isfile(os.path.join(folder, n, TRAINING_STATE_FILE))]
    return [os.path.join(folder, n) for n in sorted(names, key=lambda n: int(n[len(CHECKPOINT_PREFIX):]))]


def resolve_resume_path(config: TrainingConfig) -> str | None:
    if config.resume_from_checkpoint is None:
        return None
    if config.resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(config.output_dir)
        return checkpoints[-1] if checkpoints else None
    path = config.resume_from_checkpoint
    if not os.path.isfile(os.path.join(path, TRAINING_STATE_FILE)):
        found = list_checkpoints(config.output_dir)
        hint = f" Checkpoints in {config.output_dir}: {', '.join(os.path.basename(c) for c in found)}." if found else ""
        raise UserError(f"--resume_from_checkpoint {path} is not a complete checkpoint folder.{hint} Pass one of them, or 'latest'.")
    return path


def save_checkpoint(accelerator, output_dir: str, step: int, ema, lr_scheduler, limit: int | None) -> str:
    """Write a checkpoint atomically: into a temporary folder, renamed when complete."""
    from safetensors.torch import save_file

    folder = os.path.join(output_dir, "checkpoints")
    final = os.path.join(folder, f"{CHECKPOINT_PREFIX}{step:07d}")
    partial = os.path.join(folder, f".partial-{CHECKPOINT_PREFIX}{step:07d}")
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial, exist_ok=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(partial, safe_serialization=True)
        if accelerator.is_main_process:
            if ema is not None:
                save_file({k: v.contiguous() for k, v in ema.model.state_dict().items()}, os.path.join(partial, EMA_WEIGHTS_FILE))
            state = {"step": step, "lr_scheduler": lr_scheduler.state_dict()}
            with open(os.path.join(partial, TRAINING_STATE_FILE), "w") as f:
                json.dump(state, f)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)
    except OSError as e:
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
        raise UserError(f"could not write checkpoint {final} ({e.strerror or e}). Free disk space or fix permissions; earlier checkpoints are intact.") from None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and limit is not None:
        for old in list_checkpoints(output_dir)[:-limit]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(accelerator, path: str, ema, lr_scheduler) -> int:
    from safetensors.torch import load_file

    accelerator.load_state(path)
    with open(os.path.join(path, TRAINING_STATE_FILE)) as f:
        state = json.load(f)
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    if ema is not None:
        ema.model.load_state_dict(load_file(os.path.join(path, EMA_WEIGHTS_FILE), device=str(accelerator.device)))
    return int(state["step"])


def save_pipeline(unet, scheduler, output_dir: str) -> None:
    """Save `DDPMPipeline(unet, scheduler)` in safetensors, replacing the previous one only once complete."""
    from diffusers import DDPMPipeline

    staging = os.path.join(output_dir, ".partial-pipeline")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(staging, safe_serialization=True)
        for name in ("unet", "scheduler", "model_index.json"):
            target = os.path.join(output_dir, name)
            if os.path.isdir(target):
                shutil.rmtree(target)
            os.replace(os.path.join(staging, name), target)
    except OSError as e:
        raise UserError(f"could not save the pipeline into {output_dir} ({e.strerror or e}). Free disk space or fix permissions; checkpoints are intact.") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Samples
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_grid(unet, scheduler, num_images: int, num_inference_steps: int, seed: int, sampler: str = "auto"):
    """A grid of images from `unet` (in eval mode) with a fixed seed; sampler 'auto': DDIM when fewer than T steps."""
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline
    from diffusers.utils import make_image_grid

    from .sampling import grid_shape

    was_training = unet.training
    unet.eval()
    if sampler == "auto":
        sampler = "ddim" if num_inference_steps < scheduler.config.num_train_timesteps else "ddpm"
    if sampler == "ddim":
        pipeline = DDIMPipeline(unet=unet, scheduler=DDIMScheduler.from_config(scheduler.config))
    else:
        pipeline = DDPMPipeline(unet=unet, scheduler=copy.deepcopy(scheduler))
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator("cpu").manual_seed(seed)
    images = pipeline(batch_size=num_images, generator=generator, num_inference_steps=num_inference_steps).images
    unet.train(was_training)
    return make_image_grid(images, *grid_shape(num_images))


# ---------------------------------------------------------------------------------------------
# Stopping on SIGTERM / SIGINT
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainingResult:
    output_dir: str
    step: int
    stopped_early: bool = False


def per_process_batch_size(config: TrainingConfig, num_processes: int) -> int:
    """--train_batch_size is the GLOBAL batch: processes x accumulation steps x per-process batch."""
    parts = num_processes * config.gradient_accumulation_steps
    if config.train_batch_size % parts:
        raise UserError(
            f"--train_batch_size {config.train_batch_size} (the global batch) does not divide by {num_processes} processes x "
            f"{config.gradient_accumulation_steps} accumulation steps. Use a multiple of {parts}, e.g. {max(parts, config.train_batch_size // parts * parts)}."
        )
    return config.train_batch_size // parts


def _step_seed(seed: int, step: int, micro_step: int, rank: int) -> int:
    """One seed per (step, micro-step, process): noise, timesteps, flips and dropout of any step can be
    reproduced without replaying the ones before it, which makes resuming exact."""
    return (((seed * 1_000_003 + step) * 1_009 + micro_step) * 4_099 + rank) % (2**63 - 1)


def _use_feature(choice: str, device: torch.device) -> bool:
    return choice == "yes" or (choice == "auto" and device.type == "cuda")


def train(config: TrainingConfig) -> TrainingResult:
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    from . import data as data_lib
    from .losses import DDPMLoss
    from .models import build_scheduler, build_unet, check_resolution, count_parameters
    from .visualize import write_training_figures

    # ---- Accelerate, output folder ---------------------------------------------------------------
    # Without a GPU, Accelerate only joins a torchrun/accelerate process group when told it runs on the CPU.
    on_cpu_only = not torch.cuda.is_available() and not (hasattr(torch, "xpu") and torch.xpu.is_available()) and not torch.backends.mps.is_available()
    accelerator = Accelerator(
        cpu=on_cpu_only,
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=config.output_dir, logging_dir=os.path.join(config.output_dir, "logs")),
    )
    device = accelerator.device
    launched_processes = int(os.environ.get("WORLD_SIZE", accelerator.num_processes))
    if launched_processes != accelerator.num_processes:  # each process would train alone and overwrite the others
        raise UserError(f"launched as {launched_processes} processes, but Accelerate sees {accelerator.num_processes}. Launch with `accelerate launch` or torchrun and a matching accelerate config.")
    micro_batch = per_process_batch_size(config, accelerator.num_processes)
    resume_path = resolve_resume_path(config)
    check_output_dir(config, resuming=resume_path is not None)

    hub = None
    if config.push_to_hub:
        hub = _check_hub(config, accelerator)  # a bad token or repo id fails now, not after hours of training

    # ---- Data: decoded once, batches built on the device ----------------------------------------
    with accelerator.main_process_first():
        dataset = data_lib.load_image_dataset(config.dataset, config.split, config.dataset_config)
        if config.max_train_samples is not None:
            dataset = dataset.select(range(min(config.max_train_samples, len(dataset))))
    decoded = data_lib.decode_images(
        dataset, config.resolution, config.image_column, config.on_corrupt_image, config.max_in_memory_gb, progress=accelerator.is_local_main_process
    )
    batches = data_lib.ImageBatches(decoded.images, config.seed, config.random_flip, device, keep_on_host=decoded.memory_mapped)

    # ---- Model, noise schedule, objective --------------------------------------------------------
    noise_scheduler = build_scheduler(config)
    set_seed(config.seed)  # the same initial weights on every process and every run with this seed
    if config.init_from is not None:
        unet = _load_unet(config.init_from)
        check_resolution(config.resolution, len(unet.config.block_out_channels))
    else:
        unet = build_unet(config.model, config.resolution, config.model_config, config.dropout)
    use_channels_last = _use_feature(config.channels_last, device)
    if use_channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    loss_fn = DDPMLoss(noise_scheduler.alphas_cumprod.to(device), config.prediction_type)
    unet.to(device)
    ema = ExponentialMovingAverage(unet, config.ema_decay, config.ema_warmup, config.ema_inv_gamma, config.ema_power) if config.use_ema else None

    # Every input is checked: only now is anything written.
    if accelerator.is_main_process:
        create_output_dir(config, resuming=resume_path is not None)
    accelerator.wait_for_everyone()

    # ---- Optimizer and LR schedule, counted in optimizer steps -----------------------------------
    optimizer = torch.optim.AdamW(
        unet.parameters(), lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_epsilon, weight_decay=config.weight_decay, fused=device.type in ("cuda", "cpu"),  # fused: one kernel per step (bench/RESULTS.md)
    )
    # Not passed to accelerator.prepare: a prepared scheduler steps once per process per call, which
    # shortens warm-up by the number of GPUs. We step it once per optimizer step ourselves.
    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps, num_training_steps=config.max_train_steps)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    if _use_feature(config.compile, device):
        model = accelerator.unwrap_model(unet)
        example = torch.zeros((micro_batch, model.config.in_channels, config.resolution, config.resolution), device=device)
        if use_channels_last:
            example = example.contiguous(memory_format=torch.channels_last)
        _compile_or_fall_back(model, example, torch.zeros(micro_batch, dtype=torch.long, device=device), accelerator.autocast)

    step = 0
    if resume_path is not None:
        step = load_checkpoint(accelerator, resume_path, ema, lr_scheduler)
        if accelerator.is_main_process:
            _forget_losses_after(config.output_dir, step)
        accelerator.print(f"Resumed from {resume_path} at step {step}.")
    elif config.resume_from_checkpoint == "latest":
        accelerator.print(f"No checkpoint in {config.output_dir}/checkpoints yet: starting a new run.")

    if accelerator.is_main_process:
        tracker_config = {k: v for k, v in config.to_json_dict().items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers("ddpm", config=tracker_config)
    accelerator.print(
        f"Training {count_parameters(unet):,} parameters on {len(decoded.images):,} images ({config.dataset}, {config.split}) "
        f"for {config.max_train_steps:,} steps of {config.train_batch_size} images "
        f"({accelerator.num_processes} processes x {config.gradient_accumulation_steps} accumulation x {micro_batch}) on {device}."
    )

    # ---- Train -----------------------------------------------------------------------------------
    def sample_and_save_grid(at_step: int):
        model = ema.model if ema is not None else accelerator.unwrap_model(unet)
        with accelerator.autocast():
            grid = sample_grid(model, noise_scheduler, config.num_sample_images, config.sample_steps, config.sample_seed, config.sample_scheduler)
        path = os.path.join(config.output_dir, "samples", f"step_{at_step:07d}.png")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        grid.save(path)
        import numpy as np

        tracker = accelerator.get_tracker("tensorboard", unwrap=True)
        tracker.add_image("samples", np.asarray(grid), at_step, dataformats="HWC")
        write_training_figures(config.output_dir)  # loss.png and progress.png

    fid_evaluator, best_fid = None, _best_fid_so_far(config.output_dir)

    def evaluate_and_keep_best(at_step: int):
        """FID of the EMA model against the training images; the best pipeline so far goes to OUTPUT_DIR/best/."""
        nonlocal fid_evaluator, best_fid
        from .evaluation import FIDEvaluator

        if fid_evaluator is None:
            fid_evaluator = FIDEvaluator(decoded.images, device=device)
        model = ema.model if ema is not None else accelerator.unwrap_model(unet)
        sampler = None if config.sample_scheduler == "auto" else config.sample_scheduler
        fid = fid_evaluator.fid_of(model, noise_scheduler, config.eval_num_samples, config.sample_steps, seed=config.sample_seed, sampler=sampler)
        accelerator.log({"fid": fid}, step=at_step)
        accelerator.print(f"step {at_step}: FID {fid:.2f} ({config.eval_num_samples} samples, {config.sample_steps} steps)")
        if best_fid is None or fid < best_fid:
            best_fid = fid
            best_dir = os.path.join(config.output_dir, "best")
            save_pipeline(model, noise_scheduler, best_dir)
            with open(os.path.join(best_dir, "eval.json"), "w") as f:
                json.dump({"fid": fid, "step": at_step, "num_samples": config.eval_num_samples, "steps": config.sample_steps, "reference": f"{config.dataset} ({config.split})"}, f, indent=2)

    def save_final_pipeline():
        model = ema.model if ema is not None else accelerator.unwrap_model(unet)
        save_pipeline(model, noise_scheduler, config.output_dir)

    unet.train()
    running = {"loss": torch.zeros((), device=device), "grad_norm": torch.zeros((), device=device)}
    first_nonfinite_step = torch.full((), -1, dtype=torch.long, device=device)
    skipped_steps = 0
    last_log_time, last_log_step = time.perf_counter(), step
    progress = tqdm(total=config.max_train_steps, initial=step, desc="Training", unit="step", disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    stopped_by = None

    def check_finite():
        """One host sync: stop with the step where the loss first became NaN/inf."""
        bad_step = int(first_nonfinite_step.item())
        if bad_step >= 0:
            raise UserError(
                f"the loss became non-finite at step {bad_step}. The last checkpoint and pipeline are kept. "
                "Lower --learning_rate, use --mixed_precision bf16 instead of fp16, or pass --skip_nonfinite_loss."
            )

    with GracefulStop() as stop:
        while step < config.max_train_steps:
            for micro_step in range(config.gradient_accumulation_steps):
                torch.manual_seed(_step_seed(config.seed, step, micro_step, accelerator.process_index))
                start = step * config.train_batch_size + (micro_step * accelerator.num_processes + accelerator.process_index) * micro_batch
                x_0 = batches.batch(start, micro_batch)
                if use_channels_last:
                    x_0 = x_0.contiguous(memory_format=torch.channels_last)
                with accelerator.accumulate(unet):
                    with accelerator.autocast():
                        loss = loss_fn(unet, x_0)
                    finite = torch.isfinite(loss)
                    if config.skip_nonfinite_loss and not bool(finite):  # a host sync, only with this flag
                        skipped_steps += 1
                        optimizer.zero_grad(set_to_none=True)
                        continue
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and config.max_grad_norm > 0:
                        running["grad_norm"] += accelerator.clip_grad_norm_(unet.parameters(), config.max_grad_norm).detach().float()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                running["loss"] += loss.detach().float() / config.gradient_accumulation_steps
                first_nonfinite_step.copy_(torch.where(~finite & (first_nonfinite_step < 0), step, first_nonfinite_step))
            lr_scheduler.step()
            if ema is not None:
                ema.update(accelerator.unwrap_model(unet), step)
            step += 1
            progress.update(1)

            if step % config.logging_steps == 0 or step == config.max_train_steps:
                check_finite()
                elapsed = time.perf_counter() - last_log_time
                steps_done = step - last_log_step
                logs = {
                    "loss": accelerator.reduce(running["loss"], "mean").item() / steps_done,
                    "grad_norm": running["grad_norm"].item() / steps_done,
                    "lr": lr_scheduler.get_last_lr()[0],
                    "img_per_s": steps_done * config.train_batch_size / max(elapsed, 1e-9),
                }
                if ema is not None:
                    logs["ema_decay"] = ema.decay_at(step - 1)
                if skipped_steps:
                    logs["skipped_steps"] = skipped_steps
                accelerator.log(logs, step=step)
                if accelerator.is_main_process:
                    with open(os.path.join(config.output_dir, LOSS_HISTORY_FILE), "a") as f:
                        f.write(json.dumps({"step": step, "loss": logs["loss"]}) + "\n")
                progress.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}", img_s=f"{logs['img_per_s']:.0f}")
                running["loss"].zero_()
                running["grad_norm"].zero_()
                last_log_time, last_log_step = time.perf_counter(), step

            finished = step == config.max_train_steps
            if accelerator.num_processes == 1:
                stopped_by = stop.requested
            elif step % 10 == 0:  # all processes must agree to stop at the same step
                if accelerator.gather(torch.tensor([stop.requested is not None], device=device)).any().item():
                    stopped_by = stop.requested or "a signal to another process"
            if config.checkpoint_every and (step % config.checkpoint_every == 0 or stopped_by or finished):
                check_finite()
                save_checkpoint(accelerator, config.output_dir, step, ema, lr_scheduler, config.checkpoints_total_limit)
            if accelerator.is_main_process and not finished and not stopped_by:
                if config.sample_every and step % config.sample_every == 0:
                    check_finite()
                    sample_and_save_grid(step)
                if config.eval_every and step % config.eval_every == 0:
                    check_finite()
                    evaluate_and_keep_best(step)
                if config.save_every and step % config.save_every == 0:
                    check_finite()
                    save_final_pipeline()
                if hub is not None and config.push_every and step % config.push_every == 0:
                    if not (config.save_every and step % config.save_every == 0):
                        check_finite()
                        save_final_pipeline()
                    hub.push_in_background(step)  # uploads a snapshot; training does not wait
            if stopped_by and not finished:
                break
    progress.close()

    # ---- Save ------------------------------------------------------------------------------------
    check_finite()
    if accelerator.num_processes > 1:
        _check_replicas_identical(accelerator, accelerator.unwrap_model(unet))
    if accelerator.is_main_process:
        save_final_pipeline()
        if stopped_by and step < config.max_train_steps:
            where = "--resume_from_checkpoint latest" if config.checkpoint_every else "(no checkpoint: --checkpoint_every is 0)"
            print(f"Stopped by {stopped_by} at step {step}; to continue, run the same command with {where}.")
        else:
            if config.sample_every:
                sample_and_save_grid(step)
            if config.eval_every:
                evaluate_and_keep_best(step)
            if hub is not None:
                hub.push_final(step)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainingResult(output_dir=config.output_dir, step=step, stopped_early=step < config.max_train_steps)


def _compile_or_fall_back(model, example: torch.Tensor, timesteps: torch.Tensor, autocast) -> bool:
    """torch.compile `model` in place and run one forward/backward on `example`, so that a failure (no C++
    compiler or Triton, an unsupported platform) shows now: warn and train eagerly instead."""
    import warnings

    model.compile()
    try:
        with autocast():
            output = model(example, timesteps).sample
        output.float().square().mean().backward()
        return True
    except Exception as error:
        model._compiled_call_impl = None  # set by nn.Module.compile(): back to the eager forward
        first_line = (str(error).strip().splitlines() or [""])[0][:200]
        warnings.warn(f"torch.compile failed ({type(error).__name__}: {first_line}); training without it (--compile no skips the attempt).", RuntimeWarning)
        return False
    finally:
        model.zero_grad(set_to_none=True)


def _best_fid_so_far(output_dir: str) -> float | None:
    """A resumed run keeps the best/ pipeline unless it does better."""
    path = os.path.join(output_dir, "best", "eval.json")
    if os.path.isfile(path):
        with open(path) as f:
            return float(json.load(f)["fid"])
    return None


def _forget_losses_after(output_dir: str, step: int) -> None:
    """A resumed run logs the steps after its checkpoint again: drop the interrupted run's copies."""
    path = os.path.join(output_dir, LOSS_HISTORY_FILE)
    if os.path.isfile(path):
        with open(path) as f:
            kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
        with open(path, "w") as f:
            f.writelines(kept)


def _check_hub(config: TrainingConfig, accelerator):
    """Check the token and create the repo on the main process; every process stops if that fails."""
    from accelerate.utils import broadcast_object_list

    hub, problem = None, [None]
    if accelerator.is_main_process:
        from .hub import HubPusher, describe_hardware

        hub = HubPusher(config.hub_model_id, config.hub_token, config.hub_private_repo, config.output_dir, hardware=describe_hardware(accelerator.num_processes))
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


def _load_unet(name_or_path: str):
    """UNet weights of a saved pipeline (folder or Hub id), safetensors only."""
    from diffusers import UNet2DModel

    try:
        return UNet2DModel.from_pretrained(name_or_path, subfolder="unet", use_safetensors=True)
    except (OSError, EnvironmentError, ValueError) as e:
        raise UserError(f"--init_from {name_or_path}: no pipeline UNet with safetensors weights there ({str(e).splitlines()[0]}). Give a folder saved by this package or a Hub id.") from None

# Copyright 2026 The ddpm-hf authors. Licensed under the Apache License, Version 2.0.
"""A DDPM sampling pipeline that exposes the reverse trajectory.

This file is self-contained on purpose: it only imports torch, numpy, PIL and diffusers, so it can be uploaded to the
Hugging Face Hub next to a model and loaded as a custom pipeline, for example::

    from diffusers import DiffusionPipeline

    # the file is at the root of the model repo as `ddpm_trajectory.py`
    pipe = DiffusionPipeline.from_pretrained(
        "user/name", custom_pipeline="ddpm_trajectory", trust_remote_code=True
    )

    # or from a local copy of this file
    pipe = DiffusionPipeline.from_pretrained(
        "path/to/saved_pipeline", custom_pipeline="path/to/ddpm_trajectory.py", trust_remote_code=True
    )

Compared with diffusers' `DDPMPipeline` it adds: any compatible scheduler (DDPM, DDIM, DPM-Solver++, ...) with
`num_inference_steps`, caller-given initial noise `latents`, `eta` for DDIM, a per-step callback receiving the current
sample and the predicted clean image, and an optional in-memory trajectory on the output. With the default
`DDPMScheduler` and the same generator it produces exactly the same images as `DDPMPipeline`.

Learned variances (Nichol & Dhariwal 2021, "Improved Denoising Diffusion Probabilistic Models", Sec. 3.1): a UNet with
2 x C output channels gives the mean part (eps, x_0 or v) and then the variance's interpolation coefficient v (Eq. 15).
`DDPMScheduler` reads both when its `variance_type` is "learned_range" (or "learned"); every other scheduler (DDIM,
DPM-Solver++, ...) samples from the mean alone and is given only the first C channels.
"""

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import DDPMParallelScheduler, DDPMScheduler, DiffusionPipeline, UNet2DModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput, logging
from diffusers.utils.torch_utils import randn_tensor

logger = logging.get_logger(__name__)

_OUTPUT_TYPES = ("pil", "np", "pt")

# The schedulers whose `step` splits a 2 x C-channel model output into mean part and variance itself, when their config
# says variance_type "learned" or "learned_range". Every other scheduler is given the first C channels.
_VARIANCE_READING_SCHEDULERS = (DDPMScheduler, DDPMParallelScheduler)
_LEARNED_VARIANCES = ("learned", "learned_range")


@dataclass
class DDPMTrajectoryPipelineOutput(BaseOutput):
    """Output of [`DDPMTrajectoryPipeline`].

    Args:
        images (`list[PIL.Image.Image]`, `np.ndarray` or `torch.Tensor`):
            The generated images in [0, 1]: a list of PIL images (`output_type="pil"`), a float array of shape
            `(batch, height, width, channels)` (`"np"`) or a float tensor of shape `(batch, channels, height, width)`
            (`"pt"`).
        trajectory_x_t (`list[torch.Tensor]`, *optional*):
            Only set when the pipeline is called with `return_trajectory=True`. One CPU tensor of shape
            `(batch, channels, height, width)` per scheduler step, in the model's value range (about [-1, 1], not
            clipped or rescaled): entry `i` is the sample *after* step `i`, i.e. `x_{t-1}` computed at timestep
            `scheduler.timesteps[i]`. The last entry is the final sample before the mapping to [0, 1]. The initial
            noise `x_T` is not included (pass your own `latents` if you need it).
        trajectory_pred_x0 (`list[torch.Tensor]`, *optional*):
            Only set when `return_trajectory=True`. Same length and shapes as `trajectory_x_t`: entry `i` is the
            prediction of the clean image `x_0` made by the model at step `i` (from the sample that entered step `i`).
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    trajectory_x_t: list[torch.Tensor] | None = None
    trajectory_pred_x0: list[torch.Tensor] | None = None


class DDPMTrajectoryPipeline(DiffusionPipeline):
    r"""Unconditional image generation with a DDPM that can report its reverse (denoising) trajectory.

    Parameters:
        unet ([`UNet2DModel`]):
            The denoising model, trained on images scaled to [-1, 1]. With a learned variance it outputs 2 x C
            channels (mean part, then variance); schedulers that do not read the variance get the first C.
        scheduler ([`SchedulerMixin`]):
            Any scheduler whose `step` returns `prev_sample`, e.g. [`DDPMScheduler`] (ancestral sampling, the
            default when loading a DDPM checkpoint), [`DDIMScheduler`], [`DPMSolverMultistepScheduler`], [`UniPCMultistepScheduler`],
            [`DEISMultistepScheduler`], or [`EulerDiscreteScheduler`] / [`HeunDiscreteScheduler`] with `use_karras_sigmas=True`. To
            switch, build the new one from the current config:
            `pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)`. This is how ddpm-hf's own commands
            choose (`ddpm_hf.sampling.make_sampler`): "ddpm" with all T steps, "ddim" (eta = 0) with fewer unless asked
            otherwise, "dpmsolver" for DPM-Solver++(2M), "unipc", "deis", and "euler" / "heun" on Karras sigmas; it
            also refuses the combinations diffusers mishandles (ddpm-hf's README, Sampling). Avoid `DDPMScheduler` with `timestep_spacing="trailing"` and
            fewer than T steps: its last step is above t = 0, where it still adds noise (fixed_large), and the image
            stays noisy; use "leading" or "linspace", or DDIM.
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet: UNet2DModel, scheduler: SchedulerMixin):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    # ------------------------------------------------------------------ helpers

    def _sample_shape(self, batch_size: int) -> tuple:
        size = self.unet.config.sample_size
        if isinstance(size, int):
            size = (size, size)
        return (batch_size, self.unet.config.in_channels, *size)

    def _step_kwargs(self, generator, eta: float) -> dict:
        """Keyword arguments for `scheduler.step`, keeping only the ones this scheduler accepts."""
        accepted = set(inspect.signature(self.scheduler.step).parameters)
        kwargs = {}
        if "generator" in accepted:
            kwargs["generator"] = generator
        if "eta" in accepted:
            kwargs["eta"] = eta
        elif eta != 0.0:
            logger.warning(f"`eta={eta}` is ignored: {self.scheduler.__class__.__name__}.step does not take `eta` (it is used by DDIMScheduler).")
        return kwargs

    def _mean_channels(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """The mean part of the model output: all of it for a C-channel model, the first C of a learned-variance
        model's 2 x C (the rest is the variance's v, Nichol & Dhariwal 2021, Eq. 15)."""
        channels = sample.shape[1]
        if model_output.shape[1] == channels:
            return model_output
        if model_output.shape[1] != 2 * channels:
            raise ValueError(
                f"The UNet outputs {model_output.shape[1]} channels for a {channels}-channel sample: expected {channels} "
                f"(a fixed variance) or {2 * channels} (mean part, then a learned variance)."
            )
        return model_output[:, :channels]

    def _scheduler_input(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """What `scheduler.step` is given: the whole output when the scheduler reads a learned variance from it
        (`DDPMScheduler` with variance_type "learned_range"), else only the mean channels (DDIM, DPM-Solver++, or a
        DDPM scheduler set to a fixed variance)."""
        reads_variance = isinstance(self.scheduler, _VARIANCE_READING_SCHEDULERS) and self.scheduler.config.get("variance_type") in _LEARNED_VARIANCES
        if reads_variance and model_output.shape[1] == 2 * sample.shape[1]:
            return model_output
        return self._mean_channels(model_output, sample)

    def predict_x0(self, model_output: torch.Tensor, timestep, sample: torch.Tensor) -> torch.Tensor:
        """Predicted clean image from the model output at `timestep` for the noisy `sample`.

        Uses the scheduler's `alphas_cumprod` (written abar below) and `config.prediction_type`:
        `epsilon`: x0 = (x_t - sqrt(1 - abar_t) * eps) / sqrt(abar_t); `v_prediction`:
        x0 = sqrt(abar_t) * x_t - sqrt(1 - abar_t) * v; `sample`: x0 = model output. No clipping is applied.
        A learned-variance model's 2 x C channels are [mean part, variance]: only the first C are used.
        """
        model_output = self._mean_channels(model_output, sample)
        prediction_type = getattr(self.scheduler.config, "prediction_type", "epsilon")
        if prediction_type == "sample":
            return model_output
        alphas_cumprod = getattr(self.scheduler, "alphas_cumprod", None)
        if alphas_cumprod is None:
            raise ValueError(f"Cannot compute the predicted x_0 for {self.scheduler.__class__.__name__}: it has no `alphas_cumprod`.")
        index = int(round(float(timestep)))
        abar = alphas_cumprod[index].to(device=sample.device, dtype=torch.float32)
        x_t = sample.float()
        out = model_output.float()
        if prediction_type == "epsilon":
            x0 = (x_t - (1 - abar).sqrt() * out) / abar.sqrt()
        elif prediction_type == "v_prediction":
            x0 = abar.sqrt() * x_t - (1 - abar).sqrt() * out
        else:
            raise ValueError(f"Unsupported prediction_type {prediction_type!r} (epsilon, v_prediction or sample).")
        return x0.to(sample.dtype)

    # ------------------------------------------------------------------ sampling

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int = 1000,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[["DDPMTrajectoryPipeline", int, Any, dict], dict | None] | None = None,
        eta: float = 0.0,
        return_trajectory: bool = False,
    ) -> DDPMTrajectoryPipelineOutput | tuple:
        r"""Generate images by running the reverse process from Gaussian noise.

        Args:
            batch_size (`int`, defaults to 1):
                Number of images to generate.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
                Makes sampling deterministic: it draws the initial noise (unless `latents` is given) and the noise that
                stochastic schedulers (DDPM, DDIM with `eta > 0`) add at each step. A list must have `batch_size`
                generators, one per image.
            num_inference_steps (`int`, defaults to 1000):
                Number of denoising steps. 1000 is full ancestral DDPM sampling; DDIM (about 50-100 steps) and
                DPM-Solver++ (about 20 steps) need far fewer.
            latents (`torch.Tensor`, *optional*):
                Initial noise x_T of shape `(batch_size, unet.config.in_channels, height, width)`. If given, it is
                used instead of drawing noise from `generator` (it is multiplied by `scheduler.init_noise_sigma`, which
                is 1 for DDPM, DDIM and DPM-Solver++). A wrong shape raises `ValueError`.
            output_type (`str`, defaults to `"pil"`):
                `"pil"` (list of `PIL.Image.Image`), `"np"` (float `np.ndarray`, NHWC, in [0, 1]) or `"pt"` (float
                `torch.Tensor`, NCHW, in [0, 1]).
            return_dict (`bool`, defaults to `True`):
                Return a [`DDPMTrajectoryPipelineOutput`]; otherwise a tuple `(images,)`, or
                `(images, trajectory_x_t, trajectory_pred_x0)` when `return_trajectory=True`.
            callback_on_step_end (`Callable`, *optional*):
                Called after every scheduler step as
                `callback_on_step_end(pipeline, step_index, timestep, {"x_t": x_t, "pred_x0": pred_x0})`, where `x_t`
                is the sample after the step (the input of the next step; after the last step, the final sample) and
                `pred_x0` is the model's prediction of the clean image at this step. Both are on the pipeline's device
                in the model's value range (about [-1, 1]). The callback may return a dict; if it holds `"x_t"`, that
                tensor replaces the sample for the remaining steps. Returning `None` is fine. To keep a trajectory with
                little memory, append `.cpu()` copies every k-th step yourself.
            eta (`float`, defaults to 0.0):
                DDIM's noise level (0 is deterministic DDIM, 1 is DDPM-like). Passed only to schedulers whose `step`
                takes `eta`; for others a non-zero value is ignored with a warning.
            return_trajectory (`bool`, defaults to `False`):
                Also collect `trajectory_x_t` and `trajectory_pred_x0` (see [`DDPMTrajectoryPipelineOutput`]): one CPU
                copy of each per step, so 2 * steps * batch * C * H * W floats of memory.

        Returns:
            [`DDPMTrajectoryPipelineOutput`] or `tuple`.
        """
        if output_type not in _OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {_OUTPUT_TYPES}, got {output_type!r}.")
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"Got a list of {len(generator)} generators but batch_size={batch_size}.")

        device = self._execution_device
        dtype = self.unet.dtype
        shape = self._sample_shape(batch_size)

        # 1. initial noise x_T
        if latents is None:
            if device.type == "mps":
                # randn is not reproducible on mps: draw on the CPU and move
                sample = randn_tensor(shape, generator=generator, dtype=dtype).to(device)
            else:
                sample = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        else:
            if tuple(latents.shape) != shape:
                raise ValueError(
                    f"`latents` has shape {tuple(latents.shape)} but the expected shape is {shape} "
                    "(batch_size, unet.config.in_channels, height, width); set batch_size to match your latents."
                )
            sample = latents.to(device=device, dtype=dtype)
        sample = sample * self.scheduler.init_noise_sigma

        # 2. timesteps and per-step arguments
        self.scheduler.set_timesteps(num_inference_steps)
        if hasattr(self.scheduler, "set_begin_index"):
            # the chain starts at the first timestep; looking it up would pick the second of two equal ones
            self.scheduler.set_begin_index(0)
        step_kwargs = self._step_kwargs(generator, eta)
        trajectory_x_t: list[torch.Tensor] = []
        trajectory_pred_x0: list[torch.Tensor] = []

        # 3. reverse process
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            model_input = self.scheduler.scale_model_input(sample, t)
            model_output = self.unet(model_input, t).sample

            step_output = self.scheduler.step(self._scheduler_input(model_output, sample), t, sample, **step_kwargs)
            pred_x0 = getattr(step_output, "pred_original_sample", None)
            if pred_x0 is None:
                pred_x0 = self.predict_x0(model_output, t, sample)
            sample = step_output.prev_sample

            if callback_on_step_end is not None:
                returned = callback_on_step_end(self, i, t, {"x_t": sample, "pred_x0": pred_x0})
                if isinstance(returned, dict) and returned.get("x_t") is not None:
                    sample = returned["x_t"]

            if return_trajectory:
                trajectory_x_t.append(sample.detach().to("cpu", copy=True))
                trajectory_pred_x0.append(pred_x0.detach().to("cpu", copy=True))

        # 4. [-1, 1] -> [0, 1] and conversion
        image = (sample / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            image = image.cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                image = self.numpy_to_pil(image)

        self.maybe_free_model_hooks()

        if not return_trajectory:
            trajectory_x_t = trajectory_pred_x0 = None
        if not return_dict:
            return (image,) if not return_trajectory else (image, trajectory_x_t, trajectory_pred_x0)
        return DDPMTrajectoryPipelineOutput(images=image, trajectory_x_t=trajectory_x_t, trajectory_pred_x0=trajectory_pred_x0)

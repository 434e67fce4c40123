# Copyright 2026 The ddpm-hf authors. Licensed under the Apache License, Version 2.0.
"""A class-conditional DDPM sampling pipeline with classifier-free guidance.

This file is self-contained on purpose: it only imports torch, numpy, PIL and diffusers, so it can be uploaded to the
Hugging Face Hub next to a model and loaded as a custom pipeline, for example::

    from diffusers import DiffusionPipeline

    # the file is at the root of the model repo as `ddpm_class_conditional.py`
    pipe = DiffusionPipeline.from_pretrained(
        "user/name", custom_pipeline="ddpm_class_conditional", trust_remote_code=True
    )

    # or from a local copy of this file
    pipe = DiffusionPipeline.from_pretrained(
        "path/to/saved_pipeline", custom_pipeline="path/to/ddpm_class_conditional.py", trust_remote_code=True
    )

    images = pipe(["cat", "dog", 3], guidance_scale=3.0, num_inference_steps=50).images

The model is a [`UNet2DModel`] with `num_class_embeds = K + 1` for K classes: ids `0 .. K-1` are the classes and the
last id, `K = num_class_embeds - 1`, is the "no label" (null) class of classifier-free guidance (Ho & Salimans 2022,
"Classifier-Free Diffusion Guidance"), which the model learned by having labels dropped to it during training.

Class names are optional. They live in the pipeline's own config as `id2label` (`{"0": "airplane", ...}`, the
convention of diffusers' `DiTPipeline`), so `save_pretrained` writes them into `model_index.json` and `from_pretrained`
passes them back to the pipeline; a folder saved by another pipeline class (e.g. diffusers' `DDPMPipeline`) can carry
them as a top-level `"id2label"` entry of its `model_index.json`. (Not a list: diffusers reads every list there as a
pipeline component when it downloads a repo from the Hub.) `pipe.class_names` lists them by id.

Guidance: with the conditional output `e_c = model(x_t, c)` and the unconditional one `e_u = model(x_t, null)`, the
guided output is `e_u + guidance_scale * (e_c - e_u)` (diffusers' convention). The paper writes it as
`(1 + w) * e_c - w * e_u`, so `w = guidance_scale - 1`: `guidance_scale=1` (w = 0, the default) is plain conditional
sampling, `guidance_scale=0` (w = -1) is unconditional sampling, and larger values trade diversity for fidelity to the
class. The combination weights sum to 1, so it is the same guidance whether the model predicts eps, v or x_0.

Learned variances (Nichol & Dhariwal 2021, "Improved Denoising Diffusion Probabilistic Models", Sec. 3.1): a UNet with
2 x C output channels gives the mean part (eps, x_0 or v) and then the variance's interpolation coefficient v (Eq. 15).
Guidance is applied to the mean part only; the variance channels are those of the conditional pass. `DDPMScheduler`
reads both when its `variance_type` is "learned_range" (or "learned"); every other scheduler (DDIM, DPM-Solver++, ...)
samples from the mean alone and is given only the first C channels.
"""

import inspect
import numbers
from collections.abc import Callable, Sequence
from typing import Any, Union

import numpy as np
import torch
from diffusers import DDPMParallelScheduler, DDPMScheduler, DiffusionPipeline, ImagePipelineOutput, UNet2DModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import logging
from diffusers.utils.torch_utils import randn_tensor

logger = logging.get_logger(__name__)

_OUTPUT_TYPES = ("pil", "np", "pt")

# The schedulers whose `step` splits a 2 x C-channel model output into mean part and variance itself, when their config
# says variance_type "learned" or "learned_range". Every other scheduler is given the first C channels (this includes
# DPMSolverMultistepScheduler: with variance_type "learned_range" it would keep `model_output[:, :3]`, which is right
# only for 3-channel images, and given C channels that cut is a no-op).
_VARIANCE_READING_SCHEDULERS = (DDPMScheduler, DDPMParallelScheduler)
_LEARNED_VARIANCES = ("learned", "learned_range")


class DDPMClassConditionalPipeline(DiffusionPipeline):
    r"""Class-conditional image generation with a DDPM and classifier-free guidance.

    Parameters:
        unet ([`UNet2DModel`]):
            The denoising model, trained on images scaled to [-1, 1], with `num_class_embeds = K + 1` (and the default
            `class_embed_type=None`): class ids `0 .. K-1`, and `K` as the null label used for guidance. With a
            learned variance it outputs 2 x C channels (mean part, then variance).
        scheduler ([`SchedulerMixin`]):
            Any scheduler whose `step` returns `prev_sample`, e.g. [`DDPMScheduler`] (ancestral sampling),
            [`DDIMScheduler`], [`DPMSolverMultistepScheduler`], [`UniPCMultistepScheduler`],
            [`DEISMultistepScheduler`], or [`EulerDiscreteScheduler`] / [`HeunDiscreteScheduler`] with `use_karras_sigmas=True`. To switch, build the new one from the current config:
            `pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)`.
        id2label (`dict[int | str, str]`, *optional*):
            The name of each class id, `{0: "airplane", 1: "automobile", ...}`: exactly the ids `0 .. K-1`, distinct
            names (diffusers' `DiTPipeline` convention). Stored in the pipeline config (and so in `model_index.json`,
            keys as strings); lets `__call__` take names as well as ids. See also [`set_class_names`].
    """

    model_cpu_offload_seq = "unet"

    # `Union[int, str]`, not `int | str`, inside the dict: diffusers' loader checks each init argument against this
    # annotation and unpacks only typing.Union there, so `dict[int | str, str]` made every load warn "Expected types".
    def __init__(self, unet: UNet2DModel, scheduler: SchedulerMixin, id2label: dict[Union[int, str], str] | None = None):  # noqa: UP007
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        self.register_to_config(id2label=self._checked_id2label(id2label, self._num_classes()))

    # ------------------------------------------------------------------ classes

    def _num_classes(self) -> int:
        """K, the number of real classes (the UNet's class embeddings minus the null one); `ValueError` if the UNet is
        not class-conditional in the way this pipeline needs."""
        config = self.unet.config
        num_class_embeds = config.get("num_class_embeds")
        if config.get("class_embed_type") is not None:
            raise ValueError(
                f"The UNet has class_embed_type={config.get('class_embed_type')!r}; this pipeline needs a class-id embedding table: "
                "build the UNet2DModel with class_embed_type=None and num_class_embeds = number of classes + 1."
            )
        if not isinstance(num_class_embeds, int) or num_class_embeds < 2:
            raise ValueError(
                f"The UNet is not class-conditional (num_class_embeds={num_class_embeds!r}): this pipeline needs a UNet2DModel "
                "built with num_class_embeds = number of classes + 1 (the last id is the null label for classifier-free "
                "guidance). For an unconditional model use diffusers' DDPMPipeline or pipelines/ddpm_trajectory.py."
            )
        return num_class_embeds - 1

    @classmethod
    def _checked_id2label(cls, id2label, num_classes: int) -> dict[str, str] | None:
        """`id2label` as stored: string keys "0" .. "K-1", checked like class names."""
        if id2label is None or len(id2label) == 0:
            return None
        if not isinstance(id2label, dict):
            raise ValueError(f"id2label must be a dict of class id -> name, got {type(id2label).__name__}; for a list of names use `set_class_names`.")
        try:
            ids = sorted(int(key) for key in id2label)
        except (TypeError, ValueError):
            raise ValueError(f"id2label keys must be class ids (ints), got {sorted(map(str, id2label))[:5]}.") from None
        if ids != list(range(num_classes)):
            raise ValueError(f"id2label must name exactly the class ids 0..{num_classes - 1} of this UNet (num_class_embeds={num_classes + 1}); got ids {ids}.")
        names = cls._checked_class_names([id2label[key] for key in sorted(id2label, key=int)], num_classes)
        return {str(i): name for i, name in enumerate(names)}

    @staticmethod
    def _checked_class_names(class_names, num_classes: int) -> list[str] | None:
        if class_names is None or len(class_names) == 0:
            return None
        if isinstance(class_names, str):
            raise ValueError(f"class_names must be a list of strings, got the string {class_names!r}.")
        names = list(class_names)
        bad = [n for n in names if not isinstance(n, str)]
        if bad:
            raise ValueError(f"class_names must be strings; got {bad[:5]!r}.")
        if len(names) != num_classes:
            raise ValueError(
                f"Got {len(names)} class_names for a UNet with {num_classes} classes (num_class_embeds={num_classes + 1}, "
                "the last id being the null label): give exactly one name per class id 0..num_class_embeds-2."
            )
        if len(set(names)) != len(names):
            duplicates = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"class_names must be distinct; repeated: {duplicates}.")
        return names

    @property
    def num_classes(self) -> int:
        """K, the number of classes the model can generate (ids `0 .. K-1`)."""
        return self._num_classes()

    @property
    def null_class_id(self) -> int:
        """The id of the "no label" class used for classifier-free guidance: `unet.config.num_class_embeds - 1`."""
        return self._num_classes()

    @property
    def class_names(self) -> list[str] | None:
        """The class names from the pipeline config's `id2label` (`class_names[i]` names class id `i`), or `None`."""
        id2label = self.config.get("id2label")
        return [id2label[key] for key in sorted(id2label, key=int)] if id2label else None

    def set_class_names(self, class_names: Sequence[str] | None) -> None:
        """Set (or with `None`, remove) the class names, `class_names[i]` for class id `i`, after checking them against
        the UNet; `save_pretrained` then writes them into `model_index.json` as `id2label`."""
        names = self._checked_class_names(class_names, self._num_classes())
        self.register_to_config(id2label={str(i): name for i, name in enumerate(names)} if names else None)

    def class_ids(self, class_labels) -> list[int]:
        """Class ids for `class_labels`: a class id (`int`), a class name (`str`), or a list / tuple / 1-D tensor or
        array of them. Raises `ValueError` for an unknown name or an id outside `0 .. num_classes - 1` (the null id is
        not a class: use `guidance_scale=0` for unconditional samples)."""
        num_classes = self._num_classes()
        if isinstance(class_labels, (str, numbers.Integral)):
            class_labels = [class_labels]
        elif isinstance(class_labels, (torch.Tensor, np.ndarray)):
            if class_labels.ndim != 1:
                raise ValueError(f"class_labels as a tensor or array must be 1-D, got shape {tuple(class_labels.shape)}.")
            class_labels = class_labels.tolist()
        labels = list(class_labels)
        if not labels:
            raise ValueError("class_labels is empty: give at least one class id or name.")

        names = self.class_names
        lookup = {name: i for i, name in enumerate(names or [])}
        ids = []
        for label in labels:
            if isinstance(label, str):
                if names is None:
                    raise ValueError(
                        f"Got the class name {label!r} but this pipeline has no class names: pass class ids 0..{num_classes - 1}, "
                        "or set the names with `pipe.set_class_names([...])`."
                    )
                if label not in lookup:
                    raise ValueError(f"Unknown class name {label!r}: the known class names are {names} (or pass ids 0..{num_classes - 1}).")
                ids.append(lookup[label])
            elif isinstance(label, numbers.Integral) and not isinstance(label, bool):
                label = int(label)
                if not 0 <= label < num_classes:
                    known = f" (names: {names})" if names else ""
                    raise ValueError(
                        f"Class id {label} is out of range: this model has {num_classes} classes, ids 0..{num_classes - 1}{known}. "
                        f"Id {num_classes} is the null label used for guidance; for unconditional samples use guidance_scale=0."
                    )
                ids.append(label)
            else:
                raise ValueError(f"Each class label must be an int (class id) or a str (class name), got {label!r} ({type(label).__name__}).")
        return ids

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

    def _check_output_channels(self, model_output: torch.Tensor, channels: int) -> None:
        if model_output.shape[1] not in (channels, 2 * channels):
            raise ValueError(
                f"The UNet outputs {model_output.shape[1]} channels for a {channels}-channel sample: expected {channels} "
                f"(a fixed variance) or {2 * channels} (mean part, then a learned variance)."
            )

    def guided_model_output(self, sample: torch.Tensor, timestep, class_ids: torch.Tensor, guidance_scale: float) -> torch.Tensor:
        """The model output used for one step, with classifier-free guidance.

        `guidance_scale == 1`: one conditional pass, `unet(sample, t, class_ids)`. Otherwise one UNet forward on a batch
        of 2B (the sample twice; the class ids, then B null ids) and `uncond + guidance_scale * (cond - uncond)` on the
        mean part (the first C channels). For a learned-variance UNet (2 x C channels) the conditional pass's variance
        channels are appended unchanged, so the result always has the UNet's channel count.
        """
        channels = sample.shape[1]
        if guidance_scale == 1.0:
            model_output = self.unet(sample, timestep, class_labels=class_ids).sample
            self._check_output_channels(model_output, channels)
            return model_output

        null_ids = torch.full_like(class_ids, self._num_classes())
        both = self.unet(torch.cat([sample, sample]), timestep, class_labels=torch.cat([class_ids, null_ids])).sample
        self._check_output_channels(both, channels)
        cond, uncond = both.chunk(2)
        mean = uncond[:, :channels] + guidance_scale * (cond[:, :channels] - uncond[:, :channels])
        if cond.shape[1] == channels:
            return mean
        return torch.cat([mean, cond[:, channels:]], dim=1)

    def _scheduler_input(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """What `scheduler.step` is given: the whole output when the scheduler reads a learned variance from it
        (`DDPMScheduler` with variance_type "learned_range"), else only the mean channels (DDIM, DPM-Solver++, or a
        DDPM scheduler set to a fixed variance)."""
        channels = sample.shape[1]
        reads_variance = isinstance(self.scheduler, _VARIANCE_READING_SCHEDULERS) and self.scheduler.config.get("variance_type") in _LEARNED_VARIANCES
        if model_output.shape[1] == channels:
            if reads_variance:
                raise ValueError(
                    f"The scheduler's variance_type is {self.scheduler.config.variance_type!r} but the UNet outputs {channels} channels "
                    f"(no variance part): use a fixed variance, e.g. "
                    f"`pipe.scheduler = {self.scheduler.__class__.__name__}.from_config(pipe.scheduler.config, variance_type='fixed_small')`."
                )
            return model_output
        return model_output if reads_variance else model_output[:, :channels]

    def predict_x0(self, model_output: torch.Tensor, timestep, sample: torch.Tensor) -> torch.Tensor:
        """Predicted clean image from the (guided) model output at `timestep` for the noisy `sample`, as the network
        saw it.

        Uses the scheduler's `alphas_cumprod` (written abar below) and `config.prediction_type`:
        `epsilon`: x0 = (x_t - sqrt(1 - abar_t) * eps) / sqrt(abar_t) (Ho et al. 2020, Eq. 15); `v_prediction`:
        x0 = sqrt(abar_t) * x_t - sqrt(1 - abar_t) * v; `sample`: x0 = model output. No clipping is applied.
        A learned-variance model's 2 x C channels are [mean part, variance]: only the first C are used.
        """
        self._check_output_channels(model_output, sample.shape[1])
        model_output = model_output[:, : sample.shape[1]]
        prediction_type = getattr(self.scheduler.config, "prediction_type", "epsilon")
        if prediction_type == "sample":
            return model_output
        alphas_cumprod = getattr(self.scheduler, "alphas_cumprod", None)
        if alphas_cumprod is None:
            raise ValueError(f"Cannot compute the predicted x_0 for {self.scheduler.__class__.__name__}: it has no `alphas_cumprod`.")
        abar = alphas_cumprod[int(round(float(timestep)))].to(device=sample.device, dtype=torch.float32)
        x_t, out = sample.float(), model_output.float()
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
        class_labels: int | str | Sequence[int | str] | torch.Tensor,
        guidance_scale: float = 1.0,
        num_inference_steps: int = 1000,
        generator: torch.Generator | list[torch.Generator] | None = None,
        eta: float = 0.0,
        output_type: str = "pil",
        return_dict: bool = True,
        num_images_per_label: int = 1,
        latents: torch.Tensor | None = None,
        callback_on_step_end: Callable[["DDPMClassConditionalPipeline", int, Any, dict], dict | None] | None = None,
    ) -> ImagePipelineOutput | tuple:
        r"""Generate images of the given classes by running the reverse process from Gaussian noise.

        Args:
            class_labels (`list[int | str]`, or one `int` / `str`, or a 1-D integer tensor):
                The class of each image: class ids (`0 .. K-1`, K = `unet.config.num_class_embeds - 1`) and/or class
                names from `class_names` (see [`class_ids`]); names and ids can be mixed. An unknown name or an id out of
                range raises `ValueError`.
            guidance_scale (`float`, defaults to 1.0):
                Classifier-free guidance scale s (diffusers' convention): the model output is
                `uncond + s * (cond - uncond)`. In the notation of Ho & Salimans (2022), `(1 + w) * cond - w * uncond`,
                it is `w = s - 1`. `1.0` is plain conditional sampling (one UNet pass of batch B per step); any other
                value runs one UNet pass of batch 2B per step (conditional and null labels together). `0.0` gives
                unconditional samples.
            num_inference_steps (`int`, defaults to 1000):
                Number of denoising steps. 1000 is full ancestral DDPM sampling; DDIM (about 50-100 steps) and
                DPM-Solver++ (about 20 steps) need far fewer.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
                Makes sampling deterministic: it draws the initial noise (unless `latents` is given) and the noise that
                stochastic schedulers (DDPM, DDIM with `eta > 0`) add at each step. A list must have one generator per
                image (`len(class_labels) * num_images_per_label`); image `i`'s noise then comes from generator `i`
                alone, so an image does not depend on the rest of the batch.
            eta (`float`, defaults to 0.0):
                DDIM's noise level (0 is deterministic DDIM, 1 is DDPM-like). Passed only to schedulers whose `step`
                takes `eta`; for others a non-zero value is ignored with a warning.
            output_type (`str`, defaults to `"pil"`):
                `"pil"` (list of `PIL.Image.Image`), `"np"` (float `np.ndarray`, NHWC, in [0, 1]) or `"pt"` (float
                `torch.Tensor`, NCHW, in [0, 1]).
            return_dict (`bool`, defaults to `True`):
                Return an [`ImagePipelineOutput`]; otherwise a tuple `(images,)`.
            num_images_per_label (`int`, defaults to 1):
                Images per entry of `class_labels`. The batch is ordered label by label: the images of
                `class_labels[0]` first, then those of `class_labels[1]`, and so on.
            latents (`torch.Tensor`, *optional*):
                Initial noise x_T of shape `(batch, unet.config.in_channels, height, width)`, used instead of drawing it
                from `generator` (it is multiplied by `scheduler.init_noise_sigma`, which is 1 for DDPM, DDIM and
                DPM-Solver++). A wrong shape raises `ValueError`.
            callback_on_step_end (`Callable`, *optional*):
                Called after every scheduler step as
                `callback_on_step_end(pipeline, step_index, timestep, {"x_t": x_t, "pred_x0": pred_x0})` (as in
                `pipelines/ddpm_trajectory.py`), where `x_t` is the sample after the step (the input of the next step;
                after the last step, the final sample) and `pred_x0` is the prediction of the clean image at this step,
                from the guided model output: the scheduler's own where its `step` returns one (DDPM, DDIM, Euler,
                Heun), else [`predict_x0`]'s. Both are on the pipeline's device; `pred_x0` is in the model's value range
                (about [-1, 1]), and so is `x_t` for every scheduler but those on Karras sigmas (Euler, Heun), which
                keep it scaled by `sqrt(1 + sigma^2)`: `pipeline.scheduler.scale_model_input(x_t, timestep)` undoes
                that. The callback may return a dict; if it holds `"x_t"`, that tensor replaces the sample for the
                remaining steps. Returning `None` is fine.

        Returns:
            [`ImagePipelineOutput`] or `tuple`.
        """
        if output_type not in _OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {_OUTPUT_TYPES}, got {output_type!r}.")
        if not isinstance(num_images_per_label, numbers.Integral) or num_images_per_label < 1:
            raise ValueError(f"num_images_per_label must be a positive int, got {num_images_per_label!r}.")
        ids = [i for i in self.class_ids(class_labels) for _ in range(num_images_per_label)]
        batch_size = len(ids)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(
                f"Got a list of {len(generator)} generators for {batch_size} images "
                f"({batch_size // num_images_per_label} labels x num_images_per_label={num_images_per_label}): give one per image."
            )

        device = self._execution_device
        dtype = self.unet.dtype
        shape = self._sample_shape(batch_size)
        class_ids = torch.tensor(ids, device=device, dtype=torch.long)
        guidance_scale = float(guidance_scale)

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
                    "(len(class_labels) * num_images_per_label, unet.config.in_channels, height, width)."
                )
            sample = latents.to(device=device, dtype=dtype)
        sample = sample * self.scheduler.init_noise_sigma

        # 2. timesteps and per-step arguments
        self.scheduler.set_timesteps(num_inference_steps)
        if hasattr(self.scheduler, "set_begin_index"):
            # the chain starts at the first timestep; looking it up would pick the second of two equal ones
            self.scheduler.set_begin_index(0)
        step_kwargs = self._step_kwargs(generator, eta)

        # 3. reverse process
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            model_input = self.scheduler.scale_model_input(sample, t)
            model_output = self.guided_model_output(model_input, t, class_ids, guidance_scale)
            step_output = self.scheduler.step(self._scheduler_input(model_output, sample), t, sample, **step_kwargs)
            sample = step_output.prev_sample
            if callback_on_step_end is not None:
                pred_x0 = getattr(step_output, "pred_original_sample", None)
                if pred_x0 is None:
                    pred_x0 = self.predict_x0(model_output, t, model_input)
                returned = callback_on_step_end(self, i, t, {"x_t": sample, "pred_x0": pred_x0})
                if isinstance(returned, dict) and returned.get("x_t") is not None:
                    sample = returned["x_t"]

        # 4. [-1, 1] -> [0, 1] and conversion
        image = (sample / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            image = image.cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                image = self.numpy_to_pil(image)

        self.maybe_free_model_hooks()

        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)

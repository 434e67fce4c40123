"""The UNet architectures and the noise scheduler a run trains with.

Models and schedulers stay separate, as in diffusers: the UNet only maps (x_t, t) to a prediction;
the `DDPMScheduler` holds beta_t, alpha_t = 1 - beta_t and abar_t = prod_{s<=t} alpha_s.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # diffusers is imported where a model is built: the model card counts parameters without it
    from diffusers import DDPMScheduler, UNet2DModel

from .errors import UserError

# The reverse-process variances whose network outputs 2 x C channels: the mean parameterisation, then the variance
# (Nichol & Dhariwal 2021, Sec. 3.1), the layout diffusers' DDPMScheduler splits.
LEARNED_VARIANCES = ("learned_range", "learned")


def output_channels(in_channels: int, variance_type: str) -> int:
    """The UNet's out_channels for a variance type: C for fixed variances, 2 C (mean part, then v) for learned ones."""
    return 2 * in_channels if variance_type in LEARNED_VARIANCES else in_channels


# Ho et al. (2020), Appendix B: four resolutions 32..4, two residual blocks each, self-attention at
# 16x16, 128 base channels with multipliers (1, 2, 2, 2), GroupNorm, dropout 0.1 on CIFAR-10. In diffusers
# terms this is the layout of google/ddpm-cifar10-32: 35,746,307 parameters.
DDPM_CIFAR10_UNET: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    layers_per_block=2,
    block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    downsample_padding=0,
    flip_sin_to_cos=False,
    freq_shift=1,
    norm_num_groups=32,
    norm_eps=1e-6,
    act_fn="silu",
    attention_head_dim=None,
    dropout=0.1,
)

# The same shape of network, shrunk for CPU minutes: three resolutions, one block each,
# attention at half resolution. 927,139 parameters at 32x32.
TINY_UNET: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    layers_per_block=1,
    block_out_channels=(32, 48, 64),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=16,
    attention_head_dim=None,
    dropout=0.0,
)

# Nichol & Dhariwal (2021), improved-diffusion's CIFAR-10 model (--num_channels 128 --num_res_blocks 3 --learn_sigma True
# --dropout 0.3, their defaults --attention_resolutions 16,8 --num_heads 4 --use_scale_shift_norm True, channel_mult
# (1, 2, 2, 2) at 32x32): three residual blocks per level, self-attention with 4 heads (64 channels each) at 16x16 and 8x8
# and in the middle, FiLM-like scale-and-shift time conditioning, 6 output channels (eps, then the variance's v; Eq. 15).
# What differs from their UNet (initialisation but for v, the time embedding's scale): README.md. 52,545,926 parameters at 32x32.
IDDPM_CIFAR10_UNET: dict[str, Any] = dict(
    in_channels=3,
    out_channels=6,
    layers_per_block=3,
    block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    resnet_time_scale_shift="scale_shift",
    flip_sin_to_cos=True,
    freq_shift=0,
    norm_num_groups=32,
    norm_eps=1e-5,
    act_fn="silu",
    attention_head_dim=64,
    dropout=0.3,
)

UNET_ARCHITECTURES: dict[str, dict[str, Any]] = {"ddpm-cifar10": DDPM_CIFAR10_UNET, "iddpm-cifar10": IDDPM_CIFAR10_UNET, "tiny": TINY_UNET}


def unet_arguments(
    model: str,
    resolution: int,
    model_config: str | None = None,
    dropout: float | None = None,
    variance_type: str | None = None,
    num_class_embeds: int | None = None,
) -> dict[str, Any]:
    """The `UNet2DModel(**arguments)` of an architecture name or a JSON file, checked against `resolution`.

    With `variance_type` given, the output channels follow it: a named architecture gets C of them for a fixed
    variance and 2 C for a learned one (the mean part, then v: Nichol & Dhariwal 2021, Sec. 3.1); a JSON file must
    already say so. None keeps the architecture's own. `num_class_embeds` (K + 1 for K classes and the null label)
    adds diffusers' class embedding, added to the timestep embedding, for class-conditional training."""
    if model_config is not None:
        if not os.path.isfile(model_config):
            raise UserError(f"--model_config {model_config}: no such file. Give a JSON file of UNet2DModel arguments.")
        try:
            with open(model_config) as f:
                arguments = json.load(f)
        except json.JSONDecodeError as e:
            raise UserError(f"--model_config {model_config} is not valid JSON: {e}.") from None
        arguments = {k: v for k, v in arguments.items() if not k.startswith("_")}
    elif model in UNET_ARCHITECTURES:
        arguments = dict(UNET_ARCHITECTURES[model])
    else:
        raise UserError(f"--model {model}: unknown architecture. Choose one of: {', '.join(UNET_ARCHITECTURES)}, or pass --model_config FILE.")
    if variance_type is not None:
        in_channels = arguments.get("in_channels", 3)
        expected = output_channels(in_channels, variance_type)
        if model_config is None:
            arguments["out_channels"] = expected
        elif arguments.get("out_channels", 3) != expected:
            raise UserError(
                f"--model_config {model_config} has out_channels {arguments.get('out_channels', 3)}, but --variance_type {variance_type} needs {expected} "
                f"({in_channels} for a fixed variance, {2 * in_channels} for learned_range: mean, then v). Fix out_channels or --variance_type."
            )
    if num_class_embeds is not None:
        if arguments.get("num_class_embeds") not in (None, num_class_embeds) or arguments.get("class_embed_type") is not None:
            raise UserError(
                f"--model_config {model_config} sets its own class embedding (num_class_embeds {arguments.get('num_class_embeds')}, "
                f"class_embed_type {arguments.get('class_embed_type')}); --class_conditional needs num_class_embeds {num_class_embeds} "
                "(the dataset's classes + 1) and no class_embed_type. Remove them from the file."
            )
        arguments["num_class_embeds"] = num_class_embeds
    arguments["sample_size"] = resolution
    if dropout is not None:
        arguments["dropout"] = dropout
    check_resolution(resolution, len(arguments.get("block_out_channels", (224, 448, 672, 896))))
    return arguments


def check_resolution(resolution: int, num_levels: int) -> None:
    """A UNet with L levels halves the image L - 1 times, so the side must divide by 2^(L-1)."""
    factor = 2 ** (num_levels - 1)
    if resolution % factor != 0:
        below, above = resolution // factor * factor, (resolution // factor + 1) * factor
        suggestion = f"{below} or {above}" if below > 0 else f"{above}"
        raise UserError(f"--resolution {resolution} does not divide by {factor} (the UNet has {num_levels} levels). Use {suggestion}.")


def build_unet(
    model: str,
    resolution: int,
    model_config: str | None = None,
    dropout: float | None = None,
    variance_type: str | None = None,
    num_class_embeds: int | None = None,
) -> UNet2DModel:
    """A new UNet (`unet_arguments`). For a learned variance its v channels start at 0 (`zero_variance_output`)."""
    from diffusers import UNet2DModel

    unet = UNet2DModel(**unet_arguments(model, resolution, model_config, dropout, variance_type, num_class_embeds))
    if variance_type in LEARNED_VARIANCES:
        zero_variance_output(unet)
    return unet


@torch.no_grad()
def zero_variance_output(unet: UNet2DModel) -> None:
    """Zero the output convolution's filters of the v channels (the last half), so that v = 0 everywhere at the start:
    Sigma_theta starts at the geometric mean of beta_t and beta-tilde_t (Nichol & Dhariwal 2021, Eq. 15), the same for
    every pixel, as with improved-diffusion's zero-initialised output layer. diffusers' default initialisation would
    give each pixel its own random v, a noise that L_vlb must first unlearn."""
    half = unet.conv_out.out_channels // 2
    unet.conv_out.weight[half:] = 0
    unet.conv_out.bias[half:] = 0


def build_scheduler(config) -> DDPMScheduler:
    """The DDPM noise schedule and reverse-step rule of a `TrainingConfig`."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=config.num_train_timesteps,
        beta_schedule=config.beta_schedule,
        beta_start=config.beta_start,
        beta_end=config.beta_end,
        variance_type=config.variance_type,
        clip_sample=config.clip_sample,
        prediction_type=config.prediction_type,
        timestep_spacing=config.timestep_spacing,
    )


def count_parameters(unet: torch.nn.Module | str | os.PathLike) -> int:
    """The parameters of a UNet: of a module, or of a saved one (the `unet/` folder of a pipeline, sharded or not)
    from the headers of its safetensors files, which name every tensor's shape: no weight is read."""
    if isinstance(unet, torch.nn.Module):
        return sum(p.numel() for p in unet.parameters())
    from safetensors import safe_open

    total = 0
    for path in sorted(Path(unet).glob("*.safetensors")):
        with safe_open(path, framework="pt") as weights:
            total += sum(math.prod(weights.get_slice(name).get_shape()) for name in weights.keys())
    return total

"""The forward process and the training objective of DDPM.

Ho, Jain & Abbeel, "Denoising Diffusion Probabilistic Models", NeurIPS 2020 (arXiv:2006.11239).
Symbols follow the paper: beta_t the variance schedule, alpha_t = 1 - beta_t,
abar_t = prod_{s=1..t} alpha_s (`alphas_cumprod` in diffusers), eps ~ N(0, I), x_0 in [-1, 1].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Gather values[t] shaped to broadcast over a batch of images."""
    return values.reshape(-1, *([1] * (like.ndim - 1)))


def q_sample(x_0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Draw x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)   (paper, Eq. 4).

    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps. Uses the CUMULATIVE product abar_t, not a single
    step's beta_t: with beta_t alone almost all of the image would survive to t = T.
    """
    abar_t = _per_sample(alphas_cumprod.to(device=x_0.device, dtype=torch.float32)[t], x_0)
    return (abar_t.sqrt() * x_0.float() + (1.0 - abar_t).sqrt() * eps.float()).to(x_0.dtype)


def prediction_target(x_0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, alphas_cumprod: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """What the network is trained to output.

    epsilon:       eps                                        (the paper, Eq. 14: L_simple)
    sample:        x_0
    v_prediction:  v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0   (Salimans & Ho 2022, Sec. 4)
    """
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "sample":
        return x_0
    if prediction_type == "v_prediction":
        abar_t = _per_sample(alphas_cumprod.to(device=x_0.device, dtype=torch.float32)[t], x_0)
        return abar_t.sqrt() * eps - (1.0 - abar_t).sqrt() * x_0
    raise ValueError(f"unknown prediction_type {prediction_type!r}: use epsilon, sample or v_prediction")


class DDPMLoss:
    """L_simple(theta) = E_{t, x_0, eps} || eps - eps_theta(sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, t) ||^2

    Ho et al. 2020, Eq. 14, with t ~ Uniform{1..T} (0-based here: 0..T-1) and the network conditioned
    on t. For the v and x_0 parameterisations only the target changes.
    """

    def __init__(self, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon"):
        self.alphas_cumprod = alphas_cumprod
        self.num_train_timesteps = alphas_cumprod.shape[0]
        self.prediction_type = prediction_type

    def __call__(self, network, x_0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        t = torch.randint(0, self.num_train_timesteps, (x_0.shape[0],), device=x_0.device, generator=generator)
        eps = torch.randn(x_0.shape, device=x_0.device, dtype=x_0.dtype, generator=generator)
        x_t = q_sample(x_0, t, eps, self.alphas_cumprod)
        prediction = network(x_t, t).sample
        target = prediction_target(x_0, t, eps, self.alphas_cumprod, self.prediction_type)
        return F.mse_loss(prediction.float(), target.float())

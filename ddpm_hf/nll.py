"""The variational bound on the negative log-likelihood, in bits per dimension.

Ho, Jain & Abbeel, "Denoising Diffusion Probabilistic Models", NeurIPS 2020 (arXiv:2006.11239),
Eq. 5 and Table 1 (CIFAR-10 test set: <= 3.75 bits/dim for the L_simple model, <= 3.70 for the
model trained on the true bound L):

    L = E_q[ L_T + sum_{t=2..T} L_{t-1} + L_0 ]
    L_T     = D_KL(q(x_T | x_0) || p(x_T)),                      p(x_T) = N(0, I)      (prior term)
    L_{t-1} = D_KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t))                     (Eq. 5)
    L_0     = -log p_theta(x_0 | x_1),   the discretised Gaussian decoder of Eq. 13

in nats, divided by D ln 2 for bits per dimension (D = 3 H W, data scaled to [-1, 1] in 256 bins).
Each term is estimated with one x_t ~ q(x_t | x_0) per image, as in the authors' `calc_bpd_loop`.

Indices here are 0-based like diffusers: paper step t is index t - 1, so index 0 holds the decoder,
indices 1..T-1 the KL terms L_1..L_{T-1}, and the prior uses abar at index T-1.

Learned variances (Nichol & Dhariwal, "Improved Denoising Diffusion Probabilistic Models", ICML 2021,
arXiv:2102.09672, Sec. 3.1): with the scheduler's variance_type "learned_range" the network outputs 2C
channels, [mean parameterisation (eps, x_0 or v as prediction_type says), v], and

    Sigma_theta(x_t, t) = exp(frac log beta_t + (1 - frac) log betatilde_t),   frac = (v + 1) / 2   (Eq. 15)

(the paper's v in [0, 1] is frac here; the network's v is nominally in [-1, 1], as diffusers reads it).
Every term of the bound then uses the model's own log variance, the decoder L_0 included.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .conditioning import class_label_arguments, num_classes
from .errors import UserError
from .models import LEARNED_VARIANCES

FIXED_VARIANCES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log")


# ---------------------------------------------------------------------------------------------
# Gaussian terms (float64)
# ---------------------------------------------------------------------------------------------


def normal_kl(mean1: torch.Tensor, log_var1: torch.Tensor, mean2: torch.Tensor, log_var2: torch.Tensor) -> torch.Tensor:
    """D_KL(N(mean1, e^log_var1) || N(mean2, e^log_var2)) per element, in nats."""
    return 0.5 * (-1.0 + log_var2 - log_var1 + torch.exp(log_var1 - log_var2) + (mean1 - mean2) ** 2 * torch.exp(-log_var2))


def _log_diff_exp(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """log(e^a - e^b) for a > b."""
    return a + torch.log1p(-torch.exp(b - a))


# Ho et al. (2020), Eq. 13: p(x_0 | x_1) = prod_i int_{delta_-(x_0^i)}^{delta_+(x_0^i)} N(x; mu^i, sigma_1^2) dx,
# delta_+(x) = inf if x = 1 else x + 1/255, delta_-(x) = -inf if x = -1 else x - 1/255.
def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """log p(x) per element, for x on the 256-level grid of [-1, 1] and a Gaussian of mean and std e^log_scale.

    Uses log Phi (torch.special.log_ndtr) and the symmetry Phi(u) - Phi(l) = Phi(-l) - Phi(-u), so a bin
    far in either tail keeps its precision instead of rounding to log 0. Computed in `dtype`: float64 for
    the bound; training (losses.HybridLoss) passes float32, which every accelerator has.
    """
    x, mean, log_scale = x.to(dtype), mean.to(dtype), log_scale.to(dtype)
    inv_std = torch.exp(-log_scale)
    upper = (x + 1.0 / 255.0 - mean) * inv_std
    lower = (x - 1.0 / 255.0 - mean) * inv_std
    log_cdf_upper = torch.special.log_ndtr(upper)  # log Phi(u): the bin at x = -1 takes all mass below
    log_sf_lower = torch.special.log_ndtr(-lower)  # log (1 - Phi(l)): the bin at x = 1 takes all mass above
    # Interior bins: log(Phi(u) - Phi(l)), computed in whichever tail the bin lies. Both tails are evaluated
    # everywhere and one is kept; where a tail is not kept it gets the harmless bin [-1, 1] instead, so that
    # under autograd (losses.HybridLoss) its zero gradient stays zero rather than 0 * inf = NaN from log(0).
    # The values kept are unchanged by this.
    is_interior = (x >= -0.999) & (x <= 0.999)
    in_upper_tail = lower > 0
    use_upper_tail, use_lower_tail = is_interior & in_upper_tail, is_interior & ~in_upper_tail
    upper_tail = _log_diff_exp(
        torch.special.log_ndtr(-torch.where(use_upper_tail, lower, -1.0)), torch.special.log_ndtr(-torch.where(use_upper_tail, upper, 1.0))
    )
    lower_tail = _log_diff_exp(
        torch.special.log_ndtr(torch.where(use_lower_tail, upper, 1.0)), torch.special.log_ndtr(torch.where(use_lower_tail, lower, -1.0))
    )
    interior = torch.where(in_upper_tail, upper_tail, lower_tail)
    return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_sf_lower, interior))


def learned_range_log_variance(v: torch.Tensor, log_beta: torch.Tensor, log_beta_tilde: torch.Tensor) -> torch.Tensor:
    """log Sigma_theta = frac log beta_t + (1 - frac) log betatilde_t, frac = (v + 1) / 2   (Nichol & Dhariwal, Eq. 15).

    v is the network's variance output, nominally in [-1, 1] (not clamped, as in diffusers' sampler).
    `log_beta_tilde` must be the clipped table: betatilde_t is 0 at index 0, so index 0 holds betatilde
    at index 1 (as in the paper's code). diffusers' `DDPMScheduler._get_variance` instead clamps
    betatilde_0 to 1e-20 there; its `step` adds no noise at index 0, so sampling never reads that value and
    the two agree wherever the sampler uses Sigma_theta. Only the decoder L_0 reads index 0.
    """
    frac = (v + 1.0) / 2.0
    return frac * log_beta + (1.0 - frac) * log_beta_tilde


# ---------------------------------------------------------------------------------------------
# The schedule and the reverse process
# ---------------------------------------------------------------------------------------------


class DiffusionTerms:
    """beta_t, abar_t and the Gaussians of q and p_theta, in float64, from a diffusers scheduler's config."""

    def __init__(self, scheduler, clip_denoised: bool | None = None):
        config = scheduler.config
        variance_type = config.get("variance_type", "fixed_small")
        if variance_type not in FIXED_VARIANCES + LEARNED_VARIANCES:
            raise UserError(
                f"the bound is implemented for the reverse variances {', '.join(FIXED_VARIANCES + LEARNED_VARIANCES)}; this model has variance_type={variance_type!r}."
            )
        self.variance_type = variance_type
        self.learned_variance = variance_type in LEARNED_VARIANCES
        self.large_variance = variance_type.startswith("fixed_large")
        self.prediction_type = config.get("prediction_type", "epsilon")
        self.clip_denoised = bool(config.get("clip_sample", True)) if clip_denoised is None else clip_denoised
        self.betas = scheduler.betas.double().cpu()
        self.num_timesteps = self.betas.shape[0]
        if self.num_timesteps < 2:
            raise UserError("the bound needs at least 2 diffusion steps (num_train_timesteps >= 2).")
        alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(alphas, 0)  # abar_t
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        # Ho et al. Eq. 7: q(x_{t-1} | x_t, x_0) = N(mutilde_t, betatilde_t I),
        # mutilde_t = sqrt(abar_{t-1}) beta_t / (1 - abar_t) x_0 + sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) x_t,
        # betatilde_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t.
        self.posterior_coef_x0 = self.alphas_cumprod_prev.sqrt() * self.betas / (1.0 - self.alphas_cumprod)
        self.posterior_coef_xt = alphas.sqrt() * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_variance = self.betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # Sec. 3.2: sigma_t^2 = beta_t ("fixed_large") or betatilde_t ("fixed_small"). betatilde at index 0 is 0,
        # so, as in the authors' code, the decoder (index 0) uses betatilde at index 1 for both.
        variance = self.betas.clone() if self.large_variance else self.posterior_variance.clone()
        variance[0] = self.posterior_variance[1]
        self.model_log_variance = variance.log()
        # Nichol & Dhariwal Eq. 15 interpolates between these two: log beta_t and the clipped log betatilde_t.
        self.log_beta = self.betas.log()
        self.log_beta_tilde_clipped = torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]]).log()

    def _at(self, values: torch.Tensor, t: int, like: torch.Tensor) -> torch.Tensor:
        return values[t].to(like.device)

    def q_sample(self, x_0: torch.Tensor, t: int, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps   (Eq. 4), in float64."""
        abar = self._at(self.alphas_cumprod, t, x_0)
        return abar.sqrt() * x_0 + (1.0 - abar).sqrt() * noise

    def posterior_mean(self, x_0: torch.Tensor, x_t: torch.Tensor, t: int) -> torch.Tensor:
        return self._at(self.posterior_coef_x0, t, x_t) * x_0 + self._at(self.posterior_coef_xt, t, x_t) * x_t

    def predict_x0(self, model_output: torch.Tensor, x_t: torch.Tensor, t: int) -> torch.Tensor:
        """x_0 from the network's output: eps (Eq. 15 rearranged), x_0 itself, or v (Salimans & Ho 2022)."""
        abar = self._at(self.alphas_cumprod, t, x_t)
        out = model_output.double()
        if self.prediction_type == "epsilon":
            x_0 = (x_t - (1.0 - abar).sqrt() * out) / abar.sqrt()
        elif self.prediction_type == "sample":
            x_0 = out
        elif self.prediction_type == "v_prediction":
            x_0 = abar.sqrt() * x_t - (1.0 - abar).sqrt() * out
        else:
            raise UserError(f"unknown prediction_type {self.prediction_type!r} in the scheduler config.")
        return x_0.clamp(-1.0, 1.0) if self.clip_denoised else x_0

    def prior_kl(self, x_0: torch.Tensor) -> torch.Tensor:
        """L_T per image, in nats: D_KL(N(sqrt(abar_T) x_0, (1 - abar_T) I) || N(0, I))."""
        abar = self._at(self.alphas_cumprod, self.num_timesteps - 1, x_0)
        kl = normal_kl(abar.sqrt() * x_0, (1.0 - abar).log().expand_as(x_0), torch.zeros_like(x_0), torch.zeros_like(x_0))
        return kl.flatten(1).sum(1)

    def split_output(self, model_output: torch.Tensor, channels: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The network's output as (mean parameterisation, v): v is the last C of 2C channels for learned variances, else None."""
        if not self.learned_variance:
            return model_output[:, :channels], None
        if model_output.shape[1] != 2 * channels:
            raise UserError(
                f"variance_type={self.variance_type!r} needs a network with 2 x {channels} output channels (mean part, then v); this one gives {model_output.shape[1]}."
            )
        return model_output[:, :channels], model_output[:, channels:]

    def model_log_variance_of(self, v: torch.Tensor | None, t: int, like: torch.Tensor) -> torch.Tensor:
        """log sigma_t^2 of p_theta(x_{t-1} | x_t) per element: the fixed table, or the network's own (learned)."""
        if v is None:
            return self._at(self.model_log_variance, t, like).expand_as(like)
        v = v.double()
        if self.variance_type == "learned":
            # diffusers' DDPMScheduler.step reads a "learned" output as sigma_t^2 itself (it takes its square root),
            # not as log sigma_t^2 as the paper's code does; we follow the sampler. A negative output gives NaN there too.
            return v.log()
        return learned_range_log_variance(v, self._at(self.log_beta, t, like), self._at(self.log_beta_tilde_clipped, t, like))

    def vb_term(self, model_output: torch.Tensor, x_0: torch.Tensor, x_t: torch.Tensor, t: int) -> torch.Tensor:
        """L_t per image, in nats, from the network's output at x_t: the decoder NLL at t = 0, else the KL
        between q(x_{t-1} | x_t, x_0) and p_theta(x_{t-1} | x_t). model_output has C channels (fixed variances) or 2C (learned)."""
        mean_output, v = self.split_output(model_output, x_0.shape[1])
        x_0_hat = self.predict_x0(mean_output, x_t, t)
        model_mean = self.posterior_mean(x_0_hat, x_t, t)
        model_log_variance = self.model_log_variance_of(v, t, x_0)
        if t == 0:
            nll = -discretized_gaussian_log_likelihood(x_0, model_mean, 0.5 * model_log_variance)
            return nll.flatten(1).sum(1)
        true_mean = self.posterior_mean(x_0, x_t, t)
        true_log_variance = self._at(self.posterior_variance, t, x_0).log().expand_as(x_0)
        return normal_kl(true_mean, true_log_variance, model_mean, model_log_variance).flatten(1).sum(1)

    @torch.no_grad()
    def term(self, unet, x_0: torch.Tensor, t: int, noise: torch.Tensor) -> torch.Tensor:
        """L_t per image, in nats, for x_t = q_sample(x_0, t, noise): see `vb_term`."""
        x_t = self.q_sample(x_0, t, noise)
        parameter = next(unet.parameters())
        timesteps = torch.full((x_0.shape[0],), t, device=parameter.device, dtype=torch.long)
        classes = num_classes(unet)  # a class-conditional UNet is scored as the unconditional model of its null label
        labels = torch.full_like(timesteps, classes) if classes is not None else None
        model_output = unet(x_t.to(parameter.device, parameter.dtype), timesteps, **class_label_arguments(labels)).sample.to(x_0.device)
        return self.vb_term(model_output, x_0, x_t, t)


# ---------------------------------------------------------------------------------------------
# The bound over a set of images
# ---------------------------------------------------------------------------------------------


def _item_noise(generators: list[torch.Generator], like: torch.Tensor) -> torch.Tensor:
    """One standard normal draw per image, each from that image's own generator (float64, on like's device)."""
    return torch.cat([torch.randn((1, *like.shape[1:]), generator=g, dtype=torch.float64) for g in generators]).to(like.device)


def kl_timesteps(num_timesteps: int, stride: int, generator: torch.Generator | None = None, offset: int | None = None) -> list[tuple[int, float]]:
    """The KL-term indices to evaluate, each with its weight in the sum over t.

    stride 1: every index 1..T-1 with weight 1, the exact bound. stride k > 1: indices 1..k exactly
    (for a trained model the bound is concentrated at small t), then every k-th index of k+1..T-1
    from a random offset, with weight k: each of those is in the sum with probability 1/k, so the
    estimate stays unbiased while costing about k + T/k network evaluations instead of T.
    The offset is drawn from `generator` unless given.
    """
    if stride == 1:
        return [(t, 1.0) for t in range(1, num_timesteps)]
    exact = [(t, 1.0) for t in range(1, min(stride + 1, num_timesteps))]
    if offset is None:
        offset = int(torch.randint(0, stride, (1,), generator=generator))
    return exact + [(t, float(stride)) for t in range(stride + 1 + offset, num_timesteps, stride)]


def bits_per_dim(
    unet,
    scheduler,
    images: torch.Tensor,
    batch_size: int = 64,
    timestep_stride: int = 1,
    seed: int = 0,
    clip_denoised: bool | None = None,
    progress: bool = True,
    state=None,
) -> dict:
    """The variational bound (Ho et al. 2020, Eq. 5) of uint8 images N x 3 x H x W, in bits/dim.

    Returns the mean and standard error over images, and the mean of each part: `prior` (L_T),
    `kl` (sum of L_1..L_{T-1}) and `decoder` (L_0). `timestep_stride` k > 1 estimates the KL sum from
    about k + T/k of its terms (unbiased, see `kl_timesteps`; one offset per run, drawn from `seed`); the default
    1 is the exact sum over all T terms. With the scheduler's variance_type "learned_range" (or "learned") the UNet
    gives 2C channels and each term uses its own Sigma_theta (Nichol & Dhariwal 2021, Eq. 15). A class-conditional
    UNet is scored with its null label: the bound on log p(x) of the unconditional model that label dropout trained.

    Image i's noise comes from its own generator seeded with (seed, i), so its terms do not depend on the batch
    size or on the process that scores it. With an Accelerate `state` of several processes each scores its share of
    the images (ddpm_hf/distributed.py) and the per-image values are gathered: the same result on every process.
    """
    from tqdm.auto import tqdm

    from .distributed import gather_objects, item_generators, items_in_round, rounds

    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"expected uint8 images N x C x H x W, got {images.dtype} {tuple(images.shape)}")
    if timestep_stride < 1:
        raise UserError(f"--timestep_stride {timestep_stride} must be at least 1 (1: the exact bound).")
    if batch_size < 1:
        raise UserError(f"--batch_size {batch_size} must be positive.")
    terms = DiffusionTerms(scheduler, clip_denoised)
    if timestep_stride >= terms.num_timesteps:
        raise UserError(f"--timestep_stride {timestep_stride} must be below T = {terms.num_timesteps}.")
    process_index, num_processes = (state.process_index, state.num_processes) if state is not None else (0, 1)
    device = next(unet.parameters()).device
    was_training = unet.training
    unet.eval()
    timesteps = list(reversed(kl_timesteps(terms.num_timesteps, timestep_stride, torch.Generator().manual_seed(seed))))
    dims = images[0].numel()
    to_bits = 1.0 / (dims * math.log(2.0))
    mine: list[tuple[int, dict[str, np.ndarray]]] = []  # (first image index, per-image parts) of this process's chunks
    num_images = images.shape[0]
    bar = tqdm(total=num_images, desc="Variational bound", unit="img", disable=not progress or process_index != 0)
    try:
        for round_index, indices in enumerate(rounds(num_images, batch_size, process_index, num_processes)):
            if indices is not None:
                x_0 = images[indices.start : indices.stop].to(device).double() / 127.5 - 1.0
                generators = item_generators(seed, indices)
                kl = torch.zeros(x_0.shape[0], dtype=torch.float64, device=device)
                for t, weight in timesteps:
                    kl += weight * terms.term(unet, x_0, t, _item_noise(generators, x_0))
                decoder = terms.term(unet, x_0, 0, _item_noise(generators, x_0))
                prior = terms.prior_kl(x_0)
                parts = {"prior": prior, "kl": kl, "decoder": decoder, "total": prior + kl + decoder}
                mine.append((indices.start, {name: (value * to_bits).cpu().numpy() for name, value in parts.items()}))
            bar.update(items_in_round(num_images, batch_size, num_processes, round_index))
    finally:
        bar.close()
        unet.train(was_training)
    everyone = sorted((entry for part in gather_objects(mine, state) for entry in part), key=lambda entry: entry[0]) if state is not None else mine
    per_image = {name: [parts[name] for _, parts in everyone] for name in ("prior", "kl", "decoder", "total")}
    values = {name: np.concatenate(v) for name, v in per_image.items()}
    total = values["total"]
    return {
        "bits_per_dim": float(total.mean()),
        "bits_per_dim_stderr": float(total.std(ddof=1) / math.sqrt(len(total))) if len(total) > 1 else float("nan"),
        "prior_bits_per_dim": float(values["prior"].mean()),
        "kl_bits_per_dim": float(values["kl"].mean()),
        "decoder_bits_per_dim": float(values["decoder"].mean()),
        "num_images": int(len(total)),
        "num_timesteps": terms.num_timesteps,
        "timestep_stride": timestep_stride,
        "exact_sum_over_t": timestep_stride == 1,
        "clip_denoised": terms.clip_denoised,
        "variance_type": terms.variance_type,
        **({"class_label": "null (unconditional)"} if num_classes(unet) is not None else {}),
        "per_image_bits_per_dim": total.tolist(),
    }

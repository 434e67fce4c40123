"""The forward process and the training objective of DDPM.

Ho, Jain & Abbeel, "Denoising Diffusion Probabilistic Models", NeurIPS 2020 (arXiv:2006.11239).
Symbols follow the paper: beta_t the variance schedule, alpha_t = 1 - beta_t,
abar_t = prod_{s=1..t} alpha_s (`alphas_cumprod` in diffusers), eps ~ N(0, I), x_0 in [-1, 1].

`HybridLoss` adds the learned variances of Nichol & Dhariwal, "Improved Denoising Diffusion Probabilistic
Models", ICML 2021 (arXiv:2102.09672): L_hybrid = L_simple + lambda L_vlb (their Eq. 16).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .nll import discretized_gaussian_log_likelihood, learned_range_log_variance, normal_kl


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


def predict_x0(model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """x_0 from the network's mean output, unclipped: the inverse of `prediction_target`.

    epsilon:       x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)     (Ho et al., Eq. 4 solved for x_0)
    sample:        x_0
    v_prediction:  x_0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v           (Salimans & Ho 2022, Sec. 4)
    """
    abar_t = _per_sample(alphas_cumprod.to(device=x_t.device, dtype=torch.float32)[t], x_t)
    if prediction_type == "epsilon":
        return (x_t - (1.0 - abar_t).sqrt() * model_output) / abar_t.sqrt()
    if prediction_type == "sample":
        return model_output
    if prediction_type == "v_prediction":
        return abar_t.sqrt() * x_t - (1.0 - abar_t).sqrt() * model_output
    raise ValueError(f"unknown prediction_type {prediction_type!r}: use epsilon, sample or v_prediction")


def _draw_t_and_eps(x_0: torch.Tensor, num_train_timesteps: int, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """t ~ Uniform{0..T-1} per image (0-based), then eps ~ N(0, I): the draws of every loss here, in this order."""
    t = torch.randint(0, num_train_timesteps, (x_0.shape[0],), device=x_0.device, generator=generator)
    eps = torch.randn(x_0.shape, device=x_0.device, dtype=x_0.dtype, generator=generator)
    return t, eps


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
        t, eps = _draw_t_and_eps(x_0, self.num_train_timesteps, generator)
        x_t = q_sample(x_0, t, eps, self.alphas_cumprod)
        prediction = network(x_t, t).sample
        target = prediction_target(x_0, t, eps, self.alphas_cumprod, self.prediction_type)
        return F.mse_loss(prediction.float(), target.float())


class ReverseProcessTerms:
    """The Gaussians of q(x_{t-1} | x_t, x_0) and of the learned p_theta(x_{t-1} | x_t), batched over t, for training.

    Tables are computed once in float64 on the CPU from abar_t alone, as diffusers' `DDPMScheduler.step` does
    (beta_t = 1 - abar_t / abar_{t-1}, abar_{-1} = 1), then kept in float32 on abar's device.
    Ho et al. 2020, Eq. 6-7 (Nichol & Dhariwal 2021, Eq. 10-12):
        mutilde_t(x_t, x_0) = sqrt(abar_{t-1}) beta_t / (1 - abar_t) x_0 + sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) x_t
        betatilde_t         = (1 - abar_{t-1}) / (1 - abar_t) beta_t
    betatilde_t is 0 at index 0; `log_beta_tilde` is "clipped": its index 0 holds betatilde at index 1.
    """

    def __init__(self, alphas_cumprod: torch.Tensor):
        if alphas_cumprod.shape[0] < 2:
            raise ValueError("learned variances need at least 2 diffusion steps (num_train_timesteps >= 2).")
        abar = alphas_cumprod.detach().to("cpu", torch.float64)
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        alpha = abar / abar_prev
        beta = 1.0 - alpha
        beta_tilde = (1.0 - abar_prev) / (1.0 - abar) * beta
        tables = {
            "coef_x0": abar_prev.sqrt() * beta / (1.0 - abar),
            "coef_xt": alpha.sqrt() * (1.0 - abar_prev) / (1.0 - abar),
            "log_beta": beta.log(),
            "log_beta_tilde": torch.cat([beta_tilde[1:2], beta_tilde[1:]]).log(),
        }
        for name, values in tables.items():
            setattr(self, name, values.to(alphas_cumprod.device, torch.float32))

    def posterior_mean(self, x_0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """mutilde_t(x_t, x_0)   (Ho et al., Eq. 7)."""
        return _per_sample(self.coef_x0[t], x_t) * x_0 + _per_sample(self.coef_xt[t], x_t) * x_t

    def posterior_log_variance(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """log betatilde_t (clipped at index 0)   (Ho et al., Eq. 7)."""
        return _per_sample(self.log_beta_tilde[t], like).expand_as(like)

    def model_log_variance(self, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """log Sigma_theta(x_t, t) from the network's v channels   (Nichol & Dhariwal, Eq. 15)."""
        return learned_range_log_variance(v, _per_sample(self.log_beta[t], v), _per_sample(self.log_beta_tilde[t], v))


class HybridLoss:
    """L_hybrid = L_simple + lambda L_vlb   (Nichol & Dhariwal 2021, Eq. 16; lambda = vlb_weight, 0.001 in the paper)

    The network outputs 2C channels: [:C] the mean parameterisation (eps, x_0 or v as `prediction_type` says,
    the layout of diffusers' DDPMScheduler with variance_type="learned_range"), [C:] the variance
    interpolation v, Sigma_theta = exp(frac log beta_t + (1 - frac) log betatilde_t), frac = (v + 1) / 2 (Eq. 15).

    L_simple: the MSE of the mean channels against `prediction_target` (Ho et al., Eq. 14), trains the mean.
    L_vlb = L_0 + L_1 + ... + L_{T-1} (Eq. 4 without the prior L_T, which has no parameters), estimated from the
    same uniform t as T * L_t. Units: each L_t is a mean over dimensions in bits, as in the paper's code
    (mean_flat(kl) / log 2), so L_vlb is in bits/dim, comparable to `nll.bits_per_dim`; lambda L_vlb = (T / 1000) L_t.
    With t the 0-based index of x_t (diffusers' timestep; the paper's step t + 1):
        t >= 1:  L_t = D_KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t))   (Eq. 6)
        t  = 0:  L_0 = -log p_theta(x_0 | x_1), the discretised Gaussian decoder   (Eq. 5; Ho et al., Eq. 13)
    In L_vlb the mean channels are detached (stop-gradient, Sec. 3.1): only Sigma_theta learns from it.
    x_0 must lie on the 256-level grid of [-1, 1] (uint8 / 127.5 - 1) for L_0 to be a likelihood.

    After each call, `last_terms` holds {"l_simple", "l_vlb"}: detached device scalars, for logging without a sync.
    """

    def __init__(self, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon", vlb_weight: float = 0.001):
        if prediction_type not in ("epsilon", "sample", "v_prediction"):
            raise ValueError(f"unknown prediction_type {prediction_type!r}: use epsilon, sample or v_prediction")
        if not vlb_weight >= 0:
            raise ValueError(f"vlb_weight {vlb_weight} must be >= 0")
        self.alphas_cumprod = alphas_cumprod
        self.num_train_timesteps = alphas_cumprod.shape[0]
        self.prediction_type = prediction_type
        self.vlb_weight = vlb_weight
        self.reverse = ReverseProcessTerms(alphas_cumprod)
        self.last_terms: dict[str, torch.Tensor] = {}

    def __call__(self, network, x_0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        t, eps = _draw_t_and_eps(x_0, self.num_train_timesteps, generator)
        return self.loss_at(network, x_0, t, eps)

    def loss_at(self, network, x_0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """L_hybrid for given timesteps t (0-based, one per image) and noise eps."""
        x_t = q_sample(x_0, t, eps, self.alphas_cumprod)
        mean_output, v = self.split_output(network(x_t, t).sample.float(), x_0.shape[1])
        target = prediction_target(x_0, t, eps, self.alphas_cumprod, self.prediction_type)
        l_simple = F.mse_loss(mean_output, target.float())
        l_t = self.vlb_terms(mean_output.detach(), v, x_0.float(), x_t.float(), t)  # stop-gradient on the mean (Sec. 3.1)
        l_vlb = self.num_train_timesteps * l_t.mean()
        self.last_terms = {"l_simple": l_simple.detach(), "l_vlb": l_vlb.detach()}
        return l_simple + self.vlb_weight * l_vlb

    @staticmethod
    def split_output(output: torch.Tensor, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean part, v) of a 2C-channel network output."""
        if output.shape[1] != 2 * channels:
            raise ValueError(
                f"learned variances need a network with 2 x {channels} output channels (mean part, then v; "
                f"UNet out_channels={2 * channels}, scheduler variance_type='learned_range'); this one gives {output.shape[1]}."
            )
        return output[:, :channels], output[:, channels:]

    def vlb_terms(self, mean_output: torch.Tensor, v: torch.Tensor, x_0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """L_t per image, in bits per dimension: the decoder NLL where t = 0, else the KL (see the class).

        Both are computed for every image and one is kept with torch.where (no host sync). The branch not kept
        gets benign inputs, so that its zero gradient cannot turn into 0 * inf = NaN.
        """
        x_0_hat = predict_x0(mean_output, x_t, t, self.alphas_cumprod, self.prediction_type)
        model_mean = self.reverse.posterior_mean(x_0_hat, x_t, t)
        model_log_variance = self.reverse.model_log_variance(v, t)
        is_decoder = _per_sample(t == 0, x_0)
        kl = normal_kl(self.reverse.posterior_mean(x_0, x_t, t), self.reverse.posterior_log_variance(t, x_0), model_mean, model_log_variance)
        decoder_nll = self._decoder_nll(x_0, model_mean, model_log_variance, is_decoder)
        l_t = torch.where(is_decoder, decoder_nll, kl)
        return l_t.flatten(1).mean(1) / math.log(2.0)

    def _decoder_nll(self, x_0: torch.Tensor, model_mean: torch.Tensor, model_log_variance: torch.Tensor, is_decoder: torch.Tensor) -> torch.Tensor:
        """-log p_theta(x_0 | x_1) per element, in nats (Ho et al., Eq. 13), where is_decoder; elsewhere a finite placeholder."""
        mean = torch.where(is_decoder, model_mean, x_0)
        log_scale = torch.where(is_decoder, 0.5 * model_log_variance, 0.5 * self.reverse.log_beta_tilde[0])
        return -discretized_gaussian_log_likelihood(x_0, mean, log_scale, dtype=torch.float32)


class VLBLoss:
    """L_vlb alone, with importance-sampled timesteps   (Nichol & Dhariwal 2021, Sec. 3.3, Eq. 17)

        L_vlb = E_{t ~ p_t}[L_t / p_t],   p_t proportional to sqrt(E[L_t^2]),   sum_t p_t = 1

    E[L_t^2] is estimated from the last `history` (10) values of each term; t is uniform until every t has
    that many (the paper's warm-up). Unlike HybridLoss nothing is detached: L_vlb trains the mean and Sigma_theta.
    Same network layout and units as HybridLoss (L_t in bits/dim; the value estimates sum_t L_t).
    Ours, not the paper's: p_t is mixed with the uniform distribution by `uniform_weight` (0.001), so that no
    p_t is 0; each process keeps its own history (no all-gather across GPUs). All on the device, no host sync.
    """

    def __init__(self, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon", history: int = 10, uniform_weight: float = 0.001):
        self.terms = HybridLoss(alphas_cumprod, prediction_type)  # its vlb_terms and split_output
        self.alphas_cumprod = alphas_cumprod
        self.num_train_timesteps = alphas_cumprod.shape[0]
        self.uniform_weight = uniform_weight
        # Row T is a sink for values a batch would overwrite within one step (more than `history` draws of one t).
        self.loss_history = torch.zeros(self.num_train_timesteps + 1, history, device=alphas_cumprod.device)
        self.loss_counts = torch.zeros(self.num_train_timesteps, dtype=torch.long, device=alphas_cumprod.device)
        self.last_terms: dict[str, torch.Tensor] = {}

    def probabilities(self) -> torch.Tensor:
        """p_t: uniform until every term has a full history, then proportional to sqrt(E[L_t^2])."""
        T = self.num_train_timesteps
        uniform = torch.full((T,), 1.0 / T, device=self.loss_counts.device)
        root_mean_square = self.loss_history[:T].square().mean(1).sqrt()
        p = (1.0 - self.uniform_weight) * root_mean_square / root_mean_square.sum().clamp_min(1e-30) + self.uniform_weight * uniform
        return torch.where((self.loss_counts >= self.loss_history.shape[1]).all(), p, uniform)

    def __call__(self, network, x_0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        p = self.probabilities()
        t = torch.multinomial(p, x_0.shape[0], replacement=True, generator=generator)
        eps = torch.randn(x_0.shape, device=x_0.device, dtype=x_0.dtype, generator=generator)
        x_t = q_sample(x_0, t, eps, self.alphas_cumprod)
        mean_output, v = self.terms.split_output(network(x_t, t).sample.float(), x_0.shape[1])
        l_t = self.terms.vlb_terms(mean_output, v, x_0.float(), x_t.float(), t)
        self.update_history(t, l_t.detach())
        l_vlb = (l_t / p[t]).mean()  # an unbiased estimate of sum_t L_t
        self.last_terms = {"l_vlb": l_vlb.detach()}
        return l_vlb

    def update_history(self, t: torch.Tensor, l_t: torch.Tensor) -> None:
        """Append each L_t to its term's ring buffer; of several draws of one t in a batch, the last `history` are kept."""
        history = self.loss_history.shape[1]
        order = torch.sort(t, stable=True).indices
        t_sorted = t[order]
        rank = torch.arange(t.shape[0], device=t.device) - torch.searchsorted(t_sorted, t_sorted)  # k-th draw of its t
        draws = torch.zeros_like(self.loss_counts).index_add_(0, t, torch.ones_like(t))  # bincount would sync on CUDA
        keep = rank >= draws[t_sorted] - history
        slot = (self.loss_counts[t_sorted] + rank) % history
        row = torch.where(keep, t_sorted, self.num_train_timesteps)
        self.loss_history.index_put_((row, torch.where(keep, slot, 0)), l_t[order].to(self.loss_history.dtype))
        self.loss_counts += draws

"""Four common mistakes of beginners' DDPM code, each measured next to the right version.

The numbers quoted in docs/tutorial.md ("Four common mistakes") come from these functions, and
tests/test_tutorial.py runs them. Symbols follow Ho, Jain & Abbeel (2020): beta_t the variance
schedule, alpha_t = 1 - beta_t, abar_t = prod_{s<=t} alpha_s, eps ~ N(0, I), x_0 in [-1, 1].
Timesteps are 0-based as in diffusers: t = 0 .. T-1, and the sampler adds no noise at its last step.

    1. Noising with one step's beta_t:   x_t = sqrt(1 - beta_t) x_0 + sqrt(beta_t) eps
       instead of Eq. 4:                 x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps
    2. A network that ignores t:         eps_theta(x_t)   instead of eps_theta(x_t, t)
    3. The reverse step's denominator:   (x_t - beta_t / sqrt(1 - alpha_t) eps) / sqrt(alpha_t)
       instead of Eq. 11 / Algorithm 2:  (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t)
    4. Training on images in [0, 1]      instead of [-1, 1] (Sec. 3.3)

Mistakes 2 and 3 are measured on a toy dataset where the best possible network is known in closed
form: one "pixel" x_0 ~ N(0, s^2), with s the standard deviation of real pixels in [-1, 1]. Then
x_t ~ N(0, v_t) with v_t = abar_t s^2 + 1 - abar_t, and the best t-aware noise predictor is linear:
E[eps | x_t, t] = sqrt(1 - abar_t) / v_t * x_t. No training noise blurs the comparison.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


def schedule_arrays(scheduler) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(beta_t, alpha_t, abar_t) of a diffusers scheduler, as float64 arrays indexed by t = 0 .. T-1."""
    betas = scheduler.betas.double().numpy()
    return betas, 1.0 - betas, scheduler.alphas_cumprod.double().numpy()


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of all the values of `a` with those of `b` (same shape)."""
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


# ---------------------------------------------------------------------------------------------
# 1. Noising with one step's beta_t instead of abar_t
# ---------------------------------------------------------------------------------------------


def noise_with_single_beta(x_0: torch.Tensor, t: int, eps: torch.Tensor, betas) -> torch.Tensor:
    """THE MISTAKE: x_t = sqrt(1 - beta_t) x_0 + sqrt(beta_t) eps. That is one step of the chain,
    q(x_t | x_{t-1}) (Eq. 2), applied to x_0 as if t - 1 = 0. The right rule is `losses.q_sample`."""
    beta_t = float(betas[t])
    return math.sqrt(1.0 - beta_t) * x_0 + math.sqrt(beta_t) * eps


@dataclass
class NoisingComparison:
    t: int
    signal_right: float  # sqrt(abar_t): the fraction of x_0's amplitude left in x_t under Eq. 4
    signal_wrong: float  # sqrt(1 - beta_t): the same under the single-beta rule
    correlation_right: float  # corr(x_t, x_0) over all pixels of all images, Eq. 4
    correlation_wrong: float  # the same, single-beta rule
    curve_t: np.ndarray  # timesteps of the curves below (for the figure)
    curve_right: np.ndarray  # corr(x_t, x_0) against t, Eq. 4
    curve_wrong: np.ndarray  # corr(x_t, x_0) against t, single-beta rule


def compare_noising_rules(x_0: torch.Tensor, scheduler, t: int = 999, seed: int = 0) -> NoisingComparison:
    """Noise the images `x_0` (in [-1, 1]) to step t under both rules, with the same eps.

    Both rules give x_t = c x_0 + d eps, so corr(x_t, x_0) at every t follows from three moments of the sample,
    Var[x_0], Var[eps] and Cov[x_0, eps]: exactly the correlation of the noised pixels, without noising N images T times."""
    betas, _, abar = schedule_arrays(scheduler)
    if not 0 <= t < len(abar):
        raise ValueError(f"t={t} is outside 0..{len(abar) - 1}")
    generator = torch.Generator().manual_seed(seed)
    x = x_0.double().flatten()
    eps = torch.randn(x.shape, generator=generator, dtype=torch.float64)
    x, eps = x - x.mean(), eps - eps.mean()
    var_x, var_eps, cov = float(x.square().mean()), float(eps.square().mean()), float((x * eps).mean())

    def corr(c, d):
        return (c * var_x + d * cov) / np.sqrt((c**2 * var_x + d**2 * var_eps + 2 * c * d * cov) * var_x)

    curve_t = np.arange(len(abar))
    curve_right = corr(np.sqrt(abar), np.sqrt(1.0 - abar))  # Eq. 4, losses.q_sample
    curve_wrong = corr(np.sqrt(1.0 - betas), np.sqrt(betas))  # noise_with_single_beta
    return NoisingComparison(
        t=t,
        signal_right=math.sqrt(abar[t]),
        signal_wrong=math.sqrt(1.0 - betas[t]),
        correlation_right=float(curve_right[t]),
        correlation_wrong=float(curve_wrong[t]),
        curve_t=curve_t,
        curve_right=curve_right,
        curve_wrong=curve_wrong,
    )


# ---------------------------------------------------------------------------------------------
# The Gaussian toy: x_0 ~ N(0, s^2), where the best network is known
# ---------------------------------------------------------------------------------------------


def marginal_variance(abar: np.ndarray, data_std: float) -> np.ndarray:
    """v_t = Var[x_t] = abar_t s^2 + (1 - abar_t) for x_0 ~ N(0, s^2)."""
    return abar * data_std**2 + (1.0 - abar)


class GaussianToy:
    """The best noise predictors for x_0 ~ N(0, s^2) under a schedule.

    t-aware (the paper's eps_theta(x_t, t)):  E[eps | x_t, t] = sqrt(1 - abar_t) / v_t * x_t.
    t-blind (eps_theta(x_t) ignores t):        E[eps | x_t] = sum_t p(t | x_t) sqrt(1 - abar_t) / v_t * x_t,
    with t ~ Uniform{0..T-1} as in training and p(t | x_t) proportional to N(x_t; 0, v_t). This is the lowest
    loss any t-blind network can reach: the value its training loss plateaus at, at best.
    """

    def __init__(self, scheduler, data_std: float, grid_half_width: float = 6.0, grid_points: int = 6001):
        self.betas, self.alphas, self.abar = schedule_arrays(scheduler)
        self.data_std = float(data_std)
        self.v = marginal_variance(self.abar, self.data_std)
        self.b = np.sqrt(1.0 - self.abar)  # sqrt(1 - abar_t), the noise's share of x_t
        # The t-blind predictor is eps_blind(x) = g(x) * x, g tabulated on a grid (it is smooth and even).
        self.grid = np.linspace(-grid_half_width, grid_half_width, grid_points)
        log_density = -0.5 * self.grid[None, :] ** 2 / self.v[:, None] - 0.5 * np.log(2 * np.pi * self.v[:, None])  # T x G
        posterior_t = np.exp(log_density - log_density.max(axis=0, keepdims=True))
        posterior_t /= posterior_t.sum(axis=0, keepdims=True)  # p(t | x) on the grid
        self._blind_on_grid = (posterior_t * (self.b / self.v)[:, None]).sum(axis=0) * self.grid
        self._density = np.exp(log_density)  # N(x; 0, v_t), T x G

    def eps_t_aware(self, x: np.ndarray, t: int) -> np.ndarray:
        return self.b[t] / self.v[t] * x

    def eps_t_blind(self, x: np.ndarray, t: int | None = None) -> np.ndarray:
        """Ignores t (the argument is there only so both predictors can be called alike)."""
        return np.interp(x, self.grid, self._blind_on_grid)

    def loss_per_t_aware(self) -> np.ndarray:
        """E||eps - E[eps | x_t, t]||^2 = Var[eps | x_t, t] = 1 - (1 - abar_t) / v_t, for each t."""
        return 1.0 - self.b**2 / self.v

    def loss_per_t_blind(self) -> np.ndarray:
        """E||eps - eps_blind(x_t)||^2 for each t, by quadrature:
        1 - 2 E[eps f(x_t)] + E[f(x_t)^2], with E[eps | x_t, t] = sqrt(1 - abar_t) / v_t x_t for the cross term."""
        dx = self.grid[1] - self.grid[0]
        f = self._blind_on_grid
        cross = (self.b / self.v) * (self._density * self.grid * f).sum(axis=1) * dx
        square = (self._density * f**2).sum(axis=1) * dx
        return 1.0 - 2.0 * cross + square


def toy_reverse_chain(
    toy: GaussianToy, predict_eps, num_samples: int = 20_000, seed: int = 0, wrong_denominator: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Run the DDPM sampler (Algorithm 2, sigma_t^2 = beta_t) on the toy from x_{T-1} ~ N(0, 1).

    Returns (final samples, std of x_t entering each step t = T-1 .. 0). With `wrong_denominator`, the step divides by
    sqrt(1 - alpha_t) instead of sqrt(1 - abar_t) (mistake 3)."""
    generator = np.random.default_rng(seed)
    x = generator.standard_normal(num_samples)
    stds = []
    for t in range(len(toy.abar) - 1, -1, -1):
        stds.append(x.std())
        x = reverse_step(x, predict_eps(x, t), t, toy.betas, toy.abar, generator.standard_normal(num_samples), wrong_denominator)
    return x, np.array(stds)


def reverse_step(x_t, eps_hat, t: int, betas, abar, z, wrong_denominator: bool = False):
    """x_{t-1} = 1 / sqrt(alpha_t) (x_t - beta_t / sqrt(1 - abar_t) eps_hat) + sigma_t z, sigma_t^2 = beta_t, no noise at t = 0.

    THE MISTAKE (`wrong_denominator=True`) writes sqrt(1 - alpha_t) = sqrt(beta_t) for sqrt(1 - abar_t): it removes
    sqrt(beta_t) eps_hat per step instead of beta_t / sqrt(1 - abar_t) eps_hat, several times too much noise at large t."""
    beta_t, alpha_t = float(betas[t]), 1.0 - float(betas[t])
    denominator = math.sqrt(1.0 - alpha_t) if wrong_denominator else math.sqrt(1.0 - float(abar[t]))
    mean = (x_t - beta_t / denominator * eps_hat) / math.sqrt(alpha_t)
    return mean + (math.sqrt(beta_t) * z if t > 0 else 0.0)


# ---------------------------------------------------------------------------------------------
# 2. A network that ignores t
# ---------------------------------------------------------------------------------------------


@dataclass
class TimestepBlindness:
    data_std: float
    loss_t_aware: float  # the lowest possible L_simple (averaged over t) of a network that sees t
    loss_t_blind: float  # the same for a network that does not: where its loss plateaus at best
    loss_per_t_aware: np.ndarray
    loss_per_t_blind: np.ndarray
    sample_std_t_aware: float  # std of the sampler's output with the best t-aware network (data: data_std)
    sample_std_t_blind: float  # the same with the best t-blind network


def compare_timestep_conditioning(scheduler, data_std: float, num_samples: int = 20_000, seed: int = 0) -> TimestepBlindness:
    """Best t-aware vs best t-blind noise predictor on the Gaussian toy: their loss, and the spread of their samples."""
    toy = GaussianToy(scheduler, data_std)
    per_t_aware, per_t_blind = toy.loss_per_t_aware(), toy.loss_per_t_blind()
    aware, _ = toy_reverse_chain(toy, toy.eps_t_aware, num_samples, seed)
    blind, _ = toy_reverse_chain(toy, toy.eps_t_blind, num_samples, seed)
    return TimestepBlindness(
        data_std=toy.data_std,
        loss_t_aware=float(per_t_aware.mean()),
        loss_t_blind=float(per_t_blind.mean()),
        loss_per_t_aware=per_t_aware,
        loss_per_t_blind=per_t_blind,
        sample_std_t_aware=float(aware.std()),
        sample_std_t_blind=float(blind.std()),
    )


# ---------------------------------------------------------------------------------------------
# 3. The reverse step's denominator
# ---------------------------------------------------------------------------------------------


@dataclass
class ReverseStepComparison:
    data_std: float
    final_std_right: float  # std of the samples, exact, with sqrt(1 - abar_t)
    final_std_wrong: float  # the same with sqrt(1 - alpha_t)
    std_per_t_right: np.ndarray  # std of x_t entering each step t = T-1 .. 0
    std_per_t_wrong: np.ndarray
    std_per_t_true: np.ndarray  # sqrt(v_t), the std x_t has under the forward process


def compare_reverse_steps(scheduler, data_std: float) -> ReverseStepComparison:
    """Both reverse steps driven by the BEST noise predictor of the Gaussian toy, in closed form.

    With eps_hat = sqrt(1 - abar_t) / v_t x_t every step is linear, x_{t-1} = c_t x_t + sigma_t z with
    c_t = (1 - k_t sqrt(1 - abar_t) / v_t) / sqrt(alpha_t) and k_t = beta_t / denominator, so the variance
    follows Var[x_{t-1}] = c_t^2 Var[x_t] + sigma_t^2 exactly from Var[x_{T-1}] = 1. The network is perfect:
    whatever is off in the samples is the sampler's doing."""
    toy = GaussianToy(scheduler, data_std, grid_points=3)  # no t-blind table needed
    results = {}
    for wrong in (False, True):
        variance, stds = 1.0, []
        for t in range(len(toy.abar) - 1, -1, -1):
            stds.append(math.sqrt(variance))
            denominator = math.sqrt(toy.betas[t]) if wrong else toy.b[t]
            c_t = (1.0 - toy.betas[t] / denominator * toy.b[t] / toy.v[t]) / math.sqrt(toy.alphas[t])
            variance = c_t**2 * variance + (toy.betas[t] if t > 0 else 0.0)
        results[wrong] = (math.sqrt(variance), np.array(stds))
    return ReverseStepComparison(
        data_std=toy.data_std,
        final_std_right=results[False][0],
        final_std_wrong=results[True][0],
        std_per_t_right=results[False][1],
        std_per_t_wrong=results[True][1],
        std_per_t_true=np.sqrt(toy.v[::-1]),
    )


# ---------------------------------------------------------------------------------------------
# 4. Images in [0, 1]
# ---------------------------------------------------------------------------------------------


def signal_to_noise(abar: np.ndarray, data_variance: float) -> np.ndarray:
    """SNR(t) = abar_t Var[x_0] / (1 - abar_t), per pixel: the signal's variance over the noise's in x_t."""
    return abar * data_variance / (1.0 - abar)


@dataclass
class DataRangeComparison:
    variance_right: float  # Var[x_0] per pixel for x_0 in [-1, 1]
    variance_wrong: float  # the same in [0, 1]: 4 times smaller
    noise_wins_right: int  # first t with SNR(t) < 1 (noise stronger than the image), [-1, 1]
    noise_wins_wrong: int  # the same for [0, 1]
    shown_mean_right: float  # mean brightness in [0, 1] of the pictures a perfect model gives, [-1, 1] data
    shown_mean_wrong: float  # the same for a perfect model of [0, 1] data: DDPMPipeline shows x / 2 + 1/2
    shown_min_wrong: float  # the darkest pixel such a model can show (0.5: black comes out grey)
    snr_right: np.ndarray
    snr_wrong: np.ndarray


def compare_data_ranges(images_uint8: torch.Tensor, scheduler) -> DataRangeComparison:
    """[-1, 1] (the paper's x_0) vs [0, 1] (the mistake), for real images `images_uint8` (N x 3 x H x W)."""
    _, _, abar = schedule_arrays(scheduler)
    x_right = images_uint8.double() / 127.5 - 1.0  # data.to_model_range
    x_wrong = images_uint8.double() / 255.0
    snr_right, snr_wrong = signal_to_noise(abar, float(x_right.var())), signal_to_noise(abar, float(x_wrong.var()))
    # diffusers pipelines turn the model's x_0 into a picture with (x_0 / 2 + 0.5).clamp(0, 1).
    return DataRangeComparison(
        variance_right=float(x_right.var()),
        variance_wrong=float(x_wrong.var()),
        noise_wins_right=int(np.argmax(snr_right < 1.0)),
        noise_wins_wrong=int(np.argmax(snr_wrong < 1.0)),
        shown_mean_right=float((x_right / 2 + 0.5).clamp(0, 1).mean()),
        shown_mean_wrong=float((x_wrong / 2 + 0.5).clamp(0, 1).mean()),
        shown_min_wrong=float((x_wrong / 2 + 0.5).clamp(0, 1).min()),
        snr_right=snr_right,
        snr_wrong=snr_wrong,
    )


# ---------------------------------------------------------------------------------------------
# One figure for the four
# ---------------------------------------------------------------------------------------------


def mistakes_figure(noising: NoisingComparison, blindness: TimestepBlindness, reverse: ReverseStepComparison, ranges: DataRangeComparison):
    """A 2 x 2 figure: each mistake (dashed) against the right version (solid), over t."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 7.5), dpi=100, layout="constrained")
    (ax1, ax2), (ax3, ax4) = figure.subplots(2, 2)
    figure.suptitle("Four common DDPM mistakes (dashed) next to the paper's version (solid)")

    ax1.plot(noising.curve_t, noising.curve_right, "C0-", label=r"$\sqrt{\bar\alpha_t}\,x_0 + \sqrt{1-\bar\alpha_t}\,\epsilon$ (Eq. 4)")
    ax1.plot(noising.curve_t, noising.curve_wrong, "C3--", label=r"$\sqrt{1-\beta_t}\,x_0 + \sqrt{\beta_t}\,\epsilon$")
    ax1.set(title="1. Noising: how much of the image is left", xlabel="timestep t", ylabel=r"corr$(x_t, x_0)$", ylim=(-0.05, 1.05))
    ax1.legend(fontsize=8)

    steps = np.arange(len(blindness.loss_per_t_aware))
    ax2.plot(steps, blindness.loss_per_t_aware, "C0-", label=rf"$\epsilon_\theta(x_t, t)$: mean {blindness.loss_t_aware:.3f}")
    ax2.plot(steps, blindness.loss_per_t_blind, "C3--", label=rf"$\epsilon_\theta(x_t)$: mean {blindness.loss_t_blind:.3f}")
    ax2.set(
        title=f"2. t-blind network: best loss (toy, s = {blindness.data_std:.2f})", xlabel="timestep t", ylabel=r"best $E\|\epsilon - \epsilon_\theta\|^2$ at t"
    )
    ax2.legend(fontsize=8)

    reverse_t = np.arange(len(reverse.std_per_t_right))[::-1]
    ax3.plot(reverse_t, reverse.std_per_t_true, color="0.6", lw=4, alpha=0.6, label=r"forward process $\sqrt{v_t}$")
    ax3.plot(reverse_t, reverse.std_per_t_right, "C0-", label=rf"$\beta_t/\sqrt{{1-\bar\alpha_t}}$: final {reverse.final_std_right:.2f}")
    ax3.plot(reverse_t, reverse.std_per_t_wrong, "C3--", label=rf"$\beta_t/\sqrt{{1-\alpha_t}}$: final {reverse.final_std_wrong:.2f}")
    ax3.set(title="3. Reverse step with a perfect network (toy)", xlabel="timestep t (sampling runs right to left)", ylabel=r"std of $x_t$")
    ax3.invert_xaxis()
    ax3.legend(fontsize=8)

    steps = np.arange(len(ranges.snr_right))
    ax4.semilogy(steps, ranges.snr_right, "C0-", label=rf"$x_0 \in [-1, 1]$: noise wins from t = {ranges.noise_wins_right}")
    ax4.semilogy(steps, ranges.snr_wrong, "C3--", label=rf"$x_0 \in [0, 1]$: noise wins from t = {ranges.noise_wins_wrong}")
    ax4.axhline(1.0, color="0.5", lw=0.8)
    ax4.set(title="4. Data range: signal-to-noise per pixel", xlabel="timestep t", ylabel=r"$\bar\alpha_t\,\mathrm{Var}[x_0] / (1-\bar\alpha_t)$")
    ax4.legend(fontsize=8)
    return figure

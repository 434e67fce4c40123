"""Every sampler of ddpm_hf.sampling.make_sampler proven right without training (issue 22).

The data are a known Gaussian, x_0 ~ N(mu, diag(s^2)) in two channels, and the "network" answers exactly:
x_t = a x_0 + b eps (a^2 = abar_t, b^2 = 1 - abar_t) is Gaussian too, so

    E[eps | x_t] = b (x_t - a mu) / (a^2 s^2 + b^2),    E[x_0 | x_t] = mu + a s^2 (x_t - a mu) / (a^2 s^2 + b^2)

(and v = a eps - b x_0), the best any network trained on these data can do. Each pixel of an "image" is one
sample, so a batch of small images is thousands of samples through the real engine (`ReverseProcess`), per-image
noise and all. With it:

* DDPM, the stochastic sampler, with all T steps reproduces the data distribution: mean and variance within four
  standard errors of N samples (N stated in the test).
* Every deterministic sampler solves the probability-flow ODE, whose solution for a Gaussian is closed-form: in
  sigma = sqrt((1 - abar) / abar) and x~ = x / sqrt(abar), x~(sigma) - mu = (x~(sigma_0) - mu) sqrt((s^2 + sigma^2) /
  (s^2 + sigma_0^2)), from the x_t the sampler starts at to the sigma it ends at (0; DEIS ends at sigma(t = 0)).
* Its error falls with the NFE at its order (first for DDIM and Euler, higher for DPM-Solver++, UniPC, DEIS and
  Heun) on the real schedules: linear and cosine, T = 1000 and 4000 (linear at T = 4000 scaled by 1000 / T, as
  Nichol & Dhariwal 2021 do), every timestep spacing.
* The combinations where diffusers misbehaves are shown misbehaving, then refused.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from ddpm_hf.errors import UserError
from ddpm_hf.sampling import SAMPLER_KINDS, SAMPLERS, ReverseProcess, make_sampler

pytestmark = pytest.mark.usefixtures("one_thread")

MU = torch.tensor([0.3, -0.5]).view(1, 2, 1, 1)
S = torch.tensor([0.5, 1.2]).view(1, 2, 1, 1)  # standard deviations of the two channels
DETERMINISTIC = [name for name in SAMPLERS if not SAMPLER_KINDS[name].stochastic]


def abar_at(trained, t: float) -> float:
    """abar of a timestep, a fractional one (Karras sigmas) interpolated in log sigma as diffusers places it."""
    abar = trained.alphas_cumprod.double()
    low = min(math.floor(t), len(abar) - 1)
    if t == low:
        return float(abar[low])
    log_sigma = 0.5 * torch.log((1 - abar) / abar)
    weight = t - low
    return float(torch.sigmoid(-2 * ((1 - weight) * log_sigma[low] + weight * log_sigma[low + 1])))


class ExactGaussianDenoiser(torch.nn.Module):
    """The exact noise (or v, or x_0) prediction for the Gaussian data above, at every t."""

    def __init__(self, trained, size: int):
        super().__init__()
        self.trained = trained
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # the engine reads the device and dtype from a parameter
        self.config = SimpleNamespace(sample_size=size, in_channels=2, num_class_embeds=None)

    def forward(self, x_t, t):
        abar = abar_at(self.trained, float(t))
        a, b = abar**0.5, (1 - abar) ** 0.5
        variance = a * a * S * S + b * b
        eps = b * (x_t - a * MU) / variance
        x_0 = MU + a * S * S * (x_t - a * MU) / variance
        prediction = {"epsilon": eps, "sample": x_0, "v_prediction": a * eps - b * x_0}[self.trained.config.prediction_type]
        return SimpleNamespace(sample=prediction)


def schedule(beta_schedule: str = "linear", T: int = 1000, **options) -> DDPMScheduler:
    """A trained schedule, built with the defaults the way tests build them (so `_use_default_values` is set)."""
    if beta_schedule == "linear" and T != 1000:  # Nichol & Dhariwal's scaling keeps the linear schedule's shape at any T
        options.update(beta_start=1e-4 * 1000 / T, beta_end=0.02 * 1000 / T)
    return DDPMScheduler(num_train_timesteps=T, beta_schedule=beta_schedule, clip_sample=False, **options)


def run(trained, sampler, images: int = 1, size: int = 4, seed: int = 0):
    """(the sampler's output, the exact ODE solution from its start to where it ends), both N x 2 x size x size."""
    process = ReverseProcess(ExactGaussianDenoiser(trained, size), sampler, seed, range(images))
    first = next(iter_steps := iter(process))
    for _ in iter_steps:
        pass
    abar_0 = abar_at(trained, first.t)
    sigma2_0, x_tilde_0 = (1 - abar_0) / abar_0, first.x_t / abar_0**0.5
    sigmas = getattr(sampler.scheduler, "sigmas", None)
    sigma_end = float(sigmas[-1]) if sigmas is not None else 0.0
    exact = MU + (x_tilde_0 - MU) * ((S * S + sigma_end**2) / (S * S + sigma2_0)) ** 0.5
    return process.x_0 * (1 + sigma_end**2) ** 0.5, exact


def error(trained, name: str, steps: int, **options) -> tuple[float, int]:
    sampler = make_sampler(trained, name, steps, **options)
    output, exact = run(trained, sampler)
    return float(((output - exact) ** 2).mean().sqrt()), sampler.nfe


# ---- the stochastic sampler reproduces the data ------------------------------------------------------


@pytest.mark.parametrize("beta_schedule, variance_type", [("linear", "fixed_large"), ("squaredcos_cap_v2", "fixed_small")])
def test_ddpm_with_all_steps_reproduces_the_data_distribution(beta_schedule, variance_type):
    """N = 2 x 48 x 48 = 4,608 samples per channel: the mean within 4 standard errors s / sqrt(N), the variance within 4
    of its own, s^2 sqrt(2 / N), and the two channels uncorrelated within 4 / sqrt(N)."""
    trained = schedule(beta_schedule, variance_type=variance_type)
    output, _ = run(trained, make_sampler(trained, "ddpm"), images=2, size=48)
    samples = output.permute(1, 0, 2, 3).reshape(2, -1).double()
    n = samples.shape[1]
    mean, covariance = samples.mean(dim=1), torch.cov(samples)
    s = S.flatten().double()
    assert ((mean - MU.flatten()).abs() < 4 * s / n**0.5).all(), (mean, n)
    assert ((covariance.diagonal() / s**2 - 1).abs() < 4 * (2 / n) ** 0.5).all(), covariance
    assert abs(float(covariance[0, 1] / covariance.diagonal().prod().sqrt())) < 4 / n**0.5


def test_ddpm_noise_is_each_images_own():
    """The chain's randomness is per image: two runs with different seeds differ; the same seed repeats exactly."""
    trained = schedule(variance_type="fixed_large")
    sampler = make_sampler(trained, "ddpm", 20, timestep_spacing="linspace")
    one, _ = run(trained, sampler, images=2, seed=3)
    again, _ = run(trained, sampler, images=2, seed=3)
    other, _ = run(trained, sampler, images=2, seed=4)
    assert torch.equal(one, again) and not torch.allclose(one, other)


# ---- the deterministic samplers solve the probability-flow ODE -------------------------------------


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_every_deterministic_sampler_lands_on_the_exact_ode_solution(prediction_type):
    """With about 200 network evaluations every deterministic sampler ends within 0.05 (first order) or 0.003 (higher
    order) of the exact solution from its own x_T, whatever the network predicts (RMS over the samples; the data's
    standard deviations are 0.5 and 1.2)."""
    trained = schedule(prediction_type=prediction_type, timestep_spacing="trailing")
    for name in DETERMINISTIC:
        kind = SAMPLER_KINDS[name]
        rms, nfe = error(trained, name, 100 if name == "heun" else 200)
        assert rms < (0.05 if kind.order == 1 else 3e-3), (name, rms, nfe)


REAL_SCHEDULES = [("linear", 1000), ("squaredcos_cap_v2", 1000), ("linear", 4000), ("squaredcos_cap_v2", 4000)]


@pytest.mark.parametrize("beta_schedule, T", REAL_SCHEDULES)
def test_errors_fall_with_nfe_at_each_samplers_order(beta_schedule, T):
    """The slope of log error against log NFE over K = 20, 40, 80 steps, for every timestep spacing the factory
    accepts (Karras sigmas, euler and heun, have their own): 0.7 to 1.3 for the first-order samplers (DDIM, Euler);
    above 1.1 for the others, whose error at 80 network evaluations is also below Euler's (Heun) or a fifth of DDIM's
    (the multistep solvers). Their papers' orders (2 for
    DPM-Solver++(2M), DEIS-2 and Heun, 3 for UniPC-2 with its corrector) are reached only with small steps in
    log-SNR; diffusers' spacings are uniform in t, which leaves large log-SNR steps near t = 0 and a last,
    first-order step to sigma = 0, so at these K the measured slopes of the multistep solvers are 1.1 to 2.3 (Heun:
    2.0 to 2.3; README.md's Sampling section lists them)."""
    trained = schedule(beta_schedule, T)
    slopes, at_80 = {}, {}
    for name in DETERMINISTIC:
        spacings = [None] if SAMPLER_KINDS[name].karras_sigmas else ["leading", "linspace", "trailing"]
        for spacing in spacings:
            try:
                points = [error(trained, name, steps // (2 if name == "heun" else 1), timestep_spacing=spacing) for steps in (20, 40, 80)]
            except UserError:  # refused combinations: tested below
                continue
            errors, nfes = np.log([p[0] for p in points]), np.log([p[1] for p in points])
            slopes[name, spacing] = -float(np.polyfit(nfes, errors, 1)[0])
            at_80[name, spacing] = points[-1][0]
    first_order_at_80 = {"karras": at_80["euler", None], "uniform": min(rms for (name, _), rms in at_80.items() if name == "ddim")}
    for (name, spacing), slope in slopes.items():
        if SAMPLER_KINDS[name].order == 1:
            assert 0.7 < slope < 1.3, (name, spacing, slope)
        else:  # against the first-order sampler on the same placement of steps: Euler for Heun (Karras), else DDIM
            beaten = first_order_at_80["karras"] if name == "heun" else first_order_at_80["uniform"] / 5
            assert slope > 1.1 and at_80[name, spacing] < beaten, (name, spacing, slope, at_80[name, spacing], beaten)
    assert {name for name, _ in slopes} == set(DETERMINISTIC)  # every sampler was measured at least once


def test_higher_order_samplers_beat_first_order_ones_at_equal_nfe():
    trained = schedule()
    ddim, _ = error(trained, "ddim", 20)
    for name in ("dpmsolver", "unipc", "deis"):
        assert error(trained, name, 20)[0] < ddim / 4, name
    assert error(trained, "heun", 20)[0] < error(trained, "euler", 39)[0] / 1.5  # 39 network evaluations each


# ---- misbehaving combinations: shown, then refused -------------------------------------------------


def test_ddim_steps_to_t_minus_T_over_K_whatever_the_spacing_so_linspace_is_refused():
    """diffusers' DDIMScheduler steps from t to t - T // K, while 'linspace' places the next timestep elsewhere: its
    error stops falling with more steps (shown with the scheduler built by hand), so the factory refuses it."""
    trained = schedule()
    floors = []
    for steps in (40, 80, 160):
        scheduler = DDIMScheduler.from_config({**trained.config, "_use_default_values": []}, timestep_spacing="linspace")
        scheduler.set_timesteps(steps)
        from ddpm_hf.sampling import Sampler

        output, exact = run(trained, Sampler(scheduler, "ddim", steps, "linspace"))
        floors.append(float(((output - exact) ** 2).mean().sqrt()))
    assert floors[2] > floors[1] / 1.6 > floors[0] / 4  # first order would halve it each time
    for spacing, steps in (("linspace", 40), ("trailing", 30)):
        with pytest.raises(UserError, match="t - T // K"):
            make_sampler(trained, "ddim", steps, timestep_spacing=spacing)
    assert make_sampler(trained, "ddim", 40, timestep_spacing="trailing").nfe == 40  # K divides T: consistent


def test_repeated_timesteps_are_refused():
    """The multistep solvers' 'leading' spacing strides by T // (K + 1): 0 at K = T, every step at t = 0. Their Karras
    sigmas are rounded to integer timesteps, several equal near T - 1 on the cosine schedule (DPMSolverMultistep then
    runs past its sigmas: IndexError without a begin index)."""
    trained = schedule()
    stock = DPMSolverMultistepScheduler.from_config(trained.config, timestep_spacing="leading")
    stock.set_timesteps(1000)
    assert set(stock.timesteps.tolist()) == {0}
    cosine = DPMSolverMultistepScheduler.from_config(schedule("squaredcos_cap_v2").config, use_karras_sigmas=True)
    cosine.set_timesteps(10)
    assert len(set(cosine.timesteps.tolist())) < 10
    for name in ("dpmsolver", "unipc", "deis"):
        with pytest.raises(UserError, match="only 1 of them differ"):
            make_sampler(trained, name, 1000, timestep_spacing="leading")
        with pytest.raises(UserError, match="rounds its Karras sigmas"):
            make_sampler(schedule("squaredcos_cap_v2"), name, 10, karras_sigmas=True)
        assert make_sampler(trained, name, 10, karras_sigmas=True).karras_sigmas  # on the linear schedule they differ
    assert make_sampler(schedule("squaredcos_cap_v2"), "heun", 10).nfe == 19  # Heun's timesteps are not rounded


def test_a_leading_start_that_is_not_pure_noise_is_refused():
    """'leading' strides by T // K: K = 600 of 1000 starts at t = 599, and 10 steps of the cosine schedule at t = 900,
    where 15% of the image is left. From there the chain cannot reach the data (shown with DDPM's own timesteps
    forced: the variance comes out far from s^2), so the factory refuses it; 'trailing' starts at T - 1."""
    trained = schedule("squaredcos_cap_v2", variance_type="fixed_small")
    with pytest.raises(UserError, match="starts at t = 900 .* 15% of the image's signal"):
        make_sampler(trained, "ddim", 10)
    with pytest.raises(UserError, match="starts at t = 599"):
        make_sampler(schedule(), "ddpm", 600)
    assert make_sampler(trained, "ddim", 10, timestep_spacing="trailing").scheduler.timesteps[0] == 999
    assert make_sampler(trained, "ddim", 50).nfe == 50  # t = 980: 3% left, accepted

    from ddpm_hf.sampling import Sampler

    leading = DDPMScheduler.from_config(trained.config, timestep_spacing="leading")
    leading.set_timesteps(10)
    output, _ = run(trained, Sampler(leading, "ddpm", 10, "leading"), images=1, size=48)
    variance = output.permute(1, 0, 2, 3).reshape(2, -1).var(dim=1)
    assert ((variance / S.flatten() ** 2 - 1).abs() > 0.15).any(), variance  # 4 standard errors are 0.12

"""Learned variances of Improved DDPM (Nichol & Dhariwal 2021, arXiv:2102.09672): ddpm_hf/nll.py and losses.HybridLoss.

The reference below is written from the papers' equations, in float64, independently of nll.py:
    q(x_{t-1} | x_t, x_0) = N(mutilde_t, betatilde_t I)                    (Nichol & Dhariwal Eq. 10-12; Ho et al. Eq. 6-7)
    mu_theta = (x_t - beta_t / sqrt(1 - abar_t) eps_theta) / sqrt(alpha_t)  (Ho et al. Eq. 11)
    Sigma_theta = beta_t^frac betatilde_t^(1 - frac), frac = (v + 1) / 2     (Nichol & Dhariwal Eq. 15, as powers)
    KL(N(m1, s1) || N(m2, s2)) = (log(s2 / s1) + (s1 + (m1 - m2)^2) / s2 - 1) / 2
    p(x_0 | x_1) = Phi(delta_+) - Phi(delta_-) over the bin of x_0                (Ho et al. Eq. 13), with Phi from erfc
Each term in the paper's units: the mean over dimensions, in bits (improved-diffusion's mean_flat(.) / log 2).
Indices are 0-based like diffusers; betatilde at index 0 (= 0) is replaced by betatilde at index 1 ("clipped").
"""

import math

import pytest
import torch
from conftest import MICRO_UNET
from diffusers import DDPMScheduler, UNet2DModel

from ddpm_hf import nll
from ddpm_hf.errors import UserError
from ddpm_hf.losses import DDPMLoss, HybridLoss, q_sample

pytestmark = pytest.mark.usefixtures("one_thread")

T = 50
C, H, W = 3, 4, 4
TIMESTEPS = (0, 1, 2, T // 2, T - 1)


def scheduler(**options) -> DDPMScheduler:
    # The paper's linear schedule rescaled to T = 50 (beta_t * 1000 / T).
    return DDPMScheduler(num_train_timesteps=T, beta_start=2e-3, beta_end=0.4, **options)


# ---------------------------------------------------------------------------------------------
# The reference, from the equations
# ---------------------------------------------------------------------------------------------


class Reference:
    def __init__(self, betas: torch.Tensor):
        self.beta = betas.double()
        self.alpha = 1.0 - self.beta
        self.abar = torch.cumprod(self.alpha, 0)
        self.abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.abar[:-1]])
        beta_tilde = (1.0 - self.abar_prev) / (1.0 - self.abar) * self.beta  # Eq. 12
        self.beta_tilde_clipped = torch.cat([beta_tilde[1:2], beta_tilde[1:]])

    def posterior(self, x_0, x_t, t):
        """mutilde_t (Eq. 11) and betatilde_t (Eq. 12)."""
        mean = (self.abar_prev[t].sqrt() * self.beta[t] * x_0 + self.alpha[t].sqrt() * (1.0 - self.abar_prev[t]) * x_t) / (1.0 - self.abar[t])
        return mean, self.beta_tilde_clipped[t]

    def x_0_from(self, output, x_t, t, prediction_type):
        a = self.abar[t]
        if prediction_type == "epsilon":
            return (x_t - (1.0 - a).sqrt() * output) / a.sqrt()
        if prediction_type == "sample":
            return output
        return a.sqrt() * x_t - (1.0 - a).sqrt() * output  # v_prediction

    def model_mean(self, output, x_t, t, prediction_type, clip):
        if prediction_type == "epsilon" and not clip:
            return (x_t - self.beta[t] / (1.0 - self.abar[t]).sqrt() * output) / self.alpha[t].sqrt()  # Ho et al. Eq. 11
        x_0 = self.x_0_from(output, x_t, t, prediction_type)
        return self.posterior(x_0.clamp(-1, 1) if clip else x_0, x_t, t)[0]

    def model_variance(self, v, t, variance_type):
        if variance_type == "learned_range":
            frac = (v + 1.0) / 2.0
            return self.beta[t] ** frac * self.beta_tilde_clipped[t] ** (1.0 - frac)  # Eq. 15
        if variance_type == "learned":
            return v  # diffusers' sampler reads a "learned" output as the variance itself
        fixed = self.beta[t] if variance_type == "fixed_large" else self.beta_tilde_clipped[t]
        return (self.beta_tilde_clipped[0] if t == 0 else fixed).expand_as(v)


def gaussian_kl(m1, s1, m2, s2):
    return 0.5 * (torch.log(s2 / s1) + (s1 + (m1 - m2) ** 2) / s2 - 1.0)


def phi_difference(upper, lower):
    """Phi(upper) - Phi(lower), each Phi from erfc on the side of 0 where it keeps its precision."""
    right = 0.5 * torch.special.erfc(lower / math.sqrt(2)) - 0.5 * torch.special.erfc(upper / math.sqrt(2))
    left = 0.5 * torch.special.erfc(-upper / math.sqrt(2)) - 0.5 * torch.special.erfc(-lower / math.sqrt(2))
    return torch.where(lower > 0, right, left)


def decoder_log_likelihood(x_0, mean, variance):
    """log p(x_0 | x_1) per element   (Ho et al. Eq. 13)."""
    std = variance.sqrt()
    upper = torch.where(x_0 > 1 - 1e-6, torch.full_like(x_0, math.inf), (x_0 + 1 / 255 - mean) / std)
    lower = torch.where(x_0 < -1 + 1e-6, torch.full_like(x_0, -math.inf), (x_0 - 1 / 255 - mean) / std)
    return phi_difference(upper, lower).log()


def reference_term_bits(ref, output, x_0, x_t, t, variance_type, prediction_type, clip):
    """L_t in bits per dimension (the paper's code: mean_flat(.) / log 2)."""
    mean_output, v = output[:, :C], output[:, C:]
    if v.shape[1] == 0:
        v = torch.zeros_like(mean_output)
    model_mean = ref.model_mean(mean_output, x_t, t, prediction_type, clip)
    model_variance = ref.model_variance(v, t, variance_type)
    if t == 0:
        per_element = -decoder_log_likelihood(x_0, model_mean, model_variance)
    else:
        true_mean, true_variance = ref.posterior(x_0, x_t, t)
        per_element = gaussian_kl(true_mean, true_variance, model_mean, model_variance)
    return per_element.flatten(1).mean(1) / math.log(2)


# ---------------------------------------------------------------------------------------------
# Random inputs
# ---------------------------------------------------------------------------------------------


def random_x_0(generator, batch=6):
    levels = torch.randint(0, 256, (batch, C, H, W), generator=generator)
    levels[0, 0, 0, :2] = torch.tensor([0, 255])  # both edge bins
    return levels.double() / 127.5 - 1.0


def random_output(generator, x_0, variance_type, prediction_type):
    mean_part = torch.randn(x_0.shape, generator=generator, dtype=torch.float64)
    if prediction_type == "sample":
        mean_part = x_0 + 0.05 * mean_part
    if variance_type == "learned_range":
        v = torch.rand(x_0.shape, generator=generator, dtype=torch.float64) * 2.4 - 1.2  # a little outside [-1, 1]: not clamped
    elif variance_type == "learned":
        v = torch.exp(torch.rand(x_0.shape, generator=generator, dtype=torch.float64) * 4 - 9)  # the variance itself
    else:
        return mean_part
    return torch.cat([mean_part, v], 1)


class FixedOutput(torch.nn.Module):
    """A 'UNet' that returns a given output and records what it was called with."""

    def __init__(self, output):
        super().__init__()
        self.output = torch.nn.Parameter(output.clone(), requires_grad=False)
        self.calls = []

    def forward(self, x_t, t):
        self.calls.append((x_t.clone(), t.clone()))
        return type("Out", (), {"sample": self.output})()


# ---------------------------------------------------------------------------------------------
# nll.py, term by term
# ---------------------------------------------------------------------------------------------


CASES = [
    ("learned_range", "epsilon", True),
    ("learned_range", "epsilon", False),
    ("learned_range", "sample", False),
    ("learned_range", "v_prediction", True),
    ("learned", "epsilon", True),
    ("fixed_small", "epsilon", True),
    ("fixed_large", "epsilon", False),
    ("fixed_large", "v_prediction", True),
]


@pytest.mark.parametrize("variance_type, prediction_type, clip", CASES)
def test_nll_terms_match_the_papers_equations(variance_type, prediction_type, clip):
    sched = scheduler(variance_type=variance_type, prediction_type=prediction_type, clip_sample=clip)
    terms = nll.DiffusionTerms(sched)
    ref = Reference(sched.betas)
    generator = torch.Generator().manual_seed(hash((variance_type, prediction_type, clip)) % 2**31)
    x_0 = random_x_0(generator)
    dims = x_0[0].numel()
    for t in TIMESTEPS:
        noise = torch.randn(x_0.shape, generator=generator, dtype=torch.float64)
        output = random_output(generator, x_0, variance_type, prediction_type)
        x_t = terms.q_sample(x_0, t, noise)
        expected = reference_term_bits(ref, output, x_0, x_t, t, variance_type, prediction_type, clip)
        ours = terms.vb_term(output, x_0, x_t, t) / (dims * math.log(2))
        torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-12, msg=f"t={t}")
        # ... and through a network, as bits_per_dim calls it.
        unet = FixedOutput(output)
        torch.testing.assert_close(terms.term(unet, x_0, t, noise) / (dims * math.log(2)), expected, rtol=1e-9, atol=1e-12)
        ((seen_x_t, seen_t),) = unet.calls
        assert torch.equal(seen_x_t, x_t) and seen_t.tolist() == [t] * x_0.shape[0]


def test_nll_learned_variance_enters_every_term():
    sched = scheduler(variance_type="learned_range")
    terms = nll.DiffusionTerms(sched)
    generator = torch.Generator().manual_seed(1)
    x_0 = random_x_0(generator)
    output = random_output(generator, x_0, "learned_range", "epsilon")
    for t in TIMESTEPS:
        x_t = terms.q_sample(x_0, t, torch.randn(x_0.shape, generator=generator, dtype=torch.float64))
        low, high = output.clone(), output.clone()
        low[:, C:], high[:, C:] = -1.0, 1.0
        assert (terms.vb_term(low, x_0, x_t, t) != terms.vb_term(high, x_0, x_t, t)).all()  # at t = T - 1 beta_t ~ betatilde_t: a small change
    with pytest.raises(UserError, match="2 x 3 output channels"):
        terms.vb_term(output[:, :C], x_0, x_0, 1)


def test_fixed_variance_terms_ignore_extra_channels():
    terms = nll.DiffusionTerms(scheduler(variance_type="fixed_large"))
    generator = torch.Generator().manual_seed(2)
    x_0 = random_x_0(generator)
    output = random_output(generator, x_0, "learned_range", "epsilon")
    x_t = terms.q_sample(x_0, 3, torch.randn(x_0.shape, generator=generator, dtype=torch.float64))
    assert torch.equal(terms.vb_term(output, x_0, x_t, 3), terms.vb_term(output[:, :C], x_0, x_t, 3))


def test_bits_per_dim_of_a_learned_range_unet():
    torch.manual_seed(0)
    unet = UNet2DModel(**{**MICRO_UNET, "out_channels": 2 * C}, sample_size=8)
    images = torch.randint(0, 256, (2, C, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    result = nll.bits_per_dim(unet, DDPMScheduler(num_train_timesteps=8, variance_type="learned_range"), images, progress=False)
    assert result["variance_type"] == "learned_range"
    assert math.isfinite(result["bits_per_dim"]) and result["bits_per_dim"] > 0
    parts = result["prior_bits_per_dim"] + result["kl_bits_per_dim"] + result["decoder_bits_per_dim"]
    assert result["bits_per_dim"] == pytest.approx(parts, rel=1e-9)
    with pytest.raises(UserError, match="output channels"):
        nll.bits_per_dim(UNet2DModel(**MICRO_UNET, sample_size=8), DDPMScheduler(num_train_timesteps=8, variance_type="learned_range"), images, progress=False)


# ---------------------------------------------------------------------------------------------
# Training and diffusers' sampler agree on Sigma_theta
# ---------------------------------------------------------------------------------------------


def test_learned_log_variance_matches_diffusers_get_variance():
    sched = DDPMScheduler(num_train_timesteps=1000, variance_type="learned_range")
    loss = HybridLoss(sched.alphas_cumprod)
    terms = nll.DiffusionTerms(sched)
    v = torch.linspace(-1.0, 1.0, 9).reshape(1, 1, 3, 3)
    for t in (1, 2, 10, 500, 999):
        theirs = sched._get_variance(t, predicted_variance=v)  # log Sigma_theta for learned_range
        ours = loss.reverse.model_log_variance(v, torch.tensor([t]))
        # diffusers computes betatilde_t in float32 from 1 - abar_t / abar_{t-1}: ~1e-3 relative error in beta at small t
        torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-3)
        torch.testing.assert_close(terms.model_log_variance_of(v.double(), t, v).float(), theirs, rtol=0, atol=2e-3)
    # At index 0 diffusers clamps betatilde_0 = 0 to 1e-20 where we use the clipped betatilde_1 ...
    assert sched._get_variance(0, predicted_variance=torch.tensor(-1.0)).item() == pytest.approx(math.log(1e-20), rel=1e-5)
    # ... but its sampler never reads Sigma_theta at index 0: the last step adds no noise.
    x_t = torch.randn(1, C, H, W, generator=torch.Generator().manual_seed(0))
    eps_hat = torch.randn(1, C, H, W, generator=torch.Generator().manual_seed(1))
    steps = [sched.step(torch.cat([eps_hat, torch.full_like(eps_hat, v)], 1), 0, x_t).prev_sample for v in (-1.0, 1.0)]
    assert torch.equal(*steps)


def test_diffusers_step_samples_from_our_p_theta():
    sched = scheduler(variance_type="learned_range")
    terms = nll.DiffusionTerms(sched)
    generator = torch.Generator().manual_seed(3)
    x_t = torch.randn(2, C, H, W, generator=generator)
    output = torch.cat([torch.randn(2, C, H, W, generator=generator), torch.rand(2, C, H, W, generator=generator) * 2 - 1], 1)
    for t in (1, T // 2, T - 1):
        prev = sched.step(output, t, x_t, generator=torch.Generator().manual_seed(t)).prev_sample
        noise = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(t))
        mean_output, v = terms.split_output(output.double(), C)
        model_mean = terms.posterior_mean(terms.predict_x0(mean_output, x_t.double(), t), x_t.double(), t)
        expected = model_mean + torch.exp(0.5 * terms.model_log_variance_of(v, t, model_mean)) * noise
        torch.testing.assert_close(prev, expected.float(), rtol=0, atol=5e-4)


# ---------------------------------------------------------------------------------------------
# HybridLoss
# ---------------------------------------------------------------------------------------------


class LinearNet(torch.nn.Module):
    """A small deterministic network of x_t and t with 2C output channels."""

    def __init__(self, out_channels=2 * C):
        super().__init__()
        self.conv = torch.nn.Conv2d(C, out_channels, 3, padding=1)
        self.time = torch.nn.Embedding(T, out_channels)
        with torch.no_grad():
            self.conv.weight.mul_(0.3)
            self.time.weight.mul_(0.3)

    def forward(self, x_t, t):
        return type("Out", (), {"sample": self.conv(x_t) + self.time(t)[:, :, None, None]})()


class FirstChannels(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x_t, t):
        return type("Out", (), {"sample": self.net(x_t, t).sample[:, :C]})()


def test_hybrid_terms_match_the_papers_equations():
    sched = scheduler(variance_type="learned_range")
    ref = Reference(sched.betas)
    loss = HybridLoss(sched.alphas_cumprod)
    generator = torch.Generator().manual_seed(4)
    x_0 = random_x_0(generator, batch=len(TIMESTEPS))
    t = torch.tensor(TIMESTEPS)
    x_t = q_sample(x_0, t, torch.randn(x_0.shape, generator=generator, dtype=torch.float64), sched.alphas_cumprod.double())
    output = random_output(generator, x_0, "learned_range", "epsilon")
    ours = loss.vlb_terms(output[:, :C].float(), output[:, C:].float(), x_0.float(), x_t.float(), t)
    for i, step in enumerate(TIMESTEPS):
        expected = reference_term_bits(ref, output[i : i + 1], x_0[i : i + 1], x_t[i : i + 1], step, "learned_range", "epsilon", clip=False)
        torch.testing.assert_close(ours[i : i + 1].double(), expected, rtol=2e-4, atol=1e-5, msg=f"t={step}")


def test_vlb_trains_only_the_variance_and_l_simple_only_the_mean():
    sched = scheduler(variance_type="learned_range")
    generator = torch.Generator().manual_seed(5)
    x_0 = random_x_0(generator, batch=T).float()
    t = torch.arange(T)  # every timestep, 0 and T - 1 included
    eps = torch.randn(x_0.shape, generator=generator)
    unet = FixedOutput(random_output(generator, x_0, "learned_range", "epsilon").float())
    unet.output.requires_grad_(True)
    grads, values = {}, {}
    for weight in (0.0, 1.0):
        loss_fn = HybridLoss(sched.alphas_cumprod, vlb_weight=weight)
        value = loss_fn.loss_at(unet, x_0, t, eps)
        (grads[weight],) = torch.autograd.grad(value, unet.output)
        values[weight] = value
        terms = loss_fn.last_terms
        assert set(terms) == {"l_simple", "l_vlb"} and not any(term.requires_grad for term in terms.values())
        assert torch.isfinite(value) and torch.isfinite(terms["l_vlb"]) and terms["l_vlb"] > 0
        torch.testing.assert_close(value, terms["l_simple"] + weight * terms["l_vlb"])
    mean_grad, v_grad = grads[1.0][:, :C], grads[1.0][:, C:]
    assert torch.equal(mean_grad, grads[0.0][:, :C])  # L_vlb adds nothing to the mean's gradient (stop-gradient)
    assert torch.isfinite(grads[1.0]).all()
    assert (v_grad.flatten(1).abs().sum(1) > 0).all()  # ... and trains v at every t, the decoder's t = 0 included
    assert torch.equal(grads[0.0][:, C:], torch.zeros_like(v_grad))  # L_simple does not touch v


def test_hybrid_loss_with_zero_weight_is_ddpm_loss_on_the_mean_channels():
    sched = scheduler(variance_type="learned_range")
    torch.manual_seed(0)
    net = LinearNet()
    x_0 = random_x_0(torch.Generator().manual_seed(6), batch=16).float()
    hybrid = HybridLoss(sched.alphas_cumprod, vlb_weight=0.0)(net, x_0, torch.Generator().manual_seed(7))
    simple = DDPMLoss(sched.alphas_cumprod)(FirstChannels(net), x_0, torch.Generator().manual_seed(7))
    assert torch.equal(hybrid, simple)
    default = HybridLoss(sched.alphas_cumprod)
    value = default(net, x_0, torch.Generator().manual_seed(7))
    assert default.vlb_weight == 0.001
    assert torch.isfinite(value) and value > simple
    torch.testing.assert_close(value, simple + 0.001 * default.last_terms["l_vlb"])


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_hybrid_loss_is_finite_and_backpropagates_for_every_parameterisation(prediction_type):
    sched = scheduler(variance_type="learned_range", prediction_type=prediction_type)
    torch.manual_seed(0)
    net = LinearNet()
    x_0 = random_x_0(torch.Generator().manual_seed(8), batch=T).float()
    loss_fn = HybridLoss(sched.alphas_cumprod, prediction_type)
    value = loss_fn.loss_at(net, x_0, torch.arange(T), torch.randn(x_0.shape, generator=torch.Generator().manual_seed(9)))
    value.backward()
    assert torch.isfinite(value)
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())


def test_hybrid_loss_rejects_a_network_without_variance_channels():
    sched = scheduler()
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="2 x 3 output channels"):
        HybridLoss(sched.alphas_cumprod)(LinearNet(out_channels=C), random_x_0(torch.Generator().manual_seed(0)).float())
    with pytest.raises(ValueError, match="prediction_type"):
        HybridLoss(sched.alphas_cumprod, "x0")

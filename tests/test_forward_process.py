"""The forward process q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) and the training target."""

import pytest
import torch

from ddpm_hf.config import config_from_dict
from ddpm_hf.losses import DDPMLoss, prediction_target, q_sample
from ddpm_hf.models import build_scheduler


@pytest.mark.parametrize("beta_schedule", ["linear", "squaredcos_cap_v2"])
def test_q_sample_has_the_papers_mean_and_variance(beta_schedule):
    scheduler = build_scheduler(config_from_dict({"beta_schedule": beta_schedule}))
    abar = scheduler.alphas_cumprod
    generator = torch.Generator().manual_seed(0)
    x_0 = torch.rand(1, 3, 4, 4, generator=generator) * 2 - 1
    draws = 40_000
    for t in (0, 10, 100, 500, 999):
        eps = torch.randn(draws, 3, 4, 4, generator=generator)
        x_t = q_sample(x_0.expand(draws, -1, -1, -1), torch.full((draws,), t), eps, abar)
        mean, var = x_t.mean(0), x_t.var(0)
        # standard errors: sqrt(var / n) for the mean, var * sqrt(2 / n) for the variance
        assert torch.allclose(mean, abar[t].sqrt() * x_0[0], atol=5 * (1 - abar[t]).sqrt().item() / draws**0.5 + 1e-6)
        assert torch.allclose(var, (1 - abar[t]).expand_as(var), atol=5 * (1 - abar[t]).item() * (2 / draws) ** 0.5 + 1e-7)


def test_q_sample_uses_the_cumulative_product_not_a_single_beta():
    abar = build_scheduler(config_from_dict({})).alphas_cumprod
    x_0, eps = torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)
    # at t = T the signal is gone: sqrt(abar_T) ~ 0.006, whereas sqrt(1 - beta_T) would keep 99%
    assert q_sample(x_0, torch.tensor([999]), eps, abar).max() < 0.01
    assert torch.allclose(q_sample(x_0, torch.tensor([0]), eps, abar), abar[0].sqrt() * x_0)


def test_targets_of_the_three_parameterisations():
    abar = build_scheduler(config_from_dict({})).alphas_cumprod
    x_0, eps, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.tensor([3, 700])
    assert torch.equal(prediction_target(x_0, t, eps, abar, "epsilon"), eps)
    assert torch.equal(prediction_target(x_0, t, eps, abar, "sample"), x_0)
    v = prediction_target(x_0, t, eps, abar, "v_prediction")
    # x_0 = sqrt(abar) x_t - sqrt(1 - abar) v   (Salimans & Ho 2022)
    a = abar[t].reshape(-1, 1, 1, 1)
    x_t = q_sample(x_0, t, eps, abar)
    assert torch.allclose(a.sqrt() * x_t - (1 - a).sqrt() * v, x_0, atol=1e-5)


def test_loss_conditions_the_network_on_t():
    abar = build_scheduler(config_from_dict({})).alphas_cumprod
    seen = []

    class Recorder(torch.nn.Module):
        def forward(self, x_t, t):
            seen.append(t.clone())
            return type("Out", (), {"sample": torch.zeros_like(x_t)})()

    loss = DDPMLoss(abar)(Recorder(), torch.zeros(64, 3, 16, 16))
    assert len(seen) == 1 and seen[0].unique().numel() > 10 and 0 <= seen[0].min() and seen[0].max() < 1000
    assert torch.isclose(loss, torch.tensor(1.0), atol=0.1)  # ||eps||^2 per dimension

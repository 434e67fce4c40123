"""Importance-sampled timesteps for L_vlb (Nichol & Dhariwal 2021, Sec. 3.3): losses.VLBLoss."""

import pytest
import torch
from diffusers import DDPMScheduler

from ddpm_hf.losses import VLBLoss

pytestmark = pytest.mark.usefixtures("one_thread")

T, C = 20, 3


def vlb_loss(**options) -> VLBLoss:
    return VLBLoss(DDPMScheduler(num_train_timesteps=T, beta_start=5e-3, beta_end=0.5).alphas_cumprod, **options)


class FixedOutput(torch.nn.Module):
    def __init__(self, output):
        super().__init__()
        self.output = torch.nn.Parameter(output.clone())
        self.calls = []

    def forward(self, x_t, t):
        self.calls.append((x_t.clone(), t.clone()))
        return type("Out", (), {"sample": self.output})()


def test_t_is_uniform_until_every_term_has_ten_values_then_proportional_to_their_rms():
    loss = vlb_loss()
    torch.testing.assert_close(loss.probabilities(), torch.full((T,), 1 / T))
    values = torch.arange(1.0, T + 1)  # L_t = t + 1, ten times each, but term T - 1 only nine times
    for _ in range(9):
        loss.update_history(torch.arange(T), values)
    loss.update_history(torch.arange(T - 1), values[:-1])
    torch.testing.assert_close(loss.probabilities(), torch.full((T,), 1 / T))
    loss.update_history(torch.tensor([T - 1]), values[-1:])
    expected = 0.999 * values / values.sum() + 0.001 / T  # sqrt(E[L_t^2]) = t + 1
    torch.testing.assert_close(loss.probabilities(), expected)
    assert loss.probabilities().sum().item() == pytest.approx(1.0)


def test_history_keeps_the_last_ten_values_of_each_term_even_from_one_batch():
    loss = vlb_loss()
    loss.update_history(torch.tensor([2] * 13 + [5, 2]), torch.arange(15.0))
    assert loss.loss_counts[2] == 14 and loss.loss_counts[5] == 1
    assert sorted(loss.loss_history[2].tolist()) == [4.0, 5, 6, 7, 8, 9, 10, 11, 12, 14]  # the last ten of 0..12, 14
    assert loss.loss_history[5, 0] == 13
    loss.update_history(torch.tensor([2, 2]), torch.tensor([100.0, 101.0]))  # the two oldest (4 and 5) go
    assert sorted(loss.loss_history[2].tolist()) == [6.0, 7, 8, 9, 10, 11, 12, 14, 100, 101]


def test_vlb_loss_is_the_importance_weighted_mean_and_trains_mean_and_variance():
    loss = vlb_loss()
    for _ in range(10):
        loss.update_history(torch.arange(T), torch.linspace(5.0, 0.1, T))  # fill: p_t is no longer uniform
    p = loss.probabilities()
    generator = torch.Generator().manual_seed(0)
    x_0 = torch.randint(0, 256, (8, C, 4, 4), generator=generator).float() / 127.5 - 1
    output = torch.cat([torch.randn(8, C, 4, 4, generator=generator), torch.rand(8, C, 4, 4, generator=generator) * 2 - 1], 1)
    unet = FixedOutput(output)
    value = loss(unet, x_0, torch.Generator().manual_seed(1))
    ((x_t, t),) = unet.calls
    l_t = loss.terms.vlb_terms(output[:, :C], output[:, C:], x_0, x_t, t)
    torch.testing.assert_close(value, (l_t / p[t]).mean())
    assert torch.equal(loss.last_terms["l_vlb"], value.detach())
    value.backward()
    assert (unet.output.grad[:, :C].abs().sum() > 0) and (unet.output.grad[:, C:].abs().sum() > 0)  # no stop-gradient here
    assert torch.isfinite(unet.output.grad).all()

"""Adversarial criteria (specs/ifvd_skd.md §C.4); the training step that uses them is in test_engine_step.py."""

import pytest
import torch
import torch.nn as nn

from common.losses.adversarial import discriminator_loss, generator_loss, gradient_penalty
from common.models.discriminator import Discriminator


def test_discriminator_loss_values():
    d_s, d_t = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 5.0])
    assert discriminator_loss(d_s, d_t, "wgan-gp").item() == pytest.approx(-2.5)
    hinge = discriminator_loss(torch.tensor([-2.0, 0.0]), torch.tensor([0.5, 2.0]), "hinge")
    assert hinge.item() == pytest.approx(0.75)
    assert discriminator_loss(torch.tensor([1.0, 3.0]), torch.tensor([2.0, 2.0]), "wgan-gp").item() == 0.0
    assert discriminator_loss(torch.tensor([-1.0, -4.0]), torch.tensor([1.0, 7.0]), "hinge").item() == 0.0


def test_generator_loss_is_minus_mean_for_both_types():
    d_s = torch.tensor([[0.5], [1.5]])
    assert generator_loss(d_s, "wgan-gp").item() == pytest.approx(-1.0)
    assert generator_loss(d_s, "hinge").item() == pytest.approx(-1.0)
    assert generator_loss(3 * d_s).item() == pytest.approx(3 * generator_loss(d_s).item())


def test_bad_inputs():
    with pytest.raises(ValueError, match="adversarial loss type"):
        discriminator_loss(torch.zeros(2), torch.zeros(2), "lsgan")
    with pytest.raises(ValueError, match="adversarial loss type"):
        generator_loss(torch.zeros(2), "wgan")
    with pytest.raises(ValueError, match="differ in shape"):
        discriminator_loss(torch.zeros(2, 1), torch.zeros(3, 1))


class LinearCritic(nn.Module):
    """D(x) = <w, x> per sample, so ∂ΣD/∂x_n = w for every sample."""

    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(w)

    def forward(self, x):
        return [(x * self.w).flatten(1).sum(1), None, None]


def test_gradient_penalty_values():
    w = torch.randn(1, 3, 4, 4)
    real, fake = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    assert gradient_penalty(LinearCritic(w / w.norm()), real, fake).item() == pytest.approx(0.0, abs=1e-10)
    assert gradient_penalty(LinearCritic(2 * w / w.norm()), real, fake).item() == pytest.approx(1.0, rel=1e-5)


def test_gradient_penalty_reaches_only_the_discriminator():
    torch.manual_seed(0)
    disc = Discriminator()
    real = torch.randn(2, 19, 65, 65, requires_grad=True)
    fake = torch.randn(2, 19, 65, 65, requires_grad=True)
    gp = gradient_penalty(disc, real, fake)
    assert gp.ndim == 0 and torch.isfinite(gp)
    gp.backward()
    assert real.grad is None and fake.grad is None
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in disc.parameters() if p.requires_grad)

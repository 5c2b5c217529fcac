"""Holistic (adversarial) distillation criteria shared by SKD/IFVD/CWD (specs/ifvd_skd.md §C.4; cwd.md §5.5).

The discriminator scores are the first element of the SAGAN discriminator's output list; teacher
logits are "real", student logits "fake".
"""
import torch
import torch.nn.functional as F

from common.numerics import full_precision
from common.outputs import first_output

ADV_TYPES = ("wgan-gp", "hinge")


def check_adv_type(adv_type):
    """Return ``adv_type`` if it is one of :data:`ADV_TYPES`, else raise a ``ValueError``."""
    if adv_type not in ADV_TYPES:
        raise ValueError(f"unknown adversarial loss type {adv_type!r}; use one of {', '.join(ADV_TYPES)}")
    return adv_type


def discriminator_loss(d_s, d_t, adv_type="wgan-gp"):
    """D loss before λ_d: WGAN ``−mean D(T) + mean D(S)``; hinge ``mean relu(1 − D(T)) + mean relu(1 + D(S))``."""
    check_adv_type(adv_type)
    if d_s.shape != d_t.shape:
        raise ValueError(f"discriminator outputs differ in shape: student {tuple(d_s.shape)}, "
                         f"teacher {tuple(d_t.shape)}")
    d_s, d_t = full_precision(d_s), full_precision(d_t)
    if adv_type == "wgan-gp":
        return d_s.mean() - d_t.mean()
    return F.relu(1.0 - d_t).mean() + F.relu(1.0 + d_s).mean()


def generator_loss(d_s, adv_type="wgan-gp"):
    """G-side term ``−mean D(S)``, the same for both loss types (``CriterionAdvForG``)."""
    check_adv_type(adv_type)
    return -full_precision(d_s).mean()


def gradient_penalty(discriminator, real, fake):
    """WGAN-GP ``mean_n (‖∂ΣD(x̂)/∂x̂‖₂ − 1)²`` at ``x̂ = α·real + (1−α)·fake``, α ~ U[0,1) per sample.

    Both inputs enter detached, so the penalty reaches only the discriminator's parameters. λ_gp
    (and λ_d) are applied by the caller.
    """
    real, fake = real.detach(), fake.detach()
    alpha = torch.rand(real.shape[0], 1, 1, 1, device=real.device, dtype=real.dtype)
    x_hat = (alpha * real + (1.0 - alpha) * fake).requires_grad_(True)
    out = first_output(discriminator(x_hat))
    grad = torch.autograd.grad(out, x_hat, grad_outputs=torch.ones_like(out), create_graph=True, retain_graph=True)[0]
    return (grad.reshape(grad.shape[0], -1).norm(2, dim=1) - 1.0).pow(2).mean()

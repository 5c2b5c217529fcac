"""Logit distillation losses.

``PixelKL``: the IFVD/CWD ``CriterionKD`` (specs/ifvd_skd.md §A.4.2, specs/cwd.md §5.4).
``LogitKD``: the CIRKD ``CriterionKD`` (specs/cirkd.md §3.2).
"""
import torch.nn as nn
import torch.nn.functional as F

from common.numerics import full_precision

__all__ = ["LogitKD", "PixelKL"]


class PixelKL(nn.Module):
    """``KLDivLoss(reduction='mean')(log_softmax(zS/T, 1), softmax(zT/T, 1))`` at the logits' resolution.

    The PyTorch 0.4.1 ``elementwise_mean`` divides by every element N·C·H·W, so the value is the
    per-pixel KL (summed over classes) divided by C and averaged over pixels; no T² factor, no ignore
    mask. Computed from two ``log_softmax`` (finite where a teacher probability underflows), half types in fp32.
    The teacher is detached.
    """

    def __init__(self, temperature=1.0):
        super().__init__()
        self.temperature = temperature

    def forward(self, logits_s, logits_t):
        log_s = F.log_softmax(full_precision(logits_s) / self.temperature, dim=1)
        log_t = F.log_softmax(full_precision(logits_t.detach()) / self.temperature, dim=1)
        return F.kl_div(log_s, log_t, reduction="sum", log_target=True) / log_s.numel()


class LogitKD(nn.Module):
    """``T² · Σ_pixels KL(softmax(zT/T) ‖ softmax(zS/T)) / (N·H·W)``: the per-pixel KL averaged over pixels,
    at the logits' resolution, no ignore mask (specs/cirkd.md §3.2). The teacher is detached."""

    def __init__(self, temperature=1.0):
        super().__init__()
        self.temperature = temperature

    def forward(self, logits_s, logits_t):
        n, _, h, w = logits_s.shape
        log_s = F.log_softmax(full_precision(logits_s) / self.temperature, dim=1)
        log_t = F.log_softmax(full_precision(logits_t.detach()) / self.temperature, dim=1)
        kl = F.kl_div(log_s, log_t, reduction="sum", log_target=True)
        return kl * self.temperature ** 2 / (n * h * w)


"""FitNet hint loss, CIRKD's ``CriterionFitNet`` (specs/cirkd.md §3.7; Romero et al., ICLR 2015)."""
import torch.nn as nn
import torch.nn.functional as F

from common.losses.precision import promote
from common.numerics import full_precision


class FitNet(nn.Module):
    """``mean((a(S) − T)²)`` with the trainable adapter ``a`` = 1×1 conv C_s → C_t without bias (PyTorch's
    default initialisation, §11). The adapter is part of this module: put its parameters in the optimiser."""

    def __init__(self, s_channels, t_channels):
        super().__init__()
        self.conv = nn.Conv2d(s_channels, t_channels, kernel_size=1, bias=False)

    def forward(self, feat_s, feat_t):
        if feat_s.dim() != 4 or feat_s.shape[1] != self.conv.in_channels:
            raise ValueError(f"expected B×{self.conv.in_channels}×h×w student features, got {tuple(feat_s.shape)}")
        adapted = self.conv(full_precision(feat_s))
        if adapted.shape != feat_t.shape:
            raise ValueError(f"adapted student features {tuple(adapted.shape)} and teacher features "
                             f"{tuple(feat_t.shape)} differ in shape")
        return F.mse_loss(*promote(adapted, feat_t.detach()))

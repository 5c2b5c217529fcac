"""Attention transfer, CIRKD's ``CriterionAT`` (specs/cirkd.md §3.7; Zagoruyko & Komodakis, ICLR 2017)."""
import torch.nn as nn
import torch.nn.functional as F

from common.numerics import full_precision


def attention_map(feat, p=2):
    """``a(f) = norm(mean_c(f^p))``: per image, the channel mean of ``f^p`` over the h·w positions, ℓ2-normalised
    (``F.normalize``, eps 1e-12); shape B×(h·w)."""
    return F.normalize(feat.pow(p).mean(1).flatten(1), p=2, dim=1)


class AttentionTransfer(nn.Module):
    """``mean((a(S) − a(T))²)`` over B·h·w with :func:`attention_map` (p = 2); channel counts may differ."""

    def __init__(self, p=2):
        super().__init__()
        self.p = p

    def forward(self, feat_s, feat_t):
        if feat_s.dim() != 4 or feat_t.dim() != 4:
            raise ValueError(f"expected B×C×h×w features, got {tuple(feat_s.shape)} and {tuple(feat_t.shape)}")
        if feat_s.shape[0] != feat_t.shape[0] or feat_s.shape[2:] != feat_t.shape[2:]:
            raise ValueError(f"student {tuple(feat_s.shape)} and teacher {tuple(feat_t.shape)} features need the "
                             "same batch and spatial size")
        a_s = attention_map(full_precision(feat_s), self.p)
        a_t = attention_map(full_precision(feat_t.detach()), self.p)
        return (a_s - a_t).pow(2).mean()

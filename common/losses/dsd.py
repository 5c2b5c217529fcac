"""Double similarity distillation, CIRKD's ``CriterionDoubleSimKD`` baseline (specs/cirkd.md §3.7; DSD, TIP 2021).

The caller hands in three maps per network, in the original's order ``[out[-2], out[-1], out[0]]``: for the
ResNet models aux logits, embedding, main logits; for the mobile models (no aux head) the main logits take
the first slot too (§8.15). All maps share the batch and the h×w size; channel counts may differ.
"""
import itertools

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.losses.at import attention_map
from common.numerics import full_precision


def residual_attention_loss(maps_s, maps_t):
    """PSD (§3.7): for the 3 pairs n < m of the maps, the residual attention ``r = norm(a_m − a_n)`` of each network
    (attention maps of :func:`common.losses.at.attention_map`) and ``mean((norm(r_S) − norm(r_T))²)``, averaged over
    the pairs.

    ``r`` is normalised a second time in the loss, as in the original. The values equal one normalisation, but not
    the gradient at a zero residual: on a mobile student the first and last maps are the same logits, so
    ``r_S = 0`` and the backward of the two normalisations there is ``±g/eps²`` (eps = 1e-12). It swamps the other
    pairs' gradients at both attention maps of the logits, and the two equal and opposite paths cancel exactly:
    PSD sends the logits no gradient, in float32 and float64 alike (with one normalisation float64 keeps the other
    pairs' gradients and float32 does not)."""
    att_s = [attention_map(f) for f in maps_s]
    att_t = [attention_map(f) for f in maps_t]
    pairs = list(itertools.combinations(range(len(att_s)), 2))
    terms = []
    for n, m in pairs:
        r_s = F.normalize(att_s[m] - att_s[n], p=2, dim=1)
        r_t = F.normalize(att_t[m] - att_t[n], p=2, dim=1)
        terms.append((F.normalize(r_s, p=2, dim=1) - F.normalize(r_t, p=2, dim=1)).pow(2).mean())
    return torch.stack(terms).mean()


def category_similarity(logits, temperature):
    """CSD's K×K matrix per image: ``P Pᵀ`` with P = softmax over the positions of ``avgpool2x2(logits)/T``."""
    pooled = F.avg_pool2d(logits, 2, 2, 0, ceil_mode=True)
    probs = F.softmax(pooled.flatten(2) / temperature, dim=2)
    with torch.autocast(probs.device.type, enabled=False):
        return torch.bmm(probs, probs.transpose(1, 2))


class DSD(nn.Module):
    """Returns ``(psd, csd)``: :func:`residual_attention_loss` of the three maps and
    ``mean((G_S − G_T)²)`` of the :func:`category_similarity` of the main logits (T = 4). The trainer
    weighs them (1000 and 10 in the scripts, §3.6)."""

    def __init__(self, temperature=4.0):
        super().__init__()
        self.temperature = temperature

    def forward(self, aux_s, feat_s, logits_s, aux_t, feat_t, logits_t):
        maps_s = [full_precision(f) for f in (aux_s, feat_s, logits_s)]
        maps_t = [full_precision(f.detach()) for f in (aux_t, feat_t, logits_t)]
        size = logits_s.shape[0], *logits_s.shape[2:]
        for f in maps_s + maps_t:
            if f.dim() != 4 or (f.shape[0], *f.shape[2:]) != size:
                raise ValueError(f"DSD needs B×C×h×w maps of batch and size {size}, got {tuple(f.shape)}")
        if logits_s.shape[1] != logits_t.shape[1]:
            raise ValueError(f"student and teacher logits have {logits_s.shape[1]} and {logits_t.shape[1]} classes")
        psd = residual_attention_loss(maps_s, maps_t)
        g_s = category_similarity(maps_s[2], self.temperature)
        g_t = category_similarity(maps_t[2], self.temperature)
        return psd, (g_s - g_t).pow(2).mean()

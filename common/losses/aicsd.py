"""AICSD losses (specs/aicsd.md §4): the segmentation loss, inter-class similarity, the ICKD-like
channel correlation, adaptive loss weighting and the total-loss recipes.

Reused, not repeated here: the pixel-wise KD ``pi_loss`` (§4.2) is ``common.losses.kd.PixelKL()`` and the
pair-wise ``pa_loss`` on ASPP features (§4.6.1) is ``common.losses.skd.PairWise(scale=0.5)``.
Every loss takes plain tensors (student first, teacher second) and returns a 0-dim tensor; the λ weights
are applied by the caller. Teachers are detached (the original ran them in autograd but never stepped
them, §2.5: identical student gradients).
"""
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from common.numerics import full_precision


class SegmentationLoss(nn.Module):
    """``SegmentationLosses.build_loss(mode)`` of ``utils/loss.py`` (§4.1).

    ``mode="ce"``: ``CrossEntropyLoss(weight, ignore_index=255)`` averaged over the non-ignored pixels
    (weighted mean with class weights), then divided again by the batch size when ``batch_average``
    (the original's default, quirk Q12); ``batch_average=False`` is the usual mean.
    ``mode="focal"``: the original's "focal" loss on the *mean* CE,
    ``-(1 - exp(-ce))^γ · α · (-ce)`` with γ = 2, α = 0.5, then the same batch division (Q15).

    A batch whose pixels are all ignored gives 0 instead of the original's NaN (DESIGN.md fidelity rule).
    """

    MODES = ("ce", "focal")

    def __init__(self, mode="ce", weight=None, ignore_index=255, batch_average=True, gamma=2.0, alpha=0.5):
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"loss type {mode!r} is not known; choose one of: {', '.join(self.MODES)}")
        self.mode = mode
        self.ignore_index = ignore_index
        self.batch_average = batch_average
        self.gamma = gamma
        self.alpha = alpha
        self.register_buffer("weight", None if weight is None else torch.as_tensor(weight, dtype=torch.float32))

    def forward(self, logits, target):
        if logits.dim() != 4 or target.shape != (logits.shape[0],) + logits.shape[2:]:
            raise ValueError(f"SegmentationLoss: logits {tuple(logits.shape)} need a B×C×H×W tensor and a "
                             f"B×H×W target at the same size, got target {tuple(target.shape)}")
        logits = full_precision(logits)
        target = target.long()
        weight = None if self.weight is None else self.weight.to(logits.dtype)
        ce = _mean_cross_entropy(logits, target, weight, self.ignore_index)
        if self.mode == "focal":
            logpt = -ce
            ce = -((1 - torch.exp(logpt)) ** self.gamma) * (self.alpha * logpt)
        return ce / logits.shape[0] if self.batch_average else ce


def _mean_cross_entropy(logits, target, weight, ignore_index):
    """``F.cross_entropy(..., reduction='mean')``, but 0 (not NaN) when every pixel is ignored."""
    total = F.cross_entropy(logits, target, weight=weight, ignore_index=ignore_index, reduction="sum")
    valid = target != ignore_index
    if weight is None:
        denom = valid.sum().to(logits.dtype)
    else:
        denom = (weight[target.masked_fill(~valid, 0)] * valid).sum()
    return total / denom.clamp(min=torch.finfo(logits.dtype).tiny)


def class_similarity_matrix(logits, temperature=1.0, mode="code"):
    """The raw C×C inter-class similarity matrix M of one network, before row normalisation (§4.3).

    ``mode="code"`` (§4.3.2, what ``distiller.py`` computes): p = softmax(z/T) over the **H axis** of the
    B×C×H×W logits, and ``KLDivLoss(reduction='batchmean')(p_i, p_j)`` for i ≤ j, mirrored. Because the
    input is a probability, not a log-probability, the entries are, in closed form (§4.3.2),
    ``M[i, j] = E[max(i, j)] − G[i, j]`` with ``E_c = Σ_{b,h,w} p_c·log p_c / B`` and
    ``G = Σ_{b,h,w} p_i p_j / B``: one Gram matrix instead of C(C+1)/2 KL calls. ``p·log_softmax`` keeps
    KLDivLoss's 0·log 0 = 0 where the softmax over H underflows (errata) and, unlike the original's
    ``xlogy``, a finite gradient there (the original's is NaN).

    ``mode="paper"`` (§4.3.1, an interpretation of the paper's text): P_c = softmax(z_c/T) over the
    flattened H·W, ``M[i, j] = KL(P_j ‖ P_i)`` summed over the batch and divided by B.

    Half-precision (AMP) logits are computed in float32 with autocast off; float64 stays float64.
    """
    if logits.dim() != 4:
        raise ValueError(f"class_similarity_matrix: logits must be B×C×H×W, got {tuple(logits.shape)}")
    logits = full_precision(logits)
    with torch.autocast(logits.device.type, enabled=False):
        return _similarity(logits if temperature == 1 else logits / temperature, mode)


def _similarity(logits, mode):
    batch, classes = logits.shape[:2]
    if mode == "code":
        log_p = F.log_softmax(logits, dim=2)
        p = log_p.exp()
        entropy = (p * log_p).sum(dim=(0, 2, 3)) / batch
        flat = p.flatten(2)
        gram = torch.bmm(flat, flat.transpose(1, 2)).sum(0).triu() / batch
        gram = gram + gram.triu(1).t()  # the upper triangle mirrored, as the original fills M
        index = torch.arange(classes, device=logits.device)
        later = torch.maximum(index[:, None], index[None, :])
        return entropy[later] - gram
    if mode == "paper":
        log_p = F.log_softmax(logits.flatten(2), dim=2)
        p = log_p.exp()
        neg_entropy = (p * log_p).sum(dim=(0, 2)) / batch
        cross = torch.einsum("bin,bjn->ij", log_p, p) / batch
        return neg_entropy[None, :] - cross
    raise ValueError(f"class_similarity_matrix: mode must be 'code' or 'paper', got {mode!r}")


class InterClassSimilarity(nn.Module):
    """The ICS loss ``lo_loss`` (§4.3): ``mean((normalize(M_S) − normalize(M_T))²) / B``.

    M is :func:`class_similarity_matrix` of the student and of the (detached) teacher logits, each row
    L2-normalised with autograd (``F.normalize(dim=1)``, §4.3.3); the mean runs over the C² entries and
    B is the batch size of the forward pass. The original's hard-coded 21 classes (quirk Q5) becomes
    ``num_classes``. ``mode="paper"`` keeps the same normalisation and /B, an assumption (§4.3.2).
    """

    MODES = ("code", "paper")

    def __init__(self, num_classes, temperature=1.0, mode="code"):
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"ICS mode {mode!r} is not known; choose one of: {', '.join(self.MODES)}")
        self.num_classes = num_classes
        self.temperature = temperature
        self.mode = mode

    def forward(self, logits_s, logits_t):
        if logits_s.shape != logits_t.shape or logits_s.dim() != 4 or logits_s.shape[1] != self.num_classes:
            raise ValueError(f"InterClassSimilarity: student {tuple(logits_s.shape)} and teacher "
                             f"{tuple(logits_t.shape)} logits must both be B×{self.num_classes}×H×W")
        m_s = F.normalize(class_similarity_matrix(logits_s, self.temperature, self.mode), dim=1)
        m_t = F.normalize(class_similarity_matrix(logits_t.detach(), self.temperature, self.mode), dim=1)
        return (m_s - m_t).pow(2).mean() / logits_s.shape[0]


class InterChannelCorrelation(nn.Module):
    """The ICKD-like ``ic_loss`` of ``--ic_lambda`` (§4.6.2): Σ(Ĝ_S − Ĝ_T)² / (C·B).

    G = L·Lᵀ per sample with L the logits as B×C×(H·W), each Gram row L2-normalised (``dim=2``).
    The original computes it and never adds it to the total loss (quirk Q15); so does :func:`total_loss`.
    """

    def forward(self, logits_s, logits_t):
        if logits_s.shape != logits_t.shape or logits_s.dim() != 4:
            raise ValueError(f"InterChannelCorrelation: student {tuple(logits_s.shape)} and teacher "
                             f"{tuple(logits_t.shape)} logits must have the same B×C×H×W shape")
        batch, channels = logits_s.shape[:2]
        diff = _channel_gram(logits_s) - _channel_gram(logits_t.detach())
        return diff.pow(2).sum() / (channels * batch)


def _channel_gram(logits):
    flat = full_precision(logits).flatten(2)
    with torch.autocast(flat.device.type, enabled=False):
        return F.normalize(torch.bmm(flat, flat.transpose(1, 2)), dim=2)


def adaptive_weight(epoch, ref_epochs=120):
    """ALW's α = epoch / ref_epochs (§4.4): the 0-based epoch over the original's hard-coded 120.

    Warns when α > 1 (more epochs than ``ref_epochs``: the KD weight 1 − α turns negative, quirk Q2).
    """
    if ref_epochs <= 0:
        raise ValueError(f"the ALW reference epoch count (--ref-epochs) must be positive, got {ref_epochs}")
    if epoch < 0:
        raise ValueError(f"adaptive_weight: epoch must be >= 0, got {epoch}")
    alpha = epoch / ref_epochs
    if alpha > 1:
        warnings.warn(f"ALW weight alpha = {epoch}/{ref_epochs} = {alpha:.4f} > 1: the KD term gets the negative "
                      f"weight {1 - alpha:.4f}; pass --ref-epochs equal to --epochs to keep alpha <= 1",
                      RuntimeWarning, stacklevel=2)
    return alpha


def total_loss(ce, pa=0.0, kd=0.0, ics=0.0, alpha=None):
    """The per-iteration total of ``train_kd.py`` (§4.5) from the λ-weighted terms.

    Without ALW (``alpha=None``): ``ce + pa + kd + ics``. With ALW (§4.4): ``α·(ce + ics) + (1 − α)·kd``,
    where ``pa`` is dropped as in the original's commented-out line. The ``ic_loss`` never enters.
    """
    if alpha is None:
        return ce + pa + kd + ics
    return alpha * (ce + ics) + (1 - alpha) * kd

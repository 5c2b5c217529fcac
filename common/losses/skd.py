"""SKD losses: the journal code's pixel-wise / pair-wise terms (ifvd_skd.md §B.4.2, §B.4.3) and the
conference code's ESPNet distillation terms (skd_cvpr19.md §8, ``utils/criterion.py`` of branch ``cvpr_19``).

All losses take plain tensors (student first, teacher second) and return a 0-dim tensor; half types are
computed in float32, float64 stays float64.
"""
import torch
import torch.nn.functional as F
from torch import nn

from common.numerics import full_precision


def _teacher(t, detach):
    """The originals call ``t.detach()`` without using the result (a no-op, §B.9.5); ``detach=True`` fixes it."""
    return t.detach() if detach else t


class PixelWise(nn.Module):
    """``CriterionPixelWise`` (§B.4.2): Σ_{b,h,w} Σ_c −softmax(z_T)·log_softmax(z_S) / (H·W).

    A cross-entropy (not KL) summed over the batch and divided by the pixels of one image, so it equals
    B × the per-pixel mean. ``detach_teacher=False`` keeps the original's no-op detach (the teacher runs
    under ``no_grad`` in training, so it only matters for a teacher that requires grad).
    """

    def __init__(self, detach_teacher: bool = False):
        super().__init__()
        self.detach_teacher = detach_teacher

    def forward(self, logits_s: torch.Tensor, logits_t: torch.Tensor) -> torch.Tensor:
        if logits_s.shape != logits_t.shape:
            raise ValueError(f"PixelWise: student logits {tuple(logits_s.shape)} and teacher logits "
                             f"{tuple(logits_t.shape)} differ in shape")
        logits_t = full_precision(_teacher(logits_t, self.detach_teacher))
        h, w = logits_s.shape[2], logits_s.shape[3]
        p_t = F.softmax(logits_t, dim=1)
        return (-p_t * F.log_softmax(full_precision(logits_s), dim=1)).sum() / (h * w)


def similarity(feat: torch.Tensor) -> torch.Tensor:
    """``utils.similarity`` (§B.4.3 step 2): B×N×N cosine matrix with the per-node norm (+1e-8) detached.

    The original casts to float32; here half types go to float32 and float64 stays float64 (autocast off).
    """
    feat = full_precision(feat)
    norm = (feat.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-8).detach()
    feat = (feat / norm).flatten(2)
    with torch.autocast(feat.device.type, enabled=False):
        return torch.bmm(feat.transpose(1, 2), feat)


def l2_similarity(feat: torch.Tensor) -> torch.Tensor:
    """B×N×N matrix ``norm(F)ᵀ norm(F)`` with ``F.normalize`` (eps 1e-12, norm not detached): CIRKD's form."""
    feat = F.normalize(full_precision(feat), p=2, dim=1).flatten(2)
    with torch.autocast(feat.device.type, enabled=False):
        return torch.bmm(feat.transpose(1, 2), feat)


class PairWise(nn.Module):
    """``CriterionPairWiseforWholeFeatAfterPool`` (§B.4.3): max-pool both maps with a square-ish patch of
    ``int(size·scale)`` (from the teacher's H and W, ``ceil_mode=True``), then the mean over batch and the
    N² node pairs of (A_T − A_S)², with A the cosine matrices of :func:`similarity`.

    CIRKD's ``CriterionStructuralKD`` (specs/cirkd.md §3.7) is ``PairWise(pool_size=2, normalize="l2",
    detach_teacher=True)``: a fixed 2×2 max-pool (``ceil_mode=True``; 64×128 → 32×64) and
    :func:`l2_similarity` instead of the detached-norm :func:`similarity`.
    """

    NORMALIZE = ("detached", "l2")

    def __init__(self, scale: float = 0.5, detach_teacher: bool = False, pool_size=None, normalize="detached"):
        super().__init__()
        if normalize not in self.NORMALIZE:
            raise ValueError(f"PairWise: normalize must be one of {self.NORMALIZE}, got {normalize!r}")
        self.scale = scale
        self.detach_teacher = detach_teacher
        self.pool_size = pool_size
        self.similarity = similarity if normalize == "detached" else l2_similarity

    def forward(self, feat_s: torch.Tensor, feat_t: torch.Tensor) -> torch.Tensor:
        if feat_s.shape[0] != feat_t.shape[0] or feat_s.shape[2:] != feat_t.shape[2:]:
            raise ValueError(f"PairWise: student features {tuple(feat_s.shape)} and teacher features "
                             f"{tuple(feat_t.shape)} need the same batch and spatial size")
        feat_t = _teacher(feat_t, self.detach_teacher)
        if self.pool_size is None:
            patch_h, patch_w = int(feat_t.shape[2] * self.scale), int(feat_t.shape[3] * self.scale)
        else:
            patch_h = patch_w = self.pool_size
        if patch_h < 1 or patch_w < 1:
            raise ValueError(f"PairWise: scale {self.scale} gives an empty pooling patch for a "
                             f"{feat_t.shape[2]}x{feat_t.shape[3]} feature map")
        kernel = (patch_h, patch_w)
        pooled_s = F.max_pool2d(feat_s, kernel, kernel, 0, ceil_mode=True)
        pooled_t = F.max_pool2d(feat_t, kernel, kernel, 0, ceil_mode=True)
        n = pooled_t.shape[-1] * pooled_t.shape[-2]
        err = (self.similarity(pooled_t) - self.similarity(pooled_s)).pow(2)
        return err.sum() / (n * n) / pooled_t.shape[0]


# ---- conference code (branch cvpr_19), skd_cvpr19.md §8 ------------------------------------------------


def upsample_bilinear(x: torch.Tensor, size) -> torch.Tensor:
    """Bilinear resize with ``align_corners=True`` (the conference code's only interpolation)."""
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)


class ConferenceCrossEntropy(nn.Module):
    """``CriterionCrossEntropy`` (§8): CE(upsample(z_S, label size), label), ignoring 255, no class weights
    (the original's optional weights are a 19-class Cityscapes vector)."""

    def __init__(self, ignore_index: int = 255):
        super().__init__()
        self.ignore_index = ignore_index

    def forward(self, logits_s: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits_s = full_precision(logits_s)
        if logits_s.shape[2:] != target.shape[1:]:
            logits_s = upsample_bilinear(logits_s, target.shape[1:])
        return F.cross_entropy(logits_s, target.long(), ignore_index=self.ignore_index)


class PixelWiseKD(nn.Module):
    """The conference ``CriterionKD`` (§8, pixel-wise KD): KLDiv(log_softmax(z_S/τ), softmax(up×8(z_T)/τ))
    with the elementwise-mean reduction of the legacy ``KLDivLoss()`` and no τ² factor.

    The teacher map is upsampled ×8 (bilinear, align_corners=True) — the original, for its stride-8 teachers;
    ``upsample_teacher=False`` uses a full-resolution teacher (an ESPNet) as it is, where the original would
    fail on the shape — and the student only if ``upsample``. With a full-resolution ESPNet student and a
    stride-8 teacher both end at input size.
    """

    def __init__(self, upsample: bool = False, temperature: float = 1.0, detach_teacher: bool = False,
                 upsample_teacher: bool = True):
        super().__init__()
        self.upsample = upsample
        self.temperature = temperature
        self.detach_teacher = detach_teacher
        self.upsample_teacher = upsample_teacher

    def forward(self, logits_s: torch.Tensor, logits_t: torch.Tensor) -> torch.Tensor:
        logits_s, logits_t = full_precision(logits_s), full_precision(_teacher(logits_t, self.detach_teacher))
        if self.upsample_teacher:
            logits_t = upsample_bilinear(logits_t, (logits_t.shape[2] * 8, logits_t.shape[3] * 8))
        if self.upsample:
            logits_s = upsample_bilinear(logits_s, (logits_s.shape[2] * 8, logits_s.shape[3] * 8))
        if logits_s.shape != logits_t.shape:
            raise ValueError(f"PixelWiseKD: student logits {tuple(logits_s.shape)} and the teacher logits "
                             f"{tuple(logits_t.shape)} differ in shape (set upsample for a 1/8 student)")
        log_p_s = F.log_softmax(logits_s / self.temperature, dim=1)
        p_t = F.softmax(logits_t / self.temperature, dim=1)
        return (torch.special.xlogy(p_t, p_t) - p_t * log_p_s).mean()


def cosine_matrix(feat: torch.Tensor) -> torch.Tensor:
    """B×N×N cosine similarities f_i·f_j / (‖f_i‖‖f_j‖) over the N = H·W positions (norms not detached;
    a zero vector's norm is clamped to 1e-12)."""
    feat = F.normalize(full_precision(feat).flatten(2), p=2, dim=1, eps=1e-12)
    with torch.autocast(feat.device.type, enabled=False):
        return torch.bmm(feat.transpose(1, 2), feat)


class PairWiseCos(nn.Module):
    """The conference pair-wise losses (§8) on full feature maps, MSE (mean) between S and T matrices.

    ``mode="softmax"``: ``CriterionSDcos`` (row softmax of the cosine matrix; the code's default);
    ``mode="raw"``: ``CriterionSDcos_no`` (the paper's form); ``mode="sigmoid"``: ``CriterionSDcos_sig``.
    Which list element is compared (features ``[1]`` or scores ``[0]`` for ``CriterionSDcos_no_sp``) is
    the caller's choice.
    """

    MODES = ("softmax", "raw", "sigmoid")

    def __init__(self, mode: str = "softmax", detach_teacher: bool = False):
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"PairWiseCos: mode must be one of {self.MODES}, got {mode!r}")
        self.mode = mode
        self.detach_teacher = detach_teacher

    def _graph(self, feat):
        a = cosine_matrix(feat)
        if self.mode == "softmax":
            return F.softmax(a, dim=2)
        if self.mode == "sigmoid":
            return torch.sigmoid(a)
        return a

    def forward(self, feat_s: torch.Tensor, feat_t: torch.Tensor) -> torch.Tensor:
        if feat_s.shape[0] != feat_t.shape[0] or feat_s.shape[2:] != feat_t.shape[2:]:
            raise ValueError(f"PairWiseCos: student features {tuple(feat_s.shape)} and teacher features "
                             f"{tuple(feat_t.shape)} need the same batch and spatial size")
        feat_t = _teacher(feat_t, self.detach_teacher)
        return F.mse_loss(self._graph(feat_s), self._graph(feat_t))

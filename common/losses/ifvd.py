"""IFVD's intra-class feature variation loss (specs/ifvd_skd.md §A.4.3), vectorised over classes."""
import torch
import torch.nn.functional as F
from torch import nn

from common.numerics import full_precision

__all__ = ["IntraClassFeatureVariation", "class_index", "class_prototypes", "downsample_labels", "pixel_cosine"]

PROTO_EPS = 1e-6  # the original's "+1e-6" in the prototype denominator (§A.4.3 step 3)


def downsample_labels(target, size):
    """Labels B×H×W -> B×h×w by legacy nearest interpolation (source index floor(dst·in/out), §A.4.3 step 2)."""
    return F.interpolate(target.unsqueeze(1).float(), size=size, mode="nearest").squeeze(1)


def class_index(labels, num_classes):
    """Labels B×h×w -> (valid B×N, index B×N): pixels with a label outside [0, C) go to an extra bin C."""
    labels = labels.flatten(1)
    valid = (labels >= 0) & (labels < num_classes)
    return valid, torch.where(valid, labels, num_classes).long()


def class_prototypes(feat, index, num_classes):
    """Per-image class prototypes B×C×(num_classes+1) (§A.4.3 step 3): ``Σ_{p: y=k} f / (#{y=k} + 1e-6)``.

    ``index`` comes from :func:`class_index`; the last column collects the pixels outside [0, num_classes)
    and is never used as a prototype.
    """
    b, c = feat.shape[:2]
    flat = feat.flatten(2)
    sums = flat.new_zeros(b, c, num_classes + 1).scatter_add_(2, index.unsqueeze(1).expand(b, c, -1), flat)
    counts = flat.new_zeros(b, num_classes + 1).scatter_add_(1, index, flat.new_ones(()).expand(index.shape))
    return sums / (counts + PROTO_EPS).unsqueeze(1)


def pixel_cosine(feat, valid, index, num_classes, eps=1e-8):
    """``nn.CosineSimilarity(dim=1, eps)(feat, center)``, B×h×w, with the original's "center map" (each pixel of
    class k replaced by ``proto_k``, every other pixel kept) never built.

    For a pixel of class k the cosine is ``f·proto_k / (max(‖f‖, eps)·max(‖proto_k‖, eps))``: the dot products
    come from one batched matmul against the prototypes and the prototype norms are computed once per class.
    A pixel outside [0, num_classes) is compared with itself, so its cosine is 1 (exactly, here).
    """
    flat = feat.flatten(2)
    protos = class_prototypes(feat, index, num_classes)
    dots = torch.bmm(protos.transpose(1, 2), flat).gather(1, index.unsqueeze(1)).squeeze(1)
    proto_norms = torch.linalg.vector_norm(protos, dim=1).clamp_min(eps).gather(1, index)
    feat_norms = torch.linalg.vector_norm(flat, dim=1).clamp_min(eps)
    cosine = torch.where(valid, dots / (feat_norms * proto_norms), 1.0)
    return cosine.view(feat.shape[0], *feat.shape[2:])


class IntraClassFeatureVariation(nn.Module):
    """``L_ifv = MSE(cos(f_S, center_S), cos(f_T, center_T))`` over all B·h·w pixels (§A.4.3).

    Faithful details: per-image, non-detached prototypes; ignored pixels keep their own feature (cosine 1
    for both maps) and still count in the mean; ``nn.CosineSimilarity(dim=1, eps=1e-8)``. The teacher map
    is detached explicitly (the original's ``feat_T.detach()`` was a no-op under ``no_grad``, §A.9 item 4).
    Half-precision (AMP) inputs are computed in float32, with autocast off. CIRKD's ``CriterionIFV``
    (specs/cirkd.md §3.7) is the same loss with ``ignore_index=-1``.
    """

    def __init__(self, num_classes=19, ignore_index=255):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index

    def forward(self, feat_s, feat_t, target):
        if feat_s.dim() != 4 or feat_t.dim() != 4:
            raise ValueError(f"IFV expects B×C×h×w features, got {tuple(feat_s.shape)} and {tuple(feat_t.shape)}")
        if feat_s.shape[0] != feat_t.shape[0] or feat_s.shape[2:] != feat_t.shape[2:]:
            raise ValueError(
                f"IFV needs student and teacher features with the same batch and spatial size, got "
                f"{tuple(feat_s.shape)} and {tuple(feat_t.shape)}"
            )
        if target.dim() != 3 or target.shape[0] != feat_s.shape[0]:
            raise ValueError(f"IFV expects B×H×W labels for batch {feat_s.shape[0]}, got {tuple(target.shape)}")
        feat_s, feat_t = full_precision(feat_s), full_precision(feat_t)
        with torch.autocast(feat_s.device.type, enabled=False):
            labels = downsample_labels(target, feat_s.shape[2:])
            valid, index = class_index(torch.where(labels == self.ignore_index, -1.0, labels), self.num_classes)
            sim_s = pixel_cosine(feat_s, valid, index, self.num_classes)
            sim_t = pixel_cosine(feat_t.detach(), valid, index, self.num_classes)
            return F.mse_loss(sim_s, sim_t)

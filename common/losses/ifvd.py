"""IFVD's intra-class feature variation loss (specs/ifvd_skd.md §A.4.3), vectorised over classes."""
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["IntraClassFeatureVariation", "downsample_labels", "class_center_map"]

PROTO_EPS = 1e-6  # the original's "+1e-6" in the prototype denominator (§A.4.3 step 3)


def downsample_labels(target, size):
    """Labels B×H×W -> B×h×w by legacy nearest interpolation (source index floor(dst·in/out), §A.4.3 step 2)."""
    return F.interpolate(target.unsqueeze(1).float(), size=size, mode="nearest").squeeze(1)


def class_center_map(feat, labels, num_classes):
    """Per-pixel class prototype ("center map") of ``feat`` B×C×h×w for labels B×h×w (§A.4.3 step 3).

    ``proto[b, :, k] = Σ_{p: y=k} f[b, :, p] / (#{p: y=k} + 1e-6)`` per image; each pixel with a label in
    [0, num_classes) gets its class's prototype, every other pixel (255, ≥ C) keeps its own feature.
    One scatter-add and one gather replace the original's loop over classes.
    """
    b, c = feat.shape[:2]
    flat = feat.flatten(2)
    labels = labels.flatten(1)
    valid = (labels >= 0) & (labels < num_classes)
    index = torch.where(valid, labels, torch.full_like(labels, num_classes)).long()  # bin C collects the rest
    index_c = index.unsqueeze(1).expand(b, c, index.shape[1])
    sums = flat.new_zeros(b, c, num_classes + 1).scatter_add_(2, index_c, flat)
    counts = flat.new_zeros(b, num_classes + 1).scatter_add_(1, index, flat.new_ones(index.shape))
    protos = sums / (counts + PROTO_EPS).unsqueeze(1)
    return torch.where(valid.unsqueeze(1), protos.gather(2, index_c), flat).view_as(feat)


def _full_precision(x):
    """Half-precision (AMP) features in float32: prototypes are sums over up to h·w pixels."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class IntraClassFeatureVariation(nn.Module):
    """``L_ifv = MSE(cos(f_S, center_S), cos(f_T, center_T))`` over all B·h·w pixels (§A.4.3).

    Faithful details: per-image, non-detached prototypes; ignored pixels keep their own feature (cosine 1
    for both maps) and still count in the mean; ``nn.CosineSimilarity(dim=1, eps=1e-8)``. The teacher map
    is detached explicitly (the original's ``feat_T.detach()`` was a no-op under ``no_grad``, §A.9 item 4).
    Half-precision (AMP) inputs are computed in float32.
    """

    def __init__(self, num_classes=19, ignore_index=255):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index

    def pixel_cosine(self, feat, labels):
        """Cosine of every pixel's feature to its class prototype, B×h×w."""
        return F.cosine_similarity(feat, class_center_map(feat, labels, self.num_classes), dim=1, eps=1e-8)

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
        feat_s, feat_t = _full_precision(feat_s), _full_precision(feat_t)
        labels = downsample_labels(target, feat_s.shape[2:])
        labels = torch.where(labels == self.ignore_index, torch.full_like(labels, -1), labels)
        sim_s = self.pixel_cosine(feat_s, labels)
        sim_t = self.pixel_cosine(feat_t.detach(), labels)
        return F.mse_loss(sim_s, sim_t)

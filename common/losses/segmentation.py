"""Task loss of the PSP lineage (ifvd_skd.md §A.4.1, §B.4.1; cwd.md §5.1) and of CIRKD (cirkd.md §3.1)."""
import torch.nn as nn
import torch.nn.functional as F

from common.numerics import full_precision


class CriterionDSN(nn.Module):
    """``CE(up(logits), y) + aux_weight * CE(up(aux_logits), y)``.

    Both logit maps are upsampled bilinearly (``align_corners=True``) to the label size; the
    cross-entropy ignores ``ignore_index`` and averages over the non-ignored pixels of the whole
    batch (NaN when every pixel is ignored, as in the original).

    Call as ``criterion((logits, aux_logits), target)``; a longer sequence (the model's output list)
    is accepted and only its first two entries are used. ``criterion((logits,), target)`` is CE(main) alone:
    CIRKD's ``SegCrossEntropyLoss`` for the mobile students (no aux head), with ``ignore_index=-1``.
    Half-precision logits are computed in float32.
    """

    def __init__(self, ignore_index=255, aux_weight=0.4):
        super().__init__()
        self.ignore_index = ignore_index
        self.aux_weight = aux_weight

    def forward(self, preds, target):
        target = target.long()
        size = target.shape[-2:]
        loss = F.cross_entropy(_up(full_precision(preds[0]), size), target, ignore_index=self.ignore_index)
        if len(preds) == 1:
            return loss
        aux_loss = F.cross_entropy(_up(full_precision(preds[1]), size), target, ignore_index=self.ignore_index)
        return loss + self.aux_weight * aux_loss


def _up(x, size):
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)

"""Task loss of the PSP lineage (specs/ifvd_skd.md §A.4.1, §B.4.1; specs/cwd.md §5.1)."""
import torch.nn as nn
import torch.nn.functional as F


class CriterionDSN(nn.Module):
    """``CE(up(logits), y) + aux_weight * CE(up(aux_logits), y)``.

    Both logit maps are upsampled bilinearly (``align_corners=True``) to the label size; the
    cross-entropy ignores ``ignore_index`` and averages over the non-ignored pixels of the whole
    batch (NaN when every pixel is ignored, as in the original).

    Call as ``criterion((logits, aux_logits), target)``; a longer sequence (the model's output list)
    is accepted and only its first two entries are used.
    """

    def __init__(self, ignore_index=255, aux_weight=0.4):
        super().__init__()
        self.ignore_index = ignore_index
        self.aux_weight = aux_weight

    def forward(self, preds, target):
        logits, aux = preds[0], preds[1]
        target = target.long()
        size = target.shape[-2:]
        loss = F.cross_entropy(_up(logits, size), target, ignore_index=self.ignore_index)
        aux_loss = F.cross_entropy(_up(aux, size), target, ignore_index=self.ignore_index)
        return loss + self.aux_weight * aux_loss


def _up(x, size):
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)

"""Dataset-level segmentation metrics.

`ConfusionMatrix` is the PSP-lineage metric of IFVD/SKD/CWD (ifvd_skd.md §C.6, cwd.md §7) and of the SKD
CVPR'19 CamVid eval (skd_cvpr19.md §6); its `absent="nan"` variants are AICSD's (aicsd.md §7).
`SegmentationMetric` is CIRKD's `utils/score.py` with its quirks behind flags (cirkd.md §5.3).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

CIRKD_EPS = 2.220446049250313e-16


def _as_tensor(x) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x


def _all_reduce_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` in place over all ranks; a no-op without an initialised process group of size > 1."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    if dist.get_backend() == "nccl":
        buf = tensor.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        tensor.copy_(buf.cpu())
    else:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


class ConfusionMatrix:
    """C×C float64 confusion matrix accumulated over a whole split (rows = ground truth, columns = prediction).

    `update` is the vectorised form of the originals' `get_confusion_matrix` (bincount of gt·C + pred): pixels
    whose ground truth equals `ignore_index` are dropped, and so is every ground truth outside [0, C), which is
    what the originals' "keep flat indices < C²" does (e.g. CamVid void = 11 with 11 classes, skd_cvpr19.md §6.5).
    """

    def __init__(self, num_classes: int, ignore_index: int = 255):
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(self.num_classes, self.num_classes, dtype=torch.float64)

    def reset(self) -> None:
        self.matrix.zero_()

    def update(self, gt, pred) -> None:
        """Add one or more images; `gt` and `pred` are integer-valued arrays/tensors of the same shape."""
        gt = _as_tensor(gt).reshape(-1).to(torch.int64)
        pred = _as_tensor(pred).reshape(-1).to(device=gt.device, dtype=torch.int64)
        if gt.numel() != pred.numel():
            raise ValueError(f"ground truth has {gt.numel()} pixels but the prediction has {pred.numel()}")
        c = self.num_classes
        keep = (gt != self.ignore_index) & (gt >= 0) & (gt < c) & (pred >= 0) & (pred < c)
        counts = torch.bincount(gt[keep] * c + pred[keep], minlength=c * c)
        self.matrix += counts.reshape(c, c).to(device="cpu", dtype=torch.float64)

    def all_reduce(self) -> ConfusionMatrix:
        """Sum the matrix over torch.distributed ranks (no-op when not distributed)."""
        _all_reduce_(self.matrix)
        return self

    @property
    def array(self) -> np.ndarray:
        return self.matrix.numpy().copy()

    def iou(self, absent: str = "zero") -> np.ndarray:
        """Per-class IoU = TP / max(1, GT_c + Pred_c − TP) (§C.6).

        `absent="nan"` gives NaN for an empty union instead (AICSD, aicsd.md §7).
        """
        m = self.matrix.numpy()
        tp = np.diag(m)
        union = m.sum(1) + m.sum(0) - tp
        if absent == "zero":
            return tp / np.maximum(1.0, union)
        if absent == "nan":
            with np.errstate(divide="ignore", invalid="ignore"):
                return np.where(union > 0, tp / np.where(union > 0, union, 1.0), np.nan)
        raise ValueError(f"absent must be 'zero' or 'nan', got {absent!r}")

    def miou(self, absent: str = "zero") -> float:
        """Plain mean over all C classes (§C.6: an empty class counts 0); `absent="nan"` is AICSD's nanmean."""
        iou = self.iou(absent)
        return float(np.nanmean(iou)) if absent == "nan" else float(iou.mean())

    def pixel_acc(self) -> float:
        """trace / total of the scored pixels (AICSD "Pixel Acc"; derived for the PSP lineage, skd_cvpr19.md §9)."""
        total = float(self.matrix.sum())
        return float(torch.trace(self.matrix)) / total if total > 0 else 0.0

    def class_acc(self) -> np.ndarray:
        """Per-class recall TP / GT_c; NaN for classes absent from the ground truth."""
        m = self.matrix.numpy()
        gt = m.sum(1)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(gt > 0, np.diag(m) / np.where(gt > 0, gt, 1.0), np.nan)

    def mean_acc(self) -> float:
        """AICSD "Acc class": nanmean over classes present in the ground truth (aicsd.md §7)."""
        acc = self.class_acc()
        return float(np.nanmean(acc)) if np.isfinite(acc).any() else 0.0

    def fwiou(self) -> float:
        """AICSD FWIoU: Σ_c freq_c · IoU_c over classes with freq_c > 0 (aicsd.md §7)."""
        m = self.matrix.numpy()
        total = m.sum()
        if total == 0:
            return 0.0
        freq = m.sum(1) / total
        iou = self.iou("nan")
        keep = freq > 0
        return float((freq[keep] * np.nan_to_num(iou[keep])).sum())


class SegmentationMetric:
    """CIRKD's `SegmentationMetric` (cirkd.md §5.3), vectorised per batch; `update(logits, target)`.

    Faithful defaults (the quirks): the ignore label is −1 (`target + 1 > 0` marks labelled pixels, so 255 would
    be counted); pixAcc takes the argmax of the logits **truncated to integers** (`truncate_logits=True`);
    classes absent from both prediction and ground truth count 0 in mIoU (`absent_as_zero=True`); the sums are
    float32 tensors as in the original (`float64=False`). Each flag switches to the corrected form.
    """

    def __init__(self, num_class: int, truncate_logits: bool = True, absent_as_zero: bool = True,
                 float64: bool = False):
        self.nclass = int(num_class)
        self.truncate_logits = truncate_logits
        self.absent_as_zero = absent_as_zero
        self.dtype = torch.float64 if float64 else torch.float32
        self.reset()

    def reset(self) -> None:
        self.total_inter = torch.zeros(self.nclass, dtype=self.dtype)
        self.total_union = torch.zeros(self.nclass, dtype=self.dtype)
        self.total_correct = torch.zeros((), dtype=self.dtype)
        self.total_label = torch.zeros((), dtype=self.dtype)

    def update(self, preds, labels) -> None:
        """`preds`: logits N×K×H×W (a list/tuple of them is accepted as the original); `labels`: N×H×W."""
        for logits, target in zip(*((preds, labels) if isinstance(preds, (list, tuple)) else ([preds], [labels]))):
            self._update(logits.detach(), target.to(logits.device))

    def _update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        target = target.long() + 1
        labelled = target > 0
        acc_pred = torch.argmax(logits.long() if self.truncate_logits else logits, 1) + 1
        self.total_correct += ((acc_pred == target) & labelled).sum().to("cpu", self.dtype)
        self.total_label += labelled.sum().to("cpu", self.dtype)

        pred = (torch.argmax(logits, 1) + 1).float() * labelled.float()
        target = target.float()
        inter = pred * (pred == target).float()
        k = self.nclass
        area_inter = torch.histc(inter.cpu(), bins=k, min=1, max=k)
        area_pred = torch.histc(pred.cpu(), bins=k, min=1, max=k)
        area_lab = torch.histc(target.cpu(), bins=k, min=1, max=k)
        self.total_inter += area_inter.to(self.dtype)
        self.total_union += (area_pred + area_lab - area_inter).to(self.dtype)

    def all_reduce(self) -> SegmentationMetric:
        """Sum (correct, labelled, inter[K], union[K]) over ranks, as CIRKD's trainers do (§5.1)."""
        flat = torch.cat([self.total_correct.view(1), self.total_label.view(1), self.total_inter, self.total_union])
        _all_reduce_(flat)
        self.total_correct, self.total_label = flat[0].clone(), flat[1].clone()
        self.total_inter, self.total_union = flat[2:2 + self.nclass].clone(), flat[2 + self.nclass:].clone()
        return self

    def iou(self) -> np.ndarray:
        inter, union = self.total_inter, self.total_union
        if self.absent_as_zero:
            return (1.0 * inter / (CIRKD_EPS + union)).numpy()
        return torch.where(union > 0, inter / union.clamp_min(1), torch.full_like(union, float("nan"))).numpy()

    def get(self) -> tuple[float, float]:
        """(pixAcc, mIoU) with the original's ε = 2.22e-16 denominators."""
        pix_acc = float(self.total_correct) / (CIRKD_EPS + float(self.total_label))
        iou = self.iou()
        miou = float(iou.mean()) if self.absent_as_zero else float(np.nanmean(iou))
        return pix_acc, miou

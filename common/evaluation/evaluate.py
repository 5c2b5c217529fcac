"""`evaluate_main`: the PSP-lineage evaluation loop (ifvd_skd.md §C.6, cwd.md §7), batch- and device-agnostic.

Defaults are the originals': whole image, scale 1.0, no flip, logits upsampled bilinearly (align_corners=True)
and argmax'ed, one dataset-level confusion matrix, IoU = TP / max(1, union), mIoU = mean over all classes.
"""
from __future__ import annotations

import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from common.errors import UserError
from common.evaluation.export import save_test_prediction
from common.evaluation.inference import predict_multiscale
from common.evaluation.metrics import ConfusionMatrix, SegmentationMetric, _all_reduce_
from common.evaluation.palette import resolve_palette, save_prediction_png
from common.numerics import compute_dtype


@dataclass
class EvalResult:
    """Metrics are fractions in [0, 1] as the originals print them; all None in test mode (no labels)."""

    miou: float | None
    iou: np.ndarray | None
    pixel_acc: float | None
    mean_acc: float | None
    confusion: np.ndarray | None
    num_images: int
    seconds: float
    images_per_s: float
    peak_mem_mb: float

    def result_fields(self) -> dict:
        """The metric/speed fields of `results.json` (common/tables/schema.py)."""
        return {
            "miou": self.miou,
            "iou": None if self.iou is None else [None if np.isnan(v) else float(v) for v in self.iou],
            "pixel_acc": self.pixel_acc,
            "mean_acc": self.mean_acc,
            "wall_time_s": self.seconds,
            "images_per_s": self.images_per_s,
            "peak_mem_mb": self.peak_mem_mb,
        }


def _peak_mem_mb(device: torch.device) -> float:
    """CUDA: peak allocated by torch on `device`; CPU: the process's peak resident set size (ru_maxrss)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _unpack(batch, mode: str):
    if mode == "val":
        if len(batch) < 4:
            raise UserError("the val loader must yield (image, label, size, name); "
                            "use a labelled list with --data-list")
        image, label, size, name = batch[:4]
        return image, label, size, name
    image, size, name = batch[:3]
    return image, None, size, name


def evaluate_main(model, loader, *, num_classes: int = 19, device="cpu", input_size: Sequence[int] | None = None,
                  whole: bool = True, scales: Sequence[float] = (1.0,), flip: bool = False, ignore_label: int = 255,
                  mode: str = "val", output_dir=None, progress: bool = True, tile_size: Sequence[int] = (512, 512),
                  align_corners: bool = True, palette: str | list[int] | None = "voc",
                  test_export: Callable | None = save_test_prediction, metric: str = "confusion",
                  absent: str = "zero") -> EvalResult:
    """Evaluate `model` over `loader` (§C.6).

    `input_size`: the fixed size logits are upsampled to (the Cityscapes entry points pass (1024, 2048) as the
    originals); None = the label size (val) or image size (test). Prediction and label are then cropped to the
    per-image `size` before scoring. `output_dir`: write `<name>.png` per image with `palette` ("voc" = the
    originals' default, "cityscapes", None = grayscale, or a flat RGB list); in test
    mode `test_export` maps trainIds to labelIds first (Cityscapes server format). Under torch.distributed the
    metric sums and the image count are summed over ranks.

    `metric="confusion"`: the confusion matrix of §C.6; `absent="nan"` makes mIoU AICSD's nanmean (aicsd.md §7).
    `metric="cirkd"`: CIRKD's `SegmentationMetric` on the (averaged, upsampled) logits, ignore label −1, with its
    quirks (cirkd.md §5.3); `mean_acc` and `confusion` are then None, as CIRKD computes neither.
    The model runs in eval mode under no_grad and is put back in its previous mode afterwards.
    """
    if mode not in ("val", "test"):
        raise UserError(f"evaluation mode must be 'val' or 'test', got {mode!r}")
    if metric not in ("confusion", "cirkd"):
        raise UserError(f"evaluation metric must be 'confusion' or 'cirkd', got {metric!r}")
    if absent not in ("zero", "nan"):
        raise UserError(f"absent-class policy must be 'zero' or 'nan', got {absent!r}")
    device = torch.device(device)
    palette = resolve_palette(palette)
    out_dir = Path(output_dir) if output_dir is not None else None
    confusion = ConfusionMatrix(num_classes, ignore_label)
    cirkd_metric = SegmentationMetric(num_classes) if metric == "cirkd" else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    is_main = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    iterator = loader
    if progress and is_main:
        iterator = tqdm(loader, desc=f"eval ({mode})", unit="batch", dynamic_ncols=True)

    was_training = model.training
    model.eval()
    num_images = 0
    start = time.perf_counter()
    with torch.no_grad():
        for batch in iterator:
            image, label, size, names = _unpack(batch, mode)
            image = image.to(device, compute_dtype(), non_blocking=True)
            out_size = tuple(input_size) if input_size is not None else tuple(
                (label if label is not None else image).shape[-2:])
            logits = predict_multiscale(model, image, out_size, scales, flip, whole, tile_size, align_corners)
            preds = logits.argmax(1).to(torch.uint8).cpu()
            size = torch.as_tensor(size).reshape(len(names), -1)
            for b, name in enumerate(names):
                h, w = int(size[b, 0]), int(size[b, 1])
                pred = preds[b, :h, :w]
                if cirkd_metric is not None and label is not None:
                    cirkd_metric.update(logits[b:b + 1, :, :h, :w], label[b:b + 1, :h, :w])
                elif label is not None:
                    confusion.update(label[b, :h, :w], pred)
                if out_dir is not None:
                    path = out_dir / f"{name}.png"
                    if mode == "test" and test_export is not None:
                        test_export(pred.numpy(), path, palette)
                    else:
                        save_prediction_png(pred.numpy(), path, palette)
            num_images += len(names)
    seconds = time.perf_counter() - start
    model.train(was_training)

    count = _all_reduce_(torch.tensor([float(num_images)], dtype=torch.float64))
    num_images = int(count.item())
    kwargs = dict(num_images=num_images, seconds=seconds, images_per_s=num_images / max(seconds, 1e-12),
                  peak_mem_mb=_peak_mem_mb(device))
    if mode == "test":
        return EvalResult(miou=None, iou=None, pixel_acc=None, mean_acc=None, confusion=None, **kwargs)
    if cirkd_metric is not None:
        pix_acc, miou = cirkd_metric.all_reduce().get()
        return EvalResult(miou=miou, iou=cirkd_metric.iou().astype(np.float64), pixel_acc=pix_acc, mean_acc=None,
                          confusion=None, **kwargs)
    confusion.all_reduce()
    return EvalResult(miou=confusion.miou(absent), iou=confusion.iou(absent), pixel_acc=confusion.pixel_acc(),
                      mean_acc=confusion.mean_acc(), confusion=confusion.array, **kwargs)


def write_results_json(path, **fields) -> Path:
    """Validate `fields` against the results schema and write them atomically (common/tables/schema.py)."""
    from common.tables.schema import make_result, write_results

    return write_results(path, make_result(**fields))

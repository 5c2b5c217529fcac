"""Whole-image, sliding-window, multi-scale and flip inference (ifvd_skd.md §C.6, cirkd.md §5.2).

All predictors return raw logits N×C×H×W (never probabilities): the originals average logits over scales
and flips. Upsampling is bilinear with `align_corners=True`, as in every original.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from common.outputs import first_output as main_logits


def predict_whole(model, image: torch.Tensor, size: Sequence[int], align_corners: bool = True) -> torch.Tensor:
    """Forward the whole image and upsample the main logits to `size` (§C.6 `predict_whole`)."""
    logits = main_logits(model(image))
    if tuple(logits.shape[-2:]) != tuple(size):
        logits = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=align_corners)
    return logits


def sliding_grid(height: int, width: int, tile: Sequence[int], overlap: float = 1.0 / 3.0) -> list[tuple[int, ...]]:
    """Tile boxes (y1, y2, x1, x2) of the original `predict_sliding` (§C.6): stride = ceil(tile_h·(1−overlap)),
    rows = ceil((H − tile_h)/stride) + 1 (at least 1), border tiles shifted back inside the image."""
    th, tw = tile
    stride = math.ceil(th * (1 - overlap))
    rows = max(1, int(math.ceil((height - th) / stride) + 1))
    cols = max(1, int(math.ceil((width - tw) / stride) + 1))
    boxes = []
    for r in range(rows):
        for c in range(cols):
            x1, y1 = c * stride, r * stride
            x2, y2 = min(x1 + tw, width), min(y1 + th, height)
            x1, y1 = max(x2 - tw, 0), max(y2 - th, 0)
            boxes.append((y1, y2, x1, x2))
    return boxes


def predict_sliding(model, image: torch.Tensor, tile_size: Sequence[int] = (512, 512), overlap: float = 1.0 / 3.0,
                    align_corners: bool = True) -> torch.Tensor:
    """Sliding-window logits at the image size (§C.6 `predict_sliding`).

    Each tile is zero-padded bottom/right to `tile_size`, predicted, upsampled to the tile size, cropped to its
    valid part; overlapping logits are summed and divided by the per-pixel count.
    """
    n, _, h, w = image.shape
    full = count = None
    for y1, y2, x1, x2 in sliding_grid(h, w, tile_size, overlap):
        tile = image[:, :, y1:y2, x1:x2]
        pad = (0, tile_size[1] - tile.shape[3], 0, tile_size[0] - tile.shape[2])
        pred = predict_whole(model, F.pad(tile, pad), tile_size, align_corners)[:, :, : y2 - y1, : x2 - x1]
        if full is None:
            full = pred.new_zeros(n, pred.shape[1], h, w)
            count = pred.new_zeros(1, 1, h, w)
        full[:, :, y1:y2, x1:x2] += pred
        count[:, :, y1:y2, x1:x2] += 1
    return full / count


def scaled_size(height: int, width: int, scale: float, rounding: str = "round") -> tuple[int, int]:
    """The size of an image rescaled by `scale`: `round(H·s)` as `scipy.ndimage.zoom` of the PSP lineage
    (ifvd_skd.md §C.6) or, with `rounding="floor"`, `floor(H·s)` as CIRKD's `F.interpolate(scale_factor=s)`
    (cirkd.md §5.2)."""
    if rounding == "round":
        return int(round(height * scale)), int(round(width * scale))
    if rounding == "floor":
        return math.floor(height * scale), math.floor(width * scale)
    raise ValueError(f"rounding must be 'round' or 'floor', got {rounding!r}")


def resize_image(image: torch.Tensor, scale: float, rounding: str = "round") -> torch.Tensor:
    """Rescale by `scale` to :func:`scaled_size`, bilinear with aligned corners (scipy's `zoom(order=1,
    prefilter=False)` of the PSP lineage; CIRKD's `F.interpolate`, cirkd.md §5.2); 1.0 is the identity."""
    if scale == 1.0:
        return image
    size = scaled_size(*image.shape[-2:], scale, rounding)
    return F.interpolate(image, size=size, mode="bilinear", align_corners=True)


def predict_multiscale(model, image: torch.Tensor, size: Sequence[int] | None = None, scales: Sequence[float] = (1.0,),
                       flip: bool = False, whole: bool = True, tile_size: Sequence[int] = (512, 512),
                       align_corners: bool = True, rounding: str = "round") -> torch.Tensor:
    """Average of logits over `scales` (and the horizontal flip) at output `size` (§C.6 `predict_multiscale`).

    Flip: 0.5·(p + flip(p(flip(x)))) per scale, then the mean over scales. With `whole=False` every scaled image
    is predicted with the sliding window and resized to `size` (the originals use single-scale sliding only).
    `rounding`: the scaled image size of :func:`scaled_size` ("floor" for CIRKD).
    """
    size = tuple(size) if size is not None else tuple(image.shape[-2:])

    def one(x: torch.Tensor) -> torch.Tensor:
        if whole:
            return predict_whole(model, x, size, align_corners)
        logits = predict_sliding(model, x, tile_size, align_corners=align_corners)
        if tuple(logits.shape[-2:]) != size:
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=align_corners)
        return logits

    full = None
    for scale in scales:
        x = resize_image(image, float(scale), rounding)
        probs = one(x)
        if flip:
            probs = 0.5 * (probs + one(x.flip(-1)).flip(-1))
        full = probs if full is None else full + probs
    return full / len(scales)

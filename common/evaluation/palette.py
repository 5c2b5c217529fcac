"""Prediction palettes and PNG writing (ifvd_skd.md §C.6 "Saving", skd_cvpr19.md §6.4, cirkd.md §1.5-1.6)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common.io import atomic_open

# The 19 Cityscapes trainId colours (road, sidewalk, ..., bicycle), as used by the SKD CVPR'19 CamVid eval
# (skd_cvpr19.md §6.4: CamVid class k is drawn in Cityscapes colour k) and by CIRKD's --save-pred for Cityscapes.
CITYSCAPES_COLORS = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
)
CIRKD_SKY = (0, 130, 180)  # CIRKD's utils/visualize.py draws sky (trainId 10) in (0, 130, 180), not (70, 130, 180)


def get_palette(num_cls: int = 256) -> list[int]:
    """PASCAL-VOC bit-interleaved palette as a flat [r0, g0, b0, r1, ...] list (§C.6; the originals' `get_palette`).

    Class j takes bits (0,1,2), (3,4,5), ... of j for R, G, B, written MSB-first: 1 -> (128,0,0), 8 -> (64,0,0).
    """
    j = np.arange(num_cls)
    pal = np.zeros((num_cls, 3), dtype=np.int64)
    for i in range(8):
        for ch in range(3):
            pal[:, ch] |= ((j >> (3 * i + ch)) & 1) << (7 - i)
    return pal.reshape(-1).tolist()


def cityscapes_palette(sky: tuple[int, int, int] | None = None) -> list[int]:
    """The 19 Cityscapes colours, zero-padded to 256 entries (flat list); ``sky`` replaces the colour of trainId 10
    (CIRKD: :data:`CIRKD_SKY`)."""
    colors = list(CITYSCAPES_COLORS)
    if sky is not None:
        colors[10] = tuple(sky)
    flat = [c for rgb in colors for c in rgb]
    return flat + [0] * (256 * 3 - len(flat))


def jet_r_palette() -> list[int]:
    """matplotlib's ``jet_r`` colormap sampled at 256 levels, class k -> entry k as matplotlib's bytes (CIRKD's
    colours for COCO-Stuff predictions)."""
    from matplotlib import colormaps

    return colormaps["jet_r"].resampled(256)(np.arange(256), bytes=True)[:, :3].reshape(-1).tolist()


def resolve_palette(palette: str | list[int] | None) -> list[int] | None:
    """"voc" (§C.6 default), "cityscapes", "cirkd_cityscapes" (sky (0, 130, 180)), "jet_r", None (grayscale) or a
    flat RGB list, as a flat list or None."""
    if palette is None or isinstance(palette, (list, tuple)):
        return None if palette is None else list(palette)
    if palette == "voc":
        return get_palette(256)
    if palette == "cityscapes":
        return cityscapes_palette()
    if palette == "cirkd_cityscapes":
        return cityscapes_palette(sky=CIRKD_SKY)
    if palette == "jet_r":
        return jet_r_palette()
    raise ValueError(f"palette must be 'voc', 'cityscapes', 'cirkd_cityscapes', 'jet_r', None or a list of RGB "
                     f"values, got {palette!r}")


def save_prediction_png(pred, path, palette: list[int] | None = None) -> Path:
    """Write `pred` (H×W class indices < 256) as an 8-bit PNG, atomically.

    With a palette it is a P-mode image (the originals' `putpalette`); with `palette=None` it is grayscale
    (CIRKD's test-server export, cirkd.md §1.6).
    """
    if isinstance(pred, torch.Tensor):
        pred = pred.detach().cpu().numpy()
    pred = np.asarray(pred)
    if pred.ndim != 2 or pred.size and (pred.min() < 0 or pred.max() > 255):
        raise ValueError(f"prediction must be an H×W array of values in [0, 255], got shape {pred.shape}")
    img = Image.fromarray(pred.astype(np.uint8), mode="L")
    if palette is not None:
        img = img.convert("P")
        img.putpalette(palette)
    path = Path(path)
    with atomic_open(path, "wb") as fh:
        img.save(fh, format="PNG")
    return path

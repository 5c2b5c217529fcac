"""Cityscapes test-server export: trainId predictions -> labelId PNGs (ifvd_skd.md §C.6, cirkd.md §1.6)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from common.datasets.cityscapes import trainid_to_labelid
from common.evaluation.palette import save_prediction_png

__all__ = ["trainid_to_labelid", "save_test_prediction"]


def save_test_prediction(pred, path, palette: list[int] | None = None) -> Path:
    """Map trainIds (0..18) to labelIds and write the PNG.

    The PSP lineage writes a P-mode PNG with the VOC palette (§C.6); CIRKD writes plain 8-bit grayscale
    (`palette=None`). The pixel values, which the server reads, are the labelIds in both cases.
    """
    if not isinstance(pred, np.ndarray):
        pred = pred.detach().cpu().numpy()
    return save_prediction_png(trainid_to_labelid(pred), path, palette)

"""Datasets: Cityscapes (original list files), PASCAL VOC (+SBD aug), lineage presets, synthetic data.

Names are resolved lazily (PEP 562) so ``python -m common.datasets.cityscapes`` runs without the
module being imported twice.
"""
import importlib

_EXPORTS = {
    "ID_TO_TRAINID": "cityscapes", "IMG_MEAN_BGR": "cityscapes", "CSTestSet": "cityscapes",
    "CSTrainValSet": "cityscapes", "default_list": "cityscapes", "label_to_trainid": "cityscapes",
    "read_list": "cityscapes", "trainid_to_labelid": "cityscapes", "PRESETS": "transforms",
    "build_transform": "transforms", "VOCDataSet": "voc", "make_cityscapes": "synthetic", "make_camvid": "synthetic",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"common.datasets.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'common.datasets' has no attribute '{name}'")

"""Datasets: Cityscapes (original list files), CamVid, PASCAL VOC (+SBD), ADE20K, COCO-Stuff-164K, the lineage
presets (transforms), the per-lineage catalogue and synthetic data.

Names are resolved lazily (PEP 562) so ``python -m common.datasets.cityscapes`` runs without the
module being imported twice.
"""
import importlib

_EXPORTS = {
    "ID_TO_TRAINID": "cityscapes", "CSTestSet": "cityscapes", "CSTrainValSet": "cityscapes",
    "CityscapesSegmentation": "cityscapes", "cirkd_cityscapes": "cityscapes", "default_list": "cityscapes",
    "label_to_trainid": "cityscapes", "read_list": "cityscapes", "trainid_to_labelid": "cityscapes",
    "IMG_MEAN_BGR": "transforms", "IMAGENET_MEAN_RGB": "transforms", "IMAGENET_STD_RGB": "transforms",
    "PRESETS": "transforms", "build_transform": "transforms",
    "CamVidLight": "camvid", "CamVidSet": "camvid", "VOCDataSet": "voc", "VOCSegmentation": "voc",
    "ADE20KSet": "ade20k", "COCOStuffSet": "coco_stuff",
    "cirkd_dataset": "catalog", "aicsd_dataset": "catalog",
    "make_cityscapes": "synthetic", "make_camvid": "synthetic", "make_voc": "synthetic", "make_ade20k": "synthetic",
    "make_coco_stuff": "synthetic",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"common.datasets.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'common.datasets' has no attribute '{name}'")

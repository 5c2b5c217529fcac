"""The datasets of each lineage by their original ``--dataset`` names (cirkd.md §1.2, §4; aicsd.md §2.1, §5).

``cirkd_dataset(name, root, split, ...)`` and ``aicsd_dataset(name, root, split, ...)`` build the loader a
user's real copy goes through; ``NUM_CLASSES`` and ``EVAL_SPLITS`` hold what the entry points need to know.
"""
from common.datasets.ade20k import ADE20KSet
from common.datasets.camvid import CamVidSet
from common.datasets.cityscapes import CityscapesSegmentation, cirkd_cityscapes
from common.datasets.coco_stuff import COCOStuffSet
from common.datasets.transforms import build_transform
from common.datasets.voc import VOCDataSet, VOCSegmentation
from common.errors import UserError

CIRKD_NUM_CLASSES = {"citys": 19, "voc": 21, "camvid": 11, "ade20k": 150, "coco_stuff_164k": 182}
# The train split of each dataset and the split CIRKD's eval.py reports (§1.5: CamVid on its test list).
CIRKD_TRAIN_SPLITS = {"citys": "train", "voc": "train_aug", "camvid": "train", "ade20k": "train",
                      "coco_stuff_164k": "train"}
CIRKD_EVAL_SPLITS = {"citys": "val", "voc": "val", "camvid": "test", "ade20k": "val", "coco_stuff_164k": "val"}
# Crops of CIRKD's per-dataset scripts (§1.7; the --crop-size default 512 1024 is Cityscapes').
CIRKD_CROPS = {"citys": (512, 1024), "voc": (512, 512), "camvid": (360, 360), "ade20k": (512, 512),
               "coco_stuff_164k": (512, 512)}
AICSD_NUM_CLASSES = {"pascal": 21, "cityscapes": 19}


def _choice(name, table, flag="--dataset"):
    if name not in table:
        raise UserError(f"unknown {flag} '{name}'; choose one of {', '.join(table)}")


def cirkd_dataset(name, root, split, *, list_path=None, max_iters=None, crop_size=None):
    """CIRKD's dataset ``name`` (``citys|voc|camvid|ade20k|coco_stuff_164k``) for ``split``.

    Training splits (those of :data:`CIRKD_TRAIN_SPLITS`, and ``trainval``) are augmented with the ``cirkd``
    preset at ``crop_size`` (default :data:`CIRKD_CROPS`) and sized to ``max_iters`` samples; other splits give
    full images. ``list_path`` replaces the shipped list (ADE20K has none: it lists its folder).
    """
    _choice(name, CIRKD_NUM_CLASSES)
    crop = crop_size or CIRKD_CROPS[name]
    if name == "citys":
        return cirkd_cityscapes(root, split, list_path=list_path, max_iters=max_iters, crop_size=crop)
    if name == "voc":
        return VOCDataSet(root, split, list_path=list_path, max_iters=max_iters, crop_size=crop)
    if name == "camvid":
        return CamVidSet(root, split, list_path=list_path, max_iters=max_iters, crop_size=crop)
    if name == "ade20k":
        if list_path is not None:
            raise UserError("ADE20K is read from its image folder, not a list; drop --data-list")
        return ADE20KSet(root, split, max_iters=max_iters, crop_size=crop)
    return COCOStuffSet(root, split, list_path=list_path, max_iters=max_iters, crop_size=crop)


def aicsd_dataset(name, root, split, *, use_sbd=False, sbd_root=None, base_size=513, crop_size=513,
                  layout="auto"):
    """AICSD's dataset ``name`` (``pascal|cityscapes``; ``coco`` is not rebuilt, as upstream) for ``split``.

    Training uses the ``aicsd`` preset with mask fill 0 (VOC) or 255 (Cityscapes); val resizes the short side
    to ``crop_size``. ``use_sbd``/``sbd_root``: VOC train + SBD; ``layout``: the Cityscapes folder layout.
    """
    if name == "coco":
        raise UserError("--dataset coco is not available: the AICSD code raises NotImplementedError for it too; "
                        "use pascal or cityscapes")
    _choice(name, AICSD_NUM_CLASSES)
    train = split == "train"
    fill = 0 if name == "pascal" else 255
    transform = (build_transform("aicsd", True, base_size=base_size, crop_size=crop_size, fill=fill) if train
                 else build_transform("aicsd", False, crop_size=crop_size))
    if name == "pascal":
        return VOCSegmentation(root, split, transform=transform, use_sbd=use_sbd, sbd_root=sbd_root)
    if use_sbd:
        raise UserError("--use-sbd extends PASCAL VOC only; drop it for --dataset cityscapes")
    return CityscapesSegmentation(root, split, transform=transform, layout=layout)

"""COCO-Stuff-164K in CIRKD's convention (cirkd.md §4.2).

Layout under the root: ``images/{train2017,val2017}/<id>.jpg`` and ``annotations/{train2017,val2017}/<id>.png``
(the stuffthingmaps: 0..181 = the 182 classes, 255 = unlabelled). CIRKD's id lists are shipped
(``lists/coco_stuff_164k/coco_stuff_164k_{train,val}.txt``, 118287 / 5000 ids). Labels: 255 -> ignore (-1).
Images: OpenCV BGR, the ``cirkd`` preset (scale 0.5..2.0, crop 512x512, flip; val = the full image).
"""
from pathlib import Path

from common.datasets.base import (
    SegmentationSet,
    check_files,
    check_values,
    label_table,
    read_gray,
    read_list,
    repeat,
    require_dirs,
)
from common.datasets.transforms import build_transform
from common.errors import UserError

NUM_CLASSES = 182
SPLIT_DIRS = {"train": "train2017", "val": "val2017"}
LIST_DIR = Path(__file__).resolve().parent / "lists" / "coco_stuff_164k"
_LUT, _VALID = label_table({k: k for k in range(NUM_CLASSES)}, valid_ignored=(255,))


def read_coco_stuff_label(path):
    """stuffthingmap PNG (0..181, 255) -> uint8 classes with 255 = ignore; other values raise a UserError."""
    label = read_gray(path)
    check_values(label, _VALID, path, "COCO-Stuff class (0..181) or unlabelled (255)")
    return _LUT[label]


class COCOStuffSet(SegmentationSet):
    """CIRKD's COCO-Stuff-164K: ``(image f32 3xhxw, label f32 hxw, np.array(size), name)``, 182 classes.

    ``split`` (train/val) picks the shipped id list (``list_path`` overrides it) and the image folder;
    training gets the ``cirkd`` preset with ``crop_size`` and the list repeated and truncated to ``max_iters``.
    """

    def __init__(self, root, split="train", list_path=None, max_iters=None, crop_size=(512, 512)):
        if split not in SPLIT_DIRS:
            raise UserError(f"unknown COCO-Stuff split '{split}'; choose train or val")
        folder = SPLIT_DIRS[split]
        require_dirs(root, [f"images/{folder}", f"annotations/{folder}"], "COCO-Stuff-164K",
                     f"pass the folder holding images/{folder}/ and annotations/{folder}/")
        list_path = list_path or LIST_DIR / f"coco_stuff_164k_{split}.txt"
        root = Path(root)
        files = [(str(root / "images" / folder / f"{i}.jpg"), str(root / "annotations" / folder / f"{i}.png"), i)
                 for i in (fields[0] for _, fields in read_list(list_path, {1}, "COCO-Stuff"))]
        check_files(files, f"listed in {list_path}", f"check the COCO-Stuff root {root} or pass your own list")
        train = split == "train"
        files = repeat(files, max_iters) if train else files
        transform = build_transform("cirkd", True, crop_size=crop_size) if train else build_transform("cirkd", False)
        super().__init__(files, transform, read_coco_stuff_label)

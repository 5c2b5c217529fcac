"""ADE20K (ADEChallengeData2016) in CIRKD's convention (cirkd.md §4.2).

Layout under the root: ``images/{training,validation}/*.jpg`` and ``annotations/{training,validation}/<stem>.png``
(0 = other, 1..150 = the classes). Samples come in ``os.listdir`` order of the image folder, as the original
(``sort_files`` sorts them). Labels become ``value - 1`` with 0 -> ignore (-1); the padding of a crop larger
than the image ends as -1 too (the original pads the uint8 map with -1, which saturates to 0, and then
shifts). Images: OpenCV BGR, the ``cirkd`` preset (scale 0.5..2.0, crop 512x512, flip; val = full image).
"""
import os
from pathlib import Path

from common.datasets.base import (
    SegmentationSet,
    check_files,
    check_values,
    label_table,
    read_gray,
    repeat,
    require_dirs,
)
from common.datasets.transforms import build_transform
from common.errors import UserError

NUM_CLASSES = 150
SPLIT_DIRS = {"train": "training", "val": "validation"}
_LUT, _VALID = label_table({k: k - 1 for k in range(1, NUM_CLASSES + 1)}, valid_ignored=(0,))


def read_ade_label(path):
    """ADE20K label PNG (0..150) -> uint8 ``value - 1`` with 0 -> 255 (ignore); other values raise a UserError."""
    label = read_gray(path)
    check_values(label, _VALID, path, "ADE20K label (0..150)")
    return _LUT[label]


class ADE20KSet(SegmentationSet):
    """CIRKD's ADE20K: ``(image f32 3xhxw, label f32 hxw, np.array(size), name)``, 150 classes, ignore -1.

    ``split`` is ``train`` (``training``; the ``cirkd`` preset with ``crop_size``, the list repeated and
    truncated to ``max_iters``) or ``val`` (``validation``, 2000 images, full image).
    """

    def __init__(self, root, split="train", max_iters=None, crop_size=(512, 512), sort_files=False):
        if split not in SPLIT_DIRS:
            raise UserError(f"unknown ADE20K split '{split}'; choose train or val")
        folder = SPLIT_DIRS[split]
        require_dirs(root, [f"images/{folder}", f"annotations/{folder}"], "ADE20K",
                     f"pass the ADEChallengeData2016 folder holding images/{folder}/ and annotations/{folder}/")
        image_dir, label_dir = Path(root) / "images" / folder, Path(root) / "annotations" / folder
        names = [f for f in os.listdir(image_dir) if f.endswith(".jpg")]
        if sort_files:
            names.sort()
        if not names:
            raise UserError(f"no *.jpg images in {image_dir}; pass the ADEChallengeData2016 folder")
        files = [(str(image_dir / f), str(label_dir / (os.path.splitext(f)[0] + ".png")), os.path.splitext(f)[0])
                 for f in names]
        check_files(files, f"paired with the images in {image_dir}", f"put the label PNGs in {label_dir}")
        train = split == "train"
        files = repeat(files, max_iters) if train else files
        transform = build_transform("cirkd", True, crop_size=crop_size) if train else build_transform("cirkd", False)
        super().__init__(files, transform, read_ade_label)

"""PASCAL VOC 2012 (+ SBD "aug" train list) in the CIRKD convention (cirkd.md §4.2; AICSD in aicsd.md §5.1).

Layout under the root: ``JPEGImages/<id>.jpg``; labels are PIL palette PNGs holding class indices 0..20
and 255 (void): ``SegmentationClassAug/<id>.png`` for the aug train list (10582 ids), ``SegmentationClass/
<id>.png`` for val (1449) and the plain VOC train list (1464, AICSD). A list line is either an id or two
paths relative to the root (``JPEGImages/x.jpg SegmentationClassAug/x.png``, a leading ``/`` is allowed).

Images are read with OpenCV (BGR) and labels with PIL (indices); the default preprocessing is the CIRKD
preset (crop 512x512, scale 0.5-2.0, mirror, void -> -1 for training; full image for val). AICSD:
``VOCDataSet(root, "train", transform=build_transform("aicsd", True, fill=0, ignore_label=255))``.
"""
import math
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils import data

from common.datasets.cityscapes import read_image
from common.datasets.transforms import build_transform
from common.errors import UserError

NUM_CLASSES = 21
SPLIT_SIZES = {"train_aug": 10582, "train": 1464, "val": 1449}
_VALID = np.zeros(256, bool)
_VALID[list(range(NUM_CLASSES)) + [255]] = True


def read_voc_list(root, list_path, label_dir):
    """``[(image, label, name)]`` from an id list or a two-column list; every file is checked."""
    root, list_path = Path(root), Path(list_path)
    if not root.is_dir():
        raise UserError(f"VOC root {root} does not exist; pass the VOC2012 directory holding JPEGImages/")
    if not list_path.is_file():
        raise UserError(f"VOC list file {list_path} does not exist; pass --data-list or put the list at "
                        f"{root}/ImageSets/Segmentation/")
    entries = []
    for line in list_path.read_text().splitlines():
        fields = line.split()
        if not fields:
            continue
        if len(fields) == 1:
            name = fields[0]
            image, label = root / "JPEGImages" / f"{name}.jpg", root / label_dir / f"{name}.png"
        else:
            image, label = root / fields[0].lstrip("/"), root / fields[1].lstrip("/")
            name = Path(fields[0]).stem
        entries.append((str(image), str(label), name))
    if not entries:
        raise UserError(f"VOC list file {list_path} has no entries; pass a list with one id per line")
    missing = [p for e in entries for p in e[:2] if not Path(p).is_file()]
    if missing:
        raise UserError(f"{len(missing)} file(s) listed in {list_path} are missing, the first is {missing[0]}; "
                        f"check the VOC root and the label directory ({label_dir})")
    return entries


def read_voc_label(path):
    """Palette PNG -> uint8 indices; values other than 0..20 and 255 raise a UserError."""
    try:
        label = np.array(Image.open(path))
    except OSError as err:
        raise UserError(f"cannot read the label image {path} ({err}); check that it is a valid PNG") from None
    if label.ndim != 2:
        raise UserError(f"label image {path} is not a single-channel index PNG; use SegmentationClass(Aug) PNGs")
    bad = ~_VALID[label]
    if bad.any():
        raise UserError(f"label file {path} holds the value {int(label[bad][0])}, which is not a VOC class "
                        f"(0..20) or void (255); use the palette-index PNGs, not colour-rendered ones")
    return label


class VOCDataSet(data.Dataset):
    """VOC (+SBD aug) samples ``(image f32 3xhxw, label f32 hxw, np.array(size), name)``.

    ``split`` picks the default list ``<root>/ImageSets/Segmentation/<split>.txt`` and label directory
    (``SegmentationClassAug`` for ``train_aug``, else ``SegmentationClass``). ``max_iters`` repeats the
    list ``ceil(max_iters/len)`` times without truncation (CIRKD).
    """

    def __init__(self, root, split="train_aug", list_path=None, label_dir=None, max_iters=None, transform=None,
                 crop_size=(512, 512)):
        root = Path(root)
        label_dir = label_dir or ("SegmentationClassAug" if split == "train_aug" else "SegmentationClass")
        list_path = list_path or root / "ImageSets" / "Segmentation" / f"{split}.txt"
        self.files = read_voc_list(root, list_path, label_dir)
        if max_iters:
            self.files = self.files * int(math.ceil(float(max_iters) / len(self.files)))
        train = split != "val"
        self.transform = transform or (build_transform("cirkd", True, crop_size=crop_size) if train
                                       else build_transform("cirkd", False))

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        image_path, label_path, name = self.files[index]
        image = read_image(image_path)
        label = read_voc_label(label_path)
        if label.shape != image.shape[:2]:
            raise UserError(f"label {label_path} is {label.shape} but image {image_path} is {image.shape[:2]}; "
                            f"pair each image with its own label")
        size = image.shape
        image, label = self.transform(image, label)
        return image, label, np.array(size), name

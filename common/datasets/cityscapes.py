"""Cityscapes through the original list files (specs ifvd_skd.md C.5, cwd.md §6, cirkd.md §4.1) and through
a directory scan (AICSD, aicsd.md §5.2).

Lists are text files with one sample per line, ``<image path>\t<label path>`` relative to the data root
(the test list has the image path only). The originals' ``train.lst``/``val.lst``/``test.lst``/``trainval.lst``
(2975/500/1525/3475 lines) are shipped byte for byte: ``lists/cityscapes/psp/`` (IFVD, CWD, SKD) and
``lists/cityscapes/cirkd/`` (CIRKD; same samples in the same order). ``python -m common.datasets.cityscapes
make-lists ROOT`` writes lists in the same format from a Cityscapes tree (see ``lists/README.txt``).

Randomness (C.5): the scale factor and the crop offsets come from Python ``random``, the mirror from
``np.random``. PyTorch re-seeds both in every DataLoader worker from the loader's base seed (``random.seed``
and ``np.random.seed`` with base_seed + worker id), so ``torch.manual_seed(s)`` (or a loader ``generator``)
makes a run reproducible; with ``num_workers=0`` the main process' generators are used.
"""
import argparse
import os
import sys
from pathlib import Path

import numpy as np
from torch.utils import data

from common.datasets.base import (
    SegmentationSet,
    check_files,
    check_values,
    label_table,
    read_gray,
    read_image,
    read_indices,
    read_rgb,
    repeat,
)
from common.datasets.base import read_list as read_list_lines
from common.datasets.transforms import IMG_MEAN_BGR, PSPTransform, build_transform
from common.errors import UserError, main_guard
from common.io import atomic_open, output_dir

NUM_CLASSES = 19
CLASS_NAMES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)
ID_TO_TRAINID = {
    -1: 255, 0: 255, 1: 255, 2: 255, 3: 255, 4: 255, 5: 255, 6: 255, 7: 0, 8: 1, 9: 255, 10: 255, 11: 2,
    12: 3, 13: 4, 14: 255, 15: 255, 16: 255, 17: 5, 18: 255, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
    25: 12, 26: 13, 27: 14, 28: 15, 29: 255, 30: 255, 31: 16, 32: 17, 33: 18,
}
TRAINID_TO_ID = {v: k for k, v in ID_TO_TRAINID.items() if v != 255}
SPLIT_SIZES = {"train": 2975, "val": 500, "test": 1525, "trainval": 3475}
LIST_ROOT = Path(__file__).resolve().parent / "lists"
LIST_DIRS = {lineage: LIST_ROOT / "cityscapes" / lineage for lineage in ("psp", "cirkd")}

# labelId PNG value -> trainId (uint8); 255 for the ignored ids and for -1 (stored as 255); 34..254 invalid.
_ID_LUT, _ID_VALID = label_table({k: v for k, v in ID_TO_TRAINID.items() if k >= 0}, valid_ignored=(255,))
_, _TRAINID_VALID = label_table({k: k for k in range(NUM_CLASSES)}, valid_ignored=(255,))


def is_trainid_path(path) -> bool:
    """True for ``*_labelTrainIds.png`` files, which already hold trainIds (cityscapesscripts output)."""
    return str(path).endswith("_labelTrainIds.png")


def label_to_trainid(label, ignore_index=255, *, path="<array>"):
    """Map a labelId map (uint8) to trainIds (C.5 table); ignored ids become ``ignore_index``.

    The mapping reads the original array, so entries cannot chain. Returns uint8 when ``ignore_index``
    fits in 0..255, else int32 (CIRKD's -1). Values outside the Cityscapes ids (0..33, and 255 = id -1)
    raise a UserError naming ``path``.
    """
    label = np.asarray(label)
    if label.dtype != np.uint8:
        if label.size and (label.min() < -1 or label.max() > 255):
            raise UserError(f"label map {path} holds values outside -1..255; pass Cityscapes labelIds")
        label = np.where(label < 0, 255, label).astype(np.uint8)
    check_values(label, _ID_VALID, path, "Cityscapes labelId (0..33)")
    return _set_ignore(_ID_LUT[label], ignore_index)


def _set_ignore(trainid, ignore_index):
    """Replace 255 in a uint8 trainId map by ``ignore_index`` (int32 when it does not fit in uint8)."""
    if ignore_index == 255:
        return trainid
    out = trainid.astype(np.uint8 if 0 <= ignore_index <= 255 else np.int32)
    out[trainid == 255] = ignore_index
    return out


def trainid_to_labelid(pred):
    """Map a trainId prediction (0..18) back to Cityscapes labelIds for the test-server export (uint8)."""
    pred = np.asarray(pred)
    lut = np.zeros(256, np.uint8)
    for k, v in TRAINID_TO_ID.items():
        lut[k] = v
    if pred.size and (pred.min() < 0 or pred.max() >= NUM_CLASSES):
        raise UserError(f"prediction holds values outside 0..{NUM_CLASSES - 1}; pass argmax trainIds")
    return lut[pred.astype(np.intp)]


def read_label(path, ignore_index=255):
    """Read a label PNG as 8-bit grayscale and return trainIds (``*_labelTrainIds.png`` taken as they are)."""
    label = read_gray(path)
    if is_trainid_path(path):
        check_values(label, _TRAINID_VALID, path, f"trainId (0..{NUM_CLASSES - 1} or 255)")
        return _set_ignore(label, ignore_index)
    return label_to_trainid(label, ignore_index, path=path)


def read_list(list_path, root, with_labels=True):
    """Parse a list file into ``[(image_path, label_path | None, name)]`` below ``root`` (C.5 format).

    Lines are split on whitespace (tab in the originals; one line of CIRKD's ``trainval.lst`` uses spaces);
    blank lines are skipped. ``name`` is the label file stem for labelled lists and the image stem otherwise,
    as in the originals. Every referenced file is checked here; the error names the first missing one and
    how many are missing.
    """
    list_path, root = Path(list_path), Path(root)
    if not root.is_dir():
        raise UserError(f"dataset root {root} does not exist; pass the directory that holds leftImg8bit/ and gtFine/")
    lines = read_list_lines(list_path, {2} if with_labels else {1, 2}, "Cityscapes",
                            hint="pass an existing list (--data-list) or create one with "
                                 "`python -m common.datasets.cityscapes make-lists <CITYSCAPES_ROOT>`")
    entries = []
    for _, fields in lines:
        image = root / fields[0]
        label = root / fields[1] if with_labels else None
        name = Path(fields[1]).stem if with_labels else Path(fields[0]).stem
        entries.append((str(image), str(label) if label is not None else None, name))
    check_files(entries, f"listed in {list_path} (below {root})",
                "check the dataset root (--data-dir) or pass a list of your own copy (--data-list)")
    return entries


def default_list(split, root=None, lineage="psp"):
    """Path of the list for ``split``: the shipped ``lists/cityscapes/<lineage>/<split>.lst``, else
    ``<root>/lists/<split>.lst``. ``lineage`` is ``psp`` (IFVD/CWD/SKD) or ``cirkd``."""
    if lineage not in LIST_DIRS:
        raise UserError(f"no shipped Cityscapes lists for '{lineage}'; choose one of {', '.join(LIST_DIRS)}")
    shipped = LIST_DIRS[lineage] / f"{split}.lst"
    if shipped.is_file():
        return str(shipped)
    if root is not None:
        local = Path(root) / "lists" / f"{split}.lst"
        if local.is_file():
            return str(local)
    raise UserError(f"no list file for the Cityscapes split '{split}'; run `python -m common.datasets.cityscapes "
                    f"make-lists <CITYSCAPES_ROOT>` (writes <CITYSCAPES_ROOT>/lists/{split}.lst) or pass a list path")


class CSTrainValSet(SegmentationSet):
    """IFVD/CWD/SKD ``CSTrainValSet`` (C.5): ``(image f32 3xhxw, label f32 hxw, np.array(size), name)``.

    The preprocessing is the PSP-lineage pipeline (:class:`common.datasets.transforms.PSPTransform`) built from
    the arguments; ``transform=build_transform("cirkd"|"aicsd", train)`` replaces it (same return tuple, the
    transform owns the ignore value). ``max_iters`` repeats the list ``ceil(max_iters/len)`` times and truncates
    it to ``max_iters`` (IFVD, A.5); ``truncate=False`` keeps the whole repeated list (SKD, B.5).

    ``crop_size=None`` means the full image: no pad, no crop, no random draw. Use it for validation on
    images smaller than the original 1024x2048 (the synthetic data); a crop larger than the image pads
    bottom/right with 0 (image) and the ignore label, exactly as the original.
    """

    def __init__(self, root, list_path, max_iters=None, crop_size=(512, 512), scale=False, mirror=False,
                 mean=IMG_MEAN_BGR, ignore_label=255, *, truncate=True, transform=None):
        files = repeat(read_list(list_path, root, with_labels=True), max_iters, truncate)
        transform = transform or PSPTransform(crop_size, scale=scale, mirror=mirror, mean=mean,
                                              ignore_label=ignore_label)
        super().__init__(files, transform, read_label)
        self.root = str(root)
        self.ignore_label = ignore_label


def cirkd_cityscapes(root, split="train", list_path=None, max_iters=None, crop_size=(512, 1024)):
    """CIRKD's Cityscapes (cirkd.md §4.1): the shipped CIRKD list of ``split`` unless ``list_path`` is given.

    Training splits get the ``cirkd`` preset (scale 0.5..2.0, crop ``crop_size``, pad -1/0, flip) and a list
    repeated and truncated to ``max_iters`` (= max_iterations x total batch); ``val`` is the full image;
    ``test`` (images only) is a :class:`CSTestSet` of full images. Labels are trainIds with -1 = ignore.
    """
    list_path = list_path or default_list(split, root, lineage="cirkd")
    if split == "test":
        return CSTestSet(root, list_path, crop_size=None)
    train = split != "val"
    transform = build_transform("cirkd", True, crop_size=crop_size) if train else build_transform("cirkd", False)
    return CSTrainValSet(root, list_path, max_iters=max_iters if train else None, ignore_label=-1,
                         transform=transform)


class CSTestSet(data.Dataset):
    """``CSTestSet`` (C.5): BGR minus mean, pad bottom/right with 0 up to ``crop_size``, CHW.

    Returns ``(image f32 3xHxW, np.array(size), name = image stem)``; ``crop_size=None`` keeps the image size.
    Labelled lists are accepted (only the image column is used).
    """

    def __init__(self, root, list_path, crop_size=(1024, 2048), mean=IMG_MEAN_BGR):
        self.root = str(root)
        self.files = read_list(list_path, root, with_labels=False)
        self.crop_size = crop_size
        self.mean = np.asarray(mean, np.float64)

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        image_path, _, name = self.files[index]
        image = read_image(image_path)
        size = image.shape
        image = image.astype(np.float32)
        image -= self.mean
        if self.crop_size is not None:
            pad_h = max(self.crop_size[0] - image.shape[0], 0)
            pad_w = max(self.crop_size[1] - image.shape[1], 0)
            if pad_h or pad_w:
                image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)))
        return image.transpose((2, 0, 1)).copy(), np.array(size), name


# AICSD's Cityscapes folders (aicsd.md §2.9, §5.2): (image folder, label folder) below the root.
LAYOUTS = {
    "kaggle": ("images", "gtFine"),
    "standard": ("leftImg8bit", "gtFine"),
    "deeplab": ("leftImg8bit", os.path.join("gtFine_trainvaltest", "gtFine")),
}


def _aicsd_label(path):
    """pytorch-deeplab-xception ``encode_segmap`` (aicsd.md §5.2): void ids -> 255, valid ids -> 0..18."""
    label = read_indices(path)
    check_values(label, _ID_VALID, path, "Cityscapes labelId (0..33)")
    return _ID_LUT[label]


def find_layout(root):
    """The first :data:`LAYOUTS` entry whose two folders exist below ``root``; UserError if none does."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"Cityscapes root {root} does not exist; pass the folder holding images/ (Kaggle layout) "
                        f"or leftImg8bit/ and gtFine/")
    for name, (images, labels) in LAYOUTS.items():
        if (root / images).is_dir() and (root / labels).is_dir():
            return name
    raise UserError(f"Cityscapes root {root} has neither images/ + gtFine/ (Kaggle layout) nor leftImg8bit/ + "
                    f"gtFine/ (standard layout); pass the folder that holds them")


class CityscapesSegmentation(SegmentationSet):
    """AICSD's ``CityscapesSegmentation`` (aicsd.md §5.2): every ``*.png`` below ``<images>/<split>/`` is a sample.

    Its label is ``<labels>/<split>/<city>/<name minus 'leftImg8bit.png'>gtFine_labelIds.png``. ``layout``
    is ``kaggle`` (``images/``, ``gtFine/``: the AICSD code), ``standard`` (``leftImg8bit/``, ``gtFine/``),
    ``deeplab`` (``leftImg8bit/``, ``gtFine_trainvaltest/gtFine/``: pytorch-deeplab-xception) or ``auto`` (the
    first that exists, in that order). Files come in ``os.walk`` order as in the original; ``sort_files``
    sorts them. Images are read with PIL as RGB; the default transform is the ``aicsd`` preset (fill 255).
    """

    def __init__(self, root, split="train", transform=None, layout="auto", sort_files=False):
        if layout != "auto" and layout not in LAYOUTS:
            raise UserError(f"unknown Cityscapes layout '{layout}'; choose auto, {', '.join(LAYOUTS)}")
        layout = find_layout(root) if layout == "auto" else layout
        if split not in ("train", "val"):
            raise UserError(f"AICSD reads the Cityscapes train and val splits, not '{split}' (it has no labels)")
        image_dir, label_dir = (Path(root) / d / split for d in LAYOUTS[layout])
        if not image_dir.is_dir():
            raise UserError(f"Cityscapes folder {image_dir} does not exist; pass a root with the {split} split "
                            f"in the {layout} layout")
        images = [os.path.join(top, f) for top, _, names in os.walk(image_dir) for f in names if f.endswith(".png")]
        if sort_files:
            images.sort()
        if not images:
            raise UserError(f"no *.png images below {image_dir}; pass the Cityscapes root holding the {split} split")
        files = [(path, str(label_dir / Path(path).parent.name / (Path(path).name[:-15] + "gtFine_labelIds.png")),
                  Path(path).stem) for path in images]
        check_files(files, f"paired with the images below {image_dir}",
                    f"put the gtFine label PNGs below {label_dir}")
        super().__init__(files, transform or build_transform("aicsd", split == "train"), _aicsd_label, read_rgb)
        self.layout = layout


def scan_split(root, split, label_suffix="_gtFine_labelIds.png"):
    """Sorted (city, file) list lines of one split: ``leftImg8bit/<split>/<city>/*_leftImg8bit.png`` [+ label]."""
    root = Path(root)
    image_dir = root / "leftImg8bit" / split
    lines = []
    if not image_dir.is_dir():
        return lines
    for city in sorted(p.name for p in image_dir.iterdir() if p.is_dir()):
        for image in sorted((image_dir / city).glob("*_leftImg8bit.png")):
            rel_image = f"leftImg8bit/{split}/{city}/{image.name}"
            if split == "test":
                lines.append(rel_image)
                continue
            label = f"gtFine/{split}/{city}/{image.name[: -len('_leftImg8bit.png')]}{label_suffix}"
            if not (root / label).is_file():
                raise UserError(f"label {root / label} is missing for {image}; extract gtFine_trainvaltest into "
                                f"{root} (and run csCreateTrainIdLabelImgs for --trainids)")
            lines.append(f"{rel_image}\t{label}")
    return lines


def write_lists(root, out=None, label_suffix="_gtFine_labelIds.png", check_counts=False):
    """Write ``{train,val,test,trainval}.lst`` for a Cityscapes tree; return ``{split: path}``.

    Order: city, then file name. With ``check_counts`` a warning names every split whose line count differs
    from the original lists (2975/500/1525/3475).
    """
    root = Path(root)
    if not (root / "leftImg8bit").is_dir():
        raise UserError(f"{root} has no leftImg8bit/ directory; pass the Cityscapes root "
                        f"(the directory holding leftImg8bit/ and gtFine/)")
    out = Path(out) if out is not None else root / "lists"
    out.mkdir(parents=True, exist_ok=True)
    lines = {s: scan_split(root, s, label_suffix) for s in ("train", "val", "test")}
    lines["trainval"] = lines["train"] + lines["val"]
    paths = {}
    for split, split_lines in lines.items():
        path = out / f"{split}.lst"
        with atomic_open(path, "w") as f:
            f.write("".join(line + "\n" for line in split_lines))
        paths[split] = str(path)
    if check_counts:
        for split, expected in SPLIT_SIZES.items():
            if len(lines[split]) != expected:
                print(f"warning: {split}.lst has {len(lines[split])} lines, the original has {expected} "
                      f"(incomplete Cityscapes download?)", file=sys.stderr)
    return paths


@main_guard
def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m common.datasets.cityscapes",
                                     description="Cityscapes list files in the original format (spec C.5).")
    sub = parser.add_subparsers(dest="command", required=True)
    mk = sub.add_parser("make-lists", help="write train/val/test/trainval .lst files from a Cityscapes tree")
    mk.add_argument("root", help="Cityscapes root holding leftImg8bit/ and gtFine/")
    mk.add_argument("--out", default=None, help="output directory (default: <root>/lists)")
    mk.add_argument("--trainids", action="store_true",
                    help="point labels at *_gtFine_labelTrainIds.png (cityscapesscripts) instead of labelIds")
    args = parser.parse_args(argv)
    suffix = "_gtFine_labelTrainIds.png" if args.trainids else "_gtFine_labelIds.png"
    if args.out is not None:
        output_dir(args.out, "--out")
    paths = write_lists(args.root, args.out, label_suffix=suffix, check_counts=True)
    for split, path in paths.items():
        with open(path) as f:
            print(f"{split}: {sum(1 for _ in f)} lines -> {path}")


if __name__ == "__main__":
    main()

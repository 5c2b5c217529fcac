"""AICSD's data (aicsd.md §5): PASCAL VOC (+SBD), Cityscapes in the Kaggle and the standard layout, and the
§5.3 transforms checked against a line-by-line port of pytorch-deeplab-xception's custom_transforms."""
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms as tvt

from common.datasets import synthetic
from common.datasets.catalog import aicsd_dataset
from common.datasets.cityscapes import CityscapesSegmentation
from common.datasets.voc import VOCSegmentation
from common.errors import UserError

# aicsd.md §5.2: void ids -> 255, the valid ids -> 0..18 in this order
VOID_IDS = [0, 1, 2, 3, 4, 5, 6, 9, 10, 14, 15, 16, 18, 29, 30]
VALID_IDS = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    root = tmp_path_factory.mktemp("aicsd_voc")
    paths = synthetic.make_voc(root, {"train": 3, "val": 2}, sbd={"train": 3, "val": 2}, size=(60, 80))
    return root, paths


@pytest.fixture(scope="module")
def kaggle(synthetic_cityscapes, tmp_path_factory):
    """The synthetic Cityscapes in AICSD's Kaggle layout: ``images/<split>/<city>/`` and ``gtFine/``."""
    root = tmp_path_factory.mktemp("kaggle") / "Cityspaces"
    shutil.copytree(synthetic_cityscapes / "leftImg8bit", root / "images")
    shutil.copytree(synthetic_cityscapes / "gtFine", root / "gtFine")
    return root


def upstream_train(img, mask, fill, base=513, crop=513):
    """RandomHorizontalFlip, RandomScaleCrop(base, crop, fill), RandomGaussianBlur, Normalize, ToTensor."""
    if random.random() < 0.5:
        img, mask = img.transpose(Image.FLIP_LEFT_RIGHT), mask.transpose(Image.FLIP_LEFT_RIGHT)
    short_size = random.randint(int(base * 0.5), int(base * 2.0))
    w, h = img.size
    if h > w:
        ow = short_size
        oh = int(1.0 * h * ow / w)
    else:
        oh = short_size
        ow = int(1.0 * w * oh / h)
    img, mask = img.resize((ow, oh), Image.BILINEAR), mask.resize((ow, oh), Image.NEAREST)
    if short_size < crop:
        padh = crop - oh if oh < crop else 0
        padw = crop - ow if ow < crop else 0
        img = ImageOps.expand(img, border=(0, 0, padw, padh), fill=0)
        mask = ImageOps.expand(mask, border=(0, 0, padw, padh), fill=fill)
    w, h = img.size
    x1, y1 = random.randint(0, w - crop), random.randint(0, h - crop)
    img, mask = img.crop((x1, y1, x1 + crop, y1 + crop)), mask.crop((x1, y1, x1 + crop, y1 + crop))
    if random.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(radius=random.random()))
    return normalize_to_tensor(img, mask)


def normalize_to_tensor(img, mask):
    img, mask = np.array(img).astype(np.float32), np.array(mask).astype(np.float32)
    img /= 255.0
    img -= (0.485, 0.456, 0.406)
    img /= (0.229, 0.224, 0.225)
    return img.transpose((2, 0, 1)), mask


def upstream_val(img, mask):
    """transform_val: FixedResize = torchvision Resize(513) with an int size (short side 513), then Normalize."""
    img = tvt.Resize(513, interpolation=tvt.InterpolationMode.BILINEAR)(img)
    mask = tvt.Resize(513, interpolation=tvt.InterpolationMode.NEAREST)(mask)
    return normalize_to_tensor(img, mask)


def encode_segmap(path):
    """pytorch-deeplab-xception ``CityscapesSegmentation.encode_segmap`` (aicsd.md §5.2), in place, in order."""
    mask = np.array(Image.open(path), dtype=np.uint8)
    for void in VOID_IDS:
        mask[mask == void] = 255
    for index, valid in enumerate(VALID_IDS):
        mask[mask == valid] = index
    return Image.fromarray(mask)


def check_against(dataset, index, upstream, seeds=range(3)):
    for seed in seeds:
        random.seed(seed)
        image, label, _, _ = dataset[index]
        random.seed(seed)
        ref_image, ref_label = upstream()
        np.testing.assert_array_equal(label, ref_label)
        np.testing.assert_array_equal(image, ref_image)


# ---------------------------------------------------------------- transforms (§5.3)

def test_voc_train_sample_matches_upstream(voc):
    root, _ = voc
    ds = VOCSegmentation(root, "train")
    image_path, label_path, _ = ds.files[1]
    check_against(ds, 1, lambda: upstream_train(Image.open(image_path).convert("RGB"), Image.open(label_path), fill=0))


def test_cityscapes_train_sample_matches_upstream(kaggle):
    ds = CityscapesSegmentation(kaggle, "train")
    image_path, label_path, _ = ds.files[0]
    check_against(ds, 0, lambda: upstream_train(Image.open(image_path).convert("RGB"), encode_segmap(label_path),
                                                fill=255))


def test_voc_val_sample_matches_torchvision_resize_513(voc):
    ds = VOCSegmentation(voc[0], "val")
    image_path, label_path, _ = ds.files[0]
    check_against(ds, 0, lambda: upstream_val(Image.open(image_path).convert("RGB"), Image.open(label_path)), [0])


def test_cityscapes_val_sample_matches_torchvision_resize_513(kaggle):
    ds = CityscapesSegmentation(kaggle, "val")
    image_path, label_path, _ = ds.files[0]
    check_against(ds, 0, lambda: upstream_val(Image.open(image_path).convert("RGB"), encode_segmap(label_path)), [0])


def test_val_short_side_is_513_keeping_the_aspect_ratio(voc, kaggle):
    # aicsd.md §5.3: VOC 60x80 -> 513x684 (int(80*513/60) = 684); Cityscapes 256x512 -> 513x1026
    assert VOCSegmentation(voc[0], "val")[0][0].shape == (3, 513, 684)
    assert CityscapesSegmentation(kaggle, "val")[0][1].shape == (513, 1026)


def test_voc_training_pads_the_mask_with_background_0(voc, monkeypatch):
    # aicsd.md §5.3 step 2 and §9 Q14: VOC fill is 0 (padded area labelled background)
    ds = VOCSegmentation(voc[0], "train")
    monkeypatch.setattr(random, "randint", lambda a, b: a)  # s = 256: 60x80 -> 256x341, padded to 513
    monkeypatch.setattr(random, "random", lambda: 0.9)
    label = ds[0][1]
    assert label.shape == (513, 513) and (label[256:] == 0).all() and (label[:, 341:] == 0).all()


def test_training_output_is_a_513_crop_with_valid_values(kaggle):
    # aicsd.md §10 "Transforms": 3x513x513 float and a 513x513 mask with values in {0..C-1, 255}
    random.seed(3)
    image, label, _, _ = CityscapesSegmentation(kaggle, "train")[1]
    assert image.shape == (3, 513, 513) and image.dtype == np.float32 and label.shape == (513, 513)
    assert set(np.unique(label)) <= set(range(19)) | {255}


# ---------------------------------------------------------------- PASCAL VOC and SBD (§5.1)

def test_voc_splits_read_imagesets_and_segmentationclass(voc):
    root, _ = voc
    train, val = VOCSegmentation(root, "train"), VOCSegmentation(root, "val")
    assert [f[2] for f in train.files] == ["2007_000000", "2007_000001", "2007_000002"]
    assert [f[2] for f in val.files] == ["2008_000000", "2008_000001"]
    assert all("/SegmentationClass/" in f[1] for f in train.files + val.files)


def test_sbd_combination_is_voc_train_then_new_sbd_ids_minus_val(voc):
    # CombineDBs([VOC train, SBD train+val], excluded=[VOC val]); the synthetic SBD train list is
    # 2007_000000 (a VOC train id), 2011_000000, 2011_000001 and its val list 2008_000000 (a VOC val id), 2011_000002
    root, paths = voc
    ds = VOCSegmentation(root, "train", use_sbd=True, sbd_root=paths["sbd"])
    assert [f[2] for f in ds.files] == ["2007_000000", "2007_000001", "2007_000002", "2011_000000", "2011_000001",
                                        "2011_000002"]
    assert [Path(f[1]).suffix for f in ds.files] == [".png"] * 3 + [".mat"] * 3


def test_sbd_label_is_the_gtcls_segmentation(voc):
    root, paths = voc
    ds = VOCSegmentation(root, "train", use_sbd=True, sbd_root=paths["sbd"],
                         transform=lambda image, label: (image, label))
    mat_path = ds.files[3][1]
    expected = scipy.io.loadmat(mat_path)["GTcls"][0]["Segmentation"][0]
    np.testing.assert_array_equal(ds[3][1], expected)


def test_sbd_bad_input(voc, tmp_path):
    root, paths = voc
    with pytest.raises(UserError, match="--use-sbd needs the SBD folder"):
        VOCSegmentation(root, "train", use_sbd=True)
    with pytest.raises(UserError, match="SBD only extends the VOC train split"):
        VOCSegmentation(root, "val", use_sbd=True, sbd_root=paths["sbd"])
    with pytest.raises(UserError, match="SBD root .* has no img/ folder"):
        VOCSegmentation(root, "train", use_sbd=True, sbd_root=tmp_path)
    sbd = tmp_path / "benchmark_RELEASE"
    shutil.copytree(paths["sbd"], sbd)
    scipy.io.savemat(sbd / "dataset" / "cls" / "2011_000000.mat", {"other": np.zeros((2, 2))})
    ds = VOCSegmentation(root, "train", use_sbd=True, sbd_root=sbd)
    with pytest.raises(UserError, match="has no GTcls entry"):
        ds[3]


def test_voc_root_without_folders_is_user_error(tmp_path):
    with pytest.raises(UserError, match="VOC root .* does not exist"):
        VOCSegmentation(tmp_path / "none")
    (tmp_path / "JPEGImages").mkdir()
    (tmp_path / "SegmentationClass").mkdir()
    with pytest.raises(UserError, match="has no ImageSets/Segmentation/ folder"):
        VOCSegmentation(tmp_path)


# ---------------------------------------------------------------- Cityscapes (§5.2)

def test_cityscapes_label_map_is_the_spec_remap(kaggle):
    ds = CityscapesSegmentation(kaggle, "val", transform=lambda image, label: (image, label))
    _, label, _, _ = ds[0]
    raw = np.array(Image.open(ds.files[0][1]))
    expected = np.full(raw.shape, 255)
    for index, valid in enumerate(VALID_IDS):
        expected[raw == valid] = index
    assert (raw == 1).any()  # an ignored id is present
    np.testing.assert_array_equal(label, expected)


def test_kaggle_and_standard_layouts_give_the_same_samples(kaggle, synthetic_cityscapes):
    a = CityscapesSegmentation(kaggle, "train", sort_files=True)
    b = CityscapesSegmentation(synthetic_cityscapes, "train", sort_files=True)
    assert (a.layout, b.layout) == ("kaggle", "standard")
    assert [f[2] for f in a.files] == [f[2] for f in b.files]
    assert all(f[1].endswith("_gtFine_labelIds.png") and "/gtFine/train/" in f[1] for f in a.files)
    random.seed(0)
    sample_a = a[0]
    random.seed(0)
    sample_b = b[0]
    np.testing.assert_array_equal(sample_a[0], sample_b[0])
    np.testing.assert_array_equal(sample_a[1], sample_b[1])


def test_cityscapes_files_come_in_walk_order_of_every_png(kaggle):
    walked = [os.path.join(top, f) for top, _, names in os.walk(kaggle / "images" / "train") for f in names
              if f.endswith(".png")]
    assert [f[0] for f in CityscapesSegmentation(kaggle, "train").files] == walked
    assert len(walked) == 4


def test_cityscapes_bad_input(kaggle, tmp_path):
    with pytest.raises(UserError, match="neither images/ \\+ gtFine/"):
        CityscapesSegmentation(tmp_path)
    with pytest.raises(UserError, match="unknown Cityscapes layout 'kitti'"):
        CityscapesSegmentation(kaggle, layout="kitti")
    with pytest.raises(UserError, match="AICSD reads the Cityscapes train and val splits, not 'test'"):
        CityscapesSegmentation(kaggle, "test")
    with pytest.raises(UserError, match="Cityscapes folder .*leftImg8bit/val does not exist"):
        CityscapesSegmentation(kaggle, "val", layout="standard")
    copy = tmp_path / "k"
    shutil.copytree(kaggle, copy)
    next((copy / "gtFine" / "val").rglob("*.png")).unlink()
    with pytest.raises(UserError, match=r"1 file\(s\) paired with the images below .*images/val are missing"):
        CityscapesSegmentation(copy, "val")


def test_catalogue_fill_per_dataset_and_coco(voc, kaggle):
    assert aicsd_dataset("pascal", voc[0], "train").transform.fill == 0
    assert aicsd_dataset("cityscapes", kaggle, "train").transform.fill == 255
    with pytest.raises(UserError, match="--dataset coco is not available"):
        aicsd_dataset("coco", voc[0], "train")
    with pytest.raises(UserError, match="--use-sbd extends PASCAL VOC only"):
        aicsd_dataset("cityscapes", kaggle, "train", use_sbd=True)


def test_unreadable_image_and_label_are_user_errors(voc, tmp_path):
    copy = tmp_path / "voc"
    shutil.copytree(voc[0], copy)
    ds = VOCSegmentation(copy, "val")
    Path(ds.files[0][0]).write_bytes(b"not a jpeg")
    with pytest.raises(UserError, match="cannot read the image .*2008_000000.jpg"):
        ds[0]
    Path(ds.files[1][1]).write_bytes(b"not a png")
    with pytest.raises(UserError, match="cannot read the label image .*2008_000001.png"):
        ds[1]

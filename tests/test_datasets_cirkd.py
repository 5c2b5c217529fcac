"""CIRKD's five datasets (cirkd.md §4.1, §4.2): label rules, pipeline against a port of the original sample
code, default (shipped) lists, per-dataset crops and bad input. Literals come from the spec sections named."""
import os
import random
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from common.datasets import synthetic
from common.datasets.ade20k import ADE20KSet
from common.datasets.camvid import CamVidSet
from common.datasets.catalog import CIRKD_EVAL_SPLITS, CIRKD_NUM_CLASSES, cirkd_dataset
from common.datasets.cityscapes import cirkd_cityscapes
from common.datasets.coco_stuff import COCOStuffSet
from common.datasets.voc import VOCDataSet
from common.errors import UserError

REPO = Path(__file__).resolve().parents[1]
LISTS = REPO / "common" / "datasets" / "lists"
# cirkd.md §4.1: "minus BGR mean (104.00698793, 116.66876762, 122.67891434), no division by std, BGR order kept"
MEAN_BGR = np.array([104.00698793, 116.66876762, 122.67891434])
# cirkd.md §4.1 label mapping (everything else -> -1)
TRAINID = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13,
           27: 14, 28: 15, 31: 16, 32: 17, 33: 18}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cirkd_data")
    return {
        "voc": (root / "voc", synthetic.make_voc(root / "voc", {"train": 3, "val": 2}, size=(60, 80))),
        "ade20k": (root / "ade", synthetic.make_ade20k(root / "ade", {"train": 3, "val": 2}, size=(60, 80))),
        "coco": (root / "coco", synthetic.make_coco_stuff(root / "coco", {"train": 3, "val": 2}, size=(60, 80))),
        "camvid": (root / "camvid", synthetic.make_camvid(root / "camvid", {"train": 3, "val": 1, "test": 2},
                                                          size=(72, 96), cirkd_lists=True)),
    }


def port_cirkd_item(image_path, label, crop, pad_label=-1):
    """CIRKD's train ``__getitem__`` after the label is read and mapped (§4.1): scale 0.5 + randint(0,15)/10,
    float32 minus BGR mean, pad bottom/right (0.0, ``pad_label``), random crop, HWC->CHW, flip by
    ``np.random.choice(2)``."""
    image = cv2.imread(image_path, cv2.IMREAD_COLOR)
    f = 0.5 + random.randint(0, 15) / 10.0
    image = cv2.resize(image, None, fx=f, fy=f, interpolation=cv2.INTER_LINEAR)
    label = cv2.resize(label, None, fx=f, fy=f, interpolation=cv2.INTER_NEAREST)
    image = np.asarray(image, np.float32) - MEAN_BGR
    pad_h, pad_w = max(crop[0] - label.shape[0], 0), max(crop[1] - label.shape[1], 0)
    if pad_h or pad_w:
        image = cv2.copyMakeBorder(image, 0, pad_h, 0, pad_w, cv2.BORDER_CONSTANT, value=(0.0, 0.0, 0.0))
        label = cv2.copyMakeBorder(label, 0, pad_h, 0, pad_w, cv2.BORDER_CONSTANT, value=(pad_label,))
    h_off, w_off = random.randint(0, label.shape[0] - crop[0]), random.randint(0, label.shape[1] - crop[1])
    image = image[h_off:h_off + crop[0], w_off:w_off + crop[1]].transpose((2, 0, 1))
    label = label[h_off:h_off + crop[0], w_off:w_off + crop[1]]
    flip = np.random.choice(2) * 2 - 1
    return image[:, :, ::flip].astype(np.float32), label[:, ::flip].astype(np.float32)


def compare_with_port(dataset, index, port, seeds=range(3)):
    for seed in seeds:
        random.seed(seed)
        np.random.seed(seed)
        image, label, _, _ = dataset[index]
        random.seed(seed)
        np.random.seed(seed)
        ref_image, ref_label = port()
        np.testing.assert_array_equal(label, ref_label)
        np.testing.assert_allclose(image, ref_image, atol=1e-3)


# ---------------------------------------------------------------- Cityscapes (§4.1)

def test_cityscapes_sample_matches_the_original(synthetic_cityscapes):
    ds = cirkd_cityscapes(synthetic_cityscapes, "train", list_path=synthetic_cityscapes / "lists" / "train.lst",
                          crop_size=(200, 600))
    image_path, label_path, _ = ds.files[2]

    def port():
        raw = cv2.imread(label_path, cv2.IMREAD_GRAYSCALE)
        label = np.full(raw.shape, -1, np.int32)  # mapped "on the uint8 map into an int32 copy"
        for lid, tid in TRAINID.items():
            label[raw == lid] = tid
        return port_cirkd_item(image_path, label, (200, 600))

    compare_with_port(ds, 2, port)


def test_cityscapes_train_is_sized_to_max_iters_and_truncated(synthetic_cityscapes):
    ds = cirkd_cityscapes(synthetic_cityscapes, "train", list_path=synthetic_cityscapes / "lists" / "train.lst",
                          max_iters=10)
    assert len(ds) == 10 and [f[2] for f in ds.files[4:8]] == [f[2] for f in ds.files[:4]]


def test_cityscapes_default_crop_is_512x1024(synthetic_cityscapes):
    ds = cirkd_cityscapes(synthetic_cityscapes, "train", list_path=synthetic_cityscapes / "lists" / "train.lst")
    random.seed(0)
    assert ds[0][0].shape == (3, 512, 1024)


def test_cityscapes_test_split_is_images_only(synthetic_cityscapes):
    image, size, name = cirkd_cityscapes(synthetic_cityscapes, "test",
                                         list_path=synthetic_cityscapes / "lists" / "test.lst")[0]
    assert image.shape == (3, 256, 512) and name.endswith("_leftImg8bit")


def test_cityscapes_default_list_is_the_shipped_cirkd_list(tmp_path):
    with pytest.raises(UserError, match=r"5950 file\(s\) listed in .*lists/cityscapes/cirkd/train\.lst"):
        cirkd_cityscapes(tmp_path, "train")  # 2975 images + 2975 labels, none of them in an empty root


# ---------------------------------------------------------------- PASCAL VOC aug (§4.2)

def test_voc_val_label_is_void_to_minus_one_and_classes_kept(data):
    root, paths = data["voc"]
    ds = VOCDataSet(root, "val", list_path=paths["val"])
    image, label, size, name = ds[0]
    raw = np.array(Image.open(root / "SegmentationClass" / f"{name}.png"))  # palette indices
    expected = np.where(raw == 255, -1.0, raw.astype(np.float32))
    assert (raw == 255).any() and image.shape == (3, 60, 80)
    np.testing.assert_array_equal(label, expected)


def test_voc_train_aug_reads_segmentationclassaug_and_repeats_without_truncation(data):
    root, paths = data["voc"]
    ds = VOCDataSet(root, "train_aug", list_path=paths["train_aug"], max_iters=4)
    assert len(ds) == 6  # 3 ids repeated ceil(4/3) = 2 times, not truncated (§4.2)
    assert all("SegmentationClassAug" in f[1] for f in ds.files)
    random.seed(0)
    assert ds[0][0].shape == (3, 512, 512)  # VOC script crop 512x512 (§1.7)


def test_voc_default_lists_are_the_shipped_ones(data):
    root, _ = data["voc"]
    with pytest.raises(UserError, match=r"21164 file\(s\) listed in .*lists/voc/train_aug\.txt"):
        VOCDataSet(root, "train_aug")  # 10582 ids, image + label each
    with pytest.raises(UserError, match=r"2898 file\(s\) listed in .*lists/voc/val\.txt"):
        VOCDataSet(root, "val")


def test_voc_root_without_folders_and_bad_label_value(data, tmp_path):
    with pytest.raises(UserError, match="VOC root .* does not exist"):
        VOCDataSet(tmp_path / "none")
    (tmp_path / "JPEGImages").mkdir()
    with pytest.raises(UserError, match="has no SegmentationClassAug/ folder"):
        VOCDataSet(tmp_path, "train_aug")
    root, paths = data["voc"]
    copy = tmp_path / "voc"
    shutil.copytree(root, copy)
    Image.fromarray(np.full((60, 80), 30, np.uint8)).save(copy / "SegmentationClass" / "2008_000000.png")
    with pytest.raises(UserError, match="value 30, which is not a valid VOC class"):
        VOCDataSet(copy, "val", list_path=paths["val"])[0]


# ---------------------------------------------------------------- CamVid (§4.2)

def test_camvid_void_11_becomes_minus_one(data):
    root, paths = data["camvid"]
    ds = CamVidSet(root, "test", list_path=paths["test"])
    image, label, _, name = ds[0]
    raw = cv2.imread(str(root / "testannot" / f"{name}.png"), cv2.IMREAD_GRAYSCALE)
    assert (raw == 11).any() and image.shape == (3, 72, 96)
    np.testing.assert_array_equal(label, np.where(raw == 11, -1.0, raw.astype(np.float32)))


def test_camvid_train_crop_is_360x360(data):
    root, paths = data["camvid"]
    ds = CamVidSet(root, "train", list_path=paths["train"], max_iters=5)
    random.seed(1)
    image, label, _, _ = ds[0]
    assert len(ds) == 5 and image.shape == (3, 360, 360) and label.shape == (360, 360)


def test_camvid_label_outside_0_to_11_is_user_error(data, tmp_path):
    root, paths = data["camvid"]
    copy = tmp_path / "camvid"
    shutil.copytree(root, copy)
    name = Path(paths["test"]).read_text().split()[1]
    label = cv2.imread(str(copy / name), cv2.IMREAD_GRAYSCALE)
    label[0, 0] = 12
    cv2.imwrite(str(copy / name), label)
    with pytest.raises(UserError, match="value 12, which is not a valid CamVid class"):
        CamVidSet(copy, "test", list_path=copy / "camvid_test_list.txt")[0]


def test_camvid_shipped_list_needs_the_segnet_folders(tmp_path):
    (tmp_path / "test").mkdir()
    with pytest.raises(UserError, match="has no testannot/ folder"):
        CamVidSet(tmp_path, "test")
    with pytest.raises(UserError, match="unknown CamVid split 'testing'"):
        CamVidSet(tmp_path, "testing")


@pytest.mark.realdata
def test_camvid_shipped_lists_read_the_real_data(real_camvid):
    counts = {s: len(CamVidSet(real_camvid, s)) for s in ("train", "val", "test", "trainval")}
    assert counts == {"train": 367, "val": 101, "test": 233, "trainval": 468}  # data/lists README
    image, label, size, name = CamVidSet(real_camvid, "test")[0]
    assert tuple(size) == (360, 480, 3) and name == "0001TP_008550"
    assert set(np.unique(label)) <= set(range(-1, 11))


# ---------------------------------------------------------------- ADE20K (§4.2)

def test_ade20k_label_is_value_minus_one_and_zero_is_ignored(data):
    root, _ = data["ade20k"]
    ds = ADE20KSet(root, "val", sort_files=True)
    image, label, _, name = ds[0]
    raw = cv2.imread(str(root / "annotations" / "validation" / f"{name}.png"), cv2.IMREAD_GRAYSCALE)
    assert (raw == 0).any() and (raw == 150).any()
    np.testing.assert_array_equal(label, raw.astype(np.float32) - 1)


def test_ade20k_padding_saturates_then_shifts_to_minus_one(data):
    root, _ = data["ade20k"]
    ds = ADE20KSet(root, "train", crop_size=(256, 256), sort_files=True)
    image_path, label_path, _ = ds.files[1]

    def port():
        raw = cv2.imread(label_path, cv2.IMREAD_GRAYSCALE)  # uint8: the pad value -1 saturates to 0 ...
        image, label = port_cirkd_item(image_path, raw, (256, 256), pad_label=-1)
        return image, label - 1  # ... and the shift makes padding and "other" -1

    compare_with_port(ds, 1, port)


def test_ade20k_listing_order_and_sorting(data):
    root, _ = data["ade20k"]
    listed = [f.rsplit(".", 1)[0] for f in os.listdir(root / "images" / "training") if f.endswith(".jpg")]
    assert [f[2] for f in ADE20KSet(root, "train").files] == listed
    assert [f[2] for f in ADE20KSet(root, "train", sort_files=True).files] == sorted(listed)


def test_ade20k_bad_input(data, tmp_path):
    with pytest.raises(UserError, match="has no images/training/ folder"):
        ADE20KSet(tmp_path)
    root, _ = data["ade20k"]
    copy = tmp_path / "ade"
    shutil.copytree(root, copy)
    label_path = sorted((copy / "annotations" / "validation").glob("*.png"))[0]
    label = cv2.imread(str(label_path), cv2.IMREAD_GRAYSCALE)
    label[0, 0] = 151
    cv2.imwrite(str(label_path), label)
    with pytest.raises(UserError, match="value 151, which is not a valid ADE20K label"):
        ADE20KSet(copy, "val", sort_files=True)[0]
    label_path.unlink()
    with pytest.raises(UserError, match=r"1 file\(s\) paired with the images in .*validation are missing"):
        ADE20KSet(copy, "val")


# ---------------------------------------------------------------- COCO-Stuff-164K (§4.2)

def test_coco_stuff_unlabelled_255_becomes_minus_one(data):
    root, paths = data["coco"]
    ds = COCOStuffSet(root, "val", list_path=paths["val"])
    image, label, _, name = ds[0]
    raw = cv2.imread(str(root / "annotations" / "val2017" / f"{name}.png"), cv2.IMREAD_GRAYSCALE)
    assert (raw == 255).any() and (raw == 181).any()
    np.testing.assert_array_equal(label, np.where(raw == 255, -1.0, raw.astype(np.float32)))


def test_coco_stuff_default_list_is_the_shipped_one(data):
    root, _ = data["coco"]
    with pytest.raises(UserError, match=r"10000 file\(s\) listed in .*coco_stuff_164k_val\.txt"):
        COCOStuffSet(root, "val")  # 5000 ids, image + label each


def test_coco_stuff_label_182_is_user_error(data, tmp_path):
    root, paths = data["coco"]
    copy = tmp_path / "coco"
    shutil.copytree(root, copy)
    name = Path(paths["train"]).read_text().split()[0]
    label_path = copy / "annotations" / "train2017" / f"{name}.png"
    label = cv2.imread(str(label_path), cv2.IMREAD_GRAYSCALE)
    label[0, 0] = 182
    cv2.imwrite(str(label_path), label)
    with pytest.raises(UserError, match="value 182, which is not a valid COCO-Stuff class"):
        COCOStuffSet(copy, "train", list_path=copy / "coco_stuff_164k_train.txt")[0]


# ---------------------------------------------------------------- the catalogue (§1.2, §1.5)

def test_class_counts_and_eval_splits():
    assert CIRKD_NUM_CLASSES == {"citys": 19, "voc": 21, "camvid": 11, "ade20k": 150, "coco_stuff_164k": 182}
    assert CIRKD_EVAL_SPLITS["camvid"] == "test"  # §1.5: CamVid uses the test list


@pytest.mark.parametrize("name", ["voc", "camvid", "ade20k", "coco_stuff_164k"])
def test_every_dataset_subtracts_the_bgr_mean_on_the_full_val_image(data, name):
    key = {"coco_stuff_164k": "coco"}.get(name, name)
    root, paths = data[key]
    split = "test" if name == "camvid" else "val"
    list_path = None if name == "ade20k" else paths[split]
    ds = cirkd_dataset(name, root, split, list_path=list_path)
    image = ds[0][0]
    raw = cv2.imread(ds.files[0][0], cv2.IMREAD_COLOR).astype(np.float64)
    np.testing.assert_allclose(image, (raw - MEAN_BGR).transpose(2, 0, 1), atol=1e-4)


def test_catalogue_bad_input(data):
    with pytest.raises(UserError, match="unknown --dataset 'cityscapes'"):
        cirkd_dataset("cityscapes", "/x", "train")
    with pytest.raises(UserError, match="ADE20K is read from its image folder"):
        cirkd_dataset("ade20k", data["ade20k"][0], "train", list_path="x.txt")
    with pytest.raises(UserError, match="crop size 360 has 1 number"):
        cirkd_dataset("camvid", data["camvid"][0], "train", list_path=data["camvid"][1]["train"], crop_size=(360,))

"""common.datasets.synthetic: layouts, determinism, class coverage, learnability, CLI."""
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import scipy.io
from PIL import Image

from common.datasets import cityscapes as cs
from common.datasets import synthetic
from common.errors import UserError


def _arrays(root):
    return {p.relative_to(root).as_posix(): cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
            for p in sorted(Path(root).rglob("*.png"))}


def test_cityscapes_layout_and_lists(synthetic_cityscapes):
    root = synthetic_cityscapes
    images = sorted((root / "leftImg8bit").rglob("*_leftImg8bit.png"))
    labels = sorted((root / "gtFine").rglob("*_gtFine_labelIds.png"))
    assert len(images) == 8 and len(labels) == 6
    for p in images:
        assert re.fullmatch(r"leftImg8bit/(train|val|test)/[a-z]+/[a-z]+_\d{6}_\d{6}_leftImg8bit\.png",
                            p.relative_to(root).as_posix())
    counts = {s: len((root / "lists" / f"{s}.lst").read_text().splitlines()) for s in ("train", "val", "test",
                                                                                      "trainval")}
    assert counts == {"train": 4, "val": 2, "test": 2, "trainval": 6}
    line = (root / "lists" / "val.lst").read_text().splitlines()[0]
    img, lab = line.split("\t")
    assert lab == img.replace("leftImg8bit/", "gtFine/", 1).replace("_leftImg8bit.png", "_gtFine_labelIds.png")
    assert "\t" not in (root / "lists" / "test.lst").read_text()
    image = cv2.imread(str(images[0]))
    assert image.shape == (256, 512, 3) and image.dtype == np.uint8


def test_cityscapes_classes_and_ignore_ids(tmp_path):
    paths = synthetic.make_cityscapes(tmp_path, {"train": 3, "val": 1, "test": 0}, size=(128, 256), seed=5)
    assert set(paths) == {"train", "val", "test", "trainval"}
    present = set()
    for _, label_path, _ in cs.read_list(paths["train"], tmp_path):
        label = cv2.imread(label_path, cv2.IMREAD_GRAYSCALE)
        assert set(np.unique(label)) <= set(range(34))
        present |= set(np.unique(cs.label_to_trainid(label)).tolist())
        assert {synthetic.EGO_VEHICLE, synthetic.STATIC} <= set(np.unique(label).tolist())
    assert present == set(range(19)) | {255}


def test_deterministic_from_seed(tmp_path):
    splits = {"train": 2, "val": 1, "test": 1}
    synthetic.make_cityscapes(tmp_path / "a", splits, size=(96, 192), seed=7)
    synthetic.make_cityscapes(tmp_path / "b", splits, size=(96, 192), seed=7)
    synthetic.make_cityscapes(tmp_path / "c", splits, size=(96, 192), seed=8)
    a, b, c = _arrays(tmp_path / "a"), _arrays(tmp_path / "b"), _arrays(tmp_path / "c")
    assert a.keys() == b.keys() == c.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not any(np.array_equal(a[k], c[k]) for k in a if "leftImg8bit" in k)
    # the first images do not depend on how many are requested
    synthetic.make_cityscapes(tmp_path / "d", {"train": 1}, size=(96, 192), seed=7)
    d = _arrays(tmp_path / "d")
    assert all(np.array_equal(d[k], a[k]) for k in d)


def test_classes_are_learnable_by_colour(synthetic_cityscapes):
    """A nearest-palette-colour pixel classifier already gets most pixels right (the data is learnable)."""
    ids = sorted(synthetic.COLOURS)
    palette = np.array([synthetic.COLOURS[i][::-1] for i in ids], np.float32)  # BGR
    correct = total = 0
    for image_path, label_path, _ in cs.read_list(synthetic_cityscapes / "lists" / "train.lst",
                                                  synthetic_cityscapes):
        image = cv2.imread(image_path).reshape(-1, 1, 3).astype(np.float32)
        label = cv2.imread(label_path, cv2.IMREAD_GRAYSCALE).reshape(-1)
        pred = np.array(ids)[((image - palette) ** 2).sum(-1).argmin(1)]
        correct += (pred == label).sum()
        total += label.size
    assert correct / total > 0.8


def test_camvid_layout(synthetic_camvid):
    root = synthetic_camvid
    expected = {"train": 4, "val": 2, "test": 3}
    for split, n in expected.items():
        lines = (root / f"{split}.txt").read_text().splitlines()
        assert len(lines) == n
        for line in lines:
            m = re.fullmatch(rf"/SegNet/CamVid/{split}/(\S+\.png) /SegNet/CamVid/{split}annot/(\S+\.png)", line)
            assert m and m.group(1) == m.group(2)
            image = cv2.imread(str(root / split / m.group(1)))
            label = cv2.imread(str(root / f"{split}annot" / m.group(2)), cv2.IMREAD_UNCHANGED)
            assert image.shape == (360, 480, 3) and label.shape == (360, 480) and label.dtype == np.uint8
            assert set(np.unique(label)) <= set(range(12))
    all_values = set()
    for p in (root / "trainannot").glob("*.png"):
        all_values |= set(np.unique(cv2.imread(str(p), cv2.IMREAD_UNCHANGED)).tolist())
    assert all_values == set(range(12))


def test_cli_and_bad_arguments(tmp_path, capsys):
    synthetic.main(["cityscapes", str(tmp_path / "cs"), "--train", "2", "--val", "1", "--test", "1",
                    "--size", "64x128", "--seed", "1"])
    assert "wrote 4 cityscapes images" in capsys.readouterr().out
    assert len((tmp_path / "cs" / "lists" / "train.lst").read_text().splitlines()) == 2
    synthetic.main(["camvid", str(tmp_path / "cv"), "--train", "1", "--val", "1", "--test", "0", "--size", "48x64"])
    assert (tmp_path / "cv" / "valannot").is_dir() and (tmp_path / "cv" / "test.txt").read_text() == ""
    with pytest.raises(SystemExit) as exc:
        synthetic.main(["cityscapes", str(tmp_path / "x"), "--size", "8x8"])
    assert exc.value.code == 2 and "too small" in capsys.readouterr().err
    with pytest.raises(UserError, match="splits"):
        synthetic.make_camvid(tmp_path / "y", {"training": 2})


# ---------------------------------------------------------------- CIRKD / AICSD layouts

def test_camvid_cirkd_lists_use_the_shipped_line_format(tmp_path):
    paths = synthetic.make_camvid(tmp_path, {"train": 2, "val": 1, "test": 1}, size=(48, 64), cirkd_lists=True)
    assert set(paths) == {"train", "val", "test", "trainval"}
    train = Path(paths["train"]).read_text().splitlines()
    assert train == ["train/0001TP_000000.png trainannot/0001TP_000000.png",
                     "train/0001TP_000001.png trainannot/0001TP_000001.png"]  # cirkd.md §4.2 list format
    assert Path(paths["trainval"]).read_text().splitlines() == train + Path(paths["val"]).read_text().splitlines()


def test_camvid_writes_no_cirkd_lists_by_default(tmp_path):
    synthetic.make_camvid(tmp_path, {"train": 1}, size=(48, 64))
    assert not list(tmp_path.glob("camvid_*_list.txt"))


def test_voc_layout_palette_and_label_values(tmp_path):
    paths = synthetic.make_voc(tmp_path, {"train": 2, "val": 1}, sbd={"train": 2, "val": 2}, size=(48, 64))
    for sub in ("JPEGImages", "SegmentationClass", "SegmentationClassAug", "ImageSets/Segmentation",
                "benchmark_RELEASE/dataset/img", "benchmark_RELEASE/dataset/cls"):
        assert (tmp_path / sub).is_dir(), sub
    png = Image.open(tmp_path / "SegmentationClass" / "2007_000000.png")
    assert png.mode == "P" and png.getpalette()[3:6] == [128, 0, 0]  # VOC colour of class 1
    values = set()
    for p in (tmp_path / "SegmentationClass").glob("*.png"):
        values |= set(np.unique(np.array(Image.open(p))).tolist())
    assert values <= set(range(21)) | {255} and 255 in values and 0 in values  # aicsd.md §5.1
    # train_aug = VOC train ∪ SBD − VOC val; SBD train = [first VOC train id, new], SBD val = [first val id, new]
    assert Path(paths["train_aug"]).read_text().split() == ["2007_000000", "2007_000001", "2011_000000",
                                                            "2011_000001"]
    mat = scipy.io.loadmat(tmp_path / "benchmark_RELEASE" / "dataset" / "cls" / "2011_000000.mat")
    assert mat["GTcls"][0]["Segmentation"][0].shape == (48, 64)


def test_ade20k_layout_and_label_values(tmp_path):
    paths = synthetic.make_ade20k(tmp_path, {"train": 2, "val": 1}, size=(48, 64))
    assert sorted(p.name for p in (tmp_path / "images" / "training").iterdir()) == ["ADE_train_00000001.jpg",
                                                                                   "ADE_train_00000002.jpg"]
    assert paths["val"] == str(tmp_path / "images" / "validation")
    label = cv2.imread(str(tmp_path / "annotations" / "validation" / "ADE_val_00000001.png"), cv2.IMREAD_UNCHANGED)
    assert label.shape == (48, 64) and label.min() == 0 and label.max() == 150  # cirkd.md §4.2: 150 classes, 0 other


def test_coco_stuff_layout_and_label_values(tmp_path):
    paths = synthetic.make_coco_stuff(tmp_path, {"train": 1, "val": 1}, size=(48, 64))
    name = Path(paths["val"]).read_text().split()[0]
    assert re.fullmatch(r"\d{12}", name) and (tmp_path / "images" / "val2017" / f"{name}.jpg").is_file()
    label = cv2.imread(str(tmp_path / "annotations" / "val2017" / f"{name}.png"), cv2.IMREAD_UNCHANGED)
    values = set(np.unique(label).tolist())
    assert values <= set(range(182)) | {255} and {0, 181, 255} <= values  # cirkd.md §4.2: 182 classes, 255 -> -1


@pytest.mark.parametrize("make", [synthetic.make_voc, synthetic.make_ade20k, synthetic.make_coco_stuff])
def test_new_layouts_are_deterministic_from_seed(tmp_path, make):
    make(tmp_path / "a", size=(40, 48), seed=3)
    make(tmp_path / "b", size=(40, 48), seed=3)
    make(tmp_path / "c", size=(40, 48), seed=4)
    a, b, c = _arrays(tmp_path / "a"), _arrays(tmp_path / "b"), _arrays(tmp_path / "c")
    assert a.keys() == b.keys() == c.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert not all(np.array_equal(a[k], c[k]) for k in a)


def test_cli_new_layouts(tmp_path, capsys):
    synthetic.main(["voc", str(tmp_path / "voc"), "--train", "1", "--val", "1", "--sbd-train", "1", "--size", "40x48"])
    assert "wrote 2 voc images" in capsys.readouterr().out
    assert (tmp_path / "voc" / "benchmark_RELEASE" / "dataset" / "train.txt").is_file()
    synthetic.main(["ade20k", str(tmp_path / "ade"), "--train", "1", "--val", "0", "--size", "40x48"])
    assert len(list((tmp_path / "ade" / "images" / "training").glob("*.jpg"))) == 1
    with pytest.raises(SystemExit) as exc:
        synthetic.main(["coco_stuff", str(tmp_path / "coco"), "--test", "2"])
    assert exc.value.code == 2 and "no test split" in capsys.readouterr().err

"""common.datasets.synthetic: layouts, determinism, class coverage, learnability, CLI."""
import re
from pathlib import Path

import cv2
import numpy as np
import pytest

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

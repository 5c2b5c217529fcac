"""common.datasets: Cityscapes lists/mapping/samples (spec C.5), lineage presets, VOC, bad input."""
import random
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from common.datasets import cityscapes as cs
from common.datasets.transforms import build_transform
from common.datasets.voc import VOCDataSet
from common.errors import UserError


def original_trainval_item(image_path, label_path, crop, scale, mirror, ignore=255):
    """A port of the original IFVD ``CSTrainValSet.__getitem__`` (loop mapping, copyMakeBorder)."""
    image = cv2.imread(image_path, cv2.IMREAD_COLOR)
    label = cv2.imread(label_path, cv2.IMREAD_GRAYSCALE)
    copy = label.copy()
    for k, v in cs.ID_TO_TRAINID.items():
        copy[label == k] = v
    label = copy
    size = image.shape
    if scale:
        f = 0.7 + random.randint(0, 14) / 10.0
        image = cv2.resize(image, None, fx=f, fy=f, interpolation=cv2.INTER_LINEAR)
        label = cv2.resize(label, None, fx=f, fy=f, interpolation=cv2.INTER_NEAREST)
    image = np.asarray(image, np.float32)
    image -= np.array(cs.IMG_MEAN_BGR)
    h, w = label.shape
    pad_h, pad_w = max(crop[0] - h, 0), max(crop[1] - w, 0)
    if pad_h > 0 or pad_w > 0:
        image = cv2.copyMakeBorder(image, 0, pad_h, 0, pad_w, cv2.BORDER_CONSTANT, value=(0.0, 0.0, 0.0))
        label = cv2.copyMakeBorder(label, 0, pad_h, 0, pad_w, cv2.BORDER_CONSTANT, value=(ignore,))
    h, w = label.shape
    h_off, w_off = random.randint(0, h - crop[0]), random.randint(0, w - crop[1])
    image = np.asarray(image[h_off:h_off + crop[0], w_off:w_off + crop[1]], np.float32)
    label = np.asarray(label[h_off:h_off + crop[0], w_off:w_off + crop[1]], np.float32)
    image = image.transpose((2, 0, 1))
    if mirror:
        flip = np.random.choice(2) * 2 - 1
        image, label = image[:, :, ::flip], label[:, ::flip]
    return image.copy(), label.copy(), np.array(size)


def lists(root):
    return {s: root / "lists" / f"{s}.lst" for s in ("train", "val", "test", "trainval")}


# ---------------------------------------------------------------- label mapping

def test_label_mapping_matches_table_and_does_not_chain():
    ids = np.arange(256, dtype=np.uint8)
    ids = ids[(ids < 34) | (ids == 255)]
    out = cs.label_to_trainid(ids)
    for lid, tid in zip(ids, out):
        expected = cs.ID_TO_TRAINID.get(int(lid), 255) if lid != 255 else 255
        assert tid == expected, lid
    assert out.dtype == np.uint8
    assert sorted(set(out.tolist()) - {255}) == list(range(19))
    # 8 -> 1 must not chain into 1 -> 255
    assert cs.label_to_trainid(np.array([[8, 1]], np.uint8)).tolist() == [[1, 255]]


def test_label_mapping_ignore_minus_one_and_inverse():
    out = cs.label_to_trainid(np.array([[0, 7, 33, 255]], np.uint8), ignore_index=-1)
    assert out.dtype == np.int32 and out.tolist() == [[-1, 0, 18, -1]]
    pred = np.arange(19).reshape(1, 19)
    back = cs.trainid_to_labelid(pred)
    assert cs.label_to_trainid(back).tolist() == pred.tolist()
    with pytest.raises(UserError, match="0..18"):
        cs.trainid_to_labelid(np.array([19]))


def test_label_value_outside_mapping_is_user_error():
    with pytest.raises(UserError, match="value 40"):
        cs.label_to_trainid(np.array([[7, 40]], np.uint8), path="x.png")


# ---------------------------------------------------------------- lists

def test_read_list_format_and_names(synthetic_cityscapes):
    entries = cs.read_list(lists(synthetic_cityscapes)["train"], synthetic_cityscapes)
    assert len(entries) == 4
    img, lab, name = entries[0]
    assert img.endswith("_leftImg8bit.png") and lab.endswith("_gtFine_labelIds.png")
    assert name == Path(lab).stem  # C.5: name is the label stem
    test = cs.read_list(lists(synthetic_cityscapes)["test"], synthetic_cityscapes, with_labels=False)
    assert test[0][1] is None and test[0][2] == Path(test[0][0]).stem
    trainval = lists(synthetic_cityscapes)["trainval"].read_text().splitlines()
    assert trainval == (lists(synthetic_cityscapes)["train"].read_text().splitlines()
                        + lists(synthetic_cityscapes)["val"].read_text().splitlines())


def test_read_list_bad_input(synthetic_cityscapes, tmp_path):
    root = synthetic_cityscapes
    with pytest.raises(UserError, match="dataset root .* does not exist"):
        cs.read_list(lists(root)["train"], tmp_path / "nope")
    with pytest.raises(UserError, match="list file .* does not exist.*make-lists"):
        cs.read_list(tmp_path / "missing.lst", root)
    with pytest.raises(UserError, match="line 1 .* one column"):
        cs.read_list(lists(root)["test"], root, with_labels=True)
    bad = tmp_path / "bad.lst"
    good = lists(root)["train"].read_text().splitlines()
    bad.write_text("\n".join(good[:1] + ["leftImg8bit/train/x/a.png\tgtFine/a.png", "b.png\tc.png"]) + "\n")
    with pytest.raises(UserError, match=r"^4 file\(s\) .* first is .*x/a\.png"):
        cs.read_list(bad, root)


def test_default_list_resolution(synthetic_cityscapes, tmp_path, monkeypatch):
    monkeypatch.setattr(cs, "LIST_DIR", tmp_path / "pkg")
    assert cs.default_list("val", synthetic_cityscapes) == str(lists(synthetic_cityscapes)["val"])
    with pytest.raises(UserError, match="make-lists"):
        cs.default_list("val", tmp_path)
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "val.lst").write_text("x\ty\n")
    assert cs.default_list("val", synthetic_cityscapes) == str(tmp_path / "pkg" / "val.lst")


def test_package_list_dir_has_readme():
    readme = (Path(cs.__file__).parent / "lists" / "cityscapes" / "README.txt").read_text()
    assert "make-lists" in readme and "2975" in readme


def test_make_lists_cli_reproduces_lists_and_warns(synthetic_cityscapes, tmp_path, capsys):
    cs.main(["make-lists", str(synthetic_cityscapes), "--out", str(tmp_path)])
    captured = capsys.readouterr()
    assert "train.lst has 4 lines, the original has 2975" in captured.err
    assert "trainval: 6 lines" in captured.out
    for split, path in lists(synthetic_cityscapes).items():
        assert (tmp_path / f"{split}.lst").read_text() == path.read_text()
    with pytest.raises(SystemExit) as exc:
        cs.main(["make-lists", str(tmp_path / "x")])
    assert exc.value.code == 2 and capsys.readouterr().err.startswith("error: ")


# ---------------------------------------------------------------- samples (C.5)

@pytest.mark.parametrize("scale,mirror,crop", [(False, False, (128, 256)), (True, True, (200, 300)),
                                              (False, True, (300, 600))])
def test_trainval_sample_matches_original(synthetic_cityscapes, scale, mirror, crop):
    ds = cs.CSTrainValSet(synthetic_cityscapes, lists(synthetic_cityscapes)["train"], crop_size=crop,
                          scale=scale, mirror=mirror)
    img_path, lab_path, name = ds.files[1]
    for seed in range(3):
        random.seed(seed)
        np.random.seed(seed)
        image, label, size, got_name = ds[1]
        random.seed(seed)
        np.random.seed(seed)
        ref_image, ref_label, ref_size = original_trainval_item(img_path, lab_path, crop, scale, mirror)
        assert image.dtype == np.float32 and label.dtype == np.float32
        assert image.shape == (3, *crop) and label.shape == crop
        np.testing.assert_array_equal(label, ref_label)
        np.testing.assert_allclose(image, ref_image, atol=1e-4)
        assert tuple(size) == tuple(ref_size) == (256, 512, 3) and got_name == name


def test_padding_fills_zero_image_and_ignore_label(synthetic_cityscapes):
    ds = cs.CSTrainValSet(synthetic_cityscapes, lists(synthetic_cityscapes)["val"], crop_size=(1024, 2048))
    image, label, size, _ = ds[0]
    assert image.shape == (3, 1024, 2048)
    assert (image[:, 256:, :] == 0).all() and (image[:, :, 512:] == 0).all()
    assert (label[256:, :] == 255).all() and (label[:, 512:] == 255).all()
    assert (label[:256, :512] != 255).any()
    ds = cs.CSTrainValSet(synthetic_cityscapes, lists(synthetic_cityscapes)["val"], crop_size=(1024, 2048),
                          ignore_label=-1)
    assert (ds[0][1][256:, :] == -1).all()


def test_full_image_val_is_identity(synthetic_cityscapes):
    ds = cs.CSTrainValSet(synthetic_cityscapes, lists(synthetic_cityscapes)["val"], crop_size=None)
    state = random.getstate()
    image, label, size, _ = ds[0]
    assert random.getstate() == state  # no random draw
    raw = cv2.imread(ds.files[0][0])
    np.testing.assert_allclose(image, (raw - np.array(cs.IMG_MEAN_BGR)).transpose(2, 0, 1), atol=1e-4)
    np.testing.assert_array_equal(label, cs.label_to_trainid(cv2.imread(ds.files[0][1], 0)))


def test_max_iters_truncates_for_ifvd_not_for_skd(synthetic_cityscapes):
    train = lists(synthetic_cityscapes)["train"]
    assert len(cs.CSTrainValSet(synthetic_cityscapes, train, max_iters=10)) == 10
    assert len(cs.CSTrainValSet(synthetic_cityscapes, train, max_iters=10, truncate=False)) == 12


def test_labeltrainids_files_are_accepted(tmp_path):
    from common.datasets.synthetic import make_cityscapes

    make_cityscapes(tmp_path, {"train": 2, "val": 1, "test": 0}, size=(64, 128), seed=3, write_trainids=True)
    paths = cs.write_lists(tmp_path, tmp_path / "tid", label_suffix="_gtFine_labelTrainIds.png")
    a = cs.CSTrainValSet(tmp_path, tmp_path / "lists" / "train.lst", crop_size=None, ignore_label=-1)
    b = cs.CSTrainValSet(tmp_path, paths["train"], crop_size=None, ignore_label=-1)
    assert b.files[0][1].endswith("_labelTrainIds.png")
    np.testing.assert_array_equal(a[0][1], b[0][1])
    assert (b[0][1] == -1).any()
    bad = cv2.imread(b.files[0][1], 0)
    bad[0, 0] = 19
    cv2.imwrite(b.files[0][1], bad)
    with pytest.raises(UserError, match="value 19.*trainId"):
        b[0]


def test_unreadable_image_and_bad_label_are_user_errors(tmp_path):
    from common.datasets.synthetic import make_cityscapes

    make_cityscapes(tmp_path, {"train": 2, "val": 0, "test": 0}, size=(64, 128), seed=1)
    ds = cs.CSTrainValSet(tmp_path, tmp_path / "lists" / "train.lst", crop_size=(32, 32))
    Path(ds.files[0][0]).write_bytes(b"not a png")
    with pytest.raises(UserError, match="cannot read the image"):
        ds[0]
    label = cv2.imread(ds.files[1][1], 0)
    label[5, 5] = 50
    cv2.imwrite(ds.files[1][1], label)
    with pytest.raises(UserError, match="value 50"):
        ds[1]


def test_test_set(synthetic_cityscapes):
    ds = cs.CSTestSet(synthetic_cityscapes, lists(synthetic_cityscapes)["test"], crop_size=(300, 600))
    image, size, name = ds[0]
    assert image.shape == (3, 300, 600) and tuple(size) == (256, 512, 3)
    assert name.endswith("_leftImg8bit") and (image[:, 256:] == 0).all()
    full = cs.CSTestSet(synthetic_cityscapes, lists(synthetic_cityscapes)["test"], crop_size=None)
    np.testing.assert_array_equal(full[0][0], image[:, :256, :512])


def test_dataloader_workers_reproducible_from_seed(synthetic_cityscapes):
    ds = cs.CSTrainValSet(synthetic_cityscapes, lists(synthetic_cityscapes)["train"], crop_size=(64, 64),
                          scale=True, mirror=True)

    def run(seed):
        loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2,
                                             generator=torch.Generator().manual_seed(seed))
        return torch.cat([b[0] for b in loader])

    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a, b) and not torch.equal(a, c)


# ---------------------------------------------------------------- presets

def test_cirkd_preset_scales_pads_with_minus_one(synthetic_cityscapes):
    t = build_transform("cirkd", True, crop_size=(512, 1024))
    ds = cs.CSTrainValSet(synthetic_cityscapes, lists(synthetic_cityscapes)["train"], transform=t)
    random.seed(0)
    np.random.seed(0)
    factors = {round(0.5 + random.randint(0, 15) / 10.0, 1) for _ in range(400)}
    assert min(factors) == 0.5 and max(factors) == 2.0 and len(factors) == 16
    image, label, _, _ = ds[0]
    assert image.shape == (3, 512, 1024) and label.shape == (512, 1024)
    assert (label == -1).any() and not (label == 255).any()
    assert set(np.unique(label)) <= set(range(-1, 19))
    val = build_transform("cirkd", False)
    assert val.crop_size is None and val.ignore_label == -1


def test_aicsd_preset(synthetic_cityscapes):
    train = cs.CSTrainValSet(synthetic_cityscapes, lists(synthetic_cityscapes)["train"],
                             transform=build_transform("aicsd", True))
    random.seed(1)
    image, label, _, _ = train[0]
    assert image.shape == (3, 513, 513) and label.shape == (513, 513)
    assert -2.2 < image.min() < 0 < image.max() < 2.7  # /255, ImageNet mean/std
    assert set(np.unique(label)) <= set(range(19)) | {255}
    val = cs.CSTrainValSet(synthetic_cityscapes, lists(synthetic_cityscapes)["val"],
                           transform=build_transform("aicsd", False))
    image, label, _, _ = val[0]
    assert image.shape == (3, 513, 1026) and label.shape == (513, 1026)
    raw = cv2.imread(val.files[0][0])[:, :, ::-1]
    ref = np.asarray(Image.fromarray(np.ascontiguousarray(raw)).resize((1026, 513), Image.BILINEAR), np.float32)
    np.testing.assert_allclose(image[0], (ref[..., 0] / 255.0 - 0.485) / 0.229, atol=1e-5)
    with pytest.raises(UserError, match="unknown preprocessing preset"):
        build_transform("mmseg")


# ---------------------------------------------------------------- VOC

def make_voc(root, n=3):
    palette = sum(([i * 10 % 256, 0, 255 - i] for i in range(256)), [])
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClassAug").mkdir()
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        cv2.imwrite(str(root / "JPEGImages" / f"2007_{i:06d}.jpg"), rng.integers(0, 255, (60, 80, 3), np.uint8))
        label = rng.integers(0, 21, (60, 80)).astype(np.uint8)
        label[::3] = 255
        png = Image.fromarray(label, mode="P")
        png.putpalette(palette)
        png.save(root / "SegmentationClassAug" / f"2007_{i:06d}.png")
    (root / "ImageSets" / "Segmentation" / "train_aug.txt").write_text(
        "".join(f"2007_{i:06d}\n" for i in range(n)))


def test_voc_cirkd_convention(tmp_path):
    make_voc(tmp_path)
    ds = VOCDataSet(tmp_path, "train_aug", max_iters=7, crop_size=(64, 64))
    assert len(ds) == 9  # repeated, not truncated
    random.seed(0)
    image, label, size, name = ds[0]
    assert image.shape == (3, 64, 64) and tuple(size) == (60, 80, 3) and name == "2007_000000"
    assert (label == -1).any() and set(np.unique(label)) <= set(range(-1, 21))
    two_col = tmp_path / "pairs.txt"
    two_col.write_text("/JPEGImages/2007_000001.jpg /SegmentationClassAug/2007_000001.png\n")
    val = VOCDataSet(tmp_path, "val", list_path=two_col)
    image, label, _, _ = val[0]
    ref = np.array(Image.open(tmp_path / "SegmentationClassAug" / "2007_000001.png")).astype(np.float32)
    ref[ref == 255] = -1
    assert image.shape == (3, 60, 80)
    np.testing.assert_array_equal(label, ref)


def test_voc_bad_input(tmp_path):
    with pytest.raises(UserError, match="VOC root"):
        VOCDataSet(tmp_path / "none")
    make_voc(tmp_path)
    with pytest.raises(UserError, match="val.txt does not exist"):
        VOCDataSet(tmp_path, "val")
    (tmp_path / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000000\n2007_000009\n")
    with pytest.raises(UserError, match=r"^3 file\(s\) .* first is .*SegmentationClass/2007_000000\.png"):
        VOCDataSet(tmp_path, "val")
    Image.fromarray(np.full((60, 80), 30, np.uint8)).save(tmp_path / "SegmentationClassAug" / "2007_000002.png")
    ds = VOCDataSet(tmp_path, "train_aug")
    with pytest.raises(UserError, match="value 30"):
        ds[2]

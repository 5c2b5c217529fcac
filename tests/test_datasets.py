"""common.datasets: Cityscapes label map, mean, lists, samples (ifvd_skd.md C.5), the three lineage presets.

Expected values are literals from the specs (section in the comment) or a line-by-line port of the original
code written here, never the module's own constants.
"""
import random
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from common.datasets import cityscapes as cs
from common.datasets.transforms import build_transform
from common.errors import UserError

REPO = Path(__file__).resolve().parents[1]

# ifvd_skd.md C.5 "Label mapping" table (labelId -> trainId); cirkd.md §4.1 and aicsd.md §5.2 give the same.
SPEC_TRAINID = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
# C.5: "The ids mapped to 255 are -1, 0-6, 9, 10, 14, 15, 16, 18, 29 and 30" (-1 is stored as 255 in a PNG).
SPEC_IGNORED_IDS = [0, 1, 2, 3, 4, 5, 6, 9, 10, 14, 15, 16, 18, 29, 30]
# C.5 step 4 (also cirkd.md §4.1): BGR order, no std.
SPEC_MEAN_BGR = (104.00698793, 116.66876762, 122.67891434)


def original_trainval_item(image_path, label_path, crop, scale, mirror, ignore=255):
    """A port of the original IFVD ``CSTrainValSet.__getitem__`` (C.5 steps 1-9: loop mapping, copyMakeBorder)."""
    image = cv2.imread(image_path, cv2.IMREAD_COLOR)
    label = cv2.imread(label_path, cv2.IMREAD_GRAYSCALE)
    copy = label.copy()
    for k, v in {**SPEC_TRAINID, **dict.fromkeys(SPEC_IGNORED_IDS, 255)}.items():
        copy[label == k] = v
    label = copy
    size = image.shape
    if scale:
        f = 0.7 + random.randint(0, 14) / 10.0
        image = cv2.resize(image, None, fx=f, fy=f, interpolation=cv2.INTER_LINEAR)
        label = cv2.resize(label, None, fx=f, fy=f, interpolation=cv2.INTER_NEAREST)
    image = np.asarray(image, np.float32)
    image -= np.array(SPEC_MEAN_BGR)
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


def output_sides(transform, n, side=100):
    """Heights of ``transform``'s output for a side x side input, over ``n`` seeded draws."""
    image, label = np.zeros((side, side, 3), np.uint8), np.zeros((side, side), np.uint8)
    random.seed(0)
    np.random.seed(0)
    return [transform(image, label)[1].shape[0] for _ in range(n)]


# ---------------------------------------------------------------- label mapping (C.5)

def test_every_labelid_maps_to_the_spec_trainid():
    ids = np.array(sorted(SPEC_TRAINID), np.uint8)
    assert cs.label_to_trainid(ids).tolist() == [SPEC_TRAINID[i] for i in sorted(SPEC_TRAINID)]


def test_ignored_labelids_and_minus_one_map_to_255():
    ids = np.array(SPEC_IGNORED_IDS + [255], np.uint8)
    assert cs.label_to_trainid(ids).tolist() == [255] * len(ids)


def test_mapping_reads_the_original_array_so_entries_do_not_chain():
    # 8 -> 1 must not chain into 1 -> 255 (C.5: "compares against the original array")
    assert cs.label_to_trainid(np.array([[8, 1]], np.uint8)).tolist() == [[1, 255]]


def test_ignore_minus_one_gives_int32_minus_one():
    out = cs.label_to_trainid(np.array([[0, 7, 33, 255]], np.uint8), ignore_index=-1)
    assert out.dtype == np.int32 and out.tolist() == [[-1, 0, 18, -1]]


def test_trainid_to_labelid_is_the_spec_inverse():
    # cirkd.md §1.6: 0->7, 1->8, ..., 18->33
    pred = np.arange(19).reshape(1, 19)
    assert cs.trainid_to_labelid(pred).tolist() == [[7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28,
                                                     31, 32, 33]]
    with pytest.raises(UserError, match="0..18"):
        cs.trainid_to_labelid(np.array([19]))


def test_label_value_outside_the_labelids_is_user_error():
    with pytest.raises(UserError, match="x.png holds the value 40"):
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


def test_read_list_accepts_crlf_and_space_separated_lines(synthetic_cityscapes, tmp_path):
    # the shipped psp test.lst has CRLF endings; one CIRKD trainval.lst line uses spaces (data/lists README)
    line = lists(synthetic_cityscapes)["train"].read_text().splitlines()[0]
    odd = tmp_path / "odd.lst"
    odd.write_bytes((line + "\r\n" + line.replace("\t", "   ") + "\n").encode())
    entries = cs.read_list(odd, synthetic_cityscapes)
    assert entries[0] == entries[1] and entries[0][0] == str(synthetic_cityscapes / line.split("\t")[0])


def test_read_list_missing_root_and_list(synthetic_cityscapes, tmp_path):
    with pytest.raises(UserError, match="dataset root .* does not exist"):
        cs.read_list(lists(synthetic_cityscapes)["train"], tmp_path / "nope")
    with pytest.raises(UserError, match="list file .* does not exist.*make-lists"):
        cs.read_list(tmp_path / "missing.lst", synthetic_cityscapes)


def test_read_list_malformed_line_is_user_error(synthetic_cityscapes, tmp_path):
    with pytest.raises(UserError, match="line 1 of .*test.lst has 1 field"):
        cs.read_list(lists(synthetic_cityscapes)["test"], synthetic_cityscapes, with_labels=True)
    bad = tmp_path / "three.lst"
    bad.write_text("a.png\tb.png\tc.png\n")
    with pytest.raises(UserError, match="line 1 of .* has 3 field"):
        cs.read_list(bad, synthetic_cityscapes)


def test_read_list_missing_files_are_counted_and_the_first_named(synthetic_cityscapes, tmp_path):
    good = lists(synthetic_cityscapes)["train"].read_text().splitlines()
    bad = tmp_path / "bad.lst"
    bad.write_text("\n".join(good[:1] + ["leftImg8bit/train/x/a.png\tgtFine/a.png", "b.png\tc.png"]) + "\n")
    with pytest.raises(UserError, match=r"^4 file\(s\) .* first is .*x/a\.png"):
        cs.read_list(bad, synthetic_cityscapes)


def test_make_lists_cli_reproduces_lists_and_warns(synthetic_cityscapes, tmp_path, capsys):
    cs.main(["make-lists", str(synthetic_cityscapes), "--out", str(tmp_path)])
    captured = capsys.readouterr()
    assert "train.lst has 4 lines, the original has 2975" in captured.err  # C.5 table
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


def test_image_is_bgr_minus_the_spec_mean(synthetic_cityscapes):
    ds = cs.CSTrainValSet(synthetic_cityscapes, lists(synthetic_cityscapes)["val"], crop_size=None)
    image = ds[0][0]
    raw = cv2.imread(ds.files[0][0]).astype(np.float64)  # BGR
    np.testing.assert_allclose(image, (raw - np.array(SPEC_MEAN_BGR)).transpose(2, 0, 1), atol=1e-4)


def test_full_image_val_draws_nothing(synthetic_cityscapes):
    ds = cs.CSTrainValSet(synthetic_cityscapes, lists(synthetic_cityscapes)["val"], crop_size=None)
    state, np_state = random.getstate(), np.random.get_state()[1].copy()
    image, label, size, _ = ds[0]
    assert random.getstate() == state and np.array_equal(np.random.get_state()[1], np_state)
    assert image.shape == (3, 256, 512) and label.shape == (256, 512)


def test_padding_fills_zero_image_and_ignore_label(synthetic_cityscapes):
    ds = cs.CSTrainValSet(synthetic_cityscapes, lists(synthetic_cityscapes)["val"], crop_size=(1024, 2048))
    image, label, size, _ = ds[0]
    assert image.shape == (3, 1024, 2048)
    assert (image[:, 256:, :] == 0).all() and (image[:, :, 512:] == 0).all()
    assert (label[256:, :] == 255).all() and (label[:, 512:] == 255).all()
    assert (label[:256, :512] != 255).any()


def test_ignore_label_minus_one_reaches_the_padding(synthetic_cityscapes):
    ds = cs.CSTrainValSet(synthetic_cityscapes, lists(synthetic_cityscapes)["val"], crop_size=(1024, 2048),
                          ignore_label=-1)
    label = ds[0][1]
    assert (label[256:, :] == -1).all() and not (label == 255).any()


def test_max_iters_truncates_for_ifvd_not_for_skd(synthetic_cityscapes):
    # A.5: repeated ceil(10/4) = 3 times and truncated to 10; B.5: not truncated (12)
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


# ---------------------------------------------------------------- presets: scale sets, crops, pads

def test_psp_scale_set_is_0_7_to_2_1():
    # C.5 step 3: f = 0.7 + randint(0,14)/10, uniform over {0.7, ..., 2.1}
    sides = output_sides(build_transform("psp", True, scale=True, crop_size=None), 400)
    assert {s / 100 for s in sides} == {0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7, 1.8, 1.9, 2.0, 2.1}


def test_cirkd_scale_set_is_0_5_to_2_0():
    # cirkd.md §4.1: f in {0.5, 0.6, ..., 2.0}, 16 equiprobable values
    sides = output_sides(build_transform("cirkd", True, crop_size=None), 400)
    assert {s / 100 for s in sides} == {0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7, 1.8, 1.9,
                                        2.0}


def test_psp_preset_does_not_scale_by_default():
    # IFVD/CWD/SKD: --random-scale is off unless asked (C.5 "If scale is on")
    assert set(output_sides(build_transform("psp", True, crop_size=None), 20)) == {100}


def short_sides(monkeypatch, pick):
    """Short side drawn by the aicsd preset when ``random.randint`` returns ``pick(a, b)``: the transform pads
    the resized 8x16 image into a 1100 crop, so the rows not filled with the mask fill are the short side."""
    monkeypatch.setattr(random, "randint", pick)
    t = build_transform("aicsd", True, crop_size=1100)
    label = t(np.zeros((8, 16, 3), np.uint8), np.zeros((8, 16), np.uint8))[1]
    return int((label != 255).any(axis=1).sum())


def test_aicsd_short_side_range_is_256_to_1026(monkeypatch):
    # aicsd.md §5.3: s ~ U[floor(0.5*513), floor(2*513)] = [256, 1026], inclusive
    assert short_sides(monkeypatch, lambda a, b: a) == 256
    assert short_sides(monkeypatch, lambda a, b: b) == 1026


def test_cirkd_crop_is_512x1024_and_pads_minus_one_and_zero(synthetic_cityscapes, monkeypatch):
    # cirkd.md §4.1 / §9: output crop exactly 512x1024, padding label -1 and image 0
    ds = cs.CSTrainValSet(synthetic_cityscapes, lists(synthetic_cityscapes)["train"],
                          transform=build_transform("cirkd", True))
    monkeypatch.setattr(random, "randint", lambda a, b: a)  # f = 0.5: 256x512 -> 128x256, offsets 0
    monkeypatch.setattr(np.random, "choice", lambda n: 1)  # flip = 1*2-1 = +1: not mirrored
    image, label, _, _ = ds[0]
    assert image.shape == (3, 512, 1024) and label.shape == (512, 1024)
    assert (label[128:] == -1).all() and (label[:, 256:] == -1).all() and (image[:, 128:] == 0).all()
    assert set(np.unique(label[:128, :256])) <= set(range(-1, 19)) and not (label == 255).any()


def test_cirkd_val_is_the_full_image_with_minus_one(synthetic_cityscapes):
    ds = cs.CSTrainValSet(synthetic_cityscapes, lists(synthetic_cityscapes)["val"],
                          transform=build_transform("cirkd", False))
    image, label, _, _ = ds[0]
    raw = cv2.imread(ds.files[0][1], cv2.IMREAD_GRAYSCALE)
    assert image.shape == (3, 256, 512)
    assert ((label == -1) == np.isin(raw, SPEC_IGNORED_IDS)).all()


def test_aicsd_cityscapes_pad_is_255_and_image_pad_is_normalised_black(synthetic_cityscapes, monkeypatch):
    # aicsd.md §5.3 step 2: pad right/bottom, image 0 (then /255, -mean, /std), mask fill 255 for Cityscapes
    ds = cs.CSTrainValSet(synthetic_cityscapes, lists(synthetic_cityscapes)["train"],
                          transform=build_transform("aicsd", True))
    monkeypatch.setattr(random, "randint", lambda a, b: a)  # s = 256: 256x512 stays, padded to 513 rows
    monkeypatch.setattr(random, "random", lambda: 0.9)  # no flip, no blur
    image, label, _, _ = ds[0]
    assert image.shape == (3, 513, 513) and (label[256:] == 255).all() and (label[:256] != 255).any()
    black = [-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225]
    np.testing.assert_allclose(image[:, 256:, :].reshape(3, -1).max(1), black, rtol=1e-6)
    np.testing.assert_allclose(image[:, 256:, :].reshape(3, -1).min(1), black, rtol=1e-6)


def test_aicsd_val_short_side_is_513(synthetic_cityscapes):
    # aicsd.md §5.3: Resize(513) with an int: Cityscapes 1024x2048 -> 513x1026; here 256x512 -> 513x1026
    ds = cs.CSTrainValSet(synthetic_cityscapes, lists(synthetic_cityscapes)["val"],
                          transform=build_transform("aicsd", False))
    image, label, _, _ = ds[0]
    assert image.shape == (3, 513, 1026) and label.shape == (513, 1026)


def test_unknown_preset_and_one_number_crop_are_user_errors():
    with pytest.raises(UserError, match="unknown preprocessing preset 'mmseg'"):
        build_transform("mmseg")
    with pytest.raises(UserError, match="crop size 512 has 1 number"):
        build_transform("cirkd", True, crop_size=(512,))
    with pytest.raises(UserError, match="AICSD crops are square"):
        build_transform("aicsd", True, crop_size=(513, 600))


# ---------------------------------------------------------------- module structure (issue 9 item 7)

def test_transforms_import_without_cityscapes():
    code = ("import sys, common.datasets.transforms as t; "
            "assert 'common.datasets.cityscapes' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_module_cli_runs_without_double_import_warning():
    command = [sys.executable, "-W", "error::RuntimeWarning", "-m", "common.datasets.cityscapes", "--help"]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0 and "make-lists" in proc.stdout, proc.stderr

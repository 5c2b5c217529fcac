"""The originals' list files shipped as package data (../shared/data/lists/README.md, ifvd_skd.md C.5,
cirkd.md §4.1-4.2): counts, bytes, formats, default resolution, and make-lists writing the same format."""
import re
from pathlib import Path

import pytest

from common.datasets import cityscapes as cs
from common.datasets.synthetic import make_cityscapes
from common.errors import UserError

REPO = Path(__file__).resolve().parents[1]
LISTS = REPO / "common" / "datasets" / "lists"
SHARED = REPO.parent / "shared" / "data" / "lists"

# Line counts from ../shared/data/lists/README.md (and ifvd_skd.md C.5, cirkd.md §4.1-4.2).
COUNTS = {
    "cityscapes/psp/train.lst": 2975, "cityscapes/psp/val.lst": 500, "cityscapes/psp/test.lst": 1525,
    "cityscapes/psp/trainval.lst": 3475,
    "cityscapes/cirkd/train.lst": 2975, "cityscapes/cirkd/val.lst": 500, "cityscapes/cirkd/test.lst": 1525,
    "cityscapes/cirkd/trainval.lst": 3475,
    "camvid/camvid_train_list.txt": 367, "camvid/camvid_val_list.txt": 101, "camvid/camvid_test_list.txt": 233,
    "camvid/camvid_trainval_list.txt": 468,
    "voc/train_aug.txt": 10582, "voc/val.txt": 1449,
    "coco_stuff_164k/coco_stuff_164k_train.txt": 118287, "coco_stuff_164k/coco_stuff_164k_val.txt": 5000,
}
LABELLED_LINE = re.compile(r"leftImg8bit/(?P<split>train|val)/(?P<city>[a-z_]+)/(?P<stem>\w+)_leftImg8bit\.png"
                           r"\tgtFine/(?P=split)/(?P=city)/(?P=stem)_gtFine_labelIds\.png")
TEST_LINE = re.compile(r"leftImg8bit/test/[a-z_]+/\w+_leftImg8bit\.png")


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_shipped_list_has_the_original_line_count(name):
    assert len((LISTS / name).read_bytes().splitlines()) == COUNTS[name]


def test_nothing_else_is_shipped_but_the_readme():
    shipped = {p.relative_to(LISTS).as_posix() for p in LISTS.rglob("*") if p.is_file()}
    assert shipped == set(COUNTS) | {"README.txt"}


@pytest.mark.realdata
@pytest.mark.parametrize("name", sorted(COUNTS))
def test_shipped_list_is_byte_identical_to_the_original(name):
    if not (SHARED / name).is_file():
        pytest.skip("../shared/data/lists not found beside the repository")
    assert (LISTS / name).read_bytes() == (SHARED / name).read_bytes()


def test_psp_test_list_keeps_crlf_and_cirkd_test_list_lf():
    # data/lists README: "test.lst has CRLF line endings" (psp); CIRKD's copy "has LF endings"
    psp, cirkd = (LISTS / "cityscapes/psp/test.lst").read_bytes(), (LISTS / "cityscapes/cirkd/test.lst").read_bytes()
    assert psp.count(b"\r\n") == 1525 and b"\r" not in cirkd
    assert psp.replace(b"\r\n", b"\n") == cirkd


def test_cirkd_trainval_has_one_space_separated_line():
    lines = (LISTS / "cityscapes/cirkd/trainval.lst").read_text().splitlines()
    spaced = [line for line in lines if "\t" not in line]
    assert len(spaced) == 1 and "aachen_000018_000019" in spaced[0]


@pytest.mark.parametrize("split", ["train", "val", "trainval"])
def test_psp_labelled_lists_are_tab_separated_image_label_pairs(split):
    lines = (LISTS / f"cityscapes/psp/{split}.lst").read_text().splitlines()
    assert all(LABELLED_LINE.fullmatch(line) for line in lines)


def test_psp_trainval_is_train_followed_by_val():
    text = {s: (LISTS / f"cityscapes/psp/{s}.lst").read_text().splitlines() for s in ("train", "val", "trainval")}
    assert text["trainval"] == text["train"] + text["val"]


def test_make_lists_writes_the_shipped_format(tmp_path):
    make_cityscapes(tmp_path, {"train": 3, "val": 2, "test": 2}, size=(64, 128), seed=0)
    written = {s: (tmp_path / "lists" / f"{s}.lst").read_text().splitlines() for s in ("train", "val", "trainval")}
    assert all(LABELLED_LINE.fullmatch(line) for lines in written.values() for line in lines)
    assert written["trainval"] == written["train"] + written["val"]
    test = (tmp_path / "lists" / "test.lst").read_text().splitlines()
    assert len(test) == 2 and all(TEST_LINE.fullmatch(line) for line in test)


def test_make_lists_orders_like_the_originals(tmp_path):
    # the shipped lists are sorted by city, then file name: make-lists sorts the same way
    shipped = (LISTS / "cityscapes/psp/train.lst").read_text().splitlines()
    assert shipped == sorted(shipped)
    make_cityscapes(tmp_path, {"train": 5, "val": 0, "test": 0}, size=(64, 128), seed=0)
    written = (tmp_path / "lists" / "train.lst").read_text().splitlines()
    assert written == sorted(written) and len(written) == 5


@pytest.mark.parametrize("name", ["cityscapes/psp/test.lst", "cityscapes/cirkd/test.lst"])
def test_test_lists_hold_image_paths_only(name):
    lines = (LISTS / name).read_text().splitlines()
    assert all(TEST_LINE.fullmatch(line) for line in lines)


def test_camvid_lists_pair_split_and_annot_folders():
    for split in ("train", "val", "test"):
        for line in (LISTS / f"camvid/camvid_{split}_list.txt").read_text().splitlines():
            image, label = line.split(" ")
            assert image.startswith(f"{split}/") and label == image.replace(f"{split}/", f"{split}annot/", 1)


def test_default_list_is_the_shipped_list_of_the_lineage(tmp_path):
    assert cs.default_list("train") == str(LISTS / "cityscapes" / "psp" / "train.lst")
    assert cs.default_list("test", lineage="cirkd") == str(LISTS / "cityscapes" / "cirkd" / "test.lst")
    with pytest.raises(UserError, match="no shipped Cityscapes lists for 'mmseg'"):
        cs.default_list("train", lineage="mmseg")


def test_default_list_falls_back_to_the_root_lists(tmp_path, monkeypatch):
    monkeypatch.setitem(cs.LIST_DIRS, "psp", tmp_path / "not_installed")
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "val.lst").write_text("a\tb\n")
    assert cs.default_list("val", tmp_path) == str(tmp_path / "lists" / "val.lst")
    with pytest.raises(UserError, match="make-lists"):
        cs.default_list("train", tmp_path)


def test_shipped_list_wins_over_the_root_lists(synthetic_cityscapes):
    # the PSP entry points call default_list(split, root=--data-dir): the originals always read their own list
    assert (synthetic_cityscapes / "lists" / "val.lst").is_file()
    assert cs.default_list("val", root=synthetic_cityscapes) == str(LISTS / "cityscapes" / "psp" / "val.lst")

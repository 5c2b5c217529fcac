"""CIRKD pipeline on the real CamVid (skips without it): train_baseline.py for 2 iterations with CIRKD's shipped
lists, then eval.py on the head of the shipped test list (a pipeline check, not accuracy; the whole 233-image
test list takes minutes on one CPU core)."""
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cirkd import eval as cirkd_eval  # noqa: E402
from cirkd import train_baseline  # noqa: E402

pytestmark = pytest.mark.slow
TEST_LIST = REPO / "common" / "datasets" / "lists" / "camvid" / "camvid_test_list.txt"
EVAL_IMAGES = 8


def test_train_and_eval_on_real_camvid(real_camvid, tmp_path):
    train_baseline.main(["--dataset", "camvid", "--data", str(real_camvid), "--crop-size", "360", "360",
                         "--batch-size", "2", "--max-iterations", "2", "--skip-val", "--save-per-iters", "2",
                         "-j", "0", "--pretrained-base", "None", "--save-dir", str(tmp_path / "ckpt"),
                         "--log-dir", str(tmp_path / "logs"), "--device", "cpu"])
    checkpoint = tmp_path / "ckpt" / "deeplabv3_resnet18_camvid.pth"
    args = json.loads((tmp_path / "ckpt" / "deeplabv3_resnet18_camvid_run" / "args.json").read_text())
    assert args["train_list"] is None  # the shipped CIRKD list (367 images, cirkd.md §4.2)
    # §1.2 step 1: the training set is sized to max_iterations x batch = 4 samples; val is CIRKD's val list (101)
    log = (tmp_path / "logs" / "deeplabv3_resnet18_camvid_log.txt").read_text()
    assert "4 training samples, 101 validation images" in log
    head = tmp_path / "camvid_test_head.txt"
    head.write_text("".join(TEST_LIST.read_text().splitlines(keepends=True)[:EVAL_IMAGES]))
    cirkd_eval.main(["--dataset", "camvid", "--data", str(real_camvid), "--data-list", str(head),
                     "--pretrained", str(checkpoint), "--save-dir", str(tmp_path / "eval"), "-j", "0",
                     "--device", "cpu", "--save-pred"])
    result = json.loads((tmp_path / "eval" / "deeplabv3_resnet18_camvid_test" / "results.json").read_text())
    assert result["split"] == "test" and result["extra"]["images"] == EVAL_IMAGES and len(result["iou"]) == 11
    pngs = sorted((tmp_path / "eval" / "deeplabv3_resnet18_camvid").glob("*.png"))
    assert len(pngs) == EVAL_IMAGES and pngs[0].name.startswith("0001TP_")

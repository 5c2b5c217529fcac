"""``make demo-camvid`` (skd/demo_camvid.py, issue 12): the message without data, the table block, and the whole
path on the real CamVid files and released checkpoints with 2 steps per fine-tune (skips without them)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from common.tables.render import load_results, render_paper
from common.tables.schema import make_result, write_results

REPO = Path(__file__).resolve().parents[1]


def test_without_the_variables_it_names_them_and_exits_non_zero(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("CAMVID", "SKD_CKPT")}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run([sys.executable, "-m", "skd.demo_camvid", "--out", str(tmp_path / "out")], cwd=tmp_path,
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and "CAMVID=" in proc.stderr and "SKD_CKPT=" in proc.stderr
    assert not (tmp_path / "out").exists()


# The fields skd/demo_camvid.py's four evaluations write (eval_esp.py for the released files, train_esp.py for
# the fine-tunes), as literals: the block of common/tables/reported/skd.json must match exactly these.
DEMO_ROWS = {
    "teacher": ({"method": "SD+KD+CITY_65.1", "scale": "full", "extra": {"checkpoint": "SD+KD+CITY_65.1"}}, 0.651339),
    "base": ({"method": "base_57.8", "scale": "full", "extra": {"checkpoint": "base_57.8"}}, 0.578271),
    "finetune": ({"method": "student_esp_d:light_label", "scale": "demo",
                  "extra": {"init_from": "base_57.8", "teacher_from": None}}, 0.5912),
    "finetune_kd": ({"method": "student_esp_d:light_label_kd_sd", "scale": "demo", "teacher": "student_esp_d",
                     "extra": {"init_from": "base_57.8", "teacher_from": "SD+KD+CITY_65.1"}}, 0.6034),
}


def test_tables_show_the_four_rows_in_a_labelled_camvid_fine_tune_block(tmp_path):
    for row, (fields, miou) in DEMO_ROWS.items():
        write_results(tmp_path / row / "results.json", make_result(
            paper="skd", model="espnet", dataset="camvid", split="test", miou=miou, iterations=92, crop=[360, 480],
            batch=8, seed=304, **fields))
    text = render_paper("skd", load_results([tmp_path]), complexity=False)
    block = text[text.index("### CamVid fine-tune"):]
    block = block[:block.index("\n### ", 1)]
    lines = {line.split(" | ")[0].lstrip("| "): line for line in block.splitlines() if line.startswith("| ")}
    assert "demo-scale, not a reproduction" in lines["Method"]
    assert "65.1 | 65.13 |" in lines["teacher: ESPNet SD+KD+CITY_65.1"]
    assert "57.8 | 57.83 |" in lines["base student: ESPNet base_57.8"]
    assert lines["base_57.8 fine-tuned, task loss only"].endswith("| — | 59.12 |")
    assert lines["base_57.8 fine-tuned + pixel-wise KD + pair-wise from SD+KD+CITY_65.1"].endswith("| — | 60.34 |")


@pytest.mark.realdata
def test_demo_path_on_the_real_files_with_two_steps(real_camvid, skd_checkpoints, tmp_path, capsys):
    from skd import demo_camvid

    out = tmp_path / "demo"
    summary = demo_camvid.main(["--camvid", str(real_camvid), "--ckpt-dir", str(skd_checkpoints), "--out", str(out),
                                "--steps", "2", "--batch-size", "1", "--test-images", "3", "--num-workers", "0"])
    printed = capsys.readouterr().out
    for row, (fields, _) in DEMO_ROWS.items():
        result = json.loads((out / row / "results.json").read_text())
        assert {k: result[k] for k in ("paper", "model", "dataset", "split")} == {
            "paper": "skd", "model": "espnet", "dataset": "camvid", "split": "test_subset"}
        for key, value in fields.items():
            if key == "extra":
                assert {k: result["extra"][k] for k in value} == value
            else:
                assert result[key] == value, (row, key)
        assert f"{100 * result['miou']:6.2f}" in printed
    assert json.loads((out / "finetune" / "results.json").read_text())["iterations"] == 2
    assert "fine-tuned - base:" in printed and "wall time" in printed and str(out / "predictions.png") in printed
    base = torch.load(skd_checkpoints / "base_57.8.pth", map_location="cpu", weights_only=True)
    plain = torch.load(out / "finetune" / "student_esp_d_2.pth", weights_only=True)
    kd = torch.load(out / "finetune_kd" / "student_esp_d_2.pth", weights_only=True)
    key = "classifier.weight"
    assert not torch.equal(plain[key], base[key]) and not torch.equal(plain[key], kd[key])
    with Image.open(out / "predictions.png") as picture:  # 3 rows of image | gt | 4 networks, 14 px title band
        assert picture.size == (6 * 480, 3 * 360 + 14)
    assert summary["steps"] == 2 and set(summary["miou"]) == set(DEMO_ROWS)

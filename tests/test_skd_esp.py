"""SKD conference code line: ESPNet/ESPNet-C (skd_cvpr19.md §4-5), camvid_light (§3), eval_esp.py (§1, §6)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from common.datasets.camvid import CamVidLight, read_camvid_list, resolve_camvid_entry
from common.errors import UserError
from common.models import build_model
from skd import eval_esp

REPO = Path(__file__).resolve().parents[1]
# checkpoint file -> the test mIoU (%) the original code gives on the 233 CamVid test images (skd_cvpr19.md §9)
RELEASED = {"base_57.8.pth": 57.8271, "kd_59.8.pth": 59.8385, "kd+sd+61.4.pth": 61.3839,
            "kd+city+63.2.pth": 63.1958, "SD+KD+CITY_65.1.pth": 65.1339}


@pytest.mark.parametrize("name,num_classes,params,keys", [("espnet", 11, 353437, 210), ("espnet", 19, 363462, 210),
                                                          ("espnet_c", 11, 347145, 170), ("espnet_c", 19, 349193, 170)])
def test_model_sizes(name, num_classes, params, keys):
    model = build_model(name, num_classes=num_classes)
    assert sum(p.numel() for p in model.parameters()) == params
    assert len(model.state_dict()) == keys


def test_model_outputs_and_keys():
    x = torch.randn(1, 3, 64, 96)
    esp = build_model("espnet", num_classes=11).eval()
    logits, feat, enc = esp(x)
    assert logits.shape == (1, 11, 64, 96) and feat.shape == (1, 256, 8, 12) and enc.shape == (1, 11, 8, 12)
    esp_c = build_model("espnet_c", num_classes=11).eval()
    out = esp_c(x)
    assert len(out) == 2 and out[0].shape == (1, 11, 8, 12) and out[1].shape == (1, 256, 8, 12)
    sd = esp.state_dict()
    assert sd["conv.conv.weight"].shape == (11, 30, 3, 3)
    assert sd["combine_l2_l3.1.d1.conv.weight"].shape == (3, 2, 3, 3)
    assert sd["level3.7.bn.bn.running_var"].shape == (128,) and "level3.8.c1.conv.weight" not in sd
    assert "classifier_1.conv.weight" in sd and "classifier.conv.weight" in esp_c.state_dict()
    spec_shapes = {"level1.conv.weight": (16, 3, 3, 3), "level1.act.weight": (16,), "b1.bn.weight": (19,),
                   "level2_0.c1.conv.weight": (12, 19, 3, 3), "level2_0.d1.conv.weight": (16, 12, 3, 3),
                   "level2.1.c1.conv.weight": (12, 64, 1, 1), "level2.1.bn.act.weight": (64,), "b2.act.weight": (131,),
                   "level3_0.c1.conv.weight": (25, 131, 3, 3), "level3_0.d1.conv.weight": (28, 25, 3, 3),
                   "level3_0.d16.conv.weight": (25, 25, 3, 3), "b3.bn.running_mean": (256,),
                   "classifier_1.conv.weight": (11, 256, 1, 1), "level3_C.conv.weight": (11, 131, 1, 1),
                   "br.running_var": (11,), "up_l3.0.weight": (11, 11, 2, 2), "combine_l2_l3.0.act.weight": (22,),
                   "combine_l2_l3.1.c1.conv.weight": (2, 22, 1, 1), "up_l2.1.bn.weight": (11,),
                   "classifier.weight": (11, 11, 2, 2), "level1.bn.num_batches_tracked": ()}
    assert {k: tuple(sd[k].shape) for k in spec_shapes} == spec_shapes
    sd_c = esp_c.state_dict()
    assert tuple(sd_c["classifier.conv.weight"].shape) == (11, 256, 1, 1)
    assert set(sd_c) == (set(sd) - {k for k in sd if k.startswith(("classifier", "level3_C", "br.", "conv.", "up_l",
                                                                    "combine_l2_l3"))}) | {"classifier.conv.weight"}
    assert esp.br.eps == 1e-3 and esp.level1.bn.eps == 1e-3
    with pytest.raises(ValueError, match="divisible by 8"):
        esp(torch.randn(1, 3, 60, 96))


def test_resolve_entry_both_layouts(synthetic_camvid, tmp_path):
    entry = "/SegNet/CamVid/test/" + sorted(os.listdir(synthetic_camvid / "test"))[0]
    direct = resolve_camvid_entry(synthetic_camvid, entry)
    assert direct == synthetic_camvid / "test" / Path(entry).name
    (tmp_path / "SegNet").mkdir()
    os.symlink(synthetic_camvid, tmp_path / "SegNet" / "CamVid")
    assert resolve_camvid_entry(tmp_path, entry) == tmp_path / entry[1:]
    assert resolve_camvid_entry(tmp_path, "/SegNet/CamVid/test/missing.png") is None
    annot = resolve_camvid_entry(synthetic_camvid, entry.replace("/test/", "/testannot/"))
    assert annot.parent.name == "testannot"


def test_camvid_light_pipeline(synthetic_camvid):
    ds = CamVidLight(synthetic_camvid, synthetic_camvid / "test.txt")
    image, label, size, name = ds[0]
    img_path, label_path, _ = read_camvid_list(synthetic_camvid, synthetic_camvid / "test.txt")[0]
    bgr = cv2.imread(img_path, cv2.IMREAD_COLOR).astype(np.float32)
    expected = ((bgr - np.array([73.18188461, 82.93553322, 72.41519599], np.float32))
                / np.array([45.3199, 46.1528, 44.9148], np.float32)).transpose(2, 0, 1)
    np.testing.assert_allclose(image, expected, rtol=1e-6)
    raw = cv2.imread(label_path, cv2.IMREAD_GRAYSCALE)
    assert label.dtype == np.float32 and (label == raw).all() and (raw == 11).any()
    assert tuple(size) == (360, 480, 3) and name == Path(label_path).stem
    train = CamVidLight(synthetic_camvid, synthetic_camvid / "train.txt", crop_size=(200, 300), scale=True,
                        mirror=True, void_to_ignore=True)
    image, label, _, _ = train[1]
    assert image.shape == (3, 200, 300) and label.shape == (200, 300)
    assert not (label == 11).any() and set(np.unique(label)) <= set(range(11)) | {255}


def ref_confusion(gt, pred, n):
    """The original ``get_confusion_matrix`` (bincount, keep flat indices < n²)."""
    index = (gt * n + pred).astype("int32")
    count = np.bincount(index)
    cm = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            if i * n + j < len(count):
                cm[i, j] = count[i * n + j]
    return cm


def save_random(path, name, num_classes=11, prefix="", seed=0):
    torch.manual_seed(seed)
    model = build_model(name, num_classes=num_classes)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    torch.save({prefix + k: v for k, v in model.state_dict().items()}, path)
    return model.eval()


@pytest.mark.parametrize("method,name,prefix,workers", [("student_esp_d", "espnet", "module.", "0"),
                                                        ("student_esp_e", "espnet_c", "", "2")])
def test_eval_esp_synthetic(synthetic_camvid, tmp_path, method, name, prefix, workers):
    ckpt = tmp_path / "ckpt.pth"
    model = save_random(ckpt, name, prefix=prefix)
    holder = tmp_path / "holder"
    (holder / "SegNet").mkdir(parents=True)
    os.symlink(synthetic_camvid, holder / "SegNet" / "CamVid")
    pngs = tmp_path / "pngs"
    result = eval_esp.main(["--method", method, "--dataset", "camvid_light",
                            "--data_list", str(synthetic_camvid / "test.txt"), "--data_dir", str(holder),
                            "--num_classes", "11", "--restore-from", str(ckpt), "--store-output", "True",
                            "--output_path", str(pngs), "--output-dir", str(tmp_path / "out"),
                            "--num-workers", workers])
    cm = np.zeros((11, 11))
    with torch.no_grad():
        for img_path, label_path, stem in read_camvid_list(synthetic_camvid, synthetic_camvid / "test.txt"):
            bgr = cv2.imread(img_path, cv2.IMREAD_COLOR).astype(np.float32)
            x = (bgr - np.array([73.18188461, 82.93553322, 72.41519599])) / np.array([45.3199, 46.1528, 44.9148])
            out = model(torch.from_numpy(x.transpose(2, 0, 1)[None].astype(np.float32)))[0]
            out = F.interpolate(out, size=(360, 480), mode="bilinear", align_corners=True)
            pred = out[0].argmax(0).numpy().astype(np.uint8)
            gt = cv2.imread(label_path, cv2.IMREAD_GRAYSCALE).astype(int)
            keep = gt != 255
            cm += ref_confusion(gt[keep], pred[keep], 11)
            saved = Image.open(pngs / f"{stem}.png")
            assert saved.mode == "P" and (np.array(saved) == pred).all()
            assert saved.getpalette()[:6] == [128, 64, 128, 244, 35, 232]
    tp = np.diag(cm)
    iou = tp / np.maximum(1.0, cm.sum(1) + cm.sum(0) - tp)
    assert result["miou"] == pytest.approx(iou.mean(), abs=1e-9)
    np.testing.assert_allclose(result["iou"], iou, atol=1e-9)
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert written["paper"] == "skd" and written["extra"]["num_images"] == 3 and written["split"] == "test"


def test_store_output_false_writes_no_pngs(synthetic_camvid, tmp_path):
    ckpt = tmp_path / "c.pth"
    save_random(ckpt, "espnet_c")
    eval_esp.main(["--method", "student_esp_e", "--data-dir", str(synthetic_camvid), "--restore-from", str(ckpt),
                   "--store-output", "False", "--output-path", str(tmp_path / "pngs"),
                   "--output-dir", str(tmp_path / "out"), "--num-workers", "0"])
    assert not (tmp_path / "pngs").exists() and (tmp_path / "out" / "results.json").is_file()


def test_bad_inputs(synthetic_camvid, tmp_path):
    ckpt = tmp_path / "espc.pth"
    save_random(ckpt, "espnet_c", prefix="module.")
    base = ["--data-dir", str(synthetic_camvid), "--output-dir", str(tmp_path / "o"), "--num-workers", "0"]
    with pytest.raises(UserError, match=r"missing keys: .*classifier_1\.conv\.weight"):
        eval_esp.main(base + ["--method", "student_esp_d", "--restore-from", str(ckpt)])
    with pytest.raises(UserError, match=r"unexpected keys: .*classifier\.conv\.weight"):
        eval_esp.main(base + ["--method", "student_esp_d", "--restore-from", str(ckpt)])
    with pytest.raises(UserError, match="shape mismatches"):
        eval_esp.main(base + ["--method", "student_esp_e", "--num-classes", "19", "--restore-from", str(ckpt)])
    with pytest.raises(UserError, match="not found"):
        eval_esp.main(base + ["--restore-from", str(tmp_path / "none.pth")])
    with pytest.raises(UserError, match="unknown --method"):
        eval_esp.main(base + ["--method", "espnet_x", "--restore-from", str(ckpt)])
    bad_list = tmp_path / "bad.txt"
    bad_list.write_text("/SegNet/CamVid/test/nope.png /SegNet/CamVid/testannot/nope.png\n")
    with pytest.raises(UserError, match="nope.png"):
        eval_esp.main(base + ["--method", "student_esp_e", "--restore-from", str(ckpt), "--data-list", str(bad_list)])
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(REPO / "skd" / "eval_esp.py"), "--data_dir", str(tmp_path / "nodir"),
                           "--restore-from", str(ckpt)], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr


def test_released_checkpoints_reproduce(real_camvid, skd_checkpoints, tmp_path):
    """The five released ESPNet students give their test mIoU (±0.05) on the 233 real CamVid test images."""
    torch.set_num_threads(2)
    measured = {}
    for fname in RELEASED:
        ckpt = skd_checkpoints / fname
        if not ckpt.is_file():
            pytest.skip(f"{ckpt} is missing")
        result = eval_esp.main(["--method", "student_esp_d", "--dataset", "camvid_light",
                                "--data_list", str(real_camvid / "test.txt"), "--data_dir", str(real_camvid),
                                "--num_classes", "11", "--restore-from", str(ckpt), "--store-output", "False",
                                "--output-dir", str(tmp_path / fname)])
        assert result["extra"]["num_images"] == 233
        measured[fname] = 100 * result["miou"]
    for fname, expected in RELEASED.items():
        assert measured[fname] == pytest.approx(expected, abs=0.05), measured
        assert measured[fname] == pytest.approx(float(fname.replace("+", "_").split("_")[-1][:-4]), abs=0.05)


def train_args(root, out, teacher, steps=2, extra=()):
    return ["--method", "student_esp_e", "--data_dir", str(root), "--sd_mode", "light_label_kd_sd",
            "--teacher_model", "student_esp_e", "--teacher-path", str(teacher), "--num-steps", str(steps),
            "--batch-size", "2", "--input-size", "120,160", "--random-mirror", "--random-scale",
            "--snapshot-dir", str(out), "--num-workers", "0", "--num-threads", "1", *extra]


def test_train_esp_runs_and_resumes(synthetic_camvid, tmp_path, monkeypatch):
    from common.engine import checkpoint
    from skd import train_esp

    teacher = tmp_path / "teacher.pth"
    save_random(teacher, "espnet_c", seed=1)
    real_save = checkpoint.save_training_state

    def save_and_keep(path, *, step, **kw):
        real_save(path, step=step, **kw)
        real_save(Path(path).with_name(f"state_{step}.pth"), step=step, **kw)

    monkeypatch.setattr(train_esp, "save_training_state", save_and_keep)
    full = train_esp.main(train_args(synthetic_camvid, tmp_path / "full", teacher, extra=["--save-every", "1"]))
    logged = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [0, 1] and all(r["sd"] >= 0 and r["kd"] >= 0 for r in logged)
    assert logged[0]["G_lr"] == pytest.approx(1e-2) and logged[1]["G_lr"] == pytest.approx(1e-2 * 0.5 ** 0.9)
    result = json.loads((full / "results.json").read_text())
    assert result["paper"] == "skd" and result["model"] == "espnet_c" and result["extra"]["reconstruction"]
    resumed = train_esp.main(train_args(synthetic_camvid, tmp_path / "resumed", teacher,
                                        extra=["--resume", str(full / "state_1.pth")]))
    a = torch.load(full / "student_esp_e_2.pth", weights_only=True)
    b = torch.load(resumed / "student_esp_e_2.pth", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(UserError, match="resume"):
        train_esp.main(train_args(synthetic_camvid, tmp_path / "bad", teacher, steps=3,
                                  extra=["--resume", str(full / "state_1.pth")]))


def test_train_esp_bad_inputs(synthetic_camvid, tmp_path):
    from skd import train_esp

    base = ["--data-dir", str(synthetic_camvid), "--num-steps", "1", "--snapshot-dir", str(tmp_path)]
    with pytest.raises(UserError, match="--teacher-path"):
        train_esp.main(base + ["--sd_mode", "kd", "--teacher_model", "student_esp_e"])
    with pytest.raises(UserError, match="teacher_model"):
        train_esp.main(base + ["--sd_mode", "kd"])
    with pytest.raises(UserError, match="multiples of 8"):
        train_esp.main(base + ["--input-size", "100,150"])
    with pytest.raises(UserError, match="enables no loss"):
        train_esp.main(base + ["--sd_mode", "light"])

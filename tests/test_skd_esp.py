"""SKD conference code line: ESPNet/ESPNet-C (skd_cvpr19.md §4-5), camvid_light (§3), eval_esp.py (§1, §6)."""
import json
import os
import shutil
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


# ---------------------------------------------------------------- a functional reference of skd_cvpr19.md §4
ESP_DILATIONS = (1, 2, 4, 8, 16)  # §4: branches d1, d2, d4, d8, d16
ESP_BN_EPS = 1e-3  # §4: every BN is BatchNorm2d(eps=1e-3)


def ref_br(x, sd, bn, act):
    """§4 ``BR``: eval-mode BN (eps 1e-3), then per-channel PReLU."""
    y = F.batch_norm(x, sd[f"{bn}.running_mean"], sd[f"{bn}.running_var"], sd[f"{bn}.weight"], sd[f"{bn}.bias"],
                     False, 0.0, ESP_BN_EPS)
    return F.prelu(y, sd[f"{act}.weight"])


def ref_esp_branches(x, sd, p, stride):
    """§4: c1 (1×1 stride 1 in the ESP block, 3×3 stride 2 in DownSamplerB), five dilated 3×3 branches
    (padding = dilation), hierarchical fusion s1 = d2, s2 = s1 + d4, s3 = s2 + d8, s4 = s3 + d16, concat
    [d1, s1, s2, s3, s4]."""
    y = F.conv2d(x, sd[f"{p}.c1.conv.weight"], stride=stride, padding=1 if stride == 2 else 0)
    d1, d2, d4, d8, d16 = (F.conv2d(y, sd[f"{p}.d{r}.conv.weight"], padding=r, dilation=r) for r in ESP_DILATIONS)
    s1 = d2
    s2 = s1 + d4
    s3 = s2 + d8
    s4 = s3 + d16
    return torch.cat([d1, s1, s2, s3, s4], 1)


def ref_esp_block(x, sd, p, add=True):
    """§4 ``DilatedParllelResidualBlockB``: branches, + input if ``add``, then ``BR`` (``bn.bn``/``bn.act``)."""
    out = ref_esp_branches(x, sd, p, 1)
    return ref_br(out + x if add else out, sd, f"{p}.bn.bn", f"{p}.bn.act")


def ref_downsampler(x, sd, p):
    """§4 ``DownSamplerB``: strided branches, BN, PReLU, no residual."""
    return ref_br(ref_esp_branches(x, sd, p, 2), sd, f"{p}.bn", f"{p}.act")


def ref_encoder(x, sd, p=2, q=8):
    """§4 ESPNet-C steps 1-6: (b1, b2, b3 outputs) with b2 = [level2, level2_0, sample2], b3 = [level3_0, level3]."""
    sample1 = F.avg_pool2d(x, 3, 2, 1)
    sample2 = F.avg_pool2d(sample1, 3, 2, 1)
    level1 = ref_br(F.conv2d(x, sd["level1.conv.weight"], stride=2, padding=1), sd, "level1.bn", "level1.act")
    out0 = ref_br(torch.cat([level1, sample1], 1), sd, "b1.bn", "b1.act")
    out1 = out1_0 = ref_downsampler(out0, sd, "level2_0")
    for i in range(p):
        out1 = ref_esp_block(out1, sd, f"level2.{i}")
    out1 = ref_br(torch.cat([out1, out1_0, sample2], 1), sd, "b2.bn", "b2.act")
    out2 = out2_0 = ref_downsampler(out1, sd, "level3_0")
    for i in range(q):
        out2 = ref_esp_block(out2, sd, f"level3.{i}")
    return out0, out1, ref_br(torch.cat([out2_0, out2], 1), sd, "b3.bn", "b3.act")


def ref_espnet(x, sd):
    """§4 ESPNet decoder steps 1-7: ``[full-resolution logits, b3 features, encoder logits]``."""
    out0, out1, feat = ref_encoder(x, sd)
    out = F.conv2d(feat, sd["classifier_1.conv.weight"])
    up3 = F.batch_norm(out, sd["br.running_mean"], sd["br.running_var"], sd["br.weight"], sd["br.bias"], False,
                       0.0, ESP_BN_EPS)
    up3 = F.conv_transpose2d(up3, sd["up_l3.0.weight"], stride=2)
    comb = ref_br(torch.cat([F.conv2d(out1, sd["level3_C.conv.weight"]), up3], 1), sd, "combine_l2_l3.0.bn",
                  "combine_l2_l3.0.act")
    comb = ref_esp_block(comb, sd, "combine_l2_l3.1", add=False)
    comb = ref_br(F.conv_transpose2d(comb, sd["up_l2.0.weight"], stride=2), sd, "up_l2.1.bn", "up_l2.1.act")
    conv = ref_br(F.conv2d(torch.cat([comb, out0], 1), sd["conv.conv.weight"], padding=1), sd, "conv.bn",
                  "conv.act")
    return [F.conv_transpose2d(conv, sd["classifier.weight"], stride=2), feat, out]


def randomized_esp(name, seed=0, num_classes=11):
    """A float64 eval-mode model with non-trivial BN statistics/affines and per-channel PReLU slopes."""
    torch.manual_seed(seed)
    model = build_model(name, num_classes=num_classes)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.rand(n, generator=g) - 0.5)
            elif isinstance(m, torch.nn.PReLU):
                m.weight.copy_(torch.rand(m.weight.numel(), generator=g) * 0.5)
    return model.double().eval()


def test_esp_block_fuses_its_branches_hierarchically():
    model = randomized_esp("espnet_c")
    block = model.level2[1]
    x = torch.randn(1, 64, 16, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    sd = {f"b.{k}": v for k, v in block.state_dict().items()}
    with torch.no_grad():
        torch.testing.assert_close(block(x), ref_esp_block(x, sd, "b"), rtol=1e-10, atol=1e-12)


def test_downsampler_is_strided_without_residual():
    model = randomized_esp("espnet_c")
    x = torch.randn(1, 131, 16, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    sd = {f"d.{k}": v for k, v in model.level3_0.state_dict().items()}
    with torch.no_grad():
        got = model.level3_0(x)
        torch.testing.assert_close(got, ref_downsampler(x, sd, "d"), rtol=1e-10, atol=1e-12)
    assert got.shape == (1, 128, 8, 10)


def test_espnet_c_forward_equals_the_functional_reference():
    model = randomized_esp("espnet_c")
    x = torch.randn(1, 3, 64, 96, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    sd = model.state_dict()
    with torch.no_grad():
        logits, feat = model(x)
        ref_feat = ref_encoder(x, sd)[2]
    torch.testing.assert_close(feat, ref_feat, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(logits, F.conv2d(ref_feat, sd["classifier.conv.weight"]), rtol=1e-9, atol=1e-11)


def test_espnet_forward_equals_the_functional_reference():
    model = randomized_esp("espnet")
    x = torch.randn(1, 3, 64, 96, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got = model(x)
        expected = ref_espnet(x, model.state_dict())
    assert [tuple(o.shape) for o in expected] == [(1, 11, 64, 96), (1, 256, 8, 12), (1, 11, 8, 12)]
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


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


def test_camvid_light_mirrored_one_pixel_crop_collates(synthetic_camvid, monkeypatch):
    """A mirrored crop one pixel wide must still become a tensor (a flipped view of width 1 keeps a negative stride
    that ``np.ascontiguousarray`` does not remove)."""
    monkeypatch.setattr(np.random, "randint", lambda *a, **k: 1)  # always mirror
    train = CamVidLight(synthetic_camvid, synthetic_camvid / "train.txt", crop_size=(1, 1), mirror=True)
    image, label = torch.utils.data.default_collate([train[0]])[:2]
    assert image.shape == (1, 3, 1, 1) and label.shape == (1, 1, 1)


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


CAMVID_MEAN_BGR = np.array([73.18188461, 82.93553322, 72.41519599])  # skd_cvpr19.md §3, B, G, R order
CAMVID_STD_BGR = np.array([45.3199, 46.1528, 44.9148])


IDENTITY_BN = {"running_mean": 0.0, "running_var": 1.0 - 1e-3, "weight": 1.0, "bias": 0.0}  # eps 1e-3 (§4)


def avg_pool_3x3_s2(a):
    """``AvgPool2d(3, stride=2, padding=1)`` (zero padding counted) of an H×W array, by hand."""
    h, w = a.shape
    padded = np.pad(a, 1)
    return sum(padded[i:i + h:2, j:j + w:2] for i in range(3) for j in range(3)) / 9


def bilinear_align_corners(a, size):
    """Bilinear resize of an H×W array with align_corners=True: source = destination·(in − 1)/(out − 1)."""
    def taps(n_in, n_out):
        x = np.arange(n_out) * (n_in - 1) / (n_out - 1)
        x0 = np.minimum(np.floor(x).astype(int), n_in - 2)
        return x0, x - x0

    r0, fr = taps(a.shape[0], size[0])
    c0, fc = taps(a.shape[1], size[1])
    rows = a[r0] * (1 - fr)[:, None] + a[r0 + 1] * fr[:, None]
    return rows[:, c0] * (1 - fc) + rows[:, c0 + 1] * fc


def set_identity(sd, prefix, channel, act=None):
    """BN ``prefix`` passes ``channel`` through unchanged, and so does PReLU ``act`` (slope 1)."""
    for key, value in IDENTITY_BN.items():
        sd[f"{prefix}.{key}"][channel] = value
    if act is not None:
        sd[f"{act}.weight"][channel] = 1.0


def crafted_checkpoint(path, name, prefix):
    """A checkpoint whose predictions follow from the image by hand, and ``expected(bgr) -> (pred, margin)``.

    Both route the normalised B channel (§3) through identity BN/PReLU layers to two opposite logits,
    class 0 = +v and class 1 = −v (classes 2-10 get −10), so the prediction is 0 where v > 0, else 1;
    ``margin`` = |v|. ESPNet: v = ``sample1`` (one 3×3/2 average pool, via ``b1`` channel 16 and ``conv``),
    upsampled ×2 by ``classifier`` (a 2×2 transposed conv of ones, i.e. nearest). ESPNet-C: v = ``sample2``
    (two pools, ``b2`` channel 128) taken at stride 2 by ``level3_0`` (centre taps of c1 and d1), kept as
    ``b3`` channel 0 (the level3_0 half of the concat), then resized to 360×480 bilinearly, align_corners=True.
    """
    torch.manual_seed(0)
    sd = build_model(name, num_classes=11).state_dict()
    k = 11
    with torch.no_grad():
        if name == "espnet":
            sd["classifier.weight"].zero_()
            for i in range(k):
                sd["classifier.weight"][i, i] = 1.0
            sd["conv.conv.weight"].zero_()
            sd["conv.conv.weight"][0, k + 16, 1, 1] = 1.0
            sd["conv.conv.weight"][1, k + 16, 1, 1] = -1.0
            set_identity(sd, "conv.bn", slice(None), "conv.act")
            sd["conv.bn.bias"][2:] = -10.0
            set_identity(sd, "b1.bn", 16, "b1.act")
        else:
            set_identity(sd, "b2.bn", 128, "b2.act")
            for branch in ("c1", "d1", "d2", "d4", "d8", "d16"):
                sd[f"level3_0.{branch}.conv.weight"].zero_()
            sd["level3_0.c1.conv.weight"][0, 128, 1, 1] = 1.0
            sd["level3_0.d1.conv.weight"][0, 0, 1, 1] = 1.0
            set_identity(sd, "level3_0.bn", 0, "level3_0.act")
            sd["b3.bn.weight"].zero_()
            sd["b3.bn.bias"].zero_()
            set_identity(sd, "b3.bn", 0, "b3.act")
            sd["b3.bn.bias"][1] = 1.0  # a constant 1 for the −10 of classes 2-10
            sd["classifier.conv.weight"].zero_()
            sd["classifier.conv.weight"][0, 0] = 1.0
            sd["classifier.conv.weight"][1, 0] = -1.0
            sd["classifier.conv.weight"][2:, 1] = -10.0
    torch.save({prefix + key: v for key, v in sd.items()}, path)

    def expected(bgr):
        blue = (bgr[:, :, 0] - CAMVID_MEAN_BGR[0]) / CAMVID_STD_BGR[0]
        if name == "espnet":
            v = avg_pool_3x3_s2(blue).repeat(2, 0).repeat(2, 1)
        else:
            v = bilinear_align_corners(avg_pool_3x3_s2(avg_pool_3x3_s2(blue))[::2, ::2], bgr.shape[:2])
        return np.where(v > 0, 0, 1).astype(np.uint8), np.abs(v)

    return expected


@pytest.mark.parametrize("method,name,prefix,workers", [("student_esp_d", "espnet", "module.", "0"),
                                                        ("student_esp_e", "espnet_c", "", "2")])
def test_eval_esp_synthetic(synthetic_camvid, tmp_path, method, name, prefix, workers):
    ckpt = tmp_path / "ckpt.pth"
    expected_pred = crafted_checkpoint(ckpt, name, prefix)
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
    for img_path, label_path, stem in read_camvid_list(synthetic_camvid, synthetic_camvid / "test.txt"):
        pred, margin = expected_pred(cv2.imread(img_path, cv2.IMREAD_COLOR).astype(np.float64))
        sure = margin > 1e-4  # float32 vs float64 may only disagree where the two logits nearly tie
        assert sure.mean() > 0.999 and (name == "espnet_c" or sure.all())
        saved = Image.open(pngs / f"{stem}.png")
        assert saved.mode == "P" and saved.getpalette()[:6] == [128, 64, 128, 244, 35, 232]  # §6.4 colours
        saved = np.array(saved)
        assert (saved[sure] == pred[sure]).all() and set(np.unique(saved)) == {0, 1}
        gt = cv2.imread(label_path, cv2.IMREAD_GRAYSCALE).astype(int)
        keep = gt != 255
        cm += ref_confusion(gt[keep], saved[keep], 11)
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


@pytest.mark.realdata
@pytest.mark.parametrize("fname", list(RELEASED))
def test_released_checkpoint_reproduces_its_test_miou(real_camvid, skd_checkpoints, tmp_path, fname):
    """A released ESPNet student gives its test mIoU (±0.05) on the 233 real CamVid test images (§9); one test
    per checkpoint, so pytest-xdist spreads them over the workers."""
    ckpt = skd_checkpoints / fname
    if not ckpt.is_file():
        pytest.skip(f"{ckpt} is missing")
    result = eval_esp.main(["--method", "student_esp_d", "--dataset", "camvid_light",
                            "--data_list", str(real_camvid / "test.txt"), "--data_dir", str(real_camvid),
                            "--num_classes", "11", "--restore-from", str(ckpt), "--store-output", "False",
                            "--output-dir", str(tmp_path / "out")])
    assert result["extra"]["num_images"] == 233
    measured = 100 * result["miou"]
    assert measured == pytest.approx(RELEASED[fname], abs=0.05)
    assert measured == pytest.approx(float(fname.replace("+", "_").split("_")[-1][:-4]), abs=0.05)


def train_args(root, out, teacher, steps=2, extra=()):
    return ["--method", "student_esp_e", "--data_dir", str(root), "--sd_mode", "light_label_kd_sd",
            "--teacher_model", "student_esp_e", "--teacher-path", str(teacher), "--num-steps", str(steps),
            "--batch-size", "2", "--input-size", "120,160", "--random-mirror", "--random-scale",
            "--snapshot-dir", str(out), "--num-workers", "0", "--num-threads", "1", *extra]


def test_train_esp_runs_and_resumes(synthetic_camvid, tmp_path, monkeypatch):
    from common.recipes.run import RunState
    from skd import train_esp

    teacher = tmp_path / "teacher.pth"
    save_random(teacher, "espnet_c", seed=1)
    real_save = RunState.save

    def save_and_keep(self, n):
        real_save(self, n)
        shutil.copyfile(self.path, self.path.with_name(f"state_{n}.pth"))

    monkeypatch.setattr(RunState, "save", save_and_keep)
    full = train_esp.main(train_args(synthetic_camvid, tmp_path / "full", teacher, extra=["--save-every", "1"]))
    logged = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [0, 1]
    for r in logged:  # weight_l = weight_k = weight_s = 1 by default (skd_cvpr19.md §1.2), each term logged raw
        assert r["loss"] == pytest.approx(r["label"] + r["kd"] + r["sd"], rel=1e-6)
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
    with pytest.raises(UserError, match="--teacher-from"):
        train_esp.main(base + ["--sd_mode", "kd", "--teacher_model", "student_esp_e"])
    with pytest.raises(UserError, match="--init-from"):
        train_esp.main(base + ["--init-from", str(tmp_path / "none.pth")])
    with pytest.raises(UserError, match="teacher_model"):
        train_esp.main(base + ["--sd_mode", "kd"])
    with pytest.raises(UserError, match="multiples of 8"):
        train_esp.main(base + ["--input-size", "100,150"])
    with pytest.raises(UserError, match="enables no loss"):
        train_esp.main(base + ["--sd_mode", "light"])


def test_parser_has_the_original_config_flags_with_their_types_and_defaults():
    """Issue 13 item 4 / skd_cvpr19.md §1.2: the conference ``config`` parser's training flags, in both spellings."""
    args = eval_esp.build_parser().parse_args([])
    assert (args.ohem_thres, args.ohem_thres1, args.ohem_thres2, args.ohem) == (0.6, 0.8, 0.5, False)
    assert (args.random_seed, args.seed, args.divided_lr, args.location, args.dsn_weight) == (304, 304, 50, 1.0, 0.4)
    assert args.sd_mode == "light_label" and args.adv_loss == "hinge" and args.teacher_model == "psp_dsn_floor"
    args = eval_esp.build_parser().parse_args(["--ohem", "--location", "0.5", "--divided_lr", "10", "--fix",
                                               "--teacher-from", "t.pth", "--dis-from", "d.pth", "--network", "x",
                                               "--epoch", "3", "--ohem_thres1", "0.9"])
    assert args.ohem is True and args.fix is True and args.location == 0.5 and args.divided_lr == 10
    assert (args.teacher_from, args.dis_from, args.network, args.epoch, args.ohem_thres1) == ("t.pth", "d.pth", "x",
                                                                                              3, 0.9)
    with pytest.raises(SystemExit):  # --divided_lr is an int in the original
        eval_esp.build_parser().parse_args(["--divided_lr", "0.5"])


@pytest.mark.parametrize("text,value", [("yes", True), ("T", True), ("y", True), ("1", True),
                                        ("no", False), ("f", False), ("N", False), ("0", False)])
def test_boolean_flags_take_the_original_str2bool_spellings(text, value):
    args = eval_esp.build_parser().parse_args(["--store-output", text, "--ohem", text])
    assert args.store_output is value and args.ohem is value


def test_evaluation_accepts_and_ignores_training_flags(synthetic_camvid, tmp_path):
    ckpt = tmp_path / "c.pth"
    save_random(ckpt, "espnet_c")
    common = ["--method", "student_esp_e", "--data-dir", str(synthetic_camvid), "--restore-from", str(ckpt),
              "--num-workers", "0"]
    plain = eval_esp.main(common + ["--output-dir", str(tmp_path / "a")])
    flagged = eval_esp.main(common + ["--output-dir", str(tmp_path / "b"), "--ohem", "--ohem-thres", "0.9",
                                      "--learning-rate", "5", "--sd_mode", "kd", "--location", "0.5", "--seed", "1"])
    assert flagged["miou"] == plain["miou"] and flagged["iou"] == plain["iou"]


def test_full_resolution_teacher_kd_is_the_legacy_kl_mean_without_upsampling():
    """skd_cvpr19.md §8 CriterionKD = KLDivLoss() (elementwise mean) of log_softmax(S/τ) against softmax(T/τ);
    for an ESPNet teacher the logits are already at the student's size (no ×8)."""
    from common.losses.skd import PixelWiseKD

    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.randn(2, 3, 8, 8, dtype=torch.float64)
    tau = 2.0
    p_t = torch.softmax(t / tau, 1)
    expected = (p_t * (p_t.log() - torch.log_softmax(s / tau, 1))).sum() / s.numel()
    value = PixelWiseKD(temperature=tau, upsample_teacher=False)(s, t)
    assert value.dtype == torch.float64 and value.item() == pytest.approx(expected.item(), rel=1e-12)
    small = torch.randn(2, 3, 1, 1, dtype=torch.float64)  # a 1/8 student is upsampled ×8 with upsample=True
    up = small.expand(2, 3, 8, 8)
    p_s = torch.softmax(up / tau, 1)
    expected = (p_t * (p_t.log() - p_s.log())).sum() / up.numel()
    assert PixelWiseKD(upsample=True, temperature=tau, upsample_teacher=False)(small, t).item() == pytest.approx(
        expected.item(), rel=1e-12)


def test_train_esp_init_from_starts_the_student_from_the_checkpoint(synthetic_camvid, tmp_path):
    from skd import train_esp

    init = tmp_path / "init.pth"
    save_random(init, "espnet_c", prefix="module.", seed=3)
    out = train_esp.main(["--method", "student_esp_e", "--data-dir", str(synthetic_camvid), "--init-from", str(init),
                          "--learning-rate", "0", "--num-steps", "1", "--batch-size", "2", "--input-size", "120,160",
                          "--snapshot-dir", str(tmp_path / "run"), "--num-workers", "0", "--num-threads", "1"])
    saved = torch.load(out / "student_esp_e_1.pth", weights_only=True)
    given = torch.load(init, weights_only=True)
    weights = [k for k in saved if k.endswith(".weight")]  # lr 0: every parameter is still the checkpoint's
    assert len(weights) > 50 and all(torch.equal(saved[k], given["module." + k]) for k in weights)
    assert json.loads((out / "results.json").read_text())["extra"]["init_from"] == "init"


def test_train_esp_distils_from_a_full_resolution_espnet_teacher(synthetic_camvid, tmp_path):
    from skd import train_esp

    teacher = tmp_path / "teacher.pth"
    save_random(teacher, "espnet", prefix="module.", seed=1)
    out = train_esp.main(["--method", "student_esp_d", "--data-dir", str(synthetic_camvid), "--sd_mode",
                          "light_label_kd_sd", "--teacher_model", "student_esp_d", "--teacher-from", str(teacher),
                          "--num-steps", "1", "--batch-size", "2", "--input-size", "120,160",
                          "--snapshot-dir", str(tmp_path / "run"), "--num-workers", "0", "--num-threads", "1"])
    (logged,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged["kd"] > 0 and logged["sd"] > 0
    assert logged["loss"] == pytest.approx(logged["label"] + logged["kd"] + logged["sd"], rel=1e-6)
    result = json.loads((out / "results.json").read_text())
    assert result["teacher"] == "student_esp_d" and result["extra"]["teacher_from"] == "teacher"


def test_camvid_light_scale_set_is_0_5_to_2_1(synthetic_camvid, monkeypatch):
    """skd_cvpr19.md §3 / issue 13 item 4: the branch's CamVid datasets scale by 0.5 + randint(0, 16)/10."""
    import random

    from common.datasets import camvid

    factors, resize = set(), camvid.cv2.resize

    def recording_resize(img, dsize, *args, fx=None, fy=None, **kw):
        if fx is not None:
            factors.add(round(fx, 6))
        return resize(img, dsize, *args, fx=fx, fy=fy, **kw)

    monkeypatch.setattr(camvid.cv2, "resize", recording_resize)
    ds = CamVidLight(synthetic_camvid, synthetic_camvid / "train.txt", crop_size=(64, 64), scale=True)
    random.seed(0)
    for _ in range(300):
        ds[0]
    assert factors == {round(0.5 + k / 10, 6) for k in range(17)}

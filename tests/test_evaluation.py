"""common.evaluation against ports of the originals' evaluation code (ifvd_skd.md §C.6, cirkd.md §5, aicsd.md §7)."""
import json
import math
import os
import tempfile

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage

from common.errors import UserError
from common.evaluation import (
    ConfusionMatrix,
    SegmentationMetric,
    cityscapes_palette,
    evaluate_main,
    get_palette,
    predict_multiscale,
    predict_sliding,
    predict_whole,
    save_prediction_png,
    sliding_grid,
    write_results_json,
)
from common.evaluation.inference import resize_image, scaled_size
from common.tables.schema import read_results
from tests.helpers_dist import free_port


# ---------------------------------------------------------------- ports of the originals (reference only)
def orig_get_confusion_matrix(gt_label, pred_label, class_num):
    """utils/evaluate.py::get_confusion_matrix of IFVD/SKD/CWD, verbatim logic (§C.6)."""
    index = (gt_label * class_num + pred_label).astype("int32")
    label_count = np.bincount(index)
    confusion_matrix = np.zeros((class_num, class_num))
    for i_label in range(class_num):
        for i_pred_label in range(class_num):
            cur_index = i_label * class_num + i_pred_label
            if cur_index < len(label_count):
                confusion_matrix[i_label, i_pred_label] = label_count[cur_index]
    return confusion_matrix


def orig_miou(confusion_matrix):
    pos = confusion_matrix.sum(1)
    res = confusion_matrix.sum(0)
    tp = np.diag(confusion_matrix)
    iou = tp / np.maximum(1.0, pos + res - tp)
    return iou.mean(), iou


def orig_cirkd_batch(output, target, nclass):
    """CIRKD utils/score.py batch_pix_accuracy + batch_intersection_union (cirkd.md §5.3)."""
    predict = torch.argmax(output.long(), 1) + 1
    t = target.long() + 1
    pixel_labeled = torch.sum(t > 0).item()
    pixel_correct = torch.sum((predict == t) * (t > 0)).item()
    predict = (torch.argmax(output, 1) + 1).float() * (t > 0).float()
    tf = target.float() + 1
    intersection = predict * (predict == tf).float()
    area_inter = torch.histc(intersection.cpu(), bins=nclass, min=1, max=nclass)
    area_pred = torch.histc(predict.cpu(), bins=nclass, min=1, max=nclass)
    area_lab = torch.histc(tf.cpu(), bins=nclass, min=1, max=nclass)
    return pixel_correct, pixel_labeled, area_inter, area_pred + area_lab - area_inter


class PixelModel(nn.Module):
    """A translation-equivariant per-pixel model (1×1 conv) returning the originals' output list."""

    def __init__(self, num_classes=19, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, num_classes, 1)

    def forward(self, x):
        out = self.conv(x)
        return [out, out * 0.5, x]


class StrideModel(nn.Module):
    """Downsamples by 8 like the PSP lineage (logits at 1/8), so predict_whole must upsample."""

    def __init__(self, num_classes=19, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, num_classes, 3, stride=8, padding=1)

    def forward(self, x):
        return [self.conv(x)]


class ConstantModel(nn.Module):
    """Predicts class `k` everywhere at 1/8 resolution."""

    def __init__(self, num_classes, k):
        super().__init__()
        self.num_classes, self.k = num_classes, k

    def forward(self, x):
        out = torch.zeros(x.shape[0], self.num_classes, x.shape[2] // 8 + 1, x.shape[3] // 8 + 1)
        out[:, self.k] = 1.0
        return [out, out]


# ---------------------------------------------------------------- palettes and PNGs
def test_voc_palette_matches_spec_entries():
    pal = np.array(get_palette(256)).reshape(256, 3)
    expected = [(0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0), (0, 0, 128), (128, 0, 128), (0, 128, 128),
                (128, 128, 128), (64, 0, 0)]
    assert [tuple(p) for p in pal[:9]] == expected
    assert tuple(pal[255]) == (224, 224, 192)  # the VOC "void" border colour
    assert len({tuple(p) for p in pal}) == 256


def test_cityscapes_palette_first_colours():
    pal = cityscapes_palette()
    assert len(pal) == 768 and pal[:6] == [128, 64, 128, 244, 35, 232] and pal[54:57] == [119, 11, 32]


def test_save_prediction_png_palette_and_gray(tmp_path):
    pred = np.arange(20, dtype=np.uint8).reshape(4, 5)
    p = save_prediction_png(pred, tmp_path / "a" / "x.png", get_palette(256))
    img = Image.open(p)
    assert img.mode == "P" and np.array_equal(np.array(img), pred)
    assert img.getpalette()[3:6] == [128, 0, 0]
    g = Image.open(save_prediction_png(torch.from_numpy(pred), tmp_path / "g.png", None))
    assert g.mode == "L" and np.array_equal(np.array(g), pred)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]
    with pytest.raises(ValueError):
        save_prediction_png(np.full((2, 2), 300), tmp_path / "bad.png")


# ---------------------------------------------------------------- confusion-matrix metrics
def test_confusion_matrix_equals_original_loop_with_ignore_and_void():
    rng = np.random.default_rng(0)
    c = 11
    gt = rng.integers(0, c + 1, size=(3, 40, 50))  # value 11 = CamVid void, dropped by the original (skd_cvpr19 §6.5)
    gt[:, :5] = 255
    pred = rng.integers(0, c, size=gt.shape)
    ref = np.zeros((c, c))
    for g, p in zip(gt, pred):
        keep = g != 255
        ref += orig_get_confusion_matrix(g[keep], p[keep], c)
    cm = ConfusionMatrix(c, 255)
    for g, p in zip(gt, pred):
        cm.update(torch.from_numpy(g), p)  # torch and numpy inputs
    assert np.array_equal(cm.array, ref)
    ref_miou, ref_iou = orig_miou(ref)
    assert np.allclose(cm.iou(), ref_iou) and math.isclose(cm.miou(), ref_miou)


def test_iou_formulas_absent_class_zero_vs_nan():
    cm = ConfusionMatrix(3, 255)
    cm.update(np.array([0, 0, 1, 1, 255]), np.array([0, 1, 1, 1, 2]))
    # class 2 absent from GT and (scored) predictions: 0 in the faithful mean (§C.6), skipped with nan (AICSD)
    assert np.allclose(cm.iou(), [1 / 2, 2 / 3, 0.0])
    assert math.isclose(cm.miou(), (0.5 + 2 / 3) / 3)
    assert math.isclose(cm.miou(absent="nan"), (0.5 + 2 / 3) / 2)
    assert math.isclose(cm.pixel_acc(), 3 / 4)
    assert math.isclose(cm.mean_acc(), (1 / 2 + 1) / 2)
    assert math.isclose(cm.fwiou(), 0.5 * 0.5 + 0.5 * 2 / 3)
    with pytest.raises(ValueError):
        cm.iou(absent="skip")
    with pytest.raises(ValueError):
        cm.update(np.zeros(3), np.zeros(4))


def test_aicsd_metrics_from_matrix():
    """aicsd.md §7: Acc class = nanmean of per-class recall; mIoU nanmean; class predicted but absent from GT -> 0."""
    cm = ConfusionMatrix(4, 255)
    cm.update(np.array([0, 0, 0, 1, 1]), np.array([0, 0, 2, 1, 0]))
    m = cm.array
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.nanmean(np.diag(m) / m.sum(1))
        iou = np.diag(m) / (m.sum(1) + m.sum(0) - np.diag(m))
    assert math.isclose(cm.mean_acc(), acc)
    assert math.isclose(cm.miou(absent="nan"), np.nanmean(iou))
    assert cm.iou(absent="nan")[2] == 0.0 and np.isnan(cm.iou(absent="nan")[3])


def test_cirkd_segmentation_metric_matches_original_and_quirks():
    torch.manual_seed(0)
    k = 5
    logits = torch.randn(2, k, 6, 7) * 3
    target = torch.randint(-1, k, (2, 6, 7))
    ref = [orig_cirkd_batch(logits[i:i + 1], target[i:i + 1], k) for i in range(2)]
    metric = SegmentationMetric(k)
    for i in range(2):
        metric.update(logits[i:i + 1], target[i:i + 1])
    correct = sum(r[0] for r in ref)
    labelled = sum(r[1] for r in ref)
    inter = sum(r[2] for r in ref)
    union = sum(r[3] for r in ref)
    pix, miou = metric.get()
    assert math.isclose(pix, correct / (2.220446049250313e-16 + labelled), rel_tol=1e-6)
    assert math.isclose(miou, float((inter / (2.220446049250313e-16 + union)).mean()), rel_tol=1e-6)

    # truncated-logit argmax quirk: [0.5, 0.9] truncates to [0, 0] -> class 0, whereas the true argmax is 1
    quirk = torch.tensor([0.5, 0.9]).view(1, 2, 1, 1)
    tgt = torch.ones(1, 1, 1, dtype=torch.long)
    faithful, fixed = SegmentationMetric(2), SegmentationMetric(2, truncate_logits=False)
    faithful.update(quirk, tgt)
    fixed.update(quirk, tgt)
    assert faithful.get()[0] == pytest.approx(0.0) and fixed.get()[0] == pytest.approx(1.0)
    # absent classes: 0 by default, skipped with absent_as_zero=False
    assert faithful.get()[1] == pytest.approx(0.5) and SegmentationMetric(2, absent_as_zero=False).iou().size == 2
    nan_metric = SegmentationMetric(2, truncate_logits=False, absent_as_zero=False, float64=True)
    nan_metric.update(quirk, tgt)
    assert nan_metric.get()[1] == pytest.approx(1.0)


def _dist_worker(rank, world, port, out_dir):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    rng = np.random.default_rng(rank)
    gt, pred = rng.integers(0, 4, 100), rng.integers(0, 4, 100)
    cm = ConfusionMatrix(4, 255)
    cm.update(gt, pred)
    local = cm.array
    cm.all_reduce()
    sm = SegmentationMetric(4, float64=True)
    sm.update(torch.nn.functional.one_hot(torch.from_numpy(pred), 4).T.reshape(1, 4, 10, 10).float(),
              torch.from_numpy(gt).reshape(1, 10, 10))
    sm.all_reduce()
    np.savez(os.path.join(out_dir, f"r{rank}.npz"), local=local, total=cm.array, label=sm.total_label.numpy())
    dist.destroy_process_group()


def test_all_reduce_sums_over_two_gloo_ranks():
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_dist_worker, args=(2, free_port(), out), nprocs=2, join=True, start_method="fork")
        r0, r1 = (np.load(os.path.join(out, f"r{i}.npz")) for i in range(2))
        assert np.array_equal(r0["total"], r0["local"] + r1["local"])
        assert np.array_equal(r1["total"], r0["total"]) and float(r0["label"]) == 200.0


def test_all_reduce_is_noop_without_process_group():
    cm = ConfusionMatrix(2, 255)
    cm.update(np.array([0, 1]), np.array([0, 0]))
    before = cm.array
    assert np.array_equal(cm.all_reduce().array, before)


# ---------------------------------------------------------------- inference
def test_sliding_grid_matches_spec_numbers():
    boxes = sliding_grid(1024, 2048, (512, 512))
    assert len(boxes) == 18  # 3 rows × 6 cols, stride 342 (§C.6)
    assert {b[0] for b in boxes} == {0, 342, 512} and max(b[3] for b in boxes) == 2048
    assert all(b[1] - b[0] == 512 and b[3] - b[2] == 512 for b in boxes)
    assert sliding_grid(256, 300, (512, 512)) == [(0, 256, 0, 300)]


def test_sliding_equals_whole_for_a_per_pixel_model():
    model = PixelModel(4).eval()
    x = torch.randn(1, 3, 70, 130)
    with torch.no_grad():
        whole = predict_whole(model, x, (70, 130))
        slide = predict_sliding(model, x, (32, 48))
    assert torch.allclose(whole, slide, atol=1e-5)


def test_predict_whole_upsamples_main_logits_align_corners():
    model = StrideModel(5).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        got = predict_whole(model, x, (64, 96))
        ref = F.interpolate(model(x)[0], size=(64, 96), mode="bilinear", align_corners=True)
    assert torch.equal(got, ref)


def test_multiscale_resize_matches_scipy_zoom():
    x = torch.randn(1, 3, 20, 30, dtype=torch.float64)
    for s in (0.75, 1.25):
        ref = ndimage.zoom(x.numpy(), (1.0, 1.0, s, s), order=1, prefilter=False)
        assert np.allclose(resize_image(x, s).numpy(), ref, atol=1e-10)


# cirkd.md §5.2: eval.py resizes with F.interpolate(scale_factor=s), i.e. floor(H·s); sizes worked out by hand
CIRKD_SCALED_SIZES = {
    ((375, 500), 0.5): (187, 250), ((375, 500), 0.75): (281, 375), ((375, 500), 1.25): (468, 625),
    ((375, 500), 1.5): (562, 750), ((375, 500), 1.75): (656, 875),
    ((360, 480), 0.5): (180, 240), ((360, 480), 0.75): (270, 360), ((360, 480), 1.25): (450, 600),
    ((360, 480), 1.5): (540, 720), ((360, 480), 1.75): (630, 840),
}


@pytest.mark.parametrize("image_size,scale", list(CIRKD_SCALED_SIZES))
def test_cirkd_scaled_size_is_floor(image_size, scale):
    assert scaled_size(*image_size, scale, "floor") == CIRKD_SCALED_SIZES[(image_size, scale)]


def test_scaled_size_round_keeps_the_psp_lineage_size():
    assert scaled_size(375, 500, 0.5) == (188, 250) and scaled_size(375, 500, 1.25) == (469, 625)  # round(H·s)


def test_cirkd_floor_resize_is_the_originals_scale_factor_interpolate():
    x = torch.randn(1, 3, 375, 500, generator=torch.Generator().manual_seed(0))
    for s in (0.5, 1.25):
        ref = F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=True)
        assert torch.equal(resize_image(x, s, "floor"), ref)


def test_multiscale_flip_averages_logits_as_original():
    model = StrideModel(4).eval()
    x = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        got = predict_multiscale(model, x, (48, 64), scales=(0.5, 1.0), flip=True)
        parts = []
        for s in (0.5, 1.0):
            xs = resize_image(x, s)
            p = predict_whole(model, xs, (48, 64))
            pf = predict_whole(model, xs.flip(-1), (48, 64)).flip(-1)
            parts.append(0.5 * (p + pf))
        ref = (parts[0] + parts[1]) / 2
        assert torch.allclose(got, ref)
        assert torch.equal(predict_multiscale(model, x, (48, 64)), predict_whole(model, x, (48, 64)))


# ---------------------------------------------------------------- evaluate_main
def _orig_evaluate(model, batches, num_classes):
    """The original whole-image loop in numpy (§C.6): zoom at 1.0, upsample, argmax uint8, crop, bincount."""
    cm = np.zeros((num_classes, num_classes))
    for image, label, size, _ in batches:
        with torch.no_grad():
            logits = F.interpolate(model(torch.from_numpy(ndimage.zoom(image.numpy(), (1, 1, 1, 1), order=1,
                                                                        prefilter=False)))[0],
                                   size=label.shape[-2:], mode="bilinear", align_corners=True)
        pred = np.asarray(np.argmax(logits[0].numpy().transpose(1, 2, 0), axis=2), dtype=np.uint8)
        h, w = int(size[0][0]), int(size[0][1])
        gt = np.asarray(label[0].numpy()[:h, :w], dtype=int)
        pred = pred[:h, :w]
        keep = gt != 255
        cm += orig_get_confusion_matrix(gt[keep], pred[keep], num_classes)
    return orig_miou(cm)


def test_evaluate_main_matches_original_loop_and_writes_pngs(tmp_path):
    torch.manual_seed(1)
    batches = []
    for i in range(3):
        label = torch.randint(0, 6, (1, 40, 56)).float()
        label[0, :4] = 255
        batches.append((torch.randn(1, 3, 40, 56), label, torch.tensor([[36, 50, 3]]), [f"img{i}"]))
    model = StrideModel(6).train()
    res = evaluate_main(model, batches, num_classes=6, device="cpu", output_dir=tmp_path, progress=False)
    assert model.training
    ref_miou, ref_iou = _orig_evaluate(model, batches, 6)
    assert math.isclose(res.miou, ref_miou) and np.allclose(res.iou, ref_iou)
    assert res.num_images == 3 and res.images_per_s > 0 and res.peak_mem_mb > 0
    assert res.confusion.sum() == 3 * (36 - 4) * 50
    png = Image.open(tmp_path / "img0.png")
    assert png.mode == "P" and png.size == (50, 36)
    fields = res.result_fields()
    assert fields["miou"] == res.miou and len(fields["iou"]) == 6


def test_evaluate_main_fixed_input_size_and_batches():
    """input_size=(H, W) upsamples to a fixed size (the Cityscapes 1024×2048 of the originals); batch > 1 works."""
    label = torch.full((2, 32, 48), 255.0)
    label[:, :16, :24] = 2
    batch = (torch.randn(2, 3, 32, 48), label, torch.tensor([[16, 24], [32, 48]]), ["a", "b"])
    res = evaluate_main(ConstantModel(4, 2), [batch], num_classes=4, device="cpu", input_size=(32, 48),
                        progress=False)
    assert res.num_images == 2 and res.confusion[2, 2] == 2 * 16 * 24 and res.confusion.sum() == 2 * 16 * 24
    assert res.iou[2] == 1.0 and math.isclose(res.miou, 0.25)


def test_evaluate_main_cirkd_metric_and_absent_policy():
    torch.manual_seed(2)
    label = torch.randint(-1, 3, (1, 24, 32)).float()  # CIRKD ignore label −1
    batch = (torch.randn(1, 3, 24, 32), label, torch.tensor([[24, 32]]), ["x"])
    model = StrideModel(5)
    with torch.no_grad():
        model.conv.bias[3:] = -1e4  # classes 3, 4: neither in GT nor predicted
    res = evaluate_main(model, [batch], num_classes=5, device="cpu", metric="cirkd", ignore_label=-1, progress=False)
    ref = SegmentationMetric(5)
    with torch.no_grad():
        ref.update(predict_whole(model, batch[0], (24, 32)), label.long())
    assert (res.pixel_acc, res.miou) == pytest.approx(ref.get()) and res.confusion is None and res.mean_acc is None
    assert res.iou[3] == 0.0 and res.iou[4] == 0.0  # classes 3, 4 never in GT: CIRKD counts them 0 (§5.3)
    nan = evaluate_main(model, [batch], num_classes=5, device="cpu", ignore_label=-1, absent="nan", progress=False)
    zero = evaluate_main(model, [batch], num_classes=5, device="cpu", ignore_label=-1, progress=False)
    present = ~np.isnan(nan.iou)
    assert present.tolist() == [True, True, True, False, False]
    assert nan.miou == pytest.approx(nan.iou[present].mean()) and zero.miou == pytest.approx(zero.iou.mean())
    fields = nan.result_fields()
    assert all((v is None) == (not p) for v, p in zip(fields["iou"], present))
    with pytest.raises(UserError):
        evaluate_main(model, [batch], num_classes=5, device="cpu", metric="mmseg", progress=False)


def test_evaluate_main_test_mode_exports_labelids(tmp_path):
    batch = (torch.randn(1, 3, 24, 40), torch.tensor([[24, 40, 3]]), ["berlin_000000_000019_leftImg8bit"])
    res = evaluate_main(ConstantModel(19, 13), [batch], device="cpu", mode="test", output_dir=tmp_path,
                        progress=False)
    assert res.miou is None and res.num_images == 1
    out = np.array(Image.open(tmp_path / "berlin_000000_000019_leftImg8bit.png"))
    assert out.shape == (24, 40) and (out == 26).all()  # trainId 13 (car) -> labelId 26
    with pytest.raises(UserError):
        evaluate_main(ConstantModel(19, 0), [batch], device="cpu", mode="train", progress=False)
    with pytest.raises(UserError):
        evaluate_main(ConstantModel(19, 0), [batch], device="cpu", mode="val", progress=False)


def test_evaluate_main_on_synthetic_cityscapes(synthetic_cityscapes, tmp_path):
    from common.datasets.cityscapes import CSTrainValSet

    root = synthetic_cityscapes
    ds = CSTrainValSet(str(root), str(root / "lists" / "val.lst"), crop_size=(256, 512))
    loader = torch.utils.data.DataLoader(ds, batch_size=1, shuffle=False)
    res = evaluate_main(ConstantModel(19, 0), loader, device="cpu", output_dir=tmp_path / "out", progress=False)
    gt = np.concatenate([ds[i][1].reshape(-1) for i in range(len(ds))])
    gt = gt[gt != 255]
    assert res.num_images == len(ds) == 2
    assert math.isclose(res.iou[0], (gt == 0).sum() / gt.size)
    assert math.isclose(res.miou, res.iou[0] / 19) and math.isclose(res.pixel_acc, (gt == 0).mean())
    assert len(list((tmp_path / "out").glob("*.png"))) == 2
    path = write_results_json(tmp_path / "results.json", paper="ifvd", method="baseline", model="pspnet_resnet18",
                              dataset="cityscapes", split="val", iterations=0, crop=[512, 512], batch=8, seed=0,
                              scale="demo", **res.result_fields())
    data = read_results(path)
    assert data["miou"] == pytest.approx(res.miou) and data["scale"] == "demo"
    assert json.loads(path.read_text())["iou"][0] == pytest.approx(res.iou[0])


# ---------------------------------------------------------------- hand-computed cases (issue 15)
class OracleModel(nn.Module):
    """Full-resolution logits one-hot in the image's channel 0: the prediction is channel 0 itself."""

    def forward(self, x):
        return [F.one_hot(x[:, 0].long(), 3).permute(0, 3, 1, 2).float(), x]


def oracle_batch(pred, gt, name):
    """One 3×4 image whose valid 2×3 top-left part holds `pred`/`gt`; the padding says class 0 in the label and
    class 2 in the prediction, so scoring it would change every number below."""
    image = torch.full((1, 3, 3, 4), 2.0)
    image[0, 0, :2, :3] = torch.tensor(pred, dtype=torch.float32)
    label = torch.zeros(1, 3, 4)
    label[0, :2, :3] = torch.tensor(gt, dtype=torch.float32)
    return image, label, torch.tensor([[2, 3, 3]]), [name]


PRED_A, GT_A = [[0, 1, 1], [2, 2, 0]], [[0, 0, 1], [2, 255, 1]]
PRED_B, GT_B = [[1, 2, 2], [2, 0, 1]], [[1, 1, 2], [2, 0, 0]]


def test_evaluate_main_two_images_three_classes_known_by_hand(tmp_path):
    batches = [oracle_batch(PRED_A, GT_A, "a"), oracle_batch(PRED_B, GT_B, "b")]
    res = evaluate_main(OracleModel(), batches, num_classes=3, device="cpu", output_dir=tmp_path, progress=False)
    # rows = ground truth, columns = prediction (§C.6 step 2); the 255 pixel of image a is dropped
    assert res.confusion.tolist() == [[2, 2, 0], [1, 2, 1], [0, 0, 3]]
    assert res.iou.tolist() == pytest.approx([2 / 5, 2 / 6, 3 / 4])  # TP / (row + column − TP)
    assert res.miou == pytest.approx((2 / 5 + 2 / 6 + 3 / 4) / 3)
    assert res.pixel_acc == pytest.approx(7 / 11)
    assert res.mean_acc == pytest.approx((2 / 4 + 2 / 4 + 3 / 3) / 3)  # recall per ground-truth class
    assert res.num_images == 2


def test_evaluate_main_writes_the_cropped_predictions_as_voc_palette_pngs(tmp_path):
    batches = [oracle_batch(PRED_A, GT_A, "a"), oracle_batch(PRED_B, GT_B, "b")]
    evaluate_main(OracleModel(), batches, num_classes=3, device="cpu", output_dir=tmp_path, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png"]
    for name, pred in (("a", PRED_A), ("b", PRED_B)):
        png = Image.open(tmp_path / f"{name}.png")
        assert png.mode == "P" and np.array(png).tolist() == pred
        assert png.getpalette()[:9] == [0, 0, 0, 128, 0, 0, 0, 128, 0]  # VOC colours of 0, 1, 2 (§C.6)


def test_evaluate_main_drops_its_ignore_label_inside_the_class_range():
    batches = [oracle_batch(PRED_A, GT_A, "a"), oracle_batch(PRED_B, GT_B, "b")]
    res = evaluate_main(OracleModel(), batches, num_classes=3, device="cpu", ignore_label=1, progress=False)
    # ground-truth class 1 is now ignored; the 255 pixel falls outside [0, 3) and stays dropped
    assert res.confusion.tolist() == [[2, 2, 0], [0, 0, 0], [0, 0, 3]]


def test_confusion_matrix_drops_an_ignore_index_inside_the_class_range():
    gt, pred = np.array([0, 1, 2, 1, 2]), np.array([0, 0, 2, 2, 1])
    cm = ConfusionMatrix(3, ignore_index=1)
    cm.update(gt, pred)
    assert cm.array.tolist() == [[1, 0, 0], [0, 0, 0], [0, 1, 1]]
    kept = ConfusionMatrix(3, ignore_index=255)
    kept.update(gt, pred)
    assert kept.array.tolist() == [[1, 0, 0], [1, 0, 1], [0, 1, 1]]

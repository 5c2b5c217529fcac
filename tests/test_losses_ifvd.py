"""IFVD's intra-class feature variation loss against a per-class-loop transcription (specs §A.4.3, §A.10)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common.losses.ifvd import (
    IntraClassFeatureVariation,
    class_index,
    class_prototypes,
    downsample_labels,
    pixel_cosine,
)


def ifv_class_loop(preds_s_feat, preds_t_feat, target, num_classes, detach_protos=False):
    """Direct transcription of the original ``CriterionIFV.forward`` (§A.4.3), kept as the reference."""
    feat_s, feat_t = preds_s_feat, preds_t_feat
    size_f = (feat_s.shape[2], feat_s.shape[3])
    tar_feat_s = nn.Upsample(size_f, mode="nearest")(target.unsqueeze(1).float()).expand(feat_s.size())
    tar_feat_t = nn.Upsample(size_f, mode="nearest")(target.unsqueeze(1).float()).expand(feat_t.size())
    center_feat_s = feat_s.clone()
    center_feat_t = feat_t.clone()
    for i in range(num_classes):
        mask_feat_s = (tar_feat_s == i).to(feat_s.dtype)
        mask_feat_t = (tar_feat_t == i).to(feat_t.dtype)
        proto_s = (mask_feat_s * feat_s).sum(-1).sum(-1) / (mask_feat_s.sum(-1).sum(-1) + 1e-6)
        proto_t = (mask_feat_t * feat_t).sum(-1).sum(-1) / (mask_feat_t.sum(-1).sum(-1) + 1e-6)
        if detach_protos:
            proto_s = proto_s.detach()
        center_feat_s = (1 - mask_feat_s) * center_feat_s + mask_feat_s * proto_s.unsqueeze(-1).unsqueeze(-1)
        center_feat_t = (1 - mask_feat_t) * center_feat_t + mask_feat_t * proto_t.unsqueeze(-1).unsqueeze(-1)
    cos = nn.CosineSimilarity(dim=1)
    pcsim_feat_s = cos(feat_s, center_feat_s)
    pcsim_feat_t = cos(feat_t, center_feat_t)
    return nn.MSELoss()(pcsim_feat_s, pcsim_feat_t)


def make_inputs(seed, num_classes=19, b=2, cs=8, ct=16, h=9, w=11, label_hw=(72, 88), dtype=torch.float64):
    """Features and labels with ignored pixels, absent classes and one-pixel classes."""
    g = torch.Generator().manual_seed(seed)
    feat_s = torch.randn(b, cs, h, w, generator=g, dtype=dtype)
    feat_t = torch.randn(b, ct, h, w, generator=g, dtype=dtype)
    # labels mostly from a few classes (so most classes are absent), then 255 and one-pixel classes
    present = torch.randperm(num_classes, generator=g)[:4]
    target = present[torch.randint(0, 4, (b, *label_hw), generator=g)]
    target[:, : label_hw[0] // 4] = 255
    rows = (torch.arange(h) * label_hw[0]) // h  # the pixels that survive the nearest downsampling
    cols = (torch.arange(w) * label_hw[1]) // w
    lone = [c for c in range(num_classes) if c not in present.tolist()][:2]
    target[0, rows[-1], cols[-1]] = lone[0]
    target[1, rows[-2], cols[0]] = lone[1]
    target[1, rows[-1], cols[2]] = num_classes + 3  # a label >= C (not 255) also keeps its own feature
    return feat_s, feat_t, target


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_value_and_gradient_equal_class_loop_float64(seed):
    feat_s, feat_t, target = make_inputs(seed)
    crit = IntraClassFeatureVariation(num_classes=19)
    s1 = feat_s.clone().requires_grad_(True)
    s2 = feat_s.clone().requires_grad_(True)
    loss = crit(s1, feat_t, target)
    ref = ifv_class_loop(s2, feat_t, target, 19)
    assert loss.dtype == torch.float64 and loss.dim() == 0
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-15)
    (g1,) = torch.autograd.grad(loss, s1)
    (g2,) = torch.autograd.grad(ref, s2)
    torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-14)
    assert g1.abs().sum() > 0


def test_equals_class_loop_at_150_classes_and_float32():
    feat_s, feat_t, target = make_inputs(5, num_classes=150, h=17, w=19, label_hw=(68, 76), dtype=torch.float32)
    crit = IntraClassFeatureVariation(num_classes=150)
    torch.testing.assert_close(crit(feat_s, feat_t, target), ifv_class_loop(feat_s, feat_t, target, 150))


def test_gradient_flows_through_prototypes():
    feat_s, feat_t, target = make_inputs(3)
    s1 = feat_s.clone().requires_grad_(True)
    s2 = feat_s.clone().requires_grad_(True)
    (g1,) = torch.autograd.grad(IntraClassFeatureVariation(19)(s1, feat_t, target), s1)
    (g2,) = torch.autograd.grad(ifv_class_loop(s2, feat_t, target, 19, detach_protos=True), s2)
    assert (g1 - g2).abs().max() > 1e-6


def test_teacher_receives_no_gradient():
    feat_s, feat_t, target = make_inputs(4)
    feat_s.requires_grad_(True)
    feat_t.requires_grad_(True)
    IntraClassFeatureVariation(19)(feat_s, feat_t, target).backward()
    assert feat_t.grad is None and feat_s.grad is not None


def test_prototypes_and_pixel_cosine_against_an_explicit_center_map():
    feat = torch.randn(1, 2, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([[[0, 0, 1, 255], [0, 1, 1, 255], [7, 7, 0, 2]]], dtype=torch.float64)
    valid, index = class_index(labels, num_classes=3)
    protos = class_prototypes(feat, index, num_classes=3)
    f, lab = feat.flatten(2)[0], labels.flatten()
    center = f.clone()
    for k in range(3):
        m = lab == k
        proto = f[:, m].sum(1) / (m.sum() + 1e-6)
        torch.testing.assert_close(protos[0, :, k], proto)
        center[:, m] = proto[:, None]
    expected = F.cosine_similarity(f, center, dim=0).view(1, 3, 4)
    got = pixel_cosine(feat, valid, index, num_classes=3)
    torch.testing.assert_close(got, expected)
    keep = ((lab == 255) | (lab == 7)).view(1, 3, 4)
    assert (got[keep] == 1).all()


def test_label_downsampling_is_legacy_nearest():
    target = torch.arange(512).view(1, 512, 1).expand(1, 512, 512)
    rows = downsample_labels(target, (65, 65))[0, :, 0].long()
    assert rows[:4].tolist() == [0, 7, 15, 23] and rows[-1].item() == 504


def test_identical_features_give_zero_and_value_is_symmetric_and_bounded():
    crit = IntraClassFeatureVariation(19)
    feat_s, feat_t, target = make_inputs(6, cs=16)
    assert crit(feat_s, feat_s, target).item() == pytest.approx(0.0, abs=1e-15)
    ab = crit(feat_s, feat_t, target)
    torch.testing.assert_close(ab, crit(feat_t, feat_s, target))
    assert 0.0 < ab.item() <= 4.0
    # the bound is reached with anti-aligned prototypes: cos = +1 vs -1 on every valid pixel
    one = torch.ones(1, 3, 2, 2, dtype=torch.float64)
    labels = torch.zeros(1, 2, 2, dtype=torch.long)
    sign = torch.tensor([1.0, 1.0, 1.0, -5.0], dtype=torch.float64).view(1, 1, 2, 2)
    assert crit(one, one * sign, labels).item() == pytest.approx(4.0 * 3 / 4)


def test_invariant_to_global_scale_and_orthogonal_channel_maps_not_per_pixel_scale():
    crit = IntraClassFeatureVariation(19)
    feat_s, feat_t, target = make_inputs(7)
    base = crit(feat_s, feat_t, target)
    torch.testing.assert_close(crit(3.7 * feat_s, 0.2 * feat_t, target), base)
    q, _ = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    rotated = torch.einsum("dc,bchw->bdhw", q, feat_s)
    torch.testing.assert_close(crit(rotated, feat_t, target), base)
    per_pixel = torch.rand(1, 1, 9, 11, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) + 0.1
    assert (crit(feat_s * per_pixel, feat_t, target) - base).abs() > 1e-6


def test_all_ignored_is_about_zero_and_ignored_pixels_dilute_the_mean():
    crit = IntraClassFeatureVariation(19)
    feat_s, feat_t, target = make_inputs(8, dtype=torch.float32)
    assert crit(feat_s, feat_t, torch.full_like(target, 255)).item() < 1e-6
    # ignored pixels add zero error but count in the denominator (§A.4.3 step 5)
    t = torch.zeros(1, 4, 4, dtype=torch.long)
    fs, ft = torch.randn(1, 5, 4, 4), torch.randn(1, 5, 4, 4)
    full = crit(fs, ft, t)
    half = t.clone()
    half[:, 2:] = 255
    valid, index = class_index(downsample_labels(half, (4, 4)), 19)
    err = (pixel_cosine(fs, valid, index, 19) - pixel_cosine(ft, valid, index, 19))[:, :2]
    torch.testing.assert_close(crit(fs, ft, half), (err**2).sum() / 16)
    assert full.item() > 0


def test_ignore_index_is_configurable():
    feat_s, feat_t, target = make_inputs(9)
    target = torch.where(target == 255, torch.full_like(target, 250), target)
    crit = IntraClassFeatureVariation(19, ignore_index=250)
    torch.testing.assert_close(crit(feat_s, feat_t, target), ifv_class_loop(feat_s, feat_t, target, 19))


def test_ignore_index_inside_the_class_range_drops_that_class():
    feat_s, feat_t, target = make_inputs(9)
    k = int(target[target < 19][0])  # a class present in the labels
    crit = IntraClassFeatureVariation(19, ignore_index=k)
    as_255 = torch.where(target == k, torch.full_like(target, 255), target)
    torch.testing.assert_close(crit(feat_s, feat_t, target), ifv_class_loop(feat_s, feat_t, as_255, 19))
    assert (crit(feat_s, feat_t, target) - IntraClassFeatureVariation(19)(feat_s, feat_t, target)).abs() > 1e-6


def test_float_labels_and_different_channel_counts():
    feat_s, feat_t, target = make_inputs(10, cs=128 // 16, ct=512 // 16)
    crit = IntraClassFeatureVariation(19)
    torch.testing.assert_close(crit(feat_s, feat_t, target.float()), crit(feat_s, feat_t, target))


@pytest.mark.parametrize(
    "shapes",
    [
        ((2, 8, 9, 11), (2, 16, 9, 10), (2, 72, 88)),  # spatial mismatch
        ((2, 8, 9, 11), (3, 16, 9, 11), (2, 72, 88)),  # batch mismatch
        ((2, 8, 9, 11), (2, 16, 9, 11), (3, 72, 88)),  # label batch
        ((8, 9, 11), (2, 16, 9, 11), (2, 72, 88)),  # not 4-D
        ((2, 8, 9, 11), (2, 16, 9, 11), (2, 1, 72, 88)),  # labels with a channel dim
    ],
)
def test_bad_shapes_raise(shapes):
    s, t, y = shapes
    with pytest.raises(ValueError, match="IFV"):
        IntraClassFeatureVariation(19)(torch.randn(*s), torch.randn(*t), torch.zeros(*y, dtype=torch.long))


def test_bad_num_classes_raises():
    with pytest.raises(ValueError, match="num_classes"):
        IntraClassFeatureVariation(0)


def test_matches_loop_on_module_with_dropout_features():
    """The loss runs on post-dropout student features as in the original (§A.9 item 5)."""
    torch.manual_seed(0)
    feat = F.dropout2d(torch.randn(2, 8, 9, 11, dtype=torch.float64), 0.5, training=True)
    _, feat_t, target = make_inputs(11)
    torch.testing.assert_close(
        IntraClassFeatureVariation(19)(feat, feat_t, target), ifv_class_loop(feat, feat_t, target, 19)
    )


def test_half_precision_inputs_are_computed_in_float32():
    feat_s, feat_t, target = make_inputs(12, dtype=torch.float32)
    crit = IntraClassFeatureVariation(19)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = crit(feat_s.bfloat16(), feat_t.bfloat16(), target)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, crit(feat_s.bfloat16().float(), feat_t.bfloat16().float(), target))

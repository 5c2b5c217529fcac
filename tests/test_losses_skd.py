"""SKD losses against direct transcriptions of the originals (ifvd_skd.md §B.4.2/§B.4.3, skd_cvpr19.md §8)
and the invariants of §B.10."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common.losses.skd import ConferenceCrossEntropy, PairWise, PairWiseCos, PixelWise, PixelWiseKD


def ref_pixel_wise(preds_s, preds_t):
    """Line-by-line transcription of SKD master ``CriterionPixelWise.forward``."""
    preds_t[0].detach()
    n, c, w, h = preds_s[0].shape
    softmax_pred_t = F.softmax(preds_t[0].permute(0, 2, 3, 1).contiguous().view(-1, c), dim=1)
    logsoftmax = nn.LogSoftmax(dim=1)
    return (torch.sum(-softmax_pred_t * logsoftmax(preds_s[0].permute(0, 2, 3, 1).contiguous().view(-1, c)))) / w / h


def ref_l2(f_):
    return (((f_ ** 2).sum(dim=1)) ** 0.5).reshape(f_.shape[0], 1, f_.shape[2], f_.shape[3]) + 1e-8


def ref_similarity(feat):
    feat = feat.float()
    tmp = ref_l2(feat).detach()
    feat = feat / tmp
    feat = feat.reshape(feat.shape[0], feat.shape[1], -1)
    return torch.einsum("icm,icn->imn", [feat, feat])


def ref_sim_dis_compute(f_s, f_t):
    sim_err = ((ref_similarity(f_t) - ref_similarity(f_s)) ** 2) / ((f_t.shape[-1] * f_t.shape[-2]) ** 2) / f_t.shape[0]
    return sim_err.sum()


def ref_pair_wise(preds_s, preds_t, scale, feat_ind=-5):
    """Transcription of ``CriterionPairWiseforWholeFeatAfterPool.forward``."""
    feat_s = preds_s[feat_ind]
    feat_t = preds_t[feat_ind]
    feat_t.detach()
    total_w, total_h = feat_t.shape[2], feat_t.shape[3]
    patch_w, patch_h = int(total_w * scale), int(total_h * scale)
    maxpool = nn.MaxPool2d(kernel_size=(patch_w, patch_h), stride=(patch_w, patch_h), padding=0, ceil_mode=True)
    return ref_sim_dis_compute(maxpool(feat_s), maxpool(feat_t))


def test_pixel_wise_matches_original():
    g = torch.Generator().manual_seed(0)
    zs, zt = torch.randn(3, 19, 13, 11, generator=g), torch.randn(3, 19, 13, 11, generator=g)
    ours = PixelWise()(zs, zt)
    ref = ref_pixel_wise([zs], [zt])
    assert ours.dim() == 0
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    per_pixel_ce = (-F.softmax(zt, 1) * F.log_softmax(zs, 1)).sum(1).mean()
    torch.testing.assert_close(ours, 3 * per_pixel_ce, rtol=1e-6, atol=1e-6)


def test_pixel_wise_invariants():
    g = torch.Generator().manual_seed(1)
    zs = torch.randn(2, 5, 6, 7, generator=g, requires_grad=True)
    zt = torch.randn(2, 5, 6, 7, generator=g)
    loss = PixelWise()(zs, zt)
    loss.backward()
    expected = (F.softmax(zs.detach(), 1) - F.softmax(zt, 1)) / (6 * 7)
    torch.testing.assert_close(zs.grad, expected, rtol=1e-5, atol=1e-7)
    same = PixelWise()(zt, zt)
    entropy = (-F.softmax(zt, 1) * F.log_softmax(zt, 1)).sum(1).mean()
    torch.testing.assert_close(same, 2 * entropy)
    assert same > 0
    assert not torch.allclose(PixelWise()(zs.detach(), zt), PixelWise()(zt, zs.detach()))
    shift = torch.randn(2, 1, 6, 7, generator=g)
    torch.testing.assert_close(PixelWise()(zs.detach() + shift, zt - shift), PixelWise()(zs.detach(), zt))


def test_pixel_wise_detach_semantics():
    zs = torch.randn(1, 4, 3, 3, requires_grad=True)
    zt = torch.randn(1, 4, 3, 3, requires_grad=True)
    PixelWise()(zs, zt).backward()
    assert zt.grad is not None and zt.grad.abs().sum() > 0
    zt.grad = None
    PixelWise(detach_teacher=True)(zs, zt).backward()
    assert zt.grad is None


def test_pixel_wise_shape_mismatch():
    with pytest.raises(ValueError, match="differ in shape"):
        PixelWise()(torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 5))


@pytest.mark.parametrize("shape_s,shape_t,scale", [((2, 128, 65, 65), (2, 512, 65, 65), 0.5),
                                                   ((3, 8, 45, 60), (3, 16, 45, 60), 0.5),
                                                   ((1, 4, 20, 33), (1, 6, 20, 33), 0.25)])
def test_pair_wise_matches_original(shape_s, shape_t, scale):
    g = torch.Generator().manual_seed(2)
    fs = torch.randn(*shape_s, generator=g, requires_grad=True)
    ft = torch.randn(*shape_t, generator=g)
    ours = PairWise(scale)(fs, ft)
    ref = ref_pair_wise([fs, 0, 0, 0, 0], [ft, 0, 0, 0, 0], scale)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-7)
    (g_ours,) = torch.autograd.grad(ours, fs)
    (g_ref,) = torch.autograd.grad(ref, fs)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-5, atol=1e-8)


def test_pair_wise_grid_and_invariants():
    g = torch.Generator().manual_seed(3)
    f = torch.randn(2, 128, 65, 65, generator=g)
    ft = torch.randn(2, 512, 65, 65, generator=g)
    assert F.max_pool2d(f, (32, 32), (32, 32), 0, ceil_mode=True).shape[2:] == (3, 3)
    pa = PairWise(0.5)
    assert pa(f, f).item() == pytest.approx(0.0, abs=1e-7)
    v = pa(f, ft)
    torch.testing.assert_close(v, pa(ft, f))
    assert 0 < v.item() <= 4
    torch.testing.assert_close(pa(3.0 * f, ft), v, rtol=1e-5, atol=1e-7)


def test_pair_wise_gradient_freezes_norm():
    """Autograd equals the analytic gradient with ‖f‖ frozen (§B.10), not the true cosine gradient."""
    g = torch.Generator().manual_seed(4)
    fs = torch.randn(1, 5, 2, 2, generator=g, requires_grad=True)
    ft = torch.randn(1, 7, 2, 2, generator=g)
    loss = PairWise(0.5)(fs, ft)  # patch 1x1: pooling is the identity, N = 4
    (grad,) = torch.autograd.grad(loss, fs)
    x = fs.detach().flatten(2)[0]  # C×N
    norm = x.norm(dim=0) + 1e-8
    xh = x / norm
    a_s = xh.t() @ xh
    y = ft.flatten(2)[0]
    yh = y / (y.norm(dim=0) + 1e-8)
    a_t = yh.t() @ yh
    d = -2 * (a_t - a_s) / 16  # dL/dA_S
    frozen = (xh @ (d + d.t())) / norm  # d/dx_i with the norm held constant
    torch.testing.assert_close(grad.flatten(2)[0], frozen, rtol=1e-5, atol=1e-7)
    fs2 = fs.detach().clone().requires_grad_(True)
    a_true = F.normalize(fs2.flatten(2)[0], dim=0)
    true_loss = ((a_t - a_true.t() @ a_true) ** 2).sum() / 16
    (true_grad,) = torch.autograd.grad(true_loss, fs2)
    assert not torch.allclose(true_grad, grad, atol=1e-4)


def test_pair_wise_bad_inputs():
    with pytest.raises(ValueError, match="spatial"):
        PairWise()(torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 9))
    with pytest.raises(ValueError, match="empty pooling patch"):
        PairWise(0.1)(torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4))


def ref_conference_kd(preds_s, preds_t, upsample=False, t=1.0):
    """Transcription of the cvpr_19 ``CriterionKD`` (legacy ``KLDivLoss()`` = elementwise mean)."""
    h, w = preds_t[0].size(2), preds_t[0].size(3)
    scale_pred = preds_s[0]
    if upsample:
        scale_pred = F.interpolate(preds_s[0], size=(h * 8, w * 8), mode="bilinear", align_corners=True)
    scale_soft = F.interpolate(preds_t[0], size=(h * 8, w * 8), mode="bilinear", align_corners=True)
    return F.kl_div(F.log_softmax(scale_pred / t, dim=1), F.softmax(scale_soft / t, dim=1),
                    reduction="sum") / scale_pred.numel()


@pytest.mark.parametrize("upsample,t", [(False, 1.0), (True, 1.0), (False, 2.0)])
def test_conference_kd_matches_original(upsample, t):
    g = torch.Generator().manual_seed(5)
    zt = torch.randn(2, 11, 5, 6, generator=g)
    zs = torch.randn(2, 11, 5, 6, generator=g) if upsample else torch.randn(2, 11, 40, 48, generator=g)
    torch.testing.assert_close(PixelWiseKD(upsample, t)(zs, zt), ref_conference_kd([zs], [zt], upsample, t))
    assert PixelWiseKD(True)(zt, zt).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="upsample"):
        PixelWiseKD(False)(torch.randn(1, 11, 5, 6), zt[:1])


def ref_sdcos(fs, ft, mode):
    def graph(f):
        b, c = f.shape[:2]
        f = f.view(b, c, -1)
        n = torch.norm(f, 2, 1, keepdim=True)
        a = torch.bmm(f.transpose(1, 2), f) / torch.bmm(n.transpose(1, 2), n)
        return {"softmax": F.softmax(a, dim=2), "raw": a, "sigmoid": torch.sigmoid(a)}[mode]

    return nn.MSELoss()(graph(fs), graph(ft))


@pytest.mark.parametrize("mode", PairWiseCos.MODES)
def test_conference_pair_wise(mode):
    g = torch.Generator().manual_seed(6)
    fs, ft = torch.randn(2, 6, 5, 7, generator=g), torch.randn(2, 9, 5, 7, generator=g)
    torch.testing.assert_close(PairWiseCos(mode)(fs, ft), ref_sdcos(fs, ft, mode), rtol=1e-5, atol=1e-8)
    assert PairWiseCos(mode)(fs, fs).item() == pytest.approx(0.0, abs=1e-8)
    with pytest.raises(ValueError, match="mode"):
        PairWiseCos("cosine")


def test_conference_cross_entropy_upsamples_and_ignores():
    g = torch.Generator().manual_seed(7)
    z = torch.randn(1, 11, 4, 4, generator=g)
    label = torch.randint(0, 11, (1, 8, 8), generator=g).float()
    label[0, 0, :] = 255
    up = F.interpolate(z, size=(8, 8), mode="bilinear", align_corners=True)
    expected = F.cross_entropy(up, label.long(), ignore_index=255)
    torch.testing.assert_close(ConferenceCrossEntropy()(z, label), expected)
    torch.testing.assert_close(ConferenceCrossEntropy()(up, label), expected)  # already at the label size

"""CIRKD's baseline losses (specs/cirkd.md §3.7, §9 "Baselines"): AT, FitNet, DSD and CIRKD's versions of the
SKD pair-wise, IFVD, CWD, task and hinge adversarial terms, against transcriptions written from the spec in
float64; and the precision rule of every loss (half types computed in float32, float64 kept)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from common.losses.adversarial import discriminator_loss, generator_loss
from common.losses.at import AttentionTransfer
from common.losses.cirkd import MiniBatchPixelRelation
from common.losses.cwd import ChannelWiseDivergence
from common.losses.dsd import DSD
from common.losses.fitnet import FitNet
from common.losses.ifvd import IntraClassFeatureVariation
from common.losses.kd import LogitKD, PixelKL
from common.losses.segmentation import CriterionDSN
from common.losses.skd import ConferenceCrossEntropy, PairWise, PairWiseCos, PixelWise, PixelWiseKD
from common.models import Discriminator

F64 = torch.float64


def randn(*shape, seed=0, dtype=F64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---- transcriptions (§3.7)


def ref_at(f):
    return F.normalize(f.pow(2).mean(1).view(f.size(0), -1))


def ref_at_loss(f_s, f_t):
    return (ref_at(f_s) - ref_at(f_t)).pow(2).mean()


def ref_psd(maps_s, maps_t):
    att_s, att_t = [ref_at(f) for f in maps_s], [ref_at(f) for f in maps_t]
    loss, pairs = 0.0, 0
    for m in range(3):
        for n in range(m):
            r_s = F.normalize(att_s[m] - att_s[n])
            r_t = F.normalize(att_t[m] - att_t[n])
            loss = loss + (F.normalize(r_s) - F.normalize(r_t)).pow(2).mean()
            pairs += 1
    return loss / pairs


def ref_csd(logits_s, logits_t, temperature=4.0):
    pool = nn.AvgPool2d(kernel_size=2, stride=2, padding=0, ceil_mode=True)
    b, k = logits_s.shape[:2]
    p_s = F.softmax(pool(logits_s).view(b, k, -1) / temperature, dim=2)
    p_t = F.softmax(pool(logits_t).view(b, k, -1) / temperature, dim=2)
    g_s = torch.einsum("bkn,bln->bkl", p_s, p_s)
    g_t = torch.einsum("bkn,bln->bkl", p_t, p_t)
    return ((g_s - g_t) ** 2).mean()


def ref_structural_kd(feat_s, feat_t):
    maxpool = nn.MaxPool2d(kernel_size=(2, 2), stride=(2, 2), padding=0, ceil_mode=True)
    feat_s, feat_t = F.normalize(maxpool(feat_s), p=2, dim=1), F.normalize(maxpool(feat_t), p=2, dim=1)
    b, _, h, w = feat_s.shape
    sim_s = torch.bmm(feat_s.reshape(b, -1, h * w).transpose(1, 2), feat_s.reshape(b, -1, h * w))
    sim_t = torch.bmm(feat_t.reshape(b, -1, h * w).transpose(1, 2), feat_t.reshape(b, -1, h * w))
    return F.mse_loss(sim_s, sim_t)


def ref_cwd(conv, preds_s, preds_t, temperature=4.0):
    n, c, h, w = preds_s.shape
    if preds_s.size(1) != preds_t.size(1):
        preds_s = conv(preds_s)
    norm_s = F.softmax(preds_s.reshape(n, preds_s.size(1), -1) / temperature, dim=-1)
    norm_t = F.softmax(preds_t.reshape(n, preds_t.size(1), -1) / temperature, dim=-1)
    loss = nn.KLDivLoss(reduction="sum")(norm_s.log(), norm_t)
    return loss * temperature ** 2 / (n * c)


def ref_ifv(feat_s, feat_t, target, num_classes):
    size_f = (feat_s.shape[2], feat_s.shape[3])
    tar_s = F.interpolate(target.unsqueeze(1).float(), size_f, mode="nearest").expand(feat_s.size())
    tar_t = F.interpolate(target.unsqueeze(1).float(), size_f, mode="nearest").expand(feat_t.size())
    center_s, center_t = feat_s.clone(), feat_t.clone()
    for i in range(num_classes):
        mask_s, mask_t = (tar_s == i).float(), (tar_t == i).float()
        center_s = (1 - mask_s) * center_s + mask_s * (
            (mask_s * feat_s).sum(-1).sum(-1) / (mask_s.sum(-1).sum(-1) + 1e-6)).unsqueeze(-1).unsqueeze(-1)
        center_t = (1 - mask_t) * center_t + mask_t * (
            (mask_t * feat_t).sum(-1).sum(-1) / (mask_t.sum(-1).sum(-1) + 1e-6)).unsqueeze(-1).unsqueeze(-1)
    cos = nn.CosineSimilarity(dim=1)
    return F.mse_loss(cos(feat_s, center_s), cos(feat_t, center_t))


def assert_value_and_grad(ours, ref, inputs, rtol=1e-10):
    torch.testing.assert_close(ours, ref, rtol=rtol, atol=1e-14)
    for a, b in zip(torch.autograd.grad(ours, inputs), torch.autograd.grad(ref, inputs)):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-14)


# ---- AT, FitNet, DSD


def test_attention_transfer_matches_transcription():
    s = randn(2, 4, 5, 6, seed=1).requires_grad_(True)
    t = randn(2, 8, 5, 6, seed=2)
    ours = AttentionTransfer()(s, t)
    assert ours.dtype == F64
    assert_value_and_grad(ours, ref_at_loss(s, t), [s])


def test_attention_transfer_zero_for_identical_inputs_and_channel_counts_may_differ():
    t = randn(2, 8, 5, 6, seed=3)
    assert AttentionTransfer()(t, t).item() == 0.0
    assert AttentionTransfer()(torch.cat([t, t], 1), t).item() < 1e-30  # same channel mean of f²


def test_fitnet_matches_transcription_and_is_zero_with_identity_adapter():
    loss = FitNet(4, 6).double()
    s = randn(2, 4, 3, 3, seed=4).requires_grad_(True)
    t = randn(2, 6, 3, 3, seed=5)
    assert_value_and_grad(loss(s, t), F.mse_loss(loss.conv(s), t), [s] + list(loss.parameters()))
    assert loss.conv.bias is None and loss.conv.weight.shape == (6, 4, 1, 1)
    same = FitNet(6, 6).double()
    with torch.no_grad():
        same.conv.weight.copy_(torch.eye(6, dtype=F64).view(6, 6, 1, 1))
    assert same(t, t).item() == 0.0


def dsd_maps(seed, channels):
    return [randn(2, c, 5, 7, seed=seed + i) for i, c in enumerate(channels)]


def test_dsd_matches_transcription():
    maps_s = [m.requires_grad_(True) for m in dsd_maps(10, (5, 4, 5))]
    maps_t = dsd_maps(20, (5, 8, 5))
    psd, csd = DSD()(*maps_s, *maps_t)
    assert psd.dtype == F64 and csd.dtype == F64
    assert_value_and_grad(psd, ref_psd(maps_s, maps_t), maps_s)
    assert_value_and_grad(csd, ref_csd(maps_s[2], maps_t[2]), [maps_s[2]])


def test_dsd_zero_for_identical_inputs_and_category_matrix_is_k_by_k():
    maps = dsd_maps(30, (5, 8, 5))
    psd, csd = DSD()(*maps, *maps)
    assert psd.item() == 0.0 and csd.item() == 0.0
    from common.losses.dsd import category_similarity
    g = category_similarity(maps[2], 4.0)
    assert g.shape == (2, 5, 5)
    torch.testing.assert_close(g, g.transpose(1, 2))


def test_dsd_psd_averages_exactly_three_pairs():
    maps_s, maps_t = dsd_maps(40, (5, 4, 5)), dsd_maps(50, (5, 8, 5))
    from common.losses.at import attention_map
    a_s, a_t = [attention_map(m) for m in maps_s], [attention_map(m) for m in maps_t]
    terms = [(F.normalize(a_s[m] - a_s[n]) - F.normalize(a_t[m] - a_t[n])).pow(2).mean()
             for n, m in ((0, 1), (0, 2), (1, 2))]
    assert DSD()(*maps_s, *maps_t)[0].item() == pytest.approx(sum(terms).item() / 3, rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_dsd_mobile_student_psd_sends_the_logits_no_gradient(dtype):
    # §8.15, §3.7: without an aux head the maps are [logits, feat, logits], so the pair (0, 2) has r_S = 0. By hand:
    # the backward of norm(norm(r)) at r = 0 is ±g/eps² = ±g·1e24 into a_2 and a_0, which absorbs the O(g) gradients
    # of the pairs (0, 1) and (1, 2) there; the two equal and opposite paths then cancel exactly at the logits. So
    # the logits get exactly 0 and the embedding gets the gradient of the loss with the logits held constant.
    logits = randn(2, 5, 5, 7, seed=60, dtype=dtype).requires_grad_(True)
    feat = randn(2, 4, 5, 7, seed=61, dtype=dtype).requires_grad_(True)
    maps_t = [randn(2, c, 5, 7, seed=62 + i, dtype=dtype) for i, c in enumerate((5, 8, 5))]
    psd, _ = DSD()(logits, feat, logits, *maps_t)
    grad_logits, grad_feat = torch.autograd.grad(psd, [logits, feat])
    assert torch.equal(grad_logits, torch.zeros_like(logits))
    ref = ref_psd([logits, feat, logits], maps_t)
    assert torch.equal(torch.autograd.grad(ref, [logits])[0], grad_logits)
    held = logits.detach()
    expected = torch.autograd.grad(ref_psd([held, feat, held], maps_t), [feat])[0]
    torch.testing.assert_close(psd, ref, rtol=1e-12 if dtype == F64 else 1e-6, atol=0)
    torch.testing.assert_close(grad_feat, expected, rtol=1e-8 if dtype == F64 else 1e-4, atol=0)


# ---- CIRKD's versions of the PSP-lineage terms


def test_cirkd_structural_kd_is_pairwise_with_2x2_pool_and_l2_norm():
    s = randn(2, 4, 9, 11, seed=6).requires_grad_(True)
    t = randn(2, 8, 9, 11, seed=7)
    loss = PairWise(pool_size=2, normalize="l2", detach_teacher=True)
    assert_value_and_grad(loss(s, t), ref_structural_kd(s, t), [s])
    assert F.max_pool2d(s, 2, 2, 0, ceil_mode=True).shape[2:] == (5, 6)  # ⌈h/2⌉ × ⌈w/2⌉
    assert loss(t, t).item() == 0.0


def test_cirkd_cwd_adapter_and_divisor_from_the_student_before_the_adapter():
    torch.manual_seed(0)
    loss = ChannelWiseDivergence("channel", "kl", 4.0, s_channels=4, t_channels=8).double()
    s = randn(2, 4, 5, 6, seed=8).requires_grad_(True)
    t = randn(2, 8, 5, 6, seed=9)
    assert_value_and_grad(loss(s, t), ref_cwd(loss.conv, s, t), [s, loss.conv.weight])
    per_channel = ChannelWiseDivergence("channel", "kl", 4.0)(loss.conv(s), t)  # divided by n·C_t
    assert loss(s, t).item() == pytest.approx(2 * per_channel.item(), rel=1e-12)  # C_t / C_s = 2
    logits_s, logits_t = randn(2, 19, 5, 6, seed=10), randn(2, 19, 5, 6, seed=11)
    assert loss(logits_s, logits_t).item() == pytest.approx(ref_cwd(None, logits_s, logits_t).item(), rel=1e-12)
    assert loss.conv.bias is None


def test_cwd_without_adapter_refuses_different_channel_counts():
    with pytest.raises(ValueError, match="differ in channels"):
        ChannelWiseDivergence()(randn(2, 4, 3, 3), randn(2, 8, 3, 3))
    with pytest.raises(ValueError, match="both s_channels and t_channels"):
        ChannelWiseDivergence(s_channels=4)


def test_cirkd_ifvd_ignores_minus_one():
    s = randn(2, 4, 6, 6, seed=12).requires_grad_(True)
    t = randn(2, 8, 6, 6, seed=13)
    target = torch.randint(0, 3, (2, 24, 24), generator=torch.Generator().manual_seed(14))
    target[:, :6] = -1
    loss = IntraClassFeatureVariation(num_classes=3, ignore_index=-1)
    assert_value_and_grad(loss(s, t, target), ref_ifv(s, t, target, 3), [s])


def test_cirkd_task_loss_for_a_student_without_aux_head():
    logits = randn(2, 5, 4, 4, seed=15)
    target = torch.randint(-1, 5, (2, 16, 16), generator=torch.Generator().manual_seed(16))
    up = F.interpolate(logits, size=(16, 16), mode="bilinear", align_corners=True)
    expected = F.cross_entropy(up, target, ignore_index=-1)
    assert CriterionDSN(ignore_index=-1)((logits,), target.float()).item() == pytest.approx(expected.item(), rel=1e-12)


def test_cirkd_hinge_losses_with_the_discriminator_on_stride_8_logits():
    torch.manual_seed(0)
    disc = Discriminator(num_classes=19)
    with torch.no_grad():  # D ≡ 0
        disc.last[0].weight.zero_()
        disc.last[0].bias.zero_()
    d_s, d_t = disc(torch.randn(2, 19, 64, 128))[0], disc(torch.randn(2, 19, 64, 128))[0]
    assert d_s.shape == (2, 1, 1, 5)  # §3.7: a 64×128 map scores 1×5
    assert discriminator_loss(d_s, d_t, "hinge").item() == 2.0
    assert generator_loss(d_s, "hinge").item() == 0.0


def test_discriminator_input_norm_is_configurable():
    disc = Discriminator(num_classes=19, norm_layer=nn.SyncBatchNorm)
    assert type(disc.preprocess_additional) is nn.SyncBatchNorm
    assert list(disc.state_dict()) == list(Discriminator(num_classes=19).state_dict())


# ---- the precision rule, every loss


def _cwd_adapter():
    return ChannelWiseDivergence("channel", "kl", 4.0, s_channels=4, t_channels=8)


LOSSES = {  # name: (module or function, input shapes, extra integer label input)
    "PixelKL": (PixelKL, [(2, 5, 4, 4), (2, 5, 4, 4)]),
    "LogitKD": (lambda: LogitKD(2.0), [(2, 5, 4, 4), (2, 5, 4, 4)]),
    "PixelWise": (PixelWise, [(2, 5, 4, 4), (2, 5, 4, 4)]),
    "PairWise": (PairWise, [(2, 4, 6, 6), (2, 8, 6, 6)]),
    "PairWise-cirkd": (lambda: PairWise(pool_size=2, normalize="l2"), [(2, 4, 6, 6), (2, 8, 6, 6)]),
    "PairWiseCos": (PairWiseCos, [(2, 4, 6, 6), (2, 8, 6, 6)]),
    "PixelWiseKD": (lambda: PixelWiseKD(upsample=True), [(2, 5, 2, 2), (2, 5, 2, 2)]),
    "CWD": (ChannelWiseDivergence, [(2, 5, 4, 4), (2, 5, 4, 4)]),
    "CWD-adapter": (_cwd_adapter, [(2, 4, 4, 4), (2, 8, 4, 4)]),
    "AT": (AttentionTransfer, [(2, 4, 4, 4), (2, 8, 4, 4)]),
    "FitNet": (lambda: FitNet(4, 8), [(2, 4, 4, 4), (2, 8, 4, 4)]),
    "MiniBatch": (MiniBatchPixelRelation, [(2, 4, 4, 4), (2, 8, 4, 4)]),
    "DSD": (DSD, [(2, 5, 4, 4), (2, 4, 4, 4), (2, 5, 4, 4), (2, 5, 4, 4), (2, 8, 4, 4), (2, 5, 4, 4)]),
    "hinge-D": (lambda: lambda s, t: discriminator_loss(s, t, "hinge"), [(2, 1, 1, 5), (2, 1, 1, 5)]),
    "G": (lambda: lambda s: generator_loss(s, "hinge"), [(2, 1, 1, 5)]),
}
LABELLED = {
    "IFV": (lambda: IntraClassFeatureVariation(3, ignore_index=-1), [(2, 4, 4, 4), (2, 8, 4, 4)], (2, 8, 8)),
    "CriterionDSN": (CriterionDSN, [(2, 5, 4, 4), (2, 5, 4, 4)], (2, 8, 8)),
    "ConferenceCE": (ConferenceCrossEntropy, [(2, 5, 4, 4)], (2, 8, 8)),
}


def _call(name, dtype, through=None):
    """Run loss ``name`` on fixed inputs cast to ``dtype``; ``through`` first rounds the inputs to that type."""
    torch.manual_seed(0)
    if name in LOSSES:
        (build, shapes), label_shape = LOSSES[name], None
    else:
        build, shapes, label_shape = LABELLED[name]
    loss = build()
    if isinstance(loss, nn.Module):
        loss = loss.to(F64 if dtype == F64 else torch.float32)
    inputs = [randn(*shape, seed=i, dtype=torch.float32) for i, shape in enumerate(shapes)]
    inputs = [(x if through is None else x.to(through)).to(dtype) for x in inputs]
    if label_shape is None:
        out = loss(*inputs)
    else:
        labels = torch.randint(0, 3, label_shape, generator=torch.Generator().manual_seed(9))
        out = loss(inputs, labels) if name == "CriterionDSN" else loss(*inputs, labels)
    return out if isinstance(out, tuple) else (out,)


ALL = sorted(LOSSES) + sorted(LABELLED)


@pytest.mark.parametrize("name", ALL)
def test_float64_inputs_are_computed_in_float64(name):
    assert all(v.dim() == 0 and v.dtype == F64 for v in _call(name, F64))


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_are_computed_in_float32(name, dtype):
    halves = _call(name, dtype)
    upcast = _call(name, torch.float32, through=dtype)  # float32 on the same rounded inputs
    for a, b in zip(halves, upcast):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_pairwise_similarity_in_float64_is_not_rounded_to_float32():
    s, t = randn(2, 4, 6, 6, seed=21), randn(2, 8, 6, 6, seed=22)
    pooled_s, pooled_t = F.max_pool2d(s, 3, 3, 0, ceil_mode=True), F.max_pool2d(t, 3, 3, 0, ceil_mode=True)

    def sim(f):
        f = f / (f.pow(2).sum(1, keepdim=True).sqrt() + 1e-8)
        f = f.flatten(2)
        return f.transpose(1, 2) @ f

    expected = ((sim(pooled_t) - sim(pooled_s)) ** 2).sum() / 16 / 2
    assert abs(PairWise()(s, t).item() - expected.item()) < 1e-15


@pytest.mark.parametrize("name", [n for n in ALL if n not in ("FitNet", "CWD-adapter")])  # adapters are layers
def test_autocast_does_not_lower_the_loss_precision(name):
    plain = _call(name, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = _call(name, torch.float32)
    for a, b in zip(mixed, plain):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)

"""CWD, pixel-KD and task losses against specs/cwd.md §5 and the §13 invariants (exact values)."""
import math

import pytest
import torch
import torch.nn.functional as F

from common.losses.cwd import ChannelWiseDivergence, FeatureAdapter
from common.losses.kd import LogitKD, PixelKL
from common.losses.segmentation import CriterionDSN


def cwd(s, t, norm="channel", div="kl", tau=1.0):
    return ChannelWiseDivergence(norm, div, tau)(s, t)


def deterministic_pair():
    """§13.4: T[n,c,h,w] = (n+1)(c+1)k/2, S = (c-1)k/3 + n with k = 2h + w (float64)."""
    k = torch.arange(4, dtype=torch.float64).view(1, 1, 2, 2)
    n = torch.arange(2, dtype=torch.float64).view(2, 1, 1, 1)
    c = torch.arange(3, dtype=torch.float64).view(1, 3, 1, 1)
    return (c - 1) * k / 3 + n, (n + 1) * (c + 1) * k / 2


def original_cwd(s, t, norm, div, tau):
    """A literal port of the original ``CriterionCWD`` (log of softmax, KLDivLoss/MSELoss sum)."""
    tau = tau if div == "kl" else 1.0
    n, c, h, w = s.shape
    if norm == "channel":
        ns, nt = F.softmax(s.reshape(n, c, -1) / tau, -1), F.softmax(t.reshape(n, c, -1) / tau, -1)
    elif norm == "spatial":
        ns, nt = F.softmax(s / tau, 1), F.softmax(t / tau, 1)
    elif norm == "channel_mean":
        ns, nt = s.reshape(n, c, -1).mean(-1) / tau, t.reshape(n, c, -1).mean(-1) / tau
    else:
        ns, nt = s[0] / tau, t[0] / tau
    if div == "kl":
        loss = F.kl_div(ns.log(), nt, reduction="sum")
    else:
        loss = F.mse_loss(ns, nt, reduction="sum")
    denom = n * c if norm in ("channel", "channel_mean") else n * h * w
    return loss * tau ** 2 / denom


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_zero_at_equality(tau):
    x = torch.randn(2, 19, 9, 9)
    assert abs(cwd(x, x.clone(), tau=tau).item()) < 1e-6


def test_non_negative():
    torch.manual_seed(0)
    for _ in range(5):
        s, t = torch.randn(2, 5, 6, 6) * 3, torch.randn(2, 5, 6, 6) * 3
        assert cwd(s, t, "channel").item() >= 0
        assert cwd(s, t, "spatial").item() >= 0


def test_known_value_two_positions():
    s = torch.zeros(1, 1, 1, 2, dtype=torch.float64)
    t = torch.tensor([0.0, math.log(3)], dtype=torch.float64).view(1, 1, 1, 2)
    assert cwd(s, t, tau=1.0).item() == pytest.approx(0.1308120359, abs=1e-10)
    assert cwd(s, 2 * t, tau=2.0).item() == pytest.approx(0.5232481438, abs=1e-10)


@pytest.mark.parametrize("norm,div,tau,expected", [
    ("channel", "kl", 1.0, 0.6262118885),
    ("channel", "kl", 4.0, 1.4511771298),
    ("spatial", "kl", 1.0, 0.0838389636),
    ("spatial", "kl", 4.0, 0.2432030811),
    ("channel", "mse", 4.0, 0.3317110475),
    ("channel_mean", "mse", 1.0, 3.4791666667),
])
def test_known_values_deterministic_tensor(norm, div, tau, expected):
    s, t = deterministic_pair()
    assert cwd(s, t, norm, div, tau).item() == pytest.approx(expected, abs=1e-9)


def test_pixel_kd_known_value():
    s, t = deterministic_pair()
    assert PixelKL()(s, t).item() == pytest.approx(0.0279463212, abs=1e-9)


def test_pixel_kd_temperature_divides_both_logits_and_adds_no_t_squared():
    # τ = 2: p_T = softmax([0, 2 ln 3] / 2) = (1/4, 3/4), p_S = (1/2, 1/2); KL summed over classes, then / C = 2
    s = torch.zeros(1, 2, 1, 1, dtype=torch.float64)
    t = torch.tensor([0.0, 2 * math.log(3)], dtype=torch.float64).view(1, 2, 1, 1)
    expected = (0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)) / 2  # 0.0654060180
    assert PixelKL(temperature=2.0)(s, t).item() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("norm,div", [("channel", "kl"), ("spatial", "kl"), ("channel", "mse"),
                                      ("spatial", "mse"), ("channel_mean", "mse"), ("none", "mse")])
def test_equal_to_literal_port_of_original(norm, div):
    torch.manual_seed(1)
    s, t = torch.randn(2, 19, 9, 9, dtype=torch.float64), torch.randn(2, 19, 9, 9, dtype=torch.float64)
    assert cwd(s, t, norm, div, 4.0).item() == pytest.approx(original_cwd(s, t, norm, div, 4.0).item(), rel=1e-10)


def test_temperature_scaling_identity():
    torch.manual_seed(2)
    s, t = torch.randn(2, 4, 5, 5, dtype=torch.float64), torch.randn(2, 4, 5, 5, dtype=torch.float64)
    assert cwd(3 * s, 3 * t, tau=3 * 2.0).item() == pytest.approx(9 * cwd(s, t, tau=2.0).item(), rel=1e-10)


def test_shift_invariance_channel_norm():
    torch.manual_seed(3)
    s, t = torch.randn(2, 4, 5, 5, dtype=torch.float64), torch.randn(2, 4, 5, 5, dtype=torch.float64)
    base = cwd(s, t, tau=4.0).item()
    shift_s, shift_t = torch.randn(2, 4, 1, 1, dtype=torch.float64) * 10, torch.randn(2, 4, 1, 1, dtype=torch.float64)
    assert cwd(s + shift_s, t + shift_t, tau=4.0).item() == pytest.approx(base, rel=1e-10)


def test_batch_and_channel_averaging():
    torch.manual_seed(4)
    s, t = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 3, 4, 4, dtype=torch.float64)
    tau = 4.0
    base = cwd(s, t, tau=tau).item()
    assert cwd(torch.cat([s, s]), torch.cat([t, t]), tau=tau).item() == pytest.approx(base, rel=1e-12)
    ps, pt = F.softmax(s.flatten(2) / tau, -1), F.softmax(t.flatten(2) / tau, -1)
    per_channel_kl = (pt * (pt.log() - ps.log())).sum(-1)
    assert base == pytest.approx(tau ** 2 * per_channel_kl.mean().item(), rel=1e-12)


def test_degenerate_spatial_size_is_zero():
    s, t = torch.randn(2, 19, 1, 1), torch.randn(2, 19, 1, 1)
    assert cwd(s, t, tau=4.0).item() == 0.0


def test_gradient_closed_form_and_zero_sum():
    torch.manual_seed(5)
    n, c, tau = 2, 3, 4.0
    s = torch.randn(n, c, 4, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(n, c, 4, 4, dtype=torch.float64)
    cwd(s, t, tau=tau).backward()
    expected = tau / (n * c) * (F.softmax(s.detach().flatten(2) / tau, -1) - F.softmax(t.flatten(2) / tau, -1))
    assert torch.allclose(s.grad.flatten(2), expected, atol=1e-15)
    assert s.grad.flatten(2).sum(-1).abs().max().item() < 1e-15


@pytest.mark.parametrize("loss", [ChannelWiseDivergence("channel", "kl", 4.0),
                                  ChannelWiseDivergence("spatial", "kl", 4.0),
                                  ChannelWiseDivergence("channel", "mse"), PixelKL(), LogitKD(2.0)])
def test_gradient_only_to_student(loss):
    s = torch.randn(2, 5, 4, 4, requires_grad=True)
    t = torch.randn(2, 5, 4, 4, requires_grad=True)
    loss(s, t).backward()
    assert t.grad is None
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_equivalences_mmrazor_and_mmseg_distiller():
    torch.manual_seed(6)
    n, c, tau = 2, 19, 4.0
    s, t = torch.randn(n, c, 9, 9, dtype=torch.float64), torch.randn(n, c, 9, 9, dtype=torch.float64)
    ls, lt = F.log_softmax(s.flatten(2) / tau, -1), F.log_softmax(t.flatten(2) / tau, -1)
    mmrazor = tau ** 2 * (lt.exp() * lt - lt.exp() * ls).sum() / (n * c)
    ours = cwd(s, t, tau=tau)
    assert ours.item() == pytest.approx(mmrazor.item(), rel=1e-12)
    entropy = -(lt.exp() * lt).sum()
    mmseg = tau ** 2 * -(lt.exp() * ls).sum() / (n * c)
    assert mmseg.item() == pytest.approx(ours.item() + tau ** 2 / (n * c) * entropy.item(), rel=1e-12)


def test_spatial_norm_is_classic_kd():
    torch.manual_seed(7)
    n, h, w, tau = 2, 5, 5, 4.0
    s, t = torch.randn(n, 6, h, w, dtype=torch.float64), torch.randn(n, 6, h, w, dtype=torch.float64)
    kd = tau ** 2 * F.kl_div(F.log_softmax(s / tau, 1), F.softmax(t / tau, 1), reduction="sum") / (n * h * w)
    assert cwd(s, t, "spatial", tau=tau).item() == pytest.approx(kd.item(), rel=1e-12)


@pytest.mark.parametrize("scale", [500.0, 1e4, 1e30])
def test_nan_free_at_extreme_logits(scale):
    s = torch.zeros(2, 19, 9, 9)
    t = torch.zeros(2, 19, 9, 9)
    s[:, :, 0, 0] = -scale
    t[:, :, 0, 0] = -scale
    assert torch.isnan(original_cwd(s, t, "channel", "kl", 1.0)).item()  # the literal port: 0 * log 0
    for loss in (ChannelWiseDivergence("channel", "kl", 1.0), ChannelWiseDivergence("spatial", "kl", 4.0),
                 ChannelWiseDivergence("channel", "mse"), PixelKL(), LogitKD()):
        value = loss(s, t)
        assert torch.isfinite(value).item() and abs(value.item()) < 1e-6
    s.requires_grad_(True)
    t2 = torch.randn(2, 19, 9, 9) * scale
    value = ChannelWiseDivergence("channel", "kl", 4.0)(s, t2)
    value.backward()
    assert torch.isfinite(value).item() and torch.isfinite(s.grad).all().item()


def test_half_inputs_compute_in_fp32():
    s, t = torch.randn(2, 4, 6, 6).to(torch.bfloat16), torch.randn(2, 4, 6, 6).to(torch.bfloat16)
    value = cwd(s, t, tau=4.0)
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(cwd(s.float(), t.float(), tau=4.0).item(), rel=1e-6)


def test_mse_ignores_temperature_and_none_uses_first_sample():
    torch.manual_seed(8)
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    assert cwd(s, t, "channel", "mse", 7.0).item() == pytest.approx(cwd(s, t, "channel", "mse", 1.0).item())
    s2 = s.clone()
    s2[1] += 100.0
    assert cwd(s2, t, "none", "mse").item() == pytest.approx(cwd(s, t, "none", "mse").item())
    assert cwd(s, t, "none", "mse").item() == pytest.approx(((s[0] - t[0]) ** 2).sum().item() / (2 * 4 * 4), rel=1e-6)


@pytest.mark.parametrize("norm,div,match", [("chanel", "kl", "unknown CWD norm type"),
                                            ("channel", "js", "unknown CWD divergence"),
                                            ("none", "kl", "gives NaN"), ("channel_mean", "kl", "gives NaN")])
def test_bad_configurations_are_user_errors(norm, div, match):
    with pytest.raises(ValueError, match=match):
        ChannelWiseDivergence(norm, div, 4.0)


def test_feature_adapter_shape_and_non_negative():
    adapter = FeatureAdapter(128, 512, norm="bn")
    out = adapter(torch.randn(2, 128, 65, 65))
    assert out.shape == (2, 512, 65, 65)
    assert out.min().item() >= 0
    assert adapter[0].bias is None and sum(p.numel() for p in adapter.parameters()) == 128 * 512 + 2 * 512


def test_logit_kd_formula():
    torch.manual_seed(9)
    s, t, tau = torch.randn(2, 5, 3, 3, dtype=torch.float64), torch.randn(2, 5, 3, 3, dtype=torch.float64), 2.0
    ps, pt = F.softmax(s / tau, 1), F.softmax(t / tau, 1)
    per_pixel = (pt * (pt.log() - ps.log())).sum(1)
    assert LogitKD(tau)(s, t).item() == pytest.approx(tau ** 2 * per_pixel.mean().item(), rel=1e-12)
    assert PixelKL()(s, t).item() == pytest.approx(
        (F.softmax(t, 1) * (F.log_softmax(t, 1) - F.log_softmax(s, 1))).sum(1).mean().item() / 5, rel=1e-12)


def test_criterion_dsn_upsamples_and_ignores():
    torch.manual_seed(10)
    logits, aux = torch.randn(2, 19, 9, 9), torch.randn(2, 19, 9, 9)
    target = torch.randint(0, 19, (2, 65, 65))
    target[:, :10] = 255
    up = lambda x: F.interpolate(x, size=(65, 65), mode="bilinear", align_corners=True)  # noqa: E731
    expected = F.cross_entropy(up(logits), target, ignore_index=255) + 0.4 * F.cross_entropy(
        up(aux), target, ignore_index=255)
    value = CriterionDSN()([logits, aux, torch.randn(2, 128, 9, 9)], target.float())
    assert value.item() == pytest.approx(expected.item(), rel=1e-6)
    assert CriterionDSN(aux_weight=0.0)((logits, aux), target).item() == pytest.approx(
        F.cross_entropy(up(logits), target, ignore_index=255).item(), rel=1e-6)

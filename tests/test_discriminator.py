"""SAGAN discriminator and its custom SpectralNorm against specs/ifvd_skd.md §C.3."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from common.models import Discriminator
from common.models.discriminator import SelfAttn
from common.models.spectral import SpectralNorm, l2normalize


@pytest.fixture
def disc():
    torch.manual_seed(0)
    return Discriminator()


def test_parameter_counts(disc):
    assert sum(p.numel() for p in disc.parameters()) == 3_200_153
    assert sum(p.numel() for p in disc.parameters() if p.requires_grad) == 3_191_721


def test_state_dict_keys_are_the_original(disc):
    expected = [f"preprocess_additional.{k}" for k in
                ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]
    for i in range(1, 5):
        expected += [f"l{i}.0.module.{k}" for k in ("bias", "weight_u", "weight_v", "weight_bar")]
    expected += ["last.0.weight", "last.0.bias"]
    for a in ("attn1", "attn2"):
        expected += [f"{a}.{c}.{k}" for c in ("query_conv", "key_conv", "value_conv") for k in ("weight", "bias")]
        expected.append(f"{a}.gamma")
    sd = disc.state_dict()
    assert sorted(sd) == sorted(expected)
    assert list(sd)[:4] == ["l4.0.module.bias", "l4.0.module.weight_u", "l4.0.module.weight_v",
                            "l4.0.module.weight_bar"]
    assert sd["l1.0.module.weight_bar"].shape == (64, 19, 4, 4)
    assert sd["l1.0.module.weight_v"].shape == (19 * 16,) and sd["l1.0.module.weight_u"].shape == (64,)
    assert sd["last.0.weight"].shape == (1, 512, 4, 4)
    assert not disc.l1[0].module.weight_u.requires_grad and not disc.l1[0].module.weight_v.requires_grad
    torch.testing.assert_close(disc.l2[0].module.weight_u.norm(), torch.tensor(1.0))


def test_output_shapes(disc):
    out = disc(torch.randn(2, 19, 65, 65))
    assert [tuple(o.shape) for o in out] == [(2, 1, 1, 1), (2, 64, 64), (2, 16, 16)]
    out = disc(torch.randn(2, 19, 129, 257))
    assert [tuple(o.shape) for o in out] == [(2, 1, 5, 13), (2, 512, 512), (2, 128, 128)]


def test_spectral_norm_power_iteration_every_call_in_train_and_eval():
    torch.manual_seed(0)
    sn = SpectralNorm(nn.Conv2d(5, 6, 3, padding=1))
    conv = sn.module
    x = torch.randn(2, 5, 7, 7)
    for mode in (True, False):
        sn.train(mode)
        u0 = conv.weight_u.detach().clone()
        w = conv.weight_bar.detach().view(6, -1)
        v = l2normalize(w.t() @ u0)
        u = l2normalize(w @ v)
        y = sn(x)
        torch.testing.assert_close(conv.weight_v.detach(), v)
        torch.testing.assert_close(conv.weight_u.detach(), u)
        assert not torch.allclose(u, u0)
        expected = nn.functional.conv2d(x, conv.weight_bar / (u @ w @ v), conv.bias, padding=1)
        torch.testing.assert_close(y, expected)
    assert "weight" not in dict(conv.named_parameters())


def test_spectral_norm_converges_to_unit_norm_and_grads_reach_weight_bar_only():
    torch.manual_seed(0)
    sn = SpectralNorm(nn.Conv2d(4, 8, 3))
    for _ in range(200):
        w = sn.normalized_weight()
    torch.testing.assert_close(torch.linalg.matrix_norm(w.detach().view(8, -1), ord=2), torch.tensor(1.0),
                               atol=1e-4, rtol=0)
    sn(torch.randn(1, 4, 5, 5)).sum().backward()
    conv = sn.module
    assert conv.weight_bar.grad is not None and conv.weight_bar.grad.abs().sum() > 0
    assert conv.weight_u.grad is None and conv.weight_v.grad is None


def test_self_attention_starts_as_identity_and_is_a_softmax():
    torch.manual_seed(0)
    attn = SelfAttn(16)
    x = torch.randn(2, 16, 3, 4)
    y, a = attn(x)
    assert torch.equal(y, x)
    assert a.shape == (2, 12, 12)
    torch.testing.assert_close(a.sum(-1), torch.ones(2, 12))
    q = attn.query_conv(x).flatten(2)
    k = attn.key_conv(x).flatten(2)
    torch.testing.assert_close(a, torch.softmax(q.transpose(1, 2) @ k, -1))
    with torch.no_grad():
        attn.gamma.fill_(0.5)
    v = attn.value_conv(x).flatten(2)
    torch.testing.assert_close(attn(x)[0], 0.5 * (v @ a.transpose(1, 2)).view_as(x) + x)


def test_input_batchnorm_uses_each_batch_statistics(disc):
    x = torch.randn(3, 19, 65, 65)
    state = copy.deepcopy(disc.state_dict())
    a = disc(x)[0]
    disc.load_state_dict(state)
    b = disc(x * 2.0 + 3.0)[0]
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    disc.load_state_dict(state)
    assert not torch.allclose(a, disc(x + torch.randn_like(x))[0])


def test_gradient_penalty_pattern_runs_through_repeated_calls(disc):
    t, s = torch.randn(2, 19, 65, 65), torch.randn(2, 19, 65, 65)
    loss = -disc(t)[0].mean() + disc(s)[0].mean()
    alpha = torch.rand(2, 1, 1, 1)
    x_hat = (alpha * t + (1 - alpha) * s).requires_grad_(True)
    out = disc(x_hat)[0]
    grad = torch.autograd.grad(out, x_hat, torch.ones_like(out), create_graph=True, retain_graph=True)[0]
    gp = ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()
    (loss + gp).backward()
    grads = [p.grad for p in disc.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(p.grad is None for p in disc.parameters() if not p.requires_grad)


def test_preprocess_modes_and_bad_arguments():
    x = torch.randn(1, 19, 65, 65) * 300
    assert isinstance(Discriminator(preprocess_mode=2).preprocess_additional, nn.Tanh)
    torch.testing.assert_close(Discriminator(preprocess_mode=3).preprocess_additional(x), 2 * (x / 255 - 0.5))
    with pytest.raises(ValueError, match="preprocess_mode"):
        Discriminator(preprocess_mode=4)
    with pytest.raises(ValueError, match="image_size must be 65"):
        Discriminator(image_size=64)


def test_backward_after_further_calls_uses_the_latest_u_v_like_the_original():
    torch.manual_seed(0)
    sn = SpectralNorm(nn.Conv2d(3, 4, 3))
    state = copy.deepcopy(sn.state_dict())
    x = torch.randn(1, 3, 5, 5)
    sn(x).sum().backward()
    alone = sn.module.weight_bar.grad.clone()
    sn.load_state_dict(state)
    sn.zero_grad()
    y = sn(x)
    sn.normalized_weight()
    y.sum().backward()
    later = sn.module.weight_bar.grad
    assert torch.isfinite(later).all() and not torch.allclose(alone, later)


# ---------------------------------------------------------------- §C.3 from the spec's literals
SN_LAYERS = [("l1", 19, 64), ("l2", 64, 128), ("l3", 128, 256), ("l4", 256, 512)]  # §C.3 items 2-6
D_SLOPE = 0.1  # §C.3: LeakyReLU(0.1) after every spectral-norm conv


def test_layers_are_the_spec_literals(disc):
    for name, cin, cout in SN_LAYERS:
        conv, act = getattr(disc, name)[0].module, getattr(disc, name)[1]
        assert (conv.in_channels, conv.out_channels) == (cin, cout), name
        assert (conv.kernel_size, conv.stride, conv.padding) == ((4, 4), (2, 2), (1, 1)), name
        assert conv.bias is not None and isinstance(act, nn.LeakyReLU) and act.negative_slope == D_SLOPE, name
    last = disc.last[0]
    assert type(last) is nn.Conv2d and (last.in_channels, last.out_channels) == (512, 1)
    assert (last.kernel_size, last.stride, last.padding) == ((4, 4), (1, 1), (0, 0)) and last.bias is not None
    bn = disc.preprocess_additional
    assert type(bn) is nn.BatchNorm2d and bn.num_features == 19 and bn.affine
    assert (bn.eps, bn.momentum) == (1e-5, 0.1)
    for attn, c in ((disc.attn1, 256), (disc.attn2, 512)):  # Self_Attn(C): q, k C→C/8, v C→C, gamma 0
        assert [(m.in_channels, m.out_channels, m.kernel_size) for m in
                (attn.query_conv, attn.key_conv, attn.value_conv)] == [(c, c // 8, (1, 1))] * 2 + [(c, c, (1, 1))]
        assert attn.gamma.shape == (1,) and attn.gamma.item() == 0.0


def ref_spectral_conv(x, sd, prefix):
    """§C.3 SpectralNorm: one power iteration from the stored u (v ← n(Wᵀu), u ← n(Wv), n(x) = x/(‖x‖+1e-12)),
    σ = u·Wv, then conv(k4, s2, p1) with W/σ and the bias."""
    w = sd[f"{prefix}.weight_bar"]
    mat = w.view(w.shape[0], -1)
    v = mat.t() @ sd[f"{prefix}.weight_u"]
    v = v / (v.norm() + 1e-12)
    u = mat @ v
    u = u / (u.norm() + 1e-12)
    return F.conv2d(x, w / (u @ mat @ v), sd[f"{prefix}.bias"], stride=2, padding=1)


def ref_self_attn(x, sd, prefix):
    """§C.3 Self_Attn: energy = qᵀk (no 1/√d), A = softmax over the last axis, out_i = Σ_j A_ij v_j, γ·out + x."""
    b, c, h, w = x.shape
    q = F.conv2d(x, sd[f"{prefix}.query_conv.weight"], sd[f"{prefix}.query_conv.bias"]).view(b, -1, h * w)
    k = F.conv2d(x, sd[f"{prefix}.key_conv.weight"], sd[f"{prefix}.key_conv.bias"]).view(b, -1, h * w)
    v = F.conv2d(x, sd[f"{prefix}.value_conv.weight"], sd[f"{prefix}.value_conv.bias"]).view(b, c, h * w)
    attention = torch.softmax(torch.einsum("bci,bcj->bij", q, k), dim=-1)
    out = torch.einsum("bij,bcj->bci", attention, v).view(b, c, h, w)
    return sd[f"{prefix}.gamma"] * out + x, attention


def ref_discriminator(x, sd):
    """§C.3 items 1-9: training-mode BatchNorm of the input batch, l1..l3, attn1, l4, attn2, last."""
    out = F.batch_norm(x, None, None, sd["preprocess_additional.weight"], sd["preprocess_additional.bias"],
                       True, 0.1, 1e-5)
    for name, _, _ in SN_LAYERS[:3]:
        out = F.leaky_relu(ref_spectral_conv(out, sd, f"{name}.0.module"), D_SLOPE)
    out, p1 = ref_self_attn(out, sd, "attn1")
    out = F.leaky_relu(ref_spectral_conv(out, sd, "l4.0.module"), D_SLOPE)
    out, p2 = ref_self_attn(out, sd, "attn2")
    return [F.conv2d(out, sd["last.0.weight"], sd["last.0.bias"]), p1, p2]


def test_forward_equals_the_functional_reference(disc):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        disc.attn1.gamma.fill_(0.7)  # non-zero, so the attention output reaches the score
        disc.attn2.gamma.fill_(-1.3)
        disc.preprocess_additional.weight.copy_(torch.rand(19, generator=g) + 0.5)
        disc.preprocess_additional.bias.copy_(torch.rand(19, generator=g) - 0.5)
    disc.double()
    sd = {k: v.clone() for k, v in disc.state_dict().items()}
    x = torch.randn(2, 19, 65, 65, dtype=torch.float64, generator=g) * 3
    with torch.no_grad():
        got = disc(x)
        expected = ref_discriminator(x, sd)
    assert [tuple(o.shape) for o in expected] == [(2, 1, 1, 1), (2, 64, 64), (2, 16, 16)]
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def _original_sn_conv(in_dim, out_dim, kernel, stride=1, padding=0):
    """``SpectralNorm(nn.Conv2d(...))._make_params`` of ``networks/spectral.py``: conv init, then u, then v."""
    conv = nn.Conv2d(in_dim, out_dim, kernel, stride, padding)
    w = conv.weight.data
    u = w.new(w.shape[0]).normal_(0, 1)
    v = w.new(w.view(w.shape[0], -1).shape[1]).normal_(0, 1)
    return {"bias": conv.bias.data, "weight_u": u / (u.norm() + 1e-12), "weight_v": v / (v.norm() + 1e-12),
            "weight_bar": w}


def _original_self_attn(in_dim):
    convs = [nn.Conv2d(in_dim, in_dim // 8, 1), nn.Conv2d(in_dim, in_dim // 8, 1), nn.Conv2d(in_dim, in_dim, 1)]
    state = {f"{name}.{k}": getattr(c, k).data for name, c in zip(("query_conv", "key_conv", "value_conv"), convs)
             for k in ("weight", "bias")}
    return {**state, "gamma": torch.zeros(1)}


def test_seeded_initial_weights_follow_the_original_creation_order():
    # sagan_models.Discriminator.__init__ creates l1, l2, l3, (l4 if image_size == 65), last, attn1, attn2, BN
    torch.manual_seed(123)
    expected = {}
    for i, (cin, cout) in enumerate(((19, 64), (64, 128), (128, 256), (256, 512)), start=1):
        expected.update({f"l{i}.0.module.{k}": v for k, v in _original_sn_conv(cin, cout, 4, 2, 1).items()})
    last = nn.Conv2d(512, 1, 4)
    expected.update({"last.0.weight": last.weight.data, "last.0.bias": last.bias.data})
    for name, dim in (("attn1", 256), ("attn2", 512)):
        expected.update({f"{name}.{k}": v for k, v in _original_self_attn(dim).items()})
    after_original = torch.randn(3)
    torch.manual_seed(123)
    sd = Discriminator().state_dict()
    for key, value in expected.items():
        assert torch.equal(sd[key], value), key
    assert torch.equal(torch.randn(3), after_original)  # the same number of draws

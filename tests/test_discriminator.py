"""SAGAN discriminator and its custom SpectralNorm against specs/ifvd_skd.md §C.3."""
import copy

import pytest
import torch
import torch.nn as nn

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

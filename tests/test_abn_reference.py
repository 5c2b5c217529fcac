"""Pure-PyTorch ABN (specs/inplace_abn.md §1, §3.2, §5.2) and the extension loader's failure modes.
These tests need no compiled extension."""
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common.abn as abn
from common.abn import ABN, _backend, _paths, norm_layer
from common.errors import UserError


def _bn_reference(weight, bias, eps, act, param):
    bn = nn.BatchNorm2d(weight.numel(), eps=eps).double()
    with torch.no_grad():
        bn.weight.copy_(weight.abs() + eps)
        bn.bias.copy_(bias)
    acts = {"leaky_relu": lambda t: F.leaky_relu(t, param), "elu": lambda t: F.elu(t, param),
            "identity": lambda t: t}
    return bn, acts[act]


@pytest.mark.parametrize("act,param", [("leaky_relu", 0.01), ("elu", 1.0), ("identity", 0.01)])
def test_abn_equals_batchnorm_with_abs_weight(act, param):
    torch.manual_seed(0)
    mod = ABN(5, activation=act, activation_param=param).double()
    with torch.no_grad():
        mod.weight.copy_(torch.tensor([1.5, -0.5, 0.0, 2.0, -3.0]))
        mod.bias.normal_()
    bn, phi = _bn_reference(mod.weight.detach(), mod.bias.detach(), mod.eps, act, param)
    for step in range(3):
        training = step < 2
        mod.train(training), bn.train(training)
        x = torch.randn(4, 5, 3, 3, dtype=torch.float64)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = mod(xa), phi(bn(xb))
        torch.testing.assert_close(ya, yb)
        g = torch.randn_like(ya)
        ya.backward(g), yb.backward(g)
        torch.testing.assert_close(xa.grad, xb.grad)
        torch.testing.assert_close(mod.bias.grad, bn.bias.grad)
        sign = torch.sign(mod.weight.detach())
        torch.testing.assert_close(mod.weight.grad, sign * bn.weight.grad)
        torch.testing.assert_close(mod.running_mean, bn.running_mean)
        torch.testing.assert_close(mod.running_var, bn.running_var)
        mod.zero_grad(), bn.zero_grad()


def test_momentum_none_is_cumulative_average():
    torch.manual_seed(1)
    mod, bn = ABN(3, momentum=None).double(), nn.BatchNorm2d(3, momentum=None).double()
    for _ in range(3):
        x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
        mod(x.clone()), bn(x.clone())
    torch.testing.assert_close(mod.running_mean, bn.running_mean)
    torch.testing.assert_close(mod.running_var, bn.running_var)
    assert int(mod.num_batches_tracked) == 3


def test_state_dict_keys_and_old_checkpoints_load_strictly():
    mod = ABN(4)
    assert sorted(mod.state_dict()) == ["bias", "running_mean", "running_var", "weight"]
    old = {"weight": torch.full((4,), 2.0), "bias": torch.ones(4), "running_mean": torch.ones(4),
           "running_var": torch.full((4,), 3.0)}
    mod.load_state_dict(old, strict=True)
    assert torch.equal(mod.running_var, old["running_var"])
    modern = dict(old, num_batches_tracked=torch.tensor(7))
    mod.load_state_dict(modern, strict=True)
    assert int(mod.num_batches_tracked) == 7


def test_training_with_one_value_per_channel_raises():
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        ABN(3)(torch.randn(1, 3))


@pytest.mark.parametrize("kwargs,message", [
    ({"activation": "tanh"}, "unknown activation 'tanh'"),
    ({"activation": "leaky_relu", "activation_param": 0.0}, "must be > 0"),
    ({"eps": 0.0}, "eps must be > 0"),
    ({"momentum": 1.5}, "momentum must be in"),
])
def test_bad_configuration_is_one_clear_error(kwargs, message):
    with pytest.raises(UserError, match=message):
        ABN(4, **kwargs)
    with pytest.raises(ValueError, match=message):
        ABN(4, **kwargs)


def test_norm_layer_choices():
    assert norm_layer("bn") is ABN
    assert norm_layer("auto") is (abn.InPlaceABNSync if abn.extension_available() else ABN)
    with pytest.raises(UserError, match="unknown norm 'gn'"):
        norm_layer("gn")


def test_missing_extension_says_run_make_build_abn(monkeypatch):
    monkeypatch.setattr(_backend, "load", lambda: (None, "nothing built"))
    assert not abn.extension_available()
    assert norm_layer("auto") is ABN
    with pytest.raises(UserError, match="run `make build-abn`"):
        norm_layer("inplace_abn")
    with pytest.raises(UserError, match="run `make build-abn`"):
        abn.InPlaceABN(4)
    with pytest.raises(UserError, match="run `make build-abn`"):
        abn.inplace_abn(torch.randn(4, 3), None, None, None, None)


def test_stale_build_counts_as_absent(monkeypatch, tmp_path):
    lib = tmp_path / "_C_cpu.so"
    lib.write_bytes(b"not a library")
    stamp = tmp_path / "stamp.json"
    stamp.write_text(json.dumps({"torch": "1.0.0", "python": "3.6"}))
    monkeypatch.setattr(_paths, "library_path", lambda name: lib)
    monkeypatch.setattr(_paths, "stamp_path", lambda name: stamp)
    module, reason = _backend._import("_C_cpu")
    assert module is None and "built for torch 1.0.0" in reason
    stamp.write_text(json.dumps({**_paths.runtime_key(), "sources": "old"}))
    module, reason = _backend._import("_C_cpu")
    assert module is None and ("older than the sources" in reason or "cannot be loaded" in reason)

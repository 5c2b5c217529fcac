"""The seeds' old InPlace-ABN API (specs/inplace_abn.md §2.2-2.3, §5.2, §6.9). Needs `make build-abn`."""
import functools
import warnings

import pytest
import torch
import torch.nn as nn

from common.abn import ABN, extension_available, legacy


@pytest.fixture(autouse=True)
def _require_extension():
    if not extension_available():
        pytest.fail("the InPlace-ABN extension is not built: run `make build-abn` before these tests")


def test_seed_construction_patterns_map_to_modern_layers():
    batchnorm2d = functools.partial(legacy.InPlaceABNSync, activation="none")
    bn = batchnorm2d(8, affine=True)
    assert bn.activation == "identity"
    with pytest.warns(UserWarning, match="devices"):
        positional = legacy.InPlaceABNSync(8, [0, 1], 1e-5, 0.1, True, "leaky_relu", 0.2)
    assert (positional.activation, positional.activation_param) == ("leaky_relu", 0.2)
    assert legacy.InPlaceABN(8, activation="elu").activation_param == 1.0
    wrapped = legacy.InPlaceABNWrapper(8)
    assert sorted(wrapped.state_dict()) == ["bn.bias", "bn.running_mean", "bn.running_var", "bn.weight"]
    old = legacy.ABN(8)
    assert isinstance(old.bn, nn.BatchNorm2d) and isinstance(old.act, nn.ReLU)
    with pytest.raises(ValueError, match="unknown activation 'relu'"):
        legacy.InPlaceABN(8, activation="relu")


def test_old_checkpoint_loads_strictly_and_matches_reference():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False),
                        functools.partial(legacy.InPlaceABNSync, activation="none")(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 1, bias=False), legacy.InPlaceABNSync(8))
    ref = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), ABN(8, activation="identity"), nn.ReLU(),
                        nn.Conv2d(8, 8, 1, bias=False), ABN(8))
    old = {k: v.clone() for k, v in ref.state_dict().items()}
    old["1.weight"] = torch.linspace(-1, 1, 8)
    old["4.running_var"] = torch.rand(8) + 0.5
    assert not any(k.endswith("num_batches_tracked") for k in old)
    net.load_state_dict(old, strict=True)
    ref.load_state_dict(old, strict=True)
    x = torch.randn(2, 3, 6, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for mode in (True, False):
            net.train(mode), ref.train(mode)
            torch.testing.assert_close(net(x), ref(x), rtol=1e-5, atol=1e-5)


def test_legacy_functions_keep_positional_order():
    torch.manual_seed(1)
    x = torch.randn(4, 3, 5)
    w, b = torch.randn(3), torch.randn(3)
    rm, rv = torch.zeros(3), torch.ones(3)
    got = legacy.inplace_abn(x.clone(), w, b, rm, rv, True, 0.1, 1e-5, "elu", 0.3)
    want = ABN(3, activation="elu", activation_param=1.0)
    with torch.no_grad():
        want.weight.copy_(w), want.bias.copy_(b)
    torch.testing.assert_close(got, want(x.clone()), rtol=1e-5, atol=1e-5)
    assert torch.equal(legacy.GlobalAvgPool2d()(x.view(4, 3, 5, 1)), x.mean(2))

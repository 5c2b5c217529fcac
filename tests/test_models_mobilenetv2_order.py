"""AICSD MobileNetV2: the order of ``extract_feature``'s extra pre-ReLU passes (specs/aicsd.md §3.4, §3.2).

``features[{4,7,14}].conv[0:2]`` share their BatchNorm with the blocks; in train mode both passes update its
running statistics, so the order matters. The original runs the block passes first and the extra passes after
them; the expected statistics come from that order written out block by block below, not from our forward.
"""
import copy

import pytest
import torch
from torch import nn

from common.models import build_model
from common.models.mobilenetv2 import aicsd_mobilenetv2

pytestmark = pytest.mark.usefixtures("one_thread")

FEATURE_BLOCKS = (4, 7, 14)  # §3.4: the blocks whose conv[0:2] gives features 0, 1, 2


def original_extract_feature(backbone, x):
    """The original's order, one block at a time: features[0..17], then conv[0:2] of blocks 4, 7 and 14 on the
    inputs those blocks received."""
    f = backbone.features
    block_inputs = {}
    for i in range(len(f)):
        block_inputs[i] = x
        x = f[i](x)
    feats = [f[i].conv[1](f[i].conv[0](block_inputs[i])) for i in FEATURE_BLOCKS]
    return x, block_inputs[4], feats


def trained_like(module):
    """BatchNorm weights and biases away from 1 and 0 (trained values), so every block output has a non-zero
    mean and both running statistics depend on the order."""
    generator = torch.Generator().manual_seed(3)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.weight.shape, generator=generator) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=generator) - 0.5)
    return module


def running_stats(module):
    return {k: v for k, v in module.state_dict().items() if "running_" in k or "num_batches" in k}


def assert_same_stats(got, want):
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-12, msg=key)


@pytest.mark.parametrize("output_stride", [16, 8])
def test_train_mode_running_statistics_follow_the_original_order(output_stride):
    torch.manual_seed(0)
    ours = trained_like(aicsd_mobilenetv2(output_stride, nn.BatchNorm2d)).double().train()
    reference = copy.deepcopy(ours)
    x = torch.randn(2, 3, 33, 33, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        high, low, feats = ours(x)
        want_high, want_low, want_feats = original_extract_feature(reference, x)
    assert_same_stats(running_stats(ours), running_stats(reference))
    for i in FEATURE_BLOCKS:  # two updates of the shared norm, the other norms one
        assert ours.features[i].conv[1].num_batches_tracked.item() == 2
    assert ours.features[5].conv[1].num_batches_tracked.item() == 1
    torch.testing.assert_close(high, want_high, rtol=0, atol=1e-12)
    torch.testing.assert_close(low, want_low, rtol=0, atol=1e-12)
    for got, want in zip(feats[:3], want_feats):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_deeplab_extract_feature_updates_the_backbone_statistics_in_the_original_order():
    torch.manual_seed(0)
    model = trained_like(build_model("deeplabv3plus_mobilenetv2", num_classes=3)).double().train()
    reference = copy.deepcopy(model.backbone)
    x = torch.randn(2, 3, 33, 33, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        model.extract_feature(x)
        original_extract_feature(reference, x)
    assert_same_stats(running_stats(model.backbone), running_stats(reference))

"""Backbones with injected norm (issue 9 item 5): dilation patterns of ifvd_skd.md §C.1, cirkd.md §2.1/§2.2 and
aicsd.md §3.2, norm names, output names. Expected values are literals from the specs or hand-written
torch.nn.functional transcriptions."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import abn
from common.errors import UserError
from common.models import build_model
from common.models.mobilenetv2 import CIRKDMobileNetV2, InvertedResidual, aicsd_mobilenetv2
from common.models.norm import norm_layer
from common.models.resnet import BasicBlock, aicsd_resnet, cirkd_resnet


def block_dilations(resnet, layer):
    """Per block of ``layer``: (stride of the strided conv, dilation of each 3x3 conv, its padding)."""
    out = []
    for block in getattr(resnet, layer):
        convs = [c for c in (block.conv1, block.conv2, getattr(block, "conv3", None))
                 if c is not None and c.kernel_size == (3, 3)]
        out.append((max(c.stride[0] for c in convs), tuple(c.dilation[0] for c in convs),
                    tuple(c.padding[0] for c in convs)))
    return out


def meta(fn, *args):
    with torch.device("meta"):
        return fn(*args)


# ---------------------------------------------------------------- norm names
def test_norm_names_map_to_what_they_are():
    assert norm_layer("abn").func is abn.ABN  # pure-PyTorch reference
    assert norm_layer("bn").func is abn.ABN  # the older name of the same
    assert norm_layer("batchnorm") is nn.BatchNorm2d
    assert issubclass(norm_layer("syncbn"), nn.SyncBatchNorm)  # with a CPU (gloo) path, see test_models_syncbn.py
    assert norm_layer("auto").func is (abn.InPlaceABNSync if abn.extension_available() else abn.ABN)


@pytest.mark.skipif(not abn.extension_available(), reason="compiled InPlace-ABN extension not built")
def test_inplace_abn_is_the_compiled_sync_class():
    assert norm_layer("inplace_abn").func is abn.InPlaceABNSync


def test_abn_norm_layer_takes_one_argument_and_fixes_the_activation():
    layer = norm_layer("abn", activation="leaky_relu")(7)
    assert isinstance(layer, abn.ABN) and layer.num_features == 7 and layer.activation == "leaky_relu"
    assert norm_layer("abn")(3).activation == "identity"


def test_unknown_norm_is_a_user_error_listing_the_choices():
    with pytest.raises(UserError, match="inplace_abn, abn, auto, bn, batchnorm, syncbn"):
        norm_layer("gn")


def test_psp_lineage_rejects_plain_batchnorm():
    with pytest.raises(UserError, match="choose one of inplace_abn, abn, auto, bn$"):
        meta(lambda: build_model("pspnet_resnet18", norm="batchnorm"))


def test_cirkd_models_reject_inplace_abn_names():
    with pytest.raises(UserError, match="choose one of batchnorm, syncbn$"):
        meta(lambda: build_model("deeplabv3_resnet18", norm="abn"))


def test_plain_batchnorm_has_no_fused_activation():
    with pytest.raises(ValueError, match="no fused activation"):
        norm_layer("batchnorm", activation="leaky_relu")


# ---------------------------------------------------------------- ResNet dilation patterns (literals from the specs)
def test_psp_lineage_resnet18_uses_the_full_dilation_in_every_block():
    model = meta(lambda: build_model("pspnet_resnet18", norm="abn"))
    # ifvd_skd.md §C.1: layer2 stride 2; layer3 dilation 2 and layer4 dilation 4 in every block and conv
    assert block_dilations(model, "layer2") == [(2, (1, 1), (1, 1)), (1, (1, 1), (1, 1))]
    assert block_dilations(model, "layer3") == [(1, (2, 2), (2, 2))] * 2
    assert block_dilations(model, "layer4") == [(1, (4, 4), (4, 4))] * 2
    assert model.maxpool.ceil_mode


def test_psp_lineage_resnet101_uses_the_full_dilation_in_every_block():
    model = meta(lambda: build_model("pspnet_resnet101", norm="abn"))
    assert block_dilations(model, "layer3") == [(1, (2,), (2,))] * 23
    assert block_dilations(model, "layer4") == [(1, (4,), (4,))] * 3


def test_cirkd_resnet18_first_dilated_blocks_use_half_and_conv2_the_stage_dilation():
    model = meta(cirkd_resnet, 18, nn.BatchNorm2d)
    # cirkd.md §2.1: layer3 first block dilation 1, rest 2; layer4 first 2, rest 4; conv2 = previous_dilation
    assert block_dilations(model, "layer3") == [(1, (1, 2), (1, 2)), (1, (2, 2), (2, 2))]
    assert block_dilations(model, "layer4") == [(1, (2, 4), (2, 4)), (1, (4, 4), (4, 4))]
    assert not model.maxpool.ceil_mode


def test_cirkd_resnet101_first_dilated_blocks_use_half():
    model = meta(cirkd_resnet, 101, nn.BatchNorm2d)
    assert block_dilations(model, "layer3") == [(1, (1,), (1,))] + [(1, (2,), (2,))] * 22
    assert block_dilations(model, "layer4") == [(1, (2,), (2,))] + [(1, (4,), (4,))] * 2


def test_aicsd_resnet101_has_a_multigrid_layer4():
    os16 = meta(aicsd_resnet, 101, 16, nn.BatchNorm2d)
    # aicsd.md §3.2: OS16 strides [1, 2, 2, 1], layer4 dilations 2, 4, 8 with a 1x1 downsample 1024 -> 2048
    assert block_dilations(os16, "layer3")[0] == (2, (1,), (1,))
    assert block_dilations(os16, "layer4") == [(1, (2,), (2,)), (1, (4,), (4,)), (1, (8,), (8,))]
    assert tuple(os16.layer4[0].downsample[0].weight.shape) == (2048, 1024, 1, 1)
    os8 = meta(aicsd_resnet, 101, 8, nn.BatchNorm2d)
    assert block_dilations(os8, "layer3") == [(1, (2,), (2,))] * 23
    assert block_dilations(os8, "layer4") == [(1, (4,), (4,)), (1, (8,), (8,)), (1, (16,), (16,))]


def test_aicsd_resnet18_layer4_blocks_use_dilation_2_in_both_convs():
    model = meta(aicsd_resnet, 18, 16, nn.BatchNorm2d)
    assert block_dilations(model, "layer4") == [(1, (2, 2), (2, 2))] * 2
    assert model.layer4[0].downsample[0].stride == (1, 1)
    assert tuple(model.conv1.weight.shape) == (64, 3, 7, 7) and model.conv1.stride == (2, 2)


def bn_eval(x, m):
    return F.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)


def reference_basic_block(x, block, stride, d1, d2, moved_relu):
    """BasicBlock written out with F.conv2d, dilations from the spec (not read from the module)."""
    if moved_relu:
        x = F.relu(x)
    out = F.relu(bn_eval(F.conv2d(x, block.conv1.weight, None, stride, d1, d1), block.bn1))
    out = bn_eval(F.conv2d(out, block.conv2.weight, None, 1, d2, d2), block.bn2)
    residual = x if block.downsample is None else bn_eval(F.conv2d(x, block.downsample[0].weight, None, stride),
                                                          block.downsample[1])
    return out + residual if moved_relu else F.relu(out + residual)


def randomise_norms(model):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)


def reference_resnet18(x, model, stem, stages, moved_relu):
    """ResNet-18 forward from the spec's description; ``stages``: per layer, per block (stride, d1, d2)."""
    if stem == "deep":
        for i in (1, 2, 3):
            x = F.relu(bn_eval(F.conv2d(x, getattr(model, f"conv{i}").weight, None, 2 if i == 1 else 1, 1),
                               getattr(model, f"bn{i}")))
    else:
        x = F.relu(bn_eval(F.conv2d(x, model.conv1.weight, None, 2, 3), model.bn1))
    x = F.max_pool2d(x, 3, 2, 1)
    outs = []
    for layer, blocks in zip((model.layer1, model.layer2, model.layer3, model.layer4), stages):
        for block, (stride, d1, d2) in zip(layer, blocks):
            x = reference_basic_block(x, block, stride, d1, d2, moved_relu)
        outs.append(x)
    return outs


def test_cirkd_resnet18_forward_matches_the_spec_dilation_pattern():
    torch.manual_seed(0)
    model = cirkd_resnet(18, nn.BatchNorm2d).eval()
    randomise_norms(model)
    x = torch.randn(1, 3, 41, 41)
    # cirkd.md §2.1: (stride, conv1 dilation, conv2 dilation) per block
    stages = [[(1, 1, 1)] * 2, [(2, 1, 1), (1, 1, 1)], [(1, 1, 2), (1, 2, 2)], [(1, 2, 4), (1, 4, 4)]]
    with torch.no_grad():
        for got, want in zip(model(x), reference_resnet18(x, model, "deep", stages, moved_relu=False)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_aicsd_resnet18_forward_is_pre_relu_with_moved_relu():
    torch.manual_seed(1)
    model = aicsd_resnet(18, 16, nn.BatchNorm2d).eval()
    randomise_norms(model)
    x = torch.randn(1, 3, 49, 49)
    # aicsd.md §3.2: OS16 strides [1, 2, 2, 1], dilations [1, 1, 1, 2] in both 3x3 convs
    stages = [[(1, 1, 1)] * 2, [(2, 1, 1), (1, 1, 1)], [(2, 1, 1), (1, 1, 1)], [(1, 2, 2)] * 2]
    with torch.no_grad():
        high, low, feats = model(x)
        want = reference_resnet18(x, model, "7x7", stages, moved_relu=True)
    for got, exp in zip(feats, want):
        torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-5)
    assert (feats[3] < 0).any()  # pre-ReLU
    torch.testing.assert_close(high, F.relu(want[3]))
    torch.testing.assert_close(low, F.relu(want[0]))


def test_basic_block_conv2_uses_previous_dilation():
    block = BasicBlock(4, 4, nn.BatchNorm2d, dilation=2, previous_dilation=4)
    assert (block.conv1.dilation, block.conv2.dilation, block.conv2.padding) == ((2, 2), (4, 4), (4, 4))


def test_aicsd_resnet_output_shapes_at_513():
    # aicsd.md §3.1/§3.4 (513 input, OS16): low-level 129, layer2 65, layer3/layer4 33
    for depth, channels in ((101, (256, 512, 1024, 2048)), (18, (64, 128, 256, 512))):
        model = meta(aicsd_resnet, depth, 16, nn.BatchNorm2d)
        with torch.device("meta"):
            high, low, feats = model(torch.zeros(1, 3, 513, 513))
        assert [tuple(f.shape) for f in feats] == [(1, channels[0], 129, 129), (1, channels[1], 65, 65),
                                                   (1, channels[2], 33, 33), (1, channels[3], 33, 33)]
        assert tuple(high.shape) == (1, channels[3], 33, 33) and tuple(low.shape) == (1, channels[0], 129, 129)


@pytest.mark.parametrize("depth,backbone_m", [(101, 42.500), (18, 11.177)])
def test_aicsd_resnet_parameter_count(depth, backbone_m):
    model = meta(aicsd_resnet, depth, 16, nn.BatchNorm2d)
    # aicsd.md §3.3, the 1x group (backbone) in M
    assert abs(sum(p.numel() for p in model.parameters()) / 1e6 - backbone_m) < 0.0005


def test_aicsd_resnet_keys_are_upstream():
    keys = meta(aicsd_resnet, 101, 16, nn.BatchNorm2d).state_dict().keys()
    for key in ("conv1.weight", "bn1.running_var", "layer1.0.conv1.weight", "layer1.0.downsample.1.weight",
                "layer4.2.conv3.weight", "layer4.0.downsample.0.weight", "bn1.num_batches_tracked"):
        assert key in keys
    assert not any(k.startswith(("fc.", "conv2.", "layer4.3.")) for k in keys)


def test_backbone_init_is_normal_with_fan_out_std():
    torch.manual_seed(0)
    conv = aicsd_resnet(18, 16, nn.BatchNorm2d).layer4[1].conv2
    # aicsd.md §3.6 / cirkd.md §2.1: N(0, sqrt(2 / (3*3*512)))
    assert abs(conv.weight.std().item() / (2 / (9 * 512)) ** 0.5 - 1) < 0.02


# ---------------------------------------------------------------- MobileNetV2
def depthwise(block):
    conv = next(c for c in block.conv if isinstance(c, nn.Conv2d) and c.groups > 1)
    return conv.stride[0], conv.dilation[0], conv.padding[0]


def test_cirkd_mobilenetv2_dilates_blocks_7_to_17():
    features = meta(CIRKDMobileNetV2, nn.BatchNorm2d).features
    got = [depthwise(features[i]) for i in range(1, 18)]
    # cirkd.md §2.2: blocks 2, 4 keep stride 2; block 7 (a stride-2 conv) -> stride 1, dilation 1, padding 1;
    # blocks 8-13 dilation 2; block 14 (stride-2) -> dilation 2; blocks 15-17 dilation 4
    want = [(1, 1, 1), (2, 1, 1), (1, 1, 1), (2, 1, 1), (1, 1, 1), (1, 1, 1), (1, 1, 1)] + [(1, 2, 2)] * 6 \
        + [(1, 2, 2)] + [(1, 4, 4)] * 3
    assert got == want
    assert features[0][0].stride == (2, 2) and len(features) == 18


@pytest.mark.parametrize("output_stride,want", [
    # aicsd.md §3.2: OS16 stride-2 layers features[0], [2], [4], [7]; c160 blocks at dilation 1; c320 at 2
    (16, [(1, 1), (2, 1), (1, 1), (2, 1), (1, 1), (1, 1), (2, 1)] + [(1, 1)] * 9 + [(1, 2)]),
    # OS8 by the same rule, written out by hand: c64 at d1 stride 1, c96 d2, c160 d2, c320 d4
    (8, [(1, 1), (2, 1), (1, 1), (2, 1), (1, 1), (1, 1)] + [(1, 1)] * 4 + [(1, 2)] * 6 + [(1, 4)]),
])
def test_aicsd_mobilenetv2_stride_dilation_rule(output_stride, want):
    features = meta(aicsd_mobilenetv2, output_stride, nn.BatchNorm2d).features
    got = [depthwise(features[i])[:2] for i in range(1, 18)]
    assert got == want
    assert all(depthwise(features[i])[2] == 0 for i in range(1, 18))  # TF-same: every conv padding 0


def test_tf_same_padding_pads_the_block_input_before_the_expansion():
    torch.manual_seed(0)
    block = InvertedResidual(8, 8, 1, 2, 6, nn.BatchNorm2d, tf_padding=True).eval()
    randomise_norms(block)
    x = torch.randn(1, 8, 9, 9)
    c = block.conv
    xp = F.pad(x, (2, 2, 2, 2))  # k_eff = 5 -> 4 in total, 2 before and 2 after
    y = F.relu6(bn_eval(F.conv2d(xp, c[0].weight), c[1]))
    y = F.relu6(bn_eval(F.conv2d(y, c[3].weight, None, 1, 0, 2, 48), c[4]))
    y = bn_eval(F.conv2d(y, c[6].weight), c[7])
    with torch.no_grad():
        torch.testing.assert_close(block(x), x + y, rtol=1e-5, atol=1e-5)


def test_tf_same_padding_with_dilation_1_pads_one_pixel_on_each_side():
    block = InvertedResidual(4, 4, 2, 1, 1, nn.BatchNorm2d, tf_padding=True).eval()
    with torch.no_grad():
        assert tuple(block(torch.randn(1, 4, 9, 9)).shape) == (1, 4, 5, 5)  # (9 + 2 - 3)//2 + 1


def test_aicsd_mobilenetv2_outputs_and_extract_features_at_513():
    model = meta(aicsd_mobilenetv2, 16, nn.BatchNorm2d)
    with torch.device("meta"):
        high, low, feats = model(torch.zeros(1, 3, 513, 513))
        plain = model(torch.zeros(1, 3, 513, 513), return_feats=False)
    # aicsd.md §3.4 (MobileNetV2 column) and §3.2 (low 24 ch, stride 4; high 320 ch, stride 16)
    assert [tuple(f.shape) for f in feats] == [(1, 144, 129, 129), (1, 192, 65, 65), (1, 576, 33, 33),
                                               (1, 320, 33, 33)]
    assert tuple(high.shape) == (1, 320, 33, 33) and tuple(low.shape) == (1, 24, 129, 129)
    assert [tuple(t.shape) for t in plain] == [(1, 320, 33, 33), (1, 24, 129, 129)]


def test_aicsd_mobilenetv2_extract_features_are_the_expansion_convs_before_relu():
    torch.manual_seed(0)
    model = aicsd_mobilenetv2(16, nn.BatchNorm2d).eval()
    randomise_norms(model)
    x = torch.randn(1, 3, 33, 33)
    f = model.features
    with torch.no_grad():
        high, low, feats = model(x)
        want0 = bn_eval(F.conv2d(low, f[4].conv[0].weight), f[4].conv[1])
        x7 = f[4:7](low)
        want1 = bn_eval(F.conv2d(x7, f[7].conv[0].weight), f[7].conv[1])
    torch.testing.assert_close(feats[0], want0)
    torch.testing.assert_close(feats[1], want1)
    assert feats[3] is high


def test_aicsd_mobilenetv2_keys_and_count():
    model = meta(aicsd_mobilenetv2, 16, nn.BatchNorm2d)
    keys = model.state_dict().keys()
    # the t=1 block: conv.0 (dw), conv.1, conv.3 (pw-linear), conv.4; t=6 blocks: conv.0 ... conv.7 (aicsd.md §3.6)
    assert [k for k in keys if k.startswith("features.1.") and k.endswith("weight")] == [
        "features.1.conv.0.weight", "features.1.conv.1.weight", "features.1.conv.3.weight", "features.1.conv.4.weight"]
    assert "features.2.conv.7.running_var" in keys and "features.17.conv.7.weight" in keys
    assert "features.18.0.weight" not in keys  # below: upstream slice views of features, indices kept
    assert "low_level_features.0.0.weight" in keys and "high_level_features.4.conv.0.weight" in keys
    assert abs(sum(p.numel() for p in model.parameters()) / 1e6 - 1.812) < 0.0005  # aicsd.md §3.3


# ---------------------------------------------------------------- output names
def test_pspnet_declares_its_output_names():
    model = meta(lambda: build_model("pspnet_resnet18", norm="abn"))
    assert model.output_names == ("logits", "aux", "feat")
    skd = meta(lambda: build_model("pspnet_resnet18", norm="abn", return_features=True))
    assert skd.output_names == ("logits", "aux", "feat", "layer4", "layer3", "layer2", "layer1")
    with torch.device("meta"):
        outputs = skd.eval()(torch.zeros(1, 3, 65, 65))
    assert [o.shape[1] for o in outputs] == [19, 19, 128, 512, 256, 128, 64]


def test_espnets_declare_their_output_names():
    esp, esp_c = build_model("espnet").eval(), build_model("espnet_c").eval()
    with torch.no_grad():
        out, out_c = esp(torch.zeros(1, 3, 32, 32)), esp_c(torch.zeros(1, 3, 32, 32))
    assert esp.output_names == ("logits", "feat", "encoder_logits") and len(out) == 3
    assert [tuple(o.shape[1:]) for o in out] == [(19, 32, 32), (256, 4, 4), (19, 4, 4)]
    assert esp_c.output_names == ("logits", "feat") and [o.shape[1] for o in out_c] == [19, 256]

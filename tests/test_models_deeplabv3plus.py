"""AICSD DeepLabV3+ (specs/aicsd.md §3): counts, parameter groups, keys, feature shapes, the head against a
transcription of §3.1, errors, and ImageNet initialisation from torchvision-layout files (§3.6).

Full-size shapes and counts run on the meta device; forwards use a ResNet-18 model on 33x33 or 65x65 inputs."""
import math
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from common.errors import UserError
from common.models import build_model
from common.models.deeplabv3plus import (
    DeepLab,
    load_original_checkpoint,
    lr_param_groups,
    model_name,
    remap_torchvision_mobilenet_v2,
)

NAMES = ("deeplabv3plus_resnet101", "deeplabv3plus_resnet18", "deeplabv3plus_mobilenetv2")


def meta_model(name, **kw):
    with torch.device("meta"):
        return build_model(name, num_classes=21, **kw)


def numel(params):
    return sum(p.numel() for p in params)


@pytest.fixture(scope="module")
def r18():
    torch.manual_seed(0)
    return build_model("deeplabv3plus_resnet18", num_classes=2).eval()


# ---- counts and parameter groups (§3.3, §6.1) -------------------------------------------------------------


@pytest.mark.parametrize("name, total", [("deeplabv3plus_resnet101", 59_344_309),
                                         ("deeplabv3plus_resnet18", 16_608_181),
                                         ("deeplabv3plus_mobilenetv2", 5_816_053)])
def test_parameter_count_at_21_classes_os16(name, total):
    assert numel(meta_model(name).parameters()) == total  # issue 11 item 1 / §3.3


def head_params(aspp_in, low_in, classes=21):
    """ASPP + decoder parameters from the layer list of §3.1 (conv weights, BN weight + bias)."""
    bn = 2 * 256
    aspp = (aspp_in * 256 + bn) + 3 * (aspp_in * 256 * 9 + bn) + (aspp_in * 256 + bn) + (1280 * 256 + bn)
    decoder = (low_in * 48 + 2 * 48) + (304 * 256 * 9 + bn) + (256 * 256 * 9 + bn) + (256 * classes + classes)
    return aspp + decoder


@pytest.mark.parametrize("name, aspp_in, low_in, one_x_m, ten_x_m", [
    ("deeplabv3plus_resnet101", 2048, 256, 42.500, 16.844),
    ("deeplabv3plus_resnet18", 512, 64, 11.177, 5.432),
    ("deeplabv3plus_mobilenetv2", 320, 24, 1.812, 4.004),
])
def test_1x_and_10x_groups_are_backbone_and_head(name, aspp_in, low_in, one_x_m, ten_x_m):
    model = meta_model(name)
    one_x, ten_x = numel(model.get_1x_lr_params()), numel(model.get_10x_lr_params())
    assert ten_x == head_params(aspp_in, low_in)
    assert round(one_x / 1e6, 3) == one_x_m and round(ten_x / 1e6, 3) == ten_x_m  # §3.3 table
    assert one_x + ten_x == numel(model.parameters())  # the groups cover every parameter once


def test_lr_param_groups_give_the_head_ten_times_the_lr():
    model = meta_model("deeplabv3plus_resnet18")
    groups = lr_param_groups(model, 0.007)
    assert [g["lr"] for g in groups] == [0.007, 0.07]
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in model.backbone.parameters()}


# ---- state_dict keys (§3.1, issue 11 item 1) ----------------------------------------------------------------


def bn_keys(prefix):
    return [f"{prefix}.{leaf}" for leaf in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]


HEAD_KEYS = (
    [k for i in (1, 2, 3, 4) for k in [f"aspp.aspp{i}.atrous_conv.weight", *bn_keys(f"aspp.aspp{i}.bn")]]
    + ["aspp.global_avg_pool.1.weight", *bn_keys("aspp.global_avg_pool.2"), "aspp.conv1.weight", *bn_keys("aspp.bn1")]
    + ["decoder.conv1.weight", *bn_keys("decoder.bn1"), "decoder.last_conv.0.weight",
       *bn_keys("decoder.last_conv.1"), "decoder.last_conv.4.weight", *bn_keys("decoder.last_conv.5"),
       "decoder.last_conv.8.weight", "decoder.last_conv.8.bias"]
)


def test_head_keys_are_the_upstream_aspp_and_decoder_names():
    keys = [k for k in meta_model("deeplabv3plus_resnet18").state_dict() if not k.startswith("backbone.")]
    assert keys == HEAD_KEYS


def test_resnet18_backbone_keys():
    expected = ["backbone.conv1.weight", *bn_keys("backbone.bn1")]
    for layer in (1, 2, 3, 4):
        for block in (0, 1):
            p = f"backbone.layer{layer}.{block}"
            expected += [f"{p}.conv1.weight", *bn_keys(f"{p}.bn1"), f"{p}.conv2.weight", *bn_keys(f"{p}.bn2")]
            if layer > 1 and block == 0:
                expected += [f"{p}.downsample.0.weight", *bn_keys(f"{p}.downsample.1")]
    keys = [k for k in meta_model("deeplabv3plus_resnet18").state_dict() if k.startswith("backbone.")]
    assert keys == expected


@pytest.mark.parametrize("depth", [18, 101])
def test_resnet_backbone_keys_and_shapes_are_torchvisions_without_fc(depth):
    with torch.device("meta"):
        tv = getattr(torchvision.models, f"resnet{depth}")().state_dict()
    ours = meta_model(f"deeplabv3plus_resnet{depth}").state_dict()
    ours = {k[len("backbone."):]: v.shape for k, v in ours.items() if k.startswith("backbone.")}
    assert ours == {k: v.shape for k, v in tv.items() if not k.startswith("fc.")}


def test_head_shapes_of_the_teacher():
    sd = meta_model("deeplabv3plus_resnet101").state_dict()
    assert sd["aspp.aspp2.atrous_conv.weight"].shape == (256, 2048, 3, 3)
    assert sd["aspp.global_avg_pool.1.weight"].shape == (256, 2048, 1, 1)
    assert sd["aspp.conv1.weight"].shape == (256, 1280, 1, 1)
    assert sd["decoder.conv1.weight"].shape == (48, 256, 1, 1)
    assert sd["decoder.last_conv.0.weight"].shape == (256, 304, 3, 3)
    assert sd["decoder.last_conv.8.weight"].shape == (21, 256, 1, 1)


def test_a_checkpoint_round_trips_strictly(tmp_path, r18):
    path = tmp_path / "checkpoint.pth.tar"
    torch.save({"epoch": 3, "state_dict": r18.state_dict(), "best_pred": 0.5}, path)
    other = build_model("deeplabv3plus_resnet18", num_classes=2)
    other.load_state_dict(torch.load(path, weights_only=True)["state_dict"], strict=True)
    assert torch.equal(other.decoder.last_conv[8].weight, r18.decoder.last_conv[8].weight)


def save_original_checkpoint(model, path, numpy1_names=False):
    """What AICSD's train.py saves (§2.9): best_pred is a numpy float64. ``numpy1_names`` rewrites the pickle's
    global ``numpy._core.multiarray`` to the numpy 1.x name ``numpy.core.multiarray`` (checkpoints of 2023)."""
    torch.save({"epoch": 50, "state_dict": model.state_dict(), "optimizer": {}, "best_pred": np.float64(0.7785)},
               path)
    if numpy1_names:
        with zipfile.ZipFile(path) as zin:
            items = [(info, zin.read(info)) for info in zin.infolist()]
        with zipfile.ZipFile(path, "w") as zout:
            for info, data in items:
                if info.filename.endswith("data.pkl"):
                    assert b"numpy._core.multiarray" in data  # protocol 2: newline-terminated GLOBAL names
                    data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
                zout.writestr(info, data)


@pytest.mark.parametrize("numpy1_names", [False, True])
def test_an_original_checkpoint_with_a_numpy_best_pred_loads_strictly(tmp_path, r18, numpy1_names):
    path = tmp_path / "checkpoint.pth.tar"
    save_original_checkpoint(r18, path, numpy1_names)
    other = build_model("deeplabv3plus_resnet18", num_classes=2)
    checkpoint = load_original_checkpoint(other, str(path))
    assert checkpoint["best_pred"] == 0.7785 and checkpoint["epoch"] == 50
    assert torch.equal(other.aspp.conv1.weight, r18.aspp.conv1.weight)


def test_a_checkpoint_without_state_dict_is_a_user_error(tmp_path):
    path = tmp_path / "bad.pth.tar"
    torch.save({"epoch": 1, "best_pred": 0.5}, path)
    with pytest.raises(UserError, match="no 'state_dict' entry"):
        load_original_checkpoint(meta_model("deeplabv3plus_resnet18"), str(path))


def test_a_checkpoint_of_another_class_count_is_a_user_error(tmp_path, r18):
    path = tmp_path / "checkpoint.pth.tar"
    save_original_checkpoint(r18, path)
    with pytest.raises(UserError, match="decoder.last_conv.8.weight"):
        load_original_checkpoint(build_model("deeplabv3plus_resnet18", num_classes=21), str(path))


# ---- shapes (§3.4) and ASPP dilations (§3.1) ----------------------------------------------------------------

FEATURES_513 = {  # §3.4 table, 513x513 input, OS16
    "deeplabv3plus_resnet101": [(256, 129), (512, 65), (1024, 33), (2048, 33), (256, 33), (256, 129)],
    "deeplabv3plus_resnet18": [(64, 129), (128, 65), (256, 33), (512, 33), (256, 33), (256, 129)],
    "deeplabv3plus_mobilenetv2": [(144, 129), (192, 65), (576, 33), (320, 33), (256, 33), (256, 129)],
}


@pytest.mark.parametrize("name", NAMES)
def test_extract_feature_shapes_at_513(name):
    model = meta_model(name).eval()
    feats = model.extract_feature(torch.empty(2, 3, 513, 513, device="meta"))
    assert list(feats) == ["layer1", "layer2", "layer3", "layer4", "aspp", "decoder", "logits"]
    got = [(f.shape[1], f.shape[2]) for f in list(feats.values())[:6]]
    assert got == FEATURES_513[name]
    assert all(f.shape[0] == 2 and f.shape[2] == f.shape[3] for f in feats.values())
    assert feats["logits"].shape == (2, 21, 513, 513)
    assert model(torch.empty(2, 3, 513, 513, device="meta")).shape == (2, 21, 513, 513)


@pytest.mark.parametrize("output_stride, dilations, high", [(16, (1, 6, 12, 18), 33), (8, (1, 12, 24, 36), 65)])
def test_aspp_dilations_and_high_level_size_per_output_stride(output_stride, dilations, high):
    model = meta_model("deeplabv3plus_resnet101", output_stride=output_stride).eval()
    convs = [getattr(model.aspp, f"aspp{i}").atrous_conv for i in (1, 2, 3, 4)]
    assert tuple(c.dilation[0] for c in convs) == dilations
    assert tuple(c.padding[0] for c in convs) == (0,) + dilations[1:]
    assert model.extract_feature(torch.empty(1, 3, 513, 513, device="meta"))["aspp"].shape[-1] == high


def test_output_names():
    assert meta_model("deeplabv3plus_resnet18").output_names == ("logits",)


# ---- the head against §3.1, forward vs extract_feature (§10 "Networks") --------------------------------------


def bn_eval(bn, x):
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


def ref_head(model, high, low, size):
    """§3.1 in eval mode with the functional API: (aspp pre-ReLU, decoder pre-ReLU, logits at ``size``)."""
    a = model.aspp
    branches = []
    for i, d in zip((1, 2, 3, 4), (1, 6, 12, 18)):
        m = getattr(a, f"aspp{i}")
        branches.append(F.relu(bn_eval(m.bn, F.conv2d(high, m.atrous_conv.weight, padding=0 if i == 1 else d,
                                                      dilation=d))))
    pooled = F.relu(bn_eval(a.global_avg_pool[2], F.conv2d(high.mean((2, 3), keepdim=True),
                                                           a.global_avg_pool[1].weight)))
    branches.append(F.interpolate(pooled, size=high.shape[2:], mode="bilinear", align_corners=True))
    aspp = bn_eval(a.bn1, F.conv2d(torch.cat(branches, 1), a.conv1.weight))
    dec = model.decoder
    lc = dec.last_conv
    low = F.relu(bn_eval(dec.bn1, F.conv2d(low, dec.conv1.weight)))
    x = torch.cat([F.interpolate(F.relu(aspp), size=low.shape[2:], mode="bilinear", align_corners=True), low], 1)
    x = F.relu(bn_eval(lc[1], F.conv2d(x, lc[0].weight, padding=1)))
    decoder = bn_eval(lc[5], F.conv2d(x, lc[4].weight, padding=1))
    logits = F.conv2d(F.relu(decoder), lc[8].weight, lc[8].bias)
    return aspp, decoder, F.interpolate(logits, size=size, mode="bilinear", align_corners=True)


def test_head_equals_the_transcription_of_3_1(r18):
    for bn in r18.modules():  # non-trivial running statistics
        if isinstance(bn, nn.BatchNorm2d):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(1, 3, 65, 65, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        high, low, _ = r18.backbone(x)
        aspp, decoder, logits = ref_head(r18, high, low, (65, 65))
        feats = r18.extract_feature(x)
        out = r18(x)
    torch.testing.assert_close(feats["aspp"], aspp, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(feats["decoder"], decoder, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(feats["logits"], logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out, logits, rtol=1e-4, atol=1e-5)
    assert (feats["aspp"] < 0).any() and (feats["decoder"] < 0).any()  # pre-ReLU


def test_in_train_mode_forward_and_extract_feature_differ_only_by_the_aspp_dropout():
    torch.manual_seed(0)
    model = build_model("deeplabv3plus_resnet18", num_classes=2).train()
    x = torch.randn(2, 3, 33, 33)
    torch.manual_seed(5)
    with_dropout = model(x)
    torch.manual_seed(5)
    extracted = model.extract_feature(x)["logits"]
    assert not torch.allclose(with_dropout, extracted)
    model.aspp.dropout = nn.Identity()
    torch.manual_seed(5)
    torch.testing.assert_close(model(x), extracted, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_dropout_rates_are_the_literals_of_3_1(name):
    # §3.1: ASPP Dropout(0.5) in forward; decoder last_conv = conv, BN, ReLU, Dropout(0.5), conv, BN, ReLU,
    # Dropout(0.1), conv
    model = meta_model(name)
    last_conv = model.decoder.last_conv
    assert [type(m) for m in last_conv] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Dropout] * 2 + [nn.Conv2d]
    assert (last_conv[3].p, last_conv[7].p, model.aspp.dropout.p) == (0.5, 0.1, 0.5)
    assert sorted(m.p for m in model.modules() if isinstance(m, nn.Dropout)) == [0.1, 0.5, 0.5]


def test_return_features_forward_is_extract_feature_as_a_named_list(r18):
    model = build_model("deeplabv3plus_resnet18", num_classes=2, return_features=True)
    model.load_state_dict(r18.state_dict())
    model.eval()
    assert model.output_names == ("logits", "layer1", "layer2", "layer3", "layer4", "aspp", "decoder")
    x = torch.randn(1, 3, 33, 33)
    with torch.no_grad():
        outputs = model(x)
        feats = r18.extract_feature(x)
    assert len(outputs) == 7
    for name, value in zip(model.output_names, outputs):
        torch.testing.assert_close(value, feats[name])


def test_head_init_is_kaiming_normal_fan_in_and_bn_ones_zeros():
    torch.manual_seed(0)
    model = DeepLab("resnet18", 16, 21)
    w = model.aspp.aspp2.atrous_conv.weight
    assert abs(w.std().item() / math.sqrt(2 / (512 * 9)) - 1) < 0.01  # kaiming_normal_, fan_in = 512·3·3
    assert torch.all(model.decoder.last_conv[5].weight == 1) and torch.all(model.decoder.last_conv[5].bias == 0)
    bias = model.decoder.last_conv[8].bias  # PyTorch's default: U(±1/sqrt(fan_in)), fan_in = 256
    assert bias.abs().max() <= 1 / 16 and bias.abs().min() > 0


# ---- bad input ----------------------------------------------------------------------------------------------


def test_training_on_a_batch_of_one_is_a_user_error(r18):
    r18.train()
    try:
        with pytest.raises(UserError, match="batch of 1"):
            r18(torch.randn(1, 3, 33, 33))
    finally:
        r18.eval()
    assert r18(torch.randn(1, 3, 33, 33)).shape == (1, 2, 33, 33)


@pytest.mark.parametrize("backbone", ["xception", "drn"])
def test_xception_and_drn_are_not_rebuilt(backbone):
    with pytest.raises(UserError, match="not rebuilt"):
        model_name(backbone)


def test_unknown_backbone_lists_the_choices():
    with pytest.raises(UserError, match="resnet101, resnet18, mobilenet"):
        model_name("resnet")
    assert [model_name(b) for b in ("resnet101", "resnet18", "mobilenet")] == list(NAMES)


def test_output_stride_32_and_unknown_norm_are_user_errors():
    with pytest.raises(UserError, match="16 or 8"):
        meta_model("deeplabv3plus_resnet18", output_stride=32)
    with pytest.raises(UserError, match="batchnorm"):
        meta_model("deeplabv3plus_resnet18", norm="inplace_abn")


def test_syncbn_norm_builds_sync_batchnorm_layers():
    model = meta_model("deeplabv3plus_mobilenetv2", norm="syncbn")
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(norms) == 1 + 2 + 16 * 3 + 6 + 3 and all(isinstance(m, nn.SyncBatchNorm) for m in norms)  # §3.1-3.2


# ---- ImageNet initialisation (§3.6) -------------------------------------------------------------------------


def test_resnet18_loads_a_torchvision_file_and_matches_torchvision_up_to_layer1(tmp_path):
    torch.manual_seed(0)
    tv = torchvision.models.resnet18().eval()
    path = tmp_path / "resnet18.pth"
    torch.save(tv.state_dict(), path)
    model = build_model("deeplabv3plus_resnet18", num_classes=2, pretrained_backbone=str(path)).eval()
    assert torch.equal(model.backbone.layer3[1].conv2.weight, tv.layer3[1].conv2.weight)
    x = torch.randn(1, 3, 33, 33)
    with torch.no_grad():
        expected = tv.layer1(tv.maxpool(tv.relu(tv.bn1(tv.conv1(x)))))
        layer1 = model.extract_feature(x)["layer1"]
    torch.testing.assert_close(F.relu(layer1), expected)


def tv_mobilenet_state():
    torch.manual_seed(0)
    return torchvision.models.mobilenet_v2().state_dict()


def test_mobilenet_v2_remap_follows_3_6():
    tv = tv_mobilenet_state()
    remapped = remap_torchvision_mobilenet_v2(tv)
    assert torch.equal(remapped["features.0.0.weight"], tv["features.0.0.weight"])
    for tv_key, key in [("conv.0.0", "conv.0"), ("conv.0.1", "conv.1"), ("conv.1", "conv.3"), ("conv.2", "conv.4")]:
        assert torch.equal(remapped[f"features.1.{key}.weight"], tv[f"features.1.{tv_key}.weight"])
    for tv_key, key in [("conv.0.0", "conv.0"), ("conv.0.1", "conv.1"), ("conv.1.0", "conv.3"),
                        ("conv.1.1", "conv.4"), ("conv.2", "conv.6"), ("conv.3", "conv.7")]:
        assert torch.equal(remapped[f"features.9.{key}.weight"], tv[f"features.9.{tv_key}.weight"])
    assert not any(k.startswith(("features.18.", "classifier.")) for k in remapped)


def test_mobilenet_v2_loads_a_torchvision_file_into_every_backbone_tensor(tmp_path):
    tv = tv_mobilenet_state()
    path = tmp_path / "mobilenet_v2.pth"
    torch.save(tv, path)
    model = build_model("deeplabv3plus_mobilenetv2", num_classes=2, pretrained_backbone=str(path))
    remapped = remap_torchvision_mobilenet_v2(tv)
    ours = model.backbone.state_dict()
    for key, value in remapped.items():
        assert torch.equal(ours[key], value), key
    assert torch.equal(ours["high_level_features.17.conv.6.weight"], tv["features.17.conv.2.weight"])
    assert len(remapped) == len([k for k in ours if k.startswith("features.")])


def test_an_imagenet_file_missing_backbone_tensors_is_a_user_error(tmp_path):
    torch.manual_seed(0)
    sd = torchvision.models.resnet18().state_dict()
    path = tmp_path / "partial.pth"
    torch.save({k: v for k, v in sd.items() if not k.startswith("layer4.")}, path)
    with pytest.raises(UserError, match="missing keys: layer4.0.conv1.weight"):
        build_model("deeplabv3plus_resnet18", num_classes=2, pretrained_backbone=str(path))


def test_a_mobilenet_v2_file_missing_a_block_is_a_user_error(tmp_path):
    path = tmp_path / "partial.pth"
    torch.save({k: v for k, v in tv_mobilenet_state().items() if not k.startswith("features.17.")}, path)
    with pytest.raises(UserError, match="lack .* backbone tensors .*features.17"):
        build_model("deeplabv3plus_mobilenetv2", num_classes=2, pretrained_backbone=str(path))


def test_an_imagenet_file_of_another_depth_is_a_user_error(tmp_path):
    path = tmp_path / "r101.pth"
    with torch.device("meta"):
        keys = torchvision.models.resnet101().state_dict()
    torch.save({k: torch.zeros(v.shape) for k, v in keys.items() if k.startswith("layer1.0.")}, path)
    with pytest.raises(UserError, match=r"layer1.0.conv1.weight \(64, 64, 1, 1\) vs model \(64, 64, 3, 3\)"):
        build_model("deeplabv3plus_resnet18", num_classes=2, pretrained_backbone=str(path))


def test_a_missing_imagenet_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        build_model("deeplabv3plus_resnet18", num_classes=2, pretrained_backbone=str(tmp_path / "none.pth"))

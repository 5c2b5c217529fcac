"""CIRKD's networks (cirkd.md §2, §7.4, §11): counts, output shapes, checkpoint keys, init, ImageNet loading, and
the repository's FLOPs counter. Expected values are literals from the spec or hand transcriptions."""
import functools
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from common.errors import UserError
from common.models import build_model
from common.tables.flops import cirkd_macs, model_complexity

CIRKD_MODELS = ("deeplabv3_resnet101", "deeplabv3_resnet18", "deeplabv3_mobilenetv2", "cirkd_pspnet_resnet18",
                "cirkd_pspnet_mobilenetv2")
BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


@functools.cache
def meta_model(name, **kw):
    with torch.device("meta"):
        return build_model(name, **kw).eval()


@pytest.mark.parametrize("name,count", [
    # issue 10 / cirkd.md §7.4 (K = 19, aux head included)
    ("deeplabv3_resnet101", 61_118_950), ("deeplabv3_resnet18", 13_607_974), ("deeplabv3_mobilenetv2", 3_233_171),
    ("cirkd_pspnet_resnet18", 12_919_334), ("cirkd_pspnet_mobilenetv2", 2_654_739)])
def test_parameter_counts(name, count):
    assert sum(p.numel() for p in meta_model(name).parameters()) == count


@pytest.mark.parametrize("name,without_aux_m", [("deeplabv3_resnet101", 58.754), ("deeplabv3_resnet18", 13.459),
                                                ("cirkd_pspnet_resnet18", 12.771)])
def test_parameter_counts_without_aux(name, without_aux_m):
    model = meta_model(name, aux=False)
    assert abs(sum(p.numel() for p in model.parameters()) / 1e6 - without_aux_m) < 0.0005  # §7.4
    assert model.output_names == ("logits", "feat")


@pytest.mark.parametrize("name,shapes", [
    # cirkd.md §2.6, verified shapes for a 1x3x512x1024 input
    ("deeplabv3_resnet101", [(1, 19, 64, 128), (1, 19, 64, 128), (1, 256, 64, 128)]),
    ("deeplabv3_resnet18", [(1, 19, 64, 128), (1, 19, 64, 128), (1, 128, 64, 128)]),
    ("deeplabv3_mobilenetv2", [(1, 19, 64, 128), (1, 128, 64, 128)]),
    ("cirkd_pspnet_resnet18", [(1, 19, 64, 128), (1, 19, 64, 128), (1, 128, 64, 128)]),
    ("cirkd_pspnet_mobilenetv2", [(1, 19, 64, 128), (1, 128, 64, 128)]),
])
def test_output_shapes_and_names(name, shapes):
    model = meta_model(name)
    with torch.device("meta"):
        outputs = model(torch.zeros(1, 3, 512, 1024))
    assert isinstance(outputs, list) and [tuple(o.shape) for o in outputs] == shapes
    assert model.output_names == (("logits", "aux", "feat") if len(shapes) == 3 else ("logits", "feat"))


def test_small_input_has_the_same_stride_8_arithmetic():
    model = build_model("deeplabv3_resnet18", num_classes=2).eval()
    with torch.no_grad():
        outputs = model(torch.randn(1, 3, 64, 96))
    # conv1 s2 (32x48), floor-mode max-pool (16x24), layer2 s2 (8x12)
    assert [tuple(o.shape) for o in outputs] == [(1, 2, 8, 12), (1, 2, 8, 12), (1, 128, 8, 12)]


def head_keys_deeplabv3(num_classes, c4, width, c3):
    """The DeepLabV3 head/aux keys and shapes as cirkd.md §2.3/§2.8 describe them."""
    sd = OrderedDict()

    def conv(name, cout, cin, k, bias=False):
        sd[f"{name}.weight"] = (cout, cin, k, k)
        if bias:
            sd[f"{name}.bias"] = (cout,)

    def norm(name, c):
        for p in BN:
            sd[f"{name}.{p}"] = () if p == "num_batches_tracked" else (c,)

    conv("head.aspp.b0.0", width, c4, 1)
    norm("head.aspp.b0.1", width)
    for b in (1, 2, 3):
        conv(f"head.aspp.b{b}.block.0", width, c4, 3)
        norm(f"head.aspp.b{b}.block.1", width)
    conv("head.aspp.b4.gap.1", width, c4, 1)
    norm("head.aspp.b4.gap.2", width)
    conv("head.aspp.project.0", width, 5 * width, 1)
    norm("head.aspp.project.1", width)
    conv("head.block.0", width, width, 3)
    norm("head.block.1", width)
    conv("head.block.4", num_classes, width, 1, bias=True)
    if c3:
        conv("auxlayer.block.0", c3 // 4, c3, 3)
        norm("auxlayer.block.1", c3 // 4)
        conv("auxlayer.block.4", num_classes, c3 // 4, 1, bias=True)
    return sd


def head_keys_psp(num_classes, c4, width, c3):
    sd = OrderedDict()
    for i in range(1, 5):
        sd[f"head.psp.conv{i}.0.weight"] = (c4 // 4, c4, 1, 1)
        for p in BN:
            sd[f"head.psp.conv{i}.1.{p}"] = () if p == "num_batches_tracked" else (c4 // 4,)
    sd["head.block.0.weight"] = (width, 2 * c4, 3, 3)
    for p in BN:
        sd[f"head.block.1.{p}"] = () if p == "num_batches_tracked" else (width,)
    sd["head.classifier.weight"] = (num_classes, width, 1, 1)
    sd["head.classifier.bias"] = (num_classes,)
    if c3:
        sd["auxlayer.block.0.weight"] = (c3 // 4, c3, 3, 3)
        for p in BN:
            sd[f"auxlayer.block.1.{p}"] = () if p == "num_batches_tracked" else (c3 // 4,)
        sd["auxlayer.block.4.weight"] = (num_classes, c3 // 4, 1, 1)
        sd["auxlayer.block.4.bias"] = (num_classes,)
    return sd


@pytest.mark.parametrize("name,expected", [
    ("deeplabv3_resnet101", head_keys_deeplabv3(19, 2048, 256, 1024)),
    ("deeplabv3_resnet18", head_keys_deeplabv3(19, 512, 128, 256)),
    ("deeplabv3_mobilenetv2", head_keys_deeplabv3(19, 320, 128, None)),
    ("cirkd_pspnet_resnet18", head_keys_psp(19, 512, 128, 256)),
    ("cirkd_pspnet_mobilenetv2", head_keys_psp(19, 320, 128, None)),
])
def test_head_keys_and_shapes_are_the_checkpoints(name, expected):
    sd = meta_model(name).state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items() if not k.startswith("pretrained.")} == dict(expected)


def test_resnet_backbone_keys_are_prefixed_pretrained():
    keys = list(meta_model("deeplabv3_resnet18").state_dict())
    # cirkd.md §2.8: deep stem conv1..conv3 / bn1..bn3, layer{1-4}.{i}.conv{1,2}, layer*.0.downsample.{0,1}
    for key in ("pretrained.conv1.weight", "pretrained.bn3.running_var", "pretrained.layer1.0.downsample.0.weight",
                "pretrained.layer4.1.conv2.weight", "pretrained.layer4.1.bn2.num_batches_tracked"):
        assert key in keys
    assert not any(k.startswith("pretrained.fc") for k in keys)
    assert tuple(meta_model("deeplabv3_resnet18").state_dict()["pretrained.conv3.weight"].shape) == (128, 64, 3, 3)


def test_mobilenet_backbone_keys_are_prefixed_pretrained_net():
    keys = list(meta_model("deeplabv3_mobilenetv2").state_dict())
    for key in ("pretrained.net.features.0.0.weight", "pretrained.net.features.0.1.running_mean",
                "pretrained.net.features.1.conv.4.weight", "pretrained.net.features.17.conv.7.weight"):
        assert key in keys
    assert not any(k.startswith("pretrained.net.features.18") for k in keys)


def test_syncbn_builds_sync_batchnorm_and_runs_in_one_process():
    torch.manual_seed(0)
    model = build_model("cirkd_pspnet_mobilenetv2", num_classes=2, norm="syncbn")
    assert all(not isinstance(m, nn.BatchNorm2d) or isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    assert isinstance(model.head.block[1], nn.SyncBatchNorm)
    logits, feat = model(torch.randn(2, 3, 33, 33))
    assert tuple(logits.shape) == (2, 2, 5, 5)


def test_backbone_convs_are_kaiming_fan_out_and_head_convs_keep_torch_default():
    torch.manual_seed(0)
    model = build_model("deeplabv3_resnet18")
    backbone = model.pretrained.layer4[1].conv2.weight  # §2.1: N(0, sqrt(2 / (3*3*512)))
    assert abs(backbone.std().item() / (2 / (9 * 512)) ** 0.5 - 1) < 0.02
    head = model.head.aspp.b1.block[0].weight  # §11: kaiming-uniform a=sqrt(5): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    bound = 1 / (512 * 9) ** 0.5
    assert head.abs().max().item() <= bound and head.abs().max().item() > 0.99 * bound
    assert torch.equal(model.pretrained.bn1.weight, torch.ones(64))


def test_mobilenet_init_is_normal_with_fan_out_std():
    torch.manual_seed(0)
    conv = build_model("deeplabv3_mobilenetv2").pretrained.net.features[17].conv[0].weight  # 1x1, 160 -> 960
    assert abs(conv.std().item() / (2 / 960) ** 0.5 - 1) < 0.02  # §2.2: N(0, sqrt(2 / (k*k*out)))


# ---------------------------------------------------------------- forward against the spec's equations
def bn_eval(x, m):
    return F.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)


def test_deeplab_head_transcription():
    torch.manual_seed(0)
    head = build_model("deeplabv3_resnet18", num_classes=3).head.eval()
    c4 = torch.randn(1, 512, 6, 7)
    a = head.aspp

    def branch(seq, x, rate=1):
        return F.relu(bn_eval(F.conv2d(x, seq[0].weight, None, 1, rate if seq[0].kernel_size[0] == 3 else 0, rate),
                              seq[1]))
    b4 = F.relu(bn_eval(F.conv2d(c4.mean((2, 3), keepdim=True), a.b4.gap[1].weight), a.b4.gap[2]))
    cat = torch.cat([branch(a.b0, c4), branch(a.b1.block, c4, 12), branch(a.b2.block, c4, 24),
                     branch(a.b3.block, c4, 36), b4.expand(-1, -1, 6, 7)], 1)  # §2.3, order §11
    aspp = branch(a.project, cat)
    feat = F.relu(bn_eval(F.conv2d(aspp, head.block[0].weight, None, 1, 1), head.block[1]))
    logits = F.conv2d(feat, head.block[4].weight, head.block[4].bias)
    with torch.no_grad():
        got_logits, got_feat = head(c4)
    torch.testing.assert_close(got_feat, feat, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_logits, logits, rtol=1e-5, atol=1e-5)


def test_psp_head_concatenates_c4_first():
    torch.manual_seed(0)
    head = build_model("cirkd_pspnet_resnet18", num_classes=3).head.eval()
    c4 = torch.randn(1, 512, 6, 6)
    pooled = []
    for i, bins in enumerate((1, 2, 3, 6), 1):
        seq = getattr(head.psp, f"conv{i}")
        p = F.relu(bn_eval(F.conv2d(F.adaptive_avg_pool2d(c4, bins), seq[0].weight), seq[1]))
        pooled.append(F.interpolate(p, (6, 6), mode="bilinear", align_corners=True))
    x = torch.cat([c4] + pooled, 1)  # §11: [c4, p1, p2, p3, p6]
    feat = F.relu(bn_eval(F.conv2d(x, head.block[0].weight, None, 1, 1), head.block[1]))
    with torch.no_grad():
        logits, got_feat = head(c4)
    torch.testing.assert_close(got_feat, feat, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, F.conv2d(feat, head.classifier.weight, head.classifier.bias),
                               rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- ImageNet loading (§2.8)
def imagenet_file(tmp_path, module, drop=(), extra=()):
    sd = OrderedDict((k, torch.randn_like(v, dtype=torch.float32) if v.is_floating_point() else v)
                     for k, v in module.state_dict().items() if not k.endswith("num_batches_tracked") and k not in drop)
    for k in extra:
        sd[k] = torch.zeros(3)
    path = tmp_path / "imagenet.pth"
    torch.save(sd, path)
    return path, sd


def test_imagenet_resnet_file_loads_and_drops_fc(tmp_path):
    source = build_model("cirkd_pspnet_resnet18", num_classes=2).pretrained
    path, sd = imagenet_file(tmp_path, source, extra=("fc.weight", "fc.bias"))
    model = build_model("cirkd_pspnet_resnet18", num_classes=2, pretrained_backbone=str(path))
    assert torch.equal(model.pretrained.layer3[0].conv1.weight,
                       sd["layer3.0.conv1.weight"])
    assert torch.equal(model.pretrained.bn2.running_var, sd["bn2.running_var"])


def test_imagenet_mobilenet_file_loads_into_pretrained_net(tmp_path):
    source = build_model("deeplabv3_mobilenetv2", num_classes=2).pretrained.net
    path, sd = imagenet_file(tmp_path, source, extra=("features.18.0.weight", "classifier.1.weight"))
    model = build_model("deeplabv3_mobilenetv2", num_classes=2, pretrained_backbone=str(path))
    assert torch.equal(model.pretrained.net.features[5].conv[3].weight, sd["features.5.conv.3.weight"])


def test_imagenet_file_missing_a_backbone_key_is_a_user_error(tmp_path):
    source = build_model("cirkd_pspnet_resnet18", num_classes=2).pretrained
    path, _ = imagenet_file(tmp_path, source, drop=("layer2.1.bn1.weight",))
    with pytest.raises(UserError, match=r"missing keys: layer2\.1\.bn1\.weight.*resnet18-imagenet\.pth"):
        build_model("cirkd_pspnet_resnet18", num_classes=2, pretrained_backbone=str(path))


def test_imagenet_file_of_another_layout_is_a_user_error(tmp_path):
    source = build_model("deeplabv3_mobilenetv2", num_classes=2).pretrained.net
    path, _ = imagenet_file(tmp_path, source)
    with pytest.raises(UserError, match="missing keys: conv1.weight"):
        build_model("deeplabv3_resnet18", num_classes=2, pretrained_backbone=str(path))


def test_missing_imagenet_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        build_model("deeplabv3_resnet18", num_classes=2, pretrained_backbone=str(tmp_path / "none.pth"))


# ---------------------------------------------------------------- FLOPs as CIRKD counted them (§7.4)
def test_cirkd_counter_ignores_dilation_and_counts_only_conv_and_linear():
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=4, dilation=4, groups=2), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))
    # conv: (32 + 8 - 3)//1 + 1 = 38 per side, in*out*k*k/groups = 8*16*9/2; linear: weight numel 80
    assert cirkd_macs(model, torch.zeros(1, 8, 32, 32)) == 8 * 16 * 9 * 38 * 38 // 2 + 80


@pytest.mark.parametrize("name,gmacs", [("deeplabv3_resnet101", 2371.7), ("deeplabv3_resnet18", 572.0),
                                        ("deeplabv3_mobilenetv2", 128.9), ("cirkd_pspnet_resnet18", 507.3)])
def test_cirkd_counter_reproduces_the_reported_multiply_adds(name, gmacs):
    cx = model_complexity(name, 19, (1024, 2048), convention="cirkd")
    assert cx.device == "meta" and cx.convention == "cirkd"
    assert round(cx.gmacs, 1) == gmacs  # §7.4 at 1x3x1024x2048


def test_correct_count_is_smaller_for_dilated_models():
    torch_count = model_complexity("deeplabv3_resnet18", 19, (1024, 2048))
    cirkd_count = model_complexity("deeplabv3_resnet18", 19, (1024, 2048), convention="cirkd")
    assert torch_count.convention == "torch" and torch_count.params == cirkd_count.params == 13_607_974
    assert torch_count.gmacs < cirkd_count.gmacs

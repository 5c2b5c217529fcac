"""PSPNet-ResNet18/101 of IFVD/CWD/SKD against specs/ifvd_skd.md §C.1, §A.3, §B.3; weights loading rules."""
import copy
import functools
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from common.errors import UserError
from common.models import build_model, list_models
from common.models.weights import load_checkpoint, load_imagenet_backbone, load_state_dict_strict, remap_toolbox_teacher

BN = ("weight", "bias", "running_mean", "running_var")


def expected_state(depth, num_classes=19):
    """The released checkpoints' keys and shapes, built from the description in §C.1."""
    bottleneck = depth == 101
    layers = [3, 4, 23, 3] if bottleneck else [2, 2, 2, 2]
    exp = 4 if bottleneck else 1
    sd = OrderedDict()

    def conv(name, cout, cin, k):
        sd[f"{name}.weight"] = (cout, cin, k, k)

    def norm(name, c):
        for p in BN:
            sd[f"{name}.{p}"] = (c,)

    for i, (cin, cout) in enumerate([(3, 64), (64, 64), (64, 128)], 1):
        conv(f"conv{i}", cout, cin, 3)
        norm(f"bn{i}", cout)
    inplanes = 128
    for li, (planes, blocks) in enumerate(zip([64, 128, 256, 512], layers), 1):
        for b in range(blocks):
            pre = f"layer{li}.{b}"
            if bottleneck:
                convs = [(planes, inplanes, 1), (planes, planes, 3), (planes * 4, planes, 1)]
            else:
                convs = [(planes, inplanes, 3), (planes, planes, 3)]
            for c, (co, ci, k) in enumerate(convs, 1):
                conv(f"{pre}.conv{c}", co, ci, k)
                norm(f"{pre}.bn{c}", co)
            if b == 0:
                conv(f"{pre}.downsample.0", planes * exp, inplanes, 1)
                norm(f"{pre}.downsample.1", planes * exp)
            inplanes = planes * exp
    feat, out = 512 * exp, 128 * exp
    for s in range(4):
        conv(f"pspmodule.stages.{s}.1", out, feat, 1)
        norm(f"pspmodule.stages.{s}.2", out)
    conv("pspmodule.bottleneck.0", out, feat + 4 * out, 3)
    norm("pspmodule.bottleneck.1", out)
    conv("head", num_classes, out, 1)
    sd["head.bias"] = (num_classes,)
    conv("dsn.0", out, feat // 2, 3)
    sd["dsn.0.bias"] = (out,)
    norm("dsn.1", out)
    conv("dsn.3", num_classes, out, 1)
    sd["dsn.3.bias"] = (num_classes,)
    return sd


@pytest.fixture(scope="module")
def student():
    torch.manual_seed(0)
    return build_model("pspnet_resnet18", norm="bn")


@functools.cache
def meta_model(name, norm="bn", return_features=False):
    """Shape-only model (no memory, no compute); eval mode, never mutated by the tests."""
    with torch.device("meta"):
        return build_model(name, norm=norm, return_features=return_features).eval()


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_registry_lists_and_rejects_unknown_names():
    names = list_models()
    assert {"pspnet_resnet18", "pspnet_resnet101"} <= set(names)
    with pytest.raises(UserError, match="unknown model 'pspnet_resnet50'.*pspnet_resnet101, pspnet_resnet18"):
        build_model("pspnet_resnet50")
    model = build_model("pspnet_resnet18", num_classes=11)
    assert model.head.out_channels == 11 and model.dsn[3].out_channels == 11


@pytest.mark.parametrize("name,depth,params,tensors,parts", [
    ("pspnet_resnet18", 18, 13_068_262, 150, {"layer4": 8.39, "pspmodule": 1.44, "dsn": 0.30}),
    ("pspnet_resnet101", 101, 70_437_350, 565, {"layer3": 26.09, "pspmodule": 23.07, "dsn": 4.73}),
])
@pytest.mark.parametrize("norm", ["bn", "auto"])
def test_parameter_count_and_state_dict_match_release(name, depth, params, tensors, parts, norm):
    model = meta_model(name, norm)
    assert n_params(model) == params
    assert {k: round(n_params(getattr(model, k)) / 1e6, 2) for k in parts} == parts
    sd = model.state_dict()
    expected = expected_state(depth)
    assert len(expected) == tensors
    assert list(sd) == list(expected)
    assert {k: tuple(v.shape) for k, v in sd.items()} == dict(expected)
    assert not any("num_batches_tracked" in k for k in sd)


def test_real_parameter_count_of_the_student(student):
    assert n_params(student) == 13_068_262
    assert all(p.device.type == "cpu" for p in student.parameters())


def test_layer_geometry_is_the_original(student):
    assert student.maxpool.ceil_mode and student.maxpool.kernel_size == 3 and student.maxpool.padding == 1
    for li, dil in [(1, 1), (2, 1), (3, 2), (4, 4)]:
        for block in getattr(student, f"layer{li}"):
            for conv in (block.conv1, block.conv2):
                assert conv.dilation == (dil, dil) and conv.padding == (dil, dil)
    assert student.layer2[0].conv1.stride == (2, 2)
    assert student.layer2[0].downsample[0].stride == (2, 2)
    teacher = meta_model("pspnet_resnet101")
    assert teacher.layer3[0].conv2.dilation == (2, 2) and teacher.layer3[0].conv1.kernel_size == (1, 1)
    assert teacher.layer4[2].conv2.dilation == (4, 4) and teacher.layer2[0].conv2.stride == (2, 2)
    assert teacher.layer2[0].conv1.stride == (1, 1)
    for module in (student.pspmodule.bottleneck[2], student.dsn[2]):
        assert type(module) is nn.Dropout2d and module.p == 0.1
    assert student.dsn[0].bias is not None and student.head.bias is not None
    assert student.pspmodule.bottleneck[0].bias is None


def test_norm_layers_have_inplace_abn_semantics(student):
    backbone = [student.bn1, student.layer1[0].bn2, student.layer1[0].downsample[1], student.layer4[1].bn1]
    heads = [student.pspmodule.stages[0][2], student.pspmodule.bottleneck[1], student.dsn[1]]
    assert all(m.activation == "identity" for m in backbone)
    assert all(m.activation == "leaky_relu" and m.activation_param == 0.01 for m in heads)
    model = copy.deepcopy(student).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for m in model.modules():
            if m.__class__ is heads[0].__class__:
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.bias.uniform_(-0.5, 0.5)
                m.weight.uniform_(0.5, 1.5)
        ref = model(x)
        for m in model.modules():
            if m.__class__ is heads[0].__class__:
                m.weight.neg_()
        flipped = model(x)
    for a, b in zip(ref, flipped):
        torch.testing.assert_close(a, b)


def test_forward_512_gives_65_and_skd_features(student):
    model = copy.deepcopy(student).eval()
    model.return_features = True
    with torch.no_grad():
        out = model(torch.randn(1, 3, 512, 512))
    shapes = [tuple(o.shape) for o in out]
    assert shapes == [(1, 19, 65, 65), (1, 19, 65, 65), (1, 128, 65, 65), (1, 512, 65, 65),
                      (1, 256, 65, 65), (1, 128, 65, 65), (1, 64, 129, 129)]
    torch.testing.assert_close(out[0], model.head(out[2]))
    assert len(build_model("pspnet_resnet18", norm="bn", return_features=True).eval()(
        torch.randn(1, 3, 33, 33))) == 7


@pytest.mark.parametrize("size,expected", [((1024, 2048), (129, 257)), ((769, 769), (97, 97)),
                                           ((512, 512), (65, 65))])
def test_output_stride_arithmetic(size, expected):
    for name in ("pspnet_resnet18", "pspnet_resnet101"):
        model = meta_model(name, return_features=True)
        out = model(torch.empty(1, 3, *size, device="meta"))
        assert [tuple(o.shape[2:]) for o in out[:6]] == [expected] * 6
        channels = [o.shape[1] for o in out]
        assert channels == ([19, 19, 512, 2048, 1024, 512, 256] if name.endswith("101")
                            else [19, 19, 128, 512, 256, 128, 64])


def test_forward_returns_three_outputs_and_dropout_only_in_train(student):
    model = copy.deepcopy(student)
    x = torch.randn(2, 3, 48, 48)
    model.eval()
    with torch.no_grad():
        a, b = model(x), model(x)
    assert len(a) == 3
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q)
    model.train()
    torch.manual_seed(1)
    with torch.no_grad():
        feat = model(x)[2]
    dropped = (feat.flatten(2).abs().amax(-1) == 0)
    assert dropped.any() and not dropped.all()


# ---------------------------------------------------------------- a functional reference of §C.1
STAGES = [(1, 1), (2, 1), (1, 2), (1, 4)]  # (stride, dilation) of layer1..layer4, §C.1 "Layers"
PSP_BINS = (1, 2, 3, 6)  # §C.1 "PSP module": one stage per bin size
HEAD_SLOPE = 0.01  # §C.1/§C.2: the heads' ABN is BN + leaky ReLU, slope 0.01
ABN_EPS = 1e-5  # §C.2: eps 1e-5, effective scale |w| + eps


def ref_abn(x, sd, prefix, leaky):
    """§C.2 in eval mode: (x − μ)/√(σ² + eps)·(|w| + eps) + b, then leaky ReLU (heads) or nothing (backbone)."""
    y = F.batch_norm(x, sd[f"{prefix}.running_mean"], sd[f"{prefix}.running_var"],
                     sd[f"{prefix}.weight"].abs() + ABN_EPS, sd[f"{prefix}.bias"], False, 0.0, ABN_EPS)
    return F.leaky_relu(y, HEAD_SLOPE) if leaky else y


def ref_block(x, sd, p, stride, dil, bottleneck):
    """§C.1 "Blocks": BasicBlock (3×3, 3×3) or Bottleneck v1.5 (1×1, strided 3×3, 1×1·4), both dilated."""
    if bottleneck:
        out = F.relu(ref_abn(F.conv2d(x, sd[f"{p}.conv1.weight"]), sd, f"{p}.bn1", False))
        out = F.conv2d(out, sd[f"{p}.conv2.weight"], stride=stride, padding=dil, dilation=dil)
        out = F.relu(ref_abn(out, sd, f"{p}.bn2", False))
        out = ref_abn(F.conv2d(out, sd[f"{p}.conv3.weight"]), sd, f"{p}.bn3", False)
    else:
        out = F.conv2d(x, sd[f"{p}.conv1.weight"], stride=stride, padding=dil, dilation=dil)
        out = F.relu(ref_abn(out, sd, f"{p}.bn1", False))
        out = ref_abn(F.conv2d(out, sd[f"{p}.conv2.weight"], padding=dil, dilation=dil), sd, f"{p}.bn2", False)
    if f"{p}.downsample.0.weight" in sd:
        x = ref_abn(F.conv2d(x, sd[f"{p}.downsample.0.weight"], stride=stride), sd, f"{p}.downsample.1", False)
    return F.relu(out + x)


def ref_psp(x, sd):
    """§C.1 "PSP module": avg-pool to each bin, 1×1 conv, ABN; bilinear (align_corners=True) back; concat
    [stages..., input]; 3×3 bottleneck, ABN; Dropout2d is the identity in eval."""
    size = x.shape[2:]
    priors = [F.interpolate(ref_abn(F.conv2d(F.adaptive_avg_pool2d(x, b), sd[f"pspmodule.stages.{i}.1.weight"]),
                                    sd, f"pspmodule.stages.{i}.2", True), size=size, mode="bilinear",
                            align_corners=True) for i, b in enumerate(PSP_BINS)]
    y = F.conv2d(torch.cat(priors + [x], 1), sd["pspmodule.bottleneck.0.weight"], padding=1)
    return ref_abn(y, sd, "pspmodule.bottleneck.1", True)


def ref_pspnet(x, sd, layers, bottleneck):
    """§C.1 end to end, eval mode: ``[logits, dsn_logits, psp_feat, x4, x3, x2, x1]`` (§B.3 order)."""
    for i, stride in ((1, 2), (2, 1), (3, 1)):
        x = F.relu(ref_abn(F.conv2d(x, sd[f"conv{i}.weight"], stride=stride, padding=1), sd, f"bn{i}", False))
    x = F.max_pool2d(x, 3, 2, 1, ceil_mode=True)
    feats = []
    for li, (blocks, (stride, dil)) in enumerate(zip(layers, STAGES), 1):
        for b in range(blocks):
            x = ref_block(x, sd, f"layer{li}.{b}", stride if b == 0 else 1, dil, bottleneck)
        feats.append(x)
    x1, x2, x3, x4 = feats
    dsn = ref_abn(F.conv2d(x3, sd["dsn.0.weight"], sd["dsn.0.bias"], padding=1), sd, "dsn.1", True)
    dsn = F.conv2d(dsn, sd["dsn.3.weight"], sd["dsn.3.bias"])
    psp = ref_psp(x4, sd)
    return [F.conv2d(psp, sd["head.weight"], sd["head.bias"]), dsn, psp, x4, x3, x2, x1]


def randomize_norms(model, seed):
    """Non-trivial running statistics and affine parameters, some weights negative (so |w| matters)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "running_var", None) is not None:
                n = m.running_var.numel()
                m.running_mean.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                sign = torch.where(torch.rand(n, generator=g) < 0.3, -1.0, 1.0)
                m.weight.copy_(sign * (torch.rand(n, generator=g) + 0.5))
                m.bias.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
    return model


def test_psp_pyramid_bins_are_1_2_3_6(student):
    assert [stage[0].output_size for stage in student.pspmodule.stages] == [1, 2, 3, 6]  # §C.1


def test_psp_module_equals_the_functional_reference(student):
    psp = randomize_norms(copy.deepcopy(student.pspmodule), 1).double().eval()
    feats = torch.randn(1, 512, 9, 11, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    sd = {f"pspmodule.{k}": v for k, v in psp.state_dict().items()}
    with torch.no_grad():
        torch.testing.assert_close(psp(feats), ref_psp(feats, sd), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name,layers,bottleneck,side", [("pspnet_resnet18", [2, 2, 2, 2], False, 65),
                                                         ("pspnet_resnet101", [3, 4, 23, 3], True, 33)])
def test_forward_equals_the_functional_reference(name, layers, bottleneck, side):
    torch.manual_seed(0)
    model = randomize_norms(build_model(name, norm="abn", return_features=True), 3).double().eval()
    x = torch.randn(1, 3, side, side, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got = model(x)
        expected = ref_pspnet(x, model.state_dict(), layers, bottleneck)
    assert [tuple(o.shape) for o in got] == [tuple(o.shape) for o in expected]
    for a, b in zip(got, expected):
        assert b.abs().max() > 1e-3  # a signal, not a vanished activation
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9 * b.abs().max().item())


def test_strict_roundtrip_with_wrapper_and_module_prefix(student, tmp_path):
    sd = {"module." + k: v for k, v in student.state_dict().items()}
    sd["module.bn1.num_batches_tracked"] = torch.tensor(3)
    path = tmp_path / "s.pth"
    torch.save({"state_dict": sd, "step": 7}, path)
    model = build_model("pspnet_resnet18", norm="bn")
    obj = load_checkpoint(path, "student checkpoint")
    assert obj["step"] == 7
    load_state_dict_strict(model, obj, "student checkpoint")
    for k, v in student.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_strict_load_names_first_offenders_and_the_fix(student):
    good = student.state_dict()
    model = build_model("pspnet_resnet18", norm="bn")
    sd = OrderedDict(good)
    removed = list(sd)[:6]
    for k in removed:
        del sd[k]
    sd["extra.weight"] = torch.zeros(1)
    sd["head.weight"] = torch.zeros(21, 128, 1, 1)
    with pytest.raises(UserError) as err:
        load_state_dict_strict(model, sd, "student checkpoint")
    msg = str(err.value)
    assert msg.startswith("student checkpoint does not match the model")
    assert ", ".join(removed[:5]) + " (+1 more)" in msg and removed[5] not in msg
    assert "unexpected keys: extra.weight" in msg
    assert "head.weight (21, 128, 1, 1) vs model (19, 128, 1, 1)" in msg
    assert "pass a checkpoint of this PSPNet" in msg
    with pytest.raises(UserError, match="not tensors"):
        load_state_dict_strict(model, {**good, "meta": "x"}, "student checkpoint")


def test_toolbox_teacher_layout_is_remapped(student):
    def toolbox(sd):
        out = OrderedDict()
        for k, v in sd.items():
            if k.startswith("pspmodule."):
                k = "head.0." + k[len("pspmodule."):]
            elif k.startswith("head."):
                k = "head.1." + k[len("head."):]
            out[k] = v
        out["fc.weight"] = torch.zeros(3)
        return out

    sd = toolbox(student.state_dict())
    model = build_model("pspnet_resnet18", norm="bn")
    with pytest.raises(UserError, match="remap_toolbox_teacher"):
        load_state_dict_strict(model, sd, "teacher checkpoint")
    load_state_dict_strict(model, remap_toolbox_teacher(sd), "teacher checkpoint")
    assert torch.equal(model.pspmodule.bottleneck[0].weight, student.pspmodule.bottleneck[0].weight)
    assert torch.equal(model.head.bias, student.head.bias)
    teacher_keys = list(meta_model("pspnet_resnet101").state_dict())
    assert list(remap_toolbox_teacher(toolbox(OrderedDict.fromkeys(teacher_keys)))) == teacher_keys


def backbone_file(model, path, **extra):
    sd = {k: v.clone() for k, v in model.state_dict().items()
          if not k.startswith(("pspmodule.", "head.", "dsn."))}
    sd.update({"fc.weight": torch.randn(1000, 512), "fc.bias": torch.randn(1000),
               "bn1.num_batches_tracked": torch.tensor(0)}, **extra)
    torch.save(sd, path)
    return sd


def test_imagenet_backbone_loading_follows_the_original_rules(student, tmp_path):
    path = tmp_path / "resnet18-imagenet.pth"
    saved = backbone_file(student, path)
    model = build_model("pspnet_resnet18", norm="bn")
    head_before = model.head.weight.clone()
    left = load_imagenet_backbone(model, path)
    assert set(left) == {k for k in model.state_dict() if k.startswith(("pspmodule.", "head.", "dsn."))}
    for k, v in model.state_dict().items():
        if k in saved:
            assert torch.equal(v, saved[k]), k
    assert torch.equal(model.head.weight, head_before)
    via_factory = build_model("pspnet_resnet18", norm="bn", pretrained_backbone=str(path))
    assert torch.equal(via_factory.layer4[1].conv2.weight, saved["layer4.1.conv2.weight"])


def test_imagenet_backbone_bad_files(student, tmp_path):
    model = build_model("pspnet_resnet18", norm="bn")
    with pytest.raises(UserError, match="ImageNet backbone weights not found at .*nothere.pth; download"):
        load_imagenet_backbone(model, tmp_path / "nothere.pth")
    bad = tmp_path / "bad.pth"
    backbone_file(student, bad, **{"conv1.weight": torch.zeros(64, 3, 7, 7)})
    with pytest.raises(UserError, match=r"conv1.weight \(64, 3, 7, 7\) vs model \(64, 3, 3, 3\)"):
        load_imagenet_backbone(model, bad)
    other = tmp_path / "other.pth"
    torch.save({"features.0.weight": torch.zeros(1)}, other)
    with pytest.raises(UserError, match="share no key with the model"):
        load_imagenet_backbone(model, other)


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(UserError, match=r"teacher checkpoint not found at .*t.pth; pass --T-ckpt-path"):
        load_checkpoint(tmp_path / "t.pth", "teacher checkpoint", hint="pass --T-ckpt-path")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="could not be read"):
        load_checkpoint(garbage, "teacher checkpoint")
    tensor = tmp_path / "tensor.pth"
    torch.save(torch.zeros(2), tensor)
    with pytest.raises(UserError, match="holds a Tensor, not a state_dict"):
        load_checkpoint(tensor, "teacher checkpoint")

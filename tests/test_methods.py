"""Every method of the catalogue on four student families: one CPU TrainStep, finite losses, and the gradient
of each term alone reaches the student (issue 19 item 1, "Done when"; README "Distillation methods").

Tiny pairs at a 32×32 crop (64×64 for DeepLabV3+), batch 2, random weights. The students: PSPNet-R18 with
In-Place ABN (teacher the same network); DeepLabV3-R18 (teacher DeepLabV3-MobileNetV2, which has no aux head:
DSD takes its main logits); DeepLabV3+-MobileNetV2 (teacher DeepLabV3+-R18; feature ``layer4``, 320 vs 512
channels: the adapters and the projection head are exercised); ESPNet-C (teacher ESPNet, full-resolution
logits: the teacher map is resized to the student's). The discriminator needs logits of at least 64×64: only
DeepLabV3+ (full-resolution logits) gives them at a small crop, so the adversarial parts run on that family
(512-ish crops elsewhere would cost seconds per step); on the others the adversarial weights are 0.
"""
import pytest
import torch

from common.abn import extension_available
from common.engine.step import NamedOutputs, Term, TrainStep
from common.losses.segmentation import CriterionDSN
from common.methods import build_method, list_methods, method_context
from common.models import build_model

CROPS = {"deeplabv3plus_mobilenetv2": (64, 64)}  # the others at 32x32: the discriminator runs on this one only
FAMILIES = {
    "pspnet_r18_inplace_abn": (("pspnet_resnet18", {"norm": "inplace_abn"}),
                               ("pspnet_resnet18", {"norm": "inplace_abn"}), "inplace_abn", "feat"),
    "deeplabv3_r18": (("deeplabv3_resnet18", {}), ("deeplabv3_mobilenetv2", {}), "batchnorm", "feat"),
    "deeplabv3plus_mobilenetv2": (("deeplabv3plus_mobilenetv2", {"return_features": True}),
                                  ("deeplabv3plus_resnet18", {"return_features": True}), "batchnorm", "layer4"),
    "espnet_c": (("espnet_c", {}), ("espnet", {}), "batchnorm", "feat"),
}
ADVERSARIAL = ("skd", "ifvd", "cwd")
SMALL_MEMORY = {"pixel_memory_size": 32, "region_memory_size": 8, "pixel_contrast_size": 19 * 3,
                "region_contrast_size": 19 * 2}


def method_weights(method, family, feature):
    """Parameters of ``method`` for the family: its feature, adversary on only where logits reach 64×64, small
    CIRKD memories, and every term of the method switched on."""
    weights = {}
    if method not in ("none", "kd", "aicsd"):
        weights["feature"] = feature
    if method in ADVERSARIAL:
        on = family == "deeplabv3plus_mobilenetv2"
        weights.update(adv=0.001 if on else 0.0, d=0.1 if on else 0.0)
    if method == "cwd":
        weights["feat"] = 50.0
    if method == "cirkd":
        weights.update(SMALL_MEMORY)
    if method == "aicsd":
        weights["ic"] = 1.0
    return weights


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    name = request.param
    (s_name, s_kw), (t_name, t_kw), norm, feature = FAMILIES[name]
    if norm == "inplace_abn" and not extension_available():
        pytest.skip("the In-Place ABN extension is not built")
    torch.manual_seed(0)
    student = build_model(s_name, num_classes=19, **s_kw)
    teacher = build_model(t_name, num_classes=19, **t_kw)
    crop = CROPS.get(name, (32, 32))
    ctx = method_context(student, teacher, num_classes=19, ignore_index=255, norm=norm, total_steps=10,
                         steps_per_epoch=2, crop=crop, student_name=s_name, teacher_name=t_name)
    return name, student, teacher, ctx, feature


def task_term(student):
    dsn = CriterionDSN(ignore_index=255, aux_weight=0.4)
    if "aux" in student.output_names:
        return Term("task", 1.0, lambda z, a, y: dsn([z, a], y), ("s.logits", "s.aux", "labels"))
    return Term("task", 1.0, lambda z, y: dsn([z], y), ("s.logits", "labels"))


def batch(crop):
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, *crop, generator=g), torch.randint(0, 19, (2, *crop), generator=g)


def student_grad_norm(student, loss):
    params = [p for p in student.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return sum(float(g.abs().sum()) for g in grads if g is not None)


@pytest.mark.parametrize("method", [m for m in list_methods() if m != "none"])
def test_method_trains_one_step_and_reaches_the_student(family, method):
    name, student, teacher, ctx, feature = family
    parts = build_method(method, ctx, **method_weights(method, name, feature))
    assert parts.terms, f"{method} built no term on {name}"
    images, labels = batch(ctx.crop)

    # each term alone: finite, and its gradient reaches the student's parameters
    student.train()
    for module in parts.modules.values():
        module.train()
    with torch.no_grad():
        teacher.eval()
        t = NamedOutputs(teacher(images), teacher.output_names, "teacher")
    s = NamedOutputs(student(images), student.output_names, "student")
    for term in parts.terms:
        args = [labels if spec == "labels" else (s if spec[0] == "s" else t)[spec[2:]] for spec in term.inputs]
        value = term.fn(*args)
        assert torch.isfinite(value), f"{method}/{term.name} on {name}: {value}"
        assert student_grad_norm(student, value) > 0, f"{method}/{term.name} gives the student no gradient on {name}"
    if parts.adversary is not None:
        adv = parts.adversary.losses.generator_loss(parts.adversary.discriminator(s["logits"])[0])
        assert student_grad_norm(student, adv) > 0, f"the adversarial term of {method} gives the student no gradient"

    params = [p for p in student.parameters() if p.requires_grad]
    params += [p for m in parts.modules.values() for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    step = TrainStep(student, task=task_term(student), optimizer=optimizer, base_lr=1e-3, device="cpu",
                     teacher=teacher, terms=parts.terms, modules=parts.modules, adversary=parts.adversary,
                     total_name="loss")
    if parts.task_weight is not None:
        step.task = Term(step.task.name, parts.task_weight, step.task.fn, step.task.inputs)
    losses = step((images, labels), 3)
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values()), losses
    assert {t.name for t in parts.terms} <= set(losses)
    if parts.adversary is not None:
        assert losses["loss_D"] != 0.0


def test_none_builds_nothing_and_needs_no_teacher():
    student = build_model("espnet_c", num_classes=19)
    ctx = method_context(student, None, num_classes=19, crop=(32, 32))
    parts = build_method("none", ctx)
    assert (parts.terms, parts.modules, parts.adversary, parts.task_weight) == ([], {}, None, None)

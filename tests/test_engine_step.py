"""The one training step (common/engine/step.py): PSP-lineage distillation (specs/ifvd_skd.md §A.4.6, cwd.md
§3.2d), named outputs, the D call order, per-group poly, step-dependent weights, named resumable state."""
import copy
import itertools

import pytest
import torch
import torch.nn as nn

from common.engine import Adversary, LRSchedule, PolySpec, Term, Trainer, TrainStep
from common.errors import UserError
from common.losses import adversarial
from common.losses.cwd import ChannelWiseDivergence
from common.methods.adversarial import build_d_optimizer
from common.models.discriminator import Discriminator
from common.recipes.psp import build_g_optimizer, task_term


class Toy(nn.Module):
    """A tiny PSP-like net: [logits (19), aux (19), feature (8)] at the input resolution, with BN + dropout."""

    output_names = ("logits", "aux", "feat")

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout2d(0.1))
        self.head = nn.Conv2d(8, 19, 1)
        self.aux = nn.Conv2d(8, 19, 1)

    def forward(self, x):
        f = self.body(x)
        return [self.head(f), self.aux(f), f]


def make_step(lambda_adv=0.001, adv_type="wgan-gp", with_d=True, seed=0, order="student_first", amp=None):
    torch.manual_seed(seed)
    student, teacher = Toy(), Toy()
    adapter = nn.Conv2d(8, 8, 1, bias=False)
    cwd = ChannelWiseDivergence("channel", "kl", 4.0)
    adversary = None
    if with_d:
        disc = Discriminator()
        adversary = Adversary(disc, build_d_optimizer(disc), 4e-4, adversarial, adv_type=adv_type,
                              lambda_adv=lambda_adv, order=order)
    return TrainStep(
        student, task=task_term(), teacher=teacher,
        terms=[Term("cwd", 3.0, cwd, ("s.logits", "t.logits")),
               Term("feat", 2.0, lambda fs, ft: ((adapter(fs) - ft) ** 2).mean(), ("s.feat", "t.feat"))],
        optimizer=build_g_optimizer(student, [adapter], lr=0.01), base_lr=0.01, device="cpu",
        modules={"adapter": adapter}, adversary=adversary, amp=amp)


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, 65, 65, generator=g)
    labels = torch.randint(0, 19, (2, 65, 65), generator=g).float()
    labels[:, :5] = 255
    return images, labels, None, None


def test_step_freezes_teacher_and_trains_student():
    step = make_step()
    teacher_before = copy.deepcopy(step.teacher.state_dict())
    student_before = copy.deepcopy(step.student.state_dict())
    out = step(batch(), 0)
    assert set(out) == {"loss_G", "mc", "cwd", "feat", "adv", "loss_D"}
    assert out["loss_G"] == pytest.approx(out["mc"] + out["cwd"] + out["feat"] + out["adv"], rel=1e-5)
    assert not step.teacher.training
    for key, value in step.teacher.state_dict().items():
        assert torch.equal(value, teacher_before[key]), key  # BN running stats too: eval mode
    assert all(p.grad is None and not p.requires_grad for p in step.teacher.parameters())
    assert any(not torch.equal(v, student_before[k]) for k, v in step.student.state_dict().items())


def test_weighted_terms_are_logged_multiplied():
    step = make_step(with_d=False)
    images, labels, _, _ = batch()
    with torch.no_grad():
        step.student.train()
        torch.manual_seed(5)
        s, t = step.student(images), step.teacher.eval()(images)
        expected = 3.0 * ChannelWiseDivergence("channel", "kl", 4.0)(s[0], t[0]).item()
    torch.manual_seed(5)
    out = step((images, labels), 0)
    assert out["cwd"] == pytest.approx(expected, rel=1e-5)
    assert out["adv"] == 0.0 and out["loss_D"] == 0.0


def test_d_step_uses_pre_update_outputs_and_drops_g_term_grads():
    """Same init, λ_adv 0.001 vs 1000: the students differ after the step, D's update does not."""
    small, large = make_step(lambda_adv=0.001), make_step(lambda_adv=1000.0)
    for step in (small, large):
        torch.manual_seed(7)
        step(batch(), 0)
    s_small, s_large = small.student.state_dict(), large.student.state_dict()
    assert any(not torch.allclose(s_small[k], s_large[k]) for k in s_small)
    d_small, d_large = small.adversary.discriminator.state_dict(), large.adversary.discriminator.state_dict()
    for key in d_small:
        assert torch.allclose(d_small[key], d_large[key], atol=1e-6), key


def test_one_d_step_per_g_step_and_poly_lr_on_group_zero():
    step = make_step()
    calls = {"G": 0, "D": 0}
    for name, opt in (("G", step.optimizer), ("D", step.adversary.optimizer)):
        original = opt.step

        def counted(*a, _name=name, _orig=original, **k):
            calls[_name] += 1
            return _orig(*a, **k)

        opt.step = counted
    data = iter([batch(i) for i in range(3)])
    Trainer(step, data, max_steps=3, hooks=[LRSchedule(step.poly_specs(), 3, power=0.9)]).train()
    assert calls == {"G": 3, "D": 3}
    assert step.optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * (1 - 2 / 3) ** 0.9)
    assert step.optimizer.param_groups[1]["lr"] == 0.01  # adapter group: never decayed (cwd.md §5.3)
    assert step.adversary.optimizer.param_groups[0]["lr"] == pytest.approx(4e-4 * (1 - 2 / 3) ** 0.9)


def test_hinge_has_no_gradient_penalty(monkeypatch):
    called = []
    monkeypatch.setattr(adversarial, "gradient_penalty", lambda *a: called.append(1) or torch.zeros(()))
    make_step(adv_type="hinge")(batch(), 0)
    assert called == []
    make_step(adv_type="wgan-gp")(batch(), 0)
    assert called == [1]


def test_optimizers_match_the_original():
    student, adapter, disc = Toy(), nn.Conv2d(8, 8, 1), Discriminator()
    g = build_g_optimizer(student, [adapter], lr=0.01)
    assert isinstance(g, torch.optim.SGD) and len(g.param_groups) == 2
    assert all(grp["momentum"] == 0.9 and grp["weight_decay"] == 5e-4 and grp["initial_lr"] == 0.01
               for grp in g.param_groups)
    d = build_d_optimizer(disc)
    assert isinstance(d, torch.optim.Adam) and d.param_groups[0]["betas"] == (0.9, 0.99)
    n_d = sum(p.numel() for grp in d.param_groups for p in grp["params"])
    assert n_d == sum(p.numel() for p in disc.parameters() if p.requires_grad)  # u/v vectors excluded
    s = build_d_optimizer(disc, "sgd", weight_decay=5e-4)
    assert isinstance(s, torch.optim.SGD) and s.param_groups[0]["weight_decay"] == 5e-4


def test_amp_step_losses_match_the_fp32_step_to_bf16_precision():
    outs = []
    for amp in (None, "bf16"):
        step = make_step(amp=amp)
        torch.manual_seed(7)
        outs.append(step(batch(), 0))
    fp32, mixed = outs
    assert set(mixed) == set(fp32) == {"loss_G", "mc", "cwd", "feat", "adv", "loss_D"}
    for name, value in fp32.items():
        assert mixed[name] == pytest.approx(value, rel=1e-2), name
    assert mixed["feat"] != fp32["feat"]  # the forwards really ran in bfloat16
    assert mixed["loss_G"] == pytest.approx(mixed["mc"] + mixed["cwd"] + mixed["feat"] + mixed["adv"], rel=1e-5)


# ---------------------------------------------------------------- named outputs, schedules, state (issue 9)
class NoAux(nn.Module):
    """A model whose output list has no aux entry (CIRKD's mobile students, cirkd.md §2.6)."""

    output_names = ("logits", "feat")

    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(3, 19, 1)

    def forward(self, x):
        return [self.head(x), x]


def test_a_term_naming_a_missing_output_is_refused_when_the_step_is_built():
    model = NoAux()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(UserError, match="student output 'aux', but the student has only logits, feat"):
        TrainStep(model, task=task_term(), optimizer=opt, base_lr=0.1, device="cpu")
    with pytest.raises(UserError, match="needs a teacher"):
        TrainStep(model, task=None, terms=[Term("kd", 1.0, lambda s, t: s.sum(), ("s.logits", "t.logits"))],
                  optimizer=opt, base_lr=0.1, device="cpu")


def test_term_weight_may_follow_the_step():
    """AICSD's adaptive weight (aicsd.md §4.4): the weight is a function of the 0-based step."""
    model = NoAux()
    weights = {0: 0.5, 1: 0.25}
    step = TrainStep(model, task=None, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), base_lr=0.0,
                     device="cpu", terms=[Term("ce", weights.__getitem__, lambda z: z.mean(), ("s.logits",))],
                     total_name="loss", log_adversarial=False)
    images = torch.ones(1, 3, 2, 2)
    with torch.no_grad():
        raw = model(images)[0].mean().item()
    for i in (0, 1):
        out = step((images, torch.zeros(1, 2, 2)), i)
        assert out["ce"] == pytest.approx(weights[i] * raw) and out["loss"] == pytest.approx(weights[i] * raw)


def test_poly_all_groups_follow_their_own_initial_lr():
    """AICSD trains the head at 10x the backbone lr (aicsd.md §6.1): poly scales each group's initial lr."""
    a, b = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [a], "initial_lr": 0.01}, {"params": [b], "initial_lr": 0.1}], lr=0.01)
    trainer = Trainer(lambda batch, i: {}, iter(range(10)), 10, start_step=0,
                      hooks=[LRSchedule([PolySpec("G", opt, 0.01, groups="all")], 10, power=0.9)])
    trainer.step = 4
    trainer.hooks[0].before_step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01 * (1 - 4 / 10) ** 0.9)
    assert opt.param_groups[1]["lr"] == pytest.approx(0.1 * (1 - 4 / 10) ** 0.9)


def test_epoch_batches_resume_in_the_middle_of_an_epoch():
    from common.engine import epoch_batches

    def make_loader(epoch, skip):
        return [(epoch, i) for i in range(skip, 3)]

    full = list(itertools.islice(epoch_batches(make_loader, 3), 7))
    resumed = list(itertools.islice(epoch_batches(make_loader, 3, start_step=4), 3))
    assert full == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0)] and resumed == full[4:]


def test_state_names_every_module_and_refuses_another_set():
    step = make_step()
    state = step.state_dict()
    assert sorted(state["modules"]) == ["D", "adapter", "student"] and sorted(state["optimizers"]) == ["D", "G"]
    without_d = make_step(with_d=False)
    with pytest.raises(UserError, match="it has D that this run does not"):
        without_d.load_state_dict(state)


def test_d_step_call_order_follows_the_original():
    """IFVD/CWD call D on the student first, SKD on the teacher first (issue 13 item 3): the spectral-norm
    power iteration makes the order visible in D's outputs."""
    calls = []
    for order in ("student_first", "teacher_first"):
        step = make_step(order=order)
        seen = []
        disc = step.adversary.discriminator
        disc.register_forward_pre_hook(lambda m, args, seen=seen: seen.append(args[0].detach().clone()))
        step(batch(), 0)
        calls.append(seen)
    s_first, t_first = calls
    # the first call is the G term on the student; then the D step: student, teacher or teacher, student
    assert torch.equal(s_first[1], s_first[0]) and not torch.equal(s_first[2], s_first[0])
    assert not torch.equal(t_first[1], t_first[0]) and torch.equal(t_first[2], t_first[0])

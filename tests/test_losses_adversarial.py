"""Adversarial criteria (specs/ifvd_skd.md §C.4) and the shared distillation step (§A.4.6, cwd.md §3.2d)."""
import copy

import pytest
import torch
import torch.nn as nn

from common.engine.distill import DistillStep, DistillTerm, build_d_optimizer, build_g_optimizer
from common.engine.trainer import LRSchedule, Trainer
from common.errors import UserError
from common.losses.adversarial import discriminator_loss, generator_loss, gradient_penalty
from common.losses.cwd import ChannelWiseDivergence
from common.losses.segmentation import CriterionDSN
from common.models.discriminator import Discriminator


def test_discriminator_loss_values():
    d_s, d_t = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 5.0])
    assert discriminator_loss(d_s, d_t, "wgan-gp").item() == pytest.approx(-2.5)
    hinge = discriminator_loss(torch.tensor([-2.0, 0.0]), torch.tensor([0.5, 2.0]), "hinge")
    assert hinge.item() == pytest.approx(0.75)
    assert discriminator_loss(torch.tensor([1.0, 3.0]), torch.tensor([2.0, 2.0]), "wgan-gp").item() == 0.0
    assert discriminator_loss(torch.tensor([-1.0, -4.0]), torch.tensor([1.0, 7.0]), "hinge").item() == 0.0


def test_generator_loss_is_minus_mean_for_both_types():
    d_s = torch.tensor([[0.5], [1.5]])
    assert generator_loss(d_s, "wgan-gp").item() == pytest.approx(-1.0)
    assert generator_loss(d_s, "hinge").item() == pytest.approx(-1.0)
    assert generator_loss(3 * d_s).item() == pytest.approx(3 * generator_loss(d_s).item())


def test_bad_inputs():
    with pytest.raises(UserError, match="adversarial loss type"):
        discriminator_loss(torch.zeros(2), torch.zeros(2), "lsgan")
    with pytest.raises(UserError, match="adversarial loss type"):
        generator_loss(torch.zeros(2), "wgan")
    with pytest.raises(ValueError, match="differ in shape"):
        discriminator_loss(torch.zeros(2, 1), torch.zeros(3, 1))


class LinearCritic(nn.Module):
    """D(x) = <w, x> per sample, so ∂ΣD/∂x_n = w for every sample."""

    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(w)

    def forward(self, x):
        return [(x * self.w).flatten(1).sum(1), None, None]


def test_gradient_penalty_values():
    w = torch.randn(1, 3, 4, 4)
    real, fake = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    assert gradient_penalty(LinearCritic(w / w.norm()), real, fake).item() == pytest.approx(0.0, abs=1e-10)
    assert gradient_penalty(LinearCritic(2 * w / w.norm()), real, fake).item() == pytest.approx(1.0, rel=1e-5)


def test_gradient_penalty_reaches_only_the_discriminator():
    torch.manual_seed(0)
    disc = Discriminator()
    real = torch.randn(2, 19, 65, 65, requires_grad=True)
    fake = torch.randn(2, 19, 65, 65, requires_grad=True)
    gp = gradient_penalty(disc, real, fake)
    assert gp.ndim == 0 and torch.isfinite(gp)
    gp.backward()
    assert real.grad is None and fake.grad is None
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in disc.parameters() if p.requires_grad)


class Toy(nn.Module):
    """A tiny PSP-like net: [logits (19), aux (19), feature (8)] at the input resolution, with BN + dropout."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout2d(0.1))
        self.head = nn.Conv2d(8, 19, 1)
        self.aux = nn.Conv2d(8, 19, 1)

    def forward(self, x):
        f = self.body(x)
        return [self.head(f), self.aux(f), f]


def make_step(lambda_adv=0.001, adv_type="wgan-gp", with_d=True, seed=0):
    torch.manual_seed(seed)
    student, teacher = Toy(), Toy()
    adapter = nn.Conv2d(8, 8, 1, bias=False)
    cwd = ChannelWiseDivergence("channel", "kl", 4.0)
    disc = Discriminator() if with_d else None
    return DistillStep(
        student, teacher, task_loss=CriterionDSN(),
        terms=[DistillTerm("cwd", 3.0, lambda s, t, y: cwd(s[0], t[0])),
               DistillTerm("feat", 2.0, lambda s, t, y: ((adapter(s[2]) - t[2]) ** 2).mean())],
        g_optimizer=build_g_optimizer(student, [adapter], lr=0.01), g_base_lr=0.01, device="cpu",
        extra_modules=[adapter], discriminator=disc, d_optimizer=build_d_optimizer(disc) if with_d else None,
        d_base_lr=4e-4, adv_type=adv_type, lambda_adv=lambda_adv)


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
    d_small, d_large = small.discriminator.state_dict(), large.discriminator.state_dict()
    for key in d_small:
        assert torch.allclose(d_small[key], d_large[key], atol=1e-6), key


def test_one_d_step_per_g_step_and_poly_lr_on_group_zero():
    step = make_step()
    calls = {"G": 0, "D": 0}
    for name, opt in (("G", step.g_optimizer), ("D", step.d_optimizer)):
        original = opt.step

        def counted(*a, _name=name, _orig=original, **k):
            calls[_name] += 1
            return _orig(*a, **k)

        opt.step = counted
    data = iter([batch(i) for i in range(3)])
    Trainer(step, data, max_steps=3, hooks=[LRSchedule(step.poly_specs(), 3, power=0.9)]).train()
    assert calls == {"G": 3, "D": 3}
    assert step.g_optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * (1 - 2 / 3) ** 0.9)
    assert step.g_optimizer.param_groups[1]["lr"] == 0.01  # adapter group: never decayed (cwd.md §5.3)
    assert step.d_optimizer.param_groups[0]["lr"] == pytest.approx(4e-4 * (1 - 2 / 3) ** 0.9)


def test_hinge_has_no_gradient_penalty(monkeypatch):
    import common.engine.distill as distill

    called = []
    monkeypatch.setattr(distill, "gradient_penalty", lambda *a: called.append(1) or torch.zeros(()))
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


def test_amp_step_is_finite_and_losses_fp32():
    step = make_step()
    step.amp = True
    out = step(batch(), 0)
    assert all(isinstance(v, float) and v == v and abs(v) < 1e6 for v in out.values())
    assert out["loss_D"] != 0.0

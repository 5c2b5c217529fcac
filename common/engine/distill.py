"""The PSP-lineage distillation step shared by SKD, IFVD and CWD (the originals' ``NetModel``).

specs/ifvd_skd.md §A.4.6 (IFVD update order), §B.4.5 (SKD), §C.3–C.4 (discriminator, adversarial
criteria), §C.7 (poly LR); specs/cwd.md §3.2 step d, §5.

One call ``step(batch, step_index) -> {name: float}`` (the ``step_fn`` of
:class:`common.engine.trainer.Trainer`) does, in this order:

1. images to the device, labels to int64;
2. teacher forward in eval mode under ``torch.no_grad()`` (running BN statistics, dropout off);
3. student forward in train mode (``extra_modules`` such as the CWD feature adapter also in train mode);
4. G step: ``G.zero_grad()``; ``L_G = task(preds_S, y) + Σ_m w_m·term_m(preds_S, preds_T, y)
   [+ λ_adv·(−mean D(adv_input(preds_S))[0])]`` with D **not** detached, so the adversarial gradient
   flows through D into the student; backward; ``G.step()``;
5. D step, only with a discriminator (one D update per G update, on the pre-update outputs):
   ``D.zero_grad()`` (drops the grads the G term left on D);
   ``L_D = λ_d·adv(D(s.detach()), D(t.detach())) [+ λ_d·λ_gp·GP]`` (GP for ``wgan-gp`` only, D called
   separately on teacher, student and interpolate, so its input BN sees each batch alone);
   backward; ``D.step()``.

Under torchrun every rank runs this on its shard of the batch and the gradients of G and D are
averaged over the ranks before each optimizer step (:func:`average_gradients`).

The learning rates are not set here: the trainer's :class:`~common.engine.trainer.LRSchedule` hook
does it before every step, from :meth:`DistillStep.poly_specs` (poly on ``param_groups[0]`` only;
extra groups such as CWD's adapter keep their initial lr, as in the original).

The returned dict holds ``loss_G`` (total), ``mc`` (task loss), every term under its name already
multiplied by its weight (as the originals log them), ``adv`` (λ_adv·G term, 0.0 without D) and
``loss_D`` (0.0 without D). Build the optimizers with :func:`build_g_optimizer` /
:func:`build_d_optimizer`; checkpoint with :meth:`DistillStep.state_models` and
:meth:`DistillStep.state_optimizers`.

Example (CWD on logits, specs/cwd.md §2.1)::

    cwd = ChannelWiseDivergence("channel", "kl", 4.0)
    step = DistillStep(student, teacher, task_loss=CriterionDSN(),
                       terms=[DistillTerm("cwd", 3.0, lambda s, t, y: cwd(s[0], t[0]))],
                       g_optimizer=build_g_optimizer(student, lr=0.01), g_base_lr=0.01, device=device)
    Trainer(step, batches, max_steps, hooks=[LRSchedule(step.poly_specs(), max_steps)]).train()
"""
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from common.engine.dist import is_distributed
from common.engine.lr import make_adam, make_sgd
from common.engine.trainer import PolySpec
from common.losses.adversarial import check_adv_type, discriminator_loss, generator_loss, gradient_penalty


@dataclass
class DistillTerm:
    """A weighted distillation loss ``weight * fn(student_outputs, teacher_outputs, labels)``.

    ``fn`` receives the two models' output lists and the int64 labels and returns a 0-dim tensor.
    """

    name: str
    weight: float
    fn: Callable


def build_g_optimizer(student, extra_modules=(), lr=0.01, momentum=0.9, weight_decay=5e-4):
    """The originals' ``G_solver``: SGD over the student's trainable parameters (group 0), each extra
    module (e.g. CWD's feature adapter) as one more group with the same lr, momentum and weight decay
    (specs/cwd.md §5.3). Every group carries ``initial_lr``."""
    extra = [{"params": [p for p in m.parameters() if p.requires_grad]} for m in extra_modules]
    return make_sgd(student.parameters(), lr, momentum=momentum, weight_decay=weight_decay, extra_groups=extra)


def build_d_optimizer(discriminator, kind="adam", lr=4e-4, betas=(0.9, 0.99), momentum=0.9, weight_decay=0.0):
    """The ``D_solver`` over D's trainable parameters (the spectral-norm u/v vectors are excluded).

    ``kind="adam"``: IFVD/CWD, Adam(lr, betas), no weight decay. ``kind="sgd"``: SKD, SGD(lr,
    momentum, weight_decay = G's) (specs/ifvd_skd.md §C.8).
    """
    if kind == "adam":
        return make_adam(discriminator.parameters(), lr, betas=betas, weight_decay=weight_decay)
    if kind == "sgd":
        return make_sgd(discriminator.parameters(), lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"build_d_optimizer: kind must be 'adam' or 'sgd', got {kind!r}")


def average_gradients(optimizer):
    """Average the gradients of ``optimizer``'s parameters over the ranks (no-op for one process).

    Plays the role of DDP's all-reduce for the student, the adapters and D; gradients come from a
    plain ``backward`` (D's gradient penalty needs double backward, which DDP does not support).
    """
    if not is_distributed():
        return
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def _score(output):
    return output[0] if isinstance(output, (list, tuple)) else output


def _first(outputs):
    return outputs[0]


class DistillStep:
    """Student + frozen teacher (+ optional discriminator) and one optimisation step; see the module doc.

    Args:
        student, teacher: the two networks (output lists). The teacher is put in eval mode and its
            parameters get ``requires_grad=False`` here.
        task_loss: ``task_loss(preds_S, labels)``, e.g. :class:`common.losses.segmentation.CriterionDSN`.
        terms: the weighted distillation terms (:class:`DistillTerm`).
        g_optimizer, g_base_lr: the G solver and its base lr (for :meth:`poly_specs`).
        device: where batches go.
        extra_modules: trainable modules used by the terms (put in train mode every step, saved
            with the student's state).
        discriminator, d_optimizer, d_base_lr: the adversarial part; without a discriminator no
            adversarial term and no D step. A discriminator that is built but unused (CWD/IFVD
            ``--adv False``) is simply not passed here.
        adv_type: ``"wgan-gp"`` (gradient penalty) or ``"hinge"`` (no penalty).
        lambda_adv: weight of the G-side adversarial term (IFVD/CWD 0.001, SKD 0.1).
        lambda_d, lambda_gp: D-loss weight and GP weight (the GP is multiplied by both).
        adv_input: picks the tensor D sees from a model's output list (default: the logits, ``[0]``).
        amp: autocast the forwards (bf16 on CPU, fp16 + GradScaler on CUDA); losses run in fp32
            and the D step stays in fp32.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, *, task_loss: Callable,
                 terms: Sequence[DistillTerm] = (), g_optimizer: torch.optim.Optimizer, g_base_lr: float,
                 device, extra_modules: Sequence[nn.Module] = (), discriminator: Optional[nn.Module] = None,
                 d_optimizer: Optional[torch.optim.Optimizer] = None, d_base_lr: float = 4e-4,
                 adv_type: str = "wgan-gp", lambda_adv: float = 0.001, lambda_d: float = 0.1,
                 lambda_gp: float = 10.0, adv_input: Callable = _first, amp: bool = False):
        if discriminator is not None and d_optimizer is None:
            raise ValueError("DistillStep: a discriminator needs its d_optimizer")
        self.student = student
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.task_loss = task_loss
        self.terms = list(terms)
        self.extra_modules = list(extra_modules)
        self.g_optimizer = g_optimizer
        self.g_base_lr = g_base_lr
        self.discriminator = discriminator
        self.d_optimizer = d_optimizer
        self.d_base_lr = d_base_lr
        self.adv_type = check_adv_type(adv_type)
        self.lambda_adv = lambda_adv
        self.lambda_d = lambda_d
        self.lambda_gp = lambda_gp
        self.adv_input = adv_input
        self.device = torch.device(device)
        self.amp = amp
        amp_cuda = amp and self.device.type == "cuda"
        self.autocast_dtype = torch.float16 if amp_cuda else torch.bfloat16
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp_cuda)

    def poly_specs(self):
        """:class:`PolySpec` s for the trainer's LRSchedule: G (and D) on ``param_groups[0]`` only."""
        specs = [PolySpec("G", self.g_optimizer, self.g_base_lr, groups="first")]
        if self.d_optimizer is not None:
            specs.append(PolySpec("D", self.d_optimizer, self.d_base_lr, groups="first"))
        return specs

    def state_models(self):
        """Models to checkpoint for resume: student, extra modules (``extra0``, ...), discriminator."""
        models = {"student": self.student}
        models.update({f"extra{i}": m for i, m in enumerate(self.extra_modules)})
        if self.discriminator is not None:
            models["D"] = self.discriminator
        return models

    def state_optimizers(self):
        """Optimizers (and the AMP scaler when active) to checkpoint for resume."""
        optimizers = {"G": self.g_optimizer}
        if self.d_optimizer is not None:
            optimizers["D"] = self.d_optimizer
        if self.scaler.is_enabled():
            optimizers["scaler"] = self.scaler
        return optimizers

    def _autocast(self):
        if not self.amp:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def __call__(self, batch, step):
        images, labels = batch[0], batch[1]
        images = images.to(self.device, non_blocking=True).float()
        labels = labels.to(self.device, non_blocking=True).long()

        self.teacher.eval()
        with torch.no_grad(), self._autocast():
            preds_t = self.teacher(images)
        self.student.train()
        for m in self.extra_modules:
            m.train()
        with self._autocast():
            preds_s = self.student(images)

        self.g_optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            task = self.task_loss(preds_s, labels)
            losses = {"mc": task}
            total = task
            for term in self.terms:
                value = term.weight * term.fn(preds_s, preds_t, labels)
                losses[term.name] = value
                total = total + value
            if self.discriminator is not None:
                adv = self.lambda_adv * generator_loss(_score(self.discriminator(self.adv_input(preds_s))),
                                                       self.adv_type)
                losses["adv"] = adv
                total = total + adv
        self.scaler.scale(total).backward()
        average_gradients(self.g_optimizer)
        self.scaler.step(self.g_optimizer)
        self.scaler.update()

        out = {"loss_G": total.item(), **{k: v.item() for k, v in losses.items()}}
        out.setdefault("adv", 0.0)
        out["loss_D"] = self._d_step(preds_s, preds_t) if self.discriminator is not None else 0.0
        return out

    def _d_step(self, preds_s, preds_t):
        """One D update on the pre-update outputs (specs/ifvd_skd.md §A.4.6 step 3, §C.4)."""
        real = self.adv_input(preds_t).detach().float()
        fake = self.adv_input(preds_s).detach().float()
        self.d_optimizer.zero_grad(set_to_none=True)
        d_t = _score(self.discriminator(real))
        d_s = _score(self.discriminator(fake))
        loss = self.lambda_d * discriminator_loss(d_s, d_t, self.adv_type)
        if self.adv_type == "wgan-gp":
            loss = loss + self.lambda_d * self.lambda_gp * gradient_penalty(self.discriminator, real, fake)
        loss.backward()
        average_gradients(self.d_optimizer)
        self.d_optimizer.step()
        return loss.item()

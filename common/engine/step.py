"""One training step for every trainer of the suite: supervised training is distillation with no teacher.

specs/ifvd_skd.md §A.4.6 (IFVD update order), §B.4.5 (SKD), §C.3–C.4 (discriminator, adversarial criteria);
specs/cwd.md §3.2 step d; specs/cirkd.md §1.3 (terms switched on by their weights); specs/aicsd.md §4.4
(a weight that changes with the epoch).

``TrainStep(batch, step_index) -> {name: float}`` (the ``step_fn`` of :class:`~common.engine.trainer.Trainer`):

1. images to the device, labels to int64;
2. teacher forward (eval mode unless ``teacher_train``, always under ``torch.no_grad()``);
3. student forward in train mode (the extra ``modules`` — adapters, projection heads — also in train mode);
4. G step: ``L_G = w_task·task + Σ_m w_m·term_m [+ λ_adv·G-adversarial]``; the adversarial gradient flows
   through D into the student (D is not detached); backward; gradients averaged over the ranks; ``G.step()``;
5. D step with an :class:`Adversary` (one D update per G update, on the pre-update outputs, D called on the
   two detached inputs in the order of the original).

A non-finite ``L_G`` (or D loss) on any rank raises :class:`~common.errors.NonFiniteLoss` before that update
(:func:`finite_loss`): the parameters stay those of the last finite step and the step's hooks (saves) never run.

Model outputs are picked **by name**: a model declares ``output_names`` for the list it returns, and the task
loss and each :class:`Term` name the tensors they read (``"s.logits"``, ``"t.feat"``, ``"labels"``). A term
that names an output its model does not have is refused when the step is built, never computed on another
tensor.

Mixed precision (one rule for every trainer): off by default; ``amp="bf16"`` or ``"fp16"`` autocasts the
forwards (fp16 with a GradScaler, CUDA only); the losses and the D step always run in fp32.

Gradient synchronisation (one rule): under torchrun every rank runs the step on its shard and the gradients of
every optimizer are averaged over the ranks before its step (:func:`average_gradients`), as DDP would; a plain
``backward`` keeps double backward (the WGAN-GP penalty) possible.
"""
import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
import torch.distributed as dist
import torch.nn as nn

from common.engine.dist import is_distributed
from common.engine.trainer import PolySpec
from common.errors import NonFiniteLoss, UserError
from common.numerics import AMP_DTYPES, compute_dtype, full_precision
from common.outputs import first_output

Weight = Union[float, Callable[[int], float]]


class NamedOutputs:
    """A model's output list with the names its model declares (``model.output_names``)."""

    def __init__(self, values, names, owner):
        values = list(values) if isinstance(values, (list, tuple)) else [values]
        if len(values) != len(names):
            raise ValueError(f"{owner} returned {len(values)} outputs but declares {len(names)} ({', '.join(names)})")
        self.values = values
        self.names = tuple(names)
        self.owner = owner

    def __getitem__(self, name):
        try:
            return self.values[self.names.index(name)]
        except ValueError:
            raise KeyError(f"{self.owner} has no output {name!r}; its outputs are {', '.join(self.names)}") from None


def output_names(model, owner):
    """The declared output names of ``model`` (its ``output_names``); a model without them is refused."""
    names = getattr(model, "output_names", None)
    if names is None and hasattr(model, "module"):
        names = getattr(model.module, "output_names", None)
    if not names:
        raise TypeError(f"the {owner} ({type(model).__name__}) declares no output_names")
    return tuple(names)


@dataclass
class Term:
    """``weight · fn(*inputs)``: a weighted loss on named tensors.

    ``inputs`` name what ``fn`` receives, in order: ``"s.<output>"`` (student), ``"t.<output>"`` (teacher) or
    ``"labels"`` (int64). ``weight`` is a number or a function of the 0-based step (e.g. AICSD's adaptive
    weight through the epoch of the step). The step logs the weighted value (as the PSP lineage's logs) or,
    with ``log_weighted=False``, the raw one (SKD's ESPNet trainer).
    """

    name: str
    weight: Weight
    fn: Callable
    inputs: Sequence[str] = ("s.logits", "t.logits")
    log_weighted: bool = True

    def weight_at(self, step):
        return self.weight(step) if callable(self.weight) else self.weight


@dataclass
class Adversary:
    """The discriminator part of a step (specs/ifvd_skd.md §C.3–C.4; cirkd.md §3.7).

    ``input``: the output name D sees (the logits). ``lambda_adv`` weights the G term ``-mean D(s)``,
    ``lambda_d`` the D loss (and, times ``lambda_gp``, the WGAN-GP penalty). ``order`` is the original's call
    order in the D step: ``"student_first"`` (IFVD, CWD) or ``"teacher_first"`` (SKD). ``poly=False`` keeps the
    D lr constant (CIRKD's baselines). ``losses`` provides ``generator_loss(d_s, adv_type)``,
    ``discriminator_loss(d_s, d_t, adv_type)`` and ``gradient_penalty(D, real, fake)`` (passed in: the engine
    knows no loss module).
    """

    discriminator: nn.Module
    optimizer: torch.optim.Optimizer
    base_lr: float
    losses: object
    adv_type: str = "wgan-gp"
    lambda_adv: float = 0.001
    lambda_d: float = 0.1
    lambda_gp: float = 10.0
    input: str = "logits"
    order: str = "student_first"
    poly: bool = True
    name: str = "D"

    def __post_init__(self):
        if self.order not in ("student_first", "teacher_first"):
            raise ValueError(f"Adversary: order must be 'student_first' or 'teacher_first', got {self.order!r}")


def average_gradients(optimizer):
    """Average the gradients of ``optimizer``'s parameters over the ranks (no-op for one process)."""
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


def finite_loss(total, terms, total_name, step):
    """``total.item()``, checked before the update (issue 18 item 7): a nan/inf loss on any rank raises
    :class:`NonFiniteLoss` on every rank at the same step (one all-reduce under torchrun, so no rank waits at the
    next collective), naming the 0-based ``step`` (metrics.jsonl's) and the non-finite ``terms`` (the weighted
    summands of ``total`` by name)."""
    value = total.item()
    local = not math.isfinite(value)
    anywhere = local
    if is_distributed():
        count = torch.tensor([float(local)], dtype=torch.float64, device=total.device)
        dist.all_reduce(count)
        anywhere = count.item() > 0
    if not anywhere:
        return value
    rank = dist.get_rank() if is_distributed() else None
    if local:
        bad = [f"{name}={v.item()}" for name, v in terms.items() if not math.isfinite(v.item())]
        where = (f" on rank {rank}" if rank is not None else "") + ": " + ", ".join(bad or [f"{total_name}={value}"])
    else:
        where = f" on another rank than this rank {rank}"
    raise NonFiniteLoss(f"the training loss became non-finite at step {step} (0-based, as in metrics.jsonl){where}; "
                        "lower the learning rate or the loss weights (the checkpoints written before this step are "
                        "kept)")


def _check_inputs(owner, inputs, student_names, teacher_names):
    for spec in inputs:
        if spec == "labels":
            continue
        who, _, name = spec.partition(".")
        if who not in ("s", "t") or not name:
            raise ValueError(f"{owner}: input {spec!r} must read 's.<output>', 't.<output>' or 'labels'")
        if who == "t" and teacher_names is None:
            raise UserError(f"{owner} needs a teacher, but this run has none")
        names = student_names if who == "s" else teacher_names
        if name not in names:
            model = "student" if who == "s" else "teacher"
            raise UserError(f"{owner} needs the {model} output {name!r}, but the {model} has only "
                            f"{', '.join(names)}; switch that term off or use a {model} with that output")


class TrainStep:
    """Student (+ frozen teacher, weighted terms, extra modules, adversary) and one optimisation step.

    Args:
        student: the trained network (declares ``output_names``).
        task: the task loss as a :class:`Term` (e.g. ``Term("mc", 1.0, dsn, ("s.logits", "s.aux", "labels"))``),
            logged unweighted; its weight may depend on the step (AICSD's ALW). None: the loss is the terms alone.
        optimizer: the G optimizer (student, extra modules); ``base_lr`` for the poly schedule;
            ``poly_groups``: "first" (the PSP lineage: only param_groups[0]) or "all" (each group's own
            ``initial_lr``, e.g. AICSD's 10x head).
        device: where batches go.
        teacher: optional, put in eval mode (``teacher_train=True``: train mode, AICSD's faithful default) and
            frozen (``requires_grad=False``); always run under ``no_grad``, on ``teacher_input(images)`` when
            given (a teacher trained with another normalisation).
        terms: the distillation :class:`Term` s, summed in order after the task loss.
        modules: extra trainable modules by name (adapters, projection heads), in train mode every step and
            part of the resumable state under their names.
        adversary: an :class:`Adversary`, or None (no adversarial term, no D step).
        amp: None, "bf16" or "fp16" (:func:`resolve_amp`).
        total_name: the log name of the total loss ("loss_G" in the PSP lineage's logs, "loss" for baselines).
        log_adversarial: always report ``adv`` and ``loss_D`` (0.0 without an adversary), as the originals' log
            lines print them.
    """

    def __init__(self, student: nn.Module, *, task: Optional[Term], optimizer: torch.optim.Optimizer,
                 base_lr: float, device,
                 teacher: Optional[nn.Module] = None, terms: Sequence[Term] = (), modules: Optional[dict] = None,
                 adversary: Optional[Adversary] = None, amp: Optional[str] = None, teacher_train: bool = False,
                 teacher_input: Optional[Callable] = None, poly_groups: str = "first", total_name: str = "loss_G",
                 log_adversarial: bool = True):
        self.student = student
        self.teacher = teacher
        self.task = task
        self.terms = list(terms)
        self.modules = dict(modules or {})
        self.optimizer = optimizer
        self.base_lr = base_lr
        self.adversary = adversary
        self.device = torch.device(device)
        self.teacher_train = teacher_train
        self.teacher_input = teacher_input
        self.poly_groups = poly_groups
        self.total_name = total_name
        self.log_adversarial = log_adversarial
        if amp not in (None, *AMP_DTYPES):
            raise ValueError(f"TrainStep: amp must be None, 'bf16' or 'fp16', got {amp!r}")
        self.amp = amp
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16")
        reserved = {"student", "teacher", adversary.name if adversary else None}
        clash = reserved & set(self.modules)
        if clash:
            raise ValueError(f"TrainStep: module names {sorted(clash)} are reserved")
        s_names = output_names(student, "student")
        t_names = output_names(teacher, "teacher") if teacher is not None else None
        for term in [t for t in (task, *self.terms) if t is not None]:
            _check_inputs(f"loss term {term.name!r}", term.inputs, s_names, t_names)
        if adversary is not None:
            _check_inputs("the adversarial term", [f"s.{adversary.input}"], s_names, s_names)
            if teacher is not None:
                _check_inputs("the adversarial term", [f"t.{adversary.input}"], s_names, t_names)
        self.s_names, self.t_names = s_names, t_names
        if teacher is not None:
            for p in teacher.parameters():
                p.requires_grad_(False)

    # ------------------------------------------------------------------ schedule and state
    def poly_specs(self):
        """:class:`PolySpec` s for the trainer's LRSchedule: G, and D unless its lr stays constant."""
        specs = [PolySpec("G", self.optimizer, self.base_lr, groups=self.poly_groups)]
        if self.adversary is not None and self.adversary.poly:
            specs.append(PolySpec(self.adversary.name, self.adversary.optimizer, self.adversary.base_lr,
                                  groups="first"))
        return specs

    def named_modules_to_save(self):
        """The trainable modules by name: ``student``, each extra module, the discriminator."""
        named = {"student": self.student, **self.modules}
        if self.adversary is not None:
            named[self.adversary.name] = self.adversary.discriminator
        return named

    def named_optimizers(self):
        """``G`` (and the discriminator's optimizer under its name)."""
        named = {"G": self.optimizer}
        if self.adversary is not None:
            named[self.adversary.name] = self.adversary.optimizer
        return named

    def state_dict(self):
        """Named modules, named optimizers and the GradScaler (the step's share of the resumable state)."""
        state = {"modules": {name: _unwrap(m).state_dict() for name, m in self.named_modules_to_save().items()},
                 "optimizers": {name: o.state_dict() for name, o in self.named_optimizers().items()}}
        if self.scaler.is_enabled():
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state, source="the resume state"):
        """Restore :meth:`state_dict`; a state with other modules or optimizers is refused by name."""
        for kind, given in (("modules", self.named_modules_to_save()), ("optimizers", self.named_optimizers())):
            saved = set(state.get(kind, {}))
            if saved != set(given):
                only_saved, only_here = sorted(saved - set(given)), sorted(set(given) - saved)
                parts = ([f"it has {', '.join(only_saved)} that this run does not"] if only_saved else []) + \
                        ([f"this run has {', '.join(only_here)} that it does not"] if only_here else [])
                raise UserError(f"{source} was written with other {kind}: {'; '.join(parts)}; resume with the "
                                "flags of the run that wrote it")
        for name, module in self.named_modules_to_save().items():
            try:
                _unwrap(module).load_state_dict(state["modules"][name])
            except RuntimeError as err:
                detail = " ".join(str(err).split())[:300]
                raise UserError(f"{source}: module '{name}' does not match ({detail}); resume with the same "
                                "model and flags") from err
        for name, optimizer in self.named_optimizers().items():
            try:
                optimizer.load_state_dict(state["optimizers"][name])
            except (ValueError, KeyError) as err:
                raise UserError(f"{source}: optimizer '{name}' does not match ({err})") from err
        if self.scaler.is_enabled() and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])

    # ------------------------------------------------------------------ the step
    def _autocast(self):
        if self.amp is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=AMP_DTYPES[self.amp])

    def _pick(self, term, s, t, labels):
        picked = []
        for spec in term.inputs:
            if spec == "labels":
                picked.append(labels)
            else:
                who, _, name = spec.partition(".")
                picked.append(full_precision((s if who == "s" else t)[name]))
        return picked

    def __call__(self, batch, step):
        images = batch[0].to(self.device, compute_dtype(), non_blocking=True)
        labels = batch[1].to(self.device, non_blocking=True).long()

        t = None
        if self.teacher is not None:
            self.teacher.train(self.teacher_train)
            with torch.no_grad(), self._autocast():
                t_images = images if self.teacher_input is None else self.teacher_input(images)
                t = NamedOutputs(self.teacher(t_images), self.t_names, "the teacher")
        self.student.train()
        for module in self.modules.values():
            module.train()
        with self._autocast():
            s = NamedOutputs(self.student(images), self.s_names, "the student")

        self.optimizer.zero_grad(set_to_none=True)
        total, losses, weighted = None, {}, {}
        if self.task is not None:
            task = self.task.fn(*self._pick(self.task, s, t, labels))
            weight = self.task.weight_at(step)
            total = weighted[self.task.name] = task if weight == 1 else weight * task
            losses[self.task.name] = task
        for term in self.terms:
            raw = term.fn(*self._pick(term, s, t, labels))
            value = weighted[term.name] = term.weight_at(step) * raw
            losses[term.name] = value if term.log_weighted else raw
            total = value if total is None else total + value
        adversary = self.adversary
        if adversary is not None:
            d_s = first_output(adversary.discriminator(full_precision(s[adversary.input])))
            adv = adversary.lambda_adv * adversary.losses.generator_loss(d_s, adversary.adv_type)
            losses["adv"] = weighted["adv"] = adv
            total = total + adv
        out = {self.total_name: finite_loss(total, weighted, self.total_name, step)}
        self.scaler.scale(total).backward()
        average_gradients(self.optimizer)
        self.scaler.step(self.optimizer)
        self.scaler.update()

        out.update({name: value.item() for name, value in losses.items()})
        if adversary is not None:
            out["loss_D"] = self._d_step(s, t, step)
        elif self.log_adversarial:
            out.setdefault("adv", 0.0)
            out["loss_D"] = 0.0
        return out

    def _d_step(self, s, t, step):
        """One D update on the pre-update outputs (specs/ifvd_skd.md §A.4.6 step 3, §C.4)."""
        adversary = self.adversary
        disc, losses = adversary.discriminator, adversary.losses
        real = full_precision(t[adversary.input].detach())
        fake = full_precision(s[adversary.input].detach())
        adversary.optimizer.zero_grad(set_to_none=True)
        if adversary.order == "teacher_first":
            d_t = first_output(disc(real))
            d_s = first_output(disc(fake))
        else:
            d_s = first_output(disc(fake))
            d_t = first_output(disc(real))
        loss = adversary.lambda_d * losses.discriminator_loss(d_s, d_t, adversary.adv_type)
        parts = {"discriminator loss": loss}
        if adversary.adv_type == "wgan-gp":
            parts["gradient penalty"] = adversary.lambda_d * adversary.lambda_gp * losses.gradient_penalty(
                disc, real, fake)
            loss = loss + parts["gradient penalty"]
        value = finite_loss(loss, parts, "loss_D", step)
        loss.backward()
        average_gradients(adversary.optimizer)
        adversary.optimizer.step()
        return value


def _unwrap(model):
    """The module inside DistributedDataParallel/DataParallel, so keys carry no ``module.`` prefix."""
    return model.module if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model

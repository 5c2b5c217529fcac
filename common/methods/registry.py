"""The catalogue of distillation methods: registry, context of a pair, weights and presets (DESIGN.md, Layout).

A method is a function ``fn(ctx, p) -> Built`` registered with :func:`register_method`: ``ctx`` is the
:class:`MethodContext` of a teacher/student pair, ``p`` the resolved parameters (weights and options) of the
chosen preset. :func:`build_method` builds one method or a ``+`` combination into a :class:`MethodParts`
(engine :class:`~common.engine.step.Term` s, the trainable modules they own, an optional
:class:`~common.engine.step.Adversary` with its optimizer, a task-loss weight).

Pair rules (one place, every method): a term that reads an output the network lacks is a
:class:`~common.errors.UserError` naming the method, the network and the output; a teacher map of another
spatial size than the student's map it is compared with is resized to the student's size (bilinear,
``align_corners=False``) at every step — pairs of equal sizes (every paper entry point) are untouched; channel
mismatches are handled by the method (its adapter, or refused); the adversary needs student and teacher logits
of at least 64×64 and of one size.
"""
import math
from dataclasses import dataclass, field, replace
from types import SimpleNamespace
from typing import Callable, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.engine.step import Adversary, Term, output_names
from common.errors import UserError
from common.models.norm import BN_NORMS, norm_layer

__all__ = ["Built", "MethodContext", "MethodParts", "build_method", "list_methods", "method_context",
           "method_info", "method_params", "register_method", "relabel"]

D_INPUT = 64  # the SAGAN discriminator's four stride-2 convs and final 4x4 conv need logits of at least 64x64

_METHODS = {}


@dataclass(frozen=True)
class MethodContext:
    """What a method may know of a pair: output names with ``(channels, h, w)`` at ``crop`` (one dummy forward),
    classes, ignore index, the norm layer name, the schedule (``total_steps``, ``steps_per_epoch``)."""

    student_name: str
    teacher_name: Optional[str]
    student_outputs: dict
    teacher_outputs: Optional[dict]
    num_classes: int
    ignore_index: int
    norm: str
    total_steps: Optional[int]
    steps_per_epoch: Optional[int]
    crop: tuple
    device: torch.device = torch.device("cpu")

    def outputs(self, who):
        return self.student_outputs if who == "s" else self.teacher_outputs

    def shape(self, spec):
        """``(channels, h, w)`` of ``"s.<name>"`` / ``"t.<name>"``."""
        who, _, name = spec.partition(".")
        return self.outputs(who)[name]

    def network(self, who):
        return f"the student {self.student_name}" if who == "s" else f"the teacher {self.teacher_name}"


@dataclass
class MethodParts:
    """What :func:`build_method` returns (see the module docstring)."""

    terms: list
    modules: dict
    adversary: Optional[Adversary]
    task_weight: Optional[Union[float, Callable[[int], float]]]
    params: dict


@dataclass
class Built:
    """What one method function returns; ``adversary`` is a function of no argument building the
    :class:`Adversary` (called after every method's modules are built, the originals' construction order)."""

    terms: list = field(default_factory=list)
    modules: dict = field(default_factory=dict)
    adversary: Optional[Callable[[], Adversary]] = None
    task_weight: Optional[Union[float, Callable[[int], float]]] = None


@dataclass(frozen=True)
class MethodSpec:
    name: str
    fn: Callable
    paper: str
    spec: str
    presets: dict
    choices: dict
    weights: tuple
    needs: str


def register_method(name, *, paper, spec, defaults, presets=None, choices=None, weights=(), needs=""):
    """Register ``fn(ctx, p) -> Built`` as method ``name`` (decorator).

    ``defaults``: the parameters and their values in the method's own paper (preset "default"); ``presets``:
    other named parameter sets, given as changes to the defaults; ``choices``: the allowed values of string
    options; ``weights``: the parameters that are term weights (0 builds nothing); ``needs``: what the method
    needs from a pair, for the README table.
    """
    def wrap(fn):
        if name in _METHODS:
            raise ValueError(f"method {name!r} is registered twice")
        resolved = {"default": dict(defaults)}
        for preset, changes in (presets or {}).items():
            unknown = set(changes) - set(defaults)
            if unknown:
                raise ValueError(f"method {name!r} preset {preset!r} sets unknown parameters {sorted(unknown)}")
            resolved[preset] = {**defaults, **changes}
        _METHODS[name] = MethodSpec(name, fn, paper, spec, resolved, dict(choices or {}), tuple(weights), needs)
        return fn

    return wrap


def list_methods():
    """The registered method names, sorted."""
    return sorted(_METHODS)


def _spec(name):
    if name not in _METHODS:
        raise UserError(f"unknown distillation method {name!r}; choose one of: {', '.join(list_methods())} "
                        "(combine them with '+')")
    return _METHODS[name]


def method_params(name):
    """``{preset: {param: default}}`` of method ``name`` ("default" is the method's own paper)."""
    return {preset: dict(params) for preset, params in _spec(name).presets.items()}


def method_info(name):
    """``(paper, spec section, weight names, needs)`` of method ``name`` (the README table)."""
    spec = _spec(name)
    return spec.paper, spec.spec, spec.weights, spec.needs


# ------------------------------------------------------------------------------------------------ context
def _describe(model, owner, crop):
    """``{output name: (channels, h, w)}`` from one forward of a zero image at ``crop`` in eval mode under
    ``no_grad``; the model's mode is restored (eval mode: no running statistic changes)."""
    names = output_names(model, owner)
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, 3, *crop, device=device))
    finally:
        model.train(was_training)
    out = list(out) if isinstance(out, (list, tuple)) else [out]
    return {name: tuple(t.shape[1:]) for name, t in zip(names, out)}


def method_context(student, teacher, *, num_classes, ignore_index=255, norm="batchnorm", total_steps=None,
                   steps_per_epoch=None, crop=(512, 512), student_name=None, teacher_name=None):
    """The :class:`MethodContext` of a pair (``teacher=None``: only methods without teacher terms build)."""
    crop = tuple(int(c) for c in crop)
    return MethodContext(
        student_name=student_name or type(student).__name__,
        teacher_name=(teacher_name or type(teacher).__name__) if teacher is not None else None,
        student_outputs=_describe(student, "student", crop),
        teacher_outputs=_describe(teacher, "teacher", crop) if teacher is not None else None,
        num_classes=int(num_classes), ignore_index=ignore_index, norm=norm, total_steps=total_steps,
        steps_per_epoch=steps_per_epoch, crop=crop, device=next(student.parameters()).device)


# ------------------------------------------------------------------------------------------------ pair rules
def require(ctx, method, *specs):
    """Refuse a method whose inputs (``"s.<name>"``, ``"t.<name>"``) the pair does not have."""
    for spec in specs:
        if spec == "labels":
            continue
        who, _, name = spec.partition(".")
        outputs = ctx.outputs(who)
        if outputs is None:
            raise UserError(f"method {method!r} needs a teacher, but this run has none; pass a teacher or use "
                            "method 'none'")
        if name not in outputs:
            raise UserError(f"method {method!r} needs the output {name!r} of {ctx.network(who)}, which has only "
                            f"{', '.join(outputs)}; choose a network with it or set the method's feature option "
                            "to one of those outputs")


def resize_to(x, size):
    """``x`` resized to ``size`` (bilinear, ``align_corners=False``) when its spatial size differs."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def match_teacher(ctx, fn, inputs):
    """``fn`` with the i-th teacher input resized to the spatial size of the i-th student input when the pair's
    sizes differ there (module docstring); ``fn`` itself when they agree."""
    students = [i for i, spec in enumerate(inputs) if spec.startswith("s.")]
    teachers = [i for i, spec in enumerate(inputs) if spec.startswith("t.")]
    resize = [(t, s) for s, t in zip(students, teachers) if ctx.shape(inputs[s])[1:] != ctx.shape(inputs[t])[1:]]
    if not resize:
        return fn

    def resized(*args):
        args = list(args)
        for t, s in resize:
            args[t] = resize_to(args[t], args[s].shape[2:])
        return fn(*args)

    return resized


def term(ctx, method, name, weight, fn, inputs):
    """A :class:`Term` ``name`` of ``method`` on ``inputs`` after :func:`require`, through :func:`match_teacher`."""
    require(ctx, method, *inputs)
    return Term(name, weight, match_teacher(ctx, fn, inputs), tuple(inputs))


def same_channels(ctx, method, s_spec, t_spec):
    """Refuse maps compared channel by channel whose channel counts differ (no adapter in the method)."""
    require(ctx, method, s_spec, t_spec)
    c_s, c_t = ctx.shape(s_spec)[0], ctx.shape(t_spec)[0]
    if c_s != c_t:
        raise UserError(f"method {method!r} compares {s_spec} ({c_s} channels) of {ctx.network('s')} with "
                        f"{t_spec} ({c_t} channels) of {ctx.network('t')} channel by channel and has no adapter; "
                        "use networks with the same channels there")


def check_adversary_input(ctx, method):
    """The discriminator's input: student and teacher logits of one size, at least 64×64 (specs/ifvd_skd.md
    §C.3, cirkd.md §3.7)."""
    require(ctx, method, "s.logits", "t.logits")
    s_size, t_size = ctx.shape("s.logits")[1:], ctx.shape("t.logits")[1:]
    if min(s_size) < D_INPUT:
        raise UserError(f"method {method!r}: the discriminator needs logits of at least {D_INPUT}x{D_INPUT}, but "
                        f"{ctx.network('s')} gives {s_size[0]}x{s_size[1]} at crop {ctx.crop[0]}x{ctx.crop[1]}; "
                        f"use a larger crop or set {method}.adv=0 and {method}.d=0")
    if s_size != t_size:
        raise UserError(f"method {method!r}: the discriminator needs student and teacher logits of one size, but "
                        f"{ctx.network('s')} gives {s_size[0]}x{s_size[1]} and {ctx.network('t')} "
                        f"{t_size[0]}x{t_size[1]}; set {method}.adv=0 and {method}.d=0")


def bn_layer(ctx):
    """The plain-BN layer of a method's own module (discriminator input, CIRKD's projection head): the pair's norm
    when it is ``batchnorm``/``syncbn`` (CIRKD), else ``nn.BatchNorm2d`` (the In-Place ABN pairs)."""
    return norm_layer(ctx.norm, choices=BN_NORMS) if ctx.norm in BN_NORMS else nn.BatchNorm2d


class PairOfTerms:
    """Two terms of one call (``MemoryContrast`` -> (p2p, p2r), ``DSD`` -> (psd, csd)): ``first`` computes both,
    ``second`` returns the other value of the same call; with only one of them on, ``single(index)``."""

    def __init__(self, fn):
        self.fn = fn
        self.inputs, self.values = None, None

    def first(self, *inputs):
        self.inputs, self.values = inputs, self.fn(*inputs)
        return self.values[0]

    def second(self, *inputs):
        if self.inputs is None or any(a is not b for a, b in zip(inputs, self.inputs)):
            raise RuntimeError("PairOfTerms.second must follow first on the same tensors")
        value, self.inputs, self.values = self.values[1], None, None
        return value

    def single(self, index):
        return lambda *inputs: self.fn(*inputs)[index]


def pair_terms(ctx, method, fn, inputs, named_weights):
    """The terms of a two-valued loss ``fn`` (``[(name, weight), (name, weight)]``), only those of nonzero
    weight, computing ``fn`` once per step."""
    require(ctx, method, *inputs)
    on = [(i, name, weight) for i, (name, weight) in enumerate(named_weights) if weight]
    pair = PairOfTerms(match_teacher(ctx, fn, inputs))
    fns = [pair.first, pair.second] if len(on) == 2 else [pair.single(i) for i, _, _ in on]
    return [Term(name, weight, f, tuple(inputs)) for (_, name, weight), f in zip(on, fns)]


# ------------------------------------------------------------------------------------------------ parameters
def _coerce(method, key, value, default, choices, is_weight):
    """``value`` as the type of ``default``; numbers finite and not negative; strings among ``choices``."""
    where = f"{method}.{key}"
    if isinstance(default, bool):
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, bool):
            return value
        raise UserError(f"{where} must be true or false, got {value!r}")
    if isinstance(default, (int, float)):
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise UserError(f"{where} must be a number, got {value!r}") from None
        if not math.isfinite(number) or number < 0:
            kind = "weight" if is_weight else "value"
            raise UserError(f"{where} must be a finite, non-negative {kind}, got {value!r}")
        if isinstance(default, int):
            if number != int(number):
                raise UserError(f"{where} must be a whole number, got {value!r}")
            return int(number)
        return number
    value = str(value)
    if key in choices and value not in choices[key]:
        raise UserError(f"{where} must be one of {', '.join(choices[key])}, got {value!r}")
    return value


def _split(names, weights):
    """``{method: {param: value}}`` from bare (one method only) or qualified (``method.param``) keys."""
    given = {name: {} for name in names}
    for key, value in weights.items():
        method, dot, param = key.rpartition(".")
        if not dot:
            if len(names) != 1:
                raise UserError(f"parameter {key!r} must name its method in the combination {'+'.join(names)} "
                                f"(e.g. {names[0]}.{key})")
            method = names[0]
        if method not in given:
            raise UserError(f"parameter {key!r} names method {method!r}, which is not in {'+'.join(names)}")
        given[method][param] = value
    return given


def build_method(spec, ctx, preset=None, **weights):
    """Build method ``spec`` (a name or ``a+b+...``) for the pair ``ctx`` with the parameters of ``preset``
    (default: each method's own paper; a method without that preset keeps its defaults) changed by
    ``weights`` (``param=value`` for one method, ``method.param=value`` in a combination)."""
    names = [n.strip() for n in str(spec).split("+")]
    for name in names:
        _spec(name)
    if len(set(names)) != len(names):
        raise UserError(f"method {spec!r} names a method twice")
    if preset is not None and not any(preset in _METHODS[n].presets for n in names):
        known = sorted({p for n in names for p in _METHODS[n].presets})
        raise UserError(f"unknown preset {preset!r} for {spec!r}; choose one of: {', '.join(known)}")
    given = _split(names, weights)
    built, params = [], {}
    for name in names:
        method = _METHODS[name]
        defaults = method.presets.get(preset or "default", method.presets["default"])
        unknown = set(given[name]) - set(defaults)
        if unknown:
            raise UserError(f"method {name!r} has no parameter {sorted(unknown)[0]!r}; its parameters are: "
                            f"{', '.join(sorted(defaults))}")
        p = {key: _coerce(name, key, given[name].get(key, value), value, method.choices, key in method.weights)
             for key, value in defaults.items()}
        params.update({f"{name}.{key}": value for key, value in p.items()})
        try:
            built.append((name, method.fn(ctx, SimpleNamespace(**p))))
        except (ValueError, TypeError) as err:
            raise UserError(f"method {name!r}: {err}") from err
    adversaries = [(name, b.adversary) for name, b in built if b.adversary is not None]
    if len(adversaries) > 1:
        raise UserError(f"{spec!r} asks for {len(adversaries)} discriminators ({', '.join(n for n, _ in adversaries)});"
                        " keep the adversarial weights (adv, d) of one method and set the others to 0")
    task_weights = [(name, b.task_weight) for name, b in built if b.task_weight is not None]
    if len(task_weights) > 1:
        raise UserError(f"{spec!r}: only one method may weight the task loss, but "
                        f"{', '.join(n for n, _ in task_weights)} do")
    terms = [t for _, b in built for t in b.terms]
    modules = {}
    for _, b in built:
        modules.update(b.modules)
    return MethodParts(terms=terms, modules=modules,
                       adversary=adversaries[0][1]() if adversaries else None,
                       task_weight=task_weights[0][1] if task_weights else None,
                       params={"preset": preset or "default", **params})


def relabel(terms, names=None, raw=()):
    """The paper entry points' log names: terms renamed by ``names`` (catalogue name -> log name) and logged
    unweighted if their (new) name is in ``raw``."""
    names = names or {}
    out = []
    for t in terms:
        new = names.get(t.name, t.name)
        out.append(replace(t, name=new, log_weighted=t.log_weighted and new not in raw))
    return out

"""Protocol files: what a comparison holds fixed, read with ``tomllib`` and checked before any run starts.

A protocol (``protocols/<name>.toml`` or any ``.toml`` file) has the sections::

    name, description                     top level (name defaults to the file name)
    [teacher]     network, norm, checkpoint or [teacher.train] (the teacher is trained once, cached)
    [student]     network, init ("none" or a checkpoint), pretrained_base, norm
    [data]        dataset, pipeline (distill's --data-pipeline, default cirkd), root, train_split, val_split,
                  [data.synthetic] size, train, val
    [train]       crop, batch (total over all GPUs), iterations or epochs, lr, poly_power, momentum,
                  weight_decay, num_workers
    [evaluation]  split, scales, flip, every, max_images
    [methods]     run (list: catalogue names, "a+b", or {name, label, preset, weights}), preset, baseline
    [run]         seeds, budget ("iterations" or "wallclock"), seconds (the wall-clock budget per run), extra

String values may use ``${VAR}`` and ``${VAR:-default}`` (environment variables). Every run is the command
``python -m common.distill ...`` that :func:`distill_args` builds; :func:`run_stamp` is its fingerprint,
written into the run's results.json, so a finished run is kept only while its settings are unchanged.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from common.distill import PIPELINE_IGNORE, PIPELINES, WEIGHTS_NAME
from common.errors import UserError
from common.models.norm import ABN_NORMS, BN_NORMS

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    tomllib = None

PROTOCOL_DIR = Path(__file__).resolve().parent / "protocols"
DATASETS = ("cityscapes", "camvid", "voc", "ade20k", "coco_stuff_164k", "synthetic")
NORMS = ABN_NORMS + BN_NORMS
BUDGETS = ("iterations", "wallclock")
# The keys each section may hold (a misspelt key is an error, not silently ignored).
SCHEMA = {
    "": {"name", "description", "teacher", "student", "data", "train", "evaluation", "methods", "run"},
    "teacher": {"network", "checkpoint", "norm", "train"},
    "teacher.train": {"iterations", "crop", "batch", "lr", "seed"},
    "student": {"network", "init", "pretrained_base", "norm"},
    "data": {"dataset", "pipeline", "root", "train_split", "val_split", "synthetic"},
    "data.synthetic": {"size", "train", "val"},
    "train": {"crop", "batch", "iterations", "epochs", "lr", "poly_power", "momentum", "weight_decay",
              "num_workers"},
    "evaluation": {"split", "scales", "flip", "every", "max_images"},
    "methods": {"run", "preset", "baseline"},
    "method": {"name", "label", "preset", "weights"},
    "run": {"seeds", "budget", "seconds", "extra"},
}
# Flags of a distill command that name a place on this machine or how it runs, not what is computed: the
# stamp leaves them out (paths enter by their file name only), so moving the data or the output keeps a run.
MACHINE_FLAGS = ("--data-root", "--out", "--device", "--num-workers", "--resume")
PATH_FLAGS = ("--teacher-ckpt", "--student-init", "--student-pretrained-base")
# The teacher a [teacher.train] protocol trains: the weights distill writes into this run folder.
TEACHER_RUN = "teacher"
SYNTHETIC_DATA = "synthetic_data"
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


@dataclass
class Method:
    """One method of a protocol: a catalogue name (``a+b`` combines), its label (run folder), preset, weights."""

    name: str
    label: str
    preset: str | None = None
    weights: dict = field(default_factory=dict)


@dataclass
class Protocol:
    """A checked protocol; ``missing`` lists the unset variables and absent files (allowed in a dry run)."""

    name: str
    path: Path
    description: str
    teacher: dict
    student: dict
    data: dict
    train: dict
    evaluation: dict
    methods: list
    baseline: str
    seeds: list
    budget: str
    seconds: float | None
    extra: dict
    missing: list = field(default_factory=list)


def shipped_protocols():
    """The names of the protocols shipped as package data, sorted."""
    return sorted(p.stem for p in PROTOCOL_DIR.glob("*.toml"))


def protocol_file(spec):
    """The file of ``spec``: a shipped protocol's name or a path to a ``.toml`` file."""
    path = Path(spec)
    if path.suffix == ".toml" or os.sep in str(spec):
        if not path.is_file():
            raise UserError(f"protocol file {path} not found; pass an existing .toml file or one of the shipped "
                            f"protocols: {', '.join(shipped_protocols())}")
        return path
    if spec not in shipped_protocols():
        raise UserError(f"unknown protocol {spec!r}; choose one of {', '.join(shipped_protocols())} "
                        "or pass the path of a .toml file")
    return PROTOCOL_DIR / f"{spec}.toml"


def _fail(where, text):
    raise UserError(f"protocol {where}: {text}")


def _check_keys(where, section, table):
    if not isinstance(table, dict):
        _fail(where, f"[{section}] must be a table, got {table!r}")
    unknown = sorted(set(table) - SCHEMA[section])
    if unknown:
        _fail(where, f"unknown key {unknown[0]!r} in [{section or 'top level'}]; the keys there are "
                     f"{', '.join(sorted(SCHEMA[section]))}")


def _get(where, table, section, key, kind, default=..., choices=None):
    """``table[key]`` checked against ``kind`` (a type or tuple of types) and ``choices``; absent -> default."""
    if key not in table:
        if default is ...:
            _fail(where, f"[{section}] needs {key!r}")
        return default
    value = table[key]
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        _fail(where, f"[{section}] {key} must be {_kind_name(kind)}, got {value!r}")
    if not isinstance(value, kind):
        _fail(where, f"[{section}] {key} must be {_kind_name(kind)}, got {value!r}")
    if choices is not None and value not in choices:
        _fail(where, f"[{section}] {key} = {value!r} is not one of {', '.join(map(str, choices))}")
    return value


def _kind_name(kind):
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join({int: "an integer", float: "a number", str: "a string", bool: "true or false",
                        list: "a list", dict: "a table"}[k] for k in kinds)


def _positive(where, section, key, value, integer=True):
    if value is not None and (value <= 0 or (integer and not isinstance(value, int))):
        _fail(where, f"[{section}] {key} must be a positive {'integer' if integer else 'number'}, got {value!r}")
    return value


def _pair(where, section, key, value):
    if (not isinstance(value, list) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        _fail(where, f"[{section}] {key} must be two positive integers [height, width], got {value!r}")
    return list(value)


def expand(key, text, missing):
    """``text`` with ``${VAR}`` / ``${VAR:-default}`` replaced; an unset variable without default is noted in
    ``missing`` and kept as ``${VAR}``."""
    def repl(match):
        var, default = match.group(1), match.group(2)
        value = os.environ.get(var)
        if value:
            return value
        if default is not None:
            return default
        missing.append(f"{key} needs the environment variable {var} (unset); set it")
        return match.group(0)

    return _VAR.sub(repl, text)


def _methods(where, table, catalogue):
    """The [methods] section: entries checked against the catalogue (names, weight names, presets)."""
    _check_keys(where, "methods", table)
    entries = _get(where, table, "methods", "run", list)
    if not entries:
        _fail(where, "[methods] run is empty; list at least the baseline 'none' and one method")
    default_preset = _get(where, table, "methods", "preset", str, None)  # for the methods that have it
    methods = []
    for entry in entries:
        if isinstance(entry, str):
            entry = {"name": entry}
        _check_keys(where, "method", entry)
        name = _get(where, entry, "method", "name", str)
        label = _get(where, entry, "method", "label", str, name)
        if not re.fullmatch(r"[A-Za-z0-9_.+-]+", label):
            _fail(where, f"method label {label!r} may hold only letters, digits and _ . + - (it names a folder)")
        preset = _get(where, entry, "method", "preset", str, None)
        if preset is None and default_preset is not None and catalogue.has_preset(name, default_preset):
            preset = default_preset
        weights = _get(where, entry, "method", "weights", dict, {})
        catalogue.check(where, name, preset, weights)
        methods.append(Method(name, label, preset, dict(weights)))
    labels = [m.label for m in methods]
    twice = sorted({x for x in labels if labels.count(x) > 1})
    if twice:
        _fail(where, f"method {twice[0]!r} is listed twice; give one of them another label = \"...\"")
    baseline = _get(where, table, "methods", "baseline", str, "none")
    if baseline not in labels:
        _fail(where, f"the baseline {baseline!r} is not among the methods; add it to [methods] run")
    return methods, baseline


class Catalogue:
    """The method catalogue (``common.methods``): names, parameters of each preset."""

    def __init__(self):
        from common.methods import list_methods, method_params

        self.names = list_methods()
        self.params = method_params

    def has_preset(self, name, preset):
        """Whether a method of ``name`` (``a+b``) has ``preset`` (unknown methods: checked by :meth:`check`)."""
        return any(part in self.names and preset in self.params(part) for part in name.split("+"))

    def check(self, where, name, preset, weights):
        parts = name.split("+")
        for part in parts:
            if part not in self.names:
                _fail(where, f"unknown method {part!r}; choose from {', '.join(self.names)} (combine with +)")
        presets = {part: self.params(part) for part in parts}
        if preset is not None and not any(preset in presets[part] for part in parts):
            known = sorted({p for part in parts for p in presets[part]})
            _fail(where, f"unknown preset {preset!r} of method {name!r}; choose one of {', '.join(known)}")
        for key, value in weights.items():
            method, dot, param = key.rpartition(".")
            if not dot and len(parts) == 1:
                method = parts[0]
            if method not in parts or not param:
                _fail(where, f"weight {key!r} of method {name!r} must be written <method>.<parameter> with a method "
                             f"of {name!r} (e.g. {parts[-1]}.{param or 'weight'})")
            params = presets[method]["default"]
            if param not in params:
                _fail(where, f"unknown weight {key!r}; the parameters of {method} are {', '.join(sorted(params))}")
            if isinstance(value, (dict, list)):
                _fail(where, f"weight {key!r} must be a number, string or boolean, got {value!r}")


def _check_network(where, section, network):
    from common.models import list_models

    if network not in list_models():
        _fail(where, f"[{section}] network {network!r} is not a registered model; choose one of "
                     f"{', '.join(list_models())}")
    return network


def load_protocol(spec, *, catalogue=None, strict=True):
    """Read and check the protocol ``spec`` (shipped name or ``.toml`` path).

    ``strict``: an unset environment variable or a missing file (teacher, student init, data root) is a
    :class:`UserError`; otherwise they are listed in ``Protocol.missing`` (a dry run prints them).
    """
    path = protocol_file(spec)
    where = path.stem if path.parent == PROTOCOL_DIR else str(path)
    if tomllib is None:
        raise UserError("reading protocol files needs Python 3.11 or newer (tomllib); use a newer Python")
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"protocol {where} is not valid TOML ({err}); fix the file") from err
    _check_keys(where, "", raw)
    missing = []

    def path_value(section, key, table, required=True):
        text = _get(where, table, section, key, str, ... if required else None)
        return None if text is None else expand(f"[{section}] {key}", text, missing)

    teacher_raw = _get(where, raw, "", "teacher", dict)
    _check_keys(where, "teacher", teacher_raw)
    teacher = {"network": _check_network(where, "teacher", _get(where, teacher_raw, "teacher", "network", str)),
               "norm": _get(where, teacher_raw, "teacher", "norm", str, "auto", NORMS)}
    if "train" in teacher_raw:
        if "checkpoint" in teacher_raw:
            _fail(where, "[teacher] has both checkpoint and [teacher.train]; keep one")
        train = _get(where, teacher_raw, "teacher", "train", dict)
        _check_keys(where, "teacher.train", train)
        teacher["train"] = {
            "iterations": _positive(where, "teacher.train", "iterations",
                                    _get(where, train, "teacher.train", "iterations", int)),
            "crop": _pair(where, "teacher.train", "crop", _get(where, train, "teacher.train", "crop", list, None))
            if "crop" in train else None,
            "batch": _positive(where, "teacher.train", "batch",
                               _get(where, train, "teacher.train", "batch", int, None)),
            "lr": _positive(where, "teacher.train", "lr", _get(where, train, "teacher.train", "lr", (int, float), None),
                            integer=False),
            "seed": _get(where, train, "teacher.train", "seed", int, 0),
        }
        teacher["checkpoint"] = None
    else:
        teacher["checkpoint"] = path_value("teacher", "checkpoint", teacher_raw)
        teacher["train"] = None

    student_raw = _get(where, raw, "", "student", dict)
    _check_keys(where, "student", student_raw)
    student = {"network": _check_network(where, "student", _get(where, student_raw, "student", "network", str)),
               "init": path_value("student", "init", student_raw, required=False) or "none",
               "pretrained_base": path_value("student", "pretrained_base", student_raw, required=False),
               "norm": _get(where, student_raw, "student", "norm", str, "auto", NORMS)}

    data_raw = _get(where, raw, "", "data", dict)
    _check_keys(where, "data", data_raw)
    dataset = _get(where, data_raw, "data", "dataset", str)
    if dataset not in DATASETS:
        _fail(where, f"[data] dataset {dataset!r} is not known; choose one of {', '.join(DATASETS)}")
    pipeline = _get(where, data_raw, "data", "pipeline", str, "cirkd", choices=PIPELINE_IGNORE)
    if (pipeline, dataset) not in PIPELINES:
        readers = [name for name, data_set in PIPELINES if data_set == dataset]
        _fail(where, f"[data] pipeline {pipeline!r} does not read the dataset {dataset}; choose one of "
                     f"{', '.join(readers)}")
    data = {"dataset": dataset, "pipeline": pipeline,
            "train_split": _get(where, data_raw, "data", "train_split", str, "train"),
            "val_split": _get(where, data_raw, "data", "val_split", str, "val"), "root": None, "synthetic": None}
    if dataset == "synthetic":
        syn = _get(where, data_raw, "data", "synthetic", dict, {})
        _check_keys(where, "data.synthetic", syn)
        data["synthetic"] = {"size": _pair(where, "data.synthetic", "size",
                                           _get(where, syn, "data.synthetic", "size", list, [64, 64])),
                             "train": _positive(where, "data.synthetic", "train",
                                                _get(where, syn, "data.synthetic", "train", int, 16)),
                             "val": _positive(where, "data.synthetic", "val",
                                              _get(where, syn, "data.synthetic", "val", int, 8))}
    else:
        data["root"] = path_value("data", "root", data_raw)

    train_raw = _get(where, raw, "", "train", dict)
    _check_keys(where, "train", train_raw)
    if ("iterations" in train_raw) == ("epochs" in train_raw):
        _fail(where, "[train] needs exactly one of iterations and epochs")
    train = {"crop": _pair(where, "train", "crop", _get(where, train_raw, "train", "crop", list)),
             "batch": _positive(where, "train", "batch", _get(where, train_raw, "train", "batch", int)),
             "iterations": _positive(where, "train", "iterations",
                                     _get(where, train_raw, "train", "iterations", int, None)),
             "epochs": _positive(where, "train", "epochs", _get(where, train_raw, "train", "epochs", int, None)),
             "lr": _positive(where, "train", "lr", _get(where, train_raw, "train", "lr", (int, float)), integer=False),
             "poly_power": _get(where, train_raw, "train", "poly_power", (int, float), 0.9),
             "momentum": _get(where, train_raw, "train", "momentum", (int, float), 0.9),
             "weight_decay": _get(where, train_raw, "train", "weight_decay", (int, float)),
             "num_workers": _get(where, train_raw, "train", "num_workers", int, None)}

    eval_raw = _get(where, raw, "", "evaluation", dict, {})
    _check_keys(where, "evaluation", eval_raw)
    scales = _get(where, eval_raw, "evaluation", "scales", list, [1.0])
    if not scales or not all(isinstance(s, (int, float)) and not isinstance(s, bool) and s > 0 for s in scales):
        _fail(where, f"[evaluation] scales must be a list of positive numbers, got {scales!r}")
    evaluation = {"split": _get(where, eval_raw, "evaluation", "split", str, data["val_split"]),
                  "scales": [float(s) for s in scales],
                  "flip": _get(where, eval_raw, "evaluation", "flip", bool, False),
                  "every": _get(where, eval_raw, "evaluation", "every", int, None),
                  "max_images": _positive(where, "evaluation", "max_images",
                                          _get(where, eval_raw, "evaluation", "max_images", int, None))}

    methods, baseline = _methods(where, _get(where, raw, "", "methods", dict), catalogue or Catalogue())

    run_raw = _get(where, raw, "", "run", dict, {})
    _check_keys(where, "run", run_raw)
    seeds = _get(where, run_raw, "run", "seeds", list, [0])
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds) \
            or len(set(seeds)) != len(seeds):
        _fail(where, f"[run] seeds must be a list of distinct non-negative integers, got {seeds!r}")
    budget = _get(where, run_raw, "run", "budget", str, "iterations", BUDGETS)
    seconds = _positive(where, "run", "seconds", _get(where, run_raw, "run", "seconds", (int, float), None),
                        integer=False)
    if (budget == "wallclock") != (seconds is not None):
        _fail(where, "[run] budget = \"wallclock\" needs seconds = <wall-clock seconds per run> (and only it does)")
    extra = _get(where, run_raw, "run", "extra", dict, {})

    for key, value in (("[teacher] checkpoint", teacher["checkpoint"]), ("[student] init", student["init"]),
                       ("[student] pretrained_base", student["pretrained_base"]), ("[data] root", data["root"])):
        if value and value != "none" and "${" not in value and not Path(value).exists():
            missing.append(f"{key} {value} does not exist; fix the path or the variable that sets it")
    if strict and missing:
        _fail(where, missing[0])
    return Protocol(name=_get(where, raw, "", "name", str, path.stem), path=path,
                    description=_get(where, raw, "", "description", str, ""), teacher=teacher, student=student,
                    data=data, train=train, evaluation=evaluation, methods=methods, baseline=baseline,
                    seeds=list(seeds), budget=budget, seconds=seconds, extra=dict(extra), missing=missing)


def _num(value):
    return repr(value) if isinstance(value, float) else str(value)


def _value(value):
    return str(value).lower() if isinstance(value, bool) else _num(value)


def data_args(protocol, out):
    """The dataset flags of distill (shared by the teacher run and the method runs; synthetic data is written
    once into ``out/synthetic_data``)."""
    data = protocol.data
    args = ["--dataset", data["dataset"], "--data-pipeline", data["pipeline"]]
    if data["synthetic"]:
        syn = data["synthetic"]
        args += ["--data-root", str(Path(out) / SYNTHETIC_DATA), "--synthetic-size", *map(str, syn["size"]),
                 "--synthetic-train", str(syn["train"]), "--synthetic-val", str(syn["val"])]
    else:
        args += ["--data-root", data["root"]]
    args += ["--train-split", data["train_split"], "--val-split", data["val_split"]]
    ev = protocol.evaluation
    args += ["--eval-split", ev["split"], "--eval-scales", *map(_num, ev["scales"])]
    if ev["flip"]:
        args.append("--eval-flip")
    if ev["max_images"]:
        args += ["--max-eval-images", str(ev["max_images"])]
    if protocol.train["num_workers"] is not None:
        args += ["--num-workers", str(protocol.train["num_workers"])]
    return args


def schedule_args(train, iterations=None, crop=None, batch=None, lr=None):
    sched = (["--iterations", str(iterations or train["iterations"])] if iterations or train["iterations"]
             else ["--epochs", str(train["epochs"])])
    return sched + ["--lr", _num(lr or train["lr"]), "--poly-power", _num(train["poly_power"]),
                    "--momentum", _num(train["momentum"]), "--weight-decay", _num(train["weight_decay"]),
                    "--crop", *map(str, crop or train["crop"]), "--batch-size", str(batch or train["batch"])]


def teacher_checkpoint(protocol, out):
    """The teacher file: the protocol's checkpoint, or the one its [teacher.train] run writes under ``out``."""
    if protocol.teacher["train"]:
        return str(Path(out) / TEACHER_RUN / WEIGHTS_NAME)
    return protocol.teacher["checkpoint"]


def teacher_train_args(protocol, out):
    """distill arguments that train the [teacher.train] teacher once (method none, the teacher as student)."""
    spec = protocol.teacher["train"]
    args = ["--method", "none", "--student", protocol.teacher["network"], "--student-init", "none",
            "--norm", protocol.teacher["norm"], *data_args(protocol, out),
            *schedule_args(protocol.train, spec["iterations"], spec["crop"], spec["batch"], spec["lr"]),
            "--seed", str(spec["seed"]), "--tag", f"compare:{protocol.name}:teacher"]
    return args + ["--extra", f"compare_stamp={run_stamp(args)}", "--out", str(Path(out) / TEACHER_RUN)]


def distill_args(protocol, method, seed, out):
    """The arguments of ``python -m common.distill`` for one (method, seed) run of ``protocol`` (output ``out``:
    the comparison folder; the run writes into ``out/<label>/seed<seed>``)."""
    student = protocol.student
    args = ["--teacher", protocol.teacher["network"], "--teacher-ckpt", teacher_checkpoint(protocol, out),
            "--teacher-norm", protocol.teacher["norm"], "--student", student["network"],
            "--student-init", student["init"]]
    if student["pretrained_base"]:
        args += ["--student-pretrained-base", student["pretrained_base"]]
    args += ["--norm", student["norm"], *data_args(protocol, out), "--method", method.name]
    if method.preset:
        args += ["--preset", method.preset]
    if method.weights:
        args += ["--weights", *(f"{k}={_value(v)}" for k, v in method.weights.items())]
    args += [*schedule_args(protocol.train), "--seed", str(seed)]
    if protocol.evaluation["every"]:
        args += ["--eval-every", str(protocol.evaluation["every"])]
    if protocol.budget == "wallclock":
        args += ["--time-budget", _num(protocol.seconds)]
    args += ["--tag", f"compare:{protocol.name}:{method.label}"]
    extra = [f"{k}={_value(v)}" for k, v in protocol.extra.items()]
    args += ["--extra", *extra, f"compare_stamp={run_stamp(args + extra)}"]
    return args + ["--out", str(run_dir(out, method.label, seed))]


def run_dir(out, label, seed):
    return Path(out) / label / f"seed{seed}"


def run_stamp(args):
    """The fingerprint of a run: its distill arguments without the machine flags, paths by file name only."""
    kept, skip = [], False
    for i, arg in enumerate(args):
        if skip:
            skip = False
            continue
        if arg in MACHINE_FLAGS:
            skip = arg != "--resume"
            continue
        if i and args[i - 1] in PATH_FLAGS:
            arg = Path(arg).name
        kept.append(arg)
    return hashlib.sha256(json.dumps(kept).encode()).hexdigest()[:16]

"""Atomic checkpoints and resumable training state (DESIGN.md, Conventions: Checkpoints).

A training state holds the model and optimizer ``state_dict``s, the number of completed steps,
the Python/NumPy/torch(/CUDA) RNG states and the data position, all as tensors, lists and numbers
so that it loads with ``torch.load(..., weights_only=True)``. Every write goes to a temporary file
in the same directory and is renamed over the target, so a crash mid-save leaves the previous
file intact.
"""
import random
from pathlib import Path

import numpy as np
import torch

from common.errors import UserError
from common.io import atomic_open

FORMAT = "segkd-training-state-v1"


def atomic_save(obj, path):
    """``torch.save(obj, path)`` through a temporary file and ``os.replace`` (never a partial file)."""
    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def _unwrap(model):
    """The module inside DistributedDataParallel/DataParallel, so keys carry no ``module.`` prefix."""
    return model.module if hasattr(model, "module") and isinstance(model, torch.nn.Module) else model


def rng_state():
    """Python, NumPy, torch and CUDA RNG states as weights_only-loadable values."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "mt": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    """Restore what :func:`rng_state` returned."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["mt"].tolist()), py["gauss"]))
    nps = state["numpy"]
    np.random.set_state(
        (nps["kind"], nps["keys"].numpy().astype(np.uint32), nps["pos"], nps["has_gauss"], nps["cached"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_state(path, *, step, models, optimizers, extra=None, data_position=None):
    """Atomically save a resumable state after ``step`` completed steps.

    ``models`` and ``optimizers`` map names (e.g. ``"student"``, ``"D"``) to objects with
    ``state_dict()``; a GradScaler may go in ``optimizers``. ``data_position`` is the sampler's
    start for the next step (default: ``step``); ``extra`` is any weights_only-safe dict.
    """
    state = {
        "format": FORMAT,
        "step": int(step),
        "data_position": int(step if data_position is None else data_position),
        "models": {name: _unwrap(m).state_dict() for name, m in models.items()},
        "optimizers": {name: o.state_dict() for name, o in optimizers.items()},
        "rng": rng_state(),
        "extra": extra or {},
    }
    atomic_save(state, path)


def load_training_state(path, models, optimizers, restore_rng=True, expect=None):
    """Restore models, optimizers and RNG states from :func:`save_training_state`'s file.

    Returns ``{"step", "data_position", "extra", "rng"}``. With ``restore_rng=False`` the caller
    restores ``rng`` itself with :func:`set_rng_state`, e.g. after creating the DataLoader iterator
    (which draws a seed from torch's RNG, as it did at the start of the uninterrupted run).
    ``expect`` maps ``extra`` keys to the values this run needs (seed, schedule, batch, ...).
    Raises :class:`UserError` when the file is missing, unreadable, not a training state, or does
    not match the given models/optimizers.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"resume checkpoint {path} does not exist; pass the training_state.pth of an earlier run")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(f"cannot read resume checkpoint {path} ({type(err).__name__}); it is corrupt or not "
                        "a segkd training state") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{path} is not a segkd training state (a bare state_dict?); resume needs the "
                        "training_state.pth written by the trainer")
    if expect:
        saved = {key: state["extra"].get(key) for key in expect}
        if saved != dict(expect):
            raise UserError(f"resume checkpoint {path} was written by a run with {saved} but this run has "
                            f"{dict(expect)}; resume with the same settings")
    for kind, given in (("models", models), ("optimizers", optimizers)):
        if set(state[kind]) != set(given):
            raise UserError(f"resume checkpoint {path} holds {kind} {sorted(state[kind])} but this run has "
                            f"{sorted(given)}; resume with the same method and flags")
    for name, model in models.items():
        try:
            _unwrap(model).load_state_dict(state["models"][name])
        except RuntimeError as err:
            detail = " ".join(str(err).split())[:300]
            raise UserError(f"resume checkpoint {path}: model '{name}' does not match ({detail}); "
                            "resume with the same model and flags") from err
    for name, optimizer in optimizers.items():
        try:
            optimizer.load_state_dict(state["optimizers"][name])
        except (ValueError, KeyError) as err:
            raise UserError(f"resume checkpoint {path}: optimizer '{name}' does not match ({err})") from err
    if restore_rng:
        set_rng_state(state["rng"])
    return {"step": state["step"], "data_position": state["data_position"], "extra": state["extra"],
            "rng": state["rng"]}

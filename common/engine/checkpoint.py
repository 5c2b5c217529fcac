"""Atomic checkpoints and resumable training state (DESIGN.md, Conventions: Checkpoints).

A training state has one vocabulary for every trainer: ``modules`` (student, each adapter, projection head
and discriminator by name), ``optimizers`` by name, ``scaler``, ``hooks`` (their state by hook name),
``rng`` (Python/NumPy/torch/CUDA), ``step``, ``data_position``, ``run`` (the settings a resume must match)
and ``extra``, all tensors, lists and numbers, so that it loads with ``torch.load(..., weights_only=True)``.
Every write goes to a temporary file in the same directory and is renamed over the target, so a crash
mid-save leaves the previous file intact.
"""
import random
from pathlib import Path

import numpy as np
import torch

from common.errors import UserError
from common.io import atomic_open

FORMAT = "segkd-training-state-v2"


def atomic_save(obj, path):
    """``torch.save(obj, path)`` through a temporary file and ``os.replace`` (never a partial file)."""
    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


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


def save_training_state(path, *, step, state, hooks=None, run=None, extra=None, data_position=None):
    """Atomically save a resumable state after ``step`` completed steps.

    ``state`` is the training step's share (:meth:`common.engine.step.TrainStep.state_dict`: named modules,
    named optimizers, scaler); ``hooks`` the trainer's (:meth:`~common.engine.trainer.Trainer.state_dict`);
    ``run`` the settings a resume must match (seed, steps, batch, ...); ``data_position`` the sampler's start
    for the next step (default: ``step``); ``extra`` any weights_only-safe dict.
    """
    saved = {
        "format": FORMAT,
        "step": int(step),
        "data_position": int(step if data_position is None else data_position),
        **state,
        "hooks": hooks or {},
        "rng": rng_state(),
        "run": dict(run or {}),
        "extra": extra or {},
    }
    atomic_save(saved, path)


def read_training_state(path, run=None):
    """Read :func:`save_training_state`'s file and check that it was written by a run with the settings ``run``.

    Raises :class:`UserError` when the file is missing, a folder, unreadable, not a training state, or from a
    run with other settings (the message names each differing setting).
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"resume checkpoint {path} is a folder; pass the training_state.pth inside it")
    if not path.is_file():
        raise UserError(f"resume checkpoint {path} does not exist; pass the training_state.pth of an earlier run")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(f"cannot read resume checkpoint {path} ({type(err).__name__}); it is corrupt or not "
                        "a segkd training state") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{path} is not a segkd training state of this version (a bare state_dict, or one "
                        "written before the engine redesign); resume needs the training_state.pth of this version")
    if run:
        saved = state.get("run", {})
        differ = [key for key in run if saved.get(key) != run[key]]
        if differ:
            was = ", ".join(f"{key}={saved.get(key)!r}" for key in differ)
            now = ", ".join(f"{key}={run[key]!r}" for key in differ)
            raise UserError(f"resume checkpoint {path} was written by a run with {was} but this run has {now}; "
                            "resume with the same settings")
    return state

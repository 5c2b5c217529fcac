"""Checkpoint loading with clear errors (DESIGN.md, Conventions; specs/ifvd_skd.md §A.3, §B.3, §C.9).

Everything a user hands in is read with ``torch.load(map_location="cpu", weights_only=True)``.
"""
import os
from collections import OrderedDict

import torch

from common.errors import UserError

_SHOW = 5


def load_checkpoint(path, what, hint=None):
    """Read the checkpoint at ``path``; a missing, unreadable file or a folder is a :class:`UserError`.

    ``what`` names the file in messages (e.g. "teacher checkpoint"), ``hint`` is the fix to print
    (e.g. "pass --T-ckpt-path or download teacher_city.pth").
    """
    hint = hint or "pass the path of an existing checkpoint"
    if os.path.isdir(path):
        raise UserError(f"{what} at {path} is a folder, not a file; {hint}")
    if not os.path.isfile(path):
        raise UserError(f"{what} not found at {path}; {hint}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{what} at {path} could not be read as a PyTorch state_dict ({reason}); "
                        f"{hint}") from err
    if not isinstance(obj, dict):
        raise UserError(f"{what} at {path} holds a {type(obj).__name__}, not a state_dict; {hint}")
    return obj


def strip_module_prefix(state_dict):
    """Drop the ``module.`` prefix that (Distributed)DataParallel checkpoints carry."""
    return OrderedDict((k[len("module."):] if k.startswith("module.") else k, v) for k, v in state_dict.items())


def state_dict_of(obj, what):
    """The tensors of ``obj`` (a state_dict, or a training dict with a ``state_dict`` entry), unprefixed."""
    if isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    bad = [k for k, v in obj.items() if not torch.is_tensor(v)]
    if bad:
        raise UserError(f"{what} is not a model state_dict (entries {', '.join(map(repr, bad[:_SHOW]))} "
                        "are not tensors); pass a file saved from model.state_dict()")
    return strip_module_prefix(obj)


def _listing(keys, total):
    shown = ", ".join(keys[:_SHOW])
    return f"{shown} (+{total - _SHOW} more)" if total > _SHOW else shown


def load_state_dict_strict(model, state_dict, what):
    """Load ``state_dict`` into ``model`` with ``strict=True``; mismatches are one :class:`UserError`.

    Accepts a plain state_dict or a dict with a ``state_dict`` entry (student/D resume files), strips
    ``module.``, and drops ``*.num_batches_tracked`` entries the model does not have (modern-BN saves
    of an ABN model, §C.9). The error names up to 5 missing, 5 unexpected and 5 shape-mismatched keys.
    """
    state_dict = state_dict_of(state_dict, what)
    own = model.state_dict()
    state_dict = OrderedDict((k, v) for k, v in state_dict.items()
                             if k in own or not k.endswith(".num_batches_tracked"))
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k} {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in state_dict.items()
              if k in own and v.shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys: {_listing(missing, len(missing))}")
        if unexpected:
            parts.append(f"unexpected keys: {_listing(unexpected, len(unexpected))}")
        if shapes:
            parts.append(f"shape mismatches: {_listing(shapes, len(shapes))}")
        fix = f"pass a checkpoint of this {type(model).__name__} (same model and number of classes)"
        if any(k.startswith(("head.0.", "head.1.")) for k in unexpected):
            fix += "; keys head.0.*/head.1.* are the toolbox teacher layout, remap them with remap_toolbox_teacher"
        raise UserError(f"{what} does not match the model ({'; '.join(parts)}); {fix}")
    model.load_state_dict(state_dict, strict=True)


def remap_toolbox_teacher(state_dict):
    """SKD ``load_T_model`` key rules (§B.3): drop ``fc.*``, ``head.0.`` -> ``pspmodule.``, ``head.1.`` -> ``head.``."""
    out = OrderedDict()
    for key, value in state_dict.items():
        if key.split(".")[0] == "fc":
            continue
        if key.startswith("head.0."):
            key = "pspmodule." + key[len("head.0."):]
        elif key.startswith("head.1."):
            key = "head." + key[len("head.1."):]
        out[key] = value
    return out


def load_imagenet_backbone(model, path, hint=None):
    """ImageNet init of the original (§A.3 "Loading weights", cwd.md §4.4): keep the file's keys the model has.

    Keys absent from the model (``fc.*``, ``num_batches_tracked``) are dropped and model keys absent
    from the file keep their initialisation. Unlike the original, a shape mismatch or a file sharing no
    key with the model is a :class:`UserError`. Returns the model keys left at their initialisation.
    """
    what = "ImageNet backbone weights"
    hint = hint or ("download the deep-stem MIT-CSAIL resnet18-imagenet.pth / resnet101-imagenet.pth "
                    "(specs/ifvd_skd.md §D.2) and pass its path")
    state_dict = state_dict_of(load_checkpoint(path, what, hint), what)
    own = model.state_dict()
    kept = OrderedDict((k, v) for k, v in state_dict.items() if k in own)
    if not kept:
        raise UserError(f"{what} at {path} share no key with the model (file keys start with "
                        f"{_listing(list(state_dict), len(state_dict))}); {hint}")
    shapes = [f"{k} {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in kept.items()
              if v.shape != own[k].shape]
    if shapes:
        raise UserError(f"{what} at {path} do not fit the model (shape mismatches: "
                        f"{_listing(shapes, len(shapes))}); {hint}")
    own.update(kept)
    model.load_state_dict(own, strict=True)
    return [k for k in own if k not in kept]


def load_imagenet_complete(module, path, hint):
    """ImageNet init that must cover ``module`` (cirkd.md §2.8): keep the file's keys the module has.

    Keys absent from ``module`` (``fc.*``, ``features.18``, ``classifier``) are dropped. A module key
    missing from the file (other than ``num_batches_tracked``) or a shape mismatch is a :class:`UserError`,
    never a silent random init; ``hint`` names the file to pass.
    """
    what = "ImageNet backbone weights"
    state_dict = state_dict_of(load_checkpoint(path, what, hint), what)
    own = module.state_dict()
    kept = OrderedDict((k, v) for k, v in state_dict.items() if k in own)
    missing = [k for k in own if k not in kept and not k.endswith(".num_batches_tracked")]
    shapes = [f"{k} {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in kept.items()
              if v.shape != own[k].shape]
    if missing or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys: {_listing(missing, len(missing))}")
        if shapes:
            parts.append(f"shape mismatches: {_listing(shapes, len(shapes))}")
        raise UserError(f"{what} at {path} do not fit the backbone ({'; '.join(parts)}); {hint}")
    module.load_state_dict(kept, strict=False)

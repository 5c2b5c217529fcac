"""Poly learning rate with the originals' step indexing (specs/ifvd_skd.md §A.6, §B.6, §C.7).

``lr(it) = base * (1 - it / max_steps) ** power``, written into the optimizer before every step.
IFVD/CWD index the first step ``it = 0`` (last step ``max - 1``); SKD indexes it ``it = 1`` (last
step ``max``, lr 0). SKD's loader kept going to ``it = max + 1``, where the base of the power is
negative and Python returns a complex number that crashes SGD (§B.2.2, §B.9.1); here that is a
clear error and the trainer stops at its last step instead.
"""
import torch


def poly_lr(base_lr, step, max_steps, power=0.9):
    """Return ``base_lr * (1 - step / max_steps) ** power`` for ``0 <= step <= max_steps``."""
    if max_steps <= 0:
        raise ValueError(f"poly_lr: max_steps must be positive, got {max_steps}")
    if not 0 <= step <= max_steps:
        raise ValueError(
            f"poly_lr: step {step} is outside [0, {max_steps}]; (1 - step/max_steps) would be negative "
            "and its power a complex number (the SKD step-40001 crash, specs/ifvd_skd.md §B.9)"
        )
    return base_lr * (1.0 - step / max_steps) ** power


def set_lr(optimizer, lr, groups="first"):
    """Write ``lr`` into ``param_groups[0]`` (the originals, ``groups="first"``) or into every group."""
    if groups == "first":
        optimizer.param_groups[0]["lr"] = lr
    elif groups == "all":
        for group in optimizer.param_groups:
            group["lr"] = lr
    else:
        raise ValueError(f"set_lr: groups must be 'first' or 'all', got {groups!r}")


def _groups(params, lr, extra_groups):
    first = {"params": [p for p in params if p.requires_grad], "initial_lr": lr}
    return [first, *[{"initial_lr": g.get("lr", lr), **g} for g in extra_groups]]


def make_sgd(params, lr, momentum=0.9, weight_decay=5e-4, extra_groups=()):
    """The originals' optimizer: ``SGD([{params with requires_grad, initial_lr}], lr, momentum, wd)``.

    Weight decay covers every parameter (BN included), nesterov off (specs/ifvd_skd.md §A.6, §B.6).
    ``extra_groups`` (dicts with ``params`` and optional ``lr``) come after the scheduled first
    group, e.g. CWD's feature adapter, whose lr the poly schedule never touches (specs/cwd.md §11.9).
    """
    return torch.optim.SGD(_groups(params, lr, extra_groups), lr=lr, momentum=momentum, weight_decay=weight_decay)


def make_adam(params, lr, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0, extra_groups=()):
    """IFVD/CWD's discriminator optimizer: Adam(lr 4e-4, betas (0.9, 0.99)) over params with requires_grad (§A.6).

    Parameters with ``requires_grad=False`` (the spectral-norm u/v vectors) are left out.
    """
    return torch.optim.Adam(_groups(params, lr, extra_groups), lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

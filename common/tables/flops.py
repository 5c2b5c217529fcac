"""Computed Params / FLOPs of the registered models (DESIGN.md "Benchmark tables"), two labelled counts.

* ``convention="torch"`` (the correct count): torch's own `torch.utils.flop_counter.FlopCounterMode`, batch 1,
  on the meta device (no memory, no compute; falls back to a CPU forward if a model cannot trace on meta,
  which is slow at 1024×2048). FlopCounterMode counts 2 FLOPs per multiply-add; the papers' "FLOPs" are
  multiply-adds (CIRKD §7.4), so `gmacs` = total / 2 / 1e9 is what the tables print.
* ``convention="cirkd"``: CIRKD's own counter (`utils/flops.py`, cirkd.md §7.4) rebuilt by
  :func:`cirkd_macs`: forward hooks on the Conv2d and Linear leaves, output size (H + 2p − k)//s + 1
  (dilation ignored, so dilated convolutions are over-counted); that is how CIRKD's reported FLOPs were
  obtained. Stored as 2 × multiply-adds in `Complexity.flops`, like the torch count.

Models with an In-Place ABN `norm` are built with the pure-PyTorch ABN (same parameters; the compiled in-place
extension has no meta kernels), the others with their default norm.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

CONVENTIONS = ("torch", "cirkd")


@dataclass(frozen=True)
class Complexity:
    model: str
    num_classes: int
    input_size: tuple[int, int]
    params: int
    flops: int
    device: str
    convention: str = "torch"

    @property
    def params_m(self) -> float:
        return self.params / 1e6

    @property
    def gmacs(self) -> float:
        return self.flops / 2e9


def cirkd_macs(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Multiply-adds of ``model(x)`` as CIRKD's counter (cirkd.md §7.4): every Conv2d call adds
    in·out·kh·kw·oh·ow / groups with oh = (H + 2p − kh)//s + 1 (dilation ignored), every Linear call its
    weight's numel; nothing else counts. Runs one forward under ``torch.no_grad`` (use the meta device)."""
    total = 0

    def conv_hook(module, inputs, output):
        nonlocal total
        spatial = 1
        for size, k, p, s in zip(inputs[0].shape[2:], module.kernel_size, module.padding, module.stride):
            spatial *= (size + 2 * p - k) // s + 1
        kernel = module.kernel_size[0] * module.kernel_size[1]
        total += module.in_channels * module.out_channels * kernel * spatial // module.groups

    def linear_hook(module, inputs, output):
        nonlocal total
        total += module.weight.numel()

    handles = [m.register_forward_hook(conv_hook if isinstance(m, torch.nn.Conv2d) else linear_hook)
               for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return total


def _build(name: str, num_classes: int):
    from common.models.norm import ABN_NORMS
    from common.models.registry import model_factory

    factory = model_factory(name)
    norm = inspect.signature(factory).parameters.get("norm")
    if norm is not None and norm.default in ABN_NORMS:
        return factory(num_classes=num_classes, norm="abn")
    return factory(num_classes=num_classes)


def _count(name: str, num_classes: int, input_size: tuple[int, int], device: str, convention: str) -> Complexity:
    if convention not in CONVENTIONS:
        raise ValueError(f"FLOP convention must be one of {CONVENTIONS}, got {convention!r}")
    with torch.device(device):
        model = _build(name, num_classes)
        x = torch.zeros(1, 3, *input_size)
    model.eval()
    params = sum(p.numel() for p in model.parameters())
    if convention == "cirkd":
        flops = 2 * cirkd_macs(model, x)
    else:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
        flops = int(counter.get_total_flops())
    return Complexity(name, num_classes, tuple(input_size), params, flops, device, convention)


@functools.cache
def model_complexity(name: str, num_classes: int = 19, input_size: tuple[int, int] = (1024, 2048),
                     convention: str = "torch") -> Complexity | None:
    """Params and FLOPs of `build_model(name, num_classes)` for one 1×3×H×W input (cached); None if not registered."""
    from common.models import list_models

    if name not in list_models():
        return None
    try:
        return _count(name, num_classes, tuple(input_size), "meta", convention)
    except (RuntimeError, NotImplementedError):
        return _count(name, num_classes, tuple(input_size), "cpu", convention)

"""Computed Params / FLOPs of the registered models (DESIGN.md "Benchmark tables").

FLOPs are counted by torch's own `torch.utils.flop_counter.FlopCounterMode` (no hand-written counter), batch 1,
on the meta device (no memory, no compute; falls back to a CPU forward if a model cannot trace on meta, which
is slow at 1024×2048). Models that take `norm` are built with norm="bn" (the pure-PyTorch ABN, same parameters;
the compiled in-place extension has no meta kernels).
FlopCounterMode counts 2 FLOPs per multiply-add; the papers' "FLOPs" are multiply-adds (CIRKD §7.4), so
`gmacs` = FlopCounterMode total / 2 / 1e9 is what the tables print.

`convention="cirkd"` swaps FlopCounterMode's convolution formula (through its `custom_mapping`) for the one of
CIRKD's `utils/flops.py` (cirkd.md §7.4): output size (H + 2p − k)//s + 1, i.e. dilation ignored, which
over-counts dilated convolutions; that is how CIRKD's reported FLOPs were obtained.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode, conv_flop

from common.errors import UserError

aten = torch.ops.aten
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


def _cirkd_conv_flop(x_shape, w_shape, bias, stride, padding, dilation, transposed, *args, out_shape=None, **kwargs):
    """2 × CIRKD's conv multiply-adds: in·out·kh·kw·oh·ow / groups, oh = (H + 2p − kh)//s + 1 (cirkd.md §7.4)."""
    if transposed:
        return conv_flop(x_shape, w_shape, bias, stride, padding, dilation, transposed, *args, out_shape=out_shape)
    out_c, in_per_group, *kernel = w_shape
    spatial = 1
    for size, k, p, s in zip(x_shape[2:], kernel, padding, stride):
        spatial *= (size + 2 * p - k) // s + 1
    k_numel = 1
    for k in kernel:
        k_numel *= k
    return 2 * x_shape[0] * out_c * in_per_group * k_numel * spatial


def _mapping(convention: str) -> dict:
    if convention == "torch":
        return {}
    if convention == "cirkd":
        return {aten.convolution: _cirkd_conv_flop, aten._convolution: _cirkd_conv_flop}
    raise ValueError(f"FLOP convention must be one of {CONVENTIONS}, got {convention!r}")


def _count(name: str, num_classes: int, input_size: tuple[int, int], device: str, convention: str) -> Complexity:
    from common.models import build_model

    with torch.device(device):
        try:  # the pure-PyTorch ABN: same parameters, and normalisation is not counted by FlopCounterMode
            model = build_model(name, num_classes=num_classes, norm="bn")
        except TypeError as err:
            if "norm" not in str(err):
                raise
            model = build_model(name, num_classes=num_classes)
        x = torch.zeros(1, 3, *input_size)
    model.eval()
    params = sum(p.numel() for p in model.parameters())
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_mapping(convention)) as counter:
        model(x)
    return Complexity(name, num_classes, tuple(input_size), params, int(counter.get_total_flops()), device, convention)


@functools.cache
def model_complexity(name: str, num_classes: int = 19, input_size: tuple[int, int] = (1024, 2048),
                     convention: str = "torch") -> Complexity | None:
    """Params and FLOPs of `build_model(name, num_classes)` for one 1×3×H×W input (cached); None if not registered."""
    from common.models import list_models

    if name not in list_models():
        return None
    try:
        return _count(name, num_classes, tuple(input_size), "meta", convention)
    except (RuntimeError, NotImplementedError, TypeError, UserError):
        return _count(name, num_classes, tuple(input_size), "cpu", convention)

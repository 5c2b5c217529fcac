"""Numerics of a run: fp32 like the originals, one mixed-precision rule, full-precision helper.

The originals ran PyTorch 0.4.1 in full fp32. Since 1.7/1.12 PyTorch runs convolutions (cuDNN) in TF32 on
Ampere and newer GPUs; :func:`set_tf32` switches that off unless asked (``--tf32``).
"""
import torch

from common.errors import UserError

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def set_tf32(enabled=False):
    """fp32 convolutions and matmuls (the originals; ``enabled=False``) or TF32 (``--tf32``)."""
    torch.backends.cudnn.allow_tf32 = enabled
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.set_float32_matmul_precision("high" if enabled else "highest")


def resolve_amp(enabled, device, dtype=None):
    """The mixed-precision rule of ``--amp``: None when off; bf16 on CPU; fp16 (with a GradScaler) on CUDA,
    unless ``dtype`` ("bf16"/"fp16") says otherwise. fp16 on CPU is refused."""
    if not enabled:
        return None
    device = torch.device(device)
    dtype = dtype or ("fp16" if device.type == "cuda" else "bf16")
    if dtype not in AMP_DTYPES:
        raise UserError(f"mixed precision {dtype!r} is not supported; use bf16 or fp16")
    if dtype == "fp16" and device.type != "cuda":
        raise UserError("fp16 mixed precision needs CUDA; use --amp-dtype bf16 on CPU")
    return dtype


def compute_dtype():
    """The dtype the training step and the evaluations cast images to: torch's default, float32 as in the originals.

    Test-only: the regression guard (tests/regression/psp_runs.py) sets float64 with ``torch.set_default_dtype``
    so that its recorded losses do not depend on the CPU's float32 kernels; runs never change it.
    """
    return torch.get_default_dtype()


def full_precision(x):
    """``x`` in at least fp32: fp16/bf16 are upcast, fp32 and float64 are kept as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x

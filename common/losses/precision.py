"""Mixed dtypes in one loss: :func:`common.numerics.full_precision` (half types in float32, float32/float64
kept) applied to each tensor, then the widest of their dtypes, so float64 is never rounded down."""
import torch

from common.numerics import full_precision


def promote(*tensors):
    """The tensors after :func:`full_precision`, cast to the widest of their dtypes."""
    tensors = [full_precision(t) for t in tensors]
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return [t.to(dtype) for t in tensors]

"""One name -> one-argument ``norm_layer(num_features)`` for every model (DESIGN.md "Contract").

In-Place ABN semantics (scale = |w| + eps; specs/inplace_abn.md §1.7), the PSP lineage:
``inplace_abn`` (compiled InPlaceABNSync), ``abn`` (pure-PyTorch reference, same math), ``auto``
(inplace_abn when the extension is built, else abn) and ``bn`` (= abn, the name kept from before).
Plain batch norm, CIRKD (cirkd.md §2.7) and AICSD (aicsd.md §3.5): ``batchnorm`` (nn.BatchNorm2d)
and ``syncbn`` (:class:`SyncBatchNorm`, an nn.SyncBatchNorm that also synchronises CPU tensors over gloo;
in one process it normalises like nn.BatchNorm2d).
"""
import functools

import torch
import torch.distributed as dist
import torch.nn as nn

from common import abn
from common.errors import UserError

ABN_NORMS = abn.NORMS
BN_NORMS = ("batchnorm", "syncbn")


class _AllReduceSum(torch.autograd.Function):
    """Sum over the group; the gradient of every rank's copy is the sum of the incoming gradients."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class SyncBatchNorm(nn.SyncBatchNorm):
    """``nn.SyncBatchNorm`` (same state_dict and CUDA path) whose CPU path synchronises too.

    torch's kernel refuses CPU tensors in training whenever a process group is up (even of one process);
    on CPU (gloo) this class combines the per-rank sums with a differentiable all-reduce: the mean and
    biased variance of the global batch normalise, its unbiased variance updates the running statistics,
    as torch's kernel does. Half-precision inputs are computed in float32.
    """

    def forward(self, x):
        if x.device.type != "cpu" or not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        self._check_input_dim(x)
        dtype = x.dtype
        if dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        group = self.process_group or dist.group.WORLD
        dims = [0] + list(range(2, x.dim()))
        count = x.new_tensor([x.numel() // x.shape[1]])
        total = _AllReduceSum.apply(torch.cat([x.sum(dims), count]), group)
        n = total[-1]
        mean = total[:-1] / n
        shape = [1, -1] + [1] * (x.dim() - 2)
        centred = x - mean.view(shape)
        var = _AllReduceSum.apply(centred.pow(2).sum(dims), group) / n
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            with torch.no_grad():
                self.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
                self.running_var.mul_(1 - factor).add_(var.detach() * n / (n - 1), alpha=factor)
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.weight is not None:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(dtype)


def norm_layer(name, activation="identity", choices=ABN_NORMS + BN_NORMS):
    """The one-argument norm layer for ``name``; ``activation`` is the fused In-Place ABN activation.

    A name outside ``choices`` (the norms a model family accepts) is a :class:`UserError`; plain batch
    norm has no fused activation, so ``activation`` must stay "identity" for it.
    """
    if name not in choices:
        raise UserError(f"unknown norm {name!r} for this model; choose one of {', '.join(choices)}")
    if name in BN_NORMS:
        if activation != "identity":
            raise ValueError(f"norm {name!r} has no fused activation, got activation={activation!r}")
        return nn.BatchNorm2d if name == "batchnorm" else SyncBatchNorm
    return functools.partial(abn.norm_layer(name), activation=activation)

"""Functional InPlace-ABN (modern upstream signatures, specs/inplace_abn.md §3.3, §5.1-5.4).

``inplace_abn`` overwrites ``x`` with ``phi(|w|+eps) * xhat + b)`` and returns the same tensor; backward
recovers xhat from the output (never needs x), allocates only dx and writes neither into the incoming gradient
nor into the saved output. ``inplace_abn_sync`` combines the statistics over a torch.distributed group (one
all_gather forward, one all_reduce backward; unequal per-rank batches weighted by their counts).
"""

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from common.abn import _backend
from common.errors import UserError

ACTIVATIONS = ("leaky_relu", "elu", "identity")


class ABNConfigError(UserError, ValueError):
    """An invalid InPlace-ABN argument (a ValueError, like nn.BatchNorm's, and a UserError for entry points)."""


def check_config(activation, activation_param, eps, momentum, activations=ACTIVATIONS):
    if activation not in activations:
        raise ABNConfigError(f"InPlace-ABN: unknown activation {activation!r}; choose one of {', '.join(activations)}")
    if activation in ("leaky_relu", "elu") and not activation_param > 0:
        raise ABNConfigError(f"InPlace-ABN: activation_param of {activation} must be > 0 (the activation must be "
                             f"invertible), got {activation_param}")
    if not eps > 0:
        raise ABNConfigError(f"InPlace-ABN: eps must be > 0, got {eps}")
    if momentum is not None and not 0 <= momentum <= 1:
        raise ABNConfigError(f"InPlace-ABN: momentum must be in [0, 1] or None, got {momentum}")


def _check_count(count):
    if count <= 1:
        raise ABNConfigError(f"InPlace-ABN: expected more than 1 value per channel when training, got {count} "
                             "(use a larger batch or spatial size, or eval mode)")


def _gather_statistics(ext, mean, var, count, group, world_size):
    """One all_gather of [mean | var | count] per rank, then Chan's combination (§5.4)."""
    packed = torch.cat([mean.double(), var.double(), count.double()])
    gathered = [torch.empty_like(packed) for _ in range(world_size)]
    dist.all_gather(gathered, packed, group=group)
    table = torch.stack(gathered)
    c = mean.numel()
    g_mean, g_var, g_count = ext.reduce_statistics(table[:, :c], table[:, c:2 * c], table[:, 2 * c].long())
    return g_mean.to(mean.dtype), g_var.to(var.dtype), g_count


class _InPlaceABN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, training, momentum, eps, activation,
                activation_param, group, world_size):
        ext = _backend.for_tensor(x)
        batch_stats = training or running_mean is None
        if batch_stats:
            mean, var, count = ext.statistics(x)
            if world_size > 1:
                mean, var, count = _gather_statistics(ext, mean, var, count, group, world_size)
            m = int(count.item())
            _check_count(m)
            if training and running_mean is not None:
                with torch.no_grad():
                    running_mean.lerp_(mean.to(running_mean.dtype), momentum)
                    running_var.lerp_(var.to(running_var.dtype) * (m / (m - 1)), momentum)
        else:
            mean, var = running_mean, running_var.clone()
            count = torch.full((1,), max(1, x.numel() // max(1, x.shape[1])), dtype=torch.long, device=x.device)
        ext.forward_(x, mean, var, weight, bias, eps, activation, activation_param)
        ctx.batch_stats = batch_stats
        ctx.config = (eps, activation, activation_param, group, world_size)
        ctx.save_for_backward(x, var, count, weight, bias)
        ctx.mark_dirty(x)
        return x

    @staticmethod
    @once_differentiable
    def backward(ctx, dz):
        z, var, count, weight, bias = ctx.saved_tensors
        eps, activation, param, group, world_size = ctx.config
        ext = _backend.for_tensor(z)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx = dweight = dbias = None
        if ctx.batch_stats or need_w or need_b:
            sum_dy, sum_xhat_dy = ext.backward_reduce(z, dz, weight, bias, eps, activation, param)
        if ctx.batch_stats:
            g_sum_dy, g_sum_xhat_dy = sum_dy, sum_xhat_dy
            if world_size > 1:
                packed = torch.cat([sum_dy, sum_xhat_dy])
                dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
                g_sum_dy, g_sum_xhat_dy = packed.split(sum_dy.numel())
            if need_x:
                dx = ext.backward_elemt(z, dz, var, count, g_sum_dy, g_sum_xhat_dy, weight, bias, eps, activation,
                                        param, True)
        elif need_x:
            dx = ext.backward_elemt(z, dz, var, count, var, var, weight, bias, eps, activation, param, False)
        if need_w:
            dweight = torch.where(weight < 0, -sum_xhat_dy, sum_xhat_dy)
        if need_b:
            dbias = sum_dy
        return dx, dweight, dbias, None, None, None, None, None, None, None, None, None


def inplace_abn(x, weight, bias, running_mean, running_var, training=True, momentum=0.1, eps=1e-05,
                activation="leaky_relu", activation_param=0.01):
    """In-place activated batch norm of ``x`` (N x C x ...), returning ``x`` itself (§3.3)."""
    check_config(activation, activation_param, eps, momentum)
    return _InPlaceABN.apply(x, weight, bias, running_mean, running_var, training, momentum, eps, activation,
                             activation_param, None, 1)


def resolve_group(group):
    """(group, world_size) at call time: ``None`` means WORLD; without a process group, run locally.

    One process is simply In-Place ABN, so that case is silent (issue 9 item 8).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return None, 1
    group = group if group is not None else dist.group.WORLD
    return group, dist.get_world_size(group)


def inplace_abn_sync(x, weight, bias, running_mean, running_var, training=True, momentum=0.1, eps=1e-05,
                     activation="leaky_relu", activation_param=0.01, group=None):
    """Like :func:`inplace_abn`, with batch statistics combined over ``group`` (default WORLD) (§5.4)."""
    check_config(activation, activation_param, eps, momentum)
    group, world_size = resolve_group(group) if training else (None, 1)
    return _InPlaceABN.apply(x, weight, bias, running_mean, running_var, training, momentum, eps, activation,
                             activation_param, group, world_size)

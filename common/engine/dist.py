"""torch.distributed from torchrun's environment (specs/cirkd.md §6; specs/anchors.md §4 "Launching").

``torchrun --nproc_per_node=N -m ...`` sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
MASTER_PORT; one process started without a launcher runs with world size 1 and no process group.
Backend: NCCL on CUDA, gloo on CPU. Collectives are no-ops when no process group exists, and only
rank 0 writes files and logs.
"""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from common.errors import UserError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    is_main: bool


def resolve_device(spec="auto", local_rank=0, world_size=1):
    """``--device`` semantics: "auto" (cuda if available else cpu), "cpu", "cuda", "cuda:N".

    Under torchrun with several processes a CUDA device is always ``cuda:LOCAL_RANK``.
    """
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(spec)
    except RuntimeError as err:
        raise UserError(f"--device {spec!r} is not a device; use auto, cpu, cuda or cuda:N") from err
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {spec!r} is not supported; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {spec} was requested but CUDA is not available; use --device cpu")
        index = local_rank if world_size > 1 else (device.index or 0)
        if index >= torch.cuda.device_count():
            raise UserError(f"--device cuda:{index} does not exist ({torch.cuda.device_count()} CUDA devices)")
        device = torch.device("cuda", index)
    return device


def init_distributed(device="auto"):
    """Read torchrun's environment, start the process group when WORLD_SIZE > 1, return :class:`DistInfo`."""
    try:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError as err:
        raise UserError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers ({err}); launch with torchrun") from err
    dev = resolve_device(device, local_rank, world_size)
    if world_size > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", init_method="env://")
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev, is_main=rank == 0)


def is_distributed():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier():
    """Synchronise all ranks (no-op for one process)."""
    if is_distributed():
        dist.barrier()


def all_reduce_sum(tensor):
    """Sum ``tensor`` over ranks in place and return it (identity for one process)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def reduce_mean(scalars, device):
    """Mean of a dict of floats over ranks (one all-reduce); identity for one process."""
    if not is_distributed() or not scalars:
        return dict(scalars)
    keys = sorted(scalars)
    values = torch.tensor([float(scalars[k]) for k in keys], dtype=torch.float64, device=device)
    all_reduce_sum(values)
    values /= dist.get_world_size()
    return dict(zip(keys, values.tolist()))


def destroy():
    """Tear down the process group if this process started one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

"""Data plumbing of every trainer: the per-rank batch, the resumable shuffled train loader, the sharded eval
loader and the epoch-chaining iterator (specs/ifvd_skd.md §C.5 "one shuffled pass over the repeated list";
specs/cirkd.md §6 "total batch split over the processes"; specs/aicsd.md §6.2 epochs).
"""
import itertools

from torch.utils.data import DataLoader, Subset

from common.engine.seed import ResumableSampler, SeededDataset, loader_generator, worker_init_fn
from common.errors import UserError


def rank_batch(batch_size, info, flag="--batch-size"):
    """The per-process batch under torchrun: ``batch_size`` is the total over the processes."""
    if batch_size % info.world_size:
        raise UserError(f"{flag} {batch_size} must be divisible by the {info.world_size} processes")
    return batch_size // info.world_size


def train_loader(dataset, *, seed, batch, start, info, num_workers, drop_last=False):
    """One fixed shuffle from ``seed``, started at sample ``start`` (resume), this rank's shard of it."""
    dataset = SeededDataset(dataset, seed)
    sampler = ResumableSampler(len(dataset), seed, start=start, rank=info.rank, world_size=info.world_size)
    return DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=num_workers,
                      pin_memory=info.device.type == "cuda", drop_last=drop_last, worker_init_fn=worker_init_fn,
                      generator=loader_generator(seed))


def eval_loader(dataset, info=None, num_workers=0):
    """One image per batch, in list order; under torchrun each rank takes every world-size-th image (no
    duplicated images, unlike a padded DistributedSampler)."""
    if info is not None and info.world_size > 1:
        dataset = Subset(dataset, range(info.rank, len(dataset), info.world_size))
    return DataLoader(dataset, batch_size=1, shuffle=False, num_workers=num_workers)


def epoch_batches(make_loader, steps_per_epoch, start_step=0):
    """Batches of consecutive epochs as one iterator for the step-based :class:`~common.engine.trainer.Trainer`.

    ``make_loader(epoch, skip)`` returns the loader of that epoch (its own shuffle) without its first ``skip``
    batches (e.g. ``train_loader(..., start=skip * batch)``); a run resumed at ``start_step`` starts in epoch
    ``start_step // steps_per_epoch`` at the first batch not yet done.
    """
    if steps_per_epoch <= 0:
        raise ValueError(f"epoch_batches: steps_per_epoch must be positive, got {steps_per_epoch}")
    epoch, skip = divmod(start_step, steps_per_epoch)
    for e in itertools.count(epoch):
        yield from make_loader(e, skip if e == epoch else 0)

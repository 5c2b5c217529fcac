"""Seeding and a resumable sampler (specs/ifvd_skd.md §A.2.1 step 1, §A.6; specs/cwd.md §11 item 16).

The originals repeat the train list to ``num_steps * batch`` entries and shuffle it once
(``shuffle=True`` over one pass). :class:`ResumableSampler` draws that one permutation from a seed
and can start in the middle, so a resumed run sees exactly the remaining samples.
:class:`SeededDataset` reseeds Python/NumPy (the RNGs the augmentations use, §C.5) from
``(seed, index)`` before each sample, so crops, scales and flips do not depend on the number of
loader workers or on where a run was resumed. Build the loader with
``generator=loader_generator(seed)`` so it leaves torch's global RNG alone.
"""
import random

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


def seed_everything(seed):
    """Seed Python ``random``, NumPy and torch (CPU and every CUDA device), as IFVD/CWD do at import."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def worker_init_fn(worker_id):
    """Seed a loader worker's Python/NumPy RNGs from its torch seed (distinct per worker and epoch)."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def loader_generator(seed):
    """The ``generator=`` for a training DataLoader.

    Without it, creating the loader's iterator draws the workers' base seed from torch's global RNG,
    so a resumed run (RNG restored, then a new iterator) would be one draw off the uninterrupted run
    and get different dropout masks.
    """
    return torch.Generator().manual_seed(seed)


class ResumableSampler(Sampler):
    """One fixed permutation of ``range(num_samples)`` drawn from ``seed``, yielded from ``start``.

    With ``world_size > 1`` each rank takes the strided shard ``perm[rank::world_size]`` (truncated
    to equal length); ``start`` then counts samples of this rank's shard.
    """

    def __init__(self, num_samples, seed, start=0, rank=0, world_size=1):
        self.num_samples = num_samples
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shard_size = num_samples // world_size
        if not 0 <= start <= self.shard_size:
            raise ValueError(f"ResumableSampler: start {start} is outside [0, {self.shard_size}]")
        self.start = start

    def _shard(self):
        generator = torch.Generator().manual_seed(self.seed)
        perm = torch.randperm(self.num_samples, generator=generator)
        return perm[self.rank :: self.world_size][: self.shard_size]

    def __iter__(self):
        return iter(self._shard()[self.start :].tolist())

    def __len__(self):
        return self.shard_size - self.start


class SeededDataset(Dataset):
    """Wrap ``dataset`` so sample ``index`` always draws the same Python/NumPy random numbers."""

    def __init__(self, dataset, seed):
        self.dataset = dataset
        self.seed = seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        state = np.random.SeedSequence([self.seed, index]).generate_state(2)
        random.seed(int(state[0]))
        np.random.seed(int(state[1]))
        return self.dataset[index]

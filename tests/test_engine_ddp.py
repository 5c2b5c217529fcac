"""Gradient averaging over processes (common/engine/step.py ``average_gradients``; specs/cirkd.md §6: every rank
steps on its shard, DDP averages the gradients): one ``TrainStep`` on 2 gloo ranks x 2 images equals one process
on the 4 images — the averaged gradients and the parameters after the first SGD step, in float64."""
import datetime

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from common.engine.step import Term, TrainStep
from tests.helpers_dist import free_port

WORLD, PER_RANK = 2, 2


class TinyNet(nn.Module):
    """conv-ReLU-conv, no normalisation: the loss of a batch is the mean of its images' losses."""

    output_names = ("logits",)

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 3, 1)

    def forward(self, x):
        return self.conv2(torch.relu(self.conv1(x.to(self.conv1.weight.dtype))))


def batch():
    """4 images and their labels; image values are float32 numbers (the step casts images to float32)."""
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(WORLD * PER_RANK, 3, 5, 5, generator=generator)
    labels = torch.randint(0, 3, (WORLD * PER_RANK, 5, 5), generator=generator)
    return images, labels


def one_step(images, labels):
    """The same model (seed 0) and SGD (momentum, weight decay) after one step: (gradients, parameters)."""
    torch.manual_seed(0)
    model = TinyNet().double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    task = Term("ce", 1.0, lambda logits, y: F.cross_entropy(logits, y), ("s.logits", "labels"))
    step = TrainStep(model, task=task, optimizer=optimizer, base_lr=0.1, device="cpu")
    step((images, labels), 0)
    named = dict(model.named_parameters())
    return ({f"grad.{k}": p.grad.clone() for k, p in named.items()},
            {f"param.{k}": p.detach().clone() for k, p in named.items()})


def _worker(rank, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        images, labels = batch()
        shard = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        grads, params = one_step(images[shard], labels[shard])
        torch.save({**grads, **params}, f"{out_dir}/rank{rank}.pt")
        dist.barrier()  # neither rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()


def test_two_ranks_average_to_one_process_on_the_whole_batch(tmp_path):
    mp.start_processes(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True, start_method="fork")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        grads, params = one_step(*batch())
    finally:
        torch.set_num_threads(threads)
    want = {**grads, **params}
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got.keys() == want.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-12, msg=f"rank {rank} {key}")

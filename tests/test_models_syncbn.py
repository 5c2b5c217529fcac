"""norm="syncbn" on CPU: two gloo processes with per-rank batches 3 and 5 (and 0 and 8) equal nn.BatchNorm2d on the
concatenated batch of 8 (forward, input and parameter gradients, running statistics); one process with a
process group of one equals nn.BatchNorm2d too (torch's own kernel refuses CPU tensors there)."""
import datetime

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from common.models.norm import SyncBatchNorm, norm_layer
from tests.helpers_dist import free_port

SPLITS = ((3, 5), (0, 8))
C = 4


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, C, 3, 3, generator=g, dtype=torch.float64) * 2 + 1
    grad = torch.randn(x.shape, generator=g, dtype=torch.float64)
    return x, grad


def _module(cls):
    torch.manual_seed(1)
    module = cls(C).double()
    with torch.no_grad():
        module.weight.uniform_(0.5, 1.5)
        module.bias.uniform_(-1, 1)
    return module


def _run(module, x, grad, steps=2):
    for _ in range(steps):  # two steps: the running statistics are updated twice
        src = x.clone().requires_grad_()
        module.zero_grad()
        y = module(src)
        y.backward(grad)
    return {"y": y.detach(), "dx": src.grad, "dw": module.weight.grad, "db": module.bias.grad,
            "rm": module.running_mean.clone(), "rv": module.running_var.clone()}


def _init(rank, world_size, port):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))


def _worker(rank, port, out_dir):
    _init(rank, 2, port)
    try:
        x, grad = _data()
        for i, split in enumerate(SPLITS):
            lo = sum(split[:rank])
            sl = slice(lo, lo + split[rank])
            torch.save(_run(_module(norm_layer("syncbn")), x[sl], grad[sl]), f"{out_dir}/split{i}_rank{rank}.pt")
        dist.barrier()  # neither rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()


def test_syncbn_name_is_a_sync_batchnorm():
    assert issubclass(norm_layer("syncbn"), nn.SyncBatchNorm) and norm_layer("syncbn") is SyncBatchNorm


def test_two_gloo_ranks_equal_batchnorm_on_the_whole_batch(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    x, grad = _data()
    want = _run(_module(nn.BatchNorm2d), x, grad)
    tol = dict(rtol=1e-10, atol=1e-10)
    for i in range(len(SPLITS)):
        ranks = [torch.load(tmp_path / f"split{i}_rank{r}.pt", weights_only=True) for r in range(2)]
        torch.testing.assert_close(torch.cat([r["y"] for r in ranks]), want["y"], **tol)
        torch.testing.assert_close(torch.cat([r["dx"] for r in ranks]), want["dx"], **tol)
        torch.testing.assert_close(ranks[0]["dw"] + ranks[1]["dw"], want["dw"], **tol)
        torch.testing.assert_close(ranks[0]["db"] + ranks[1]["db"], want["db"], **tol)
        for r in ranks:
            torch.testing.assert_close(r["rm"], want["rm"], **tol)
            torch.testing.assert_close(r["rv"], want["rv"], **tol)


def test_one_process_group_on_cpu_equals_batchnorm():
    _init(0, 1, free_port())
    try:
        x, grad = _data()
        got = _run(_module(SyncBatchNorm), x, grad)
    finally:
        dist.destroy_process_group()
    want = _run(_module(nn.BatchNorm2d), x, grad)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-10, atol=1e-10)

"""InPlaceABNSync over torch.distributed (specs/inplace_abn.md §5.4, §6.6): two gloo processes with per-rank
batches 3 and 5 (and 0 and 8) equal one process on the concatenated batch of 8. Needs `make build-abn`."""
import datetime
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from common.abn import InPlaceABN, InPlaceABNSync, extension_available
from tests.helpers_dist import free_port

SPLITS = ((3, 5), (0, 8))  # unequal per-rank batches; an empty rank must neither hang nor change the result
C = 4


@pytest.fixture(autouse=True)
def _require_extension():
    if not extension_available():
        pytest.fail("the InPlace-ABN extension is not built: run `make build-abn` before these tests")


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, C, 3, 3, generator=g, dtype=torch.float64) * 2 + 1
    grad = torch.randn(x.shape, generator=g, dtype=torch.float64)
    return x, grad


def _state():
    g = torch.Generator().manual_seed(1)
    return {"weight": torch.randn(C, generator=g, dtype=torch.float64),
            "bias": torch.randn(C, generator=g, dtype=torch.float64),
            "running_mean": torch.zeros(C, dtype=torch.float64), "running_var": torch.ones(C, dtype=torch.float64)}


def _run(module, x, grad):
    src = x.clone().requires_grad_()
    y = module(src * 1)
    y.backward(grad)
    return {"y": y.detach(), "dx": src.grad, "dw": module.weight.grad, "db": module.bias.grad,
            "rm": module.running_mean.clone(), "rv": module.running_var.clone()}


def _worker(rank, port, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        x, grad = _data()
        for i, split in enumerate(SPLITS):
            lo = sum(split[:rank])
            sl = slice(lo, lo + split[rank])
            module = InPlaceABNSync(C).double()
            module.load_state_dict(_state(), strict=True)
            result = _run(module, x[sl], grad[sl])
            module.eval()
            result["eval_y"] = module(x[sl].clone()).detach()
            torch.save(result, f"{out_dir}/split{i}_rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_with_unequal_batches_equal_one_process(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    x, grad = _data()
    single = InPlaceABN(C).double()
    single.load_state_dict(_state(), strict=True)
    want = _run(single, x, grad)
    single.eval()
    want_eval = single(x.clone()).detach()
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
        torch.testing.assert_close(torch.cat([r["eval_y"] for r in ranks]), want_eval, **tol)


def test_without_process_group_runs_locally_without_warning():
    # issue 9 item 8: one process is simply In-Place ABN, silently
    x, grad = _data()
    sync, local = InPlaceABNSync(C).double(), InPlaceABN(C).double()
    sync.load_state_dict(_state())
    local.load_state_dict(_state())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = _run(sync, x, grad)
    want = _run(local, x, grad)
    for key in want:
        torch.testing.assert_close(got[key], want[key])

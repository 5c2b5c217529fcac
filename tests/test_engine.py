"""common.engine: poly LR indexing and the clean stop, atomic/resumable checkpoints, sampler, logger, dist."""
import itertools
import json
import os
import random
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from common.engine import (
    HookBase,
    LRSchedule,
    PeriodicCheckpoint,
    PeriodicEval,
    PolySpec,
    ResumableSampler,
    RunLogger,
    SeededDataset,
    Term,
    Trainer,
    TrainStep,
    atomic_save,
    init_distributed,
    loader_generator,
    make_adam,
    make_sgd,
    poly_lr,
    read_training_state,
    resolve_device,
    save_training_state,
    set_lr,
    set_rng_state,
)
from common.engine import checkpoint as checkpoint_mod
from common.engine import dist as dist_mod
from common.errors import UserError


# ---------------------------------------------------------------- poly LR (specs/ifvd_skd.md §A.6, §B.6, §C.7)
def test_poly_lr_values_of_the_originals():
    assert poly_lr(0.01, 0, 40000) == 0.01
    assert poly_lr(0.01, 39999, 40000) == pytest.approx(7.2e-7, rel=0.01)
    assert poly_lr(4e-4, 39999, 40000) == pytest.approx(2.9e-8, rel=0.01)
    assert poly_lr(0.01, 20000, 40000) == pytest.approx(0.01 * 0.5**0.9, rel=1e-12)
    assert poly_lr(0.01, 40000, 40000) == 0.0


def test_poly_lr_past_the_end_raises_instead_of_complex():
    assert isinstance((1 - 40001 / 40000) ** 0.9, complex)  # the SKD crash this guards against
    with pytest.raises(ValueError, match="complex"):
        poly_lr(0.01, 40001, 40000)
    with pytest.raises(ValueError):
        poly_lr(0.01, -1, 40000)


def test_set_lr_first_group_only_or_all():
    p1, p2 = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p1]}, {"params": [p2]}], lr=0.5)
    set_lr(opt, 0.1)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.5]
    set_lr(opt, 0.2, groups="all")
    assert [g["lr"] for g in opt.param_groups] == [0.2, 0.2]
    with pytest.raises(ValueError):
        set_lr(opt, 0.1, groups="last")


def test_optimizers_of_the_originals():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    model[1].bias.requires_grad_(False)  # like spectral-norm u/v: left out of the optimizer
    adapter = torch.nn.Linear(2, 2)
    sgd = make_sgd(model.parameters(), 0.01, extra_groups=[{"params": adapter.parameters()}])
    first, extra = sgd.param_groups
    assert len(first["params"]) == 3 and first["initial_lr"] == 0.01
    assert (first["momentum"], first["weight_decay"], first["nesterov"], first["dampening"]) == (0.9, 5e-4, False, 0)
    assert len(extra["params"]) == 2 and extra["lr"] == extra["initial_lr"] == 0.01
    adam = make_adam(model.parameters(), 4e-4)
    (group,) = adam.param_groups
    assert len(group["params"]) == 3 and group["betas"] == (0.9, 0.99) and group["weight_decay"] == 0.0
    assert group["eps"] == 1e-8 and group["initial_lr"] == 4e-4


def _two_group_sgd():
    p1, p2 = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    return torch.optim.SGD([{"params": [p1]}, {"params": [p2], "lr": 0.01}], lr=0.01)


@pytest.mark.parametrize("first_index", [0, 1])
def test_lr_schedule_indexing_and_clean_stop(first_index):
    max_steps = 5
    g, d = _two_group_sgd(), _two_group_sgd()
    seen = []

    def step_fn(batch, step):
        seen.append((step, batch, g.param_groups[0]["lr"], g.param_groups[1]["lr"], d.param_groups[0]["lr"]))
        return {"loss": torch.tensor(1.0)}

    schedule = LRSchedule([PolySpec("G", g, 0.01), PolySpec("D", d, 4e-4)], max_steps, first_index=first_index)
    trainer = Trainer(step_fn, itertools.count(), max_steps, hooks=[schedule])
    trainer.train()  # the iterator never ends: the loop must stop by itself, never reaching it = max + 1
    assert [s[0] for s in seen] == list(range(max_steps))
    assert [s[1] for s in seen] == list(range(max_steps))
    its = [s + first_index for s in range(max_steps)]
    assert [s[2] for s in seen] == [0.01 * (1 - it / max_steps) ** 0.9 for it in its]
    assert [s[4] for s in seen] == [4e-4 * (1 - it / max_steps) ** 0.9 for it in its]
    assert all(s[3] == 0.01 for s in seen)  # only param_groups[0] decays (the originals)
    assert seen[0][2] == (0.01 if first_index == 0 else 0.01 * 0.8**0.9)
    assert (seen[-1][2] == 0.0) == (first_index == 1)
    assert trainer.scalars == {"G_lr": seen[-1][2], "D_lr": seen[-1][4]}


def test_trainer_rejects_bad_start_and_short_data():
    with pytest.raises(ValueError):
        Trainer(lambda b, s: {}, iter([]), 3, start_step=4)
    with pytest.raises(RuntimeError, match="ran out at step 2"):
        Trainer(lambda b, s: {"loss": 0.0}, iter([0, 1]), 3).train()


class _Recorder(HookBase):
    def __init__(self):
        self.events = []

    def before_train(self):
        self.events.append(("before_train", self.trainer.step))

    def before_step(self):
        self.events.append(("before_step", self.trainer.step))

    def after_step(self):
        self.events.append(("after_step", self.trainer.step, self.trainer.losses["loss"]))

    def after_train(self):
        self.events.append(("after_train", self.trainer.step))


def test_trainer_hook_order_resume_start_and_final_eval():
    rec, evals = _Recorder(), []
    Trainer(lambda b, s: {"loss": torch.tensor(float(b))}, iter([10, 11]), 4, start_step=2,
            hooks=[rec, PeriodicEval(evals.append)]).train()
    assert rec.events == [("before_train", 2), ("before_step", 2), ("after_step", 2, 10.0),
                          ("before_step", 3), ("after_step", 3, 11.0), ("after_train", 4)]
    assert evals == [4]
    evals.clear()
    Trainer(lambda b, s: {}, iter([]), 4, start_step=4, hooks=[PeriodicEval(evals.append)]).train()
    assert evals == [4]  # resumed at the end: evaluation only
    evals.clear()
    Trainer(lambda b, s: {}, iter([]), 4, start_step=4, hooks=[PeriodicEval(evals.append, done=lambda: True)]).train()
    assert evals == []  # ... unless its outputs exist


def test_periodic_eval_keeps_the_best_and_resumes_it():
    scores, best = iter([0.3, 0.5, 0.4, 0.6]), []
    hook = PeriodicEval(lambda n: next(scores), every=2, on_best=lambda n, score: best.append((n, score)))
    Trainer(lambda b, s: {}, itertools.count(), 8, hooks=[hook]).train()
    assert best == [(2, 0.3), (4, 0.5), (8, 0.6)] and hook.state_dict() == {"best": 0.6, "best_step": 8}
    resumed, best = PeriodicEval(lambda n: 0.55, every=2, on_best=lambda n, s: best.append(n)), []
    trainer = Trainer(lambda b, s: {}, itertools.count(), 10, start_step=8, hooks=[resumed])
    trainer.load_state_dict({"eval": hook.state_dict()})
    trainer.train()
    assert best == [] and resumed.best == 0.6  # 0.55 after the resume does not beat the restored 0.6


def test_periodic_eval_a_tie_does_not_replace_the_best():
    # strictly better only: cirkd.md §5.1 "if the mIoU beats the best so far", aicsd.md §2.4 step 10 "mIoU > best"
    scores, best = iter([0.5, 0.5, 0.4, 0.5]), []
    hook = PeriodicEval(lambda n: next(scores), every=2, on_best=lambda n, score: best.append((n, score)))
    Trainer(lambda b, s: {}, itertools.count(), 8, hooks=[hook]).train()
    assert best == [(2, 0.5)] and hook.state_dict() == {"best": 0.5, "best_step": 2}


def test_trainer_crash_still_calls_after_train_but_skips_final_eval():
    rec, evals = _Recorder(), []

    def step_fn(batch, step):
        if step == 1:
            raise KeyError("boom")
        return {"loss": 0.0}

    trainer = Trainer(step_fn, itertools.count(), 3, hooks=[rec, PeriodicEval(evals.append)])
    with pytest.raises(KeyError):
        trainer.train()
    assert rec.events[-1] == ("after_train", 1) and not trainer.completed and evals == []


def _saves(max_steps, **kw):
    saved = []
    Trainer(lambda b, s: {"loss": 0.0}, itertools.count(), max_steps,
            hooks=[PeriodicCheckpoint(saved.append, **kw)]).train()
    return saved


def test_periodic_checkpoint_rules():
    assert _saves(12, every=200, start=12) == [12]  # IFVD/CWD defaults scaled: only the last step
    assert _saves(10, every=2, start=6) == [6, 8, 10]
    assert _saves(10, every=4, start=0, final=False) == [4, 8]
    assert _saves(10, every=4, start=0) == [4, 8, 10]
    # SKD-style rule (1-based step n): every 3 in the last 5 steps, or n == N - 1
    assert _saves(10, final=False, when=lambda n: (n > 1 and n % 3 == 0 and n > 10 - 5) or n == 9) == [6, 9]


# ---------------------------------------------------------------- checkpoints
def test_atomic_save_keeps_old_file_when_save_crashes(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pth"
    atomic_save({"v": torch.tensor([1.0])}, path)
    real_save = torch.save

    def crashing_save(obj, f, *a, **k):
        f.write(b"partial garbage")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_mod.torch, "save", crashing_save)
    with pytest.raises(UserError, match=r"cannot write .*ckpt\.pth"):  # one sentence naming the file
        atomic_save({"v": torch.tensor([2.0])}, path)
    monkeypatch.setattr(checkpoint_mod.torch, "save", real_save)
    assert torch.load(path, weights_only=True)["v"].item() == 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pth"]  # no temp file left behind
    atomic_save({"v": torch.tensor([3.0])}, path)
    assert torch.load(path, weights_only=True)["v"].item() == 3.0
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


def _model_and_opt(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    return model, opt


def _draws():
    return random.random(), np.random.rand(), torch.rand(1).item(), np.random.randn()


class _Named(torch.nn.Module):
    output_names = ("logits",)

    def __init__(self, module):
        super().__init__()
        self.net = module

    def forward(self, x):
        return [self.net(x)]


def _train_step(model, opt, modules=None):
    task = Term("loss", 1.0, lambda out: out.sum(), ("s.logits",))
    return TrainStep(_Named(model), task=task, optimizer=opt, base_lr=0.1, device="cpu", modules=modules,
                     total_name="loss", log_adversarial=False)


def test_training_state_roundtrip_restores_everything(tmp_path):
    model, opt = _model_and_opt(0)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    path = tmp_path / "state.pth"
    save_training_state(path, step=7, state=_train_step(model, opt).state_dict(), hooks={"eval": {"best": 0.5}},
                        run={"seed": 3}, extra={"note": "x"}, data_position=56)
    expected = _draws()
    raw = torch.load(path, map_location="cpu", weights_only=True)  # everything is weights_only-safe
    assert raw["step"] == 7 and sorted(raw["modules"]) == ["student"] and sorted(raw["optimizers"]) == ["G"]
    model2, opt2 = _model_and_opt(1)
    state = read_training_state(path, run={"seed": 3})
    _train_step(model2, opt2).load_state_dict(state)
    assert (state["step"], state["data_position"], state["extra"], state["hooks"]) == (7, 56, {"note": "x"},
                                                                                      {"eval": {"best": 0.5}})
    assert _draws() != expected
    set_rng_state(state["rng"])
    assert _draws() == expected
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), k
    buf, buf2 = (o.state_dict()["state"][0]["momentum_buffer"] for o in (opt, opt2))
    assert torch.equal(buf, buf2)


def test_training_state_user_errors(tmp_path):
    model, opt = _model_and_opt(0)
    with pytest.raises(UserError, match="does not exist"):
        read_training_state(tmp_path / "nope.pth")
    with pytest.raises(UserError, match="is a folder"):
        read_training_state(tmp_path)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read"):
        read_training_state(tmp_path / "junk.pth")
    torch.save(model.state_dict(), tmp_path / "bare.pth")
    with pytest.raises(UserError, match="not a segkd training state"):
        read_training_state(tmp_path / "bare.pth")
    save_training_state(tmp_path / "s.pth", step=1, state=_train_step(model, opt).state_dict(),
                        run={"seed": 0, "batch_size": 8, "num_steps": 100})
    with pytest.raises(UserError, match=r"batch_size=8, num_steps=100 but this run has batch_size=4, num_steps=50"):
        read_training_state(tmp_path / "s.pth", run={"seed": 0, "batch_size": 4, "num_steps": 50})
    state = read_training_state(tmp_path / "s.pth")
    adapter = torch.nn.Linear(5, 5)
    with pytest.raises(UserError, match="this run has adapter that it does not"):
        _train_step(model, opt, modules={"adapter": adapter}).load_state_dict(state)
    other = torch.nn.Sequential(torch.nn.Linear(3, 5))
    with pytest.raises(UserError, match="module 'student' does not match"):
        _train_step(other, torch.optim.SGD(other.parameters(), 0.1)).load_state_dict(state)


def test_engine_imports_no_dataset_model_or_loss_module():
    """DESIGN.md, Layout: the engine knows no paper; what it needs is passed in (issue 9 "Done when")."""
    import ast

    engine = Path(__file__).resolve().parents[1] / "common" / "engine"
    offenders = []
    for path in sorted(engine.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")]
            for name in names:
                if name.startswith(("common.datasets", "common.models", "common.losses", "..datasets",
                                    "..models", "..losses")):
                    offenders.append(f"{path.name}: {name}")
    assert offenders == []


# ---------------------------------------------------------------- sampler and seeding
def test_resumable_sampler_is_one_permutation_resumable_and_shardable():
    full = list(ResumableSampler(20, seed=5))
    assert sorted(full) == list(range(20)) and full != list(range(20))
    assert full == list(ResumableSampler(20, seed=5))
    assert full != list(ResumableSampler(20, seed=6))
    assert list(ResumableSampler(20, seed=5, start=7)) == full[7:]
    assert len(ResumableSampler(20, seed=5, start=7)) == 13
    shards = [list(ResumableSampler(21, seed=5, rank=r, world_size=2)) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 10 and not set(shards[0]) & set(shards[1])
    assert list(ResumableSampler(21, seed=5, start=4, rank=1, world_size=2)) == shards[1][4:]
    with pytest.raises(ValueError):
        ResumableSampler(20, seed=5, start=21)


def test_loader_with_generator_leaves_global_rng_alone():
    data = list(range(8))
    torch.manual_seed(0)
    before = torch.get_rng_state()
    loader = torch.utils.data.DataLoader(data, batch_size=2, sampler=ResumableSampler(8, seed=1),
                                         generator=loader_generator(1))
    batches = [b.tolist() for b in loader]
    assert torch.equal(torch.get_rng_state(), before)
    assert sum(batches, []) == list(ResumableSampler(8, seed=1))
    iter(torch.utils.data.DataLoader(data, batch_size=2))
    assert not torch.equal(torch.get_rng_state(), before)  # the default loader does draw


def test_seeded_dataset_draws_depend_only_on_seed_and_index():
    class Draw(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return random.randint(0, 10**9), int(np.random.randint(0, 10**9))

    ds = SeededDataset(Draw(), seed=0)
    first = [ds[i] for i in range(4)]
    assert [ds[i] for i in reversed(range(4))] == first[::-1]
    assert len(set(first)) == 4
    assert SeededDataset(Draw(), seed=1)[0] != first[0]


# ---------------------------------------------------------------- logger
def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_run_logger_jsonl_and_resume_truncation(tmp_path):
    log = RunLogger(tmp_path, "t1")
    for step in range(4):
        log.log_step(step, loss=torch.tensor(step * 1.5), lr=0.1)
    log.info("hello")
    log.close()
    assert [(r["step"], r["loss"], r["lr"]) for r in _lines(tmp_path / "metrics.jsonl")] == [
        (0, 0.0, 0.1), (1, 1.5, 0.1), (2, 3.0, 0.1), (3, 4.5, 0.1)]
    assert "hello" in (tmp_path / "log.txt").read_text()
    log = RunLogger(tmp_path, "t1", start_step=2)  # resumed after 2 steps: steps 2, 3 are redone
    log.log_step(2, loss=9.0)
    log.close()
    assert [(r["step"], r["loss"]) for r in _lines(tmp_path / "metrics.jsonl")] == [(0, 0.0), (1, 1.5), (2, 9.0)]
    assert "hello" in (tmp_path / "log.txt").read_text()  # log.txt appended on resume
    RunLogger(tmp_path, "t1").close()  # a fresh run starts a fresh file
    assert _lines(tmp_path / "metrics.jsonl") == []


def test_run_logger_disabled_writes_nothing(tmp_path):
    log = RunLogger(tmp_path / "r1", "t2", enabled=False)
    log.log_step(0, loss=1.0)
    log.info("x")
    log.close()
    assert not (tmp_path / "r1").exists()


def test_logging_hook_writes_one_line_per_step_with_lr(tmp_path, capsys):
    from common.engine import Logging

    log = RunLogger(tmp_path, "t3")
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.01)
    Trainer(lambda b, s: {"loss": torch.tensor(float(s))}, itertools.count(), 3,
            hooks=[LRSchedule([PolySpec("G", opt, 0.01)], 3), Logging(log, period=2, progress=False)]).train()
    log.close()
    records = _lines(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in records] == [(0, 0.0), (1, 1.0), (2, 2.0)]
    assert records[0]["G_lr"] == 0.01 and records[2]["G_lr"] == pytest.approx(0.01 * (1 / 3) ** 0.9)
    err = capsys.readouterr().err
    assert "step:    1" in err and "eta:" in err and "step:    2" in err


# ---------------------------------------------------------------- devices and torch.distributed
def test_resolve_device_and_single_process_init(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(UserError, match="CUDA is not available"):
            resolve_device("cuda:0")
    with pytest.raises(UserError, match="not a device"):
        resolve_device("gpu0")
    info = init_distributed("cpu")
    assert (info.rank, info.world_size, info.local_rank, info.is_main) == (0, 1, 0, True)
    assert not dist_mod.is_distributed()
    t = torch.tensor([2.0])
    assert dist_mod.all_reduce_sum(t) is t and t.item() == 2.0


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_worker(rank, port, out_dir):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    info = init_distributed("cpu")
    total = dist_mod.all_reduce_sum(torch.tensor([float(rank + 1)]))
    mean = dist_mod.reduce_mean({"loss": float(rank) * 2.0}, info.device)
    shard = list(ResumableSampler(8, seed=0, start=1, rank=info.rank, world_size=info.world_size))
    dist_mod.barrier()
    backend = torch.distributed.get_backend()
    dist_mod.destroy()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"info": [info.rank, info.world_size, info.is_main, str(info.device)], "total": total.item(),
                   "mean": mean["loss"], "shard": shard, "backend": backend}, f)


def test_two_process_gloo(tmp_path):
    mp.start_processes(_dist_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True, start_method="fork")
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert r0["info"] == [0, 2, True, "cpu"] and r1["info"] == [1, 2, False, "cpu"]
    assert r0["backend"] == "gloo"
    assert r0["total"] == r1["total"] == 3.0
    assert r0["mean"] == r1["mean"] == 1.0
    perm = list(ResumableSampler(8, seed=0))
    assert r0["shard"] == perm[0::2][1:] and r1["shard"] == perm[1::2][1:]

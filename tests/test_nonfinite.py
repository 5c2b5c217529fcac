"""Bad values that ran silently (issue 18 item 7): nan/inf in any float flag, and a training loss that turns
non-finite.

Flags: every float flag of every entry point (found from the parsers themselves, so a new flag or entry point is
covered without editing this file) refuses nan, inf and -inf with argparse's one line naming the flag, exit 2.
Loss: the step raises :class:`~common.errors.NonFiniteLoss` before the update, naming the 0-based step and the
non-finite terms; the parameters and the files on disk stay those of the last finite step.
"""
import argparse
import copy
import importlib
import inspect
import json
import math
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from common.datasets import synthetic
from common.engine import Adversary, Term, TrainStep
from common.errors import NonFiniteLoss
from common.recipes.options import finite_float
from tests.helpers_dist import free_port

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
NON_FINITE = ("nan", "inf", "-inf")


# ------------------------------------------------------------------------------------------- float flags
def entry_modules():
    """Every module of the repository run as a program (``if __name__ == "__main__"``) that parses flags (its
    text mentions a parser, or it re-exports another program's ``main``)."""
    names = []
    for path in sorted(REPO.rglob("*.py")):
        rel = path.relative_to(REPO)
        if rel.parts[0] in ("tests", ".venv") or any(part.startswith(".") for part in rel.parts):
            continue
        text = path.read_text()
        if "__name__ == \"__main__\"" in text and ("pars" in text or "import main" in text):
            names.append(".".join(rel.with_suffix("").parts))
    return names


class Captured(Exception):
    """Raised by the stand-in of ``parse_known_args``: carries the entry point's parser."""


def captured_parser(module_name, monkeypatch):
    """The parser ``main`` builds, taken at its first ``parse_known_args`` (nothing after it runs)."""
    module = importlib.import_module(module_name)

    def capture(self, args=None, namespace=None):
        raise Captured(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", capture)
    main = inspect.unwrap(module.main)
    with pytest.raises(Captured) as exc:
        main([]) if inspect.signature(main).parameters else main()
    monkeypatch.undo()
    return exc.value.args[0]


def all_parsers(parser):
    """``parser`` and its sub-command parsers."""
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found += all_parsers(sub)
    return found


def float_flags(parser):
    """The optional arguments that take numbers with a fraction: a float type or a float default."""
    flags = []
    for action in parser._actions:
        default = action.default if isinstance(action.default, (list, tuple)) else [action.default]
        floaty = action.type in (float, finite_float) or any(isinstance(v, float) for v in default)
        if action.option_strings and floaty and action.nargs != 0:
            flags.append(action)
    return flags


def test_entry_points_are_found():
    names = set(entry_modules())
    expected = {"cirkd.train_baseline", "cirkd.train_kd", "cirkd.train_cirkd", "cirkd.eval", "aicsd.train",
                "aicsd.train_kd",
                "cwd.train", "ifvd.train", "skd.train_and_eval", "skd.train_esp", "common.train_baseline"}
    assert expected <= names, expected - names


@pytest.mark.parametrize("module_name", entry_modules())
def test_every_float_flag_refuses_nan_and_inf(module_name, monkeypatch, capsys):
    parsers = all_parsers(captured_parser(module_name, monkeypatch))
    for parser in parsers:
        for action in float_flags(parser):
            flag = action.option_strings[-1] if action.option_strings[-1].startswith("--") else action.option_strings[0]
            count = action.nargs if isinstance(action.nargs, int) else 1
            for value in NON_FINITE:  # "--flag=-inf": argparse reads a separate "-inf" as an option
                with pytest.raises(SystemExit) as exc:
                    parser.parse_args([f"{flag}={value}"] + [value] * (count - 1))
                err = capsys.readouterr().err.strip().splitlines()
                assert exc.value.code == 2, (module_name, flag, value)
                assert err[-1].endswith(f"error: argument {'/'.join(action.option_strings)}: must be a finite "
                                        f"number, got '{value}'"), (module_name, flag, err[-1])


def test_finite_float_keeps_ordinary_numbers():
    assert finite_float("1e-3") == 0.001 and finite_float("-2") == -2.0 and finite_float("3.4e38") == 3.4e38
    for text in ("nan", "NaN", "inf", "-Infinity", "1e999"):  # 1e999 overflows to inf
        with pytest.raises(argparse.ArgumentTypeError, match="must be a finite number"):
            finite_float(text)
    with pytest.raises(argparse.ArgumentTypeError, match="a number expected, got 'x'"):
        finite_float("x")


# -------------------------------------------------------------------------------------- the step itself
class Net(nn.Module):
    """3 -> 4 classes, 1x1 convolutions."""

    output_names = ("logits",)

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return [self.conv(x)]


class Losses:
    """Adversarial losses whose discriminator loss turns nan at ``nan_call`` (0-based call count)."""

    def __init__(self, nan_call):
        self.nan_call, self.calls = nan_call, 0

    def generator_loss(self, d_s, adv_type):
        return -d_s.mean()

    def discriminator_loss(self, d_s, d_t, adv_type):
        loss = F.relu(1.0 + d_s).mean() + F.relu(1.0 - d_t).mean()
        self.calls += 1
        return loss * float("nan") if self.calls - 1 == self.nan_call else loss


def a_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, 5, 5, generator=g), torch.randint(0, 4, (2, 5, 5), generator=g).float()


def ce(logits, labels):
    return F.cross_entropy(logits, labels)


def make_step(kd_weight, adversary_nan_call=None):
    torch.manual_seed(0)
    student, teacher = Net(), Net()
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9)
    adversary = None
    if adversary_nan_call is not None:
        disc = nn.Conv2d(4, 1, 1)
        adversary = Adversary(disc, torch.optim.SGD(disc.parameters(), lr=0.1, momentum=0.9), 0.1,
                              Losses(adversary_nan_call), adv_type="hinge")
    kd = Term("kd", kd_weight, lambda s, t: ((s - t) ** 2).mean(), ("s.logits", "t.logits"))
    return TrainStep(student, task=Term("mc", 1.0, ce, ("s.logits", "labels")), optimizer=optimizer, base_lr=0.1,
                     device="cpu", teacher=teacher, terms=[kd], adversary=adversary)


def snapshot(step):
    return (copy.deepcopy(step.student.state_dict()), copy.deepcopy(step.optimizer.state_dict()),
            None if step.adversary is None else copy.deepcopy(step.adversary.discriminator.state_dict()))


def assert_same(a, b):
    for x, y in zip(a, b):
        assert (x is None) == (y is None)
        if x is not None:
            assert repr(x) == repr(y)  # state dicts of tensors: equal values print equally (nan too)
            for key in x:
                if isinstance(x[key], torch.Tensor):
                    assert torch.equal(x[key], y[key]), key


def test_a_nan_term_stops_the_step_before_the_update():
    """The kd weight turns nan at step 1 (AICSD-style weight of the step): step 1 raises naming the step and the
    term, and the student and its optimizer stay those after step 0."""
    step = make_step(lambda n: float("nan") if n == 1 else 1.0)
    out = step(a_batch(0), 0)
    assert math.isfinite(out["loss_G"])
    before = snapshot(step)
    with pytest.raises(NonFiniteLoss) as exc:
        step(a_batch(1), 1)
    message = str(exc.value)
    assert message.startswith("the training loss became non-finite at step 1 (0-based, as in metrics.jsonl): kd=nan;")
    assert "mc=" not in message
    assert_same(snapshot(step), before)


def test_a_sum_that_overflows_names_the_total():
    """Each term finite (3e38 < float32 max 3.40e38), their sum inf: the total is named."""
    step = make_step(1.0)
    step.task.fn = step.terms[0].fn = lambda *inputs: torch.full((), 3e38) + 0 * inputs[0].sum()
    with pytest.raises(NonFiniteLoss, match=r"at step 0 \(0-based, as in metrics.jsonl\): loss_G=inf;"):
        step(a_batch(0), 0)


def test_a_nan_discriminator_loss_stops_before_the_d_update():
    step = make_step(1.0, adversary_nan_call=1)
    step(a_batch(0), 0)
    d_before = copy.deepcopy(step.adversary.discriminator.state_dict())
    d_opt_before = copy.deepcopy(step.adversary.optimizer.state_dict())
    with pytest.raises(NonFiniteLoss, match=r"at step 1 .*: discriminator loss=nan;"):
        step(a_batch(1), 1)
    after = step.adversary.discriminator.state_dict()
    assert all(torch.equal(after[k], d_before[k]) for k in d_before)
    assert repr(step.adversary.optimizer.state_dict()) == repr(d_opt_before)


def _dist_worker(rank, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    step = make_step(lambda n: float("nan") if (n, rank) == (1, 1) else 1.0)
    record = {"steps": []}
    try:
        for n in range(3):
            step(a_batch(n + 10 * rank), n)
            record["steps"].append(n)
    except NonFiniteLoss as err:
        record["error"] = str(err)
    except Exception as err:  # a rank left waiting at a collective: reported, not raised
        record["other"] = f"{type(err).__name__}: {err}"
    dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(record))


def test_a_nan_on_one_rank_stops_every_rank_at_that_step(tmp_path):
    """Under torchrun the check is one all-reduce: rank 1's nan at step 1 stops rank 0 at step 1 too, before
    either updates (no rank is left waiting in the gradient all-reduce)."""
    mp.start_processes(_dist_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True, start_method="fork")
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert r0["steps"] == r1["steps"] == [0] and "error" in r0 and "error" in r1, (r0, r1)
    assert r1["error"].startswith("the training loss became non-finite at step 1 (0-based, as in metrics.jsonl) "
                                  "on rank 1: kd=nan;")
    assert r0["error"].startswith("the training loss became non-finite at step 1 (0-based, as in metrics.jsonl) "
                                  "on another rank than this rank 0;")


# ----------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def camvid(tmp_path_factory):
    root = tmp_path_factory.mktemp("nonfinite_camvid")
    lists = synthetic.make_camvid(root / "camvid", {"train": 2, "val": 1, "test": 1}, size=(48, 64), cirkd_lists=True)
    from common.models import build_model

    torch.manual_seed(0)
    teacher = root / "deeplabv3_resnet18_camvid_best_model.pth"
    torch.save(build_model("deeplabv3_resnet18", num_classes=11).state_dict(), teacher)
    return root / "camvid", lists, teacher


def cirkd_argv(camvid, out, iters, every, *extra):
    root, lists, _ = camvid
    return ["--dataset", "camvid", "--data", str(root), "--train-list", lists["train"], "--val-list", lists["val"],
            "--crop-size", "32", "32", "--batch-size", "2", "--max-iterations", str(iters), "--val-per-iters",
            str(every), "--save-per-iters", str(every), "--log-iter", "1", "-j", "0", "--save-dir", str(out / "ckpt"),
            "--log-dir", str(out / "logs"), "--device", "cpu", *extra]


def stopped_with(main, argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err
    return err.strip().splitlines()[-1]


def finite_state_dict(path):
    state = torch.load(path, weights_only=True)
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()), path
    return state


def test_cirkd_baseline_diverging_with_a_huge_lr_stops_at_the_first_nan(camvid, tmp_path, capsys):
    """``--lr 1e30`` (a real divergence): step 0 is finite and its update puts weights near 1e30 (finite in
    float32, max 3.4e38), the loss of step 1 is non-finite. The run stops there; on disk stays the checkpoint
    saved after step 0 (``--save-per-iters 1``)."""
    from cirkd import train_baseline

    argv = ["--model", "deeplabv3", "--backbone", "resnet18", "--pretrained-base", "None", "--lr", "1e30",
            "--skip-val"]
    last = stopped_with(train_baseline.main, cirkd_argv(camvid, tmp_path, 4, 1, *argv), capsys)
    assert last.startswith("error: the training loss became non-finite at step 1 (0-based, as in metrics.jsonl): "
                           "task=")
    run = tmp_path / "ckpt" / "deeplabv3_resnet18_camvid_run"
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [0]
    assert torch.load(run / "training_state.pth", weights_only=True)["step"] == 1
    finite_state_dict(tmp_path / "ckpt" / "deeplabv3_resnet18_camvid.pth")
    assert not (run / "results.json").exists()


def test_cirkd_kd_stops_at_the_step_whose_kd_term_turns_nan(camvid, tmp_path, capsys, monkeypatch):
    """The kd weight turns nan at step 3 (0-based) of 4; save and validation every 2 steps: the student
    checkpoint, the best model, training_state.pth and results.json on disk are those of the point after step 1
    (2 completed steps), all finite, and nothing of step 3 was logged or written."""
    from cirkd import train_kd

    weight_at = Term.weight_at

    def nan_at_step_3(self, step):
        return float("nan") if (self.name, step) == ("kd", 3) else weight_at(self, step)

    monkeypatch.setattr(Term, "weight_at", nan_at_step_3)
    argv = ["--teacher-backbone", "resnet18", "--teacher-pretrained", str(camvid[2]), "--pixel-memory-size", "400",
            "--region-memory-size", "60", "--pixel-contrast-size", "40", "--region-contrast-size", "20"]
    last = stopped_with(train_kd.main, cirkd_argv(camvid, tmp_path, 4, 2, *argv), capsys)
    assert last.startswith("error: the training loss became non-finite at step 3 (0-based, as in metrics.jsonl): "
                           "kd=nan;")
    ckpt = tmp_path / "ckpt"
    run = ckpt / "kd_deeplabv3_resnet18_camvid_run"
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]
    state = torch.load(run / "training_state.pth", weights_only=True)
    assert state["step"] == 2
    student = finite_state_dict(ckpt / "kd_deeplabv3_resnet18_camvid.pth")
    assert all(torch.equal(student[k], v) for k, v in state["modules"]["student"].items())
    finite_state_dict(ckpt / "kd_deeplabv3_resnet18_camvid_best_model.pth")
    assert json.loads((run / "results.json").read_text())["extra"]["best_iteration"] == 2
    log = (tmp_path / "logs" / "deeplabv3_resnet18_resnet18_log.txt").read_text()
    assert "Iters: 3/4" in log and "Iters: 4/4" not in log

"""Bad input and faults at the PSP-lineage entry points (issue 13 item 9), as a careful user hits them.

Each row of the table: entry point, flags, the sentence it must print. Every row exits 2 with ``error: ...`` or
argparse's ``... error: ...`` on stderr, no traceback, and writes nothing but (possibly) empty folders and logs.
"""
import errno
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import common.io
from common.engine.checkpoint import save_training_state
from common.engine.logger import RunLogger
from common.errors import main_guard, user_message
from common.io import atomic_open, remove_stale_temps
from common.models import build_model
from common.train_baseline import main as baseline_main
from cwd import test as cwd_test
from cwd import train as cwd_train
from cwd import val as cwd_val
from ifvd import test as ifvd_test
from ifvd import train as ifvd_train
from ifvd import val as ifvd_val
from skd import test as skd_test
from skd import train_and_eval as skd_train
from tests.helpers_psp import script_env

REPO = Path(__file__).resolve().parents[1]
LOG_FILES = {"log.txt", "metrics.jsonl", "args.json"}


@pytest.fixture(autouse=True)
def no_demo_one_thread(monkeypatch, one_thread):
    monkeypatch.delenv("SEGKD_DEMO", raising=False)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A PSPNet-R18 state_dict: the teacher of IFVD/SKD (``--teacher-model pspnet_resnet18``) and a student."""
    root = tmp_path_factory.mktemp("bad_input_weights")
    torch.manual_seed(0)
    torch.save(build_model("pspnet_resnet18", norm="bn").state_dict(), root / "r18.pth")
    return root


class Ctx:
    """Paths a row's flags refer to: the data, the weights, a plain file, a folder, a work folder."""

    def __init__(self, data, weights, tmp):
        self.data, self.weights, self.tmp = data, weights, tmp
        tmp.mkdir(parents=True, exist_ok=True)
        self.file = tmp / "a_file"
        self.file.write_text("not a folder\n")
        self.folder = tmp / "a_folder"
        self.folder.mkdir()

    def lists(self, split):
        return str(self.data / "lists" / f"{split}.lst")

    def state(self, name, **run):
        """A training state written by an IFVD/CWD/SKD run with the settings ``run`` (defaults: this test's)."""
        path = self.tmp / f"{name}.pth"
        save_training_state(path, step=1, state={"modules": {}, "optimizers": {}},
                            run={"seed": 0, "num_steps": 2, "batch_size": 2, "world_size": 1, **run})
        return str(path)


def cwd_argv(c):
    return ["--data-dir", str(c.data), "--data-list", c.lists("train"), "--data-listval", c.lists("val"),
            "--T_ckpt_path", str(c.weights / "r18.pth"), "--is-student-load-imgnet", "False", "--norm-type", "channel",
            "--input-size", "64,64", "--batch-size", "2", "--num-steps", "2", "--save-ckpt-start", "2",
            "--num-workers", "0", "--device", "cpu", "--norm", "bn", "--save-dir", str(c.tmp / "ckpt"),
            "--outputs-dir", str(c.tmp / "outputs")]


def ifvd_argv(c):
    return ["--data-dir", str(c.data), "--data-list", c.lists("train"), "--data-listval", c.lists("val"),
            "--T_ckpt_path", str(c.weights / "r18.pth"), "--teacher-model", "pspnet_resnet18",
            "--is-student-load-imgnet", "False", "--input-size", "64,64", "--batch-size", "2", "--num-steps", "2",
            "--save-ckpt-start", "2", "--adv", "False", "--num-workers", "0", "--device", "cpu", "--norm", "bn",
            "--save-dir", str(c.tmp / "ckpt"), "--outputs-dir", ""]


def skd_argv(c):
    return ["--data-dir", str(c.data), "--data-list", c.lists("train"), "--data-listval", c.lists("val"),
            "--T_ckpt_path", str(c.weights / "r18.pth"), "--teacher-model", "pspnet_resnet18",
            "--is-student-load-imgnet", "False", "--input-size", "64,64", "--batch-size", "2", "--num-steps", "2",
            "--ho", "False", "--num-workers", "0", "--device", "cpu", "--norm", "bn", "--seed", "0",
            "--log-dir", str(c.tmp / "log"), "--snapshot-dir", str(c.tmp / "snap"), "--outputs-dir", ""]


def baseline_argv(c):
    return ["--model", "pspnet_resnet18", "--norm", "bn", "--data-dir", str(c.data), "--data-list", c.lists("train"),
            "--data-listval", c.lists("val"), "--input-size", "64,64", "--batch-size", "2", "--num-steps", "2",
            "--num-workers", "0", "--device", "cpu", "--seed", "0", "--save-dir", str(c.tmp / "baseline")]


def eval_argv(c, split, restore="--restore-from"):
    return ["--data-dir", str(c.data), "--data-list", c.lists(split), restore, str(c.weights / "r18.pth"),
            "--device", "cpu", "--norm", "bn", "--outputs-dir", str(c.tmp / "outputs")]


ENTRIES = {
    "cwd/train.py": (cwd_train.main, cwd_argv),
    "ifvd/train.py": (ifvd_train.main, ifvd_argv),
    "skd/train_and_eval.py": (skd_train.main, skd_argv),
    "common.train_baseline": (main_guard(baseline_main), baseline_argv),
    "cwd/val.py": (cwd_val.main, lambda c: eval_argv(c, "val")),
    "cwd/test.py": (cwd_test.main, lambda c: eval_argv(c, "test")),
    "ifvd/val.py": (ifvd_val.main, lambda c: eval_argv(c, "val")),
    "ifvd/test.py": (ifvd_test.main, lambda c: eval_argv(c, "test")),
    "skd/test.py": (skd_test.main, lambda c: eval_argv(c, "test", "--resume-from")),
}

# (entry point, extra flags from the context, a part of the one sentence it must print)
ROWS = [
    # silently accepted values
    ("cwd/train.py", lambda c: ["--state-every", "-1"], "argument --state-every: must be >= 0, got -1"),
    ("cwd/train.py", lambda c: ["--num-workers", "-1"], "argument --num-workers: must be >= 0, got -1"),
    ("ifvd/train.py", lambda c: ["--num-workers", "-1"], "argument --num-workers: must be >= 0, got -1"),
    ("skd/train_and_eval.py", lambda c: ["--state-every", "-1"], "argument --state-every: must be >= 0, got -1"),
    ("common.train_baseline", lambda c: ["--num-workers", "-1"], "argument --num-workers: must be >= 0, got -1"),
    # a folder given as a checkpoint
    ("cwd/val.py", lambda c: ["--restore-from", str(c.folder)], "is a folder, not a file"),
    ("cwd/train.py", lambda c: ["--T_ckpt_path", str(c.folder)], "teacher checkpoint (--T_ckpt_path) at"),
    ("ifvd/train.py", lambda c: ["--resume", str(c.folder)], "is a folder; pass the training_state.pth"),
    # output folders: a file where a folder goes
    ("cwd/train.py", lambda c: ["--save-dir", str(c.file)], "a file stands where one of its folders should be"),
    ("ifvd/train.py", lambda c: ["--save-dir", str(c.file)], "a file stands where one of its folders should be"),
    ("skd/train_and_eval.py", lambda c: ["--log-dir", str(c.file)], "--log-dir"),
    ("skd/train_and_eval.py", lambda c: ["--snapshot-dir", str(c.file)], "is a file, not a folder"),
    ("common.train_baseline", lambda c: ["--save-dir", str(c.file)], "--save-dir"),
    ("cwd/train.py", lambda c: ["--outputs-dir", str(c.file)], "--outputs-dir"),
    ("cwd/val.py", lambda c: ["--results", str(c.folder)], "--results"),
    ("ifvd/val.py", lambda c: ["--results", str(c.file / "results.json")], "is a file, not a folder"),
    ("cwd/test.py", lambda c: ["--outputs-dir", str(c.file)], "is a file, not a folder"),
    ("ifvd/test.py", lambda c: ["--outputs-dir", str(c.file)], "is a file, not a folder"),
    ("skd/test.py", lambda c: ["--outputs-dir", str(c.file)], "is a file, not a folder"),
    # resume checks the run: another batch / number of steps / seed
    ("ifvd/train.py", lambda c: ["--resume", c.state("ifvd", batch_size=4)],
     "batch_size=4 but this run has batch_size=2"),
    ("ifvd/train.py", lambda c: ["--resume", c.state("ifvd", num_steps=5)],
     "num_steps=5 but this run has num_steps=2"),
    ("ifvd/train.py", lambda c: ["--resume", c.state("ifvd", seed=7)], "seed=7 but this run has seed=0"),
    ("skd/train_and_eval.py", lambda c: ["--resume", c.state("skd", num_steps=5)], "num_steps=5"),
    ("skd/train_and_eval.py", lambda c: ["--resume", c.state("skd", seed=7)], "seed=7 but this run has seed=0"),
    ("common.train_baseline", lambda c: ["--resume", c.state("base", model="pspnet_resnet18", batch_size=4)],
     "batch_size=4 but this run has batch_size=2"),
]


def files_below(root):
    return {p for p in Path(root).rglob("*") if p.is_file()}


@pytest.mark.parametrize("entry,extra,sentence", ROWS, ids=[f"{r[0]} {i}" for i, r in enumerate(ROWS)])
def test_bad_input_exits_2_with_one_sentence(entry, extra, sentence, synthetic_cityscapes, weights, tmp_path, capsys):
    main, base = ENTRIES[entry]
    c = Ctx(synthetic_cityscapes, weights, tmp_path)
    argv = base(c) + extra(c)
    before = files_below(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert sentence in err and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert "error: " in last and sentence in last
    new = files_below(tmp_path) - before
    assert {p.name for p in new} <= LOG_FILES, new


def test_unwritable_save_dir_is_named_before_training(synthetic_cityscapes, weights, tmp_path, capsys):
    """A folder the user cannot create (here below /sys) stops at start-up with the flag and the path."""
    target = Path("/sys/segkd_unwritable")
    if _can_create(target):
        pytest.skip("/sys is writable here")
    c = Ctx(synthetic_cityscapes, weights, tmp_path)
    with pytest.raises(SystemExit) as exc:
        ifvd_train.main(ifvd_argv(c) + ["--save-dir", str(target)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and f"--save-dir {target}/exp is not writable" in err and "Traceback" not in err


def _can_create(path):
    try:
        path.mkdir()
    except OSError:
        return False
    path.rmdir()
    return True


def test_command_line_prints_no_traceback(tmp_path):
    """The same through the interpreter: ``python cwd/train.py --save-dir <file>`` exits 2 with one line."""
    afile = tmp_path / "a_file"
    afile.write_text("x")
    cmd = [sys.executable, "cwd/train.py", "--save-dir", str(afile), "--norm-type", "channel"]
    proc = subprocess.run(cmd, cwd=REPO, env=script_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: --save-dir {afile}/exp cannot be created: a file stands where one of its folders should be; "
        "pass another folder"]


# ------------------------------------------------------------------------------------ DataLoader workers
@pytest.fixture()
def bad_label_data(synthetic_cityscapes, tmp_path):
    """The synthetic set with the value 40 (no Cityscapes labelId, ids are 0..33) in every train label."""
    root = tmp_path / "bad_labels"
    shutil.copytree(synthetic_cityscapes, root)
    for label in (root / "gtFine" / "train").rglob("*_labelIds.png"):
        array = np.asarray(Image.open(label)).copy()
        array[0, 0] = 40
        Image.fromarray(array).save(label)
    return root


def test_error_inside_loader_workers_prints_the_same_sentence(bad_label_data, weights, tmp_path, capsys):
    """With 2 workers torch re-raises the worker's UserError with its traceback as message; the user sees
    the sentence of the 0-worker run."""
    errors = []
    for workers in ("0", "2"):
        c = Ctx(bad_label_data, weights, tmp_path / workers)
        with pytest.raises(SystemExit) as exc:
            ifvd_train.main(ifvd_argv(c) + ["--num-workers", workers])
        assert exc.value.code == 2
        errors.append(capsys.readouterr().err.strip().splitlines()[-1])
    assert errors[0] == errors[1]
    assert errors[0].startswith("error: ") and "holds" in errors[0] and "_labelIds.png" in errors[0]
    assert "Traceback" not in errors[1] and "DataLoader worker" not in errors[1]


def test_user_message_of_a_worker_error_is_its_last_line():
    """torch's ExceptionWrapper message: a header, the worker traceback, then ``<module>.UserError: <sentence>``."""
    message = ("Caught UserError in DataLoader worker process 1.\nOriginal Traceback (most recent call last):\n"
               '  File "x.py", line 3, in f\n    raise UserError("bad")\n'
               "common.errors.UserError: label map a.png holds values outside -1..255; pass Cityscapes labelIds\n")
    assert user_message(Exception(message)) == \
        "label map a.png holds values outside -1..255; pass Cityscapes labelIds"
    assert user_message(Exception("plain sentence; fix")) == "plain sentence; fix"


# --------------------------------------------------------------------------------------------- disk full
def test_disk_full_during_an_atomic_write_names_the_path_and_leaves_nothing(tmp_path, monkeypatch):
    target = tmp_path / "run" / "training_state.pth"
    target.parent.mkdir()
    target.write_bytes(b"previous")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(common.io.os, "fsync", full)
    with pytest.raises(common.io.UserError) as exc:
        with atomic_open(target) as f:
            f.write(b"new state")
    assert str(exc.value) == (f"no space left on device while writing {target}; "
                              "free space or choose another output folder")
    assert target.read_bytes() == b"previous" and sorted(p.name for p in target.parent.iterdir()) == [target.name]


def test_torch_unexpected_pos_is_reported_as_a_full_disk(tmp_path):
    """torch's zip writer reports a failed write as RuntimeError "unexpected pos ..." without a path."""
    target = tmp_path / "w.pth"
    with pytest.raises(common.io.UserError, match="no space left on device while writing"):
        with atomic_open(target):
            raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file "
                               "data/0: unexpected pos 64 vs 0")
    assert list(tmp_path.iterdir()) == []


def test_disk_full_at_an_entry_point_exits_2(synthetic_cityscapes, weights, tmp_path, capsys, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(common.io.os, "fsync", full)
    c = Ctx(synthetic_cityscapes, weights, tmp_path)
    out = tmp_path / "val" / "results.json"
    with pytest.raises(SystemExit) as exc:
        ifvd_val.main(eval_argv(c, "val") + ["--results", str(out), "--outputs-dir", ""])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (f"error: no space left on device while writing {out}; "
                                            "free space or choose another output folder")
    assert list(out.parent.iterdir()) == []


# ------------------------------------------------------------------------------------ stale temp files
def test_a_new_run_removes_the_stale_temps_of_its_own_files(synthetic_cityscapes, weights, tmp_path, capsys):
    """Six leftovers of interrupted atomic writes: the run's own (state, weights, results, args, metrics) are
    removed when the run starts, a temp of a file the run does not own stays."""
    run = tmp_path / "ckpt" / "exp"
    run.mkdir(parents=True)
    own = [".training_state.pth.k2j4_x9q.tmp", ".city_1_G.pth.a1b2c3d4.tmp", ".city_1_D.pth.zzzzzzzz.tmp",
           ".results.json.0000abcd.tmp", ".args.json.q1w2e3r4.tmp", ".metrics.jsonl.t5y6u7i8.tmp"]
    for name in own + [".notes.txt.abcdefgh.tmp"]:
        (run / name).write_bytes(b"partial")
    c = Ctx(synthetic_cityscapes, weights, tmp_path)
    with pytest.raises(SystemExit):  # stops at the teacher, after the run folder was prepared
        ifvd_train.main(ifvd_argv(c) + ["--T_ckpt_path", str(tmp_path / "missing.pth")])
    assert "teacher checkpoint" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == [".notes.txt.abcdefgh.tmp"]


def test_remove_stale_temps_matches_only_the_temp_name_pattern(tmp_path):
    for name in ("results.json", ".results.json.abc.tmp", ".results.json.abc", "x.results.json.abc.tmp"):
        (tmp_path / name).write_text("x")
    assert [p.name for p in remove_stale_temps(tmp_path, ["results.json"])] == [".results.json.abc.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".results.json.abc", "results.json",
                                                          "x.results.json.abc.tmp"]


# ----------------------------------------------------------------------------- rerun into a run folder
def test_fresh_run_keeps_the_earlier_logs(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.txt").write_text("old log\n")
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": i}) + "\n" for i in range(40)))
    logger = RunLogger(run, "h11.test", start_step=0)
    logger.log_step(0, loss=1.0)
    logger.close()
    assert (run / "log.1.txt").read_text() == "old log\n"
    assert len((run / "metrics.1.jsonl").read_text().splitlines()) == 40
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
    assert f"kept the earlier logs of {run} as log.1.txt, metrics.1.jsonl" in (run / "log.txt").read_text()
    RunLogger(run, "h11.test", start_step=0).close()  # a third run: the second one's logs become .2
    assert (run / "metrics.2.jsonl").read_text().count("\n") == 1 and (run / "log.1.txt").read_text() == "old log\n"


def test_resumed_run_appends_to_its_logs(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.txt").write_text("first part\n")
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": i}) + "\n" for i in range(4)))
    RunLogger(run, "h11.test", start_step=2).close()
    assert sorted(p.name for p in run.iterdir() if p.is_file()) == ["log.txt", "metrics.jsonl"]
    assert (run / "log.txt").read_text().startswith("first part\n")
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [0, 1]


# ------------------------------------------------------------------------------------ --help and --tf32
def parsers():
    from common.train_baseline import get_parser
    from cwd import options as cwd_options
    from ifvd import options as ifvd_options
    from skd import options as skd_options

    return {"cwd/train.py": cwd_options.train_parser(), "cwd/val.py": cwd_options.eval_parser("val"),
            "cwd/test.py": cwd_options.eval_parser("test"), "ifvd/train.py": ifvd_options.train_parser(),
            "ifvd/val.py": ifvd_options.eval_parser("val"), "ifvd/test.py": ifvd_options.eval_parser("test"),
            "skd/train_and_eval.py": skd_options.train_parser(), "skd/test.py": skd_options.prediction_parser(),
            "common.train_baseline": get_parser()}


def test_every_flag_has_a_help_text():
    undocumented = {name: [a.option_strings[0] for a in p._actions if not (a.help or "").strip()]
                    for name, p in parsers().items()}
    assert undocumented == {name: [] for name in undocumented}


@pytest.mark.parametrize("entry,values", [
    ("cwd/train.py", ["channel, spatial, channel_mean or none", "kl or mse", "wgan-gp or hinge", "True/False",
                      "{inplace_abn,abn,auto,bn}", "{bf16,fp16}"]),
    ("ifvd/train.py", ["wgan-gp or hinge", "True/False", "{pspnet_resnet101,pspnet_resnet18}"]),
    ("skd/train_and_eval.py", ["wgan-gp or hinge", "in (0, 1]", "{pspnet_resnet101,pspnet_resnet18}"]),
])
def test_help_lists_the_choices(entry, values, capsys):
    with pytest.raises(SystemExit):
        ENTRIES[entry][0](["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for value in values:
        assert value in text, value


class Reached(Exception):
    """Raised by the stand-in of set_tf32: the entry point got there with this flag value."""


@pytest.mark.parametrize("entry,module", [
    ("cwd/train.py", cwd_train), ("cwd/val.py", cwd_val), ("cwd/test.py", cwd_test),
    ("ifvd/train.py", ifvd_train), ("ifvd/val.py", ifvd_val), ("ifvd/test.py", ifvd_test),
    ("skd/train_and_eval.py", skd_train), ("skd/test.py", skd_test),
    ("common.train_baseline", sys.modules["common.train_baseline"]),
])
@pytest.mark.parametrize("flag", [[], ["--tf32"]])
def test_every_entry_point_sets_the_tf32_flag(entry, module, flag, synthetic_cityscapes, weights, tmp_path,
                                              monkeypatch):
    """fp32 like the originals unless --tf32 (issue 13 item 1): each entry point calls set_tf32(args.tf32)."""
    def reached(enabled):
        raise Reached(enabled)

    monkeypatch.setattr(module, "set_tf32", reached)
    main, base = ENTRIES[entry]
    with pytest.raises(Reached) as exc:
        main(base(Ctx(synthetic_cityscapes, weights, tmp_path)) + flag)
    assert exc.value.args == (bool(flag),)


def test_cwd_train_sets_deterministic_cudnn(synthetic_cityscapes, weights, tmp_path, monkeypatch):
    """cwd.md §3.2 a: cudnn.deterministic = True, benchmark = False before the models are built."""
    seen = {}

    def build_student(args, device):
        seen.update(deterministic=torch.backends.cudnn.deterministic, benchmark=torch.backends.cudnn.benchmark)
        raise Reached()

    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    monkeypatch.setattr(cwd_train, "build_student", build_student)
    with pytest.raises(Reached):
        cwd_train.main(cwd_argv(Ctx(synthetic_cityscapes, weights, tmp_path)))
    assert seen == {"deterministic": True, "benchmark": False}


# --------------------------------------------------------------------------------------- seeds by rank
def test_ranks_draw_their_own_dropout_masks_and_one_process_is_unchanged():
    from common.engine.dist import DistInfo
    from common.recipes.run import seed_rank

    def info(rank, world):
        return DistInfo(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"), is_main=rank == 0)

    torch.manual_seed(5)
    expected_rank0 = torch.rand(4)
    torch.manual_seed(5)
    seed_rank(5, info(0, 1))
    assert torch.equal(torch.rand(4), expected_rank0)  # rank 0 / one process: the stream goes on untouched
    torch.manual_seed(5 + 1)  # rank 1 of 2 at step 0: seed + rank
    expected_rank1 = torch.rand(4)
    torch.manual_seed(5)
    seed_rank(5, info(1, 2))
    drawn = torch.rand(4)
    assert torch.equal(drawn, expected_rank1) and not torch.equal(drawn, expected_rank0)
    torch.manual_seed(5 + 1 + 2 * 10)  # the same rank resumed at step 10: seed + rank + world_size * step
    expected_resumed = torch.rand(4)
    seed_rank(5, info(1, 2), start_step=10)
    assert torch.equal(torch.rand(4), expected_resumed)


# ------------------------------------------------------------ CIRKD and AICSD: crops and output folders (issue 18)
@pytest.fixture(scope="module")
def cirkd_camvid(tmp_path_factory):
    """Tiny CamVid with CIRKD's lists and a DeepLabV3-R18 CamVid checkpoint."""
    from common.datasets.synthetic import make_camvid

    root = tmp_path_factory.mktemp("cirkd_bad_input")
    lists = make_camvid(root / "camvid", {"train": 2, "val": 1, "test": 1}, size=(48, 64), cirkd_lists=True)
    torch.manual_seed(0)
    torch.save(build_model("deeplabv3_resnet18", num_classes=11).state_dict(), root / "r18.pth")
    return root / "camvid", lists, root / "r18.pth"


def cirkd_train_argv(data, tmp):
    root, lists, _ = data
    return ["--model", "deeplabv3", "--backbone", "resnet18", "--dataset", "camvid", "--data", str(root),
            "--train-list", lists["train"], "--val-list", lists["val"], "--crop-size", "32", "32", "--batch-size", "2",
            "--max-iterations", "2", "--log-iter", "1", "-j", "0", "--pretrained-base", "None", "--device", "cpu",
            "--save-dir", str(tmp / "ckpt"), "--log-dir", str(tmp / "logs")]


def cirkd_eval_argv(data, tmp):
    root, lists, weights = data
    return ["--dataset", "camvid", "--data", str(root), "--data-list", lists["test"], "--pretrained", str(weights),
            "-j", "0", "--device", "cpu", "--save-dir", str(tmp / "eval")]


NOT_A_FOLDER = "error: {flag} {file} is a file, not a folder; pass a folder"


@pytest.mark.parametrize("entry,extra,sentence", [
    ("train", lambda c: ["--crop-size", "0", "0"], "error: argument --crop-size: must be > 0, got 0"),
    ("train", lambda c: ["--crop-size", "-4", "32"], "error: argument --crop-size: must be > 0, got -4"),
    ("train", lambda c: ["--lr", "nan"], "error: argument --lr: must be a finite number, got 'nan'"),
    ("train", lambda c: ["--save-dir", str(c.file)], NOT_A_FOLDER.replace("{flag}", "--save-dir")),
    ("train", lambda c: ["--log-dir", str(c.file)], NOT_A_FOLDER.replace("{flag}", "--log-dir")),
    ("eval", lambda c: ["--save-dir", str(c.file)], NOT_A_FOLDER.replace("{flag}", "--save-dir")),
], ids=["crop 0", "crop negative", "lr nan", "save-dir file", "log-dir file", "eval save-dir file"])
def test_cirkd_bad_crop_or_output_folder_is_one_sentence(entry, extra, sentence, cirkd_camvid, tmp_path, capsys):
    """``--crop-size 0 0`` used to fail deep in a convolution and ``--save-dir <file>`` with NotADirectoryError."""
    from cirkd import eval as cirkd_eval
    from cirkd import train_baseline as cirkd_train

    c = Ctx(cirkd_camvid[0], None, tmp_path / "ctx")
    main, argv = (cirkd_train.main, cirkd_train_argv) if entry == "train" else (cirkd_eval.main, cirkd_eval_argv)
    with pytest.raises(SystemExit) as exc:
        main(argv(cirkd_camvid, tmp_path) + extra(c))
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].endswith(sentence.format(file=c.file))
    assert not [p for p in files_below(tmp_path) if p.suffix == ".pth"]


def test_aicsd_save_dir_naming_a_file_is_one_sentence(tmp_path, capsys):
    from aicsd import train as aicsd_train
    from common.datasets.synthetic import make_voc

    make_voc(tmp_path / "voc", splits={"train": 2, "val": 1}, size=(48, 64), seed=0)
    afile = tmp_path / "a_file"
    afile.write_text("x")
    argv = ["--data-dir", str(tmp_path / "voc"), "--crop-size", "33", "--base-size", "33", "--batch-size", "2",
            "--epochs", "1", "--workers", "0", "--imagenet-weights", "none", "--device", "cpu",
            "--save-dir", str(afile)]
    with pytest.raises(SystemExit) as exc:
        aicsd_train.main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == NOT_A_FOLDER.format(flag="--save-dir", file=afile)


def test_skd_esp_snapshot_dir_naming_a_file_is_one_sentence(synthetic_camvid, tmp_path, capsys):
    from skd import train_esp

    afile = tmp_path / "a_file"
    afile.write_text("x")
    with pytest.raises(SystemExit) as exc:
        main_guard(train_esp.main)(["--method", "student_esp_e", "--data_dir", str(synthetic_camvid), "--sd_mode",
                                    "label", "--num-steps", "2", "--batch-size", "2", "--input-size", "120,160",
                                    "--snapshot-dir", str(afile), "--num-workers", "0", "--num-threads", "1"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == NOT_A_FOLDER.format(flag="--snapshot-dir", file=afile)


def test_skd_demo_out_naming_a_file_is_one_sentence(tmp_path, capsys):
    from skd import demo_camvid

    for name in ("ckpt/SD+KD+CITY_65.1.pth", "ckpt/base_57.8.pth", "camvid/train.txt", "camvid/test.txt"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("")
    afile = tmp_path / "a_file"
    afile.write_text("x")
    with pytest.raises(SystemExit) as exc:
        main_guard(demo_camvid.main)(["--camvid", str(tmp_path / "camvid"), "--ckpt-dir", str(tmp_path / "ckpt"),
                                      "--out", str(afile)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == NOT_A_FOLDER.format(flag="--out", file=afile)


def test_skd_eval_output_path_naming_a_file_is_one_sentence(synthetic_camvid, tmp_path, capsys):
    from skd import eval_esp

    torch.save(build_model("espnet_c", num_classes=11).state_dict(), tmp_path / "ckpt.pth")
    afile = tmp_path / "a_file"
    afile.write_text("x")
    with pytest.raises(SystemExit) as exc:
        main_guard(eval_esp.main)(["--method", "student_esp_e", "--dataset", "camvid_light", "--data_list",
                                   str(synthetic_camvid / "test.txt"), "--data_dir", str(synthetic_camvid),
                                   "--num_classes", "11", "--restore-from", str(tmp_path / "ckpt.pth"),
                                   "--store-output", "True", "--output_path", str(afile), "--num-workers", "0"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == NOT_A_FOLDER.format(flag="--output-path", file=afile)


@pytest.mark.parametrize("target,sentence", [
    ("folder", "error: --output {path} is a folder; pass a file path"),
    ("below_file", "error: --output {path} cannot be written: {parent} is a file, not a folder; pass another path"),
])
def test_tables_output_that_cannot_be_a_file_is_one_sentence(target, sentence, tmp_path, capsys):
    from common.tables.__main__ import main as tables_main

    (tmp_path / "results").mkdir()
    (tmp_path / "a_file").write_text("x")
    path = tmp_path / "results" if target == "folder" else tmp_path / "a_file" / "table.md"
    with pytest.raises(SystemExit) as exc:
        tables_main(["--results-dir", str(tmp_path / "results"), "--no-complexity", "--output", str(path)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == sentence.format(path=path, parent=path.parent)


def test_cityscapes_make_lists_out_naming_a_file_is_one_sentence(synthetic_cityscapes, tmp_path, capsys):
    from common.datasets.cityscapes import main as cityscapes_main

    afile = tmp_path / "a_file"
    afile.write_text("x")
    with pytest.raises(SystemExit) as exc:
        cityscapes_main(["make-lists", str(synthetic_cityscapes), "--out", str(afile)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == NOT_A_FOLDER.format(flag="--out", file=afile)


def test_cirkd_test_save_dir_naming_a_file_is_one_sentence(tmp_path, capsys):
    from cirkd import test as cirkd_test
    from common.datasets.synthetic import make_cityscapes

    lists = make_cityscapes(tmp_path / "citys", {"test": 1}, size=(64, 128))
    torch.save(build_model("deeplabv3_resnet18", num_classes=19).state_dict(), tmp_path / "r18.pth")
    afile = tmp_path / "a_file"
    afile.write_text("x")
    with pytest.raises(SystemExit) as exc:
        cirkd_test.main(["--data", str(tmp_path / "citys"), "--data-list", lists["test"], "--pretrained",
                         str(tmp_path / "r18.pth"), "--save-dir", str(afile), "-j", "0", "--device", "cpu"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == NOT_A_FOLDER.format(flag="--save-dir", file=afile)

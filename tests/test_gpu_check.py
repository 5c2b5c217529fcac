"""common/gpu_check.py (``make gpu-check``, issue 13 item 8): the no-GPU exit, "not present" entries, the
summary's verdict, and that every entry row's flags parse with its script's own parser."""
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common import gpu_check

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a CUDA device")
def test_without_gpu_one_line_and_exit_0():
    proc = subprocess.run([sys.executable, "-m", "common.gpu_check"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("\n") == 1 and proc.stdout.startswith("gpu-check: nothing to check: ")


def test_without_torch_and_without_gpu_device_nothing_to_check(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    assert "no CUDA GPU on this machine" in gpu_check.no_gpu_reason(dev=tmp_path)


def test_gpu_device_without_torch_is_an_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch", None)
    (tmp_path / "nvidia0").touch()
    with pytest.raises(SystemExit, match="cannot import torch; choose an interpreter"):
        gpu_check.no_gpu_reason(dev=tmp_path)


def test_missing_script_is_not_present_and_not_run(tmp_path):
    (stage,) = gpu_check.entry_stages([("cirkd/no_such_script.py", "--x {out}")], sys.executable, {}, {}, tmp_path,
                                      tmp_path)
    assert (stage.status, stage.failed) == ("not present", False)
    assert "cirkd/no_such_script.py does not exist yet" in stage.note
    assert not (tmp_path / "runs").exists()


def test_present_entry_runs_as_module_on_cuda_and_fails_cleanly(tmp_path):
    # gpu_check itself has no --device flag: the appended "--device cuda" makes it exit 2, a failed stage
    (stage,) = gpu_check.entry_stages([("common.gpu_check", "--keep {out}")], sys.executable, {},
                                      {"PATH": "/usr/bin:/bin"}, tmp_path, tmp_path)
    assert stage.status == "FAIL" and stage.note.startswith("exit 2:") and "--device" in stage.note
    log = (tmp_path / "1_step:_common.gpu_check.log").read_text()
    assert "unrecognized arguments: --device cuda" in log


def test_summary_names_failures_and_passes_not_present():
    ok = [gpu_check.Stage("build", "ok", 1.0, "built"), gpu_check.Stage("1 step: x.py", "not present")]
    text = gpu_check.summary(ok, 12.0)
    assert text.splitlines()[0].split() == ["stage", "status", "seconds", "note"]
    assert "1 step: x.py  not present" in text and text.endswith("gpu-check: all present stages passed (12 s)")
    failed = gpu_check.summary(ok + [gpu_check.Stage("CUDA tests", "FAIL", 3.0, "exit 1: 2 failed")], 5.0)
    assert failed.endswith("gpu-check: FAILED: CUDA tests (5 s)")


def _parsers():
    from aicsd import train as aicsd_train
    from aicsd import train_kd as aicsd_train_kd
    from cirkd import train_baseline as cirkd_train_baseline
    from cirkd import train_kd as cirkd_train_kd
    from common.train_baseline import get_parser
    from cwd.options import train_parser as cwd_parser
    from ifvd.options import train_parser as ifvd_parser
    from skd import train_esp
    from skd.options import train_parser as skd_parser

    return {"common.train_baseline": lambda argv: get_parser().parse_args(argv),
            "cwd/train.py": lambda argv: cwd_parser().parse_args(argv),
            "ifvd/train.py": lambda argv: ifvd_parser().parse_args(argv),
            "skd/train_and_eval.py": lambda argv: skd_parser().parse_args(argv),
            "skd/train_esp.py": train_esp.parse_args,
            "cirkd/train_baseline.py": lambda argv: cirkd_train_baseline.build_parser().parse_args(argv),
            "cirkd/train_kd.py": lambda argv: cirkd_train_kd.build_parser().parse_args(argv),
            "aicsd/train.py": lambda argv: aicsd_train.parser().parse_args(argv),
            "aicsd/train_kd.py": lambda argv: aicsd_train_kd.parser().parse_args(argv)}


@pytest.mark.parametrize("target,flags", gpu_check.ENTRY_POINTS, ids=[t for t, _ in gpu_check.ENTRY_POINTS])
def test_entry_flags_parse_with_the_script_parser(target, flags, monkeypatch):
    _, path = gpu_check.script_command(sys.executable, target)
    if not path.is_file():
        pytest.skip(f"{target} does not exist yet")
    parsers = _parsers()
    if target not in parsers:
        pytest.skip(f"no parser registered in this test for {target}")
    monkeypatch.delenv("SEGKD_DEMO", raising=False)
    fills = {k: f"/x/{k}" for k in ("cityscapes", "camvid", "t101", "t101_toolbox", "r18_imagenet", "esp_teacher",
                                    "cirkd_teacher", "aicsd_teacher")}
    fills["city"] = "--data-dir /x/c --data-list /x/c/train.lst --data-listval /x/c/val.lst"
    args = parsers[target](shlex.split(flags.format(out="/x/out", **fills)) + ["--device", "cuda"])
    assert args.device == "cuda"

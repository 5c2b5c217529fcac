"""``python -m common.compare`` (issue 20): protocol checks, aggregation, resume, dry runs, SLURM via submitit."""
import csv
import json
import math
import os
import re
from pathlib import Path

import pytest

from common.compare import __main__ as cli
from common.compare import report
from common.compare.launch import Run, finished
from common.compare.protocol import load_protocol, shipped_protocols

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def write_protocol(tmp_path, teacher_ckpt=None, **changes):
    """A small valid protocol file (synthetic data, ESPNet-C student); ``changes`` replace whole lines by key."""
    ckpt = teacher_ckpt or tmp_path / "teacher.pth"
    if teacher_ckpt is None:
        ckpt.write_bytes(b"not loaded by method none")
    lines = {
        "t_network": '[teacher]\nnetwork = "espnet"',
        "t_ckpt": f'checkpoint = "{ckpt}"',
        "student": '[student]\nnetwork = "espnet_c"',
        "data": '[data]\ndataset = "synthetic"',
        "synthetic": "[data.synthetic]\nsize = [32, 32]\ntrain = 4\nval = 2",
        "train": "[train]\ncrop = [32, 32]\nbatch = 2\niterations = 2\nlr = 0.01\nweight_decay = 1e-4\nnum_workers = 0",
        "methods": '[methods]\nrun = ["none", "kd"]',
        "run": "[run]\nseeds = [0, 1]",
    }
    lines.update(changes)
    path = tmp_path / "proto.toml"
    path.write_text("\n".join(lines.values()) + "\n")
    return path


def user_error(capsys, argv):
    """Run the CLI expecting a user error: exit 2 and one sentence on stderr."""
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


# ------------------------------------------------------------------------------------------ protocol checks
@pytest.mark.parametrize("change, words", [
    ({"methods": '[methods]\nrun = ["none", "kdd"]'}, ["unknown method 'kdd'", "cwd"]),
    ({"student": '[student]\nnetwork = "resnet_9000"'}, ["[student] network 'resnet_9000'", "espnet_c"]),
    ({"data": '[data]\ndataset = "kitti"'}, ["dataset 'kitti'", "camvid"]),
    ({"methods": '[methods]\nrun = ["none", { name = "kd", weights = { "kd.wieght" = 2.0 } }]'},
     ["unknown weight 'kd.wieght'", "temperature"]),
    ({"methods": '[methods]\nrun = ["none", { name = "kd", weights = { "cwd.logits" = 2.0 } }]'},
     ["weight 'cwd.logits' of method 'kd'"]),
    ({"methods": '[methods]\nrun = ["kd"]'}, ["baseline 'none' is not among the methods"]),
    ({"data": '[data]\ndataset = "synthetic"\npipeline = "caffe"'}, ["[data] pipeline = 'caffe' is not one of", "esp"]),
    ({"data": '[data]\ndataset = "synthetic"\npipeline = "aicsd"'},
     ["[data] pipeline 'aicsd' does not read the dataset synthetic", "psp"]),
    ({"train": "[train]\ncrop = [32, 32]\nbatch = 2\niterations = 2\nlr = 0.01\nweight_decay = 1e-4\nsteps = 3"},
     ["unknown key 'steps' in [train]"]),
])
def test_protocol_errors_are_one_sentence(tmp_path, capsys, change, words):
    err = user_error(capsys, [str(write_protocol(tmp_path, **change)), "--out", str(tmp_path / "out")])
    for word in words:
        assert word in err
    assert not (tmp_path / "out").exists()  # refused before any run


def test_missing_teacher_file_and_variable(tmp_path, capsys, monkeypatch):
    out = ["--out", str(tmp_path / "out")]
    err = user_error(capsys, [str(write_protocol(tmp_path, teacher_ckpt=tmp_path / "gone.pth")), *out])
    assert "[teacher] checkpoint" in err and "gone.pth does not exist" in err
    monkeypatch.delenv("SEGKD_TEST_TEACHER", raising=False)
    path = write_protocol(tmp_path, t_ckpt='checkpoint = "${SEGKD_TEST_TEACHER}/t.pth"')
    err = user_error(capsys, [str(path), *out])
    assert "environment variable SEGKD_TEST_TEACHER" in err
    assert not (tmp_path / "out").exists()
    monkeypatch.setenv("SEGKD_TEST_TEACHER", str(tmp_path))
    (tmp_path / "t.pth").write_bytes(b"x")
    assert load_protocol(str(path)).teacher["checkpoint"] == f"{tmp_path}/t.pth"


def test_unknown_protocol_and_bad_batch_split(tmp_path, capsys):
    err = user_error(capsys, ["no_such_protocol"])
    assert "unknown protocol 'no_such_protocol'" in err and "demo" in err
    err = user_error(capsys, ["aicsd_voc", "--dry-run", "--launcher", "slurm", "--gpus-per-run", "4"])
    assert "total batch 6" in err and "4 GPUs" in err


def test_shipped_protocols_load():
    assert {"psp_citys", "cirkd_citys", "aicsd_voc", "camvid_espnet", "demo"} <= set(shipped_protocols())
    for name in shipped_protocols():
        protocol = load_protocol(name, strict=False)
        assert protocol.baseline == "none" and protocol.methods
    demo = load_protocol("demo", strict=False)
    from common.methods import list_methods

    assert sorted(m.name for m in demo.methods) == list_methods() and len(demo.seeds) == 2


def test_data_pipeline_reaches_the_command_and_the_stamp(tmp_path):
    """[data] pipeline becomes distill's --data-pipeline (default cirkd) and changes the run stamp; the shipped
    protocols read their lineage's pipeline (psp_citys psp, cirkd_citys cirkd, aicsd_voc aicsd, camvid_espnet esp)."""
    from common.compare.protocol import distill_args

    def command(data):
        protocol = load_protocol(str(write_protocol(tmp_path, data=data)))
        args = distill_args(protocol, protocol.methods[0], 0, tmp_path / "out")
        return args[args.index("--data-pipeline") + 1], args[args.index("--extra") + 1:]

    default, default_stamp = command('[data]\ndataset = "synthetic"')
    esp, esp_stamp = command('[data]\ndataset = "synthetic"\npipeline = "esp"')
    assert (default, esp) == ("cirkd", "esp") and default_stamp != esp_stamp
    shipped = {name: load_protocol(name, strict=False).data["pipeline"]
               for name in ("psp_citys", "cirkd_citys", "aicsd_voc", "camvid_espnet", "demo")}
    assert shipped == {"psp_citys": "psp", "cirkd_citys": "cirkd", "aicsd_voc": "aicsd", "camvid_espnet": "esp",
                       "demo": "cirkd"}


# ------------------------------------------------------------------------------------------------ dry runs
def _expected(protocol):
    return [(m.label, m.name, s) for m in protocol.methods for s in protocol.seeds]


@pytest.mark.parametrize("name", ["psp_citys", "cirkd_citys", "aicsd_voc"])
@pytest.mark.parametrize("launcher", ["local", "slurm"])
def test_dry_run_prints_every_command(name, launcher, capsys, tmp_path):
    protocol = load_protocol(name, strict=False)
    argv = [name, "--dry-run", "--launcher", launcher, "--out", str(tmp_path / "o")]
    if launcher == "slurm":
        argv += ["--partition", "gpu", "--gpus-per-run", "2", "--time", "600"]
    cli.main(argv)
    out = capsys.readouterr().out
    commands = [line for line in out.splitlines() if "-m common.distill" in line]
    assert len(commands) == len(_expected(protocol))
    for (label, method, seed), line in zip(_expected(protocol), commands):
        assert f"--method {method} " in line and f"--seed {seed} " in line
        assert f"--out {tmp_path / 'o' / label / f'seed{seed}'} " in line
        assert f"--batch-size {protocol.train['batch']} " in line and f"--lr {protocol.train['lr']!r} " in line
        assert "torch.distributed.run" not in line  # SLURM: one task per GPU runs distill itself
    assert "batch/lr rule" in out
    if launcher == "slurm":
        assert "'slurm_partition': 'gpu'" in out and "'tasks_per_node': 2" in out and "'timeout_min': 600" in out
    assert not (tmp_path / "o").exists()


def test_dry_run_local_torchrun(capsys):
    cli.main(["cirkd_citys", "--dry-run", "--gpus-per-run", "8", "--device", "cpu", "--methods", "cirkd",
              "--seeds", "1"])
    out = capsys.readouterr().out
    # on the CPU a run is one process whatever --gpus-per-run says; the batch is the protocol's
    assert "one process takes all 16" in out and out.count("-m common.distill") == 1


def test_wallclock_budget_passes_the_time_budget(tmp_path, capsys):
    path = write_protocol(tmp_path, run='[run]\nseeds = [0]\nbudget = "wallclock"\nseconds = 30')
    cli.main([str(path), "--dry-run"])
    out = capsys.readouterr().out
    assert out.count("--time-budget 30 ") == 2 and "iterations differ per method" in out
    err = user_error(capsys, [str(write_protocol(tmp_path, run='[run]\nbudget = "wallclock"')), "--dry-run"])
    assert "needs seconds" in err


# -------------------------------------------------------------------------------------------- aggregation
def fake_result(run_dir, method, seed, miou, stamp="x", iou=None, wall=36.0, device="cpu"):
    """A hand-made distill results.json (fractions, as distill writes them)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    data = {"paper": "distill", "method": method, "model": "espnet_c", "dataset": "synthetic", "split": "val",
            "miou": miou, "iterations": 100, "crop": [32, 32], "batch": 2, "seed": seed, "iou": iou,
            "wall_time_s": wall, "images_per_s": 10.0, "peak_mem_mb": 500.0 + seed,
            "extra": {"protocol": {"compare_stamp": stamp}, "train_seconds_per_iter": 0.25, "world_size": 1,
                      "device": device, "class_names": ["a", "b"]}}
    (run_dir / "results.json").write_text(json.dumps(data))


def test_aggregation_by_hand(tmp_path):
    path = write_protocol(tmp_path, methods='[methods]\nrun = ["none", "kd", { name = "kd", label = "kd2" }, '
                                            '{ name = "kd", label = "kd3" }]', run="[run]\nseeds = [0, 1, 2]")
    protocol = load_protocol(str(path))
    values = {"none": [0.50, 0.51, 0.52], "kd": [0.53, 0.54, 0.55], "kd2": [0.505, 0.515, 0.525],
              "kd3": [0.49, 0.51, 0.55]}
    runs = []
    for label, mious in values.items():
        for seed, miou in enumerate(mious):
            run = Run(label, seed, tmp_path / "out" / label / f"seed{seed}", [], "x")
            fake_result(run.dir, label, seed, miou, iou=[miou, None if seed == 0 else 0.2 * (seed + 1)])
            runs.append(run)
    text = report.write_report(protocol, runs, tmp_path / "out", failed=[("kd seed 9", tmp_path / "log")])
    rows = {r["label"]: r for r in json.loads((tmp_path / "out" / "compare.json").read_text())["rows"]}
    # none and kd: means 51 and 54, sample std 1 each (ddof = 1); equal variances and n = 3 give Welch's
    # df = 2(n-1) = 4 and t_{0.975,4} = 2.776445105 (t table); half width 2.776445105 * sqrt(1/3 + 1/3)
    assert rows["none"]["miou_mean"] == pytest.approx(51.0, abs=1e-9)
    assert rows["none"]["miou_std"] == pytest.approx(1.0, abs=1e-9)
    half = 2.776445105 * math.sqrt(2 / 3)
    assert rows["kd"]["delta"] == pytest.approx(3.0, abs=1e-9)
    assert (rows["kd"]["ci_low"], rows["kd"]["ci_high"]) == pytest.approx((3 - half, 3 + half), abs=1e-6)
    assert rows["kd"]["resolved"] is True
    assert rows["kd2"]["delta"] == pytest.approx(0.5, abs=1e-9) and rows["kd2"]["resolved"] is False
    # unequal variances: Welch–Satterthwaite df by hand, t quantile from the t distribution
    a, b = [49.0, 51.0, 55.0], [50.0, 51.0, 52.0]
    va = ((49 - 155 / 3) ** 2 + (51 - 155 / 3) ** 2 + (55 - 155 / 3) ** 2) / 2
    vb = 1.0
    se2 = va / 3 + vb / 3
    df = se2 ** 2 / ((va / 3) ** 2 / 2 + (vb / 3) ** 2 / 2)
    from scipy.stats import t

    half = t.ppf(0.975, df) * math.sqrt(se2)
    diff = sum(a) / 3 - sum(b) / 3
    assert (rows["kd3"]["ci_low"], rows["kd3"]["ci_high"]) == pytest.approx((diff - half, diff + half), abs=1e-6)
    assert rows["kd3"]["miou_std"] == pytest.approx(math.sqrt(va), abs=1e-9)
    # per-class IoU: class a = the mIoU values; class b skipped (None) for seed 0 -> mean of 40 and 60
    assert rows["kd"]["iou"] == pytest.approx([54.0, 50.0], abs=1e-9)
    # cost: peak memory is the max over seeds, CPU-hours the sum of wall time x processes
    assert rows["kd"]["peak_mem_mb"] == 502.0 and rows["kd"]["device_hours"] == pytest.approx(3 * 36 / 3600)
    lines = {line.split(" | ")[0].strip("| "): line for line in text.splitlines()
             if line.startswith("| kd") and "±" in line}
    assert "not resolved" in lines["kd2"] and "not resolved" not in lines["kd"]
    assert "(reference)" in text and "CPU-h" in text and "kd seed 9" in text
    with open(tmp_path / "out" / "compare.csv") as fh:
        table = list(csv.DictReader(fh))
    assert [r["label"] for r in table] == ["none", "kd", "kd2", "kd3"] and float(table[1]["delta"]) == pytest.approx(3)
    assert (tmp_path / "out" / "compare.png").read_bytes()[:4] == b"\x89PNG"


def test_tables_show_comparisons(tmp_path, capsys):
    from common.tables.__main__ import main as tables_main

    protocol = load_protocol(str(write_protocol(tmp_path)))
    runs = [Run(label, seed, tmp_path / "out" / label / f"seed{seed}", [], "x") for label in ("none", "kd")
            for seed in (0, 1)]
    for run in runs:
        fake_result(run.dir, run.label, run.seed, 0.4 + 0.1 * (run.label == "kd") + 0.01 * run.seed)
    report.write_report(protocol, runs, tmp_path / "out")
    tables_main(["--results-dir", str(tmp_path), "--no-complexity", "--paper", "cwd"])
    assert "Comparisons under one protocol" not in capsys.readouterr().out
    tables_main(["--results-dir", str(tmp_path), "--no-complexity"])
    out = capsys.readouterr().out
    assert "## Comparisons under one protocol" in out and "### Comparison `proto`" in out
    assert "| kd | 2 | 50.50 ± 0.71 | +10.00 [" in out


def test_one_seed_has_no_interval(tmp_path):
    protocol = load_protocol(str(write_protocol(tmp_path)))
    runs = [Run(label, 0, tmp_path / label, [], "x") for label in ("none", "kd")]
    for run, miou in zip(runs, (0.5, 0.6)):
        fake_result(run.dir, run.label, 0, miou)
    rows = report.summarise(protocol, report.collect(runs))
    assert rows[1]["delta"] == pytest.approx(10.0) and rows[1]["ci_low"] is None and rows[1]["miou_std"] is None


# ----------------------------------------------------------------------------------------------- resume
def test_rerun_launches_only_unfinished_runs(tmp_path, monkeypatch, capsys):
    path = write_protocol(tmp_path)
    out = tmp_path / "out"
    protocol = load_protocol(str(path))
    runs = {(r.label, r.seed): r for r in cli.make_runs(protocol, protocol.methods, protocol.seeds, out)}
    fake_result(runs["none", 0].dir, "none", 0, 0.40, stamp=runs["none", 0].stamp)
    fake_result(runs["kd", 1].dir, "kd", 1, 0.45, stamp=runs["kd", 1].stamp)
    fake_result(runs["kd", 0].dir, "kd", 0, 0.99, stamp="settings-of-another-protocol")
    kept = {k: (runs[k].dir / "results.json").read_bytes() for k in (("none", 0), ("kd", 1))}
    launched = []

    def fake_local(batch, **kwargs):
        for run in batch:
            launched.append((run.label, run.seed))
            fake_result(run.dir, run.label, run.seed, 0.5, stamp=run.stamp)
        return {r.title: 0 for r in batch}

    monkeypatch.setattr(cli, "run_local", fake_local)
    cli.main([str(path), "--out", str(out), "--device", "cpu"])
    assert sorted(launched) == [("kd", 0), ("none", 1)]  # the stale kd seed 0 is redone, the finished two kept
    assert all((runs[k].dir / "results.json").read_bytes() == v for k, v in kept.items())
    assert "2 of 4 runs finished already" in capsys.readouterr().out
    launched.clear()
    cli.main([str(path), "--out", str(out), "--device", "cpu"])
    assert launched == []


def test_failed_run_is_listed_and_the_table_still_prints(tmp_path, monkeypatch, capsys):
    path = write_protocol(tmp_path)

    def fake_local(batch, **kwargs):
        for run in batch:
            if run.label == "none":
                fake_result(run.dir, run.label, run.seed, 0.5 + run.seed / 100, stamp=run.stamp)
        return {r.title: int(r.label != "none") for r in batch}

    monkeypatch.setattr(cli, "run_local", fake_local)
    with pytest.raises(SystemExit) as exc:
        cli.main([str(path), "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert exc.value.code == 1
    captured = capsys.readouterr()
    assert "| none | 2 | 50.50 ± 0.71 |" in captured.out and "2 run(s) failed" in captured.err
    assert re.search(r"kd seed 0: .*kd/seed0/run.log", captured.err)


# -------------------------------------------------------------------------------------------- real runs
def test_slurm_launcher_runs_a_job_through_submitit(tmp_path, capsys):
    pytest.importorskip("submitit", reason="submitit (the slurm extra) is not installed")
    path = write_protocol(tmp_path)
    out = tmp_path / "out"
    cli.main([str(path), "--launcher", "slurm", "--slurm-cluster", "local", "--device", "cpu", "--methods", "none",
              "--seeds", "1", "--out", str(out), "--time", "10"])
    result = json.loads((out / "none" / "seed0" / "results.json").read_text())
    assert result["method"] == "none" and result["iterations"] == 2 and result["extra"]["device"] == "cpu"
    assert (out / "none" / "seed0" / "run.log").is_file() and list((out / "none" / "seed0" / "slurm").iterdir())
    assert "| none | 1 |" in capsys.readouterr().out


@pytest.mark.slow
def test_demo_protocol_end_to_end_shrunk(tmp_path, capsys):
    """The demo protocol with its teacher, 2 methods x 1 seed, a few steps on tiny images."""
    text = (Path(cli.__file__).parent / "protocols" / "demo.toml").read_text()
    text = re.sub(r"iterations = 600", "iterations = 3", text)
    text = re.sub(r"epochs = 8\b", "epochs = 1", text)
    text = text.replace("size = [64, 128]", "size = [64, 64]").replace("train = 32", "train = 4")
    text = text.replace("val = 8", "val = 2")
    path = tmp_path / "demo_small.toml"
    path.write_text(text)
    out = tmp_path / "out"
    cli.main([str(path), "--methods", "none", "kd", "--seeds", "1", "--out", str(out), "--device", "cpu"])
    printed = capsys.readouterr().out
    assert (out / "teacher" / "student.pth").is_file()
    assert "--epochs 1 " in (out / "kd" / "seed0" / "run.log").read_text()
    for label in ("none", "kd"):
        run = Run(label, 0, out / label / "seed0", [], "")
        assert (run.dir / "results.json").is_file()
    assert re.search(r"\| kd \| 1 \| \d+\.\d\d \|", printed) and (out / "compare.png").is_file()
    # a rerun keeps everything: the teacher is cached, both runs are finished
    cli.main([str(path), "--methods", "none", "kd", "--seeds", "1", "--out", str(out), "--device", "cpu"])
    printed = capsys.readouterr().out
    assert "teacher: cached" in printed and "2 of 2 runs finished already; running 0" in printed


@pytest.mark.realdata
def test_camvid_espnet_one_method_few_steps(tmp_path, monkeypatch, capsys):
    camvid = Path(os.environ.get("CAMVID", DATA / "camvid"))
    ckpt = Path(os.environ.get("SKD_CKPT", DATA / "checkpoints" / "skd_camvid_espnet"))
    if not (camvid / "train.txt").is_file() or not (ckpt / "SD+KD+CITY_65.1.pth").is_file():
        pytest.skip("needs ../shared/data (CamVid and SKD's released ESPNets) or $CAMVID and $SKD_CKPT")
    monkeypatch.setenv("CAMVID", str(camvid))
    monkeypatch.setenv("SKD_CKPT", str(ckpt))
    text = (Path(cli.__file__).parent / "protocols" / "camvid_espnet.toml").read_text()
    text = re.sub(r"\niterations = \d+", "\niterations = 2", text)
    text = re.sub(r"\nbatch = \d+", "\nbatch = 2", text)
    text = text.replace("[evaluation]", "[evaluation]\nmax_images = 2")
    path = tmp_path / "camvid_small.toml"
    path.write_text(text)
    out = tmp_path / "out"
    cli.main([str(path), "--methods", "kd", "--seeds", "1", "--out", str(out), "--device", "cpu"])
    result = json.loads((out / "kd" / "seed0" / "results.json").read_text())
    assert result["dataset"] == "camvid" and result["teacher"] == "espnet" and result["iterations"] == 2
    assert finished(Run("kd", 0, out / "kd" / "seed0", [], result["extra"]["protocol"]["compare_stamp"]))

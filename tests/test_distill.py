"""``python -m common.distill``: every catalogue method trains on a tiny synthetic set and writes results.json,
resumes exactly, keeps the time-budget rule, runs under torchrun, and refuses bad input in one sentence before
writing anything (issue 19, items 3–4)."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from common.distill import PROBE_STEPS, main
from common.engine.step import TrainStep
from common.errors import main_guard
from common.methods import list_methods, method_info, method_params

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
REPO = Path(__file__).resolve().parents[1]
STUDENT, TEACHER = "espnet_c", "cirkd_pspnet_mobilenetv2"
CITYSCAPES_FIRST_CLASSES = ["road", "sidewalk", "building"]  # specs/ifvd_skd.md §C.5 trainId order


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A data folder for the synthetic set (written by the first run) and random-weight teacher files."""
    from common.models import build_model

    base = tmp_path_factory.mktemp("distill")
    torch.manual_seed(0)
    teachers = {}
    for name in (TEACHER, "espnet"):
        teachers[name] = base / f"{name}.pth"
        torch.save(build_model(name, num_classes=19).state_dict(), teachers[name])
    return {"data": base / "synthetic", "teachers": teachers}


def argv(files, out, method="kd", *extra, student=STUDENT, teacher=TEACHER, iterations=20):
    args = ["--student", student, "--method", method, "--dataset", "synthetic", "--data-root", str(files["data"]),
            "--synthetic-size", "64", "128", "--synthetic-train", "4", "--synthetic-val", "2", "--batch-size", "2",
            "--crop", "64", "64", "--out", str(out), "--num-workers", "0", "--log-every", "100"]
    if "--epochs" not in extra:
        args += ["--iterations", str(iterations)]
    if method != "none":
        args += ["--teacher", teacher, "--teacher-ckpt", str(files["teachers"][teacher])]
    return args + list(extra)


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", list_methods())
def test_every_method_trains_20_steps_and_writes_results(method, files, tmp_path):
    weight_names = method_info(method)[2]
    weights = [f"{method}.{weight_names[0]}=2"] if weight_names else []
    defaults = method_params(method)["default"]
    if defaults.get("adv") or defaults.get("d"):  # D needs >= 64x64 logits, which espnet_c does not give
        weights += [f"{method}.adv=0", f"{method}.d=0"]
    schedule = ["--epochs", "10"] if method == "aicsd" else []  # ALW needs epochs: 4 images / batch 2 = 2 steps each
    out = tmp_path / "run"
    main(argv(files, out, method, *schedule, *(["--weights", *weights] if weights else []), "--tag", "t1",
              "--extra", "protocol_id=p", "seed_group=3"))

    res = json.loads((out / "results.json").read_text())
    assert (res["paper"], res["method"], res["model"], res["dataset"], res["split"]) == \
        ("distill", method, STUDENT, "synthetic", "val")
    assert res["teacher"] == (None if method == "none" else TEACHER)
    assert (res["iterations"], res["crop"], res["batch"], res["seed"]) == (20, [64, 64], 2, 0)
    assert 0.0 <= res["miou"] <= 1.0 and 0.0 <= res["pixel_acc"] <= 1.0 and len(res["iou"]) == 19
    extra = res["extra"]
    assert extra["class_names"][:3] == CITYSCAPES_FIRST_CLASSES and len(extra["class_names"]) == 19
    assert extra["protocol"] == {"tag": "t1", "protocol_id": "p", "seed_group": "3"}
    assert (extra["peak_mem_kind"], extra["device"], extra["world_size"]) == ("cpu_peak_rss", "cpu", 1)
    assert extra["student_init"] == "none" and extra["time_budget"] is None and extra["preset"] is None
    assert extra["teacher_ckpt"] == (None if method == "none" else str(files["teachers"][TEACHER]))
    assert extra["weights"]["preset"] == "default"
    if weight_names:
        assert extra["weights"][f"{method}.{weight_names[0]}"] == 2.0
    assert res["peak_mem_mb"] > 0 and res["wall_time_s"] >= extra["train_time_s"] > 0
    assert res["images_per_s"] == pytest.approx(20 * 2 / extra["train_time_s"], rel=1e-9)
    assert extra["train_seconds_per_iter"] == pytest.approx(extra["train_time_s"] / 20, rel=1e-9)

    lines = metrics(out)
    assert [r["step"] for r in lines] == list(range(20))
    terms = set(lines[0]) - {"step", "time", "G_lr", "loss", "task"}
    assert bool(terms) == (method != "none"), terms
    # results.json is written last: its presence marks a finished run (the comparison tool relies on it).
    written = (out / "results.json").stat().st_mtime_ns
    assert all((out / name).stat().st_mtime_ns <= written for name in ("training_state.pth", "student.pth"))


def test_adversarial_method_trains_with_its_discriminator(files, tmp_path):
    """IFVD's default (holistic term on): ESPNet (full-resolution logits) on a 64x64 crop, both networks."""
    out = tmp_path / "run"
    main(argv(files, out, "ifvd", student="espnet", teacher="espnet", iterations=4))
    lines = metrics(out)
    assert {"adv", "loss_D", "D_lr", "ifvd"} <= set(lines[0]) and len(lines) == 4
    state = torch.load(out / "training_state.pth", weights_only=True)
    assert set(state["modules"]) == {"student", "D"} and set(state["optimizers"]) == {"G", "D"}
    assert json.loads((out / "results.json").read_text())["extra"]["weights"]["ifvd.adv"] == 0.001


class Interrupt(Exception):
    pass


def test_resume_continues_to_the_uninterrupted_result(files, tmp_path, monkeypatch, capsys):
    """CIRKD (memory queues, projection head): 12 steps in one go vs. killed before step 6 and resumed."""
    flags = ("--weights", "cirkd.minibatch=1", "--save-every", "6")
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    main(argv(files, whole, "cirkd", *flags, iterations=12))
    original = TrainStep.__call__

    def killed_at_6(self, batch, step):
        if step == 6:
            raise Interrupt
        return original(self, batch, step)

    monkeypatch.setattr(TrainStep, "__call__", killed_at_6)
    with pytest.raises(Interrupt):
        main(argv(files, parts, "cirkd", *flags, iterations=12))
    assert len(metrics(parts)) == 6 and not (parts / "results.json").exists()
    monkeypatch.setattr(TrainStep, "__call__", original)
    main(argv(files, parts, "cirkd", *flags, "--resume", iterations=12))

    a, b = metrics(whole), metrics(parts)
    assert [r["step"] for r in b] == list(range(12))
    for x, y in zip(a[6:], b[6:]):
        for key in ("loss", "task", "G_lr"):
            assert y[key] == pytest.approx(x[key], rel=1e-6), (x["step"], key)
    res_a, res_b = (json.loads((d / "results.json").read_text()) for d in (whole, parts))
    assert res_b["miou"] == pytest.approx(res_a["miou"], rel=1e-6) and res_b["iterations"] == 12

    finished = (parts / "results.json").read_bytes()
    main(argv(files, parts, "cirkd", *flags, "--resume", iterations=12))  # a finished run is left alone
    assert (parts / "results.json").read_bytes() == finished and "nothing to do" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:  # a fresh run into a finished run's folder is refused
        main_guard(main)(argv(files, parts, "cirkd", *flags, iterations=12))
    assert exc.value.code == 2 and "already holds a finished run" in capsys.readouterr().err


def test_time_budget_sets_the_poly_horizon_from_the_probe_and_stops(files, tmp_path, monkeypatch):
    """A fake clock: the first step takes 5 s (warm-up), the other probe steps 1 s, later steps 2 s; budget
    29.5 s, cap 100. By hand: the probe's 10 steps use the cap as horizon, end at 5, 6, ..., 14 s and measure
    (14 - 5) / 9 = 1 s per step, so the horizon is 10 + floor((29.5 - 14) / 1) = 25; then 2 s per step:
    14 + 2k >= 29.5 first at k = 8, so the run stops before step 18 with 30 s used."""
    assert PROBE_STEPS == 10
    now = [1000.0]
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    original = TrainStep.__call__

    def timed(self, batch, step):
        out = original(self, batch, step)
        now[0] += 5.0 if step == 0 else 1.0 if step < 10 else 2.0
        return out

    monkeypatch.setattr(TrainStep, "__call__", timed)
    out = tmp_path / "run"
    main(argv(files, out, "kd", "--time-budget", "29.5", "--save-every", "0", iterations=100))
    res = json.loads((out / "results.json").read_text())
    assert res["iterations"] == 18
    assert (res["extra"]["poly_horizon"], res["extra"]["train_time_s"], res["extra"]["time_budget"]) == (25, 30.0, 29.5)
    lr = {r["step"]: r["G_lr"] for r in metrics(out)}
    assert sorted(lr) == list(range(18))
    assert lr[5] == pytest.approx(0.02 * (1 - 5 / 100) ** 0.9, rel=1e-12)
    assert lr[12] == pytest.approx(0.02 * (1 - 12 / 25) ** 0.9, rel=1e-12)


def test_task_loss_is_ce_plus_aux_weight_times_ce_aux_ignoring_minus_1():
    """cirkd.md §3.1 with ``--aux-weight``: CE(main) + w·CE(aux) over the pixels whose label is not −1; CE alone
    for a student without an aux output (and for w = 0). Reference: mean of −log softmax at the label."""
    from common.distill import task_term

    torch.manual_seed(0)
    logits, aux = torch.randn(1, 3, 2, 2, dtype=torch.float64), torch.randn(1, 3, 2, 2, dtype=torch.float64)
    labels = torch.tensor([[[0, 2], [-1, 1]]])
    valid = [(0, 0, 0), (0, 0, 1), (0, 1, 1)]

    def ce(x):
        return sum(-torch.log_softmax(x[b, :, i, j], 0)[labels[b, i, j]] for b, i, j in valid) / len(valid)

    with_aux = task_term(("logits", "aux", "feat"), 0.25)
    assert with_aux.name == "task" and with_aux.inputs == ("s.logits", "s.aux", "labels")
    assert with_aux.fn(logits, aux, labels).item() == pytest.approx((ce(logits) + 0.25 * ce(aux)).item(), rel=1e-12)
    for term in (task_term(("logits", "feat"), 0.25), task_term(("logits", "aux", "feat"), 0.0)):
        assert term.name == "task" and term.inputs == ("s.logits", "labels")
        assert term.fn(logits, labels).item() == pytest.approx(ce(logits).item(), rel=1e-12)


def test_distill_results_stay_out_of_the_paper_tables(tmp_path):
    from common.tables.render import render_all
    from common.tables.schema import PAPERS, make_result, write_results

    empty, full = tmp_path / "empty", tmp_path / "full"
    empty.mkdir()
    result = make_result(paper="distill", method="kd", model="pspnet_resnet18", dataset="cityscapes", split="val",
                         miou=0.5, iterations=40000, crop=(512, 512), batch=8, seed=0)
    write_results(full / "results.json", result)
    assert render_all(PAPERS, [full], complexity=False) == render_all(PAPERS, [empty], complexity=False)


ERRORS = [
    ("unknown model", ["--student", "nosuch"], "unknown --student model 'nosuch'"),
    ("unknown dataset", ["--dataset", "nosuch"], "argument --dataset: invalid choice: 'nosuch'"),
    ("missing teacher file", ["--teacher-ckpt", "/nonexistent/t.pth"],
     "checkpoint --teacher-ckpt not found at /nonexistent/t.pth"),
    ("wrong teacher keys", ["teacher-file:espnet"], "checkpoint --teacher-ckpt"),
    ("bad weight name", ["--weights", "kd.nosuch=1"], "method 'kd' has no parameter 'nosuch'"),
    ("nan flag", ["--lr", "nan"], "argument --lr: must be a finite number, got 'nan'"),
    ("nan weight", ["--weights", "kd.weight=nan"], "kd.weight must be a finite, non-negative weight"),
    ("missing output", ["--method", "at", "--weights", "at.feature=aux"],
     "method 'at' needs the output 'aux' of the student espnet_c, which has only logits, feat"),
    ("small logits for D", ["--method", "ifvd"], "the discriminator needs logits of at least 64x64"),
    ("resume without state", ["--resume"], "does not exist; drop --resume"),
    ("pipeline without the dataset", ["--data-pipeline", "esp", "--dataset", "cityscapes"],
     "--data-pipeline esp reads only --dataset camvid, synthetic, not cityscapes; pass one of those"),
]


@pytest.mark.parametrize("case,extra,message", ERRORS, ids=[case for case, _, _ in ERRORS])
def test_bad_input_is_one_sentence_before_any_output(case, extra, message, files, tmp_path, capsys):
    out = tmp_path / "run"
    args = argv(files, out, "kd", iterations=2)
    if extra[0].startswith("teacher-file:"):
        args[args.index("--teacher-ckpt") + 1] = str(files["teachers"][extra[0].split(":")[1]])
        extra = []
    with pytest.raises(SystemExit) as exc:
        main_guard(main)(args + extra)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and message in err, err
    assert len(err.splitlines()[-1]) > 20 and "Traceback" not in err
    assert not out.exists(), f"{case}: the run wrote {sorted(p.name for p in out.iterdir())}"


def test_synthetic_data_is_written_only_into_a_new_or_its_own_folder(files, tmp_path, capsys):
    """--dataset synthetic never writes into a folder with other content (e.g. a real Cityscapes copy), nor
    mixes sizes in its own folder."""
    if not (files["data"] / "synthetic.txt").exists():  # this test alone: the first run writes the data
        main(argv(files, tmp_path / "first", "none", iterations=1))
    foreign = tmp_path / "real"
    foreign.mkdir()
    (foreign / "leftImg8bit.txt").write_text("not synthetic")
    cases = [(["--data-root", str(foreign)], "is not empty and holds no synthetic data"),
             (["--synthetic-train", "5"], "holds synthetic data of other sizes (train=4 val=2 size=64x128 seed=0)")]
    for extra, message in cases:
        with pytest.raises(SystemExit) as exc:
            main_guard(main)(argv(files, tmp_path / "run", "none", *extra, iterations=1))
        assert exc.value.code == 2 and message in capsys.readouterr().err
    assert [p.name for p in foreign.iterdir()] == ["leftImg8bit.txt"]


def test_torchrun_two_processes(files, tmp_path):
    """2 processes (gloo): total batch 4 = 2 per process, the eval split shared, rank 0 writes."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
           "common.distill", *argv(files, out, "kd", iterations=3), "--batch-size", "4", "--device", "cpu"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert (res["iterations"], res["batch"], res["extra"]["world_size"], res["extra"]["eval_images"]) == (3, 4, 2, 2)


# ------------------------------------------------------------------------------------- --data-pipeline
CAFFE_MEAN_BGR = (104.00698793, 116.66876762, 122.67891434)  # cirkd.md §4.1, ifvd_skd.md §C.5
ESP_MEAN_BGR = (73.18188461, 82.93553322, 72.41519599)  # skd_cvpr19.md §3
ESP_STD_BGR = (45.3199, 46.1528, 44.9148)  # skd_cvpr19.md §3
IMAGENET_MEAN_RGB, IMAGENET_STD_RGB = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # aicsd.md §5


def hand_eval_image(pipeline, path):
    """The eval image of the file ``path`` by each lineage's spec, from the BGR uint8 pixels (float64)."""
    import cv2
    import numpy as np

    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR).astype(np.float64)
    if pipeline in ("cirkd", "psp"):
        image = bgr - np.array(CAFFE_MEAN_BGR)
    elif pipeline == "esp":
        image = (bgr - np.array(ESP_MEAN_BGR)) / np.array(ESP_STD_BGR)
    else:  # aicsd: the short side resized to the crop, 96 = the 96x128 image's already (§5)
        image = (bgr[:, :, ::-1] / 255.0 - np.array(IMAGENET_MEAN_RGB)) / np.array(IMAGENET_STD_RGB)
    return torch.from_numpy(image.transpose(2, 0, 1).copy())


def lineage_train_set(pipeline, root, lists, crop):
    """The training set as the lineage's own entry point builds it (4 steps of batch 2)."""
    from types import SimpleNamespace

    from common.datasets.camvid import CamVidLight
    from common.datasets.catalog import aicsd_dataset, cirkd_dataset
    from common.recipes import psp

    if pipeline == "cirkd":
        return cirkd_dataset("citys", root, "train", list_path=lists["train"], max_iters=8, crop_size=crop)
    if pipeline == "psp":  # ifvd/train.py: the README command passes neither --random-mirror nor --random-scale
        args = SimpleNamespace(data_dir=root, data_list=lists["train"], data_listval=lists["val"], num_steps=4,
                               batch_size=2, input_size=crop, random_scale=False, random_mirror=False)
        return psp.train_val_sets(args)[0]
    if pipeline == "esp":  # skd/train_esp.py with its documented --random-mirror
        return CamVidLight(root, lists["train"], crop_size=crop, mirror=True, ignore_label=255, void_to_ignore=True)
    return aicsd_dataset("pascal", root, "train", crop_size=crop[0])


def seeded_item(dataset, seed):
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    image, label = dataset[0][:2]
    return torch.as_tensor(image), torch.as_tensor(label)


@pytest.mark.parametrize("pipeline,ignore,classes", [("cirkd", -1, 19), ("psp", 255, 19), ("esp", 255, 11),
                                                     ("aicsd", 255, 21)])
def test_data_pipeline_reads_each_lineage_own_sets(pipeline, ignore, classes, tmp_path):
    """The eval image is the lineage's normalisation of the file (spec literals); the first training sample is
    the lineage's own set's for the same file and seed; training labels hold classes and the pipeline's ignore."""
    from types import SimpleNamespace

    from common.datasets.synthetic import make_voc
    from common.distill import PIPELINE_IGNORE, get_parser, run_data

    root = tmp_path / "data"
    dataset = "voc" if pipeline == "aicsd" else "synthetic"
    if dataset == "voc":
        make_voc(root, {"train": 2, "val": 1})  # 96x128 images
    crop = (96, 96) if pipeline == "aicsd" else (32, 32)
    args = get_parser().parse_args(["--student", STUDENT, "--method", "none", "--dataset", dataset,
                                    "--data-pipeline", pipeline, "--data-root", str(root), "--synthetic-size", "64",
                                    "96", "--synthetic-train", "2", "--synthetic-val", "1", "--out", str(tmp_path)])
    data = run_data(args, root, crop, SimpleNamespace(is_main=True), 8)
    assert PIPELINE_IGNORE[pipeline] == ignore

    path = (data.test.files if hasattr(data.test, "files") else data.test.items)[0][0]
    image = torch.as_tensor(data.test[0][0]).double()
    assert torch.allclose(image, hand_eval_image(pipeline, path), rtol=0, atol=1e-4)  # float32 of values < 300

    lists = {"train": str(root / "lists" / "train.lst"), "val": str(root / "lists" / "val.lst")}
    if pipeline == "esp":
        lists = {"train": str(root / "train.txt"), "val": str(root / "val.txt")}
    for seed in (0, 1):
        got, got_label = seeded_item(data.train, seed)
        own, own_label = seeded_item(lineage_train_set(pipeline, root, lists, crop), seed)
        assert torch.equal(got, own) and torch.equal(got_label, own_label)
        values = set(got_label.unique().tolist())
        assert values <= set(range(classes)) | {ignore}, values


@pytest.mark.parametrize("pipeline,ignore", [("psp", 255), ("esp", 255)])
def test_pipeline_ignore_label_reaches_the_loss_the_methods_and_the_metric(pipeline, ignore, tmp_path, monkeypatch):
    """A 1-step run: the task loss drops the pipeline's ignore pixels (reference: −log softmax at the one labelled
    pixel), method_context and the metric get the same label, results.json names the pipeline."""
    import common.distill as distill
    import common.evaluation
    import common.methods

    seen = {}

    def spy(module, name, key):
        real = getattr(module, name)

        def wrapper(*args, **kwargs):
            seen[name] = kwargs[key]
            return real(*args, **kwargs)
        monkeypatch.setattr(module, name, wrapper)

    spy(common.methods, "method_context", "ignore_index")
    spy(common.evaluation, "evaluate_main", "ignore_label")
    spy(distill, "TrainStep", "task")
    out = tmp_path / "run"
    main(["--student", STUDENT, "--method", "none", "--dataset", "synthetic", "--data-pipeline", pipeline,
          "--data-root", str(tmp_path / "data"), "--synthetic-size", "32", "64", "--synthetic-train", "2",
          "--synthetic-val", "1", "--batch-size", "2", "--crop", "32", "32", "--iterations", "1", "--num-workers", "0",
          "--out", str(out)])
    assert seen["method_context"] == ignore and seen["evaluate_main"] == ignore

    torch.manual_seed(0)
    logits = torch.randn(1, 4, 2, 2, dtype=torch.float64)
    labels = torch.full((1, 2, 2), ignore)
    labels[0, 1, 0] = 3
    expected = -torch.log_softmax(logits[0, :, 1, 0], 0)[3]
    assert seen["TrainStep"].fn(logits, labels).item() == pytest.approx(expected.item(), rel=1e-12)
    assert json.loads((out / "results.json").read_text())["extra"]["data_pipeline"] == pipeline

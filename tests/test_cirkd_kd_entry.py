"""CIRKD train_kd.py / train_cirkd.py end to end on tiny synthetic CamVid (CPU) and every CIRKD script in a dry run.

Expected values come from specs/cirkd.md (sections in the comments).
"""
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.datasets import synthetic

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cirkd import eval as cirkd_eval  # noqa: E402
from cirkd import test as cirkd_test  # noqa: E402
from cirkd import train_baseline, train_cirkd, train_kd  # noqa: E402

pytestmark = pytest.mark.slow
SMALL_MEMORY = ["--pixel-memory-size", "400", "--region-memory-size", "60", "--pixel-contrast-size", "40",
                "--region-contrast-size", "20"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("kd_data")
    lists = synthetic.make_camvid(root / "camvid", {"train": 2, "val": 1, "test": 1}, size=(48, 64), cirkd_lists=True)
    from common.models import build_model

    teachers = {}
    for backbone in ("resnet18", "resnet101"):
        torch.manual_seed(0)
        teachers[backbone] = root / f"deeplabv3_{backbone}_camvid_best_model.pth"
        torch.save(build_model(f"deeplabv3_{backbone}", num_classes=11).state_dict(), teachers[backbone])
    return root / "camvid", lists, teachers


def kd_args(data, out, *extra, teacher="resnet18", iters=2, crop=("32", "32")):
    root, lists, teachers = data
    return ["--teacher-backbone", teacher, "--teacher-pretrained", str(teachers[teacher]), "--dataset", "camvid",
            "--data", str(root), "--train-list", lists["train"], "--val-list", lists["val"], "--crop-size", *crop,
            "--batch-size", "2", "--max-iterations", str(iters), "--val-per-iters", "2", "--save-per-iters", "2",
            "--log-iter", "1", "-j", "0", "--save-dir", str(out / "ckpt"), "--log-dir", str(out / "logs"),
            "--device", "cpu", *SMALL_MEMORY, *extra]


def state_of(out, stem="kd_deeplabv3_resnet18_camvid"):
    return torch.load(out / "ckpt" / f"{stem}_run" / "training_state.pth", weights_only=True)


def metrics(out, stem="kd_deeplabv3_resnet18_camvid"):
    return [json.loads(x) for x in (out / "ckpt" / f"{stem}_run" / "metrics.jsonl").read_text().splitlines()]


def test_cirkd_defaults_write_the_student_and_the_original_log_name(data, tmp_path):
    train_kd.main(kd_args(data, tmp_path, teacher="resnet101"))
    ckpt = tmp_path / "ckpt"
    student = torch.load(ckpt / "kd_deeplabv3_resnet18_camvid.pth", weights_only=True)  # §1.3 step 8
    assert (ckpt / "kd_deeplabv3_resnet18_camvid_best_model.pth").is_file()
    assert not any("project_head" in k or "queue" in k for k in student)  # only the student is saved
    # §1.3 step 9: {student_model}_{teacher_backbone}_{student_backbone}_log.txt, the dataset dropped
    log = (tmp_path / "logs" / "deeplabv3_resnet101_resnet18_log.txt").read_text()
    assert "|| Task Loss: " in log and "|| KD Loss: " in log and "|| Mini-batch p2p Loss: " in log
    assert "|| Memory p2p Loss: " in log and "|| Memory p2r Loss: " in log
    result = json.loads((ckpt / "kd_deeplabv3_resnet18_camvid_run" / "results.json").read_text())
    assert (result["method"], result["teacher"]) == ("cirkd", "deeplabv3_resnet101")
    # §1.3 defaults: λ_kd 1, λ_mb 1, λ_mp 0.1, λ_mr 0.1
    assert result["extra"]["weights"] == {"lambda_kd": 1.0, "lambda_minibatch_pixel": 1.0,
                                          "lambda_memory_pixel": 0.1, "lambda_memory_region": 0.1}
    state = state_of(tmp_path)
    assert set(state["modules"]) == {"student", "memory"}
    # projection head 128 -> 256 (the teacher embedding), §3.4
    assert state["modules"]["memory"]["project_head.0.weight"].shape == (256, 128, 1, 1)
    first = metrics(tmp_path)[0]
    assert all(first[k] > 0 for k in ("kd", "minibatch_pixel", "memory_pixel", "memory_region"))


def test_log_name_with_dataset_flag_keeps_the_dataset(data, tmp_path):
    train_kd.main(kd_args(data, tmp_path, "--log-name-with-dataset", "--skip-val"))
    assert (tmp_path / "logs" / "deeplabv3_resnet18_resnet18_camvid_log.txt").is_file()


def test_terms_with_weight_zero_build_nothing(data, tmp_path):
    train_kd.main(kd_args(data, tmp_path, "--skip-val", "--lambda-kd", "0", "--lambda-minibatch-pixel", "0",
                          "--lambda-memory-pixel", "0", "--lambda-memory-region", "0"))
    assert set(state_of(tmp_path)["modules"]) == {"student"}
    assert set(metrics(tmp_path)[0]) - {"step", "time", "G_lr"} == {"loss", "task"}


def test_adapters_join_the_one_sgd_group(data, tmp_path):
    flags = ["--lambda-skd", "10", "--lambda-cwd-fea", "50", "--lambda-cwd-logit", "3", "--lambda-ifv", "20",
             "--lambda-at", "10000", "--lambda-fitnet", "10", "--lambda-psd", "1000", "--lambda-csd", "10"]
    train_kd.main(kd_args(data, tmp_path, "--skip-val", *flags, teacher="resnet101"))
    state = state_of(tmp_path)
    assert set(state["modules"]) == {"student", "memory", "cwd", "fitnet"}
    groups = state["optimizers"]["G"]["param_groups"]
    n_params = sum(len(m) for m in [[k for k in state["modules"][name] if not k.startswith(("teacher_", "segment_q",
                                                                                          "pixel_q"))
                                     and "running" not in k and "num_batches" not in k]
                                    for name in ("memory", "cwd", "fitnet")])
    from common.models import build_model

    n_student = len(list(build_model("deeplabv3_resnet18", num_classes=11).parameters()))
    assert len(groups) == 1 and len(groups[0]["params"]) == n_student + n_params  # §1.3 step 6, §1.4
    first = metrics(tmp_path)[0]
    assert all(first[k] != 0 for k in ("skd", "cwd_fea", "cwd_logit", "ifv", "at", "fitnet", "psd", "csd"))
    assert json.loads((tmp_path / "ckpt" / "kd_deeplabv3_resnet18_camvid_run" / "args.json").read_text())[
        "run_info"]["method"] == "cirkd+skd+ifvd+cwd+dsd+at+fitnet"


def test_discriminator_has_its_own_adam_at_a_constant_lr(data, tmp_path):
    train_kd.main(kd_args(data, tmp_path, "--skip-val", "--lambda-adv", "0.001", "--lambda-d", "0.1",
                          "--lambda-minibatch-pixel", "0", "--lambda-memory-pixel", "0", "--lambda-memory-region",
                          "0", crop=("512", "512"), iters=1))
    state = state_of(tmp_path)
    d_groups = state["optimizers"]["D"]["param_groups"]
    assert len(d_groups) == 1 and d_groups[0]["lr"] == 4e-4 and d_groups[0]["betas"] == (0.9, 0.99)  # §1.4
    assert all(m["loss_D"] > 0 for m in metrics(tmp_path))


def test_resume_state_restores_the_queues_and_the_head(data, tmp_path, monkeypatch):
    full = tmp_path / "full"
    train_kd.main(kd_args(data, full, "--skip-val", iters=4))

    from common.engine.step import TrainStep

    original_call = TrainStep.__call__

    def stop_at_two(self, batch, step):
        if step == 2:
            raise KeyboardInterrupt
        return original_call(self, batch, step)

    part = tmp_path / "part"
    monkeypatch.setattr(TrainStep, "__call__", stop_at_two)
    with pytest.raises(KeyboardInterrupt):
        train_kd.main(kd_args(data, part, "--skip-val", iters=4))
    monkeypatch.setattr(TrainStep, "__call__", original_call)
    resume = part / "ckpt" / "kd_deeplabv3_resnet18_camvid_run" / "training_state.pth"
    assert torch.load(resume, weights_only=True)["step"] == 2
    train_kd.main(kd_args(data, part, "--skip-val", "--resume-state", str(resume), iters=4))
    a, b = state_of(full)["modules"], state_of(part)["modules"]
    for name in ("student", "memory"):
        assert all(torch.equal(a[name][k], b[name][k]) for k in a[name]), name


def test_train_cirkd_is_the_same_program():
    assert train_cirkd.main is train_kd.main


BAD = [
    (["--lambda-skd", "-1"], "--lambda-skd must be 0 (off) or positive"),
    (["--pixel-memory-size", "10", "--pixel-contrast-size", "4096"], "--pixel-memory-size 10 is smaller than the 373"),
    (["--teacher-pretrained", "None"], "--teacher-pretrained is required"),
    (["--teacher-backbone", "resnet101", "--teacher-pretrained", "TEACHER18"],
     "missing keys: pretrained.layer1.0.conv3"),
    (["--lambda-adv", "0.001"], "need logits of at least 64x64"),
]


@pytest.mark.parametrize("extra,message", BAD)
def test_kd_bad_input_is_one_sentence_and_writes_nothing(data, tmp_path, capsys, extra, message):
    extra = [str(data[2]["resnet18"]) if a == "TEACHER18" else a for a in extra]
    with pytest.raises(SystemExit) as exc:
        train_kd.main(kd_args(data, tmp_path) + extra)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and err.startswith("error: ") and message in err and "\n" not in err
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "logs").exists()


def test_resume_state_of_a_run_with_other_methods_is_refused(data, tmp_path, capsys):
    train_kd.main(kd_args(data, tmp_path, "--skip-val", "--lambda-minibatch-pixel", "0", "--lambda-memory-pixel", "0",
                          "--lambda-memory-region", "0"))
    state = tmp_path / "ckpt" / "kd_deeplabv3_resnet18_camvid_run" / "training_state.pth"
    with pytest.raises(SystemExit) as exc:
        train_kd.main(kd_args(data, tmp_path / "again", "--skip-val", "--resume-state", str(state)))
    assert exc.value.code == 2 and "methods='kd' but this run has methods='cirkd'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- scripts (dry run)
SCRIPTS = sorted(p for p in (REPO / "cirkd" / "train_scripts").rglob("*.sh") if p.name != "common.sh")
PARSERS = {"train_baseline.py": train_baseline.build_parser, "train_kd.py": train_kd.build_parser,
           "train_cirkd.py": train_kd.build_parser, "eval.py": cirkd_eval.build_parser,
           "test.py": cirkd_test.build_parser}
# cirkd.md §3.6: the weights of each baseline script (the CIRKD terms explicitly 0)
BASELINE_WEIGHTS = {
    "train_at": {"lambda_kd": 1, "lambda_at": 10000}, "train_fitnet": {"lambda_kd": 1, "lambda_fitnet": 10},
    "train_skd": {"lambda_kd": 1, "lambda_d": 0.1, "lambda_adv": 0.001, "lambda_skd": 10},
    "train_ifvd": {"lambda_kd": 1, "lambda_d": 0.1, "lambda_adv": 0.001, "lambda_ifv": 20},
    "train_cwd": {"lambda_kd": 1, "lambda_d": 0.1, "lambda_adv": 0.001, "lambda_cwd_fea": 50, "lambda_cwd_logit": 3},
    "train_dsd": {"lambda_psd": 1000, "lambda_csd": 10},
}
LAMBDAS = ("lambda_kd", "lambda_minibatch_pixel", "lambda_memory_pixel", "lambda_memory_region", "lambda_adv",
           "lambda_d", "lambda_skd", "lambda_cwd_fea", "lambda_cwd_logit", "lambda_ifv", "lambda_fitnet", "lambda_at",
           "lambda_psd", "lambda_csd")


def dry_run(script, tmp_path):
    pretrained = tmp_path / "imagenet"
    pretrained.mkdir(exist_ok=True)
    for name in ("resnet18", "resnet101", "mobilenetv2"):
        (pretrained / f"{name}-imagenet.pth").touch()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEGKD_")}
    env.update(SEGKD_DRY_RUN="1", NPROC="1", PRETRAINED_DIR=str(pretrained), TEACHER=str(tmp_path),
               CHECKPOINT=str(tmp_path),
               **{k: str(tmp_path) for k in ("CITYSCAPES", "VOC", "CAMVID", "ADE20K", "COCO_STUFF")})
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [shlex.split(line) for line in proc.stdout.splitlines()]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(REPO / "cirkd" / "train_scripts")))
def test_every_script_runs_valid_commands(script, tmp_path):
    commands = dry_run(script, tmp_path)
    assert commands
    for entry, *argv in commands:
        args = PARSERS[entry]().parse_args(argv)
        if script.parent.name == "train_kd" and script.stem in BASELINE_WEIGHTS:
            weights = {k: getattr(args, k) for k in LAMBDAS if getattr(args, k)}
            assert weights == BASELINE_WEIGHTS[script.stem]
        if script.parent.name == "voc" and entry == "train_cirkd.py":
            assert (args.lambda_memory_pixel, args.lambda_memory_region, args.crop_size) == (0.01, 0.01, [512, 512])


def test_cirkd_demo_script_trains_end_to_end(tmp_path):
    from common.models import build_model

    cs = tmp_path / "cs"
    synthetic.make_cityscapes(cs, {"train": 2, "val": 1, "test": 1}, size=(64, 128))
    torch.manual_seed(0)
    teacher = tmp_path / "teacher.pth"
    torch.save(build_model("deeplabv3_resnet101", num_classes=19).state_dict(), teacher)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEGKD_")}
    env.update(SEGKD_DEMO="1", SEGKD_DEMO_STEPS="2", SEGKD_DEMO_CROP="32 64", CITYSCAPES=str(cs), TEACHER=str(teacher),
               PYTHON=sys.executable, OMP_NUM_THREADS="1", NPROC="1",
               PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    script = REPO / "cirkd" / "train_scripts" / "train_cirkd" / "citys" / "deeplabv3_res18.sh"
    proc = subprocess.run(["bash", str(script), *SMALL_MEMORY], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "demo_runs" / "cirkd" / "ckpt" / "kd_deeplabv3_resnet18_citys_run" /
                         "results.json").read_text())
    assert (result["method"], result["scale"], result["iterations"]) == ("cirkd", "demo", 2)

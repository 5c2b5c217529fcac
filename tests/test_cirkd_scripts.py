"""CIRKD shell scripts end to end (torchrun, 2 gloo processes on CPU) and their usage messages."""
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "cirkd" / "train_scripts"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cityscapes(tmp_path_factory):
    from common.datasets.synthetic import make_cityscapes

    root = tmp_path_factory.mktemp("cirkd_cs")
    make_cityscapes(root, {"train": 4, "val": 3, "test": 1}, size=(64, 128))
    return root


def env_of(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SEGKD_", "CITYSCAPES", "PRETRAINED_DIR"))}
    env.update(PYTHON=sys.executable, OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""), **extra)
    return env


def run(script, env, cwd, *args):
    return subprocess.run(["bash", str(SCRIPTS / script), *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def test_baseline_script_trains_and_evaluates_with_two_processes(cityscapes, tmp_path):
    env = env_of(SEGKD_DEMO="1", SEGKD_DEMO_STEPS="2", SEGKD_DEMO_CROP="32 64", SEGKD_DEMO_BATCH="4", NPROC="2",
                 CITYSCAPES=str(cityscapes))
    proc = run("train_baseline/citys/deeplabv3_res18.sh", env, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt, logs = tmp_path / "demo_runs" / "cirkd" / "ckpt", tmp_path / "demo_runs" / "cirkd" / "logs"
    trained = json.loads((ckpt / "deeplabv3_resnet18_citys_run" / "results.json").read_text())
    assert trained["scale"] == "demo" and trained["batch"] == 4 and trained["extra"]["val_images"] == 3
    args = json.loads((ckpt / "deeplabv3_resnet18_citys_run" / "args.json").read_text())
    assert args["pretrained_base"] == "None"
    evaluated = json.loads((logs / "deeplabv3_resnet18_citys_best_model_val" / "results.json").read_text())
    # 3 val images over 2 ranks, each counted once (no DistributedSampler padding, cirkd.md §8.8)
    assert evaluated["extra"]["images"] == 3 and evaluated["method"] == "baseline"
    assert evaluated["miou"] == pytest.approx(trained["miou"])  # the same model on the same val set
    log = (logs / "deeplabv3_resnet18_citys_log.txt").read_text()
    assert "Iters: 2 validation pixAcc:" in log and "Total training time:" in log


def test_batch_not_divisible_by_the_processes_is_refused(cityscapes, tmp_path):
    env = env_of(SEGKD_DEMO="1", SEGKD_DEMO_STEPS="2", NPROC="2", CITYSCAPES=str(cityscapes))
    proc = run("train_baseline/citys/deeplabv3_res18.sh", env, tmp_path, "--batch-size", "3")
    assert proc.returncode != 0
    assert "--batch-size 3 must be divisible by the 2 processes" in proc.stderr
    assert not (tmp_path / "demo_runs" / "cirkd" / "ckpt" / "deeplabv3_resnet18_citys.pth").exists()


@pytest.mark.parametrize("script,env,message", [
    ("train_baseline/citys/deeplabv3_res18.sh", {}, "CITYSCAPES is not set"),
    ("train_baseline/citys/deeplabv3_res18.sh", {"CITYSCAPES": "/nonexistent"},
     "CITYSCAPES=/nonexistent does not exist"),
    ("train_baseline/voc/deeplabv3_res18.sh", {"VOC": "."}, "PRETRAINED_DIR is not set"),
    ("train_baseline/ade20k/deeplabv3_res18.sh", {"SEGKD_DEMO": "1"}, "runs the Cityscapes scripts only"),
    ("test_cityscapes.sh", {"CITYSCAPES": "."}, "deeplabv3_resnet101_citys_best_model.pth does not exist"),
])
def test_scripts_print_their_usage_when_a_path_is_missing(tmp_path, script, env, message):
    proc = run(script, env_of(**env), tmp_path)
    assert proc.returncode == 2 and message in proc.stderr and "usage: " in proc.stderr


def test_cirkd_script_trains_with_two_processes(cityscapes, tmp_path):
    import torch

    from common.models import build_model

    torch.manual_seed(0)
    teacher = tmp_path / "teacher.pth"
    torch.save(build_model("deeplabv3_resnet101", num_classes=19).state_dict(), teacher)
    env = env_of(SEGKD_DEMO="1", SEGKD_DEMO_STEPS="2", SEGKD_DEMO_CROP="32 64", SEGKD_DEMO_BATCH="4", NPROC="2",
                 CITYSCAPES=str(cityscapes), TEACHER=str(teacher))
    proc = run("train_cirkd/citys/deeplabv3_res18.sh", env, tmp_path, "--pixel-memory-size", "400",
               "--region-memory-size", "60", "--pixel-contrast-size", "40", "--region-contrast-size", "20")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "demo_runs" / "cirkd" / "ckpt" / "kd_deeplabv3_resnet18_citys_run"
    state = torch.load(run_dir / "training_state.pth", weights_only=True)
    assert set(state["modules"]) == {"student", "memory"} and state["step"] == 2
    assert json.loads((run_dir / "results.json").read_text())["batch"] == 4


# the scripts that train CIRKD (train_kd/*.sh without the train_<method>.sh baselines, train_cirkd/*/*.sh)
CIRKD_SCRIPTS = sorted([p for p in (SCRIPTS / "train_kd").glob("*.sh") if not p.name.startswith("train_")] +
                       list((SCRIPTS / "train_cirkd").rglob("*.sh")))


@pytest.mark.parametrize("script", CIRKD_SCRIPTS, ids=lambda p: str(p.relative_to(SCRIPTS)))
def test_cirkd_scripts_relate_the_papers_2_images_per_gpu_on_any_gpu_count(script, tmp_path):
    # cirkd.md §4.3: total batch 16 = 2 per GPU x 8 GPUs; §3.3: the relation is computed within each GPU's batch
    from cirkd import train_kd

    for name in ("resnet18", "resnet101", "mobilenetv2"):
        (tmp_path / f"{name}-imagenet.pth").touch()
    paths = {k: str(tmp_path) for k in ("CITYSCAPES", "VOC", "CAMVID", "ADE20K", "COCO_STUFF", "TEACHER")}
    for nproc in ("1", "4"):
        proc = subprocess.run(["bash", str(script)], env=env_of(SEGKD_DRY_RUN="1", NPROC=nproc,
                                                                 PRETRAINED_DIR=str(tmp_path), **paths),
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        trainings = [shlex.split(line)[1:] for line in proc.stdout.splitlines() if line.startswith("train_")]
        assert len(trainings) == 1
        args = train_kd.build_parser().parse_args(trainings[0])
        assert (args.batch_size, args.minibatch_group, args.lambda_minibatch_pixel) == (16, 2, 1.0)
        args.lambda_memory_pixel = args.lambda_memory_region = 0  # no 20000-entry queues in this test
        terms, _ = train_kd.build_terms(args, 19, True, 128, 256, "batchnorm")
        assert [t.fn.group_size for t in terms if t.name == "minibatch_pixel"] == [2]

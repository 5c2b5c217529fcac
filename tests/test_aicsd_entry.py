"""AICSD entry points end to end on a tiny synthetic VOC (CPU, one thread): train.py, the README commands of
train_kd.py and the paper's AICSD command, the epoch-0 anomaly, resume (specs/aicsd.md §2.3, §2.4, §2.8, §6.3)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from aicsd import predict, train, train_kd
from common.recipes import aicsd
from common.recipes.run import RunState

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
IPE = 2  # 4 train images, batch 2: iterations per epoch


@pytest.fixture(autouse=True)
def no_demo(monkeypatch):
    monkeypatch.delenv("SEGKD_DEMO", raising=False)


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    from common.datasets.synthetic import make_voc

    root = tmp_path_factory.mktemp("voc")
    make_voc(root, splits={"train": 4, "val": 2, "test": 2}, size=(48, 64), seed=0)
    return root


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A DeepLabV3+ R18 checkpoint in train.py's format, ``best_pred`` a numpy float64 as upstream (§2.9)."""
    from common.models import build_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "checkpoint.pth.tar"
    torch.save({"epoch": 50, "state_dict": build_model("deeplabv3plus_resnet18", num_classes=21).state_dict(),
                "optimizer": {}, "best_pred": np.float64(0.7785)}, path)
    return path


def base(voc, save, epochs=2):
    return ["--data-dir", str(voc), "--crop-size", "33", "--base-size", "33", "--batch-size", "2", "--epochs",
            str(epochs), "--workers", "0", "--imagenet-weights", "none", "--device", "cpu", "--save-dir", str(save)]


def kd(voc, save, teacher, *flags, epochs=2):
    return base(voc, save, epochs) + ["--teacher_path", str(teacher), "--teacher-backbone", "resnet18", *flags]


def experiment(save, k=0, checkname="deeplab-resnet18"):
    return save / "run" / "pascal" / checkname / f"experiment_{k}"


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_train_py_writes_the_original_run_files(voc, tmp_path):
    save = tmp_path / "s"
    train.main(base(voc, save, epochs=1) + ["--save-pred", str(tmp_path / "pred")])
    run = experiment(save)
    ckpt = torch.load(run / "checkpoint.pth.tar", weights_only=True)
    assert set(ckpt) == {"epoch", "state_dict", "optimizer", "best_pred"} and ckpt["epoch"] == 1  # §2.3 step 8
    result = json.loads((run / "results.json").read_text())
    assert (result["paper"], result["method"], result["model"], result["dataset"], result["iterations"]) == (
        "aicsd", "baseline", "deeplabv3plus_resnet18", "voc", IPE)
    assert float((run / "best_pred.txt").read_text()) == pytest.approx(ckpt["best_pred"]) == pytest.approx(
        result["miou"])
    assert (run.parent / "model_best.pth.tar").is_file()
    png = Image.open(tmp_path / "pred" / "epoch_0" / "2008_000000.png")
    assert png.mode == "P" and png.size == (44, 33)  # VOC palette, scored at short side 33 (§7)
    assert png.getpalette()[3:6] == [128, 0, 0]  # VOC class 1


def test_predict_scores_val_as_training_and_exports_the_test_server_layout(voc, tmp_path):
    save = tmp_path / "s"
    train.main(base(voc, save, epochs=1))
    ckpt = experiment(save) / "checkpoint.pth.tar"
    common = ["--checkpoint", str(ckpt), "--data-dir", str(voc), "--crop-size", "33", "--device", "cpu"]
    predict.main(common + ["--out-dir", str(tmp_path / "val")])
    assert json.loads((tmp_path / "val" / "results.json").read_text())["miou"] == pytest.approx(
        torch.load(ckpt, weights_only=True)["best_pred"])
    predict.main(common + ["--split", "test", "--out-dir", str(tmp_path / "test")])
    folder = tmp_path / "test" / "results" / "VOC2012" / "Segmentation" / "comp5_test_cls"
    pngs = sorted(p.name for p in folder.iterdir())
    assert pngs == ["2009_000000.png", "2009_000001.png"]  # the test ids of the synthetic VOC
    png = Image.open(folder / pngs[0])
    assert png.mode == "P" and png.size == (64, 48)  # the image's own size, not the 33-pixel short side


def test_train_py_resumes_an_original_checkpoint_at_its_epoch(voc, tmp_path):
    save = tmp_path / "s"
    train.main(base(voc, save, epochs=1))
    train.main(base(voc, save, epochs=2) + ["--resume", str(experiment(save) / "checkpoint.pth.tar")])
    steps = [m["step"] for m in metrics(experiment(save, 1))]
    assert steps == [2, 3]  # start_epoch = the checkpoint's epoch 1 (§2.1 --resume), a new experiment folder


def test_readme_seed_command_adds_pairwise_and_pixelwise(voc, teacher, tmp_path):
    # the older README: --pa_lambda 1 --pi_lambda 100 -> CE + pa + pi every step (§4.5)
    save = tmp_path / "s"
    train_kd.main(kd(voc, save, teacher, "--backbone", "resnet18", "--dataset", "pascal", "--pa_lambda", "1",
                     "--pi_lambda", "100"))
    for m in metrics(experiment(save)):
        assert m["loss"] == pytest.approx(m["ce"] + m["pa"] + m["pi"], rel=1e-5)
    result = json.loads((experiment(save) / "results.json").read_text())
    assert result["method"] == "pa+kd" and result["teacher"] == "deeplabv3plus_resnet18"


def test_readme_aicsd_command_is_alw_on_ce_and_pixel_kd_only(voc, teacher, tmp_path):
    # the README's --pa_lambda 9500 --pi_lambda 10 --ALW: alpha*CE + (1-alpha)*pi, pa not added, no ICS (§2.8, §4.4)
    save = tmp_path / "s"
    train_kd.main(kd(voc, save, teacher, "--backbone", "resnet18", "--dataset", "pascal", "--pa_lambda", "9500",
                     "--pi_lambda", "10", "--ALW"))
    logged = metrics(experiment(save))
    assert all("pa" not in m and "lo" not in m for m in logged)
    for m in logged:
        alpha = (m["step"] // IPE) / 120
        assert m["loss"] == pytest.approx(alpha * m["ce"] + m["pi"], rel=1e-5)
    assert logged[0]["loss"] == pytest.approx(logged[0]["pi"], rel=1e-6)  # epoch 0: alpha = 0, pure KD


def test_paper_aicsd_command_weights_ce_and_ics_by_alpha(voc, teacher, tmp_path):
    # --lo_lambda 9500 --pi_lambda 10 --ALW: alpha*(CE + ICS) + (1-alpha)*KD (§4.5 AICSD row)
    save = tmp_path / "s"
    train_kd.main(kd(voc, save, teacher, "--lo_lambda", "9500", "--pi_lambda", "10", "--ALW"))
    logged = metrics(experiment(save))
    assert [m["lo"] for m in logged[:IPE]] == [0.0, 0.0] and all(m["lo"] > 0 for m in logged[IPE:])
    for m in logged[IPE:]:
        assert m["loss"] == pytest.approx(m["ce"] / 120 + m["lo"] + m["pi"], rel=1e-5)
    assert json.loads((experiment(save) / "results.json").read_text())["method"] == "aicsd"


@pytest.fixture
def recorded_student(monkeypatch):
    """The student train_kd.py builds and a copy of its initial weights."""
    seen = {}
    build = aicsd.build_network

    def record(args, backbone, device, *, return_features, pretrained=True):
        model = build(args, backbone, device, return_features=return_features, pretrained=pretrained)
        if pretrained:
            seen["model"], seen["initial"] = model, {k: v.clone() for k, v in model.state_dict().items()}
        return model

    monkeypatch.setattr(aicsd, "build_network", record)
    return seen


def _split(state):
    running = {k for k in state if "running_" in k or "num_batches" in k}
    return running, [k for k in state if k not in running]


def test_epoch_0_updates_no_student_weight_but_bn_statistics(voc, teacher, tmp_path, recorded_student):
    # §6.3: the epoch-0 optimizer holds only the unused connectors
    train_kd.main(kd(voc, tmp_path / "s", teacher, "--pi_lambda", "10", epochs=1))
    final, initial = recorded_student["model"].state_dict(), recorded_student["initial"]
    running, weights = _split(final)
    assert all(torch.equal(final[k], initial[k]) for k in weights)
    assert not torch.equal(final["decoder.bn1.running_mean"], initial["decoder.bn1.running_mean"])


def test_first_epoch_frozen_false_trains_epoch_0(voc, teacher, tmp_path, recorded_student):
    train_kd.main(kd(voc, tmp_path / "s", teacher, "--pi_lambda", "10", "--first-epoch-frozen", "false", epochs=1))
    final, initial = recorded_student["model"].state_dict(), recorded_student["initial"]
    assert not torch.equal(final["decoder.last_conv.8.weight"], initial["decoder.last_conv.8.weight"])


class Interrupted(Exception):
    pass


def test_train_kd_resume_continues_exactly(voc, teacher, tmp_path, monkeypatch, recorded_student):
    flags = ("--lo_lambda", "9500", "--pi_lambda", "10", "--ALW")
    train_kd.main(kd(voc, tmp_path / "full", teacher, *flags))
    full = {k: v.clone() for k, v in recorded_student["model"].state_dict().items()}

    save = RunState.save

    def save_then_stop(self, n):
        save(self, n)
        if n == IPE:
            raise Interrupted

    monkeypatch.setattr(RunState, "save", save_then_stop)
    with pytest.raises(Interrupted):
        train_kd.main(kd(voc, tmp_path / "cut", teacher, *flags))
    monkeypatch.setattr(RunState, "save", save)
    state = experiment(tmp_path / "cut") / "training_state.pth"
    train_kd.main(kd(voc, tmp_path / "cut", teacher, *flags, "--resume", str(state)))
    resumed = recorded_student["model"].state_dict()
    assert all(torch.allclose(resumed[k].double(), full[k].double(), rtol=0, atol=1e-6) for k in full)
    assert [m["step"] for m in metrics(experiment(tmp_path / "cut"))] == [0, 1, 2, 3]


@pytest.mark.parametrize("flags, train_mode", [((), True), (("--teacher-eval",), False)])
def test_teacher_runs_in_train_mode_unless_teacher_eval(voc, teacher, tmp_path, monkeypatch, flags, train_mode):
    # §3.7 / Q6: the original's teacher uses batch statistics and dropout during KD
    modes = []
    load = aicsd.load_teacher

    def record(args, device):
        model = load(args, device)
        model.register_forward_hook(lambda module, inputs, output: modes.append(module.training))
        return model

    monkeypatch.setattr(aicsd, "load_teacher", record)
    train_kd.main(kd(voc, tmp_path / "s", teacher, "--pi_lambda", "10", *flags, epochs=1))
    assert modes == [train_mode] * IPE

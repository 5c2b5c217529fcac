"""IFVD entry points (specs/ifvd_skd.md §A.2, §A.4.6, §A.6): objective and update order, end-to-end runs
on synthetic Cityscapes, resume, and clean failures on bad input."""
import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.losses.ifvd import IntraClassFeatureVariation
from common.losses.kd import PixelKL
from common.models import Discriminator, build_model
from common.recipes import run as run_mod
from ifvd import test as ifvd_test
from ifvd import train as ifvd_train
from ifvd import val as ifvd_val
from ifvd.options import train_parser
from tests.helpers_psp import (
    StubSeg,
    backbone_only,
    check_d_step,
    check_g_step,
    reference_forward,
    run_main,
    script_env,
    stub_batch,
)

REPO = Path(__file__).resolve().parents[1]


def test_objective_and_update_order_match_the_original():
    """One step = G step on CE + 0.4·aux + 10·KD + 200·IFV + 0.001·adv (D not detached), then one Adam
    D step on 0.1·(mean D(S) − mean D(T)) + 0.1·10·GP with the pre-update student logits (§A.4.6)."""
    torch.manual_seed(0)
    args = train_parser().parse_args([])
    assert (args.kd, args.ifv, args.adv, args.lambda_kd, args.lambda_ifv, args.lambda_adv) == (
        True, True, True, 10.0, 200.0, 0.001)
    student, teacher = StubSeg(8), StubSeg(16)
    s_ref = copy.deepcopy(student)
    step = ifvd_train.build_step(args, student, teacher, torch.device("cpu"))
    disc = step.adversary.discriminator
    d_ref = copy.deepcopy(disc)
    d_defaults = step.adversary.optimizer.defaults
    assert isinstance(step.adversary.optimizer, torch.optim.Adam)
    assert d_defaults["betas"] == (0.9, 0.99) and d_defaults["weight_decay"] == 0
    assert isinstance(step.optimizer, torch.optim.SGD)
    assert (step.optimizer.defaults["momentum"], step.optimizer.defaults["weight_decay"]) == (0.9, 5e-4)
    images, labels = stub_batch()
    torch.manual_seed(123)
    out = step((images, labels), 0)

    y, preds_s, preds_t, mc = reference_forward(s_ref, teacher, images, labels)
    kd = PixelKL()(preds_s[0], preds_t[0])
    ifv = IntraClassFeatureVariation(19)(preds_s[2], preds_t[2], y)
    adv = -d_ref(preds_s[0])[0].mean()
    total = mc + 10 * kd + 200 * ifv + 0.001 * adv
    check_g_step(out, (("mc", mc), ("kd", 10 * kd), ("ifv", 200 * ifv), ("adv", 0.001 * adv), ("loss_G", total)),
                 student, s_ref, total)
    adam = torch.optim.Adam([p for p in d_ref.parameters() if p.requires_grad], lr=4e-4, betas=(0.9, 0.99))
    check_d_step(out, disc, d_ref, adam, preds_s, preds_t, seed=123, student_first=True)  # §A.4.6


def test_discriminator_resume_loads_its_state_dict(tmp_path):
    torch.manual_seed(1)
    saved = Discriminator(num_classes=19)
    torch.save(saved.state_dict(), tmp_path / "city_39999_D.pth")
    args = train_parser().parse_args(["--D_resume", "True", "--D_ckpt_path", str(tmp_path / "city_39999_D.pth")])
    disc = ifvd_train.build_step(args, StubSeg(8), StubSeg(16), torch.device("cpu")).adversary.discriminator
    for key, value in saved.state_dict().items():
        torch.testing.assert_close(disc.state_dict()[key], value, msg=key)


def test_flags_drop_their_terms():
    args = train_parser().parse_args(["--kd", "False", "--ifv", "no", "--adv", "0"])
    step = ifvd_train.build_step(args, StubSeg(8), StubSeg(16), torch.device("cpu"))
    out = step(stub_batch(1, side=160), 0)
    assert step.terms == [] and step.adversary is None
    assert out["loss_G"] == pytest.approx(out["mc"]) and out["loss_D"] == 0.0 and out["adv"] == 0.0


# ----------------------------------------------------------------------------- end to end (synthetic data)
@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A small teacher (PSPNet-R18 architecture) and a fake deep-stem ImageNet file (backbone keys + fc)."""
    root = tmp_path_factory.mktemp("ifvd_weights")
    torch.manual_seed(0)
    teacher = build_model("pspnet_resnet18", num_classes=19)
    torch.save(teacher.state_dict(), root / "teacher.pth")
    backbone = backbone_only(build_model("pspnet_resnet18").state_dict())
    backbone["fc.weight"] = torch.zeros(1000, 512)
    torch.save(backbone, root / "resnet18-imagenet.pth")
    return root


def train_argv(data, weights, out, *extra):
    return ["--data-dir", str(data), "--data-list", str(data / "lists" / "train.lst"),
            "--data-listval", str(data / "lists" / "val.lst"), "--T_ckpt_path", str(weights / "teacher.pth"),
            "--teacher-model", "pspnet_resnet18", "--student-pretrain-model-imgnet",
            str(weights / "resnet18-imagenet.pth"), "--input-size", "64,64", "--batch-size", "2",
            "--num-workers", "0", "--device", "cpu", "--adv", "False", "--save-dir", str(out / "ckpt"),
            "--outputs-dir", str(out / "outputs"), *extra]


def test_readme_command_trains_evaluates_and_val_test_run(synthetic_cityscapes, weights, tmp_path):
    """``python ifvd/train.py --data-dir … --save-name … --gpu …`` as in the README, then val.py and test.py."""
    data = synthetic_cityscapes
    cmd = [sys.executable, "ifvd/train.py", *train_argv(data, weights, tmp_path, "--save-name", "run", "--gpu", "0",
                                                        "--num-steps", "2", "--save-ckpt-start", "2")]
    proc = subprocess.run(cmd, cwd=REPO, env=script_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "ckpt" / "run"
    assert (run / "city_1_G.pth").is_file() and not (run / "city_1_D.pth").exists()
    result = json.loads((run / "results.json").read_text())
    assert (result["paper"], result["method"], result["iterations"], result["crop"], result["batch"]) == (
        "ifvd", "kd_ifv", 2, [64, 64], 2)
    assert 0.0 <= result["miou"] <= 1.0 and len(result["iou"]) == 19
    log = (run / "log.txt").read_text()
    assert "step:    0 G_lr:0.010000" in log and "mean_IU:" in log and "ifv:" in log
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [0, 1] and lines[1]["G_lr"] == pytest.approx(0.01 * 0.5**0.9)
    assert len(list((tmp_path / "outputs").glob("*_gtFine_labelIds.png"))) == 2

    ckpt = run / "city_1_G.pth"
    ifvd_val.main(["--data-dir", str(data), "--data-list", str(data / "lists" / "val.lst"), "--restore-from",
                   str(ckpt), "--device", "cpu", "--outputs-dir", str(tmp_path / "val_out"),
                   "--results", str(tmp_path / "val" / "results.json")])
    val = json.loads((tmp_path / "val" / "results.json").read_text())
    assert val["miou"] == pytest.approx(result["miou"]) and val["split"] == "val"
    assert (val["method"], val["model"], val["extra"]["checkpoint"]) == ("ifvd", "pspnet_resnet18", "city_1_G")

    ifvd_test.main(["--data-dir", str(data), "--data-list", str(data / "lists" / "test.lst"), "--restore-from",
                    str(ckpt), "--device", "cpu", "--outputs-dir", str(tmp_path / "test_out")])
    pngs = sorted((tmp_path / "test_out").glob("*_leftImg8bit.png"))
    assert len(pngs) == 2
    ids = np.unique(np.asarray(Image.open(pngs[0])))
    assert set(ids.tolist()) <= {7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33}


def test_resume_continues_exactly(synthetic_cityscapes, weights, tmp_path, monkeypatch):
    """A run resumed from its step-1 training state ends with the same weights as the uninterrupted run
    (dropout, augmentations and sampler order included)."""
    data = synthetic_cityscapes
    saved = []
    original = run_mod.save_training_state

    def keep_copies(path, **kw):
        original(path, **kw)
        copy_path = Path(path).with_name(f"state_{kw['step']}.pth")
        copy_path.write_bytes(Path(path).read_bytes())
        saved.append(kw["step"])

    monkeypatch.setattr(run_mod, "save_training_state", keep_copies)
    common = ["--num-steps", "2", "--save-ckpt-start", "2", "--state-every", "1", "--random-mirror", "--random-scale",
              "--is-student-load-imgnet", "False", "--outputs-dir", ""]
    ifvd_train.main(train_argv(data, weights, tmp_path / "a", "--save-name", "a", *common))
    assert saved == [1, 2]
    state = tmp_path / "a" / "ckpt" / "a" / "state_1.pth"
    ifvd_train.main(train_argv(data, weights, tmp_path / "b", "--save-name", "b", "--resume", str(state), *common))
    full = torch.load(tmp_path / "a" / "ckpt" / "a" / "city_1_G.pth", weights_only=True)
    resumed = torch.load(tmp_path / "b" / "ckpt" / "b" / "city_1_G.pth", weights_only=True)
    for key in full:
        torch.testing.assert_close(resumed[key], full[key], msg=key)
    steps = [json.loads(x)["step"] for x in (tmp_path / "b" / "ckpt" / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1]


# ----------------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(
    "extra, message",
    [
        (["--T_ckpt_path", "/nonexistent/teacher.pth"], "teacher checkpoint"),
        (["--student-pretrain-model-imgnet", "/nonexistent/r18.pth"], "ImageNet weights"),
        (["--adv", "True"], "--adv needs logits of at least 64x64"),
        (["--adv", "True", "--input-size", "512,512", "--imsize-for-adv", "64"], "--imsize-for-adv must be 65"),
        (["--adv", "True", "--input-size", "512,512", "--adv-loss-type", "lsgan"], "adversarial loss type"),
        (["--batch-size", "1"], "--batch-size 1 is too small"),
        (["--data-list", "/nonexistent/train.lst"], "list file"),
        (["--S_resume", "True", "--S_ckpt_path", "/nonexistent/s.pth"], "student checkpoint"),
    ],
)
def test_train_bad_inputs_fail_cleanly(synthetic_cityscapes, weights, tmp_path, capsys, extra, message):
    err = run_main(ifvd_train.main, train_argv(synthetic_cityscapes, weights, tmp_path, "--num-steps", "1", *extra),
                   capsys)
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_teacher_with_toolbox_keys_is_refused_with_a_hint(synthetic_cityscapes, weights, tmp_path, capsys):
    state = torch.load(weights / "teacher.pth", weights_only=True)
    state = {(k.replace("pspmodule.", "head.0.", 1) if k.startswith("pspmodule.") else k): v for k, v in state.items()}
    torch.save(state, tmp_path / "toolbox.pth")
    err = run_main(ifvd_train.main, train_argv(synthetic_cityscapes, weights, tmp_path, "--T_ckpt_path",
                                               str(tmp_path / "toolbox.pth")), capsys)
    assert "does not match the model" in err and "remap_toolbox_teacher" in err


def test_bad_size_flag_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exc:
        train_parser().parse_args(["--input-size", "512x512"])
    assert exc.value.code == 2 and "h,w" in capsys.readouterr().err


@pytest.mark.parametrize("entry", [ifvd_val.main, ifvd_test.main])
def test_val_test_bad_inputs(entry, synthetic_cityscapes, tmp_path, capsys):
    data = synthetic_cityscapes
    split = "val" if entry is ifvd_val.main else "test"
    base = ["--data-dir", str(data), "--data-list", str(data / "lists" / f"{split}.lst"), "--device", "cpu"]
    assert "--restore-from" in run_main(entry, base, capsys)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    assert "could not be read" in run_main(entry, base + ["--restore-from", str(tmp_path / "junk.pth")], capsys)
    assert "dataset root" in run_main(entry, ["--data-dir", str(tmp_path / "nope"), "--data-list",
                                              str(data / "lists" / f"{split}.lst")], capsys)

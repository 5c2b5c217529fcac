"""CWD entry points end to end on tiny synthetic Cityscapes (CPU): exp_cwd.sh, train/val/test, resume, bad input."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "cwd" / "exp_cwd.sh"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    """A (randomly initialised, seeded) PSPNet-R101 state_dict standing in for teacher_city.pth."""
    from common.models import build_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "teacher_city.pth"
    torch.save(build_model("pspnet_resnet101", norm="bn").state_dict(), path)
    return path


def script_env(data, teacher, steps=2, crop="64,64", batch=2):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEGKD_")}
    env.update(SEGKD_DEMO="1", CITYSCAPES=str(data), SEGKD_DEMO_TEACHER=str(teacher), SEGKD_DEMO_STEPS=str(steps),
               SEGKD_DEMO_CROP=crop, SEGKD_DEMO_BATCH=str(batch), PYTHON=sys.executable, OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    return env


def run_script(args, env, cwd):
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=600)


def check_run(run, steps, adv):
    assert (run / f"city_{steps - 1}_G.pth").is_file()
    assert (run / f"city_{steps - 1}_D.pth").is_file() == adv
    result = json.loads((run / "results.json").read_text())
    assert result["paper"] == "cwd" and result["scale"] == "demo" and result["iterations"] == steps
    assert result["extra"]["run"] == run.name and result["extra"]["level"] == "logits"
    assert 0.0 <= result["miou"] <= 1.0 and len(result["iou"]) == 19
    test_out = (run / "test.out").read_text()
    assert f"restore_from : ckpt/{run.name}/city_{steps - 1}_G.pth" in test_out
    assert "2 images are loaded!" in test_out and f"mean_IU: {result['miou']:.6f}" in test_out
    return result


def test_exp_cwd_logits_command(synthetic_cityscapes, teacher_ckpt, tmp_path):
    """README command 1: `bash cwd/exp_cwd.sh channel kl 3 4 False False False v1`."""
    proc = run_script(["channel", "kl", "3", "4", "False", "False", "False", "v1", "--device", "cpu"],
                      script_env(synthetic_cityscapes, teacher_ckpt), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "ckpt" / "False_False_False_channel_kl_3_4_v1"
    result = check_run(run, 2, adv=False)
    assert result["method"] == "cwd"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [0, 1] and all(x["adv"] == 0.0 and x["cwd"] > 0 for x in lines)
    log = (run / "log.txt").read_text()
    assert "step:    0 G_lr:0.010000" in log and "kd:0.00000 adv:0.00000 cwd:" in log
    assert len(list((tmp_path / "outputs").glob("*.png"))) == 2


def test_exp_cwd_kd_gan_command(synthetic_cityscapes, teacher_ckpt, tmp_path):
    """README command 2: `... channel kl 3 4 True True False v1` (the discriminator needs >= 64x64 logits)."""
    env = script_env(synthetic_cityscapes, teacher_ckpt, steps=1, crop="505,505")
    proc = run_script(["channel", "kl", "3", "4", "True", "True", "False", "v1", "--device", "cpu"], env, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "ckpt" / "True_True_False_channel_kl_3_4_v1"
    assert check_run(run, 1, adv=True)["method"] == "cwd+kd+adv"
    (line,) = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert line["kd"] > 0 and line["adv"] != 0.0 and line["loss_D"] != 0.0


@pytest.mark.parametrize("args,message", [
    (["channel", "kl", "3"], "expected 8 positional arguments"),
    (["chanel", "kl", "3", "4", "False", "False", "False", "v1"], "NORM (1st argument)"),
    (["channel", "js", "3", "4", "False", "False", "False", "v1"], "DIVERGENCE (2nd argument)"),
    (["channel", "kl", "x", "4", "False", "False", "False", "v1"], "WEIGHT (3rd argument)"),
    (["channel", "kl", "3", "4", "False", "maybe", "False", "v1"], "ADV (6th argument)"),
])
def test_exp_cwd_usage_errors(args, message, synthetic_cityscapes, teacher_ckpt, tmp_path):
    proc = run_script(args, script_env(synthetic_cityscapes, teacher_ckpt), tmp_path)
    assert proc.returncode == 2 and message in proc.stderr and "usage: bash cwd/exp_cwd.sh" in proc.stderr
    assert not (tmp_path / "ckpt").exists()


def test_exp_cwd_needs_cityscapes(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("CITYSCAPES", "SEGKD_DEMO")}
    proc = run_script(["channel", "kl", "3", "4", "False", "False", "False", "v1"], env, tmp_path)
    assert proc.returncode == 2 and "CITYSCAPES is not set" in proc.stderr


def train_args(data, teacher, name, steps=3, extra=()):
    return ["--kd", "False", "--adv", "False", "--cwd", "True", "--cwd-feat", "False", "--temperature", "4",
            "--norm-type", "channel", "--divergence", "kl", "--lambda-cwd", "3", "--data-dir", str(data),
            "--data-list", str(data / "lists" / "train.lst"), "--data-listval", str(data / "lists" / "val.lst"),
            "--save-name", name, "--T_ckpt_path", str(teacher), "--is-student-load-imgnet", "False",
            "--input-size", "64,64", "--batch-size", "2", "--num-steps", str(steps), "--save-ckpt-start", str(steps),
            "--num-workers", "0", "--device", "cpu", "--norm", "bn", "--outputs-dir", "outputs", *extra]


def test_resume_matches_uninterrupted_run(synthetic_cityscapes, teacher_ckpt, tmp_path, monkeypatch):
    """Resuming from the state after step 2 of 3 gives the same student as the uninterrupted run."""
    from common.recipes import run as run_mod
    from cwd import train

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SEGKD_DEMO", raising=False)
    saved = run_mod.save_training_state

    def keep_copies(path, *, step, **kw):
        saved(path, step=step, **kw)
        shutil.copy(path, Path(path).with_name(f"state_{step}.pth"))

    monkeypatch.setattr(run_mod, "save_training_state", keep_copies)
    train.main(train_args(synthetic_cityscapes, teacher_ckpt, "full",
                          extra=["--state-every", "2", "--cwd-feat", "True"]))
    monkeypatch.setattr(run_mod, "save_training_state", saved)
    state = tmp_path / "ckpt" / "full" / "state_2.pth"
    train.main(train_args(synthetic_cityscapes, teacher_ckpt, "resumed",
                          extra=["--resume", str(state), "--cwd-feat", "True"]))
    full = torch.load(tmp_path / "ckpt" / "full" / "city_2_G.pth", weights_only=True)
    resumed = torch.load(tmp_path / "ckpt" / "resumed" / "city_2_G.pth", weights_only=True)
    assert full.keys() == resumed.keys()
    for key in full:
        assert torch.allclose(full[key], resumed[key], atol=1e-6), key
    steps = [json.loads(x)["step"] for x in (tmp_path / "ckpt" / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2]


@pytest.mark.parametrize("extra,message", [
    (["--T_ckpt_path", "missing/teacher_city.pth"], "teacher checkpoint (--T_ckpt_path) not found at missing"),
    (["--is-student-load-imgnet", "True"], "ImageNet weights of the student not found"),
    (["--norm-type", "chanel"], "unknown CWD norm type 'chanel'"),
    (["--norm-type", "none"], "gives NaN"),
    (["--adv", "True"], "--adv needs logits of at least 64x64"),
    (["--resume", "missing_state.pth"], "resume checkpoint missing_state.pth does not exist"),
])
def test_bad_inputs_stop_with_one_sentence(extra, message, synthetic_cityscapes, teacher_ckpt, tmp_path, monkeypatch,
                                           capsys):
    from cwd import train

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SEGKD_DEMO", raising=False)
    with pytest.raises(SystemExit) as exc:
        train.main(train_args(synthetic_cityscapes, teacher_ckpt, "bad", extra=extra))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert not list(tmp_path.glob("ckpt/bad/city_*_G.pth"))


def test_val_and_test_entry_points(synthetic_cityscapes, tmp_path, monkeypatch, capsys):
    from common.models import build_model
    from cwd import test as cwd_test
    from cwd import val as cwd_val

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SEGKD_DEMO", raising=False)
    torch.manual_seed(0)
    ckpt = tmp_path / "new_rn18-cityscape_singleAndWhole_val-75.02_test-73.86.pth"
    torch.save(build_model("pspnet_resnet18", norm="bn").state_dict(), ckpt)
    data = synthetic_cityscapes
    cwd_val.main(["--data-dir", str(data), "--data-list", str(data / "lists" / "val.lst"), "--restore-from", str(ckpt),
                  "--device", "cpu", "--norm", "bn", "--outputs-dir", "val_out"])
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"data_dir : {data}" and "mean_IU: " in out and "IU_array: " in out
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["extra"]["checkpoint"] == "val-75.02" and result["method"] == "cwd"
    assert len(list((tmp_path / "val_out").glob("*.png"))) == 2
    cwd_test.main(["--data-dir", str(data), "--data-list", str(data / "lists" / "test.lst"), "--restore-from",
                   str(ckpt), "--device", "cpu", "--norm", "bn", "--outputs-dir", "test_out"])
    pngs = sorted((tmp_path / "test_out").glob("*.png"))
    assert [p.name for p in pngs] == ["berlin_000000_000019_leftImg8bit.png", "bielefeld_000000_000020_leftImg8bit.png"]
    with pytest.raises(SystemExit) as exc:
        cwd_val.main(["--data-dir", str(data), "--device", "cpu"])
    assert exc.value.code == 2 and "pass --restore-from" in capsys.readouterr().err


def test_original_defaults_and_demo_preset(monkeypatch):
    from cwd.options import train_parser

    monkeypatch.delenv("SEGKD_DEMO", raising=False)
    args = train_parser().parse_args([])
    expected = dict(data_set="city", num_classes=19, data_dir="/workdir/cityscapes", ignore_label=255,
                    input_size="512,512", random_mirror=False, random_scale=False,
                    T_ckpt_path="./ckpt/teacher_city.pth", S_resume=False, D_resume=False,
                    is_student_load_imgnet=True, student_pretrain_model_imgnet="./ckpt/resnet18-imagenet.pth",
                    gpu="None", batch_size=8, num_steps=40000, momentum=0.9, power=0.9, lr_g=0.01,
                    weight_decay=5e-4, last_step=0, kd=True, lambda_kd=10.0, cwd=True, cwd_feat=False,
                    temperature=1.0, lambda_cwd=1.0, norm_type="none", divergence="kl", adv=False, lambda_adv=0.001,
                    preprocess_GAN_mode=1, adv_loss_type="wgan-gp", imsize_for_adv=65, adv_conv_dim=64,
                    lambda_gp=10.0, lambda_d=0.1, lr_d=4e-4, ifv=False, lambda_ifv=200.0, save_name="exp",
                    save_dir="ckpt", save_ckpt_start=40000, save_ckpt_every=1000, num_workers=4, seed=0)
    assert {k: getattr(args, k) for k in expected} == expected
    assert train_parser().parse_args(["--kd", "No", "--adv", "Y"]).kd is False
    with pytest.raises(SystemExit):
        train_parser().parse_args(["--kd", "maybe"])
    monkeypatch.setenv("SEGKD_DEMO", "1")
    demo = train_parser().parse_args(["--batch-size", "3"])
    assert demo.is_student_load_imgnet is False and demo.num_steps == demo.save_ckpt_start
    assert demo.batch_size == 3 and demo.lr_g == 0.01 and demo.momentum == 0.9


def test_exp_cwd_follows_save_dir_and_a_resume_at_the_end_writes_the_missing_results(
        synthetic_cityscapes, teacher_ckpt, tmp_path, monkeypatch):
    """`exp_cwd.sh ... --save-dir out` evaluates the checkpoint in out/<NAME>/; a kill during the final evaluation
    (simulated: results.json deleted) is repaired by resuming from the final training_state.pth: no step runs
    again, the weights stay, results.json is written (issue 13 item 9)."""
    from cwd import train

    env = script_env(synthetic_cityscapes, teacher_ckpt)
    args = ["channel", "kl", "3", "4", "False", "False", "False", "v1", "--device", "cpu", "--save-dir", "out"]
    proc = run_script(args, env, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "out" / "False_False_False_channel_kl_3_4_v1"
    assert not (tmp_path / "ckpt").exists()
    assert f"restore_from : out/{run.name}/city_1_G.pth" in (run / "test.out").read_text()
    weights_mtime = (run / "city_1_G.pth").stat().st_mtime_ns
    (run / "results.json").unlink()

    monkeypatch.chdir(tmp_path)
    for key in ("SEGKD_DEMO", "SEGKD_DEMO_TEACHER", "SEGKD_DEMO_STEPS", "SEGKD_DEMO_CROP", "SEGKD_DEMO_BATCH"):
        monkeypatch.setenv(key, env[key])
    train.main(["--kd", "False", "--adv", "False", "--cwd", "True", "--cwd-feat", "False", "--temperature", "4",
                "--norm-type", "channel", "--divergence", "kl", "--lambda-cwd", "3", "--data-dir",
                str(synthetic_cityscapes), "--save-name", run.name, "--device", "cpu", "--save-dir", "out",
                "--resume", str(run / "training_state.pth")])
    result = json.loads((run / "results.json").read_text())
    assert result["iterations"] == 2 and 0.0 <= result["miou"] <= 1.0
    assert (run / "city_1_G.pth").stat().st_mtime_ns == weights_mtime
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [0, 1]


def test_resume_refuses_a_state_of_another_run(synthetic_cityscapes, teacher_ckpt, tmp_path, monkeypatch, capsys):
    """Another batch is named with both values; a state with CWD's feature adapter (--cwd-feat True) resumed
    with --cwd-feat False names the module "adapter"."""
    from common.engine.checkpoint import save_training_state
    from cwd import train

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SEGKD_DEMO", raising=False)
    run = {"seed": 0, "num_steps": 3, "batch_size": 2, "world_size": 1}
    save_training_state(tmp_path / "batch4.pth", step=1, state={"modules": {}, "optimizers": {}},
                        run={**run, "batch_size": 4})
    save_training_state(tmp_path / "feat.pth", step=1, run=run,
                        state={"modules": {"student": {}, "adapter": {}}, "optimizers": {"G": {}}})
    for state, sentence in (("batch4.pth", "batch_size=4 but this run has batch_size=2"),
                            ("feat.pth", "it has adapter that this run does not")):
        with pytest.raises(SystemExit) as exc:
            train.main(train_args(synthetic_cityscapes, teacher_ckpt, "r", extra=["--resume", state]))
        err = capsys.readouterr().err
        assert exc.value.code == 2 and sentence in err and "Traceback" not in err
    assert not list((tmp_path / "ckpt" / "r").glob("*.pth"))


def test_demo_preset_crop_fits_the_discriminator_and_the_readme_says_so(monkeypatch):
    """Under SEGKD_DEMO the README's second command (ADV=True) trains at 503x503, the smallest crop whose
    logits reach 64x64: 503 -> stem (503-1)//2+1 = 252 -> ceil-mode pool 127 -> layer2 64, and 502 -> 63."""
    from cwd import train
    from cwd.options import train_parser

    monkeypatch.setenv("SEGKD_DEMO", "1")
    monkeypatch.delenv("SEGKD_DEMO_CROP", raising=False)
    assert train.check_args(train_parser().parse_args(["--norm-type", "channel", "--adv", "True"])) == (503, 503)
    assert train.check_args(train_parser().parse_args(["--norm-type", "channel"])) == (96, 96)
    readme = (REPO / "cwd" / "README.md").read_text()
    assert "smallest crop (503)" in readme and "503×503" in readme and "(504)" not in readme

"""SKD journal code line (specs/ifvd_skd.md §B.2, §B.4.5, §B.6, §B.10): objective and update order, the
evaluation schedule, both shell scripts end to end on synthetic Cityscapes, and clean failures."""
import copy
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from common.losses.segmentation import CriterionDSN
from common.losses.skd import PairWise, PixelWise
from common.models import Discriminator, build_model
from skd import test as skd_test
from skd import train_and_eval as skd_train
from skd.options import train_parser
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
SCRIPT_FLAGS = ["--pi", "True", "--pa", "True", "--ho", "True", "--lambda-pa", "0.5", "--pool-scale", "0.5",
                "--lambda-pi", "10.0", "--lambda-d", "0.1", "--weight-decay", "5e-4"]


def test_objective_and_update_order_match_the_original():
    """G: CE + 0.4·aux + 10·pixel-wise + 0.5·pair-wise(psp_feat) + 0.1·(−mean D(z_S)); then one SGD D step
    (lr 4e-4, momentum 0.9, G's weight decay) on 0.1·(mean D(S) − mean D(T)) + 0.1·10·GP (§B.4.5, §B.6)."""
    torch.manual_seed(0)
    args = train_parser().parse_args(SCRIPT_FLAGS)
    student, teacher = StubSeg(8, skd_outputs=True), StubSeg(16, skd_outputs=True)
    notes = []
    s_ref = copy.deepcopy(student)
    step = skd_train.build_step(args, student, teacher, torch.device("cpu"), notes)
    assert notes == []  # no model_best.pth.tar in the (relative) D folder: D starts from scratch
    disc = step.adversary.discriminator
    d_ref = copy.deepcopy(disc)
    assert isinstance(step.adversary.optimizer, torch.optim.SGD)
    d_defaults = step.adversary.optimizer.defaults
    assert (d_defaults["lr"], d_defaults["momentum"], d_defaults["weight_decay"]) == (4e-4, 0.9, 5e-4)
    images, labels = stub_batch()
    torch.manual_seed(7)
    out = step((images, labels), 0)

    _, preds_s, preds_t, mc = reference_forward(s_ref, teacher, images, labels)
    pi = PixelWise()(preds_s[0], preds_t[0])
    pa = PairWise(0.5)(preds_s[2], preds_t[2])
    adv = -d_ref(preds_s[0])[0].mean()
    total = mc + 10 * pi + 0.5 * pa + 0.1 * adv
    # the original logs the pair-wise term without λ_pa (§B.2.2 step 6.4)
    check_g_step(out, (("mc", mc), ("pixelwise", 10 * pi), ("pairwise", pa), ("adv", 0.1 * adv),
                       ("loss_G", total)), student, s_ref, total)
    d_sgd = torch.optim.SGD([p for p in d_ref.parameters() if p.requires_grad], lr=4e-4, momentum=0.9,
                            weight_decay=5e-4)
    check_d_step(out, disc, d_ref, d_sgd, preds_s, preds_t, seed=7, student_first=False)  # §B.4.5


def test_resume_folders_are_the_originals_overrides(tmp_path, monkeypatch):
    """``--S_ckpt_path``/``--D_ckpt_path`` are overwritten with ./ckpt/save_path/{Student,Distriminator} and their
    ``model_best.pth.tar`` ({'state_dict', 'step'}, ``module.`` prefixed) is loaded when present (§B.3)."""
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(2)
    saved_d = Discriminator(num_classes=19)
    saved_s = build_model("pspnet_resnet18", num_classes=19)
    for folder, model in (("Distriminator", saved_d), ("Student", saved_s)):
        (tmp_path / "ckpt" / "save_path" / folder).mkdir(parents=True)
        state = {"module." + k: v for k, v in model.state_dict().items()}
        torch.save({"state_dict": state, "step": 7}, tmp_path / "ckpt" / "save_path" / folder / "model_best.pth.tar")
    args = train_parser().parse_args(["--S_ckpt_path", "elsewhere", "--is-student-load-imgnet", "False"])
    skd_train.override_paths(args)
    notes = []
    student = skd_train.build_student(args, torch.device("cpu"), notes)
    teacher = StubSeg(16, skd_outputs=True)
    disc = skd_train.build_step(args, StubSeg(8, skd_outputs=True), teacher, torch.device("cpu"),
                                notes).adversary.discriminator
    assert len(notes) == 2 and args.last_step == 7
    torch.testing.assert_close(disc.state_dict()["last.0.weight"], saved_d.state_dict()["last.0.weight"])
    torch.testing.assert_close(student.state_dict()["head.weight"], saved_s.state_dict()["head.weight"])


def test_flags_drop_their_terms_and_defaults_are_the_originals():
    args = train_parser().parse_args([])
    assert (args.lambda_pa, args.weight_decay, args.pool_scale, args.lambda_d, args.S_resume, args.D_resume) == (
        1.0, 1e-4, 0.5, 0.1, True, True)
    args = train_parser().parse_args(["--pi", "False", "--pa", "no", "--ho", "0"])
    student, teacher = StubSeg(8, skd_outputs=True), StubSeg(16, skd_outputs=True)
    step = skd_train.build_step(args, student, teacher, torch.device("cpu"))
    out = step(stub_batch(1, side=160), 0)
    assert step.terms == [] and step.adversary is None
    assert out["loss_G"] == pytest.approx(out["mc"]) and out["loss_D"] == 0.0


def test_evaluation_steps_and_lr_indexing_of_the_original():
    steps = [k for k in range(1, 40001) if skd_train.is_eval_step(k, 40000, int(2975 / 8))]
    assert steps == [39326, 39697, 39999]
    from common.engine import poly_lr

    assert poly_lr(0.01, 1, 40000) < 0.01 and poly_lr(0.01, 40000, 40000) == 0.0


# ----------------------------------------------------------------------------- scripts end to end
@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A small teacher saved in the toolbox layout (head.0 = PSP module, head.1 = classifier, + fc) and a fake
    deep-stem ImageNet file."""
    root = tmp_path_factory.mktemp("skd_weights")
    torch.manual_seed(0)
    state = build_model("pspnet_resnet18", num_classes=19).state_dict()
    toolbox = {}
    for key, value in state.items():
        if key.startswith("pspmodule."):
            key = "head.0." + key[len("pspmodule."):]
        elif key.startswith("head."):
            key = "head.1." + key[len("head."):]
        toolbox[key] = value
    toolbox["fc.weight"] = torch.zeros(1000, 512)
    torch.save({"state_dict": toolbox}, root / "teacher_toolbox.pth")
    torch.save(state, root / "teacher_ifvd_keys.pth")
    backbone = backbone_only(state)
    torch.save(backbone, root / "resnet18-imagenet.pth")
    return root


def test_scripts_train_evaluate_and_predict(synthetic_cityscapes, weights, tmp_path):
    data = synthetic_cityscapes
    env = script_env(CITYSCAPES=str(data))
    extra = ["--data-list", str(data / "lists" / "train.lst"), "--data-listval", str(data / "lists" / "val.lst"),
             "--T_ckpt_path", str(weights / "teacher_toolbox.pth"), "--teacher-model", "pspnet_resnet18",
             "--student-pretrain-model-imgnet", str(weights / "resnet18-imagenet.pth"), "--input-size", "64,64",
             "--batch-size", "2", "--num-steps", "3", "--save-steps", "2", "--ho", "False", "--num-workers", "0",
             "--device", "cpu", "--snapshot-dir", str(tmp_path / "snap"), "--log-dir", str(tmp_path / "log"),
             "--outputs-dir", str(tmp_path / "val_out"), "--seed", "0"]
    proc = subprocess.run(["bash", str(REPO / "skd" / "run_train_val.sh"), *extra], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc_sh = (REPO / "skd" / "run_train_val.sh").read_text()
    assert "--lambda-pa 0.5" in proc_sh and "--random-mirror --random-scale" in proc_sh
    snaps = list((tmp_path / "snap").glob("CS_scenes_2_*.pth"))
    assert len(snaps) == 1, sorted(p.name for p in (tmp_path / "snap").iterdir())
    result = json.loads((tmp_path / "snap" / "results.json").read_text())
    assert (result["paper"], result["method"], result["iterations"]) == ("skd", "pi_pa", 2)
    assert snaps[0].name == f"CS_scenes_2_{result['miou']!r}.pth"
    log = (tmp_path / "log" / "log.txt").read_text()
    assert "step:    1 G_lr:0.006943" in log and "step:    3 G_lr:0.000000" in log  # step:{:5d} (§B.2.2 step 6.4)
    assert "[val 512,512] mean_IU:" in log
    assert "stopped after step 3" in log and "pairwise:" in log
    records = [json.loads(x) for x in (tmp_path / "log" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3 and records[-1]["G_lr"] == 0.0

    proc = subprocess.run(["bash", str(REPO / "skd" / "run_test.sh"), "--resume-from", str(snaps[0]),
                           "--data-list", str(data / "lists" / "test.lst"), "--device", "cpu",
                           "--outputs-dir", str(tmp_path / "test_out")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pngs = sorted((tmp_path / "test_out").glob("*_leftImg8bit.png"))
    assert len(pngs) == 2
    assert set(np.unique(np.asarray(Image.open(pngs[0]))).tolist()) <= {
        7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33}


# ----------------------------------------------------------------------------------------- bad inputs
def train_argv(data, weights, tmp_path, *extra):
    return ["--data-dir", str(data), "--data-list", str(data / "lists" / "train.lst"),
            "--data-listval", str(data / "lists" / "val.lst"), "--T_ckpt_path", str(weights / "teacher_toolbox.pth"),
            "--teacher-model", "pspnet_resnet18", "--input-size", "64,64", "--batch-size", "2", "--num-steps", "1",
            "--ho", "False", "--num-workers", "0", "--device", "cpu", "--log-dir", str(tmp_path / "log"),
            "--snapshot-dir", str(tmp_path / "snap"), *extra]


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "ImageNet weights of the student not found at 'None'"),
        (["--is-student-load-imgnet", "False", "--T_ckpt_path", "/nonexistent/t.pth"], "teacher checkpoint"),
        (["--is-student-load-imgnet", "False", "--ho", "True"], "--ho needs logits of at least 64x64"),
        (["--is-student-load-imgnet", "False", "--ho", "True", "--input-size", "512,512", "--imsize-for-adv", "32"],
         "--imsize-for-adv must be 65"),
        (["--is-student-load-imgnet", "False", "--pool-scale", "0.01"], "empty pooling patch"),
        (["--is-student-load-imgnet", "False", "--batch-size", "1"], "too small"),
        (["--is-student-load-imgnet", "False", "--data-list", "/nonexistent/train.lst"], "list file"),
    ],
)
def test_train_bad_inputs_fail_cleanly(synthetic_cityscapes, weights, tmp_path, capsys, extra, message):
    err = run_main(skd_train.main, train_argv(synthetic_cityscapes, weights, tmp_path, *extra), capsys)
    assert message in err


def test_teacher_in_ifvd_layout_also_loads(synthetic_cityscapes, weights, tmp_path):
    args = train_parser().parse_args(train_argv(synthetic_cityscapes, weights, tmp_path, "--T_ckpt_path",
                                                str(weights / "teacher_ifvd_keys.pth")))
    teacher = skd_train.build_teacher(args, torch.device("cpu"))
    reference = torch.load(weights / "teacher_ifvd_keys.pth", weights_only=True)
    torch.testing.assert_close(teacher.state_dict()["head.weight"], reference["head.weight"])


def test_test_script_bad_inputs(synthetic_cityscapes, tmp_path, capsys):
    data = synthetic_cityscapes
    base = ["--data-dir", str(data), "--data-list", str(data / "lists" / "test.lst"), "--device", "cpu",
            "--outputs-dir", str(tmp_path / "out")]
    assert "--resume-from" in run_main(skd_test.main, base, capsys)
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "wrong.pth")
    assert "does not match" in run_main(skd_test.main, base + ["--resume-from", str(tmp_path / "wrong.pth")], capsys)
    proc = subprocess.run(["bash", str(REPO / "skd" / "run_test.sh"), "--device", "cpu"], cwd=tmp_path,
                          env=script_env(CITYSCAPES=str(data)), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr


# ------------------------------------------------------------------ §B.10 invariants not covered elsewhere
def test_pair_wise_invariant_to_node_scaling_and_orthogonal_channel_maps_after_pooling():
    """On a 2x2 map with pool scale 0.5 the pooling patch is 1x1 (the identity), so transforms of the nodes
    are transforms "after pooling" (§B.10): positive per-node scaling and orthogonal channel maps keep L_pa."""
    g = torch.Generator().manual_seed(5)
    fs, ft = torch.randn(3, 6, 2, 2, generator=g), torch.randn(3, 9, 2, 2, generator=g)
    pa = PairWise(0.5)
    base = pa(fs, ft)
    scale = torch.rand(3, 1, 2, 2, generator=g) * 5 + 0.1
    torch.testing.assert_close(pa(fs * scale, ft), base, rtol=1e-5, atol=1e-7)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g))
    torch.testing.assert_close(pa(torch.einsum("dc,bchw->bdhw", q, fs), ft), base, rtol=1e-5, atol=1e-6)
    assert base.item() > 0


def test_dsn_task_loss_weights_and_ignore():
    g = torch.Generator().manual_seed(6)
    z, aux = torch.randn(2, 19, 9, 9, generator=g), torch.randn(2, 19, 9, 9, generator=g)
    y = torch.randint(0, 19, (2, 65, 65), generator=g)
    y[:, :20] = 255
    up = lambda t: F.interpolate(t, size=(65, 65), mode="bilinear", align_corners=True)  # noqa: E731
    expected = F.cross_entropy(up(z), y, ignore_index=255) + 0.4 * F.cross_entropy(up(aux), y, ignore_index=255)
    torch.testing.assert_close(CriterionDSN()((z, aux), y), expected)

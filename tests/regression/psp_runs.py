"""CPU training steps of each PSP-lineage trainer on tiny synthetic data (engine-redesign guard, issue 9): twenty of
the two cheap runs, three (:data:`ADV_STEPS`) of the three adversarial runs, whose float64 PSPNet-R18 step at the
discriminator's smallest crop costs ~34 CPU-s (20 steps would take ~35 CPU-minutes per test run).

``python -m tests.regression.psp_runs record [NAME ...]`` writes ``psp_losses.json`` beside this file (all
runs, or re-records the named ones): for every run the per-step losses its ``metrics.jsonl`` holds.
``tests/test_regression_psp.py`` reruns the same commands and compares step by step (1e-9 relative). The runs
compute in float64 (``torch.set_default_dtype``, read by :func:`common.numerics.compute_dtype`; issue 18): float32
results depend on the CPU's kernels (AVX2 and AVX-512 differ from step 0), float64 ones agree far below 1e-9.
The PSPNet runs train at 1/100 of the trainers' learning rates (``--lr-g 1e-4 --lr-d 4e-6``,
``--learning-rate 1e-4``): at the defaults 20 steps from random weights are chaotic (the baseline's float64
losses with ATen's default and AVX2 kernels part by 3e-5 at step 19, growing about 4x per step), at 1e-4 they
agree to 2e-14 while any change of a loss or an update still moves them by far more than 1e-9. The CWD run uses
the PSPNet-R18 teacher (its terms read the logits only) and the three adversarial runs keep the smallest crop
whose logits reach the discriminator's 64x64 (504).
A change that alters one of these numbers changes what the trainers compute; re-record only for a deliberate
change of results, and say which in the commit.
"""
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RECORD = HERE / "psp_losses.json"
STEPS = 20
ADV_STEPS = 3  # the adversarial runs: one float64 PSPNet-R18 step at 504x504 costs ~34 CPU-s
DTYPE = torch.float64


def make_inputs(root):
    """Synthetic Cityscapes and CamVid, a seeded PSPNet-R18 teacher and a seeded ESPNet-C teacher."""
    from common.datasets.synthetic import make_camvid, make_cityscapes
    from common.models import build_model

    root = Path(root)
    make_cityscapes(root / "cityscapes", splits={"train": 4, "val": 2, "test": 1}, size=(256, 512), seed=0)
    make_camvid(root / "camvid", splits={"train": 4, "val": 1, "test": 2}, size=(360, 480), seed=0)
    for name in ("pspnet_resnet18", "espnet_c"):
        torch.manual_seed(0)
        kwargs = {"num_classes": 11} if name == "espnet_c" else {"norm": "bn"}
        torch.save(build_model(name, **kwargs).state_dict(), root / f"{name}.pth")
    return root


def runs(root):
    """``{name: (main, argv, metrics.jsonl path)}`` of the five trainers."""
    from common import train_baseline
    from cwd import train as cwd_train
    from ifvd import train as ifvd_train
    from skd import train_and_eval, train_esp

    city, out = str(root / "cityscapes"), root / "out"
    common = ["--batch-size", "2", "--device", "cpu", "--num-workers", "0", "--norm", "bn"]
    lists = ["--data-list", f"{city}/lists/train.lst", "--data-listval", f"{city}/lists/val.lst"]
    teacher = ["--T_ckpt_path", str(root / "pspnet_resnet18.pth"), "--teacher-model", "pspnet_resnet18"]
    psp = ["--data-dir", city, *lists, "--is-student-load-imgnet", "False", "--num-steps", str(ADV_STEPS), *common,
           *teacher, "--input-size", "504,504", "--lr-g", "1e-4", "--lr-d", "4e-6"]
    return {
        "cwd_logits_kd_adv": (cwd_train.main, [
            *psp, "--norm-type", "channel", "--divergence", "kl", "--temperature", "4", "--lambda-cwd", "3",
            "--kd", "True", "--cwd", "True", "--adv", "True", "--save-dir", str(out / "cwd"), "--save-name", "r",
            "--save-ckpt-start", str(ADV_STEPS)], out / "cwd" / "r" / "metrics.jsonl"),
        "ifvd_full": (ifvd_train.main, [
            *psp, "--save-dir", str(out / "ifvd"), "--save-name", "r", "--save-ckpt-start", str(ADV_STEPS)],
            out / "ifvd" / "r" / "metrics.jsonl"),
        "skd_pi_pa_ho": (train_and_eval.main, [
            *psp, "--S_resume", "False", "--D_resume", "False", "--seed", "0",
            "--snapshot-dir", str(out / "skd" / "snap"), "--log-dir", str(out / "skd" / "log")],
            out / "skd" / "log" / "metrics.jsonl"),
        "skd_esp_label_kd_sd": (train_esp.main, [
            "--method", "student_esp_d", "--data-dir", str(root / "camvid"), "--sd_mode", "light_label_kd_sd",
            "--teacher_model", "student_esp_e", "--teacher-path", str(root / "espnet_c.pth"),
            "--num-steps", str(STEPS), "--batch-size", "2", "--input-size", "120,160", "--num-workers", "0",
            "--device", "cpu", "--random-mirror", "--snapshot-dir", str(out / "esp")], out / "esp" / "metrics.jsonl"),
        "train_baseline_r18": (train_baseline.main, [
            "--model", "pspnet_resnet18", "--data-dir", city, *lists, "--input-size", "96,96",
            "--num-steps", str(STEPS), *common, "--learning-rate", "1e-4", "--save-dir", str(out / "baseline")],
            out / "baseline" / "metrics.jsonl"),
    }


def step_losses(metrics_path):
    """Per-step floats of ``metrics.jsonl`` without the wall time: ``[{name: value}, ...]`` in step order."""
    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines()]
    rows.sort(key=lambda row: row["step"])
    return [{k: v for k, v in row.items() if k not in ("time", "step")} for row in rows]


def run_all(root, names=None):
    """Run the trainers (``names``: a subset) in :data:`DTYPE` and return ``{name: step_losses}``."""
    torch.set_num_threads(1)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(DTYPE)
    try:
        root = make_inputs(root)
        results = {}
        for name, (main, argv, metrics) in runs(root).items():
            if names and name not in names:
                continue
            main(argv)
            results[name] = step_losses(metrics)
    finally:
        torch.set_default_dtype(default_dtype)
    return results


if __name__ == "__main__":
    import tempfile

    if sys.argv[1:2] != ["record"]:
        sys.exit("usage: python -m tests.regression.psp_runs record [NAME ...]")
    names = set(sys.argv[2:])
    recorded = json.loads(RECORD.read_text()) if names and RECORD.is_file() else {}
    with tempfile.TemporaryDirectory() as tmp:
        recorded.update(run_all(tmp, names=names or None))
    RECORD.write_text(json.dumps(recorded, indent=1) + "\n")
    print(f"wrote {RECORD}")

"""``python -m cwd.demo`` (``make demo``): the whole CWD pipeline at demo scale on synthetic Cityscapes.

1. write a synthetic Cityscapes to ``demo_data/cityscapes`` (common.datasets.synthetic);
2. train a PSPNet-R101 teacher briefly with the baseline trainer (``demo_runs/teacher/teacher_city.pth``);
3. train a PSPNet-R18 student without distillation, the table's "Student" row (``demo_runs/baseline``);
4. run the README command ``bash cwd/exp_cwd.sh channel kl 3 4 False False False v1`` under the demo
   preset (``SEGKD_DEMO=1``: smaller crop, batch and number of steps, the demo data and teacher;
   every other setting is the original's), which trains and then evaluates into
   ``demo_runs/cwd/ckpt/False_False_False_channel_kl_3_4_v1/`` (test.out, results.json);
5. print the CWD table: the paper's numbers beside the demo-scale measurements.

The numbers measure a few minutes of CPU training on synthetic images. They show that the pipeline
works and that the student learns; they are not a reproduction of the paper (that needs Cityscapes,
the released teacher and 40 000 steps, see cwd/README.md). Steps 1–3 are skipped when their outputs
exist (``--force`` redoes them).
"""
import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common.errors import UserError, main_guard
from common.tables.schema import read_results
from cwd.options import DEMO_BATCH, DEMO_CROP, DEMO_DATA_DIR, DEMO_STEPS, DEMO_TEACHER

REPO = Path(__file__).resolve().parents[1]
DEMO_SPLITS = {"train": 24, "val": 6, "test": 2}
DEMO_SIZE = (128, 256)
TEACHER_STEPS = 140
TEACHER_CROP = "64,64"
TEACHER_BATCH = 4
COMMAND = ["channel", "kl", "3", "4", "False", "False", "False", "v1"]
RUN_NAME = "False_False_False_channel_kl_3_4_v1"


def run(cmd, env, cwd, title):
    """Run one stage as a subprocess (its output streams through); a failure stops the demo."""
    print(f"\n=== {title} ===\n$ {' '.join(str(c) for c in cmd)}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run([str(c) for c in cmd], env=env, cwd=cwd)
    if proc.returncode:
        raise UserError(f"demo stage '{title}' failed (exit {proc.returncode}); see its output above")
    print(f"--- {title}: {time.perf_counter() - start:.0f} s", flush=True)


def baseline_cmd(model, method, data, out, crop, batch, steps, device):
    return [sys.executable, "-m", "common.train_baseline", "--model", model, "--paper", "cwd", "--method", method,
            "--data-dir", data, "--data-list", data / "lists" / "train.lst",
            "--data-listval", data / "lists" / "val.lst", "--input-size", crop, "--batch-size", batch,
            "--num-steps", steps, "--no-random-scale", "--no-random-mirror", "--save-dir", out,
            "--save-every", "0", "--num-workers", "0", "--device", device]


@main_guard
def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m cwd.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads per stage (default 2)")
    parser.add_argument("--force", action="store_true", help="regenerate the data and retrain teacher and baseline")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    os.chdir(REPO)
    data = (REPO / DEMO_DATA_DIR).resolve()
    runs = REPO / "demo_runs"
    teacher = (REPO / DEMO_TEACHER).resolve()
    env = {**os.environ, "SEGKD_DEMO": "1", "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}

    if args.force or not (data / "lists" / "train.lst").is_file():
        from common.datasets.synthetic import make_cityscapes

        print(f"=== synthetic Cityscapes: {DEMO_SPLITS} images of {DEMO_SIZE[0]}x{DEMO_SIZE[1]} -> {data}", flush=True)
        shutil.rmtree(data, ignore_errors=True)
        make_cityscapes(data, splits=DEMO_SPLITS, size=DEMO_SIZE, seed=0)

    if args.force or not teacher.is_file():
        out = runs / "teacher"
        shutil.rmtree(out, ignore_errors=True)
        run(baseline_cmd("pspnet_resnet101", "teacher", data, out, TEACHER_CROP, TEACHER_BATCH, TEACHER_STEPS,
                         args.device), env, REPO, f"teacher PSPNet-R101, {TEACHER_STEPS} steps")
        shutil.copy(out / f"CS_scenes_{TEACHER_STEPS}.pth", teacher)

    if args.force or not (runs / "baseline" / "results.json").is_file():
        shutil.rmtree(runs / "baseline", ignore_errors=True)
        run(baseline_cmd("pspnet_resnet18", "baseline", data, runs / "baseline", DEMO_CROP, DEMO_BATCH, DEMO_STEPS,
                         args.device), env, REPO, f"student PSPNet-R18 without distillation, {DEMO_STEPS} steps")

    cwd_dir = runs / "cwd"
    shutil.rmtree(cwd_dir / "ckpt" / RUN_NAME, ignore_errors=True)
    cwd_dir.mkdir(parents=True, exist_ok=True)
    demo_env = {**env, "CITYSCAPES": str(data), "SEGKD_DEMO_TEACHER": str(teacher), "PYTHON": sys.executable}
    run(["bash", REPO / "cwd" / "exp_cwd.sh", *COMMAND, "--device", args.device], demo_env, cwd_dir,
        f"bash cwd/exp_cwd.sh {' '.join(COMMAND)} (demo preset, {DEMO_STEPS} steps)")

    print("\n=== CWD table (reported = paper; demo-scale = this demo, synthetic data, NOT a reproduction) ===",
          flush=True)
    subprocess.run([sys.executable, "-m", "common.tables", "--paper", "cwd", "--results-dir", str(runs)],
                   env=env, cwd=REPO, check=True)
    print("\nDemo-scale val mIoU on the synthetic images (not comparable with the paper's Cityscapes numbers; the\n"
          f"teacher gets only {TEACHER_STEPS} steps from random init, so it can be weaker than the student here):")
    for label, path in (("teacher PSPNet-R101", runs / "teacher"), ("student, no distillation", runs / "baseline"),
                        ("student, CWD (channel kl 3 4)", cwd_dir / "ckpt" / RUN_NAME)):
        result = read_results(path / "results.json")
        print(f"  {label:31s} {100 * result['miou']:6.2f}   ({result['iterations']} steps, crop "
              f"{'x'.join(map(str, result['crop']))}, batch {result['batch']})")
    print(f"demo finished in {time.perf_counter() - start:.0f} s; run folder {cwd_dir / 'ckpt' / RUN_NAME}")


if __name__ == "__main__":
    main()

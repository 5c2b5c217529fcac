"""``python -m aicsd.demo``: the AICSD pipeline at demo scale (``SEGKD_DEMO=1``) on a synthetic VOC, on CPU.

Under the demo preset (common/recipes/aicsd.py ``DEMO_DEFAULTS``: ``demo_data/aicsd_voc`` written on first use,
crop 65, batch 4, 10 epochs (ALW --ref-epochs 10), no ImageNet weights, CPU, runs under ``demo_runs/aicsd``) it runs:

1. the teacher: ``aicsd/train.py --checkname demo-teacher`` for 30 epochs (a DeepLabV3+ R18, not the R101 of the
   paper, so the demo fits a few CPU minutes); skipped when its ``model_best.pth.tar`` exists;
2. the student baseline: ``aicsd/train.py --backbone resnet18``;
3. the paper's AICSD command: ``aicsd/train_kd.py --backbone resnet18 --lo_lambda 9500 --pi_lambda 10 --ALW``
   (teacher: the demo teacher, ``--teacher-backbone resnet18``);
4. the AICSD table: the README's numbers beside these demo-scale measurements.

The numbers show the pipeline works, not a reproduction (that needs VOC, the released teacher and 120 epochs).
"""
import os
import subprocess
import sys
import time
from pathlib import Path

from common.errors import UserError, main_guard
from common.recipes.aicsd import DEMO_ENV, DEMO_TEACHER
from common.tables.render import render_all

REPO = Path(__file__).resolve().parents[1]
TEACHER_EPOCHS = 30
STAGES = (
    ("teacher", ["aicsd/train.py", "--checkname", "demo-teacher", "--epochs", str(TEACHER_EPOCHS),
                 "--results-method", "demo-teacher"]),
    ("student baseline", ["aicsd/train.py", "--backbone", "resnet18"]),
    ("AICSD (paper command)", ["aicsd/train_kd.py", "--backbone", "resnet18", "--dataset", "pascal", "--lo_lambda",
                               "9500", "--pi_lambda", "10", "--ALW"]),
)


def run(title, cmd, env):
    print(f"\n=== {title} ===\n$ SEGKD_DEMO=1 python {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *cmd], env=env, cwd=REPO)
    if proc.returncode:
        raise UserError(f"demo stage '{title}' failed (exit {proc.returncode}); see its output above")
    print(f"--- {title}: {time.perf_counter() - start:.0f} s", flush=True)


@main_guard
def main():
    env = {**os.environ, DEMO_ENV: "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    for title, cmd in STAGES:
        if title == "teacher" and (REPO / DEMO_TEACHER).is_file():
            print(f"=== teacher: {DEMO_TEACHER} exists, skipped ===")
            continue
        run(title, cmd, env)
    print(render_all(("aicsd",), [REPO / "demo_runs" / "aicsd"], complexity=False))


if __name__ == "__main__":
    main()

"""``python -m cwd.demo`` (``make demo``): the whole CWD pipeline at demo scale on synthetic Cityscapes.

1. write a synthetic Cityscapes to ``demo_data/cityscapes`` (common.datasets.synthetic);
2. train the teacher with the baseline trainer on its own, longer schedule and larger crop
   (``demo_runs/teacher/teacher_city.pth``; :data:`TEACHER`); it is cached: a later run with the same teacher
   schedule skips it;
3. train the PSPNet-R18 student without distillation, the table's "Student" row (``demo_runs/baseline``);
4. run the README command ``bash cwd/exp_cwd.sh channel kl 3 4 False False False v1 --teacher-model ...``
   under the demo preset (``SEGKD_DEMO=1``: the demo data and teacher, the student schedule :data:`STUDENT`;
   every other setting is the original's), which trains and then evaluates into
   ``demo_runs/cwd/ckpt/False_False_False_channel_kl_3_4_v1/`` (test.out, results.json). Baseline and CWD
   student share the schedule (steps, crop, batch), the seed and therefore the initial weights and the data
   order: the only difference is the distillation term;
5. print the CWD table (the paper's numbers beside the demo-scale measurements), the teacher / baseline / CWD
   val mIoU with the differences, and write ``demo_runs/cwd/predictions.png``: three val images, their
   ground truth and the three models' predictions side by side in the Cityscapes palette.

The numbers measure a few minutes of CPU training on synthetic images: they show the pipeline and the
teacher > student relation, not a reproduction of the paper (that needs Cityscapes, the released teacher
and 40 000 steps, see cwd/README.md). Steps 1-3 are skipped when their outputs exist for the same settings
(``--force`` redoes them).
"""
import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from common.datasets.cityscapes import CSTrainValSet, read_list
from common.errors import UserError, main_guard
from common.evaluation.inference import predict_whole
from common.evaluation.palette import CITYSCAPES_COLORS
from common.io import atomic_open
from common.models import build_model
from common.models.weights import load_checkpoint, load_state_dict_strict
from common.tables.schema import read_results
from cwd.options import DEMO_DATA_DIR, DEMO_TEACHER

REPO = Path(__file__).resolve().parents[1]
DEMO_SPLITS = {"train": 24, "val": 6, "test": 2}
DEMO_SIZE = (128, 256)
# The teacher: the student's architecture trained 4x longer on 1.8x larger crops (cwd/train.py --teacher-model);
# a PSPNet-R101 from random init learns too slowly for a CPU demo (17.3 mIoU after 300 steps at 64x64, weaker
# than this student).
TEACHER = {"model": "pspnet_resnet18", "steps": 400, "crop": (128, 128), "batch": 4}
STUDENT = {"model": "pspnet_resnet18", "steps": 100, "crop": (96, 96), "batch": 4}
SEED = 0
COMMAND = ["channel", "kl", "3", "4", "False", "False", "False", "v1"]
RUN_NAME = "False_False_False_channel_kl_3_4_v1"
PICTURE_IMAGES = 3


def run(cmd, env, cwd, title):
    """Run one stage as a subprocess (its output streams through); a failure stops the demo."""
    print(f"\n=== {title} ===\n$ {' '.join(str(c) for c in cmd)}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run([str(c) for c in cmd], env=env, cwd=cwd)
    if proc.returncode:
        raise UserError(f"demo stage '{title}' failed (exit {proc.returncode}); see its output above")
    print(f"--- {title}: {time.perf_counter() - start:.0f} s", flush=True)


def baseline_cmd(method, data, out, schedule, device, mirror):
    return [sys.executable, "-m", "common.train_baseline", "--model", schedule["model"], "--paper", "cwd",
            "--method", method,
            "--data-dir", data, "--data-list", data / "lists" / "train.lst",
            "--data-listval", data / "lists" / "val.lst", "--input-size", "{},{}".format(*schedule["crop"]),
            "--batch-size", schedule["batch"], "--num-steps", schedule["steps"], "--seed", SEED,
            "--no-random-scale", "--random-mirror" if mirror else "--no-random-mirror", "--save-dir", out,
            "--save-every", "0", "--num-workers", "0", "--device", device]


def is_done(run_dir, schedule):
    """Whether ``run_dir`` holds a finished run (results.json) of exactly this model, schedule and seed."""
    path = run_dir / "results.json"
    if not path.is_file():
        return False
    result = read_results(path)
    return (result["model"], result["iterations"], tuple(result["crop"]), result["batch"], result["seed"]) == (
        schedule["model"], schedule["steps"], schedule["crop"], schedule["batch"], SEED)


def colourise(label):
    """H x W trainIds (255 = ignore, drawn black) -> H x W x 3 uint8 in the Cityscapes palette."""
    lut = np.zeros((256, 3), np.uint8)
    lut[:len(CITYSCAPES_COLORS)] = CITYSCAPES_COLORS
    return lut[np.asarray(label, np.uint8)]


def load_model(name, path, what):
    model = build_model(name, num_classes=19)
    load_state_dict_strict(model, load_checkpoint(str(path), what), f"{what} {path}")
    return model.eval()


def write_predictions(path, data, models, count=PICTURE_IMAGES):
    """The first ``count`` val images: image | ground truth | one column per model, titled, in one PNG."""
    val_list = data / "lists" / "val.lst"
    val_set = CSTrainValSet(data, val_list, crop_size=None)
    entries = read_list(val_list, data)
    rows = []
    with torch.no_grad():
        for i in range(min(count, len(val_set))):
            image, label, size, _ = val_set[i]
            tiles = [np.asarray(Image.open(entries[i][0]).convert("RGB")), colourise(label)]
            for model in models.values():
                logits = predict_whole(model, torch.from_numpy(image)[None], tuple(label.shape))
                tiles.append(colourise(logits.argmax(1)[0].numpy()))
            rows.append(np.concatenate(tiles, axis=1))
    grid = np.concatenate(rows, axis=0)
    band, width = 14, grid.shape[1] // (2 + len(models))
    canvas = Image.new("RGB", (grid.shape[1], grid.shape[0] + band), (255, 255, 255))
    canvas.paste(Image.fromarray(grid), (0, band))
    draw = ImageDraw.Draw(canvas)
    for k, title in enumerate(["image", "ground truth", *models]):
        draw.text((k * width + 3, 1), title, fill=(0, 0, 0))
    with atomic_open(path, "wb") as f:
        canvas.save(f, format="PNG")
    return path


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
    cwd_run = runs / "cwd" / "ckpt" / RUN_NAME
    env = {**os.environ, "SEGKD_DEMO": "1", "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    torch.set_num_threads(args.threads)

    if args.force or not (data / "lists" / "train.lst").is_file():
        from common.datasets.synthetic import make_cityscapes

        print(f"=== synthetic Cityscapes: {DEMO_SPLITS} images of {DEMO_SIZE[0]}x{DEMO_SIZE[1]} -> {data}", flush=True)
        shutil.rmtree(data, ignore_errors=True)
        make_cityscapes(data, splits=DEMO_SPLITS, size=DEMO_SIZE, seed=0)

    teacher_dir = runs / "teacher"
    if args.force or not teacher.is_file() or not is_done(teacher_dir, TEACHER):
        shutil.rmtree(teacher_dir, ignore_errors=True)
        run(baseline_cmd("teacher", data, teacher_dir, TEACHER, args.device, mirror=True), env, REPO,
            f"teacher {TEACHER['model']}, {TEACHER['steps']} steps, crop {TEACHER['crop']}, random mirror")
        shutil.copy(teacher_dir / f"CS_scenes_{TEACHER['steps']}.pth", teacher)
    else:
        print(f"=== teacher: cached {teacher} ({TEACHER['steps']} steps; --force retrains it)", flush=True)

    baseline_dir = runs / "baseline"
    if args.force or not is_done(baseline_dir, STUDENT):
        shutil.rmtree(baseline_dir, ignore_errors=True)
        run(baseline_cmd("baseline", data, baseline_dir, STUDENT, args.device, mirror=False), env, REPO,
            f"student {STUDENT['model']} without distillation, {STUDENT['steps']} steps")
    else:
        print(f"=== baseline student: cached {baseline_dir} (--force retrains it)", flush=True)

    shutil.rmtree(cwd_run, ignore_errors=True)
    cwd_run.parent.mkdir(parents=True, exist_ok=True)
    demo_env = {**env, "CITYSCAPES": str(data), "SEGKD_DEMO_TEACHER": str(teacher), "PYTHON": sys.executable,
                "SEGKD_DEMO_STEPS": str(STUDENT["steps"]), "SEGKD_DEMO_CROP": "{},{}".format(*STUDENT["crop"]),
                "SEGKD_DEMO_BATCH": str(STUDENT["batch"])}
    run(["bash", REPO / "cwd" / "exp_cwd.sh", *COMMAND, "--teacher-model", TEACHER["model"], "--device", args.device,
         "--seed", str(SEED)], demo_env,
        runs / "cwd", f"bash cwd/exp_cwd.sh {' '.join(COMMAND)} (demo preset, {STUDENT['steps']} steps)")

    print("\n=== CWD table (reported = paper; demo-scale = this demo, synthetic data, NOT a reproduction) ===",
          flush=True)
    subprocess.run([sys.executable, "-m", "common.tables", "--paper", "cwd", "--results-dir", str(runs)],
                   env=env, cwd=REPO, check=True)

    miou = {}
    print("\nDemo-scale val mIoU on the synthetic images (not comparable with the paper's Cityscapes numbers):")
    for key, label, path in ((("teacher", f"teacher {TEACHER['model']}", teacher_dir),
                              ("baseline", "student, no distillation", baseline_dir),
                              ("cwd", "student, CWD (channel kl 3 4)", cwd_run))):
        result = read_results(path / "results.json")
        miou[key] = 100 * result["miou"]
        print(f"  {label:31s} {miou[key]:6.2f}   ({result['iterations']} steps, crop "
              f"{'x'.join(map(str, result['crop']))}, batch {result['batch']}, seed {result['seed']})")
    print(f"  teacher - baseline {miou['teacher'] - miou['baseline']:+.2f}; "
          f"CWD - baseline {miou['cwd'] - miou['baseline']:+.2f}")

    last = STUDENT["steps"] - 1
    models = {"teacher": load_model(TEACHER["model"], teacher, "demo teacher"),
              "baseline": load_model(STUDENT["model"], baseline_dir / f"CS_scenes_{STUDENT['steps']}.pth",
                                     "demo baseline"),
              "CWD": load_model(STUDENT["model"], cwd_run / f"city_{last}_G.pth", "demo CWD student")}
    picture = write_predictions(runs / "cwd" / "predictions.png", data, models)
    print(f"demo finished in {time.perf_counter() - start:.0f} s; run folder {cwd_run}")
    print(f"predictions of {PICTURE_IMAGES} val images (image | ground truth | teacher | baseline | CWD): {picture}")


if __name__ == "__main__":
    main()

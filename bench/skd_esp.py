"""eval_esp.py throughput (images/s) on the CamVid test split, CPU, against the original loop in the same run.

Baseline = the conference code's loop (skd_cvpr19.md §6): no DataLoader workers, contiguous tensors, a numpy
masked array and the original ``get_confusion_matrix`` per image. Uses ``$CAMVID`` (or ../shared/data/camvid)
and ``base_57.8.pth`` when present, else a synthetic CamVid and random weights (said in the output).
The two loops run interleaved over the same first SUBSET images (bench/timing.py); the speed-up is the median
of the per-round ratios with its spread, or "not resolved at this size". CPU time includes the loader
workers (counted when they exit at the end of each pass).
"""
import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch.utils import data

from bench import timing
from common.datasets.camvid import CamVidLight
from common.models import build_model
from common.models.weights import load_checkpoint, load_state_dict_strict
from skd.eval_esp import evaluate, predict_esp

REPO = Path(__file__).resolve().parents[1]
SUBSET = 20  # images timed with both loops per round (the original loop alone is the slow part of this bench)
ROUNDS = 5


def original_confusion(gt, pred, n):
    index = (gt * n + pred).astype("int32")
    count = np.bincount(index)
    cm = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            if i * n + j < len(count):
                cm[i, j] = count[i * n + j]
    return cm


def original_loop(model, dataset):
    """The §6 loop as written: batch 1, no workers, masked array, per-image bincount matrix."""
    cm = np.zeros((11, 11))
    loader = data.DataLoader(dataset, batch_size=1, shuffle=False, num_workers=0)
    with torch.no_grad():
        for image, label, size, _ in loader:
            out = predict_esp(model, image, (360, 480))
            seg_pred = np.asarray(out.numpy()[0], dtype=np.uint8)
            seg_pred = np.ma.masked_array(seg_pred, mask=label.numpy()[0] == 255, fill_value=20)
            seg_gt = np.asarray(label.numpy()[0][:size[0, 0], :size[0, 1]], dtype=int)
            keep = seg_gt != 255
            cm += original_confusion(seg_gt[keep], np.asarray(seg_pred)[keep], 11)
    tp = np.diag(cm)
    return float((tp / np.maximum(1.0, cm.sum(1) + cm.sum(0) - tp)).mean())


def _data():
    env = os.environ.get("CAMVID")
    root = Path(env) if env else REPO.parent / "shared" / "data" / "camvid"
    ckpt = REPO.parent / "shared" / "data" / "checkpoints" / "skd_camvid_espnet" / "base_57.8.pth"
    if (root / "test.txt").is_file():
        return root, ckpt if ckpt.is_file() else None, None
    from common.datasets.synthetic import make_camvid

    tmp = tempfile.TemporaryDirectory()
    make_camvid(tmp.name, splits={"test": 24}, size=(360, 480), seed=0)
    return Path(tmp.name), None, tmp


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench skd_esp", description=__doc__.splitlines()[0])
    args = timing.add_arguments(parser, rounds=ROUNDS).parse_args([] if argv is None else argv)
    torch.set_num_threads(2)
    root, ckpt, tmp = _data()
    model = build_model("espnet", num_classes=11).eval()
    if ckpt is not None:
        load_state_dict_strict(model, load_checkpoint(str(ckpt), "checkpoint"), str(ckpt))
    what = f"{root} with {ckpt.name if ckpt else 'random weights (synthetic data)'}"
    dataset = CamVidLight(root, root / "test.txt")
    subset = data.Subset(dataset, range(min(SUBSET, len(dataset))))
    n = len(subset)
    print(f"bench skd_esp: ESPNet on CamVid test images from {what}, CPU; {timing.machine_note()}")
    cpu = torch.device("cpu")
    miou = {}

    def original():
        miou["original"] = original_loop(model, subset)

    def ours():
        cm, _, _ = evaluate(model, subset, 11, 255, cpu, progress=False, channels_last=True, num_workers=2)
        miou["eval_esp"] = cm.miou()

    samples = timing.interleave({"original": original, "eval_esp": ours}, rounds=args.rounds, warmup=1)
    for label, name in (("original loop, 2 threads", "original"), ("eval_esp.py, 2 workers x 1", "eval_esp")):
        sec = samples[name].median_wall()
        print(f"  {label:<27s}: {n / sec:6.2f} images/s (median {sec:5.1f} s per {n} images)  "
              f"mIoU {100 * miou[name]:.4f}")
    speedup = timing.ratio(samples, "original", "eval_esp")
    print("  " + speedup.text("speed-up (original loop / eval_esp.py)"))
    cm, count, sec = evaluate(model, dataset, 11, 255, cpu, progress=False, channels_last=True, num_workers=2)
    print(f"  eval_esp.py, whole split   : {count / sec:6.2f} images/s on {count} images ({sec:5.1f} s, "
          f"mIoU {100 * cm.miou():.4f}; one pass)")
    if tmp is not None:
        tmp.cleanup()
    return speedup


if __name__ == "__main__":
    main()

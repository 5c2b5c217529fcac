"""SKD conference code (branch ``cvpr_19``): evaluate an ESPNet / ESPNet-C checkpoint on CamVid.

    python skd/eval_esp.py --method student_esp_d --dataset camvid_light --data_list $LIST --data_dir $DIR \\
        --num_classes 11 --restore-from $CKPT --store-output False

Protocol of skd_cvpr19.md §6: whole 360×480 image, camvid_light normalisation, output [0] resized to the label
size (bilinear, align_corners=True; identity for ESPNet, ×8 for ESPNet-C), argmax, one confusion matrix over
the split with void (11) dropped, mIoU = plain mean over the 11 classes. Every flag of the original
``config/__init__.py`` is accepted in both spellings (``--data-dir`` and ``--data_dir``); unlike the original,
``main()`` does not overwrite them (README, Deviations).
"""
import argparse
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils import data

from common.datasets.camvid import CLASS_NAMES, DATASETS
from common.engine.dist import resolve_device
from common.errors import UserError, main_guard
from common.evaluation import ConfusionMatrix, cityscapes_palette, save_prediction_png
from common.io import output_dir
from common.models import build_model
from common.models.weights import load_checkpoint, load_state_dict_strict
from common.numerics import compute_dtype, set_tf32
from common.recipes.options import finite_float, str2bool
from common.tables.schema import make_result, write_results

# ``network/__init__.py`` names of the conference code -> segkd registry names (skd_cvpr19.md §2).
METHODS = {"student_esp_d": "espnet", "student_esp_e": "espnet_c"}
PSP_METHODS = ("psp_dsn", "student_res18", "student_res18_pre", "teacher_dense", "psp_dsn_floor")
# The saved PNGs use the Cityscapes colours (CamVid class k in Cityscapes colour k) plus one grey (§6.4).
PALETTE = cityscapes_palette()[:19 * 3] + [128, 128, 128] + [0] * (256 - 20) * 3


def add(parser, name, *aliases, **kw):
    """Add ``--a-b`` together with ``--a_b`` (the README's spelling) or the other way round, and the same two
    spellings of each alias (an older segkd name of the same flag)."""
    flag = name.lstrip("-")
    names = []
    for spelling in (flag, *(a.lstrip("-") for a in aliases)):
        for alt in (spelling, spelling.replace("-", "_"), spelling.replace("_", "-")):
            if f"--{alt}" not in names:
                names.append(f"--{alt}")
    kw.setdefault("dest", flag.replace("-", "_"))
    parser.add_argument(*names, **kw)


def build_parser(description=__doc__):
    """The conference ``Parameters`` parser (skd_cvpr19.md §1.2) plus segkd's device/output flags.

    Defaults are the values the original evaluation actually used (its ``main()`` overrides): method
    ``student_esp_d``, dataset ``camvid_light``, 11 classes, batch 1, the test list of the data dir.
    """
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    camvid = os.environ.get("CAMVID")
    add(p, "--method", default="student_esp_d", help="student_esp_d (ESPNet) or student_esp_e (ESPNet-C)")
    add(p, "--dataset", default="camvid_light", help="data pipeline; camvid_light")
    add(p, "--data-dir", default=camvid, help="CamVid root, or the folder holding SegNet/CamVid/ (default $CAMVID)")
    add(p, "--data-list", default=None, help="list file (default: test.txt of the CamVid root)")
    add(p, "--num-classes", type=int, default=11)
    add(p, "--restore-from", default=None, help="checkpoint to evaluate")
    add(p, "--batch-size", type=int, default=1)
    add(p, "--store-output", type=str2bool, default=False, help="True: write prediction PNGs to --output-path")
    add(p, "--output-path", default="./seg_output_eval_set", help="folder for the prediction PNGs")
    add(p, "--input-size", default="512,512", help="parsed and unused, as in the original")
    add(p, "--gpu", default=None, help="CUDA_VISIBLE_DEVICES for a CUDA run")
    add(p, "--side", action="store_true", help="5-item batches of the *_sd datasets; not available for camvid_light")
    add(p, "--ignore-label", type=int, default=255)
    add(p, "--use-flip", default="False", help="parsed and unused, as in the original")
    add(p, "--use-ms", default="False", help="parsed and unused, as in the original")
    add(p, "--predict-choice", default="whole", help="parsed and unused, as in the original")
    add(p, "--whole-scale", default="1", help="parsed and unused, as in the original")
    # Training flags of the same parser (read by train_esp.py where it implements them; parsed and unused by
    # the evaluation, as in the original). Names, types and defaults: skd_cvpr19.md §1.2 and issue 13 item 4.
    add(p, "--learning-rate", type=finite_float, default=1e-2)
    add(p, "--momentum", type=finite_float, default=0.9)
    add(p, "--num-steps", type=int, default=40000)
    add(p, "--epoch", type=int, default=None, help="parsed and unused (train_esp.py counts --num-steps)")
    add(p, "--power", type=finite_float, default=0.9)
    add(p, "--weight-decay", type=finite_float, default=5e-4)
    add(p, "--random-seed", type=int, default=304, help="seed of the training data order, augmentation and init")
    add(p, "--seed", type=int, default=304, help="parsed and unused (train_esp.py seeds with --random-seed)")
    add(p, "--random-mirror", action="store_true")
    add(p, "--random-scale", action="store_true", help="training: random scaling (CamVidLight's scale draw)")
    add(p, "--fix", type=str2bool, nargs="?", const=True, default=False, help="parsed and unused")
    add(p, "--network", default=None, help="parsed and unused (--method picks the network)")
    add(p, "--ohem", type=str2bool, nargs="?", const=True, default=False, help="parsed and unused (no OHEM CE here)")
    add(p, "--ohem-thres", type=finite_float, default=0.6, help="parsed and unused")
    add(p, "--ohem-thres1", type=finite_float, default=0.8, help="parsed and unused")
    add(p, "--ohem-thres2", type=finite_float, default=0.5, help="parsed and unused")
    add(p, "--ohem-keep", type=int, default=100000, help="parsed and unused")
    add(p, "--dsn-weight", type=finite_float, default=0.4, help="parsed and unused (ESPNet has no DSN head)")
    add(p, "--sd_mode", default="light_label", help="loss terms: 'label', 'kd', 'sd' substrings (network/net.py)")
    add(p, "--adv_loss", default="hinge", help="parsed and unused (no GAN loss in the branch, spec §8)")
    add(p, "--weight_l", type=finite_float, default=1.0)
    add(p, "--weight_k", type=finite_float, default=1.0)
    add(p, "--weight_s", type=finite_float, default=1.0)
    add(p, "--weight_kf", type=finite_float, default=1.0, help="parsed and unused")
    add(p, "--weight_GAN", type=finite_float, default=1.0, help="parsed and unused")
    add(p, "--tem", type=finite_float, default=1.0)
    add(p, "--location", type=finite_float, default=1.0, help="parsed and unused (discriminator input, spec §8)")
    add(p, "--divided_lr", type=int, default=50, help="parsed and unused")
    add(p, "--teacher_model", default="psp_dsn_floor")
    add(p, "--teacher-from", "--teacher-path", default=None, help="teacher checkpoint")
    add(p, "--dis-from", "--discriminator-path", default=None, help="parsed and unused (no discriminator trained)")
    add(p, "--snapshot-dir", default="./snapshots/")
    # segkd additions (never change the default behaviour).
    add(p, "--device", default=None, help="cpu or cuda (default: cuda if available)")
    add(p, "--num-threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    add(p, "--num-workers", type=int, default=2,
        help="DataLoader workers; on CPU, >= 2 also run the model (one image and one thread each)")
    add(p, "--channels-last", type=str2bool, default=True, help="channels-last memory format (speed only)")
    add(p, "--output-dir", default=None, help="where results.json goes (default ./outputs/eval_esp/<ckpt stem>)")
    add(p, "--tf32", action="store_true", help="allow TF32 on Ampere+ GPUs (the original: full fp32)")
    return p


def resolve_data(args):
    """(data_dir, data_list) with the defaults and the checks of a user-facing path."""
    if not args.data_dir:
        raise UserError("no CamVid data directory: pass --data-dir (the CamVid root or the folder holding "
                        "SegNet/CamVid/) or set CAMVID")
    data_list = args.data_list
    if data_list is None:
        found = [p for p in (Path(args.data_dir) / "test.txt", Path(args.data_dir) / "SegNet" / "CamVid" / "test.txt")
                 if p.is_file()]
        if not found:
            raise UserError(f"no test.txt under {args.data_dir} (nor SegNet/CamVid/test.txt); pass --data-list")
        data_list = found[0]
    return args.data_dir, str(data_list)


def build_esp_model(method, num_classes):
    """The network of ``--method`` (skd_cvpr19.md §2); PSP methods are the journal code line's."""
    if method.lower() in METHODS:
        return build_model(METHODS[method.lower()], num_classes=num_classes)
    if method.lower() in PSP_METHODS:
        raise UserError(f"--method {method} is a PSPNet of the conference registry, which eval_esp.py does not "
                        f"evaluate; use --method student_esp_d or student_esp_e (PSPNet: see skd/README.md)")
    raise UserError(f"unknown --method {method!r}; choose one of: {', '.join(METHODS)}")


def load_esp_checkpoint(model, path, method, flag="--restore-from"):
    """Strict load of a released state dict (``module.`` stripped) given by ``flag``; a mismatch names the first
    keys."""
    if not path:
        raise UserError(f"no checkpoint given: pass {flag} <file.pth>")
    state = load_checkpoint(path, "checkpoint", hint=f"pass {flag} with an ESPNet/ESPNet-C .pth file")
    load_state_dict_strict(model, state, f"checkpoint {path} (--method {method})")


def predict_esp(model, image, size):
    """``predict_esp`` (§6.2): output [0], bilinear align_corners=True resize to ``size``, argmax."""
    logits = model(image)[0]
    if tuple(logits.shape[2:]) != tuple(size):
        logits = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=True)
    return logits.argmax(1)


class _WorkerPredictions(data.Dataset):
    """CPU data parallelism: each DataLoader worker (one torch thread, as DataLoader sets) decodes an image, runs
    the model on it (batch 1) and returns its confusion counts; avoids 2-thread spin-waits on busy machines."""

    def __init__(self, dataset, model, num_classes, ignore_label, keep_pred, fmt):
        self.dataset, self.model, self.keep_pred, self.fmt = dataset, model, keep_pred, fmt
        self.num_classes, self.ignore_label = num_classes, ignore_label

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        image, label, _, name = self.dataset[index]
        with torch.inference_mode():
            x = torch.from_numpy(image)[None].contiguous(memory_format=self.fmt)
            pred = predict_esp(self.model, x, label.shape)[0]
        cm = ConfusionMatrix(self.num_classes, self.ignore_label)
        cm.update(torch.from_numpy(label).to(torch.int64), pred)
        return cm.matrix, pred.numpy().astype(np.uint8) if self.keep_pred else np.zeros(0, np.uint8), name


def evaluate(model, dataset, num_classes, ignore_label, device, store_dir=None, progress=True, channels_last=False,
             batch_size=1, num_workers=2):
    """Run the §6 loop over ``dataset``; returns (ConfusionMatrix, number of images, seconds).

    On CPU with ``num_workers >= 2`` the images are spread over the loader workers (:class:`_WorkerPredictions`);
    otherwise the main process runs the model on batches of ``batch_size`` and the workers only decode.
    """
    cm = ConfusionMatrix(num_classes, ignore_index=ignore_label)
    count, start = 0, time.perf_counter()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.eval().to(memory_format=fmt)

    def store(preds, names):
        for p, name in zip(preds, names):
            save_prediction_png(np.asarray(p, np.uint8), Path(store_dir) / f"{name}.png", PALETTE)

    def report(n):
        if progress and n // 50 != (n - 1) // 50:
            print(f"{n} images processed", flush=True)

    if device.type == "cpu" and num_workers >= 2:
        work = _WorkerPredictions(dataset, model, num_classes, ignore_label, store_dir is not None, fmt)
        loader = data.DataLoader(work, batch_size=None, shuffle=False, num_workers=num_workers)
        for matrix, pred, name in loader:
            cm.matrix += matrix
            if store_dir is not None:
                store([pred.numpy()], [name])
            count += 1
            report(count)
        return cm, count, time.perf_counter() - start
    loader = data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                             pin_memory=device.type == "cuda")
    with torch.inference_mode():
        for image, label, _, names in loader:
            image = image.to(device, compute_dtype()).contiguous(memory_format=fmt)
            pred = predict_esp(model, image, label.shape[1:]).cpu()
            cm.update(label.to(torch.int64), pred)
            if store_dir is not None:
                store(pred.numpy(), names)
            count += image.shape[0]
            report(count)
    return cm, count, time.perf_counter() - start


def main(argv=None):
    args = build_parser().parse_args(argv)
    set_tf32(args.tf32)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    if args.gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = args.gpu
    device = resolve_device(args.device or "auto")
    if args.dataset not in DATASETS:
        raise UserError(f"--dataset {args.dataset!r} is not available for eval_esp.py; use camvid_light")
    if args.side:
        raise UserError("--side expects 5-item batches of a *_sd dataset, but camvid_light yields 4; drop --side")
    if args.batch_size < 1 or args.num_classes < 1 or args.num_workers < 0:
        raise UserError("--batch-size and --num-classes must be positive and --num-workers non-negative integers")
    data_dir, data_list = resolve_data(args)
    model = build_esp_model(args.method, args.num_classes)
    load_esp_checkpoint(model, args.restore_from, args.method)
    model.to(device)

    dataset = DATASETS[args.dataset](data_dir, data_list, crop_size=(360, 480), scale=False, mirror=False)
    store_dir = args.output_path if args.store_output else None
    if store_dir:
        output_dir(store_dir, "--output-path")
    cm, count, seconds = evaluate(model, dataset, args.num_classes, args.ignore_label, device, store_dir,
                                  channels_last=args.channels_last, batch_size=args.batch_size,
                                  num_workers=args.num_workers)

    iou = cm.iou()
    miou = cm.miou()
    print({"meanIU": miou, "IU_array": iou})
    print(cm.array)
    names = CLASS_NAMES if args.num_classes == len(CLASS_NAMES) else [str(i) for i in range(args.num_classes)]
    for name, value in zip(names, iou):
        print(f"  {name:<11s} {100 * value:6.2f}")
    print(f"mIoU {100 * miou:.2f} on {count} images ({count / seconds:.2f} images/s)")

    stem = Path(args.restore_from).stem
    out_dir = Path(args.output_dir or Path("outputs") / "eval_esp" / stem)
    result = make_result(
        paper="skd", method=stem, model=METHODS[args.method.lower()], dataset="camvid",
        split=Path(data_list).stem, miou=miou, iou=iou.tolist(), pixel_acc=cm.pixel_acc(), mean_acc=cm.mean_acc(),
        iterations=None, crop=[360, 480], batch=args.batch_size, seed=None, wall_time_s=seconds,
        images_per_s=count / seconds if seconds > 0 else None,
        peak_mem_mb=torch.cuda.max_memory_allocated() / 2 ** 20 if device.type == "cuda" else None,
        extra={"checkpoint": stem, "checkpoint_path": str(Path(args.restore_from).resolve()),
               "conference_method": args.method,
               "num_images": count, "data_list": data_list},
    )
    path = write_results(out_dir / "results.json", result)
    print(f"results written to {path}")
    return result


if __name__ == "__main__":
    main_guard(main)()

"""The CIRKD-lineage recipe: what ``cirkd/train_baseline.py``, ``train_kd.py``, ``eval.py`` and ``test.py`` assemble.

specs/cirkd.md §1 (flags, behaviour, file names), §2 (networks and their loading), §3.1 (task loss), §4 (data,
schedule), §5 (evaluation, metric), §6 (distribution), §7.4 (the Params/FLOPs line). The originals' model names
(``--model deeplabv3 --backbone resnet18``) map to the registered networks; ``aux`` is derived from the backbone
(§1.1); norms are plain BN in one process and SyncBN under torchrun (§2.7); the ignore label is −1; the training
loop (:func:`train`) is the one of §1.2 step 7 on the engine, with validation every ``--val-per-iters`` and a copy
of the best model (§5.1), bare state_dict checkpoints under the original names (§1.2 step 8).
"""
import datetime
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset

from common.datasets.catalog import CIRKD_EVAL_SPLITS, CIRKD_NUM_CLASSES, CIRKD_TRAIN_SPLITS, cirkd_dataset
from common.datasets.transforms import IMG_MEAN_BGR
from common.engine import Logging, LRSchedule, PeriodicCheckpoint, PeriodicEval, RunLogger, Trainer
from common.engine.checkpoint import atomic_save
from common.engine.data import eval_loader, rank_batch, train_loader
from common.engine.dist import barrier, reduce_mean
from common.engine.step import Term
from common.engine.trainer import HookBase
from common.errors import UserError
from common.evaluation import SegmentationMetric, predict_multiscale, write_results_json
from common.evaluation.palette import resolve_palette, save_prediction_png
from common.io import atomic_open, output_dir
from common.losses.segmentation import CriterionDSN
from common.models import build_model
from common.models.weights import load_checkpoint, load_state_dict_strict
from common.recipes.options import add_runtime_flags, apply_gpu, finite_float, positive_int
from common.recipes.run import RunState, log_args, state_every, write_args_json

IGNORE_LABEL = -1  # §1.2 --ignore-label -1; CIRKD's metric only understands -1 (§5.3)
MODELS = ("deeplabv3", "psp", "deeplab_mobile", "psp_mobile")
BACKBONES = ("resnet18", "resnet50", "resnet101", "mobilenetv2")
# (--model, --backbone) -> registered network; the mobile models ignore --backbone except in file names (§1.2).
NETWORKS = {("deeplabv3", "resnet18"): "deeplabv3_resnet18", ("deeplabv3", "resnet101"): "deeplabv3_resnet101",
            ("psp", "resnet18"): "cirkd_pspnet_resnet18"}
MOBILE_NETWORKS = {"deeplab_mobile": "deeplabv3_mobilenetv2", "psp_mobile": "cirkd_pspnet_mobilenetv2"}
DATASET_NAMES = {"citys": "cityscapes", "voc": "voc", "camvid": "camvid", "ade20k": "ade20k",
                 "coco_stuff_164k": "coco_stuff_164k"}  # --dataset -> results.json "dataset"
FLOPS_INPUT = (1024, 2048)  # the Params/FLOPs line is measured at 1x3x1024x2048 (§1.2 step 3, §7.4)
NORM_HELP = "auto (syncbn under torchrun, else batchnorm, as the original), batchnorm, syncbn"
IMAGENET_HINT = ("pass CIRKD's ImageNet file (resnet18-imagenet.pth, resnet101-imagenet.pth or "
                 "mobilenetv2-imagenet.pth, README: Quick start) or None to start from random weights")


# --------------------------------------------------------------------------------------------------- flags
def none_path(value):
    """The originals' string ``'None'`` (and an empty value) as Python None (§1.1)."""
    return None if value in (None, "", "None") else value


def add_data_flags(parser, *, crop=(512, 1024), workers=8):
    """``--dataset``, ``--data``, ``--crop-size``, ``--workers/-j`` of every CIRKD entry point (§1.2)."""
    parser.add_argument("--dataset", type=str, default="citys", choices=tuple(CIRKD_NUM_CLASSES),
                        help="dataset name (citys, voc, camvid, ade20k, coco_stuff_164k)")
    parser.add_argument("--data", type=str, default="./dataset/cityscapes/", help="dataset root")
    parser.add_argument("--crop-size", type=positive_int, nargs=2, default=list(crop), metavar=("H", "W"),
                        help="crop height and width")
    parser.add_argument("--workers", "-j", type=int, default=workers, metavar="N", help="dataloader threads")


def add_launch_flags(parser, *, gpu_id=None):
    """``--no-cuda``, ``--local_rank``/``--local-rank`` (torchrun sets LOCAL_RANK; accepted and ignored),
    ``--gpu-id`` (sets CUDA_VISIBLE_DEVICES when given) and the added ``--device``, ``--norm``, ``--tf32``."""
    parser.add_argument("--no-cuda", action="store_true", default=False, help="disables CUDA (same as --device cpu)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0, dest="local_rank",
                        help="accepted for torch.distributed.launch; the rank comes from LOCAL_RANK")
    parser.add_argument("--gpu-id", type=str, default=gpu_id,
                        help="sets CUDA_VISIBLE_DEVICES (only when given; the 7e0d21f flag)")
    add_runtime_flags(parser, norms=("auto", "batchnorm", "syncbn"), norm_help=NORM_HELP)


def add_training_flags(parser):
    """The schedule, checkpoint and log flags of §1.2/§1.3 in their order, then the added run flags."""
    parser.add_argument("--batch-size", type=int, default=16, metavar="N",
                        help="total batch over all processes (split over them)")
    parser.add_argument("--max-iterations", type=int, default=40000, metavar="N", help="number of iterations")
    parser.add_argument("--lr", type=finite_float, default=0.02, metavar="LR", help="learning rate")
    parser.add_argument("--momentum", type=finite_float, default=0.9, metavar="M", help="momentum")
    parser.add_argument("--weight-decay", type=finite_float, default=1e-4, metavar="M", help="w-decay")
    parser.add_argument("--ignore-label", type=int, default=IGNORE_LABEL, metavar="N", help="ignore label")
    add_launch_flags(parser)
    parser.add_argument("--resume", type=str, default=None,
                        help="student state_dict to start from if the file exists (no optimizer or iteration)")
    parser.add_argument("--save-dir", default="~/.torch/models", help="directory of the checkpoints")
    parser.add_argument("--log-dir", default="../runs/logs/", help="directory of the log file")
    parser.add_argument("--log-iter", type=int, default=10, help="print log every log-iter")
    parser.add_argument("--save-per-iters", type=int, default=800, help="per iters to save")
    parser.add_argument("--val-per-iters", type=int, default=800, help="per iters to val")
    parser.add_argument("--skip-val", action="store_true", default=False, help="skip validation during training")
    for flag in ("--start_epoch", "--save-epoch", "--val-epoch"):  # §1.1: kept by the original, never read
        parser.add_argument(flag, type=int, default=None, metavar="N", help="accepted and ignored, as the original")
    add = "added: "
    parser.add_argument("--train-list", default=None, help=f"{add}training list (default: the shipped CIRKD list)")
    parser.add_argument("--val-list", default=None, help=f"{add}validation list (default: the shipped CIRKD list)")
    parser.add_argument("--seed", type=int, default=0, help=f"{add}seed of random/numpy/torch and of the data "
                                                            "order (the original seeds nothing)")
    parser.add_argument("--amp", action="store_true", help=f"{add}mixed-precision forwards (losses stay fp32): "
                                                           "bf16 on CPU, fp16 with a GradScaler on CUDA")
    parser.add_argument("--amp-dtype", choices=("bf16", "fp16"), default=None, help=f"{add}the dtype of --amp")
    parser.add_argument("--resume-state", default=None, help=f"{add}continue from a training_state.pth (model, "
                                                             "optimizer, iteration, best mIoU, RNG, data position)")
    parser.add_argument("--state-every", type=int, default=0, help=f"{add}also write training_state.pth every N "
                                                                   "iterations (it is always written at the "
                                                                   "--save-per-iters points)")


def check_training_flags(args):
    """Reject values the original crashed or hung on, naming the flag and the fix."""
    for flag in ("max_iterations", "log_iter", "save_per_iters", "val_per_iters"):
        if getattr(args, flag) <= 0:
            raise UserError(f"--{flag.replace('_', '-')} must be a positive number of iterations, "
                            f"got {getattr(args, flag)}")
    if args.batch_size < 2:
        raise UserError(f"--batch-size {args.batch_size} is too small: the image-pooling batch norm needs at "
                        "least 2 images; use --batch-size 2 or more")
    if args.ignore_label != IGNORE_LABEL:
        raise UserError(f"--ignore-label must be -1 (CIRKD's labels and metric use -1), got {args.ignore_label}")
    if args.lr <= 0:
        raise UserError(f"--lr must be positive, got {args.lr}")
    if args.state_every < 0:
        raise UserError(f"--state-every must be 0 or positive, got {args.state_every}")
    return tuple(args.crop_size)


def resolve_device_flag(args):
    """``--no-cuda`` means ``--device cpu``; ``--gpu-id`` sets CUDA_VISIBLE_DEVICES before CUDA starts."""
    if args.gpu_id is not None:
        apply_gpu(args.gpu_id)
    return "cpu" if args.no_cuda else args.device


# -------------------------------------------------------------------------------------------------- models
def derive_aux(backbone):
    """§1.1: ``aux`` is True for ``resnet*`` backbones, False for ``mobile*`` ones, whatever ``--aux`` says."""
    if backbone.startswith("resnet"):
        return True
    if backbone.startswith("mobile"):
        return False
    raise UserError(f"unknown backbone '{backbone}'; choose one of {', '.join(BACKBONES)}")


def network_name(model, backbone, flag="--model"):
    """The registered network of ``--model``/``--backbone`` (e.g. deeplabv3/resnet18 -> deeplabv3_resnet18)."""
    if model in MOBILE_NETWORKS:
        derive_aux(backbone)
        return MOBILE_NETWORKS[model]
    if model not in MODELS:
        raise UserError(f"unknown {flag} '{model}'; choose one of {', '.join(MODELS)}")
    derive_aux(backbone)
    if (model, backbone) not in NETWORKS:
        known = ", ".join(f"{m}/{b}" for m, b in NETWORKS)
        raise UserError(f"{flag} {model} with backbone {backbone} is not rebuilt; choose one of {known} or a mobile "
                        "model (deeplab_mobile, psp_mobile)")
    return NETWORKS[(model, backbone)]


def resolve_norm(norm, info):
    """``auto``: SyncBN under torchrun, plain BN in one process (§2.7)."""
    if norm == "auto":
        return "syncbn" if info.world_size > 1 else "batchnorm"
    return norm


def build_network(name, num_classes, norm, imagenet=None, flag="--pretrained-base"):
    """``name`` with ``norm``; ``imagenet`` (a path, or None/'None') initialises the backbone (§2.8)."""
    imagenet = none_path(imagenet)
    if imagenet is not None and not os.path.isfile(imagenet):
        raise UserError(f"ImageNet backbone file {flag} {imagenet} not found; {IMAGENET_HINT}")
    return build_model(name, num_classes=num_classes, norm=norm, pretrained_backbone=imagenet)


def load_weights(model, path, flag, hint):
    """Strict load of the segmentation checkpoint ``path`` (the originals' ``load_state_dict``, §2.8)."""
    state = load_checkpoint(path, f"checkpoint {flag}", hint)
    load_state_dict_strict(model, state, f"checkpoint {flag} {path}")
    return model


def complexity_line(name, num_classes):
    """``Params: x.xxM FLOPs: y.yyG`` as the originals log it (§1.2 step 3): parameters incl. the aux head and
    multiply-adds at 1x3x1024x2048 counted by CIRKD's counter (§7.4), on the meta device (no model state touched,
    cirkd.md §11)."""
    from common.tables.flops import model_complexity

    c = model_complexity(name, num_classes, FLOPS_INPUT, convention="cirkd")
    return f"Params: {c.params / 1e6:.2f}M FLOPs: {c.gmacs:.2f}G"


def task_term(aux):
    """``SegCrossEntropyLoss(ignore_index=-1)``: CE(main) + 0.4·CE(aux) for ResNet students, CE(main) for the
    mobile ones (§3.1), logged as "task"."""
    ce = CriterionDSN(ignore_index=IGNORE_LABEL, aux_weight=0.4)
    if aux:
        return Term("task", 1.0, lambda logits, aux_logits, labels: ce((logits, aux_logits), labels),
                    ("s.logits", "s.aux", "labels"))
    return Term("task", 1.0, lambda logits, labels: ce((logits,), labels), ("s.logits", "labels"))


# ---------------------------------------------------------------------------------------------------- data
def train_val_sets(args, crop):
    """The training set sized to ``max_iterations × batch`` samples (§1.2 step 1) and the full-image val set."""
    train_set = cirkd_dataset(args.dataset, args.data, CIRKD_TRAIN_SPLITS[args.dataset], list_path=args.train_list,
                              max_iters=args.max_iterations * args.batch_size, crop_size=crop)
    val_set = cirkd_dataset(args.dataset, args.data, "val", list_path=args.val_list)
    return train_set, val_set


def eval_set(dataset, root, list_path=None):
    """The set ``eval.py`` reports (§1.5: val, CamVid's test list)."""
    return cirkd_dataset(dataset, root, CIRKD_EVAL_SPLITS[dataset], list_path=list_path)


def padded_shard(length, rank, world_size):
    """The indices of maskrcnn-benchmark's unshuffled ``DistributedSampler`` (§6, §8.8): the list padded by its
    first entries to a multiple of the world size, rank ``r`` taking the contiguous block ``[r·n, (r+1)·n)``."""
    n = -(-length // world_size)
    indices = list(range(length))
    indices += indices[:n * world_size - length]
    return indices[rank * n:(rank + 1) * n]


def sharded_loader(dataset, info, *, pad=False, num_workers=0):
    """One image per batch over this rank's shard: every world-size-th image (no duplicates, default) or, with
    ``pad``, the original's padded contiguous shard (500 Cityscapes images on 8 ranks count 4 twice)."""
    if not pad or info.world_size == 1:
        return eval_loader(dataset, info, num_workers=num_workers)
    subset = Subset(dataset, padded_shard(len(dataset), info.rank, info.world_size))
    return DataLoader(subset, batch_size=1, shuffle=False, num_workers=num_workers)


# --------------------------------------------------------------------------------------------- evaluation
def make_metric(num_classes, corrected=False):
    """CIRKD's ``SegmentationMetric`` (§5.3): its quirks by default, the corrected metric (true argmax for pixAcc,
    classes absent from prediction and label skipped, float64 sums) with ``corrected``."""
    if corrected:
        return SegmentationMetric(num_classes, truncate_logits=False, absent_as_zero=False, float64=True)
    return SegmentationMetric(num_classes)


@dataclass
class Scores:
    """One evaluation: CIRKD's pixAcc and mIoU, the per-class IoU, its time and the images scored on all ranks."""

    pixel_acc: float
    miou: float
    iou: list
    seconds: float
    images: int

    def result_fields(self):
        """The metric fields of ``results.json`` (common/tables/schema.py)."""
        return {"miou": self.miou, "pixel_acc": self.pixel_acc,
                "iou": [None if np.isnan(v) else float(v) for v in self.iou], "wall_time_s": self.seconds,
                "images_per_s": self.images / max(self.seconds, 1e-12)}


def evaluate(model, loader, metric, device, *, scales=(1.0,), flip=False, on_sample=None):
    """Whole-image inference averaging raw logits over ``scales`` (scaled size ``floor(H·s)``, the original's
    ``scale_factor``) and the flip, upsampled to the label size (§5.1, §5.2), accumulated in ``metric`` and summed
    over the ranks. ``on_sample(i, image, logits, label, name)`` runs after each image (running log lines,
    prediction PNGs). Returns :class:`Scores`."""
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    count = 0
    with torch.no_grad():
        for i, (image, label, _, name) in enumerate(loader):
            image = image.to(device)
            logits = predict_multiscale(model, image, tuple(label.shape[-2:]), scales, flip, rounding="floor")
            metric.update(logits, label.to(device))
            count += 1
            if on_sample is not None:
                on_sample(i, image, logits, label, name[0])
    model.train(was_training)
    seconds = time.perf_counter() - start
    images = torch.tensor([float(count)], dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(images)
    pix_acc, miou = metric.all_reduce().get()
    return Scores(pix_acc, miou, metric.iou().tolist(), seconds, int(images.item()))


def palette_of(dataset):
    """``get_color_pallete`` of ``--save-pred``: the Cityscapes colours with CIRKD's sky (0, 130, 180) for citys,
    matplotlib's ``jet_r`` for coco_stuff_164k, the VOC palette otherwise (ADE20K: README Deviations)."""
    return resolve_palette({"citys": "cirkd_cityscapes", "coco_stuff_164k": "jet_r"}.get(dataset, "voc"))


def save_prediction(pred, folder, name, palette, image=None):
    """``<folder>/<name>.png``: the prediction in the palette or, with ``image`` (BGR minus mean, 3xHxW,
    ``--blend``), ``0.3·image + 0.7·colour prediction`` under the same name, as the original's ``--blend``."""
    if image is None:
        save_prediction_png(pred, Path(folder) / f"{name}.png", palette)
        return
    from PIL import Image

    rgb = (image.cpu().numpy().transpose(1, 2, 0) + np.asarray(IMG_MEAN_BGR))[:, :, ::-1]
    rgb = Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8), mode="RGB")
    mask = Image.fromarray(np.asarray(pred, np.uint8), mode="P")
    mask.putpalette(palette)
    with atomic_open(Path(folder) / f"{name}.png", "wb") as fh:
        Image.blend(rgb, mask.convert("RGB"), 0.7).save(fh, format="PNG")


def eval_logger(name, path, enabled):
    """``setup_logger`` of eval.py/test.py (§6 "Logging"): console + ``path`` (append) on rank 0, silent elsewhere."""
    logger = logging.getLogger(f"segkd.{name}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    if not enabled:
        logger.addHandler(logging.NullHandler())
        return logger
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    formatter = logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s")
    for handler in (logging.StreamHandler(sys.stdout), logging.FileHandler(path, mode="a")):
        handler.setFormatter(formatter)
        logger.addHandler(handler)
    return logger


def close_logger(logger):
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()


# ------------------------------------------------------------------------------------------------ training
def hms(seconds):
    return str(datetime.timedelta(seconds=int(seconds)))


class OriginalLogLine(HookBase):
    """Every ``log_iter`` iterations: ``Iters: i/N || Lr: .. || Task Loss: .. || ... || Cost Time: .. ||
    Estimated Time: ..`` with the losses averaged over the ranks (§1.2 step 7, §1.3 step 7).

    ``labels``: ``(log label, loss name)`` pairs in the original's order.
    """

    def __init__(self, logger, optimizer, labels, every, device):
        self.logger = logger
        self.optimizer = optimizer
        self.labels = tuple(labels)
        self.every = every
        self.device = device

    def before_train(self):
        self.start = time.perf_counter()

    def after_step(self):
        t = self.trainer
        losses = reduce_mean({name: t.losses.get(name, 0.0) for _, name in self.labels}, self.device)
        n = t.step + 1
        if n % self.every:
            return
        cost = time.perf_counter() - self.start
        eta = cost / (n - t.start_step) * (t.max_steps - n)
        terms = " || ".join(f"{label}: {losses[name]:.4f}" for label, name in self.labels)
        self.logger.info(f"Iters: {n:d}/{t.max_steps:d} || Lr: {self.optimizer.param_groups[0]['lr']:.6f} || "
                         f"{terms} || Cost Time: {hms(cost)} || Estimated Time: {hms(eta)}")


def original_log(logger, path, mode="w"):
    """Also write the console lines of ``logger`` (a :class:`RunLogger`) to the original log file ``path``."""
    if not logger.enabled:
        return None
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, mode=mode)
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    logger.logger.addHandler(handler)
    return handler


class CheckpointFiles:
    """The original checkpoint files of a run (§1.2 step 8): ``<save_dir>/<stem>.pth`` (latest) and
    ``<stem>_best_model.pth``, bare state_dicts of the un-wrapped student; rank 0 writes."""

    def __init__(self, save_dir, stem, model, info):
        self.latest = Path(save_dir) / f"{stem}.pth"
        self.best = Path(save_dir) / f"{stem}_best_model.pth"
        self.model = model
        self.info = info

    def save(self, is_best=False, latest=True):
        """Write the latest checkpoint (``latest=False``: it was just written) and copy it to the best one."""
        if self.info.is_main:
            if latest:
                atomic_save(self.model.state_dict(), self.latest)
            if is_best:
                tmp = self.best.with_name(self.best.name + ".tmp")
                shutil.copyfile(self.latest, tmp)
                os.replace(tmp, self.best)
        barrier()


def load_resume_weights(model, path):
    """The original ``--resume``: load the student weights if the file exists, otherwise carry on (§1.2).
    Returns the line to log."""
    if not path:
        return None
    if not os.path.isfile(path):
        return f"--resume {path} is not a file; training starts from the built model (as the original)"
    load_weights(model, path, "--resume", "pass a checkpoint of the same --model/--backbone/--dataset")
    return f"Resuming training, loaded {path}"


def train(args, step, info, *, crop, stem, log_file, labels, fields, logger_name, latest_at_validation=False):
    """§1.2 step 7–8 / §1.3 step 7–8: the loop over ``max_iterations`` batches on the engine.

    Poly lr (it = 1..N with ``lr·(1 − (it−1)/N)^0.9``) before each step on the one SGD group; the original log
    line every ``--log-iter``; the latest checkpoint every ``--save-per-iters`` and at the end; validation every
    ``--val-per-iters`` (unless ``--skip-val``) with a copy to ``*_best_model.pth`` and ``results.json`` whenever
    the mIoU improves; ``latest_at_validation``: also the latest checkpoint at every validation (``train_baseline.py``).
    ``<save_dir>/<stem>_run/`` holds the added files: ``training_state.pth`` (``--resume-state``), ``results.json``,
    ``args.json``, ``log.txt``, ``metrics.jsonl``.
    """
    device = info.device
    save_dir = Path(os.path.expanduser(args.save_dir))
    run_dir = save_dir / f"{stem}_run"
    batch = rank_batch(args.batch_size, info)
    state = RunState(run_dir / "training_state.pth", step, info, batch=batch, run={
        "seed": args.seed, "max_iterations": args.max_iterations, "batch_size": args.batch_size,
        "world_size": info.world_size, "methods": fields["method"]})
    if args.resume_state:
        start_step = state.resume(args.resume_state)
        resumed = f"resumed from {args.resume_state} at iteration {start_step}"
    else:
        start_step, resumed = 0, load_resume_weights(step.student, args.resume)
    train_set, val_set = train_val_sets(args, crop)
    output_dir(save_dir, "--save-dir")
    log_dir = output_dir(os.path.expanduser(args.log_dir), "--log-dir")
    logger = RunLogger(run_dir, logger_name, enabled=info.is_main, start_step=start_step)
    handler = original_log(logger, log_dir / log_file, "a" if start_step else "w")
    log_args(logger, args)
    logger.info(complexity_line(fields["model"], CIRKD_NUM_CLASSES[args.dataset]))
    if resumed:
        logger.info(resumed)

    loader = train_loader(train_set, seed=args.seed, batch=batch, start=start_step * batch, info=info,
                          num_workers=args.workers)
    vloader = sharded_loader(val_set, info)
    logger.info(f"{len(train_set)} training samples, {len(val_set)} validation images")
    write_args_json(run_dir, args, fields, info)
    files = CheckpointFiles(save_dir, stem, step.student, info)
    num_classes = CIRKD_NUM_CLASSES[args.dataset]
    started = time.perf_counter()

    last = {}

    def validate(n):
        last["scores"] = scores = evaluate(step.student, vloader, make_metric(num_classes), device)
        logger.info(f"Iters: {n:d} validation pixAcc: {scores.pixel_acc:.3f}, mIoU: {scores.miou:.3f}")
        if latest_at_validation:
            files.save()
        return scores.miou

    def on_best(n, miou):
        files.save(is_best=True, latest=not latest_at_validation)
        scores = last["scores"]
        if info.is_main:
            extra = {**fields["extra"], "best_iteration": n, "val_images": scores.images,
                     "train_wall_time_s": time.perf_counter() - started}
            write_results_json(run_dir / "results.json", **{**fields, **scores.result_fields(), "extra": extra})

    hooks = [LRSchedule(step.poly_specs(), args.max_iterations, power=0.9, first_index=0),
             OriginalLogLine(logger, step.optimizer, labels, args.log_iter, device),
             Logging(logger, device=device, period=args.max_iterations, progress=info.is_main),
             PeriodicCheckpoint(lambda n: files.save(), every=args.save_per_iters, final=True)]
    if not args.skip_val:
        hooks.append(PeriodicEval(validate, every=args.val_per_iters, final=False, on_best=on_best))
    hooks.append(PeriodicCheckpoint(state.save, every=args.save_per_iters, final=True,
                                    when=state_every(args.state_every, skip=lambda n: n % args.save_per_iters == 0)))
    trainer = Trainer(step, iter(loader), args.max_iterations, start_step=start_step, hooks=hooks)
    state.restore_hooks(trainer)
    trainer.train()
    logger.info(f"Total training time: {hms(time.perf_counter() - started)} ({args.max_iterations} iterations)")
    if handler is not None:
        logger.logger.removeHandler(handler)
        handler.close()
    logger.close()
    return trainer

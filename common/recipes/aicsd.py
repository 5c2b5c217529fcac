"""The AICSD recipe: what ``aicsd/train.py`` and ``aicsd/train_kd.py`` assemble from the rest of ``common``.

specs/aicsd.md §2 (flags, defaults, order of the two trainers), §3 (DeepLabV3+ and its 1x/10x groups), §4.4
(ALW), §5 (VOC / SBD / Cityscapes), §6 (SGD, per-iteration poly LR, epochs, the epoch-0 anomaly, best
epoch), §7 (confusion-matrix metrics), §2.9 (run folders and checkpoint files). The original flags keep
their names and defaults; the flags segkd adds never change the default behaviour.
"""
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from common.datasets.catalog import AICSD_NUM_CLASSES, aicsd_dataset
from common.datasets.synthetic import make_voc
from common.engine.checkpoint import FORMAT as TRAINING_STATE_FORMAT
from common.engine.checkpoint import atomic_save
from common.engine.data import epoch_batches, eval_loader, train_loader
from common.engine.dist import barrier
from common.engine.lr import poly_lr
from common.engine.seed import seed_everything
from common.engine.trainer import HookBase, Logging, PeriodicCheckpoint, PeriodicEval, Trainer
from common.errors import UserError
from common.evaluation import ConfusionMatrix, evaluate_main, write_results_json
from common.io import atomic_open, output_dir
from common.models import build_model
from common.models.deeplabv3plus import BACKBONES, NOT_REBUILT, model_name
from common.models.weights import load_checkpoint, load_state_dict_strict
from common.recipes.options import finite_float, str2bool

DATASETS = ("pascal", "coco", "cityscapes")
BACKBONE_CHOICES = ("resnet101", "resnet18", "xception", "drn", "mobilenet")
BASE_LR = {"pascal": 0.007, "cityscapes": 0.01, "coco": 0.1}  # §2.1 --lr, for batch 6 on one GPU
DEFAULT_EPOCHS = {"pascal": 50, "cityscapes": 200, "coco": 30}  # §2.1 --epochs
RESULTS_DATASET = {"pascal": "voc", "cityscapes": "cityscapes"}  # the names of common/tables/reported/aicsd.json
DATA_ENV = {"pascal": "VOC", "cityscapes": "CITYSCAPES"}
# The file names the original's model_zoo downloads put in the torch-hub cache (§3.6), then torchvision's
# IMAGENET1K_V1 names; segkd never downloads them.
IMAGENET_FILES = {"resnet18": ("resnet18-5c106cde.pth", "resnet18-f37072fd.pth"),
                  "resnet101": ("resnet101-5d3b4d8f.pth", "resnet101-63fe2227.pth"),
                  "mobilenet": ("mobilenet_v2-6a65762b.pth", "mobilenet_v2-b0353104.pth")}
DEMO_ENV = "SEGKD_DEMO"
DEMO_DATA = Path("demo_data") / "aicsd_voc"
DEMO_TEACHER = Path("demo_runs") / "aicsd" / "run" / "pascal" / "demo-teacher" / "model_best.pth.tar"
# SEGKD_DEMO=1: the defaults of every flag not given (synthetic VOC, tiny crop, a few epochs, CPU, no ImageNet).
DEMO_DEFAULTS = {"data_dir": str(DEMO_DATA), "base_size": 65, "crop_size": 65, "epochs": 10, "batch_size": 4,
                 "workers": 0, "device": "cpu", "imagenet_weights": "none", "save_dir": "demo_runs/aicsd"}
DEMO_KD_DEFAULTS = {"teacher_path": str(DEMO_TEACHER), "teacher_backbone": "resnet18", "ref_epochs": 10}
DEMO_SPLITS = {"train": 16, "val": 6}


def demo_mode():
    """Whether ``SEGKD_DEMO=1`` is set (the demo preset of both trainers)."""
    return os.environ.get(DEMO_ENV, "") not in ("", "0")


# ------------------------------------------------------------------------------------------------ flags
def add_common_flags(parser, *, kd):
    """The flags of §2.1 (both trainers) with their original defaults, then the flags segkd adds."""
    add = parser.add_argument
    add("--backbone", type=str, default="resnet18",
        help="backbone name (default: resnet18); one of resnet101, resnet18, mobilenet (xception, drn: not rebuilt)")
    add("--out-stride", type=int, default=16, help="network output stride (default: 16; 16 or 8)")
    add("--dataset", type=str, default="pascal", help="dataset name: pascal or cityscapes (coco: not rebuilt)")
    add("--use-sbd", action="store_true", default=False, help="whether to use SBD dataset (default: False)")
    add("--workers", type=int, default=4, metavar="N", help="dataloader threads")
    add("--base-size", type=int, default=513, help="base image size")
    add("--crop-size", type=int, default=513, help="crop image size")
    add("--sync-bn", action="store_true", default=False,
        help="whether to use sync bn (default: False); nn.SyncBatchNorm under torchrun")
    add("--freeze-bn", action="store_true", default=False,
        help="whether to freeze bn parameters (default: False); no effect, as in the original (§9 Q15)")
    add("--loss-type", type=str, default="ce", choices=["ce", "focal"], help="loss func type (default: ce)")
    add("--epochs", type=int, default=None, metavar="N", help="number of epochs (default: pascal 50, cityscapes 200)")
    add("--start_epoch", type=int, default=0, metavar="N", help="start epochs (default:0)")
    add("--batch-size", type=int, default=None, metavar="N", help="input batch size for training (default: 6 per GPU)")
    add("--test-batch-size", type=int, default=None, metavar="N",
        help="input batch size for testing; unused: validation runs one image at a time, as the original")
    add("--use-balanced-weights", action="store_true", default=False,
        help="whether to use balanced weights (default: False)")
    add("--lr", type=finite_float, default=None, metavar="LR",
        help="learning rate (default: base lr x batch / (6 x GPUs))")
    add("--lr-scheduler", type=str, default="poly", choices=["poly", "step", "cos"],
        help="lr scheduler mode: (default: poly)")
    add("--momentum", type=finite_float, default=0.9, metavar="M", help="momentum (default: 0.9)")
    add("--weight-decay", type=finite_float, default=5e-4, metavar="M", help="w-decay (default: 5e-4)")
    add("--nesterov", action="store_true", default=False, help="whether use nesterov (default: False)")
    add("--no-cuda", action="store_true", default=False, help="disables CUDA training")
    add("--gpu-ids", type=str, default="0",
        help="use which gpu to train, must be a comma-separated list of integers only (default=0); sets the "
             "default batch and lr (6 and 0.007 per GPU); one process trains the whole batch")
    add("--seed", type=int, default=1, metavar="S", help="random seed (default: 1); seeds torch, numpy and random")
    add("--resume", type=str, default=None,
        help="put the path to resuming file if needed: a checkpoint.pth.tar (model, optimizer unless --ft, epoch, "
             "best_pred) or segkd's training_state.pth (everything, mid-epoch included)")
    add("--checkname", type=str, default=None, help="set the checkpoint name (default: deeplab-<backbone>)")
    add("--ft", action="store_true", default=False, help="finetuning on a different dataset")
    add("--eval-interval", type=int, default=1, help="evaluuation interval (default: 1)")
    add("--no-val", action="store_true", default=False, help="skip validation during training")
    added = parser.add_argument_group("added by segkd (the defaults keep the original behaviour)")
    add = added.add_argument
    add("--data-dir", type=str, default=None,
        help="dataset root: the VOC2012 folder ($VOC) or the Cityscapes root ($CITYSCAPES); the original's were "
             "hard-coded Kaggle paths")
    add("--sbd-dir", type=str, default=os.environ.get("SBD"),
        help="SBD benchmark_RELEASE folder for --use-sbd ($SBD)")
    add("--cityscapes-layout", default="auto", choices=("auto", "kaggle", "standard", "deeplab"),
        help="Cityscapes folder layout (auto: the first found of images/ (Kaggle), leftImg8bit/)")
    add("--save-dir", type=str, default="runs/aicsd",
        help="where run/<dataset>/<checkname>/experiment_<k> goes (the original: /kaggle/working)")
    add("--imagenet-weights", type=str, default="auto",
        help="ImageNet weights of the student backbone: a file, 'auto' (the original's file names in the torch-hub "
             "cache, never downloaded) or 'none' (random init)")
    add("--device", default=None, help="auto, cpu, cuda, cuda:N (default: cuda unless --no-cuda or none present)")
    add("--tf32", action="store_true", help="allow TF32 on Ampere+ GPUs (the original: full fp32)")
    add("--ce-batch-average", type=str2bool, default=True,
        help="divide the CE by the batch size once more (the original, §4.1 Q12; false: the usual mean)")
    add("--save-pred", type=str, default=None,
        help="write the val predictions of every evaluation as VOC-palette PNGs into this folder")
    if kd:
        add("--wandb", action="store_true",
            help="log to Weights & Biases as the original did (needs wandb installed and a login)")


def add_kd_flags(parser):
    """The flags only ``train_kd.py`` has (§2.2), then the AICSD switches segkd adds (§4.3, §4.4, §6.3)."""
    add = parser.add_argument
    add("--pa_lambda", type=finite_float, default=None, help="pairwise loss (SKD pair-wise on ASPP features, §4.6.1)")
    add("--pi_lambda", type=finite_float, default=None, help="pixelwise loss (logit KD, §4.2)")
    add("--lo_lambda", type=finite_float, default=None, help="logits loss (the ICS loss, §4.3)")
    add("--ic_lambda", type=finite_float, default=None, help="ICKD-like loss, computed and never added (§4.6.2)")
    add("--teacher_path", type=str, default=os.environ.get("AICSD_TEACHER", "pretrained/deeplab-resnet.pth.tar"),
        help="teacher checkpoint (a dict with 'state_dict'), a plain path ($AICSD_TEACHER)")
    add("--ALW", action="store_true",
        help="adaptive loss weighting: alpha*(CE + ICS) + (1-alpha)*KD, alpha = epoch/--ref-epochs (§4.4)")
    add("--ref-epochs", type=int, default=120, help="ALW's reference epoch count (the original hard-codes 120)")
    add("--ics-mode", choices=("code", "paper"), default="code",
        help="ICS form: code (what distiller.py computes, §4.3.2) or paper (the described KL, §4.3.1)")
    add("--teacher-eval", action="store_true",
        help="run the teacher in eval mode (the original: train mode, batch statistics and dropout, §3.7)")
    add("--first-epoch-frozen", type=str2bool, default=True,
        help="epoch 0 updates no student weight, as the original's connector-only optimizer (§6.3)")
    add("--teacher-backbone", default="resnet101", choices=("resnet101", "resnet18", "mobilenet"),
        help="the teacher network (the original hard-codes resnet101; smaller ones for tests and the demo)")


def parse(parser, argv, *, kd):
    """Parse ``argv``; with ``SEGKD_DEMO=1`` the demo preset replaces the defaults of flags not given."""
    if demo_mode():
        parser.set_defaults(**DEMO_DEFAULTS, **(DEMO_KD_DEFAULTS if kd else {}))
    return parser.parse_args(argv)


def check_flags(args):
    """Reject the choices the original rejects or crashes on, each with its fix (issue 11 "Bad input")."""
    if args.backbone not in BACKBONE_CHOICES:
        stale = " (the stale train_voc.sh spelling)" if args.backbone == "resnet" else ""
        raise UserError(f"--backbone {args.backbone!r} is not a backbone{stale}; choose one of "
                        f"{', '.join(BACKBONES)} ({', '.join(NOT_REBUILT)} are not rebuilt)")
    model_name(args.backbone)
    if args.out_stride not in (8, 16):
        raise UserError(f"--out-stride {args.out_stride} is not supported by DeepLabV3+; use 16 or 8")
    if args.dataset not in DATASETS:
        raise UserError(f"--dataset {args.dataset!r} is not a dataset; choose pascal or cityscapes")
    if args.dataset == "coco":
        raise UserError("--dataset coco is not available: the AICSD code raises NotImplementedError for it too; "
                        "use pascal or cityscapes")
    if args.lr_scheduler == "step":
        raise UserError("--lr-scheduler step always fails in the original (it never passes lr_step); use poly or cos")
    if args.eval_interval < 1:
        raise UserError(f"--eval-interval must be at least 1, got {args.eval_interval}")
    if args.crop_size < 17 or args.base_size < 1:
        raise UserError(f"--crop-size {args.crop_size} is too small for DeepLabV3+ (output stride 16); use at least 17")
    if args.use_sbd and args.dataset != "pascal":
        raise UserError("--use-sbd extends PASCAL VOC only; drop it for --dataset cityscapes")


def gpu_count(args, info):
    """The GPU count of the original's defaults (§2.1): the processes under torchrun, else the --gpu-ids on CUDA.

    The original counted characters of the unparsed string on CPU (§9 Q16); here a CPU run counts 1.
    """
    if info.world_size > 1:
        return info.world_size
    if info.device.type != "cuda":
        return 1
    try:
        return len([int(s) for s in args.gpu_ids.split(",")])
    except ValueError:
        raise UserError(f"--gpu-ids {args.gpu_ids!r} must be a comma-separated list of integers, e.g. 0,1") from None


def apply_defaults(args, info):
    """The original's defaults that depend on the dataset and the GPUs (§2.1, §6.1); returns the log lines."""
    n_gpu = gpu_count(args, info)
    if args.epochs is None:
        args.epochs = DEFAULT_EPOCHS[args.dataset]
    if args.batch_size is None:
        args.batch_size = 6 * n_gpu
    if args.test_batch_size is None:
        args.test_batch_size = args.batch_size
    rule = f"lr = {BASE_LR[args.dataset]} / (6 x {n_gpu} GPUs) x batch {args.batch_size}"
    if args.lr is None:
        args.lr = BASE_LR[args.dataset] / (6 * n_gpu) * args.batch_size
        rule += f" = {args.lr:.6g} (backbone), {10 * args.lr:.6g} (ASPP + decoder)"
    else:
        rule += f" would give {BASE_LR[args.dataset] / (6 * n_gpu) * args.batch_size:.6g}; --lr {args.lr:.6g} given"
    if args.checkname is None:
        args.checkname = f"deeplab-{args.backbone}"
    if args.epochs <= args.start_epoch:
        raise UserError(f"--epochs {args.epochs} must exceed --start_epoch {args.start_epoch}")
    if args.batch_size % info.world_size:
        raise UserError(f"--batch-size {args.batch_size} must be divisible by the {info.world_size} processes")
    per_rank = args.batch_size // info.world_size
    if per_rank < 2:
        raise UserError(f"--batch-size {args.batch_size} gives {per_rank} image per process: the ASPP image-pooling "
                        "BatchNorm cannot train on one image; use at least 2 images per process")
    return [f"batch {args.batch_size} = {per_rank} per process x {info.world_size} process(es); {rule}"]


def resolve_device(args):
    """``--device`` if given, else the original's ``--no-cuda`` rule: cuda when present and not disabled."""
    if args.device is not None:
        return args.device
    return "cpu" if args.no_cuda or not torch.cuda.is_available() else "cuda"


# ------------------------------------------------------------------------------------------------ run folder
def open_run(args, info):
    """The start both trainers share (§2.3, §2.4): seed every RNG, open the run folder (a segkd training state
    resumes into its own folder), the data sets, the per-process batch and the iterations per epoch."""
    seed_everything(args.seed)
    resumes_state = bool(args.resume) and is_training_state(args.resume)
    output_dir(args.save_dir, "--save-dir")
    saver = Saver(args.save_dir, args.dataset, args.checkname, is_main=info.is_main,
                  experiment_dir=Path(args.resume).parent if resumes_state else None)
    saver.save_experiment_config(args)
    train_set, val_set = build_datasets(args)
    batch = args.batch_size // info.world_size
    return saver, train_set, val_set, batch, steps_per_epoch(train_set, batch, info)


class Saver:
    """``utils/saver.py`` (§2.9): ``<save-dir>/run/<dataset>/<checkname>/experiment_<k>``, ``parameters.txt``,
    ``checkpoint.pth.tar``, ``best_pred.txt`` and the cross-experiment ``model_best.pth.tar``.

    ``k`` is one more than the largest existing number (the original sorted the names as text, so
    ``experiment_9`` followed ``experiment_10`` and a folder was reused, §9 Q17). ``experiment_dir`` reuses
    a given folder (a resumed segkd training state; ``resumed`` says so).
    """

    def __init__(self, save_dir, dataset, checkname, experiment_dir=None, is_main=True):
        self.directory = Path(save_dir) / "run" / dataset / checkname
        self.is_main = is_main
        self.runs = sorted(p for p in self.directory.glob("experiment_*") if _run_id(p) is not None)
        self.resumed = experiment_dir is not None
        if experiment_dir is not None:
            self.experiment_dir = Path(experiment_dir)
        else:
            run_id = max((_run_id(p) for p in self.runs), default=-1) + 1
            self.experiment_dir = self.directory / f"experiment_{run_id}"
        barrier()  # every process has chosen the folder before rank 0 creates it
        if is_main:
            self.experiment_dir.mkdir(parents=True, exist_ok=True)
        barrier()

    def save_experiment_config(self, args):
        """``parameters.txt``: the original's keys (``datset`` sic) as ``key:value`` lines."""
        if not self.is_main:
            return
        params = {"datset": args.dataset, "backbone": args.backbone, "out_stride": args.out_stride, "lr": args.lr,
                  "lr_scheduler": args.lr_scheduler, "loss_type": args.loss_type, "epoch": args.epochs,
                  "base_size": args.base_size, "crop_size": args.crop_size}
        with atomic_open(self.experiment_dir / "parameters.txt", "w") as f:
            f.write("".join(f"{key}:{value}\n" for key, value in params.items()))

    def save_checkpoint(self, state, is_best, filename="checkpoint.pth.tar"):
        """Write ``state``; when best, ``best_pred.txt`` and, if it beats every earlier experiment,
        ``model_best.pth.tar`` one folder up."""
        if not self.is_main:
            return
        path = self.experiment_dir / filename
        atomic_save(state, path)
        if not is_best:
            return
        best = float(state["best_pred"])
        with atomic_open(self.experiment_dir / "best_pred.txt", "w") as f:
            f.write(str(best))
        previous = [0.0] + [float(p.read_text().split()[0]) for p in
                            (run / "best_pred.txt" for run in self.runs if run != self.experiment_dir) if p.is_file()]
        if not self.runs or best > max(previous):
            with atomic_open(self.directory / "model_best.pth.tar", "wb") as f, open(path, "rb") as src:
                shutil.copyfileobj(src, f)


def _run_id(path):
    suffix = path.name[len("experiment_"):]
    return int(suffix) if suffix.isdigit() else None


# ------------------------------------------------------------------------------------------------ data
class ScoredAtResizedSize(Dataset):
    """Val samples whose ``size`` is the resized label's: AICSD scores at short side 513 (§7), not at the file size."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        image, label, _, name = self.dataset[index]
        return image, label, np.array(label.shape), name


def data_root(args):
    """``--data-dir``, else ``$VOC`` / ``$CITYSCAPES``; the demo preset writes its synthetic VOC when missing."""
    root = args.data_dir or os.environ.get(DATA_ENV[args.dataset])
    if root is None:
        raise UserError(f"no {args.dataset} root given; pass --data-dir or set ${DATA_ENV[args.dataset]}")
    if demo_mode() and Path(root) == DEMO_DATA and not (DEMO_DATA / "SegmentationClass").is_dir():
        make_voc(DEMO_DATA, splits=DEMO_SPLITS, size=(96, 128), seed=0)
    return root


def build_datasets(args):
    """The train split (the §5.3 pipeline) and the val split resized to short side ``--crop-size`` (§5)."""
    root = data_root(args)
    kw = dict(base_size=args.base_size, crop_size=args.crop_size, layout=args.cityscapes_layout)
    train_set = aicsd_dataset(args.dataset, root, "train", use_sbd=args.use_sbd, sbd_root=args.sbd_dir, **kw)
    val_set = aicsd_dataset(args.dataset, root, "val", **kw)
    return train_set, ScoredAtResizedSize(val_set)


def steps_per_epoch(train_set, batch, info):
    """Batches per epoch on each process (no ``drop_last``, §5.3); a last batch of one image is refused."""
    shard = len(train_set) // info.world_size
    if shard < batch:
        raise UserError(f"the train split has {len(train_set)} images, fewer than one batch of {batch} per process; "
                        "use a smaller --batch-size")
    if shard % batch == 1:
        raise UserError(f"{shard} training images per process leave a last batch of 1 with batch {batch}: the ASPP "
                        "image-pooling BatchNorm cannot train on it; choose another --batch-size")
    return math.ceil(shard / batch)


def epoch_loader_factory(train_set, *, seed, batch, info, workers):
    """``make_loader(epoch, skip)`` for :func:`common.engine.data.epoch_batches`: a new shuffle per epoch
    (the original's ``shuffle=True``), reproducible from ``(seed, epoch)``."""

    def make(epoch, skip):
        epoch_seed = int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])
        return train_loader(train_set, seed=epoch_seed, batch=batch, start=skip * batch, info=info,
                            num_workers=workers)

    return make


def class_weights(train_set, args, num_classes):
    """``calculate_weigths_labels`` (§2.1 --use-balanced-weights): w_c = 1 / ln(1.02 + f_c) over the training
    samples as the loader yields them, cached as ``<root>/<dataset>_classes_weights.npy``."""
    path = Path(data_root(args)) / f"{args.dataset}_classes_weights.npy"
    if path.is_file():
        weights = np.load(path)
        if weights.shape != (num_classes,):
            raise UserError(f"class weights {path} hold {weights.shape} values, not {num_classes}; delete the file "
                            "to recompute it")
        return weights
    counts = np.zeros(num_classes)
    for index in range(len(train_set)):
        label = np.asarray(train_set[index][1])
        valid = label[(label >= 0) & (label < num_classes)].astype(np.int64)
        counts += np.bincount(valid, minlength=num_classes)
    weights = 1.0 / np.log(1.02 + counts / counts.sum())
    with atomic_open(path, "wb") as f:
        np.save(f, weights)
    return weights


# ------------------------------------------------------------------------------------------------ models
def imagenet_path(args, backbone):
    """The ImageNet file for ``backbone`` (§3.6): ``--imagenet-weights`` or the torch-hub cache; never a download."""
    value = args.imagenet_weights
    if value == "none":
        return None
    if value != "auto":
        return value
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    for name in IMAGENET_FILES[backbone]:
        if (folder / name).is_file():
            return str(folder / name)
    raise UserError(f"ImageNet weights for the {backbone} backbone not found in {folder} (looked for "
                    f"{' or '.join(IMAGENET_FILES[backbone])}); download one there, pass --imagenet-weights FILE, "
                    "or --imagenet-weights none to start from random weights")


def build_network(args, backbone, device, *, return_features, pretrained=True):
    """DeepLabV3+ on ``backbone`` for ``--dataset`` (21 or 19 classes), ``--out-stride``, BN or SyncBN (§3)."""
    norm = "syncbn" if args.sync_bn else "batchnorm"
    return build_model(model_name(backbone), num_classes=AICSD_NUM_CLASSES[args.dataset],
                       output_stride=args.out_stride, norm=norm, return_features=return_features,
                       pretrained_backbone=imagenet_path(args, backbone) if pretrained else None).to(device)


def read_checkpoint(path, what, hint):
    """``torch.load(weights_only=True)`` that also accepts the original's numpy ``best_pred`` (§9 deprecated APIs)."""
    from numpy._core.multiarray import scalar

    with torch.serialization.safe_globals([scalar, np.dtype, np.dtypes.Float64DType]):
        return load_checkpoint(path, what, hint)


def load_teacher(args, device):
    """The teacher (``--teacher-backbone``, resnet101 as the original) strictly loaded from ``--teacher_path``'s
    ``state_dict`` (§2.4 step 3); no ImageNet init, since the checkpoint overwrites every weight."""
    hint = ("download the released VOC teacher (README: Google Drive) or train one with aicsd/train.py --backbone "
            "resnet101, and pass its checkpoint.pth.tar with --teacher_path")
    teacher = build_network(args, args.teacher_backbone, device, return_features=True, pretrained=False)
    state = read_checkpoint(args.teacher_path, "teacher checkpoint (--teacher_path)", hint)
    if not isinstance(state.get("state_dict"), dict):
        raise UserError(f"teacher checkpoint {args.teacher_path} has no 'state_dict' entry (keys: "
                        f"{', '.join(map(str, list(state)[:5]))}); pass a checkpoint.pth.tar written by train.py")
    load_state_dict_strict(teacher, state["state_dict"], f"teacher checkpoint {args.teacher_path}")
    return teacher


def param_groups(model, lr):
    """``get_1x_lr_params`` at lr and ``get_10x_lr_params`` at 10·lr (§2.3 step 4), with ``initial_lr``."""
    return [{"params": model.get_1x_lr_params(), "lr": lr, "initial_lr": lr},
            {"params": model.get_10x_lr_params(), "lr": 10 * lr, "initial_lr": 10 * lr}]


def make_optimizer(groups, args):
    """SGD(momentum, weight decay on every parameter, nesterov) as the original (§6.1)."""
    return torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
                           nesterov=args.nesterov)


def connector_optimizer(args):
    """The epoch-0 ``init_optimizer`` (§2.4 step 7, §6.3): it holds only the unused connectors, so its step
    changes nothing; one stand-in parameter that never gets a gradient plays that part."""
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=10 * args.lr, momentum=args.momentum,
                           weight_decay=args.weight_decay, nesterov=args.nesterov)


# ------------------------------------------------------------------------------------------------ schedule
class OriginalLR(HookBase):
    """``LR_Scheduler`` (§6.1): per iteration T = epoch·iters + i of N = epochs·iters, poly (power 0.9) or cos;
    ``param_groups[0]`` gets lr and every other group 10·lr (a one-group optimizer: 1·lr). Logs the original's
    ``=>Epoches`` line when an epoch starts."""

    def __init__(self, optimizers, mode, base_lr, max_steps, steps_per_epoch, logger, best=lambda: 0.0):
        self.optimizers = optimizers
        self.mode = mode
        self.base_lr = base_lr
        self.max_steps = max_steps
        self.steps_per_epoch = steps_per_epoch
        self.logger = logger
        self.best = best

    def lr_at(self, step):
        if self.mode == "cos":
            return 0.5 * self.base_lr * (1 + math.cos(math.pi * step / self.max_steps))
        return poly_lr(self.base_lr, step, self.max_steps, 0.9)

    def before_step(self):
        step = self.trainer.step
        lr = self.lr_at(step)
        optimizer = self.optimizers(step)
        for index, group in enumerate(optimizer.param_groups):
            group["lr"] = lr if index == 0 else 10 * lr
        self.trainer.scalars["lr"] = lr
        if step % self.steps_per_epoch == 0:
            self.logger.info(f"=>Epoches {step // self.steps_per_epoch}, learning rate = {lr:.4f}, "
                             f"previous best = {self.best():.4f}")


class EpochSummary(HookBase):
    """The original's end-of-epoch lines: ``[Epoch: e, numImages: n]`` and the summed train loss (§2.3 step 7);
    ``sink(epoch, loss)`` receives it too (wandb). n is the original's ``i * batch_size + image.shape[0]`` after
    the last batch ``i`` of the epoch, i.e. ``images``, the images the epoch trains on (no ``drop_last``, §5.3)."""

    def __init__(self, logger, steps_per_epoch, images, total_name, sink=None):
        self.logger = logger
        self.steps_per_epoch = steps_per_epoch
        self.images = images
        self.total_name = total_name
        self.sink = sink
        self.total = 0.0

    def after_step(self):
        t = self.trainer
        self.total += t.losses[self.total_name]
        if (t.step + 1) % self.steps_per_epoch == 0:
            epoch = t.step // self.steps_per_epoch
            self.logger.info(f"[Epoch: {epoch}, numImages: {self.images:5d}]")
            self.logger.info(f"Loss: {self.total:.3f}")
            if self.sink is not None:
                self.sink(epoch, self.total)
            self.total = 0.0


# ------------------------------------------------------------------------------------------------ evaluation
class Validation:
    """``validation(epoch)`` (§7, §6.4): whole images at short side ``--crop-size``, batch 1, the confusion-matrix
    Pixel Acc / Acc class / mIoU (nanmean) / FWIoU; a better mIoU saves ``checkpoint.pth.tar`` (+ best_pred.txt,
    model_best.pth.tar) and ``results.json`` of that epoch.

    ``checkpoint(epoch, best)`` returns the dict to save (train.py includes the optimizer, train_kd.py not).
    The ``numImages`` line prints the original's ``i * batch_size + image.shape[0]`` after the last val image
    ``i``: (val images - 1) x ``batch_size`` (the training batch) + 1, since validation runs batch 1.
    """

    def __init__(self, model, vloader, saver, info, logger, *, num_classes, steps_per_epoch, fields, checkpoint,
                 batch_size, save_pred=None, sink=None):
        self.model = model
        self.vloader = vloader
        self.saver = saver
        self.info = info
        self.logger = logger
        self.num_classes = num_classes
        self.steps_per_epoch = steps_per_epoch
        self.fields = fields
        self.checkpoint = checkpoint
        self.batch_size = batch_size
        self.save_pred = save_pred
        self.sink = sink
        self.results_path = saver.experiment_dir / "results.json"
        self.last = None

    def evaluate(self, n):
        """Evaluate after ``n`` steps; returns the mIoU (the score PeriodicEval keeps the best of)."""
        epoch = n // self.steps_per_epoch - 1
        out = None if self.save_pred is None else Path(self.save_pred) / f"epoch_{epoch}"
        result = evaluate_main(self.model, self.vloader, num_classes=self.num_classes, device=self.info.device,
                               whole=True, absent="nan", output_dir=out, palette="voc", progress=self.info.is_main)
        fwiou = fw_iou(result.confusion)
        self.logger.info("Validation:")
        self.logger.info(f"[Epoch: {epoch}, numImages: {(result.num_images - 1) * self.batch_size + 1:5d}]")
        self.logger.info(f"Acc:{result.pixel_acc}, Acc_class:{result.mean_acc}, mIoU:{result.miou}, fwIoU: {fwiou}")
        if self.sink is not None:
            self.sink(epoch, result.miou)
        self.last = (n, epoch, result, fwiou)
        return result.miou

    def on_best(self, n, miou):
        """A new best mIoU: the checkpoint, best_pred.txt, model_best.pth.tar and results.json of this epoch."""
        _, epoch, result, fwiou = self.last
        self.saver.save_checkpoint(self.checkpoint(epoch, float(miou)), is_best=True)
        if self.info.is_main:
            fields = {**self.fields, **result.result_fields(), "iterations": n}
            fields["extra"] = {**fields["extra"], "best_epoch": epoch, "fwiou": fwiou,
                               "run_dir": str(self.saver.experiment_dir)}
            write_results_json(self.results_path, **fields)
        barrier()


def fw_iou(confusion):
    """FWIoU of a confusion-matrix array (§7)."""
    matrix = ConfusionMatrix(confusion.shape[0])
    matrix.matrix = torch.as_tensor(confusion, dtype=torch.float64)
    return matrix.fwiou()


def run_fields(args, method, model, *, teacher=None, extra=None):
    """The ``results.json`` fields of a run known before its first evaluation (DESIGN.md, Results)."""
    return {"paper": "aicsd", "method": method, "model": model, "dataset": RESULTS_DATASET[args.dataset],
            "split": "val", "iterations": None, "crop": [args.crop_size, args.crop_size], "batch": args.batch_size,
            "seed": args.seed, "teacher": teacher,
            "extra": {"epochs": args.epochs, "out_stride": args.out_stride, "use_sbd": args.use_sbd,
                      "lr": args.lr, "checkname": args.checkname, **(extra or {})}}


# ------------------------------------------------------------------------------------------------ resume
def is_training_state(path):
    """Whether ``path`` is segkd's ``training_state.pth`` (else it is treated as the original's checkpoint)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return False
    return isinstance(state, dict) and state.get("format") == TRAINING_STATE_FORMAT


def resume_original(path, model, optimizer, args):
    """The original's ``--resume`` (§2.1): strict model weights, the optimizer unless ``--ft`` (train.py; the
    KD checkpoints hold none), ``start_epoch`` (0 with ``--ft``); returns ``best_pred``."""
    hint = "pass a checkpoint.pth.tar written by aicsd/train.py or train_kd.py, or a training_state.pth"
    state = read_checkpoint(path, "resume checkpoint (--resume)", hint)
    if not isinstance(state.get("state_dict"), dict):
        raise UserError(f"resume checkpoint {path} has no 'state_dict' entry; {hint}")
    load_state_dict_strict(model, state["state_dict"], f"resume checkpoint {path}")
    if optimizer is not None and not args.ft and "optimizer" in state:
        optimizer.load_state_dict(state["optimizer"])
    args.start_epoch = 0 if args.ft else int(state.get("epoch", 0))
    return float(state.get("best_pred", 0.0))


def write_args(folder, args, info):
    """``<experiment>/args.json``: every flag after the defaults were applied."""
    if info.is_main:
        with atomic_open(Path(folder) / "args.json", "w") as f:
            f.write(json.dumps(vars(args), indent=2, default=str) + "\n")


def init_wandb(args):
    """The original's ``wandb.init`` (§2.4 step 1), only with ``--wandb``; returns ``log(dict)`` or None."""
    if not getattr(args, "wandb", False):
        return None
    try:
        import wandb
    except ImportError:
        raise UserError("--wandb needs the wandb package; install it (pip install wandb) or drop --wandb") from None
    wandb.init(project="Knowledge Deistillation", name="feature maps",
               config={"learning_rate": 0.007, "architecture": "DeepLab", "dataset": "PascalVoc 2012", "epochs": 120})
    return wandb


# ------------------------------------------------------------------------------------------------ the loop
def run_epochs(args, info, saver, logger, *, step, state, train_set, val_set, batch, ipe, start, best_pred, fields,
               checkpoint, step_fn=None, optimizer_at=None, wandb=None):
    """The epoch loop of both trainers (§2.3 steps 7-8, §2.4 steps 9-11) on the engine's :class:`Trainer`.

    Per step: the original LR rule, the step, the log; per epoch: the summed loss, validation every
    ``--eval-interval`` epochs (a better mIoU saves the checkpoint and ``results.json``) or, with ``--no-val``,
    a checkpoint every epoch; and ``training_state.pth`` (resumable mid-run). ``step_fn`` replaces ``step``
    as the function the trainer calls (the frozen epoch 0) and ``optimizer_at(step)`` names the optimizer
    the LR rule sets then.
    """
    max_steps = args.epochs * ipe
    make_loader = epoch_loader_factory(train_set, seed=args.seed, batch=batch, info=info, workers=args.workers)
    validation = Validation(step.student, eval_loader(val_set, info), saver, info, logger,
                            num_classes=AICSD_NUM_CLASSES[args.dataset], steps_per_epoch=ipe, fields=fields,
                            checkpoint=checkpoint, batch_size=args.batch_size, save_pred=args.save_pred,
                            sink=None if wandb is None else lambda e, miou: wandb.log({"mIoU": miou}))
    evaluation = PeriodicEval(validation.evaluate, on_best=validation.on_best, every=args.eval_interval * ipe,
                              final=False)
    evaluation.best = best_pred
    hooks = [OriginalLR(optimizer_at or (lambda n: step.optimizer), args.lr_scheduler, args.lr, max_steps, ipe,
                        logger, best=lambda: evaluation.best or 0.0),
             Logging(logger, device=info.device, period=20, progress=info.is_main),
             EpochSummary(logger, ipe, len(train_set) // info.world_size * info.world_size, step.total_name,
                          sink=None if wandb is None else lambda e, loss: wandb.log({"train loss": loss}))]
    if args.no_val:
        hooks.append(PeriodicCheckpoint(lambda n: saver.save_checkpoint(checkpoint(n // ipe - 1, best_pred), False),
                                        every=ipe, final=False))
    else:
        hooks.append(evaluation)
    hooks.append(PeriodicCheckpoint(state.save, every=ipe, final=False))
    trainer = Trainer(step_fn or step, epoch_batches(make_loader, ipe, start), max_steps, start_step=start,
                      hooks=hooks)
    state.restore_hooks(trainer)
    logger.info(f"Starting Epoch: {start // ipe}")
    logger.info(f"Total Epoches: {args.epochs}")
    trainer.train()
    return evaluation.best

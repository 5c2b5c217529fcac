"""CIRKD ``train_baseline.py`` (specs/cirkd.md §1.2): supervised training of teachers and baseline students.

    python cirkd/train_baseline.py --model deeplabv3 --backbone resnet101 --data $CITYSCAPES \\
        --save-dir runs/cirkd --log-dir runs/cirkd/logs --pretrained-base resnet101-imagenet.pth
    torchrun --nproc_per_node=8 cirkd/train_baseline.py ...   # --batch-size 16 is the total batch

Task loss CE + 0.4·CE_aux (ResNet) or CE (mobile), one SGD group over all parameters (lr 0.02, momentum 0.9,
weight decay 1e-4), poly lr before each step, validation every ``--val-per-iters`` writing the latest checkpoint
(the original's ``save_checkpoint`` at every validation) and a copy of the best model.
Files: ``<save-dir>/<model>_<backbone>_<dataset>.pth`` (latest), ``..._best_model.pth``,
``<log-dir>/<model>_<backbone>_<dataset>_log.txt``; the added run folder
``<save-dir>/<model>_<backbone>_<dataset>_run/`` (``training_state.pth`` for ``--resume-state``, ``results.json``,
``metrics.jsonl``). The plumbing is in common/recipes/cirkd.py.
"""
import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from common.datasets.catalog import CIRKD_NUM_CLASSES
from common.engine import seed_everything
from common.engine.dist import destroy, init_distributed
from common.engine.lr import make_sgd
from common.engine.step import TrainStep
from common.errors import main_guard
from common.numerics import resolve_amp, set_tf32
from common.recipes import cirkd
from common.recipes.options import finite_float
from common.recipes.run import run_fields


def build_parser():
    parser = argparse.ArgumentParser(description="Semantic Segmentation Training With Pytorch")
    parser.add_argument("--model", type=str, default="deeplabv3", help="model name (deeplabv3, psp, "
                                                                        "deeplab_mobile, psp_mobile)")
    parser.add_argument("--backbone", type=str, default="resnet18", help="backbone name")
    cirkd.add_data_flags(parser)
    parser.add_argument("--aux", action="store_true", default=False,
                        help="ignored: the aux head follows the backbone (resnet: on, mobile: off)")
    parser.add_argument("--aux-weight", type=finite_float, default=0.4, help="ignored: the aux weight is 0.4")
    cirkd.add_training_flags(parser)
    parser.add_argument("--pretrained-base", type=str, default="resnet18-5c106cde.pth",
                        help="ImageNet backbone file, or None")
    parser.add_argument("--pretrained", type=str, default="None", help="segmentation checkpoint to start from, "
                                                                       "or None")
    return parser


def run_info(args, name, crop):
    """``results.json`` fields: a ResNet-101 run is the teacher, the others baselines."""
    method = "teacher" if args.backbone == "resnet101" else "baseline"
    imagenet = cirkd.none_path(args.pretrained_base)
    return run_fields("cirkd", method, model=name, dataset=cirkd.DATASET_NAMES[args.dataset],
                      iterations=args.max_iterations, crop=crop, batch=args.batch_size, seed=args.seed,
                      teacher=None, extra={"cirkd_model": args.model, "backbone": args.backbone, "lr": args.lr,
                                           "pretrained_base": imagenet, "imagenet_init": imagenet is not None})


@main_guard
def main(argv=None):
    args = build_parser().parse_args(argv)
    crop = cirkd.check_training_flags(args)
    name = cirkd.network_name(args.model, args.backbone)
    aux = cirkd.derive_aux(args.backbone)
    set_tf32(args.tf32)
    torch.backends.cudnn.benchmark = False
    info = init_distributed(cirkd.resolve_device_flag(args))
    seed_everything(args.seed)
    num_classes = CIRKD_NUM_CLASSES[args.dataset]
    model = cirkd.build_network(name, num_classes, cirkd.resolve_norm(args.norm, info), args.pretrained_base)
    if cirkd.none_path(args.pretrained) is not None:
        cirkd.load_weights(model, args.pretrained, "--pretrained", "pass a checkpoint of the same --model, "
                                                                   "--backbone and --dataset, or None")
    model = model.to(info.device)
    optimizer = make_sgd(model.parameters(), args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    step = TrainStep(model, task=cirkd.task_term(aux), optimizer=optimizer, base_lr=args.lr, device=info.device,
                     amp=resolve_amp(args.amp, info.device, args.amp_dtype), total_name="loss",
                     log_adversarial=False)
    stem = f"{args.model}_{args.backbone}_{args.dataset}"
    cirkd.train(args, step, info, crop=crop, stem=stem, log_file=f"{stem}_log.txt",
                labels=(("Task Loss", "task"),), fields=run_info(args, name, crop),
                logger_name="cirkd.train_baseline", latest_at_validation=True)
    destroy()


if __name__ == "__main__":
    main()

"""CIRKD ``eval.py`` (specs/cirkd.md §1.5, §5.2, §5.3): evaluate a segmentation checkpoint.

    python cirkd/eval.py --model deeplabv3 --backbone resnet18 --data $CITYSCAPES \\
        --pretrained kd_deeplabv3_resnet18_citys_best_model.pth --save-dir runs/logs [--scales 0.75 1.0 --flip-eval]
    torchrun --nproc_per_node=4 cirkd/eval.py ...   # each process scores its own images, sums are all-reduced

Whole-image inference; with several ``--scales`` (image size ``floor(H·s)``, the original's ``scale_factor``) and
``--flip-eval`` the raw logits are averaged. CIRKD's metric with its quirks (truncated-logit pixAcc, absent classes
count 0) unless ``--corrected-metric``. CamVid is evaluated on its test list (as the original). Log:
``<save-dir>/<model>_<backbone>_<dataset>_multiscale_val.txt`` (append); ``--save-pred``: palette PNGs (with
``--blend`` 0.3·image + 0.7·colour prediction instead) in ``<save-dir>/<model>_<backbone>_<dataset>/``;
``results.json`` in ``<save-dir>/<checkpoint stem>_<split>/``.
"""
import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from common.datasets.catalog import CIRKD_EVAL_SPLITS, CIRKD_NUM_CLASSES
from common.engine.dist import destroy, init_distributed
from common.errors import main_guard
from common.evaluation import write_results_json
from common.io import output_dir
from common.numerics import set_tf32
from common.recipes import cirkd
from common.recipes.options import finite_float

CHECKPOINT_HINT = ("pass the checkpoint written by train_baseline.py or train_kd.py for this "
                   "--model/--backbone/--dataset")


def build_parser():
    parser = argparse.ArgumentParser(description="Semantic Segmentation Evaluation")
    parser.add_argument("--model", type=str, default="deeplabv3", help="model name")
    parser.add_argument("--backbone", type=str, default="resnet18", help="backbone name")
    cirkd.add_data_flags(parser, crop=(1024, 2048))
    parser.add_argument("--data-list", type=str, default=None,
                        help="list of the evaluated images (unused by the original; default: the shipped list)")
    parser.add_argument("--pretrained", type=str, default="psp_resnet18_citys_best_model.pth",
                        help="segmentation checkpoint to evaluate")
    parser.add_argument("--save-dir", default="../runs/logs/", help="directory of the log and the predictions")
    parser.add_argument("--save-pred", action="store_true", default=False, help="save palette PNG predictions")
    parser.add_argument("--ignore-label", type=int, default=-1, metavar="N", help="unused (the metric ignores -1)")
    parser.add_argument("--scales", default=[1.0], type=finite_float, nargs="+", help="multiple scales")
    parser.add_argument("--flip-eval", action="store_true", default=False, help="flip evaluation")
    parser.add_argument("--aux", action="store_true", default=False,
                        help="accepted and ignored, as the original: the aux head follows the backbone")
    parser.add_argument("--blend", action="store_true", default=False,
                        help="with --save-pred save 0.3*image + 0.7*colour prediction instead of the prediction")
    cirkd.add_launch_flags(parser)
    parser.add_argument("--corrected-metric", action="store_true",
                        help="added: pixAcc on the true argmax, mIoU over the classes present (float64 sums)")
    parser.add_argument("--pad-shards", action="store_true",
                        help="added: shard like the original DistributedSampler (pads, so some images count twice)")
    parser.add_argument("--method", type=str, default=None,
                        help="added: method of results.json (default: from the training run's args.json, else "
                             "cirkd for kd_* checkpoints, teacher for resnet101, baseline otherwise)")
    return parser


def training_run_info(checkpoint):
    """The ``run_info`` of the training run that wrote ``checkpoint`` (its ``<stem>_run/args.json``), or {}."""
    path = Path(checkpoint)
    stem = path.stem.removesuffix("_best_model")
    try:
        return json.loads((path.parent / f"{stem}_run" / "args.json").read_text()).get("run_info", {})
    except (OSError, ValueError):
        return {}


def run_fields(args, name, split, scores):
    """``results.json`` fields: method and training settings from the training run when known."""
    trained = training_run_info(args.pretrained)
    default = "cirkd" if Path(args.pretrained).name.startswith("kd_") else (
        "teacher" if args.backbone == "resnet101" else "baseline")
    method = args.method or trained.get("method") or default
    extra = {**trained.get("extra", {}), "checkpoint": str(args.pretrained), "scales": list(args.scales),
             "flip": args.flip_eval, "metric": "corrected" if args.corrected_metric else "cirkd",
             "padded_shards": args.pad_shards, "images": scores.images}
    return {"paper": "cirkd", "method": method, "model": name, "dataset": cirkd.DATASET_NAMES[args.dataset],
            "split": split, "iterations": trained.get("iterations"), "crop": trained.get("crop"),
            "batch": trained.get("batch"), "seed": trained.get("seed"), "teacher": trained.get("teacher"),
            **scores.result_fields(), "extra": extra}


@main_guard
def main(argv=None):
    args = build_parser().parse_args(argv)
    name = cirkd.network_name(args.model, args.backbone)
    set_tf32(args.tf32)
    torch.backends.cudnn.benchmark = True
    info = init_distributed(cirkd.resolve_device_flag(args))
    num_classes = CIRKD_NUM_CLASSES[args.dataset]
    split = CIRKD_EVAL_SPLITS[args.dataset]
    model = cirkd.build_network(name, num_classes, cirkd.resolve_norm(args.norm, info))
    cirkd.load_weights(model, args.pretrained, "--pretrained", CHECKPOINT_HINT)
    model = model.to(info.device)
    dataset = cirkd.eval_set(args.dataset, args.data, args.data_list)

    save_dir = output_dir(Path(args.save_dir).expanduser(), "--save-dir")
    stem = f"{args.model}_{args.backbone}_{args.dataset}"
    logger = cirkd.eval_logger("cirkd.eval", save_dir / f"{stem}_multiscale_val.txt", info.is_main)
    logger.info(args)
    logger.info(cirkd.complexity_line(name, num_classes))
    pred_dir = save_dir / stem
    palette = cirkd.palette_of(args.dataset)
    metric = cirkd.make_metric(num_classes, corrected=args.corrected_metric)

    def on_sample(i, image, logits, label, image_name):
        pix_acc, miou = metric.get()
        logger.info(f"Sample: {i + 1:d}, validation pixAcc: {pix_acc * 100:.3f}, mIoU: {miou * 100:.3f}")
        if args.save_pred:
            pred = logits.argmax(1)[0].to(torch.uint8).cpu().numpy()
            cirkd.save_prediction(pred, pred_dir, image_name, palette, image[0] if args.blend else None)

    loader = cirkd.sharded_loader(dataset, info, pad=args.pad_shards, num_workers=args.workers)
    logger.info(f"Start validation, Total sample: {len(dataset):d}")
    scores = cirkd.evaluate(model, loader, metric, info.device, scales=args.scales, flip=args.flip_eval,
                            on_sample=on_sample)
    logger.info(f"Overall validation pixAcc: {scores.pixel_acc * 100:.3f}, mIoU: {scores.miou * 100:.3f}")
    if info.is_main:
        results = save_dir / f"{Path(args.pretrained).stem}_{split}" / "results.json"
        write_results_json(results, **run_fields(args, name, split, scores))
        logger.info(f"results written to {results}")
    cirkd.close_logger(logger)
    destroy()


if __name__ == "__main__":
    main()

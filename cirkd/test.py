"""CIRKD ``test.py`` (specs/cirkd.md §1.6): Cityscapes test-server predictions.

    python cirkd/test.py --model deeplabv3 --backbone resnet18 --data $CITYSCAPES \\
        --pretrained kd_deeplabv3_resnet18_citys_best_model.pth --save-dir runs/logs --save-pred

For every image of the test list (no labels): the logits averaged over ``--scales`` (and ``--flip-eval``), argmax,
trainId -> Cityscapes labelId, an 8-bit grayscale PNG
``<save-dir>/<model>_<backbone>_<dataset>_<method>/<image stem>.png`` (with ``--save-pred``). Zip the folder and
upload it. Log ``<save-dir>/<model>_<backbone>_<dataset>_log.txt`` (append). Under torchrun every process
predicts its own images.
"""
import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from common.datasets.cityscapes import cirkd_cityscapes
from common.engine.data import eval_loader
from common.engine.dist import barrier, destroy, init_distributed
from common.errors import UserError, main_guard
from common.evaluation import predict_multiscale, save_test_prediction
from common.io import output_dir
from common.numerics import set_tf32
from common.recipes import cirkd
from common.recipes.options import finite_float

ORIGINAL_LIST = "./dataset/list/cityscapes/test.lst"  # the original default: the shipped CIRKD test list


def build_parser():
    parser = argparse.ArgumentParser(description="Semantic Segmentation Test With Pytorch")
    parser.add_argument("--model", type=str, default="deeplabv3", help="model name")
    parser.add_argument("--method", type=str, default="kd", help="method name (only in the output folder name)")
    parser.add_argument("--backbone", type=str, default="resnet18", help="backbone name")
    parser.add_argument("--dataset", type=str, default="citys", help="dataset name (the server is Cityscapes')")
    parser.add_argument("--data", type=str, default="./dataset/cityscapes/", help="dataset root")
    parser.add_argument("--data-list", type=str, default=ORIGINAL_LIST, help="test list")
    parser.add_argument("--workers", "-j", type=int, default=8, metavar="N", help="dataloader threads")
    parser.add_argument("--pretrained", type=str, default="psp_resnet18_citys_best_model.pth",
                        help="segmentation checkpoint")
    parser.add_argument("--save-dir", default="../runs/logs/", help="directory of the log and the predictions")
    parser.add_argument("--save-pred", action="store_true", default=False, help="save the labelId PNGs")
    parser.add_argument("--flip-eval", action="store_true", default=False, help="flip evaluation")
    parser.add_argument("--aux", action="store_true", default=False,
                        help="accepted and ignored, as the original: the aux head follows the backbone")
    parser.add_argument("--scales", default=[1.0], type=finite_float, nargs="+", help="multiple scales")
    cirkd.add_launch_flags(parser)
    return parser


@main_guard
def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.dataset != "citys":
        raise UserError(f"test.py writes Cityscapes labelIds for the Cityscapes server; --dataset must be citys, "
                        f"got {args.dataset}")
    name = cirkd.network_name(args.model, args.backbone)
    set_tf32(args.tf32)
    torch.backends.cudnn.benchmark = True
    info = init_distributed(cirkd.resolve_device_flag(args))
    model = cirkd.build_network(name, 19, cirkd.resolve_norm(args.norm, info))
    cirkd.load_weights(model, args.pretrained, "--pretrained",
                       "pass a Cityscapes checkpoint of this --model/--backbone")
    model = model.to(info.device).eval()
    list_path = None if args.data_list == ORIGINAL_LIST else args.data_list
    dataset = cirkd_cityscapes(args.data, "test", list_path=list_path)

    save_dir = output_dir(Path(args.save_dir).expanduser(), "--save-dir")
    stem = f"{args.model}_{args.backbone}_{args.dataset}"
    logger = cirkd.eval_logger("cirkd.test", save_dir / f"{stem}_log.txt", info.is_main)
    logger.info(args)
    out_dir = save_dir / f"{stem}_{args.method}"
    loader = eval_loader(dataset, info, num_workers=args.workers)
    logger.info(f"Start testing, Total sample: {len(dataset):d}")
    with torch.no_grad():
        for i, (image, _, names) in enumerate(loader):
            image = image.to(info.device)
            logits = predict_multiscale(model, image, tuple(image.shape[-2:]), args.scales, args.flip_eval,
                                        rounding="floor")
            if args.save_pred:
                pred = logits.argmax(1)[0].to(torch.uint8).cpu().numpy()
                save_test_prediction(pred, out_dir / f"{names[0]}.png", None)
            logger.info(f"Sample: {i + 1:d}/{len(loader):d} {names[0]}")
    barrier()
    if args.save_pred:
        logger.info(f"labelId PNGs in {out_dir}")
    cirkd.close_logger(logger)
    destroy()


if __name__ == "__main__":
    main()

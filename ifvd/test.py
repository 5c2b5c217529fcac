"""IFVD ``test.py`` (specs/ifvd_skd.md §A.2.3, §C.6): Cityscapes test-set predictions for the server.

Whole image at its own size (1024x2048 on Cityscapes), scale 1.0; writes ``<outputs-dir>/<image stem>.png``
in labelId coding (VOC palette, as the original); no metric.
"""
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.datasets.cityscapes import CSTestSet
from common.engine import resolve_device
from common.errors import UserError, main_guard
from common.io import output_dir
from common.numerics import set_tf32
from common.recipes import psp
from common.recipes.options import apply_gpu
from common.recipes.psp import resolve_list
from ifvd.options import eval_parser
from ifvd.val import load_student


@main_guard
def main(argv=None):
    args = eval_parser("test").parse_args(argv)
    print(" ".join(f"{k}={v}" for k, v in sorted(vars(args).items())))
    if not args.outputs_dir:
        raise UserError("--outputs-dir is empty, but test.py only writes predictions; pass a folder")
    apply_gpu(args.gpu)
    set_tf32(args.tf32)
    device = resolve_device(args.device)
    output_dir(args.outputs_dir, "--outputs-dir")
    dataset = CSTestSet(args.data_dir, resolve_list(args.data_list, "test", args.data_dir), crop_size=None)
    student = load_student(args, device)
    result = psp.evaluate_split(student, dataset, num_classes=args.num_classes, device=device, mode="test",
                                   outputs_dir=args.outputs_dir)
    print(f"{result.num_images} test predictions (labelIds) written to {args.outputs_dir}")


if __name__ == "__main__":
    main()

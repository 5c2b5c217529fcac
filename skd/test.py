"""SKD journal code ``test.py`` (specs/ifvd_skd.md §B.2.4, §C.6): Cityscapes test-set predictions.

Whole image at its own size (1024x2048 on Cityscapes), scale 1.0; writes ``<outputs-dir>/<image stem>.png`` in
labelId coding with the VOC palette, for the evaluation server. No metric.
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
from common.recipes.psp import resolve_list
from skd.options import prediction_parser

RESTORE_HINT = "pass --resume-from with a student state_dict such as ./ckpt/CS_scenes_39326_0.75.pth"


@main_guard
def main(argv=None):
    args = prediction_parser().parse_args(argv)
    if not args.outputs_dir:
        raise UserError("--outputs-dir is empty, but test.py only writes predictions; pass a folder")
    set_tf32(args.tf32)
    device = resolve_device(args.device)
    output_dir(args.outputs_dir, "--outputs-dir")
    dataset = CSTestSet(args.data_dir, resolve_list(args.data_list, "test", args.data_dir), crop_size=None)
    student = psp.load_student(psp.STUDENT, args.resume_from, "--resume-from", RESTORE_HINT, num_classes=19,
                                  norm=args.norm, device=device)
    result = psp.evaluate_split(student, dataset, num_classes=19, device=device, mode="test",
                                   outputs_dir=args.outputs_dir)
    print(f"{result.num_images} test predictions (labelIds) written to {args.outputs_dir}")


if __name__ == "__main__":
    main()

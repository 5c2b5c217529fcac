"""CWD ``test.py`` (specs/cwd.md §3.4): Cityscapes test-server predictions of a PSPNet-R18 checkpoint.

Each prediction is mapped from trainId back to the Cityscapes labelId and written as a palettised
PNG ``<outputs-dir>/<image basename>.png``; no metric is computed.
"""
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.datasets.cityscapes import CSTestSet
from common.engine import resolve_device
from common.errors import main_guard
from common.io import output_dir
from common.numerics import set_tf32
from common.recipes import psp
from cwd.options import eval_parser, resolve_list
from cwd.val import load_student


@main_guard
def main(argv=None):
    args = eval_parser("test").parse_args(argv)
    for key, value in sorted(vars(args).items()):
        print(f"{key} : {value}")
    set_tf32(args.tf32)
    device = resolve_device(args.device)
    if args.outputs_dir:
        output_dir(args.outputs_dir, "--outputs-dir")
    model = load_student(args, device)
    dataset = CSTestSet(args.data_dir, resolve_list(args.data_list, "test", args.data_dir), crop_size=None)
    print(f"{len(dataset)} images are loaded!", flush=True)
    result = psp.evaluate_split(model, dataset, num_classes=args.num_classes, device=device, mode="test",
                                   outputs_dir=args.outputs_dir)
    print(f"wrote {result.num_images} predictions to {args.outputs_dir}")


if __name__ == "__main__":
    main()

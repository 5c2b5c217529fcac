"""CWD ``val.py`` (specs/cwd.md §3.3): mIoU of a PSPNet-R18 checkpoint on Cityscapes val.

Whole image, single scale, no flip (§7). stdout is what the original printed (the sorted arguments,
"N images are loaded!", ``mean_IU: ...  IU_array:`` and the per-class array), i.e. a ``test.out``;
prediction PNGs go to ``--outputs-dir`` and the metrics to ``results.json`` next to the checkpoint.
"""
import json
import re
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from common.datasets.cityscapes import CSTrainValSet
from common.engine import resolve_device
from common.errors import main_guard
from common.evaluation import write_results_json
from common.io import output_dir, output_file
from common.numerics import set_tf32
from common.recipes import psp
from cwd.options import eval_parser, resolve_list

RESTORE_HINT = "pass --restore-from <run>/city_39999_G.pth"


def load_student(args, device):
    """The student with ``--restore-from`` loaded strictly (a missing flag or file is a UserError)."""
    return psp.load_student(psp.STUDENT, args.restore_from, "--restore-from", RESTORE_HINT,
                               num_classes=args.num_classes, norm=args.norm, device=device)


def run_fields(restore_from):
    """results.json fields of the run that wrote ``restore_from`` (its args.json), else of a bare checkpoint."""
    path = Path(restore_from)
    args_json = path.parent / "args.json"
    if args_json.is_file():
        fields = json.loads(args_json.read_text())["run_info"]
    else:
        fields = {"paper": "cwd", "method": "cwd", "model": psp.STUDENT, "dataset": "cityscapes", "split": "val",
                  "iterations": None, "crop": None, "batch": None, "seed": None, "extra": {"run": path.parent.name}}
    released = re.search(r"val-\d+\.\d+", path.name)
    if released:
        fields["extra"] = {**fields["extra"], "checkpoint": released.group(0)}
    fields["extra"] = {**fields["extra"], "restore_from": str(path)}
    return fields


@main_guard
def main(argv=None):
    args = eval_parser("val").parse_args(argv)
    for key, value in sorted(vars(args).items()):
        print(f"{key} : {value}")
    set_tf32(args.tf32)
    device = resolve_device(args.device)
    model = load_student(args, device)
    out = output_file(Path(args.results) if args.results else Path(args.restore_from).parent / "results.json",
                      "--results")
    if args.outputs_dir:
        output_dir(args.outputs_dir, "--outputs-dir")
    dataset = CSTrainValSet(args.data_dir, resolve_list(args.data_list, "val", args.data_dir), crop_size=None)
    print(f"{len(dataset)} images are loaded!", flush=True)
    result = psp.evaluate_split(model, dataset, num_classes=args.num_classes, device=device, mode="val",
                                   outputs_dir=args.outputs_dir)
    with np.printoptions(precision=8):
        print(f"mean_IU: {result.miou:.6f}  IU_array: \n{np.asarray(result.iou)}", flush=True)
    write_results_json(out, **{**run_fields(args.restore_from), **result.result_fields()})


if __name__ == "__main__":
    main()

"""IFVD ``val.py`` (specs/ifvd_skd.md §A.2.3, §A.7): evaluate a PSPNet-R18 student on Cityscapes val.

Whole-image, single-scale, no flip; prints ``mean_IU: … IU_array: …``, writes ``<outputs-dir>/<label stem>.png``
(trainIds, VOC palette, as the original) and ``results.json`` next to the checkpoint.
"""
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
from common.recipes.options import apply_gpu
from common.recipes.psp import resolve_list
from ifvd.options import eval_parser

RESTORE_HINT = "pass --restore-from with a student state_dict such as ckpt/exp/city_39999_G.pth"


def load_student(args, device):
    """``Res_pspnet(BasicBlock, [2,2,2,2])`` (or ``--model``) with a strict load of ``--restore-from`` (§A.2.3)."""
    return psp.load_student(args.model, args.restore_from, "--restore-from", RESTORE_HINT,
                               num_classes=args.num_classes, norm=args.norm, device=device)


@main_guard
def main(argv=None):
    args = eval_parser("val").parse_args(argv)
    print(" ".join(f"{k}={v}" for k, v in sorted(vars(args).items())))
    apply_gpu(args.gpu)
    set_tf32(args.tf32)
    device = resolve_device(args.device)
    dataset = CSTrainValSet(args.data_dir, resolve_list(args.data_list, "val", args.data_dir), crop_size=None)
    student = load_student(args, device)
    out = output_file(Path(args.results) if args.results else Path(args.restore_from).resolve().parent / "results.json",
                      "--results")
    if args.outputs_dir:
        output_dir(args.outputs_dir, "--outputs-dir")
    result = psp.evaluate_split(student, dataset, num_classes=args.num_classes, device=device, mode="val",
                                   outputs_dir=args.outputs_dir)
    print(f"mean_IU: {result.miou:.6f}  IU_array: \n{np.asarray(result.iou)}", flush=True)
    method = args.method or ("teacher" if args.model != psp.STUDENT else "ifvd")
    tag = args.checkpoint_tag or Path(args.restore_from).stem
    write_results_json(out, paper="ifvd", method=method, model=args.model, dataset="cityscapes", split="val",
                       iterations=None, crop=None, batch=None, seed=None, **result.result_fields(),
                       extra={"checkpoint": tag, "path": str(args.restore_from), "entry": "ifvd/val.py"})
    print(f"results written to {out}")


if __name__ == "__main__":
    main()

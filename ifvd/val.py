"""IFVD ``val.py`` (specs/ifvd_skd.md §A.2.3, §A.7): evaluate a PSPNet-R18 student on Cityscapes val.

Whole-image, single-scale, no flip; prints ``mean_IU: … IU_array: …``, writes ``<outputs-dir>/<label stem>.png``
(trainIds, VOC palette, as the original) and ``results.json`` next to the checkpoint.
"""
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torch.utils.data import DataLoader

from common.datasets.cityscapes import CSTrainValSet
from common.engine import resolve_device
from common.errors import main_guard
from common.evaluation import evaluate_main, write_results_json
from common.models import build_model
from common.models.weights import load_checkpoint, load_state_dict_strict
from ifvd.options import STUDENT, apply_gpu, eval_parser, resolve_list

RESTORE_HINT = "pass --restore-from with a student state_dict such as ckpt/exp/city_39999_G.pth"


def load_student(args, device):
    """``Res_pspnet(BasicBlock, [2,2,2,2])`` (or ``--model``) with a strict load of ``--restore-from`` (§A.2.3)."""
    student = build_model(args.model, num_classes=args.num_classes, norm=args.norm)
    state = load_checkpoint(args.restore_from, "student checkpoint (--restore-from)", RESTORE_HINT)
    load_state_dict_strict(student, state, f"student checkpoint {args.restore_from}")
    return student.to(device)


@main_guard
def main(argv=None):
    args = eval_parser("val").parse_args(argv)
    print(" ".join(f"{k}={v}" for k, v in sorted(vars(args).items())))
    apply_gpu(args.gpu)
    device = resolve_device(args.device)
    dataset = CSTrainValSet(args.data_dir, resolve_list(args.data_list, "val", args.data_dir), crop_size=None)
    student = load_student(args, device)
    loader = DataLoader(dataset, batch_size=1, shuffle=False, num_workers=0)
    result = evaluate_main(student, loader, num_classes=args.num_classes, device=device, whole=True, mode="val",
                           output_dir=args.outputs_dir or None)
    print(f"mean_IU: {result.miou}  IU_array: {result.iou.tolist()}")
    out = Path(args.results) if args.results else Path(args.restore_from).resolve().parent / "results.json"
    method = args.method or ("teacher" if args.model != STUDENT else "ifvd")
    tag = args.checkpoint_tag or Path(args.restore_from).stem
    write_results_json(out, paper="ifvd", method=method, model=args.model, dataset="cityscapes", split="val",
                       iterations=None, crop=None, batch=None, seed=None, **result.result_fields(),
                       extra={"checkpoint": tag, "path": str(args.restore_from), "entry": "ifvd/val.py"})
    print(f"results written to {out}")


if __name__ == "__main__":
    main()

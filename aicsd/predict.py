"""``aicsd/predict.py`` (added; the original has no test script): evaluate a trained DeepLabV3+ or export the VOC
test-server submission (specs/aicsd.md §7: the README asks users to submit to the PASCAL VOC server).

* ``--split val``: the §7 evaluation (short side ``--crop-size``, confusion-matrix metrics with nan-means), the
  metrics printed and written to ``<out-dir>/results.json``; ``--save-pred`` also writes VOC-palette PNGs.
* ``--split test``: every id of ``ImageSets/Segmentation/test.txt`` is predicted at short side ``--crop-size``,
  the logits are resized back to the image's own size and the argmax is written as a VOC-palette PNG to
  ``<out-dir>/results/VOC2012/Segmentation/comp5_test_cls/<id>.png`` (the server's layout; tar ``results/``).
"""
import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from common.datasets.base import read_list, read_rgb, require_dirs
from common.datasets.transforms import build_transform
from common.engine.dist import resolve_device
from common.errors import UserError, main_guard
from common.evaluation import evaluate_main, get_palette, save_prediction_png, write_results_json
from common.models import build_model
from common.models.deeplabv3plus import model_name
from common.models.weights import load_state_dict_strict
from common.recipes import aicsd

SUBMISSION = Path("results") / "VOC2012" / "Segmentation" / "comp5_test_cls"


class VOCTestImages(Dataset):
    """The unlabelled VOC ``test`` ids: ``(image at short side crop, (h, w) of the file, id)``."""

    def __init__(self, root, split="test", crop_size=513):
        require_dirs(root, ["JPEGImages", "ImageSets/Segmentation"], "VOC",
                     "pass the VOC2012 folder holding JPEGImages/ and ImageSets/Segmentation/")
        list_path = Path(root) / "ImageSets" / "Segmentation" / f"{split}.txt"
        self.ids = [fields[0] for _, fields in read_list(list_path, {1}, "VOC")]
        self.root = Path(root)
        self.transform = build_transform("aicsd", False, crop_size=crop_size)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        name = self.ids[index]
        path = self.root / "JPEGImages" / f"{name}.jpg"
        if not path.is_file():
            raise UserError(f"VOC image {path} listed in {self.root}/ImageSets/Segmentation is missing; check the root")
        image = read_rgb(path)
        tensor, _ = self.transform(image, np.zeros(image.shape[:2], np.uint8))
        return tensor, np.array(image.shape[:2]), name


def parser():
    p = argparse.ArgumentParser(description="Evaluate a DeepLabV3+ checkpoint or export the VOC test submission")
    p.add_argument("--checkpoint", required=True, help="checkpoint.pth.tar / model_best.pth.tar (with 'state_dict')")
    p.add_argument("--backbone", default="resnet18", help="resnet101, resnet18 or mobilenet")
    p.add_argument("--out-stride", type=int, default=16)
    p.add_argument("--dataset", default="pascal", help="pascal or cityscapes (test export: pascal only)")
    p.add_argument("--data-dir", default=None, help="dataset root ($VOC / $CITYSCAPES)")
    p.add_argument("--cityscapes-layout", default="auto", choices=("auto", "kaggle", "standard", "deeplab"))
    p.add_argument("--crop-size", type=int, default=513, help="the validation short side (default 513)")
    p.add_argument("--split", default="val", choices=("val", "test"))
    p.add_argument("--out-dir", default="outputs/aicsd", help="results.json or the results/ submission tree")
    p.add_argument("--save-pred", action="store_true", help="val: also write VOC-palette PNGs into --out-dir")
    p.add_argument("--device", default="auto")
    return p


def load_model(args, device):
    model = build_model(model_name(args.backbone), num_classes=aicsd.AICSD_NUM_CLASSES[args.dataset],
                        output_stride=args.out_stride).to(device)
    state = aicsd.read_checkpoint(args.checkpoint, "checkpoint (--checkpoint)",
                                  "pass a checkpoint.pth.tar written by aicsd/train.py or train_kd.py")
    if not isinstance(state.get("state_dict"), dict):
        raise UserError(f"checkpoint {args.checkpoint} has no 'state_dict' entry; pass a checkpoint.pth.tar")
    load_state_dict_strict(model, state["state_dict"], f"checkpoint {args.checkpoint}")
    return model.eval()


def export_test(model, dataset, out_dir, device):
    """The server submission: one PNG per test id at the image's own size (§7)."""
    folder = Path(out_dir) / SUBMISSION
    palette = get_palette(256)
    with torch.no_grad():
        for image, size, names in DataLoader(dataset, batch_size=1):
            logits = model(image.to(device))
            logits = F.interpolate(logits, size=tuple(int(v) for v in size[0]), mode="bilinear", align_corners=True)
            save_prediction_png(logits.argmax(1)[0].to(torch.uint8).cpu().numpy(), folder / f"{names[0]}.png",
                                palette)
    return folder


@main_guard
def main(argv=None):
    args = parser().parse_args(argv)
    if args.dataset not in aicsd.RESULTS_DATASET:
        raise UserError(f"--dataset {args.dataset!r} is not available; use pascal or cityscapes")
    device = resolve_device(args.device)
    model = load_model(args, device)
    root = aicsd.data_root(args)
    if args.split == "test":
        if args.dataset != "pascal":
            raise UserError("the test-server export is for PASCAL VOC; use --split val for Cityscapes")
        folder = export_test(model, VOCTestImages(root, "test", args.crop_size), args.out_dir, device)
        print(f"wrote the VOC test submission to {folder}; tar the results/ folder for the server")
        return
    val_set = aicsd.ScoredAtResizedSize(aicsd.aicsd_dataset(args.dataset, root, "val", crop_size=args.crop_size,
                                                            layout=args.cityscapes_layout))
    result = evaluate_main(model, DataLoader(val_set, batch_size=1), num_classes=aicsd.AICSD_NUM_CLASSES[args.dataset],
                           device=device, absent="nan", palette="voc",
                           output_dir=Path(args.out_dir) / "pred" if args.save_pred else None)
    fwiou = aicsd.fw_iou(result.confusion)
    print(f"Acc:{result.pixel_acc}, Acc_class:{result.mean_acc}, mIoU:{result.miou}, fwIoU: {fwiou}")
    write_results_json(Path(args.out_dir) / "results.json", paper="aicsd", method="eval",
                       model=model_name(args.backbone), dataset=aicsd.RESULTS_DATASET[args.dataset], split="val",
                       iterations=None, crop=[args.crop_size, args.crop_size], batch=1, seed=None,
                       extra={"checkpoint": args.checkpoint, "fwiou": fwiou}, **result.result_fields())


if __name__ == "__main__":
    main()

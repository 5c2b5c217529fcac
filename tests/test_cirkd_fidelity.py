"""CIRKD details of issue 18 (items 4-6): the multi-scale size of eval.py, the --save-pred colours and --blend, the
ignored flags of the originals, --minibatch-group. Expected values come from specs/cirkd.md (sections in the
comments) or are computed by hand."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cirkd import eval as cirkd_eval  # noqa: E402
from cirkd import test as cirkd_test  # noqa: E402
from cirkd import train_baseline, train_kd  # noqa: E402
from common.datasets.transforms import IMG_MEAN_BGR  # noqa: E402
from common.recipes import cirkd  # noqa: E402


class SizeRecorder(nn.Module):
    """Records the size of every input; predicts class 0 at 1/8 resolution."""

    output_names = ("logits",)

    def __init__(self):
        super().__init__()
        self.sizes = []

    def forward(self, x):
        self.sizes.append(tuple(x.shape[-2:]))
        return [x.new_zeros(x.shape[0], 2, x.shape[2] // 8 + 1, x.shape[3] // 8 + 1)]


def test_cirkd_evaluate_resizes_each_scale_to_floor_of_h_times_s():
    # §5.2: eval.py's F.interpolate(scale_factor=s) gives floor(H·s): 375x500 at 0.5 -> 187x250, at 1.25 -> 468x625
    model = SizeRecorder()
    loader = [(torch.zeros(1, 3, 375, 500), torch.zeros(1, 375, 500, dtype=torch.long), None, ["x"])]
    cirkd.evaluate(model, loader, cirkd.make_metric(2), "cpu", scales=(0.5, 1.0, 1.25))
    assert model.sizes == [(187, 250), (375, 500), (468, 625)]


def test_save_pred_palettes_of_the_original():
    # Cityscapes: road (128, 64, 128), CIRKD's sky (0, 130, 180); COCO-Stuff: matplotlib's jet_r at 256 levels,
    # class k = jet(1 - k/255) as bytes: jet(1) = (0.5, 0, 0) -> (127, 0, 0); jet(254/255): red
    # 1 - 0.5·(254/255 - 0.89)/0.11 = 0.51783 -> 132; jet(0) = (0, 0, 0.5) -> (0, 0, 127); others: VOC, 1 -> (128, 0, 0)
    citys = np.array(cirkd.palette_of("citys")).reshape(256, 3)
    assert tuple(citys[0]) == (128, 64, 128) and tuple(citys[10]) == (0, 130, 180)
    coco = np.array(cirkd.palette_of("coco_stuff_164k")).reshape(256, 3)
    assert [tuple(coco[k]) for k in (0, 1, 255)] == [(127, 0, 0), (132, 0, 0), (0, 0, 127)]
    for dataset in ("voc", "camvid", "ade20k"):
        assert tuple(np.array(cirkd.palette_of(dataset)).reshape(256, 3)[1]) == (128, 0, 0)


def test_blend_is_0_3_image_plus_0_7_mask_under_the_images_name(tmp_path):
    rgb = np.array([[[200, 100, 50], [10, 20, 30]]], dtype=np.uint8)  # 1x2 RGB
    image = torch.from_numpy((rgb[:, :, ::-1].astype(np.float32) - np.float32(IMG_MEAN_BGR)).transpose(2, 0, 1))
    pred = np.array([[0, 10]], dtype=np.uint8)
    cirkd.save_prediction(pred, tmp_path, "frankfurt_000000", cirkd.palette_of("citys"), image)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["frankfurt_000000.png"]
    got = np.asarray(Image.open(tmp_path / "frankfurt_000000.png").convert("RGB")).astype(float)
    # by hand: 0.3·(200, 100, 50) + 0.7·(128, 64, 128) and 0.3·(10, 20, 30) + 0.7·(0, 130, 180)
    expected = np.array([[[149.6, 74.8, 104.6], [3.0, 97.0, 135.0]]])
    assert np.abs(got - expected).max() <= 1.0


def test_save_pred_without_blend_is_the_palette_png(tmp_path):
    cirkd.save_prediction(np.array([[0, 10]], dtype=np.uint8), tmp_path, "a", cirkd.palette_of("citys"))
    png = Image.open(tmp_path / "a.png")
    assert png.mode == "P" and tuple(np.asarray(png.convert("RGB"))[0, 1]) == (0, 130, 180)


@pytest.mark.parametrize("parser,argv", [
    (train_baseline.build_parser, ["--start_epoch", "3", "--save-epoch", "5", "--val-epoch", "2"]),
    (train_kd.build_parser, ["--start_epoch", "3", "--save-epoch", "5", "--val-epoch", "2"]),
    (cirkd_eval.build_parser, ["--aux"]),
    (cirkd_test.build_parser, ["--aux"]),
])
def test_the_originals_unused_flags_are_accepted(parser, argv):
    parser().parse_args(argv)  # §1.1: kept for compatibility and never read


def test_train_kd_defaults_are_the_cirkd_trainer_of_7e0d21f():
    # §1.3: λ_kd 1, λ_mb 1, λ_mp 0.1, λ_mr 0.1 (at 2d8ad0f train_kd.py is the baseline trainer, README Deviations)
    args = train_kd.build_parser().parse_args([])
    lambdas = (args.lambda_kd, args.lambda_minibatch_pixel, args.lambda_memory_pixel, args.lambda_memory_region)
    assert lambdas == (1.0, 1.0, 0.1, 0.1) and args.minibatch_group is None
    assert not any(getattr(args, name) for name in train_kd.BASELINE_LAMBDAS)


def test_minibatch_group_that_does_not_divide_the_batch_is_refused(tmp_path, capsys):
    argv = ["--teacher-pretrained", str(tmp_path / "t.pth"), "--batch-size", "4", "--minibatch-group", "3",
            "--device", "cpu", "--save-dir", str(tmp_path / "ckpt"), "--log-dir", str(tmp_path / "logs")]
    with pytest.raises(SystemExit) as exit_info:
        train_kd.main(argv)
    assert exit_info.value.code == 2
    assert "--minibatch-group 3 does not divide the 4 images per process" in capsys.readouterr().err
    assert not (tmp_path / "ckpt").exists()

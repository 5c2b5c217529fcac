"""AICSD entry points wired as the spec says: parser defaults (specs/aicsd.md §2.1, §2.2, §11), the CE
normalisation (§4.1, Q12) the trainers build from them, the KD checkpoint dict (§2.4 step 10) and the original's
``numImages`` lines (§2.3 step 7). Expected values are spec literals or hand computations."""
import json

import pytest
import torch
import torch.nn.functional as F

from aicsd import train, train_kd
from common.recipes import aicsd

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def no_demo(monkeypatch):
    monkeypatch.delenv("SEGKD_DEMO", raising=False)


def hand_ce(logits, labels):
    """§4.1: mean CE over the non-255 pixels, divided again by the batch size (Q12)."""
    return F.cross_entropy(logits, labels, ignore_index=255) / logits.shape[0]


def ce_inputs():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 5, 5, dtype=torch.float64, generator=generator)
    labels = torch.randint(0, 4, (3, 5, 5), generator=generator)
    labels[0, :2] = 255
    return logits, labels


def test_parser_defaults_are_the_originals():
    for parser in (train.parser(), train_kd.parser()):
        args = parser.parse_args([])
        assert args.ce_batch_average is True  # §4.1 / Q12: the CE is divided by the batch once more
        assert (args.loss_type, args.out_stride, args.base_size, args.crop_size) == ("ce", 16, 513, 513)  # §2.1
        assert (args.momentum, args.weight_decay, args.nesterov) == (0.9, 5e-4, False)  # §2.1, §6.1
    kd = train_kd.parser().parse_args([])
    assert (kd.pa_lambda, kd.pi_lambda, kd.lo_lambda, kd.ic_lambda) == (None, None, None, None)  # §2.2
    assert (kd.ref_epochs, kd.ics_mode, kd.teacher_eval, kd.first_epoch_frozen) == (120, "code", False, True)  # §11


def test_train_py_criterion_divides_the_ce_by_the_batch_by_default():
    logits, labels = ce_inputs()
    criterion = train.criterion(train.parser().parse_args([]), None)
    torch.testing.assert_close(criterion(logits, labels), hand_ce(logits, labels), rtol=0, atol=1e-15)
    usual = train.criterion(train.parser().parse_args(["--ce-batch-average", "false"]), None)
    torch.testing.assert_close(usual(logits, labels), hand_ce(logits, labels) * 3, rtol=0, atol=1e-15)


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    from common.datasets.synthetic import make_voc

    root = tmp_path_factory.mktemp("voc")
    make_voc(root, splits={"train": 6, "val": 3}, size=(40, 48), seed=0)
    return root


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    from common.models import build_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "checkpoint.pth.tar"
    torch.save({"epoch": 1, "state_dict": build_model("deeplabv3plus_resnet18", num_classes=21).state_dict(),
                "optimizer": {}, "best_pred": 0.5}, path)
    return path


@pytest.mark.slow
def test_kd_run_saves_the_original_checkpoint_and_prints_the_original_counts(voc, teacher, tmp_path, monkeypatch):
    seen = {}
    build, loss = aicsd.build_network, train_kd.SegmentationLoss

    def record_student(args, backbone, device, *, return_features, pretrained=True):
        model = build(args, backbone, device, return_features=return_features, pretrained=pretrained)
        seen["student"] = model
        return model

    def record_ce(*args, **kwargs):
        seen["ce"] = loss(*args, **kwargs)
        return seen["ce"]

    monkeypatch.setattr(aicsd, "build_network", record_student)
    monkeypatch.setattr(train_kd, "SegmentationLoss", record_ce)
    save = tmp_path / "s"
    # 6 train images in batches of 4 (the last one 2), 3 val images
    train_kd.main(["--data-dir", str(voc), "--crop-size", "33", "--base-size", "33", "--batch-size", "4", "--epochs",
                   "1", "--workers", "0", "--imagenet-weights", "none", "--device", "cpu", "--save-dir", str(save),
                   "--teacher_path", str(teacher), "--teacher-backbone", "resnet18", "--pi_lambda", "10"])
    run = save / "run" / "pascal" / "deeplab-resnet18" / "experiment_0"

    ckpt = torch.load(run / "checkpoint.pth.tar", weights_only=True)
    assert set(ckpt) == {"epoch", "state_dict", "best_pred"}  # §2.4 step 10: no optimizer state
    assert ckpt["epoch"] == 1  # epoch + 1 after epoch 0
    student = seen["student"].state_dict()
    assert ckpt["state_dict"].keys() == student.keys()
    assert all(torch.equal(ckpt["state_dict"][k], student[k]) for k in student)
    assert isinstance(ckpt["best_pred"], float)  # §9: a float, not the original's numpy scalar
    assert ckpt["best_pred"] == pytest.approx(json.loads((run / "results.json").read_text())["miou"], abs=1e-12)

    logits, labels = ce_inputs()
    torch.testing.assert_close(seen["ce"](logits, labels), hand_ce(logits, labels), rtol=0, atol=1e-15)

    lines = [line for line in (run / "log.txt").read_text().splitlines() if "numImages" in line]
    # the original prints i * batch_size + image.shape[0] after its last batch i: train 1*4 + 2, val 2*4 + 1
    assert [line[line.index("[Epoch"):] for line in lines] == ["[Epoch: 0, numImages:     6]",
                                                               "[Epoch: 0, numImages:     9]"]

"""AICSD recipe pieces without training: defaults and the lr rule, ALW weights per epoch, the LR rule per group,
run folders, FWIoU, the resized val size, and bad input of both entry points (specs/aicsd.md §2, §4.4, §6, §7, §9)."""
import math
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from aicsd import train, train_kd
from common.engine.dist import DistInfo
from common.recipes import aicsd

pytestmark = pytest.mark.usefixtures("one_thread")

EPOCHS_VOC, EPOCHS_CITY = 50, 200  # aicsd.md §2.1 --epochs
LR_VOC, LR_CITY = 0.007, 0.01  # aicsd.md §2.1 --lr base_lr, batch 6 on one GPU


def cpu_info(world_size=1):
    return DistInfo(rank=0, world_size=world_size, local_rank=0, device=torch.device("cpu"), is_main=True)


def defaults(argv, world_size=1, kd=False):
    args = (train_kd.parser() if kd else train.parser()).parse_args(argv)
    aicsd.apply_defaults(args, cpu_info(world_size))
    return args


@pytest.fixture(autouse=True)
def no_demo(monkeypatch):
    monkeypatch.delenv("SEGKD_DEMO", raising=False)


def test_pascal_defaults_are_50_epochs_batch_6_lr_0_007():
    args = defaults([])
    assert (args.epochs, args.batch_size, args.checkname) == (EPOCHS_VOC, 6, "deeplab-resnet18")
    assert args.lr == pytest.approx(LR_VOC, rel=1e-12)


def test_cityscapes_defaults_are_200_epochs_lr_0_01():
    args = defaults(["--dataset", "cityscapes"])
    assert args.epochs == EPOCHS_CITY and args.lr == pytest.approx(LR_CITY, rel=1e-12)


def test_default_lr_scales_with_the_batch_over_6_per_gpu():
    # §2.1: base_lr / (6 * n_gpu) * batch; batch 12 on one GPU -> 0.014, and 2 processes with batch 12 -> 0.007
    assert defaults(["--batch-size", "12"]).lr == pytest.approx(0.014)
    assert defaults(["--batch-size", "12"], world_size=2).lr == pytest.approx(0.007)


def test_default_batch_is_6_per_process_under_torchrun():
    assert defaults([], world_size=2).batch_size == 12


def test_alw_weights_follow_epoch_over_120():
    # §4.4 / §10 ALW: alpha(0) = 0, alpha(60) = 0.5, alpha(119) = 119/120; CE and lo * alpha, pi * (1 - alpha)
    ipe = 3
    args = SimpleNamespace(ALW=True, ref_epochs=120, pa_lambda=9500.0, pi_lambda=10.0, lo_lambda=9500.0,
                           ic_lambda=None, ics_mode="code")
    terms = {t.name: t for t in train_kd.build_terms(args, 21, ipe)}
    assert set(terms) == {"pi", "lo"}  # pa is not part of the ALW total (§4.4)
    for epoch, alpha in ((0, 0.0), (60, 0.5), (119, 119 / 120)):
        for step in (epoch * ipe, epoch * ipe + ipe - 1):
            assert terms["pi"].weight_at(step) == pytest.approx((1 - alpha) * 10.0)
            assert terms["lo"].weight_at(step) == pytest.approx(alpha * 9500.0)


def test_without_alw_the_lambdas_are_constant_and_pa_counts():
    args = SimpleNamespace(ALW=False, ref_epochs=120, pa_lambda=1.0, pi_lambda=100.0, lo_lambda=None,
                           ic_lambda=2.0, ics_mode="code")
    terms = train_kd.build_terms(args, 21, 3)
    assert [(t.name, t.weight_at(500)) for t in terms] == [("pa", 1.0), ("pi", 100.0), ("ic", 0.0)]
    assert [t.inputs for t in terms[:2]] == [("s.aspp", "t.aspp"), ("s.logits", "t.logits")]  # §2.5 feats[4]


def test_alw_ref_epochs_changes_alpha():
    args = SimpleNamespace(ALW=True, ref_epochs=10, pa_lambda=None, pi_lambda=10.0, lo_lambda=None,
                           ic_lambda=None, ics_mode="code")
    (pi,) = train_kd.build_terms(args, 21, 2)
    assert pi.weight_at(2 * 5) == pytest.approx(0.5 * 10.0)  # epoch 5 of ref 10


@pytest.mark.parametrize("flags, method", [
    (dict(pa_lambda=1.0, pi_lambda=100.0), "pa+kd"),  # the older README command
    (dict(pa_lambda=9500.0, pi_lambda=10.0, ALW=True), "alw+kd"),  # the README's AICSD command, as the code runs it
    (dict(lo_lambda=9500.0, pi_lambda=10.0, ALW=True), "aicsd"),  # the paper's AICSD (§4.5)
    (dict(lo_lambda=9500.0), "icsd"),
    (dict(pi_lambda=10.0), "kd"),
])
def test_method_names_say_what_the_total_contains(flags, method):
    args = SimpleNamespace(**{"pa_lambda": None, "pi_lambda": None, "lo_lambda": None, "ALW": False, **flags})
    assert train_kd.method_name(args) == method


class _FakeTrainer:
    def __init__(self):
        self.step, self.scalars = 0, {}


def test_lr_rule_is_poly_per_iteration_with_10x_on_later_groups():
    # §6.1 / §10 LR schedule: lr(T) = base (1 - T/N)^0.9; group 0 lr, groups >= 1 10 lr
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(2)]
    opt = torch.optim.SGD([{"params": [params[0]]}, {"params": [params[1]]}], lr=1.0)
    logger = SimpleNamespace(info=lambda msg: None)
    hook = aicsd.OriginalLR(lambda n: opt, "poly", 0.007, 40, 4, logger)
    hook.trainer = _FakeTrainer()
    for step in (0, 13, 39):
        hook.trainer.step = step
        hook.before_step()
        expected = 0.007 * (1 - step / 40) ** 0.9
        assert opt.param_groups[0]["lr"] == pytest.approx(expected)
        assert opt.param_groups[1]["lr"] == pytest.approx(10 * expected)


def test_cos_rule_is_half_cosine():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    hook = aicsd.OriginalLR(lambda n: opt, "cos", 0.01, 40, 4, SimpleNamespace(info=lambda msg: None))
    hook.trainer = _FakeTrainer()
    hook.trainer.step = 10
    hook.before_step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * 0.01 * (1 + math.cos(math.pi * 10 / 40)))


def test_saver_numbers_runs_numerically_past_experiment_9(tmp_path):
    # §2.9 / §9 Q17: the original's text sort picked experiment_9 after experiment_10 and reused a folder
    base = tmp_path / "run" / "pascal" / "deeplab-resnet18"
    for k in (0, 9, 10):
        (base / f"experiment_{k}").mkdir(parents=True)
    saver = aicsd.Saver(tmp_path, "pascal", "deeplab-resnet18")
    assert saver.experiment_dir == base / "experiment_11"


def test_saver_copies_model_best_only_when_it_beats_earlier_experiments(tmp_path):
    base = tmp_path / "run" / "pascal" / "x"
    (base / "experiment_0").mkdir(parents=True)
    (base / "experiment_0" / "best_pred.txt").write_text("0.5")
    saver = aicsd.Saver(tmp_path, "pascal", "x")
    saver.save_checkpoint({"best_pred": 0.4, "epoch": 1}, is_best=True)
    assert (saver.experiment_dir / "best_pred.txt").read_text() == "0.4"
    assert not (base / "model_best.pth.tar").exists()
    saver.save_checkpoint({"best_pred": 0.6, "epoch": 2}, is_best=True)
    assert torch.load(base / "model_best.pth.tar", weights_only=True)["epoch"] == 2


def test_parameters_txt_has_the_original_keys(tmp_path):
    # §2.9: key:value lines for datset (sic), backbone, out_stride, lr, lr_scheduler, loss_type, epoch, base_size,
    # crop_size
    args = defaults([])
    saver = aicsd.Saver(tmp_path, "pascal", args.checkname)
    saver.save_experiment_config(args)
    lr = 0.007 / (6 * 1) * 6  # §2.1: the original's float, printed with str()
    assert (saver.experiment_dir / "parameters.txt").read_text() == (
        f"datset:pascal\nbackbone:resnet18\nout_stride:16\nlr:{lr}\nlr_scheduler:poly\nloss_type:ce\nepoch:50\n"
        "base_size:513\ncrop_size:513\n")


def test_fwiou_by_hand():
    # rows = GT: class 0 has 4 pixels (3 right), class 1 has 2 (both right): IoU 3/4 and 2/3, freq 4/6 and 2/6
    assert aicsd.fw_iou(np.array([[3.0, 1.0], [0.0, 2.0]])) == pytest.approx(4 / 6 * 3 / 4 + 2 / 6 * 2 / 3)


def test_val_samples_are_scored_at_the_resized_size():
    # §7: scoring at the resized resolution; a 48x64 image at short side 33 becomes 33 x int(33*64/48) = 33x44
    class One(torch.utils.data.Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, i):
            return np.zeros((3, 33, 44), np.float32), np.zeros((33, 44), np.float32), np.array((48, 64, 3)), "a"

    assert tuple(aicsd.ScoredAtResizedSize(One())[0][2]) == (33, 44)


def test_steps_per_epoch_keeps_the_last_partial_batch():
    assert aicsd.steps_per_epoch(list(range(1464)), 6, cpu_info()) == 244  # §6.2: 1464/6
    assert aicsd.steps_per_epoch(list(range(2975)), 6, cpu_info()) == 496  # §3.5: last batch of 5


# ----------------------------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    from common.datasets.synthetic import make_voc

    root = tmp_path_factory.mktemp("voc")
    make_voc(root, splits={"train": 4, "val": 2}, sbd={"train": 2, "val": 1}, size=(48, 64), seed=0)
    return root


def base(voc, tmp_path):
    return ["--data-dir", str(voc), "--crop-size", "33", "--base-size", "33", "--batch-size", "2", "--epochs", "1",
            "--workers", "0", "--imagenet-weights", "none", "--device", "cpu", "--save-dir", str(tmp_path / "s")]


def voc_without_segmentation_class(voc, tmp_path):
    root = tmp_path / "voc"
    shutil.copytree(voc, root)
    shutil.rmtree(root / "SegmentationClass")
    return ["--data-dir", str(root)]


def sbd_without_gtcls(voc, tmp_path):
    import scipy.io

    sbd = tmp_path / "sbd"
    shutil.copytree(voc / "benchmark_RELEASE", sbd)
    for mat in (sbd / "dataset" / "cls").glob("*.mat"):
        scipy.io.savemat(mat, {"GTinst": np.zeros((2, 2))})
    return ["--use-sbd", "--sbd-dir", str(sbd), "--batch-size", "5"]  # 4 VOC + 1 new SBD id: all in the first batch


def teacher_without_state_dict(voc, tmp_path):
    path = tmp_path / "teacher.pth.tar"
    torch.save({"model": {"w": torch.zeros(1)}}, path)
    return ["--teacher_path", str(path), "--teacher-backbone", "resnet18", "--pi_lambda", "10"]


BAD_INPUT = [  # issue 11 "Bad input": (script, extra flags or a builder, words of the one sentence)
    ("train", ["--backbone", "resnet"], "stale train_voc.sh spelling"),
    ("train", ["--backbone", "xception"], "not rebuilt"),
    ("train", ["--out-stride", "32"], "--out-stride 32"),
    ("train", ["--dataset", "coco"], "NotImplementedError"),
    ("train", ["--batch-size", "1"], "cannot train on one image"),
    ("train", ["--lr-scheduler", "step"], "lr_step"),
    ("train", voc_without_segmentation_class, "SegmentationClass"),
    ("train", sbd_without_gtcls, "GTcls"),
    ("train_kd", teacher_without_state_dict, "no 'state_dict'"),
    ("train_kd", ["--teacher_path", "/nonexistent/teacher.pth.tar", "--pi_lambda", "10"], "not found"),
    ("train", ["--imagenet-weights", "/nonexistent/resnet18.pth"], "not found"),
]


@pytest.mark.parametrize("script, extra, words", BAD_INPUT, ids=[f"{s}:{w}" for s, _, w in BAD_INPUT])
def test_bad_input_stops_with_one_sentence(script, extra, words, voc, tmp_path, capsys):
    flags = extra(voc, tmp_path) if callable(extra) else extra
    with pytest.raises(SystemExit) as exit_info:
        (train_kd if script == "train_kd" else train).main(base(voc, tmp_path) + flags)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and words in err


def test_balanced_weights_are_inverse_log_frequency_and_cached(tmp_path):
    # §2.1 --use-balanced-weights: w_c = 1 / ln(1.02 + f_c); 255 is not counted
    label = np.array([[0, 0, 0], [1, 255, 255]], np.float32)
    samples = [(None, label)]
    args = SimpleNamespace(data_dir=str(tmp_path), dataset="pascal")
    weights = aicsd.class_weights(samples, args, 3)
    expected = [1 / math.log(1.02 + 3 / 4), 1 / math.log(1.02 + 1 / 4), 1 / math.log(1.02)]
    assert weights == pytest.approx(expected)
    assert np.load(tmp_path / "pascal_classes_weights.npy") == pytest.approx(expected)

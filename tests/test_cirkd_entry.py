"""CIRKD train_baseline.py / eval.py / test.py end to end on tiny synthetic data (CPU, one process).

Expected values come from specs/cirkd.md (sections in the comments) or are computed by hand in the test.
"""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.datasets import synthetic

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cirkd import eval as cirkd_eval  # noqa: E402
from cirkd import test as cirkd_test  # noqa: E402
from cirkd import train_baseline  # noqa: E402
from common.recipes.cirkd import padded_shard  # noqa: E402

# cirkd.md §1.6: the trainId -> labelId map of test.py
LABEL_IDS = {7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33}
NUM_CLASSES = {"citys": 19, "voc": 21, "camvid": 11, "ade20k": 150, "coco_stuff_164k": 182}  # cirkd.md §4.2


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """``--dataset`` -> (root, extra flags) for the five layouts, tiny."""
    root = tmp_path_factory.mktemp("cirkd_entry")
    citys = synthetic.make_cityscapes(root / "citys", {"train": 2, "val": 1, "test": 2}, size=(64, 128))
    camvid = synthetic.make_camvid(root / "camvid", {"train": 2, "val": 1, "test": 2}, size=(48, 64), cirkd_lists=True)
    voc = synthetic.make_voc(root / "voc", {"train": 2, "val": 1}, size=(48, 64))
    synthetic.make_ade20k(root / "ade20k", {"train": 2, "val": 1}, size=(48, 64))
    coco = synthetic.make_coco_stuff(root / "coco", {"train": 2, "val": 1}, size=(48, 64))
    return {
        "citys": (root / "citys", ["--train-list", citys["train"], "--val-list", citys["val"]]),
        "camvid": (root / "camvid", ["--train-list", camvid["train"], "--val-list", camvid["val"]]),
        "voc": (root / "voc", ["--train-list", voc["train_aug"], "--val-list", voc["val"]]),
        "ade20k": (root / "ade20k", []),
        "coco_stuff_164k": (root / "coco", ["--train-list", coco["train"], "--val-list", coco["val"]]),
        "camvid_test_list": camvid["test"],
        "citys_test_list": citys["test"],
    }


def train_args(datasets, dataset, out, *extra, iters=2, model=("deeplabv3", "resnet18")):
    root, lists = datasets[dataset]
    return ["--model", model[0], "--backbone", model[1], "--dataset", dataset, "--data", str(root), *lists,
            "--crop-size", "32", "32", "--batch-size", "2", "--max-iterations", str(iters), "--val-per-iters", "2",
            "--save-per-iters", "2", "--log-iter", "1", "-j", "0", "--pretrained-base", "None",
            "--save-dir", str(out / "ckpt"), "--log-dir", str(out / "logs"), "--device", "cpu", *extra]


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("dataset", ["citys", "camvid", "voc", "ade20k", "coco_stuff_164k"])
def test_train_baseline_writes_the_original_files_on_each_dataset(datasets, dataset, tmp_path):
    train_baseline.main(train_args(datasets, dataset, tmp_path))
    stem = f"deeplabv3_resnet18_{dataset}"  # cirkd.md §1.2 step 8: {model}_{backbone}_{dataset}
    ckpt = tmp_path / "ckpt"
    latest = torch.load(ckpt / f"{stem}.pth", weights_only=True)
    assert not any(k.startswith("module.") for k in latest) and "auxlayer.block.4.weight" in latest
    assert latest["head.block.4.weight"].shape[0] == NUM_CLASSES[dataset]
    assert (ckpt / f"{stem}_best_model.pth").is_file()
    log = (tmp_path / "logs" / f"{stem}_log.txt").read_text()
    assert "Iters: 1/2 || Lr: 0.020000 || Task Loss:" in log and "Params: 13.6" in log
    result = json.loads((ckpt / f"{stem}_run" / "results.json").read_text())
    assert (result["paper"], result["method"], result["model"]) == ("cirkd", "baseline", "deeplabv3_resnet18")
    assert result["split"] == "val" and len(result["iou"]) == NUM_CLASSES[dataset]
    assert result["extra"]["best_iteration"] == 2


def test_poly_lr_is_set_before_each_step_from_iteration_one(datasets, tmp_path):
    train_baseline.main(train_args(datasets, "camvid", tmp_path, "--skip-val", iters=4))
    lrs = [m["G_lr"] for m in metrics(tmp_path / "ckpt" / "deeplabv3_resnet18_camvid_run")]
    # cirkd.md §4.3: lr_it = 0.02 (1 - (it - 1)/N)^0.9 for it = 1..N, N = 4
    assert lrs == pytest.approx([0.02, 0.02 * 0.75 ** 0.9, 0.02 * 0.5 ** 0.9, 0.02 * 0.25 ** 0.9], rel=1e-12)


def test_mobile_model_has_no_aux_term_and_keeps_the_misspelt_backbone_name(datasets, tmp_path):
    train_baseline.main(train_args(datasets, "camvid", tmp_path, "--skip-val", model=("deeplab_mobile", "mobilenev2")))
    state = torch.load(tmp_path / "ckpt" / "deeplab_mobile_mobilenev2_camvid.pth", weights_only=True)  # §1.2 step 8
    assert not any(k.startswith("auxlayer.") for k in state)


def test_skip_val_writes_no_best_model(datasets, tmp_path):
    train_baseline.main(train_args(datasets, "camvid", tmp_path, "--skip-val"))
    assert (tmp_path / "ckpt" / "deeplabv3_resnet18_camvid.pth").is_file()
    assert not (tmp_path / "ckpt" / "deeplabv3_resnet18_camvid_best_model.pth").exists()


def test_train_baseline_writes_the_latest_checkpoint_at_every_validation(datasets, tmp_path, monkeypatch):
    # the original's validation calls save_checkpoint(model, args, is_best) every time: the latest file is written
    # after each validation, the best copy only when the mIoU improves (here 0.5, then a worse 0.4)
    from common.recipes import cirkd as recipe

    events, scores = [], iter([0.5, 0.4])

    def fake_evaluate(*args, **kwargs):
        events.append("val")
        return recipe.Scores(0.0, next(scores), [], 0.0, 1)

    def recording_save(state, path):
        events.append(Path(path).name)
        torch.save(state, path)

    monkeypatch.setattr(recipe, "evaluate", fake_evaluate)
    monkeypatch.setattr(recipe, "atomic_save", recording_save)
    train_baseline.main(train_args(datasets, "camvid", tmp_path, "--val-per-iters", "1", "--save-per-iters", "100"))
    latest = "deeplabv3_resnet18_camvid.pth"
    kept = [e for e in events if e in ("val", latest)]
    assert kept.count("val") == 2 and all(kept[i + 1] == latest for i, e in enumerate(kept) if e == "val")
    assert kept.count(latest) == 3  # after each validation and the final save
    assert json.loads((tmp_path / "ckpt" / "deeplabv3_resnet18_camvid_run" / "results.json").read_text())[
        "extra"]["best_iteration"] == 1


def test_resume_state_continues_identically(datasets, tmp_path, monkeypatch):
    full = tmp_path / "full"
    train_baseline.main(train_args(datasets, "camvid", full, "--skip-val", iters=4))

    from common.engine.step import TrainStep

    original_call = TrainStep.__call__

    def stop_at_two(self, batch, step):
        if step == 2:
            raise KeyboardInterrupt
        return original_call(self, batch, step)

    part = tmp_path / "part"
    monkeypatch.setattr(TrainStep, "__call__", stop_at_two)
    with pytest.raises(KeyboardInterrupt):
        train_baseline.main(train_args(datasets, "camvid", part, "--skip-val", iters=4))
    monkeypatch.setattr(TrainStep, "__call__", original_call)
    state = part / "ckpt" / "deeplabv3_resnet18_camvid_run" / "training_state.pth"
    train_baseline.main(train_args(datasets, "camvid", part, "--skip-val", "--resume-state", str(state), iters=4))

    a = torch.load(full / "ckpt" / "deeplabv3_resnet18_camvid.pth", weights_only=True)
    b = torch.load(part / "ckpt" / "deeplabv3_resnet18_camvid.pth", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [m["step"] for m in metrics(part / "ckpt" / "deeplabv3_resnet18_camvid_run")] == [0, 1, 2, 3]


def test_original_resume_loads_weights_and_ignores_a_missing_file(datasets, tmp_path):
    first = tmp_path / "first"
    train_baseline.main(train_args(datasets, "camvid", first, "--skip-val"))
    weights = first / "ckpt" / "deeplabv3_resnet18_camvid.pth"
    second = tmp_path / "second"
    train_baseline.main(train_args(datasets, "camvid", second, "--skip-val", "--resume", str(weights)))
    assert f"Resuming training, loaded {weights}" in (second / "logs" / "deeplabv3_resnet18_camvid_log.txt").read_text()
    third = tmp_path / "third"
    train_baseline.main(train_args(datasets, "camvid", third, "--skip-val", "--resume", str(tmp_path / "nope.pth")))
    assert (third / "ckpt" / "deeplabv3_resnet18_camvid.pth").is_file()


@pytest.fixture(scope="module")
def camvid_model(datasets, tmp_path_factory):
    out = tmp_path_factory.mktemp("camvid_model")
    train_baseline.main(train_args(datasets, "camvid", out))
    return out / "ckpt" / "deeplabv3_resnet18_camvid_best_model.pth"


def eval_args(datasets, checkpoint, out, *extra):
    return ["--dataset", "camvid", "--data", str(datasets["camvid"][0]), "--data-list", datasets["camvid_test_list"],
            "--pretrained", str(checkpoint), "--save-dir", str(out), "-j", "0", "--device", "cpu", *extra]


def test_eval_reports_the_camvid_test_split_with_the_training_run_settings(datasets, camvid_model, tmp_path):
    cirkd_eval.main(eval_args(datasets, camvid_model, tmp_path, "--save-pred", "--blend", "--scales", "0.5", "1.0",
                              "--flip-eval"))
    result = json.loads((tmp_path / "deeplabv3_resnet18_camvid_best_model_test" / "results.json").read_text())
    assert result["split"] == "test" and result["method"] == "baseline"  # cirkd.md §1.5: CamVid on the test list
    assert result["iterations"] == 2 and result["crop"] == [32, 32] and result["extra"]["scales"] == [0.5, 1.0]
    log = (tmp_path / "deeplabv3_resnet18_camvid_multiscale_val.txt").read_text()
    assert f"Overall validation pixAcc: {result['pixel_acc'] * 100:.3f}, mIoU: {result['miou'] * 100:.3f}" in log
    preds = sorted(p.name for p in (tmp_path / "deeplabv3_resnet18_camvid").iterdir())
    assert preds == ["Seq05VD_000000.png", "Seq05VD_000001.png"]  # --blend: the blend under the image's own name
    png = Image.open(tmp_path / "deeplabv3_resnet18_camvid" / "Seq05VD_000000.png")
    assert png.mode == "RGB" and png.size == (64, 48)


def test_eval_corrected_metric_is_flagged_in_results(datasets, camvid_model, tmp_path):
    cirkd_eval.main(eval_args(datasets, camvid_model, tmp_path, "--corrected-metric"))
    result = json.loads((tmp_path / "deeplabv3_resnet18_camvid_best_model_test" / "results.json").read_text())
    assert result["extra"]["metric"] == "corrected"


def test_metric_quirks_by_default_and_corrected_behind_the_flag():
    from common.recipes.cirkd import make_metric

    # cirkd.md §9: logits 0.9/0.1/0.95, target 2 -> pixAcc 0 (argmax of the truncated logits is class 0)
    logits = torch.tensor([0.9, 0.1, 0.95]).view(1, 3, 1, 1)
    target = torch.tensor([[[2]]])
    faithful, corrected = make_metric(3), make_metric(3, corrected=True)
    faithful.update(logits, target)
    corrected.update(logits, target)
    # one predicted/true class out of 3: mIoU 1/3 with absent classes as 0, 1 over the classes present
    assert faithful.get() == pytest.approx((0.0, 1 / 3))
    assert corrected.get() == pytest.approx((1.0, 1.0))


def test_padded_shard_reproduces_the_distributed_sampler():
    # cirkd.md §5.1: 500 images over 8 ranks are padded to 504, so 4 images are counted twice
    shards = [padded_shard(500, r, 8) for r in range(8)]
    assert [len(s) for s in shards] == [63] * 8
    assert shards[0] == list(range(63)) and shards[7] == list(range(441, 500)) + [0, 1, 2, 3]
    flat = sum(shards, [])
    assert sorted(set(flat)) == list(range(500)) and len(flat) - len(set(flat)) == 4


def test_test_py_writes_labelid_pngs_for_the_server(datasets, tmp_path):
    from common.models import build_model

    torch.manual_seed(0)
    ckpt = tmp_path / "deeplabv3_resnet18_citys_best_model.pth"
    torch.save(build_model("deeplabv3_resnet18", num_classes=19).state_dict(), ckpt)
    cirkd_test.main(["--data", str(datasets["citys"][0]), "--data-list", datasets["citys_test_list"],
                     "--pretrained", str(ckpt), "--save-dir", str(tmp_path / "out"), "--save-pred", "-j", "0",
                     "--device", "cpu"])
    folder = tmp_path / "out" / "deeplabv3_resnet18_citys_kd"  # §1.6: {model}_{backbone}_{dataset}_{method}
    pngs = sorted(folder.glob("*.png"))
    assert [p.name for p in pngs] == ["berlin_000000_000019_leftImg8bit.png", "bielefeld_000000_000020_leftImg8bit.png"]
    image = Image.open(pngs[0])
    assert image.mode == "L" and image.size == (128, 64)
    assert set(np.unique(np.asarray(image)).tolist()) <= LABEL_IDS


# ------------------------------------------------------------------------------------------------ bad input
def _other_network(tmp_path):
    from common.models import build_model

    path = tmp_path / "psp.pth"
    torch.save(build_model("cirkd_pspnet_resnet18", num_classes=11).state_dict(), path)
    return str(path)


BAD_TRAIN = [  # (dataset, extra flags, part of the one-sentence error)
    ("camvid", lambda t: ["--model", "fcn"], "unknown --model 'fcn'"),
    ("camvid", lambda t: ["--backbone", "vgg16"], "unknown backbone 'vgg16'"),
    ("camvid", lambda t: ["--backbone", "resnet50"], "is not rebuilt"),
    ("camvid", lambda t: ["--pretrained", _other_network(t)], "does not match the model (missing keys: head.aspp"),
    ("camvid", lambda t: ["--pretrained-base", str(t / "missing.pth")], "ImageNet backbone file --pretrained-base"),
    ("ade20k", lambda t: ["--data", str(t / "nowhere")], "nowhere"),
    ("camvid", lambda t: ["--max-iterations", "0"], "--max-iterations must be a positive"),
    ("camvid", lambda t: ["--batch-size", "1"], "--batch-size 1 is too small"),
    ("camvid", lambda t: ["--ignore-label", "255"], "--ignore-label must be -1"),
]


@pytest.mark.parametrize("dataset,extra,message", BAD_TRAIN)
def test_train_baseline_bad_input_is_one_sentence_and_writes_nothing(datasets, tmp_path, capsys, dataset, extra,
                                                                     message):
    with pytest.raises(SystemExit) as exc:
        train_baseline.main(train_args(datasets, dataset, tmp_path) + extra(tmp_path))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "logs").exists()


@pytest.mark.parametrize("argv,message", [
    (["--crop-size", "512"], "--crop-size: expected 2 arguments"),
    (["--dataset", "kitti"], "invalid choice: 'kitti'"),
])
def test_train_baseline_malformed_flags_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        train_baseline.main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_eval_with_a_checkpoint_of_another_network_names_the_keys(datasets, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cirkd_eval.main(eval_args(datasets, _other_network(tmp_path), tmp_path / "out"))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "checkpoint --pretrained" in err and "missing keys: head.aspp" in err
    assert not (tmp_path / "out").exists()

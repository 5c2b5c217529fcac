"""common.train_baseline end to end on synthetic Cityscapes: train, checkpoint, results.json, exact resume."""
import json

import pytest
import torch

import common.losses.segmentation as seg_losses
from common.errors import main_guard
from common.train_baseline import main

pytestmark = pytest.mark.usefixtures("one_thread")


def _argv(data, save_dir, *extra):
    return ["--model", "pspnet_resnet18", "--norm", "bn", "--data-dir", str(data),
            "--data-list", str(data / "lists" / "train.lst"), "--data-listval", str(data / "lists" / "val.lst"),
            "--input-size", "64,64", "--batch-size", "2", "--num-steps", "4", "--save-every", "2",
            "--num-workers", "0", "--device", "cpu", "--seed", "3", "--save-dir", str(save_dir),
            *extra]


def _losses(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"], r["G_lr"]) for r in map(json.loads, lines)]


@pytest.mark.slow
def test_resume_continues_identically(synthetic_cityscapes, tmp_path, monkeypatch):
    data = synthetic_cityscapes
    full, split = tmp_path / "full", tmp_path / "split"
    main(_argv(data, full))
    ref = _losses(full)
    assert [s for s, _, _ in ref] == [0, 1, 2, 3]
    assert len({loss for _, loss, _ in ref}) == 4  # different batches, different losses
    result = json.loads((full / "results.json").read_text())
    assert (result["paper"], result["method"], result["model"]) == ("ifvd", "baseline", "pspnet_resnet18")
    assert (result["iterations"], result["crop"], result["batch"], result["seed"]) == (4, [64, 64], 2, 3)
    assert 0.0 <= result["miou"] <= 1.0 and len(result["iou"]) == 19

    # the same run, killed during step 2 (after the step-2 checkpoint), then resumed in place
    real_forward, calls = seg_losses.CriterionDSN.forward, []

    def crash_on_third_step(self, preds, target):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated crash")
        return real_forward(self, preds, target)

    monkeypatch.setattr(seg_losses.CriterionDSN, "forward", crash_on_third_step)
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(_argv(data, split))
    monkeypatch.setattr(seg_losses.CriterionDSN, "forward", real_forward)
    assert torch.load(split / "training_state.pth", weights_only=True)["step"] == 2
    assert not (split / "results.json").exists()
    torch.manual_seed(12345)  # the resume must restore the RNGs, not rely on them
    main(_argv(data, split, "--resume", str(split / "training_state.pth")))

    assert _losses(split) == ref  # steps 0-1 from the first part, 2-3 resumed: bitwise equal on CPU
    w_full = torch.load(full / "CS_scenes_4.pth", weights_only=True)
    w_split = torch.load(split / "CS_scenes_4.pth", weights_only=True)
    assert w_full.keys() == w_split.keys()
    assert all(torch.equal(w_full[k], w_split[k]) for k in w_full)
    assert json.loads((split / "results.json").read_text())["miou"] == result["miou"]


def _exit_line(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        main_guard(main)(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_bad_input_exits_2_with_one_line(synthetic_cityscapes, tmp_path, capsys, monkeypatch):
    data = synthetic_cityscapes
    monkeypatch.delenv("CITYSCAPES", raising=False)
    assert "does not exist" in _exit_line(capsys, _argv(tmp_path / "no_such_dir", tmp_path / "r"))
    argv = _argv(data, tmp_path / "r")
    argv[argv.index("--data-dir"):argv.index("--data-dir") + 2] = []
    assert "--data-dir" in _exit_line(capsys, argv)
    assert "nope.pth" in _exit_line(capsys, _argv(data, tmp_path / "r", "--resume", str(tmp_path / "nope.pth")))
    argv = _argv(data, tmp_path / "r")
    argv[argv.index("pspnet_resnet18")] = "pspnet_resnet9000"
    assert "pspnet_resnet9000" in _exit_line(capsys, argv)
    bare = tmp_path / "bare.pth"
    torch.save({"w": torch.zeros(1)}, bare)
    assert "not a segkd training state" in _exit_line(capsys, _argv(data, tmp_path / "r", "--resume", str(bare)))
    state = tmp_path / "r" / "training_state.pth"
    from common.engine import save_training_state
    from common.models import build_model

    model = build_model("pspnet_resnet18", norm="bn")
    save_training_state(state, step=2, state={"modules": {"student": model.state_dict()}, "optimizers": {}},
                        run={"model": "pspnet_resnet18", "seed": 3, "num_steps": 4, "batch_size": 2, "world_size": 1})
    err = _exit_line(capsys, _argv(data, tmp_path / "r", "--resume", str(state), "--num-steps", "8"))
    assert "num_steps=4" in err and "num_steps=8" in err
    if not torch.cuda.is_available():
        assert "CUDA" in _exit_line(capsys, _argv(data, tmp_path / "r", "--device", "cuda"))


def test_resume_at_the_end_writes_the_missing_final_weights(synthetic_cityscapes, tmp_path):
    """A kill while the final CS_scenes_<N>.pth is written (simulated: the file deleted after the run) is repaired
    by resuming from the final training_state.pth: the weights are written again, no step runs, results.json is
    not recomputed (issue 13 item 9)."""
    run = tmp_path / "run"
    argv = _argv(synthetic_cityscapes, run, "--num-steps", "2")
    main(argv)
    weights = run / "CS_scenes_2.pth"
    expected = torch.load(weights, weights_only=True)
    weights.unlink()
    results_mtime = (run / "results.json").stat().st_mtime_ns
    main(argv + ["--resume", str(run / "training_state.pth")])
    restored = torch.load(weights, weights_only=True)
    assert restored.keys() == expected.keys() and all(torch.equal(restored[k], expected[k]) for k in expected)
    assert (run / "results.json").stat().st_mtime_ns == results_mtime
    assert [s for s, _, _ in _losses(run)] == [0, 1]

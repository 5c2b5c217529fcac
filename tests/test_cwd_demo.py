"""cwd/demo.py pieces (issue 13 item 6): the cache test of a finished run, the Cityscapes colouring and the
predictions picture (three val images: image | ground truth | one column per model)."""
import numpy as np
import torch
from PIL import Image
from torch import nn

from common.datasets.cityscapes import read_label
from common.datasets.synthetic import make_cityscapes
from common.tables.schema import make_result, write_results
from cwd import demo

SCHEDULE = {"model": "pspnet_resnet18", "steps": 300, "crop": (64, 64), "batch": 4}


def _write_run(folder, model="pspnet_resnet18", iterations=300, crop=(64, 64), batch=4, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    write_results(folder / "results.json", make_result(
        paper="cwd", method="teacher", model=model, dataset="cityscapes", split="val", miou=0.5,
        iterations=iterations, crop=list(crop), batch=batch, seed=seed))


def test_finished_run_of_the_same_schedule_is_reused(tmp_path):
    _write_run(tmp_path / "same")
    assert demo.is_done(tmp_path / "same", SCHEDULE)


def test_missing_or_other_schedule_is_retrained(tmp_path):
    assert not demo.is_done(tmp_path / "nothing", SCHEDULE)
    for name, kw in (("model", {"model": "pspnet_resnet101"}), ("steps", {"iterations": 140}),
                     ("crop", {"crop": (96, 96)}), ("batch", {"batch": 2}),
                     ("seed", {"seed": 1})):
        _write_run(tmp_path / name, **kw)
        assert not demo.is_done(tmp_path / name, SCHEDULE), name


def test_colourise_is_the_cityscapes_palette_and_ignore_is_black():
    # trainId 0 road (128, 64, 128), 13 car (0, 0, 142), 18 bicycle (119, 11, 32): the Cityscapes colours
    label = np.array([[0, 18], [255, 13]])
    assert demo.colourise(label).tolist() == [[[128, 64, 128], [119, 11, 32]], [[0, 0, 0], [0, 0, 142]]]


class ConstantModel(nn.Module):
    """Predicts class ``k`` everywhere, at stride 8 like PSPNet (a one-element output list)."""

    def __init__(self, k):
        super().__init__()
        self.k = k

    def forward(self, x):
        logits = torch.zeros(x.shape[0], 19, x.shape[2] // 8, x.shape[3] // 8)
        logits[:, self.k] = 1.0
        return [logits]


def test_predictions_picture_rows_and_columns(tmp_path):
    data = tmp_path / "data"
    make_cityscapes(data, splits={"train": 1, "val": 4, "test": 1}, size=(64, 128), seed=0)
    models = {"teacher": ConstantModel(0), "baseline": ConstantModel(13), "CWD": ConstantModel(18)}
    path = demo.write_predictions(tmp_path / "out" / "predictions.png", data, models, count=3)
    picture = np.asarray(Image.open(path).convert("RGB"))
    band = picture.shape[0] - 3 * 64
    assert picture.shape == (band + 3 * 64, 5 * 128, 3) and 0 < band < 64
    lines = [line.split("\t") for line in (data / "lists" / "val.lst").read_text().splitlines()]
    for row, (image_rel, label_rel) in enumerate(lines[:3]):
        tiles = [picture[band + 64 * row: band + 64 * (row + 1), 128 * c: 128 * (c + 1)] for c in range(5)]
        assert (tiles[0] == np.asarray(Image.open(data / image_rel).convert("RGB"))).all()
        assert (tiles[1] == demo.colourise(read_label(str(data / label_rel)))).all()
        for tile, colour in zip(tiles[2:], ((128, 64, 128), (0, 0, 142), (119, 11, 32))):
            assert (tile == colour).all()

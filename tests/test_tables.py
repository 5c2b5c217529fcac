"""common.tables: results.json schema, reported numbers (checked against the specs' text), renderer, Params/FLOPs."""
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from common.tables.__main__ import default_roots, main
from common.tables.flops import cirkd_macs, model_complexity
from common.tables.render import DEMO_LABEL, fmt_reported, load_reported, render_all, render_paper
from common.tables.schema import (
    PAPERS,
    RESULT_FIELDS,
    find_results,
    make_result,
    read_results,
    write_results,
)

SPECS = Path(__file__).resolve().parents[1].parent / "shared" / "specs"
BASE = dict(paper="cwd", method="cwd", model="pspnet_resnet18", dataset="cityscapes", split="val", miou=0.7487,
            iterations=40000, crop=(512, 512), batch=8, seed=0)


# ---------------------------------------------------------------- schema
def test_make_result_fills_and_validates(monkeypatch):
    monkeypatch.delenv("SEGKD_DEMO", raising=False)
    res = make_result(**BASE, iou=[0.5] * 19, extra={"level": "logits"})
    assert set(res) == set(RESULT_FIELDS)
    assert res["scale"] == "full" and res["crop"] == [512, 512] and res["code_version"]
    assert res["schema_version"] == 1 and res["created"].endswith("+00:00")
    monkeypatch.setenv("SEGKD_DEMO", "1")
    assert make_result(**BASE)["scale"] == "demo"
    numpy_typed = make_result(**dict(BASE, miou=np.float32(0.5), seed=np.int64(3), iou=[np.float32(0.25), None]))
    assert json.loads(json.dumps(numpy_typed))["seed"] == 3 and numpy_typed["iou"] == [0.25, None]
    bad = [dict(BASE, miou=74.87), dict(BASE, paper="psp"), dict(BASE, scale="half"), dict(BASE, unknown=1),
           {k: v for k, v in BASE.items() if k != "seed"}, dict(BASE, iterations=1.5), dict(BASE, method=""),
           dict(BASE, iou=[0.5, 2.0]), dict(BASE, pixel_acc=float("nan"))]
    for fields in bad:
        with pytest.raises(ValueError):
            make_result(**fields)


def test_write_read_find_results(tmp_path):
    res = make_result(**BASE)
    path = write_results(tmp_path / "a" / "b" / "results.json", res)
    assert read_results(path) == res
    assert write_results(tmp_path / "a", res) == tmp_path / "a" / "results.json"
    assert not list(tmp_path.rglob(".tmp-*"))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "results.json").write_text(json.dumps({"paper": "cwd"}))
    with pytest.raises(ValueError, match="missing"):
        read_results(tmp_path / "c" / "results.json")
    found = find_results(tmp_path)
    assert sorted(p.parent.name for p in found) == ["a", "b", "c"] and found == sorted(found)
    direct = (tmp_path / "a" / "results.json").resolve()
    assert find_results([tmp_path / "a" / "results.json", tmp_path / "nope"]) == [direct]


# ---------------------------------------------------------------- reported numbers are the specs' numbers
def _spec_texts(source: str) -> str:
    names = set(re.findall(r"[a-z_0-9]+\.md", source))
    assert names, f"source {source!r} names no spec file"
    return "\n".join((SPECS / n).read_text() for n in names)


def _reported_cells():
    for paper in PAPERS:
        data = load_reported(paper)
        for table in data["tables"]:
            for row in table["rows"]:
                for value in row["values"].values():
                    if value is not None:
                        yield paper, row.get("source", table["source"]), value, table.get("digits", 2)
        for block in data.get("per_class", []):
            for v in block["iou"]:
                yield paper, block["source"], v, block.get("digits", 2)


def test_reported_data_is_well_formed():
    for paper in PAPERS:
        data = load_reported(paper)
        assert data["paper"] == paper and data["tables"]
        for table in data["tables"]:
            keys = {c["key"] for c in table["columns"]}
            assert table["source"] and table["title"]
            for row in table["rows"]:
                assert set(row["values"]) <= keys, (paper, table["id"], row["label"])
        for entry in data.get("complexity", []):
            assert entry["source"] and entry["model"] and len(entry["input_size"]) == 2


@pytest.mark.skipif(not SPECS.is_dir(), reason="specs not found beside the repository (../shared/specs)")
def test_every_reported_number_appears_in_its_cited_spec():
    cache = {}
    checked = 0
    for paper, source, value, digits in _reported_cells():
        text = cache.setdefault(source, _spec_texts(source))
        cell = value if isinstance(value, dict) else {"value": value}
        d = cell.get("digits", digits)
        for v in (cell["value"], cell.get("std")):
            if v is not None:
                assert f"{v:.{d}f}" in text, (paper, source, v)
                checked += 1
    for paper in PAPERS:
        for entry in load_reported(paper).get("complexity", []):
            text = _spec_texts(entry["source"])
            if entry.get("params"):
                p = entry["params"]
                assert f"{p:,}" in text or f"{p:,}".replace(",", " ") in text, (paper, entry["model"])
            for key in ("params_m", "params_m_no_aux", "gflops"):
                if entry.get(key) is not None:
                    assert f"{entry[key]}" in text, (paper, entry["model"], key)
    assert checked > 200


def test_per_class_lists_average_to_their_miou():
    for paper in PAPERS:
        for block in load_reported(paper).get("per_class", []):
            assert len(block["iou"]) == len(block["classes"]) == 19
            stated = float(re.findall(r"(\d+\.\d+)\)?$", block["label"])[0])
            assert abs(sum(block["iou"]) / 19 - stated) < 0.05, block["label"]


def test_fmt_reported_keeps_published_precision():
    assert fmt_reported(69.1) == "69.10" and fmt_reported({"value": 75.3, "digits": 1}) == "75.3"
    assert fmt_reported({"value": 69.13, "std": 0.11}) == "69.13 ± 0.11" and fmt_reported(None) == "–"


# ---------------------------------------------------------------- renderer
def _write(root, name, **fields):
    write_results(root / name / "results.json", make_result(**{**BASE, **fields}))


def _row(text, label):
    line = next(ln for ln in text.splitlines() if ln.startswith(f"| {label} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def _header(text, first_label):
    lines = text.splitlines()
    idx = next(i for i, ln in enumerate(lines) if ln.startswith(f"| {first_label} |"))
    while not lines[idx - 1].startswith("|---"):
        idx -= 1
    return [c.strip() for c in lines[idx - 2].strip("|").split("|")]


def test_render_reported_beside_measured_and_demo_kept_apart(tmp_path):
    for seed, miou in ((0, 0.74), (1, 0.76)):
        _write(tmp_path, f"cwd_logits_s{seed}", seed=seed, miou=miou, scale="full", extra={"level": "logits"})
    _write(tmp_path, "cwd_demo", miou=0.30, scale="demo", extra={"level": "logits"})
    _write(tmp_path, "baseline", method="baseline", model="pspnet_resnet18", miou=0.69, scale="full", extra={})
    _write(tmp_path, "other_paper", paper="ifvd", method="cwd", miou=0.11, scale="full", extra={"level": "logits"})
    text = render_paper("cwd", render_all_results(tmp_path), complexity=False)
    header = _header(text, "Teacher")
    cd = dict(zip(header, _row(text, "CD (ours)")))
    assert cd["logits map: reported"] == "74.87" and cd["feature map: reported"] == "74.27"
    assert cd["logits map: measured"] == "75.00 ± 1.41 (n=2)"
    assert cd[f"logits map: {DEMO_LABEL}"] == "30.00"
    assert cd["feature map: measured"] == "—" and f"feature map: {DEMO_LABEL}" not in header
    student = dict(zip(header, _row(text, "Student")))
    # the no-KD student has no distillation level: it fills both columns ("any_column")
    assert student["feature map: measured"] == "69.00" and student["logits map: measured"] == "69.00"
    assert "11.00" not in text and "Measured results found: 3 full-scale, 1 demo-scale" in text
    table3 = _header(text, "False_False_False_channel_kl_3_5_v1 (logits, λ=3, τ=5)")
    assert not any(DEMO_LABEL in h for h in table3)


def render_all_results(root):
    from common.tables.render import load_results

    return load_results([root])


def test_render_skips_unreadable_results(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "results.json").write_text("{not json")
    _write(tmp_path, "ok", miou=0.5, extra={"level": "logits"})
    text = render_all(["cwd"], [tmp_path], complexity=False)
    assert "50.00" in text and "skipping" in capsys.readouterr().err


def test_cli_prints_tables_and_rejects_missing_dir(tmp_path, capsys, monkeypatch):
    _write(tmp_path, "run", miou=0.7, extra={"level": "logits"})
    out_file = tmp_path / "tables.md"
    main(["--results-dir", str(tmp_path), "--paper", "cwd", "--no-complexity", "--output", str(out_file)])
    out = capsys.readouterr().out
    assert "## CWD" in out and "## IFVD" not in out and "70.00" in out and out_file.read_text() == out
    with pytest.raises(SystemExit) as exc:
        main(["--results-dir", str(tmp_path / "missing"), "--no-complexity"])
    assert exc.value.code == 2 and "does not exist" in capsys.readouterr().err
    monkeypatch.setenv("SEGKD_RESULTS", f"{tmp_path}:/elsewhere")
    assert default_roots()[-2:] == [tmp_path, Path("/elsewhere")]


# ---------------------------------------------------------------- Params / FLOPs vs the specs
def _complexity_entries():
    seen = {}
    for paper in PAPERS:
        for entry in load_reported(paper).get("complexity", []):
            key = (entry["model"], entry["num_classes"], tuple(entry["input_size"]))
            seen.setdefault(key, (paper, entry))
    return list(seen.values())


@pytest.mark.parametrize("paper,entry", _complexity_entries(),
                         ids=[f"{p}-{e['model']}-{e['num_classes']}" for p, e in _complexity_entries()])
def test_params_and_flops_match_spec(paper, entry):
    args = (entry["model"], entry["num_classes"], tuple(entry["input_size"]))
    cx = model_complexity(*args)
    if cx is None:
        pytest.skip(f"model not registered: {entry['model']}")
    if entry.get("params"):
        assert cx.params == entry["params"]
    else:
        assert abs(cx.params / 1e6 - entry["params_m"]) <= 0.0005 + 1e-9, (cx.params, entry["params_m"])
    if entry.get("gflops") is not None:
        paper_cx = model_complexity(*args, convention=entry.get("flops_convention", "torch"))
        assert abs(paper_cx.gmacs - entry["gflops"]) <= 0.05 + 1e-9, (paper_cx.gmacs, entry["gflops"])


def test_flop_conventions_on_a_dilated_conv():
    conv = nn.Conv2d(8, 16, 3, padding=4, dilation=4, groups=2).to("meta")
    x = torch.zeros(1, 8, 32, 32, device="meta")
    with FlopCounterMode(display=False) as counter:
        conv(x)
    assert counter.get_total_flops() == 2 * 4 * 16 * 9 * 32 * 32  # true output 32×32
    assert cirkd_macs(conv, x) == 4 * 16 * 9 * 38 * 38  # CIRKD: (32 + 8 − 3)//1 + 1 = 38, dilation ignored


def test_model_complexity_unknown_model_is_none():
    assert model_complexity("no_such_model") is None


def psp_r18_conv_macs(side):
    """Multiply-adds of every convolution of PSPNet-R18 (§C.1) for a side×side input, counted by hand; BN,
    pooling and interpolation are not counted (FlopCounterMode counts convolutions and matmuls only)."""
    def out(n, stride):  # 3x3 convs pad 1 / 1x1 convs pad 0: ceil(n / stride)
        return (n - 1) // stride + 1

    s2 = out(side, 2)  # conv1, stride 2
    s4 = -(-(s2 - 1) // 2) + 1  # 3x3/2 max-pool, padding 1, ceil_mode
    s8 = out(s4, 2)  # layer2, stride 2; layers 3 and 4 are dilated
    convs = [(3, 64, 3, s2), (64, 64, 3, s2), (64, 128, 3, s2)]  # (in, out, kernel, output side)
    convs += [(128, 64, 3, s4), (64, 64, 3, s4), (128, 64, 1, s4), (64, 64, 3, s4), (64, 64, 3, s4)]
    for cin, planes in ((64, 128), (128, 256), (256, 512)):
        convs += [(cin, planes, 3, s8), (planes, planes, 3, s8), (cin, planes, 1, s8)]
        convs += [(planes, planes, 3, s8)] * 2
    convs += [(512, 128, 1, b) for b in (1, 2, 3, 6)]  # PSP stages at their bins
    convs += [(1024, 128, 3, s8), (128, 19, 1, s8), (256, 128, 3, s8), (128, 19, 1, s8)]  # bottleneck, head, dsn
    return sum(cin * cout * k * k * n * n for cin, cout, k, n in convs)


@pytest.mark.parametrize("side", [65, 97])
def test_pspnet_flops_are_twice_the_hand_counted_conv_macs(side):
    cx = model_complexity("pspnet_resnet18", 19, (side, side))
    assert cx.params == 13_068_262  # §C.1
    assert cx.flops == 2 * psp_r18_conv_macs(side)

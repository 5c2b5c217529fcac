"""Render each paper's tables: reported numbers (data, `reported/<paper>.json`) beside measured `results.json`.

Full-scale and demo-scale results never share a column: demo results get their own column labelled
"demo-scale, not a reproduction" (DESIGN.md "Benchmark tables"). Measured metrics are fractions and are
printed in %, with the mean ± std over the matching results (seeds) and their count.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from common.tables.flops import model_complexity
from common.tables.schema import PAPERS, find_results, read_results

REPORTED_DIR = Path(__file__).resolve().parent / "reported"
DEMO_LABEL = "demo-scale, not a reproduction"
MISSING = "—"


def load_reported(paper: str) -> dict:
    """The reported-numbers data of one paper (`common/tables/reported/<paper>.json`)."""
    if paper not in PAPERS:
        raise ValueError(f"unknown paper {paper!r}; choose one of {', '.join(PAPERS)}")
    return json.loads((REPORTED_DIR / f"{paper}.json").read_text())


def load_results(roots) -> list[dict]:
    """Every readable `results.json` under `roots`; unreadable files are reported on stderr and skipped."""
    results = []
    for path in find_results(roots):
        try:
            res = read_results(path)
        except (OSError, ValueError) as err:
            print(f"warning: skipping {path}: {err}", file=sys.stderr)
            continue
        res["_path"] = str(path)
        results.append(res)
    return results


def _lookup(result: dict, key: str):
    value = result
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return _ABSENT
        value = value[part]
    return value


_ABSENT = object()


def cell_match(paper: str, table: dict, row: dict, column: dict) -> dict:
    """The field=value conditions a result must meet to fill a cell: table, then column, then row (row wins).

    A row with ``"any_column": true`` (e.g. the teacher and the no-KD student, which have no
    distillation level) ignores the column's conditions and fills every column.
    """
    match = {"paper": paper}
    for key in ("dataset", "split"):
        if table.get(key) is not None:
            match[key] = table[key]
    match.update(table.get("match", {}))
    if not row.get("any_column"):
        match.update(column.get("match", {}))
    if "match" in row:
        match.update(row["match"])
    else:
        match["method"] = row["method"]
        if row.get("model"):
            match["model"] = row["model"]
    return match


def matching(results: list[dict], match: dict, scale: str) -> list[dict]:
    return [r for r in results if r.get("scale", "full") == scale
            and all(_lookup(r, k) == v for k, v in match.items())]


def fmt_reported(value, digits: int = 2) -> str:
    """A reported cell as published: number, or {"value", "std"?, "digits"?} (digits keep e.g. "75.3", "69.10")."""
    if value is None:
        return "–"
    if isinstance(value, dict):
        digits = value.get("digits", digits)
        text = f"{value['value']:.{digits}f}"
        if value.get("std") is not None:
            text += f" ± {value['std']:.{digits}f}"
        return text
    return f"{value:.{digits}f}"


def fmt_measured(results: list[dict], metric: str) -> str:
    values = [100.0 * r[metric] for r in results if r.get(metric) is not None]
    if not values:
        return MISSING
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.2f}"
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return f"{mean:.2f} ± {std:.2f} (n={len(values)})"


def _complexity_entry(data: dict, table: dict, model: str):
    entry = next((c for c in data.get("complexity", []) if c["model"] == model), None)
    num_classes = table.get("num_classes", entry["num_classes"] if entry else 19)
    input_size = table.get("input_size", entry["input_size"] if entry else [1024, 2048])
    return num_classes, tuple(input_size)


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def render_table(paper: str, data: dict, table: dict, results: list[dict], complexity: bool = True) -> list[str]:
    """One paper table: per column reported | measured (full) [| demo], then Params (M) | FLOPs (G)."""
    demo_cols = {c["key"] for c in table["columns"] for r in table["rows"]
                 if matching(results, cell_match(paper, table, r, c), "demo")}
    header = ["Method"]
    for col in table["columns"]:
        header += [f"{col['label']}: reported", f"{col['label']}: measured"]
        if col["key"] in demo_cols:
            header.append(f"{col['label']}: {DEMO_LABEL}")
    if complexity:
        header += ["Params (M)", "FLOPs (G)"]
    body = []
    for row in table["rows"]:
        line = [row["label"]]
        for col in table["columns"]:
            metric = col.get("metric", table.get("metric", "miou"))
            match = cell_match(paper, table, row, col)
            line += [fmt_reported(row["values"].get(col["key"]), table.get("digits", 2)),
                     fmt_measured(matching(results, match, "full"), metric)]
            if col["key"] in demo_cols:
                line.append(fmt_measured(matching(results, match, "demo"), metric))
        if complexity:
            model = row.get("model")
            cx = model_complexity(model, *_complexity_entry(data, table, model)) if model else None
            line += [f"{cx.params_m:.{2 if cx.params >= 10**6 else 3}f}", f"{cx.gmacs:.1f}"] if cx else ["", ""]
        body.append(line)
    out = [f"### {table['title']}", "", f"Source: {table['source']}."]
    if table.get("note"):
        out.append(table["note"])
    return out + [""] + _md_table(header, body) + [""]


def render_complexity(data: dict) -> list[str]:
    """Spec Params/FLOPs figures beside the computed ones (FlopCounterMode, meta device)."""
    header = ["Model", "classes", "input", "Params reported", "Params computed (M)", "FLOPs reported (G)",
              "FLOPs computed (G)", "FLOPs computed, paper's convention (G)", "source"]
    body = []
    for entry in data.get("complexity", []):
        args = (entry["model"], entry["num_classes"], tuple(entry["input_size"]))
        cx = model_complexity(*args)
        convention = entry.get("flops_convention", "torch")
        paper_cx = model_complexity(*args, convention=convention) if cx and convention != "torch" else cx
        reported_params = f"{entry['params']:,}" if entry.get("params") else (
            f"{entry['params_m']} M" if entry.get("params_m") is not None else "–")
        computed_params = (f"{cx.params:,} ({cx.params_m:.3f})" if cx else "model not registered")
        body.append([entry["label"], str(entry["num_classes"]), "×".join(map(str, entry["input_size"])),
                     reported_params, computed_params,
                     f"{entry['gflops']}" if entry.get("gflops") is not None else "–",
                     f"{cx.gmacs:.1f}" if cx else "–",
                     f"{paper_cx.gmacs:.1f} ({convention})" if paper_cx else "–", entry["source"]])
    out = ["### Params / FLOPs", "",
           "Computed with build_model + torch.utils.flop_counter.FlopCounterMode (meta device, batch 1); FLOPs are "
           "printed as multiply-adds (FlopCounterMode count / 2), the papers' unit."]
    if data.get("flops_note"):
        out.append(data["flops_note"])
    return out + [""] + _md_table(header, body) + [""]


def render_per_class(data: dict) -> list[str]:
    out = []
    for block in data.get("per_class", []):
        out += [f"### Per-class IoU (%), reported: {block['label']}", "", f"Source: {block['source']}.", ""]
        out += _md_table(block["classes"], [[fmt_reported(v, block.get("digits", 2)) for v in block["iou"]]]) + [""]
    return out


def render_paper(paper: str, results: list[dict], complexity: bool = True) -> str:
    """The whole markdown section of one paper."""
    data = load_reported(paper)
    mine = [r for r in results if r.get("paper") == paper]
    n_full = sum(r.get("scale", "full") == "full" for r in mine)
    out = [f"## {paper.upper()}: {data['title']}", "",
           f"Measured results found: {n_full} full-scale, {len(mine) - n_full} demo-scale. "
           "Reported values are in %, as published; measured values are mean ± std over matching results.", ""]
    for table in data["tables"]:
        out += render_table(paper, data, table, results, complexity)
    out += render_per_class(data)
    if complexity:
        out += render_complexity(data)
    return "\n".join(out)


COMPARE_NAME = "compare.json"


def render_comparisons(roots) -> str:
    """The reports of ``python -m common.compare`` found under ``roots`` (their ``compare.json``), one after another;
    empty when there is none."""
    found = sorted({p.resolve() for root in map(Path, roots) if root.is_dir() for p in root.rglob(COMPARE_NAME)})
    out = []
    for path in found:
        try:
            markdown = json.loads(path.read_text())["markdown"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            print(f"warning: skipping {path}: not a comparison report ({err})", file=sys.stderr)
            continue
        out += [markdown.replace("## Comparison", "### Comparison", 1), f"Source: {path}.", ""]
    if not out:
        return ""
    return "\n".join(["## Comparisons under one protocol (`python -m common.compare`)", "", *out])


def render_all(papers=PAPERS, roots=(), complexity: bool = True) -> str:
    results = load_results(roots)
    return "\n".join(render_paper(p, results, complexity) for p in papers)

"""The `results.json` schema (DESIGN.md "Results"): one file per evaluation, next to its checkpoint.

Metrics are fractions in [0, 1] (as the originals print `mean_IU`); the tables render them in %.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import numbers
import os
import subprocess
from collections.abc import Iterable
from pathlib import Path

from common.io import atomic_open

SCHEMA_VERSION = 1
PAPERS = ("skd", "ifvd", "cwd", "cirkd", "aicsd")  # the papers with tables (common/tables/reported/<paper>.json)
RESULT_PAPERS = PAPERS + ("distill",)  # "distill": `python -m common.distill` runs, in no paper table
SCALES = ("full", "demo")
REQUIRED_FIELDS = ("paper", "method", "model", "dataset", "split", "miou", "iterations", "crop", "batch", "seed")
OPTIONAL_FIELDS = ("iou", "pixel_acc", "mean_acc", "scale", "code_version", "wall_time_s", "images_per_s",
                   "peak_mem_mb", "teacher", "extra")
AUTO_FIELDS = ("schema_version", "created")
RESULT_FIELDS = REQUIRED_FIELDS + OPTIONAL_FIELDS + AUTO_FIELDS
RESULTS_NAME = "results.json"
_REPO = Path(__file__).resolve().parents[2]


def code_version() -> str:
    """`git describe --always --dirty` of the repository, else the installed package version, else "unknown"."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=_REPO, capture_output=True, text=True,
                             timeout=10, check=False)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        from importlib.metadata import PackageNotFoundError, version

        return "segkd-" + version("segkd")
    except PackageNotFoundError:
        return "unknown"


def default_scale() -> str:
    """"demo" when `SEGKD_DEMO=1` is set (brief, "Demo scale"), else "full"."""
    return "demo" if os.environ.get("SEGKD_DEMO", "") not in ("", "0") else "full"


def _fraction(name: str, value, optional: bool) -> float | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"results field {name!r} must be a finite number, got {value!r}")
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"results field {name!r} is a fraction in [0, 1] (not %), got {value!r}")
    return float(value)


def make_result(**fields) -> dict:
    """Validate the fields of one evaluation and return the `results.json` dict (missing optionals -> None/{}).

    Fills `scale` from SEGKD_DEMO, `code_version` from git, `schema_version` and `created` (UTC, ISO 8601).
    """
    unknown = sorted(set(fields) - set(REQUIRED_FIELDS + OPTIONAL_FIELDS))
    if unknown:
        raise ValueError(f"unknown results fields {unknown}; put free-form values under extra={{...}}")
    missing = [k for k in REQUIRED_FIELDS if k not in fields]
    if missing:
        raise ValueError(f"missing required results fields {missing}")
    res = {k: fields.get(k) for k in REQUIRED_FIELDS + OPTIONAL_FIELDS}
    if res["paper"] not in RESULT_PAPERS:
        raise ValueError(f"results field 'paper' must be one of {RESULT_PAPERS}, got {res['paper']!r}")
    for key in ("method", "model", "dataset", "split"):
        if not isinstance(res[key], str) or not res[key]:
            raise ValueError(f"results field {key!r} must be a non-empty string, got {res[key]!r}")
    res["scale"] = res["scale"] or default_scale()
    if res["scale"] not in SCALES:
        raise ValueError(f"results field 'scale' must be one of {SCALES}, got {res['scale']!r}")
    res["miou"] = _fraction("miou", res["miou"], optional=False)
    for key in ("pixel_acc", "mean_acc"):
        res[key] = _fraction(key, res[key], optional=True)
    if res["iou"] is not None:
        res["iou"] = [_fraction("iou", v, optional=True) for v in res["iou"]]  # None = class skipped (NaN)
    for key in ("iterations", "batch", "seed"):
        if res[key] is not None:
            if isinstance(res[key], bool) or not isinstance(res[key], numbers.Integral):
                raise ValueError(f"results field {key!r} must be an integer or None, got {res[key]!r}")
            res[key] = int(res[key])
    if res["crop"] is not None:
        res["crop"] = [int(v) for v in res["crop"]]
    for key in ("wall_time_s", "images_per_s", "peak_mem_mb"):
        if res[key] is not None:
            res[key] = float(res[key])
    res["extra"] = dict(res["extra"] or {})
    res["code_version"] = res["code_version"] or code_version()
    res["schema_version"] = SCHEMA_VERSION
    res["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    json.dumps(res)  # everything must be JSON-serialisable
    return res


def write_results(path, result: dict) -> Path:
    """Write `result` as JSON atomically (temp file + os.replace); a directory gets `results.json` inside."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_NAME
    with atomic_open(path, "w") as fh:
        json.dump(result, fh, indent=2, sort_keys=True)
        fh.write("\n")
    return path


def read_results(path) -> dict:
    """Read one `results.json` (ValueError naming the file when it is not a results dict)."""
    path = Path(path)
    with open(path) as fh:
        try:
            data = json.load(fh)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from err
    missing = [k for k in REQUIRED_FIELDS if not isinstance(data, dict) or k not in data]
    if missing:
        raise ValueError(f"{path} is not a segkd results file (missing {missing})")
    data.setdefault("scale", "full")
    data.setdefault("extra", {})
    return data


def find_results(roots: Iterable) -> list[Path]:
    """All `results.json` files under the given directories (missing directories are skipped), sorted."""
    if isinstance(roots, (str, os.PathLike)):
        roots = [roots]
    found = set()
    for root in roots:
        root = Path(root)
        if root.is_file() and root.name == RESULTS_NAME:
            found.add(root.resolve())
        elif root.is_dir():
            found.update(p.resolve() for p in root.rglob(RESULTS_NAME))
    return sorted(found)

"""The comparison report: per method, mean ± std of val mIoU over seeds, the difference to the protocol's
no-distillation run with a 95% confidence interval (Welch's t over seeds), per-class IoU and the cost
(train seconds per iteration, images/s, peak memory, device-hours); written as compare.{md,csv,json,png}.

Standard deviations are sample standard deviations (ddof = 1). Welch's interval for the difference of means
d = m_a - m_b is d ± t_{0.975, ν} · s with s² = v_a/n_a + v_b/n_b and the Welch–Satterthwaite
ν = s⁴ / ((v_a/n_a)²/(n_a-1) + (v_b/n_b)²/(n_b-1)) (``scipy.stats.ttest_ind(equal_var=False)``).
"""
from __future__ import annotations

import csv
import datetime as _dt
import json
import math
from pathlib import Path

from common.io import atomic_open
from common.tables.schema import RESULTS_NAME, read_results

NOT_RESOLVED = "not resolved"
REPORT_FILES = ("compare.md", "compare.csv", "compare.json", "compare.png")


def mean_std(values):
    """Mean and sample standard deviation (ddof = 1; None for one value) of ``values``."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return mean, std


def welch_interval(a, b, confidence=0.95):
    """Difference of means ``mean(a) - mean(b)`` and its Welch confidence interval ``(low, high)``.

    The interval is None with fewer than 2 values on a side or no spread on either side (t undefined).
    """
    from scipy import stats

    diff = sum(a) / len(a) - sum(b) / len(b)
    if len(a) < 2 or len(b) < 2 or (mean_std(a)[1] == 0 and mean_std(b)[1] == 0):
        return diff, None
    ci = stats.ttest_ind(a, b, equal_var=False).confidence_interval(confidence)
    return diff, (float(ci.low), float(ci.high))


def collect(runs):
    """``{label: [result, ...]}`` of the finished runs (a results.json in the run folder), in run order."""
    results = {}
    for run in runs:
        path = run.dir / RESULTS_NAME
        if path.is_file():
            try:
                results.setdefault(run.label, []).append(read_results(path))
            except (OSError, ValueError):
                continue
        else:
            results.setdefault(run.label, [])
    return results


def _mean(results, getter):
    values = [v for v in (getter(r) for r in results) if v is not None]
    return sum(values) / len(values) if values else None


def _device_hours(result):
    extra = result.get("extra") or {}
    if result.get("wall_time_s") is None:
        return None
    return result["wall_time_s"] * int(extra.get("world_size") or 1) / 3600.0


def device_kind(results):
    """"GPU" when any run used CUDA, else "CPU" (the unit of the device-hours column)."""
    devices = [str((r.get("extra") or {}).get("device", "")) for rs in results.values() for r in rs]
    return "GPU" if any(d.startswith("cuda") for d in devices) else "CPU"


def summarise(protocol, results):
    """One row (dict of numbers, mIoU in %) per method of ``protocol`` that was run, in protocol order."""
    base = [100.0 * r["miou"] for r in results.get(protocol.baseline, [])]
    rows = []
    for method in (m for m in protocol.methods if m.label in results):
        rs = results.get(method.label, [])
        miou = [100.0 * r["miou"] for r in rs]
        row = {"label": method.label, "method": method.name, "preset": method.preset, "weights": method.weights,
               "seeds": [r["seed"] for r in rs], "n": len(rs), "miou": miou, "miou_mean": None, "miou_std": None,
               "delta": None, "ci_low": None, "ci_high": None, "resolved": None}
        if miou:
            row["miou_mean"], row["miou_std"] = mean_std(miou)
        if miou and base and method.label != protocol.baseline:
            row["delta"], ci = welch_interval(miou, base)
            if ci:
                row["ci_low"], row["ci_high"] = ci
                row["resolved"] = not ci[0] <= 0.0 <= ci[1]
        row["iterations"] = _mean(rs, lambda r: r.get("iterations"))
        row["train_s_per_iter"] = _mean(rs, lambda r: (r.get("extra") or {}).get("train_seconds_per_iter"))
        row["images_per_s"] = _mean(rs, lambda r: r.get("images_per_s"))
        mems = [r["peak_mem_mb"] for r in rs if r.get("peak_mem_mb") is not None]
        row["peak_mem_mb"] = max(mems) if mems else None
        hours = [h for h in map(_device_hours, rs) if h is not None]
        row["device_hours"] = sum(hours) if hours else None
        row["device_hours_per_run"] = sum(hours) / len(hours) if hours else None
        names = next((r["extra"]["class_names"] for r in rs if (r.get("extra") or {}).get("class_names")), None)
        ious = [r["iou"] for r in rs if r.get("iou")]
        row["class_names"] = names
        row["iou"] = ([_mean([x for x in ious if len(x) > c], lambda x, c=c: None if x[c] is None else 100.0 * x[c])
                       for c in range(max(map(len, ious)))] if ious else None)
        rows.append(row)
    return rows


def _f(value, digits=2):
    return "—" if value is None else f"{value:.{digits}f}"


def _delta_cell(row, baseline):
    if row["label"] == baseline:
        return "(reference)"
    if row["delta"] is None:
        return "—"
    if row["ci_low"] is None:
        return f"{row['delta']:+.2f} [no interval: needs ≥ 2 seeds with spread]"
    cell = f"{row['delta']:+.2f} [{row['ci_low']:+.2f}, {row['ci_high']:+.2f}]"
    return cell if row["resolved"] else f"{cell} {NOT_RESOLVED}"


def markdown(protocol, rows, failed, kind):
    """The report as markdown: the method table, the per-class IoU table and the failed runs."""
    if protocol.budget == "wallclock":
        budget = (f"same wall-clock budget of {protocol.seconds:g} s per run on this machine: the iterations differ "
                  "per method (column 'iterations')")
    else:
        length = protocol.train["iterations"] or f"{protocol.train['epochs']} epochs"
        budget = f"same schedule for every method ({length} iterations)" if protocol.train["iterations"] else \
            f"same schedule for every method ({length})"
    out = [f"## Comparison `{protocol.name}`", ""]
    if protocol.description:
        out += [protocol.description, ""]
    out += [f"Teacher {protocol.teacher['network']}, student {protocol.student['network']}, "
            f"{protocol.data['dataset']} {protocol.data['train_split']} -> {protocol.evaluation['split']}, crop "
            f"{'x'.join(map(str, protocol.train['crop']))}, total batch {protocol.train['batch']}; budget: {budget}.",
            "mIoU (%): mean ± sample std (ddof = 1) over seeds. Δ: difference of the mean to the no-distillation "
            f"run `{protocol.baseline}` with its 95% confidence interval (Welch's t over seeds); "
            f"\"{NOT_RESOLVED}\" where the interval contains 0. {kind}-h: total {kind}-hours of the method's runs "
            "(wall time × processes).", ""]
    header = ["method", "seeds", "mIoU (%)", f"Δ vs {protocol.baseline} [95% CI]", "iterations", "train s/iter",
              "images/s", "peak mem (MB)", f"{kind}-h"]
    out += ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        miou = "—" if row["miou_mean"] is None else (
            f"{row['miou_mean']:.2f} ± {row['miou_std']:.2f}" if row["miou_std"] is not None
            else f"{row['miou_mean']:.2f}")
        cells = [row["label"], str(row["n"]), miou, _delta_cell(row, protocol.baseline), _f(row["iterations"], 0),
                 _f(row["train_s_per_iter"], 3), _f(row["images_per_s"], 1), _f(row["peak_mem_mb"], 0),
                 _f(row["device_hours"], 3)]
        out.append("| " + " | ".join(cells) + " |")
    with_iou = [r for r in rows if r["iou"]]
    if with_iou:
        count = max(len(r["iou"]) for r in with_iou)
        names = next((r["class_names"] for r in with_iou if r["class_names"]), None) or [str(c) for c in range(count)]
        out += ["", "Per-class IoU (%), mean over seeds:", "",
                "| method | " + " | ".join(names) + " |", "|---|" + "|".join("---" for _ in names) + "|"]
        out += ["| " + r["label"] + " | " + " | ".join(_f(v, 1) for v in r["iou"]) + " |" for r in with_iou]
    if failed:
        out += ["", f"Failed runs ({len(failed)}; the table above holds the finished ones):"]
        out += [f"- {title}: see {log}" for title, log in failed]
    return "\n".join(out) + "\n"


def write_csv(path, rows):
    count = max((len(r["iou"]) for r in rows if r["iou"]), default=0)
    names = next((r["class_names"] for r in rows if r["class_names"]), None) or [str(c) for c in range(count)]
    fields = ["label", "method", "n", "miou_mean", "miou_std", "delta", "ci_low", "ci_high", "resolved",
              "iterations", "train_s_per_iter", "images_per_s", "peak_mem_mb", "device_hours"]
    with atomic_open(path, "w") as fh:
        writer = csv.writer(fh)
        writer.writerow(fields + [f"iou_{n}" for n in names])
        for row in rows:
            ious = list(row["iou"] or []) + [None] * (count - len(row["iou"] or []))
            writer.writerow(["" if row[f] is None else row[f] for f in fields] +
                            ["" if v is None else v for v in ious])


def write_png(path, protocol, rows, kind):
    """mIoU (mean, error bar = std over seeds) against the device-hours of one run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for row in rows:
        if row["miou_mean"] is None or row["device_hours_per_run"] is None:
            continue
        ax.errorbar(row["device_hours_per_run"], row["miou_mean"], yerr=row["miou_std"] or 0.0, fmt="o", capsize=4)
        ax.annotate(row["label"], (row["device_hours_per_run"], row["miou_mean"]), textcoords="offset points",
                    xytext=(5, 4), fontsize=8)
    ax.set_xlabel(f"{kind}-hours per run (wall time × processes)")
    ax.set_ylabel("val mIoU (%), mean ± std over seeds")
    ax.set_title(f"{protocol.name}: mIoU against cost")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_open(path, "wb") as fh:
        fig.savefig(fh, format="png")
    plt.close(fig)


def write_report(protocol, runs, out, failed=()):
    """Aggregate the finished runs, write compare.{md,csv,json,png} into ``out``; returns the markdown."""
    out = Path(out)
    results = collect(runs)
    rows = summarise(protocol, results)
    kind = device_kind(results)
    text = markdown(protocol, rows, list(failed), kind)
    with atomic_open(out / "compare.md", "w") as fh:
        fh.write(text)
    write_csv(out / "compare.csv", rows)
    payload = {"protocol": protocol.name, "description": protocol.description, "budget": protocol.budget,
               "seconds": protocol.seconds, "baseline": protocol.baseline, "device_kind": kind,
               "teacher": protocol.teacher["network"], "student": protocol.student["network"],
               "dataset": protocol.data["dataset"], "rows": rows,
               "failed": [{"run": t, "log": str(log)} for t, log in failed], "markdown": text,
               "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    with atomic_open(out / "compare.json", "w") as fh:
        json.dump(payload, fh, indent=2)
        fh.write("\n")
    write_png(out / "compare.png", protocol, rows, kind)
    return text

"""Run logging: console for people, JSON lines for machines, TensorBoard when installed
(DESIGN.md, Conventions: Logs; specs/anchors.md §4 "Logging").

``<run_dir>/log.txt`` keeps the console lines (the originals' log file, specs/ifvd_skd.md §A.2.1
step 2); ``<run_dir>/metrics.jsonl`` gets one JSON object per step. On resume, lines of steps at
or after the resumed step are dropped, so the file reads like one uninterrupted run. A fresh run in a
folder with earlier logs keeps them: they are renamed ``log.<N>.txt`` / ``metrics.<N>.jsonl`` (the first
free N) and the new log says so.
"""
import json
import logging
import time
from pathlib import Path

from tqdm import tqdm

from common.io import atomic_open


class _TqdmHandler(logging.StreamHandler):
    """Console handler that writes through ``tqdm.write`` so progress bars stay intact."""

    def emit(self, record):
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:
            self.handleError(record)


LOG_FILES = ("log.txt", "metrics.jsonl")


def _numbered(name, n):
    """``log.txt`` -> ``log.<n>.txt``."""
    stem, _, ext = name.rpartition(".")
    return f"{stem}.{n}.{ext}"


def _tensorboard_writer(run_dir):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(run_dir / "tb"))


class RunLogger:
    """Logger of one run; everything is a no-op when ``enabled`` is False (ranks other than 0)."""

    def __init__(self, run_dir, name, enabled=True, start_step=0):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.logger = logging.getLogger(f"segkd.{name}")
        self.logger.setLevel(logging.DEBUG)
        self.logger.propagate = False
        for handler in list(self.logger.handlers):
            self.logger.removeHandler(handler)
            handler.close()
        self._jsonl = None
        self._tb = None
        if not enabled:
            self.logger.addHandler(logging.NullHandler())
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        kept = [] if start_step else self._keep_earlier_logs()
        console = _TqdmHandler()
        console.setLevel(logging.INFO)
        console.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        logfile = logging.FileHandler(self.run_dir / "log.txt", mode="a" if start_step else "w")
        logfile.setLevel(logging.DEBUG)
        logfile.setFormatter(logging.Formatter("%(asctime)s - %(levelname)s: %(message)s"))
        self.logger.addHandler(console)
        self.logger.addHandler(logfile)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self._truncate_metrics(start_step)
        self._jsonl = open(self.metrics_path, "a")
        self._tb = _tensorboard_writer(self.run_dir)
        if kept:
            self.info(f"kept the earlier logs of {self.run_dir} as {', '.join(kept)}")

    def _keep_earlier_logs(self):
        """Rename a previous run's non-empty log.txt / metrics.jsonl to the first free ``.<N>`` suffix."""
        names = [name for name in LOG_FILES if (self.run_dir / name).is_file()
                 and (self.run_dir / name).stat().st_size > 0]
        if not names:
            return []
        n = 1
        while any((self.run_dir / _numbered(name, n)).exists() for name in LOG_FILES):
            n += 1
        for name in names:
            (self.run_dir / name).rename(self.run_dir / _numbered(name, n))
        return [_numbered(name, n) for name in names]

    def _truncate_metrics(self, start_step):
        """Keep only the lines of steps before ``start_step`` (all of them dropped for a fresh run)."""
        kept = []
        if start_step and self.metrics_path.is_file():
            with open(self.metrics_path) as f:
                for line in f:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    if record.get("step", start_step) < start_step:
                        kept.append(line if line.endswith("\n") else line + "\n")
        with atomic_open(self.metrics_path, "w") as f:
            f.writelines(kept)

    def info(self, msg):
        self.logger.info(msg)

    def debug(self, msg):
        self.logger.debug(msg)

    def log_step(self, step, **scalars):
        """Append ``{"step": step, **scalars, "time": unix time}`` to metrics.jsonl (and TensorBoard)."""
        if not self.enabled:
            return
        record = {"step": int(step), **{k: float(v) for k, v in scalars.items()}, "time": time.time()}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, float(value), int(step))

    def close(self):
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        for handler in list(self.logger.handlers):
            self.logger.removeHandler(handler)
            handler.close()

"""Interleaved A/B timing shared by every benchmark (``make bench``; issue 13 item 7, specs/inplace_abn.md §7.4).

A ratio of two timings taken on a busy machine is only trustworthy when both sides saw the same load. So:

* :func:`interleave` runs the variants in rounds, every variant once per round, the order rotating from round to
  round (A B C, B C A, C A B, ...), after ``warmup`` untimed rounds. Each call records wall time
  (``time.perf_counter``) and CPU time (user + system of this process and of its finished children, so
  DataLoader workers count once they exit). ``sync`` (e.g. ``torch.cuda.synchronize``) is called before each
  clock start and stop.
* :func:`ratio` pairs the calls of one round (``B_i / A_i``) and reports the median, the interquartile range
  (IQR) and min-max of those per-round ratios, for wall and for CPU time.
* :meth:`Ratio.text` prints the median with its spread only when the effect ``|median - 1|`` is larger than
  the IQR; otherwise it prints "not resolved at this size". With ``floor`` (the variant does at least the
  baseline's work, e.g. a distillation step against its own task-loss subset), a median below the floor is
  also "not resolved": it can only be noise.

Reuse in a new benchmark::

    from bench import timing

    samples = timing.interleave({"baseline": run_a, "cwd": run_b}, rounds=args.rounds, warmup=1)
    print(timing.ratio(samples, "cwd", "baseline").text("CWD step / baseline step", floor=1.0))

``timing.machine_note()`` is the load-average line every benchmark prints first;
``timing.add_arguments(parser, rounds=...)`` adds the ``--rounds`` flag every benchmark takes
(``python -m bench cwd --rounds 3`` for a quick check).
"""
import os
import resource
import statistics
import time
from dataclasses import dataclass


def machine_note():
    """How busy the machine is, for the header of a benchmark: "load average 1.2 / 0.8 / 0.5 on 2 CPUs"."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.1f} / {five:.1f} / {fifteen:.1f} on {os.cpu_count()} CPUs"


def cpu_seconds():
    """User + system CPU seconds of this process and its reaped children (all threads)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@dataclass
class Samples:
    """Per-round seconds of one variant (one call per round)."""

    wall: list
    cpu: list

    def median_wall(self):
        return statistics.median(self.wall)

    def median_cpu(self):
        return statistics.median(self.cpu)


def interleave(fns, rounds, warmup=1, sync=None, wall_clock=time.perf_counter, cpu_clock=cpu_seconds):
    """Time each callable of ``fns`` (name -> fn) once per round, the order rotating; returns name -> Samples."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    names = list(fns)
    samples = {name: Samples([], []) for name in names}
    for i in range(warmup + rounds):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            if sync is not None:
                sync()
            start_wall, start_cpu = wall_clock(), cpu_clock()
            fns[name]()
            if sync is not None:
                sync()
            if i >= warmup:
                samples[name].wall.append(wall_clock() - start_wall)
                samples[name].cpu.append(cpu_clock() - start_cpu)
    return samples


def quartiles(values):
    """(q1, median, q3) with linear interpolation between order statistics (numpy's default)."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


@dataclass
class Spread:
    """Median, quartiles and range of per-round ratios."""

    median: float
    q1: float
    q3: float
    low: float
    high: float

    @classmethod
    def of(cls, values):
        q1, median, q3 = quartiles(sorted(values))
        return cls(median, q1, q3, min(values), max(values))

    def resolved(self, floor=None):
        """Whether the effect |median - 1| exceeds the IQR (and the median is not below ``floor``)."""
        if floor is not None and self.median < floor:
            return False
        return abs(self.median - 1.0) > self.q3 - self.q1

    def text(self, floor=None):
        spread = f"IQR {self.q1:.3f}-{self.q3:.3f}, min-max {self.low:.3f}-{self.high:.3f}"
        if self.resolved(floor):
            return f"{self.median:.3f}x ({spread})"
        why = f"median {self.median:.3f}x below the {floor:.2f}x floor" if (
            floor is not None and self.median < floor) else f"median {self.median:.3f}x"
        return f"not resolved at this size ({why}; {spread})"


@dataclass
class Ratio:
    """Per-round ratios ``variant / baseline`` of wall and CPU time."""

    rounds: int
    wall: Spread
    cpu: Spread

    def text(self, label, floor=None):
        """One line: wall ratio (or "not resolved ...") and CPU ratio, each with its spread."""
        return (f"{label}: wall {self.wall.text(floor)}; CPU time {self.cpu.text(floor)} "
                f"[{self.rounds} interleaved rounds]")


def ratio(samples, variant, baseline):
    """Ratio of ``samples[variant]`` over ``samples[baseline]``, paired round by round."""
    a, b = samples[baseline], samples[variant]
    wall = [vb / va for va, vb in zip(a.wall, b.wall)]
    cpu = [vb / va if va > 0 else float("inf") for va, vb in zip(a.cpu, b.cpu)]
    return Ratio(len(wall), Spread.of(wall), Spread.of(cpu))


def add_arguments(parser, rounds):
    """The ``--rounds`` flag of every benchmark (default ``rounds``)."""
    parser.add_argument("--rounds", type=int, default=rounds,
                        help=f"interleaved timing rounds per comparison (default {rounds}; fewer = quicker, noisier)")
    return parser

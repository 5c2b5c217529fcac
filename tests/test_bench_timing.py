"""bench/timing.py: interleaved rounds, per-round ratios with their spread, "not resolved" (issue 13 item 7)."""
import subprocess
import sys

import pytest

from bench import timing


class FakeClock:
    """A clock that only moves when a timed function advances it."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def timed_fns(durations, wall, cpu, cpu_factor=2.0):
    """name -> fn that advances the wall clock by the next duration of ``name`` and the CPU clock by twice it."""
    def make(name):
        def fn():
            d = durations[name].pop(0)
            wall.now += d
            cpu.now += cpu_factor * d
        return fn
    return {name: make(name) for name in durations}


def test_order_rotates_every_round():
    calls = []
    fns = {name: (lambda n=name: calls.append(n)) for name in "ABC"}
    timing.interleave(fns, rounds=3, warmup=1)
    # warm-up round A B C, then B C A, C A B, A B C
    assert "".join(calls) == "ABC" "BCA" "CAB" "ABC"


def test_warmup_is_run_but_not_recorded():
    wall, cpu = FakeClock(), FakeClock()
    durations = {"a": [9.0, 1.0, 2.0], "b": [9.0, 3.0, 4.0]}
    samples = timing.interleave(timed_fns(durations, wall, cpu), rounds=2, warmup=1, wall_clock=wall, cpu_clock=cpu)
    assert samples["a"].wall == [1.0, 2.0] and samples["b"].wall == [3.0, 4.0]
    assert samples["a"].cpu == [2.0, 4.0] and samples["b"].cpu == [6.0, 8.0]


def test_sync_brackets_every_timed_call():
    events = []
    timing.interleave({"a": lambda: events.append("a")}, rounds=2, warmup=0, sync=lambda: events.append("sync"))
    assert events == ["sync", "a", "sync"] * 2


def _ratio(baseline, variant):
    wall, cpu = FakeClock(), FakeClock()
    samples = timing.interleave(timed_fns({"base": list(baseline), "var": list(variant)}, wall, cpu), rounds=len(
        baseline), warmup=0, wall_clock=wall, cpu_clock=cpu)
    return timing.ratio(samples, "var", "base")


def test_ratio_is_paired_per_round_with_quartiles():
    # per-round ratios 2.2/2, 1.2/1, 3.9/3, 1.4/1, 7.5/5 = 1.1, 1.2, 1.3, 1.4, 1.5 (the pairing matters: the
    # ratio of the medians would be 2.2/2 = 1.1). Quartiles by linear interpolation at (n-1)p: 1.2, 1.3, 1.4.
    r = _ratio([2.0, 1.0, 3.0, 1.0, 5.0], [2.2, 1.2, 3.9, 1.4, 7.5])
    assert r.rounds == 5
    assert (r.wall.median, r.wall.q1, r.wall.q3) == pytest.approx((1.3, 1.2, 1.4))
    assert (r.wall.low, r.wall.high) == pytest.approx((1.1, 1.5))
    assert r.text("x / y") == ("x / y: wall 1.300x (IQR 1.200-1.400, min-max 1.100-1.500); CPU time 1.300x "
                               "(IQR 1.200-1.400, min-max 1.100-1.500) [5 interleaved rounds]")


def test_spread_larger_than_the_effect_is_not_resolved():
    # ratios 0.9, 1.0, 1.05, 1.1, 1.2: effect |1.05 - 1| = 0.05 < IQR 1.1 - 1.0 = 0.1
    r = _ratio([1.0] * 5, [0.9, 1.0, 1.05, 1.1, 1.2])
    assert not r.wall.resolved()
    assert r.wall.text() == "not resolved at this size (median 1.050x; IQR 1.000-1.100, min-max 0.900-1.200)"


def test_floor_turns_an_impossible_speed_up_into_not_resolved():
    # ratios 0.90 .. 0.94: effect 0.08 > IQR 0.02, so resolved without a floor, but a step doing all of the
    # baseline's work cannot take 0.92x of its time
    r = _ratio([1.0] * 5, [0.90, 0.91, 0.92, 0.93, 0.94])
    assert r.wall.resolved() and r.wall.text().startswith("0.920x")
    assert not r.wall.resolved(floor=1.0)
    assert r.wall.text(floor=1.0).startswith("not resolved at this size (median 0.920x below the 1.00x floor")


def test_single_round_has_zero_spread():
    r = _ratio([2.0], [3.0])
    assert (r.wall.median, r.wall.q1, r.wall.q3, r.wall.low, r.wall.high) == (1.5, 1.5, 1.5, 1.5, 1.5)


def test_cpu_seconds_include_finished_children():
    before = timing.cpu_seconds()
    subprocess.run([sys.executable, "-c", "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: "
                    "pass"], check=True)
    assert timing.cpu_seconds() - before >= 0.25


def test_rounds_must_be_positive():
    with pytest.raises(ValueError, match="rounds"):
        timing.interleave({"a": lambda: None}, rounds=0)

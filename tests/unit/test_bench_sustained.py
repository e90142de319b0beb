"""The sustained mode of bench/saga_throughput.py buckets ended sagas into minutes correctly:
a partial last minute over its own length, the comparison on full minutes only, deadline
waits counted in the minute the saga ended, and sagas that ended after the window apart."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parents[2] / "bench" / "saga_throughput.py"


def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("saga_throughput", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_minutes_partial_last_minute_and_comparison_on_full_minutes() -> None:
    t0 = 1_000.0
    # 120 sagas in minute 1 (2/s), 108 in minute 2 (1.8/s: -10%), 15 in the last 30 s.
    ended = [(f"a{i}", t0 + i * 0.5, 10.0) for i in range(120)]
    ended += [(f"b{i}", t0 + 60 + i * (60 / 108), 20.0) for i in range(108)]
    ended += [(f"c{i}", t0 + 120 + i * 2, 30.0 if i else 9_000.0) for i in range(15)]
    ended += [("late", t0 + 150.5, 5.0)]  # after the window: drained, not counted

    report = bench().minutes_of(ended, t0, 150.0, waited={"b3", "c0", "late"})

    minutes = report["minutes"]
    assert [(m["minute"], m["sagas"], m["sagas_per_s"], m["partial"], m["duration_s"])
            for m in minutes] == [(1, 120, 2.0, False, 60.0), (2, 108, 1.8, False, 60.0),
                                  (3, 15, 0.5, True, 30.0)]
    assert [m["p50_ms"] for m in minutes] == [10.0, 20.0, 30.0]
    assert minutes[2]["p99_ms"] > 30.0  # the one slow saga of the last minute shows in its p99
    assert [m["deadline_waits"] for m in minutes] == [0, 1, 1]
    assert report["deadline_waits"] == 2
    # The partial minute (0.5/s) is not the "last minute": the last full one is, at -10%.
    assert report["last_vs_first_pct"] == -10.0
    assert report["last_within_10pct_of_first"] is True
    assert report["drained_after_window"] == 1


def test_a_single_full_minute_is_not_judged_and_a_drop_beyond_10_percent_is() -> None:
    module = bench()
    one = module.minutes_of([("a", 10.0, 1.0)], 0.0, 60.0, set())
    assert (one["last_vs_first_pct"], one["last_within_10pct_of_first"]) == (None, None)

    ended = [(f"a{i}", i * 0.5, 1.0) for i in range(120)] + [
        (f"b{i}", 60 + i, 1.0) for i in range(60)]
    decayed = module.minutes_of(ended, 0.0, 120.0, set())
    assert (decayed["last_vs_first_pct"], decayed["last_within_10pct_of_first"]) == (-50.0, False)

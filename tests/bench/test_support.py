"""Tests for bench/support.py: the report's median over repeated runs; the engine's settling."""

from __future__ import annotations

import gc
from typing import TYPE_CHECKING

from bench.support import Report, engine, fresh_database
from carwash_jobs import gc_tuning

if TYPE_CHECKING:
    import pytest


def test_repeated_runs_give_each_figure_its_median_and_print_its_range(
    capsys: pytest.CaptureFixture[str],
) -> None:
    runs = []
    for drain, p99 in ((7000.0, 2.5), (9000.0, 1.5), (8000.0, 1.8)):
        run = Report()
        run.add("throughput", "sqlite", "drain_jobs_per_s", drain, "jobs/s")
        run.add("pickup", "sqlite", "pickup_p99_ms", p99, "ms")
        runs.append(run)
    capsys.readouterr()

    summary = Report.median_of(runs)

    assert [(f["metric"], f["value"], f["unit"]) for f in summary.figures] == [
        ("drain_jobs_per_s", 8000.0, "jobs/s"), ("pickup_p99_ms", 1.8, "ms"),
    ]
    printed = capsys.readouterr().out
    assert "median of 3 runs" in printed
    assert "(7,000.00-9,000.00)" in printed
    assert "(1.50-2.50)" in printed


async def test_the_engine_settles_the_collector_as_serve_does_and_gives_it_back() -> None:
    before = gc.get_threshold()
    async with fresh_database("sqlite", "") as url, engine(url, start=False):
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold()[0] == gc_tuning.YOUNG_THRESHOLD
    assert gc.get_freeze_count() == 0  # the next scenario's objects can be collected
    assert gc.get_threshold() == before

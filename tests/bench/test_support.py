"""Tests for bench/support.py: the report's median over repeated runs."""

from __future__ import annotations

from typing import TYPE_CHECKING

from bench.support import Report

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

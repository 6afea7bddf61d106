"""Tests for bench/scenarios.py, on real SQLite files."""

from __future__ import annotations

import pytest

from bench import scenarios
from bench.support import Report
from carwash_jobs import heap_trim


async def test_the_sqlite_ceiling_reports_its_insert_drain_and_whole_rates(
    capsys: pytest.CaptureFixture[str],
) -> None:
    report = Report()

    raw = await scenarios.ceiling(report, "sqlite", "", jobs=500)

    rates = {f["metric"]: f["value"] for f in report.figures}
    assert rates == {
        "raw_insert_jobs_per_s": round(raw.insert, 3),
        "raw_drain_jobs_per_s": round(raw.drain, 3),
        "raw_end_to_end_jobs_per_s": round(raw.end_to_end, 3),
    }
    # the whole takes the two phases' time together: jobs / (a + b) from jobs / a and jobs / b
    assert raw.insert > 0
    assert raw.drain > 0
    assert abs(1 / raw.end_to_end - (1 / raw.insert + 1 / raw.drain)) < 1e-12
    assert "raw_drain_jobs_per_s" in capsys.readouterr().out


async def test_the_retry_scenario_retries_every_failed_job_and_reports_the_rate() -> None:
    report = Report()

    await scenarios.retry(report, "sqlite", "", jobs=2_500)  # three batches

    (figure,) = report.figures
    assert (figure["scenario"], figure["metric"], figure["unit"]) == (
        "retry", "retry_failed_jobs_per_s", "jobs/s")
    assert figure["value"] > 0


@pytest.mark.skipif(heap_trim.libc_malloc_trim() is None, reason="the C library has no malloc_trim")
async def test_the_soak_reports_its_memory_and_what_its_heap_trims_cost(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CARWASH_HEAP_TRIM_INTERVAL_SECONDS", "1")
    report = Report()

    await scenarios.soak(report, "sqlite", "", rate=500, seconds=2.5)

    figures = {f["metric"]: f["value"] for f in report.figures}
    assert figures["soak_rate_jobs_per_s"] == 500
    assert figures["soak_jobs"] % 50 == 0  # 50 every tenth of a second,
    assert 0 < figures["soak_jobs"] <= 1300  # for 2.5 s (fewer ticks on a busy machine)
    assert figures["soak_rss_start_mb"] > 0
    assert figures["soak_rss_end_mb"] > 0
    assert figures["soak_heap_trims"] >= 2
    assert 0 < figures["soak_longest_trim_ms"] < 1000

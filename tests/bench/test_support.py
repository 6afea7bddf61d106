"""Tests for bench/support.py: the report's median over repeated runs and its fractions of the
raw figures; the engine's settling."""

from __future__ import annotations

import asyncio
import gc
import os

import pytest

from bench.support import Ceiling, Report, engine, fresh_database
from carwash_jobs import gc_tuning, heap_trim
from tests.carwash_jobs.support import skip_unless_autovacuum_is_off


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


@pytest.mark.skipif(heap_trim.libc_malloc_trim() is None, reason="the C library has no malloc_trim")
async def test_the_engine_trims_the_heap_on_the_served_interval_and_stops_after(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CARWASH_HEAP_TRIM_INTERVAL_SECONDS", "7")
    async with fresh_database("sqlite", "") as url, engine(url, start=False) as e:
        assert e.trimmer is not None
        assert e.trimmer.interval_seconds == 7
        assert not e.trimmer.stopped.is_set()
    assert e.trimmer.stopped.is_set()
    assert heap_trim.stop_trimming() is None  # none left running for the next scenario

    monkeypatch.setenv("CARWASH_HEAP_TRIM_INTERVAL_SECONDS", "0")
    async with fresh_database("sqlite", "") as url, engine(url, start=False) as e:
        assert e.trimmer is None


def test_each_rate_is_given_as_a_fraction_of_the_raw_figure_it_compares_with(
    capsys: pytest.CaptureFixture[str],
) -> None:
    report = Report()
    for scenario, backend, metric, value, unit in (
        ("throughput", "sqlite", "enqueue_bulk_jobs_per_s", 15_000.0, "jobs/s"),
        ("throughput", "sqlite", "drain_jobs_per_s", 6_000.0, "jobs/s"),
        ("throughput", "sqlite", "end_to_end_jobs_per_s", 4_000.0, "jobs/s"),
        ("http", "sqlite", "http_enqueue_requests_per_s", 1_000.0, "req/s"),
        ("scale", "sqlite", "end_to_end_with_1000_finished_jobs_per_s", 2_000.0, "jobs/s"),
        ("pickup", "sqlite", "pickup_p99_ms", 2.0, "ms"),  # a latency has no raw counterpart
        ("scale", "sqlite", "end_to_end_slowdown_with_history", 0.1, "x"),  # nor a ratio
        ("ceiling", "sqlite", "raw_end_to_end_jobs_per_s", 8_000.0, "jobs/s"),
        ("throughput", "postgres", "drain_jobs_per_s", 3_000.0, "jobs/s"),  # another backend
    ):
        report.add(scenario, backend, metric, value, unit)
    capsys.readouterr()

    report.add_fractions("sqlite", Ceiling(insert=30_000.0, drain=12_000.0, end_to_end=8_000.0))

    added = {f["metric"]: f["value"] for f in report.figures[9:]}
    assert added == {
        "enqueue_bulk_fraction_of_raw_insert": 0.5,
        "drain_fraction_of_raw_drain": 0.5,
        "end_to_end_fraction_of_ceiling": 0.5,
        "http_enqueue_fraction_of_ceiling": 0.125,
        "end_to_end_with_1000_finished_fraction_of_ceiling": 0.25,
    }
    assert all(f["scenario"] == "ceiling" and f["unit"] == "x" for f in report.figures[9:])
    assert "enqueue_bulk_fraction_of_raw_insert" in capsys.readouterr().out


@pytest.mark.skipif(not os.environ.get("CARWASH_TEST_POSTGRES_URL"),
                    reason="CARWASH_TEST_POSTGRES_URL is not set")
async def test_the_engine_vacuums_on_the_served_interval_as_a_served_scheduler_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = os.environ["CARWASH_TEST_POSTGRES_URL"]
    await skip_unless_autovacuum_is_off(server)
    monkeypatch.setenv("CARWASH_VACUUM_INTERVAL_SECONDS", "1")
    async with fresh_database("postgres", server) as url, engine(url, start=False) as e:
        async with asyncio.timeout(20):
            while e.vacuums == 0:  # noqa: ASYNC110 - the engine's loop has no event to await
                await asyncio.sleep(0.1)


async def test_a_failed_vacuum_is_logged_and_the_next_one_still_comes(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """No PostgreSQL server can be made to fail a vacuum on cue: the store's call is replaced."""
    calls: list[int] = []

    async def failing_then_vacuuming(skip_if_vacuumed_within_seconds: float = 0.0) -> bool:
        calls.append(1)
        if len(calls) == 1:
            raise OSError("connection lost")
        return True

    monkeypatch.setenv("CARWASH_VACUUM_INTERVAL_SECONDS", "1")
    async with fresh_database("sqlite", "") as url, engine(url, start=False) as e:
        monkeypatch.setattr(e.store, "vacuum", failing_then_vacuuming)
        async with asyncio.timeout(10):
            while e.vacuums == 0:  # noqa: ASYNC110 - the engine's loop has no event to await
                await asyncio.sleep(0.1)
    assert any("vacuum failed" in r.getMessage() for r in caplog.records)

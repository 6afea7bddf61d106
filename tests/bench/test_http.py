"""Tests for bench/http.py: real `carwash-jobs serve` processes and the load generator."""

from __future__ import annotations

import pytest

from bench import http
from bench.support import Report
from tests.carwash_jobs.support import POSTGRES_URL_ENV


async def test_the_http_scenario_on_postgres_measures_one_process_and_the_api_and_worker_roles(
    postgres_template: tuple[str, str] | None, monkeypatch: pytest.MonkeyPatch,
) -> None:
    if postgres_template is None:
        pytest.skip(f"{POSTGRES_URL_ENV} is not set")
    server, _ = postgres_template
    monkeypatch.setattr(http, "SECONDS", 1.0)
    report = Report()

    await http.run(report, "postgres", server)

    figures = {f["metric"]: f["value"] for f in report.figures}
    for layout in ("http_enqueue", "http_api_role_enqueue"):
        assert figures[f"{layout}_requests_per_s"] > 0
        assert figures[f"{layout}_p99_ms"] >= figures[f"{layout}_p50_ms"] > 0
        assert figures[f"{layout}_non_202_responses"] == 0

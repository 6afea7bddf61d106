"""Observability through the app: /metrics parses with prometheus_client's own parser and its
counters, gauges and histograms move as jobs run; the JSON log lines of a job run carry its id,
task type and attempt; and, with the optional `otel` extra installed, an enqueue and each handler
run leave an OpenTelemetry span."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
from typing import TYPE_CHECKING, Any

import asyncpg
import pytest
from litestar.testing import AsyncTestClient
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from carwash_jobs.app import JsonLogFormatter, create_app
from carwash_jobs.store.postgres import dsn_of
from endpoints import health
from tests.carwash_jobs.support import postgres_database_from
from tests.endpoints.conftest import copy_template, idle, in_app, make_settings
from tests.endpoints.sample_tasks import MODULES

if TYPE_CHECKING:
    from pathlib import Path

    from litestar import Litestar

    from carwash_jobs.runtime import Runtime
    from carwash_jobs.settings import Settings

STATS_UP = "carwash_queue_stats_up"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture
def settings(tmp_path: Path, template_db: Path) -> Settings:
    """The endpoint tests' settings, plus `gated`, a task type that can fail and be retried."""
    copy_template(template_db, tmp_path)
    return make_settings(tmp_path, task_types=[*MODULES, "tests.endpoints.ui_tasks"])


async def scrape(client: AsyncTestClient[Litestar]) -> Samples:
    response = await client.get("/metrics")
    assert response.status_code == 200
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def enqueue(client: AsyncTestClient[Litestar], slug: str, body: dict[str, Any]) -> str:
    response = await client.post(f"/api/tasks/{slug}", json=body)
    assert response.status_code == 202, response.text
    job_id: str = response.json()["id"]
    return job_id


async def test_the_content_type_is_prometheus_text_exactly(client: AsyncTestClient[Litestar]) -> None:
    """Scrapers pick the format from this header; it carried the charset twice (Litestar
    appends one to a text/* media type, and prometheus_client's type already ends with it)."""
    response = await client.get("/metrics")

    assert response.status_code == 200
    assert response.headers.get_list("content-type") == [CONTENT_TYPE_LATEST]


async def test_the_counters_move_as_jobs_run(
    client: AsyncTestClient[Litestar], runtime: Runtime, tmp_path: Path
) -> None:
    before = await scrape(client)
    for n in range(3):
        await enqueue(client, "echo", {"message": str(n)})
    await enqueue(client, "fail", {})
    await enqueue(client, "gated", {"gate": str(tmp_path / "closed"), "max_attempts": 2})
    idle(client, runtime)

    after = await scrape(client)

    assert value(before, "carwash_jobs_enqueued_total", task_type="echo") == 0
    assert value(after, "carwash_jobs_enqueued_total", task_type="echo") == 3
    assert value(after, "carwash_jobs_enqueued_total", task_type="gated") == 1
    assert value(after, "carwash_jobs_completed_total", task_type="echo") == 3
    assert value(after, "carwash_jobs_failed_total", task_type="fail") == 1
    assert value(after, "carwash_jobs_retried_total", task_type="gated") == 1  # one attempt left
    assert value(after, "carwash_job_duration_seconds_count", task_type="echo") == 3
    assert value(after, "carwash_job_pickup_seconds_count", task_type="echo") == 3
    assert value(after, "carwash_job_duration_seconds_bucket", task_type="echo", le="+Inf") == 3


async def test_the_depth_gauges_are_set_at_scrape_time(
    client: AsyncTestClient[Litestar], runtime: Runtime
) -> None:
    await enqueue(client, "echo", {"message": "now"})
    idle(client, runtime)
    await enqueue(client, "echo", {"message": "later", "delay_seconds": 3600})
    await enqueue(client, "fail", {})
    idle(client, runtime)

    samples = await scrape(client)

    assert value(samples, "carwash_queue_jobs", status="completed") == 1
    assert value(samples, "carwash_queue_jobs", status="scheduled") == 1
    assert value(samples, "carwash_queue_jobs", status="failed") == 1
    assert value(samples, "carwash_queue_jobs", status="queued") == 0
    assert ("carwash_queue_in_memory", ()) in samples
    assert value(samples, "carwash_jobs_running") == 0


async def test_metrics_answer_with_the_local_series_while_the_database_fails(
    client: AsyncTestClient[Litestar], runtime: Runtime
) -> None:
    """/metrics was a 500 while the database was down, and Prometheus lost every series of the
    process during the outage. Its counts are left out then, and carwash_queue_stats_up says so."""
    await enqueue(client, "echo", {"message": "before the outage"})
    idle(client, runtime)
    assert value(await scrape(client), "carwash_queue_stats_up") == 1

    in_app(client, runtime.store.close)  # the store answers nothing from here on
    samples = await scrape(client)

    assert (STATS_UP, ()) in samples
    assert value(samples, STATS_UP) == 0
    assert value(samples, "carwash_jobs_enqueued_total", task_type="echo") == 1
    assert value(samples, "carwash_jobs_completed_total", task_type="echo") == 1
    assert value(samples, "carwash_job_duration_seconds_count", task_type="echo") == 1
    assert ("carwash_queue_in_memory", ()) in samples
    assert not [name for name, _ in samples if name == "carwash_queue_jobs"]  # not stale values


async def test_metrics_answer_within_their_timeout_while_the_database_hangs(
    tmp_path: Path, postgres_template: tuple[str, str] | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The counts' table locked by another session: their query waits for it, and the scrape
    waited as long (a scraper gives up after its own timeout, and the series are lost)."""
    monkeypatch.setattr(health, "STATS_TIMEOUT_SECONDS", 0.2)
    async with postgres_database_from(postgres_template, "t") as url:
        app = create_app(make_settings(tmp_path, database_url=url))
        async with AsyncTestClient(app) as client:
            locker = await asyncpg.connect(dsn_of(url))
            try:
                async with locker.transaction():
                    await locker.execute("LOCK TABLE job_counts IN ACCESS EXCLUSIVE MODE")
                    async with asyncio.timeout(10):  # a hang fails the test, not the run
                        samples = await scrape(client)
                assert value(await scrape(client), STATS_UP) == 1  # the lock released
            finally:
                await locker.close()

    assert (STATS_UP, ()) in samples
    assert value(samples, STATS_UP) == 0
    assert ("carwash_queue_in_memory", ()) in samples
    assert not [name for name, _ in samples if name == "carwash_queue_jobs"]


async def test_json_log_lines_of_a_run_carry_job_id_task_type_and_attempt(
    client: AsyncTestClient[Litestar], runtime: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="carwash_jobs")
    job_id = await enqueue(client, "echo", {"message": "logged"})
    idle(client, runtime)

    lines = [json.loads(JsonLogFormatter().format(r)) for r in caplog.records]
    of_job = [line for line in lines if line.get("job_id") == job_id]

    assert of_job, lines
    assert {line["task_type"] for line in of_job} == {"echo"}
    assert {line["attempt"] for line in of_job} == {1}
    assert any("completed in" in line["message"] for line in of_job)
    assert all({"at", "level", "logger", "message"} <= set(line) for line in of_job)


# -- OpenTelemetry ------------------------------------------------------------------------------
otel = pytest.mark.skipif(
    importlib.util.find_spec("opentelemetry.sdk") is None,
    reason="the optional otel extra (opentelemetry-api, opentelemetry-sdk) is not installed",
)


@pytest.fixture
def spans() -> Any:
    """An in-memory exporter on the process's tracer provider (set once per process: OpenTelemetry
    refuses to replace it), emptied for each test.

    The provider draws span ids from a private Random: the SDK's default draws from the global
    `random` module, and the provider outlives this test, so every later span would move the
    global random state, which hypothesis (the fuzz tests) refuses inside its tests."""
    import random

    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.sdk.trace.id_generator import IdGenerator

    class PrivateIds(IdGenerator):
        def __init__(self) -> None:
            self._random = random.Random()

        def generate_span_id(self) -> int:
            return self._random.getrandbits(64) or 1

        def generate_trace_id(self) -> int:
            return self._random.getrandbits(128) or 1

    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider(id_generator=PrivateIds())
        trace.set_tracer_provider(provider)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield exporter
    exporter.shutdown()


@otel
async def test_an_enqueue_and_each_handler_run_leave_a_span(
    client: AsyncTestClient[Litestar], runtime: Runtime, spans: Any
) -> None:
    job_id = await enqueue(client, "echo", {"message": "traced"})
    idle(client, runtime)

    finished = {span.name: span for span in spans.get_finished_spans()}

    assert finished["enqueue echo"].attributes["job.id"] == job_id
    assert finished["enqueue echo"].attributes["job.task_type"] == "echo"
    assert finished["job echo"].attributes["job.id"] == job_id
    assert finished["job echo"].attributes["job.attempt"] == 1

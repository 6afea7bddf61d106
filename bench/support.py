"""What every scenario shares: a fresh database, a no-op task type, figures and their report."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import platform
import resource
import statistics
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
from pydantic import BaseModel

from carwash_jobs import gc_tuning, heap_trim
from carwash_jobs.processor import ProcessorConfig, QueueProcessor
from carwash_jobs.queue import JobQueue
from carwash_jobs.ready import ReadyQueue
from carwash_jobs.registry import TaskOptions, TaskRegistry, TaskType
from carwash_jobs.runtime import vacuum_duty
from carwash_jobs.settings import load_settings
from carwash_jobs.store import open_store
from carwash_jobs.store.migrations import upgrade

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

    from carwash_jobs.context import JobContext
    from carwash_jobs.store.base import JobStore

log = logging.getLogger(__name__)

#: a ~200-byte JSON payload, as in the peers' figures the issue quotes
PAYLOAD_TEXT = "x" * 160


class NoopPayload(BaseModel):
    n: int
    text: str = ""


#: handler start times of jobs with a negative n, for the pickup-latency scenario
STARTS: dict[int, float] = {}
STARTED = asyncio.Event()
#: job_counts recounted from the table, as migration 0005 does: after a bulk fill that bypassed
#: the counting triggers
RECOUNT_FINISHED = """
INSERT INTO job_counts (task_type, status, shard, n)
SELECT task_type, status, 0, COUNT(*) FROM worker_queue
WHERE status IN ('completed', 'failed', 'cancelled') GROUP BY task_type, status
"""


async def noop(ctx: JobContext, payload: NoopPayload) -> None:
    if payload.n < 0:
        STARTS[payload.n] = time.perf_counter()
        STARTED.set()


NOOP = TaskType("noop", NoopPayload, noop, TaskOptions(timeout=None))


def payloads(n: int, start: int = 0) -> list[dict[str, Any]]:
    return [{"n": i, "text": PAYLOAD_TEXT} for i in range(start, start + n)]


RATE_UNITS = ("jobs/s", "req/s")


@dataclass(frozen=True)
class Ceiling:
    """The raw driver's rates in one run: batched inserts (what a bulk enqueue does), then
    claims of 100 and their completions (a drain), and the two together (end to end)."""

    insert: float
    drain: float
    end_to_end: float

    def basis(self, metric: str) -> tuple[str, float] | None:
        """The raw figure a rate `metric` compares with, by what it measures: enqueues with
        the inserts, drains with the drain, the rest (end to end, HTTP, whose server also runs
        the jobs) with the whole."""
        if metric.startswith("enqueue_"):
            return "raw_insert", self.insert
        if metric.startswith("drain"):
            return "raw_drain", self.drain
        if metric.startswith(("end_to_end", "http_enqueue")):
            return "ceiling", self.end_to_end
        return None


@dataclass
class Report:
    """Figures of one run; printed as lines, and as JSON objects with --json."""

    figures: list[dict[str, Any]] = field(default_factory=list)

    def add(self, scenario: str, backend: str, metric: str, value: float, unit: str,
            spread: tuple[float, float] | None = None) -> None:
        self.figures.append(
            {"scenario": scenario, "backend": backend, "metric": metric,
             "value": round(value, 3), "unit": unit}
        )
        line = f"  {scenario:<12} {backend:<9} {metric:<52} {value:>14,.2f} {unit}"
        if spread is not None:
            line += f"  ({spread[0]:,.2f}-{spread[1]:,.2f})"
        print(line, flush=True)

    @classmethod
    def median_of(cls, runs: list[Report]) -> Report:
        """One figure per metric: its median over `runs`, printed with its range. This
        machine's speed wanders from run to run; a median of several says more than one."""
        values: dict[tuple[str, str, str, str], list[float]] = {}
        for run in runs:
            for f in run.figures:
                key = (f["scenario"], f["backend"], f["metric"], f["unit"])
                values.setdefault(key, []).append(f["value"])
        print(f"median of {len(runs)} runs (min-max):", flush=True)
        summary = cls()
        for (scenario, backend, metric, unit), found in values.items():
            summary.add(scenario, backend, metric, statistics.median(found), unit,
                        spread=(min(found), max(found)))
        return summary

    def add_fractions(self, backend: str, ceiling: Ceiling) -> None:
        """Each rate of `backend` as a fraction of the raw figure it compares with (see
        Ceiling.basis): the machine's speed wanders from day to day, the fractions much less.
        Latencies and memory have no raw counterpart."""
        for figure in list(self.figures):
            if figure["backend"] != backend or figure["scenario"] == "ceiling":
                continue
            found = ceiling.basis(figure["metric"])
            if found is None or figure["unit"] not in RATE_UNITS:
                continue
            name, raw = found
            stem = figure["metric"].removesuffix("_jobs_per_s").removesuffix("_requests_per_s")
            self.add("ceiling", backend, f"{stem}_fraction_of_{name}", figure["value"] / raw, "x")

    def dump_json(self) -> None:
        for figure in self.figures:
            print(json.dumps(figure))


def versions() -> dict[str, str]:
    names = ["carwash-jobs", "aiosqlite", "asyncpg", "sqlalchemy", "litestar", "uvicorn",
             "pydantic"]
    found = {"python": platform.python_version(), "sqlite": __import__("sqlite3").sqlite_version}
    for name in names:
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[name] = metadata.version(name)
    return found


def rss_mb() -> float:
    """The peak resident set size of this process, in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 1024 / 1024


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[index]


def median(values: list[float]) -> float:
    return statistics.median(values)


@contextlib.contextmanager
def scratch_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="carwash-bench-", dir=os.environ.get("BENCH_DIR")) as d:
        yield Path(d)


@contextlib.asynccontextmanager
async def fresh_database(backend: str, pg_url: str) -> AsyncIterator[str]:
    """A new, migrated database: an SQLite file, or a PostgreSQL database dropped afterwards."""
    if backend == "sqlite":
        with scratch_dir() as d:
            url = f"sqlite+aiosqlite:///{d / 'bench.db'}"
            await upgrade(url)
            yield url
        return
    name = f"carwash_bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(pg_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        base = pg_url.split("://", 1)[1].rsplit("/", 1)[0]
        url = f"postgresql+asyncpg://{base}/{name}"
        await upgrade(url)
        yield url
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@dataclass
class Engine:
    store: JobStore
    queue: JobQueue
    processor: QueueProcessor
    #: hands freed memory back as a served process does; None when the setting is 0
    trimmer: heap_trim.Trimmer | None
    #: how many times the store vacuumed its tables, as a served process's scheduler has it do
    vacuums: int = 0


@contextlib.asynccontextmanager
async def engine(
    url: str, *, concurrency: int = 100, start: bool = True, task_type: TaskType[Any, Any] = NOOP
) -> AsyncIterator[Engine]:
    store = open_store(url, owner=f"bench/{os.getpid()}")
    await store.open()
    queue = JobQueue(store, TaskRegistry([task_type]), ready=ReadyQueue())
    processor = QueueProcessor(
        queue, owner=f"bench/{os.getpid()}", config=ProcessorConfig(concurrency=concurrency)
    )
    await store.listen(queue.on_notice)  # other processes' enqueues wake this one (PostgreSQL)
    if start:
        await processor.start()
    thresholds = gc.get_threshold()
    gc_tuning.settle_after_startup()  # as `serve` does once it has started
    # the intervals a served process would use (config/carwash.toml, CARWASH_HEAP_TRIM_...,
    # CARWASH_VACUUM_INTERVAL_SECONDS)
    settings = load_settings()
    trimmer = heap_trim.start_trimming(settings.heap_trim_interval_seconds)
    e = Engine(store, queue, processor, trimmer)
    vacuuming = asyncio.create_task(_vacuum_every(e, settings.vacuum_interval_seconds))
    try:
        try:
            yield e
        finally:
            vacuuming.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await vacuuming
            await processor.stop()
            queue.close()
            await store.close()
    finally:  # however the scenario ended, the next one starts as the process was
        heap_trim.stop_trimming()
        gc.unfreeze()
        gc.set_threshold(*thresholds)


async def _vacuum_every(e: Engine, seconds: float) -> None:
    """The scheduler's vacuum duty (runtime.vacuum_duty), which the engine alone does not run.
    As the scheduler does, a failed run is logged and the next one comes at the next interval."""
    while seconds > 0:
        await asyncio.sleep(seconds)
        try:
            e.vacuums += await vacuum_duty(e.store, seconds)
        except Exception:
            log.exception("vacuum failed; it runs again in %gs", seconds)


async def timed(coro: Any) -> float:
    started = time.perf_counter()
    await coro
    return time.perf_counter() - started


def pg_dsn(url: str) -> str:
    return "postgresql://" + url.split("://", 1)[1]


"""The scenarios: each runs on one backend and adds its figures to the report."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import asyncpg

from bench.support import (
    RECOUNT_FINISHED,
    STARTED,
    STARTS,
    Ceiling,
    current_rss_mb,
    engine,
    fresh_database,
    payloads,
    percentile,
    pg_dsn,
    timed,
)
from carwash_jobs.store.base import FailedFilter
from carwash_jobs.store.sqlite import ts

if TYPE_CHECKING:
    from bench.support import Report

BULK_CHUNK = 1000
CONCURRENT_CALLERS = 64
WORKERS_TIMEOUT_SECONDS = 600.0
WORKERS_POLL_SECONDS = 0.02
#: from the counters the triggers keep: polling a count of the table would take a share of the
#: two cores the workers run on
COUNT_COMPLETED = "SELECT COALESCE(SUM(n), 0) FROM job_counts WHERE status = 'completed'"


async def throughput(report: Report, backend: str, pg_url: str, jobs: int) -> float:
    """Enqueue rates (one at a time, many callers, bulk), the drain rate, and end to end."""
    name = "throughput"
    async with fresh_database(backend, pg_url) as url, engine(url, start=False) as e:
        single = min(jobs, 2000)
        seconds = await timed(_enqueue_one_by_one(e.queue, single))
        report.add(name, backend, "enqueue_single_jobs_per_s", single / seconds, "jobs/s")
        seconds = await timed(_enqueue_concurrently(e.queue, jobs))
        report.add(name, backend, "enqueue_concurrent64_jobs_per_s", jobs / seconds, "jobs/s")
        seconds = await timed(_enqueue_bulk(e.queue, jobs))
        report.add(name, backend, "enqueue_bulk_jobs_per_s", jobs / seconds, "jobs/s")
        total = single + 2 * jobs
        await e.processor.start()
        seconds = await timed(e.processor.run_until_idle(timeout=3600))
        report.add(name, backend, "drain_jobs_per_s", total / seconds, "jobs/s")
    async with fresh_database(backend, pg_url) as url, engine(url) as e:
        seconds = await timed(_enqueue_and_drain(e, jobs))
        report.add(name, backend, "end_to_end_jobs_per_s", jobs / seconds, "jobs/s")
        return jobs / seconds


async def _enqueue_one_by_one(queue: object, n: int) -> None:
    for i in range(n):
        await queue.enqueue("noop", {"n": i, "text": "x" * 160})  # type: ignore[attr-defined]


async def _enqueue_concurrently(queue: object, n: int) -> None:
    per_caller = n // CONCURRENT_CALLERS

    async def caller(k: int) -> None:
        for i in range(per_caller):
            await queue.enqueue("noop", {"n": k * per_caller + i, "text": "x" * 160})  # type: ignore[attr-defined]

    await asyncio.gather(*(caller(k) for k in range(CONCURRENT_CALLERS)))


async def _enqueue_bulk(queue: object, n: int) -> None:
    for start in range(0, n, BULK_CHUNK):
        await queue.enqueue_many("noop", payloads(min(BULK_CHUNK, n - start), start))  # type: ignore[attr-defined]


async def _enqueue_and_drain(e: object, n: int) -> None:
    await _enqueue_bulk(e.queue, n)  # type: ignore[attr-defined]
    await e.processor.run_until_idle(timeout=3600)  # type: ignore[attr-defined]


async def pickup(report: Report, backend: str, pg_url: str, samples: int = 500) -> None:
    """Enqueue call to handler start with an idle processor, in one process."""
    latencies: list[float] = []
    async with fresh_database(backend, pg_url) as url, engine(url) as e:
        for i in range(1, samples + 1):
            STARTED.clear()
            started = time.perf_counter()
            await e.queue.enqueue("noop", {"n": -i})
            await STARTED.wait()
            latencies.append((STARTS.pop(-i) - started) * 1000)
            await e.processor.run_until_idle()
    for p in (50, 95, 99):
        report.add("pickup", backend, f"pickup_p{p}_ms", percentile(latencies, p), "ms")


async def pickup_cross_process(report: Report, pg_url: str, samples: int = 500) -> None:
    """PostgreSQL: enqueue in this process, handler start in a worker process (NOTIFY)."""
    async with fresh_database("postgres", pg_url) as url, engine(url, start=False) as e:
        worker = subprocess.Popen(  # noqa: ASYNC220 - a spawn, not a wait
            [sys.executable, "-m", "bench.worker", url], stdout=subprocess.PIPE, text=True,
        )
        try:
            assert worker.stdout is not None
            assert worker.stdout.readline().strip() == "ready"
            latencies: list[float] = []
            for i in range(1, samples + 1):
                started = time.time()
                await e.queue.enqueue("noop", {"n": -i})
                line = await asyncio.to_thread(worker.stdout.readline)
                latencies.append((float(line.split()[1]) - started) * 1000)
        finally:
            worker.terminate()
            worker.wait(timeout=30)
            if worker.stdout is not None:
                worker.stdout.close()
    for p in (50, 95, 99):
        report.add("pickup_xproc", "postgres", f"pickup_p{p}_ms", percentile(latencies, p), "ms")


async def workers(report: Report, pg_url: str, jobs: int) -> None:
    """PostgreSQL: the same backlog drained by one worker process, then by two. The claim's
    SKIP LOCKED lets processes share a table; this says whether that buys any throughput."""
    rates: dict[int, float] = {}
    for k in (1, 2):
        rates[k] = await _drain_with_workers(pg_url, jobs, k)
        report.add("workers", "postgres", f"drain_{k}_workers_jobs_per_s", rates[k], "jobs/s")
    report.add("workers", "postgres", "two_workers_speedup", rates[2] / rates[1], "x")


async def _drain_with_workers(pg_url: str, jobs: int, k: int) -> float:
    """`jobs` no-op jobs drained by `k` `bench.worker --drain` processes: timed from "go" to
    the poll that finds every job completed (so to within WORKERS_POLL_SECONDS)."""
    async with fresh_database("postgres", pg_url) as url:
        async with engine(url, start=False) as e:
            await _enqueue_bulk(e.queue, jobs)
        conn = await asyncpg.connect(pg_dsn(url))
        procs: list[subprocess.Popen[str]] = []
        try:
            for _ in range(k):  # spawned one by one inside the try: whatever started is stopped
                procs.append(subprocess.Popen(  # noqa: ASYNC220 - a spawn, not a wait
                    [sys.executable, "-m", "bench.worker", url, "--drain", str(jobs)],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                ))
            async with asyncio.timeout(WORKERS_TIMEOUT_SECONDS):  # a hang fails, loudly
                for proc in procs:
                    assert proc.stdout is not None
                    line = await asyncio.to_thread(proc.stdout.readline)
                    assert line.strip() == "ready", f"worker {proc.pid} said {line!r}"
                for proc in procs:
                    assert proc.stdin is not None
                    proc.stdin.write("go\n")
                    proc.stdin.flush()
                started = time.perf_counter()
                while await conn.fetchval(COUNT_COMPLETED) < jobs:
                    if any(proc.poll() is not None for proc in procs):
                        raise RuntimeError("a drain worker exited before the backlog was done")
                    await asyncio.sleep(WORKERS_POLL_SECONDS)
                seconds = time.perf_counter() - started
        finally:
            await conn.close()
            _stop(procs)
    return jobs / seconds


def _stop(procs: list[subprocess.Popen[str]]) -> None:
    """Terminate all first, then wait: they stop side by side, not one after another."""
    for proc in procs:
        proc.terminate()
    for proc in procs:
        proc.wait(timeout=30)
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()


async def ceiling(report: Report, backend: str, pg_url: str, jobs: int) -> Ceiling:
    """The same batched insert, claim and complete straight against the driver: the insert
    phase, the drain phase and the two together."""
    async with fresh_database(backend, pg_url) as url:
        if backend == "sqlite":
            timings = await asyncio.to_thread(_sqlite_ceiling, url.split(":///", 1)[1], jobs)
        else:
            timings = await _pg_ceiling(pg_dsn(url), jobs)
    insert_seconds, drain_seconds = timings
    raw = Ceiling(insert=jobs / insert_seconds, drain=jobs / drain_seconds,
                  end_to_end=jobs / (insert_seconds + drain_seconds))
    report.add("ceiling", backend, "raw_insert_jobs_per_s", raw.insert, "jobs/s")
    report.add("ceiling", backend, "raw_drain_jobs_per_s", raw.drain, "jobs/s")
    report.add("ceiling", backend, "raw_end_to_end_jobs_per_s", raw.end_to_end, "jobs/s")
    return raw


_RAW_INSERT = """
INSERT INTO worker_queue (id, task_type, queue, status, priority, payload, tags, attempts,
  max_attempts, run_at, created_at, progress_done, attempt_history, depends_on)
VALUES (?, 'noop', 'default', 'queued', 0, ?, '[]', 0, 5, ?, ?, 0, '[]', '[]')
"""
#: through the ready index, as the engine's claim is: without INDEXED BY, SQLite (which has no
#: statistics) reads the (status, id) index and sorts every queued job on each claim
_RAW_CLAIM = """
UPDATE worker_queue SET status = 'running', attempts = attempts + 1, lease_owner = 'raw'
WHERE id IN (SELECT id FROM worker_queue INDEXED BY ix_worker_queue_ready WHERE status = 'queued'
             ORDER BY priority DESC, run_at, id LIMIT 100)
RETURNING id
"""


def _sqlite_ceiling(path: str, jobs: int) -> tuple[float, float]:
    """Seconds for the inserts, and for the claims and completions after them."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    now = ts(datetime.now(UTC))
    payload = '{"n":1,"text":"' + "x" * 160 + '"}'
    started = time.perf_counter()
    for start in range(0, jobs, 100):
        conn.execute("BEGIN")
        conn.executemany(_RAW_INSERT, [(f"{start + i:032x}", payload, now, now) for i in range(100)])
        conn.execute("COMMIT")
    inserted = time.perf_counter()
    while True:
        conn.execute("BEGIN IMMEDIATE")
        ids = [r[0] for r in conn.execute(_RAW_CLAIM).fetchall()]
        conn.execute("COMMIT")
        if not ids:
            break
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            "UPDATE worker_queue SET status = 'completed', result = 'null' WHERE id = ?",
            [(i,) for i in ids],
        )
        conn.execute("COMMIT")
    finished = time.perf_counter()
    conn.close()
    return inserted - started, finished - inserted


async def _pg_ceiling(dsn: str, jobs: int) -> tuple[float, float]:
    """Seconds for the inserts, and for the claims and completions after them."""
    conn = await asyncpg.connect(dsn)
    payload = '{"n":1,"text":"' + "x" * 160 + '"}'
    started = time.perf_counter()
    try:
        for start in range(0, jobs, 100):
            async with conn.transaction():
                await conn.executemany(
                    """INSERT INTO worker_queue (id, task_type, queue, status, priority, payload,
                    tags, attempts, max_attempts, run_at, created_at, progress_done,
                    attempt_history, depends_on) VALUES ($1, 'noop', 'default', 'queued', 0,
                    $2::json, '[]', 0, 5, now(), now(), 0, '[]', '[]')""",
                    [(f"{start + i:032x}", payload) for i in range(100)],
                )
        inserted = time.perf_counter()
        # by id, as the engine claims what its memory holds: a claim that searched the ready
        # index instead would walk the index entries of every job claimed before it (dead
        # until vacuum), and the "ceiling" would fall below the engine (3,800 jobs/s, measured)
        for start in range(0, jobs, 100):
            ids = [r[0] for r in await conn.fetch(
                """UPDATE worker_queue SET status = 'running', attempts = attempts + 1
                WHERE id IN (SELECT id FROM worker_queue WHERE id = ANY($1::text[])
                AND status = 'queued' FOR UPDATE SKIP LOCKED)
                RETURNING id""", [f"{start + i:032x}" for i in range(100)])]
            await conn.execute(
                "UPDATE worker_queue SET status = 'completed', result = 'null' WHERE id = ANY($1)",
                ids,
            )
        finished = time.perf_counter()
    finally:
        await conn.close()
    return inserted - started, finished - inserted


async def scale(report: Report, backend: str, pg_url: str, jobs: int, history: int) -> float:
    """Throughput with `history` finished jobs already in the table; RSS with that many due.
    Returns the end-to-end rate with that history."""
    async with fresh_database(backend, pg_url) as url:
        await _fill(url, backend, history, status="completed")
        async with engine(url) as e:
            seconds = await timed(_enqueue_and_drain(e, jobs))
        with_history = jobs / seconds
        report.add("scale", backend, f"end_to_end_with_{history}_finished_jobs_per_s",
                   with_history, "jobs/s")
    async with fresh_database(backend, pg_url) as url, engine(url, start=False) as e:
        before = current_rss_mb()
        for start in range(0, history, 10_000):
            await e.queue.enqueue_many("noop", payloads(min(10_000, history - start), start))
        report.add("scale", backend, f"rss_growth_with_{history}_due_jobs_in_memory_mb",
                   current_rss_mb() - before, "MB")
        report.add("scale", backend, "in_memory_jobs", len(e.queue.ready or ()), "jobs")
    return with_history


async def _fill(url: str, backend: str, n: int, status: str) -> None:
    """`n` rows written set-based, straight through the driver (the fast way to a big table),
    counted as the triggers would count them."""
    finished = status in ("completed", "failed", "cancelled")
    finished_at = "datetime('now')" if finished else "NULL"
    values = (
        f"SELECT printf('%032x', value), 'noop', 'default', '{status}', 0, "
        f"'{{\"n\":1}}', '[]', 1, 5, datetime('now'), datetime('now'), {finished_at}, 0, '[]', '[]' "
    )
    if backend == "sqlite":
        conn = sqlite3.connect(url.split(":///", 1)[1], isolation_level=None)
        conn.execute("BEGIN")
        conn.execute(
            "WITH RECURSIVE s(value) AS (SELECT 1 UNION ALL SELECT value + 1 FROM s WHERE value < ?) "
            "INSERT INTO worker_queue (id, task_type, queue, status, priority, payload, tags, "
            "attempts, max_attempts, run_at, created_at, finished_at, progress_done, "
            f"attempt_history, depends_on) {values} FROM s", (n,),
        )
        conn.execute(RECOUNT_FINISHED)  # an insert fires none of SQLite's count triggers
        conn.execute("COMMIT")
        conn.close()
        return
    conn2 = await asyncpg.connect(pg_dsn(url))
    try:
        async with conn2.transaction():
            # no row triggers (the finished-count trigger would run a million times): the
            # counts are recounted once, as migration 0005 does
            await conn2.execute("SET LOCAL session_replication_role = replica")
            await conn2.execute(
                "INSERT INTO worker_queue (id, task_type, queue, status, priority, payload, tags, "
                "attempts, max_attempts, run_at, created_at, finished_at, progress_done, "
                f"attempt_history, depends_on) SELECT lpad(to_hex(g), 32, '0'), 'noop', 'default', "
                f"'{status}', 0, '{{\"n\":1}}', '[]', 1, 5, now(), now(), "
                f"{'now()' if finished else 'NULL'}, 0, '[]', '[]' FROM generate_series(1, $1) g", n,
            )
            await conn2.execute(RECOUNT_FINISHED)
        await conn2.execute("VACUUM ANALYZE worker_queue")
    finally:
        await conn2.close()


async def retry(report: Report, backend: str, pg_url: str, jobs: int) -> None:
    """A bulk retry of `jobs` failed jobs, as `POST /api/jobs/retry-failed` with no filter."""
    async with fresh_database(backend, pg_url) as url:
        await _fill(url, backend, jobs, status="failed")
        async with engine(url, start=False) as e:
            started = time.perf_counter()
            retried = await e.queue.retry_failed(FailedFilter())
            seconds = time.perf_counter() - started
    if len(retried) != jobs:
        raise RuntimeError(f"retried {len(retried)} of {jobs} failed jobs")
    report.add("retry", backend, "retry_failed_jobs_per_s", jobs / seconds, "jobs/s")


async def soak(report: Report, backend: str, pg_url: str, rate: float, seconds: float) -> None:
    """A steady load at `rate` jobs/s for `seconds`; RSS at the start and the end."""
    async with fresh_database(backend, pg_url) as url, engine(url) as e:
        await _enqueue_bulk(e.queue, 1000)
        await e.processor.run_until_idle(timeout=60)
        start_rss = current_rss_mb()
        deadline = time.perf_counter() + seconds
        sent = 0
        tick = 0.1
        while time.perf_counter() < deadline:
            batch = max(1, int(rate * tick))
            began = time.perf_counter()
            await e.queue.enqueue_many("noop", payloads(batch, sent))
            sent += batch
            await asyncio.sleep(max(0.0, tick - (time.perf_counter() - began)))
        await e.processor.run_until_idle(timeout=120)
        end_rss = current_rss_mb()
    report.add("soak", backend, "soak_rate_jobs_per_s", rate, "jobs/s")
    report.add("soak", backend, "soak_jobs", sent, "jobs")
    if e.trimmer is not None:  # what handing freed memory back cost: the longest pause
        report.add("soak", backend, "soak_heap_trims", e.trimmer.trims, "trims")
        report.add("soak", backend, "soak_longest_trim_ms", e.trimmer.longest_seconds * 1000, "ms")
    report.add("soak", backend, "soak_vacuums", e.vacuums, "vacuums")
    report.add("soak", backend, "soak_rss_start_mb", start_rss, "MB")
    report.add("soak", backend, "soak_rss_end_mb", end_rss, "MB")
    report.add("soak", backend, "soak_rss_growth_pct", (end_rss / start_rss - 1) * 100, "%")


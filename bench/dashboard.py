"""Dashboard scenario: with a million finished jobs in the table, how long each dashboard page and
each list route takes through the ASGI app (the whole request: routing, session or token, store
reads, rendering), as p50 and p99 over repeated requests.

The rows are written set-based, straight through the driver (like scenarios._fill), spread over
the last seven days (the default retention of completed jobs), 2 % failed, over four task types.
A bulk write like this bypasses the counting triggers on SQLite (they fire on the moves of a
job's life, not on a raw INSERT of finished rows), so the fill recounts job_counts afterwards,
as migration 0005 does; on PostgreSQL the fill switches triggers off for the session and
recounts the same way, rather than firing a million row triggers.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING
from urllib.parse import quote

import asyncpg

from bench.support import RECOUNT_FINISHED, fresh_database, percentile, pg_dsn, scratch_dir

if TYPE_CHECKING:
    from bench.support import Report

TOKEN = "bench-dashboard-token"
HISTORY_DEFAULT = 1_000_000
SAMPLES_DEFAULT = 40
WARMUP = 3
SPREAD_SECONDS = 7 * 24 * 3600
TASK_TYPES = ("email", "customer_credits", "financial_sync", "file_upload")

_SQLITE_FILL = """
WITH RECURSIVE s(value) AS (SELECT 1 UNION ALL SELECT value + 1 FROM s WHERE value < :n),
t(value, at) AS (
  SELECT value, strftime('%Y-%m-%d %H:%M:%f', 'now', '-' || (value * :spread / :n) || ' seconds')
  FROM s)
INSERT INTO worker_queue (id, task_type, queue, status, priority, payload, tags, attempts,
  max_attempts, run_at, created_at, started_at, finished_at, progress_done, attempt_history,
  depends_on, error)
SELECT printf('%012x', CAST((julianday(at) - 2440587.5) * 86400000 AS INTEGER)) || printf('%020x', value),
  CASE value % 4 WHEN 0 THEN 'email' WHEN 1 THEN 'customer_credits' WHEN 2 THEN 'financial_sync'
    ELSE 'file_upload' END,
  'default', CASE WHEN value % 50 = 0 THEN 'failed' ELSE 'completed' END, 0,
  '{"tenant_id":"tenant-1","n":1}', '["bench"]', 1, 5, at || '000', at || '000', at || '000',
  at || '000', 1, '[]', '[]', CASE WHEN value % 50 = 0 THEN 'RuntimeError: boom' END
FROM t
"""
_PG_FILL = """
INSERT INTO worker_queue (id, task_type, queue, status, priority, payload, tags, attempts,
  max_attempts, run_at, created_at, started_at, finished_at, progress_done, attempt_history,
  depends_on, error)
SELECT lpad(to_hex((extract(epoch FROM at) * 1000)::bigint), 12, '0') || lpad(to_hex(g), 20, '0'),
  (ARRAY['email', 'customer_credits', 'financial_sync', 'file_upload'])[g % 4 + 1],
  'default', CASE WHEN g % 50 = 0 THEN 'failed' ELSE 'completed' END, 0,
  '{"tenant_id":"tenant-1","n":1}', '["bench"]', 1, 5, at, at, at, at, 1, '[]', '[]',
  CASE WHEN g % 50 = 0 THEN 'RuntimeError: boom' END
FROM (SELECT g, now() - make_interval(secs => g::double precision * $2 / $1) AS at
      FROM generate_series(1, $1) g) s
"""
#: the fill's one tag, indexed as the store indexes a job's tags
_TAGS = "INSERT INTO job_tags (tag, job_id) SELECT 'bench', id FROM worker_queue"


async def fill(url: str, backend: str, n: int) -> None:
    if backend == "sqlite":
        await asyncio.to_thread(_fill_sqlite, url.split(":///", 1)[1], n)
        return
    conn = await asyncpg.connect(pg_dsn(url))
    try:
        async with conn.transaction():
            await conn.execute("SET LOCAL session_replication_role = replica")  # no row triggers
            await conn.execute(_PG_FILL, n, SPREAD_SECONDS)
            await conn.execute(_TAGS)
            await conn.execute("DELETE FROM job_counts")
            await conn.execute(RECOUNT_FINISHED)
        await conn.execute("VACUUM ANALYZE worker_queue")
        await conn.execute("VACUUM ANALYZE job_tags")
    finally:
        await conn.close()


def _fill_sqlite(path: str, n: int) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("BEGIN")
        conn.execute(_SQLITE_FILL, {"n": n, "spread": SPREAD_SECONDS})
        conn.execute(_TAGS)
        conn.execute("DELETE FROM job_counts")
        conn.execute(RECOUNT_FINISHED)
        conn.execute("COMMIT")
    finally:
        conn.close()


async def run(report: Report, backend: str, pg_url: str, history: int = HISTORY_DEFAULT,
              samples: int = SAMPLES_DEFAULT) -> None:
    from litestar.testing import AsyncTestClient

    from carwash_jobs.app import create_app
    from carwash_jobs.settings import load_settings

    name = "dashboard"
    async with fresh_database(backend, pg_url) as url:
        started = time.perf_counter()
        await fill(url, backend, history)
        report.add(name, backend, f"fill_{history}_finished_jobs_s", time.perf_counter() - started, "s")
        with scratch_dir() as files:
            settings = load_settings(
                database_url=url, api_token=TOKEN, task_types=["bench.noop_task"],
                schedules_file="", files_dir=str(files), reload_interval_seconds=600.0,
            )
            async with AsyncTestClient(create_app(settings)) as client:
                client.follow_redirects = False
                login = await client.post("/ui/login", data={"token": TOKEN})
                assert login.status_code == 303, login.text
                newest = (await client.get("/api/jobs", params={"limit": 1},
                                           headers={"Authorization": f"Bearer {TOKEN}"})).json()
                job_id = newest["items"][0]["id"]
                for label, path in _routes(job_id):
                    timings = await _time(client, path, samples)
                    report.add(name, backend, f"{label}_p50_ms", percentile(timings, 50), "ms")
                    report.add(name, backend, f"{label}_p99_ms", percentile(timings, 99), "ms")


def _routes(job_id: str) -> list[tuple[str, str]]:
    """(label, path): every dashboard page and fragment, and the API's list routes with each
    filter: ones that match most rows, few rows, and none."""
    hour_ago = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    six_days_ago = (datetime.now(UTC) - timedelta(days=6)).isoformat()
    return [
        ("ui_overview", "/ui"),
        ("ui_overview_partial", "/ui/partials/overview"),
        ("ui_jobs", "/ui/jobs"),
        ("ui_jobs_partial", "/ui/jobs?limit=200"),
        ("ui_jobs_failed", "/ui/jobs?status=failed"),
        ("ui_jobs_task_type", "/ui/jobs?task_type=email"),
        ("ui_jobs_running_none", "/ui/jobs?status=running"),
        ("ui_jobs_tag_none", "/ui/jobs?tag=nothing"),
        ("ui_jobs_tag_all", "/ui/jobs?tag=bench"),
        ("ui_jobs_tag_failed", "/ui/jobs?tag=bench&status=failed"),
        ("ui_job", f"/ui/jobs/{job_id}"),
        ("ui_job_partial", f"/ui/partials/jobs/{job_id}"),
        ("api_jobs", "/api/jobs"),
        ("api_jobs_500", "/api/jobs?limit=500"),
        ("api_jobs_failed", "/api/jobs?status=failed"),
        ("api_jobs_task_type", "/api/jobs?task_type=email"),
        ("api_jobs_type_failed", "/api/jobs?task_type=email&status=failed"),
        ("api_jobs_queue_none", "/api/jobs?queue=nowhere"),
        ("api_jobs_cancelled_none", "/api/jobs?status=cancelled"),
        ("api_jobs_tag_all", "/api/jobs?tag=bench"),
        ("api_jobs_created_last_hour", f"/api/jobs?created_after={quote(hour_ago)}"),
        ("api_jobs_created_before_6d", f"/api/jobs?created_before={quote(six_days_ago)}"),
        ("api_queue_stats", "/api/queue/stats"),
        ("metrics", "/metrics"),
    ]


async def _time(client: object, path: str, samples: int) -> list[float]:
    headers = {"Authorization": f"Bearer {TOKEN}"} if not path.startswith("/ui") else {}
    timings: list[float] = []
    for i in range(WARMUP + samples):
        began = time.perf_counter()
        response = await client.get(path, headers=headers)  # type: ignore[attr-defined]
        elapsed = (time.perf_counter() - began) * 1000
        assert response.status_code == 200, (path, response.status_code, response.text[:200])
        if i >= WARMUP:
            timings.append(elapsed)
    return timings


if __name__ == "__main__":  # python -m bench.dashboard [sqlite|postgres] [history]
    import os
    import sys

    from bench.support import Report

    chosen = sys.argv[1:2] or ["sqlite", "postgres"]
    rows = int(sys.argv[2]) if len(sys.argv) > 2 else HISTORY_DEFAULT
    pg = os.environ.get("CARWASH_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    for chosen_backend in chosen:
        asyncio.run(run(Report(), chosen_backend, pg, rows))

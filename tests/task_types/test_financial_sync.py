"""financial_sync: incremental runs move only new rows; a full resync matches the POS exactly.

A killed run resumes from its checkpoint without counting anything twice."""

from __future__ import annotations

import os
import secrets
import sqlite3
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from carwash_jobs.lifecycle import JobStatus
from task_types import financial_sync
from tests.task_types.support import dies_on_call, execute, query, recover, run_job, sqlite_url

if TYPE_CHECKING:
    from pathlib import Path

    from tests.task_types.support import Runtimes

PACKAGES = [("Basic Wash", 999), ("Deluxe Wash", 1499), ("Ultimate Shine", 2199)]
START = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)
POSTGRES_URL_ENV = "CARWASH_TEST_POSTGRES_URL"


def add_sales(url: str, tenant: str, count: int, *, first: int = 0) -> None:
    """`count` sales, one every 5 hours from START (so they span several days)."""
    rows = []
    for n in range(first, first + count):
        package, price = PACKAGES[n % len(PACKAGES)]
        at = (START + timedelta(hours=5 * n)).strftime("%Y-%m-%d %H:%M:%S.%f")
        rows.append((tenant, at, package, price, "card" if n % 2 else "cash"))
    execute(url, "INSERT INTO pos_transactions (tenant_id, occurred_at, package, amount_cents, "
                 "payment_method) VALUES (?, ?, ?, ?, ?)", rows)


def source(url: str, tenant: str) -> list[tuple[Any, ...]]:
    return query(url, "SELECT id, occurred_at, package, amount_cents, payment_method "
                      "FROM pos_transactions WHERE tenant_id = ? ORDER BY id", (tenant,))


def reporting(url: str, tenant: str) -> list[tuple[Any, ...]]:
    return query(url, "SELECT pos_transaction_id, occurred_at, package, amount_cents, "
                      "payment_method FROM reporting_transactions WHERE tenant_id = ? "
                      "ORDER BY pos_transaction_id", (tenant,))


def daily_totals(url: str, tenant: str) -> list[tuple[Any, ...]]:
    return query(url, "SELECT business_date, transactions, revenue_cents "
                      "FROM reporting_daily_totals WHERE tenant_id = ? ORDER BY business_date",
                 (tenant,))


def expected_totals(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    by_day: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for _, occurred_at, _, amount, _ in rows:
        by_day[occurred_at[:10]][0] += 1
        by_day[occurred_at[:10]][1] += amount
    return [(day, n, cents) for day, (n, cents) in sorted(by_day.items())]


def assert_in_step(pos_url: str, url: str, tenant: str) -> None:
    assert reporting(url, tenant) == source(pos_url, tenant)
    assert daily_totals(url, tenant) == expected_totals(source(pos_url, tenant))


async def test_an_incremental_run_moves_only_new_rows(runtimes: Runtimes) -> None:
    runtime = await runtimes.start()
    url = runtime.settings.database_url
    add_sales(url, "tenant-1", 30)
    add_sales(url, "tenant-2", 4)

    first = await run_job(runtime, "financial_sync", {"tenant_id": "tenant-1", "chunk_size": 8})
    add_sales(url, "tenant-1", 5, first=30)
    second = await run_job(runtime, "financial_sync", {"tenant_id": "tenant-1", "chunk_size": 8})
    third = await run_job(runtime, "financial_sync", {"tenant_id": "tenant-1"})

    ids = [row[0] for row in source(url, "tenant-1")]
    assert first.result == {"rows": 30, "cursor": ids[29], "full": False, "removed": 0}
    assert second.result == {"rows": 5, "cursor": ids[34], "full": False, "removed": 0}
    assert third.result == {"rows": 0, "cursor": ids[34], "full": False, "removed": 0}
    assert (second.progress_done, second.progress_total) == (5, 5)
    assert_in_step(url, url, "tenant-1")
    assert reporting(url, "tenant-2") == []
    assert query(url, "SELECT tenant_id, last_transaction_id, last_job_id "
                      "FROM financial_sync_state") == [("tenant-1", ids[34], second.id)]


async def test_a_run_killed_after_its_first_chunk_resumes_from_the_checkpoint(
    runtimes: Runtimes, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = await runtimes.start()
    url = runtime.settings.database_url
    add_sales(url, "tenant-1", 25)
    ids = [row[0] for row in source(url, "tenant-1")]
    reads: list[int] = []
    read_chunk = financial_sync.read_chunk

    async def recording_read(source: Any, tenant: str, after: int, limit: int) -> Any:
        reads.append(after)
        return await read_chunk(source, tenant, after, limit)

    monkeypatch.setattr(financial_sync, "read_chunk", recording_read)
    monkeypatch.setattr(financial_sync, "write_chunk",
                        dies_on_call(runtime, financial_sync.write_chunk, call=2))

    inserted = await runtime.queue.enqueue("financial_sync", {"tenant_id": "tenant-1",
                                                              "chunk_size": 10})
    assert runtime.processor is not None
    await runtime.processor.run_until_idle(timeout=5)
    dead = await runtime.store.get(inserted.job.id)
    assert dead.checkpoint == {"cursor": ids[9], "rows": 10}
    assert len(reporting(url, "tenant-1")) == 10
    job = await recover(runtime, inserted.job.id)

    assert job.status == JobStatus.completed, job.error
    assert reads == [0, ids[9], ids[9], ids[19]]  # the retry starts at the checkpoint
    assert job.result == {"rows": 25, "cursor": ids[24], "full": False, "removed": 0}
    assert_in_step(url, url, "tenant-1")


@pytest.mark.parametrize("call", [1, 2])
async def test_a_chunk_written_again_after_a_crash_is_not_counted_twice(
    runtimes: Runtimes, monkeypatch: pytest.MonkeyPatch, call: int
) -> None:
    """The worker dies after a chunk committed but before its checkpoint: the retry writes
    chunk 2 again, and neither the rows nor the daily totals double. After the first chunk
    there is no checkpoint at all: the retry starts where the tenant's sync state says, which
    this job moved, and its result still counts the rows of the attempt that died (it told 15)."""
    runtime = await runtimes.start()
    url = runtime.settings.database_url
    add_sales(url, "tenant-1", 25)
    monkeypatch.setattr(financial_sync, "write_chunk",
                        dies_on_call(runtime, financial_sync.write_chunk, call=call, after=True))

    inserted = await runtime.queue.enqueue("financial_sync", {"tenant_id": "tenant-1",
                                                              "chunk_size": 10})
    job = await recover(runtime, inserted.job.id)

    assert job.status == JobStatus.completed, job.error
    assert job.result["rows"] == 25
    assert_in_step(url, url, "tenant-1")


async def test_a_full_resync_makes_reporting_match_the_source(runtimes: Runtimes) -> None:
    runtime = await runtimes.start()
    url = runtime.settings.database_url
    add_sales(url, "tenant-1", 20)
    add_sales(url, "tenant-2", 3)
    await run_job(runtime, "financial_sync", {"tenant_id": "tenant-1"})
    await run_job(runtime, "financial_sync", {"tenant_id": "tenant-2"})
    ids = [row[0] for row in source(url, "tenant-1")]
    # corrections in the POS that an incremental run cannot see: a refund-adjusted amount, a
    # voided sale, and a late upload of an old sale
    execute(url, "UPDATE pos_transactions SET amount_cents = 500 WHERE id = ?", (ids[3],))
    execute(url, "DELETE FROM pos_transactions WHERE id = ?", (ids[7],))
    add_sales(url, "tenant-1", 1, first=2)
    incremental = await run_job(runtime, "financial_sync", {"tenant_id": "tenant-1"})
    # the newest sale voided once synced: its id lies above every one left, beyond the
    # cursor of the full resync (which kept it, and its revenue)
    newest = max(r[0] for r in source(url, "tenant-1"))
    execute(url, "DELETE FROM pos_transactions WHERE id = ?", (newest,))
    assert reporting(url, "tenant-1") != source(url, "tenant-1")

    full = await run_job(runtime, "financial_sync", {"tenant_id": "tenant-1", "full": True,
                                                     "chunk_size": 6})

    assert incremental.result["rows"] == 1
    assert full.status == JobStatus.completed, full.error
    assert full.result == {"rows": 19, "cursor": max(r[0] for r in source(url, "tenant-1")),
                           "full": True, "removed": 2}
    assert_in_step(url, url, "tenant-1")
    assert_in_step(url, url, "tenant-2")  # another tenant's report is left alone


async def test_a_separate_financial_database_is_read_through_its_url(
    runtimes: Runtimes, tmp_path: Path
) -> None:
    pos_url = sqlite_url(tmp_path / "pos.db")
    with sqlite3.connect(tmp_path / "pos.db") as conn:
        conn.execute("CREATE TABLE pos_transactions (id INTEGER PRIMARY KEY, tenant_id TEXT, "
                     "occurred_at TEXT, package TEXT, amount_cents INTEGER, "
                     "payment_method TEXT, customer_id INTEGER)")
    conn.close()
    add_sales(pos_url, "tenant-1", 12)
    runtime = await runtimes.start(financial_database_url=pos_url)
    url = runtime.settings.database_url

    job = await run_job(runtime, "financial_sync", {"tenant_id": "tenant-1", "chunk_size": 5})

    assert job.status == JobStatus.completed, job.error
    assert job.result["rows"] == 12
    assert query(url, "SELECT COUNT(*) FROM pos_transactions") == [(0,)]
    assert_in_step(pos_url, url, "tenant-1")


async def test_a_postgres_financial_database_is_read_through_its_url(runtimes: Runtimes) -> None:
    server_url = os.environ.get(POSTGRES_URL_ENV)
    if not server_url:
        pytest.skip(f"{POSTGRES_URL_ENV} is not set")
    server = make_url(server_url).set(drivername="postgresql")
    name = f"carwash_pos_{secrets.token_hex(6)}"
    admin = await asyncpg.connect(server.render_as_string(hide_password=False))
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        pos = await asyncpg.connect(server.set(database=name).render_as_string(hide_password=False))
        await pos.execute("CREATE TABLE pos_transactions (id SERIAL PRIMARY KEY, tenant_id TEXT, "
                          "occurred_at TIMESTAMPTZ, package TEXT, amount_cents INTEGER, "
                          "payment_method TEXT, customer_id INTEGER)")
        sales = [("tenant-1", START + timedelta(hours=5 * n), *PACKAGES[n % 3], "card")
                 for n in range(11)]
        await pos.executemany("INSERT INTO pos_transactions (tenant_id, occurred_at, package, "
                              "amount_cents, payment_method) VALUES ($1, $2, $3, $4, $5)", sales)
        await pos.close()
        pos_url = server.set(drivername="postgresql+asyncpg", database=name)
        runtime = await runtimes.start(
            financial_database_url=pos_url.render_as_string(hide_password=False))
        url = runtime.settings.database_url

        job = await run_job(runtime, "financial_sync", {"tenant_id": "tenant-1", "chunk_size": 4})

        assert job.status == JobStatus.completed, job.error
        expected = [(n + 1, (START + timedelta(hours=5 * n)).strftime("%Y-%m-%d %H:%M:%S.%f"),
                     *PACKAGES[n % 3], "card") for n in range(11)]
        assert reporting(url, "tenant-1") == expected
        assert daily_totals(url, "tenant-1") == expected_totals(expected)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()

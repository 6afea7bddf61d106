"""financial_sync: copy a tenant's POS transactions into the reporting tables, incrementally.

It reads the financial database, resumes after a crash from its checkpoint, and continues the
next job from the tenant's sync state.

The cursor is the POS transaction `id` (an integer that only grows as the POS writes rows):
everything with `id <= cursor` is synced. An id cursor rather than `(occurred_at, id)`
because terminals upload offline sales late, with an old occurred_at but a new id; an
occurred_at cursor would skip them. (On PostgreSQL a sequence value is taken before its row
commits, so a slow POS transaction can become visible below the cursor; an occasional
`full: true` run picks such rows up.)

Per chunk, one transaction on the main database upserts the rows (keyed by POS id, so a chunk
written twice changes nothing), recomputes the daily totals of the days it touched from the
reporting rows (never `+=`, for the same reason), and moves the tenant's sync state; then the
cursor is checkpointed in the job, so a retry resumes after the last chunk. The next job
starts from the sync state. `full: true` starts from 0, re-upserts everything and finally
deletes the reporting rows it did not see (gone from the POS, wherever their ids lie) and
rebuilds the daily totals, all in one transaction: readers never see a half-empty report. Do
not run a full and an incremental sync of one tenant at the same time (cron schedules:
overlap = "skip").
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import BaseModel, Field

from carwash_jobs.database import open_database
from carwash_jobs.registry import TaskOptions, TaskType
from task_types.domain import db_date, db_timestamp, parse_timestamp

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Mapping

    from carwash_jobs.context import JobContext
    from carwash_jobs.settings import Settings
    from carwash_jobs.store.base import Tx, TxFn

DEFAULT_CHUNK_SIZE = 500

READ_CHUNK = """
SELECT id, occurred_at, package, amount_cents, payment_method FROM pos_transactions
WHERE tenant_id = :tenant_id AND id > :after ORDER BY id LIMIT :limit
"""
COUNT_AFTER = "SELECT COUNT(*) AS n FROM pos_transactions WHERE tenant_id = :tenant_id AND id > :after"
READ_STATE = """
SELECT last_transaction_id, last_job_id FROM financial_sync_state WHERE tenant_id = :tenant_id
"""
#: what an earlier attempt of this job synced before it died unrecorded (see _start)
COUNT_SYNCED_BY = """
SELECT COUNT(*) AS n FROM reporting_transactions WHERE tenant_id = :tenant_id AND sync_job_id = :job_id
"""
UPSERT_ROW = """
INSERT INTO reporting_transactions (tenant_id, pos_transaction_id, occurred_at, business_date,
  package, amount_cents, payment_method, sync_job_id, synced_at)
VALUES (:tenant_id, :pos_transaction_id, :occurred_at, :business_date, :package, :amount_cents,
  :payment_method, :sync_job_id, :synced_at)
ON CONFLICT (tenant_id, pos_transaction_id) DO UPDATE SET
  occurred_at = excluded.occurred_at, business_date = excluded.business_date,
  package = excluded.package, amount_cents = excluded.amount_cents,
  payment_method = excluded.payment_method, sync_job_id = excluded.sync_job_id,
  synced_at = excluded.synced_at
"""
# CURRENT_TIMESTAMP, not a parameter: PostgreSQL cannot type a parameter in a SELECT list
RECOMPUTE_DAY = """
INSERT INTO reporting_daily_totals (tenant_id, business_date, transactions, revenue_cents, updated_at)
SELECT tenant_id, business_date, COUNT(*), SUM(amount_cents), CURRENT_TIMESTAMP
FROM reporting_transactions WHERE tenant_id = :tenant_id AND business_date = :business_date
GROUP BY tenant_id, business_date
ON CONFLICT (tenant_id, business_date) DO UPDATE SET
  transactions = excluded.transactions, revenue_cents = excluded.revenue_cents,
  updated_at = excluded.updated_at
"""
SAVE_STATE = """
INSERT INTO financial_sync_state (tenant_id, last_transaction_id, last_job_id, updated_at)
VALUES (:tenant_id, :cursor, :job_id, :updated_at)
ON CONFLICT (tenant_id) DO UPDATE SET last_transaction_id = excluded.last_transaction_id,
  last_job_id = excluded.last_job_id, updated_at = excluded.updated_at
"""
#: the rows a full resync did not see: below its cursor, or written before it was enqueued (a
#: sale gone from the POS above the last one left, the tenant's newest, or every one). A row
#: above the cursor written since by another job is left: a sync that overlapped this one
SWEEP_UNSEEN = """
DELETE FROM reporting_transactions
WHERE tenant_id = :tenant_id AND sync_job_id <> :job_id
  AND (pos_transaction_id <= :cursor OR synced_at < :job_created_at)
"""
DROP_TOTALS = "DELETE FROM reporting_daily_totals WHERE tenant_id = :tenant_id"
REBUILD_TOTALS = """
INSERT INTO reporting_daily_totals (tenant_id, business_date, transactions, revenue_cents, updated_at)
SELECT tenant_id, business_date, COUNT(*), SUM(amount_cents), CURRENT_TIMESTAMP
FROM reporting_transactions WHERE tenant_id = :tenant_id
GROUP BY tenant_id, business_date
"""


class SyncPayload(BaseModel):
    tenant_id: str = Field(min_length=1, max_length=64)
    full: bool = Field(default=False, description="resync from the start instead of the cursor")
    chunk_size: int | None = Field(default=None, ge=1, le=10_000)


class SyncResult(BaseModel):
    rows: int  #: POS transactions this job synced
    cursor: int  #: the last POS transaction id synced for the tenant (0: none yet)
    full: bool
    removed: int = 0  #: reporting rows deleted by a full resync (gone from the POS)


class _Source(Protocol):
    async def fetch(self, sql: str, params: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        ...


@dataclass(frozen=True, slots=True)
class _MainDatabase:
    """The financial tables in the main database, read through the job's context."""

    ctx: JobContext

    async def fetch(self, sql: str, params: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        return await self.ctx.transaction(lambda tx: tx.fetch(sql, params))


@contextlib.asynccontextmanager
async def _financial_database(ctx: JobContext) -> AsyncIterator[_Source]:
    settings: Settings = ctx.services["settings"]
    if settings.financial_database_url is None:
        yield _MainDatabase(ctx)
        return
    async with await open_database(settings.financial_database_url) as database:
        yield database


async def sync_financials(ctx: JobContext, payload: SyncPayload) -> SyncResult:
    tenant = payload.tenant_id
    size = payload.chunk_size or DEFAULT_CHUNK_SIZE
    async with _financial_database(ctx) as source:
        cursor, rows = await _start(ctx, payload)
        total = rows + (await source.fetch(COUNT_AFTER, {"tenant_id": tenant, "after": cursor}))[0]["n"]
        await ctx.progress(rows, total)
        while True:
            chunk = await read_chunk(source, tenant, cursor, size)
            if not chunk:
                break
            cursor = chunk[-1]["id"]
            await write_chunk(ctx, tenant, chunk, cursor)
            rows += len(chunk)
            total = max(total, rows)
            await ctx.save_checkpoint({"cursor": cursor, "rows": rows}, done=rows, total=total)
            if len(chunk) < size:
                break
    removed = await ctx.transaction(_sweep(ctx, tenant, cursor)) if payload.full else 0
    return SyncResult(rows=rows, cursor=cursor, full=payload.full, removed=removed)


async def _start(ctx: JobContext, payload: SyncPayload) -> tuple[int, int]:
    """(cursor, rows so far): the checkpoint of an interrupted attempt, else 0 for a full
    resync, else where the tenant's last sync ended. When that was this job (an attempt that
    died after a chunk committed, before its checkpoint), the rows it synced are counted, so
    the result still tells all of them."""
    if ctx.checkpoint:
        return int(ctx.checkpoint["cursor"]), int(ctx.checkpoint["rows"])
    if payload.full:
        return 0, 0
    tenant = payload.tenant_id
    state = await ctx.transaction(lambda tx: tx.fetch(READ_STATE, {"tenant_id": tenant}))
    if not state:
        return 0, 0
    cursor = int(state[0]["last_transaction_id"])
    if state[0]["last_job_id"] != ctx.job_id:
        return cursor, 0
    synced = await ctx.transaction(
        lambda tx: tx.fetch(COUNT_SYNCED_BY, {"tenant_id": tenant, "job_id": ctx.job_id})
    )
    return cursor, int(synced[0]["n"])


async def read_chunk(source: _Source, tenant: str, after: int, limit: int) -> list[dict[str, Any]]:
    """The next POS transactions of `tenant` after the cursor, in id order."""
    return await source.fetch(READ_CHUNK, {"tenant_id": tenant, "after": after, "limit": limit})


async def write_chunk(ctx: JobContext, tenant: str, chunk: list[dict[str, Any]], cursor: int) -> None:
    """Upsert a chunk, recompute its days' totals and move the sync state: one transaction."""
    await ctx.transaction(_write_chunk(ctx.job_id, tenant, chunk, cursor))


def _write_chunk(job_id: str, tenant: str, chunk: list[dict[str, Any]], cursor: int) -> TxFn[None]:
    async def write(tx: Tx) -> None:
        now = db_timestamp(tx.dialect, datetime.now(UTC))
        rows, days = [], set()
        for row in chunk:
            occurred_at = parse_timestamp(row["occurred_at"])
            days.add(occurred_at.date())
            rows.append({
                "tenant_id": tenant, "pos_transaction_id": row["id"],
                "occurred_at": db_timestamp(tx.dialect, occurred_at),
                "business_date": db_date(tx.dialect, occurred_at.date()),
                "package": row["package"], "amount_cents": row["amount_cents"],
                "payment_method": row["payment_method"], "sync_job_id": job_id, "synced_at": now,
            })
        await tx.executemany(UPSERT_ROW, rows)
        await tx.executemany(RECOMPUTE_DAY, [
            {"tenant_id": tenant, "business_date": db_date(tx.dialect, day)} for day in sorted(days)
        ])
        await tx.execute(SAVE_STATE, {"tenant_id": tenant, "cursor": cursor, "job_id": job_id,
                                      "updated_at": now})

    return write


def _sweep(ctx: JobContext, tenant: str, cursor: int) -> TxFn[int]:
    async def sweep(tx: Tx) -> int:
        removed = await tx.execute(SWEEP_UNSEEN, {
            "tenant_id": tenant, "job_id": ctx.job_id, "cursor": cursor,
            "job_created_at": db_timestamp(tx.dialect, ctx.job.created_at),
        })
        await tx.execute(DROP_TOTALS, {"tenant_id": tenant})
        await tx.execute(REBUILD_TOTALS, {"tenant_id": tenant})
        return removed

    return sweep


TASK_TYPE: TaskType[SyncPayload, SyncResult] = TaskType(
    name="financial_sync",
    payload_model=SyncPayload,
    handler=sync_financials,
    result_model=SyncResult,
    options=TaskOptions(max_attempts=6, timeout=timedelta(hours=2)),
    description="Pull a tenant's POS transactions into the reporting tables, incrementally; the "
                "cursor is checkpointed after every chunk, so a retry resumes.",
    examples=[{"tenant_id": "tenant-1", "full": False}],
)

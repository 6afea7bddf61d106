"""customer_credits: grant credits to many customers, all or nothing, exactly once per job.

The handler only decides *who* gets credits (and fails permanently on unknown customer ids,
naming them); the ledger rows are written by `ctx.on_complete`, inside the very transaction that
marks the job completed. So the credits of one grant appear together or not at all, and an
attempt that dies before completing granted nothing: its retry grants once. The unique key
(job_id, customer_id) with ON CONFLICT DO NOTHING is the second belt: even a completion written
twice cannot double a credit. A rerun is a new job id, hence a new, deliberate grant.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Annotated

from pydantic import BaseModel, Field, ValidationInfo, field_validator

from carwash_jobs.errors import PermanentError
from carwash_jobs.registry import TaskOptions, TaskType
from task_types.domain import (
    Segment,
    db_timestamp,
    exactly_one_audience,
    in_clause,
    segment_query,
)

if TYPE_CHECKING:
    from carwash_jobs.context import JobContext
    from carwash_jobs.store.base import Tx, TxFn

LOOKUP_BATCH = 500  #: customer ids per lookup statement (keeps well under any parameter limit)

GRANT = """
INSERT INTO credit_ledger (job_id, customer_id, amount_cents, reason, created_at)
VALUES (:job_id, :customer_id, :amount_cents, :reason, :created_at)
ON CONFLICT (job_id, customer_id) DO NOTHING
"""


#: the largest id the customers table can hold: an INTEGER column, 32 bits on PostgreSQL (64 on
#: SQLite, where the same ids are kept). A larger one names no customer, and PostgreSQL's
#: driver refused it when the job ran: the job failed, retried, on an int32 range error
CUSTOMER_ID_MAX = 2**31 - 1


class CreditsPayload(BaseModel):
    customer_ids: list[Annotated[int, Field(ge=1, le=CUSTOMER_ID_MAX)]] | None = Field(
        default=None, min_length=1, max_length=100_000
    )
    #: validated even when left out: its validator is where "exactly one audience" is checked
    segment: Segment | None = Field(default=None, validate_default=True)
    amount_cents: int = Field(gt=0, le=1_000_000, description="credit per customer, in cents")
    reason: str = Field(min_length=1, max_length=200)
    tenant_id: str | None = Field(default=None, min_length=1, max_length=64)

    @field_validator("segment")
    @classmethod
    def _one_audience(cls, value: Segment | None, info: ValidationInfo) -> Segment | None:
        return exactly_one_audience(value, info, "customer_ids")


class CreditsResult(BaseModel):
    customers: int
    total_cents: int


async def grant_credits(ctx: JobContext, payload: CreditsPayload) -> CreditsResult:
    customer_ids = await resolve_customers(ctx, payload)
    created_at = datetime.now(UTC)

    async def grant(tx: Tx) -> None:
        stamp = db_timestamp(tx.dialect, created_at)
        await tx.executemany(GRANT, [
            {"job_id": ctx.job_id, "customer_id": customer_id, "amount_cents": payload.amount_cents,
             "reason": payload.reason, "created_at": stamp}
            for customer_id in customer_ids
        ])

    if customer_ids:
        ctx.on_complete(grant)
    return CreditsResult(customers=len(customer_ids),
                         total_cents=len(customer_ids) * payload.amount_cents)


async def resolve_customers(ctx: JobContext, payload: CreditsPayload) -> list[int]:
    """The customers to credit, in id order; unknown ids fail the job for good."""
    return await ctx.transaction(_resolve(payload))


def _resolve(payload: CreditsPayload) -> TxFn[list[int]]:

    async def resolve(tx: Tx) -> list[int]:
        if payload.customer_ids is None:
            assert payload.segment is not None
            sql, params = segment_query(payload.segment, payload.tenant_id)
            return [row["id"] for row in await tx.fetch(sql, params)]
        wanted = sorted(set(payload.customer_ids))
        found: set[int] = set()
        for start in range(0, len(wanted), LOOKUP_BATCH):
            ids, params = in_clause("id", wanted[start:start + LOOKUP_BATCH])
            sql = f"SELECT id FROM customers WHERE id IN {ids}"
            if payload.tenant_id is not None:
                sql += " AND tenant_id = :tenant_id"
                params["tenant_id"] = payload.tenant_id
            found.update(row["id"] for row in await tx.fetch(sql, params))
        unknown = [i for i in wanted if i not in found]
        if unknown:
            where = f" in tenant {payload.tenant_id}" if payload.tenant_id else ""
            shown = ", ".join(str(i) for i in unknown[:50])
            more = f" and {len(unknown) - 50} more" if len(unknown) > 50 else ""
            raise PermanentError(f"unknown customer ids{where}: {shown}{more}")
        return wanted

    return resolve


TASK_TYPE: TaskType[CreditsPayload, CreditsResult] = TaskType(
    name="customer_credits",
    payload_model=CreditsPayload,
    handler=grant_credits,
    result_model=CreditsResult,
    options=TaskOptions(max_attempts=5, timeout=timedelta(minutes=15)),
    description="Grant credits to many customers: all or nothing, exactly once per job.",
    examples=[{"segment": "opted_in", "tenant_id": "tenant-1", "amount_cents": 500,
               "reason": "Rainy-week apology"}],
)

"""The four task types on PostgreSQL as the main database: their SQL is portable.

Runs only when CARWASH_TEST_POSTGRES_URL names a server; the other task-type tests cover the
behaviour in depth on SQLite."""

from __future__ import annotations

import os
import secrets
from typing import TYPE_CHECKING, Any

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from carwash_jobs.lifecycle import JobStatus
from task_types.demo_data import make_demo_data
from tests.task_types.support import Runtimes, run_job

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

POSTGRES_URL_ENV = "CARWASH_TEST_POSTGRES_URL"


@pytest.fixture
async def postgres_url() -> AsyncIterator[str]:
    server_url = os.environ.get(POSTGRES_URL_ENV)
    if not server_url:
        pytest.skip(f"{POSTGRES_URL_ENV} is not set")
    server = make_url(server_url).set(drivername="postgresql")
    name = f"carwash_types_{secrets.token_hex(6)}"
    admin = await asyncpg.connect(server.render_as_string(hide_password=False))
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield server.set(drivername="postgresql+asyncpg", database=name).render_as_string(
            hide_password=False)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def _value(url: str, sql: str) -> Any:
    conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


async def test_every_task_type_runs_on_postgres(postgres_url: str, tmp_path: Path) -> None:
    runtimes = Runtimes(postgres_url, tmp_path)
    try:
        runtime = await runtimes.start()
        await make_demo_data(postgres_url, tenants=2, customers=30, employees=6,
                             transactions=120, progress=False)

        mail = await run_job(runtime, "email", {"subject": "Hi", "body_text": "Wash today!",
                                                "segment": "opted_in", "tenant_id": "tenant-1"})
        credits = await run_job(runtime, "customer_credits", {
            "segment": "all_customers", "tenant_id": "tenant-2", "amount_cents": 100,
            "reason": "Postgres"})
        unknown = await run_job(runtime, "customer_credits", {
            "customer_ids": [99999], "amount_cents": 100, "reason": "Postgres"})
        synced = await run_job(runtime, "financial_sync", {"tenant_id": "tenant-1",
                                                           "chunk_size": 17})
        resynced = await run_job(runtime, "financial_sync", {"tenant_id": "tenant-1",
                                                             "full": True})
        csv = tmp_path / "employees.csv"
        csv.write_text("employee_no,first_name,last_name,email,role,hourly_rate,hired_on\n"
                       "E0001,Ann,Lee,ann@example.com,washer,12.50,2020-01-01\n"
                       "E9000,Bo,Ek,bo@example.com,manager,30,2021-02-03\n"
                       "E9001,bad\n", encoding="utf-8")
        upload = await run_job(runtime, "file_upload", {"file_path": str(csv), "kind": "employees",
                                                        "tenant_id": "tenant-1"})
    finally:
        await runtimes.close()

    opted_in = await _value(postgres_url, "SELECT COUNT(*) FROM customers "
                                          "WHERE tenant_id = 'tenant-1' AND marketing_opt_in")
    assert mail.status == JobStatus.completed, mail.error
    assert mail.result["sent"] == opted_in > 0
    assert credits.result == {"customers": 15, "total_cents": 1500}
    assert await _value(postgres_url, "SELECT SUM(amount_cents) FROM credit_ledger") == 1500
    assert unknown.error == "PermanentError: unknown customer ids: 99999"
    pos_rows = await _value(postgres_url, "SELECT COUNT(*) FROM pos_transactions "
                                          "WHERE tenant_id = 'tenant-1'")
    assert synced.result["rows"] == resynced.result["rows"] == pos_rows
    assert resynced.result["removed"] == 0
    revenue = await _value(postgres_url, "SELECT SUM(amount_cents) FROM pos_transactions "
                                         "WHERE tenant_id = 'tenant-1'")
    assert await _value(postgres_url, "SELECT SUM(revenue_cents) FROM reporting_daily_totals "
                                      "WHERE tenant_id = 'tenant-1'") == revenue
    assert upload.result == {"inserted": 1, "updated": 1, "rejected_count": 1,
                             "rejected": [{"line": 4, "error": "expected 7 fields, found 2"}]}

"""The domain tables: migration 0002 builds exactly what task_types/domain.py declares.

Checked on SQLite, and on PostgreSQL when CARWASH_TEST_POSTGRES_URL names a server; plus the
shared helpers (driver values, address and header checks, segments)."""

from __future__ import annotations

import os
import secrets
from datetime import UTC, date, datetime, timedelta, timezone
from email.headerregistry import Address
from email.message import EmailMessage
from typing import TYPE_CHECKING, Any

import asyncpg
import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine
from sqlmodel import SQLModel

import carwash_jobs.models  # noqa: F401  (the engine tables, created by 0001)
from carwash_jobs.store.migrations import MIGRATIONS_DIR, upgrade
from task_types import domain
from tests.task_types.support import sqlite_url

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable
    from pathlib import Path

    from sqlalchemy import Connection

POSTGRES_URL_ENV = "CARWASH_TEST_POSTGRES_URL"
DOMAIN_TABLES = {
    "customers", "credit_ledger", "email_send_log", "employees", "pos_transactions",
    "reporting_transactions", "reporting_daily_totals", "financial_sync_state",
}


async def _on(database_url: str, fn: Callable[[Connection], Any]) -> Any:
    engine = create_async_engine(database_url)
    try:
        async with engine.begin() as conn:
            return await conn.run_sync(fn)
    finally:
        await engine.dispose()


async def _postgres_database() -> AsyncIterator[str]:
    server_url = os.environ.get(POSTGRES_URL_ENV)
    if not server_url:
        pytest.skip(f"{POSTGRES_URL_ENV} is not set")
    server = make_url(server_url).set(drivername="postgresql")
    name = f"carwash_domain_{secrets.token_hex(6)}"
    admin = await asyncpg.connect(server.render_as_string(hide_password=False))
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield server.set(drivername="postgresql+asyncpg", database=name).render_as_string(
                hide_password=False
            )
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture(params=["sqlite", "postgres"])
async def empty_database(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    if request.param == "sqlite":
        yield sqlite_url(tmp_path / "empty.db")
    else:
        async for url in _postgres_database():
            yield url


async def test_the_migrated_schema_matches_the_domain_models(empty_database: str) -> None:
    await upgrade(empty_database)

    # SQLite's reflection cannot express the DESC column of the ready index (the engine's
    # migration test says the same); PostgreSQL compares it
    unreflectable = {"ix_worker_queue_ready"} if empty_database.startswith("sqlite") else set()

    def comparable(obj: Any, name: str | None, type_: str, reflected: bool, to: Any) -> bool:
        return not (type_ == "index" and name in unreflectable)

    diff = await _on(
        empty_database,
        lambda conn: compare_metadata(
            MigrationContext.configure(
                conn, opts={"compare_server_default": True, "include_object": comparable}
            ),
            SQLModel.metadata,
        ),
    )

    assert diff == []
    tables = await _on(empty_database, lambda conn: set(sa.inspect(conn).get_table_names()))
    assert tables >= DOMAIN_TABLES


async def test_downgrading_0002_drops_the_domain_tables_only(empty_database: str) -> None:
    await upgrade(empty_database)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))

    def downgrade(conn: Connection) -> None:
        config.attributes["connection"] = conn
        command.downgrade(config, "0001")

    await _on(empty_database, downgrade)

    tables = await _on(empty_database, lambda conn: set(sa.inspect(conn).get_table_names()))
    assert not tables & DOMAIN_TABLES
    assert "worker_queue" in tables


def test_domain_declares_every_domain_table() -> None:
    assert set(SQLModel.metadata.tables) >= DOMAIN_TABLES


@pytest.mark.parametrize(("value", "dialect", "stored"), [
    (datetime(2026, 3, 1, 8, 5, 9, 12, tzinfo=UTC), "sqlite", "2026-03-01 08:05:09.000012"),
    (datetime(2026, 3, 1, 9, 0, tzinfo=timezone(timedelta(hours=1))), "sqlite",
     "2026-03-01 08:00:00.000000"),
    (datetime(2026, 3, 1, 8, 0), "sqlite", "2026-03-01 08:00:00.000000"),  # naive: UTC
    (datetime(2026, 3, 1, 8, 0), "postgresql", datetime(2026, 3, 1, 8, 0, tzinfo=UTC)),
])
def test_timestamps_cross_each_driver_in_its_form(value: datetime, dialect: str, stored: Any) -> None:
    aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)

    assert domain.db_timestamp(dialect, value) == stored
    assert domain.parse_timestamp(stored) == aware


def test_dates_cross_each_driver_in_its_form() -> None:
    day = date(2026, 2, 28)
    assert domain.db_date("sqlite", day) == "2026-02-28"
    assert domain.db_date("postgresql", day) is day
    assert domain.parse_date("2026-02-28") == day
    assert domain.parse_date(datetime(2026, 2, 28, 23, 0)) == day


@pytest.mark.parametrize("address", [
    "ann@example.com", "ann.lee+wash@mail.example.co.uk", "  padded@example.com  ",
])
def test_good_addresses_pass(address: str) -> None:
    assert domain.check_address(address) == address.strip()


@pytest.mark.parametrize("address", [
    "", "plain", "@example.com", "ann@", "ann@localhost", "ann lee@example.com",
    "ann@example.com\r\nBcc: x@example.com", "ann@example.com>", "zoë@example.com",
    "a@b@example.com", "x" * 250 + "@example.com",
])
def test_bad_addresses_are_refused(address: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - the message varies with the reason
        domain.check_address(address)


@pytest.mark.parametrize("text", [
    "Hi\r\nBcc: x@example.com", "Hi\nthere", "Hi\rthere", "Bell\x07", "Spring\u2028special",
    "Spring\u2029special", "Spring\x85special", "trailing\u2028",
])
def test_header_text_refuses_line_breaks_and_controls(text: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011
        domain.check_header_text(text)


@given(st.text())
def test_header_text_that_passes_the_check_is_a_header_the_mail_library_takes(text: str) -> None:
    """A subject the enqueue takes used to fail every attempt at sending (U+2028 and kin)."""
    try:
        domain.check_header_text(text)
    except ValueError:
        return
    message = EmailMessage()
    message["Subject"] = text
    message["To"] = Address(display_name=text, addr_spec="ann@example.com")
    message.as_bytes()


def test_header_text_keeps_unicode_and_tabs() -> None:
    assert domain.check_header_text("Grüße\tvon der Waschstraße") == "Grüße\tvon der Waschstraße"


def test_segment_queries_filter_by_tenant_and_consent() -> None:
    assert domain.segment_query("all_customers", None) == (
        "SELECT id, tenant_id, name, email FROM customers WHERE 1 = 1 ORDER BY id", {})
    sql, params = domain.segment_query("opted_in", "tenant-1")
    assert "tenant_id = :tenant_id AND marketing_opt_in = :opted_in" in sql
    assert params == {"tenant_id": "tenant-1", "opted_in": True}

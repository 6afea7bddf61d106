"""open_database: the same portable SQL and transaction semantics on SQLite and PostgreSQL.

PostgreSQL runs when CARWASH_TEST_POSTGRES_URL names a server."""

from __future__ import annotations

import contextlib
import os
import secrets
from typing import TYPE_CHECKING

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from carwash_jobs.database import open_database
from carwash_jobs.errors import ConfigurationError, TransactionAborted

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from carwash_jobs.database import Database
    from carwash_jobs.store.base import Tx

POSTGRES_URL_ENV = "CARWASH_TEST_POSTGRES_URL"


@pytest.fixture(params=["sqlite", "postgres"])
async def database(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    if request.param == "sqlite":
        async with await open_database(f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}") as db:
            yield db
        return
    server_url = os.environ.get(POSTGRES_URL_ENV)
    if not server_url:
        pytest.skip(f"{POSTGRES_URL_ENV} is not set")
    server = make_url(server_url).set(drivername="postgresql")
    name = f"carwash_db_{secrets.token_hex(6)}"
    admin = await asyncpg.connect(server.render_as_string(hide_password=False))
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        url = server.set(drivername="postgresql+asyncpg", database=name)
        async with await open_database(url.render_as_string(hide_password=False)) as db:
            yield db
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def _schema(tx: Tx) -> None:
    await tx.execute("CREATE TABLE wash (id INTEGER PRIMARY KEY, package VARCHAR(20), "
                     "cents INTEGER NOT NULL)")


async def test_a_transaction_commits_what_its_function_wrote(database: Database) -> None:
    await database.transaction(_schema)

    async def write(tx: Tx) -> int:
        await tx.executemany("INSERT INTO wash (id, package, cents) VALUES (:id, :package, :cents)",
                             [{"id": 1, "package": "Basic", "cents": 999},
                              {"id": 2, "package": "Deluxe", "cents": 1499}])
        return await tx.execute(
            "INSERT INTO wash (id, package, cents) VALUES (:id, :package, :cents) "
            "ON CONFLICT (id) DO UPDATE SET cents = excluded.cents",
            {"id": 2, "package": "Deluxe", "cents": 1599})

    changed = await database.transaction(write)

    assert changed == 1
    assert await database.fetch("SELECT id, package, cents FROM wash WHERE cents > :least "
                                "ORDER BY id", {"least": 0}) == [
        {"id": 1, "package": "Basic", "cents": 999}, {"id": 2, "package": "Deluxe", "cents": 1599}]
    assert database.dialect in ("sqlite", "postgresql")


async def test_a_row_naming_one_that_is_not_there_is_refused_on_both(database: Database) -> None:
    """Foreign keys hold on SQLite too, as on PostgreSQL (SQLite leaves them off by default)."""

    async def schema(tx: Tx) -> None:
        await _schema(tx)
        await tx.execute("CREATE TABLE sale (id INTEGER PRIMARY KEY, "
                         "wash_id INTEGER NOT NULL REFERENCES wash (id))")

    await database.transaction(schema)

    async def orphan(tx: Tx) -> None:
        await tx.execute("INSERT INTO sale (id, wash_id) VALUES (1, 42)")

    with pytest.raises(Exception, match=r"(?i)foreign key"):
        await database.transaction(orphan)


async def test_an_exception_rolls_the_whole_transaction_back(database: Database) -> None:
    await database.transaction(_schema)

    async def fail_half_way(tx: Tx) -> None:
        await tx.execute("INSERT INTO wash (id, package, cents) VALUES (1, 'Basic', 999)")
        raise RuntimeError("the POS went away")

    with pytest.raises(RuntimeError, match="POS went away"):
        await database.transaction(fail_half_way)

    assert await database.fetch("SELECT COUNT(*) AS n FROM wash") == [{"n": 0}]


async def test_a_failed_statement_rolls_the_whole_transaction_back_even_if_caught(
    database: Database,
) -> None:
    """PostgreSQL answers the COMMIT of a transaction with a failed statement by a silent
    ROLLBACK: the function that caught the error was told its writes were committed."""
    await database.transaction(_schema)

    async def best_effort(tx: Tx) -> str:
        await tx.execute("INSERT INTO wash (id, package, cents) VALUES (1, 'Basic', 999)")
        with contextlib.suppress(Exception):
            await tx.execute("INSERT INTO wash (id, package, cents) VALUES (1, 'Basic', 999)")
        return "done"

    with pytest.raises(TransactionAborted, match="none of it was committed"):
        await database.transaction(best_effort)

    assert await database.fetch("SELECT COUNT(*) AS n FROM wash") == [{"n": 0}]
    assert await database.transaction(lambda tx: tx.execute("DELETE FROM wash")) == 0


async def test_execute_counts_the_rows_it_changed(database: Database) -> None:
    await database.transaction(_schema)

    async def change(tx: Tx) -> tuple[int, int]:
        await tx.executemany("INSERT INTO wash (id, package, cents) VALUES (:id, 'Basic', 999)",
                             [{"id": i} for i in range(5)])
        updated = await tx.execute("UPDATE wash SET cents = :cents WHERE id < :id",
                                   {"cents": 1, "id": 3})
        deleted = await tx.execute("DELETE FROM wash WHERE cents = :cents", {"cents": 999})
        return updated, deleted

    assert await database.transaction(change) == (3, 2)


async def test_an_unknown_url_scheme_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="unsupported database URL"):
        await open_database("mysql://pos@db/pos")

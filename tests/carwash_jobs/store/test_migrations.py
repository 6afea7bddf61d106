"""The migrations build exactly the schema of models.py, on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import secrets
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import asyncpg
import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine
from sqlmodel import SQLModel

import carwash_jobs.models  # noqa: F401  (registers the tables on SQLModel.metadata)
from carwash_jobs.lifecycle import JobStatus
from carwash_jobs.store.migrations import (
    MIGRATIONS_DIR,
    current_revision,
    head_revision,
    upgrade,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable
    from pathlib import Path

    from sqlalchemy import Connection

TABLES = {"worker_queue", "job_dependencies", "job_events", "cron_fires", "rate_limits",
          "processes"}
POSTGRES_URL_ENV = "CARWASH_TEST_POSTGRES_URL"


async def _on(database_url: str, fn: Callable[[Connection], Any]) -> Any:
    engine = create_async_engine(database_url)
    try:
        async with engine.begin() as conn:
            return await conn.run_sync(fn)
    finally:
        await engine.dispose()


async def _postgres_database() -> AsyncIterator[str]:
    """A fresh, empty database on the test server, dropped afterwards."""
    server_url = os.environ.get(POSTGRES_URL_ENV)
    if not server_url:
        pytest.skip(f"{POSTGRES_URL_ENV} is not set")
    server = make_url(server_url).set(drivername="postgresql")
    name = f"carwash_mig_{secrets.token_hex(6)}"
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
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    if request.param == "sqlite":
        # a directory that does not exist yet: upgrade() must create it
        yield f"sqlite+aiosqlite:///{tmp_path / 'data' / 'carwash.db'}"
    else:
        async for url in _postgres_database():
            yield url


async def test_upgrade_creates_all_tables_and_stamps_head(database_url: str) -> None:
    assert await current_revision(database_url) is None

    await upgrade(database_url)

    tables = await _on(database_url, lambda conn: set(sa.inspect(conn).get_table_names()))
    assert tables >= TABLES | {"alembic_version"}  # 0002 adds the car-wash domain tables
    assert await current_revision(database_url) == head_revision()


async def test_second_upgrade_is_a_no_op(database_url: str) -> None:
    await upgrade(database_url)
    job_id = "0123456789abcdef0123456789abcdef"

    def insert_job(conn: Connection) -> None:
        conn.execute(
            sa.text("INSERT INTO job_dependencies (job_id, depends_on_id) VALUES (:job, :dependency)"),
            {"job": job_id, "dependency": job_id[::-1]},
        )

    await _on(database_url, insert_job)

    await upgrade(database_url)

    rows = await _on(
        database_url,
        lambda conn: conn.execute(sa.text("SELECT job_id FROM job_dependencies")).all(),
    )
    assert [row.job_id for row in rows] == [job_id]
    assert await current_revision(database_url) == head_revision()


async def test_migrated_schema_matches_the_models(database_url: str) -> None:
    await upgrade(database_url)

    # the engine's tables only: SQLModel.metadata is process-wide (it holds the domain tables
    # once task_types.domain is imported), and tests/task_types/test_domain.py checks those
    # SQLite's reflection cannot express a DESC index column, so it reports the ready index as
    # different even when it is the same; PostgreSQL reflects it and compares it for real
    unreflectable = {"ix_worker_queue_ready"} if database_url.startswith("sqlite") else set()

    def engine_tables_only(obj: Any, name: str | None, type_: str, reflected: bool,
                           compare_to: Any) -> bool:
        if type_ == "index" and name in unreflectable:
            return False
        return type_ != "table" or name in TABLES

    diff = await _on(
        database_url,
        lambda conn: compare_metadata(
            MigrationContext.configure(
                conn, opts={"compare_server_default": True, "include_object": engine_tables_only}
            ),
            SQLModel.metadata,
        ),
    )

    assert diff == []


def _job_row(job_id: str, status: str, idempotency_key: str | None = None) -> dict[str, Any]:
    now = datetime.now(UTC)
    return {
        "id": job_id,
        "task_type": "email",
        "queue": "default",
        "status": status,
        "priority": 0,
        "payload": {},
        "tags": [],
        "attempts": 0,
        "max_attempts": 5,
        "run_at": now,
        "created_at": now,
        "progress_done": 0,
        "attempt_history": [],
        "depends_on": [],
        "idempotency_key": idempotency_key,
    }


def _insert_job(row: dict[str, Any]) -> Callable[[Connection], None]:
    """A Core insert with the model's column types, but status as plain text, so that only the
    database (not the Enum type's own Python-side check) can refuse an unknown status."""
    model = SQLModel.metadata.tables["worker_queue"]
    table = sa.table(
        "worker_queue",
        *(
            sa.column(c.name, sa.String(16) if c.name == "status" else c.type)
            for c in model.columns
            if c.name in row
        ),
    )

    def insert(conn: Connection) -> None:
        conn.execute(sa.insert(table).values(**row))

    return insert


# compare_metadata does not compare CHECK constraints, nor (on SQLite) unnamed unique ones:
# the next two tests check those by their effect.


async def test_status_accepts_every_job_status_and_nothing_else(database_url: str) -> None:
    await upgrade(database_url)
    for number, status in enumerate(JobStatus):
        await _on(database_url, _insert_job(_job_row(f"job{number}", status.value)))

    with pytest.raises(sa.exc.IntegrityError, match="job_status"):
        await _on(database_url, _insert_job(_job_row("bad", "exploded")))


async def test_idempotency_key_is_unique(database_url: str) -> None:
    await upgrade(database_url)
    await _on(database_url, _insert_job(_job_row("first", "queued", idempotency_key="k")))
    await _on(database_url, _insert_job(_job_row("no_key_1", "queued")))
    await _on(database_url, _insert_job(_job_row("no_key_2", "queued")))

    with pytest.raises(sa.exc.IntegrityError):
        await _on(database_url, _insert_job(_job_row("second", "queued", idempotency_key="k")))


async def test_upgrade_to_0006_indexes_the_tags_of_existing_jobs(database_url: str) -> None:
    await upgrade(database_url, "0005")
    await _on(database_url, _insert_job({**_job_row("tagged", "completed"), "tags": ["vip", "b"]}))
    await _on(database_url, _insert_job(_job_row("untagged", "queued")))

    await upgrade(database_url)

    rows = await _on(database_url, lambda conn: set(
        conn.exec_driver_sql("SELECT tag, job_id FROM job_tags").all()
    ))
    assert rows == {("vip", "tagged"), ("b", "tagged")}


def _move(job_id: str, status: str) -> Callable[[Connection], None]:
    """A status change as the store writes one: finished_at set on a finish, cleared on leaving."""
    finished_at = datetime.now(UTC) if status in ("completed", "failed", "cancelled") else None

    def move(conn: Connection) -> None:
        conn.execute(sa.text("UPDATE worker_queue SET status = :s, finished_at = :f WHERE id = :id"),
                     {"s": status, "f": finished_at, "id": job_id})

    return move


async def _finished_counts(database_url: str) -> dict[str, int]:
    rows = await _on(database_url, lambda conn: conn.exec_driver_sql(
        "SELECT status, SUM(n) FROM job_counts GROUP BY status").all())
    return {status: int(n) for status, n in rows if n}


async def _downgrade(database_url: str, revision: str) -> None:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))

    def downgrade(conn: Connection) -> None:
        config.attributes["connection"] = conn
        command.downgrade(config, revision)

    await _on(database_url, downgrade)


async def test_0007_counts_a_job_into_and_out_of_finished_statuses_as_before(
    database_url: str,
) -> None:
    await upgrade(database_url, "0006")
    await _on(database_url, _insert_job(_job_row("done", "running")))
    await _on(database_url, _move("done", "completed"))  # counted by 0005's trigger
    await _on(database_url, _insert_job(_job_row("job", "running")))

    await upgrade(database_url)
    await _on(database_url, _move("job", "completed"))
    assert await _finished_counts(database_url) == {"completed": 2}
    await _on(database_url, _move("job", "failed"))  # finished to finished: both triggers
    assert await _finished_counts(database_url) == {"completed": 1, "failed": 1}
    await _on(database_url, _move("job", "queued"))  # a retry leaves the finished statuses
    assert await _finished_counts(database_url) == {"completed": 1}

    await _downgrade(database_url, "0006")
    await _on(database_url, _move("job", "cancelled"))
    await _on(database_url, _move("done", "queued"))
    assert await _finished_counts(database_url) == {"cancelled": 1}


async def _count_triggers(database_url: str) -> set[str]:
    return set(await _on(database_url, lambda conn: conn.exec_driver_sql(
        "SELECT name FROM sqlite_master WHERE type = 'trigger' AND name LIKE 'job_counts_on_%'"
    ).scalars().all()))


async def test_0007_splits_the_sqlite_finish_trigger_and_its_downgrade_joins_it(
    tmp_path: Path,
) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'carwash.db'}"
    base = {"job_counts_on_born_finished", "job_counts_on_delete"}
    await upgrade(url, "0007")
    assert await _count_triggers(url) == base | {"job_counts_on_finish", "job_counts_on_unfinish"}

    await _on(url, _insert_job(_job_row("job", "running")))
    await _on(url, _move("job", "failed"))
    await _on(url, lambda conn: conn.exec_driver_sql(  # finished_at written, status unchanged
        "UPDATE worker_queue SET finished_at = created_at WHERE id = 'job'"))
    assert await _finished_counts(url) == {"failed": 1}

    await _downgrade(url, "0006")
    assert await _count_triggers(url) == base | {"job_counts_on_finish"}


async def _index_definitions(database_url: str) -> dict[str, str]:
    if database_url.startswith("sqlite"):
        sql = "SELECT name, sql FROM sqlite_master WHERE type = 'index'"
    else:
        sql = "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'worker_queue'"
    rows = await _on(database_url, lambda conn: conn.exec_driver_sql(sql).all())
    return {name: definition or "" for name, definition in rows}


async def test_0008_leaves_running_jobs_out_of_the_list_indexes_on_status(
    database_url: str,
) -> None:
    names = ("ix_worker_queue_status", "ix_worker_queue_type_status")
    await upgrade(database_url, "0008")
    indexes = await _index_definitions(database_url)
    for name in names:
        assert "<>" in indexes[name], indexes[name]
        assert "running" in indexes[name], indexes[name]

    await _downgrade(database_url, "0007")
    indexes = await _index_definitions(database_url)
    for name in names:
        assert "WHERE" not in indexes[name], indexes[name]


async def test_0009_indexes_only_the_jobs_that_are_reruns(database_url: str) -> None:
    await upgrade(database_url, "0009")
    definition = (await _index_definitions(database_url))["ix_worker_queue_rerun_of"]
    assert "rerun_of IS NOT NULL" in definition, definition

    await _downgrade(database_url, "0008")
    definition = (await _index_definitions(database_url))["ix_worker_queue_rerun_of"]
    assert "WHERE" not in definition, definition


async def test_concurrent_upgrades_migrate_once(database_url: str) -> None:
    """Start-ups racing on a fresh database: one migrates, the others wait and find it done.

    (Coroutines here; the same lock also held for separate processes when tried by hand.)
    """
    await asyncio.gather(*(upgrade(database_url) for _ in range(3)))

    assert await current_revision(database_url) == head_revision()


async def test_downgrade_to_base_drops_every_table(database_url: str) -> None:
    await upgrade(database_url)
    await _downgrade(database_url, "base")

    tables = await _on(database_url, lambda conn: set(sa.inspect(conn).get_table_names()))
    assert tables == {"alembic_version"}
    assert await current_revision(database_url) is None


async def test_sqlite_database_is_left_in_wal_mode(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'carwash.db'}"

    await upgrade(url)

    mode = await _on(url, lambda conn: conn.exec_driver_sql("PRAGMA journal_mode").scalar())
    assert mode == "wal"

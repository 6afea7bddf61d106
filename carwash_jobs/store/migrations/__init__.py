"""Versioned schema migrations (Alembic), run by `carwash-jobs db upgrade` and at start-up.

Users need no alembic.ini: the Alembic config is built here, pointing at this package, and the
runner hands Alembic a connection from an async engine for the given database URL
(`sqlite+aiosqlite://...` or `postgresql+asyncpg://...`). New revisions go in `versions/`,
numbered `0002_...`, and must keep the schema equal to `carwash_jobs/models.py` (a test checks).
"""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

MIGRATIONS_DIR = Path(__file__).parent
#: any constant shared by every process: serialises concurrent start-ups on one PostgreSQL database
_PG_MIGRATION_LOCK_ID = 0x63617277617368  # "carwash"
_WAL_SWITCH_ATTEMPTS = 200  # 50 ms apart


def _config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


def _sqlite_path(database_url: str) -> Path | None:
    """The database file of an SQLite URL; None for other databases and in-memory SQLite."""
    url = make_url(database_url)
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    if url.query.get("uri") == "true" or url.database.startswith("file:"):
        return None
    return Path(url.database)


def head_revision() -> str:
    head = ScriptDirectory.from_config(_config()).get_current_head()
    if head is None:
        raise RuntimeError(f"no migration revisions found in {MIGRATIONS_DIR / 'versions'}")
    return head


async def upgrade(database_url: str, revision: str = "head") -> None:
    """Bring the database at `database_url` to `revision`; a no-op when it is already there.

    Safe when several processes start at once: each takes a database-wide write lock before
    Alembic reads the version, so the first one migrates and the others then find it done.
    The whole upgrade is one transaction on both databases (SQLite DDL is transactional too).
    """
    sqlite_path = _sqlite_path(database_url)
    if sqlite_path is not None:
        sqlite_path.parent.mkdir(parents=True, exist_ok=True)
    config = _config()

    def run(connection: Connection) -> None:
        # both locks are held until commit and taken before Alembic reads alembic_version
        if connection.dialect.name == "postgresql":
            connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_MIGRATION_LOCK_ID})")
        elif connection.dialect.name == "sqlite":
            # the driver has not begun a transaction yet (it only does so before DML)
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        config.attributes["connection"] = connection
        command.upgrade(config, revision)

    engine = create_async_engine(database_url)
    try:
        if sqlite_path is not None:
            # persistent in the file, so every later connection opens in WAL mode. Set before
            # the migration: switching needs a moment alone with the file, which a concurrent
            # start-up that is already migrating would not give it ("database is locked")
            await _switch_to_wal(engine)
        async with engine.begin() as conn:
            await conn.run_sync(run)
    finally:
        await engine.dispose()


async def _switch_to_wal(engine: AsyncEngine) -> None:
    """Put the file in WAL mode. The switch needs the file to itself and SQLite does not wait
    for it (no busy handler): start-ups racing on a new file retry for up to ten seconds."""
    for attempt in itertools.count(1):
        try:
            async with engine.connect() as conn:
                await conn.exec_driver_sql("PRAGMA journal_mode=WAL")
            return
        except sa.exc.OperationalError as error:
            if "locked" not in str(error) or attempt >= _WAL_SWITCH_ATTEMPTS:
                raise
            await asyncio.sleep(0.05)


async def current_revision(database_url: str) -> str | None:
    """The revision the database is at; None for an empty (or missing SQLite) database."""
    sqlite_path = _sqlite_path(database_url)
    if sqlite_path is not None and not sqlite_path.exists():
        return None

    def read(connection: Connection) -> str | None:
        return MigrationContext.configure(connection).get_current_revision()

    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(read)
    finally:
        await engine.dispose()

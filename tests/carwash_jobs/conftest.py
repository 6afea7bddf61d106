"""Fixtures of the engine tests: a migrated SQLite file per test, an opened store on it, a
manual clock, and harnesses (store + JobQueue + QueueProcessor) built on the test task types.

`database_url` is a migrated database of the test's own on each backend in turn: an SQLite file
in tmp_path, and a fresh PostgreSQL database on the server named by CARWASH_TEST_POSTGRES_URL
(skipped while that is unset or open_store has no PostgreSQL adapter)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import pytest

from carwash_jobs.store.migrations import upgrade
from tests.carwash_jobs.support import (
    Harness,
    Harnesses,
    ManualClock,
    copy_database,
    migrated_database,
    open_sqlite,
    postgres_database_from,
    registry_with,
    sqlite_url,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from carwash_jobs.registry import TaskRegistry
    from carwash_jobs.store.sqlite import SqliteJobStore


@pytest.fixture(scope="session")
def migrated_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One SQLite file migrated to head with `upgrade(url)`, as `carwash-jobs db upgrade` does;
    each test gets a copy (a migration run costs ~0.1 s, a copy ~1 ms)."""
    path = tmp_path_factory.mktemp("template") / "jobs.db"
    asyncio.run(upgrade(sqlite_url(path)))
    return path


@pytest.fixture
def db_url(tmp_path: Path, migrated_template: Path) -> str:
    """A real, migrated SQLite file of this test's own, in tmp_path."""
    return copy_database(migrated_template, tmp_path / "jobs.db")


@pytest.fixture(params=["sqlite", "postgres"])
async def database_url(
    request: pytest.FixtureRequest, tmp_path: Path, migrated_template: Path,
    postgres_template: tuple[str, str] | None,
) -> AsyncIterator[str]:
    async with migrated_database(request.param, migrated_template, tmp_path / "jobs.db",
                                 postgres_template, "carwash") as url:
        yield url


@pytest.fixture
async def postgres_database_url(
    postgres_template: tuple[str, str] | None,
) -> AsyncIterator[str]:
    """A migrated PostgreSQL database of this test's own, for what only PostgreSQL can show
    (skipped without a server)."""
    async with postgres_database_from(postgres_template, "carwash") as url:
        yield url


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
async def store(db_url: str, clock: ManualClock) -> AsyncIterator[SqliteJobStore]:
    """An opened SqliteJobStore on the manual clock."""
    opened = await open_sqlite(db_url, clock=clock)
    yield opened
    await opened.close()


@pytest.fixture
def registry() -> TaskRegistry:
    return registry_with()


@pytest.fixture
async def harnesses(db_url: str) -> AsyncIterator[Harnesses]:
    made = Harnesses(db_url)
    yield made
    await made.close_all()


@pytest.fixture
async def harness(harnesses: Harnesses) -> Harness:
    """A started processor on the real clock with the base task types (noop, order)."""
    return await harnesses.make()

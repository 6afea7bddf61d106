"""Picks the store adapter from the database URL; nothing else branches on the database kind."""

from __future__ import annotations

from typing import TYPE_CHECKING

from carwash_jobs.errors import ConfigurationError
from carwash_jobs.types import Clock, utc_now

if TYPE_CHECKING:
    from carwash_jobs.store.base import JobStore


def open_store(
    url: str,
    *,
    owner: str,
    clock: Clock = utc_now,
    synchronous: str = "FULL",
    busy_timeout_ms: int = 5000,
    write_batch_max: int = 500,
    pool_size: int = 10,
) -> JobStore:
    """Build (not yet open) the adapter that serves `url`."""
    if url.startswith("sqlite+aiosqlite://"):
        from carwash_jobs.store.sqlite import SqliteJobStore

        return SqliteJobStore(
            url,
            owner=owner,
            clock=clock,
            synchronous=synchronous,
            busy_timeout_ms=busy_timeout_ms,
            write_batch_max=write_batch_max,
        )
    if url.startswith("postgresql+asyncpg://"):
        from carwash_jobs.store.postgres import PostgresJobStore

        return PostgresJobStore(url, owner=owner, clock=clock, pool_size=pool_size)
    raise ConfigurationError(
        f"CARWASH_DATABASE_URL: unsupported database URL {url!r}; "
        "use sqlite+aiosqlite:///PATH or postgresql+asyncpg://USER@HOST/DB"
    )

"""A database other than the job store, opened by URL (the financial database, demo data).

What a task type needs to read or write outside the engine's transactions.

The job store's `Tx` protocol is reused, so a handler's SQL (portable, with `:name` parameters)
runs the same against the main database (`ctx.transaction`) and against this one. Two drivers,
chosen by the URL like the store: aiosqlite for `sqlite+aiosqlite:///PATH` and an asyncpg pool
for `postgresql+asyncpg://...`. Small on purpose: no ORM, no engine, no retry.
"""

from __future__ import annotations

import asyncio
import sqlite3
from typing import TYPE_CHECKING, Any, Protocol

import aiosqlite
import asyncpg

from carwash_jobs.errors import ConfigurationError
from carwash_jobs.store.base import StatementFailures
from carwash_jobs.store.postgres import PostgresTx

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from types import TracebackType

    from carwash_jobs.store.base import T, Tx, TxFn

SQLITE_PREFIX = "sqlite+aiosqlite:///"
POSTGRES_PREFIX = "postgresql+asyncpg://"


class Database(Protocol):
    """An open database: reads outside a transaction, writes inside one, then `close()`."""

    @property
    def dialect(self) -> str: ...

    async def fetch(self, sql: str, params: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        ...

    async def transaction(self, fn: TxFn[T]) -> T:
        """Run `fn(tx)` in one transaction: committed if it returns, rolled back if it raises or
        if one of its statements failed (then TransactionAborted, as in the job store)."""
        ...

    async def close(self) -> None: ...

    async def __aenter__(self) -> Database: ...

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None: ...


async def open_database(url: str, *, busy_timeout_ms: int = 5000) -> Database:
    """Connect to `url`; the caller closes it (or uses `async with`)."""
    if url.startswith(SQLITE_PREFIX):
        conn = await aiosqlite.connect(url.removeprefix(SQLITE_PREFIX), isolation_level=None)
        await conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        await conn.execute("PRAGMA foreign_keys=ON")  # as PostgreSQL (see SqliteJobStore)
        return SqliteDatabase(conn)
    if url.startswith(POSTGRES_PREFIX):
        pool = await asyncpg.create_pool(
            "postgresql://" + url.removeprefix(POSTGRES_PREFIX), min_size=1, max_size=4
        )
        return PostgresDatabase(pool)
    scheme = url.split("://", 1)[0] if "://" in url else url[:20]
    raise ConfigurationError(
        f"unsupported database URL (scheme {scheme!r}): use {SQLITE_PREFIX}PATH or "
        f"{POSTGRES_PREFIX}USER@HOST/DB"
    )


class _Closing:
    async def close(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Any:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()


class _SqliteTx:
    """A statement of it that fails fails the whole transaction, as in the job store's
    (StatementFailures)."""

    dialect = "sqlite"

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self._conn = conn
        self.failures = StatementFailures(sqlite3.Error)

    async def execute(self, sql: str, params: Mapping[str, Any] | None = None) -> int:
        with self.failures.noting():
            async with self._conn.execute(sql, params or {}) as cur:
                return cur.rowcount

    async def executemany(self, sql: str, params: Sequence[Mapping[str, Any]]) -> None:
        with self.failures.noting():
            await self._conn.executemany(sql, params)

    async def fetch(self, sql: str, params: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        with self.failures.noting():
            async with self._conn.execute(sql, params or {}) as cur:
                names = [d[0] for d in cur.description or ()]
                return [dict(zip(names, row, strict=True)) for row in await cur.fetchall()]


class SqliteDatabase(_Closing):
    """One aiosqlite connection; a lock keeps one transaction at a time on it."""

    dialect = "sqlite"

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self._conn = conn
        self._lock = asyncio.Lock()

    async def fetch(self, sql: str, params: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        async with self._lock:
            return await _SqliteTx(self._conn).fetch(sql, params)

    async def transaction(self, fn: TxFn[T]) -> T:
        async with self._lock:
            await self._conn.execute("BEGIN IMMEDIATE")
            tx = _SqliteTx(self._conn)
            try:
                result = await fn(tx)
                tx.failures.refuse_commit()  # a statement failed and the function went on
            except BaseException:
                await self._conn.execute("ROLLBACK")
                raise
            await self._conn.execute("COMMIT")
            return result

    async def close(self) -> None:
        await self._conn.close()


class PostgresDatabase(_Closing):
    """An asyncpg pool: every transaction takes its own connection."""

    dialect = "postgresql"

    def __init__(self, pool: Any) -> None:
        self._pool = pool

    async def fetch(self, sql: str, params: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        async with self._pool.acquire() as conn:
            return await PostgresTx(conn).fetch(sql, params)

    async def transaction(self, fn: TxFn[T]) -> T:
        async with self._pool.acquire() as conn, conn.transaction():
            tx = PostgresTx(conn)
            result = await fn(tx)
            tx.failures.refuse_commit()
            return result

    async def close(self) -> None:
        await self._pool.close()


if TYPE_CHECKING:
    _sqlite_tx: type[Tx] = _SqliteTx
    _sqlite: type[Database] = SqliteDatabase
    _postgres: type[Database] = PostgresDatabase

"""Tests for carwash_jobs/store/sqlite_writer.py: how the group-commit writer ends. Every caller
waiting on it when it stops gets an answer, its result or a clear error, on a real SQLite file."""

from __future__ import annotations

import asyncio
import sqlite3
from typing import TYPE_CHECKING, Any

import pytest

from carwash_jobs.errors import StoreUnavailable
from carwash_jobs.store.sqlite_writer import SqliteTx, SqliteWriter

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable
    from pathlib import Path


@pytest.fixture
def path(tmp_path: Path) -> Path:
    db = tmp_path / "writer.db"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE notes (caller TEXT)")
    conn.close()
    return db


@pytest.fixture
async def writer(path: Path) -> AsyncIterator[SqliteWriter]:
    def connect() -> sqlite3.Connection:
        return sqlite3.connect(path, isolation_level=None, check_same_thread=False)

    started = SqliteWriter(connect)
    await started.start()
    yield started
    await started.stop()  # a second stop is harmless


def committed(path: Path) -> set[str]:
    """What another connection (another process) sees: only committed rows."""
    conn = sqlite3.connect(path)
    try:
        return {row[0] for row in conn.execute("SELECT caller FROM notes")}
    finally:
        conn.close()


def note(caller: str) -> Callable[[sqlite3.Connection], str]:
    def run(conn: sqlite3.Connection) -> str:
        conn.execute("INSERT INTO notes VALUES (?)", (caller,))
        return caller

    return run


def held_note(caller: str, entered: asyncio.Event,
              release: asyncio.Event) -> Callable[[SqliteTx], Awaitable[str]]:
    """A caller's own transaction that stays inside the batch until the test releases it."""
    async def run(tx: SqliteTx) -> str:
        await tx.execute("INSERT INTO notes VALUES (:c)", {"c": caller})
        entered.set()
        await release.wait()
        return caller

    return run


async def answers(*calls: asyncio.Task[Any]) -> list[Any]:
    """Each caller's result or exception; a caller left unanswered fails the test instead of
    hanging it."""
    _, unanswered = await asyncio.wait(calls, timeout=5)
    assert not unanswered, f"{len(unanswered)} of {len(calls)} callers were never answered"
    return [call.exception() or call.result() for call in calls]


async def test_stop_lets_the_batch_in_flight_and_the_queued_writes_commit_and_answers_them(
    writer: SqliteWriter, path: Path
) -> None:
    entered, release = asyncio.Event(), asyncio.Event()
    # `plain` and `held` go out in one batch; `held` keeps that batch open
    plain = asyncio.create_task(writer.run_sync(note("plain")))
    held = asyncio.create_task(writer.run_async(held_note("held", entered, release)))
    async with asyncio.timeout(5):
        await entered.wait()
    queued = asyncio.create_task(writer.run_sync(note("queued")))  # waits for the next batch
    await asyncio.sleep(0)

    stopping = asyncio.create_task(writer.stop())
    await asyncio.sleep(0)  # the stop begins while the batch is in flight...
    release.set()  # ...and the batch finishes after it

    assert await answers(plain, held, queued) == ["plain", "held", "queued"]
    async with asyncio.timeout(5):
        await stopping
    assert committed(path) == {"plain", "held", "queued"}


async def test_a_write_submitted_once_stop_began_is_refused(writer: SqliteWriter) -> None:
    entered, release = asyncio.Event(), asyncio.Event()
    held = asyncio.create_task(writer.run_async(held_note("held", entered, release)))
    async with asyncio.timeout(5):
        await entered.wait()
    stopping = asyncio.create_task(writer.stop())
    await asyncio.sleep(0)

    with pytest.raises(StoreUnavailable, match=r"not open|closed"):  # a 503 over HTTP
        await writer.run_sync(note("late"))
    release.set()
    assert await answers(held) == ["held"]
    await stopping


async def test_a_caller_transaction_that_raises_cancelled_error_fails_alone(
    writer: SqliteWriter, path: Path
) -> None:
    """Its function awaited a task that was cancelled (a gathered sub-task, say): that is the
    caller's failure, rolled back as any exception of it. The writer stopped for good on it,
    and every later write of the process was refused."""

    async def awaits_a_cancelled_task(tx: SqliteTx) -> str:
        await tx.execute("INSERT INTO notes VALUES ('rolled back')")
        inner = asyncio.ensure_future(asyncio.sleep(10))
        inner.cancel()
        await inner
        return "unreachable"

    (outcome,) = await answers(asyncio.create_task(writer.run_async(awaits_a_cancelled_task)))
    # an error, not a cancel: the caller was not cancelled, and code that catches errors (the
    # processor recording a completion) must see it
    assert isinstance(outcome, RuntimeError)
    assert "cancelled inside" in str(outcome)

    assert await writer.run_sync(note("after")) == "after"
    assert committed(path) == {"after"}


async def test_a_batch_that_outlasts_the_grace_is_cut_off_and_its_callers_are_told(
    writer: SqliteWriter, path: Path
) -> None:
    entered, never = asyncio.Event(), asyncio.Event()
    plain = asyncio.create_task(writer.run_sync(note("plain")))
    held = asyncio.create_task(writer.run_async(held_note("held", entered, never)))
    async with asyncio.timeout(5):
        await entered.wait()
    queued = asyncio.create_task(writer.run_sync(note("queued")))
    await asyncio.sleep(0)

    async with asyncio.timeout(5):
        await writer.stop(grace_seconds=0.1)

    results = await answers(plain, held, queued)
    assert all(isinstance(r, StoreUnavailable) for r in results), results
    assert "rolled back" in str(results[0])
    assert "not written" in str(results[2])
    assert committed(path) == set()  # nothing of the cut-off batch reached the file

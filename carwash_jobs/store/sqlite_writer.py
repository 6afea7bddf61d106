"""Group commit for SQLite: one thread owns the write connection and commits batches.

SQLite has one writer at a time and an fsync per commit (~2,000/s with synchronous=FULL), so
per-job commits cap throughput. Every coroutine's write goes through this writer: it takes all
writes that are waiting, runs each inside its own SAVEPOINT (one caller's failure rolls back only
that caller's work), commits once, and only then resolves each caller's future: an acknowledged
write is durable. A failed commit fails every future of the batch. Stopping answers every
caller too: what was submitted before the stop is committed (within a grace period), and a
write cut off after it gets StoreUnavailable, never silence.

Engine writes are plain functions of the sqlite3 connection, run many per thread hop. A caller's
own transaction (`run_async`) gets a `Tx` whose statements hop to the thread one by one.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import sqlite3
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from carwash_jobs.errors import StoreUnavailable, WriteInsideTransaction
from carwash_jobs.store.base import StatementFailures, cancel_inside_as_error

T = TypeVar("T")
SyncFn = Callable[[sqlite3.Connection], T]

log = logging.getLogger(__name__)

#: the caller's transaction function a writer is running, in its context and its tasks'
_CALLER_OP: contextvars.ContextVar[_Op[Any] | None] = contextvars.ContextVar(
    "carwash_sqlite_caller_op", default=None
)

#: how long stop() lets the writes submitted before it finish (a commit takes milliseconds;
#: only a caller's own transaction that hangs needs the limit)
STOP_GRACE_SECONDS = 10.0


@dataclass(slots=True)
class _Op(Generic[T]):
    future: asyncio.Future[T]
    sync_fn: SyncFn[T] | None = None
    async_fn: Callable[[SqliteTx], Awaitable[T]] | None = None
    outcome: tuple[bool, Any] = field(default=(False, None))


class SqliteTx:
    """The `Tx` of a caller's own transaction, running on the writer's connection. A statement
    of it that fails fails the whole transaction (`failures`, see StatementFailures)."""

    dialect = "sqlite"

    def __init__(self, writer: SqliteWriter) -> None:
        self._writer = writer
        self.failures = StatementFailures(sqlite3.Error)

    async def execute(self, sql: str, params: Mapping[str, Any] | None = None) -> int:
        def run(conn: sqlite3.Connection) -> int:
            return conn.execute(sql, params or {}).rowcount

        return await self.run_sync(run)

    async def executemany(self, sql: str, params: Sequence[Mapping[str, Any]]) -> None:
        def run(conn: sqlite3.Connection) -> None:
            conn.executemany(sql, params)

        await self.run_sync(run)

    async def fetch(
        self, sql: str, params: Mapping[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        def run(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            cur = conn.execute(sql, params or {})
            names = [d[0] for d in cur.description or ()]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

        return await self.run_sync(run)

    async def run_sync(self, fn: SyncFn[T]) -> T:
        """Run engine code (a function of the connection) inside this transaction."""
        with self.failures.noting():
            return await self._writer.in_thread(fn)


class SqliteWriter:
    """Owns the write connection and the task that commits batches."""

    def __init__(self, connect: Callable[[], sqlite3.Connection], batch_max: int = 500) -> None:
        self._connect = connect
        self._batch_max = batch_max
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="carwash-sqlite-writer")
        self._conn: sqlite3.Connection | None = None
        #: None is the stop mark: it comes after every write submitted before the stop
        self._pending: asyncio.Queue[_Op[Any] | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._committing = False  #: the batch in flight has sent its COMMIT
        #: set by a stop that cut the batch in flight off; read by the writer thread
        self._cut_off = False
        self._commit_lock = threading.Lock()
        #: the caller's transaction function running now (inside_caller_transaction)
        self._caller_op: _Op[Any] | None = None
        self.batches = 0  #: commits made; with `writes` it shows how well writes are grouped
        self.writes = 0

    @property
    def queued(self) -> int:
        """Writes waiting for the next batch (with `batches`, it shows how busy the writer is)."""
        return self._pending.qsize()

    async def start(self) -> None:
        self._conn = await self.in_thread(lambda _: self._connect())
        self._task = asyncio.get_running_loop().create_task(self._run(), name="sqlite-writer")

    async def stop(self, grace_seconds: float = STOP_GRACE_SECONDS) -> None:
        """Refuse new writes, let the batch in flight and the writes queued behind it commit,
        then close. A caller that was acknowledged nothing must not wait forever: a batch that
        outlasts `grace_seconds` is cut off, and its callers (and the queued ones) get
        StoreUnavailable saying whether their write may have been committed."""
        task, self._task = self._task, None  # from here on, _submit refuses
        if task is not None:
            self._pending.put_nowait(None)
            try:
                await asyncio.wait([task], timeout=grace_seconds)
            finally:  # also when stop() itself is cancelled: the task answers its callers
                if not task.done():
                    log.warning("the SQLite writer did not finish within %.1fs; cutting it off",
                                grace_seconds)
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
        self._answer_unstarted()
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await asyncio.get_running_loop().run_in_executor(self._executor, conn.close)
        self._executor.shutdown(wait=True)

    async def in_thread(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(self._conn))  # type: ignore[arg-type]

    async def run_sync(self, fn: SyncFn[T]) -> T:
        """Run `fn(conn)` in the next group commit; returns once that commit is durable."""
        return await self._submit(_Op(asyncio.get_running_loop().create_future(), sync_fn=fn))

    async def run_async(self, fn: Callable[[SqliteTx], Awaitable[T]]) -> T:
        """Run a caller's transaction function in the next group commit."""
        return await self._submit(_Op(asyncio.get_running_loop().create_future(), async_fn=fn))

    def inside_caller_transaction(self) -> bool:
        """Whether the code running now is a caller's transaction function that this writer
        is running (`run_async`), or a task it started and may await: a write submitted from
        there would wait for that function, forever. A task it started that writes after the
        function has ended waits as any writer does."""
        running = _CALLER_OP.get()
        return running is not None and running is self._caller_op

    async def _submit(self, op: _Op[T]) -> T:
        if self._task is None or self._task.done():
            raise StoreUnavailable("the store is not open")
        if self.inside_caller_transaction():  # a caller's transaction function awaits this write
            raise WriteInsideTransaction()
        self._pending.put_nowait(op)
        return await op.future

    async def _run(self) -> None:
        batch: list[_Op[Any]] = []
        try:
            stopping = False
            while not stopping:
                first = await self._pending.get()
                if first is None:
                    return
                batch = [first]
                while len(batch) < self._batch_max and not self._pending.empty():
                    op = self._pending.get_nowait()
                    if op is None:
                        stopping = True
                        break
                    batch.append(op)
                await self._commit_and_answer(batch)
                batch = []
        finally:  # cancelled by stop() after its grace: nobody may be left waiting
            self._answer_cut_off(batch)
            self._answer_unstarted()

    async def _commit_and_answer(self, batch: list[_Op[Any]]) -> None:
        self._committing = False  # _commit sets it just before the COMMIT
        try:
            await self._commit(batch)
        except Exception as exc:  # the commit itself failed: nobody's write is durable
            log.exception("group commit of %d writes failed", len(batch))
            with contextlib.suppress(Exception):
                await self.in_thread(_rollback)
            for op in batch:
                if not op.future.done():
                    op.future.set_exception(exc)
            return
        self.batches += 1
        self.writes += len(batch)
        for op in batch:
            ok, value = op.outcome
            if op.future.done():
                continue
            if ok:
                op.future.set_result(value)
            else:
                op.future.set_exception(value)

    def _answer_cut_off(self, batch: list[_Op[Any]]) -> None:
        """The batch in flight was cancelled. Its transaction is rolled back when the connection
        closes, unless the COMMIT had already gone to SQLite: then nobody can say."""
        with self._commit_lock:
            self._cut_off = True
        if self._committing:
            message = ("the store closed while this write was being committed: it may or may "
                       "not be durable")
        else:
            message = "the store closed before this write was committed: it was rolled back"
        for op in batch:
            if not op.future.done():
                op.future.set_exception(StoreUnavailable(message))

    def _answer_unstarted(self) -> None:
        while not self._pending.empty():
            op = self._pending.get_nowait()
            if op is not None and not op.future.done():
                op.future.set_exception(
                    StoreUnavailable("the store closed before this write was started: it was "
                                     "not written")
                )

    async def _commit(self, batch: list[_Op[Any]]) -> None:
        if all(op.sync_fn is not None for op in batch):
            # engine writes only (the usual batch): BEGIN, the writes and COMMIT in one thread
            # hop, not three; each hop costs a wake-up of the event loop (~0.1 ms)
            await self.in_thread(functools.partial(self._commit_group, group=batch))
            return
        await self.in_thread(_begin)
        start = 0
        while start < len(batch):
            end = start
            while end < len(batch) and batch[end].sync_fn is not None:
                end += 1
            if end > start:  # a run of engine writes: one thread hop for all of them
                await self.in_thread(functools.partial(_run_group, group=batch[start:end]))
                start = end
            else:
                await self._run_caller_tx(batch[start])
                start += 1
        self._committing = True
        await self.in_thread(lambda conn: conn.execute("COMMIT"))

    def _commit_group(self, conn: sqlite3.Connection, *, group: list[_Op[Any]]) -> None:
        _begin(conn)
        _run_group(conn, group=group)
        with self._commit_lock:  # either the COMMIT goes out, or the cut-off said "rolled back"
            if self._cut_off:
                conn.execute("ROLLBACK")
                raise StoreUnavailable("the store closed before this write was committed")
            self._committing = True
        conn.execute("COMMIT")

    async def _run_caller_tx(self, op: _Op[Any]) -> None:
        assert op.async_fn is not None
        await self.in_thread(lambda conn: conn.execute("SAVEPOINT op"))
        tx = SqliteTx(self)
        self._caller_op = op
        running = _CALLER_OP.set(op)  # seen by the function and by the tasks it starts
        try:
            with cancel_inside_as_error():  # a stop() cutting the writer off still passes
                value = await op.async_fn(tx)
            tx.failures.refuse_commit()  # a statement failed and the function went on
        except Exception as exc:
            await self.in_thread(_rollback_savepoint)
            op.outcome = (False, exc)
        else:
            await self.in_thread(lambda conn: conn.execute("RELEASE op"))
            op.outcome = (True, value)
        finally:
            _CALLER_OP.reset(running)
            self._caller_op = None


def _run_group(conn: sqlite3.Connection, *, group: list[_Op[Any]]) -> None:
    for op in group:
        assert op.sync_fn is not None
        conn.execute("SAVEPOINT op")
        try:
            value = op.sync_fn(conn)
        except Exception as exc:
            _rollback_savepoint(conn)
            op.outcome = (False, exc)
        else:
            conn.execute("RELEASE op")
            op.outcome = (True, value)


def _begin(conn: sqlite3.Connection) -> None:
    conn.execute("BEGIN IMMEDIATE")


def _rollback_savepoint(conn: sqlite3.Connection) -> None:
    conn.execute("ROLLBACK TO op")
    conn.execute("RELEASE op")


def _rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        conn.execute("ROLLBACK")

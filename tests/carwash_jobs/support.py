"""Helpers shared by the engine tests: a clock the test moves, tiny task types, and a harness
that wires a real SQLite store, a JobQueue and a QueueProcessor the way the Runtime does."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import sqlite3
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field

from carwash_jobs.processor import ProcessorConfig, QueueProcessor
from carwash_jobs.queue import EnqueueOptions, JobQueue
from carwash_jobs.ready import QueueMode, ReadyQueue
from carwash_jobs.registry import (
    AnyTaskType,
    TaskDefaults,
    TaskHooks,
    TaskOptions,
    TaskRegistry,
    TaskType,
)
from carwash_jobs.retry import RetryPolicy
from carwash_jobs.scheduler import Scheduler
from carwash_jobs.store.sqlite import SqliteJobStore
from carwash_jobs.types import Clock, JobId, utc_now

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
    from pathlib import Path

    from carwash_jobs.context import JobContext
    from carwash_jobs.lifecycle import JobStatus
    from carwash_jobs.metrics import Metrics
    from carwash_jobs.middleware import Middleware
    from carwash_jobs.registry import Handler
    from carwash_jobs.store.base import JobRow

OWNER = "test-host/1/0/owner"
#: names the PostgreSQL server of the tests that need one; without it they are skipped
POSTGRES_URL_ENV = "CARWASH_TEST_POSTGRES_URL"


class ManualClock:
    """A Clock that moves only when the test says so (whole seconds, so run_at is exact)."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = (start or datetime.now(UTC)).replace(microsecond=0)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> datetime:
        self.now += timedelta(seconds=seconds)
        return self.now


# -- payloads and task types defined for the tests ------------------------------------------
class Item(BaseModel):
    label: str = ""
    n: int = 0


class Line(BaseModel):
    sku: str = Field(min_length=1)
    qty: int = Field(gt=0)


class Order(BaseModel):
    customer_id: int
    lines: list[Line] = Field(min_length=1)


#: retries a few milliseconds apart: processor tests run them on the real clock
FAST_RETRY = RetryPolicy(base_seconds=0.01, factor=2.0, max_seconds=0.2, jitter=0.0)


async def noop(ctx: JobContext, payload: Item) -> dict[str, Any]:
    return {"label": payload.label, "n": payload.n, "attempt": ctx.attempt}


async def place_order(ctx: JobContext, payload: Order) -> dict[str, Any]:
    return {"lines": len(payload.lines)}


NOOP: AnyTaskType = TaskType("noop", Item, noop, options=TaskOptions(retry=FAST_RETRY))
ORDER: AnyTaskType = TaskType("order", Order, place_order, slug="orders")
#: what TaskRegistry.load finds when it imports this module
TASK_TYPE = NOOP


class Calls:
    """What a task type's hooks were called with, in order."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, JobId, JobStatus]] = []

    def hooks(self) -> TaskHooks:
        async def completed(job: JobRow) -> None:
            self.seen.append(("on_completed", job.id, job.status))

        async def failed(job: JobRow) -> None:
            self.seen.append(("on_failed", job.id, job.status))

        async def cancelled(job: JobRow) -> None:
            self.seen.append(("on_cancelled", job.id, job.status))

        return TaskHooks(on_completed=completed, on_failed=failed, on_cancelled=cancelled)


def task_type(
    name: str,
    handler: Handler[Item, Any],
    *,
    hooks: TaskHooks | None = None,
    **options: Any,
) -> AnyTaskType:
    """A test task type taking an Item; options default to fast retries."""
    opts = TaskOptions(**{"retry": FAST_RETRY, **options})
    return TaskType(name, Item, handler, options=opts, hooks=hooks or TaskHooks())


#: the settings' own defaults (default_max_attempts, default_timeout_seconds)
SETTINGS_DEFAULTS = TaskDefaults()


def registry_with(*extra: AnyTaskType, defaults: TaskDefaults = SETTINGS_DEFAULTS) -> TaskRegistry:
    return TaskRegistry([NOOP, ORDER, *extra], defaults)


# -- databases ------------------------------------------------------------------------------
def sqlite_url(path: Path) -> str:
    return f"sqlite+aiosqlite:///{path}"


def copy_database(template: Path, path: Path) -> str:
    """Copy a migrated (closed, checkpointed) SQLite file; returns the copy's URL."""
    shutil.copyfile(template, path)
    return sqlite_url(path)


async def open_sqlite(url: str, *, owner: str = OWNER, clock: Clock = utc_now,
                      synchronous: str = "FULL") -> SqliteJobStore:
    store = SqliteJobStore(url, owner=owner, clock=clock, synchronous=synchronous)
    await store.open()
    return store


def count_rows(url: str, table: str = "worker_queue") -> int:
    """Rows in a table, read on a connection of its own (what another process would see)."""
    conn = sqlite3.connect(url.removeprefix("sqlite+aiosqlite:///"))
    try:
        (n,) = conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()
        return int(n)
    finally:
        conn.close()


def outcomes(job: JobRow) -> list[str]:
    return [entry["outcome"] for entry in job.attempt_history]


# -- a wired engine -------------------------------------------------------------------------
@dataclass
class Harness:
    """Store, queue, processor and scheduler as the Runtime wires them; the scheduler's duties
    are called directly by tests (never started), the processor's heartbeat too."""

    store: SqliteJobStore
    queue: JobQueue
    processor: QueueProcessor
    scheduler: Scheduler
    clock: Clock
    started: bool = False

    async def start(self) -> None:
        await self.processor.start()
        self.started = True

    async def enqueue(self, task_type: str = "noop", payload: Mapping[str, Any] | None = None,
                      **options: Any) -> JobRow:
        inserted = await self.queue.enqueue(task_type, payload or {}, EnqueueOptions(**options))
        return inserted.job

    async def get(self, job_id: JobId) -> JobRow:
        return await self.store.get(job_id)

    def rows(self, table: str = "worker_queue") -> int:
        return count_rows(sqlite_url(self.store.path), table)

    async def run_until_idle(self, within: float = 10.0, *, include_timers: bool = False) -> None:
        await self.processor.run_until_idle(within, include_timers=include_timers)

    async def close(self) -> None:
        if self.started:
            await self.processor.stop()
            self.started = False
        self.queue.close()
        await self.store.close()


@dataclass
class Harnesses:
    """Makes harnesses on one database file and closes them all at the end of a test."""

    url: str
    made: list[Harness] = field(default_factory=list)

    async def make(
        self,
        *task_types: AnyTaskType,
        clock: Clock = utc_now,
        start: bool = True,
        owner: str = OWNER,
        store: SqliteJobStore | None = None,
        concurrency: int = 4,
        lease: timedelta = timedelta(seconds=60),
        shutdown_grace: timedelta = timedelta(seconds=0.1),
        # never comes by itself in a test (tests call processor.heartbeat()); it still says how
        # soon the next one would come, so a failing one stops the jobs whose leases run out
        heartbeat_interval: timedelta = timedelta(hours=1),
        middleware: Sequence[Middleware] = (),
        queue_mode: QueueMode = "weighted",
        weights: Mapping[str, int] | None = None,
        metrics: Metrics | None = None,
        handoff: bool = True,
        defaults: TaskDefaults = SETTINGS_DEFAULTS,
    ) -> Harness:
        if store is None:  # a store passed in is opened by the test, closed by the harness
            store = await open_sqlite(self.url, owner=owner, clock=clock)
        ready = ReadyQueue(queue_mode, weights)
        queue = JobQueue(store, registry_with(*task_types, defaults=defaults), ready=ready,
                         clock=clock, metrics=metrics)
        processor = QueueProcessor(
            queue, owner=owner, clock=clock, metrics=metrics,
            config=ProcessorConfig(
                concurrency=concurrency, lease=lease, heartbeat_interval=heartbeat_interval,
                shutdown_grace=shutdown_grace, middleware=middleware, handoff=handoff,
            ),
        )
        scheduler = Scheduler(queue, clock=clock, reload_interval=timedelta(hours=1),
                              lease_check_interval=timedelta(hours=1))
        harness = Harness(store, queue, processor, scheduler, clock)
        self.made.append(harness)
        if start:
            await harness.start()
        return harness

    async def close_all(self) -> None:
        for harness in reversed(self.made):
            await harness.close()
        self.made.clear()


class Gate:
    """Lets a test hold handlers inside their run and release them when it chooses."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        #: a held handler was cancelled (stopped) here
        self.stopped = asyncio.Event()
        self.inside = 0

    async def hold(self) -> None:
        self.inside += 1
        self.entered.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.stopped.set()
            raise
        finally:
            self.inside -= 1

    async def handler(self, ctx: JobContext, payload: Item) -> None:
        """A handler that holds its job here: `task_type("held", gate.handler)`."""
        await self.hold()


async def autovacuum_is_on(dsn: str) -> bool:
    """Whether the PostgreSQL server at `dsn` vacuums the tables itself (the store then leaves
    them alone), asked as the store asks it."""
    import asyncpg

    from carwash_jobs.store.postgres import AUTOVACUUM_ON

    conn = await asyncpg.connect(dsn)
    try:
        return bool(await conn.fetchval(AUTOVACUUM_ON))
    finally:
        await conn.close()


async def skip_unless_autovacuum_is_off(dsn: str) -> None:
    """Skip the calling test where the server vacuums the tables itself: there is no vacuum
    of the store's own to see."""
    import pytest

    if await autovacuum_is_on(dsn):
        pytest.skip("the server's autovacuum is on: the store leaves its tables to it")


# -- PostgreSQL databases of the tests' own ------------------------------------------------------
def postgres_url(server_url: str, database: str, driver: str = "postgresql+asyncpg") -> str:
    """`server_url` pointed at another database, with another driver if asked."""
    from sqlalchemy.engine import make_url

    url = make_url(server_url).set(drivername=driver, database=database)
    return url.render_as_string(hide_password=False)


async def on_postgres_server(server_url: str, *statements: str) -> None:
    """Run statements (CREATE/DROP DATABASE) on the server's own database."""
    import asyncpg
    from sqlalchemy.engine import make_url

    database = make_url(server_url).database or "postgres"
    conn = await asyncpg.connect(postgres_url(server_url, database, driver="postgresql"))
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


@contextlib.contextmanager
def migrated_postgres_template(prefix: str) -> Iterator[tuple[str, str] | None]:
    """(server URL, template database): migrated once (for a session fixture), which each
    test copies with CREATE DATABASE ... TEMPLATE (procrastinate's trick, far faster than
    migrating); None when POSTGRES_URL_ENV names no server."""
    from carwash_jobs.store.migrations import upgrade

    server = os.environ.get(POSTGRES_URL_ENV)
    if not server:
        yield None
        return
    name = f"{prefix}_tpl_{secrets.token_hex(4)}"
    asyncio.run(on_postgres_server(server, f'CREATE DATABASE "{name}"'))
    try:
        asyncio.run(upgrade(postgres_url(server, name)))
        yield server, name
    finally:
        asyncio.run(on_postgres_server(server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@contextlib.asynccontextmanager
async def postgres_database_from(template: tuple[str, str] | None, prefix: str) -> AsyncIterator[str]:
    """The URL of a fresh database copied from `template`, dropped afterwards; the calling test
    is skipped without a server."""
    import pytest

    if template is None:
        pytest.skip(f"{POSTGRES_URL_ENV} is not set")
    server, template_name = template
    name = f"{prefix}_{secrets.token_hex(6)}"
    await on_postgres_server(server, f'CREATE DATABASE "{name}" TEMPLATE "{template_name}"')
    try:
        yield postgres_url(server, name)
    finally:
        await on_postgres_server(server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.asynccontextmanager
async def migrated_database(
    backend: str, sqlite_template: Path, sqlite_path: Path,
    postgres_template: tuple[str, str] | None, prefix: str,
) -> AsyncIterator[str]:
    """The URL of a migrated database of the calling test's own, on `backend`: an SQLite file
    copied from `sqlite_template`, or a PostgreSQL database copied from `postgres_template`
    (the test is skipped without a server)."""
    if backend == "sqlite":
        yield copy_database(sqlite_template, sqlite_path)
        return
    async with postgres_database_from(postgres_template, prefix) as url:
        yield url

"""Tests for carwash_jobs/runtime.py: start/stop order, roles, and recovery of what a dead local
process left running (in-process; the SIGKILL/SIGTERM flows live in tests/acceptance)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sqlite3
import threading
from datetime import timedelta
from typing import TYPE_CHECKING

import asyncpg
import pytest

from carwash_jobs.errors import StoreUnavailable
from carwash_jobs.lifecycle import JobStatus
from carwash_jobs.registry import TaskHooks
from carwash_jobs.runtime import Runtime
from carwash_jobs.settings import load_settings
from carwash_jobs.store.base import NewJob
from carwash_jobs.store.postgres import dsn_of
from carwash_jobs.types import JobId, new_job_id, pid_namespace
from tests.carwash_jobs.support import (
    ManualClock,
    noop,
    open_sqlite,
    outcomes,
    registry_with,
    skip_unless_autovacuum_is_off,
    sqlite_url,
    task_type,
)

if TYPE_CHECKING:
    from pathlib import Path

    from carwash_jobs.settings import Settings
    from carwash_jobs.store.base import JobRow, JobStore

S = JobStatus


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Neither the developer's CARWASH_* variables nor the checkout's config file leak in."""
    for name in list(os.environ):
        if name.upper().startswith("CARWASH_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def settings_for(url: str) -> Settings:
    return load_settings(database_url=url, concurrency=2, shutdown_grace_seconds=0.1)


def dead_local_pid() -> int:
    """A pid no process on this host has now."""
    pid = 999_999
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid += 1


async def running_row(store: JobStore, clock: ManualClock, owner: str,
                      max_attempts: int = 5, task_type: str = "noop") -> JobId:
    """A row left running by `owner`, with a lease far from expiring."""
    job = NewJob(id=new_job_id(), task_type=task_type, payload={}, status=S.queued, run_at=clock(),
                 created_at=clock(), max_attempts=max_attempts, claimed_by=owner,
                 lease_until=clock() + timedelta(hours=1))
    await store.insert([job])
    return job.id


async def test_start_migrates_a_new_database_runs_jobs_and_stop_closes_everything(
    tmp_path: Path,
) -> None:
    runtime = Runtime(settings_for(sqlite_url(tmp_path / "fresh" / "jobs.db")), registry_with())
    await runtime.start()
    try:
        assert runtime.started
        assert runtime.processor is not None
        job = (await runtime.queue.enqueue("noop", {"label": "first"})).job
        await runtime.processor.run_until_idle(5)
        assert (await runtime.store.get(job.id)).status == S.completed
    finally:
        await runtime.stop()
    assert not runtime.started
    await runtime.store.close()  # closing twice is harmless


async def test_the_runtime_is_an_async_context_manager(db_url: str) -> None:
    async with Runtime(settings_for(db_url), registry_with()) as runtime:
        assert runtime.started
        await runtime.store.ping()
    assert not runtime.started


async def test_the_api_role_writes_jobs_but_runs_none(db_url: str) -> None:
    async with Runtime(settings_for(db_url), registry_with(), role="api") as runtime:
        assert runtime.processor is None
        assert runtime.scheduler is None
        assert runtime.queue.ready is None
        job = (await runtime.queue.enqueue("noop", {})).job
        assert (await runtime.store.get(job.id)).status == S.queued


def drop_table(url: str, table: str) -> None:
    """A migrated database without `table`: a real statement of the start fails on it."""
    with contextlib.closing(sqlite3.connect(url.removeprefix("sqlite+aiosqlite:///"))) as conn:
        conn.execute(f"DROP TABLE {table}")


class SchedulerDown(Exception):
    """The last part of a start failing, after every other part had started."""


async def scheduler_down() -> None:
    raise SchedulerDown


@pytest.mark.parametrize("failing", ["announce", "scheduler"])
async def test_a_start_that_fails_after_the_store_opened_stops_what_it_started(
    db_url: str, failing: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The announcement failing (as SQLite's lock held by another program made it fail) or the
    last part failing (the processor, the announcer and the store running by then): the start
    raises that error with nothing of the runtime left running. The store's connection
    threads, left open, kept the process alive for good after its start-up had failed."""
    threads_before = set(threading.enumerate())
    runtime = Runtime(settings_for(db_url), registry_with())
    expected: type[Exception] = sqlite3.OperationalError
    if failing == "announce":
        drop_table(db_url, "processes")
    else:
        assert runtime.scheduler is not None
        monkeypatch.setattr(runtime.scheduler, "start", scheduler_down)
        expected = SchedulerDown

    with pytest.raises(expected):
        await runtime.start()

    assert not runtime.started
    assert asyncio.all_tasks() == {asyncio.current_task()}  # the announcer, the processor's
    with pytest.raises(StoreUnavailable, match="not open"):
        await runtime.store.ping()
    for thread in set(threading.enumerate()) - threads_before:
        if not thread.daemon and not thread.name.startswith("asyncio_"):  # those end with the loop
            thread.join(timeout=5)
            assert not thread.is_alive(), f"{thread.name} would keep the process alive"
    if failing == "scheduler":  # it had announced itself: it takes that back
        store = await open_sqlite(db_url)
        try:
            assert runtime.owner not in [p.owner for p in await store.live_processes()]
        finally:
            await store.close()


async def test_each_runtime_has_its_own_owner_identity(db_url: str) -> None:
    first = Runtime(settings_for(db_url), registry_with())
    second = Runtime(settings_for(db_url), registry_with())
    assert first.owner != second.owner
    host, pid, _start, _nonce, namespace = first.owner.split("/")
    assert (host, int(pid), namespace) == (socket.gethostname(), os.getpid(), pid_namespace())


async def test_start_requeues_rows_left_running_by_a_dead_local_process(
    db_url: str, clock: ManualClock
) -> None:
    store = await open_sqlite(db_url, clock=clock)
    host, here = socket.gethostname(), pid_namespace()
    gone = dead_local_pid()
    dead = f"{host}/{gone}/0/x/{here}"
    orphan = await running_row(store, clock, dead)
    orphan_last_try = await running_row(store, clock, dead, max_attempts=1)
    this_process = await running_row(store, clock, f"{host}/{os.getpid()}/0/other-runtime/{here}")
    other_host = await running_row(store, clock, f"another-host/1/0/x/{here}")
    # this hostname, but pids counted elsewhere (a container on the host's network): alive
    # for all this process can tell, as is an identity that does not say its namespace
    other_namespace = await running_row(store, clock, f"{host}/{gone}/0/x/elsewhere")
    unknown_namespace = await running_row(store, clock, f"{host}/{gone}/0/x")
    await store.close()

    async with Runtime(settings_for(db_url), registry_with(), clock=clock) as runtime:
        assert runtime.processor is not None
        await runtime.processor.run_until_idle(5)
        rows = {row.id: row for row in await runtime.store.get_many(
            [orphan, orphan_last_try, this_process, other_host, other_namespace,
             unknown_namespace])}
        assert (rows[orphan].status, rows[orphan].attempts) == (S.completed, 2)
        assert outcomes(rows[orphan]) == ["worker_lost", "completed"]
        assert rows[orphan].attempt_history[0]["owner"] == dead
        assert (rows[orphan_last_try].status, outcomes(rows[orphan_last_try])) == (
            S.failed, ["worker_lost"])
        assert runtime.metrics.registry.get_sample_value(
            "carwash_jobs_failed_total", {"task_type": "noop"}) == 1
        assert rows[this_process].status == S.running  # maybe alive: its lease decides
        assert rows[other_host].status == S.running  # cannot tell from here
        assert rows[other_namespace].status == S.running
        assert rows[unknown_namespace].status == S.running


async def test_a_leftover_on_its_last_attempt_gets_on_failed_and_its_dependent_on_cancelled(
    db_url: str, clock: ManualClock
) -> None:
    """And the job that waited on it, which its failure cancels, gets on_cancelled."""
    ended: list[tuple[JobId, JobStatus]] = []

    async def on_end(job: JobRow) -> None:
        ended.append((job.id, job.status))

    hooked = task_type("hooked", noop, hooks=TaskHooks(on_failed=on_end, on_cancelled=on_end))
    store = await open_sqlite(db_url, clock=clock)
    dead = f"{socket.gethostname()}/{dead_local_pid()}/0/x/{pid_namespace()}"
    last_try = await running_row(store, clock, dead, max_attempts=1, task_type="hooked")
    await running_row(store, clock, dead, max_attempts=2, task_type="hooked")  # runs again
    waiting = NewJob(id=new_job_id(), task_type="hooked", payload={}, status=S.queued,
                     run_at=clock(), created_at=clock(), depends_on=(last_try,))
    await store.insert([waiting])
    await store.close()

    async with Runtime(settings_for(db_url), registry_with(hooked), clock=clock) as runtime:
        assert runtime.processor is not None
        await runtime.processor.run_until_idle(5)
        assert ended == [(last_try, S.failed), (waiting.id, S.cancelled)]


async def test_recover_leftovers_finds_nothing_when_every_owner_is_alive(
    db_url: str, clock: ManualClock
) -> None:
    runtime = Runtime(settings_for(db_url), registry_with(), clock=clock)
    await runtime.store.open()
    try:
        await running_row(runtime.store, clock, runtime.owner)
        assert await runtime.recover_leftovers() == 0
    finally:
        await runtime.store.close()


@pytest.mark.parametrize(("interval", "duties"), [
    (30.0, {"reload", "release-expired-leases", "prune", "vacuum"}),
    (0.0, {"reload", "release-expired-leases", "prune"}),
])
async def test_the_scheduler_vacuums_on_its_interval_unless_it_is_zero(
    db_url: str, interval: float, duties: set[str]
) -> None:
    settings = load_settings(database_url=db_url, vacuum_interval_seconds=interval)

    runtime = Runtime(settings, registry_with())

    assert runtime.scheduler is not None
    assert set(runtime.scheduler.duties) == duties
    if interval:
        assert runtime.scheduler.duties["vacuum"] == interval


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_a_worker_on_postgresql_vacuums_the_queue_tables_while_autovacuum_is_off(
    database_url: str,
) -> None:
    await skip_unless_autovacuum_is_off(dsn_of(database_url))
    conn = await asyncpg.connect(dsn_of(database_url))
    try:
        settings = load_settings(database_url=database_url, concurrency=2,
                                 shutdown_grace_seconds=0.1, vacuum_interval_seconds=1)
        async with Runtime(settings, registry_with()), asyncio.timeout(20):
            # the server's statistics have no event to wait on
            while not await conn.fetchval(
                "SELECT vacuum_count FROM pg_stat_user_tables WHERE relname = 'worker_queue'"
            ):
                await asyncio.sleep(0.2)
                await conn.execute("SELECT pg_stat_clear_snapshot()")
    finally:
        await conn.close()


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_a_workers_vacuum_leaves_it_to_another_workers_within_half_the_interval(
    database_url: str,
) -> None:
    """Two workers with an interval of 60 s: the second one's duty, 30 s or less after the
    first one's vacuum, vacuums nothing. (The duty the scheduler runs, `_vacuum`, is called
    here, not waited for.)"""
    await skip_unless_autovacuum_is_off(dsn_of(database_url))
    settings = load_settings(database_url=database_url, vacuum_interval_seconds=60)
    first, second = Runtime(settings, registry_with()), Runtime(settings, registry_with())
    conn = await asyncpg.connect(dsn_of(database_url))
    count = "SELECT vacuum_count FROM pg_stat_user_tables WHERE relname = 'worker_queue'"
    try:
        for runtime in (first, second):
            await runtime.store.open()
        await first._vacuum()
        assert await conn.fetchval(count) == 1
        await second._vacuum()
        assert await conn.fetchval(count) == 1
    finally:
        await conn.close()
        for runtime in (first, second):
            await runtime.store.close()

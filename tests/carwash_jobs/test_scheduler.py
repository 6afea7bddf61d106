"""Tests for carwash_jobs/scheduler.py: the safety net's duties, called directly, and their
periodic wiring in APScheduler (awaited through the `reloaded` event, never a sleep)."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta
from typing import TYPE_CHECKING

import pytest

from carwash_jobs.lifecycle import JobStatus
from carwash_jobs.metrics import Metrics
from carwash_jobs.registry import TaskHooks
from carwash_jobs.scheduler import Scheduler
from carwash_jobs.store.base import NewJob
from carwash_jobs.types import JobId, new_job_id
from tests.carwash_jobs.support import OWNER, noop, open_sqlite, outcomes, task_type

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from datetime import datetime

    from carwash_jobs.store.base import JobRow
    from carwash_jobs.store.sqlite import SqliteJobStore
    from tests.carwash_jobs.support import Harnesses, ManualClock

S = JobStatus
DEAD_OWNER = "dead-host/4242/0/gone"
LEASE = timedelta(seconds=60)


@pytest.fixture
async def other_process(db_url: str, clock: ManualClock) -> AsyncIterator[SqliteJobStore]:
    """A second store on the same file: another process writing the same database."""
    store = await open_sqlite(db_url, owner=DEAD_OWNER, clock=clock)
    yield store
    await store.close()


def new_job(clock: ManualClock, *, task_type: str = "noop", run_at: datetime | None = None,
            max_attempts: int = 5, depends_on: tuple[JobId, ...] = ()) -> NewJob:
    return NewJob(id=new_job_id(), task_type=task_type, payload={"label": "elsewhere"},
                  status=S.queued, run_at=run_at or clock(), created_at=clock(),
                  max_attempts=max_attempts, depends_on=depends_on)


async def insert(store: SqliteJobStore, job: NewJob) -> JobId:
    (inserted,) = await store.insert([job])
    return inserted.job.id


async def test_reload_loads_due_rows_another_process_inserted(
    harnesses: Harnesses, clock: ManualClock, other_process: SqliteJobStore
) -> None:
    h = await harnesses.make(clock=clock, start=False)
    job_id = await insert(other_process, new_job(clock))
    assert not h.queue.contains(job_id)
    assert not h.scheduler.reloaded.is_set()
    assert await h.scheduler.reload() == 1
    assert h.scheduler.reloaded.is_set()
    assert h.queue.contains(job_id)
    assert await h.scheduler.reload() == 0  # already held: not loaded twice
    await h.start()
    await h.run_until_idle()
    assert (await h.get(job_id)).status == S.completed


async def test_reload_promotes_scheduled_rows_once_they_are_due(
    harnesses: Harnesses, clock: ManualClock, other_process: SqliteJobStore
) -> None:
    h = await harnesses.make(clock=clock)
    job_id = await insert(other_process, new_job(clock, run_at=clock() + timedelta(seconds=60)))
    assert await h.scheduler.reload() == 0
    assert (await h.get(job_id)).status == S.scheduled
    clock.advance(60)
    assert await h.scheduler.reload() == 1
    await h.run_until_idle()
    assert (await h.get(job_id)).status == S.completed
    assert [e.event for e in await h.store.events(job_id)] == [
        "enqueued", "due", "claimed", "completed"
    ]


async def test_reload_leaves_task_types_this_process_does_not_know(
    harnesses: Harnesses, clock: ManualClock, other_process: SqliteJobStore
) -> None:
    h = await harnesses.make(clock=clock, start=False)
    job_id = await insert(other_process, new_job(clock, task_type="unknown_here"))
    assert await h.scheduler.reload() == 0
    assert not h.queue.contains(job_id)


async def test_an_expired_lease_is_released_to_queued_counting_the_attempt_and_runs_again(
    harnesses: Harnesses, clock: ManualClock, other_process: SqliteJobStore
) -> None:
    h = await harnesses.make(clock=clock)
    job_id = await insert(other_process, new_job(clock))
    await other_process.claim([job_id], DEAD_OWNER, clock() + LEASE)
    clock.advance(59)
    assert await h.scheduler.release_expired_leases() == 0
    assert (await h.get(job_id)).status == S.running
    clock.advance(2)
    assert await h.scheduler.release_expired_leases() == 1
    await h.run_until_idle()
    row = await h.get(job_id)
    assert (row.status, row.attempts) == (S.completed, 2)
    assert [(e["attempt"], e["outcome"], e["owner"]) for e in row.attempt_history] == [
        (1, "worker_lost", DEAD_OWNER), (2, "completed", OWNER)
    ]
    assert "lease_expired" in [e.event for e in await h.store.events(job_id)]


async def test_an_expired_lease_on_the_last_attempt_fails_the_job(
    harnesses: Harnesses, clock: ManualClock, other_process: SqliteJobStore
) -> None:
    h = await harnesses.make(clock=clock)
    job_id = await insert(other_process, new_job(clock, max_attempts=1))
    await other_process.claim([job_id], DEAD_OWNER, clock() + LEASE)
    clock.advance(61)
    assert await h.scheduler.release_expired_leases() == 1
    await h.run_until_idle()
    row = await h.get(job_id)
    assert (row.status, row.attempts) == (S.failed, 1)
    assert row.error == f"worker {DEAD_OWNER} stopped renewing its lease"
    assert outcomes(row) == ["worker_lost"]


async def test_a_job_failed_for_good_by_a_lost_lease_gets_on_failed_once_and_its_dependent_on_cancelled(
    harnesses: Harnesses, clock: ManualClock, other_process: SqliteJobStore
) -> None:
    """The worker that died cannot call the hook; the scheduler that fails the job can, and
    on_cancelled of the job waiting on it, which the failure cancels."""
    failed: list[tuple[JobId, JobStatus, str | None]] = []
    cancelled: list[tuple[JobId, JobStatus]] = []

    async def on_failed(job: JobRow) -> None:
        failed.append((job.id, job.status, job.error))

    async def on_cancelled(job: JobRow) -> None:
        cancelled.append((job.id, job.status))

    hooked = task_type("hooked", noop, hooks=TaskHooks(on_failed=on_failed,
                                                       on_cancelled=on_cancelled))
    metrics = Metrics()
    h = await harnesses.make(hooked, clock=clock, start=False, metrics=metrics)
    last = await insert(other_process, new_job(clock, task_type="hooked", max_attempts=1))
    retried = await insert(other_process, new_job(clock, task_type="hooked", max_attempts=2))
    waiting = await insert(other_process, new_job(clock, task_type="hooked", depends_on=(last,)))
    await other_process.claim([last, retried], DEAD_OWNER, clock() + LEASE)
    clock.advance(61)
    h2 = await harnesses.make(hooked, clock=clock, owner="second-host/7/0/x", start=False)
    assert await h.scheduler.release_expired_leases() == 2
    assert await h2.scheduler.release_expired_leases() == 0  # another process's scan: no twin
    assert failed == [(last, S.failed, f"worker {DEAD_OWNER} stopped renewing its lease")]
    assert cancelled == [(waiting, S.cancelled)]
    assert (await h.get(retried)).status == S.queued  # attempts left: not an end, no hook
    # the counter the failure alerts watch: the processor that would have counted it is gone
    assert metrics.registry.get_sample_value(
        "carwash_jobs_failed_total", {"task_type": "hooked"}) == 1


async def test_a_lease_renewed_by_the_heartbeat_is_not_released(
    harnesses: Harnesses, clock: ManualClock, other_process: SqliteJobStore
) -> None:
    h = await harnesses.make(clock=clock, start=False)
    job_id = await insert(other_process, new_job(clock))
    await other_process.claim([job_id], DEAD_OWNER, clock() + LEASE)
    clock.advance(45)
    await other_process.extend_leases(DEAD_OWNER, [job_id], clock() + LEASE)
    clock.advance(45)
    assert await h.scheduler.release_expired_leases() == 0
    assert (await h.get(job_id)).status == S.running


async def test_the_started_scheduler_runs_its_duties_periodically(
    harnesses: Harnesses, clock: ManualClock, other_process: SqliteJobStore
) -> None:
    h = await harnesses.make(clock=clock, start=False)
    scheduler = Scheduler(h.queue, clock=clock, reload_interval=timedelta(seconds=0.05),
                          lease_check_interval=timedelta(hours=1))
    job_id = await insert(other_process, new_job(clock))
    await scheduler.start()
    try:
        async with asyncio.timeout(5):
            await scheduler.reloaded.wait()
    finally:
        await scheduler.stop()
    assert h.queue.contains(job_id)


async def test_a_failing_duty_is_logged_and_the_others_go_on(
    harnesses: Harnesses, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    h = await harnesses.make(clock=clock, start=False)
    scheduler = Scheduler(h.queue, clock=clock, reload_interval=timedelta(seconds=0.05),
                          lease_check_interval=timedelta(hours=1))
    failed = asyncio.Event()

    async def broken() -> None:
        failed.set()
        raise RuntimeError("prune failed")

    scheduler.add_duty("prune", broken, 0.05)
    with caplog.at_level(logging.ERROR, logger="carwash_jobs.scheduler"):
        await scheduler.start()
        try:
            async with asyncio.timeout(5):
                await failed.wait()
                scheduler.reloaded.clear()
                await scheduler.reloaded.wait()
        finally:
            await scheduler.stop()
    assert any("scheduler duty prune failed" in r.getMessage() for r in caplog.records)


async def test_stop_cancels_the_duties_in_progress_and_waits_until_they_have_ended(
    harnesses: Harnesses, clock: ManualClock,
) -> None:
    """APScheduler's shutdown cancels a running duty without waiting for it: one still
    unwinding (here a step of cleanup, as a PostgreSQL statement's cancel is a round trip)
    went on after the stop, while the processor and the store were stopped under it."""
    h = await harnesses.make(clock=clock, start=False)
    scheduler = Scheduler(h.queue, clock=clock, reload_interval=timedelta(hours=1),
                          lease_check_interval=timedelta(hours=1))
    started, ended = asyncio.Event(), asyncio.Event()

    async def vacuum() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.sleep(0.05)
            ended.set()

    scheduler.add_duty("vacuum", vacuum, 0.01)
    await scheduler.start()
    async with asyncio.timeout(5):
        await started.wait()
        await scheduler.stop()
    assert ended.is_set()

"""Tests for carwash_jobs/processor.py: claim -> execute -> record, end to end on a real SQLite
file. Tests run the processor until idle; where a handler must be held inside its run, a Gate
holds it and the test awaits the gate's event, never a sleep."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import threading
import time
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import pytest
from pydantic import BaseModel

from carwash_jobs import lifecycle
from carwash_jobs.errors import IllegalTransition, JobNotFound, PermanentError, RetryLater
from carwash_jobs.lifecycle import AttemptOutcome, JobStatus
from carwash_jobs.metrics import Metrics
from carwash_jobs.registry import TaskDefaults, TaskHooks, TaskOptions, TaskType
from carwash_jobs.retry import RetryPolicy
from carwash_jobs.store import open_store
from carwash_jobs.store.base import MAX_JSON_DEPTH, DueJob, FailedFilter, JobFilter
from carwash_jobs.store.sqlite import SqliteJobStore
from carwash_jobs.types import MAX_DELAY_SECONDS, NUL_PROBLEM, SURROGATE_PROBLEM
from tests.carwash_jobs.support import (
    FAST_RETRY,
    OWNER,
    Calls,
    Gate,
    Item,
    ManualClock,
    noop,
    open_sqlite,
    outcomes,
    task_type,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from carwash_jobs.context import JobContext
    from carwash_jobs.middleware import CallNext
    from carwash_jobs.store.base import JobRow, Tx
    from carwash_jobs.types import JobId
    from tests.carwash_jobs.support import Harness, Harnesses

S = JobStatus
OTHER_OWNER = "other-host/2/0/b"


async def wait_for(event: asyncio.Event, seconds: float = 5.0) -> None:
    async with asyncio.timeout(seconds):
        await event.wait()


async def events_of(h: Harness, job_id: JobId) -> list[str]:
    return [e.event for e in await h.store.events(job_id)]


# -- the straight line ----------------------------------------------------------------------
async def test_an_enqueued_job_runs_to_completed_with_result_progress_and_timeline(
    harnesses: Harnesses,
) -> None:
    async def handle(ctx: JobContext, payload: Item) -> dict[str, Any]:
        await ctx.progress(1, 2)
        await ctx.progress(2, 2)
        return {"washed": payload.n}

    h = await harnesses.make(task_type("wash", handle))
    job = await h.enqueue("wash", {"n": 3})
    await h.run_until_idle()
    done = await h.get(job.id)
    assert done.status == S.completed
    assert done.result == {"washed": 3}
    assert (done.progress_done, done.progress_total) == (2, 2)
    assert done.started_at is not None
    assert done.finished_at is not None
    assert done.created_at <= done.started_at <= done.finished_at
    assert (done.attempts, done.error, done.lease_owner) == (1, None, None)
    assert outcomes(done) == ["completed"]
    assert await events_of(h, job.id) == ["enqueued", "claimed", "completed"]


async def test_the_last_progress_call_is_written_even_when_it_came_too_soon(
    harnesses: Harnesses,
) -> None:
    """Progress calls closer together than the interval are coalesced; the one held back
    is written as the attempt ends, whether it completes or fails."""

    async def handle(ctx: JobContext, payload: Item) -> None:
        await ctx.progress(1, 10)
        await ctx.progress(7, 10)
        if payload.n:
            raise ValueError("stopped at 7")

    h = await harnesses.make(task_type("counted", handle, max_attempts=1))
    done, failed = await h.queue.enqueue_many("counted", [{"n": 0}, {"n": 1}])
    await h.run_until_idle()

    for inserted, status in [(done, S.completed), (failed, S.failed)]:
        row = await h.get(inserted.job.id)
        assert (row.status, row.progress_done, row.progress_total) == (status, 7, 10)


async def test_a_result_nested_deeper_than_the_api_can_show_fails_its_job(
    harnesses: Harnesses,
) -> None:
    """Stored, it would make every page of the API that lists its job fail (pydantic's
    serializer stops at 255 levels); as deep as allowed, it is kept."""

    def nested(levels: int) -> list[Any]:
        value: list[Any] = []
        for _ in range(levels - 1):
            value = [value]
        return value

    async def handle(ctx: JobContext, payload: Item) -> Any:
        return nested(payload.n)

    h = await harnesses.make(task_type("deep", handle, max_attempts=3))
    deep, allowed = await h.queue.enqueue_many("deep", [{"n": 300}, {"n": MAX_JSON_DEPTH}])
    await h.run_until_idle()

    row = await h.get(deep.job.id)
    assert (row.status, row.attempts, row.result) == (S.failed, 1, None)
    assert row.error == f"the result nests deeper than {MAX_JSON_DEPTH} levels"
    row = await h.get(allowed.job.id)
    assert (row.status, row.result) == (S.completed, nested(MAX_JSON_DEPTH))


async def test_a_follow_up_with_a_priority_that_is_no_integer_fails_the_handler_not_the_reload(
    harnesses: Harnesses,
) -> None:
    """Written, the follow-up's text priority could not be ordered against the others, and
    every reload of the due jobs (and every start) failed on it: it is refused in the handler,
    whose attempt fails naming the option."""

    async def handler(ctx: JobContext, payload: Item) -> None:
        ctx.enqueue("noop", {}, priority="high")

    h = await harnesses.make(task_type("parent", handler, max_attempts=1))
    job = await h.enqueue("parent")
    await h.run_until_idle()

    row = await h.get(job.id)
    assert row.status == S.failed
    assert row.error is not None
    assert "priority" in row.error
    assert h.rows() == 1  # no follow-up
    assert await h.queue.reload() == 0


async def test_a_result_that_is_not_json_fails_its_own_job_and_no_other(
    harnesses: Harnesses,
) -> None:
    """Completions are written many at a time: one result the store cannot encode must not
    take its batch down with it (the others would run again once their leases ran out). NaN
    and the infinities are such results, also inside a model (a float field takes them)."""

    circular: list[Any] = []
    circular.append(circular)

    class Mean(BaseModel):
        mean: float

    async def handle(ctx: JobContext, payload: Item) -> Any:
        odd = {0: object(), 1: circular, 2: {"mean": float("nan")}, 3: Mean(mean=float("inf"))}
        return odd.get(payload.n, {"n": payload.n})

    h = await harnesses.make(task_type("odd", handle, max_attempts=3))
    jobs = await h.queue.enqueue_many("odd", [{"n": n} for n in range(6)])
    await h.run_until_idle()
    *bad, good_4, good_5 = [await h.get(j.job.id) for j in jobs]
    for row in bad:  # each would fail the same way again
        assert (row.status, row.attempts) == (S.failed, 1)
        assert row.error is not None
        assert "not JSON" in row.error
    assert [(g.status, g.result) for g in (good_4, good_5)] == [
        (S.completed, {"n": 4}), (S.completed, {"n": 5})
    ]


async def test_a_failing_handler_is_retried_with_growing_delays_then_failed_with_its_traceback(
    harnesses: Harnesses, clock: ManualClock
) -> None:
    calls: list[int] = []

    async def always_fails(ctx: JobContext, payload: Item) -> None:
        calls.append(ctx.attempt)
        raise ValueError(f"attempt {ctx.attempt} failed")

    # delays beyond the in-process timer horizon: only the reload brings the job back, when
    # the test has moved the clock
    policy = RetryPolicy(base_seconds=400, factor=2.0, max_seconds=100_000, jitter=0.1)
    h = await harnesses.make(task_type("flaky", always_fails, max_attempts=3, retry=policy),
                             clock=clock)
    job = await h.enqueue("flaky")
    gaps: list[float] = []
    for _ in range(10):
        await h.run_until_idle()
        row = await h.get(job.id)
        if row.status != S.scheduled:
            break
        assert h.queue.timers == 0
        gap = (row.run_at - clock()).total_seconds()
        gaps.append(gap)
        clock.advance(gap - 1)
        assert await h.scheduler.reload() == 0  # not due a second early
        clock.advance(1)
        assert await h.scheduler.reload() == 1
    assert calls == [1, 2, 3]
    assert 360 <= gaps[0] <= 440
    assert 720 <= gaps[1] <= 880
    assert gaps[1] > gaps[0]

    failed = await h.get(job.id)
    assert (failed.status, failed.attempts, failed.max_attempts) == (S.failed, 3, 3)
    assert failed.error == "ValueError: attempt 3 failed"
    assert failed.error_traceback is not None
    assert "Traceback" in failed.error_traceback
    assert "raise ValueError" in failed.error_traceback
    assert [(e["attempt"], e["outcome"]) for e in failed.attempt_history] == [
        (1, "error"), (2, "error"), (3, "error")
    ]
    # attempts never exceed max_attempts: nothing brings a failed job back by itself
    clock.advance(100_000)
    assert await h.scheduler.reload() == 0
    await h.run_until_idle()
    assert (await h.get(job.id)).attempts == 3
    assert calls == [1, 2, 3]


async def test_retries_on_in_process_timers_until_the_handler_succeeds(harnesses: Harnesses) -> None:
    async def third_time_lucky(ctx: JobContext, payload: Item) -> int:
        if ctx.attempt < 3:
            raise ConnectionError("POS database unreachable")
        return ctx.attempt

    h = await harnesses.make(task_type("pos", third_time_lucky, max_attempts=5))
    job = await h.enqueue("pos")
    await h.run_until_idle(include_timers=True)
    done = await h.get(job.id)
    assert (done.status, done.result, done.attempts) == (S.completed, 3, 3)
    assert outcomes(done) == ["error", "error", "completed"]
    assert done.error is None


async def test_a_delayed_job_is_scheduled_then_runs_when_due(harnesses: Harnesses) -> None:
    h = await harnesses.make()
    job = await h.enqueue(delay_seconds=0.2)
    assert job.status == S.scheduled
    assert (await h.get(job.id)).status == S.scheduled
    assert h.queue.timers == 1
    await h.run_until_idle(include_timers=True)
    done = await h.get(job.id)
    assert done.status == S.completed
    assert done.started_at is not None
    assert done.started_at >= job.run_at


async def test_a_delayed_dependent_freed_before_its_time_runs_on_the_timer_when_due(
    harnesses: Harnesses,
) -> None:
    gate = Gate()
    h = await harnesses.make(task_type("held", gate.handler))
    first = await h.enqueue("held")
    later = await h.enqueue(delay_seconds=0.3, depends_on=[first.id])
    assert later.status == S.waiting
    gate.release.set()
    await h.run_until_idle(include_timers=True)
    done = await h.get(later.id)
    assert done.status == S.completed
    assert done.started_at is not None
    assert done.started_at >= later.run_at
    assert await events_of(h, later.id) == [
        "enqueued", "dependencies_met", "claimed", "completed"]


# -- handoff: an enqueue to an idle processor writes its job claimed ---------------------------
async def test_an_enqueue_to_an_idle_processor_writes_the_job_claimed_and_starts_it(
    harnesses: Harnesses,
) -> None:
    h = await harnesses.make()

    job = await h.enqueue()

    assert (job.status, job.attempts, job.lease_owner) == (S.running, 1, OWNER)
    assert job.id in h.processor.running_ids  # no claim round trip: it started at once
    await h.run_until_idle()
    assert (await h.get(job.id)).status == S.completed
    assert await events_of(h, job.id) == ["enqueued", "claimed", "completed"]


async def test_with_no_free_slot_an_enqueue_is_queued_and_claimed_later(
    harnesses: Harnesses,
) -> None:
    gate = Gate()
    h = await harnesses.make(task_type("held", gate.handler), concurrency=1)
    first = await h.enqueue("held")
    await wait_for(gate.entered)

    second = await h.enqueue("held")

    assert (first.status, second.status) == (S.running, S.queued)
    gate.release.set()
    await h.run_until_idle()
    assert (await h.get(second.id)).status == S.completed
    assert await events_of(h, second.id) == ["enqueued", "claimed", "completed"]


async def test_jobs_ready_in_memory_go_first_so_an_enqueue_does_not_jump_them(
    harnesses: Harnesses,
) -> None:
    ran: list[str] = []

    async def record(ctx: JobContext, payload: Item) -> None:
        ran.append(payload.label)

    h = await harnesses.make(task_type("rec", record), concurrency=1, start=False)
    await h.enqueue("rec", {"label": "waiting"})
    await h.start()  # the dispatcher has not run yet: "waiting" is still ready in memory

    late = await h.enqueue("rec", {"label": "late"})

    assert late.status == S.queued  # not written claimed ahead of the ready job
    await h.run_until_idle()
    assert ran == ["waiting", "late"]


async def test_a_task_type_with_a_concurrency_limit_is_never_handed_off(
    harnesses: Harnesses,
) -> None:
    h = await harnesses.make(task_type("limited", noop, concurrency=1))

    job = await h.enqueue("limited")

    assert job.status == S.queued  # the claim statement checks the fleet-wide limit
    await h.run_until_idle()
    assert (await h.get(job.id)).status == S.completed


async def test_an_enqueue_that_finds_its_idempotency_key_taken_gives_its_slot_back(
    harnesses: Harnesses,
) -> None:
    h = await harnesses.make(concurrency=1)
    first = await h.enqueue(idempotency_key="wash-42")
    await h.run_until_idle()

    again = await h.enqueue(idempotency_key="wash-42")

    assert again.id == first.id
    assert h.processor._claiming == 0
    assert h.processor.is_idle()
    fresh = await h.enqueue()
    assert fresh.status == S.running  # the one slot is free again


async def test_a_failed_claimed_insert_gives_its_slot_back(harnesses: Harnesses) -> None:
    h = await harnesses.make(concurrency=1)

    async def refuse(tx: Tx) -> None:
        await tx.execute(
            "CREATE TEMP TRIGGER refuse BEFORE INSERT ON worker_queue "
            "BEGIN SELECT RAISE(ABORT, 'disk says no'); END"
        )

    await h.store.transaction(refuse)
    with pytest.raises(sqlite3.IntegrityError):
        await h.enqueue()

    assert h.processor._claiming == 0
    assert h.processor.is_idle()
    await h.store.transaction(lambda tx: tx.execute("DROP TRIGGER temp.refuse"))
    assert (await h.enqueue()).status == S.running


class HeldWriter:
    """A transaction that holds the SQLite store's writer: every write submitted while it
    holds waits behind it, and those waiting share the next group commit once it lets go."""

    def __init__(self, gate: Gate, blocker: asyncio.Task[None]) -> None:
        self._gate = gate
        self._blocker = blocker

    @classmethod
    async def hold(cls, h: Harness) -> HeldWriter:
        gate = Gate()

        async def hold(tx: Tx) -> None:
            await gate.hold()

        writer = cls(gate, asyncio.create_task(h.store.transaction(hold)))
        await wait_for(gate.entered)
        return writer

    async def let_go(self) -> None:
        self._gate.release.set()
        await self._blocker


async def test_a_claimed_insert_whose_caller_gave_up_still_runs_its_job(
    harnesses: Harnesses,
) -> None:
    """The enqueue is cancelled (a client's timeout) while its job, written claimed for this
    processor, waits for the writer. The write commits all the same; the job was left running
    with nobody to run it until its lease ran out, and then counted as a lost attempt (with
    max_attempts=1: failed, never run). Now it runs here."""
    ran: list[JobId] = []

    async def quick(ctx: JobContext, payload: Item) -> None:
        ran.append(ctx.job_id)

    h = await harnesses.make(task_type("quick", quick, max_attempts=1))
    writer = await HeldWriter.hold(h)  # every write from here on waits behind it
    enqueue = asyncio.create_task(h.enqueue("quick"))
    await _until(lambda: h.store.writer.queued >= 1)
    enqueue.cancel()
    with pytest.raises(asyncio.CancelledError):
        await enqueue
    await writer.let_go()
    await h.run_until_idle()

    (row,) = [await h.get(job_id) for job_id in ran]
    assert (row.status, row.attempts) == (S.completed, 1)
    assert h.rows() == 1
    assert h.processor._claiming == 0


async def test_a_job_stopped_before_its_task_took_a_step_gives_its_slot_back(
    harnesses: Harnesses,
) -> None:
    """A task cancelled before its first step never runs its body, nor the cleanup in it: the
    slot and the entry of a job stopped right after it started (its lease lost, say) were
    held for good."""
    ran: list[JobId] = []

    async def quick(ctx: JobContext, payload: Item) -> None:
        ran.append(ctx.job_id)

    h = await harnesses.make(task_type("quick", quick))
    job = await h.enqueue("quick")  # handed off: its task is made, and has not run yet
    assert h.processor.running_ids == [job.id]

    assert h.processor.cancel_local(job.id)
    await h.run_until_idle()

    assert ran == []
    assert h.processor.running_ids == []
    assert h.processor._held == 0


async def test_stop_waits_for_a_claimed_insert_in_flight_and_leaves_no_job_running(
    harnesses: Harnesses,
) -> None:
    """stop() begins while an enqueue is writing its job claimed for this processor: the job
    still starts when the write returns (stop waits for it), and ends before stop() returns."""
    ran = asyncio.Event()

    async def quick(ctx: JobContext, payload: Item) -> None:
        ran.set()

    h = await harnesses.make(task_type("quick", quick), shutdown_grace=timedelta(seconds=5))
    writer = await HeldWriter.hold(h)  # every write from here on waits behind it
    enqueue = asyncio.create_task(h.enqueue("quick"))
    await _until(lambda: h.store.writer.queued >= 1)  # the claimed insert waits for the writer
    stopping = asyncio.create_task(h.processor.stop())
    await asyncio.sleep(0)

    assert not stopping.done()  # it waits for the handoff in flight
    await writer.let_go()
    job = await enqueue
    await stopping
    h.started = False

    assert ran.is_set()
    assert (await h.get(job.id)).status == S.completed
    assert h.processor.running_ids == []


async def test_higher_priority_runs_first_and_fifo_within_a_priority(harnesses: Harnesses) -> None:
    ran: list[str] = []

    async def record(ctx: JobContext, payload: Item) -> None:
        ran.append(payload.label)

    h = await harnesses.make(task_type("rec", record), concurrency=1, start=False)
    for label, priority in [("a", 0), ("b", 5), ("c", 0), ("d", 5), ("e", 9), ("f", 0)]:
        await h.enqueue("rec", {"label": label}, priority=priority)
    await h.start()
    await h.run_until_idle()
    assert ran == ["e", "b", "d", "a", "c", "f"]


async def test_strict_priority_mode_serves_the_higher_ranked_queue_first(
    harnesses: Harnesses,
) -> None:
    ran: list[str] = []

    async def record(ctx: JobContext, payload: Item) -> None:
        ran.append(payload.label)

    h = await harnesses.make(task_type("rec", record), concurrency=1, start=False,
                             queue_mode="priority", weights={"critical": 10, "default": 1})
    await h.enqueue("rec", {"label": "bulk-1"}, queue="default", priority=9)
    await h.enqueue("rec", {"label": "urgent-1"}, queue="critical")
    await h.enqueue("rec", {"label": "urgent-2"}, queue="critical")
    await h.start()
    await h.run_until_idle()
    assert ran == ["urgent-1", "urgent-2", "bulk-1"]


# -- dependencies ---------------------------------------------------------------------------
async def test_a_fan_in_job_waits_until_both_dependencies_completed(harnesses: Harnesses) -> None:
    gate = Gate()
    ran: list[str] = []

    async def step(ctx: JobContext, payload: Item) -> None:
        if payload.label == "A":
            await gate.hold()
        ran.append(payload.label)

    h = await harnesses.make(task_type("step", step))
    a = await h.enqueue("step", {"label": "A"})
    b = await h.enqueue("step", {"label": "B"})
    c = await h.enqueue("step", {"label": "C"}, depends_on=[a.id, b.id])
    assert c.status == S.waiting
    await wait_for(gate.entered)
    assert (await h.get(c.id)).status == S.waiting
    gate.release.set()
    await h.run_until_idle()
    assert ran[-1] == "C"
    assert sorted(ran) == ["A", "B", "C"]
    rows = {row.id: row for row in await h.store.get_many([a.id, b.id, c.id])}
    c_started = rows[c.id].started_at
    assert c_started is not None
    for dep in (a.id, b.id):
        finished = rows[dep].finished_at
        assert finished is not None
        assert c_started >= finished
    assert rows[c.id].status == S.completed
    assert await events_of(h, c.id) == ["enqueued", "dependencies_met", "claimed", "completed"]


async def test_a_failed_dependency_cancels_the_waiting_jobs_in_cascade(harnesses: Harnesses) -> None:
    ran: list[str] = []

    async def step(ctx: JobContext, payload: Item) -> None:
        ran.append(payload.label)
        if payload.label == "A":
            raise PermanentError("customer file is corrupt")

    h = await harnesses.make(task_type("step", step))
    a = await h.enqueue("step", {"label": "A"})
    c = await h.enqueue("step", {"label": "C"}, depends_on=[a.id])
    d = await h.enqueue("step", {"label": "D"}, depends_on=[c.id])
    await h.run_until_idle()
    assert ran == ["A"]
    c_row, d_row = await h.get(c.id), await h.get(d.id)
    assert (c_row.status, c_row.error) == (S.cancelled, f"dependency {a.id} ended failed")
    assert (d_row.status, d_row.error) == (S.cancelled, f"dependency {c.id} ended cancelled")


# -- cancel ---------------------------------------------------------------------------------
async def test_cancelling_a_running_job_cancels_its_handler_and_records_the_attempt(
    harnesses: Harnesses,
) -> None:
    gate = Gate()
    seen: list[str] = []

    async def long_run(ctx: JobContext, payload: Item) -> str:
        try:
            await gate.hold()
        except asyncio.CancelledError:
            seen.append(f"cancelled; ctx.cancelled()={ctx.cancelled()}")
            raise
        return "finished"

    h = await harnesses.make(task_type("long", long_run))
    job = await h.enqueue("long")
    await wait_for(gate.entered)
    running = await h.get(job.id)
    cancelled = await h.queue.cancel(job.id)
    assert cancelled.status == S.cancelled
    await h.run_until_idle()
    assert seen == ["cancelled; ctx.cancelled()=True"]
    row = await h.get(job.id)
    assert (row.status, row.result, row.error) == (S.cancelled, None, "cancelled by request")
    assert [(e["attempt"], e["outcome"]) for e in row.attempt_history] == [(1, "cancelled")]
    # a late outcome of that attempt is refused
    with pytest.raises(IllegalTransition):
        await h.store.apply(lifecycle.complete(job.id, running.fence, "late", h.clock()))


async def test_a_handler_that_ignores_its_cancellation_cannot_complete_the_job(
    harnesses: Harnesses,
) -> None:
    gate = Gate()

    async def stubborn(ctx: JobContext, payload: Item) -> str:
        try:
            await gate.hold()
        except asyncio.CancelledError:
            return "done anyway"
        return "done"

    h = await harnesses.make(task_type("stubborn", stubborn))
    job = await h.enqueue("stubborn")
    await wait_for(gate.entered)
    await h.queue.cancel(job.id)
    await h.run_until_idle()
    row = await h.get(job.id)
    assert (row.status, row.result) == (S.cancelled, None)
    assert outcomes(row) == ["cancelled"]


async def test_cancelling_a_running_job_calls_on_cancelled_once_its_handler_stopped(
    harnesses: Harnesses,
) -> None:
    gate = Gate()
    calls = Calls()
    handler_stopped: list[bool] = []

    async def long_run(ctx: JobContext, payload: Item) -> str:
        try:
            await gate.hold()
        finally:
            handler_stopped.append(not calls.seen)  # the hook comes after the handler ended
        return "finished"

    h = await harnesses.make(task_type("long", long_run, hooks=calls.hooks()))
    job = await h.enqueue("long")
    await wait_for(gate.entered)
    await h.queue.cancel(job.id)
    await h.run_until_idle()
    assert calls.seen == [("on_cancelled", job.id, S.cancelled)]
    assert handler_stopped == [True]


async def test_a_handler_that_ignores_its_cancellation_still_gets_on_cancelled(
    harnesses: Harnesses,
) -> None:
    gate = Gate()
    calls = Calls()

    async def stubborn(ctx: JobContext, payload: Item) -> str:
        try:
            await gate.hold()
        except asyncio.CancelledError:
            return "done anyway"
        return "done"

    h = await harnesses.make(task_type("stubborn", stubborn, hooks=calls.hooks()))
    job = await h.enqueue("stubborn")
    await wait_for(gate.entered)
    await h.queue.cancel(job.id)
    await h.run_until_idle()
    assert calls.seen == [("on_cancelled", job.id, S.cancelled)]
    assert (await h.get(job.id)).status == S.cancelled


async def test_a_cancel_that_commits_before_a_finished_handlers_completion_calls_on_cancelled(
    harnesses: Harnesses,
) -> None:
    """The handler has returned and its completion waits for the writer when the cancel
    commits: the completion is refused, and the job ended cancelled, so on_cancelled runs."""
    gate = Gate()
    calls = Calls()

    async def quick(ctx: JobContext, payload: Item) -> str:
        await gate.hold()
        return "done"

    h = await harnesses.make(task_type("quick", quick, hooks=calls.hooks()))
    job = await h.enqueue("quick")
    await wait_for(gate.entered)
    writer = await HeldWriter.hold(h)  # every write from here on waits behind it
    cancel = asyncio.create_task(h.queue.cancel(job.id))
    await asyncio.sleep(0)  # the cancel's write is queued first...
    gate.release.set()  # ...then the handler returns and its completion queues behind it
    await _until(lambda: h.store.writer.queued >= 2)
    await writer.let_go()
    assert (await cancel).status == S.cancelled
    await h.run_until_idle()
    row = await h.get(job.id)
    assert (row.status, row.result) == (S.cancelled, None)
    assert calls.seen == [("on_cancelled", job.id, S.cancelled)]


async def test_a_cancel_in_the_commit_of_the_claim_that_won_the_job_stops_it_before_it_starts(
    harnesses: Harnesses,
) -> None:
    """The claim and the cancel share one group commit, the claim first: the cancel ends a
    running attempt, and returns before the processor has started the job it claimed. The
    handler must not run (it did, to its end, until the next heartbeat found the lease gone);
    on_cancelled runs here, once."""
    calls = Calls()
    started: list[JobId] = []

    async def handler(ctx: JobContext, payload: Item) -> None:
        started.append(ctx.job_id)

    h = await harnesses.make(task_type("wash", handler, hooks=calls.hooks()), start=False,
                             handoff=False)
    job = await h.enqueue("wash")
    writer = await HeldWriter.hold(h)  # every write from here on waits behind it
    await h.start()
    await _until(lambda: h.store.writer.queued >= 1)  # the claim...
    cancel = asyncio.create_task(h.queue.cancel(job.id))
    await _until(lambda: h.store.writer.queued >= 2)  # ...then the cancel, in one commit
    await writer.let_go()
    assert (await cancel).status == S.cancelled
    await h.run_until_idle()

    assert started == []
    row = await h.get(job.id)
    assert row.status == S.cancelled
    assert [entry["outcome"] for entry in row.attempt_history] == ["cancelled"]
    assert calls.seen == [("on_cancelled", job.id, S.cancelled)]


async def test_a_cancel_from_another_process_met_at_a_checkpoint_calls_on_cancelled(
    harnesses: Harnesses, db_url: str
) -> None:
    """Another process cancels the job and no notice has reached this one yet: the handler
    finds out when its checkpoint is refused. The job still ended cancelled while it ran here."""
    gate = Gate()
    calls = Calls()

    async def checkpointing(ctx: JobContext, payload: Item) -> str:
        await gate.hold()
        await ctx.save_checkpoint({"done": 1})  # refused: the job is cancelled
        return "unreachable"

    h = await harnesses.make(task_type("checkpointing", checkpointing, hooks=calls.hooks()))
    job = await h.enqueue("checkpointing")
    await wait_for(gate.entered)
    other = await open_sqlite(db_url, owner=OTHER_OWNER)
    try:
        await other.apply(lifecycle.cancel(job.id, h.clock()))
    finally:
        await other.close()
    gate.release.set()
    await h.run_until_idle()
    assert calls.seen == [("on_cancelled", job.id, S.cancelled)]


async def test_a_job_that_fails_calls_on_cancelled_of_the_dependents_its_end_cancelled(
    harnesses: Harnesses,
) -> None:
    calls = Calls()

    async def broken(ctx: JobContext, payload: Item) -> None:
        raise PermanentError("the customer file is corrupt")

    h = await harnesses.make(task_type("hooked", broken, hooks=calls.hooks()), start=False)
    first = await h.enqueue("hooked")
    second = await h.enqueue("hooked", depends_on=[first.id])
    third = await h.enqueue("hooked", depends_on=[second.id])
    await h.start()
    await h.run_until_idle()
    assert calls.seen == [("on_failed", first.id, S.failed),
                          ("on_cancelled", second.id, S.cancelled),
                          ("on_cancelled", third.id, S.cancelled)]


async def test_a_job_that_lost_its_lease_calls_no_hook(
    harnesses: Harnesses, clock: ManualClock
) -> None:
    gate = Gate()
    calls = Calls()

    async def slow(ctx: JobContext, payload: Item) -> None:
        await gate.hold()

    h = await harnesses.make(task_type("slow", slow, hooks=calls.hooks()), clock=clock)
    job = await h.enqueue("slow")
    await wait_for(gate.entered)
    await _take_over(h, job.id, clock)
    await h.processor.heartbeat()  # stops the old attempt: not a cancellation
    await h.run_until_idle()
    assert calls.seen == []


async def _until(condition: Callable[[], bool], turns: int = 1000) -> None:
    """Let the loop run until `condition` holds, for a state that sets no event (what is
    queued for the SQLite writer). In-process steps only: a bounded number of loop turns."""
    for _ in range(turns):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"still false after {turns} loop turns")


# -- retry-failed and rerun -----------------------------------------------------------------
async def test_retry_failed_runs_a_failed_job_again_with_fresh_attempts(harnesses: Harnesses) -> None:
    attempts_seen: list[int] = []

    async def fails_once(ctx: JobContext, payload: Item) -> str:
        attempts_seen.append(ctx.attempt)
        if len(attempts_seen) == 1:
            raise RuntimeError("SMTP refused")
        return "sent"

    h = await harnesses.make(task_type("mail", fails_once, max_attempts=1))
    job = await h.enqueue("mail")
    await h.run_until_idle()
    assert (await h.get(job.id)).status == S.failed
    assert await h.queue.retry_failed(FailedFilter(task_type="mail")) == [job.id]
    await h.run_until_idle()
    row = await h.get(job.id)
    assert (row.status, row.result, row.attempts) == (S.completed, "sent", 1)
    assert attempts_seen == [1, 1]
    assert outcomes(row) == ["error", "completed"]


async def test_rerun_of_a_completed_job_runs_a_new_job(harnesses: Harnesses) -> None:
    h = await harnesses.make()
    job = await h.enqueue("noop", {"label": "report"})
    await h.run_until_idle()
    rerun = await h.queue.rerun(job.id)
    await h.run_until_idle()
    row = await h.get(rerun.id)
    assert (row.status, row.rerun_of) == (S.completed, job.id)
    assert row.result == {"label": "report", "n": 0, "attempt": 1}


# -- outcomes: timeout, RetryLater, PermanentError ------------------------------------------
async def test_a_handler_past_its_timeout_is_stopped_recorded_as_timeout_and_retried(
    harnesses: Harnesses,
) -> None:
    started: list[int] = []

    async def hangs(ctx: JobContext, payload: Item) -> None:
        started.append(ctx.attempt)
        await asyncio.Event().wait()

    h = await harnesses.make(task_type("hang", hangs, max_attempts=2,
                                       timeout=timedelta(milliseconds=30)))
    job = await h.enqueue("hang")
    await h.run_until_idle(include_timers=True)
    row = await h.get(job.id)
    assert started == [1, 2]
    assert (row.status, row.attempts) == (S.failed, 2)
    assert outcomes(row) == ["timeout", "timeout"]
    assert (row.error or "").startswith("timed out after")


async def test_a_task_type_without_its_own_timeout_and_attempts_takes_the_settings_ones(
    harnesses: Harnesses,
) -> None:
    """default_timeout_seconds and default_max_attempts, through the registry's defaults."""

    async def hangs(ctx: JobContext, payload: Item) -> None:
        await asyncio.Event().wait()

    h = await harnesses.make(
        TaskType("hang", Item, hangs, TaskOptions(retry=FAST_RETRY)),
        defaults=TaskDefaults(max_attempts=2, timeout=timedelta(milliseconds=30)),
    )
    job = await h.enqueue("hang")
    await h.run_until_idle(include_timers=True)
    row = await h.get(job.id)
    assert (row.status, row.attempts, row.max_attempts) == (S.failed, 2, 2)
    assert outcomes(row) == ["timeout", "timeout"]


@pytest.mark.parametrize("limit", [timedelta(minutes=5), None], ids=["timed", "untimed"])
async def test_a_timeout_error_raised_by_the_handler_itself_is_an_error_not_a_timeout(
    harnesses: Harnesses, limit: timedelta | None
) -> None:
    """With a timeout or none (a task type without one runs with no timeout scope at all)."""

    async def smtp_silent(ctx: JobContext, payload: Item) -> None:
        raise TimeoutError("SMTP server did not answer")

    h = await harnesses.make(task_type("smtp", smtp_silent, max_attempts=1, timeout=limit))
    job = await h.enqueue("smtp")
    await h.run_until_idle()
    row = await h.get(job.id)
    assert (row.status, outcomes(row)) == (S.failed, ["error"])
    assert row.error == "TimeoutError: SMTP server did not answer"
    assert "smtp_silent" in (row.error_traceback or "")


async def test_retry_later_sets_the_next_run_at_and_counts_the_attempt(
    harnesses: Harnesses, clock: ManualClock
) -> None:
    async def rate_limited(ctx: JobContext, payload: Item) -> str:
        if ctx.attempt == 1:
            raise RetryLater(1000, "SMTP rate limit")
        return "sent"

    h = await harnesses.make(task_type("mail", rate_limited, max_attempts=3), clock=clock)
    job = await h.enqueue("mail")
    await h.run_until_idle()
    row = await h.get(job.id)
    assert (row.status, row.attempts) == (S.scheduled, 1)
    assert row.run_at == clock() + timedelta(seconds=1000)
    assert row.error == "SMTP rate limit"
    clock.advance(1000)
    await h.scheduler.reload()
    await h.run_until_idle()
    row = await h.get(job.id)
    assert (row.status, row.attempts, row.result) == (S.completed, 2, "sent")
    assert outcomes(row) == ["error", "completed"]


async def test_retry_later_without_counting_never_uses_up_the_attempts(
    harnesses: Harnesses, clock: ManualClock
) -> None:
    seen: list[int] = []

    async def throttled(ctx: JobContext, payload: Item) -> str:
        seen.append(ctx.attempt)
        if len(seen) <= 3:
            raise RetryLater(1000, "quota", count_attempt=False)
        return "ok"

    h = await harnesses.make(task_type("quota", throttled, max_attempts=1), clock=clock)
    job = await h.enqueue("quota")
    for _ in range(3):
        await h.run_until_idle()
        row = await h.get(job.id)
        assert (row.status, row.attempts) == (S.scheduled, 0)
        clock.advance(1000)
        await h.scheduler.reload()
    await h.run_until_idle()
    row = await h.get(job.id)
    assert (row.status, row.attempts) == (S.completed, 1)
    assert seen == [1, 1, 1, 1]
    assert outcomes(row) == ["throttled", "throttled", "throttled", "completed"]


async def test_retry_later_on_the_last_attempt_fails_the_job(harnesses: Harnesses) -> None:
    async def later(ctx: JobContext, payload: Item) -> None:
        raise RetryLater(0.01, "still busy")

    h = await harnesses.make(task_type("later", later, max_attempts=2))
    job = await h.enqueue("later")
    await h.run_until_idle(include_timers=True)
    row = await h.get(job.id)
    assert (row.status, row.attempts, row.error) == (S.failed, 2, "still busy")


async def test_retry_later_without_a_reason_is_recorded_and_retried(
    harnesses: Harnesses,
) -> None:
    async def later(ctx: JobContext, payload: Item) -> None:
        if ctx.attempt == 1:
            raise RetryLater(0, None)  # type: ignore[arg-type]

    h = await harnesses.make(task_type("later", later))
    job = await h.enqueue("later")
    await h.run_until_idle(include_timers=True)
    row = await h.get(job.id)
    assert (row.status, row.attempts) == (S.completed, 2)
    assert row.attempt_history[0]["error"] == "retry requested"


@pytest.mark.parametrize("delay", [1e12, float("inf"), float("nan"), -1, "60"])
async def test_retry_later_with_a_delay_out_of_range_is_the_handlers_error(
    harnesses: Harnesses, delay: Any
) -> None:
    """Such a delay once failed only in the record (datetime overflow), which left the job
    running without a record until its lease ran out."""
    async def later(ctx: JobContext, payload: Item) -> None:
        raise RetryLater(delay, "the server said so")

    h = await harnesses.make(task_type("later", later, max_attempts=1))
    job = await h.enqueue("later")
    await h.run_until_idle(include_timers=True)
    row = await h.get(job.id)
    assert (row.status, row.lease_owner) == (S.failed, None)
    assert (row.error or "").startswith("ValueError: RetryLater: delay_seconds must be a number")
    assert outcomes(row) == ["error"]


async def test_retry_later_takes_every_delay_an_enqueue_takes() -> None:
    assert RetryLater(0).delay_seconds == 0
    assert RetryLater(MAX_DELAY_SECONDS).delay_seconds == MAX_DELAY_SECONDS


async def test_a_handler_awaiting_a_cancelled_task_fails_its_attempt_with_that_error(
    harnesses: Harnesses,
) -> None:
    """The CancelledError is the handler's (its own task was not cancelled): recorded as its
    error and retried by policy. It once ended the attempt without a record, and the job stayed
    running until its lease ran out, then failed as a lost worker."""
    async def awaits_a_cancelled_task(ctx: JobContext, payload: Item) -> None:
        inner = asyncio.ensure_future(asyncio.sleep(10))
        inner.cancel()
        await inner

    h = await harnesses.make(task_type("inner", awaits_a_cancelled_task, max_attempts=2))
    job = await h.enqueue("inner")
    await h.run_until_idle(include_timers=True)
    row = await h.get(job.id)
    assert (row.status, row.attempts, row.lease_owner) == (S.failed, 2, None)
    assert row.error == "CancelledError"
    assert "CancelledError" in (row.error_traceback or "")
    assert outcomes(row) == ["error", "error"]
    assert h.processor.running_ids == []


async def test_a_permanent_error_fails_the_job_at_once_keeping_error_and_traceback(
    harnesses: Harnesses,
) -> None:
    async def bad_input(ctx: JobContext, payload: Item) -> None:
        raise PermanentError("recipient list is empty")

    h = await harnesses.make(task_type("bad", bad_input, max_attempts=5))
    job = await h.enqueue("bad")
    await h.run_until_idle(include_timers=True)
    row = await h.get(job.id)
    assert (row.status, row.attempts) == (S.failed, 1)
    assert row.error == "PermanentError: recipient list is empty"
    assert "PermanentError" in (row.error_traceback or "")
    assert outcomes(row) == ["error"]


async def test_an_error_a_store_cannot_keep_is_recorded_escaped_on_each_store(
    database_url: str, harnesses: Harnesses,
) -> None:
    """An error message holding U+0000 (PostgreSQL's text has none) or a lone surrogate (UTF-8
    has none): its record failed, and the job stayed running until its lease ran out, at
    every attempt, the error never told. Written escaped, it fails and retries as any error."""

    async def raises(ctx: JobContext, payload: Item) -> None:
        raise ValueError("bad\x00byte" if payload.n == 0 else "lone \ud800")

    store = open_store(database_url, owner=OWNER)
    await store.open()
    h = await harnesses.make(task_type("raises", raises, max_attempts=2), store=store)  # type: ignore[arg-type]
    nul, surrogate = await h.queue.enqueue_many("raises", [{"n": 0}, {"n": 1}])
    await h.run_until_idle(include_timers=True)

    for inserted, error in [(nul, "ValueError: bad\\x00byte"), (surrogate, "ValueError: lone \\ud800")]:
        row = await h.get(inserted.job.id)
        assert (row.status, row.attempts, row.error) == (S.failed, 2, error)
        assert [entry["error"] for entry in row.attempt_history] == [error, error]
        assert "ValueError" in (row.error_traceback or "")
        assert await events_of(h, row.id) == [
            "enqueued", "claimed", "attempt_failed", "claimed", "failed",
        ]


# -- leases ---------------------------------------------------------------------------------
async def _take_over(h: Harness, job_id: JobId, clock: ManualClock) -> JobRow:
    """Another process finds the lease of `job_id` expired, re-queues it and claims it."""
    clock.advance(61)
    (expired,) = await h.store.expired_leases(clock(), 10)
    await h.store.apply(lifecycle.release_expired_lease(
        expired.id, expired.fence, expired.attempts, expired.max_attempts, clock()))
    (row,) = await h.store.claim([job_id], OTHER_OWNER, clock() + timedelta(seconds=60))
    return row


async def test_a_worker_that_lost_its_lease_cannot_record_over_the_newer_attempt(
    harnesses: Harnesses, clock: ManualClock
) -> None:
    gate = Gate()

    async def slow(ctx: JobContext, payload: Item) -> str:
        await gate.hold()
        return f"from attempt {ctx.attempt}"

    h = await harnesses.make(task_type("slow", slow), clock=clock)
    job = await h.enqueue("slow")
    await wait_for(gate.entered)
    newer = await _take_over(h, job.id, clock)
    gate.release.set()  # the old attempt finishes and tries to record its outcome
    await h.run_until_idle()
    row = await h.get(job.id)
    assert row == newer  # untouched: still running attempt 2 of the other worker
    assert outcomes(row) == ["worker_lost"]
    done = await h.store.apply(lifecycle.complete(job.id, newer.fence, "from attempt 2", clock()))
    assert done.job.result == "from attempt 2"


async def test_heartbeat_extends_the_leases_of_running_jobs(
    harnesses: Harnesses, clock: ManualClock
) -> None:
    gate = Gate()

    async def slow(ctx: JobContext, payload: Item) -> None:
        await gate.hold()

    h = await harnesses.make(task_type("slow", slow), clock=clock)
    job = await h.enqueue("slow")
    await wait_for(gate.entered)
    assert (await h.get(job.id)).lease_until == clock() + timedelta(seconds=60)
    clock.advance(45)
    await h.processor.heartbeat()
    assert (await h.get(job.id)).lease_until == clock() + timedelta(seconds=60)
    clock.advance(45)  # past the first lease: still held thanks to the heartbeat
    assert await h.store.expired_leases(clock(), 10) == []
    gate.release.set()
    await h.run_until_idle()
    assert (await h.get(job.id)).status == S.completed


async def test_a_heartbeat_that_finds_its_lease_gone_stops_the_handler(
    harnesses: Harnesses, clock: ManualClock
) -> None:
    gate = Gate()
    h = await harnesses.make(task_type("slow", gate.handler), clock=clock)
    job = await h.enqueue("slow")
    await wait_for(gate.entered)
    newer = await _take_over(h, job.id, clock)
    await h.processor.heartbeat()
    await wait_for(gate.stopped)
    await h.run_until_idle()
    assert h.processor.running_ids == []
    assert await h.get(job.id) == newer


async def test_a_lease_expired_and_reclaimed_by_the_same_process_stops_the_old_attempt(
    harnesses: Harnesses, clock: ManualClock
) -> None:
    gates = {1: Gate(), 2: Gate()}
    stopped: list[int] = []

    async def slow(ctx: JobContext, payload: Item) -> str:
        try:
            await gates[ctx.attempt].hold()
        except asyncio.CancelledError:
            stopped.append(ctx.attempt)
            raise
        return f"attempt {ctx.attempt}"

    h = await harnesses.make(task_type("slow", slow), clock=clock)
    job = await h.enqueue("slow")
    await wait_for(gates[1].entered)
    clock.advance(61)  # the loop was held too long: the heartbeat could not renew the lease
    assert await h.scheduler.release_expired_leases() == 1
    await wait_for(gates[2].entered)  # this process claimed it again: attempt 2
    assert stopped == [1]  # the old attempt lost the job and was stopped
    assert h.processor.running_ids == [job.id]
    gates[2].release.set()
    await h.run_until_idle()
    row = await h.get(job.id)
    assert (row.status, row.result) == (S.completed, "attempt 2")
    assert outcomes(row) == ["worker_lost", "completed"]


class HeartbeatFailingStore(SqliteJobStore):
    """The one test double of this suite: a real SqliteJobStore whose lease-extending write
    fails while `broken` is set, and neither ends nor fails while `silent` is (a connection
    whose server vanished without a word). No real database fault can make only the
    heartbeat's write fail simply (closing the connection would fail the claims and outcomes
    too)."""

    broken = False
    silent = False

    async def extend_leases(
        self, owner: str, ids: Sequence[JobId], lease_until: Any
    ) -> set[JobId]:
        if self.broken:
            raise sqlite3.OperationalError("disk I/O error")
        if self.silent:
            await asyncio.Event().wait()
        return await super().extend_leases(owner, ids, lease_until)


async def test_while_heartbeat_writes_fail_the_processor_claims_nothing_new(
    harnesses: Harnesses, db_url: str
) -> None:
    gate = Gate()

    async def slow(ctx: JobContext, payload: Item) -> None:
        await gate.hold()

    store = HeartbeatFailingStore(db_url, owner=OWNER)
    await store.open()
    # the lease (60 s) outlasts the next heartbeat: the running job goes on
    h = await harnesses.make(task_type("slow", slow), store=store,
                             heartbeat_interval=timedelta(seconds=15))
    first = await h.enqueue("slow")
    await wait_for(gate.entered)
    store.broken = True
    await h.processor.heartbeat()
    second = await h.enqueue("noop")
    # nothing may happen now: give the processor a bounded chance to (wrongly) claim
    with pytest.raises(TimeoutError):
        await h.run_until_idle(within=0.3)
    assert (await h.get(second.id)).status == S.queued
    store.broken = False
    await h.processor.heartbeat()
    gate.release.set()
    await h.run_until_idle()
    assert (await h.get(second.id)).status == S.completed
    assert (await h.get(first.id)).status == S.completed


async def test_while_heartbeats_fail_a_job_is_stopped_before_its_lease_runs_out(
    harnesses: Harnesses, db_url: str, clock: ManualClock
) -> None:
    """A worker cut off from the database: its heartbeats fail, and once a job's lease runs out,
    another process may claim the job. The attempt is stopped at the first failed heartbeat
    whose next-but-one would come too late (a lost lease: nothing recorded, nothing written);
    the job runs again once the lease has run out, so two attempts do not run at once."""
    gate = Gate()

    async def slow(ctx: JobContext, payload: Item) -> str:
        if ctx.attempt == 1:
            await gate.hold()
        return f"attempt {ctx.attempt}"

    store = HeartbeatFailingStore(db_url, owner=OWNER, clock=clock)
    await store.open()
    h = await harnesses.make(task_type("slow", slow), store=store, clock=clock,
                             heartbeat_interval=timedelta(seconds=15))
    job = await h.enqueue("slow")
    await wait_for(gate.entered)
    clock.advance(30)
    await h.processor.heartbeat()  # extends the lease to 90 s from the claim
    store.broken = True
    clock.advance(25)  # 55 s: the lease runs out in 35 s, after the heartbeat after next
    await h.processor.heartbeat()
    await asyncio.sleep(0.05)  # a cancel, had there been one, would have reached the handler
    assert not gate.stopped.is_set()
    assert h.processor.running_ids == [job.id]
    clock.advance(5)  # 60 s: it runs out within two intervals
    await h.processor.heartbeat()
    await wait_for(gate.stopped)
    await h.run_until_idle()
    assert h.processor.running_ids == []
    row = await h.get(job.id)
    assert (row.status, row.attempts, row.lease_until) == (S.running, 1, clock() + timedelta(seconds=30))

    store.broken = False
    await h.processor.heartbeat()  # the database is back: claims again
    clock.advance(31)  # past the lease: any process's lease check takes the job back
    assert await h.scheduler.release_expired_leases() == 1
    await h.run_until_idle()
    row = await h.get(job.id)
    assert (row.status, row.result) == (S.completed, "attempt 2")
    assert outcomes(row) == ["worker_lost", "completed"]


async def test_a_heartbeat_write_that_never_answers_counts_as_failed_after_half_an_interval(
    harnesses: Harnesses, db_url: str, clock: ManualClock
) -> None:
    """Its server gone without a word, the write neither ends nor fails: the heartbeat gives
    it up after half an interval, claims nothing new and stops the jobs whose leases run out."""
    gate = Gate()
    store = HeartbeatFailingStore(db_url, owner=OWNER, clock=clock)
    await store.open()
    h = await harnesses.make(task_type("slow", gate.handler), store=store, clock=clock,
                             heartbeat_interval=timedelta(seconds=0.2))
    job = await h.enqueue("slow")
    await wait_for(gate.entered)
    store.silent = True
    started = time.monotonic()
    await asyncio.wait_for(h.processor.heartbeat(), 5)
    assert 0.1 <= time.monotonic() - started < 2
    assert not gate.stopped.is_set()  # the lease has 60 s to run
    second = await h.enqueue("noop")
    clock.advance(59.7)  # the lease runs out within two intervals
    await asyncio.wait_for(h.processor.heartbeat(), 5)
    await wait_for(gate.stopped)
    assert (await h.get(second.id)).status == S.queued  # claims wait for a heartbeat to succeed
    assert (await h.get(job.id)).status == S.running  # nothing could be recorded: its lease decides


async def test_a_heartbeat_while_a_finished_job_runs_its_hook_does_not_stop_it(
    harnesses: Harnesses, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    gate = Gate()
    hooked: list[JobId] = []

    async def on_completed(job: JobRow) -> None:
        await gate.hold()
        hooked.append(job.id)

    async def quick(ctx: JobContext, payload: Item) -> str:
        return "done"

    h = await harnesses.make(
        task_type("quick", quick, hooks=TaskHooks(on_completed=on_completed)), clock=clock
    )
    job = await h.enqueue("quick")
    await wait_for(gate.entered)  # the completion is committed; the job is still here
    with caplog.at_level(logging.INFO, logger="carwash_jobs.processor"):
        await h.processor.heartbeat()
        gate.release.set()
        await h.run_until_idle()
    assert hooked == [job.id]
    assert "lease lost" not in caplog.text
    assert (await h.get(job.id)).status == S.completed


async def test_a_heartbeat_racing_a_completion_commit_neither_stops_the_job_nor_skips_its_record(
    harnesses: Harnesses, caplog: pytest.LogCaptureFixture
) -> None:
    """The heartbeat reads the running jobs, then the completion commits ahead of its lease
    write: that write finds the job no longer running, though nothing was lost."""
    gate = Gate()
    calls = Calls()
    metrics = Metrics()

    async def quick(ctx: JobContext, payload: Item) -> str:
        await gate.hold()
        return "done"

    h = await harnesses.make(task_type("quick", quick, hooks=calls.hooks()), metrics=metrics)
    job = await h.enqueue("quick")
    await wait_for(gate.entered)
    writer = await HeldWriter.hold(h)  # every write from here on waits behind it
    gate.release.set()
    await _until(lambda: h.store.writer.queued == 1)  # the completion waits for the writer
    heartbeat = asyncio.create_task(h.processor.heartbeat())  # reads the job as running...
    await _until(lambda: h.store.writer.queued == 2)  # ...and its lease write queues behind
    with caplog.at_level(logging.INFO, logger="carwash_jobs.processor"):
        await writer.let_go()
        await heartbeat
        await h.run_until_idle()
    assert (await h.get(job.id)).status == S.completed
    assert calls.seen == [("on_completed", job.id, S.completed)]
    assert metrics.registry.get_sample_value(
        "carwash_jobs_completed_total", {"task_type": "quick"}) == 1
    assert "lease lost" not in caplog.text


# -- graceful stop --------------------------------------------------------------------------
async def test_stop_gives_unfinished_jobs_back_without_counting_the_attempt(
    harnesses: Harnesses,
) -> None:
    gate = Gate()
    stopped = asyncio.Event()

    async def slow(ctx: JobContext, payload: Item) -> None:
        try:
            await gate.hold()
        except asyncio.CancelledError:
            stopped.set()
            raise

    h = await harnesses.make(task_type("slow", slow), shutdown_grace=timedelta(seconds=0.05))
    job = await h.enqueue("slow")
    await wait_for(gate.entered)
    await h.processor.stop()
    h.started = False
    assert stopped.is_set()
    row = await h.get(job.id)
    assert (row.status, row.attempts, row.lease_owner) == (S.queued, 0, None)
    assert outcomes(row) == ["released"]
    assert (await h.store.events(job.id))[-1].event == "released"

    later = await harnesses.make(task_type("slow", slow), owner="next-process/1/0/z")
    gate.release.set()
    await later.scheduler.reload()
    await later.run_until_idle()
    row = await later.get(job.id)
    assert (row.status, row.attempts) == (S.completed, 1)
    assert outcomes(row) == ["released", "completed"]


async def test_stop_lets_a_job_that_finishes_within_the_grace_complete(harnesses: Harnesses) -> None:
    gate = Gate()

    async def quick(ctx: JobContext, payload: Item) -> str:
        await gate.hold()
        return "made it"

    h = await harnesses.make(task_type("quick", quick), shutdown_grace=timedelta(seconds=5))
    job = await h.enqueue("quick")
    await wait_for(gate.entered)
    stopping = asyncio.create_task(h.processor.stop())
    await asyncio.sleep(0)
    gate.release.set()
    await stopping
    h.started = False
    row = await h.get(job.id)
    assert (row.status, row.result) == (S.completed, "made it")


async def test_stop_past_its_grace_lets_a_job_whose_handler_returned_write_its_outcome(
    database_url: str, harnesses: Harnesses,
) -> None:
    """Only the handlers still running are given back. A job that was writing its outcome was
    cut off too: on PostgreSQL its completion rolled back with its on_complete writes, and it
    ran again once its lease ran out; on SQLite it was written, its on_completed hook never
    called."""
    record_gate, handler_gate = Gate(), Gate()
    handler_stopped = asyncio.Event()
    hooked: list[JobId] = []

    async def final_write(tx: Tx) -> None:
        await record_gate.hold()

    async def returns(ctx: JobContext, payload: Item) -> str:
        ctx.on_complete(final_write)
        return "written"

    async def runs_on(ctx: JobContext, payload: Item) -> None:
        try:
            await handler_gate.hold()
        except asyncio.CancelledError:
            handler_stopped.set()
            raise

    async def on_completed(job: JobRow) -> None:
        hooked.append(job.id)

    store = open_store(database_url, owner=OWNER)
    await store.open()
    h = await harnesses.make(
        task_type("returns", returns, hooks=TaskHooks(on_completed=on_completed)),
        task_type("runs_on", runs_on), shutdown_grace=timedelta(seconds=0.5),
        store=store,  # type: ignore[arg-type]
    )
    still_running = await h.enqueue("runs_on")
    await wait_for(handler_gate.entered)
    writing = await h.enqueue("returns")
    await wait_for(record_gate.entered)

    stopping = asyncio.create_task(h.processor.stop())
    await wait_for(handler_stopped)  # the grace has passed: stop gives back what still runs
    record_gate.release.set()
    await stopping
    h.started = False

    row = await h.get(writing.id)
    assert (row.status, row.result, outcomes(row)) == (S.completed, "written", ["completed"])
    assert hooked == [writing.id]
    row = await h.get(still_running.id)
    assert (row.status, outcomes(row)) == (S.queued, ["released"])


# -- follow-ups, final writes, checkpoints --------------------------------------------------
async def test_follow_ups_are_inserted_when_the_job_completes_and_then_run(
    harnesses: Harnesses,
) -> None:
    made: list[JobId] = []

    async def parent(ctx: JobContext, payload: Item) -> None:
        made.append(ctx.enqueue("noop", {"label": "child"}))

    h = await harnesses.make(task_type("parent", parent))
    await h.enqueue("parent")
    await h.run_until_idle()
    (child_id,) = made
    child = await h.get(child_id)
    assert (child.status, child.result["label"]) == (S.completed, "child")


async def test_a_follow_up_with_text_a_store_cannot_keep_fails_the_handler_naming_the_field(
    database_url: str, harnesses: Harnesses,
) -> None:
    """On PostgreSQL a tag holding U+0000 failed the parent's completion with the driver's
    error (and SQLite kept it); a lone surrogate failed both. Now refused where it is enqueued,
    alike on both stores."""

    async def parent(ctx: JobContext, payload: Item) -> None:
        ctx.enqueue("noop", {}, tags=["bay\x00" if payload.n == 0 else "bay\ud800"])

    store = open_store(database_url, owner=OWNER)
    await store.open()
    h = await harnesses.make(task_type("parent", parent, max_attempts=1), store=store)  # type: ignore[arg-type]
    nul, surrogate = await h.queue.enqueue_many("parent", [{"n": 0}, {"n": 1}])
    await h.run_until_idle()

    assert (await h.get(nul.job.id)).error == f"InvalidPayload: tags: {NUL_PROBLEM}"
    assert (await h.get(surrogate.job.id)).error == f"InvalidPayload: tags: {SURROGATE_PROBLEM}"
    page = await h.store.list_jobs(JobFilter(task_type="noop"), limit=10)
    assert page.items == []


async def test_follow_ups_of_a_failing_job_never_exist(harnesses: Harnesses) -> None:
    made: list[JobId] = []

    async def parent(ctx: JobContext, payload: Item) -> None:
        made.append(ctx.enqueue("noop", {"label": "child"}))
        raise PermanentError("nope")

    h = await harnesses.make(task_type("parent", parent))
    await h.enqueue("parent")
    await h.run_until_idle()
    assert len(made) == 1
    with pytest.raises(JobNotFound):
        await h.get(made[0])
    assert h.rows() == 1


async def _make_ledger(h: Harness) -> None:
    async def create(tx: Tx) -> None:
        await tx.execute("CREATE TABLE ledger (job_id TEXT PRIMARY KEY, credits INTEGER)")

    await h.store.transaction(create)


async def test_on_complete_writes_commit_with_the_completion(harnesses: Harnesses) -> None:
    async def grant(ctx: JobContext, payload: Item) -> str:
        async def write(tx: Tx) -> None:
            await tx.execute("INSERT INTO ledger VALUES (:id, :n)", {"id": ctx.job_id, "n": payload.n})

        ctx.on_complete(write)
        return "granted"

    h = await harnesses.make(task_type("grant", grant))
    await _make_ledger(h)
    job = await h.enqueue("grant", {"n": 25})
    await h.run_until_idle()
    assert (await h.get(job.id)).status == S.completed
    assert h.rows("ledger") == 1


async def test_on_complete_writes_roll_back_when_the_job_was_cancelled_meanwhile(
    harnesses: Harnesses,
) -> None:
    gate = Gate()

    async def grant(ctx: JobContext, payload: Item) -> str:
        async def write(tx: Tx) -> None:
            await tx.execute("INSERT INTO ledger VALUES (:id, :n)", {"id": ctx.job_id, "n": payload.n})

        ctx.on_complete(write)
        await gate.hold()
        return "granted"

    h = await harnesses.make(task_type("grant", grant))
    await _make_ledger(h)
    job = await h.enqueue("grant", {"n": 25})
    await wait_for(gate.entered)
    # cancelled by another process: this one is not told, its handler runs on
    await h.store.apply(lifecycle.cancel(job.id, h.clock()))
    gate.release.set()
    await h.run_until_idle()
    row = await h.get(job.id)
    assert (row.status, row.result) == (S.cancelled, None)
    assert h.rows("ledger") == 0


async def test_two_jobs_completing_with_follow_ups_on_each_other_both_complete_once(
    postgres_database_url: str, harnesses: Harnesses,
) -> None:
    """PostgreSQL: each completion locks its own row, then share-locks the other's for its
    follow-up's dependency, and the server breaks the deadlock by failing one. That job's
    attempt failed (and its handler ran again); the store now runs the transaction again.
    SQLite runs its one writer's transactions one at a time: no such cycle there."""
    ids: dict[int, JobId] = {}
    locked = {0: asyncio.Event(), 1: asyncio.Event()}
    runs: list[int] = []

    async def pair(ctx: JobContext, payload: Item) -> None:
        runs.append(payload.n)
        me, other = payload.n, 1 - payload.n

        async def lock_mine_then_wait_for_the_other(tx: Tx) -> None:
            await tx.execute("SELECT id FROM worker_queue WHERE id = :id FOR UPDATE",
                             {"id": ids[me]})
            locked[me].set()
            await locked[other].wait()

        ctx.on_complete(lock_mine_then_wait_for_the_other)
        ctx.enqueue("noop", {}, depends_on=[ids[other]])

    store = open_store(postgres_database_url, owner=OWNER)
    await store.open()
    h = await harnesses.make(task_type("pair", pair, max_attempts=3), store=store,  # type: ignore[arg-type]
                             start=False)
    first, second = await h.queue.enqueue_many("pair", [{"n": 0}, {"n": 1}])
    ids.update({0: first.job.id, 1: second.job.id})
    await h.start()
    await h.run_until_idle(20, include_timers=True)

    for inserted in (first, second):
        row = await h.get(inserted.job.id)
        assert (row.status, outcomes(row)) == (S.completed, ["completed"])
    assert sorted(runs) == [0, 1]


async def test_an_on_complete_write_or_follow_up_that_fails_fails_the_attempt_with_its_error(
    harnesses: Harnesses,
) -> None:
    """The completion fails with them. Left running with its lease, the job waited for the
    lease to run out and was recorded as a lost worker, its error only in the log; now the
    attempt fails at once, by the retry policy, with what went wrong."""
    attempts: list[int] = []

    async def grant(ctx: JobContext, payload: Item) -> str:
        attempts.append(ctx.attempt)

        async def write(tx: Tx) -> None:
            await tx.execute("INSERT INTO no_such_table VALUES (1)")

        if payload.n == 1:
            ctx.on_complete(write)
        elif payload.n == 2:
            ctx.enqueue("noop", {}, depends_on=["no-such-job"])
        else:  # the next attempt completes
            ctx.on_complete(write if ctx.attempt == 1 else _no_write)
        return "granted"

    h = await harnesses.make(task_type("grant", grant, max_attempts=1),
                             task_type("grant_twice", grant, max_attempts=2))
    bad_write = await h.enqueue("grant", {"n": 1})
    bad_follow_up = await h.enqueue("grant", {"n": 2})
    retried = await h.enqueue("grant_twice", {"n": 3})
    await h.run_until_idle(include_timers=True)

    for job, error in ((bad_write, "no such table"), (bad_follow_up, "no-such-job")):
        row = await h.get(job.id)
        assert (row.status, row.lease_owner) == (S.failed, None)
        assert row.error is not None
        assert row.error.startswith("completing the job failed: ")
        assert error in row.error
        assert [entry["outcome"] for entry in row.attempt_history] == ["error"]
    assert (await h.get(retried.id)).status == S.completed
    assert sorted(attempts) == [1, 1, 1, 2]
    assert h.processor.running_ids == []
    assert h.rows() == 3  # no follow-up


async def _no_write(tx: Tx) -> None:
    return None


async def test_an_on_complete_function_that_awaits_a_cancelled_task_fails_the_attempt(
    harnesses: Harnesses,
) -> None:
    """A cancel raised inside it is its failure: told as a cancel, the record of the
    completion (which catches errors) ended unrecorded, and the job stayed running."""

    async def awaits_a_cancelled_task(tx: Tx) -> None:
        inner = asyncio.ensure_future(asyncio.sleep(10))
        inner.cancel()
        await inner

    async def grant(ctx: JobContext, payload: Item) -> None:
        ctx.on_complete(awaits_a_cancelled_task)

    h = await harnesses.make(task_type("grant", grant, max_attempts=1))
    job = await h.enqueue("grant")
    await h.run_until_idle()

    row = await h.get(job.id)
    assert (row.status, row.lease_owner) == (S.failed, None)
    assert row.error is not None
    assert "cancelled inside" in row.error


async def test_an_on_complete_write_that_raises_retry_later_is_retried_at_its_time(
    harnesses: Harnesses, clock: ManualClock
) -> None:
    async def later(tx: Tx) -> None:
        raise RetryLater(3600, "the ledger is locked")

    async def grant(ctx: JobContext, payload: Item) -> None:
        ctx.on_complete(later)

    h = await harnesses.make(task_type("grant", grant), clock=clock)
    job = await h.enqueue("grant")
    await h.run_until_idle()

    row = await h.get(job.id)
    assert (row.status, row.run_at) == (S.scheduled, clock() + timedelta(seconds=3600))
    assert row.error == "completing the job failed: the ledger is locked"


async def test_a_checkpoint_saved_in_one_attempt_is_seen_by_the_next(harnesses: Harnesses) -> None:
    seen: list[dict[str, Any] | None] = []

    async def resumable(ctx: JobContext, payload: Item) -> int:
        seen.append(ctx.checkpoint)
        start = (ctx.checkpoint or {}).get("cursor", 0)
        if ctx.attempt == 1:
            await ctx.save_checkpoint({"cursor": 50}, done=50, total=100)
            raise ConnectionError("connection reset after chunk 1")
        await ctx.progress(100, 100)
        return int(start)

    h = await harnesses.make(task_type("sync", resumable))
    job = await h.enqueue("sync")
    await h.run_until_idle(include_timers=True)
    row = await h.get(job.id)
    assert seen == [None, {"cursor": 50}]
    assert (row.status, row.result) == (S.completed, 50)
    assert (row.progress_done, row.progress_total) == (100, 100)
    assert row.checkpoint == {"cursor": 50}


async def test_a_checkpoint_holding_nan_raises_in_the_handler_and_keeps_the_one_before(
    harnesses: Harnesses,
) -> None:
    refused: list[str] = []

    async def averaging(ctx: JobContext, payload: Item) -> str:
        await ctx.save_checkpoint({"cursor": 10, "mean": 2.5}, done=10, total=20)
        try:
            await ctx.save_checkpoint({"cursor": 20, "mean": float("nan")}, done=20, total=20)
        except ValueError as exc:
            refused.append(str(exc))
        return "done"

    h = await harnesses.make(task_type("averaging", averaging))
    job = await h.enqueue("averaging")
    await h.run_until_idle()
    row = await h.get(job.id)
    assert len(refused) == 1  # Python 3.12 adds ": nan"
    assert refused[0].startswith("Out of range float values are not JSON compliant")
    assert (row.status, row.checkpoint) == (S.completed, {"cursor": 10, "mean": 2.5})
    assert (row.progress_done, row.progress_total) == (10, 20)


# -- middleware, hooks, concurrency ---------------------------------------------------------
async def test_middleware_wraps_the_handler_first_one_outermost(harnesses: Harnesses) -> None:
    trail: list[str] = []

    def named(name: str) -> Any:
        async def middleware(ctx: JobContext, call_next: CallNext) -> Any:
            trail.append(f"{name}>")
            try:
                return await call_next()
            finally:
                trail.append(f"<{name}")

        return middleware

    async def handle(ctx: JobContext, payload: Item) -> str:
        trail.append("handler")
        return "ok"

    h = await harnesses.make(task_type("mw", handle), middleware=[named("outer"), named("inner")])
    job = await h.enqueue("mw")
    await h.run_until_idle()
    assert trail == ["outer>", "inner>", "handler", "<inner", "<outer"]
    assert (await h.get(job.id)).result == "ok"


async def test_on_failed_is_called_once_when_the_attempts_are_used_up(harnesses: Harnesses) -> None:
    failed: list[JobRow] = []
    completed: list[JobRow] = []

    async def on_failed(job: JobRow) -> None:
        failed.append(job)

    async def on_completed(job: JobRow) -> None:
        completed.append(job)
        raise RuntimeError("a broken hook is logged, not raised")

    async def handle(ctx: JobContext, payload: Item) -> str:
        if payload.label == "bad":
            raise RuntimeError("bad")
        return "good"

    hooks = TaskHooks(on_completed=on_completed, on_failed=on_failed)
    h = await harnesses.make(task_type("hooked", handle, hooks=hooks, max_attempts=3))
    bad = await h.enqueue("hooked", {"label": "bad"})
    good = await h.enqueue("hooked", {"label": "good"})
    await h.run_until_idle(include_timers=True)
    assert [(j.id, j.status, j.attempts) for j in failed] == [(bad.id, S.failed, 3)]
    assert [(j.id, j.status) for j in completed] == [(good.id, S.completed)]
    assert (await h.get(good.id)).status == S.completed


async def test_a_task_type_concurrency_limit_is_respected(harnesses: Harnesses) -> None:
    inside = 0
    most = 0

    async def limited(ctx: JobContext, payload: Item) -> None:
        nonlocal inside, most
        inside += 1
        most = max(most, inside)
        for _ in range(5):  # stay inside for a few loop turns so others could enter
            await asyncio.sleep(0)
        inside -= 1

    h = await harnesses.make(task_type("smtp", limited, concurrency=2), concurrency=10,
                             start=False)
    jobs = [await h.enqueue("smtp", {"n": i}) for i in range(8)]
    others = [await h.enqueue("noop") for _ in range(3)]
    await h.start()
    await h.run_until_idle()
    assert most == 2
    for job in [*jobs, *others]:
        assert (await h.get(job.id)).status == S.completed


class HeldCompletions:
    """Holds the store's completion writes until released: a slow disk, seen from the processor.
    Leaving the `with` block releases them, so a failed assertion does not hang the teardown."""

    def __init__(self, h: Harness) -> None:
        self.release = asyncio.Event()
        self.waiting = asyncio.Event()
        self._complete_many = h.store.complete_many
        h.store.complete_many = self._held  # type: ignore[method-assign]

    async def _held(self, completions: Sequence[Any]) -> Any:
        self.waiting.set()
        await self.release.wait()
        return await self._complete_many(completions)

    def __enter__(self) -> HeldCompletions:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()


class Starts:
    """A handler that notes the n of each job it starts; `second` is set when job 2 starts."""

    def __init__(self) -> None:
        self.seen: list[int] = []
        self.second = asyncio.Event()

    async def handle(self, ctx: JobContext, payload: Item) -> None:
        self.seen.append(payload.n)
        if payload.n == 2:
            self.second.set()


async def settle(h: Harness) -> None:
    """Give the dispatcher its turns, then let any claim it sent commit (the writer is FIFO)
    and the handlers it started run: what has not started by then was not claimed."""
    for _ in range(20):
        await asyncio.sleep(0)
    await h.store.writer.run_sync(lambda conn: None)
    for _ in range(20):
        await asyncio.sleep(0)


async def test_a_slot_comes_free_when_the_handler_returns_not_when_its_completion_commits(
    harnesses: Harnesses,
) -> None:
    starts = Starts()
    h = await harnesses.make(task_type("wash", starts.handle), concurrency=1, start=False)
    with HeldCompletions(h):
        first = await h.enqueue("wash", {"n": 1})
        then = await h.enqueue("wash", {"n": 2})
        await h.start()
        await wait_for(starts.second)  # the first job's completion is still held back
        assert starts.seen == [1, 2]
        assert (await h.get(first.id)).status == S.running
    await h.run_until_idle()
    assert [(await h.get(j.id)).status for j in (first, then)] == [S.completed, S.completed]


async def test_records_that_lag_behind_hold_the_slots_so_claims_do_not_outrun_them(
    harnesses: Harnesses,
) -> None:
    starts = Starts()
    h = await harnesses.make(task_type("wash", starts.handle), concurrency=1, start=False)
    with HeldCompletions(h):
        jobs = [await h.enqueue("wash", {"n": n}) for n in (1, 2, 3)]
        await h.start()
        await wait_for(starts.second)
        await settle(h)
        assert starts.seen == [1, 2]  # one record in flight per slot: the second keeps its slot
    await h.run_until_idle()
    assert starts.seen == [1, 2, 3]
    assert [(await h.get(j.id)).status for j in jobs] == [S.completed] * 3


async def test_an_old_attempt_still_recording_does_not_free_the_slot_of_its_successor(
    harnesses: Harnesses, clock: ManualClock,
) -> None:
    """Attempt 1 returned and its record is slow; its lease runs out and this process claims
    the job again. Attempt 2 holds the one slot: a new job must wait for it."""
    second_attempt = Gate()
    starts = Starts()

    async def handle(ctx: JobContext, payload: Item) -> None:
        if payload.n == 0 and ctx.attempt == 2:
            await second_attempt.hold()
        else:
            await starts.handle(ctx, payload)

    h = await harnesses.make(task_type("wash", handle), concurrency=1, clock=clock)
    with HeldCompletions(h) as held:
        job = await h.enqueue("wash", {"n": 0})
        await wait_for(held.waiting)  # attempt 1 returned; its completion is held back
        clock.advance(61)
        assert await h.scheduler.release_expired_leases() == 1
        await wait_for(second_attempt.entered)
        other = await h.enqueue("wash", {"n": 2})
        await settle(h)
        assert starts.seen == [0]  # attempt 1 only: the other job waits for the slot
        second_attempt.release.set()
    await h.run_until_idle()
    assert starts.seen == [0, 2]
    assert (await h.get(job.id)).status == S.completed
    assert (await h.get(other.id)).status == S.completed


async def test_a_fleet_limited_task_type_keeps_its_slot_until_the_completion_commits(
    harnesses: Harnesses,
) -> None:
    starts = Starts()
    h = await harnesses.make(task_type("smtp", starts.handle, concurrency=1), concurrency=4,
                             start=False)
    with HeldCompletions(h) as held:
        jobs = [await h.enqueue("smtp", {"n": n}) for n in (1, 2)]
        await h.start()
        await wait_for(held.waiting)
        await settle(h)
        assert starts.seen == [1]  # the database still counts the first as running
    await h.run_until_idle()
    # a slot freed early would have sent a claim of the second job that the database refuses
    # (its fleet limit), dropping it from memory until the next reload: it would not run here
    assert starts.seen == [1, 2]
    assert [(await h.get(j.id)).status for j in jobs] == [S.completed] * 2


async def test_a_woken_job_of_a_task_type_unknown_here_is_left_to_a_process_that_knows_it(
    harnesses: Harnesses,
) -> None:
    h = await harnesses.make(start=False)
    other = await harnesses.make(task_type("elsewhere", _never), start=False, owner=OTHER_OWNER)
    a = await h.enqueue("noop")
    c = await other.enqueue("elsewhere", depends_on=[a.id])
    assert c.status == S.waiting
    await h.start()
    await h.run_until_idle()
    row = await h.get(c.id)
    assert (row.status, row.attempts) == (S.queued, 0)  # freed by A, but not run here
    assert await h.scheduler.reload() == 0
    assert await other.scheduler.reload() == 1


async def test_a_claimed_job_of_an_unknown_task_type_is_failed_not_left_running(
    harnesses: Harnesses,
) -> None:
    h = await harnesses.make()
    other = await harnesses.make(task_type("elsewhere", _never), start=False, owner=OTHER_OWNER)
    job = await other.enqueue("elsewhere", max_attempts=1)
    assert h.queue.ready is not None
    h.queue.ready.put(DueJob(job.id, job.task_type, job.queue, job.priority, job.run_at))
    await h.run_until_idle()
    row = await h.get(job.id)
    assert row.status == S.failed
    assert row.error == "UnknownTaskType: unknown task type 'elsewhere'"
    assert outcomes(row) == [AttemptOutcome.error.value]


async def _never(ctx: JobContext, payload: Item) -> None:
    raise AssertionError("never runs here")


async def test_a_job_claimed_while_the_processor_stops_is_given_back_too(
    harnesses: Harnesses,
) -> None:
    async def quick(ctx: JobContext, payload: Item) -> None:
        raise AssertionError("must not run once stop() began")

    # the claim path: a handoff would write the job claimed by the enqueue itself
    h = await harnesses.make(task_type("quick", quick, max_attempts=1), handoff=False)
    job = await h.enqueue("quick")
    # no event marks "inside the claim": yield loop turns (no timed sleep) until it is
    while not h.processor._claiming:  # noqa: ASYNC110
        await asyncio.sleep(0)
    await h.processor.stop()
    h.started = False
    await h.store.writer.run_sync(lambda conn: None)  # every write queued before has committed
    row = await h.get(job.id)
    assert (row.status, row.attempts, row.lease_owner) == (S.queued, 0, None)
    assert outcomes(row) == ["released"]


@pytest.mark.parametrize("write", ["checkpoint", "progress", "enqueue", "gathered checkpoint"])
async def test_a_write_awaited_inside_a_transaction_function_fails_the_attempt_not_the_writer(
    harnesses: Harnesses, write: str
) -> None:
    """SQLite's one writer runs the function: a store write it awaited waited for that writer,
    and every write of the process (enqueues, claims, completions) stopped for good."""

    async def writes_inside(ctx: JobContext, payload: Item) -> None:
        async def fn(tx: Tx) -> None:
            await tx.execute("SELECT 1")
            if write == "checkpoint":
                await ctx.save_checkpoint({"at": 1})
            elif write == "progress":
                await ctx.progress(1, 1)
            elif write == "gathered checkpoint":  # awaited through a task of its own
                await asyncio.gather(ctx.save_checkpoint({"at": 1}))
            else:
                await h.enqueue()

        await ctx.transaction(fn)

    h = await harnesses.make(task_type("inside", writes_inside))
    async with asyncio.timeout(20):
        job = await h.enqueue("inside", max_attempts=1)
        await h.run_until_idle()
        other = await h.enqueue()
        await h.run_until_idle()
    failed = await h.get(job.id)
    assert failed.status == S.failed
    assert (failed.error or "").startswith("WriteInsideTransaction: a store write")
    assert (await h.get(other.id)).status == S.completed


class _LogSeen(logging.Handler):
    """Sets `seen` once a record holding `text` is logged (in the event loop's thread)."""

    def __init__(self, text: str) -> None:
        super().__init__(logging.WARNING)
        self.text = text
        self.seen = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.seen.set()


@pytest.mark.parametrize("ends", ["completed", "failed"])
async def test_an_outcome_whose_write_fails_for_a_while_is_written_when_it_can_be(
    harnesses: Harnesses, db_url: str, ends: str
) -> None:
    """Another program holds SQLite's write lock past the busy timeout as the handler returns.
    The record was tried once: the job stayed running until its lease ran out, and the lease
    check then failed it as a lost worker (its last attempt) although its handler succeeded."""
    gate = Gate()
    runs: list[int] = []

    async def once(ctx: JobContext, payload: Item) -> None:
        runs.append(ctx.attempt)
        await gate.hold()
        if ends == "failed":
            raise PermanentError("the handler's own error")

    store = SqliteJobStore(db_url, owner=OWNER, busy_timeout_ms=50)
    await store.open()
    h = await harnesses.make(task_type("once", once, max_attempts=1), store=store)
    job = await h.enqueue("once")
    await wait_for(gate.entered)
    locked, unlock = threading.Event(), threading.Event()

    def hold_the_write_lock() -> None:
        other = sqlite3.connect(db_url.removeprefix("sqlite+aiosqlite:///"), isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        locked.set()
        unlock.wait(10)
        other.execute("COMMIT")
        other.close()

    holder = asyncio.ensure_future(asyncio.to_thread(hold_the_write_lock))
    await asyncio.to_thread(locked.wait, 10)
    retrying = _LogSeen("trying again in")
    logging.getLogger("carwash_jobs.processor").addHandler(retrying)
    try:
        gate.release.set()
        await asyncio.wait_for(retrying.seen.wait(), 10)  # the record failed, and waits
    finally:
        logging.getLogger("carwash_jobs.processor").removeHandler(retrying)
    assert (await store.get(job.id)).status == S.running
    unlock.set()
    await holder
    await h.run_until_idle()
    done = await h.get(job.id)
    assert (done.status, runs, outcomes(done)) == (S(ends), [1], [ends if ends == "completed" else "error"])


async def test_stop_keeps_to_its_grace_while_a_callers_transaction_holds_the_writer(
    harnesses: Harnesses,
) -> None:
    """An on_complete write that hangs (a call without a timeout) holds SQLite's one writer;
    an enqueue handing its job over waits behind it. stop() waited for that hand-over, the
    claim in flight and the last completions without limit: as long as the hang, whatever
    the grace (systemd would SIGKILL the worker, and every running job lose its attempt)."""
    hung, release = asyncio.Event(), asyncio.Event()

    async def hangs_in_its_final_write(ctx: JobContext, payload: Item) -> None:
        async def final(tx: Tx) -> None:
            await tx.execute("SELECT 1")
            hung.set()
            await release.wait()

        ctx.on_complete(final)

    grace = 1.0
    h = await harnesses.make(task_type("final", hangs_in_its_final_write),
                             shutdown_grace=timedelta(seconds=grace))
    await h.enqueue("final")
    await wait_for(hung)
    handed_over = asyncio.ensure_future(h.enqueue())
    await _until(lambda: h.store.writer.queued > 0)  # its write waits behind the hung one
    try:
        started = time.monotonic()
        async with asyncio.timeout(10):
            await h.processor.stop()
        h.started = False
        # two grace periods (the running jobs', then the outcomes'), not three or more
        assert time.monotonic() - started < 2.6 * grace
    finally:
        release.set()
        with contextlib.suppress(Exception):
            await handed_over


async def test_the_counters_count_follow_ups_as_enqueued_and_no_throttle_as_a_retry(
    harnesses: Harnesses,
) -> None:
    """A follow-up is written with its job's completion, not through an enqueue: it was not
    counted; a RetryLater that does not count the attempt (a rate limit's wait) was counted as
    an attempt that failed."""
    metrics = Metrics()
    throttled: list[int] = []

    async def leads_on(ctx: JobContext, payload: Item) -> None:
        if payload.label == "wait" and not throttled:
            throttled.append(ctx.attempt)
            raise RetryLater(0, "the mail server's pace", count_attempt=False)
        if payload.label == "parent":
            ctx.enqueue("noop", {})

    h = await harnesses.make(task_type("lead", leads_on), metrics=metrics)
    await h.enqueue("lead", {"label": "parent"})
    await h.enqueue("lead", {"label": "wait"})
    await h.run_until_idle(include_timers=True)

    def count(name: str, task: str) -> float | None:
        return metrics.registry.get_sample_value(name, {"task_type": task})

    assert (count("carwash_jobs_enqueued_total", "lead"),
            count("carwash_jobs_enqueued_total", "noop")) == (2, 1)
    assert count("carwash_jobs_completed_total", "lead") == 2
    assert count("carwash_jobs_retried_total", "lead") is None

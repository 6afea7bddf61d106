"""Tests for carwash_jobs/context.py: what a handler may touch, against a real claimed row."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import pytest

from carwash_jobs import lifecycle
from carwash_jobs.context import AttemptState, JobContext, JobLogger
from carwash_jobs.errors import InvalidPayload, LeaseLost, UnknownTaskType
from carwash_jobs.lifecycle import JobStatus
from carwash_jobs.queue import EnqueueOptions
from tests.carwash_jobs.support import OWNER

if TYPE_CHECKING:
    from collections.abc import Mapping

    from carwash_jobs.store.base import JobRow, NewJob, Tx
    from tests.carwash_jobs.support import Harness, Harnesses, ManualClock

LEASE = timedelta(seconds=60)


@pytest.fixture
async def idle(harnesses: Harnesses, clock: ManualClock) -> Harness:
    return await harnesses.make(clock=clock, start=False)


async def running_job(h: Harness, clock: ManualClock) -> JobRow:
    job = await h.enqueue()
    (row,) = await h.store.claim([job.id], OWNER, clock() + LEASE)
    return row


async def running_context(h: Harness, clock: ManualClock) -> tuple[JobRow, JobContext]:
    """A claimed job and the context its handler would get."""
    row = await running_job(h, clock)
    return row, make_context(h, row)


def make_context(h: Harness, row: JobRow) -> JobContext:
    def build(task_type: str, payload: Mapping[str, Any], options: Mapping[str, Any]) -> NewJob:
        return h.queue.build(task_type, payload, EnqueueOptions.from_mapping(options))

    return JobContext(row, {}, AttemptState(h.store, row.fence, build))


def hold_progress_writes_of(
    h: Harness, done: int, monkeypatch: pytest.MonkeyPatch
) -> tuple[asyncio.Event, asyncio.Event]:
    """Hold a write of progress `done` inside the store until the test releases it: the
    first event is set once one is held, the second releases it."""
    inside, release = asyncio.Event(), asyncio.Event()
    save_progress = h.store.save_progress

    async def held(*args: Any, **kwargs: Any) -> bool:
        if kwargs.get("done") == done:
            inside.set()
            await release.wait()
        return await save_progress(*args, **kwargs)

    monkeypatch.setattr(h.store, "save_progress", held)
    return inside, release


async def test_progress_is_written_for_the_running_attempt(idle: Harness, clock: ManualClock) -> None:
    row, ctx = await running_context(idle, clock)
    await ctx.progress(3, 10)
    job = await idle.get(row.id)
    assert (job.progress_done, job.progress_total) == (3, 10)


async def test_frequent_progress_is_coalesced_but_the_final_count_always_goes_out(
    idle: Harness, clock: ManualClock
) -> None:
    row, ctx = await running_context(idle, clock)
    writes_before = idle.store.writer.writes
    for done in range(1, 50):
        await ctx.progress(done, 50)
    assert idle.store.writer.writes - writes_before == 1  # the first; the rest came too soon
    await ctx.progress(50, 50)
    assert idle.store.writer.writes - writes_before == 2
    job = await idle.get(row.id)
    assert (job.progress_done, job.progress_total) == (50, 50)


async def test_a_progress_call_that_came_too_soon_is_written_once_the_interval_has_passed(
    idle: Harness, clock: ManualClock
) -> None:
    """Dropped, a handler that then worked on without reporting showed the older count."""
    row, ctx = await running_context(idle, clock)
    writes_before = idle.store.writer.writes
    await ctx.progress(1, 10)
    await ctx.progress(6, 10)
    await ctx.progress(7, 10)
    assert idle.store.writer.writes - writes_before == 1
    assert (await idle.get(row.id)).progress_done == 1

    timer = ctx._state.progress_timer
    assert timer is not None
    await timer  # it sleeps out the rest of the interval, then writes the last call
    assert (await idle.get(row.id)).progress_done == 7
    assert ctx._state.pending_progress is None


async def test_a_write_of_its_own_supersedes_a_progress_call_held_back(
    idle: Harness, clock: ManualClock
) -> None:
    row, ctx = await running_context(idle, clock)
    await ctx.progress(1, 10)
    await ctx.progress(2, 10)
    timer = ctx._state.progress_timer
    await ctx.save_checkpoint({"chunk": 5}, done=5)
    assert timer is not None
    assert timer.cancelled() or timer.cancelling()
    assert (ctx._state.pending_progress, ctx._state.progress_timer) == (None, None)
    assert (await idle.get(row.id)).progress_done == 5


async def test_a_progress_call_held_back_for_an_attempt_that_lost_its_job_is_dropped_quietly(
    idle: Harness, clock: ManualClock
) -> None:
    row, ctx = await running_context(idle, clock)
    await ctx.progress(1, 10)
    await ctx.progress(2, 10)
    await idle.store.apply(lifecycle.cancel(row.id, clock()))

    await ctx._state.write_pending_progress(row.id)  # as the processor does at the end

    assert ctx.cancelled()
    assert (await idle.get(row.id)).progress_done == 1


async def test_a_write_waits_for_a_held_back_write_in_flight(
    idle: Harness, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On PostgreSQL two writes take two connections: the older count could commit last, and
    the job end showing it. The held-back write is held inside the store here, to see."""
    row, ctx = await running_context(idle, clock)
    await ctx.progress(1, 10)
    await ctx.progress(5, 10)
    timer = ctx._state.progress_timer
    assert timer is not None

    inside, release = hold_progress_writes_of(idle, 5, monkeypatch)
    await asyncio.wait_for(inside.wait(), 5)  # the timer writes 5/10
    final = asyncio.create_task(ctx.progress(10, 10))
    await asyncio.sleep(0.05)  # time for an unordered final write to go first
    release.set()
    await asyncio.wait([final, timer])
    final.result()
    assert (await idle.get(row.id)).progress_done == 10


async def test_progress_raises_lease_lost_once_a_held_back_write_found_the_job_gone(
    idle: Harness, clock: ManualClock
) -> None:
    """A handler that only reports progress stops as it did when every call wrote: the writes
    of a tight loop are the held-back ones, which cannot raise into it."""
    row, ctx = await running_context(idle, clock)
    await ctx.progress(1, 10)
    await ctx.progress(2, 10)
    await idle.store.apply(lifecycle.cancel(row.id, clock()))
    timer = ctx._state.progress_timer
    assert timer is not None
    await timer

    with pytest.raises(LeaseLost):
        await ctx.progress(3, 10)


async def test_a_progress_call_made_while_the_held_back_one_is_written_is_written_after_it(
    idle: Harness, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    row, ctx = await running_context(idle, clock)
    await ctx.progress(1, 10)
    await ctx.progress(2, 10)
    inside, release = hold_progress_writes_of(idle, 2, monkeypatch)
    await asyncio.wait_for(inside.wait(), 5)
    await ctx.progress(3, 10)  # too soon: held back while 2/10 is being written
    release.set()
    while ctx._state.progress_timer is not None:
        await asyncio.wait([ctx._state.progress_timer])
    assert (await idle.get(row.id)).progress_done == 3


async def test_a_saved_checkpoint_is_stored_on_the_row(idle: Harness, clock: ManualClock) -> None:
    row, ctx = await running_context(idle, clock)
    await ctx.save_checkpoint({"cursor": "2030-01-01", "chunk": 4}, done=40, total=100)
    job = await idle.get(row.id)
    assert job.checkpoint == {"cursor": "2030-01-01", "chunk": 4}
    assert (job.progress_done, job.progress_total) == (40, 100)


async def test_writing_after_the_lease_was_lost_raises_lease_lost_and_marks_cancelled(
    idle: Harness, clock: ManualClock
) -> None:
    row, ctx = await running_context(idle, clock)
    assert not ctx.cancelled()
    await idle.store.apply(lifecycle.cancel(row.id, clock()))
    with pytest.raises(LeaseLost):
        await ctx.save_checkpoint({"cursor": 1})
    assert ctx.cancelled()
    assert (await idle.get(row.id)).checkpoint is None


async def test_enqueue_only_collects_the_follow_up_for_the_completion(
    idle: Harness, clock: ManualClock
) -> None:
    _, ctx = await running_context(idle, clock)
    follow_up_id = ctx.enqueue("noop", {"label": "next"}, priority=2)
    assert [job.id for job in ctx._state.follow_ups] == [follow_up_id]
    assert ctx._state.follow_ups[0].priority == 2
    assert idle.rows() == 1  # nothing written yet: it is inserted with the completion


async def test_enqueue_validates_the_follow_up_at_once(idle: Harness, clock: ManualClock) -> None:
    ctx = make_context(idle, await running_job(idle, clock))
    with pytest.raises(InvalidPayload) as caught:
        ctx.enqueue("order", {"customer_id": "x", "lines": []})
    assert caught.value.field == "customer_id"
    with pytest.raises(InvalidPayload):
        ctx.enqueue("noop", {}, prioritty=1)
    with pytest.raises(UnknownTaskType):
        ctx.enqueue("nope", {})


async def test_transaction_runs_domain_writes_now(idle: Harness, clock: ManualClock) -> None:
    ctx = make_context(idle, await running_job(idle, clock))

    async def write(tx: Tx) -> int:
        await tx.execute("CREATE TABLE sent (recipient TEXT)")
        return await tx.execute("INSERT INTO sent VALUES ('a@example.com')")

    assert await ctx.transaction(write) == 1
    assert idle.rows("sent") == 1


async def test_on_complete_only_registers_the_final_write(idle: Harness, clock: ManualClock) -> None:
    ctx = make_context(idle, await running_job(idle, clock))

    async def final(tx: Tx) -> None:
        raise AssertionError("not run by on_complete itself")

    ctx.on_complete(final)
    assert ctx._state.finalizers == [final]


def test_the_job_logger_prefixes_lines_and_passes_the_fields_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    logger = JobLogger(logging.getLogger("carwash.test"),
                       {"job_id": "j1", "task_type": "email", "attempt": 2})
    with caplog.at_level(logging.INFO, logger="carwash.test"):
        logger.info("sent %d", 5, extra={"chunk": 1})
    (record,) = caplog.records
    assert record.getMessage() == "[j1 email#2] sent 5"
    assert (record.job_id, record.attempt, record.chunk) == ("j1", 2, 1)  # type: ignore[attr-defined]


async def test_the_context_exposes_the_row_and_the_enqueuers_context(
    idle: Harness, clock: ManualClock
) -> None:
    job = await idle.enqueue(context={"requested_by": "admin"})
    (row,) = await idle.store.claim([job.id], OWNER, clock() + LEASE)
    ctx = make_context(idle, row)
    assert ctx.context == {"requested_by": "admin"}
    with pytest.raises(TypeError):  # read-only, as the row is
        ctx.context["requested_by"] = "someone else"  # type: ignore[index]
    assert (ctx.job_id, ctx.attempt, ctx.task_type) == (row.id, 1, "noop")
    assert ctx.checkpoint is None
    assert ctx.job.status == JobStatus.running


async def test_a_job_without_context_gets_an_empty_one_no_handler_can_change(
    idle: Harness, clock: ManualClock
) -> None:
    """The empty context is shared by every such job: a handler writing to it would otherwise
    hand its keys to the next job."""
    row, ctx = await running_context(idle, clock)
    assert ctx.context == {}
    with pytest.raises(TypeError):
        ctx.context["leak"] = 1  # type: ignore[index]
    assert make_context(idle, row).context == {}


async def test_the_contexts_logger_is_made_once_and_names_the_attempt(
    idle: Harness, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    row, ctx = await running_context(idle, clock)
    assert ctx.logger is ctx.logger
    with caplog.at_level(logging.INFO, logger="carwash_jobs.processor"):
        ctx.logger.info("washed")
    (record,) = caplog.records
    assert record.getMessage() == f"[{row.id} noop#1] washed"


async def test_the_context_is_frozen(idle: Harness, clock: ManualClock) -> None:
    """What it reads from the row cannot be set either. (Python 3.11's frozen slots dataclass
    refuses a name that is not a field with a TypeError from its own super() call.)"""
    ctx = make_context(idle, await running_job(idle, clock))
    with pytest.raises((AttributeError, TypeError)):
        ctx.job_id = ctx.job.id  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.job = ctx.job  # type: ignore[misc]
    assert ctx.job_id == ctx.job.id

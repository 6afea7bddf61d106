"""Tests for carwash_jobs/queue.py: the write-through enqueue and the admin operations, on a real
SQLite file. The processor is not started here (but where a reload meets the jobs it parks):
what the queue hands to memory is inspected in its ReadyQueue."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

import pytest
from pydantic import BaseModel

from carwash_jobs import lifecycle
from carwash_jobs.errors import (
    IllegalTransition,
    InvalidPayload,
    JobNotFound,
    UnknownDependency,
    UnknownTaskType,
)
from carwash_jobs.lifecycle import AttemptOutcome, JobStatus
from carwash_jobs.queue import MAX_CONTEXT_BYTES, TIMER_HORIZON_SECONDS, EnqueueOptions
from carwash_jobs.registry import TaskType
from carwash_jobs.store.base import MAX_JSON_DEPTH, FailedFilter, Inserted
from carwash_jobs.types import JobId
from tests.carwash_jobs.support import OWNER, Calls, Gate, Item, noop, task_type

if TYPE_CHECKING:
    from collections.abc import Callable

    from carwash_jobs.context import JobContext
    from carwash_jobs.queue import JobQueue
    from carwash_jobs.store.base import JobRow, Tx
    from tests.carwash_jobs.support import Harness, Harnesses, ManualClock

S = JobStatus
LEASE = timedelta(seconds=60)


@pytest.fixture
async def idle(harnesses: Harnesses, clock: ManualClock) -> Harness:
    """A queue whose processor is not running, on the manual clock."""
    return await harnesses.make(clock=clock, start=False)


def held(queue: JobQueue, job_id: JobId) -> bool:
    return queue.contains(job_id)


async def fail_job(h: Harness, job: JobRow, clock: ManualClock) -> JobRow:
    (row,) = await h.store.claim([job.id], OWNER, clock() + LEASE)
    transition = lifecycle.fail(row.id, row.fence, "boom", "tb", AttemptOutcome.error, clock())
    return (await h.store.apply(transition)).job


# -- enqueue --------------------------------------------------------------------------------
async def test_enqueue_commits_the_row_then_offers_it_to_memory(idle: Harness) -> None:
    inserted = await idle.queue.enqueue("noop", {"label": "a", "n": 2})
    assert inserted.created
    stored = await idle.get(inserted.job.id)
    assert stored.status == S.queued
    assert stored.payload == {"label": "a", "n": 2}
    assert idle.rows() == 1
    assert held(idle.queue, stored.id)


async def test_enqueue_accepts_a_payload_model_and_fills_task_type_defaults(idle: Harness) -> None:
    job = (await idle.queue.enqueue("noop", Item(label="m"))).job
    assert job.payload == {"label": "m", "n": 0}
    assert (job.priority, job.queue, job.max_attempts) == (0, "default", 5)


async def test_enqueue_options_override_the_defaults(idle: Harness) -> None:
    job = await idle.enqueue(priority=7, queue="critical", max_attempts=2, tags=["x"],
                             context={"requested_by": "admin"})
    assert (job.priority, job.queue, job.max_attempts, job.tags) == (7, "critical", 2, ["x"])
    assert job.context == {"requested_by": "admin"}


async def test_a_delay_makes_the_job_scheduled_on_an_in_process_timer(
    idle: Harness, clock: ManualClock
) -> None:
    job = await idle.enqueue(delay_seconds=30)
    assert job.status == S.scheduled
    assert job.run_at == clock() + timedelta(seconds=30)
    assert idle.queue.timers == 1
    assert idle.queue.ready is not None
    assert not idle.queue.ready.contains(job.id)  # not ready yet: on the timer
    assert held(idle.queue, job.id)


async def test_a_job_due_beyond_the_timer_horizon_waits_for_the_reload(
    idle: Harness, clock: ManualClock
) -> None:
    run_at = clock() + timedelta(seconds=TIMER_HORIZON_SECONDS + 60)
    job = await idle.enqueue(run_at=run_at)
    assert (job.status, job.run_at) == (S.scheduled, run_at)
    assert idle.queue.timers == 0
    assert not held(idle.queue, job.id)


async def test_a_run_at_in_the_past_is_due_now(idle: Harness, clock: ManualClock) -> None:
    job = await idle.enqueue(run_at=clock() - timedelta(hours=1))
    assert job.status == S.queued
    assert held(idle.queue, job.id)


def nested(levels: int) -> dict[str, Any]:
    """A JSON object `levels` objects deep."""
    value: dict[str, Any] = {}
    for _ in range(levels - 1):
        value = {"a": value}
    return value


async def test_a_context_as_deep_as_allowed_is_written(idle: Harness) -> None:
    job = await idle.enqueue(context=nested(MAX_JSON_DEPTH))
    assert (await idle.get(job.id)).context == nested(MAX_JSON_DEPTH)


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"delay_seconds": -1}, "delay_seconds"),
        # beyond what a datetime holds, or no number: an OverflowError or a TypeError before
        ({"delay_seconds": 1e300}, "delay_seconds"),
        ({"delay_seconds": float("nan")}, "delay_seconds"),
        ({"delay_seconds": float("inf")}, "delay_seconds"),
        ({"delay_seconds": "5"}, "delay_seconds"),
        ({"run_at": datetime(2030, 1, 1), "delay_seconds": None}, "run_at"),
        ({"run_at": "2030-01-01T00:00Z"}, "run_at"),  # text is for from_mapping to read
        ({"run_at": datetime(9999, 12, 31, 23, tzinfo=timezone(timedelta(hours=-5)))}, "run_at"),
        ({"run_at": datetime(2030, 1, 1, tzinfo=UTC), "delay_seconds": 5}, "run_at"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"max_attempts": "3"}, "max_attempts"),
        # past PostgreSQL's 32-bit column; SQLite kept one from 2**63 as an approximate float
        ({"max_attempts": 2**31}, "max_attempts"),
        ({"max_attempts": 2**63}, "max_attempts"),
        # written, a text priority could not be ordered against the others: every reload of
        # the due jobs failed on it, and so did every start of the runtime
        ({"priority": "high"}, "priority"),
        ({"priority": True}, "priority"),
        ({"priority": 2**31}, "priority"),
        ({"queue": 5}, "queue"),
        ({"queue": "q" * 65}, "queue"),
        ({"tags": "vip"}, "tags"),
        # a store cannot keep them: the driver's error, or on PostgreSQL (U+0000) a failed
        # completion of the handler whose follow-up it was
        ({"tags": ["vip\x00"]}, "tags"),
        ({"tags": ["vip\ud800"]}, "tags"),
        ({"queue": "bulk\x00"}, "queue"),
        ({"idempotency_key": "k\udcff"}, "idempotency_key"),
        ({"depends_on": ["0\x00"]}, "depends_on"),
        # a number or a long key would fail the insert (a VARCHAR(255) on PostgreSQL)
        ({"idempotency_key": 5}, "idempotency_key"),
        ({"idempotency_key": "k" * 256}, "idempotency_key"),
        ({"idempotency_key": ""}, "idempotency_key"),
        # a text would be read as one dependency per character
        ({"depends_on": "0" * 32}, "depends_on"),
        ({"depends_on": [7]}, "depends_on"),
        ({"context": {"blob": "x" * MAX_CONTEXT_BYTES}}, "context"),
        ({"context": {"when": datetime(2030, 1, 1, tzinfo=UTC)}}, "context"),
        ({"context": {"ratio": float("nan")}}, "context"),
        # a page of the API could not show it (its serializer stops at 255 levels)
        ({"context": nested(MAX_JSON_DEPTH + 1)}, "context"),
        ({"context": {"list": [nested(300)]}}, "context"),
        # deeper than json.dumps follows: its RecursionError came before the check
        ({"context": nested(1500)}, "context"),
    ],
)
async def test_invalid_options_are_rejected_naming_the_field_and_nothing_is_written(
    idle: Harness, options: dict[str, Any], field: str
) -> None:
    with pytest.raises(InvalidPayload) as caught:
        await idle.enqueue(**options)
    assert caught.value.field == field
    assert idle.rows() == 0


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"lines": [{"sku": "wax", "qty": 1}]}, "customer_id"),
        ({"customer_id": 1, "lines": [{"sku": "wax", "qty": -2}]}, "lines.0.qty"),
    ],
)
async def test_an_invalid_payload_is_rejected_naming_the_field_and_no_row_is_written(
    idle: Harness, payload: dict[str, Any], field: str
) -> None:
    with pytest.raises(InvalidPayload) as caught:
        await idle.queue.enqueue("order", payload)
    assert caught.value.field == field
    assert idle.rows() == 0
    assert len(idle.queue.ready or ()) == 0


async def test_an_unknown_task_type_is_rejected(idle: Harness) -> None:
    with pytest.raises(UnknownTaskType):
        await idle.queue.enqueue("nope", {})
    assert idle.rows() == 0


def test_unknown_enqueue_options_are_named() -> None:
    with pytest.raises(InvalidPayload) as caught:
        EnqueueOptions.from_mapping({"priority": 1, "prio": 2})
    assert caught.value.field == "prio"


def test_options_from_plain_data_read_run_at_from_iso_text() -> None:
    """A handler's follow-up options or the CLI's JSON: JSON has no time type."""
    options = EnqueueOptions.from_mapping({"run_at": "2030-01-01T08:00+01:00"})
    assert options.run_at == datetime(2030, 1, 1, 7, tzinfo=UTC)

    with pytest.raises(InvalidPayload) as caught:
        EnqueueOptions.from_mapping({"run_at": "tomorrow"})
    assert caught.value.field == "run_at"


async def test_a_second_enqueue_with_the_same_idempotency_key_returns_the_existing_job(
    idle: Harness,
) -> None:
    options = EnqueueOptions(idempotency_key="credits:march")
    first = await idle.queue.enqueue("noop", {"n": 1}, options)
    second = await idle.queue.enqueue("noop", {"n": 2}, options)
    assert first.created
    assert not second.created
    assert second.job.id == first.job.id
    assert second.job.payload == {"label": "", "n": 1}
    assert idle.rows() == 1


async def test_enqueue_many_commits_every_job_together(idle: Harness) -> None:
    before = idle.store.writer.batches
    results = await idle.queue.enqueue_many("noop", [{"n": i} for i in range(20)])
    assert idle.store.writer.batches - before == 1
    assert [r.job.payload["n"] for r in results] == list(range(20))
    assert len(idle.queue.ready or ()) == 20


async def test_enqueue_many_refuses_a_shared_idempotency_key(idle: Harness) -> None:
    with pytest.raises(InvalidPayload) as caught:
        await idle.queue.enqueue_many("noop", [{}, {}], EnqueueOptions(idempotency_key="k"))
    assert caught.value.field == "idempotency_key"


async def test_enqueue_many_names_the_first_wrong_payload_and_writes_none(idle: Harness) -> None:
    with pytest.raises(InvalidPayload) as caught:
        await idle.queue.enqueue_many("noop", [{"n": 1}, {"n": 2}, {"n": "three"}, {"n": []}])
    assert caught.value.field == "payloads.2.n"
    assert idle.rows() == 0
    assert len(idle.queue.ready or ()) == 0


class _Readings(BaseModel):
    site: str = "bay 1"
    values: list[float] = []


async def _record_readings(ctx: JobContext, payload: _Readings) -> None:
    return None


@pytest.fixture
async def readings(harnesses: Harnesses, clock: ManualClock) -> Harness:
    """A task type with a float field, which takes NaN and the infinities; JSON has no word
    for them."""
    return await harnesses.make(TaskType("readings", _Readings, _record_readings), clock=clock,
                                start=False)


async def test_a_payload_holding_nan_is_refused_naming_the_field_and_others_are_not_held_up(
    readings: Harness,
) -> None:
    """Concurrent single enqueues share one insert: the refusal comes before it, so the jobs
    enqueued beside this one are written."""
    good = [{"values": [float(n)]} for n in range(3)]
    bad = {"values": [1.5, float("nan")]}

    results = await asyncio.gather(*(readings.queue.enqueue("readings", p) for p in [*good, bad]),
                                   return_exceptions=True)

    *written, refused = results
    assert isinstance(refused, InvalidPayload)
    assert (refused.field, str(refused)) == ("values.1",
                                             "values.1: NaN and infinities have no JSON form")
    assert all(isinstance(r, Inserted) and r.created for r in written)
    assert readings.rows() == 3


class _SiteReadings(_Readings):
    unit: str = "bar"


@pytest.mark.parametrize("given_as", [dict, _Readings, _SiteReadings])
async def test_enqueue_many_names_the_payload_holding_an_infinity_and_writes_none(
    readings: Harness, given_as: Callable[..., Any],
) -> None:
    """The same as dicts, as instances of the model, and as instances of a subclass (each
    dumped with its own fields: a list dump that did so wrote NaN as null)."""
    payloads = [given_as(values=v) for v in ([1.0], [2.0, float("-inf")], [float("nan")])]
    with pytest.raises(InvalidPayload) as caught:
        await readings.queue.enqueue_many("readings", payloads)
    assert caught.value.field == "payloads.1.values.1"
    assert readings.rows() == 0
    assert len(readings.queue.ready or ()) == 0


class _DetailedItem(Item):
    note: str = "kept"


async def test_enqueue_many_stores_each_payload_as_a_single_enqueue_would(idle: Harness) -> None:
    """A payload given as an instance of a subclass keeps the subclass's fields either way."""
    (many,) = await idle.queue.enqueue_many("noop", [_DetailedItem(n=1)])
    one = await idle.queue.enqueue("noop", _DetailedItem(n=1))
    assert many.job.payload == one.job.payload == {"label": "", "n": 1, "note": "kept"}


async def test_enqueue_many_gives_each_job_its_own_id_in_creation_order_and_its_own_context(
    idle: Harness,
) -> None:
    results = await idle.queue.enqueue_many(
        "noop", [{"n": i} for i in range(300)], EnqueueOptions(context={"who": "admin"})
    )
    ids = [r.job.id for r in results]
    assert len(set(ids)) == 300
    assert ids == sorted(ids)
    results[0].job.context["who"] = "changed"  # type: ignore[index]
    assert results[1].job.context == {"who": "admin"}


async def test_enqueue_with_an_unknown_dependency_writes_no_row(idle: Harness) -> None:
    with pytest.raises(UnknownDependency):
        await idle.enqueue(depends_on=[JobId("0" * 32)])
    assert idle.rows() == 0


async def test_a_waiting_job_is_not_offered_to_memory(idle: Harness) -> None:
    a = await idle.enqueue()
    c = await idle.enqueue(depends_on=[a.id, a.id])
    assert c.status == S.waiting
    assert c.depends_on == [a.id]  # duplicates collapse
    assert not held(idle.queue, c.id)


# -- the caller's transaction ---------------------------------------------------------------
async def test_an_enqueue_joined_to_a_transaction_exists_once_it_commits(idle: Harness) -> None:
    async def work(tx: Tx) -> JobId:
        await tx.execute("CREATE TABLE invoices (id INTEGER)")
        await tx.execute("INSERT INTO invoices VALUES (1)")
        inserted = await idle.queue.enqueue("noop", {"label": "mail invoice"}, tx=tx)
        assert not held(idle.queue, inserted.job.id)  # not before the commit
        return inserted.job.id

    job_id: JobId = await idle.queue.transaction(work)
    assert (await idle.get(job_id)).status == S.queued
    assert held(idle.queue, job_id)
    assert idle.rows("invoices") == 1


async def test_an_enqueue_joined_to_a_transaction_vanishes_when_it_rolls_back(
    idle: Harness,
) -> None:
    made: list[JobId] = []

    async def work(tx: Tx) -> None:
        inserted = await idle.queue.enqueue("noop", {"label": "never"}, tx=tx)
        made.append(inserted.job.id)
        raise RuntimeError("the invoice could not be saved")

    with pytest.raises(RuntimeError):
        await idle.queue.transaction(work)
    assert len(made) == 1
    with pytest.raises(JobNotFound):
        await idle.get(made[0])
    assert not held(idle.queue, made[0])
    assert idle.rows() == 0


# -- cancel, retry-failed, rerun, reload ----------------------------------------------------
async def test_cancel_of_a_queued_job_ends_it_and_forgets_it(idle: Harness) -> None:
    job = await idle.enqueue()
    cancelled = await idle.queue.cancel(job.id)
    assert cancelled.status == S.cancelled
    assert cancelled.error == "cancelled by request"
    assert cancelled.attempt_history == []
    assert not held(idle.queue, job.id)


async def test_cancel_of_a_scheduled_job_stops_its_timer(idle: Harness) -> None:
    job = await idle.enqueue(delay_seconds=10)
    await idle.queue.cancel(job.id)
    assert idle.queue.timers == 0
    assert (await idle.get(job.id)).status == S.cancelled


async def test_cancel_of_a_finished_job_is_an_illegal_transition(
    idle: Harness, clock: ManualClock
) -> None:
    job = await fail_job(idle, await idle.enqueue(), clock)
    with pytest.raises(IllegalTransition) as caught:
        await idle.queue.cancel(job.id)
    assert (caught.value.from_status, caught.value.action) == ("failed", "cancel")


@pytest.fixture
async def hooked(harnesses: Harnesses, clock: ManualClock) -> tuple[Harness, Calls]:
    """An idle queue with a task type whose hooks are recorded."""
    calls = Calls()
    h = await harnesses.make(task_type("hooked", noop, hooks=calls.hooks()), clock=clock,
                             start=False)
    return h, calls


async def test_cancelling_a_job_that_is_not_running_calls_on_cancelled_for_it_and_its_dependents(
    hooked: tuple[Harness, Calls],
) -> None:
    h, calls = hooked
    first = await h.enqueue("hooked", delay_seconds=30)
    second = await h.enqueue("hooked", depends_on=[first.id])
    other = await h.enqueue("hooked")
    await h.queue.cancel(first.id)
    assert calls.seen == [("on_cancelled", first.id, S.cancelled),
                          ("on_cancelled", second.id, S.cancelled)]
    await h.queue.cancel(other.id)
    assert calls.seen[-1] == ("on_cancelled", other.id, S.cancelled)


async def test_cancelling_a_job_waiting_for_its_retry_calls_on_cancelled(
    hooked: tuple[Harness, Calls], clock: ManualClock
) -> None:
    """It ran before (its history has that attempt), but it is not running now."""
    h, calls = hooked
    job = await h.enqueue("hooked")
    (row,) = await h.store.claim([job.id], OWNER, clock() + LEASE)
    await h.store.apply(lifecycle.schedule_retry(
        row.id, row.fence, clock() + timedelta(minutes=5), "smtp down", None,
        AttemptOutcome.error, clock()))
    await h.queue.cancel(job.id)
    assert calls.seen == [("on_cancelled", job.id, S.cancelled)]


async def test_cancelling_a_running_job_leaves_its_hook_to_the_process_running_it(
    hooked: tuple[Harness, Calls], clock: ManualClock
) -> None:
    """Its handler may still run: the processor holding it calls on_cancelled once it stops
    (test_processor.py); the cancelling process does not."""
    h, calls = hooked
    job = await h.enqueue("hooked")
    await h.store.claim([job.id], "another-host/1/0/x", clock() + LEASE)
    assert (await h.queue.cancel(job.id)).status == S.cancelled
    assert calls.seen == []


async def test_a_job_enqueued_on_a_failed_dependency_calls_on_cancelled_where_it_was_enqueued(
    hooked: tuple[Harness, Calls], clock: ManualClock
) -> None:
    h, calls = hooked
    gone = await fail_job(h, await h.enqueue("hooked"), clock)
    born = await h.enqueue("hooked", depends_on=[gone.id])
    assert born.status == S.cancelled
    assert calls.seen == [("on_cancelled", born.id, S.cancelled)]

    async def enqueue_in(tx: Tx) -> JobId:
        options = EnqueueOptions(depends_on=[gone.id])
        job_id = (await h.queue.enqueue("hooked", {}, options, tx=tx)).job.id
        assert len(calls.seen) == 1  # not yet: the transaction has not committed
        return job_id

    in_tx = await h.queue.transaction(enqueue_in)
    assert calls.seen[-1] == ("on_cancelled", in_tx, S.cancelled)
    assert len(calls.seen) == 2


async def test_cancel_tells_the_listeners(idle: Harness) -> None:
    told: list[JobId] = []
    idle.queue.on_cancel(told.append)
    job = await idle.enqueue()
    await idle.queue.cancel(job.id)
    assert told == [job.id]


@pytest.fixture
async def failures(idle: Harness, clock: ManualClock) -> dict[str, JobRow]:
    """Failed jobs of two task types at two times, and jobs in other states beside them."""
    t0 = clock()
    early = await fail_job(idle, await idle.enqueue("noop"), clock)
    clock.advance(100)
    late = await fail_job(idle, await idle.enqueue("noop"), clock)
    order = await fail_job(
        idle, await idle.enqueue("order", {"customer_id": 1, "lines": [{"sku": "a", "qty": 1}]}),
        clock,
    )
    queued = await idle.enqueue("noop")
    (running,) = await idle.store.claim([(await idle.enqueue("noop")).id], OWNER, clock() + LEASE)
    clock.advance(1)
    assert t0 < clock()
    return {"early": early, "late": late, "order": order, "queued": queued, "running": running}


@pytest.mark.parametrize(
    ("make_filter", "expected"),
    [
        (lambda jobs, t: FailedFilter(), {"early", "late", "order"}),
        (lambda jobs, t: FailedFilter(ids=[jobs["late"].id, jobs["queued"].id]), {"late"}),
        (lambda jobs, t: FailedFilter(task_type="order"), {"order"}),
        (lambda jobs, t: FailedFilter(failed_after=t + timedelta(seconds=50)), {"late", "order"}),
        (lambda jobs, t: FailedFilter(failed_before=t + timedelta(seconds=50)), {"early"}),
        (lambda jobs, t: FailedFilter(task_type="noop", failed_after=t + timedelta(seconds=50)),
         {"late"}),
    ],
)
async def test_retry_failed_touches_only_failed_jobs_matching_the_filter(
    idle: Harness, clock: ManualClock, failures: dict[str, JobRow],
    make_filter: Any, expected: set[str],
) -> None:
    t0 = failures["early"].finished_at
    assert t0 is not None
    before = {name: await idle.get(job.id) for name, job in failures.items()}
    retried = await idle.queue.retry_failed(make_filter(failures, t0))
    assert set(retried) == {failures[name].id for name in expected}
    for name, job in failures.items():
        now = await idle.get(job.id)
        if name in expected:
            assert (now.status, now.attempts, now.error) == (S.queued, 0, None)
            assert now.attempt_history == before[name].attempt_history
            assert held(idle.queue, job.id)
        else:
            assert now == before[name]


async def test_retry_failed_moves_every_match_in_batches_but_not_a_job_failing_meanwhile(
    idle: Harness, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    failed = [await fail_job(idle, await idle.enqueue("noop"), clock) for _ in range(5)]
    clock.advance(1)
    apply_many = idle.store.apply_many
    batches: list[int] = []

    async def apply_many_then_fail_the_first_again(transitions: Any) -> Any:
        results = await apply_many(transitions)
        batches.append(len(transitions))
        if len(batches) == 1:  # between two batches, a job just retried fails again
            clock.advance(1)
            await fail_job(idle, await idle.get(failed[0].id), clock)
        return results

    monkeypatch.setattr(idle.store, "apply_many", apply_many_then_fail_the_first_again)

    retried = await idle.queue.retry_failed(FailedFilter(), batch=2)

    # once each, the first included: it failed again, but the batches after it start past its
    # id (a call that took it again could go on for as long as jobs keep failing)
    assert sorted(retried) == sorted(job.id for job in failed)
    assert batches == [2, 2, 1]
    assert (await idle.get(failed[0].id)).status == S.failed
    assert [(await idle.get(job.id)).status for job in failed[1:]] == [S.queued] * 4


async def test_rerun_makes_a_new_job_pointing_at_the_old_one(
    idle: Harness, clock: ManualClock
) -> None:
    source = await idle.enqueue("noop", {"label": "again", "n": 4}, priority=3, tags=["t"],
                                context={"by": "me"}, idempotency_key="once")
    source = await fail_job(idle, source, clock)
    rerun = await idle.queue.rerun(source.id)
    assert rerun.id != source.id
    assert rerun.rerun_of == source.id
    assert (rerun.status, rerun.attempts) == (S.queued, 0)
    assert (rerun.payload, rerun.priority, rerun.tags) == (source.payload, 3, ["t"])
    assert rerun.context == {"by": "me"}
    assert rerun.idempotency_key is None
    assert (await idle.get(source.id)).status == S.failed
    assert idle.rows() == 2


@pytest.mark.parametrize("make", ["queued", "scheduled", "running"])
async def test_rerun_of_a_job_that_has_not_ended_is_an_illegal_transition(
    idle: Harness, clock: ManualClock, make: str
) -> None:
    job = await idle.enqueue(delay_seconds=60 if make == "scheduled" else None)
    if make == "running":
        await idle.store.claim([job.id], OWNER, clock() + LEASE)
    with pytest.raises(IllegalTransition) as caught:
        await idle.queue.rerun(job.id)
    assert (caught.value.from_status, caught.value.action) == (make, "rerun")
    assert idle.rows() == 1


async def test_reload_promotes_due_scheduled_rows_and_loads_what_memory_lacks(
    idle: Harness, clock: ManualClock
) -> None:
    far = await idle.enqueue(delay_seconds=TIMER_HORIZON_SECONDS * 2)
    known = await idle.enqueue()
    assert not held(idle.queue, far.id)
    clock.advance(TIMER_HORIZON_SECONDS * 2)
    assert await idle.queue.reload() == 1  # `known` was already in memory
    assert (await idle.get(far.id)).status == S.queued
    assert held(idle.queue, far.id)
    assert held(idle.queue, known.id)


#: a reload window small enough to fill in a test (the scheduler's reload reads 10,000 rows)
WINDOW = 20


async def test_a_limited_backlog_parked_in_memory_does_not_fill_the_reload_window(
    harnesses: Harnesses,
) -> None:
    """After a restart, more queued jobs of a type limited to one at a time than a reload reads:
    the first reload loads them and all but the running one are parked. Later reloads leave
    that type out, so a job of another type further down still reaches memory and runs in a
    free slot; once none is parked, a reload brings the rest of the limited type."""
    gate = Gate()
    ran = asyncio.Event()  # the job of the other type ran

    async def slow(ctx: JobContext, payload: Item) -> None:
        await gate.hold()

    async def quick(ctx: JobContext, payload: Item) -> None:
        ran.set()

    h = await harnesses.make(task_type("limited", slow, concurrency=1), task_type("quick", quick),
                             concurrency=4)
    ready = h.queue.ready
    assert ready is not None
    # rows an earlier process left: written, never offered to this one's memory
    await h.store.insert(h.queue.build_many("limited", [{}] * (WINDOW + 1)))
    (other,) = await h.store.insert([h.queue.build("quick", {})])
    assert await h.queue.reload(limit=WINDOW) == WINDOW
    await gate.entered.wait()
    assert ready.parked == WINDOW - 1
    assert await h.queue.reload(limit=WINDOW) == 1
    assert held(h.queue, other.job.id)
    await asyncio.wait_for(ran.wait(), 5)
    assert gate.inside == 1  # the limited job still runs beside it
    gate.release.set()
    await h.run_until_idle()
    assert (await h.get(other.job.id)).status == S.completed
    assert await h.queue.reload(limit=WINDOW) == 1  # the last limited job, now that none waits
    await h.run_until_idle()
    assert (await h.store.stats()).by_status.get("queued", 0) == 0


async def test_rows_of_task_types_this_process_does_not_know_do_not_fill_the_reload_window(
    idle: Harness,
) -> None:
    """A mixed fleet: another kind of worker's jobs, ahead by priority, are not read."""
    urgent = EnqueueOptions(priority=9)
    theirs = [replace(idle.queue.build("noop", {}, urgent), task_type="elsewhere")
              for _ in range(WINDOW)]
    await idle.store.insert(theirs)
    (mine,) = await idle.store.insert([idle.queue.build("noop", {})])
    assert await idle.queue.reload(limit=WINDOW) == 1
    assert held(idle.queue, mine.job.id)
    assert not any(held(idle.queue, job.id) for job in theirs)


async def test_stats_report_memory_and_database_counts(idle: Harness) -> None:
    await idle.enqueue()
    await idle.enqueue(delay_seconds=5)
    stats = await idle.queue.stats()
    assert stats.in_memory == 1
    assert stats.stats.by_status["queued"] == 1
    assert stats.stats.by_status["scheduled"] == 1

"""The store contract: what every JobStore adapter must do, run against each of them.

The `store` fixture is built from a database URL through `open_store`, so a new adapter joins
by adding a URL: "sqlite" is a migrated file in tmp_path; "postgres" is a fresh database on the
server named by CARWASH_TEST_POSTGRES_URL (skipped while that is unset or open_store has no
PostgreSQL adapter). Tests speak only the JobStore protocol and portable SQL.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from carwash_jobs import lifecycle
from carwash_jobs.errors import (
    IllegalTransition,
    InvalidPayload,
    JobNotFound,
    StaleLease,
    TransactionAborted,
    UnknownDependency,
)
from carwash_jobs.lifecycle import AttemptOutcome, Fence, JobStatus
from carwash_jobs.store import open_store
from carwash_jobs.store.base import Applied, Completion, FailedFilter, JobFilter, NewJob
from carwash_jobs.types import JobId, new_job_id
from tests.carwash_jobs.support import (
    OWNER,
    ManualClock,
    autovacuum_is_on,
    postgres_url,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence
    from datetime import datetime

    from carwash_jobs.store.base import DueJob, JobRow, JobStore, Tx

OTHER_OWNER = "other-host/2/0/b"
LEASE = timedelta(seconds=60)
S = JobStatus


# -- fixtures: one store per adapter (database_url: conftest.py) ---------------------------
@pytest.fixture
async def store(database_url: str, clock: ManualClock) -> AsyncIterator[JobStore]:
    opened = open_store(database_url, owner=OWNER, clock=clock)
    await opened.open()
    yield opened
    await opened.close()


@pytest.fixture
async def other_store(database_url: str, clock: ManualClock) -> AsyncIterator[JobStore]:
    """A second process on the same database."""
    opened = open_store(database_url, owner=OTHER_OWNER, clock=clock)
    await opened.open()
    yield opened
    await opened.close()


# -- helpers --------------------------------------------------------------------------------
def new_job(clock: ManualClock, *, run_at: datetime | None = None, task_type: str = "noop",
            payload: dict[str, Any] | None = None, **fields: Any) -> NewJob:
    return NewJob(
        id=new_job_id(), task_type=task_type, payload=payload or {"n": 1}, status=S.queued,
        run_at=run_at or clock(), created_at=clock(), **fields,
    )


async def add(store: JobStore, clock: ManualClock, **fields: Any) -> JobRow:
    (inserted,) = await store.insert([new_job(clock, **fields)])
    return inserted.job


async def claimed(store: JobStore, clock: ManualClock, owner: str = OWNER, **fields: Any) -> JobRow:
    job = await add(store, clock, **fields)
    (row,) = await store.claim([job.id], owner, clock() + LEASE)
    return row


async def failed(store: JobStore, clock: ManualClock, **fields: Any) -> JobRow:
    row = await claimed(store, clock, **fields)
    transition = lifecycle.fail(row.id, row.fence, "boom", "Traceback", AttemptOutcome.error,
                                clock())
    return (await store.apply(transition)).job


async def complete(store: JobStore, row: JobRow, clock: ManualClock, result: Any = None) -> JobRow:
    return (await store.apply(lifecycle.complete(row.id, row.fence, result, clock()))).job


async def event_names(store: JobStore, job_id: JobId) -> list[str]:
    return [e.event for e in await store.events(job_id)]


def ids(rows: Sequence[JobRow]) -> list[JobId]:
    return [row.id for row in rows]


def ids_of_due(rows: Sequence[DueJob]) -> list[JobId]:
    return [row.id for row in rows]


# -- insert ---------------------------------------------------------------------------------
async def test_insert_commits_a_queued_job_that_reads_back_as_returned(
    store: JobStore, clock: ManualClock
) -> None:
    job = new_job(clock, priority=3, queue="bulk", tags=["a", "b"], context={"by": "admin"},
                  max_attempts=4)
    (inserted,) = await store.insert([job])
    assert inserted.created
    stored = await store.get(job.id)
    assert stored == inserted.job
    assert stored.status == S.queued
    assert (stored.priority, stored.queue, stored.tags) == (3, "bulk", ["a", "b"])
    assert (stored.attempts, stored.max_attempts) == (0, 4)
    assert stored.context == {"by": "admin"}
    assert stored.payload == {"n": 1}
    assert stored.created_at == clock()
    assert stored.attempt_history == []
    assert await event_names(store, job.id) == ["enqueued"]


async def test_insert_with_a_future_run_at_starts_scheduled(
    store: JobStore, clock: ManualClock
) -> None:
    job = await add(store, clock, run_at=clock() + timedelta(minutes=5))
    assert job.status == S.scheduled
    assert (await store.get(job.id)).run_at == clock() + timedelta(minutes=5)


async def test_insert_of_many_jobs_returns_each_in_order(store: JobStore, clock: ManualClock) -> None:
    jobs = [new_job(clock) for _ in range(5)]
    results = await store.insert(jobs)
    assert [r.job.id for r in results] == [j.id for j in jobs]
    assert all(r.created for r in results)
    assert len(await store.get_many([j.id for j in jobs])) == 5


async def test_insert_already_claimed_starts_running_with_attempt_one(
    store: JobStore, clock: ManualClock
) -> None:
    lease_until = clock() + LEASE
    job = await add(store, clock, claimed_by=OWNER, lease_until=lease_until)
    stored = await store.get(job.id)
    assert stored == job
    assert (stored.status, stored.attempts, stored.lease_owner) == (S.running, 1, OWNER)
    assert stored.lease_until == lease_until
    assert stored.started_at == clock()
    assert await event_names(store, job.id) == ["enqueued", "claimed"]
    assert [e.status for e in await store.events(job.id)] == ["queued", "running"]


async def test_an_existing_idempotency_key_returns_that_job_and_writes_no_second_row(
    store: JobStore, clock: ManualClock
) -> None:
    first = await add(store, clock, idempotency_key="cron:nightly:2030-01-01T00:00")
    (again,) = await store.insert([new_job(clock, idempotency_key=first.idempotency_key)])
    assert not again.created
    assert again.job.id == first.id
    page = await store.list_jobs(JobFilter(), limit=10)
    assert ids(page.items) == [first.id]


async def test_an_idempotency_key_repeated_within_one_insert_creates_one_job(
    store: JobStore, clock: ManualClock
) -> None:
    a, b = new_job(clock, idempotency_key="k"), new_job(clock, idempotency_key="k")
    first, second = await store.insert([a, b])
    assert first.created
    assert not second.created
    assert second.job.id == a.id


async def test_an_unknown_dependency_is_rejected_and_nothing_of_the_call_is_written(
    store: JobStore, clock: ManualClock
) -> None:
    good = new_job(clock)
    bad = new_job(clock, depends_on=[JobId("0" * 32)])
    with pytest.raises(UnknownDependency) as caught:
        await store.insert([good, bad])
    assert caught.value.job_id == "0" * 32
    assert (await store.list_jobs(JobFilter(), limit=10)).items == []


async def test_an_insert_with_nan_or_an_infinity_in_a_payload_is_refused_whole(
    store: JobStore, clock: ManualClock
) -> None:
    """JSON has no word for them: PostgreSQL's json type refuses them, and SQLite wrote what
    PostgreSQL refused. Both stores refuse the call and keep none of it, on the path of plain
    jobs and on the one that decides row by row (there the job before it was written first)."""
    for keyed in (False, True):
        for n, value in enumerate((float("nan"), float("inf"), float("-inf"))):
            keys = [f"k{n}a", f"k{n}b"] if keyed else [None, None]
            jobs = [new_job(clock, idempotency_key=keys[0]),
                    new_job(clock, payload={"x": [1.5, value]}, idempotency_key=keys[1])]
            for call in (jobs, jobs[1:]):  # a lone job: PostgreSQL's row-by-row path
                with pytest.raises(ValueError, match="not JSON compliant"):
                    await store.insert(call)
    assert (await store.list_jobs(JobFilter(), limit=10)).items == []


async def test_a_checkpoint_or_a_result_holding_nan_is_refused_and_changes_nothing(
    store: JobStore, clock: ManualClock
) -> None:
    """The same error on both stores (PostgreSQL's driver reports its encoder's refusal as an
    error of the statement): a handler sees it from save_checkpoint."""
    row = await claimed(store, clock)
    assert await store.save_progress(row.id, row.fence, done=1, checkpoint={"mean": 2.5})

    with pytest.raises(ValueError, match="not JSON compliant"):
        await store.save_progress(row.id, row.fence, done=2, checkpoint={"mean": float("nan")})
    with pytest.raises(ValueError, match="not JSON compliant"):
        await complete(store, row, clock, result={"mean": float("inf")})

    after = await store.get(row.id)
    assert (after.status, after.progress_done, after.checkpoint) == (S.running, 1, {"mean": 2.5})


async def test_a_completion_batch_with_a_nan_result_is_refused_whole(
    store: JobStore, clock: ManualClock
) -> None:
    """The processor checks each result before it joins a batch (a NaN fails its own job);
    the store refuses a batch that holds one before it writes any of it."""
    jobs = [await claimed(store, clock) for _ in range(2)]
    with pytest.raises(ValueError, match="not JSON compliant"):
        await store.complete_many([Completion(jobs[0].id, jobs[0].fence, 1),
                                   Completion(jobs[1].id, jobs[1].fence, {"avg": float("nan")})])
    assert [row.status for row in await store.get_many([j.id for j in jobs])] == [S.running] * 2


async def test_a_job_with_unfinished_dependencies_waits(store: JobStore, clock: ManualClock) -> None:
    a = await add(store, clock)
    c = await add(store, clock, depends_on=[a.id])
    assert c.status == S.waiting
    assert (await store.get(c.id)).depends_on == [a.id]
    assert ids_of_due(await store.due(clock(), 10)) == [a.id]


async def test_a_job_whose_dependencies_already_completed_starts_queued(
    store: JobStore, clock: ManualClock
) -> None:
    a = await complete(store, await claimed(store, clock), clock)
    c = await add(store, clock, depends_on=[a.id])
    assert c.status == S.queued


async def test_a_job_whose_dependency_already_failed_starts_cancelled_naming_it(
    store: JobStore, clock: ManualClock
) -> None:
    a = await failed(store, clock)
    c = await add(store, clock, depends_on=[a.id])
    stored = await store.get(c.id)
    assert stored == c
    assert stored.status == S.cancelled
    assert stored.error == f"dependency {a.id} ended failed"
    assert stored.finished_at == clock()


# -- claim ----------------------------------------------------------------------------------
async def test_claim_moves_a_due_job_to_running_with_a_lease(
    store: JobStore, clock: ManualClock
) -> None:
    job = await add(store, clock)
    clock.advance(3)
    (row,) = await store.claim([job.id], OWNER, clock() + LEASE)
    assert row == await store.get(job.id)
    assert row.status == S.running
    assert row.attempts == 1
    assert row.lease_owner == OWNER
    assert row.lease_until == clock() + LEASE
    assert row.started_at == clock()
    assert row.fence == Fence(1, OWNER)
    assert await event_names(store, job.id) == ["enqueued", "claimed"]


async def test_claim_leaves_out_jobs_that_are_not_due_or_not_claimable(
    store: JobStore, clock: ManualClock
) -> None:
    later = await add(store, clock, run_at=clock() + timedelta(seconds=30))
    dependency = await add(store, clock)
    waiting = await add(store, clock, depends_on=[dependency.id])
    running = await claimed(store, clock)
    done = await complete(store, await claimed(store, clock), clock)
    rows = await store.claim([later.id, waiting.id, running.id, done.id, JobId("nope")],
                             OWNER, clock() + LEASE)
    assert rows == []
    assert (await store.get(running.id)).attempts == 1


async def test_a_scheduled_job_whose_run_at_passed_can_be_claimed_by_id(
    store: JobStore, clock: ManualClock
) -> None:
    job = await add(store, clock, run_at=clock() + timedelta(seconds=30))
    clock.advance(30)
    (row,) = await store.claim([job.id], OWNER, clock() + LEASE)
    assert row.status == S.running


async def test_concurrent_claims_from_two_processes_give_each_job_one_winner(
    store: JobStore, other_store: JobStore, clock: ManualClock
) -> None:
    results = await store.insert([new_job(clock) for _ in range(30)])
    job_ids = [r.job.id for r in results]
    mine, theirs = await asyncio.gather(
        store.claim(job_ids, OWNER, clock() + LEASE),
        other_store.claim(list(reversed(job_ids)), OTHER_OWNER, clock() + LEASE),
    )
    won = ids(mine) + ids(theirs)
    assert sorted(won) == sorted(job_ids)
    for row in await store.get_many(job_ids):
        assert row.attempts == 1
        assert row.lease_owner == (OWNER if row.id in ids(mine) else OTHER_OWNER)


async def test_claim_due_takes_by_priority_then_age_up_to_the_limit(
    store: JobStore, clock: ManualClock
) -> None:
    old_low = await add(store, clock, priority=0)
    clock.advance(1)
    high = await add(store, clock, priority=5)
    clock.advance(1)
    young_low = await add(store, clock, priority=0)
    await add(store, clock, run_at=clock() + timedelta(hours=1), priority=9)
    rows = await store.claim_due(2, OWNER, clock() + LEASE)
    # RETURNING gives no order: the choice is what the limit and the order decide
    assert sorted(ids(rows)) == sorted([high.id, old_low.id])
    rest = await store.claim_due(10, OWNER, clock() + LEASE)
    assert ids(rest) == [young_low.id]


async def test_claim_due_can_be_limited_to_named_queues(store: JobStore, clock: ManualClock) -> None:
    await add(store, clock, queue="bulk")
    critical = await add(store, clock, queue="critical")
    rows = await store.claim_due(10, OWNER, clock() + LEASE, queues=["critical"])
    assert ids(rows) == [critical.id]


# -- apply: outcomes of an attempt ----------------------------------------------------------
async def test_complete_with_the_current_fence_keeps_result_and_history(
    store: JobStore, clock: ManualClock
) -> None:
    row = await claimed(store, clock)
    clock.advance(2)
    applied = await store.apply(lifecycle.complete(row.id, row.fence, {"sent": 2}, clock()))
    job = applied.job
    assert job == await store.get(row.id)
    assert job.status == S.completed
    assert job.result == {"sent": 2}
    assert job.finished_at == clock()
    assert (job.lease_owner, job.lease_until) == (None, None)
    assert [(h["attempt"], h["outcome"], h["owner"]) for h in job.attempt_history] == [
        (1, "completed", OWNER)
    ]
    assert await event_names(store, row.id) == ["enqueued", "claimed", "completed"]


async def test_a_worker_that_lost_its_lease_cannot_overwrite_the_newer_attempt(
    store: JobStore, other_store: JobStore, clock: ManualClock
) -> None:
    first = await claimed(store, clock)
    clock.advance(61)
    (expired,) = await store.expired_leases(clock(), 10)
    await store.apply(lifecycle.release_expired_lease(
        expired.id, expired.fence, expired.attempts, expired.max_attempts, clock()))
    (second,) = await other_store.claim([first.id], OTHER_OWNER, clock() + LEASE)
    assert second.fence == Fence(2, OTHER_OWNER)

    for late in (
        lifecycle.complete(first.id, first.fence, "stale", clock()),
        lifecycle.fail(first.id, first.fence, "stale", None, AttemptOutcome.error, clock()),
        lifecycle.release(first.id, first.fence, clock()),
    ):
        with pytest.raises(StaleLease) as caught:
            await store.apply(late)
        assert caught.value.from_status == "running"
    assert not await store.save_progress(first.id, first.fence, done=5)
    assert await store.get(first.id) == second

    done = await complete(other_store, second, clock, "fresh")
    assert done.result == "fresh"
    assert [(h["attempt"], h["outcome"]) for h in done.attempt_history] == [
        (1, "worker_lost"), (2, "completed")
    ]


async def test_a_fence_with_the_right_attempt_but_another_owner_is_stale(
    store: JobStore, clock: ManualClock
) -> None:
    row = await claimed(store, clock)
    with pytest.raises(StaleLease):
        await store.apply(lifecycle.complete(row.id, Fence(1, OTHER_OWNER), None, clock()))


async def test_an_illegal_transition_is_refused_naming_the_status_and_the_action(
    store: JobStore, clock: ManualClock
) -> None:
    job = await add(store, clock)
    with pytest.raises(IllegalTransition) as caught:
        await store.apply(lifecycle.complete(job.id, Fence(0, ""), None, clock()))
    assert type(caught.value) is IllegalTransition
    assert (caught.value.from_status, caught.value.action) == ("queued", "complete")
    assert await store.get(job.id) == job

    done = await complete(store, await claimed(store, clock), clock)
    with pytest.raises(IllegalTransition) as cancelling:
        await store.apply(lifecycle.cancel(done.id, clock()))
    assert (cancelling.value.from_status, cancelling.value.action) == ("completed", "cancel")


async def test_a_transition_of_an_unknown_job_raises_job_not_found(
    store: JobStore, clock: ManualClock
) -> None:
    with pytest.raises(JobNotFound):
        await store.apply(lifecycle.cancel(JobId("f" * 32), clock()))


async def test_schedule_retry_keeps_the_attempt_error_and_run_at(
    store: JobStore, clock: ManualClock
) -> None:
    row = await claimed(store, clock)
    run_at = clock() + timedelta(seconds=4)
    job = (await store.apply(lifecycle.schedule_retry(
        row.id, row.fence, run_at, "ValueError: x", "Traceback...", AttemptOutcome.error, clock()
    ))).job
    assert (job.status, job.attempts, job.run_at) == (S.scheduled, 1, run_at)
    assert (job.error, job.error_traceback) == ("ValueError: x", "Traceback...")
    assert job.lease_owner is None
    assert [(h["outcome"], h["error"]) for h in job.attempt_history] == [("error", "ValueError: x")]


async def test_a_throttled_retry_gives_the_attempt_back(store: JobStore, clock: ManualClock) -> None:
    row = await claimed(store, clock)
    job = (await store.apply(lifecycle.schedule_retry(
        row.id, row.fence, clock(), "rate limit", None, AttemptOutcome.throttled, clock(),
        count_attempt=False,
    ))).job
    assert job.attempts == 0
    assert job.attempt_history[-1]["outcome"] == "throttled"


async def test_fail_keeps_the_error_and_traceback(store: JobStore, clock: ManualClock) -> None:
    job = await failed(store, clock)
    assert job.status == S.failed
    assert (job.error, job.error_traceback) == ("boom", "Traceback")
    assert job.finished_at == clock()


async def test_cancelling_a_queued_job_records_no_attempt(store: JobStore, clock: ManualClock) -> None:
    job = await add(store, clock)
    cancelled = (await store.apply(lifecycle.cancel(job.id, clock(), "not needed"))).job
    assert cancelled.status == S.cancelled
    assert cancelled.error == "not needed"
    assert cancelled.finished_at == clock()
    assert cancelled.attempt_history == []


async def test_cancelling_a_running_job_records_its_attempt_and_refuses_its_late_outcome(
    store: JobStore, clock: ManualClock
) -> None:
    row = await claimed(store, clock)
    cancelled = (await store.apply(lifecycle.cancel(row.id, clock()))).job
    assert cancelled.status == S.cancelled
    assert (cancelled.lease_owner, cancelled.lease_until) == (None, None)
    assert [(h["attempt"], h["outcome"], h["owner"]) for h in cancelled.attempt_history] == [
        (1, "cancelled", OWNER)
    ]
    with pytest.raises(IllegalTransition) as caught:
        await store.apply(lifecycle.complete(row.id, row.fence, "late", clock()))
    assert caught.value.from_status == "cancelled"
    assert not await store.save_progress(row.id, row.fence, done=1)
    assert (await store.get(row.id)).result is None


async def test_retry_failed_resets_attempts_and_keeps_the_history(
    store: JobStore, clock: ManualClock
) -> None:
    job = await failed(store, clock, max_attempts=1)
    clock.advance(10)
    retried = (await store.apply(lifecycle.retry_failed(job.id, clock()))).job
    assert (retried.status, retried.attempts, retried.run_at) == (S.queued, 0, clock())
    assert (retried.error, retried.finished_at) == (None, None)
    assert len(retried.attempt_history) == 1
    (again,) = await store.claim([job.id], OWNER, clock() + LEASE)
    assert again.attempts == 1


async def test_an_expired_lease_goes_back_to_queued_counting_the_attempt(
    store: JobStore, clock: ManualClock
) -> None:
    row = await claimed(store, clock, max_attempts=2)
    clock.advance(30)
    assert await store.expired_leases(clock(), 10) == []
    clock.advance(31)
    (expired,) = await store.expired_leases(clock(), 10)
    assert expired.id == row.id
    job = (await store.apply(lifecycle.release_expired_lease(
        row.id, expired.fence, expired.attempts, expired.max_attempts, clock()))).job
    assert (job.status, job.attempts, job.lease_owner) == (S.queued, 1, None)
    assert job.attempt_history[-1]["outcome"] == "worker_lost"
    assert ids_of_due(await store.due(clock(), 10)) == [row.id]


async def test_an_expired_lease_on_the_last_attempt_fails_the_job(
    store: JobStore, clock: ManualClock
) -> None:
    row = await claimed(store, clock, max_attempts=1)
    clock.advance(61)
    job = (await store.apply(lifecycle.release_expired_lease(
        row.id, row.fence, row.attempts, row.max_attempts, clock()))).job
    assert (job.status, job.attempts) == (S.failed, 1)
    assert OWNER in (job.error or "")
    assert job.finished_at == clock()


@pytest.mark.parametrize("max_attempts", [1, 2])
async def test_a_lease_its_owner_renewed_after_the_expiry_scan_is_not_taken_away(
    store: JobStore, other_store: JobStore, clock: ManualClock, max_attempts: int
) -> None:
    row = await claimed(store, clock, max_attempts=max_attempts)
    clock.advance(61)
    (expired,) = await other_store.expired_leases(clock(), 10)  # the recovery reads...
    renewed_until = clock() + LEASE
    assert await store.extend_leases(OWNER, [row.id], renewed_until) == {row.id}  # ...the owner renews
    with pytest.raises(StaleLease):  # ...and the recovery's write must see the renewal
        await other_store.apply(lifecycle.release_expired_lease(
            row.id, expired.fence, expired.attempts, expired.max_attempts, clock()))
    job = await store.get(row.id)
    assert (job.status, job.attempts, job.lease_owner) == (S.running, 1, OWNER)
    assert job.lease_until == renewed_until
    assert job.attempt_history == []
    (refused,) = await other_store.apply_many([lifecycle.release_expired_lease(  # the scheduler's way
        row.id, expired.fence, expired.attempts, expired.max_attempts, clock())])
    assert isinstance(refused, StaleLease)
    assert (await store.get(row.id)).status == S.running


async def test_release_at_shutdown_gives_the_attempt_back(store: JobStore, clock: ManualClock) -> None:
    row = await claimed(store, clock)
    job = (await store.apply(lifecycle.release(row.id, row.fence, clock()))).job
    assert (job.status, job.attempts, job.lease_owner) == (S.queued, 0, None)
    assert job.attempt_history[-1]["outcome"] == "released"


# -- apply: dependencies --------------------------------------------------------------------
async def test_fan_in_waits_until_every_dependency_completed(
    store: JobStore, clock: ManualClock
) -> None:
    a = await claimed(store, clock)
    b = await claimed(store, clock)
    c = await add(store, clock, depends_on=[a.id, b.id])
    first = await store.apply(lifecycle.complete(a.id, a.fence, None, clock()))
    assert first.woken == []
    assert (await store.get(c.id)).status == S.waiting
    second = await store.apply(lifecycle.complete(b.id, b.fence, None, clock()))
    assert ids(second.woken) == [c.id]
    assert second.woken[0].status == S.queued
    assert await event_names(store, c.id) == ["enqueued", "dependencies_met"]


async def test_a_delayed_dependent_whose_dependency_completes_is_scheduled_for_its_run_at(
    store: JobStore, clock: ManualClock
) -> None:
    """Freed before its time, it waits as `scheduled` (promoted when due), as a job without
    dependencies would; not `queued`, which says it is due now."""
    dependency = await claimed(store, clock)
    later = clock() + timedelta(hours=1)
    dependent = await add(store, clock, depends_on=[dependency.id], run_at=later)
    done = await store.apply(lifecycle.complete(dependency.id, dependency.fence, None, clock()))
    (freed,) = done.woken
    assert (freed.id, freed.status, freed.run_at) == (dependent.id, S.scheduled, later)
    assert await store.promote_due(clock()) == 0
    clock.advance(3600)
    assert await store.promote_due(clock()) == 1
    assert (await store.get(dependent.id)).status == S.queued


async def test_a_failed_dependency_cancels_its_dependents_in_cascade_naming_the_culprit(
    store: JobStore, clock: ManualClock
) -> None:
    a = await claimed(store, clock)
    unrelated = await add(store, clock)
    c = await add(store, clock, depends_on=[a.id])
    d = await add(store, clock, depends_on=[c.id, unrelated.id])
    failed = await store.apply(
        lifecycle.fail(a.id, a.fence, "boom", None, AttemptOutcome.error, clock()))
    c_row, d_row = await store.get(c.id), await store.get(d.id)
    assert (c_row.status, c_row.error) == (S.cancelled, f"dependency {a.id} ended failed")
    assert (d_row.status, d_row.error) == (S.cancelled, f"dependency {c.id} ended cancelled")
    assert (await store.get(unrelated.id)).status == S.queued
    # every job the failure ended, as stored, for their on_cancelled hooks
    assert sorted(failed.cancelled, key=lambda j: j.id) == [c_row, d_row]
    assert failed.woken == []


@pytest.mark.parametrize("end", ["fail", "cancel"])
async def test_a_cascade_reaching_a_job_twice_cancels_it_once(
    store: JobStore, clock: ManualClock, end: str
) -> None:
    # D waits on A and on C, and C waits on A: A's end reaches D directly and through C
    a = await claimed(store, clock)
    c = await add(store, clock, depends_on=[a.id])
    d = await add(store, clock, depends_on=[a.id, c.id])
    if end == "fail":
        ended = await store.apply(
            lifecycle.fail(a.id, a.fence, "boom", None, AttemptOutcome.error, clock()))
    else:
        ended = await store.apply(lifecycle.cancel(a.id, clock()))
    assert ended.job.status == (S.failed if end == "fail" else S.cancelled)
    c_row, d_row = await store.get(c.id), await store.get(d.id)
    assert c_row.status == S.cancelled
    assert d_row.status == S.cancelled
    assert d_row.error in (f"dependency {a.id} ended {ended.job.status.value}",
                           f"dependency {c.id} ended cancelled")
    assert await event_names(store, d.id) == ["enqueued", "cancelled"]
    assert sorted(ids(ended.cancelled)) == sorted([c.id, d.id])  # d once


async def test_cancelling_a_job_cancels_the_jobs_waiting_on_it(
    store: JobStore, clock: ManualClock
) -> None:
    a = await add(store, clock)
    c = await add(store, clock, depends_on=[a.id])
    cancelled = await store.apply(lifecycle.cancel(a.id, clock()))
    assert (await store.get(c.id)).error == f"dependency {a.id} ended cancelled"
    assert cancelled.cancelled == [await store.get(c.id)]


async def test_a_completion_cancels_nothing(store: JobStore, clock: ManualClock) -> None:
    a = await claimed(store, clock)
    c = await add(store, clock, depends_on=[a.id])
    completed = await store.apply(lifecycle.complete(a.id, a.fence, None, clock()))
    assert (ids(completed.woken), completed.cancelled) == ([c.id], [])


# -- apply: in one transaction with the caller's writes and follow-ups -----------------------
async def _make_table(store: JobStore) -> None:
    async def create(tx: Tx) -> None:
        await tx.execute("CREATE TABLE grants (job_id VARCHAR(32) PRIMARY KEY, amount INTEGER)")

    await store.transaction(create)


async def _grants(store: JobStore) -> list[dict[str, Any]]:
    async def read(tx: Tx) -> list[dict[str, Any]]:
        return await tx.fetch("SELECT job_id, amount FROM grants ORDER BY job_id")

    return await store.transaction(read)


async def test_before_writes_commit_together_with_the_transition(
    store: JobStore, clock: ManualClock
) -> None:
    await _make_table(store)
    row = await claimed(store, clock)

    async def grant(tx: Tx) -> None:
        await tx.execute("INSERT INTO grants (job_id, amount) VALUES (:id, :amount)",
                         {"id": row.id, "amount": 10})

    applied = await store.apply(lifecycle.complete(row.id, row.fence, None, clock()), before=grant)
    assert applied.job.status == S.completed
    assert await _grants(store) == [{"job_id": row.id, "amount": 10}]


async def test_a_refused_transition_rolls_back_the_before_writes(
    store: JobStore, clock: ManualClock
) -> None:
    await _make_table(store)
    row = await claimed(store, clock)
    await store.apply(lifecycle.cancel(row.id, clock()))

    async def grant(tx: Tx) -> None:
        await tx.execute("INSERT INTO grants (job_id, amount) VALUES (:id, 10)", {"id": row.id})

    with pytest.raises(IllegalTransition):
        await store.apply(lifecycle.complete(row.id, row.fence, None, clock()), before=grant)
    assert await _grants(store) == []


async def test_a_failing_before_leaves_the_job_as_it_was(store: JobStore, clock: ManualClock) -> None:
    row = await claimed(store, clock)

    async def broken(tx: Tx) -> None:
        raise RuntimeError("domain write failed")

    with pytest.raises(RuntimeError, match="domain write failed"):
        await store.apply(lifecycle.complete(row.id, row.fence, None, clock()), before=broken)
    assert await store.get(row.id) == row


async def test_follow_ups_are_inserted_with_the_completion_and_returned_as_woken(
    store: JobStore, clock: ManualClock
) -> None:
    row = await claimed(store, clock)
    follow_up = new_job(clock, task_type="order")
    applied = await store.apply(lifecycle.complete(row.id, row.fence, None, clock()),
                                follow_ups=[follow_up])
    assert ids(applied.woken) == [follow_up.id]
    assert (await store.get(follow_up.id)).status == S.queued
    assert applied.cancelled == []


async def test_a_follow_up_born_cancelled_is_returned_as_cancelled_not_woken(
    store: JobStore, clock: ManualClock
) -> None:
    gone = await failed(store, clock)
    row = await claimed(store, clock)
    follow_up = new_job(clock, depends_on=(gone.id,))
    applied = await store.apply(lifecycle.complete(row.id, row.fence, None, clock()),
                                follow_ups=[follow_up])
    assert applied.woken == []
    assert ids(applied.cancelled) == [follow_up.id]
    assert applied.cancelled[0].status == S.cancelled


async def test_follow_ups_of_a_refused_completion_never_exist(
    store: JobStore, clock: ManualClock
) -> None:
    row = await claimed(store, clock)
    await store.apply(lifecycle.cancel(row.id, clock()))
    follow_up = new_job(clock)
    with pytest.raises(IllegalTransition):
        await store.apply(lifecycle.complete(row.id, row.fence, None, clock()),
                          follow_ups=[follow_up])
    with pytest.raises(JobNotFound):
        await store.get(follow_up.id)


async def test_apply_many_applies_each_transition_alone(store: JobStore, clock: ManualClock) -> None:
    queued = await add(store, clock)
    done = await complete(store, await claimed(store, clock), clock)
    another = await add(store, clock)
    results = await store.apply_many([
        lifecycle.cancel(queued.id, clock()),
        lifecycle.cancel(done.id, clock()),
        lifecycle.cancel(JobId("e" * 32), clock()),
        lifecycle.cancel(another.id, clock()),
    ])
    assert [type(r).__name__ for r in results] == [
        "Applied", "IllegalTransition", "JobNotFound", "Applied"
    ]
    assert (await store.get(queued.id)).status == S.cancelled
    assert (await store.get(another.id)).status == S.cancelled
    assert (await store.get(done.id)).status == S.completed


async def test_apply_many_writes_a_batch_of_one_change_as_apply_writes_each(
    store: JobStore, clock: ManualClock
) -> None:
    """A bulk retry's batch: transitions that differ by their job only go by one statement
    (`alike`), with what `apply` writes for each job, each refusal explained as `apply` would."""
    one = await failed(store, clock, max_attempts=1)
    two = await failed(store, clock, max_attempts=1)
    queued = await add(store, clock)
    clock.advance(10)

    results = await store.apply_many([
        lifecycle.retry_failed(i, clock()) for i in (two.id, queued.id, JobId("e" * 32), one.id)
    ])

    assert [type(r).__name__ for r in results] == [
        "Applied", "IllegalTransition", "JobNotFound", "Applied"
    ]
    for result, job in ((results[0], two), (results[3], one)):
        assert isinstance(result, Applied)
        retried = result.job
        assert (retried.id, retried.status, retried.attempts, retried.run_at) == (
            job.id, S.queued, 0, clock())
        assert (retried.error, retried.error_traceback, retried.finished_at) == (None, None, None)
        assert retried.attempt_history == job.attempt_history
        assert await store.get(job.id) == retried
        event = (await store.events(job.id))[-1]
        assert (event.event, event.status, event.attempt, event.process, event.message) == (
            "retried", "queued", 0, OWNER, "retried by request: attempts reset")
    assert str(results[1]) == str(IllegalTransition(queued.id, "queued", "retry"))
    assert set(ids_of_due(await store.due(clock(), 10))) == {one.id, two.id, queued.id}
    assert (await store.stats()).by_status[S.failed] == 0  # the counts of finished jobs follow


# -- progress and leases --------------------------------------------------------------------
async def test_save_progress_records_progress_and_checkpoint_for_the_current_attempt(
    store: JobStore, clock: ManualClock
) -> None:
    row = await claimed(store, clock)
    assert await store.save_progress(row.id, row.fence, done=3, total=10,
                                     checkpoint={"cursor": 3})
    assert await store.save_progress(row.id, row.fence, done=4)
    job = await store.get(row.id)
    assert (job.progress_done, job.progress_total) == (4, None)
    assert job.checkpoint == {"cursor": 3}
    assert await store.save_progress(row.id, row.fence, checkpoint={"cursor": 9})
    job = await store.get(row.id)
    assert (job.progress_done, job.checkpoint) == (4, {"cursor": 9})


async def test_save_progress_with_a_stale_fence_writes_nothing(
    store: JobStore, clock: ManualClock
) -> None:
    row = await claimed(store, clock)
    assert not await store.save_progress(row.id, Fence(1, OTHER_OWNER), done=1,
                                         checkpoint={"x": 1})
    job = await store.get(row.id)
    assert (job.progress_done, job.checkpoint) == (0, None)


async def test_extend_leases_extends_only_what_the_owner_still_holds(
    store: JobStore, other_store: JobStore, clock: ManualClock
) -> None:
    mine = await claimed(store, clock)
    theirs = await claimed(other_store, clock, owner=OTHER_OWNER)
    queued = await add(store, clock)
    new_until = clock() + timedelta(minutes=5)
    held = await store.extend_leases(OWNER, [mine.id, theirs.id, queued.id], new_until)
    assert held == {mine.id}
    assert (await store.get(mine.id)).lease_until == new_until
    assert (await store.get(theirs.id)).lease_until == theirs.lease_until
    assert await store.extend_leases(OWNER, [], new_until) == set()


async def test_promote_due_moves_scheduled_jobs_whose_time_came_to_queued(
    store: JobStore, clock: ManualClock
) -> None:
    soon = await add(store, clock, run_at=clock() + timedelta(seconds=10))
    later = await add(store, clock, run_at=clock() + timedelta(seconds=100))
    clock.advance(10)
    assert await store.promote_due(clock()) == 1
    assert (await store.get(soon.id)).status == S.queued
    assert (await store.get(later.id)).status == S.scheduled
    assert await event_names(store, soon.id) == ["enqueued", "due"]


async def test_running_owners_and_the_jobs_they_hold(
    store: JobStore, other_store: JobStore, clock: ManualClock
) -> None:
    mine = await claimed(store, clock)
    theirs = await claimed(other_store, clock, owner=OTHER_OWNER)
    await add(store, clock)
    assert sorted(await store.running_owners()) == sorted([OWNER, OTHER_OWNER])
    assert ids(await store.running_owned_by([OTHER_OWNER])) == [theirs.id]
    assert ids(await store.running_owned_by([OWNER])) == [mine.id]
    assert await store.running_owned_by([]) == []


# -- the caller's own transaction -----------------------------------------------------------
async def test_transaction_commits_when_the_function_returns(store: JobStore) -> None:
    await _make_table(store)

    async def write(tx: Tx) -> int:
        assert tx.dialect == store.dialect
        await tx.executemany("INSERT INTO grants (job_id, amount) VALUES (:id, :amount)",
                             [{"id": "a", "amount": 1}, {"id": "b", "amount": 2}])
        return await tx.execute("UPDATE grants SET amount = amount + 1")

    assert await store.transaction(write) == 2
    assert await _grants(store) == [{"job_id": "a", "amount": 2}, {"job_id": "b", "amount": 3}]


async def test_a_write_naming_a_row_that_is_not_there_fails_on_both_stores(
    store: JobStore,
) -> None:
    """Foreign keys hold on SQLite too: a credit for a customer deleted meanwhile failed its
    completion on PostgreSQL and was written on SQLite, against no customer."""

    async def credit_nobody(tx: Tx) -> None:
        await tx.execute(
            "INSERT INTO credit_ledger (job_id, customer_id, amount_cents, reason, created_at) "
            "VALUES ('j', 999, 5, 'x', '2030-01-01 00:00:00')"
        )

    with pytest.raises(Exception, match=r"(?i)foreign key"):
        await store.transaction(credit_nobody)


async def test_transaction_rolls_back_everything_when_the_function_raises(
    store: JobStore, clock: ManualClock
) -> None:
    await _make_table(store)
    job = new_job(clock)

    async def write(tx: Tx) -> None:
        await tx.execute("INSERT INTO grants (job_id, amount) VALUES ('a', 1)")
        await store.insert([job], tx=tx)
        raise RuntimeError("changed my mind")

    with pytest.raises(RuntimeError):
        await store.transaction(write)
    assert await _grants(store) == []
    with pytest.raises(JobNotFound):
        await store.get(job.id)


async def test_a_cancel_raised_inside_a_transaction_is_an_error_and_rolls_it_back(
    store: JobStore,
) -> None:
    """The function awaited a task that was cancelled. Told as a cancel, it stopped SQLite's
    writer for good, and the processor's record of a completion ended unrecorded."""
    await _make_table(store)

    async def write(tx: Tx) -> None:
        await tx.execute("INSERT INTO grants (job_id, amount) VALUES ('a', 1)")
        inner = asyncio.ensure_future(asyncio.sleep(10))
        inner.cancel()
        await inner

    with pytest.raises(RuntimeError, match="cancelled inside"):
        await store.transaction(write)
    assert await _grants(store) == []
    assert await store.transaction(lambda tx: tx.execute("DELETE FROM grants")) == 0


async def test_a_failed_statement_fails_the_transaction_even_when_the_function_goes_on(
    store: JobStore, clock: ManualClock
) -> None:
    """PostgreSQL aborts the whole transaction at a failed statement and answers its COMMIT
    with a silent ROLLBACK: the function that caught the error was once told its writes were
    committed, and they were not. SQLite alone would keep the other writes. Both now refuse."""
    await _make_table(store)
    job = new_job(clock)

    async def write(tx: Tx) -> str:
        await tx.execute("INSERT INTO grants (job_id, amount) VALUES ('a', 1)")
        await store.insert([job], tx=tx)
        with contextlib.suppress(Exception):  # "it was only a best effort"
            await tx.execute("INSERT INTO no_such_table (x) VALUES (1)")
        return "done"

    with pytest.raises(TransactionAborted, match="no_such_table") as caught:
        await store.transaction(write)
    assert "none of it was committed" in caught.value.message
    assert await _grants(store) == []
    with pytest.raises(JobNotFound):
        await store.get(job.id)
    assert await store.transaction(lambda tx: tx.execute("DELETE FROM grants")) == 0


async def test_a_statement_cut_off_by_a_timeout_fails_the_transaction_even_if_caught(
    store: JobStore,
) -> None:
    """PostgreSQL's server aborts a statement the client cancels, and the transaction with
    it; the COMMIT was then a silent ROLLBACK, and the function that caught its TimeoutError
    was told "done". SQLite's writer finishes the statement; it is made to agree."""
    await _make_table(store)
    slow = ("SELECT pg_sleep(1)" if store.dialect == "postgresql" else
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 3000000) "
            "SELECT count(*) FROM c")

    async def write(tx: Tx) -> str:
        await tx.execute("INSERT INTO grants (job_id, amount) VALUES ('a', 1)")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.05):
                await tx.fetch(slow)
        return "done"

    with pytest.raises(TransactionAborted, match="CancelledError"):
        await store.transaction(write)
    assert await _grants(store) == []


async def test_a_failed_statement_of_an_on_complete_write_fails_the_completion(
    store: JobStore, clock: ManualClock
) -> None:
    await _make_table(store)
    job = await claimed(store, clock)

    async def before(tx: Tx) -> None:
        await tx.execute("INSERT INTO grants (job_id, amount) VALUES ('a', 1)")
        with contextlib.suppress(Exception):
            await tx.execute("INSERT INTO no_such_table (x) VALUES (1)")

    with pytest.raises(TransactionAborted):
        await store.apply(lifecycle.complete(job.id, job.fence, None, clock()), before=before)
    assert await _grants(store) == []
    assert (await store.get(job.id)).status == S.running


async def test_an_insert_joined_to_a_transaction_commits_with_it(
    store: JobStore, clock: ManualClock
) -> None:
    job = new_job(clock)

    async def write(tx: Tx) -> bool:
        (inserted,) = await store.insert([job], tx=tx)
        return inserted.created

    assert await store.transaction(write)
    assert (await store.get(job.id)).status == S.queued


# -- reads ----------------------------------------------------------------------------------
async def test_get_of_an_unknown_id_raises_job_not_found(store: JobStore) -> None:
    with pytest.raises(JobNotFound) as caught:
        await store.get(JobId("nope"))
    assert caught.value.job_id == "nope"
    assert await store.get_many([]) == []


async def test_list_jobs_is_newest_first_and_pages_with_a_cursor(
    store: JobStore, clock: ManualClock
) -> None:
    made = [await add(store, clock) for _ in range(5)]
    first = await store.list_jobs(JobFilter(), limit=2)
    assert ids(first.items) == [made[4].id, made[3].id]
    second = await store.list_jobs(JobFilter(), limit=2, cursor=first.next_cursor)
    assert ids(second.items) == [made[2].id, made[1].id]
    last = await store.list_jobs(JobFilter(), limit=2, cursor=second.next_cursor)
    assert ids(last.items) == [made[0].id]
    assert last.next_cursor is None


async def test_list_jobs_filters_by_each_field(store: JobStore, clock: ManualClock) -> None:
    t0 = clock()
    plain = await add(store, clock)
    clock.advance(10)
    tagged = await add(store, clock, tags=["vip", "spring"], queue="bulk", task_type="order")
    done = await complete(store, await claimed(store, clock), clock)

    async def listed(**fields: Any) -> set[JobId]:
        return set(ids((await store.list_jobs(JobFilter(**fields), limit=50)).items))

    assert await listed(status=S.completed) == {done.id}
    assert await listed(task_type="order") == {tagged.id}
    assert await listed(tag="vip") == {tagged.id}
    assert await listed(queue="bulk") == {tagged.id}
    assert await listed(created_before=t0 + timedelta(seconds=1)) == {plain.id}
    assert await listed(created_after=t0 + timedelta(seconds=5)) == {tagged.id, done.id}
    assert await listed(status=S.queued, task_type="noop") == {plain.id}


async def test_the_tag_filter_pages_newest_first_with_the_other_filters(
    store: JobStore, clock: ManualClock
) -> None:
    """Tags written by both insert paths (a set-based batch, and one by one with a key)."""
    batch = [i.job for i in await store.insert(
        [new_job(clock, tags=["vip", "spring"]) for _ in range(3)]
    )]
    keyed = await add(store, clock, tags=["vip"], idempotency_key="k-1")
    await add(store, clock, tags=["spring"])
    done = await complete(store, await claimed(store, clock, tags=["vip"]), clock)

    pages: list[JobId] = []
    cursor: str | None = None
    while True:
        page = await store.list_jobs(JobFilter(tag="vip"), limit=2, cursor=cursor)
        pages += ids(page.items)
        if (cursor := page.next_cursor) is None:
            break
    assert pages == [done.id, keyed.id, *reversed(ids(batch))]
    queued_vip = await store.list_jobs(JobFilter(tag="vip", status=S.queued), limit=50)
    assert ids(queued_vip.items) == [keyed.id, *reversed(ids(batch))]
    assert (await store.list_jobs(JobFilter(tag="nobody"), limit=50)).items == []


async def test_a_list_filtered_by_creation_time_pages_newest_first(
    store: JobStore, clock: ManualClock
) -> None:
    made = []
    for _ in range(5):
        made.append(await add(store, clock))
        clock.advance(10)

    async def walk(flt: JobFilter, cursor: str | None = None) -> list[JobId]:
        seen: list[JobId] = []
        while True:
            page = await store.list_jobs(flt, limit=2, cursor=cursor)
            seen += ids(page.items)
            if (cursor := page.next_cursor) is None:
                return seen

    before = made[2].created_at + timedelta(seconds=1)
    assert await walk(JobFilter(created_before=before)) == ids(made[2::-1])
    assert await walk(JobFilter(created_after=made[1].created_at)) == ids(made[:0:-1])
    both = JobFilter(created_after=made[1].created_at, created_before=made[4].created_at)
    assert await walk(both) == ids(made[3:0:-1])
    # a cursor whose job was pruned meanwhile goes on from the time its id starts with
    gone_at = made[3].created_at - timedelta(seconds=1)
    gone = f"{int(gone_at.timestamp() * 1000):012x}" + "0" * 20
    assert await walk(JobFilter(created_before=made[4].created_at), gone) == ids(made[2::-1])
    with pytest.raises(InvalidPayload):
        await store.list_jobs(JobFilter(created_before=before), limit=2, cursor="not-an-id")


async def test_due_lists_queued_due_jobs_by_priority_then_age(
    store: JobStore, clock: ManualClock
) -> None:
    old = await add(store, clock)
    clock.advance(1)
    urgent = await add(store, clock, priority=9, queue="critical", task_type="order")
    await add(store, clock, run_at=clock() + timedelta(seconds=60))
    await claimed(store, clock)
    due = await store.due(clock(), 10)
    assert ids_of_due(due) == [urgent.id, old.id]
    assert (due[0].task_type, due[0].queue, due[0].priority) == ("order", "critical", 9)
    assert ids_of_due(await store.due(clock(), 1)) == [urgent.id]


async def test_due_of_some_task_types_leaves_the_others_out_before_the_limit(
    store: JobStore, clock: ManualClock
) -> None:
    old = await add(store, clock)
    clock.advance(1)
    elsewhere = [await add(store, clock, priority=9, task_type="elsewhere") for _ in range(3)]
    order = await add(store, clock, priority=1, queue="critical", task_type="order")
    await claimed(store, clock, task_type="order")
    await add(store, clock, run_at=clock() + timedelta(seconds=60), task_type="order")
    due = await store.due(clock(), 2, task_types=["noop", "order"])
    assert ids_of_due(due) == [order.id, old.id]
    assert (due[0].task_type, due[0].queue, due[0].priority, due[0].run_at) == (
        "order", "critical", 1, clock()
    )
    assert ids_of_due(await store.due(clock(), 10, task_types=["order", "unknown"])) == [order.id]
    assert await store.due(clock(), 10, task_types=[]) == []
    everything = await store.due(clock(), 10, task_types=None)
    assert ids_of_due(everything) == [*ids(elsewhere), order.id, old.id]


async def test_failed_ids_filters_by_ids_task_type_and_failure_time(
    store: JobStore, clock: ManualClock
) -> None:
    t0 = clock()
    early = await failed(store, clock)
    clock.advance(60)
    late_order = await failed(store, clock, task_type="order")
    await add(store, clock)

    async def found(flt: FailedFilter) -> set[JobId]:
        return set(await store.failed_ids(flt, 100))

    assert await found(FailedFilter()) == {early.id, late_order.id}
    assert await found(FailedFilter(ids=[early.id])) == {early.id}
    assert await found(FailedFilter(ids=[])) == set()
    assert await found(FailedFilter(task_type="order")) == {late_order.id}
    assert await found(FailedFilter(failed_after=t0 + timedelta(seconds=30))) == {late_order.id}
    assert await found(FailedFilter(failed_before=t0 + timedelta(seconds=30))) == {early.id}
    assert await found(FailedFilter(task_type="noop", failed_after=t0 + timedelta(seconds=30))) == set()
    first, second = sorted([early.id, late_order.id])  # a bulk retry's next batch
    assert await found(FailedFilter(after_id=first)) == {second}
    assert await found(FailedFilter(after_id=second)) == set()


async def test_events_tell_the_timeline_of_a_job(store: JobStore, clock: ManualClock) -> None:
    row = await claimed(store, clock)
    clock.advance(1)
    await store.apply(lifecycle.schedule_retry(
        row.id, row.fence, clock() + timedelta(seconds=5), "boom", None, AttemptOutcome.error,
        clock()))
    clock.advance(5)
    await store.promote_due(clock())
    (again,) = await store.claim([row.id], OWNER, clock() + LEASE)
    clock.advance(1)
    await complete(store, again, clock)
    events = await store.events(row.id)
    assert [(e.event, e.status, e.attempt) for e in events] == [
        ("enqueued", "queued", 0), ("claimed", "running", 1), ("attempt_failed", "scheduled", 1),
        ("due", "queued", 1), ("claimed", "running", 2), ("completed", "completed", 2),
    ]
    assert [e.at for e in events] == sorted(e.at for e in events)
    assert events[-1].at == clock()
    assert "boom" in (events[2].message or "")


async def test_stats_count_jobs_by_status_task_type_and_owner(
    store: JobStore, clock: ManualClock
) -> None:
    await add(store, clock)
    await add(store, clock, task_type="order")
    await claimed(store, clock)
    stats = await store.stats()
    assert stats.by_status[S.queued] == 2
    assert stats.by_status[S.running] == 1
    assert stats.by_status[S.failed] == 0
    assert stats.by_task_type == {"noop": {"queued": 1, "running": 1}, "order": {"queued": 1}}
    assert stats.running_owners == {OWNER: 1}


async def test_ping_answers_while_open(store: JobStore) -> None:
    await store.ping()


# -- the fleet: limits shared by every process on the database -------------------------------
async def test_claim_under_a_limit_takes_only_what_leaves_the_fleet_within_it(
    store: JobStore, other_store: JobStore, clock: ManualClock
) -> None:
    await claimed(other_store, clock, owner=OTHER_OWNER)  # one noop already runs elsewhere
    low = [await add(store, clock) for _ in range(3)]
    high = await add(store, clock, priority=5)
    orders = [await add(store, clock, task_type="order") for _ in range(2)]

    rows = await store.claim(ids([*low, high, *orders]), OWNER, clock() + LEASE,
                             limits={"noop": 3})

    # 3 - 1 running = 2 noop slots: the higher priority first, then the oldest; order is unlimited
    assert set(ids(rows)) == {high.id, low[0].id, *ids(orders)}
    left = await store.get_many([low[1].id, low[2].id])
    assert {row.status for row in left} == {S.queued}


async def test_claim_under_a_limit_already_reached_takes_none_of_that_type(
    store: JobStore, clock: ManualClock
) -> None:
    await claimed(store, clock)
    await claimed(store, clock)
    waiting = await add(store, clock)

    assert await store.claim([waiting.id], OWNER, clock() + LEASE, limits={"noop": 2}) == []
    assert (await store.get(waiting.id)).status == S.queued


async def test_claim_due_under_a_limit_skips_a_full_type_and_fills_the_rest(
    store: JobStore, clock: ManualClock
) -> None:
    await claimed(store, clock)
    for _ in range(3):
        await add(store, clock, priority=9)  # noop, at its limit of 1 already
    orders = [await add(store, clock, task_type="order") for _ in range(3)]

    rows = await store.claim_due(2, OWNER, clock() + LEASE, limits={"noop": 1, "order": 5})

    assert ids(rows) == ids(orders[:2])


async def test_concurrent_claims_of_many_processes_never_exceed_a_limit(
    database_url: str, clock: ManualClock
) -> None:
    """Four processes each claim their own ten jobs of one type at the same moment, under a
    fleet limit of five: each alone would see nothing running and take five."""
    stores = [open_store(database_url, owner=f"host/{n}/0/x", clock=clock) for n in range(4)]
    for opened in stores:
        await opened.open()
    try:
        for limit in (5, 1, 7):
            jobs = [await add(stores[0], clock, task_type=f"limited{limit}") for _ in range(40)]
            await asyncio.gather(*(
                opened.claim(ids(jobs[n * 10:(n + 1) * 10]), f"host/{n}/0/x", clock() + LEASE,
                             limits={f"limited{limit}": limit})
                for n, opened in enumerate(stores)
            ))
            stats = await stores[0].stats()
            assert stats.by_task_type[f"limited{limit}"].get("running", 0) == limit
    finally:
        for opened in stores:
            await opened.close()


async def test_rate_slots_are_handed_out_one_interval_apart(
    store: JobStore, clock: ManualClock
) -> None:
    first = await store.reserve_rate("mail", 0.5, 4, max_wait_seconds=10)
    second = await store.reserve_rate("mail", 0.5, 1, max_wait_seconds=10)
    other = await store.reserve_rate("sms", 0.5, 1, max_wait_seconds=10)

    assert (first.granted, first.wait_seconds) == (True, 0.0)
    assert second.granted
    assert second.wait_seconds == pytest.approx(2.0)  # after 4 x 0.5
    assert (other.granted, other.wait_seconds) == (True, 0.0)  # another pace: its own slots


async def test_a_rate_slot_further_away_than_the_caller_waits_is_refused_and_nothing_taken(
    store: JobStore, clock: ManualClock
) -> None:
    await store.reserve_rate("mail", 1.0, 30, max_wait_seconds=10)  # the next 30 s are taken

    refused = await store.reserve_rate("mail", 1.0, 1, max_wait_seconds=10)
    clock.advance(25)
    granted = await store.reserve_rate("mail", 1.0, 1, max_wait_seconds=10)
    clock.advance(60)
    idle = await store.reserve_rate("mail", 1.0, 1, max_wait_seconds=10)

    assert not refused.granted
    assert refused.wait_seconds == pytest.approx(30.0)
    assert granted.granted
    assert granted.wait_seconds == pytest.approx(5.0)  # not 6: the refusal took no slot
    assert (idle.granted, idle.wait_seconds) == (True, 0.0)  # unused time is not saved up


async def test_rate_slots_taken_by_two_processes_at_once_never_coincide(
    store: JobStore, other_store: JobStore, clock: ManualClock
) -> None:
    answers = await asyncio.gather(*(
        (store if n % 2 else other_store).reserve_rate("mail", 1.0, 1, max_wait_seconds=100)
        for n in range(20)
    ))
    assert sorted(round(a.wait_seconds, 6) for a in answers) == [float(n) for n in range(20)]


async def test_live_processes_are_the_announced_ones_not_yet_expired_or_retired(
    store: JobStore, other_store: JobStore, clock: ManualClock
) -> None:
    from carwash_jobs.store.base import ProcessInfo

    worker = ProcessInfo(OWNER, "worker", "test-host", 1, clock() - timedelta(seconds=5))
    api = ProcessInfo(OTHER_OWNER, "api", "other-host", 2, clock())
    await store.announce_process(worker, ttl_seconds=10)
    await other_store.announce_process(api, ttl_seconds=3)

    live = await store.live_processes()
    assert [(p.owner, p.role, p.host, p.pid) for p in live] == [
        (OWNER, "worker", "test-host", 1), (OTHER_OWNER, "api", "other-host", 2)]
    assert live[0].started_at == worker.started_at
    assert live[0].last_seen_at == clock()
    assert live[0].expires_at == clock() + timedelta(seconds=10)

    clock.advance(5)  # the api process stopped renewing: it counts as dead
    await store.announce_process(worker, ttl_seconds=10)
    assert [p.owner for p in await store.live_processes()] == [OWNER]
    assert (await store.live_processes())[0].last_seen_at == clock()

    await store.retire_process(OWNER)
    assert await store.live_processes() == []


async def test_a_heartbeat_and_a_completion_batch_over_the_same_jobs_never_deadlock(
    store: JobStore, clock: ManualClock
) -> None:
    """One process's heartbeat extends the leases of the jobs a completion batch is finishing
    at the same moment, on two connections; each locks many rows, and in different orders
    they would wait on each other in a circle (PostgreSQL aborts one: 'deadlock detected')."""
    from carwash_jobs.store.base import Completion

    for _ in range(8):
        jobs = [await claimed(store, clock) for _ in range(60)]
        shuffled = list(reversed(jobs))
        held, completed = await asyncio.gather(
            store.extend_leases(OWNER, ids(jobs), clock() + LEASE),
            store.complete_many([Completion(j.id, j.fence, None) for j in shuffled]),
        )
        assert completed.completed == set(ids(jobs))
        assert held <= set(ids(jobs))


async def test_complete_many_records_each_completion_and_frees_the_dependents(
    store: JobStore, clock: ManualClock
) -> None:
    from carwash_jobs.store.base import Completion

    a, b = await claimed(store, clock), await claimed(store, clock)
    after_a = await add(store, clock, depends_on=[a.id])
    after_both = await add(store, clock, depends_on=[a.id, b.id])

    done = await store.complete_many([Completion(a.id, a.fence, {"ok": 1})])
    assert done.completed == {a.id}
    assert ids(done.woken) == [after_a.id]
    assert (await store.get(after_both.id)).status == S.waiting

    done = await store.complete_many([Completion(b.id, b.fence, None)])
    assert ids(done.woken) == [after_both.id]
    assert [j.status for j in await store.get_many([after_a.id, after_both.id])] == [S.queued] * 2
    assert await event_names(store, a.id) == ["enqueued", "claimed", "completed"]
    assert (await store.get(a.id)).result == {"ok": 1}



async def test_completed_results_read_back_the_same_whatever_their_text(
    store: JobStore, clock: ManualClock
) -> None:
    """Results of every JSON shape in one batch, each read back as returned: text beyond ASCII,
    a lone surrogate (which UTF-8 cannot hold), lists (PostgreSQL once took a list inside the
    batch's array for a dimension of it: a list result was stored as its first element, and a
    list beside results of other shapes failed the whole batch), a big integer, a bare number,
    none; and keys the standard library's encoder writes its own way, written as it does."""
    from carwash_jobs.store.base import Completion

    results: list[Any] = [
        {"name": "Zoë 🚗"}, "\ud800 alone", [10**30, 1.5, None, True], ["a"], 7, None,
        {None: 1, 2: "two", 1.5: 0},
    ]
    jobs = [await claimed(store, clock) for _ in results]

    completions = [Completion(j.id, j.fence, r) for j, r in zip(jobs, results, strict=True)]
    # the lone surrogate in a batch of its own: the others' text is then not its concern
    done = [await store.complete_many(completions[1:2]), await store.complete_many(
        completions[:1] + completions[2:])]

    assert set().union(*(d.completed for d in done)) == {j.id for j in jobs}
    rows = {row.id: row for row in await store.get_many([j.id for j in jobs])}
    assert [rows[j.id].result for j in jobs] == [
        *results[:-1], {"null": 1, "2": "two", "1.5": 0},
    ]


BARE_NUMBERS = [10**30, 2**63 + 1, -(2**70), 2.0, -0.0, 1e20, 0.1, 7]


@pytest.mark.parametrize("how", ["batch", "transition"])
async def test_a_bare_number_result_reads_back_as_it_was_returned(
    store: JobStore, clock: ManualClock, how: str
) -> None:
    """SQLite once stored it as JSON text in a column of NUMERIC affinity, which made 2.0 the
    integer 2 and 10**30 an approximate float; PostgreSQL kept it. Now both keep it."""
    from carwash_jobs.store.base import Completion

    jobs = [await claimed(store, clock) for _ in BARE_NUMBERS]
    if how == "batch":  # with a result of another shape and none beside them
        extra = [await claimed(store, clock) for _ in range(2)]
        done = await store.complete_many(
            [Completion(j.id, j.fence, r) for j, r in zip(jobs, BARE_NUMBERS, strict=True)]
            + [Completion(extra[0].id, extra[0].fence, {"n": 2.0}),
               Completion(extra[1].id, extra[1].fence, None)])
        assert len(done.completed) == len(BARE_NUMBERS) + 2
        assert [r.result for r in await store.get_many([e.id for e in extra])] == [{"n": 2.0}, None]
    else:
        for job, result in zip(jobs, BARE_NUMBERS, strict=True):
            applied = await store.apply(lifecycle.complete(job.id, job.fence, result, clock()))
            assert (applied.job.result, type(applied.job.result)) == (result, type(result))
    rows = {row.id: row for row in await store.get_many([j.id for j in jobs])}
    assert [(rows[j.id].result, type(rows[j.id].result)) for j in jobs] == [
        (r, type(r)) for r in BARE_NUMBERS]


async def test_a_claim_under_a_limit_records_its_claimed_event(
    store: JobStore, clock: ManualClock
) -> None:
    by_id, due = await add(store, clock), await add(store, clock, task_type="order")
    assert ids(await store.claim([by_id.id], OWNER, clock() + LEASE, limits={"noop": 5}))
    assert ids(await store.claim_due(5, OWNER, clock() + LEASE, limits={"order": 5}))
    assert await event_names(store, by_id.id) == ["enqueued", "claimed"]
    assert await event_names(store, due.id) == ["enqueued", "claimed"]


async def _lock_waiters(conn: asyncpg.Connection, n: int) -> None:
    """Until `n` sessions of this database wait for a lock (the server has no event to await)."""
    async with asyncio.timeout(10):
        while await waiting_for_locks(conn) < n:  # noqa: ASYNC110 - see the docstring
            await asyncio.sleep(0.01)


async def waiting_for_locks(conn: asyncpg.Connection) -> int:
    # inside a transaction pg_stat_activity answers from a snapshot taken once: clear it
    await conn.execute("SELECT pg_stat_clear_snapshot()")
    return int(await conn.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
        "AND datname = current_database()"
    ))


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_postgres_a_dependency_added_while_a_completion_waits_for_a_lock_is_freed(
    database_url: str, store: JobStore, clock: ManualClock
) -> None:
    """A heartbeat holds the row lock; meanwhile another process adds a job that waits on the
    job being completed. Whichever of the two gets the row first, the dependent ends queued:
    the enqueue reads the dependency share-locked, so it waits as well and finds the job
    completed, or the completion sees the committed dependency and frees it."""
    from carwash_jobs.store.base import Completion

    job = await claimed(store, clock)
    conn = await asyncpg.connect(postgres_url(database_url, make_url(database_url).database or "",
                                               driver="postgresql"))
    try:
        lock = conn.transaction()
        await lock.start()
        await conn.execute("SELECT 1 FROM worker_queue WHERE id = $1 FOR UPDATE", job.id)
        completing = asyncio.ensure_future(
            store.complete_many([Completion(job.id, job.fence, None)])
        )
        await _lock_waiters(conn, 1)  # the completion waits for the lock
        adding = asyncio.ensure_future(add(store, clock, depends_on=[job.id]))
        await _lock_waiters(conn, 2)  # and so does the enqueue
        await lock.rollback()
        done = await completing
        dependent = await adding
    finally:
        await conn.close()
    assert done.completed == {job.id}
    assert ids(done.woken) in ([dependent.id], [])
    assert (await store.get(dependent.id)).status == S.queued


async def test_a_bulk_insert_of_plain_jobs_reads_back_as_returned(
    store: JobStore, clock: ManualClock
) -> None:
    """The set-based path of many plain jobs (no key, no dependencies) writes what one-by-one
    inserts write: every column, the enqueued event, the scheduled ones scheduled."""
    jobs = [
        new_job(clock, priority=3, queue="bulk", tags=["a", "b"], context={"by": "admin"},
                max_attempts=4),
        new_job(clock, tags=[], context=None),
        new_job(clock, run_at=clock() + timedelta(minutes=5), rerun_of=JobId("x" * 32)),
    ]
    results = await store.insert(jobs)

    stored = await store.get_many([j.id for j in jobs])
    by_id = {row.id: row for row in stored}
    assert [by_id[r.job.id] for r in results] == [r.job for r in results]
    assert [r.job.status for r in results] == [S.queued, S.queued, S.scheduled]
    assert by_id[jobs[0].id].tags == ["a", "b"]
    assert by_id[jobs[0].id].context == {"by": "admin"}
    assert by_id[jobs[1].id].context is None
    assert by_id[jobs[2].id].rerun_of == "x" * 32
    enqueued = [
        [(e.event, e.status, e.attempt, e.process, e.message, e.at) for e in await store.events(j.id)]
        for j in jobs
    ]
    assert enqueued == [
        [("enqueued", status, 0, OWNER, None, clock())]
        for status in ("queued", "queued", "scheduled")
    ]



async def test_payload_text_beyond_ascii_and_a_lone_surrogate_reads_back_the_same(
    store: JobStore, clock: ManualClock
) -> None:
    """Through the bulk path of plain jobs and through the one-by-one path (a job with a key):
    text beyond ASCII may be written as UTF-8 or as escapes, and a lone surrogate, which UTF-8
    cannot hold, only as an escape (see json_types_text)."""
    payloads: list[dict[str, Any]] = [
        {"name": "Zoë 🚗 Ø"}, {"note": "\ud800 alone"}, {"n": 1.5, "list": ["ß", None]},
    ]
    plain = [new_job(clock, payload=p) for p in payloads]
    keyed = [new_job(clock, payload=p, idempotency_key=f"key-{i}") for i, p in enumerate(payloads)]

    await store.insert(plain)
    await store.insert(keyed)

    rows = {row.id: row for row in await store.get_many([j.id for j in plain + keyed])}
    assert [rows[j.id].payload for j in plain + keyed] == payloads + payloads


# -- PostgreSQL query plans (SQLite's are in test_sqlite.py) -----------------------------------
@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_postgres_claims_by_id_through_the_primary_key_once_queued_jobs_are_rare(
    database_url: str, store: JobStore, clock: ManualClock
) -> None:
    """With statistics that say almost nothing is queued (many finished jobs), the planner would
    read the (status, id) index and walk every queued job to find the hundred asked for."""
    from carwash_jobs.store.postgres import CLAIM_IDS

    conn = await asyncpg.connect(postgres_url(database_url, make_url(database_url).database or "",
                                               driver="postgresql"))
    try:
        async with conn.transaction():  # the history, without 50,000 calls of the count trigger
            await conn.execute("SET LOCAL session_replication_role = replica")
            await conn.execute(
                "INSERT INTO worker_queue (id, task_type, queue, status, priority, payload, tags, "
                "attempts, max_attempts, run_at, created_at, progress_done, attempt_history, "
                "depends_on) SELECT lpad(to_hex(g), 32, '0'), 'noop', 'default', 'completed', 0, "
                "'{}', '[]', 1, 5, now(), now(), 0, '[]', '[]' FROM generate_series(1, 50000) g"
            )
        await conn.execute("ANALYZE worker_queue")  # before the burst: "nothing is queued"
        burst = await store.insert([new_job(clock) for _ in range(2000)])
        queued = [i.job.id for i in burst]
        plan = "\n".join(r[0] for r in await conn.fetch(
            f"EXPLAIN {CLAIM_IDS}", OWNER, clock() + LEASE, clock(), queued[100:200]
        ))
    finally:
        await conn.close()

    assert "worker_queue_pkey" in plan, plan
    assert "ix_worker_queue_status" not in plan, plan


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_postgres_retries_a_batch_through_the_primary_key_among_many_failed_jobs(
    database_url: str, clock: ManualClock
) -> None:
    """A bulk retry's batch (apply_many, one statement) after a mass failure: read through a
    status index, each batch of 1,000 would walk every failed job."""
    from carwash_jobs.store.postgres import alike_statement

    conn = await asyncpg.connect(postgres_url(database_url, make_url(database_url).database or "",
                                               driver="postgresql"))
    try:
        async with conn.transaction():  # without 102,000 calls of the count trigger
            await conn.execute("SET LOCAL session_replication_role = replica")
            await conn.execute(
                "INSERT INTO worker_queue (id, task_type, queue, status, priority, payload, tags, "
                "attempts, max_attempts, run_at, created_at, finished_at, progress_done, "
                "attempt_history, depends_on) SELECT lpad(to_hex(g), 32, '0'), 'noop', 'default', "
                "CASE WHEN g % 50 = 0 THEN 'failed' ELSE 'completed' END, 0, '{}', '[]', 1, 5, "
                "now(), now(), now(), 0, '[]', '[]' FROM generate_series(1, 100000) g"
            )
        await conn.execute("ANALYZE worker_queue")
        failed = [f"{g:032x}" for g in range(50, 50_001, 50)]
        sql, *args = alike_statement(lifecycle.retry_failed(JobId(failed[0]), clock()),
                                     [JobId(i) for i in failed], OWNER, clock())
        plan = "\n".join(r[0] for r in await conn.fetch(f"EXPLAIN {sql}", *args))
    finally:
        await conn.close()

    assert "worker_queue_pkey" in plan, plan
    assert "ix_worker_queue_status" not in plan, plan
    assert "ix_worker_queue_finished" not in plan, plan


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_postgres_a_callers_session_change_does_not_outlive_its_transaction(
    database_url: str, clock: ManualClock
) -> None:
    """The pool does not reset a connection after the store's own statements (they change no
    session state, and the reset is a round trip); after a caller's SQL it must."""
    store = open_store(database_url, owner=OWNER, clock=clock, pool_size=1)
    await store.open()
    try:
        async def change_session(tx: Tx) -> None:
            await tx.execute("SET statement_timeout = 1234")

        async def read_session(tx: Tx) -> list[dict[str, Any]]:
            return await tx.fetch("SHOW statement_timeout")

        unchanged = [{"statement_timeout": "0"}]
        await store.transaction(change_session)
        await store.insert([new_job(clock)])  # the store's own work in between, same connection
        assert await store.transaction(read_session) == unchanged

        running = await claimed(store, clock)  # a completion's finalizer runs caller SQL too
        await store.apply(lifecycle.complete(running.id, running.fence, None, clock()),
                          before=change_session)
        assert await store.transaction(read_session) == unchanged
    finally:
        await store.close()


# -- cron fires with overlap "skip" ------------------------------------------------------------
@pytest.mark.parametrize("earlier", ["queued", "running"])
async def test_a_fire_is_skipped_while_the_schedules_last_job_is_unfinished(
    store: JobStore, clock: ManualClock, earlier: str
) -> None:
    """Queued jobs are found through the list index, running ones through the lease index
    (migration 0008 left them out of the other): both must hold a fire back."""
    tag = "cron:nightly"

    async def fire() -> Any:
        job = new_job(clock, tags=[tag])
        return await store.fire_cron("nightly", clock(), job, skip_if_active_tag=tag)

    first = await fire()
    assert first.outcome == "fired"
    if earlier == "running":
        await store.claim([first.job.id], OWNER, clock() + LEASE)
    clock.advance(600)

    skipped = await fire()

    assert (skipped.outcome, skipped.active_job_id) == ("skipped", first.job.id)
    await store.apply(lifecycle.cancel(first.job.id, clock()))
    clock.advance(600)
    assert (await fire()).outcome == "fired"


# -- vacuum ------------------------------------------------------------------------------------
async def test_a_vacuum_leaves_every_job_and_its_history_as_it_was(
    database_url: str, store: JobStore, clock: ManualClock
) -> None:
    running = await claimed(store, clock)
    done = await claimed(store, clock)
    await store.complete_many([Completion(done.id, done.fence, {"ok": 1})])
    queued = await add(store, clock)
    before = await store.get_many([running.id, done.id, queued.id])

    from carwash_jobs.store.postgres import dsn_of

    vacuumed = await store.vacuum()

    assert vacuumed == (store.dialect == "postgresql"
                        and not await autovacuum_is_on(dsn_of(database_url)))
    assert await store.get_many([running.id, done.id, queued.id]) == before
    assert await event_names(store, done.id) == ["enqueued", "claimed", "completed"]

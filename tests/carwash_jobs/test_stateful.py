"""Random interleavings of the job lifecycle against the real SQLite store.

A hypothesis state machine drives enqueue, claim, heartbeat, complete, retry/fail, cancel,
lease expiry, shutdown release, retry-failed and rerun through the lifecycle constructors and
`store.apply` / `apply_many` / `claim`, with stale fences on purpose, on a fresh database file
per example. A small model of its own (not the engine's code) predicts every outcome, and after
every step the database is checked against it:

- only legal statuses, and every status change since the last step is in lifecycle.ALLOWED
  (each step moves a job at most one edge, cascades included);
- 0 <= attempts <= max_attempts, always, not even transiently: a claim is the only increment,
  and nothing puts a job at max_attempts back in line (schedule_retry is only built while
  attempts < max_attempts, as the processor does; an expired lease on the last attempt fails
  the job; a release and a throttled retry give the attempt back);
- no outcome written by a stale fence: each job's attempt history equals the model's, which
  only records writes made with the current fence;
- nothing lost: every enqueued id exists, and rows == enqueued + reruns;
- a running row carries the fence of its current attempt; ended rows say when they ended.

A fence of a finished attempt may equal the current one (a throttled retry or a release gives
the attempt number back, and the same owner claims again); such a fence is not stale, because
no live attempt holds it, so the machine only uses fences that differ from the current one.

The machine runs its own event loop (pytest-asyncio's is not available in a sync machine).
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)

from carwash_jobs import lifecycle
from carwash_jobs.errors import IllegalTransition, JobNotFound, StaleLease
from carwash_jobs.lifecycle import ALLOWED, CANCELLABLE, TERMINAL, AttemptOutcome, Fence, JobStatus
from carwash_jobs.queue import JobQueue
from carwash_jobs.store.base import JobFilter, NewJob
from carwash_jobs.store.sqlite import SqliteJobStore
from carwash_jobs.types import JobId, new_job_id
from tests.carwash_jobs.support import ManualClock, copy_database, registry_with

if TYPE_CHECKING:
    from collections.abc import Coroutine

    from carwash_jobs.lifecycle import Transition
    from carwash_jobs.store.base import Applied

T = TypeVar("T")
S = JobStatus
OWNERS = ("worker-a/1/0/a", "worker-b/2/0/b")
LEASE = timedelta(seconds=60)
RUNNING = frozenset({JobStatus.running})
#: mostly aim an action at jobs it applies to; sometimes at any job, to see it refused
FOCUS = st.sampled_from([True, True, True, False])
#: mostly the current fence; a third of the time a stale one (an index into the candidates)
STALE = st.integers(0, 29).map(lambda n: n if n < 10 else None)


@dataclass
class Model:
    """What the database must say about one job."""

    status: JobStatus
    max_attempts: int
    run_at: datetime
    depends_on: list[JobId]
    attempts: int = 0
    fence: Fence | None = None  #: the current attempt's, while running
    lease_until: datetime | None = None
    history: list[tuple[int, str | None, str]] = field(default_factory=list)
    fences_seen: list[Fence] = field(default_factory=list)
    result: Any = None


class JobLifecycle(RuleBasedStateMachine):
    #: the session's migrated SQLite file (conftest), copied for each example
    template: ClassVar[Path | None] = None

    def __init__(self) -> None:
        super().__init__()
        assert self.template is not None
        self.loop = asyncio.new_event_loop()
        self.directory = Path(tempfile.mkdtemp(prefix="carwash-stateful-"))
        url = copy_database(self.template, self.directory / "jobs.db")
        self.clock = ManualClock(datetime(2030, 1, 1, tzinfo=UTC))
        self.store = SqliteJobStore(url, owner="machine/0/0/m", clock=self.clock)
        self.run(self.store.open())
        self.queue = JobQueue(self.store, registry_with(), ready=None, clock=self.clock)
        self.jobs: dict[JobId, Model] = {}
        self.order: list[JobId] = []
        self.created = 0
        self.seen_status: dict[JobId, JobStatus] = {}

    def teardown(self) -> None:
        try:
            self.queue.close()  # its batcher's task ends while the store closes, on this loop
            self.run(self.store.close())
        finally:
            self.loop.close()
            shutil.rmtree(self.directory, ignore_errors=True)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    # -- helpers ----------------------------------------------------------------------------
    def pick(self, selector: int, wanted: frozenset[JobStatus] | None = None) -> JobId:
        """A job, from those in a `wanted` status when there are any (else any job)."""
        pool = [i for i in self.order if wanted is not None and self.jobs[i].status in wanted]
        pool = pool or self.order
        return pool[selector % len(pool)]

    def fence_for(self, job_id: JobId, stale: int | None) -> Fence:
        """The current fence, or (stale given) one that differs from it."""
        model = self.jobs[job_id]
        current = model.fence or Fence(model.attempts, OWNERS[0])
        if stale is None:
            return current
        candidates = [
            *model.fences_seen,
            Fence(current.attempt, OWNERS[1] if current.owner == OWNERS[0] else OWNERS[0]),
            Fence(current.attempt - 1, current.owner),
            Fence(current.attempt + 1, current.owner),
        ]
        stale_ones = [f for f in candidates if f != model.fence]
        return stale_ones[stale % len(stale_ones)]

    def expect_applied(self, action: str, job_id: JobId, fence: Fence | None,
                       allowed_from: frozenset[JobStatus], outcome: Applied | Exception) -> bool:
        """Check a single transition's result against the model; True when it must apply."""
        model = self.jobs[job_id]
        if model.status not in allowed_from:
            event(f"{action}: illegal")
            assert type(outcome) is IllegalTransition, outcome
            assert outcome.from_status == model.status.value
            return False
        if fence is not None and fence != model.fence:
            event(f"{action}: stale fence")
            assert isinstance(outcome, StaleLease), outcome
            return False
        event(f"{action}: applied")
        assert not isinstance(outcome, Exception), outcome
        return True

    def apply_one(self, transition: Transition) -> Applied | Exception:
        try:
            return self.run(self.store.apply(transition))
        except (IllegalTransition, JobNotFound) as exc:
            return exc

    def finish(self, job_id: JobId, status: JobStatus, outcome: str | None) -> None:
        """Model an applied change of a (possibly running) job to `status`."""
        model = self.jobs[job_id]
        if outcome is not None and model.fence is not None:
            model.history.append((model.fence.attempt, model.fence.owner, outcome))
        if model.fence is not None:
            model.fences_seen.append(model.fence)
        model.status = status
        if status != S.running:
            model.fence = None
            model.lease_until = None
        if status in TERMINAL:
            self.resolve_dependents(job_id)

    def resolve_dependents(self, job_id: JobId) -> None:
        ended = self.jobs[job_id].status
        for other_id in self.order:
            other = self.jobs[other_id]
            if other.status != S.waiting or job_id not in other.depends_on:
                continue
            if ended == S.completed:
                if all(self.jobs[d].status == S.completed for d in other.depends_on):
                    other.status = S.queued
            else:
                other.status = S.cancelled
                self.resolve_dependents(other_id)

    # -- rules ------------------------------------------------------------------------------
    @initialize(count=st.integers(1, 4), max_attempts=st.integers(1, 3))
    def first_jobs(self, count: int, max_attempts: int) -> None:
        for _ in range(count):
            self.enqueue(max_attempts, 0, [])

    @rule(max_attempts=st.integers(1, 3), delay=st.sampled_from([0, 0, 30]),
          dependencies=st.lists(st.integers(0, 10_000), max_size=2))
    def enqueue(self, max_attempts: int, delay: int, dependencies: list[int]) -> None:
        deps = list(dict.fromkeys(self.pick(d) for d in dependencies)) if self.order else []
        now = self.clock()
        job = NewJob(id=new_job_id(), task_type="noop", payload={"n": len(self.order)},
                     status=S.queued, run_at=now + timedelta(seconds=delay), created_at=now,
                     max_attempts=max_attempts, depends_on=deps)
        (inserted,) = self.run(self.store.insert([job]))
        assert inserted.created
        dep_statuses = [self.jobs[d].status for d in deps]
        if any(s in (S.failed, S.cancelled) for s in dep_statuses):
            expected = S.cancelled
        elif any(s != S.completed for s in dep_statuses):
            expected = S.waiting
        else:
            expected = S.scheduled if delay else S.queued
        assert inserted.job.status == expected
        self.jobs[job.id] = Model(expected, max_attempts, job.run_at, deps)
        self.order.append(job.id)
        self.created += 1

    @rule(selectors=st.lists(st.integers(0, 10_000), min_size=1, max_size=3),
          owner=st.sampled_from(OWNERS), focus=FOCUS)
    def claim(self, selectors: list[int], owner: str, focus: bool) -> None:
        wanted = frozenset({S.queued, S.scheduled}) if focus else None
        ids = list(dict.fromkeys(self.pick(s, wanted) for s in selectors))
        now = self.clock()
        rows = self.run(self.store.claim(ids, owner, now + LEASE))
        expected = {
            i for i in ids
            if self.jobs[i].status in (S.queued, S.scheduled) and self.jobs[i].run_at <= now
        }
        assert {row.id for row in rows} == expected
        for job_id in expected:
            model = self.jobs[job_id]
            model.status = S.running
            model.attempts += 1
            model.fence = Fence(model.attempts, owner)
            model.lease_until = now + LEASE

    @rule(selectors=st.lists(st.integers(0, 10_000), max_size=3), owner=st.sampled_from(OWNERS),
          focus=FOCUS)
    def heartbeat(self, selectors: list[int], owner: str, focus: bool) -> None:
        ids = list(dict.fromkeys(self.pick(s, RUNNING if focus else None) for s in selectors))
        until = self.clock() + LEASE
        held = self.run(self.store.extend_leases(owner, ids, until))
        expected = {
            i for i in ids
            if self.jobs[i].status == S.running and (self.jobs[i].fence or Fence(0, "")).owner == owner
        }
        assert held == expected
        for job_id in held:
            self.jobs[job_id].lease_until = until

    @rule(selector=st.integers(0, 10_000), stale=STALE, focus=FOCUS)
    def complete(self, selector: int, stale: int | None, focus: bool) -> None:
        job_id = self.pick(selector, RUNNING if focus else None)
        fence = self.fence_for(job_id, stale)
        result = {"done_by": fence.owner, "attempt": fence.attempt}
        outcome = self.apply_one(lifecycle.complete(job_id, fence, result, self.clock()))
        if self.expect_applied("complete", job_id, fence, frozenset({S.running}), outcome):
            self.jobs[job_id].result = result
            self.finish(job_id, S.completed, "completed")

    @rule(selector=st.integers(0, 10_000), stale=STALE, focus=FOCUS,
          kind=st.sampled_from(["retry", "retry", "throttle", "permanent"]),
          delay=st.sampled_from([0, 10, 100]))
    def fail_or_retry(self, selector: int, stale: int | None, focus: bool, kind: str,
                      delay: int) -> None:
        """What the processor does with a failed attempt."""
        job_id = self.pick(selector, RUNNING if focus else None)
        model = self.jobs[job_id]
        fence = self.fence_for(job_id, stale)
        now = self.clock()
        run_at = now + timedelta(seconds=delay)
        retry_left = model.attempts < model.max_attempts
        if kind == "throttle":
            transition = lifecycle.schedule_retry(job_id, fence, run_at, "quota", None,
                                                  AttemptOutcome.throttled, now, count_attempt=False)
        elif kind == "retry" and retry_left:
            transition = lifecycle.schedule_retry(job_id, fence, run_at, "boom", "tb",
                                                  AttemptOutcome.error, now)
        else:
            transition = lifecycle.fail(job_id, fence, "boom", "tb", AttemptOutcome.error, now)
        outcome = self.apply_one(transition)
        if not self.expect_applied(kind, job_id, fence, frozenset({S.running}), outcome):
            return
        if transition.to_status == S.failed:
            self.finish(job_id, S.failed, "error")
            return
        self.finish(job_id, S.scheduled, "throttled" if kind == "throttle" else "error")
        model.run_at = run_at
        model.attempts += transition.attempts_delta

    @rule(selector=st.integers(0, 10_000), focus=FOCUS)
    def cancel(self, selector: int, focus: bool) -> None:
        job_id = self.pick(selector, CANCELLABLE if focus else None)
        outcome = self.apply_one(lifecycle.cancel(job_id, self.clock()))
        if self.expect_applied("cancel", job_id, None, CANCELLABLE, outcome):
            was_running = self.jobs[job_id].status == S.running
            self.finish(job_id, S.cancelled, "cancelled" if was_running else None)

    @rule(selector=st.integers(0, 10_000), stale=STALE, focus=FOCUS)
    def release_at_shutdown(self, selector: int, stale: int | None, focus: bool) -> None:
        job_id = self.pick(selector, RUNNING if focus else None)
        fence = self.fence_for(job_id, stale)
        outcome = self.apply_one(lifecycle.release(job_id, fence, self.clock()))
        if self.expect_applied("release", job_id, fence, frozenset({S.running}), outcome):
            model = self.jobs[job_id]
            self.finish(job_id, S.queued, "released")
            model.attempts -= 1
            model.run_at = self.clock()

    @rule(seconds=st.sampled_from([1, 30, 61, 120]), stale=STALE)
    def expire_leases(self, seconds: int, stale: int | None) -> None:
        """The scheduler's duty, with a stale fence for one of the rows when `stale` is set."""
        now = self.clock.advance(seconds)
        expired = self.run(self.store.expired_leases(now, 1000))
        expected = {
            i for i, m in self.jobs.items()
            if m.status == S.running and m.lease_until is not None and m.lease_until < now
        }
        assert {row.id for row in expired} == expected
        fences = [row.fence for row in expired]
        if stale is not None and expired:
            fences[0] = self.fence_for(expired[0].id, stale)
        transitions = [
            lifecycle.release_expired_lease(row.id, fence, row.attempts, row.max_attempts, now)
            for row, fence in zip(expired, fences, strict=True)
        ]
        results = self.run(self.store.apply_many(transitions))
        for row, fence, outcome in zip(expired, fences, results, strict=True):
            if not self.expect_applied("expire", row.id, fence, frozenset({S.running}), outcome):
                continue
            model = self.jobs[row.id]
            if model.attempts >= model.max_attempts:
                self.finish(row.id, S.failed, "worker_lost")
            else:
                self.finish(row.id, S.queued, "worker_lost")
                model.run_at = now

    @rule()
    def promote_due(self) -> None:
        now = self.clock()
        promoted = self.run(self.store.promote_due(now))
        due = [m for m in self.jobs.values() if m.status == S.scheduled and m.run_at <= now]
        assert promoted == len(due)
        for model in due:
            model.status = S.queued

    @rule(selectors=st.none() | st.lists(st.integers(0, 10_000), min_size=1, max_size=3),
          focus=FOCUS)
    def retry_failed(self, selectors: list[int] | None, focus: bool) -> None:
        now = self.clock()
        wanted = frozenset({S.failed}) if focus else None
        ids = (list(self.jobs) if selectors is None
               else list(dict.fromkeys(self.pick(s, wanted) for s in selectors)))
        results = self.run(self.store.apply_many([lifecycle.retry_failed(i, now) for i in ids]))
        for job_id, outcome in zip(ids, results, strict=True):
            if self.expect_applied("retry-failed", job_id, None, frozenset({S.failed}), outcome):
                model = self.jobs[job_id]
                model.status = S.queued
                model.attempts = 0
                model.run_at = now

    @rule(selector=st.integers(0, 10_000), focus=FOCUS)
    def rerun(self, selector: int, focus: bool) -> None:
        job_id = self.pick(selector, TERMINAL if focus else None)
        source = self.jobs[job_id]
        if source.status not in TERMINAL:
            with pytest.raises(IllegalTransition) as refused:
                self.run(self.queue.rerun(job_id))
            assert refused.value.from_status == source.status.value
            return
        row = self.run(self.queue.rerun(job_id))
        assert (row.rerun_of, row.status) == (job_id, S.queued)
        self.jobs[row.id] = Model(S.queued, source.max_attempts, row.run_at, [])
        self.order.append(row.id)
        self.created += 1

    @rule(seconds=st.sampled_from([1, 10, 100]))
    def advance_clock(self, seconds: int) -> None:
        self.clock.advance(seconds)

    # -- invariants -------------------------------------------------------------------------
    @invariant()
    def database_agrees_with_the_model(self) -> None:
        raw = self.run(self.store.writer.in_thread(
            lambda conn: conn.execute("SELECT DISTINCT status FROM worker_queue").fetchall()))
        assert {r[0] for r in raw} <= {s.value for s in JobStatus}
        rows = self.run(self.store.list_jobs(JobFilter(), limit=100_000)).items
        assert len(rows) == self.created == len(self.jobs)
        assert {row.id for row in rows} == set(self.jobs)
        for row in rows:
            model = self.jobs[row.id]
            previous = self.seen_status.get(row.id)
            if previous is not None and previous != row.status:
                assert row.status in ALLOWED[previous], (previous, row.status)
            self.seen_status[row.id] = row.status
            assert row.status == model.status, (row.id, row.status, model.status)
            assert 0 <= row.attempts <= row.max_attempts
            assert row.attempts == model.attempts
            history = [(h["attempt"], h["owner"], h["outcome"]) for h in row.attempt_history]
            assert history == model.history, (row.id, history, model.history)
            if row.status == S.running:
                assert row.fence == model.fence
                assert row.lease_until == model.lease_until
            else:
                assert (row.lease_owner, row.lease_until) == (None, None)
            assert (row.finished_at is not None) == (row.status in TERMINAL)
            if row.status == S.completed:
                assert row.result == model.result
            if row.status == S.waiting:
                deps = [self.jobs[d].status for d in model.depends_on]
                assert any(s != S.completed for s in deps)
                assert not any(s in (S.failed, S.cancelled) for s in deps)


JobLifecycle.TestCase.settings = settings(
    max_examples=45, stateful_step_count=35, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestJobLifecycle = JobLifecycle.TestCase


@pytest.fixture(autouse=True)
def _fresh_files_from_the_migrated_template(migrated_template: Path) -> None:
    JobLifecycle.template = migrated_template

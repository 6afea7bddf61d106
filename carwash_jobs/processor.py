"""QueueProcessor: takes due ids from the ready queue, claims them, runs their handlers and
records each outcome.

One dispatcher task claims as many ready jobs as there are free slots in a single statement;
each claimed job runs in its own task through three short steps: `_execute` (the handler under
middleware, timeout and cancellation, mapped to an Outcome) and `_record` (the lifecycle
transition the outcome calls for). A heartbeat extends the leases of running jobs; a job whose
lease was lost (cancelled elsewhere, or taken over) is stopped. Once a job's handler has
finished, nothing stops it any more: only its record is left, and the record's own
compare-and-set tells whether the job was still held.

The task type's hooks run here, after the end they report is committed: on_completed,
on_failed, and on_cancelled for a job cancelled while it ran here (once its handler stopped), for
the dependents its end cancelled and for follow-ups born cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import traceback
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from carwash_jobs import lifecycle, retry
from carwash_jobs.batcher import Batcher
from carwash_jobs.context import AttemptState, JobContext
from carwash_jobs.errors import (
    IllegalTransition,
    JobNotFound,
    LeaseLost,
    PermanentError,
    RetryLater,
    StoreUnavailable,
)
from carwash_jobs.lifecycle import AttemptOutcome, JobStatus, Transition
from carwash_jobs.middleware import Middleware, chain
from carwash_jobs.queue import EnqueueOptions
from carwash_jobs.store.base import MAX_JSON_DEPTH, Completion, json_text, nested_deeper_than
from carwash_jobs.types import Clock, JobId, utc_now

if TYPE_CHECKING:
    from collections.abc import Awaitable, Mapping, Sequence

    from carwash_jobs.metrics import Metrics
    from carwash_jobs.queue import JobQueue
    from carwash_jobs.store.base import DueJob, JobRow, NewJob

log = logging.getLogger(__name__)

CLAIM_BATCH_MAX = 100
#: how long jobs of a task type found at its fleet-wide concurrency limit wait before the next
#: claim asks again (a job of that type ending in this process asks at once)
FLEET_FULL_BACKOFF_SECONDS = 0.5
#: how often an outcome's record is tried, the waits between doubling from the first: about
#: 16 s in all, well within a lease, which the heartbeat keeps extending meanwhile
RECORD_TRIES = 7
RECORD_RETRY_FIRST_WAIT_SECONDS = 0.25


@dataclass(frozen=True, slots=True)
class Completed:
    result: Any


@dataclass(frozen=True, slots=True)
class Retryable:
    error: str
    traceback: str | None
    outcome: AttemptOutcome
    delay_seconds: float | None = None  #: set by RetryLater; None: the task type's backoff
    count_attempt: bool = True


@dataclass(frozen=True, slots=True)
class Permanent:
    error: str
    traceback: str | None


@dataclass(frozen=True, slots=True)
class Released:
    """Stopped at shutdown: give the job back without counting the attempt."""


@dataclass(frozen=True, slots=True)
class Discarded:
    """The attempt lost the job (cancelled, or its lease lost): there is nothing to record."""

    reason: str


Outcome = Completed | Retryable | Permanent | Released | Discarded


@dataclass(slots=True)
class _Running:
    job: JobRow
    state: AttemptState
    task: asyncio.Task[None] | None = None
    #: the handler is done; what is left is recording its outcome. Its lease may be gone by
    #: then only because that record committed (or was refused): it is not lost, and
    #: cancelling its task could only cut off the hooks and metrics of a committed end
    finished: bool = False
    #: its slot was given back when the handler returned (see QueueProcessor._run)
    slot_released: bool = False
    #: its task has taken its first step: a task cancelled before that never runs its body,
    #: nor the cleanup in it, so a cancel before then only flags the attempt
    started: bool = False
    #: its lease as last written (by its claim, then by each heartbeat that extended it)
    lease_until: datetime | None = None


@dataclass(slots=True)
class ProcessorConfig:
    concurrency: int = 10
    lease: timedelta = timedelta(seconds=60)
    heartbeat_interval: timedelta = timedelta(seconds=15)
    shutdown_grace: timedelta = timedelta(seconds=30)
    middleware: Sequence[Middleware] = ()
    services: Mapping[str, Any] = field(default_factory=dict)
    #: single enqueues in this process start here at once, written claimed, while a slot is
    #: free and nothing is ready (queue.Handoff); off: every job goes through the claim
    handoff: bool = True


class QueueProcessor:
    def __init__(
        self,
        queue: JobQueue,
        *,
        owner: str,
        config: ProcessorConfig,
        metrics: Metrics | None = None,
        clock: Clock = utc_now,
    ) -> None:
        if queue.ready is None:
            raise ValueError("a processor needs a queue with a ready queue")
        self._queue = queue
        self._ready = queue.ready
        self._store = queue.store
        self._registry = queue.registry
        self._owner = owner
        self._config = config
        self._metrics = metrics
        self._clock = clock
        self._running: dict[JobId, _Running] = {}
        self._per_type: dict[str, int] = {}
        #: limited task types that a claim found at their fleet-wide limit, parked for a moment
        self._fleet_full: set[str] = set()
        self._claiming = 0
        #: jobs cancelled while a claim (or a handoff) of this process was in flight and before
        #: they ran here: the claim may have won them just before the cancel, in the same
        #: commit, and must not start them. Kept only while a claim is in flight
        self._cancelled_while_claiming: set[JobId] = set()
        #: slots held by attempts started here; counted apart from _running, which holds one
        #: attempt per job while an older attempt of the same job may still be ending
        self._held = 0
        #: attempts whose handler returned and whose slot was given back while their outcome
        #: is being recorded (leased, heartbeated, but holding no slot)
        self._recording = 0
        self._handoffs = 0  #: enqueues writing a job claimed for this processor, in flight
        self._handoffs_settled = asyncio.Event()
        self._handoffs_settled.set()
        self._slot_free = asyncio.Event()
        self._idle = asyncio.Event()
        self._claims_allowed = asyncio.Event()  #: cleared while heartbeat writes fail
        self._claims_allowed.set()
        self._tasks: list[asyncio.Task[None]] = []
        self._completions: Batcher[Completion, bool] = Batcher(self._complete_many)
        self._stopping = False
        queue.on_cancel(self.cancel_local)
        if config.handoff:
            queue.hand_off_to(self)

    @property
    def owner(self) -> str:
        return self._owner

    @property
    def running_ids(self) -> list[JobId]:
        return list(self._running)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._dispatch_loop(), name="processor-dispatch"),
            loop.create_task(self._heartbeat_loop(), name="processor-heartbeat"),
        ]

    async def stop(self) -> None:
        """Stop claiming, let running jobs finish within the grace period, then give the rest
        back to the queue without counting their attempt.

        A job whose handler has returned by then is only writing its outcome: it is not cut
        off (a cancel there lost its on_completed hook, or on PostgreSQL rolled its completion
        back with the on_complete writes, and the job ran again), but has a grace period more."""
        self._stopping = True
        grace = self._config.shutdown_grace.total_seconds()
        loop = asyncio.get_running_loop()
        # the jobs running get the grace from here, whatever else stop() waits for meanwhile
        deadline = loop.time() + grace
        await self._stop_claiming(deadline)
        await self._stop_running(deadline)
        deadline = loop.time() + grace  # the second grace: for the outcomes being written
        leftover = [r.task for r in self._running.values() if r.task is not None]
        if leftover:  # the releases of those just stopped, and the records in flight
            _, stuck = await asyncio.wait(leftover, timeout=grace)
            for task in stuck:  # left running: its lease runs out and it runs again
                task.cancel()
            if stuck:
                await asyncio.wait(stuck)
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if not await _settle("the last completions", self._completions.close(), deadline):
            self._completions.cancel()  # their jobs' leases run out and they run again

    async def _stop_claiming(self, deadline: float) -> None:
        """End the dispatcher; a claim in flight completes and gives back what it won, and an
        enqueue writing a job claimed for this process hands it over (it runs). Each bounded,
        as every wait of stop() on a write is: a writer held up (a caller's transaction that
        hangs) must not hold the stop."""
        dispatcher = self._tasks[:1]
        for task in dispatcher:
            task.cancel()
        if dispatcher:
            await _settle("a claim in flight", asyncio.wait(dispatcher), deadline)
        await _settle("an enqueue handing its job over", self._handoffs_settled.wait(), deadline)

    async def _stop_running(self, deadline: float) -> None:
        """Let the running handlers finish until `deadline`, then cancel the rest: they give
        their job back without counting the attempt."""
        tasks = [r.task for r in self._running.values() if r.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=max(deadline - asyncio.get_running_loop().time(), 0.0))
        for running in list(self._running.values()):
            if running.task is not None and not running.finished:
                running.state.shutting_down = True
                running.task.cancel()

    def cancel_local(self, job_id: JobId) -> bool:
        """Stop a job running here (it was cancelled, or its lease lost). A job whose handler
        has finished is only flagged: its record finds out by itself whether it still held the
        job (and calls on_cancelled when a cancel won)."""
        running = self._running.get(job_id)
        if running is None or running.task is None:
            if self._claiming:
                self._cancelled_while_claiming.add(job_id)
            return False
        running.state.cancel_requested.set()
        if running.started and not running.finished:
            running.task.cancel()
        return True

    def is_idle(self) -> bool:
        return not self._running and not self._claiming and len(self._ready) == 0

    async def run_until_idle(
        self, timeout: float = 10.0, *, include_timers: bool = False  # noqa: ASYNC109 - bounded by design
    ) -> None:
        """Return once nothing is ready, claiming or running here (and, with include_timers,
        no retry or delayed job is waiting on an in-process timer). For tests and bursts."""
        async with asyncio.timeout(timeout):
            while True:
                await asyncio.sleep(0)
                if self.is_idle() and not (include_timers and self._queue.timers):
                    # settle: a record may have just offered follow-ups
                    await asyncio.sleep(0.001)
                    if self.is_idle() and not (include_timers and self._queue.timers):
                        return
                self._idle.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.05):
                        await self._idle.wait()

    # -- dispatch ----------------------------------------------------------------------
    def _free_slots(self) -> int:
        return self._config.concurrency - self._held - self._claiming

    def _limit_of(self, task_type: str) -> int | None:
        """The task type's fleet-wide concurrency limit (None: unlimited, or unknown here: then
        claim and fail it loudly rather than park it forever)."""
        try:
            return self._registry.get(task_type).options.concurrency
        except Exception:
            return None

    def _has_room(self, task_type: str) -> bool:
        limit = self._limit_of(task_type)
        return limit is None or (
            self._per_type.get(task_type, 0) < limit and task_type not in self._fleet_full
        )

    def _fleet_limits(self, batch: Sequence[DueJob]) -> dict[str, int]:
        """The limits the claim of `batch` must enforce across the fleet: only those of the
        task types in it, so a batch without limited types keeps the plain, fastest claim."""
        limits: dict[str, int] = {}
        for task_type in dict.fromkeys(due.task_type for due in batch):
            limit = self._limit_of(task_type)
            if limit is not None:
                limits[task_type] = limit
        return limits

    def _note_fleet_full(
        self, batch: Sequence[DueJob], claimed: set[JobId], limits: Mapping[str, int]
    ) -> None:
        """A limited task type of which the claim took fewer jobs than asked is (most likely)
        at its limit in other processes: park its jobs here for FLEET_FULL_BACKOFF_SECONDS
        instead of asking the database again at once. What the claim left out is dropped from
        memory, as after a lost race; the scheduler's reload brings back what is still queued."""
        short = {due.task_type for due in batch
                 if due.task_type in limits and due.id not in claimed}
        loop = asyncio.get_running_loop()
        for task_type in short - self._fleet_full:
            self._fleet_full.add(task_type)
            loop.call_later(FLEET_FULL_BACKOFF_SECONDS, self._fleet_room_again, task_type)

    def _fleet_room_again(self, task_type: str) -> None:
        self._fleet_full.discard(task_type)
        self._ready.unpark(task_type)

    def _reserve_slot(self, task_type: str) -> bool:
        """Take a slot of `task_type` if it has room. `take` calls this for each entry it hands
        out, so one batch cannot overshoot the task type's concurrency limit."""
        if not self._has_room(task_type):
            return False
        self._per_type[task_type] = self._per_type.get(task_type, 0) + 1
        return True

    # -- handoff: an enqueue that finds a free slot writes its job claimed (queue.Handoff) ----
    def reserve_handoff(self, task_type: str) -> tuple[str, datetime] | None:
        """A slot for a job written claimed; not for a task type with a fleet-wide limit,
        which only the claim statement can check against the other processes."""
        if not self._tasks or self._stopping or not self._claims_allowed.is_set():
            return None  # not started, or stopping, or its leases may be running out
        if self._free_slots() <= 0 or self._limit_of(task_type) is not None:
            return None
        self._reserve_slot(task_type)  # always room: the type has no limit
        self._claiming += 1
        self._handoffs += 1
        self._handoffs_settled.clear()
        return self._owner, self._clock() + self._config.lease

    def _handoff_settled(self) -> None:
        self._claiming -= 1
        self._handoffs -= 1
        if self._handoffs == 0:
            self._handoffs_settled.set()

    def release_handoff(self, task_type: str) -> None:
        self._handoff_settled()
        self._release_type_slot(task_type)
        self._forget_cancels_once_claims_settle()
        self._slot_free.set()
        self._set_idle_if_idle()

    def start_handoff(self, job: JobRow) -> None:
        self._handoff_settled()
        self._start(job)
        self._forget_cancels_once_claims_settle()

    def _forget_cancels_once_claims_settle(self) -> None:
        """No claim in flight: no job cancelled meanwhile can still come back from one."""
        if not self._claiming:
            self._cancelled_while_claiming.clear()

    async def _dispatch_loop(self) -> None:
        while not self._stopping:
            await self._claims_allowed.wait()
            while self._free_slots() <= 0:
                self._slot_free.clear()
                await self._slot_free.wait()
            await self._ready.wait()
            if not self._claims_allowed.is_set():
                continue  # the heartbeat failed while this loop waited for work
            batch = self._ready.take(min(self._free_slots(), CLAIM_BATCH_MAX), self._reserve_slot)
            if not batch:
                self._set_idle_if_idle()
                continue
            limits = self._fleet_limits(batch)
            rows = await self._claim_batch([d.id for d in batch], limits)
            claimed = {row.id for row in rows}
            if limits:  # before the slots are given back: their parked jobs wait
                self._note_fleet_full(batch, claimed, limits)
            for due in batch:
                if due.id not in claimed:
                    self._release_type_slot(due.task_type)
            for row in rows:
                self._start(row)
            self._forget_cancels_once_claims_settle()
            self._set_idle_if_idle()

    async def _claim_batch(
        self, ids: list[JobId], limits: Mapping[str, int] | None = None
    ) -> list[JobRow]:
        """Claim `ids`. When stop() cancels the dispatcher meanwhile, the claim still commits:
        what it won is given back at once, without counting the attempt, as stop() promises."""
        self._claiming += len(ids)
        claim = asyncio.ensure_future(self._claim(ids, limits))
        try:
            return await asyncio.shield(claim)
        except asyncio.CancelledError:
            rows = await claim
            now = self._clock()
            try:
                await self._store.apply_many([lifecycle.release(r.id, r.fence, now) for r in rows])
            except Exception:
                log.exception("giving back %d jobs claimed at stop failed; their leases will "
                              "expire", len(rows))
            raise
        finally:
            self._claiming -= len(ids)

    async def _claim(
        self, ids: list[JobId], limits: Mapping[str, int] | None = None
    ) -> list[JobRow]:
        """Claim what this process may run; a lost race just leaves an id out, and so does a
        job whose task type is at its fleet-wide limit (`limits`)."""
        lease_until = self._clock() + self._config.lease
        try:
            return await self._store.claim(ids, self._owner, lease_until, limits or None)
        except Exception:
            log.exception("claiming %d jobs failed; the reload will offer them again", len(ids))
            return []

    def _start(self, job: JobRow) -> None:
        previous = self._running.get(job.id)
        if previous is not None:  # its lease expired and this process claimed the job again
            previous.state.lease_lost = True
            self.cancel_local(job.id)
        state = AttemptState(self._store, job.fence, self._build_follow_up)
        if job.id in self._cancelled_while_claiming:
            # the cancel ended this attempt before it started: it goes the way of any attempt
            # stopped by a cancel (no handler run; on_cancelled here, where the row says it ran)
            self._cancelled_while_claiming.discard(job.id)
            state.cancel_requested.set()
        running = _Running(job, state, lease_until=job.lease_until)
        self._running[job.id] = running
        self._held += 1
        running.task = asyncio.get_running_loop().create_task(
            self._run(running), name=f"job-{job.id}"
        )
        if self._metrics is not None:
            self._metrics.running.set(len(self._running))
            pickup = (self._clock() - job.run_at).total_seconds()
            self._metrics.pickup.labels(job.task_type).observe(max(pickup, 0.0))

    async def _run(self, running: _Running) -> None:
        running.started = True
        job = running.job
        try:
            if running.state.cancel_requested.is_set():  # in the commit of its own claim
                outcome: Outcome = Discarded("cancelled before it started")
            else:
                outcome = await self._execute(running)
            running.finished = True  # before the first await of the record: see heartbeat()
            self._release_slot_early(running)
            state = running.state
            if state.progress_timer is not None or state.pending_progress is not None:
                await state.write_pending_progress(job.id)  # a call that came too soon
            await self._record_until_written(job, running.state, outcome)
        except Exception:
            log.exception("recording job %s failed; its lease will expire and it will run again",
                          job.id)
        finally:
            if self._running.get(job.id) is running:  # not a newer attempt of the same job
                del self._running[job.id]
            if running.slot_released:
                self._recording -= 1
            else:
                self._held -= 1
                self._release_type_slot(job.task_type)
            self._fleet_full.discard(job.task_type)  # one of its fleet's slots just came free
            if self._metrics is not None:
                self._metrics.running.set(len(self._running))
            self._slot_free.set()
            self._set_idle_if_idle()

    def _release_slot_early(self, running: _Running) -> None:
        """Give the slot back as the handler returns, not once its outcome is committed: the
        next claim then goes to the writer while this record is in flight, and the two share
        a commit instead of taking turns (on SQLite, 2 commits per job become about 1). The
        job stays in _running, its lease extended, until the record is done.

        Not for a task type with a fleet-wide limit: the claim counts the rows the database
        still has as running, so a slot freed before the record commits would only make the
        next claim of that type come back short and park it."""
        if self._limit_of(running.job.task_type) is not None:
            return
        if self._recording >= self._config.concurrency:
            return  # the records lag behind: claim no faster than they are written
        running.slot_released = True
        self._held -= 1
        self._recording += 1
        self._release_type_slot(running.job.task_type)
        self._slot_free.set()

    def _release_type_slot(self, task_type: str) -> None:
        self._per_type[task_type] = max(self._per_type.get(task_type, 1) - 1, 0)
        self._ready.unpark(task_type)

    def _set_idle_if_idle(self) -> None:
        if self.is_idle():
            self._idle.set()

    # -- one job -----------------------------------------------------------------------
    async def _execute(self, running: _Running) -> Outcome:
        """Run the handler under middleware, timeout and cancellation; map how it ended."""
        job, state = running.job, running.state
        deadline: asyncio.Timeout | None = None
        try:
            task_type = self._registry.get(job.task_type)
            payload = task_type.validate_payload(job.payload)
            ctx = JobContext(job, self._config.services, state)
            timeout = self._registry.timeout(task_type)
            # no scope for a task type without a timeout: asyncio.timeout(None) costs 1.7 us a
            # job, a null context 0.3 (measured)
            scope = asyncio.timeout(timeout.total_seconds()) if timeout else contextlib.nullcontext()
            async with scope as deadline:
                result = await chain(
                    self._config.middleware, ctx, lambda: task_type.handler(ctx, payload)
                )
        except asyncio.CancelledError as exc:
            if state.shutting_down:
                return Released()
            if state.cancel_requested.is_set():
                return Discarded("cancelled" if not state.lease_lost else "lease lost")
            task = asyncio.current_task()
            if task is not None and not task.cancelling():
                # the handler awaited something that was cancelled (its own task was not): its
                # failure, recorded as any error is. Raised on, it ended the attempt without a
                # record, running until its lease ran out and then blamed on a lost worker
                return Retryable(_describe(exc) or "CancelledError", traceback.format_exc(),
                                 AttemptOutcome.error)
            raise
        except TimeoutError as exc:
            if deadline is None or not deadline.expired():  # the handler's own TimeoutError
                return Retryable(_describe(exc), traceback.format_exc(), AttemptOutcome.error)
            return Retryable(f"timed out after {timeout}", None, AttemptOutcome.timeout)
        except LeaseLost:
            return Discarded("lease lost")
        except Exception as exc:
            return _raised(exc)
        return _completed(result)

    async def _record_until_written(
        self, job: JobRow, state: AttemptState, outcome: Outcome
    ) -> None:
        """Record the outcome; a write that failed on its way to the database (SQLite's lock
        held by another program past the busy timeout, a dropped connection) is tried again
        while the job stays leased here (the heartbeat extends it). Given up at once, the
        outcome was lost: the job ran again once its lease ran out, and a success on its last
        attempt ended failed as a lost worker."""
        wait = RECORD_RETRY_FIRST_WAIT_SECONDS
        for tries in range(1, RECORD_TRIES + 1):
            try:
                await self._record(job, state, outcome)
                return
            except StoreUnavailable:
                raise  # the store is closing: nothing to wait for
            except Exception as exc:
                if tries == RECORD_TRIES or state.lease_lost:
                    raise
                log.warning("job %s: recording attempt %d failed (%s); trying again in %.2fs",
                            job.id, job.attempts, _describe(exc), wait)
            await asyncio.sleep(wait)
            wait *= 2

    async def _record(self, job: JobRow, state: AttemptState, outcome: Outcome) -> None:
        """Write the outcome as the lifecycle transition it calls for."""
        if isinstance(outcome, Discarded):
            log.info("job %s attempt %d ended without a record: %s", job.id, job.attempts,
                     outcome.reason)
            await self._hook_if_cancelled_here(job, state)
            return
        if isinstance(outcome, Completed) and not state.follow_ups and not state.finalizers:
            await self._record_completion(job, state, outcome)
            return
        transition = self._transition_for(job, state, outcome)
        try:
            if isinstance(outcome, Completed):
                applied = await self._store.apply(
                    transition, follow_ups=state.follow_ups,
                    before=_all(state.finalizers) if state.finalizers else None,
                )
            else:
                applied = await self._store.apply(transition)
        except (IllegalTransition, JobNotFound) as exc:
            log.info("job %s: outcome of attempt %d discarded: %s", job.id, job.attempts, exc)
            await self._hook_if_cancelled_here(job, state)
            return
        except Exception as exc:
            if not isinstance(outcome, Completed) or isinstance(exc, StoreUnavailable):
                raise
            # an on_complete write or a follow-up failed, and the completion with it: the
            # attempt failed, with that error (left running, it waited for its lease to run out
            # and was recorded as a lost worker)
            log.warning("job %s: completing attempt %d failed: %s", job.id, job.attempts,
                        _describe(exc))
            await self._record(job, state, _completion_failed(exc))
            return
        self._queue.offer([applied.job, *applied.woken])
        if state.follow_ups:
            follow_ups = {f.id for f in state.follow_ups}
            self._queue.count_enqueued(
                new for new in [*applied.woken, *applied.cancelled] if new.id in follow_ups
            )
        self._count(applied.job, outcome)
        await self._registry.run_hooks(applied)

    async def _record_completion(self, job: JobRow, state: AttemptState, outcome: Completed) -> None:
        """The hot path: completions of many jobs share one set-based write."""
        done = await self._completions.submit(Completion(job.id, state.fence, outcome.result))
        if not done:
            log.info("job %s: completion of attempt %d discarded: it no longer holds the job",
                     job.id, job.attempts)
            await self._hook_if_cancelled_here(job, state)
            return
        if self._metrics is not None:
            self._metrics.completed.labels(job.task_type).inc()
        if self._registry.hook(job.task_type, JobStatus.completed) is not None:
            try:
                row = await self._store.get(job.id)
            except Exception as exc:  # the completion is committed: no retry may write it again
                log.warning("job %s: on_completed not run, reading the completed job failed: %s",
                            job.id, _describe(exc))
                return
            await self._registry.run_hook(row)

    async def _hook_if_cancelled_here(self, job: JobRow, state: AttemptState) -> None:
        """The attempt ended without a record of its own. If that is because the job was
        cancelled while this attempt held it, the job ended there and this process is the one
        that saw it (its handler has stopped now): call on_cancelled.

        The row decides, not the way the handler stopped: a cancel reaches it as a task cancel
        (from this process, or a notice), or as a refused checkpoint or completion when another
        process cancelled first. The cancel records the running attempt, with its number and
        owner, so a lost lease (another attempt carries on, and may be cancelled there) calls
        no hook here."""
        if self._registry.hook(job.task_type, JobStatus.cancelled) is None:
            return
        try:
            row = await self._store.get(job.id)
        except JobNotFound:
            return
        last = row.attempt_history[-1] if row.attempt_history else {}
        if (row.status == JobStatus.cancelled
                and last.get("outcome") == AttemptOutcome.cancelled.value
                and last.get("attempt") == state.fence.attempt
                and last.get("owner") == state.fence.owner):
            await self._registry.run_hook(row)

    async def _complete_many(self, completions: Sequence[Completion]) -> list[bool]:
        result = await self._store.complete_many(completions)
        self._queue.offer(result.woken)
        return [c.job_id in result.completed for c in completions]

    def _transition_for(self, job: JobRow, state: AttemptState, outcome: Outcome) -> Transition:
        now = self._clock()
        fence = state.fence
        if isinstance(outcome, Completed):
            return lifecycle.complete(job.id, fence, outcome.result, now)
        if isinstance(outcome, Released):
            return lifecycle.release(job.id, fence, now)
        if isinstance(outcome, Permanent):
            return lifecycle.fail(job.id, fence, outcome.error, outcome.traceback,
                                  AttemptOutcome.error, now)
        assert isinstance(outcome, Retryable)
        policy = (self._registry.get(job.task_type).options.retry
                  if job.task_type in self._registry else retry.RetryPolicy())
        if outcome.delay_seconds is not None and (
            not outcome.count_attempt or job.attempts < job.max_attempts
        ):
            run_at = now + timedelta(seconds=outcome.delay_seconds)
        else:
            run_at = retry.next_attempt_at(job.attempts, job.max_attempts, now, policy)  # type: ignore[assignment]
        if run_at is None:
            return lifecycle.fail(job.id, fence, outcome.error, outcome.traceback,
                                  outcome.outcome, now)
        return lifecycle.schedule_retry(job.id, fence, run_at, outcome.error, outcome.traceback,
                                        outcome.outcome, now, count_attempt=outcome.count_attempt)

    def _count(self, job: JobRow, outcome: Outcome) -> None:
        if self._metrics is None:
            return
        if isinstance(outcome, Retryable) and not outcome.count_attempt:
            return  # RetryLater that does not count the attempt (a rate limit's wait): no failure
        counter = {
            JobStatus.completed: self._metrics.completed,
            JobStatus.failed: self._metrics.failed,
            JobStatus.scheduled: self._metrics.retried,
        }.get(job.status)
        if counter is not None:
            counter.labels(job.task_type).inc()

    def _build_follow_up(
        self, task_type: str, payload: Mapping[str, Any], options: Mapping[str, Any]
    ) -> NewJob:
        return self._queue.build(task_type, payload, EnqueueOptions.from_mapping(options))

    # -- heartbeat ---------------------------------------------------------------------
    async def _heartbeat_loop(self) -> None:
        interval = self._config.heartbeat_interval.total_seconds()
        while True:
            await asyncio.sleep(interval)
            await self.heartbeat()

    async def heartbeat(self) -> None:
        """Extend the leases of running jobs; stop the ones this process no longer holds.
        While the write fails, claim nothing new (the leases may be running out).

        The running jobs are read before the write and looked at again after it. A job that
        finished meanwhile (or already had, and is recording its outcome) may be missing from
        the write's answer only because its own record committed first: it is not lost, and is
        left alone. So is a job claimed again meanwhile: its claim wrote a fresh lease."""
        before = dict(self._running)
        lease_until = self._clock() + self._config.lease
        try:
            held = await self._extend_leases(list(before), lease_until)
        except Exception:
            log.exception("heartbeat failed: not claiming new jobs until it succeeds")
            self._claims_allowed.clear()
            self._stop_leases_running_out(before)
            return
        self._claims_allowed.set()
        for job_id, seen in before.items():
            running = self._running.get(job_id)
            if running is not seen or seen.finished:
                continue
            if job_id in held:
                seen.lease_until = lease_until
                continue
            log.warning("job %s: lease lost; stopping it", job_id)
            seen.state.lease_lost = True
            self.cancel_local(job_id)

    async def _extend_leases(self, ids: list[JobId], lease_until: datetime) -> set[JobId]:
        """The heartbeat's write, given half an interval: a write to a database that vanished
        without a word (a half-open connection) neither ends nor fails, and the heartbeat
        would wait with it, stopping nothing. Its task is cancelled, not awaited: the cancel
        of such a write may not end either."""
        write = asyncio.ensure_future(self._store.extend_leases(self._owner, ids, lease_until))
        if not await _done_within(write, self._config.heartbeat_interval.total_seconds() / 2):
            raise TimeoutError("the database did not answer the lease extension within half "
                               "a heartbeat interval")
        return write.result()

    def _stop_leases_running_out(self, seen: dict[JobId, _Running]) -> None:
        """While the heartbeat cannot write (the database is out of reach from here), stop the
        jobs whose leases would otherwise run out before the heartbeat after next: once a
        lease has run out, another process may claim the job, and two attempts of it would
        run at once. The next heartbeat ends within one and a half intervals (its write is
        given half of one); the other half is the margin left for the hosts' clocks and for
        the handler to stop. Stopped, this attempt ends as a lost lease does; the job runs
        again once its lease has run out (here, or in a process that reaches the database)."""
        horizon = self._clock() + 2 * self._config.heartbeat_interval
        for job_id, running in seen.items():
            if self._running.get(job_id) is not running or running.finished:
                continue  # ended meanwhile, or recording its end (its record finds out)
            if running.lease_until is None or running.lease_until > horizon:
                continue
            log.warning("job %s: its lease runs out before the database can be reached to "
                        "extend it; stopping it", job_id)
            running.state.lease_lost = True
            self.cancel_local(job_id)


async def _done_within(task: asyncio.Future[Any], seconds: float) -> bool:
    """Wait for `task` at most `seconds`; False if it is still going then, and it is cancelled
    but not awaited: the cancel of a write to a database that vanished without a word (a
    half-open connection) may not end either. Its outcome is read when it comes, so that an
    abandoned task's error is not reported as never retrieved."""
    task.add_done_callback(_retrieved)
    try:
        done, _ = await asyncio.wait([task], timeout=max(seconds, 0.0))
    finally:
        if not task.done():
            task.cancel()
    return bool(done)


def _retrieved(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


async def _settle(what: str, waiting: Awaitable[Any], deadline: float) -> bool:
    """Wait for `waiting` until `deadline` (the loop's time); False, with a warning, if it is
    still going then (it is cancelled; what it writes may be cut off when the store stops)."""
    loop = asyncio.get_running_loop()
    if await _done_within(asyncio.ensure_future(waiting), deadline - loop.time()):
        return True
    log.warning("stopping: %s is still waiting for the database; not waiting for it", what)
    return False


def _all(finalizers: list[Any]) -> Any:
    async def run(tx: Any) -> None:
        for fn in finalizers:
            await fn(tx)

    return run


def _raised(exc: Exception) -> Retryable | Permanent:
    """The outcome of an attempt that raised `exc` (called while it is being handled, for its
    traceback): RetryLater at its time, PermanentError for good, anything else by policy."""
    if isinstance(exc, RetryLater):
        return Retryable(exc.reason, None, AttemptOutcome.error if exc.count_attempt
                         else AttemptOutcome.throttled, exc.delay_seconds, exc.count_attempt)
    if isinstance(exc, PermanentError):
        return Permanent(_describe(exc), traceback.format_exc())
    return Retryable(_describe(exc), traceback.format_exc(), AttemptOutcome.error)


def _completion_failed(exc: Exception) -> Outcome:
    """The outcome of an attempt whose handler returned but whose completion (its on_complete
    writes, its follow-ups) raised: as if the handler had raised it, told apart in the error."""
    outcome = _raised(exc)
    return replace(outcome, error=f"completing the job failed: {outcome.error}")


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _completed(result: Any) -> Outcome:
    """The result as it will be stored, checked here, per job: completions are written many at
    a time, and one value with no JSON form (NaN included, which a model's float field takes)
    would fail them all. Such a result is a bug in the handler, and another attempt would
    return the same: the job fails for good."""
    try:
        value = result.model_dump(mode="json") if isinstance(result, BaseModel) else result
        if value is not None:
            json_text(value)
    except (TypeError, ValueError, RecursionError) as exc:  # ValueError: a circular value, NaN,
        return Permanent(f"the result is not JSON: {exc}", None)  # or pydantic's own refusal
    if value is not None and nested_deeper_than(value, MAX_JSON_DEPTH):  # see MAX_JSON_DEPTH
        return Permanent(f"the result nests deeper than {MAX_JSON_DEPTH} levels", None)
    return Completed(value)


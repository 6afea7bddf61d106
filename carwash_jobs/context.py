"""JobContext: everything a handler may touch, and nothing more.

A handler gets `(ctx, payload)`. Through `ctx` it reports progress, saves a checkpoint that the
next attempt reads back (so a retry resumes instead of redoing), checks for cancellation,
queues follow-up jobs, adds final writes that commit together with the job's completion, and
paces itself with rate limits that hold across the fleet.
It never sees the queue or the store directly.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from carwash_jobs.errors import LeaseLost
from carwash_jobs.ratelimit import FleetRate

if TYPE_CHECKING:
    from carwash_jobs.lifecycle import Fence
    from carwash_jobs.store.base import JobRow, JobStore, NewJob, T, TxFn
    from carwash_jobs.types import JobId

#: progress writes closer together than this are coalesced: one that comes too soon is written
#: when the interval has passed, or as the attempt ends, whichever is first
PROGRESS_INTERVAL_SECONDS = 0.25

#: the jobs' logger (each job's lines go through a JobLogger of it)
log = logging.getLogger("carwash_jobs.processor")
#: the context of a job enqueued without one: read-only, so no handler can change it for the next
_NO_CONTEXT: Mapping[str, Any] = MappingProxyType({})

BuildJob = Callable[[str, Mapping[str, Any], Mapping[str, Any]], "NewJob"]


@dataclass(slots=True)
class AttemptState:
    """The mutable side of one attempt, owned by the processor."""

    store: JobStore
    fence: Fence
    build_job: BuildJob
    cancel_requested: asyncio.Event = field(default_factory=asyncio.Event)
    follow_ups: list[NewJob] = field(default_factory=list)
    finalizers: list[TxFn[None]] = field(default_factory=list)
    last_progress_at: float = 0.0
    #: (done, total) of the last progress call that came too soon, not yet written
    pending_progress: tuple[int, int | None] | None = None
    #: the task that writes pending_progress once the interval has passed (it sleeps, then
    #: writes); referenced until it ends, and every later write waits for its write
    progress_timer: asyncio.Task[None] | None = None
    progress_timer_writing: bool = False
    lease_lost: bool = False
    shutting_down: bool = False

    async def write(self, job_id: JobId, *, done: int | None = None, total: int | None = None,
                    checkpoint: dict[str, Any] | None = None) -> None:
        """Write progress and/or a checkpoint for this attempt; LeaseLost if it no longer
        holds the job (and the attempt is told to stop). After a held-back write in flight:
        on PostgreSQL the two would take two connections, and the older could commit last."""
        if done is not None:  # newer than anything held back
            self._drop_pending_progress()
        await self._held_back_write_done()
        held = await self.store.save_progress(
            job_id, self.fence, done=done, total=total, checkpoint=checkpoint
        )
        if not held:
            self.lease_lost = True
            self.cancel_requested.set()
            raise LeaseLost()

    def defer_progress(self, job_id: JobId, done: int, total: int | None, delay: float) -> None:
        """Keep a progress call that came too soon, to write it `delay` seconds from now
        (dropped, a handler that then worked on without reporting showed an old count)."""
        self.pending_progress = (done, total)
        if self.progress_timer is None:
            self.progress_timer = asyncio.get_running_loop().create_task(
                self._write_pending_later(job_id, delay), name=f"progress-{job_id}"
            )

    async def write_pending_progress(self, job_id: JobId) -> None:
        """Write the progress call still held back, if any, once a held-back write in flight
        is done (the processor calls this as the handler returns or fails, before the attempt
        is recorded). A report: a failure to write it does not change how the attempt ends."""
        pending = self.pending_progress
        self._drop_pending_progress()
        if pending is None or self.cancel_requested.is_set():  # it would be refused
            await self._held_back_write_done()
            return
        self.last_progress_at = time.monotonic()
        try:
            await self.write(job_id, done=pending[0], total=pending[1])
        except LeaseLost:
            pass
        except Exception as exc:  # the attempt's own outcome decides, not this report
            log.warning("job %s: writing its progress failed: %s", job_id, exc)

    def _drop_pending_progress(self) -> None:
        self.pending_progress = None
        if self.progress_timer is not None and not self.progress_timer_writing:
            self.progress_timer.cancel()  # still asleep: it has written nothing
            self.progress_timer = None

    async def _held_back_write_done(self) -> None:
        timer = self.progress_timer
        if timer is not None and self.progress_timer_writing and timer is not asyncio.current_task():
            await asyncio.wait([timer])  # not cancelled with the caller: it ends by itself

    async def _write_pending_later(self, job_id: JobId, delay: float) -> None:
        await asyncio.sleep(delay)
        self.progress_timer_writing = True
        try:
            await self.write_pending_progress(job_id)
        finally:
            self.progress_timer_writing = False
            self.progress_timer = None
        if self.pending_progress is not None:  # a call that came while it wrote
            done, total = self.pending_progress
            self.defer_progress(job_id, done, total, PROGRESS_INTERVAL_SECONDS)


class JobLogger(logging.LoggerAdapter[logging.Logger]):
    """Prefixes every line with the job and attempt and passes them on as `extra` fields."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        extra = dict(self.extra or {})
        kwargs["extra"] = {**extra, **kwargs.get("extra", {})}
        return f"[{extra['job_id']} {extra['task_type']}#{extra['attempt']}] {msg}", kwargs


@dataclass(frozen=True, slots=True)
class JobContext:
    """Frozen, as the row it carries is: a handler reads it and acts through its methods.

    Made for every attempt, so it holds only what it is given and reads the rest from the row
    when asked: a frozen dataclass sets each field through object.__setattr__ (nine fields
    took 1.3 us a job, these four 0.4; measured), and the logger is made on first use."""

    job: JobRow
    #: process-wide services a task type needs (settings, SMTP, ...), keyed by name
    services: Mapping[str, Any]
    _state: AttemptState = field(repr=False)
    _logger: JobLogger | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def job_id(self) -> JobId:
        return self.job.id

    @property
    def attempt(self) -> int:
        return self.job.attempts

    @property
    def task_type(self) -> str:
        return self.job.task_type

    @property
    def checkpoint(self) -> dict[str, Any] | None:
        """What the last attempt saved with save_checkpoint, or None on a first attempt."""
        return self.job.checkpoint

    @property
    def context(self) -> Mapping[str, Any]:
        """The small JSON object the enqueuer passed (who asked, from where). Read-only, as the
        row it comes from is, whether the enqueuer passed one or not."""
        return MappingProxyType(self.job.context) if self.job.context else _NO_CONTEXT

    @property
    def logger(self) -> logging.LoggerAdapter[logging.Logger]:
        """Lines prefixed with the job and attempt, which also go out as `extra` fields."""
        if self._logger is None:
            logger = JobLogger(log, {"job_id": self.job.id, "task_type": self.job.task_type,
                                     "attempt": self.job.attempts})
            object.__setattr__(self, "_logger", logger)  # once, as the frozen __init__ does
            return logger
        return self._logger

    async def progress(self, done: int, total: int | None = None) -> None:
        """Report progress; frequent calls are coalesced so a tight loop does not flood the
        database."""
        state = self._state
        if state.lease_lost:  # a held-back write found the job gone: stop as a write would
            raise LeaseLost()
        now = time.monotonic()
        final = total is not None and done >= total
        wait = state.last_progress_at + PROGRESS_INTERVAL_SECONDS - now
        if not final and wait > 0:
            state.defer_progress(self.job_id, done, total, wait)
            return
        state.last_progress_at = now
        await state.write(self.job_id, done=done, total=total)

    async def save_checkpoint(self, data: dict[str, Any], *, done: int | None = None,
                              total: int | None = None) -> None:
        """Persist where this job has got to; the next attempt receives it as `checkpoint`.
        Raises LeaseLost if this attempt no longer holds the job."""
        await self._state.write(self.job_id, checkpoint=data, done=done, total=total)

    def cancelled(self) -> bool:
        """True once the job was cancelled or its lease lost: stop at the next safe point."""
        return self._state.cancel_requested.is_set()

    def enqueue(self, task_type: str, payload: Mapping[str, Any], **options: Any) -> JobId:
        """Queue a follow-up job, inserted in the same transaction that completes this one:
        if this job does not complete, the follow-up never exists."""
        job = self._state.build_job(task_type, payload, options)
        self._state.follow_ups.append(job)
        return job.id

    def on_complete(self, fn: TxFn[None]) -> None:
        """Run `fn(tx)` inside the transaction that marks this job completed, so the job's
        final database writes happen exactly once."""
        self._state.finalizers.append(fn)

    async def transaction(self, fn: TxFn[T]) -> T:
        """Run domain writes in their own transaction now (checkpoint after, to resume)."""
        return await self._state.store.transaction(fn)

    def rate_limit(self, name: str, per_minute: int) -> FleetRate:
        """A pace shared by every process on the database (e.g. mail a minute): call
        `await limit.wait()` before each unit. Its slots are kept in the database, so the limit
        holds for the fleet, not once per process."""
        return FleetRate(self._state.store, name, per_minute)

"""JobQueue: the write-through queue. Every enqueue commits its row first, then hands the id
to this process's in-memory ReadyQueue at once; a job due later waits on a timer (or, further
out, for the scheduler's reload). The operations an admin needs (cancel, retry-failed, rerun,
reload, stats) live here too, so the HTTP API and the CLI call the same code.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from carwash_jobs import lifecycle, tracing, uploads
from carwash_jobs.batcher import Batcher
from carwash_jobs.errors import IllegalTransition, InvalidPayload, WriteInsideTransaction
from carwash_jobs.lifecycle import JobStatus
from carwash_jobs.store.base import (
    MAX_JSON_DEPTH,
    DueJob,
    FailedFilter,
    Inserted,
    JobRow,
    JobStore,
    NewJob,
    Notice,
    Stats,
    T,
    Tx,
    TxFn,
    as_utc,
    json_types_text,
    nested_deeper_than,
)
from carwash_jobs.types import (
    MAX_DELAY_SECONDS,
    Clock,
    JobId,
    new_job_ids,
    storable_text_problem,
    utc_now,
)

if TYPE_CHECKING:
    from pydantic import BaseModel

    from carwash_jobs.metrics import Metrics
    from carwash_jobs.ready import ReadyQueue
    from carwash_jobs.registry import AnyTaskType, TaskRegistry

log = logging.getLogger(__name__)

MAX_CONTEXT_BYTES = 4096
#: priorities fit a 32-bit column (PostgreSQL's INTEGER), either way from 0
PRIORITY_MAX = 2**31 - 1
MAX_ATTEMPTS_MAX = 2**31 - 1
#: worker_queue.queue is a VARCHAR(64)
QUEUE_NAME_MAX_LENGTH = 64
#: failed jobs a bulk retry moves in one transaction (it goes on until none is left). Measured
#: on 50,000: PostgreSQL 13,500 jobs/s in batches of 1,000 and 8,600 in batches of 10,000 (each
#: job's change of the finished-jobs counter reaches that row through every version the
#: transaction wrote before it); SQLite 29,000 either way, its writer held a tenth as long
RETRY_BATCH = 1_000
#: worker_queue.idempotency_key is a VARCHAR(255)
IDEMPOTENCY_KEY_MAX_LENGTH = 255
#: a job a dependency names is looked up by id: a job id has 32 characters; room for others'
DEPENDENCY_ID_MAX_LENGTH = 100
#: a job due within this many seconds waits on an in-process timer; later ones, for the reload
TIMER_HORIZON_SECONDS = 300.0


@dataclass(frozen=True, slots=True)
class EnqueueOptions:
    """What an enqueue may set beside the payload; None means the task type's default."""

    run_at: datetime | None = None
    delay_seconds: float | None = None
    priority: int | None = None
    max_attempts: int | None = None
    queue: str | None = None
    tags: Sequence[str] = ()
    idempotency_key: str | None = None
    context: Mapping[str, Any] | None = None
    depends_on: Sequence[JobId] = ()

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> EnqueueOptions:
        """The options given as plain data (a handler's follow-up, the CLI's JSON): `run_at` may
        be ISO 8601 text. The values are checked where they are used, as any options are."""
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise InvalidPayload(sorted(unknown)[0], "unknown enqueue option")
        run_at = values.get("run_at")
        if isinstance(run_at, str):
            try:
                values = {**values, "run_at": datetime.fromisoformat(run_at)}
            except ValueError:
                raise InvalidPayload("run_at", "not an ISO 8601 time, e.g. 2030-01-31T08:00Z") from None
        return cls(**values)


@dataclass(frozen=True, slots=True)
class QueueStats:
    in_memory: int
    stats: Stats


class Handoff(Protocol):
    """A processor in this process that can start a job the moment its row commits.

    An enqueue that finds the processor with a free slot and nothing ready ahead of it writes
    the job already claimed by that processor: one commit to a running handler instead of
    two (the insert, then the claim), which halves pickup latency on an idle queue."""

    def reserve_handoff(self, task_type: str) -> tuple[str, datetime] | None:
        """Hold a slot for a job of `task_type`: (lease owner, lease end), or None for no."""

    def release_handoff(self, task_type: str) -> None:
        """Give back a slot reserve_handoff() held, for a job that was not written claimed."""

    def start_handoff(self, job: JobRow) -> None:
        """Run a job written claimed in a slot reserve_handoff() held."""


@dataclass(slots=True)
class _Listeners:
    on_cancel: list[Callable[[JobId], object]] = field(default_factory=list)


class JobQueue:
    """The one queue of a process. Built by the Runtime, never at import time."""

    def __init__(
        self,
        store: JobStore,
        registry: TaskRegistry,
        *,
        ready: ReadyQueue | None,
        metrics: Metrics | None = None,
        clock: Clock = utc_now,
        files_dir: str | None = None,
    ) -> None:
        self.store = store
        self.registry = registry
        #: where uploads live (settings.files_dir): a rerun copies its source's upload there
        self._files_dir = files_dir
        self.ready = ready  #: None in a process that runs no processor (role api)
        self._metrics = metrics
        self._clock = clock
        self._timers: dict[JobId, asyncio.TimerHandle] = {}
        self._handoff: Handoff | None = None
        self._listeners = _Listeners()
        self._background: set[asyncio.Task[int]] = set()
        self._plain_inserts: Batcher[NewJob, Inserted] = Batcher(self._insert_plain)

    # -- enqueue -----------------------------------------------------------------------
    def build(
        self,
        task_type_name: str,
        payload: Mapping[str, Any] | BaseModel,
        options: EnqueueOptions = EnqueueOptions(),
        *,
        rerun_of: JobId | None = None,
    ) -> NewJob:
        """Validate and fill in defaults: the row this enqueue would write."""
        task_type = self.registry.get(task_type_name)
        payload_json = task_type.validate_payload(payload).model_dump(mode="json")
        try:  # here, not in the store: concurrent single enqueues share one insert (batcher.py)
            json_types_text(payload_json)
        except ValueError as exc:
            refused = _non_finite_field([payload_json], bulk=False)
            if refused is None:
                raise
            raise refused from exc
        (job,) = self._new_jobs(task_type, [payload_json], options, rerun_of)
        return job

    def build_many(
        self,
        task_type_name: str,
        payloads: Iterable[Mapping[str, Any] | BaseModel],
        options: EnqueueOptions = EnqueueOptions(),
    ) -> list[NewJob]:
        """build() for many payloads that share their options: the options are checked once
        and the payloads parsed in one pydantic call, not once per job."""
        task_type = self.registry.get(task_type_name)
        return self._new_jobs(task_type, task_type.dump_payloads(payloads), options, None)

    def _new_jobs(
        self,
        task_type: AnyTaskType,
        payloads: list[dict[str, Any]],
        options: EnqueueOptions,
        rerun_of: JobId | None,
    ) -> list[NewJob]:
        now = self._clock()
        run_at = _run_at(options, now)
        queue = _bounded_text("queue", options.queue, QUEUE_NAME_MAX_LENGTH) or task_type.options.queue
        priority = _priority(options, task_type.options.priority)
        max_attempts = _max_attempts(options, self.registry.max_attempts(task_type))
        tags = tuple(_tags(options.tags))
        context = _context(options.context)
        depends_on = _depends_on(options)
        idempotency_key = _bounded_text(
            "idempotency_key", options.idempotency_key, IDEMPOTENCY_KEY_MAX_LENGTH
        )
        return [
            NewJob(
                id=job_id, task_type=task_type.name, payload=payload,
                status=JobStatus.queued,  # the store decides with the dependencies and run_at
                run_at=run_at, created_at=now, queue=queue, priority=priority,
                max_attempts=max_attempts, tags=tags,
                context=None if context is None else dict(context),  # one per job: a dict is mutable
                idempotency_key=idempotency_key, rerun_of=rerun_of, depends_on=depends_on,
            )
            for job_id, payload in zip(new_job_ids(len(payloads)), payloads, strict=True)
        ]

    async def enqueue(
        self,
        task_type: str,
        payload: Mapping[str, Any] | BaseModel,
        options: EnqueueOptions = EnqueueOptions(),
        *,
        tx: Tx | None = None,
    ) -> Inserted:
        """Commit one job and offer it to this process's workers. With `tx`, the job is part of
        the caller's transaction (see `transaction`) and is offered after that commits."""
        with tracing.span(f"enqueue {task_type}", **{"job.task_type": task_type}) as span:
            job = self.build(task_type, payload, options)
            slot = self._reserve_handoff(job) if tx is None else None
            if slot is None:
                (inserted,) = await self.insert([job], tx=tx)
            else:
                inserted = await self._insert_claimed(
                    replace(job, claimed_by=slot[0], lease_until=slot[1])
                )
            span.set_attribute("job.id", inserted.job.id)
        return inserted

    def hand_off_to(self, handoff: Handoff) -> None:
        """Let single enqueues start on `handoff` at once when it is idle (see Handoff)."""
        self._handoff = handoff

    def _reserve_handoff(self, job: NewJob) -> tuple[str, datetime] | None:
        """A slot, when nothing stands ahead of this job: nothing ready in memory (a ready job
        may have a higher priority), no dependency to wait for, due now."""
        if self._handoff is None or self.ready is None or len(self.ready) > 0:
            return None
        if job.depends_on or job.run_at > self._clock():
            return None
        return self._handoff.reserve_handoff(job.task_type)

    async def _insert_claimed(self, job: NewJob) -> Inserted:
        """Write the job claimed for this process's processor, then start it there. The write
        goes on when the caller gives up (a client's timeout cancels the enqueue): once written
        claimed, nobody else would run the job before its lease ran out, so it runs here."""
        assert self._handoff is not None
        # counts it; offers nothing (it runs)
        write = asyncio.ensure_future(self.insert([job]))
        try:
            (inserted,) = await asyncio.shield(write)
        except asyncio.CancelledError:
            write.add_done_callback(lambda _: self._settle_handoff(job, write))
            raise
        except BaseException:
            self._handoff.release_handoff(job.task_type)
            raise
        self._start_or_release(job, inserted)
        return inserted

    def _settle_handoff(self, job: NewJob, write: asyncio.Future[list[Inserted]]) -> None:
        """The caller was cancelled while its claimed job was being written: start the job if
        the write went through, give the slot back if not."""
        assert self._handoff is not None
        if write.cancelled() or write.exception() is not None:
            self._handoff.release_handoff(job.task_type)
        else:
            self._start_or_release(job, write.result()[0])

    def _start_or_release(self, job: NewJob, inserted: Inserted) -> None:
        assert self._handoff is not None
        if inserted.created and inserted.job.status == JobStatus.running:
            self._handoff.start_handoff(inserted.job)
        else:  # its idempotency key found an existing job: that one is not ours to run
            self._handoff.release_handoff(job.task_type)

    async def enqueue_many(
        self,
        task_type: str,
        payloads: Iterable[Mapping[str, Any] | BaseModel],
        options: EnqueueOptions = EnqueueOptions(),
    ) -> list[Inserted]:
        """Bulk enqueue: every row in one commit, or none."""
        if options.idempotency_key is not None:
            raise InvalidPayload("idempotency_key", "cannot be shared by a bulk enqueue")
        jobs = self.build_many(task_type, payloads, options)
        try:
            return await self.insert(jobs)
        except ValueError as exc:  # the store's encoder refused a payload, before any write
            refused = _non_finite_field([job.payload for job in jobs], bulk=True)
            if refused is None:
                raise
            raise refused from exc

    async def insert(self, jobs: Sequence[NewJob], *, tx: Tx | None = None) -> list[Inserted]:
        """Write jobs that build() or build_many() made. build() has refused a payload holding
        NaN or an infinity; build_many() leaves that to the store, whose ValueError reaches the
        caller here (enqueue_many names the field instead)."""
        if tx is None and len(jobs) == 1 and jobs[0].plain:
            # concurrent single enqueues share one set-based write (see batcher.py). Inside a
            # transaction function of a SQLite store it would wait for that function; the
            # store's own check (its writer's) cannot see that from the batcher's task
            if self.store.in_own_transaction():
                raise WriteInsideTransaction()
            results = [await self._plain_inserts.submit(jobs[0])]
        else:
            # the store joins only its own Tx: hand it the one a _QueueTx wraps
            results = await self.store.insert(jobs, tx=tx._tx if isinstance(tx, _QueueTx) else tx)
        created = [r.job for r in results if r.created]
        if isinstance(tx, _QueueTx):  # counted and offered once the transaction commits
            tx.inserted.extend(created)
            return results
        # a store Tx of the caller's own (ctx.transaction's): its commit is not seen here, so
        # its jobs count now, even if it rolls back afterwards
        self.count_enqueued(created)
        if tx is None:
            self.offer(created)
            await self._hooks_of_born_cancelled(created)
        return results

    def count_enqueued(self, jobs: Iterable[JobRow]) -> None:
        """The enqueued counter, for every job a committed write created: an enqueue, a
        follow-up written with its job's completion, a cron fire."""
        if self._metrics is not None:
            for job in jobs:
                self._metrics.enqueued.labels(job.task_type).inc()

    def count_failed(self, jobs: Iterable[JobRow]) -> None:
        """The failed counter, for the jobs that a lease check or a leftover recovery ended
        failed (their worker is gone; the processor counts the ends of its own attempts)."""
        if self._metrics is not None:
            for job in jobs:
                if job.status == JobStatus.failed:
                    self._metrics.failed.labels(job.task_type).inc()

    async def transaction(self, fn: TxFn[T]) -> T:
        """Run the caller's own writes and enqueues in one transaction: each job it enqueues
        (with `tx=`) exists if and only if the transaction commits."""
        queue_tx: _QueueTx | None = None

        async def run(tx: Tx) -> T:
            nonlocal queue_tx
            queue_tx = _QueueTx(tx)
            result: T = await fn(queue_tx)
            return result

        result = await self.store.transaction(run)
        if queue_tx is not None:
            self.count_enqueued(queue_tx.inserted)
            self.offer(queue_tx.inserted)
            await self._hooks_of_born_cancelled(queue_tx.inserted)
        return result

    async def _hooks_of_born_cancelled(self, created: Iterable[JobRow]) -> None:
        """on_cancelled of the jobs written cancelled (a job they depend on had failed or been
        cancelled): the enqueue is the only one that sees them end."""
        for job in created:
            if job.status == JobStatus.cancelled:
                await self.registry.run_hook(job)

    # -- the in-memory side ------------------------------------------------------------
    def contains(self, job_id: JobId) -> bool:
        """Whether this process holds the job in memory (ready, parked or on a timer)."""
        return self.ready is not None and (self.ready.contains(job_id) or job_id in self._timers)

    def offer(self, jobs: Iterable[JobRow]) -> None:
        """Hand queued jobs to the ready queue now, and near scheduled ones to a timer."""
        if self.ready is None:
            return
        now = self._clock()
        for job in jobs:
            if job.task_type not in self.registry:
                continue  # not runnable here (as in reload): left to a process that knows it
            if job.status == JobStatus.queued or (
                job.status == JobStatus.scheduled and job.run_at <= now
            ):
                self.ready.put(_due(job))
            elif job.status == JobStatus.scheduled:
                self._start_timer(job, (job.run_at - now).total_seconds())

    def _start_timer(self, job: JobRow, delay: float) -> None:
        if delay > TIMER_HORIZON_SECONDS or job.id in self._timers:
            return
        due = _due(job)

        def fire() -> None:
            self._timers.pop(job.id, None)
            if self.ready is not None:
                self.ready.put(due)

        self._timers[job.id] = asyncio.get_running_loop().call_later(delay, fire)

    @property
    def timers(self) -> int:
        return len(self._timers)

    def on_notice(self, notice: Notice) -> None:
        """Another process enqueued, cancelled, or asks for a reload (PostgreSQL NOTIFY)."""
        if notice.kind == "new" and self.ready is not None:
            for due in notice.jobs:
                if due.task_type in self.registry:
                    self.ready.put(due)
        elif notice.kind == "cancel" and notice.job_id is not None:
            self._forget(notice.job_id)
            for listener in self._listeners.on_cancel:
                listener(notice.job_id)
        elif notice.kind == "reload":
            task = asyncio.get_running_loop().create_task(self.reload(), name="notice-reload")
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    def on_cancel(self, listener: Callable[[JobId], object]) -> None:
        """Called with the id of every job this process cancels (the processor stops it)."""
        self._listeners.on_cancel.append(listener)

    async def _insert_plain(self, jobs: Sequence[NewJob]) -> list[Inserted]:
        return await self.store.insert(jobs)

    def close(self) -> None:
        self._plain_inserts.cancel()
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()

    # -- operations --------------------------------------------------------------------
    async def cancel(self, job_id: JobId) -> JobRow:
        """Cancel a job that has not ended; a running one is stopped wherever it runs.

        on_cancelled: a running job's is called where it ran, once its handler stopped; of a
        job that was not running, and of the dependents the cancel ended with it, here."""
        applied = await self.store.apply(lifecycle.cancel(job_id, self._clock()))
        self._forget(job_id)
        for listener in self._listeners.on_cancel:
            listener(job_id)
        ended_here = [] if _cancelled_while_running(applied.job) else [applied.job]
        for job in (*ended_here, *applied.cancelled):
            await self.registry.run_hook(job)
        return applied.job

    def _forget(self, job_id: JobId) -> None:
        if self.ready is not None:
            self.ready.discard(job_id)
        handle = self._timers.pop(job_id, None)
        if handle is not None:
            handle.cancel()

    async def retry_failed(self, flt: FailedFilter, batch: int = RETRY_BATCH) -> list[JobId]:
        """Move every failed job that matches back to queued with fresh attempts, `batch` at a
        time (one transaction each), in id order. Each batch starts after the last id of the
        one before: a job that fails again meanwhile is not taken twice, and the call ends
        whatever the clocks of the processes failing jobs say."""
        retried: list[JobId] = []
        page = flt
        while True:
            ids = await self.store.failed_ids(page, batch)
            now = self._clock()
            results = await self.store.apply_many([lifecycle.retry_failed(i, now) for i in ids])
            jobs = [r.job for r in results if not isinstance(r, Exception)]
            self.offer(jobs)
            retried += [job.id for job in jobs]
            if len(ids) < batch:
                return retried
            page = replace(flt, after_id=ids[-1])

    async def rerun(self, job_id: JobId) -> JobRow:
        """A new job cloned from a finished one (rerun_of = its id)."""
        source = await self.store.get(job_id)
        if source.status not in lifecycle.TERMINAL:
            raise IllegalTransition(job_id, source.status.value, "rerun")
        options = EnqueueOptions(
            priority=source.priority, max_attempts=source.max_attempts, queue=source.queue,
            tags=source.tags, context=source.context,
        )
        payload, copied = await self._rerun_payload(source)
        try:
            (inserted,) = await self.insert(
                [self.build(source.task_type, payload, options, rerun_of=source.id)]
            )
        except Exception:  # not on a cancel: the insert may have committed, naming the copy
            if copied is not None:
                await uploads.remove_upload(copied)
            raise
        return inserted.job

    async def _rerun_payload(self, source: JobRow) -> tuple[Mapping[str, Any], Path | None]:
        """The source's payload, with a copy of its uploaded file if it names one (see
        uploads.py: an upload's directory belongs to one job, which takes it when pruned), and
        that copy. A file that is gone is left as it is named: the rerun fails as its source
        would."""
        known = source.task_type in self.registry
        field = self.registry.get(source.task_type).upload_field if known else None
        if field is None or self._files_dir is None:
            return source.payload, None
        value = source.payload.get(field)
        if not isinstance(value, str) or not uploads.is_upload(Path(value), self._files_dir):
            return source.payload, None
        try:
            copy = await uploads.copy_upload(Path(value), self._files_dir)
        except FileNotFoundError:
            return source.payload, None
        return {**source.payload, field: str(copy)}, copy

    async def reload(self, limit: int = 10_000) -> int:
        """Load due rows this process does not hold yet (after a restart, a crash, a backoff
        or another process's enqueue). Returns how many were new to memory.

        The `limit` rows are read only of the task types this process can use now: those of
        its registry (another kind of worker runs the rest), less those whose jobs are parked
        at their concurrency limit (they run as slots of their type come free; later reloads
        read more of them once none is parked). Rows it cannot use would otherwise fill the
        window on every reload, and keep a job of another type from ever reaching memory."""
        if self.ready is None:
            return 0
        await self.store.promote_due(self._clock())
        parked = self.ready.parked_task_types
        usable = [name for name in self.registry.names() if name not in parked]
        if not usable:
            return 0
        loaded = 0
        for due in await self.store.due(self._clock(), limit, task_types=usable):
            if self.ready.put(due):
                loaded += 1
        return loaded

    @property
    def in_memory(self) -> int:
        """Job ids this process holds ready to run."""
        return len(self.ready) if self.ready else 0

    async def stats(self) -> QueueStats:
        return QueueStats(self.in_memory, await self.store.stats())


class _QueueTx:
    """A Tx that remembers the jobs enqueued through it, to offer them after the commit."""

    def __init__(self, tx: Tx) -> None:
        self._tx = tx
        self.inserted: list[JobRow] = []
        self.dialect = tx.dialect

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tx, name)

    async def execute(self, sql: str, params: Mapping[str, Any] | None = None) -> int:
        return await self._tx.execute(sql, params)

    async def executemany(self, sql: str, params: Sequence[Mapping[str, Any]]) -> None:
        await self._tx.executemany(sql, params)

    async def fetch(self, sql: str, params: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        return await self._tx.fetch(sql, params)


def _due(job: JobRow) -> DueJob:
    return DueJob(job.id, job.task_type, job.queue, job.priority, job.run_at)


def _cancelled_while_running(job: JobRow) -> bool:
    """Whether a cancel ended a running attempt: only then does it record an attempt, with the
    outcome `cancelled`, in the history (nothing else does, and a cancelled job never runs
    again, so that entry is the last)."""
    last = job.attempt_history[-1] if job.attempt_history else {}
    return last.get("outcome") == lifecycle.AttemptOutcome.cancelled.value


def _run_at(options: EnqueueOptions, now: datetime) -> datetime:
    if options.run_at is not None and options.delay_seconds is not None:
        raise InvalidPayload("run_at", "give run_at or delay_seconds, not both")
    delay = options.delay_seconds
    if delay is not None:
        # NaN and the infinities fail the range: NaN compares false, an infinity lies beyond it
        number = isinstance(delay, int | float) and not isinstance(delay, bool)
        if not number or not 0 <= delay <= MAX_DELAY_SECONDS:
            raise InvalidPayload("delay_seconds", f"must be a number from 0 to {MAX_DELAY_SECONDS}")
        return now + timedelta(seconds=delay)
    if options.run_at is not None:
        if not isinstance(options.run_at, datetime):
            raise InvalidPayload("run_at", "must be a time with a UTC offset")
        try:
            return as_utc(options.run_at)
        except ValueError as exc:
            raise InvalidPayload("run_at", str(exc)) from None
    return now


def _bounded_text(field: str, value: str | None, most: int) -> str | None:
    """An optional text option that a column of `most` characters stores."""
    if value is not None and (not isinstance(value, str) or not 1 <= len(value) <= most):
        raise InvalidPayload(field, f"must be a text of 1 to {most} characters")
    return value if value is None else _storable(field, value)


def _storable(field: str, text: str) -> str:
    """Checked here, not only by the API: an option given in code, by a follow-up or by the
    CLI that a store cannot keep (U+0000 on PostgreSQL, a lone surrogate on either) was the
    driver's error, and a follow-up's failed the completion of the job that enqueued it."""
    problem = storable_text_problem(text)
    if problem is not None:
        raise InvalidPayload(field, problem)
    return text


def _depends_on(options: EnqueueOptions) -> tuple[JobId, ...]:
    ids, most = options.depends_on, DEPENDENCY_ID_MAX_LENGTH
    if not ids and not isinstance(ids, str):  # the usual enqueue: nothing to check
        return ()
    if isinstance(ids, str) or not all(isinstance(i, str) and 1 <= len(i) <= most for i in ids):
        raise InvalidPayload("depends_on", f"must be a list of job ids of 1 to {most} characters")
    return tuple(dict.fromkeys(JobId(_storable("depends_on", i)) for i in ids))


def _max_attempts(options: EnqueueOptions, task_type_default: int) -> int:
    """Bounded as the column is on PostgreSQL (32 bits): SQLite would have kept a larger one,
    from 2**63 as an approximate float."""
    if options.max_attempts is None:
        return task_type_default
    if not _is_int(options.max_attempts) or not 1 <= options.max_attempts <= MAX_ATTEMPTS_MAX:
        raise InvalidPayload("max_attempts", f"must be an integer from 1 to {MAX_ATTEMPTS_MAX}")
    return options.max_attempts


def _priority(options: EnqueueOptions, task_type_default: int) -> int:
    """Checked here, not only by the API: a priority that is no integer, once written, cannot
    be ordered against the others, and every reload of the due jobs would fail on it."""
    if options.priority is None:
        return task_type_default
    if not _is_int(options.priority) or not -PRIORITY_MAX <= options.priority <= PRIORITY_MAX:
        raise InvalidPayload("priority", f"must be an integer from -{PRIORITY_MAX} to {PRIORITY_MAX}")
    return options.priority


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


#: a tag is indexed (job_tags.tag), so its length has a bound
TAG_MAX_LENGTH = 200


def _tags(tags: Sequence[str]) -> list[str]:
    if not tags and not isinstance(tags, str):  # the usual enqueue: nothing to check
        return []
    if isinstance(tags, str) or not all(isinstance(t, str) for t in tags):
        raise InvalidPayload("tags", "must be a list of strings")
    if not all(0 < len(t) <= TAG_MAX_LENGTH for t in tags):
        raise InvalidPayload("tags", f"each tag must have 1 to {TAG_MAX_LENGTH} characters")
    return list(dict.fromkeys(_storable("tags", t) for t in tags))


def _non_finite_field(payloads: Sequence[Mapping[str, Any]], *, bulk: bool) -> InvalidPayload | None:
    """The first field that holds NaN or an infinity, named as pydantic names a wrong field
    (`amount`; `payloads.3.amount` in a bulk enqueue). A float field accepts them, but JSON has
    no word for them and neither store writes them."""
    for index, payload in enumerate(payloads):
        path = _non_finite_at(payload)
        if path is not None:
            field = ["payloads", index, *path] if bulk else path
            return InvalidPayload(".".join(map(str, field)), "NaN and infinities have no JSON form")
    return None


def _non_finite_at(value: Any) -> list[str | int] | None:
    if isinstance(value, float):
        return None if math.isfinite(value) else []
    items = value.items() if isinstance(value, Mapping) else (
        enumerate(value) if isinstance(value, list) else ()
    )
    for key, item in items:
        where = _non_finite_at(item)
        if where is not None:
            return [key, *where]
    return None


def _context(context: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if context is None:
        return None
    import json

    if not isinstance(context, Mapping):
        raise InvalidPayload("context", "must be a JSON object")
    # first: json.dumps would meet Python's recursion limit before the size were known
    if nested_deeper_than(context, MAX_JSON_DEPTH):
        raise InvalidPayload("context", f"must not nest deeper than {MAX_JSON_DEPTH} levels")
    try:
        size = len(json.dumps(context, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise InvalidPayload("context", f"must be JSON: {exc}") from exc
    if size > MAX_CONTEXT_BYTES:
        raise InvalidPayload("context", f"must be at most {MAX_CONTEXT_BYTES} bytes of JSON")
    return dict(context)

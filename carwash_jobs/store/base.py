"""The persistence port: what the engine asks of a database, in intents, not SQL.

One adapter per database implements `JobStore` (sqlite.py, postgres.py); the same contract
suite runs against each. Value types live here so that callers never import an adapter.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar, dataclass_transform

from pydantic_core import PydanticSerializationError, from_json, to_json

from carwash_jobs.errors import InvalidPayload, TransactionAborted
from carwash_jobs.lifecycle import TERMINAL, Fence, JobStatus, Transition

if TYPE_CHECKING:
    from carwash_jobs.types import JobId

T = TypeVar("T")


#: the worker_queue columns in table order, as both adapters select and return them
JOB_COLUMNS = (
    "id", "task_type", "queue", "status", "priority", "payload", "context", "tags", "attempts",
    "max_attempts", "run_at", "created_at", "started_at", "finished_at", "lease_owner",
    "lease_until", "progress_done", "progress_total", "checkpoint", "result", "error",
    "error_traceback", "attempt_history", "idempotency_key", "rerun_of", "depends_on",
)
JSON_COLUMNS = frozenset(
    {"payload", "context", "tags", "checkpoint", "result", "attempt_history", "depends_on"}
)


def json_text(value: Any) -> str:
    """A JSON column's text, as both stores write it. The standard library's encoder, not a
    faster one: msgspec and orjson store NaN as null (a retry then reads another payload),
    refuse bool keys and lone surrogates, and accept datetimes and sets that would read back as
    text and lists. Raises TypeError or ValueError for a value with no JSON form, NaN and the
    infinities included: JSON has no word for them, and PostgreSQL's json type and SQLite's
    JSON functions refuse them, with every other row of their statement. (The SQLite store
    writes payloads, which hold JSON types only, with json_types_text.)"""
    return _encode_json(value)


def json_types_text(value: Any) -> str:
    """The JSON text of a value known to hold JSON types only (str keys; str, int, float,
    bool, None, list, dict values), as the SQLite store writes it on its hot path: a payload
    (the queue makes each with pydantic's JSON-mode dump).

    For JSON types pydantic-core's encoder writes the same text as json_text in about half the
    time, the search for NaN's words included: 1.3 against 2.5 us for a 200-byte payload on a
    slow day (the encoder alone 0.48; on a fast day 0.25 against 1.34). It writes text beyond
    ASCII as UTF-8 where json_text escapes it; both read back the same. A lone surrogate (a
    Python str may hold one, UTF-8 may not) makes it refuse; it writes NaN and the infinities,
    which json_text refuses, as Python's words for them. Either way json_text gets the value:
    it writes the surrogate and refuses what has no JSON form. (A text that only holds those
    words inside a string also goes to json_text, and comes out right.)

    Not for other values: pydantic-core also writes what json_text refuses (a datetime, a set)
    and writes some keys json_text also takes in another way ({None: 1} as {"None": 1}, where
    json_text writes {"null": 1}), so a handler's result goes through json_text. PostgreSQL
    keeps json_text throughout: its escapes fit a database in any encoding, and its bulk
    enqueue is far from its target."""
    try:
        text = to_json(value, inf_nan_mode="constants")
    except PydanticSerializationError:
        return json_text(value)
    if b"NaN" in text or b"Infinity" in text:
        return json_text(value)
    return text.decode()


#: how deep a job's context or result may nest objects and arrays. The API shows both inside
#: a job inside a page, and pydantic's serializer stops at 255 levels: a value nested deeper
#: could be stored, and then every page listing its job would fail
MAX_JSON_DEPTH = 64


def nested_deeper_than(value: Any, limit: int) -> bool:
    """Whether `value` holds objects and arrays (dicts, lists, tuples) more than `limit`
    levels within each other; a scalar is at level 0. Level by level, not recursively: the
    value to judge may be deeper than Python's recursion limit."""
    level = [value]
    for _ in range(limit + 1):
        containers = [item for item in level if isinstance(item, (dict, list, tuple))]
        if not containers:
            return False
        level = [child for item in containers
                 for child in (item.values() if isinstance(item, dict) else item)]
    return True


def json_value(text: str | bytes) -> Any:
    """A JSON column's value, as both stores read it. pydantic-core's parser reads the same
    values as json.loads (integers of any size included, and the NaN that a row written before
    the encoders refused it may hold) in a fifth of the time: 0.19 against 1.07 us for a
    200-byte payload (measured). The escape of a lone surrogate makes it refuse, and json.loads
    reads that text (and refuses what is no JSON)."""
    try:
        return from_json(text, cache_strings="keys")
    except ValueError:
        return json.loads(text)


#: json.dumps builds a new encoder on every call once an argument is not the default: 1 us of a
#: bulk enqueue's ~40 per job, three times per job on PostgreSQL
_encode_json = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode


@dataclass_transform(frozen_default=True)
def per_job_record(cls: type[T]) -> type[T]:
    """A record the engine makes for every job and keeps to itself (NewJob, DueJob): frozen to
    the type checker, which refuses any assignment to a field, but a plain slots dataclass at
    run time, hashed by its fields as a frozen one is. A frozen dataclass's __init__ sets each
    field through object.__setattr__, about 0.1 us a field (measured: 26 fields 3.2 us, 0.36
    without). Only for records no handler or caller sees: code outside the type checker could
    change one at run time. JobRow, which handlers get as ctx.job and the processor goes on
    acting on, stays frozen."""
    return dataclass(slots=True, unsafe_hash=True)(cls)


@dataclass(frozen=True)
class JobRow:
    """A job as stored. Read-only: a change is made by applying a lifecycle Transition.

    Built for every job it stores and every job it claims: the stores build it with job_row(),
    not with its __init__ (see there)."""

    id: JobId
    task_type: str
    queue: str
    status: JobStatus
    priority: int
    payload: dict[str, Any]
    context: dict[str, Any] | None
    tags: list[str]
    attempts: int
    max_attempts: int
    run_at: datetime
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    lease_owner: str | None
    lease_until: datetime | None
    progress_done: int
    progress_total: int | None
    checkpoint: dict[str, Any] | None
    result: Any
    error: str | None
    error_traceback: str | None
    attempt_history: list[dict[str, Any]]
    idempotency_key: str | None
    rerun_of: JobId | None
    depends_on: list[JobId]

    @property
    def fence(self) -> Fence:
        """The fence of the attempt this row describes (meaningful while running)."""
        return Fence(self.attempts, self.lease_owner or "")

    def public(self) -> dict[str, Any]:
        """The job as clients see it (shared/API.md), for the HTTP API and the CLI alike."""
        return {
            "id": self.id, "task_type": self.task_type, "status": self.status.value,
            "payload": self.payload, "queue": self.queue, "priority": self.priority,
            "attempts": self.attempts, "max_attempts": self.max_attempts,
            "run_at": _iso(self.run_at), "created_at": _iso(self.created_at),
            "started_at": _iso(self.started_at), "finished_at": _iso(self.finished_at),
            "progress": {"done": self.progress_done, "total": self.progress_total},
            "result": self.result, "error": self.error, "tags": self.tags,
            "rerun_of": self.rerun_of, "depends_on": self.depends_on,
            "idempotency_key": self.idempotency_key, "context": self.context,
            "lease_owner": self.lease_owner, "error_traceback": self.error_traceback,
            "attempt_history": self.attempt_history,
        }


_JOB_FIELDS = tuple(f.name for f in fields(JobRow))


def job_row(values: Iterable[Any]) -> JobRow:
    """A JobRow from its field values in declaration order (JOB_COLUMNS, as a row reads).

    A frozen dataclass's __init__ sets each field through object.__setattr__: 2.7 us for
    JobRow's 26 fields, against 1.0 us for filling the new instance's __dict__ at once, as here
    (measured). Neither checks or converts a value. The row stays frozen to whoever gets it."""
    row = object.__new__(JobRow)
    row.__dict__.update(zip(_JOB_FIELDS, values, strict=True))
    return row


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


@per_job_record
class NewJob:
    """Everything needed to insert a job; the queue fills in defaults from the task type."""

    id: JobId
    task_type: str
    #: JSON types only, as the queue's pydantic JSON-mode dump makes it (see json_types_text)
    payload: dict[str, Any]
    status: JobStatus
    run_at: datetime
    created_at: datetime
    queue: str = "default"
    priority: int = 0
    max_attempts: int = 5
    tags: Sequence[str] = ()
    context: dict[str, Any] | None = None
    idempotency_key: str | None = None
    rerun_of: JobId | None = None
    depends_on: Sequence[JobId] = ()
    #: insert already claimed by this owner (the job is handed straight to a local worker)
    claimed_by: str | None = None
    lease_until: datetime | None = None

    @property
    def plain(self) -> bool:
        """Needs no per-row decision (no idempotency key, no dependencies, not claimed): it
        may be inserted set-based, together with other plain jobs."""
        return self.idempotency_key is None and not self.depends_on and self.claimed_by is None


@dataclass(frozen=True, slots=True)
class Inserted:
    """The stored job, and whether this call created it (False: its idempotency key existed)."""

    job: JobRow
    created: bool


@dataclass(frozen=True, slots=True)
class Applied:
    """The job after a transition, and the jobs the change set free (dependents now queued,
    follow-ups inserted with the completion), which the caller hands to its in-memory queue.
    `cancelled`: the jobs the change ended cancelled besides `job` (dependents of a job that
    failed or was cancelled, and theirs in turn; a follow-up born cancelled), for their
    on_cancelled hooks: no processor ran them, so the caller is the one that sees them end."""

    job: JobRow
    woken: Sequence[JobRow] = ()
    cancelled: Sequence[JobRow] = ()

    def with_follow_ups(self, inserted: Sequence[Inserted]) -> Applied:
        """This change with the follow-ups inserted in its transaction: each new one is woken,
        unless it was born cancelled (a job it depends on had failed or been cancelled)."""
        new = [i.job for i in inserted if i.created]
        born_cancelled = [job for job in new if job.status == JobStatus.cancelled]
        return Applied(
            self.job,
            [*self.woken, *(job for job in new if job.status != JobStatus.cancelled)],
            [*self.cancelled, *born_cancelled],
        )


@dataclass(frozen=True, slots=True)
class Completion:
    """One attempt that returned: the hot path's write, applied many at a time."""

    job_id: JobId
    fence: Fence
    result: Any


@dataclass(frozen=True, slots=True)
class Completed:
    """What a batch of completions did: which attempts completed (the others had lost their
    lease or were cancelled meanwhile), and the dependents they set free."""

    completed: frozenset[JobId]
    woken: Sequence[JobRow] = ()


@per_job_record
class DueJob:
    """What the in-memory queue needs to order and dispatch a job without reading its row."""

    id: JobId
    task_type: str
    queue: str
    priority: int
    run_at: datetime


@dataclass(frozen=True, slots=True)
class Notice:
    """A wake-up from another process: new due jobs, a cancel, or "reload, you missed some"."""

    kind: Literal["new", "cancel", "reload"]
    jobs: Sequence[DueJob] = ()
    job_id: JobId | None = None


#: the largest page of a job list (API and CLI; the dashboard's page sizes stay below it): 500
#: jobs' JSON takes about 30 ms
MAX_PAGE = 500


@dataclass(frozen=True, slots=True)
class JobFilter:
    """List filters; every field set is AND-ed."""

    status: JobStatus | None = None
    task_type: str | None = None
    tag: str | None = None
    queue: str | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None


@dataclass(frozen=True, slots=True)
class FailedFilter:
    """Which failed jobs a bulk retry touches; every field set is AND-ed."""

    ids: Sequence[JobId] | None = None
    task_type: str | None = None
    failed_after: datetime | None = None
    failed_before: datetime | None = None
    #: only the jobs whose id sorts after this one: the next batch of a bulk retry
    after_id: JobId | None = None


def alike(transitions: Sequence[Transition]) -> Transition | None:
    """The one change `transitions` make, when they differ by their job only and one statement
    can write them all: nothing checked or recorded job by job (no fence, lease or attempt
    history), no end (an end resolves each job's dependents), no job twice. A bulk retry's
    batch is one (`python -m bench --scenario retry`, 20,000 failed jobs): a job at a time,
    PostgreSQL retried 198 jobs/s (a savepoint and three round trips a job, and past 64
    savepoints in one transaction it checks each row's visibility the slow way) and SQLite
    3,950; by one statement a batch, 10,750 and 25,900."""
    if len(transitions) < 2:
        return None
    first = transitions[0]
    if (first.fence is not None or first.history is not None or first.attempts_delta
            or first.running_attempt_outcome is not None or first.lease_expired_by is not None
            or first.to_status in TERMINAL):
        return None
    if len({t.job_id for t in transitions}) < len(transitions):
        return None
    return first if all(replace(t, job_id=first.job_id) == first for t in transitions) else None


#: the years a stored timestamp can hold (the store writes four-digit years)
EARLIEST_YEAR, LATEST_YEAR = 1970, 9998


def as_utc(value: datetime) -> datetime:
    """`value` in UTC, or ValueError when it has no offset or falls outside what the store keeps
    (the message leaves the value's name to the caller)."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("needs a UTC offset, e.g. 2030-01-01T08:00:00Z")
    try:
        utc = value.astimezone(UTC)
    except OverflowError:
        utc = None
    if utc is None or not EARLIEST_YEAR <= utc.year <= LATEST_YEAR:
        raise ValueError(f"must lie between the years {EARLIEST_YEAR} and {LATEST_YEAR}")
    return utc


def utc_from_text(text: str) -> datetime:
    """An ISO 8601 time a person typed (the dashboard's filters, the CLI's options): without an
    offset it is UTC, not the machine's zone; ValueError as `as_utc` raises it."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError("not an ISO 8601 time, e.g. 2030-01-31T08:00") from None
    return as_utc(value.replace(tzinfo=UTC) if value.tzinfo is None else value)


def time_range_problem(after_name: str, after: datetime | None, before: datetime | None) -> str | None:
    """What is wrong with the end (exclusive) of a time filter that is not later than its
    start, or None; the caller names the end. Such a range holds nothing: its sender swapped or
    mistyped the two, and an empty answer would read as "no such jobs" (for a bulk retry,
    "nothing to retry")."""
    if after is not None and before is not None and before <= after:
        return f"must be later than {after_name}"
    return None


@dataclass(frozen=True, slots=True)
class Page:
    items: Sequence[JobRow]
    next_cursor: str | None


@dataclass(frozen=True, slots=True)
class CreatedKeyset:
    """A page of a list filtered by creation time, read in (created_at, id) order, newest
    first, from the (created_at, id) index: in id order, a range such as "older than six days"
    would walk every newer job first (0.5 s at a million rows, measured).

    The cursor stays a job id; its creation time comes from its row, or from the time in the
    id itself (ids start with their creation millisecond) when the row was pruned meanwhile.
    Of two upper bounds only the tighter one is kept: given both, SQLite reads the index range
    of one and filters the other."""

    after: datetime | None  #: created_at >= after
    before: datetime | None  #: created_at < before
    cursor: tuple[datetime, str] | None  #: (created_at, id) < cursor

    @classmethod
    def of(cls, flt: JobFilter, cursor: tuple[datetime, str] | None) -> CreatedKeyset:
        before = flt.created_before
        if cursor is not None and before is not None:
            if before <= cursor[0]:
                cursor = None  # every row before `before` is past the cursor too
            else:
                before = None
        return cls(flt.created_after, before, cursor)


#: what a cursor that no list gave out is told (the API and the dashboard say it too)
NOT_A_CURSOR = "not a cursor this list gave out"


def id_time(job_id: str) -> datetime:
    """The creation millisecond a job id starts with (see types.new_job_id)."""
    try:
        ms = int(job_id[:12], 16)
        return datetime.fromtimestamp(ms / 1000, UTC)
    except (ValueError, OverflowError, OSError):
        raise InvalidPayload("cursor", NOT_A_CURSOR) from None


@dataclass(frozen=True, slots=True)
class EventRow:
    at: datetime
    event: str
    status: str
    attempt: int
    process: str | None
    message: str | None


@dataclass(frozen=True, slots=True)
class Stats:
    by_status: Mapping[str, int]
    by_task_type: Mapping[str, Mapping[str, int]]
    running_owners: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Reservation:
    """The answer to a request for slots of a fleet-wide pace (`JobStore.reserve_rate`).

    Granted: the slots are this caller's; it spends the first after `wait_seconds` and each
    further one `interval` later. Refused: the first free slot is `wait_seconds` away, further
    than the caller was willing to wait; nothing was taken."""

    granted: bool
    wait_seconds: float


@dataclass(frozen=True, slots=True)
class ProcessInfo:
    """A process of the fleet as it announces itself: its identity (the lease owner it claims
    jobs as) and, once stored, when it was last seen and until when it counts as alive."""

    owner: str
    role: str
    host: str
    pid: int
    started_at: datetime
    last_seen_at: datetime | None = None
    expires_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class CronFireResult:
    """What one process's attempt at a cron fire came to: "fired" (this process recorded the
    fire and inserted `job`), "skipped" (it recorded the fire without a job, because
    `active_job_id`, an earlier fire's job, is unfinished), or "lost" (another process had
    already recorded this fire; nothing was written)."""

    schedule: str
    fire_at: datetime
    outcome: Literal["fired", "skipped", "lost"]
    job: JobRow | None = None
    active_job_id: JobId | None = None


@dataclass(frozen=True, slots=True)
class CronFireRow:
    """One row of cron_fires: a fire of a schedule, its job (None: skipped), and who fired it."""

    schedule: str
    fire_at: datetime
    job_id: JobId | None
    fired_by: str | None


@dataclass(frozen=True, slots=True)
class MinuteCount:
    """How many jobs ended in `status` during the minute that starts at `minute` (UTC)."""

    minute: datetime
    status: str
    count: int


@dataclass(frozen=True, slots=True)
class PrunedJob:
    """A job `JobStore.prune` deleted: enough to remove what it left outside the database
    (an uploaded file named in its payload)."""

    id: JobId
    task_type: str
    status: str
    payload: dict[str, Any]


@dataclass(frozen=True, slots=True)
class PruneBatch:
    """What one `JobStore.prune` call deleted: its jobs, and how many rows of cron_fires."""

    jobs: list[PrunedJob]
    cron_fires: int


class Tx(Protocol):
    """A database transaction handed to user code: portable SQL with `:name` parameters.

    Statements run in the caller's order inside one transaction; nothing is visible to others
    until it commits, and an exception rolls all of it back. So does a statement that fails,
    even when the function catches its error and returns: the transaction then raises
    TransactionAborted instead of committing, on both stores (PostgreSQL cannot commit a
    transaction after a failed statement, and SQLite is made to agree).
    """

    @property
    def dialect(self) -> str:
        """'sqlite' or 'postgresql', for the rare statement that must differ."""
        ...

    async def execute(self, sql: str, params: Mapping[str, Any] | None = None) -> int:
        """Run one statement; returns the number of rows it changed."""
        ...

    async def executemany(self, sql: str, params: Sequence[Mapping[str, Any]]) -> None: ...

    async def fetch(
        self, sql: str, params: Mapping[str, Any] | None = None
    ) -> list[dict[str, Any]]: ...


TxFn = Callable[[Tx], Awaitable[T]]


class StatementFailures:
    """What a caller's `Tx` keeps of its statements that failed: the first one. The transaction
    then fails as a whole (`refuse_commit`), even when its function caught the error and went
    on. PostgreSQL aborts a transaction at its first failed statement and answers its COMMIT
    with a ROLLBACK, without an error: the caller would be told its writes were committed.
    SQLite would undo that statement alone; it is made to agree. A statement cut off by a
    cancel (a timeout around it) counts too: PostgreSQL's server aborts it, where SQLite's
    writer thread finishes it."""

    def __init__(self, *kinds: type[BaseException]) -> None:
        self._kinds: tuple[type[BaseException], ...] = (*kinds, asyncio.CancelledError)
        self.first: BaseException | None = None

    @contextlib.contextmanager
    def noting(self) -> Iterator[None]:
        """Around every statement run in the transaction, the caller's and the engine's."""
        try:
            yield
        except self._kinds as exc:
            if self.first is None:
                self.first = exc
            raise

    def refuse_commit(self) -> None:
        """Before the COMMIT: a transaction with a failed statement cannot commit."""
        if self.first is not None:
            raise TransactionAborted(self.first) from self.first


@contextlib.contextmanager
def cancel_inside_as_error() -> Iterator[None]:
    """Around a caller's transaction function (both stores, `transaction` and `apply`'s
    `before`): a CancelledError it raises while the task running it is not being cancelled
    (it awaited a task that was) is its failure, rolled back and raised as a RuntimeError.
    Told as a cancel, it stopped SQLite's writer for good, and the processor's record of a
    completion, which catches errors, ended unrecorded. A cancel of the task itself passes."""
    try:
        yield
    except asyncio.CancelledError as exc:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
        raise RuntimeError(f"the transaction was cancelled inside: {exc!r}") from exc


class JobStore(Protocol):
    """The engine's whole conversation with its database."""

    @property
    def dialect(self) -> str: ...

    async def open(self) -> None:
        """Connect (and start any writer task); the schema must already be migrated."""
        ...

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raise StoreUnavailable when the database does not answer, or when what answers is
        no longer the database at the configured place (an SQLite file deleted or replaced)."""
        ...

    async def listen(self, on_notice: Callable[[Notice], None]) -> None:
        """Deliver other processes' notices (new jobs, cancels) to `on_notice`. A database
        without notifications delivers none: other processes' work arrives by the reload."""
        ...

    # -- writes -------------------------------------------------------------------------
    async def insert(self, jobs: Sequence[NewJob], tx: Tx | None = None) -> list[Inserted]:
        """Insert jobs, each committed before this returns (or with `tx`, when it commits).
        An existing idempotency key returns that job with created=False. Unknown dependency
        ids raise UnknownDependency and insert nothing."""
        ...

    async def claim(
        self, ids: Sequence[JobId], owner: str, lease_until: datetime,
        limits: Mapping[str, int] | None = None,
    ) -> list[JobRow]:
        """Atomically move the claimable, due jobs among `ids` to running for `owner`.
        Ids that another worker won, or that are not due, are left out of the result.

        `limits` ({task_type: n}) caps how many jobs of a task type run at once across every
        process on the database: the claim takes only as many of that type as leave the
        fleet's running count at or under n (by priority, then age), exactly, even while other
        processes claim at the same moment. The ids it leaves out stay queued."""
        ...

    async def claim_due(
        self, limit: int, owner: str, lease_until: datetime, queues: Sequence[str] | None = None,
        limits: Mapping[str, int] | None = None,
    ) -> list[JobRow]:
        """Claim up to `limit` due jobs by priority, then run_at (the polling form); `limits`
        as in `claim`."""
        ...

    async def apply(
        self,
        transition: Transition,
        *,
        follow_ups: Sequence[NewJob] = (),
        before: TxFn[None] | None = None,
    ) -> Applied:
        """Apply one transition as a compare-and-set, in one transaction with `before` (the
        handler's own final writes) and the insertion of `follow_ups`. Raises JobNotFound,
        IllegalTransition, or StaleLease (the fence no longer matches)."""
        ...

    async def apply_many(self, transitions: Sequence[Transition]) -> list[Applied | Exception]:
        """Apply many independent transitions in one commit; each succeeds or fails alone.
        Transitions that differ by their job only (`alike`) are written by one statement."""
        ...

    async def complete_many(self, completions: Sequence[Completion]) -> Completed:
        """Complete many running attempts in one transaction with set-based statements (each
        fenced like `lifecycle.complete`). For completions without follow-ups or final writes;
        those go through `apply`."""
        ...

    async def save_progress(
        self,
        job_id: JobId,
        fence: Fence,
        *,
        done: int | None = None,
        total: int | None = None,
        checkpoint: dict[str, Any] | None = None,
    ) -> bool:
        """Record progress and/or a checkpoint for a running attempt; False if the fence is stale."""
        ...

    async def extend_leases(
        self, owner: str, ids: Sequence[JobId], lease_until: datetime
    ) -> set[JobId]:
        """Extend the leases `owner` still holds; returns the ids it still holds."""
        ...

    async def promote_due(self, now: datetime) -> int:
        """Move scheduled jobs whose run_at has passed to queued."""
        ...

    async def expired_leases(self, now: datetime, limit: int) -> list[JobRow]:
        """Running jobs whose lease ran out: their worker died or hung."""
        ...

    async def running_owned_by(self, owners: Sequence[str]) -> list[JobRow]: ...

    async def running_owners(self) -> list[str]:
        """Every owner that holds a running job now."""
        ...

    async def transaction(self, fn: TxFn[T]) -> T:
        """Run `fn` in one transaction: committed if it returns, rolled back if it raises (a
        cancel raised inside it as a RuntimeError: see cancel_inside_as_error)."""
        ...

    def in_own_transaction(self) -> bool:
        """Whether the code running now is a transaction function of this store that another
        write through the store would wait for (SQLite's one writer runs it): such a write
        raises WriteInsideTransaction instead of waiting for itself."""
        ...

    # -- the fleet ------------------------------------------------------------------------
    async def reserve_rate(
        self, name: str, interval_seconds: float, count: int, max_wait_seconds: float
    ) -> Reservation:
        """Take `count` consecutive slots of the pace `name`, one slot every `interval_seconds`
        for every process on the database together, if the first free slot is at most
        `max_wait_seconds` away; otherwise take nothing and say how far away it is. Atomic:
        no slot is ever handed to two callers."""
        ...

    async def announce_process(self, process: ProcessInfo, ttl_seconds: float) -> None:
        """Record that `process` is alive now and counts as alive for `ttl_seconds` more
        (insert or renew); rows of processes long dead are pruned on the way."""
        ...

    async def retire_process(self, owner: str) -> None:
        """Forget a process that stops."""
        ...

    async def live_processes(self) -> list[ProcessInfo]:
        """The processes whose announcement has not expired, oldest first."""
        ...

    # -- reads ----------------------------------------------------------------------------
    async def get(self, job_id: JobId) -> JobRow:
        """The job, or JobNotFound."""
        ...

    async def get_many(self, ids: Sequence[JobId]) -> list[JobRow]: ...

    async def list_jobs(self, flt: JobFilter, limit: int, cursor: str | None = None) -> Page:
        """Newest first, keyset-paginated: `cursor` is the last page's next_cursor."""
        ...

    async def due(
        self, now: datetime, limit: int, *, task_types: Sequence[str] | None = None
    ) -> list[DueJob]:
        """Queued jobs that are due, by priority then age: what a reload hands to memory.

        `task_types` (None: all) keeps only jobs of those types, in the statement, before the
        LIMIT: rows a reload could not use (task types another kind of worker runs, or types
        whose jobs wait here at their concurrency limit) must not fill its window."""
        ...

    async def failed_ids(self, flt: FailedFilter, limit: int) -> list[JobId]: ...

    async def events(self, job_id: JobId) -> list[EventRow]: ...

    async def stats(self) -> Stats: ...

    # -- cron -----------------------------------------------------------------------------
    async def fire_cron(
        self,
        schedule: str,
        fire_at: datetime,
        job: NewJob,
        *,
        skip_if_active_tag: str | None = None,
    ) -> CronFireResult:
        """Fire `schedule` for `fire_at` at most once across all processes, in one transaction:
        record (schedule, fire_at) in cron_fires, and only if this call recorded it, insert
        `job`. With `skip_if_active_tag`, while a job of `job.task_type` carrying that tag is
        waiting, queued, scheduled or running, the fire is recorded with no job instead."""
        ...

    async def cron_fires(self, schedule: str | None, limit: int) -> list[CronFireRow]:
        """The newest fires (of one schedule, or of all), newest first."""
        ...

    async def finished_per_minute(self, since: datetime) -> list[MinuteCount]:
        """Jobs that ended (completed, failed, cancelled) per minute and status since `since`:
        the dashboard's throughput and failure-rate charts. It reads an index range, so its cost
        follows the jobs finished since then, not the size of the table."""
        ...

    # -- retention ------------------------------------------------------------------------
    async def prune(
        self, completed_before: datetime, failed_before: datetime, limit: int
    ) -> PruneBatch:
        """Delete up to `limit` finished jobs, oldest first, in one transaction: completed and
        cancelled ones that finished before `completed_before`, failed ones that finished before
        `failed_before`, with their events and dependency edges. In the same transaction, up to
        `limit` rows of cron_fires whose fire time is before `completed_before`, except each
        schedule's newest one, which cron reads to know where to resume (cron.py). A small
        `limit` keeps each transaction short, so enqueues and claims never wait long behind a
        prune."""
        ...

    async def vacuum(self, skip_if_vacuumed_within_seconds: float = 0.0) -> bool:
        """Reclaim the queue's dead row versions where nothing else will; returns whether it
        ran (a table it cannot lock at once is skipped for this run, with a warning). Every
        claim and completion leaves one behind on PostgreSQL, with an entry in each index the
        change touched; a server whose autovacuum is off keeps them all, and claims and
        completions slow down as they wade through them (a steady 3,600 jobs/s fell to 900
        within two minutes, measured). Every worker of a fleet asks on its own timer: one
        vacuum runs at a time (the others return at once), and none when the queue's table was
        vacuumed by anyone less than `skip_if_vacuumed_within_seconds` ago. SQLite reuses freed
        pages itself: nothing to do."""
        ...

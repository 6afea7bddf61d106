"""SqliteJobStore: the embedded adapter (aiosqlite for reads, one group-commit writer).

WAL lets readers run beside the writer; synchronous=FULL (the default) makes every acknowledged
write survive a power cut, and the group-commit writer makes that fsync cheap. Claims are one
`UPDATE ... RETURNING` statement, atomic across processes because SQLite serialises writers.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiosqlite
from pydantic_core import to_json

from carwash_jobs import lifecycle
from carwash_jobs.errors import (
    IllegalTransition,
    JobNotFound,
    StaleLease,
    StoreUnavailable,
    UnknownDependency,
)
from carwash_jobs.lifecycle import JobStatus, Transition
from carwash_jobs.sqltext import NOT_RUNNING
from carwash_jobs.store.base import (
    JOB_COLUMNS,
    JSON_COLUMNS,
    Applied,
    Completed,
    Completion,
    CreatedKeyset,
    CronFireResult,
    CronFireRow,
    DueJob,
    EventRow,
    FailedFilter,
    Inserted,
    JobFilter,
    JobRow,
    JobStore,
    MinuteCount,
    NewJob,
    Notice,
    Page,
    ProcessInfo,
    PruneBatch,
    PrunedJob,
    Reservation,
    Stats,
    T,
    Tx,
    TxFn,
    alike,
    id_time,
    job_row,
    json_text,
    json_types_text,
    json_value,
)
from carwash_jobs.store.sqlite_writer import SqliteTx, SqliteWriter
from carwash_jobs.types import Clock, JobId, utc_now

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    from carwash_jobs.lifecycle import Fence

TIME_COLUMNS = frozenset({"run_at", "created_at", "started_at", "finished_at", "lease_until"})
_COLS = ", ".join(JOB_COLUMNS)

INSERT_JOB = f"""
INSERT INTO worker_queue ({_COLS}) VALUES (
  :id, :task_type, :queue, :status, :priority, :payload, :context, :tags, :attempts,
  :max_attempts, :run_at, :created_at, :started_at, :finished_at, :lease_owner, :lease_until, 0, NULL,
  NULL, NULL, :error, NULL, '[]', :idempotency_key, :rerun_of, :depends_on)
ON CONFLICT (idempotency_key) DO NOTHING
"""
#: plain jobs (no idempotency key, no dependencies, not claimed): only the columns that vary,
#: read from one JSON array of rows in one statement. A prepared statement stepped once a row
#: through executemany took 9.1 against 7.0 us a job for this one (batches of 1,000): each of
#: its rows binds 12 parameters in Python; this statement runs in SQLite from start to end
INSERT_PLAIN_JOBS = f"""
INSERT INTO worker_queue ({_COLS})
SELECT r ->> '$[0]', r ->> '$[1]', r ->> '$[2]', r ->> '$[3]', r ->> '$[4]', r ->> '$[5]',
  r ->> '$[6]', r ->> '$[7]', 0, r ->> '$[8]', r ->> '$[9]', r ->> '$[10]', NULL, NULL, NULL,
  NULL, 0, NULL, NULL, NULL, NULL, NULL, '[]', NULL, r ->> '$[11]', '[]'
FROM (SELECT value AS r FROM json_each(:rows))
"""
#: about the most text one INSERT_PLAIN_JOBS reads (unless a single job holds more): SQLite
#: refuses a string longer than a billion bytes, and a bulk enqueue of large payloads would
#: hold all of them twice at once. Counted before the array's escapes, which at most double it
PLAIN_ROWS_MAX_CHARS = 8 * 1024 * 1024
#: what a row holds besides its payload, context and tags (ids, names, times), at most
_PLAIN_ROW_CHARS = 400
#: plain jobs made ready (or answered) in one turn of the event loop: about 10 ms of its time
PLAIN_PART_JOBS = 1000
SELECT_BY_IDEMPOTENCY_KEY = f"SELECT {_COLS} FROM worker_queue WHERE idempotency_key = ?"
INSERT_DEPENDENCY = "INSERT INTO job_dependencies (job_id, depends_on_id) VALUES (?, ?)"
INSERT_EVENT = """
INSERT INTO job_events (job_id, at, event, status, attempt, process, message)
VALUES (?, ?, ?, ?, ?, ?, ?)
"""
SELECT_STATUSES = "SELECT id, status FROM worker_queue WHERE id IN ({ids})"
#: the same for any number of ids (a JSON array), beyond the limit on a statement's parameters
STATUSES_OF = "SELECT id, status FROM worker_queue WHERE id IN (SELECT value FROM json_each(?))"
#: by id: the unary + keeps the planner on the primary key, not a scan of the due index
CLAIM_IDS = f"""
UPDATE worker_queue
SET status = 'running', attempts = attempts + 1, lease_owner = ?, lease_until = ?,
    started_at = ?
WHERE id IN ({{ids}}) AND +status IN ('queued', 'scheduled') AND +run_at <= ?
RETURNING {_COLS}
"""
CLAIM_DUE = f"""
UPDATE worker_queue
SET status = 'running', attempts = attempts + 1, lease_owner = ?, lease_until = ?,
    started_at = ?
WHERE id IN (
  SELECT id FROM worker_queue INDEXED BY ix_worker_queue_ready
  WHERE status = 'queued' AND run_at <= ? {{queue_filter}}
  ORDER BY priority DESC, run_at, id LIMIT ?)
RETURNING {_COLS}
"""
#: The fleet-wide concurrency guard (`limits`), inside the claim's own statement: candidates
#: (`c`: id, task_type, nth = rank within its task type by priority, then age) of a limited type
#: are taken only while nth plus the jobs of that type already running stays within the limit.
#: :limits is a JSON object {task_type: n}. The IN subquery is computed once, before any row
#: changes, and SQLite serialises writers: no other claim can move the count meanwhile.
_FLEET_GUARD = """
  LEFT JOIN json_each(:limits) AS l ON l.key = c.task_type
  LEFT JOIN (
    SELECT task_type, COUNT(*) AS n FROM worker_queue INDEXED BY ix_worker_queue_lease
    WHERE status = 'running' GROUP BY task_type) AS r ON r.task_type = c.task_type
  WHERE l.key IS NULL OR c.nth + COALESCE(r.n, 0) <= l.value"""
_CLAIM_SET = """
UPDATE worker_queue
SET status = 'running', attempts = attempts + 1, lease_owner = :owner, lease_until = :lease_until,
    started_at = :now"""
CLAIM_IDS_LIMITED = f"""{_CLAIM_SET}
WHERE id IN (
  SELECT c.id FROM (
    SELECT id, task_type,
      ROW_NUMBER() OVER (PARTITION BY task_type ORDER BY priority DESC, run_at, id) AS nth
    FROM worker_queue
    WHERE id IN (SELECT value FROM json_each(:ids)) AND status IN ('queued', 'scheduled')
      AND run_at <= :now) AS c{_FLEET_GUARD})
RETURNING {_COLS}
"""
#: the polling form: task types already at their limit are left out before the LIMIT applies
CLAIM_DUE_LIMITED = f"""{_CLAIM_SET}
WHERE id IN (
  SELECT c.id FROM (
    SELECT id, task_type,
      ROW_NUMBER() OVER (PARTITION BY task_type ORDER BY priority DESC, run_at, id) AS nth
    FROM (
      SELECT id, task_type, priority, run_at FROM worker_queue INDEXED BY ix_worker_queue_ready
      WHERE status = 'queued' AND run_at <= :now
        AND (:queues IS NULL OR queue IN (SELECT value FROM json_each(:queues)))
        AND task_type NOT IN (
          SELECT f.key FROM json_each(:limits) AS f WHERE f.value <= (
            SELECT COUNT(*) FROM worker_queue AS r INDEXED BY ix_worker_queue_lease
            WHERE r.task_type = f.key AND r.status = 'running'))
      ORDER BY priority DESC, run_at, id LIMIT :limit)) AS c{_FLEET_GUARD})
RETURNING {_COLS}
"""
SELECT_FENCE = "SELECT status FROM worker_queue WHERE id = ?"
#: the jobs of a batch of one change (see `alike`), by id: :ids is a JSON array
ALIKE_TARGET = "id IN (SELECT value FROM json_each(:ids))"
APPEND_HISTORY = "attempt_history = json_insert(attempt_history, '$[#]', json(:history))"
APPEND_RUNNING_ATTEMPT = """attempt_history = CASE WHEN status = 'running'
  THEN json_insert(attempt_history, '$[#]', json_object('attempt', attempts,
    'outcome', :running_outcome, 'owner', lease_owner, 'finished_at', :now_iso,
    'error', :running_error))
  ELSE attempt_history END"""
WAITING_DEPENDENTS = """
SELECT d.job_id, w.run_at FROM job_dependencies d JOIN worker_queue w ON w.id = d.job_id
WHERE d.depends_on_id = ? AND w.status = 'waiting'
"""
UNFINISHED_DEPENDENCIES = """
SELECT COUNT(*) FROM job_dependencies d JOIN worker_queue w ON w.id = d.depends_on_id
WHERE d.job_id = ? AND w.status != 'completed'
"""
SAVE_PROGRESS = """
UPDATE worker_queue SET progress_done = COALESCE(:done, progress_done),
  progress_total = CASE WHEN :set_total THEN :total ELSE progress_total END,
  checkpoint = COALESCE(:checkpoint, checkpoint)
WHERE id = :id AND status = 'running' AND attempts = :attempt AND lease_owner = :owner
"""
EXTEND_LEASES = """
UPDATE worker_queue SET lease_until = ?
WHERE +lease_owner = ? AND +status = 'running' AND id IN ({ids})
RETURNING id
"""
PROMOTE_DUE = """
UPDATE worker_queue INDEXED BY ix_worker_queue_scheduled SET status = 'queued'
WHERE status = 'scheduled' AND run_at <= ?
RETURNING id, attempts
"""
EXPIRED_LEASES = f"""
SELECT {_COLS} FROM worker_queue INDEXED BY ix_worker_queue_lease
WHERE status = 'running' AND lease_until < ? ORDER BY lease_until LIMIT ?
"""
RUNNING_OWNED_BY = f"""
SELECT {_COLS} FROM worker_queue WHERE status = 'running' AND lease_owner IN ({{owners}})
"""
RUNNING_OWNERS = "SELECT DISTINCT lease_owner FROM worker_queue WHERE status = 'running'"
RUNNING_BY_OWNER = """
SELECT lease_owner, COUNT(*) FROM worker_queue WHERE status = 'running' GROUP BY lease_owner
"""
GET_JOB = f"SELECT {_COLS} FROM worker_queue WHERE id = ?"
GET_JOBS = f"SELECT {_COLS} FROM worker_queue WHERE id IN ({{ids}})"
LIST_JOBS = f"SELECT {_COLS} FROM worker_queue WHERE {{where}} ORDER BY id DESC LIMIT ?"
#: running jobs are in no list index (migration 0008) but all in the lease index: the few there
#: are read from it and sorted, where the primary key would walk every job for them
LIST_RUNNING_JOBS = f"""
SELECT {_COLS} FROM worker_queue INDEXED BY ix_worker_queue_lease WHERE {{where}}
ORDER BY id DESC LIMIT ?
"""
#: with a tag: the range of job_tags in id order drives, each job is looked up by its key (the
#: two tables share no column name, so the job columns need no prefix). CROSS JOIN is SQLite's
#: way to fix the join order: with a status filter too, it would otherwise start from the status
#: index and sort every job of that status
LIST_TAGGED_JOBS = f"""
SELECT {_COLS} FROM job_tags CROSS JOIN worker_queue ON worker_queue.id = job_tags.job_id
WHERE job_tags.tag = ? AND {{where}} ORDER BY job_tags.job_id DESC LIMIT ?
"""
INSERT_TAGS = "INSERT OR IGNORE INTO job_tags (tag, job_id) VALUES (?, ?)"
#: filtered by creation time: read in (created_at, id) order (see CreatedKeyset)
LIST_JOBS_BY_CREATED = f"""
SELECT {_COLS} FROM worker_queue WHERE {{where}} ORDER BY created_at DESC, id DESC LIMIT ?
"""
#: running jobs in a creation-time range: the few there are, as LIST_RUNNING_JOBS reads them,
#: where the created index would walk the whole range for them
LIST_RUNNING_JOBS_BY_CREATED = f"""
SELECT {_COLS} FROM worker_queue INDEXED BY ix_worker_queue_lease WHERE {{where}}
ORDER BY created_at DESC, id DESC LIMIT ?
"""
CREATED_AT_OF = "SELECT created_at FROM worker_queue WHERE id = ?"
DUE_JOBS = """
SELECT id, task_type, queue, priority, run_at FROM worker_queue INDEXED BY ix_worker_queue_ready
WHERE status = 'queued' AND run_at <= ? ORDER BY priority DESC, run_at, id LIMIT ?
"""
#: the same, only of some task types (a JSON array): the rows of other types are skipped in
#: the scan, so the LIMIT counts only rows of these types (about +5 % on 10,000 rows, measured)
DUE_JOBS_OF_TYPES = """
SELECT id, task_type, queue, priority, run_at FROM worker_queue INDEXED BY ix_worker_queue_ready
WHERE status = 'queued' AND run_at <= ? AND task_type IN (SELECT value FROM json_each(?))
ORDER BY priority DESC, run_at, id LIMIT ?
"""
FAILED_IDS = "SELECT id FROM worker_queue WHERE {where} ORDER BY id LIMIT ?"
JOB_EVENTS = """
SELECT at, event, status, attempt, process, message FROM job_events
WHERE job_id = ? ORDER BY id
"""
#: Counts by task type and status without counting a big table (migration 0005): finished jobs
#: from job_counts, which triggers keep; unfinished ones through the partial index of their
#: status, named, because without ANALYZE statistics SQLite prefers a full scan of a covering
#: list index (200 ms at a million rows, measured); waiting jobs, which have no index of their
#: own, from their dependency edges (a waiting job always has some), each probed in
#: (status, id), which the NOT_RUNNING term lets SQLite use
COUNTS = f"""
SELECT task_type, 'queued', COUNT(*) FROM worker_queue INDEXED BY ix_worker_queue_ready
WHERE status = 'queued' GROUP BY task_type
UNION ALL
SELECT task_type, 'scheduled', COUNT(*) FROM worker_queue INDEXED BY ix_worker_queue_scheduled
WHERE status = 'scheduled' GROUP BY task_type
UNION ALL
SELECT task_type, 'running', COUNT(*) FROM worker_queue INDEXED BY ix_worker_queue_lease
WHERE status = 'running' GROUP BY task_type
UNION ALL
SELECT task_type, 'waiting', COUNT(*) FROM worker_queue
WHERE status = 'waiting' AND {NOT_RUNNING} AND id IN (SELECT job_id FROM job_dependencies)
GROUP BY task_type
UNION ALL
SELECT task_type, status, SUM(n) FROM job_counts GROUP BY task_type, status HAVING SUM(n) <> 0
"""
#: many completions in one statement: :batch is a JSON array of {id, attempt, owner, result}.
#: The unary + keeps the planner from scanning running rows by status: each row is found by id.
_COMPLETE_MANY = """
UPDATE worker_queue SET status = 'completed', result = {result},
  error = NULL, error_traceback = NULL, finished_at = :now, lease_owner = NULL, lease_until = NULL,
  attempt_history = json_insert(attempt_history, '$[#]', json_object(
    'attempt', worker_queue.attempts, 'outcome', 'completed', 'owner', worker_queue.lease_owner,
    'finished_at', :now_iso, 'error', NULL))
FROM (SELECT value ->> '$.id' AS id, value ->> '$.attempt' AS attempt,
             value ->> '$.owner' AS owner, value -> '$.result' AS result
      FROM json_each(:batch)) AS c
WHERE worker_queue.id = c.id AND +worker_queue.status = 'running'
  AND worker_queue.attempts = c.attempt AND worker_queue.lease_owner = c.owner
RETURNING worker_queue.id, worker_queue.attempts
"""
COMPLETE_MANY = _COMPLETE_MANY.format(result="c.result")
#: for a batch holding a result that is a bare number: that one stored as a blob (see
#: _column_value), the others as text
COMPLETE_MANY_KEEPING_NUMBERS = _COMPLETE_MANY.format(
    result="CASE WHEN json_type(c.result) IN ('integer', 'real') THEN CAST(c.result AS BLOB) "
           "ELSE c.result END")
#: one event row per id in :ids (a JSON array of [id, attempt]) in one statement
INSERT_EVENTS_FOR = """
INSERT INTO job_events (job_id, at, event, status, attempt, process, message)
SELECT e.value ->> '$[0]', :now, :event, :status, e.value ->> '$[1]', :owner, :message
FROM json_each(:ids) AS e
"""
WITH_DEPENDENTS = """
SELECT DISTINCT depends_on_id FROM job_dependencies
WHERE depends_on_id IN (SELECT value FROM json_each(:ids))
"""
#: the unique (schedule, fire_at) key lets exactly one process record a cron fire
INSERT_CRON_FIRE = """
INSERT INTO cron_fires (schedule, fire_at, job_id, fired_by) VALUES (?, ?, ?, ?)
ON CONFLICT (schedule, fire_at) DO NOTHING
"""
SET_CRON_FIRE_JOB = "UPDATE cron_fires SET job_id = ? WHERE schedule = ? AND fire_at = ?"
#: an unfinished job of a schedule (overlap = skip): the unfinished jobs of its task type
#: through the two indexes that hold them (migration 0008: the list index on (task_type, status,
#: id) has no running jobs, the lease index has only those), each checked for the tag; not
#: through job_tags, where a schedule's tag names every job it ever fired
ACTIVE_TAGGED_JOB = f"""
SELECT id FROM (
  SELECT w.id FROM worker_queue w INDEXED BY ix_worker_queue_type_status
  JOIN job_tags t ON t.tag = :tag AND t.job_id = w.id
  WHERE w.task_type = :task_type AND w.status IN ('waiting', 'queued', 'scheduled')
    AND w.{NOT_RUNNING}
  UNION ALL
  SELECT w.id FROM worker_queue w INDEXED BY ix_worker_queue_lease
  JOIN job_tags t ON t.tag = :tag AND t.job_id = w.id
  WHERE w.task_type = :task_type AND w.status = 'running')
ORDER BY id LIMIT 1
"""
CRON_FIRES = """
SELECT schedule, fire_at, job_id, fired_by FROM cron_fires
ORDER BY fire_at DESC, schedule LIMIT ?
"""
CRON_FIRES_OF_SCHEDULE = """
SELECT schedule, fire_at, job_id, fired_by FROM cron_fires WHERE schedule = ?
ORDER BY fire_at DESC LIMIT ?
"""
#: take slots of a fleet-wide pace: the row's next_at moves on by :cost seconds, unless the
#: first free slot is later than :latest (then nothing changes and nothing is returned)
RESERVE_RATE = """
INSERT INTO rate_limits (name, next_at) VALUES (:name, :now + :cost)
ON CONFLICT (name) DO UPDATE SET next_at = MAX(rate_limits.next_at, :now) + :cost
WHERE rate_limits.next_at <= :latest
RETURNING next_at
"""
RATE_NEXT_AT = "SELECT next_at FROM rate_limits WHERE name = ?"
ANNOUNCE_PROCESS = """
INSERT INTO processes (owner, role, host, pid, started_at, last_seen_at, expires_at)
VALUES (:owner, :role, :host, :pid, :started_at, :now, :expires_at)
ON CONFLICT (owner) DO UPDATE
SET last_seen_at = excluded.last_seen_at, expires_at = excluded.expires_at
"""
PRUNE_PROCESSES = "DELETE FROM processes WHERE expires_at < ?"
RETIRE_PROCESS = "DELETE FROM processes WHERE owner = ?"
LIVE_PROCESSES = """
SELECT owner, role, host, pid, started_at, last_seen_at, expires_at FROM processes
WHERE expires_at > ? ORDER BY started_at, owner
"""
#: a dead process's row is kept this long after it expired (the dashboard may show it)
PROCESS_RETENTION = timedelta(hours=1)

#: finished jobs of one status past their retention, oldest first. SQLite uses a partial index
#: only for a query that repeats its predicate word for word (`status = 'completed'` alone does
#: not count: the batch then sorted the whole table, 0.9 s at a million rows), and `status` is a
#: literal, never a parameter, so that the range can start at it
PRUNABLE = """
SELECT id, task_type, status, payload FROM worker_queue INDEXED BY ix_worker_queue_finished
WHERE status IN ('completed', 'failed', 'cancelled') AND status = '{status}' AND finished_at < ?
ORDER BY finished_at LIMIT ?
"""
#: what a pruned job leaves in the database; :ids is a JSON array of job ids
PRUNE_DELETES = (
    "DELETE FROM job_events WHERE job_id IN (SELECT value FROM json_each(:ids))",
    "DELETE FROM job_tags WHERE job_id IN (SELECT value FROM json_each(:ids))",
    "DELETE FROM job_dependencies WHERE job_id IN (SELECT value FROM json_each(:ids))",
    "DELETE FROM job_dependencies WHERE depends_on_id IN (SELECT value FROM json_each(:ids))",
    "DELETE FROM worker_queue WHERE id IN (SELECT value FROM json_each(:ids))",
)
PRUNED_STATUSES = ("completed", "cancelled", "failed")
#: cron fires before :before, except each schedule's newest (cron resumes from it). The
#: schedules come from a skip scan of the primary key (one probe per schedule), and each one's
#: old fires from a range of it: never a scan of all the fires kept. CROSS JOIN keeps that order.
#: It starts with DELETE, not WITH: sqlite3's rowcount counts only a statement that does
PRUNE_CRON_FIRES = """
DELETE FROM cron_fires WHERE rowid IN (
  WITH RECURSIVE schedules(name) AS (
    SELECT MIN(schedule) FROM cron_fires
    UNION ALL
    SELECT (SELECT MIN(schedule) FROM cron_fires WHERE schedule > name) FROM schedules
    WHERE name IS NOT NULL)
  SELECT f.rowid FROM schedules CROSS JOIN cron_fires AS f
  WHERE f.schedule = schedules.name AND f.fire_at < :before
    AND f.fire_at < (SELECT MAX(fire_at) FROM cron_fires WHERE schedule = schedules.name)
  LIMIT :limit)
"""
#: the IN list repeats the partial index's own predicate word for word: only then may SQLite use
#: ix_worker_queue_finished (a range of it, instead of a scan of the table)
FINISHED_PER_MINUTE = """
SELECT substr(finished_at, 1, 16), status, COUNT(*) FROM worker_queue
WHERE status IN ('completed', 'failed', 'cancelled') AND finished_at >= ?
GROUP BY substr(finished_at, 1, 16), status
"""


#: Each write of a group commit runs under a savepoint, so a statement that touches more than
#: a few pages keeps a statement journal; on disk, that is a temporary file created, written
#: and unlinked for about every commit (strace of a drain: 220 files and 38 % of its pwrites
#: for 20,000 jobs; drain +10 %, median of 5 interleaved runs). It holds at most the pages one
#: statement changes. The reader's sorts keep the default.
WRITER_TEMP_STORE = "PRAGMA temp_store=MEMORY"


def ts(value: datetime | None) -> str | None:
    """Timestamps are stored as UTC text in one fixed format, so they sort as strings."""
    if value is None:
        return None
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


def _file_id(path: Path) -> tuple[int, int]:
    """What names a file whatever its path: its device and inode."""
    st = path.stat()
    return st.st_dev, st.st_ino


def parse_ts(value: str | None) -> datetime | None:
    if value is None:
        return None
    return datetime.fromisoformat(value).replace(tzinfo=UTC)


def _dump(value: Any) -> str | None:
    return None if value is None else json_text(value)


#: positions of the decoded columns in a JOB_COLUMNS row (JobRow's fields are in that order)
_JSON_AT = tuple(i for i, name in enumerate(JOB_COLUMNS) if name in JSON_COLUMNS)
_TIME_AT = tuple(i for i, name in enumerate(JOB_COLUMNS) if name in TIME_COLUMNS)
_STATUS_AT = JOB_COLUMNS.index("status")
_STATUSES = {status.value: status for status in JobStatus}
_UTC_SUFFIX = "+00:00"


def row_to_job(row: Sequence[Any]) -> JobRow:
    """Decode a worker_queue row. On the claim's hot path (about a tenth of the drain's time
    went here), so by position, with the common empty JSON values taken without the parser."""
    values = list(row)
    for i in _JSON_AT:
        raw = values[i]
        # sa.JSON columns have NUMERIC affinity in SQLite: a bare JSON number stored as text
        # (a result written before _bare_number's blobs) comes back as int/float, decoded.
        if raw == "[]":
            values[i] = []
        elif raw == "null":
            values[i] = None
        elif isinstance(raw, str | bytes):
            values[i] = json_value(raw)
    for i in _TIME_AT:
        if values[i] is not None:
            values[i] = datetime.fromisoformat(values[i] + _UTC_SUFFIX)
    values[_STATUS_AT] = _STATUSES[values[_STATUS_AT]]
    return job_row(values)


def _bare_number(value: Any) -> bool:
    """A result that SQLite would change if it were stored as text: the JSON columns are
    declared JSON, which SQLite gives NUMERIC affinity, and that stores the text '2.0' as the
    integer 2 and 10**30 as an approximate float. Stored as a blob of its JSON text, it keeps
    its bytes (row_to_job decodes text and blobs alike). Payloads, contexts and checkpoints
    are objects, and a number inside one is part of its text: only a result can be bare."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def _placeholders(n: int) -> str:
    return ", ".join("?" * n)


def _column_value(column: str, value: Any) -> Any:
    if column == "result" and _bare_number(value):
        return json_text(value).encode()
    if column in JSON_COLUMNS:
        return _dump(value)
    if column in TIME_COLUMNS:
        return ts(value)
    return value


class SqliteJobStore:
    """The embedded store: one SQLite file in WAL mode."""

    dialect = "sqlite"

    def __init__(
        self,
        url: str,
        *,
        owner: str,
        clock: Clock = utc_now,
        synchronous: str = "FULL",
        busy_timeout_ms: int = 5000,
        write_batch_max: int = 500,
    ) -> None:
        # absolute now: SQLite resolves a relative path once, at open, and ping() must check
        # the same file whatever the working directory is by then
        self.path = Path(url.removeprefix("sqlite+aiosqlite:///")).absolute()
        self._owner = owner
        self._clock = clock
        self._pragmas = (
            "PRAGMA journal_mode=WAL",
            f"PRAGMA synchronous={synchronous}",
            f"PRAGMA busy_timeout={int(busy_timeout_ms)}",
            # as PostgreSQL does: a handler's write naming a row that is gone (a credit for a
            # customer deleted meanwhile) fails, where SQLite wrote it by default
            "PRAGMA foreign_keys=ON",
        )
        self.writer = SqliteWriter(self._connect_writer, batch_max=write_batch_max)
        self._reader: aiosqlite.Connection | None = None
        self._file_id: tuple[int, int] | None = None

    def _connect_writer(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        for pragma in (*self._pragmas, WRITER_TEMP_STORE):
            conn.execute(pragma)
        return conn

    async def open(self) -> None:
        try:
            self._file_id = _file_id(self.path)
        except FileNotFoundError:
            raise StoreUnavailable(
                f"no database at {self.path}: run `carwash-jobs db upgrade`"
            ) from None
        await self.writer.start()
        self._reader = await aiosqlite.connect(self.path, isolation_level=None)
        for pragma in self._pragmas[1:]:
            await self._reader.execute(pragma)

    async def close(self) -> None:
        await self.writer.stop()
        if self._reader is not None:
            await self._reader.close()
            self._reader = None

    async def ping(self) -> None:
        """The connections answer, and the file they have open is still the one at the path.
        A deleted or replaced file goes on answering through the open connections: its writes
        land in a file nobody will open again, so health must say so."""
        try:
            await self._fetch("SELECT 1")
        except (sqlite3.Error, ValueError, AttributeError) as exc:
            raise StoreUnavailable(f"the database does not answer: {exc}") from exc
        try:
            current = _file_id(self.path)
        except OSError as exc:
            raise StoreUnavailable(f"the database file {self.path} is gone: {exc}") from exc
        if current != self._file_id:
            raise StoreUnavailable(f"the database file {self.path} was replaced since it was "
                                   "opened: restart to use the new one")

    async def listen(self, on_notice: Callable[[Notice], None]) -> None:
        """SQLite has no notifications: other processes' jobs arrive by the periodic reload."""

    async def _fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        if self._reader is None:
            raise StoreUnavailable("the store is not open")
        async with self._reader.execute(sql, params) as cur:
            return list(await cur.fetchall())

    # -- writes ------------------------------------------------------------------------
    async def insert(self, jobs: Sequence[NewJob], tx: Tx | None = None) -> list[Inserted]:
        now = self._clock()
        if tx is None and all(job.plain for job in jobs):
            return await self._insert_plain_parts(jobs, now)

        def run(conn: sqlite3.Connection) -> list[Inserted]:
            return _insert(conn, jobs, self._owner, now)

        if tx is not None:
            assert isinstance(tx, SqliteTx), "a SqliteJobStore joins only its own transactions"
            return await tx.run_sync(run)
        return await self.writer.run_sync(run)

    async def _insert_plain_parts(self, jobs: Sequence[NewJob], now: datetime) -> list[Inserted]:
        """Plain jobs made ready and answered here, in the event loop's thread: the writer's
        thread only runs their SQL (bulk enqueues 3-15 % faster than with all of it there). A
        part of PLAIN_PART_JOBS at a time, the loop's other work running between two: a bulk
        enqueue of 100,000 jobs would otherwise hold the loop for about a second."""
        parts: list[_PlainJobs] = []
        for start in range(0, len(jobs), PLAIN_PART_JOBS):
            if parts:
                await asyncio.sleep(0)
            parts.append(_PlainJobs(jobs[start:start + PLAIN_PART_JOBS], now))

        def write(conn: sqlite3.Connection) -> None:
            for part in parts:
                part.write(conn, self._owner)

        await self.writer.run_sync(write)
        inserted: list[Inserted] = []
        for part in parts:
            if inserted:
                await asyncio.sleep(0)
            inserted += part.inserted()
        return inserted

    async def claim(
        self, ids: Sequence[JobId], owner: str, lease_until: datetime,
        limits: Mapping[str, int] | None = None,
    ) -> list[JobRow]:
        if not ids:
            return []
        now = self._clock()
        if limits:
            return await self._claim_limited(CLAIM_IDS_LIMITED, owner, lease_until, now, limits,
                                             ids=_dump(list(ids)))

        def run(conn: sqlite3.Connection) -> list[JobRow]:
            sql = CLAIM_IDS.format(ids=_placeholders(len(ids)))
            rows = conn.execute(sql, (owner, ts(lease_until), ts(now), *ids, ts(now))).fetchall()
            return _claimed(conn, rows, owner, now)

        return await self.writer.run_sync(run)

    async def claim_due(
        self, limit: int, owner: str, lease_until: datetime, queues: Sequence[str] | None = None,
        limits: Mapping[str, int] | None = None,
    ) -> list[JobRow]:
        now = self._clock()
        if limits:
            return await self._claim_limited(
                CLAIM_DUE_LIMITED, owner, lease_until, now, limits, limit=limit,
                queues=_dump(list(queues)) if queues else None,
            )
        queue_filter = f"AND queue IN ({_placeholders(len(queues))})" if queues else ""

        def run(conn: sqlite3.Connection) -> list[JobRow]:
            sql = CLAIM_DUE.format(queue_filter=queue_filter)
            params = (owner, ts(lease_until), ts(now), ts(now), *(queues or ()), limit)
            return _claimed(conn, conn.execute(sql, params).fetchall(), owner, now)

        return await self.writer.run_sync(run)

    async def _claim_limited(
        self, sql: str, owner: str, lease_until: datetime, now: datetime,
        limits: Mapping[str, int], **params: Any,
    ) -> list[JobRow]:
        """A claim under fleet-wide concurrency limits: one statement, its own guard."""
        values = {**params, "owner": owner, "lease_until": ts(lease_until), "now": ts(now),
                  "limits": _dump(dict(limits))}

        def run(conn: sqlite3.Connection) -> list[JobRow]:
            return _claimed(conn, conn.execute(sql, values).fetchall(), owner, now)

        return await self.writer.run_sync(run)

    async def apply(
        self,
        transition: Transition,
        *,
        follow_ups: Sequence[NewJob] = (),
        before: TxFn[None] | None = None,
    ) -> Applied:
        now = self._clock()

        def run(conn: sqlite3.Connection) -> Applied:
            applied = _apply(conn, transition, self._owner, now)
            if not follow_ups:
                return applied
            return applied.with_follow_ups(_insert(conn, follow_ups, self._owner, now))

        if before is None:
            return await self.writer.run_sync(run)

        async def in_tx(tx: SqliteTx) -> Applied:
            await before(tx)
            return await tx.run_sync(run)

        return await self.writer.run_async(in_tx)

    async def apply_many(self, transitions: Sequence[Transition]) -> list[Applied | Exception]:
        now = self._clock()

        same = alike(transitions)

        def run(conn: sqlite3.Connection) -> list[Applied | Exception]:
            if same is not None:
                return _apply_alike(conn, transitions, same, self._owner, now)
            results: list[Applied | Exception] = []
            for transition in transitions:
                conn.execute("SAVEPOINT one")
                try:
                    results.append(_apply(conn, transition, self._owner, now))
                except (IllegalTransition, JobNotFound) as exc:
                    conn.execute("ROLLBACK TO one")
                    results.append(exc)
                conn.execute("RELEASE one")
            return results

        return await self.writer.run_sync(run)

    async def complete_many(self, completions: Sequence[Completion]) -> Completed:
        if not completions:
            return Completed(frozenset())
        now = self._clock()
        results = [c.result for c in completions if c.result is not None]
        batch = _completions_text(completions, with_results=bool(results))
        sql = COMPLETE_MANY_KEEPING_NUMBERS if any(map(_bare_number, results)) else COMPLETE_MANY

        def run(conn: sqlite3.Connection) -> Completed:
            done = conn.execute(
                sql, {"batch": batch, "now": ts(now), "now_iso": now.isoformat()}
            ).fetchall()
            _insert_events(conn, [(r[0], r[1]) for r in done], "completed", "completed",
                           self._owner, now)
            woken: list[JobRow] = []
            waited_on = conn.execute(WITH_DEPENDENTS, {"ids": _ids_text([r[0] for r in done])})
            for (job_id,) in waited_on.fetchall():
                freed, _ = _resolve_dependents(conn, job_id, JobStatus.completed, self._owner, now)
                woken += freed
            return Completed(frozenset(JobId(r[0]) for r in done), woken)

        return await self.writer.run_sync(run)

    async def save_progress(
        self,
        job_id: JobId,
        fence: Fence,
        *,
        done: int | None = None,
        total: int | None = None,
        checkpoint: dict[str, Any] | None = None,
    ) -> bool:
        params = {
            "id": job_id, "attempt": fence.attempt, "owner": fence.owner, "done": done,
            "set_total": done is not None, "total": total, "checkpoint": _dump(checkpoint),
        }

        def run(conn: sqlite3.Connection) -> bool:
            return conn.execute(SAVE_PROGRESS, params).rowcount == 1

        return await self.writer.run_sync(run)

    async def extend_leases(
        self, owner: str, ids: Sequence[JobId], lease_until: datetime
    ) -> set[JobId]:
        if not ids:
            return set()

        def run(conn: sqlite3.Connection) -> set[JobId]:
            sql = EXTEND_LEASES.format(ids=_placeholders(len(ids)))
            rows = conn.execute(sql, (ts(lease_until), owner, *ids)).fetchall()
            return {JobId(r[0]) for r in rows}

        return await self.writer.run_sync(run)

    async def promote_due(self, now: datetime) -> int:
        def run(conn: sqlite3.Connection) -> int:
            rows = conn.execute(PROMOTE_DUE, (ts(now),)).fetchall()
            conn.executemany(
                INSERT_EVENT,
                [(r[0], ts(now), "due", "queued", r[1], self._owner, None) for r in rows],
            )
            return len(rows)

        return await self.writer.run_sync(run)

    async def transaction(self, fn: TxFn[T]) -> T:
        return await self.writer.run_async(fn)

    def in_own_transaction(self) -> bool:
        return self.writer.inside_caller_transaction()

    # -- the fleet (on SQLite: the processes sharing one file) ---------------------------
    async def reserve_rate(
        self, name: str, interval_seconds: float, count: int, max_wait_seconds: float
    ) -> Reservation:
        now = self._clock().timestamp()
        cost = interval_seconds * count
        params = {"name": name, "now": now, "cost": cost, "latest": now + max_wait_seconds}

        def run(conn: sqlite3.Connection) -> Reservation:
            row = conn.execute(RESERVE_RATE, params).fetchone()
            if row is not None:
                return Reservation(True, max(row[0] - cost - now, 0.0))
            (next_at,) = conn.execute(RATE_NEXT_AT, (name,)).fetchone()
            return Reservation(False, max(next_at - now, 0.0))

        return await self.writer.run_sync(run)

    async def announce_process(self, process: ProcessInfo, ttl_seconds: float) -> None:
        now = self._clock()
        params = {
            "owner": process.owner, "role": process.role, "host": process.host,
            "pid": process.pid, "started_at": ts(process.started_at), "now": ts(now),
            "expires_at": ts(now + timedelta(seconds=ttl_seconds)),
        }

        def run(conn: sqlite3.Connection) -> None:
            conn.execute(ANNOUNCE_PROCESS, params)
            conn.execute(PRUNE_PROCESSES, (ts(now - PROCESS_RETENTION),))

        await self.writer.run_sync(run)

    async def retire_process(self, owner: str) -> None:
        def run(conn: sqlite3.Connection) -> None:
            conn.execute(RETIRE_PROCESS, (owner,))

        await self.writer.run_sync(run)

    async def live_processes(self) -> list[ProcessInfo]:
        rows = await self._fetch(LIVE_PROCESSES, (ts(self._clock()),))
        return [
            ProcessInfo(r[0], r[1], r[2], r[3], parse_ts(r[4]) or self._clock(), parse_ts(r[5]),
                        parse_ts(r[6]))
            for r in rows
        ]

    # -- reads -------------------------------------------------------------------------
    async def expired_leases(self, now: datetime, limit: int) -> list[JobRow]:
        return [row_to_job(r) for r in await self._fetch(EXPIRED_LEASES, (ts(now), limit))]

    async def running_owned_by(self, owners: Sequence[str]) -> list[JobRow]:
        if not owners:
            return []
        sql = RUNNING_OWNED_BY.format(owners=_placeholders(len(owners)))
        return [row_to_job(r) for r in await self._fetch(sql, tuple(owners))]

    async def running_owners(self) -> list[str]:
        return [r[0] for r in await self._fetch(RUNNING_OWNERS) if r[0] is not None]

    async def get(self, job_id: JobId) -> JobRow:
        rows = await self._fetch(GET_JOB, (job_id,))
        if not rows:
            raise JobNotFound(job_id)
        return row_to_job(rows[0])

    async def get_many(self, ids: Sequence[JobId]) -> list[JobRow]:
        if not ids:
            return []
        rows = await self._fetch(GET_JOBS.format(ids=_placeholders(len(ids))), tuple(ids))
        return [row_to_job(r) for r in rows]

    async def list_jobs(self, flt: JobFilter, limit: int, cursor: str | None = None) -> Page:
        if flt.tag is None and (flt.created_after or flt.created_before):
            return await self._list_by_created(flt, limit, cursor)
        if flt.tag is None:
            where, params = _list_where(flt, cursor, "id")
            rows = await self._fetch(_list_sql(flt, by_created=False).format(where=where),
                                     (*params, limit + 1))
        else:
            where, params = _list_where(flt, cursor, "job_tags.job_id")
            rows = await self._fetch(LIST_TAGGED_JOBS.format(where=where),
                                     (flt.tag, *params, limit + 1))
        items = [row_to_job(r) for r in rows[:limit]]
        next_cursor = items[-1].id if len(rows) > limit else None
        return Page(items, next_cursor)

    async def _list_by_created(self, flt: JobFilter, limit: int, cursor: str | None) -> Page:
        position = None
        if cursor is not None:
            found = await self._fetch(CREATED_AT_OF, (cursor,))
            at = parse_ts(found[0][0]) if found else None
            position = (at or id_time(cursor), cursor)
        keyset = CreatedKeyset.of(flt, position)
        where, params = _list_where(replace(flt, created_after=None, created_before=None), None, "id")
        terms, values = _set_terms(
            [("created_at >= ?", ts(keyset.after)), ("created_at < ?", ts(keyset.before))]
        )
        clauses, args = [where, *terms], [*params, *values]
        if keyset.cursor is not None:  # this form, not a row value: SQLite reads its range
            clauses.append("created_at <= ? AND (created_at < ? OR id < ?)")
            at_text = ts(keyset.cursor[0])
            args += [at_text, at_text, keyset.cursor[1]]
        sql = _list_sql(flt, by_created=True).format(where=" AND ".join(clauses))
        rows = await self._fetch(sql, (*args, limit + 1))
        items = [row_to_job(r) for r in rows[:limit]]
        return Page(items, items[-1].id if len(rows) > limit else None)

    async def due(
        self, now: datetime, limit: int, *, task_types: Sequence[str] | None = None
    ) -> list[DueJob]:
        if task_types is None:
            rows = await self._fetch(DUE_JOBS, (ts(now), limit))
        else:
            rows = await self._fetch(DUE_JOBS_OF_TYPES, (ts(now), _dump(list(task_types)), limit))
        return [DueJob(JobId(r[0]), r[1], r[2], r[3], parse_ts(r[4]) or now) for r in rows]

    async def failed_ids(self, flt: FailedFilter, limit: int) -> list[JobId]:
        if flt.ids is not None and not flt.ids:
            return []
        where, params = _failed_where(flt)
        rows = await self._fetch(FAILED_IDS.format(where=where), (*params, limit))
        return [JobId(r[0]) for r in rows]

    async def events(self, job_id: JobId) -> list[EventRow]:
        rows = await self._fetch(JOB_EVENTS, (job_id,))
        return [EventRow(parse_ts(r[0]) or self._clock(), *r[1:]) for r in rows]

    async def stats(self) -> Stats:
        by_status: dict[str, int] = {s.value: 0 for s in JobStatus}
        by_type: dict[str, dict[str, int]] = {}
        for task_type, status, count in await self._fetch(COUNTS):
            by_status[status] = by_status.get(status, 0) + count
            by_type.setdefault(task_type, {})[status] = count
        owners = {r[0]: r[1] for r in await self._fetch(RUNNING_BY_OWNER) if r[0]}
        return Stats(by_status, by_type, owners)

    # -- cron ----------------------------------------------------------------------------
    async def fire_cron(
        self,
        schedule: str,
        fire_at: datetime,
        job: NewJob,
        *,
        skip_if_active_tag: str | None = None,
    ) -> CronFireResult:
        def run(conn: sqlite3.Connection) -> CronFireResult:
            return _fire_cron(conn, schedule, fire_at, job, skip_if_active_tag, self._owner,
                              self._clock())

        return await self.writer.run_sync(run)

    async def cron_fires(self, schedule: str | None, limit: int) -> list[CronFireRow]:
        if schedule is None:
            rows = await self._fetch(CRON_FIRES, (limit,))
        else:
            rows = await self._fetch(CRON_FIRES_OF_SCHEDULE, (schedule, limit))
        return [
            CronFireRow(r[0], parse_ts(r[1]) or self._clock(), None if r[2] is None else JobId(r[2]),
                        r[3])
            for r in rows
        ]

    async def finished_per_minute(self, since: datetime) -> list[MinuteCount]:
        rows = await self._fetch(FINISHED_PER_MINUTE, (ts(since),))
        return [
            MinuteCount(datetime.fromisoformat(minute).replace(tzinfo=UTC), status, count)
            for minute, status, count in rows
        ]

    # -- retention -----------------------------------------------------------------------
    async def vacuum(self, skip_if_vacuumed_within_seconds: float = 0.0) -> bool:
        return False

    async def prune(
        self, completed_before: datetime, failed_before: datetime, limit: int
    ) -> PruneBatch:
        cutoffs = {"completed": completed_before, "cancelled": completed_before,
                   "failed": failed_before}

        def prune_jobs(conn: sqlite3.Connection) -> list[PrunedJob]:
            found: list[Any] = []
            for status in PRUNED_STATUSES:
                if len(found) >= limit:
                    break
                found += conn.execute(
                    PRUNABLE.format(status=status), (ts(cutoffs[status]), limit - len(found))
                ).fetchall()
            if not found:
                return []
            ids = _dump([r[0] for r in found])
            for sql in PRUNE_DELETES:
                conn.execute(sql, {"ids": ids})
            return [
                PrunedJob(JobId(r[0]), r[1], r[2], json.loads(r[3]) if isinstance(r[3], str) else r[3])
                for r in found
            ]

        def run(conn: sqlite3.Connection) -> PruneBatch:
            jobs = prune_jobs(conn)
            fires = conn.execute(PRUNE_CRON_FIRES, {"before": ts(completed_before), "limit": limit})
            return PruneBatch(jobs, fires.rowcount)

        if limit <= 0:
            return PruneBatch([], 0)
        return await self.writer.run_sync(run)


def _list_sql(flt: JobFilter, *, by_created: bool) -> str:
    """The list statement for `flt` without a tag: a list of running jobs reads the lease index
    (see LIST_RUNNING_JOBS), any other the list indexes, in id or creation-time order."""
    if flt.status == JobStatus.running:
        return LIST_RUNNING_JOBS_BY_CREATED if by_created else LIST_RUNNING_JOBS
    return LIST_JOBS_BY_CREATED if by_created else LIST_JOBS


def _failed_where(flt: FailedFilter) -> tuple[str, list[Any]]:
    """The bulk retry's filters; `status = 'failed'` reads (status, id), so it states that
    index's condition too (see NOT_RUNNING)."""
    clauses, params = _set_terms([
        ("task_type = ?", flt.task_type),
        ("finished_at >= ?", ts(flt.failed_after)),
        ("finished_at < ?", ts(flt.failed_before)),
        ("id > ?", flt.after_id),
    ])
    if flt.ids is not None:
        clauses.append(f"id IN ({_placeholders(len(flt.ids))})")
        params += list(flt.ids)
    return " AND ".join(["status = 'failed'", NOT_RUNNING, *clauses]), params


def _list_where(flt: JobFilter, cursor: str | None, key: str) -> tuple[str, list[Any]]:
    """The list's filters (all but the tag, which picks the statement) and the keyset cursor
    on `key`, the column whose order the statement reads."""
    status = None if flt.status in (None, JobStatus.running) else flt.status.value
    clauses, params = _set_terms([
        # a status other than running, with the list indexes' condition word for word
        (f"status = ? AND {NOT_RUNNING}", status),
        ("task_type = ?", flt.task_type),
        ("queue = ?", flt.queue),
        ("created_at >= ?", ts(flt.created_after)),
        ("created_at < ?", ts(flt.created_before)),
        (f"{key} < ?", cursor),
    ])
    if flt.status == JobStatus.running:  # the lease index's condition (LIST_RUNNING_JOBS)
        clauses.insert(0, "status = 'running'")
    return (" AND ".join(clauses) or "1 = 1"), params


def _set_terms(terms: Sequence[tuple[str, Any]]) -> tuple[list[str], list[Any]]:
    """The clauses of `terms` (clause, value) whose value is set, and those values in order."""
    chosen = [(clause, value) for clause, value in terms if value is not None]
    return [clause for clause, _ in chosen], [value for _, value in chosen]


def _claimed(
    conn: sqlite3.Connection, rows: list[Any], owner: str, now: datetime
) -> list[JobRow]:
    jobs = [row_to_job(r) for r in rows]
    if not jobs:
        return jobs
    _insert_events(conn, [(j.id, j.attempts) for j in jobs], "claimed", "running", owner, now)
    return jobs


def _insert(
    conn: sqlite3.Connection, jobs: Sequence[NewJob], owner: str, now: datetime
) -> list[Inserted]:
    if all(job.plain for job in jobs):
        return _insert_plain(conn, jobs, owner, now)
    return _insert_each(conn, jobs, owner, now)


def _insert_plain(
    conn: sqlite3.Connection, jobs: Sequence[NewJob], owner: str, now: datetime
) -> list[Inserted]:
    plain = _PlainJobs(jobs, now)
    plain.write(conn, owner)
    return plain.inserted()


class _PlainJobs:
    """Plain jobs: nothing is decided row by row (no read, no conflict), so their rows,
    statuses and events are known before they are written, and what an enqueue returns is
    known without a read back. Many are written in one statement, then their events."""

    def __init__(self, jobs: Sequence[NewJob], now: datetime) -> None:
        self.jobs = jobs
        self.now = now
        self.statuses = [lifecycle.initial_status(job.run_at, now, {})[0] for job in jobs]
        #: INSERT_PLAIN_JOBS's JSON arrays, each of at most about PLAIN_ROWS_MAX_CHARS
        self.row_arrays: list[str] = []
        rows: list[list[Any]] = []
        size = 0
        stamps = _Stamps()
        for job, status in zip(jobs, self.statuses, strict=True):
            payload, context = json_types_text(job.payload), _dump(job.context)
            tags = json_text(list(job.tags)) if job.tags else "[]"
            chars = len(payload) + len(context or "") + len(tags) + _PLAIN_ROW_CHARS
            if rows and size + chars > PLAIN_ROWS_MAX_CHARS:
                self.row_arrays.append(to_json(rows).decode())
                rows, size = [], 0
            rows.append([
                job.id, job.task_type, job.queue, status.value, job.priority, payload, context,
                tags, job.max_attempts, stamps[job.run_at], stamps[job.created_at], job.rerun_of,
            ])
            size += chars
        if rows:
            self.row_arrays.append(to_json(rows).decode())

    def write(self, conn: sqlite3.Connection, owner: str) -> None:
        for rows in self.row_arrays:
            conn.execute(INSERT_PLAIN_JOBS, {"rows": rows})
        _insert_tags(conn, self.jobs)
        enqueued: dict[str, list[tuple[JobId, int]]] = {}
        for job, status in zip(self.jobs, self.statuses, strict=True):
            enqueued.setdefault(status.value, []).append((job.id, 0))
        for starting, ids in enqueued.items():  # queued, scheduled: each job's run_at decides
            _insert_events(conn, ids, "enqueued", starting, owner, self.now)

    def inserted(self) -> list[Inserted]:
        return [Inserted(_stored(job, status, None, self.now), created=True)
                for job, status in zip(self.jobs, self.statuses, strict=True)]


def _insert_events(
    conn: sqlite3.Connection, jobs: Sequence[tuple[str, int]], event: str, status: str,
    owner: str, now: datetime, message: str | None = None,
) -> None:
    """One event (`event`, `status`) for each (job id, attempt) in `jobs`. Many in one
    statement reading them from a JSON array: 1.45 us a job against 2.0 for a prepared
    statement run once a job, in batches of 1,000. A lone job through the prepared statement:
    the JSON one costs more to set up (4.3 against 1.9 us), and one enqueue at a time was 3 %
    slower with it (measured, commits included)."""
    if len(jobs) == 1:
        ((job_id, attempt),) = jobs
        conn.execute(INSERT_EVENT, (job_id, ts(now), event, status, attempt, owner, message))
    elif jobs:
        conn.execute(INSERT_EVENTS_FOR, {"ids": _ids_text(jobs), "now": ts(now), "event": event,
                                         "status": status, "owner": owner, "message": message})


def _completions_text(completions: Sequence[Completion], *, with_results: bool) -> str:
    """The JSON array COMPLETE_MANY reads. With a result anywhere, json_text, not
    json_types_text: the processor has checked that each result has a JSON form, not that it
    holds JSON types only ({None: 1} is written {"null": 1} by json_text). Without one (the
    usual batch: most handlers return nothing) the array holds job ids, attempts and owners
    only, JSON types, and json_types_text writes it in about a quarter of the time (0.18
    against 0.65 us a job for the encoder alone, measured)."""
    rows = [{"id": c.job_id, "attempt": c.fence.attempt, "owner": c.fence.owner, "result": c.result}
            for c in completions]
    return json_text(rows) if with_results else json_types_text(rows)


def _ids_text(ids: Sequence[Any]) -> str:
    """The JSON array of engine-made job ids (or id and attempt pairs) that a set-based
    statement reads: pydantic-core's encoder, with nothing for json_types_text to look for (no
    float, no lone surrogate in a hex id) on the claim, completion and enqueue paths."""
    return to_json(ids).decode()


class _Stamps(dict[datetime, str | None]):
    """ts() of the few times a batch of jobs shares, each formatted once."""

    def __missing__(self, value: datetime) -> str | None:
        text = self[value] = ts(value)
        return text


def _insert_each(
    conn: sqlite3.Connection, jobs: Sequence[NewJob], owner: str, now: datetime
) -> list[Inserted]:
    results: list[Inserted] = []
    events: list[tuple[Any, ...]] = []
    for job in jobs:
        status, error = _start_status(conn, job, now)
        params = {
            "id": job.id, "task_type": job.task_type, "queue": job.queue, "status": status.value,
            "priority": job.priority, "payload": json_types_text(job.payload),
            "context": _dump(job.context), "tags": _dump(list(job.tags)),
            "attempts": 1 if job.claimed_by else 0, "max_attempts": job.max_attempts,
            "run_at": ts(job.run_at), "created_at": ts(job.created_at),
            "started_at": ts(now) if job.claimed_by else None,
            # a job born cancelled (a dependency already failed) has ended: say when
            "finished_at": ts(now) if status == JobStatus.cancelled else None,
            "lease_owner": job.claimed_by, "lease_until": ts(job.lease_until),
            "error": error, "idempotency_key": job.idempotency_key, "rerun_of": job.rerun_of,
            "depends_on": _dump(list(job.depends_on)),
        }
        if conn.execute(INSERT_JOB, params).rowcount == 0:
            existing = conn.execute(SELECT_BY_IDEMPOTENCY_KEY, (job.idempotency_key,)).fetchone()
            results.append(Inserted(row_to_job(existing), created=False))
            continue
        if job.depends_on:
            conn.executemany(INSERT_DEPENDENCY, [(job.id, d) for d in job.depends_on])
        # written claimed: the timeline still reads "enqueued (queued), then claimed (running)"
        enqueued_as = JobStatus.queued if job.claimed_by else status
        events.append((job.id, ts(now), "enqueued", enqueued_as.value, 0, owner, error))
        if job.claimed_by:
            events.append((job.id, ts(now), "claimed", "running", 1, job.claimed_by, None))
        results.append(Inserted(_stored(job, status, error, now), created=True))
    conn.executemany(INSERT_EVENT, events)
    _insert_tags(conn, [r.job for r in results if r.created])
    return results


def _insert_tags(conn: sqlite3.Connection, jobs: Sequence[NewJob | JobRow]) -> None:
    pairs = [(tag, job.id) for job in jobs for tag in job.tags]
    if pairs:
        conn.executemany(INSERT_TAGS, pairs)


def _start_status(
    conn: sqlite3.Connection, job: NewJob, now: datetime
) -> tuple[JobStatus, str | None]:
    if job.claimed_by:
        return JobStatus.running, None
    if not job.depends_on:
        return lifecycle.initial_status(job.run_at, now, {})
    ids = list(dict.fromkeys(job.depends_on))
    found = dict(conn.execute(SELECT_STATUSES.format(ids=_placeholders(len(ids))), ids))
    for dep in ids:
        if dep not in found:
            raise UnknownDependency(dep)
    return lifecycle.initial_status(
        job.run_at, now, {JobId(k): JobStatus(v) for k, v in found.items()}
    )


def _stored(job: NewJob, status: JobStatus, error: str | None, now: datetime) -> JobRow:
    """The row just inserted, built from what was written (no read back on the hot path)."""
    claimed = job.claimed_by is not None
    return job_row((  # in JOB_COLUMNS order
        job.id, job.task_type, job.queue, status, job.priority, job.payload, job.context,
        list(job.tags), 1 if claimed else 0, job.max_attempts,
        _second_precision(job.run_at), _second_precision(job.created_at),
        _second_precision(now) if claimed else None,  # started_at
        _second_precision(now) if status == JobStatus.cancelled else None,  # finished_at
        job.claimed_by, job.lease_until,
        0, None, None, None,  # progress_done, progress_total, checkpoint, result
        error, None, [],  # error, error_traceback, attempt_history
        job.idempotency_key, job.rerun_of, list(job.depends_on),
    ))


def _second_precision(value: datetime) -> datetime:
    """What a stored timestamp reads back as: UTC, to the microsecond."""
    return value if value.tzinfo is UTC else value.astimezone(UTC)


def _apply(
    conn: sqlite3.Connection, t: Transition, owner: str, now: datetime
) -> Applied:
    sql, params = _transition_sql(t, now, "id = :id")
    row = conn.execute(sql, {**params, "id": t.job_id}).fetchone()
    if row is None:
        _explain_refusal(conn, t)
    job = row_to_job(row)
    conn.execute(
        INSERT_EVENT,
        (job.id, ts(now), t.event, job.status.value, job.attempts, owner, t.message),
    )
    woken, cancelled = _resolve_dependents(conn, job.id, job.status, owner, now)
    return Applied(job, woken, cancelled)


def _apply_alike(
    conn: sqlite3.Connection, transitions: Sequence[Transition], t: Transition, owner: str,
    now: datetime,
) -> list[Applied | Exception]:
    """`transitions`, which all make the change `t` (see `alike`), by one statement; then the
    refusals explained as `_apply` would, from one read of the jobs left."""
    sql, params = _transition_sql(t, now, ALIKE_TARGET)
    ids = [x.job_id for x in transitions]
    jobs = {job.id: job for job in map(row_to_job, conn.execute(sql, {**params, "ids": _ids_text(ids)}))}
    _insert_events(conn, [(j.id, j.attempts) for j in jobs.values()], t.event, t.to_status.value,
                   owner, now, t.message)
    left = [i for i in ids if i not in jobs]
    found = dict(conn.execute(STATUSES_OF, (_ids_text(left),))) if left else {}
    return [
        Applied(jobs[i]) if i in jobs
        else IllegalTransition(i, found[i], t.action) if i in found else JobNotFound(i)
        for i in ids
    ]


def _transition_sql(t: Transition, now: datetime, target: str) -> tuple[str, dict[str, Any]]:
    """The UPDATE of `t` (with its RETURNING) for the jobs the condition `target` names."""
    sets = ["status = :to_status"]
    params: dict[str, Any] = {"to_status": t.to_status.value}
    for column, value in t.changes.items():
        sets.append(f"{column} = :c_{column}")
        params[f"c_{column}"] = _column_value(column, value)
    if t.attempts_delta:
        sets.append("attempts = attempts + :delta")
        params["delta"] = t.attempts_delta
    if t.history is not None:
        sets.append(APPEND_HISTORY)
        params["history"] = _dump(t.history.as_json())
    elif t.running_attempt_outcome is not None:
        sets.append(APPEND_RUNNING_ATTEMPT)
        params.update(running_outcome=t.running_attempt_outcome.value,
                      now_iso=now.isoformat(), running_error=t.message)
    froms = sorted(s.value for s in t.from_statuses)
    # the unary +: the jobs are found by `target`'s id, not by a walk of a status index
    where = [f"+status IN ({', '.join(f':f{i}' for i in range(len(froms)))})"]
    params.update({f"f{i}": s for i, s in enumerate(froms)})
    if t.fence is not None:
        where.append("attempts = :fence_attempt AND lease_owner = :fence_owner")
        params.update(fence_attempt=t.fence.attempt, fence_owner=t.fence.owner)
    if t.lease_expired_by is not None:
        where.append("lease_until < :lease_expired_by")
        params["lease_expired_by"] = ts(t.lease_expired_by)
    sql = (f"UPDATE worker_queue SET {', '.join(sets)} WHERE {target} AND "
           f"{' AND '.join(where)} RETURNING {_COLS}")
    return sql, params


def _explain_refusal(conn: sqlite3.Connection, t: Transition) -> None:
    found = conn.execute(SELECT_FENCE, (t.job_id,)).fetchone()
    if found is None:
        raise JobNotFound(t.job_id)
    if JobStatus(found[0]) not in t.from_statuses:
        raise IllegalTransition(t.job_id, found[0], t.action)
    raise StaleLease(t.job_id, found[0], t.action)


def _resolve_dependents(
    conn: sqlite3.Connection, job_id: str, status: JobStatus, owner: str, now: datetime
) -> tuple[list[JobRow], list[JobRow]]:
    """A job that reached `status` frees or cancels the jobs waiting on it, in the same
    transaction. Returns the jobs it freed and those it cancelled (with their own dependents)."""
    woken: list[JobRow] = []
    cancelled: list[JobRow] = []
    if status not in lifecycle.TERMINAL:
        return woken, cancelled
    for dependent_id, run_at in conn.execute(WAITING_DEPENDENTS, (job_id,)).fetchall():
        if status == JobStatus.completed:
            if conn.execute(UNFINISHED_DEPENDENCIES, (dependent_id,)).fetchone()[0]:
                continue
            due_at = datetime.fromisoformat(run_at + _UTC_SUFFIX)
            release = lifecycle.dependencies_met(JobId(dependent_id), due_at, now)
            applied = _apply(conn, release, owner, now)
            woken.append(applied.job)
        else:
            transition = lifecycle.dependency_failed(JobId(dependent_id), JobId(job_id), status, now)
            try:
                applied = _apply(conn, transition, owner, now)  # cascades to its dependents
            except IllegalTransition:
                continue  # that cascade already cancelled it (it also waited on a dependent)
            cancelled += [applied.job, *applied.cancelled]
    return woken, cancelled



def _fire_cron(
    conn: sqlite3.Connection, schedule: str, fire_at: datetime, job: NewJob,
    skip_if_active_tag: str | None, owner: str, now: datetime,
) -> CronFireResult:
    """One cron fire in one transaction (SQLite serialises writers, so the fire row's insert
    decides among processes): the fire row, then the job only for the process that wrote it."""
    key = (schedule, ts(fire_at))
    if skip_if_active_tag is not None:
        active = conn.execute(
            ACTIVE_TAGGED_JOB, {"task_type": job.task_type, "tag": skip_if_active_tag}
        ).fetchone()
        if active is not None:
            if conn.execute(INSERT_CRON_FIRE, (*key, None, owner)).rowcount == 0:
                return CronFireResult(schedule, fire_at, "lost")
            return CronFireResult(schedule, fire_at, "skipped", active_job_id=JobId(active[0]))
    if conn.execute(INSERT_CRON_FIRE, (*key, job.id, owner)).rowcount == 0:
        return CronFireResult(schedule, fire_at, "lost")
    (inserted,) = _insert(conn, [job], owner, now)
    if inserted.job.id != job.id:  # its idempotency key was taken: that job is this fire's
        conn.execute(SET_CRON_FIRE_JOB, (inserted.job.id, *key))
    return CronFireResult(schedule, fire_at, "fired", job=inserted.job)


if TYPE_CHECKING:
    _conforms: type[JobStore] = SqliteJobStore
    _mapping: Mapping[str, Any]

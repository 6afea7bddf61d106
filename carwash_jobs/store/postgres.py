"""PostgresJobStore: the scale-out adapter (asyncpg), for many API and worker processes.

Claims are one `UPDATE ... WHERE id IN (SELECT ... FOR UPDATE SKIP LOCKED) RETURNING`, so
concurrent workers never wait on each other's rows and never get the same attempt. An insert
sends NOTIFY in its own transaction, so idle workers in other processes wake within
milliseconds of the commit; a cancel does the same so the process running the job stops it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from dataclasses import replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import asyncpg

from carwash_jobs import lifecycle
from carwash_jobs.errors import (
    IllegalTransition,
    JobNotFound,
    StaleLease,
    StoreUnavailable,
    UnknownDependency,
)
from carwash_jobs.lifecycle import JobStatus, Transition
from carwash_jobs.sqltext import NOT_RUNNING, numbered
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
    StatementFailures,
    Stats,
    T,
    Tx,
    TxFn,
    alike,
    cancel_inside_as_error,
    id_time,
    job_row,
    json_text,
    json_value,
)
from carwash_jobs.types import Clock, JobId, utc_now

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence

    from carwash_jobs.lifecycle import Fence

log = logging.getLogger(__name__)

#: A change with follow-ups locks its own job, then share-locks the jobs its follow-ups depend
#: on (SELECT_STATUSES): two jobs completing at once with follow-ups on each other lock in
#: opposite orders, and the server breaks the cycle by rolling one back. That one is run again,
#: whole (the caller's on_complete SQL included: it was rolled back with the rest), up to
#: this many times, rather than fail an attempt whose handler did its work.
APPLY_DEADLOCK_ATTEMPTS = 5

CHANNEL = "carwash_jobs"
#: a NOTIFY payload must stay under 8000 bytes: more new jobs than this send a reload hint
NOTIFY_JOBS_MAX = 40

_COLS = ", ".join(JOB_COLUMNS)

INSERT_JOB = f"""
INSERT INTO worker_queue ({_COLS}) VALUES (
  $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $20, $14, $15, 0, NULL,
  NULL, NULL, $16, NULL, '[]', $17, $18, $19)
ON CONFLICT (idempotency_key) DO NOTHING
RETURNING id
"""
#: plain jobs (no idempotency key, no dependencies, not claimed) from one array per column;
#: JSON columns travel as text (asyncpg would read a list inside the array as a dimension)
INSERT_PLAIN_JOBS = f"""
INSERT INTO worker_queue ({_COLS})
SELECT j.id, j.task_type, j.queue, j.status, j.priority, j.payload::json, j.context::json,
  j.tags::json, 0, j.max_attempts, j.run_at, j.created_at, NULL, NULL, NULL, NULL, 0, NULL, NULL,
  NULL, NULL, NULL, '[]', NULL, j.rerun_of, '[]'
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int[], $6::text[], $7::text[],
            $8::text[], $9::int[], $10::timestamptz[], $11::timestamptz[], $12::text[])
  AS j(id, task_type, queue, status, priority, payload, context, tags, max_attempts, run_at,
       created_at, rerun_of)
"""
INSERT_PLAIN_EVENTS = """
INSERT INTO job_events (job_id, at, event, status, attempt, process, message)
SELECT e.id, $3, 'enqueued', e.status, 0, $4, NULL
FROM unnest($1::text[], $2::text[]) AS e(id, status)
"""
SELECT_BY_IDEMPOTENCY_KEY = f"SELECT {_COLS} FROM worker_queue WHERE idempotency_key = $1"
INSERT_DEPENDENCY = "INSERT INTO job_dependencies (job_id, depends_on_id) VALUES ($1, $2)"
CREATED_AT_OF = "SELECT created_at FROM worker_queue WHERE id = $1"
INSERT_TAGS = """
INSERT INTO job_tags (tag, job_id) SELECT * FROM unnest($1::text[], $2::text[])
ON CONFLICT DO NOTHING
"""
INSERT_EVENT = """
INSERT INTO job_events (job_id, at, event, status, attempt, process, message)
VALUES ($1, $2, $3, $4, $5, $6, $7)
"""
#: the dependencies of a job being enqueued, share-locked until it commits: a dependency that
#: ends meanwhile waits for the new job and its job_dependencies rows, and then finds and frees
#: it. Unlocked, a dependency that completed between this read and the commit looked for
#: dependents before the new one existed, and left it waiting for ever. In id order, as every
#: statement here locks many rows.
SELECT_STATUSES = """
SELECT id, status FROM worker_queue WHERE id = ANY($1::text[]) ORDER BY id FOR SHARE
"""
NOTIFY = "SELECT pg_notify($1, $2)"
#: by id. `status || ''` keeps the planner on the primary key: given the bare column, once the
#: statistics say almost nothing is queued (a million finished jobs), it scans the status index
#: instead, through every queued job (6 ms a claim instead of 0.3 ms, measured)
CLAIM_IDS = f"""
UPDATE worker_queue
SET status = 'running', attempts = attempts + 1, lease_owner = $1, lease_until = $2,
    started_at = $3
WHERE id IN (
  SELECT id FROM worker_queue
  WHERE id = ANY($4::text[]) AND status || '' IN ('queued', 'scheduled') AND run_at <= $3
  FOR UPDATE SKIP LOCKED)
RETURNING {_COLS}
"""
CLAIM_DUE = f"""
UPDATE worker_queue
SET status = 'running', attempts = attempts + 1, lease_owner = $1, lease_until = $2,
    started_at = $3
WHERE id IN (
  SELECT id FROM worker_queue
  WHERE status = 'queued' AND run_at <= $3 AND ($5::text[] IS NULL OR queue = ANY($5::text[]))
  ORDER BY priority DESC, run_at, id LIMIT $4
  FOR UPDATE SKIP LOCKED)
RETURNING {_COLS}
"""
#: Claims under fleet-wide concurrency limits ($5 task types, $6 their limits). The claim
#: transaction first takes LOCK_TASK_TYPE for each limited type, so claims of one limited type
#: run one after another until commit; the statement's snapshot, taken after the lock, then
#: counts every job of that type that any process has claimed. Candidates are ranked within
#: their task type (priority, then age) and taken only while rank + running <= the limit.
_W_COLS = ", ".join(f"w.{c}" for c in JOB_COLUMNS)
_FLEET_COUNTS = """
limits AS (SELECT * FROM unnest($5::text[], $6::int[]) AS l(task_type, max_running)),
running AS (
  SELECT task_type, COUNT(*) AS n FROM worker_queue
  WHERE status = 'running' AND task_type = ANY($5::text[]) GROUP BY task_type),"""
_FLEET_GUARDED_UPDATE = f"""
ranked AS (
  SELECT id, task_type,
    ROW_NUMBER() OVER (PARTITION BY task_type ORDER BY priority DESC, run_at, id) AS nth
  FROM candidates)
UPDATE worker_queue w
SET status = 'running', attempts = w.attempts + 1, lease_owner = $1, lease_until = $2,
    started_at = $3
FROM ranked r LEFT JOIN limits l ON l.task_type = r.task_type
  LEFT JOIN running n ON n.task_type = r.task_type
WHERE w.id = r.id AND (l.max_running IS NULL OR r.nth + COALESCE(n.n, 0) <= l.max_running)
RETURNING {_W_COLS}
"""
CLAIM_IDS_LIMITED = f"""
WITH {_FLEET_COUNTS}
candidates AS (
  SELECT id, task_type, priority, run_at FROM worker_queue
  WHERE id = ANY($4::text[]) AND status || '' IN ('queued', 'scheduled') AND run_at <= $3
  FOR UPDATE SKIP LOCKED),{_FLEET_GUARDED_UPDATE}"""
#: the polling form ($4 how many, $7 queues): types already at their limit are left out
#: before the LIMIT applies
CLAIM_DUE_LIMITED = f"""
WITH {_FLEET_COUNTS}
candidates AS (
  SELECT id, task_type, priority, run_at FROM worker_queue
  WHERE status = 'queued' AND run_at <= $3 AND ($7::text[] IS NULL OR queue = ANY($7::text[]))
    AND task_type NOT IN (SELECT l.task_type FROM limits l JOIN running n USING (task_type)
                          WHERE n.n >= l.max_running)
  ORDER BY priority DESC, run_at, id LIMIT $4
  FOR UPDATE SKIP LOCKED),{_FLEET_GUARDED_UPDATE}"""


def _logging_claim(claim: str) -> str:
    """`claim` (an UPDATE ... RETURNING the job columns) that also writes each job's "claimed"
    event: one statement, one round trip, and atomic without a transaction of its own."""
    return f"""
WITH claimed AS ({claim}),
logged AS (
  INSERT INTO job_events (job_id, at, event, status, attempt, process, message)
  SELECT id, started_at, 'claimed', 'running', attempts, lease_owner, NULL FROM claimed)
SELECT * FROM claimed
"""


CLAIM_IDS = _logging_claim(CLAIM_IDS)
CLAIM_DUE = _logging_claim(CLAIM_DUE)
CLAIM_IDS_LIMITED = _logging_claim(CLAIM_IDS_LIMITED)
CLAIM_DUE_LIMITED = _logging_claim(CLAIM_DUE_LIMITED)
#: one lock per limited task type, held until the claim commits (see CLAIM_IDS_LIMITED)
LOCK_TASK_TYPE = "SELECT pg_advisory_xact_lock($1::bigint)"
SELECT_STATUS = "SELECT status FROM worker_queue WHERE id = $1"
APPEND_HISTORY = "attempt_history = (attempt_history::jsonb || jsonb_build_array(:history::jsonb))::json"
APPEND_RUNNING_ATTEMPT = """attempt_history = CASE WHEN status = 'running'
  THEN (attempt_history::jsonb || jsonb_build_array(jsonb_build_object('attempt', attempts,
    'outcome', :running_outcome::text, 'owner', lease_owner, 'finished_at', :now_iso::text,
    'error', :running_error::text)))::json
  ELSE attempt_history END"""
#: locked: a completion in another process that frees the same dependent waits here for
#: this transaction's commit, and its next statement (READ COMMITTED) sees this job's end.
#: Unlocked, two processes completing a job's last two dependencies at once each counted the
#: other's as unfinished, and neither freed it; a cancel of the dependent committed meanwhile
#: made the release refuse, and with it the whole completion batch.
WAITING_DEPENDENTS = """
SELECT d.job_id, w.run_at FROM job_dependencies d JOIN worker_queue w ON w.id = d.job_id
WHERE d.depends_on_id = $1 AND w.status = 'waiting'
ORDER BY d.job_id FOR UPDATE OF w
"""
#: the waiting dependents of a completion batch, locked in id order in one statement before
#: the batch frees them job by job: two batches locking their dependents job by job could
#: take two of them in opposite orders
LOCK_WAITING_DEPENDENTS = """
SELECT id FROM worker_queue WHERE status = 'waiting' AND id IN (
  SELECT job_id FROM job_dependencies WHERE depends_on_id = ANY($1::text[]))
ORDER BY id FOR UPDATE
"""
UNFINISHED_DEPENDENCIES = """
SELECT COUNT(*) FROM job_dependencies d JOIN worker_queue w ON w.id = d.depends_on_id
WHERE d.job_id = $1 AND w.status != 'completed'
"""
SAVE_PROGRESS = """
UPDATE worker_queue SET progress_done = COALESCE($4, progress_done),
  progress_total = CASE WHEN $5 THEN $6 ELSE progress_total END,
  checkpoint = COALESCE($7::json, checkpoint)
WHERE id = $1 AND status = 'running' AND attempts = $2 AND lease_owner = $3
"""
#: Statements that change many rows lock them in id order first (ORDER BY id FOR UPDATE):
#: a heartbeat and a batch of completions of one process touch the same rows, and two
#: multi-row UPDATEs that lock them in different orders deadlock (seen under load: the
#: heartbeat or the completion batch then fails, and the batch's jobs run again).
EXTEND_LEASES = """
WITH locked AS (
  SELECT id FROM worker_queue
  WHERE lease_owner = $2 AND status = 'running' AND id = ANY($3::text[])
  ORDER BY id FOR UPDATE)
UPDATE worker_queue w SET lease_until = $1
FROM locked WHERE w.id = locked.id AND w.lease_owner = $2 AND w.status = 'running'
RETURNING w.id
"""
PROMOTE_DUE = """
UPDATE worker_queue SET status = 'queued'
WHERE id IN (SELECT id FROM worker_queue WHERE status = 'scheduled' AND run_at <= $1
             FOR UPDATE SKIP LOCKED)
RETURNING id, attempts
"""
EXPIRED_LEASES = f"""
SELECT {_COLS} FROM worker_queue
WHERE status = 'running' AND lease_until < $1 ORDER BY lease_until LIMIT $2
"""
RUNNING_OWNED_BY = f"""
SELECT {_COLS} FROM worker_queue WHERE status = 'running' AND lease_owner = ANY($1::text[])
"""
RUNNING_OWNERS = "SELECT DISTINCT lease_owner FROM worker_queue WHERE status = 'running'"
RUNNING_BY_OWNER = """
SELECT lease_owner, COUNT(*) FROM worker_queue WHERE status = 'running' GROUP BY lease_owner
"""
GET_JOB = f"SELECT {_COLS} FROM worker_queue WHERE id = $1"
GET_JOBS = f"SELECT {_COLS} FROM worker_queue WHERE id = ANY($1::text[])"
DUE_JOBS = """
SELECT id, task_type, queue, priority, run_at FROM worker_queue
WHERE status = 'queued' AND run_at <= $1 ORDER BY priority DESC, run_at, id LIMIT $2
"""
#: the same, only of the task types $3: the LIMIT counts only rows of these types
DUE_JOBS_OF_TYPES = """
SELECT id, task_type, queue, priority, run_at FROM worker_queue
WHERE status = 'queued' AND run_at <= $1 AND task_type = ANY($3::text[])
ORDER BY priority DESC, run_at, id LIMIT $2
"""
JOB_EVENTS = """
SELECT at, event, status, attempt, process, message FROM job_events
WHERE job_id = $1 ORDER BY id
"""
#: Counts by task type and status without counting a big table (migration 0005): finished jobs
#: from job_counts, which triggers keep (one row per connection that finished jobs: summed);
#: unfinished ones through the partial index of their status (a literal, so that the planner can
#: prove the index covers it); waiting jobs, which have no index of their own, through their
#: dependency edges (a waiting job always has some)
COUNTS = """
SELECT task_type, 'queued', COUNT(*) FROM worker_queue WHERE status = 'queued' GROUP BY task_type
UNION ALL
SELECT task_type, 'scheduled', COUNT(*) FROM worker_queue WHERE status = 'scheduled'
GROUP BY task_type
UNION ALL
SELECT task_type, 'running', COUNT(*) FROM worker_queue WHERE status = 'running' GROUP BY task_type
UNION ALL
SELECT task_type, 'waiting', COUNT(*) FROM worker_queue
WHERE status = 'waiting' AND id IN (SELECT job_id FROM job_dependencies) GROUP BY task_type
UNION ALL
SELECT task_type, status, SUM(n)::bigint FROM job_counts GROUP BY task_type, status
HAVING SUM(n) <> 0
"""
#: folds the per-connection rows of job_counts into shard 0, skipping rows a transaction holds
#: (so it never waits, and never deadlocks with a job's transaction); one fold at a time
FOLD_COUNTS = """
WITH folded AS (
  DELETE FROM job_counts WHERE ctid IN (
    SELECT ctid FROM job_counts WHERE shard <> 0 FOR UPDATE SKIP LOCKED)
  RETURNING task_type, status, n)
INSERT INTO job_counts (task_type, status, shard, n)
SELECT task_type, status, 0, SUM(n) FROM folded GROUP BY task_type, status
ON CONFLICT (task_type, status, shard) DO UPDATE SET n = job_counts.n + excluded.n
"""
FOLD_COUNTS_LOCK = "SELECT pg_try_advisory_xact_lock(hashtext('carwash_jobs.fold_counts'))"
COMPLETE_MANY = """
WITH locked AS (
  SELECT id FROM worker_queue WHERE id = ANY($1::text[]) ORDER BY id FOR UPDATE)
UPDATE worker_queue w SET status = 'completed', result = c.result::json, error = NULL,
  error_traceback = NULL, finished_at = $5, lease_owner = NULL, lease_until = NULL,
  attempt_history = (w.attempt_history::jsonb || jsonb_build_array(jsonb_build_object(
    'attempt', w.attempts, 'outcome', 'completed', 'owner', w.lease_owner,
    'finished_at', $6::text, 'error', NULL)))::json
FROM unnest($1::text[], $2::int[], $3::text[], $4::text[]) AS c(id, attempt, owner, result),
  locked
WHERE w.id = c.id AND w.id = locked.id AND w.status = 'running' AND w.attempts = c.attempt
  AND w.lease_owner = c.owner
RETURNING w.id, w.attempts
"""
#: the completion and its events in one statement
COMPLETE_MANY = f"""
WITH done AS ({COMPLETE_MANY}),
logged AS (
  INSERT INTO job_events (job_id, at, event, status, attempt, process, message)
  SELECT id, $5, 'completed', 'completed', attempts, $7, NULL FROM done)
SELECT id FROM done
"""
#: A statement of its own, after the completion: its snapshot then includes a dependency
#: committed while the completion waited for a row lock (a heartbeat's), which a subquery of
#: the completion itself, reading the snapshot taken before that wait, would miss for good.
WITH_DEPENDENTS = """
SELECT DISTINCT depends_on_id FROM job_dependencies WHERE depends_on_id = ANY($1::text[])
"""
#: the unique (schedule, fire_at) key lets exactly one process record a cron fire; a second
#: process waits for the first one's commit, then inserts nothing
INSERT_CRON_FIRE = """
INSERT INTO cron_fires (schedule, fire_at, job_id, fired_by) VALUES ($1, $2, $3, $4)
ON CONFLICT (schedule, fire_at) DO NOTHING
RETURNING schedule
"""
SET_CRON_FIRE_JOB = "UPDATE cron_fires SET job_id = $1 WHERE schedule = $2 AND fire_at = $3"
#: taken before a schedule that skips overlaps looks for its active job: two processes firing
#: different fire times of it at once (a process a tick behind, a sub-minute schedule) write
#: different fire rows, which do not make one wait for the other, and each found no active
#: job and inserted one. The two-key form: its key space is not the single-key one of the
#: task types' and the vacuum's locks.
CRON_SCHEDULE_LOCK = "SELECT pg_advisory_xact_lock(hashtext('carwash_jobs.cron'), hashtext($1))"
#: an unfinished job of a schedule (overlap = skip): the unfinished jobs of its task type, in two
#: parts that each match a partial index (migration 0008: running jobs are in the lease index
#: only), each checked for the tag; one IN list with 'running' in it matched neither and walked
#: the primary key
ACTIVE_TAGGED_JOB = f"""
SELECT id FROM (
  SELECT w.id FROM worker_queue w JOIN job_tags t ON t.tag = $2 AND t.job_id = w.id
  WHERE w.task_type = $1 AND w.status IN ('waiting', 'queued', 'scheduled') AND w.{NOT_RUNNING}
  UNION ALL
  SELECT w.id FROM worker_queue w JOIN job_tags t ON t.tag = $2 AND t.job_id = w.id
  WHERE w.task_type = $1 AND w.status = 'running') AS active
ORDER BY id LIMIT 1
"""
CRON_FIRES = """
SELECT schedule, fire_at, job_id, fired_by FROM cron_fires
ORDER BY fire_at DESC, schedule LIMIT $1
"""
CRON_FIRES_OF_SCHEDULE = """
SELECT schedule, fire_at, job_id, fired_by FROM cron_fires WHERE schedule = $1
ORDER BY fire_at DESC LIMIT $2
"""
#: take slots of a fleet-wide pace: the row's next_at moves on by $3 seconds, unless the first
#: free slot is later than $4 (then nothing changes and nothing is returned). The upsert locks
#: the row, so concurrent callers take their slots one after another.
RESERVE_RATE = """
INSERT INTO rate_limits (name, next_at) VALUES ($1, $2::float8 + $3::float8)
ON CONFLICT (name) DO UPDATE SET next_at = GREATEST(rate_limits.next_at, $2::float8) + $3::float8
WHERE rate_limits.next_at <= $4::float8
RETURNING next_at
"""
RATE_NEXT_AT = "SELECT next_at FROM rate_limits WHERE name = $1"
ANNOUNCE_PROCESS = """
INSERT INTO processes (owner, role, host, pid, started_at, last_seen_at, expires_at)
VALUES ($1, $2, $3, $4, $5, $6, $7)
ON CONFLICT (owner) DO UPDATE
SET last_seen_at = EXCLUDED.last_seen_at, expires_at = EXCLUDED.expires_at
"""
PRUNE_PROCESSES = "DELETE FROM processes WHERE expires_at < $1"
RETIRE_PROCESS = "DELETE FROM processes WHERE owner = $1"
LIVE_PROCESSES = """
SELECT owner, role, host, pid, started_at, last_seen_at, expires_at FROM processes
WHERE expires_at > $1 ORDER BY started_at, owner
"""
#: a dead process's row is kept this long after it expired (the dashboard may show it)
PROCESS_RETENTION = timedelta(hours=1)

#: finished jobs of one status past their retention, oldest first, locked so that a concurrent
#: retry or a second pruning process skips them. `status` is a literal, never a parameter: a
#: generic plan could not prove that the partial index ix_worker_queue_finished covers it
PRUNABLE = """
SELECT id, task_type, status, payload FROM worker_queue
WHERE status = '{status}' AND finished_at < $1 ORDER BY finished_at LIMIT $2
FOR UPDATE SKIP LOCKED
"""
#: what a pruned job leaves in the database
PRUNE_DELETES = (
    "DELETE FROM job_events WHERE job_id = ANY($1::text[])",
    "DELETE FROM job_tags WHERE job_id = ANY($1::text[])",
    "DELETE FROM job_dependencies WHERE job_id = ANY($1::text[])",
    "DELETE FROM job_dependencies WHERE depends_on_id = ANY($1::text[])",
    "DELETE FROM worker_queue WHERE id = ANY($1::text[])",
)
PRUNED_STATUSES = ("completed", "cancelled", "failed")
#: cron fires before $1, except each schedule's newest (cron resumes from it), locked so that a
#: second pruning process skips them. The schedules come from a skip scan of the primary key
#: (one probe per schedule), and each one's old fires from a range of it: never a scan of all
#: the fires kept
PRUNE_CRON_FIRES = """
WITH RECURSIVE schedules(name) AS (
  SELECT MIN(schedule) FROM cron_fires
  UNION ALL
  SELECT (SELECT MIN(schedule) FROM cron_fires WHERE schedule > name) FROM schedules
  WHERE name IS NOT NULL),
old AS (
  SELECT f.schedule, f.fire_at FROM schedules JOIN cron_fires AS f ON f.schedule = schedules.name
  WHERE f.fire_at < $1
    AND f.fire_at < (SELECT MAX(fire_at) FROM cron_fires WHERE schedule = schedules.name)
  LIMIT $2 FOR UPDATE OF f SKIP LOCKED),
gone AS (
  DELETE FROM cron_fires AS c USING old WHERE c.schedule = old.schedule AND c.fire_at = old.fire_at
  RETURNING 1)
SELECT COUNT(*) FROM gone
"""
#: the server's own vacuuming; store.vacuum leaves the tables to it when it is on
AUTOVACUUM_ON = "SELECT current_setting('autovacuum')::bool"
#: one vacuum at a time in the fleet: a session lock (VACUUM cannot run in a transaction), tried,
#: never waited for
VACUUM_LOCK = "SELECT pg_try_advisory_lock(hashtext('carwash_jobs.vacuum'))"
VACUUM_UNLOCK = "SELECT pg_advisory_unlock(hashtext('carwash_jobs.vacuum'))"
#: how long ago the queue's table was last vacuumed, by anyone (NULL: never). worker_queue stands
#: for the eight: a vacuum of it alone (by hand, or the server's against wraparound, which runs
#: even with autovacuum off) makes the fleet leave the others for one window
SECONDS_SINCE_VACUUM = """
SELECT EXTRACT(EPOCH FROM clock_timestamp() - GREATEST(last_vacuum, last_autovacuum))::float8
FROM pg_stat_user_tables WHERE relid = 'worker_queue'::regclass
"""
#: every table whose rows the engine updates or deletes. SKIP_LOCKED: a table that a session
#: outside the fleet is vacuuming (or a migration holds) is left to it, not waited for (the
#: fleet's own vacuums take turns through VACUUM_LOCK)
VACUUM_QUEUE_TABLES = """
VACUUM (SKIP_LOCKED) worker_queue, job_counts, job_events, job_tags, job_dependencies,
  rate_limits, processes, cron_fires
"""
#: one index range of ix_worker_queue_finished per status: given the three statuses as one IN
#: list, the planner scans the whole table instead (150 ms at a million rows, measured)
FINISHED_PER_MINUTE = "\nUNION ALL\n".join(
    f"""SELECT date_trunc('minute', finished_at), '{status}', COUNT(*) FROM worker_queue
WHERE status IN ('completed', 'failed', 'cancelled') AND status = '{status}' AND finished_at >= $1
GROUP BY 1"""
    for status in ("completed", "failed", "cancelled")
)


def dsn_of(url: str) -> str:
    """asyncpg speaks plain postgresql:// URLs."""
    return "postgresql://" + url.split("://", 1)[1]


_STATUS_AT = JOB_COLUMNS.index("status")


def row_to_job(row: Sequence[Any]) -> JobRow:
    """A row of the job columns, in JOB_COLUMNS order (JobRow's fields are in that order)."""
    values = list(row)
    values[_STATUS_AT] = JobStatus(values[_STATUS_AT])
    return job_row(values)


async def _init_connection(conn: asyncpg.Connection) -> None:
    for typename in ("json", "jsonb"):
        await conn.set_type_codec(
            typename, encoder=_json_parameter, decoder=json_value, schema="pg_catalog"
        )


class _NoJsonForm(Exception):
    """json_text's refusal of a json parameter, marked: asyncpg wraps whatever a codec raises
    in a DataError, and _encoder_errors hands on this one alone."""

    def __init__(self, refusal: TypeError | ValueError) -> None:
        super().__init__(str(refusal))
        self.refusal = refusal


def _json_parameter(value: Any) -> str:
    try:
        return json_text(value)
    except (TypeError, ValueError) as exc:
        raise _NoJsonForm(exc) from exc


async def _keep_session(conn: asyncpg.Connection) -> None:
    """The pool's reset on release: none. asyncpg's default (RESET ALL, UNLISTEN *, CLOSE ALL,
    advisory unlocks) is one more round trip on every write, for session state the store's own
    statements never leave (their locks are transaction locks, bar the vacuum's session lock,
    which vacuum() lets go itself or ends the session; LISTEN has a connection of its own). An
    open transaction is still rolled back by the pool itself; a caller's transaction, which runs
    its own SQL, gets the full reset (see transaction)."""


@contextlib.contextmanager
def _encoder_errors() -> Iterator[None]:
    """asyncpg reports json_text's refusal of a json parameter (NaN, a value with no JSON form)
    as a DataError of the statement; raise the encoder's own TypeError or ValueError instead,
    as the SQLite store does, so callers meet one error on both stores. Any other DataError
    stays as it is."""
    try:
        yield
    except asyncpg.DataError as exc:
        if not isinstance(exc.__cause__, _NoJsonForm):
            raise
        refusal = exc.__cause__.refusal
        raise type(refusal)(*refusal.args) from exc


@contextlib.asynccontextmanager
async def _transaction(pool: asyncpg.Pool, *, callers_sql: bool) -> AsyncIterator[asyncpg.Connection]:
    """A pooled connection in a transaction. When a caller's own SQL runs in it, the session
    gets asyncpg's full reset afterwards: that SQL may have changed it (see _keep_session)."""
    async with pool.acquire() as conn:
        try:
            async with conn.transaction():
                yield conn
        finally:
            if callers_sql:
                await _reset_or_drop(conn)


async def _reset_or_drop(conn: asyncpg.Connection) -> None:
    """asyncpg's full session reset. A connection that cannot take it is closed, and the
    pool opens another: a broken one raises nothing over the caller's own outcome."""
    try:
        await conn.reset()
    except Exception:
        conn.terminate()
    except asyncio.CancelledError:  # half reset: not fit to be handed out again
        conn.terminate()
        raise


class PostgresTx:
    """A caller's transaction on one pooled connection, with portable `:name` parameters. A
    statement of it that fails fails the whole transaction (`failures`, see
    StatementFailures): PostgreSQL would answer its COMMIT with a silent ROLLBACK."""

    dialect = "postgresql"

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.failures = StatementFailures(asyncpg.PostgresError)

    async def execute(self, sql: str, params: Mapping[str, Any] | None = None) -> int:
        text, args = numbered(sql, params)
        with self.failures.noting():
            status: str = await self.conn.execute(text, *args)
        last = status.rsplit(" ", 1)[-1]
        return int(last) if last.isdigit() else 0

    async def executemany(self, sql: str, params: Sequence[Mapping[str, Any]]) -> None:
        if not params:
            return
        text, _ = numbered(sql, params[0])
        with self.failures.noting():
            await self.conn.executemany(text, [numbered(sql, p)[1] for p in params])

    async def fetch(
        self, sql: str, params: Mapping[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        text, args = numbered(sql, params)
        with self.failures.noting():
            return [dict(r) for r in await self.conn.fetch(text, *args)]


class PostgresJobStore:
    """Jobs in PostgreSQL: a connection pool for work, one more connection for LISTEN."""

    dialect = "postgresql"

    def __init__(
        self, url: str, *, owner: str, clock: Clock = utc_now, pool_size: int = 10
    ) -> None:
        self._dsn = dsn_of(url)
        self._owner = owner
        self._clock = clock
        self._pool_size = pool_size
        self._pool: asyncpg.Pool | None = None
        self._listener: _Listener | None = None

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise StoreUnavailable("the store is not open")
        return self._pool

    async def open(self) -> None:
        try:
            self._pool = await asyncpg.create_pool(
                self._dsn, min_size=1, max_size=self._pool_size, init=_init_connection,
                reset=_keep_session,
            )
        except (OSError, asyncpg.PostgresError) as exc:
            raise StoreUnavailable(f"cannot reach PostgreSQL: {exc}") from exc

    async def close(self) -> None:
        if self._listener is not None:
            await self._listener.stop()
            self._listener = None
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await _close_or_drop(pool)

    async def ping(self) -> None:
        try:
            await self.pool.fetchval("SELECT 1")
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise StoreUnavailable(f"the database does not answer: {exc}") from exc

    async def listen(self, on_notice: Callable[[Notice], None]) -> None:
        self._listener = _Listener(self._dsn, self._owner, on_notice)
        await self._listener.start()

    # -- writes ------------------------------------------------------------------------
    async def insert(self, jobs: Sequence[NewJob], tx: Tx | None = None) -> list[Inserted]:
        with _encoder_errors():
            if tx is not None:
                assert isinstance(tx, PostgresTx), "a PostgresJobStore joins only its own transactions"
                with tx.failures.noting():
                    return await _insert(tx.conn, jobs, self._owner, self._clock())
            async with self.pool.acquire() as conn, conn.transaction():
                return await _insert(conn, jobs, self._owner, self._clock())

    async def claim(
        self, ids: Sequence[JobId], owner: str, lease_until: datetime,
        limits: Mapping[str, int] | None = None,
    ) -> list[JobRow]:
        if not ids:
            return []
        now = self._clock()
        if not limits:
            rows = await self.pool.fetch(CLAIM_IDS, owner, lease_until, now, list(ids))
            return [row_to_job(r) for r in rows]
        async with self.pool.acquire() as conn, conn.transaction():
            types = await _lock_task_types(conn, limits)
            rows = await conn.fetch(CLAIM_IDS_LIMITED, owner, lease_until, now, list(ids),
                                    types, [limits[t] for t in types])
        return [row_to_job(r) for r in rows]

    async def claim_due(
        self, limit: int, owner: str, lease_until: datetime, queues: Sequence[str] | None = None,
        limits: Mapping[str, int] | None = None,
    ) -> list[JobRow]:
        now = self._clock()
        named = list(queues) if queues else None
        if not limits:
            rows = await self.pool.fetch(CLAIM_DUE, owner, lease_until, now, limit, named)
            return [row_to_job(r) for r in rows]
        async with self.pool.acquire() as conn, conn.transaction():
            types = await _lock_task_types(conn, limits)
            rows = await conn.fetch(CLAIM_DUE_LIMITED, owner, lease_until, now, limit, types,
                                    [limits[t] for t in types], named)
        return [row_to_job(r) for r in rows]

    async def apply(
        self,
        transition: Transition,
        *,
        follow_ups: Sequence[NewJob] = (),
        before: TxFn[None] | None = None,
    ) -> Applied:
        now = self._clock()
        for attempt in range(1, APPLY_DEADLOCK_ATTEMPTS + 1):
            try:
                async with _transaction(self.pool, callers_sql=before is not None) as conn:
                    if before is not None:  # the caller's own SQL: its errors are its own
                        tx = PostgresTx(conn)
                        with cancel_inside_as_error():
                            await before(tx)
                        tx.failures.refuse_commit()
                    with _encoder_errors():
                        applied = await _apply(conn, transition, self._owner, now)
                        if not follow_ups:
                            return applied
                        inserted = await _insert(conn, follow_ups, self._owner, now)
                        return applied.with_follow_ups(inserted)
            except asyncpg.DeadlockDetectedError:
                if attempt == APPLY_DEADLOCK_ATTEMPTS:
                    raise
                log.info("job %s: %s met a deadlock, which the server broke by rolling it "
                         "back; running it again", transition.job_id, transition.action)
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def apply_many(self, transitions: Sequence[Transition]) -> list[Applied | Exception]:
        now = self._clock()
        results: list[Applied | Exception] = [IllegalTransition("", "", "")] * len(transitions)
        same = alike(transitions)
        async with self.pool.acquire() as conn, conn.transaction():
            if same is not None:
                return await _apply_alike(conn, transitions, same, self._owner, now)
            # in job id order, like the other many-row writes (EXTEND_LEASES): no lock cycles
            for index in sorted(range(len(transitions)), key=lambda i: transitions[i].job_id):
                try:
                    async with conn.transaction():  # a savepoint: one refusal spoils nothing
                        results[index] = await _apply(conn, transitions[index], self._owner, now)
                except (IllegalTransition, JobNotFound) as exc:
                    results[index] = exc
        return results

    async def complete_many(self, completions: Sequence[Completion]) -> Completed:
        if not completions:
            return Completed(frozenset())
        now = self._clock()
        async with self.pool.acquire() as conn, conn.transaction():
            done = await conn.fetch(
                COMPLETE_MANY, [c.job_id for c in completions],
                [c.fence.attempt for c in completions], [c.fence.owner for c in completions],
                # as text: asyncpg would read a list result inside the array as a dimension
                [None if c.result is None else json_text(c.result) for c in completions],
                now, now.isoformat(), self._owner,
            )
            woken: list[JobRow] = []
            with_dependents = await conn.fetch(WITH_DEPENDENTS, [r[0] for r in done])
            if with_dependents:
                await conn.execute(LOCK_WAITING_DEPENDENTS, [r[0] for r in with_dependents])
            for (job_id,) in with_dependents:
                freed, _ = await _resolve_dependents(
                    conn, job_id, JobStatus.completed, self._owner, now
                )
                woken += freed
            return Completed(frozenset(JobId(r[0]) for r in done), woken)

    async def save_progress(
        self,
        job_id: JobId,
        fence: Fence,
        *,
        done: int | None = None,
        total: int | None = None,
        checkpoint: dict[str, Any] | None = None,
    ) -> bool:
        with _encoder_errors():
            status: str = await self.pool.execute(
                SAVE_PROGRESS, job_id, fence.attempt, fence.owner, done, done is not None, total,
                checkpoint,
            )
        return status.endswith(" 1")

    async def extend_leases(
        self, owner: str, ids: Sequence[JobId], lease_until: datetime
    ) -> set[JobId]:
        if not ids:
            return set()
        rows = await self.pool.fetch(EXTEND_LEASES, lease_until, owner, list(ids))
        return {JobId(r["id"]) for r in rows}

    async def promote_due(self, now: datetime) -> int:
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(PROMOTE_DUE, now)
            await conn.executemany(
                INSERT_EVENT,
                [(r["id"], now, "due", "queued", r["attempts"], self._owner, None) for r in rows],
            )
            return len(rows)

    # -- the fleet -----------------------------------------------------------------------
    async def reserve_rate(
        self, name: str, interval_seconds: float, count: int, max_wait_seconds: float
    ) -> Reservation:
        now = self._clock().timestamp()
        cost = interval_seconds * count
        async with self.pool.acquire() as conn, conn.transaction():
            next_at = await conn.fetchval(RESERVE_RATE, name, now, cost, now + max_wait_seconds)
            if next_at is not None:
                return Reservation(True, max(next_at - cost - now, 0.0))
            next_at = await conn.fetchval(RATE_NEXT_AT, name)
            return Reservation(False, max(next_at - now, 0.0))

    async def announce_process(self, process: ProcessInfo, ttl_seconds: float) -> None:
        now = self._clock()
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                ANNOUNCE_PROCESS, process.owner, process.role, process.host, process.pid,
                process.started_at, now, now + timedelta(seconds=ttl_seconds),
            )
            await conn.execute(PRUNE_PROCESSES, now - PROCESS_RETENTION)

    async def retire_process(self, owner: str) -> None:
        await self.pool.execute(RETIRE_PROCESS, owner)

    async def live_processes(self) -> list[ProcessInfo]:
        rows = await self.pool.fetch(LIVE_PROCESSES, self._clock())
        return [ProcessInfo(*r) for r in rows]

    def in_own_transaction(self) -> bool:
        return False  # a write takes a connection of its own from the pool

    async def transaction(self, fn: TxFn[T]) -> T:
        async with _transaction(self.pool, callers_sql=True) as conn:
            tx = PostgresTx(conn)
            with cancel_inside_as_error():
                result = await fn(tx)
            tx.failures.refuse_commit()
            return result

    # -- reads -------------------------------------------------------------------------
    async def expired_leases(self, now: datetime, limit: int) -> list[JobRow]:
        return [row_to_job(r) for r in await self.pool.fetch(EXPIRED_LEASES, now, limit)]

    async def running_owned_by(self, owners: Sequence[str]) -> list[JobRow]:
        if not owners:
            return []
        return [row_to_job(r) for r in await self.pool.fetch(RUNNING_OWNED_BY, list(owners))]

    async def running_owners(self) -> list[str]:
        return [r[0] for r in await self.pool.fetch(RUNNING_OWNERS) if r[0] is not None]

    async def get(self, job_id: JobId) -> JobRow:
        row = await self.pool.fetchrow(GET_JOB, job_id)
        if row is None:
            raise JobNotFound(job_id)
        return row_to_job(row)

    async def get_many(self, ids: Sequence[JobId]) -> list[JobRow]:
        if not ids:
            return []
        return [row_to_job(r) for r in await self.pool.fetch(GET_JOBS, list(ids))]

    async def list_jobs(self, flt: JobFilter, limit: int, cursor: str | None = None) -> Page:
        if flt.tag is None and (flt.created_after or flt.created_before):
            return await self._list_by_created(flt, limit, cursor)
        if flt.tag is None:
            where, params = _list_where(flt, cursor, "id")
            sql = f"SELECT {_COLS} FROM worker_queue WHERE {where} ORDER BY id DESC LIMIT :limit"
        else:  # the range of job_tags in id order drives; the tables share no column name
            where, params = _list_where(flt, cursor, "job_tags.job_id")
            sql = (f"SELECT {_COLS} FROM job_tags JOIN worker_queue ON worker_queue.id = "
                   f"job_tags.job_id WHERE job_tags.tag = :tag AND {where} "
                   "ORDER BY job_tags.job_id DESC LIMIT :limit")
            params["tag"] = flt.tag
        text, args = numbered(sql, {**params, "limit": limit + 1})
        rows = await self.pool.fetch(text, *args)
        items = [row_to_job(r) for r in rows[:limit]]
        return Page(items, items[-1].id if len(rows) > limit else None)

    async def _list_by_created(self, flt: JobFilter, limit: int, cursor: str | None) -> Page:
        position = None
        if cursor is not None:
            at = await self.pool.fetchval(CREATED_AT_OF, cursor)
            position = (at or id_time(cursor), cursor)
        keyset = CreatedKeyset.of(flt, position)
        where, params = _list_where(replace(flt, created_after=None, created_before=None), None, "id")
        clauses = [where]
        if keyset.after is not None:
            clauses.append("created_at >= :after")
            params["after"] = keyset.after
        if keyset.before is not None:
            clauses.append("created_at < :before")
            params["before"] = keyset.before
        if keyset.cursor is not None:
            clauses.append("(created_at, id) < (:cursor_at, :cursor_id)")
            params["cursor_at"], params["cursor_id"] = keyset.cursor
        text, args = numbered(
            f"SELECT {_COLS} FROM worker_queue WHERE {' AND '.join(clauses)} "
            "ORDER BY created_at DESC, id DESC LIMIT :limit",
            {**params, "limit": limit + 1},
        )
        rows = await self.pool.fetch(text, *args)
        items = [row_to_job(r) for r in rows[:limit]]
        return Page(items, items[-1].id if len(rows) > limit else None)

    async def due(
        self, now: datetime, limit: int, *, task_types: Sequence[str] | None = None
    ) -> list[DueJob]:
        if task_types is None:
            rows = await self.pool.fetch(DUE_JOBS, now, limit)
        else:
            rows = await self.pool.fetch(DUE_JOBS_OF_TYPES, now, limit, list(task_types))
        return [DueJob(JobId(r[0]), r[1], r[2], r[3], r[4]) for r in rows]

    async def failed_ids(self, flt: FailedFilter, limit: int) -> list[JobId]:
        if flt.ids is not None and not flt.ids:
            return []
        pairs: list[tuple[str, str, Any]] = [
            ("id = ANY(:ids::text[])", "ids", list(flt.ids) if flt.ids is not None else None),
            ("task_type = :task_type", "task_type", flt.task_type),
            ("finished_at >= :after", "after", flt.failed_after),
            ("finished_at < :before", "before", flt.failed_before),
            ("id > :after_id", "after_id", flt.after_id),
        ]
        clauses = ["status = 'failed'"] + [c for c, _, v in pairs if v is not None]
        params = {name: v for _, name, v in pairs if v is not None}
        text, args = numbered(
            f"SELECT id FROM worker_queue WHERE {' AND '.join(clauses)} ORDER BY id LIMIT :limit",
            {**params, "limit": limit},
        )
        return [JobId(r[0]) for r in await self.pool.fetch(text, *args)]

    async def events(self, job_id: JobId) -> list[EventRow]:
        return [EventRow(*r) for r in await self.pool.fetch(JOB_EVENTS, job_id)]

    async def stats(self) -> Stats:
        by_status: dict[str, int] = {s.value: 0 for s in JobStatus}
        by_type: dict[str, dict[str, int]] = {}
        for task_type, status, count in await self.pool.fetch(COUNTS):
            by_status[status] = by_status.get(status, 0) + count
            by_type.setdefault(task_type, {})[status] = count
        owners = {r[0]: r[1] for r in await self.pool.fetch(RUNNING_BY_OWNER) if r[0]}
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
        async with self.pool.acquire() as conn, conn.transaction():
            return await _fire_cron(conn, schedule, fire_at, job, skip_if_active_tag, self._owner,
                                    self._clock())

    async def cron_fires(self, schedule: str | None, limit: int) -> list[CronFireRow]:
        if schedule is None:
            rows = await self.pool.fetch(CRON_FIRES, limit)
        else:
            rows = await self.pool.fetch(CRON_FIRES_OF_SCHEDULE, schedule, limit)
        return [
            CronFireRow(r[0], r[1], None if r[2] is None else JobId(r[2]), r[3]) for r in rows
        ]

    async def finished_per_minute(self, since: datetime) -> list[MinuteCount]:
        rows = await self.pool.fetch(FINISHED_PER_MINUTE, since)
        return [MinuteCount(r[0], r[1], r[2]) for r in rows]

    # -- retention -----------------------------------------------------------------------
    async def vacuum(self, skip_if_vacuumed_within_seconds: float = 0.0) -> bool:
        async with self.pool.acquire() as conn:
            if await conn.fetchval(AUTOVACUUM_ON):
                return False
            try:
                if not await conn.fetchval(VACUUM_LOCK):
                    log.debug("another worker is vacuuming the queue's tables: not this one")
                    return False
                since = await conn.fetchval(SECONDS_SINCE_VACUUM)
                if since is not None and since < skip_if_vacuumed_within_seconds:
                    log.debug("the queue's tables were vacuumed %.1fs ago: not again yet", since)
                    await conn.fetchval(VACUUM_UNLOCK)
                    return False
                await self._vacuum_tables(conn)
                await conn.fetchval(VACUUM_UNLOCK)
            except BaseException:
                # the session may hold the fleet's vacuum lock (a cancel can land after the
                # server granted it, or cut the vacuum or the unlock short), and the pool never
                # unlocks on release (_keep_session): ending the session lets the lock go
                conn.terminate()
                raise
        return True

    @staticmethod
    async def _vacuum_tables(conn: asyncpg.Connection) -> None:
        skipped: list[str] = []

        def on_notice(_conn: object, message: asyncpg.PostgresLogMessage) -> None:
            # SKIP_LOCKED (or a table this role does not own) skips a table with a WARNING,
            # which asyncpg drops unless someone listens
            if message.message.startswith("skipping"):
                skipped.append(message.message)

        started = time.perf_counter()
        conn.add_log_listener(on_notice)
        try:
            await conn.execute(VACUUM_QUEUE_TABLES)
        finally:
            conn.remove_log_listener(on_notice)
        for message in skipped:
            log.warning("vacuum of the queue's tables: %s", message)
        log.debug("vacuumed the queue's tables in %.2fs (the server's autovacuum is off)",
                  time.perf_counter() - started)

    async def prune(
        self, completed_before: datetime, failed_before: datetime, limit: int
    ) -> PruneBatch:
        """Also folds job_counts' per-connection rows (migration 0005), which only grow."""
        async with self.pool.acquire() as conn, conn.transaction():
            if await conn.fetchval(FOLD_COUNTS_LOCK):
                await conn.execute(FOLD_COUNTS)
        if limit <= 0:
            return PruneBatch([], 0)
        async with self.pool.acquire() as conn, conn.transaction():
            jobs = await _prune_jobs(conn, completed_before, failed_before, limit)
            fires: int = await conn.fetchval(PRUNE_CRON_FIRES, completed_before, limit)
        return PruneBatch(jobs, fires)


async def _prune_jobs(
    conn: asyncpg.Connection, completed_before: datetime, failed_before: datetime, limit: int
) -> list[PrunedJob]:
    """Up to `limit` finished jobs past their retention, oldest first, deleted with what they
    left in the database, in the caller's transaction."""
    cutoffs = {"completed": completed_before, "cancelled": completed_before,
               "failed": failed_before}
    found: list[Any] = []
    for status in PRUNED_STATUSES:
        if len(found) >= limit:
            break
        found += await conn.fetch(PRUNABLE.format(status=status), cutoffs[status], limit - len(found))
    if not found:
        return []
    ids = [r["id"] for r in found]
    for sql in PRUNE_DELETES:
        await conn.execute(sql, ids)
    return [PrunedJob(JobId(r["id"]), r["task_type"], r["status"], r["payload"]) for r in found]


def _list_where(flt: JobFilter, cursor: str | None, key: str) -> tuple[str, dict[str, Any]]:
    """The list's filters (all but the tag, which picks the statement) and the keyset cursor
    on `key`, the column whose order the statement reads."""
    pairs: list[tuple[str, str, Any]] = [
        ("task_type = :task_type", "task_type", flt.task_type),
        ("queue = :queue", "queue", flt.queue),
        ("created_at >= :after", "after", flt.created_after),
        ("created_at < :before", "before", flt.created_before),
        (f"{key} < :cursor", "cursor", cursor),
    ]
    clauses = [c for c, _, v in pairs if v is not None]
    params = {n: v for _, n, v in pairs if v is not None}
    # literal conditions, which a prepared statement's generic plan can match to the partial
    # indexes: running jobs are in the lease index only, the rest in the list indexes
    if flt.status == JobStatus.running:
        clauses.insert(0, "status = 'running'")
    elif flt.status is not None:
        clauses.insert(0, f"status = :status AND {NOT_RUNNING}")
        params["status"] = flt.status.value
    return (" AND ".join(clauses) or "TRUE"), params


def task_type_lock_key(task_type: str) -> int:
    """The advisory lock key of a task type's fleet-wide limit: a stable signed 64-bit hash,
    the same in every process and every PostgreSQL version."""
    digest = hashlib.blake2b(f"carwash:concurrency:{task_type}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


async def _lock_task_types(conn: asyncpg.Connection, limits: Mapping[str, int]) -> list[str]:
    """Take the claim locks of the limited task types, in key order (two claims that need the
    same locks then never wait on each other in a circle); returns the types in that order."""
    types = sorted(limits, key=task_type_lock_key)
    for task_type in types:
        await conn.execute(LOCK_TASK_TYPE, task_type_lock_key(task_type))
    return types


async def _insert(
    conn: asyncpg.Connection, jobs: Sequence[NewJob], owner: str, now: datetime
) -> list[Inserted]:
    if len(jobs) > 1 and all(job.plain for job in jobs):
        return await _insert_plain(conn, jobs, owner, now)
    return await _insert_each(conn, jobs, owner, now)


async def _insert_plain(
    conn: asyncpg.Connection, jobs: Sequence[NewJob], owner: str, now: datetime
) -> list[Inserted]:
    """Many plain jobs in two set-based statements (rows, then their events), not a round trip
    per job: what a bulk enqueue through an API process costs."""
    statuses = [lifecycle.initial_status(job.run_at, now, {})[0] for job in jobs]
    status_values = [s.value for s in statuses]
    ids = [job.id for job in jobs]
    await conn.execute(
        INSERT_PLAIN_JOBS, ids, [j.task_type for j in jobs], [j.queue for j in jobs],
        status_values, [j.priority for j in jobs], [json_text(j.payload) for j in jobs],
        [None if j.context is None else json_text(j.context) for j in jobs],
        [json_text(list(j.tags)) for j in jobs], [j.max_attempts for j in jobs],
        [j.run_at for j in jobs], [j.created_at for j in jobs], [j.rerun_of for j in jobs],
    )
    await conn.execute(INSERT_PLAIN_EVENTS, ids, status_values, now, owner)
    await _insert_tags(conn, jobs)
    results = [Inserted(_stored(job, status, None, now), created=True)
               for job, status in zip(jobs, statuses, strict=True)]
    await _notify_new(conn, [r.job for r in results], owner)
    return results


async def _insert_each(
    conn: asyncpg.Connection, jobs: Sequence[NewJob], owner: str, now: datetime
) -> list[Inserted]:
    results: list[Inserted] = []
    events: list[tuple[Any, ...]] = []
    dependencies: list[tuple[str, str]] = []
    for job in jobs:
        status, error = await _start_status(conn, job, now)
        claimed = job.claimed_by is not None
        inserted = await conn.fetchval(
            INSERT_JOB, job.id, job.task_type, job.queue, status.value, job.priority,
            job.payload, job.context, list(job.tags), 1 if claimed else 0, job.max_attempts,
            job.run_at, job.created_at, now if claimed else None, job.claimed_by,
            job.lease_until, error, job.idempotency_key, job.rerun_of, list(job.depends_on),
            now if status == JobStatus.cancelled else None,
        )
        if inserted is None:
            existing = await conn.fetchrow(SELECT_BY_IDEMPOTENCY_KEY, job.idempotency_key)
            results.append(Inserted(row_to_job(existing), created=False))
            continue
        dependencies += [(job.id, d) for d in job.depends_on]
        # written claimed: the timeline still reads "enqueued (queued), then claimed (running)"
        enqueued_as = JobStatus.queued if claimed else status
        events.append((job.id, now, "enqueued", enqueued_as.value, 0, owner, error))
        if claimed:
            events.append((job.id, now, "claimed", "running", 1, job.claimed_by, None))
        results.append(Inserted(_stored(job, status, error, now), created=True))
    if dependencies:
        await conn.executemany(INSERT_DEPENDENCY, dependencies)
    await conn.executemany(INSERT_EVENT, events)
    await _insert_tags(conn, [r.job for r in results if r.created])
    await _notify_new(conn, [r.job for r in results if r.created], owner)
    return results


async def _insert_tags(conn: asyncpg.Connection, jobs: Sequence[NewJob | JobRow]) -> None:
    pairs = [(tag, job.id) for job in jobs for tag in job.tags]
    if pairs:
        await conn.execute(INSERT_TAGS, [p[0] for p in pairs], [p[1] for p in pairs])


async def _notify_new(conn: asyncpg.Connection, jobs: list[JobRow], owner: str) -> None:
    """Wake other processes: the notice is delivered when this transaction commits."""
    due = [j for j in jobs if j.status == JobStatus.queued]
    if not due:
        return
    if len(due) > NOTIFY_JOBS_MAX:
        message: dict[str, Any] = {"e": "reload", "from": owner}
    else:
        message = {"e": "new", "from": owner, "jobs": [
            [j.id, j.task_type, j.queue, j.priority, j.run_at.timestamp()] for j in due
        ]}
    await conn.execute(NOTIFY, CHANNEL, json_text(message))


async def _start_status(
    conn: asyncpg.Connection, job: NewJob, now: datetime
) -> tuple[JobStatus, str | None]:
    if job.claimed_by:
        return JobStatus.running, None
    if not job.depends_on:
        return lifecycle.initial_status(job.run_at, now, {})
    ids = list(dict.fromkeys(job.depends_on))
    found = {r[0]: r[1] for r in await conn.fetch(SELECT_STATUSES, ids)}
    for dep in ids:
        if dep not in found:
            raise UnknownDependency(dep)
    return lifecycle.initial_status(
        job.run_at, now, {JobId(k): JobStatus(v) for k, v in found.items()}
    )


def _stored(job: NewJob, status: JobStatus, error: str | None, now: datetime) -> JobRow:
    claimed = job.claimed_by is not None
    return job_row((  # in JOB_COLUMNS order
        job.id, job.task_type, job.queue, status, job.priority, job.payload, job.context,
        list(job.tags), 1 if claimed else 0, job.max_attempts, job.run_at, job.created_at,
        now if claimed else None,  # started_at
        now if status == JobStatus.cancelled else None,  # finished_at
        job.claimed_by, job.lease_until,
        0, None, None, None,  # progress_done, progress_total, checkpoint, result
        error, None, [],  # error, error_traceback, attempt_history
        job.idempotency_key, job.rerun_of, list(job.depends_on),
    ))


async def _apply(
    conn: asyncpg.Connection, t: Transition, owner: str, now: datetime, *, notify: bool = True
) -> Applied:
    """`t` on one job, its event, its dependents; a job it puts back in the queue (retried, or
    given back by a stop or a lease check) is told to the other processes unless `notify` is
    false (freed dependents: _resolve_dependents tells them all in one notice)."""
    sql, params = _transition_sql(t, now, "id = :id")
    text, args = numbered(sql, {**params, "id": t.job_id})
    row = await conn.fetchrow(text, *args)
    if row is None:
        await _explain_refusal(conn, t)
    job = row_to_job(row)
    await conn.execute(INSERT_EVENT, job.id, now, t.event, job.status.value, job.attempts,
                       owner, t.message)
    if job.status == JobStatus.cancelled:
        await conn.execute(NOTIFY, CHANNEL, json_text({"e": "cancel", "id": job.id, "from": owner}))
    elif job.status == JobStatus.queued and notify:
        await _notify_new(conn, [job], owner)
    woken, cancelled = await _resolve_dependents(conn, job.id, job.status, owner, now)
    return Applied(job, woken, cancelled)


async def _apply_alike(
    conn: asyncpg.Connection, transitions: Sequence[Transition], t: Transition, owner: str,
    now: datetime,
) -> list[Applied | Exception]:
    """`transitions`, which all make the change `t` (see `alike`), by one statement that also
    writes their events, the rows locked in id order as every many-row write takes them; then
    the refusals explained as `_apply` would, from one read of the jobs left."""
    ids = [x.job_id for x in transitions]
    rows = await conn.fetch(*alike_statement(t, ids, owner, now))
    jobs = {job.id: job for job in map(row_to_job, rows)}
    # a bulk retry's jobs wake the other workers now, not at their next reload
    await _notify_new(conn, list(jobs.values()), owner)
    left = [i for i in ids if i not in jobs]
    found = dict(await conn.fetch(SELECT_STATUSES, left)) if left else {}
    return [
        Applied(jobs[i]) if i in jobs
        else IllegalTransition(i, found[i], t.action) if i in found else JobNotFound(i)
        for i in ids
    ]


def alike_statement(
    t: Transition, ids: Sequence[JobId], owner: str, now: datetime
) -> tuple[Any, ...]:
    """The statement and arguments of `_apply_alike`: the change `t` of the jobs `ids` and
    their events."""
    update, params = _transition_sql(
        t, now, "id IN (SELECT id FROM worker_queue WHERE id = ANY(:ids::text[]) ORDER BY id FOR UPDATE)"
    )
    sql = f"""
WITH moved AS ({update}),
logged AS (
  INSERT INTO job_events (job_id, at, event, status, attempt, process, message)
  SELECT id, :now, :event, status, attempts, :owner, :message FROM moved)
SELECT * FROM moved"""
    text, args = numbered(sql, {**params, "ids": list(ids), "now": now, "event": t.event,
                                "owner": owner, "message": t.message})
    return text, *args


def _transition_sql(t: Transition, now: datetime, target: str) -> tuple[str, dict[str, Any]]:
    """The UPDATE of `t` (with its RETURNING) for the jobs the condition `target` names."""
    sets = ["status = :to_status"]
    params: dict[str, Any] = {"to_status": t.to_status.value}
    for column, value in t.changes.items():
        cast = "::json" if column in JSON_COLUMNS else ""
        sets.append(f"{column} = :c_{column}{cast}")
        params[f"c_{column}"] = value  # the connection's json codec encodes JSON columns
    if t.attempts_delta:
        sets.append("attempts = attempts + :delta")
        params["delta"] = t.attempts_delta
    if t.history is not None:
        sets.append(APPEND_HISTORY)
        params["history"] = t.history.as_json()
    elif t.running_attempt_outcome is not None:
        sets.append(APPEND_RUNNING_ATTEMPT)
        params.update(running_outcome=t.running_attempt_outcome.value,
                      now_iso=now.isoformat(), running_error=t.message)
    # `status || ''`, as in CLAIM_IDS: the jobs are found by `target`'s ids, never by a walk
    # of a status index through every job in that status (a bulk retry after a mass failure)
    where = ["status || '' = ANY(:froms::text[])"]
    params["froms"] = sorted(s.value for s in t.from_statuses)
    if t.fence is not None:
        where.append("attempts = :fence_attempt AND lease_owner = :fence_owner")
        params.update(fence_attempt=t.fence.attempt, fence_owner=t.fence.owner)
    if t.lease_expired_by is not None:
        where.append("lease_until < :lease_expired_by")
        params["lease_expired_by"] = t.lease_expired_by
    sql = (f"UPDATE worker_queue SET {', '.join(sets)} WHERE {target} AND {' AND '.join(where)} "
           f"RETURNING {_COLS}")
    return sql, params


async def _explain_refusal(conn: asyncpg.Connection, t: Transition) -> None:
    status = await conn.fetchval(SELECT_STATUS, t.job_id)
    if status is None:
        raise JobNotFound(t.job_id)
    if JobStatus(status) not in t.from_statuses:
        raise IllegalTransition(t.job_id, status, t.action)
    raise StaleLease(t.job_id, status, t.action)


async def _resolve_dependents(
    conn: asyncpg.Connection, job_id: str, status: JobStatus, owner: str, now: datetime
) -> tuple[list[JobRow], list[JobRow]]:
    """A job that reached `status` frees or cancels the jobs waiting on it, in the same
    transaction. Returns the jobs it freed and those it cancelled (with their own dependents)."""
    woken: list[JobRow] = []
    cancelled: list[JobRow] = []
    if status not in lifecycle.TERMINAL:
        return woken, cancelled
    for dependent_id, run_at in await conn.fetch(WAITING_DEPENDENTS, job_id):
        if status == JobStatus.completed:
            if await conn.fetchval(UNFINISHED_DEPENDENCIES, dependent_id):
                continue
            release = lifecycle.dependencies_met(JobId(dependent_id), run_at, now)
            applied = await _apply(conn, release, owner, now, notify=False)
            woken.append(applied.job)
        else:
            transition = lifecycle.dependency_failed(JobId(dependent_id), JobId(job_id), status, now)
            try:
                async with conn.transaction():  # a savepoint: a refusal here spoils nothing
                    applied = await _apply(conn, transition, owner, now)  # and its dependents
            except IllegalTransition:
                continue  # that cascade already cancelled it (it also waited on a dependent)
            cancelled += [applied.job, *applied.cancelled]
    if woken:
        await _notify_new(conn, woken, owner)
    return woken, cancelled


#: how long a close may wait for the server's answer: a connection whose server vanished
#: without a word (a half-open one) never answers, and a stop would wait for it for good
CLOSE_TIMEOUT_SECONDS = 5.0


async def _close_or_drop(closable: asyncpg.Pool | asyncpg.Connection) -> None:
    """Close a pool or a connection, and drop it (terminate) if its server does not answer
    the close within CLOSE_TIMEOUT_SECONDS, or the close fails."""
    try:
        await asyncio.wait_for(closable.close(), CLOSE_TIMEOUT_SECONDS)
    except Exception:
        log.warning("the database did not answer the close within %.0fs; dropping the "
                    "connections", CLOSE_TIMEOUT_SECONDS)
        closable.terminate()


class _Listener:
    """LISTENs on its own connection; reconnects when it drops and then asks for a reload,
    since notices sent while it was away are lost."""

    RETRY_SECONDS = 1.0
    #: how often the connection is asked a question. A connection whose other end vanished
    #: without closing it (the server's host lost, a NAT or firewall that forgot the flow: a
    #: half-open TCP connection) raises nothing: notices just stop coming, and this process
    #: would find other processes' jobs only at its reloads
    PROBE_SECONDS = 10.0
    #: how long the answer may take before the connection is given up
    PROBE_TIMEOUT_SECONDS = 5.0

    def __init__(self, dsn: str, owner: str, on_notice: Callable[[Notice], None]) -> None:
        self._dsn = dsn
        self._owner = owner
        self._on_notice = on_notice
        self._conn: asyncpg.Connection | None = None
        self._lost = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._connect()
        self._task = asyncio.get_running_loop().create_task(self._supervise(), name="pg-listen")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            await _close_or_drop(conn)

    async def _connect(self) -> None:
        self._lost.clear()
        self._conn = await asyncpg.connect(self._dsn)
        # only the connection in use: one given up reports its end later, maybe after its
        # successor has started
        self._conn.add_termination_listener(
            lambda ended: self._lost.set() if ended is self._conn else None
        )
        await self._conn.add_listener(CHANNEL, self._received)

    async def _supervise(self) -> None:
        while True:
            await self._until_lost()
            log.warning("LISTEN connection lost; reconnecting")
            while True:
                try:
                    await self._connect()
                    break
                except Exception as exc:  # the supervisor must not end: the notices would stop
                    log.warning("LISTEN reconnect failed (%s); retrying", exc)
                    await asyncio.sleep(self.RETRY_SECONDS)
            self._on_notice(Notice("reload"))

    async def _until_lost(self) -> None:
        """Until the connection ends, or does not answer a probe (it is then ended here)."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._lost.wait(), self.PROBE_SECONDS)
                return
            conn = self._conn
            assert conn is not None
            try:
                await asyncio.wait_for(conn.fetchval("SELECT 1"), self.PROBE_TIMEOUT_SECONDS)
            except Exception as exc:  # whatever went wrong, this connection is done with
                log.warning("LISTEN connection did not answer (%s); giving it up",
                            str(exc) or "no answer in time")
                self._conn = None  # before its end is reported: it is no longer the one in use
                conn.terminate()
                return

    def _received(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        try:
            message = json.loads(payload)
        except ValueError:
            return
        if message.get("from") == self._owner:
            return  # this process already holds what it sent
        kind = message.get("e")
        if kind == "new":
            jobs = [
                DueJob(JobId(j[0]), j[1], j[2], j[3], datetime.fromtimestamp(j[4], tz=utc_now().tzinfo))
                for j in message.get("jobs", [])
            ]
            self._on_notice(Notice("new", jobs=jobs))
        elif kind == "cancel":
            self._on_notice(Notice("cancel", job_id=JobId(message["id"])))
        else:
            self._on_notice(Notice("reload"))



async def _fire_cron(
    conn: asyncpg.Connection, schedule: str, fire_at: datetime, job: NewJob,
    skip_if_active_tag: str | None, owner: str, now: datetime,
) -> CronFireResult:
    """One cron fire inside the caller's transaction: the fire row, then the job only for the
    process whose insert of the fire row went through."""
    if skip_if_active_tag is not None:
        await conn.execute(CRON_SCHEDULE_LOCK, schedule)
        active = await conn.fetchval(ACTIVE_TAGGED_JOB, job.task_type, skip_if_active_tag)
        if active is not None:
            if await conn.fetchval(INSERT_CRON_FIRE, schedule, fire_at, None, owner) is None:
                return CronFireResult(schedule, fire_at, "lost")
            return CronFireResult(schedule, fire_at, "skipped", active_job_id=JobId(active))
    if await conn.fetchval(INSERT_CRON_FIRE, schedule, fire_at, job.id, owner) is None:
        return CronFireResult(schedule, fire_at, "lost")
    (inserted,) = await _insert(conn, [job], owner, now)
    if inserted.job.id != job.id:  # its idempotency key was taken: that job is this fire's
        await conn.execute(SET_CRON_FIRE_JOB, inserted.job.id, schedule, fire_at)
    return CronFireResult(schedule, fire_at, "fired", job=inserted.job)


if TYPE_CHECKING:
    _conforms: type[JobStore] = PostgresJobStore

"""The tables, declared once with SQLModel. Migrations create them; the stores query them with
the driver on the hot path, so these classes are the schema's reference, not an ORM layer."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from carwash_jobs.lifecycle import JobStatus
from carwash_jobs.sqltext import NOT_RUNNING

if TYPE_CHECKING:
    from datetime import datetime

_STATUS = sa.Enum(
    JobStatus,
    name="job_status",
    values_callable=lambda members: [m.value for m in members],
    native_enum=False,
    create_constraint=True,
    length=16,
)
_TS = sa.DateTime(timezone=True)


class WorkerQueue(SQLModel, table=True):
    """One row per job: the durable truth that the in-process queue only hints at."""

    __tablename__ = "worker_queue"
    __table_args__ = (
        # Partial indexes: a row is in an index only while its status needs it, so a status
        # change touches few indexes (each index update costs as much as the row update).
        # the claim and reload path: queued rows by priority, then age
        sa.Index(
            "ix_worker_queue_ready", sa.text("priority DESC"), "run_at", "id",
            sqlite_where=sa.text("status = 'queued'"),
            postgresql_where=sa.text("status = 'queued'"),
        ),
        # scheduled rows that become due (retries, delayed jobs)
        sa.Index(
            "ix_worker_queue_scheduled", "run_at",
            sqlite_where=sa.text("status = 'scheduled'"),
            postgresql_where=sa.text("status = 'scheduled'"),
        ),
        # running rows whose lease may have run out
        sa.Index(
            "ix_worker_queue_lease", "lease_until",
            sqlite_where=sa.text("status = 'running'"),
            postgresql_where=sa.text("status = 'running'"),
        ),
        sa.Index("ix_worker_queue_created", "created_at", "id"),
        # the job list's filters, newest first (migration 0006). The two with status leave
        # running rows out (migration 0008): a claim only deletes a job's entries and its
        # completion only inserts them, where each moved them; the few running rows are listed
        # through the lease index
        sa.Index(
            "ix_worker_queue_status", "status", "id",
            sqlite_where=sa.text(NOT_RUNNING), postgresql_where=sa.text(NOT_RUNNING),
        ),
        sa.Index("ix_worker_queue_type", "task_type", "id"),
        sa.Index("ix_worker_queue_queue", "queue", "id"),
        sa.Index(
            "ix_worker_queue_type_status", "task_type", "status", "id",
            sqlite_where=sa.text(NOT_RUNNING), postgresql_where=sa.text(NOT_RUNNING),
        ),
        # bulk retry by failed-time range, and pruning of old finished rows
        sa.Index(
            "ix_worker_queue_finished", "status", "finished_at",
            sqlite_where=sa.text("status IN ('completed', 'failed', 'cancelled')"),
            postgresql_where=sa.text("status IN ('completed', 'failed', 'cancelled')"),
        ),
        # the reruns of a job; the other jobs (nearly all) have no entry (migration 0009)
        sa.Index(
            "ix_worker_queue_rerun_of", "rerun_of",
            sqlite_where=sa.text("rerun_of IS NOT NULL"),
            postgresql_where=sa.text("rerun_of IS NOT NULL"),
        ),
    )

    id: str = Field(primary_key=True, max_length=32)
    task_type: str = Field(max_length=64)
    queue: str = Field(default="default", max_length=64)
    status: JobStatus = Field(sa_column=sa.Column(_STATUS, nullable=False))
    priority: int = 0
    payload: Any = Field(sa_column=sa.Column(sa.JSON, nullable=False))
    context: Any = Field(default=None, sa_column=sa.Column(sa.JSON, nullable=True))
    tags: Any = Field(sa_column=sa.Column(sa.JSON, nullable=False))
    attempts: int = 0
    max_attempts: int = 5
    run_at: datetime = Field(sa_column=sa.Column(_TS, nullable=False))
    created_at: datetime = Field(sa_column=sa.Column(_TS, nullable=False))
    started_at: datetime | None = Field(default=None, sa_column=sa.Column(_TS, nullable=True))
    finished_at: datetime | None = Field(default=None, sa_column=sa.Column(_TS, nullable=True))
    lease_owner: str | None = Field(default=None, max_length=200)
    lease_until: datetime | None = Field(default=None, sa_column=sa.Column(_TS, nullable=True))
    progress_done: int = 0
    progress_total: int | None = None
    checkpoint: Any = Field(default=None, sa_column=sa.Column(sa.JSON, nullable=True))
    result: Any = Field(default=None, sa_column=sa.Column(sa.JSON, nullable=True))
    error: str | None = Field(default=None, sa_column=sa.Column(sa.Text, nullable=True))
    error_traceback: str | None = Field(default=None, sa_column=sa.Column(sa.Text, nullable=True))
    attempt_history: Any = Field(sa_column=sa.Column(sa.JSON, nullable=False))
    idempotency_key: str | None = Field(default=None, max_length=255, unique=True)
    rerun_of: str | None = Field(default=None, max_length=32)
    depends_on: Any = Field(sa_column=sa.Column(sa.JSON, nullable=False))


class JobDependency(SQLModel, table=True):
    """One edge `job_id` waits for `depends_on_id`; indexed both ways for fan-in and fan-out."""

    __tablename__ = "job_dependencies"
    __table_args__ = (sa.Index("ix_job_dependencies_depends_on", "depends_on_id"),)

    job_id: str = Field(primary_key=True, max_length=32)
    depends_on_id: str = Field(primary_key=True, max_length=32)


class JobTag(SQLModel, table=True):
    """One row per tag of a job, written with the job: the list's tag filter reads an index
    range in id order instead of opening every job's JSON tags array."""

    __tablename__ = "job_tags"
    __table_args__ = (sa.Index("ix_job_tags_job", "job_id"),)

    tag: str = Field(primary_key=True, max_length=200)
    job_id: str = Field(primary_key=True, max_length=32)


class JobEvent(SQLModel, table=True):
    """The job's timeline: one row per state change, with the process that made it."""

    __tablename__ = "job_events"
    __table_args__ = (sa.Index("ix_job_events_job", "job_id", "id"),)

    id: int | None = Field(default=None, primary_key=True)
    job_id: str = Field(max_length=32)
    at: datetime = Field(sa_column=sa.Column(_TS, nullable=False))
    event: str = Field(max_length=32)
    status: str = Field(max_length=16)
    attempt: int = 0
    process: str | None = Field(default=None, max_length=200)
    message: str | None = Field(default=None, sa_column=sa.Column(sa.Text, nullable=True))


class CronFire(SQLModel, table=True):
    """One row per schedule and fire time: the unique key makes a fire happen once per fleet."""

    __tablename__ = "cron_fires"

    schedule: str = Field(primary_key=True, max_length=100)
    fire_at: datetime = Field(sa_column=sa.Column(_TS, primary_key=True))
    job_id: str | None = Field(default=None, max_length=32)
    fired_by: str | None = Field(default=None, max_length=200)


class RateLimit(SQLModel, table=True):
    """One row per fleet-wide pace (e.g. "email"): the time of its next free slot.

    Every process on the database takes slots from the same row with one atomic upsert, so a
    limit such as "600 messages a minute" holds for the whole fleet, not once per process.
    `next_at` is in seconds since the epoch: slot arithmetic is then the same plain addition on
    SQLite and PostgreSQL."""

    __tablename__ = "rate_limits"

    name: str = Field(primary_key=True, max_length=100)
    next_at: float = Field(sa_column=sa.Column(sa.Float, nullable=False))


class FleetProcess(SQLModel, table=True):
    """One row per running Runtime (API or worker), renewed while it lives: who is in the fleet.

    A process announces itself at start, renews `expires_at` on every heartbeat and deletes its
    row when it stops; a row whose `expires_at` has passed belongs to a process that died."""

    __tablename__ = "processes"

    owner: str = Field(primary_key=True, max_length=200)  #: host/pid/start/nonce/pidns: the lease owner
    role: str = Field(max_length=16)
    host: str = Field(max_length=200)
    pid: int
    started_at: datetime = Field(sa_column=sa.Column(_TS, nullable=False))
    last_seen_at: datetime = Field(sa_column=sa.Column(_TS, nullable=False))
    expires_at: datetime = Field(sa_column=sa.Column(_TS, nullable=False))


class JobCount(SQLModel, table=True):
    """How many jobs of a task type sit in a finished status, kept by database triggers
    (migration 0005) so that counting never scans worker_queue. On PostgreSQL each connection
    that finishes jobs adds to rows of its own (`shard`: its backend pid), so concurrent
    transactions never wait on one row; the rows of a (task_type, status) add up to its count."""

    __tablename__ = "job_counts"

    task_type: str = Field(primary_key=True, max_length=64)
    status: str = Field(primary_key=True, max_length=16)
    shard: int = Field(primary_key=True)
    n: int = Field(sa_column=sa.Column(sa.BigInteger, nullable=False))

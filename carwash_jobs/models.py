"""The tables, declared once with SQLModel. Migrations create them; the stores query them with
the driver on the hot path, so these classes are the schema's reference, not an ORM layer."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from carwash_jobs.lifecycle import JobStatus

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
        # the claim and reload path: due rows by priority, then age
        sa.Index("ix_worker_queue_due", "status", "run_at", "priority"),
        sa.Index("ix_worker_queue_lease", "status", "lease_until"),
        sa.Index("ix_worker_queue_created", "created_at", "id"),
        sa.Index("ix_worker_queue_type_status", "task_type", "status", "created_at"),
        sa.Index("ix_worker_queue_status_finished", "status", "finished_at"),
        sa.Index("ix_worker_queue_rerun_of", "rerun_of"),
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

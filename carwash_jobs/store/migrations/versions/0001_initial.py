"""Initial schema: worker_queue, job_dependencies, job_events and cron_fires.

Hand-written to match carwash_jobs/models.py at the time; the migration test compares the
migrated database with the models, so a model change without a new revision fails there.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import sqlalchemy as sa
from alembic import op

if TYPE_CHECKING:
    from collections.abc import Sequence

# revision identifiers, used by Alembic.
revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# frozen copy of JobStatus as of this revision: a migration never imports application code
JOB_STATUSES = ("waiting", "queued", "scheduled", "running", "completed", "failed", "cancelled")


def upgrade() -> None:
    ts = sa.DateTime(timezone=True)
    op.create_table(
        "worker_queue",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("task_type", sa.String(length=64), nullable=False),
        sa.Column("queue", sa.String(length=64), nullable=False),
        sa.Column(
            "status",
            sa.Enum(
                *JOB_STATUSES,
                name="job_status",
                native_enum=False,
                create_constraint=True,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("context", sa.JSON(), nullable=True),
        sa.Column("tags", sa.JSON(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("run_at", ts, nullable=False),
        sa.Column("created_at", ts, nullable=False),
        sa.Column("started_at", ts, nullable=True),
        sa.Column("finished_at", ts, nullable=True),
        sa.Column("lease_owner", sa.String(length=200), nullable=True),
        sa.Column("lease_until", ts, nullable=True),
        sa.Column("progress_done", sa.Integer(), nullable=False),
        sa.Column("progress_total", sa.Integer(), nullable=True),
        sa.Column("checkpoint", sa.JSON(), nullable=True),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("error_traceback", sa.Text(), nullable=True),
        sa.Column("attempt_history", sa.JSON(), nullable=False),
        sa.Column("idempotency_key", sa.String(length=255), nullable=True),
        sa.Column("rerun_of", sa.String(length=32), nullable=True),
        sa.Column("depends_on", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("idempotency_key"),
    )
    op.create_index("ix_worker_queue_due", "worker_queue", ["status", "run_at", "priority"])
    op.create_index("ix_worker_queue_lease", "worker_queue", ["status", "lease_until"])
    op.create_index("ix_worker_queue_created", "worker_queue", ["created_at", "id"])
    op.create_index("ix_worker_queue_type_status", "worker_queue", ["task_type", "status", "created_at"])
    op.create_index("ix_worker_queue_status_finished", "worker_queue", ["status", "finished_at"])
    op.create_index("ix_worker_queue_rerun_of", "worker_queue", ["rerun_of"])

    op.create_table(
        "job_dependencies",
        sa.Column("job_id", sa.String(length=32), nullable=False),
        sa.Column("depends_on_id", sa.String(length=32), nullable=False),
        sa.PrimaryKeyConstraint("job_id", "depends_on_id"),
    )
    op.create_index("ix_job_dependencies_depends_on", "job_dependencies", ["depends_on_id"])

    op.create_table(
        "job_events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(length=32), nullable=False),
        sa.Column("at", ts, nullable=False),
        sa.Column("event", sa.String(length=32), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("process", sa.String(length=200), nullable=True),
        sa.Column("message", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_job_events_job", "job_events", ["job_id", "id"])

    op.create_table(
        "cron_fires",
        sa.Column("schedule", sa.String(length=100), nullable=False),
        sa.Column("fire_at", ts, nullable=False),
        sa.Column("job_id", sa.String(length=32), nullable=True),
        sa.Column("fired_by", sa.String(length=200), nullable=True),
        sa.PrimaryKeyConstraint("schedule", "fire_at"),
    )


def downgrade() -> None:
    op.drop_table("cron_fires")
    op.drop_index("ix_job_events_job", table_name="job_events")
    op.drop_table("job_events")
    op.drop_index("ix_job_dependencies_depends_on", table_name="job_dependencies")
    op.drop_table("job_dependencies")
    for name in (
        "ix_worker_queue_rerun_of",
        "ix_worker_queue_status_finished",
        "ix_worker_queue_type_status",
        "ix_worker_queue_created",
        "ix_worker_queue_lease",
        "ix_worker_queue_due",
    ):
        op.drop_index(name, table_name="worker_queue")
    op.drop_table("worker_queue")

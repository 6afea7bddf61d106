"""Partial status indexes: a status change updates only the indexes its statuses need.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_FINISHED = "status IN ('completed', 'failed', 'cancelled')"


def _partial(name: str, columns: list[str | sa.TextClause], predicate: str) -> None:
    where = sa.text(predicate)
    op.create_index(name, "worker_queue", columns, sqlite_where=where, postgresql_where=where)


def upgrade() -> None:
    op.drop_index("ix_worker_queue_due", table_name="worker_queue")
    op.drop_index("ix_worker_queue_lease", table_name="worker_queue")
    op.drop_index("ix_worker_queue_status_finished", table_name="worker_queue")
    _partial("ix_worker_queue_ready", [sa.text("priority DESC"), "run_at", "id"],
             "status = 'queued'")
    _partial("ix_worker_queue_scheduled", ["run_at"], "status = 'scheduled'")
    _partial("ix_worker_queue_lease", ["lease_until"], "status = 'running'")
    _partial("ix_worker_queue_finished", ["status", "finished_at"], _FINISHED)


def downgrade() -> None:
    op.drop_index("ix_worker_queue_finished", table_name="worker_queue")
    op.drop_index("ix_worker_queue_lease", table_name="worker_queue")
    op.drop_index("ix_worker_queue_scheduled", table_name="worker_queue")
    op.drop_index("ix_worker_queue_ready", table_name="worker_queue")
    op.create_index("ix_worker_queue_status_finished", "worker_queue", ["status", "finished_at"])
    op.create_index("ix_worker_queue_lease", "worker_queue", ["status", "lease_until"])
    op.create_index("ix_worker_queue_due", "worker_queue", ["status", "run_at", "priority"])

"""The index on `rerun_of` holds only reruns.

`ix_worker_queue_rerun_of` (migration 0001) held an entry for every job, and nearly every job has
no `rerun_of`: each enqueue wrote a NULL entry that no lookup ever reads. Partial, on
`rerun_of IS NOT NULL`, it holds the reruns only. A lookup of the reruns of a job
(`rerun_of = ?`) can still use it on both databases: equality implies the value is not NULL.

A migration never imports application code.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-24
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import sqlalchemy as sa
from alembic import op

if TYPE_CHECKING:
    from collections.abc import Sequence

# revision identifiers, used by Alembic.
revision: str = "0009"
down_revision: str | Sequence[str] | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NAME = "ix_worker_queue_rerun_of"
ONLY_RERUNS = "rerun_of IS NOT NULL"


def upgrade() -> None:
    op.drop_index(NAME, table_name="worker_queue")
    op.create_index(NAME, "worker_queue", ["rerun_of"], sqlite_where=sa.text(ONLY_RERUNS),
                    postgresql_where=sa.text(ONLY_RERUNS))


def downgrade() -> None:
    op.drop_index(NAME, table_name="worker_queue")
    op.create_index(NAME, "worker_queue", ["rerun_of"])

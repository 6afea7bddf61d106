"""Alembic's environment script: migrates the connection that `migrations.upgrade` hands over.

Alembic runs this file for every command. There is no alembic.ini and no engine here: the
runner opens the (async) engine itself and passes a sync-facing connection in
`config.attributes["connection"]`, so only online mode exists.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection
from sqlmodel import SQLModel

import carwash_jobs.models  # noqa: F401  (registers the tables on SQLModel.metadata)

target_metadata = SQLModel.metadata


def run_migrations_online(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things; batch mode rebuilds the table instead
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    raise RuntimeError(
        "carwash-jobs migrations run online only: call carwash_jobs.store.migrations.upgrade(url)"
    )
connection = context.config.attributes.get("connection")
if not isinstance(connection, Connection):
    raise RuntimeError(
        "no connection in config.attributes['connection']: "
        "run migrations through carwash_jobs.store.migrations.upgrade(url)"
    )
run_migrations_online(connection)

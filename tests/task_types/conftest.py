"""Fixtures of the task-type tests: a database, Runtimes over it, a recording SMTP server.

The database is a migrated SQLite file per test (copied from a template); the SMTP server
listens on 127.0.0.1, on a free port per test."""

from __future__ import annotations

import asyncio
import sqlite3
from typing import TYPE_CHECKING, Any

import pytest
from aiosmtpd.controller import Controller

from carwash_jobs.store.migrations import upgrade
from tests.task_types.support import RecordingHandler, Runtimes, SmtpServer, free_port, sqlite_url

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator
    from pathlib import Path


@pytest.fixture(scope="session")
def migrated_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Migrated once (engine and domain tables); each test gets a copy."""
    path = tmp_path_factory.mktemp("template") / "carwash.db"
    asyncio.run(upgrade(sqlite_url(path)))
    return path


@pytest.fixture
def db_url(tmp_path: Path, migrated_template: Path) -> str:
    target = tmp_path / "carwash.db"
    with sqlite3.connect(migrated_template) as source, sqlite3.connect(target) as copy:
        source.backup(copy)
    source.close()
    copy.close()
    return sqlite_url(target)


@pytest.fixture
async def runtimes(db_url: str, tmp_path: Path) -> AsyncIterator[Runtimes]:
    made = Runtimes(db_url, tmp_path)
    yield made
    await made.close()


@pytest.fixture(params=["open"])
def smtp_server(request: pytest.FixtureRequest) -> Iterator[SmtpServer]:
    """Parametrise indirectly with "auth" for a server that offers AUTH (plain text, no TLS)."""
    handler = RecordingHandler()
    port = free_port()
    auth: dict[str, Any] = {"authenticator": handler.authenticate, "auth_require_tls": False}
    controller = Controller(handler, hostname="127.0.0.1", port=port, server_hostname="smtp.test",
                            **(auth if request.param == "auth" else {}))
    controller.start()
    try:
        yield SmtpServer(handler, port)
    finally:
        controller.stop()


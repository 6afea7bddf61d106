"""Fixtures shared by the engine and the HTTP tests."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import pytest

from carwash_jobs.errors import ConfigurationError
from carwash_jobs.store import open_store
from tests.carwash_jobs.support import POSTGRES_URL_ENV, migrated_postgres_template, postgres_url

if TYPE_CHECKING:
    from collections.abc import Iterator


def _has_adapter(url: str) -> bool:
    try:
        open_store(url, owner="probe")
    except ConfigurationError:
        return False
    return True


@pytest.fixture(scope="session")
def postgres_template() -> Iterator[tuple[str, str] | None]:
    """One PostgreSQL database migrated per session, which each test copies; None without a
    server (or without its adapter). Session-scoped, so it reads the environment before a
    test's own fixtures empty it of CARWASH_* variables."""
    server = os.environ.get(POSTGRES_URL_ENV)
    if server and not _has_adapter(postgres_url(server, "postgres")):
        yield None
        return
    with migrated_postgres_template("carwash") as template:
        yield template

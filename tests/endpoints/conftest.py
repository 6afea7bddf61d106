"""Fixtures for the endpoint tests: settings on an SQLite file in tmp_path, the Runtime, and an
AsyncTestClient that carries the bearer token; `backend_client`, the same client on SQLite and on
PostgreSQL (a database per test on the CARWASH_TEST_POSTGRES_URL server, skipped while it is unset).

Litestar's AsyncTestClient runs the app, and so the Runtime its lifespan starts, on an event loop
of its own in a portal thread. A test reaches the engine through `in_app(client, fn, ...)`, which
runs a coroutine function on that loop. The schema is migrated once per session into a template
file that each test copies, so the start-up migration finds nothing to do.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from typing import TYPE_CHECKING, Any, TypeVar

import pytest
from litestar.testing import AsyncTestClient

from carwash_jobs.app import build_runtime, create_app
from carwash_jobs.settings import Settings, load_settings
from carwash_jobs.store.migrations import upgrade
from tests.carwash_jobs.support import postgres_database_from
from tests.endpoints.sample_tasks import MODULES

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
    from pathlib import Path

    from litestar import Litestar

    from carwash_jobs.runtime import Runtime

T = TypeVar("T")

TOKEN = "test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def make_settings(directory: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": f"sqlite+aiosqlite:///{directory / 'carwash.db'}",
        "task_types": MODULES,
        "api_token": TOKEN,
        "files_dir": str(directory / "files"),
        "sqlite_synchronous": "NORMAL",  # tests need no power-cut safety
        "max_upload_bytes": 64 * 1024,
        "concurrency": 4,
        "schedules_file": "",  # no cron schedules: they name task types these tests do not load
        "reload_interval_seconds": 600.0,  # a test reloads when it means to (POST /api/queue/reload)
    }
    return load_settings(**{**values, **overrides})


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No CARWASH_* variable of the developer's shell leaks into a test."""
    for name in list(os.environ):
        if name.upper().startswith("CARWASH_"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def template_db(tmp_path_factory: pytest.TempPathFactory) -> Path:

    path = tmp_path_factory.mktemp("template") / "carwash.db"
    asyncio.run(upgrade(f"sqlite+aiosqlite:///{path}"))
    return path


def copy_template(template_db: Path, directory: Path) -> None:
    shutil.copyfile(template_db, directory / "carwash.db")


@pytest.fixture
def settings(tmp_path: Path, template_db: Path) -> Settings:
    copy_template(template_db, tmp_path)
    return make_settings(tmp_path)


@pytest.fixture
def runtime(settings: Settings) -> Runtime:
    """An all-role runtime; the app's lifespan starts and stops it."""
    return build_runtime(settings)


@pytest.fixture
def app(settings: Settings, runtime: Runtime) -> Litestar:
    return create_app(settings, runtime=runtime)


@pytest.fixture
async def client(app: Litestar) -> AsyncIterator[AsyncTestClient[Litestar]]:
    async with AsyncTestClient(app) as test_client:
        test_client.headers.update(AUTH)
        yield test_client


@pytest.fixture(params=["sqlite", "postgres"])
async def backend_client(
    request: pytest.FixtureRequest, tmp_path: Path, template_db: Path,
    postgres_template: tuple[str, str] | None,
) -> AsyncIterator[AsyncTestClient[Litestar]]:
    """The `client` of an app on SQLite, then on a fresh PostgreSQL database."""
    if request.param == "sqlite":
        copy_template(template_db, tmp_path)
        async with AsyncTestClient(create_app(make_settings(tmp_path))) as test_client:
            test_client.headers.update(AUTH)
            yield test_client
        return
    async with (
        postgres_database_from(postgres_template, "t") as url,
        AsyncTestClient(create_app(make_settings(tmp_path, database_url=url))) as test_client,
    ):
        test_client.headers.update(AUTH)
        yield test_client


@pytest.fixture
def anonymous(client: AsyncTestClient[Litestar]) -> Iterator[AsyncTestClient[Litestar]]:
    """The same client without the token, for the 401 cases."""
    del client.headers["Authorization"]
    try:
        yield client
    finally:
        client.headers.update(AUTH)


def in_app(client: AsyncTestClient[Litestar], fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    """Run `fn(*args)` on the app's event loop (where its Runtime lives) and return the result."""
    return client.blocking_portal.call(fn, *args)


def idle(client: AsyncTestClient[Litestar], runtime: Runtime) -> None:
    """Let the processor finish what is ready (instead of sleeping)."""
    assert runtime.processor is not None
    in_app(client, runtime.processor.run_until_idle)


async def job_count(client: AsyncTestClient[Litestar]) -> int:
    response = await client.get("/api/jobs", params={"limit": 500})
    assert response.status_code == 200
    return len(response.json()["items"])


def assert_error(response: Any, status: int, field: str | None = None) -> dict[str, Any]:
    """The Litestar error shape; for a 400, `extra` names `field`."""
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert set(body) == {"status_code", "detail", "extra"}
    assert body["status_code"] == status
    assert isinstance(body["detail"], str)
    if field is not None:
        assert any(item["key"] == field for item in body["extra"]), body
    return body

"""The composition root: the only engine module that names task types and the HTTP layer.

It loads the task types listed in the settings, builds the Runtime, and (for the HTTP roles)
the Litestar application around it.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import os
import secrets
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import SecretStr

from carwash_jobs import gc_tuning, heap_trim
from carwash_jobs.errors import CarwashError, ConfigurationError
from carwash_jobs.registry import TaskDefaults, TaskRegistry
from carwash_jobs.runtime import Role, Runtime
from carwash_jobs.settings import env_name

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Mapping, Sequence

    from litestar import Litestar

    from carwash_jobs.middleware import Middleware
    from carwash_jobs.settings import Settings
    from carwash_jobs.types import Clock


def build_registry(settings: Settings) -> TaskRegistry:
    defaults = TaskDefaults(
        max_attempts=settings.default_max_attempts,
        timeout=timedelta(seconds=settings.default_timeout_seconds),
    )
    return TaskRegistry.load(settings.task_types, defaults)


def build_runtime(
    settings: Settings,
    *,
    role: Role = "all",
    registry: TaskRegistry | None = None,
    middleware: Sequence[Middleware] = (),
    services: Mapping[str, Any] | None = None,
    clock: Clock | None = None,
) -> Runtime:
    extra: dict[str, Any] = {} if clock is None else {"clock": clock}
    return Runtime(
        settings, registry or build_registry(settings), role=role, middleware=middleware,
        services=services, **extra,
    )


# -- the directories a process writes to -----------------------------------------------------
#: the local outbox's prefix in smtp_url (task_types/email.py delivers into that Maildir)
OUTBOX_PREFIX = "outbox:"
#: the subdirectories of a Maildir: a message is written into tmp/, then moved into new/
MAILDIR_PARTS = ("tmp", "new", "cur")


def prepare_directories(settings: Settings, role: Role) -> None:
    """Create the directories this role writes to and check that it may write there: the SQLite
    database's, `files_dir` for the HTTP roles (uploads) and the local outbox of `smtp_url` for
    the roles that run jobs (mail). A path it cannot use stops the start-up with one line naming
    the setting; unchecked, serve started and /health said 200, then every upload was a 500 and
    every email job retried until it failed."""
    if settings.is_sqlite:
        _writable_directory(sqlite_path(settings).parent, "database_url")
    if role != "worker":
        _writable_directory(Path(settings.files_dir), "files_dir")
    if role != "api" and settings.smtp_url.startswith(OUTBOX_PREFIX):
        outbox = Path(settings.smtp_url.removeprefix(OUTBOX_PREFIX))
        # private, with its parts, as mailbox.Maildir makes one; it makes the parts only with
        # the outbox itself, so an outbox made without them here would refuse every message
        for directory in (outbox, *(outbox / part for part in MAILDIR_PARTS)):
            _writable_directory(directory, "smtp_url", mode=0o700)


def sqlite_path(settings: Settings) -> Path:
    """The SQLite database's file, absolute and with its symlinks resolved."""
    return Path(settings.database_url.removeprefix("sqlite+aiosqlite:///")).resolve()


def _writable_directory(directory: Path, setting: str, *, mode: int = 0o777) -> None:
    """Create `directory` (and its parents) unless it exists, then write and remove a probe
    file in it: permission bits alone do not say whether this process may write there (root
    writes past them; a read-only mount refuses everyone)."""
    probe = directory / f".carwash-probe-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        directory.mkdir(mode=mode, parents=True, exist_ok=True)
        probe.touch(exist_ok=False)
        probe.unlink()
    except OSError as exc:
        reason = f"{exc.strerror}: {exc.filename}" if exc.strerror and exc.filename else str(exc)
        raise ConfigurationError(
            f"{env_name(setting)} / {setting}: {directory} must be a directory this process "
            f"can write to ({reason})"
        ) from exc


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line, carrying the job fields a JobLogger attaches."""

    FIELDS = ("job_id", "task_type", "attempt")

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "at": self.formatTime(record), "level": record.levelname, "logger": record.name,
            "message": record.getMessage(),
        }
        for name in self.FIELDS:
            if hasattr(record, name):
                entry[name] = getattr(record, name)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


# -- HTTP ---------------------------------------------------------------------------------------
#: the file beside an SQLite database that keeps the API token `serve` generated
TOKEN_FILE_NAME = "carwash.token"
#: how long shutdown waits for open HTTP requests before closing them
HTTP_DRAIN_SECONDS = 10


def token_path(settings: Settings) -> Path:
    """Where a generated API token lives: beside the SQLite database. A PostgreSQL fleet has no
    such place that all its hosts share, so there the token must be configured."""
    if not settings.is_sqlite:
        raise ConfigurationError(
            "CARWASH_API_TOKEN must be set when the database is PostgreSQL: processes on other "
            "hosts could not share a token generated here"
        )
    return sqlite_path(settings).parent / TOKEN_FILE_NAME


def ensure_api_token(settings: Settings) -> tuple[Settings, str | None]:
    """Settings with an API token: the configured one, or the one kept beside the database, or a
    new one written there (owner-only, fsynced). The second item is the token when it was
    generated by this call, so the caller can show it once; None otherwise."""
    if settings.api_token is not None:
        return settings, None
    path = token_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    # written whole under a private name, then linked into place: a process starting at the same
    # moment either finds no file or a complete one, never a half-written token
    draft = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as out:
            out.write(token + "\n")
            out.flush()
            os.fsync(out.fileno())
        os.link(draft, path)
    except FileExistsError:
        return _with_token(settings, _read_token(path)), None
    finally:
        draft.unlink(missing_ok=True)
    return _with_token(settings, token), token


def _read_token(path: Path) -> str:
    if path.stat().st_mode & 0o077:
        logging.getLogger(__name__).warning("%s was readable by others; made it owner-only", path)
        path.chmod(0o600)
    token = path.read_text(encoding="ascii").strip()
    if not token:
        raise ConfigurationError(f"{path} is empty: delete it to have a new API token generated")
    return token


def _with_token(settings: Settings, token: str) -> Settings:
    return settings.model_copy(update={"api_token": SecretStr(token)})


def with_api_token(settings: Settings) -> Settings:
    """`settings` with an API token (ensure_api_token); one generated now is shown once."""
    settings, generated = ensure_api_token(settings)
    if generated is not None:
        # Printed once, to the terminal, never logged: it is a credential.
        print(
            f"carwash-jobs: generated an API token, kept owner-only in {token_path(settings)}.\n"
            f"Send it as 'Authorization: Bearer <token>':\n{generated}",
            flush=True,
        )
    return settings


def create_app(
    settings: Settings, *, runtime: Runtime | None = None, role: Role = "all", migrate: bool = True
) -> Litestar:
    """The Litestar application around a Runtime.

    Without `runtime`, each start of the app's lifespan builds a fresh Runtime (a stopped one
    cannot start again) and stops it gracefully at shutdown. A given runtime is started by the
    lifespan unless it already runs, and stopped by whoever started it. The lifespan's start
    applies the migrations unless `migrate` is false (serve applied them before uvicorn ran).
    """
    from litestar import Litestar
    from litestar.datastructures import State
    from litestar.openapi import OpenAPIConfig
    from litestar.openapi.plugins import JsonRenderPlugin, SwaggerRenderPlugin
    from litestar.openapi.spec import Components, SecurityScheme

    from endpoints.auth import SECURITY_SCHEME
    from endpoints.deps import RUNTIME_KEY, dependencies
    from endpoints.errors import BodyDepthRequest, exception_handlers
    from endpoints.routes import route_handlers
    from endpoints.ui import template_config

    if settings.api_token is None:
        raise ConfigurationError(
            "no API token: set CARWASH_API_TOKEN (`carwash-jobs serve` generates one when unset)"
        )
    role = runtime.role if runtime is not None else role
    if role == "worker":
        raise ConfigurationError("the worker role serves no HTTP; use role all or api")
    registry = runtime.registry if runtime is not None else build_registry(settings)

    @contextlib.asynccontextmanager
    async def run_runtime(app: Litestar) -> AsyncIterator[None]:
        rt = runtime if runtime is not None else build_runtime(settings, role=role, registry=registry)
        owned = not rt.started
        if owned:
            await rt.start(migrate=migrate)
        app.state[RUNTIME_KEY] = rt
        try:
            yield
        finally:
            if owned:
                await rt.stop()

    return Litestar(
        route_handlers=route_handlers(registry, settings, api_token=settings.api_token.get_secret_value()),
        dependencies=dependencies(),
        exception_handlers=exception_handlers(),
        request_class=BodyDepthRequest,
        lifespan=[run_runtime],
        state=State({} if runtime is None else {RUNTIME_KEY: runtime}),
        request_max_body_size=settings.max_upload_bytes,
        logging_config=None,  # the CLI configured logging (text or JSON); keep it
        template_config=template_config(),  # the dashboard's pages (endpoints/ui.py)
        openapi_config=OpenAPIConfig(
            title="carwash-jobs",
            version=_version(),
            description="Durable background jobs: enqueue per task type, then follow and steer the jobs.",
            path="/schema",
            # a page for people at /schema (and /schema/swagger), the document at /schema/openapi.json
            render_plugins=[SwaggerRenderPlugin(), JsonRenderPlugin()],
            components=Components(
                security_schemes={
                    SECURITY_SCHEME: SecurityScheme(
                        type="http", scheme="bearer",
                        description="CARWASH_API_TOKEN, or the token `serve` generated beside the database.",
                    )
                }
            ),
        ),
    )


def _version() -> str:
    try:
        return importlib.metadata.version("carwash-jobs")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0"


async def serve_http(runtime: Runtime, *, host: str, port: int) -> None:
    """Serve the API (role api) or the API with processor and scheduler (role all) with uvicorn
    until SIGTERM or SIGINT. The app's lifespan starts `runtime` (built, its settings holding the
    API token, and its database migrated: `carwash-jobs serve` does that first, where a failure
    is one line); at the end uvicorn drains connections and the lifespan stops the runtime,
    giving running jobs their grace period."""
    import uvicorn

    settings = runtime.settings
    served = create_app(settings, runtime=runtime, migrate=False)
    served.on_startup.append(lambda _app: gc_tuning.settle_after_startup())  # after the runtime's
    served.on_startup.append(
        lambda _app: heap_trim.start_trimming(settings.heap_trim_interval_seconds)
    )
    server = uvicorn.Server(
        uvicorn.Config(
            served, host=host, port=port, lifespan="on", log_config=None,
            server_header=False, timeout_graceful_shutdown=HTTP_DRAIN_SECONDS,
        )
    )
    await server.serve()
    if not server.started:
        raise CarwashError(f"the HTTP server did not start on {host}:{port}; see the log above")


async def demo_data(settings: Settings, **counts: int) -> dict[str, int]:
    """`carwash-jobs demo-data`: migrate, then fill the domain tables with sample data (the POS
    transactions go to the financial database when one is configured). Task types are reached
    only here, in the composition root."""
    from carwash_jobs.store.migrations import upgrade
    from task_types.demo_data import make_demo_data

    await upgrade(settings.database_url)
    made = await make_demo_data(
        settings.database_url, financial_database_url=settings.financial_database_url,
        progress=True, **counts,
    )
    return {"tenants": made.tenants, "customers": made.customers, "employees": made.employees,
            "transactions": made.transactions}

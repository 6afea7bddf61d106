"""Helpers of the task-type tests: runtimes, an SMTP recorder, domain rows, dying workers.

Runtimes run the task types named explicitly in their settings, with retries milliseconds
apart; the SMTP handler records what it accepts and misbehaves on request; `die` and `recover`
make a worker die mid-attempt and then do what the scheduler does once its lease runs out."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import sqlite3
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email import message_from_bytes, policy
from typing import TYPE_CHECKING, Any

from aiosmtpd.smtp import AuthResult
from litestar.testing import AsyncTestClient

from carwash_jobs import app, lifecycle
from carwash_jobs.queue import EnqueueOptions
from carwash_jobs.registry import TaskRegistry
from carwash_jobs.retry import RetryPolicy
from carwash_jobs.settings import load_settings

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence
    from email.message import EmailMessage
    from pathlib import Path

    from httpx import Response

    from carwash_jobs.context import JobContext
    from carwash_jobs.middleware import Middleware
    from carwash_jobs.runtime import Runtime
    from carwash_jobs.settings import Settings
    from carwash_jobs.store.base import JobRow
    from carwash_jobs.types import JobId

#: the task types under test, named explicitly rather than taken from config/carwash.toml
TASK_TYPES = [
    "task_types.email",
    "task_types.customer_credits",
    "task_types.financial_sync",
    "task_types.file_upload",
]
#: retries milliseconds apart, so a failed attempt's retry runs within run_until_idle
FAST_RETRY = RetryPolicy(base_seconds=0.01, factor=1.0, max_seconds=0.01, jitter=0.0)
#: fast enough that only the rate-limit test notices the pacer
FAST_RATE = 600_000
#: the bearer token of the apps the HTTP tests post to
API_TOKEN = "task-types-test-token-0123"


def sqlite_url(path: Path) -> str:
    return f"sqlite+aiosqlite:///{path}"


def db_path(url: str) -> str:
    return url.removeprefix("sqlite+aiosqlite:///")


def fast_retries(registry: TaskRegistry) -> TaskRegistry:
    return TaskRegistry([
        dataclasses.replace(t, options=dataclasses.replace(t.options, retry=FAST_RETRY))
        for t in registry
    ], registry.defaults)


@dataclass
class Runtimes:
    """Starts Runtimes over this test's database; stops them all at the end."""

    db_url: str
    tmp_path: Path
    started: list[Runtime] = field(default_factory=list)

    def settings(self, task_types: list[str] | None = None, **settings: Any) -> Settings:
        schedules = self.tmp_path / "no-schedules.toml"  # cron is not under test here
        schedules.write_text("schedules = []\n", encoding="utf-8")
        values: dict[str, Any] = {
            "database_url": self.db_url,
            "schedules_file": str(schedules),
            "task_types": TASK_TYPES if task_types is None else task_types,
            "smtp_url": f"outbox:{self.tmp_path / 'outbox'}",
            "email_rate_per_minute": FAST_RATE,
            "files_dir": str(self.tmp_path / "files"),
            "shutdown_grace_seconds": 1.0,
            "api_token": API_TOKEN,
            **settings,
        }
        return load_settings(**values)

    async def start(self, task_types: list[str] | None = None, *,
                    middleware: Sequence[Middleware] = (), **settings: Any) -> Runtime:
        loaded = self.settings(task_types, **settings)
        runtime = app.build_runtime(loaded, registry=fast_retries(app.build_registry(loaded)),
                                    middleware=middleware)
        await runtime.start()
        self.started.append(runtime)
        return runtime

    async def close(self) -> None:
        for runtime in reversed(self.started):
            await runtime.stop()


async def post_task(settings: Settings, slug: str, body: dict[str, Any]) -> Response:
    """POST /api/tasks/{slug} to the real app (its lifespan runs a Runtime of its own)."""
    async with AsyncTestClient(app.create_app(settings)) as client:
        return await client.post(f"/api/tasks/{slug}", json=body,
                                 headers={"Authorization": f"Bearer {API_TOKEN}"})


async def run_job(runtime: Runtime, task_type: str, payload: dict[str, Any],
                  **options: Any) -> JobRow:
    """Enqueue one job, process until nothing is left (retries included), return its row."""
    inserted = await runtime.queue.enqueue(task_type, payload, EnqueueOptions(**options))
    return await settle(runtime, inserted.job.id)


async def settle(runtime: Runtime, job_id: JobId) -> JobRow:
    assert runtime.processor is not None
    await runtime.processor.run_until_idle(timeout=20, include_timers=True)
    return await runtime.store.get(job_id)


async def die(runtime: Runtime, ctx: JobContext) -> None:
    """Called from inside a handler: stop this attempt the way a dying worker does. Nothing
    after this point runs and nothing is recorded; the job stays `running` under a lease."""
    assert runtime.processor is not None
    runtime.processor.cancel_local(ctx.job_id)
    await asyncio.sleep(3600)  # cancelled at once


async def recover(runtime: Runtime, job_id: JobId) -> JobRow:
    """What the scheduler does once the dead worker's lease runs out: give the job back to the
    queue (the lost attempt counts), then run it to the end."""
    assert runtime.processor is not None
    await runtime.processor.run_until_idle(timeout=5)
    job = await runtime.store.get(job_id)
    assert job.status == lifecycle.JobStatus.running, job.status
    transition = lifecycle.release_expired_lease(  # its worker is known dead: no waiting
        job.id, job.fence, job.attempts, job.max_attempts, datetime.now(UTC),
        owner_known_dead=True,
    )
    applied = await runtime.store.apply(transition)
    runtime.queue.offer([applied.job])
    return await settle(runtime, job_id)


def dies_on_call(runtime: Runtime, original: Callable[..., Awaitable[Any]], call: int, *,
                 after: bool = False) -> Callable[..., Awaitable[Any]]:
    """Wrap a module function whose first argument is the JobContext: its `call`-th call (1-based,
    counted over all attempts) kills the attempt, before doing its work or, with `after`, once
    the work is done (and committed, for a write)."""
    seen = 0

    async def wrapper(ctx: JobContext, *args: Any, **kwargs: Any) -> Any:
        nonlocal seen
        seen += 1
        if seen == call and not after:
            await die(runtime, ctx)
        result = await original(ctx, *args, **kwargs)
        if seen == call and after:
            await die(runtime, ctx)
        return result

    return wrapper


# -- domain rows --------------------------------------------------------------------------------
def execute(url: str, sql: str, params: Any = ()) -> None:
    with sqlite3.connect(db_path(url)) as conn:
        if isinstance(params, list):
            conn.executemany(sql, params)
        else:
            conn.execute(sql, params)
    conn.close()


def query(url: str, sql: str, params: Any = ()) -> list[tuple[Any, ...]]:
    with sqlite3.connect(db_path(url)) as conn:
        rows = conn.execute(sql, params).fetchall()
    conn.close()
    return rows


def add_customers(url: str, customers: list[tuple[str, str, str, bool]]) -> list[int]:
    """(tenant_id, name, email, opted_in) rows; returns their ids."""
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
    execute(url, "INSERT INTO customers (tenant_id, name, email, marketing_opt_in, created_at) "
                 "VALUES (?, ?, ?, ?, ?)", [(*c, now) for c in customers])
    emails = [c[2] for c in customers]
    rows = query(url, f"SELECT id FROM customers WHERE email IN ({','.join('?' * len(emails))}) "
                      "ORDER BY id", emails)
    return [r[0] for r in rows]


# -- a recording SMTP server ----------------------------------------------------------------------
@dataclass(frozen=True)
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    at: float  #: time.monotonic() when the server accepted the message

    @property
    def message(self) -> EmailMessage:
        return message_from_bytes(self.data, policy=policy.default)


class RecordingHandler:
    """An aiosmtpd handler that records what it accepts and misbehaves on request."""

    def __init__(self) -> None:
        self.messages: list[Received] = []
        self.reject: dict[str, str] = {}  #: lower-cased address -> RCPT reply (e.g. a 550)
        self.reject_all: str | None = None  #: the RCPT reply to every address (a block list)
        self.fail_data_after: int | None = None  #: answer 421 to DATA once this many arrived
        self.stall_rcpt_after: int | None = None  #: hold the RCPT after this many arrived
        self.on_stall: Callable[[], object] | None = None  #: called (server thread) when holding
        self.connections = 0  #: SMTP sessions opened (EHLO greetings)
        self.logins: list[tuple[str, str]] = []  #: (user, password) of successful AUTHs
        self.auth_reply: str | None = None  #: answer AUTH with this instead (e.g. a 454)

    async def handle_EHLO(self, server: Any, session: Any, envelope: Any, hostname: str,
                          responses: list[str]) -> list[str]:
        self.connections += 1
        session.host_name = hostname
        return responses

    def authenticate(self, server: Any, session: Any, envelope: Any, mechanism: str,
                     auth_data: Any) -> AuthResult:
        """The server's authenticator: accepts carwash / s3cret only."""
        if self.auth_reply is not None:
            return AuthResult(success=False, handled=False, message=self.auth_reply)
        login = (auth_data.login.decode(), auth_data.password.decode())
        if login != ("carwash", "s3cret"):
            return AuthResult(success=False, handled=False)
        self.logins.append(login)
        return AuthResult(success=True)

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: list[str]) -> str:
        if address.lower() in self.reject:
            return self.reject[address.lower()]
        if self.reject_all is not None:
            return self.reject_all
        if self.stall_rcpt_after is not None and len(self.messages) >= self.stall_rcpt_after:
            self.stall_rcpt_after = None
            if self.on_stall is not None:
                self.on_stall()
            await asyncio.sleep(30)  # the client is gone before this ends; stop() cancels it
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.fail_data_after is not None and len(self.messages) >= self.fail_data_after:
            self.fail_data_after = None
            return "421 4.3.0 Too busy, try again later"
        self.messages.append(Received(envelope.mail_from, list(envelope.rcpt_tos),
                                      envelope.content, time.monotonic()))
        return "250 Message accepted for delivery"

    def recipients(self) -> list[str]:
        return [to for m in self.messages for to in m.rcpt_tos]


@dataclass
class SmtpServer:
    handler: RecordingHandler
    port: int

    @property
    def url(self) -> str:
        return f"smtp://127.0.0.1:{self.port}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port

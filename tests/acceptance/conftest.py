"""Fixtures for whole-process tests: a SQLite file (or a PostgreSQL database), worker and API
subprocesses, and their records.

Every worker is a real `carwash-jobs serve --role worker` process (run as
`python -m carwash_jobs.cli`), started in the test's tmp_path so that no config/carwash.toml
of the checkout applies, with its settings in CARWASH_* variables. The `cluster` fixture kills
and reaps whatever a test left running, and prints the tail of each worker's log, which pytest
shows when the test failed. Waiting across processes has no event to await, so these helpers
poll the database or the record file with a short sleep, always against a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
import httpx
import pytest
from sqlalchemy.engine import make_url

from carwash_jobs import app
from carwash_jobs.settings import load_settings
from carwash_jobs.store.migrations import upgrade
from tests.acceptance.tasks_record import RECORD_FILE_ENV

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping, Sequence

REPO_ROOT = Path(__file__).resolve().parents[2]
TASK_TYPE_MODULES = ["tests.acceptance.tasks_record", "tests.acceptance.tasks_long",
                     "tests.acceptance.tasks_limited"]
POLL_SECONDS = 0.05
LOG_TAIL_LINES = 40


@dataclass(frozen=True, slots=True)
class Record:
    """One line of the record file: which attempt of which job a handler ran, in which pid."""

    kind: str  #: "run" for the record task type; "start" or "end" for the long one
    job_id: str
    attempt: int
    pid: int


@dataclass(frozen=True, slots=True)
class Job:
    """The columns of a worker_queue row these tests look at."""

    id: str
    status: str
    attempts: int
    history: list[dict[str, Any]]


@dataclass(slots=True)
class Worker:
    """One worker subprocess and its log file."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def send(self, sig: signal.Signals) -> None:
        self.process.send_signal(sig)

    def wait(self, timeout: float) -> int:
        """The exit code; raises subprocess.TimeoutExpired if it runs on past `timeout`."""
        return self.process.wait(timeout)

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until the runtime has started (it logs "processing" once the scheduler runs)."""
        deadline = time.monotonic() + timeout
        while "processing" not in self.log_text():
            if not self.alive():
                raise AssertionError(f"{self.name} exited early:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} not ready after {timeout}s:\n{self.tail()}")
            time.sleep(POLL_SECONDS)

    def log_text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace") if self.log.exists() else ""

    def tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def reap(self) -> None:
        """Kill the process if it still runs, and wait for it (no zombie, no ResourceWarning)."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
        self.process.wait(10)


@dataclass(slots=True)
class Cluster:
    """A database file shared by the test process and any number of worker processes."""

    root: Path
    workers: list[Worker] = field(default_factory=list)

    @property
    def db_path(self) -> Path:
        return self.root / "carwash.db"

    @property
    def url(self) -> str:
        return f"sqlite+aiosqlite:///{self.db_path}"

    @property
    def record_file(self) -> Path:
        return self.root / "records.txt"

    # -- processes ---------------------------------------------------------------------
    def env(self, settings: Mapping[str, str]) -> dict[str, str]:
        """The environment of a worker: this one without CARWASH_* (so nothing leaks in from
        the caller's shell), the test's database and task types, plus `settings`."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("CARWASH_")}
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p
        )
        env.update({
            "CARWASH_DATABASE_URL": self.url,
            "CARWASH_TASK_TYPES": json.dumps(TASK_TYPE_MODULES),
            "CARWASH_FILES_DIR": str(self.root / "files"),
            "CARWASH_SMTP_URL": f"outbox:{self.root / 'outbox'}",
            RECORD_FILE_ENV: str(self.record_file),
        })
        env.update(settings)
        return env

    def start_worker(self, **settings: str) -> Worker:
        """Start `carwash-jobs serve --role worker`; `settings` are extra environment variables."""
        name = f"worker-{len(self.workers) + 1}"
        log = self.root / f"{name}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "carwash_jobs.cli", "serve", "--role", "worker"],
                cwd=self.root, env=self.env(settings), stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT,
            )
        worker = Worker(name, process, log)
        self.workers.append(worker)
        return worker

    # -- the test process's own view ---------------------------------------------------
    def enqueue(self, task_type: str, payloads: Sequence[Mapping[str, Any]]) -> list[str]:
        """Commit `payloads` in one bulk enqueue, from an api-role runtime of this process."""

        async def run() -> list[str]:
            settings = load_settings(database_url=self.url, task_types=TASK_TYPE_MODULES)
            async with app.build_runtime(settings, role="api") as runtime:
                inserted = await runtime.queue.enqueue_many(task_type, payloads)
            return [i.job.id for i in inserted]

        return asyncio.run(run())

    def _query(self, sql: str) -> list[Any]:
        with contextlib.closing(sqlite3.connect(self.db_path, timeout=10)) as conn:
            return conn.execute(sql).fetchall()

    def counts(self) -> Counter[str]:
        """How many jobs are in each status."""
        rows = self._query("SELECT status, COUNT(*) FROM worker_queue GROUP BY status")
        return Counter({status: count for status, count in rows})

    def jobs(self) -> dict[str, Job]:
        rows = self._query("SELECT id, status, attempts, attempt_history FROM worker_queue")
        return {r[0]: Job(r[0], r[1], r[2], json.loads(r[3])) for r in rows}

    def records(self) -> list[Record]:
        """The complete lines of the record file: a worker may be writing the last one."""
        if not self.record_file.exists():
            return []
        out = []
        text = self.record_file.read_text(encoding="utf-8")
        for line in text[: text.rfind("\n") + 1].splitlines():
            parts = line.split()
            if len(parts) == 3:
                parts.insert(0, "run")
            kind, job_id, attempt, pid = parts
            out.append(Record(kind, job_id, int(attempt), int(pid)))
        return out

    def record_count(self) -> int:
        """Lines in the record file (cheap enough to poll)."""
        if not self.record_file.exists():
            return 0
        return self.record_file.read_bytes().count(b"\n")

    def wait_for(self, what: str, predicate: Callable[[], bool], timeout: float) -> float:
        """Poll `predicate` until true; returns the seconds it took, fails after `timeout`.
        A worker that died on its own meanwhile fails the wait at once, with its log."""
        start = time.monotonic()
        while not predicate():
            for worker in self.workers:
                if not worker.alive() and worker.process.returncode not in (0, -signal.SIGKILL):
                    raise AssertionError(
                        f"{worker.name} exited with {worker.process.returncode} while waiting "
                        f"for {what}:\n{worker.tail()}"
                    )
            if time.monotonic() - start > timeout:
                raise AssertionError(
                    f"timed out after {timeout}s waiting for {what}; jobs: {dict(self.counts())}"
                )
            time.sleep(POLL_SECONDS)
        return time.monotonic() - start

    def reap(self) -> None:
        for worker in self.workers:
            worker.reap()
            print(f"--- {worker.name} (pid {worker.pid}, exit {worker.process.returncode}) ---")
            print(worker.tail())


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A migrated SQLite database in tmp_path; every worker started on it is reaped after."""
    result = Cluster(tmp_path)
    asyncio.run(upgrade(result.url))
    try:
        yield result
    finally:
        result.reap()


# -- PostgreSQL: a fresh database per test, API and worker processes on it ----------------------
POSTGRES_URL_ENV = "CARWASH_TEST_POSTGRES_URL"
POSTGRES_SKIP_REASON = (
    f"{POSTGRES_URL_ENV} is not set: the scale-out tests run API and worker processes against a "
    "real PostgreSQL server (e.g. postgresql://postgres@127.0.0.1:5432/postgres)"
)
API_TOKEN = "acceptance-token-0123456789"


def free_port() -> int:
    """A loopback port nothing listens on now (bound and released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def _admin(server_url: str, statement: str) -> None:
    """CREATE or DROP DATABASE, on the server's own database."""
    conn = await asyncpg.connect(make_url(server_url).set(drivername="postgresql")
                                 .render_as_string(hide_password=False))
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


@dataclass(slots=True)
class PgCluster(Cluster):
    """A fresh PostgreSQL database shared by the test process, one or more `serve --role api`
    processes and any number of `serve --role worker` processes. The test's own queries go
    through one asyncpg connection on a private event loop, so the tests stay synchronous
    like the SQLite ones."""

    server_url: str = ""
    database: str = ""
    api: Worker | None = None
    api_port: int = 0
    _loop: asyncio.AbstractEventLoop | None = None
    _conn: Any = None

    @property
    def url(self) -> str:
        return make_url(self.server_url).set(
            drivername="postgresql+asyncpg", database=self.database
        ).render_as_string(hide_password=False)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def _query(self, sql: str) -> list[Any]:
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        if self._conn is None:
            dsn = make_url(self.url).set(drivername="postgresql").render_as_string(
                hide_password=False)
            self._conn = self._loop.run_until_complete(asyncpg.connect(dsn))
        return [tuple(r) for r in self._loop.run_until_complete(self._conn.fetch(sql))]

    def query(self, sql: str) -> list[Any]:
        """Rows of `sql`, read by the test process (as another process would see them)."""
        return self._query(sql)

    def start_api(self, **settings: str) -> Worker:
        """`carwash-jobs serve --role api` on a free loopback port; returns once /health
        answers."""
        self.api_port = free_port()
        log = self.root / "api.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "carwash_jobs.cli", "serve", "--role", "api",
                 "--host", "127.0.0.1", "--port", str(self.api_port)],
                cwd=self.root, env=self.env({"CARWASH_API_TOKEN": API_TOKEN, **settings}),
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            )
        self.api = Worker("api", process, log)
        self.workers.append(self.api)
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{self.api_url}/health", timeout=1).status_code == 200:
                    return self.api
            except httpx.TransportError:
                pass
            if not self.api.alive() or time.monotonic() > deadline:
                raise AssertionError(f"the API process did not come up:\n{self.api.tail()}")
            time.sleep(POLL_SECONDS)

    def enqueue_chunks(self, task_type: str, payloads: Sequence[Mapping[str, Any]],
                       chunk: int = 2_000) -> list[str]:
        """Bulk enqueue from an api-role runtime of this process, one commit per `chunk` jobs:
        workers start on the first chunk while the rest is written."""

        async def run() -> list[str]:
            settings = load_settings(database_url=self.url, task_types=TASK_TYPE_MODULES)
            ids: list[str] = []
            async with app.build_runtime(settings, role="api") as runtime:
                for start in range(0, len(payloads), chunk):
                    inserted = await runtime.queue.enqueue_many(
                        task_type, payloads[start:start + chunk])
                    ids += [i.job.id for i in inserted]
            return ids

        return asyncio.run(run())

    def http(self) -> httpx.Client:
        """A client of the API process, carrying the bearer token."""
        return httpx.Client(base_url=self.api_url, timeout=10,
                            headers={"Authorization": f"Bearer {API_TOKEN}"})

    def close(self) -> None:
        if self._conn is not None and self._loop is not None:
            self._loop.run_until_complete(self._conn.close())
        if self._loop is not None:
            self._loop.close()
        self._conn = self._loop = None


@pytest.fixture
def pg_cluster(tmp_path: Path) -> Iterator[PgCluster]:
    """A fresh, migrated database on the CARWASH_TEST_POSTGRES_URL server, dropped WITH (FORCE)
    after the test; every process started on it is reaped first."""
    server = os.environ.get(POSTGRES_URL_ENV)
    if not server:
        pytest.skip(POSTGRES_SKIP_REASON)
    name = f"carwash_acc_{secrets.token_hex(6)}"
    asyncio.run(_admin(server, f'CREATE DATABASE "{name}"'))
    result = PgCluster(tmp_path, server_url=server, database=name)
    try:
        asyncio.run(upgrade(result.url))
        yield result
    finally:
        result.reap()
        result.close()
        asyncio.run(_admin(server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))

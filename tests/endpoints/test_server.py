"""`carwash-jobs serve` as a real process on 127.0.0.1: the token it generates, every route over
real HTTP (uvicorn), a job polled from 202 to completed, and a graceful stop on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from carwash_jobs import heap_trim
from carwash_jobs.store.migrations import upgrade
from tests.endpoints.sample_tasks import MODULES
from tests.task_types.support import free_port

if TYPE_CHECKING:
    from collections.abc import Iterator

REPO = Path(__file__).resolve().parents[2]
CLI = Path(sys.executable).parent / "carwash-jobs"
START_TIMEOUT = 20.0


@dataclass
class Server:
    process: subprocess.Popen[str]
    url: str
    directory: Path

    @property
    def token_file(self) -> Path:
        return self.directory / "data" / "carwash.token"

    def client(self, token: str | None = None) -> httpx.Client:
        headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        return httpx.Client(base_url=self.url, headers=headers, timeout=10)

    def stop(self) -> tuple[str, str]:
        """SIGTERM, then the process's stdout and stderr (its log)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        stdout, stderr = self.process.communicate(timeout=15)
        return stdout, stderr


def configure(directory: Path, token: str | None = None, **settings: object) -> dict[str, str]:
    """A config file in `directory` (an SQLite file and the uploads under data/, the sample
    task types, `settings` on top) and an environment that reads it, and no CARWASH_* variable
    of the developer's."""
    directory.mkdir(exist_ok=True)
    values: dict[str, object] = {
        "database_url": f"sqlite+aiosqlite:///{directory / 'data' / 'carwash.db'}",
        "task_types": MODULES,
        "files_dir": str(directory / "data" / "files"),
        "schedules_file": "", "sqlite_synchronous": "NORMAL", "max_upload_bytes": 65536,
        **settings,
    }
    config = directory / "carwash.toml"
    config.write_text("".join(f"{name} = {json.dumps(value)}\n" for name, value in values.items()),
                      encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("CARWASH_")}
    env |= {"CARWASH_CONFIG": str(config), "PYTHONPATH": str(REPO)}
    if token is not None:
        env["CARWASH_API_TOKEN"] = token
    return env


def start(directory: Path, *args: str, token: str | None = None) -> Server:
    env = configure(directory, token)
    port = free_port()
    process = subprocess.Popen(
        [str(CLI), "serve", "--host", "127.0.0.1", "--port", str(port), *args],
        cwd=directory, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    server = Server(process, f"http://127.0.0.1:{port}", directory)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"serve exited with {process.returncode}: {server.stop()[1]}")
        try:
            if httpx.get(f"{server.url}/health", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            time.sleep(0.05)
    server.stop()
    raise AssertionError("serve did not answer /health in time")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    running = start(tmp_path / "all")
    yield running
    running.stop()


def poll(client: httpx.Client, location: str, *statuses: str) -> dict[str, Any]:
    """What a client does after a 202: GET the Location until the job reaches a status."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        job: dict[str, Any] = client.get(location).json()
        if job["status"] in statuses:
            return job
        time.sleep(0.02)
    raise AssertionError(f"{location} did not reach {statuses}")


def test_serve_generates_a_token_and_serves_every_route(server: Server) -> None:
    token = server.token_file.read_text(encoding="ascii").strip()
    assert stat.S_IMODE(server.token_file.stat().st_mode) == 0o600
    with server.client(token) as api, server.client() as anonymous, server.client("wrong") as wrong:
        walk_every_route(api, anonymous, wrong)

    stdout, stderr = server.stop()
    assert server.process.returncode in (0, -signal.SIGTERM)
    assert stdout.count(token) == 1  # printed once, at generation
    assert token not in stderr  # never logged
    assert "Application shutdown complete" in stderr
    if heap_trim.libc_malloc_trim() is not None:  # a served process hands freed memory back
        assert "every 30s (malloc_trim)" in stderr


def walk_every_route(api: httpx.Client, anonymous: httpx.Client, wrong: httpx.Client) -> None:
    # health, documents, metrics: open
    assert anonymous.get("/health").json() == {"status": "ok", "database": "ok"}
    assert anonymous.get("/schema/openapi.json").status_code == 200
    # the guard answers before the body is read
    assert anonymous.post("/api/tasks/echo", content=b"{bad").status_code == 401
    assert wrong.get("/api/jobs").status_code == 401

    # enqueue -> 202 + Location -> poll until completed
    accepted = api.post("/api/tasks/echo", json={"message": "over the wire", "tags": ["srv"]})
    assert accepted.status_code == 202
    done = poll(api, accepted.headers["location"], "completed")
    assert done["result"]["message"] == "over the wire"
    again = api.post("/api/tasks/echo", json={"message": "x", "idempotency_key": "srv-1"})
    assert (again.status_code, api.post("/api/tasks/echo", json={"message": "y", "idempotency_key": "srv-1"})
            .status_code) == (202, 200)

    # bad input, unknown job, state conflict, too large
    assert api.post("/api/tasks/echo", json={"message": 5}).json()["extra"][0]["key"] == "message"
    assert api.post("/api/tasks/echo", content=b"{bad", headers={"content-type": "application/json"}
                    ).status_code == 400
    assert api.get("/api/jobs/nope").status_code == 404
    assert api.post(f"{accepted.headers['location']}/cancel").status_code == 409
    assert api.post("/api/tasks/echo", json={"message": "x" * 70_000}).status_code == 413

    # multipart upload, stored before the 202, read by the handler
    upload = api.post("/api/tasks/file-upload", files={"file": ("staff.csv", b"a\r\nb\r\n")},
                      data={"kind": "employees", "tenant_id": "tenant-1"})
    assert upload.status_code == 202, upload.text
    assert poll(api, upload.headers["location"], "completed")["result"] == {"lines": 2}
    assert api.post("/api/tasks/file-upload", files={"file": ("big.csv", b"x" * 70_000)},
                    data={"kind": "employees", "tenant_id": "t"}).status_code == 413

    # list, events, retry-failed, rerun, cancel
    page = api.get("/api/jobs", params={"tag": "srv", "limit": 10}).json()
    assert [job["id"] for job in page["items"]] == [done["id"]]
    events = api.get(f"{accepted.headers['location']}/events").json()["items"]
    assert [e["event"] for e in events] == ["enqueued", "claimed", "completed"]
    failing = api.post("/api/tasks/fail", json={}).headers["location"]
    poll(api, failing, "failed")
    retried = api.post("/api/jobs/retry-failed", json={"task_type": "fail"})
    assert (retried.status_code, retried.json()["retried"]) == (200, 1)
    rerun = api.post(f"{accepted.headers['location']}/rerun")
    assert rerun.status_code == 202
    assert poll(api, rerun.headers["location"], "completed")["rerun_of"] == done["id"]
    later = api.post("/api/tasks/echo", json={"message": "later", "delay_seconds": 600}).json()
    assert api.post(f"/api/jobs/{later['id']}/cancel").json()["status"] == "cancelled"

    # queue and metrics
    assert api.post("/api/queue/reload").json() == {"loaded": 0}
    assert api.get("/api/queue/stats").json()["by_status"]["cancelled"] == 1
    assert 'carwash_jobs_completed_total{task_type="echo"}' in anonymous.get("/metrics").text


def test_serve_reuses_the_token_file_and_the_api_role_runs_no_jobs(tmp_path: Path) -> None:
    token_file = tmp_path / "api" / "data" / "carwash.token"
    token_file.parent.mkdir(parents=True)
    token_file.write_text("kept-token\n", encoding="ascii")
    token_file.chmod(0o644)
    server = start(tmp_path / "api", "--role", "api")
    try:
        with server.client("kept-token") as api:
            location = api.post("/api/tasks/echo", json={"message": "m"}).headers["location"]
            assert api.post("/api/queue/reload").json() == {"loaded": 0}
            assert api.get(location).json()["status"] == "queued"
    finally:
        stdout, stderr = server.stop()
    assert "kept-token" not in stdout + stderr
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600  # tightened


def test_serve_with_a_configured_token_writes_no_token_file(tmp_path: Path) -> None:
    server = start(tmp_path / "env", token="from-the-environment")
    try:
        with server.client("from-the-environment") as api:
            assert api.get("/api/queue/stats").status_code == 200
        assert not server.token_file.exists()
    finally:
        stdout, stderr = server.stop()
    assert "from-the-environment" not in stdout + stderr


# -- start-ups that fail ---------------------------------------------------------------------
#: how long a process whose start-up failed may take to exit: it starts Python and the app
#: first, on a test machine of two shared cores
EXIT_TIMEOUT = 15.0


def run_cli(directory: Path, *argv: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`carwash-jobs argv` in `directory`, to its end (killed, and TimeoutExpired, past
    EXIT_TIMEOUT)."""
    return subprocess.run([str(CLI), *argv], cwd=directory, env=env, capture_output=True,
                          text=True, timeout=EXIT_TIMEOUT, check=False)


@pytest.mark.parametrize("role", ["all", "worker"])
def test_serve_exits_when_its_start_fails_after_the_store_opened(tmp_path: Path, role: str) -> None:
    """The process announcing itself fails, as it did when another program held SQLite's write
    lock for a few seconds after the migrations (here its table is gone, which fails the same
    statement every time): the process exits with an error. It stayed alive for good, serving
    nothing (the store's connection threads were left open), and systemd saw an active unit."""
    database = tmp_path / "data" / "carwash.db"
    asyncio.run(upgrade(f"sqlite+aiosqlite:///{database}"))
    with contextlib.closing(sqlite3.connect(database)) as conn:
        conn.execute("DROP TABLE processes")
    env = configure(tmp_path, token="t", log_level="WARNING")

    done = run_cli(tmp_path, "serve", "--role", role, "--port", str(free_port()), env=env)

    assert done.returncode != 0
    assert "no such table: processes" in done.stderr


def refusal(directory: Path, *argv: str, token: str | None = None, **settings: object) -> str:
    """What `carwash-jobs argv` says as it refuses to start: it exits 1 with one line on stderr,
    no traceback."""
    done = run_cli(directory, *argv, env=configure(directory, token, log_level="WARNING", **settings))
    assert "Traceback" not in done.stderr
    assert done.returncode == 1, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("carwash-jobs: ")
    return lines[0]


@pytest.mark.parametrize("role", ["all", "worker"])
def test_serve_with_a_database_it_cannot_reach_says_so_in_one_line(tmp_path: Path, role: str) -> None:
    """It was an ExceptionGroup of 145 lines from inside uvicorn (exit 3), or a
    ConnectionRefusedError's traceback for the worker role."""
    nobody = f"postgresql+asyncpg://nobody@127.0.0.1:{free_port()}/carwash"

    said = refusal(tmp_path, "serve", "--role", role, token="t", database_url=nobody)

    assert said.startswith("carwash-jobs: cannot reach the database: ")


@pytest.mark.parametrize("role", ["all", "worker"])
def test_serve_with_a_bad_cron_expression_says_so_in_one_line(tmp_path: Path, role: str) -> None:
    """Role all printed 76 lines from inside uvicorn (exit 3); role worker already said it in one."""
    tmp_path.joinpath("schedules.toml").write_text(
        '[[schedules]]\nname = "nightly"\ntask_type = "echo"\ncron = "61 * * * *"\n'
        'payload = { message = "m" }\n', encoding="utf-8",
    )

    said = refusal(tmp_path, "serve", "--role", role, schedules_file="schedules.toml")

    assert said.startswith("carwash-jobs: schedules.toml: schedule 'nightly': cron: '61 * * * *'")


@pytest.mark.parametrize(("role", "setting", "at"), [
    ("all", "database_url", "data/carwash.db"),
    ("worker", "database_url", "data/carwash.db"),
    ("all", "files_dir", "files"),  # uploads: each was a 500
    ("api", "files_dir", "files"),
    ("all", "smtp_url", "outbox"),  # mail: each email job retried until it failed
    ("worker", "smtp_url", "outbox"),
])
def test_serve_refuses_a_directory_it_cannot_write_to_in_one_line(
    tmp_path: Path, role: str, setting: str, at: str
) -> None:
    """A path under a regular file (root ignores permission bits, not that). Of the database,
    it was a FileExistsError's traceback; of the uploads and the outbox, a start that looked
    fine, /health 200, and then the failures."""
    in_the_way = tmp_path / "a-file"
    in_the_way.write_text("not a directory\n", encoding="utf-8")
    path = in_the_way / at
    value = {"database_url": f"sqlite+aiosqlite:///{path}", "files_dir": str(path),
             "smtp_url": f"outbox:{path}"}[setting]

    said = refusal(tmp_path, "serve", "--role", role, **{setting: value})

    assert said.startswith(f"carwash-jobs: CARWASH_{setting.upper()} / {setting}: ")
    assert "must be a directory this process can write to" in said

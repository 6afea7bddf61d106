"""HTTP scenario: sustained enqueue requests through the real server (`carwash-jobs serve`,
role all) with 50 concurrent clients in a separate load-generator process."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from bench.support import fresh_database

if TYPE_CHECKING:
    from bench.support import Report

CLIENTS = 50
SECONDS = 15.0
TOKEN = "bench-token"


def _no_schedules() -> Path:
    """An empty schedules file: the shipped schedules name task types this server lacks."""
    path = Path(tempfile.gettempdir()) / f"carwash-bench-schedules-{os.getpid()}.toml"
    path.write_text("schedules = []\n")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def run(report: Report, backend: str, pg_url: str) -> None:
    """One process serving the API and running the jobs (role all); on PostgreSQL also the
    scale-out layout: an API process (role api) and a worker process (role worker)."""
    layouts = [("http_enqueue", ["all"])]
    if backend == "postgres":
        layouts.append(("http_api_role_enqueue", ["api", "worker"]))
    for stem, roles in layouts:
        async with fresh_database(backend, pg_url) as url:
            figures = await _measure(url, roles)
        report.add("http", backend, f"{stem}_requests_per_s", figures["requests_per_s"], "req/s")
        report.add("http", backend, f"{stem}_p50_ms", figures["p50_ms"], "ms")
        report.add("http", backend, f"{stem}_p99_ms", figures["p99_ms"], "ms")
        non_202 = sum(n for code, n in figures["statuses"].items() if code != "202")
        report.add("http", backend, f"{stem}_non_202_responses", non_202, "responses")


async def _measure(url: str, roles: list[str]) -> dict[str, Any]:
    """The load generator's figures against a server of `roles`, the first of which serves
    HTTP; each role is its own `carwash-jobs serve` process."""
    port = _free_port()
    env = {
        **os.environ, "CARWASH_DATABASE_URL": url, "CARWASH_API_TOKEN": TOKEN,
        "CARWASH_TASK_TYPES": '["bench.noop_task"]',
        "CARWASH_SCHEDULES_FILE": str(_no_schedules()),
        "CARWASH_LOG_LEVEL": "WARNING", "CARWASH_CONCURRENCY": "50",
    }
    servers = [
        subprocess.Popen(  # noqa: ASYNC220 - a spawn, not a wait
            [sys.executable, "-m", "carwash_jobs.cli", "serve", "--port", str(port),
             "--role", role], env=env,
        )
        for role in roles
    ]
    try:
        await _wait_healthy(port)
        load = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.loadgen", "127.0.0.1", str(port), TOKEN,
            str(CLIENTS), str(SECONDS), stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await load.communicate()
        figures: dict[str, Any] = json.loads(out)
    finally:
        for server in servers:
            server.terminate()
        for server in servers:
            server.wait(timeout=60)
    return figures


async def _wait_healthy(port: int) -> None:
    deadline = time.monotonic() + 30
    async with httpx.AsyncClient() as client:
        while time.monotonic() < deadline:
            try:
                if (await client.get(f"http://127.0.0.1:{port}/health")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError("the server did not become healthy within 30 s")

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
from typing import TYPE_CHECKING

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
    async with fresh_database(backend, pg_url) as url:
        port = _free_port()
        env = {
            **os.environ, "CARWASH_DATABASE_URL": url, "CARWASH_API_TOKEN": TOKEN,
            "CARWASH_TASK_TYPES": '["bench.noop_task"]',
            "CARWASH_SCHEDULES_FILE": str(_no_schedules()),
            "CARWASH_LOG_LEVEL": "WARNING", "CARWASH_CONCURRENCY": "50",
        }
        server = subprocess.Popen(  # noqa: ASYNC220 - a spawn, not a wait
            [sys.executable, "-m", "carwash_jobs.cli", "serve", "--port", str(port)], env=env,
        )
        try:
            await _wait_healthy(port)
            load = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bench.loadgen", "127.0.0.1", str(port), TOKEN,
                str(CLIENTS), str(SECONDS), stdout=asyncio.subprocess.PIPE,
            )
            out, _ = await load.communicate()
            figures = json.loads(out)
        finally:
            server.terminate()
            server.wait(timeout=60)
    report.add("http", backend, "http_enqueue_requests_per_s", figures["requests_per_s"], "req/s")
    report.add("http", backend, "http_enqueue_p50_ms", figures["p50_ms"], "ms")
    report.add("http", backend, "http_enqueue_p99_ms", figures["p99_ms"], "ms")
    non_202 = sum(n for code, n in figures["statuses"].items() if code != "202")
    report.add("http", backend, "http_non_202_responses", non_202, "responses")


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

"""Tests for endpoints/queue.py: reload due rows into memory now, and the queue's counts."""

from __future__ import annotations

import asyncio
import os
import socket
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from litestar.testing import AsyncTestClient

from carwash_jobs.app import create_app
from tests.endpoints.conftest import AUTH, idle, in_app

if TYPE_CHECKING:
    from litestar import Litestar

    from carwash_jobs.runtime import Runtime
    from carwash_jobs.settings import Settings


async def test_reload_loads_rows_that_memory_does_not_hold(
    client: AsyncTestClient[Litestar], runtime: Runtime
) -> None:
    # written straight to the store, as another process would: nothing offers it to memory
    (inserted,) = in_app(client, runtime.store.insert, [runtime.queue.build("echo", {"message": "x"})])

    response = await client.post("/api/queue/reload")

    assert response.status_code == 200
    assert response.json() == {"loaded": 1}
    idle(client, runtime)
    assert (await client.get(f"/api/jobs/{inserted.job.id}")).json()["status"] == "completed"
    assert (await client.post("/api/queue/reload")).json() == {"loaded": 0}


async def test_stats_count_jobs_by_status_and_task_type(
    client: AsyncTestClient[Litestar], runtime: Runtime
) -> None:
    await client.post("/api/tasks/echo", json={"message": "later", "delay_seconds": 600})
    await client.post("/api/tasks/fail", json={})
    idle(client, runtime)

    response = await client.get("/api/queue/stats")

    assert response.status_code == 200
    stats = response.json()
    assert stats["in_memory"] == 0
    assert stats["by_status"]["scheduled"] == 1
    assert stats["by_status"]["failed"] == 1
    assert stats["by_status"]["running"] == 0
    assert stats["by_task_type"] == {"echo": {"scheduled": 1}, "fail": {"failed": 1}}
    assert stats["running_by_process"] == {}


async def test_api_role_takes_jobs_but_runs_none(settings: Settings) -> None:
    async with AsyncTestClient(create_app(settings, role="api")) as client:
        client.headers.update(AUTH)
        job = (await client.post("/api/tasks/echo", json={"message": "m"})).json()

        assert (await client.post("/api/queue/reload")).json() == {"loaded": 0}
        assert (await client.get("/api/queue/stats")).json()["in_memory"] == 0
        assert (await client.get(f"/api/jobs/{job['id']}")).json()["status"] == "queued"


async def test_stats_list_the_live_processes_and_the_jobs_each_runs(
    client: AsyncTestClient[Litestar], runtime: Runtime, settings: Settings
) -> None:
    job = (await client.post("/api/tasks/slow", json={"seconds": 5})).json()
    async with AsyncTestClient(create_app(settings, role="api")) as api:  # a second process
        api.headers.update(AUTH)
        for _ in range(300):  # the handler starts within milliseconds (seconds on a busy box)
            stats = (await api.get("/api/queue/stats")).json()
            if stats["by_status"]["running"]:
                break
            await asyncio.sleep(0.01)
    in_app(client, runtime.queue.cancel, job["id"])

    by_role = {p["role"]: p for p in stats["processes"]}  # both started within one second
    assert sorted(by_role) == ["all", "api"]
    mine = by_role["all"]
    assert mine["owner"] == runtime.owner
    assert (mine["host"], mine["pid"]) == (socket.gethostname(), os.getpid())
    assert mine["running"] == 1
    assert by_role["api"]["running"] == 0
    assert stats["running_by_process"] == {runtime.owner: 1}
    started = datetime.fromisoformat(mine["started_at"])
    assert abs((datetime.now(UTC) - started).total_seconds()) < 60
    # the api app stopped: it left the fleet
    after = (await client.get("/api/queue/stats")).json()
    assert [p["owner"] for p in after["processes"]] == [runtime.owner]

"""Tests for endpoints/queue.py: reload due rows into memory now, and the queue's counts."""

from __future__ import annotations

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

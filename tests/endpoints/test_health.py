"""Tests for endpoints/health.py: /health (503 when the database does not answer) and /metrics."""

from __future__ import annotations

from typing import TYPE_CHECKING

from litestar.testing import AsyncTestClient

from carwash_jobs.app import create_app
from carwash_jobs.errors import StoreUnavailable
from tests.endpoints.conftest import AUTH, assert_error, copy_template, idle, make_settings

if TYPE_CHECKING:
    from pathlib import Path

    import pytest
    from litestar import Litestar

    from carwash_jobs.runtime import Runtime


async def test_health_is_open_and_checks_the_database(anonymous: AsyncTestClient[Litestar]) -> None:
    response = await anonymous.get("/health")

    assert response.status_code == 200
    assert response.json() == {"status": "ok", "database": "ok"}


async def test_health_is_503_when_the_database_does_not_answer(
    anonymous: AsyncTestClient[Litestar], runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def down() -> None:
        raise StoreUnavailable("the database does not answer: disk I/O error")

    monkeypatch.setattr(runtime.store, "ping", down)

    body = assert_error(await anonymous.get("/health"), 503)

    assert "does not answer" in body["detail"]


async def test_metrics_are_prometheus_text(
    anonymous: AsyncTestClient[Litestar], runtime: Runtime
) -> None:
    anonymous.headers.update(AUTH)
    await anonymous.post("/api/tasks/echo", json={"message": "m"})
    await anonymous.post("/api/tasks/fail", json={})
    await anonymous.post("/api/tasks/echo", json={"message": "later", "delay_seconds": 600})
    idle(anonymous, runtime)
    del anonymous.headers["Authorization"]

    response = await anonymous.get("/metrics")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert 'carwash_jobs_enqueued_total{task_type="echo"} 2.0' in text
    assert 'carwash_jobs_completed_total{task_type="echo"} 1.0' in text
    assert 'carwash_jobs_failed_total{task_type="fail"} 1.0' in text
    assert 'carwash_job_duration_seconds_bucket{le="+Inf",task_type="echo"} 1.0' in text
    assert 'carwash_queue_jobs{status="scheduled"} 1.0' in text
    assert "carwash_queue_in_memory 0.0" in text


async def test_metrics_take_the_token_when_not_public(tmp_path: Path, template_db: Path) -> None:
    copy_template(template_db, tmp_path)
    app = create_app(make_settings(tmp_path, metrics_public=False))
    async with AsyncTestClient(app) as client:
        assert_error(await client.get("/metrics"), 401)
        assert (await client.get("/metrics", headers=AUTH)).status_code == 200
        assert (await client.get("/health")).status_code == 200

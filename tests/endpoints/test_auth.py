"""Tests for endpoints/auth.py: every /api operation, as listed by the OpenAPI document itself,
refuses a missing or wrong bearer token with 401 before it reads the body, and writes nothing."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.endpoints.conftest import AUTH, TOKEN, assert_error, job_count

if TYPE_CHECKING:
    from litestar import Litestar
    from litestar.testing import AsyncTestClient

    from carwash_jobs.settings import Settings

BAD_CREDENTIALS: list[dict[bytes, bytes]] = [
    {},
    {b"authorization": b"Bearer"},
    {b"authorization": b"Bearer wrong-token"},
    {b"authorization": f"Bearer {TOKEN}x".encode()},
    {b"authorization": f"Basic {TOKEN}".encode()},
    {b"authorization": TOKEN.encode()},
    {b"authorization": "Bearer \u00e9t\u00e9".encode()},  # not ASCII: still a plain 401
]


def api_operations(app: Litestar) -> list[tuple[str, str]]:
    document = app.openapi_schema.to_schema()
    return [
        (method.upper(), re.sub(r"\{[^}]+\}", "some-id", path))
        for path, item in document["paths"].items() if path.startswith("/api/")
        for method in item
    ]


async def test_every_api_operation_is_documented_as_guarded(app: Litestar) -> None:
    document = app.openapi_schema.to_schema()
    operations = [op for path, item in document["paths"].items() if path.startswith("/api/")
                  for op in item.values()]

    assert len(operations) >= 12  # 4 task types, 6 job routes, 2 queue routes
    for operation in operations:
        assert operation["security"] == [{"BearerToken": []}], operation["operationId"]
        assert "401" in operation["responses"], operation["operationId"]
    assert document["components"]["securitySchemes"]["BearerToken"]["scheme"] == "bearer"


@pytest.mark.parametrize("credentials", BAD_CREDENTIALS, ids=range(len(BAD_CREDENTIALS)))
async def test_every_api_operation_refuses_a_bad_token(
    app: Litestar, anonymous: AsyncTestClient[Litestar], credentials: dict[bytes, bytes]
) -> None:
    for method, path in api_operations(app):
        # a body that would be a 400 with the token: the guard must answer first
        response = await anonymous.request(method, path, content=b"{not json", headers=credentials)

        body = assert_error(response, 401)
        assert response.headers["www-authenticate"].startswith("Bearer"), (method, path)
        assert TOKEN not in body["detail"]
    anonymous.headers.update(AUTH)
    assert await job_count(anonymous) == 0


async def test_the_token_opens_every_api_operation(app: Litestar, client: AsyncTestClient[Litestar]) -> None:
    for method, path in api_operations(app):
        response = await client.request(method, path, content=b"{not json")

        assert response.status_code != 401, (method, path)


@pytest.mark.parametrize("path", ["/health", "/metrics", "/schema/openapi.json"])
async def test_operations_routes_are_open(anonymous: AsyncTestClient[Litestar], path: str) -> None:
    assert (await anonymous.get(path)).status_code == 200


async def test_a_multipart_upload_without_token_is_refused_before_it_is_stored(
    anonymous: AsyncTestClient[Litestar], settings: Settings
) -> None:
    form = {"kind": "employees", "tenant_id": "t"}
    response = await anonymous.post("/api/tasks/file-upload", files={"file": ("a.csv", b"a\n")}, data=form)

    assert_error(response, 401)
    assert not _exists(settings.files_dir)


def _exists(path: str) -> bool:
    return Path(path).exists()

"""Tests for endpoints/text.py: text holding U+0000 (NUL), which PostgreSQL cannot store, is a
400 naming where it is, on SQLite and PostgreSQL alike, and nothing is written. On PostgreSQL
each of these was a 500 (or a payload a handler could never store); on SQLite it was taken."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

from endpoints.text import nul_location
from tests.endpoints.conftest import assert_error, job_count

if TYPE_CHECKING:
    from pathlib import Path

    from litestar import Litestar
    from litestar.testing import AsyncTestClient

NUL = "\x00"


@pytest.mark.parametrize(("body", "field"), [
    ({"idempotency_key": f"k{NUL}"}, "idempotency_key"),
    ({"tags": ["a", f"t{NUL}"]}, "tags.1"),
    ({"depends_on": [NUL]}, "depends_on.0"),
    ({"context": {"k": [f"{NUL}"]}}, "context.k.0"),
    ({"context": {f"k{NUL}": 1}}, f"context.k{NUL}"),
    ({"message": f"a{NUL}b"}, "message"),
    ({"recipients": [{"email": "a@example.com", "name": f"A{NUL}"}]}, "recipients.0.name"),
])
async def test_enqueue_with_nul_in_text_gets_400_naming_it(
    backend_client: AsyncTestClient[Litestar], body: dict[str, Any], field: str
) -> None:
    response = await backend_client.post("/api/tasks/echo", json={"message": "m", **body})

    assert_error(response, 400, field)
    assert await job_count(backend_client) == 0


@pytest.mark.parametrize(("fields", "field"), [
    ({"tenant_id": f"t{NUL}"}, "tenant_id"),
    ({"context": '{"k": "\\u0000"}'}, "context.k"),  # JSON text in the form: NUL once decoded
    ({"notes": '{"a": "\\u0000"}'}, "notes.a"),
])
async def test_upload_with_nul_in_a_field_gets_400_and_leaves_no_file(
    backend_client: AsyncTestClient[Litestar], tmp_path: Path, fields: dict[str, str], field: str
) -> None:
    data = {"kind": "employees", "tenant_id": "t", **fields}
    files = {"file": ("staff.csv", b"a,b\n", "text/csv")}

    response = await backend_client.post("/api/tasks/file-upload", data=data, files=files)

    assert_error(response, 400, field)
    assert await job_count(backend_client) == 0
    assert not [p for p in (tmp_path / "files").rglob("*") if p.is_file()]


@pytest.mark.parametrize("param", ["tag", "task_type", "queue"])
async def test_list_with_nul_in_a_query_parameter_gets_400_after_the_token_check(
    backend_client: AsyncTestClient[Litestar], param: str
) -> None:
    response = await backend_client.get("/api/jobs", params={param: f"a{NUL}"})

    assert_error(response, 400, param)
    anonymous = await backend_client.get("/api/jobs", params={param: f"a{NUL}"},
                                         headers={"Authorization": ""})
    assert_error(anonymous, 401)


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/api/jobs/%00"), ("GET", "/api/jobs/a%00/events"),
    ("POST", "/api/jobs/%00/cancel"), ("POST", "/api/jobs/%00/rerun"),
])
async def test_a_job_id_holding_nul_gets_400_naming_it(
    backend_client: AsyncTestClient[Litestar], method: str, path: str
) -> None:
    response = await backend_client.request(method, path)

    assert_error(response, 400, "job_id")
    assert await job_count(backend_client) == 0


@pytest.mark.parametrize(("body", "field"), [
    ({"task_type": f"a{NUL}"}, "task_type"),
    ({"ids": ["0" * 32, f"a{NUL}"]}, "ids.1"),
])
async def test_retry_failed_with_nul_gets_400_naming_it(
    backend_client: AsyncTestClient[Litestar], body: dict[str, Any], field: str
) -> None:
    assert_error(await backend_client.post("/api/jobs/retry-failed", json=body), 400, field)



def nested(depth: int, leaf: Any) -> Any:
    value = leaf
    for _ in range(depth):
        value = {"a": value}
    return value


@pytest.mark.parametrize(("value", "where"), [
    ({"a": ["x", f"y{NUL}"]}, ("a", 1)),
    ({f"k{NUL}": 1}, (f"k{NUL}",)),
    (f"t{NUL}", ()),
    ({"a": "\\u0000"}, None),  # the six characters, as JSON writes NUL: no NUL in them
    ({"a": object()}, None),  # a value that is no JSON (a form's file)
    (nested(300, f"deep{NUL}"), ("a",) * 300),  # deeper than the JSON encoder goes: walked
    (nested(5000, f"deep{NUL}"), None),  # deeper than a walk goes: the depth checks refuse it
])
def test_nul_location_names_the_path_to_the_first_nul(value: Any, where: Any) -> None:
    assert nul_location(value) == where

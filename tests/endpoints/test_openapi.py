"""Tests for the OpenAPI document (/schema/openapi.json): it is generated from the registry and
agrees with shared/API.md; and a property-based fuzz of the whole API with schemathesis finds no
500 and no response that breaks the document.

The fuzz app is built at import time: schemathesis' lazy fixture loader does not run under
pytest 9 (it sets `request.node._nodeid`, which pytest 9 no longer has), so the schema is loaded
eagerly, from the app's own document, without starting the app. Its lifespan starts on the first
call, on a database in a fresh temporary directory, and schemathesis ends it after each test.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.python import asgi as schemathesis_asgi
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from carwash_jobs.app import create_app
from carwash_jobs.registry import TaskRegistry
from tests.endpoints.conftest import AUTH, make_settings
from tests.endpoints.sample_tasks import MODULES

if TYPE_CHECKING:
    from collections.abc import Iterator

    from litestar import Litestar
    from litestar.testing import AsyncTestClient
    from schemathesis import Case

    from carwash_jobs.settings import Settings

#: examples per operation and generation phase; 14 operations make a few hundred requests
FUZZ_EXAMPLES = 10
FUZZ_DIR = Path(tempfile.gettempdir()) / f"carwash-fuzz-{uuid.uuid4().hex}"
FUZZ_APP = create_app(make_settings(FUZZ_DIR))
SCHEMA = schemathesis.openapi.from_dict(FUZZ_APP.openapi_schema.to_schema())
SCHEMA.app = FUZZ_APP
SCHEMA.location = "/schema/openapi.json"
# the token is sent with every case; fuzzing the Authorization header would only test the guard,
# which test_auth.py covers, and would make schemathesis misjudge which requests were invalid
SCHEMA.config.generation.update(max_examples=FUZZ_EXAMPLES, with_security_parameters=False)
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
FUZZ_CASES: list[str] = []


def document(app: Litestar) -> dict[str, Any]:
    schema: dict[str, Any] = app.openapi_schema.to_schema()
    return schema


async def test_document_is_served(anonymous: AsyncTestClient[Litestar]) -> None:
    response = await anonymous.get("/schema/openapi.json")

    assert response.status_code == 200
    assert response.json()["openapi"].startswith("3.")
    assert response.json()["info"]["title"] == "carwash-jobs"


def test_one_enqueue_route_per_registered_task_type(app: Litestar, settings: Settings) -> None:
    paths = document(app)["paths"]
    registry = TaskRegistry.load(settings.task_types)

    task_paths = {path for path in paths if path.startswith("/api/tasks/")}
    assert task_paths == {f"/api/tasks/{t.route_slug}" for t in registry}
    for task_type in registry:
        operation = paths[f"/api/tasks/{task_type.route_slug}"]["post"]
        assert operation["operationId"] == f"enqueue_{task_type.name}"
        assert {"202", "200", "400", "401", "413"} <= set(operation["responses"])
        assert "Location" in operation["responses"]["202"]["headers"]


def test_request_schema_shows_the_payload_and_the_options_with_examples(app: Litestar) -> None:
    doc = document(app)
    body = doc["paths"]["/api/tasks/echo"]["post"]["requestBody"]["content"]["application/json"]
    echo = doc["components"]["schemas"]["EchoEnqueue"]

    assert body["schema"]["examples"] == [
        {"message": "hello", "amount_cents": 250, "recipients": [{"email": "a@example.com"}]}
    ]
    assert echo["required"] == ["message"]
    assert echo["properties"]["amount_cents"]["exclusiveMinimum"] == 0
    assert echo["properties"]["mode"]["enum"] == ["plain", "loud"]
    options = {"run_at", "delay_seconds", "queue", "priority", "max_attempts", "tags",
               "idempotency_key", "context", "depends_on"}
    assert options <= set(echo["properties"])
    assert set(echo["properties"]["queue"]["enum"]) == {"bulk", "critical", "default", None}


def test_each_routes_queue_option_names_its_task_types_default_queue(tmp_path: Path) -> None:
    """Email's jobs go to `bulk` unless told otherwise; the document said "default"."""
    settings = make_settings(tmp_path, task_types=[*MODULES, "task_types.email"])
    doc = document(create_app(settings))
    options = {name: schema["properties"]["queue"]["description"]
               for name, schema in doc["components"]["schemas"].items()
               if name in ("EchoEnqueue", "EmailEnqueue")}

    assert options["EmailEnqueue"].startswith('The named queue; default "bulk"')
    assert options["EchoEnqueue"].startswith('The named queue; default "default"')


def test_upload_route_takes_a_multipart_form(app: Litestar) -> None:
    doc = document(app)
    body = doc["paths"]["/api/tasks/file-upload"]["post"]["requestBody"]["content"]
    form = doc["components"]["schemas"]["FileUploadUpload"]

    assert list(body) == ["multipart/form-data"]
    assert form["properties"]["file"]["format"] == "binary"
    assert {"file", "kind", "tenant_id"} <= set(form["required"])
    assert "path" not in form["properties"]  # the stored file's path is filled in by the server


def test_documented_status_codes_match_the_contract(app: Litestar) -> None:
    paths = document(app)["paths"]

    def codes(path: str, method: str) -> set[str]:
        return set(paths[path][method]["responses"])

    assert {"200", "401", "404"} <= codes("/api/jobs/{job_id}", "get")
    assert {"200", "400", "401"} <= codes("/api/jobs", "get")
    assert {"200", "400", "401"} <= codes("/api/jobs/retry-failed", "post")
    assert {"202", "401", "404", "409"} <= codes("/api/jobs/{job_id}/rerun", "post")
    assert {"200", "401", "404", "409"} <= codes("/api/jobs/{job_id}/cancel", "post")
    assert {"200", "401", "404"} <= codes("/api/jobs/{job_id}/events", "get")
    assert {"200", "401"} <= codes("/api/queue/reload", "post")
    assert {"200", "401"} <= codes("/api/queue/stats", "get")
    assert {"200", "503"} <= codes("/health", "get")
    assert "200" in codes("/metrics", "get")
    assert paths["/api/jobs/retry-failed"]["post"]["requestBody"]["required"] is False


# -- the fuzz ------------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def _end_fuzz_app() -> Iterator[None]:
    yield
    schemathesis_asgi.shutdown_lifespans()
    shutil.rmtree(FUZZ_DIR, ignore_errors=True)


@SCHEMA.parametrize()
def test_fuzz_finds_no_server_error_and_no_response_off_the_document(case: Case[Any]) -> None:
    FUZZ_CASES.append(case.operation.label)
    case.call_and_validate(headers=AUTH, checks=CHECKS)


def test_fuzz_ran_a_few_hundred_cases() -> None:
    """Runs after the fuzz (pytest keeps file order): a fuzz that silently generated nothing
    would prove nothing."""
    if not FUZZ_CASES:
        pytest.skip("the fuzz did not run in this session (deselected)")
    assert len(FUZZ_CASES) >= 200, len(FUZZ_CASES)
    assert len(set(FUZZ_CASES)) == 14

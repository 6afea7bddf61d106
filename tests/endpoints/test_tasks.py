"""Tests for endpoints/tasks.py: one POST per task type, options beside the payload, 202/200,
bad input as a 400 naming the field with nothing written, and multipart uploads."""

from __future__ import annotations

import gc
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from litestar.testing import AsyncTestClient
from pydantic import BaseModel

from carwash_jobs.app import build_runtime, create_app
from carwash_jobs.errors import ConfigurationError
from carwash_jobs.registry import TaskRegistry, TaskType
from endpoints.tasks import enqueue_model, task_routes
from tests.endpoints.conftest import AUTH, assert_error, copy_template, idle, job_count, make_settings
from tests.endpoints.sample_tasks.echo import EchoPayload, echo

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from litestar import Litestar

    from carwash_jobs.context import JobContext
    from carwash_jobs.runtime import Runtime
    from carwash_jobs.settings import Settings

JSON = {"content-type": "application/json"}


# -- JSON routes -----------------------------------------------------------------------------
async def test_enqueue_answers_202_with_location_and_the_job(client: AsyncTestClient[Litestar]) -> None:
    response = await client.post("/api/tasks/echo", json={"message": "hi", "amount_cents": 5})

    assert response.status_code == 202
    job = response.json()
    assert response.headers["location"] == f"/api/jobs/{job['id']}"
    assert job["task_type"] == "echo"
    # the processor here is idle: the job was written already claimed by it (queue.Handoff)
    assert (job["status"], job["attempts"]) == ("running", 1)
    assert job["payload"] == {"message": "hi", "amount_cents": 5, "mode": "plain", "recipients": []}
    assert job["queue"] == "default"
    assert job["max_attempts"] == 3  # the task type's default
    assert job["progress"] == {"done": 0, "total": None}
    assert job["created_at"].endswith("Z")
    assert (await client.get(response.headers["location"])).json()["id"] == job["id"]


async def test_job_is_polled_from_202_to_completed(
    client: AsyncTestClient[Litestar], runtime: Runtime
) -> None:
    response = await client.post("/api/tasks/echo", json={"message": "poll me"})
    idle(client, runtime)

    job = (await client.get(response.headers["location"])).json()
    assert job["status"] == "completed"
    assert job["result"]["message"] == "poll me"
    assert job["attempts"] == 1
    assert job["finished_at"] is not None


async def test_route_slug_comes_from_the_registry(client: AsyncTestClient[Litestar]) -> None:
    response = await client.post("/api/tasks/slow", json={"seconds": 0})

    assert response.status_code == 202
    assert response.json()["task_type"] == "slow_sleep"
    assert (await client.post("/api/tasks/slow_sleep", json={})).status_code == 404


async def test_options_beside_the_payload_are_applied(client: AsyncTestClient[Litestar]) -> None:
    before = datetime.now(UTC)
    response = await client.post("/api/tasks/echo", json={
        "message": "m", "priority": 7, "max_attempts": 9, "queue": "critical", "tags": ["a", "b"],
        "context": {"who": "admin"}, "delay_seconds": 3600,
    })

    job = response.json()
    assert response.status_code == 202
    assert job["payload"] == {"message": "m", "amount_cents": 1, "mode": "plain", "recipients": []}
    assert (job["priority"], job["max_attempts"], job["queue"]) == (7, 9, "critical")
    assert job["tags"] == ["a", "b"]
    assert job["context"] == {"who": "admin"}
    assert job["status"] == "scheduled"
    run_at = datetime.fromisoformat(job["run_at"])
    assert before + timedelta(seconds=3599) < run_at < before + timedelta(seconds=3700)


async def test_run_at_with_an_offset_schedules_the_job(client: AsyncTestClient[Litestar]) -> None:
    body = {"message": "m", "run_at": "2999-01-01T10:00:00+02:00"}

    response = await client.post("/api/tasks/echo", json=body)

    assert response.json()["status"] == "scheduled"
    assert datetime.fromisoformat(response.json()["run_at"]) == datetime(2999, 1, 1, 8, tzinfo=UTC)


async def test_same_idempotency_key_answers_200_with_the_existing_job(
    client: AsyncTestClient[Litestar],
) -> None:
    first = await client.post("/api/tasks/echo", json={"message": "once", "idempotency_key": "k-1"})
    again = await client.post("/api/tasks/echo", json={"message": "twice", "idempotency_key": "k-1"})

    assert (first.status_code, again.status_code) == (202, 200)
    assert again.json()["id"] == first.json()["id"]
    assert again.json()["payload"]["message"] == "once"
    assert again.headers["location"] == first.headers["location"]
    assert await job_count(client) == 1


async def test_depends_on_waits_until_the_dependency_completes(
    client: AsyncTestClient[Litestar], runtime: Runtime
) -> None:
    # slow runs one at a time, so the second one is surely unfinished when echo is enqueued
    await client.post("/api/tasks/slow", json={"seconds": 0.2})
    dependency = (await client.post("/api/tasks/slow", json={"seconds": 0.2})).json()
    body = {"message": "after", "depends_on": [dependency["id"]]}
    waiting = await client.post("/api/tasks/echo", json=body)
    assert waiting.json()["status"] == "waiting"

    idle(client, runtime)

    assert (await client.get(waiting.headers["location"])).json()["status"] == "completed"


async def test_depends_on_a_cancelled_job_cancels_the_dependent(
    client: AsyncTestClient[Litestar], runtime: Runtime
) -> None:
    dependency = (await client.post("/api/tasks/fail", json={"delay_seconds": 3600})).json()
    doomed = await client.post("/api/tasks/echo", json={"message": "m", "depends_on": [dependency["id"]]})

    await client.post(f"/api/jobs/{dependency['id']}/cancel")
    idle(client, runtime)

    job = (await client.get(doomed.headers["location"])).json()
    assert job["status"] == "cancelled"
    assert dependency["id"] in job["error"]


BAD_INPUTS: list[tuple[str, Any, str | None]] = [
    ("wrong type", {"message": 5}, "message"),
    ("missing field", {"amount_cents": 5}, "message"),
    ("negative amount", {"message": "m", "amount_cents": -5}, "amount_cents"),
    ("unknown enum value", {"message": "m", "mode": "whisper"}, "mode"),
    ("nested field", {"message": "m", "recipients": [{"email": ""}]}, "recipients.0.email"),
    ("unknown queue", {"message": "m", "queue": "nope"}, "queue"),
    ("zero attempts", {"message": "m", "max_attempts": 0}, "max_attempts"),
    ("priority beyond 32 bits", {"message": "m", "priority": 2**40}, "priority"),
    ("negative delay", {"message": "m", "delay_seconds": -1}, "delay_seconds"),
    ("run_at and delay", {"message": "m", "run_at": "2030-01-01T00:00:00Z", "delay_seconds": 5},
     "delay_seconds"),
    ("run_at without offset", {"message": "m", "run_at": "2030-01-01T00:00:00"}, "run_at"),
    ("run_at as a number", {"message": "m", "run_at": 1_900_000_000}, "run_at"),
    # text of digits was taken as a Unix timestamp: "1900000000" 2030-03-17, "2030" 1970
    ("run_at as text of digits", {"message": "m", "run_at": "1900000000"}, "run_at"),
    ("run_at as a year", {"message": "m", "run_at": "2030"}, "run_at"),
    ("run_at out of range", {"message": "m", "run_at": "0001-01-01T00:00:00+05:00"}, "run_at"),
    ("context not an object", {"message": "m", "context": [1]}, "context"),
    ("context too big", {"message": "m", "context": {"x": "y" * 5000}}, "context"),
    # small, but too deep for a page of the API to show
    ("context nested too deep", {"message": "m", "context": json.loads('{"a":' * 300 + "1" + "}" * 300)},
     "context"),
    ("tags not a list", {"message": "m", "tags": "x"}, "tags"),
    ("true for a number", {"message": "m", "delay_seconds": True}, "delay_seconds"),
    ("text for a number", {"message": "m", "priority": "5"}, "priority"),
    ("text for a payload number", {"message": "m", "amount_cents": "5"}, "amount_cents"),
    ("unknown dependency", {"message": "m", "depends_on": ["nope"]}, "depends_on"),
    # Litestar's own error named no field here: the body as a whole is the one that is wrong
    ("not an object", [1, 2], "body"),
    ("a number", 5, "body"),
]


@pytest.mark.parametrize(("body", "field"), [(b, f) for _, b, f in BAD_INPUTS],
                         ids=[name for name, _, _ in BAD_INPUTS])
async def test_bad_input_gets_400_naming_the_field_and_writes_nothing(
    client: AsyncTestClient[Litestar], body: Any, field: str | None
) -> None:
    response = await client.post("/api/tasks/echo", json=body)

    assert_error(response, 400, field)
    assert await job_count(client) == 0


@pytest.mark.parametrize("raw", [
    b"{bad", b"", b'{"message": "\\ud800"}', b"\xff\xfe",
    # deeper than the decoder's recursion limit: a RecursionError, which left as a 500
    b'{"message": "m", "context": ' + b'{"a":' * 5000 + b"1" + b"}" * 5001,
    b"[" * 3000 + b"]" * 3000,
])
async def test_malformed_json_gets_400(client: AsyncTestClient[Litestar], raw: bytes) -> None:
    response = await client.post("/api/tasks/echo", content=raw, headers=JSON)

    assert_error(response, 400)
    assert await job_count(client) == 0


@pytest.mark.parametrize(("raw", "message"), [
    (b"", "the request has no body; a JSON object is required"),
    (b"null", "Input should be a valid dictionary or instance of EchoEnqueue"),
    (b"[]", "Input should be a valid dictionary or instance of EchoEnqueue"),
])
async def test_a_body_that_is_no_object_gets_400_naming_the_body(
    client: AsyncTestClient[Litestar], raw: bytes, message: str
) -> None:
    """Litestar's own error named no field (or its handler's parameter, `data`)."""
    response = await client.post("/api/tasks/echo", content=raw, headers=JSON)

    body = assert_error(response, 400, "body")
    assert body["extra"] == [{"key": "body", "message": message, "source": "body"}]
    assert await job_count(client) == 0


async def test_unknown_task_type_is_404(client: AsyncTestClient[Litestar]) -> None:
    assert_error(await client.post("/api/tasks/nope", json={}), 404)


async def test_body_over_the_limit_gets_413(client: AsyncTestClient[Litestar], settings: Settings) -> None:
    body = json.dumps({"message": "m", "context": {"x": "y" * settings.max_upload_bytes}})

    response = await client.post("/api/tasks/echo", content=body, headers=JSON)

    assert_error(response, 413)
    assert await job_count(client) == 0


async def test_request_schema_is_the_payload_model_plus_the_options(settings: Settings) -> None:
    (task_type,) = [t for t in TaskRegistry.load(settings.task_types) if t.name == "echo"]
    model = enqueue_model(task_type, (str | None, None))

    assert issubclass(model, EchoPayload)
    assert {"message", "amount_cents", "priority", "run_at", "depends_on", "idempotency_key"} <= set(
        model.model_fields
    )


def test_payload_field_named_like_an_option_is_refused(settings: Settings) -> None:
    class Clashing(EchoPayload):
        priority: int = 0

    registry = TaskRegistry([TaskType("clash", Clashing, echo)])

    with pytest.raises(ConfigurationError, match="priority"):
        task_routes(registry, settings)


def test_upload_field_must_name_a_payload_field() -> None:
    with pytest.raises(ConfigurationError, match="upload_field"):
        TaskType("bad", EchoPayload, echo, upload_field="nope")


class Visit(BaseModel):
    """A payload with a datetime field (no sample task type has one)."""

    at: datetime
    path: str = ""


async def visit(ctx: JobContext, payload: Visit) -> dict[str, Any]:
    return {}


@pytest.fixture
async def visits(tmp_path: Path, template_db: Path) -> AsyncIterator[AsyncTestClient[Litestar]]:
    """A client of an app with two task types whose payload has a datetime: JSON and multipart."""
    copy_template(template_db, tmp_path)
    settings = make_settings(tmp_path)
    registry = TaskRegistry([TaskType("visit", Visit, visit),
                             TaskType("visit_upload", Visit, visit, upload_field="path")])
    async with AsyncTestClient(create_app(settings, runtime=build_runtime(settings, registry=registry))) as c:
        c.headers.update(AUTH)
        yield c


@pytest.mark.parametrize("at", ["1900000000", "0", "2030"])
async def test_a_payload_datetime_is_iso_8601_text_only(visits: AsyncTestClient[Litestar], at: str) -> None:
    """Text of digits was taken as a Unix timestamp, in a JSON body and in a form alike."""
    async def post_json(at: str) -> Any:
        return await visits.post("/api/tasks/visit", json={"at": at})

    async def post_form(at: str) -> Any:
        return await visits.post("/api/tasks/visit-upload", data={"at": at}, files={"file": ("a.csv", b"a")})

    for good in ("2030-01-01T08:00:00Z", "2030-01-01 08:00:00+02:00"):
        assert (await post_json(good)).status_code == 202
        assert (await post_form(good)).status_code == 202
    assert_error(await post_json(at), 400, "at")
    assert_error(await post_form(at), 400, "at")


# -- multipart ---------------------------------------------------------------------------------
def stored_files(settings: Settings) -> list[Path]:
    root = Path(settings.files_dir)
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def files_root(settings: Settings) -> Path:
    return Path(settings.files_dir).resolve()


def file_bytes(path: str) -> bytes:
    return Path(path).read_bytes()


async def upload(client: AsyncTestClient[Litestar], content: bytes = b"a,b\n1,2\n",
                 filename: str = "staff.csv", **fields: str) -> Any:
    data = {"kind": "employees", "tenant_id": "tenant-1", **fields}
    files = {"file": (filename, content, "text/csv")}
    return await client.post("/api/tasks/file-upload", files=files, data=data)


async def test_upload_is_stored_durably_before_the_202(
    client: AsyncTestClient[Litestar], runtime: Runtime, settings: Settings
) -> None:
    response = await upload(client, b"\xef\xbb\xbfh1,h2\r\n1,2\r\n3,4\r\n", tags="import",
                            context='{"by": "admin"}', notes='{"source": "hr"}')

    assert response.status_code == 202, response.text
    job = response.json()
    path = Path(job["payload"]["path"])
    assert file_bytes(job["payload"]["path"]) == b"\xef\xbb\xbfh1,h2\r\n1,2\r\n3,4\r\n"
    assert path.is_relative_to(files_root(settings))
    assert path.name == "staff.csv"
    assert job["payload"]["notes"] == {"source": "hr"}
    assert (job["tags"], job["context"]) == (["import"], {"by": "admin"})
    idle(client, runtime)
    assert (await client.get(response.headers["location"])).json()["result"] == {"lines": 3}


@pytest.mark.parametrize(("tags", "stored"), [
    ("import", ["import"]),
    (["import", "hr"], ["import", "hr"]),  # the field repeated
    ('["import", "hr"]', ["import", "hr"]),  # given once, as JSON text (was one tag)
])
async def test_an_upload_takes_its_list_options_repeated_or_as_json_text(
    client: AsyncTestClient[Litestar], tags: str | list[str], stored: list[str]
) -> None:
    data: dict[str, Any] = {"kind": "employees", "tenant_id": "t", "tags": tags,
                            "depends_on": "[]"}
    files = {"file": ("staff.csv", b"a,b\n", "text/csv")}
    response = await client.post("/api/tasks/file-upload", files=files, data=data)

    assert response.status_code == 202, response.text
    assert (response.json()["tags"], response.json()["depends_on"]) == (stored, [])


async def test_upload_file_name_cannot_escape_the_files_directory(
    client: AsyncTestClient[Litestar], settings: Settings
) -> None:
    response = await upload(client, filename="../../etc/passwd")

    path = Path(response.json()["payload"]["path"])
    assert path.name == "passwd"
    assert path.parent.parent == files_root(settings)


@pytest.mark.parametrize(("fields", "field"), [
    ({"kind": "managers"}, "kind"),
    ({"tenant_id": ""}, "tenant_id"),
    ({"priority": "high"}, "priority"),
    ({"notes": '{"a": 1}'}, "notes.a"),
    ({"queue": "nope"}, "queue"),
    ({"run_at": "0"}, "run_at"),  # was taken as a Unix timestamp: 1970
    # deeper than the JSON decoder follows: its RecursionError was a 500
    ({"context": "[" * 5000 + "]" * 5000}, "context"),
])
async def test_upload_with_a_bad_field_gets_400_and_leaves_no_file(
    client: AsyncTestClient[Litestar], settings: Settings, fields: dict[str, str], field: str
) -> None:
    assert_error(await upload(client, b"a,b\n", **fields), 400, field)
    assert stored_files(settings) == []
    assert await job_count(client) == 0


async def test_upload_refused_by_the_queue_leaves_no_file(
    client: AsyncTestClient[Litestar], settings: Settings
) -> None:
    assert_error(await upload(client, depends_on="no-such-job"), 400, "depends_on")
    assert stored_files(settings) == []


async def test_upload_without_the_file_gets_400(client: AsyncTestClient[Litestar]) -> None:
    response = await client.post("/api/tasks/file-upload", files={"other": ("x.csv", b"x")},
                                 data={"kind": "employees", "tenant_id": "t"})

    assert_error(response, 400, "file")


async def test_upload_over_the_limit_gets_413_and_leaves_no_file(
    client: AsyncTestClient[Litestar], settings: Settings
) -> None:
    just_over = b"x" * (settings.max_upload_bytes + 1)
    far_over = b"x" * (settings.max_upload_bytes * 3)

    assert_error(await upload(client, just_over), 413)  # the file alone is too big
    assert_error(await upload(client, far_over), 413)  # the whole body is too big
    assert stored_files(settings) == []
    assert await job_count(client) == 0


async def test_upload_of_exactly_the_limit_is_accepted(
    client: AsyncTestClient[Litestar], settings: Settings
) -> None:
    assert (await upload(client, b"x" * settings.max_upload_bytes)).status_code == 202


async def test_upload_with_an_existing_idempotency_key_keeps_one_file(
    client: AsyncTestClient[Litestar], settings: Settings
) -> None:
    first = await upload(client, idempotency_key="u-1")
    again = await upload(client, b"other", idempotency_key="u-1")

    assert (first.status_code, again.status_code) == (202, 200)
    assert stored_files(settings) == [Path(first.json()["payload"]["path"])]


async def test_upload_form_with_a_bad_charset_gets_400(client: AsyncTestClient[Litestar]) -> None:
    boundary = "XyZ"
    part = f"--{boundary}\r\nContent-Disposition: form-data; name="
    body = (
        f'{part}"kind"\r\n\r\n'.encode() + b"\xff\xfe\r\n"
        + f'{part}"file"; filename="a.csv"\r\n\r\n'.encode() + b"a\r\n"
        + f"--{boundary}--\r\n".encode()
    )
    response = await client.post("/api/tasks/file-upload", content=body,
                                 headers={"content-type": f"multipart/form-data; boundary={boundary}"})

    assert_error(response, 400)


@pytest.mark.parametrize("charset", [
    "nope",  # no such codec: LookupError
    "base64",  # a codec, but not of text: LookupError
    "undefined",  # a text codec that refuses everything: UnicodeError
])
async def test_upload_form_part_with_a_charset_that_decodes_no_text_gets_400(
    client: AsyncTestClient[Litestar], settings: Settings, charset: str
) -> None:
    boundary = "XyZ"
    part = f"--{boundary}\r\nContent-Disposition: form-data; name="
    body = (
        f'{part}"kind"\r\n\r\nemployees\r\n'
        f'{part}"tenant_id"\r\nContent-Type: text/plain; charset={charset}\r\n\r\nt\r\n'
        f'{part}"file"; filename="a.csv"\r\nContent-Type: text/csv\r\n\r\na\r\n'
        f"--{boundary}--\r\n"
    ).encode()
    response = await client.post("/api/tasks/file-upload", content=body,
                                 headers={"content-type": f"multipart/form-data; boundary={boundary}"})

    assert_error(response, 400)
    assert response.json()["detail"].startswith("the form could not be decoded")
    assert stored_files(settings) == []
    assert await job_count(client) == 0


async def test_a_refused_form_does_not_leave_its_spooled_file_open(tmp_path: Path, template_db: Path) -> None:
    """A file over 1 MB is spooled to disk while the form is parsed; when the form then fails
    validation the handler never sees it. Litestar closes it (an open file would surface as a
    ResourceWarning, an error under this suite's filterwarnings): this keeps that checked."""
    copy_template(template_db, tmp_path)
    app = create_app(make_settings(tmp_path, max_upload_bytes=3_000_000))
    async with AsyncTestClient(app) as big:
        big.headers.update(AUTH)

        response = await upload(big, b"x" * 1_500_000, kind="managers")

        assert_error(response, 400, "kind")
    gc.collect()

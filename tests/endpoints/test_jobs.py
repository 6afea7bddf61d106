"""Tests for endpoints/jobs.py: get, list (filters, cursor pages), retry-failed, rerun, cancel and
the timeline, with their 404 and 409 answers."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import pytest

from carwash_jobs.store.base import NOT_A_CURSOR
from endpoints.jobs import LIST_PARAMS, REPEATED_PROBLEM
from tests.endpoints.conftest import assert_error, idle

if TYPE_CHECKING:
    from litestar import Litestar
    from litestar.testing import AsyncTestClient

    from carwash_jobs.runtime import Runtime

async def enqueue(client: AsyncTestClient[Litestar], slug: str = "echo", **body: Any) -> dict[str, Any]:
    if slug == "echo":
        body.setdefault("message", "m")
    response = await client.post(f"/api/tasks/{slug}", json=body)
    assert response.status_code == 202, response.text
    job: dict[str, Any] = response.json()
    return job


async def get(client: AsyncTestClient[Litestar], job_id: str) -> dict[str, Any]:
    response = await client.get(f"/api/jobs/{job_id}")
    assert response.status_code == 200
    job: dict[str, Any] = response.json()
    return job


async def wait_for_status(client: AsyncTestClient[Litestar], job_id: str, status: str) -> None:
    """Poll the API, as a client does, until the job reaches `status` (no engine event says
    "a handler started", and the app runs on another loop)."""
    async with asyncio.timeout(5):
        while (await get(client, job_id))["status"] != status:  # noqa: ASYNC110 - polling HTTP
            await asyncio.sleep(0.01)


# -- get ---------------------------------------------------------------------------------------
async def test_get_answers_the_job(client: AsyncTestClient[Litestar]) -> None:
    job = await enqueue(client, tags=["x"], delay_seconds=600)  # stays put: no worker races the read

    assert await get(client, job["id"]) == job


async def test_get_unknown_job_is_404(client: AsyncTestClient[Litestar]) -> None:
    body = assert_error(await client.get("/api/jobs/no-such-job"), 404)

    assert body["extra"] == {"job_id": "no-such-job"}


@pytest.mark.parametrize(("method", "path"), [
    ("GET", ""), ("GET", "/events"), ("POST", "/cancel"), ("POST", "/rerun"),
])
async def test_an_id_longer_than_any_jobs_is_an_unknown_job(
    client: AsyncTestClient[Litestar], method: str, path: str
) -> None:
    """API.md: 404 for an unknown job id (it was a 400 past 100 characters)."""
    assert_error(await client.request(method, f"/api/jobs/{'x' * 101}{path}"), 404)


# -- list --------------------------------------------------------------------------------------
async def test_list_is_newest_first_in_cursor_pages(client: AsyncTestClient[Litestar]) -> None:
    ids = [(await enqueue(client, delay_seconds=600))["id"] for _ in range(5)]

    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        page = (await client.get("/api/jobs", params=params)).json()
        seen += [job["id"] for job in page["items"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break

    assert seen == list(reversed(ids))
    assert pages == 3


async def test_list_filters_are_anded(client: AsyncTestClient[Litestar], runtime: Runtime) -> None:
    tagged = await enqueue(client, tags=["vip"], queue="critical", delay_seconds=600)
    await enqueue(client, tags=["vip"], delay_seconds=600)
    await enqueue(client, "fail", tags=["vip"])
    idle(client, runtime)

    async def ids(**params: Any) -> list[str]:
        response = await client.get("/api/jobs", params=params)
        assert response.status_code == 200, response.text
        return [job["id"] for job in response.json()["items"]]

    assert await ids(tag="vip", queue="critical") == [tagged["id"]]
    assert len(await ids(tag="vip", task_type="echo")) == 2
    assert len(await ids(status="failed")) == 1
    assert len(await ids(status="scheduled", tag="vip")) == 2
    assert await ids(tag="nobody") == []
    created = datetime.fromisoformat(tagged["created_at"])
    just_before = (created - timedelta(microseconds=1)).isoformat()
    assert tagged["id"] in await ids(created_after=just_before)
    assert await ids(created_before=just_before) == []
    future = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    assert await ids(created_after=future) == []


@pytest.mark.parametrize(("params", "field"), [
    ({"limit": 501}, "limit"),
    ({"limit": 0}, "limit"),
    ({"status": "sleeping"}, "status"),
    ({"created_after": "2030-01-01T00:00:00"}, "created_after"),
    ({"created_before": "yesterday"}, "created_before"),
    ({"created_after": "1700000000"}, "created_after"),
    # a cursor is the id of a page's last job; read as a position, any other text restarted
    # the list (a client following next_cursor looped) or ended it at once
    ({"cursor": "garbage"}, "cursor"),
    ({"cursor": "\x00"}, "cursor"),
    ({"cursor": "0" * 31}, "cursor"),
    ({"cursor": "F" * 32}, "cursor"),
    ({"cursor": "0" * 32 + "\n"}, "cursor"),  # the pattern's $ matches before a last newline
    ({"cursor": "garbage", "tag": "vip"}, "cursor"),
    ({"cursor": "garbage", "created_after": "2020-01-01T00:00:00Z"}, "cursor"),
    # a range that holds nothing: swapped ends read as "no such jobs"
    ({"created_after": "2030-01-02T00:00:00Z", "created_before": "2030-01-01T00:00:00Z"}, "created_before"),
    ({"created_after": "2030-01-01T01:00:00+01:00", "created_before": "2030-01-01T00:00:00Z"},
     "created_before"),
])
async def test_list_with_bad_parameters_gets_400(
    client: AsyncTestClient[Litestar], params: dict[str, Any], field: str
) -> None:
    assert_error(await client.get("/api/jobs", params=params), 400, field)


#: the shape of an id, but no job's: an id starts with its creation millisecond, and 0xffffffffffff
#: ms is past the year 9999, the last a datetime holds
IMPOSSIBLE_CURSOR = "f" * 32
#: the id of a job made in the last millisecond a datetime holds: unlikely, but a position
LAST_POSSIBLE_CURSOR = "e677d21fdbff" + "f" * 20
#: each of the list's listings: in id order (with and without a tag) and by creation time
LISTINGS = [{}, {"tag": "vip"}, {"created_after": "2020-01-01T00:00:00Z"},
            {"created_before": "2030-01-01T00:00:00Z"}]
LISTING_IDS = ["by-id", "by-id-tagged", "created-after", "created-before"]


@pytest.mark.parametrize("params", LISTINGS, ids=LISTING_IDS)
async def test_a_cursor_no_job_id_can_be_gets_400_from_every_listing(
    client: AsyncTestClient[Litestar], params: dict[str, str]
) -> None:
    """One verdict for one cursor: the listings by creation time refused it naming a body field,
    and those in id order read it as a position past every job and answered the first page."""
    await enqueue(client, tags=["vip"], delay_seconds=600)

    body = assert_error(await client.get("/api/jobs", params={**params, "cursor": IMPOSSIBLE_CURSOR}), 400)

    assert body["extra"] == [{"key": "cursor", "message": f"cursor is {NOT_A_CURSOR}", "source": "query"}]


@pytest.mark.parametrize("params", LISTINGS, ids=LISTING_IDS)
async def test_a_cursor_at_the_last_possible_millisecond_is_a_position(
    client: AsyncTestClient[Litestar], params: dict[str, str]
) -> None:
    job = await enqueue(client, tags=["vip"], delay_seconds=600)

    response = await client.get("/api/jobs", params={**params, "cursor": LAST_POSSIBLE_CURSOR})

    assert response.status_code == 200, response.text
    assert [item["id"] for item in response.json()["items"]] == [job["id"]]


#: two values of each list parameter, each accepted alone
TWO_VALUES = {
    "status": ("queued", "failed"), "task_type": ("echo", "fail"), "tag": ("a", "b"),
    "queue": ("default", "critical"), "limit": ("1", "2"),
    "created_after": ("2020-01-01T00:00:00Z", "2021-01-01T00:00:00Z"),
    "created_before": ("2030-01-01T00:00:00Z", "2031-01-01T00:00:00Z"),
    "cursor": ("0" * 32, "1" * 32),
}


def test_the_repeat_check_covers_every_list_parameter(app: Litestar) -> None:
    """LIST_PARAMS, what the repeat check covers, names each query parameter the route takes."""
    schema = app.openapi_schema.to_schema()
    parameters = schema["paths"]["/api/jobs"]["get"]["parameters"]

    assert {p["name"] for p in parameters if p["in"] == "query"} == set(LIST_PARAMS) == set(TWO_VALUES)


@pytest.mark.parametrize("name", LIST_PARAMS)
@pytest.mark.parametrize("same", [False, True], ids=["different", "identical"])
async def test_a_repeated_list_parameter_gets_400_naming_it(
    client: AsyncTestClient[Litestar], name: str, same: bool
) -> None:
    """A repeat was read as its last value: status=queued&status=failed listed the failed jobs
    only. An identical repeat too, to keep the rule simple."""
    first, second = TWO_VALUES[name]
    assert (await client.get("/api/jobs", params={name: first})).status_code == 200  # alone, accepted

    response = await client.get("/api/jobs", params=[(name, first), (name, first if same else second)])

    body = assert_error(response, 400)
    assert body["extra"] == [{"key": name, "message": f"{name} {REPEATED_PROBLEM}", "source": "query"}]


# -- retry-failed ----------------------------------------------------------------------------------
async def test_retry_failed_requeues_only_failed_jobs(
    client: AsyncTestClient[Litestar], runtime: Runtime
) -> None:
    failed = await enqueue(client, "fail")
    completed = await enqueue(client)
    idle(client, runtime)
    assert (await get(client, failed["id"]))["status"] == "failed"

    response = await client.post("/api/jobs/retry-failed")

    assert response.status_code == 200
    assert response.json() == {"retried": 1, "ids": [failed["id"]]}
    idle(client, runtime)
    events = [e["event"] for e in (await client.get(f"/api/jobs/{failed['id']}/events")).json()["items"]]
    assert events.count("claimed") == 2  # it ran again
    assert (await get(client, completed["id"]))["attempts"] == 1


async def test_retry_failed_filters(client: AsyncTestClient[Litestar], runtime: Runtime) -> None:
    one = await enqueue(client, "fail")
    two = await enqueue(client, "fail")
    idle(client, runtime)
    finished = datetime.fromisoformat((await get(client, two["id"]))["finished_at"])
    later = (finished + timedelta(seconds=1)).isoformat()

    assert (await client.post("/api/jobs/retry-failed", json={"task_type": "echo"})).json()["retried"] == 0
    assert (await client.post("/api/jobs/retry-failed", json={"failed_after": later})).json()["retried"] == 0
    assert (await client.post("/api/jobs/retry-failed", json={"ids": [one["id"]]})).json() == {
        "retried": 1, "ids": [one["id"]],
    }
    idle(client, runtime)  # `one` ran and failed again
    retried = (await client.post("/api/jobs/retry-failed", json={})).json()
    assert sorted(retried["ids"]) == sorted([one["id"], two["id"]])


@pytest.mark.parametrize(("body", "field"), [
    ({"ids": "x"}, "ids"),
    ({"failed_after": "2030-01-01T00:00:00"}, "failed_after"),
    ({"failed_before": 0}, "failed_before"),
    # text of digits was taken as a Unix timestamp: "2030" is 1970, so every failed job matched
    ({"failed_after": "2030"}, "failed_after"),
    ({"failed_before": "1900000000"}, "failed_before"),
    # a misspelt filter, ignored, would have retried every failed job
    ({"idz": ["x"]}, "idz"),
    ({"task_type": "echo", "failed_since": "2030-01-01T00:00:00Z"}, "failed_since"),
    # swapped ends: "nothing to retry" would hide the mistake
    ({"failed_after": "2030-01-02T00:00:00Z", "failed_before": "2030-01-01T00:00:00Z"}, "failed_before"),
])
async def test_retry_failed_with_a_bad_body_gets_400(
    client: AsyncTestClient[Litestar], body: dict[str, Any], field: str
) -> None:
    assert_error(await client.post("/api/jobs/retry-failed", json=body), 400, field)


# -- rerun -------------------------------------------------------------------------------------
async def test_rerun_clones_a_finished_job(client: AsyncTestClient[Litestar], runtime: Runtime) -> None:
    source = await enqueue(client, message="again", priority=3, tags=["t"])
    idle(client, runtime)

    response = await client.post(f"/api/jobs/{source['id']}/rerun")

    assert response.status_code == 202
    clone = response.json()
    assert response.headers["location"] == f"/api/jobs/{clone['id']}"
    assert clone["id"] != source["id"]
    assert clone["rerun_of"] == source["id"]
    assert (clone["payload"], clone["priority"], clone["tags"]) == (source["payload"], 3, ["t"])


async def test_rerun_of_an_unfinished_job_is_409(client: AsyncTestClient[Litestar]) -> None:
    job = await enqueue(client, delay_seconds=600)

    body = assert_error(await client.post(f"/api/jobs/{job['id']}/rerun"), 409)

    assert body["extra"]["status"] == "scheduled"


async def test_rerun_of_an_unknown_job_is_404(client: AsyncTestClient[Litestar]) -> None:
    assert_error(await client.post("/api/jobs/nope/rerun"), 404)


# -- cancel -------------------------------------------------------------------------------------
async def test_cancel_a_waiting_job(client: AsyncTestClient[Litestar]) -> None:
    job = await enqueue(client, delay_seconds=600)

    response = await client.post(f"/api/jobs/{job['id']}/cancel")

    assert response.status_code == 200
    assert response.json()["status"] == "cancelled"
    assert (await get(client, job["id"]))["status"] == "cancelled"


async def test_cancel_a_running_job_stops_it(client: AsyncTestClient[Litestar], runtime: Runtime) -> None:
    job = await enqueue(client, "slow", seconds=5)
    await wait_for_status(client, job["id"], "running")

    response = await client.post(f"/api/jobs/{job['id']}/cancel")

    assert response.json()["status"] == "cancelled"
    idle(client, runtime)  # returns at once: the handler was stopped, not left to sleep 5 s
    assert (await get(client, job["id"]))["status"] == "cancelled"


async def test_cancel_a_finished_job_is_409(client: AsyncTestClient[Litestar], runtime: Runtime) -> None:
    job = await enqueue(client)
    idle(client, runtime)

    body = assert_error(await client.post(f"/api/jobs/{job['id']}/cancel"), 409)

    assert body["extra"] == {"job_id": job["id"], "status": "completed", "action": "cancel"}
    assert (await get(client, job["id"]))["status"] == "completed"


async def test_cancel_an_unknown_job_is_404(client: AsyncTestClient[Litestar]) -> None:
    assert_error(await client.post("/api/jobs/nope/cancel"), 404)


# -- events ------------------------------------------------------------------------------------
async def test_events_are_the_timeline_oldest_first(
    client: AsyncTestClient[Litestar], runtime: Runtime
) -> None:
    job = await enqueue(client)
    idle(client, runtime)

    response = await client.get(f"/api/jobs/{job['id']}/events")

    assert response.status_code == 200
    items = response.json()["items"]
    assert [e["event"] for e in items] == ["enqueued", "claimed", "completed"]
    assert [e["status"] for e in items] == ["queued", "running", "completed"]
    assert set(items[0]) == {"at", "event", "status", "attempt", "process", "message"}
    assert [e["at"] for e in items] == sorted(e["at"] for e in items)


async def test_events_of_an_unknown_job_is_404(client: AsyncTestClient[Litestar]) -> None:
    assert_error(await client.get("/api/jobs/nope/events"), 404)

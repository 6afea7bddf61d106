"""The dashboard (endpoints/ui.py) over the ASGI app: the login and its cookie, a redirect for
every page without a session, refusal of forged actions, and what the pages show and do."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import pytest
from litestar.testing import AsyncTestClient

from carwash_jobs.app import create_app
from carwash_jobs.store.base import MinuteCount
from endpoints.jobs import LIST_PARAMS
from endpoints.ui import build_chart
from endpoints.ui_auth import SESSION_COOKIE, SessionSigner
from tests.endpoints.conftest import AUTH, TOKEN, copy_template, idle, make_settings

if TYPE_CHECKING:
    from pathlib import Path

    from litestar import Litestar

    from carwash_jobs.runtime import Runtime

PAGES = ["/ui", "/ui/jobs", "/ui/jobs?status=failed", "/ui/jobs/0123", "/ui/partials/overview",
         "/ui/partials/jobs", "/ui/partials/jobs/0123"]
CSRF = re.compile(r'name="csrf_token" value="([0-9a-f]+)"')


@pytest.fixture
def anon(anonymous: AsyncTestClient[Litestar]) -> AsyncTestClient[Litestar]:
    """The app's client without the bearer token, and seeing each redirect itself."""
    anonymous.follow_redirects = False
    return anonymous


@pytest.fixture
async def browser(anon: AsyncTestClient[Litestar]) -> AsyncTestClient[Litestar]:
    """The app's client as a browser: no bearer token, a session cookie after logging in."""
    client = anon
    response = await client.post("/ui/login", data={"token": TOKEN, "next": "/ui"})
    assert response.status_code == 303, response.text
    return client


async def enqueue(client: AsyncTestClient[Litestar], slug: str, body: dict[str, Any]) -> str:
    response = await client.post(f"/api/tasks/{slug}", json=body, headers=AUTH)
    assert response.status_code == 202, response.text
    job_id: str = response.json()["id"]
    return job_id


async def status_of(client: AsyncTestClient[Litestar], job_id: str) -> str:
    response = await client.get(f"/api/jobs/{job_id}", headers=AUTH)
    status: str = response.json()["status"]
    return status


async def csrf_of(client: AsyncTestClient[Litestar], path: str = "/ui") -> str:
    match = CSRF.search((await client.get(path)).text)
    assert match is not None
    return match.group(1)


# -- sessions -------------------------------------------------------------------------------
@pytest.mark.parametrize("path", PAGES)
async def test_every_page_redirects_to_the_login_without_a_session(
    anon: AsyncTestClient[Litestar], path: str
) -> None:
    response = await anon.get(path)

    assert response.status_code == 303
    assert response.headers["location"].startswith("/ui/login?next=")


async def test_a_page_sends_back_to_where_it_was_after_the_login(
    anon: AsyncTestClient[Litestar],
) -> None:
    first = await anon.get("/ui/jobs?status=failed")
    login_page = await anon.get(first.headers["location"])
    assert 'value="/ui/jobs?status=failed"' in login_page.text

    response = await anon.post("/ui/login", data={"token": TOKEN, "next": "/ui/jobs?status=failed"})

    assert response.status_code == 303
    assert response.headers["location"] == "/ui/jobs?status=failed"


async def test_the_login_sets_a_signed_httponly_strict_cookie(anon: AsyncTestClient[Litestar]) -> None:
    response = await anon.post("/ui/login", data={"token": TOKEN})

    cookie = response.headers["set-cookie"]
    assert cookie.startswith(f"{SESSION_COOKIE}=v1.")
    assert "HttpOnly" in cookie
    assert "samesite=strict" in cookie.lower()
    assert "Path=/ui" in cookie
    assert TOKEN not in cookie
    assert (await anon.get("/ui")).status_code == 200


async def test_a_wrong_token_gets_the_form_again_and_no_cookie(anon: AsyncTestClient[Litestar]) -> None:
    response = await anon.post("/ui/login", data={"token": "guess"})

    assert response.status_code == 401
    assert "set-cookie" not in response.headers
    assert "not the API token" in response.text


@pytest.mark.parametrize("target", ["//evil.example/ui", "https://evil.example", "/api/jobs", "/ui\\..\\x"])
async def test_the_login_never_sends_anyone_off_the_dashboard(
    anon: AsyncTestClient[Litestar], target: str
) -> None:
    response = await anon.post("/ui/login", data={"token": TOKEN, "next": target})

    assert response.headers["location"] == "/ui"


@pytest.mark.parametrize(
    "cookie",
    ["", "v1.9999999999.abc.def", "garbage",
     # signed with another token
     SessionSigner("another-token").issue()[0],
     # signed right, but expired
     SessionSigner(TOKEN, clock=lambda: 1_000_000.0).issue()[0]],
)
async def test_a_forged_or_expired_cookie_is_no_session(
    anon: AsyncTestClient[Litestar], cookie: str
) -> None:
    anon.cookies.set(SESSION_COOKIE, cookie)

    response = await anon.get("/ui")

    assert response.status_code == 303


async def test_logging_out_ends_the_session(browser: AsyncTestClient[Litestar]) -> None:
    token = await csrf_of(browser)

    response = await browser.post("/ui/logout", data={"csrf_token": token})

    assert response.status_code == 303
    assert (await browser.get("/ui")).status_code == 303


async def test_pages_are_not_cached_framed_or_open_to_foreign_scripts(
    browser: AsyncTestClient[Litestar]
) -> None:
    response = await browser.get("/ui")

    assert response.headers["cache-control"] == "no-store"
    assert "default-src 'self'" in response.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
    assert response.headers["x-frame-options"] == "DENY"


async def test_the_static_files_are_served(anon: AsyncTestClient[Litestar]) -> None:
    script = await anon.get("/ui/static/ui.js")
    style = await anon.get("/ui/static/ui.css")

    assert script.status_code == 200
    assert "data-refresh" in script.text
    assert style.status_code == 200


# -- forged actions ---------------------------------------------------------------------------
@pytest.fixture
async def failed_job(browser: AsyncTestClient[Litestar], runtime: Runtime) -> str:
    job_id = await enqueue(browser, "fail", {"reason": "the POS database is down"})
    idle(browser, runtime)
    assert await status_of(browser, job_id) == "failed"
    return job_id


@pytest.mark.parametrize("action", ["retry", "rerun", "cancel"])
@pytest.mark.parametrize("csrf", [None, "", "0" * 64])
async def test_an_action_without_the_right_csrf_token_is_refused(
    browser: AsyncTestClient[Litestar], failed_job: str, action: str, csrf: str | None
) -> None:
    data = {} if csrf is None else {"csrf_token": csrf}

    response = await browser.post(f"/ui/jobs/{failed_job}/{action}", data=data)

    assert response.status_code == 403
    assert await status_of(browser, failed_job) == "failed"
    assert len((await browser.get("/api/jobs", headers=AUTH)).json()["items"]) == 1


async def test_an_action_without_a_session_is_refused(
    browser: AsyncTestClient[Litestar], failed_job: str
) -> None:
    token = await csrf_of(browser)
    browser.cookies.clear()

    response = await browser.post(f"/ui/jobs/{failed_job}/retry", data={"csrf_token": token})
    bulk = await browser.post("/ui/jobs/retry-failed", data={"csrf_token": token})

    assert response.status_code == 303
    assert response.headers["location"].startswith("/ui/login")
    assert bulk.status_code == 303
    assert await status_of(browser, failed_job) == "failed"


async def test_the_csrf_token_of_another_session_is_refused(
    browser: AsyncTestClient[Litestar], failed_job: str
) -> None:
    stolen = await csrf_of(browser)
    await browser.post("/ui/login", data={"token": TOKEN})  # a new session, a new token

    response = await browser.post(f"/ui/jobs/{failed_job}/retry", data={"csrf_token": stolen})

    assert response.status_code == 403
    assert await status_of(browser, failed_job) == "failed"


async def test_the_bearer_token_alone_opens_no_page(anon: AsyncTestClient[Litestar]) -> None:
    response = await anon.get("/ui", headers=AUTH)

    assert response.status_code == 303


# -- what the pages show and do ---------------------------------------------------------------
async def test_the_overview_counts_jobs_by_status_and_task_type(
    browser: AsyncTestClient[Litestar], runtime: Runtime
) -> None:
    await enqueue(browser, "fail", {})
    await enqueue(browser, "echo", {"message": "hi"})
    await enqueue(browser, "echo", {"message": "ho"})
    idle(browser, runtime)

    page = (await browser.get("/ui")).text

    assert re.search(r'data-status="completed">2<', page)
    assert re.search(r'data-status="failed">1<', page)
    assert 'href="/ui/jobs?task_type=echo&amp;status=completed">2</a>' in page
    assert "2 completed, 1 failed" in page  # the chart of the last hour
    assert runtime.owner in page  # the live processes


async def test_the_list_filters_like_the_api(browser: AsyncTestClient[Litestar], runtime: Runtime) -> None:
    failed = await enqueue(browser, "fail", {})
    done = await enqueue(browser, "echo", {"message": "hi"})
    idle(browser, runtime)

    only_failed = (await browser.get("/ui/jobs", params={"status": "failed"})).text
    only_echo = (await browser.get("/ui/partials/jobs", params={"task_type": "echo"})).text

    assert failed in only_failed
    assert done not in only_failed
    assert done in only_echo
    assert failed not in only_echo
    assert 'data-refresh="/ui/partials/jobs?status=failed"' in only_failed


async def test_the_list_pages_with_its_cursor(browser: AsyncTestClient[Litestar]) -> None:
    ids = [await enqueue(browser, "echo", {"message": str(i), "run_at": "2099-01-01T00:00:00Z"} | {})
           for i in range(30)]

    first = (await browser.get("/ui/jobs", params={"limit": 25})).text
    older = re.search(r'href="(/ui/jobs\?[^"]*cursor=[^"]+)" rel="next"', first)
    assert older is not None
    second = (await browser.get(older.group(1).replace("&amp;", "&"))).text

    assert ids[-1] in first
    assert ids[0] not in first
    assert ids[0] in second
    assert ids[-1] not in second
    assert "data-refresh" not in second.split("<table")[1]  # only the first page refreshes itself


@pytest.mark.parametrize(
    ("params", "named"),
    [({"status": "exploded"}, "status"), ({"created_after": "yesterday"}, "created_after"),
     ({"limit": "7"}, "limit"), ({"cursor": "../../etc"}, "cursor"),
     # digits to str.isdigit() that int() refuses, or takes only slowly: each was a 500
     ({"limit": "\u00b2"}, "limit"), ({"limit": "9" * 5000}, "limit"),
     ({"cursor": "garbage"}, "cursor"),
     ({"created_after": "2030-01-02", "created_before": "2030-01-01"}, "created_before")],
)
async def test_a_bad_filter_is_a_400_naming_it(
    browser: AsyncTestClient[Litestar], params: dict[str, str], named: str
) -> None:
    response = await browser.get("/ui/jobs", params=params)

    assert response.status_code == 400
    assert f"{named}:" in response.text


@pytest.mark.parametrize("params", [{}, {"created_after": "2020-01-01T00:00:00Z"}], ids=["by-id", "by-time"])
async def test_a_cursor_no_job_id_can_be_is_a_400_page_on_every_listing(
    browser: AsyncTestClient[Litestar], params: dict[str, str]
) -> None:
    """Its first 48 bits, the creation millisecond, lie past the year 9999: the list in id order
    showed its first page, the list by creation time answered with the API's JSON error."""
    response = await browser.get("/ui/jobs", params={**params, "cursor": "f" * 32})

    assert response.status_code == 400
    assert response.headers["content-type"].startswith("text/html")
    assert "cursor:" in response.text


@pytest.mark.parametrize("name", LIST_PARAMS)
async def test_a_repeated_filter_is_a_400_naming_it(browser: AsyncTestClient[Litestar], name: str) -> None:
    """A repeat was read as its last value, as by the API (tests/endpoints/test_jobs.py)."""
    value = {"limit": "25", "created_after": "2020-01-01", "created_before": "2030-01-01",
             "cursor": "0" * 32, "status": "failed"}.get(name, "x")
    assert (await browser.get("/ui/jobs", params={name: value})).status_code == 200  # alone, accepted

    response = await browser.get("/ui/jobs", params=[(name, value), (name, value)])

    assert response.status_code == 400
    assert f"{name}: given more than once" in response.text


@pytest.mark.parametrize(("path", "named"), [
    ("/ui/jobs?tag=a%00", "tag"), ("/ui/partials/jobs?task_type=%00", "task_type"),
    ("/ui/jobs/%00", "job_id"),
])
async def test_nul_in_a_filter_or_a_job_id_is_a_400_naming_it(
    browser: AsyncTestClient[Litestar], path: str, named: str
) -> None:
    """PostgreSQL text cannot hold NUL: looking it up was a 500 there (endpoints/text.py)."""
    response = await browser.get(path)

    assert response.status_code == 400
    assert [item["key"] for item in response.json()["extra"]] == [named]


async def test_a_visitor_without_a_session_goes_to_the_login_page_whatever_the_address_holds(
    anon: AsyncTestClient[Litestar],
) -> None:
    """The NUL check runs once the session is known: as a guard it ran first, and answered a
    visitor who was not logged in with a 400."""
    plain = await anon.get("/ui/jobs?tag=a", follow_redirects=False)
    nul = await anon.get("/ui/jobs?tag=a%00", follow_redirects=False)

    assert plain.status_code == nul.status_code == 303
    assert nul.headers["location"].startswith("/ui/login")


async def test_the_job_page_shows_payload_error_traceback_attempts_and_timeline(
    browser: AsyncTestClient[Litestar], failed_job: str
) -> None:
    page = (await browser.get(f"/ui/jobs/{failed_job}")).text

    assert "the POS database is down" in page
    assert "Traceback" in page
    assert "PermanentError" in page
    assert "<strong>enqueued</strong>" in page
    assert "<strong>claimed</strong>" in page
    assert "<strong>failed</strong>" in page
    assert 'action="/ui/jobs/' + failed_job + '/retry"' in page
    assert "data-confirm=" in page
    assert "data-final" in page  # it has ended: the live refresh stops


async def test_a_retried_count_that_is_no_plain_number_is_left_out(
    browser: AsyncTestClient[Litestar],
) -> None:
    for retried in ("\u00b2", "9" * 5000):  # each was a 500
        response = await browser.get("/ui/jobs", params={"retried": retried})
        assert response.status_code == 200


async def test_a_tag_link_names_exactly_that_tag(
    browser: AsyncTestClient[Litestar], runtime: Runtime
) -> None:
    """Written into the link as it was, `a&status=failed` linked to the tag `a` of failed
    jobs, and `50%` to no page at all."""
    job_id = await enqueue(browser, "echo", {"message": "m", "tags": ["a&status=failed", "50%"]})

    page = (await browser.get(f"/ui/jobs/{job_id}")).text

    assert 'href="/ui/jobs?tag=a%26status%3Dfailed"' in page
    assert 'href="/ui/jobs?tag=50%25"' in page


async def test_an_unknown_job_is_a_404_page(browser: AsyncTestClient[Litestar]) -> None:
    response = await browser.get("/ui/jobs/nosuchjob")

    assert response.status_code == 404
    assert "No job" in response.text


async def test_retry_puts_a_failed_job_back_in_the_queue(
    browser: AsyncTestClient[Litestar], runtime: Runtime, failed_job: str
) -> None:
    token = await csrf_of(browser, f"/ui/jobs/{failed_job}")

    response = await browser.post(f"/ui/jobs/{failed_job}/retry", data={"csrf_token": token})

    assert response.status_code == 303
    assert response.headers["location"] == f"/ui/jobs/{failed_job}?notice=retried"
    idle(browser, runtime)
    events = (await browser.get(f"/api/jobs/{failed_job}/events", headers=AUTH)).json()
    assert "retried" in [e["event"] for e in events["items"]]
    page = (await browser.get(response.headers["location"])).text
    assert "queued again with fresh attempts" in page


async def test_retry_of_a_job_that_is_not_failed_says_so(
    browser: AsyncTestClient[Litestar], runtime: Runtime
) -> None:
    job_id = await enqueue(browser, "echo", {"message": "fine"})
    idle(browser, runtime)
    token = await csrf_of(browser)

    response = await browser.post(f"/ui/jobs/{job_id}/retry", data={"csrf_token": token})

    assert response.headers["location"].endswith("notice=not_failed")
    assert await status_of(browser, job_id) == "completed"


async def test_rerun_links_the_new_job_to_the_old_one(
    browser: AsyncTestClient[Litestar], failed_job: str
) -> None:
    token = await csrf_of(browser)

    response = await browser.post(f"/ui/jobs/{failed_job}/rerun", data={"csrf_token": token})

    new_id = response.headers["location"].split("/ui/jobs/")[1].split("?")[0]
    assert new_id != failed_job
    page = (await browser.get(f"/ui/jobs/{new_id}")).text
    assert f'href="/ui/jobs/{failed_job}"' in page
    assert "Rerun of" in page


async def test_cancel_of_a_waiting_job_and_of_an_ended_one(
    browser: AsyncTestClient[Litestar], failed_job: str
) -> None:
    later = await enqueue(browser, "echo", {"message": "later", "delay_seconds": 3600})
    token = await csrf_of(browser)

    cancelled = await browser.post(f"/ui/jobs/{later}/cancel", data={"csrf_token": token})
    refused = await browser.post(f"/ui/jobs/{failed_job}/cancel", data={"csrf_token": token})

    assert cancelled.headers["location"].endswith("notice=cancelled")
    assert await status_of(browser, later) == "cancelled"
    assert refused.headers["location"].endswith("notice=conflict")
    assert await status_of(browser, failed_job) == "failed"


async def test_bulk_retry_retries_the_failed_jobs_of_the_filter(
    browser: AsyncTestClient[Litestar], runtime: Runtime
) -> None:
    ids = [await enqueue(browser, "fail", {}) for _ in range(3)]
    idle(browser, runtime)
    token = await csrf_of(browser, "/ui/jobs?status=failed&task_type=fail")

    response = await browser.post(
        "/ui/jobs/retry-failed", data={"csrf_token": token, "task_type": "fail"}
    )

    assert response.status_code == 303
    assert "retried=3" in response.headers["location"]
    for job_id in ids:
        events = await browser.get(f"/api/jobs/{job_id}/events", headers=AUTH)
        assert "retried" in [e["event"] for e in events.json()["items"]]
    page = (await browser.get(response.headers["location"])).text
    assert "3 failed jobs retried." in page


@pytest.mark.parametrize(("form", "problem"), [
    ({"failed_after": "2000-01-02", "failed_before": "2000-01-01"},
     "failed_before: must be later than failed_after"),
    ({"task_type": "fail\x00"}, "task_type: must not contain U+0000"),
], ids=["swapped times", "nul in the task type"])
async def test_a_bad_bulk_retry_is_a_400_and_retries_nothing(
    browser: AsyncTestClient[Litestar], runtime: Runtime, form: dict[str, str], problem: str
) -> None:
    job_id = await enqueue(browser, "fail", {})
    idle(browser, runtime)
    token = await csrf_of(browser, "/ui/jobs?status=failed")

    response = await browser.post("/ui/jobs/retry-failed", data={"csrf_token": token, **form})

    assert response.status_code == 400
    assert problem in response.text
    assert await status_of(browser, job_id) == "failed"


async def test_follow_ups_named_in_the_result_are_linked(
    browser: AsyncTestClient[Litestar], runtime: Runtime
) -> None:
    other = await enqueue(browser, "echo", {"message": "child"})
    parent = await enqueue(browser, "echo", {"message": other})  # echo's result repeats its payload
    idle(browser, runtime)

    page = (await browser.get(f"/ui/jobs/{parent}")).text

    assert f'Follow-up <a class="mono" href="/ui/jobs/{other}">' in page


# -- the chart --------------------------------------------------------------------------------
def test_the_chart_stacks_failed_on_completed_per_minute_and_draws_the_failure_rate() -> None:
    now = datetime(2030, 1, 1, 12, 30, 20, tzinfo=UTC)
    minute = now.replace(second=0)
    rows = [MinuteCount(minute, "completed", 3), MinuteCount(minute, "failed", 1),
            MinuteCount(minute - timedelta(minutes=10), "completed", 4),
            MinuteCount(minute - timedelta(minutes=90), "failed", 50)]  # outside the hour

    chart = build_chart(rows, now)

    assert (chart.completed, chart.failed, chart.max_per_minute) == (7, 1, 4)
    last = chart.bars[-1]
    assert last.completed_h == 90.0
    assert last.failed_h == 30.0
    assert last.failed_y == 0.0
    assert chart.rate_dots == [(495.0, 120.0), (595.0, 90.0)]
    assert chart.rate_points == "495.0,120.0 595.0,90.0"
    assert chart.last_label == "12:30"
    assert chart.first_label == "11:31"
    assert round(chart.failure_rate, 1) == 12.5


@pytest.mark.parametrize(("setting", "secure"), [(None, False), (True, True), (False, False)])
async def test_the_session_cookie_is_secure_as_the_setting_says(
    tmp_path: Path, template_db: Path, setting: bool | None, secure: bool
) -> None:
    """Unset: Secure when the request came over https (here it did not). Behind a proxy that
    ends TLS every request looks like http; there was no setting to say so."""
    copy_template(template_db, tmp_path)
    settings = make_settings(tmp_path, ui_secure_cookie=setting)
    async with AsyncTestClient(create_app(settings)) as client:
        response = await client.post("/ui/login", data={"token": TOKEN, "next": "/ui"},
                                     follow_redirects=False)

    cookie = response.headers["set-cookie"]
    assert cookie.startswith(f"{SESSION_COOKIE}=")
    assert ("; Secure" in cookie or "; secure" in cookie) is secure

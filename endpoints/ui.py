"""/ui: the dashboard, to see and steer the queue in a browser.

Pages are rendered on the server (Jinja2) from the same JobStore reads and JobQueue operations
the API makes; charts are SVG drawn here from the data. A little plain JS (static/ui.js) polls
HTML fragments (/ui/partials/...) for live refresh and asks before every action. Every page
needs a session (ui_auth.py): without one it redirects to the login; every action is a POST that
carries the session's CSRF token.
"""

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, TypeAlias
from urllib.parse import urlencode

from jinja2 import Environment, FileSystemLoader, StrictUndefined
from litestar import Request, Response, Router, get, post
from litestar.datastructures import Cookie, ResponseHeader, State
from litestar.enums import RequestEncodingType
from litestar.exceptions import PermissionDeniedException
from litestar.params import Body, QueryParameter
from litestar.plugins.jinja import JinjaTemplateEngine
from litestar.response import Redirect, Template
from litestar.static_files import create_static_files_router
from litestar.status_codes import HTTP_303_SEE_OTHER, HTTP_400_BAD_REQUEST, HTTP_401_UNAUTHORIZED
from litestar.template.config import TemplateConfig
from litestar.types import ControllerRouterHandler

from carwash_jobs.errors import CarwashError, JobNotFound
from carwash_jobs.lifecycle import TERMINAL, JobStatus
from carwash_jobs.registry import TaskRegistry
from carwash_jobs.store.base import (
    FailedFilter,
    JobFilter,
    JobRow,
    MinuteCount,
    time_range_problem,
    utc_from_text,
)
from carwash_jobs.types import NUL_PROBLEM, JobId
from endpoints.deps import QueueDep, StoreDep
from endpoints.jobs import REPEATED_PROBLEM, JobIdPath, cursor_problem, repeated_list_param
from endpoints.text import nul_location, refuse_nul_params
from endpoints.ui_auth import CSRF_FIELD, CSRF_HEADER, SESSION_COOKIE, SessionSigner, UiSession

TEMPLATES_DIR = Path(__file__).parent / "templates"
STATIC_DIR = Path(__file__).parent / "static"
#: where the session is kept on the request while it is handled
SESSION_STATE = "ui_session"
#: handlers marked with this in `opt` need no session (the login)
PUBLIC = "ui_public"
CHART_MINUTES = 60
PAGE_SIZES = (25, 50, 100, 200)
#: the job list's form fields (its filters and page size)
LIST_FIELDS = ("status", "task_type", "tag", "queue", "created_after", "created_before", "limit")
#: the follow-ups a job names in its result that the detail page looks up, at most
FOLLOW_UPS_MAX = 50
#: what a finished action says on the page it returns to; only these keys are shown, so a link
#: cannot make the dashboard display text of its choosing
NOTICES = {
    "retried": "The job was retried: it is queued again with fresh attempts.",
    "rerun": "A new job was enqueued as a rerun of this one.",
    "cancelled": "The job was cancelled.",
    "not_failed": "Only a failed job can be retried; this one is not failed (any more).",
    "conflict": "The job's state does not allow that action now.",
    "bulk": "Failed jobs matching the filter were retried.",
}
#: the dashboard's pages hold job data and act on jobs: never cached, never framed, no script
#: or style from anywhere but this origin (the charts are SVG markup, not script)
SECURITY_HEADERS = [
    ResponseHeader(name="Cache-Control", value="no-store"),
    ResponseHeader(
        name="Content-Security-Policy",
        value="default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'self'; "
        "base-uri 'none'; object-src 'none'",
    ),
    ResponseHeader(name="X-Frame-Options", value="DENY"),
    ResponseHeader(name="X-Content-Type-Options", value="nosniff"),
    ResponseHeader(name="Referrer-Policy", value="same-origin"),
]

FormData = Annotated[dict[str, str], Body(media_type=RequestEncodingType.URL_ENCODED)]
UiRequest: TypeAlias = Request[Any, Any, State]


def template_config() -> TemplateConfig[JinjaTemplateEngine]:
    """The app's template engine: the dashboard's templates, autoescaped, and an undefined name
    is an error rather than an empty string."""
    environment = Environment(
        loader=FileSystemLoader(TEMPLATES_DIR), autoescape=True, undefined=StrictUndefined
    )
    environment.filters["when"] = _when
    environment.filters["pretty"] = _pretty
    return TemplateConfig(instance=JinjaTemplateEngine.from_environment(environment))


def ui_routes(api_token: str, *, secure_cookie: bool | None = None) -> list[ControllerRouterHandler]:
    """The dashboard's routes and its static files. `secure_cookie` None: Secure when the request
    came over https (behind a TLS-terminating proxy, set it True: the ui_secure_cookie setting)."""
    signer = SessionSigner(api_token)

    async def require_session(request: UiRequest) -> Response[Any] | None:
        if request.route_handler.opt.get(PUBLIC):
            return None
        session = signer.read(request.cookies.get(SESSION_COOKIE))
        if session is None:
            return Redirect(_login_url(request), status_code=HTTP_303_SEE_OTHER)
        request.state[SESSION_STATE] = session
        # here, not as a guard: Litestar runs guards before this hook, and a visitor without a
        # session goes to the login page whatever the address holds
        await refuse_nul_params(request, request.route_handler)
        return None

    pages = Router(
        "/ui",
        route_handlers=[
            _login_page, _login(signer, secure_cookie), _logout,
            overview, overview_partial, jobs_page, jobs_partial, job_page, job_partial,
            retry_job, rerun_job, cancel_job, bulk_retry,
        ],
        before_request=require_session,
        response_headers=SECURITY_HEADERS,
        include_in_schema=False,
        opt={"signer": signer},
    )
    static = create_static_files_router("/ui/static", directories=[STATIC_DIR], name="ui-static")
    return [pages, static]


# -- login ----------------------------------------------------------------------------------
@get("/login", opt={PUBLIC: True}, sync_to_thread=False)
def _login_page(next_page: Annotated[str | None, QueryParameter(name="next")] = None) -> Template:
    return Template("login.html", context={"next": _safe_next(next_page), "error": None})


def _login(signer: SessionSigner, secure_cookie: bool | None) -> Any:
    @post("/login", opt={PUBLIC: True}, status_code=HTTP_303_SEE_OTHER)
    async def login(request: UiRequest, data: FormData) -> Response[Any]:
        """The token is compared in constant time; a wrong one gets the form again (401)."""
        target = _safe_next(data.get("next"))
        if not signer.token_matches(data.get("token", "")):
            return Template(
                "login.html", context={"next": target, "error": "That is not the API token."},
                status_code=HTTP_401_UNAUTHORIZED,
            )
        value, _ = signer.issue()
        secure = request.url.scheme == "https" if secure_cookie is None else secure_cookie
        return Redirect(
            target, status_code=HTTP_303_SEE_OTHER,
            cookies=[Cookie(key=SESSION_COOKIE, value=value, path="/ui", httponly=True,
                            samesite="strict", secure=secure, max_age=signer.lifetime_seconds)],
        )

    return login


@post("/logout", status_code=HTTP_303_SEE_OTHER)
async def _logout(request: UiRequest, data: FormData) -> Response[Any]:
    _check_csrf(request, data)
    return Redirect(
        "/ui/login", status_code=HTTP_303_SEE_OTHER,
        cookies=[Cookie(key=SESSION_COOKIE, value="", path="/ui", httponly=True, samesite="strict",
                        max_age=0, expires=0)],
    )


def _login_url(request: UiRequest) -> str:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    if request.method != "GET" or request.url.path.startswith("/ui/partials"):
        target = "/ui"
    return "/ui/login?" + urlencode({"next": target})


def _safe_next(target: str | None) -> str:
    """Only a path of the dashboard itself: a login link must not send anyone elsewhere."""
    if not target or not target.startswith("/ui") or "//" in target or "\\" in target:
        return "/ui"
    return target


def _session(request: UiRequest) -> UiSession:
    session: UiSession = request.state[SESSION_STATE]
    return session


def _check_csrf(request: UiRequest, data: Mapping[str, str]) -> None:
    signer: SessionSigner = request.route_handler.opt["signer"]
    given = data.get(CSRF_FIELD) or request.headers.get(CSRF_HEADER)
    if not signer.csrf_valid(_session(request), given):
        raise PermissionDeniedException("missing or wrong CSRF token: reload the page and try again")


def _page(request: UiRequest, name: str, status_code: int = 200, **context: Any) -> Template:
    """A page with what every page shows: the CSRF token for its forms, the notice of the
    action that led here."""
    notice = NOTICES.get(request.query_params.get("notice") or "")
    return Template(
        name, status_code=status_code,
        context={"csrf_token": _session(request).csrf_token, "csrf_field": CSRF_FIELD,
                 "notice": notice, **context},
    )


# -- overview -------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Bar:
    x: float
    completed_y: float
    completed_h: float
    failed_y: float
    failed_h: float
    label: str


@dataclass(frozen=True, slots=True)
class Chart:
    """Finished jobs per minute over the last hour, drawn as stacked SVG bars, and the failure
    rate as a line (0-100 %)."""

    bars: list[Bar]
    rate_dots: list[tuple[float, float]]
    max_per_minute: int
    completed: int
    failed: int
    first_label: str
    last_label: str
    width: int = 600
    height: int = 120

    @property
    def rate_points(self) -> str:
        """The dots as an SVG polyline's points."""
        return " ".join(f"{x},{y}" for x, y in self.rate_dots)

    @property
    def failure_rate(self) -> float:
        total = self.completed + self.failed
        return 100.0 * self.failed / total if total else 0.0


def build_chart(rows: Sequence[MinuteCount], now: datetime, minutes: int = CHART_MINUTES) -> Chart:
    start = now.replace(second=0, microsecond=0) - timedelta(minutes=minutes - 1)
    completed = [0] * minutes
    failed = [0] * minutes
    for row in rows:
        index = int((row.minute - start).total_seconds() // 60)
        if 0 <= index < minutes:
            if row.status == JobStatus.completed.value:
                completed[index] += row.count
            elif row.status == JobStatus.failed.value:
                failed[index] += row.count
    top = max([c + f for c, f in zip(completed, failed, strict=True)] + [1])
    width, height = 600, 120
    step = width / minutes
    bars: list[Bar] = []
    dots: list[tuple[float, float]] = []
    for i in range(minutes):
        completed_h = height * completed[i] / top
        failed_h = height * failed[i] / top
        at = (start + timedelta(minutes=i)).strftime("%H:%M")
        bars.append(Bar(
            x=round(i * step, 2), completed_y=round(height - completed_h, 2),
            completed_h=round(completed_h, 2), failed_y=round(height - completed_h - failed_h, 2),
            failed_h=round(failed_h, 2),
            label=f"{at}: {completed[i]} completed, {failed[i]} failed",
        ))
        total = completed[i] + failed[i]
        if total:
            rate = failed[i] / total
            dots.append((round(i * step + step / 2, 2), round(height - rate * height, 2)))
    return Chart(
        bars=bars, rate_dots=dots, max_per_minute=top, completed=sum(completed),
        failed=sum(failed), first_label=start.strftime("%H:%M"),
        last_label=(start + timedelta(minutes=minutes - 1)).strftime("%H:%M"),
    )


async def _overview_context(job_queue: QueueDep, job_store: StoreDep) -> dict[str, Any]:
    now = datetime.now(UTC)
    queue_stats = await job_queue.stats()
    stats = queue_stats.stats
    task_types = sorted(set(job_queue.registry.names()) | set(stats.by_task_type))
    processes = await job_store.live_processes()
    minutes = await job_store.finished_per_minute(now - timedelta(minutes=CHART_MINUTES))
    return {
        "statuses": [s.value for s in JobStatus],
        "by_status": stats.by_status,
        "by_task_type": {name: stats.by_task_type.get(name, {}) for name in task_types},
        "in_memory": queue_stats.in_memory,
        "processes": processes,
        "running_by_owner": stats.running_owners,
        "chart": build_chart(minutes, now),
        "now": now,
    }


@get("/", name="ui-overview")
async def overview(request: UiRequest, job_queue: QueueDep, job_store: StoreDep) -> Template:
    return _page(request, "overview.html", **await _overview_context(job_queue, job_store))


@get("/partials/overview")
async def overview_partial(
    request: UiRequest, job_queue: QueueDep, job_store: StoreDep
) -> Template:
    return _page(request, "_overview.html", **await _overview_context(job_queue, job_store))


# -- the job list ---------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ListQuery:
    """The list's filters as the form sent them (text), and as the store takes them."""

    form: dict[str, str]
    flt: JobFilter
    limit: int
    cursor: str | None


class BadFilter(ValueError):
    """A filter the page cannot use; the message names it."""


def _list_query(params: Mapping[str, str]) -> ListQuery:
    form = {k: params.get(k, "").strip() for k in LIST_FIELDS}
    status = None
    if form["status"]:
        try:
            status = JobStatus(form["status"])
        except ValueError:
            raise BadFilter(f"status: {form['status']!r} is not a job status") from None
    limit = 50
    if form["limit"]:
        if not re.fullmatch(r"[0-9]{1,4}", form["limit"]) or int(form["limit"]) not in PAGE_SIZES:
            raise BadFilter(f"limit: one of {', '.join(map(str, PAGE_SIZES))}")
        limit = int(form["limit"])
    cursor = params.get("cursor") or None
    if cursor is not None and (problem := cursor_problem(cursor)) is not None:
        raise BadFilter(f"cursor: {problem}")
    after = _form_time(form["created_after"], "created_after")
    before = _form_time(form["created_before"], "created_before")
    _check_range("created_after", after, "created_before", before)
    flt = JobFilter(
        status=status, task_type=form["task_type"] or None, tag=form["tag"] or None,
        queue=form["queue"] or None, created_after=after, created_before=before,
    )
    return ListQuery(form, flt, limit, cursor)


def _check_single(request: UiRequest) -> None:
    """A repeated filter is refused as the API refuses it (endpoints/jobs.py says why)."""
    if (name := repeated_list_param(request)) is not None:
        raise BadFilter(f"{name}: {REPEATED_PROBLEM}")


def _check_range(after_name: str, after: datetime | None, before_name: str, before: datetime | None) -> None:
    if problem := time_range_problem(after_name, after, before):
        raise BadFilter(f"{before_name}: {problem}")


def _check_nul(form: Mapping[str, str]) -> None:
    """A form's text reaches the store: no NUL (endpoints/text.py says why)."""
    if (where := nul_location(form)) is not None:
        raise BadFilter(f"{where[0]}: {NUL_PROBLEM}")


def _form_time(text: str, name: str) -> datetime | None:
    """ISO 8601; without an offset it is taken as UTC (the dashboard shows UTC throughout)."""
    if not text:
        return None
    try:
        return utc_from_text(text)
    except ValueError as exc:
        raise BadFilter(f"{name}: {exc}") from None


async def _jobs_context(
    request: UiRequest, job_store: StoreDep, registry: TaskRegistry
) -> tuple[int, dict[str, Any]]:
    params = {k: v for k, v in request.query_params.items() if isinstance(v, str)}
    context: dict[str, Any] = {
        "statuses": [s.value for s in JobStatus], "task_types": sorted(registry.names()),
        "page_sizes": PAGE_SIZES, "jobs": [], "next_url": None, "error": None,
        "form": {k: params.get(k, "") for k in LIST_FIELDS},
        "first_page": not params.get("cursor"), "query": "", "retried": None,
    }
    try:
        _check_single(request)
        query = _list_query(params)
    except BadFilter as exc:
        context["error"] = str(exc)
        return HTTP_400_BAD_REQUEST, context
    page = await job_store.list_jobs(query.flt, query.limit, query.cursor)
    kept = {k: v for k, v in query.form.items() if v}
    context.update(
        jobs=page.items, query=urlencode(kept),
        next_url=f"/ui/jobs?{urlencode({**kept, 'cursor': page.next_cursor})}" if page.next_cursor else None,
    )
    retried = params.get("retried", "")
    # ASCII digits only: str.isdigit() also takes "²", which int() refuses (a 500)
    context["retried"] = int(retried) if re.fullmatch(r"[0-9]{1,9}", retried) else None
    return 200, context


@get("/jobs")
async def jobs_page(request: UiRequest, job_store: StoreDep, job_queue: QueueDep) -> Template:
    status, context = await _jobs_context(request, job_store, job_queue.registry)
    return _page(request, "jobs.html", status_code=status, **context)


@get("/partials/jobs")
async def jobs_partial(request: UiRequest, job_store: StoreDep, job_queue: QueueDep) -> Template:
    status, context = await _jobs_context(request, job_store, job_queue.registry)
    return _page(request, "_jobs_rows.html", status_code=status, **context)


@post("/jobs/retry-failed", status_code=HTTP_303_SEE_OTHER)
async def bulk_retry(request: UiRequest, job_queue: QueueDep, data: FormData) -> Response[Any]:
    """Retry every failed job of the list's task type (all of them without one), optionally only
    those that failed in a time range."""
    _check_csrf(request, data)
    task_type = data.get("task_type", "").strip() or None
    try:
        _check_nul(data)
        after = _form_time(data.get("failed_after", "").strip(), "failed_after")
        before = _form_time(data.get("failed_before", "").strip(), "failed_before")
        _check_range("failed_after", after, "failed_before", before)
    except BadFilter as exc:
        return Response(str(exc), status_code=HTTP_400_BAD_REQUEST, media_type="text/plain")
    ids = await job_queue.retry_failed(
        FailedFilter(task_type=task_type, failed_after=after, failed_before=before)
    )
    back = {"status": JobStatus.failed.value, **({"task_type": task_type} if task_type else {})}
    return Redirect(f"/ui/jobs?{urlencode({**back, 'retried': len(ids)})}", status_code=HTTP_303_SEE_OTHER)


# -- one job --------------------------------------------------------------------------------
async def _job_context(job_id: str, job_store: StoreDep) -> dict[str, Any]:
    job = await job_store.get(JobId(job_id))
    linked_ids = [*job.depends_on, *([job.rerun_of] if job.rerun_of else [])]
    follow_up_ids = _job_ids_in(job.result, exclude={job.id, *linked_ids})[:FOLLOW_UPS_MAX]
    found = {row.id: row for row in await job_store.get_many([*linked_ids, *follow_up_ids])}
    return {
        "job": job, "events": await job_store.events(job.id), "found": found,
        "follow_ups": [found[i] for i in follow_up_ids if i in found],
        "terminal": job.status in TERMINAL,
        "can_cancel": job.status not in TERMINAL, "can_retry": job.status == JobStatus.failed,
        "can_rerun": job.status in TERMINAL,
    }


def _job_ids_in(value: Any, exclude: set[str]) -> list[JobId]:
    """Strings in a job's result that have the shape of job ids: the follow-ups a handler
    enqueued and reported (the row itself keeps no link to them)."""
    found: list[JobId] = []

    def walk(item: Any) -> None:
        if isinstance(item, str):
            if len(item) == 32 and all(c in "0123456789abcdef" for c in item) and item not in exclude:
                found.append(JobId(item))
        elif isinstance(item, Mapping):
            for v in item.values():
                walk(v)
        elif isinstance(item, list):
            for v in item:
                walk(v)

    walk(value)
    return list(dict.fromkeys(found))


@get("/jobs/{job_id:str}")
async def job_page(request: UiRequest, job_id: JobIdPath, job_store: StoreDep) -> Template:
    try:
        context = await _job_context(job_id, job_store)
    except JobNotFound:
        return _page(request, "missing.html", status_code=404, job_id=job_id)
    return _page(request, "job.html", **context)


@get("/partials/jobs/{job_id:str}")
async def job_partial(request: UiRequest, job_id: JobIdPath, job_store: StoreDep) -> Template:
    return _page(request, "_job_live.html", **await _job_context(job_id, job_store))


async def _act(
    request: UiRequest, job_id: JobIdPath, data: FormData, action: Any, notice: str
) -> Response[Any]:
    _check_csrf(request, data)
    target = job_id
    try:
        result = await action()
    except JobNotFound:
        raise
    except CarwashError:
        notice = "conflict"
    else:
        if isinstance(result, JobRow):
            target = result.id
        elif not result:
            notice = "not_failed"
    return Redirect(f"/ui/jobs/{target}?notice={notice}", status_code=HTTP_303_SEE_OTHER)


@post("/jobs/{job_id:str}/retry", status_code=HTTP_303_SEE_OTHER)
async def retry_job(
    request: UiRequest, job_id: JobIdPath, job_queue: QueueDep, data: FormData
) -> Response[Any]:
    return await _act(
        request, job_id, data,
        lambda: job_queue.retry_failed(FailedFilter(ids=[JobId(job_id)])), "retried",
    )


@post("/jobs/{job_id:str}/rerun", status_code=HTTP_303_SEE_OTHER)
async def rerun_job(
    request: UiRequest, job_id: JobIdPath, job_queue: QueueDep, data: FormData
) -> Response[Any]:
    return await _act(request, job_id, data, lambda: job_queue.rerun(JobId(job_id)), "rerun")


@post("/jobs/{job_id:str}/cancel", status_code=HTTP_303_SEE_OTHER)
async def cancel_job(
    request: UiRequest, job_id: JobIdPath, job_queue: QueueDep, data: FormData
) -> Response[Any]:
    async def cancel() -> bool:
        await job_queue.cancel(JobId(job_id))
        return True

    return await _act(request, job_id, data, cancel, "cancelled")


# -- template filters -----------------------------------------------------------------------
def _when(value: datetime | None) -> str:
    """UTC to the second: the dashboard shows one time zone, the one the API speaks."""
    if value is None:
        return "—"
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") + "Z"


def _pretty(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, default=str, ensure_ascii=False)

"""JobController: read jobs and steer them (retry-failed, rerun, cancel, timeline).

Each route is one engine call (JobStore reads, JobQueue operations), the same ones the CLI's
`jobs ...` commands make; engine errors become HTTP codes only in endpoints/errors.py.
"""

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any

from litestar import Controller, Request, Response, get, post
from litestar.exceptions import NotAuthorizedException, NotFoundException, ValidationException
from litestar.openapi.spec import Operation, RequestBody
from litestar.params import Body, PathParameter, QueryParameter
from litestar.status_codes import HTTP_200_OK, HTTP_202_ACCEPTED

from carwash_jobs.errors import InvalidPayload
from carwash_jobs.lifecycle import JobStatus
from carwash_jobs.store.base import (
    MAX_PAGE,
    NOT_A_CURSOR,
    FailedFilter,
    JobFilter,
    as_utc,
    id_time,
    time_range_problem,
)
from carwash_jobs.types import JOB_ID_PATTERN, JobId
from endpoints.deps import QueueDep, StoreDep
from endpoints.errors import ConflictException, field_error
from endpoints.schemas import (
    LOCATION_HEADER,
    EventOut,
    EventPage,
    JobOut,
    JobPage,
    RetryFailedIn,
    RetryFailedOut,
)

#: a page's next_cursor is the id of its last job (32 hex digits, see types.new_job_id): any
#: other text is refused, not read as a position (an id compared as text would restart the list)
CURSOR_PATTERN = JOB_ID_PATTERN
#: the list's query parameters: each takes one value (a repeat was read as its last value)
LIST_PARAMS = ("status", "task_type", "tag", "queue", "created_after", "created_before", "limit", "cursor")
REPEATED_PROBLEM = "given more than once; the list takes one value of each parameter"
#: no length bound: an id longer than any job's is an unknown job id, a 404 (API.md), not a 400
JobIdPath = Annotated[str, PathParameter(description="The job's id.", min_length=1)]


def _datetime_query(description: str) -> QueryParameter:
    """A datetime query parameter, taken as text and parsed here: the framework's lenient
    conversion would also take a number as a Unix timestamp, which the document does not allow."""
    return QueryParameter(
        description=description, schema_extra={"oneOf": None, "type": "string", "format": "date-time"}
    )


def _utc_query(text: str | None, name: str) -> datetime | None:
    if text is None:
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise _query_error(name, f"{name} is not an ISO 8601 datetime") from None
    try:
        return as_utc(value)
    except ValueError as exc:
        raise _query_error(name, f"{name} {exc}") from None


def _query_error(name: str, problem: str) -> ValidationException:
    return ValidationException(f"Validation failed: {problem}", extra=field_error(name, problem, "query"))


def cursor_problem(cursor: str) -> str | None:
    """Why `cursor` cannot be a job id a list gave out, or None.

    Beyond its shape: an id starts with its creation millisecond (types.new_job_id), and one
    past the last a datetime holds (the year 9999) is no job's. Judged before the store runs,
    for every listing alike: the list by creation time places a cursor by that time and could
    not (a 400 that named the body), while the list in id order took it as a position past every
    job and answered the first page."""
    if re.fullmatch(CURSOR_PATTERN, cursor) is None:
        return NOT_A_CURSOR
    try:
        id_time(cursor)
    except InvalidPayload:
        return NOT_A_CURSOR
    return None


def repeated_list_param(request: Request[Any, Any, Any]) -> str | None:
    """The first of the list's parameters (LIST_PARAMS) that the query holds more than once,
    or None. The framework reads a repeated parameter as its last value, so
    `status=queued&status=failed` silently listed only the failed jobs."""
    seen: set[str] = set()
    for name, _ in request.query_params.multi_items():
        if name in LIST_PARAMS:
            if name in seen:
                return name
            seen.add(name)
    return None


def _check_list_query(request: Request[Any, Any, Any], cursor: str | None) -> None:
    """The list's 400s that the parameters' own types cannot express."""
    if (name := repeated_list_param(request)) is not None:
        raise _query_error(name, f"{name} {REPEATED_PROBLEM}")
    if cursor is not None and (problem := cursor_problem(cursor)) is not None:
        raise _query_error("cursor", f"cursor is {problem}")


@dataclass
class _OptionalBody(Operation):
    """An operation whose request body may be left out (the framework marks every body required)."""

    def __post_init__(self) -> None:
        if isinstance(self.request_body, RequestBody):
            self.request_body.required = False


class JobController(Controller):
    path = "/jobs"
    tags = ("jobs",)

    @get("/", operation_id="list_jobs", raises=[ValidationException, NotAuthorizedException])
    async def list_jobs(
        self,
        request: Request[Any, Any, Any],
        job_store: StoreDep,
        status: Annotated[JobStatus | None, QueryParameter(description="Only jobs in this state.")] = None,
        task_type: Annotated[str | None, QueryParameter(description="Only jobs of this task type.")] = None,
        tag: Annotated[str | None, QueryParameter(description="Only jobs carrying this tag.")] = None,
        queue: Annotated[str | None, QueryParameter(description="Only jobs in this named queue.")] = None,
        created_after: Annotated[
            str | None, _datetime_query("Created at or after this ISO 8601 datetime (with a UTC offset).")
        ] = None,
        created_before: Annotated[
            str | None, _datetime_query("Created before this ISO 8601 datetime (with a UTC offset).")
        ] = None,
        limit: Annotated[int, QueryParameter(ge=1, le=MAX_PAGE, description="Page size.")] = 50,
        cursor: Annotated[
            str | None,
            # the lengths too: the pattern is searched for, and its $ also matches before a
            # final newline
            QueryParameter(pattern=CURSOR_PATTERN, min_length=32, max_length=32,
                           description="The last page's next_cursor."),
        ] = None,
    ) -> JobPage:
        """Newest first, keyset-paginated: a page stays correct while jobs are being added."""
        _check_list_query(request, cursor)
        after = _utc_query(created_after, "created_after")
        before = _utc_query(created_before, "created_before")
        if problem := time_range_problem("created_after", after, before):
            raise _query_error("created_before", f"created_before {problem}")
        flt = JobFilter(status=status, task_type=task_type, tag=tag, queue=queue,
                        created_after=after, created_before=before)
        return JobPage.from_page(await job_store.list_jobs(flt, limit, cursor))

    @get("/{job_id:str}", operation_id="get_job", raises=[NotFoundException, NotAuthorizedException])
    async def get_job(self, job_id: JobIdPath, job_store: StoreDep) -> JobOut:
        return JobOut.from_row(await job_store.get(JobId(job_id)))

    @post(
        "/retry-failed", operation_id="retry_failed_jobs", status_code=HTTP_200_OK,
        raises=[ValidationException, NotAuthorizedException], operation_class=_OptionalBody,
    )
    async def retry_failed(
        self,
        job_queue: QueueDep,
        data: Annotated[RetryFailedIn | None, Body(title="RetryFailedIn")] = None,
    ) -> RetryFailedOut:
        """Failed jobs back to queued with fresh attempts; only `failed` jobs are touched."""
        flt = data or RetryFailedIn()
        ids = await job_queue.retry_failed(
            FailedFilter(
                ids=None if flt.ids is None else [JobId(i) for i in flt.ids],
                task_type=flt.task_type, failed_after=flt.failed_after, failed_before=flt.failed_before,
            )
        )
        return RetryFailedOut(retried=len(ids), ids=list(ids))

    @post(
        "/{job_id:str}/rerun", operation_id="rerun_job", status_code=HTTP_202_ACCEPTED,
        response_headers=[LOCATION_HEADER],
        raises=[NotFoundException, ConflictException, NotAuthorizedException, ValidationException],
    )
    async def rerun(self, job_id: JobIdPath, job_queue: QueueDep) -> Response[JobOut]:
        """A new job cloned from a finished one (`rerun_of` = its id); 409 while it has not ended."""
        job = await job_queue.rerun(JobId(job_id))
        return Response(
            JobOut.from_row(job), status_code=HTTP_202_ACCEPTED, headers={"Location": f"/api/jobs/{job.id}"}
        )

    @post(
        "/{job_id:str}/cancel", operation_id="cancel_job", status_code=HTTP_200_OK,
        raises=[NotFoundException, ConflictException, NotAuthorizedException],
    )
    async def cancel(self, job_id: JobIdPath, job_queue: QueueDep) -> JobOut:
        """Cancel a job that has not ended (a running one is stopped); 409 once it has ended."""
        return JobOut.from_row(await job_queue.cancel(JobId(job_id)))

    @get(
        "/{job_id:str}/events", operation_id="job_events",
        raises=[NotFoundException, NotAuthorizedException],
    )
    async def events(self, job_id: JobIdPath, job_store: StoreDep) -> EventPage:
        """The job's timeline, oldest first: enqueued, claimed, attempt failed, completed, ..."""
        await job_store.get(JobId(job_id))  # 404 for an unknown job rather than an empty list
        return EventPage(items=[EventOut.from_row(e) for e in await job_store.events(JobId(job_id))])

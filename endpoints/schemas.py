"""The HTTP models: what clients send and receive (shared/API.md), and nothing the engine needs.

Every job-shaped response is built from `JobRow.public()`, the one place that defines what a
client sees of a job, so the API and the CLI cannot drift apart.
"""

import functools
import json
import re
import types
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, Literal, Self, Union, get_args, get_origin

from litestar.datastructures import ResponseHeader
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from carwash_jobs.lifecycle import JobStatus
from carwash_jobs.queue import (
    DEPENDENCY_ID_MAX_LENGTH,
    IDEMPOTENCY_KEY_MAX_LENGTH,
    PRIORITY_MAX,
    QUEUE_NAME_MAX_LENGTH,
    EnqueueOptions,
)
from carwash_jobs.store.base import EventRow, JobRow, Page, as_utc, time_range_problem
from carwash_jobs.types import MAX_DELAY_SECONDS, NUL_PROBLEM, JobId
from endpoints.text import nul_location

#: documents the header of every 202 that creates a job
LOCATION_HEADER = ResponseHeader(
    name="Location", description="/api/jobs/{id}: where to poll the job", documentation_only=True
)


#: how ISO 8601 date-time text begins: a calendar date, "T" (or a space, as RFC 3339 allows),
#: hours and minutes; pydantic parses the rest (seconds, fraction, offset) as before
_ISO_DATE_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}")


def is_iso_datetime_text(value: Any) -> bool:
    """Whether `value` is text in the shape of an ISO 8601 date-time. Pydantic's lax parsing
    also takes a number, or text of digits, as a Unix timestamp: "2030" became
    1970-01-01T00:33:50Z and "0" 1970, so a datetime must look like one before it is parsed."""
    return isinstance(value, str) and _ISO_DATE_TIME.match(value) is not None


def iso_datetime_text(value: Any) -> Any:
    """A before-validator for every datetime the API takes: ISO 8601 date-time text only."""
    if value is not None and not is_iso_datetime_text(value):
        raise ValueError("must be ISO 8601 date-time text, e.g. 2030-01-01T08:00:00Z")
    return value


class _WrongJsonType:
    """Stands in for a value of the wrong JSON type, so that the field's own validation fails
    with its usual message and names the field."""

    def __repr__(self) -> str:
        return "<value of the wrong JSON type>"


_WRONG = _WrongJsonType()
_SCALARS = (bool, int, float, datetime)


def _unwrapped(annotation: Any) -> Any:
    """The type a field holds, without its Annotated metadata and its `| None`."""
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    if get_origin(annotation) in (Union, types.UnionType):
        inner = [arg for arg in get_args(annotation) if arg is not type(None)]
        annotation = inner[0] if len(inner) == 1 else None
    return annotation


def _scalar_kind(annotation: Any) -> Any:
    """bool, int, float or datetime when a field holds one (optionally None); else None."""
    annotation = _unwrapped(annotation)
    return annotation if annotation in _SCALARS else None


def holds_datetime(annotation: Any) -> bool:
    """Whether a field holds a datetime (optionally None)."""
    return _scalar_kind(annotation) is datetime


def _json_type_matches(kind: Any, value: Any) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is datetime:
        return is_iso_datetime_text(value)
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _item_matches(kind: Any, item: Any) -> bool:
    """A null item is left to the field's own type to take or refuse."""
    return item is None or _json_type_matches(kind, item)


def json_scalars_only(cls: type[BaseModel], data: Any) -> Any:
    """A JSON body says what type a value is: `true` is not 1, `"5"` is not 5 and `0` (or
    `"0"`) is not 1970-01-01. Pydantic's lax mode would convert them (a form, all text, needs
    that), so in a JSON model a top-level value of the wrong JSON type, or an item of the wrong
    JSON type in a top-level list of scalars (`customer_ids: [true]` is not customer 1), is
    refused, naming its field or item."""
    if not isinstance(data, dict):
        return data
    fixed: dict[str, Any] | None = None
    for key, kind in _fields_of_kind(cls, _scalar_kind):
        value = data.get(key)
        if value is not None and not _json_type_matches(kind, value):
            fixed = fixed if fixed is not None else dict(data)
            fixed[key] = _WRONG
    for key, kind in _fields_of_kind(cls, _item_kind):
        value = data.get(key)
        if isinstance(value, list) and not all(_item_matches(kind, item) for item in value):
            fixed = fixed if fixed is not None else dict(data)
            fixed[key] = [item if _item_matches(kind, item) else _WRONG for item in value]
    return data if fixed is None else fixed


@functools.cache
def _fields_of_kind(
    cls: type[BaseModel], kind_of: Callable[[Any], Any]
) -> tuple[tuple[str, Any], ...]:
    """(JSON key, kind) of each field of a model whose annotation `kind_of` finds a kind in
    (_scalar_kind, _item_kind): read from its annotations once, not on every request."""
    kinds = ((field.alias or name, kind_of(field.annotation))
             for name, field in cls.model_fields.items())
    return tuple((key, kind) for key, kind in kinds if kind is not None)


def _item_kind(annotation: Any) -> Any:
    """bool, int, float or datetime when a field is a list of one (optionally None); else None."""
    annotation = _unwrapped(annotation)
    if get_origin(annotation) is not list or len(get_args(annotation)) != 1:
        return None
    return _scalar_kind(get_args(annotation)[0])


# -- the job ----------------------------------------------------------------------------------
class ProgressOut(BaseModel):
    done: int
    total: int | None


class JobOut(BaseModel):
    """A job as clients see it; the fields after `rerun_of` are additions to shared/API.md."""

    id: str
    task_type: str
    status: JobStatus
    payload: dict[str, Any]
    queue: str
    priority: int
    attempts: int
    max_attempts: int
    run_at: datetime
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    progress: ProgressOut
    result: Any
    error: str | None
    tags: list[str]
    rerun_of: str | None
    depends_on: list[str]
    idempotency_key: str | None
    context: dict[str, Any] | None
    lease_owner: str | None
    error_traceback: str | None
    attempt_history: list[dict[str, Any]]

    @classmethod
    def from_row(cls, row: JobRow) -> "JobOut":
        return cls.model_validate(row.public())


class JobPage(BaseModel):
    """Newest first; pass `next_cursor` back as `cursor` for the next page (null: no more)."""

    items: list[JobOut]
    next_cursor: str | None

    @classmethod
    def from_page(cls, page: Page) -> "JobPage":
        return cls(items=[JobOut.from_row(row) for row in page.items], next_cursor=page.next_cursor)


class EventOut(BaseModel):
    at: datetime
    event: str
    status: str
    attempt: int
    process: str | None
    message: str | None

    @classmethod
    def from_row(cls, row: EventRow) -> "EventOut":
        return cls(at=row.at, event=row.event, status=row.status, attempt=row.attempt,
                   process=row.process, message=row.message)


class EventPage(BaseModel):
    """A job's timeline, oldest first."""

    items: list[EventOut]


# -- request bodies --------------------------------------------------------------------------------
class NulFree(BaseModel):
    """Base of every request model: no text in it, at any depth, holds NUL (endpoints/text.py
    says why). Checked on the validated values, as they will be stored: the form's JSON fields
    decoded, nested payload models and a payload's extra fields included."""

    @model_validator(mode="after")
    def _no_nul(self) -> Self:
        where = nul_location(self.model_dump(by_alias=True))
        if where is None:
            return self
        # a ValidationError keeps its location, so the 400 names the very field or item
        problem = InitErrorDetails(
            type=PydanticCustomError("nul_in_text", NUL_PROBLEM), loc=where, input="<text holding NUL>"
        )
        raise ValidationError.from_exception_data(type(self).__name__, [problem])


class EnqueueOptionsIn(NulFree):
    """The options every task type accepts beside its payload fields.

    Generated request models inherit these fields; `options_of` turns them into the engine's
    EnqueueOptions. Bounds keep every value storable, so bad input gets a 400, never a 500.
    """

    run_at: AwareDatetime | None = Field(
        default=None, description="When to run, ISO 8601 with a UTC offset; give this or delay_seconds."
    )
    delay_seconds: float | None = Field(
        default=None, ge=0, le=MAX_DELAY_SECONDS, allow_inf_nan=False,
        description="Run this many seconds from now; give this or run_at.",
    )
    priority: int | None = Field(
        default=None, ge=-PRIORITY_MAX, le=PRIORITY_MAX,
        description="Higher runs first; default: the task type's."
    )
    max_attempts: int | None = Field(
        default=None, ge=1, le=1000, description="Attempts before the job fails; default: the task type's."
    )
    queue: str | None = Field(
        default=None, min_length=1, max_length=QUEUE_NAME_MAX_LENGTH,
        description="The named queue; default: the task type's."
    )
    tags: list[Annotated[str, Field(min_length=1, max_length=200)]] = Field(
        default_factory=list, max_length=50, description="Labels to find the job by."
    )
    idempotency_key: str | None = Field(
        default=None, min_length=1, max_length=IDEMPOTENCY_KEY_MAX_LENGTH,
        description="A second enqueue with the same key returns the existing job (200) instead.",
    )
    context: dict[str, Any] | None = Field(
        default=None, description="A small JSON object (at most 4 KiB) handed to the handler."
    )
    depends_on: list[Annotated[str, Field(min_length=1, max_length=DEPENDENCY_ID_MAX_LENGTH)]] = Field(
        default_factory=list, max_length=100,
        description="Job ids this job waits for; if one fails or is cancelled, this one is cancelled.",
    )

    @field_validator("run_at", mode="before")
    @classmethod
    def _run_at_text(cls, value: Any) -> Any:
        return iso_datetime_text(value)

    @field_validator("run_at")
    @classmethod
    def _run_at_storable(cls, value: datetime | None) -> datetime | None:
        return None if value is None else as_utc(value)

    @field_validator("delay_seconds")
    @classmethod
    def _not_both(cls, value: float | None, info: ValidationInfo) -> float | None:
        if value is not None and info.data.get("run_at") is not None:
            raise ValueError("give run_at or delay_seconds, not both")
        return value


#: the names of the option fields, which are never part of a payload
OPTION_FIELDS: frozenset[str] = frozenset(EnqueueOptionsIn.model_fields)


def options_of(data: BaseModel) -> EnqueueOptions:
    """The engine's EnqueueOptions from a request model that carries the option fields."""
    values = {name: getattr(data, name) for name in OPTION_FIELDS}
    return EnqueueOptions(
        run_at=values["run_at"], delay_seconds=values["delay_seconds"], priority=values["priority"],
        max_attempts=values["max_attempts"], queue=values["queue"], tags=tuple(values["tags"]),
        idempotency_key=values["idempotency_key"], context=values["context"],
        depends_on=tuple(JobId(i) for i in values["depends_on"]),
    )


def queue_name_type(queues: list[str]) -> Any:
    """`Literal[...]` of the configured queue names, so a typo gets a 400 instead of a job that
    sits in a queue no weight was set for."""
    return Literal.__getitem__(tuple(queues))


class UploadForm(EnqueueOptionsIn):
    """Base of the multipart models: a form carries only text, so JSON objects and lists of
    objects arrive as JSON text and are decoded before validation."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    @field_validator("context", "tags", "depends_on", mode="before")
    @classmethod
    def _options_as_json(cls, value: Any) -> Any:
        return decode_form_field(value)


def decode_form_field(value: Any) -> Any:
    """decode_form_json for a form field that may be given once or repeated: a list field
    given once as JSON text (`tags=["a","b"]`) arrives as a list of that one text, and was
    taken as one tag."""
    if isinstance(value, list) and len(value) == 1:
        inner = decode_form_json(value[0])
        return inner if isinstance(inner, list) else value
    return decode_form_json(value)


def decode_form_json(value: Any) -> Any:
    """A form value that is JSON text of an object or list becomes that object or list."""
    if isinstance(value, str) and value.lstrip()[:1] in ("{", "["):
        try:
            return json.loads(value)
        except ValueError:
            return value
        except RecursionError:  # nested deeper than the decoder follows: bad input, a 400
            raise ValueError("the JSON is nested too deeply") from None
    return value


# -- other bodies ------------------------------------------------------------------------------
class RetryFailedIn(NulFree):
    """Which failed jobs to retry; every filter given is AND-ed, none means every failed job.
    An unknown key is refused: a misspelt filter ignored would retry every failed job."""

    model_config = ConfigDict(extra="forbid")

    ids: list[Annotated[str, Field(min_length=1, max_length=100)]] | None = Field(
        default=None, max_length=10_000
    )
    task_type: str | None = Field(default=None, min_length=1, max_length=200)
    failed_after: AwareDatetime | None = None
    failed_before: AwareDatetime | None = None

    @field_validator("failed_after", "failed_before", mode="before")
    @classmethod
    def _text(cls, value: Any) -> Any:
        return iso_datetime_text(value)

    @field_validator("failed_after", "failed_before")
    @classmethod
    def _storable(cls, value: datetime | None) -> datetime | None:
        return None if value is None else as_utc(value)

    @field_validator("failed_before")
    @classmethod
    def _after_the_start(cls, value: datetime | None, info: ValidationInfo) -> datetime | None:
        # runs after failed_after's own checks: info.data holds it only when it passed them
        if problem := time_range_problem("failed_after", info.data.get("failed_after"), value):
            raise ValueError(problem)
        return value


class RetryFailedOut(BaseModel):
    retried: int
    ids: list[str]


class ReloadOut(BaseModel):
    loaded: int = Field(description="Due jobs read from the database that were not in memory yet.")


class ProcessOut(BaseModel):
    """A live process of the fleet: API or worker, on PostgreSQL typically many."""

    owner: str = Field(description="host/pid/start/nonce/pidns: the lease owner its claims carry.")
    role: str = Field(description="all, api or worker.")
    host: str
    pid: int
    started_at: datetime
    last_seen_at: datetime | None = Field(description="Its last announcement (every heartbeat).")
    running: int = Field(description="Jobs it runs now.")


class QueueStatsOut(BaseModel):
    in_memory: int = Field(description="Due job ids this process holds in memory.")
    by_status: dict[str, int]
    by_task_type: dict[str, dict[str, int]]
    running_by_process: dict[str, int] = Field(
        description="Running jobs per lease owner (host/pid/start/nonce/pidns)."
    )
    processes: list[ProcessOut] = Field(
        default_factory=list,
        description="Live processes (announced within one lease), oldest first, with how many "
                    "jobs each runs; a dead worker's jobs stay in running_by_process until "
                    "their leases expire.",
    )


class HealthOut(BaseModel):
    status: Literal["ok"]
    database: Literal["ok"]

"""Task types: a name, a typed payload, a handler and its options, found by module path.

The engine never imports task_types/: `TaskRegistry.load` imports the modules named in the
settings, and each module exposes one `TASK_TYPE`. The endpoint, its OpenAPI schema, payload
validation and the dashboard entry are all derived from this one object.
"""

from __future__ import annotations

import enum
import functools
import importlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, TypeAdapter, ValidationError

from carwash_jobs.errors import ConfigurationError, InvalidPayload, UnknownTaskType
from carwash_jobs.lifecycle import JobStatus
from carwash_jobs.retry import RetryPolicy

if TYPE_CHECKING:
    from carwash_jobs.context import JobContext
    from carwash_jobs.store.base import Applied, JobRow

log = logging.getLogger(__name__)

PayloadT = TypeVar("PayloadT", bound=BaseModel)
ResultT = TypeVar("ResultT")

Handler = Callable[["JobContext", PayloadT], Awaitable[ResultT]]
Hook = Callable[["JobRow"], Awaitable[None]]


class _Setting(enum.Enum):
    SETTING = "setting"


#: an option a task type leaves to the process's settings (TaskDefaults)
FROM_SETTINGS: Literal[_Setting.SETTING] = _Setting.SETTING


@dataclass(frozen=True, slots=True)
class TaskOptions:
    """Defaults for a task type's jobs; an enqueue may override priority, queue, max_attempts.

    `max_attempts` and `timeout` left unset come from the process's settings
    (`default_max_attempts`, `default_timeout_seconds`: TaskDefaults); a timeout of None means
    none at all."""

    max_attempts: int | Literal[_Setting.SETTING] = FROM_SETTINGS
    priority: int = 0
    queue: str = "default"
    timeout: timedelta | Literal[_Setting.SETTING] | None = FROM_SETTINGS
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    #: jobs of this type running at once across the fleet (every process on the database,
    #: enforced by the claim); None: any
    concurrency: int | None = None


@dataclass(frozen=True, slots=True)
class TaskHooks:
    """Called after a job of this type reaches an end, once, by the process that sees it end:
    the processor that ran it (completed; failed; cancelled while running, after the handler
    stopped); the scheduler, or a starting process's recovery of a dead local worker, that
    failed it on its last attempt; the process that cancelled it while it was not running
    (queued, scheduled or waiting); for a dependent cancelled because a job it waited on failed
    or was cancelled, the process that recorded that end; for a job enqueued on a dependency
    that had already failed or been cancelled, the enqueuing process. A hook's failure is
    logged, not raised.

    Not covered, each because no process that could call the hook sees the end:
    - a job cancelled while it ran in a worker that has since died (only that worker could
      tell its handler stopped);
    - an end seen by a process that does not know the task type (in a fleet whose processes
      load different task types: a cascade, a cancel or a lease recovery there);
    - a job born cancelled in a caller's own store transaction (`queue.enqueue(tx=...)` with a
      `Tx` that `queue.transaction` did not give): the queue cannot tell when it commits."""

    on_completed: Hook | None = None
    on_failed: Hook | None = None  #: e.g. tell an admin a job used up its attempts
    on_cancelled: Hook | None = None

    def for_status(self, status: JobStatus) -> Hook | None:
        return {
            JobStatus.completed: self.on_completed,
            JobStatus.failed: self.on_failed,
            JobStatus.cancelled: self.on_cancelled,
        }.get(status)


@dataclass(frozen=True, slots=True)
class TaskType(Generic[PayloadT, ResultT]):
    name: str
    payload_model: type[PayloadT]
    handler: Handler[PayloadT, ResultT]
    options: TaskOptions = field(default_factory=TaskOptions)
    hooks: TaskHooks = field(default_factory=TaskHooks)
    result_model: type[BaseModel] | None = None
    slug: str = ""  #: the URL segment; defaults to the name with hyphens
    description: str = ""
    examples: Sequence[Mapping[str, Any]] = ()
    #: the payload field that receives the path of a file uploaded with the job (the HTTP route
    #: then takes a multipart form: the file plus the other payload fields); None: JSON only
    upload_field: str | None = None

    def __post_init__(self) -> None:
        if self.upload_field is not None and self.upload_field not in self.payload_model.model_fields:
            raise ConfigurationError(
                f"task type {self.name!r}: upload_field {self.upload_field!r} is not a field of "
                f"{self.payload_model.__name__}"
            )

    @property
    def route_slug(self) -> str:
        return self.slug or self.name.replace("_", "-")

    def validate_payload(self, payload: Mapping[str, Any] | BaseModel) -> PayloadT:
        """Parse a payload or raise InvalidPayload naming the first wrong field."""
        if isinstance(payload, self.payload_model):
            return payload
        try:
            return self.payload_model.model_validate(payload)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "payload"
            raise InvalidPayload(where, first["msg"]) from exc

    def dump_payloads(self, payloads: Iterable[Mapping[str, Any] | BaseModel]) -> list[dict[str, Any]]:
        """Parse many payloads in one pydantic call and give them back as JSON-ready dicts, or
        raise InvalidPayload naming the first wrong field as `payloads.<index>.<field>`.

        Each is dumped as build() dumps one: an instance of a subclass with its own fields, NaN
        kept (for the store to refuse). One call for the list when every payload parsed to the
        model itself (0.29 us a payload); a subclass instance asks for a dump one by one (1.1
        us): the list's `serialize_as_any` would write NaN and the infinities as null."""
        adapter = _list_adapter(self.payload_model)
        try:
            parsed = adapter.validate_python(list(payloads))
        except ValidationError as exc:
            first = exc.errors()[0]
            raise InvalidPayload(".".join(["payloads", *map(str, first["loc"])]),
                                 first["msg"]) from exc
        if all(type(p) is self.payload_model for p in parsed):
            dumped: list[dict[str, Any]] = adapter.dump_python(parsed, mode="json")
            return dumped
        return [p.model_dump(mode="json") for p in parsed]


@functools.cache
def _list_adapter(model: type[BaseModel]) -> TypeAdapter[list[Any]]:
    return TypeAdapter(list[model])  # type: ignore[valid-type]


AnyTaskType = TaskType[Any, Any]


@dataclass(frozen=True, slots=True)
class TaskDefaults:
    """What a task type's options leave to the process: the settings `default_max_attempts`
    and `default_timeout_seconds`, whose defaults these are."""

    max_attempts: int = 5
    timeout: timedelta | None = timedelta(minutes=30)


class TaskRegistry:
    """Every task type this process knows, by name and by route slug."""

    def __init__(
        self, task_types: Sequence[AnyTaskType] = (), defaults: TaskDefaults = TaskDefaults()
    ) -> None:
        self._by_name: dict[str, AnyTaskType] = {}
        self.defaults = defaults
        for task_type in task_types:
            self.register(task_type)

    @classmethod
    def load(
        cls, module_paths: Sequence[str], defaults: TaskDefaults = TaskDefaults()
    ) -> TaskRegistry:
        registry = cls(defaults=defaults)
        for path in module_paths:
            try:
                module = importlib.import_module(path)
            except ImportError as exc:
                raise ConfigurationError(f"CARWASH_TASK_TYPES: cannot import {path!r}: {exc}") from exc
            task_type = getattr(module, "TASK_TYPE", None)
            if not isinstance(task_type, TaskType):
                raise ConfigurationError(
                    f"CARWASH_TASK_TYPES: module {path!r} has no TASK_TYPE = TaskType(...)"
                )
            registry.register(task_type)
        return registry

    def register(self, task_type: AnyTaskType) -> None:
        if task_type.name in self._by_name:
            raise ConfigurationError(f"task type {task_type.name!r} is registered twice")
        self._by_name[task_type.name] = task_type

    def max_attempts(self, task_type: AnyTaskType) -> int:
        """The attempts a job of `task_type` gets when its enqueue sets none."""
        value = task_type.options.max_attempts
        return self.defaults.max_attempts if value is FROM_SETTINGS else value

    def timeout(self, task_type: AnyTaskType) -> timedelta | None:
        """The longest a handler of `task_type` may run; None: no limit."""
        value = task_type.options.timeout
        return self.defaults.timeout if value is FROM_SETTINGS else value

    def get(self, name: str) -> AnyTaskType:
        try:
            return self._by_name[name]
        except KeyError:
            raise UnknownTaskType(name) from None

    def by_slug(self, slug: str) -> AnyTaskType:
        for task_type in self._by_name.values():
            if task_type.route_slug == slug:
                return task_type
        raise UnknownTaskType(slug)

    def __iter__(self) -> Iterator[AnyTaskType]:
        return iter(self._by_name.values())

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def names(self) -> list[str]:
        return list(self._by_name)

    def hook(self, task_type: str, status: JobStatus) -> Hook | None:
        """The hook a job of `task_type` that ended `status` calls. None too when this process
        does not know the task type: in a fleet, a scheduler may end another process's job."""
        known = self._by_name.get(task_type)
        return None if known is None else known.hooks.for_status(status)

    async def run_hooks(self, applied: Applied) -> None:
        """The hooks of the ends a committed change reached: its job's, if it ended, and those
        of the dependents it cancelled."""
        for job in (applied.job, *applied.cancelled):
            await self.run_hook(job)

    async def run_hook(self, job: JobRow) -> None:
        """Call the hook for the end `job` reached, if it has one. Its failure is logged, not
        raised: the end is committed already, and must not look like a failed record."""
        hook = self.hook(job.task_type, job.status)
        if hook is None:
            return
        try:
            await hook(job)
        except Exception:
            log.exception("the %s hook of job %s failed", job.status.value, job.id)

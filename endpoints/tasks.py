"""One `POST /api/tasks/{slug}` per registered task type, generated from the registry.

For each task type a request model is built: its payload model's fields plus the enqueue
options (EnqueueOptionsIn), so the OpenAPI document shows exactly what that route accepts, with
the task type's examples, and Litestar rejects bad input with a 400 naming the field before the
handler runs. The handler splits the model back into (payload, options) and calls
`JobQueue.enqueue`, the same call the CLI makes.

A task type with `upload_field` takes a multipart form instead: a `file` part plus the other
payload fields and the options as form fields. The file is stored durably first, its path goes
into `payload[upload_field]`, and it is removed again if no job takes it.
"""

from collections.abc import Awaitable, Callable
from typing import Annotated, Any, cast

from litestar import Request, Response, post
from litestar.datastructures import UploadFile
from litestar.enums import RequestEncodingType
from litestar.exceptions import ClientException, NotAuthorizedException, ValidationException
from litestar.exceptions.http_exceptions import RequestEntityTooLarge
from litestar.handlers import HTTPRouteHandler
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import Example
from litestar.params import Body
from litestar.status_codes import HTTP_200_OK, HTTP_202_ACCEPTED
from litestar.types import Empty
from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator

from carwash_jobs.errors import ConfigurationError
from carwash_jobs.registry import AnyTaskType, TaskRegistry
from carwash_jobs.settings import Settings
from carwash_jobs.store.base import Inserted
from carwash_jobs.uploads import remove_upload, store_upload
from endpoints.deps import QueueDep
from endpoints.schemas import (
    LOCATION_HEADER,
    OPTION_FIELDS,
    EnqueueOptionsIn,
    JobOut,
    UploadForm,
    decode_form_field,
    holds_datetime,
    iso_datetime_text,
    json_scalars_only,
    options_of,
    queue_name_type,
)

#: the multipart part that carries the file (shared/API.md: "multipart form with `file`")
FILE_PART = "file"
#: room for the form's other parts and the multipart framing beside a file of the largest size
FORM_OVERHEAD_BYTES = 64 * 1024

_RAISES = [ValidationException, NotAuthorizedException, RequestEntityTooLarge]
_EXISTING = {
    HTTP_200_OK: ResponseSpec(
        data_container=JobOut, generate_examples=False,
        description="A job with this idempotency_key exists already: that job, nothing new queued.",
    )
}

Handler = Callable[..., Awaitable[Response[JobOut]]]


def task_routes(registry: TaskRegistry, settings: Settings) -> list[HTTPRouteHandler]:
    routes: list[HTTPRouteHandler] = []
    for t in registry:
        queue_field = _queue_field(settings, t)
        routes.append(_upload_route(t, queue_field, settings) if t.upload_field
                      else _json_route(t, queue_field))
    return routes


def _queue_field(settings: Settings, task: AnyTaskType) -> tuple[Any, Any]:
    names = sorted(settings.queues)
    return (
        queue_name_type(names) | None,
        Field(default=None, description=(
            f'The named queue; default "{task.options.queue}" (the task type\'s). '
            f'One of: {", ".join(names)}.'
        )),
    )


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.replace("-", "_").split("_"))


def _check_no_clash(task_type: AnyTaskType, names: set[str], reserved: frozenset[str]) -> None:
    clash = sorted(names & reserved)
    if clash:
        raise ConfigurationError(
            f"task type {task_type.name!r}: payload field {clash[0]!r} clashes with an enqueue option "
            f"or the upload's {FILE_PART!r} part; rename it"
        )


def _examples(task_type: AnyTaskType) -> list[Example] | None:
    """The task type's payload examples; a form's leave out the field the server fills in."""
    examples = [
        Example(
            summary=f"{task_type.name} example {i}",
            value={k: v for k, v in example.items() if k != task_type.upload_field},
        )
        for i, example in enumerate(task_type.examples, start=1)
    ]
    return examples or None


def _body(model: type[BaseModel], marker: Any) -> Any:
    """`Annotated[model, marker]` for a model made at run time (a static checker cannot follow)."""
    return cast(Any, Annotated)[model, marker]


def _route(
    task_type: AnyTaskType, handler: Handler, body: Any, *, upload_limit: int | None = None
) -> HTTPRouteHandler:
    """Give the generated handler its request model and register it as a POST route. A
    multipart route passes `upload_limit`, its body limit (Litestar closes the form's spooled
    files however the request ends), and has its form parsed by `_parse_form` first."""
    handler.__annotations__["data"] = body
    handler.__name__ = f"enqueue_{task_type.name}"
    decorator = post(
        f"/tasks/{task_type.route_slug}",
        name=f"enqueue-{task_type.route_slug}",
        operation_id=f"enqueue_{task_type.name}",
        summary=f"Enqueue a job of type {task_type.name}",
        description=task_type.description or None,
        status_code=HTTP_202_ACCEPTED,
        response_headers=[LOCATION_HEADER],
        responses=_EXISTING,
        raises=_RAISES,
        tags=["tasks"],
        request_max_body_size=Empty if upload_limit is None else upload_limit,
        before_request=None if upload_limit is None else _parse_form,
    )
    return decorator(handler)


def _accepted(inserted: Inserted) -> Response[JobOut]:
    job = inserted.job
    return Response(
        JobOut.from_row(job),
        status_code=HTTP_202_ACCEPTED if inserted.created else HTTP_200_OK,
        headers={"Location": f"/api/jobs/{job.id}"},
    )


# -- JSON ------------------------------------------------------------------------------------------
def enqueue_model(task_type: AnyTaskType, queue_field: tuple[Any, Any]) -> type[BaseModel]:
    """The request model of a JSON route: the payload model (with its validators and its
    `extra` policy) extended by the enqueue options."""
    payload_model = task_type.payload_model
    _check_no_clash(task_type, set(payload_model.model_fields), OPTION_FIELDS)
    validators: dict[str, Any] = {"_json_scalars_only": model_validator(mode="before")(json_scalars_only)}
    model: type[BaseModel] = create_model(
        f"{_camel(task_type.name)}Enqueue",
        __base__=(payload_model, EnqueueOptionsIn),
        __doc__=f"{payload_model.__name__} fields plus the enqueue options.",
        __validators__=validators,
        queue=queue_field,
    )
    return model


def _json_route(task_type: AnyTaskType, queue_field: tuple[Any, Any]) -> HTTPRouteHandler:
    model = enqueue_model(task_type, queue_field)
    name = task_type.name

    async def enqueue(data: Any, job_queue: QueueDep) -> Response[JobOut]:
        payload = data.model_dump(by_alias=True, exclude=OPTION_FIELDS)
        return _accepted(await job_queue.enqueue(name, payload, options_of(data)))

    body = _body(model, Body(title=model.__name__, examples=_examples(task_type)))
    return _route(task_type, enqueue, body)


# -- multipart ---------------------------------------------------------------------------------------
async def _parse_form(request: Request[Any, Any, Any]) -> None:
    """Parse the form before the handler's arguments are read (they are then read from the form
    parsed here): a text part whose charset is no text encoding (`charset=nope`, `base64`,
    `undefined`) or whose bytes are not text in it makes Litestar's parser raise LookupError or
    UnicodeError, which left as a 500; it is bad input, so it is a 400. The parser does not say
    which part failed, so the answer cannot name it."""
    try:
        await request.form()
    except (KeyError, IndexError):  # LookupErrors too, but a fault of the parser's own
        raise
    except (LookupError, UnicodeError) as exc:
        raise ClientException(f"the form could not be decoded: {_undecodable(exc)}") from None


def _undecodable(exc: LookupError | UnicodeError) -> str:
    if isinstance(exc, UnicodeDecodeError):
        return f"a part is not valid {exc.encoding} text ({exc.reason})"
    return "a part's charset is not a text encoding"


def upload_model(task_type: AnyTaskType, queue_field: tuple[Any, Any]) -> type[BaseModel]:
    """The request model of a multipart route: `file`, the payload fields other than
    `upload_field`, and the enqueue options. The payload model's own validators run later,
    when the queue validates the payload with the stored file's path in it."""
    payload_model = task_type.payload_model
    fields = {
        name: (info.annotation, info)
        for name, info in payload_model.model_fields.items()
        if name != task_type.upload_field
    }
    _check_no_clash(task_type, set(fields), OPTION_FIELDS | {FILE_PART})
    decoded = [name for name, (annotation, _) in fields.items() if not _is_text(annotation)]
    datetimes = [name for name, (annotation, _) in fields.items() if holds_datetime(annotation)]

    class Form(UploadForm):
        model_config = ConfigDict(extra=payload_model.model_config.get("extra") or "ignore")

    definitions: dict[str, Any] = {
        **fields,
        FILE_PART: (UploadFile, Field(description="The file; stored before the job is queued.")),
        "queue": queue_field,
    }
    model: type[BaseModel] = create_model(
        f"{_camel(task_type.name)}Upload",
        __base__=Form,
        __doc__=f"A multipart form: `{FILE_PART}`, the other {payload_model.__name__} fields, the options.",
        __validators__={**_json_decoders(decoded), **_iso_datetimes(datetimes)},
        **definitions,
    )
    return model


def _is_text(annotation: Any) -> bool:
    return annotation in (str, str | None)


def _json_decoders(names: list[str]) -> dict[str, Any]:
    """Before-validators that decode JSON text in form fields whose type is not text."""
    if not names:
        return {}

    def decode(cls: type[BaseModel], value: Any) -> Any:
        return decode_form_field(value)

    return {"_decode_json_fields": field_validator(*names, mode="before")(decode)}


def _iso_datetimes(names: list[str]) -> dict[str, Any]:
    """Before-validators that take a form's datetime fields as ISO 8601 date-time text only, as
    run_at is: pydantic would read "0" as 1970-01-01."""
    if not names:
        return {}

    def check(cls: type[BaseModel], value: Any) -> Any:
        return iso_datetime_text(value)

    return {"_iso_datetimes": field_validator(*names, mode="before")(check)}


def _upload_route(
    task_type: AnyTaskType, queue_field: tuple[Any, Any], settings: Settings
) -> HTTPRouteHandler:
    model = upload_model(task_type, queue_field)
    name, upload_field = task_type.name, task_type.upload_field
    assert upload_field is not None
    files_dir, max_bytes = settings.files_dir, settings.max_upload_bytes

    async def enqueue(data: Any, job_queue: QueueDep) -> Response[JobOut]:
        upload: UploadFile = getattr(data, FILE_PART)
        try:
            path = await store_upload(upload.file, upload.filename, files_dir, max_bytes)
        finally:
            await upload.close()
        payload = data.model_dump(by_alias=True, exclude=OPTION_FIELDS | {FILE_PART})
        payload[upload_field] = str(path)
        try:
            inserted = await job_queue.enqueue(name, payload, options_of(data))
        except Exception:  # refused, nothing committed (a cancellation may have committed: keep it)
            await remove_upload(path)
            raise
        if not inserted.created:
            await remove_upload(path)  # the existing job keeps its own file
        return _accepted(inserted)

    body = _body(
        model,
        Body(title=model.__name__, media_type=RequestEncodingType.MULTI_PART, examples=_examples(task_type)),
    )
    return _route(task_type, enqueue, body, upload_limit=max_bytes + FORM_OVERHEAD_BYTES)

"""Exception handlers: the only place that turns engine errors into HTTP status codes.

Every error leaves in one shape, `{"status_code", "detail", "extra"}` (Litestar's), with
`extra` always present. Input errors carry `extra = [{"key": field, "message": ...}]`, the same
list Litestar's own validation produces, so a client reads one shape for every 400.
"""

import logging
from typing import Any

from litestar import MediaType, Request, Response
from litestar.exceptions import ClientException, HTTPException, SerializationException
from litestar.status_codes import (
    HTTP_400_BAD_REQUEST,
    HTTP_404_NOT_FOUND,
    HTTP_409_CONFLICT,
    HTTP_413_REQUEST_ENTITY_TOO_LARGE,
    HTTP_500_INTERNAL_SERVER_ERROR,
    HTTP_503_SERVICE_UNAVAILABLE,
)
from litestar.types import ExceptionHandlersMap

from carwash_jobs.errors import (
    CarwashError,
    IllegalTransition,
    InvalidPayload,
    JobNotFound,
    PayloadTooLarge,
    StoreUnavailable,
    UnknownDependency,
    UnknownTaskType,
)

log = logging.getLogger(__name__)


class ConflictException(ClientException):
    """The job's state does not allow the action (documented as 409 in the OpenAPI)."""

    status_code = HTTP_409_CONFLICT


def error_response(
    status_code: int, detail: str, extra: Any = None, headers: dict[str, str] | None = None
) -> Response[dict[str, Any]]:
    return Response(
        {"status_code": status_code, "detail": detail, "extra": extra},
        status_code=status_code, media_type=MediaType.JSON, headers=headers,
    )


def field_error(field: str, message: str, source: str = "body") -> list[dict[str, str]]:
    """The `extra` of a 400 that names one field."""
    return [{"key": field, "message": message, "source": source}]


def _http_exception(request: Request[Any, Any, Any], exc: HTTPException) -> Response[dict[str, Any]]:
    detail = exc.detail
    if exc.status_code >= HTTP_500_INTERNAL_SERVER_ERROR and exc.status_code != HTTP_503_SERVICE_UNAVAILABLE:
        return _unexpected(request, exc)
    extra = exc.extra if isinstance(exc.extra, (dict, list)) else None
    if isinstance(extra, list):
        extra = [_keyed(item) for item in extra]
    return error_response(exc.status_code, detail, extra, exc.headers)


#: Litestar's item for a request without a body: the KeyError of its `data` parameter
_NO_BODY = {"message": "'data'", "key": "data", "source": "body"}


def _keyed(item: Any) -> Any:
    """An item of a 400's `extra` names the field that is wrong. Litestar's own items for a
    body that is not an object at all (an array, null, a number) name none, and for a missing
    body name its handler's parameter: in both the body is what is wrong."""
    if item == _NO_BODY:
        return {"key": "body", "message": "the request has no body; a JSON object is required",
                "source": "body"}
    if isinstance(item, dict) and "key" not in item:
        return {"key": "body", **item, "source": item.get("source", "body")}
    return item


def _carwash_error(request: Request[Any, Any, Any], exc: CarwashError) -> Response[dict[str, Any]]:
    match exc:
        case JobNotFound():
            return error_response(HTTP_404_NOT_FOUND, exc.message, {"job_id": exc.job_id})
        case IllegalTransition():
            return error_response(
                HTTP_409_CONFLICT, exc.message,
                {"job_id": exc.job_id, "status": exc.from_status, "action": exc.action},
            )
        case InvalidPayload():
            return error_response(HTTP_400_BAD_REQUEST, exc.message, field_error(exc.field, exc.problem))
        case UnknownDependency():
            return error_response(HTTP_400_BAD_REQUEST, exc.message, field_error("depends_on", exc.message))
        case UnknownTaskType():
            return error_response(HTTP_400_BAD_REQUEST, exc.message, field_error("task_type", exc.message))
        case PayloadTooLarge():
            return error_response(HTTP_413_REQUEST_ENTITY_TOO_LARGE, exc.message)
        case StoreUnavailable():
            log.warning("%s %s: %s", request.method, request.url.path, exc.message)
            return error_response(HTTP_503_SERVICE_UNAVAILABLE, exc.message)
    return _unexpected(request, exc)


class BodyDepthRequest(Request[Any, Any, Any]):
    """The app's request: a JSON body nested deeper than Python's recursion limit makes the
    decoder (msgspec) raise RecursionError, which would leave as a 500; it is bad input, so it
    becomes the SerializationException any malformed body raises, and so a 400. Caught here,
    where the body is decoded, and not as a handler for every RecursionError: one raised by a
    fault in the code is still a 500."""

    async def json(self) -> Any:
        try:
            return await super().json()
        except RecursionError:
            raise SerializationException("the JSON body is nested too deeply") from None


def _undecodable(request: Request[Any, Any, Any], exc: UnicodeDecodeError) -> Response[dict[str, Any]]:
    """A form part that is not valid text in its charset is bad input, not a server fault."""
    return error_response(HTTP_400_BAD_REQUEST, f"the request is not valid text: {exc.reason}")


def _unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, Any]]:
    # Logged with the method and path only: the headers (and so the token) never reach a log.
    log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return error_response(HTTP_500_INTERNAL_SERVER_ERROR, "Internal Server Error")


def exception_handlers() -> ExceptionHandlersMap:
    return {
        HTTPException: _http_exception,
        CarwashError: _carwash_error,
        UnicodeDecodeError: _undecodable,
        Exception: _unexpected,
    }

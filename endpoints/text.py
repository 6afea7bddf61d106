"""No text the API takes may hold U+0000 (NUL): PostgreSQL cannot store it.

PostgreSQL's `text` cannot hold NUL (asyncpg raises CharacterNotInRepertoireError, which left
as a 500) and its `jsonb` refuses the escape \\u0000; SQLite stores both. So NUL is refused on
every backend alike, with a 400 naming where it is, before anything is read or written: in a
request model's values at any depth, object keys included (schemas.NulFree), and in the path
and query parameters of /api (with the token guard, endpoints/routes.py) and /ui (once a
session is established, endpoints/ui.py); /health, /metrics and the static files take none.
"""

from collections.abc import Mapping
from typing import Any

from litestar.connection import ASGIConnection
from litestar.exceptions import ValidationException
from litestar.handlers import BaseRouteHandler
from pydantic_core import PydanticSerializationError, to_json

from carwash_jobs.types import NUL_PROBLEM
from endpoints.errors import field_error

NUL = "\x00"

Location = tuple[str | int, ...]


def nul_location(value: Any) -> Location | None:
    """Where in `value` (text, or mappings and lists of it, as JSON decodes) the first text
    holding NUL is, as a path of keys and indexes; None when there is none.

    Every request body goes through here, so a container is first written as JSON by
    pydantic-core, which writes NUL as \\u0000 (1-2 us for an enqueue's body): only a body
    where that is found is walked (10 us), to name the place or to clear a text that merely
    holds those six characters."""
    if isinstance(value, str):
        return () if NUL in value else None
    try:
        if b"\\u0000" not in to_json(value, fallback=repr):
            return None
    except PydanticSerializationError:  # nested deeper than the encoder goes: walked instead
        pass
    try:
        return _walk(value, ())
    except RecursionError:  # deeper still: the checks of depth that follow refuse it
        return None


def _walk(value: Any, where: Location) -> Location | None:
    if isinstance(value, str):
        return where if NUL in value else None
    if isinstance(value, Mapping):
        items: Any = value.items()
    elif isinstance(value, list | tuple):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        if isinstance(key, str) and NUL in key:
            return (*where, key)
        if (found := _walk(item, (*where, key))) is not None:
            return found
    return None


async def refuse_nul_params(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    """A path or query parameter holding NUL is a 400 naming it (a job id too: an id holding
    NUL cannot exist, and looking it up was a 500 on PostgreSQL). Run after the caller is known
    to be let in (the token, the session), so that one who is not gets 401 or the login page
    whatever the address holds."""
    params = [("path", name, value) for name, value in connection.path_params.items()]
    params += [("query", name, value) for name, value in connection.query_params.multi_items()]
    for source, name, value in params:
        if nul_location(value) is not None:
            problem = f"{name} {NUL_PROBLEM}"
            extra = field_error(name, problem, source)
            raise ValidationException(f"Validation failed: {problem}", extra=extra)

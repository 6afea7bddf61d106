"""The bearer-token guard of /api/* (and of /metrics when it is not public).

A guard, not a middleware: Litestar runs guards before it decodes the body, so a request
without the token gets 401 whatever it carries, and nothing is written. The comparison takes
constant time, so response timing does not reveal how much of a guess was right.
"""

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException
from litestar.handlers import BaseRouteHandler

#: the OpenAPI security scheme name the /api routes declare
SECURITY_SCHEME = "BearerToken"
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="carwash-jobs"'}


#: a guard as bearer_guard makes it: async, so that another guard can await it
AsyncGuard = Callable[[ASGIConnection[Any, Any, Any, Any], BaseRouteHandler], Awaitable[None]]


def bearer_guard(token: str) -> AsyncGuard:
    """A guard that admits requests carrying `Authorization: Bearer <token>`."""
    expected = token.encode("utf-8")

    # async although it never awaits: Litestar runs a plain function guard in a worker thread,
    # a thread hop on every request for a comparison that takes a microsecond
    async def guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
        header = connection.headers.get("authorization")
        if header is None:
            raise NotAuthorizedException("missing bearer token", headers=_CHALLENGE)
        scheme, _sep, given = header.partition(" ")
        # Header values arrive as latin-1 text; encoding back gives the bytes that were sent.
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode("latin-1"), expected
        ):
            raise NotAuthorizedException("invalid bearer token", headers=_CHALLENGE)

    return guard

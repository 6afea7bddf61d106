"""`route_handlers`: the single list of every route the app serves.

/api/* sits behind the bearer-token guard (then the check that refuses NUL in path and query
parameters, endpoints/text.py); /health (and /metrics unless configured otherwise)
stays open; /ui (the dashboard) takes the same token once, at its login, for a session cookie.
The per-task-type routes are generated from the registry.
"""

from typing import Any

from litestar import Router
from litestar.connection import ASGIConnection
from litestar.handlers import BaseRouteHandler
from litestar.types import ControllerRouterHandler, Guard

from carwash_jobs.registry import TaskRegistry
from carwash_jobs.settings import Settings
from endpoints.auth import SECURITY_SCHEME, AsyncGuard, bearer_guard
from endpoints.health import health, metrics_route
from endpoints.jobs import JobController
from endpoints.queue import QueueController
from endpoints.tasks import task_routes
from endpoints.text import refuse_nul_params
from endpoints.ui import ui_routes


def route_handlers(
    registry: TaskRegistry, settings: Settings, *, api_token: str
) -> list[ControllerRouterHandler]:
    """Every route. `api_token` is passed apart from `settings` because `serve` may have just
    generated it; it is captured by the guard and kept nowhere else."""
    guard = bearer_guard(api_token)
    api = Router(
        "/api",
        route_handlers=[*task_routes(registry, settings), JobController, QueueController],
        guards=[_token_then_no_nul(guard)],
        security=[{SECURITY_SCHEME: []}],
    )
    return [api, health, metrics_route([] if settings.metrics_public else [guard]),
            *ui_routes(api_token, secure_cookie=settings.ui_secure_cookie)]


def _token_then_no_nul(token_guard: AsyncGuard) -> Guard:
    """The two checks of every /api request as one guard: Litestar copies the route handler
    for each guard it calls (tens of microseconds a request, measured as 5-10 % of the HTTP
    enqueue rate). The token comes first: without it a request is a 401 whatever it holds."""
    async def guard(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
        await token_guard(connection, handler)
        await refuse_nul_params(connection, handler)

    return guard

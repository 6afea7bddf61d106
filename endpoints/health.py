"""Operations routes: /health (is the database answering?) and /metrics (Prometheus text).

/health is open, for load balancers and orchestrators. /metrics is open unless
settings.metrics_public is false; then it takes the bearer token like /api.
"""

import asyncio
from collections.abc import Sequence

from litestar import Response, get
from litestar.di import NamedDependency
from litestar.exceptions import NotAuthorizedException, ServiceUnavailableException
from litestar.handlers import HTTPRouteHandler
from litestar.types import Guard
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from carwash_jobs.errors import StoreUnavailable
from carwash_jobs.metrics import Metrics
from endpoints.auth import SECURITY_SCHEME
from endpoints.deps import QueueDep, StoreDep
from endpoints.schemas import HealthOut

#: a database that takes longer than this to answer a ping counts as down
PING_TIMEOUT_SECONDS = 5.0


@get("/health", operation_id="health", tags=["operations"], raises=[ServiceUnavailableException])
async def health(job_store: StoreDep) -> HealthOut:
    """200 while the database answers, 503 when it does not (or, on SQLite, when the file the
    store has open is no longer the one at its path: deleted or replaced)."""
    try:
        async with asyncio.timeout(PING_TIMEOUT_SECONDS):
            await job_store.ping()
    except TimeoutError:
        raise StoreUnavailable(f"the database did not answer within {PING_TIMEOUT_SECONDS:.0f}s") from None
    return HealthOut(status="ok", database="ok")


async def _metrics(
    job_queue: QueueDep, metrics: NamedDependency[Metrics]
) -> Response[bytes]:
    """Prometheus text. The depth gauges are refreshed here, at scrape time: counting rows on
    every enqueue would cost the hot path what a scrape every few seconds costs once."""
    stats = await job_queue.stats()
    metrics.in_memory.set(stats.in_memory)
    for status, count in stats.stats.by_status.items():
        metrics.by_status.labels(status).set(count)
    # the type as a header, not as media_type: Litestar appends "; charset=utf-8" to every
    # text/* media type, and this one already ends with it (the header said charset twice)
    return Response(generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


def metrics_route(guards: Sequence[Guard]) -> HTTPRouteHandler:
    """The /metrics route, behind `guards` (none when metrics are public)."""
    decorator = get(
        "/metrics", operation_id="metrics", tags=["operations"], media_type=CONTENT_TYPE_LATEST,
        guards=list(guards), security=[{SECURITY_SCHEME: []}] if guards else None,
        raises=[NotAuthorizedException] if guards else None,
    )
    return decorator(_metrics)


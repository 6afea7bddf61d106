"""Operations routes: /health (is the database answering?) and /metrics (Prometheus text).

/health is open, for load balancers and orchestrators. /metrics is open unless
settings.metrics_public is false; then it takes the bearer token like /api.
"""

import asyncio
import logging
from collections.abc import Sequence

from litestar import Response, get
from litestar.di import NamedDependency
from litestar.exceptions import NotAuthorizedException, ServiceUnavailableException
from litestar.handlers import HTTPRouteHandler
from litestar.types import Guard
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from carwash_jobs.errors import StoreUnavailable
from carwash_jobs.metrics import Metrics
from carwash_jobs.store.base import JobStore
from endpoints.auth import SECURITY_SCHEME
from endpoints.deps import QueueDep, StoreDep
from endpoints.schemas import HealthOut

#: a database that takes longer than this to answer a ping counts as down
PING_TIMEOUT_SECONDS = 5.0
#: how long a scrape waits for the database's counts: well inside Prometheus's default scrape
#: timeout (10 s), so a database that hangs costs the scrape those counts, not every series
STATS_TIMEOUT_SECONDS = 2.0

log = logging.getLogger(__name__)


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
    job_queue: QueueDep, job_store: StoreDep, metrics: NamedDependency[Metrics]
) -> Response[bytes]:
    """Prometheus text. The depth gauges are refreshed here, at scrape time: counting rows on
    every enqueue would cost the hot path what a scrape every few seconds costs once. A
    database that fails or hangs leaves its counts out of the scrape, and the series of this
    process in: /metrics was a 500 during an outage, and Prometheus lost every series just when
    they mattered."""
    metrics.in_memory.set(job_queue.in_memory)
    metrics.stats_up.set(1 if await _count_jobs_by_status(job_store, metrics) else 0)
    # the type as a header, not as media_type: Litestar appends "; charset=utf-8" to every
    # text/* media type, and this one already ends with it (the header said charset twice)
    return Response(generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _count_jobs_by_status(job_store: JobStore, metrics: Metrics) -> bool:
    """Refresh carwash_queue_jobs from the database; whether it answered in time. When it did
    not, the counts are left out rather than kept at their last values, which would read as a
    queue that stands still."""
    try:
        async with asyncio.timeout(STATS_TIMEOUT_SECONDS):
            stats = await job_store.stats()
    except Exception as exc:  # whatever the database's trouble, the scrape goes on without it
        reason = (f"did not answer within {STATS_TIMEOUT_SECONDS:g}s"
                  if isinstance(exc, TimeoutError) else f"failed: {exc}")
        log.warning("/metrics leaves the job counts out: the database %s", reason)
        metrics.by_status.clear()
        return False
    for status, count in stats.by_status.items():
        metrics.by_status.labels(status).set(count)
    return True


def metrics_route(guards: Sequence[Guard]) -> HTTPRouteHandler:
    """The /metrics route, behind `guards` (none when metrics are public)."""
    decorator = get(
        "/metrics", operation_id="metrics", tags=["operations"], media_type=CONTENT_TYPE_LATEST,
        guards=list(guards), security=[{SECURITY_SCHEME: []}] if guards else None,
        raises=[NotAuthorizedException] if guards else None,
    )
    return decorator(_metrics)


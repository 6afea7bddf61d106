"""The chain every handler run passes through: logging, metrics and tracing are middleware,
and users add their own the same way (the Python counterpart of Hangfire's filters)."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from carwash_jobs import tracing

if TYPE_CHECKING:
    from carwash_jobs.context import JobContext
    from carwash_jobs.metrics import Metrics

CallNext = Callable[[], Awaitable[Any]]
Middleware = Callable[["JobContext", CallNext], Awaitable[Any]]

log = logging.getLogger("carwash_jobs.jobs")


def chain(middleware: Sequence[Middleware], ctx: JobContext, run: CallNext) -> Awaitable[Any]:
    """Wrap `run` in `middleware`, the first one outermost."""
    call = run
    for mw in reversed(middleware):
        call = _bind(mw, ctx, call)
    return call()


def _bind(mw: Middleware, ctx: JobContext, call_next: CallNext) -> CallNext:
    return lambda: mw(ctx, call_next)


async def logging_middleware(ctx: JobContext, call_next: CallNext) -> Any:
    started = time.perf_counter()
    ctx.logger.debug("started")
    try:
        result = await call_next()
    except BaseException as exc:
        ctx.logger.info("attempt ended with %s after %.3fs", type(exc).__name__,
                        time.perf_counter() - started)
        raise
    ctx.logger.info("completed in %.3fs", time.perf_counter() - started)
    return result


def metrics_middleware(metrics: Metrics) -> Middleware:
    async def measure(ctx: JobContext, call_next: CallNext) -> Any:
        started = time.perf_counter()
        try:
            return await call_next()
        finally:
            metrics.duration.labels(ctx.task_type).observe(time.perf_counter() - started)

    return measure


def tracing_middleware() -> Middleware | None:
    """An OpenTelemetry span per run when the optional `otel` extra is installed."""
    try:
        from opentelemetry import trace
    except ImportError:
        return None
    tracer = trace.get_tracer("carwash_jobs")

    async def traced(ctx: JobContext, call_next: CallNext) -> Any:
        if not tracing.recording():
            return await call_next()
        with tracer.start_as_current_span(
            f"job {ctx.task_type}",
            attributes={"job.id": ctx.job_id, "job.attempt": ctx.attempt},
        ):
            return await call_next()

    return traced

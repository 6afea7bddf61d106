"""OpenTelemetry spans around the engine's own steps (an enqueue), when the optional `otel` extra
is installed. Without it a span is a no-op, so the engine never depends on OpenTelemetry; handler
runs get theirs from middleware.tracing_middleware."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterator

try:
    from opentelemetry import trace

    #: a proxy until the application sets a tracer provider, then that provider's tracer
    _TRACER: Any = trace.get_tracer("carwash_jobs")
except ImportError:  # the `otel` extra is not installed
    _TRACER = None


class _NoSpan:
    def set_attribute(self, key: str, value: str | int) -> None:
        """Nothing records it."""


_NO_SPAN = _NoSpan()


def recording() -> bool:
    """Whether the application has set a tracer provider. Until it does, every span would be a
    non-recording one that still takes microseconds to open and make current, on every enqueue
    and every handler run: those are skipped."""
    return _TRACER is not None and not isinstance(
        trace.get_tracer_provider(), trace.ProxyTracerProvider
    )


@contextlib.contextmanager
def span(name: str, **attributes: str | int) -> Iterator[Any]:
    """A span named `name`, current for the block; it records an exception that escapes."""
    if not recording():
        yield _NO_SPAN
        return
    with _TRACER.start_as_current_span(name, attributes=attributes) as current:
        yield current

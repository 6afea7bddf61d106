"""The composition root: the only engine module that names task types and the HTTP layer.

It loads the task types listed in the settings, builds the Runtime, and (for the HTTP roles)
the Litestar application around it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from carwash_jobs.registry import TaskRegistry
from carwash_jobs.runtime import Role, Runtime

if TYPE_CHECKING:
    from carwash_jobs.middleware import Middleware
    from carwash_jobs.settings import Settings
    from carwash_jobs.types import Clock


def build_registry(settings: Settings) -> TaskRegistry:
    return TaskRegistry.load(settings.task_types)


def build_runtime(
    settings: Settings,
    *,
    role: Role = "all",
    registry: TaskRegistry | None = None,
    middleware: Sequence[Middleware] = (),
    services: Mapping[str, Any] | None = None,
    clock: Clock | None = None,
) -> Runtime:
    extra: dict[str, Any] = {} if clock is None else {"clock": clock}
    return Runtime(
        settings, registry or build_registry(settings), role=role, middleware=middleware,
        services=services, **extra,
    )


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line, carrying the job fields a JobLogger attaches."""

    FIELDS = ("job_id", "task_type", "attempt")

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "at": self.formatTime(record), "level": record.levelname, "logger": record.name,
            "message": record.getMessage(),
        }
        for name in self.FIELDS:
            if hasattr(record, name):
                entry[name] = getattr(record, name)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)

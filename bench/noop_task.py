"""The no-op task type, as a module a served process can load by name (CARWASH_TASK_TYPES)."""

from __future__ import annotations

from bench.support import NOOP

TASK_TYPE = NOOP

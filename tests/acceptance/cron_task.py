"""Test-only task type "cron_tick", fired by a schedule in the cron acceptance test; its result
names the worker process that ran it."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from carwash_jobs.registry import TaskOptions, TaskType

if TYPE_CHECKING:
    from carwash_jobs.context import JobContext


class TickPayload(BaseModel):
    label: str = ""


async def cron_tick(ctx: JobContext, payload: TickPayload) -> dict[str, Any]:
    return {"label": payload.label, "pid": os.getpid(), "attempt": ctx.attempt}


TASK_TYPE = TaskType("cron_tick", TickPayload, cron_tick, TaskOptions(max_attempts=3))

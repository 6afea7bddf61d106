"""slow: sleeps, so a test can find a job running (or still queued behind it)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from pydantic import BaseModel, Field

from carwash_jobs.registry import TaskOptions, TaskType

if TYPE_CHECKING:
    from carwash_jobs.context import JobContext


class SlowPayload(BaseModel):
    seconds: float = Field(default=0.05, ge=0, le=5)


async def slow(ctx: JobContext, payload: SlowPayload) -> dict[str, float]:
    await asyncio.sleep(payload.seconds)
    return {"slept": payload.seconds}


TASK_TYPE = TaskType("slow_sleep", SlowPayload, slow, TaskOptions(concurrency=1), slug="slow")

"""gated: a test-only task type that fails (retryably) until a file exists, so a browser test
can watch a failed job come back to life after a retry, and a metrics test can see a retry
(the registry loads one TASK_TYPE per module path)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel

from carwash_jobs.registry import TaskType

if TYPE_CHECKING:
    from carwash_jobs.context import JobContext


class GateClosed(RuntimeError):
    """An ordinary exception: the job is retried by its policy while attempts are left."""


class GatedPayload(BaseModel):
    gate: str


async def gated(ctx: JobContext, payload: GatedPayload) -> dict[str, str]:
    if not await asyncio.to_thread(Path(payload.gate).exists):
        raise GateClosed(f"the gate {payload.gate} is closed")
    await ctx.progress(1, 1)
    return {"passed": payload.gate}


TASK_TYPE = TaskType("gated", GatedPayload, gated, description="Fails until its gate file exists.")

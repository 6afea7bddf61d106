"""Test-only task type "limited": at most LIMIT jobs of it run at once across the fleet.

Each job records `start job_id attempt pid` and `end job_id attempt pid` (see tasks_record) and
sleeps in between. The record file is appended to in real time by every worker process, so its
order tells how many handlers of this type were inside at once, across processes.
"""

from __future__ import annotations

import asyncio
import os
from typing import TYPE_CHECKING

from pydantic import BaseModel

from carwash_jobs.registry import TaskOptions, TaskType
from tests.acceptance.tasks_record import append_line

if TYPE_CHECKING:
    from carwash_jobs.context import JobContext

LIMIT = 2


class LimitedPayload(BaseModel):
    seconds: float = 0.1


async def limited(ctx: JobContext, payload: LimitedPayload) -> float:
    append_line(f"start {ctx.job_id} {ctx.attempt} {os.getpid()}")
    await asyncio.sleep(payload.seconds)
    append_line(f"end {ctx.job_id} {ctx.attempt} {os.getpid()}")
    return payload.seconds


TASK_TYPE = TaskType("limited", LimitedPayload, limited,
                     TaskOptions(max_attempts=3, concurrency=LIMIT))

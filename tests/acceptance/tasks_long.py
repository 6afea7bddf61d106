"""Test-only task type "long": sleeps `seconds`, recording its start and its end.

The record file gets `start job_id attempt pid` and `end job_id attempt pid` lines (see
tasks_record). A worker started with LONG_CAP_ENV set runs every job for at most that many
seconds, so a test can make the same jobs long in one process and short after a restart.
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

LONG_CAP_ENV = "CARWASH_TEST_LONG_CAP_SECONDS"


class LongPayload(BaseModel):
    seconds: float


async def long(ctx: JobContext, payload: LongPayload) -> float:
    cap = os.environ.get(LONG_CAP_ENV)
    seconds = payload.seconds if cap is None else min(payload.seconds, float(cap))
    append_line(f"start {ctx.job_id} {ctx.attempt} {os.getpid()}")
    await asyncio.sleep(seconds)  # a shutdown past its grace cancels the job right here
    append_line(f"end {ctx.job_id} {ctx.attempt} {os.getpid()}")
    return seconds


TASK_TYPE = TaskType("long", LongPayload, long, TaskOptions(max_attempts=3))

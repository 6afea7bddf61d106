"""Test-only task type "record": appends `job_id attempt pid` to the record file, then may sleep.

Worker processes load it through CARWASH_TASK_TYPES. The record file is named by the
environment variable RECORD_FILE_ENV; every line is written with one `os.write` on an
O_APPEND descriptor, so lines of concurrent handlers and processes never interleave, and the
file is the handlers' own account of which attempt ran where.
"""

from __future__ import annotations

import asyncio
import os
from typing import TYPE_CHECKING

from pydantic import BaseModel

from carwash_jobs.registry import TaskOptions, TaskType

if TYPE_CHECKING:
    from carwash_jobs.context import JobContext

RECORD_FILE_ENV = "CARWASH_TEST_RECORD_FILE"


class RecordPayload(BaseModel):
    n: int = 0
    sleep_ms: int = 0


def append_line(line: str) -> None:
    """Append one whole line to the record file in a single write."""
    fd = os.open(os.environ[RECORD_FILE_ENV], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{line}\n".encode())
    finally:
        os.close(fd)


async def record(ctx: JobContext, payload: RecordPayload) -> int:
    append_line(f"{ctx.job_id} {ctx.attempt} {os.getpid()}")
    if payload.sleep_ms:
        await asyncio.sleep(payload.sleep_ms / 1000)
    return payload.n


TASK_TYPE = TaskType("record", RecordPayload, record, TaskOptions(max_attempts=5))

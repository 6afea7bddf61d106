"""fail: always fails permanently, so a test gets a `failed` job in one attempt."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import BaseModel

from carwash_jobs.errors import PermanentError
from carwash_jobs.registry import TaskType

if TYPE_CHECKING:
    from carwash_jobs.context import JobContext


class FailPayload(BaseModel):
    reason: str = "told to fail"


async def fail(ctx: JobContext, payload: FailPayload) -> None:
    raise PermanentError(payload.reason)


TASK_TYPE = TaskType("fail", FailPayload, fail, description="Fails at once, without retries.")

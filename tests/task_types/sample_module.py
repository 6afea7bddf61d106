"""A task type that exists only in the tests: adding one is this module plus one config line.

the README section "Adding a task type" walks through it; test_adding_a_task_type.py loads it by its dotted
path, exactly as the settings' task_types list does, and runs it through the engine.
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING

from pydantic import BaseModel, Field

from carwash_jobs.registry import TaskOptions, TaskType

if TYPE_CHECKING:
    from carwash_jobs.context import JobContext


class TallyPayload(BaseModel):
    """What the POST body (or `carwash-jobs enqueue tally --json ...`) must hold."""

    numbers: list[int] = Field(min_length=1, max_length=10_000)
    chunk_size: int = Field(default=100, ge=1)


class TallyResult(BaseModel):
    total: int
    count: int


async def tally(ctx: JobContext, payload: TallyPayload) -> TallyResult:
    """Adds the numbers a chunk at a time, checkpointing after each, so a retry resumes."""
    saved = ctx.checkpoint or {}
    done, total = int(saved.get("done", 0)), int(saved.get("total", 0))
    while done < len(payload.numbers):
        chunk = payload.numbers[done:done + payload.chunk_size]
        total, done = total + sum(chunk), done + len(chunk)
        await ctx.save_checkpoint({"done": done, "total": total}, done=done,
                                  total=len(payload.numbers))
    return TallyResult(total=total, count=len(payload.numbers))


TASK_TYPE: TaskType[TallyPayload, TallyResult] = TaskType(
    name="tally",
    payload_model=TallyPayload,
    handler=tally,
    result_model=TallyResult,
    options=TaskOptions(max_attempts=3, timeout=timedelta(minutes=1)),
    description="Add up numbers (the how-to's example task type).",
    examples=[{"numbers": [1, 2, 3]}],
)

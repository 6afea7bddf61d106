"""echo: completes with its payload as the result; the payload model exercises every kind of field."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field

from carwash_jobs.registry import TaskOptions, TaskType

if TYPE_CHECKING:
    from carwash_jobs.context import JobContext


class Recipient(BaseModel):
    email: str = Field(min_length=3, max_length=200)
    name: str | None = None


class EchoPayload(BaseModel):
    message: str = Field(max_length=1000)
    amount_cents: int = Field(default=1, gt=0, le=10**12)
    mode: Literal["plain", "loud"] = "plain"
    recipients: list[Recipient] = Field(default_factory=list, max_length=20)


async def echo(ctx: JobContext, payload: EchoPayload) -> dict[str, Any]:
    await ctx.progress(1, 1)
    return payload.model_dump(mode="json")


TASK_TYPE = TaskType(
    "echo", EchoPayload, echo, TaskOptions(max_attempts=3),
    description="Completes with its payload as the result.",
    examples=[{"message": "hello", "amount_cents": 250, "recipients": [{"email": "a@example.com"}]}],
)

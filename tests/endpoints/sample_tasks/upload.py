"""upload: a multipart task type; its handler counts the lines of the stored file."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, Field

from carwash_jobs.registry import TaskType

if TYPE_CHECKING:
    from carwash_jobs.context import JobContext


class UploadPayload(BaseModel):
    path: str = Field(description="Where the uploaded file was stored.")
    kind: Literal["employees"]
    tenant_id: str = Field(min_length=1, max_length=100)
    notes: dict[str, str] | None = None


async def count_lines(ctx: JobContext, payload: UploadPayload) -> dict[str, int]:
    text = await asyncio.to_thread(Path(payload.path).read_text, encoding="utf-8-sig")
    return {"lines": len(text.splitlines())}


TASK_TYPE = TaskType(
    "file_upload", UploadPayload, count_lines, upload_field="path",
    description="Counts the lines of an uploaded file.",
)

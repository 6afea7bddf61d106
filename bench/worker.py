"""A worker process for the cross-process pickup scenario: prints `n wall-clock-start` for
every job it starts, so the parent can measure enqueue-to-start across processes."""

from __future__ import annotations

import asyncio
import sys
import time
from typing import TYPE_CHECKING

from bench.support import NoopPayload, engine
from carwash_jobs.registry import TaskType

if TYPE_CHECKING:
    from carwash_jobs.context import JobContext


async def record(ctx: JobContext, payload: NoopPayload) -> None:
    print(payload.n, time.time(), flush=True)


async def main(url: str) -> None:
    async with engine(url, task_type=TaskType("noop", NoopPayload, record)):
        print("ready", flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))

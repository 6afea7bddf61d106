"""A worker process for the cross-process scenarios.

`python -m bench.worker URL`: the pickup scenario's worker; prints `n wall-clock-start` for
every job it starts, so the parent can measure enqueue-to-start across processes.

`python -m bench.worker URL --drain JOBS`: the workers scenario's worker; loads up to JOBS due
jobs into memory, prints "ready", and starts claiming only once the parent writes "go", so
every worker starts at the same moment and the timed window holds only the drain.
"""

from __future__ import annotations

import argparse
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


async def drain(url: str, jobs: int) -> None:
    """Runs until terminated. The backlog is reloaded by hand: processor.start() does not read
    the table, and the engine has no scheduler to reload it (whose limit would be 10,000)."""
    async with engine(url, start=False) as e:
        await e.queue.reload(limit=jobs)
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.readline)  # "go"
        await e.processor.start()
        await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.worker")
    parser.add_argument("url")
    parser.add_argument("--drain", type=int, metavar="JOBS",
                        help="drain JOBS preloaded jobs after 'go' on stdin")
    args = parser.parse_args()
    asyncio.run(main(args.url) if args.drain is None else drain(args.url, args.drain))

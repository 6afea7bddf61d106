"""The singleton in-process queue: unbounded, ordered, and only a hint.

It holds ids of due jobs (with what ordering needs), never whole jobs: the row is the truth
and a worker's claim decides who runs a job, so a duplicate here is harmless. Within a named
queue, higher priority first and FIFO within a priority; across named queues, strict rank or
smooth weighted round-robin, so a big batch in `bulk` cannot starve `critical`. Entries of a
task type at its concurrency limit are parked until one of its jobs ends.
"""

from __future__ import annotations

import asyncio
import heapq
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Literal, TypeAlias

from carwash_jobs.store.base import DueJob

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from carwash_jobs.types import JobId

QueueMode = Literal["priority", "weighted"]

#: One waiting job: (-priority, run_at as a timestamp, id, task type, queue). A plain tuple, not
#: a DueJob in a dataclass: a million waiting jobs are a million entries, and this form costs
#: about half the memory (the strings are the job's own or shared; the DueJob is made again when
#: the entry is taken). Ids sort by creation time, so equal priority and run_at go oldest first;
#: an id is unique, so the fields after it never compare.
_Entry: TypeAlias = "tuple[int, float, JobId, str, str]"


class ReadyQueue:
    def __init__(self, mode: QueueMode = "weighted", weights: Mapping[str, int] | None = None):
        self._mode = mode
        self._weights = dict(weights or {})
        self._heaps: dict[str, list[_Entry]] = {}
        self._current: dict[str, int] = {}  # smooth weighted round-robin credit
        self._parked: dict[str, list[_Entry]] = {}
        self._ids: set[JobId] = set()
        self._changed = asyncio.Event()
        #: the last run_at put and its timestamp: the jobs of one enqueue share their run_at,
        #: and so share one float instead of a new one each (24 bytes a job: 30 MB less RSS for a
        #: million waiting jobs, measured)
        self._last_run_at: tuple[datetime, float] | None = None

    def __len__(self) -> int:
        return len(self._ids)

    def contains(self, job_id: JobId) -> bool:
        return job_id in self._ids

    def put(self, job: DueJob) -> bool:
        """Add a due job; False when it is already here."""
        if job.id in self._ids:
            return False
        self._ids.add(job.id)
        entry = (-job.priority, self._timestamp(job.run_at), job.id, job.task_type, job.queue)
        heapq.heappush(self._heaps.setdefault(job.queue, []), entry)
        self._changed.set()
        return True

    def _timestamp(self, run_at: datetime) -> float:
        last = self._last_run_at
        if last is None or last[0] is not run_at:
            last = self._last_run_at = (run_at, run_at.timestamp())
        return last[1]

    def discard(self, job_id: JobId) -> None:
        """Forget a job (cancelled); its entry is skipped when it comes up."""
        self._ids.discard(job_id)

    def take(self, n: int, has_room: Callable[[str], bool]) -> list[DueJob]:
        """Up to `n` jobs in dispatch order; entries whose task type has no room are parked."""
        taken: list[DueJob] = []
        stamp: float | None = None  # entries put together share one float: one datetime for them
        due_at = datetime.min
        while len(taken) < n:
            name = self._next_queue()
            if name is None:
                break
            entry = heapq.heappop(self._heaps[name])
            if not self._heaps[name]:
                del self._heaps[name]
            neg_priority, run_at, job_id, task_type, queue = entry
            if job_id not in self._ids:
                continue  # discarded
            if not has_room(task_type):
                self._parked.setdefault(task_type, []).append(entry)
                continue
            self._ids.discard(job_id)
            if run_at is not stamp:
                stamp, due_at = run_at, datetime.fromtimestamp(run_at, UTC)
            taken.append(DueJob(job_id, task_type, queue, -neg_priority, due_at))
        if not self._heaps:
            self._changed.clear()
        return taken

    def unpark(self, task_type: str) -> None:
        """A job of `task_type` ended: its parked entries may run again."""
        for entry in self._parked.pop(task_type, ()):
            heapq.heappush(self._heaps.setdefault(entry[4], []), entry)
            self._changed.set()

    @property
    def parked(self) -> int:
        return sum(len(v) for v in self._parked.values())

    @property
    def parked_task_types(self) -> frozenset[str]:
        """Task types at their concurrency limit with jobs parked here: a reload leaves them
        out, since more of their jobs could only be parked too (unpark() lets them run)."""
        return frozenset(self._parked)

    async def wait(self) -> None:
        """Until something may be taken."""
        while not self._heaps:
            self._changed.clear()
            await self._changed.wait()

    def _next_queue(self) -> str | None:
        # no heap here is ever empty (take() deletes one as it empties it): with none or one
        # queue there is nothing to choose, the usual case
        if len(self._heaps) <= 1:
            return next(iter(self._heaps), None)
        names = list(self._heaps)
        if self._mode == "priority":
            return max(names, key=lambda name: self._weights.get(name, 0))
        total = 0
        for name in names:
            weight = max(self._weights.get(name, 1), 1)
            self._current[name] = self._current.get(name, 0) + weight
            total += weight
        best = max(names, key=lambda name: self._current[name])
        self._current[best] -= total
        return best

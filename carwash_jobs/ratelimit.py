"""FleetRate: a rate limit that holds for every process on the database together.

A per-process pacer lets N processes send N times the configured rate. Here the slots of a pace
live in one database row (`rate_limits`): a handler asks the store for the next slot(s), each
slot handed to exactly one caller across the fleet, and sleeps until its slot comes. Slots are
`60 / per_minute` seconds apart, so messages leave evenly spaced, never in bursts.

A few slots are taken per round trip (about BATCH_SECONDS worth), so a fast pace does not cost a
database write per message. When the next free slot is further away than `max_wait_seconds`
(the fleet's budget is spent for a while), the handler is not held in its worker slot: `wait`
raises RetryLater without counting the attempt, and the job comes back when slots are free.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING

from carwash_jobs.errors import RetryLater

if TYPE_CHECKING:
    from carwash_jobs.store.base import JobStore

#: about how much time's worth of slots one reservation takes (at least one slot)
BATCH_SECONDS = 0.25
#: the longest a handler sleeps for a slot before it gives its worker slot back instead
MAX_WAIT_SECONDS = 30.0


class FleetRate:
    """At most `per_minute` units a minute of the pace `name`, across all processes."""

    def __init__(
        self, store: JobStore, name: str, per_minute: int, *,
        max_wait_seconds: float = MAX_WAIT_SECONDS,
    ) -> None:
        if per_minute < 1:
            raise ValueError(f"per_minute must be at least 1 (got {per_minute})")
        self.name = name
        self.per_minute = per_minute
        self.interval = 60.0 / per_minute
        self._store = store
        self._max_wait = max_wait_seconds
        self._batch = max(1, int(BATCH_SECONDS / self.interval))
        self._slots: deque[float] = deque()  #: loop times of slots taken and not yet spent

    async def wait(self, remaining: int = 1) -> None:
        """Return when this caller may spend one unit. `remaining` (how many units the caller
        still expects to spend, this one included) keeps a reservation from taking slots that
        nobody will use. Raises RetryLater(count_attempt=False) when the fleet's budget is
        spent for longer than `max_wait_seconds`."""
        loop = asyncio.get_running_loop()
        if not self._slots:
            count = max(1, min(self._batch, remaining))
            asked = loop.time()  # the store measures its wait from the moment it is asked
            answer = await self._store.reserve_rate(self.name, self.interval, count, self._max_wait)
            if not answer.granted:
                raise RetryLater(
                    answer.wait_seconds,
                    f"the fleet's {self.name} rate ({self.per_minute}/min) is taken for the next "
                    f"{answer.wait_seconds:.0f}s",
                    count_attempt=False,
                )
            start = asked + answer.wait_seconds
            self._slots.extend(start + n * self.interval for n in range(count))
        delay = self._slots.popleft() - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)

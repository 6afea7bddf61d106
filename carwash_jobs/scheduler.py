"""The safety net: APScheduler runs the periodic duties that keep the database and memory in
agreement. It is not the main path (an enqueue hands its job to memory at once).

- reload: promote due scheduled rows and load due rows this process does not hold (after a
  restart, a crash, a backoff, or another process's enqueue);
- leases: re-queue running rows whose lease ran out (their worker died or hung); one on its
  last attempt ends failed here, and this process, the one that saw it end, calls on_failed.

A stop cancels the duties in progress and waits until they have ended: each writes in
transactions of its own, and the next run (after a restart, or in another process) takes up
what a cut one left. APScheduler's shutdown cancels them but does not wait, and a duty still
unwinding (a PostgreSQL statement's cancel is a round trip to the server) went on while the
processor and then the store were stopped under it.

APScheduler 3 is untyped; this module is the only one that touches it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from carwash_jobs import lifecycle
from carwash_jobs.errors import IllegalTransition

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from datetime import timedelta

    from carwash_jobs.queue import JobQueue
    from carwash_jobs.types import Clock

log = logging.getLogger(__name__)

LEASE_SCAN_LIMIT = 1000


class Scheduler:
    def __init__(
        self,
        queue: JobQueue,
        *,
        clock: Clock,
        reload_interval: timedelta,
        lease_check_interval: timedelta,
    ) -> None:
        self._queue = queue
        self._clock = clock
        self._reload_interval = reload_interval
        self._lease_interval = lease_check_interval
        self._scheduler: Any = None
        self._in_progress: set[asyncio.Task[Any]] = set()  #: the duties running now
        #: set after every reload; a test awaits it instead of sleeping
        self.reloaded = asyncio.Event()
        self._duties: list[tuple[str, Callable[[], Awaitable[Any]], float]] = [
            ("reload", self.reload, reload_interval.total_seconds()),
            ("release-expired-leases", self.release_expired_leases,
             lease_check_interval.total_seconds()),
        ]

    def add_duty(self, name: str, fn: Callable[[], Awaitable[Any]], seconds: float) -> None:
        """Another periodic duty (cron firing, pruning) run by the same scheduler."""
        self._duties.append((name, fn, seconds))

    @property
    def duties(self) -> dict[str, float]:
        """Each duty's name and interval in seconds."""
        return {name: seconds for name, _, seconds in self._duties}

    async def start(self) -> None:
        self._scheduler = AsyncIOScheduler(timezone="UTC")
        for name, fn, seconds in self._duties:
            self._scheduler.add_job(
                self._duty(name, fn), "interval", seconds=seconds, id=name, max_instances=1,
                coalesce=True, misfire_grace_time=max(int(seconds), 1),
            )
        self._scheduler.start()

    async def stop(self) -> None:
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
            self._scheduler = None
            await asyncio.sleep(0)  # APScheduler's shutdown takes effect on the next loop turn
        running = list(self._in_progress)
        for task in running:  # cancelled by the shutdown already, unless it had not started
            task.cancel()
        if running:
            await asyncio.wait(running)

    def _duty(self, name: str, fn: Callable[[], Awaitable[Any]]) -> Callable[[], Awaitable[None]]:
        """`fn` as APScheduler runs it: known to stop() while it runs, and its failure logged
        (it runs again at the next interval)."""
        async def run() -> None:
            task = asyncio.current_task()
            assert task is not None
            self._in_progress.add(task)
            try:
                await fn()
            except Exception:
                log.exception("scheduler duty %s failed; it runs again at the next interval", name)
            finally:
                self._in_progress.discard(task)

        return run

    async def reload(self) -> int:
        loaded = await self._queue.reload()
        if loaded:
            log.info("reload: %d due jobs loaded into memory", loaded)
        self.reloaded.set()
        return loaded

    async def release_expired_leases(self) -> int:
        """Running jobs whose worker stopped renewing the lease go back to queued (or failed,
        when that was their last attempt: the dead worker cannot call on_failed, so this does;
        the compare-and-set lets one process win each job, so the hook runs once)."""
        now = self._clock()
        expired = await self._queue.store.expired_leases(now, LEASE_SCAN_LIMIT)
        transitions = [
            lifecycle.release_expired_lease(job.id, job.fence, job.attempts, job.max_attempts, now)
            for job in expired
        ]
        results = await self._queue.store.apply_many(transitions)
        released = [r.job for r in results if not isinstance(r, Exception)]
        for r in results:
            if isinstance(r, Exception) and not isinstance(r, IllegalTransition):
                log.warning("releasing an expired lease failed: %s", r)
        self._queue.offer(released)
        self._queue.count_failed(released)  # a last attempt's: no processor counts those
        for job in released:
            log.warning("job %s: lease of %s expired; now %s", job.id,
                        job.attempt_history[-1].get("owner") if job.attempt_history else "?",
                        job.status.value)
        for applied in results:  # on_failed, and on_cancelled of the dependents it cancelled
            if not isinstance(applied, Exception):
                await self._queue.registry.run_hooks(applied)
        return len(released)

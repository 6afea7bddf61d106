"""Runtime: owns the store, the queue, the processor and the scheduler of one process, and
starts and stops them in order. "The singleton queue" is a fact of construction: one Runtime
per process, made by the composition root; tests make as many as they like."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal

from carwash_jobs import lifecycle
from carwash_jobs.cron import CronService, configured_schedules, tick_interval
from carwash_jobs.metrics import Metrics
from carwash_jobs.middleware import Middleware, logging_middleware, metrics_middleware, tracing_middleware
from carwash_jobs.processor import ProcessorConfig, QueueProcessor
from carwash_jobs.prune import Pruner
from carwash_jobs.queue import JobQueue
from carwash_jobs.ready import ReadyQueue
from carwash_jobs.scheduler import Scheduler
from carwash_jobs.store import open_store
from carwash_jobs.store.base import ProcessInfo
from carwash_jobs.store.migrations import upgrade
from carwash_jobs.types import Clock, pid_namespace, process_identity, utc_now

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from types import TracebackType

    from carwash_jobs.registry import TaskRegistry
    from carwash_jobs.settings import Settings
    from carwash_jobs.store.base import JobStore

Role = Literal["all", "api", "worker"]

log = logging.getLogger(__name__)

#: how long a stop waits to take this process out of the fleet's list (else it expires there)
RETIRE_TIMEOUT_SECONDS = 5.0


async def vacuum_duty(store: JobStore, interval_seconds: float) -> bool:
    """A worker's vacuum every `interval_seconds`, as its scheduler runs it (and the benchmarks'
    engine). Another worker's vacuum within half the interval stands for this one's: whatever
    the phases of the workers' timers, the fleet then vacuums once or twice an interval, not
    once a worker. Returns whether this one vacuumed."""
    return await store.vacuum(skip_if_vacuumed_within_seconds=interval_seconds / 2)


class Runtime:
    def __init__(
        self,
        settings: Settings,
        registry: TaskRegistry,
        *,
        role: Role = "all",
        clock: Clock = utc_now,
        middleware: Sequence[Middleware] = (),
        services: Mapping[str, Any] | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.role = role
        self.owner = process_identity()
        self.metrics = Metrics()
        self.store = open_store(
            settings.database_url, owner=self.owner, clock=clock,
            synchronous=settings.sqlite_synchronous,
            busy_timeout_ms=settings.sqlite_busy_timeout_ms,
            write_batch_max=settings.write_batch_max,
            pool_size=settings.database_pool_size,
        )
        works = role in ("all", "worker")
        ready = ReadyQueue(settings.queue_mode, settings.queues) if works else None
        self.queue = JobQueue(self.store, registry, ready=ready, metrics=self.metrics, clock=clock,
                              files_dir=settings.files_dir)
        self.processor: QueueProcessor | None = None
        self.scheduler: Scheduler | None = None
        if works:
            chain = [logging_middleware, metrics_middleware(self.metrics)]
            traced = tracing_middleware()
            chain += [traced] if traced else []
            self.processor = QueueProcessor(
                self.queue, owner=self.owner, metrics=self.metrics, clock=clock,
                config=ProcessorConfig(
                    concurrency=settings.concurrency,
                    lease=timedelta(seconds=settings.lease_seconds),
                    heartbeat_interval=timedelta(seconds=settings.heartbeat_interval_seconds),
                    shutdown_grace=timedelta(seconds=settings.shutdown_grace_seconds),
                    middleware=[*chain, *middleware],
                    services={"settings": settings, **(services or {})},
                ),
            )
            self.scheduler = Scheduler(
                self.queue, clock=clock,
                reload_interval=timedelta(seconds=settings.reload_interval_seconds),
                lease_check_interval=timedelta(seconds=settings.heartbeat_interval_seconds),
            )
        self._clock = clock
        self._announcer: asyncio.Task[None] | None = None
        self.started = False
        #: fires the cron schedules (cron.py); None in a process that runs no scheduler
        self.cron: CronService | None = None
        if self.scheduler is not None:
            self.cron = CronService(self.queue, configured_schedules(settings, registry), clock=clock)
            if self.cron.schedules:
                interval = tick_interval(timedelta(seconds=settings.reload_interval_seconds))
                self.scheduler.add_duty("cron", self.cron.fire_due, interval.total_seconds())
        #: prunes finished jobs past their retention (prune.py); None without a scheduler
        self.pruner: Pruner | None = None
        if self.scheduler is not None:
            self.pruner = Pruner(
                self.store, registry, clock=clock, files_dir=settings.files_dir,
                completed_retention=timedelta(days=settings.retention_completed_days),
                failed_retention=timedelta(days=settings.retention_failed_days),
            )
            self.scheduler.add_duty("prune", self.pruner.prune, settings.prune_interval_seconds)
            if settings.vacuum_interval_seconds > 0:
                self.scheduler.add_duty("vacuum", self._vacuum, settings.vacuum_interval_seconds)

    async def start(self, *, migrate: bool = True) -> None:
        """Migrate (unless told not to), open the store and start the parts of this role. A
        start that fails stops what it had started before it raises: a part left running (the
        store's connection threads above all, which are no daemons) kept the process alive
        after its start-up had failed, serving nothing."""
        if migrate:
            await upgrade(self.settings.database_url)
        try:
            await self._start_parts()
        except BaseException:
            await self._stop_after_failed_start()
            raise
        self.started = True

    async def _start_parts(self) -> None:
        await self.store.open()
        await self.announce()
        self._announcer = asyncio.get_running_loop().create_task(
            self._announce_loop(), name="process-announce"
        )
        if self.processor is not None and self.scheduler is not None:
            await self.store.listen(self.queue.on_notice)
            await self.recover_leftovers()
            await self.queue.reload()
            await self.processor.start()
            await self.scheduler.start()

    async def _stop_after_failed_start(self) -> None:
        """stop() (each part's stop does nothing when that part never started), its own
        failure logged: the caller must see why the start failed, not why the stop did."""
        try:
            await self.stop()
        except Exception:
            log.warning("stopping after a failed start failed too", exc_info=True)

    async def stop(self) -> None:
        try:
            if self.scheduler is not None:
                await self.scheduler.stop()
            if self.processor is not None:
                await self.processor.stop()
            self.queue.close()
            await self._retire()
        finally:
            # also when a part above failed to stop: an open store keeps the process alive
            await self.store.close()
            self.started = False

    async def __aenter__(self) -> Runtime:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def _vacuum(self) -> None:
        await vacuum_duty(self.store, self.settings.vacuum_interval_seconds)

    # -- membership of the fleet ---------------------------------------------------------
    async def announce(self) -> None:
        """Tell the fleet this process is alive (GET /api/queue/stats lists it under
        `processes`). It counts as alive for one lease: as long as its jobs' leases would."""
        await self.store.announce_process(
            process_info(self.owner, self.role), ttl_seconds=self.settings.lease_seconds
        )

    async def _announce_loop(self) -> None:
        interval = self.settings.heartbeat_interval_seconds
        while True:
            await asyncio.sleep(interval)
            try:
                await self.announce()
            except Exception:
                log.warning("announcing process %s failed; trying again in %.1fs", self.owner,
                            interval, exc_info=True)

    async def _retire(self) -> None:
        if self._announcer is None:
            return
        self._announcer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._announcer
        self._announcer = None
        try:
            # bounded: on SQLite this write waits behind a caller's transaction that hangs,
            # which the processor's stop has already given up on
            async with asyncio.timeout(RETIRE_TIMEOUT_SECONDS):
                await self.store.retire_process(self.owner)
        except Exception:
            log.warning("could not remove process %s from the fleet; it expires by itself",
                        self.owner, exc_info=True)

    async def recover_leftovers(self) -> int:
        """Re-queue what earlier processes on this host left running when they died, without
        waiting for their leases to run out. The lost attempt counts; a job that had no
        attempt left ends failed here, so this process calls its on_failed hook (the dead one
        cannot)."""
        dead = [o for o in await self.store.running_owners() if _is_dead_local(o)]
        if not dead:
            return 0
        now = self._clock()
        jobs = await self.store.running_owned_by(dead)
        transitions = [
            lifecycle.release_expired_lease(j.id, j.fence, j.attempts, j.max_attempts, now,
                                            owner_known_dead=True)
            for j in jobs
        ]
        results = await self.store.apply_many(transitions)
        recovered = [r.job for r in results if not isinstance(r, Exception)]
        self.queue.count_failed(recovered)  # a last attempt's: the dead process cannot count it
        log.warning("recovered %d jobs left running by dead processes %s", len(recovered), dead)
        for applied in results:  # on_failed, and on_cancelled of the dependents it cancelled
            if not isinstance(applied, Exception):
                await self.queue.registry.run_hooks(applied)
        return len(recovered)


def process_info(owner: str, role: str) -> ProcessInfo:
    """A process's announcement, from its identity `host/pid/start/nonce/pidns`."""
    host, pid, started, _ = owner.split("/", 3)
    return ProcessInfo(owner, role, host, int(pid), datetime.fromtimestamp(int(started), UTC))


def _is_dead_local(owner: str) -> bool:
    """Whether `owner` (host/pid/start/nonce/pidns) was a process on this host, in this pid
    namespace, that no longer runs. An owner of another namespace (or an identity without
    one) may be alive under a pid this process cannot see: its lease decides."""
    parts = owner.split("/")
    if len(parts) != 5:
        return False
    host, pid_text, _, _, namespace = parts
    if host != socket.gethostname() or namespace != pid_namespace() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return False  # another Runtime of this very process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False

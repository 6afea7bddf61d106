"""Retention: the scheduler duty that deletes finished jobs once they are past their retention,
with their events, their dependency edges and the uploaded files their payloads name, and the
cron fires older than the completed jobs' retention (each schedule's newest fire stays: cron
resumes from it).

Failed jobs are kept longer than completed (and cancelled) ones: they are the ones someone may
still want to read or retry. Pruning goes a small batch per transaction, so the writer (one on
SQLite) is never held long and enqueues and claims slip in between batches. A run goes on while
batches come back full, until nothing it may delete is left: a cap per run let the table grow
without a word whenever jobs finished faster than the cap over the interval (100,000 per 300 s
was 333 jobs/s, far below the engine's throughput).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from carwash_jobs.uploads import is_upload

if TYPE_CHECKING:
    from collections.abc import Sequence
    from datetime import timedelta

    from carwash_jobs.registry import TaskRegistry
    from carwash_jobs.store.base import JobStore, PruneBatch, PrunedJob
    from carwash_jobs.types import Clock

log = logging.getLogger(__name__)

#: jobs, and cron fires, deleted per transaction
PRUNE_BATCH_DEFAULT = 500


class Pruner:
    def __init__(
        self,
        store: JobStore,
        registry: TaskRegistry,
        *,
        clock: Clock,
        completed_retention: timedelta,
        failed_retention: timedelta,
        files_dir: str,
        batch: int = PRUNE_BATCH_DEFAULT,
    ) -> None:
        self._store = store
        self._registry = registry
        self._clock = clock
        self._completed = completed_retention
        self._failed = failed_retention
        self._files_dir = Path(files_dir)
        self._batch = batch

    async def prune(self) -> int:
        """Delete all that is past its retention now, a batch per transaction, for as long as
        batches come back full; returns how many jobs went. The cutoffs are fixed at the start,
        so a run ends however fast jobs finish meanwhile. A stop (the scheduler cancels the
        duty) ends it at its next await; the next run takes up the rest."""
        now = self._clock()
        jobs = fires = 0
        while True:
            batch = await self._store.prune(now - self._completed, now - self._failed, self._batch)
            jobs += len(batch.jobs)
            fires += batch.cron_fires
            await asyncio.to_thread(self._remove_files, batch.jobs)
            if not self._full(batch):
                break
        if jobs or fires:
            log.info("pruned %d finished jobs and %d cron fires past their retention", jobs, fires)
        return jobs

    def _full(self, batch: PruneBatch) -> bool:
        """Whether a batch may have left something behind: a short one found all there was."""
        return len(batch.jobs) >= self._batch or batch.cron_fires >= self._batch

    def _remove_files(self, pruned: Sequence[PrunedJob]) -> None:
        """After the rows are gone (a crash in between leaves a file, never a job without its
        file). Only an upload's own directory under files_dir is removed: a payload that names
        anything else is not the upload endpoint's doing, and is left alone."""
        for job in pruned:
            if job.task_type not in self._registry:
                continue
            field = self._registry.get(job.task_type).upload_field
            value = job.payload.get(field) if field is not None else None
            if not isinstance(value, str):
                continue
            if not is_upload(Path(value), self._files_dir):
                log.warning("job %s: not removing %s, which is not an upload under %s",
                            job.id, value, self._files_dir)
                continue
            shutil.rmtree(Path(value).resolve().parent, ignore_errors=True)

"""Retention: the scheduler duty that deletes finished jobs once they are past their retention,
with their events, their dependency edges and the uploaded files their payloads name.

Failed jobs are kept longer than completed (and cancelled) ones: they are the ones someone may
still want to read or retry. Pruning goes a small batch per transaction, so the writer (one on
SQLite) is never held long and enqueues and claims slip in between batches.
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
    from carwash_jobs.store.base import JobStore, PrunedJob
    from carwash_jobs.types import Clock

log = logging.getLogger(__name__)

#: jobs deleted per transaction
PRUNE_BATCH_DEFAULT = 500
#: batches per run of the duty; what is left waits for the next run
PRUNE_BATCHES_PER_RUN_DEFAULT = 200


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
        batches_per_run: int = PRUNE_BATCHES_PER_RUN_DEFAULT,
    ) -> None:
        self._store = store
        self._registry = registry
        self._clock = clock
        self._completed = completed_retention
        self._failed = failed_retention
        self._files_dir = Path(files_dir)
        self._batch = batch
        self._batches_per_run = batches_per_run

    async def prune(self) -> int:
        """Delete what is past its retention now; returns how many jobs went."""
        now = self._clock()
        total = 0
        for _ in range(self._batches_per_run):
            pruned = await self._store.prune(now - self._completed, now - self._failed, self._batch)
            total += len(pruned)
            await asyncio.to_thread(self._remove_files, pruned)
            if len(pruned) < self._batch:
                break
        if total:
            log.info("pruned %d finished jobs past their retention", total)
        return total

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

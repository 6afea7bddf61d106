"""Coalesces the same kind of write from many concurrent callers into one store call.

Per-job statements, not the fsync, are what limit a job queue in Python: every statement costs
interpreter overhead and, on SQLite, a hand-over of the GIL to the writer thread. A Batcher
gathers what callers submit while the previous flush is in flight and sends it as one list, so
a burst of N completions (or enqueues) costs one set-based statement instead of N. Each caller
still gets its own result or exception, and only after the flush that carried it returned.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")

Flush = Callable[[Sequence[ItemT]], Awaitable[Sequence["ResultT | Exception"]]]


@dataclass(slots=True)
class _Pending(Generic[ItemT, ResultT]):
    item: ItemT
    future: asyncio.Future[ResultT]


class Batcher(Generic[ItemT, ResultT]):
    def __init__(self, flush: Flush[ItemT, ResultT], *, max_batch: int = 1000) -> None:
        self._flush = flush
        self._max_batch = max_batch
        self._pending: list[_Pending[ItemT, ResultT]] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    async def submit(self, item: ItemT) -> ResultT:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="batcher")
        future: asyncio.Future[ResultT] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(item, future))
        self._wakeup.set()
        return await future

    async def close(self) -> None:
        """Flush what is pending, then stop. A flush in flight ends as it would have: cut off,
        it could have been written without its callers hearing so."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            # it returns once nothing is pending; shielded: a cancel of close() must not cut
            # the flush in flight off
            await asyncio.shield(self._task)
            self._task = None
        while self._pending:  # submitted after the task had returned
            await self._flush_once()

    def cancel(self) -> None:
        """Stop at once (the owner is shutting down): whoever still waits gets an error."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
        for p in self._pending:
            if not p.future.done():
                p.future.set_exception(RuntimeError("the queue is closed"))
        self._pending.clear()

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending:
                await self._flush_once()
            if self._closing:
                return

    async def _flush_once(self) -> None:
        batch = self._pending[: self._max_batch]
        del self._pending[: self._max_batch]
        try:
            results = await self._flush([p.item for p in batch])
        except asyncio.CancelledError:  # cancel(): its callers may not be left waiting
            in_flight = RuntimeError("the queue closed while this write was in flight: it may "
                                     "or may not have been written")
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(in_flight)
            raise
        except Exception as exc:
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(exc)
            return
        for p, result in zip(batch, results, strict=True):
            if p.future.done():
                continue
            if isinstance(result, Exception):
                p.future.set_exception(result)
            else:
                p.future.set_result(result)

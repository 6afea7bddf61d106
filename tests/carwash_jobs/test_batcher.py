"""Tests for carwash_jobs/batcher.py: callers submitted together share one flush, each gets its
own answer, and none is left waiting when the batcher stops."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import pytest

from carwash_jobs.batcher import Batcher

if TYPE_CHECKING:
    from collections.abc import Sequence


class Flushes:
    """A flush that records each batch it gets; it may be held until the test lets it go."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        self.release.set()

    async def __call__(self, items: Sequence[int]) -> list[int | Exception]:
        self.batches.append(list(items))
        self.entered.set()
        await self.release.wait()
        return [ValueError(f"odd {n}") if n % 2 else n * 10 for n in items]


async def one_in_flight_one_waiting(
    batcher: Batcher[int, int], flushes: Flushes
) -> tuple[asyncio.Task[int], asyncio.Task[int]]:
    """A caller of 2 whose flush is held in flight, and a caller of 4 waiting behind it."""
    flushes.release.clear()
    in_flight = asyncio.create_task(batcher.submit(2))
    async with asyncio.timeout(5):
        await flushes.entered.wait()
    waiting = asyncio.create_task(batcher.submit(4))
    await asyncio.sleep(0)
    return in_flight, waiting


async def test_callers_submitted_together_share_one_flush_and_each_gets_its_answer() -> None:
    flushes = Flushes()
    batcher: Batcher[int, int] = Batcher(flushes)

    calls = [asyncio.create_task(batcher.submit(n)) for n in (2, 3, 4)]
    done, _ = await asyncio.wait(calls, timeout=5)

    assert len(done) == 3
    assert flushes.batches == [[2, 3, 4]]
    assert calls[0].result() == 20
    with pytest.raises(ValueError, match="odd 3"):  # its own error, and no one else's
        calls[1].result()
    assert calls[2].result() == 40
    await batcher.close()


async def test_cancel_answers_the_callers_in_flight_and_the_ones_waiting_behind_them() -> None:
    """A caller whose write was in flight when the owner shut down waited forever: cancel()
    answered only the callers not yet taken into a flush."""
    flushes = Flushes()
    batcher: Batcher[int, int] = Batcher(flushes)
    in_flight, waiting = await one_in_flight_one_waiting(batcher, flushes)

    batcher.cancel()
    done, _ = await asyncio.wait([in_flight, waiting], timeout=5)

    assert done == {in_flight, waiting}
    with pytest.raises(RuntimeError, match="in flight: it may or may not have been written"):
        in_flight.result()
    with pytest.raises(RuntimeError, match="closed"):
        waiting.result()


async def test_close_flushes_what_is_waiting_and_lets_the_flush_in_flight_end() -> None:
    """close() cancelled the flush in flight: written or not, its callers never heard."""
    flushes = Flushes()
    batcher: Batcher[int, int] = Batcher(flushes)
    first, second = await one_in_flight_one_waiting(batcher, flushes)
    flushes.release.set()

    async with asyncio.timeout(5):
        await batcher.close()
        assert (await first, await second) == (20, 40)
    assert flushes.batches == [[2], [4]]

"""Limits that hold for the fleet: several processors (processes) on one database file.

A task type's concurrency limit counts the jobs of that type running in every process, and a
processor that finds the limit reached waits a moment instead of asking again at once. A
FleetRate hands out slots of a pace so that all processes together keep the rate.
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
from typing import TYPE_CHECKING, Any

import pytest

from carwash_jobs.errors import RetryLater
from carwash_jobs.lifecycle import JobStatus
from carwash_jobs.processor import FLEET_FULL_BACKOFF_SECONDS
from carwash_jobs.ratelimit import FleetRate
from carwash_jobs.runtime import Runtime
from carwash_jobs.settings import load_settings
from tests.carwash_jobs.support import Gate, Item, open_sqlite, registry_with, task_type

if TYPE_CHECKING:
    from pathlib import Path

    from carwash_jobs.context import JobContext
    from carwash_jobs.store.base import JobRow
    from tests.carwash_jobs.support import Harness, Harnesses

OTHER = "other-host/2/0/b"


async def _until_done(harnesses: list[Harness], jobs: list[JobRow], within: float = 10) -> None:
    """What the scheduler does in each process: reload now and then, until every job ended."""
    async with asyncio.timeout(within):
        while True:
            rows = await harnesses[0].store.get_many([job.id for job in jobs])
            if all(row.status == JobStatus.completed for row in rows):
                return
            for harness in harnesses:
                await harness.queue.reload()
            await asyncio.sleep(0.05)


async def test_a_concurrency_limit_holds_across_processes(harnesses: Harnesses) -> None:
    inside = 0
    most = 0
    ran_in: dict[str, int] = {}

    async def limited(ctx: JobContext, payload: Item) -> None:
        nonlocal inside, most
        inside += 1
        most = max(most, inside)
        ran_in[ctx.job.lease_owner or ""] = ran_in.get(ctx.job.lease_owner or "", 0) + 1
        await asyncio.sleep(0.03)
        inside -= 1

    kind = task_type("limited", limited, concurrency=2)
    one = await harnesses.make(kind, concurrency=10, start=False)
    two = await harnesses.make(kind, concurrency=10, start=False, owner=OTHER)
    jobs = [await one.enqueue("limited", {"n": i}) for i in range(16)]
    await two.queue.reload()  # both processes hold every job and race for them
    await one.start()
    await two.start()

    await _until_done([one, two], jobs)

    assert most == 2, "each process alone would have run 2 at once: 4 together"
    rows = await one.store.get_many([job.id for job in jobs])
    assert {row.attempts for row in rows} == {1}, "a throttled claim costs no attempt"
    assert sum(ran_in.values()) == 16


async def test_a_process_that_finds_the_limit_reached_waits_before_asking_again(
    harnesses: Harnesses,
) -> None:
    gate = Gate()
    kind = task_type("held", gate.handler, concurrency=1)
    busy = await harnesses.make(kind)
    idle = await harnesses.make(kind, owner=OTHER, start=False)
    first = await busy.enqueue("held")
    await gate.entered.wait()  # the fleet's one slot is taken in the other process
    waiting = [await busy.enqueue("held") for _ in range(3)]
    claims: list[dict[str, int] | None] = []
    real_claim = idle.store.claim

    async def counted(*args: Any, **kwargs: Any) -> list[JobRow]:
        claims.append(kwargs.get("limits", args[3] if len(args) > 3 else None))
        return await real_claim(*args, **kwargs)

    idle.store.claim = counted  # type: ignore[method-assign]
    await idle.queue.reload()
    await idle.start()
    await asyncio.sleep(FLEET_FULL_BACKOFF_SECONDS * 2.4)

    assert claims, "the idle process asked at least once"
    assert len(claims) <= 3, f"asked {len(claims)} times in 1.2 s: it should wait 0.5 s between"
    assert all(limits == {"held": 1} for limits in claims)
    gate.release.set()
    await _until_done([busy, idle], [first, *waiting])


async def test_fleet_rate_slots_of_two_processes_are_spaced_for_the_fleet(db_url: str) -> None:
    stores = [await open_sqlite(db_url), await open_sqlite(db_url, owner=OTHER)]
    spent: list[float] = []
    loop = asyncio.get_running_loop()

    async def send(store_index: int) -> None:
        limit = FleetRate(stores[store_index], "mail", per_minute=600)  # one every 0.1 s
        for left in range(5, 0, -1):
            await limit.wait(remaining=left)
            spent.append(loop.time())

    try:
        await asyncio.gather(send(0), send(1))
    finally:
        for store in stores:
            await store.close()

    times = sorted(spent)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert len(times) == 10
    # a per-process pacer would let both send at once: gaps of 0 and 0.1, median 0.05. A late
    # wake-up shortens one gap and lengthens the one before, so windows are checked, not gaps
    assert statistics.median(gaps) >= 0.09, gaps
    for i, j in itertools.combinations(range(10), 2):
        if j - i >= 3:
            assert times[j] - times[i] >= (j - i) * 0.1 - 0.05, (i, j, gaps)
    assert times[-1] - times[0] < 9 * 0.1 + 0.5


async def test_fleet_rate_spent_for_long_gives_the_worker_slot_back_without_an_attempt(
    db_url: str,
) -> None:
    busy, late = await open_sqlite(db_url), await open_sqlite(db_url, owner=OTHER)
    try:
        await busy.reserve_rate("mail", 1.0, 20, max_wait_seconds=60)  # the next 20 s are taken
        limit = FleetRate(late, "mail", per_minute=60, max_wait_seconds=5)
        with pytest.raises(RetryLater) as refused:
            await limit.wait()
    finally:
        await busy.close()
        await late.close()

    assert refused.value.count_attempt is False
    assert refused.value.delay_seconds == pytest.approx(20, abs=1)
    assert "mail rate (60/min)" in refused.value.reason


async def test_a_runtime_is_a_live_process_while_it_runs_and_renews_its_announcement(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no config file of the checkout applies
    settings = load_settings(database_url=db_url, schedules_file="", lease_seconds=1.0,
                             heartbeat_interval_seconds=0.05, shutdown_grace_seconds=0.1)
    runtime = Runtime(settings, registry_with(), role="worker")
    await runtime.start()
    try:
        (first,) = await runtime.store.live_processes()
        await asyncio.sleep(0.2)
        (later,) = await runtime.store.live_processes()
    finally:
        await runtime.stop()
    observer = await open_sqlite(db_url)
    try:
        after = await observer.live_processes()
    finally:
        await observer.close()

    host, pid, started, _, _ = runtime.owner.split("/")
    assert (first.owner, first.role, first.host, first.pid) == (runtime.owner, "worker", host,
                                                                 int(pid))
    assert first.started_at.timestamp() == int(started)
    assert later.last_seen_at is not None
    assert first.last_seen_at is not None
    assert later.last_seen_at > first.last_seen_at, "the announcement is renewed"
    assert after == [], "a stopped runtime leaves the fleet"

"""Tests for carwash_jobs/ready.py: dispatch order within and across named queues, parking."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from carwash_jobs.ready import ReadyQueue
from carwash_jobs.store.base import DueJob
from carwash_jobs.types import JobId

T0 = datetime(2030, 1, 1, tzinfo=UTC)


def due(name: str, *, priority: int = 0, queue: str = "default", task_type: str = "noop",
        age: int = 0) -> DueJob:
    return DueJob(JobId(name), task_type, queue, priority, T0 + timedelta(seconds=age))


def always(_task_type: str) -> bool:
    return True


def names(jobs: list[DueJob]) -> list[str]:
    return [job.id for job in jobs]


def test_higher_priority_first_then_oldest_then_first_created() -> None:
    ready = ReadyQueue()
    ready.put(due("low", priority=0, age=0))
    ready.put(due("high-late", priority=5, age=9))
    ready.put(due("high-early", priority=5, age=1))
    ready.put(due("mid-a", priority=2, age=3))
    ready.put(due("mid-b", priority=2, age=3))
    assert names(ready.take(10, always)) == ["high-early", "high-late", "mid-a", "mid-b", "low"]
    assert len(ready) == 0


def test_a_duplicate_id_is_not_added_twice() -> None:
    ready = ReadyQueue()
    assert ready.put(due("a"))
    assert not ready.put(due("a", priority=9))
    assert len(ready) == 1
    assert ready.contains(JobId("a"))


def test_take_returns_at_most_n() -> None:
    ready = ReadyQueue()
    for i in range(5):
        ready.put(due(f"j{i}", age=i))
    assert names(ready.take(2, always)) == ["j0", "j1"]
    assert len(ready) == 3


def test_a_discarded_job_is_skipped_when_it_comes_up() -> None:
    ready = ReadyQueue()
    ready.put(due("a"))
    ready.put(due("b", age=1))
    ready.discard(JobId("a"))
    assert not ready.contains(JobId("a"))
    assert names(ready.take(5, always)) == ["b"]


def test_weighted_mode_shares_slots_by_weight() -> None:
    ready = ReadyQueue("weighted", {"critical": 3, "bulk": 1})
    for i in range(40):
        ready.put(due(f"c{i}", queue="critical", age=i))
        ready.put(due(f"b{i}", queue="bulk", age=i))
    first = ready.take(16, always)
    by_queue = Counter(job.queue for job in first)
    assert by_queue == {"critical": 12, "bulk": 4}
    # smooth round-robin: bulk is served every fourth pick, not starved until critical empties
    assert [job.queue for job in first[:4]].count("bulk") == 1


def test_weighted_mode_never_starves_a_low_weight_queue() -> None:
    ready = ReadyQueue("weighted", {"critical": 100, "bulk": 1})
    for i in range(300):
        ready.put(due(f"c{i}", queue="critical", age=i))
    ready.put(due("b0", queue="bulk"))
    taken = names(ready.take(102, always))
    assert "b0" in taken


def test_priority_mode_serves_the_higher_ranked_queue_first_until_empty() -> None:
    ready = ReadyQueue("priority", {"critical": 100, "default": 10, "bulk": 1})
    ready.put(due("bulk-urgent", queue="bulk", priority=99))
    ready.put(due("d1", queue="default"))
    ready.put(due("c1", queue="critical", age=1))
    ready.put(due("c2", queue="critical", age=2))
    ready.put(due("d2", queue="default", age=1))
    assert names(ready.take(10, always)) == ["c1", "c2", "d1", "d2", "bulk-urgent"]


def test_an_unlisted_queue_counts_as_weight_one_or_rank_zero() -> None:
    weighted = ReadyQueue("weighted", {"default": 1})
    strict = ReadyQueue("priority", {"default": 1})
    for ready in (weighted, strict):
        ready.put(due("x", queue="adhoc"))
        ready.put(due("d", queue="default"))
    assert Counter(j.queue for j in weighted.take(2, always)) == {"adhoc": 1, "default": 1}
    assert names(strict.take(2, always)) == ["d", "x"]


def test_jobs_of_a_type_without_room_are_parked_until_unparked() -> None:
    ready = ReadyQueue()
    ready.put(due("s1", task_type="smtp"))
    ready.put(due("s2", task_type="smtp", age=1))
    ready.put(due("n1", task_type="noop", age=2))
    assert names(ready.take(5, lambda t: t != "smtp")) == ["n1"]
    assert ready.parked == 2
    assert ready.parked_task_types == {"smtp"}  # a reload leaves it out
    assert len(ready) == 2  # parked jobs are still held (the processor is not idle)
    assert ready.take(5, always) == []
    ready.unpark("smtp")
    assert ready.parked == 0
    assert ready.parked_task_types == frozenset()
    assert names(ready.take(5, always)) == ["s1", "s2"]


async def test_wait_returns_once_something_is_put() -> None:
    ready = ReadyQueue()
    waiter = asyncio.create_task(ready.wait())
    await asyncio.sleep(0)
    assert not waiter.done()
    ready.put(due("a"))
    await asyncio.wait_for(waiter, 1)


async def test_wait_blocks_while_everything_is_parked_and_wakes_on_unpark() -> None:
    ready = ReadyQueue()
    ready.put(due("s1", task_type="smtp"))
    assert ready.take(1, lambda _: False) == []
    waiter = asyncio.create_task(ready.wait())
    await asyncio.sleep(0)
    assert not waiter.done()
    ready.unpark("smtp")
    await asyncio.wait_for(waiter, 1)


@pytest.mark.parametrize("mode", ["weighted", "priority"])
def test_within_one_queue_both_modes_keep_priority_then_fifo(mode: str) -> None:
    ready = ReadyQueue("weighted" if mode == "weighted" else "priority")
    ready.put(due("a", priority=1))
    ready.put(due("b", priority=3))
    ready.put(due("c", priority=1))
    assert names(ready.take(3, always)) == ["b", "a", "c"]


def test_jobs_sharing_a_run_at_share_its_timestamp_and_keep_their_order() -> None:
    ready = ReadyQueue()
    batch_at, later = T0 + timedelta(seconds=5), T0 + timedelta(seconds=9)
    ready.put(DueJob(JobId("b1"), "noop", "default", 0, batch_at))
    ready.put(DueJob(JobId("late"), "noop", "default", 0, later))
    ready.put(DueJob(JobId("b2"), "noop", "default", 0, batch_at))
    ready.put(DueJob(JobId("b3"), "noop", "default", 0, batch_at))
    ready.put(due("early", age=1))  # another datetime object: its own timestamp
    stamps = {str(entry[2]): entry[1] for entry in ready._heaps["default"]}
    assert stamps["b2"] is stamps["b3"]  # one float for a batch, not one per job
    assert stamps["early"] == (T0 + timedelta(seconds=1)).timestamp()
    taken = ready.take(10, always)
    assert names(taken) == ["early", "b1", "b2", "b3", "late"]
    assert [job.run_at for job in taken] == [
        T0 + timedelta(seconds=1), batch_at, batch_at, batch_at, later,
    ]


#: a put (priority, seconds after T0) or a take of n
_STEPS = st.lists(st.one_of(
    st.tuples(st.just("put"), st.integers(-2, 2), st.integers(0, 5)),
    st.tuples(st.just("take"), st.integers(1, 4), st.just(0)),
), max_size=60)


@settings(deadline=None)  # a busy machine: a slow example is not a failure
@given(_STEPS)
def test_whatever_the_order_of_puts_and_takes_jobs_come_out_in_dispatch_order(
    steps: list[tuple[str, int, int]],
) -> None:
    """Each take gives the waiting jobs of highest priority, then earliest run_at, then oldest
    id, whatever order they came in, and however takes and puts
    interleave."""
    ready = ReadyQueue()
    waiting: list[tuple[int, int, str]] = []
    for n, (op, a, b) in enumerate(steps):
        if op == "put":
            # ids in another order than the puts: the oldest id goes first, not the first put
            job_id = f"{n * 7919 % 10007:05d}"
            ready.put(due(job_id, priority=a, age=b))
            waiting.append((-a, b, job_id))
        else:
            waiting.sort()
            expected, waiting = waiting[:a], waiting[a:]
            assert names(ready.take(a, always)) == [job_id for _, _, job_id in expected]
    waiting.sort()
    assert names(ready.take(len(waiting) + 1, always)) == [job_id for _, _, job_id in waiting]
    assert len(ready) == 0

"""Tests for carwash_jobs/store/postgres.py that only PostgreSQL can show: races between the
transactions of two processes. Skipped while CARWASH_TEST_POSTGRES_URL is unset."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import asyncpg
import pytest

from carwash_jobs.lifecycle import JobStatus
from carwash_jobs.store.base import Completion
from carwash_jobs.store.postgres import dsn_of
from tests.carwash_jobs.store import test_contract as contract
from tests.carwash_jobs.store.test_contract import claimed, new_job, waiting_for_locks

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from carwash_jobs.store.base import JobStore
    from tests.carwash_jobs.support import ManualClock

# the store contract suite's adapter fixtures, PostgreSQL only
database_url = contract.database_url
postgres_template = contract.postgres_template
store = contract.store
other_store = contract.other_store

#: a row that holds `the-key` in an open transaction: an INSERT of the same idempotency key
#: (ON CONFLICT) waits for that transaction to end
KEY_HOLDER = """
INSERT INTO worker_queue (id, task_type, queue, status, priority, payload, tags, attempts,
  max_attempts, run_at, created_at, progress_done, attempt_history, depends_on, idempotency_key)
VALUES ('key-holder', 'noop', 'default', 'queued', 0, '{}', '[]', 0, 1, now(), now(), 0, '[]',
  '[]', 'the-key')
"""


async def until(check: Callable[[], Awaitable[bool]], unless: asyncio.Future[Any]) -> None:
    """Poll `check` until it is true or `unless` is done: the server's lock table has no event
    to wait on."""
    async with asyncio.timeout(10):
        while not unless.done() and not await check():  # noqa: ASYNC110 - see the docstring
            await asyncio.sleep(0.01)


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_a_dependency_that_completes_while_its_dependent_is_enqueued_frees_it(
    database_url: str, store: JobStore, other_store: JobStore, clock: ManualClock,
) -> None:
    """The enqueue reads its dependency's status (running) and stalls before its commit; the
    dependency completes in another process meanwhile. The dependent must not stay waiting."""
    dependency = await claimed(store, clock)
    holder = await asyncpg.connect(dsn_of(database_url))
    watcher = await asyncpg.connect(dsn_of(database_url))
    try:
        held = holder.transaction()
        await held.start()
        await holder.execute(KEY_HOLDER)

        async def waiters() -> int:
            return await waiting_for_locks(watcher)

        dependent = new_job(clock, depends_on=[dependency.id], idempotency_key="the-key")
        enqueue = asyncio.ensure_future(store.insert([dependent]))
        await until(lambda: _more(waiters, 0), enqueue)  # it has read the dependency: it waits
        completion = asyncio.ensure_future(
            other_store.complete_many([Completion(dependency.id, dependency.fence, None)])
        )
        # the completion either waits for the enqueue (the dependency is share-locked) or,
        # unlocked, commits at once, before the dependent exists
        await until(lambda: _more(waiters, 1), completion)
        await held.rollback()
        await asyncio.wait_for(enqueue, 10)
        await asyncio.wait_for(completion, 10)
    finally:
        await holder.close()
        await watcher.close()
    assert (await store.get(dependency.id)).status == JobStatus.completed
    assert (await store.get(dependent.id)).status == JobStatus.queued


async def _more(count: Callable[[], Awaitable[int]], than: int) -> bool:
    return await count() > than


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_only_the_json_encoders_refusal_becomes_its_own_error(
    store: JobStore, clock: ManualClock,
) -> None:
    """A NaN checkpoint is the ValueError SQLite raises; any other parameter asyncpg cannot
    encode stays the driver's DataError, with the parameter it names."""
    row = await claimed(store, clock)
    with pytest.raises(ValueError, match="not JSON compliant") as refused:
        await store.save_progress(row.id, row.fence, checkpoint={"mean": float("nan")})
    assert not isinstance(refused.value, asyncpg.DataError)
    with pytest.raises(asyncpg.DataError, match=r"query argument \$4"):
        await store.save_progress(row.id, row.fence, done="seven")  # type: ignore[arg-type]

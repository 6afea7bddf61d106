"""Tests for carwash_jobs/store/postgres.py that only PostgreSQL can show: races between the
transactions of two processes. Skipped while CARWASH_TEST_POSTGRES_URL is unset."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from carwash_jobs import lifecycle
from carwash_jobs.lifecycle import JobStatus
from carwash_jobs.store import open_store
from carwash_jobs.store import postgres as postgres_store
from carwash_jobs.store.base import Completion, Notice
from carwash_jobs.store.postgres import _Listener, dsn_of
from tests.carwash_jobs.store import test_contract as contract
from tests.carwash_jobs.store.test_contract import claimed, new_job, waiting_for_locks
from tests.carwash_jobs.support import OWNER, skip_unless_autovacuum_is_off

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

    from carwash_jobs.store.base import JobStore
    from tests.carwash_jobs.support import ManualClock

# the store contract suite's store fixtures (database_url: conftest.py), PostgreSQL only
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
async def test_two_processes_completing_the_last_two_dependencies_at_once_free_the_dependent(
    store: JobStore, other_store: JobStore, clock: ManualClock,
) -> None:
    """Each completion's transaction used to count the other's job as unfinished (not yet
    committed), so neither freed the dependent: it stayed waiting for good."""
    for _ in range(20):
        a = await claimed(store, clock)
        b = await claimed(other_store, clock)
        dependent = await contract.add(store, clock, depends_on=[a.id, b.id])
        first, second = await asyncio.gather(
            store.complete_many([Completion(a.id, a.fence, None)]),
            other_store.complete_many([Completion(b.id, b.fence, None)]),
        )
        assert [job.id for job in [*first.woken, *second.woken]] == [dependent.id]
        assert (await store.get(dependent.id)).status == JobStatus.queued


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_a_cancel_of_the_dependent_that_commits_while_a_completion_waits_spoils_nothing(
    database_url: str, store: JobStore, clock: ManualClock,
) -> None:
    """The completion found the dependent waiting, waited for the cancel's lock, then found it
    cancelled: its release was refused and the whole batch rolled back (both jobs would run
    again once their leases ran out)."""
    dependency = await claimed(store, clock)
    other = await claimed(store, clock)
    dependent = await contract.add(store, clock, depends_on=[dependency.id])
    canceller = await asyncpg.connect(dsn_of(database_url))
    watcher = await asyncpg.connect(dsn_of(database_url))
    try:
        cancel = canceller.transaction()
        await cancel.start()
        await canceller.execute(
            "UPDATE worker_queue SET status = 'cancelled', finished_at = now() WHERE id = $1",
            dependent.id,
        )
        completion = asyncio.ensure_future(store.complete_many([
            Completion(dependency.id, dependency.fence, None),
            Completion(other.id, other.fence, None),
        ]))

        async def waiters() -> int:
            return await waiting_for_locks(watcher)

        await until(lambda: _more(waiters, 0), completion)
        await cancel.commit()
        done = await asyncio.wait_for(completion, 10)
    finally:
        await canceller.close()
        await watcher.close()
    assert done.completed == {dependency.id, other.id}
    assert list(done.woken) == []
    statuses = [(await store.get(job.id)).status for job in (dependency, other, dependent)]
    assert statuses == [JobStatus.completed, JobStatus.completed, JobStatus.cancelled]


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_two_processes_firing_two_times_of_a_schedule_that_skips_overlaps_start_one_job(
    store: JobStore, other_store: JobStore, clock: ManualClock,
) -> None:
    """Their fire rows differ, so neither waited for the other: each found no active job of
    the schedule and inserted one, 19 or 20 times in 20."""
    tag = "cron:nightly"
    for n in range(20):
        fire_at = clock() + timedelta(minutes=10 * n)
        fires = await asyncio.gather(*(
            opened.fire_cron("nightly", at, new_job(clock, tags=(tag,)), skip_if_active_tag=tag)
            for opened, at in ((store, fire_at), (other_store, fire_at + timedelta(seconds=30)))
        ))
        assert sorted(fire.outcome for fire in fires) == ["fired", "skipped"]
        (job,) = [fire.job for fire in fires if fire.job is not None]
        await store.apply(lifecycle.cancel(job.id, clock()))  # the next pair finds none active


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_jobs_put_back_in_the_queue_wake_the_other_processes_at_once(
    store: JobStore, other_store: JobStore, clock: ManualClock,
) -> None:
    """A bulk retry, a stop's release and a lease check's recovery sent no notice: the other
    workers found those jobs only at their next reload."""
    failed = [await contract.failed(store, clock) for _ in range(2)]
    released = await claimed(store, clock)
    expected = {job.id for job in [*failed, released]}
    notices: list[Notice] = []
    all_told = asyncio.Event()

    def on_notice(notice: Notice) -> None:
        notices.append(notice)
        if {due.id for seen in notices for due in seen.jobs} == expected:
            all_told.set()

    await other_store.listen(on_notice)
    await store.apply_many([lifecycle.retry_failed(job.id, clock()) for job in failed])
    await store.apply(lifecycle.release(released.id, released.fence, clock()))

    await asyncio.wait_for(all_told.wait(), 10)
    assert {notice.kind for notice in notices} == {"new"}


class FreezingProxy:
    """A TCP proxy on loopback in front of the PostgreSQL server. freeze() stops relaying on
    the connections open at that moment, closing nothing: to both ends they look as a
    connection does whose other end vanished (a half-open connection). Later connections are
    relayed as before."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._open: list[asyncio.Event] = []
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def freeze(self) -> None:
        for flowing in self._open:
            flowing.clear()
        self._open = []

    async def stop(self) -> None:
        for writer in self._writers:
            writer.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _relay(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection(*self._target)
        self._writers += [client_w, server_w]
        flowing = asyncio.Event()
        flowing.set()
        self._open.append(flowing)
        await asyncio.gather(self._pipe(client_r, server_w, flowing),
                             self._pipe(server_r, client_w, flowing), return_exceptions=True)

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    flowing: asyncio.Event) -> None:
        while data := await reader.read(65536):
            await flowing.wait()
            writer.write(data)
            await writer.drain()
        writer.close()


@contextlib.asynccontextmanager
async def through_proxy(database_url: str) -> AsyncIterator[tuple[str, FreezingProxy]]:
    """`database_url`, its host and port those of a FreezingProxy in front of the server."""
    parts = urlsplit(database_url)
    proxy = FreezingProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    await proxy.start()
    netloc = parts.netloc.rsplit("@", 1)
    address = f"127.0.0.1:{proxy.port}"
    proxied = urlunsplit(parts._replace(netloc=f"{netloc[0]}@{address}" if len(netloc) == 2 else address))
    try:
        yield proxied, proxy
    finally:
        await proxy.stop()


def _collect(notices: list[Notice]) -> tuple[Callable[[Notice], None], asyncio.Event]:
    arrived = asyncio.Event()

    def on_notice(notice: Notice) -> None:
        notices.append(notice)
        arrived.set()

    return on_notice, arrived


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_a_listen_connection_ended_by_the_server_reconnects_and_asks_for_a_reload(
    database_url: str, store: JobStore, other_store: JobStore, clock: ManualClock,
) -> None:
    """The notices sent while it was away are lost: the reload finds those jobs."""
    notices: list[Notice] = []
    on_notice, arrived = _collect(notices)
    await store.listen(on_notice)
    admin = await asyncpg.connect(dsn_of(database_url))
    try:
        ended = await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND query LIKE 'LISTEN%'")
    finally:
        await admin.close()
    assert ended == 1
    await asyncio.wait_for(arrived.wait(), 10)
    assert [n.kind for n in notices] == ["reload"]
    arrived.clear()
    (job,) = [r.job for r in await other_store.insert([new_job(clock)])]
    await asyncio.wait_for(arrived.wait(), 10)
    assert [due.id for due in notices[-1].jobs] == [job.id]


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_a_listen_connection_that_went_silent_is_given_up_and_replaced(
    database_url: str, other_store: JobStore, clock: ManualClock, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A half-open connection raises nothing: notices just stop. Asked a question after a
    silence and not answering, it is given up; the new connection asks for a reload and hears
    the notices again."""
    monkeypatch.setattr(_Listener, "PROBE_SECONDS", 0.2)
    monkeypatch.setattr(_Listener, "PROBE_TIMEOUT_SECONDS", 1.0)
    monkeypatch.setattr(postgres_store, "CLOSE_TIMEOUT_SECONDS", 0.5)
    notices: list[Notice] = []
    on_notice, arrived = _collect(notices)
    async with through_proxy(database_url) as (proxied_url, proxy):
        store = open_store(proxied_url, owner=OWNER, clock=clock)
        await store.open()
        try:
            await store.listen(on_notice)
            await asyncio.sleep(0.6)  # probes answered: nothing happens
            assert notices == []
            proxy.freeze()
            await other_store.insert([new_job(clock)])  # its notice is lost on the way
            await asyncio.wait_for(arrived.wait(), 10)
            await asyncio.sleep(0.6)  # more probes, on the new connection: answered
            assert [n.kind for n in notices] == ["reload"]
            (job,) = [r.job for r in await other_store.insert([new_job(clock)])]
            async def both_told() -> bool:
                return len(notices) == 2

            await until(both_told, asyncio.get_running_loop().create_future())
            await asyncio.sleep(0.3)  # a second connection left listening would tell it twice
            assert [(n.kind, [due.id for due in n.jobs]) for n in notices[1:]] == [("new", [job.id])]
        finally:
            # the pool's connections are frozen too: their close is not answered, and is cut
            # short (CLOSE_TIMEOUT_SECONDS) instead of waiting for good
            await asyncio.wait_for(store.close(), 10)


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


# -- vacuum (a server whose autovacuum is off) --------------------------------------------------
VACUUM_COUNTS = "SELECT relname, vacuum_count FROM pg_stat_user_tables"
#: the tables every claim, completion, heartbeat or prune updates or deletes rows of
QUEUE_TABLES = {"worker_queue", "job_counts", "job_events", "job_tags", "job_dependencies",
                "rate_limits", "processes", "cron_fires"}


async def _vacuum_counts(database_url: str) -> dict[str, int]:
    """The server's statistics of the queue's tables: how many times each was vacuumed."""
    conn = await asyncpg.connect(dsn_of(database_url))
    try:
        return {r["relname"]: r["vacuum_count"] for r in await conn.fetch(VACUUM_COUNTS)
                if r["relname"] in QUEUE_TABLES}
    finally:
        await conn.close()


@pytest.fixture
async def autovacuum_off(database_url: str) -> None:
    await skip_unless_autovacuum_is_off(dsn_of(database_url))


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
@pytest.mark.usefixtures("autovacuum_off")
async def test_the_queue_tables_are_vacuumed_when_the_servers_autovacuum_is_off(
    database_url: str, store: JobStore, clock: ManualClock,
) -> None:
    row = await claimed(store, clock)
    await store.complete_many([Completion(row.id, row.fence, None)])
    before = await _vacuum_counts(database_url)

    assert await store.vacuum()

    after = await _vacuum_counts(database_url)
    assert set(before) == QUEUE_TABLES
    assert after == {table: n + 1 for table, n in before.items()}


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_the_queue_tables_are_left_to_a_servers_autovacuum_that_is_on(
    database_url: str, store: JobStore, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The server's setting cannot be changed from a test (it is the whole server's): the
    store's question about it is answered here instead."""
    from carwash_jobs.store import postgres

    monkeypatch.setattr(postgres, "AUTOVACUUM_ON", "SELECT true")
    before = await _vacuum_counts(database_url)

    assert not await store.vacuum()

    assert await _vacuum_counts(database_url) == before


async def _lock_is_free(database_url: str) -> bool:
    """Whether a session of its own can take the fleet's vacuum lock (and it lets it go)."""
    from carwash_jobs.store.postgres import VACUUM_LOCK

    probe = await asyncpg.connect(dsn_of(database_url))
    try:
        return bool(await probe.fetchval(VACUUM_LOCK))
    finally:
        await probe.close()


async def _until_lock_is_free(database_url: str) -> None:
    """The server lets a session's locks go once it sees the session end, a moment after."""
    for _ in range(200):  # nothing to wait on but the server itself: ask every 50 ms, 10 s at most
        if await _lock_is_free(database_url):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the fleet's vacuum lock was still held 10 s after the vacuum ended")


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
@pytest.mark.usefixtures("autovacuum_off")
async def test_another_processs_recent_vacuum_stands_for_this_ones(
    database_url: str, store: JobStore, other_store: JobStore,
) -> None:
    """Every worker of a fleet asks on its own timer: within the window, the first one's
    vacuum is the fleet's, and the others' return at once. Past it, or with no window, the
    next one runs."""
    assert await other_store.vacuum(skip_if_vacuumed_within_seconds=60)
    before = await _vacuum_counts(database_url)

    assert not await store.vacuum(skip_if_vacuumed_within_seconds=60)
    assert await _vacuum_counts(database_url) == before

    assert await store.vacuum(skip_if_vacuumed_within_seconds=0)
    assert await _vacuum_counts(database_url) == {t: n + 1 for t, n in before.items()}

    await asyncio.sleep(0.3)  # past a window of 0.2 s
    assert await other_store.vacuum(skip_if_vacuumed_within_seconds=0.2)
    assert await _vacuum_counts(database_url) == {t: n + 2 for t, n in before.items()}


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
@pytest.mark.usefixtures("autovacuum_off")
async def test_one_vacuum_at_a_time_in_the_fleet_and_the_others_do_not_wait(
    database_url: str, store: JobStore,
) -> None:
    """Another process is vacuuming (it holds the fleet's vacuum lock): this one returns at
    once, vacuuming nothing, and vacuums again once the lock is free."""
    from carwash_jobs.store.postgres import VACUUM_LOCK

    holder = await asyncpg.connect(dsn_of(database_url))
    try:
        assert await holder.fetchval(VACUUM_LOCK)
        before = await _vacuum_counts(database_url)
        async with asyncio.timeout(10):
            assert not await store.vacuum()
        assert await _vacuum_counts(database_url) == before
    finally:
        await holder.close()
    assert await store.vacuum()
    assert await _lock_is_free(database_url)  # it gave the lock back


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
@pytest.mark.parametrize("ending", ["fails", "is cancelled"])
@pytest.mark.usefixtures("autovacuum_off")
async def test_a_vacuum_that_fails_or_is_cancelled_lets_the_fleets_vacuum_lock_go(
    database_url: str, store: JobStore, monkeypatch: pytest.MonkeyPatch, ending: str,
) -> None:
    """The pool keeps a session's locks on release: a vacuum that ended with the lock held
    would otherwise keep every other worker from vacuuming for as long as its connection
    lived. It fails (no server fails a vacuum on cue: its statement is replaced), or a
    worker's stop cancels it midway, as it cancels the scheduler's duties."""
    from carwash_jobs.store.postgres import PostgresJobStore

    vacuuming = asyncio.Event()

    async def stand_in(_conn: object) -> None:
        vacuuming.set()
        if ending == "fails":
            raise OSError("connection lost")
        await asyncio.sleep(3600)

    monkeypatch.setattr(PostgresJobStore, "_vacuum_tables", staticmethod(stand_in))
    task = asyncio.ensure_future(store.vacuum())
    await vacuuming.wait()
    if ending == "is cancelled":
        assert not await _lock_is_free(database_url)  # held while it vacuums
        task.cancel()
    with pytest.raises(OSError if ending == "fails" else asyncio.CancelledError):
        await task

    await _until_lock_is_free(database_url)


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
@pytest.mark.usefixtures("autovacuum_off")
async def test_a_vacuum_skips_a_table_it_cannot_lock_at_once_instead_of_waiting(
    database_url: str, store: JobStore, caplog: pytest.LogCaptureFixture,
) -> None:
    """A second process's vacuum (or a migration) holds the table: the lock VACUUM takes
    conflicts with itself. Waiting would hold a pool connection, and the scheduler's duty, for
    as long as the other one runs."""
    holder = await asyncpg.connect(dsn_of(database_url))
    try:
        async with holder.transaction():
            await holder.execute("LOCK TABLE worker_queue IN SHARE UPDATE EXCLUSIVE MODE")
            before = await _vacuum_counts(database_url)
            async with asyncio.timeout(10):
                assert await store.vacuum()
            after = await _vacuum_counts(database_url)
    finally:
        await holder.close()
    assert after == {table: n + (table != "worker_queue") for table, n in before.items()}
    skipped = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(skipped) == 1
    assert "skipping vacuum of \"worker_queue\"" in skipped[0]

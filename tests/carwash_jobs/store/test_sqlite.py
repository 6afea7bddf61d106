"""What only the SQLite adapter does: group commit through one writer, its failure rules, and
the pragmas that make an acknowledged write survive a power cut."""

from __future__ import annotations

import asyncio
import sqlite3
import tempfile
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from carwash_jobs import lifecycle
from carwash_jobs.errors import StoreUnavailable
from carwash_jobs.lifecycle import JobStatus
from carwash_jobs.store import open_store
from carwash_jobs.store import sqlite as sqlite_store
from carwash_jobs.store.base import FailedFilter, JobFilter, NewJob
from carwash_jobs.store.sqlite import (
    ACTIVE_TAGGED_JOB,
    ALIKE_TARGET,
    CLAIM_DUE,
    CLAIM_DUE_LIMITED,
    CLAIM_IDS_LIMITED,
    COUNTS,
    FAILED_IDS,
    LIST_JOBS_BY_CREATED,
    LIST_TAGGED_JOBS,
    SqliteJobStore,
    _failed_where,
    _list_sql,
    _list_where,
    _transition_sql,
)
from carwash_jobs.types import JobId, new_job_id
from tests.carwash_jobs.support import (
    OWNER,
    ManualClock,
    copy_database,
    count_rows,
    open_sqlite,
)

if TYPE_CHECKING:
    from carwash_jobs.store.base import Tx


def new_job(clock: ManualClock) -> NewJob:
    return NewJob(id=new_job_id(), task_type="noop", payload={}, status=JobStatus.queued,
                  run_at=clock(), created_at=clock())


async def _create(store: SqliteJobStore, sql: str) -> None:
    async def run(tx: Tx) -> None:
        await tx.execute(sql)

    await store.transaction(run)


async def _rows(store: SqliteJobStore, sql: str) -> list[tuple[Any, ...]]:
    return await store.writer.in_thread(lambda conn: conn.execute(sql).fetchall())


def test_open_store_picks_the_sqlite_adapter_from_the_url(db_url: str) -> None:
    assert isinstance(open_store(db_url, owner=OWNER), SqliteJobStore)


async def test_many_concurrent_writes_share_commits(store: SqliteJobStore, clock: ManualClock) -> None:
    before_batches, before_writes = store.writer.batches, store.writer.writes
    results = await asyncio.gather(*(store.insert([new_job(clock)]) for _ in range(200)))
    batches = store.writer.batches - before_batches
    writes = store.writer.writes - before_writes
    assert writes == 200
    assert batches < writes
    assert all(inserted.created for (inserted,) in results)
    assert count_rows(f"sqlite+aiosqlite:///{store.path}") == 200


async def test_a_failing_write_rolls_back_only_its_own_work(store: SqliteJobStore) -> None:
    await _create(store, "CREATE TABLE notes (caller INTEGER, step INTEGER)")

    async def caller(n: int) -> None:
        async def write(tx: Tx) -> None:
            await tx.execute("INSERT INTO notes VALUES (:n, 1)", {"n": n})
            await tx.execute("INSERT INTO notes VALUES (:n, 2)", {"n": n})
            if n == 3:
                raise RuntimeError("caller 3 fails")

        await store.transaction(write)

    def engine_write(n: int) -> Any:
        def run(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT INTO notes VALUES (?, 1)", (n,))
            if n == 13:
                conn.execute("INSERT INTO no_such_table VALUES (1)")

        return store.writer.run_sync(run)

    before = store.writer.batches
    results = await asyncio.gather(
        *(caller(n) for n in range(6)), *(engine_write(n) for n in range(10, 16)),
        return_exceptions=True,
    )
    assert store.writer.batches - before == 1  # all of them went out in one commit
    failures = {i: r for i, r in enumerate(results) if isinstance(r, BaseException)}
    assert set(failures) == {3, 9}
    assert isinstance(failures[3], RuntimeError)
    assert isinstance(failures[9], sqlite3.OperationalError)
    callers = {row[0] for row in await _rows(store, "SELECT caller FROM notes")}
    assert callers == {0, 1, 2, 4, 5, 10, 11, 12, 14, 15}
    assert len(await _rows(store, "SELECT * FROM notes WHERE caller < 10")) == 10


async def test_a_failed_commit_fails_every_waiting_caller_and_keeps_none_of_their_writes(
    store: SqliteJobStore, clock: ManualClock
) -> None:
    # A deferred foreign key is checked at COMMIT, not at the statement: one orphan row makes
    # the whole group commit fail, a real database error in the commit itself.
    await store.writer.in_thread(lambda conn: conn.execute("PRAGMA foreign_keys = ON"))
    await _create(store, "CREATE TABLE parent (id INTEGER PRIMARY KEY)")
    await _create(store, "CREATE TABLE child (parent_id INTEGER REFERENCES parent (id) "
                         "DEFERRABLE INITIALLY DEFERRED)")

    async def orphan(tx: Tx) -> None:
        await tx.execute("INSERT INTO child VALUES (42)")

    jobs = [new_job(clock) for _ in range(5)]
    before = store.writer.batches
    results = await asyncio.gather(
        *(store.insert([job]) for job in jobs), store.transaction(orphan),
        return_exceptions=True,
    )
    assert store.writer.batches == before  # no commit happened
    assert all(isinstance(r, sqlite3.IntegrityError) for r in results), results
    assert count_rows(f"sqlite+aiosqlite:///{store.path}") == 0
    assert count_rows(f"sqlite+aiosqlite:///{store.path}", "child") == 0
    # the writer goes on: the next write commits
    (inserted,) = await store.insert([new_job(clock)])
    assert (await store.get(inserted.job.id)).status == JobStatus.queued


#: text an enqueue takes for a queue, a tag or a context (no NUL, no lone surrogate)
_NAME = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"),
                min_size=1, max_size=12)
#: a payload as the queue's JSON-mode dump makes it: JSON types, any text (a lone surrogate
#: too), integers beyond 64 bits; no NaN or infinity (the queue refuses them)
_PAYLOAD = st.dictionaries(st.text(max_size=6), st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
), max_size=5)


@settings(deadline=None, max_examples=60)  # a busy machine: a slow example is not a failure
@given(
    payloads=st.lists(_PAYLOAD, min_size=2, max_size=4),
    queue=_NAME,
    tags=st.lists(_NAME, max_size=3, unique=True),
    context=st.none() | st.dictionaries(_NAME, _NAME, max_size=2),
    priority=st.integers(-1000, 1000),
    delay=st.sampled_from([0, 60]),
)
def test_plain_jobs_written_in_one_statement_read_back_as_jobs_written_one_by_one(
    migrated_template: Path, payloads: list[dict[str, Any]], queue: str, tags: list[str],
    context: dict[str, str] | None, priority: int, delay: int,
) -> None:
    """Plain jobs go in through one statement that reads their rows from a JSON array; a job
    with an idempotency key through a statement run once a row. Whatever the text and numbers,
    each reads back as the other path writes it, and as its insert returned it."""
    clock = ManualClock()

    def jobs(key: str | None) -> list[NewJob]:
        return [
            NewJob(id=new_job_id(), task_type="noop", payload=p, status=JobStatus.queued,
                   run_at=clock() + timedelta(seconds=delay), created_at=clock(), queue=queue,
                   priority=priority, tags=tags, context=context,
                   idempotency_key=None if key is None else f"{key}-{i}")
            for i, p in enumerate(payloads)
        ]

    async def check(url: str) -> None:
        store = await open_sqlite(url, clock=clock)
        try:
            plain, keyed = jobs(None), jobs("k")
            returned = [r.job for r in await store.insert(plain)]
            await store.insert(keyed)
            read = await store.get_many([j.id for j in plain + keyed])
        finally:
            await store.close()
        by_id = {row.id: row for row in read}
        assert [by_id[j.id] for j in plain] == returned
        assert [replace(by_id[j.id], id=JobId(""), idempotency_key=None) for j in plain] == [
            replace(by_id[j.id], id=JobId(""), idempotency_key=None) for j in keyed
        ]

    with tempfile.TemporaryDirectory() as directory:
        asyncio.run(check(copy_database(migrated_template, Path(directory) / "jobs.db")))


async def test_plain_jobs_past_the_text_one_statement_reads_go_in_through_several(
    store: SqliteJobStore, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bulk enqueue of large payloads: SQLite refuses a string over a billion bytes, so the
    rows' JSON arrays are cut at about PLAIN_ROWS_MAX_CHARS (here 1,100; each row counts 402
    besides its payload), a job larger than that alone in its own. Every job and its event is
    written, in one commit."""
    monkeypatch.setattr(sqlite_store, "PLAIN_ROWS_MAX_CHARS", 1100)
    statements: list[str] = []
    sizes = [100, 100, 100, 400, 10, 10]
    jobs = [replace(new_job(clock), payload={"text": "x" * n}) for n in sizes]

    def trace(conn: sqlite3.Connection) -> None:
        conn.set_trace_callback(statements.append)

    await store.writer.in_thread(trace)
    results = await store.insert(jobs)
    await store.writer.in_thread(lambda conn: conn.set_trace_callback(None))

    # each payload's text is 11 more than its size: [100, 100], [100], [400], [10, 10]
    assert len([s for s in statements if "INSERT INTO worker_queue" in s]) == 4
    assert statements.count("COMMIT") == 1
    read = {row.id: row for row in await store.get_many([j.id for j in jobs])}
    assert [read[j.id] for j in jobs] == [r.job for r in results]
    assert [len(read[j.id].payload["text"]) for j in jobs] == sizes
    for job in jobs:
        assert [e.event for e in await store.events(job.id)] == ["enqueued"]


async def test_a_large_bulk_of_plain_jobs_lets_the_event_loop_run_between_its_parts(
    store: SqliteJobStore, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Plain jobs are made ready in the event loop's thread, PLAIN_PART_JOBS (here 2) at a time,
    the loop's other work running between two parts, and all of them written in one commit."""
    monkeypatch.setattr(sqlite_store, "PLAIN_PART_JOBS", 2)
    turns = 0
    seen_at_part: list[int] = []
    make_part = sqlite_store._PlainJobs

    def part(jobs: list[NewJob], now: datetime) -> Any:
        seen_at_part.append(turns)
        return make_part(jobs, now)

    monkeypatch.setattr(sqlite_store, "_PlainJobs", part)

    async def other_work() -> None:
        nonlocal turns
        while True:
            await asyncio.sleep(0)
            turns += 1

    ticking = asyncio.create_task(other_work())
    await asyncio.sleep(0)  # it has started
    try:
        jobs = [new_job(clock) for _ in range(5)]
        results = await store.insert(jobs)
    finally:
        ticking.cancel()
    assert len(seen_at_part) == 3
    assert seen_at_part == sorted(set(seen_at_part))  # the loop turned between every two parts
    assert [r.job.id for r in results] == [j.id for j in jobs]
    assert len(await store.get_many([j.id for j in jobs])) == 5


async def test_the_writer_runs_in_wal_mode_with_synchronous_full_and_temp_store_memory(
    store: SqliteJobStore,
) -> None:
    assert await _rows(store, "PRAGMA journal_mode") == [("wal",)]
    assert await _rows(store, "PRAGMA synchronous") == [(2,)]  # 2 = FULL
    assert (await _rows(store, "PRAGMA busy_timeout"))[0][0] == 5000
    # statement journals in memory: no temporary file per commit
    assert await _rows(store, "PRAGMA temp_store") == [(2,)]  # 2 = MEMORY
    plain = sqlite3.connect(store.path)  # WAL is a property of the file: others see it too
    try:
        assert plain.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    finally:
        plain.close()


async def test_synchronous_normal_can_be_chosen(db_url: str) -> None:
    store = await open_sqlite(db_url, synchronous="NORMAL")
    try:
        assert await _rows(store, "PRAGMA synchronous") == [(1,)]
    finally:
        await store.close()


async def test_an_acknowledged_insert_is_there_for_the_next_process(
    db_url: str, clock: ManualClock
) -> None:
    store = await open_sqlite(db_url, clock=clock)
    job = new_job(clock)
    await store.insert([job])
    await store.close()
    reopened = await open_sqlite(db_url, clock=clock)
    try:
        assert (await reopened.get(job.id)).id == job.id
    finally:
        await reopened.close()


async def test_opening_a_missing_database_says_to_run_the_upgrade(tmp_path: Path) -> None:
    store = SqliteJobStore(f"sqlite+aiosqlite:///{tmp_path / 'none.db'}", owner=OWNER)
    with pytest.raises(StoreUnavailable, match="carwash-jobs db upgrade"):
        await store.open()


async def test_a_closed_store_refuses_reads_and_writes(db_url: str, clock: ManualClock) -> None:
    store = await open_sqlite(db_url, clock=clock)
    await store.close()
    with pytest.raises(StoreUnavailable):
        await store.ping()
    with pytest.raises(StoreUnavailable, match="not open"):  # as PostgreSQL's pool says
        await store.insert([new_job(clock)])


async def test_ping_fails_once_the_database_file_is_deleted(
    db_url: str, clock: ManualClock
) -> None:
    store = await open_sqlite(db_url, clock=clock)
    try:
        await store.ping()
        store.path.unlink()  # the open connections still answer, from a file nobody will open
        with pytest.raises(StoreUnavailable, match="is gone"):
            await store.ping()
    finally:
        await store.close()


async def test_ping_fails_once_the_database_file_is_replaced(
    db_url: str, clock: ManualClock, tmp_path: Path
) -> None:
    store = await open_sqlite(db_url, clock=clock)
    try:
        copy = tmp_path / "copy.db"
        copy.write_bytes(store.path.read_bytes())
        copy.replace(store.path)  # a restore over the live file
        with pytest.raises(StoreUnavailable, match="was replaced"):
            await store.ping()
    finally:
        await store.close()


async def test_ping_checks_the_opened_file_whatever_the_working_directory_is_later(
    db_url: str, clock: ManualClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, _, name = db_url.removeprefix("sqlite+aiosqlite:///").rpartition("/")
    monkeypatch.chdir(folder)
    store = await open_sqlite(f"sqlite+aiosqlite:///{name}", clock=clock)  # a relative path
    try:
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        monkeypatch.chdir(elsewhere)  # a handler changed directory: the store is still fine
        await store.ping()
    finally:
        await store.close()


# -- query plans ---------------------------------------------------------------------------
LIST_FILTERS = [
    JobFilter(),
    JobFilter(status=JobStatus.failed),
    JobFilter(status=JobStatus.queued),
    JobFilter(task_type="email"),
    JobFilter(queue="bulk"),
    JobFilter(status=JobStatus.failed, task_type="email"),
    JobFilter(tag="vip"),
    JobFilter(tag="vip", status=JobStatus.failed),
    JobFilter(tag="vip", status=JobStatus.running),
]


@pytest.mark.parametrize("flt", LIST_FILTERS, ids=repr)
async def test_every_list_filter_reads_an_index_range_in_id_order(
    store: SqliteJobStore, flt: JobFilter
) -> None:
    """A filter that matches few of a million rows must not walk the table, and no list may
    sort: the plan reads one index in id order and stops at the page's end."""
    where, params = _list_where(flt, None, "id" if flt.tag is None else "job_tags.job_id")
    sql = _list_sql(flt, by_created=False) if flt.tag is None else LIST_TAGGED_JOBS
    args = (*params, 51) if flt.tag is None else (flt.tag, *params, 51)

    plan = await _plan(store, sql.format(where=where), args)

    assert "TEMP B-TREE" not in plan, plan
    if flt == JobFilter():  # the whole list: the primary key, newest first
        assert plan.startswith("SCAN worker_queue USING INDEX sqlite_autoindex"), plan
    else:  # first, a range of an index that starts with a filtered column
        first = plan.split(" | ")[0]
        assert first.startswith("SEARCH"), plan
        assert "autoindex_worker_queue" not in first, plan
        assert "SCAN" not in plan, plan


@pytest.mark.parametrize("flt", [JobFilter(status=JobStatus.running),
                                 JobFilter(status=JobStatus.running, task_type="email")], ids=repr)
@pytest.mark.parametrize("cursor", [None, "0" * 32])
@pytest.mark.parametrize("by_created", [False, True])
async def test_a_list_of_running_jobs_reads_the_lease_index(
    store: SqliteJobStore, flt: JobFilter, cursor: str | None, by_created: bool
) -> None:
    """Running jobs are in no list index (migration 0008). The lease index holds just them: the
    list reads it and sorts those few, where the primary key (or, with a creation-time range,
    the created index) would walk every job for them."""
    where, params = _list_where(flt, cursor, "id")
    if by_created:
        where, params = f"{where} AND created_at >= ?", [*params, "2026-11-01 00:00:00.000000"]

    plan = await _plan(store, _list_sql(flt, by_created=by_created).format(where=where),
                       (*params, 51))

    assert plan == "SCAN worker_queue USING INDEX ix_worker_queue_lease | USE TEMP B-TREE FOR ORDER BY"


@pytest.mark.parametrize("created_after", [None, datetime(2026, 1, 1, tzinfo=UTC)])
async def test_the_store_lists_running_jobs_with_the_lease_index_statement(
    store: SqliteJobStore, created_after: datetime | None
) -> None:
    """What list_jobs sends, not only what _list_sql answers."""
    sent: list[str] = []
    reader = store._reader  # the statement text is what is under test
    assert reader is not None
    await reader.set_trace_callback(sent.append)

    await store.list_jobs(JobFilter(status=JobStatus.running, created_after=created_after), 50)

    listed = [sql for sql in sent if "FROM worker_queue" in sql]
    assert listed, sent
    assert all("INDEXED BY ix_worker_queue_lease" in sql for sql in listed), listed


async def test_the_overlap_check_of_a_cron_fire_reads_only_unfinished_jobs(
    store: SqliteJobStore,
) -> None:
    """Not every job of the task type (ix_worker_queue_type), nor every job the schedule's tag
    ever named: the list index without running jobs, and the lease index for those."""
    plan = await _plan(store, ACTIVE_TAGGED_JOB, {"tag": "cron:nightly", "task_type": "email"})

    reads = [step for step in plan.split(" | ") if " w USING " in step]
    assert reads == [
        "SEARCH w USING COVERING INDEX ix_worker_queue_type_status (task_type=? AND status=?)",
        "SCAN w USING INDEX ix_worker_queue_lease",
    ], plan


async def test_the_counts_find_waiting_jobs_by_their_dependency_edges_and_status_index(
    store: SqliteJobStore,
) -> None:
    plan = await _plan(store, COUNTS, ())

    reads = [step for step in plan.split(" | ") if "worker_queue" in step]
    assert reads == [
        "SCAN worker_queue USING INDEX ix_worker_queue_ready",
        "SCAN worker_queue USING INDEX ix_worker_queue_scheduled",
        "SCAN worker_queue USING INDEX ix_worker_queue_lease",
        "SEARCH worker_queue USING INDEX ix_worker_queue_status (status=? AND id=?)",
    ], plan


@pytest.mark.parametrize("flt", [
    FailedFilter(), FailedFilter(task_type="email"),
    FailedFilter(failed_after=datetime(2026, 1, 1, tzinfo=UTC)),
], ids=repr)
async def test_a_bulk_retry_finds_failed_jobs_through_an_index_on_status(
    store: SqliteJobStore, flt: FailedFilter
) -> None:
    where, params = _failed_where(flt)

    plan = await _plan(store, FAILED_IDS.format(where=where), (*params, 100))

    assert "SCAN" not in plan, plan  # not the whole table, as with no index on status
    assert plan.split(" | ")[0].startswith("SEARCH worker_queue USING"), plan
    assert "status=?" in plan.split(" | ")[0], plan


@pytest.mark.parametrize("sql", [CLAIM_IDS_LIMITED, CLAIM_DUE_LIMITED], ids=["ids", "due"])
async def test_the_fleet_limit_counts_running_jobs_through_the_lease_index(
    store: SqliteJobStore, sql: str
) -> None:
    """Not through (task_type, id), which would read every finished job of the type too."""
    args = {"owner": OWNER, "lease_until": "2030", "now": "2030", "ids": "[]", "queues": None,
            "limit": 10, "limits": "{}"}

    plan = await _plan(store, sql, args)

    counts = [step for step in plan.split(" | ") if step.startswith(("SCAN r", "SEARCH r"))]
    assert counts, plan
    assert all(step == "SCAN r USING INDEX ix_worker_queue_lease"
               or step.startswith("SEARCH r USING AUTOMATIC") for step in counts), plan
    # the guard counts once per claim, not once per candidate
    assert "MATERIALIZE r | SCAN worker_queue USING INDEX ix_worker_queue_lease" in plan, plan


@pytest.mark.parametrize("where", [
    "created_at < ?", "created_at >= ?",
    "created_at >= ? AND created_at <= ? AND (created_at < ? OR id < ?)",
])
async def test_a_creation_time_filter_reads_the_created_index_in_order(
    store: SqliteJobStore, where: str
) -> None:
    args = ("2026-11-01 00:00:00.000000",) * where.count("?")

    plan = await _plan(store, LIST_JOBS_BY_CREATED.format(where=where), (*args, 51))

    assert plan.startswith("SEARCH worker_queue USING INDEX ix_worker_queue_created"), plan
    assert "TEMP B-TREE" not in plan, plan


async def test_the_claim_reads_the_ready_index_whatever_else_is_indexed(
    store: SqliteJobStore,
) -> None:
    """(status, id) also matches `status = 'queued'`; without statistics SQLite would take it
    and sort every queued row. The claim names its index, so this plan is fixed."""
    plan = await _plan(store, CLAIM_DUE.format(queue_filter=""),
                       ("o", "2030", "2020", "2030", 100))

    assert "ix_worker_queue_ready" in plan
    assert "TEMP B-TREE" not in plan


async def test_a_batch_of_one_change_finds_its_jobs_by_id_among_many_failed(
    store: SqliteJobStore,
) -> None:
    """A bulk retry's batch (apply_many, one statement) goes by its ids: the plan is pinned here
    as the other hot statements' are (a status index would walk every failed job each batch)."""
    sql, params = _transition_sql(lifecycle.retry_failed(new_job_id(), datetime.now(UTC)),
                                  datetime.now(UTC), ALIKE_TARGET)

    plan = await _plan(store, sql, {**params, "ids": "[]"})

    assert plan.startswith("SEARCH worker_queue USING INDEX sqlite_autoindex_worker_queue_1 (id=?)"), plan
    assert "ix_worker_queue" not in plan, plan


async def _plan(store: SqliteJobStore, sql: str, args: tuple[Any, ...] | dict[str, Any]) -> str:
    def explain(conn: sqlite3.Connection) -> str:
        return " | ".join(r[3] for r in conn.execute(f"EXPLAIN QUERY PLAN {sql}", args))

    return await store.writer.in_thread(explain)

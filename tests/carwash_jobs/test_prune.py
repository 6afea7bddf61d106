"""Retention (carwash_jobs/prune.py and JobStore.prune on every adapter): old finished jobs, their
events, dependency edges and upload files go; recent ones and unfinished ones stay; failed jobs
stay longer. Also the trigger-kept counts of finished jobs (migration 0005), which pruning and
every move in or out of a finished status must keep equal to a plain COUNT(*).

The databases are conftest.py's database_url: SQLite always, PostgreSQL when
CARWASH_TEST_POSTGRES_URL names a server.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from carwash_jobs import lifecycle
from carwash_jobs.errors import InvalidPayload
from carwash_jobs.lifecycle import AttemptOutcome, JobStatus
from carwash_jobs.prune import Pruner
from carwash_jobs.queue import JobQueue
from carwash_jobs.registry import TaskRegistry
from carwash_jobs.store.base import Completion, JobFilter, NewJob, PruneBatch
from carwash_jobs.types import new_job_id
from carwash_jobs.uploads import is_upload
from tests.carwash_jobs.store import test_contract as contract
from tests.carwash_jobs.store.test_contract import add, claimed, complete, failed
from tests.carwash_jobs.support import OWNER
from tests.endpoints.sample_tasks.upload import TASK_TYPE as UPLOAD

if TYPE_CHECKING:
    from carwash_jobs.store.base import JobRow, JobStore, Tx
    from tests.carwash_jobs.support import ManualClock

DAY = 24 * 3600

# the store contract suite's store fixture on conftest.py's database_url
store = contract.store


async def count(store: JobStore, sql: str, **params: Any) -> int:
    async def run(tx: Tx) -> int:
        rows = await tx.fetch(sql, params)
        return int(rows[0]["n"])

    return await store.transaction(run)


async def direct_counts(store: JobStore) -> dict[tuple[str, str], int]:
    async def run(tx: Tx) -> list[dict[str, Any]]:
        return await tx.fetch(
            "SELECT task_type, status, COUNT(*) AS n FROM worker_queue GROUP BY task_type, status"
        )

    return {(r["task_type"], r["status"]): int(r["n"]) for r in await store.transaction(run)}


async def assert_counts_agree(store: JobStore) -> None:
    stats = await store.stats()
    kept = {(t, s): n for t, by in stats.by_task_type.items() for s, n in by.items() if n}
    direct = await direct_counts(store)
    assert kept == direct
    for status in JobStatus:
        assert stats.by_status[status.value] == sum(
            n for (_, s), n in direct.items() if s == status.value
        )


async def cancelled(store: JobStore, clock: ManualClock) -> JobRow:
    job = await add(store, clock)
    return (await store.apply(lifecycle.cancel(job.id, clock()))).job


# -- JobStore.prune ----------------------------------------------------------------------------
async def test_old_finished_jobs_go_and_recent_and_unfinished_ones_stay(
    store: JobStore, clock: ManualClock
) -> None:
    old_done = await complete(store, await claimed(store, clock), clock)
    old_cancelled = await cancelled(store, clock)
    old_failed = await failed(store, clock)
    old_dependent = await add(store, clock, depends_on=[old_done.id])  # queued: never pruned
    clock.advance(8 * DAY)
    recent_done = await complete(store, await claimed(store, clock), clock)
    recent_failed = await failed(store, clock)
    now = clock()

    pruned = (await store.prune(now - timedelta(days=7), now - timedelta(days=30), limit=100)).jobs

    assert {p.id for p in pruned} == {old_done.id, old_cancelled.id}
    assert {p.status for p in pruned} == {"completed", "cancelled"}
    assert all(p.payload == {"n": 1} and p.task_type == "noop" for p in pruned)
    remaining = {job.id for job in await store.get_many(
        [old_done.id, old_cancelled.id, old_failed.id, old_dependent.id, recent_done.id, recent_failed.id]
    )}
    assert remaining == {old_failed.id, old_dependent.id, recent_done.id, recent_failed.id}
    assert await store.events(old_done.id) == []
    assert await store.events(recent_done.id) != []
    assert await count(store, "SELECT COUNT(*) AS n FROM job_dependencies WHERE depends_on_id = :id",
                       id=old_done.id) == 0
    assert await count(store, "SELECT COUNT(*) AS n FROM job_events WHERE job_id = :id",
                       id=old_dependent.id) > 0


async def test_a_pruned_job_takes_its_tags_with_it(store: JobStore, clock: ManualClock) -> None:
    old = await complete(store, await claimed(store, clock, tags=["vip"]), clock)
    clock.advance(8 * DAY)
    recent = await complete(store, await claimed(store, clock, tags=["vip"]), clock)
    now = clock()

    await store.prune(now - timedelta(days=7), now - timedelta(days=30), limit=100)

    assert await count(store, "SELECT COUNT(*) AS n FROM job_tags WHERE job_id = :id", id=old.id) == 0
    assert await count(store, "SELECT COUNT(*) AS n FROM job_tags WHERE job_id = :id",
                       id=recent.id) == 1


async def test_failed_jobs_go_after_their_longer_retention(store: JobStore, clock: ManualClock) -> None:
    old_failed = await failed(store, clock)
    clock.advance(31 * DAY)
    now = clock()

    pruned = (await store.prune(now - timedelta(days=7), now - timedelta(days=30), limit=100)).jobs

    assert [p.id for p in pruned] == [old_failed.id]
    assert await store.events(old_failed.id) == []


async def test_prune_takes_at_most_limit_jobs_oldest_first(store: JobStore, clock: ManualClock) -> None:
    jobs = []
    for _ in range(5):
        jobs.append(await complete(store, await claimed(store, clock), clock))
        clock.advance(60)
    clock.advance(8 * DAY)
    cutoff = clock() - timedelta(days=7)

    first = (await store.prune(cutoff, cutoff, limit=2)).jobs
    rest = (await store.prune(cutoff, cutoff, limit=10)).jobs
    none = (await store.prune(cutoff, cutoff, limit=10)).jobs

    assert [p.id for p in first] == [j.id for j in jobs[:2]]
    assert [p.id for p in rest] == [j.id for j in jobs[2:]]
    assert none == []


# -- cron fires --------------------------------------------------------------------------------
async def fire(store: JobStore, clock: ManualClock, schedule: str, hours_ago: int) -> None:
    """A fire of `schedule` `hours_ago` hours before now, recorded as cron records one."""
    fire_at = clock() - timedelta(hours=hours_ago)
    assert (await store.fire_cron(schedule, fire_at, contract.new_job(clock))).outcome == "fired"


async def fires_kept(store: JobStore, clock: ManualClock) -> dict[str, list[int]]:
    """How many hours ago each kept fire was, per schedule, oldest first."""
    kept: dict[str, list[int]] = {}
    for row in reversed(await store.cron_fires(None, 1000)):
        kept.setdefault(row.schedule, []).append(round((clock() - row.fire_at) / timedelta(hours=1)))
    return kept


async def test_cron_fires_past_the_completed_retention_go_but_each_schedules_newest_stays(
    store: JobStore, clock: ManualClock
) -> None:
    """cron_fires grew by a row per schedule and fire for ever. Cron resumes a schedule from
    its newest fire (CronService._fire_schedule), so that one stays however old it is."""
    for hours_ago in (300, 299, 298, 1):
        await fire(store, clock, "hourly", hours_ago)
    for hours_ago in (2000, 1000):  # a schedule that stopped firing (taken out of the file)
        await fire(store, clock, "retired", hours_ago)
    await fire(store, clock, "yearly", 5000)  # its only fire
    now = clock()

    batch = await store.prune(now - timedelta(days=7), now - timedelta(days=30), limit=100)

    assert (batch.jobs, batch.cron_fires) == ([], 4)  # the fires' jobs are still queued
    assert await fires_kept(store, clock) == {"hourly": [1], "retired": [1000], "yearly": [5000]}


async def test_prune_takes_at_most_limit_cron_fires(store: JobStore, clock: ManualClock) -> None:
    for hours_ago in (400, 300, 200, 1):
        await fire(store, clock, "hourly", hours_ago)
    cutoff = clock() - timedelta(days=7)

    first = await store.prune(cutoff, cutoff, limit=2)
    rest = await store.prune(cutoff, cutoff, limit=2)

    assert (first.cron_fires, rest.cron_fires) == (2, 1)
    assert await fires_kept(store, clock) == {"hourly": [1]}


# -- the counts the triggers keep --------------------------------------------------------------
async def test_counts_of_finished_jobs_follow_every_move_in_and_out(
    store: JobStore, clock: ManualClock
) -> None:
    done = [await claimed(store, clock) for _ in range(3)]
    await store.complete_many([Completion(j.id, j.fence, {"ok": True}) for j in done])  # set-based
    await complete(store, await claimed(store, clock, task_type="other"), clock)
    bad = await failed(store, clock)
    also_bad = await failed(store, clock, task_type="other")
    await cancelled(store, clock)
    await add(store, clock, depends_on=[bad.id])  # born cancelled: its dependency had failed
    waiting = await add(store, clock, depends_on=[(await claimed(store, clock)).id])
    await store.apply(lifecycle.cancel(waiting.id, clock()))
    await add(store, clock, run_at=clock() + timedelta(hours=1))  # scheduled
    await claimed(store, clock)  # running
    await assert_counts_agree(store)

    # failed -> queued, a batch of one change by one statement
    await store.apply_many([lifecycle.retry_failed(j.id, clock()) for j in (bad, also_bad)])
    await assert_counts_agree(store)

    # a batch of cancels, one at a time; a cascade to the jobs waiting on a failed one;
    # a lost worker's job failed on its last attempt
    batch = [await add(store, clock, task_type=t) for t in ("noop", "other", "other")]
    await store.apply_many([lifecycle.cancel(j.id, clock()) for j in batch])
    parent = await claimed(store, clock)
    await add(store, clock, depends_on=[parent.id], task_type="other")
    await store.apply(lifecycle.fail(parent.id, parent.fence, "no", None,
                                     AttemptOutcome.error, clock()))
    lost = await claimed(store, clock, max_attempts=1)
    clock.advance(contract.LEASE.total_seconds() + 1)
    await store.apply(lifecycle.release_expired_lease(lost.id, lost.fence, lost.attempts,
                                                      lost.max_attempts, clock()))
    await assert_counts_agree(store)

    clock.advance(40 * DAY)
    await store.prune(clock(), clock(), limit=1000)
    await assert_counts_agree(store)
    stats = await store.stats()
    assert stats.by_status["completed"] == stats.by_status["failed"] == stats.by_status["cancelled"] == 0


# -- the duty ---------------------------------------------------------------------------------
def upload(files_dir: Path, name: str) -> Path:
    directory = files_dir / name
    directory.mkdir(parents=True)
    path = directory / "employees.csv"
    path.write_text("employee_no\n1\n", encoding="utf-8")
    return path


async def cancelled_upload(store: JobStore, clock: ManualClock, path: Path) -> JobRow:
    """A finished job of the upload task type whose payload names `path`."""
    job = NewJob(id=new_job_id(), task_type=UPLOAD.name, payload={"path": str(path)},
                 status=JobStatus.queued, run_at=clock(), created_at=clock())
    (inserted,) = await store.insert([job])
    return (await store.apply(lifecycle.cancel(inserted.job.id, clock()))).job


async def test_the_duty_removes_the_upload_files_of_pruned_jobs_only(
    tmp_path: Path, clock: ManualClock, store: JobStore
) -> None:
    files = tmp_path / "files"
    old_file = upload(files, "a" * 32)
    new_file = upload(files, "b" * 32)
    outside = tmp_path / "elsewhere" / "keep.csv"
    outside.parent.mkdir()
    outside.write_text("x", encoding="utf-8")
    await cancelled_upload(store, clock, old_file)
    await cancelled_upload(store, clock, outside)
    clock.advance(8 * DAY)
    recent = await cancelled_upload(store, clock, new_file)
    pruner = Pruner(
        store, TaskRegistry([UPLOAD]), clock=clock, files_dir=str(files),
        completed_retention=timedelta(days=7), failed_retention=timedelta(days=30), batch=1,
    )

    assert await pruner.prune() == 2  # in batches of one, until a batch comes back short

    assert not old_file.parent.exists()
    assert outside.exists()  # not an upload under files_dir: left alone
    assert new_file.exists()
    assert (await store.get(recent.id)).status == JobStatus.cancelled


def pruner_of(store: JobStore, clock: ManualClock, tmp_path: Path, batch: int) -> Pruner:
    return Pruner(store, TaskRegistry([]), clock=clock, files_dir=str(tmp_path / "files"),
                  completed_retention=timedelta(days=7), failed_retention=timedelta(days=30),
                  batch=batch)


async def cancelled_jobs(store: JobStore, clock: ManualClock, n: int) -> None:
    inserted = await store.insert([contract.new_job(clock) for _ in range(n)])
    await store.apply_many([lifecycle.cancel(i.job.id, clock()) for i in inserted])


async def count_cancelled(store: JobStore) -> int:
    return await count(store, "SELECT COUNT(*) AS n FROM worker_queue WHERE status = 'cancelled'")


async def test_a_run_prunes_all_jobs_past_their_retention_however_many_batches_it_takes(
    tmp_path: Path, clock: ManualClock, store: JobStore
) -> None:
    """A run stopped after 200 batches: with 101,000 jobs past retention, one run of the
    default 500-job batches left 1,000, and a fleet finishing more than 333 jobs/s (the cap
    over the 300 s interval) grew the table for ever. Batches of one make 250 jobs the same."""
    await cancelled_jobs(store, clock, 250)
    clock.advance(8 * DAY)
    await cancelled_jobs(store, clock, 1)  # within its retention

    assert await pruner_of(store, clock, tmp_path, batch=1).prune() == 250

    assert await count_cancelled(store) == 1


async def test_a_run_goes_on_while_batches_of_cron_fires_come_back_full(
    tmp_path: Path, clock: ManualClock, store: JobStore
) -> None:
    for hours_ago in (300, 299, 298, 297, 296):
        await fire(store, clock, "hourly", hours_ago)

    assert await pruner_of(store, clock, tmp_path, batch=2).prune() == 0  # no finished jobs

    assert await fires_kept(store, clock) == {"hourly": [296]}


async def test_a_run_lets_other_work_in_between_batches_and_ends_when_stopped(
    tmp_path: Path, clock: ManualClock, store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run now goes on for as long as there is something to prune: the event loop's other
    work (enqueues, claims, heartbeats) must get turns all along, and the scheduler's stop,
    which cancels the duty, must end it there and then."""
    await cancelled_jobs(store, clock, 10)
    clock.advance(8 * DAY)
    turns = 0
    turns_at_each_batch: list[int] = []
    third_batch = asyncio.Event()
    prune = store.prune

    async def other_work() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    async def watched_prune(*args: Any) -> PruneBatch:
        turns_at_each_batch.append(turns)
        if len(turns_at_each_batch) == 3:
            third_batch.set()
        return await prune(*args)

    monkeypatch.setattr(store, "prune", watched_prune)
    worker = asyncio.create_task(other_work())
    run = asyncio.create_task(pruner_of(store, clock, tmp_path, batch=1).prune())
    await third_batch.wait()
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    worker.cancel()

    assert len(turns_at_each_batch) == 3  # no batch after the stop
    assert await count_cancelled(store) >= 7  # the rest waits for the next run


async def test_the_runtime_runs_the_duty_on_its_interval(tmp_path: Path) -> None:
    from carwash_jobs.app import build_runtime
    from carwash_jobs.settings import load_settings

    settings = load_settings(
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'x.db'}", task_types=[], schedules_file="",
        prune_interval_seconds=42.0,
    )
    runtime = build_runtime(settings)

    assert runtime.scheduler is not None
    assert ("prune", runtime.pruner.prune if runtime.pruner else None, 42.0) in [
        (name, fn, seconds) for name, fn, seconds in runtime.scheduler._duties
    ]


@pytest.mark.parametrize(
    "field", ["retention_completed_days", "retention_failed_days", "prune_interval_seconds"]
)
def test_retention_settings_must_be_positive(field: str) -> None:
    from carwash_jobs.errors import ConfigurationError
    from carwash_jobs.settings import load_settings

    with pytest.raises(ConfigurationError, match=field):
        load_settings(**{field: 0})


# -- a rerun's upload ---------------------------------------------------------------------------
async def finished_upload(
    store: JobStore, clock: ManualClock, payload: dict[str, Any], *, fail: bool
) -> JobRow:
    job = NewJob(id=new_job_id(), task_type=UPLOAD.name, payload=payload,
                 status=JobStatus.queued, run_at=clock(), created_at=clock())
    (inserted,) = await store.insert([job])
    (row,) = await store.claim([inserted.job.id], OWNER, clock() + contract.LEASE)
    if fail:
        transition = lifecycle.fail(row.id, row.fence, "db down", None, AttemptOutcome.error,
                                    clock())
        return (await store.apply(transition)).job
    return await complete(store, row, clock)


def same_file(a: Path, b: Path) -> bool:
    return a.read_bytes() == b.read_bytes()


def names_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def upload_queue(store: JobStore, clock: ManualClock, files: Path) -> JobQueue:
    return JobQueue(store, TaskRegistry([UPLOAD]), ready=None, clock=clock, files_dir=str(files))


async def test_a_rerun_gets_its_own_copy_of_the_upload_which_pruning_it_takes_alone(
    tmp_path: Path, clock: ManualClock, store: JobStore
) -> None:
    """A rerun once named its source's file: pruning the (completed) rerun removed the file
    that its (failed, retryable, kept longer) source still needed, and the other way round."""
    files = tmp_path / "files"
    path = upload(files, "a" * 32)
    payload = {"path": str(path), "kind": "employees", "tenant_id": "t", "notes": None}
    source = await finished_upload(store, clock, payload, fail=True)

    rerun = await upload_queue(store, clock, files).rerun(source.id)

    copy = Path(rerun.payload["path"])
    assert copy != path
    assert copy.name == path.name
    assert same_file(copy, path)
    assert is_upload(copy, files)
    assert {k: v for k, v in rerun.payload.items() if k != "path"} == {
        k: v for k, v in payload.items() if k != "path"}
    (claimed_rerun,) = await store.claim([rerun.id], OWNER, clock() + contract.LEASE)
    await complete(store, claimed_rerun, clock)
    clock.advance(8 * DAY)
    pruner = Pruner(store, TaskRegistry([UPLOAD]), clock=clock, files_dir=str(files),
                    completed_retention=timedelta(days=7), failed_retention=timedelta(days=30))

    assert await pruner.prune() == 1  # the completed rerun; the failed source stays

    assert not copy.parent.exists()
    assert path.exists()
    assert (await store.get(source.id)).status == JobStatus.failed


async def test_a_rerun_of_an_upload_that_is_gone_names_it_as_its_source_did(
    tmp_path: Path, clock: ManualClock, store: JobStore
) -> None:
    files = tmp_path / "files"
    path = upload(files, "a" * 32)
    source = await finished_upload(
        store, clock, {"path": str(path), "kind": "employees", "tenant_id": "t"}, fail=True)
    path.unlink()

    rerun = await upload_queue(store, clock, files).rerun(source.id)

    assert rerun.payload["path"] == str(path)  # it fails as its source would have
    assert names_in(files) == ["a" * 32]


async def test_a_rerun_that_is_refused_leaves_no_copy_behind(
    tmp_path: Path, clock: ManualClock, store: JobStore
) -> None:
    files = tmp_path / "files"
    path = upload(files, "a" * 32)
    # written before the task type's payload grew a required field: the rerun's is refused
    source = await finished_upload(store, clock, {"path": str(path), "tenant_id": "t"}, fail=True)

    with pytest.raises(InvalidPayload):
        await upload_queue(store, clock, files).rerun(source.id)

    assert names_in(files) == ["a" * 32]


async def test_a_path_outside_the_uploads_is_not_copied(
    tmp_path: Path, clock: ManualClock, store: JobStore
) -> None:
    elsewhere = tmp_path / "elsewhere" / "keep.csv"
    elsewhere.parent.mkdir()
    elsewhere.write_text("employee_no\n", encoding="utf-8")
    source = await finished_upload(
        store, clock, {"path": str(elsewhere), "kind": "employees", "tenant_id": "t"}, fail=True)

    rerun = await upload_queue(store, clock, tmp_path / "files").rerun(source.id)

    assert rerun.payload["path"] == str(elsewhere)
    assert not (tmp_path / "files").exists()


async def test_a_rerun_whose_caller_is_cancelled_as_its_insert_commits_keeps_its_copy(
    tmp_path: Path, clock: ManualClock, store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cancel can land after the insert committed (on the answer's way back): the rerun then
    exists and names the copy, which must stay. Only an error takes the copy away."""
    files = tmp_path / "files"
    path = upload(files, "a" * 32)
    source = await finished_upload(
        store, clock, {"path": str(path), "kind": "employees", "tenant_id": "t"}, fail=True)
    queue = upload_queue(store, clock, files)
    insert = queue.insert

    async def insert_then_cancelled(jobs: Any, **options: Any) -> Any:
        await insert(jobs, **options)
        raise asyncio.CancelledError  # the cancel arrives with the commit's answer

    monkeypatch.setattr(queue, "insert", insert_then_cancelled)
    with pytest.raises(asyncio.CancelledError):
        await queue.rerun(source.id)

    (rerun,) = [j for j in (await store.list_jobs(JobFilter(), 10)).items if j.rerun_of]
    assert rerun.rerun_of == source.id
    assert names_in(files) == sorted(["a" * 32, Path(rerun.payload["path"]).parent.name])

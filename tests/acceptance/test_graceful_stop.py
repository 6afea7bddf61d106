"""SIGTERM stops a worker gracefully: exit code 0 within seconds, and nothing left behind.

Jobs still running when the grace period ends go back to `queued` without counting the attempt
(history outcome "released"), and the next worker finishes them; a job whose claim was in
flight at the signal is started and finished or released like the others, never stranded in
`running` under a process that no longer exists.
"""

from __future__ import annotations

import signal
import time
from collections import Counter
from typing import TYPE_CHECKING

import pytest

from carwash_jobs import heap_trim
from tests.acceptance.tasks_long import LONG_CAP_ENV

if TYPE_CHECKING:
    from tests.acceptance.conftest import Cluster, Worker

LONG_JOBS = 4
LONG_SECONDS = 30.0
GRACE_SECONDS = 1.0
#: the worker exits within this after SIGTERM: grace + releasing the jobs + a clean shutdown
EXIT_WITHIN_SECONDS = GRACE_SECONDS + 4.0
BUSY_JOBS = 1_000
BUSY_ROUNDS = 4
BUSY_RECORDS_PER_ROUND = 50
SETTINGS = {
    "CARWASH_SHUTDOWN_GRACE_SECONDS": str(GRACE_SECONDS),
    "CARWASH_LEASE_SECONDS": "10",
    "CARWASH_HEARTBEAT_INTERVAL_SECONDS": "1",
    "CARWASH_RELOAD_INTERVAL_SECONDS": "0.2",
}

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def _stop(worker: Worker) -> float:
    """SIGTERM `worker`; it must exit with 0. Returns how long it took."""
    started = time.monotonic()
    worker.send(signal.SIGTERM)
    assert worker.wait(30) == 0, worker.tail()
    return time.monotonic() - started


def test_sigterm_releases_long_jobs_uncounted_and_a_restart_finishes_them(
    cluster: Cluster,
) -> None:
    ids = set(cluster.enqueue("long", [{"seconds": LONG_SECONDS}] * LONG_JOBS))
    first = cluster.start_worker(**SETTINGS)
    cluster.wait_for("every long job started",
                     lambda: cluster.record_count() == LONG_JOBS, timeout=30)

    took = _stop(first)
    print(f"SIGTERM to exit: {took:.2f}s (grace {GRACE_SECONDS}s)")
    assert took < EXIT_WITHIN_SECONDS
    assert {r.kind for r in cluster.records()} == {"start"}, "no long job may have finished"

    jobs = cluster.jobs()
    assert set(jobs) == ids
    for job in jobs.values():
        assert (job.status, job.attempts) == ("queued", 0), job
        (released,) = job.history
        assert (released["outcome"], released["attempt"]) == ("released", 1)
        assert f"/{first.pid}/" in released["owner"]

    # the same jobs, now capped at a fraction of a second by the restarted worker
    second = cluster.start_worker(**SETTINGS, **{LONG_CAP_ENV: "0.3"})
    cluster.wait_for("every job completed",
                     lambda: cluster.counts()["completed"] == LONG_JOBS, timeout=30)
    jobs = cluster.jobs()
    assert Counter(j.status for j in jobs.values()) == {"completed": LONG_JOBS}
    for job in jobs.values():
        assert job.attempts == 1, "the released attempt must not count"
        assert [h["outcome"] for h in job.history] == ["released", "completed"]
    ends = [r for r in cluster.records() if r.kind == "end"]
    assert sorted(r.job_id for r in ends) == sorted(ids)
    assert {(r.attempt, r.pid) for r in ends} == {(1, second.pid)}

    assert _stop(second) < EXIT_WITHIN_SECONDS


def test_sigterm_while_busy_leaves_no_job_stranded_in_running(cluster: Cluster) -> None:
    """One slot and no-op jobs keep the worker claiming a good part of the time, so a SIGTERM
    may land while a claim is in flight (about one round in four, measured against a stop()
    that cancelled the claim and stranded its jobs; four rounds caught that 3 runs in 5)."""
    ids = set(cluster.enqueue("record", [{"n": i} for i in range(BUSY_JOBS)]))
    stopped: list[Worker] = []
    for round_ in range(BUSY_ROUNDS):
        worker = cluster.start_worker(**SETTINGS, CARWASH_CONCURRENCY="1")

        # this worker's own records: a count over all of them could already stand at the
        # round's target when a fast worker before it overshot, and the SIGTERM would then
        # reach the new process before it had set up its signal handlers
        def reached(worker: Worker = worker) -> bool:
            ran = sum(1 for r in cluster.records() if r.pid == worker.pid)
            return ran >= BUSY_RECORDS_PER_ROUND

        cluster.wait_for(f"{BUSY_RECORDS_PER_ROUND} records of {worker.name}", reached, timeout=60)
        took = _stop(worker)
        stopped.append(worker)
        counts = cluster.counts()
        print(f"round {round_}: SIGTERM to exit {took:.2f}s; jobs then: {dict(counts)}")
        assert took < EXIT_WITHIN_SECONDS
        assert counts["running"] == 0, f"{worker.name} left a job it had claimed running"
        assert counts["completed"] < BUSY_JOBS
        for job in cluster.jobs().values():
            if job.status == "queued":
                assert job.attempts == 0, job
        assert "recovered" not in worker.log_text()

    last = cluster.start_worker(**SETTINGS, CARWASH_CONCURRENCY="20")
    cluster.wait_for("every job completed",
                     lambda: cluster.counts()["completed"] == BUSY_JOBS, timeout=60)
    jobs = cluster.jobs()
    assert set(jobs) == ids
    outcomes = Counter(h["outcome"] for j in jobs.values() for h in j.history)
    assert outcomes["worker_lost"] == 0, outcomes
    assert "recovered" not in last.log_text()
    runs = Counter((r.job_id, r.attempt) for r in cluster.records())
    # a job released at a stop runs again as attempt 1: count distinct jobs, not lines
    assert set(runs) == {(job_id, 1) for job_id in ids}
    assert {r.pid for r in cluster.records()} <= {w.pid for w in [*stopped, last]}
    assert _stop(last) < EXIT_WITHIN_SECONDS


@pytest.mark.skipif(heap_trim.libc_malloc_trim() is None, reason="the C library has no malloc_trim")
def test_a_worker_trims_its_heap_and_still_stops_at_once(cluster: Cluster) -> None:
    worker = cluster.start_worker(**SETTINGS, CARWASH_HEAP_TRIM_INTERVAL_SECONDS="1")
    worker.wait_ready()
    time.sleep(2.5)  # two trims

    assert _stop(worker) < EXIT_WITHIN_SECONDS  # the trimmer thread holds nothing open
    log = worker.log_text()
    assert "every 1s (malloc_trim)" in log
    assert "Exception" not in log  # nor did a trim fail in its thread


def test_a_worker_told_not_to_trim_does_not(cluster: Cluster) -> None:
    worker = cluster.start_worker(**SETTINGS, CARWASH_HEAP_TRIM_INTERVAL_SECONDS="0")
    worker.wait_ready()

    assert _stop(worker) < EXIT_WITHIN_SECONDS
    assert "malloc_trim" not in worker.log_text()

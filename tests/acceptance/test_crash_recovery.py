"""A worker SIGKILLed in the middle of 2,000 jobs loses none of them: they all complete.

Two ways back: a restarted worker on the same host re-queues the jobs of the dead pid at
start-up (recover_leftovers, the fast path), and a worker that stays alive beside the dead one
re-queues them once their lease runs out (the scheduler's lease check). Either way the lost
attempt counts, and the handlers' own record file shows that the final attempt of every job
really ran, and that no attempt ran twice.
"""

from __future__ import annotations

import signal
from collections import Counter
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.acceptance.conftest import Cluster, Worker

JOBS = 2_000
KILL_AFTER_RECORDS = 400
#: short leases, so that recovery by lease expiry takes seconds, not a minute
LEASE = {
    "CARWASH_LEASE_SECONDS": "3",
    "CARWASH_HEARTBEAT_INTERVAL_SECONDS": "0.5",
    "CARWASH_RELOAD_INTERVAL_SECONDS": "0.2",
    "CARWASH_CONCURRENCY": "10",
}

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def sleep_ms(n: int) -> int:
    """5 to 40 ms, staggered: jobs of one claim batch end at different times, so the worker
    never drains to zero running jobs between batches and a kill always finds some running."""
    return 5 + (n * 7) % 36



def _enqueue(cluster: Cluster) -> set[str]:
    ids = cluster.enqueue("record", [{"n": i, "sleep_ms": sleep_ms(i)} for i in range(JOBS)])
    assert len(set(ids)) == JOBS
    return set(ids)


def _kill_mid_run(cluster: Cluster, victim: Worker) -> int:
    """SIGKILL `victim` once some hundreds of jobs are done; returns how many had completed."""
    cluster.wait_for(
        f"{KILL_AFTER_RECORDS} records and jobs running",
        lambda: cluster.record_count() >= KILL_AFTER_RECORDS and cluster.counts()["running"] > 0,
        timeout=60,
    )
    victim.send(signal.SIGKILL)
    assert victim.wait(10) == -signal.SIGKILL
    completed = cluster.counts()["completed"]
    assert completed < JOBS, "the kill came too late to interrupt anything"
    return completed


def _assert_none_lost(cluster: Cluster, ids: set[str], victim: Worker, survivor: Worker) -> None:
    jobs = cluster.jobs()
    assert set(jobs) == ids
    assert Counter(j.status for j in jobs.values()) == {"completed": JOBS}

    records = cluster.records()
    runs = Counter((r.job_id, r.attempt) for r in records)
    assert [pair for pair, n in runs.items() if n > 1] == [], "an attempt ran twice"
    assert {r.pid for r in records} <= {victim.pid, survivor.pid}
    ran = {(r.job_id, r.attempt): r.pid for r in records}
    for job in jobs.values():
        assert (job.id, job.attempts) in ran, f"the final attempt of {job.id} never ran"
        last = job.history[-1]
        assert (last["outcome"], last["attempt"]) == ("completed", job.attempts)

    recovered = [j for j in jobs.values() if j.attempts > 1]
    assert recovered, "no job was running when the worker died"
    for job in recovered:
        assert job.attempts == 2, job
        lost = job.history[0]
        assert (lost["outcome"], lost["attempt"]) == ("worker_lost", 1)
        assert f"/{victim.pid}/" in lost["owner"]
        assert ran[(job.id, 2)] == survivor.pid
    recovered_ids = {j.id for j in recovered}
    assert all(j.attempts == 1 for j in jobs.values() if j.id not in recovered_ids)


def test_sigkilled_worker_loses_no_job_and_a_restart_recovers_its_running_jobs(
    cluster: Cluster,
) -> None:
    ids = _enqueue(cluster)
    first = cluster.start_worker(**LEASE)

    done_at_kill = _kill_mid_run(cluster, first)
    running_at_kill = cluster.counts()["running"]
    assert running_at_kill > 0

    restarted = cluster.start_worker(**LEASE)
    # recover_leftovers at start re-queues the dead pid's jobs without waiting for the lease
    cluster.wait_for("the dead worker's jobs to be re-queued",
                     lambda: "recovered" in restarted.log_text(), timeout=30)
    took = cluster.wait_for("every job completed",
                            lambda: cluster.counts()["completed"] == JOBS, timeout=60)
    print(f"killed after {done_at_kill} completed, {running_at_kill} running; "
          f"the restart finished the rest in {took:.1f}s")

    _assert_none_lost(cluster, ids, first, restarted)
    assert f"recovered {running_at_kill} jobs" in restarted.log_text()

    restarted.send(signal.SIGTERM)
    assert restarted.wait(15) == 0


def test_sigkilled_worker_loses_no_job_when_a_live_worker_takes_over_expired_leases(
    cluster: Cluster,
) -> None:
    ids = _enqueue(cluster)
    survivor = cluster.start_worker(**LEASE)
    survivor.wait_ready()
    victim = cluster.start_worker(**LEASE)
    victim.wait_ready()
    cluster.wait_for("both workers running jobs",
                     lambda: {r.pid for r in cluster.records()} == {survivor.pid, victim.pid},
                     timeout=30)

    done_at_kill = _kill_mid_run(cluster, victim)
    took = cluster.wait_for("every job completed",
                            lambda: cluster.counts()["completed"] == JOBS, timeout=60)
    print(f"killed after {done_at_kill} completed; the survivor finished in {took:.1f}s")

    _assert_none_lost(cluster, ids, victim, survivor)
    assert survivor.alive(), "the survivor must not have restarted"
    assert "lease of" in survivor.log_text()  # the scheduler's lease check, not a restart

    survivor.send(signal.SIGTERM)
    assert survivor.wait(15) == 0

"""Two worker processes on one SQLite file drain 10,000 jobs and never run an attempt twice.

The claim is one `UPDATE ... WHERE status IN ('queued', ...) RETURNING` and SQLite serialises
writers, so only one process can win a job, although both load every due id on each reload
and race for the same ones. The evidence is the handlers' own record file, not the table: no
(job, attempt) pair appears twice, and, since nothing crashed, every job ran exactly once.
"""

from __future__ import annotations

import signal
import time
from collections import Counter
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.acceptance.conftest import Cluster

JOBS = 10_000
CONCURRENCY = 50  #: per worker; at 10 the drain takes about twice as long (fsync-bound)
SETTINGS = {
    "CARWASH_CONCURRENCY": str(CONCURRENCY),
    "CARWASH_RELOAD_INTERVAL_SECONDS": "0.2",
    "CARWASH_LEASE_SECONDS": "30",
    "CARWASH_HEARTBEAT_INTERVAL_SECONDS": "5",
}

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def test_two_workers_drain_one_sqlite_file_without_running_any_attempt_twice(
    cluster: Cluster,
) -> None:
    workers = [cluster.start_worker(**SETTINGS), cluster.start_worker(**SETTINGS)]
    for worker in workers:
        worker.wait_ready()

    started = time.monotonic()
    ids = cluster.enqueue("record", [{"n": i} for i in range(JOBS)])
    enqueued = time.monotonic() - started
    drained = cluster.wait_for("every job completed",
                               lambda: cluster.counts()["completed"] == JOBS, timeout=90)
    total = time.monotonic() - started

    records = cluster.records()
    per_pid = Counter(r.pid for r in records)
    print(f"{JOBS} jobs, concurrency {CONCURRENCY} per worker: enqueue {enqueued:.1f}s, "
          f"drained {drained:.1f}s later ({JOBS / drained:.0f} jobs/s; "
          f"{JOBS / total:.0f} jobs/s from the enqueue call); per worker {dict(per_pid)}")

    runs = Counter((r.job_id, r.attempt) for r in records)
    assert [pair for pair, n in runs.items() if n > 1] == [], "an attempt was claimed twice"
    assert Counter(r.job_id for r in records) == Counter(ids), "each job runs exactly once"
    assert {r.attempt for r in records} == {1}
    assert set(per_pid) == {w.pid for w in workers}, "both workers must have run jobs"

    jobs = cluster.jobs()
    assert Counter(j.status for j in jobs.values()) == {"completed": JOBS}
    assert {j.attempts for j in jobs.values()} == {1}
    ran_in = {r.job_id: r.pid for r in records}
    for job in jobs.values():  # the row names the worker whose handler ran it
        (entry,) = job.history
        assert f"/{ran_in[job.id]}/" in entry["owner"]

    for worker in workers:
        worker.send(signal.SIGTERM)
    assert [w.wait(15) for w in workers] == [0, 0]

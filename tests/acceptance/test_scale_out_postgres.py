"""Scale-out on PostgreSQL: many API and worker processes, one queue (issue #5).

Real processes on a fresh database of the CARWASH_TEST_POSTGRES_URL server (skipped, with the
reason, when it is unset): `carwash-jobs serve --role api` takes requests and runs nothing;
`serve --role worker` processes and serves no HTTP. The evidence is the handlers' own record
file and the database, never a process's word:

- 1 API and 3 workers drain 20,000 jobs while one worker is SIGKILLed: every job completes, no
  (job, attempt) runs twice, the dead worker's jobs run again elsewhere once (one lease expiry,
  one lost attempt), and the stats list the live processes;
- a cancel sent to the API process stops the handler in whichever worker runs the job;
- a task type's concurrency limit holds for all workers together;
- three workers fire one cron schedule once per fire time.

Leases, heartbeats and reloads are shortened (CARWASH_* variables) so that recovery takes
seconds; the figures each test prints are what this machine measured.
"""

from __future__ import annotations

import json
import signal
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

import pytest

from tests.acceptance.cron_checks import assert_each_fire_ran_once
from tests.acceptance.tasks_limited import LIMIT
from tests.acceptance.test_cron_fires_once import EVERY_SECONDS, FIRES, SCHEDULES

if TYPE_CHECKING:
    from pathlib import Path

    from tests.acceptance.conftest import PgCluster, Worker

WORKERS = 3
JOBS = 20_000
HTTP_JOBS = 400  #: enqueued one by one through the API process; the rest in bulk
KILL_AFTER_RECORDS = 6_000
#: short leases, so that a SIGKILLed worker's jobs run again within seconds
FAST = {
    "CARWASH_LEASE_SECONDS": "3",
    "CARWASH_HEARTBEAT_INTERVAL_SECONDS": "0.5",
    "CARWASH_RELOAD_INTERVAL_SECONDS": "0.5",
}
#: NOTIFY brings new jobs at once; the reload (a safety net that reads up to 10,000 due rows
#: a time) runs every second, to leave the two cores to the drain
DRAIN = {**FAST, "CARWASH_RELOAD_INTERVAL_SECONDS": "1", "CARWASH_CONCURRENCY": "32",
         "CARWASH_DATABASE_POOL_SIZE": "6"}

pytestmark = [pytest.mark.slow]


def _payload(n: int) -> dict[str, int]:
    """5 to 20 ms of sleep, staggered: jobs of one claim end at different times, so a worker
    never drains to zero running jobs between claims and the kill always finds some."""
    return {"n": n, "sleep_ms": 5 + (n * 7) % 16}


def _roles(cluster: PgCluster) -> Counter[str]:
    with cluster.http() as http:
        stats = http.get("/api/queue/stats").json()
    return Counter(p["role"] for p in stats["processes"])


def _running_of(cluster: PgCluster, worker: Worker) -> set[str]:
    rows = cluster.query(
        f"SELECT id FROM worker_queue WHERE status = 'running' "
        f"AND lease_owner LIKE '%/{worker.pid}/%'")
    return {r[0] for r in rows}


def _status_of(cluster: PgCluster, ids: set[str]) -> Counter[str]:
    listed = ", ".join(f"'{i}'" for i in ids)
    rows = cluster.query(f"SELECT status FROM worker_queue WHERE id IN ({listed})")
    return Counter(r[0] for r in rows)


@pytest.mark.timeout(120)
def test_one_api_and_three_workers_drain_20000_jobs_while_a_worker_is_sigkilled(
    pg_cluster: PgCluster,
) -> None:
    cluster = pg_cluster
    workers = [cluster.start_worker(**DRAIN) for _ in range(WORKERS)]
    for worker in workers:
        worker.wait_ready()
    api = cluster.start_api(**DRAIN)

    started = time.monotonic()
    with cluster.http() as http:
        http_ids = []
        for n in range(HTTP_JOBS):
            response = http.post("/api/tasks/record", json=_payload(n))
            assert response.status_code == 202, response.text
            assert response.headers["location"] == f"/api/jobs/{response.json()['id']}"
            http_ids.append(response.json()["id"])
    over_http = time.monotonic() - started
    bulk_ids = cluster.enqueue_chunks("record",
                                      [_payload(n) for n in range(HTTP_JOBS, JOBS)])
    enqueued = time.monotonic() - started
    done_at_enqueue = cluster.counts()["completed"]
    ids = set(http_ids) | set(bulk_ids)
    assert len(ids) == JOBS
    assert _roles(cluster) == {"api": 1, "worker": WORKERS}

    victim = workers[1]
    cluster.wait_for(f"{KILL_AFTER_RECORDS} records and the victim running jobs",
                     lambda: cluster.record_count() >= KILL_AFTER_RECORDS
                     # several running, so they cannot all finish between this look and the kill
                     and len(_running_of(cluster, victim)) >= 3, timeout=60)
    victim.send(signal.SIGKILL)
    assert victim.wait(10) == -signal.SIGKILL
    orphans = _running_of(cluster, victim)
    done_at_kill = cluster.counts()["completed"]
    assert orphans, "the kill found none of the victim's jobs running"
    assert done_at_kill < JOBS, "the kill came too late to interrupt anything"

    requeued_in = cluster.wait_for(
        "the victim's leases to expire and its jobs to be re-queued",
        lambda: "running" not in _status_of(cluster, orphans), timeout=30)
    # re-queued with run_at = now, they wait behind the backlog that was due before them
    recovered_in = cluster.wait_for(
        "the victim's jobs to complete elsewhere",
        lambda: _status_of(cluster, orphans) == {"completed": len(orphans)}, timeout=60)
    cluster.wait_for("every job completed", lambda: cluster.counts()["completed"] == JOBS,
                     timeout=90)
    drained = time.monotonic() - started
    cluster.wait_for("the dead worker to drop out of the live processes",
                     lambda: _roles(cluster) == {"api": 1, "worker": WORKERS - 1}, timeout=15)

    records = cluster.records()
    per_pid = Counter(r.pid for r in records)
    print(f"{JOBS} jobs ({HTTP_JOBS} over HTTP in {over_http:.1f}s), all enqueued after "
          f"{enqueued:.1f}s ({done_at_enqueue} completed by then); all completed after "
          f"{drained:.1f}s: {JOBS / drained:.0f} jobs/s overall, "
          f"{(JOBS - done_at_enqueue) / (drained - enqueued):.0f} jobs/s for the {WORKERS} "
          f"workers once the enqueue was done; SIGKILL after {done_at_kill} completed with "
          f"{len(orphans)} jobs running in it: re-queued {requeued_in:.1f}s after the kill, "
          f"completed elsewhere {requeued_in + recovered_in:.1f}s after it; "
          f"runs per pid {dict(per_pid)}")

    # roles: the API process ran no handler; every worker did
    assert api.pid not in per_pid
    assert set(per_pid) == {w.pid for w in workers}

    # zero double-claimed attempts, by the handlers' own account
    runs = Counter((r.job_id, r.attempt) for r in records)
    assert [pair for pair, n in runs.items() if n > 1] == [], "an attempt was claimed twice"
    ran = {(r.job_id, r.attempt): r.pid for r in records}

    jobs = cluster.jobs()
    assert set(jobs) == ids
    assert Counter(j.status for j in jobs.values()) == {"completed": JOBS}
    for job in jobs.values():
        assert (job.id, job.attempts) in ran, f"the final attempt of {job.id} never ran"
        last = job.history[-1]
        assert (last["outcome"], last["attempt"]) == ("completed", job.attempts)
        # node identity on every claim: the owner recorded is the process whose handler ran
        assert f"/{ran[(job.id, job.attempts)]}/" in last["owner"]

    # every attempt before the last was lost with its worker's lease and released once (by one
    # survivor's lease check: a compare-and-set); it ran where its history says, or not at all
    # when the victim died between its claim and the handler's start
    for job in jobs.values():
        lost = [h for h in job.history if h["outcome"] == "worker_lost"]
        assert len(lost) == job.attempts - 1, job.history
        for entry in lost:
            pid = ran.get((job.id, entry["attempt"]), victim.pid)
            assert f"/{pid}/" in entry["owner"], job.history
    # the dead worker's jobs ran again elsewhere; a survivor loses a lease only when its
    # heartbeat is late by a whole lease (an overloaded machine): counted, not forbidden
    recovered = {j.id for j in jobs.values() if j.attempts > 1}
    assert orphans <= recovered
    for job_id in orphans:
        job = jobs[job_id]
        assert f"/{victim.pid}/" in job.history[0]["owner"]
        assert ran[(job_id, job.attempts)] != victim.pid
    print(f"{len(recovered - orphans)} jobs of live workers lost their lease (late heartbeats)")

    survivors = [*workers[:1], *workers[2:]]
    for worker in (*survivors, api):
        worker.send(signal.SIGTERM)
    assert [w.wait(20) for w in survivors] == [0, 0]
    # uvicorn shuts down gracefully, then re-raises the SIGTERM it caught (exit -15)
    assert api.wait(20) in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in api.log_text()


@pytest.mark.timeout(90)
def test_a_cancel_sent_to_the_api_process_stops_the_handler_in_the_worker_running_it(
    pg_cluster: PgCluster,
) -> None:
    cluster = pg_cluster
    workers = [cluster.start_worker(**FAST) for _ in range(2)]
    for worker in workers:
        worker.wait_ready()
    cluster.start_api(**FAST)

    with cluster.http() as http:
        job = http.post("/api/tasks/long", json={"seconds": 60}).json()
        cluster.wait_for("the job to start in a worker",
                         lambda: any(r.kind == "start" for r in cluster.records()), timeout=15)
        (start,) = cluster.records()
        runner = next(w for w in workers if w.pid == start.pid)
        assert http.get(f"/api/jobs/{job['id']}").json()["status"] == "running"

        asked = time.monotonic()
        response = http.post(f"/api/jobs/{job['id']}/cancel")
        answered = time.monotonic() - asked
        assert response.status_code == 200, response.text
        assert response.json()["status"] == "cancelled"
        stopped = f"job {job['id']} attempt 1 ended without a record: cancelled"
        cluster.wait_for("the worker to stop the handler",
                         lambda: stopped in runner.log_text(), timeout=10)
        took = time.monotonic() - asked
        row = http.get(f"/api/jobs/{job['id']}").json()
    print(f"cancel answered by the API process in {answered * 1000:.0f} ms; the handler in "
          f"{runner.name} had stopped {took * 1000:.0f} ms after the request (log polled every "
          f"50 ms)")

    assert took < 2.0, "NOTIFY carries the cancel: no lease expiry, no reload needed"
    assert [r.kind for r in cluster.records()] == ["start"], "the handler never got to its end"
    assert (row["status"], row["attempts"]) == ("cancelled", 1)
    assert row["attempt_history"][-1]["outcome"] == "cancelled"
    assert all(w.alive() for w in workers)
    other = next(w for w in workers if w is not runner)
    assert job["id"] not in other.log_text()


@pytest.mark.timeout(90)
def test_a_concurrency_limit_holds_for_three_worker_processes_together(
    pg_cluster: PgCluster,
) -> None:
    cluster = pg_cluster
    workers = [cluster.start_worker(**FAST, CARWASH_CONCURRENCY="10") for _ in range(WORKERS)]
    for worker in workers:
        worker.wait_ready()

    started = time.monotonic()
    ids = cluster.enqueue_chunks("limited", [{"seconds": 0.1}] * 30)
    took = cluster.wait_for("every limited job completed",
                            lambda: cluster.counts()["completed"] == len(ids), timeout=60)

    inside = most = 0
    for record in cluster.records():  # in the order the handlers wrote them, across processes
        inside += 1 if record.kind == "start" else -1
        most = max(most, inside)
    pids = Counter(r.pid for r in cluster.records() if r.kind == "start")
    print(f"30 jobs limited to {LIMIT} at once: done in {took:.1f}s "
          f"({time.monotonic() - started:.1f}s with the enqueue); at most {most} at once; "
          f"starts per pid {dict(pids)}")

    assert most == LIMIT, f"each worker alone may run {LIMIT}: {LIMIT * WORKERS} together"
    assert {j.attempts for j in cluster.jobs().values()} == {1}, "a throttled claim is free"


@pytest.mark.timeout(90)
def test_three_workers_on_postgres_fire_a_schedule_once_per_fire_time(
    pg_cluster: PgCluster, tmp_path: Path,
) -> None:
    cluster = pg_cluster
    schedules = tmp_path / "schedules.toml"
    schedules.write_text(SCHEDULES, encoding="utf-8")
    settings = {
        "CARWASH_TASK_TYPES": json.dumps(["tests.acceptance.cron_task"]),
        "CARWASH_SCHEDULES_FILE": str(schedules),
        "CARWASH_RELOAD_INTERVAL_SECONDS": "0.5",  # the cron tick follows the reload
        "CARWASH_LOG_LEVEL": "DEBUG",  # a lost fire is logged at DEBUG: the evidence of the race
    }
    started = time.monotonic()
    workers = [cluster.start_worker(**settings) for _ in range(WORKERS)]
    for worker in workers:
        worker.wait_ready()
    # from here on every worker has had its first cron tick (every 0.5 s) and tries each fire
    contested_from = time.time() + 1.0

    def fire_times() -> list[Any]:
        return [r[0] for r in cluster.query(
            "SELECT fire_at FROM cron_fires WHERE schedule = 'tick' ORDER BY fire_at")]

    def contested() -> int:
        return sum(1 for at in fire_times() if at.timestamp() > contested_from)

    def lost_races() -> int:
        return sum(w.log_text().count("went to another process") for w in workers)

    cluster.wait_for(f"{FIRES} fires with every worker running", lambda: contested() >= FIRES,
                     timeout=FIRES * EVERY_SECONDS + 30)
    # a loser's tick comes up to 0.5 s after the winner's: give it that before stopping
    cluster.wait_for("the other workers to try each fire",
                     lambda: lost_races() >= contested() * (WORKERS - 1), timeout=10)
    fire_count = len(fire_times())
    cluster.wait_for("every fired job completed",
                     lambda: cluster.counts()["completed"] >= fire_count, timeout=30)
    for worker in workers:
        worker.send(signal.SIGTERM)
    assert [w.wait(20) for w in workers] == [0] * WORKERS
    lost = lost_races()

    fires = cluster.query(
        "SELECT fire_at, job_id, fired_by FROM cron_fires WHERE schedule = 'tick' ORDER BY fire_at")
    jobs = cluster.query(
        "SELECT id, idempotency_key, context, status, attempts, result FROM worker_queue")
    print(f"{len(fires)} fires in {time.monotonic() - started:.1f}s")
    assert_each_fire_ran_once(
        fires, jobs, min_fires=FIRES, every_seconds=EVERY_SECONDS,
        worker_pids={w.pid for w in workers}, lost=lost, contested_from=contested_from,
    )

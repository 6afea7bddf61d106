"""Three worker processes sharing one SQLite database fire a cron schedule once per fire time.

Each process runs its own CronService over the same schedule (every 2 seconds, through the
optional `second` field) and tries every fire time; the cron_fires primary key lets exactly one
of them record it and insert its job, in one transaction. The evidence is the database: one job
per fire time (by idempotency key and by the fire time in its context), every fire row pointing
at its job, no fire time missing between the first and the last, and each job run once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from carwash_jobs.store.migrations import upgrade
from tests.acceptance.cron_checks import assert_each_fire_ran_once

if TYPE_CHECKING:
    from collections.abc import Callable

REPO_ROOT = Path(__file__).resolve().parents[2]
CLI = Path(sys.executable).with_name("carwash-jobs")
WORKERS = 3
FIRES = 6  #: fire times to watch once every worker runs
EVERY_SECONDS = 2
SCHEDULES = f"""
[[schedules]]
name = "tick"
task_type = "cron_tick"
cron = "* * * * *"
second = "*/{EVERY_SECONDS}"
payload = {{ label = "acceptance" }}
overlap = "allow"
"""

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]


def start_worker(root: Path, db: Path, schedules: Path, index: int) -> tuple[subprocess.Popen[bytes], Path]:
    """`carwash-jobs serve --role worker` in `root` (no config file of the checkout applies),
    configured only through CARWASH_* variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARWASH_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env.update({
        "CARWASH_DATABASE_URL": f"sqlite+aiosqlite:///{db}",
        "CARWASH_TASK_TYPES": json.dumps(["tests.acceptance.cron_task"]),
        "CARWASH_SCHEDULES_FILE": str(schedules),
        "CARWASH_RELOAD_INTERVAL_SECONDS": "0.5",  # the cron tick follows the reload
        "CARWASH_SQLITE_SYNCHRONOUS": "NORMAL",
        "CARWASH_LOG_LEVEL": "DEBUG",  # a lost fire is logged at DEBUG: the evidence of the race
        "CARWASH_FILES_DIR": str(root / "files"),
        "CARWASH_SMTP_URL": f"outbox:{root / 'outbox'}",
    })
    log = root / f"worker-{index}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(CLI), "serve", "--role", "worker"], cwd=root, env=env,
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
        )
    return process, log


def query(db: Path, sql: str) -> list[Any]:
    with contextlib.closing(sqlite3.connect(db, timeout=10)) as conn:
        return conn.execute(sql).fetchall()


def wait_for(what: str, predicate: Callable[[], bool], timeout: float, logs: list[Path]) -> None:
    """Poll until `predicate` holds (no event crosses process boundaries); fail with the logs."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}" for log in logs)
            raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{tails}")
        time.sleep(0.1)


def parse(value: str) -> datetime:
    """A cron_fires timestamp (UTC text) as an aware datetime."""
    return datetime.fromisoformat(value + "+00:00")


def has_logged(log: Path, text: str) -> Callable[[], bool]:
    return lambda: text in log.read_text(errors="replace")


def test_three_processes_sharing_one_database_fire_a_schedule_once_per_fire_time(tmp_path: Path) -> None:
    db = tmp_path / "carwash.db"
    asyncio.run(upgrade(f"sqlite+aiosqlite:///{db}"))
    schedules = tmp_path / "schedules.toml"
    schedules.write_text(SCHEDULES, encoding="utf-8")
    workers: list[tuple[subprocess.Popen[bytes], Path]] = []
    started = time.monotonic()
    try:
        workers = [start_worker(tmp_path, db, schedules, i) for i in range(1, WORKERS + 1)]
        logs = [log for _, log in workers]
        for process, log in workers:
            wait_for(f"{log.name} ready", has_logged(log, "processing"), 30, logs)
            assert process.poll() is None, log.read_text(errors="replace")
        ready_after = time.monotonic() - started
        # from here on every worker has had its first cron tick (every 0.5 s) and tries each fire
        contested_from = time.time() + 1.0

        def contested() -> int:
            rows = query(db, "SELECT fire_at FROM cron_fires WHERE schedule = 'tick'")
            return sum(1 for (at,) in rows if parse(at).timestamp() > contested_from)

        wait_for(f"{FIRES} fires with every worker running", lambda: contested() >= FIRES,
                 FIRES * EVERY_SECONDS + 30, logs)

        def lost_races() -> int:
            return sum(log.read_text(errors="replace").count("went to another process") for log in logs)

        # a loser's tick comes up to 0.5 s after the winner's: give it that before stopping
        wait_for("the other workers to try each fire", lambda: lost_races() >= contested() * (WORKERS - 1),
                 10, logs)
        fire_count = len(query(db, "SELECT 1 FROM cron_fires"))
        wait_for("every fired job completed", lambda: len(query(
            db, "SELECT 1 FROM worker_queue WHERE status = 'completed'")) >= fire_count, 30, logs)

        fired_after = time.monotonic() - started
        for process, _ in workers:
            process.send_signal(signal.SIGTERM)
        assert [process.wait(20) for process, _ in workers] == [0] * WORKERS
        lost = lost_races()
    finally:
        for process, log in workers:
            if process.poll() is None:
                process.kill()
            process.wait(10)
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
            print(f"--- {log.name} (exit {process.returncode})\n{tail}")

    fires = query(db, "SELECT fire_at, job_id, fired_by FROM cron_fires WHERE schedule = 'tick' "
                      "ORDER BY fire_at")
    jobs = query(db, "SELECT id, idempotency_key, context, status, attempts, result FROM worker_queue")
    times = [parse(at) for at, _, _ in fires]
    print(f"ready after {ready_after:.1f}s, {FIRES} fires after {fired_after:.1f}s")
    assert_each_fire_ran_once(
        [(t, job_id, by) for t, (_, job_id, by) in zip(times, fires, strict=True)], jobs,
        min_fires=FIRES, every_seconds=EVERY_SECONDS, worker_pids={p.pid for p, _ in workers},
        lost=lost, contested_from=contested_from,
    )
    assert sorted(j[1] for j in jobs) == sorted(
        f"cron:tick:{t:%Y-%m-%dT%H:%M}" + (f":{t:%S}" if t.second else "") for t in times)

"""What "a cron fire happens once" means, checked the same way for every database."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from datetime import datetime, timedelta
from typing import Any


def assert_each_fire_ran_once(
    fires: list[tuple[datetime, str, str]], jobs: list[tuple[Any, ...]], *, min_fires: int,
    every_seconds: int, worker_pids: set[int], lost: int, contested_from: float,
) -> None:
    """`fires`: (fire_at, job_id, fired_by) in fire order; `jobs`: (id, idempotency_key, context,
    status, attempts, result) rows; `lost`: the lost races the workers logged, of which every
    fire after `contested_from` (when all the workers were up) must have cost one a worker."""
    times = [at for at, _, _ in fires]
    print(f"{len(fires)} fires, {len(jobs)} jobs, {lost} lost races; "
          f"fired by {dict(Counter(by for _, _, by in fires))}; "
          f"run by pids {dict(Counter(json.loads(j[5])['pid'] for j in jobs))}")

    assert len(fires) >= min_fires
    assert [b - a for a, b in itertools.pairwise(times)] == [timedelta(seconds=every_seconds)] * (
        len(times) - 1), "no fire time is missing between the first and the last"
    assert len(jobs) == len(fires), "one job per fire time"
    assert sorted(job_id for _, job_id, _ in fires) == sorted(j[0] for j in jobs)
    by_key = Counter(j[1] for j in jobs)
    assert all(n == 1 for n in by_key.values())
    assert sorted(json.loads(j[2])["fire_at"] for j in jobs) == [t.isoformat() for t in times]
    assert {(j[3], j[4]) for j in jobs} == {("completed", 1)}, "each job ran once"
    assert {by.split("/")[1] for _, _, by in fires} <= {str(pid) for pid in worker_pids}
    contested_fires = sum(1 for t in times if t.timestamp() > contested_from)
    assert lost >= contested_fires * (len(worker_pids) - 1), (
        "the other workers tried each fire and lost it")

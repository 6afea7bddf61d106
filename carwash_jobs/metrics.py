"""Prometheus collectors the engine updates, one set per Runtime (its own CollectorRegistry,
so several runtimes in one process, as in tests, do not collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_DURATION_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 15, 60, 300, 1800)
_PICKUP_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.enqueued = Counter(
            "carwash_jobs_enqueued", "Jobs created: enqueued, follow-ups, cron fires, reruns",
            ["task_type"], registry=r,
        )
        self.completed = Counter("carwash_jobs_completed", "Jobs completed", ["task_type"], registry=r)
        self.failed = Counter(
            "carwash_jobs_failed", "Jobs failed with no attempts left", ["task_type"], registry=r
        )
        self.retried = Counter(
            "carwash_jobs_retried",
            "Attempts that failed and were rescheduled (not a RetryLater that does not count)",
            ["task_type"], registry=r,
        )
        self.duration = Histogram(
            "carwash_job_duration_seconds", "Handler run time per attempt", ["task_type"],
            buckets=_DURATION_BUCKETS, registry=r,
        )
        self.pickup = Histogram(
            "carwash_job_pickup_seconds", "From run_at (or enqueue) to handler start",
            ["task_type"], buckets=_PICKUP_BUCKETS, registry=r,
        )
        self.in_memory = Gauge("carwash_queue_in_memory", "Job ids held in memory", registry=r)
        self.running = Gauge("carwash_jobs_running", "Jobs running in this process", registry=r)
        self.by_status = Gauge(
            "carwash_queue_jobs", "Jobs in the database by status", ["status"], registry=r
        )
        self.stats_up = Gauge(
            "carwash_queue_stats_up",
            "1 when the database answered this scrape's count of jobs by status "
            "(carwash_queue_jobs), 0 when it did not and the counts are left out", registry=r,
        )

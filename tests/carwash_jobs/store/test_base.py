"""The per-job records: read-only to the type checker, and compared and hashed by their fields
as the frozen dataclasses they replaced were."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

from carwash_jobs.lifecycle import JobStatus
from carwash_jobs.store.base import DueJob, NewJob
from carwash_jobs.types import JobId

AT = datetime(2026, 11, 24, tzinfo=UTC)


def test_equal_records_hash_alike_and_can_key_a_dict() -> None:
    first = DueJob(JobId("a"), "email", "default", 0, AT)
    same = DueJob(JobId("a"), "email", "default", 0, AT)

    assert first == same
    assert hash(first) == hash(same)
    assert {first: 1}[same] == 1
    assert first != dataclasses.replace(first, priority=5)


def test_a_record_is_changed_by_making_another() -> None:
    job = NewJob(JobId("a"), "email", {}, JobStatus.queued, AT, AT)

    claimed = dataclasses.replace(job, claimed_by="worker-1")

    assert (job.claimed_by, claimed.claimed_by) == (None, "worker-1")
    assert claimed.id == job.id

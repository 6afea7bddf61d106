"""The per-job records: read-only to the type checker; NewJob and DueJob are plain slots
dataclasses at run time, compared and hashed by their fields as the frozen dataclasses they
replaced were, and JobRow, which handlers see, stays frozen."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

import pytest

from carwash_jobs.lifecycle import JobStatus
from carwash_jobs.store.base import DueJob, JobRow, NewJob
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


def test_the_type_checker_refuses_a_change_the_run_time_allows() -> None:
    due = DueJob(JobId("a"), "email", "default", 0, AT)

    # mypy --strict (warn_unused_ignores) fails the test command here if this ever type-checks
    due.priority = 1  # type: ignore[misc]

    assert due.priority == 1


def test_a_job_row_stays_frozen_for_the_handlers_that_see_it() -> None:
    row = JobRow(
        id=JobId("a"), task_type="email", queue="default", status=JobStatus.running, priority=0,
        payload={}, context=None, tags=[], attempts=1, max_attempts=1, run_at=AT, created_at=AT,
        started_at=AT, finished_at=None, lease_owner="w", lease_until=AT, progress_done=0,
        progress_total=None, checkpoint=None, result=None, error=None, error_traceback=None,
        attempt_history=[], idempotency_key=None, rerun_of=None, depends_on=[],
    )

    with pytest.raises(dataclasses.FrozenInstanceError):
        row.max_attempts = 99  # type: ignore[misc]

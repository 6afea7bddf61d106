"""The per-job records: read-only to the type checker; NewJob and DueJob are plain slots
dataclasses at run time, compared and hashed by their fields as the frozen dataclasses they
replaced were, and JobRow, which handlers see, stays frozen, also when the stores build it with
job_row()."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

import pytest

from carwash_jobs.lifecycle import JobStatus
from carwash_jobs.store.base import JOB_COLUMNS, DueJob, JobRow, NewJob, job_row
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


def _running_row() -> JobRow:
    return JobRow(
        id=JobId("a"), task_type="email", queue="default", status=JobStatus.running, priority=0,
        payload={}, context=None, tags=[], attempts=1, max_attempts=1, run_at=AT, created_at=AT,
        started_at=AT, finished_at=None, lease_owner="w", lease_until=AT, progress_done=0,
        progress_total=None, checkpoint=None, result=None, error=None, error_traceback=None,
        attempt_history=[], idempotency_key=None, rerun_of=None, depends_on=[],
    )


def test_a_job_row_stays_frozen_for_the_handlers_that_see_it() -> None:
    row = _running_row()

    with pytest.raises(dataclasses.FrozenInstanceError):
        row.max_attempts = 99  # type: ignore[misc]


def test_job_row_builds_from_values_in_column_order_what_the_constructor_builds() -> None:
    row = _running_row()
    values = [getattr(row, column) for column in JOB_COLUMNS]

    built = job_row(values)

    assert type(built) is JobRow
    assert built == row
    assert dataclasses.replace(built, attempts=2) == dataclasses.replace(row, attempts=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        built.task_type = "other"  # type: ignore[misc]


def test_job_row_refuses_a_value_too_many_or_too_few() -> None:
    values = [getattr(_running_row(), column) for column in JOB_COLUMNS]

    with pytest.raises(ValueError, match="zip"):
        job_row([*values, None])
    with pytest.raises(ValueError, match="zip"):
        job_row(values[:-1])

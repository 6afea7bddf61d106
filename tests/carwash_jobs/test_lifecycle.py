"""Tests for carwash_jobs/lifecycle.py: the transition table and one constructor per transition."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from carwash_jobs import lifecycle
from carwash_jobs.lifecycle import (
    ALLOWED,
    CANCELLABLE,
    TERMINAL,
    AttemptOutcome,
    Fence,
    JobStatus,
    Transition,
)
from carwash_jobs.types import JobId

S = JobStatus
NOW = datetime(2030, 5, 1, 12, 0, tzinfo=UTC)
JOB = JobId("job-1")
FENCE = Fence(2, "host/1/0/a")

#: the diagram of ARCHITECTURE.md, edge by edge
DIAGRAM_EDGES = {
    (S.waiting, S.queued), (S.waiting, S.cancelled),
    (S.queued, S.running), (S.queued, S.cancelled),
    (S.scheduled, S.queued), (S.scheduled, S.cancelled),
    (S.running, S.completed), (S.running, S.scheduled), (S.running, S.failed),
    (S.running, S.cancelled), (S.running, S.queued),
    (S.failed, S.queued),
}


def test_every_status_has_a_row_in_the_transition_table() -> None:
    assert set(ALLOWED) == set(JobStatus)


def test_table_allows_every_edge_of_the_architecture_diagram() -> None:
    for source, target in DIAGRAM_EDGES:
        assert lifecycle.is_allowed(source, target), (source, target)


def test_table_allows_nothing_beyond_the_diagram_but_two_edges_of_run_at() -> None:
    allowed = {(s, t) for s, targets in ALLOWED.items() for t in targets}
    # CLAIMABLE includes scheduled: a worker may claim a scheduled job once run_at has passed,
    # without waiting for the reload to promote it first; and a waiting job freed before its
    # run_at waits for it as scheduled, as it would have started without dependencies
    assert allowed - DIAGRAM_EDGES == {(S.scheduled, S.running), (S.waiting, S.scheduled)}


def test_completed_and_cancelled_are_final_and_failed_only_goes_back_to_queued() -> None:
    assert ALLOWED[S.completed] == frozenset()
    assert ALLOWED[S.cancelled] == frozenset()
    assert ALLOWED[S.failed] == {S.queued}
    assert frozenset({S.completed, S.failed, S.cancelled}) == TERMINAL


def test_no_status_moves_to_waiting_or_to_itself() -> None:
    for source, targets in ALLOWED.items():
        assert S.waiting not in targets
        assert source not in targets


def test_a_transition_outside_the_table_cannot_even_be_built() -> None:
    with pytest.raises(ValueError, match="completed -> queued is not allowed"):
        Transition(JOB, "requeue", frozenset({S.completed}), S.queued, "requeued")


@pytest.mark.parametrize(
    ("transition", "sources", "target", "event"),
    [
        (lifecycle.complete(JOB, FENCE, {"ok": 1}, NOW), {S.running}, S.completed, "completed"),
        (lifecycle.schedule_retry(JOB, FENCE, NOW, "boom", None, AttemptOutcome.error, NOW),
         {S.running}, S.scheduled, "attempt_failed"),
        (lifecycle.fail(JOB, FENCE, "boom", "tb", AttemptOutcome.error, NOW),
         {S.running}, S.failed, "failed"),
        (lifecycle.cancel(JOB, NOW), set(CANCELLABLE), S.cancelled, "cancelled"),
        (lifecycle.dependency_failed(JOB, JobId("dep"), S.failed, NOW),
         {S.waiting}, S.cancelled, "cancelled"),
        (lifecycle.dependencies_met(JOB, NOW, NOW), {S.waiting}, S.queued, "dependencies_met"),
        (lifecycle.dependencies_met(JOB, NOW + timedelta(seconds=1), NOW), {S.waiting},
         S.scheduled, "dependencies_met"),
        (lifecycle.retry_failed(JOB, NOW), {S.failed}, S.queued, "retried"),
        (lifecycle.release_expired_lease(JOB, FENCE, 2, 5, NOW), {S.running}, S.queued,
         "lease_expired"),
        (lifecycle.release_expired_lease(JOB, FENCE, 5, 5, NOW), {S.running}, S.failed, "failed"),
        (lifecycle.release(JOB, FENCE, NOW), {S.running}, S.queued, "released"),
    ],
)
def test_each_constructor_builds_the_documented_change(
    transition: Transition, sources: set[JobStatus], target: JobStatus, event: str
) -> None:
    assert transition.from_statuses == sources
    assert transition.to_status == target
    assert transition.event == event
    assert transition.job_id == JOB


def test_writes_about_a_running_attempt_carry_its_fence_and_a_history_entry() -> None:
    for transition in (
        lifecycle.complete(JOB, FENCE, None, NOW),
        lifecycle.schedule_retry(JOB, FENCE, NOW, "e", None, AttemptOutcome.timeout, NOW),
        lifecycle.fail(JOB, FENCE, "e", None, AttemptOutcome.error, NOW),
        lifecycle.release_expired_lease(JOB, FENCE, 2, 5, NOW),
        lifecycle.release(JOB, FENCE, NOW),
    ):
        assert transition.fence == FENCE
        assert transition.history is not None
        assert transition.history.attempt == FENCE.attempt
        assert transition.history.owner == FENCE.owner


def test_complete_keeps_the_result_and_clears_error_and_lease() -> None:
    transition = lifecycle.complete(JOB, FENCE, {"sent": 3}, NOW)
    assert transition.changes["result"] == {"sent": 3}
    assert transition.changes["error"] is None
    assert transition.changes["finished_at"] == NOW
    assert transition.changes["lease_owner"] is None
    assert transition.history is not None
    assert transition.history.outcome == AttemptOutcome.completed


def test_schedule_retry_sets_run_at_and_counts_the_attempt_unless_told_otherwise() -> None:
    later = NOW + timedelta(seconds=8)
    counted = lifecycle.schedule_retry(JOB, FENCE, later, "e", "tb", AttemptOutcome.error, NOW)
    throttled = lifecycle.schedule_retry(JOB, FENCE, later, "e", None, AttemptOutcome.throttled,
                                         NOW, count_attempt=False)
    assert counted.changes["run_at"] == later
    assert counted.changes["error_traceback"] == "tb"
    assert counted.attempts_delta == 0
    assert throttled.attempts_delta == -1
    assert "next attempt at" in (counted.message or "")


def test_cancel_records_an_attempt_only_when_the_job_turns_out_to_be_running() -> None:
    transition = lifecycle.cancel(JOB, NOW, reason="operator said so")
    assert transition.history is None
    assert transition.running_attempt_outcome == AttemptOutcome.cancelled
    assert transition.changes["error"] == "operator said so"
    assert transition.fence is None


def test_dependency_failure_names_the_culprit() -> None:
    transition = lifecycle.dependency_failed(JOB, JobId("abc"), S.cancelled, NOW)
    assert transition.changes["error"] == "dependency abc ended cancelled"


def test_retry_failed_resets_attempts_and_makes_the_job_due_now() -> None:
    transition = lifecycle.retry_failed(JOB, NOW)
    assert transition.changes["attempts"] == 0
    assert transition.changes["run_at"] == NOW
    assert transition.changes["finished_at"] is None


def test_expired_lease_counts_the_lost_attempt_and_fails_the_job_on_the_last_one() -> None:
    more = lifecycle.release_expired_lease(JOB, FENCE, 2, 3, NOW)
    last = lifecycle.release_expired_lease(JOB, FENCE, 3, 3, NOW)
    assert more.to_status == S.queued
    assert more.attempts_delta == 0
    assert last.to_status == S.failed
    for transition in (more, last):
        assert transition.history is not None
        assert transition.history.outcome == AttemptOutcome.worker_lost
        assert FENCE.owner in (transition.history.error or "")


def test_release_at_shutdown_gives_the_attempt_back() -> None:
    transition = lifecycle.release(JOB, FENCE, NOW)
    assert transition.attempts_delta == -1
    assert transition.history is not None
    assert transition.history.outcome == AttemptOutcome.released


def test_attempt_record_serialises_to_json_types() -> None:
    record = lifecycle.AttemptRecord(1, AttemptOutcome.timeout, "w", NOW, "slow")
    assert record.as_json() == {
        "attempt": 1, "outcome": "timeout", "owner": "w",
        "finished_at": NOW.isoformat(), "error": "slow",
    }


@pytest.mark.parametrize(
    ("deps", "run_at", "expected"),
    [
        ({}, NOW, (S.queued, None)),
        ({}, NOW - timedelta(seconds=1), (S.queued, None)),
        ({}, NOW + timedelta(seconds=1), (S.scheduled, None)),
        ({JobId("a"): S.completed}, NOW, (S.queued, None)),
        ({JobId("a"): S.completed, JobId("b"): S.running}, NOW, (S.waiting, None)),
        ({JobId("a"): S.queued}, NOW + timedelta(hours=1), (S.waiting, None)),
        ({JobId("a"): S.completed, JobId("b"): S.failed}, NOW,
         (S.cancelled, "dependency b ended failed")),
        ({JobId("a"): S.waiting, JobId("b"): S.cancelled}, NOW,
         (S.cancelled, "dependency b ended cancelled")),
    ],
)
def test_initial_status_follows_dependencies_then_run_at(
    deps: dict[JobId, JobStatus], run_at: datetime, expected: tuple[JobStatus, str | None]
) -> None:
    assert lifecycle.initial_status(run_at, NOW, deps) == expected


@pytest.mark.parametrize("build", ["fail", "schedule_retry"])
def test_a_handlers_error_is_stored_with_nul_and_lone_surrogates_escaped(build: str) -> None:
    """A store that cannot write the error left the job running until its lease ran out, at
    every attempt, and the error was never told: PostgreSQL's text holds no U+0000, and UTF-8
    no lone surrogate."""
    error, traceback = "ValueError: bad\x00 \ud800", "Traceback\x00\udcff"
    if build == "fail":
        t = lifecycle.fail(JOB, FENCE, error, traceback, AttemptOutcome.error, NOW)
    else:
        t = lifecycle.schedule_retry(JOB, FENCE, NOW, error, traceback, AttemptOutcome.error, NOW)
    assert t.changes["error"] == "ValueError: bad\\x00 \\ud800"
    assert t.changes["error_traceback"] == "Traceback\\x00\\udcff"
    assert t.history is not None
    assert t.history.error == "ValueError: bad\\x00 \\ud800"
    assert t.message is not None
    assert "bad\\x00 \\ud800" in t.message

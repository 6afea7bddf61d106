"""Job states and the only place that decides which state changes are allowed.

Every change of a job's status is built here as a `Transition` and applied by a store as a
compare-and-set (`UPDATE ... WHERE id = :id AND status IN (:from) ...`), so an illegal or stale
change is refused by the database, never written. Writes about a running job also carry a
`Fence` (attempt and lease owner): a worker that lost its lease cannot overwrite the outcome
of a newer attempt.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from carwash_jobs.types import storable_text

if TYPE_CHECKING:
    from collections.abc import Mapping
    from datetime import datetime

    from carwash_jobs.types import JobId


class JobStatus(StrEnum):
    waiting = "waiting"  #: waits for its dependencies; then queued (scheduled if run_at is ahead)
    queued = "queued"  #: due now; a worker's claim moves it to running
    scheduled = "scheduled"  #: waits for run_at; the reload (or an in-process timer) makes it due
    running = "running"  #: a worker holds its lease; the outcome or lease expiry moves it on
    completed = "completed"  #: terminal; a rerun makes a new job
    failed = "failed"  #: terminal until retry-failed moves it back to queued
    cancelled = "cancelled"  #: terminal; a rerun makes a new job


class AttemptOutcome(StrEnum):
    """How one attempt ended, as kept in the job's attempt history."""

    completed = "completed"
    error = "error"  #: the handler raised
    timeout = "timeout"  #: the handler ran past the task type's timeout
    cancelled = "cancelled"  #: cancelled while running
    worker_lost = "worker_lost"  #: the lease expired: the worker died or hung
    released = "released"  #: given back at shutdown; does not count as an attempt
    throttled = "throttled"  #: RetryLater without counting the attempt


TERMINAL: frozenset[JobStatus] = frozenset(
    {JobStatus.completed, JobStatus.failed, JobStatus.cancelled}
)
#: statuses from which a worker may claim a job (scheduled only once its run_at has passed)
CLAIMABLE: frozenset[JobStatus] = frozenset({JobStatus.queued, JobStatus.scheduled})
CANCELLABLE: frozenset[JobStatus] = frozenset(
    {JobStatus.waiting, JobStatus.queued, JobStatus.scheduled, JobStatus.running}
)

ALLOWED: Mapping[JobStatus, frozenset[JobStatus]] = {
    JobStatus.waiting: frozenset({JobStatus.queued, JobStatus.scheduled, JobStatus.cancelled}),
    JobStatus.queued: frozenset({JobStatus.running, JobStatus.cancelled}),
    JobStatus.scheduled: frozenset({JobStatus.queued, JobStatus.running, JobStatus.cancelled}),
    JobStatus.running: frozenset(
        {
            JobStatus.completed,
            JobStatus.scheduled,
            JobStatus.failed,
            JobStatus.cancelled,
            JobStatus.queued,
        }
    ),
    JobStatus.completed: frozenset(),
    JobStatus.failed: frozenset({JobStatus.queued}),
    JobStatus.cancelled: frozenset(),
}


def is_allowed(from_status: JobStatus, to_status: JobStatus) -> bool:
    return to_status in ALLOWED[from_status]


@dataclass(frozen=True, slots=True)
class Fence:
    """Which attempt, held by which owner, a write about a running job speaks for."""

    attempt: int
    owner: str


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    """One entry of a job's attempt history."""

    attempt: int
    outcome: AttemptOutcome
    owner: str | None
    finished_at: datetime
    error: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "attempt": self.attempt,
            "outcome": self.outcome.value,
            "owner": self.owner,
            "finished_at": self.finished_at.isoformat(),
            "error": self.error,
        }


@dataclass(frozen=True, slots=True)
class Transition:
    """One compare-and-set change of a job: from any of `from_statuses` to `to_status`."""

    job_id: JobId
    action: str  #: the verb an IllegalTransition error names ("cancel", "complete", ...)
    from_statuses: frozenset[JobStatus]
    to_status: JobStatus
    event: str  #: the job_events name of this change
    changes: Mapping[str, Any] = field(default_factory=dict)
    message: str | None = None
    fence: Fence | None = None
    history: AttemptRecord | None = None
    #: when the job turns out to have been running, record its attempt with this outcome
    #: (a cancel does not know beforehand whether the job was running)
    running_attempt_outcome: AttemptOutcome | None = None
    attempts_delta: int = 0  #: added to attempts (a release gives the attempt back)
    #: apply only if the lease ran out before this instant: the recovery of an expired lease
    #: reads first and writes later, and the owner may renew the lease in between; the fence
    #: (attempt, owner) does not change on a renewal, so only this recheck notices it
    lease_expired_by: datetime | None = None

    def __post_init__(self) -> None:
        for source in self.from_statuses:
            if not is_allowed(source, self.to_status):
                raise ValueError(f"{self.action}: {source} -> {self.to_status} is not allowed")


def _finished(now: datetime) -> dict[str, Any]:
    return {"finished_at": now, "lease_owner": None, "lease_until": None}


def complete(job_id: JobId, fence: Fence, result: Any, now: datetime) -> Transition:
    return Transition(
        job_id, "complete", frozenset({JobStatus.running}), JobStatus.completed, "completed",
        changes={"result": result, "error": None, "error_traceback": None, **_finished(now)},
        fence=fence,
        history=AttemptRecord(fence.attempt, AttemptOutcome.completed, fence.owner, now),
    )


def schedule_retry(
    job_id: JobId,
    fence: Fence,
    run_at: datetime,
    error: str,
    traceback: str | None,
    outcome: AttemptOutcome,
    now: datetime,
    *,
    count_attempt: bool = True,
) -> Transition:
    error, traceback = _storable_error(error, traceback)
    return Transition(
        job_id, "retry", frozenset({JobStatus.running}), JobStatus.scheduled, "attempt_failed",
        changes={
            "run_at": run_at, "error": error, "error_traceback": traceback,
            "lease_owner": None, "lease_until": None,
        },
        message=f"{outcome.value}: {error}; next attempt at {run_at.isoformat()}",
        fence=fence,
        history=AttemptRecord(fence.attempt, outcome, fence.owner, now, error),
        attempts_delta=0 if count_attempt else -1,
    )


def fail(
    job_id: JobId,
    fence: Fence,
    error: str,
    traceback: str | None,
    outcome: AttemptOutcome,
    now: datetime,
) -> Transition:
    error, traceback = _storable_error(error, traceback)
    return Transition(
        job_id, "fail", frozenset({JobStatus.running}), JobStatus.failed, "failed",
        changes={"error": error, "error_traceback": traceback, **_finished(now)},
        message=f"{outcome.value}: {error}",
        fence=fence,
        history=AttemptRecord(fence.attempt, outcome, fence.owner, now, error),
    )


def _storable_error(error: str, traceback: str | None) -> tuple[str, str | None]:
    """A handler's error as the stores can write it: its message is the handler's own text."""
    return storable_text(error), None if traceback is None else storable_text(traceback)


def cancel(job_id: JobId, now: datetime, reason: str = "cancelled by request") -> Transition:
    """Cancel a job that has not ended. The history entry only applies if it was running."""
    return Transition(
        job_id, "cancel", CANCELLABLE, JobStatus.cancelled, "cancelled",
        changes={"error": reason, **_finished(now)},
        message=reason,
        running_attempt_outcome=AttemptOutcome.cancelled,
    )


def dependency_failed(
    job_id: JobId, culprit: JobId, culprit_status: JobStatus, now: datetime
) -> Transition:
    reason = f"dependency {culprit} ended {culprit_status.value}"
    return Transition(
        job_id, "cancel", frozenset({JobStatus.waiting}), JobStatus.cancelled, "cancelled",
        changes={"error": reason, **_finished(now)},
        message=reason,
    )


def dependencies_met(job_id: JobId, run_at: datetime, now: datetime) -> Transition:
    """A waiting job's last dependency completed: it is due, or scheduled for its run_at, as
    a new job without dependencies would start (`initial_status`)."""
    to_status = JobStatus.scheduled if run_at > now else JobStatus.queued
    return Transition(
        job_id, "release", frozenset({JobStatus.waiting}), to_status, "dependencies_met"
    )


def retry_failed(job_id: JobId, now: datetime) -> Transition:
    """Give a failed job a fresh set of attempts; its history is kept."""
    return Transition(
        job_id, "retry", frozenset({JobStatus.failed}), JobStatus.queued, "retried",
        changes={
            "attempts": 0, "run_at": now, "finished_at": None, "error": None,
            "error_traceback": None,
        },
        message="retried by request: attempts reset",
    )


def release_expired_lease(
    job_id: JobId, fence: Fence, attempts: int, max_attempts: int, now: datetime,
    *, owner_known_dead: bool = False,
) -> Transition:
    """The worker holding the job is gone. The lost attempt counts, so a job that kills its
    worker ends failed instead of looping forever. The write rechecks that the lease is still
    out of date at `now`: an owner that renewed it after the scan keeps its job. Only when the
    owner is known dead (a local process that no longer exists) may its lease be taken before
    it runs out, since nobody can renew it any more."""
    expired_by = None if owner_known_dead else now
    error = f"worker {fence.owner} stopped renewing its lease"
    history = AttemptRecord(fence.attempt, AttemptOutcome.worker_lost, fence.owner, now, error)
    if attempts >= max_attempts:
        return Transition(
            job_id, "release", frozenset({JobStatus.running}), JobStatus.failed, "failed",
            changes={"error": error, "error_traceback": None, **_finished(now)},
            message=f"worker_lost: {error}; no attempts left", fence=fence, history=history,
            lease_expired_by=expired_by,
        )
    return Transition(
        job_id, "release", frozenset({JobStatus.running}), JobStatus.queued, "lease_expired",
        changes={"run_at": now, "lease_owner": None, "lease_until": None, "error": error},
        message=f"worker_lost: {error}", fence=fence, history=history,
        lease_expired_by=expired_by,
    )


def release(job_id: JobId, fence: Fence, now: datetime) -> Transition:
    """Give a running job back at shutdown without counting the attempt."""
    return Transition(
        job_id, "release", frozenset({JobStatus.running}), JobStatus.queued, "released",
        changes={"run_at": now, "lease_owner": None, "lease_until": None},
        message="released at shutdown; the attempt does not count",
        fence=fence,
        history=AttemptRecord(fence.attempt, AttemptOutcome.released, fence.owner, now),
        attempts_delta=-1,
    )


def initial_status(
    run_at: datetime, now: datetime, dependency_statuses: Mapping[JobId, JobStatus]
) -> tuple[JobStatus, str | None]:
    """The status a new job starts in, and the reason when it starts cancelled."""
    if not dependency_statuses:  # the bulk-enqueue case, once per job
        return (JobStatus.scheduled if run_at > now else JobStatus.queued), None
    for dep_id, status in dependency_statuses.items():
        if status in (JobStatus.failed, JobStatus.cancelled):
            return JobStatus.cancelled, f"dependency {dep_id} ended {status.value}"
    if any(status != JobStatus.completed for status in dependency_statuses.values()):
        return JobStatus.waiting, None
    return (JobStatus.scheduled if run_at > now else JobStatus.queued), None

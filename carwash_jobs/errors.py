"""The engine's exceptions. Each docstring is its default message; none knows HTTP
(endpoints/errors.py maps them to status codes)."""

from __future__ import annotations

from typing import Any

from carwash_jobs.types import MAX_DELAY_SECONDS


class CarwashError(Exception):
    """Something went wrong in carwash-jobs."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())

    @property
    def message(self) -> str:
        return str(self.args[0])


class ConfigurationError(CarwashError):
    """A setting is missing or invalid."""


class JobNotFound(CarwashError):
    """No job has that id."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"no job has the id {job_id!r}")
        self.job_id = job_id


class IllegalTransition(CarwashError):
    """The job's state does not allow that action."""

    def __init__(self, job_id: str, from_status: str, action: str) -> None:
        super().__init__(f"cannot {action} job {job_id}: it is {from_status}")
        self.job_id = job_id
        self.from_status = from_status
        self.action = action


class UnknownTaskType(CarwashError):
    """No task type has that name."""

    def __init__(self, name: str) -> None:
        super().__init__(f"unknown task type {name!r}")
        self.name = name


class InvalidPayload(CarwashError):
    """The payload does not match the task type's payload model."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class UnknownDependency(CarwashError):
    """A job named in depends_on does not exist."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"depends_on: no job has the id {job_id!r}")
        self.job_id = job_id


class PayloadTooLarge(CarwashError):
    """The request body or upload is larger than the configured limit."""


class StoreUnavailable(CarwashError):
    """The database cannot be reached."""


class RetryLater(Exception):
    """Raised by a handler: try again after `delay_seconds`; the attempt is not held against it
    unless `count_attempt` is true.

    The delay is checked here, where the handler raises it: a delay that is not a number from
    0 to MAX_DELAY_SECONDS (NaN, an infinity, one taken from a bad Retry-After header) would
    only fail later, when the processor computes the next run time, and leave the job running
    without a record until its lease ran out. Refused here, it is the handler's ValueError,
    retried by the task type's policy with that error on the job."""

    def __init__(self, delay_seconds: float, reason: str = "retry requested",
                 *, count_attempt: bool = True) -> None:
        number = isinstance(delay_seconds, int | float) and not isinstance(delay_seconds, bool)
        # NaN and the infinities fail the range: NaN compares false, an infinity lies beyond it
        if not number or not 0 <= delay_seconds <= MAX_DELAY_SECONDS:
            raise ValueError(f"RetryLater: delay_seconds must be a number from 0 to "
                             f"{MAX_DELAY_SECONDS}, not {delay_seconds!r}")
        # the error stored on the job: text (a reason given as None or an object failed the
        # record, and the job ran on until its lease ran out)
        reason = "retry requested" if reason is None else str(reason)
        super().__init__(reason)
        self.delay_seconds = delay_seconds
        self.reason = reason
        self.count_attempt = count_attempt

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled whole (a handler's work in a process pool raises it there): an exception
        pickles its args only, here the reason, which came back as the delay."""
        return _retry_later, (self.delay_seconds, self.reason, self.count_attempt)


def _retry_later(delay_seconds: float, reason: str, count_attempt: bool) -> RetryLater:
    return RetryLater(delay_seconds, reason, count_attempt=count_attempt)


class TransactionAborted(CarwashError):
    """A statement of the transaction failed, so none of it was committed."""

    def __init__(self, failed: BaseException) -> None:
        super().__init__(
            f"a statement of this transaction failed ({type(failed).__name__}: {failed}), so "
            "none of it was committed, although the transaction's function went on after the "
            "error"
        )


class WriteInsideTransaction(CarwashError):
    """A write through the store, awaited by a transaction function of that same store on
    SQLite: its one writer runs the function, so the write would wait for it forever."""

    def __init__(self) -> None:
        super().__init__(
            "a store write (a checkpoint, progress, an enqueue without tx=, a rate limit's "
            "wait) was awaited inside a transaction function of the same SQLite store: its one "
            "writer is running that function and would wait for itself; write through the "
            "function's tx, or after it returns"
        )


class PermanentError(Exception):
    """Raised by a handler: the job cannot succeed; fail it now without further attempts."""


class StaleLease(IllegalTransition):
    """The attempt no longer holds the job: its lease expired or a newer attempt took over."""


class LeaseLost(CarwashError):
    """This attempt no longer holds the job (its lease expired, or it was cancelled); stop."""

"""carwash_jobs/errors.py: what the engine's exceptions carry, and what they refuse."""

from __future__ import annotations

import pickle

import pytest

from carwash_jobs.errors import RetryLater


def test_retry_later_pickles_whole() -> None:
    """A handler's work in a process pool raises it there: an exception pickles its args only
    (here the reason), which came back as the delay."""
    raised = RetryLater(90, "the SMTP server asked us to wait", count_attempt=False)

    back = pickle.loads(pickle.dumps(raised))

    assert (back.delay_seconds, back.reason, back.count_attempt) == (
        90, "the SMTP server asked us to wait", False)
    assert str(back) == "the SMTP server asked us to wait"


@pytest.mark.parametrize("delay", [-0.001, 10 * 365 * 24 * 3600 + 1, float("nan"), None, True])
def test_retry_later_refuses_a_delay_no_enqueue_could_have(delay: object) -> None:
    with pytest.raises(ValueError, match="delay_seconds must be a number from 0 to"):
        RetryLater(delay)  # type: ignore[arg-type]


@pytest.mark.parametrize(("reason", "stored"), [
    (None, "retry requested"),
    (ValueError("quota"), "quota"),
    ("throttled", "throttled"),
])
def test_retry_later_keeps_its_reason_as_text(reason: object, stored: str) -> None:
    """It is the error stored on the job: a reason given as None or an object failed the
    record, and the job ran on until its lease ran out."""
    raised = RetryLater(30, reason)  # type: ignore[arg-type]
    assert (raised.reason, str(raised)) == (stored, stored)

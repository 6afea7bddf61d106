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

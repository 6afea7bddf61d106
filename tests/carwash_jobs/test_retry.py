"""Tests for carwash_jobs/retry.py: backoff arithmetic with a seeded random, no I/O, no clock."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from carwash_jobs.retry import RetryPolicy, backoff_seconds, next_attempt_at

NOW = datetime(2030, 1, 1, tzinfo=UTC)
NO_JITTER = RetryPolicy(base_seconds=2.0, factor=2.0, max_seconds=3600.0, jitter=0.0)


@pytest.mark.parametrize(
    ("attempt", "expected"),
    [(0, 2.0), (1, 2.0), (2, 4.0), (3, 8.0), (4, 16.0), (10, 1024.0), (12, 3600.0), (50, 3600.0)],
)
def test_backoff_doubles_from_the_base_and_stops_at_the_cap(attempt: int, expected: float) -> None:
    assert backoff_seconds(attempt, NO_JITTER) == expected


@pytest.mark.parametrize("attempt", range(1, 9))
def test_jitter_stays_within_ten_percent_of_the_delay(attempt: int) -> None:
    policy = RetryPolicy()
    rng = random.Random(attempt)
    plain = backoff_seconds(attempt, NO_JITTER)
    for _ in range(200):
        delay = backoff_seconds(attempt, policy, rng)
        assert plain * 0.9 <= delay <= plain * 1.1


def test_the_same_seed_gives_the_same_delays() -> None:
    policy = RetryPolicy(jitter=0.5)
    first = [backoff_seconds(a, policy, random.Random(42)) for a in range(1, 6)]
    second = [backoff_seconds(a, policy, random.Random(42)) for a in range(1, 6)]
    assert first == second
    assert first != [backoff_seconds(a, NO_JITTER) for a in range(1, 6)]


def test_delays_grow_with_each_attempt_despite_jitter() -> None:
    rng = random.Random(7)
    delays = [backoff_seconds(a, RetryPolicy(), rng) for a in range(1, 8)]
    assert delays == sorted(delays)
    assert len(set(delays)) == len(delays)


def test_a_delay_is_never_negative() -> None:
    policy = RetryPolicy(base_seconds=0.0, jitter=1.0)
    assert backoff_seconds(3, policy, random.Random(1)) == 0.0


@pytest.mark.parametrize(
    ("attempt", "max_attempts", "expected"),
    [
        (1, 3, NOW + timedelta(seconds=2)),
        (2, 3, NOW + timedelta(seconds=4)),
        (3, 3, None),
        (4, 3, None),
        (1, 1, None),
    ],
)
def test_next_attempt_at_is_none_once_the_last_attempt_is_used(
    attempt: int, max_attempts: int, expected: datetime | None
) -> None:
    assert next_attempt_at(attempt, max_attempts, NOW, NO_JITTER) == expected


def test_next_attempt_at_uses_the_rng_it_is_given() -> None:
    policy = RetryPolicy(base_seconds=10.0, jitter=0.1)
    at = next_attempt_at(1, 5, NOW, policy, random.Random(3))
    expected = NOW + timedelta(seconds=backoff_seconds(1, policy, random.Random(3)))
    assert at == expected


@pytest.mark.parametrize("attempt", [12, 13, 20, 50])
def test_jitter_never_takes_a_delay_past_the_cap(attempt: int) -> None:
    policy = RetryPolicy(base_seconds=2.0, factor=2.0, max_seconds=3600.0, jitter=0.1)
    rng = random.Random(attempt)
    delays = [backoff_seconds(attempt, policy, rng) for _ in range(200)]
    assert max(delays) <= policy.max_seconds
    assert min(delays) >= policy.max_seconds * 0.9  # still spread, downwards only
    assert len(set(delays)) > 1


def test_next_attempt_at_is_never_later_than_the_cap() -> None:
    policy = RetryPolicy(base_seconds=10.0, factor=10.0, max_seconds=60.0, jitter=0.1)
    rng = random.Random(5)
    ats = [next_attempt_at(3, 10, NOW, policy, rng) for _ in range(200)]
    assert None not in ats  # attempts are left: a retry time each, not `no retry`
    latest = max(at for at in ats if at is not None)
    assert latest <= NOW + timedelta(seconds=60)


@pytest.mark.parametrize(("policy", "attempt"), [
    (RetryPolicy(), 1025),  # the default: 2.0 * 2.0**1024 overflowed instead of capping
    (RetryPolicy(factor=3.0), 700),  # within the API's max_attempts of 1,000
    (RetryPolicy(factor=2), 10**6),  # an int factor: the int power overflows the product
])
def test_a_late_attempt_waits_the_cap_instead_of_overflowing(
    policy: RetryPolicy, attempt: int
) -> None:
    """The overflow left the attempt unrecorded: the job sat running until its lease ran out."""
    assert policy.max_seconds * 0.9 <= backoff_seconds(attempt, policy) <= policy.max_seconds
    assert next_attempt_at(attempt, attempt + 1, NOW, policy) is not None

"""The retry policy: pure arithmetic that says when the next attempt may start."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from datetime import datetime, timedelta


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff: base * factor**(attempt-1) with +/- jitter, then capped, so
    `max_seconds` is a promise an operator can rely on (no retry ever waits longer)."""

    base_seconds: float = 2.0
    factor: float = 2.0
    max_seconds: float = 3600.0
    jitter: float = 0.1  #: fraction of the delay added or removed at random


def backoff_seconds(attempt: int, policy: RetryPolicy, rng: random.Random | None = None) -> float:
    """The delay after failed attempt number `attempt` (1-based). The cap comes last: jitter
    spreads retries around the capped delay but never pushes one past `max_seconds` (at the
    cap the spread only goes downwards)."""
    try:
        raw = policy.base_seconds * policy.factor ** max(attempt - 1, 0)
    except OverflowError:  # attempt 1025 of the default policy: far past the cap anyway
        raw = math.inf
    delay = min(raw, policy.max_seconds)
    spread = delay * policy.jitter
    pick = (rng or random).uniform(-spread, spread)
    return min(max(0.0, delay + pick), policy.max_seconds)


def next_attempt_at(
    attempt: int,
    max_attempts: int,
    now: datetime,
    policy: RetryPolicy,
    rng: random.Random | None = None,
) -> datetime | None:
    """When attempt `attempt + 1` may start, or None when `attempt` was the last one allowed."""
    if attempt >= max_attempts:
        return None
    return now + timedelta(seconds=backoff_seconds(attempt, policy, rng))

"""Names shared by every layer, kept here so that store, lifecycle and queue need not import each other."""

from __future__ import annotations

import itertools
import os
import secrets
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import NewType, TypeAlias

JobId = NewType("JobId", str)
TaskTypeName = NewType("TaskTypeName", str)

JSONValue: TypeAlias = (
    str | int | float | bool | Sequence["JSONValue"] | Mapping[str, "JSONValue"] | None
)
JSONObject: TypeAlias = dict[str, JSONValue]

Clock: TypeAlias = Callable[[], datetime]


def utc_now() -> datetime:
    """The default clock."""
    return datetime.now(UTC)


_last_ms = 0
_counter = itertools.count()


def new_job_id() -> JobId:
    """A 32-hex-digit id that sorts by creation time: 48 bits of milliseconds, then a
    per-process sequence, then randomness, so ids made in one process sort in order."""
    return new_job_ids(1)[0]


def new_job_ids(n: int) -> list[JobId]:
    """`n` ids as new_job_id() makes them, with the randomness drawn in one call (a bulk
    enqueue would otherwise spend a system call per job)."""
    global _last_ms  # noqa: PLW0603 - process-wide monotonic sequence, by design
    ms = max(time.time_ns() // 1_000_000, _last_ms)
    _last_ms = ms
    prefix = f"{ms:012x}"
    noise = secrets.token_hex(8 * n)
    return [
        JobId(f"{prefix}{next(_counter) & 0xFFFF:04x}{noise[16 * i:16 * i + 16]}")
        for i in range(n)
    ]


def process_identity() -> str:
    """`host/pid/start/nonce` names a runtime uniquely across restarts (and across several
    runtimes of one process, as in tests); it is the lease owner."""
    return f"{socket.gethostname()}/{os.getpid()}/{int(time.time())}/{secrets.token_hex(3)}"

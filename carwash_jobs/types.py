"""Names shared by every layer, kept here so that store, lifecycle and queue need not import each other."""

from __future__ import annotations

import os
import random
import secrets
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import NewType, TypeAlias

#: the furthest ahead a delay may reach (ten years); beyond it datetime arithmetic overflows
MAX_DELAY_SECONDS = 10 * 365 * 24 * 3600

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


#: the (millisecond << 16 | sequence) stamp that the next id may take at the earliest
_next_stamp = 0


#: the ids new_job_id makes: a list's cursor (the id of a page's last job) must be one
JOB_ID_PATTERN = "^[0-9a-f]{32}$"


def new_job_id() -> JobId:
    """A 32-hex-digit id that sorts by creation time: 48 bits of milliseconds, then a
    per-process sequence, then randomness, so ids made in one process sort in order."""
    return new_job_ids(1)[0]


def new_job_ids(n: int) -> list[JobId]:
    """`n` ids as new_job_id() makes them. The millisecond and its 16-bit sequence form one
    number that only grows: it restarts at the clock's millisecond when the clock has moved on,
    and a process that makes more than 65,536 ids in one millisecond carries into the next, so
    the order holds whatever the rate. Each id is one number formatted once."""
    global _next_stamp  # noqa: PLW0603 - process-wide monotonic sequence, by design
    first = max((time.time_ns() // 1_000_000) << 16, _next_stamp)
    _next_stamp = first + n
    bits = _noise.getrandbits
    return [JobId(f"{stamp << 64 | bits(64):032x}") for stamp in range(first, first + n)]


#: The random part of an id keeps ids of different processes apart; it needs to be
#: unpredictable to nobody, only unlikely to repeat. A generator seeded from the OS once
#: (and again in a forked child, which would otherwise repeat its parent's ids) instead of a
#: system call per id: os.urandom costs 15 us here, a tenth of an HTTP enqueue's own work.
#: Private, so that ids never move the global `random` state that tests may seed.
_noise = random.Random(secrets.randbits(128))
os.register_at_fork(after_in_child=lambda: _noise.seed(secrets.randbits(128)))


NUL_PROBLEM = "must not contain U+0000 (NUL): PostgreSQL text cannot hold it"
SURROGATE_PROBLEM = "must not contain a lone surrogate: UTF-8 has no form for one"


def storable_text(text: str) -> str:
    """`text` as both stores can keep it: no UTF-8 holds a lone surrogate, and PostgreSQL's
    text holds no U+0000. For text the engine writes from what it did not choose (a handler's
    error message and traceback): each such character is written as its escape (\\x00,
    \\ud800) rather than refused, because a record that could not be written left its job
    running until the lease ran out, again at every attempt, with the error never told."""
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    try:
        text.encode()
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode()
    return text


def storable_text_problem(text: str) -> str | None:
    """Why a store could not keep `text` as given (see storable_text), or None: for text a
    caller chose, which is refused rather than changed."""
    if "\x00" in text:
        return NUL_PROBLEM
    try:
        text.encode()
    except UnicodeEncodeError:
        return SURROGATE_PROBLEM
    return None


def process_identity() -> str:
    """`host/pid/start/nonce/pidns` names a runtime uniquely across restarts (and across
    several runtimes of one process, as in tests); it is the lease owner."""
    return (f"{socket.gethostname()}/{os.getpid()}/{int(time.time())}/{secrets.token_hex(3)}"
            f"/{pid_namespace()}")


def pid_namespace() -> str:
    """The pid namespace this process's pid is counted in (its inode on Linux, "-" where there
    is none to read). Processes can share a hostname without sharing pids (containers on the
    host's network, replicas given one hostname): a pid means something to another process
    only within the same namespace."""
    try:
        link = os.readlink("/proc/self/ns/pid")  # "pid:[4026531836]"
    except OSError:
        return "-"
    return link.removeprefix("pid:[").removesuffix("]")

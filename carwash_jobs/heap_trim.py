"""Giving freed memory back to the system in a long-running process (glibc only).

A PostgreSQL worker under a steady load grew by 1.1-1.5 MB a minute (+63 % in a 20-minute soak)
though Python's own heap stayed flat: allocated blocks and tracked objects did not grow. The
growth was memory that had been freed but that glibc's allocator kept, in holes of its heap
that its automatic trim (of the top of the heap only) never reaches. `malloc_trim(0)` hands
every free page back, wherever it lies; called every 30 seconds it held the worker's RSS flat.

A served process (`serve`, any role) starts one daemon thread that trims now and then; the
benchmarks start it too, so that they measure the engine as served. Tests and code that embed
a runtime do not. ctypes lets go of the GIL for the call, so the event loop runs on unless it
needs an allocator lock the trim holds: most Python objects come from Python's own allocator
and never wait. Where the C library has no `malloc_trim` (musl, macOS) nothing starts.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

log = logging.getLogger(__name__)

#: seconds between two trims of a served process (setting heap_trim_interval_seconds)
TRIM_INTERVAL_SECONDS = 30.0

#: the process's trimmer while it runs (at most one)
_running: list[Trimmer] = []
_starting = threading.Lock()


@dataclass
class Trimmer:
    """Calls `trim(0)` every `interval_seconds` until stopped, and keeps what it cost."""

    interval_seconds: float
    trim: Callable[[int], int]
    stopped: threading.Event = field(default_factory=threading.Event)
    trims: int = 0
    longest_seconds: float = 0.0  #: the longest trim: the most a trim held the allocator

    def run(self) -> None:
        while not self.stopped.wait(self.interval_seconds):
            began = time.perf_counter()
            self.trim(0)
            took = time.perf_counter() - began
            self.trims += 1
            self.longest_seconds = max(self.longest_seconds, took)


def libc_malloc_trim() -> Callable[[int], int] | None:
    """glibc's `malloc_trim(pad)`, or None where the C library has none."""
    try:
        libc = ctypes.CDLL(None)  # the process's own symbols: the C library it runs on
    except (OSError, TypeError):  # TypeError: Windows loads no library by None
        return None
    trim = getattr(libc, "malloc_trim", None)
    if trim is None:
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim  # type: ignore[no-any-return]  # a ctypes function: (int) -> int as declared


def start_trimming(interval_seconds: float = TRIM_INTERVAL_SECONDS) -> Trimmer | None:
    """Start this process's trimmer, once: while one runs, a later call returns it as it is
    (with its own interval). None where there is nothing to call, or when `interval_seconds`
    is 0 (trimming is off)."""
    trim = libc_malloc_trim()
    if trim is None or interval_seconds <= 0:
        return None
    with _starting:
        if not _running:
            trimmer = Trimmer(interval_seconds, trim)
            threading.Thread(target=trimmer.run, name="heap-trim", daemon=True).start()
            _running.append(trimmer)
            log.info("freed memory goes back to the system every %gs (malloc_trim)",
                     interval_seconds)
        return _running[0]


def stop_trimming() -> Trimmer | None:
    """Stop the process's trimmer, if one runs (a benchmark between its scenarios, a test);
    it ends within one trim. Returns it, with what it cost."""
    with _starting:
        trimmer = _running.pop() if _running else None
    if trimmer is not None:
        trimmer.stopped.set()
    return trimmer

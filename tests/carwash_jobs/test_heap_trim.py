"""Tests for carwash_jobs/heap_trim.py, on this machine's C library."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from carwash_jobs import heap_trim
from carwash_jobs.errors import ConfigurationError
from carwash_jobs.settings import load_settings

MALLOC_TRIM = heap_trim.libc_malloc_trim()
needs_glibc = pytest.mark.skipif(MALLOC_TRIM is None, reason="the C library has no malloc_trim")


def rss_mb() -> float:
    resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    return resident_pages * 4096 / 2**20


@needs_glibc
def test_a_trim_hands_freed_heap_memory_back_to_the_system() -> None:
    assert MALLOC_TRIM is not None
    blocks = [bytes(2000) for _ in range(50_000)]  # ~100 MB from malloc (too big for pymalloc)
    pinned = bytes(2000)  # above them on the heap: glibc's own trim of the top cannot reach them
    grown = rss_mb()
    del blocks
    freed = rss_mb()
    assert freed > grown - 20, "glibc kept the freed blocks (the case a trim is for)"

    MALLOC_TRIM(0)

    assert rss_mb() < freed - 60
    assert pinned  # alive until here


def test_the_trimmer_trims_on_its_interval_until_stopped() -> None:
    stop = threading.Event()
    pads: list[int] = []

    def trim(pad: int) -> int:
        pads.append(pad)
        if len(pads) == 3:
            stop.set()
        return 1

    heap_trim.trim_every(0.001, trim, stop)

    assert pads == [0, 0, 0]


@needs_glibc
def test_a_process_starts_one_trimmer_however_often_asked() -> None:
    assert heap_trim.start_trimming(3600)
    assert heap_trim.start_trimming(1)

    trimmers = [t for t in threading.enumerate() if t.name == "heap-trim"]
    assert len(trimmers) == 1
    assert trimmers[0].daemon  # it never holds the process open


def test_an_interval_of_zero_turns_trimming_off() -> None:
    assert not heap_trim.start_trimming(0)
    assert load_settings(heap_trim_interval_seconds=0).heap_trim_interval_seconds == 0


def test_a_negative_interval_is_refused_by_name() -> None:
    with pytest.raises(ConfigurationError, match="heap_trim_interval_seconds"):
        load_settings(heap_trim_interval_seconds=-1)

"""Tests for carwash_jobs/heap_trim.py, on this machine's C library."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from carwash_jobs import heap_trim
from carwash_jobs.errors import ConfigurationError
from carwash_jobs.settings import load_settings

if TYPE_CHECKING:
    from collections.abc import Iterator

MALLOC_TRIM = heap_trim.libc_malloc_trim()
needs_glibc = pytest.mark.skipif(MALLOC_TRIM is None, reason="the C library has no malloc_trim")


@pytest.fixture(autouse=True)
def no_trimmer_running() -> Iterator[None]:
    """No trimmer of another test (a benchmark's engine) trims behind these tests' backs."""
    heap_trim.stop_trimming()
    yield
    heap_trim.stop_trimming()


def rss_mb() -> float:
    resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20


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


def test_the_trimmer_trims_on_its_interval_and_keeps_its_longest_pause() -> None:
    pads: list[int] = []

    def trim(pad: int) -> int:
        pads.append(pad)
        if len(pads) == 3:
            trimmer.stopped.set()
        return 1

    trimmer = heap_trim.Trimmer(0.001, trim)
    trimmer.run()

    assert pads == [0, 0, 0]
    assert trimmer.trims == 3
    assert 0 < trimmer.longest_seconds < 1


@needs_glibc
def test_a_process_runs_one_trimmer_however_often_asked_until_it_is_stopped() -> None:
    first = heap_trim.start_trimming(3600)
    assert first is not None
    assert heap_trim.start_trimming(1) is first  # the running one, as it is
    trimmers = [t for t in threading.enumerate() if t.name == "heap-trim" and t.is_alive()]
    assert len(trimmers) == 1
    assert trimmers[0].daemon  # it never holds the process open

    assert heap_trim.stop_trimming() is first
    trimmers[0].join(timeout=5)
    assert not trimmers[0].is_alive()
    assert heap_trim.stop_trimming() is None

    second = heap_trim.start_trimming(3600)  # a stopped trimmer can be followed by another
    assert second is not None
    assert second is not first


def test_an_interval_of_zero_turns_trimming_off() -> None:
    assert heap_trim.start_trimming(0) is None
    assert load_settings(heap_trim_interval_seconds=0).heap_trim_interval_seconds == 0


@pytest.mark.parametrize("interval", [-1, 0.5, 86_401, float("inf")])
def test_an_interval_out_of_range_is_refused_by_name(interval: float) -> None:
    with pytest.raises(ConfigurationError, match="heap_trim_interval_seconds"):
        load_settings(heap_trim_interval_seconds=interval)

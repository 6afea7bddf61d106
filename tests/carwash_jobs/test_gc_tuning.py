"""Tests for carwash_jobs/gc_tuning.py."""

from __future__ import annotations

import gc

from carwash_jobs import gc_tuning


def test_settling_freezes_what_exists_and_leaves_the_collector_on() -> None:
    try:
        gc_tuning.settle_after_startup()
        assert gc.get_freeze_count() > 0
        assert gc.isenabled()  # cheaper collections, not none
    finally:  # this test process builds many runtimes: let its objects be collected again
        gc.unfreeze()

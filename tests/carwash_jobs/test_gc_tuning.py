"""Tests for carwash_jobs/gc_tuning.py."""

from __future__ import annotations

import gc

from carwash_jobs import gc_tuning


def test_settling_freezes_what_exists_and_collects_the_young_less_often() -> None:
    thresholds = gc.get_threshold()
    try:
        gc_tuning.settle_after_startup()
        assert gc.get_freeze_count() > 0
        assert gc.isenabled()  # cheaper collections, not none
        assert gc.get_threshold() == (gc_tuning.YOUNG_THRESHOLD, *thresholds[1:])
    finally:  # this test process builds many runtimes: let its objects be collected again
        gc.unfreeze()
        gc.set_threshold(*thresholds)

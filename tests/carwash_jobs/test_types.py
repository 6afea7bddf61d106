"""Tests for carwash_jobs/types.py: job ids, and text as the stores can keep it."""

from __future__ import annotations

import os
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from carwash_jobs.types import (
    NUL_PROBLEM,
    SURROGATE_PROBLEM,
    new_job_id,
    new_job_ids,
    storable_text,
    storable_text_problem,
)


def test_ids_are_32_hex_digits_unique_and_in_creation_order() -> None:
    ids = [new_job_id(), *new_job_ids(5_000), new_job_id()]
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)


def test_more_ids_than_the_sequence_holds_in_one_millisecond_stay_in_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The clock stands still: 200,000 ids cross the 16-bit sequence three times."""
    frozen = time.time_ns()
    monkeypatch.setattr("carwash_jobs.types._next_stamp", 0)  # restored afterwards
    monkeypatch.setattr("time.time_ns", lambda: frozen)
    ids = new_job_ids(100_000) + new_job_ids(100_000)
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    # each full sequence carried into the next millisecond: 200,000 ids took four of them
    first_ms = frozen // 1_000_000
    assert [int(i[:12], 16) - first_ms for i in ids[65_535:65_537]] == [0, 1]
    assert int(ids[-1][:12], 16) == first_ms + 3


def test_a_forked_child_does_not_repeat_its_parents_ids() -> None:
    """A forked child starts with a copy of its parent's sequence and generator: without a new
    seed, both would make the same ids within the same millisecond."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next id, then out without running the parent's cleanup
        os.write(write_end, "".join(new_job_ids(100)).encode())
        os._exit(0)
    os.close(write_end)
    ours = new_job_ids(100)
    os.waitpid(pid, 0)
    with os.fdopen(read_end) as pipe:
        text = pipe.read()
    theirs = [text[i:i + 32] for i in range(0, len(text), 32)]
    assert len(theirs) == 100
    assert not {i[16:] for i in ours} & {i[16:] for i in theirs}


@pytest.mark.parametrize(
    ("text", "stored"),
    [
        ("plain text, é, 🚗", "plain text, é, 🚗"),
        ("bad\x00thing", "bad\\x00thing"),
        ("lone \ud800 surrogate", "lone \\ud800 surrogate"),
        ("\x00\udcff\x00", "\\x00\\udcff\\x00"),
    ],
)
def test_storable_text_writes_what_a_store_cannot_keep_as_its_escape(text: str, stored: str) -> None:
    assert storable_text(text) == stored


@given(st.text())
def test_storable_text_always_encodes_and_holds_no_nul_and_keeps_storable_text(text: str) -> None:
    stored = storable_text(text)
    stored.encode()
    assert "\x00" not in stored
    assert storable_text_problem(stored) is None
    if storable_text_problem(text) is None:
        assert stored == text


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("ok é", None),
        ("a\x00", NUL_PROBLEM),
        ("a\udc80", SURROGATE_PROBLEM),
    ],
)
def test_storable_text_problem_names_what_a_store_would_refuse(
    text: str, problem: str | None,
) -> None:
    assert storable_text_problem(text) == problem

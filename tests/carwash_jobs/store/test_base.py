"""The per-job records: read-only to the type checker; NewJob and DueJob are plain slots
dataclasses at run time, compared and hashed by their fields as the frozen dataclasses they
replaced were, and JobRow, which handlers see, stays frozen, also when the stores build it with
job_row(). And JSON: json_types_text() writes what json_text() writes and refuses what it
refuses (NaN and the infinities), and json_value() reads what json.loads() reads, value for
value."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from carwash_jobs import lifecycle
from carwash_jobs.lifecycle import Fence, JobStatus
from carwash_jobs.store.base import (
    JOB_COLUMNS,
    DueJob,
    JobRow,
    NewJob,
    alike,
    job_row,
    json_text,
    json_types_text,
    json_value,
)
from carwash_jobs.types import JobId

if TYPE_CHECKING:
    from collections.abc import Callable

AT = datetime(2026, 11, 24, tzinfo=UTC)


def test_equal_records_hash_alike_and_can_key_a_dict() -> None:
    first = DueJob(JobId("a"), "email", "default", 0, AT)
    same = DueJob(JobId("a"), "email", "default", 0, AT)

    assert first == same
    assert hash(first) == hash(same)
    assert {first: 1}[same] == 1
    assert first != dataclasses.replace(first, priority=5)


def test_a_record_is_changed_by_making_another() -> None:
    job = NewJob(JobId("a"), "email", {}, JobStatus.queued, AT, AT)

    claimed = dataclasses.replace(job, claimed_by="worker-1")

    assert (job.claimed_by, claimed.claimed_by) == (None, "worker-1")
    assert claimed.id == job.id


def test_the_type_checker_refuses_a_change_the_run_time_allows() -> None:
    due = DueJob(JobId("a"), "email", "default", 0, AT)

    # mypy --strict (warn_unused_ignores) fails the test command here if this ever type-checks
    due.priority = 1  # type: ignore[misc]

    assert due.priority == 1


def _running_row() -> JobRow:
    return JobRow(
        id=JobId("a"), task_type="email", queue="default", status=JobStatus.running, priority=0,
        payload={}, context=None, tags=[], attempts=1, max_attempts=1, run_at=AT, created_at=AT,
        started_at=AT, finished_at=None, lease_owner="w", lease_until=AT, progress_done=0,
        progress_total=None, checkpoint=None, result=None, error=None, error_traceback=None,
        attempt_history=[], idempotency_key=None, rerun_of=None, depends_on=[],
    )


def test_a_job_row_stays_frozen_for_the_handlers_that_see_it() -> None:
    row = _running_row()

    with pytest.raises(dataclasses.FrozenInstanceError):
        row.max_attempts = 99  # type: ignore[misc]


def test_job_row_builds_from_values_in_column_order_what_the_constructor_builds() -> None:
    row = _running_row()
    values = [getattr(row, column) for column in JOB_COLUMNS]

    built = job_row(values)

    assert type(built) is JobRow
    assert built == row
    assert dataclasses.replace(built, attempts=2) == dataclasses.replace(row, attempts=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        built.task_type = "other"  # type: ignore[misc]


def test_job_row_refuses_a_value_too_many_or_too_few() -> None:
    values = [getattr(_running_row(), column) for column in JOB_COLUMNS]

    with pytest.raises(ValueError, match="zip"):
        job_row([*values, None])
    with pytest.raises(ValueError, match="zip"):
        job_row(values[:-1])


#: any text, lone surrogates (category Cs) included: a Python str may hold them, UTF-8 may not
_TEXT = st.text(st.characters(exclude_categories=()), max_size=8)
#: what pydantic's JSON-mode dump can make of a payload: JSON types only, NaN and the
#: infinities included (a float field accepts them)
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | _TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_TEXT, inner, max_size=4),
    max_leaves=12,
)


def _read_back(text: str) -> str:
    """The value a JSON text holds, in one canonical form."""
    return json_text(json.loads(text))


def _written(encode: Callable[[Any], str], value: Any) -> str | None:
    """The value `encode` writes, read back; None where it refuses it."""
    try:
        text = encode(value)
    except ValueError:
        return None
    return _read_back(text)


@given(st.dictionaries(_TEXT, _JSON, max_size=6))
def test_json_types_text_holds_the_values_json_text_writes_and_refuses_what_it_refuses(
    payload: dict[str, Any],
) -> None:
    assert _written(json_types_text, payload) == _written(json_text, payload)


def test_json_types_text_writes_beyond_ascii_as_utf8_and_a_lone_surrogate_as_json_text_does() -> None:
    assert json_types_text({"name": "Zoë 🚗", "n": 1.5}) == '{"name":"Zoë 🚗","n":1.5}'
    lone = {"note": "\ud800"}
    assert json_types_text(lone) == json_text(lone) == '{"note":"\\ud800"}'


def test_nan_and_the_infinities_have_no_json_form_but_their_words_in_text_do() -> None:
    for value in (float("nan"), float("inf"), float("-inf")):
        for encode in (json_text, json_types_text):
            with pytest.raises(ValueError, match="not JSON compliant"):
                encode({"deep": [1, {"x": value}]})
    words = {"NaN": "Infinity", "note": "-Infinity or NaN"}
    assert json_types_text(words) == json_text(words) == json.dumps(words, separators=(",", ":"))


def test_json_types_text_refuses_a_value_with_no_json_form_as_json_text_does() -> None:
    with pytest.raises(TypeError, match="not JSON serializable"):
        json_types_text({"x": object()})


@given(_JSON)
def test_json_value_reads_what_json_loads_reads(value: Any) -> None:
    texts = [json.dumps(value)]  # NaN as Python writes it: a row from before the encoders refused it
    if _written(json_text, value) is not None:
        texts.append(json_types_text({"v": value}))
    for text in texts:
        assert _canonical(json_value(text)) == _canonical(json.loads(text))


def _canonical(value: Any) -> str:
    """json.dumps, which writes NaN (it is not equal to itself, so values are compared as text)."""
    return json.dumps(value, separators=(",", ":"))


def test_json_value_reads_a_lone_surrogate_and_refuses_what_is_no_json() -> None:
    assert json_value('{"note":"\\ud800"}') == {"note": "\ud800"}
    numbers = "[NaN,-Infinity,100000000000000000000000000001,-0.0,1e+16]"  # NaN: an older row
    assert _canonical(json_value(numbers)) == numbers
    with pytest.raises(json.JSONDecodeError):
        json_value('{"n": 1')


# -- alike: the batches apply_many writes by one statement ---------------------------------------
IDS = [JobId(f"{n:032x}") for n in range(3)]


def test_a_bulk_retry_batch_is_one_change() -> None:
    batch = [lifecycle.retry_failed(i, AT) for i in IDS]

    assert alike(batch) == batch[0]


@pytest.mark.parametrize(("why", "batch"), [
    ("one job", [lifecycle.retry_failed(IDS[0], AT)]),
    ("a job twice", [lifecycle.retry_failed(i, AT) for i in (IDS[0], IDS[1], IDS[0])]),
    ("changes that differ", [lifecycle.retry_failed(IDS[0], AT),
                             lifecycle.retry_failed(IDS[1], datetime(2031, 1, 1, tzinfo=UTC))]),
    ("an end, which resolves each job's dependents", [lifecycle.cancel(i, AT) for i in IDS]),
    ("a fence and a history to check and write job by job", [
        lifecycle.release_expired_lease(i, Fence(1, "owner"), 1, 3, AT) for i in IDS]),
])
def test_transitions_that_need_a_statement_each_are_not_alike(
    why: str, batch: list[lifecycle.Transition]
) -> None:
    assert alike(batch) is None, why

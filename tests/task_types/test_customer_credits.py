"""customer_credits: the ledger matches the result and a grant happens once, all or nothing.

Neither a failed, nor a killed, nor a half-written completion makes its retry grant twice."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

from carwash_jobs.errors import InvalidPayload
from carwash_jobs.lifecycle import JobStatus
from task_types import customer_credits
from tests.task_types.support import (
    add_customers,
    dies_on_call,
    execute,
    post_task,
    query,
    recover,
    run_job,
    settle,
)

if TYPE_CHECKING:
    from carwash_jobs.context import JobContext
    from carwash_jobs.middleware import CallNext
    from tests.task_types.support import Runtimes

CUSTOMERS = [
    ("tenant-1", "Ann", "ann@example.com", True),
    ("tenant-1", "Bo", "bo@example.com", False),
    ("tenant-1", "Cy", "cy@example.com", True),
    ("tenant-2", "Di", "di@example.com", True),
]


def ledger(url: str) -> list[tuple[Any, ...]]:
    return query(url, "SELECT job_id, customer_id, amount_cents, reason FROM credit_ledger "
                      "ORDER BY job_id, customer_id")


def ledger_total(url: str, job_id: str) -> tuple[int, int]:
    (row,) = query(url, "SELECT COUNT(*), COALESCE(SUM(amount_cents), 0) FROM credit_ledger "
                        "WHERE job_id = ?", (job_id,))
    return row[0], row[1]


async def test_the_ledger_holds_exactly_the_granted_credits(runtimes: Runtimes) -> None:
    runtime = await runtimes.start()
    url = runtime.settings.database_url
    ids = add_customers(url, CUSTOMERS)

    job = await run_job(runtime, "customer_credits", {
        "customer_ids": [ids[0], ids[2], ids[3], ids[0]], "amount_cents": 750,
        "reason": "Rainy-week apology"})

    assert job.status == JobStatus.completed, job.error
    assert job.result == {"customers": 3, "total_cents": 2250}
    assert ledger_total(url, job.id) == (3, 2250)
    assert ledger(url) == [(job.id, i, 750, "Rainy-week apology") for i in (ids[0], ids[2], ids[3])]


async def test_a_segment_is_credited_within_its_tenant(runtimes: Runtimes) -> None:
    runtime = await runtimes.start()
    url = runtime.settings.database_url
    ids = add_customers(url, CUSTOMERS)

    opted_in = await run_job(runtime, "customer_credits", {
        "segment": "opted_in", "tenant_id": "tenant-1", "amount_cents": 100, "reason": "Promo"})
    everyone = await run_job(runtime, "customer_credits", {
        "segment": "all_customers", "amount_cents": 5, "reason": "Anniversary"})

    assert opted_in.result == {"customers": 2, "total_cents": 200}
    assert [r[1] for r in ledger(url) if r[0] == opted_in.id] == [ids[0], ids[2]]
    assert everyone.result == {"customers": 4, "total_cents": 20}
    assert ledger_total(url, everyone.id) == (4, 20)


async def test_unknown_customer_ids_fail_the_job_at_once_and_name_them(runtimes: Runtimes) -> None:
    runtime = await runtimes.start()
    url = runtime.settings.database_url
    ids = add_customers(url, CUSTOMERS)

    job = await run_job(runtime, "customer_credits", {
        "customer_ids": [ids[0], 9999, ids[3], 4242], "tenant_id": "tenant-1",
        "amount_cents": 100, "reason": "Typo"})

    assert job.status == JobStatus.failed
    assert job.attempts == 1
    assert job.error == (f"PermanentError: unknown customer ids in tenant tenant-1: "
                         f"{ids[3]}, 4242, 9999")
    assert ledger(url) == []


async def test_an_attempt_that_fails_after_its_handler_grants_nothing(runtimes: Runtimes) -> None:
    """Credits are written only with the completion: a failed attempt leaves no trace."""

    async def crash_first_attempt(ctx: JobContext, call_next: CallNext) -> Any:
        result = await call_next()
        if ctx.attempt == 1:
            raise ConnectionError("worker lost its database connection before completing")
        return result

    runtime = await runtimes.start(middleware=[crash_first_attempt])
    url = runtime.settings.database_url
    ids = add_customers(url, CUSTOMERS)

    job = await run_job(runtime, "customer_credits", {
        "customer_ids": ids, "amount_cents": 300, "reason": "Retry me"})

    assert job.status == JobStatus.completed, job.error
    assert job.attempts == 2
    assert ledger_total(url, job.id) == (4, 1200)
    assert job.result == {"customers": 4, "total_cents": 1200}


async def test_an_attempt_killed_mid_way_and_retried_grants_once(
    runtimes: Runtimes, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = await runtimes.start()
    url = runtime.settings.database_url
    ids = add_customers(url, CUSTOMERS)
    monkeypatch.setattr(customer_credits, "resolve_customers",
                        dies_on_call(runtime, customer_credits.resolve_customers, call=1))

    inserted = await runtime.queue.enqueue("customer_credits", {
        "customer_ids": ids, "amount_cents": 250, "reason": "Once only"})
    assert runtime.processor is not None
    await runtime.processor.run_until_idle(timeout=5)
    assert ledger(url) == []  # the dead attempt granted nothing
    job = await recover(runtime, inserted.job.id)

    assert job.status == JobStatus.completed, job.error
    assert job.attempts == 2
    assert ledger_total(url, job.id) == (4, 1000)


async def test_a_completion_that_breaks_half_way_through_the_ledger_leaves_none_of_it(
    runtimes: Runtimes
) -> None:
    """The database fails on the third ledger row of the completion transaction: the two rows
    before it vanish with the rollback, the attempt fails with the database's error (it was
    left running until its lease ran out), and the retry grants everyone once."""
    runtime = await runtimes.start()
    url = runtime.settings.database_url
    ids = add_customers(url, CUSTOMERS)
    execute(url, f"CREATE TRIGGER disk_on_fire BEFORE INSERT ON credit_ledger "
                 f"WHEN NEW.customer_id = {ids[2]} BEGIN SELECT RAISE(ABORT, 'disk on fire'); END")

    inserted = await runtime.queue.enqueue("customer_credits", {
        "customer_ids": ids, "amount_cents": 50, "reason": "All or nothing"})
    assert runtime.processor is not None
    await runtime.processor.run_until_idle(timeout=5)
    assert ledger(url) == []
    first = (await runtime.store.get(inserted.job.id)).attempt_history[0]
    assert first["outcome"] == "error"
    assert "disk on fire" in first["error"]
    execute(url, "DROP TRIGGER disk_on_fire")
    job = await settle(runtime, inserted.job.id)

    assert job.status == JobStatus.completed, job.error
    assert ledger_total(url, job.id) == (4, 200)


async def test_the_ledger_key_stops_a_second_write_of_the_same_grant(runtimes: Runtimes) -> None:
    """Belt and braces: even if a completion were written twice, (job_id, customer_id) is unique."""
    runtime = await runtimes.start()
    url = runtime.settings.database_url
    ids = add_customers(url, CUSTOMERS)
    job = await run_job(runtime, "customer_credits", {
        "customer_ids": ids[:2], "amount_cents": 100, "reason": "Twice?"})

    async def again(tx: Any) -> None:
        await tx.executemany(customer_credits.GRANT, [
            {"job_id": job.id, "customer_id": i, "amount_cents": 100, "reason": "Twice?",
             "created_at": "2026-01-01 00:00:00.000000"} for i in ids[:2]])

    await runtime.store.transaction(again)

    assert ledger_total(url, job.id) == (2, 200)


async def test_a_rerun_is_a_new_deliberate_grant(runtimes: Runtimes) -> None:
    runtime = await runtimes.start()
    url = runtime.settings.database_url
    ids = add_customers(url, CUSTOMERS)
    first = await run_job(runtime, "customer_credits", {
        "customer_ids": ids[:1], "amount_cents": 100, "reason": "Loyalty"})

    rerun = await runtime.queue.rerun(first.id)
    second = await settle(runtime, rerun.id)

    assert second.status == JobStatus.completed
    assert query(url, "SELECT SUM(amount_cents) FROM credit_ledger WHERE customer_id = ?",
                 (ids[0],)) == [(200,)]


@pytest.mark.parametrize("payload", [
    {"customer_ids": [1], "amount_cents": 0, "reason": "zero"},
    {"customer_ids": [1], "amount_cents": -5, "reason": "negative"},
    {"customer_ids": [1], "segment": "opted_in", "amount_cents": 5, "reason": "both"},
    {"amount_cents": 5, "reason": "neither"},
    {"customer_ids": [], "amount_cents": 5, "reason": "empty"},
    {"customer_ids": [1], "amount_cents": 5, "reason": ""},
])
async def test_bad_grants_are_refused_at_enqueue(runtimes: Runtimes, payload: dict[str, Any]) -> None:
    runtime = await runtimes.start()

    with pytest.raises(InvalidPayload):
        await runtime.queue.enqueue("customer_credits", payload)


@pytest.mark.parametrize(("customer_ids", "field"), [
    # no customer has it; beyond 64 bits the job failed on the driver's OverflowError, retried,
    # and beyond 32 bits so it did on PostgreSQL (an INTEGER column there)
    ([1, 2**31], "customer_ids.1"),
    ([1, 2**63], "customer_ids.1"),
    ([2**70], "customer_ids.0"),
    ([0], "customer_ids.0"),
    # a JSON body says what type each item is: true is not customer 1, nor "1"
    ([True], "customer_ids.0"),
    ([1, "2"], "customer_ids.1"),
])
async def test_a_customer_id_no_customer_can_have_is_a_400_naming_it(
    runtimes: Runtimes, customer_ids: list[Any], field: str
) -> None:
    payload = {"customer_ids": customer_ids, "amount_cents": 5, "reason": "x"}

    response = await post_task(runtimes.settings(), "customer-credits", payload)

    assert response.status_code == 400, response.text
    assert [error["key"] for error in response.json()["extra"]] == [field]


@pytest.mark.parametrize("payload", [
    {"customer_ids": [1], "segment": "opted_in", "amount_cents": 5, "reason": "both"},
    {"amount_cents": 5, "reason": "neither"},
])
async def test_the_audience_error_names_its_field_like_every_validation_error(
    runtimes: Runtimes, payload: dict[str, Any]
) -> None:
    runtime = await runtimes.start()
    with pytest.raises(InvalidPayload) as refused:
        await runtime.queue.enqueue("customer_credits", payload)
    assert refused.value.field == "segment"

    response = await post_task(runtimes.settings(), "customer-credits", payload)

    assert response.status_code == 400, response.text
    (error,) = response.json()["extra"]
    assert error["key"] == "segment"
    assert "customer_ids or segment" in error["message"]

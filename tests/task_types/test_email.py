"""email against a real SMTP server (aiosmtpd on 127.0.0.1), and the Maildir outbox.

One message per recipient, never twice across retries, a rate limit measured at the server,
no header injection."""

from __future__ import annotations

import asyncio
import itertools
import mailbox
import statistics
from typing import TYPE_CHECKING, Any

import pytest

from carwash_jobs.errors import InvalidPayload
from carwash_jobs.lifecycle import JobStatus
from tests.task_types.support import (
    Runtimes,
    add_customers,
    free_port,
    post_task,
    query,
    recover,
    run_job,
    settle,
)

if TYPE_CHECKING:
    from pathlib import Path

    from carwash_jobs.store.base import JobRow
    from tests.task_types.support import SmtpServer


def recipients(n: int, domain: str = "example.com") -> list[dict[str, str]]:
    return [{"email": f"customer{i}@{domain}", "name": f"Customer {i}"} for i in range(n)]


def mail(**fields: Any) -> dict[str, Any]:
    return {"subject": "Spring special", "body_text": "20% off every wash this week.", **fields}


async def test_each_recipient_gets_exactly_one_message(
    runtimes: Runtimes, smtp_server: SmtpServer
) -> None:
    runtime = await runtimes.start(smtp_url=smtp_server.url)

    job = await run_job(runtime, "email", mail(recipients=recipients(23), chunk_size=5,
                                               body_html="<p>20% off</p>"))

    assert job.status == JobStatus.completed, job.error
    assert job.result == {"sent": 23, "skipped": 0, "rejected": [], "recipients": 23}
    assert sorted(smtp_server.handler.recipients()) == sorted(r["email"] for r in recipients(23))
    first = smtp_server.handler.messages[0].message
    assert first["Subject"] == "Spring special"
    assert first["To"] == "Customer 0 <customer0@example.com>"
    assert first["From"] == "Car Wash <no-reply@carwash.example>"
    assert first["Message-ID"].strip().startswith(f"<{job.id}.")
    plain, html = first.get_body(("plain",)), first.get_body(("html",))
    assert plain is not None
    assert html is not None
    assert plain.get_content().strip() == "20% off every wash this week."
    assert html.get_content().strip() == "<p>20% off</p>"
    assert (job.progress_done, job.progress_total) == (23, 23)
    assert smtp_server.handler.connections == 5  # one connection per chunk of 5
    assert query(runtime.settings.database_url,
                 "SELECT COUNT(*) FROM email_send_log WHERE job_id = ? AND status = 'sent'",
                 (job.id,)) == [(23,)]


async def test_duplicate_addresses_get_one_message(
    runtimes: Runtimes, smtp_server: SmtpServer
) -> None:
    runtime = await runtimes.start(smtp_url=smtp_server.url)
    listed = [{"email": "ann@example.com"}, {"email": "ANN@example.com"}, {"email": "bo@example.com"}]

    job = await run_job(runtime, "email", mail(recipients=listed))

    assert job.result["sent"] == 2
    assert smtp_server.handler.recipients() == ["ann@example.com", "bo@example.com"]


async def test_a_transient_failure_mid_chunk_is_retried_without_mailing_anyone_twice(
    runtimes: Runtimes, smtp_server: SmtpServer
) -> None:
    smtp_server.handler.fail_data_after = 7  # the 8th message (3rd of chunk 2) gets a 421
    runtime = await runtimes.start(smtp_url=smtp_server.url)

    job = await run_job(runtime, "email", mail(recipients=recipients(20), chunk_size=5))

    assert job.status == JobStatus.completed, job.error
    assert job.attempts == 2
    assert "421" in job.attempt_history[0]["error"]
    assert job.result == {"sent": 13, "skipped": 7, "rejected": [], "recipients": 20}
    received = smtp_server.handler.recipients()
    assert sorted(received) == sorted(r["email"] for r in recipients(20))  # each exactly once


async def test_a_worker_dying_mid_chunk_is_recovered_without_mailing_anyone_twice(
    runtimes: Runtimes, smtp_server: SmtpServer
) -> None:
    runtime = await runtimes.start(smtp_url=smtp_server.url)
    loop = asyncio.get_running_loop()
    stalled = asyncio.Event()
    smtp_server.handler.stall_rcpt_after = 6  # the 7th message hangs in RCPT ...
    smtp_server.handler.on_stall = lambda: loop.call_soon_threadsafe(stalled.set)
    inserted = await runtime.queue.enqueue("email", mail(recipients=recipients(15), chunk_size=4))
    job_id = inserted.job.id
    await asyncio.wait_for(stalled.wait(), 10)
    assert runtime.processor is not None
    runtime.processor.cancel_local(job_id)  # ... and its worker dies there, mid-chunk

    job = await recover(runtime, job_id)

    assert job.status == JobStatus.completed, job.error
    assert job.result == {"sent": 9, "skipped": 6, "rejected": [], "recipients": 15}
    assert sorted(smtp_server.handler.recipients()) == sorted(r["email"] for r in recipients(15))


async def test_a_permanent_rejection_is_reported_and_the_others_still_get_mail(
    runtimes: Runtimes, smtp_server: SmtpServer
) -> None:
    smtp_server.handler.reject["customer3@example.com"] = "550 5.1.1 No such mailbox"
    runtime = await runtimes.start(smtp_url=smtp_server.url)

    job = await run_job(runtime, "email", mail(recipients=recipients(6), chunk_size=4))

    assert job.status == JobStatus.completed, job.error
    assert job.attempts == 1
    assert job.result == {
        "sent": 5, "skipped": 0, "recipients": 6,
        "rejected": [{"email": "customer3@example.com", "error": "550 5.1.1 No such mailbox"}],
    }
    assert "customer3@example.com" not in smtp_server.handler.recipients()
    assert len(smtp_server.handler.messages) == 5


async def test_a_temporary_recipient_refusal_defers_that_recipient_and_the_retry_mails_it(
    runtimes: Runtimes, smtp_server: SmtpServer
) -> None:
    """The others are mailed in the same attempt: raised on, the refusal failed every attempt
    at that recipient, and nobody after it in the list was mailed before the job failed."""
    smtp_server.handler.reject["customer2@example.com"] = "450 4.2.1 Mailbox busy"
    runtime = await runtimes.start(smtp_url=smtp_server.url)
    inserted = await runtime.queue.enqueue("email", mail(recipients=recipients(4)))
    assert runtime.processor is not None
    await runtime.processor.run_until_idle(timeout=10)  # attempt 1 defers customer2
    assert smtp_server.handler.recipients() == [
        "customer0@example.com", "customer1@example.com", "customer3@example.com"]
    smtp_server.handler.reject.clear()

    job = await settle(runtime, inserted.job.id)

    assert job.status == JobStatus.completed, job.error
    assert job.attempts == 2
    error = job.attempt_history[0]["error"]
    assert "deferred 1 of 4 recipients" in error
    assert "customer2@example.com: 450 4.2.1 Mailbox busy" in error
    assert job.result == {"sent": 1, "skipped": 3, "rejected": [], "recipients": 4}
    assert sorted(smtp_server.handler.recipients()) == [f"customer{i}@example.com" for i in range(4)]


async def test_recipients_refused_in_a_row_with_one_reply_are_the_server_refusing_everyone(
    runtimes: Runtimes, smtp_server: SmtpServer
) -> None:
    """A block list or relaying denied answers every RCPT alike: each recipient was logged as
    rejected for good, the job completed, and nobody could be mailed by a retry."""
    smtp_server.handler.reject_all = "554 5.7.1 Client host blocked"
    runtime = await runtimes.start(smtp_url=smtp_server.url)
    inserted = await runtime.queue.enqueue("email", mail(recipients=recipients(25)))
    assert runtime.processor is not None
    await runtime.processor.run_until_idle(timeout=10)
    first = await runtime.store.get(inserted.job.id)
    assert "refused 20 recipients in a row with the same reply" in (first.error or "")
    assert query(runtime.settings.database_url, "SELECT COUNT(*) FROM email_send_log") == [(0,)]
    smtp_server.handler.reject_all = None

    job = await settle(runtime, inserted.job.id)

    assert job.status == JobStatus.completed, job.error
    assert job.result == {"sent": 25, "skipped": 0, "rejected": [], "recipients": 25}


async def test_stale_addresses_in_a_row_are_each_rejected_and_the_job_completes(
    runtimes: Runtimes, smtp_server: SmtpServer
) -> None:
    """A reply naming its mailbox differs from one recipient to the next: no streak."""
    for i in range(22):
        address = f"customer{i}@example.com"
        smtp_server.handler.reject[address] = f"550 5.1.1 <{address}>: user unknown"
    runtime = await runtimes.start(smtp_url=smtp_server.url)

    job = await run_job(runtime, "email", mail(recipients=recipients(24)))

    assert job.status == JobStatus.completed, job.error
    assert (job.attempts, job.result["sent"], len(job.result["rejected"])) == (1, 2, 22)


async def test_the_rate_limit_spaces_messages_at_the_server(
    runtimes: Runtimes, smtp_server: SmtpServer
) -> None:
    runtime = await runtimes.start(smtp_url=smtp_server.url, email_rate_per_minute=600)

    job = await run_job(runtime, "email", mail(recipients=recipients(20), chunk_size=7))

    assert job.status == JobStatus.completed, job.error
    times = [m.at for m in smtp_server.handler.messages]
    assert len(times) == 20
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    # 600/min = one every 0.1 s. A single receive time may be late by some milliseconds (a new
    # connection per chunk, the server's thread under load), which shortens one gap and lengthens
    # the next: so the checks are on every window of 3+ gaps (the overall rate among them: no
    # burst hides in a window) and on the typical gap. Unpaced, gaps are ~5 ms: both checks fail.
    for i, j in itertools.combinations(range(20), 2):
        if j - i >= 3:
            assert times[j] - times[i] >= (j - i) * 0.1 - 0.1, (i, j, times[j] - times[i])
    assert statistics.median(gaps) >= 0.09, gaps
    assert times[-1] - times[0] < 19 * 0.1 + 1.5  # paced, not throttled to a crawl


async def test_the_rate_limit_holds_for_two_processes_together(
    runtimes: Runtimes, smtp_server: SmtpServer
) -> None:
    """Two runtimes on one database, each on an event loop (a thread) of its own, stand for two
    worker processes: each sends one job at the same time, and together they keep to the one
    fleet-wide rate (a per-process pacer would let each send 600/min: twice the rate)."""
    first = await runtimes.start(smtp_url=smtp_server.url, email_rate_per_minute=600)

    async def in_another_process() -> JobRow:
        elsewhere = Runtimes(runtimes.db_url, runtimes.tmp_path)
        try:
            second = await elsewhere.start(smtp_url=smtp_server.url, email_rate_per_minute=600)
            return await run_job(second, "email", mail(recipients=recipients(8, "example.org")))
        finally:
            await elsewhere.close()

    jobs = await asyncio.gather(
        run_job(first, "email", mail(recipients=recipients(8))),
        asyncio.to_thread(asyncio.run, in_another_process()),
    )

    assert [job.status for job in jobs] == [JobStatus.completed] * 2
    times = sorted(m.at for m in smtp_server.handler.messages)
    assert len(times) == 16
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    assert statistics.median(gaps) >= 0.09, gaps
    for i, j in itertools.combinations(range(16), 2):
        if j - i >= 3:
            assert times[j] - times[i] >= (j - i) * 0.1 - 0.1, (i, j, gaps)


async def test_connection_refused_is_retried_then_fails(runtimes: Runtimes) -> None:
    port = free_port()  # bound and released: nothing listens there
    runtime = await runtimes.start(smtp_url=f"smtp://127.0.0.1:{port}")

    job = await run_job(runtime, "email", mail(recipients=recipients(2)), max_attempts=2)

    assert job.status == JobStatus.failed
    assert job.attempts == 2
    assert (job.error or "").startswith(
        f"SMTPConnectError: Error connecting to 127.0.0.1 on port {port}")


@pytest.mark.parametrize(("field", "value"), [
    ("subject", "Hello\r\nBcc: everyone@example.com"),
    ("subject", "Hello\nBcc: everyone@example.com"),
    ("subject", "Spring\u2028special"),
    ("recipients", [{"email": "ann@example.com", "name": "Ann\r\nBcc: everyone@example.com"}]),
    ("recipients", [{"email": "ann@example.com\r\nBcc: everyone@example.com"}]),
    ("recipients", [{"email": "ann@example.com>, everyone@example.com"}]),
    ("recipients", [{"email": "not-an-address"}]),
    ("recipients", [{"email": "ann@localhost"}]),
    ("sender", {"email": "x@example.com", "name": "Boss\nBcc: everyone@example.com"}),
])
async def test_header_injection_is_refused_before_anything_is_stored(
    runtimes: Runtimes, field: str, value: Any
) -> None:
    runtime = await runtimes.start()
    payload = mail(recipients=recipients(1))
    payload[field] = value

    with pytest.raises(InvalidPayload) as refused:
        await runtime.queue.enqueue("email", payload)

    assert refused.value.field.startswith(field)
    assert query(runtime.settings.database_url, "SELECT COUNT(*) FROM worker_queue") == [(0,)]


@pytest.mark.parametrize("payload", [
    mail(),
    mail(recipients=recipients(1), segment="opted_in"),
    mail(recipients=[]),
    mail(segment="everyone"),
    mail(recipients=recipients(1), chunk_size=0),
])
async def test_the_audience_must_be_one_list_or_one_segment(
    runtimes: Runtimes, payload: dict[str, Any]
) -> None:
    runtime = await runtimes.start()

    with pytest.raises(InvalidPayload):
        await runtime.queue.enqueue("email", payload)


@pytest.mark.parametrize("payload", [
    mail(),
    mail(recipients=recipients(1), segment="opted_in"),
])
async def test_the_audience_error_names_its_field_like_every_validation_error(
    runtimes: Runtimes, payload: dict[str, Any]
) -> None:
    runtime = await runtimes.start()
    with pytest.raises(InvalidPayload) as refused:
        await runtime.queue.enqueue("email", payload)
    assert refused.value.field == "segment"

    response = await post_task(runtimes.settings(), "email", payload)

    assert response.status_code == 400, response.text
    (error,) = response.json()["extra"]
    assert error["key"] == "segment"
    assert "recipients or segment" in error["message"]
    assert query(runtime.settings.database_url, "SELECT COUNT(*) FROM worker_queue") == [(0,)]


async def test_an_invalid_recipients_list_is_reported_once_under_its_own_name(
    runtimes: Runtimes,
) -> None:
    response = await post_task(runtimes.settings(), "email", mail(recipients=[]))

    assert response.status_code == 400, response.text
    assert [error["key"] for error in response.json()["extra"]] == ["recipients"]


async def test_a_segment_mails_the_opted_in_customers_of_the_tenant(
    runtimes: Runtimes, smtp_server: SmtpServer
) -> None:
    runtime = await runtimes.start(smtp_url=smtp_server.url)
    add_customers(runtime.settings.database_url, [
        ("tenant-1", "Ann Opted", "ann@example.com", True),
        ("tenant-1", "Bo Not", "bo@example.com", False),
        ("tenant-1", "Cy Opted", "cy@example.org", True),
        ("tenant-2", "Di Other", "di@example.com", True),
    ])

    opted_in = await run_job(runtime, "email", mail(segment="opted_in", tenant_id="tenant-1"))
    everyone = await run_job(runtime, "email", mail(segment="all_customers"))

    assert opted_in.result["sent"] == 2
    assert everyone.result["sent"] == 4
    first_two = smtp_server.handler.messages[:2]
    assert [m.message["To"] for m in first_two] == ["Ann Opted <ann@example.com>",
                                                    "Cy Opted <cy@example.org>"]


async def test_the_outbox_maildir_receives_every_message(runtimes: Runtimes, tmp_path: Path) -> None:
    outbox = tmp_path / "mail" / "outbox"
    runtime = await runtimes.start(smtp_url=f"outbox:{outbox}")

    job = await run_job(runtime, "email", mail(recipients=recipients(7), chunk_size=3,
                                               subject="Grüße aus der Waschstraße"))

    assert job.status == JobStatus.completed, job.error
    assert job.result["sent"] == 7
    box = mailbox.Maildir(outbox, create=False)
    messages = list(box)  # iterating a mailbox yields its messages
    assert sorted(str(m["To"]) for m in messages) == sorted(
        f"Customer {i} <customer{i}@example.com>" for i in range(7))
    assert {str(m["Subject"]) for m in messages} == {"=?utf-8?q?Gr=C3=BC=C3=9Fe_aus_der_Waschstra=C3=9Fe?="}


@pytest.mark.parametrize("smtp_server", ["auth"], indirect=True)
async def test_credentials_in_the_url_log_in(runtimes: Runtimes, smtp_server: SmtpServer) -> None:
    runtime = await runtimes.start(smtp_url=f"smtp://carwash:s3cret@127.0.0.1:{smtp_server.port}")

    job = await run_job(runtime, "email", mail(recipients=recipients(3), chunk_size=2))

    assert job.status == JobStatus.completed, job.error
    assert smtp_server.handler.logins == [("carwash", "s3cret")] * 2  # once per connection
    assert len(smtp_server.handler.messages) == 3


@pytest.mark.parametrize("smtp_server", ["auth"], indirect=True)
async def test_a_refused_login_fails_the_job_at_once(
    runtimes: Runtimes, smtp_server: SmtpServer
) -> None:
    runtime = await runtimes.start(smtp_url=f"smtp://carwash:wrong@127.0.0.1:{smtp_server.port}")

    job = await run_job(runtime, "email", mail(recipients=recipients(3)))

    assert job.status == JobStatus.failed
    assert job.attempts == 1
    assert "SMTP login refused" in (job.error or "")
    assert smtp_server.handler.messages == []


@pytest.mark.parametrize("smtp_server", ["auth"], indirect=True)
async def test_a_login_the_server_cannot_check_now_is_retried(
    runtimes: Runtimes, smtp_server: SmtpServer
) -> None:
    """A 454 is temporary (the server's authentication backend is down): it failed the job for
    good, as a wrong password does."""
    smtp_server.handler.auth_reply = "454 4.7.0 Temporary authentication failure"
    runtime = await runtimes.start(smtp_url=f"smtp://carwash:s3cret@127.0.0.1:{smtp_server.port}")
    inserted = await runtime.queue.enqueue("email", mail(recipients=recipients(2)))
    assert runtime.processor is not None
    await runtime.processor.run_until_idle(timeout=10)
    assert "454" in ((await runtime.store.get(inserted.job.id)).error or "")
    smtp_server.handler.auth_reply = None

    job = await settle(runtime, inserted.job.id)

    assert job.status == JobStatus.completed, job.error
    assert job.attempts == 2

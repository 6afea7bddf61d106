"""email: bulk mail to a list or a customer segment, rate limited, never twice to anyone.

Why it is built this way:
- One message per recipient (personal To header), sent in chunks over one SMTP connection per
  chunk: a broken connection costs one reconnect, not a session per message.
- The per-recipient send log (`email_send_log`) is written right after the server accepts each
  message, in its own short transaction. A retry reads the log first and skips everyone in it,
  so a crash or a 4xx mid-chunk re-sends nobody (the only window left is between the server's
  250 and that commit, milliseconds wide). A deterministic Message-ID per (job, recipient) lets
  a receiving system drop even that duplicate.
- Transient trouble (a 4xx to the message, a 421, refused connection, timeouts) fails the
  attempt: the engine retries with backoff and the log makes the retry resume. A 4xx to one
  recipient (a full mailbox, greylisting) defers that recipient only: the rest go on, and the
  attempt then fails so that the next one mails the deferred. A 5xx for one recipient is
  permanent for that recipient only: logged as rejected and reported, the rest go on; but 20
  in a row with one same reply are the server refusing the sender or the message, and fail the
  attempt with those recipients taken back out of the log.
- The rate limit (CARWASH_EMAIL_RATE_PER_MINUTE) holds for the whole fleet: every message
  takes a slot of the "email" pace kept in the database (`ctx.rate_limit`), slots 60/rate
  seconds apart, so N worker processes together still send at the configured rate, evenly
  spaced, and a big list never leaves as a burst that spam filters flag. When the fleet's
  budget is taken for longer than a short wait, the attempt gives its worker slot back
  (RetryLater, not counted) and resumes from the send log later.
- Subject and names are refused at payload validation if they hold CR/LF, addresses are parsed
  with `email.headerregistry.Address`, and messages are built with `EmailMessage` (which refuses
  header line breaks again): no header injection.
- `outbox:PATH` (the embedded default) delivers into a Maildir through `mailbox.Maildir` in a
  worker thread: nothing blocks the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import mailbox
import os
import socket
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import unquote, urlsplit

import aiosmtplib
from pydantic import BaseModel, Field, ValidationInfo, field_validator

from carwash_jobs.errors import LeaseLost, PermanentError
from carwash_jobs.registry import TaskOptions, TaskType
from carwash_jobs.retry import RetryPolicy
from task_types.domain import (
    Segment,
    check_address,
    check_header_text,
    db_timestamp,
    exactly_one_audience,
    in_clause,
    segment_query,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from carwash_jobs.context import JobContext
    from carwash_jobs.settings import Settings
    from carwash_jobs.store.base import Tx, TxFn

DEFAULT_CHUNK_SIZE = 50
DEFAULT_SENDER = ("Car Wash", "no-reply@carwash.example")
SMTP_TIMEOUT_SECONDS = 30.0


# -- payload and result ------------------------------------------------------------------------
class Recipient(BaseModel):
    email: str = Field(max_length=254)
    name: str | None = Field(default=None, max_length=200)

    @field_validator("email")
    @classmethod
    def _email_is_an_address(cls, value: str) -> str:
        return check_address(value)

    @field_validator("name")
    @classmethod
    def _name_fits_a_header(cls, value: str | None) -> str | None:
        return None if value is None else check_header_text(value)


class EmailPayload(BaseModel):
    subject: str = Field(min_length=1, max_length=500)
    body_text: str = Field(max_length=1_000_000)
    body_html: str | None = Field(default=None, max_length=2_000_000)
    recipients: list[Recipient] | None = Field(default=None, min_length=1, max_length=100_000)
    #: validated even when left out: its validator is where "exactly one audience" is checked
    segment: Segment | None = Field(default=None, validate_default=True)
    tenant_id: str | None = Field(default=None, min_length=1, max_length=64)
    chunk_size: int | None = Field(default=None, ge=1, le=1000, description="messages per SMTP connection")
    sender: Recipient | None = Field(default=None, description="the From address; a no-reply default")

    @field_validator("subject")
    @classmethod
    def _subject_fits_a_header(cls, value: str) -> str:
        return check_header_text(value)

    @field_validator("segment")
    @classmethod
    def _one_audience(cls, value: Segment | None, info: ValidationInfo) -> Segment | None:
        return exactly_one_audience(value, info, "recipients")


class RejectedRecipient(BaseModel):
    email: str
    error: str


class EmailResult(BaseModel):
    sent: int  #: sent by this attempt
    skipped: int  #: already sent by an earlier attempt of this job
    rejected: list[RejectedRecipient]  #: refused for good (SMTP 5xx), by any attempt
    recipients: int  #: distinct addresses the job was for


# -- transports --------------------------------------------------------------------------------
class Rejected(Exception):
    """The server refused this one message for good (5xx): report it, go on with the rest."""


class Deferred(Exception):
    """The server refused this one recipient for now (a 4xx to RCPT: a full mailbox,
    greylisting): go on with the rest, and come back for it in the next attempt. Raised on,
    one such recipient failed every attempt at the same place, and nobody after it in the
    list was ever mailed."""


class RecipientsDeferred(Exception):
    """The attempt mailed everyone it could and some recipients were deferred: it fails, by
    the task type's retry policy, and the next attempt mails only those (the send log skips
    the others)."""


class ServerRefusesEveryone(Exception):
    """Recipient after recipient refused with one same reply: the server refuses the sender
    or the message (a block list, relaying denied, a size limit), not these addresses. The
    streak's rejections are taken back out of the send log, so a later attempt (or a retry
    of the failed job, once the server is fixed) mails them."""


class Connection(Protocol):
    async def send(self, message: EmailMessage, sender: str, recipient: str) -> None:
        """Deliver one message; raise Rejected for a permanent refusal of this recipient,
        Deferred for a temporary one, any other exception for trouble that a later attempt may
        not have."""
        ...


class Transport(Protocol):
    def connect(self) -> contextlib.AbstractAsyncContextManager[Connection]: ...


def open_transport(smtp_url: str) -> Transport:
    if smtp_url.startswith("outbox:"):
        return OutboxTransport(smtp_url.removeprefix("outbox:"))
    return SmtpTransport(smtp_url)


class OutboxTransport:
    """A local Maildir: the embedded default, and what a developer reads mail from."""

    def __init__(self, path: str) -> None:
        self.path = path

    @contextlib.asynccontextmanager
    async def connect(self) -> AsyncIterator[Connection]:
        yield _MaildirConnection(await asyncio.to_thread(self._open))

    def _open(self) -> mailbox.Maildir:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        return mailbox.Maildir(self.path, create=True)


@dataclass(slots=True)
class _MaildirConnection:
    box: mailbox.Maildir

    async def send(self, message: EmailMessage, sender: str, recipient: str) -> None:
        await asyncio.to_thread(self.box.add, message)


class SmtpTransport:
    """smtp://[user:pass@]host:port (STARTTLS when the server offers it) or smtps:// (TLS)."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.hostname = parts.hostname or "localhost"
        self.port = parts.port
        self.use_tls = parts.scheme == "smtps"
        self.username = unquote(parts.username) if parts.username else None
        self.password = unquote(parts.password) if parts.password else None

    @contextlib.asynccontextmanager
    async def connect(self) -> AsyncIterator[Connection]:
        client = aiosmtplib.SMTP(
            hostname=self.hostname, port=self.port, username=self.username,
            password=self.password, use_tls=self.use_tls,
            start_tls=False if self.use_tls else None,  # None: upgrade when the server offers it
            timeout=SMTP_TIMEOUT_SECONDS,
            local_hostname=socket.gethostname(),  # the default, getfqdn(), may block on DNS
        )
        try:
            await client.connect()
        except aiosmtplib.SMTPAuthenticationError as exc:
            if not _permanent(exc.code):  # 454: the server cannot check it now
                raise
            raise PermanentError(
                f"SMTP login refused ({exc.code} {exc.message}): check CARWASH_SMTP_URL"
            ) from exc
        try:
            yield _SmtpConnection(client)
        except BaseException:
            client.close()  # no polite QUIT: the server may be the thing that hangs
            raise
        if client.is_connected:
            with contextlib.suppress(aiosmtplib.SMTPException, OSError):
                await client.quit()
        client.close()


@dataclass(slots=True)
class _SmtpConnection:
    client: aiosmtplib.SMTP

    async def send(self, message: EmailMessage, sender: str, recipient: str) -> None:
        try:
            await self.client.send_message(message, sender=sender, recipients=[recipient])
        except aiosmtplib.SMTPRecipientsRefused as exc:
            refused = exc.recipients[0]
            if _permanent(refused.code):
                raise Rejected(f"{refused.code} {refused.message}") from exc
            if refused.code != SERVICE_CLOSING:  # a 421 is the server's, not this address's
                raise Deferred(f"{refused.code} {refused.message}") from exc
            raise
        except aiosmtplib.SMTPDataError as exc:
            if _permanent(exc.code):
                raise Rejected(f"{exc.code} {exc.message}") from exc
            raise
        except aiosmtplib.SMTPSenderRefused as exc:
            if _permanent(exc.code):
                raise PermanentError(
                    f"the server refuses the sender {exc.sender}: {exc.code} {exc.message}"
                ) from exc
            raise


def _permanent(code: int) -> bool:
    return 500 <= code < 600


#: "service not available, closing transmission channel": about the server, whatever command
SERVICE_CLOSING = 421
#: rejections in a row with one same reply that are taken as the server refusing everyone. A
#: mailbox that does not exist is usually named in its reply ("<a@b>: user unknown"), so a
#: run of stale addresses rarely gives one same reply this many times
REJECTION_STREAK_LIMIT = 20


#: the fleet-wide pace every email job takes its send slots from
RATE_LIMIT_NAME = "email"


# -- the handler -------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _To:
    email: str
    name: str | None

    @property
    def key(self) -> str:
        return self.email.lower()


async def send_email(ctx: JobContext, payload: EmailPayload) -> EmailResult:
    settings: Settings = ctx.services["settings"]
    audience = await _audience(ctx, payload)
    earlier = await ctx.transaction(_read_log(ctx.job_id))  # what earlier attempts did
    skipped = sum(1 for r in audience if r.key in earlier and earlier[r.key][0] == "sent")
    rejected = [RejectedRecipient(email=r.email, error=earlier[r.key][1] or "")
                for r in audience if r.key in earlier and earlier[r.key][0] == "rejected"]
    pending = [r for r in audience if r.key not in earlier]
    total, done = len(audience), len(audience) - len(pending)
    await ctx.progress(done, total)

    transport = open_transport(settings.smtp_url)
    limit = ctx.rate_limit(RATE_LIMIT_NAME, settings.email_rate_per_minute)
    sender = (_address(payload.sender.email, payload.sender.name) if payload.sender
              else _address(DEFAULT_SENDER[1], DEFAULT_SENDER[0]))
    sent = 0
    deferred: list[tuple[_To, str]] = []
    streak: list[_To] = []  #: the latest rejections in a row, all with the reply `streak_reply`
    streak_reply = ""
    size = payload.chunk_size or DEFAULT_CHUNK_SIZE
    for start in range(0, len(pending), size):
        async with transport.connect() as conn:
            for to in pending[start:start + size]:
                if ctx.cancelled():
                    raise LeaseLost()
                message = build_message(payload, sender, to, ctx.job_id)
                await limit.wait(remaining=total - done)
                try:
                    await conn.send(message, sender.addr_spec, to.email)
                except Deferred as exc:
                    deferred.append((to, str(exc)))
                    continue
                except Rejected as exc:
                    await ctx.transaction(_log(ctx.job_id, to, "rejected", str(exc)))
                    rejected.append(RejectedRecipient(email=to.email, error=str(exc)))
                    streak = [*streak, to] if str(exc) == streak_reply else [to]
                    streak_reply = str(exc)
                    if len(streak) >= REJECTION_STREAK_LIMIT:
                        await ctx.transaction(_unlog(ctx.job_id, streak))
                        raise ServerRefusesEveryone(
                            f"the server refused {len(streak)} recipients in a row with the "
                            f"same reply ({streak_reply}): taken as a refusal of the sender or "
                            "the message, not of the recipients, who are mailed on a retry"
                        ) from exc
                else:
                    await ctx.transaction(_log(ctx.job_id, to, "sent", None))
                    sent += 1
                    streak = []
                done += 1
                await ctx.progress(done, total)
    await ctx.progress(done, total)
    if deferred:
        first, reply = deferred[0]
        raise RecipientsDeferred(
            f"the server deferred {len(deferred)} of {len(pending)} recipients "
            f"(first {first.email}: {reply}); the next attempt mails only those"
        )
    return EmailResult(sent=sent, skipped=skipped, rejected=rejected, recipients=total)


async def _audience(ctx: JobContext, payload: EmailPayload) -> list[_To]:
    """The distinct recipients (first mention wins), from the payload or the segment."""
    if payload.recipients is not None:
        candidates = [_To(r.email, r.name) for r in payload.recipients]
    else:
        assert payload.segment is not None
        sql, params = segment_query(payload.segment, payload.tenant_id)

        async def read(tx: Tx) -> list[dict[str, Any]]:
            return await tx.fetch(sql, params)

        candidates = []
        for row in await ctx.transaction(read):
            try:  # customers are written by other systems: skip what cannot be mailed
                candidates.append(_To(check_address(row["email"]), check_header_text(row["name"])))
            except ValueError as exc:
                ctx.logger.warning("customer %s skipped: %s", row["id"], exc)
    unique: dict[str, _To] = {}
    for to in candidates:
        unique.setdefault(to.key, to)
    return list(unique.values())


def _address(email: str, name: str | None) -> Address:
    return Address(display_name=name or "", addr_spec=email)


def build_message(payload: EmailPayload, sender: Address, to: _To, job_id: str) -> EmailMessage:
    message = EmailMessage()
    message["From"] = sender
    message["To"] = _address(to.email, to.name)
    message["Subject"] = payload.subject
    message["Date"] = format_datetime(datetime.now(UTC))
    digest = hashlib.sha256(to.key.encode()).hexdigest()[:12]
    message["Message-ID"] = f"<{job_id}.{digest}@{sender.domain}>"
    message.set_content(payload.body_text)
    if payload.body_html is not None:
        message.add_alternative(payload.body_html, subtype="html")
    return message


_READ_LOG = "SELECT email, status, error FROM email_send_log WHERE job_id = :job_id"
_WRITE_LOG = """
INSERT INTO email_send_log (job_id, email, status, error, at)
VALUES (:job_id, :email, :status, :error, :at)
ON CONFLICT (job_id, email) DO NOTHING
"""


def _read_log(job_id: str) -> TxFn[dict[str, tuple[str, str | None]]]:
    async def read(tx: Tx) -> dict[str, tuple[str, str | None]]:
        rows = await tx.fetch(_READ_LOG, {"job_id": job_id})
        return {row["email"]: (row["status"], row["error"]) for row in rows}

    return read


def _unlog(job_id: str, recipients: list[_To]) -> TxFn[None]:
    async def delete(tx: Tx) -> None:
        keys, params = in_clause("email", [to.key for to in recipients])
        await tx.execute(f"DELETE FROM email_send_log WHERE job_id = :job_id AND email IN {keys}",
                         {"job_id": job_id, **params})

    return delete


def _log(job_id: str, to: _To, status: str, error: str | None) -> TxFn[None]:
    async def write(tx: Tx) -> None:
        await tx.execute(_WRITE_LOG, {
            "job_id": job_id, "email": to.key, "status": status, "error": error,
            "at": db_timestamp(tx.dialect, datetime.now(UTC)),
        })

    return write


TASK_TYPE: TaskType[EmailPayload, EmailResult] = TaskType(
    name="email",
    payload_model=EmailPayload,
    handler=send_email,
    result_model=EmailResult,
    options=TaskOptions(
        max_attempts=8,
        queue="bulk",
        timeout=timedelta(hours=6),
        retry=RetryPolicy(base_seconds=30.0, max_seconds=1800.0),
    ),
    description="Bulk mail to a list or a customer segment: chunked, rate limited, per-recipient "
                "send log so a retry mails nobody twice.",
    examples=[{
        "subject": "Spring special: 20% off every wash",
        "body_text": "Show this mail at the till.",
        "segment": "opted_in", "tenant_id": "tenant-1",
    }],
)

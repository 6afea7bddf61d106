"""The car-wash domain tables and the small helpers the task types share.

Task types never import each other (an import-linter contract), yet email and customer_credits
both read customers, and the reporting tables are fed by financial_sync while the POS table is
filled by the demo data. So every domain table lives here, declared once with SQLModel; the
migration `0002_domain_tables` creates them and a test keeps the two equal. Handlers query the
tables with portable SQL through `Tx` (`:name` parameters, `INSERT ... ON CONFLICT`), so values
cross the driver boundary through `db_timestamp` / `db_date`: sqlite3 gets text in the engine's
sortable UTC format, asyncpg gets the `datetime` / `date` objects it insists on.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from email.headerregistry import Address
from typing import TYPE_CHECKING, Any, Literal

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

if TYPE_CHECKING:
    from pydantic import ValidationInfo

_TS = sa.DateTime(timezone=True)
#: the engine's timestamp text on SQLite: UTC, fixed width, so it sorts as a string
SQLITE_TIMESTAMP_FORMAT = "%Y-%m-%d %H:%M:%S.%f"

Segment = Literal["all_customers", "opted_in"]
#: what employees may be: the file_upload import refuses any other role
EMPLOYEE_ROLES = ("washer", "detailer", "cashier", "manager", "attendant")


class Customer(SQLModel, table=True):
    """A customer of one tenant (a car-wash business); email and credits address them."""

    __tablename__ = "customers"
    __table_args__ = (
        sa.UniqueConstraint("tenant_id", "email", name="uq_customers_tenant_email"),
        sa.Index("ix_customers_tenant_opt_in", "tenant_id", "marketing_opt_in"),
    )

    id: int | None = Field(default=None, primary_key=True)
    tenant_id: str = Field(max_length=64)
    name: str = Field(max_length=200)
    email: str = Field(max_length=320)
    marketing_opt_in: bool = False  #: consented to marketing mail: the "opted_in" segment
    created_at: datetime = Field(sa_column=sa.Column(_TS, nullable=False))


class CreditLedger(SQLModel, table=True):
    """One credit granted to one customer; a customer's balance is the sum of their rows.

    (job_id, customer_id) is unique: a grant job writes each customer at most once, however
    often its completion is attempted."""

    __tablename__ = "credit_ledger"
    __table_args__ = (
        sa.UniqueConstraint("job_id", "customer_id", name="uq_credit_ledger_job_customer"),
        sa.Index("ix_credit_ledger_customer", "customer_id"),
    )

    id: int | None = Field(default=None, primary_key=True)
    job_id: str = Field(max_length=32)
    customer_id: int = Field(foreign_key="customers.id")
    amount_cents: int
    reason: str = Field(max_length=200)
    created_at: datetime = Field(sa_column=sa.Column(_TS, nullable=False))


class EmailSendLog(SQLModel, table=True):
    """What an email job did per recipient, so a retry skips whoever already has the mail."""

    __tablename__ = "email_send_log"

    job_id: str = Field(primary_key=True, max_length=32)
    email: str = Field(primary_key=True, max_length=320)  #: lower-cased address
    status: str = Field(max_length=16)  #: 'sent' or 'rejected' (a permanent 5xx)
    error: str | None = Field(default=None, sa_column=sa.Column(sa.Text, nullable=True))
    at: datetime = Field(sa_column=sa.Column(_TS, nullable=False))


#: the employees table's text columns an import fills from a CSV field, and their lengths
EMPLOYEE_NO_MAX_LENGTH = 64
NAME_MAX_LENGTH = 100


class Employee(SQLModel, table=True):
    """Staff of one tenant, keyed by employee_no; the CSV import upserts them.

    created_by_job is set on insert only and updated_by_job on every write, so an import can
    count its inserts exactly even when a chunk is written twice after a crash."""

    __tablename__ = "employees"
    __table_args__ = (
        sa.UniqueConstraint("tenant_id", "employee_no", name="uq_employees_tenant_employee_no"),
    )

    id: int | None = Field(default=None, primary_key=True)
    tenant_id: str = Field(max_length=64)
    employee_no: str = Field(max_length=EMPLOYEE_NO_MAX_LENGTH)
    first_name: str = Field(max_length=NAME_MAX_LENGTH)
    last_name: str = Field(max_length=NAME_MAX_LENGTH)
    email: str = Field(max_length=320)
    role: str = Field(max_length=32)
    hourly_rate_cents: int  #: money as integer cents, like every amount in this domain
    hired_on: date
    created_by_job: str | None = Field(default=None, max_length=32)
    updated_by_job: str | None = Field(default=None, max_length=32)
    updated_at: datetime = Field(sa_column=sa.Column(_TS, nullable=False))


class PosTransaction(SQLModel, table=True):
    """A sale at a point-of-sale terminal, as the financial database records it.

    It lives in CARWASH_FINANCIAL_DATABASE_URL (by default the main database). No foreign key
    to customers: that database may be another server. `id` only grows, which makes it the
    sync cursor."""

    __tablename__ = "pos_transactions"
    __table_args__ = (sa.Index("ix_pos_transactions_tenant_id", "tenant_id", "id"),)

    id: int | None = Field(default=None, primary_key=True)
    tenant_id: str = Field(max_length=64)
    occurred_at: datetime = Field(sa_column=sa.Column(_TS, nullable=False))
    package: str = Field(max_length=64)
    amount_cents: int
    payment_method: str = Field(max_length=16)
    customer_id: int | None = None


class ReportingTransaction(SQLModel, table=True):
    """A POS transaction copied into reporting; an upsert keyed by its POS id, so re-syncing
    a row changes nothing. sync_job_id tells a full resync which rows it did not see."""

    __tablename__ = "reporting_transactions"
    __table_args__ = (
        sa.Index("ix_reporting_transactions_day", "tenant_id", "business_date"),
    )

    tenant_id: str = Field(primary_key=True, max_length=64)
    pos_transaction_id: int = Field(primary_key=True)
    occurred_at: datetime = Field(sa_column=sa.Column(_TS, nullable=False))
    business_date: date  #: the UTC date of occurred_at
    package: str = Field(max_length=64)
    amount_cents: int
    payment_method: str = Field(max_length=16)
    sync_job_id: str = Field(max_length=32)
    synced_at: datetime = Field(sa_column=sa.Column(_TS, nullable=False))


class ReportingDailyTotal(SQLModel, table=True):
    """Per tenant and day: recomputed from reporting_transactions, never incremented, so a
    chunk synced twice cannot count twice."""

    __tablename__ = "reporting_daily_totals"

    tenant_id: str = Field(primary_key=True, max_length=64)
    business_date: date = Field(primary_key=True)
    transactions: int
    revenue_cents: int = Field(sa_column=sa.Column(sa.BigInteger, nullable=False))
    updated_at: datetime = Field(sa_column=sa.Column(_TS, nullable=False))


class FinancialSyncState(SQLModel, table=True):
    """Where the last sync of a tenant got to: the next incremental job starts after it."""

    __tablename__ = "financial_sync_state"

    tenant_id: str = Field(primary_key=True, max_length=64)
    last_transaction_id: int  #: the cursor: POS transaction ids up to this one are synced
    last_job_id: str = Field(max_length=32)
    updated_at: datetime = Field(sa_column=sa.Column(_TS, nullable=False))


# -- values across drivers ---------------------------------------------------------------------
def exactly_one_audience(
    value: Segment | None, info: ValidationInfo, listed: str
) -> Segment | None:
    """A `segment` field validator's body: exactly one of the `listed` field and segment.

    A check on the whole model would raise an error with no field in it, so the 400 would
    lack the `key` every other validation error carries: it is made on `segment` instead,
    which must be declared after `listed` (pydantic validates fields in order)."""
    if listed not in info.data:
        return value  # the listed field was wrong itself: that error is reported already
    if (info.data[listed] is None) == (value is None):
        raise ValueError(f"give either {listed} or segment (exactly one)")
    return value


def db_timestamp(dialect: str, value: datetime) -> str | datetime:
    """A timestamp as the driver of `dialect` wants it (naive values are taken as UTC)."""
    aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    if dialect == "sqlite":
        return aware.astimezone(UTC).strftime(SQLITE_TIMESTAMP_FORMAT)
    return aware


def db_date(dialect: str, value: date) -> str | date:
    return value.isoformat() if dialect == "sqlite" else value


def parse_timestamp(value: str | datetime) -> datetime:
    """A timestamp read back from either driver, as an aware UTC datetime."""
    parsed = datetime.fromisoformat(value) if isinstance(value, str) else value
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def parse_date(value: str | date) -> date:
    if isinstance(value, datetime):
        return value.date()
    return date.fromisoformat(value) if isinstance(value, str) else value


# -- shared validation and queries ---------------------------------------------------------------
def check_address(value: str) -> str:
    """Validate one email address (ASCII addr-spec with a dotted domain); return it stripped.

    Raises ValueError with the reason: a pydantic validator turns that into a 4xx naming the
    field, and the CSV import into a rejected line. CR/LF can never pass, so no address can
    smuggle a header into a message."""
    address = value.strip()
    if not address:
        raise ValueError("is empty")
    if any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in address):
        raise ValueError(f"{address!r} contains whitespace or control characters")
    if not address.isascii():
        raise ValueError(f"{address!r} is not ASCII (internationalised addresses are not supported)")
    if len(address) > 254:
        raise ValueError("is longer than 254 characters")
    try:
        parsed = Address(addr_spec=address)
    except Exception as exc:  # the header parser raises several kinds (even IndexError)
        raise ValueError(f"{address!r} is not a valid email address") from exc
    if parsed.addr_spec != address or not parsed.username or "." not in parsed.domain.strip("."):
        raise ValueError(f"{address!r} is not a valid email address")
    return address


#: CR, LF, and the line breaks of str.splitlines() beyond the ASCII controls: the mail library
#: refuses a header value that splits into lines
_LINE_BREAKS = frozenset("\r\n\x85\u2028\u2029")


def check_header_text(value: str) -> str:
    """Refuse text bound for a mail header (subject, display name) that could inject one."""
    if any(ch in _LINE_BREAKS for ch in value):
        raise ValueError("must not contain line breaks (CR, LF, U+0085, U+2028 or U+2029)")
    if any((ord(ch) < 32 and ch != "\t") or ord(ch) == 127 for ch in value):
        raise ValueError("must not contain control characters")
    return value


def segment_query(segment: Segment, tenant_id: str | None) -> tuple[str, dict[str, Any]]:
    """The customers of a segment, oldest first: (sql, params) for `Tx.fetch`."""
    clauses: list[str] = []
    params: dict[str, Any] = {}
    if tenant_id is not None:
        clauses.append("tenant_id = :tenant_id")
        params["tenant_id"] = tenant_id
    if segment == "opted_in":
        clauses.append("marketing_opt_in = :opted_in")
        params["opted_in"] = True
    where = " AND ".join(clauses) or "1 = 1"
    return f"SELECT id, tenant_id, name, email FROM customers WHERE {where} ORDER BY id", params


def in_clause(name: str, values: list[Any]) -> tuple[str, dict[str, Any]]:
    """`(:name_0, :name_1, ...)` and its parameters: portable SQL has no list parameter."""
    params = {f"{name}_{i}": value for i, value in enumerate(values)}
    return "(" + ", ".join(f":{key}" for key in params) + ")", params

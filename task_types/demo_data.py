"""Realistic sample data for the car-wash domain, behind `carwash-jobs demo-data`.

Tenants `tenant-1` .. `tenant-N`; customers spread over them (names from several languages,
example.com/example.org addresses, about 60 % opted in to marketing); employees per tenant with
roles and role-typical hourly rates; POS transactions over the last 90 days, busier at weekends
and around noon, for the wash packages a car wash sells. Seeded, so the same counts make the
same people: customers and employees are inserted with ON CONFLICT DO NOTHING and a second run
adds only new POS transactions. Written in batches, one transaction each, with a rich progress
bar; the POS rows go to the financial database when one is configured.
"""

from __future__ import annotations

import random
import unicodedata
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from sqlalchemy.ext.asyncio import create_async_engine

from carwash_jobs.database import open_database
from task_types.domain import PosTransaction, db_date, db_timestamp

if TYPE_CHECKING:
    from collections.abc import Callable

    from carwash_jobs.database import Database
    from carwash_jobs.store.base import Tx

BATCH = 500

FIRST_NAMES = (
    "Emma", "Liam", "Olivia", "Noah", "Sophie", "Lucas", "Mia", "Daan", "Zoë", "José", "Chloé",
    "Jürgen", "Søren", "Ana", "Mateo", "Aisha", "Yuki", "Priya", "Omar", "Fatima", "Lars",
    "Ingrid", "Björn", "Élodie", "Marta", "Kenji", "Wei", "Nadia", "Tomás", "Eilidh",
)
LAST_NAMES = (
    "de Vries", "Jansen", "Smith", "García", "Müller", "Dubois", "Rossi", "Kowalski", "Nguyen",
    "O'Brien", "Johansson", "Öztürk", "Novák", "Silva", "Tanaka", "Patel", "Haddad", "Bakker",
    "Andersen", "Fernández", "Łukasik", "Ødegaard", "Schäfer", "Moreau", "Khan",
)
DOMAINS = ("example.com", "example.org", "example.net")
#: (role, weight, (lowest, highest) hourly rate in cents)
ROLES = (("washer", 50, (1300, 1700)), ("detailer", 20, (1600, 2200)),
         ("cashier", 20, (1400, 1800)), ("manager", 10, (2400, 3400)))
#: (package, price in cents, weight)
PACKAGES = (("Basic Wash", 999, 40), ("Deluxe Wash", 1499, 25), ("Ultimate Shine", 2199, 15),
            ("Interior Clean", 2999, 8), ("Full Detail", 14999, 3), ("Monthly Unlimited", 3499, 6),
            ("Tire Shine Add-on", 399, 3))
PAYMENT_METHODS = (("card", 55), ("mobile", 20), ("cash", 15), ("membership", 10))


@dataclass(frozen=True, slots=True)
class DemoCounts:
    tenants: int
    customers: int  #: rows inserted now (existing ones are kept)
    employees: int
    transactions: int


async def make_demo_data(
    database_url: str,
    *,
    tenants: int = 3,
    customers: int = 300,
    employees: int = 30,
    transactions: int = 5000,
    progress: bool = True,
    financial_database_url: str | None = None,
    seed: int = 20261124,
) -> DemoCounts:
    """Fill the domain tables of a migrated database with sample data."""
    if min(tenants, customers, employees, transactions) < 0 or tenants < 1:
        raise ValueError("counts must be >= 0, and there must be at least one tenant")
    rng = random.Random(seed)
    now = datetime.now(UTC)
    names = [f"tenant-{i}" for i in range(1, tenants + 1)]
    if financial_database_url is not None:
        await _create_pos_table(financial_database_url)
    with Progress(TextColumn("{task.description:<14}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), disable=not progress) as bar:
        async with await open_database(database_url) as main:
            made_customers = await _in_batches(
                main, bar, "customers", _customers(rng, names, customers, now))
            made_employees = await _in_batches(
                main, bar, "employees", _employees(rng, names, employees, now))
            customer_ids = await _customers_by_tenant(main, names)
        pos_url = financial_database_url or database_url
        async with await open_database(pos_url) as pos:
            made_transactions = await _in_batches(
                pos, bar, "transactions", _transactions(rng, names, customer_ids, transactions, now))
    return DemoCounts(tenants, made_customers, made_employees, made_transactions)


@dataclass(frozen=True, slots=True)
class _Rows:
    sql: str
    rows: list[Callable[[str], dict[str, Any]]]  #: each row, given the dialect


async def _in_batches(db: Database, bar: Progress, label: str, rows: _Rows) -> int:
    """Write the rows, BATCH per transaction; returns how many were inserted."""
    task = bar.add_task(label, total=len(rows.rows))
    written = 0
    for start in range(0, len(rows.rows), BATCH):
        batch = rows.rows[start:start + BATCH]

        async def write(tx: Tx, batch: list[Callable[[str], dict[str, Any]]] = batch) -> int:
            count = 0
            for make in batch:
                count += await tx.execute(rows.sql, make(tx.dialect))
            return count

        written += await db.transaction(write)
        bar.advance(task, len(batch))
    return written


def _ascii(text: str) -> str:
    """An email-safe local part from a name: Zoë -> zoe, Ødegaard -> odegaard, de Vries -> devries."""
    folded = text.replace("Ø", "O").replace("ø", "o").replace("Ł", "L").replace("ł", "l")
    plain = unicodedata.normalize("NFKD", folded).encode("ascii", "ignore").decode()
    return "".join(ch for ch in plain.lower() if ch.isalnum())


def _customers(rng: random.Random, tenants: list[str], count: int, now: datetime) -> _Rows:
    sql = """
    INSERT INTO customers (tenant_id, name, email, marketing_opt_in, created_at)
    VALUES (:tenant_id, :name, :email, :opt_in, :created_at)
    ON CONFLICT (tenant_id, email) DO NOTHING
    """
    rows = []
    for n in range(count):
        first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
        email = f"{_ascii(first)}.{_ascii(last)}{n + 1}@{rng.choice(DOMAINS)}"
        values = {"tenant_id": tenants[n % len(tenants)], "name": f"{first} {last}",
                  "email": email, "opt_in": rng.random() < 0.6}
        created = now - timedelta(days=rng.randint(0, 3 * 365), seconds=rng.randint(0, 86_399))
        rows.append(_with_time(values, "created_at", created))
    return _Rows(sql, rows)


def _employees(rng: random.Random, tenants: list[str], count: int, now: datetime) -> _Rows:
    sql = """
    INSERT INTO employees (tenant_id, employee_no, first_name, last_name, email, role,
      hourly_rate_cents, hired_on, created_by_job, updated_by_job, updated_at)
    VALUES (:tenant_id, :employee_no, :first_name, :last_name, :email, :role, :rate, :hired_on,
      NULL, NULL, :updated_at)
    ON CONFLICT (tenant_id, employee_no) DO NOTHING
    """
    rows = []
    for n in range(count):
        tenant = tenants[n % len(tenants)]
        number = n // len(tenants) + 1
        first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
        role, _, (low, high) = rng.choices(ROLES, weights=[r[1] for r in ROLES])[0]
        hired = (now - timedelta(days=rng.randint(14, 6 * 365))).date()
        values = {"tenant_id": tenant, "employee_no": f"E{number:04d}", "first_name": first,
                  "last_name": last, "role": role, "rate": rng.randrange(low, high + 1, 25),
                  "email": f"{_ascii(first)}.{_ascii(last)}.{number}@{tenant}.example.com"}
        rows.append(_with_date(_with_time(values, "updated_at", now), "hired_on", hired))
    return _Rows(sql, rows)


def _transactions(rng: random.Random, tenants: list[str], customers: dict[str, list[int]],
                  count: int, now: datetime) -> _Rows:
    sql = """
    INSERT INTO pos_transactions (tenant_id, occurred_at, package, amount_cents, payment_method,
      customer_id)
    VALUES (:tenant_id, :occurred_at, :package, :amount_cents, :payment_method, :customer_id)
    """
    package_weights = [p[2] for p in PACKAGES]
    method_weights = [m[1] for m in PAYMENT_METHODS]
    when = sorted(_sale_time(rng, now) for _ in range(count))  # ids grow with time, as at a till
    rows = []
    for at in when:
        tenant = rng.choice(tenants)
        package, price, _ = rng.choices(PACKAGES, weights=package_weights)[0]
        known = customers.get(tenant) or []
        values = {"tenant_id": tenant, "package": package, "amount_cents": price,
                  "payment_method": rng.choices(PAYMENT_METHODS, weights=method_weights)[0][0],
                  "customer_id": rng.choice(known) if known and rng.random() < 0.4 else None}
        rows.append(_with_time(values, "occurred_at", at))
    return _Rows(sql, rows)


def _sale_time(rng: random.Random, now: datetime) -> datetime:
    """A moment in the last 90 days: open 07:00-20:00, busier at weekends and around noon."""
    while True:
        day = (now - timedelta(days=rng.randint(0, 89))).date()
        if day.weekday() >= 5 or rng.random() < 0.6:
            break
    hour = min(max(int(rng.gauss(13, 3)), 7), 19)
    at = datetime(day.year, day.month, day.day, hour, rng.randint(0, 59), rng.randint(0, 59),
                  tzinfo=UTC)
    return min(at, now)


def _with_time(values: dict[str, Any], key: str, at: datetime) -> Callable[[str], dict[str, Any]]:
    return lambda dialect: {**values, key: db_timestamp(dialect, at)}


def _with_date(make: Callable[[str], dict[str, Any]], key: str,
               day: date) -> Callable[[str], dict[str, Any]]:
    return lambda dialect: {**make(dialect), key: db_date(dialect, day)}


async def _customers_by_tenant(db: Database, tenants: list[str]) -> dict[str, list[int]]:
    rows = await db.fetch("SELECT id, tenant_id FROM customers ORDER BY id")
    wanted = set(tenants)
    found: dict[str, list[int]] = {}
    for row in rows:
        if row["tenant_id"] in wanted:
            found.setdefault(row["tenant_id"], []).append(int(row["id"]))
    return found


async def _create_pos_table(url: str) -> None:
    """A separate financial database may be empty: give it the POS table (and nothing else)."""
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            table = PosTransaction.metadata.tables["pos_transactions"]
            await conn.run_sync(
                lambda sync: PosTransaction.metadata.create_all(sync, tables=[table], checkfirst=True)
            )
    finally:
        await engine.dispose()

"""demo-data: realistic, seeded sample data for every domain table, and the CLI command behind it."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import pytest

from carwash_jobs import cli
from task_types.demo_data import PACKAGES, ROLES, DemoCounts, make_demo_data
from tests.task_types.support import query, sqlite_url

if TYPE_CHECKING:
    from pathlib import Path


async def test_demo_data_fills_every_table_realistically(db_url: str) -> None:
    made = await make_demo_data(db_url, tenants=3, customers=40, employees=12,
                                transactions=300, progress=False)

    assert made == DemoCounts(tenants=3, customers=40, employees=12, transactions=300)
    assert query(db_url, "SELECT tenant_id, COUNT(*) FROM customers GROUP BY tenant_id") == [
        ("tenant-1", 14), ("tenant-2", 13), ("tenant-3", 13)]
    opted_in = query(db_url, "SELECT COUNT(*) FROM customers WHERE marketing_opt_in")[0][0]
    assert 0 < opted_in < 40
    assert all("@example." in email for (email,) in query(db_url, "SELECT email FROM customers"))
    roles = {role for (role,) in query(db_url, "SELECT DISTINCT role FROM employees")}
    assert roles <= {r[0] for r in ROLES}
    assert query(db_url, "SELECT tenant_id, COUNT(*) FROM employees GROUP BY tenant_id") == [
        ("tenant-1", 4), ("tenant-2", 4), ("tenant-3", 4)]
    prices = {p[0]: p[1] for p in PACKAGES}
    sales = query(db_url, "SELECT package, amount_cents, occurred_at, tenant_id FROM pos_transactions")
    assert len(sales) == 300
    assert all(prices[package] == amount for package, amount, _, _ in sales)
    earliest = (datetime.now(UTC) - timedelta(days=91)).strftime("%Y-%m-%d")
    assert min(s[2] for s in sales) >= earliest
    assert {s[3] for s in sales} == {"tenant-1", "tenant-2", "tenant-3"}


async def test_a_second_run_keeps_the_people_and_adds_sales(db_url: str) -> None:
    await make_demo_data(db_url, tenants=2, customers=10, employees=4, transactions=20,
                         progress=False)

    again = await make_demo_data(db_url, tenants=2, customers=10, employees=4, transactions=20,
                                 progress=False)

    assert again == DemoCounts(tenants=2, customers=0, employees=0, transactions=20)
    assert query(db_url, "SELECT COUNT(*) FROM pos_transactions") == [(40,)]


async def test_the_demo_data_command_migrates_and_fills_the_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    url = sqlite_url(tmp_path / "fresh.db")
    monkeypatch.setenv("CARWASH_DATABASE_URL", url)

    code = await _run_cli(["demo-data", "--tenants", "2", "--customers", "5", "--employees", "2",
                           "--transactions", "7"])

    assert code == 0
    assert '"customers": 5' in capsys.readouterr().out
    assert query(url, "SELECT COUNT(*) FROM pos_transactions") == [(7,)]


async def _run_cli(argv: list[str]) -> int:
    """cli.main runs its own event loop: give it a thread of its own."""
    return await asyncio.to_thread(cli.main, argv)


def test_the_demo_data_command_refuses_zero_tenants(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["demo-data", "--tenants", "0"])

    assert "must be at least 1" in capsys.readouterr().err

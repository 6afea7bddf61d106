"""Car-wash domain tables, used by the task types.

Customers, the credit ledger, the email send log, employees, POS transactions, the reporting
tables and the financial sync state.

Hand-written to match task_types/domain.py (tests/task_types/test_domain.py compares the migrated
database with those SQLModel declarations). A migration never imports application code.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import sqlalchemy as sa
from alembic import op

if TYPE_CHECKING:
    from collections.abc import Sequence

# revision identifiers, used by Alembic.
revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    ts = sa.DateTime(timezone=True)
    op.create_table(
        "customers",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("tenant_id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("email", sa.String(length=320), nullable=False),
        sa.Column("marketing_opt_in", sa.Boolean(), nullable=False),
        sa.Column("created_at", ts, nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("tenant_id", "email", name="uq_customers_tenant_email"),
    )
    op.create_index("ix_customers_tenant_opt_in", "customers", ["tenant_id", "marketing_opt_in"])

    op.create_table(
        "credit_ledger",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(length=32), nullable=False),
        sa.Column("customer_id", sa.Integer(), nullable=False),
        sa.Column("amount_cents", sa.Integer(), nullable=False),
        sa.Column("reason", sa.String(length=200), nullable=False),
        sa.Column("created_at", ts, nullable=False),
        sa.ForeignKeyConstraint(["customer_id"], ["customers.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("job_id", "customer_id", name="uq_credit_ledger_job_customer"),
    )
    op.create_index("ix_credit_ledger_customer", "credit_ledger", ["customer_id"])

    op.create_table(
        "email_send_log",
        sa.Column("job_id", sa.String(length=32), nullable=False),
        sa.Column("email", sa.String(length=320), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("at", ts, nullable=False),
        sa.PrimaryKeyConstraint("job_id", "email"),
    )

    op.create_table(
        "employees",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("tenant_id", sa.String(length=64), nullable=False),
        sa.Column("employee_no", sa.String(length=64), nullable=False),
        sa.Column("first_name", sa.String(length=100), nullable=False),
        sa.Column("last_name", sa.String(length=100), nullable=False),
        sa.Column("email", sa.String(length=320), nullable=False),
        sa.Column("role", sa.String(length=32), nullable=False),
        sa.Column("hourly_rate_cents", sa.Integer(), nullable=False),
        sa.Column("hired_on", sa.Date(), nullable=False),
        sa.Column("created_by_job", sa.String(length=32), nullable=True),
        sa.Column("updated_by_job", sa.String(length=32), nullable=True),
        sa.Column("updated_at", ts, nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("tenant_id", "employee_no", name="uq_employees_tenant_employee_no"),
    )

    op.create_table(
        "pos_transactions",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("tenant_id", sa.String(length=64), nullable=False),
        sa.Column("occurred_at", ts, nullable=False),
        sa.Column("package", sa.String(length=64), nullable=False),
        sa.Column("amount_cents", sa.Integer(), nullable=False),
        sa.Column("payment_method", sa.String(length=16), nullable=False),
        sa.Column("customer_id", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_pos_transactions_tenant_id", "pos_transactions", ["tenant_id", "id"])

    op.create_table(
        "reporting_transactions",
        sa.Column("tenant_id", sa.String(length=64), nullable=False),
        sa.Column("pos_transaction_id", sa.Integer(), nullable=False),
        sa.Column("occurred_at", ts, nullable=False),
        sa.Column("business_date", sa.Date(), nullable=False),
        sa.Column("package", sa.String(length=64), nullable=False),
        sa.Column("amount_cents", sa.Integer(), nullable=False),
        sa.Column("payment_method", sa.String(length=16), nullable=False),
        sa.Column("sync_job_id", sa.String(length=32), nullable=False),
        sa.Column("synced_at", ts, nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "pos_transaction_id"),
    )
    op.create_index(
        "ix_reporting_transactions_day", "reporting_transactions", ["tenant_id", "business_date"]
    )

    op.create_table(
        "reporting_daily_totals",
        sa.Column("tenant_id", sa.String(length=64), nullable=False),
        sa.Column("business_date", sa.Date(), nullable=False),
        sa.Column("transactions", sa.Integer(), nullable=False),
        sa.Column("revenue_cents", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", ts, nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "business_date"),
    )

    op.create_table(
        "financial_sync_state",
        sa.Column("tenant_id", sa.String(length=64), nullable=False),
        sa.Column("last_transaction_id", sa.Integer(), nullable=False),
        sa.Column("last_job_id", sa.String(length=32), nullable=False),
        sa.Column("updated_at", ts, nullable=False),
        sa.PrimaryKeyConstraint("tenant_id"),
    )


def downgrade() -> None:
    op.drop_table("financial_sync_state")
    op.drop_table("reporting_daily_totals")
    op.drop_index("ix_reporting_transactions_day", table_name="reporting_transactions")
    op.drop_table("reporting_transactions")
    op.drop_index("ix_pos_transactions_tenant_id", table_name="pos_transactions")
    op.drop_table("pos_transactions")
    op.drop_table("employees")
    op.drop_table("email_send_log")
    op.drop_index("ix_credit_ledger_customer", table_name="credit_ledger")
    op.drop_table("credit_ledger")
    op.drop_index("ix_customers_tenant_opt_in", table_name="customers")
    op.drop_table("customers")

"""file_upload: import an employee CSV (the file the HTTP layer stored) into `employees`.

Reading: UTF-8 with or without BOM, LF or CRLF, RFC 4180 quoting (fields with commas, quotes
and line breaks). Parsing runs in a worker thread (`asyncio.to_thread`): a 10 MB file must not
hold the event loop. Line numbers are *physical* lines of the file (the header is line 1; a
record whose quoted field spans lines is reported at the line it starts on), so a rejected row
can be found in an editor. A file that is not UTF-8, not CSV, or lacks the header fails the job
at once (PermanentError); a bad row only rejects that row.

Writing: good rows are upserted in chunks, each its own short transaction (no long lock on the
table), `ON CONFLICT (tenant_id, employee_no) DO UPDATE`. Inserts are counted exactly with the
`created_by_job` column (set on insert, kept on update): a chunk written twice after a crash
still counts its rows as inserted by this job. After each chunk the number of rows done is
checkpointed, so a retry parses again (deterministic) and resumes after them.
"""

from __future__ import annotations

import asyncio
import csv
import io
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypeVar

from pydantic import BaseModel, Field

from carwash_jobs.errors import PermanentError
from carwash_jobs.registry import TaskOptions, TaskType
from task_types.domain import (
    EMPLOYEE_NO_MAX_LENGTH,
    EMPLOYEE_ROLES,
    NAME_MAX_LENGTH,
    check_address,
    db_date,
    db_timestamp,
    in_clause,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from carwash_jobs.context import JobContext
    from carwash_jobs.store.base import Tx, TxFn

COLUMNS = ("employee_no", "first_name", "last_name", "email", "role", "hourly_rate", "hired_on")
DEFAULT_CHUNK_SIZE = 500
MAX_REPORTED_REJECTS = 1000  #: the result lists this many rejected lines; rejected_count has all
MAX_RATE = Decimal("10000")
_ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
#: plain ASCII digits: Decimal also reads "1_0.5", "1e2" and other scripts' digits
_DECIMAL = re.compile(r"-?[0-9]+(?:\.[0-9]+)?")
V = TypeVar("V")

UPSERT = """
INSERT INTO employees (tenant_id, employee_no, first_name, last_name, email, role,
  hourly_rate_cents, hired_on, created_by_job, updated_by_job, updated_at)
VALUES (:tenant_id, :employee_no, :first_name, :last_name, :email, :role, :hourly_rate_cents,
  :hired_on, :job_id, :job_id, :updated_at)
ON CONFLICT (tenant_id, employee_no) DO UPDATE SET
  first_name = excluded.first_name, last_name = excluded.last_name, email = excluded.email,
  role = excluded.role, hourly_rate_cents = excluded.hourly_rate_cents,
  hired_on = excluded.hired_on, updated_by_job = excluded.updated_by_job,
  updated_at = excluded.updated_at
"""


class UploadPayload(BaseModel):
    file_path: str = Field(min_length=1, description="the stored upload (set by the HTTP layer)")
    kind: Literal["employees"]
    tenant_id: str = Field(min_length=1, max_length=64)
    chunk_size: int | None = Field(default=None, ge=1, le=5000)


class RejectedLine(BaseModel):
    line: int  #: 1-based physical line in the file where the record starts (header = 1)
    error: str


class UploadResult(BaseModel):
    inserted: int
    updated: int
    rejected: list[RejectedLine]  #: the first MAX_REPORTED_REJECTS of them, by line
    rejected_count: int


@dataclass(frozen=True, slots=True)
class EmployeeRow:
    line: int
    employee_no: str
    first_name: str
    last_name: str
    email: str
    role: str
    hourly_rate_cents: int
    hired_on: date


@dataclass(frozen=True, slots=True)
class ParsedFile:
    rows: list[EmployeeRow]
    rejected: list[RejectedLine]


async def import_file(ctx: JobContext, payload: UploadPayload) -> UploadResult:
    parsed = await asyncio.to_thread(read_employees, Path(payload.file_path))
    checkpoint = ctx.checkpoint or {}
    done = int(checkpoint.get("rows_done", 0))
    inserted = int(checkpoint.get("inserted", 0))
    updated = int(checkpoint.get("updated", 0))
    total = len(parsed.rows)
    size = payload.chunk_size or DEFAULT_CHUNK_SIZE
    await ctx.progress(done, total)
    while done < total:
        chunk = parsed.rows[done:done + size]
        new = await upsert_chunk(ctx, payload.tenant_id, chunk)
        inserted, updated, done = inserted + new, updated + len(chunk) - new, done + len(chunk)
        await ctx.save_checkpoint({"rows_done": done, "inserted": inserted, "updated": updated},
                                  done=done, total=total)
    return UploadResult(inserted=inserted, updated=updated,
                        rejected=parsed.rejected[:MAX_REPORTED_REJECTS],
                        rejected_count=len(parsed.rejected))


async def upsert_chunk(ctx: JobContext, tenant_id: str, chunk: list[EmployeeRow]) -> int:
    """Upsert one chunk in its own transaction; returns how many rows this job inserted."""
    return await ctx.transaction(_upsert(ctx.job_id, tenant_id, chunk))


def _upsert(job_id: str, tenant_id: str, chunk: list[EmployeeRow]) -> TxFn[int]:
    async def run(tx: Tx) -> int:
        now = db_timestamp(tx.dialect, datetime.now(UTC))
        await tx.executemany(UPSERT, [{
            "tenant_id": tenant_id, "employee_no": row.employee_no, "first_name": row.first_name,
            "last_name": row.last_name, "email": row.email, "role": row.role,
            "hourly_rate_cents": row.hourly_rate_cents,
            "hired_on": db_date(tx.dialect, row.hired_on), "job_id": job_id, "updated_at": now,
        } for row in chunk])
        numbers, params = in_clause("no", [row.employee_no for row in chunk])
        found = await tx.fetch(
            f"SELECT COUNT(*) AS n FROM employees WHERE tenant_id = :tenant_id "
            f"AND created_by_job = :job_id AND employee_no IN {numbers}",
            {**params, "tenant_id": tenant_id, "job_id": job_id},
        )
        return int(found[0]["n"])

    return run


# -- reading the file (runs in a worker thread) ----------------------------------------------------
def read_employees(path: Path) -> ParsedFile:
    """Parse and validate the whole file; PermanentError when it is not an employees CSV."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise PermanentError(f"the uploaded file {path} does not exist (was it cleaned up?)") from None
    return parse_employees(data)


def parse_employees(data: bytes) -> ParsedFile:
    text = _decode(data)
    records = _records(text)
    header = next(records, None)
    if header is None:
        raise PermanentError("the file is empty: expected a CSV with the header " + ",".join(COLUMNS))
    positions = _header_positions(header)
    rows: list[EmployeeRow] = []
    rejected: list[RejectedLine] = []
    first_seen: dict[str, int] = {}
    for line, fields in records:
        if isinstance(fields, str):  # the csv module could not read this record
            rejected.append(RejectedLine(line=line, error=fields))
            continue
        try:
            row = _employee(line, fields, positions, len(header[1]))
        except ValueError as exc:
            rejected.append(RejectedLine(line=line, error=str(exc)))
            continue
        if row.employee_no in first_seen:
            rejected.append(RejectedLine(
                line=line,
                error=f"employee_no {row.employee_no!r} appears again (first on line "
                      f"{first_seen[row.employee_no]})",
            ))
            continue
        first_seen[row.employee_no] = line
        rows.append(row)
    return ParsedFile(rows, rejected)


def _decode(data: bytes) -> str:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise PermanentError(
            f"the file is not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line}, offset "
            f"{exc.start}); save it as CSV UTF-8"
        ) from None
    if "\x00" in text:
        raise PermanentError("the file is not a CSV text file (it contains NUL bytes)")
    return text


def _records(text: str) -> Iterator[tuple[int, list[str] | str]]:
    """(first physical line, fields) per non-blank record; fields is an error text when the
    record's quoting is broken. The csv reader's line_num counts the lines it has consumed, so
    a record starts one line after the previous record ended."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    ended = 0
    while True:
        start = ended + 1
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            ended = reader.line_num
            yield start, f"malformed CSV: {exc}"
            continue
        ended = reader.line_num
        if fields and any(f.strip() for f in fields):
            yield start, fields


def _header_positions(header: tuple[int, list[str] | str]) -> dict[str, int]:
    line, fields = header
    names = [] if isinstance(fields, str) else [f.strip().lower() for f in fields]
    missing = [c for c in COLUMNS if c not in names]
    if missing:
        raise PermanentError(
            f"line {line} is not the employees header: expected {','.join(COLUMNS)}; "
            f"missing {', '.join(missing)}"
        )
    return {column: names.index(column) for column in COLUMNS}


def _employee(line: int, fields: list[str], positions: dict[str, int], width: int) -> EmployeeRow:
    """One validated row, or ValueError naming every problem in it."""
    if len(fields) != width:
        raise ValueError(f"expected {width} fields, found {len(fields)}")
    problems: list[str] = []

    def take(column: str, check: Callable[[str], V], fallback: V) -> V:
        try:
            return check(fields[positions[column]].strip())
        except ValueError as exc:
            problems.append(f"{column} {exc}")
            return fallback

    row = EmployeeRow(
        line=line, employee_no=take("employee_no", _employee_no, ""),
        first_name=take("first_name", _text, ""), last_name=take("last_name", _text, ""),
        email=take("email", check_address, ""), role=take("role", _role, ""),
        hourly_rate_cents=take("hourly_rate", _rate, 0), hired_on=take("hired_on", _date, date.min),
    )
    if problems:
        raise ValueError("; ".join(problems))
    return row


def _text(value: str, most: int = NAME_MAX_LENGTH) -> str:
    if not value:
        raise ValueError("is empty")
    if len(value) > most:
        raise ValueError(f"is longer than {most} characters")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        raise ValueError("contains a line break or control character")
    return value


def _employee_no(value: str) -> str:
    """A key of at most its column's length: longer, PostgreSQL refused the whole chunk (and the
    job failed, retried, with earlier chunks written) where SQLite stored it."""
    return _text(value, EMPLOYEE_NO_MAX_LENGTH)


def _role(value: str) -> str:
    role = value.lower()
    if role not in EMPLOYEE_ROLES:
        raise ValueError(f"{value!r} is not one of {', '.join(EMPLOYEE_ROLES)}")
    return role


def _rate(value: str) -> int:
    """A decimal >= 0 with at most two places, as integer cents."""
    if not _DECIMAL.fullmatch(value):
        raise ValueError(f"{value!r} is not a decimal number")
    rate = Decimal(value)
    if rate < 0:
        raise ValueError(f"{value} is negative")
    if rate >= MAX_RATE:
        raise ValueError(f"{value} is implausibly high (>= {MAX_RATE})")
    cents = rate * 100
    if cents != cents.to_integral_value():
        raise ValueError(f"{value} has more than two decimal places")
    return int(cents)


def _date(value: str) -> date:
    if not _ISO_DATE.fullmatch(value):
        raise ValueError(f"{value!r} is not an ISO date (YYYY-MM-DD)")
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a valid date") from None


TASK_TYPE: TaskType[UploadPayload, UploadResult] = TaskType(
    name="file_upload",
    payload_model=UploadPayload,
    handler=import_file,
    result_model=UploadResult,
    options=TaskOptions(max_attempts=3, timeout=timedelta(minutes=30)),
    upload_field="file_path",
    description="Import an employee CSV: rows validated, good rows upserted in chunks, bad rows "
                "reported with their line numbers.",
    examples=[{"file_path": "files/employees.csv", "kind": "employees", "tenant_id": "tenant-1"}],
)

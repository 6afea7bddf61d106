"""file_upload: tricky employee CSVs give exact figures and the file's physical line numbers.

Bad files fail clearly and at once; a killed import resumes exactly."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

from carwash_jobs.errors import InvalidPayload
from carwash_jobs.lifecycle import JobStatus
from task_types import file_upload
from tests.task_types.support import dies_on_call, query, recover, run_job

if TYPE_CHECKING:
    from pathlib import Path

    from carwash_jobs.runtime import Runtime
    from tests.task_types.support import Runtimes

HEADER = "employee_no,first_name,last_name,email,role,hourly_rate,hired_on"

#: BOM, CRLF, quoted commas, doubled quotes, a record spanning two lines, blank lines, unicode,
#: and one of every kind of bad row. The comment at the end of each line is its line number.
TRICKY = [
    HEADER,                                                                   # 1
    'E001,Zoë,"Smith, Jr.",zoe@example.com,washer,15.50,2023-01-02',         # 2 ok
    'E002,"Anne ""Nan""",Doe,anne@example.com,Cashier,12,2022-05-06',        # 3 ok
    'E003,"Multi',                                                            # 4 rejected ...
    'Line",Doe,m@example.com,cashier,12,2022-05-06',                          # 5 ... (starts on 4)
    "",                                                                       # 6 blank
    "E004,José,Núñez,jose@example.com,manager,20.125,2022-02-30",             # 7 two problems
    "E001,Dup,Dup,dup@example.com,washer,1,2020-01-01",                       # 8 duplicate
    "E005,Björk,Guðmundsdóttir,bjork@example.is,detailer,0,2021-12-31",       # 9 ok
    'E006,"bad"x,C,c@example.com,washer,1,2020-01-01',                        # 10 bad quoting
    "E007,Short",                                                             # 11 too few fields
    ",No,Number,nn@example.com,washer,1,2020-01-01",                          # 12 no employee_no
    "E008,李,王,wang@example.cn,attendant,18.00,2024-07-01",                  # 13 ok
    'E009,"Comma, Inside","Quote ""Q""",q@example.com,washer,13.5,2019-03-04',  # 14 ok
    "E010,Neg,Rate,neg@example.com,washer,-1,2020-01-01",                     # 15 negative rate
    "E011,Bad,Role,role@example.com,janitor,10,2020-01-01",                   # 16 unknown role
    "E012,Bad,Email,not-an-email,washer,10,2020-01-01",                       # 17 bad email
    "E013,Bad,Date,d@example.com,washer,10,01/02/2020",                       # 18 bad date
    "E014,Too,Many,t@example.com,washer,10,2020-01-01,extra",                 # 19 too many fields
    "  E015 , Padded , Name , padded@example.com , WASHER , 9.99 , 2020-02-29 ",  # 20 ok (trimmed)
    "E" * 65 + ",Long,Key,long@example.com,washer,1,2020-01-01",               # 21 key too long
]
TRICKY_REJECTED = [
    {"line": 4, "error": "first_name contains a line break or control character"},
    {"line": 7, "error": "hourly_rate 20.125 has more than two decimal places; "
                         "hired_on '2022-02-30' is not a valid date"},
    {"line": 8, "error": "employee_no 'E001' appears again (first on line 2)"},
    {"line": 10, "error": "malformed CSV: ',' expected after '\"'"},
    {"line": 11, "error": "expected 7 fields, found 2"},
    {"line": 12, "error": "employee_no is empty"},
    {"line": 15, "error": "hourly_rate -1 is negative"},
    {"line": 16, "error": "role 'janitor' is not one of washer, detailer, cashier, manager, attendant"},
    {"line": 17, "error": "email 'not-an-email' is not a valid email address"},
    {"line": 18, "error": "hired_on '01/02/2020' is not an ISO date (YYYY-MM-DD)"},
    {"line": 19, "error": "expected 7 fields, found 8"},
    # its column holds 64: PostgreSQL refused the whole chunk, and the job failed
    {"line": 21, "error": "employee_no is longer than 64 characters"},
]
TRICKY_GOOD = ["E001", "E002", "E005", "E008", "E009", "E015"]


def write_csv(tmp_path: Path, lines: list[str], *, name: str = "employees.csv",
              newline: str = "\r\n", bom: bool = True) -> str:
    path = tmp_path / name
    path.write_bytes(("\ufeff" if bom else "").encode() + newline.join(lines).encode() +
                     newline.encode())
    return str(path)


async def upload(runtime: Runtime, path: str, tenant: str = "tenant-1", **fields: Any) -> Any:
    return await run_job(runtime, "file_upload", {"file_path": path, "kind": "employees",
                                                  "tenant_id": tenant, **fields})


def employees(url: str, tenant: str = "tenant-1") -> list[tuple[Any, ...]]:
    return query(url, "SELECT employee_no, first_name, last_name, email, role, hourly_rate_cents, "
                      "hired_on FROM employees WHERE tenant_id = ? ORDER BY employee_no", (tenant,))


async def test_a_tricky_file_gives_exact_figures_and_line_numbers(
    runtimes: Runtimes, tmp_path: Path
) -> None:
    runtime = await runtimes.start()

    job = await upload(runtime, write_csv(tmp_path, TRICKY), chunk_size=4)

    assert job.status == JobStatus.completed, job.error
    assert job.result == {"inserted": 6, "updated": 0, "rejected": TRICKY_REJECTED,
                          "rejected_count": len(TRICKY_REJECTED)}
    assert employees(runtime.settings.database_url) == [
        ("E001", "Zoë", "Smith, Jr.", "zoe@example.com", "washer", 1550, "2023-01-02"),
        ("E002", 'Anne "Nan"', "Doe", "anne@example.com", "cashier", 1200, "2022-05-06"),
        ("E005", "Björk", "Guðmundsdóttir", "bjork@example.is", "detailer", 0, "2021-12-31"),
        ("E008", "李", "王", "wang@example.cn", "attendant", 1800, "2024-07-01"),
        ("E009", "Comma, Inside", 'Quote "Q"', "q@example.com", "washer", 1350, "2019-03-04"),
        ("E015", "Padded", "Name", "padded@example.com", "washer", 999, "2020-02-29"),
    ]
    assert (job.progress_done, job.progress_total) == (6, 6)


async def test_a_second_upload_updates_instead_of_inserting(
    runtimes: Runtimes, tmp_path: Path
) -> None:
    runtime = await runtimes.start()
    url = runtime.settings.database_url
    first = await upload(runtime, write_csv(tmp_path, TRICKY))
    again = await upload(runtime, write_csv(tmp_path, TRICKY, name="again.csv"))
    changed = await upload(runtime, write_csv(tmp_path, [
        HEADER,
        "E001,Zoë,Smith,zoe.smith@example.com,manager,21.00,2023-01-02",  # existing: updated
        "E100,New,Hire,new@example.com,washer,14,2026-01-05",             # new: inserted
        "E101,Other,Hire,other@example.com,washer,14,2026-01-05",         # new: inserted
    ], name="changed.csv", newline="\n", bom=False))

    assert (first.result["inserted"], first.result["updated"]) == (6, 0)
    assert (again.result["inserted"], again.result["updated"]) == (0, 6)
    assert again.result["rejected"] == TRICKY_REJECTED
    assert (changed.result["inserted"], changed.result["updated"]) == (2, 1)
    assert changed.result["rejected"] == []
    assert employees(url)[0] == ("E001", "Zoë", "Smith", "zoe.smith@example.com", "manager",
                                 2100, "2023-01-02")
    assert len(employees(url)) == 8


async def test_employee_numbers_are_keys_within_a_tenant(runtimes: Runtimes, tmp_path: Path) -> None:
    runtime = await runtimes.start()
    path = write_csv(tmp_path, TRICKY)

    one = await upload(runtime, path, tenant="tenant-1")
    two = await upload(runtime, path, tenant="tenant-2")

    assert (one.result["inserted"], two.result["inserted"], two.result["updated"]) == (6, 6, 0)


async def test_extra_columns_are_ignored_and_may_span_lines(runtimes: Runtimes, tmp_path: Path) -> None:
    """An accepted record spanning three lines (a notes column) shifts the lines after it."""
    runtime = await runtimes.start()
    lines = [
        "hired_on,notes,employee_no,first_name,last_name,email,role,hourly_rate",  # 1
        '2024-01-01,"Great with',                                                   # 2 ok ...
        "ceramic",                                                                  # 3
        'coatings",E1,Ann,Lee,ann@example.com,detailer,17.25',                      # 4
        "2024-01-01,,E2,Bo,Ek,bo@example.com,plumber,17",                           # 5 rejected
    ]

    job = await upload(runtime, write_csv(tmp_path, lines, newline="\n"))

    assert job.result["inserted"] == 1
    assert job.result["rejected"] == [
        {"line": 5, "error": "role 'plumber' is not one of washer, detailer, cashier, manager, "
                             "attendant"}]


@pytest.mark.parametrize(("content", "error"), [
    ("employee_no,first_name\nZo\xeb,Lee\n".encode("latin-1"),
     "the file is not UTF-8 text (byte 0xeb on line 2, offset 25); save it as CSV UTF-8"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
     "the file is not UTF-8 text (byte 0x89 on line 1, offset 0); save it as CSV UTF-8"),
    (b"employee_no,first_name\x00,last_name\n", "the file is not a CSV text file (it contains NUL bytes)"),
    (b"", "the file is empty: expected a CSV with the header " + HEADER),
    (b"\xef\xbb\xbf\r\n\r\n", "the file is empty: expected a CSV with the header " + HEADER),
    (b"E001,Ann,Lee,ann@example.com,washer,15,2024-01-01\n",
     "line 1 is not the employees header: expected " + HEADER + "; missing employee_no, "
     "first_name, last_name, email, role, hourly_rate, hired_on"),
    (b"employee_no,first_name,last_name,email,role,rate,hired_on\n",
     "line 1 is not the employees header: expected " + HEADER + "; missing hourly_rate"),
    (b'{"employees": []}\n',
     "line 1 is not the employees header: expected " + HEADER + "; missing employee_no, "
     "first_name, last_name, email, role, hourly_rate, hired_on"),
])
async def test_a_file_that_is_not_an_employees_csv_fails_at_once(
    runtimes: Runtimes, tmp_path: Path, content: bytes, error: str
) -> None:
    runtime = await runtimes.start()
    path = tmp_path / "upload.bin"
    path.write_bytes(content)

    job = await upload(runtime, str(path))

    assert job.status == JobStatus.failed
    assert job.attempts == 1
    assert job.error == f"PermanentError: {error}"


async def test_a_missing_upload_fails_at_once(runtimes: Runtimes, tmp_path: Path) -> None:
    runtime = await runtimes.start()

    job = await upload(runtime, str(tmp_path / "gone.csv"))

    assert job.status == JobStatus.failed
    assert job.attempts == 1
    assert "does not exist" in (job.error or "")


@pytest.mark.parametrize("after", [False, True], ids=["before-the-write", "after-the-write"])
async def test_a_killed_import_resumes_after_the_checkpointed_rows(
    runtimes: Runtimes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, after: bool
) -> None:
    """The worker dies at the second chunk, before its transaction or after it committed (but
    before the checkpoint): either way the figures come out exact."""
    runtime = await runtimes.start()
    url = runtime.settings.database_url
    await upload(runtime, write_csv(tmp_path, [HEADER, *TRICKY[2:4], TRICKY[4]], name="seed.csv"))
    assert [e[0] for e in employees(url)] == ["E002"]  # E003 (lines 4-5) is rejected
    monkeypatch.setattr(file_upload, "upsert_chunk",
                        dies_on_call(runtime, file_upload.upsert_chunk, call=2, after=after))

    inserted = await runtime.queue.enqueue("file_upload", {
        "file_path": write_csv(tmp_path, TRICKY), "kind": "employees", "tenant_id": "tenant-1",
        "chunk_size": 2})
    assert runtime.processor is not None
    await runtime.processor.run_until_idle(timeout=5)
    dead = await runtime.store.get(inserted.job.id)
    assert dead.checkpoint == {"rows_done": 2, "inserted": 1, "updated": 1}
    job = await recover(runtime, inserted.job.id)

    assert job.status == JobStatus.completed, job.error
    assert job.result == {"inserted": 5, "updated": 1, "rejected": TRICKY_REJECTED,
                          "rejected_count": len(TRICKY_REJECTED)}
    assert [e[0] for e in employees(url)] == TRICKY_GOOD


@pytest.mark.parametrize("payload", [
    {"file_path": "x.csv", "kind": "customers", "tenant_id": "tenant-1"},
    {"file_path": "", "kind": "employees", "tenant_id": "tenant-1"},
    {"file_path": "x.csv", "kind": "employees"},
])
async def test_bad_upload_payloads_are_refused(runtimes: Runtimes, payload: dict[str, Any]) -> None:
    runtime = await runtimes.start()

    with pytest.raises(InvalidPayload):
        await runtime.queue.enqueue("file_upload", payload)


def test_the_upload_field_is_the_file_path() -> None:
    assert file_upload.TASK_TYPE.upload_field == "file_path"


@pytest.mark.parametrize(("value", "cents"), [
    ("12.50", 1250), ("0", 0), ("9999.99", 999_999),
    # what Decimal reads but a CSV of rates does not mean: refused, not taken as 10.5 or 100
    ("1_0.5", None), ("1e2", None), ("\u0661\u0660", None), ("NaN", None), ("Infinity", None),
    ("12.", None), (".5", None), ("", None),
])
def test_an_hourly_rate_is_plain_decimal_digits(value: str, cents: int | None) -> None:
    if cents is None:
        with pytest.raises(ValueError, match="is not a decimal number"):
            file_upload._rate(value)
    else:
        assert file_upload._rate(value) == cents

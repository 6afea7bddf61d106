"""The admin CLI's own parsing, run through `main` against a real SQLite file."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from sqlalchemy.engine import make_url

from carwash_jobs import lifecycle
from carwash_jobs.cli import _utc_time, main
from carwash_jobs.lifecycle import AttemptOutcome, JobStatus
from carwash_jobs.store.base import NewJob
from carwash_jobs.store.migrations import current_revision, head_revision, upgrade
from carwash_jobs.types import new_job_id
from tests.carwash_jobs.support import (
    OWNER,
    POSTGRES_URL_ENV,
    ManualClock,
    open_sqlite,
    postgres_url,
    sqlite_url,
)
from tests.task_types.support import free_port

if TYPE_CHECKING:
    from collections.abc import Iterator

REPO = Path(__file__).resolve().parents[2]
CLI = Path(sys.executable).parent / "carwash-jobs"

FAILED_AT = datetime(2030, 1, 1, 8, 0, tzinfo=UTC)


@pytest.fixture
def far_east(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The process's local zone nine hours ahead of UTC: a time without an offset read as local
    time would move by nine hours."""
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, db_url: str) -> str:
    """`main` reads its settings from the environment, in a directory with no config file."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CARWASH_DATABASE_URL", db_url)
    monkeypatch.setenv("CARWASH_LOG_LEVEL", "WARNING")
    return db_url


def failed_job(db_url: str) -> str:
    """A job that failed at FAILED_AT, written by a store of its own (as another process would)."""

    async def write() -> str:
        clock = ManualClock(FAILED_AT)
        store = await open_sqlite(db_url, clock=clock)
        try:
            job = NewJob(id=new_job_id(), task_type="noop", payload={}, status=JobStatus.queued,
                         run_at=clock(), created_at=clock())
            await store.insert([job])
            (row,) = await store.claim([job.id], OWNER, clock() + timedelta(minutes=5))
            await store.apply(lifecycle.fail(row.id, row.fence, "boom", None, AttemptOutcome.error, clock()))
            return row.id
        finally:
            await store.close()

    return asyncio.run(write())


def usage_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """What `main(argv)` says on stderr as it exits with argparse's usage error (2)."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    return capsys.readouterr().err


def test_a_time_without_an_offset_is_utc_whatever_the_local_zone(far_east: None) -> None:
    assert _utc_time("2030-01-01T08:00") == FAILED_AT
    assert _utc_time("2030-01-01T17:00+09:00") == FAILED_AT


def test_retry_failed_reads_times_without_an_offset_as_utc(
    far_east: None, cli_env: str, capsys: pytest.CaptureFixture[str]
) -> None:
    job_id = failed_job(cli_env)

    assert main(["jobs", "retry-failed", "--failed-after", "2030-01-01T08:01"]) == 0
    assert json.loads(capsys.readouterr().out) == {"retried": 0, "ids": []}
    assert main(["jobs", "retry-failed", "--failed-after", "2030-01-01T07:59"]) == 0
    assert json.loads(capsys.readouterr().out) == {"retried": 1, "ids": [job_id]}


def test_jobs_list_takes_the_filters_of_the_api(
    cli_env: str, capsys: pytest.CaptureFixture[str]
) -> None:
    job_id = failed_job(cli_env)

    def listed(*argv: str) -> list[str]:
        assert main(["jobs", "list", *argv]) == 0
        return [job["id"] for job in json.loads(capsys.readouterr().out)["items"]]

    assert listed("--queue", "default", "--created-after", "2030-01-01T08:00") == [job_id]
    assert listed("--created-after", "2030-01-01T08:01") == []
    assert listed("--created-before", "2030-01-01T08:01") == [job_id]
    assert listed("--created-before", "2030-01-01T08:00") == []
    assert listed("--queue", "bulk") == []
    assert listed("--limit", "1", "--cursor", job_id) == []


@pytest.mark.parametrize(("argv", "named"), [
    (["--created-after", "2030-01-02", "--created-before", "2030-01-01"],
     "--created-before must be later than --created-after"),
    (["--limit", "0"], "argument --limit: must be 1 to 500"),
    (["--limit", "501"], "argument --limit: must be 1 to 500"),
    # a cursor is the id of a page's last job: other text would restart the list
    (["--cursor", "garbage"], "argument --cursor: not a cursor a page gave out"),
    (["--cursor", "0" * 32 + "\n"], "argument --cursor: not a cursor a page gave out"),
])
def test_jobs_list_refuses_bad_filters(
    cli_env: str, capsys: pytest.CaptureFixture[str], argv: list[str], named: str
) -> None:
    said = usage_error(capsys, ["jobs", "list", *argv])
    assert named in said
    assert said.startswith("usage: carwash-jobs jobs list")  # the command's own usage


@pytest.mark.parametrize(("argv", "named"), [
    (["--failed-after", "2030-01-02", "--failed-before", "2030-01-01"],
     "--failed-before must be later than --failed-after"),
    (["--failed-after", "2030-01-01T08:00Z", "--failed-before", "2030-01-01T09:00+01:00"],
     "--failed-before must be later than --failed-after"),
    (["--failed-after", "yesterday"], "argument --failed-after: not an ISO 8601 time"),
    # beyond what the store keeps, or beyond what a datetime can hold once in UTC
    (["--failed-before", "9999-12-31T23:00-05:00"],
     "argument --failed-before: must lie between the years 1970 and 9998"),
    (["--failed-after", "1969-12-31T23:00Z"],
     "argument --failed-after: must lie between the years 1970 and 9998"),
])
def test_retry_failed_refuses_bad_times_before_touching_a_job(
    cli_env: str, capsys: pytest.CaptureFixture[str], argv: list[str], named: str
) -> None:
    job_id = failed_job(cli_env)

    assert named in usage_error(capsys, ["jobs", "retry-failed", *argv])
    assert main(["jobs", "show", job_id]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "failed"


@pytest.mark.parametrize(("argv", "named"), [
    (["--json", "{bad"], "argument --json: not JSON: Expecting property name"),
    (["--json", "[1]"], "argument --json: must be a JSON object, not list"),
    (["--json", "{}", "--options", "7"], "argument --options: must be a JSON object, not int"),
])
def test_enqueue_refuses_what_is_no_json_object(
    cli_env: str, capsys: pytest.CaptureFixture[str], argv: list[str], named: str
) -> None:
    assert named in usage_error(capsys, ["enqueue", "email", *argv])
    assert main(["jobs", "list"]) == 0
    assert json.loads(capsys.readouterr().out)["items"] == []


def test_enqueue_writes_the_job_with_its_options(
    cli_env: str, capsys: pytest.CaptureFixture[str]
) -> None:
    payload = {"recipients": [{"email": "a@example.com"}], "subject": "hi", "body_text": "x"}

    assert main(["enqueue", "email", "--json", json.dumps(payload),
                 "--options", '{"priority": 3, "tags": ["cli"]}']) == 0

    job = json.loads(capsys.readouterr().out)
    assert (job["task_type"], job["status"], job["priority"], job["tags"]) == (
        "email", "queued", 3, ["cli"])
    assert job["payload"]["subject"] == "hi"


def test_enqueue_options_are_checked_by_the_engine_and_run_at_read_from_text(
    cli_env: str, capsys: pytest.CaptureFixture[str]
) -> None:
    payload = json.dumps({"recipients": [{"email": "a@example.com"}], "subject": "hi", "body_text": "x"})

    assert main(["enqueue", "email", "--json", payload,
                 "--options", '{"run_at": "2030-01-01T08:00+01:00"}']) == 0
    job = json.loads(capsys.readouterr().out)
    assert (job["status"], job["run_at"]) == ("scheduled", "2030-01-01T07:00:00+00:00")

    for options, said in (('{"delay_seconds": 1e300}', "delay_seconds: must be a number"),
                          ('{"run_at": "tomorrow"}', "run_at: not an ISO 8601 time")):
        assert main(["enqueue", "email", "--json", payload, "--options", options]) == 1
        assert f"carwash-jobs: {said}" in capsys.readouterr().err
    assert main(["jobs", "list"]) == 0
    assert len(json.loads(capsys.readouterr().out)["items"]) == 1


def test_an_admin_command_neither_creates_nor_migrates_a_database(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A mistyped path made a new, empty database and listed no jobs; an install newer than the
    database migrated it, outside the release step (`db upgrade`)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CARWASH_LOG_LEVEL", "WARNING")
    missing = tmp_path / "typo" / "carwash.db"
    monkeypatch.setenv("CARWASH_DATABASE_URL", sqlite_url(missing))

    assert main(["jobs", "list"]) == 1
    assert "the database is missing or empty" in capsys.readouterr().err
    assert not missing.parent.exists()

    older = tmp_path / "older.db"
    asyncio.run(upgrade(sqlite_url(older), "0008"))
    monkeypatch.setenv("CARWASH_DATABASE_URL", sqlite_url(older))
    assert main(["jobs", "list"]) == 1
    said = capsys.readouterr().err
    assert f"the database is at schema 0008, and this install's is {head_revision()}" in said
    assert "run `carwash-jobs db upgrade` first" in said
    assert asyncio.run(current_revision(sqlite_url(older))) == "0008"

    assert main(["db", "upgrade"]) == 0
    assert main(["jobs", "list"]) == 0


def test_a_database_the_cli_cannot_reach_is_one_line_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CARWASH_LOG_LEVEL", "WARNING")
    monkeypatch.setenv("CARWASH_DATABASE_URL", f"postgresql+asyncpg://nobody@127.0.0.1:{free_port()}/x")

    for argv in (["db", "upgrade"], ["jobs", "list"]):
        assert main(argv) == 1
        said = capsys.readouterr().err
        assert said.startswith("carwash-jobs: cannot reach the database: ")
        assert "Traceback" not in said


def test_demo_data_with_a_database_it_cannot_reach_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    """Through the console script, as an operator runs it: it printed a ConnectionRefusedError's
    traceback."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("CARWASH_")}
    env |= {"PYTHONPATH": str(REPO), "CARWASH_LOG_LEVEL": "WARNING",
            "CARWASH_DATABASE_URL": f"postgresql+asyncpg://nobody@127.0.0.1:{free_port()}/x"}

    done = subprocess.run([str(CLI), "demo-data"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=15, check=False)

    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    (said,) = done.stderr.splitlines()
    assert said.startswith("carwash-jobs: cannot reach the database: [Errno 111]")


def test_a_server_that_refuses_the_login_is_one_line_in_the_drivers_words(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """SQLAlchemy's message had its class name ahead and a second line pointing at its
    documentation."""
    server = os.environ.get(POSTGRES_URL_ENV)
    if not server:
        pytest.skip(f"{POSTGRES_URL_ENV} is not set")
    nobody = make_url(postgres_url(server, "postgres")).set(username="no_such_role", password=None)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CARWASH_LOG_LEVEL", "WARNING")
    monkeypatch.setenv("CARWASH_DATABASE_URL", nobody.render_as_string(hide_password=False))

    assert main(["db", "upgrade"]) == 1

    (said,) = capsys.readouterr().err.splitlines()
    assert said.startswith("carwash-jobs: cannot reach the database: ")
    assert "no_such_role" in said  # the server's words: the role does not exist, or its login
    assert "sqlalchemy" not in said.lower()

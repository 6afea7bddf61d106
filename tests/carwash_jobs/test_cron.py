"""Tests of carwash_jobs/cron.py: loading and validating schedules, fire times (time zones,
daylight saving), and firing each schedule once per fire time, with an injected clock.

The firing tests run on real databases: a migrated SQLite file in tmp_path, and a fresh
PostgreSQL database per test on the server named by CARWASH_TEST_POSTGRES_URL (skipped while it
is unset). "Two processes" are two stores (two connections, two owners) on one database.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

import pytest

from carwash_jobs.cron import (
    CronService,
    FireTimes,
    Schedule,
    configured_schedules,
    fire_key,
    load_schedules,
    tick_interval,
)
from carwash_jobs.errors import ConfigurationError
from carwash_jobs.lifecycle import JobStatus
from carwash_jobs.metrics import Metrics
from carwash_jobs.queue import JobQueue
from carwash_jobs.ready import ReadyQueue
from carwash_jobs.registry import TaskRegistry
from carwash_jobs.runtime import Runtime
from carwash_jobs.settings import Settings, load_settings
from carwash_jobs.store import open_store
from carwash_jobs.store.base import CronFireRow, JobFilter
from tests.carwash_jobs.support import (
    ManualClock,
    registry_with,
    sqlite_url,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence

    from carwash_jobs.store.base import CronFireResult, JobRow, JobStore

REPO_ROOT = Path(__file__).resolve().parents[2]
OWNER_A = "host-a/1/0/a"
OWNER_B = "host-b/2/0/b"
NAME = "every-10"
TAG = f"cron:{NAME}"
BERLIN = "Europe/Berlin"


def at(hour: int, minute: int, second: int = 0, *, day: int = 2, month: int = 6) -> datetime:
    """An instant of 2025 in UTC (2 June 2025 is a Monday)."""
    return datetime(2025, month, day, hour, minute, second, tzinfo=UTC)


def schedule(**fields: Any) -> Schedule:
    values: dict[str, Any] = {
        "name": NAME, "task_type": "noop", "cron": "*/10 * * * *", "payload": {"label": "cron"},
        "overlap": "allow", **fields,
    }
    return Schedule.model_validate(values)


# -- databases and "processes" ----------------------------------------------------------------
@pytest.fixture
def cron_clock() -> ManualClock:
    return ManualClock(at(9, 58))


@dataclass
class Process:
    """What one process brings to cron: its own store connection and its in-memory queue."""

    store: JobStore
    queue: JobQueue
    clock: ManualClock

    def cron(self, *schedules: Schedule) -> CronService:
        return CronService(self.queue, schedules or (schedule(),), clock=self.clock)


@dataclass
class Processes:
    url: str
    clock: ManualClock
    started: list[Process] = field(default_factory=list)

    async def start(self, owner: str = OWNER_A, metrics: Metrics | None = None) -> Process:
        store = open_store(self.url, owner=owner, clock=self.clock)
        await store.open()
        queue = JobQueue(store, registry_with(), ready=ReadyQueue(), clock=self.clock,
                         metrics=metrics)
        process = Process(store, queue, self.clock)
        self.started.append(process)
        return process

    async def close(self) -> None:
        for process in self.started:
            process.queue.close()
            await process.store.close()


@pytest.fixture
async def processes(database_url: str, cron_clock: ManualClock) -> AsyncIterator[Processes]:
    made = Processes(database_url, cron_clock)
    yield made
    await made.close()


async def tick(cron: CronService, clock: ManualClock, when: datetime) -> list[CronFireResult]:
    clock.now = when
    return await cron.fire_due()


async def cron_jobs(store: JobStore, tag: str = TAG) -> list[JobRow]:
    return list((await store.list_jobs(JobFilter(tag=tag), 1000)).items)


def fire_times(results: Sequence[CronFireResult]) -> list[datetime]:
    return [r.fire_at for r in results if r.outcome == "fired"]


# -- schedules: loading and validation ------------------------------------------------------
def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


GOOD = """
[[schedules]]
name = "every-10"
task_type = "noop"
cron = "*/10 * * * *"
payload = { label = "x" }
"""


def test_the_shipped_schedules_load_against_the_shipped_task_types() -> None:
    registry = TaskRegistry.load(Settings.model_fields["task_types"].default)

    schedules = load_schedules(REPO_ROOT / "config" / "schedules.toml", registry)

    by_name = {s.name: s for s in schedules}
    assert {"financial-sync-tenant-1", "financial-sync-tenant-2"} <= set(by_name)
    nightly = by_name["financial-sync-tenant-1"]
    assert (nightly.cron, nightly.timezone, nightly.overlap) == ("30 2 * * *", BERLIN, "skip")
    assert nightly.payload == {"tenant_id": "tenant-1", "full": False}
    digests = [s for s in schedules if s.task_type == "email"]
    assert digests
    assert all(s.overlap == "allow" for s in digests)
    monday = FireTimes(digests[0]).next_after(at(12, 0))  # 2 June 2025 is a Monday
    assert monday == datetime(2025, 6, 9, 5, 0, tzinfo=UTC)  # 07:00 in Berlin, summer time


def test_a_valid_file_loads_with_the_defaults(tmp_path: Path) -> None:
    (loaded,) = load_schedules(write(tmp_path / "s.toml", GOOD), registry_with())

    assert loaded.name == "every-10"
    assert (loaded.timezone, loaded.second, loaded.overlap, loaded.catch_up) == ("UTC", "0", "skip", "latest")
    assert (loaded.catch_up_limit, loaded.priority, loaded.queue) == (100, None, None)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('overlapp = "skip"', r"schedule 'every-10': overlapp: unknown field"),
        ('overlap = "never"', r"schedule 'every-10': overlap: "),
        ('catch_up = "some"', r"schedule 'every-10': catch_up: "),
        ('timezone = "Mars/Olympus"', r"schedule 'every-10': timezone: unknown time zone 'Mars/Olympus'"),
        ('second = "61"', r"schedule 'every-10': second: not a seconds field"),
        ("catch_up_limit = 0", r"schedule 'every-10': catch_up_limit: "),
        # what the engine refuses: loaded, they failed every fire
        ("priority = 2147483648", r"schedule 'every-10': priority: "),
        (f'queue = "{"q" * 65}"', r"schedule 'every-10': queue: "),
    ],
)
def test_a_bad_field_stops_loading_naming_the_schedule_and_the_field(
    tmp_path: Path, line: str, message: str
) -> None:
    path = write(tmp_path / "s.toml", GOOD + line + "\n")

    with pytest.raises(ConfigurationError, match=message):
        load_schedules(path, registry_with())


@pytest.mark.parametrize(
    ("cron", "message"),
    [
        ("*/10 * * *", r"cron: expected 5 fields .* got 4"),
        ("0 */10 * * * *", r"cron: expected 5 fields .* got 6"),
        ("61 * * * *", r"cron: '61 \* \* \* \*': "),
        ("0 7 1 * mon", r"cron: .* restricts both day-of-month and day-of-week"),
        ("0 0 30 2 *", r"cron: '0 0 30 2 \*' never fires"),
        ("0 7 * * moonday", r"cron: .*: day-of-week: 'moonday' is not 0-7 or a day name"),
        ("0 7 * * 5-2", r"cron: .*: day-of-week: range '5-2' runs backwards"),
    ],
)
def test_a_bad_cron_expression_stops_loading_naming_the_field(
    tmp_path: Path, cron: str, message: str
) -> None:
    path = write(tmp_path / "s.toml", GOOD.replace('"*/10 * * * *"', f'"{cron}"'))

    with pytest.raises(ConfigurationError, match=f"schedule 'every-10': {message}"):
        load_schedules(path, registry_with())


def test_a_schedule_without_a_name_is_named_by_its_position(tmp_path: Path) -> None:
    path = write(tmp_path / "s.toml", GOOD + GOOD.replace('name = "every-10"\n', ""))

    with pytest.raises(ConfigurationError, match=r"schedule #2: name: Field required"):
        load_schedules(path, registry_with())


def test_a_name_that_cannot_be_part_of_a_key_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "s.toml", GOOD.replace('"every-10"', '"every:10"'))

    with pytest.raises(ConfigurationError, match=r"schedule 'every:10': name: "):
        load_schedules(path, registry_with())


def test_a_name_used_twice_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "s.toml", GOOD + GOOD)

    with pytest.raises(ConfigurationError, match=r"schedule 'every-10': name: used twice"):
        load_schedules(path, registry_with())


def test_an_unknown_task_type_stops_loading_with_what_to_do(tmp_path: Path) -> None:
    path = write(tmp_path / "s.toml", GOOD.replace('"noop"', '"financial_sync"'))

    with pytest.raises(ConfigurationError, match=(
        r"schedule 'every-10': task_type: 'financial_sync' is not registered in this process "
        r"\(it knows noop, order\).*CARWASH_SCHEDULES_FILE"
    )):
        load_schedules(path, registry_with())


def test_an_invalid_payload_stops_loading_naming_the_payload_field(tmp_path: Path) -> None:
    path = write(tmp_path / "s.toml", GOOD.replace('{ label = "x" }', '{ n = "many" }'))

    with pytest.raises(ConfigurationError, match=r"schedule 'every-10': payload\.n: "):
        load_schedules(path, registry_with())


def test_without_a_registry_task_types_are_not_checked(tmp_path: Path) -> None:
    path = write(tmp_path / "s.toml", GOOD.replace('"noop"', '"financial_sync"'))

    assert [s.task_type for s in load_schedules(path)] == ["financial_sync"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("schedule = []\n", r"unknown key 'schedule'"),
        ("schedules = 3\n", r"'schedules' must be an array of \[\[schedules\]\] tables"),
        ("[[schedules]\n", r"is not valid TOML"),
    ],
)
def test_a_malformed_file_is_refused(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        load_schedules(write(tmp_path / "s.toml", text), registry_with())


def test_a_file_without_schedules_means_none(tmp_path: Path) -> None:
    assert load_schedules(write(tmp_path / "s.toml", "schedules = []\n"), registry_with()) == []
    assert load_schedules(write(tmp_path / "t.toml", "# nothing yet\n"), registry_with()) == []


def settings_with(tmp_path: Path, schedules_file: str) -> Settings:
    return load_settings(
        database_url=sqlite_url(tmp_path / "jobs.db"), task_types=["tests.carwash_jobs.support"],
        schedules_file=schedules_file,
    )


def test_an_empty_schedules_file_setting_means_no_schedules(tmp_path: Path) -> None:
    assert configured_schedules(settings_with(tmp_path, ""), registry_with()) == []


def test_a_missing_default_schedules_file_means_no_schedules(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings_with(tmp_path, "config/schedules.toml")
    monkeypatch.chdir(tmp_path)

    assert configured_schedules(settings, registry_with()) == []
    assert "cron is off" in caplog.text


def test_a_missing_schedules_file_that_was_named_stops_start_up(tmp_path: Path) -> None:
    settings = settings_with(tmp_path, str(tmp_path / "nightly.toml"))

    with pytest.raises(ConfigurationError, match=r"CARWASH_SCHEDULES_FILE .* does not exist"):
        configured_schedules(settings, registry_with())


# -- fire times ---------------------------------------------------------------------------------
def weekdays(cron: str) -> list[str]:
    """The days of the week a schedule fires on, over one week from Sunday 1 June 2025."""
    times = FireTimes(schedule(cron=cron)).between(at(0, 0, day=1), at(0, 0, day=8), 100)
    return [t.strftime("%a") for t in times]


@pytest.mark.parametrize(
    ("day_of_week", "days"),
    [
        ("1", ["Mon"]),
        ("mon", ["Mon"]),
        ("0", ["Sun"]),
        ("7", ["Sun"]),
        ("1-5", ["Mon", "Tue", "Wed", "Thu", "Fri"]),
        ("5-7", ["Fri", "Sat", "Sun"]),
        ("fri-sun", ["Fri", "Sat", "Sun"]),
        ("*/2", ["Tue", "Thu", "Sat", "Sun"]),  # crontab counts the steps from Sunday
        ("1,3,SAT", ["Mon", "Wed", "Sat"]),
    ],
)
def test_day_of_week_means_what_it_means_in_crontab(day_of_week: str, days: list[str]) -> None:
    fired = weekdays(f"0 7 * * {day_of_week}")

    assert sorted(fired, key=["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"].index) == days


def test_the_expression_is_read_in_the_schedule_time_zone() -> None:
    times = FireTimes(schedule(cron="30 2 * * *", timezone=BERLIN))

    assert times.next_after(at(12, 0)) == at(0, 30, day=3)  # summer: UTC+2
    assert times.next_after(at(12, 0, day=2, month=12)) == at(1, 30, day=3, month=12)  # winter


def test_a_nightly_time_fires_once_when_the_clocks_go_back() -> None:
    times = FireTimes(schedule(cron="30 2 * * *", timezone=BERLIN))

    fired = times.between(at(12, 0, day=25, month=10), at(12, 0, day=26, month=10), 10)

    # 02:30 happens at 00:30 UTC (summer time) and again at 01:30 UTC: only the first fires
    assert fired == [at(0, 30, day=26, month=10)]


def test_the_repeated_hour_is_not_fired_twice_by_an_hourly_schedule() -> None:
    times = FireTimes(schedule(cron="0 * * * *", timezone=BERLIN))

    fired = times.between(at(23, 0, day=25, month=10), at(3, 0, day=26, month=10), 10)

    # 02:00 summer time, (02:00 winter time is a repeat), 03:00 and 04:00 winter time
    assert fired == [at(0, 0, day=26, month=10), at(2, 0, day=26, month=10),
                     at(3, 0, day=26, month=10)]


def test_a_nightly_time_the_clocks_skip_fires_right_after_the_jump() -> None:
    times = FireTimes(schedule(cron="30 2 * * *", timezone=BERLIN))
    jump = at(1, 0, day=30, month=3)  # 02:00 winter time became 03:00 summer time

    assert times.between(at(12, 0, day=29, month=3), at(12, 0, day=30, month=3), 10) == [jump]
    # the same answer wherever the search starts, so every process agrees on it
    for minutes in (1, 30, 59, 61, 600):
        assert times.between(jump - timedelta(minutes=minutes), jump, 10) == [jump]
    assert times.next_after(jump) == at(0, 30, day=31, month=3)


@pytest.mark.parametrize(("zone", "cron", "skipped_midnight", "fired"), [
    # 2025-09-07 in Santiago and 2025-04-25 (a Friday) in Cairo begin at 01:00: their clocks skip
    # midnight. The day's nightly fire, or the week's Friday one, was lost (APScheduler in the
    # zone went on to the next day); it fires at the jump, as a skipped 02:30 does in Berlin
    ("America/Santiago", "0 0 * * *", datetime(2025, 9, 7, 4, tzinfo=UTC),
     [datetime(2025, 9, 6, 4, tzinfo=UTC), datetime(2025, 9, 7, 4, tzinfo=UTC),
      datetime(2025, 9, 8, 3, tzinfo=UTC)]),
    ("Africa/Cairo", "0 0 * * 5", datetime(2025, 4, 24, 22, tzinfo=UTC),
     [datetime(2025, 4, 17, 22, tzinfo=UTC), datetime(2025, 4, 24, 22, tzinfo=UTC),
      datetime(2025, 5, 1, 21, tzinfo=UTC)]),
])
def test_a_midnight_the_clocks_skip_fires_at_the_jump(
    zone: str, cron: str, skipped_midnight: datetime, fired: list[datetime],
) -> None:
    times = FireTimes(schedule(cron=cron, timezone=zone))

    assert times.between(fired[0] - timedelta(hours=1), fired[-1], 10) == fired
    for hours in (0.5, 1, 3, 20):  # the same answer wherever the search starts
        assert times.next_after(skipped_midnight - timedelta(hours=hours)) == skipped_midnight
    assert times.next_after(skipped_midnight) == fired[-1]


@pytest.mark.parametrize("cron", ["* * * * *", "*/30 * * * *", "30 2 * * *", "15,45 1-3 * * *"])
@pytest.mark.parametrize("month", [3, 10])
def test_fire_times_only_move_forward_through_a_change_of_the_clocks(cron: str, month: int) -> None:
    # APScheduler 3 on its own returns 02:30 summer time again after 02:30 winter time
    times = FireTimes(schedule(cron=cron, timezone=BERLIN))
    instant = at(20, 0, day=25 if month == 10 else 29, month=month)
    end = instant + timedelta(hours=12)
    while instant < end:
        following = times.next_after(instant)
        assert following is not None
        assert following > instant
        instant = following


def test_the_newest_fire_times_of_a_long_outage_are_found_without_walking_it_all() -> None:
    times = FireTimes(schedule(cron="* * * * *"))

    newest = times.between(at(0, 0, day=1, month=1), at(12, 0, day=2, month=6), 3)

    assert newest == [at(11, 58), at(11, 59), at(12, 0)]


def test_an_optional_seconds_field_makes_sub_minute_schedules() -> None:
    times = FireTimes(schedule(cron="* * * * *", second="*/20"))

    assert times.between(at(10, 0), at(10, 1), 10) == [at(10, 0, 20), at(10, 0, 40), at(10, 1)]


def test_the_fire_key_is_the_fire_time_in_utc_to_the_minute_or_second() -> None:
    berlin_morning = datetime(2025, 6, 2, 9, 0, tzinfo=ZoneInfo(BERLIN))

    assert fire_key("nightly", berlin_morning) == "cron:nightly:2025-06-02T07:00"
    assert fire_key("fast", at(10, 0, 20)) == "cron:fast:2025-06-02T10:00:20"


def test_the_tick_follows_the_reload_but_never_slower_than_five_seconds() -> None:
    assert tick_interval(timedelta(seconds=2)) == timedelta(seconds=2)
    assert tick_interval(timedelta(seconds=30)) == timedelta(seconds=5)


# -- firing -------------------------------------------------------------------------------------
async def test_a_fire_inserts_one_job_with_its_key_tag_and_context(
    processes: Processes, cron_clock: ManualClock
) -> None:
    process = await processes.start()
    cron = process.cron()

    assert await cron.fire_due() == []  # a schedule that never fired starts now
    (result,) = await tick(cron, cron_clock, at(10, 0, 5))

    assert (result.schedule, result.fire_at, result.outcome) == (NAME, at(10, 0), "fired")
    assert result.job is not None
    job = await process.store.get(result.job.id)
    assert job.status == JobStatus.queued
    assert job.idempotency_key == "cron:every-10:2025-06-02T10:00"
    assert job.tags == [TAG]
    assert job.context == {"cron": NAME, "fire_at": "2025-06-02T10:00:00+00:00"}
    assert job.payload == {"label": "cron", "n": 0}
    assert process.queue.contains(job.id), "offered to this process's workers"
    assert await process.store.cron_fires(NAME, 10) == [CronFireRow(NAME, at(10, 0), job.id, OWNER_A)]


async def test_a_fire_counts_its_job_as_enqueued_once_across_processes(
    processes: Processes, cron_clock: ManualClock
) -> None:
    """A fire writes its job through the store, not through an enqueue: it was not counted."""
    first, second = Metrics(), Metrics()
    crons = [(await processes.start(OWNER_A, first)).cron(),
             (await processes.start(OWNER_B, second)).cron()]
    for cron in crons:
        assert await cron.fire_due() == []
    for cron in crons:
        await tick(cron, cron_clock, at(10, 0, 5))

    counted = [m.registry.get_sample_value("carwash_jobs_enqueued_total", {"task_type": "noop"})
               for m in (first, second)]
    assert sorted(counted, key=lambda n: n or 0) == [None, 1]


async def test_fire_due_again_at_the_same_time_fires_nothing(
    processes: Processes, cron_clock: ManualClock
) -> None:
    cron = (await processes.start()).cron()
    await cron.fire_due()
    await tick(cron, cron_clock, at(10, 0, 5))

    assert await cron.fire_due() == []
    assert await tick(cron, cron_clock, at(10, 9, 59)) == []
    assert fire_times(await tick(cron, cron_clock, at(10, 10))) == [at(10, 10)]


async def test_two_processes_fire_each_fire_time_exactly_once(
    processes: Processes, cron_clock: ManualClock
) -> None:
    a, b = await processes.start(OWNER_A), await processes.start(OWNER_B)
    cron_a, cron_b = a.cron(), b.cron()
    await asyncio.gather(cron_a.fire_due(), cron_b.fire_due())

    for minute in (0, 10, 20, 30):
        cron_clock.now = at(10, minute, 1)
        first, second = await asyncio.gather(cron_a.fire_due(), cron_b.fire_due())
        assert sorted(r.outcome for r in [*first, *second]) == ["fired", "lost"]

    fires = await a.store.cron_fires(NAME, 100)
    jobs = await cron_jobs(a.store)
    assert [f.fire_at for f in fires] == [at(10, m) for m in (30, 20, 10, 0)]
    assert sorted(f.job_id for f in fires if f.job_id) == sorted(j.id for j in jobs)
    assert len({j.idempotency_key for j in jobs}) == 4
    assert {f.fired_by for f in fires} <= {OWNER_A, OWNER_B}


async def test_a_restarted_process_takes_its_watermark_from_the_database(
    processes: Processes, cron_clock: ManualClock
) -> None:
    first = (await processes.start(OWNER_A)).cron()
    await first.fire_due()
    await tick(first, cron_clock, at(10, 0, 5))

    restarted = await processes.start(OWNER_B)  # another process, or this one restarted
    later = restarted.cron()
    assert await tick(later, cron_clock, at(10, 0, 30)) == []
    assert fire_times(await tick(later, cron_clock, at(10, 10, 2))) == [at(10, 10)]
    assert len(await cron_jobs(restarted.store)) == 2


async def test_overlap_skip_records_the_fire_without_a_job_while_the_last_one_is_unfinished(
    processes: Processes, cron_clock: ManualClock
) -> None:
    process = await processes.start()
    cron = process.cron(schedule(overlap="skip"))
    await cron.fire_due()
    (fired,) = await tick(cron, cron_clock, at(10, 0, 5))
    assert fired.job is not None

    (skipped,) = await tick(cron, cron_clock, at(10, 10, 5))

    assert (skipped.outcome, skipped.active_job_id, skipped.job) == ("skipped", fired.job.id, None)
    assert (await process.store.cron_fires(NAME, 1))[0] == CronFireRow(NAME, at(10, 10), None, OWNER_A)
    assert [j.id for j in await cron_jobs(process.store)] == [fired.job.id]

    await process.queue.cancel(fired.job.id)  # the earlier run has ended
    (again,) = await tick(cron, cron_clock, at(10, 20, 5))
    assert again.outcome == "fired"
    assert len(await cron_jobs(process.store)) == 2


async def test_overlap_allow_adds_a_job_for_every_fire(
    processes: Processes, cron_clock: ManualClock
) -> None:
    process = await processes.start()
    cron = process.cron(schedule(overlap="allow"))
    await cron.fire_due()

    for minute in (0, 10, 20):
        await tick(cron, cron_clock, at(10, minute, 5))

    jobs = await cron_jobs(process.store)
    assert [j.status for j in jobs] == [JobStatus.queued] * 3


async def test_overlap_skip_ignores_jobs_of_other_schedules(
    processes: Processes, cron_clock: ManualClock
) -> None:
    process = await processes.start()
    cron = process.cron(schedule(overlap="skip"), schedule(name="other", overlap="skip"))
    await cron.fire_due()

    results = await tick(cron, cron_clock, at(10, 0, 5))

    assert [(r.schedule, r.outcome) for r in results] == [(NAME, "fired"), ("other", "fired")]


MISSED = [at(10, 10) + timedelta(minutes=10 * i) for i in range(15)]  # 10:10 ... 12:30


@pytest.mark.parametrize(
    ("catch_up", "limit", "back_at", "expected"),
    [
        pytest.param("latest", 100, at(12, 35), [at(12, 30)], id="latest-fires-the-newest"),
        pytest.param("none", 100, at(12, 35), [], id="none-skips-them"),
        pytest.param("all", 100, at(12, 35), MISSED, id="all-fires-each"),
        pytest.param("all", 4, at(12, 35), MISSED[-4:], id="all-up-to-the-limit"),
        pytest.param("latest", 100, at(12, 30, 20), [at(12, 30)], id="latest-on-time-covers-it"),
        pytest.param("none", 100, at(12, 30, 20), [at(12, 30)], id="none-still-fires-on-time"),
    ],
)
async def test_fires_missed_while_every_process_was_down_follow_the_catch_up_policy(
    processes: Processes, cron_clock: ManualClock, catch_up: str, limit: int,
    back_at: datetime, expected: list[datetime],
) -> None:
    plan = schedule(catch_up=catch_up, catch_up_limit=limit)
    before = (await processes.start(OWNER_A)).cron(plan)
    await before.fire_due()
    await tick(before, cron_clock, at(10, 0, 5))  # the last fire before the outage

    after = (await processes.start(OWNER_B)).cron(plan)
    results = await tick(after, cron_clock, back_at)

    assert fire_times(results) == expected
    assert [r.outcome for r in results] == ["fired"] * len(expected)
    next_fire = max([*expected, at(12, 30)]) + timedelta(minutes=10)
    assert fire_times(await tick(after, cron_clock, next_fire + timedelta(seconds=1))) == [next_fire]


async def test_catching_up_all_fires_of_a_skip_schedule_runs_the_first_and_skips_the_rest(
    processes: Processes, cron_clock: ManualClock
) -> None:
    plan = schedule(catch_up="all", overlap="skip")
    process = await processes.start()
    before = process.cron(plan)
    await before.fire_due()
    (first,) = await tick(before, cron_clock, at(10, 0, 5))
    assert first.job is not None
    await process.queue.cancel(first.job.id)

    results = await tick((await processes.start(OWNER_B)).cron(plan), cron_clock, at(10, 45))

    assert [(r.fire_at, r.outcome) for r in results] == [
        (at(10, 10), "fired"), (at(10, 20), "skipped"), (at(10, 30), "skipped"),
        (at(10, 40), "skipped"),
    ]


@pytest.mark.parametrize(("edited", "back_at", "expected", "next_fire"), [
    # from every 10 minutes to :05 and :35: its last fire, 10:00, is none of the new times. It
    # used to catch up from there: 10:05, 10:35, ... 12:05 fired at once, times neither version
    # of the schedule ever had. It starts as a new schedule does
    ("5,35 * * * *", at(12, 36), [], at(13, 5)),
    # to every five minutes: 10:00 is one of its times too, and catching up goes on from it
    ("*/5 * * * *", at(10, 12), [at(10, 5), at(10, 10)], at(10, 15)),
])
async def test_an_edited_schedule_catches_up_only_from_a_fire_of_its_own(
    processes: Processes, cron_clock: ManualClock, edited: str, back_at: datetime,
    expected: list[datetime], next_fire: datetime,
) -> None:
    before = (await processes.start(OWNER_A)).cron(schedule(catch_up="all"))
    await before.fire_due()
    await tick(before, cron_clock, at(10, 0, 5))  # the last fire of the old expression

    after = (await processes.start(OWNER_B)).cron(schedule(catch_up="all", cron=edited))

    assert fire_times(await tick(after, cron_clock, back_at)) == expected
    assert fire_times(await tick(after, cron_clock, next_fire + timedelta(seconds=1))) == [next_fire]


async def test_a_new_schedule_does_not_fire_for_the_past(
    processes: Processes, cron_clock: ManualClock
) -> None:
    cron = (await processes.start()).cron(schedule(catch_up="all"))

    assert await tick(cron, cron_clock, at(12, 35)) == []
    assert fire_times(await tick(cron, cron_clock, at(12, 40, 2))) == [at(12, 40)]


async def test_the_nightly_berlin_schedule_fires_once_in_each_night_the_clocks_change(
    processes: Processes, cron_clock: ManualClock
) -> None:
    process = await processes.start()
    nightly = schedule(name="nightly", cron="30 2 * * *", timezone=BERLIN, catch_up="none")
    cron = process.cron(nightly)  # "none": the summer between the two nights is not caught up
    fired: list[datetime] = []
    for night in (at(20, 0, day=29, month=3), at(20, 0, day=25, month=10)):
        fired += fire_times(await tick(cron, cron_clock, night))
        for _ in range(8 * 12):  # a tick every five minutes until 04:00 UTC
            fired += fire_times(await tick(cron, cron_clock, cron_clock.now + timedelta(minutes=5)))

    # spring: the skipped 02:30 fires when the clocks jump to 03:00; autumn: the first 02:30 only
    assert fired == [at(1, 0, day=30, month=3), at(0, 30, day=26, month=10)]
    assert len(await cron_jobs(process.store, "cron:nightly")) == 2


async def test_cron_fires_lists_the_newest_first_across_schedules(
    processes: Processes, cron_clock: ManualClock
) -> None:
    process = await processes.start()
    cron = process.cron(schedule(), schedule(name="hourly", cron="0 * * * *"))
    await cron.fire_due()
    await tick(cron, cron_clock, at(10, 0, 5))
    await tick(cron, cron_clock, at(10, 10, 5))

    rows = await process.store.cron_fires(None, 10)

    assert [(r.schedule, r.fire_at) for r in rows] == [
        (NAME, at(10, 10)), (NAME, at(10, 0)), ("hourly", at(10, 0)),
    ]
    assert len(await process.store.cron_fires(None, 2)) == 2


async def test_a_schedule_whose_fire_failed_tries_again_at_the_next_tick(
    processes: Processes, cron_clock: ManualClock, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    process = await processes.start()
    cron = process.cron(schedule(), schedule(name="other"))
    await cron.fire_due()
    real_fire_cron = process.store.fire_cron

    async def database_away_for(schedule: str, *args: Any, **kwargs: Any) -> CronFireResult:
        if schedule == NAME:
            raise ConnectionError("the database went away")
        return await real_fire_cron(schedule, *args, **kwargs)

    monkeypatch.setattr(process.store, "fire_cron", database_away_for)
    results = await tick(cron, cron_clock, at(10, 0, 5))

    assert [(r.schedule, r.outcome) for r in results] == [("other", "fired")]
    assert "cron every-10: firing failed" in caplog.text

    monkeypatch.setattr(process.store, "fire_cron", real_fire_cron)
    results = await tick(cron, cron_clock, at(10, 0, 10))
    assert [(r.schedule, r.fire_at) for r in results] == [(NAME, at(10, 0))]


# -- the runtime --------------------------------------------------------------------------------
def runtime_settings(tmp_path: Path, db_url: str, schedules: str) -> Settings:
    return load_settings(
        database_url=db_url, task_types=["tests.carwash_jobs.support"],
        schedules_file=str(write(tmp_path / "schedules.toml", schedules)),
        sqlite_synchronous="NORMAL",
    )


def test_a_runtime_without_a_scheduler_runs_no_cron(tmp_path: Path, db_url: str) -> None:
    runtime = Runtime(runtime_settings(tmp_path, db_url, GOOD), registry_with(), role="api")

    assert runtime.cron is None


def test_a_runtime_refuses_to_start_with_a_schedule_it_cannot_run(tmp_path: Path, db_url: str) -> None:
    settings = runtime_settings(tmp_path, db_url, GOOD.replace('"noop"', '"email"'))

    with pytest.raises(ConfigurationError, match=r"schedule 'every-10': task_type: 'email'"):
        Runtime(settings, registry_with(), role="worker")


async def test_a_runtime_fires_its_schedules_and_runs_the_jobs(tmp_path: Path, db_url: str) -> None:
    clock = ManualClock(at(9, 58))
    settings = runtime_settings(tmp_path, db_url, GOOD)
    runtime = Runtime(settings, registry_with(), role="worker", clock=clock)
    assert runtime.cron is not None
    assert [s.name for s in runtime.cron.schedules] == [NAME]

    async with runtime:
        await runtime.cron.fire_due()
        (result,) = await tick(runtime.cron, clock, at(10, 0, 5))
        assert runtime.processor is not None
        await runtime.processor.run_until_idle(5)
        assert result.job is not None
        job = await runtime.store.get(result.job.id)

    assert job.status == JobStatus.completed
    assert job.result == {"label": "x", "n": 0, "attempt": 1}


def test_an_empty_schedules_file_setting_gives_a_runtime_no_schedules(tmp_path: Path, db_url: str) -> None:
    settings = load_settings(database_url=db_url, task_types=["tests.carwash_jobs.support"],
                             schedules_file="")

    runtime = Runtime(settings, registry_with(), role="all")

    assert runtime.cron is not None
    assert runtime.cron.schedules == []

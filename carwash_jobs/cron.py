"""Cron: fires the configured schedules as jobs, once per schedule and fire time in the fleet.

APScheduler only computes fire times (wrapped in `FireTimes`, the one place that touches its
CronTrigger); the database decides who fires. Every process with a scheduler runs
`CronService.fire_due` every few seconds. For each fire time it makes one store call,
`JobStore.fire_cron`, which records the fire in `cron_fires` (whose (schedule, fire_at) primary
key lets exactly one process win) and inserts the job in the same transaction. The job enters the
normal path at step 3 (`shared/STYLE.md`): idempotency key `cron:{name}:{fire_at:%Y-%m-%dT%H:%M}`
(fire_at in UTC; `:%S` is added for a fire time that is not on a whole minute), tag
`cron:{name}`, context `{"cron": name, "fire_at": ...}`.

Watermark and catch-up. Each schedule keeps a watermark, the last instant it has considered. At
the first tick it is the newest `cron_fires` row of that schedule (written by any process), or
the current time for a schedule that never fired (a new schedule does not fire for the past).
Each tick handles the fire times in (watermark, now]. Those less than `ON_TIME_GRACE_DEFAULT`
(60 s) old are on time and always fire. Older ones were missed (every process was down, or the
loop was blocked), and the schedule's `catch_up` decides:

- `latest` (the default): fire once, for the newest missed fire time, unless an on-time fire
  is due anyway (it covers the same need);
- `none`: fire none of them;
- `all`: fire each one, oldest first, at most `catch_up_limit` (default 100) fires per tick in
  all; older ones beyond the limit are dropped with a warning.

Overlap. With `overlap = "skip"` (the default) a fire is recorded with no job (job_id NULL)
while a job of the schedule's task type tagged `cron:{name}` is still waiting, queued, scheduled
or running (a manual rerun of a cron job keeps its tags, so it counts too). With `allow` every
fire inserts a job. Combined with `catch_up = "all"`, "skip" means the first missed fire runs
and the others are skipped while it is unfinished.

Cron expressions have crontab's five fields (minute hour day-of-month month day-of-week) with
crontab's meaning: day-of-week 0 or 7 is Sunday (APScheduler 3 on its own counts from Monday,
so `from_crontab("0 7 * * 1")` would fire on Tuesdays; this module translates the field).
Restricting both day-of-month and day-of-week is refused: crontab fires when either matches,
APScheduler only when both do. An optional `second` field (default "0") allows sub-minute
schedules, mainly for tests. Times are read in the schedule's IANA `timezone` (default UTC).
Daylight saving time: a wall-clock time that occurs twice when the clocks go back fires only at
its first occurrence; a time the clocks skip when they go forward fires once, right after the
jump (a 02:30 schedule fires at 03:00 summer time that night).

The schedules file (settings.schedules_file, relative to the working directory) is TOML with an
array of `[[schedules]]` tables; see config/schedules.toml. An empty `schedules_file` means no
schedules; so does a missing file at the default path (logged); a missing file that the setting
names explicitly stops start-up. Any unknown field, bad expression, unknown time zone, unknown
task type or invalid payload stops start-up with a message naming the schedule and the field.
A process must know the task type of every schedule it loads: in a fleet whose workers know
different task types, give each kind of worker its own schedules file (or "" for none).
"""

from __future__ import annotations

import asyncio
import logging
import tomllib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from apscheduler.triggers.cron import CronTrigger
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from carwash_jobs.errors import ConfigurationError, InvalidPayload
from carwash_jobs.queue import PRIORITY_MAX, QUEUE_NAME_MAX_LENGTH, EnqueueOptions
from carwash_jobs.settings import Settings
from carwash_jobs.types import Clock, utc_now

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from pydantic_core import ErrorDetails

    from carwash_jobs.queue import JobQueue
    from carwash_jobs.registry import TaskRegistry
    from carwash_jobs.store.base import CronFireResult

log = logging.getLogger(__name__)

#: a fire time younger than this at the tick that sees it is on time; older ones follow catch_up
ON_TIME_GRACE_DEFAULT = timedelta(seconds=60)
#: at most this many fires per schedule and tick, on time and caught up together
CATCH_UP_LIMIT_DEFAULT = 100
#: the longest pause between two ticks of fire_due (shorter when the reload runs more often)
TICK_INTERVAL_MAX_DEFAULT = timedelta(seconds=5)
#: schedule names go into idempotency keys and tags: no spaces, no colons
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"

_MICROSECOND = timedelta(microseconds=1)
_DAY_NAMES = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
_CRON_FIELDS = "minute hour day-of-month month day-of-week"
#: the wall times looked at for one fire time: a few at most (see FireTimes.next_after); the
#: bound guards against a trigger that would not move forward
_PROBES_MAX = 100
#: the zone APScheduler reads wall-clock times in (see FireTimes)
_WALL_CLOCK = ZoneInfo("UTC")
#: the first window searched backwards for missed fire times; each next one is 8 times longer
_SEARCH_WINDOW_FIRST = timedelta(minutes=1)
_NEVER = datetime.max.replace(tzinfo=UTC)


class Schedule(BaseModel):
    """One `[[schedules]]` table of the schedules file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(
        min_length=1, max_length=100, pattern=NAME_PATTERN,
        description="Unique; with the fire time it makes the job's idempotency key.",
    )
    task_type: str = Field(min_length=1, description="A task type this process has registered.")
    cron: str = Field(description="Five crontab fields: minute hour day-of-month month day-of-week.")
    second: str = Field(
        default="0", description="APScheduler's seconds field ('*/2', '0,30'); for sub-minute schedules."
    )
    timezone: str = Field(default="UTC", description="The IANA zone the expression is read in.")
    payload: dict[str, Any] = Field(default_factory=dict, description="The task type's payload.")
    overlap: Literal["skip", "allow"] = Field(
        default="skip", description="skip: no new job while the previous one is unfinished."
    )
    catch_up: Literal["latest", "none", "all"] = Field(
        default="latest", description="What fires that every process missed become."
    )
    catch_up_limit: int = Field(
        default=CATCH_UP_LIMIT_DEFAULT, ge=1, le=10_000,
        description="Most fires per schedule and tick (catch_up = 'all').",
    )
    # the engine's bounds, checked when the file is read: a bad value would fail every fire
    priority: int | None = Field(default=None, ge=-PRIORITY_MAX, le=PRIORITY_MAX,
                                 description="None: the task type's default.")
    queue: str | None = Field(default=None, min_length=1, max_length=QUEUE_NAME_MAX_LENGTH,
                              description="None: the task type's queue.")

    @field_validator("cron")
    @classmethod
    def _cron_is_crontab(cls, value: str) -> str:
        trigger = _trigger(value, "0", ZoneInfo("UTC"))
        if trigger.get_next_fire_time(None, utc_now()) is None:  # e.g. "0 0 30 2 *"
            raise ValueError(f"{value!r} never fires")
        return value

    @field_validator("second")
    @classmethod
    def _second_is_a_field(cls, value: str) -> str:
        try:
            CronTrigger(second=value, timezone=UTC)
        except ValueError as exc:
            raise ValueError(f"not a seconds field: {exc}") from None
        return value

    @field_validator("timezone")
    @classmethod
    def _timezone_is_known(cls, value: str) -> str:
        _zone(value)
        return value

    @property
    def tag(self) -> str:
        """The tag every job of this schedule carries (the overlap check looks for it)."""
        return f"cron:{self.name}"


def fire_key(name: str, fire_at: datetime) -> str:
    """The idempotency key of a fire: the same in every process, so a fire is one job even if
    its cron_fires row were gone."""
    utc = fire_at.astimezone(UTC)
    return f"cron:{name}:{utc:%Y-%m-%dT%H:%M}" + (f":{utc:%S}" if utc.second else "")


def tick_interval(reload_interval: timedelta) -> timedelta:
    """How often fire_due runs: as often as the reload, and at least every 5 s."""
    return min(reload_interval, TICK_INTERVAL_MAX_DEFAULT)


# -- fire times (APScheduler) -------------------------------------------------------------------
def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {name!r} (use an IANA name such as 'Europe/Berlin')") from None


def _trigger(cron: str, second: str, zone: ZoneInfo) -> Any:
    """A CronTrigger for a crontab expression (APScheduler 3 is untyped: Any)."""
    fields = cron.split()
    if len(fields) != 5:
        raise ValueError(f"expected 5 fields ({_CRON_FIELDS}), got {len(fields)} in {cron!r}")
    minute, hour, day, month, day_of_week = fields
    if day != "*" and day_of_week != "*":
        raise ValueError(
            f"{cron!r} restricts both day-of-month and day-of-week: crontab fires when either "
            "matches, APScheduler only when both do; restrict one of them"
        )
    try:
        return CronTrigger(
            month=month, day=day, day_of_week=_weekdays(day_of_week), hour=hour, minute=minute,
            second=second, timezone=zone,
        )
    except ValueError as exc:
        raise ValueError(f"{cron!r}: {exc}") from None


def _weekdays(field: str) -> str:
    """Crontab's day-of-week field (0 and 7 are Sunday; names; ranges; steps) as the day names
    APScheduler 3 reads, whose own numbers start at Monday."""
    if field == "*":
        return "*"
    days: set[int] = set()
    for item in field.split(","):
        span, _, step_text = item.partition("/")
        if step_text and not (step_text.isdigit() and int(step_text) > 0):
            raise ValueError(f"day-of-week: bad step in {item!r}")
        step = int(step_text) if step_text else 1
        if span == "*":
            first, last = 0, 6
        elif "-" in span:
            start, _, end = span.partition("-")
            first, last = _day(start), _day(end, end=True)
        else:
            first = _day(span)
            last = 6 if step_text else first
        if first > last:
            raise ValueError(f"day-of-week: range {span!r} runs backwards")
        days.update(day % 7 for day in range(first, last + 1, step))
    return ",".join(_DAY_NAMES[day] for day in sorted(days))


def _day(text: str, *, end: bool = False) -> int:
    word = text.strip().lower()
    if word.isdigit() and int(word) <= 7:
        return int(word)
    if word in _DAY_NAMES:
        index = _DAY_NAMES.index(word)
        return 7 if end and index == 0 else index  # "fri-sun" ends on the 7th day
    raise ValueError(f"day-of-week: {text!r} is not 0-7 or a day name (sun, mon, ...)")


def _repeated(instant: datetime, zone: ZoneInfo) -> bool:
    """Whether the wall-clock time at `instant` already occurred once (clocks went back)."""
    local = instant.astimezone(zone)
    return local.fold == 1 and local.replace(fold=0).utcoffset() != local.utcoffset()


def _after_repeated(instant: datetime, zone: ZoneInfo) -> datetime:
    """`instant`, or the end of the repeated hour it falls in (transitions are on whole minutes)."""
    if not _repeated(instant, zone):
        return instant
    minute = instant.replace(second=0, microsecond=0)
    while _repeated(minute, zone):
        minute += timedelta(minutes=1)
    return minute


def _wall(instant: datetime, zone: ZoneInfo) -> datetime:
    """The wall-clock time (naive) that `instant` shows in `zone`."""
    return instant.astimezone(zone).replace(tzinfo=None)


def _instant(wall: datetime, zone: ZoneInfo) -> datetime:
    """The UTC instant of the wall-clock time `wall` (naive) in `zone`: the first occurrence of
    a repeated one. A wall time the clocks skipped (they went forward) becomes the instant they
    jumped, so it fires once, right after the jump."""
    instant = wall.replace(tzinfo=zone).astimezone(UTC)
    if instant.astimezone(zone).replace(tzinfo=None) == wall:
        return instant
    minute = wall.replace(tzinfo=zone, fold=1).astimezone(UTC).replace(second=0, microsecond=0)
    after_jump = instant.astimezone(zone).utcoffset()
    while minute.astimezone(zone).utcoffset() != after_jump:
        minute += timedelta(minutes=1)
    return minute


class FireTimes:
    """When one schedule fires, as UTC instants. APScheduler's CronTrigger does the calendar
    arithmetic on wall-clock times, read as if in UTC, where no day lacks an hour; each wall
    time is then placed in the schedule's zone (`_instant`). In the zone itself APScheduler 3
    can return a time before the one asked for (and so loop for ever), and where the clocks
    skip midnight (America/Santiago, Africa/Cairo) it went on to the next day: that day's
    nightly fire, or that week's weekly one, was lost."""

    def __init__(self, schedule: Schedule) -> None:
        self.zone = _zone(schedule.timezone)
        self._wall_trigger: Any = _trigger(schedule.cron, schedule.second, _WALL_CLOCK)

    def next_after(self, after: datetime) -> datetime | None:
        """The first fire time strictly after `after`; None if there is none."""
        wall = _wall(after, self.zone)
        for _ in range(_PROBES_MAX):
            found = self._wall_trigger.get_next_fire_time(
                None, (wall + _MICROSECOND).replace(tzinfo=_WALL_CLOCK)
            )
            if found is None:
                return None
            candidate = found.replace(tzinfo=None)
            instant = _instant(candidate, self.zone)
            if instant > after:
                return instant
            # a wall time the clocks skipped, fired already at their jump, or the first
            # occurrence of a repeated hour whose second one `after` is in: go on from where
            # the wall times are real again
            repeat_ends = _after_repeated(after + _MICROSECOND, self.zone)
            wall = max(candidate, _wall(instant, self.zone),
                       _wall(repeat_ends, self.zone) - _MICROSECOND)
        raise RuntimeError(f"no fire time found after {after.isoformat()} in {_PROBES_MAX} probes")

    def between(self, after: datetime, until: datetime, newest: int) -> list[datetime]:
        """The newest `newest` fire times in (after, until], oldest first.

        The search runs backwards from `until` in growing windows, so catching up after a long
        outage does not walk every missed fire time of a frequent schedule.
        """
        if newest <= 0 or until <= after:
            return []
        window = _SEARCH_WINDOW_FIRST
        while True:
            start = max(after, until - window)
            found = self._walk(start, until)
            if len(found) >= newest or start == after:
                return found[-newest:]
            window *= 8

    def _walk(self, after: datetime, until: datetime) -> list[datetime]:
        found: list[datetime] = []
        instant = self.next_after(after)
        while instant is not None and instant <= until:
            found.append(instant)
            instant = self.next_after(instant)
        return found


# -- loading ------------------------------------------------------------------------------------
def load_schedules(path: Path | str, registry: TaskRegistry | None = None) -> list[Schedule]:
    """The schedules of a TOML file, validated; with `registry`, each task type must be
    registered and each payload valid for it. Any problem raises ConfigurationError naming the
    file, the schedule and the field."""
    path = Path(path)
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigurationError(f"cannot read the schedules file {path}: {exc}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"{path} is not valid TOML: {exc}") from exc
    unknown = sorted(set(document) - {"schedules"})
    if unknown:
        raise ConfigurationError(f"{path}: unknown key {unknown[0]!r}; schedules are [[schedules]] tables")
    tables = document.get("schedules", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ConfigurationError(f"{path}: 'schedules' must be an array of [[schedules]] tables")
    schedules = [_schedule(path, index, table) for index, table in enumerate(tables, start=1)]
    seen: set[str] = set()
    for schedule in schedules:
        if schedule.name in seen:
            raise ConfigurationError(f"{path}: schedule {schedule.name!r}: name: used twice")
        seen.add(schedule.name)
        if registry is not None:
            _check_task(path, schedule, registry)
    return schedules


def configured_schedules(settings: Settings, registry: TaskRegistry) -> list[Schedule]:
    """The schedules a process runs: none for an empty `schedules_file`, none (with a warning)
    when the default file is absent, else the file's, checked against `registry`."""
    name = settings.schedules_file
    if not name:
        return []
    path = Path(name).expanduser()
    if not path.is_file():
        if name == Settings.model_fields["schedules_file"].default:
            log.warning("no schedules file at %s (working directory %s): cron is off", path, Path.cwd())
            return []
        problem = "is not a file" if path.exists() else "does not exist"
        raise ConfigurationError(
            f"CARWASH_SCHEDULES_FILE / schedules_file names {name!r}, which {problem} "
            f"(working directory: {Path.cwd()}); set it to \"\" for no schedules"
        )
    return load_schedules(path, registry)


def _schedule(path: Path, index: int, table: Mapping[str, Any]) -> Schedule:
    try:
        return Schedule.model_validate(table)
    except ValidationError as exc:
        name = table.get("name")
        label = repr(name) if isinstance(name, str) and name else f"#{index}"
        raise ConfigurationError(
            f"{path}: schedule {label}: {_describe(exc.errors(include_url=False)[0])}"
        ) from exc


def _describe(error: ErrorDetails) -> str:
    where = ".".join(str(part) for part in error["loc"]) or "schedule"
    if error["type"] == "extra_forbidden":
        return f"{where}: unknown field (known: {', '.join(Schedule.model_fields)})"
    ctx = error.get("ctx") or {}
    message = str(ctx["error"]) if error["type"] == "value_error" and "error" in ctx else error["msg"]
    return f"{where}: {message}"


def _check_task(path: Path, schedule: Schedule, registry: TaskRegistry) -> None:
    if schedule.task_type not in registry:
        raise ConfigurationError(
            f"{path}: schedule {schedule.name!r}: task_type: {schedule.task_type!r} is not "
            f"registered in this process (it knows {', '.join(registry.names()) or 'none'}); fix "
            "the name, add its module to CARWASH_TASK_TYPES, or give this process another "
            "CARWASH_SCHEDULES_FILE"
        )
    try:
        registry.get(schedule.task_type).validate_payload(schedule.payload)
    except InvalidPayload as exc:
        raise ConfigurationError(
            f"{path}: schedule {schedule.name!r}: payload.{exc.field}: {exc.problem}"
        ) from exc


# -- firing ---------------------------------------------------------------------------------------
@dataclass(slots=True)
class _State:
    schedule: Schedule
    times: FireTimes
    #: the last instant considered; None until read from the database at the first tick
    watermark: datetime | None = None
    #: nothing to do before this instant (saves the store and the trigger on most ticks)
    next_fire: datetime | None = None


def _resume_from(state: _State, last_fire: datetime, now: datetime) -> datetime:
    """Where a schedule picks up after a start: at its last fire, if that is one of its fire
    times. A last fire that its expression (cron, second, time zone) would not have made was
    made by an earlier one, the schedule since edited: catching up from it fired times that
    no version of the schedule ever had (an edit from nightly to every five minutes fired a
    day's worth at once), so it starts from now, as a new schedule does."""
    if state.times.next_after(last_fire - _MICROSECOND) == last_fire:
        return last_fire
    log.info("cron %s: its last fire, %s, is no fire time of its expression now (edited?): "
             "nothing before now is caught up", state.schedule.name, last_fire.isoformat())
    return now


class CronService:
    """Fires this process's schedules; a scheduler duty calls `fire_due` every few seconds.
    Every process runs one, and the store decides which of them fires each fire time."""

    def __init__(
        self,
        queue: JobQueue,
        schedules: Sequence[Schedule],
        *,
        clock: Clock = utc_now,
        on_time_grace: timedelta = ON_TIME_GRACE_DEFAULT,
    ) -> None:
        self._queue = queue
        self._clock = clock
        self._grace = on_time_grace
        self._states = [_State(s, FireTimes(s)) for s in schedules]
        #: set after every tick; a test awaits it instead of sleeping
        self.ticked = asyncio.Event()

    @property
    def schedules(self) -> list[Schedule]:
        return [state.schedule for state in self._states]

    async def fire_due(self) -> list[CronFireResult]:
        """Fire every due fire time of every schedule; returns what each attempt came to. One
        schedule's failure (say, the database is away) is logged and retried at the next tick:
        its watermark stays where it was."""
        now = self._clock()
        results: list[CronFireResult] = []
        for state in self._states:
            try:
                results += await self._fire_schedule(state, now)
            except Exception:
                log.exception("cron %s: firing failed; tried again at the next tick",
                              state.schedule.name)
        self.ticked.set()
        return results

    async def _fire_schedule(self, state: _State, now: datetime) -> list[CronFireResult]:
        if state.watermark is None:
            newest = await self._queue.store.cron_fires(state.schedule.name, 1)
            state.watermark = _resume_from(state, newest[0].fire_at, now) if newest else now
        if state.next_fire is not None and state.next_fire > now:
            return []
        results: list[CronFireResult] = []
        for fire_at in self._plan(state, state.watermark, now):
            results.append(await self._fire(state.schedule, fire_at))
            state.watermark = fire_at
        state.watermark = max(state.watermark, now)
        state.next_fire = state.times.next_after(state.watermark) or _NEVER
        return results

    def _plan(self, state: _State, watermark: datetime, now: datetime) -> list[datetime]:
        """The fire times to fire now: the on-time ones, and the missed ones catch_up allows."""
        schedule, times = state.schedule, state.times
        late_before = max(watermark, now - self._grace)
        on_time = times.between(late_before, now, schedule.catch_up_limit)
        if watermark >= late_before:
            return on_time
        if schedule.catch_up == "all":
            room = schedule.catch_up_limit - len(on_time)
            missed = times.between(watermark, late_before, room + 1)
            if len(missed) > room:
                log.warning("cron %s: more than %d fires missed since %s; firing the newest %d",
                            schedule.name, room, watermark.isoformat(), room)
                missed = missed[len(missed) - room:]
        else:
            newest = times.between(watermark, late_before, 1)
            missed = newest if schedule.catch_up == "latest" and not on_time else []
            if newest and not missed:
                log.info("cron %s: fires missed since %s are skipped (catch_up=%s)",
                         schedule.name, watermark.isoformat(), schedule.catch_up)
        if missed:
            log.info("cron %s: catching up %d missed fire(s), %s to %s (catch_up=%s)",
                     schedule.name, len(missed), missed[0].isoformat(), missed[-1].isoformat(),
                     schedule.catch_up)
        return missed + on_time

    async def _fire(self, schedule: Schedule, fire_at: datetime) -> CronFireResult:
        options = EnqueueOptions(
            priority=schedule.priority, queue=schedule.queue, tags=[schedule.tag],
            idempotency_key=fire_key(schedule.name, fire_at),
            context={"cron": schedule.name, "fire_at": fire_at.isoformat()},
        )
        job = self._queue.build(schedule.task_type, schedule.payload, options)
        skip_tag = schedule.tag if schedule.overlap == "skip" else None
        result = await self._queue.store.fire_cron(
            schedule.name, fire_at, job, skip_if_active_tag=skip_tag
        )
        if result.job is not None:
            if result.job.id == job.id:  # not a job of that key written before
                self._queue.count_enqueued([result.job])
            self._queue.offer([result.job])
            log.info("cron %s: fired %s as job %s", schedule.name, fire_at.isoformat(), result.job.id)
        elif result.outcome == "skipped":
            log.warning("cron %s: fire %s skipped: job %s of an earlier fire is unfinished "
                        "(overlap=skip)", schedule.name, fire_at.isoformat(), result.active_job_id)
        else:
            log.debug("cron %s: fire %s went to another process", schedule.name, fire_at.isoformat())
        return result

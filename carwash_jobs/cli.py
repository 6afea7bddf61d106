"""The `carwash-jobs` console script: serve, db upgrade, enqueue, jobs ..., demo-data.

A thin shell over the same engine operations the HTTP API calls (JobQueue and JobStore), so the
two stay in step. Task types and the HTTP app are reached only through `carwash_jobs.app`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import re
import signal
import sys
from typing import TYPE_CHECKING, Any

import alembic.util
import sqlalchemy as sa

from carwash_jobs import app, gc_tuning, heap_trim
from carwash_jobs.errors import CarwashError, ConfigurationError, StoreUnavailable
from carwash_jobs.lifecycle import JobStatus
from carwash_jobs.queue import EnqueueOptions
from carwash_jobs.settings import Settings, load_settings
from carwash_jobs.store.base import (
    MAX_PAGE,
    FailedFilter,
    JobFilter,
    time_range_problem,
    utc_from_text,
)
from carwash_jobs.store.migrations import current_revision, head_revision, upgrade
from carwash_jobs.types import JOB_ID_PATTERN, JobId

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterator, Sequence
    from datetime import datetime

    from carwash_jobs.runtime import Role, Runtime


#: the (start, end) options of a time filter, in the commands that take one
TIME_RANGES = (("created_after", "created_before"), ("failed_after", "failed_before"))


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    for after, before in TIME_RANGES:
        if problem := time_range_problem(_flag(after), getattr(args, after, None),
                                         getattr(args, before, None)):
            args.parser.error(f"{_flag(before)} {problem}")
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        settings = load_settings()
        _configure_logging(settings)
        result: int = asyncio.run(args.run(settings, args))
    except CarwashError as exc:
        print(f"carwash-jobs: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return result


def _configure_logging(settings: Settings) -> None:
    if settings.log_format == "json":
        handler = logging.StreamHandler()
        handler.setFormatter(app.JsonLogFormatter())
        logging.basicConfig(level=settings.log_level, handlers=[handler], force=True)
    else:
        logging.basicConfig(level=settings.log_level,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # APScheduler announces every run of every duty at INFO: seconds apart, that is noise
    if logging.getLogger().level <= logging.INFO:
        logging.getLogger("apscheduler").setLevel(logging.WARNING)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="carwash-jobs", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the service (API, processor and scheduler)")
    serve.add_argument("--host", default=None)
    serve.add_argument("--port", type=int, default=None)
    serve.add_argument("--role", choices=["all", "api", "worker"], default="all")
    serve.set_defaults(run=_serve)

    db = sub.add_parser("db", help="database schema").add_subparsers(metavar="ACTION")
    db.add_parser("upgrade", help="apply migrations").set_defaults(run=_db_upgrade)

    enqueue = sub.add_parser("enqueue", help="enqueue one job")
    enqueue.add_argument("task_type")
    enqueue.add_argument("--json", dest="payload", type=_json_object, required=True,
                         metavar="PAYLOAD", help="the payload, a JSON object")
    enqueue.add_argument("--options", type=_json_object, default={},
                         help="enqueue options, a JSON object")
    enqueue.set_defaults(run=_enqueue)

    jobs = sub.add_parser("jobs", help="inspect and steer jobs").add_subparsers(metavar="ACTION")
    listing = jobs.add_parser("list", help="newest first")
    listing.add_argument("--status", choices=[s.value for s in JobStatus])
    listing.add_argument("--task-type")
    listing.add_argument("--tag")
    listing.add_argument("--queue")
    listing.add_argument("--created-after", type=_utc_time, metavar="ISO_TIME")
    listing.add_argument("--created-before", type=_utc_time, metavar="ISO_TIME",
                         help="a time without an offset is UTC")
    listing.add_argument("--limit", type=_count(1, most=MAX_PAGE), default=50, metavar="N",
                         help=f"page size, 1 to {MAX_PAGE} (default 50)")
    listing.add_argument("--cursor", type=_cursor, help="the last page's next_cursor")
    listing.set_defaults(run=_jobs_list, parser=listing)
    for name, fn, text in (("show", _jobs_show, "one job"), ("rerun", _jobs_rerun, "clone a finished job"),
                           ("cancel", _jobs_cancel, "cancel a job"),
                           ("events", _jobs_events, "a job's timeline")):
        cmd = jobs.add_parser(name, help=text)
        cmd.add_argument("job_id")
        cmd.set_defaults(run=fn)
    retry = jobs.add_parser("retry-failed", help="requeue failed jobs (filters AND-ed)")
    retry.add_argument("--id", dest="ids", action="append")
    retry.add_argument("--task-type")
    retry.add_argument("--failed-after", type=_utc_time, metavar="ISO_TIME")
    retry.add_argument("--failed-before", type=_utc_time, metavar="ISO_TIME",
                       help="a time without an offset is UTC")
    retry.set_defaults(run=_jobs_retry_failed, parser=retry)

    demo = sub.add_parser("demo-data", help="fill the car-wash domain tables with sample data")
    for flag, default, least in (("--tenants", 3, 1), ("--customers", 300, 0),
                                 ("--employees", 30, 0), ("--transactions", 5000, 0)):
        demo.add_argument(flag, type=_count(least), default=default, metavar="N",
                          help=f"how many (default {default})")
    demo.set_defaults(run=_demo_data)

    return parser


def _print(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


async def _serve(settings: Settings, args: argparse.Namespace) -> int:
    host = args.host or settings.host
    port = settings.port if args.port is None else args.port
    app.prepare_directories(settings, args.role)
    if args.role == "worker":
        return await _run_worker(await _ready_to_start(settings, "worker"))
    settings = app.with_api_token(settings)
    await app.serve_http(await _ready_to_start(settings, args.role), host=host, port=port)
    return 0


async def _ready_to_start(settings: Settings, role: Role) -> Runtime:
    """The runtime `serve` starts, built and its database migrated before any server runs: the
    task types, the cron schedules and the database are checked here, where a failure is one
    line (main). Inside uvicorn's start-up each was a traceback of up to 145 lines."""
    runtime = app.build_runtime(settings, role=role)
    with _reaching_the_database():
        await upgrade(settings.database_url)
    return runtime


async def _run_worker(runtime: Runtime) -> int:
    """Process jobs until SIGTERM or SIGINT, then stop gracefully."""
    settings = runtime.settings
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await runtime.start(migrate=False)  # _ready_to_start migrated
    try:
        gc_tuning.settle_after_startup()
        heap_trim.start_trimming(settings.heap_trim_interval_seconds)
        logging.getLogger(__name__).info("worker %s processing", runtime.owner)
        await stop.wait()
        logging.getLogger(__name__).info("stopping: running jobs get %.0fs to finish",
                                         settings.shutdown_grace_seconds)
    finally:
        await runtime.stop()
    return 0


async def _db_upgrade(settings: Settings, args: argparse.Namespace) -> int:
    try:
        with _reaching_the_database():
            await upgrade(settings.database_url)
    except alembic.util.CommandError as exc:  # a revision this install does not know
        raise ConfigurationError(
            f"cannot upgrade the database: {exc} (is it newer than this install?)"
        ) from exc
    print("database is at the latest schema")
    return 0


async def _with_runtime(settings: Settings, fn: Callable[[Runtime], Awaitable[Any]]) -> int:
    """Run one admin operation with an api-role runtime (no processor, no scheduler), on a
    database at this install's schema. An admin command neither creates a database nor
    migrates one: a mistyped SQLite path made a new, empty one and listed no jobs, and an
    operator's `jobs show` from a newer install migrated production outside the release step
    (`db upgrade`, once per release)."""
    await _require_current_schema(settings.database_url)
    runtime = app.build_runtime(settings, role="api")
    await runtime.start(migrate=False)
    try:
        _print(await fn(runtime))
    finally:
        await runtime.stop()
    return 0


async def _require_current_schema(database_url: str) -> None:
    with _reaching_the_database():
        at = await current_revision(database_url)
    head = head_revision()
    if at != head:
        found = ("the database is missing or empty" if at is None
                 else f"the database is at schema {at}")
        raise StoreUnavailable(
            f"{found}, and this install's is {head}: run `carwash-jobs db upgrade` first"
        )


@contextlib.contextmanager
def _reaching_the_database() -> Iterator[None]:
    """A database the command cannot reach is one line on stderr (main), not a traceback."""
    try:
        yield
    except (OSError, sa.exc.SQLAlchemyError) as exc:
        raise StoreUnavailable(f"cannot reach the database: {_driver_reason(exc)}") from exc


def _driver_reason(exc: Exception) -> str:
    """The driver's own words: SQLAlchemy wraps them in its class name and a second line
    pointing at its documentation."""
    orig = exc.orig if isinstance(exc, sa.exc.DBAPIError) else None
    return (str(orig) if orig is not None else str(exc)).strip().split("\n", 1)[0]


async def _enqueue(settings: Settings, args: argparse.Namespace) -> int:
    payload = args.payload
    options = EnqueueOptions.from_mapping(args.options)

    async def run(rt: Runtime) -> Any:
        name = args.task_type if args.task_type in rt.registry else rt.registry.by_slug(args.task_type).name
        return (await rt.queue.enqueue(name, payload, options)).job.public()

    return await _with_runtime(settings, run)


async def _jobs_list(settings: Settings, args: argparse.Namespace) -> int:
    flt = JobFilter(status=JobStatus(args.status) if args.status else None,
                    task_type=args.task_type, tag=args.tag, queue=args.queue,
                    created_after=args.created_after, created_before=args.created_before)

    async def run(rt: Runtime) -> Any:
        page = await rt.store.list_jobs(flt, args.limit, args.cursor)
        return {"items": [j.public() for j in page.items], "next_cursor": page.next_cursor}

    return await _with_runtime(settings, run)


async def _jobs_show(settings: Settings, args: argparse.Namespace) -> int:
    return await _with_runtime(settings, lambda rt: _public(rt.store.get(JobId(args.job_id))))


async def _jobs_rerun(settings: Settings, args: argparse.Namespace) -> int:
    return await _with_runtime(settings, lambda rt: _public(rt.queue.rerun(JobId(args.job_id))))


async def _jobs_cancel(settings: Settings, args: argparse.Namespace) -> int:
    return await _with_runtime(settings, lambda rt: _public(rt.queue.cancel(JobId(args.job_id))))


async def _jobs_events(settings: Settings, args: argparse.Namespace) -> int:
    async def run(rt: Runtime) -> Any:
        await rt.store.get(JobId(args.job_id))
        return {"items": [vars_of(e) for e in await rt.store.events(JobId(args.job_id))]}

    return await _with_runtime(settings, run)


async def _jobs_retry_failed(settings: Settings, args: argparse.Namespace) -> int:
    flt = FailedFilter(ids=[JobId(i) for i in args.ids] if args.ids else None,
                       task_type=args.task_type, failed_after=args.failed_after,
                       failed_before=args.failed_before)

    async def run(rt: Runtime) -> Any:
        ids = await rt.queue.retry_failed(flt)
        return {"retried": len(ids), "ids": ids}

    return await _with_runtime(settings, run)


async def _demo_data(settings: Settings, args: argparse.Namespace) -> int:
    with _reaching_the_database():
        made = await app.demo_data(settings, tenants=args.tenants, customers=args.customers,
                                   employees=args.employees, transactions=args.transactions)
    _print(made)
    return 0


def _utc_time(text: str) -> datetime:
    """An ISO 8601 time; without an offset it is UTC, as on the dashboard (not the local zone)."""
    try:
        return utc_from_text(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{exc} (got {text})") from None


def _count(least: int, most: int | None = None) -> Callable[[str], int]:
    def count(text: str) -> int:
        value = int(text)
        if value < least or (most is not None and value > most):
            bounds = f"at least {least}" if most is None else f"{least} to {most}"
            raise argparse.ArgumentTypeError(f"must be {bounds} (got {text})")
        return value

    return count


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, not {type(value).__name__}")
    return value


def _cursor(text: str) -> str:
    """A list's cursor is the id of the last page's last job: other text would restart the list."""
    if re.fullmatch(JOB_ID_PATTERN, text) is None:
        raise argparse.ArgumentTypeError(f"not a cursor a page gave out (got {text!r})")
    return text


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


async def _public(row: Awaitable[Any]) -> Any:
    return (await row).public()


def vars_of(event: Any) -> dict[str, Any]:
    return {"at": event.at.isoformat(), "event": event.event, "status": event.status,
            "attempt": event.attempt, "process": event.process, "message": event.message}


if __name__ == "__main__":
    raise SystemExit(main())

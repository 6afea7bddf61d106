"""`python -m bench [--scenario NAME] [--backend sqlite|postgres] [--jobs N] [--repeat N]
[--soak-seconds S] [--soak-rate JOBS_PER_S] [--json]`."""

from __future__ import annotations

import argparse
import asyncio
import os

from bench import scenarios
from bench.support import Report, versions

SCENARIOS = ("throughput", "pickup", "ceiling", "retry", "http", "scale", "workers", "dashboard",
             "soak")
DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/postgres"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--scenario", choices=SCENARIOS, action="append",
                        help="run only these (repeatable); default: all but dashboard and soak;"
                             " workers (one vs two worker processes) runs on PostgreSQL only")
    parser.add_argument("--backend", choices=("sqlite", "postgres"), action="append")
    parser.add_argument("--jobs", type=int, default=50_000)
    parser.add_argument("--history", type=int, default=1_000_000,
                        help="finished (and due) jobs for the scale and dashboard scenarios")
    parser.add_argument("--soak-seconds", type=float, default=1200.0)
    parser.add_argument("--soak-rate", type=_soak_rate, metavar="JOBS_PER_S",
                        help="the soak's steady load; default: half the end to end just measured")
    parser.add_argument("--repeat", type=int, default=1, metavar="N",
                        help="run it all N times; then each figure's median (and --json gives it)")
    parser.add_argument("--json", action="store_true", help="end with one JSON object per figure")
    args = parser.parse_args()
    pg_url = os.environ.get("CARWASH_TEST_POSTGRES_URL", DEFAULT_PG)
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()))
    print(f"cpus: {os.cpu_count()}; jobs per run: {args.jobs:,}")
    runs = asyncio.run(repeat(args, pg_url))
    summary = runs[0] if args.repeat == 1 else Report.median_of(runs)
    if args.json:
        summary.dump_json()


def _soak_rate(text: str) -> float:
    """A soak rate given by hand, so runs on machines of different speed can be compared."""
    try:
        rate = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 1 <= rate <= 1_000_000:
        raise argparse.ArgumentTypeError(f"must be 1-1,000,000 jobs/s, not {text}")
    return rate


async def repeat(args: argparse.Namespace, pg_url: str) -> list[Report]:
    """All the runs on one event loop: the pickup scenario's module-level Event is bound to it."""
    runs: list[Report] = []
    for n in range(1, args.repeat + 1):
        if args.repeat > 1:
            print(f"run {n} of {args.repeat}:", flush=True)
        runs.append(Report())
        await run(runs[-1], args, pg_url)
    return runs


async def run(report: Report, args: argparse.Namespace, pg_url: str) -> None:
    chosen = args.scenario or [s for s in SCENARIOS if s not in ("dashboard", "soak")]
    for backend in args.backend or ["sqlite", "postgres"]:
        ceiling = None
        if "ceiling" in chosen:
            ceiling = await scenarios.ceiling(report, backend, pg_url, args.jobs)
        e2e = await _engine_scenarios(report, args, pg_url, backend, chosen)
        await _system_scenarios(report, args, pg_url, backend, chosen, e2e)
        if ceiling is not None:
            report.add_fractions(backend, ceiling)


async def _engine_scenarios(report: Report, args: argparse.Namespace, pg_url: str, backend: str,
                            chosen: list[str]) -> float | None:
    """The engine in one process; returns the end-to-end rate (the soak runs at half of it)."""
    e2e = None
    if "throughput" in chosen or ("soak" in chosen and args.soak_rate is None):
        e2e = await scenarios.throughput(report, backend, pg_url, args.jobs)
    if "retry" in chosen:
        await scenarios.retry(report, backend, pg_url, args.jobs)
    if "pickup" in chosen:
        await scenarios.pickup(report, backend, pg_url)
        if backend == "postgres":
            await scenarios.pickup_cross_process(report, pg_url)
    return e2e


async def _system_scenarios(report: Report, args: argparse.Namespace, pg_url: str, backend: str,
                            chosen: list[str], e2e: float | None) -> None:
    """The service over HTTP, big tables, worker processes, and time."""
    if "http" in chosen:
        from bench import http

        await http.run(report, backend, pg_url)
    if "scale" in chosen:
        with_history = await scenarios.scale(report, backend, pg_url, args.jobs, args.history)
        if e2e:
            report.add("scale", backend, "end_to_end_slowdown_with_history",
                       1 - with_history / e2e, "x")
    if "workers" in chosen and backend == "postgres":
        await scenarios.workers(report, pg_url, args.jobs)
    if "dashboard" in chosen:
        from bench import dashboard

        await dashboard.run(report, backend, pg_url, args.history)
    if "soak" in chosen:
        rate = args.soak_rate or (e2e or 1000) / 2
        await scenarios.soak(report, backend, pg_url, rate, args.soak_seconds)

if __name__ == "__main__":
    main()

"""The garbage collector of a long-running process (`serve`, any role).

CPython's cycle collector walks every tracked object in a full collection, and a served
process holds a few hundred thousand that live as long as it does: Litestar's routes, pydantic
validators, SQLAlchemy's metadata. Each full collection stopped the event loop for tens of
milliseconds; under HTTP load they were the p99 of an enqueue (83-100 ms, against 32 ms with
the collector off; measured with `python -m bench --scenario http`). Once the process has
started, what exists is moved to the permanent generation (gc.freeze), which collections
skip: the p99 came down to 33-40 ms.

The youngest generation is collected after YOUNG_THRESHOLD more tracked objects instead of
CPython's 700. A job in flight holds a few dozen (its task, coroutine, row, futures), so with a
hundred slots busy the count crossed 700 again and again and the collector ran though nothing
was cyclic garbage: in a 60,000-job SQLite drain it ran 2,800 times and took 3.6 % of the
drain with everything frozen; above about 5,000 it does not run at all in a drain, and a
bulk enqueue collects a tenth as often. Cyclic garbage waits a little longer to be freed, at
most that many objects.

A served process calls this once it has started (the HTTP server's startup, the worker's
loop); the benchmarks do too, so that they measure the engine as served. Tests and code that
embeds a runtime do not: they build many runtimes in one process, and frozen objects are never
collected.
"""

from __future__ import annotations

import gc

#: tracked objects made (net of those freed) before the youngest generation is collected
YOUNG_THRESHOLD = 10_000


def settle_after_startup() -> None:
    """Call once the process has started: everything made so far lives as long as it."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, older, oldest)

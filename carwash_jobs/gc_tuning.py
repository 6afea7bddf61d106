"""The garbage collector of a long-running process (`serve`, any role).

CPython's cycle collector walks every tracked object in a full collection, and a served
process holds a few hundred thousand that live as long as it does: Litestar's routes, pydantic
validators, SQLAlchemy's metadata. Each full collection stopped the event loop for tens of
milliseconds; under HTTP load they were the p99 of an enqueue (83-100 ms, against 32 ms with
the collector off; measured with `python -m bench --scenario http`). Two settings make
collections cheap again without turning the collector off:

- once started, what exists is moved to the permanent generation (gc.freeze), which
  collections skip;
- the youngest generation is collected after more allocations, so an enqueue's short-lived
  objects are mostly freed by reference counting before any collection looks at them.

Only the CLI calls this: tests build many runtimes in one process, and frozen objects are
never collected.
"""

from __future__ import annotations

import gc

#: allocations between collections of the youngest generation (CPython's default is 700), and
#: how many of those before a collection of the next two (default 10 and 10)
THRESHOLDS = (10_000, 50, 100)


def settle_after_startup() -> None:
    """Call once the process has started: everything made so far lives as long as it."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)

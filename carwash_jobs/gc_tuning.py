"""The garbage collector of a long-running process (`serve`, any role).

CPython's cycle collector walks every tracked object in a full collection, and a served
process holds a few hundred thousand that live as long as it does: Litestar's routes, pydantic
validators, SQLAlchemy's metadata. Each full collection stopped the event loop for tens of
milliseconds; under HTTP load they were the p99 of an enqueue (83-100 ms, against 32 ms with
the collector off; measured with `python -m bench --scenario http`). Once the process has
started, what exists is moved to the permanent generation (gc.freeze), which collections
skip: the p99 came down to 33-40 ms. Collecting less often as well (larger thresholds) made no
difference beyond the noise, so CPython's thresholds stay.

Only the CLI calls this: tests build many runtimes in one process, and frozen objects are
never collected.
"""

from __future__ import annotations

import gc


def settle_after_startup() -> None:
    """Call once the process has started: everything made so far lives as long as it."""
    gc.collect()
    gc.freeze()

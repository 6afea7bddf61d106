"""Dependency providers: hand handlers the pieces of the process's Runtime kept on app.state.

Handlers name what they need (`job_queue: QueueDep`) and never reach for a global;
the composition root puts the Runtime on app.state, so tests can build as many apps as they like.
"""

from typing import Protocol, TypeAlias, cast

from litestar.datastructures import State
from litestar.di import NamedDependency, Provide
from litestar.params import SkipValidation

from carwash_jobs.metrics import Metrics
from carwash_jobs.queue import JobQueue
from carwash_jobs.store.base import JobStore

#: the key of the Runtime on app.state
RUNTIME_KEY = "runtime"

#: how a handler asks for the queue
QueueDep: TypeAlias = NamedDependency[JobQueue]
#: how a handler asks for the store; unvalidated, since JobStore is a protocol (no isinstance)
StoreDep: TypeAlias = NamedDependency[SkipValidation[JobStore]]


class RuntimeParts(Protocol):
    """What the HTTP layer uses of a Runtime. A protocol, not an import of carwash_jobs.runtime:
    that module builds concrete stores, which the endpoints must not depend on."""

    @property
    def queue(self) -> JobQueue: ...

    @property
    def store(self) -> JobStore: ...

    @property
    def metrics(self) -> Metrics: ...


def runtime_of(state: State) -> RuntimeParts:
    return cast(RuntimeParts, state[RUNTIME_KEY])


def provide_queue(state: State) -> JobQueue:
    return runtime_of(state).queue


def provide_store(state: State) -> JobStore:
    return runtime_of(state).store


def provide_metrics(state: State) -> Metrics:
    return runtime_of(state).metrics


def dependencies() -> dict[str, Provide]:
    """The app-wide providers; each is a cheap attribute read, so none needs a thread. The
    queue and store are `job_queue` and `job_store`, leaving `queue` free for a query filter."""
    return {
        "job_queue": Provide(provide_queue, sync_to_thread=False),
        "job_store": Provide(provide_store, sync_to_thread=False),
        "metrics": Provide(provide_metrics, sync_to_thread=False),
    }

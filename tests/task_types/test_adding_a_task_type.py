"""Adding a task type is one module plus one config line, proved with a test-only module.

sample_module.py is found by its dotted path and runs end to end through the real engine."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from carwash_jobs.errors import InvalidPayload
from carwash_jobs.lifecycle import JobStatus
from carwash_jobs.registry import TaskRegistry
from tests.task_types.support import run_job

if TYPE_CHECKING:
    from tests.task_types.support import Runtimes

SAMPLE = "tests.task_types.sample_module"


def test_the_registry_finds_the_module_by_its_dotted_path() -> None:
    registry = TaskRegistry.load([SAMPLE])

    assert registry.names() == ["tally"]
    assert registry.by_slug("tally").description.startswith("Add up numbers")


async def test_the_sample_task_type_runs_end_to_end(runtimes: Runtimes) -> None:
    runtime = await runtimes.start(task_types=[SAMPLE])  # the one config line

    job = await run_job(runtime, "tally", {"numbers": [3, 4, 5, 6, 7], "chunk_size": 2})

    assert job.status == JobStatus.completed, job.error
    assert job.result == {"total": 25, "count": 5}
    assert job.checkpoint == {"done": 5, "total": 25}
    assert (job.progress_done, job.progress_total) == (5, 5)
    assert runtime.registry.names() == ["tally"]


async def test_its_payload_model_guards_the_queue(runtimes: Runtimes) -> None:
    runtime = await runtimes.start(task_types=[SAMPLE])

    with pytest.raises(InvalidPayload) as refused:
        await runtime.queue.enqueue("tally", {"numbers": []})

    assert refused.value.field == "numbers"


async def test_it_sits_beside_the_car_wash_task_types(runtimes: Runtimes) -> None:
    runtime = await runtimes.start(task_types=["task_types.email", SAMPLE])

    assert runtime.registry.names() == ["email", "tally"]

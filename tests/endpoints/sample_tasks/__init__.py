"""Test-only task types, one module each (the registry loads one TASK_TYPE per module path).

echo returns its payload, fail raises PermanentError, slow sleeps, upload reads its stored file.
"""

from __future__ import annotations

#: Settings.task_types for the endpoint tests
MODULES = [
    "tests.endpoints.sample_tasks.echo",
    "tests.endpoints.sample_tasks.fail",
    "tests.endpoints.sample_tasks.slow",
    "tests.endpoints.sample_tasks.upload",
]

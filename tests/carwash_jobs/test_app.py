"""Tests for carwash_jobs/app.py: the API token kept beside the database, create_app's
refusals, and the registry's defaults from the settings. (The app itself is tested through
tests/endpoints/.)"""

from __future__ import annotations

import stat
from datetime import timedelta
from typing import TYPE_CHECKING

import pytest

from carwash_jobs.app import (
    TOKEN_FILE_NAME,
    build_registry,
    create_app,
    ensure_api_token,
    token_path,
)
from carwash_jobs.errors import ConfigurationError
from carwash_jobs.settings import Settings, load_settings

if TYPE_CHECKING:
    from pathlib import Path

SAMPLE_TASKS = ["tests.endpoints.sample_tasks.echo"]


def settings_in(directory: Path, **overrides: object) -> Settings:
    return load_settings(
        database_url=f"sqlite+aiosqlite:///{directory / 'db' / 'carwash.db'}",
        task_types=SAMPLE_TASKS, schedules_file="", **overrides,
    )


def test_a_configured_token_is_used_as_it_is(tmp_path: Path) -> None:
    settings, generated = ensure_api_token(settings_in(tmp_path, api_token="configured"))

    assert generated is None
    assert settings.api_token is not None
    assert settings.api_token.get_secret_value() == "configured"
    assert not (tmp_path / "db" / TOKEN_FILE_NAME).exists()


def test_a_token_is_generated_beside_the_database_owner_only(tmp_path: Path) -> None:
    settings, generated = ensure_api_token(settings_in(tmp_path))

    path = tmp_path / "db" / TOKEN_FILE_NAME
    assert token_path(settings) == path
    assert generated is not None
    assert len(generated) >= 40
    assert path.read_text(encoding="ascii").strip() == generated
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert settings.api_token is not None
    assert settings.api_token.get_secret_value() == generated


def test_the_kept_token_is_reused_and_not_shown_again(tmp_path: Path) -> None:
    _, first = ensure_api_token(settings_in(tmp_path))

    settings, again = ensure_api_token(settings_in(tmp_path))

    assert again is None
    assert settings.api_token is not None
    assert settings.api_token.get_secret_value() == first


def test_an_empty_token_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "db").mkdir()
    (tmp_path / "db" / TOKEN_FILE_NAME).write_text("\n", encoding="ascii")

    with pytest.raises(ConfigurationError, match="empty"):
        ensure_api_token(settings_in(tmp_path))


def test_postgresql_needs_a_configured_token() -> None:
    settings = load_settings(database_url="postgresql+asyncpg://u@db/carwash", task_types=SAMPLE_TASKS)

    with pytest.raises(ConfigurationError, match="CARWASH_API_TOKEN"):
        ensure_api_token(settings)


def test_create_app_needs_a_token(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="API token"):
        create_app(settings_in(tmp_path))


def test_create_app_refuses_the_worker_role(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="worker"):
        create_app(settings_in(tmp_path, api_token="t"), role="worker")


def test_the_registry_takes_attempts_and_timeout_defaults_from_the_settings(tmp_path: Path) -> None:
    """The sample echo task type sets max_attempts (3) and leaves its timeout to the settings."""
    registry = build_registry(
        settings_in(tmp_path, default_max_attempts=9, default_timeout_seconds=7.5)
    )
    echo = registry.get("echo")

    assert registry.defaults.max_attempts == 9
    assert registry.max_attempts(echo) == 3
    assert registry.timeout(echo) == timedelta(seconds=7.5)

"""Tests for carwash_jobs/app.py: the API token kept beside the database, create_app's
refusals, the registry's defaults from the settings, and the directories made at start-up.
(The app itself is tested through tests/endpoints/.)"""

from __future__ import annotations

import mailbox
import stat
from datetime import timedelta
from typing import TYPE_CHECKING

import pytest

from carwash_jobs.app import (
    TOKEN_FILE_NAME,
    build_registry,
    create_app,
    ensure_api_token,
    prepare_directories,
    token_path,
)
from carwash_jobs.errors import ConfigurationError
from carwash_jobs.settings import Settings, load_settings

if TYPE_CHECKING:
    from pathlib import Path

    from carwash_jobs.runtime import Role

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


@pytest.mark.parametrize(("role", "smtp", "made"), [
    ("all", "outbox", {"db", "files", "mail"}),
    ("api", "outbox", {"db", "files"}),  # it sends no mail
    ("worker", "outbox", {"db", "mail"}),  # it takes no uploads
    ("worker", "smtp", {"db"}),
])
def test_start_up_makes_the_directories_its_role_writes_to(
    tmp_path: Path, role: Role, smtp: str, made: set[str]
) -> None:
    smtp_url = f"outbox:{tmp_path / 'mail'}" if smtp == "outbox" else "smtp://mail.example:587"
    settings = settings_in(tmp_path, files_dir=str(tmp_path / "files"), smtp_url=smtp_url)

    prepare_directories(settings, role)

    assert {p.name for p in tmp_path.iterdir()} == made
    assert [p.name for p in (tmp_path / "db").iterdir()] == []  # the probe is gone
    if "mail" in made:  # a Maildir, private, as the email task type's delivery makes one
        assert sorted(p.name for p in (tmp_path / "mail").iterdir()) == ["cur", "new", "tmp"]
        assert stat.S_IMODE((tmp_path / "mail").stat().st_mode) == 0o700


def test_an_outbox_made_empty_beforehand_becomes_a_maildir_that_takes_mail(tmp_path: Path) -> None:
    """mailbox.Maildir makes its tmp/, new/ and cur/ only with the outbox itself: in an outbox
    that exists without them, every message failed."""
    (tmp_path / "mail").mkdir()
    settings = settings_in(tmp_path, smtp_url=f"outbox:{tmp_path / 'mail'}")

    prepare_directories(settings, "worker")

    mailbox.Maildir(tmp_path / "mail", create=False).add("Subject: hi\n\nbody\n")


@pytest.mark.parametrize(("role", "setting"), [
    ("all", "database_url"), ("api", "files_dir"), ("worker", "smtp_url"),
])
def test_a_directory_under_a_regular_file_is_refused_naming_its_setting(
    tmp_path: Path, role: Role, setting: str
) -> None:
    """Under a regular file, because root (as tests often run) ignores permission bits."""
    in_the_way = tmp_path / "a-file"
    in_the_way.write_text("x", encoding="ascii")
    usable = {"database_url": f"sqlite+aiosqlite:///{tmp_path / 'carwash.db'}",
              "files_dir": str(tmp_path / "files"), "smtp_url": f"outbox:{tmp_path / 'mail'}"}
    unusable = {"database_url": f"sqlite+aiosqlite:///{in_the_way / 'carwash.db'}",
                "files_dir": str(in_the_way / "files"), "smtp_url": f"outbox:{in_the_way / 'mail'}"}
    settings = load_settings(task_types=SAMPLE_TASKS, schedules_file="",
                             **{**usable, setting: unusable[setting]})

    with pytest.raises(ConfigurationError, match=rf"^CARWASH_{setting.upper()} / {setting}: "):
        prepare_directories(settings, role)

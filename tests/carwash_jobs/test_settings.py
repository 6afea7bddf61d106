"""Tests for carwash_jobs/settings.py: precedence, loud failures, and the shipped config file."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import pytest

from carwash_jobs.errors import ConfigurationError
from carwash_jobs.settings import Settings, config_path, env_name, load_settings

REPO_ROOT = Path(__file__).resolve().parents[2]
SHIPPED_CONFIG = REPO_ROOT / "config" / "carwash.toml"
#: Settings whose default is None: the shipped file shows them commented out.
COMMENTED_OUT = {"api_token", "financial_database_url", "ui_secure_cookie"}


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Each test starts in an empty directory with no CARWASH_* variables, so neither the
    developer's shell nor the repository's config file leaks in."""
    for name in list(os.environ):
        if name.upper().startswith("CARWASH_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def write_config(directory: Path, text: str) -> Path:
    path = directory / "config" / "carwash.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_apply_without_a_config_file() -> None:
    settings = load_settings()

    assert config_path() is None
    assert settings.concurrency == 10
    assert settings.database_url == "sqlite+aiosqlite:///./carwash.db"
    assert settings.api_token is None
    assert settings.queues == {"critical": 100, "default": 10, "bulk": 1}
    assert settings.is_sqlite


def test_config_file_beats_defaults(tmp_path: Path) -> None:
    write_config(tmp_path, 'concurrency = 3\nlog_format = "json"\n[queues]\ndefault = 7\n')

    settings = load_settings()

    assert settings.concurrency == 3
    assert settings.log_format == "json"
    assert settings.queues == {"default": 7}
    assert settings.email_rate_per_minute == 600  # untouched keys keep their defaults


def test_environment_beats_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_config(tmp_path, "concurrency = 3\nport = 9000\n")
    monkeypatch.setenv("CARWASH_CONCURRENCY", "4")

    settings = load_settings()

    assert settings.concurrency == 4
    assert settings.port == 9000


def test_overrides_beat_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CARWASH_CONCURRENCY", "4")

    assert load_settings(concurrency=5).concurrency == 5


def test_carwash_config_names_another_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_config(tmp_path, "concurrency = 3\n")
    other = tmp_path / "elsewhere.toml"
    other.write_text("concurrency = 8\n", encoding="utf-8")
    monkeypatch.setenv("CARWASH_CONFIG", str(other))

    assert config_path() == other
    assert load_settings().concurrency == 8


def test_carwash_config_naming_a_missing_file_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CARWASH_CONFIG", "conf/typo.toml")

    with pytest.raises(
        ConfigurationError,
        match=r"CARWASH_CONFIG names 'conf/typo\.toml'.*"
        r"does not exist",
    ):
        load_settings()


def test_carwash_config_naming_a_directory_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CARWASH_CONFIG", str(tmp_path))

    with pytest.raises(ConfigurationError, match="is not a file"):
        load_settings()


def test_unknown_key_in_config_file_fails_naming_it(tmp_path: Path) -> None:
    path = write_config(tmp_path, "concurency = 3\n")

    with pytest.raises(ConfigurationError) as caught:
        load_settings()

    assert "unknown setting 'concurency'" in caught.value.message
    assert str(path.relative_to(tmp_path)) in caught.value.message


def test_invalid_toml_fails_naming_the_file(tmp_path: Path) -> None:
    write_config(tmp_path, "concurrency = = 3\n")

    with pytest.raises(ConfigurationError, match=r"config/carwash\.toml is not valid TOML"):
        load_settings()


def test_invalid_value_in_environment_names_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CARWASH_CONCURRENCY", "0")

    with pytest.raises(ConfigurationError) as caught:
        load_settings()

    assert caught.value.message == (
        "CARWASH_CONCURRENCY / concurrency: Input should be greater than or equal to 1"
        " (set by CARWASH_CONCURRENCY)"
    )


def test_invalid_value_in_config_file_says_where_it_was_set(tmp_path: Path) -> None:
    write_config(tmp_path, "lease_seconds = -1.0\n")

    with pytest.raises(
        ConfigurationError,
        match=r"CARWASH_LEASE_SECONDS / lease_seconds: "
        r"Input should be greater than or equal to 0\.01 \(in config/carwash\.toml\)",
    ):
        load_settings()


def test_every_invalid_value_is_reported_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CARWASH_CONCURRENCY", "0")
    monkeypatch.setenv("CARWASH_PORT", "eighty")

    with pytest.raises(ConfigurationError) as caught:
        load_settings()

    assert "CARWASH_CONCURRENCY / concurrency" in caught.value.message
    assert "CARWASH_PORT / port" in caught.value.message


def test_pydantic_error_is_kept_as_the_cause(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CARWASH_CONCURRENCY", "0")

    with pytest.raises(ConfigurationError) as caught:
        load_settings()

    assert type(caught.value.__cause__).__name__ == "ValidationError"


@pytest.mark.parametrize(
    "url", ["postgres://app:secret@db/carwash", "sqlite:///./carwash.db", "mysql+aiomysql://db"]
)
def test_database_url_with_unsupported_scheme_fails(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CARWASH_DATABASE_URL", url)

    with pytest.raises(ConfigurationError) as caught:
        load_settings()

    assert caught.value.message.startswith("CARWASH_DATABASE_URL / database_url: must start with")
    assert "secret" not in caught.value.message


def test_postgres_database_url_is_not_sqlite(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CARWASH_DATABASE_URL", "postgresql+asyncpg://app@db:5432/carwash")

    assert not load_settings().is_sqlite


def test_financial_database_url_is_checked_like_the_main_one() -> None:
    with pytest.raises(ConfigurationError, match="CARWASH_FINANCIAL_DATABASE_URL"):
        load_settings(financial_database_url="postgres://pos-db/pos")
    assert load_settings(financial_database_url="postgresql+asyncpg://pos-db/pos")


def test_heartbeat_not_shorter_than_lease_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CARWASH_LEASE_SECONDS", "10")
    monkeypatch.setenv("CARWASH_HEARTBEAT_INTERVAL_SECONDS", "10")

    with pytest.raises(ConfigurationError) as caught:
        load_settings()

    assert "CARWASH_HEARTBEAT_INTERVAL_SECONDS / heartbeat_interval_seconds" in caught.value.message
    assert "CARWASH_LEASE_SECONDS / lease_seconds" in caught.value.message


@pytest.mark.parametrize(
    "url",
    ["outbox:./outbox", "smtp://mail:25", "smtp://user:pass@mail.example.com:587", "smtps://m:465"],
)
def test_smtp_url_accepted_forms(url: str) -> None:
    assert load_settings(smtp_url=url).smtp_url == url


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://mail:25", "got scheme 'http'"),
        ("smtp://mail", "needs a host and a port"),
        ("smtp://:25", "needs a host and a port"),
        ("outbox:", "needs a directory"),
    ],
)
def test_smtp_url_rejected_forms(url: str, problem: str) -> None:
    with pytest.raises(ConfigurationError, match=f"CARWASH_SMTP_URL / smtp_url: .*{problem}"):
        load_settings(smtp_url=url)


def test_task_types_from_environment_are_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CARWASH_TASK_TYPES", '["task_types.email", "acme.jobs.invoices"]')

    assert load_settings().task_types == ["task_types.email", "acme.jobs.invoices"]


def test_task_types_that_are_not_json_fail_naming_the_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CARWASH_TASK_TYPES", "task_types.email,task_types.file_upload")

    with pytest.raises(ConfigurationError, match=r"CARWASH_TASK_TYPES / task_types: .*JSON"):
        load_settings()


def test_task_type_that_is_not_a_module_path_fails() -> None:
    with pytest.raises(ConfigurationError, match=r"'task_types/email\.py' is not a dotted module"):
        load_settings(task_types=["task_types/email.py"])


def test_queues_from_environment_are_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CARWASH_QUEUES", '{"default": 1, "reports": 5}')

    assert load_settings().queues == {"default": 1, "reports": 5}


@pytest.mark.parametrize(
    ("queues", "problem"),
    [({"default": 0}, "every weight must be > 0"), ({"bulk": 1}, "must include the 'default'")],
)
def test_bad_queues_fail(queues: dict[str, int], problem: str) -> None:
    with pytest.raises(ConfigurationError, match=f"CARWASH_QUEUES / queues: .*{problem}"):
        load_settings(queues=queues)


def test_blank_api_token_fails() -> None:
    with pytest.raises(ConfigurationError, match="CARWASH_API_TOKEN / api_token: must not be blank"):
        load_settings(api_token=" ")


def test_empty_environment_variable_counts_as_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CARWASH_API_TOKEN", "")

    assert load_settings().api_token is None


def test_api_token_is_not_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CARWASH_API_TOKEN", "s3cret-token")

    settings = load_settings()

    assert settings.api_token is not None
    assert settings.api_token.get_secret_value() == "s3cret-token"
    assert "s3cret-token" not in repr(settings)


def test_log_level_is_normalised_and_checked() -> None:
    assert load_settings(log_level="debug").log_level == "DEBUG"
    with pytest.raises(ConfigurationError, match="CARWASH_LOG_LEVEL / log_level"):
        load_settings(log_level="LOUD")


def test_unknown_override_fails_naming_it() -> None:
    with pytest.raises(ConfigurationError, match="unknown setting 'concurency'"):
        load_settings(concurency=3)


def test_settings_are_frozen() -> None:
    settings = load_settings()

    with pytest.raises(ValueError, match="frozen"):
        settings.concurrency = 2  # type: ignore[misc]


def test_env_name_matches_what_pydantic_settings_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(env_name("write_batch_max"), "7")

    assert load_settings().write_batch_max == 7


def test_shipped_config_file_equals_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = load_settings()  # tmp_path: no config file

    monkeypatch.setenv("CARWASH_CONFIG", str(SHIPPED_CONFIG))

    assert load_settings() == defaults


def test_shipped_config_file_lists_every_setting() -> None:
    with SHIPPED_CONFIG.open("rb") as file:
        keys = set(tomllib.load(file))
    text = SHIPPED_CONFIG.read_text(encoding="utf-8")

    assert keys == set(Settings.model_fields) - COMMENTED_OUT
    for name in COMMENTED_OUT:
        assert f"# {name} = " in text


def test_every_setting_is_described() -> None:
    undescribed = [name for name, field in Settings.model_fields.items() if not field.description]

    assert undescribed == []


def test_shipped_schedules_file_is_valid_toml() -> None:
    with (REPO_ROOT / "config" / "schedules.toml").open("rb") as file:
        # test_cron.py loads and validates each schedule against the shipped task types
        assert isinstance(tomllib.load(file)["schedules"], list)


def test_nothing_is_created_at_import_time() -> None:
    import carwash_jobs.settings as module

    instances = [value for value in vars(module).values() if isinstance(value, Settings)]

    assert instances == []


def test_the_vacuum_interval_is_zero_for_off_or_one_second_to_a_day() -> None:
    assert load_settings(vacuum_interval_seconds=0).vacuum_interval_seconds == 0
    assert load_settings(vacuum_interval_seconds=1).vacuum_interval_seconds == 1
    for refused in (-1, 0.5, 86_401, float("inf"), float("nan")):
        with pytest.raises(ConfigurationError, match="vacuum_interval_seconds"):
            load_settings(vacuum_interval_seconds=refused)


NUMERIC_SETTINGS = [
    name for name, field in Settings.model_fields.items() if field.annotation in (int, float)
]
FLOAT_SETTINGS = [name for name in NUMERIC_SETTINGS if Settings.model_fields[name].annotation is float]


@pytest.mark.parametrize("name", NUMERIC_SETTINGS)
def test_every_numeric_setting_has_a_least_and_a_greatest_value(name: str) -> None:
    """A setting without a maximum took 1e12 or a misplaced exponent and crashed later, far
    from the setting (an OverflowError in timedelta, an interval no scheduler can reach)."""
    kinds = {type(constraint).__name__ for constraint in Settings.model_fields[name].metadata}

    assert kinds & {"Ge", "Gt"}
    assert kinds & {"Le", "Lt"}


@pytest.mark.parametrize(
    ("name", "value"),
    [
        # no float setting takes inf or nan
        *((name, value) for name in FLOAT_SETTINGS for value in ("inf", "-inf", "nan")),
        # each of these crashed or hung `carwash-jobs serve` (or `jobs list`) before
        ("shutdown_grace_seconds", "86401"),
        ("shutdown_grace_seconds", "-1"),
        ("retention_failed_days", "1e10"),
        ("retention_failed_days", "36501"),
        ("retention_completed_days", "36501"),
        ("retention_completed_days", "0"),
        ("reload_interval_seconds", "1e12"),
        ("reload_interval_seconds", "0.001"),
        ("lease_seconds", "1e12"),
        ("prune_interval_seconds", "1e12"),
        ("prune_interval_seconds", "0"),
        ("default_timeout_seconds", "1e300"),
        ("default_timeout_seconds", "0.001"),
        ("heartbeat_interval_seconds", "1e-9"),
        ("heartbeat_interval_seconds", "86401"),
        ("heap_trim_interval_seconds", "86401"),
        ("vacuum_interval_seconds", "86401"),
        ("concurrency", "10001"),
        ("email_rate_per_minute", "1000001"),
        ("max_upload_bytes", "1000000000001"),
        ("default_max_attempts", "1001"),
        ("sqlite_busy_timeout_ms", "2147483648"),
        ("sqlite_busy_timeout_ms", "-1"),
        ("write_batch_max", "100001"),
        ("database_pool_size", "1001"),
        ("port", "65536"),
    ],
)
def test_out_of_range_value_is_refused_naming_the_setting(
    name: str, value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(env_name(name), value)

    with pytest.raises(ConfigurationError) as caught:
        load_settings()

    assert caught.value.message.startswith(f"{env_name(name)} / {name}: ")
    assert caught.value.message.endswith(f"(set by {env_name(name)})")


@pytest.mark.parametrize(
    "values",
    [
        {"shutdown_grace_seconds": 0.0},
        {"shutdown_grace_seconds": 86_400.0},
        {"retention_completed_days": 36_500.0, "retention_failed_days": 36_500.0},
        {"reload_interval_seconds": 0.01, "prune_interval_seconds": 0.01},
        {"reload_interval_seconds": 86_400.0, "prune_interval_seconds": 86_400.0},
        {"heartbeat_interval_seconds": 0.01, "lease_seconds": 0.02},
        {"heartbeat_interval_seconds": 86_400.0, "lease_seconds": 10 * 365 * 86_400.0},
        {"default_timeout_seconds": 0.01},
        {"default_timeout_seconds": 10 * 365 * 86_400.0},
        {"concurrency": 10_000, "database_pool_size": 1_000, "write_batch_max": 100_000},
        {"email_rate_per_minute": 1_000_000, "max_upload_bytes": 10**12},
        {"default_max_attempts": 1_000, "sqlite_busy_timeout_ms": 86_400_000},
    ],
)
def test_values_at_the_bounds_are_accepted(values: dict[str, float]) -> None:
    settings = load_settings(**values)

    assert {name: getattr(settings, name) for name in values} == values


@pytest.mark.parametrize(
    ("variable", "suggestion"),
    [
        ("CARWASH_CONCURENCY", "CARWASH_CONCURRENCY"),
        ("CARWASH_SHUTDOWN_GRACE", "CARWASH_SHUTDOWN_GRACE_SECONDS"),
        ("carwash_concurency", "CARWASH_CONCURRENCY"),  # pydantic-settings reads any case
        ("CARWASH_CONFIG_FILE", "CARWASH_CONFIG"),
    ],
)
def test_misspelt_environment_variable_fails_naming_it_and_the_setting_meant(
    variable: str, suggestion: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(variable, "30")

    with pytest.raises(ConfigurationError) as caught:
        load_settings()

    assert caught.value.message == (
        f"unknown setting {variable} (set in the environment; did you mean {suggestion}?); "
        "see config/carwash.toml for the list"
    )


def test_unknown_environment_variable_without_a_close_setting_fails_naming_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CARWASH_XYZZY", "1")

    with pytest.raises(ConfigurationError) as caught:
        load_settings()

    assert caught.value.message == (
        "unknown setting CARWASH_XYZZY (set in the environment); see config/carwash.toml for the list"
    )


def test_every_unknown_environment_variable_is_reported_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CARWASH_CONCURENCY", "30")
    monkeypatch.setenv("CARWASH_SHUTDOWN_GRACE", "120")

    with pytest.raises(ConfigurationError) as caught:
        load_settings()

    assert caught.value.message.startswith("invalid settings:\n")
    assert "unknown setting CARWASH_CONCURENCY" in caught.value.message
    assert "unknown setting CARWASH_SHUTDOWN_GRACE " in caught.value.message


@pytest.mark.parametrize(
    "variable",
    [
        "CARWASH_CONFIG",
        # read by the test suite, the benchmarks and .ci/run, in the environment of the
        # `carwash-jobs serve` processes they start too
        "CARWASH_TEST_POSTGRES_URL",
        "CARWASH_TEST_RECORD_FILE",
        "CARWASH_TEST_LONG_CAP_SECONDS",
    ],
)
def test_environment_variables_that_are_not_settings_on_purpose_are_allowed(
    variable: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_config(tmp_path, "concurrency = 3\n")
    monkeypatch.setenv(variable, str(tmp_path / "config" / "carwash.toml"))

    assert load_settings().concurrency == 3


def test_a_table_in_the_environment_replaces_the_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_config(tmp_path, "[queues]\ndefault = 5\nfast = 50\n")
    monkeypatch.setenv("CARWASH_QUEUES", '{"default": 1}')

    assert load_settings().queues == {"default": 1}


def test_a_table_passed_to_load_settings_replaces_the_environments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_config(tmp_path, "[queues]\ndefault = 5\nfast = 50\n")
    monkeypatch.setenv("CARWASH_QUEUES", '{"default": 1, "reports": 2}')

    assert load_settings(queues={"default": 3}).queues == {"default": 3}

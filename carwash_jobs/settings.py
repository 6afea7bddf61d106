"""Typed settings, read once at start-up: defaults < config/carwash.toml < CARWASH_* environment."""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Self
from urllib.parse import urlsplit

from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from carwash_jobs.errors import ConfigurationError
from carwash_jobs.heap_trim import TRIM_INTERVAL_SECONDS
from carwash_jobs.types import MAX_DELAY_SECONDS

if TYPE_CHECKING:
    from pydantic.fields import FieldInfo
    from pydantic_core import ErrorDetails

ENV_PREFIX = "CARWASH_"
#: The environment variable that names a config file other than the default one.
CONFIG_ENV_VAR = "CARWASH_CONFIG"
#: Relative to the working directory at load time, so `carwash-jobs serve` in a checkout finds it.
CONFIG_FILE_DEFAULT = Path("config/carwash.toml")
#: CARWASH_* variables that name no setting but are read on purpose.
NOT_SETTINGS = frozenset({CONFIG_ENV_VAR})
#: Reserved for the test suite, the benchmarks and .ci/run (CARWASH_TEST_POSTGRES_URL,
#: CARWASH_TEST_RECORD_FILE, CARWASH_TEST_LONG_CAP_SECONDS), which also pass them to the
#: `carwash-jobs serve` processes they start.
TEST_ENV_PREFIX = "CARWASH_TEST_"
#: How alike a misspelt variable and a setting must be for the message to suggest the setting.
SUGGESTION_CUTOFF = 0.7

DATABASE_SCHEMES = ("sqlite+aiosqlite://", "postgresql+asyncpg://")
SMTP_SCHEMES = ("smtp", "smtps")
LOG_LEVELS = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG")

# Bounds of the numeric settings. Each float setting also refuses inf and nan: an absurd value
# (a misplaced exponent) otherwise starts the service and crashes it later, far from the
# setting, with an OverflowError in datetime arithmetic or a scheduler's interval.
#: the shortest interval or timeout: a loop that waits less than this is a busy loop
SHORTEST_INTERVAL_SECONDS = 0.01
#: the longest interval of a periodic duty (reload, heartbeat, prune, heap trim, vacuum) and
#: the longest shutdown grace; beyond it the duty is as good as never done
ONE_DAY_SECONDS = 86_400
#: the longest lease or handler timeout: ten years, as for a job's delay; far beyond it
#: `now + lease` is past the year 9999, where datetime arithmetic overflows
LONGEST_DURATION_SECONDS = MAX_DELAY_SECONDS
#: the longest retention, a century; far beyond it `now - retention` is before the year 1
LONGEST_RETENTION_DAYS = 36_500


def env_name(field_name: str) -> str:
    """The environment variable that sets `field_name`, for messages that tell the operator what
    to change."""
    return f"{ENV_PREFIX}{field_name.upper()}"


def config_path() -> Path | None:
    """The TOML file that loading reads now, or None when the default file is absent.

    pydantic-settings skips a missing TOML file silently. That is right for the default file
    (defaults apply), but a file the operator named on purpose must exist: a typo there would
    otherwise run production on defaults.
    """
    named = os.environ.get(CONFIG_ENV_VAR)
    if named is None:
        return CONFIG_FILE_DEFAULT if CONFIG_FILE_DEFAULT.is_file() else None
    path = Path(named).expanduser()
    if not path.is_file():
        problem = "is not a file" if path.exists() else "does not exist"
        raise ConfigurationError(
            f"{CONFIG_ENV_VAR} names {named!r}, which {problem} (working directory: {Path.cwd()})"
        )
    return path


def _check_database_url(value: str) -> str:
    if not value.startswith(DATABASE_SCHEMES):
        # Only the scheme is echoed: the rest of a URL may hold a password.
        scheme = value.split("://", 1)[0] if "://" in value else value[:20]
        raise ValueError(f"must start with {' or '.join(DATABASE_SCHEMES)} (got {scheme!r})")
    return value


#: why an interval of under a second is refused, per setting
WHY_AT_MOST_ONCE_A_SECOND = {
    "heap_trim_interval_seconds": "each trim holds the allocator's locks while it walks the "
    "free memory",
    "vacuum_interval_seconds": "each vacuum reads the tables' changed pages and their indexes",
}


class Settings(BaseSettings):
    """Every knob an operator may turn; `config/carwash.toml` lists them all with their defaults."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        # An unknown key in the TOML file is almost always a typo: refuse it rather than
        # silently running with the default.
        extra="forbid",
        frozen=True,
        validate_default=True,
        # `CARWASH_API_TOKEN=` (as docker-compose writes an unset variable) means "not set".
        env_ignore_empty=True,
    )

    database_url: str = Field(
        default="sqlite+aiosqlite:///./carwash.db",
        description="Where jobs are kept; the scheme picks the store adapter (SQLite or PostgreSQL).",
    )
    api_token: SecretStr | None = Field(
        default=None,
        description="Bearer token for /api/*; when unset, `serve` generates one beside the database.",
    )
    smtp_url: str = Field(
        default="outbox:./outbox",
        description="Mail transport: outbox:PATH (a local Maildir) or smtp(s)://[user:pass@]host:port.",
    )
    financial_database_url: str | None = Field(
        default=None,
        description="Where POS transactions are read from; None means the main database.",
    )
    concurrency: int = Field(
        default=10, ge=1, le=10_000, description="Jobs run at once per process, 1 to 10,000."
    )
    email_rate_per_minute: int = Field(
        default=600, ge=1, le=1_000_000,
        description="Messages per minute across the fleet, so no spam flags; 1 to 1,000,000.",
    )
    max_upload_bytes: int = Field(
        default=10_000_000, ge=1, le=10**12,
        description="Largest request body or uploaded file accepted, up to 1 TB.",
    )
    task_types: list[str] = Field(
        default=[
            "task_types.email",
            "task_types.customer_credits",
            "task_types.financial_sync",
            "task_types.file_upload",
        ],
        description="Dotted module paths of the task types to register at start-up.",
    )
    queue_mode: Literal["priority", "weighted"] = Field(
        default="weighted",
        description="priority: higher-ranked queues first; weighted: share slots by weight.",
    )
    queues: dict[str, int] = Field(
        default={"critical": 100, "default": 10, "bulk": 1},
        description="Queue name -> weight (weighted mode) or rank (priority mode); all > 0.",
    )
    reload_interval_seconds: float = Field(
        default=2.0, ge=SHORTEST_INTERVAL_SECONDS, le=ONE_DAY_SECONDS, allow_inf_nan=False,
        description="How often the scheduler reloads due rows from the database, 0.01 s to a day.",
    )
    lease_seconds: float = Field(
        default=60.0, ge=SHORTEST_INTERVAL_SECONDS, le=LONGEST_DURATION_SECONDS,
        allow_inf_nan=False,
        description="How long a claim holds a job before others may take it, up to ten years.",
    )
    heartbeat_interval_seconds: float = Field(
        default=15.0, ge=SHORTEST_INTERVAL_SECONDS, le=ONE_DAY_SECONDS, allow_inf_nan=False,
        description="How often a running job's lease is renewed, 0.01 s to a day; < lease.",
    )
    shutdown_grace_seconds: float = Field(
        default=30.0, ge=0, le=ONE_DAY_SECONDS, allow_inf_nan=False,
        description="How long shutdown waits for running jobs to finish, 0 to a day.",
    )
    default_max_attempts: int = Field(
        # the API's max_attempts allows as many (endpoints/schemas.py)
        default=5, ge=1, le=1_000,
        description="Attempts of a job whose task type and request set none, 1 to 1,000.",
    )
    default_timeout_seconds: float = Field(
        default=1800.0, ge=SHORTEST_INTERVAL_SECONDS, le=LONGEST_DURATION_SECONDS,
        allow_inf_nan=False,
        description="Longest a handler may run when its task type sets none, up to ten years.",
    )
    sqlite_synchronous: Literal["FULL", "NORMAL"] = Field(
        default="FULL",
        description="FULL survives a power cut after the acknowledgement; NORMAL may lose the last.",
    )
    sqlite_busy_timeout_ms: int = Field(
        # SQLite reads a busy timeout above 2**31 - 1 ms (24.8 days) as 0: no wait at all
        default=5000, ge=0, le=ONE_DAY_SECONDS * 1000,
        description="How long SQLite waits for a lock held by another process, up to a day.",
    )
    write_batch_max: int = Field(
        default=500, ge=1, le=100_000, description="Most writes one group commit carries."
    )
    database_pool_size: int = Field(
        default=10, ge=1, le=1_000,
        description="PostgreSQL connections per process (plus one for LISTEN), 1 to 1,000; "
        "SQLite ignores it.",
    )
    files_dir: str = Field(default="./files", min_length=1, description="Where uploaded files are kept.")
    retention_completed_days: float = Field(
        default=7.0, gt=0, le=LONGEST_RETENTION_DAYS, allow_inf_nan=False,
        description="Completed and cancelled jobs (with their events and files) are pruned this many "
        "days after they finished, up to 36,500.",
    )
    retention_failed_days: float = Field(
        default=30.0, gt=0, le=LONGEST_RETENTION_DAYS, allow_inf_nan=False,
        description="Failed jobs are kept this many days after they finished, for inspection and "
        "retry, up to 36,500.",
    )
    prune_interval_seconds: float = Field(
        default=300.0, ge=SHORTEST_INTERVAL_SECONDS, le=ONE_DAY_SECONDS, allow_inf_nan=False,
        description="How often the scheduler prunes jobs past their retention, 0.01 s to a day.",
    )
    heap_trim_interval_seconds: float = Field(
        default=TRIM_INTERVAL_SECONDS, ge=0, le=ONE_DAY_SECONDS, allow_inf_nan=False,
        description="How often a served process hands memory it freed back to the system "
        "(glibc's malloc_trim), 1 to 86400 seconds; 0 turns it off.",
    )
    vacuum_interval_seconds: float = Field(
        default=30.0, ge=0, le=ONE_DAY_SECONDS, allow_inf_nan=False,
        description="How often the scheduler vacuums the queue's tables on a PostgreSQL server "
        "whose autovacuum is off, 1 to 86400 seconds; 0 turns it off. With autovacuum on it "
        "leaves them to the server.",
    )
    log_level: str = Field(default="INFO", description="One of DEBUG, INFO, WARNING, ERROR, CRITICAL.")
    log_format: Literal["text", "json"] = Field(
        default="text", description="text for people, json for log collectors."
    )
    metrics_public: bool = Field(
        default=True, description="Whether /metrics is open without the bearer token."
    )
    ui_secure_cookie: bool | None = Field(
        default=None,
        description="The dashboard's session cookie is Secure (sent over https only): unset, "
                    "when the request came over https; true behind a TLS-terminating proxy.",
    )
    host: str = Field(default="127.0.0.1", min_length=1, description="Address `serve` binds to.")
    port: int = Field(default=8000, ge=0, le=65535, description="Port `serve` binds to (0: any free port).")
    schedules_file: str = Field(
        default="config/schedules.toml",
        description="The cron schedules file, relative to the working directory; \"\" for none.",
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The file is looked up at every construction, not at import time, so tests and
        # `chdir` see the file of the moment. Earlier sources win, each value whole.
        return (
            init_settings,
            _UnlessSetAbove(env_settings),
            _UnlessSetAbove(TomlConfigSettingsSource(settings_cls, toml_file=config_path())),
        )

    @property
    def is_sqlite(self) -> bool:
        """SQLite and PostgreSQL differ in how many processes may share the database."""
        return self.database_url.startswith("sqlite+aiosqlite://")

    @field_validator("database_url")
    @classmethod
    def _database_url_scheme(cls, value: str) -> str:
        return _check_database_url(value)

    @field_validator("financial_database_url")
    @classmethod
    def _financial_database_url_scheme(cls, value: str | None) -> str | None:
        return None if value is None else _check_database_url(value)

    @field_validator("api_token")
    @classmethod
    def _api_token_not_blank(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().strip():
            raise ValueError("must not be blank; leave it unset to have one generated")
        return value

    @field_validator("smtp_url")
    @classmethod
    def _smtp_url_form(cls, value: str) -> str:
        if value.startswith("outbox:"):
            if not value.removeprefix("outbox:"):
                raise ValueError("outbox: needs a directory, e.g. outbox:./outbox")
            return value
        parts = urlsplit(value)
        if parts.scheme not in SMTP_SCHEMES:
            raise ValueError(
                f"must be outbox:PATH, smtp://[user:pass@]host:port or smtps://... "
                f"(got scheme {parts.scheme!r})"
            )
        try:
            port = parts.port
        except ValueError:
            port = None
        if not parts.hostname or port is None:
            raise ValueError(f"{parts.scheme}:// needs a host and a port, e.g. smtp://mail:587")
        return value

    @field_validator("task_types")
    @classmethod
    def _task_types_are_module_paths(cls, value: list[str]) -> list[str]:
        for path in value:
            if not all(part.isidentifier() for part in path.split(".")):
                raise ValueError(f"{path!r} is not a dotted module path")
        if len(set(value)) != len(value):
            raise ValueError("a task type module is listed twice")
        return value

    @field_validator("queues")
    @classmethod
    def _queues_are_weighted(cls, value: dict[str, int]) -> dict[str, int]:
        if "default" not in value:
            raise ValueError("must include the 'default' queue (jobs go there unless told)")
        for name, weight in value.items():
            if weight <= 0:
                raise ValueError(f"queue {name!r} has {weight}; every weight must be > 0")
        return value

    @field_validator("heap_trim_interval_seconds", "vacuum_interval_seconds")
    @classmethod
    def _off_or_at_most_once_a_second(cls, value: float, info: ValidationInfo) -> float:
        if 0 < value < 1:
            why = WHY_AT_MOST_ONCE_A_SECOND[info.field_name or ""]
            raise ValueError(f"must be 0 (off) or at least 1 second (got {value}): {why}")
        return value

    @field_validator("log_level")
    @classmethod
    def _log_level_known(cls, value: str) -> str:
        level = value.upper()
        if level not in LOG_LEVELS:
            raise ValueError(f"must be one of {', '.join(LOG_LEVELS)} (got {value!r})")
        return level

    @model_validator(mode="after")
    def _heartbeat_before_lease_ends(self) -> Self:
        if self.heartbeat_interval_seconds >= self.lease_seconds:
            raise ValueError(
                f"{env_name('heartbeat_interval_seconds')} / heartbeat_interval_seconds "
                f"({self.heartbeat_interval_seconds}) must be less than "
                f"{env_name('lease_seconds')} / lease_seconds ({self.lease_seconds}): "
                "otherwise a lease runs out before the heartbeat renews it"
            )
        return self


class _UnlessSetAbove(PydanticBaseSettingsSource):
    """A source's values of the settings that no earlier (stronger) source sets.

    pydantic-settings merges a table key by key into the stronger source's, so the file's
    `[queues]` kept its other queues under `CARWASH_QUEUES`: a queue could not be removed
    through the environment, which is meant to override the file.
    """

    def __init__(self, source: PydanticBaseSettingsSource) -> None:
        super().__init__(source.settings_cls)
        self._source = source
        # pydantic-settings names a source's values by this in its debug log
        self.__name__ = type(source).__name__

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self._source.get_field_value(field, field_name)

    def __call__(self) -> dict[str, Any]:
        set_above = self.current_state
        return {name: value for name, value in self._source().items() if name not in set_above}


def load_settings(**overrides: Any) -> Settings:
    """Build the Settings for this process, failing with a message an operator can act on.

    Keyword overrides win over everything (tests and CLI flags use them). Every failure becomes
    a ConfigurationError naming the setting, its environment variable and where the bad value
    came from; pydantic's own error is kept as the cause.
    """
    path = config_path()
    _refuse_unknown_environment_variables()
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        origins = _Origins(path, overrides)
        lines = [_describe(error, origins) for error in exc.errors(include_url=False)]
        raise ConfigurationError(_one_message(lines)) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"{path} is not valid TOML: {exc}") from exc
    except OSError as exc:
        raise ConfigurationError(f"cannot read {path}: {exc}") from exc
    except SettingsError as exc:
        # pydantic-settings raises this when a CARWASH_* value of a list/dict setting is not JSON.
        found = re.search(r'field "([^"]+)"', str(exc))
        name = f"{env_name(found.group(1))} / {found.group(1)}: " if found else ""
        cause = f": {exc.__cause__}" if exc.__cause__ is not None else ""
        raise ConfigurationError(
            f"{name}{exc}{cause} (lists and tables in environment variables are written as JSON)"
        ) from exc


def _refuse_unknown_environment_variables() -> None:
    """extra="forbid" refuses an unknown key in the file only: pydantic-settings reads just the
    variables that name a setting, so a misspelt one ran the service on the default."""
    unknown = [name for name in sorted(os.environ) if _is_unknown_variable(name)]
    if unknown:
        raise ConfigurationError(_one_message([_describe_unknown_variable(name) for name in unknown]))


def _is_unknown_variable(name: str) -> bool:
    # upper(): pydantic-settings reads the variables whatever their case
    upper = name.upper()
    return (
        upper.startswith(ENV_PREFIX)
        and upper not in _known_variables()
        and not upper.startswith(TEST_ENV_PREFIX)
    )


def _known_variables() -> list[str]:
    """Sorted, so that of two settings alike a misspelling suggests the same one every time."""
    return sorted(NOT_SETTINGS | {env_name(field_name) for field_name in Settings.model_fields})


def _describe_unknown_variable(name: str) -> str:
    closest = difflib.get_close_matches(name.upper(), _known_variables(), n=1, cutoff=SUGGESTION_CUTOFF)
    suggestion = f"; did you mean {closest[0]}?" if closest else ""
    return (
        f"unknown setting {name} (set in the environment{suggestion}); "
        "see config/carwash.toml for the list"
    )


def _one_message(lines: list[str]) -> str:
    return lines[0] if len(lines) == 1 else "invalid settings:\n  " + "\n  ".join(lines)


class _Origins:
    """Tells where a setting's value came from, so the message says what to edit."""

    def __init__(self, path: Path | None, overrides: dict[str, Any]) -> None:
        self._path = path
        self._overrides = overrides
        self._environment = {key.upper() for key in os.environ}
        self._file_keys: set[str] = set()
        if path is not None:
            try:
                self._file_keys = set(tomllib.loads(path.read_text(encoding="utf-8")))
            except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
                self._file_keys = set()

    def of(self, name: str) -> str:
        if name in self._overrides:
            return "passed to load_settings"
        if env_name(name) in self._environment:
            return f"set by {env_name(name)}"
        if name in self._file_keys:
            return f"in {self._path}"
        return "the default"


def _describe(error: ErrorDetails, origins: _Origins) -> str:
    """One line per problem: `CARWASH_X / x: what is wrong (where it was set)`."""
    ctx = error.get("ctx") or {}
    message = str(ctx["error"]) if error["type"] == "value_error" and "error" in ctx else error["msg"]
    if not error["loc"]:
        return message
    name = str(error["loc"][0])
    if error["type"] == "extra_forbidden":
        return f"unknown setting {name!r} ({origins.of(name)}); see config/carwash.toml for the list"
    dotted = ".".join(str(part) for part in error["loc"])
    return f"{env_name(name)} / {dotted}: {message} ({origins.of(name)})"

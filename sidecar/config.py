"""Settings, parsed once at startup from flags and environment variables.

Every flag of `rule-sidecar serve` has an environment variable (`RULE_SIDECAR_*`), and
the seed's `HOT_RELOAD_*` variables keep their meaning. A flag wins over its variable.
No other module reads the environment.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Final

from sidecar.sources.database import DatabaseTimeouts

__all__ = ["DEFAULT_SETTINGS", "ENVIRONMENT", "Settings", "SettingsError", "settings_from"]


class SettingsError(ValueError):
    """A setting with a value that cannot be used; names the variable or flag."""


_LOG_LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_DATABASE: Final = DatabaseTimeouts()
_PASSWORD_IN_URL: Final = re.compile(r"(?<=://)([^:/@]+):([^@]*)@")


def _masked(value: Any) -> Any:
    return _PASSWORD_IN_URL.sub(r"\1:********@", value) if isinstance(value, str) else value


def _refuse(name: str, value: Any, reason: str) -> None:
    """Name the setting both ways the user may have given it."""
    flag = f"--{name.replace('_', '-')} / " if name in FLAGS else ""
    raise SettingsError(f"{flag}{ENVIRONMENT[name]}={value!r}: {reason}")


@dataclass(frozen=True, slots=True, kw_only=True, repr=False)
class Settings:
    """Everything `rule-sidecar serve` can be told. Values are typed and checked."""

    rules_dirs: tuple[Path, ...] = ()
    host: str = "127.0.0.1"
    port: int = 8000
    metrics_host: str | None = None
    metrics_port: int | None = None
    database_url: str | None = None
    database_password_file: Path | None = None
    database_connect_timeout_seconds: int = _DATABASE.connect
    database_statement_timeout_seconds: float = _DATABASE.statement
    database_read_timeout_seconds: float = _DATABASE.read
    kubernetes_selector: str | None = None
    kubernetes_namespace: str | None = None
    kubernetes_events: bool = False
    kubernetes_watch_timeout_seconds: float = 300.0
    admin_token_file: Path | None = None
    allowed_hosts: tuple[str, ...] = ()
    state_dir: Path | None = None
    hot_reload_enabled: bool = True
    interval_seconds: float = 30.0
    verify_interval_seconds: float = 300.0
    validation_enabled: bool = True
    max_age_seconds: float = 300.0
    allow_empty: bool = False
    debounce_ms: int = 50
    max_body_bytes: int = 1024 * 1024
    reload_rate_per_minute: int = 60
    validate_rate_per_minute: int = 30
    max_batch_items: int = 1000
    max_queued_batches: int = 8
    max_evaluation_seconds: float = 3.0
    max_response_bytes: int = 8 * 1024 * 1024
    idle_timeout_seconds: float = 30.0
    body_timeout_seconds: float = 10.0
    max_connections: int = 256
    metrics_max_connections: int = 32
    history_limit: int = 50
    log_level: str = "INFO"
    reload_worker: bool = True

    def __post_init__(self) -> None:
        for name in ("port", "metrics_port"):
            port = getattr(self, name)
            if port is not None and not 0 <= port <= 65535:
                _refuse(name, port, "not a TCP port (0-65535)")
        for name in (
            "interval_seconds",
            "max_age_seconds",
            "kubernetes_watch_timeout_seconds",
            "database_statement_timeout_seconds",
            "database_read_timeout_seconds",
            "max_evaluation_seconds",
            "idle_timeout_seconds",
            "body_timeout_seconds",
        ):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                _refuse(name, getattr(self, name), "must be a positive number of seconds")
        verify = self.verify_interval_seconds
        if not (math.isfinite(verify) and verify >= 0):
            _refuse("verify_interval_seconds", verify, "must be 0 (never) or a number of seconds")
        minimums = {
            "max_body_bytes": 1024,
            "reload_rate_per_minute": 1,
            "validate_rate_per_minute": 1,
            "max_batch_items": 1,
            "max_queued_batches": 0,
            "max_response_bytes": 1024,
            "max_connections": 1,
            "metrics_max_connections": 1,
            "history_limit": 1,
            "debounce_ms": 0,
            "database_connect_timeout_seconds": 2,  # libpq's minimum
        }
        for name, minimum in minimums.items():
            if getattr(self, name) < minimum:
                _refuse(name, getattr(self, name), f"must be at least {minimum}")
        if self.log_level.upper() not in _LOG_LEVELS:
            _refuse("log_level", self.log_level, f"must be one of {', '.join(_LOG_LEVELS)}")

    @property
    def database_timeouts(self) -> DatabaseTimeouts:
        return DatabaseTimeouts(
            connect=self.database_connect_timeout_seconds,
            statement=self.database_statement_timeout_seconds,
            read=self.database_read_timeout_seconds,
        )

    def __repr__(self) -> str:
        """Like the dataclass repr, with any password in the database URL masked."""
        shown = ", ".join(
            f"{field.name}={_masked(getattr(self, field.name))!r}" for field in fields(self)
        )
        return f"Settings({shown})"


DEFAULT_SETTINGS: Final = Settings()

# field name -> environment variable
ENVIRONMENT: Final[Mapping[str, str]] = {
    "rules_dirs": "RULE_SIDECAR_RULES_DIR",
    "host": "RULE_SIDECAR_HOST",
    "port": "RULE_SIDECAR_PORT",
    "metrics_host": "RULE_SIDECAR_METRICS_HOST",
    "metrics_port": "RULE_SIDECAR_METRICS_PORT",
    "database_url": "RULE_SIDECAR_DATABASE_URL",
    "database_password_file": "RULE_SIDECAR_DATABASE_PASSWORD_FILE",
    "database_connect_timeout_seconds": "RULE_SIDECAR_DATABASE_CONNECT_TIMEOUT_SECONDS",
    "database_statement_timeout_seconds": "RULE_SIDECAR_DATABASE_STATEMENT_TIMEOUT_SECONDS",
    "database_read_timeout_seconds": "RULE_SIDECAR_DATABASE_READ_TIMEOUT_SECONDS",
    "kubernetes_selector": "RULE_SIDECAR_KUBERNETES_SELECTOR",
    "kubernetes_namespace": "RULE_SIDECAR_KUBERNETES_NAMESPACE",
    "kubernetes_events": "RULE_SIDECAR_KUBERNETES_EVENTS",
    "kubernetes_watch_timeout_seconds": "RULE_SIDECAR_KUBERNETES_WATCH_TIMEOUT_SECONDS",
    "admin_token_file": "RULE_SIDECAR_ADMIN_TOKEN_FILE",
    "allowed_hosts": "RULE_SIDECAR_ALLOWED_HOSTS",
    "state_dir": "RULE_SIDECAR_STATE_DIR",
    "hot_reload_enabled": "HOT_RELOAD_ENABLED",
    "interval_seconds": "HOT_RELOAD_INTERVAL_SECONDS",
    "verify_interval_seconds": "RULE_SIDECAR_VERIFY_INTERVAL_SECONDS",
    "validation_enabled": "HOT_RELOAD_VALIDATION_ENABLED",
    "max_age_seconds": "HOT_RELOAD_MAX_AGE_SECONDS",
    "allow_empty": "RULE_SIDECAR_ALLOW_EMPTY",
    "debounce_ms": "RULE_SIDECAR_DEBOUNCE_MS",
    "max_body_bytes": "RULE_SIDECAR_MAX_BODY_BYTES",
    "reload_rate_per_minute": "RULE_SIDECAR_RELOAD_RATE_PER_MINUTE",
    "validate_rate_per_minute": "RULE_SIDECAR_VALIDATE_RATE_PER_MINUTE",
    "max_batch_items": "RULE_SIDECAR_MAX_BATCH_ITEMS",
    "max_queued_batches": "RULE_SIDECAR_MAX_QUEUED_BATCHES",
    "max_evaluation_seconds": "RULE_SIDECAR_MAX_EVALUATION_SECONDS",
    "max_response_bytes": "RULE_SIDECAR_MAX_RESPONSE_BYTES",
    "idle_timeout_seconds": "RULE_SIDECAR_IDLE_TIMEOUT_SECONDS",
    "body_timeout_seconds": "RULE_SIDECAR_BODY_TIMEOUT_SECONDS",
    "max_connections": "RULE_SIDECAR_MAX_CONNECTIONS",
    "metrics_max_connections": "RULE_SIDECAR_METRICS_MAX_CONNECTIONS",
    "history_limit": "RULE_SIDECAR_HISTORY_LIMIT",
    "log_level": "RULE_SIDECAR_LOG_LEVEL",
    "reload_worker": "RULE_SIDECAR_RELOAD_WORKER",
}

# Settings that `rule-sidecar serve` also takes as a flag (--rules-dir, --host, ...).
FLAGS: Final = frozenset(
    {
        "rules_dirs",
        "host",
        "port",
        "metrics_host",
        "metrics_port",
        "database_url",
        "database_password_file",
        "kubernetes_selector",
        "kubernetes_namespace",
        "admin_token_file",
        "state_dir",
        "log_level",
    }
)

_TRUE: Final = {"1", "true", "yes", "on"}
_FALSE: Final = {"0", "false", "no", "off"}


def _boolean(text: str) -> bool:
    lowered = text.lower()
    if lowered not in _TRUE | _FALSE:
        raise ValueError("expected true or false")
    return lowered in _TRUE


# A field's annotation (text, as `from __future__ import annotations` leaves it) -> parser.
_PARSERS: Final[Mapping[str, Callable[[str], Any]]] = {
    "bool": _boolean,
    "int": int,
    "int | None": int,
    "float": float,
    "Path | None": Path,
    "tuple[Path, ...]": lambda text: tuple(Path(part) for part in text.split(os.pathsep) if part),
    "tuple[str, ...]": lambda text: tuple(
        part.strip().lower() for part in text.split(",") if part.strip()
    ),
}


def _convert(text: str, kind: Any, source: str) -> Any:
    """Turn one textual value into the field's type, or say which setting is wrong."""
    text = text.strip()
    parse = _PARSERS.get(kind)
    if parse is None:
        return text
    try:
        return parse(text)
    except ValueError as exc:
        raise SettingsError(f"{source}={text!r}: {exc}") from None


def settings_from(
    environ: Mapping[str, str], overrides: Mapping[str, Any] | None = None
) -> Settings:
    """Settings from environment variables, then explicit overrides (flags) on top.

    An override of None means "not given" and leaves the environment's value.
    """
    values: dict[str, Any] = {}
    for field in fields(Settings):
        variable = ENVIRONMENT[field.name]
        if variable in environ and environ[variable].strip():
            values[field.name] = _convert(environ[variable], field.type, variable)
    for name, value in (overrides or {}).items():
        if value is not None:
            values[name] = value
    return Settings(**values)

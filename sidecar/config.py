"""Settings, parsed once at startup from flags and environment variables.

Each setting is declared once, as a field of `Settings`: its default, its environment
variable (`RULE_SIDECAR_*`; the hot-reload contract's `HOT_RELOAD_*` variables keep their
meaning), its `serve` flag if it has one, how its text is parsed, what values it accepts
and a short help. The variable table (`ENVIRONMENT`), the flags of `rule-sidecar serve` and the
checks are derived from those declarations; a test holds the README's table to them.
A flag wins over its variable. No other module interprets the environment: the command
line hands `os.environ` to `settings_from` and `setting_from`.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Final

from sidecar.pointers import parse_pointer
from sidecar.sources.database import DatabaseTimeouts

__all__ = [
    "DEFAULT_SETTINGS",
    "ENVIRONMENT",
    "FLAGS",
    "Declaration",
    "Settings",
    "SettingsError",
    "declaration",
    "setting_from",
    "settings_from",
]


class SettingsError(ValueError):
    """A setting with a value that cannot be used; names the variable or flag."""


_LOG_LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_DATABASE: Final = DatabaseTimeouts()
_PASSWORD_IN_URL: Final = re.compile(r"(?<=://)([^:/@]+):([^@]*)@")
# The largest value a setting takes: beyond them a value disables what it bounds (a body
# timeout of 1e300 s) or overflows where it is used (a history of 1e23 entries).
_YEAR: Final = 365 * 24 * 3600
_GIB: Final = 1024**3
_MILLION: Final = 1_000_000
_INTEGER: Final = re.compile(r"[+-]?[0-9]+")
_DECIMAL: Final = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_TRUE: Final = {"1", "true", "yes", "on"}
_FALSE: Final = {"0", "false", "no", "off"}

# Parsers: a variable's text -> the field's value (ValueError when it is not one).


def _boolean(text: str) -> bool:
    lowered = text.lower()
    if lowered not in _TRUE | _FALSE:
        raise ValueError("expected true or false")
    return lowered in _TRUE


def _integer(text: str) -> int:
    """ASCII digits only: `int()` also takes full-width digits and `1_000`."""
    if not _INTEGER.fullmatch(text):
        raise ValueError("expected a whole number")
    return int(text)


def _decimal(text: str) -> float:
    """A plain decimal number (`inf` and `nan` are not)."""
    if not _DECIMAL.fullmatch(text):
        raise ValueError("expected a number")
    return float(text)


def _paths(text: str) -> tuple[Path, ...]:
    return tuple(Path(part) for part in text.split(os.pathsep) if part)


def _hosts(text: str) -> tuple[str, ...]:
    return tuple(part.strip().lower() for part in text.split(",") if part.strip())


def _pointers(text: str) -> tuple[str, ...]:
    """','-separated JSON pointers, each checked (kept as written, for messages)."""
    pointers = tuple(part.strip() for part in text.split(",") if part.strip())
    for pointer in pointers:
        parse_pointer(pointer)
    return pointers


# Checks: a value -> why it cannot be used, or None.


def _port(value: int | None) -> str | None:
    return None if value is None or 0 <= value <= 65535 else "not a TCP port (0-65535)"


def _seconds(value: float) -> str | None:
    good = math.isfinite(value) and 0 < value <= _YEAR
    return None if good else f"must be a positive number of seconds, at most {_YEAR:,} (a year)"


def _seconds_or_never(value: float) -> str | None:
    good = math.isfinite(value) and 0 <= value <= _YEAR
    return None if good else f"must be 0 (never) or a number of seconds, at most {_YEAR:,}"


def _between(minimum: int, maximum: int) -> Callable[[int], str | None]:
    def check(value: int) -> str | None:
        good = minimum <= value <= maximum
        return None if good else f"must be from {minimum:,} to {maximum:,}"

    return check


def _fraction(value: float) -> str | None:
    return None if 0 <= value <= 1 else "must be from 0 to 1"


def _log_level(value: str) -> str | None:
    return None if value.upper() in _LOG_LEVELS else f"must be one of {', '.join(_LOG_LEVELS)}"


@dataclass(frozen=True, slots=True)
class Declaration:
    """Everything about one setting but its name, type and default."""

    variable: str
    help: str
    parse: Callable[[str], Any] = str
    check: Callable[[Any], str | None] | None = None
    flag: str | None = None  # the `serve` flag, when the setting has one


def _setting(
    default: Any,
    variable: str,
    help: str,
    *,
    parse: Callable[[str], Any] = str,
    check: Callable[[Any], str | None] | None = None,
    flag: str | None = None,
) -> Any:
    """A `Settings` field declared with its variable, parser, check, flag and help."""
    spec = Declaration(variable, help, parse, check, flag)
    return field(default=default, metadata={"setting": spec})


@dataclass(frozen=True, slots=True, kw_only=True, repr=False)
class Settings:
    """Everything `rule-sidecar serve` can be told. Values are typed and checked."""

    rules_dirs: tuple[Path, ...] = _setting(
        (),
        "RULE_SIDECAR_RULES_DIR",
        "rules directory, repeatable (the variable: ':'-separated); default: the bundled "
        "example rules",
        parse=_paths,
        flag="--rules-dir",
    )
    host: str = _setting("127.0.0.1", "RULE_SIDECAR_HOST", "listen address", flag="--host")
    port: int = _setting(
        8000, "RULE_SIDECAR_PORT", "listen port", parse=_integer, check=_port, flag="--port"
    )
    metrics_host: str | None = _setting(
        None,
        "RULE_SIDECAR_METRICS_HOST",
        "address of a separate listener for probes and metrics",
        flag="--metrics-host",
    )
    metrics_port: int | None = _setting(
        None,
        "RULE_SIDECAR_METRICS_PORT",
        "port of a separate listener for probes and metrics",
        parse=_integer,
        check=_port,
        flag="--metrics-port",
    )
    database_url: str | None = _setting(
        None,
        "RULE_SIDECAR_DATABASE_URL",
        "database source: sqlite:///path or postgresql://...",
        flag="--database-url",
    )
    database_password_file: Path | None = _setting(
        None,
        "RULE_SIDECAR_DATABASE_PASSWORD_FILE",
        "database password, kept out of the URL",
        parse=Path,
        flag="--database-password-file",
    )
    database_connect_timeout_seconds: int = _setting(
        _DATABASE.connect,
        "RULE_SIDECAR_DATABASE_CONNECT_TIMEOUT_SECONDS",
        "connecting to PostgreSQL (whole seconds, libpq's minimum is 2)",
        parse=_integer,
        check=_between(2, _YEAR),
    )
    database_statement_timeout_seconds: float = _setting(
        _DATABASE.statement,
        "RULE_SIDECAR_DATABASE_STATEMENT_TIMEOUT_SECONDS",
        "each database statement",
        parse=_decimal,
        check=_seconds,
    )
    database_read_timeout_seconds: float = _setting(
        _DATABASE.read,
        "RULE_SIDECAR_DATABASE_READ_TIMEOUT_SECONDS",
        "one read of the database as a whole",
        parse=_decimal,
        check=_seconds,
    )
    kubernetes_selector: str | None = _setting(
        None,
        "RULE_SIDECAR_KUBERNETES_SELECTOR",
        "watch ConfigMaps with these labels through the Kubernetes API",
        flag="--kubernetes-selector",
    )
    kubernetes_namespace: str | None = _setting(
        None,
        "RULE_SIDECAR_KUBERNETES_NAMESPACE",
        "their namespace (default: the pod's own)",
        flag="--kubernetes-namespace",
    )
    kubernetes_events: bool = _setting(
        False,
        "RULE_SIDECAR_KUBERNETES_EVENTS",
        "post a Warning Event on a ConfigMap whose rules were refused",
        parse=_boolean,
    )
    kubernetes_watch_timeout_seconds: float = _setting(
        300.0,
        "RULE_SIDECAR_KUBERNETES_WATCH_TIMEOUT_SECONDS",
        "the server ends each watch after this",
        parse=_decimal,
        check=_seconds,
    )
    kubernetes_list_deadline_seconds: float = _setting(
        30.0,
        "RULE_SIDECAR_KUBERNETES_LIST_DEADLINE_SECONDS",
        "a list of the ConfigMaps must be complete within this",
        parse=_decimal,
        check=_seconds,
    )
    admin_token_file: Path | None = _setting(
        None,
        "RULE_SIDECAR_ADMIN_TOKEN_FILE",
        "bearer token for admin endpoints and the WebSocket",
        parse=Path,
        flag="--admin-token-file",
    )
    allowed_hosts: tuple[str, ...] = _setting(
        (),
        "RULE_SIDECAR_ALLOWED_HOSTS",
        "host names the API answers to besides IP addresses and localhost (','-separated)",
        parse=_hosts,
    )
    state_dir: Path | None = _setting(
        None,
        "RULE_SIDECAR_STATE_DIR",
        "keep the last good snapshot here",
        parse=Path,
        flag="--state-dir",
    )
    hot_reload_enabled: bool = _setting(
        True, "HOT_RELOAD_ENABLED", "watch the sources and resync periodically", parse=_boolean
    )
    interval_seconds: float = _setting(
        30.0,
        "HOT_RELOAD_INTERVAL_SECONDS",
        "periodic resync, the safety net behind the watchers",
        parse=_decimal,
        check=_seconds,
    )
    verify_interval_seconds: float = _setting(
        300.0,
        "RULE_SIDECAR_VERIFY_INTERVAL_SECONDS",
        "periodic read of every source from scratch (0: never)",
        parse=_decimal,
        check=_seconds_or_never,
    )
    validation_enabled: bool = _setting(
        True,
        "HOT_RELOAD_VALIDATION_ENABLED",
        "run embedded tests and semantic checks before a swap",
        parse=_boolean,
    )
    max_age_seconds: float = _setting(
        300.0, "HOT_RELOAD_MAX_AGE_SECONDS", "freshness window", parse=_decimal, check=_seconds
    )
    allow_empty: bool = _setting(
        False,
        "RULE_SIDECAR_ALLOW_EMPTY",
        "allow a change that takes every rule away",
        parse=_boolean,
    )
    debounce_ms: int = _setting(
        50,
        "RULE_SIDECAR_DEBOUNCE_MS",
        "watcher debounce",
        parse=_integer,
        check=_between(0, 60_000),
    )
    max_body_bytes: int = _setting(
        1024 * 1024,
        "RULE_SIDECAR_MAX_BODY_BYTES",
        "request body limit",
        parse=_integer,
        check=_between(1024, _GIB),
    )
    reload_rate_per_minute: int = _setting(
        60,
        "RULE_SIDECAR_RELOAD_RATE_PER_MINUTE",
        "reloads and rollbacks per minute, per caller class",
        parse=_integer,
        check=_between(1, _MILLION),
    )
    validate_rate_per_minute: int = _setting(
        30,
        "RULE_SIDECAR_VALIDATE_RATE_PER_MINUTE",
        "validations per minute, per caller class",
        parse=_integer,
        check=_between(1, _MILLION),
    )
    candidate_rate_per_minute: int = _setting(
        30,
        "RULE_SIDECAR_CANDIDATE_RATE_PER_MINUTE",
        "validations of submitted rule documents per minute, per caller class",
        parse=_integer,
        check=_between(1, _MILLION),
    )
    max_batch_items: int = _setting(
        1000,
        "RULE_SIDECAR_MAX_BATCH_ITEMS",
        "inputs per evaluation batch",
        parse=_integer,
        check=_between(1, _MILLION),
    )
    max_queued_batches: int = _setting(
        8,
        "RULE_SIDECAR_MAX_QUEUED_BATCHES",
        "batches waiting behind the one evaluating",
        parse=_integer,
        check=_between(0, 10_000),
    )
    max_evaluation_seconds: float = _setting(
        3.0,
        "RULE_SIDECAR_MAX_EVALUATION_SECONDS",
        "wall-clock budget of one batch",
        parse=_decimal,
        check=_seconds,
    )
    candidate_timeout_seconds: float = _setting(
        10.0,
        "RULE_SIDECAR_CANDIDATE_TIMEOUT_SECONDS",
        "wall-clock budget of one check of submitted rule documents",
        parse=_decimal,
        check=_seconds,
    )
    max_response_bytes: int = _setting(
        8 * 1024 * 1024,
        "RULE_SIDECAR_MAX_RESPONSE_BYTES",
        "size of a batch's answer",
        parse=_integer,
        check=_between(1024, _GIB),
    )
    idle_timeout_seconds: float = _setting(
        30.0,
        "RULE_SIDECAR_IDLE_TIMEOUT_SECONDS",
        "a connection without a complete request head within this is closed",
        parse=_decimal,
        check=_seconds,
    )
    body_timeout_seconds: float = _setting(
        10.0,
        "RULE_SIDECAR_BODY_TIMEOUT_SECONDS",
        "a request body must arrive, and an answer be taken, within this",
        parse=_decimal,
        check=_seconds,
    )
    max_connections: int = _setting(
        256,
        "RULE_SIDECAR_MAX_CONNECTIONS",
        "open connections on the API listener",
        parse=_integer,
        check=_between(1, _MILLION),
    )
    metrics_max_connections: int = _setting(
        32,
        "RULE_SIDECAR_METRICS_MAX_CONNECTIONS",
        "open connections on the probe and metrics listener",
        parse=_integer,
        check=_between(1, _MILLION),
    )
    history_limit: int = _setting(
        50,
        "RULE_SIDECAR_HISTORY_LIMIT",
        "reloads kept in history",
        parse=_integer,
        check=_between(1, 100_000),
    )
    log_level: str = _setting(
        "INFO", "RULE_SIDECAR_LOG_LEVEL", "log level", check=_log_level, flag="--log-level"
    )
    reload_worker: bool = _setting(
        True,
        "RULE_SIDECAR_RELOAD_WORKER",
        "load large changes in a worker process",
        parse=_boolean,
    )
    fast_path: bool = _setting(
        True,
        "RULE_SIDECAR_FAST_PATH",
        "answer conditions in the common CEL subset in Python, proven equal to cel-cpp",
        parse=_boolean,
    )

    decision_log: str | None = _setting(
        None,
        "RULE_SIDECAR_DECISION_LOG",
        "write one JSON line per evaluated input to this file ('-': standard output)",
        flag="--decision-log",
    )
    decision_log_mask: tuple[str, ...] = _setting(
        (),
        "RULE_SIDECAR_DECISION_LOG_MASK",
        "JSON pointers of input fields left out of the decision log (','-separated)",
        parse=_pointers,
    )
    decision_log_hash: tuple[str, ...] = _setting(
        (),
        "RULE_SIDECAR_DECISION_LOG_HASH",
        "JSON pointers of input fields logged as a salted SHA-256 (','-separated)",
        parse=_pointers,
    )
    decision_log_salt_file: Path | None = _setting(
        None,
        "RULE_SIDECAR_DECISION_LOG_SALT_FILE",
        "the salt of those hashes, kept secret",
        parse=Path,
    )
    decision_log_sample: float = _setting(
        1.0,
        "RULE_SIDECAR_DECISION_LOG_SAMPLE",
        "the share of decisions logged (0 to 1)",
        parse=_decimal,
        check=_fraction,
    )
    decision_log_max_bytes: int = _setting(
        100 * 1024 * 1024,
        "RULE_SIDECAR_DECISION_LOG_MAX_BYTES",
        "a decision log file is rotated at this size",
        parse=_integer,
        check=_between(1024, _GIB),
    )
    decision_log_keep: int = _setting(
        5,
        "RULE_SIDECAR_DECISION_LOG_KEEP",
        "rotated decision log files kept (.1 the newest)",
        parse=_integer,
        check=_between(1, 1000),
    )
    decision_log_queue: int = _setting(
        10_000,
        "RULE_SIDECAR_DECISION_LOG_QUEUE",
        "decisions waiting to be written; past it they are dropped and counted",
        parse=_integer,
        check=_between(1, _MILLION),
    )

    def __post_init__(self) -> None:
        for item in fields(self):
            check = declaration(item.name).check
            reason = check(getattr(self, item.name)) if check else None
            if reason is not None:
                _refuse(item.name, getattr(self, item.name), reason)
        if self.decision_log_hash and self.decision_log_salt_file is None:
            hashed = declaration("decision_log_hash").variable
            salt = declaration("decision_log_salt_file").variable
            raise SettingsError(
                f"{hashed} needs {salt}: a hash without a secret salt is reversed by "
                "hashing guesses (a card's BIN has a million values)"
            )

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
            f"{item.name}={_masked(getattr(self, item.name))!r}" for item in fields(self)
        )
        return f"Settings({shown})"


def declaration(name: str) -> Declaration:
    """How the setting `name` is given, parsed and checked."""
    spec: Declaration = Settings.__dataclass_fields__[name].metadata["setting"]
    return spec


DEFAULT_SETTINGS: Final = Settings()

# field name -> environment variable
ENVIRONMENT: Final[Mapping[str, str]] = {
    item.name: declaration(item.name).variable for item in fields(Settings)
}

# Settings that `rule-sidecar serve` also takes as a flag (--rules-dir, --host, ...).
FLAGS: Final = frozenset(item.name for item in fields(Settings) if declaration(item.name).flag)


def _masked(value: Any) -> Any:
    return _PASSWORD_IN_URL.sub(r"\1:********@", value) if isinstance(value, str) else value


def _refuse(name: str, value: Any, reason: str) -> None:
    """Name the setting both ways the user may have given it."""
    spec = declaration(name)
    flag = f"{spec.flag} / " if spec.flag else ""
    raise SettingsError(f"{flag}{spec.variable}={value!r}: {reason}")


def setting_from(environ: Mapping[str, str], name: str) -> Any:
    """One setting from its variable (parsed and checked), or its default."""
    return getattr(Settings(**_parsed(environ, name)), name)


def _parsed(environ: Mapping[str, str], *names: str) -> dict[str, Any]:
    """The values the variables of these settings give (unchecked), by setting name."""
    values: dict[str, Any] = {}
    for name in names:
        spec = declaration(name)
        text = environ.get(spec.variable, "").strip()
        if not text:
            continue
        try:
            values[name] = spec.parse(text)
        except ValueError as exc:
            raise SettingsError(f"{spec.variable}={text!r}: {exc}") from None
    return values


def settings_from(
    environ: Mapping[str, str], overrides: Mapping[str, Any] | None = None
) -> Settings:
    """Settings from environment variables, then explicit overrides (flags) on top.

    An override of None means "not given" and leaves the environment's value.
    """
    values = _parsed(environ, *(item.name for item in fields(Settings)))
    values.update((name, value) for name, value in (overrides or {}).items() if value is not None)
    return Settings(**values)

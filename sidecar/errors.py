"""Errors the library raises, each carrying where it came from.

    RuleSidecarError
     ├── LoadError        documents that cannot go live: .problems, each with file:line:col,
     │                    JSON path and a message for the rule author
     ├── InputError       an evaluation input CEL cannot take or that breaks a limit (.path)
     ├── NotFoundError    an unknown rule or ruleset id (.kind, .id); also a KeyError
     └── ConflictError    a registry write that would break an invariant (duplicate id)

Every `Problem` carries a `ProblemCode`: a stable name for the kind of problem, for CI
and tools to act on (the message is for people and may change).

Kept free of imports from the rest of the package so every layer can raise them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any, Final

__all__ = [
    "ConflictError",
    "InputError",
    "LoadError",
    "NotFoundError",
    "Problem",
    "ProblemCode",
    "RuleSidecarError",
    "clip",
    "excerpt",
    "format_path",
]

# Characters of input a message may quote, and of a whole message: a 3.5 MB value quoted
# whole became a 3.5 MB answer from status, history and validate, and a 3.5 MB frame to
# every WebSocket client.
QUOTE_LIMIT: Final = 120
MESSAGE_LIMIT: Final = 1_000


def format_path(path: Sequence[str | int]) -> str:
    """`("spec", "rules", 3, "condition")` → `$.spec.rules[3].condition`."""
    return "$" + "".join(f"[{step}]" if isinstance(step, int) else f".{step}" for step in path)


def excerpt(value: object, limit: int = QUOTE_LIMIT) -> str:
    """`repr(value)` for a message, a long one cut to its start (and a string's length)."""
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:limit]!r}… ({len(value):,} characters)"
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}…"


def clip(message: str, limit: int = MESSAGE_LIMIT) -> str:
    """A message bounded to `limit` characters, its start and end kept (a library's
    message may quote a value whole: jsonschema's "'xxx…' is too long")."""
    if len(message) <= limit:
        return message
    half = limit // 2
    return f"{message[: half - 1]}…{message[-half:]}"


class ProblemCode(StrEnum):
    """What kind of problem: stable values, documented in README and schemas/openapi.yaml.

    New codes may be added; a value never changes meaning. Consumers should treat an
    unknown code like `unclassified`.
    """

    # Reading files and sources
    READ_NOT_FOUND = "read.not_found"
    READ_NOT_REGULAR = "read.not_regular"
    READ_TOO_LARGE = "read.too_large"
    READ_OUTSIDE_ROOT = "read.outside_root"
    READ_FAILED = "read.failed"
    READ_UNSTABLE = "read.unstable"
    SOURCE_UNAVAILABLE = "source.unavailable"
    STATE_DAMAGED = "state.damaged"
    DATABASE_REFUSES = "database.refuses"
    # Turning bytes into JSON values
    ENCODING = "file.encoding"
    YAML_SYNTAX = "yaml.syntax"
    JSON_SYNTAX = "json.syntax"
    DUPLICATE_KEY = "document.duplicate_key"
    NOT_JSON = "document.not_json"
    SHARED_ALIAS = "document.shared_alias"
    LIMIT_DOCUMENTS = "limit.documents"
    LIMIT_DEPTH = "limit.depth"
    LIMIT_VALUES = "limit.values"
    LIMIT_EXPANSION = "limit.expansion"
    # The RuleSet document
    SCHEMA_NOT_MAPPING = "schema.not_mapping"
    SCHEMA_API_VERSION = "schema.api_version"
    SCHEMA_KIND = "schema.kind"
    SCHEMA_ADDITIONAL_PROPERTY = "schema.additional_property"
    SCHEMA_REQUIRED = "schema.required"
    SCHEMA_TYPE = "schema.type"
    SCHEMA_PATTERN = "schema.pattern"
    SCHEMA_LENGTH = "schema.length"
    SCHEMA_RANGE = "schema.range"
    SCHEMA_SIZE = "schema.size"
    SCHEMA_UNIQUE = "schema.unique"
    SCHEMA_CONST = "schema.const"
    SCHEMA_INVALID = "schema.invalid"
    # Conditions, ids and checks
    CEL_COMPILE = "cel.compile"
    CEL_TOO_COSTLY = "cel.too_costly"
    ID_DUPLICATE = "id.duplicate"
    CHECK_UNREACHABLE_BAND = "check.unreachable_band"
    CHECK_TEST_NAME = "check.test_name"
    CHECK_UNKNOWN_RULE = "check.unknown_rule"
    CHECK_CHALLENGER = "check.challenger"
    CHECK_DEPENDENCY = "check.dependency"
    TEST_FAILED = "test.failed"
    # What a CI gate asks for (`rule-sidecar validate`/`test`)
    RULES_EMPTY = "rules.empty"
    TESTS_MISSING = "tests.missing"
    # Anything else: an unexpected error, or a producer that names no kind yet
    REQUEST_INVALID = "request.invalid"
    INTERNAL = "internal.error"
    UNCLASSIFIED = "unclassified"


@dataclass(frozen=True, slots=True, kw_only=True)
class Problem:
    """One thing wrong with a document, located for the person who has to fix it."""

    file: str
    line: int = 1
    column: int = 1
    path: str = "$"
    message: str
    ruleset_id: str | None = None
    rule_id: str | None = None
    code: ProblemCode = ProblemCode.UNCLASSIFIED

    def __post_init__(self) -> None:
        # The last bound, whatever a producer quoted: problems travel to every client.
        object.__setattr__(self, "message", clip(self.message))
        for name in ("path", "ruleset_id", "rule_id"):  # an invalid id may be megabytes
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, clip(value, QUOTE_LIMIT * 2))

    def __str__(self) -> str:
        where = f" (at {self.path})" if self.path != "$" else ""
        return f"{self.file}:{self.line}:{self.column}: {self.message}{where}"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "code": self.code.value}

    def to_rule_error(self) -> dict[str, Any]:
        """The hot-reload contract's validation error shape (`rule_id`, `error`), located."""
        return {
            "rule_id": self.rule_id,
            "ruleset_id": self.ruleset_id,
            "error": self.message,
            "location": f"{self.file}:{self.line}:{self.column}",
            "path": self.path,
        }


class RuleSidecarError(Exception):
    """Base of every error this package raises on purpose."""


class LoadError(RuleSidecarError):
    """Documents that cannot go live; nothing was changed."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems = tuple(problems)
        count = len(self.problems)
        first = f": {self.problems[0]}" if self.problems else ""
        more = f" (and {count - 1} more)" if count > 1 else ""
        super().__init__(f"{count} problem(s){first}{more}")


class InputError(RuleSidecarError, ValueError):
    """An evaluation input that CEL cannot take or that breaks a limit, or a request
    body that is not what its endpoint takes (400, with the path of what is wrong)."""

    def __init__(self, message: str, *, path: str = "$") -> None:
        super().__init__(f"{path}: {message}")
        self.message = message
        self.path = path


class NotFoundError(RuleSidecarError, KeyError):
    """An unknown rule or ruleset id."""

    def __init__(self, kind: str, id: str) -> None:
        super().__init__(f"{kind} {id!r} not found")
        self.kind = kind
        self.id = id

    def __str__(self) -> str:
        # KeyError.__str__ would quote the whole message again.
        return str(self.args[0])


class ConflictError(RuleSidecarError):
    """A registry write that would break an invariant, such as a duplicate rule id."""

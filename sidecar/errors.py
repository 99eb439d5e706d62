"""Errors the library raises, each carrying where it came from.

    RuleSidecarError
     ├── LoadError        documents that cannot go live: .problems, each with file:line:col,
     │                    JSON path and a message for the rule author
     ├── InputError       an evaluation input CEL cannot take or that breaks a limit (.path)
     ├── NotFoundError    an unknown rule or ruleset id (.kind, .id); also a KeyError
     └── ConflictError    a registry write that would break an invariant (duplicate id)

Kept free of imports from the rest of the package so every layer can raise them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

__all__ = [
    "ConflictError",
    "InputError",
    "LoadError",
    "NotFoundError",
    "Problem",
    "RuleSidecarError",
    "format_path",
]


def format_path(path: Sequence[str | int]) -> str:
    """`("spec", "rules", 3, "condition")` → `$.spec.rules[3].condition`."""
    return "$" + "".join(f"[{step}]" if isinstance(step, int) else f".{step}" for step in path)


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

    def __str__(self) -> str:
        where = f" (at {self.path})" if self.path != "$" else ""
        return f"{self.file}:{self.line}:{self.column}: {self.message}{where}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_rule_error(self) -> dict[str, Any]:
        """The seed's validation error shape (`rule_id`, `error`), located."""
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
    """An evaluation input that CEL cannot take or that breaks a limit."""

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

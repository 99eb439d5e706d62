"""The hot-reload contract's integration helpers, for applications that embed the registry
in-process.

Each takes the registry explicitly (the module it replaces reached for a global singleton);
the field names of what they return are the contract's. `sidecar.client` offers the same
helpers over HTTP for applications in another container of the pod.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sidecar.checks import ruleset_problems
from sidecar.engine import evaluate
from sidecar.registry import RuleRegistry
from sidecar.service import HotReloadService

__all__ = [
    "execute_rules_from_registry",
    "get_registry_info",
    "get_rules_from_registry",
    "is_registry_fresh",
    "registry_age_seconds",
    "validate_registry_rules",
]


def get_rules_from_registry(
    registry: RuleRegistry, ruleset_id: str | int | None = None, *, include_disabled: bool = False
) -> list[dict[str, Any]]:
    """Rules ready for execution (enabled ones unless asked), as plain dicts."""
    rules = registry.get_rules(ruleset_id)
    return [rule.to_dict() for rule in rules if include_disabled or rule.enabled]


def execute_rules_from_registry(
    registry: RuleRegistry, data: Any, ruleset_id: str | int
) -> dict[str, Any]:
    """Evaluate a ruleset of the current snapshot: matched, total_points, registry_version."""
    return evaluate(registry.current, str(ruleset_id), data).to_dict()


def validate_registry_rules(registry: RuleRegistry) -> dict[str, Any]:
    """Re-run every ruleset's semantic checks and embedded tests on the current snapshot."""
    snapshot = registry.current
    errors = [
        problem.to_rule_error()
        for ruleset in snapshot.rulesets.values()
        for problem in ruleset_problems(ruleset)
    ]
    invalid = {error["rule_id"] or error["ruleset_id"] for error in errors}
    return {
        "valid": not errors,
        "registry_version": snapshot.version,
        "total_rules": len(snapshot.rules),
        "invalid_rules": len(invalid),
        "errors": errors,
    }


def get_registry_info(registry: RuleRegistry) -> dict[str, Any]:
    """Version, revision, counts and when the current snapshot was published."""
    return registry.get_stats()


def registry_age_seconds(registry: RuleRegistry, *, now: datetime | None = None) -> float | None:
    """Seconds since the current snapshot was published; None before the first."""
    published = registry.last_publish
    if published is None:
        return None
    return ((now or datetime.now(UTC)) - published).total_seconds()


def is_registry_fresh(
    service: HotReloadService, max_age_seconds: float = 300, *, now: datetime | None = None
) -> bool:
    """Whether every source was read successfully, and what serves confirmed, within
    `max_age_seconds`. Stable rules stay fresh: the age of the content is not the
    question (that is `registry_age_seconds`), the age of the last good check is."""
    return service.is_fresh(max_age_seconds, at=now)

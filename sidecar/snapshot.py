"""The immutable snapshot: everything one registry version holds.

A snapshot is built complete, off to the side, and then published with one reference
swap, so a reader that took a snapshot sees one version from start to end and never
waits for a writer.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

from sidecar.errors import ConflictError
from sidecar.model import Rule, RuleSet

__all__ = ["EMPTY_REVISION", "Snapshot"]

EMPTY_REVISION = hashlib.sha256(b"").hexdigest()[:16]


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, kw_only=True)
class Snapshot:
    """One version of the registry.

    `version` counts publishes on this process; `revision` is a digest of the content, the
    same on every pod that loaded the same rules, so a fleet's convergence is visible.
    """

    version: int
    rulesets: Mapping[str, RuleSet]
    rules: Mapping[str, Rule]
    revision: str
    created_at: datetime = field(default_factory=_now)
    # Each ruleset that has a challenger, and its challenger (see `RuleSet`).
    challengers: Mapping[str, RuleSet] = field(default_factory=lambda: MappingProxyType({}))

    @classmethod
    def build(cls, rulesets: Iterable[RuleSet], *, version: int = 0) -> Snapshot:
        """Index the rulesets; raises `ConflictError` on a duplicate ruleset or rule id."""
        by_id: dict[str, RuleSet] = {}
        rules: dict[str, Rule] = {}
        for ruleset in rulesets:
            if ruleset.id in by_id:
                raise ConflictError(f"ruleset {ruleset.id!r} is defined twice")
            by_id[ruleset.id] = ruleset
            for rule in ruleset.rules:
                if rule.id in rules:
                    raise ConflictError(
                        f"rule {rule.id!r} is defined in ruleset {rules[rule.id].ruleset_id!r} "
                        f"and in ruleset {ruleset.id!r}"
                    )
                rules[rule.id] = rule
        digest = hashlib.sha256()
        for ruleset_id in sorted(by_id):
            digest.update(f"{ruleset_id}\0{by_id[ruleset_id].digest}\n".encode())
        challengers = {
            ruleset.challenger_of: ruleset
            for ruleset in by_id.values()
            if ruleset.challenger_of is not None and ruleset.challenger_of in by_id
        }
        return cls(
            version=version,
            rulesets=MappingProxyType(dict(sorted(by_id.items()))),
            rules=MappingProxyType(rules),
            revision=digest.hexdigest()[:16],
            challengers=MappingProxyType(challengers),
        )

    @classmethod
    def empty(cls) -> Snapshot:
        return cls.build(())

    def published_as(self, version: int) -> Snapshot:
        """The same content under a new version number and timestamp."""
        return replace(self, version=version, created_at=_now())

    def stats(self) -> dict[str, Any]:
        """The hot-reload contract's registry block: counts, version and when it was published."""
        return {
            "rule_count": len(self.rules),
            "ruleset_count": len(self.rulesets),
            "version": self.version,
            "revision": self.revision,
            "last_reload": self.created_at.isoformat(),
        }

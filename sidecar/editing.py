"""In-process edits of the registry: the hot-reload contract's `add_rule` ... `clear`.

An edit never changes a snapshot: it builds a complete candidate from what serves,
compiles the rules it brings and runs the edited rulesets' embedded tests as a reload
would, and publishes it with nothing published in between (`RuleRegistry.publish_from`:
the build runs under the registry's write lock, so a reload's publish waits for the one
rule an edit compiles, and an edit never lands over content it did not see). The
registry itself only publishes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from sidecar.checks import ruleset_problems
from sidecar.errors import ConflictError, LoadError, NotFoundError, Problem, ProblemCode
from sidecar.loader import Loader, dependency_problems
from sidecar.model import DependencyError, Rule, RuleSet
from sidecar.registry import RuleRegistry
from sidecar.snapshot import Snapshot

__all__ = ["RegistryEditor"]

T = TypeVar("T")


class RegistryEditor:
    """Edits one registry; each edit publishes a whole new snapshot, or nothing."""

    def __init__(self, registry: RuleRegistry, *, loader: Loader | None = None) -> None:
        self.registry = registry
        self._loader = loader or Loader()

    def add_rule(self, rule: Rule | Mapping[str, Any], ruleset_id: str | int | None = None) -> Rule:
        """Add a rule to an existing ruleset; its id must be new to the registry."""

        def build(current: Snapshot) -> tuple[Snapshot, Rule]:
            new_rule = self._as_rule(current, rule, ruleset_id)
            if new_rule.id in current.rules:
                raise ConflictError(f"rule {new_rule.id!r} already exists; use update_rule")
            return self._replaced(current, new_rule.ruleset_id, lambda r: [*r, new_rule]), new_rule

        return self._edit(build)

    def update_rule(
        self, rule: Rule | Mapping[str, Any], ruleset_id: str | int | None = None
    ) -> Rule:
        """Replace an existing rule (same id); it may move to another ruleset."""

        def build(current: Snapshot) -> tuple[Snapshot, Rule]:
            new_rule = self._as_rule(current, rule, ruleset_id, existing=True)
            old = current.rules.get(new_rule.id)
            if old is None:
                raise NotFoundError("rule", new_rule.id)
            if old.ruleset_id == new_rule.ruleset_id:
                swapped = self._replaced(
                    current,
                    old.ruleset_id,
                    lambda rules: [new_rule if r.id == old.id else r for r in rules],
                )
                return swapped, new_rule
            return self._moved(current, old, new_rule), new_rule

        return self._edit(build)

    def remove_rule(self, rule_id: str | int) -> Rule:
        def build(current: Snapshot) -> tuple[Snapshot, Rule]:
            old = current.rules.get(str(rule_id))
            if old is None:
                raise NotFoundError("rule", str(rule_id))
            kept = self._replaced(
                current, old.ruleset_id, lambda rules: [r for r in rules if r.id != old.id]
            )
            return kept, old

        return self._edit(build)

    def add_ruleset(self, ruleset: RuleSet) -> None:
        def build(current: Snapshot) -> tuple[Snapshot, None]:
            if ruleset.id in current.rulesets:
                raise ConflictError(f"ruleset {ruleset.id!r} already exists")
            self._check(ruleset)
            return Snapshot.build([*current.rulesets.values(), ruleset]), None

        self._edit(build)

    def remove_ruleset(self, ruleset_id: str | int) -> RuleSet:
        def build(current: Snapshot) -> tuple[Snapshot, RuleSet]:
            old = current.rulesets.get(str(ruleset_id))
            if old is None:
                raise NotFoundError("ruleset", str(ruleset_id))
            return Snapshot.build(r for r in current.rulesets.values() if r.id != old.id), old

        return self._edit(build)

    def clear(self) -> None:
        self._edit(lambda _: (Snapshot.empty(), None))

    def _edit(self, build: Callable[[Snapshot], tuple[Snapshot, T]]) -> T:
        """Build from what serves and publish it, with no publish in between."""
        answers: list[T] = []

        def candidate(current: Snapshot) -> Snapshot:
            snapshot, answer = build(current)
            answers.append(answer)
            return snapshot

        self.registry.publish_from(candidate)
        return answers[0]

    def _as_rule(
        self,
        current: Snapshot,
        rule: Rule | Mapping[str, Any],
        ruleset_id: str | int | None,
        *,
        existing: bool = False,
    ) -> Rule:
        """A compiled `Rule`; a mapping without a ruleset_id stays in its current ruleset
        (`existing`: it must have one, else `NotFoundError`)."""
        if isinstance(rule, Rule):
            return self._loader.check_rule(rule)
        target = ruleset_id if ruleset_id is not None else rule.get("ruleset_id")
        if target is None:
            known = current.rules.get(str(rule.get("id")))
            if known is None and existing:
                raise NotFoundError("rule", str(rule.get("id")))
            if known is None:
                problem = Problem(
                    file="<api>",
                    message="ruleset_id is required for a new rule",
                    code=ProblemCode.REQUEST_INVALID,
                )
                raise LoadError([problem])
            target = known.ruleset_id
        fields = {k: v for k, v in rule.items() if k != "ruleset_id"}
        return self._loader.rule_from_mapping(fields, ruleset_id=str(target), file="<api>")

    def _replaced(
        self,
        current: Snapshot,
        ruleset_id: str,
        change: Callable[[tuple[Rule, ...]], list[Rule]],
    ) -> Snapshot:
        ruleset = _ruleset(current, ruleset_id)
        updated = self._with_rules(ruleset, change(ruleset.rules))
        self._check(updated)
        return Snapshot.build(
            updated if r.id == ruleset_id else r for r in current.rulesets.values()
        )

    def _moved(self, current: Snapshot, old: Rule, new: Rule) -> Snapshot:
        source = _ruleset(current, old.ruleset_id)
        target = _ruleset(current, new.ruleset_id)
        replaced = {
            source.id: self._with_rules(source, [r for r in source.rules if r.id != old.id]),
            target.id: self._with_rules(target, [*target.rules, new]),
        }
        for ruleset in replaced.values():
            self._check(ruleset)
        return Snapshot.build(replaced.get(r.id, r) for r in current.rulesets.values())

    def _with_rules(self, ruleset: RuleSet, rules: list[Rule]) -> RuleSet:
        """The ruleset with these rules, or `LoadError` when a condition would read a
        rule that is gone, disabled or on trial, or close a cycle."""
        try:
            return ruleset.with_rules(rules, self._loader.compiler)
        except DependencyError as exc:
            raise LoadError(dependency_problems(rules, exc)) from None

    def _check(self, ruleset: RuleSet) -> None:
        """An edit that breaks the ruleset's own tests is refused, like a bad reload."""
        if self._loader.run_checks:
            problems = ruleset_problems(ruleset)
            if problems:
                raise LoadError(problems)


def _ruleset(current: Snapshot, ruleset_id: str) -> RuleSet:
    ruleset = current.rulesets.get(ruleset_id)
    if ruleset is None:
        raise NotFoundError("ruleset", ruleset_id)
    return ruleset

"""Why an input got its decision: every rule's outcome and the input values it read.

An explanation lists each rule of the ruleset in document order, disabled ones included,
with what it did on this input (matched, did not match, errored, disabled), and the
input values its condition referenced (`"input.amount": 2450.0`, or `null` for a field
the input lacks). The paths are taken from the expression tree cel-cpp checked: a chain
of field selections starting at `input` (`input.user.age`, or `has(input.card)`'s
`input.card`); a read that is not such a chain (an index, `input` as a whole, a
comprehension's variable) names the chain it starts from, and a rule whose condition
reads no input has no `reads`. Explaining costs more than evaluating (it walks the trees
and copies the values): it is asked for, never done on every request.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sidecar.celwire import Node
from sidecar.conditions import Outcome
from sidecar.model import Rule, RuleSet

__all__ = ["RuleExplanation", "RuleOutcome", "explain_rules", "read_paths"]


class RuleOutcome(StrEnum):
    MATCHED = "matched"
    NOT_MATCHED = "not_matched"
    ERROR = "error"
    DISABLED = "disabled"


@dataclass(frozen=True, slots=True)
class RuleExplanation:
    """One rule's part in one evaluation."""

    rule: Rule
    outcome: RuleOutcome
    error: str | None = None
    reads: Mapping[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        view: dict[str, Any] = {
            "id": self.rule.id,
            "outcome": self.outcome.value,
            "points": self.rule.points,
            "mode": self.rule.mode.value,
        }
        if self.error is not None:
            view["error"] = self.error
        if self.reads is not None:
            view["reads"] = dict(self.reads)
        return view


def explain_rules(
    ruleset: RuleSet, outcomes: Sequence[Outcome], document: Any
) -> tuple[RuleExplanation, ...]:
    """Each rule of the ruleset, in document order, given the outcomes of its evaluation
    plan's rules (in plan order) on `document`."""
    plan = ruleset.plan
    trees = plan.conditions.trees()
    steps = zip(plan.rules, outcomes, trees, strict=True)
    by_id = {rule.id: (outcome, tree) for rule, outcome, tree in steps}
    explained = []
    for rule in ruleset.rules:
        found = by_id.get(rule.id)
        if found is None:
            explained.append(RuleExplanation(rule, RuleOutcome.DISABLED))
            continue
        outcome, tree = found
        reads = None
        if tree is not None:
            paths = read_paths(tree)
            reads = {".".join(("input", *path)): _value(document, path) for path in paths} or None
        if outcome is True:
            explained.append(RuleExplanation(rule, RuleOutcome.MATCHED, reads=reads))
        elif outcome is False:
            explained.append(RuleExplanation(rule, RuleOutcome.NOT_MATCHED, reads=reads))
        else:
            explained.append(RuleExplanation(rule, RuleOutcome.ERROR, str(outcome), reads))
    return tuple(explained)


def read_paths(tree: Node) -> tuple[tuple[str, ...], ...]:
    """The input paths the expression reads, each chain of selections once, in the
    order written (`has(input.a) && input.a.b`: `input.a`, then `input.a.b`)."""
    found: dict[tuple[str, ...], None] = {}
    _collect(tree, frozenset(), found)
    return tuple(found)


def _collect(node: Node, shadowed: frozenset[str], found: dict[tuple[str, ...], None]) -> None:
    path = _chain(node, shadowed)
    if path is not None:
        if path:  # `input` alone reads everything: no single value to show
            found.setdefault(path, None)
        return
    if node.kind == "comprehension":
        inner = shadowed | set(node.iter_vars) | {node.accu_var}
        for index, child in enumerate(node.children):
            _collect(child, shadowed if index == 0 else inner, found)
        return
    for child in node.children:
        _collect(child, shadowed, found)


def _chain(node: Node, shadowed: frozenset[str]) -> tuple[str, ...] | None:
    """The field names from `input` to this node, if it is such a chain of selections."""
    if node.kind == "ident":
        return () if node.name == "input" and "input" not in shadowed else None
    if node.kind == "select" and node.children:
        base = _chain(node.children[0], shadowed)
        return None if base is None else (*base, node.name)
    return None


def _value(document: Any, path: tuple[str, ...]) -> Any:
    """The value at `path` in the input, or None where a field is missing."""
    value = document
    for name in path:
        if not isinstance(value, dict) or name not in value:
            return None
        value = value[name]
    return value

"""Why an input got its decision: every rule's outcome and the input values it read.

An explanation lists each rule of the ruleset in document order, disabled ones included,
with what it did on this input (matched, did not match, errored, disabled), and the
input values its condition referenced (`"input.amount": 2450.0`, or `null` for a field
the input lacks). The paths are taken from the expression tree cel-cpp checked: a chain
of field selections starting at `input` (`input.user.age`, or `has(input.card)`'s
`input.card`); a read that is not such a chain (an index, `input` as a whole, a
comprehension's variable) names the chain it starts from, and a rule whose condition
reads no input has no `reads`. Explaining costs more than evaluating (it walks the trees
and shows the values): it is asked for, never done on every request, and bounded: a value
read by many rules is shown by each, so an explanation can be far larger than its input
(500 rules reading a 900 KB field: 455 MB), and one past its `budget` is refused before
it is built (`ExplanationTooLarge`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

from sidecar.celwire import Node
from sidecar.conditions import Outcome
from sidecar.jsoncodec import dumpb
from sidecar.model import Rule, RuleSet

__all__ = [
    "ExplanationTooLarge",
    "RuleExplanation",
    "RuleOutcome",
    "explain_rules",
    "read_paths",
]

_ENTRY_BYTES: Final = 100  # a rule's entry without its reads, about, in JSON


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
    # The outcomes of the rules its condition reads (None: that rule errored).
    depends_on: Mapping[str, bool | None] | None = None

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
        if self.depends_on is not None:
            view["depends_on"] = dict(self.depends_on)
        return view


class ExplanationTooLarge(Exception):
    """The explanation would hold more than its budget of JSON bytes (about)."""

    def __init__(self, budget: int) -> None:
        super().__init__(f"the explanation would exceed {budget} bytes")
        self.budget = budget


def explain_rules(
    ruleset: RuleSet, outcomes: Sequence[Outcome], document: Any, *, budget: int | None = None
) -> tuple[RuleExplanation, ...]:
    """Each rule of the ruleset, in document order, given the outcomes of its evaluation
    plan's rules (in plan order) on `document`; `ExplanationTooLarge` when it would take
    more than `budget` bytes of JSON (each value read is sized once, however many rules
    read it)."""
    plan = ruleset.plan
    trees = plan.conditions.trees()
    steps = zip(plan.rules, outcomes, trees, plan.conditions.dependencies(), strict=True)
    by_id = {rule.id: (outcome, tree, depends) for rule, outcome, tree, depends in steps}
    sizes: dict[tuple[str, ...], int] = {}
    spent = 0
    explained = []
    for rule in ruleset.rules:
        spent += _ENTRY_BYTES + len(rule.id)
        found = by_id.get(rule.id)
        if found is None:
            explained.append(RuleExplanation(rule, RuleOutcome.DISABLED))
            continue
        outcome, tree, depends = found
        depends_on = None
        if depends:
            depends_on = {name: _known(by_id[name][0]) for name in depends}
            spent += sum(len(name) + 10 for name in depends)
        reads: dict[str, Any] = {}
        for path in () if tree is None else read_paths(tree):
            value = _value(document, path)
            size = sizes.get(path)
            if size is None:
                size = sizes[path] = _json_size(value) + sum(map(len, path)) + 10
            spent += size
            reads[".".join(("input", *path))] = value
        if budget is not None and spent > budget:
            raise ExplanationTooLarge(budget)
        shown = reads or None  # a condition that reads no input field has no `reads`
        if outcome is True:
            explained.append(RuleExplanation(rule, RuleOutcome.MATCHED, None, shown, depends_on))
        elif outcome is False:
            explained.append(
                RuleExplanation(rule, RuleOutcome.NOT_MATCHED, None, shown, depends_on)
            )
        else:
            explained.append(
                RuleExplanation(rule, RuleOutcome.ERROR, str(outcome), shown, depends_on)
            )
    return tuple(explained)


def _known(outcome: Outcome) -> bool | None:
    """A dependency's outcome as explain shows it: None where it errored."""
    return outcome if isinstance(outcome, bool) else None


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


def _json_size(value: Any) -> int:
    """How many bytes `value` takes in the answer's JSON: encoded once, escapes included
    (a control character counted as one byte went out as six, and an answer six times the
    limit got through)."""
    try:
        return len(dumpb(value))
    except TypeError:  # orjson: an integer past 64 bits, which the json module writes
        return len(json.dumps(value))


def _value(document: Any, path: tuple[str, ...]) -> Any:
    """The value at `path` in the input, or None where a field is missing."""
    value = document
    for name in path:
        if not isinstance(value, dict) or name not in value:
            return None
        value = value[name]
    return value

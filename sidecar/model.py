"""Rules and rulesets as immutable values.

Everything here is frozen: a snapshot shares these objects with every reader thread, and
an unchanged file's rulesets are reused as-is by the next reload. Free-form JSON
(metadata, labels, test inputs) is frozen too (`freeze`) and copied out on demand (`thaw`).
"""

from __future__ import annotations

import hashlib
import json
import math
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from decimal import Decimal
from enum import StrEnum
from functools import cached_property
from typing import Any, Final, NoReturn, TypeVar

from sidecar.conditions import ConditionCompiler, ConditionError, ConditionSet
from sidecar.dependencies import DependencyIssue, Dependent, Reference, resolve
from sidecar.errors import Problem, ProblemCode

__all__ = [
    "API_VERSION",
    "KIND",
    "DecisionBand",
    "DependencyError",
    "EvaluationPlan",
    "Expectation",
    "FrozenDict",
    "Location",
    "Rule",
    "RuleMode",
    "RuleSet",
    "RuleTest",
    "canonical_json",
    "freeze",
    "thaw",
]

_T = TypeVar("_T")

API_VERSION: Final = "rule-sidecar/v1"
KIND: Final = "RuleSet"


class FrozenDict(dict[str, Any]):
    """A dict that refuses changes: what `freeze` makes of mappings.

    Unlike a mappingproxy it pickles, so rulesets can cross from the reload worker
    process (see `sidecar.loader`).
    """

    def _refuse(self, *_args: Any, **_kwargs: Any) -> NoReturn:
        raise TypeError("frozen rule data cannot be changed")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = _refuse
    __ior__ = _refuse

    def __reduce__(self) -> tuple[type[FrozenDict], tuple[dict[str, Any]]]:
        return (FrozenDict, (dict(self),))


_EMPTY: Final[Mapping[str, Any]] = FrozenDict()


def quick_pickle(cls: type[_T]) -> type[_T]:
    """Pickle a frozen slotted dataclass as a plain tuple of its fields.

    The reload worker sends thousands of rules, locations and tests per MiB to the
    serving process, which unpickles them in a thread beside the one serving requests;
    dataclasses' own state functions call `fields()` for every object, twice the cost.
    """
    names = tuple(item.name for item in fields(cls))  # type: ignore[arg-type]
    get = operator.attrgetter(*names)

    def __getstate__(self: _T) -> tuple[Any, ...]:
        state: tuple[Any, ...] = get(self) if len(names) > 1 else (get(self),)
        return state

    def __setstate__(self: _T, state: tuple[Any, ...]) -> None:
        for name, value in zip(names, state, strict=True):
            object.__setattr__(self, name, value)

    setattr(cls, "__getstate__", __getstate__)  # noqa: B010 (mypy refuses method assignment)
    setattr(cls, "__setstate__", __setstate__)  # noqa: B010
    return cls


def freeze(value: Any) -> Any:
    """Deep read-only copy of JSON-like data: dicts become `FrozenDict`s, lists tuples."""
    if isinstance(value, Mapping):
        return FrozenDict({k: freeze(v) for k, v in value.items()})
    if isinstance(value, list | tuple):
        return tuple(freeze(v) for v in value)
    return value


def thaw(value: Any) -> Any:
    """Plain, mutable JSON-like copy of frozen data."""
    if isinstance(value, Mapping):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [thaw(v) for v in value]
    return value


# From here on a double prints in exponent form (`1.5e+16`), which PostgreSQL's JSONB
# gives back as the integer those digits write (`15000000000000000`).
_EXPONENT_FORM: Final = 1e16


def canonical_json(value: Any) -> Any:
    """JSON data with numbers in the one form every store gives back: a double of 1e16 or
    more (always whole) as an integer, and zero without a sign (JSONB drops it). Keys
    need nothing: the digest sorts them, and JSONB reorders them.

    Other numbers keep their type: `100` and `100.0` are different content (CEL tells
    an int from a double), and every store keeps them apart."""
    if isinstance(value, Mapping):
        return {key: canonical_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [canonical_json(item) for item in value]
    if isinstance(value, float) and math.isfinite(value):
        if abs(value) >= _EXPONENT_FORM:
            return int(Decimal(repr(value)))  # the digits written, not the binary value
        if value == 0.0:
            return 0.0
    return value


def _dumps(document: Any) -> str:
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@quick_pickle
@dataclass(frozen=True, slots=True)
class Location:
    """Where a document element starts; line and column are 1-based."""

    file: str
    line: int = 1
    column: int = 1

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "line": self.line, "column": self.column}

    def problem(
        self,
        message: str,
        *,
        path: str = "$",
        ruleset_id: str | None = None,
        rule_id: str | None = None,
        code: ProblemCode = ProblemCode.UNCLASSIFIED,
    ) -> Problem:
        """A problem found here."""
        return Problem(
            code=code,
            file=self.file,
            line=self.line,
            column=self.column,
            path=path,
            message=message,
            ruleset_id=ruleset_id,
            rule_id=rule_id,
        )


class RuleMode(StrEnum):
    """How a rule's match counts. A `shadow` rule is validated, compiled, tested and
    evaluated like any other, and reported (`shadow_matched`, metrics, explain), but never
    adds points nor changes a decision: how a new rule would behave on live traffic,
    before it counts."""

    ACTIVE = "active"
    SHADOW = "shadow"


@quick_pickle
@dataclass(frozen=True, slots=True, kw_only=True)
class Rule:
    """One scoring rule. Equality ignores where it was read from."""

    id: str
    ruleset_id: str
    name: str
    condition: str
    points: int
    description: str = ""
    enabled: bool = True
    priority: int = 0
    tags: tuple[str, ...] = ()
    metadata: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)
    mode: RuleMode = RuleMode.ACTIVE
    location: Location | None = field(default=None, compare=False)

    def to_document(self) -> dict[str, Any]:
        """The rule as it appears in a `rule-sidecar/v1` document, defaults spelled out
        but `mode`'s: written only for a shadow rule, so that every ruleset without one
        keeps the digest (and every registry the revision) it had before modes existed."""
        document = {
            "id": self.id,
            "name": self.name,
            "description": self.description,
            "condition": self.condition,
            "points": self.points,
            "enabled": self.enabled,
            "priority": self.priority,
            "tags": list(self.tags),
            "metadata": thaw(self.metadata),
        }
        if self.mode is not RuleMode.ACTIVE:
            document["mode"] = self.mode.value
        return document

    def to_dict(self) -> dict[str, Any]:
        """The API's view: the document fields plus ruleset and source location."""
        document = self.to_document()
        document["mode"] = self.mode.value
        document["ruleset_id"] = self.ruleset_id
        document["source"] = self.location.to_dict() if self.location else None
        return document


@quick_pickle
@dataclass(frozen=True, slots=True)
class DecisionBand:
    """`decision` applies when the total reaches `min_points`."""

    decision: str
    min_points: int
    location: Location | None = field(default=None, compare=False)


@quick_pickle
@dataclass(frozen=True, slots=True, kw_only=True)
class Expectation:
    """What an embedded test expects; None means "not checked".

    `decision` may legitimately be expected to be None (no band applies and no default),
    so whether it is checked is a separate flag.
    """

    total_points: int | None = None
    matched: frozenset[str] | None = None
    shadow_matched: frozenset[str] | None = None
    decision: str | None = None
    checks_decision: bool = False
    errors: frozenset[str] = frozenset()

    def to_document(self) -> dict[str, Any]:
        document: dict[str, Any] = {}
        if self.total_points is not None:
            document["total_points"] = self.total_points
        if self.matched is not None:
            document["matched"] = sorted(self.matched)
        if self.shadow_matched is not None:
            document["shadow_matched"] = sorted(self.shadow_matched)
        if self.checks_decision:
            document["decision"] = self.decision
        if self.errors:
            document["errors"] = sorted(self.errors)
        return document


@quick_pickle
@dataclass(frozen=True, slots=True, kw_only=True)
class RuleTest:
    """An embedded test case: this input must give that result."""

    name: str
    input: Any
    expect: Expectation
    location: Location | None = field(default=None, compare=False)

    def to_document(self) -> dict[str, Any]:
        return {"name": self.name, "input": thaw(self.input), "expect": self.expect.to_document()}


class DependencyError(Exception):
    """References to other rules that cannot be (`sidecar.dependencies.resolve`): each
    issue's `index` is into the rules given to `EvaluationPlan.build`."""

    def __init__(self, issues: Sequence[DependencyIssue]) -> None:
        super().__init__(f"{len(issues)} rule dependency problem(s)")
        self.issues = tuple(issues)


@dataclass(frozen=True, slots=True)
class EvaluationPlan:
    """Enabled rules in the order answers list them (priority, then document order) and
    their program, which evaluates every rule after those it reads (`rules["id"]`)."""

    rules: tuple[Rule, ...]
    conditions: ConditionSet

    @classmethod
    def build(cls, rules: Sequence[Rule], compiler: ConditionCompiler) -> EvaluationPlan:
        """Raises `DependencyError`, or `ConditionSetError` with indexes into the
        *enabled, ordered* rules."""
        ruleset_id = rules[0].ruleset_id if rules else ""
        dependents = [
            Dependent(
                rule.id, _references(rule, compiler), rule.enabled, rule.mode is RuleMode.SHADOW
            )
            for rule in rules
        ]
        direct, issues = resolve(ruleset_id, dependents)
        if issues:
            raise DependencyError(issues)
        enabled = sorted(
            (index for index, rule in enumerate(rules) if rule.enabled),
            key=lambda index: -rules[index].priority,
        )
        place = {index: position for position, index in enumerate(enabled)}
        ordered = [rules[index] for index in enabled]
        conditions = compiler.compile_set(
            [rule.condition for rule in ordered],
            names=[rule.id for rule in ordered],
            dependencies=[tuple(place[d] for d in direct[index]) for index in enabled],
        )
        return cls(tuple(ordered), conditions)


def _references(rule: Rule, compiler: ConditionCompiler) -> tuple[Reference, ...]:
    """The rules a condition reads; none for one that does not compile (building its
    set, or compiling it alone, reports why)."""
    try:
        return compiler.references(rule.condition)
    except ConditionError:
        return ()


@dataclass(frozen=True, kw_only=True)
class RuleSet:
    """A named group of rules evaluated together, with decision bands and tests.

    `plan` is derived from `rules`; build a changed ruleset with `with_rules`, which
    compiles the new plan, rather than `dataclasses.replace`. A ruleset with
    `challenger_of` is evaluated beside the ruleset it names on every input that ruleset
    gets (a candidate replacement judged on live traffic); it answers for itself too.
    """

    id: str
    name: str
    description: str = ""
    labels: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    decisions: tuple[DecisionBand, ...] = ()
    default_decision: str | None = None
    rules: tuple[Rule, ...] = ()
    tests: tuple[RuleTest, ...] = ()
    challenger_of: str | None = None
    plan: EvaluationPlan = field(compare=False, repr=False)
    location: Location | None = field(default=None, compare=False)

    def with_rules(self, rules: Sequence[Rule], compiler: ConditionCompiler) -> RuleSet:
        return replace(self, rules=tuple(rules), plan=EvaluationPlan.build(rules, compiler))

    def decide(self, total_points: int) -> str | None:
        """The first band whose `min_points` the total reaches, else the default."""
        for band in self.decisions:
            if total_points >= band.min_points:
                return band.decision
        return self.default_decision

    def to_document(self) -> dict[str, Any]:
        """The canonical `rule-sidecar/v1` document: what the revision digest is taken of."""
        spec: dict[str, Any] = {"rules": [rule.to_document() for rule in self.rules]}
        if self.decisions:
            spec["decisions"] = [
                {"decision": b.decision, "min_points": b.min_points} for b in self.decisions
            ]
        if self.default_decision is not None:
            spec["default_decision"] = self.default_decision
        if self.tests:
            spec["tests"] = [test.to_document() for test in self.tests]
        if self.challenger_of is not None:
            spec["challenger_of"] = self.challenger_of
        return {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "metadata": {
                "id": self.id,
                "name": self.name,
                "description": self.description,
                "labels": thaw(self.labels),
            },
            "spec": spec,
        }

    @cached_property
    def digest(self) -> str:
        """sha256 of the canonical document: equal on every pod that loaded equal rules,
        from a file or from a database that stored them."""
        document = self.to_document()
        text = _dumps(document)
        # Only a double of 1e16 or more (`1e+16`) or a negative zero prints otherwise than
        # its canonical form: most rulesets have neither and are not walked.
        if "e+" in text or "-0.0" in text:
            text = _dumps(canonical_json(document))
        return hashlib.sha256(text.encode()).hexdigest()

    def to_dict(self, *, with_rules: bool = True) -> dict[str, Any]:
        """The API's view of the ruleset."""
        view: dict[str, Any] = {
            "id": self.id,
            "name": self.name,
            "description": self.description,
            "labels": thaw(self.labels),
            "decisions": [
                {"decision": b.decision, "min_points": b.min_points} for b in self.decisions
            ],
            "default_decision": self.default_decision,
            "rule_count": len(self.rules),
            "enabled_rule_count": len(self.plan.rules),
            "test_count": len(self.tests),
            "challenger_of": self.challenger_of,
            "digest": self.digest,
            "source": self.location.to_dict() if self.location else None,
        }
        if with_rules:
            view["rules"] = [rule.to_dict() for rule in self.rules]
        return view

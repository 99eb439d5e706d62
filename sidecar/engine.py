"""Evaluate a ruleset against input documents.

Everything for one request is taken from one snapshot, so a batch never mixes versions
and every result names the version it used. A condition that errors on an input does not
match and is reported in `errors`; it never fails the evaluation as a whole.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from sidecar.conditions import DEFAULT_INPUT_LIMITS, InputLimits, check_input
from sidecar.errors import InputError, NotFoundError
from sidecar.explain import RuleExplanation, explain_rules
from sidecar.model import Rule, RuleMode, RuleSet
from sidecar.snapshot import Snapshot

__all__ = [
    "SLICE_SECONDS",
    "Evaluation",
    "RuleError",
    "evaluate",
    "evaluate_in_slices",
    "evaluate_many",
    "evaluate_ruleset",
]

SLICE_SECONDS: Final = 0.002
"""How long a batch evaluates before it lets the event loop run other work: with eight
batches running, a probe waits about eight slices."""

_R = TypeVar("_R")


@dataclass(frozen=True, slots=True)
class RuleError:
    rule_id: str
    error: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Evaluation:
    """The outcome for one input. `matched` is in evaluation order (priority first);
    they are the snapshot's own (immutable) rules, so a match costs no allocation.
    Shadow rules' matches and errors are kept apart: they never add points, and the
    answer an application gets lists only their matches (`shadow_matched`), so that a
    rule on trial changes nothing it acts on; embedded tests, metrics and explain see
    their errors too."""

    ruleset_id: str
    registry_version: int
    revision: str
    total_points: int
    decision: str | None
    matched: tuple[Rule, ...]
    errors: tuple[RuleError, ...]
    shadow_matched: tuple[Rule, ...] = ()
    shadow_errors: tuple[RuleError, ...] = ()
    rules: tuple[RuleExplanation, ...] | None = None  # when an explanation was asked for
    challenger: Evaluation | None = None  # the ruleset's challenger on the same input

    def to_dict(self) -> dict[str, Any]:
        view = {
            "ruleset_id": self.ruleset_id,
            "registry_version": self.registry_version,
            "revision": self.revision,
            "total_points": self.total_points,
            "decision": self.decision,
            "matched": [
                {"id": m.id, "name": m.name, "points": m.points, "priority": m.priority}
                for m in self.matched
            ],
            "errors": [{"rule_id": e.rule_id, "error": e.error} for e in self.errors],
            "shadow_matched": [rule.id for rule in self.shadow_matched],
        }
        if self.rules is not None:
            view["rules"] = [rule.to_dict() for rule in self.rules]
        challenger = self.challenger_view()
        if challenger is not None:
            view["challenger"] = challenger
        return view

    def challenger_view(self) -> dict[str, Any] | None:
        """What the challenger decided, as the answer and the decision log say it."""
        challenger = self.challenger
        if challenger is None:
            return None
        return {
            "ruleset_id": challenger.ruleset_id,
            "total_points": challenger.total_points,
            "decision": challenger.decision,
            "matched": [rule.id for rule in challenger.matched],
        }


def evaluate_ruleset(
    ruleset: RuleSet,
    document: Any,
    *,
    version: int = 0,
    revision: str = "",
    limits: InputLimits = DEFAULT_INPUT_LIMITS,
    explain: bool = False,
    explain_budget: int | None = None,
    challenger: RuleSet | None = None,
) -> Evaluation:
    """Evaluate one ruleset; raises `InputError` when the input breaks the limits. With
    `explain`, the result also says what every rule did and read (`sidecar.explain`;
    `ExplanationTooLarge` past `explain_budget` bytes);
    with a `challenger` (the snapshot's, `Snapshot.challengers`), the result carries its
    evaluation of the same input."""
    # The whole input is checked, so that what an input may hold does not depend on
    # which fields a ruleset happens to read; CEL then sees only those fields.
    exact = check_input(document, limits)
    challenged = None
    if challenger is not None:
        challenged = _evaluate(challenger, document, version, revision, exact=exact)
    return _evaluate(
        ruleset,
        document,
        version,
        revision,
        exact=exact,
        explain=explain,
        budget=explain_budget,
        challenger=challenged,
    )


def _evaluate(
    ruleset: RuleSet,
    document: Any,
    version: int,
    revision: str,
    *,
    exact: bool,
    explain: bool = False,
    budget: int | None = None,
    challenger: Evaluation | None = None,
) -> Evaluation:
    """`evaluate_ruleset` of an input that passed `check_input` (which said whether it
    converts `exact`ly)."""
    plan = ruleset.plan
    view = plan.conditions.project(document)
    matched: list[Rule] = []
    errors: list[RuleError] = []
    shadow_matched: list[Rule] = []
    shadow_errors: list[RuleError] = []
    total = 0
    outcomes = plan.conditions.evaluate(view, exact=exact)
    for rule, outcome in zip(plan.rules, outcomes, strict=True):
        if outcome is True:
            if rule.mode is RuleMode.SHADOW:
                shadow_matched.append(rule)
            else:
                matched.append(rule)
                total += rule.points
        elif outcome is not False:
            found = RuleError(rule.id, outcome)
            (shadow_errors if rule.mode is RuleMode.SHADOW else errors).append(found)
    return Evaluation(
        ruleset_id=ruleset.id,
        registry_version=version,
        revision=revision,
        total_points=total,
        decision=ruleset.decide(total),
        matched=tuple(matched),
        errors=tuple(errors),
        shadow_matched=tuple(shadow_matched),
        shadow_errors=tuple(shadow_errors),
        rules=explain_rules(ruleset, outcomes, document, budget=budget) if explain else None,
        challenger=challenger,
    )


def _ruleset(snapshot: Snapshot, ruleset_id: str) -> RuleSet:
    try:
        return snapshot.rulesets[ruleset_id]
    except KeyError:
        raise NotFoundError("ruleset", ruleset_id) from None


def evaluate(
    snapshot: Snapshot,
    ruleset_id: str,
    document: Any,
    *,
    limits: InputLimits = DEFAULT_INPUT_LIMITS,
) -> Evaluation:
    """Evaluate `ruleset_id` of this snapshot (and its challenger, if it has one);
    raises `NotFoundError` or `InputError`."""
    return evaluate_ruleset(
        _ruleset(snapshot, ruleset_id),
        document,
        version=snapshot.version,
        revision=snapshot.revision,
        limits=limits,
        challenger=snapshot.challengers.get(ruleset_id),
    )


def evaluate_many(
    snapshot: Snapshot,
    ruleset_id: str,
    documents: Iterable[Any],
    *,
    limits: InputLimits = DEFAULT_INPUT_LIMITS,
) -> list[Evaluation]:
    """Evaluate a batch against one snapshot; every result names the same version."""
    ruleset = _ruleset(snapshot, ruleset_id)
    challenger = snapshot.challengers.get(ruleset_id)
    return [
        evaluate_ruleset(
            ruleset,
            document,
            version=snapshot.version,
            revision=snapshot.revision,
            limits=limits,
            challenger=challenger,
        )
        for document in documents
    ]


async def evaluate_in_slices(
    ruleset: RuleSet,
    documents: Sequence[Any],
    render: Callable[[Evaluation], _R],
    *,
    version: int = 0,
    revision: str = "",
    limits: InputLimits = DEFAULT_INPUT_LIMITS,
    slice_seconds: float = SLICE_SECONDS,
    explain: bool = False,
    explain_budget: int | None = None,
    challenger: RuleSet | None = None,
) -> AsyncGenerator[list[_R], None]:
    """Evaluate a batch on the event loop, a slice of about `slice_seconds` at a time.

    Between slices the loop runs other work (probes, other requests), so a batch of any
    size never holds it longer than one slice plus one evaluation; `render` (turning a
    result into what the caller keeps, e.g. its JSON shape) runs inside the slice, so
    that its cost is counted too. The caller holds the ruleset of one snapshot, so every
    slice answers from the same version however many reloads happen meanwhile. An input
    that breaks the limits raises `InputError` with a path relative to the batch
    (`$[3].a`); the consumer may stop early (a budget), and nothing is evaluated past
    where it stopped.
    """
    index = 0
    while index < len(documents):
        began = time.perf_counter()
        part: list[_R] = []
        while index < len(documents) and (not part or time.perf_counter() - began < slice_seconds):
            try:
                result = evaluate_ruleset(
                    ruleset,
                    documents[index],
                    version=version,
                    revision=revision,
                    limits=limits,
                    explain=explain,
                    explain_budget=explain_budget,
                    challenger=challenger,
                )
            except InputError as exc:
                path = exc.path.replace("$", f"$[{index}]", 1)
                raise InputError(exc.message, path=path) from None
            part.append(render(result))
            index += 1
        yield part
        if index < len(documents):
            await asyncio.sleep(0)

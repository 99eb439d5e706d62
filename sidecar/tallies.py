"""What each ruleset decided and how often each of its rules fired.

Counted on the request path, so counting is a few list and dict updates per evaluation;
turning the counts into Prometheus samples or a stats answer happens when someone asks.
Each ruleset is counted in two spans: since its current content went live (a change to
the ruleset starts a new span: the figures that judge a change are its own), and since
the process started (what Prometheus counters need: they only grow while a series
exists). A ruleset or rule that leaves the registry leaves both.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TypedDict, TypeVar

from sidecar.engine import Evaluation
from sidecar.model import RuleSet
from sidecar.snapshot import Snapshot

__all__ = [
    "DecisionCount",
    "DecisionTallies",
    "RulesetTally",
    "SpanView",
    "StatsView",
]


_Pair = tuple[str, str | None, str | None]
_K = TypeVar("_K")


def _add(into: dict[_K, int], counts: Mapping[_K, int]) -> None:
    for key, count in counts.items():
        into[key] = into.get(key, 0) + count


@dataclass(frozen=True, slots=True)
class _Shape:
    """What the counts of a ruleset's content are shown by: its rules (id, mode, enabled)
    in document order and its decisions in order. Kept instead of the ruleset, whose
    compiled conditions a span would otherwise keep alive after a change."""

    digest: str
    rules: tuple[tuple[str, str, bool], ...]
    decisions: tuple[str | None, ...]

    @classmethod
    def of(cls, ruleset: RuleSet) -> _Shape:
        rules = tuple((rule.id, rule.mode.value, rule.enabled) for rule in ruleset.rules)
        bands = [band.decision for band in ruleset.decisions]
        return cls(ruleset.digest, rules, (*bands, ruleset.default_decision))


@dataclass(slots=True)
class _Span:
    """Counts of one ruleset's content since `since`: per rule by position in the
    ruleset's evaluation plan, so that a match costs one list update."""

    shape: _Shape
    since: float
    since_version: int
    positions: dict[str, int]
    evaluations: int = 0
    errored: int = 0  # conditions that errored, summed over inputs
    matches: list[int] = field(default_factory=list)
    errors: list[int] = field(default_factory=list)
    decisions: dict[str | None, int] = field(default_factory=dict)
    # (challenger id, this ruleset's decision, the challenger's): inputs
    versus: dict[_Pair, int] = field(default_factory=dict)

    @classmethod
    def open(cls, ruleset: RuleSet, since: float, version: int) -> _Span:
        positions = {rule.id: index for index, rule in enumerate(ruleset.plan.rules)}
        size = len(positions)
        shape = _Shape.of(ruleset)
        return cls(shape, since, version, positions, matches=[0] * size, errors=[0] * size)

    def count(self, evaluation: Evaluation) -> None:
        self.evaluations += 1
        positions = self.positions
        for rule in evaluation.matched:
            self.matches[positions[rule.id]] += 1
        if evaluation.shadow_matched:
            for rule in evaluation.shadow_matched:
                self.matches[positions[rule.id]] += 1
        if evaluation.errors or evaluation.shadow_errors:
            for error in (*evaluation.errors, *evaluation.shadow_errors):
                self.errored += 1
                self.errors[positions[error.rule_id]] += 1
        decision = evaluation.decision
        self.decisions[decision] = self.decisions.get(decision, 0) + 1
        challenger = evaluation.challenger
        if challenger is not None:
            pair = (challenger.ruleset_id, decision, challenger.decision)
            self.versus[pair] = self.versus.get(pair, 0) + 1


@dataclass(slots=True)
class _Totals:
    """Counts since the process started, of the spans that ended: matches by rule id and
    the mode the rule had (a rule promoted from shadow did not match as active before),
    errors by rule id."""

    evaluations: int = 0
    errored: int = 0
    matches: dict[tuple[str, str], int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    decisions: dict[str | None, int] = field(default_factory=dict)
    versus: dict[_Pair, int] = field(default_factory=dict)

    def add(self, span: _Span) -> None:
        self.evaluations += span.evaluations
        self.errored += span.errored
        for rule_id, mode, _ in span.shape.rules:
            index = span.positions.get(rule_id)
            if index is not None:
                key = (rule_id, mode)
                self.matches[key] = self.matches.get(key, 0) + span.matches[index]
                self.errors[rule_id] = self.errors.get(rule_id, 0) + span.errors[index]
        _add(self.decisions, span.decisions)
        _add(self.versus, span.versus)

    def merge(self, other: _Totals) -> None:
        self.evaluations += other.evaluations
        self.errored += other.errored
        _add(self.matches, other.matches)
        _add(self.errors, other.errors)
        _add(self.decisions, other.decisions)
        _add(self.versus, other.versus)

    def keep(self, rule_ids: Collection[str]) -> None:
        """Forget rules that are no longer in the ruleset."""
        for key in [key for key in self.matches if key[0] not in rule_ids]:
            del self.matches[key]
        for rule_id in [rule_id for rule_id in self.errors if rule_id not in rule_ids]:
            del self.errors[rule_id]


@dataclass(frozen=True, slots=True)
class RulesetTally:
    """A ruleset's counts since start, for the Prometheus collector."""

    ruleset_id: str
    evaluations: int
    errored: int
    decisions: Mapping[str | None, int]
    matches: Mapping[tuple[str, str], int]  # (rule id, the mode it matched in)
    errors: Mapping[str, int]  # by rule id
    # (challenger id, this ruleset's decision, the challenger's) -> inputs
    versus: Mapping[_Pair, int]


class DecisionCount(TypedDict):
    decision: str | None
    count: int


class RuleStats(TypedDict):
    id: str
    mode: str
    enabled: bool
    matches: int
    errors: int
    hit_rate: float | None


class VersusCount(TypedDict):
    challenger: str
    decision: str | None
    challenger_decision: str | None
    count: int


class SpanView(TypedDict):
    since: str
    since_version: int | None
    evaluations: int
    decisions: list[DecisionCount]
    rules: list[RuleStats]
    challenger: list[VersusCount]


class StatsView(TypedDict):
    ruleset_id: str
    digest: str
    current: SpanView
    since_start: SpanView


class DecisionTallies:
    """Per-ruleset tallies, fed by every evaluation (on the event loop) and pruned at
    every publish (`retain`), read at scrape time and by the stats endpoint."""

    def __init__(self) -> None:
        self._started = time.time()
        self._spans: dict[str, _Span] = {}
        self._totals: dict[str, _Totals] = {}
        # When each ruleset's current content went live: (digest, registry version, time).
        self._live: dict[str, tuple[str, int, float]] = {}

    def count(self, ruleset: RuleSet, evaluation: Evaluation) -> None:
        """Count one evaluation of `ruleset`, a ruleset of the serving snapshot (the
        caller skips evaluations of one that a publish replaced meanwhile: they would
        count a superseded content as the current one)."""
        span = self._spans.get(ruleset.id)
        if span is None or span.shape.digest != ruleset.digest:  # new content: a new span
            span = self._open(ruleset, evaluation.registry_version)
        span.count(evaluation)

    def _open(self, ruleset: RuleSet, version: int) -> _Span:
        """A new span for the ruleset's content; the one it replaces goes into the totals."""
        ended = self._spans.get(ruleset.id)
        if ended is not None:
            totals = self._totals.setdefault(ruleset.id, _Totals())
            totals.add(ended)
            totals.keep({rule.id for rule in ruleset.rules})
        digest, since_version, since = self._live.get(ruleset.id, ("", version, time.time()))
        if digest != ruleset.digest:  # evaluated before its publish was announced
            since_version, since = version, time.time()
        span = self._spans[ruleset.id] = _Span.open(ruleset, since, since_version)
        return span

    def retain(self, snapshot: Snapshot) -> None:
        """After a publish: note when changed rulesets went live and start their new
        spans (the rules a change removed stop being exported now, not at the ruleset's
        next evaluation); drop the counts of rulesets that are gone."""
        now = time.time()
        for ruleset_id, ruleset in snapshot.rulesets.items():
            live = self._live.get(ruleset_id)
            if live is None or live[0] != ruleset.digest:
                self._live[ruleset_id] = (ruleset.digest, snapshot.version, now)
                span = self._spans.get(ruleset_id)
                if span is not None and span.shape.digest != ruleset.digest:
                    self._open(ruleset, snapshot.version)
        for counts in (self._spans, self._totals, self._live):
            for ruleset_id in [r for r in counts if r not in snapshot.rulesets]:
                del counts[ruleset_id]

    def tallies(self) -> Iterator[RulesetTally]:
        """Every counted ruleset, since start, its rules in the ruleset's order."""
        for ruleset_id, span in self._spans.items():
            totals = _Totals()
            totals.merge(self._totals.get(ruleset_id, totals))
            totals.add(span)
            yield RulesetTally(
                ruleset_id,
                totals.evaluations,
                totals.errored,
                totals.decisions,
                totals.matches,
                totals.errors,
                totals.versus,
            )

    def stats(self, ruleset: RuleSet) -> StatsView:
        """The stats endpoint's answer for a ruleset of the serving snapshot."""
        span = self._spans.get(ruleset.id)
        if span is None or span.shape.digest != ruleset.digest:
            digest, version, since = self._live.get(ruleset.id, ("", 0, self._started))
            current = _Span.open(ruleset, since, version if digest == ruleset.digest else 0)
            if span is None:
                span = current
        else:
            current = span
        return {
            "ruleset_id": ruleset.id,
            "digest": ruleset.digest,
            "current": _view(current.shape, current, _Totals()),
            "since_start": self._since_start(ruleset.id, current.shape, span),
        }

    def _since_start(self, ruleset_id: str, shape: _Shape, span: _Span) -> SpanView:
        """`span` and the spans before it, shown as the ruleset's current `shape`."""
        view = _view(shape, span, self._totals.get(ruleset_id, _Totals()))
        view["since"], view["since_version"] = _iso(self._started), None
        return view


def _iso(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).isoformat()


def _view(shape: _Shape, span: _Span, before: _Totals) -> SpanView:
    """`span` plus the totals of the spans `before` it, as the stats endpoint shows it."""
    evaluations = span.evaluations + before.evaluations
    rules: list[RuleStats] = []
    for rule_id, mode, enabled in shape.rules:
        index = span.positions.get(rule_id)
        matched = before.matches.get((rule_id, mode), 0)
        matches = matched + (0 if index is None else span.matches[index])
        errors = before.errors.get(rule_id, 0) + (0 if index is None else span.errors[index])
        rules.append(
            {
                "id": rule_id,
                "mode": mode,
                "enabled": enabled,
                "matches": matches,
                "errors": errors,
                "hit_rate": matches / evaluations if evaluations and enabled else None,
            }
        )
    counted = dict(before.decisions)
    _add(counted, span.decisions)
    order = [*dict.fromkeys([*shape.decisions, *counted])]
    decisions: list[DecisionCount] = [
        {"decision": decision, "count": counted.get(decision, 0)}
        for decision in order
        if decision is not None or counted.get(None)
    ]
    versus = dict(before.versus)
    _add(versus, span.versus)
    return {
        "since": _iso(span.since),
        "since_version": span.since_version,
        "evaluations": evaluations,
        "decisions": decisions,
        "rules": rules,
        "challenger": [
            {"challenger": c, "decision": d, "challenger_decision": cd, "count": count}
            for (c, d, cd), count in versus.items()
        ],
    }

"""Evaluation of rulesets: matching order, points, decisions, errors and result contract."""

from __future__ import annotations

import json
from typing import Any

import pytest
from conftest import load_docs, make_ruleset_doc, rule_doc
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.conditions import ConditionCompiler, InputLimits
from sidecar.engine import Evaluation, evaluate, evaluate_many, evaluate_ruleset
from sidecar.errors import InputError, NotFoundError
from sidecar.loader import Loader
from sidecar.registry import RuleRegistry
from sidecar.snapshot import Snapshot


def _ids(result: Evaluation) -> list[str]:
    return [match.id for match in result.matched]


class TestMatching:
    """Matched rules, their order and the total of their points."""

    def test_matched_in_priority_order_ties_in_document_order(self):
        """Higher priority first; equal priorities keep the order they were written in."""
        snapshot = load_docs(
            make_ruleset_doc(
                "rs",
                [
                    rule_doc("p0", priority=0),
                    rule_doc("p5a", priority=5),
                    rule_doc("low", priority=-1),
                    rule_doc("p5b", priority=5),
                    rule_doc("p10", priority=10),
                    rule_doc("p0b"),
                ],
            )
        )
        result = evaluate(snapshot, "rs", {})
        assert _ids(result) == ["p10", "p5a", "p5b", "p0", "p0b", "low"]
        assert [m.priority for m in result.matched] == [10, 5, 5, 0, 0, -1]

    def test_only_true_conditions_match(self):
        """A rule matches exactly when its condition is true on the input."""
        snapshot = load_docs(
            make_ruleset_doc(
                "rs",
                [rule_doc("big", "input.amount > 100", 10), rule_doc("small", "input.amount < 5")],
            )
        )
        assert _ids(evaluate(snapshot, "rs", {"amount": 500})) == ["big"]
        assert _ids(evaluate(snapshot, "rs", {"amount": 1})) == ["small"]
        assert _ids(evaluate(snapshot, "rs", {"amount": 50})) == []

    def test_total_points_sums_matched_including_negative(self):
        """total_points adds the points of matched rules, negative ones included."""
        snapshot = load_docs(
            make_ruleset_doc(
                "rs",
                [
                    rule_doc("a", "input.x > 0", 30),
                    rule_doc("b", "input.x > 10", -45),
                    rule_doc("c", "input.x > 100", 7),
                ],
            )
        )
        assert evaluate(snapshot, "rs", {"x": 1}).total_points == 30
        assert evaluate(snapshot, "rs", {"x": 11}).total_points == -15
        assert evaluate(snapshot, "rs", {"x": 101}).total_points == -8
        assert evaluate(snapshot, "rs", {"x": 0}).total_points == 0

    def test_match_carries_name_and_points(self):
        """Each match reports the rule's id, name and points."""
        snapshot = load_docs(
            make_ruleset_doc("rs", [rule_doc("r1", points=4, name="Rule one"), rule_doc("r2")])
        )
        result = evaluate(snapshot, "rs", {})
        assert [(m.id, m.name, m.points) for m in result.matched] == [
            ("r1", "Rule one", 4),
            ("r2", "r2", 1),
        ]

    def test_disabled_rules_never_match(self):
        """A disabled rule neither matches, nor errors, nor counts, even if always true."""
        snapshot = load_docs(
            make_ruleset_doc(
                "rs",
                [
                    rule_doc("on", points=2),
                    rule_doc("off", points=100, enabled=False),
                    rule_doc("off_err", "input.missing > 1", enabled=False),
                ],
            )
        )
        result = evaluate(snapshot, "rs", {})
        assert _ids(result) == ["on"]
        assert result.total_points == 2
        assert result.errors == ()

    def test_ruleset_without_enabled_rules(self):
        """A ruleset whose rules are all disabled gives an empty result."""
        snapshot = load_docs(
            make_ruleset_doc("rs", [rule_doc("off", enabled=False)], default_decision="allow")
        )
        result = evaluate(snapshot, "rs", {"a": 1})
        assert (result.matched, result.errors, result.total_points) == ((), (), 0)
        assert result.decision == "allow"

    def test_evaluate_ruleset_defaults_to_version_zero(self):
        """evaluate_ruleset on a bare ruleset reports version 0 and an empty revision."""
        snapshot = load_docs(make_ruleset_doc("rs", [rule_doc("r1")]))
        result = evaluate_ruleset(snapshot.rulesets["rs"], {})
        assert (result.registry_version, result.revision) == (0, "")
        assert _ids(result) == ["r1"]


class TestDecisions:
    """Decision bands: the first band whose min_points the total reaches wins."""

    BANDS = (
        {"decision": "deny", "min_points": 50},
        {"decision": "review", "min_points": 20},
    )

    @staticmethod
    def _with_points(points: int, **spec: Any) -> Snapshot:
        rules = [rule_doc("r", "input.hit", points)]
        return load_docs(make_ruleset_doc("rs", rules, **spec), loader=Loader(run_checks=False))

    @pytest.mark.parametrize(
        ("points", "expected"),
        [(60, "deny"), (50, "deny"), (49, "review"), (20, "review"), (19, "allow"), (-5, "allow")],
    )
    def test_bands_with_default(self, points, expected):
        """The total picks the first band it reaches, else the default decision."""
        snapshot = self._with_points(points, decisions=list(self.BANDS), default_decision="allow")
        assert evaluate(snapshot, "rs", {"hit": True}).decision == expected

    def test_no_band_reached_and_no_default_gives_none(self):
        """Without a default, a total below every band gives no decision."""
        snapshot = self._with_points(5, decisions=list(self.BANDS))
        assert evaluate(snapshot, "rs", {"hit": True}).decision is None

    def test_no_bands_gives_default_or_none(self):
        """Without bands the decision is the default, or None when there is none."""
        with_default = self._with_points(5, default_decision="allow")
        without = self._with_points(5)
        assert evaluate(with_default, "rs", {"hit": True}).decision == "allow"
        assert evaluate(without, "rs", {"hit": True}).decision is None

    def test_first_band_reached_wins_even_when_listed_low_first(self):
        """Bands are checked in written order, so a low band listed first shadows a high one."""
        snapshot = self._with_points(
            100,
            decisions=[
                {"decision": "review", "min_points": 10},
                {"decision": "deny", "min_points": 50},
            ],
        )
        assert evaluate(snapshot, "rs", {"hit": True}).decision == "review"

    def test_negative_band(self):
        """A band with negative min_points applies to negative totals that reach it."""
        snapshot = self._with_points(
            -10,
            decisions=[{"decision": "ok", "min_points": 0}, {"decision": "odd", "min_points": -10}],
            default_decision="very_odd",
        )
        assert evaluate(snapshot, "rs", {"hit": True}).decision == "odd"
        assert evaluate(snapshot, "rs", {"hit": False}).decision == "ok"


class TestErrorsAndLookups:
    """Unknown rulesets, bad inputs and rules that error on an input."""

    def test_unknown_ruleset_raises_not_found(self):
        """evaluate and evaluate_many raise NotFoundError (a KeyError) for an unknown id."""
        snapshot = load_docs(make_ruleset_doc("rs", [rule_doc("r1")]))
        with pytest.raises(NotFoundError) as info:
            evaluate(snapshot, "nope", {})
        assert (info.value.kind, info.value.id) == ("ruleset", "nope")
        assert isinstance(info.value, KeyError)
        with pytest.raises(NotFoundError):
            evaluate_many(snapshot, "nope", [{}])

    def test_empty_snapshot_has_no_rulesets(self):
        """Evaluating against the empty snapshot raises NotFoundError."""
        with pytest.raises(NotFoundError):
            evaluate(Snapshot.empty(), "rs", {})

    def test_rule_error_reported_while_others_evaluate(self):
        """A rule that errors is reported and skipped; the other rules still match and count."""
        snapshot = load_docs(
            make_ruleset_doc(
                "rs",
                [
                    rule_doc("ok1", "input.a > 0", 3),
                    rule_doc("bad", "input.missing > 1", 100),
                    rule_doc("div", "10 / input.zero > 1", 100),
                    rule_doc("ok2", "input.a < 10", 4),
                ],
            ),
            loader=Loader(run_checks=False),
        )
        result = evaluate(snapshot, "rs", {"a": 1, "zero": 0})
        assert _ids(result) == ["ok1", "ok2"]
        assert result.total_points == 7
        assert [e.rule_id for e in result.errors] == ["bad", "div"]
        assert "missing" in result.errors[0].error
        assert result.errors[1].error == "divide by zero"

    def test_non_boolean_condition_is_reported_as_error(self):
        """A dyn condition giving a non-boolean is a per-rule error, not a match."""
        snapshot = load_docs(
            make_ruleset_doc("rs", [rule_doc("flag", "input.flag", 5), rule_doc("t")])
        )
        result = evaluate(snapshot, "rs", {"flag": 5})
        assert _ids(result) == ["t"]
        assert [e.rule_id for e in result.errors] == ["flag"]
        assert "not a boolean" in result.errors[0].error

    def test_input_breaking_limits_raises_input_error(self):
        """An input that breaks the limits raises InputError naming the path."""
        snapshot = load_docs(make_ruleset_doc("rs", [rule_doc("r1")]))
        with pytest.raises(InputError) as info:
            evaluate(snapshot, "rs", {"tags": {"a", "b"}})
        assert info.value.path == "$.tags"
        with pytest.raises(InputError):
            evaluate(snapshot, "rs", {"l": [1, 2, 3]}, limits=InputLimits(max_items=2))


class TestVersionsAndContract:
    """Results name the registry version they used and expose the agreed dict shape."""

    def _registry(self) -> RuleRegistry:
        registry = RuleRegistry()
        docs = (
            make_ruleset_doc(
                "rs",
                [rule_doc("r1", "input.a > 0", 5, name="First"), rule_doc("r2", "input.nope > 0")],
                decisions=[{"decision": "high", "min_points": 5}],
            ),
        )
        registry.publish(load_docs(*docs, loader=Loader(run_checks=False)))
        registry.publish(load_docs(*docs, loader=Loader(run_checks=False)))
        return registry

    def test_result_carries_registry_version_and_revision(self):
        """evaluate reports the snapshot's version and revision."""
        registry = self._registry()
        snapshot = registry.current
        result = evaluate(snapshot, "rs", {"a": 1})
        assert result.registry_version == 2 == registry.version
        assert result.revision == snapshot.revision
        assert len(result.revision) == 16

    def test_to_dict_has_contract_keys(self):
        """to_dict has the contract keys with the contract shapes (extra keys allowed)."""
        result = evaluate(self._registry().current, "rs", {"a": 1}).to_dict()
        required = {"ruleset_id", "registry_version", "total_points", "decision", "matched"}
        assert required | {"errors"} <= set(result)
        assert result["ruleset_id"] == "rs"
        assert result["registry_version"] == 2
        assert result["total_points"] == 5
        assert result["decision"] == "high"
        assert len(result["matched"]) == 1
        assert {"id", "name", "points"} <= set(result["matched"][0])
        match = result["matched"][0]
        assert (match["id"], match["name"], match["points"]) == ("r1", "First", 5)
        assert len(result["errors"]) == 1
        assert {"rule_id", "error"} <= set(result["errors"][0])
        assert result["errors"][0]["rule_id"] == "r2"
        assert isinstance(result["errors"][0]["error"], str)

    def test_to_dict_is_json_serialisable(self):
        """The dict form survives a JSON round trip unchanged."""
        result = evaluate(self._registry().current, "rs", {"a": 1}).to_dict()
        assert json.loads(json.dumps(result)) == result

    def test_batch_results_share_one_version_and_keep_order(self):
        """evaluate_many gives one result per input, in order, all naming the same version."""
        registry = self._registry()
        snapshot = registry.current
        documents = [{"a": 1}, {"a": -1}, {"a": 3}, {}]
        results = evaluate_many(snapshot, "rs", documents)
        assert len(results) == 4
        assert {r.registry_version for r in results} == {snapshot.version}
        assert {r.revision for r in results} == {snapshot.revision}
        assert [r.total_points for r in results] == [5, 0, 5, 0]
        assert len(results[3].errors) == 2

    def test_batch_equals_single_evaluations(self):
        """Each batch result equals evaluating that input alone on the same snapshot."""
        snapshot = self._registry().current
        documents = [{"a": n} for n in range(-2, 3)]
        assert evaluate_many(snapshot, "rs", documents) == [
            evaluate(snapshot, "rs", d) for d in documents
        ]

    def test_empty_batch(self):
        """An empty batch gives an empty list."""
        assert evaluate_many(self._registry().current, "rs", []) == []


_PROPERTY_RULES = [
    rule_doc("amount_high", "input.amount > 100", 20, priority=5),
    rule_doc("amount_low", "input.amount < 10", -5),
    rule_doc("country", "input.country in ['FR', 'DE']", 7, priority=5),
    rule_doc("has_email", "has(input.email)", 3, priority=-2),
    rule_doc("email_domain", "input.email.endsWith('.com')", 4),
    rule_doc("flag", "input.flag", 11, priority=1),
    rule_doc("ratio", "100 / input.amount > 2", 6),
    rule_doc("items", "input.items.exists(i, i > 5)", 9, priority=3),
    rule_doc("disabled_true", "true", 1000, enabled=False),
    rule_doc("disabled_err", "input.nothing > 1", 1000, enabled=False, priority=10),
    rule_doc("upper", "input.country.upperAscii() == 'US'", 2),
]

_PROPERTY_INPUTS = st.fixed_dictionaries(
    {},
    optional={
        "amount": st.one_of(st.integers(-20, 300), st.floats(-20, 300), st.text(max_size=2)),
        "country": st.one_of(
            st.sampled_from(["FR", "DE", "us", "US", "GB"]), st.integers(-(2**63), 2**63 - 1)
        ),
        "email": st.one_of(st.sampled_from(["a@b.com", "a@b.org"]), st.none()),
        "flag": st.one_of(st.booleans(), st.integers(0, 2)),
        "items": st.lists(st.integers(0, 10), max_size=5),
    },
)


class TestEvaluationProperties:
    """Invariants of an evaluation on arbitrary inputs."""

    snapshot = load_docs(make_ruleset_doc("rs", _PROPERTY_RULES))
    reference = ConditionCompiler()

    @settings(max_examples=150, deadline=None)
    @given(document=_PROPERTY_INPUTS)
    def test_partition_and_total(self, document):
        """Matched and errored rules partition the enabled rules with unmatched ones."""
        result = evaluate(self.snapshot, "rs", document)
        ruleset = self.snapshot.rulesets["rs"]
        enabled = {r.id for r in ruleset.rules if r.enabled}
        matched = _ids(result)
        errored = [e.rule_id for e in result.errors]
        assert len(set(matched)) == len(matched)
        assert len(set(errored)) == len(errored)
        assert not set(matched) & set(errored)
        assert set(matched) | set(errored) <= enabled
        assert result.total_points == sum(m.points for m in result.matched)
        points = {r.id: r.points for r in ruleset.rules}
        assert result.total_points == sum(points[i] for i in matched)
        priorities = [m.priority for m in result.matched]
        assert priorities == sorted(priorities, reverse=True)
        for rule in ruleset.rules:
            if not rule.enabled:
                assert rule.id not in matched
                assert rule.id not in errored
                continue
            outcome = self.reference.outcome(rule.condition, document)
            if outcome is True:
                assert rule.id in matched
            elif outcome is False:
                assert rule.id not in matched
                assert rule.id not in errored
            else:
                assert rule.id in errored
        unmatched = enabled - set(matched) - set(errored)
        assert set(matched) | set(errored) | unmatched == enabled


class TestInputReads:
    """Every way a condition can name the input reaches the input it reads."""

    @pytest.mark.parametrize(
        "condition",
        [
            "input.amount > 1000",
            ".input.amount > 1000",  # root-scoped name
            "has(input.a) && .input.amount > 1000",
            "(.input).amount > 1000",
            "input['amount'] > 1000",
        ],
    )
    def test_the_condition_sees_the_fields_it_names(self, condition: str):
        snapshot = load_docs(make_ruleset_doc("s", [rule_doc("r", condition, 50)]))
        result = evaluate(snapshot, "s", {"a": 1, "amount": 2000, "other": "x"})
        assert (_ids(result), result.errors) == (["r"], ())

    def test_quotes_in_comments_hide_no_field(self):
        """The re-attack: `'''` inside `//` comments was read as a string spanning lines,
        and the field between them was projected away."""
        condition = "input.amount > 0 // '''\n  && input.other == 'y' // '''"
        snapshot = load_docs(make_ruleset_doc("s", [rule_doc("r", condition, 2)]))
        result = evaluate(snapshot, "s", {"amount": 1, "other": "y"})
        assert (_ids(result), result.errors) == (["r"], ())

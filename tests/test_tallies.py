"""`DecisionTallies`: the counts behind the stats endpoint and the per-rule metrics."""

from __future__ import annotations

from conftest import fraud_doc, load_docs, make_ruleset_doc

from sidecar.engine import evaluate_ruleset
from sidecar.snapshot import Snapshot
from sidecar.tallies import DecisionTallies

FOREIGN_LARGE = {"amount": 5000, "country": "FR"}


def published(tallies: DecisionTallies, snapshot: Snapshot, version: int) -> Snapshot:
    """The snapshot as the registry would publish it at `version`, announced to tallies."""
    snapshot = Snapshot.build(snapshot.rulesets.values(), version=version)
    tallies.retain(snapshot)
    return snapshot


def count(tallies: DecisionTallies, snapshot: Snapshot, document: object) -> None:
    ruleset = snapshot.rulesets["fraud"]
    tallies.count(ruleset, evaluate_ruleset(ruleset, document, version=snapshot.version))


def matches(tallies: DecisionTallies) -> dict[tuple[str, str], int]:
    """What /metrics exports: matches by (rule, mode)."""
    (fraud,) = [t for t in tallies.tallies() if t.ruleset_id == "fraud"]
    return dict(fraud.matches)


def test_the_same_content_published_again_keeps_its_span() -> None:
    """A reload that changed another ruleset builds new objects for this one: the span
    (and the version it went live at) goes on."""
    tallies = DecisionTallies()
    first = published(tallies, load_docs(fraud_doc(), make_ruleset_doc("extra")), 1)
    count(tallies, first, FOREIGN_LARGE)
    other = make_ruleset_doc("extra", [{"id": "x", "condition": "false", "points": 1}])
    again = published(tallies, load_docs(fraud_doc(), other), 2)
    assert again.rulesets["fraud"] is not first.rulesets["fraud"]
    count(tallies, again, FOREIGN_LARGE)
    current = tallies.stats(again.rulesets["fraud"])["current"]
    assert (current["evaluations"], current["since_version"]) == (2, 1)


def test_a_changed_ruleset_starts_over_and_drops_removed_rules() -> None:
    tallies = DecisionTallies()
    first = published(tallies, load_docs(fraud_doc()), 1)
    count(tallies, first, FOREIGN_LARGE)
    doc = fraud_doc(55)
    doc["spec"]["rules"] = [r for r in doc["spec"]["rules"] if r["id"] != "foreign-country"]
    second = published(tallies, load_docs(doc), 2)
    count(tallies, second, FOREIGN_LARGE)
    stats = tallies.stats(second.rulesets["fraud"])
    assert (stats["current"]["evaluations"], stats["current"]["since_version"]) == (1, 2)
    assert stats["since_start"]["evaluations"] == 2
    assert [rule["id"] for rule in stats["since_start"]["rules"]] == ["large-amount", "never-on"]
    assert matches(tallies) == {("large-amount", "active"): 2}
    decisions = {d["decision"]: d["count"] for d in stats["since_start"]["decisions"]}
    assert decisions == {"deny": 1, "review": 1, "allow": 0}


def test_a_removed_ruleset_is_forgotten() -> None:
    tallies = DecisionTallies()
    first = published(tallies, load_docs(fraud_doc()), 1)
    count(tallies, first, FOREIGN_LARGE)
    published(tallies, load_docs(make_ruleset_doc("extra")), 2)
    assert list(tallies.tallies()) == []
    back = published(tallies, load_docs(fraud_doc()), 3)
    stats = tallies.stats(back.rulesets["fraud"])
    assert stats["since_start"]["evaluations"] == 0
    assert stats["current"]["since_version"] == 3


def test_no_decision_is_counted_as_none() -> None:
    """A ruleset without bands or default decides nothing: counted under null, last."""
    tallies = DecisionTallies()
    snapshot = published(tallies, load_docs(make_ruleset_doc("fraud")), 1)
    count(tallies, snapshot, {"amount": 5})
    decisions = tallies.stats(snapshot.rulesets["fraud"])["current"]["decisions"]
    assert decisions == [{"decision": None, "count": 1}]


def test_a_change_stops_exporting_removed_rules_at_once() -> None:
    """The attack: a rule a reload removed was still exported until its ruleset was
    evaluated again (never, for a ruleset rarely used). The publish starts the span."""
    tallies = DecisionTallies()
    first = published(tallies, load_docs(fraud_doc()), 1)
    count(tallies, first, FOREIGN_LARGE)
    assert set(matches(tallies)) == {("large-amount", "active"), ("foreign-country", "active")}
    doc = fraud_doc()
    doc["spec"]["rules"] = [r for r in doc["spec"]["rules"] if r["id"] != "foreign-country"]
    published(tallies, load_docs(doc), 2)
    assert matches(tallies) == {("large-amount", "active"): 1}
    (fraud,) = tallies.tallies()
    assert "foreign-country" not in fraud.errors


def test_a_promoted_rule_keeps_its_shadow_matches_apart() -> None:
    """Matches a rule made in shadow are not counted as active ones after it is
    promoted: /metrics keeps both series; the stats show the mode the rule has now."""
    tallies = DecisionTallies()
    trial = fraud_doc()
    trial["spec"]["rules"][1]["mode"] = "shadow"
    first = published(tallies, load_docs(trial), 1)
    count(tallies, first, FOREIGN_LARGE)
    count(tallies, first, FOREIGN_LARGE)
    promoted = published(tallies, load_docs(fraud_doc()), 2)
    count(tallies, promoted, FOREIGN_LARGE)
    assert matches(tallies)[("foreign-country", "shadow")] == 2
    assert matches(tallies)[("foreign-country", "active")] == 1
    stats = tallies.stats(promoted.rulesets["fraud"])["since_start"]
    foreign = next(rule for rule in stats["rules"] if rule["id"] == "foreign-country")
    assert (foreign["mode"], foreign["matches"]) == ("active", 1)

"""Shadow rules: evaluated, tested and reported like any rule, never counted."""

from __future__ import annotations

import json
from typing import Any

import pytest
from conftest import dump_yaml, fraud_doc, load_docs, make_ruleset_doc
from db_support import Database
from server_support import Sidecar, metric_value

from sidecar import dbtools
from sidecar.checks import run_tests
from sidecar.engine import evaluate_ruleset
from sidecar.errors import LoadError
from sidecar.loader import Loader
from sidecar.model import RuleMode
from sidecar.sources.database import DatabaseSource
from sidecar.sources.dbschema import SCHEMA_VERSION

FOREIGN_LARGE = {"amount": 5000, "country": "FR"}


def with_shadow(**test: Any) -> dict[str, Any]:
    """`fraud` plus a shadow rule `tiny-amount` (input.amount > 10, 500 points) and a
    shadow rule `needs-device` that errors without `device`."""
    doc = fraud_doc()
    doc["spec"]["rules"] += [
        {"id": "tiny-amount", "condition": "input.amount > 10", "points": 500, "mode": "shadow"},
        {"id": "needs-device", "condition": "input.device.new", "points": 5, "mode": "shadow"},
    ]
    if test:
        doc["spec"]["tests"] = [{"name": "case", **test}]
    return doc


def test_a_shadow_match_adds_no_points_and_changes_no_decision() -> None:
    ruleset = load_docs(with_shadow()).rulesets["fraud"]
    result = evaluate_ruleset(ruleset, {"amount": 5000, "country": "US"})
    assert (result.total_points, result.decision) == (40, "review")
    assert [rule.id for rule in result.matched] == ["large-amount"]
    answer = result.to_dict()
    assert answer["shadow_matched"] == ["tiny-amount"]
    assert answer["errors"] == []  # the shadow rule's error is not the application's
    assert [error.rule_id for error in result.shadow_errors] == ["needs-device"]


def test_explain_names_the_mode() -> None:
    ruleset = load_docs(with_shadow()).rulesets["fraud"]
    rules = evaluate_ruleset(ruleset, FOREIGN_LARGE, explain=True).to_dict()["rules"]
    modes = {rule["id"]: (rule["mode"], rule["outcome"]) for rule in rules}
    assert modes["tiny-amount"] == ("shadow", "matched")
    assert modes["needs-device"] == ("shadow", "error")
    assert modes["large-amount"] == ("active", "matched")


@pytest.mark.parametrize(
    ("expect", "failure"),
    [
        ({"shadow_matched": ["tiny-amount"], "errors": ["needs-device"]}, None),
        ({"shadow_matched": [], "errors": ["needs-device"]}, "shadow_matched: expected"),
        ({"matched": ["large-amount", "foreign-country"]}, "needs-device"),  # unexpected error
        ({"total_points": 70, "decision": "deny", "errors": ["needs-device"]}, None),
    ],
)
def test_embedded_tests_see_shadow_rules(expect: dict[str, Any], failure: str | None) -> None:
    """A shadow rule's matches are checked by `shadow_matched`, its errors like any
    rule's; a failing case refuses the ruleset at load, as any failing case does."""
    doc = with_shadow(input=FOREIGN_LARGE, expect=expect)
    ruleset = load_docs(doc, loader=Loader(run_checks=False)).rulesets["fraud"]
    (case,) = run_tests(ruleset)
    if failure is None:
        assert case.passed, case.failures
        load_docs(doc)
    else:
        assert not case.passed
        assert any(failure in message for message in case.failures), case.failures
        with pytest.raises(LoadError, match="test 'case' failed"):
            load_docs(doc)


def test_mode_is_validated_with_its_location() -> None:
    doc = make_ruleset_doc("m", [{"id": "x", "condition": "true", "points": 1, "mode": "silent"}])
    with pytest.raises(LoadError) as caught:
        load_docs(doc)
    (problem,) = caught.value.problems
    assert problem.path == "$.spec.rules[0].mode"
    assert (problem.line, problem.column) == (10, 11)  # the value, where YAML put it


def test_rulesets_without_shadow_rules_keep_their_digest() -> None:
    """`mode` is written in the canonical document only for shadow rules: a registry
    without them has the revision it had before modes existed (pods of both versions
    in a rolling upgrade agree), and `mode: active` spelled out changes nothing."""
    snapshot = load_docs(fraud_doc(), make_ruleset_doc("extra"))
    assert snapshot.revision == "5f2074f8a3f22ddd"  # computed by the sidecar before modes
    explicit = fraud_doc()
    for rule in explicit["spec"]["rules"]:
        rule["mode"] = "active"
    assert load_docs(explicit).rulesets["fraud"].digest == snapshot.rulesets["fraud"].digest
    assert load_docs(with_shadow()).rulesets["fraud"].digest != snapshot.rulesets["fraud"].digest


def test_the_database_keeps_the_mode(migrated: Database) -> None:
    """`db import` writes the mode; the source reads it back; `db export` writes it only
    for shadow rules."""
    migrated.import_docs(with_shadow())
    (stored,) = DatabaseSource(migrated.url).read()
    ruleset = load_docs(json.loads(stored.content)).rulesets["fraud"]
    modes = {rule.id: rule.mode for rule in ruleset.rules}
    assert modes["tiny-amount"] is RuleMode.SHADOW
    assert modes["large-amount"] is RuleMode.ACTIVE
    exported = dbtools.export_documents(migrated.url)
    assert exported.count("mode: shadow") == 2
    assert "mode: active" not in exported


def test_an_older_sidecar_never_counts_a_stored_shadow_rule(migrated: Database) -> None:
    """The attack: a sidecar older than schema 3 reads no `mode` and served a stored
    shadow rule as active during a rolling upgrade. A shadow rule is stored disabled for
    it (its own enabled flag in `mode`), and read back exactly: same digest as the file."""
    doc = with_shadow()
    doc["spec"]["rules"][-1]["enabled"] = False  # needs-device: a disabled shadow rule
    migrated.import_docs(doc)
    rows = dict(
        migrated.execute(
            "SELECT id, enabled FROM rule_sidecar_rules WHERE id IN (%s, %s, %s)",
            ("tiny-amount", "needs-device", "large-amount"),
        )
    )
    assert {k: bool(v) for k, v in rows.items()} == {
        "tiny-amount": False,
        "needs-device": False,
        "large-amount": True,
    }
    (stored,) = DatabaseSource(migrated.url).read()
    read_back = load_docs(json.loads(stored.content)).rulesets["fraud"]
    from_file = load_docs(doc).rulesets["fraud"]
    assert read_back.digest == from_file.digest
    enabled = {rule.id: (rule.mode.value, rule.enabled) for rule in read_back.rules}
    assert enabled["tiny-amount"] == ("shadow", True)
    assert enabled["needs-device"] == ("shadow", False)


def test_a_schema_2_database_is_upgraded(database: Database) -> None:
    """Tables of schema 2 have no rule mode nor challenger columns: reading them says to
    run `db init`, which adds them (every stored rule active, no challengers) and changes
    nothing else."""
    database.init()
    database.import_docs(fraud_doc())
    database.script(
        [
            ("ALTER TABLE rule_sidecar_rules DROP COLUMN mode", ()),
            ("ALTER TABLE rule_sidecar_rulesets DROP COLUMN challenger_of", ()),
            ("UPDATE rule_sidecar_schema SET version = 2", ()),
        ]
    )
    with pytest.raises(LoadError) as caught:
        DatabaseSource(database.url).read()
    assert "upgrade the tables with `rule-sidecar db init`" in str(caught.value)
    assert dbtools.init(database.url) == SCHEMA_VERSION == 4
    (stored,) = DatabaseSource(database.url).read()
    ruleset = load_docs(json.loads(stored.content)).rulesets["fraud"]
    assert {rule.mode for rule in ruleset.rules} == {RuleMode.ACTIVE}


async def test_the_api_reports_shadow_matches_and_counts_them_apart(
    start_sidecar: Any, tmp_path: Any
) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "fraud.yaml").write_text(dump_yaml(with_shadow()), encoding="utf-8")
    sidecar: Sidecar = await start_sidecar(rules)
    result = await sidecar.evaluate("fraud", FOREIGN_LARGE)
    assert (result["total_points"], result["decision"]) == (70, "deny")
    assert result["shadow_matched"] == ["tiny-amount"]
    assert result["errors"] == []
    rule = await sidecar.get("/api/v1/rules/tiny-amount")
    assert rule["mode"] == "shadow"
    text = await (await sidecar.client.get("/metrics")).text()
    matches = "rule_sidecar_rule_matches_total"
    shadow = {"ruleset": "fraud", "rule": "tiny-amount", "mode": "shadow"}
    assert metric_value(text, matches, shadow) == 1
    errors = {"ruleset": "fraud", "rule": "needs-device"}
    assert metric_value(text, "rule_sidecar_rule_errors_total", errors) == 1
    stats = await sidecar.get("/api/v1/rulesets/fraud/stats")
    by_id = {rule["id"]: rule for rule in stats["current"]["rules"]}
    assert (by_id["tiny-amount"]["mode"], by_id["tiny-amount"]["matches"]) == ("shadow", 1)

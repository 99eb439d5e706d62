"""Challenger rulesets: evaluated beside the ruleset they challenge, never deciding."""

from __future__ import annotations

import json
from typing import Any

import pytest
from conftest import dump_yaml, fraud_doc, load_docs, make_ruleset_doc
from db_support import Database
from server_support import Sidecar, metric_value

from sidecar.engine import evaluate, evaluate_ruleset
from sidecar.errors import LoadError, ProblemCode
from sidecar.loader import Loader
from sidecar.rulefiles import SourceFile
from sidecar.sources.database import DatabaseSource

FOREIGN_LARGE = {"amount": 5000, "country": "FR"}


def challenger(ruleset_id: str = "fraud-v2", of: object = "fraud") -> dict[str, Any]:
    """A stricter fraud ruleset: a large amount alone is a deny."""
    rules = [{"id": f"{ruleset_id}-large", "condition": "input.amount > 1000", "points": 80}]
    return make_ruleset_doc(
        ruleset_id,
        rules,
        challenger_of=of,
        decisions=[{"decision": "deny", "min_points": 70}],
        default_decision="allow",
    )


def test_the_champion_decides_and_the_challenger_is_reported() -> None:
    snapshot = load_docs(fraud_doc(), challenger())
    result = evaluate(snapshot, "fraud", {"amount": 5000, "country": "US"})
    answer = result.to_dict()
    assert (answer["total_points"], answer["decision"]) == (40, "review")
    assert answer["challenger"] == {
        "ruleset_id": "fraud-v2",
        "total_points": 80,
        "decision": "deny",
        "matched": ["fraud-v2-large"],
    }
    alone = evaluate(snapshot, "fraud-v2", {"amount": 5})  # a challenger answers for itself
    assert (alone.decision, alone.challenger) == ("allow", None)
    plain = evaluate_ruleset(snapshot.rulesets["fraud"], {"amount": 5, "country": "US"})
    assert "challenger" not in plain.to_dict()


def problems_of(*docs: dict[str, Any]) -> list[tuple[str, str, str]]:
    files = [SourceFile(f"{i}.yaml", dump_yaml(doc).encode()) for i, doc in enumerate(docs)]
    with pytest.raises(LoadError) as caught:
        Loader().load(files)
    return [
        (problem.file, problem.path, problem.message)
        for problem in caught.value.problems
        if problem.code is ProblemCode.CHECK_CHALLENGER
    ]


@pytest.mark.parametrize(
    ("docs", "file", "message"),
    [
        ((fraud_doc(), challenger(of="nope")), "1.yaml", "'nope', which is not in the registry"),
        ((fraud_doc(), challenger(of="fraud-v2")), "1.yaml", "cannot be its own challenger"),
        (
            (fraud_doc(), challenger(), challenger("fraud-v3", of="fraud-v2")),
            "2.yaml",
            "itself the challenger of 'fraud'",
        ),
        (
            (fraud_doc(), challenger(), challenger("fraud-v3")),
            "2.yaml",
            "already has a challenger, 'fraud-v2'",
        ),
    ],
    ids=["missing", "itself", "chain", "second"],
)
def test_refused_with_its_location(
    docs: tuple[dict[str, Any], ...], file: str, message: str
) -> None:
    (found,) = problems_of(*docs)
    assert found[:2] == (file, "$.spec.challenger_of")
    assert message in found[2]


def test_a_champion_in_another_file_and_a_numeric_id() -> None:
    """The champion may be declared anywhere in the registry; a number is its id."""
    numeric = make_ruleset_doc(7)
    files = [
        SourceFile("a.yaml", dump_yaml(challenger(of=7)).encode()),
        SourceFile("b.yaml", dump_yaml(numeric).encode()),
    ]
    snapshot = Loader().load(files).snapshot
    assert snapshot.challengers["7"].id == "fraud-v2"


def test_the_database_keeps_challenger_of(migrated: Database) -> None:
    migrated.import_docs(fraud_doc(), challenger())
    documents = [json.loads(f.content) for f in DatabaseSource(migrated.url).read()]
    snapshot = load_docs(*documents)
    assert snapshot.rulesets["fraud-v2"].challenger_of == "fraud"
    assert snapshot.rulesets["fraud"].challenger_of is None


async def test_the_api_reports_and_counts_disagreements(start_sidecar: Any, tmp_path: Any) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "fraud.yaml").write_text(dump_yaml(fraud_doc()), encoding="utf-8")
    (rules / "v2.yaml").write_text(dump_yaml(challenger()), encoding="utf-8")
    sidecar: Sidecar = await start_sidecar(rules)
    result = await sidecar.evaluate("fraud", {"amount": 5000, "country": "US"})
    assert (result["decision"], result["challenger"]["decision"]) == ("review", "deny")
    inputs = [FOREIGN_LARGE, {"amount": 5, "country": "US"}]  # deny/deny, allow/allow
    batch = await sidecar.post("/api/v1/rulesets/fraud/evaluate", json={"inputs": inputs})
    assert [r["challenger"]["decision"] for r in batch["results"]] == ["deny", "allow"]
    text = await (await sidecar.client.get("/metrics")).text()
    name = "rule_sidecar_challenger_disagreements_total"
    labels = {"ruleset": "fraud", "challenger": "fraud-v2", "from": "review", "to": "deny"}
    assert metric_value(text, name, labels) == 1
    assert metric_value(text, name, {**labels, "from": "deny"}) is None  # agreements: none
    # The challenger's own rules are counted on the inputs it saw beside the champion.
    matches = {"ruleset": "fraud-v2", "rule": "fraud-v2-large", "mode": "active"}
    assert metric_value(text, "rule_sidecar_rule_matches_total", matches) == 2
    stats = await sidecar.get("/api/v1/rulesets/fraud/stats")
    versus = {
        (v["decision"], v["challenger_decision"]): v["count"]
        for v in stats["current"]["challenger"]
    }
    assert versus == {("review", "deny"): 1, ("deny", "deny"): 1, ("allow", "allow"): 1}
    ruleset = await sidecar.get("/api/v1/rulesets/fraud-v2")
    assert ruleset["challenger_of"] == "fraud"

"""Explain: what every rule did on one input and which input values it read."""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import dump_yaml, fraud_doc, load_docs, make_ruleset_doc, write_rules
from server_support import command

from sidecar import conditions
from sidecar.celwire import checked_expression
from sidecar.cli import main
from sidecar.conditions import ConditionCompiler
from sidecar.engine import evaluate_ruleset
from sidecar.explain import read_paths


def paths(expression: str) -> list[str]:
    program = ConditionCompiler().compile(expression)
    return [
        ".".join(("input", *path))
        for path in read_paths(checked_expression(program.serialize()).root)
    ]


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("input.amount > 1000", ["input.amount"]),
        ("input.user.age < 18 && input.amount > 5", ["input.user.age", "input.amount"]),
        ("has(input.card) && input.card.bin == '4111'", ["input.card", "input.card.bin"]),
        ("input.amount > 1 || input.amount < 0", ["input.amount"]),  # once
        ("input.tags.exists(t, t == 'vip')", ["input.tags"]),  # not the loop variable
        ("[1, 2].exists(input, input > 1)", []),  # `input` shadowed by the macro's variable
        ("input.items[0].sku == 'x'", ["input.items"]),  # an index ends the chain
        ("size(input) > 2", []),  # the whole input: no single value
        ("true", []),
    ],
)
def test_read_paths(expression: str, expected: list[str]) -> None:
    assert paths(expression) == expected


def explained(document: Any, *docs: dict[str, Any]) -> list[dict[str, Any]]:
    snapshot = load_docs(*(docs or (fraud_doc(),)))
    ruleset = next(iter(snapshot.rulesets.values()))
    result = evaluate_ruleset(ruleset, document, explain=True).to_dict()
    rules: list[dict[str, Any]] = result["rules"]
    return rules


def test_every_rule_in_document_order_with_outcome_and_reads() -> None:
    """Priority orders evaluation, but the explanation follows the document; a disabled
    rule is listed as such; a missing field reads as null beside the error."""
    rules = explained({"amount": 2450.0})
    assert rules[0] == {
        "id": "large-amount",
        "outcome": "matched",
        "points": 40,
        "mode": "active",
        "reads": {"input.amount": 2450.0},
    }
    assert rules[1]["id"] == "foreign-country"
    assert rules[1]["outcome"] == "error"
    assert "country" in rules[1]["error"]
    assert rules[1]["reads"] == {"input.country": None}
    assert rules[2] == {"id": "never-on", "outcome": "disabled", "points": 99, "mode": "active"}


def test_not_matched_and_priority_order() -> None:
    doc = make_ruleset_doc(
        "p",
        [
            {"id": "low", "condition": "input.a == 1", "points": 1},
            {"id": "high", "condition": "input.a == 2", "points": 2, "priority": 9},
            {"id": "constant", "condition": "true", "points": 3},
        ],
    )
    rules = explained({"a": 2}, doc)
    assert [(r["id"], r["outcome"]) for r in rules] == [
        ("low", "not_matched"),
        ("high", "matched"),
        ("constant", "matched"),
    ]
    assert "reads" not in rules[2]  # reads no input


def test_without_explain_nothing_changes() -> None:
    ruleset = load_docs(fraud_doc()).rulesets["fraud"]
    plain = evaluate_ruleset(ruleset, {"amount": 2450.0, "country": "FR"}).to_dict()
    assert "rules" not in plain
    with_rules = evaluate_ruleset(ruleset, {"amount": 2450.0, "country": "FR"}, explain=True)
    assert {k: v for k, v in with_rules.to_dict().items() if k != "rules"} == plain


def test_a_chunk_without_a_combined_program_is_explained_from_each_condition() -> None:
    """Where a chunk has no combined program (cel-cpp would not frame the conditions as
    one), each condition's tree comes from compiling it alone."""
    compiler = ConditionCompiler()
    expressions = ["input.a > 0", "has(input.b.c)"]
    trees = conditions._condition_trees([conditions._Chunk(0, 2)], expressions, compiler)
    found = [[".".join(p) for p in read_paths(tree)] for tree in trees if tree is not None]
    assert found == [["a"], ["b.c"]]


# ------------------------------------------------------------------ the command


def run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    return main(list(argv), out=out), out.getvalue()


@pytest.fixture
def fraud_file(tmp_path: Path) -> Path:
    return write_rules(tmp_path, "fraud.yaml", dump_yaml(fraud_doc()))


def test_command_human(fraud_file: Path, tmp_path: Path) -> None:
    document = tmp_path / "input.json"
    document.write_text(json.dumps({"amount": 2450.0, "country": "FR"}))
    code, out = run("explain", str(fraud_file), "--ruleset", "fraud", "--input", str(document))
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "fraud: deny (70 points)"
    assert lines[1].split() == ["matched", "large-amount", "+40"]
    assert lines[2].strip() == "input.amount = 2450.0"
    assert lines[-1].split() == ["disabled", "never-on"]


def test_command_json_from_stdin(fraud_file: Path) -> None:
    """`--input -` reads standard input; the JSON form is the API's result with `rules`."""
    done = subprocess.run(
        [
            *command(),
            "explain",
            str(fraud_file),
            "--ruleset",
            "fraud",
            "--input",
            "-",
            "--format",
            "json",
        ],
        input='{"amount": 5, "country": "US"}',
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert (result["decision"], result["total_points"]) == ("allow", 0)
    assert [r["outcome"] for r in result["rules"]] == ["not_matched", "not_matched", "disabled"]
    assert result["revision"]


def test_command_failures(fraud_file: Path, tmp_path: Path) -> None:
    """Unknown ruleset: a usage error naming the ones there are; an input that is not
    JSON, or breaks the input limits, or files that do not load: 1."""
    document = tmp_path / "input.json"
    document.write_text("{}")
    code, _ = run("explain", str(fraud_file), "--ruleset", "nope", "--input", str(document))
    assert code == 2
    document.write_text("{not json")
    code, _ = run("explain", str(fraud_file), "--ruleset", "fraud", "--input", str(document))
    assert code == 1
    document.write_text(json.dumps({"a": 2**70}))
    code, _ = run("explain", str(fraud_file), "--ruleset", "fraud", "--input", str(document))
    assert code == 1
    broken = write_rules(tmp_path, "broken.yaml", "apiVersion: rule-sidecar/v1\nkind: RuleSet\n")
    document.write_text("{}")
    code, _ = run("explain", str(broken), "--ruleset", "fraud", "--input", str(document))
    assert code == 1

"""Rules that build on other rules: `rules["id"]` in conditions, real cel-cpp, real loader."""

from __future__ import annotations

import dataclasses
import itertools
import pickle
from pathlib import Path
from typing import Any

import pytest
from conftest import dump_yaml, fraud_doc, load_docs, make_ruleset_doc, rule_doc
from hypothesis import given, settings
from hypothesis import strategies as st
from server_support import eventually

from sidecar.checks import run_tests
from sidecar.conditions import ConditionCompiler, _evaluate_one
from sidecar.cost import DEFAULT_COST_LIMIT, RULESET_COST_LIMIT, estimate
from sidecar.dependencies import MAX_LAYERS
from sidecar.editing import RegistryEditor
from sidecar.engine import evaluate_ruleset
from sidecar.errors import LoadError, ProblemCode
from sidecar.loader import Loader
from sidecar.model import RuleSet
from sidecar.registry import RuleRegistry
from sidecar.rulefiles import SourceFile

VELOCITY = rule_doc("velocity-high", "input.count > 5", 20)
COMBO = rule_doc("combo", 'rules["velocity-high"] && input.amount > 100', 30, priority=5)
EITHER = rule_doc("either", "rules.combo || rules['velocity-high']", 1)


def ruleset(*rules: dict[str, Any], **spec: Any) -> RuleSet:
    return load_docs(make_ruleset_doc("fx", list(rules), **spec)).rulesets["fx"]


def outcome(result: Any) -> tuple[list[str], list[str], list[tuple[str, str]]]:
    return (
        [rule.id for rule in result.matched],
        [rule.id for rule in result.shadow_matched],
        [(error.rule_id, error.error) for error in result.errors],
    )


def problems_of(text: str) -> list[tuple[int, int, ProblemCode, str]]:
    with pytest.raises(LoadError) as caught:
        Loader().load([SourceFile("deps.yaml", text.encode())])
    return [(p.line, p.column, p.code, p.message) for p in caught.value.problems]


@pytest.mark.parametrize("order", list(itertools.permutations([VELOCITY, COMBO, EITHER])))
def test_dependencies_evaluate_whatever_the_document_order(order: tuple[dict[str, Any], ...]):
    rules = ruleset(*order)
    assert rules.plan.conditions.depth == 3
    both = evaluate_ruleset(rules, {"count": 6, "amount": 200})
    # Answers list matches by priority, then document order, as without dependencies.
    in_document = [rule["id"] for rule in order if rule["id"] != "combo"]
    assert outcome(both) == (["combo", *in_document], [], [])
    assert both.total_points == 51
    only_velocity = evaluate_ruleset(rules, {"count": 6, "amount": 50})
    assert outcome(only_velocity) == (in_document, [], [])
    neither = evaluate_ruleset(rules, {"count": 1, "amount": 500})
    assert outcome(neither) == ([], [], [])


def test_a_dependency_that_errored_makes_its_dependents_error_naming_it():
    rules = ruleset(VELOCITY, COMBO, EITHER)
    result = evaluate_ruleset(rules, {"amount": 200})  # no count: velocity-high errors
    assert outcome(result) == (
        [],
        [],
        [
            ("combo", "depends on rule 'velocity-high', which errored"),
            ("velocity-high", 'Key not found in map : "count"'),
            ("either", "depends on rule 'combo', which errored"),
        ],
    )


def test_a_dependent_errors_even_where_its_condition_would_not_have_read_the_dependency():
    # `true || rules["x"]` is true in CEL whatever x is: the rule still errors, because
    # a rule must never be taken to match (or not) on a rule that could not be evaluated.
    rules = ruleset(VELOCITY, rule_doc("lenient", 'true || rules["velocity-high"]', 1))
    result = evaluate_ruleset(rules, {})
    assert ("lenient", "depends on rule 'velocity-high', which errored") in outcome(result)[2]


def test_cel_select_syntax_and_a_comprehension_variable_named_rules():
    rules = ruleset(
        rule_doc("base", "input.n > 1"),
        rule_doc("by_select", "rules.base"),
        rule_doc("hidden", "input.xs.exists(rules, rules == 2) && rules.base"),
    )
    assert rules.plan.conditions.dependencies() == ((), ("base",), ("base",))
    assert outcome(evaluate_ruleset(rules, {"n": 2, "xs": [2]}))[0] == [
        "base",
        "by_select",
        "hidden",
    ]
    assert outcome(evaluate_ruleset(rules, {"n": 2, "xs": [3]}))[0] == ["base", "by_select"]


def test_shadow_rules_may_read_active_and_shadow_rules():
    rules = ruleset(
        VELOCITY,
        rule_doc("trial-signal", "input.amount > 100", 5, mode="shadow"),
        rule_doc(
            "trial-combo", 'rules["trial-signal"] && rules["velocity-high"]', 5, mode="shadow"
        ),
    )
    result = evaluate_ruleset(rules, {"count": 6, "amount": 200})
    assert outcome(result) == (["velocity-high"], ["trial-signal", "trial-combo"], [])
    assert result.total_points == 20


def test_explain_shows_each_rules_dependencies_and_their_outcomes():
    rules = ruleset(VELOCITY, COMBO, EITHER, rule_doc("off", "rules.combo", enabled=False))
    explained = evaluate_ruleset(rules, {"count": 6, "amount": 50}, explain=True).to_dict()
    by_id = {rule["id"]: rule for rule in explained["rules"]}
    assert "depends_on" not in by_id["velocity-high"]
    assert by_id["combo"]["depends_on"] == {"velocity-high": True}
    assert by_id["either"]["depends_on"] == {"combo": False, "velocity-high": True}
    assert by_id["off"] == {"id": "off", "outcome": "disabled", "points": 1, "mode": "active"}
    errored = evaluate_ruleset(rules, {"amount": 50}, explain=True).to_dict()["rules"]
    assert {r["id"]: r.get("depends_on") for r in errored}["combo"] == {"velocity-high": None}


def test_embedded_tests_work_with_dependencies():
    tests = [
        {
            "name": "both",
            "input": {"count": 6, "amount": 200},
            "expect": {"matched": ["combo", "velocity-high", "either"], "total_points": 51},
        },
        {
            "name": "errors propagate",
            "input": {"amount": 200},
            "expect": {"matched": [], "errors": ["velocity-high", "combo", "either"]},
        },
    ]
    rules = ruleset(VELOCITY, COMBO, EITHER, tests=tests)
    assert [case.passed for case in run_tests(rules)] == [True, True]


LOAD_ERRORS = """\
apiVersion: rule-sidecar/v1
kind: RuleSet
metadata: {id: bad}
spec:
  rules:
    - id: a
      condition: input.x > 1 && rules["b"]
      points: 1
    - id: b
      condition: rules["a"]
      points: 1
    - id: self
      condition: input.x > 1 || rules["self"]
      points: 1
    - id: unknown
      condition: rules["nope"]
      points: 1
    - id: foreign
      condition: rules["other-rule"]
      points: 1
    - id: reads-disabled
      condition: rules["disabled"]
      points: 1
    - id: disabled
      condition: "true"
      enabled: false
      points: 1
    - id: trial
      condition: "true"
      mode: shadow
      points: 1
    - id: reads-trial
      condition: rules.trial
      points: 1
    - id: disabled-reads-unknown
      condition: rules["gone"]
      enabled: false
      points: 1
---
apiVersion: rule-sidecar/v1
kind: RuleSet
metadata: {id: other}
spec:
  rules:
    - {id: other-rule, condition: "true", points: 1}
"""


def test_each_dependency_problem_is_located_at_its_reference():
    found = problems_of(LOAD_ERRORS)
    assert {code for _, _, code, _ in found} == {ProblemCode.CHECK_DEPENDENCY}
    at = {(line, column): message for line, column, _, message in found}
    assert len(at) == len(found) == 7
    assert "a cycle of dependencies, a -> b -> a" in at[(10, 18)]
    assert "a rule cannot read its own outcome" in at[(13, 33)]
    assert "ruleset 'bad' has no rule 'nope'" in at[(16, 18)]
    assert "ruleset 'bad' has no rule 'other-rule'" in at[(19, 18)]
    assert "rule 'disabled' is disabled" in at[(22, 18)]
    assert "rule 'trial' is a shadow rule" in at[(33, 18)]
    assert "ruleset 'bad' has no rule 'gone'" in at[(36, 18)]


@pytest.mark.parametrize(
    ("condition", "column", "says"),
    [
        ("rules[input.name]", 1, "rules[...] needs a constant rule id"),
        ("size(rules) > 1", 6, "`rules` is read as a whole"),
        ("'a' in rules", 8, "`rules` is read as a whole"),
        ("rules.exists(k, k == 'a')", 1, "`rules` is read as a whole"),
        ("has(rules.a)", 5, "has(rules.a) tests the map"),
        ("input.ok && rules == {}", 13, "`rules` is read as a whole"),
    ],
)
def test_a_dynamic_use_of_rules_is_refused_where_it_is(condition: str, column: int, says: str):
    doc = make_ruleset_doc("dyn", [rule_doc("a", "true"), rule_doc("b", condition)])
    [(_, _, code, message)] = problems_of(dump_yaml(doc))
    assert code is ProblemCode.CHECK_DEPENDENCY
    assert says in message
    assert "dependencies must be static" in message
    assert message.startswith(f"rule dependency refused (expression 1:{column})")


def test_root_scoped_rules_is_refused_where_it_is():
    # Each layer's outcomes are bound to `rules` by a comprehension variable of that name
    # in the ruleset's program: `.rules` would see past it.
    condition = "input.xs.exists(rules, rules == 2) && .rules.base"
    doc = make_ruleset_doc("dyn", [rule_doc("base", "true"), rule_doc("b", condition)])
    [(_, _, code, message)] = problems_of(dump_yaml(doc))
    assert code is ProblemCode.CHECK_DEPENDENCY
    assert message.startswith("rule dependency refused (expression 1:40): `.rules`")


def test_a_disabled_rule_with_a_dynamic_use_is_refused_too():
    doc = make_ruleset_doc("dyn", [rule_doc("a", "size(rules) > 0", enabled=False)])
    [(_, _, code, _)] = problems_of(dump_yaml(doc))
    assert code is ProblemCode.CHECK_DEPENDENCY


def test_a_string_that_spells_a_reference_is_not_one():
    rules = ruleset(rule_doc("a", "input.s == 'rules[\"b\"]'"))
    assert rules.plan.conditions.depth == 1


def test_a_ruleset_without_dependencies_evaluates_as_each_condition_alone():
    rules = load_docs(fraud_doc()).rulesets["fraud"]
    conditions = rules.plan.conditions
    assert conditions.depth == 1
    assert conditions.dependencies() == ((), ())
    compiler = ConditionCompiler()
    for document in ({"amount": 5000, "country": "FR"}, {"amount": 1}, {}):
        expected = [compiler.outcome(rule.condition, document) for rule in rules.plan.rules]
        assert conditions.evaluate(conditions.project(document)) == expected


def test_a_layered_set_pickles_for_the_reload_worker():
    rules = ruleset(VELOCITY, COMBO, EITHER)
    copy = pickle.loads(pickle.dumps(rules.plan.conditions))
    copy.bind(ConditionCompiler())
    for document in ({"count": 6, "amount": 200}, {"amount": 1}, {"count": 9, "amount": 1}):
        assert copy.evaluate(document) == rules.plan.conditions.evaluate(document)
    assert copy.dependencies() == rules.plan.conditions.dependencies()


def test_the_fast_path_answers_the_first_layer_and_agrees():
    rules = ruleset(VELOCITY, COMBO, EITHER)
    slow = ConditionCompiler(fast_path=False)
    rules.plan.conditions.prepare()
    reference = rules.with_rules(rules.rules, slow).plan.conditions
    for count, amount in itertools.product((1, 6, 9.5), (50, 200)):
        document = {"count": count, "amount": amount}
        assert rules.plan.conditions.evaluate(document) == reference.evaluate(document)


def chain_of(length: int) -> list[dict[str, Any]]:
    """r0 reads the input, each next rule reads the one before: `length` rules deep."""
    chain = [rule_doc("r0", "input.amount > 0")]
    chain += [rule_doc(f"r{i}", f'rules["r{i - 1}"]') for i in range(1, length)]
    return chain


def test_a_chain_as_deep_as_allowed_loads_and_evaluates():
    rules = ruleset(*reversed(chain_of(MAX_LAYERS)))
    assert rules.plan.conditions.depth == MAX_LAYERS
    assert len(evaluate_ruleset(rules, {"amount": 1}).matched) == MAX_LAYERS
    assert evaluate_ruleset(rules, {"amount": 0}).matched == ()
    errored = {error.rule_id: error.error for error in evaluate_ruleset(rules, {}).errors}
    assert len(errored) == MAX_LAYERS
    assert errored["r0"] == 'Key not found in map : "amount"'
    last = MAX_LAYERS - 1
    assert errored[f"r{last}"] == f"depends on rule 'r{last - 1}', which errored"


def test_a_chain_deeper_than_allowed_is_refused_at_the_first_rule_past_it():
    """A chain of thousands (found by an outside attack) took seconds and hundreds of MB
    the first time it ran, on the event loop: chains are bounded at load."""
    text = dump_yaml(make_ruleset_doc("fx", chain_of(MAX_LAYERS + 40)))
    problems = problems_of(text)
    assert len(problems) == 1
    line, _, code, message = problems[0]
    assert code is ProblemCode.CHECK_DEPENDENCY
    past = f'rules["r{MAX_LAYERS - 1}"]'
    assert f"{past} makes a chain of {MAX_LAYERS + 1} rules" in message
    assert past in text.splitlines()[line - 1]


@pytest.mark.parametrize("condition", ['[1].exists(rules, .rules["a"])', "[1].all(rules,.rules.a)"])
def test_root_scoped_rules_inside_a_comprehension_named_rules_is_refused(condition: str):
    """Found by an outside attack: accepted at load, it erred on every input."""
    doc = make_ruleset_doc("fx", [rule_doc("a", "true"), rule_doc("b", condition)])
    ((_, _, code, message),) = problems_of(dump_yaml(doc))
    assert code is ProblemCode.CHECK_DEPENDENCY
    assert "`.rules` (the map read past a comprehension variable" in message


def test_a_lookup_costs_little_and_layers_reading_the_input_do_not_convert_it_again():
    compiler = ConditionCompiler()
    lookups = estimate(compiler.compile('rules["a"] && rules.b').serialize(), compiler._bounds)
    assert lookups < 1_000 < DEFAULT_COST_LIMIT
    pure = ruleset(VELOCITY, rule_doc("pure", 'rules["velocity-high"]'))
    reading = ruleset(VELOCITY, rule_doc("reading", 'rules["velocity-high"] && input.a > 1'))
    alone = ruleset(VELOCITY, rule_doc("reading", "true && input.a > 1"))
    # What layering adds is a few comprehensions, not a conversion of the input (150 ms).
    layering = pure.plan.conditions.worst_cost - ruleset(VELOCITY).plan.conditions.worst_cost
    assert 0 < layering < 2_000
    assert reading.plan.conditions.worst_cost < alone.plan.conditions.worst_cost + 2_000
    chain = [rule_doc("r0", "input.a > 0")]
    chain += [rule_doc(f"r{i}", f'rules["r{i - 1}"] && input.a > {i}') for i in range(1, 4)]
    deep = load_docs(make_ruleset_doc("deep", chain)).rulesets["deep"]
    assert deep.plan.conditions.depth == 4
    assert deep.plan.conditions.worst_cost < 1e6


def test_an_edit_that_removes_a_dependency_is_refused():
    loader = Loader()
    registry = RuleRegistry()
    registry.publish(load_docs(make_ruleset_doc("fx", [VELOCITY, COMBO]), loader=loader))
    editor = RegistryEditor(registry, loader=loader)
    with pytest.raises(LoadError) as caught:
        editor.remove_rule("velocity-high")
    [problem] = caught.value.problems
    assert problem.code is ProblemCode.CHECK_DEPENDENCY
    assert problem.rule_id == "combo"
    assert "has no rule 'velocity-high'" in problem.message
    assert "velocity-high" in registry.current.rules  # still serving


@pytest.mark.slow
async def test_a_hot_reloaded_dependency_changes_what_its_dependent_sees(
    start_sidecar, tmp_path: Path
):
    directory = tmp_path / "rules"
    directory.mkdir()
    path = directory / "fx.yaml"
    path.write_text(dump_yaml(make_ruleset_doc("fx", [VELOCITY, COMBO])), encoding="utf-8")
    app = await start_sidecar(directory, monitor=True)
    before = await app.evaluate("fx", {"count": 3, "amount": 200})
    assert before["matched"] == []
    lower = rule_doc("velocity-high", "input.count > 2", 20)
    path.write_text(dump_yaml(make_ruleset_doc("fx", [lower, COMBO])), encoding="utf-8")

    async def both_match() -> bool:
        answer = await app.evaluate("fx", {"count": 3, "amount": 200})
        return [m["id"] for m in answer["matched"]] == ["combo", "velocity-high"]

    await eventually(both_match, message="the dependent sees the new outcome")


# Conditions that error on some inputs (a missing field, a type mismatch, a division by
# zero), in five layers.
ORACLE_RULES = [
    rule_doc("r0", "input.a > 3"),
    rule_doc("r1", 'has(input.s) && input.s.startsWith("x")'),
    rule_doc("r2", "input.xs.exists(x, x > 2)"),
    rule_doc("r3", 'rules["r0"] || input.b'),
    rule_doc("r4", "rules.r1 && size(input.xs) > 1"),
    rule_doc("r5", 'rules["r3"] != rules["r2"]'),
    rule_doc("r6", '!rules["r5"] && 10 / input.a > 1'),
    rule_doc("r7", 'rules["r4"] || rules["r6"] || input.a == 0'),
]
_ORACLE_INPUTS = st.fixed_dictionaries(
    {},
    optional={
        "a": st.one_of(st.integers(-3, 12), st.just("7")),
        "b": st.one_of(st.booleans(), st.just(1)),
        "s": st.sampled_from(["x1", "y", ""]),
        "xs": st.lists(st.integers(0, 5), max_size=4),
    },
)


def one_by_one(conditions: Any, document: dict[str, Any]) -> list[Any]:
    """The reference: each condition alone, in an order where what it reads comes first,
    with `rules` bound to those outcomes; a dependent of an errored rule errors."""
    compiler = ConditionCompiler()
    names = [rule.id for rule in conditions_rules(conditions)]
    reads = conditions.dependencies()
    outcomes: dict[str, Any] = {}
    while len(outcomes) < len(names):
        for name, expression, needed in zip(names, conditions.expressions, reads, strict=True):
            if name in outcomes or any(n not in outcomes for n in needed):
                continue
            failed = [n for n in needed if isinstance(outcomes[n], str)]
            if failed:
                outcomes[name] = f"depends on rule {failed[0]!r}, which errored"
                continue
            bound = {n: outcomes[n] for n in needed}
            activation = compiler.activation(document, bound if needed else None)
            outcomes[name] = _evaluate_one(compiler.compile(expression), activation)
    return [outcomes[name] for name in names]


def conditions_rules(conditions: Any) -> Any:
    return ORACLE.plan.rules if conditions is ORACLE.plan.conditions else CROSSING.plan.rules


ORACLE = ruleset(*ORACLE_RULES)


def layer_by_layer(conditions: Any) -> Any:
    """A copy of the set without its fused programs: the fallback alone."""
    copy = pickle.loads(pickle.dumps(conditions))
    copy.bind(ConditionCompiler())
    copy._programs()
    copy._layered = dataclasses.replace(copy._layered, fused=(), rest=())
    return copy


ORACLE_LAYERED = layer_by_layer(ORACLE.plan.conditions)
ORACLE_FUSED = ORACLE.with_rules(ORACLE.rules, ConditionCompiler(fast_path=False)).plan.conditions
ORACLE.plan.conditions.prepare()  # the fast path answers the first layer, fused the rest


@settings(max_examples=300, deadline=None)
@given(document=_ORACLE_INPUTS)
def test_the_fused_program_and_the_layers_answer_as_each_condition_alone(
    document: dict[str, Any],
):
    conditions = ORACLE.plan.conditions
    assert conditions.depth == 5
    assert len(ORACLE_FUSED._layered.fused) == 1  # one program for the five layers
    assert conditions._fast[0] is not None
    expected = one_by_one(conditions, document)
    assert conditions.evaluate(document) == expected
    assert ORACLE_FUSED.evaluate(document) == expected
    assert ORACLE_LAYERED.evaluate(document) == expected


# 300 conditions in the first layer: the fused programs are chunks of 128 conditions,
# and the dependents read rules of every chunk.
CROSSING = ruleset(
    *[rule_doc(f"c{i}", f"input.a > {i}") for i in range(300)],
    rule_doc("d0", 'rules["c0"] && rules["c150"] && input.a < 1000'),
    rule_doc("d1", 'rules["c299"] || rules["d0"]'),
    rule_doc("d2", '!rules["d1"] && rules["c10"] && input.b'),
)


@pytest.mark.parametrize("document", [{"a": 5, "b": True}, {"a": 200}, {"a": 400}, {}])
def test_a_dependency_across_chunks(document: dict[str, Any]):
    conditions = CROSSING.plan.conditions
    assert [unit.slot for unit in conditions._layered.fused] == [0, 0, 1]
    expected = one_by_one(conditions, document)
    assert conditions.evaluate(document) == expected
    assert layer_by_layer(conditions).evaluate(document) == expected


def test_a_50_rule_ruleset_whose_dependents_read_the_input_loads_and_evaluates():
    # Before one program for all layers, each later layer converted the input again,
    # charged 150 ms at worst: such a ruleset was refused.
    base = [
        rule_doc(f"b{i}", f'input.tags.exists(t, t.startsWith("{i}")) && input.amount > {i}')
        for i in range(40)
    ]
    combined = [rule_doc(f"d{i}", f'rules["b{i}"] && input.amount > 1000') for i in range(10)]
    rules = ruleset(*base, *combined)
    assert rules.plan.conditions.worst_cost < RULESET_COST_LIMIT
    matched = evaluate_ruleset(rules, {"tags": ["3", "7x"], "amount": 2000}).matched
    assert sorted(rule.id for rule in matched) == ["b3", "b7", "d3", "d7"]
    errored = evaluate_ruleset(rules, {"tags": ["3"]}).errors
    assert ("d3", "depends on rule 'b3', which errored") in [(e.rule_id, e.error) for e in errored]

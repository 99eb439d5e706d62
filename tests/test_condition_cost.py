"""The CEL cost limit: a condition whose worst case over bounded inputs is too costly is
refused at load, located at the call to blame; inputs are bounded in total size too.

Speed figures are not asserted here: `python -m bench.cel_cost` measures the worst
accepted conditions on their worst inputs.
"""

from __future__ import annotations

import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import dump_yaml, fraud_doc, make_ruleset_doc, write_rules
from server_support import HOT, Sidecar

from sidecar.conditions import (
    DEFAULT_INPUT_LIMITS,
    ConditionCompiler,
    ConditionError,
    ConditionSetError,
    InputLimits,
    check_input,
)
from sidecar.errors import InputError, LoadError
from sidecar.loader import Loader
from sidecar.rulefiles import SourceFile
from sidecar.sources.files import read_rule_files

# The chain from the report: 17 s and 2.1 GB for one evaluation before the limit.
REPLACE_CHAIN = "input.s" + ".replace('a', 'aaaaaaaaaa')" * 8 + ".size() > 0"


def _tree(leaf: str, count: int) -> str:
    """`count` copies of `leaf` added as a balanced tree (a chain nests too deep to
    parse past 32 terms, a tree does not)."""
    if count == 1:
        return leaf
    half = _tree(leaf, count // 2)
    return f"({half} + {half})"


def _nested(macro: str, body: str) -> str:
    """`body` inside six nested comprehensions (`map` ones are priced twice per level)."""
    for variable in "fedcba":
        body = f"[1].{macro}({variable}, {body})"
    return body


_BIG_BODY = " || ".join(f"input.x{i} == {i}" for i in range(1500))


# Every way found for one evaluation to grow or spin without a loop running away, with
# constants and with values taken from the input; beside each, a cheaper neighbour that
# stays accepted (the estimate is not a blanket refusal).
SEVEN_DEEP = (
    "[1].all(a, [1].all(b, [1].all(c, [1].all(d, [1].all(e, [1].all(f, [1].all(g, true)))))))"
)
SIX_DEEP = "[1].all(a, [1].all(b, [1].all(c, [1].all(d, [1].all(e, [1].all(f, true))))))"
COSTLY = {
    "replace chain": (REPLACE_CHAIN, "input.s.replace('a', 'aaaaaaaaaa') != ''"),
    "replace thrice": (
        "input.s" + ".replace('a', 'aaaaaaaaaa')" * 3 + " != ''",
        "input.s" + ".replace('a', 'aa')" * 3 + " != ''",
    ),
    "replace by input values": (
        "input.s.replace(input.old, input.new) != ''",
        "input.s.replace(input.old, 'x') != ''",
    ),
    "replace of constants": (
        "'ab'" + ".replace('', 'abababababababababab')" * 6 + " != ''",
        "'ab'" + ".replace('', 'abababababababababab')" * 3 + " != ''",
    ),
    "string + tree": (_tree("input.s", 256) + " != ''", _tree("input.s", 16) + " != ''"),
    "join with an input separator": ("input.l.join(input.s) != ''", "input.l.join(', ') != ''"),
    "format with an input template": (
        "('%s' + input.s).format([input.l]) != ''",
        "'%s: %d'.format([input.name, input.count]) != ''",
    ),
    "map of map": (
        "input.l.map(x, input.l.map(y, y)).size() > 0",
        "input.l.map(x, x * 2).size() > 0",
    ),
    "list + in a comprehension": (
        "input.l.map(x, input.l + input.l).size() > 0",
        "input.l.map(x, [x] + [x]).size() > 0",
    ),
    "map over a split string": (
        "input.s.split('').map(c, c).size() > 0",
        "input.s.split(',').size() > 2",
    ),
    "concatenating elements in nested loops": (
        "input.l.all(x, input.l.all(y, x + y != ''))",
        "input.l.all(x, input.l.all(y, x * y >= 0))",
    ),
    "comparing elements in nested loops": (
        "input.l.all(x, input.l.all(y, x == y || true))",
        "input.l.all(x, [1, 2].all(y, x == y || true))",
    ),
    "regex from the input": ("input.s.matches(input.pattern)", "input.s.matches('^[A-Z][a-z]+$')"),
    "regex with a large counted repetition": (
        "input.s.matches('a[ab]{999}c')",
        "input.s.matches('a[ab]{9}c')",
    ),
    "regex with a large repetition in a named group": (
        "input.s.matches('(?P<x>a[ab]{999}c)')",
        "input.s.matches('(?P<x>a[ab]{9}c)')",
    ),
    "regex with a large repetition in a group named the other way": (
        "input.s.matches('(?<x>a[ab]{999}c)')",
        "input.s.matches('(?i:a[ab]{9}c)')",
    ),
    "regex from a list of patterns": (
        "['a[ab]{999}c', 'x'].exists(p, input.s.matches(p))",
        "['^a', '^b'].exists(p, input.s.matches(p))",
    ),
    "comprehensions nested 7 deep": (SEVEN_DEEP, SIX_DEEP),
    "too large to price": (_nested("map", _BIG_BODY) + ".size() > 0", _nested("all", _BIG_BODY)),
}


@pytest.fixture(scope="module")
def compiler() -> ConditionCompiler:
    return ConditionCompiler()


class TestCostLimit:
    """Conditions whose worst case exceeds the limit are refused at compile time."""

    @pytest.mark.parametrize(("costly", "cheap"), COSTLY.values(), ids=COSTLY.keys())
    def test_costly_condition_is_refused_and_its_neighbour_accepted(self, compiler, costly, cheap):
        """Growth, regexes and loops over loops: refused as too costly, not compiled;
        the same construct one step short of it compiles."""
        with pytest.raises(ConditionError) as caught:
            compiler.compile(costly)
        assert caught.value.reason == "condition is too costly"
        compiler.compile(cheap)

    def test_message_names_the_growing_call_and_its_growth(self, compiler):
        """The reported chain: the last replace() is blamed, with the size it can build."""
        with pytest.raises(ConditionError) as caught:
            compiler.compile(REPLACE_CHAIN)
        error = caught.value
        assert "replace()" in error.message
        assert "characters" in error.message
        # The blamed call's `(` (cel-cpp places calls there, as in its own errors).
        assert REPLACE_CHAIN[error.column - 1] == "("
        assert error.line == 1

    def test_position_on_a_later_line(self, compiler):
        """In a multi-line expression the line and column are those of the blamed call."""
        expression = "input.a > 1 &&\n  input.s.matches(input.pattern)"
        with pytest.raises(ConditionError) as caught:
            compiler.compile(expression)
        assert (caught.value.line, caught.value.column) == (2, 18)
        assert "matches()" in caught.value.message

    def test_costly_condition_in_a_set_is_reported_by_index(self, compiler):
        """In a ruleset's combined program only the costly condition is reported."""
        expressions = ["input.a > 1", REPLACE_CHAIN, "input.b == 'x'"]
        with pytest.raises(ConditionSetError) as caught:
            compiler.compile_set(expressions)
        assert list(caught.value.errors) == [1]
        assert caught.value.errors[1].reason == "condition is too costly"

    def test_a_ruleset_knows_its_worst_case(self, compiler):
        """A set's worst cost is its conditions' sum, and survives pickling (the worker)."""
        cheap, costly = "input.a > 1", "input.l.map(x, x * 2).size() > 0"
        alone = [
            ConditionCompiler().compile_set([expression]).worst_cost
            for expression in (cheap, costly)
        ]
        together = compiler.compile_set([cheap, costly])
        assert together.worst_cost == pytest.approx(sum(alone), rel=1e-3)
        assert alone[1] > 1_000 * alone[0] > 0
        assert pickle.loads(pickle.dumps(together)).worst_cost == together.worst_cost

    def test_a_lower_limit_refuses_more(self):
        """The limit is the compiler's: a stricter one refuses what the default accepts."""
        expression = "input.l.map(x, x * 2).size() > 0"
        ConditionCompiler().compile(expression)
        with pytest.raises(ConditionError):
            ConditionCompiler(cost_limit=1_000_000).compile(expression)


class TestRuleFiles:
    """A costly condition in a rule file is a located problem, through the real CLI."""

    @pytest.mark.slow  # starts `rule-sidecar validate`
    def test_validate_refuses_the_reported_chain_at_its_location(self, rules_dir: Path):
        """`rule-sidecar validate` exits 1 naming file:line:col and the growing call."""
        doc = make_ruleset_doc(
            "payments",
            rules=[
                {"id": "ok", "condition": "input.amount > 100", "points": 1},
                {"id": "growing", "condition": REPLACE_CHAIN, "points": 1},
            ],
        )
        path = write_rules(rules_dir, "rules.yaml", dump_yaml(doc))
        result = subprocess.run(
            [sys.executable, "-m", "sidecar.cli", "validate", str(rules_dir)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 1, result.stdout + result.stderr
        found = re.search(
            rf"^{re.escape(str(path))}:(\d+):(\d+): condition is too costly \(expression 1:(\d+)\)",
            result.stdout,
            re.MULTILINE,
        )
        assert found, result.stdout
        line, column, in_expression = (int(group) for group in found.groups())
        prefix = "    condition: "
        assert path.read_text().splitlines()[line - 1] == prefix + REPLACE_CHAIN
        assert column == len(prefix) + in_expression
        assert REPLACE_CHAIN[: in_expression - 1].endswith(".replace")
        assert "replace()" in result.stdout


class TestServedRules:
    """Through the running app: a costly rule never goes live; the last good rules serve."""

    async def test_reload_with_the_reported_chain_keeps_the_last_good_rules(
        self, start_sidecar, plain_rules: Path
    ):
        """The reload fails naming the rule and its location; evaluation is unchanged."""
        sidecar: Sidecar = await start_sidecar(plain_rules)
        before = await sidecar.evaluate("fraud", {"amount": 5000, "country": "FR"})
        doc = fraud_doc()
        doc["spec"]["rules"][1]["condition"] = REPLACE_CHAIN.replace("input.s", "input.country")
        (plain_rules / "fraud.yaml").write_text(dump_yaml(doc), encoding="utf-8")

        body = await sidecar.post(f"{HOT}/validate")

        assert body["valid"] is False
        (error,) = body["errors"]
        assert error["rule_id"] == "foreign-country"
        assert "condition is too costly" in error["error"]
        assert "replace()" in error["error"]
        await sidecar.post(f"{HOT}/reload", json={"force": True}, status=None)
        assert sidecar.version == 1
        after = await sidecar.evaluate("fraud", {"amount": 5000, "country": "FR"})
        assert after["total_points"] == before["total_points"] == 70


class TestInputTotalSize:
    """The cost estimate assumes a bound on the whole input; evaluation enforces it."""

    def test_input_over_the_total_size_is_refused(self):
        """Strings each within the per-string limit but too many in all: refused at `$`."""
        limit = DEFAULT_INPUT_LIMITS.max_string_length
        count = DEFAULT_INPUT_LIMITS.max_total_size // limit + 1
        document = {"l": ["a" * limit] * count}
        with pytest.raises(InputError) as caught:
            check_input(document)
        assert caught.value.path == "$"
        assert "characters and items" in str(caught.value)

    def test_keys_and_items_count_too(self):
        """Object keys and list items add to the total as well as string characters."""
        limits = InputLimits(max_total_size=10)
        check_input({"ab": [1, 2, 3]}, limits)  # 1 key + 2 characters + 3 items = 6
        with pytest.raises(InputError):
            check_input({"abcd": [1, 2, 3, 4, 5, 6]}, limits)  # 1 + 4 + 6 = 11


class TestRulesetCost:
    """Conditions each within the limit can still add up: one evaluation runs them all."""

    def test_a_ruleset_whose_conditions_add_up_past_the_limit_is_refused(self):
        rules = [
            {"id": f"slow-{i}", "condition": "input.h.lastIndexOf(input.n) >= 0", "points": 1}
            for i in range(40)
        ]
        text = dump_yaml(make_ruleset_doc("slow", rules))
        with pytest.raises(LoadError) as caught:
            Loader().load([SourceFile("slow.yaml", text.encode())])
        (problem,) = caught.value.problems
        assert (problem.ruleset_id, problem.path) == ("slow", "$.spec.rules")
        assert "over the limit of 250 ms for one evaluation" in problem.message

    def test_the_bundled_examples_are_within_it(self):
        Loader().load(read_rule_files([Path(__file__).parent.parent / "examples" / "rules"]))

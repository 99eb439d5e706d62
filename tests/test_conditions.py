"""CEL condition semantics: compiling, evaluating and bounding what a condition may cost."""

from __future__ import annotations

import math
import pickle
import sys
import threading
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.conditions import (
    ConditionCompiler,
    ConditionError,
    ConditionSetError,
    InputLimits,
    check_input,
)
from sidecar.errors import InputError, RuleSidecarError, format_path
from sidecar.fastpath import exact_string


@pytest.fixture(scope="module")
def compiler() -> ConditionCompiler:
    return ConditionCompiler()


def _one(compiler: ConditionCompiler, expression: str, document: object) -> bool | str:
    """The outcome of one expression evaluated on its own (no combined program)."""
    return compiler.outcome(expression, document)


def _set(compiler: ConditionCompiler, expressions: list[str], document: object) -> list:
    return compiler.compile_set(expressions).evaluate(document)


class TestComparisons:
    """Comparisons, membership and presence tests give CEL's answers."""

    @pytest.mark.parametrize(
        ("expression", "document", "expected"),
        [
            ("input.a > 1", {"a": 2}, True),
            ("input.a > 1", {"a": 1}, False),
            ("input.a >= 1", {"a": 1}, True),
            ("input.a != 'x'", {"a": "y"}, True),
            ("input.a == 'x'", {"a": "x"}, True),
            ("input.a < input.b", {"a": 3, "b": 2}, False),
        ],
    )
    def test_int_and_string_comparisons(self, compiler, expression, document, expected):
        """Plain comparisons on ints and strings evaluate as written."""
        assert _set(compiler, [expression], document) == [expected]

    @pytest.mark.parametrize(
        ("expression", "document", "expected"),
        [
            ("input.a > 1", {"a": 1.5}, True),
            ("input.a > 1", {"a": 0.5}, False),
            ("input.a == 1", {"a": 1.0}, True),
            ("input.a < 2.5", {"a": 2}, True),
            ("input.a > input.b", {"a": 2, "b": 1.9}, True),
            ("input.a == input.b", {"a": 3, "b": 3.0}, True),
        ],
    )
    def test_int_against_double_compares_numerically(
        self, compiler, expression, document, expected
    ):
        """An int input compared with a double (and the reverse) compares by numeric value."""
        assert _set(compiler, [expression], document) == [expected]

    def test_equality_across_unrelated_types_is_false_not_an_error(self, compiler):
        """Comparing an int input with a string for equality is simply false."""
        assert _set(compiler, ["input.a == 'x'"], {"a": 1}) == [False]

    def test_mixed_int_double_literals_do_not_type_check(self, compiler):
        """Statically typed `1 == 1.0` is refused at compile time, as CEL specifies."""
        with pytest.raises(ConditionError, match="no matching overload"):
            compiler.compile("1 == 1.0")

    @pytest.mark.parametrize(
        ("expression", "document", "expected"),
        [
            ("input.a in [1, 2, 3]", {"a": 2}, True),
            ("input.a in [1, 2, 3]", {"a": 4}, False),
            ("input.a in input.l", {"a": 2.0, "l": [1, 2]}, True),
            ("'x' in input.m", {"m": {"x": 1}}, True),
            ("input.k in input.m", {"k": "z", "m": {"y": 1}}, False),
            ("'ab' in ['ab', 'cd']", {}, True),
        ],
    )
    def test_in_operator_on_lists_and_maps(self, compiler, expression, document, expected):
        """`in` tests list membership and map key presence."""
        assert _set(compiler, [expression], document) == [expected]

    @pytest.mark.parametrize(
        ("expression", "document", "expected"),
        [
            ("has(input.a)", {"a": 0}, True),
            ("has(input.a)", {}, False),
            ("has(input.m.x)", {"m": {"x": None}}, True),
            ("has(input.m.x)", {"m": {}}, False),
        ],
    )
    def test_has_tests_field_presence(self, compiler, expression, document, expected):
        """`has()` is true when the field exists, whatever its value, and false otherwise."""
        assert _set(compiler, [expression], document) == [expected]

    def test_comprehension_macros(self, compiler):
        """`exists` and `all` iterate over an input list."""
        document = {"l": [1, 5, 9]}
        expressions = ["input.l.exists(v, v > 8)", "input.l.all(v, v > 1)", "size(input.l) == 3"]
        assert _set(compiler, expressions, document) == [True, False, True]

    def test_logical_operators_absorb_errors_when_the_result_is_known(self, compiler):
        """`true || error` is true and `false && error` is false, as CEL's logic specifies."""
        expressions = ["input.missing || true", "false && input.missing"]
        assert _set(compiler, expressions, {}) == [True, False]


class TestRuntimeErrors:
    """A condition that fails on an input gives an error string for that condition only."""

    def test_missing_field_gives_error_string(self, compiler):
        """Selecting an absent field is an error outcome naming the key, not an exception."""
        outcomes = _set(compiler, ["input.missing > 1", "input.a > 0"], {"a": 1})
        assert isinstance(outcomes[0], str)
        assert "missing" in outcomes[0]
        assert outcomes[1] is True

    def test_type_error_at_runtime(self, compiler):
        """Adding an int to a string input is an error outcome; the neighbour still evaluates."""
        outcomes = _set(compiler, ["input.a + 1 > 2", "input.b == 3"], {"a": "s", "b": 3})
        assert isinstance(outcomes[0], str)
        assert "overload" in outcomes[0].lower()
        assert outcomes[1] is True

    def test_division_and_modulus_by_zero(self, compiler):
        """Division and modulus by zero are error outcomes."""
        outcomes = _set(
            compiler, ["input.a / input.b > 1", "input.a % input.b == 0", "true"], {"a": 1, "b": 0}
        )
        assert outcomes[0] == "divide by zero"
        assert outcomes[1] == "modulus by zero"
        assert outcomes[2] is True

    def test_integer_overflow(self, compiler):
        """Int64 arithmetic overflow is an error outcome, not a wrapped value."""
        outcomes = _set(compiler, ["input.a + 1 > 0"], {"a": 2**63 - 1})
        assert outcomes == ["integer overflow"]

    def test_index_out_of_range(self, compiler):
        """Indexing past the end of a list is an error outcome."""
        [outcome] = _set(compiler, ["input.l[5] == 1"], {"l": [1]})
        assert isinstance(outcome, str)
        assert "index" in outcome.lower()

    @pytest.mark.parametrize(
        ("document", "kind"),
        [({"flag": 5}, "int"), ({"flag": "yes"}, "string"), ({"flag": {"a": 1}}, "map")],
    )
    def test_non_boolean_dynamic_result(self, compiler, document, kind):
        """A dyn condition that gives a non-boolean on this input is an error naming the type."""
        outcomes = _set(compiler, ["input.flag", "true"], document)
        assert isinstance(outcomes[0], str)
        assert "not a boolean" in outcomes[0]
        assert kind in outcomes[0]
        assert outcomes[1] is True

    def test_boolean_dynamic_result_is_accepted(self, compiler):
        """A dyn condition that gives a boolean on this input is an ordinary outcome."""
        assert _set(compiler, ["input.flag"], {"flag": True}) == [True]
        assert _set(compiler, ["input.flag"], {"flag": False}) == [False]

    def test_error_outcome_is_a_string_not_an_exception(self, compiler):
        """Every outcome of an erroring set is a bool or a str; nothing is raised."""
        outcomes = _set(
            compiler,
            ["input.x > 1", "input.y / 0 == 1", "input.flag", "input.ok"],
            {"y": 1, "flag": 1, "ok": True},
        )
        assert [type(o) for o in outcomes] == [str, str, str, bool]
        assert outcomes[3] is True


class TestCompileErrors:
    """Conditions that cannot be compiled are refused with a message and a position."""

    @pytest.mark.parametrize("expression", ["1 + 1", "'text'", "[1, 2]", "input.a + 1"])
    def test_static_non_boolean_is_refused(self, compiler, expression):
        """An expression whose static type is not bool (or dyn) is a ConditionError."""
        with pytest.raises(ConditionError, match="must be a boolean expression"):
            compiler.compile(expression)

    def test_static_non_boolean_message_names_the_type(self, compiler):
        """The refusal names the type the expression gives."""
        with pytest.raises(ConditionError) as info:
            compiler.compile("1 + 1")
        assert "int" in info.value.message

    def test_syntax_error_has_line_and_column(self, compiler):
        """A syntax error is reported at the 1-based line and column where parsing failed."""
        with pytest.raises(ConditionError) as info:
            compiler.compile("input.a >")
        assert "Syntax error" in info.value.message
        assert (info.value.line, info.value.column) == (1, 10)

    def test_syntax_error_on_a_later_line(self, compiler):
        """A syntax error on the second line of a multi-line expression reports line 2."""
        with pytest.raises(ConditionError) as info:
            compiler.compile("\ninput.a >> 2")
        assert info.value.line == 2
        assert info.value.column > 1

    def test_undeclared_function(self, compiler):
        """Calling an unknown function is a compile error naming it, with its position."""
        with pytest.raises(ConditionError) as info:
            compiler.compile("input.a > 1 &&\n  bar(1)")
        assert "undeclared reference to 'bar'" in info.value.message
        assert (info.value.line, info.value.column) == (2, 6)

    def test_undeclared_variable(self, compiler):
        """Only `input` is declared: any other top-level name is a compile error."""
        with pytest.raises(ConditionError, match="undeclared reference to 'request"):
            compiler.compile("request.a > 1")

    def test_binding_error_is_translated(self, compiler):
        """A bad expression raises ConditionError, not the binding's RuntimeError."""
        with pytest.raises(ConditionError) as info:
            compiler.compile("foo(input.a)")
        assert not isinstance(info.value, RuntimeError)

    def test_compile_set_reports_every_bad_expression_by_index(self, compiler):
        """compile_set raises ConditionSetError listing each failing expression's index."""
        expressions = ["input.a > 1", "input.a >", "1 + 1", "true", "nope(1)"]
        with pytest.raises(ConditionSetError) as info:
            compiler.compile_set(expressions)
        assert sorted(info.value.errors) == [1, 2, 4]
        assert all(isinstance(e, ConditionError) for e in info.value.errors.values())

    def test_compile_set_of_nothing_evaluates_to_nothing(self, compiler):
        """An empty set compiles and gives an empty list of outcomes."""
        assert compiler.compile_set([]).evaluate({"a": 1}) == []


class TestOneConditionCannotReshapeAnother:
    """A ruleset's conditions are compiled as one program pasted together from their
    texts; a comment or unbalanced brackets in one must not change what its neighbours
    mean (the attack: two rules that do not compile alone were accepted and matched)."""

    @pytest.mark.parametrize(
        "rules",
        [
            ["input.a == 1 || //", "input.b == 2)))) ? true : false, ((input.c == 3"],
            ["input.a == 1)) ? true : false, ((input.b == 2", "input.c == 3"],
            ["input.a == 1 || //", "input.b == 2"],
        ],
        ids=["comment-and-brackets", "brackets-split-an-item", "comment-eats-the-frame"],
    )
    def test_is_refused_as_it_would_be_alone(self, compiler, rules):
        alone = set()
        for index, expression in enumerate(rules):
            try:
                compiler.compile(expression)
            except ConditionError:
                alone.add(index)
        with pytest.raises(ConditionSetError) as caught:
            compiler.compile_set(["input.x == 0", *rules, "input.y == 0"])
        assert set(caught.value.errors) == {index + 1 for index in alone}
        assert alone

    def test_a_comment_at_the_end_of_a_condition_is_only_a_comment(self, compiler):
        conditions = compiler.compile_set(["input.a == 1 // one", "input.b == 2 // two"])
        assert conditions.evaluate({"a": 1, "b": 3}) == [True, False]


class TestExtensions:
    """The strings and math extensions are available to conditions."""

    @pytest.mark.parametrize(
        ("expression", "document", "expected"),
        [
            ("input.s.lowerAscii() == 'abc'", {"s": "AbC"}, True),
            ("input.s.upperAscii() == 'ABC'", {"s": "AbC"}, True),
            ("input.s.upperAscii() == 'äB'", {"s": "äb"}, True),
            ("input.s.lowerAscii() == 'Äb'", {"s": "ÄB"}, True),
            ("input.s.startsWith('ab')", {"s": "abc"}, True),
            ("input.s.matches('^a.c$')", {"s": "abc"}, True),
        ],
    )
    def test_string_functions(self, compiler, expression, document, expected):
        """lowerAscii/upperAscii change ASCII letters only; the standard string functions work."""
        assert _set(compiler, [expression], document) == [expected]

    @pytest.mark.parametrize(
        ("expression", "document", "expected"),
        [
            ("math.greatest(input.a, input.b) == 5", {"a": 5, "b": 3}, True),
            ("math.greatest(input.l) == 7", {"l": [3, 7, 1]}, True),
            ("math.least([1, 2, 3]) == 1", {}, True),
            ("math.greatest(input.a, 2.5) == 2.5", {"a": 1}, True),
        ],
    )
    def test_math_functions(self, compiler, expression, document, expected):
        """math.greatest and math.least pick the extreme of their arguments or list."""
        assert _set(compiler, [expression], document) == [expected]

    def test_string_function_on_wrong_type_is_a_runtime_error(self, compiler):
        """lowerAscii on an int input is an error outcome, not an exception."""
        [outcome] = _set(compiler, ["input.n.lowerAscii() == 'x'"], {"n": 1})
        assert isinstance(outcome, str)
        assert "lowerAscii" in outcome


class TestIterationBudget:
    """A runaway comprehension errors for its own rule and cannot freeze the evaluation."""

    # `x * y`, not `x + y`: on list or string elements `+` copies them at every step,
    # which the cost estimate refuses at load (TestCostLimit); `*` is numbers only.
    NESTED = "input.l.all(x, input.l.all(y, x * y >= 0))"

    def test_nested_all_over_large_list_errors_only_that_rule(self, compiler):
        """The over-budget rule errors; the others in the same set still give their outcomes."""
        document = {"l": list(range(200)), "n": 2}
        started = time.perf_counter()
        outcomes = _set(compiler, ["input.n > 1", self.NESTED, "input.n < 1"], document)
        elapsed = time.perf_counter() - started
        assert outcomes[0] is True
        assert isinstance(outcomes[1], str)
        assert "budget" in outcomes[1].lower()
        assert outcomes[2] is False
        assert elapsed < 3.0

    def test_nested_all_over_small_list_is_within_budget(self, compiler):
        """The same expression over a short list evaluates normally."""
        assert _set(compiler, [self.NESTED], {"l": list(range(20))}) == [True]

    def test_budget_is_per_condition_not_per_set(self, compiler):
        """Two conditions each within budget both succeed even if together they exceed it."""
        document = {"l": list(range(90))}
        expressions = [
            "input.l.all(x, input.l.all(y, x * y >= 0))",
            "input.l.all(x, input.l.all(y, x - y <= 1000))",
        ]
        assert [_one(compiler, e, document) for e in expressions] == [True, True]
        assert _set(compiler, expressions, document) == [True, True]


_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-1000, 1000),
    st.floats(-1e3, 1e3, allow_nan=False),
    st.text(alphabet="aAbB1 ", max_size=4),
)

_INPUTS = st.fixed_dictionaries(
    {},
    optional={
        "a": _SCALARS,
        "b": _SCALARS,
        "s": _SCALARS,
        "flag": _SCALARS,
        "l": st.lists(st.integers(-50, 50), max_size=90),
        "m": st.dictionaries(st.sampled_from(["x", "y", "z"]), _SCALARS, max_size=3),
    },
)

_MIXED_CONDITIONS = [
    "input.a > 1",
    "input.a == input.b",
    "input.a < 2.5",
    "input.a in [1, 2, 3]",
    "has(input.m) && has(input.m.x)",
    "'x' in input.m",
    "input.s.lowerAscii() == 'ab'",
    "input.s.upperAscii().startsWith('A')",
    "math.greatest(input.l) > 10",
    "input.l.exists(x, x > 40)",
    "input.l.all(x, input.l.all(y, x * y > -40000))",
    "input.l.all(x, input.l.all(y, x - y < 200))",
    "input.flag",
    "10 / input.a > 1",
    "size(input.l) >= 3 || input.missing",
    "input.b + 1 > 2",
]


class TestCombinedFastPath:
    """Evaluating a ruleset's conditions together gives what evaluating each alone gives."""

    @settings(max_examples=150, deadline=None)
    @given(document=_INPUTS)
    def test_combined_equals_each_alone(self, compiler, document):
        """ConditionSet.evaluate matches per-expression evaluation on any input."""
        check_input(document)
        combined = compiler.compile_set(_MIXED_CONDITIONS).evaluate(document)
        alone = [_one(compiler, e, document) for e in _MIXED_CONDITIONS]
        assert combined == alone
        assert all(isinstance(o, bool | str) for o in combined)

    def test_combined_equals_each_alone_on_an_all_error_input(self, compiler):
        """With no fields at all, every outcome still matches the per-expression outcome."""
        combined = compiler.compile_set(_MIXED_CONDITIONS).evaluate({})
        assert combined == [_one(compiler, e, {}) for e in _MIXED_CONDITIONS]
        assert any(isinstance(o, str) for o in combined)


class TestCompileCache:
    """An expression is compiled once per compiler."""

    def test_same_expression_gives_same_program(self):
        """Compiling the same text twice returns the very same program object."""
        compiler = ConditionCompiler()
        assert compiler.compile("input.a > 1") is compiler.compile("input.a > 1")

    def test_different_expressions_give_different_programs(self):
        """Different texts are different programs."""
        compiler = ConditionCompiler()
        assert compiler.compile("input.a > 1") is not compiler.compile("input.a > 2")

    def test_forget_unused_drops_only_unkept_programs(self):
        """forget_unused recompiles dropped expressions and keeps the kept ones cached."""
        compiler = ConditionCompiler()
        kept = compiler.compile("input.a > 1")
        dropped = compiler.compile("input.a > 2")
        compiler.forget_unused({"input.a > 1"})
        assert compiler.compile("input.a > 1") is kept
        assert compiler.compile("input.a > 2") is not dropped

    def test_failed_compile_is_not_cached(self):
        """A refused expression raises again on every compile."""
        compiler = ConditionCompiler()
        for _ in range(2):
            with pytest.raises(ConditionError):
                compiler.compile("1 + 1")


def _nested(depth: int) -> object:
    value: object = 1
    for _ in range(depth):
        value = {"a": value}
    return value


Refusal = tuple[str, list[Any]]  # the message, the path's steps


def _reference_check(value: Any, depth: int, limits: InputLimits) -> tuple[int, bool] | Refusal:
    """check_input written plainly, one call per value: (size, exact) or a refusal."""
    kind = type(value)
    if kind is not dict and kind is not list:
        return _reference_scalar(value, limits)
    noun = "object has" if kind is dict else "list has"
    if depth > limits.max_depth:
        return f"nested deeper than {limits.max_depth} levels", []
    if len(value) > limits.max_items:
        unit = "keys" if kind is dict else "items"
        return f"{noun} more than {limits.max_items} {unit}", []
    size, exact = len(value), True
    for step, item in value.items() if kind is dict else enumerate(value):
        if kind is dict:
            key = _reference_scalar(step, limits) if type(step) is str else ("", [])
            if isinstance(key[0], str):
                message = "object keys must be strings" if type(step) is not str else key[0]
                return message.replace("string longer", "key longer"), []
            size, exact = size + key[0], exact and bool(key[1])
        found = _reference_check(item, depth + 1, limits)
        if isinstance(found[0], str):
            return found[0], [step, *found[1]]
        size, exact = size + found[0], exact and bool(found[1])
    return size, exact


def _reference_scalar(value: Any, limits: InputLimits) -> tuple[int, bool] | Refusal:
    kind = type(value)
    if kind is str:
        if len(value) > limits.max_string_length:
            return f"string longer than {limits.max_string_length} characters", []
        return len(value), exact_string(value)
    if kind is int and not -(2**63) <= value < 2**63:
        return "integer does not fit in 64 bits", []
    if kind is float and not math.isfinite(value):
        return "NaN and infinities are not JSON numbers", []
    if kind not in (int, float, bool) and value is not None:
        return f"{kind.__name__} is not a JSON value", []
    return 0, True


_ODD_SCALARS = st.sampled_from(
    [2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 2**64, "x\x00", "\ud800", "é", "a" * 7, b"b", (1,)]
)
_ANY_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=6), _ODD_SCALARS
)
_KEYS = st.one_of(
    st.text(max_size=3), st.integers(0, 3), st.sampled_from(["\x00", "\ud800", "a" * 7])
)


@settings(max_examples=2000, deadline=None)
@given(
    document=st.recursive(
        _ANY_SCALARS,
        lambda inner: st.one_of(
            st.lists(inner, max_size=5), st.dictionaries(_KEYS, inner, max_size=4)
        ),
        max_leaves=25,
    ),
    bounds=st.tuples(st.integers(1, 5), st.integers(0, 5), st.integers(0, 8), st.integers(0, 60)),
)
def test_check_input_equals_its_plain_reference(document: Any, bounds: tuple[int, ...]) -> None:
    """check_input is written for speed (scalars checked inline); it refuses what the plain
    reference refuses, with the same message and path, and says the same of the rest,
    down to the total size (the small limits make every bound bite)."""
    depth, items, length, total = bounds
    limits = InputLimits(
        max_depth=depth, max_items=items, max_string_length=length, max_total_size=total
    )
    found = _reference_check(document, 1, limits)
    if isinstance(found[0], str):
        with pytest.raises(InputError) as info:
            check_input(document, limits)
        assert (info.value.message, info.value.path) == (found[0], format_path(list(found[1])))
        return
    size, exact = found
    if size > limits.max_total_size:
        with pytest.raises(InputError, match="characters and items in all"):
            check_input(document, limits)
        return
    assert check_input(document, limits) is exact


class TestCheckInput:
    """check_input rejects inputs CEL cannot take or that break a limit, naming the path."""

    def test_ordinary_document_passes(self):
        """A JSON-like document within limits is accepted."""
        check_input({"a": 1, "b": [1.5, "x", None, True], "c": {"d": {"e": []}}})

    def test_deep_nesting_is_refused_with_path(self):
        """A document nested far deeper than max_depth is refused at the too-deep path."""
        with pytest.raises(InputError, match="nested deeper than 32 levels") as info:
            check_input(_nested(40))
        assert info.value.path.startswith("$.a.a.a")

    def test_moderate_nesting_passes(self):
        """A document nested well within max_depth is accepted."""
        check_input(_nested(20))

    def test_custom_depth_limit_on_lists(self):
        """Nested lists count as levels under a custom limit."""
        with pytest.raises(InputError) as info:
            check_input([[[]]], InputLimits(max_depth=2))
        assert info.value.path == "$[0][0]"

    def test_list_item_limit(self):
        """A list longer than max_items is refused at its path; one at the limit passes."""
        check_input({"l": list(range(1000))})
        with pytest.raises(InputError, match="more than 1000 items") as info:
            check_input({"x": {"l": list(range(1001))}})
        assert info.value.path == "$.x.l"

    def test_object_key_limit(self):
        """An object with more than max_items keys is refused."""
        with pytest.raises(InputError, match="more than 3 keys") as info:
            check_input({"o": {str(i): i for i in range(4)}}, InputLimits(max_items=3))
        assert info.value.path == "$.o"

    def test_string_length_limit(self):
        """A string longer than max_string_length is refused at its path."""
        check_input({"s": "x" * 65_536})
        with pytest.raises(InputError, match="longer than 65536") as info:
            check_input({"l": ["ok", "x" * 65_537]})
        assert info.value.path == "$.l[1]"

    def test_string_length_limit_applies_to_keys(self):
        """An object key longer than max_string_length is refused like a long value."""
        with pytest.raises(InputError):
            check_input({"k" * 70_000: 1})

    @pytest.mark.parametrize("value", [2**63, -(2**63) - 1, 10**30])
    def test_int64_overflow_is_refused(self, value):
        """An integer outside int64 is refused at its path."""
        with pytest.raises(InputError, match="64 bits") as info:
            check_input({"a": [1, {"b": value}]})
        assert info.value.path == "$.a[1].b"

    @pytest.mark.parametrize("value", [2**63 - 1, -(2**63)])
    def test_int64_bounds_are_accepted(self, value):
        """The int64 extremes themselves are accepted."""
        check_input({"a": value})

    def test_non_string_keys_are_refused(self):
        """An object with a non-string key is refused at the object's path."""
        with pytest.raises(InputError, match="keys must be strings") as info:
            check_input({"a": {1: 2}})
        assert info.value.path == "$.a"

    @pytest.mark.parametrize(
        ("value", "name"),
        [({1, 2}, "set"), ((1, 2), "tuple"), (b"x", "bytes"), (object(), "object")],
    )
    def test_non_json_types_are_refused(self, value, name):
        """Sets, tuples, bytes and arbitrary objects are not JSON values."""
        with pytest.raises(InputError, match=f"{name} is not a JSON value") as info:
            check_input({"a": {"b": value}})
        assert info.value.path == "$.a.b"

    def test_input_error_is_a_library_and_value_error(self):
        """InputError is both a RuleSidecarError and a ValueError, with the path in its text."""
        with pytest.raises(InputError) as info:
            check_input({"a": {1, 2}})
        assert isinstance(info.value, RuleSidecarError)
        assert isinstance(info.value, ValueError)
        assert str(info.value).startswith("$.a: ")

    def test_root_must_be_json_too(self):
        """A non-JSON root value is refused at `$`."""
        with pytest.raises(InputError) as info:
            check_input({1, 2})
        assert info.value.path == "$"


class TestLargeSetsAndTransfer:
    """Sets past cel-cpp's expression size limit are chunked; sets survive pickling."""

    def test_set_past_the_size_limit_matches_each_alone(self, compiler):
        """3,000 conditions (about 150,000 characters) compile and agree with each alone."""
        expressions = [
            f"has(input.n) && input.n % {i + 2} == 0 && 'pad-{'x' * 20}-{i}' != input.s"
            for i in range(3_000)
        ]
        assert sum(map(len, expressions)) > 100_000
        conditions = compiler.compile_set(expressions)
        document = {"n": 60, "s": "x"}
        outcomes = conditions.evaluate(document)
        assert outcomes == [compiler.outcome(e, document) for e in expressions]
        assert outcomes.count(True) == 11  # divisors of 60 from 2 to 3001

    def test_errors_inside_a_large_set_are_attributed(self, compiler):
        """In a chunked set, only the conditions that error report errors."""
        expressions = [f"input.a > {i}" for i in range(300)]
        expressions[7] = "input.missing > 1"
        expressions[250] = "input.a / 0 > 1"
        outcomes = compiler.compile_set(expressions).evaluate({"a": 100})
        errors = [i for i, o in enumerate(outcomes) if isinstance(o, str)]
        assert errors == [7, 250]
        assert outcomes[99] is True
        assert outcomes[100] is False

    def test_a_failing_chunk_compiles_no_combined_program(self, monkeypatch):
        """A request whose input makes conditions fail compiles at most one small
        program per condition, kept for the next: splitting the chunk in halves compiled
        ten times as much on the request path (259 ms for 300 failing conditions). The
        program of the conditions that did not fail is compiled in the background."""
        compiler = ConditionCompiler(fast_path=False)
        expressions = [f"input.x{i}.y > {i}" for i in range(300)]
        expressions[5] = "input.a > 1"
        rules = compiler.compile_set(expressions)
        combining = compiler._combined
        threads: list[str] = []

        def spied(*args: Any) -> Any:
            threads.append(threading.current_thread().name)
            return combining(*args)

        monkeypatch.setattr(compiler, "_combined", spied)
        for _ in range(2):
            outcomes = rules.evaluate({"a": 2})
            assert outcomes[5] is True
            assert all("x" in str(o) for i, o in enumerate(outcomes) if i != 5), outcomes[:3]
        assert set(threads) <= {"prepare"}

    def test_a_chunk_that_failed_answers_like_each_condition_alone(self):
        """Once a chunk failed, the conditions that did not fail get one program of their
        own (built in the background); inputs that fail those same conditions, others, or
        none all get what each condition alone gives."""
        compiler = ConditionCompiler(fast_path=False)
        expressions = [
            "input.a > 1",
            "input.b.c == 'x'",
            "has(input.d) && input.d > 2",
            "input.e.startsWith('p')",
            "input.a < 10",
        ]
        rules = compiler.compile_set(expressions)
        documents: list[dict[str, Any]] = [
            {"a": 2, "e": "pq"},
            {"a": 2, "e": "pq", "b": {"c": "x"}},
            {"a": 20, "b": {"c": "y"}},
            {"a": 20, "b": {"c": "y"}, "e": "zz", "d": 5},
            {"b": {"c": "x"}, "e": 1},
        ]
        first = rules.evaluate(documents[0])
        assert first == [compiler.outcome(e, documents[0]) for e in expressions]
        deadline = time.monotonic() + 10
        while rules._chunks[0].rest is None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert rules._chunks[0].rest is not None
        for document in documents * 2:
            assert rules.evaluate(document) == [compiler.outcome(e, document) for e in expressions]

    def test_long_conditions_that_did_not_fail_get_no_program_of_their_own(self):
        """Compiling them would hold the interpreter, and so the event loop, for as long
        as cel-cpp takes (a 60,000-character chunk: 280 ms): past `_REST_CHARS` the
        chunk's conditions keep being evaluated alone, with the same outcomes."""
        compiler = ConditionCompiler(fast_path=False)
        long = " || ".join(f"input.k == {k}" for k in range(300))
        expressions = ["input.x.y > 1", *[f"({long}) && input.a > {i}" for i in range(5)]]
        rules = compiler.compile_set(expressions)
        documents: list[dict[str, Any]] = [{"k": 3, "a": 2}, {"k": 9999, "a": 5}]
        for document in documents:
            assert rules.evaluate(document) == [compiler.outcome(e, document) for e in expressions]
        built = threading.Event()
        compiler.build_soon(built.set)  # the builder runs its work in order
        assert built.wait(10)
        assert rules._chunks[0].rest_asked
        assert rules._chunks[0].rest is None
        for document in documents:
            assert rules.evaluate(document) == [compiler.outcome(e, document) for e in expressions]

    def test_a_null_result_is_no_boolean_and_costs_none_nothing(self):
        """cel-expr-python 0.1.3 takes a reference from None each time it converts a
        null, and at zero Python 3.11 aborts: a condition that gives null must be
        answered without converting it (a batch of `{"vip": null}` killed the sidecar)."""
        compiler = ConditionCompiler(fast_path=False)
        rules = compiler.compile_set(["input.vip", "input.a > 1"])
        assert rules.evaluate({"vip": None, "a": 2}) == ["condition gave null, not a boolean", True]
        before = sys.getrefcount(None)
        for _ in range(5_000):
            rules.evaluate({"vip": None, "a": 2})
        assert sys.getrefcount(None) - before > -1_000

    def test_pickled_set_evaluates_the_same_after_bind(self, compiler):
        """A set compiled here, pickled and bound to another compiler gives the same outcomes."""
        expressions = [f"input.a > {i} || input.b.startsWith('{i}')" for i in range(200)]
        original = compiler.compile_set(expressions)
        copy = pickle.loads(pickle.dumps(original))
        with pytest.raises(RuntimeError, match="bind"):
            copy.evaluate({"a": 1, "b": "x"})
        copy.bind(ConditionCompiler())
        for document in ({"a": 50, "b": "7"}, {"a": -1, "b": "1x"}, {"a": 3}):
            assert copy.evaluate(document) == original.evaluate(document)

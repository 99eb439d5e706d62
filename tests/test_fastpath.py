"""The fast path (`sidecar.fastpath`) against cel-cpp: every outcome it gives must be
cel-cpp's, and it must say UNKNOWN wherever cel-cpp errors.

Deterministic in CI (derandomized, bounded examples). A long run:
    FASTPATH_EXAMPLES=3000 FASTPATH_POOL=200 .venv/bin/python -m pytest -p no:cacheprovider \
        -s tests/test_fastpath.py
(each example compares every condition of a random ruleset, alone and as one chunk, on
its own inputs, up to FASTPATH_INPUTS, and the last FASTPATH_POOL inputs of earlier
examples; the count of compared outcomes is printed with -s).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar import conditions, fastpath
from sidecar.celwire import checked_expression
from sidecar.conditions import ConditionCompiler, ConditionSet, ConditionSetError, check_input
from sidecar.errors import InputError
from sidecar.fastpath import clean_input

COMPILER = ConditionCompiler()
EXAMPLES = int(os.environ.get("FASTPATH_EXAMPLES", "300"))
INPUTS = int(os.environ.get("FASTPATH_INPUTS", "4"))
# Inputs of earlier examples each example is also compared on (long runs: many more
# outcomes per compiled ruleset).
POOL = int(os.environ.get("FASTPATH_POOL", "0"))
POOLED: list[Any] = []
COMPARED = [0, 0]  # outcomes compared, of which the fast path said (not UNKNOWN)
# Deterministic in CI: the same examples every run, none kept between runs.
FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize=True,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,
)


@pytest.fixture(scope="module", autouse=True)
def _report_count() -> Iterator[None]:
    """Printed with -s after the module: how many outcomes this run compared."""
    yield
    print(f"\nfast path: {COMPARED[0]} outcomes compared with cel-cpp, {COMPARED[1]} known")


def fast_function(expressions: list[str]) -> fastpath.FastFunction | None:
    """The fast function of one chunk of these expressions (None: not in the subset)."""
    program = COMPILER.compile_combined(expressions)
    assert program is not None
    return fastpath.build(checked_expression(program.serialize()).root.children)


def fast_outcomes(expressions: list[str], document: Any) -> list[Any] | None:
    function = fast_function(expressions)
    if function is None:
        return None
    if not fastpath.clean_input(document):
        return [fastpath.UNKNOWN] * len(expressions)
    return function(document)


def assert_agrees(expressions: list[str], documents: list[Any]) -> list[list[Any]] | None:
    """Each fast outcome equals cel-cpp's for the condition evaluated alone."""
    function = fast_function(expressions)
    if function is None:
        return None
    answers = []
    for document in documents:
        clean = fastpath.clean_input(document)
        fast = function(document) if clean else [fastpath.UNKNOWN] * len(expressions)
        for expression, outcome in zip(expressions, fast, strict=True):
            reference = COMPILER.outcome(expression, document)
            COMPARED[0] += 1
            if outcome is fastpath.UNKNOWN:
                continue
            COMPARED[1] += 1
            assert type(outcome) is bool, (expression, document, outcome)
            assert outcome == reference, (expression, document, outcome, reference)
        answers.append(fast)
    return answers


def one(expression: str, document: Any) -> Any:
    fast = assert_agrees([expression], [document])
    assert fast is not None, f"{expression} is not in the subset"
    return fast[0][0]


# ---------------------------------------------------------------- the traps, one by one

U = fastpath.UNKNOWN
TRAPS = [
    # (expression, input, what the fast path must say; cel-cpp is checked too)
    ("input.a == 1", {"a": True}, False),  # true == 1 in Python
    ("input.a == 1", {"a": 1.0}, True),  # CEL's numeric equality across types
    ("input.a < 1.5", {"a": 1}, True),
    ("input.a < 1", {"a": True}, U),  # cross-type ordering: an error in CEL
    ("input.a < 'b'", {"a": 1}, U),
    ("input.a == 'x'", {"a": 1}, False),  # cross-type equality: false
    ("input.a == 9007199254740993", {"a": 9007199254740992.0}, U),  # cel-cpp: lossy, True
    ("input.a < 9007199254740993", {"a": 9007199254740992.0}, U),
    ("input.a == input.b", {"a": 2**53 + 1, "b": float(2**53)}, U),
    ("input.a == input.b", {"a": 2**53, "b": float(2**53)}, True),
    ("input.a == 1", {"a": float(2**63)}, False),
    ("input.a < input.b", {"a": -0.0, "b": 0.0}, False),
    ("input.a <= input.b", {"a": -0.0, "b": 0}, True),
    ("input.a == null", {"a": None}, True),
    ("input.a == null", {"a": 0}, False),
    ("input.a < input.b", {"a": None, "b": None}, U),
    ("input.a && false", {}, False),  # <error> && false
    ("false && input.a", {}, False),
    ("input.a || true", {"a": "x"}, True),  # not a bool || true
    ("input.a && true", {"a": 1}, U),
    ("input.a || false", {}, U),
    ("input.a == 1", {}, U),  # missing field: an error
    ("has(input.a)", {}, False),
    ("has(input.a)", {"a": None}, True),
    ("has(input.a.b)", {}, U),
    ("has(input.a.b)", {"a": 1}, U),
    ("has(input.a.b)", {"a": {"b": 1}}, True),
    ("input.a.b == 1", {"a": None}, U),
    ("input.a.exists(x, x == 'k')", {"a": {"k": 1}}, True),  # a map iterates its keys
    ("input.a.exists(x, x > 1)", {"a": ["x", 2]}, True),
    ("input.a.exists(x, x > 1)", {"a": ["x", 1]}, U),
    ("input.a.all(x, x > 1)", {"a": [1, "x"]}, False),
    ("input.a.all(x, x > 1)", {"a": [2, "x"]}, U),
    ("input.a.exists(x, x > 1)", {"a": 5}, U),
    ("input.a.exists(x, x > 1)", {"a": []}, False),
    ("input.a < input.b", {"a": "\uffff", "b": "\U0001f600"}, True),  # code points
    ("size(input.a) == 2", {"a": "\U0001f600x"}, True),  # code points, not UTF-16
    ("input.a == 'x'", {"a": "\ud800"}, U),  # lone surrogate: cel-cpp cannot convert
    ("input.a == 1", {"a": 1, "b": "\udfff"}, U),  # ... anywhere in the input
    ("input.a == 1", {"a": 1, "b": {"\ud800": 1}}, U),
    ("input.a == 'ab'", {"a": "a\x00b"}, U),  # NUL: cel-cpp truncates
    ("input.a in input.b", {"a": "x", "b": {"x": 2}}, True),  # `in` on a map: keys
    ("input.a in input.b", {"a": 1, "b": {"1": 2}}, U),
    ("input.a in input.b", {"a": None, "b": {"1": 2}}, U),
    ("input.a in [1, 'x']", {"a": 1.0}, True),
    ("input.a in [1, 'x']", {"a": True}, False),
    ("input.a in []", {}, U),
    ("input.a in input.b", {"a": "a", "b": "abc"}, U),
    ("input.a == input.b", {"a": [1, "x"], "b": [1.0, "x"]}, True),
    ("input.a == input.b", {"a": {"x": 1}, "b": {"x": 1}}, U),  # maps: left to cel-cpp
    ("input.a == 1", {"a": 2**64}, U),  # beyond int64: cel-cpp refuses the input
    ("input.a", {"a": 1}, U),  # not a boolean
    ("!input.a", {"a": 1}, U),
    ("!input.a", {"a": False}, True),
    ("input.a.startsWith('x')", {"a": 1}, U),
    ("input.a.contains('')", {"a": "abc"}, True),
    ("input.a.endsWith('\U0001f600')", {"a": "a\U0001f600"}, True),
    ("size(input.a) == 1", {"a": {"x": 1}}, True),
    ("size(input.a) == 1", {"a": 1}, U),
    ("input.a > -5", {"a": -4.5}, True),
    # a literal's type decides which inputs skip the generic helpers: check both ways
    ("1 < input.a", {"a": 1.5}, True),  # the literal on the left
    ("input.a < 9007199254740992", {"a": 2.0**60}, False),  # an int literal within 2^53
    ("input.a == 1.5", {"a": 2**60}, U),  # a double literal meets an int beyond 2^53
    ("input.a >= 2.5", {"a": 3}, True),
    ("input.a != 'x'", {"a": 1}, True),
    ("input.a != 'x'", {"a": "x"}, False),
    ("input.a == true", {"a": 1}, False),
    ("input.a.startsWith(input.b)", {"a": "xy", "b": "x"}, True),
    ("input.a.startsWith(input.b)", {"a": "xy", "b": 1}, U),
]


@pytest.mark.parametrize(("expression", "document", "expected"), TRAPS)
def test_trap(expression: str, document: Any, expected: Any) -> None:
    assert one(expression, document) is expected


@pytest.mark.parametrize(
    "expression",
    [
        "input.a.matches('x')",
        "input.a == 1u",
        "input.a == b'x'",
        "input.a ? true : false",
        "input.a + 1 > 2",
        "[1].exists(input, input == 1)",
        "input.a.exists(x, input.b.exists(y, x == y))",
        "input.a.exists_one(x, x == 1)",
        "input.a.map(x, x).size() > 0",
        "input[0] == 1",
    ],
)
def test_outside_the_subset_is_left_to_cel(expression: str) -> None:
    assert fast_outcomes([expression], {"a": [1]}) is None


def test_sets_use_the_fast_path_only_when_on() -> None:
    expressions = ["input.a > 1", "has(input.b) && input.b", "input.c.matches('x')"]
    documents: list[Any] = [{"a": 2, "b": True, "c": "x"}, {"a": 1, "c": "y"}, {"a": "x"}]
    for fast_path in (True, False):
        compiler = ConditionCompiler(fast_path=fast_path)
        rules = compiler.compile_set(expressions)
        alone = compiler.compile_set(expressions[:2])
        rules.prepare()
        alone.prepare()
        assert bool(alone._fast) is fast_path
        for document in documents:
            reference = [compiler.outcome(e, document) for e in expressions]
            assert rules.evaluate(document) == reference
            assert alone.evaluate(document) == reference[:2]


def test_an_evaluation_never_builds_the_fast_functions(monkeypatch: pytest.MonkeyPatch) -> None:
    """Building costs about 0.2 ms a simple condition and far more for long ones (the
    attack: a first request after a load held the event loop 19 s building them): the
    first evaluation asks for a build in the compiler's thread and cel-cpp answers until
    it is done; a set never evaluated is never built (most rulesets of a large reload)."""
    builders: list[str] = []
    build = conditions._fast_functions

    def spied(chunks: Any) -> Any:
        builders.append(threading.current_thread().name)
        return build(chunks)

    monkeypatch.setattr(conditions, "_fast_functions", spied)
    compiler = ConditionCompiler()
    unused = compiler.compile_set(["input.a > 2"])
    rules = compiler.compile_set(["input.a > 1", "input.b == 'x'"])
    document = {"a": 2, "b": "y"}
    assert rules.evaluate(document) == [True, False]
    assert wait_for(lambda: rules.prepared)
    assert builders == ["prepare"]
    assert rules.evaluate(document) == [True, False]
    assert rules.evaluate({"a": 1, "b": "x"}) == [False, True]
    assert not unused.prepared
    assert builders == ["prepare"]


def test_a_set_from_the_worker_restores_its_programs_on_first_use() -> None:
    """Restoring cel-cpp programs costs about 2 ms per 100 conditions: a large reload's
    rulesets that are never evaluated never pay it."""
    import pickle

    rules = COMPILER.compile_set([f"input.a > {i}" for i in range(300)])
    copy = pickle.loads(pickle.dumps(rules))
    copy.bind(ConditionCompiler())
    assert copy._serialized
    assert pickle.loads(pickle.dumps(copy)).expressions == rules.expressions
    assert copy.evaluate({"a": 150}) == [i < 150 for i in range(300)]
    assert not copy._serialized


def wait_for(condition: Any, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def test_a_chunk_too_large_to_build_quickly_is_left_to_cel_cpp() -> None:
    """Building holds the GIL in one `compile()` call, 10-50 µs a node (the attack: 16
    long conditions took 70 ms, a thousand 8.6 s): past 1,000 nodes, no function."""
    term = "(has(input.f{0}) && input.f{0}.a.b == 'v{0}')"
    long = " || ".join(term.format(i) for i in range(20))
    assert fast_function([long]) is not None
    assert fast_function([f"{long} || input.k == {k}" for k in range(8)]) is None
    rules = COMPILER.compile_set([f"{long} || input.k == {k}" for k in range(8)])
    rules.prepare()
    assert rules.evaluate({"k": 3}) == [k == 3 for k in range(8)]


def test_user_text_stays_data() -> None:
    """Literals and field names enter the generated function as constants only, and the
    function reaches no builtins but `type` and `len` (SECURITY.md: no eval of user text)."""
    code = "__import__('os').system('exit 3') or x'); import os; ('"
    expression = f"input.a == {_string_literal(code)} || input.a.startsWith('\\n\\tdef f():')"
    assert one(expression, {"a": code}) is True
    assert one(expression, {"a": "os"}) is False
    function = fast_function([expression])
    assert function is not None
    assert function.__globals__["__builtins__"] == {"type": type, "len": len}  # type: ignore[attr-defined]


@pytest.mark.parametrize("fast_path", [True, False])
def test_an_unpickled_set_gets_the_fast_path_its_receiver_wants(fast_path: bool) -> None:
    """Pickled sets (the loader's worker) carry no functions: the receiving process builds
    them when it prepares the set, or not at all when its fast path is off."""
    import pickle

    rules = COMPILER.compile_set(["input.a > 1", "input.b == 'x'", "has(input.c)"])
    copy = pickle.loads(pickle.dumps(rules))
    assert isinstance(copy, ConditionSet)
    copy.bind(ConditionCompiler(fast_path=fast_path))
    copy.prepare()
    for document in [{"a": 2, "b": "x", "c": "x"}, {"a": 2, "c": 1}, {"a": 2, "b": "\ud800"}]:
        assert copy.evaluate(document) == rules.evaluate(document)
        assert copy.evaluate(document) == [COMPILER.outcome(e, document) for e in rules.expressions]
    assert bool(copy._fast) is fast_path


# ---------------------------------------------------------------- the differential fuzzer

FIELDS = ["a", "b", "c", "d"]
_HUGE = [2**53 - 1, 2**53, 2**53 + 1, -(2**53) - 1, 2**63 - 1, -(2**63), 2**64]
_FLOATS = [1.0, -0.0, 0.0, 0.5, 1.5, 2.0**53, 2.0**53 + 2, 1e300, -1e300, float(2**63)]
_STRINGS = ["", "a", "b", "ab", "é", "\U0001f600", "\uffff", "a\U0001f600", "A", "x\x00y", "\ud800"]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 3),
    st.sampled_from(_HUGE),
    st.sampled_from(_FLOATS),
    st.floats(allow_nan=True, allow_infinity=True, width=64),
    st.sampled_from(_STRINGS),
    st.text(max_size=4),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(FIELDS), inner, max_size=3)
    ),
    max_leaves=8,
)
documents = st.one_of(
    st.dictionaries(st.sampled_from(FIELDS), values, max_size=4),
    st.fixed_dictionaries({field: values for field in FIELDS}),  # no field missing
)


@settings(max_examples=500, deadline=None)
@given(
    document=st.one_of(
        documents,
        st.recursive(
            scalars,
            lambda inner: st.one_of(
                st.lists(inner, max_size=4),
                st.dictionaries(st.sampled_from(_STRINGS) | st.text(max_size=3), inner, max_size=3),
            ),
            max_leaves=10,
        ),
    )
)
def test_check_input_says_what_clean_input_says(document: Any) -> None:
    """An evaluation takes `check_input`'s word for whether the fast path may see the
    input (one walk instead of two): for every input it accepts, that is `clean_input`."""
    try:
        exact = check_input(document)
    except InputError:
        return
    assert exact is clean_input(document)


def _string_literal(text: str) -> str:
    escaped = "".join(c if c.isalnum() or c in " _-@." else f"\\u{ord(c):04x}" for c in text)
    return '"' + escaped + '"'


literals = st.one_of(
    st.just("null"),
    st.sampled_from(["true", "false"]),
    st.integers(-3, 3).map(str),
    st.sampled_from([str(n) for n in _HUGE[:-1]] + ["-9223372036854775808"]),
    st.sampled_from(["1.0", "-0.0", "0.5", "1.5", "9007199254740992.0", "1e300", "2u"]),
    st.sampled_from(["", "a", "b", "ab", "é", "A"]).map(_string_literal),
    st.sampled_from(['"\\U0001f600"', "b'a'"]),
)


@st.composite
def terms(draw: st.DrawFn, depth: int = 0, variables: tuple[str, ...] = ()) -> str:  # noqa: PLR0911
    """A CEL expression from the subset and just outside it."""
    field = draw(st.sampled_from(FIELDS))
    path = f"input.{field}" + draw(st.sampled_from(["", "", f".{draw(st.sampled_from(FIELDS))}"]))
    leaves = [path, draw(literals), f"has({path})"]
    if variables:
        leaves.append(variables[0])
    if depth >= 3:
        return draw(st.sampled_from(leaves))
    sub = terms(depth + 1, variables)
    kind = draw(st.integers(0, 12))
    if kind <= 2:
        return draw(st.sampled_from(leaves))
    if kind == 3:
        op = draw(st.sampled_from(["==", "!=", "<", "<=", ">", ">="]))
        return f"({draw(sub)} {op} {draw(sub)})"
    if kind == 4:
        return f"({draw(sub)} {draw(st.sampled_from(['&&', '||']))} {draw(sub)})"
    if kind == 5:
        return f"!({draw(sub)})"
    if kind == 6:
        items = draw(st.lists(st.one_of(literals, sub), max_size=3))
        return f"({draw(sub)} in [{', '.join(items)}])"
    if kind == 7:
        return f"({draw(sub)} in {path})"
    if kind == 8:
        method = draw(st.sampled_from(["startsWith", "endsWith", "contains"]))
        return f"{path}.{method}({draw(sub)})"
    if kind == 9:
        return f"size({draw(sub)})"
    if kind == 10 and not variables:
        macro = draw(st.sampled_from(["exists", "all", "exists_one"]))
        body = draw(terms(depth + 1, ("x",)))
        return f"{path}.{macro}(x, {body})"
    if kind == 11:
        return f"({draw(sub)} ? {draw(sub)} : {draw(sub)})"  # outside the subset
    return f"[{draw(sub)}, {draw(literals)}] == {draw(sub)}"


def _compilable(expressions: list[str]) -> list[str]:
    try:
        COMPILER.compile_set(expressions)
    except ConditionSetError as exc:
        return [e for i, e in enumerate(expressions) if i not in exc.errors]
    return expressions


def compare_as_rulesets(expressions: list[str], inputs: list[Any]) -> None:
    """Each compilable condition alone and all of them as one chunk, on these inputs and
    (long runs) the pooled inputs of earlier examples."""
    kept = _compilable(expressions)
    compared = inputs + POOLED[-POOL:] if POOL else inputs
    for expression in kept:
        assert_agrees([expression], compared)
    if kept:
        assert_agrees(kept, compared)
    if POOL:
        POOLED.extend(inputs)
        del POOLED[: -POOL * 4]


@pytest.mark.slow  # about 5 s: in the full suite (CI), not the quick loop
@FUZZ
@given(
    st.lists(terms(), min_size=1, max_size=8),
    st.lists(documents, min_size=min(INPUTS, 8), max_size=INPUTS),
)
def test_fast_path_equals_cel_cpp(expressions: list[str], inputs: list[dict[str, Any]]) -> None:
    compare_as_rulesets(expressions, inputs)


# Well-typed conditions over a typed input, so that most outcomes are true or false (the
# grammar above mostly meets errors): numbers at the edges of exact comparison.
_NUMBERS = st.one_of(
    st.integers(-3, 3),
    st.sampled_from([*_HUGE[:-1], 0.0, -0.0, 0.5, 1.0, 2.0**53, 2.0**53 + 2, -1.5]),
    st.floats(allow_nan=False, allow_infinity=False),
)
_TEXTS = st.one_of(
    st.sampled_from(["", "a", "ab", "b", "é", "\U0001f600", "A"]), st.text(max_size=3)
)
typed_documents = st.fixed_dictionaries(
    {},
    optional={
        "n": _NUMBERS,
        "m": _NUMBERS,
        "s": _TEXTS,
        "t": _TEXTS,
        "b": st.booleans(),
        "l": st.lists(st.one_of(_TEXTS, _NUMBERS), max_size=4),
        "o": st.fixed_dictionaries({}, optional={"n": _NUMBERS, "s": _TEXTS}),
    },
)
_NUMBER_LITERALS = st.sampled_from(
    [
        *["0", "1", "-1", "2", "0.5", "1.0", "-0.0", "9007199254740992", "9007199254740993"],
        *["9007199254740992.0", "-9223372036854775808", "9223372036854775807", "1e300"],
    ]
)
_TEXT_LITERALS = st.sampled_from(['""', '"a"', '"ab"', '"b"', '"\\u00e9"', '"\\U0001f600"', '"A"'])


@st.composite
def numbers(draw: st.DrawFn) -> str:
    return draw(
        st.one_of(
            st.sampled_from(["input.n", "input.m", "input.o.n", "size(input.s)", "size(input.l)"]),
            _NUMBER_LITERALS,
        )
    )


@st.composite
def texts(draw: st.DrawFn) -> str:
    return draw(st.one_of(st.sampled_from(["input.s", "input.t", "input.o.s"]), _TEXT_LITERALS))


@st.composite
def typed(draw: st.DrawFn, depth: int = 0) -> str:  # noqa: PLR0911
    kind = draw(st.integers(0, 9 if depth < 2 else 5))
    op = draw(st.sampled_from(["==", "!=", "<", "<=", ">", ">="]))
    if kind == 0:
        return f"{draw(numbers())} {op} {draw(numbers())}"
    if kind == 1:
        return f"{draw(texts())} {op} {draw(texts())}"
    if kind == 2:
        method = draw(st.sampled_from(["startsWith", "endsWith", "contains"]))
        return f"{draw(texts())}.{method}({draw(texts())})"
    if kind == 3:
        field = draw(st.sampled_from(["n", "s", "b", "l", "o", "o.n", "o.s"]))
        return f"has(input.{field})" if draw(st.booleans()) else "input.b"
    if kind == 4:
        items = draw(st.lists(st.one_of(_NUMBER_LITERALS, _TEXT_LITERALS), max_size=3))
        element = draw(st.one_of(numbers(), texts()))
        return f"{element} in [{', '.join(items)}]"
    if kind == 5:
        return f"{draw(st.one_of(numbers(), texts()))} in input.l"
    if kind == 6:
        joined = draw(st.sampled_from(["&&", "||"]))
        return f"({draw(typed(depth + 1))}) {joined} ({draw(typed(depth + 1))})"
    if kind == 7:
        return f"!({draw(typed(depth + 1))})"
    if kind == 8:
        macro = draw(st.sampled_from(["exists", "all"]))
        other = draw(st.one_of(numbers(), texts()))
        return f"input.l.{macro}(x, x {op} {other})"
    return f"{draw(numbers())} {op} {draw(numbers())} || {draw(texts())} {op} {draw(texts())}"


@pytest.mark.slow  # about 3 s: in the full suite (CI), not the quick loop
@FUZZ
@given(
    st.lists(typed(), min_size=1, max_size=8),
    st.lists(typed_documents, min_size=1, max_size=INPUTS),
)
def test_fast_path_equals_cel_cpp_well_typed(expressions: list[str], inputs: list[Any]) -> None:
    compare_as_rulesets(expressions, inputs)

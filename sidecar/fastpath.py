"""A pure-Python evaluator for the common subset of CEL, proven equal to cel-cpp.

Crossing into cel-cpp costs more than most conditions do: converting the input and
calling the program take most of an evaluation. Conditions made only of field reads on
`input`, `has()`, literals, comparisons, `in`, `!`, `&&`, `||`, `size()`,
`startsWith`/`endsWith`/`contains` and `exists`/`all` over a field are therefore
compiled into one Python function per chunk (the conditions cel-cpp runs as one
program), when the set is prepared (in a thread after a publish); it says each
condition's outcome, or UNKNOWN. UNKNOWN is the answer whenever cel-cpp could disagree
or error (a missing field, a type CEL would refuse, an int beyond 2^53 met by a double,
a string cel-cpp's conversion would mangle): such conditions go to cel-cpp, which alone
produces error texts. tests/test_fastpath.py compares the two on random conditions and
inputs.

The function is built from an `ast` tree made here: user text (field names, string
literals) only ever enters it as `ast.Constant` values, never as source code
(SECURITY.md forbids evaluating user content). The expression tree comes from the
checked expression cel-cpp compiled (`sidecar.celwire`), so nothing is parsed twice.
"""

from __future__ import annotations

import ast
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Final

from sidecar.celwire import Node

__all__ = ["UNKNOWN", "FastFunction", "build", "clean_input", "exact_string", "unwrap_condition"]


class _Unknown:
    """The fast path cannot say: cel-cpp decides (a singleton, compared by identity)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "UNKNOWN"


UNKNOWN: Final = _Unknown()
# A chunk's fast function: the outcomes (True, False or UNKNOWN) of its conditions.
FastFunction = Callable[[Any], list[Any]]

_EXACT: Final = 2**53  # ints up to this compare with doubles exactly in both
_INT64_MIN: Final = -(2**63)
_INT64_MAX: Final = 2**63 - 1
# Nodes of one chunk's conditions a function is built for: building costs 10-50 µs a
# node, most of it in one `compile()` call that holds the GIL (so it stalls requests
# even from another thread); a larger chunk is left to cel-cpp.
_MAX_NODES: Final = 1_000
# Items one `exists`/`all` loops over; with at most _MAX_LOOPS loops, far inside
# cel-cpp's iteration budget (10,000), which fails a whole evaluation. Longer lists go to
# cel-cpp: Python's loop is 2-4x slower there, and only cel-cpp's cost is priced at load.
_MAX_LOOP_ITEMS: Final = 100
_MAX_LOOPS: Final = 4
_ORDERED: Final = {"_<_": ast.Lt, "_<=_": ast.LtE, "_>_": ast.Gt, "_>=_": ast.GtE}
_STRING_METHODS: Final = {
    "startsWith": ("startswith", "starts_with_string"),
    "endsWith": ("endswith", "ends_with_string"),
    "contains": ("__contains__", "contains_string"),
}
_SIZE_OVERLOADS: Final = frozenset(
    {"size_string", "size_list", "size_map", "size_bytes"}
    | {"string_size", "list_size", "map_size", "bytes_size"}
)


def exact_string(text: str) -> bool:
    """cel-expr-python converts through C strings: a NUL truncates, a lone surrogate fails."""
    if "\x00" in text:
        return False
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def clean_input(value: Any) -> bool:
    """Whether cel-cpp converts the value exactly: JSON types only, ints within 64 bits,
    finite doubles, strings without NUL or lone surrogates, string keys."""
    return _clean_items((value,))


def _clean_keys(mapping: dict[Any, Any]) -> bool:
    for key in mapping:
        if type(key) is not str or ((not key.isascii() or "\x00" in key) and not exact_string(key)):
            return False
    return True


def _clean_items(items: Any) -> bool:  # noqa: PLR0911
    """`clean_input` of each item; scalars are checked inline (no call per value: this
    runs on every evaluation)."""
    for item in items:
        kind = type(item)
        if kind is str:
            if (not item.isascii() or "\x00" in item) and not exact_string(item):
                return False
        elif kind is int:
            if not _INT64_MIN <= item <= _INT64_MAX:
                return False
        elif kind is float:
            if item - item != 0.0:  # not finite
                return False
        elif kind is dict:
            if not _clean_keys(item) or not _clean_items(item.values()):
                return False
        elif kind is list:
            if not _clean_items(item):
                return False
        elif kind is not bool and item is not None:
            return False
    return True


def _equal(a: Any, b: Any) -> Any:  # noqa: PLR0911
    """CEL's heterogeneous `==`, or UNKNOWN: numbers compare by value (int with double
    only within 2^53, where cel-cpp's conversion is exact), other types only with their
    own type, lists item by item; maps are left to cel-cpp."""
    ta, tb = type(a), type(b)
    if ta is dict or tb is dict or a is UNKNOWN or b is UNKNOWN:
        return UNKNOWN
    if ta is bool or tb is bool or ta is str or tb is str or a is None or b is None:
        return ta is tb and bool(a == b)
    if ta is list or tb is list:
        if ta is not tb:
            return False
        if len(a) != len(b):
            return False
        result: Any = True
        for x, y in zip(a, b, strict=True):
            same = _equal(x, y)
            if same is UNKNOWN:
                return UNKNOWN
            result = result and same
        return result
    if ta is tb:  # int or float (finite: inputs are clean, literals checked)
        return a == b
    if (ta is int and -_EXACT <= a <= _EXACT) or (tb is int and -_EXACT <= b <= _EXACT):
        return a == b
    return UNKNOWN


def _comparable(a: Any, b: Any) -> bool:
    """Whether CEL orders a and b (and Python exactly as cel-cpp): same scalar type, or
    int with double within 2^53."""
    ta, tb = type(a), type(b)
    if ta is tb:
        return ta is int or ta is float or ta is str or ta is bool
    if ta is int and tb is float:
        return bool(-_EXACT <= a <= _EXACT)
    if ta is float and tb is int:
        return bool(-_EXACT <= b <= _EXACT)
    return False


def _contains(item: Any, container: Any) -> Any:
    """CEL's `in`: list membership by `==`, map membership of a string key."""
    kind = type(container)
    if item is UNKNOWN:
        return UNKNOWN
    if kind is dict:
        return item in container if type(item) is str else UNKNOWN
    if kind is not list:
        return UNKNOWN
    for candidate in container:
        same = _equal(item, candidate)
        if same is UNKNOWN:
            return UNKNOWN
        if same:
            return True
    return False


class _Unsupported(Exception):
    """Outside the subset: the condition is left to cel-cpp."""


# Every node is placed on line 1: compile() needs positions, nothing reads them.
_AT: Final[dict[str, Any]] = {"lineno": 1, "col_offset": 0, "end_lineno": 1, "end_col_offset": 0}


def _name(identifier: str) -> ast.Name:
    return ast.Name(identifier, ast.Load(), **_AT)


def _target(name: ast.Name) -> ast.Name:
    return ast.Name(name.id, ast.Store(), **_AT)


def _literal(value: Any) -> ast.Constant:
    return ast.Constant(value, **_AT)


def _set(target: ast.Name, value: ast.expr) -> ast.stmt:
    return ast.Assign([_target(target)], value, **_AT)


def _choose(test: ast.expr, yes: ast.expr, no: ast.expr) -> ast.expr:
    return ast.IfExp(test, yes, no, **_AT)


def _when(test: ast.expr, body: list[ast.stmt], orelse: list[ast.stmt]) -> ast.stmt:
    return ast.If(test, body or [ast.Pass(**_AT)], orelse, **_AT)


def _compare(left: ast.expr, operator: ast.cmpop, right: ast.expr) -> ast.expr:
    return ast.Compare(left, [operator], [right], **_AT)


def _is(left: ast.expr, right: ast.expr) -> ast.expr:
    return _compare(left, ast.Is(), right)


def _call(function: str, *args: ast.expr) -> ast.expr:
    return ast.Call(_name(function), list(args), [], **_AT)


def _type_is(value: ast.expr, *kinds: str) -> ast.expr:
    """`type(value) is kind` (or one of the kinds)."""
    tests = [_is(_call("type", value), _name(kind)) for kind in kinds]
    return tests[0] if len(tests) == 1 else ast.BoolOp(ast.Or(), tests, **_AT)


def _both(left: ast.expr, right: ast.expr) -> ast.expr:
    return ast.BoolOp(ast.And(), [left, right], **_AT)


_U: Final = "UNKNOWN"


class _Builder:
    """Compiles conditions into the statements of one function (locals v0, v1, ...)."""

    def __init__(self) -> None:
        self.count = 0
        self.prologue: list[ast.stmt] = []
        self.paths: dict[tuple[str, ...], ast.Name] = {}
        self.loops = 0
        # Locals that can only hold True, False or UNKNOWN: a condition ending in one
        # needs no final type check.
        self.boolish: set[str] = set()

    def fresh(self, *, boolish: bool = False) -> ast.Name:
        self.count += 1
        name = _name(f"v{self.count}")
        if boolish:
            self.boolish.add(name.id)
        return name

    def condition(self, node: Node) -> tuple[list[ast.stmt], ast.expr]:
        self.loops = 0
        body: list[ast.stmt] = []
        value = self.value(node, body, {})
        if isinstance(value, ast.Name) and value.id in self.boolish:
            return body, value
        result = self.fresh()
        body.append(_set(result, _choose(_type_is(value, "bool"), value, _name(_U))))
        return body, result

    def value(self, node: Node, out: list[ast.stmt], scope: dict[str, ast.Name]) -> ast.expr:  # noqa: PLR0911
        """The expression holding the node's value (UNKNOWN when not known), after the
        statements appended to `out` have run."""
        if node.kind == "const":
            return _constant(node)
        if node.kind == "ident":
            if node.name in scope:
                return scope[node.name]
            if node.name == "input":
                return _name("doc")
            # Any other variable, `rules` (other rules' outcomes, `sidecar.dependencies`)
            # included: the chunk gets no fast function, and cel-cpp answers it (a layered
            # set's later layers are fused programs). So the differential fuzzer, which
            # compares what this answers, has no `rules` case to cover.
            raise _Unsupported(node.name)
        if node.kind == "select":
            return self.select(node, out, scope)
        if node.kind == "list":
            return self.listing(node, out, scope)
        if node.kind == "call":
            return self.call(node, out, scope)
        if node.kind == "comprehension":
            return self.loop(node, out, scope)
        raise _Unsupported(node.kind)

    def select(self, node: Node, out: list[ast.stmt], scope: dict[str, ast.Name]) -> ast.expr:
        path = _input_path(node.children[0], scope)
        if path is not None and not node.test_only:
            # Field reads of the input are hoisted: computed once per evaluation.
            key = (*path, node.name)
            known = self.paths.get(key)
            if known is None:
                operand = self.value(node.children[0], out, scope)  # hoisted in its turn
                known = self.fresh()
                self.prologue.append(_set(known, _field(operand, node.name)))
                self.paths[key] = known
            return known
        operand_value = self.value(node.children[0], out, scope)
        result = self.fresh(boolish=node.test_only)
        if node.test_only:
            present = _compare(_literal(node.name), ast.In(), operand_value)
            value = _choose(_type_is(operand_value, "dict"), present, _name(_U))
        else:
            value = _field(operand_value, node.name)
        out.append(_set(result, value))
        return result

    def listing(self, node: Node, out: list[ast.stmt], scope: dict[str, ast.Name]) -> ast.expr:
        items = [self.value(child, out, scope) for child in node.children]
        result = self.fresh()
        out.append(_set(result, ast.List(items, ast.Load(), **_AT)))
        for item in items:
            if not isinstance(item, ast.Constant):
                out.append(_when(_is(item, _name(_U)), [_set(result, _name(_U))], []))
        return result

    def call(self, node: Node, out: list[ast.stmt], scope: dict[str, ast.Name]) -> ast.expr:
        name, args = node.name, node.children
        if name in ("_&&_", "_||_") and len(args) == 2:
            return self.logical(name == "_&&_", args, out, scope)
        values = [self.value(arg, out, scope) for arg in args]
        result = self.fresh(boolish=name != "size")
        unknown = _name(_U)
        if name == "!_" and len(values) == 1:
            negation = ast.UnaryOp(ast.Not(), values[0], **_AT)
            out.append(_set(result, _choose(_type_is(values[0], "bool"), negation, unknown)))
        elif name in ("_==_", "_!=_") and len(values) == 2:
            equal = _compare(values[0], ast.Eq(), values[1])
            out.append(_set(result, _same_kind(values, equal, _call("EQUAL", *values))))
            if name == "_!=_":
                negation = ast.UnaryOp(ast.Not(), result, **_AT)
                test = _compare(result, ast.IsNot(), unknown)
                out.append(_when(test, [_set(result, negation)], []))
        elif name in _ORDERED and len(values) == 2:
            comparison = _compare(values[0], _ORDERED[name](), values[1])
            other = _choose(_call("COMPARABLE", *values), comparison, unknown)
            out.append(_set(result, _same_kind(values, comparison, other)))
        elif name == "@in" and len(values) == 2:
            out.append(_set(result, _call("CONTAINS", *values)))
        elif name == "size" and len(values) == 1 and node.overloads <= _SIZE_OVERLOADS:
            size = _call("len", values[0])
            sized = _type_is(values[0], "str", "list", "dict")
            out.append(_set(result, _choose(sized, size, unknown)))
        elif name in _STRING_METHODS and len(values) == 2:
            method, overload = _STRING_METHODS[name]
            if node.overloads != {overload}:
                raise _Unsupported(name)
            bound = ast.Attribute(values[0], method, ast.Load(), **_AT)
            test = ast.Call(bound, [values[1]], [], **_AT)
            texts = [_type_is(value, "str") for value in values if _scalar_kind(value) != "str"]
            if texts:  # a literal argument is known to be a string
                guard = texts[0] if len(texts) == 1 else _both(*texts)
                test = _choose(guard, test, unknown)
            out.append(_set(result, test))
        else:
            raise _Unsupported(name)
        return result

    def logical(
        self,
        conjunction: bool,
        args: Sequence[Node],
        out: list[ast.stmt],
        scope: dict[str, ast.Name],
    ) -> ast.expr:
        """`&&`/`||` as CEL has them: one operand decides (false for &&, true for ||)
        whatever the other is, an error or not a boolean included."""
        decisive, neutral = _literal(not conjunction), _literal(conjunction)
        left = self.value(args[0], out, scope)
        result = self.fresh(boolish=True)
        right_code: list[ast.stmt] = []
        right = self.value(args[1], right_code, scope)
        # if left is D: R = D
        # else: <right>; R = D if right is D, N if both are N, else UNKNOWN
        both = _both(_is(left, neutral), _is(right, neutral))
        undecided = _when(both, [_set(result, neutral)], [_set(result, _name(_U))])
        decided = _when(_is(right, decisive), [_set(result, decisive)], [undecided])
        out.append(_when(_is(left, decisive), [_set(result, decisive)], [*right_code, decided]))
        return result

    def loop(self, node: Node, out: list[ast.stmt], scope: dict[str, ast.Name]) -> ast.expr:
        """`exists` and `all` over a list (items) or map (keys), nothing else."""
        quantifier = _quantifier(node)
        if quantifier is None or self.loops >= _MAX_LOOPS or scope:
            raise _Unsupported("comprehension")
        self.loops += 1
        variable, predicate, decisive = quantifier
        seq = self.value(node.children[0], out, scope)
        item = self.fresh()
        inner_code: list[ast.stmt] = []
        inner = self.value(predicate, inner_code, {**scope, variable: item})
        result = self.fresh(boolish=True)
        found, neutral = _literal(decisive), _literal(not decisive)
        # if (type(S) is list or type(S) is dict) and len(S) <= LIMIT:
        #     R = N
        #     for X in S: <predicate>; if P is D: R = D; break; if P is not N: R = UNKNOWN
        # else: R = UNKNOWN
        step = [
            *inner_code,
            _when(_is(inner, found), [_set(result, found), ast.Break(**_AT)], []),
            _when(_compare(inner, ast.IsNot(), neutral), [_set(result, _name(_U))], []),
        ]
        loop = ast.For(_target(item), seq, step, [], **_AT)
        small = _compare(_call("len", seq), ast.LtE(), _literal(_MAX_LOOP_ITEMS))
        iterable = _both(_type_is(seq, "list", "dict"), small)
        out.append(_when(iterable, [_set(result, neutral), loop], [_set(result, _name(_U))]))
        return result


def _scalar_kind(value: ast.expr) -> str | None:
    """The type name of a literal operand (a bool, int, double or string), else None."""
    if isinstance(value, ast.Constant) and type(value.value) in (bool, int, float, str):
        return type(value.value).__name__
    return None


def _same_kind(values: Sequence[ast.expr], same: ast.expr, other: ast.expr) -> ast.expr:
    """`same` when the other operand of a comparison with a literal is of a type that
    Python compares with it exactly as CEL does (most inputs), else `other`: the
    literal's own type, and also a double for an int literal within 2^53 (Python
    compares int with float exactly, and CEL does within 2^53)."""
    for value, literal in ((values[0], values[1]), (values[1], values[0])):
        kind = _scalar_kind(literal)
        if kind is None:
            continue
        number = literal.value if isinstance(literal, ast.Constant) else None
        if type(number) is int and -_EXACT <= number <= _EXACT:
            return _choose(_type_is(value, "int", "float"), same, other)
        return _choose(_type_is(value, kind), same, other)
    return other


def _constant(node: Node) -> ast.Constant:
    value = node.value
    if node.literal == "null":
        return _literal(None)
    if node.literal == "bool" and isinstance(value, bool):
        return _literal(value)
    if node.literal == "int" and type(value) is int and _INT64_MIN <= value <= _INT64_MAX:
        return _literal(value)
    if node.literal == "double" and type(value) is float and value - value == 0.0:
        return _literal(value)
    if node.literal == "string" and type(value) is str and exact_string(value):
        return _literal(value)
    raise _Unsupported(f"{node.literal} literal")


def _field(mapping: ast.expr, name: str) -> ast.expr:
    """`mapping.get(name, UNKNOWN) if type(mapping) is dict else UNKNOWN`."""
    read = ast.Call(
        ast.Attribute(mapping, "get", ast.Load(), **_AT), [_literal(name), _name(_U)], [], **_AT
    )
    return _choose(_type_is(mapping, "dict"), read, _name(_U))


def _input_path(node: Node, scope: dict[str, ast.Name]) -> tuple[str, ...] | None:
    """The field names from `input` to the node (`()` for input itself), or None."""
    if node.kind == "ident":
        return () if node.name == "input" and "input" not in scope else None
    if node.kind == "select" and not node.test_only:
        base = _input_path(node.children[0], scope)
        return None if base is None else (*base, node.name)
    return None


def _quantifier(node: Node) -> tuple[str, Node, bool] | None:  # noqa: PLR0911
    """(variable, predicate, the predicate outcome that decides) of an `exists` (True)
    or `all` (False) macro as cel-cpp expands it, or None for any other comprehension."""
    if len(node.iter_vars) != 1 or len(node.children) != 5:
        return None
    variable, accu = node.iter_vars[0], node.accu_var
    _, init, condition, step, result = node.children
    if init.kind != "const" or init.literal != "bool" or variable in ("input", accu):
        return None
    exists = init.value is False
    if result.kind != "ident" or result.name != accu:
        return None
    if condition.kind != "call" or condition.name != "@not_strictly_false":
        return None
    checked = condition.children[0] if len(condition.children) == 1 else None
    if exists:
        if checked is None or checked.kind != "call" or checked.name != "!_":
            return None
        checked = checked.children[0] if len(checked.children) == 1 else None
    if checked is None or checked.kind != "ident" or checked.name != accu:
        return None
    expected = "_||_" if exists else "_&&_"
    if step.kind != "call" or step.name != expected or len(step.children) != 2:
        return None
    first, predicate = step.children
    if first.kind != "ident" or first.name != accu or _mentions(predicate, accu):
        return None
    return variable, predicate, exists


def _mentions(node: Node, name: str) -> bool:
    if node.kind == "ident" and node.name == name:
        return True
    return any(_mentions(child, name) for child in node.children)


def unwrap_condition(item: Node) -> Node | None:
    """The user's condition inside `((c)) ? true : false`, as `compile_combined` wraps it."""
    if item.kind != "call" or item.name != "_?_:_" or len(item.children) != 3:
        return None
    condition, yes, no = item.children
    if (yes.literal, yes.value, no.literal, no.value) != ("bool", True, "bool", False):
        return None
    return condition


def _count(nodes: Sequence[Node], limit: int) -> int:
    """How many nodes these trees hold, counted up to just past `limit`."""
    count, stack = 0, list(nodes)
    while stack and count <= limit:
        node = stack.pop()
        count += 1
        stack.extend(node.children)
    return count


def build(items: Sequence[Node]) -> FastFunction | None:
    """One function giving the outcomes of the wrapped conditions (the items of a
    chunk's list expression), or None unless every one of them is in the subset. The
    input must be `clean_input`."""
    if _count(items, _MAX_NODES) > _MAX_NODES:
        return None
    builder = _Builder()
    bodies: list[ast.stmt] = []
    results: list[ast.expr] = []
    for item in items:
        condition = unwrap_condition(item)
        if condition is None:
            return None
        try:
            body, result = builder.condition(condition)
        except (_Unsupported, RecursionError):
            return None
        bodies += body
        results.append(result)
    if not results:
        return None
    answer = ast.Return(ast.List(results, ast.Load(), **_AT), **_AT)
    function = ast.FunctionDef(
        name="fast",
        args=ast.arguments([], [ast.arg("doc", **_AT)], None, [], [], None, []),
        body=[*builder.prologue, *bodies, answer],
        decorator_list=[],
        returns=None,
        lineno=1,
        col_offset=0,
    )
    module = ast.Module([function], [])
    namespace = _namespace()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # `is` with a literal: harmless, and checked
            code = compile(module, "<sidecar.fastpath>", "exec")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None  # too deep for Python's compiler: cel-cpp alone, as before
    # The tree is built here from fixed templates and Constant values (module doc).
    exec(code, namespace)
    fast: FastFunction = namespace["fast"]
    return fast


def _namespace() -> dict[str, Any]:
    """All a fast function can reach: no builtins but `type` and `len`."""
    return {
        "__builtins__": {"type": type, "len": len},
        "UNKNOWN": UNKNOWN,
        "EQUAL": _equal,
        "COMPARABLE": _comparable,
        "CONTAINS": _contains,
        "bool": bool,
        "int": int,
        "float": float,
        "str": str,
        "list": list,
        "dict": dict,
    }

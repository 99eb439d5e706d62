"""Worst-case cost of a compiled CEL condition, estimated before it is ever evaluated.

cel-cpp stops runaway comprehensions with an iteration budget, but nothing else: one
`replace` chain can build gigabytes in a single call. The binding offers no cost limit
and no interrupt, so a condition is priced at load instead, the way cel-go's checker
does (checker/cost.go): every call gets a worst-case cost from the worst-case sizes of
its arguments, and a condition whose total exceeds the limit is refused.

The estimate reads the checked expression cel-cpp itself produced (`serialize()` gives a
`cel.expr.CheckedExpr`), so it prices exactly what will run, macros already expanded:
no second parser that could read an expression differently. The wire format is decoded
here (see `checked_expression`) because no package ships the `cel.expr` messages for
Python.

Sizes of input values come from `SizeBounds` (the input limits): a value has at most
`max_string_length` characters or `max_items` items, and all values of one input
together at most `max_total` characters and items. A size is a linear form in the sizes
of the comprehension variables in scope, so a loop over an input list is charged for the
total of its elements, not for their number times the largest one. Costs are in units of
about a nanosecond of cel-cpp (`python -m bench.cel_cost` measures the worst accepted
conditions), so a limit reads as time.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final

from sidecar.celwire import CheckedExpression, Node, checked_expression
from sidecar.dependencies import RULES

__all__ = [
    "DEFAULT_COST_LIMIT",
    "ITERATION_BUDGET",
    "MAX_VALUE_SIZE",
    "RULESET_COST_LIMIT",
    "CostError",
    "SizeBounds",
    "conversion_cost",
    "estimate",
    "estimate_items",
    "layering_cost",
]

# cel-cpp's default `comprehension_max_iterations`: loop steps per evaluation, all loops
# together (tests/test_conditions.py::TestIterationBudget relies on it too).
ITERATION_BUDGET: Final = 10_000
# The largest worst-case cost accepted: about 100 ms of cel-cpp on the worst input.
DEFAULT_COST_LIMIT: Final = 100_000_000
# ... and for all the conditions of one ruleset together, which one evaluation runs on
# the event loop in one go (the bundled examples' costliest: about 112 ms).
RULESET_COST_LIMIT: Final = 250_000_000

# The largest string (characters) or list (items) one call may build: memory, not time.
MAX_VALUE_SIZE: Final = 16 * 1024 * 1024

# Unit costs in nanoseconds of cel-cpp, rounded up from measurements on a 2-core VM
# (the input's conversion into CEL values is not counted: it is paid once per input).
_NODE: Final = 40.0  # any call, field selection or literal element
_STEP: Final = 150.0  # one comprehension step, besides its body
_SCAN: Final = 0.5  # one byte compared or searched (memcmp-like)
_CODEPOINT: Final = 3.0  # one character walked by size(), indexOf(), charAt(), substring()
_COPY: Final = 1.0  # one character of a new string
_PAIR: Final = 0.02  # one character pair compared by a naive substring search
_ITEM: Final = 45.0  # one list item copied, compared or hashed
_PART: Final = 60.0  # one string made by split()
_HIT: Final = 40.0  # one replacement made by replace()
_REPLACED: Final = 5.0  # one character written by replace()
_DFA: Final = 5.0  # one character through RE2's DFA
_NFA_CHAR: Final = 700.0  # one character through RE2's NFA (its fallback) ...
_NFA_INSTRUCTION: Final = 8.0  # ... plus this per program instruction
# RE2's DFA caches about 2,500 states in its default 8 MiB before falling back to its
# NFA; a program of at most 11 instructions has at most 2**11 states, so never does.
_DFA_SAFE_PROGRAM: Final = 11
# cel-cpp formats a number with at most 1000 digits of precision (plus up to 309
# before the point); a text printed by %s or quote() takes at most 6 characters per
# character (escapes such as \u0000).
_FORMAT_MAX_NUMBER: Final = 1400.0
_ESCAPED: Final = 6.0
_MAX_NESTING: Final = 6
_MAX_VISITS: Final = 50_000  # about 0.3 s of pricing
_DEEP: Final = 30.0  # one nested item (or character) compared, hashed or printed
_CONVERT: Final = 150.0  # one item or character of an input converted into CEL values


@dataclass(frozen=True, slots=True, kw_only=True)
class SizeBounds:
    """The largest input values an estimate assumes (see `InputLimits`)."""

    max_items: int
    max_string_length: int
    max_total: int


class CostError(Exception):
    """A condition whose worst-case cost exceeds the limit, or cannot be bounded.

    `offset` is the code-point offset, inside the expression, of the part to blame.
    """

    def __init__(self, message: str, *, offset: int) -> None:
        super().__init__(message)
        self.message = message
        self.offset = offset


@dataclass(frozen=True, slots=True)
class Form:
    """A size or a cost: `const` plus, per comprehension variable, a factor times its
    size. Sizes are never negative, which makes coefficient-wise max an upper bound."""

    const: float
    terms: tuple[tuple[str, float], ...] = ()

    def __add__(self, other: Form) -> Form:
        if not other.terms:  # the common case, kept cheap: rules are priced at every load
            return Form(self.const + other.const, self.terms)
        if not self.terms:
            return Form(self.const + other.const, other.terms)
        terms = dict(self.terms)
        for name, k in other.terms:
            terms[name] = terms.get(name, 0.0) + k
        return Form(self.const + other.const, tuple(sorted(terms.items())))

    def scale(self, k: float) -> Form:
        if not self.terms:
            return Form(self.const * k)
        return Form(self.const * k, tuple((name, c * k) for name, c in self.terms))

    def join(self, other: Form) -> Form:
        terms = dict(self.terms)
        for name, k in other.terms:
            terms[name] = max(terms.get(name, 0.0), k)
        return Form(max(self.const, other.const), tuple(sorted(terms.items())))

    def coefficient(self, name: str) -> float:
        return dict(self.terms).get(name, 0.0)

    def without(self, name: str) -> Form:
        return Form(self.const, tuple(t for t in self.terms if t[0] != name))

    def substitute(self, name: str, value: Form) -> Form:
        k = self.coefficient(name)
        return self.without(name) + value.scale(k) if k else self


ZERO: Final = Form(0.0)


def _const(value: float) -> Form:
    return Form(float(value))


def _symbol(name: str) -> Form:
    return Form(0.0, ((name, 1.0),))


@dataclass(frozen=True, slots=True)
class Shape:
    """What is known of a value, as upper bounds: the items it holds if it is a list or
    map, the characters if it is a string or bytes, and `content`: every character
    and item inside, nested ones included (at least 1). `element` is the shape of the
    items (of keys and values for a map), None when it is "like an input value within
    `content`". `texts` are the constant strings it can be (empty: not known), so a
    loop over a list of patterns is priced by its costliest one."""

    items: Form
    chars: Form
    content: Form
    element: Shape | None = None
    texts: frozenset[str] = frozenset()
    raw: bool = False  # a part of the input as it is: all of them share `max_total`


_SCALAR: Final = Shape(ZERO, ZERO, _const(1))


def _string(chars: Form) -> Shape:
    return Shape(ZERO, chars, chars)


def _join(a: Shape, b: Shape) -> Shape:
    element = a.element or b.element
    if a.element is not None and b.element is not None:
        element = _join(a.element, b.element)
    texts = a.texts | b.texts if a.texts and b.texts else frozenset()
    return Shape(
        a.items.join(b.items), a.chars.join(b.chars), a.content.join(b.content), element, texts
    )


@dataclass(frozen=True, slots=True)
class _Cost:
    """`full`: all the work of one evaluation; `flat`: the part outside any
    comprehension step (bounded by the iteration budget as a second opinion)."""

    full: Form
    flat: Form

    def __add__(self, other: _Cost) -> _Cost:
        return _Cost(self.full + other.full, self.flat + other.flat)


def _fixed(units: float) -> _Cost:
    return _Cost(_const(units), _const(units))


# The outcomes of the rules a condition depends on (`sidecar.dependencies`): a map of
# booleans read by constant keys only, so a lookup is a hash of its key and the value a
# scalar.
_RULES_MAP: Final = Shape(ZERO, ZERO, _const(1), _SCALAR)
_ROOT_SCOPE: Final = {RULES: _RULES_MAP}

_FREE: Final = _fixed(0.0)
_NODE_COST: Final = _fixed(_NODE)


class _Refused(Exception):
    def __init__(self, message: str, node: Node) -> None:
        super().__init__(message)
        self.message = message
        self.node = node


@dataclass(frozen=True, slots=True)
class _Blame:
    cost: float
    node: Node
    what: str


Price = Callable[["_Estimator", Node, list[Shape]], tuple[Shape, Form]]


@dataclass(slots=True)
class _Estimator:
    bounds: SizeBounds
    maxima: dict[str, float] = field(default_factory=dict)  # largest value of each symbol
    worst_step: float = 0.0  # largest flat cost of one comprehension step
    blame: _Blame | None = None  # the single costliest part seen
    depth: int = 0  # comprehensions being visited
    visits: int = 0  # nodes visited so far

    def bound(self, form: Form) -> float:
        return form.const + sum(k * self.maxima.get(name, 0.0) for name, k in form.terms)

    def mul(self, a: Form, b: Form) -> Form:
        """An upper bound of a*b that stays linear: when both vary, the side with the
        smaller bound is taken at its bound."""
        if not a.terms:
            return b.scale(a.const)
        if not b.terms:
            return a.scale(b.const)
        if self.bound(a) <= self.bound(b):
            return b.scale(self.bound(a))
        return a.scale(self.bound(b))

    def accuse(self, cost: Form, node: Node, what: str) -> None:
        units = self.bound(cost)
        if self.blame is None or units > self.blame.cost:
            self.blame = _Blame(units, node, what)

    def from_input(self, content: Form) -> Shape:
        """A value taken from the input whose content is at most `content`."""
        if content.terms:
            return Shape(content, content, content, raw=True)
        return _input_value(self.bounds, min(content.const, self.bounds.max_total))

    def element(self, shape: Shape) -> Shape:
        return shape.element if shape.element is not None else self.from_input(shape.content)

    def symbolic(self, name: str, like: Shape) -> Shape:
        """A shape whose three sizes are symbols bounded by those of `like`."""
        sizes = {}
        for measure, form in zip(_MEASURES, _sizes(like), strict=True):
            symbol = f"{name}.{measure}"
            self.maxima[symbol] = self.bound(form)
            sizes[measure] = _symbol(symbol)
        return Shape(sizes["items"], sizes["chars"], sizes["content"], like.element, like.texts)

    # -- nodes ------------------------------------------------------------------------

    def visit(self, node: Node, scope: Mapping[str, Shape]) -> tuple[Shape, _Cost]:
        self.visits += 1
        if self.visits > _MAX_VISITS:
            # Growing comprehensions are visited twice per level: bound the pricing too.
            raise _Refused(
                f"too large to price: over {_MAX_VISITS:,} parts visited (split the condition,"
                " or nest fewer map() and filter())",
                node,
            )
        if node.kind in ("const", "ident"):
            return self.leaf(node, scope), _FREE
        if node.kind == "select":
            shape, cost = self.visit(node.children[0], scope)
            selected = _SCALAR if node.test_only else self.element(shape)
            return selected, cost + _NODE_COST
        if node.kind in ("list", "map"):
            return self.literal(node, scope)
        if node.kind == "comprehension":
            return self.comprehension(node, scope)
        return self.call(node, scope)

    def leaf(self, node: Node, scope: Mapping[str, Shape]) -> Shape:
        if node.kind == "ident":
            # `input`, or a type name such as `int`: taken as the whole input at worst.
            return scope.get(node.name) or self.from_input(_const(self.bounds.max_total))
        if node.text is None:
            return _SCALAR
        size = _const(len(node.text))
        return Shape(ZERO, size, size, texts=frozenset((node.text,)))

    def literal(self, node: Node, scope: Mapping[str, Shape]) -> tuple[Shape, _Cost]:
        count = len(node.children) if node.kind == "list" else len(node.children) // 2
        cost = _fixed(_NODE * (1 + len(node.children)))
        content = _const(1 + count)
        from_input = 0.0  # parts of the input, together at most all of it
        element: Shape | None = None
        for child in node.children:
            shape, child_cost = self.visit(child, scope)
            cost = cost + child_cost
            if shape.raw and not shape.content.terms:
                from_input += shape.content.const
            else:
                content = content + shape.content
            element = shape if element is None else _join(element, shape)
        content = content + _const(min(from_input, self.bounds.max_total))
        return Shape(_const(count), ZERO, content, element or _SCALAR), cost

    def comprehension(self, node: Node, scope: Mapping[str, Shape]) -> tuple[Shape, _Cost]:
        if self.depth >= _MAX_NESTING:
            # Each level visits its step twice: keep the estimate itself cheap.
            raise _Refused(f"comprehensions nested more than {_MAX_NESTING} deep", node)
        self.depth += 1
        try:
            return self.loop(node, scope)
        finally:
            self.depth -= 1

    def loop(self, node: Node, scope: Mapping[str, Shape]) -> tuple[Shape, _Cost]:
        iter_range, accu_init, condition, step, result = node.children
        range_shape, range_cost = self.visit(iter_range, scope)
        init_shape, init_cost = self.visit(accu_init, scope)
        loop = _Loop(f"v{node.id}", range_shape.items, range_shape.content, ITERATION_BUDGET)
        loop = _Loop(
            loop.variable, loop.count, loop.total, min(self.bound(loop.count), ITERATION_BUDGET)
        )
        # The iteration variables stand for the current element's sizes; their sum over
        # the loop is charged against the range's content.
        current = self.symbolic(loop.variable, self.element(range_shape))
        inner = {**scope, **dict.fromkeys(node.iter_vars, current)}
        # The accumulator's final size, from how one step grows it from a symbolic start.
        accu = f"a{node.id}"
        inner[node.accu_var] = self.symbolic(accu, init_shape)
        grown, step_cost = self.visit(step, inner)
        final, average = self.grow(node, init_shape, grown, accu, loop)
        if self.bound(final.content) > self.bound(init_shape.content):
            # Again with the accumulator bounded by its final size: a step whose growth
            # depends on the accumulator's size would grow it further, faster than
            # linearly. (all() and exists() keep a boolean: one visit is enough, which
            # keeps nested ones cheap to price.)
            inner[node.accu_var] = self.symbolic(accu, final)
            grown, step_cost = self.visit(step, inner)
            final_again, average = self.grow(node, init_shape, grown, accu, loop)
            if self.bound(final_again.content) > self.bound(final.content) * 1.000001 + 1:
                raise _Refused("a comprehension whose result grows faster than its steps", node)
        _, condition_cost = self.visit(condition, inner)
        body = condition_cost + step_cost + _fixed(_STEP)
        body_full, body_flat = body.full, body.flat
        for measure, last, mean in zip(_MEASURES, _sizes(final), _sizes(average), strict=True):
            body_full = body_full.substitute(f"{accu}.{measure}", mean)
            body_flat = body_flat.substitute(f"{accu}.{measure}", last)
        self.worst_step = max(self.worst_step, self.bound(body_flat))
        total = self.summed(body_full, loop)
        self.accuse(total, node, f"a comprehension of up to {loop.steps:,.0f} steps")
        shape, result_cost = self.visit(result, {**scope, node.accu_var: final})
        flat = range_cost.flat + init_cost.flat + result_cost.flat
        full = range_cost.full + init_cost.full + result_cost.full + total
        return shape, _Cost(full, flat)

    def grow(
        self, node: Node, start: Shape, after_step: Shape, accu: str, loop: _Loop
    ) -> tuple[Shape, Shape]:
        """The accumulator after the loop, and its mean size over the loop's steps.

        A step that does not read the accumulator's size replaces it (all(), exists()
        keep a boolean): the final size is the larger of the start and one step's.
        Otherwise each measure grows by what a step adds to it; one that depends on
        another is bounded by the content. A step that adds a constant (map() and
        filter() add at most one item) makes the sizes a series, whose mean is half the
        growth."""
        names = [f"{accu}.{measure}" for measure in _MEASURES]
        if not any(form.coefficient(n) for form in _sizes(after_step) for n in names):
            items, chars, content = (
                begin.join(_const(self.bound(after)))
                for begin, after in zip(_sizes(start), _sizes(after_step), strict=True)
            )
            replaced = Shape(items, chars, content, _element_of(after_step, start))
            return replaced, replaced
        if sum(after_step.content.coefficient(name) for name in names) > 1.0:
            raise _Refused("a comprehension whose result at least doubles at each step", node)
        added = after_step.content
        for name in names:
            added = added.without(name)
        content = start.content + self.summed(added, loop)
        finals, means = [], []
        for name, begin, after in zip(names[:2], _sizes(start), _sizes(after_step), strict=False):
            others = [n for n in names if n != name and after.coefficient(n)]
            if others or after.coefficient(name) > 1.0:
                finals.append(content)
                means.append(content)
                continue
            step = after.without(name)
            finals.append(begin + self.summed(step, loop))
            series = not step.terms and not loop.count.terms
            means.append(begin + step.scale(max(loop.steps - 1, 0) / 2) if series else finals[-1])
        element = _element_of(after_step, start)
        final = Shape(finals[0], finals[1], content, element)
        return final, Shape(means[0], means[1], content, element)

    def summed(self, per_step: Form, loop: _Loop) -> Form:
        """A per-step form summed over the loop. The variable's sizes add up to at most
        the range's content, and to at most `steps` times their largest value."""
        names = [f"{loop.variable}.{measure}" for measure in _MEASURES]
        rest = per_step
        for name in names:
            rest = rest.without(name)
        total = self.mul(loop.count, rest) if loop.count.terms else rest.scale(loop.steps)
        for name in names:
            k = per_step.coefficient(name)
            if not k:
                continue
            if loop.total.terms:
                total = total + loop.total.scale(k)
            else:
                total = total + _const(k * min(loop.total.const, loop.steps * self.maxima[name]))
        return total

    # -- calls ------------------------------------------------------------------------

    def call(self, node: Node, scope: Mapping[str, Shape]) -> tuple[Shape, _Cost]:
        visited = [self.visit(child, scope) for child in node.children]
        cost = _NODE_COST
        for _, child_cost in visited:
            cost = cost + child_cost
        shapes = [shape for shape, _ in visited]
        if node.name in ("_&&_", "_||_"):
            return _SCALAR, cost
        if node.name == "_?_:_":
            return _join(shapes[1], shapes[2]), cost
        if node.overloads and not any(_sized(o) for o in node.overloads):
            return _SCALAR, cost  # numbers, booleans, times: no size to grow or read
        price = _PRICES.get(node.name)
        if price is None:
            raise _Refused(f"{node.name}() has no cost model in this sidecar", node)
        shape, work = price(self, node, shapes)
        what = _display(node.name)
        made = self.bound(shape.chars)
        if made:
            given = max(self.bound(s.chars) for s in shapes)
            what += f", which builds a string of up to {made:,.0f} characters from {given:,.0f}"
        if made > MAX_VALUE_SIZE or self.bound(shape.items) > MAX_VALUE_SIZE:
            raise _Refused(f"{what}: over the limit of {MAX_VALUE_SIZE:,} for one value", node)
        self.accuse(work, node, what)
        return shape, cost + _Cost(work, work)


@functools.lru_cache(maxsize=1024)
def _input_value(bounds: SizeBounds, total: float) -> Shape:
    items = _const(min(total, bounds.max_items))
    chars = _const(min(total, bounds.max_string_length))
    return Shape(items, chars, _const(total), raw=True)


@dataclass(frozen=True, slots=True)
class _Loop:
    variable: str  # prefix of the iteration variable's symbols
    count: Form  # items in the range
    total: Form  # content of the range
    steps: float  # most steps it can take


_MEASURES: Final = ("items", "chars", "content")


def _sizes(shape: Shape) -> tuple[Form, Form, Form]:
    return shape.items, shape.chars, shape.content


def _element_of(grown: Shape, start: Shape) -> Shape | None:
    if grown.element is None or start.element is None:
        return grown.element or start.element
    return _join(grown.element, start.element)


def _sized(overload: str) -> bool:
    """Whether an overload's time or result depends on the size of a value."""
    return overload in ("equals", "not_equals") or any(
        kind in overload for kind in ("string", "bytes", "list", "map")
    )


def _may(node: Node, kind: str) -> bool:
    """Whether one of the call's overloads may take or give that kind of value."""
    return not node.overloads or any(kind in overload for overload in node.overloads)


def _display(function: str) -> str:
    operators = {"_+_": "+", "_==_": "==", "_!=_": "!=", "@in": "in", "_[_]": "[]"}
    return f"'{operators[function]}'" if function in operators else f"{function}()"


# ---------------------------------------------------------------------------------------
# Prices: (estimator, call, argument shapes, target first) -> (result, cost of the call).


def _constant_time(e: _Estimator, node: Node, args: list[Shape]) -> tuple[Shape, Form]:
    return _SCALAR, ZERO


def _compare(e: _Estimator, node: Node, args: list[Shape]) -> tuple[Shape, Form]:
    """<, <=, >, >= on strings or bytes: a byte-wise compare."""
    return _SCALAR, (args[0].chars + args[1].chars).scale(_SCAN)


def _parse(e: _Estimator, node: Node, args: list[Shape]) -> tuple[Shape, Form]:
    """int(), uint(), double(), timestamp(), duration() of a string; size() of one."""
    if not (_may(node, "string") or _may(node, "bytes")):
        return _SCALAR, ZERO
    return _SCALAR, args[0].chars.scale(_CODEPOINT)


def _deep(shape: Shape) -> Form:
    """Comparing, hashing or printing a value: a string byte-wise, a container by all
    the items and characters it holds (nested items are the worst case)."""
    if shape.items == ZERO:
        return shape.chars.scale(_SCAN)
    return shape.items.scale(_ITEM) + shape.content.scale(_DEEP)


def _equality(e: _Estimator, node: Node, args: list[Shape]) -> tuple[Shape, Form]:
    """Deep equality stops at the end of the smaller side."""
    a, b = (_deep(shape) for shape in args)
    return _SCALAR, a if e.bound(a) <= e.bound(b) else b


def _membership(e: _Estimator, node: Node, args: list[Shape]) -> tuple[Shape, Form]:
    """`in`: a map hashes the item; a list compares it with each element, each compare
    stopping at the end of the smaller side."""
    item, container = args
    hashing = item.chars.scale(_SCAN) + _deep(item) if _may(node, "map") else ZERO
    if not _may(node, "list"):
        return _SCALAR, hashing
    whole = _deep(container)
    each = container.items.scale(_ITEM) + e.mul(container.items, _deep(item))
    return _SCALAR, hashing + (whole if e.bound(whole) <= e.bound(each) else each)


def _contains(e: _Estimator, node: Node, args: list[Shape]) -> tuple[Shape, Form]:
    """A byte-wise search, naive in the worst case: haystack times needle."""
    haystack, needle = args[0].chars, args[1].chars
    return _SCALAR, haystack.scale(_SCAN) + e.mul(haystack, needle).scale(_PAIR)


def _search(e: _Estimator, node: Node, args: list[Shape]) -> tuple[Shape, Form]:
    """indexOf(), lastIndexOf(): as contains(), counting characters on the way."""
    haystack, needle = args[0].chars, args[1].chars
    return _SCALAR, haystack.scale(_CODEPOINT) + e.mul(haystack, needle).scale(_PAIR)


def _prefix(e: _Estimator, node: Node, args: list[Shape]) -> tuple[Shape, Form]:
    return _SCALAR, args[1].chars.scale(_SCAN)


def _copy(e: _Estimator, node: Node, args: list[Shape]) -> tuple[Shape, Form]:
    """lowerAscii(), upperAscii(), trim(): a byte-wise copy at most as long."""
    chars = args[0].chars
    return _string(chars), chars.scale(_COPY)


def _copy_codepoints(e: _Estimator, node: Node, args: list[Shape]) -> tuple[Shape, Form]:
    """reverse(), substring(), charAt(): a copy at most as long, by characters."""
    chars = args[0].chars
    return _string(chars), chars.scale(_COPY + _CODEPOINT)


def _concatenation(e: _Estimator, node: Node, args: list[Shape]) -> tuple[Shape, Form]:
    """`+` on strings, bytes and lists (numbers are priced as constant before)."""
    a, b = args
    items = a.items + b.items if _may(node, "list") else ZERO
    chars = a.chars + b.chars if _may(node, "string") or _may(node, "bytes") else ZERO
    element = None
    if a.element is not None and b.element is not None:
        element = _join(a.element, b.element)
    shape = Shape(items, chars, a.content + b.content, element)
    return shape, items.scale(_ITEM) + chars.scale(_COPY)


def _replace(e: _Estimator, node: Node, args: list[Shape]) -> tuple[Shape, Form]:
    subject, old, new = args[0].chars, args[1], args[2].chars
    shortest = min((len(text) for text in old.texts), default=0)
    # An empty (or unknown) pattern matches between every two characters.
    hits = subject + _const(1) if shortest == 0 else subject.scale(1.0 / shortest)
    chars = subject + e.mul(hits, new)
    return _string(chars), subject.scale(_SCAN) + hits.scale(_HIT) + chars.scale(_REPLACED)


def _split(e: _Estimator, node: Node, args: list[Shape]) -> tuple[Shape, Form]:
    subject = args[0].chars
    parts = subject + _const(1)
    shape = Shape(parts, ZERO, parts + subject, _string(subject))
    return shape, parts.scale(_PART) + subject.scale(_COPY)


def _join_list(e: _Estimator, node: Node, args: list[Shape]) -> tuple[Shape, Form]:
    items = args[0]
    separator = args[1].chars if len(args) > 1 else ZERO
    chars = items.content + e.mul(items.items, separator)
    return _string(chars), chars.scale(_COPY) + items.items.scale(_ITEM)


def _format(e: _Estimator, node: Node, args: list[Shape]) -> tuple[Shape, Form]:
    template, values = args
    directives = template.chars.scale(0.5)
    printed = directives.scale(_FORMAT_MAX_NUMBER) + values.content.scale(_ESCAPED)
    chars = template.chars + printed
    return _string(chars), chars.scale(_COPY) + _deep(values)


def _quote(e: _Estimator, node: Node, args: list[Shape]) -> tuple[Shape, Form]:
    chars = args[0].chars.scale(_ESCAPED) + _const(2)
    return _string(chars), chars.scale(_COPY)


def _conversion(e: _Estimator, node: Node, args: list[Shape]) -> tuple[Shape, Form]:
    """string(), bytes(): a copy of a string or bytes, or a short text for a scalar."""
    chars = args[0].chars + _const(64)
    return _string(chars), chars.scale(_COPY + _CODEPOINT)


def _index(e: _Estimator, node: Node, args: list[Shape]) -> tuple[Shape, Form]:
    return e.element(args[0]), args[1].chars.scale(_SCAN)


def _over_items(e: _Estimator, node: Node, args: list[Shape]) -> tuple[Shape, Form]:
    """math.greatest(), math.least(): over a list, or over their arguments."""
    total = _const(len(args))
    for shape in args:
        total = total + shape.items
    return _SCALAR, total.scale(_ITEM)


def _matches(e: _Estimator, node: Node, args: list[Shape]) -> tuple[Shape, Form]:
    subject, pattern = args
    if not pattern.texts:
        raise _Refused(
            "matches() with a pattern that is not a constant string: RE2's time grows with "
            "the pattern's size times the text's, and a pattern from the input can take "
            "seconds",
            node,
        )
    program = max(regex_program_size(text) for text in pattern.texts)
    dfa_only = program <= _DFA_SAFE_PROGRAM
    per_char = _DFA if dfa_only else _NFA_CHAR + _NFA_INSTRUCTION * program
    return _SCALAR, subject.chars.scale(per_char) + _const(program * _ITEM)


class _PatternSize:
    """An upper bound of the number of instructions RE2 compiles a pattern into:
    sequences add, alternatives add, `x{n,m}` is m copies of x (RE2 expands counted
    repetitions and refuses counts above 1000), classes and `.` take a few byte ranges
    each. Unbalanced text is counted as literal characters."""

    def __init__(self, pattern: str) -> None:
        self.text = pattern
        self.at = 0

    def alternation(self) -> int:
        size = self.sequence()
        while self.peek() == "|":
            self.at += 1
            size += 1 + self.sequence()
        return size

    def sequence(self) -> int:
        size = 0
        while self.peek() not in ("", "|", ")"):
            size += self.quantified(self.atom())
        return size

    def peek(self) -> str:
        return self.text[self.at] if self.at < len(self.text) else ""

    def atom(self) -> int:
        char = self.peek()
        self.at += 1
        if char == "(":
            return self.group()
        if char == "[":
            return self.char_class()
        if char == "\\":
            return self.escape()
        return _CLASS if char == "." else 1

    def group(self) -> int:
        if self.text.startswith(("?P<", "?<"), self.at):  # a named group: its body counts
            end = self.text.find(">", self.at)
            self.at = len(self.text) if end < 0 else end + 1
        elif self.text.startswith("?", self.at):  # (?:...), (?i) and (?i:...) flags
            end = self.at
            while end < len(self.text) and self.text[end] not in ":)":
                end += 1
            self.at = end + (1 if end < len(self.text) and self.text[end] == ":" else 0)
        size = self.alternation()
        if self.peek() == ")":
            self.at += 1
        return size + 2

    def char_class(self) -> int:
        if self.peek() == "^":
            self.at += 1
        if self.peek() == "]":
            self.at += 1
        while self.peek() not in ("", "]"):
            self.at += 2 if self.peek() == "\\" else 1
        self.at += 1
        return _CLASS

    def escape(self) -> int:
        escaped = self.peek()
        self.at += 1
        if escaped in ("p", "P"):  # \pL, \p{Greek}: Unicode classes, many ranges
            if self.peek() == "{":
                end = self.text.find("}", self.at)
                self.at = len(self.text) if end < 0 else end + 1
            else:
                self.at += 1
            return _UNICODE_CLASS
        if escaped == "Q":  # \Q...\E: literal text
            end = self.text.find("\\E", self.at)
            literal = self.text[self.at : end if end >= 0 else len(self.text)]
            self.at = len(self.text) if end < 0 else end + 2
            return len(literal)
        return _CLASS if escaped in "dDsSwW" else 1

    def quantified(self, size: int) -> int:
        while True:
            char = self.peek()
            if char in ("*", "+", "?"):
                self.at += 1
                size += 1
            elif char == "{" and (found := _COUNT.match(self.text, self.at)):
                self.at = found.end()
                low, comma, high = found.group(1), found.group(2), found.group(3)
                count = int(high) if high else int(low) + (1 if comma else 0)
                size *= min(count, _RE2_MAX_REPEAT + 1) or 1
            else:
                return size
            if self.peek() == "?":  # non-greedy
                self.at += 1


def regex_program_size(pattern: str) -> int:
    """See `_PatternSize`; RE2 adds a few instructions for an unanchored search."""
    parser = _PatternSize(pattern)
    size = 0
    while parser.peek():
        size += parser.alternation()
        if parser.peek():  # a stray ")": count it as a character
            parser.at += 1
            size += 1
    return size + 3


_COUNT: Final = re.compile(r"\{(\d+)(,)?(\d*)\}")
_RE2_MAX_REPEAT: Final = 1000
_CLASS: Final = 4
_UNICODE_CLASS: Final = 64


_CONSTANT_TIME: Final = (
    "!_", "-_", "_-_", "_*_", "_/_", "_%_", "@not_strictly_false", "not_strictly_false",
    "dyn", "type", "bool", "getFullYear", "getMonth", "getDayOfYear", "getDayOfMonth",
    "getDate", "getDayOfWeek", "getHours", "getMinutes", "getSeconds", "getMilliseconds",
    "math.ceil", "math.floor", "math.round", "math.trunc", "math.abs", "math.sign",
    "math.isInf", "math.isNaN", "math.isFinite", "math.sqrt", "math.bitAnd", "math.bitOr",
    "math.bitXor", "math.bitNot", "math.bitShiftLeft", "math.bitShiftRight",
)  # fmt: skip
_PARSING: Final = ("size", "int", "uint", "double", "timestamp", "duration")

_PRICES: Final[dict[str, Price]] = {
    **dict.fromkeys(_CONSTANT_TIME, _constant_time),
    **dict.fromkeys(("_<_", "_<=_", "_>_", "_>=_"), _compare),
    **dict.fromkeys(_PARSING, _parse),
    **dict.fromkeys(("indexOf", "lastIndexOf"), _search),
    "contains": _contains,
    **dict.fromkeys(("startsWith", "endsWith"), _prefix),
    **dict.fromkeys(("lowerAscii", "upperAscii", "trim"), _copy),
    **dict.fromkeys(("reverse", "substring", "charAt"), _copy_codepoints),
    **dict.fromkeys(("string", "bytes"), _conversion),
    **dict.fromkeys(("math.greatest", "math.least", "math.@max", "math.@min"), _over_items),
    "_==_": _equality,
    "_!=_": _equality,
    "@in": _membership,
    "_[_]": _index,
    "_+_": _concatenation,
    "matches": _matches,
    "replace": _replace,
    "split": _split,
    "join": _join_list,
    "format": _format,
    "strings.quote": _quote,
}


def estimate(serialized: bytes, bounds: SizeBounds, limit: float = DEFAULT_COST_LIMIT) -> float:
    """The worst-case cost of one evaluation of `serialized` (a compiled program's
    `serialize()`); `CostError` when it exceeds `limit` or cannot be bounded."""
    checked = checked_expression(serialized)
    return _worst(checked.root, checked, bounds, limit)


def _worst(root: Node, checked: CheckedExpression, bounds: SizeBounds, limit: float) -> float:
    estimator = _Estimator(bounds)
    try:
        _, cost = estimator.visit(root, _ROOT_SCOPE)
    except _Refused as refused:
        raise CostError(refused.message, offset=checked.offset(refused.node.id)) from None
    structural = estimator.bound(cost.full)
    by_budget = estimator.bound(cost.flat) + ITERATION_BUDGET * estimator.worst_step
    worst = min(structural, by_budget)
    if worst <= limit:
        return worst
    message = f"its worst case costs about {_ms(worst)}, over the limit of {_ms(limit)}"
    blame = estimator.blame
    if blame is None:
        raise CostError(message, offset=0)
    raise CostError(
        f"{message}; the costliest part is {blame.what}: {_ms(blame.cost)}",
        offset=checked.offset(blame.node.id),
    )


def conversion_cost(bounds: SizeBounds) -> float:
    """What converting an input within `bounds` into CEL values costs at worst (about
    150 ns per item or character: 1 MiB of empty lists, 150 ms). Paid once per input;
    again only where a ruleset with dependencies needs a fresh activation."""
    return bounds.max_total * _CONVERT


def layering_cost(carried: int, reads: int) -> float:
    """What one layer of a ruleset's dependencies adds inside a fused program: the
    outcomes so far carried into the next layer (`carried`: a list copied) and the map
    of the outcomes its conditions read (`reads`: each an index and an insert), around
    two one-item comprehensions."""
    return 4 * _NODE + carried * _NODE + reads * 2 * _NODE


def _ms(units: float) -> str:
    return f"{units / 1e6:,.1f} ms"


def estimate_items(
    checked: CheckedExpression, bounds: SizeBounds, limit: float = DEFAULT_COST_LIMIT
) -> list[float | None] | None:
    """For a program that is a list of conditions (a ruleset's combined program, as
    `checked_expression` decodes it), each one's worst-case cost, None for those
    refused; None if it is not such a list."""
    if checked.root.kind != "list":
        return None
    costs: list[float | None] = []
    for item in checked.root.children:
        try:
            costs.append(_worst(item, checked, bounds, limit))
        except CostError:
            costs.append(None)
    return costs

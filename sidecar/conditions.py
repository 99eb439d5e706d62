"""CEL conditions: compiled once, evaluated with bounded cost.

The expression language is CEL through `cel-expr-python` (cel-cpp): it type-checks at
compile time, reports errors with line:column, and stops runaway comprehensions with an
iteration budget. Everything else a condition does (building strings and lists, regexes,
conversions) is priced before it is accepted (`sidecar.cost`): a condition whose
worst-case cost over inputs within `InputLimits` exceeds the limit is refused, so no rule
and no input can freeze the sidecar.

Why a ruleset is compiled into one program: converting the input document and crossing
into C++ costs more than evaluating a typical condition, so the enabled conditions of a
ruleset become one CEL list expression and the input is converted once per evaluation.
When that program fails (some condition errored on this input), each condition is
evaluated on its own so that every error is attributed to exactly one rule. Before any of
that, a chunk whose conditions all lie in the common subset `sidecar.fastpath` compiles
is answered in Python, when it can say every outcome exactly as cel-cpp would.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import re
import threading
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final, TypeVar

from cel_expr_python import cel
from cel_expr_python.ext import ext_math, ext_strings

from sidecar.celwire import CheckedExpression, Node, checked_expression
from sidecar.cost import (
    DEFAULT_COST_LIMIT,
    CostError,
    SizeBounds,
    conversion_cost,
    estimate,
    estimate_items,
    layering_cost,
)
from sidecar.dependencies import RULES, DynamicReference, Reference, layers, references
from sidecar.errors import InputError, format_path
from sidecar.fastpath import (
    UNKNOWN,
    FastFunction,
    build,
    clean_input,
    exact_string,
    unwrap_condition,
)

__all__ = [
    "DEFAULT_INPUT_LIMITS",
    "DEPENDENCY_REFUSED",
    "ConditionCompiler",
    "ConditionError",
    "ConditionSet",
    "ConditionSetError",
    "InputLimits",
    "Outcome",
    "check_input",
    "input_fields",
    "located",
]

logger = logging.getLogger("sidecar.conditions")

# The binding reports errors as "ERROR: <input>:LINE:COL: message" followed by a snippet.
_ERROR_RE: Final = re.compile(r"ERROR: <input>:(-?\d+):(-?\d+): ([^\n]*)")
_STATUS_PREFIX_RE: Final = re.compile(r"^[A-Z_]+: ")
_STATUS_SUFFIX_RE: Final = re.compile(r" \[[A-Z_]+\]$")
_CHUNK_CONDITIONS: Final = 128
_CHUNK_CHARS: Final = 60_000
_REST_CHARS: Final = 3_000  # see `_Chunk.build_rest`
_INT64_MIN: Final = -(2**63)
_INT64_MAX: Final = 2**63 - 1
# Variables that hand a layered set's programs the outcomes they read, one per program
# (see `_Bindings`); a set that needs more takes a fresh activation per this many.
_SLOTS: Final = 256
_V = TypeVar("_V")


class ConditionError(Exception):
    """A condition refused at load: why (`reason`: it does not compile, or it could cost
    too much), the message, and the position inside the expression."""

    def __init__(
        self,
        message: str,
        *,
        line: int = 1,
        column: int = 1,
        reason: str = "condition does not compile",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.line = line
        self.column = column
        self.reason = reason


@dataclass(frozen=True, slots=True, kw_only=True)
class InputLimits:
    """Bounds on an evaluation input, checked before CEL sees it.

    They are also the sizes the cost estimate assumes (`sidecar.cost`): cel-cpp builds
    `map()`/`filter()` results in quadratic time, so list size bounds the cost of a rule
    over user-supplied lists (1,000 items: ~15 ms), and `max_total_size` (all characters
    of strings and keys plus all items, at most the 1 MiB request body by default) lets a
    loop over a list be priced by its total rather than by its longest element.
    """

    max_depth: int = 32
    max_items: int = 1_000
    max_string_length: int = 65_536
    max_total_size: int = 1_048_576

    def size_bounds(self) -> SizeBounds:
        return SizeBounds(
            max_items=self.max_items,
            max_string_length=self.max_string_length,
            max_total=self.max_total_size,
        )


DEFAULT_INPUT_LIMITS: Final = InputLimits()


class _Violation(Exception):
    """Raised deep inside the input; the path is collected while it unwinds."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        self.steps: list[str | int] = []


def _check_scalar(value: Any, kind: type, limits: InputLimits, inexact: list[str]) -> int:
    if kind is str:
        if len(value) > limits.max_string_length:
            raise _Violation(f"string longer than {limits.max_string_length} characters")
        if (not value.isascii() or "\x00" in value) and not exact_string(value):
            inexact.append(value)
        return len(value)
    if kind is int:
        if not _INT64_MIN <= value <= _INT64_MAX:
            raise _Violation("integer does not fit in 64 bits")
    elif kind is float:
        if not math.isfinite(value):
            raise _Violation("NaN and infinities are not JSON numbers")
    elif kind is not bool and value is not None:
        raise _Violation(f"{kind.__name__} is not a JSON value")
    return 0


def _check_container(
    value: dict[Any, Any] | list[Any], depth: int, limits: InputLimits, inexact: list[str]
) -> int:
    keyed = type(value) is dict
    if depth > limits.max_depth:
        raise _Violation(f"nested deeper than {limits.max_depth} levels")
    if len(value) > limits.max_items:
        counted = "object has more than {} keys" if keyed else "list has more than {} items"
        raise _Violation(counted.format(limits.max_items))
    longest = limits.max_string_length
    size = len(value)
    for step, item in value.items() if type(value) is dict else enumerate(value):
        if keyed:
            if type(step) is not str:
                raise _Violation("object keys must be strings")
            if len(step) > longest:
                raise _Violation(f"key longer than {longest} characters")
            if (not step.isascii() or "\x00" in step) and not exact_string(step):
                inexact.append(step)
            size += len(step)
        # Most values pass these tests inline, without a call; `_check_value` takes the
        # rest and says why what does not pass does not.
        kind = type(item)
        if kind is str and len(item) <= longest and item.isascii() and "\x00" not in item:
            size += len(item)
            continue
        if kind is float and item - item == 0.0:  # finite
            continue
        if kind is bool or item is None or (kind is int and _INT64_MIN <= item <= _INT64_MAX):
            continue
        try:
            size += _check_value(item, depth + 1, limits, inexact)
        except _Violation as violation:
            violation.steps.append(step)
            raise
    return size


def _check_value(value: Any, depth: int, limits: InputLimits, inexact: list[str]) -> int:
    """The value's size as the cost estimate counts it: characters plus items."""
    kind = type(value)
    if kind is dict or kind is list:
        return _check_container(value, depth, limits, inexact)
    return _check_scalar(value, kind, limits, inexact)


def check_input(document: Any, limits: InputLimits = DEFAULT_INPUT_LIMITS) -> bool:
    """Reject inputs CEL cannot take or that break the limits, naming the JSON path.

    Returns whether cel-cpp converts the whole input exactly (`clean_input`: no string or
    key holds a NUL or a lone surrogate; the rest is refused here), so that an
    evaluation does not walk the input a second time for the fast path. Called on every
    evaluation, so it is written for speed: no path is built unless something is wrong.
    """
    inexact: list[str] = []
    try:
        size = _check_value(document, 1, limits, inexact)
    except _Violation as violation:
        path = format_path(list(reversed(violation.steps)))
        raise InputError(violation.message, path=path) from None
    if size > limits.max_total_size:
        message = f"input holds more than {limits.max_total_size} characters and items in all"
        raise InputError(message, path=format_path([]))
    return not inexact


def _parse_cel_error(text: str) -> ConditionError:
    """Turn the binding's status text into a message and a position."""
    found = _ERROR_RE.search(text)
    if found is None:
        message = _STATUS_SUFFIX_RE.sub("", _STATUS_PREFIX_RE.sub("", text.strip()))
        return ConditionError(message)
    line, column = int(found.group(1)), int(found.group(2))
    return ConditionError(found.group(3).strip(), line=max(line, 1), column=max(column, 1))


def located(expression: str, offset: int, message: str, reason: str) -> ConditionError:
    """A refusal placed at a code-point offset of the expression."""
    before = expression[:offset]
    line = before.count("\n") + 1
    column = offset - (before.rfind("\n") + 1) + 1
    return ConditionError(message, line=line, column=column, reason=reason)


DEPENDENCY_REFUSED: Final = "rule dependency refused"
"""The `ConditionError.reason` of a read of `rules` that cannot be (`sidecar.dependencies`)."""


def _cost_error(expression: str, exc: CostError) -> ConditionError:
    """A cost refusal placed at the call it blames."""
    return located(expression, exc.offset, exc.message, "condition is too costly")


def _runtime_error_text(text: str) -> str:
    return _STATUS_SUFFIX_RE.sub("", _STATUS_PREFIX_RE.sub("", text.strip()))


# What one condition gave for one input: True/False, or the error text.
Outcome = bool | str


class ConditionCompiler:
    """Owns the CEL environment and the cache of compiled single expressions.

    One compiler lives as long as the loader, so an expression used by many rules, or
    unchanged across reloads, is compiled once. Thread-safe: the cache is filled under a
    lock, and compiled programs are immutable. `fast_path`: whether the sets it makes
    (or binds) answer what they can in Python first (`sidecar.fastpath`).
    """

    def __init__(
        self,
        *,
        limits: InputLimits = DEFAULT_INPUT_LIMITS,
        cost_limit: float = DEFAULT_COST_LIMIT,
        fast_path: bool = True,
    ) -> None:
        self.fast_path = fast_path
        self._bounds = limits.size_bounds()
        self._cost_limit = cost_limit
        outcomes = cel.Type.Map(cel.Type.STRING, cel.Type.BOOL)
        extensions = [ext_strings.ExtStrings(), ext_math.ExtMath()]
        self._env = cel.NewEnv(
            variables={"input": cel.Type.DYN, RULES: outcomes}, extensions=extensions
        )
        # Where a layered set's programs run: the conditions' variables and the slots
        # (`_slot`). Conditions are checked in `_env`, so none can name a slot.
        slots = {_slot(n): outcomes for n in range(1, _SLOTS + 1)}
        self._bound_env = cel.NewEnv(
            variables={"input": cel.Type.DYN, RULES: outcomes, **slots}, extensions=extensions
        )
        self._cache: dict[str, Any] = {}
        self._bound: dict[tuple[str, str], Any] = {}  # (slot, expression): `bound_alone`
        self._costs: dict[str, float] = {}  # worst-case cost of each accepted expression
        # The rules each accepted expression that names `rules` reads.
        self._references: dict[str, tuple[Reference, ...]] = {}
        self._conversion = conversion_cost(self._bounds)
        self._lock = threading.Lock()
        self._preparer = _Preparer()

    def build_soon(self, build: Callable[[], None]) -> None:
        """Run `build` (a compile that no request should wait for) in a background
        thread (see `_Preparer`)."""
        self._preparer.add(build)

    def compile(self, expression: str) -> Any:
        """Compile one boolean condition, or raise `ConditionError`."""
        with self._lock:
            program = self._cache.get(expression)
        if program is not None:
            return program
        try:
            program = self._env.compile(expression)
        except RuntimeError as exc:
            raise _parse_cel_error(str(exc)) from None
        result_type = program.return_type()
        if result_type not in (cel.Type.BOOL, cel.Type.DYN):
            kind = result_type.name().lower()
            raise ConditionError(f"a condition must be a boolean expression, this one gives {kind}")
        cost = self._costs.get(expression)
        if cost is None:
            try:
                cost = estimate(program.serialize(), self._bounds, self._cost_limit)
            except CostError as exc:
                raise _cost_error(expression, exc) from None
        read: tuple[Reference, ...] = ()
        if RULES in expression:
            try:
                read = references(checked_expression(program.serialize()), expression)
            except DynamicReference as exc:
                raise located(expression, exc.offset, exc.message, DEPENDENCY_REFUSED) from None
        with self._lock:
            self._cache.setdefault(expression, program)
            self._costs[expression] = cost
            if read:
                self._references[expression] = read
        return program

    def references(self, expression: str) -> tuple[Reference, ...]:
        """The rules the condition reads (`rules["id"]`), or `ConditionError`. Only an
        expression that spells `rules` is compiled alone for it: the rest read none."""
        if RULES not in expression:
            return ()
        with self._lock:
            found = self._references.get(expression)
        if found is None:
            self.compile(expression)
            with self._lock:
                found = self._references.get(expression, ())
        return found

    def compile_set(
        self,
        expressions: Sequence[str],
        *,
        names: Sequence[str] = (),
        dependencies: Sequence[tuple[int, ...]] = (),
    ) -> ConditionSet:
        """Compile the conditions of one ruleset into a few programs (see ConditionSet).

        `names` are the rule ids (the keys of `rules`) and `dependencies` each
        condition's direct dependencies, as indexes, checked acyclic by the caller
        (`sidecar.dependencies.resolve`). Raises `ConditionSetError` listing every
        expression that does not compile.
        """
        layout = _Layout.of(expressions, names, dependencies) if any(dependencies) else None
        ordered = tuple(expressions) if layout is None else layout.expressions
        chunks = []
        errors: dict[int, ConditionError] = {}
        for start, end in _chunk_bounds(ordered, () if layout is None else layout.breaks):
            combined = self._combined(ordered[start:end])
            program = None if combined is None else combined[0]
            if combined is None:
                # A bad condition, or a nesting depth only the combined form exceeds:
                # each expression on its own tells which.
                suspects: Sequence[int] = range(start, end)
            else:
                suspects = self._overpriced(combined[1], ordered, start, end)
            # A read of `rules` is checked on the condition alone (`compile`).
            named = (i for i in range(start, end) if RULES in ordered[i])
            for index in sorted({*suspects, *named}):
                try:
                    self.compile(ordered[index])
                except ConditionError as exc:
                    errors[index if layout is None else layout.order[index]] = exc
            chunks.append(_Chunk(start, end, program))
        layered = None
        if layout is not None and not errors:
            layered = self._layered(layout, chunks, errors)
        if errors:
            raise ConditionSetError(errors)
        with self._lock:
            worst = sum(self._costs[expression] for expression in expressions)
        if layered is not None:
            worst += layered.cost(self._conversion)
        fields = input_fields(expressions)
        return ConditionSet(
            tuple(expressions),
            chunks,
            self,
            worst_cost=worst,
            fields=fields,
            layout=layout,
            layered=layered,
        )

    def _layered(
        self, layout: _Layout, chunks: Sequence[_Chunk], errors: dict[int, ConditionError]
    ) -> _Layered:
        """The programs a layered set is evaluated with (`_Layered`): the fused ones, then
        one per chunk for the fallback, each that reads earlier outcomes with a slot of
        its own. A condition that cannot be bound to its slot (cel-cpp's nesting limit)
        goes into `errors`."""
        first = layout.breaks[0]
        fused, next_slot = self._fuse_all(layout, 0, 1)
        rest, after_rest = self._fuse_all(layout, first, 1)
        next_slot = max(next_slot, after_rest)
        fallback = []
        for chunk in chunks:
            reads = layout.needs(chunk.start, chunk.end)
            slot = next_slot if reads else 0
            next_slot += bool(reads)
            program = None
            if slot:
                expressions = layout.expressions[chunk.start : chunk.end]
                program = self.compile_combined(expressions, slot=_slot(slot))
                for position in range(chunk.start, chunk.end) if program is None else ():
                    if self.bound_alone(layout.expressions[position], _slot(slot)) is None:
                        errors[layout.order[position]] = ConditionError(
                            "the condition is nested too deeply to read other rules' outcomes"
                        )
            fallback.append(_Unit(chunk.start, chunk.end, slot, reads, program))
        fields = input_fields(layout.expressions[first:])
        return _Layered(tuple(fused), tuple(rest), tuple(fallback), next_slot - 1, layout, fields)

    def _fuse_all(self, layout: _Layout, start: int, next_slot: int) -> tuple[list[_Unit], int]:
        """The fused programs of the positions from `start` on, in chunks, and the next
        free slot; none when one of them cannot be made."""
        fused: list[_Unit] = []
        for low, high in _chunk_bounds(layout.expressions[start:]):
            made = self._fuse(layout, start + low, start + high, next_slot)
            if made is None:
                return [], 1
            fused += made[0]
            next_slot = made[1]
        return fused, next_slot

    def _fuse(
        self, layout: _Layout, start: int, end: int, next_slot: int
    ) -> tuple[list[_Unit], int] | None:
        """The fused programs of positions [start, end) and the next free slot: one
        program, or, past cel-cpp's nesting limit (each layer nests one level more), the
        halves' at a layer break between; None when a single layer cannot be."""
        reads = tuple(
            sorted({d for p in range(start, end) for d in layout.depends[p] if d < start})
        )
        slot = next_slot if reads else 0
        program = self.compile_bound(_fused_text(layout, start, end, slot))
        if program is not None:
            return [_Unit(start, end, slot, reads, program)], next_slot + bool(reads)
        inside = [b for b in layout.breaks if start < b < end]
        if not inside:
            return None
        middle = inside[len(inside) // 2]
        first = self._fuse(layout, start, middle, next_slot)
        second = None if first is None else self._fuse(layout, middle, end, first[1])
        if first is None or second is None:
            return None
        return first[0] + second[0], second[1]

    def _overpriced(
        self, checked: CheckedExpression, expressions: Sequence[str], start: int, end: int
    ) -> list[int]:
        """Indexes of the chunk's expressions over the cost limit, priced from the chunk's
        checked program; each is then compiled alone for its error."""
        with self._lock:
            if all(e in self._costs for e in expressions[start:end]):
                return []
        costs = estimate_items(checked, self._bounds, self._cost_limit)
        if costs is None or len(costs) != end - start:
            return list(range(start, end))
        with self._lock:
            for expression, cost in zip(expressions[start:end], costs, strict=True):
                if cost is not None:
                    self._costs[expression] = cost
        return [start + offset for offset, cost in enumerate(costs) if cost is None]

    def forget_unused(self, keep: set[str]) -> None:
        """Drop cached programs no live ruleset uses, so memory follows the registry."""
        with self._lock:
            for expression in [e for e in self._cache if e not in keep]:
                del self._cache[expression]
            for expression in [e for e in self._costs if e not in keep]:
                del self._costs[expression]
            for expression in [e for e in self._references if e not in keep]:
                del self._references[expression]
            for key in [k for k in self._bound if k[1] not in keep]:
                del self._bound[key]

    def outcome(self, expression: str, document: Any) -> Outcome:
        """One condition evaluated alone: the reference the combined programs must match."""
        return _evaluate_one(self.compile(expression), self.activation(document))

    def deserialize(self, serialized: bytes, *, bound: bool = False) -> Any:
        """A program compiled (and serialized) by another process's compiler; `bound`:
        one of a layered set's (`compile_bound`)."""
        return (self._bound_env if bound else self._env).deserialize(serialized)

    def compile_bound(self, text: str) -> Any | None:
        """A layered set's program (built from conditions already accepted, reading the
        slots), or None when cel-cpp refuses it (its nesting limit: the caller splits)."""
        try:
            return self._bound_env.compile(text)
        except RuntimeError:
            return None

    def bound_alone(self, expression: str, slot: str) -> Any | None:
        """One condition of a layered set alone, `rules` bound to `slot` (the fallback's
        `_evaluate_alone`); kept like `compile`'s programs."""
        key = (slot, expression)
        with self._lock:
            program = self._bound.get(key)
        if program is None:
            program = self.compile_bound(f"[{slot}].map({RULES}, (\n{expression}\n))[0]")
            if program is not None:
                with self._lock:
                    program = self._bound.setdefault(key, program)
        return program

    def bound_activation(self, document: Any, slots: Mapping[str, dict[str, bool]]) -> Any:
        """One activation for every program of a layered set's evaluation: cel-cpp
        converts a variable when a program first reads it, so each slot's map is filled
        just before the one program that reads it runs, and the input is converted once."""
        return self._bound_env.Activation(data={"input": document, **slots})

    def activation(self, document: Any, outcomes: Mapping[str, bool] | None = None) -> Any:
        """The variables of one evaluation: the input, and the outcomes of the rules
        the conditions depend on (`rules`), if any."""
        if outcomes is None:
            return self._env.Activation(data={"input": document})
        return self._env.Activation(data={"input": document, RULES: outcomes})

    def compile_combined(self, expressions: Sequence[str], slot: str = "") -> Any | None:
        """One program giving the list of the expressions' outcomes, or None; with
        `slot`, `rules` is bound to it (a layered set's fallback, `_Layered`)."""
        if slot:
            items = ",\n".join(map(_item, expressions))
            return self.compile_bound(f"[{slot}].map({RULES}, [{items}])[0]")
        combined = self._combined(expressions)
        return None if combined is None else combined[0]

    def _combined(self, expressions: Sequence[str]) -> tuple[Any, CheckedExpression] | None:
        """`compile_combined`'s program with its checked expression (decoded once: the
        frame check and the cost estimate both read it)."""
        # `(c) ? true : false` makes a non-boolean condition a compile error here and a
        # runtime error later, so the list is always list(bool). Each item is checked to
        # be its own expression (`_framed`).
        if not expressions:
            return None
        items, tails, position = [], [], 1  # code points: "[" comes first
        for expression in expressions:
            item = _item(expression)
            tails.append(position + len(item) - len("true : false"))
            items.append(item)
            position += len(item) + len(",\n")
        try:
            program = self._env.compile("[" + ",\n".join(items) + "]")
        except RuntimeError:
            return None
        checked = checked_expression(program.serialize())
        return (program, checked) if _framed(checked, tails) else None


def _item(expression: str) -> str:
    """A condition as an item of a combined program (a `//` comment ends in it)."""
    return f"((\n{expression}\n)) ? true : false"


def _slot(number: int) -> str:
    """The variable of slot `number` (1, 2, ...: each activation has `_SLOTS`)."""
    return f"__rules_{(number - 1) % _SLOTS + 1}"


def _framed(checked: CheckedExpression, tails: Sequence[int]) -> bool:
    """Whether each item of a combined program is exactly one expression in its frame.

    The program is compiled from the expressions pasted into one text: a comment or
    unbalanced brackets in one (`a || //`, `b)) ? true : false, ((c`) could reshape
    its neighbours and still leave one item per expression, with other meanings. Each
    item's `true` must be the one written after its own expression; where it is not,
    the caller compiles each expression alone, which refuses the culprit."""
    root = checked.root
    if root.kind != "list" or len(root.children) != len(tails):
        return False
    offsets = checked.offsets()
    for item, tail in zip(root.children, tails, strict=True):
        if item.name != "_?_:_" or len(item.children) != 3:
            return False
        if offsets.get(item.children[1].id) != tail:
            return False
    return True


class ConditionSetError(Exception):
    """Conditions of one ruleset that failed to compile, by position in the set."""

    def __init__(self, errors: Mapping[int, ConditionError]) -> None:
        super().__init__(f"{len(errors)} condition(s) do not compile")
        self.errors = dict(errors)


class ConditionSet:
    """The compiled conditions of one ruleset, evaluated together against one input.

    The conditions are compiled into a few programs ("chunks", each one CEL list
    expression under cel-cpp's size limit), so an input is converted and evaluated a
    few times per ruleset rather than once per rule. cel-expr-python converts the whole
    input as soon as a program reads any field of it, so `project` first keeps only
    the top-level fields the conditions name (`input.amount`, `has(input.card)`); when a
    condition uses `input` any other way, the whole document is kept.

    When a chunk fails on an input (some condition in it errored), its conditions are
    evaluated one by one, each with a program of its own (compiled on first need and
    kept by the compiler), so that every error belongs to exactly one rule.

    A set whose conditions read other rules' outcomes (`layout`, see `_Layout`) is
    evaluated by one fused program over all its layers (`_Layered`), and layer by layer
    only when that fails; a set without (most) takes exactly the path it always did.

    `worst_cost` is the sum of the conditions' worst-case costs (`sidecar.cost` units,
    about a nanosecond each), plus what layering adds (`_Layered.cost`): what one
    evaluation can take, for a caller that budgets event-loop time across inputs and
    rulesets.
    """

    __slots__ = (
        "_asked",
        "_chunks",
        "_compiler",
        "_fast",
        "_layered",
        "_layout",
        "_lock",
        "_serialized",
        "_trees",
        "expressions",
        "fields",
        "worst_cost",
    )

    def __init__(
        self,
        expressions: tuple[str, ...],
        chunks: Sequence[_Chunk],
        compiler: ConditionCompiler | None,
        *,
        serialized: Sequence[tuple[int, int, bytes | None]] = (),
        worst_cost: float = 0.0,
        fields: frozenset[str] | None,
        layout: _Layout | None = None,
        layered: _Layered | None = None,
    ) -> None:
        self.expressions = expressions
        self.worst_cost = worst_cost
        self.fields = fields  # `input_fields(expressions)`, carried along when pickled
        self._chunks = tuple(chunks)
        self._compiler = compiler
        self._serialized = tuple(serialized)
        # Built by `prepare` (None until then; empty when off or none applies): about
        # 0.2 ms per condition, which at load would double a cold load's time.
        self._fast: tuple[FastFunction | None, ...] | None = _unbuilt(compiler)
        self._asked = False  # whether the first evaluation asked for `prepare`
        self._lock = threading.Lock()
        self._trees: tuple[Node | None, ...] | None = None
        self._layout = layout
        self._layered = layered

    @property
    def depth(self) -> int:
        """How many layers of dependencies the set is evaluated in (1 without any)."""
        return 1 if self._layout is None else len(self._layout.breaks) + 1

    def dependencies(self) -> tuple[tuple[str, ...], ...]:
        """Each condition's direct dependencies, the rule ids it reads (in set order)."""
        layout = self._layout
        if layout is None:
            return ((),) * len(self.expressions)
        named = [tuple(layout.names[d] for d in depends) for depends in layout.depends]
        return tuple(layout.restore(named))

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled as its expressions and its chunks' programs in cel-cpp's serialized
        form, so a worker process can compile and this process only deserialize (about
        a tenth of the cost); the receiver calls `bind` before use."""
        serialized = self._serialized or tuple(
            (chunk.start, chunk.end, None if chunk.program is None else chunk.program.serialize())
            for chunk in self._chunks
        )
        state = (
            self.expressions,
            serialized,
            self.worst_cost,
            self.fields,
            self._layout,
            self._layered,
        )
        return (_unbound_set, state)

    def bind(self, compiler: ConditionCompiler) -> None:
        """Attach an unpickled set to this process's compiler. Its programs are restored
        on first use (`_programs`): a large reload changes many rulesets that may never
        be evaluated, and restoring costs about 2 ms per 100 conditions."""
        if self._compiler is None:
            self._compiler = compiler
            self._fast = _unbuilt(compiler)

    def _programs(self) -> tuple[_Chunk, ...]:
        """The chunks, their programs restored from the serialized form at first use."""
        if self._serialized:
            with self._lock:  # the evaluating thread and `prepare`'s may both get here
                compiler = self._compiler
                if self._serialized and compiler is not None:
                    self._chunks = tuple(
                        _Chunk(start, end, None if data is None else compiler.deserialize(data))
                        for start, end, data in self._serialized
                    )
                    if self._layered is not None:
                        self._layered = self._layered.restored(compiler)
                    self._serialized = ()
        return self._chunks

    def trees(self) -> tuple[Node | None, ...]:
        """Each condition's expression tree as cel-cpp checked it (None where it cannot
        be had), for explaining an evaluation; decoded from the programs at first use."""
        if self._trees is None:
            layout = self._layout
            ordered = self.expressions if layout is None else layout.expressions
            trees = _condition_trees(self._programs(), ordered, self._compiler)
            self._trees = trees if layout is None else tuple(layout.restore(trees))
        return self._trees

    def project(self, document: Any) -> Any:
        """The part of the input the conditions can see (the input itself if unknown)."""
        if self.fields is None or type(document) is not dict:
            return document
        return {name: document[name] for name in self.fields if name in document}

    @property
    def prepared(self) -> bool:
        """Whether the fast functions are built (or the fast path is off)."""
        return self._fast is not None

    def prepare(self) -> None:
        """Build the fast functions; until then `evaluate` uses cel-cpp alone. Building
        costs about 0.2 ms a simple condition (far more for long ones), so a set's first
        evaluation asks its compiler to do it in a thread, never on the request, and a
        set never evaluated (most of a large reload) never costs it."""
        if self._fast is None:  # racing threads may both build: either result is the same
            self._fast = _fast_functions(self._programs())

    def _functions(self, compiler: ConditionCompiler) -> tuple[FastFunction | None, ...]:
        """The fast functions; none until prepared, which the first call asks the compiler
        for (cel-cpp answers meanwhile: never a build on the request path)."""
        if self._fast is None:
            if not self._asked:
                self._asked = True
                compiler.build_soon(self.prepare)
            return ()
        return self._fast

    def evaluate(self, document: Any, *, exact: bool = False) -> list[Outcome]:
        """One outcome per expression, in order, for a `project`ed input that has passed
        `check_input`; `exact` when `check_input` found that cel-cpp converts it exactly
        (else the fast path looks for itself)."""
        compiler = self._compiler
        if compiler is None:
            raise RuntimeError("this ConditionSet came from another process: bind() it first")
        if self._layered is not None:
            return self._evaluate_layered(compiler, document, exact=exact)
        outcomes: list[Outcome] = []
        activation = None
        fast = self._functions(compiler)
        if fast and not exact and not clean_input(document):
            fast = ()
        chunks = self._programs()
        for index, chunk in enumerate(chunks):
            function = fast[index] if fast else None
            if function is not None:
                known = function(document)
                if UNKNOWN not in known:
                    outcomes.extend(known)
                    continue
            if activation is None and len(chunks) == 1:
                # The common case, kept lean: `data=` costs less than an Activation ...
                listed = _list_outcomes(chunk.program, data={"input": document})
            else:  # ... which converts the input once for all the chunks that need it
                if activation is None:
                    activation = compiler.activation(document)
                listed = _list_outcomes(chunk.program, activation)
            if listed is not None:
                outcomes.extend(listed)
                continue
            if activation is None:
                activation = compiler.activation(document)
            self._evaluate_failed(compiler, chunk, activation, outcomes)
        return outcomes

    def _evaluate_layered(
        self, compiler: ConditionCompiler, document: Any, *, exact: bool
    ) -> list[Outcome]:
        """`evaluate` of a set with dependencies: the fast path for the first layer where
        it answers, then fused programs for the rest (or all of them), and only when one
        fails, layer by layer (`_evaluate_layers`) from where it failed, on the same
        activation."""
        chunks = self._programs()  # restores `_layered` too
        layered = self._layered
        assert layered is not None
        layout = layered.layout
        done: list[Outcome] = []  # in evaluation order
        units = layered.fused
        fast = self._functions(compiler)
        exact = exact or (bool(fast) and clean_input(document))
        if fast and layered.rest and exact:
            first = layout.breaks[0]
            for index in range(sum(chunk.end <= first for chunk in chunks)):
                function = fast[index]
                known = () if function is None else function(document)
                if not known or UNKNOWN in known:
                    del done[:]
                    break
                done.extend(known)
            if done:
                units = layered.rest
                # The first layer is known: convert only what the others read.
                document = _view(document, layered.rest_fields)
        bindings = _Bindings(compiler, document, layered.blocks())
        names = layout.names
        for unit in units:
            here = bindings.get(unit.slot, {names[d]: done[d] is True for d in unit.reads})
            listed = _list_outcomes(unit.program, here)
            if listed is None or len(listed) != unit.end - unit.start:
                # The fallback goes on from the chunk this unit's first condition is in.
                del done[max(c.start for c in chunks if c.start <= unit.start) :]
                break
            done.extend(listed)
        if units and len(done) == len(layout.expressions):
            return layout.restore(done)
        return self._evaluate_layers(
            compiler, layered, chunks, bindings, document, done=done, exact=exact
        )

    def _evaluate_layers(
        self,
        compiler: ConditionCompiler,
        layered: _Layered,
        chunks: Sequence[_Chunk],
        bindings: _Bindings,
        document: Any,
        *,
        done: list[Outcome],
        exact: bool,
    ) -> list[Outcome]:
        """Chunk by chunk in layer order from where `done` (outcomes in evaluation order)
        ends, each chunk of a later layer with the outcomes it reads bound to `rules`
        (its slot). A condition one of whose dependencies errored errors too, naming it:
        it must not silently see `false` for a rule that could not be evaluated (its
        program saw `false` there, and its outcome is not kept)."""
        fast = self._functions(compiler)
        if fast and not exact and not clean_input(document):
            fast = ()
        layout = layered.layout
        names, depends = layout.names, layout.depends
        for index, chunk in enumerate(chunks):
            if chunk.start < len(done):
                continue
            unit = layered.fallback[index]
            if unit.slot:
                here = bindings.get(unit.slot, {names[d]: done[d] is True for d in unit.reads})
                program = unit.program
            else:
                function = fast[index] if fast else None
                if function is not None:
                    known = function(document)
                    if UNKNOWN not in known:
                        done.extend(known)
                        continue
                here, program = bindings.get(0), chunk.program
            listed = _list_outcomes(program, here)
            if listed is None:
                slot = _slot(unit.slot) if unit.slot else ""
                self._evaluate_failed(compiler, chunk, here, done, slot)
            else:
                done.extend(listed)
            for position in range(chunk.start, chunk.end) if unit.slot else ():
                for dependency in depends[position]:
                    if type(done[dependency]) is str:
                        done[position] = f"depends on rule {names[dependency]!r}, which errored"
                        break
        return layout.restore(done)

    def _evaluate_failed(
        self,
        compiler: ConditionCompiler,
        chunk: _Chunk,
        activation: Any,
        out: list[Outcome],
        slot: str = "",
    ) -> None:
        """Outcomes of a chunk whose program failed on this input (or could not be made).

        Every condition alone the first time (`_evaluate_alone`); meanwhile the chunk's
        other conditions, those that did not fail, are compiled into one program in the
        background (`_Chunk.build_rest`). Once it is there, an input that fails the same
        conditions costs one call for the others and one per failing condition (a rule
        that errors on every input, 1 of 50: 94 µs instead of 227 for 50 calls). With
        `slot`, a later layer's chunk, `rules` is bound to it in each program."""
        expressions = self.expressions if self._layout is None else self._layout.expressions
        rest = chunk.rest
        if rest is not None:
            failing, program = rest
            listed = _list_outcomes(program, activation)
            if listed is not None:
                others = iter(listed)
                for index in range(chunk.start, chunk.end):
                    if index in failing:
                        out.append(_evaluate_alone(compiler, expressions[index], activation, slot))
                    else:
                        out.append(next(others))
                return
        first = len(out)
        for expression in expressions[chunk.start : chunk.end]:
            out.append(_evaluate_alone(compiler, expression, activation, slot))
        if not chunk.rest_asked:
            chunk.rest_asked = True
            outcomes = enumerate(out[first:], chunk.start)
            failing = frozenset(i for i, outcome in outcomes if isinstance(outcome, str))
            compiler.build_soon(lambda: chunk.build_rest(compiler, expressions, failing, slot))


def _list_outcomes(
    program: Any | None, activation: Any = None, *, data: Mapping[str, Any] | None = None
) -> list[Outcome] | None:
    """A segment program's outcomes, or None when it cannot say them all: there is no
    program, a condition in it errored, or it spent the iteration budget as a whole."""
    if program is None:
        return None
    try:
        value = program.eval(activation) if data is None else program.eval(data=data)
    except RuntimeError:
        return None
    if value.type() == cel.Type.ERROR:
        return None
    outcomes: list[Outcome] = value.plain_value()
    return outcomes


def _evaluate_alone(
    compiler: ConditionCompiler, expression: str, activation: Any, slot: str = ""
) -> Outcome:
    """One condition of a chunk whose program failed on this input (or could not be
    made): its outcome, its error text, or why it is not a boolean.

    Alone, because a chunk's outcomes are all or nothing. Single programs compile in
    about 0.08 ms and the compiler keeps them; splitting the chunk in halves instead, down
    to the failing conditions, compiled ten times as much on the first failing request
    and held the event loop for it (259 ms for 300 conditions that all fail, 30 ms for one).
    With `slot`, `rules` is bound to it (`ConditionCompiler.bound_alone`).
    """
    try:
        program = compiler.bound_alone(expression, slot) if slot else compiler.compile(expression)
    except ConditionError as exc:  # accepted at load, so not expected: the rule's error
        return exc.message
    if program is None:  # checked at load (`ConditionCompiler._layered`), so not expected
        return "the condition is nested too deeply to read other rules' outcomes"
    return _evaluate_one(program, activation)


def _evaluate_one(program: Any, activation: Any) -> Outcome:
    """One condition's outcome, its error text, or why it is not a boolean."""
    try:
        value = program.eval(activation)
    except RuntimeError as exc:
        return _runtime_error_text(str(exc))
    kind = value.type()
    if kind == cel.Type.ERROR:
        return _runtime_error_text(str(value))
    if kind != cel.Type.BOOL:
        # Not converted: cel-expr-python 0.1.3's `plain_value()` of a null takes a
        # reference from None it never gave, and at zero Python 3.11 aborts (a batch of
        # `{"vip": null}` against `input.vip` killed the sidecar).
        return f"condition gave {kind.name().lower()}, not a boolean"
    result: bool = value.plain_value()
    return result


def _unbuilt(compiler: ConditionCompiler | None) -> tuple[()] | None:
    """A set's fast functions before `prepare`: to be built (None) when its compiler has
    the fast path on, none otherwise."""
    return None if compiler is not None and compiler.fast_path else ()


def _fast_functions(chunks: Sequence[_Chunk]) -> tuple[FastFunction | None, ...]:
    """Each chunk's fast function (None for a chunk with a condition outside the subset);
    empty when none applies."""
    functions: list[FastFunction | None] = []
    for chunk in chunks:
        function = None
        if chunk.program is not None:
            root = checked_expression(chunk.program.serialize()).root
            if root.kind == "list" and len(root.children) == chunk.end - chunk.start:
                function = build(root.children)
        functions.append(function)
    return tuple(functions) if any(f is not None for f in functions) else ()


def _condition_trees(
    chunks: Sequence[_Chunk], expressions: Sequence[str], compiler: ConditionCompiler | None
) -> tuple[Node | None, ...]:
    """Each condition's tree, from its chunk's program, else from its own program."""
    trees: list[Node | None] = [None] * len(expressions)
    for chunk in chunks:
        items: tuple[Node, ...] = ()
        if chunk.program is not None:
            root = checked_expression(chunk.program.serialize()).root
            if root.kind == "list" and len(root.children) == chunk.end - chunk.start:
                items = root.children
        for index in range(chunk.start, chunk.end):
            tree = unwrap_condition(items[index - chunk.start]) if items else None
            if tree is None and compiler is not None:
                try:
                    program = compiler.compile(expressions[index])
                except ConditionError:
                    continue
                tree = checked_expression(program.serialize()).root
            trees[index] = tree
    return tuple(trees)


class _Preparer:
    """Builds what requests should not wait for (sets' fast functions, programs for failed
    chunks) one at a time in a thread of its own, started when there is work and ended
    when there is none (so idle compilers hold no thread)."""

    def __init__(self) -> None:
        self._pending: deque[Callable[[], None]] = deque()
        self._lock = threading.Lock()
        self._running = False

    def add(self, build: Callable[[], None]) -> None:
        with self._lock:
            self._pending.append(build)
            if self._running:
                return
            self._running = True
        threading.Thread(target=self._run, name="prepare", daemon=True).start()

    def _run(self) -> None:
        while True:
            with self._lock:
                if not self._pending:
                    self._running = False
                    return
                build = self._pending.popleft()
            try:
                build()
            except Exception:  # cel-cpp answers without it; nothing is lost but speed
                logger.exception("a background build for a ruleset failed")


def _view(document: Any, fields: frozenset[str] | None) -> Any:
    """The part of the input that the given conditions read (all of it if unknown)."""
    if fields is None or type(document) is not dict:
        return document
    return {name: document[name] for name in fields if name in document}


@dataclass(frozen=True, slots=True)
class _Layout:
    """The evaluation order of a set whose conditions read other rules' outcomes.

    The conditions in layers (`sidecar.dependencies.layers`: each after those it
    reads), in the set's order within a layer; `order` maps each back to its place
    in the set. `breaks` are where layers start, which chunks never straddle: a chunk
    is one program, evaluated with the outcomes of the layers before it."""

    expressions: tuple[str, ...]
    order: tuple[int, ...]
    names: tuple[str, ...]
    depends: tuple[tuple[int, ...], ...]  # positions in this order
    breaks: tuple[int, ...]

    @classmethod
    def of(
        cls,
        expressions: Sequence[str],
        names: Sequence[str],
        dependencies: Sequence[tuple[int, ...]],
    ) -> _Layout:
        layer = layers(dependencies)
        order = tuple(sorted(range(len(expressions)), key=lambda i: (layer[i], i)))
        place = {index: position for position, index in enumerate(order)}
        breaks = tuple(p for p in range(1, len(order)) if layer[order[p]] != layer[order[p - 1]])
        return cls(
            expressions=tuple(expressions[i] for i in order),
            order=order,
            names=tuple(names[i] for i in order),
            depends=tuple(tuple(place[d] for d in dependencies[i]) for i in order),
            breaks=breaks,
        )

    def needs(self, start: int, end: int) -> tuple[int, ...]:
        """The positions whose outcomes the conditions at [start, end) read."""
        return tuple(sorted({d for p in range(start, end) for d in self.depends[p]}))

    def restore(self, values: Sequence[_V]) -> list[_V]:
        """Values in evaluation order, put back in the set's order."""
        restored: list[_V] = list(values)
        for value, index in zip(values, self.order, strict=True):
            restored[index] = value
        return restored

    def segments(self, start: int, end: int) -> list[tuple[int, int]]:
        """[start, end) cut where layers start."""
        cuts = [start, *(b for b in self.breaks if start < b < end), end]
        return list(itertools.pairwise(cuts))


_DONE: Final = "__done"  # the outcomes so far, inside a fused program


def _fused_text(layout: _Layout, start: int, end: int, slot: int) -> str:
    """One program for the conditions at [start, end) of `layout`, over several layers.

    The first layer's outcomes are a list bound to `__done`; each later layer sees `rules`
    bound (a comprehension variable hides the declared one) to a map of the outcomes it
    reads, and appends its own: `[[a, b]].map(__done, __done + [{"a": __done[0]}]
    .map(rules, [c])[0])[0]`. Outcomes from before `start` come from the slot variable
    (the whole program, then, in `[slot].map(rules, ...)` for the first layer). The
    value is the list of outcomes of [start, end), in order."""
    slot_name = _slot(slot) if slot else ""

    def read(position: int) -> str:
        if position >= start:
            return f"{_DONE}[{position - start}]"
        return f"{slot_name}[{json.dumps(layout.names[position])}]"

    _, *later = layout.segments(start, end)
    items = ",\n".join(map(_item, layout.expressions[start : later[0][0] if later else end]))
    text = f"[[{items}]]"
    for low, high in later:
        entries = ", ".join(
            f"{json.dumps(layout.names[p])}: {read(p)}" for p in layout.needs(low, high)
        )
        items = ",\n".join(map(_item, layout.expressions[low:high]))
        text += f".map({_DONE}, {_DONE} + [{{{entries}}}].map({RULES}, [{items}])[0])"
    text += "[0]"
    return f"[{slot_name}].map({RULES}, {text})[0]" if slot else text


@dataclass(frozen=True, slots=True)
class _Unit:
    """One program of a layered set's evaluation: the conditions at [start, end) of the
    layout (a fused run of layers, or a chunk of the fallback) with `rules` bound to
    slot `slot`, which holds the outcomes at `reads` (0: it reads none from before)."""

    start: int
    end: int
    slot: int
    reads: tuple[int, ...]
    program: Any | None  # a chunk's own program serves where None and `slot` is 0


@dataclass(frozen=True, slots=True)
class _Layered:
    """How a set with dependencies is evaluated: its fused programs (empty when they
    could not be made), or, where the fast path answered the first layer in Python, the
    fused programs of the others (`rest`, reading the first layer's outcomes from a
    slot); then, when one of them failed on an input (a condition errored), layer by
    layer (`fallback`, one unit per chunk), so that each error is attributed to exactly
    one rule and its dependents. All of it on one activation (`_Bindings`), so the input
    is converted once for every `_SLOTS` slots."""

    fused: tuple[_Unit, ...]
    rest: tuple[_Unit, ...]  # the layers after the first, once the fast path answered it
    fallback: tuple[_Unit, ...]
    slots: int
    layout: _Layout
    rest_fields: frozenset[str] | None  # the input fields the layers after the first read

    def blocks(self) -> tuple[tuple[str, ...], ...]:
        """The slot variables of each activation an evaluation may take."""
        names = [_slot(n) for n in range(1, self.slots + 1)]
        return tuple(tuple(names[i : i + _SLOTS]) for i in range(0, len(names), _SLOTS)) or ((),)

    def cost(self, conversion: float) -> float:
        """What it adds to the conditions' own worst case: each layer of a fused program
        (a map of the outcomes it reads, the outcomes so far copied), and the input
        converted again by each activation after the first that reads it (cel-cpp
        converts it when a program first reads it: a fused program that fails leaves it
        converted for the fallback). Of the two ways through (all fused, or the fast
        path's first layer and the rest fused), the costlier, each with the fallback
        that follows a fused program that failed."""
        return max(self._path_cost(self.fused, conversion), self._path_cost(self.rest, conversion))

    def _path_cost(self, fused: Sequence[_Unit], conversion: float) -> float:
        """`cost` of one way through: these fused programs, then the fallback."""
        layout = self.layout
        added = 0.0
        for unit in fused:
            for low, high in layout.segments(unit.start, unit.end)[1:]:
                added += layering_cost(low - unit.start, len(layout.needs(low, high)))
        block, reading = 0, set()
        for unit in (*fused, *self.fallback):
            block = max(block, (unit.slot - 1) // _SLOTS if unit.slot else 0)
            if input_fields(layout.expressions[unit.start : unit.end]) != frozenset():
                reading.add(block)
        return added + max(len(reading) - 1, 0) * conversion

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled with its programs serialized (see `ConditionSet.__reduce__`)."""
        programs = (_frozen(self.fused), _frozen(self.rest), _frozen(self.fallback))
        return (_Layered, (*programs, self.slots, self.layout, self.rest_fields))

    def restored(self, compiler: ConditionCompiler) -> _Layered:
        """The same, its programs deserialized by this process's compiler."""

        def restore(unit: _Unit) -> _Unit:
            if type(unit.program) is not bytes:
                return unit
            return replace(unit, program=compiler.deserialize(unit.program, bound=True))

        return _Layered(
            tuple(map(restore, self.fused)),
            tuple(map(restore, self.rest)),
            tuple(map(restore, self.fallback)),
            self.slots,
            self.layout,
            self.rest_fields,
        )


def _frozen(units: Sequence[_Unit]) -> tuple[_Unit, ...]:
    return tuple(
        unit
        if unit.program is None or type(unit.program) is bytes
        else replace(unit, program=unit.program.serialize())
        for unit in units
    )


class _Bindings:
    """The activation of one evaluation of a layered set: `get(slot, outcomes)` fills
    the slot's map, which cel-cpp converts when the program that reads it first does.
    A slot of the next `_SLOTS` takes a fresh activation (the input converted again)."""

    __slots__ = ("_activation", "_block", "_blocks", "_compiler", "_document", "_maps")

    def __init__(
        self, compiler: ConditionCompiler, document: Any, blocks: tuple[tuple[str, ...], ...]
    ) -> None:
        self._compiler = compiler
        self._document = document
        self._blocks = blocks
        self._block = -1
        self._activation: Any = None
        self._maps: dict[str, dict[str, bool]] = {}

    def get(self, slot: int, outcomes: Mapping[str, bool] | None = None) -> Any:
        block = max(self._block, (slot - 1) // _SLOTS if slot else 0)
        if block != self._block:
            self._block = block
            self._maps = {name: {} for name in self._blocks[block]}
            self._activation = self._compiler.bound_activation(self._document, self._maps)
        if slot and outcomes:
            self._maps[_slot(slot)].update(outcomes)
        return self._activation


def _unbound_set(  # noqa: PLR0917 (pickle calls it with positions)
    expressions: tuple[str, ...],
    serialized: tuple[tuple[int, int, bytes | None], ...],
    worst_cost: float,
    fields: frozenset[str] | None,
    layout: _Layout | None,
    layered: _Layered | None,
) -> ConditionSet:
    return ConditionSet(
        expressions,
        (),
        None,
        serialized=serialized,
        worst_cost=worst_cost,
        fields=fields,
        layout=layout,
        layered=layered,
    )


class _Chunk:
    """A slice of a ruleset's conditions with one program for the whole slice (None when
    the combined form cannot be made: its conditions are then evaluated alone)."""

    __slots__ = ("end", "program", "rest", "rest_asked", "start")

    def __init__(self, start: int, end: int, program: Any | None = None) -> None:
        self.start = start
        self.end = end
        self.program = program
        # After the program failed on an input: the conditions that failed, and one
        # program of the others (see `ConditionSet._evaluate_failed`).
        self.rest: tuple[frozenset[int], Any] | None = None
        self.rest_asked = False

    def build_rest(
        self,
        compiler: ConditionCompiler,
        expressions: Sequence[str],
        failing: frozenset[int],
        slot: str = "",
    ) -> None:
        """Compile the program of the conditions that did not fail, unless they are too
        long: cel-cpp compiles in one call that holds the interpreter, and the event
        loop waits meanwhile (60,000 characters: 280 ms; `_REST_CHARS` about 10 ms)."""
        others = [expressions[i] for i in range(self.start, self.end) if i not in failing]
        if not others or sum(map(len, others)) > _REST_CHARS:
            return
        program = compiler.compile_combined(others, slot)
        if program is not None:
            self.rest = (failing, program)


def _chunk_bounds(expressions: Sequence[str], breaks: Sequence[int] = ()) -> list[tuple[int, int]]:
    """Consecutive slices within cel-cpp's expression size limit (100,000 code points)
    and short enough that compiling one holds the interpreter only briefly, none across
    a break (where a layer of dependencies starts)."""
    bounds: list[tuple[int, int]] = []
    start, size = 0, 0
    cut = frozenset(breaks)
    for index, expression in enumerate(expressions):
        cost = len(expression) + 20  # the `((...)) ? true : false,` around each one
        full = index - start >= _CHUNK_CONDITIONS or size + cost > _CHUNK_CHARS
        if index > start and (full or index in cut):
            bounds.append((start, index))
            start, size = index, 0
        size += cost
    if start < len(expressions):
        bounds.append((start, len(expressions)))
    return bounds


# CEL string literals (raw and bytes prefixes, triple quotes), blanked out before looking
# for `input`, so that text inside a string is never mistaken for a field reference.
_STRING_LITERAL: Final = re.compile(
    r'[rRbB]{0,2}(?:"""[\s\S]*?"""'
    r"|'''[\s\S]*?'''"
    r'|"(?:\\.|[^"\\\n])*"'
    r"|'(?:\\.|[^'\\\n])*')"
)
# Any `input` not inside a longer name: `.input.amount` (root-scoped) reads the input
# too, and a `x.input` that is not the input only makes the projection keep more.
_INPUT_USE: Final = re.compile(r"(?<!\w)input\b(\s*\.\s*([A-Za-z_]\w*)(\s*\()?)?")


def input_fields(expressions: Sequence[str]) -> frozenset[str] | None:
    """Top-level input fields the expressions read, or None when one uses `input` as a
    whole (`input.size()`, `input[key]`, `x in input`, a macro variable named input)."""
    fields: set[str] = set()
    for expression in expressions:
        if "//" in expression:
            # A comment can hold quotes that the string pattern pairs across lines (three
            # single quotes after `//`), hiding a field read: keep the whole input.
            return None
        for use in _INPUT_USE.finditer(_STRING_LITERAL.sub('""', expression)):
            field, call = use.group(2), use.group(3)
            if field is None or call is not None:
                return None
            fields.add(field)
    return frozenset(fields)

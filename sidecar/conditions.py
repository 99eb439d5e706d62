"""CEL conditions: compiled once, evaluated with bounded cost.

The expression language is CEL through `cel-expr-python` (cel-cpp): it type-checks at
compile time, reports errors with line:column, and stops runaway comprehensions with an
iteration budget, so no rule and no input can freeze the sidecar.

Why a ruleset is compiled into one program: converting the input document and crossing
into C++ costs more than evaluating a typical condition, so the enabled conditions of a
ruleset become one CEL list expression and the input is converted once per evaluation.
When that program fails (some condition errored on this input), each condition is
evaluated on its own so that every error is attributed to exactly one rule.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from cel_expr_python import cel
from cel_expr_python.ext import ext_math, ext_strings

from sidecar.errors import InputError

__all__ = [
    "DEFAULT_INPUT_LIMITS",
    "ConditionCompiler",
    "ConditionError",
    "ConditionSet",
    "ConditionSetError",
    "InputLimits",
    "Outcome",
    "check_input",
]

# The binding reports errors as "ERROR: <input>:LINE:COL: message" followed by a snippet.
_ERROR_RE: Final = re.compile(r"ERROR: <input>:(-?\d+):(-?\d+): ([^\n]*)")
_STATUS_PREFIX_RE: Final = re.compile(r"^[A-Z_]+: ")
_STATUS_SUFFIX_RE: Final = re.compile(r" \[[A-Z_]+\]$")
_INT64_MIN: Final = -(2**63)
_INT64_MAX: Final = 2**63 - 1


class ConditionError(Exception):
    """A condition that does not compile: message plus position inside the expression."""

    def __init__(self, message: str, *, line: int = 1, column: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.line = line
        self.column = column


@dataclass(frozen=True, slots=True, kw_only=True)
class InputLimits:
    """Bounds on an evaluation input, checked before CEL sees it.

    cel-cpp builds `map()`/`filter()` results in quadratic time, so list size is what
    bounds the cost of a rule over user-supplied lists (1,000 items: ~20 ms worst case).
    """

    max_depth: int = 32
    max_items: int = 1_000
    max_string_length: int = 65_536


DEFAULT_INPUT_LIMITS: Final = InputLimits()


def _check_scalar(value: Any, path: str, limits: InputLimits) -> None:
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InputError("NaN and infinities are not JSON numbers", path=path)
        return
    if isinstance(value, int):
        if not _INT64_MIN <= value <= _INT64_MAX:
            raise InputError("integer does not fit in 64 bits", path=path)
    elif isinstance(value, str):
        if len(value) > limits.max_string_length:
            raise InputError(f"string longer than {limits.max_string_length} characters", path=path)
    else:
        raise InputError(f"{type(value).__name__} is not a JSON value", path=path)


def check_input(document: Any, limits: InputLimits = DEFAULT_INPUT_LIMITS) -> None:
    """Reject inputs CEL cannot take or that break the limits, naming the JSON path."""
    stack: list[tuple[Any, str, int]] = [(document, "$", 1)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, dict | list) and depth > limits.max_depth:
            raise InputError(f"nested deeper than {limits.max_depth} levels", path=path)
        if isinstance(value, dict):
            if len(value) > limits.max_items:
                raise InputError(f"object has more than {limits.max_items} keys", path=path)
            for key, item in value.items():
                if not isinstance(key, str):
                    raise InputError("object keys must be strings", path=path)
                if len(key) > limits.max_string_length:
                    message = f"key longer than {limits.max_string_length} characters"
                    raise InputError(message, path=path)
                stack.append((item, f"{path}.{key}", depth + 1))
        elif isinstance(value, list):
            if len(value) > limits.max_items:
                raise InputError(f"list has more than {limits.max_items} items", path=path)
            stack.extend((item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value))
        else:
            _check_scalar(value, path, limits)


def _parse_cel_error(text: str) -> ConditionError:
    """Turn the binding's status text into a message and a position."""
    found = _ERROR_RE.search(text)
    if found is None:
        message = _STATUS_SUFFIX_RE.sub("", _STATUS_PREFIX_RE.sub("", text.strip()))
        return ConditionError(message)
    line, column = int(found.group(1)), int(found.group(2))
    return ConditionError(found.group(3).strip(), line=max(line, 1), column=max(column, 1))


def _runtime_error_text(text: str) -> str:
    return _STATUS_SUFFIX_RE.sub("", _STATUS_PREFIX_RE.sub("", text.strip()))


# What one condition gave for one input: True/False, or the error text.
Outcome = bool | str


class ConditionCompiler:
    """Owns the CEL environment and the cache of compiled single expressions.

    One compiler lives as long as the loader, so an expression used by many rules, or
    unchanged across reloads, is compiled once. Thread-safe: the cache is filled under a
    lock, and compiled programs are immutable.
    """

    def __init__(self) -> None:
        self._env = cel.NewEnv(
            variables={"input": cel.Type.DYN},
            extensions=[ext_strings.ExtStrings(), ext_math.ExtMath()],
        )
        self._cache: dict[str, Any] = {}
        self._lock = threading.Lock()

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
        with self._lock:
            self._cache.setdefault(expression, program)
        return program

    def compile_set(self, expressions: Sequence[str]) -> ConditionSet:
        """Compile the conditions of one ruleset into one program.

        Raises `ConditionSetError` listing every expression that does not compile.
        """
        combined = self._compile_combined(expressions)
        if combined is None:
            errors: dict[int, ConditionError] = {}
            for index, expression in enumerate(expressions):
                try:
                    self.compile(expression)
                except ConditionError as exc:
                    errors[index] = exc
            if errors:
                raise ConditionSetError(errors)
        return ConditionSet(tuple(expressions), combined, self)

    def forget_unused(self, keep: set[str]) -> None:
        """Drop cached programs no live ruleset uses, so memory follows the registry."""
        with self._lock:
            for expression in [e for e in self._cache if e not in keep]:
                del self._cache[expression]

    def activation(self, document: Any) -> Any:
        return self._env.Activation(data={"input": document})

    def _compile_combined(self, expressions: Sequence[str]) -> Any | None:
        # `(c) ? true : false` makes a non-boolean condition a compile error here and a
        # runtime error later, so the list is always list(bool).
        if not expressions:
            return None
        source = "[" + ",\n".join(f"(({e})) ? true : false" for e in expressions) + "]"
        try:
            return self._env.compile(source)
        except RuntimeError:
            # A bad condition, or a nesting depth only the combined form exceeds: the
            # caller finds out which by compiling each expression on its own.
            return None


class ConditionSetError(Exception):
    """Conditions of one ruleset that failed to compile, by position in the set."""

    def __init__(self, errors: Mapping[int, ConditionError]) -> None:
        super().__init__(f"{len(errors)} condition(s) do not compile")
        self.errors = dict(errors)


class ConditionSet:
    """The compiled conditions of one ruleset, evaluated together against one input."""

    __slots__ = ("_combined", "_compiler", "expressions")

    def __init__(
        self, expressions: tuple[str, ...], combined: Any | None, compiler: ConditionCompiler
    ) -> None:
        self.expressions = expressions
        self._combined = combined
        self._compiler = compiler

    def evaluate(self, document: Any) -> list[Outcome]:
        """One outcome per expression, in order. The input must have passed `check_input`."""
        if not self.expressions:
            return []
        if self._combined is not None:
            try:
                value = self._combined.eval(data={"input": document})
            except RuntimeError:
                value = None  # iteration budget spent by the set as a whole
            if value is not None and value.type() != cel.Type.ERROR:
                outcomes: list[Outcome] = value.plain_value()
                return outcomes
        return self._evaluate_each(document)

    def _evaluate_each(self, document: Any) -> list[Outcome]:
        activation = self._compiler.activation(document)
        outcomes: list[Outcome] = []
        for expression in self.expressions:
            program = self._compiler.compile(expression)
            try:
                value = program.eval(activation)
            except RuntimeError as exc:
                outcomes.append(_runtime_error_text(str(exc)))
                continue
            if value.type() == cel.Type.ERROR:
                outcomes.append(_runtime_error_text(str(value)))
                continue
            result = value.plain_value()
            if isinstance(result, bool):
                outcomes.append(result)
            else:
                outcomes.append(f"condition gave {value.type().name().lower()}, not a boolean")
        return outcomes

"""Benchmark: the CEL cost limit, against the worst conditions it accepts.

What it measures (in-process, `sidecar.conditions.ConditionCompiler` with its defaults):

1. Refused: the reported chain (`input.s.replace('a','aaaaaaaaaa')` eight times, 17 s
   and 2.1 GB per evaluation before the limit) and other growth, with the message a rule
   author gets and the time the refusal takes.
2. Accepted, near the limit: for each kind of cost (quadratic `map()`, RE2 falling back
   to its NFA, `replace()`, naive substring search, deep equality, loops at the
   iteration budget, ...) the costliest condition the limit accepts, evaluated on the
   worst input this script knows for it, within `InputLimits` (64 KiB strings, 1,000
   items, 1 MiB in all). Each row: the estimate, and the measured evaluation time
   (`program.eval(data=...)`, input conversion included; best and median of 5), and
   apart the conversion of that input into CEL values (a condition reading no field).
3. Load: the time pricing adds per condition (decoding the checked expression and
   estimating), beside compiling, on the generated conditions of `bench/load.py`.

Run (from the repository root):

    .venv/bin/python -m bench.cel_cost            # about 30 s
    .venv/bin/python -m bench.cel_cost --quick    # fewer rounds, a smaller load, < 15 s
"""

from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

from sidecar.celwire import checked_expression
from sidecar.conditions import ConditionCompiler, ConditionError, check_input
from sidecar.cost import DEFAULT_COST_LIMIT, estimate, estimate_items

from ._common import code_digest
from ._gen import generate_rules

_STRING = 65_536


def _ab_text(size: int) -> str:
    rng = random.Random(1)
    return "".join(rng.choice("ab") for _ in range(size))


def _largest(template: Callable[[int], str], compiler: ConditionCompiler, top: int) -> int:
    """The largest n in 1..top for which template(n) is accepted."""
    best = 0
    for n in range(1, top + 1):
        try:
            compiler.compile(template(n))
        except ConditionError:
            break
        best = n
    return best


def _cases(compiler: ConditionCompiler) -> list[tuple[str, str, Any]]:
    ab = _ab_text(_STRING)
    repeat = _largest(lambda n: f"input.s.matches('a[ab]{{{n}}}c')", compiler, 200)
    factor = _largest(lambda n: f"input.s.replace('a', '{'a' * n}') != ''", compiler, 400)
    nested = [[0] * 1000 for _ in range(500)]
    return [
        ("map() over 1,000 items", "input.l.map(x, x * 2).size() > 0", {"l": list(range(1000))}),
        (
            "filter() over 1,000 items",
            "input.l.filter(x, x >= 0).size() > 0",
            {"l": list(range(1000))},
        ),
        (
            f"regex, NFA fallback: a[ab]{{{repeat}}}c",
            f"input.s.matches('a[ab]{{{repeat}}}c')",
            {"s": ab},
        ),
        (
            f"replace() x{factor}",
            f"input.s.replace('a', '{'a' * factor}') != ''",
            {"s": "a" * _STRING},
        ),
        (
            "replace() x10 twice",
            "input.s.replace('a', 'aaaaaaaaaa').replace('a', 'aaaaaaaaaa') != ''",
            {"s": "a" * _STRING},
        ),
        (
            "contains() with a needle from the input",
            "input.a.contains(input.b)",
            {"a": "a" * _STRING, "b": "a" * (_STRING // 2 - 1) + "b"},
        ),
        (
            "string + tree of 16",
            "((((input.s + input.s) + (input.s + input.s)) + ((input.s + input.s) + (input.s"
            " + input.s))) + (((input.s + input.s) + (input.s + input.s)) + ((input.s + "
            "input.s) + (input.s + input.s)))) != ''",
            {"s": "a" * _STRING},
        ),
        (
            "deep equality of two 500x1000 lists",
            "input.a == input.b",
            {"a": nested, "b": [list(row) for row in nested]},
        ),
        (
            "nested loops up to the iteration budget",
            "input.l.all(x, input.l.all(y, x * y >= 0))",
            {"l": list(range(1000))},
        ),
        (
            "example rule: links x lowerAscii() x contains()",
            "input.links.exists(u, ['scam-wallet.io', 'free-nitro.gift', 'login-verify.app']"
            ".exists(d, u.lowerAscii().contains('://' + d) || u.lowerAscii().contains('.' + d)))",
            {"links": ["A" * _STRING] * 15},
        ),
        (
            "example rule: regex on a 64 KiB text",
            r"input.text.matches('(?i)(whats\\s?app|telegram|signal)\\W{0,3}\\+?[0-9][0-9 ]{6,}')",
            {"text": "whatsapp +1 " * (_STRING // 12)},
        ),
        (
            "join() of 1,000 x 1,000 characters",
            "input.l.join(',') != ''",
            {"l": ["a" * 1000] * 1000},
        ),
        ("split('') of 64 KiB", "input.s.split('').size() > 0", {"s": "a" * _STRING}),
        (
            "'%s'.format() of 1,000 x 1,000",
            "'%s'.format([input.l]) != ''",
            {"l": ["a" * 1000] * 1000},
        ),
    ]


def _time(program: Any, document: Any, rounds: int) -> list[float]:
    runs = []
    for _ in range(rounds):
        started = time.perf_counter()
        with contextlib.suppress(RuntimeError):  # the iteration budget: an error outcome
            program.eval(data={"input": document})
        runs.append(time.perf_counter() - started)
    return runs


def _refused(compiler: ConditionCompiler) -> None:
    print("1. Refused at load")
    for expression in (
        "input.s" + ".replace('a','aaaaaaaaaa')" * 8 + ".size() > 0",
        "input.s.matches(input.pattern)",
        "input.l.map(x, input.l.map(y, y)).size() > 0",
    ):
        started = time.perf_counter()
        try:
            compiler.compile(expression)
            print(f"   ACCEPTED?! {expression}")
        except ConditionError as exc:
            spent = (time.perf_counter() - started) * 1e3
            print(f"   {expression[:70]}...\n      {exc.line}:{exc.column} {exc.message}")
            print(f"      (refused in {spent:.1f} ms)")


def _accepted(compiler: ConditionCompiler, rounds: int) -> None:
    print(f"\n2. Accepted near the limit ({DEFAULT_COST_LIMIT / 1e6:.0f} ms of estimate)")
    print(f"   {'case':52} {'estimate':>10} {'best':>9} {'median':>9} {'of which input':>15}")
    worst = 0.0
    for name, expression, document in _cases(compiler):
        check_input(document)
        program = compiler.compile(expression)
        cost = estimate(program.serialize(), compiler._bounds)
        runs = _time(program, document, rounds)
        # Reading any field converts the whole input into CEL values: paid once per
        # input and chunk whatever the condition, so shown apart.
        conversion = statistics.median(_time(compiler.compile("has(input.zz)"), document, rounds))
        worst = max(worst, statistics.median(runs) - conversion)
        print(
            f"   {name[:52]:52} {cost / 1e6:8.1f} ms {min(runs) * 1e3:6.1f} ms"
            f" {statistics.median(runs) * 1e3:6.1f} ms {conversion * 1e3:12.1f} ms"
        )
    print(f"   worst median, input conversion left out: {worst * 1e3:.1f} ms")


def _load(count: int) -> None:
    """Compiling the chunks' programs against pricing them (decode + estimate)."""
    expressions = [rule.condition for i in range(count // 100) for rule in generate_rules(i)]
    compiler = ConditionCompiler()
    chunks = [expressions[i : i + 100] for i in range(0, len(expressions), 100)]
    started = time.perf_counter()
    programs = [compiler.compile_combined(chunk) for chunk in chunks]
    compiling = time.perf_counter() - started
    started = time.perf_counter()
    for program in programs:
        estimate_items(checked_expression(program.serialize()), compiler._bounds)
    pricing = time.perf_counter() - started
    print(f"\n3. Load: {len(expressions):,} generated conditions (bench/_gen.py), chunks of 100")
    print(f"   compile {compiling / len(expressions) * 1e6:.0f} us per condition")
    print(f"   price   {pricing / len(expressions) * 1e6:.0f} us per condition")
    body = " || ".join(f"input.x{i} == {i}" for i in range(1500))
    nested = "[1].all(a, [1].all(b, [1].all(c, [1].all(d, [1].all(e, [1].all(f, "
    expression = nested + body + "))))))"
    started = time.perf_counter()
    ConditionCompiler().compile(expression)
    print(
        f"   one condition of {len(expression):,} characters, 6 nested all() around 1,500"
        f" comparisons: compiled and priced in {(time.perf_counter() - started) * 1e3:.0f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds, smaller load")
    quick = parser.parse_args().quick
    print(f"bench.cel_cost  code {code_digest()}")
    compiler = ConditionCompiler()
    _refused(compiler)
    _accepted(compiler, rounds=2 if quick else 5)
    _load(500 if quick else 5000)


if __name__ == "__main__":
    main()

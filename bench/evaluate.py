"""Benchmark: evaluating one 50-rule ruleset per input, in-process.

What it measures (ruleset and inputs from `bench/_gen.py`: 50 rules, 2 decision bands,
varied transaction documents of ~30 JSON values each, none of which makes a rule error):

1. Fast path, single input: `sidecar.engine.evaluate(snapshot, ruleset_id, input)`,
   each call timed on its own; distribution over all calls (and the mean per input of
   each pass over all inputs).                                  Target: < 30 us per input.
2. Fast path, batch: `evaluate_many(snapshot, ruleset_id, batch_of_100)`, time per batch
   divided by 100; distribution over batches.                 Target: < 30 us per input.
   Rounds of 1 and 2 are interleaved so that load from other processes hits both alike.
3. Where a fast-path evaluation spends its time, by timing the underlying functions on the
   same inputs: `check_input` (input limits walk), `ConditionSet.evaluate` (one combined
   CEL program: input conversion + 50 conditions + `plain_value`), the raw combined
   program `eval(data=...)` alone, and the rest (matches, totals, `Evaluation`).
4. Slow path: the same 50 rules with one condition replaced by one that errors on every
   input (it reads a field the application never sends), so the combined program fails
   and every condition is evaluated on its own to attribute the error. First call (fills
   the compiler's single-expression cache) and steady state.
5. Reference: the same 50 conditions as 50 separately compiled CEL programs, each called
   with `.eval(data={"input": ...})` (via `cel_expr_python` directly, plain environment),
   and the same with one shared `Activation`, to show what compiling a ruleset into one
   program buys.
6. Input size: the same inputs with an unused 200-item list added, through a program
   that reads no field, one that reads one field, the combined program, `check_input` and
   `evaluate()` (shows whether input conversion costs by document size or by use).
7. Counting: `evaluate()` with and without `DecisionTallies.count` (the stats endpoint's
   and per-rule metrics' counts), interleaved.                  Target: HTTP >= 0.95x.
8. Dependencies (`--dependencies`, or alone with `--only-dependencies`): the same 50
   rules, of which the last 10 are replaced by combinations of other rules' outcomes
   (`rules["a"] && !rules["b"]`, reading no input: each later layer that reads the input
   converts it again, which the ruleset's cost limit allows once at most), in 2 and in
   4 layers, against the 50 rules without; `evaluate()` per input, interleaved.

Timings are wall-clock `time.perf_counter` in microseconds; medians with p10/p90 and
min/max; the collector stays on (as in service), `gc.collect()` between phases.

Run (from the repository root):

    /work/venv/bin/python -m bench.evaluate            # default, about 40 s
    /work/venv/bin/python -m bench.evaluate --quick    # fewer inputs and rounds, < 20 s
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from cel_expr_python import cel

from bench._common import describe, environment, fmt_us
from bench._gen import GeneratedRule, generate_rules, render_file, ruleset_id, sample_input
from sidecar.conditions import ConditionCompiler, check_input
from sidecar.engine import evaluate, evaluate_many
from sidecar.errors import LoadError
from sidecar.loader import Loader
from sidecar.snapshot import Snapshot
from sidecar.tallies import DecisionTallies

TARGET_US = 30.0
RULES = 50
BATCH = 100
ERRORING_RULE = 17  # which rule the slow-path ruleset breaks
ERRORING_CONDITION = "input.risk.score > 0.5"  # `risk` is never in the input
RULESET = ruleset_id(0)
PADDING = 200  # items of the unused list added in section 6

Doc = dict[str, Any]


def build_snapshots() -> tuple[Snapshot, Snapshot]:
    """(fast ruleset, same ruleset with one rule erroring on every input)."""
    rules = generate_rules(0, RULES)
    fast = Loader().load([render_file(0, rules)]).snapshot
    broken = list(rules)
    broken[ERRORING_RULE] = replace(broken[ERRORING_RULE], condition=ERRORING_CONDITION)
    slow = Loader().load([render_file(0, broken)]).snapshot
    for snapshot in (fast, slow):  # as the first evaluation has the compiler do
        for ruleset in snapshot.rulesets.values():
            ruleset.plan.conditions.prepare()
    return fast, slow


def per_call_us(
    function: Callable[[Doc], Any], documents: Sequence[Doc], rounds: int
) -> list[float]:
    """Each call timed on its own, in microseconds."""
    clock = time.perf_counter
    samples: list[float] = []
    gc.collect()
    for _ in range(rounds):
        for document in documents:
            started = clock()
            function(document)
            samples.append((clock() - started) * 1e6)
    return samples


def per_round_mean_us(
    function: Callable[[Doc], Any], documents: Sequence[Doc], rounds: int
) -> list[float]:
    """Mean microseconds per input of each pass over all documents."""
    clock = time.perf_counter
    means: list[float] = []
    gc.collect()
    for _ in range(rounds):
        started = clock()
        for document in documents:
            function(document)
        means.append((clock() - started) * 1e6 / len(documents))
    return means


def per_batch_us(snapshot: Snapshot, documents: Sequence[Doc], rounds: int) -> list[float]:
    """`evaluate_many` of BATCH inputs, microseconds per input, one sample per batch."""
    clock = time.perf_counter
    batches = [documents[i : i + BATCH] for i in range(0, len(documents) - BATCH + 1, BATCH)]
    samples: list[float] = []
    gc.collect()
    for _ in range(rounds):
        for batch in batches:
            started = clock()
            evaluate_many(snapshot, RULESET, batch)
            samples.append((clock() - started) * 1e6 / len(batch))
    return samples


def private(owner: Any, name: str) -> Any:
    """A private attribute of the engine, measured for reference; None if it moved."""
    value = getattr(owner, name, None)
    if value is None:
        print(f"  NOTE: {type(owner).__name__}.{name} not found in this sidecar version")
    return value


def interleaved_samples(
    functions: dict[str, Callable[[Doc], Any] | None], documents: Sequence[Doc], rounds: int
) -> dict[str, list[float]]:
    """Per-call us of each function, rounds interleaved so drift hits all alike.

    A None function (an internal this sidecar version lacks) gets no samples.
    """
    samples: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(rounds):
        for name, function in functions.items():
            if function is not None:
                samples[name].extend(per_call_us(function, documents, 1))
    return samples


def interleaved_medians(
    functions: dict[str, Callable[[Doc], Any] | None], documents: Sequence[Doc], rounds: int
) -> dict[str, float]:
    """Median us per call of each function (NaN for a missing one), rounds interleaved."""
    samples = interleaved_samples(functions, documents, rounds)
    return {name: statistics.median(v) if v else math.nan for name, v in samples.items()}


def print_parts(parts: dict[str, float], total: float) -> None:
    for name, value in parts.items():
        print(f"  {name:<52} {value:7.2f} us  {value / total * 100:5.1f}%")


def bench_fast(fast: Snapshot, documents: Sequence[Doc], rounds: int) -> None:
    """Sections 1-3."""
    # Single calls, per-round means and batches interleaved round by round, so that load
    # from other processes on this box hits all three alike.
    single: list[float] = []
    means: list[float] = []
    batch: list[float] = []
    for _ in range(rounds):
        single.extend(per_call_us(lambda d: evaluate(fast, RULESET, d), documents, 1))
        means.extend(per_round_mean_us(lambda d: evaluate(fast, RULESET, d), documents, 1))
        batch.extend(per_batch_us(fast, documents, 1))
    print("\n[1] fast path, single input: evaluate(snapshot, id, input)")
    print(f"  per call          {fmt_us(single, TARGET_US)}")
    print(f"  mean per round    {fmt_us(means, TARGET_US)}")
    print(f"\n[2] fast path, batch: evaluate_many of {BATCH} inputs (us per input)")
    print(f"  per input         {fmt_us(batch, TARGET_US)}")

    print("\n[3] where a fast-path evaluation goes (median us per call, parts interleaved)")
    ruleset = fast.rulesets[RULESET]
    conditions = ruleset.plan.conditions
    combined = private(conditions, "_chunks")[
        0
    ].program  # the one CEL program (50 rules: one chunk)
    cel_only = ConditionCompiler(fast_path=False).compile_set(conditions.expressions)
    parts = interleaved_medians(
        {
            "evaluate() total": lambda d: evaluate(fast, RULESET, d),
            "check_input (input limits walk)": check_input,
            "project (keep the fields the conditions read)": conditions.project,
            # As evaluate() calls it: check_input has said whether the input is exact.
            "ConditionSet.evaluate (CEL + plain_value)": (
                lambda d: conditions.evaluate(conditions.project(d), exact=True)
            ),
            "  the same, with its own walk of the input (exact=False)": (
                lambda d: conditions.evaluate(conditions.project(d))
            ),
            "  the same, RULE_SIDECAR_FAST_PATH=false": (
                lambda d: cel_only.evaluate(cel_only.project(d))
            ),
            "  raw combined.eval(data=...)": (
                (lambda d: combined.eval(data={"input": conditions.project(d)}))
                if combined
                else None
            ),
        },
        documents,
        rounds,
    )
    parts["rest: lookup, matches, totals, Evaluation (difference)"] = (
        parts["evaluate() total"]
        - parts["check_input (input limits walk)"]
        - parts["ConditionSet.evaluate (CEL + plain_value)"]
    )
    print_parts(parts, parts["evaluate() total"])
    raw = parts["  raw combined.eval(data=...)"]
    walked = parts["  the same, with its own walk of the input (exact=False)"]
    print(
        f"  ConditionSet.evaluate / raw combined call: "
        f"{parts['ConditionSet.evaluate (CEL + plain_value)'] / raw:.2f}x with the fast path "
        f"({walked / raw:.2f}x with its own walk), "
        f"{parts['  the same, RULE_SIDECAR_FAST_PATH=false'] / raw:.2f}x without"
    )
    firsts: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(5):
        for fast_path in (True, False):
            fresh = ConditionCompiler(fast_path=fast_path).compile_set(conditions.expressions)
            started = time.perf_counter()
            fresh.prepare()
            firsts[fast_path].append((time.perf_counter() - started) * 1e3)
    print(
        "  prepare() of a freshly compiled set (builds the fast path, in a thread after "
        "its first evaluation): "
        f"{statistics.median(firsts[True]):.1f} ms, without the fast path "
        f"{statistics.median(firsts[False]):.1f} ms (median of 5)"
    )


def bench_slow(fast: Snapshot, slow: Snapshot, documents: Sequence[Doc], rounds: int) -> None:
    """Section 4."""
    print(f"\n[4] slow path: rule {ERRORING_RULE} is {ERRORING_CONDITION!r}, errors on every input")
    started = time.perf_counter()
    first = evaluate(slow, RULESET, documents[0])
    first_ms = (time.perf_counter() - started) * 1e3
    print(
        f"  first call (compiles each failing chunk's conditions alone): {first_ms:.1f} ms; "
        f"errors reported: {[e.rule_id for e in first.errors]}"
    )
    samples = interleaved_samples(
        {
            "slow": lambda d: evaluate(slow, RULESET, d),
            "fast": lambda d: evaluate(fast, RULESET, d),
        },
        documents,
        rounds,
    )
    print(f"  per call          {fmt_us(samples['slow'], TARGET_US)}")
    slow_us, fast_us = (describe(samples[k])["median"] for k in ("slow", "fast"))
    print(f"  slow / fast path: {slow_us / fast_us:.1f}x (fast path {fast_us:.2f} us, same rounds)")
    conditions = slow.rulesets[RULESET].plan.conditions
    combined = private(conditions, "_chunks")[0].program
    parts = interleaved_medians(
        {
            "evaluate() total": lambda d: evaluate(slow, RULESET, d),
            "ConditionSet.evaluate": lambda d: conditions.evaluate(conditions.project(d)),
            "  combined.eval(data=...) that gives the error": (
                (lambda d: combined.eval(data={"input": conditions.project(d)}))
                if combined
                else None
            ),
        },
        documents,
        max(rounds // 3, 1),
    )
    print_parts(parts, parts["evaluate() total"])


def bench_reference(fast: Snapshot, documents: Sequence[Doc], rounds: int) -> None:
    """Section 5."""
    print(f"\n[5] reference: the {RULES} conditions as {RULES} separately compiled CEL programs")
    env = cel.NewEnv(variables={"input": cel.Type.DYN})
    programs = [env.compile(rule.condition) for rule in fast.rulesets[RULESET].plan.rules]

    def each_with_data(document: Doc) -> None:
        for program in programs:
            program.eval(data={"input": document})

    def each_with_activation(document: Doc) -> None:
        activation = env.Activation(data={"input": document})
        for program in programs:
            program.eval(activation)

    samples = interleaved_samples(
        {
            "data": each_with_data,
            "activation": each_with_activation,
            "sidecar": lambda d: evaluate(fast, RULESET, d),
        },
        documents,
        rounds,
    )
    print(f"  {RULES} x .eval(data=...)        {fmt_us(samples['data'], TARGET_US)}")
    print(f"  {RULES} x .eval(one Activation)  {fmt_us(samples['activation'], TARGET_US)}")
    print(f"  sidecar evaluate(), same rounds {fmt_us(samples['sidecar'], TARGET_US)}")
    data_us, activation_us, sidecar_us = (
        describe(samples[k])["median"] for k in ("data", "activation", "sidecar")
    )
    print(
        f"  sidecar evaluate() is {data_us / sidecar_us:.1f}x faster than {RULES} x eval(data=) "
        f"and {activation_us / sidecar_us:.1f}x faster than {RULES} x eval(Activation)"
    )


def bench_input_size(fast: Snapshot, documents: Sequence[Doc], rounds: int) -> None:
    """Section 6: what the input document's size costs, used by a rule or not."""
    print(f"\n[6] input size: the same inputs plus an unused {PADDING}-item list (median us)")
    padded = [dict(d, unused_history=[f"event-{i}" for i in range(PADDING)]) for d in documents]
    env = cel.NewEnv(variables={"input": cel.Type.DYN})
    nothing = env.compile("true")
    one_field = env.compile("input.amount > 1.0")
    combined = private(fast.rulesets[RULESET].plan.conditions, "_chunks")[0].program
    functions: dict[str, Callable[[Doc], Any]] = {
        "program `true` (reads no field), eval(data=)": lambda d: nothing.eval(data={"input": d}),
        "program `input.amount > 1.0`, eval(data=)": lambda d: one_field.eval(data={"input": d}),
        "check_input": check_input,
        "evaluate()": lambda d: evaluate(fast, RULESET, d),
    }
    if combined is not None:
        functions["combined 50-rule program, eval(data=)"] = lambda d: combined.eval(
            data={"input": d}
        )
    for name, function in functions.items():
        plain = statistics.median(per_call_us(function, documents, rounds))
        bigger = statistics.median(per_call_us(function, padded, rounds))
        print(f"  {name:<48} {plain:7.2f} -> {bigger:7.2f} us  ({bigger - plain:+.2f})")


def bench_counting(fast: Snapshot, documents: Sequence[Doc], rounds: int) -> None:
    """Section 7: what counting each evaluation for the stats and per-rule metrics adds
    (`DecisionTallies.count`, on every evaluation the API answers)."""
    print("\n[7] counting: DecisionTallies.count after each evaluate(), interleaved rounds")
    ruleset = fast.rulesets[RULESET]
    tallies = DecisionTallies()
    tallies.retain(fast)

    def counted(document: Doc) -> None:
        tallies.count(ruleset, evaluate(fast, RULESET, document))

    def plain(document: Doc) -> None:
        evaluate(fast, RULESET, document)

    medians = interleaved_medians({"off": plain, "on": counted}, documents, rounds)
    off, on = medians["off"], medians["on"]
    print(f"  evaluate()                  {off:7.2f} us")
    print(f"  evaluate() + count          {on:7.2f} us  (+{on - off:.2f} us)")
    print(
        f"  throughput with counting: {off / on:.3f}x of without, in-process (target >= 0.95x "
        "over HTTP, where a request costs several times an evaluation: a lower bound)"
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer inputs and rounds")
    parser.add_argument("--dependencies", action="store_true", help="also section 8")
    parser.add_argument("--only-dependencies", action="store_true", help="section 8 alone")
    args = parser.parse_args(argv)
    inputs, rounds, reference_inputs, reference_rounds = (
        (500, 3, 100, 2) if args.quick else (2_000, 15, 500, 3)
    )

    print(f"bench.evaluate — {environment()}")
    fast, slow = build_snapshots()
    documents = [sample_input(i) for i in range(inputs)]
    if args.only_dependencies:
        bench_dependencies(fast, documents, rounds)
        return
    values = statistics.median(_count_values(d) for d in documents)
    print(
        f"ruleset {RULESET}: {len(fast.rulesets[RULESET].plan.rules)} enabled rules; "
        f"{inputs} distinct inputs (median {values:.0f} JSON values each); {rounds} rounds"
    )
    results = [evaluate(fast, RULESET, d) for d in documents]  # warm-up
    matched = statistics.median(len(r.matched) for r in results)
    errors = sum(len(r.errors) for r in results)
    print(f"fast-path sanity: median {matched:.0f} rules matched, {errors} rule errors in total")

    bench_fast(fast, documents, rounds)
    bench_slow(fast, slow, documents[: reference_inputs * 2], rounds)
    bench_reference(fast, documents[:reference_inputs], reference_rounds)
    bench_input_size(fast, documents[: reference_inputs * 2], max(rounds // 3, 1))
    bench_counting(fast, documents, rounds)
    if args.dependencies:
        bench_dependencies(fast, documents, rounds)


DEPENDENTS = 10  # rules of the 50 that also read another rule's outcome


def layered(
    rules: Sequence[GeneratedRule], layers: int, *, reading: bool = False
) -> list[GeneratedRule]:
    """The rules with the last `DEPENDENTS` made combinations of two earlier rules'
    outcomes: of two independent rules, or (with more than 2 layers) of the rule before
    and an independent one, in chains of `layers - 1`; `reading`: each also reads the
    input (`rules["a"] && input.amount > 1000`, the most natural use)."""
    changed = list(rules)
    first = len(rules) - DEPENDENTS
    for n in range(first, len(rules)):
        chained = layers > 2 and (n - first) % (layers - 1)
        one, other = rules[n - 1 if chained else n - DEPENDENTS], rules[n - 2 * DEPENDENTS]
        condition = f'rules["{one.id}"] || !rules["{other.id}"]'
        if reading:
            condition = f'rules["{one.id}"] && input.amount > 1000'
        changed[n] = replace(rules[n], condition=condition)
    return changed


def bench_dependencies(fast: Snapshot, documents: Sequence[Doc], rounds: int) -> None:
    rules = generate_rules(0, RULES)
    cases = {"without dependencies": fast}
    refused = []
    for layers, reading in ((2, False), (4, False), (2, True), (4, True)):
        name = f"{DEPENDENTS} dependent rules{' reading input' if reading else ''}, {layers} layers"
        try:
            loaded = Loader().load([render_file(0, layered(rules, layers, reading=reading))])
        except LoadError as exc:
            refused.append(f"  {name:<48} refused: {exc.problems[0].message[:70]}...")
            continue
        ruleset = loaded.snapshot.rulesets[RULESET]
        ruleset.plan.conditions.prepare()
        cases[name] = loaded.snapshot
    print(f"\n[8] dependencies: evaluate() per input, {len(documents)} inputs, {rounds} rounds")
    medians = interleaved_medians(
        {name: (lambda d, s=snapshot: evaluate(s, RULESET, d)) for name, snapshot in cases.items()},
        documents,
        rounds,
    )
    base = medians["without dependencies"]
    for name, median in medians.items():
        print(f"  {name:<48} {median:8.2f} us  {median / base:.2f}x")
    print("\n".join(refused))


def _count_values(document: Any) -> int:
    if isinstance(document, dict):
        return 1 + sum(_count_values(v) for v in document.values())
    if isinstance(document, list):
        return 1 + sum(_count_values(v) for v in document)
    return 1


if __name__ == "__main__":
    main()

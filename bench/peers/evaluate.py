"""Peers, in-process evaluation: our engine vs zen-engine (GoRules) on one 50-rule table.

The same 50 scoring rules, written once as a rule-sidecar RuleSet (CEL conditions) and
once as a JDM graph for zen-engine: input -> decision table (hit policy `collect`, one
field-less input column whose cells are the conditions, one output `points`) ->
expression node `total = sum(map(hits, #.points))` -> output. The conditions come from
five templates that both languages express directly (numeric thresholds, `in` lists,
conjunctions, booleans, string suffixes), with positive and negative points.

Before timing, both engines must give the same total on every input. Then rounds
alternate (ours, zen, ours, zen, ...) so that load from other processes hits both alike;
each call is timed on its own. zen is called as `ZenEngine({"loader": ...}).evaluate(key,
input)` (the binding calls the loader, and parses the graph, on every evaluation: that is
its documented way to serve a graph by key) and, for reference, through a decision made
once with `create_decision(content).evaluate(input)`.

    /work/venv/bin/python -m bench.peers.evaluate            # about 30 s
    /work/venv/bin/python -m bench.peers.evaluate --quick

Needs `pip install zen-engine` (not a project dependency).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Callable
from typing import Any

import zen

from bench._common import describe, environment, fmt_us
from sidecar.engine import evaluate
from sidecar.loader import Loader
from sidecar.rulefiles import SourceFile

RULESET = "peers"
COUNTRIES = ["FR", "DE", "GB", "US", "NG", "BR", "IN", "CN", "RU", "UA", "ES", "IT"]
DOMAINS = ["mailinator.com", "example.com", "tempmail.net", "corp.example", "gmail.com"]


def rules() -> list[tuple[str, str, int]]:
    """(CEL condition, ZEN condition, points) for the 50 rules."""
    rng = random.Random(50)
    table: list[tuple[str, str, int]] = []
    for i in range(10):
        amount = 250 * (i + 1)
        table.append((f"input.amount > {amount}", f"amount > {amount}", 5 + i))
        picked = rng.sample(COUNTRIES, 3)
        cel = ", ".join(f"'{c}'" for c in picked)
        zen_list = ", ".join(f'"{c}"' for c in picked)
        table.append((f"input.country in [{cel}]", f"country in [{zen_list}]", 10 - i))
        velocity, floor = 2 + i, 100 * i
        table.append(
            (
                f"input.velocity_1h >= {velocity} && input.amount > {floor}",
                f"velocity_1h >= {velocity} and amount > {floor}",
                15,
            )
        )
        days = 7 * (i + 1)
        table.append(
            (
                f"input.device_new && input.account_age_days < {days}",
                f"device_new == true and account_age_days < {days}",
                20 - 3 * i,
            )
        )
        domain = DOMAINS[i % len(DOMAINS)]
        table.append(
            (
                f"input.email.endsWith('@{domain}')",
                f'endsWith(email, "@{domain}")',
                -5 if domain.endswith("example") else 12,
            )
        )
    return table


def inputs(count: int) -> list[dict[str, Any]]:
    rng = random.Random(7)
    return [
        {
            "amount": round(rng.uniform(1, 3000), 2),
            "country": rng.choice(COUNTRIES),
            "velocity_1h": rng.randint(0, 12),
            "device_new": rng.random() < 0.3,
            "account_age_days": rng.randint(0, 800),
            "email": f"user{i}@{rng.choice(DOMAINS)}",
        }
        for i in range(count)
    ]


def ours(table: list[tuple[str, str, int]]) -> Callable[[dict[str, Any]], int]:
    document = {
        "apiVersion": "rule-sidecar/v1",
        "kind": "RuleSet",
        "metadata": {"id": RULESET},
        "spec": {
            "rules": [
                {"id": f"r{i}", "condition": cel, "points": points}
                for i, (cel, _, points) in enumerate(table)
            ]
        },
    }
    snapshot = Loader().load([SourceFile("peers.json", json.dumps(document).encode())]).snapshot
    snapshot.rulesets[RULESET].plan.conditions.prepare()  # what a first evaluation asks for

    def run(document: dict[str, Any]) -> int:
        return evaluate(snapshot, RULESET, document).total_points

    return run


def graph(table: list[tuple[str, str, int]]) -> str:
    position = {"x": 0, "y": 0}
    decision_table = {
        "id": "table",
        "type": "decisionTableNode",
        "name": "rules",
        "position": position,
        "content": {
            "hitPolicy": "collect",
            "outputPath": "hits",
            "passThrough": True,
            "inputs": [{"id": "condition", "name": "condition", "field": ""}],
            "outputs": [{"id": "points", "name": "points", "field": "points"}],
            "rules": [
                {"_id": f"r{i}", "condition": condition, "points": str(points)}
                for i, (_, condition, points) in enumerate(table)
            ],
        },
    }
    total = {
        "id": "total",
        "type": "expressionNode",
        "name": "total",
        "position": position,
        "content": {
            "expressions": [{"id": "sum", "key": "total", "value": "sum(map(hits, #.points))"}]
        },
    }
    nodes = [
        {"id": "in", "type": "inputNode", "name": "in", "position": position},
        decision_table,
        total,
        {"id": "out", "type": "outputNode", "name": "out", "position": position},
    ]
    edges = [
        {"id": "e1", "sourceId": "in", "targetId": "table"},
        {"id": "e2", "sourceId": "table", "targetId": "total"},
        {"id": "e3", "sourceId": "total", "targetId": "out"},
    ]
    return json.dumps({"nodes": nodes, "edges": edges})


def time_each(run: Callable[[dict[str, Any]], Any], documents: list[dict[str, Any]]) -> list[float]:
    samples = []
    for document in documents:
        started = time.perf_counter()
        run(document)
        samples.append((time.perf_counter() - started) * 1e6)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    count, rounds = (300, 3) if args.quick else (1000, 7)
    table, documents = rules(), inputs(count)
    content = graph(table)
    engine = zen.ZenEngine({"loader": lambda _key: content})
    decision = engine.create_decision(content)
    contenders: dict[str, Callable[[dict[str, Any]], Any]] = {
        "rule-sidecar evaluate()": ours(table),
        "zen ZenEngine.evaluate(key)": lambda d: engine.evaluate("peers", d)["result"]["total"],
        "zen decision.evaluate (reference)": lambda d: decision.evaluate(d)["result"]["total"],
    }
    for document in documents:  # the same answers first, or the timing means nothing
        totals = {name: run(document) for name, run in contenders.items()}
        assert len(set(totals.values())) == 1, (document, totals)
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, run in contenders.items():
            samples[name].extend(time_each(run, documents))
    print(environment())
    print(f"50 rules, {count} inputs, {rounds} alternating rounds; same totals on every input")
    medians = {name: describe(values)["median"] for name, values in samples.items()}
    ours_median = medians["rule-sidecar evaluate()"]
    for name, values in samples.items():
        ratio = medians[name] / ours_median
        print(f"{name:36s} {fmt_us(values)}  ({ratio:.2f}x ours)")


if __name__ == "__main__":
    main()

"""Benchmark: what the periodic verification costs at 10,000 rulesets from files.

A rules directory of `--rulesets` files (one ruleset of `--rules-each` rules each, from
`bench/_gen.py`) is loaded by a real `HotReloadService` over a real `DirectorySource`;
then, with nothing changed:

1. `--runs` verifications (`Trigger.VERIFY`: every source read as usual, forgotten and
   read again in full, compared file by file, loaded: the loader reuses every unchanged
   file by its digest), and for comparison as many usual resyncs (one read);
2. for each, the wall-clock time and the CPU seconds the process spent (every thread),
   so the cost per `RULE_SIDECAR_VERIFY_INTERVAL_SECONDS` is the verification's CPU
   seconds; the share of one core at the default 300 s is printed too.

Run (from the repository root):

    python -m bench.verify                    # 10k rulesets of 1 rule, median of 5, ~2 min
    python -m bench.verify --quick            # 1k rulesets, median of 3
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from bench._common import environment
from bench._gen import generate_file
from sidecar.loader import Loader
from sidecar.registry import RuleRegistry
from sidecar.reloads import Trigger
from sidecar.service import HotReloadService
from sidecar.sources.files import DirectorySource

DEFAULT_INTERVAL_S = 300.0


async def _timed(service: HotReloadService, trigger: Trigger) -> tuple[float, float]:
    """Wall-clock and CPU seconds of one background reload asked for with `trigger`."""
    wall, cpu = time.perf_counter(), time.process_time()
    await service.request_reload(trigger)
    return time.perf_counter() - wall, time.process_time() - cpu


async def _measure(root: Path, runs: int) -> dict[str, list[tuple[float, float]]]:
    service = HotReloadService(
        RuleRegistry(), [DirectorySource(root)], loader=Loader(), auto_reload=False
    )
    started = time.perf_counter()
    record = await service.initial_load()
    print(
        f"first load: {record.rulesets_loaded} rulesets, {record.rules_loaded} rules "
        f"in {time.perf_counter() - started:.1f} s"
    )
    results: dict[str, list[tuple[float, float]]] = {"verify": [], "resync": []}
    for _ in range(runs):
        for name, trigger in (("verify", Trigger.VERIFY), ("resync", Trigger.RESYNC)):
            results[name].append(await _timed(service, trigger))
    assert service.drift == {service.sources[0].name: 0}, "nothing changed: no drift"
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rulesets", type=int, default=10_000)
    parser.add_argument("--rules-each", type=int, default=1)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="1k rulesets, 3 runs")
    args = parser.parse_args()
    if args.quick:
        args.rulesets, args.runs = 1_000, 3
    print(environment())
    with tempfile.TemporaryDirectory(prefix="bench-verify-") as tmp:
        root = Path(tmp)
        size = 0
        for index in range(args.rulesets):
            file = generate_file(index, args.rules_each)
            (root / Path(file.name).name).write_bytes(file.content)
            size += len(file.content)
        print(f"{args.rulesets} files, {size / 1e6:.1f} MB")
        results = asyncio.run(_measure(root, args.runs))
    for name, samples in results.items():
        wall = statistics.median(s[0] for s in samples)
        cpu = statistics.median(s[1] for s in samples)
        print(
            f"{name}: median of {len(samples)}: {wall * 1000:.0f} ms wall, {cpu:.2f} CPU s "
            f"(min {min(s[0] for s in samples) * 1000:.0f} ms, "
            f"max {max(s[0] for s in samples) * 1000:.0f} ms)"
        )
    cpu = statistics.median(s[1] for s in results["verify"])
    print(
        f"cost per verification interval: {cpu:.2f} CPU s; at {DEFAULT_INTERVAL_S:.0f} s, "
        f"{cpu / DEFAULT_INTERVAL_S * 100:.2f} % of one core"
    )


if __name__ == "__main__":
    main()

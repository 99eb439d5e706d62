"""Benchmark: loading rule files into a snapshot (cold, incremental, memory, stages).

What it measures (rule files from `bench/_gen.py`, 100 rules per file, no embedded tests):

1. Cold load: `Loader().load(files)` with a new `Loader` (empty caches, new CEL
   environment) for 1k and 10k rules: parse YAML, JSON Schema, build rules, compile each
   ruleset's conditions, checks, `Snapshot.build`.            Target: 10k rules < 3 s.
2. Incremental reload: a `Loader` already holding 10k rules loads the full file list in
   which exactly one 100-rule file changed (one rule edited; alternating revisions so every
   run re-reads it). Also a reload with nothing changed (the fixed per-reload floor).
                                                              Target: < 50 ms.
3. Memory per 10k rules, in fresh child processes: tracemalloc peak during the load and
   Python memory still held afterwards (loader + snapshot, and snapshot alone), and the RSS
   delta of the process (which also sees the compiled cel-cpp programs, invisible to
   tracemalloc). No target: reported for capacity planning.
4. Per-stage breakdown of the cold 10k loads of [1] and the incremental reloads of [2],
   from the stages the loader times itself (`LoadResult.timings`, by `LoadStage`: parse,
   schema, compile, checks, build) and the rest of `Loader.load` outside them; plus a direct
   split of YAML time into libyaml compose (C) and PyYAML's Python constructor.

Timings are wall-clock `time.perf_counter`, medians over repeated runs with min/max and
p10/p90, `gc.collect()` between runs (the collector stays on during a run, as in service).

Run (from the repository root):

    /work/venv/bin/python -m bench.load            # default, about 1.5 minutes (2 on a busy box)
    /work/venv/bin/python -m bench.load --quick    # sizes 1k/2k, a few runs, < 20 s
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

from bench._common import describe, environment, fmt_ms, rss_bytes
from bench._gen import generate_file, generate_files
from sidecar.loader import LOAD_STAGES, Loader, LoadResult, LoadStage
from sidecar.rulefiles import SourceFile

TARGET_COLD_10K_S = 3.0
TARGET_INCREMENTAL_S = 0.050
RULES_PER_FILE = 100
CHANGED_FILE = 5  # which file the incremental runs edit

# ---------------------------------------------------------------------------- timing

# A load's wall seconds and the seconds of its stages (not its snapshot: kept for every
# run, 10k-rule snapshots would grow the process under the later runs).
Timed = tuple[float, Mapping[LoadStage, float]]


def timed_load(loader: Loader, files: Sequence[SourceFile]) -> tuple[float, LoadResult]:
    gc.collect()
    started = time.perf_counter()
    result = loader.load(files)
    return time.perf_counter() - started, result


def warm_process() -> float:
    """One small load so one-time process costs (schema check, validator) are not counted."""
    started = time.perf_counter()
    Loader().load([generate_file(99_999, 10, seed=1)])
    return time.perf_counter() - started


def bench_cold(files: Sequence[SourceFile], runs: int) -> list[Timed]:
    loads = []
    for _ in range(runs):
        seconds, result = timed_load(Loader(), files)
        loads.append((seconds, result.timings))
    return loads


def changed_files(files: Sequence[SourceFile], revision: int) -> list[SourceFile]:
    edited = list(files)
    edited[CHANGED_FILE] = generate_file(CHANGED_FILE, RULES_PER_FILE, revision=revision)
    return edited


def bench_incremental(
    files: Sequence[SourceFile], runs: int
) -> tuple[list[Timed], list[float], set[int]]:
    """(one file changed, nothing changed, files_parsed values seen)."""
    loader = Loader()
    loader.load(files)
    variants = [changed_files(files, 1), changed_files(files, 2)]
    changed: list[Timed] = []
    parsed = set()
    for run in range(runs):
        seconds, result = timed_load(loader, variants[run % 2])
        changed.append((seconds, result.timings))
        parsed.add(result.files_parsed)
    current = variants[(runs - 1) % 2]
    unchanged = []
    for _ in range(runs):
        seconds, result = timed_load(loader, current)
        unchanged.append(seconds)
        parsed.add(result.files_parsed)
    return changed, unchanged, parsed


# ---------------------------------------------------------------------------- stages

STAGE_LABELS = {
    LoadStage.PARSE: "parse (sha256 of content, YAML, tree checks)",
    LoadStage.SCHEMA: "schema (apiVersion/kind, JSON Schema)",
    LoadStage.COMPILE: "compile (build rules, CEL program per ruleset)",
    LoadStage.CHECKS: "checks (semantic, embedded tests, duplicate ids)",
    LoadStage.BUILD: "build (Snapshot.build, compiler cache prune)",
}
REST = "rest of Loader.load (outside the stages)"


def print_stages(title: str, loads: list[Timed]) -> None:
    """The loader's own stage timings of `loads`, medians and shares of the median total."""
    totals = [seconds for seconds, _ in loads]
    total = describe(totals)["median"]
    print(f"  {title} (median of {len(loads)} runs, total {total * 1e3:.1f} ms)")
    rows = {STAGE_LABELS[stage]: [timings[stage] for _, timings in loads] for stage in LOAD_STAGES}
    rows[REST] = [seconds - sum(timings.values()) for seconds, timings in loads]
    for label, values in rows.items():
        d = describe(values)
        share = d["median"] / total * 100 if total else 0.0
        print(
            f"    {label:<52} {d['median'] * 1e3:8.1f} ms  {share:5.1f}%"
            f"  [min {d['min'] * 1e3:.1f} max {d['max'] * 1e3:.1f}]"
        )


def bench_yaml_direct(files: Sequence[SourceFile], runs: int) -> None:
    """libyaml's compose (C) against PyYAML's constructor (Python) on the same texts."""
    compose, construct = [], []
    for _ in range(runs):
        gc.collect()
        composing = constructing = 0.0
        for source in files:
            text = source.content.decode("utf-8-sig")
            started = time.perf_counter()
            parser = yaml.CSafeLoader(text)
            node = parser.get_single_node()
            composed = time.perf_counter()
            parser.construct_document(node)
            constructing += time.perf_counter() - composed
            composing += composed - started
            parser.dispose()
        compose.append(composing)
        construct.append(constructing)
    print(f"  direct YAML split over {len(files)} files ({runs} runs):")
    print(f"    libyaml compose to nodes (C)       {fmt_ms(compose)}")
    print(f"    PyYAML construct_document (Python) {fmt_ms(construct)}")


# ---------------------------------------------------------------------------- memory


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


def peak_rss_bytes() -> int:
    """Peak RSS of this process image: VmHWM (reset by `reset_peak_rss`), else ru_maxrss.

    Not ru_maxrss first: Linux carries it across exec, so a child started by a big
    parent begins with the parent's peak.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_child(directory: str, mode: str) -> None:
    """Runs in a fresh process; prints one JSON line.

    The files are read from `directory` (written by the parent) rather than generated
    here, so generating them does not raise this process's peak RSS before the load.
    """
    files = [
        SourceFile(f"rules/{path.name}", path.read_bytes())
        for path in sorted(Path(directory).glob("*.yaml"))
    ]
    loader = Loader()
    loader.load([generate_file(99_999, 10, seed=1)])  # env, validator, caches warm
    gc.collect()
    figures: dict[str, float] = {}
    if mode == "tracemalloc":
        tracemalloc.start()
        snapshot = loader.load(files).snapshot
        gc.collect()
        current, peak = tracemalloc.get_traced_memory()
        figures["peak"] = peak
        figures["held_loader_and_snapshot"] = current
        del loader
        gc.collect()
        figures["held_snapshot_only"] = tracemalloc.get_traced_memory()[0]
        figures["rules"] = len(snapshot.rules)
        tracemalloc.stop()
    else:
        reset = reset_peak_rss()
        before = rss_bytes()
        peak_before = peak_rss_bytes()
        snapshot = loader.load(files).snapshot
        gc.collect()
        figures["rss_delta"] = rss_bytes() - before
        figures["peak_rss_delta"] = peak_rss_bytes() - (before if reset else peak_before)
        figures["rules"] = len(snapshot.rules)
    print(json.dumps(figures))


def run_child(directory: str, mode: str) -> dict[str, float]:
    command = [sys.executable, "-m", "bench.load", "--memory-child", directory, mode]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    figures: dict[str, float] = json.loads(output.strip().splitlines()[-1])
    return figures


def bench_memory(files: Sequence[SourceFile], runs: int) -> None:
    rules = len(files) * RULES_PER_FILE
    with tempfile.TemporaryDirectory(prefix="bench-load-") as directory:
        for source in files:
            Path(directory, Path(source.name).name).write_bytes(source.content)
        traced = [run_child(directory, "tracemalloc") for _ in range(runs)]
        rss = [run_child(directory, "rss") for _ in range(runs)]

    def line(label: str, values: list[float]) -> None:
        d = describe([v / 2**20 for v in values])
        per_rule = d["median"] * 2**20 / rules
        print(
            f"    {label:<44} median {d['median']:7.1f} MiB  [min {d['min']:.1f} "
            f"max {d['max']:.1f}]  = {per_rule / 1024:.2f} KiB/rule"
        )

    print(f"  memory for {rules} rules ({runs} fresh processes per figure):")
    line("tracemalloc peak during load", [f["peak"] for f in traced])
    line("tracemalloc held: loader + snapshot", [f["held_loader_and_snapshot"] for f in traced])
    line("tracemalloc held: snapshot only", [f["held_snapshot_only"] for f in traced])
    line("RSS delta after load (incl. cel-cpp programs)", [f["rss_delta"] for f in rss])
    line("peak RSS (VmHWM) growth during load", [f["peak_rss_delta"] for f in rss])


# ---------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="small sizes, few runs")
    parser.add_argument("--memory-child", nargs=2, metavar=("DIR", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        memory_child(args.memory_child[0], args.memory_child[1])
        return

    small, large = (1_000, 2_000) if args.quick else (1_000, 10_000)
    cold_small_runs, cold_large_runs = (3, 2) if args.quick else (11, 7)
    incremental_runs = 10 if args.quick else 40
    yaml_runs, memory_runs = (1, 1) if args.quick else (2, 2)
    on_target = large == 10_000

    print(f"bench.load — {environment()}")
    print(f"one-time process warm-up (schema check, CEL env): {warm_process() * 1e3:.1f} ms")
    started = time.perf_counter()
    files = generate_files(large, RULES_PER_FILE)
    size = sum(len(f.content) for f in files)
    print(
        f"generated {large} rules in {len(files)} files, {size / 2**20:.2f} MiB of YAML "
        f"({(time.perf_counter() - started) * 1e3:.0f} ms, not counted)"
    )

    print("\n[1] cold load (new Loader each run)")
    small_files = files[: small // RULES_PER_FILE]
    cold_small = [seconds for seconds, _ in bench_cold(small_files, cold_small_runs)]
    print(f"  {small:>6} rules: {fmt_ms(cold_small)}")
    target = TARGET_COLD_10K_S if on_target else None
    cold = bench_cold(files, cold_large_runs)
    print(f"  {large:>6} rules: {fmt_ms([seconds for seconds, _ in cold], target)}")

    print(f"\n[2] incremental reload in a {large}-rule registry (loader cache warm)")
    changed, unchanged, parsed = bench_incremental(files, incremental_runs)
    target = TARGET_INCREMENTAL_S if on_target else None
    print(f"  1 file of {RULES_PER_FILE} rules changed: {fmt_ms([s for s, _ in changed], target)}")
    print(f"  nothing changed (floor):      {fmt_ms(unchanged)}")
    print(f"  files_parsed values seen: {sorted(parsed)} (expect [0, 1])")

    print("\n[3] memory")
    bench_memory(files, memory_runs)

    print("\n[4] where the time goes (the loader's own stage timings of [1] and [2])")
    print_stages(f"cold load, {large} rules", cold)
    bench_yaml_direct(files, yaml_runs)
    print_stages(f"incremental reload, 1 of {len(files)} files changed", changed)


if __name__ == "__main__":
    main()

"""Benchmark: the state dir's copy of a large registry, saved and restored.

A registry of 10,000 rulesets / 100,000 rules (10 rules each, 40-character descriptions)
is built by the real loader, then:

1. first save into an empty state dir (every file written and fsynced), and its size on
   disk (files, bytes, `du`);
2. the same snapshot saved again (nothing to write but the manifest);
3. one ruleset changed, saved (one file rewritten);
4. restore as a restart does it: `StateStore.load()` (reads, checks every digest) and
   `Loader().load(files, run_checks=False)` (parse, JSON Schema, CEL compile), in a fresh
   child process, so nothing is cached; its peak RSS.

`--rulesets` and `--rules-each` change the size. Timings are wall-clock, one run each
(the first save and the restore are one-off costs at this size).

Run (from the repository root):

    python -m bench.state_dir                      # 10k rulesets / 100k rules, ~1-2 min
    python -m bench.state_dir --quick              # 1k rulesets / 10k rules
    python -m bench.state_dir --rulesets 2000 --rules-each 10
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from sidecar.loader import Loader
from sidecar.rulefiles import SourceFile
from sidecar.snapshot import Snapshot
from sidecar.state import StateStore

RESTORE = """
import json, resource, sys, time
from pathlib import Path
from sidecar.loader import Loader
from sidecar.state import StateStore
started = time.perf_counter()
files = StateStore(Path(sys.argv[1])).load()
read = time.perf_counter()
snapshot = Loader(run_checks=False).load(files).snapshot
done = time.perf_counter()
print(json.dumps({
    "read": read - started, "load": done - read, "revision": snapshot.revision,
    "rules": len(snapshot.rules), "rulesets": len(snapshot.rulesets),
    "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
}))
"""


def documents(rulesets: int, rules_each: int, points: int = 1) -> list[dict]:
    return [
        {
            "apiVersion": "rule-sidecar/v1",
            "kind": "RuleSet",
            "metadata": {"id": f"rs{i}"},
            "spec": {
                "rules": [
                    {
                        "id": f"r{i}-{j}",
                        "condition": f"input.amount > {j}",
                        "points": points,
                        "description": "d" * 40,
                    }
                    for j in range(rules_each)
                ]
            },
        }
        for i in range(rulesets)
    ]


def build(docs: list[dict], loader: Loader) -> Snapshot:
    files = [
        SourceFile(f"f{k}.json", json.dumps(docs[k : k + 500]).encode())
        for k in range(0, len(docs), 500)
    ]
    return loader.load(files).snapshot


def timed(label: str, action: Callable[[], None]) -> float:
    started = time.perf_counter()
    action()
    elapsed = time.perf_counter() - started
    print(f"{label:44} {elapsed:8.2f} s")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rulesets", type=int, default=10_000)
    parser.add_argument("--rules-each", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="1,000 rulesets of 10 rules")
    args = parser.parse_args()
    if args.quick:
        args.rulesets = 1000
    docs = documents(args.rulesets, args.rules_each)
    loader = Loader(run_checks=False)
    started = time.perf_counter()
    snapshot = build(docs, loader)
    print(
        f"registry: {len(snapshot.rulesets):,} rulesets, {len(snapshot.rules):,} rules "
        f"(built in {time.perf_counter() - started:.1f} s)"
    )
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:
        state = Path(tmp) / "state"
        store = StateStore(state)
        timed("first save (empty state dir)", lambda: store.save(snapshot))
        status = store.status()
        du = subprocess.run(
            ["du", "-sh", str(state)], capture_output=True, text=True, check=True
        ).stdout
        print(f"{'on disk':44} {status.files} files, {status.bytes:,} bytes, du {du.split()[0]}")
        timed("save again, nothing changed", lambda: store.save(snapshot))
        docs[args.rulesets // 2]["spec"]["rules"][0]["points"] = 2
        changed = build(docs, loader)
        before = set((state / "rulesets").iterdir())
        timed("save after one ruleset changed", lambda: store.save(changed))
        rewritten = len(set((state / "rulesets").iterdir()) - before)
        print(f"{'files rewritten by that save':44} {rewritten}")
        child = subprocess.run(
            [sys.executable, "-c", RESTORE, str(state)],
            capture_output=True,
            text=True,
            check=True,
        )
        row = json.loads(child.stdout)
        assert row["revision"] == changed.revision, "the restored copy differs"
        print(f"{'restore: read + digests':44} {row['read']:8.2f} s")
        print(f"{'restore: loader (schema, CEL compile)':44} {row['load']:8.2f} s")
        print(
            f"{'restore: total, peak RSS of the process':44} {row['read'] + row['load']:8.2f} s"
            f"   {row['peak_mib']:.0f} MiB ({row['rulesets']:,} rulesets, {row['rules']:,} rules,"
            " same revision)"
        )


if __name__ == "__main__":
    main()

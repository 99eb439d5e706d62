"""Benchmark: `rule-sidecar replay` end to end on 100,000 decision-log lines.

What it measures: a 50-rule ruleset from `bench/_gen.py` (the baseline) and the same file
with one rule edited (`generate_file(..., revision=300)`: a threshold raised, its points
changed; the candidate), and 100,000 decision-log lines in the sidecar's shape holding
`sample_input(i)` (about 560 bytes each), plain and gzipped. Each round runs the real
command as a process, `rule-sidecar replay --candidate ... --baseline ... --inputs ...
--format json`, and times it from start to exit (interpreter start, loading both sides,
reading, evaluating 200,000 times in worker processes, rendering); median of 3 rounds per
file. Target: < 15 s on 2 cores.

Run (from the repository root):

    .venv/bin/python -m bench.replay            # 100,000 lines, 3 rounds
    .venv/bin/python -m bench.replay --quick    # 10,000 lines, 1 round
"""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench._common import environment, fmt_ms
from bench._gen import generate_file, ruleset_id, sample_input

RULES = 50
TARGET_S = 15.0


def command() -> list[str]:
    script = Path(sys.executable).with_name("rule-sidecar")
    return [str(script)] if script.exists() else [sys.executable, "-m", "sidecar.cli"]


def write_inputs(path: Path, count: int) -> None:
    """Decision-log lines as the sidecar writes them (the decision is not the point: the
    baseline's rules decide the comparison)."""
    with path.open("w", encoding="utf-8") as out:
        for i in range(count):
            line = {
                "decision_id": f"0193a7c2-5d1e-7b3a-8c41-{i:012x}",
                "timestamp": "2024-12-01T10:15:02.123456Z",
                "ruleset_id": ruleset_id(0),
                "registry_version": 1,
                "revision": "9f2c",
                "input": sample_input(i),
                "total_points": 0,
                "decision": "allow",
                "matched": [],
                "shadow_matched": [],
                "errors": [],
                "duration_us": 50.0,
            }
            out.write(json.dumps(line, separators=(",", ":")) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    count, rounds = (10_000, 1) if args.quick else (100_000, 3)
    print(f"# replay: {count:,} lines, {RULES} rules, {rounds} round(s); {environment()}")
    with tempfile.TemporaryDirectory(prefix="bench-replay-") as scratch:
        root = Path(scratch)
        for side, revision in (("baseline", 0), ("candidate", 300)):
            (root / side).mkdir()
            file = generate_file(0, RULES, revision=revision)
            (root / side / "rules.yaml").write_bytes(file.content)
        plain = root / "decisions.jsonl"
        write_inputs(plain, count)
        packed = root / "decisions.jsonl.gz"
        packed.write_bytes(gzip.compress(plain.read_bytes(), compresslevel=6))
        print(
            f"inputs: {plain.stat().st_size / 2**20:.1f} MiB, "
            f"gzip {packed.stat().st_size / 2**20:.1f} MiB"
        )
        for inputs in (plain, packed):
            seconds = []
            summary = {}
            for _ in range(rounds):
                started = time.perf_counter()
                result = subprocess.run(
                    [
                        *command(),
                        "replay",
                        *("--candidate", str(root / "candidate")),
                        *("--baseline", str(root / "baseline")),
                        *("--inputs", str(inputs), "--format", "json"),
                    ],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                seconds.append(time.perf_counter() - started)
                summary = json.loads(result.stdout)
            print(
                f"{inputs.name:20} {fmt_ms(seconds, TARGET_S)}; "
                f"{summary['inputs']:,} inputs, {summary['changed']:,} changed "
                f"({summary['changed_percent']}%)"
            )


if __name__ == "__main__":
    main()

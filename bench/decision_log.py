"""What the decision log costs: HTTP evaluate throughput with the file log on at sample 1
beside the log off, in the same run.

Two `rule-sidecar serve` processes on the same 50-rule ruleset, both pinned to core 0
(`taskset`; the decision log's writer thread shares that core, as in a sidecar limited
to one CPU): one without the log, one with `--decision-log FILE` (sample 1, default
queue and rotation). `wrk` on core 1 (50 connections, as `bench/http_load.py`) drives
them in turn, off then on, `runs` times: interleaved, so that other work on the shared
machine weighs on both alike. Single inputs, then batches of 100. Afterwards the lines
written and dropped are read from the logging server's `/metrics`.

Target: throughput with the log >= 0.80x without it.

    python -m bench.decision_log            # 3 interleaved runs of 10 s of each
    python -m bench.decision_log --quick    # 1 run of 3 s of each
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import urllib.request
from contextlib import ExitStack
from pathlib import Path

from bench._common import environment, free_port, sidecar_process
from bench._gen import generate_file, ruleset_id, sample_input
from bench.http_load import LUA, _ms, wait_ready

BATCH = 100
# 50 connections for single inputs, as bench/http_load.py; 4 for batches, which evaluate
# one at a time with at most 8 waiting (RULE_SIDECAR_MAX_QUEUED_BATCHES): more would be
# measuring 503s.
CONNECTIONS = {"single": 50, "batch": 4}
_WRK = ("taskset", "-c", "1", "wrk", "-t1")


def run_wrk(url: str, script: Path, seconds: int, connections: int) -> dict[str, float]:
    """`wrk` on core 1: requests/s, p99 (ms) and the answers that were not 2xx."""
    output = subprocess.run(
        [*_WRK, f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(script), url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", output, re.M)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if rps is None or p99 is None:
        raise RuntimeError(f"wrk printed what this script cannot read:\n{output}")
    return {
        "rps": float(rps.group(1)),
        "p99": _ms(p99.group(1)),
        "errors": float(errors.group(1)) if errors else 0.0,
        "socket_errors": 0.0 if "Socket errors" not in output else 1.0,
    }


def scrape(base: str, name: str) -> float:
    """A sample's value (summed over its labels) from `/metrics`."""
    with urllib.request.urlopen(f"{base}/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and not line.startswith("#")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    runs, seconds = (1, 3) if args.quick else (3, 10)
    for tool in ("wrk", "taskset"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is needed: apt-get install wrk util-linux")
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        rules = Path(tmp) / "rules"
        rules.mkdir()
        (rules / "scoring.yaml").write_bytes(generate_file(0, 50, 0).content)
        log = Path(tmp) / "decisions.log"
        bases: dict[str, str] = {}
        for kind, extra in (("off", ()), ("on", ("--decision-log", str(log)))):
            port = free_port()
            stack.enter_context(
                sidecar_process(
                    port, "--rules-dir", str(rules), *extra, prefix=("taskset", "-c", "0")
                )
            )
            bases[kind] = f"http://127.0.0.1:{port}"
            wait_ready(bases[kind])
        path = f"/api/v1/rulesets/{ruleset_id(0)}/evaluate"
        scripts = {}
        for shape, body in (
            ("single", {"input": sample_input(1)}),
            ("batch", {"inputs": [sample_input(i) for i in range(BATCH)]}),
        ):
            scripts[shape] = Path(tmp) / f"{shape}.lua"
            scripts[shape].write_text(LUA % json.dumps(body))
        figures: dict[tuple[str, str], list[dict[str, float]]] = {}
        for shape, script in scripts.items():
            connections = CONNECTIONS[shape]
            for base in bases.values():
                run_wrk(base + path, script, 2, connections)  # warm-up
            for _ in range(runs):
                for kind, base in bases.items():
                    result = run_wrk(base + path, script, seconds, connections)
                    figures.setdefault((shape, kind), []).append(result)
        written = scrape(bases["on"], "rule_sidecar_decision_log_written_total")
        dropped = scrape(bases["on"], "rule_sidecar_decision_log_dropped_total")
        size = sum(p.stat().st_size for p in Path(tmp).glob("decisions.log*"))
    print(environment())
    print("both servers on core 0 (the log's writer thread too), wrk on core 1, interleaved")
    for shape in scripts:
        scale = BATCH if shape == "batch" else 1
        medians = {}
        for kind in bases:
            results = figures[(shape, kind)]
            rps = [r["rps"] * scale for r in results]
            medians[kind] = statistics.median(rps)
            p99 = statistics.median(r["p99"] for r in results)
            errors = sum(r["errors"] + r["socket_errors"] for r in results)
            print(
                f"{shape:6s} log {kind:3s}: {medians[kind]:8.0f} inputs/s "
                f"[min {min(rps):.0f} .. max {max(rps):.0f}, n={len(rps)}]; "
                f"p99 {p99:.2f} ms; errors {errors:.0f}"
            )
        ratio = medians["on"] / medians["off"]
        print(f"{shape:6s} on / off: {ratio:.2f}x (target >= 0.80x)")
    print(
        f"decision log: {written:.0f} lines written, {dropped:.0f} dropped, "
        f"{size / 2**20:.0f} MiB on disk (rotated at 100 MiB, 5 kept)"
    )


if __name__ == "__main__":
    main()

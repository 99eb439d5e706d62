"""What decision insight costs on the request path: per-rule counting and the decision
log, each as HTTP evaluate throughput beside the same without it, in one run.

Three `rule-sidecar serve` processes on the same 50-rule ruleset, all pinned to core 0
(`taskset`; the decision log's writer thread shares that core, as in a sidecar limited
to one CPU): one with counting switched off (`bench._uncounted`: the sidecar itself
always counts), one as shipped (counting, no log), one with `--decision-log FILE`
(sample 1, default queue and rotation). `wrk` on core 1 (50 connections, as
`bench/http_load.py`) drives them in turn, `runs` times: interleaved, so that other work
on the shared machine weighs on all alike. Single inputs, then batches of 100.
Afterwards the lines written and dropped are read from the logging server's `/metrics`.

Targets: counting >= 0.95x without it; the log >= 0.80x without it.

    python -m bench.insight            # 3 interleaved runs of 10 s of each
    python -m bench.insight --quick    # 1 run of 3 s of each
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import urllib.request
from contextlib import ExitStack
from pathlib import Path

from bench._common import environment, free_port, sidecar_process
from bench._gen import generate_file, ruleset_id, sample_input
from bench.http_load import LUA, run_wrk, wait_ready

BATCH = 100
# 50 connections for single inputs, as bench/http_load.py; 4 for batches, which evaluate
# one at a time with at most 8 waiting (RULE_SIDECAR_MAX_QUEUED_BATCHES): more would be
# measuring 503s.
CONNECTIONS = {"single": 50, "batch": 4}
# The servers compared, and how each is started: (module, extra arguments).
SERVERS = {
    "uncounted": ("bench._uncounted", ()),
    "counted": ("sidecar.cli", ()),
    "logged": ("sidecar.cli", ("--decision-log",)),
}
# Each ratio: (what, the server with it, the server without it, target).
RATIOS = (("counting", "counted", "uncounted", 0.95), ("log", "logged", "counted", 0.80))


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
        for kind, (module, extra) in SERVERS.items():
            port = free_port()
            arguments = [*extra, str(log)] if extra else []
            stack.enter_context(
                sidecar_process(
                    port,
                    "--rules-dir",
                    str(rules),
                    *arguments,
                    prefix=("taskset", "-c", "0"),
                    module=module,
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
        written = scrape(bases["logged"], "rule_sidecar_decision_log_written_total")
        dropped = scrape(bases["logged"], "rule_sidecar_decision_log_dropped_total")
        size = sum(p.stat().st_size for p in Path(tmp).glob("decisions.log*"))
    print(environment())
    print("servers on core 0 (the log's writer thread too), wrk on core 1, interleaved")
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
                f"{shape:6s} {kind:9s}: {medians[kind]:8.0f} inputs/s "
                f"[min {min(rps):.0f} .. max {max(rps):.0f}, n={len(rps)}]; "
                f"p99 {p99:.2f} ms; errors {errors:.0f}"
            )
        for what, with_it, without, target in RATIOS:
            ratio = medians[with_it] / medians[without]
            print(f"{shape:6s} {what}: {ratio:.2f}x of without it (target >= {target:.2f}x)")
    print(
        f"decision log: {written:.0f} lines written, {dropped:.0f} dropped, "
        f"{size / 2**20:.0f} MiB on disk (rotated at 100 MiB, 5 kept)"
    )


if __name__ == "__main__":
    main()

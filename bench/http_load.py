"""HTTP evaluation throughput and latency, idle and while a 1 MiB rules file reloads.

Starts `rule-sidecar serve` pinned to core 0 (`taskset`) with a 50-rule ruleset, and
drives `POST /api/v1/rulesets/{id}/evaluate` from core 1:
1. `wrk` (Debian package `wrk`), 50 connections, as fast as answers come, beside the
   same `wrk` against a bare aiohttp + uvloop + orjson handler on core 0
   (`bench._bare_server`), run first in the same run: throughput as a share of the floor.
2. `bench._fixed_rate` at a steady `--rate` (2,000/s), latency counted from each
   request's scheduled time, idle; then the same while a second, 1 MiB rules file is
   swapped in (`..data` swap) every 2 s. Meanwhile a checker evaluates a batch in a loop
   and verifies that every response names exactly one registry version (all results of
   a batch carry the same version, which only grows).

Targets: evaluate >= 0.60x the bare handler's requests/s, p99 < 5 ms; under reload zero
errors and p99 within 2x of the idle p99 at the same rate.

Large reloads run in the sidecar's worker process. By default it stays on the server's
core (a sidecar limited to one CPU); `--worker-core 1` moves it to the other core once
it exists, as a sidecar allowed a second CPU would run.

    python -m bench.http_load            # 3 runs of 10 s of each kind
    python -m bench.http_load --quick    # 1 run of 3 s of each kind
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
import threading
import time
import urllib.request
from pathlib import Path

from bench._common import environment, free_port, sidecar_process
from bench._gen import generate_file, ruleset_id, sample_input
from sidecar.testing import ConfigMapDir

LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = [[%s]]
"""


def post(url: str, body: dict[str, object]) -> dict[str, object]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        result: dict[str, object] = json.loads(response.read())
        return result


def wait_ready(base: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{base}/readyz", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError("the sidecar did not become ready")


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if match is None:
        raise ValueError(f"wrk printed a latency this script cannot read: {text!r}")
    number, unit = match.groups()
    return float(number) * _UNITS[unit]


def run_wrk(url: str, script: Path, seconds: int, connections: int = 50) -> dict[str, float]:
    """`wrk` on core 1: requests/s, p50 and p99 (ms), and the answers that were not 2xx
    (its output read line by line: "+/- Stdev" also holds a percentage)."""
    output = subprocess.run(
        [
            "taskset",
            "-c",
            "1",
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{seconds}s",
            "--latency",
            "-s",
            str(script),
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.M)
    p50 = re.search(r"^\s+50%\s+(\S+)", output, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", output, re.M)
    if rps is None or p50 is None or p99 is None:
        raise RuntimeError(f"wrk printed what this script cannot read:\n{output}")
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    return {
        "rps": float(rps.group(1)),
        "p50": _ms(p50.group(1)),
        "p99": _ms(p99.group(1)),
        "errors": float(errors.group(1)) if errors else 0.0,
        "socket_errors": 0.0 if "Socket errors" not in output else 1.0,
    }


RELOAD_EVERY = 2.0  # seconds between two swaps of the 1 MiB file


class Reloader(threading.Thread):
    """Swaps a 1 MiB rules file in every `RELOAD_EVERY` seconds, alternating two contents."""

    def __init__(
        self, volume: ConfigMapDir, base_files: dict[str, str], server: int, worker_core: int | None
    ) -> None:
        super().__init__(daemon=True)
        self.volume = volume
        self.base_files = base_files
        self.server = server
        self.worker_core = worker_core
        # ~1 MiB of YAML each: 39 rulesets of 100 rules in one file (one ruleset of
        # 3,900 would pass the ruleset cost limit and be refused), the same ids,
        # different conditions and points: every swap is a real change.
        self.variants = [
            "---\n".join(generate_file(index, 100, seed).content.decode() for index in range(1, 40))
            for seed in (7, 8)
        ]
        self.stop = threading.Event()
        self.swaps = 0

    def run(self) -> None:
        while not self.stop.wait(RELOAD_EVERY):
            variant = self.variants[self.swaps % 2]
            self.volume.publish({**self.base_files, "big.yaml": variant})
            self.swaps += 1
            if self.swaps == 2 and self.worker_core is not None:
                for pid in descendants(self.server):
                    subprocess.run(
                        ["taskset", "-a", "-p", "-c", str(self.worker_core), str(pid)],
                        check=False,
                        capture_output=True,
                    )


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (the sidecar's worker and its forkserver)."""
    found: list[int] = []
    pending = [pid]
    while pending:
        parent = pending.pop()
        children = subprocess.run(
            ["ps", "-o", "pid=", "--ppid", str(parent)], capture_output=True, text=True, check=False
        ).stdout.split()
        found.extend(int(child) for child in children)
        pending.extend(int(child) for child in children)
    return found


class Checker(threading.Thread):
    """Evaluates a batch every 50 ms: one version per batch, versions never go back.
    (Paced: batches back to back would load the server more than the measured rate.)"""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.stop = threading.Event()
        self.responses = 0
        self.failures: list[str] = []
        self.versions: set[int] = set()

    def run(self) -> None:
        last = 0
        inputs = [sample_input(i) for i in range(20)]
        while not self.stop.wait(0.05):
            try:
                body = post(self.url, {"inputs": inputs})
            except OSError as exc:
                self.failures.append(repr(exc))
                continue
            versions = {result["registry_version"] for result in body["results"]}  # type: ignore[index]
            self.responses += 1
            if versions != {body["registry_version"]} or body["registry_version"] < last:  # type: ignore[operator]
                self.failures.append(f"mixed or older versions: {versions} after {last}")
            last = int(body["registry_version"])  # type: ignore[call-overload]
            self.versions.add(last)


def run_fixed_rate(url: str, body: Path, rate: int, seconds: int) -> dict[str, float]:
    """`bench._fixed_rate` on core 1: latency from each request's scheduled time."""
    output = subprocess.run(
        [
            "taskset",
            "-c",
            "1",
            sys.executable,
            "-m",
            "bench._fixed_rate",
            url,
            str(body),
            f"--rate={rate}",
            f"--seconds={seconds}",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    figures: dict[str, float] = json.loads(output)
    return figures


def measure_bare(runs: int, seconds: int, script: Path) -> list[dict[str, float]]:
    """The same `wrk` against a bare aiohttp JSON handler on core 0: the floor."""
    port = free_port()
    command = ["taskset", "-c", "0", sys.executable, "-m", "bench._bare_server", str(port)]
    with subprocess.Popen(command) as bare:
        try:
            wait_ready(f"http://127.0.0.1:{port}")
            url = f"http://127.0.0.1:{port}/api/v1/rulesets/bench/evaluate"
            run_wrk(url, script, 2)  # warm-up
            return [run_wrk(url, script, seconds) for _ in range(runs)]
        finally:
            bare.terminate()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--worker-core", type=int, default=None, help="move the reload worker there"
    )
    parser.add_argument("--rate", type=int, default=2000, help="requests/s of the fixed-rate runs")
    args = parser.parse_args()
    runs, seconds = (1, 3) if args.quick else (3, 10)
    for tool in ("wrk", "taskset"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is needed: apt-get install wrk util-linux")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        volume = ConfigMapDir(Path(tmp) / "rules")
        rules = generate_file(0, 50, 0)
        base_files = {"scoring.yaml": rules.content.decode()}
        volume.publish(base_files)
        url = f"{base}/api/v1/rulesets/{ruleset_id(0)}/evaluate"
        body = Path(tmp) / "body.json"
        body.write_text(json.dumps({"input": sample_input(1)}))
        script = Path(tmp) / "post.lua"
        script.write_text(LUA % body.read_text())
        bare = measure_bare(runs, seconds, script)
        with sidecar_process(
            port, "--rules-dir", str(volume.root), prefix=("taskset", "-c", "0")
        ) as server:
            wait_ready(base)
            run_wrk(url, script, 2)  # warm-up
            idle = [run_wrk(url, script, seconds) for _ in range(runs)]
            steady = [run_fixed_rate(url, body, args.rate, seconds) for _ in range(runs)]
            reloader = Reloader(volume, base_files, server.pid, args.worker_core)
            checker = Checker(url)
            reloader.start()
            checker.start()
            busy = [run_fixed_rate(url, body, args.rate, seconds) for _ in range(runs)]
            reloader.stop.set()
            checker.stop.set()
            checker.join()
    print(environment())
    where = "on the server's core" if args.worker_core is None else f"on core {args.worker_core}"
    print(f"server on core 0, load on core 1, reload worker {where}")
    report("bare aiohttp (floor)", bare)
    report("evaluate, wrk", idle)
    ratio = statistics.median(r["rps"] for r in idle) / statistics.median(r["rps"] for r in bare)
    print(f"evaluate / bare aiohttp throughput: {ratio:.2f}x (target >= 0.60x)")
    report_rate(f"evaluate, {args.rate}/s", steady)
    report_rate(f"{args.rate}/s, 1 MiB every {RELOAD_EVERY:g} s", busy)
    idle_p99 = statistics.median(r["p99"] for r in steady)
    busy_p99 = statistics.median(r["p99"] for r in busy)
    ratio = busy_p99 / idle_p99
    print(f"p99 under reload / idle p99 at {args.rate}/s: {ratio:.2f}x (target <= 2x)")
    print(
        f"reloads during the run: {reloader.swaps} swaps, versions seen by the checker "
        f"{min(checker.versions, default=0)}..{max(checker.versions, default=0)}; "
        f"checker batches {checker.responses}, inconsistent or failed {len(checker.failures)}"
    )
    for failure in checker.failures[:5]:
        print("  ", failure)


def report(label: str, results: list[dict[str, float]]) -> None:
    rps = [r["rps"] for r in results]
    median_rps = statistics.median(rps)
    p50 = statistics.median(r["p50"] for r in results)
    p99 = statistics.median(r["p99"] for r in results)
    errors = sum(r["errors"] + r["socket_errors"] for r in results)
    print(
        f"{label:28s}: {median_rps:8.0f} req/s [min {min(rps):.0f} .. max {max(rps):.0f}]; "
        f"p50 {p50:.2f} ms, p99 {p99:.2f} ms (target < 5 ms); errors {errors:.0f}"
    )


def report_rate(label: str, results: list[dict[str, float]]) -> None:
    p99s = [r["p99"] for r in results]
    failed = sum(r["non_2xx"] + r["errors"] + r["scheduled"] - r["answered"] for r in results)
    print(
        f"{label:28s}: p50 {statistics.median(r['p50'] for r in results):.2f} ms, "
        f"p99 {statistics.median(p99s):.2f} ms [min {min(p99s):.2f} .. max {max(p99s):.2f}], "
        f"max {max(r['max'] for r in results):.1f} ms; failed or unanswered {failed:.0f}"
    )


if __name__ == "__main__":
    main()

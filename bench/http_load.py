"""HTTP evaluation throughput and latency, idle and while a 1 MiB rules file reloads.

Starts `rule-sidecar serve` pinned to core 0 (`taskset`) with a 50-rule ruleset, and
drives `POST /api/v1/rulesets/{id}/evaluate` with `wrk` pinned to core 1 (Debian package
`wrk`), 50 connections. Then the same while a second, 1 MiB rules file is swapped in
(`..data` swap) every second; meanwhile a checker process evaluates a batch in a loop
and verifies that every response names exactly one registry version (all results of a
batch carry the same version, which only grows).

Targets (issue 3): >= 15,000 requests/s with the server on one core, p99 < 5 ms idle;
under reload: zero errors, p99 within 2x of the idle p99.

Large reloads run in the sidecar's worker process. By default it stays on the server's
core (a sidecar limited to one CPU); `--worker-core 1` moves it to the other core once
it exists, as a sidecar allowed a second CPU would run.

    /work/venv/bin/python -m bench.http_load            # 3 idle runs + 3 under reload, 10 s each
    /work/venv/bin/python -m bench.http_load --quick    # 1 + 1 runs of 3 s
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


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _ms(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text.strip()).groups()  # type: ignore[union-attr]
    return float(number) * _UNITS[unit]


def run_wrk(url: str, script: Path, seconds: int) -> dict[str, float]:
    output = subprocess.run(
        [
            "taskset",
            "-c",
            "1",
            "wrk",
            "-t1",
            "-c50",
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
    figures = {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1)),  # type: ignore[union-attr]
        "p50": _ms(re.search(r"50%\s+(\S+)", output).group(1)),  # type: ignore[union-attr]
        "p99": _ms(re.search(r"99%\s+(\S+)", output).group(1)),  # type: ignore[union-attr]
    }
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    socket_errors = re.search(r"Socket errors: (.*)", output)
    figures["errors"] = float(errors.group(1)) if errors else 0.0
    figures["socket_errors"] = 0.0 if socket_errors is None else 1.0
    return figures


class Reloader(threading.Thread):
    """Swaps a 1 MiB rules file in every second, alternating two contents."""

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
        while not self.stop.wait(1.0):
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
    """Evaluates batches in a loop: one version per batch, versions never go back."""

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
        while not self.stop.is_set():
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--worker-core", type=int, default=None, help="move the reload worker there"
    )
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
        script = Path(tmp) / "post.lua"
        script.write_text(LUA % json.dumps({"input": sample_input(1)}))
        with sidecar_process(
            port, "--rules-dir", str(volume.root), prefix=("taskset", "-c", "0")
        ) as server:
            wait_ready(base)
            run_wrk(url, script, 2)  # warm-up
            idle = [run_wrk(url, script, seconds) for _ in range(runs)]
            reloader = Reloader(volume, base_files, server.pid, args.worker_core)
            checker = Checker(url)
            reloader.start()
            checker.start()
            busy = [run_wrk(url, script, seconds) for _ in range(runs)]
            reloader.stop.set()
            checker.stop.set()
            checker.join()
    print(environment())
    where = "on the server's core" if args.worker_core is None else f"on core {args.worker_core}"
    print(f"server on core 0, wrk on core 1, reload worker {where}")
    report("idle", idle)
    report("1 MiB reload every 1 s", busy)
    idle_p99 = statistics.median(r["p99"] for r in idle)
    busy_p99 = statistics.median(r["p99"] for r in busy)
    print(f"p99 under reload / idle p99: {busy_p99 / idle_p99:.2f}x (target <= 2x)")
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
        f"{label:24s}: {median_rps:8.0f} req/s [min {min(rps):.0f} .. max {max(rps):.0f}] "
        f"(target >= 15000: ratio {median_rps / 15000:.2f}); "
        f"p50 {p50:.2f} ms, p99 {p99:.2f} ms (target < 5 ms); errors {errors:.0f}"
    )


if __name__ == "__main__":
    main()

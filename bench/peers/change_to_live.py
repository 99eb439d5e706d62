"""Peers, change to live: a ConfigMap-style file swap until the new value answers.

Contenders, each on its own ConfigMap-style directory (`sidecar.testing.ConfigMapDir`,
the kubelet's atomic `..data` swap), changed in alternation so that load hits all alike:

- rule-sidecar: `rule-sidecar serve` as a separate process; a client evaluates over HTTP
  back to back until the new points answer (as `bench.change_to_live` does).
- flagd's Python provider in file mode (`FlagdProvider(resolver_type=ResolverType.FILE,
  offline_flag_source_path=..., deadline_ms=...)`, in-process, after
  `api.set_provider_and_wait`): it polls the file's modification time every
  `deadline_ms`; at its default 500 ms and at 50 ms. The flag expresses the same
  condition (`amount > 10` -> the new value). Polled back to back in-process.
- The design this project started from, as a baseline written only here: a mutable cache under an
  `RLock`, refreshed by a thread that re-reads the file every 30 s. Far fewer changes
  (each waits up to 30 s): `--baseline-changes`, 6 by default.

    /work/venv/bin/python -m bench.peers.change_to_live              # 100 changes, ~5 min
    /work/venv/bin/python -m bench.peers.change_to_live --quick      # 20, no baseline

Needs `pip install -e '.[peers]'` (openfeature-provider-flagd).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
from openfeature import api
from openfeature.contrib.provider.flagd import FlagdProvider
from openfeature.contrib.provider.flagd.config import ResolverType
from openfeature.evaluation_context import EvaluationContext

from bench._common import environment, fmt_ms, free_port, quantile, sidecar_process, wait_ready
from bench.change_to_live import RULES, poll_live
from sidecar.testing import ConfigMapDir

CONTEXT = EvaluationContext(attributes={"amount": 100})


def flag(points: int) -> str:
    return json.dumps(
        {
            "flags": {
                "points": {
                    "state": "ENABLED",
                    "variants": {"low": 0, "high": points},
                    "defaultVariant": "low",
                    "targeting": {"if": [{">": [{"var": "amount"}, 10]}, "high", "low"]},
                }
            }
        }
    )


class PollingCache:
    """The design this project started from (baseline only): a dict under an RLock,
    re-read every interval."""

    def __init__(self, path: Path, interval: float) -> None:
        self._path, self._interval = path, interval
        self._lock = threading.RLock()
        self._points = self._read()
        self._stop = threading.Event()
        threading.Thread(target=self._poll, daemon=True).start()

    def _read(self) -> int:
        return int(json.loads(self._path.read_text())["points"])

    def _poll(self) -> None:
        while not self._stop.wait(self._interval):
            points = self._read()
            with self._lock:
                self._points = points

    def points(self) -> int:
        with self._lock:
            return self._points

    def close(self) -> None:
        self._stop.set()


def wait_for(read: Callable[[], Any], expected: Any, started: float, timeout: float) -> float:
    while read() != expected:
        if time.perf_counter() - started > timeout:
            raise TimeoutError(f"{expected} not live within {timeout} s")
        time.sleep(0.0005)
    return time.perf_counter() - started


async def run(changes: int, baseline_changes: int) -> None:
    results: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        ours = ConfigMapDir(root / "sidecar")
        ours.publish({"rules.yaml": RULES.format(points=1)})
        flagd_dirs: dict[int, ConfigMapDir] = {}
        clients = {}
        for poll_ms in (500, 50):
            directory = ConfigMapDir(root / f"flagd-{poll_ms}")
            directory.publish({"flags.json": flag(1)})
            provider = FlagdProvider(
                resolver_type=ResolverType.FILE,
                offline_flag_source_path=str(directory.root / "flags.json"),
                deadline_ms=poll_ms,
            )
            api.set_provider_and_wait(provider, domain=f"flagd-{poll_ms}")
            flagd_dirs[poll_ms], clients[poll_ms] = directory, api.get_client(f"flagd-{poll_ms}")
        with sidecar_process(port, "--rules-dir", str(ours.root)):
            async with aiohttp.ClientSession() as session:
                await wait_ready(session, base, time.monotonic() + 20)
                rng = random.Random(3)
                for i in range(changes):
                    points = i + 2
                    # A random pause before each change: changes land at random phases
                    # of the pollers (a fixed loop period would lock onto them).
                    await asyncio.sleep(rng.uniform(0.05, 0.55))
                    started = time.perf_counter()
                    ours.publish({"rules.yaml": RULES.format(points=points)})
                    live = await asyncio.wait_for(poll_live(session, base, points), 10)
                    results.setdefault("rule-sidecar (separate process, HTTP)", []).append(
                        live - started
                    )
                    for poll_ms, directory in flagd_dirs.items():
                        await asyncio.sleep(rng.uniform(0.05, 0.55))
                        started = time.perf_counter()
                        directory.publish({"flags.json": flag(points)})
                        client = clients[poll_ms]
                        elapsed = wait_for(
                            lambda c=client: c.get_integer_value("points", -1, CONTEXT),
                            points,
                            started,
                            10,
                        )
                        results.setdefault(f"flagd file mode, {poll_ms} ms poll", []).append(
                            elapsed
                        )
        api.shutdown()
        if baseline_changes:
            seed = ConfigMapDir(root / "seed")
            seed.publish({"rules.json": json.dumps({"points": 1})})
            cache = PollingCache(seed.root / "rules.json", 30.0)
            for i in range(baseline_changes):
                time.sleep(i * 4.7 % 30)  # spread the changes over the polling phase
                started = time.perf_counter()
                seed.publish({"rules.json": json.dumps({"points": i + 2})})
                elapsed = wait_for(cache.points, i + 2, started, 40)
                results.setdefault("seed baseline (RLock, 30 s poll)", []).append(elapsed)
            cache.close()
    print(environment())
    print(f"changes: {changes} (baseline: {baseline_changes})")
    ours_median = quantile(results["rule-sidecar (separate process, HTTP)"], 0.5)
    for name, values in results.items():
        p99 = quantile(values, 0.99) * 1000
        ratio = quantile(values, 0.5) / ours_median
        print(f"{name:40s} {fmt_ms(values)}; p99 {p99:.1f} ms ({ratio:.1f}x ours)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20 changes, no baseline")
    parser.add_argument("--changes", type=int, default=100)
    parser.add_argument("--baseline-changes", type=int, default=6)
    args = parser.parse_args()
    changes = 20 if args.quick else args.changes
    asyncio.run(run(changes, 0 if args.quick else args.baseline_changes))


if __name__ == "__main__":
    main()

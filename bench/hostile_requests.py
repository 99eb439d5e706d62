"""Hostile requests against `rule-sidecar serve`: /livez p99 and peak RSS while they run.

Starts the sidecar with a probe listener (`--metrics-port`) on the `fraud` ruleset and,
for each attack, polls `/livez` on the probe listener every 10 ms (what the kubelet sees)
and samples the server's RSS every 10 ms. The attacks:

1. the issue's batch: 300,000 `{}` inputs (600 KB), default limits (refused: 413);
2. the same batch with every batch limit raised, so that all of it is evaluated (the
   slicing alone keeps the loop free; memory is then the answer's, 80 MB of JSON);
3. eight clients sending the largest batch the defaults allow (1,000 inputs), 5 s;
4. a flood of 400 idle connections on the API listener (cap 256 by default).

`--code DIR` runs another checkout's `sidecar` (e.g. an export of main) for comparison;
`--quick` leaves out the second attack and runs the third for 2 s.

    python -m bench.hostile_requests [--quick]
    git archive main sidecar | tar -x -C /tmp/main
    python -m bench.hostile_requests --code /tmp/main
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import hashlib
import http.client
import multiprocessing
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event
from pathlib import Path

import aiohttp
import yaml

from bench._common import environment, free_port, quantile

FRAUD = {
    "apiVersion": "rule-sidecar/v1",
    "kind": "RuleSet",
    "metadata": {"id": "fraud"},
    "spec": {
        "rules": [
            {"id": "large", "condition": "input.amount > 1000", "points": 40},
            {"id": "foreign", "condition": "input.country != 'US'", "points": 30},
        ],
        "decisions": [{"decision": "deny", "min_points": 70}],
        "default_decision": "allow",
    },
}
HUGE = b'{"inputs":[' + b",".join([b"{}"] * 300_000) + b"]}"
LARGEST = b'{"inputs":[' + b",".join([b'{"amount":5000,"country":"FR"}'] * 1000) + b"]}"
EVALUATE = "/api/v1/rulesets/fraud/evaluate"


def rss_of(pid: int) -> int:
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class RssSampler:
    """The peak RSS of a process while the `with` block runs."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_of(self.pid))
            time.sleep(0.01)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()


@contextlib.contextmanager
def sidecar(code: Path, rules: Path, **settings: str) -> Iterator[tuple[int, int, int]]:
    """(pid, API port, probe port) of a `rule-sidecar serve` running `code`'s sidecar."""
    port, probe = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RULE_SIDECAR_")}
    env.update(
        PYTHONPATH=str(code),
        RULE_SIDECAR_LOG_LEVEL="ERROR",
        RULE_SIDECAR_METRICS_PORT=str(probe),
        **{f"RULE_SIDECAR_{k.upper()}": v for k, v in settings.items()},
    )
    command = [sys.executable, "-m", "sidecar.cli", "serve", "--port", str(port)]
    process = subprocess.Popen([*command, "--rules-dir", str(rules)], env=env, cwd=code)
    try:
        yield process.pid, port, probe
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def ready(session: aiohttp.ClientSession, probe: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with contextlib.suppress(aiohttp.ClientError):
            async with session.get(f"http://127.0.0.1:{probe}/readyz") as response:
                if response.status == 200:
                    return
        await asyncio.sleep(0.05)
    raise RuntimeError("the sidecar did not become ready")


def poll_livez(probe: int, started: Event, stop: Event, results: Connection) -> None:
    """In a process of its own (the attackers' parsing must not delay the measurement):
    GET /livez every 10 ms on one kept-alive connection, send back the latencies."""
    latencies: list[float] = []
    connection = http.client.HTTPConnection("127.0.0.1", probe, timeout=120)
    while not stop.is_set():
        began = time.perf_counter()
        connection.request("GET", "/livez")
        connection.getresponse().read()
        latencies.append(time.perf_counter() - began)
        started.set()
        time.sleep(0.01)
    results.send(latencies)


async def measure(
    pid: int, probe: int, attack: Callable[[], Awaitable[str]]
) -> tuple[str, list[float], int]:
    """Run `attack` while polling /livez: (what the attack saw, latencies, peak RSS)."""
    context = multiprocessing.get_context("spawn")
    started, stop = context.Event(), context.Event()
    receiver, sender = context.Pipe(duplex=False)
    poller = context.Process(target=poll_livez, args=(probe, started, stop, sender))
    poller.start()
    await asyncio.to_thread(started.wait, 60)
    with RssSampler(pid) as rss:
        await asyncio.sleep(0.3)
        outcome = await attack()
        stop.set()
        latencies: list[float] = await asyncio.to_thread(receiver.recv)
    poller.join()
    return outcome, latencies, rss.peak


async def huge_batch(port: int) -> str:
    began = time.perf_counter()
    timeout = aiohttp.ClientTimeout(total=300)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.post(
            f"http://127.0.0.1:{port}{EVALUATE}",
            data=HUGE,
            headers={"Content-Type": "application/json"},
        ) as response,
    ):
        body = await response.read()
    return f"{response.status}, {len(body):,} bytes in {time.perf_counter() - began:.2f} s"


async def largest_batches(port: int, seconds: float) -> str:
    answered: dict[int, int] = {}
    stop = time.monotonic() + seconds

    async def client() -> None:
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < stop:
                async with session.post(
                    f"http://127.0.0.1:{port}{EVALUATE}",
                    data=LARGEST,
                    headers={"Content-Type": "application/json"},
                ) as response:
                    await response.read()
                    answered[response.status] = answered.get(response.status, 0) + 1

    await asyncio.gather(*(client() for _ in range(8)))
    return f"answers {answered} in {seconds:g} s"


async def idle_flood(port: int) -> str:
    sockets: list[socket.socket] = []
    refused = 0
    for _ in range(400):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setblocking(False)
        sockets.append(sock)
    await asyncio.sleep(1.0)
    for sock in sockets:
        with contextlib.suppress(BlockingIOError):
            if sock.recv(64).startswith(b"HTTP/1.1 503"):
                refused += 1
    await asyncio.sleep(1.0)
    for sock in sockets:
        sock.close()
    return f"{refused} of 400 refused with 503"


def report(name: str, outcome: str, latencies: list[float], peak: int) -> None:
    worst = max(latencies) if latencies else float("nan")
    p99 = quantile(latencies, 0.99) if latencies else float("nan")
    print(
        f"{name}\n    attack: {outcome}\n    /livez: n={len(latencies)} "
        f"p50 {quantile(latencies, 0.5) * 1e3:.1f} ms  p99 {p99 * 1e3:.1f} ms  "
        f"max {worst * 1e3:.1f} ms\n    peak RSS {peak / 2**20:.0f} MiB"
    )


def digest(code: Path) -> str:
    """The digest `environment()` prints, of the code under test."""
    hashed = hashlib.sha256()
    for path in sorted((code / "sidecar").rglob("*.py")):
        hashed.update(path.relative_to(code / "sidecar").as_posix().encode())
        hashed.update(path.read_bytes())
    return hashed.hexdigest()[:12]


async def main(code: Path, quick: bool) -> None:
    print(environment())
    print(f"code under test: {code} (digest {digest(code)})")
    with tempfile.TemporaryDirectory() as tmp:
        rules = Path(tmp) / "rules"
        rules.mkdir()
        (rules / "fraud.yaml").write_text(yaml.safe_dump(FRAUD), encoding="utf-8")
        raised = {
            "max_batch_items": "1000000",
            "max_evaluation_seconds": "600",
            "max_response_bytes": str(1 << 30),
        }
        seconds = 2.0 if quick else 5.0
        attacks: list[tuple[str, dict[str, str], Callable[[int], Awaitable[str]]]] = [
            ("1. 300k-input batch, default limits", {}, huge_batch),
            ("2. 300k-input batch, batch limits raised", raised, huge_batch),
            (
                f"3. 8 clients x 1,000-input batches, {seconds:g} s",
                {},
                functools.partial(largest_batches, seconds=seconds),
            ),
            ("4. 400 idle connections on the API listener", {}, idle_flood),
        ]
        if quick:
            del attacks[1]
        for name, settings, attack in attacks:
            with sidecar(code, rules, **settings) as (pid, port, probe):
                async with aiohttp.ClientSession() as session:
                    await ready(session, probe)
                report(name, *await measure(pid, probe, functools.partial(attack, port)))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--code",
        type=Path,
        default=Path(__file__).resolve().parent.parent,
        help="the directory holding the `sidecar` package to run",
    )
    parser.add_argument("--quick", action="store_true", help="a shorter run")
    arguments = parser.parse_args()
    asyncio.run(main(arguments.code.resolve(), arguments.quick))

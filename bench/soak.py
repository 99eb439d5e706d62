"""Soak: evaluators and WebSocket listeners while the rules change every 100 ms.

A real `rule-sidecar serve` process on a ConfigMap-style directory. For `--seconds`
(180 by default): 50 evaluators POST back to back; 10 WebSocket listeners follow the
events; every 100 ms a new rules file is swapped in (`sidecar.testing.ConfigMapDir`),
every fifth one broken (a CEL syntax error). Checked and reported:

- failed requests (anything but 200, or a connection error): must be 0;
- consistency: every answer that names registry version V has the same total points
  (a request sees one snapshot, never a mix), and V never goes back for one evaluator;
- announcements: each listener sees every published version exactly once, in order
  (`rules_reloaded` version_after 2, 3, 4, ... with no gap and no repeat), and a
  `reload_failed` for broken files;
- resources of the server process: RSS and open file descriptors after warm-up and at
  the end, both measured with no client connected (growth), and WebSocket clients back
  to 0 once the listeners leave.

    /work/venv/bin/python -m bench.soak                 # 3 minutes
    /work/venv/bin/python -m bench.soak --seconds 1800  # longer
    /work/venv/bin/python -m bench.soak --quick         # 20 s
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import aiohttp

from bench._common import environment, free_port, sidecar_process, wait_ready
from sidecar.testing import ConfigMapDir

EVALUATORS = 50
LISTENERS = 10
CHANGE_EVERY_S = 0.1
BROKEN_EVERY = 5

RULES = """\
apiVersion: rule-sidecar/v1
kind: RuleSet
metadata: {{id: soak}}
spec:
  rules:
    - {{id: changing, condition: "{condition}", points: {points}}}
    - {{id: steady, condition: "input.amount > 1", points: 1}}
"""


def rules(serial: int) -> str:
    broken = serial % BROKEN_EVERY == 0
    condition = "input.amount >" if broken else "input.amount > 10"
    return RULES.format(condition=condition, points=serial)


def process_resources(pid: int) -> tuple[int, int]:
    """(RSS in KiB, open file descriptors) of a process, from /proc."""
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


class Tally:
    """What the clients saw."""

    def __init__(self) -> None:
        self.requests = 0
        self.failures: list[str] = []
        self.totals: dict[int, set[int]] = defaultdict(set)
        self.went_back = 0
        self.announced: list[list[int]] = []
        self.failed_events = 0
        self.rss_samples: list[float] = []


async def evaluator(session: aiohttp.ClientSession, url: str, until: float, tally: Tally) -> None:
    last_version = 0
    while time.monotonic() < until:
        try:
            async with session.post(url, json={"input": {"amount": 100}}) as response:
                body = await response.json()
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            tally.failures.append(repr(exc))
            continue
        tally.requests += 1
        if status != 200:
            tally.failures.append(f"{status}: {body}")
            continue
        version = body["registry_version"]
        tally.totals[version].add(body["total_points"])
        tally.went_back += version < last_version
        last_version = version


async def listener(session: aiohttp.ClientSession, url: str, until: float, tally: Tally) -> None:
    versions: list[int] = []
    tally.announced.append(versions)
    async with session.ws_connect(url) as ws:
        while time.monotonic() < until:
            try:
                message = await ws.receive_json(timeout=0.5)
            except TimeoutError:
                continue
            if message["event_type"] == "rules_reloaded":
                versions.append(message["data"]["version_after"])
            elif message["event_type"] == "reload_failed":
                tally.failed_events += 1


async def sampler(pid: int, until: float, every: float, samples: list[float]) -> None:
    """The server's RSS (MiB) at regular times: growth that flattens is not a leak."""
    while time.monotonic() < until:
        await asyncio.sleep(every)
        samples.append(process_resources(pid)[0] / 1024)


async def changer(volume: ConfigMapDir, until: float) -> int:
    serial = 1
    while time.monotonic() < until:
        await asyncio.sleep(CHANGE_EVERY_S)
        serial += 1
        volume.publish({"rules.yaml": rules(serial)})
    return serial - 1


async def run(seconds: float) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    tally = Tally()
    with tempfile.TemporaryDirectory() as tmp:
        volume = ConfigMapDir(Path(tmp) / "rules")
        volume.publish({"rules.yaml": rules(1)})
        with sidecar_process(
            port, "--rules-dir", str(volume.root), RULE_SIDECAR_LOG_LEVEL="ERROR"
        ) as server:
            async with aiohttp.ClientSession() as session:
                await wait_ready(session, base, time.monotonic() + 20)
                await warm_up(session, base)
            await asyncio.sleep(1.0)
            rss_start, fds_start = process_resources(server.pid)
            connector = aiohttp.TCPConnector(limit=EVALUATORS + LISTENERS + 10)
            async with aiohttp.ClientSession(connector=connector) as session:
                until = time.monotonic() + seconds
                evaluate_url = f"{base}/api/v1/rulesets/soak/evaluate"
                socket_url = base.replace("http", "ws") + "/ws/hot-reload"
                tasks = [evaluator(session, evaluate_url, until, tally) for _ in range(EVALUATORS)]
                tasks += [listener(session, socket_url, until, tally) for _ in range(LISTENERS)]
                tasks.append(sampler(server.pid, until, seconds / 6, tally.rss_samples))
                started = time.monotonic()
                changes, *_ = await asyncio.gather(changer(volume, until), *tasks)
                elapsed = time.monotonic() - started
            await asyncio.sleep(1.0)  # every client connection is closed now
            rss_end, fds_end = process_resources(server.pid)
            async with aiohttp.ClientSession() as session, session.get(f"{base}/metrics") as got:
                metrics = await got.text()
    report(
        tally,
        seconds=seconds,
        elapsed=elapsed,
        changes=changes,
        rss=(rss_start, rss_end),
        fds=(fds_start, fds_end),
        metrics=metrics,
    )


async def warm_up(session: aiohttp.ClientSession, base: str) -> None:
    for _ in range(200):
        async with session.post(
            f"{base}/api/v1/rulesets/soak/evaluate", json={"input": {"amount": 100}}
        ) as response:
            await response.read()


def report(
    tally: Tally,
    *,
    seconds: float,
    elapsed: float,
    changes: int,
    rss: tuple[int, int],
    fds: tuple[int, int],
    metrics: str,
) -> None:
    mixed = {v: sorted(t) for v, t in tally.totals.items() if len(t) > 1}
    clients = next(
        line.split()[-1]
        for line in metrics.splitlines()
        if line.startswith("rule_sidecar_websocket_clients ")
    )
    gaps = 0
    for versions in tally.announced:
        expected = list(range(versions[0], versions[0] + len(versions))) if versions else []
        gaps += versions != expected
    counts = {len(versions) for versions in tally.announced}
    print(environment())
    print(f"{seconds:.0f} s; {EVALUATORS} evaluators, {LISTENERS} listeners")
    print(
        f"rules changes: {changes} (every {CHANGE_EVERY_S * 1000:.0f} ms, every "
        f"{BROKEN_EVERY}th broken)"
    )
    print(
        f"requests: {tally.requests} ({tally.requests / elapsed:.0f}/s); "
        f"failed: {len(tally.failures)} {tally.failures[:3]}"
    )
    print(
        f"versions answered: {len(tally.totals)}; versions with mixed totals: "
        f"{len(mixed)} {dict(list(mixed.items())[:3])}; answers going back a version: "
        f"{tally.went_back}"
    )
    print(
        f"announcements per listener: {sorted(counts)}; listeners with a gap or repeat: "
        f"{gaps}; reload_failed events seen: {tally.failed_events}"
    )
    print(
        f"server RSS: {rss[0] / 1024:.1f} -> {rss[1] / 1024:.1f} MiB "
        f"({(rss[1] - rss[0]) / 1024:+.1f}); open fds: {fds[0]} -> {fds[1]} "
        f"({fds[1] - fds[0]:+d}); WebSocket clients after: {clients}"
    )
    samples = " ".join(f"{sample:.1f}" for sample in tally.rss_samples)
    print(f"server RSS every sixth of the run (MiB): {samples}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=180.0)
    parser.add_argument("--quick", action="store_true", help="20 seconds")
    args = parser.parse_args()
    asyncio.run(run(20.0 if args.quick else args.seconds))


if __name__ == "__main__":
    main()

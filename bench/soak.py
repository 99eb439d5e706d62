"""Soak: evaluators and WebSocket listeners while files and database rules change every 100 ms.

A real `rule-sidecar serve` process on two sources at once: a ConfigMap-style directory
(`--rules-dir`, ruleset `soak`) and a scratch PostgreSQL database (`--database-url`,
ruleset `soak-db`, whose changes reach the sidecar by LISTEN/NOTIFY). For `--seconds`
(180 by default): 50 evaluators POST back to back, half to `soak` and half to `soak-db`;
10 WebSocket listeners follow the events; every 100 ms a new rules file is swapped in
(`sidecar.testing.ConfigMapDir`), and independently, every 100 ms, one UPDATE of the
database's `db-changing` rule is committed in its own transaction. Every fifth change of
each is broken (a CEL syntax error); a broken source fails the whole reload (all or
nothing), so while one is broken the other's changes wait for it. Checked and reported:

- failed requests (anything but 200, or a connection error): must be 0;
- consistency: every answer that names ruleset R and registry version V has the same
  total points as every other answer for (R, V) (a request sees one snapshot, never a
  mix), and V never goes back for one evaluator;
- announcements: versions are global across the sources; each listener sees every
  published version exactly once, in order (`rules_reloaded` version_after 2, 3, 4, ...
  with no gap and no repeat), and `reload_failed` events are counted; the server's own
  reload counters (`rule_sidecar_rule_reloads_total`) for comparison;
- resources of the server process: RSS, open file descriptors and asyncio tasks
  (`rule_sidecar_asyncio_tasks`) after warm-up and at the end, each time with no client
  connected (growth), and WebSocket clients back to 0 once the listeners leave.

`--no-database` keeps the files-only run (ruleset `soak` only, no PostgreSQL). Otherwise
it needs PostgreSQL on 127.0.0.1:5432 (trust auth, user `postgres`, or `--admin-url`); the
scratch database `rs_bench_<hex>` is dropped at the end.

    /work/venv/bin/python -m bench.soak                 # 3 minutes
    /work/venv/bin/python -m bench.soak --seconds 1800  # longer
    /work/venv/bin/python -m bench.soak --quick         # 20 s
    /work/venv/bin/python -m bench.soak --no-database   # files only
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import psycopg
from prometheus_client.parser import text_string_to_metric_families

from bench._common import environment, free_port, sidecar_process, wait_ready
from bench.database import ADMIN_URL, scratch_database
from sidecar import dbtools
from sidecar.testing import ConfigMapDir

EVALUATORS = 50
LISTENERS = 10
CHANGE_EVERY_S = 0.1
BROKEN_EVERY = 5
SETTLE_S = 1.0  # listeners stay this long after the last change, for the last reloads

FILE_RULESET = "soak"
DATABASE_RULESET = "soak-db"
# Rule ids are unique across every ruleset of every source: the database's have their own.
DATABASE_CHANGING = "db-changing"
DATABASE_STEADY = "db-steady"

RULES = """\
apiVersion: rule-sidecar/v1
kind: RuleSet
metadata: {{id: soak}}
spec:
  rules:
    - {{id: changing, condition: "{condition}", points: {points}}}
    - {{id: steady, condition: "input.amount > 1", points: 1}}
"""


def condition(serial: int) -> str:
    """The changing rule's condition: every fifth one does not compile."""
    return "input.amount >" if serial % BROKEN_EVERY == 0 else "input.amount > 10"


def rules(serial: int) -> str:
    return RULES.format(condition=condition(serial), points=serial)


def seed_database(url: str) -> None:
    """The tables, and ruleset `soak-db` with a changing and a steady rule."""
    dbtools.init(url)
    with psycopg.connect(url) as connection:
        connection.execute(
            "INSERT INTO rule_sidecar_rulesets (id) VALUES (%s)", (DATABASE_RULESET,)
        )
        connection.execute(
            "INSERT INTO rule_sidecar_rules (id, ruleset_id, position, condition, points)"
            " VALUES (%s, %s, 0, %s, 1), (%s, %s, 1, 'input.amount > 1', 1)",
            (DATABASE_CHANGING, DATABASE_RULESET, condition(1), DATABASE_STEADY, DATABASE_RULESET),
        )


def process_resources(pid: int) -> tuple[int, int]:
    """(RSS in KiB, open file descriptors) of a process, from /proc."""
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def metric_samples(metrics: str, name: str) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of every sample named `name` in Prometheus text output."""
    return [
        (sample.labels, sample.value)
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
        if sample.name == name
    ]


@dataclass(frozen=True)
class Resources:
    """The server process with no client connected."""

    rss_kib: int
    fds: int
    tasks: int
    websocket_clients: int
    metrics: str


async def measure(pid: int, base: str) -> Resources:
    rss, fds = process_resources(pid)  # before the scrape opens a connection
    async with aiohttp.ClientSession() as session, session.get(f"{base}/metrics") as got:
        metrics = await got.text()
    return Resources(
        rss_kib=rss,
        fds=fds,
        tasks=int(metric_samples(metrics, "rule_sidecar_asyncio_tasks")[0][1]),
        websocket_clients=int(metric_samples(metrics, "rule_sidecar_websocket_clients")[0][1]),
        metrics=metrics,
    )


class Tally:
    """What the clients saw."""

    def __init__(self) -> None:
        self.requests: dict[str, int] = defaultdict(int)
        self.failures: list[str] = []
        self.totals: dict[tuple[str, int], set[int]] = defaultdict(set)
        self.went_back = 0
        self.announced: list[list[int]] = []
        self.failed_events = 0
        self.rss_samples: list[float] = []


async def evaluator(
    session: aiohttp.ClientSession, base: str, ruleset: str, until: float, tally: Tally
) -> None:
    url = f"{base}/api/v1/rulesets/{ruleset}/evaluate"
    last_version = 0
    while time.monotonic() < until:
        try:
            async with session.post(url, json={"input": {"amount": 100}}) as response:
                body = await response.json()
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            tally.failures.append(repr(exc))
            continue
        tally.requests[ruleset] += 1
        if status != 200:
            tally.failures.append(f"{ruleset} {status}: {body}")
            continue
        version = body["registry_version"]
        tally.totals[ruleset, version].add(body["total_points"])
        tally.went_back += version < last_version
        last_version = version


async def listener(
    session: aiohttp.ClientSession,
    url: str,
    connected: asyncio.Event,
    stop: asyncio.Event,
    tally: Tally,
) -> None:
    versions: list[int] = []
    tally.announced.append(versions)
    async with session.ws_connect(url) as ws:
        connected.set()
        while not stop.is_set():
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


async def changer(change: Callable[[int], Awaitable[None]], until: float) -> int:
    """`change(serial)` every 100 ms, serials 2, 3, ...; returns how many were made."""
    serial = 1
    while True:
        await asyncio.sleep(CHANGE_EVERY_S)
        if time.monotonic() >= until:
            return serial - 1
        serial += 1
        await change(serial)


async def file_changer(volume: ConfigMapDir, until: float) -> int:
    async def swap(serial: int) -> None:
        volume.publish({"rules.yaml": rules(serial)})

    return await changer(swap, until)


async def database_changer(url: str, until: float) -> int:
    """UPDATE the changing rule; each change committed on its own."""
    async with await psycopg.AsyncConnection.connect(url) as connection:

        async def update(serial: int) -> None:
            await connection.execute(
                "UPDATE rule_sidecar_rules SET condition = %s, points = %s WHERE id = %s",
                (condition(serial), serial, DATABASE_CHANGING),
            )
            await connection.commit()

        return await changer(update, until)


async def run(seconds: float, admin_url: str | None) -> None:
    if admin_url is None:
        await soak(seconds, None)
        return
    with scratch_database(admin_url) as url:
        seed_database(url)
        await soak(seconds, url)


async def soak(seconds: float, database_url: str | None) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    tally = Tally()
    rulesets = [FILE_RULESET] if database_url is None else [FILE_RULESET, DATABASE_RULESET]
    with tempfile.TemporaryDirectory() as tmp:
        volume = ConfigMapDir(Path(tmp) / "rules")
        volume.publish({"rules.yaml": rules(1)})
        arguments = ["--rules-dir", str(volume.root)]
        if database_url is not None:
            arguments += ["--database-url", database_url]
        with sidecar_process(port, *arguments, RULE_SIDECAR_LOG_LEVEL="ERROR") as server:
            async with aiohttp.ClientSession() as session:
                await wait_ready(session, base, time.monotonic() + 20)
                await warm_up(session, base, rulesets)
            await asyncio.sleep(1.0)
            start = await measure(server.pid, base)
            connector = aiohttp.TCPConnector(limit=EVALUATORS + LISTENERS + 10)
            async with aiohttp.ClientSession(connector=connector) as session:
                # The listeners are connected before the first change, and stay until
                # the last reload has been announced.
                socket_url = base.replace("http", "ws") + "/ws/hot-reload"
                connected = [asyncio.Event() for _ in range(LISTENERS)]
                stop = asyncio.Event()
                listening = [
                    asyncio.create_task(listener(session, socket_url, event, stop, tally))
                    for event in connected
                ]
                await asyncio.wait_for(asyncio.gather(*(e.wait() for e in connected)), 10)
                until = time.monotonic() + seconds
                clients = [
                    evaluator(session, base, rulesets[i % len(rulesets)], until, tally)
                    for i in range(EVALUATORS)
                ]
                clients.append(sampler(server.pid, until, seconds / 6, tally.rss_samples))
                changers = [file_changer(volume, until)]
                if database_url is not None:
                    changers.append(database_changer(database_url, until))
                running = [asyncio.create_task(client) for client in clients]
                changes = await asyncio.gather(*changers)
                await asyncio.gather(*running)
                await asyncio.sleep(SETTLE_S)
                stop.set()
                await asyncio.gather(*listening)
            await asyncio.sleep(1.0)  # every client connection is closed now
            end = await measure(server.pid, base)
    report(
        tally,
        seconds=seconds,
        rulesets=rulesets,
        changes=changes,
        start=start,
        end=end,
    )


async def warm_up(session: aiohttp.ClientSession, base: str, rulesets: list[str]) -> None:
    for i in range(200):
        async with session.post(
            f"{base}/api/v1/rulesets/{rulesets[i % len(rulesets)]}/evaluate",
            json={"input": {"amount": 100}},
        ) as response:
            await response.read()


def reloads_by_outcome(metrics: str) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for labels, value in metric_samples(metrics, "rule_sidecar_rule_reloads_total"):
        counts[labels["outcome"]] += int(value)
    return dict(sorted(counts.items()))


def report(
    tally: Tally,
    *,
    seconds: float,
    rulesets: list[str],
    changes: list[int],
    start: Resources,
    end: Resources,
) -> None:
    mixed = {key: sorted(t) for key, t in tally.totals.items() if len(t) > 1}
    # Every version published while the listeners were connected, once each, in order.
    first, last = (
        int(metric_samples(r.metrics, "rule_sidecar_registry_version")[0][1]) for r in (start, end)
    )
    published = list(range(first + 1, last + 1))
    wrong = sum(versions != published for versions in tally.announced)
    counts = {len(versions) for versions in tally.announced}
    per_ruleset = ", ".join(f"{r} {tally.requests[r]}" for r in rulesets)
    pairs = ", ".join(
        f"{r} {sum(1 for ruleset, _ in tally.totals if ruleset == r)}" for r in rulesets
    )
    sources = "files + PostgreSQL" if len(rulesets) > 1 else "files only"
    requests = sum(tally.requests.values())
    print(environment())
    print(
        f"{seconds:.0f} s; sources: {sources}; {EVALUATORS} evaluators (split over "
        f"{', '.join(rulesets)}), {LISTENERS} listeners"
    )
    changed = ", ".join(
        f"{source} {count}" for source, count in zip(("files", "database"), changes, strict=False)
    )
    print(
        f"rules changes: {changed} (each every {CHANGE_EVERY_S * 1000:.0f} ms, every "
        f"{BROKEN_EVERY}th broken)"
    )
    print(
        f"requests: {requests} ({requests / seconds:.0f}/s; {per_ruleset}); "
        f"failed: {len(tally.failures)} {tally.failures[:3]}"
    )
    print(
        f"(ruleset, version) pairs answered: {len(tally.totals)} ({pairs}); with mixed "
        f"totals: {len(mixed)} {dict(list(mixed.items())[:3])}; answers going back a "
        f"version: {tally.went_back}"
    )
    print(
        f"versions published: {len(published)} ({first + 1}..{last}); announcements per "
        f"listener: {sorted(counts)}; listeners with a gap, repeat or miss: {wrong}; "
        f"reload_failed events seen (all listeners): {tally.failed_events}"
    )
    print(f"server's reloads by outcome: {reloads_by_outcome(end.metrics)}")
    print(
        f"server RSS: {start.rss_kib / 1024:.1f} -> {end.rss_kib / 1024:.1f} MiB "
        f"({(end.rss_kib - start.rss_kib) / 1024:+.1f}); open fds: {start.fds} -> {end.fds} "
        f"({end.fds - start.fds:+d}); asyncio tasks: {start.tasks} -> {end.tasks} "
        f"({end.tasks - start.tasks:+d}); WebSocket clients after: {end.websocket_clients}"
    )
    samples = " ".join(f"{sample:.1f}" for sample in tally.rss_samples)
    print(f"server RSS every sixth of the run (MiB): {samples}")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=float, default=180.0)
    parser.add_argument("--quick", action="store_true", help="20 seconds")
    parser.add_argument(
        "--no-database", action="store_true", help="files only, no PostgreSQL needed"
    )
    parser.add_argument("--admin-url", default=ADMIN_URL, help=f"[{ADMIN_URL}]")
    args = parser.parse_args()
    seconds = 20.0 if args.quick else args.seconds
    asyncio.run(run(seconds, None if args.no_database else args.admin_url))


if __name__ == "__main__":
    main()

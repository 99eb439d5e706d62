"""Fleet: N sidecars on one PostgreSQL database, or on one Kubernetes API server.

Each sidecar is a real `rule-sidecar serve` process (one per pod), with a few small
rulesets, the reload worker off, no periodic verification and a resync interval of 1 h,
so that only a change signal (NOTIFY, a watch event) makes it reload. The bench listens
to every pod's `/ws/hot-reload` and, for each change, times each pod's `rules_reloaded`
event; "every pod live" is the slowest pod of a change.

1. PostgreSQL: every pod on one scratch database `rs_bench_<hex>` (tables from
   `dbtools.init`; 127.0.0.1:5432, trust auth). Connections the fleet holds on it when
   idle (`pg_stat_activity` of that database, by the last statement each ran: a pod's
   one connection says `LISTEN` again after each read and as its heartbeat, so another
   last statement is a connection of something else), the peak while the
   changes run (sampled every 2 ms) and the connections opened meanwhile; then
   `--changes` UPDATEs of one rule's points, spaced, each timed from the `COMMIT` to each
   pod's event (the clock starts as it is sent: on a busy machine a stamp taken after it
   returns can be late, which would count an event as early). A fleet whose peak would
   leave fewer than `SPARE_CONNECTIONS` of the server's `max_connections` to its other
   users (this server is shared) is made smaller, and says so: at 1 connection per pod,
   PostgreSQL's default 100 leaves room for 80 pods.
2. Kubernetes API: every pod watching one `sidecar.testing.FakeKubernetes` (the
   list/watch protocol over HTTP): watches open on the server, and `--changes` updates of
   one ConfigMap, each timed from just before the update to each pod's event.
Both: RSS of each pod (VmRSS) after the changes.

    /work/venv/bin/python -m bench.fleet            # 10 and 50 pods, about 2 minutes
    /work/venv/bin/python -m bench.fleet --quick    # 3 pods, < 20 s
    /work/venv/bin/python -m bench.fleet --sizes 20 --source database   # one fleet
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psycopg

from bench._common import environment, free_port, quantile, sidecar_command, wait_ready
from bench.database import ADMIN_URL, scratch_database
from sidecar import dbtools
from sidecar.testing import FakeKubernetes

RULESETS = 3
CHANGING = "fleet-0-changing"  # the rule whose points each change sets
SPACING_S = 0.2  # pause after every pod reported a change, before the next one
EVENT_TIMEOUT_S = 60.0
SPARE_CONNECTIONS = 20  # left to the server's other users
POD_ENV = {
    "RULE_SIDECAR_RELOAD_WORKER": "false",
    "RULE_SIDECAR_VERIFY_INTERVAL_SECONDS": "0",
    "RULE_SIDECAR_LOG_LEVEL": "WARNING",
}
LABELS = {"rule-sidecar/rules": "fleet"}

RULESET_YAML = """\
apiVersion: rule-sidecar/v1
kind: RuleSet
metadata: {{id: fleet-{index}}}
spec:
  rules:
    - {{id: fleet-{index}-changing, condition: "input.amount > 10", points: {points}}}
    - {{id: fleet-{index}-steady, condition: "input.country == 'FR'", points: 5}}
"""


@dataclass
class Pod:
    port: int
    process: subprocess.Popen[bytes]

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0


@contextlib.contextmanager
def fleet(size: int, *arguments: str, **env: str) -> Iterator[list[Pod]]:
    """`size` sidecar processes started at once; all stopped (SIGTERM, then SIGKILL) at the end."""
    pods: list[Pod] = []
    ports: set[int] = set()
    try:
        while len(pods) < size:
            port = free_port()
            if port in ports:
                continue
            ports.add(port)
            command, environ = sidecar_command(port, *arguments, **POD_ENV, **env)
            pods.append(Pod(port, subprocess.Popen(command, env=environ)))
        yield pods
    finally:
        for pod in pods:
            pod.process.terminate()
        for pod in pods:
            try:
                pod.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pod.process.kill()
                pod.process.wait()


@dataclass
class Result:
    """What one fleet measured: per change, each pod's seconds from the change to its event."""

    source: str
    size: int
    changes: list[list[float]] = field(default_factory=list)
    rss_mib: list[float] = field(default_factory=list)
    startup_s: float = 0.0
    peak_per_pod: float | None = None  # connections (PostgreSQL)
    idle_reloads: int = 0  # announced reloads that changed nothing
    notes: list[str] = field(default_factory=list)


async def next_reload(ws: aiohttp.ClientWebSocketResponse, result: Result) -> float:
    """When this pod's next `rules_reloaded` event for a new version arrived. A reload
    that changed nothing (a second signal for the same change) is announced too: counted
    apart, it must not stand for the next change."""
    while True:
        message = await ws.receive_json()
        if message["event_type"] == "reload_failed":
            raise RuntimeError(f"reload failed: {message['data']['errors']}")
        if message["event_type"] == "rules_reloaded":
            data = message["data"]
            if data["version_after"] != data["version_before"]:
                return time.perf_counter()
            result.idle_reloads += 1


async def drain(sockets: Sequence[aiohttp.ClientWebSocketResponse]) -> None:
    """Drop what the pods announced before the measured changes (a resync on listening)."""
    for ws in sockets:
        with contextlib.suppress(TimeoutError):
            while True:
                await ws.receive_json(timeout=0.05)


Change = Callable[[int], float]  # makes change i (blocking, briefly); returns when the clock starts


async def run_fleet(
    pods: list[Pod], change: Change, changes: int, result: Result, settled: Callable[[], Any]
) -> None:
    """Wait for every pod, then make the changes and time every pod's event for each."""
    started = time.perf_counter()
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        deadline = time.monotonic() + 150
        await asyncio.gather(*(wait_ready(session, pod.base, deadline) for pod in pods))
        result.startup_s = time.perf_counter() - started
        sockets = [
            await session.ws_connect(f"{pod.base.replace('http', 'ws')}/ws/hot-reload")
            for pod in pods
        ]
        for ws in sockets:
            await ws.receive_json()  # status on connect
        await asyncio.to_thread(settled)
        await drain(sockets)
        for i in range(changes):
            waiting = [asyncio.create_task(next_reload(ws, result)) for ws in sockets]
            await asyncio.sleep(0)  # every waiter is receiving before the change
            # In the loop's thread: no event is stamped before the change is (in a thread,
            # the GIL could hold the change's own stamp back behind the events).
            begun = change(i)
            arrived = await asyncio.wait_for(asyncio.gather(*waiting), EVENT_TIMEOUT_S)
            result.changes.append([at - begun for at in arrived])
            await asyncio.sleep(SPACING_S)
        for ws in sockets:
            await ws.close()
    result.rss_mib = [pod.rss_mib() for pod in pods]


# ---------------------------------------------------------------------------- PostgreSQL


def seed(url: str) -> None:
    """The tables and RULESETS rulesets of two rules each."""
    dbtools.init(url)
    with psycopg.connect(url) as connection:
        for index in range(RULESETS):
            ruleset = f"fleet-{index}"
            connection.execute("INSERT INTO rule_sidecar_rulesets (id) VALUES (%s)", (ruleset,))
            connection.execute(
                "INSERT INTO rule_sidecar_rules (id, ruleset_id, position, condition, points)"
                " VALUES (%s, %s, 0, 'input.amount > 10', 1),"
                " (%s, %s, 1, 'input.country == ''FR''', 5)",
                (f"{ruleset}-changing", ruleset, f"{ruleset}-steady", ruleset),
            )


class Sessions:
    """The fleet's backends on the scratch database, seen from an admin connection."""

    def __init__(self, admin_url: str, database: str, ignore: int) -> None:
        self._admin = psycopg.connect(admin_url, autocommit=True)
        self._database = database
        self._ignore = ignore  # the bench's own writer
        self.peak = 0
        self.idle: set[int] = set()
        self.seen: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def now(self) -> list[tuple[int, str]]:
        """(pid, last statement) of every backend of the fleet."""
        rows = self._admin.execute(
            "SELECT pid, query FROM pg_stat_activity WHERE datname = %s AND pid <> %s",
            (self._database, self._ignore),
        ).fetchall()
        return [(int(pid), str(query)) for pid, query in rows]

    def settle(self, expected_at_least: int, timeout: float = 60.0) -> list[tuple[int, str]]:
        """The backends once their count has not moved for a second (the listeners are up)."""
        deadline = time.monotonic() + timeout
        last, since = -1, time.monotonic()
        while time.monotonic() < deadline:
            rows = self.now()
            if len(rows) != last:
                last, since = len(rows), time.monotonic()
            elif len(rows) >= expected_at_least and time.monotonic() - since >= 1.0:
                return rows
            time.sleep(0.1)
        return self.now()

    def start(self) -> None:
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            rows = self.now()
            self.peak = max(self.peak, len(rows))
            self.seen.update(pid for pid, _ in rows)
            time.sleep(0.002)

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self._admin.close()


def free_connections(admin_url: str) -> tuple[int, int]:
    """(max_connections, connections in use) on the server."""
    with psycopg.connect(admin_url, autocommit=True) as admin:
        row = admin.execute(
            "SELECT current_setting('max_connections')::int, count(*) FROM pg_stat_activity"
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def statement_kind(query: str) -> str:
    words = query.split()
    return " ".join(words[:2]) if words else "(none)"


def database_fleet(admin_url: str, size: int, changes: int, per_pod: float) -> Result:
    limit, used = free_connections(admin_url)
    fits = int((limit - SPARE_CONNECTIONS - used) // per_pod)
    result = Result("PostgreSQL", min(size, fits))
    if fits < size:
        result.notes.append(
            f"{size} pods would hold about {size * per_pod:.0f} connections at the peak"
            f" ({per_pod:.1f} per pod); the server has max_connections {limit} with {used}"
            f" in use, and {SPARE_CONNECTIONS} are left to its other users: {fits} pods instead"
        )
    size = result.size
    if size < 1:
        return result
    with (
        scratch_database(admin_url) as url,
        contextlib.ExitStack() as stack,
    ):
        name = url.rsplit("/", 1)[1]
        seed(url)
        writer = stack.enter_context(psycopg.connect(url))
        sessions = Sessions(admin_url, name, writer.info.backend_pid)
        stack.callback(sessions.close)
        pods = stack.enter_context(fleet(size, "--database-url", url))

        def settled() -> None:
            idle = sessions.settle(size)
            kinds = Counter(statement_kind(query) for _, query in idle)
            result.notes.append(
                f"connections idle: {len(idle)} ({len(idle) / size:.1f} per pod); by last"
                f" statement: {dict(sorted(kinds.items()))}"
            )
            sessions.idle = {pid for pid, _ in idle}
            sessions.seen.update(sessions.idle)
            sessions.start()

        def change(i: int) -> float:
            writer.execute(
                "UPDATE rule_sidecar_rules SET points = %s WHERE id = %s", (100 + i, CHANGING)
            )
            begun = time.perf_counter()  # before: a stamp after could be late, not early
            writer.commit()
            return begun

        asyncio.run(run_fleet(pods, change, changes, result, settled))
        opened = len(sessions.seen - sessions.idle)
        after = sessions.now()
        result.peak_per_pod = sessions.peak / size
        result.notes.append(
            f"connections during the changes: peak {sessions.peak}"
            f" ({sessions.peak / size:.1f} per pod); opened meanwhile {opened}"
            f" ({opened / max(changes, 1):.1f} per change); after: {len(after)}"
        )
    return result


# ---------------------------------------------------------------------------- Kubernetes


def configmap(points: int) -> dict[str, str]:
    return {
        f"fleet-{index}.yaml": RULESET_YAML.format(index=index, points=points if index == 0 else 1)
        for index in range(RULESETS)
    }


def kubernetes_fleet(size: int, changes: int) -> Result:
    result = Result("Kubernetes API", size)
    kube = FakeKubernetes().start()
    try:
        kube.apply("rules", configmap(1), labels=LABELS)
        with tempfile.TemporaryDirectory() as tmp:
            kubeconfig = kube.write_kubeconfig(Path(tmp) / "kubeconfig")
            arguments = ("--kubernetes-selector", "rule-sidecar/rules=fleet")
            namespace = ("--kubernetes-namespace", "default")
            with fleet(size, *arguments, *namespace, KUBECONFIG=str(kubeconfig)) as pods:

                def settled() -> None:
                    deadline = time.monotonic() + 60
                    while kube.open_watches < size and time.monotonic() < deadline:
                        time.sleep(0.1)
                    result.notes.append(
                        f"watches open on the API server when idle: {kube.open_watches}"
                        f" ({kube.open_watches / size:.1f} per pod); requests so far:"
                        f" {len(kube.requests)} ({len(kube.watches())} of them watches)"
                    )

                def change(i: int) -> float:
                    begun = time.perf_counter()
                    kube.apply("rules", configmap(100 + i), labels=LABELS)
                    return begun

                asyncio.run(run_fleet(pods, change, changes, result, settled))
                result.notes.append(
                    f"watches open after the changes: {kube.open_watches}; requests in all:"
                    f" {len(kube.requests)}"
                )
    finally:
        kube.close()
    return result


# ---------------------------------------------------------------------------- report


def line(label: str, seconds: Sequence[float]) -> str:
    ms = [s * 1000 for s in seconds]
    return (
        f"  {label}: p50 {quantile(ms, 0.5):7.1f} ms  p99 {quantile(ms, 0.99):7.1f} ms"
        f"  [min {min(ms):.1f} .. max {max(ms):.1f}]  n={len(ms)}"
    )


def report(result: Result) -> None:
    print(f"{result.source}, {result.size} pods:")
    if result.changes:
        print(f"  startup of the fleet (every pod ready): {result.startup_s:.1f} s")
    for note in result.notes:
        print(f"  {note}")
    if not result.changes:
        return
    print(
        line(
            "change -> every pod live (slowest pod of each change)",
            [max(c) for c in result.changes],
        )
    )
    print(
        line(
            "change -> one pod live (every pod of every change)",
            [s for c in result.changes for s in c],
        )
    )
    print(
        f"  reloads that changed nothing, announced while waiting: {result.idle_reloads}"
        f" ({result.idle_reloads / (result.size * len(result.changes)):.2f} per pod and change)"
    )
    rss = result.rss_mib
    print(
        f"  RSS per pod: median {quantile(rss, 0.5):.1f} MiB [min {min(rss):.1f} .. max"
        f" {max(rss):.1f}]; fleet total {sum(rss):.0f} MiB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 pods, 5 changes")
    parser.add_argument("--sizes", default="10,50", help="fleet sizes, comma-separated [10,50]")
    parser.add_argument("--changes", type=int, default=20)
    parser.add_argument("--admin-url", default=ADMIN_URL, help=f"[{ADMIN_URL}]")
    parser.add_argument(
        "--source", choices=["both", "database", "kubernetes"], default="both", help="[both]"
    )
    args = parser.parse_args()
    sizes = [3] if args.quick else [int(size) for size in args.sizes.split(",")]
    changes = 5 if args.quick else args.changes
    print(environment())
    print(
        f"fleets of {', '.join(map(str, sizes))} pods; {changes} changes each,"
        f" {SPACING_S * 1000:.0f} ms apart once every pod reported; {RULESETS} rulesets"
        " of 2 rules; pods: reload worker off, no verification, resync every 1 h"
    )
    per_pod = 1.0  # the source's one connection; each fleet's measured peak replaces it
    for size in sizes:
        if args.source != "kubernetes":
            result = database_fleet(args.admin_url, size, changes, per_pod)
            report(result)
            per_pod = result.peak_per_pod or per_pod
        if args.source != "database":
            report(kubernetes_fleet(size, changes))


if __name__ == "__main__":
    main()

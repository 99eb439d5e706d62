"""Chaos: random filesystem faults and hostile requests against a running sidecar.

A real `rule-sidecar serve` process (without CAP_DAC_OVERRIDE where `setpriv` exists, as
in its container, so that permissions count) on a rules directory of 8 team
subdirectories. For `--seconds` (60 by default) the driver applies one random step at a
time, and after each waits for the sidecar to settle, then checks the invariants:

1. what serves (every rule's points) equals the last good content of the directory:
   the content after the last step that left it complete and valid;
2. every step that breaks the directory is recorded (a `failed` reload in history) and
   announced (`reload_failed` on the WebSocket), and every repair after a failure is a
   recorded success announced as `rules_reloaded`, even when it restores what serves;
3. `/livez` on the probe listener answers within 100 ms throughout (a background poller
   every 20 ms), and the server's RSS stays bounded.

Steps: a good change (atomic rename), a change rewritten in place (truncate, then write),
a broken change (YAML or CEL), a team directory made unlistable (chmod 000), a FIFO, a
socket or a 1 GiB sparse file named `*.yaml`, a ruleset file deleted, the whole
directory deleted and made again, and hostile requests (a 300,000-item batch, a slow
client that sends its headers a byte at a time, 200 idle connections). With PostgreSQL
(a scratch database behind `sidecar.testing.TcpProxy`, read timeouts of 2 s): a rule
changed by UPDATE, a broken condition written to the database, the database frozen
(the proxy stops moving bytes, connections stay open) while a reload is asked for, and
changes that bypass the change signal: a ruleset deleted and inserted again in one
transaction, an UPDATE under `session_replication_role = replica` (no trigger fires),
a rule moved to another ruleset. With the Kubernetes API (`sidecar.testing.
FakeKubernetes`, 3 labelled ConfigMaps): ConfigMap changes good and broken (YAML, CEL,
binaryData that is not UTF-8), an event dropped, a stale event, a line that is not an
event, lists trickled past the list deadline (2 s) while a reload is asked for, and
events from another namespace. A change that no signal announces (a dropped event, an
UPDATE without triggers) must serve within the verification interval (3 s) + 5 s; every
other within 10 s. Each fault is repaired by the next step. Figures print at the end;
the exit status is 1 if any invariant broke.

    python -m bench.chaos                  # 60 s, files, PostgreSQL and ConfigMaps
    python -m bench.chaos --seconds 300 --seed 7
    python -m bench.chaos --no-database --no-kubernetes  # files only
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
import yaml

from bench._common import environment, free_port, quantile, wait_ready
from bench.database import ADMIN_URL, scratch_database
from sidecar import dbtools
from sidecar.testing import WITHOUT_DAC, FakeKubernetes, TcpProxy

TEAMS = 8
CONFIGMAPS = 3
HOT = "/api/v1/rules/hot-reload"
LABELS = {"rule-sidecar/rules": "true"}
SELECTOR = "rule-sidecar/rules=true"
VERIFY_SECONDS = 3.0  # RULE_SIDECAR_VERIFY_INTERVAL_SECONDS: finds a change no signal told of
LIST_DEADLINE_SECONDS = 2.0  # RULE_SIDECAR_KUBERNETES_LIST_DEADLINE_SECONDS
SETTLE_SECONDS = 10.0  # a change with a signal (inotify, NOTIFY, a watch event) serves within
MARGIN_SECONDS = 5.0  # a change without one serves within VERIFY_SECONDS + this


def ruleset(team: int, points: int, *, broken: bool = False, prefix: str = "team") -> str:
    condition = "input.amount >" if broken else f"input.amount > {team}"
    doc = {
        "apiVersion": "rule-sidecar/v1",
        "kind": "RuleSet",
        "metadata": {"id": f"{prefix}-{team}"},
        "spec": {
            "rules": [{"id": f"{prefix[0]}{team}-rule", "condition": condition, "points": points}]
        },
    }
    return yaml.safe_dump(doc, sort_keys=False)


@dataclass
class World:
    """The directory as the driver made it, and what must serve."""

    root: Path
    points: dict[int, int] = field(default_factory=dict)  # team -> points in its file
    good: dict[str, int] = field(default_factory=dict)  # "ruleset/rule" -> points to serve
    broken: str | None = None  # what is wrong with the sources now, if anything
    undo: Callable[[], None] | None = None
    # rule id -> (its ruleset, its points) in the database; empty: no database
    database: dict[str, tuple[str, int]] = field(default_factory=dict)
    configmaps: dict[int, int] = field(default_factory=dict)  # ConfigMap -> its points
    # nothing announces this fault: ask for a reload with this body ({"force": True}: lists)
    reload_after: dict[str, bool] | None = None
    unsignalled: bool = False  # a change no signal announces: it serves after verification

    def settle_good(self) -> None:
        self.good = {f"team-{t}/t{t}-rule": points for t, points in self.points.items()}
        self.good |= {f"kube-{n}/k{n}-rule": points for n, points in self.configmaps.items()}
        self.good |= {f"{rs}/{rule}": points for rule, (rs, points) in self.database.items()}

    def file(self, team: int) -> Path:
        return self.root / f"team-{team}" / "rules.yaml"

    def write(self, team: int, points: int, *, in_place: bool = False) -> None:
        path = self.file(team)
        path.parent.mkdir(parents=True, exist_ok=True)
        if in_place:
            with path.open("w", encoding="utf-8") as handle:
                handle.write(ruleset(team, points))
        else:
            temporary = path.with_name(".rules.yaml.tmp")
            temporary.write_text(ruleset(team, points), encoding="utf-8")
            os.replace(temporary, path)
        self.points[team] = points


def make_special(path: Path, kind: str) -> None:
    """A FIFO, a socket or a 1 GiB sparse file at `path`."""
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(str(path))
        listener.close()
    else:
        with path.open("wb") as handle:
            handle.truncate(1 << 30)


def fault_steps(world: World, rng: random.Random) -> dict[str, Callable[[], None]]:
    """Each step changes the directory; a fault sets `broken` and how to undo it."""

    def good_change() -> None:
        world.write(rng.randrange(TEAMS), rng.randrange(1, 1000))

    def in_place() -> None:
        world.write(present(), rng.randrange(1, 1000), in_place=True)

    def present() -> int:
        return rng.choice(sorted(world.points))

    def broken_change() -> None:
        team = present()
        path = world.file(team)
        before = path.read_bytes()
        text = "spec: [unclosed\n" if rng.random() < 0.5 else ruleset(team, 1, broken=True)
        path.write_text(text, encoding="utf-8")
        world.broken = f"broken {path.name} of team-{team}"

        def restore() -> None:
            path.write_bytes(before)

        world.undo = restore

    def unlistable() -> None:
        directory = world.file(present()).parent
        directory.chmod(0)
        world.broken = f"chmod 000 {directory.name}"
        world.undo = lambda: directory.chmod(0o755)

    def special() -> None:
        path = world.file(present()).with_name("special.yaml")
        kind = rng.choice(["fifo", "socket", "sparse"])
        make_special(path, kind)
        world.broken = f"{kind} named {path.name}"
        world.undo = path.unlink

    def delete() -> None:
        if len(world.points) <= 1:
            return
        team = present()
        world.file(team).unlink()
        del world.points[team]

    def recreate() -> None:
        shutil.rmtree(world.root)
        world.root.mkdir()
        for team, points in sorted(world.points.items()):
            world.write(team, points)

    def restore_deleted() -> None:
        missing = [team for team in range(TEAMS) if team not in world.points]
        if missing:
            world.write(rng.choice(missing), rng.randrange(1, 1000))

    return {
        "good change": good_change,
        "rewrite in place": in_place,
        "broken change": broken_change,
        "unlistable directory": unlistable,
        "special file": special,
        "delete a ruleset": delete,
        "restore a ruleset": restore_deleted,
        "re-create the directory": recreate,
    }


DATABASE_RULE = "db-rule"  # the rule the steps change and move between rulesets
# Each database ruleset keeps a rule of its own, so that a move never empties one.
DATABASE_SEED = {DATABASE_RULE: ("db", 1), "db-anchor": ("db", 2), "db2-anchor": ("db2", 3)}


def seed_database(url: str) -> None:
    dbtools.init(url)
    with psycopg.connect(url) as connection:
        connection.execute("INSERT INTO rule_sidecar_rulesets (id) VALUES ('db'), ('db2')")
        for rule, (ruleset_id, points) in DATABASE_SEED.items():
            insert_rule(connection, rule, ruleset_id, points)


def insert_rule(
    connection: psycopg.Connection[Any], rule: str, ruleset_id: str, points: int
) -> None:
    connection.execute(
        "INSERT INTO rule_sidecar_rules (id, ruleset_id, position, condition, points)"
        " VALUES (%s, %s, 0, 'input.amount > 5', %s)",
        (rule, ruleset_id, points),
    )


def database_steps(
    world: World, rng: random.Random, url: str, proxy: TcpProxy
) -> dict[str, Callable[[], None]]:
    """UPDATEs good and broken, the database frozen behind its proxy, and changes that
    bypass the change signal: a ruleset deleted and inserted again in one transaction
    (its rows' versions start over), an UPDATE with triggers off (`session_replication_
    role = replica`: no NOTIFY, no stamp; found by verification), a rule moved to another
    ruleset (its own points unchanged)."""

    def update(condition: str, points: int) -> None:
        with psycopg.connect(url) as connection:
            connection.execute(
                "UPDATE rule_sidecar_rules SET condition = %s, points = %s WHERE id = %s",
                (condition, points, DATABASE_RULE),
            )

    def good_update() -> None:
        points = rng.randrange(1, 1000)
        update("input.amount > 5", points)
        world.database[DATABASE_RULE] = (world.database[DATABASE_RULE][0], points)

    def broken_update() -> None:
        points = world.database[DATABASE_RULE][1]
        update("input.amount >", points)
        world.broken = "a condition that does not compile in the database"
        world.undo = lambda: update("input.amount > 5", points)

    def reinsert() -> None:
        ruleset_id = rng.choice(["db", "db2"])
        rules = {
            r: rng.randrange(1, 1000) for r, (rs, _) in world.database.items() if rs == ruleset_id
        }
        with psycopg.connect(url) as connection, connection.transaction():
            connection.execute("DELETE FROM rule_sidecar_rulesets WHERE id = %s", (ruleset_id,))
            connection.execute("INSERT INTO rule_sidecar_rulesets (id) VALUES (%s)", (ruleset_id,))
            for rule, points in rules.items():
                insert_rule(connection, rule, ruleset_id, points)
        world.database |= {rule: (ruleset_id, points) for rule, points in rules.items()}

    def without_triggers() -> None:
        points = rng.randrange(1, 1000)
        with psycopg.connect(url) as connection, connection.transaction():
            connection.execute("SET LOCAL session_replication_role = replica")
            connection.execute(
                "UPDATE rule_sidecar_rules SET points = %s WHERE id = %s", (points, DATABASE_RULE)
            )
        world.database[DATABASE_RULE] = (world.database[DATABASE_RULE][0], points)
        world.unsignalled = True

    def move() -> None:
        ruleset_id, points = world.database[DATABASE_RULE]
        other = "db2" if ruleset_id == "db" else "db"
        with psycopg.connect(url) as connection:
            connection.execute(
                "UPDATE rule_sidecar_rules SET ruleset_id = %s WHERE id = %s",
                (other, DATABASE_RULE),
            )
        world.database[DATABASE_RULE] = (other, points)

    def freeze() -> None:
        proxy.freeze()
        world.broken, world.undo, world.reload_after = "the database frozen", proxy.thaw, {}

    return {
        "database change": good_update,
        "database broken": broken_update,
        "freeze": freeze,
        "database ruleset re-inserted": reinsert,
        "database UPDATE without triggers": without_triggers,
        "database rule moved": move,
    }


def configmap(number: int, points: int, *, broken: bool = False) -> dict[str, str]:
    return {"rules.yaml": ruleset(number, points, broken=broken, prefix="kube")}


def kubernetes_steps(
    world: World, rng: random.Random, kube: FakeKubernetes
) -> dict[str, Callable[[], None]]:
    """ConfigMap changes good and broken, and what a watch or a list can bring: a lost
    event (served after verification), a stale one, a line that is not an event, a list
    trickled past its deadline, and events from another namespace."""

    def apply(number: int, points: int) -> None:
        kube.apply(f"kube-{number}", configmap(number, points), labels=LABELS)

    def good_change() -> None:
        number, points = rng.randrange(CONFIGMAPS), rng.randrange(1, 1000)
        apply(number, points)
        world.configmaps[number] = points

    def broken_change() -> None:
        number = rng.randrange(CONFIGMAPS)
        name, points = f"kube-{number}", world.configmaps[number]
        kind = rng.choice(["yaml", "cel", "binary"])
        if kind == "yaml":
            kube.apply(name, {"rules.yaml": "spec: [unclosed\n"}, labels=LABELS)
        elif kind == "cel":
            kube.apply(name, configmap(number, points, broken=True), labels=LABELS)
        else:  # binaryData under a rule file's name that is not UTF-8
            kube.apply(name, {}, labels=LABELS, binary_data={"rules.yaml": b"\xff\xfe\x00"})
        world.broken = f"{name}: a broken {kind} rule file"
        world.undo = lambda: apply(number, points)

    def dropped() -> None:
        kube.drop_next_event()
        good_change()
        world.unsignalled = True

    def stale() -> None:
        with contextlib.suppress(ValueError):  # a ConfigMap with no earlier state
            kube.send_stale(f"kube-{rng.randrange(CONFIGMAPS)}")

    def malformed() -> None:
        kube.send_line(
            rng.choice(
                [
                    b"not json\n",
                    b'{"type": "MODIFIED"}\n',
                    b'{"type": "ADDED", "object": {"metadata": "x"}}\n',
                    b"\xff\xfe\n",
                    b"[1, 2, 3]\n",
                ]
            )
        )

    def trickled() -> None:
        kube.trickle_lists(0.5, chunk=16)
        world.broken = "a list trickled past its deadline"
        world.undo = lambda: kube.trickle_lists(None)
        world.reload_after = {"force": True}  # a forced reload lists; a usual one need not

    def other_namespace() -> None:
        number = rng.randrange(CONFIGMAPS)
        if rng.random() < 0.5:  # the server itself never shows it to a namespaced watch
            kube.apply(f"kube-{number}", configmap(number, 1), labels=LABELS, namespace="other")
            return
        kind = rng.choice(["ADDED", "MODIFIED", "DELETED"])
        version = kube._resource_version + 1  # the version this line takes
        event = {
            "type": kind,
            "object": {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {
                    "name": f"kube-{number}",
                    "namespace": "other",
                    "resourceVersion": str(version),
                    "labels": LABELS,
                },
                "data": configmap(number, 1),
            },
        }
        kube.send_line(json.dumps(event).encode() + b"\n")

    return {
        "kubernetes change": good_change,
        "kubernetes broken": broken_change,
        "kubernetes dropped event": dropped,
        "kubernetes stale event": stale,
        "kubernetes malformed line": malformed,
        "kubernetes trickled list": trickled,
        "kubernetes other namespace": other_namespace,
    }


async def hostile(kind: str, base: str, session: aiohttp.ClientSession, port: int) -> None:
    if kind == "huge batch":
        body = json.dumps({"inputs": [{}] * 300_000}).encode()
        with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
            async with session.post(
                f"{base}/api/v1/rulesets/team-0/evaluate",
                data=body,
                headers={"Content-Type": "application/json"},
                timeout=aiohttp.ClientTimeout(total=60),
            ) as response:
                await response.read()
    elif kind == "slow headers":
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        for byte in b"GET /livez HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ":
            writer.write(bytes([byte]))
            await asyncio.sleep(0.01)
        writer.close()
    else:  # idle connections
        connections = [await asyncio.open_connection("127.0.0.1", port) for _ in range(200)]
        await asyncio.sleep(1.0)
        for _, writer in connections:
            writer.close()


@dataclass
class Tally:
    steps: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)
    livez_ms: list[float] = field(default_factory=list)
    livez_failures: int = 0
    rss_kib: list[int] = field(default_factory=list)
    failed_events: int = 0
    reloaded_events: int = 0
    current: str = "start"  # the step under way, to which a slow probe is counted
    slow_during: Counter[str] = field(default_factory=Counter)


async def poll_livez(session: aiohttp.ClientSession, url: str, tally: Tally) -> None:
    while True:
        started = time.perf_counter()
        try:
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=5)) as response:
                await response.read()
                ok = response.status == 200
        except (TimeoutError, aiohttp.ClientError):
            ok = False
        elapsed = (time.perf_counter() - started) * 1000
        tally.livez_ms.append(elapsed)
        tally.livez_failures += not ok
        if elapsed > 100 or not ok:
            tally.slow_during[tally.current] += 1
        await asyncio.sleep(0.02)


async def listen(session: aiohttp.ClientSession, url: str, tally: Tally) -> None:
    async with session.ws_connect(url) as ws:
        async for message in ws:
            event = json.loads(message.data).get("event_type")
            tally.failed_events += event == "reload_failed"
            tally.reloaded_events += event == "rules_reloaded"


async def served(session: aiohttp.ClientSession, base: str) -> dict[str, int]:
    async with session.get(f"{base}/api/v1/rules") as response:
        body = await response.json()
    return {f"{rule['ruleset_id']}/{rule['id']}": rule["points"] for rule in body["rules"]}


async def history(session: aiohttp.ClientSession, base: str) -> list[dict[str, Any]]:
    async with session.get(f"{base}{HOT}/history?limit=5") as response:
        records: list[dict[str, Any]] = (await response.json())["history"]
    return records


async def wait_for(check: Callable[[], Any], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return True
        await asyncio.sleep(0.05)
    return False


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def serve(workdir: Path, arguments: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    """`rule-sidecar serve` with `arguments`, its environment cleared of settings but
    `env`, its log in workdir/serve.log."""
    wrapper = list(WITHOUT_DAC) if shutil.which("setpriv") else []
    script = Path(sys.executable).with_name("rule-sidecar")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "sidecar.cli"]
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("RULE_SIDECAR_", "HOT_"))}
    clean.pop("KUBERNETES_SERVICE_HOST", None)
    with (workdir / "serve.log").open("wb") as log:
        return subprocess.Popen(
            [*wrapper, *command, "serve", *arguments, "--state-dir", str(workdir / "state")],
            env=clean | env,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )


async def run(
    seconds: float, seed: int, *, database: str | None, kubernetes: bool, verbose: bool
) -> Tally:
    """The chaos run, on files, with the scratch database `database` if given, and with
    ConfigMaps from a FakeKubernetes if `kubernetes`."""
    rng, tally = random.Random(seed), Tally()
    workdir = Path(tempfile.mkdtemp(prefix="rs-chaos-"))
    world = World(workdir / "rules")
    for team in range(TEAMS):
        world.write(team, 10 + team)
    steps = fault_steps(world, rng)
    port, probe_port = free_port(), free_port()
    arguments = ["--rules-dir", str(world.root), "--port", str(port)]
    arguments += ["--metrics-port", str(probe_port)]
    env = {
        "RULE_SIDECAR_DATABASE_CONNECT_TIMEOUT_SECONDS": "2",
        "RULE_SIDECAR_DATABASE_STATEMENT_TIMEOUT_SECONDS": "1",
        "RULE_SIDECAR_DATABASE_READ_TIMEOUT_SECONDS": "2",
        "RULE_SIDECAR_VERIFY_INTERVAL_SECONDS": str(VERIFY_SECONDS),
        "RULE_SIDECAR_KUBERNETES_LIST_DEADLINE_SECONDS": str(LIST_DEADLINE_SECONDS),
    }
    with contextlib.ExitStack() as stack:
        if database is not None:
            seed_database(database)
            world.database = dict(DATABASE_SEED)
            proxy = TcpProxy(("127.0.0.1", 5432))
            stack.callback(proxy.close)
            dbname = database.rsplit("/", 1)[1]
            arguments += [
                "--database-url",
                f"postgresql://postgres@127.0.0.1:{proxy.port}/{dbname}",
            ]
            steps |= database_steps(world, rng, database, proxy)
        if kubernetes:
            kube = FakeKubernetes().start()
            stack.callback(kube.close)
            for number in range(CONFIGMAPS):
                kube.apply(f"kube-{number}", configmap(number, 20 + number), labels=LABELS)
                world.configmaps[number] = 20 + number
            env["KUBECONFIG"] = str(kube.write_kubeconfig(workdir / "kubeconfig"))
            arguments += ["--kubernetes-selector", SELECTOR, "--kubernetes-namespace", "default"]
            steps |= kubernetes_steps(world, rng, kube)
        world.settle_good()
        server = serve(workdir, arguments, env)
        try:
            await drive(
                Driver(rng, world, steps, None, f"http://127.0.0.1:{port}", port, tally, verbose),
                seconds,
                server.pid,
                probe_port,
            )
        finally:
            server.terminate()
            server.wait(30)
            for path in [world.root, *world.root.rglob("*")]:
                with contextlib.suppress(OSError):
                    if path.is_dir() and not path.is_symlink():
                        path.chmod(0o755)
            if verbose:
                print(f"kept {workdir} (server log: serve.log)")
            else:
                shutil.rmtree(workdir, ignore_errors=True)
    return tally


async def drive(driver: Driver, seconds: float, pid: int, probe_port: int) -> None:
    """Steps for `seconds`, with /livez polled and the WebSocket heard throughout."""
    base, tally = driver.base, driver.tally
    async with aiohttp.ClientSession() as session:
        driver.session = session
        await wait_ready(session, base, time.monotonic() + 30)
        background = [
            asyncio.create_task(poll_livez(session, f"http://127.0.0.1:{probe_port}/livez", tally)),
            asyncio.create_task(listen(session, f"{base}/ws/hot-reload", tally)),
        ]
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            await step(driver)
            tally.rss_kib.append(rss_kib(pid))
        for task in background:
            task.cancel()


@dataclass
class Driver:
    """Everything one chaos run acts on."""

    rng: random.Random
    world: World
    steps: dict[str, Callable[[], None]]
    session: aiohttp.ClientSession | None  # set once the server answers
    base: str
    port: int
    tally: Tally
    verbose: bool = False


async def step(driver: Driver) -> None:
    """One step, then wait for the sidecar to settle and check the invariants."""
    rng, world, steps, tally = driver.rng, driver.world, driver.steps, driver.tally
    session, base, port = driver.session, driver.base, driver.port
    assert session is not None
    before = (await history(session, base))[0]["id"]
    if world.undo is not None:  # repair the fault first: a recovery must be announced
        tally.current = f"repair of {world.broken}"
        await asyncio.to_thread(world.undo)
        world.undo, world.broken = None, None
        name = "repair"
        await asyncio.sleep(0.1)
    elif rng.random() < 0.15:
        name = rng.choice(["huge batch", "slow headers", "idle connections"])
        tally.current = name
        await hostile(name, base, session, port)
    else:
        name = rng.choice(sorted(steps))
        tally.current = name
        await asyncio.to_thread(steps[name])
    tally.steps[name] += 1
    if world.reload_after is not None:
        body, world.reload_after = world.reload_after, None
        async with session.post(f"{base}{HOT}/reload", json=body) as response:
            await response.read()
    if driver.verbose:
        print(f"{time.strftime('%H:%M:%S')} {name} {world.broken or ''}", flush=True)
    unsignalled, world.unsignalled = world.unsignalled, False
    within = VERIFY_SECONDS + MARGIN_SECONDS if unsignalled else SETTLE_SECONDS
    if world.broken is not None:

        async def failed() -> bool:
            records = await history(session, base)
            return any(r["id"] > before and r["status"] == "failed" for r in records)

        if not await wait_for(failed):
            tally.violations.append(f"{name} ({world.broken}): no failed reload recorded")
    else:
        world.settle_good()

        async def caught_up() -> bool:
            return await served(session, base) == world.good

        if not await wait_for(caught_up, within):
            got = await served(session, base)
            tally.violations.append(f"{name}: serves {got}, the sources hold {world.good}")
        if name == "repair":

            async def recovered() -> bool:
                records = await history(session, base)
                return any(r["id"] > before and r["status"] == "success" for r in records)

            if not await wait_for(recovered):
                tally.violations.append("repair: the recovery was not recorded as a success")
    if await served(session, base) != world.good:
        tally.violations.append(f"after {name}: what serves is not the last good content")


def report(tally: Tally, seconds: float) -> None:
    print(f"chaos: {sum(tally.steps.values())} steps in {seconds:.0f} s; {environment()}")
    for name, count in sorted(tally.steps.items()):
        print(f"  {name:<24} {count}")
    livez = tally.livez_ms
    print(
        f"/livez: {len(livez)} probes, p50 {quantile(livez, 0.5):.1f} ms, "
        f"p99 {quantile(livez, 0.99):.1f} ms, max {max(livez):.1f} ms, "
        f"over 100 ms {sum(ms > 100 for ms in livez)}, failed {tally.livez_failures}"
    )
    print(
        f"RSS: start {tally.rss_kib[0] / 1024:.0f} MiB, max {max(tally.rss_kib) / 1024:.0f} MiB,"
        f" end {tally.rss_kib[-1] / 1024:.0f} MiB"
    )
    if tally.slow_during:
        print(f"/livez over 100 ms or failed during: {dict(tally.slow_during)}")
    print(f"WebSocket: {tally.failed_events} reload_failed, {tally.reloaded_events} rules_reloaded")
    print(f"invariant violations: {len(tally.violations)}")
    for violation in tally.violations:
        print(f"  - {violation}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--verbose", action="store_true", help="print each step, keep the files")
    parser.add_argument("--no-database", action="store_true", help="without PostgreSQL")
    parser.add_argument("--no-kubernetes", action="store_true", help="without ConfigMaps")
    parser.add_argument("--admin-url", default=ADMIN_URL, help=f"[{ADMIN_URL}]")
    args = parser.parse_args()
    options = {"kubernetes": not args.no_kubernetes, "verbose": args.verbose}
    if args.no_database:
        tally = asyncio.run(run(args.seconds, args.seed, database=None, **options))
    else:
        with scratch_database(args.admin_url) as url:
            tally = asyncio.run(run(args.seconds, args.seed, database=url, **options))
    report(tally, args.seconds)
    slow = [ms for ms in tally.livez_ms if ms > 100]
    sys.exit(1 if tally.violations or slow or tally.livez_failures else 0)


if __name__ == "__main__":
    main()

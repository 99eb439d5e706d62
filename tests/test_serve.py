"""`rule-sidecar serve` as a real process: readiness, signals, logs, settings."""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import dump_yaml, fraud_doc
from db_support import Database, FreezableProxy, pg_listeners
from server_support import (
    START_SECONDS,
    Served,
    clean_environment,
    command,
    free_port,
    spawn,
    wait_sync,
)

from sidecar.api.run import connection_caps
from sidecar.config import Settings

# Starts processes, browsers or databases: left out of the quick loop (-m 'not slow').
pytestmark = pytest.mark.slow

HOT = "/api/v1/rules/hot-reload"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One process on a rules dir, with the seed's variables and a port variable set."""
    tmp = tmp_path_factory.mktemp("serve")
    rules = tmp / "rules"
    rules.mkdir()
    (rules / "fraud.yaml").write_text(dump_yaml(fraud_doc()), encoding="utf-8")
    env = clean_environment(
        HOT_RELOAD_INTERVAL_SECONDS="12.5",
        HOT_RELOAD_VALIDATION_ENABLED="false",
        RULE_SIDECAR_PORT=str(free_port()),  # the --port flag must win over this
        RULE_SIDECAR_DEBOUNCE_MS="20",
        RULE_SIDECAR_METRICS_PORT=str(free_port()),
    )
    server = spawn(tmp, "--rules-dir", str(rules), env=env)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


class TestServing:
    """A served rules directory, with settings from flags and environment."""

    def test_serves_the_rules_dir(self, served: Served):
        """The rules directory's ruleset is served on the port given by the flag."""
        status, body = served.get("/api/v1/rulesets/fraud")
        assert status == 200
        assert body["rule_count"] == 3

    def test_probes_and_metrics_on_their_own_listener(self, served: Served):
        """The metrics listener also answers the kubelet's probes, and nothing else: the
        API can stay on loopback while probes and scrapes reach the pod IP."""
        base = f"http://127.0.0.1:{served.env['RULE_SIDECAR_METRICS_PORT']}"

        def status_of(path: str, method: str = "GET") -> tuple[int, bytes]:
            request = urllib.request.Request(base + path, method=method)
            try:
                with urllib.request.urlopen(request, timeout=5) as response:
                    return response.status, response.read()
            except urllib.error.HTTPError as error:
                return error.code, error.read()

        assert status_of("/livez")[0] == 200
        assert status_of("/readyz")[0] == 200
        code, body = status_of("/health/hot-reload")
        assert (code, json.loads(body)["status"]) == (200, "healthy")
        code, body = status_of("/metrics")
        assert code == 200
        assert b"rule_sidecar_registry_version 1.0" in body
        assert status_of("/api/v1/rulesets")[0] == 404
        assert status_of("/api/v1/rules/hot-reload/reload", "POST")[0] == 404
        assert status_of("/ws/hot-reload")[0] == 404

    def test_flag_wins_over_environment(self, served: Served):
        """`--port` wins over RULE_SIDECAR_PORT: nothing listens on the variable's port."""
        other = served.env["RULE_SIDECAR_PORT"]
        with pytest.raises(urllib.error.URLError, match=r"(?i)refused"):
            urllib.request.urlopen(f"http://127.0.0.1:{other}/livez", timeout=2)

    def test_seed_variables_in_status(self, served: Served):
        """HOT_RELOAD_INTERVAL_SECONDS and HOT_RELOAD_VALIDATION_ENABLED show in /status."""
        _, status = served.get(f"{HOT}/status")
        assert status["reload_interval_seconds"] == 12.5
        assert status["validation_enabled"] is False
        assert status["monitoring_active"] is True

    def test_sighup_reloads(self, served: Served):
        """SIGHUP runs a reload recorded with trigger `signal`."""
        served.process.send_signal(signal.SIGHUP)

        def signal_reload() -> list[dict[str, Any]]:
            history = served.get(f"{HOT}/history")[1]["history"]
            return [record for record in history if record["trigger"] == "signal"]

        records = wait_sync(signal_reload, message="SIGHUP reload in history")
        assert records[0]["status"] == "unchanged"
        assert served.process.poll() is None

    def test_logs_are_json_lines(self, served: Served):
        """Every stderr line is a JSON object with time, level, logger and message."""
        lines = served.log_lines()
        assert lines
        entries = [json.loads(line) for line in lines]
        for entry in entries:
            assert {"time", "level", "logger", "message"} <= set(entry)
        messages = [entry["message"] for entry in entries]
        assert f"serving on http://127.0.0.1:{served.port}" in messages
        assert any(m.startswith("reload success: trigger=startup") for m in messages)


class TestLifecycle:
    """Start-up without rules, bad settings, and a clean SIGTERM."""

    async def test_sigterm_closes_websockets_and_exits_0(self, tmp_path: Path):
        """SIGTERM: the WebSocket client sees 1001 and the process exits 0 promptly."""
        rules = tmp_path / "rules"
        rules.mkdir()
        (rules / "fraud.yaml").write_text(dump_yaml(fraud_doc()), encoding="utf-8")
        server = spawn(tmp_path, "--rules-dir", str(rules))
        try:
            await _wait_ready_async(server)
            async with (
                aiohttp.ClientSession() as session,
                session.ws_connect(f"{server.url}/ws/hot-reload") as ws,
            ):
                hello = await ws.receive_json(timeout=5)
                assert hello["event_type"] == "status"
                started = time.monotonic()
                server.process.send_signal(signal.SIGTERM)
                message = await ws.receive(timeout=5)
                assert message.type is aiohttp.WSMsgType.CLOSE
                assert ws.close_code == 1001
            code = await _wait_exit(server, 5)
            assert code == 0
            assert time.monotonic() - started < 5
            messages = [json.loads(line)["message"] for line in server.log_lines()]
            assert any(m.startswith("shutting down") for m in messages)
        finally:
            server.stop()

    async def test_the_admin_token_never_leaves(self, tmp_path: Path):
        """Neither the logs (DEBUG included) nor any answer repeat the admin token, also
        when a wrong one is sent."""
        token = "tok-" + "s3cr3t" * 6
        token_file = tmp_path / "token"
        token_file.write_text(token + "\n", encoding="utf-8")
        env = clean_environment(RULE_SIDECAR_LOG_LEVEL="DEBUG")
        server = spawn(tmp_path, "--admin-token-file", str(token_file), env=env)
        answers: list[str] = []
        try:
            await _wait_ready_async(server)
            async with aiohttp.ClientSession(server.url) as session:
                for given in (token, token[:-1], token + "x"):
                    headers = {"Authorization": f"Bearer {given}"}
                    async with session.post(f"{HOT}/reload", headers=headers, json={}) as r:
                        answers.append(await r.text())
                    async with session.get(f"{HOT}/status", headers=headers) as r:
                        answers.append(await r.text())
            assert '"status":"unchanged"' in answers[0].replace(" ", "")
            assert "a bearer token is required" in answers[2]
        finally:
            server.stop()
        for text in [*answers, server.log.read_text("utf-8")]:
            assert "s3cr3t" not in text

    def test_without_rules_dir_serves_the_bundled_examples(self, tmp_path: Path):
        """No --rules-dir: the example rulesets, payment-fraud among them."""
        server = spawn(tmp_path)
        try:
            server.wait_ready()
            status, body = server.get("/api/v1/rulesets/payment-fraud")
            assert status == 200
            assert body["rule_count"] > 0
            _, rulesets = server.get("/api/v1/rulesets")
            assert rulesets["count"] == 3
        finally:
            server.stop()

    def test_bad_setting_exits_2_naming_the_variable(self, tmp_path: Path):
        """RULE_SIDECAR_PORT=abc: exit code 2 and a message naming the variable."""
        result = subprocess.run(
            [*command(), "serve"],
            env=clean_environment(RULE_SIDECAR_PORT="abc"),
            capture_output=True,
            text=True,
            timeout=START_SECONDS,
            check=False,
        )
        assert result.returncode == 2
        assert "RULE_SIDECAR_PORT" in result.stderr
        assert "abc" in result.stderr

    def test_bad_log_level_exits_2_naming_the_variable(self, tmp_path: Path):
        """RULE_SIDECAR_LOG_LEVEL=verbose is a usage error (exit 2) naming the variable."""
        result = subprocess.run(
            [*command(), "serve", "--port", str(free_port())],
            env=clean_environment(RULE_SIDECAR_LOG_LEVEL="verbose"),
            capture_output=True,
            text=True,
            timeout=START_SECONDS,
            check=False,
        )
        assert result.returncode == 2
        assert "RULE_SIDECAR_LOG_LEVEL" in result.stderr


class TestDescriptors:
    @pytest.mark.parametrize("soft_limit", [40, 200, 400, 1 << 20])
    def test_the_connection_caps_fit_the_descriptor_limit(self, soft_limit: int):
        """Caps above `ulimit -n` would not keep descriptors from running out."""
        api, probes = connection_caps(Settings(), soft_limit=soft_limit)
        assert api >= 1
        assert probes >= 1
        assert api + probes <= max(2, soft_limit - 128)
        if soft_limit == 1 << 20:
            assert (api, probes) == (Settings().max_connections, Settings().metrics_max_connections)

    """Connections cannot use up the descriptors the sources need."""

    def test_a_connection_flood_leaves_descriptors_for_a_reload(self, tmp_path: Path):
        """Under `ulimit -n 256`, 300 connections to the API stop at the cap (128), and a
        reload (SIGHUP) during the flood still lists and reads the rules: the change goes
        live (the watcher may see it first: either way the directory is read during the
        flood). Unbounded, the flood took every descriptor and the listing failed."""
        rules = tmp_path / "rules"
        rules.mkdir()
        (rules / "fraud.yaml").write_text(dump_yaml(fraud_doc()), encoding="utf-8")
        probe_port = free_port()
        env = clean_environment(
            HOT_RELOAD_INTERVAL_SECONDS="3600",
            RULE_SIDECAR_MAX_CONNECTIONS="128",
            RULE_SIDECAR_IDLE_TIMEOUT_SECONDS="120",
            RULE_SIDECAR_METRICS_PORT=str(probe_port),
        )

        def limit_descriptors() -> None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

        server = spawn(tmp_path, "--rules-dir", str(rules), env=env, before_exec=limit_descriptors)
        flood: list[socket.socket] = []
        try:
            server.wait_ready()
            health = f"http://127.0.0.1:{probe_port}/health/hot-reload"
            with urllib.request.urlopen(health, timeout=5) as response:
                before = json.loads(response.read())
            for _ in range(300):
                flood.append(socket.create_connection(("127.0.0.1", server.port), timeout=10))
            time.sleep(0.2)  # the flood's sockets have been silent long enough to give way
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as extra:
                # A silent socket of the flood made room: the newcomer is answered.
                extra.sendall(b"GET /livez HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                answered = extra.recv(64)
            (rules / "fraud.yaml").write_text(dump_yaml(fraud_doc(70)), encoding="utf-8")
            server.process.send_signal(signal.SIGHUP)

            def reloaded() -> dict[str, Any] | None:
                with urllib.request.urlopen(health, timeout=5) as response:
                    body: dict[str, Any] = json.loads(response.read())
                return body if body["reload_count"] > before["reload_count"] else None

            after = wait_sync(reloaded, message="the SIGHUP reload during the flood")
            assert after["last_reload_status"] == "success", after
            assert after["revision"] != before["revision"]
            assert any("descriptor limit (256)" in line for line in server.log_lines())
            assert answered.startswith(b"HTTP/1.1 200")
            held = 0  # the server neither answered (503), reset nor closed them
            for sock in flood:
                sock.settimeout(0.01)
                try:
                    sock.recv(1)
                except TimeoutError:
                    held += 1
                except ConnectionResetError:
                    pass
            assert held <= 128, "more connections held open than the cap allows"
        finally:
            for sock in flood:
                sock.close()
            server.stop()


async def _wait_ready_async(server: Served) -> None:
    await asyncio.to_thread(server.wait_ready)


async def _wait_exit(server: Served, seconds: float) -> int:
    return await asyncio.to_thread(server.process.wait, seconds)


# The heap test's child: the app as `serve()` wires it, reloaded 120 times (every fourth
# a condition that does not compile); prints the freeze count after reloads 40 and 120.
_HEAP_CHILD = """
import asyncio, gc, sys
from pathlib import Path
from sidecar.api.app import create_app
from sidecar.api.run import HeapFreezer, build_state
from sidecar.reloads import Trigger
from sidecar.config import Settings
from sidecar.testing import ConfigMapDir

RULES = (
    "apiVersion: rule-sidecar/v1\\nkind: RuleSet\\nmetadata: {{id: payment-fraud}}\\n"
    "spec:\\n  rules:\\n    - id: big\\n      condition: {}\\n      points: {}\\n"
)

async def main(root: Path) -> None:
    volume = ConfigMapDir(root)
    volume.publish({"rules.yaml": RULES.format("input.amount > 100", 40)})
    state = build_state(Settings(rules_dirs=(root,), debounce_ms=20))
    create_app(state)
    await state.service.initial_load()
    state.service.add_listener(HeapFreezer())
    frozen = []
    for serial in range(1, 121):
        condition = "input.amount >" if serial % 4 == 0 else "input.amount > 100"
        volume.publish({"rules.yaml": RULES.format(condition, 40 + serial)})
        await state.service.reload_rules(trigger=Trigger.API)
        if serial in (40, 120):
            frozen.append(gc.get_freeze_count())
    print(*frozen)

asyncio.run(main(Path(sys.argv[1])))
"""


class TestHeap:
    """What `serve` does to the garbage collector after each reload."""

    def test_reloads_do_not_pile_up_frozen_garbage(self, tmp_path: Path):
        """Frozen objects stay level over many reloads, failed ones among them: the
        cycles a reload leaves behind (a failure's traceback, say) are collected, not
        kept forever in the permanent generation: they are collected before each freeze.
        In a child process: the freezer may collect the whole heap, and pytest's would
        make each collection take a second."""
        child = subprocess.run(
            [sys.executable, "-c", _HEAP_CHILD, str(tmp_path / "rules")],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert child.returncode == 0, child.stderr
        frozen = [int(count) for count in child.stdout.split()]
        assert len(frozen) == 2, child.stdout
        assert frozen[0] > 0, child.stdout
        assert frozen[1] - frozen[0] < 80 * 5, frozen  # under 5 objects per reload

    @pytest.mark.parametrize(
        "options", ["growth=1.5, every=3600", "growth=100, every=0"], ids=["grown", "timed"]
    )
    def test_cycles_that_die_frozen_are_collected(self, options: str):
        """A cycle frozen while alive and dropped later is invisible to the collections
        before each freeze. Such cycles add up: once the heap passes 1.5x what it was
        after the last full collection (or `every` seconds after it), it is unfrozen and
        collected whole, and they are freed: the heap stays bounded however many rounds
        leave dead cycles behind."""
        _, start, *counts = frozen_rounds(options, "cycles")
        # Kept frozen, the 12 rounds would make it 2.5x; bounded: 1.5x and the round past it.
        assert max(counts) <= start * 1.8, counts

    def test_a_heap_replaced_by_reloads_is_not_collected_whole(self):
        """Each round replaces half the frozen heap, the old half freed by reference
        counting, as a reload replacing a large part of the registry does. What was
        frozen since passes 1.5x at the second round, but the heap has not grown: no full
        collection, whose single pause (50-150 ms for 1 MiB of rules) would be the
        p99 of every request during reloads."""
        full, start, *counts = frozen_rounds("growth=1.5, every=3600", "acyclic")
        assert full == 0, (full, counts)
        assert max(counts) <= start * 2.1, counts


_RECEIVING_CHILD = """
import gc
from sidecar.api.run import HeapFreezer

before = gc.get_freeze_count()
with HeapFreezer().receiving():
    paused = not gc.isenabled()
    kept = [[index] for index in range(100_000)]
print(paused, gc.isenabled(), gc.get_freeze_count() - before)
"""


def test_a_large_load_is_taken_in_without_the_collector():
    """While a worker's rulesets are taken in, no automatic collection walks them (each
    would, in whichever thread allocates, the serving one included); they are frozen at
    once after, and the collector is back on. In a child process: pytest's heap."""
    child = subprocess.run(
        [sys.executable, "-c", _RECEIVING_CHILD],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert child.returncode == 0, child.stderr
    paused, enabled, frozen = child.stdout.split()
    assert (paused, enabled) == ("True", "True")
    assert int(frozen) >= 100_000


def frozen_rounds(options: str, kind: str) -> list[int]:
    """Full collections in 12 rounds of `_FROZEN_CYCLES_CHILD`, then the frozen counts.
    In a child process: pytest's heap would make each collection take a second."""
    child = subprocess.run(
        [sys.executable, "-c", _FROZEN_CYCLES_CHILD, options, kind],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert child.returncode == 0, child.stderr
    return [int(count) for count in child.stdout.split()]


# Freezes a heap; then, 12 rounds, each freezing a quarter as many cycles again as it
# held, alive, then dropping them ("cycles"); or ("acyclic") a heap half of which is
# lists without cycles, each round replacing them with new ones. Prints the number of
# full collections, and the heap's allocated blocks at the start and after each round.
_FROZEN_CYCLES_CHILD = """
import gc, sys
from datetime import UTC, datetime
from sidecar.api.run import HeapFreezer
from sidecar.reloads import ReloadRecord, ReloadStatus, Trigger

record = ReloadRecord(
    id=1, triggers=frozenset({Trigger.API}), status=ReloadStatus.SUCCESS,
    timestamp=datetime.now(UTC), reload_time_ms=0.0, rules_loaded=0, rulesets_loaded=0,
    reload_count=1, version_before=0, version_after=1, revision="r",
)
growth, every = (float(part.split("=")[1]) for part in sys.argv[1].split(", "))
cycles = sys.argv[2] == "cycles"
freezer = HeapFreezer(growth=growth, every=every)


def made(count):
    made = []
    for _ in range(count):
        pair = [None]
        if cycles:
            pair[0] = pair
        made.append(pair)
    return made


kept = [] if cycles else made(gc.get_count()[0] + len(gc.get_objects()))
freezer(record)
frozen = gc.get_freeze_count()
counts = [sys.getallocatedblocks()]
full = 0
for _ in range(12):
    junk = made(frozen // 4) if cycles else None
    if not cycles:
        kept = made(len(kept))  # the previous ones freed as these replace them
    collected = freezer._collected
    freezer(record)  # alive: frozen
    full += freezer._collected != collected
    counts.append(sys.getallocatedblocks())
    del junk  # dead, and frozen
print(full, *counts)
"""


@pytest.fixture
def seeded_pg(pg_database: Database) -> Database:
    """A migrated PostgreSQL database holding the `fraud` ruleset."""
    pg_database.init().import_docs(fraud_doc())
    return pg_database


# Deadlines far beyond anything these tests wait for: a read of the frozen database
# waits until the test thaws it (or the process stops), never until a deadline.
FROZEN_ENV = {
    "RULE_SIDECAR_DATABASE_CONNECT_TIMEOUT_SECONDS": "300",
    "RULE_SIDECAR_DATABASE_READ_TIMEOUT_SECONDS": "300",
    "RULE_SIDECAR_DATABASE_STATEMENT_TIMEOUT_SECONDS": "300",
}
# Waiting for an exit: the drain of in-flight requests is 10 s; the read timeout 300 s.
DRAIN_SECONDS = 10.0
EXIT_GUARD_SECONDS = 20.0


def spawn_over(proxy: FreezableProxy, database: Database, tmp_path: Path) -> Served:
    """`serve` with only the database source, reached through `proxy`."""
    return spawn(
        tmp_path, "--database-url", proxy.url(database.name), env=clean_environment(**FROZEN_ENV)
    )


def wait_watch_settled(served: Served) -> None:
    """Wait for the reload the database watch asks for once it LISTENs (whatever changed
    before is unknown: it forgets and reads everything), which starts after `/readyz`
    answers 200. A freeze while that reload reads would hold it for the read timeout, and
    a SIGHUP meanwhile coalesces into one more reload after it, which never starts: a
    test that waits for the SIGHUP's reload must freeze only after this one ended. It
    has ended when a check confirmed the sources after the startup's record (a quiet
    reload is not recorded)."""
    startup = served.get(f"{HOT}/history")[1]["history"][-1]
    assert startup["trigger"] == "startup"
    recorded = datetime.fromisoformat(startup["timestamp"])

    def settled() -> bool:
        confirmed = served.get(f"{HOT}/status")[1]["last_successful_check_time"]
        return confirmed is not None and datetime.fromisoformat(confirmed) > recorded

    wait_sync(settled, message="the reload the database watch asks for when it starts")


def answers(served: Served, path: str) -> tuple[int, Any] | None:
    """GET `path`, or None while nothing listens yet."""
    assert served.process.poll() is None, f"serve exited: {served.log.read_text()}"
    try:
        return served.get(path)
    except (OSError, ValueError):
        return None


class TestListensAtOnce:
    """The listeners open before the first load: probes and health answer meanwhile."""

    def test_probes_answer_while_the_first_load_waits(
        self, seeded_pg: Database, tmp_path: Path, pg_proxy: FreezableProxy
    ):
        """A database that does not answer at startup (a slow Kubernetes list alike): the
        port is open, `/livez` 200, `/readyz` and health 503 saying what the load waits
        for, registry reads 503; once it answers, the rules serve as usual."""
        pg_proxy.freeze()
        served = spawn_over(pg_proxy, seeded_pg, tmp_path)
        try:

            def waiting() -> dict[str, Any] | None:
                answer = answers(served, "/health/hot-reload")
                if answer is None or answer[1]["starting"] is None:
                    return None
                starting: dict[str, Any] = answer[1]["starting"]
                return starting if starting["waiting_for"].startswith("reading ") else None

            starting = wait_sync(waiting, timeout=START_SECONDS, message="health while loading")
            assert seeded_pg.name in starting["waiting_for"]
            code, health = served.get("/health/hot-reload")
            assert (code, health["status"]) == (503, "unhealthy")
            assert served.get("/livez") == (200, {"status": "alive"})
            assert served.get("/readyz") == (503, {"ready": False})
            for path in ("/api/v1/rules", "/api/v1/rulesets", "/api/v1/rulesets/fraud"):
                code, body = served.get(path)
                assert code == 503, path
                message = body["error"]["message"]
                assert message.startswith("the rules are not loaded yet: the first load is")
                assert seeded_pg.name in message

            pg_proxy.thaw()

            served.wait_ready()
            code, health = served.get("/health/hot-reload")
            assert (code, health["status"], health["starting"]) == (200, "healthy", None)
            assert served.get("/api/v1/rulesets")[1]["count"] == 1
        finally:
            served.stop()

    def test_sigterm_while_the_first_load_waits_exits_0_at_once(
        self, seeded_pg: Database, tmp_path: Path, pg_proxy: FreezableProxy
    ):
        pg_proxy.freeze()
        served = spawn_over(pg_proxy, seeded_pg, tmp_path)
        try:
            wait_sync(lambda: answers(served, "/livez"), timeout=START_SECONDS, message="livez")
            served.process.send_signal(signal.SIGTERM)
            assert served.process.wait(EXIT_GUARD_SECONDS) == 0
        finally:
            served.stop()


class TestBoundedShutdown:
    def test_sigterm_does_not_wait_for_a_read_of_a_frozen_database(
        self, seeded_pg: Database, tmp_path: Path, pg_proxy: FreezableProxy
    ):
        """SIGTERM while a reload waits on a frozen server: the read runs on in a daemon
        thread the process does not wait for, so it exits 0 long before the read's own
        deadline (before: the loop's executor joined that thread, for the whole read
        timeout, past Kubernetes' grace period and into a SIGKILL)."""
        served = spawn_over(pg_proxy, seeded_pg, tmp_path)
        try:
            served.wait_ready()
            wait_watch_settled(served)
            before = served.get(f"{HOT}/status")[1]["last_check_time"]
            pg_proxy.freeze()
            served.process.send_signal(signal.SIGHUP)

            def reading() -> bool:
                status = served.get(f"{HOT}/status")[1]
                return bool(status["last_check_time"] != before)

            wait_sync(reading, message="the SIGHUP reload reading the frozen database")
            served.process.send_signal(signal.SIGTERM)

            assert served.process.wait(EXIT_GUARD_SECONDS) == 0
        finally:
            served.stop()

    def test_sigterm_cancels_an_api_reload_after_the_drain(
        self, seeded_pg: Database, tmp_path: Path, pg_proxy: FreezableProxy
    ):
        """The attack: SIGTERM while `POST /reload` waits on a frozen server. aiohttp's
        drain does not cancel a handler, it waits as long again: the exit took the read
        timeout (or twice the drain). Now the request gets the 10 s drain, then it is
        cancelled, and the process exits."""
        served = spawn_over(pg_proxy, seeded_pg, tmp_path)
        try:
            served.wait_ready()
            wait_watch_settled(served)
            pg_proxy.freeze()
            before = served.get(f"{HOT}/status")[1]["last_check_time"]
            request = urllib.request.Request(
                served.url + f"{HOT}/reload",
                data=b'{"force": true}',
                headers={"Content-Type": "application/json"},
                method="POST",
            )

            def ask() -> None:
                with contextlib.suppress(OSError):  # the answer never comes: cut at exit
                    urllib.request.urlopen(request, timeout=60)

            threading.Thread(target=ask, daemon=True).start()
            wait_sync(
                lambda: served.get(f"{HOT}/status")[1]["last_check_time"] != before,
                message="the API reload reading the frozen database",
            )
            started = time.monotonic()
            served.process.send_signal(signal.SIGTERM)

            assert served.process.wait(EXIT_GUARD_SECONDS) == 0
            assert time.monotonic() - started < DRAIN_SECONDS + 5
            assert "1 request(s) still running after 10 s were cancelled" in served.log.read_text()
        finally:
            served.stop()


class TestSighup:
    def test_sighup_reads_past_the_database_fingerprint(self, seeded_pg: Database, tmp_path: Path):
        """A change made with the triggers disabled moves no generation and sends no
        NOTIFY: only a read from scratch sees it, which SIGHUP now is."""
        served = spawn(
            tmp_path,
            "--database-url",
            seeded_pg.url,
            env=clean_environment(
                HOT_RELOAD_INTERVAL_SECONDS="3600", RULE_SIDECAR_VERIFY_INTERVAL_SECONDS="0"
            ),
        )
        evaluate = "/api/v1/rulesets/fraud/evaluate"
        try:
            served.wait_ready()
            # The listener, once connected, makes the next read a full one: wait for it.
            wait_sync(lambda: len(pg_listeners(seeded_pg.name)) == 1, message="listening")
            for _ in range(2):
                since = served.get(f"{HOT}/status")[1]["sources"][0]["last_successful_read"]
                served.process.send_signal(signal.SIGHUP)

                def read_again(since: str = since) -> bool:
                    status = served.get(f"{HOT}/status")[1]
                    return bool(status["sources"][0]["last_successful_read"] != since)

                wait_sync(read_again, message="a read after the listener's")
            assert post(served, evaluate, {"input": FOREIGN_LARGE})["total_points"] == 70
            seeded_pg.change_unseen(
                "UPDATE rule_sidecar_rules SET points = 45 WHERE id = 'large-amount'"
            )

            served.process.send_signal(signal.SIGHUP)

            wait_sync(
                lambda: post(served, evaluate, {"input": FOREIGN_LARGE})["total_points"] == 75,
                message="the unseen change served after SIGHUP",
            )
        finally:
            served.stop()


FOREIGN_LARGE = {"amount": 5000, "country": "FR"}  # fraud: large-amount 40 + foreign 30


def post(served: Served, path: str, body: Any) -> Any:
    call = urllib.request.Request(
        served.url + path,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(call, timeout=5) as response:
        return json.loads(response.read())

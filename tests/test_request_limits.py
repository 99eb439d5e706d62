"""Hostile requests against a real sidecar: huge batches, slow and idle connections,
connection floods, anonymous callers spending the admin's rate budget.

Each test attacks one limit and checks what the sidecar serves meanwhile (`/livez` on the
probe listener), what it answers (the limit named) and that it recovers. Timings appear
only as "it must not hang" guards; the figures are in `python -m bench.hostile_requests`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from conftest import dump_yaml, fraud_doc, make_ruleset_doc
from server_support import HOT, Served, Sidecar, clean_environment, free_port, spawn, wait_sync

from sidecar import engine
from sidecar.loader import Loader
from sidecar.sources.files import read_rule_files

# Starts processes, browsers or databases: left out of the quick loop (-m 'not slow').
pytestmark = pytest.mark.slow

EVALUATE = "/api/v1/rulesets/fraud/evaluate"
GUARD_SECONDS = 1.0
"""A /livez answer slower than this means the event loop was held: "did not hang"."""


@pytest.fixture
def rules(tmp_path: Path) -> Path:
    directory = tmp_path / "rules"
    directory.mkdir()
    (directory / "fraud.yaml").write_text(dump_yaml(fraud_doc()), encoding="utf-8")
    return directory


def serve(tmp_path: Path, rules: Path, **settings: str) -> Served:
    """`rule-sidecar serve` with a probe listener and `RULE_SIDECAR_<NAME>` settings."""
    env = clean_environment(
        RULE_SIDECAR_METRICS_PORT=str(free_port()),
        **{f"RULE_SIDECAR_{name.upper()}": value for name, value in settings.items()},
    )
    server = spawn(tmp_path, "--rules-dir", str(rules), env=env)
    server.wait_ready()
    # The API answers before the probe listener is bound (serve starts it second, and
    # serves meanwhile): on a loaded machine a test connected to a port not yet open.
    wait_sync(lambda: listening(probe_port(server)), message="probe listener bound")
    return server


def listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1.0):
        return True
    return False


@pytest.fixture
def served(tmp_path: Path, rules: Path) -> Iterator[Any]:
    """Factory: `served(**settings)` starts a process, stopped at teardown."""
    started: list[Served] = []

    def start(**settings: str) -> Served:
        server = serve(tmp_path, rules, **settings)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def probe_port(server: Served) -> int:
    return int(server.env["RULE_SIDECAR_METRICS_PORT"])


class LivezPoller:
    """Polls `/livez` on the probe listener from a thread, each answer within the guard."""

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}/livez"
        self.answers = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with urllib.request.urlopen(self.url, timeout=GUARD_SECONDS) as response:
                    assert response.status == 200
                self.answers += 1
            except (OSError, AssertionError) as exc:
                self.failures.append(repr(exc))
            time.sleep(0.02)

    def __enter__(self) -> LivezPoller:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def post_json(url: str, body: bytes, timeout: float = 120) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def batch(count: int) -> bytes:
    """`{"inputs": [...]}` of `count` inputs, every third one matching both scoring rules."""
    items = ['{"amount":5000,"country":"FR"}' if i % 3 == 0 else "{}" for i in range(count)]
    return ('{"inputs":[' + ",".join(items) + "]}").encode()


class TestBatches:
    """One batch never stalls the sidecar, and its size, time and answer are bounded."""

    def test_the_300k_item_batch_is_refused_and_probes_keep_answering(self, served):
        """The issue's batch (300,000 tiny inputs, 600 KB: 15-43 s on the loop, 700 MB)
        is refused at once with the limit named, and /livez answers throughout."""
        server = served()
        with LivezPoller(probe_port(server)) as poller:
            status, body = post_json(
                server.url + EVALUATE, b'{"inputs":[' + b",".join([b"{}"] * 300_000) + b"]}"
            )
            time.sleep(0.2)
        assert status == 413, body
        assert body["error"]["limit"] == "RULE_SIDECAR_MAX_BATCH_ITEMS"
        assert "300000" in body["error"]["message"]
        assert poller.failures == []
        assert poller.answers > 0

    def test_a_long_batch_is_evaluated_in_slices(self, served):
        """With the item limit raised, a batch that takes seconds is evaluated while
        /livez keeps answering on the probe listener, every answer within the guard."""
        server = served(
            max_batch_items="60000",
            max_evaluation_seconds="600",
            max_response_bytes=str(64 * 1024 * 1024),
        )
        with LivezPoller(probe_port(server)) as poller:
            status, body = post_json(server.url + EVALUATE, batch(60_000))
        assert status == 200, body
        assert len(body["results"]) == 60_000
        assert {r["registry_version"] for r in body["results"]} == {body["registry_version"]}
        assert body["results"][0]["decision"] == "deny"
        assert body["results"][1]["decision"] == "allow"
        assert poller.failures == []
        assert poller.answers > 0

    async def test_a_batch_answers_from_one_version_while_a_reload_publishes(
        self, start_sidecar, rules: Path, monkeypatch: pytest.MonkeyPatch
    ):
        """A reload published in the middle of a batch (here: after its 100th input, so
        that the moment does not depend on the machine's speed) does not reach the
        batch: every result names the version the batch started with."""
        app: Sidecar = await start_sidecar(rules, max_batch_items=1_000)
        before = app.version
        (rules / "fraud.yaml").write_text(dump_yaml(fraud_doc(large_points=70)), encoding="utf-8")
        newer = Loader().load(read_rule_files([rules])).snapshot
        evaluate, calls = engine.evaluate_ruleset, []

        def publishing_midway(*args: Any, **kwargs: Any) -> engine.Evaluation:
            calls.append(1)
            if len(calls) == 100:
                app.state.registry.publish(newer)
            return evaluate(*args, **kwargs)

        monkeypatch.setattr(engine, "evaluate_ruleset", publishing_midway)
        _, body = await app.call(
            "POST", EVALUATE, data=batch(1_000), headers={"Content-Type": "application/json"}
        )
        assert len(calls) == 1_000
        assert app.version == before + 1
        assert {r["registry_version"] for r in body["results"]} == {before}
        assert body["registry_version"] == before
        assert body["results"][0]["total_points"] == 40 + 30  # the old rules
        after = await app.evaluate("fraud", json.loads(batch(1))["inputs"][0])
        assert (after["registry_version"], after["total_points"]) == (before + 1, 70 + 30)

    async def test_a_batch_out_of_time_is_503_naming_the_limit(self, start_sidecar, rules: Path):
        """Past max_evaluation_seconds the batch stops (503, Retry-After, the limit named)."""
        app: Sidecar = await start_sidecar(
            rules, max_batch_items=50_000, max_evaluation_seconds=0.01
        )
        response, body = await app.call(
            "POST",
            EVALUATE,
            status=503,
            data=batch(50_000),
            headers={"Content-Type": "application/json"},
        )
        assert body["error"]["limit"] == "RULE_SIDECAR_MAX_EVALUATION_SECONDS"
        assert "of 50000 inputs" in body["error"]["message"]
        assert int(response.headers["Retry-After"]) >= 1

    async def test_batches_wait_their_turn_in_a_bounded_queue(self, start_sidecar, rules: Path):
        """One batch evaluates at a time; past max_queued_batches waiting, a batch is
        refused at once (503) instead of holding its parsed inputs in memory."""
        app: Sidecar = await start_sidecar(
            rules,
            max_batch_items=40_000,
            max_evaluation_seconds=600,
            max_response_bytes=64 * 1024 * 1024,
            max_queued_batches=1,
        )
        body = batch(40_000)

        async def send() -> tuple[int, dict[str, Any]]:
            response = await app.client.post(
                EVALUATE, data=body, headers={"Content-Type": "application/json"}
            )
            return response.status, await response.json()

        answers = await asyncio.gather(send(), send(), send())
        assert sorted(status for status, _ in answers) == [200, 200, 503]
        refused = next(answer for status, answer in answers if status == 503)
        assert refused["error"]["limit"] == "RULE_SIDECAR_MAX_QUEUED_BATCHES"

    async def test_an_answer_past_its_size_is_413_naming_the_limit(
        self, start_sidecar, rules: Path
    ):
        """An answer that would exceed max_response_bytes is refused, not built."""
        app: Sidecar = await start_sidecar(rules, max_response_bytes=4096)
        body = await app.post(
            EVALUATE, status=413, data=batch(200), headers={"Content-Type": "application/json"}
        )
        assert body["error"]["limit"] == "RULE_SIDECAR_MAX_RESPONSE_BYTES"
        small = await app.post(EVALUATE, json={"inputs": [{}, {"amount": 5000, "country": "FR"}]})
        assert [r["decision"] for r in small["results"]] == ["allow", "deny"]

    async def test_an_explanation_past_the_answer_size_is_refused_before_it_is_built(
        self, start_sidecar, tmp_path: Path
    ):
        """The attack: 500 rules reading one 900 KB field explained into a 455 MB answer
        (985 MB of memory, /livez held 0.8 s). Each rule shows the values it read, so an
        explanation is sized as it is made, single input or batch, and refused at the
        answer limit; the same input without explain answers as ever."""
        rules = tmp_path / "many"
        rules.mkdir()
        many = [{"id": f"r{i}", "condition": "has(input.a)", "points": 1} for i in range(500)]
        (rules / "big.yaml").write_text(dump_yaml(make_ruleset_doc("big", many)), "utf-8")
        app: Sidecar = await start_sidecar(rules)
        document = {"a": {f"k{i}": "x" * 900 for i in range(1000)}}
        url = "/api/v1/rulesets/big/evaluate"
        for body in ({"input": document}, {"inputs": [document]}):
            refused = await app.post(f"{url}?explain=true", status=413, json=body)
            assert refused["error"]["limit"] == "RULE_SIDECAR_MAX_RESPONSE_BYTES"
            assert "explanation would exceed 8388608 bytes" in refused["error"]["message"]
        # A control character is one character and six bytes of JSON (the second attack:
        # counting characters let a 48 MB answer past the 8 MiB limit).
        escaped = {"a": "\u0001" * 10_000}  # 500 reads: 5 M characters, 30 MB of JSON
        refused = await app.post(f"{url}?explain=true", status=413, json={"input": escaped})
        assert refused["error"]["limit"] == "RULE_SIDECAR_MAX_RESPONSE_BYTES"
        plain = await app.post(url, json={"input": document})
        assert plain["total_points"] == 500
        small = await app.post(f"{url}?explain=true", json={"input": {"a": {"k": 1}}})
        assert small["rules"][0]["reads"] == {"input.a": {"k": 1}}

    async def test_a_body_past_its_size_names_the_limit(self, start_sidecar, rules: Path):
        """The body limit's 413 names its setting like every other limit."""
        app: Sidecar = await start_sidecar(rules, max_body_bytes=1024)
        body = await app.post(EVALUATE, status=413, json={"input": {"s": "x" * 2000}})
        assert body["error"]["limit"] == "RULE_SIDECAR_MAX_BODY_BYTES"


def connect(port: int, timeout: float = 10.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.settimeout(timeout)
    return sock


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server closed (or reset) `sock`; waits half a second to see."""
    sock.settimeout(0.5)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def server_socket(local_port: int, remote_port: int) -> tuple[int, int] | None:
    """The kernel's send queue (bytes) and the inode of the server's socket from
    `local_port` to `remote_port` (/proc/net/tcp), or None once there is none. The inode
    is 0 once no process holds the socket (the kernel may still be sending)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = fields[1].split(":")[1], fields[2].split(":")[1]
        if (int(local, 16), int(remote, 16)) == (local_port, remote_port):
            return int(fields[4].split(":")[0], 16), int(fields[9])
    return None


def raw_evaluate(body: bytes) -> bytes:
    """An evaluate request as it goes on the wire, for pipelining."""
    head = (
        f"POST {EVALUATE} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def reading_little(port: int) -> socket.socket:
    """A connection whose client takes at most about 4 KiB of answers unread."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes; raises TimeoutError if it never does."""
    received = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return received
        if not chunk:
            return received
        received += chunk


class TestConnections:
    """Idle, slow and surplus connections are closed; the probe listener keeps answering."""

    def test_an_idle_connection_is_closed(self, served):
        """A connection that never sends a request is closed after the idle timeout."""
        server = served(idle_timeout_seconds="1")
        with connect(server.port) as sock:
            assert read_until_closed(sock) == b""

    def test_an_idle_keep_alive_connection_is_closed(self, served):
        """After an answer, a kept-alive connection that sends nothing more is closed."""
        server = served(idle_timeout_seconds="1")
        with connect(server.port) as sock:
            sock.sendall(b"GET /livez HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            answer = read_until_closed(sock)
        assert answer.startswith(b"HTTP/1.1 200")

    def test_slow_headers_are_cut_off(self, served):
        """Slowloris: a head sent a byte at a time is cut off at the idle timeout, even
        though bytes keep arriving."""
        server = served(idle_timeout_seconds="1")
        with connect(server.port) as sock:
            sock.sendall(b"GET /livez HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            deadline = time.monotonic() + 10
            closed = False
            while time.monotonic() < deadline and not closed:
                try:
                    sock.sendall(b"X")
                    sock.settimeout(0.2)
                    closed = sock.recv(1024) == b""
                except TimeoutError:
                    continue
                except (BrokenPipeError, ConnectionResetError):
                    closed = True
        assert closed, "a head still arriving byte by byte was held for 10 s"

    def test_a_slow_body_is_408_naming_the_limit(self, served):
        """A body that does not arrive within body_timeout_seconds is answered 408 (limit
        named) and the connection is closed."""
        server = served(body_timeout_seconds="1")
        with connect(server.port) as sock:
            sock.sendall(
                f"POST {EVALUATE} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
                '{"input": {'.encode()
            )
            answer = read_until_closed(sock)
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), answer[:300]
        assert json.loads(body)["error"]["limit"] == "RULE_SIDECAR_BODY_TIMEOUT_SECONDS"

    def test_sigterm_does_not_wait_on_a_slow_body_twice(self, served):
        """A body still arriving at SIGTERM ends at its 408; the connection is closed
        with it rather than read on for aiohttp's lingering time (that doubled the exit:
        21 s at the default 10 s body timeout)."""
        server = served(body_timeout_seconds="3")
        with connect(server.port) as sock:
            sock.sendall(
                f"POST {EVALUATE} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{".encode()
            )
            time.sleep(1)
            started = time.monotonic()
            server.process.terminate()
            server.process.wait(30)
            assert time.monotonic() - started < 4.5

    def test_a_client_that_never_reads_its_answer_is_dropped(self, served):
        """A client that does not take its answer within body_timeout_seconds has its
        connection aborted (it held a slot of the cap and the answer's memory forever)."""
        server = served(
            body_timeout_seconds="1",
            max_batch_items="40000",
            max_evaluation_seconds="600",
            max_response_bytes=str(64 * 1024 * 1024),
        )
        body = batch(40_000)
        with reading_little(server.port) as sock:
            sock.sendall(raw_evaluate(body))
            wait_sync(
                lambda: any("did not take its answer" in line for line in server.log_lines()),
                timeout=60,
                message="the sidecar gave up on the answer",
            )
            answer = read_until_closed(sock)
        head, _, received = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        assert len(received) < length

    def test_pipelined_small_answers_never_read_are_dropped(self, served):
        """Small answers are handed to the transport without a timer; a client that
        pipelines requests and never reads piles them up past the transport's high-water
        mark, and from then on the answer waits under the timer: the connection is
        aborted, not held with its answers in memory."""
        server = served(body_timeout_seconds="1")
        one = raw_evaluate(json.dumps({"input": {"amount": 5, "country": "US"}}).encode())
        with reading_little(server.port) as sock:
            sock.settimeout(2)
            with contextlib.suppress(OSError):  # blocked (the server stopped reading) or cut
                for _ in range(40_000):
                    sock.sendall(one)
            wait_sync(
                lambda: any("did not take its answer" in line for line in server.log_lines()),
                timeout=60,
                message="the sidecar gave up on the pipelined answers",
            )
            sock.settimeout(10)
            read_until_closed(sock)  # ends: the connection was aborted
        assert server.get("/livez")[0] == 200

    def test_answers_left_unread_after_a_close_are_dropped(self, served):
        """A client that pipelines until the server's kernel send queue is full leaves
        part of an answer in the transport's own buffer, below its high-water mark: it
        needed no deadline timer to be handed over. When the idle timeout then closes the
        connection, a graceful close would wait for the client to read it, forever; the
        connection cap aborts it once `body_timeout_seconds` has passed."""
        server = served(body_timeout_seconds="1", idle_timeout_seconds="2")
        body = json.dumps({"inputs": [{"amount": 5, "country": "US"}] * 100}).encode()
        request = urllib.request.Request(
            server.url + EVALUATE, data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            answer_bytes = len(response.read())  # about 20 KB: far below the mark (64 KiB)
        one = raw_evaluate(body)
        with reading_little(server.port) as sock:
            pair = (server.port, sock.getsockname()[1])
            sock.sendall(one * 3)  # the first answers fill the client's small buffer
            time.sleep(0.2)
            queued = (server_socket(*pair) or (0, 0))[0]
            for _ in range(1_000):  # one answer at a time, until the queue takes less
                sock.sendall(one)
                before, deadline = queued, time.monotonic() + 0.5  # (the idle timeout: 2 s)
                while queued - before < answer_bytes and time.monotonic() < deadline:
                    time.sleep(0.01)  # until the answer is queued, however busy the machine
                    queued = (server_socket(*pair) or (0, 0))[0]
                if queued - before < answer_bytes:
                    break
            wait_sync(
                lambda: any("were not read" in line for line in server.log_lines()),
                timeout=30,
                message="the cap dropped the closed connection",
            )
            # Aborted with a reset: the kernel drops the socket and its queue at once, not
            # only the process (a plain close kept megabytes queued for minutes).
            wait_sync(lambda: server_socket(*pair) is None, message="the socket is gone")
        assert not any("did not take its answer" in line for line in server.log_lines())
        assert server.get("/livez")[0] == 200

    def test_connections_past_the_cap_are_refused_and_probes_answer(self, served):
        """Past max_connections, while every connection is busy with a request, a new
        connection gets 503 and is closed; the probe listener, with its own cap, keeps
        answering; freed slots are served again."""
        server = served(max_connections="8", idle_timeout_seconds="60")
        held = [connect(server.port) for _ in range(8)]
        try:
            for sock in held:  # each one is in the middle of sending a body: busy
                sock.sendall(
                    b"POST /api/v1/rulesets/fraud/evaluate HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
                )
            time.sleep(0.2)
            for _ in range(5):
                with connect(server.port) as extra:
                    answer = read_until_closed(extra)
                assert answer.startswith(b"HTTP/1.1 503"), answer[:200]
                assert b"RULE_SIDECAR_MAX_CONNECTIONS" in answer
            status, _ = probe(probe_port(server))
            assert status == 200
        finally:
            for sock in held:
                sock.close()

        def served_again() -> bool:
            with contextlib.suppress(OSError):
                return server.get("/livez")[0] == 200
            return False

        wait_sync(served_again, message="a freed slot is served")

    def test_the_probe_listener_has_its_own_cap(self, served):
        """A flood of the probe listener is bounded too: at the cap the longest-idle
        connection makes room (so a new probe is answered), never a connection that is
        being answered; and the API keeps answering."""
        server = served(metrics_max_connections="4", idle_timeout_seconds="60")
        held = [connect(probe_port(server)) for _ in range(4)]
        try:
            for sock in held:
                sock.sendall(b"GET /livez HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                assert sock.recv(65536).startswith(b"HTTP/1.1 200")
            time.sleep(0.1)
            assert probe(probe_port(server))[0] == 200
            closed = [sock for sock in held if closed_by_server(sock)]
            assert closed == held[:1], "the longest-idle connection, and only it, was closed"
            assert server.get("/livez")[0] == 200
        finally:
            for sock in held:
                sock.close()

    @pytest.mark.parametrize("kind", ["silent", "trickling"])
    def test_sockets_held_open_never_lock_the_probes_out(self, served, kind):
        """The outside attack: keep the probe listener's cap full of sockets that never
        send a request (or send its head a byte every 20 ms), reopening every one the
        server closes, while the kubelet probes: /livez answers every time."""
        server = served(metrics_max_connections="8", idle_timeout_seconds="60")
        port, stop = probe_port(server), threading.Event()

        def attack() -> None:
            held = [connect(port) for _ in range(12)]
            while not stop.is_set():
                for index, sock in enumerate(held):
                    try:
                        if kind == "trickling":
                            sock.sendall(b"G")
                    except OSError:
                        sock.close()
                        held[index] = connect(port)
                time.sleep(0.02)
            for sock in held:
                sock.close()

        attacker = threading.Thread(target=attack)
        attacker.start()
        try:
            time.sleep(0.3)
            answers = []
            for _ in range(10):
                answers.append(probe(port)[0])
                time.sleep(0.1)
        finally:
            stop.set()
            attacker.join()
        assert answers == [200] * 10


def probe(port: int) -> tuple[int, bytes]:
    with urllib.request.urlopen(
        f"http://127.0.0.1:{port}/livez", timeout=GUARD_SECONDS
    ) as response:
        return response.status, response.read()


class TestClientMistakes:
    """What a client gets wrong is answered and forgotten: no traceback in the log (any
    client could fill it), no CPU spent on a body nobody reads."""

    def test_malformed_requests_leave_no_traceback(self, served):
        server = served()
        body = b'{"input": {"amount": 10}}'
        requests = [
            # an encoding aiohttp cannot decode; a Content-Length that is no number
            f"POST {EVALUATE} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Encoding: br\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body,
            b"POST " + EVALUATE.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Length: +3\r\n\r\n{}}",
            # a body that is not gzip, sent where nothing reads the body
            b"GET /api/v1/rulesets HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Encoding: gzip\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body),
        ]
        for request in requests:
            with connect(server.port) as sock:
                sock.sendall(request)
                answer = read_until_closed(sock)
            assert answer.split(b" ")[1] in (b"200", b"400"), answer[:200]
        with connect(server.port) as sock:  # a client that leaves mid-body
            sock.sendall(raw_evaluate(body)[:-5])
        assert server.get("/livez")[0] == 200
        time.sleep(0.5)
        logged = "\n".join(server.log_lines())
        assert "Traceback" not in logged
        assert '"level": "error"' not in logged

    @pytest.mark.parametrize(
        ("listener", "target", "expect", "status"),
        [
            ("api", "/api/v1/rulesets/nope/evaluate", "", b"404"),
            ("api", EVALUATE, "Expect: foo\r\n", b"417"),
            ("api", "/api/v1/rulesets", "Expect: foo\r\n", b"417"),
            ("probes", "/livez", "Expect: foo\r\n", b"417"),
        ],
    )
    def test_a_refused_compressed_body_is_not_read_on(
        self, served, listener: str, target: str, expect: str, status: bytes
    ):
        """A compressed body the sidecar does not need (an unknown ruleset, an `Expect`
        it cannot meet) is answered in JSON, saying `Connection: close`, and the
        connection closed at once: aiohttp would read and decompress the rest to keep the
        connection (seconds of CPU a megabyte of zeros)."""
        server = served()  # body_timeout_seconds 10: aiohttp would linger that long
        port = server.port if listener == "api" else probe_port(server)
        compressed = gzip.compress(b"0" * 50_000_000)
        with connect(port) as sock:
            sock.sendall(
                f"POST {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n{expect}".encode()
                + b"Content-Type: application/json\r\nContent-Encoding: gzip\r\n"
                b"Content-Length: %d\r\n\r\n" % len(compressed) + compressed[:4096]
            )
            started = time.monotonic()
            sock.settimeout(5)
            answer = read_until_closed(sock)
            assert time.monotonic() - started < 3, "the rest of the body was waited for"
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.split(b" ")[1] == status, answer[:300]
        assert b"Connection: close" in head
        assert json.loads(body)["error"]["status"] == int(status)


class TestRateBudgets:
    """Anonymous callers spend only their own budget; the admin's reload stays possible."""

    @pytest.fixture
    async def guarded(self, start_sidecar, rules: Path, tmp_path: Path) -> Sidecar:
        token = tmp_path / "token"
        token.write_text("s3cret\n", encoding="utf-8")
        app: Sidecar = await start_sidecar(rules, admin_token_file=token)
        return app

    ADMIN: ClassVar[dict[str, str]] = {"Authorization": "Bearer s3cret"}

    async def test_anonymous_validations_leave_the_admin_reload_and_rollback(
        self, guarded: Sidecar
    ):
        """The issue's attack: 70 anonymous validations (default budgets) run out of their
        budget, and the admin still reloads, rolls back and validates."""
        statuses = [
            (await guarded.call("POST", f"{HOT}/validate", status=None))[0].status
            for _ in range(70)
        ]
        assert 429 in statuses
        assert set(statuses) == {200, 429}
        (guarded.rules / "fraud.yaml").write_text(
            dump_yaml(fraud_doc(large_points=70)), encoding="utf-8"
        )
        reload = await guarded.post(f"{HOT}/reload", headers=self.ADMIN)
        assert reload["status"] == "success"
        await guarded.post(f"{HOT}/rollback", headers=self.ADMIN)
        assert (await guarded.post(f"{HOT}/validate", headers=self.ADMIN))["valid"] is True
        body = await guarded.post(f"{HOT}/validate", status=429)
        assert body["error"]["limit"] == "RULE_SIDECAR_VALIDATE_RATE_PER_MINUTE"

    async def test_without_a_token_validations_cannot_spend_the_reloads(
        self, start_sidecar, rules: Path
    ):
        """Without an admin token every caller is anonymous, yet validate and reload keep
        separate budgets: a validation flood leaves reloads possible."""
        app: Sidecar = await start_sidecar(rules, reload_rate_per_minute=2)
        statuses = [
            (await app.call("POST", f"{HOT}/validate", status=None))[0].status for _ in range(40)
        ]
        assert 429 in statuses
        await app.post(f"{HOT}/reload")
        await app.post(f"{HOT}/reload")
        await app.post(f"{HOT}/reload", status=429)

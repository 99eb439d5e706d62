"""The WebSocket `/ws/hot-reload` on a real server, with real WebSocket clients."""

from __future__ import annotations

import asyncio
import base64
import functools
import inspect
import re
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
import pytest
from conftest import dump_yaml, make_ruleset_doc
from server_support import (
    HOT,
    Sidecar,
    eventually,
    free_port,
    metric_value,
    receive_event,
    receive_until,
    serving,
)

from sidecar.api.app import AppState
from sidecar.api.views import status_view
from sidecar.api.websocket import ReloadNotificationManager

# Starts processes, browsers or databases: left out of the quick loop (-m 'not slow').
pytestmark = pytest.mark.slow

WS = "/ws/hot-reload"


def own_notifier(**options: Any):
    """A `prepare` hook that gives the app a notification manager built with `options`."""

    def prepare(state: AppState) -> None:
        state.notifier = ReloadNotificationManager(
            functools.partial(status_view, state.service, writes=state.writes),
            on_count=state.metrics.websocket_clients.set,
            **options,
        )

    return prepare


@pytest.fixture
async def sidecar(start_sidecar, plain_rules: Path) -> Sidecar:
    """The app on `plain_rules`, loaded."""
    return await start_sidecar(plain_rules)


def resume(instance: str, last_seq: int) -> str:
    """The WebSocket path resuming after `last_seq` of `instance`."""
    return f"{WS}?{urlencode({'instance': instance, 'last_seq': last_seq})}"


def resume_after(message: dict[str, Any]) -> str:
    """The WebSocket path resuming after `message`, as a client that kept it would."""
    return resume(message["instance"], message["seq"])


async def force_reload(app: Sidecar) -> None:
    """Publish a new version (and so broadcast rules_reloaded)."""
    await app.post(f"{HOT}/reload", json={"force": True})


class TestProtocol:
    """Requests a client may send and what it gets back."""

    async def test_first_message_is_status(self, sidecar: Sidecar):
        """On connect the server sends the seed's status message."""
        async with sidecar.client.ws_connect(WS) as ws:
            hello = await receive_event(ws)
        assert hello["event_type"] == "status"
        assert set(hello) == {"event_type", "timestamp", "instance", "seq", "data"}
        datetime.fromisoformat(hello["timestamp"])
        assert hello["instance"] == sidecar.state.notifier.instance
        assert re.fullmatch(r"[0-9a-f]{16}", hello["instance"])
        assert hello["data"]["registry"]["rule_count"] == 4
        assert hello["data"]["last_reload_status"] == "success"

    async def test_ping_pong(self, sidecar: Sidecar):
        """`{"type": "ping"}` answers a `pong` message."""
        async with sidecar.client.ws_connect(WS) as ws:
            await receive_event(ws)
            await ws.send_json({"type": "ping"})
            pong = await receive_event(ws)
        assert (pong["event_type"], pong["data"]) == ("pong", {})

    async def test_status_on_request(self, sidecar: Sidecar):
        """`{"type": "status"}` answers the current status."""
        async with sidecar.client.ws_connect(WS) as ws:
            await receive_event(ws)
            await force_reload(sidecar)
            await receive_until(ws, "rules_reloaded")
            await ws.send_json({"type": "status"})
            status, _ = await receive_until(ws, "status")
        assert status["data"]["registry"]["version"] == 2
        assert status["data"]["reload_count"] == 2

    @pytest.mark.parametrize(
        "text",
        [
            "garbage",
            "[1, 2]",
            '{"type": "subscribe"}',
            "{}",
            '{"type": ["ping"]}',
            "[" * 60_000,  # nests deeper than the JSON parser's recursion limit
        ],
        ids=["text", "list", "unknown", "empty", "type-not-a-string", "deep"],
    )
    async def test_unknown_request_is_an_error_and_the_socket_stays(
        self, sidecar: Sidecar, text: str
    ):
        """Garbage gets an `error` message; the connection stays open and usable."""
        async with sidecar.client.ws_connect(WS) as ws:
            await receive_event(ws)
            await ws.send_str(text)
            error = await receive_event(ws)
            assert error["event_type"] == "error"
            assert "ping" in error["data"]["message"]
            await ws.send_json({"type": "ping"})
            assert (await receive_event(ws))["event_type"] == "pong"
            assert not ws.closed

    async def test_an_oversized_frame_closes_only_that_client(self, sidecar: Sidecar):
        """A frame over 64 KiB closes its sender with 1009; others are not disturbed."""
        async with sidecar.client.ws_connect(WS) as big, sidecar.client.ws_connect(WS) as other:
            await receive_event(big)
            await receive_event(other)
            await big.send_str(" " * (65 * 1024))
            message = await big.receive(timeout=5)
            assert message.type is aiohttp.WSMsgType.CLOSE
            assert big.close_code == 1009
            await other.send_json({"type": "ping"})
            assert (await receive_event(other))["event_type"] == "pong"

    async def test_a_flood_of_connections_is_bounded(self, start_sidecar, plain_rules: Path):
        """80 connections at once against a limit of 20: 20 served, the rest refused with
        1013, and the count goes back to zero when they leave. (80: the test client's
        connection pool holds 100.)"""
        app = await start_sidecar(plain_rules, prepare=own_notifier(max_clients=20))
        connecting = asyncio.gather(*(app.client.ws_connect(WS) for _ in range(80)))
        sockets = await asyncio.wait_for(connecting, timeout=10)
        first = await asyncio.gather(*(ws.receive(timeout=5) for ws in sockets))
        served = [m for m in first if m.type is aiohttp.WSMsgType.TEXT]
        refused = [ws for ws in sockets if ws.close_code == 1013]
        assert (len(served), len(refused)) == (20, 60)
        await asyncio.gather(*(ws.close() for ws in sockets))
        await eventually(lambda: app.state.notifier.client_count == 0, message="all gone")

    async def test_binary_frames_are_ignored(self, sidecar: Sidecar):
        """A binary frame gets no answer and does not close the connection."""
        async with sidecar.client.ws_connect(WS) as ws:
            await receive_event(ws)
            await ws.send_bytes(b"\x00\x01")
            await ws.send_json({"type": "ping"})
            assert (await receive_event(ws))["event_type"] == "pong"

    async def test_server_shutdown_closes_with_1001(self, sidecar: Sidecar):
        """`close_all` (the SIGTERM drain) closes clients with code 1001."""
        async with sidecar.client.ws_connect(WS) as ws:
            await receive_event(ws)
            await sidecar.state.notifier.close_all()
            message = await ws.receive(timeout=5)
        assert message.type is aiohttp.WSMsgType.CLOSE
        assert ws.close_code == 1001

    async def test_too_many_clients_are_turned_away(self, start_sidecar, plain_rules: Path):
        """Past `max_clients` a new client is closed with 1013 (try again later)."""
        app = await start_sidecar(plain_rules, prepare=own_notifier(max_clients=1))
        async with app.client.ws_connect(WS) as first, app.client.ws_connect(WS) as second:
            assert (await receive_event(first))["event_type"] == "status"
            message = await second.receive(timeout=5)
            assert message.type is aiohttp.WSMsgType.CLOSE
            assert second.close_code == 1013


class TestSequence:
    """`seq` numbers every broadcast of an instance; a reconnecting client resumes from
    `instance` and `last_seq`."""

    async def test_broadcasts_carry_increasing_seq(self, sidecar: Sidecar):
        """Each broadcast's seq is one more than the previous; status repeats the latest."""
        async with sidecar.client.ws_connect(WS) as ws:
            hello = await receive_event(ws)
            for _ in range(3):
                await force_reload(sidecar)
            seqs = []
            for _ in range(3):
                event, before = await receive_until(ws, "rules_reloaded")
                seqs += [e["seq"] for e in before] + [event["seq"]]
            assert seqs == list(range(hello["seq"] + 1, hello["seq"] + 1 + len(seqs)))
            await ws.send_json({"type": "ping"})
            pong = await receive_event(ws)
            assert pong["seq"] == seqs[-1]

    async def test_reconnect_replays_exactly_the_missed_messages(self, sidecar: Sidecar):
        """With `?instance=I&last_seq=N` the missed broadcasts come first, once each, then
        status."""
        async with sidecar.client.ws_connect(WS) as ws:
            await receive_event(ws)
            await force_reload(sidecar)
            seen, _ = await receive_until(ws, "rules_reloaded")
        last_seq = seen["seq"]
        await force_reload(sidecar)
        await force_reload(sidecar)
        async with sidecar.client.ws_connect(resume_after(seen)) as ws:
            replayed = []
            while (event := await receive_event(ws))["event_type"] != "status":
                replayed.append(event)
            assert [e["seq"] for e in replayed] == [last_seq + 1, last_seq + 2]
            assert [e["data"]["version_after"] for e in replayed] == [3, 4]
            assert event["seq"] == last_seq + 2
            await ws.send_json({"type": "ping"})
            assert (await receive_event(ws))["event_type"] == "pong"

    async def test_up_to_date_client_gets_only_status(self, sidecar: Sidecar):
        """A `last_seq` equal to the current seq replays nothing."""
        notifier = sidecar.state.notifier
        current = notifier.broadcast("custom", {"n": 1})
        async with sidecar.client.ws_connect(resume(notifier.instance, current)) as ws:
            assert (await receive_event(ws))["event_type"] == "status"

    async def test_bad_last_seq_is_an_error(self, sidecar: Sidecar):
        """A `last_seq` that is not an integer gets an error, then status."""
        instance = sidecar.state.notifier.instance
        async with sidecar.client.ws_connect(f"{WS}?instance={instance}&last_seq=yesterday") as ws:
            error = await receive_event(ws)
            assert error["event_type"] == "error"
            assert "last_seq" in error["data"]["message"]
            assert (await receive_event(ws))["event_type"] == "status"

    async def test_instance_without_last_seq_is_an_error(self, sidecar: Sidecar):
        """An `instance` alone names no position: an error, then status."""
        async with sidecar.client.ws_connect(f"{WS}?instance=0123456789abcdef") as ws:
            error = await receive_event(ws)
            assert error["event_type"] == "error"
            assert "last_seq" in error["data"]["message"]
            assert (await receive_event(ws))["event_type"] == "status"

    async def test_gap_older_than_the_buffer_requires_resync(
        self, start_sidecar, plain_rules: Path
    ):
        """A gap the 5-message buffer no longer holds answers `resync_required`."""
        app = await start_sidecar(plain_rules, prepare=own_notifier(buffer_size=5))
        notifier = app.state.notifier
        current = 0
        for n in range(10):
            current = notifier.broadcast("custom", {"n": n})
        oldest = current - 4
        async with app.client.ws_connect(resume(notifier.instance, oldest - 2)) as ws:
            resync = await receive_event(ws)
            assert resync["event_type"] == "resync_required"
            assert resync["data"] == {
                "reason": "too_old",
                "last_seq": oldest - 2,
                "oldest_available": oldest,
                "current_seq": current,
            }
            assert (await receive_event(ws))["event_type"] == "status"

    async def test_gap_just_inside_the_buffer_is_replayed(self, start_sidecar, plain_rules: Path):
        """A client that saw the message before the oldest kept one gets all five replayed."""
        app = await start_sidecar(plain_rules, prepare=own_notifier(buffer_size=5))
        notifier = app.state.notifier
        current = 0
        for n in range(10):
            current = notifier.broadcast("custom", {"n": n})
        async with app.client.ws_connect(resume(notifier.instance, current - 5)) as ws:
            replayed = [await receive_event(ws) for _ in range(5)]
            assert [e["seq"] for e in replayed] == list(range(current - 4, current + 1))
            assert [e["data"]["n"] for e in replayed] == [5, 6, 7, 8, 9]

    async def test_last_seq_never_sent_requires_resync(self, sidecar: Sidecar):
        """A last_seq greater than this instance has ever sent answers `resync_required`."""
        notifier = sidecar.state.notifier
        current = notifier.broadcast("custom", {})
        async with sidecar.client.ws_connect(resume(notifier.instance, current + 100)) as ws:
            resync = await receive_event(ws)
            assert (resync["event_type"], resync["data"]["reason"]) == (
                "resync_required",
                "never_sent",
            )

    async def test_a_position_of_another_instance_requires_resync(
        self, start_sidecar, plain_rules: Path, tmp_path: Path
    ):
        """A position taken from one instance, given to another that has sent more than
        that (a restart, another replica): `resync_required`, and nothing of the second
        instance's stream is replayed as if it were what the client missed."""
        first = await start_sidecar(plain_rules)
        async with first.client.ws_connect(WS) as ws:
            hello = await receive_event(ws)
        other_rules = tmp_path / "other"
        other_rules.mkdir()
        write_many_rules(other_rules, 10)
        second = await start_sidecar(other_rules)
        assert second.state.notifier.instance != hello["instance"]
        await force_reload(second)
        async with second.client.ws_connect(resume_after(hello)) as ws:
            resync = await receive_event(ws)
            assert resync["event_type"] == "resync_required"
            assert resync["data"]["reason"] == "other_instance"
            assert resync["instance"] == second.state.notifier.instance
            status = await receive_event(ws)
            assert status["event_type"] == "status"
            assert resync["seq"] == status["seq"] > hello["seq"]

    async def test_a_bare_last_seq_requires_resync(self, sidecar: Sidecar):
        """`?last_seq=N` without its instance cannot be told from a number of an earlier
        instance: `resync_required` (the old clients' resume), even when N is current."""
        async with sidecar.client.ws_connect(WS) as ws:
            hello = await receive_event(ws)
        await force_reload(sidecar)
        async with sidecar.client.ws_connect(f"{WS}?last_seq={hello['seq']}") as ws:
            resync = await receive_event(ws)
            assert (resync["event_type"], resync["data"]["reason"]) == (
                "resync_required",
                "no_instance",
            )
            assert (await receive_event(ws))["event_type"] == "status"


def write_ruleset(rules: Path, ruleset_id: str, count: int) -> None:
    """The rules directory holds only `<ruleset_id>.yaml`, with `count` rules."""
    for old in rules.glob("*.yaml"):
        old.unlink()
    conditions = [
        {"id": f"{ruleset_id}-{n}", "condition": f"input.amount > {n}", "points": 1}
        for n in range(count)
    ]
    doc = make_ruleset_doc(ruleset_id, conditions)
    (rules / f"{ruleset_id}.yaml").write_text(dump_yaml(doc), encoding="utf-8")


async def first_messages(url: str, count: int) -> list[dict[str, Any]]:
    """The first `count` messages of a new WebSocket connection to `url`."""
    async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
        return [await receive_event(ws) for _ in range(count)]


class TestRestart:
    """A real `serve` process stopped and started again on the same port with other
    rules: a position from before the restart is never resumed from."""

    @pytest.mark.parametrize(
        ("query", "reason"),
        [(resume_after, "other_instance"), (lambda m: f"{WS}?last_seq={m['seq']}", "no_instance")],
        ids=["with-instance", "bare-last-seq"],
    )
    async def test_resuming_across_a_restart_requires_resync(
        self, tmp_path: Path, query: Any, reason: str
    ):
        """Ruleset `alpha` (6 rules) restarted as `beta` (9 rules): the new instance has
        sent more than the old position, yet the client gets `resync_required` first,
        then the new instance's status; none of beta's change events pass for what the
        client missed."""
        rules = tmp_path / "rules"
        rules.mkdir()
        write_ruleset(rules, "alpha", 6)
        port = free_port()
        with serving(tmp_path, rules, port=port) as first:
            [hello] = await first_messages(first.url + WS, 1)
        write_ruleset(rules, "beta", 9)
        with serving(tmp_path, rules, port=port) as second:
            _, health = second.get("/health/hot-reload")
            resync, status = await first_messages(second.url + query(hello), 2)
        assert resync["event_type"] == "resync_required", resync
        assert resync["data"]["reason"] == reason
        assert resync["data"]["current_seq"] > hello["seq"]
        assert status["event_type"] == "status"
        assert status["instance"] == resync["instance"] != hello["instance"]
        assert status["data"]["registry"]["revision"] == health["revision"]


class TestSlowClients:
    """A client that stops reading is dropped and never slows reloads or other clients."""

    async def test_stuck_client_is_dropped_without_delaying_anyone(
        self, start_sidecar, plain_rules: Path
    ):
        """A never-reading client is dropped with 1013; broadcasts and the reader keep pace."""
        app = await start_sidecar(plain_rules, prepare=own_notifier(queue_size=4))
        notifier = app.state.notifier
        stuck = await app.client.ws_connect(WS)  # connects, then never reads
        healthy = await app.client.ws_connect(WS)
        await receive_event(healthy)
        assert notifier.client_count == 2
        blob = "x" * 60_000
        # Broadcasting never waits for any client: it is not even a coroutine.
        assert not inspect.iscoroutinefunction(notifier.broadcast)
        sent = 0
        # Large messages fill the stuck client's socket buffers, then its queue; the
        # healthy client gets each one before the next is sent.
        while notifier.client_count == 2 and sent < 3000:
            seq = notifier.broadcast("bulk", {"blob": blob})
            event = await receive_event(healthy)
            assert event["seq"] == seq
            sent += 1
        assert notifier.client_count == 1, "the stuck client was never dropped"
        text = await (await app.client.get("/metrics")).text()
        assert metric_value(text, "rule_sidecar_websocket_clients") == 1
        # The healthy client still gets everything that follows.
        await app.post(f"{HOT}/reload", json={"force": True})
        await receive_until(healthy, "rules_reloaded")
        # Once the stuck client reads again it finds a prefix of the messages, then 1013.
        received = 0
        while (message := await stuck.receive(timeout=5)).type is aiohttp.WSMsgType.TEXT:
            received += 1
        assert message.type is aiohttp.WSMsgType.CLOSE
        assert stuck.close_code == 1013
        assert 0 < received < sent
        await healthy.close()
        await stuck.close()


def write_many_rules(rules: Path, count: int) -> None:
    """`count` new rules (100 per ruleset) in one more file of the rules directory."""
    docs = [
        make_ruleset_doc(
            f"bulk-{start}",
            [
                {"id": f"bulk-{n}", "condition": f"input.amount > {n}", "points": 1}
                for n in range(start, min(start + 100, count))
            ],
        )
        for start in range(0, count, 100)
    ]
    (rules / "bulk.yaml").write_text(dump_yaml(docs), encoding="utf-8")


async def read_until_reloaded(
    ws: aiohttp.ClientWebSocketResponse,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Read promptly up to `rules_reloaded`; fails if the server closes the socket."""
    return await receive_until(ws, "rules_reloaded", timeout=60)


class TestLargeChanges:
    """A reload that changes thousands of rules: a prompt reader keeps up with it."""

    RULES = 5000

    async def test_prompt_reader_survives_a_change_of_5000_rules(self, sidecar: Sidecar):
        """The first 100 change events go out one by one, then one `changes_omitted`
        stands for the rest; the reader stays connected, seq has no gap, and it ends up
        knowing the new version."""
        async with sidecar.client.ws_connect(WS) as ws:
            hello = await receive_event(ws)
            write_many_rules(sidecar.rules, self.RULES)
            await force_reload(sidecar)
            reloaded, before = await read_until_reloaded(ws)
            version = sidecar.state.registry.version
            assert len(sidecar.state.registry.current.rules) == 4 + self.RULES
            changes = [e for e in before if e["event_type"] in ("rule_added", "ruleset_added")]
            omitted = [e for e in before if e["event_type"] == "changes_omitted"]
            assert len(changes) == 100
            assert [e["data"] for e in omitted] == [{"registry_version": version, "sent": 100}]
            seqs = [e["seq"] for e in [*before, reloaded]]
            assert seqs == list(range(hello["seq"] + 1, hello["seq"] + 1 + len(seqs)))
            assert reloaded["data"]["version_after"] == version
            await ws.send_json({"type": "status"})
            status, _ = await receive_until(ws, "status")
            assert status["data"]["registry"]["version"] == version
            assert sidecar.state.notifier.client_count == 1

    async def test_resuming_after_a_change_of_5000_rules_replays_it(self, sidecar: Sidecar):
        """A client that was away during the change resumes with `last_seq`: it gets the
        whole (bounded) replay, then status, and stays connected."""
        async with sidecar.client.ws_connect(WS) as ws:
            hello = await receive_event(ws)
        write_many_rules(sidecar.rules, self.RULES)
        await force_reload(sidecar)
        version = sidecar.state.registry.version
        async with sidecar.client.ws_connect(resume_after(hello)) as ws:
            status, replayed = await receive_until(ws, "status", timeout=60)
            assert replayed[-1]["event_type"] == "rules_reloaded"
            assert replayed[-1]["data"]["version_after"] == version
            assert [e["seq"] for e in replayed] == list(range(hello["seq"] + 1, status["seq"] + 1))
            assert status["data"]["registry"]["version"] == version
            await ws.send_json({"type": "ping"})
            assert (await receive_event(ws))["event_type"] == "pong"

    async def test_reader_that_never_reads_is_dropped_once_with_one_log_line(
        self, start_sidecar, plain_rules: Path, caplog: pytest.LogCaptureFixture
    ):
        """Beside a prompt reader, a client that never reads: a 5000-rule change, then
        big broadcasts until the buffer (50) no longer holds what it has not taken. It
        alone is dropped (1013), with one log line, however much follows; the prompt
        reader keeps its connection."""
        app = await start_sidecar(plain_rules, prepare=own_notifier(buffer_size=50))
        notifier = app.state.notifier
        stuck = await app.client.ws_connect(WS)  # connects, then never reads
        prompt = await app.client.ws_connect(WS)
        await receive_event(prompt)
        with caplog.at_level("WARNING", logger="sidecar.websocket"):
            write_many_rules(plain_rules, self.RULES)
            await force_reload(app)
            await read_until_reloaded(prompt)
            blob = "x" * 60_000
            sent = 0
            while notifier.client_count == 2 and sent < 3000:
                seq = notifier.broadcast("bulk", {"blob": blob})
                assert (await receive_event(prompt))["seq"] == seq
                sent += 1
            assert notifier.client_count == 1, "the stuck client was never dropped"
            for _ in range(200):
                seq = notifier.broadcast("bulk", {"n": 1})
                assert (await receive_event(prompt))["seq"] == seq
            await force_reload(app)
            reloaded, _ = await read_until_reloaded(prompt)
            assert reloaded["data"]["version_after"] == app.state.registry.version
        drops = [r for r in caplog.records if "does not keep up" in r.getMessage()]
        assert len(drops) == 1
        while (message := await stuck.receive(timeout=5)).type is aiohttp.WSMsgType.TEXT:
            pass
        assert message.type is aiohttp.WSMsgType.CLOSE
        assert stuck.close_code == 1013
        assert not prompt.closed
        await prompt.close()
        await stuck.close()

    async def test_resuming_reader_that_never_reads_is_dropped_once_with_one_log_line(
        self, start_sidecar, plain_rules: Path, caplog: pytest.LogCaptureFixture
    ):
        """A client resumes from `last_seq` with 300 big broadcasts to replay, and never
        reads: it is dropped once the buffer moves past it, with one log line, not one
        per message it could not take."""
        app = await start_sidecar(plain_rules, prepare=own_notifier(buffer_size=300))
        notifier = app.state.notifier
        blob = "x" * 60_000
        first = notifier.broadcast("bulk", {"blob": blob})
        for _ in range(299):
            notifier.broadcast("bulk", {"blob": blob})
        with caplog.at_level("WARNING", logger="sidecar.websocket"):
            stuck = await app.client.ws_connect(resume(notifier.instance, first - 1))
            await eventually(lambda: notifier.client_count == 1, message="connected")
            sent = 0
            while notifier.client_count == 1 and sent < 3000:
                notifier.broadcast("bulk", {"blob": blob})
                await asyncio.sleep(0)
                sent += 1
            assert notifier.client_count == 0, "the stuck client was never dropped"
            for _ in range(100):
                notifier.broadcast("bulk", {"n": 1})
            await asyncio.sleep(0.1)
        drops = [r for r in caplog.records if "does not keep up" in r.getMessage()]
        assert len(drops) == 1
        await stuck.close()


class TestAuthentication:
    """With an admin token the WebSocket needs it too."""

    @pytest.fixture
    async def guarded(self, start_sidecar, plain_rules: Path, tmp_path: Path) -> Sidecar:
        """The app with the admin token `s3cret`."""
        token = tmp_path / "token"
        token.write_text("s3cret\n", encoding="utf-8")
        return await start_sidecar(plain_rules, admin_token_file=token)

    @pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer nope"}])
    async def test_without_the_token_is_401(self, guarded: Sidecar, headers: dict[str, str]):
        """No token or a wrong one: the handshake is refused with 401."""
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await guarded.client.ws_connect(WS, headers=headers)
        assert refused.value.status == 401
        assert guarded.state.notifier.client_count == 0

    async def test_with_the_token(self, guarded: Sidecar):
        """The right bearer token connects and receives status."""
        headers = {"Authorization": "Bearer s3cret"}
        async with guarded.client.ws_connect(WS, headers=headers) as ws:
            assert (await receive_event(ws))["event_type"] == "status"

    async def test_token_as_a_subprotocol_for_browsers(self, guarded: Sidecar):
        """The Kubernetes convention for browsers: the token as a base64url subprotocol,
        which the answer selects."""
        encoded = base64.urlsafe_b64encode(b"s3cret").decode().rstrip("=")
        protocol = f"base64url.bearer.authorization.k8s.io.{encoded}"
        async with guarded.client.ws_connect(WS, protocols=["other", protocol]) as ws:
            assert ws.protocol == protocol
            assert (await receive_event(ws))["event_type"] == "status"

    async def test_wrong_token_as_a_subprotocol_is_401(self, guarded: Sidecar):
        """A wrong token in the subprotocol is refused like a wrong header."""
        encoded = base64.urlsafe_b64encode(b"nope").decode().rstrip("=")
        protocol = f"base64url.bearer.authorization.k8s.io.{encoded}"
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await guarded.client.ws_connect(WS, protocols=[protocol])
        assert refused.value.status == 401

    async def test_subprotocol_token_is_not_accepted_on_http_endpoints(self, guarded: Sidecar):
        """Only the WebSocket takes the token as a subprotocol; reload needs the header."""
        encoded = base64.urlsafe_b64encode(b"s3cret").decode().rstrip("=")
        headers = {"Sec-WebSocket-Protocol": f"base64url.bearer.authorization.k8s.io.{encoded}"}
        response = await guarded.client.post("/api/v1/rules/hot-reload/reload", headers=headers)
        assert response.status == 401

    async def test_client_count_returns_to_zero(self, sidecar: Sidecar):
        """A client that leaves is forgotten."""
        async with sidecar.client.ws_connect(WS) as ws:
            await receive_event(ws)
            assert sidecar.state.notifier.client_count == 1

        def gone() -> bool:
            return sidecar.state.notifier.client_count == 0

        await eventually(gone, message="client forgotten")

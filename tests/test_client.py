"""`sidecar.client` against a real server: the async client, its sync face and events()."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.register_assert_rewrite("server_support")

from server_support import (  # noqa: E402
    INVALID_RULES,
    Sidecar,
    ThreadedSidecar,
    fraud_doc,
    free_port,
    ruleset_doc,
    to_yaml,
    wait_sync,
)

from sidecar.client import AsyncRuleClient, RuleClient, SidecarError  # noqa: E402
from sidecar.config import Settings  # noqa: E402

pytest_plugins = ["server_support"]

FOREIGN_LARGE = {"amount": 5000, "country": "FR"}


def base_url(app: Sidecar) -> str:
    return f"http://{app.client.host}:{app.client.port}"


@pytest.fixture
async def sidecar(start_sidecar, plain_rules: Path) -> Sidecar:
    """The app on `plain_rules`, loaded and watching."""
    return await start_sidecar(plain_rules, monitor=True)


@pytest.fixture
async def client(sidecar: Sidecar) -> AsyncIterator[AsyncRuleClient]:
    """An async client for `sidecar`, closed at teardown."""
    async with AsyncRuleClient(base_url(sidecar)) as rule_client:
        yield rule_client


async def next_event(events: AsyncIterator[dict[str, Any]]) -> dict[str, Any]:
    """The next event from `events()`, within 5 s."""
    return await asyncio.wait_for(anext(events), 5)


async def next_of_type(events: AsyncIterator[dict[str, Any]], event_type: str) -> dict[str, Any]:
    """Skip events until one of `event_type`."""
    while (event := await next_event(events))["event_type"] != event_type:
        pass
    return event


class TestAsyncClient:
    """The seed's integration helpers over HTTP."""

    async def test_execute_rules_from_registry(self, client: AsyncRuleClient):
        """One input: points, decision, matched rules and the registry version."""
        result = await client.execute_rules_from_registry(FOREIGN_LARGE, "fraud")
        assert result["total_points"] == 70
        assert result["decision"] == "deny"
        assert [m["id"] for m in result["matched"]] == ["large-amount", "foreign-country"]
        assert result["registry_version"] == 1

    async def test_numeric_ruleset_id(self, sidecar: Sidecar, client: AsyncRuleClient):
        """A ruleset id given as a number reaches the ruleset with that decimal id."""
        doc = ruleset_doc(7, [{"id": 70, "condition": "input.amount > 1", "points": 3}])
        (sidecar.rules / "seven.yaml").write_text(to_yaml(doc), encoding="utf-8")
        await client.reload()
        result = await client.execute_rules_from_registry({"amount": 2}, 7)
        assert (result["ruleset_id"], result["total_points"]) == ("7", 3)

    async def test_evaluate_many(self, client: AsyncRuleClient):
        """A batch answers one result per input, all from one version."""
        body = await client.evaluate_many([FOREIGN_LARGE, {"amount": 1, "country": "US"}], "fraud")
        assert [r["total_points"] for r in body["results"]] == [70, 0]
        assert {r["registry_version"] for r in body["results"]} == {body["registry_version"]}

    async def test_get_rules_from_registry(self, client: AsyncRuleClient):
        """Disabled rules are left out unless asked for; a ruleset filter narrows."""
        enabled = {rule["id"] for rule in await client.get_rules_from_registry()}
        assert enabled == {"large-amount", "foreign-country", "extra-big"}
        everything = await client.get_rules_from_registry(include_disabled=True)
        assert "never-on" in {rule["id"] for rule in everything}
        extra = await client.get_rules_from_registry("extra")
        assert [rule["id"] for rule in extra] == ["extra-big"]

    async def test_get_registry_info(self, client: AsyncRuleClient):
        """version, revision, counts and last_reload."""
        info = await client.get_registry_info()
        assert (info["version"], info["rule_count"], info["ruleset_count"]) == (1, 4, 2)
        assert info["revision"]
        assert info["last_reload"]

    async def test_is_registry_fresh(self, client: AsyncRuleClient):
        """Fresh within the default age; not with an age of zero."""
        assert await client.is_registry_fresh() is True
        await asyncio.sleep(0.01)
        assert await client.is_registry_fresh(max_age_seconds=0) is False

    async def test_never_loaded_registry_is_not_fresh(self, start_sidecar, tmp_path: Path):
        """Without any publish there is no last_reload: not fresh."""
        broken = tmp_path / "broken"
        broken.mkdir()
        (broken / "fraud.yaml").write_text(INVALID_RULES, encoding="utf-8")
        app = await start_sidecar(broken)
        async with AsyncRuleClient(base_url(app)) as rule_client:
            assert await rule_client.is_registry_fresh() is False
            health = await rule_client.health()
        assert health["status"] == "unhealthy"

    async def test_validate_registry_rules(self, sidecar: Sidecar, client: AsyncRuleClient):
        """Valid sources, then invalid ones (reported, not raised)."""
        assert (await client.validate_registry_rules())["valid"] is True
        await sidecar.post("/api/v1/rules/hot-reload/monitoring/stop")
        (sidecar.rules / "fraud.yaml").write_text(INVALID_RULES, encoding="utf-8")
        result = await client.validate_registry_rules()
        assert result["valid"] is False
        assert result["errors"][0]["rule_id"] == "large-amount"

    async def test_reload(self, sidecar: Sidecar, client: AsyncRuleClient):
        """reload: unchanged, forced, and a failure returned (not raised) with its errors."""
        assert (await client.reload())["status"] == "unchanged"
        forced = await client.reload(force=True)
        assert (forced["status"], forced["reload_count"]) == ("success", 2)
        await sidecar.post("/api/v1/rules/hot-reload/monitoring/stop")
        (sidecar.rules / "fraud.yaml").write_text(INVALID_RULES, encoding="utf-8")
        failed = await client.reload()
        assert failed["status"] == "failed"
        assert failed["errors"][0]["line"] == 7

    async def test_health(self, client: AsyncRuleClient):
        """The health body with its checks."""
        health = await client.health()
        assert health["status"] == "healthy"
        assert health["checks"]["registry_has_rules"] is True

    async def test_unknown_ruleset_raises_404(self, client: AsyncRuleClient):
        """SidecarError with status 404 and the server's message."""
        with pytest.raises(SidecarError) as raised:
            await client.execute_rules_from_registry({}, "nope")
        assert raised.value.status == 404
        assert raised.value.message == "ruleset 'nope' not found"
        assert raised.value.body["error"]["status"] == 404

    async def test_bad_input_raises_400(self, client: AsyncRuleClient):
        """An input past the limits is a SidecarError 400."""
        with pytest.raises(SidecarError) as raised:
            await client.execute_rules_from_registry({"s": "x" * 70_000}, "fraud")
        assert raised.value.status == 400

    async def test_nothing_listening_is_status_0(self):
        """No server: SidecarError with status 0, for every call."""
        async with AsyncRuleClient(f"http://127.0.0.1:{free_port()}", timeout=2) as rule_client:
            with pytest.raises(SidecarError) as raised:
                await rule_client.get_registry_info()
            assert raised.value.status == 0
            with pytest.raises(SidecarError) as raised:
                await rule_client.health()
            assert raised.value.status == 0

    async def test_token(self, start_sidecar, plain_rules: Path, tmp_path: Path):
        """Admin calls need the token: 401 without it, accepted with it."""
        token = tmp_path / "token"
        token.write_text("s3cret", encoding="utf-8")
        app = await start_sidecar(plain_rules, admin_token_file=token)
        async with AsyncRuleClient(base_url(app)) as anonymous:
            with pytest.raises(SidecarError) as raised:
                await anonymous.reload()
            assert raised.value.status == 401
            assert (await anonymous.execute_rules_from_registry({}, "extra"))["errors"]
        async with AsyncRuleClient(base_url(app), token="s3cret") as admin:
            assert (await admin.reload())["status"] == "unchanged"


class TestEvents:
    """`events()` follows the WebSocket and resumes after a disconnect."""

    async def test_status_then_rules_reloaded(self, sidecar: Sidecar, client: AsyncRuleClient):
        """First the status, then the reload's events, rules_reloaded last."""
        events = client.events()
        try:
            assert (await next_event(events))["event_type"] == "status"
            await client.reload(force=True)
            reloaded = await next_of_type(events, "rules_reloaded")
            assert reloaded["data"]["version_after"] == 2
        finally:
            await events.aclose()

    async def test_reconnects_and_resumes_from_last_seq(
        self, sidecar: Sidecar, client: AsyncRuleClient
    ):
        """Closed by the server, events() reconnects with last_seq and gets what it missed."""
        events = client.events()
        try:
            await next_event(events)
            await client.reload(force=True)
            seen = await next_of_type(events, "rules_reloaded")
            await sidecar.state.notifier.close_all()
            missed = sidecar.state.notifier.broadcast("custom", {"while": "disconnected"})
            replayed = await next_event(events)
            assert (replayed["event_type"], replayed["seq"]) == ("custom", seen["seq"] + 1)
            assert replayed["seq"] == missed
            assert (await next_event(events))["event_type"] == "status"
            await client.reload(force=True)
            assert (await next_of_type(events, "rules_reloaded"))["seq"] > missed
        finally:
            await events.aclose()

    async def test_resumes_even_before_the_first_broadcast(
        self, sidecar: Sidecar, client: AsyncRuleClient
    ):
        """A client that has only seen the status still gets what it missed while away."""
        events = client.events()
        try:
            hello = await next_event(events)
            await sidecar.state.notifier.close_all()
            missed = sidecar.state.notifier.broadcast("custom", {"while": "disconnected"})
            assert missed == hello["seq"] + 1
            replayed = await next_event(events)
            assert (replayed["event_type"], replayed["seq"]) == ("custom", missed)
        finally:
            await events.aclose()


@pytest.fixture(scope="module")
def threaded_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedSidecar]:
    """The real app on a real port, served from a thread: for the synchronous client."""
    rules = tmp_path_factory.mktemp("sync-rules")
    (rules / "fraud.yaml").write_text(to_yaml(fraud_doc()), encoding="utf-8")
    server = ThreadedSidecar(Settings(rules_dirs=(rules,), debounce_ms=20))
    server.start()
    yield server
    server.stop()


class TestSyncClient:
    """`RuleClient`: the same calls without an event loop."""

    def test_every_helper(self, threaded_server: ThreadedSidecar):
        """Each helper answers like the async one."""
        with RuleClient(threaded_server.url) as client:
            result = client.execute_rules_from_registry(FOREIGN_LARGE, "fraud")
            assert (result["total_points"], result["decision"]) == (70, "deny")
            batch = client.evaluate_many([FOREIGN_LARGE, {"amount": 1, "country": "US"}], "fraud")
            assert [r["total_points"] for r in batch["results"]] == [70, 0]
            enabled = {rule["id"] for rule in client.get_rules_from_registry("fraud")}
            assert enabled == {"large-amount", "foreign-country"}
            with_disabled = client.get_rules_from_registry("fraud", include_disabled=True)
            assert len(with_disabled) == 3
            info = client.get_registry_info()
            assert (info["rule_count"], info["ruleset_count"]) == (3, 1)
            assert client.is_registry_fresh() is True
            assert client.validate_registry_rules()["valid"] is True
            assert client.health()["status"] == "healthy"

    def test_reload(self, threaded_server: ThreadedSidecar):
        """A forced reload publishes a new version the next evaluation names."""
        with RuleClient(threaded_server.url) as client:
            before = client.get_registry_info()["version"]
            assert client.reload(force=True)["status"] == "success"
            after = client.execute_rules_from_registry(FOREIGN_LARGE, "fraud")
            assert after["registry_version"] == before + 1

    def test_errors(self, threaded_server: ThreadedSidecar):
        """404 for an unknown ruleset; status 0 when nothing listens."""
        with RuleClient(threaded_server.url) as client, pytest.raises(SidecarError) as raised:
            client.execute_rules_from_registry({}, "nope")
        assert raised.value.status == 404
        with (
            RuleClient(f"http://127.0.0.1:{free_port()}", timeout=2) as client,
            pytest.raises(SidecarError) as raised,
        ):
            client.get_registry_info()
        assert raised.value.status == 0

    def test_close_stops_its_thread(self, threaded_server: ThreadedSidecar):
        """Closing the client stops its private loop's thread."""

        def client_threads() -> int:
            return sum(thread.name == "rule-client" for thread in threading.enumerate())

        before = client_threads()
        client = RuleClient(threaded_server.url)
        assert client_threads() == before + 1
        client.health()
        client.close()
        wait_sync(lambda: client_threads() == before, message="client thread stopped")

"""`sidecar.client` against a real server (the async client, its sync face and events()),
and against a hostile one: a fake sidecar on a real localhost port that answers huge,
compressed, misshapen and non-JSON bodies and WebSocket frames, and records what the
client sent it."""

from __future__ import annotations

import asyncio
import json
import resource
import threading
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp import WSCloseCode, web
from conftest import dump_yaml, fraud_doc, make_ruleset_doc
from server_support import HOT, INVALID_RULES, Sidecar, ThreadedSidecar, free_port, wait_sync

from sidecar.client import (
    DEFAULT_MAX_ANSWER_BYTES,
    AnswerTooLarge,
    AsyncRuleClient,
    Event,
    InvalidId,
    MalformedAnswer,
    ResyncRequired,
    RuleClient,
    RuleClientError,
    SidecarError,
)
from sidecar.config import Settings

# Starts processes, browsers or databases: left out of the quick loop (-m 'not slow').
pytestmark = pytest.mark.slow

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


async def next_event(events: AsyncIterator[Event]) -> Event:
    """The next event from `events()`, within 5 s."""
    return await asyncio.wait_for(anext(events), 5)


async def next_of_type(events: AsyncIterator[Event], event_type: str) -> Event:
    """Skip events until one of `event_type`."""
    while (event := await next_event(events)).event_type != event_type:
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
        doc = make_ruleset_doc(7, [{"id": 70, "condition": "input.amount > 1", "points": 3}])
        (sidecar.rules / "seven.yaml").write_text(dump_yaml(doc), encoding="utf-8")
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

    async def test_validate_candidate(self, sidecar: Sidecar, client: AsyncRuleClient):
        """A YAML text and a list of documents, valid and not; nothing published; a list
        the sidecar cannot take is its 400."""
        version = sidecar.version
        result = await client.validate_candidate(dump_yaml(make_ruleset_doc("newcomer")))
        assert (result["valid"], result["changes"]["added"]) == (True, ["newcomer"])
        assert result["tests"] == {"run": 0, "passed": 0, "failed": 0}
        broken = INVALID_RULES.replace("fraud", "other").replace("large-amount", "big")
        result = await client.validate_candidate([make_ruleset_doc("a"), broken])
        assert result["valid"] is False
        [error] = result["errors"]
        assert (error["file"], error["line"], error["code"]) == ("request#2.yaml", 7, "cel.compile")
        assert sidecar.version == version
        with pytest.raises(SidecarError) as refused:
            await client.validate_candidate([])
        assert refused.value.status == 400

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
            assert (await next_event(events)).event_type == "status"
            await client.reload(force=True)
            reloaded = await next_of_type(events, "rules_reloaded")
            assert reloaded.data["version_after"] == 2
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
            assert (replayed.event_type, replayed.seq) == ("custom", seen.seq + 1)
            assert replayed.seq == missed
            assert (await next_event(events)).event_type == "status"
            await client.reload(force=True)
            assert (await next_of_type(events, "rules_reloaded")).seq > missed
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
            assert missed == hello.seq + 1
            replayed = await next_event(events)
            assert (replayed.event_type, replayed.seq) == ("custom", missed)
        finally:
            await events.aclose()


@pytest.fixture(scope="module")
def threaded_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedSidecar]:
    """The real app on a real port, served from a thread: for the synchronous client."""
    rules = tmp_path_factory.mktemp("sync-rules")
    (rules / "fraud.yaml").write_text(dump_yaml(fraud_doc()), encoding="utf-8")
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
            candidate = client.validate_candidate([make_ruleset_doc("fraud")])
            assert candidate["changes"]["changed"] == ["fraud"]
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


# A hostile stand-in for the sidecar

MIB = 1024 * 1024
REVISION = "0123456789abcdef"
INSTANCE, OTHER_INSTANCE = "9d41c0aa57e2b316", "3f2a9c0d1b7e4a55"
EVALUATION = {
    "ruleset_id": "fraud",
    "registry_version": 1,
    "revision": REVISION,
    "total_points": 0,
    "decision": None,
    "matched": [],
    "errors": [],
}
REGISTRY = {
    "version": 1,
    "revision": REVISION,
    "rule_count": 0,
    "ruleset_count": 0,
    "last_reload": None,
}
VALID_ANSWERS: dict[str, Any] = {
    "/api/v1/rules": {"registry_version": 1, "revision": REVISION, "count": 0, "rules": []},
    f"{HOT}/status": {
        "monitoring_active": True,
        "last_successful_check_time": datetime.now(UTC).isoformat(),
        "registry": REGISTRY,
    },
    f"{HOT}/validate": {"valid": True, "errors": []},
    f"{HOT}/reload": {"status": "unchanged", "version_before": 1, "version_after": 1, "errors": []},
    "/health/hot-reload": {"status": "healthy", "checks": {}},
}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def envelope(
    event_type: str, seq: int, data: dict[str, Any] | None = None, *, instance: str | None = None
) -> str:
    """A WebSocket message as the sidecar frames it (`instance` only when given)."""
    message = {"event_type": event_type, "timestamp": "2026-11-30T10:00:00+00:00", "seq": seq}
    return json.dumps(
        message | ({} if instance is None else {"instance": instance}) | {"data": data or {}}
    )


async def valid_answer(request: web.Request) -> web.StreamResponse:
    """What a sidecar would answer (a status, then the socket closed, on the WebSocket)."""
    if request.path == "/ws/hot-reload":
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        await socket.send_str(envelope("status", 1))
        await socket.close()
        return socket
    if request.path.endswith("/evaluate"):
        body = await request.json()
        if "inputs" in body:
            batch = {"registry_version": 1, "revision": REVISION, "results": [EVALUATION]}
            return web.json_response(batch)
        return web.json_response(EVALUATION)
    return web.json_response(VALID_ANSWERS[request.path])


def answer(body: bytes, status: int = 200, **headers: str) -> Handler:
    """A handler that answers `body` to everything."""

    async def handle(_request: web.Request) -> web.StreamResponse:
        return web.Response(body=body, status=status, headers=headers)

    return handle


@dataclass
class Seen:
    """One request the fake sidecar got."""

    method: str
    path_qs: str
    authorization: str | None
    cookie: str | None


@dataclass
class FakeSidecar:
    """A real aiohttp server on localhost: `handler` answers everything (valid answers by
    default), `seen` records every request with its Authorization and Cookie headers."""

    url: str = ""
    handler: Handler = valid_answer
    seen: list[Seen] = field(default_factory=list)

    def app(self) -> web.Application:
        async def record(request: web.Request) -> web.StreamResponse:
            headers = request.headers
            authorization, cookie = headers.get("Authorization"), headers.get("Cookie")
            self.seen.append(Seen(request.method, request.path_qs, authorization, cookie))
            return await self.handler(request)

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", record)
        return app


@pytest.fixture
async def fake(aiohttp_server) -> FakeSidecar:
    """A `FakeSidecar` listening on 127.0.0.1, valid until the test sets its handler."""
    fake = FakeSidecar()
    server = await aiohttp_server(fake.app())
    fake.url = f"http://127.0.0.1:{server.port}"
    return fake


class HugeAnswer:
    """Streams a JSON answer of `size` bytes in 1 MiB writes of one buffer (the test never
    holds it whole), and counts what left before the client hung up."""

    CHUNK = b"0" * MIB

    def __init__(self, size: int, *, declared: bool) -> None:
        self.size, self.declared = size, declared
        self.written = 0
        self.finished = asyncio.Event()

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        head, tail = b'{"registry": {"pad": "', b'"}}'
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        if self.declared:
            response.content_length = len(head) + self.size + len(tail)
        try:
            await response.prepare(request)
            await response.write(head)
            for _ in range(self.size // MIB):
                await response.write(self.CHUNK)
                self.written += MIB
            await response.write(tail)
        except ConnectionError:
            pass  # the client hung up: what this test wants
        finally:
            self.finished.set()
        return response


def gzip_bomb(size: int) -> bytes:
    """A valid status answer padded to `size` bytes, gzip-compressed to about size/1000."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    status = json.dumps(VALID_ANSWERS[f"{HOT}/status"])
    parts = [compressor.compress(status[:-1].encode() + b', "pad": "')]
    parts += [compressor.compress(HugeAnswer.CHUNK) for _ in range(size // MIB)]
    return b"".join([*parts, compressor.compress(b'"}'), compressor.flush()])


class TestHostileIds:
    """Ids no ruleset can have never leave the client: nothing is steered, nothing sent."""

    HOSTILE = (
        "../rules/hot-reload/monitoring/stop?",
        "../rules/hot-reload/monitoring/stop#",
        "fraud/../../rules/hot-reload/monitoring/stop",
        "..",
        ".",
        "%2e%2e",
        "%2e%2e/rules/hot-reload/monitoring/stop",
        "%2E%2E%2Frules%2Fhot-reload%2Fmonitoring%2Fstop",
        "fraud?ruleset_id=extra",
        "fraud#frag",
        "fraud/",
        "fraud\n",
        " fraud",
        "Fraud",
        "fr\u0430ud",  # a Cyrillic a
        "r\u00e8gles",
        "\u89c4\u5219",
        "",
        "x" * 64,
        True,
        -1,
        10**15,
        None,
    )

    @pytest.fixture
    async def guarded(self, start_sidecar, plain_rules: Path, tmp_path: Path) -> Sidecar:
        """A watching sidecar with an admin token (the client holds it too)."""
        token = tmp_path / "token"
        token.write_text("s3cret", encoding="utf-8")
        return await start_sidecar(plain_rules, monitor=True, admin_token_file=token)

    async def test_hostile_ids_are_refused_and_the_sidecar_is_untouched(self, guarded: Sidecar):
        """Path traversal, `?`, `#`, percent-encoding, unicode, wrong types: InvalidId (a
        ValueError) from every call that takes an id; monitoring stays on, nothing reloads."""
        before = await guarded.get(f"{HOT}/status")
        async with AsyncRuleClient(base_url(guarded), token="s3cret") as admin:
            for ruleset_id in self.HOSTILE:
                calls = [
                    admin.execute_rules_from_registry({"amount": 1}, ruleset_id),  # type: ignore[arg-type]
                    admin.evaluate_many([{"amount": 1}], ruleset_id),  # type: ignore[arg-type]
                ]
                if ruleset_id is not None:
                    calls.append(admin.get_rules_from_registry(ruleset_id))  # type: ignore[arg-type]
                for call in calls:
                    with pytest.raises(InvalidId) as raised:
                        await call
                    assert isinstance(raised.value, ValueError)
            assert (await admin.execute_rules_from_registry({}, "fraud"))["total_points"] == 0
        after = await guarded.get(f"{HOT}/status")
        assert after["monitoring_active"] is True
        assert after["reload_count"] == before["reload_count"]
        assert guarded.service.monitoring_active

    async def test_nothing_is_sent_for_a_hostile_id(self, fake: FakeSidecar):
        """The refusal happens before any request; a valid id is sent escaped by yarl."""
        async with AsyncRuleClient(fake.url, token="s3cret") as admin:
            for ruleset_id in ("../rules/hot-reload/monitoring/stop?", "%2e%2e", "a/b"):
                with pytest.raises(InvalidId):
                    await admin.execute_rules_from_registry({}, ruleset_id)
                with pytest.raises(InvalidId):
                    await admin.get_rules_from_registry(ruleset_id)
            assert fake.seen == []
            await admin.get_rules_from_registry("fraud.v2_x-1")
        assert [seen.path_qs for seen in fake.seen] == ["/api/v1/rules?ruleset_id=fraud.v2_x-1"]

    def test_the_sync_client_refuses_them_too(self, threaded_server: ThreadedSidecar):
        """`RuleClient` raises the same InvalidId, and its sidecar keeps watching."""
        with RuleClient(threaded_server.url) as client:
            with pytest.raises(InvalidId):
                client.execute_rules_from_registry({}, "../rules/hot-reload/monitoring/stop?")
            assert client.health()["checks"]["monitoring_active"] is True


class TestAdminToken:
    """The admin token goes with the calls that need it, and nowhere else."""

    async def test_the_token_goes_only_with_reload_and_events(self, fake: FakeSidecar):
        """Reads, evaluations and validation carry no Authorization; reload and the
        WebSocket do."""
        async with AsyncRuleClient(fake.url, token="s3cret") as admin:
            await admin.execute_rules_from_registry({}, "fraud")
            await admin.evaluate_many([{}], "fraud")
            await admin.get_rules_from_registry("fraud")
            await admin.get_registry_info()
            assert await admin.is_registry_fresh()
            await admin.validate_registry_rules()
            await admin.health()
            reads = len(fake.seen)
            await admin.reload()
            events = admin.events()
            assert (await next_event(events)).event_type == "status"
            await events.aclose()
        assert reads == 7
        assert [seen.authorization for seen in fake.seen[:reads]] == [None] * reads
        admin_calls = [(seen.path_qs, seen.authorization) for seen in fake.seen[reads:]]
        assert admin_calls == [
            (f"{HOT}/reload", "Bearer s3cret"),
            ("/ws/hot-reload", "Bearer s3cret"),
        ]

    async def test_nothing_an_answer_sets_is_sent_back(self, fake: FakeSidecar):
        """A cookie an answer sets goes with no later call (by name: aiohttp keeps no
        cookies of IP addresses anyway)."""

        async def set_cookie(request: web.Request) -> web.StreamResponse:
            response = await valid_answer(request)
            response.set_cookie("session", "planted")
            return response

        fake.handler = set_cookie
        async with AsyncRuleClient(fake.url.replace("127.0.0.1", "localhost")) as client:
            await client.get_registry_info()
            await client.health()
        assert [seen.cookie for seen in fake.seen] == [None, None]

    @pytest.mark.parametrize(
        "base", ["http://admin:s3cret@127.0.0.1:8000", "http://127.0.0.1:8000/?a=1", "ftp://h"]
    )
    def test_the_base_url_carries_nothing_but_the_address(self, base: str):
        """Credentials in the base URL would go with every call: refused, like a query,
        a fragment or another scheme."""
        with pytest.raises(ValueError, match="base_url"):
            AsyncRuleClient(base)

    async def test_a_redirect_is_not_followed(self, fake: FakeSidecar):
        """A 307 towards an admin endpoint is a malformed answer, not a second request
        (aiohttp would repeat the POST there, token and all)."""
        fake.handler = answer(b"", 307, Location=f"{HOT}/monitoring/stop")
        async with AsyncRuleClient(fake.url, token="s3cret") as admin:
            with pytest.raises(MalformedAnswer) as raised:
                await admin.execute_rules_from_registry({}, "fraud")
        assert raised.value.status == 307
        assert [seen.path_qs for seen in fake.seen] == ["/api/v1/rulesets/fraud/evaluate"]


class TestHostileAnswers:
    """Whatever comes back, the client raises its own error naming what was wrong, and
    reads no more than `max_answer_bytes`."""

    @pytest.mark.parametrize("declared", [False, True], ids=["chunked", "content-length"])
    async def test_a_huge_answer_is_cut_at_the_limit(self, fake: FakeSidecar, declared: bool):
        """300 MB streamed (or announced): AnswerTooLarge after at most the limit; the
        server could not send the rest, and the client's memory did not grow by it."""
        huge = HugeAnswer(300 * MIB, declared=declared)
        fake.handler = huge
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        async with AsyncRuleClient(fake.url, timeout=60) as client:
            with pytest.raises(AnswerTooLarge) as raised:
                await client.get_registry_info()
        assert str(DEFAULT_MAX_ANSWER_BYTES) in str(raised.value)
        await asyncio.wait_for(huge.finished.wait(), 60)
        assert huge.written < 100 * MIB
        grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_kib
        assert grown_kib < 150 * 1024

    async def test_the_limit_is_a_setting_of_the_client(self, fake: FakeSidecar):
        """A valid answer past a lower `max_answer_bytes` is refused; under it, read."""
        async with AsyncRuleClient(fake.url, max_answer_bytes=100) as small:
            with pytest.raises(AnswerTooLarge):
                await small.get_registry_info()
        async with AsyncRuleClient(fake.url, max_answer_bytes=1000) as enough:
            assert (await enough.get_registry_info())["version"] == 1

    async def test_a_compressed_answer_is_refused(self, fake: FakeSidecar):
        """A gzip bomb (64 MiB of JSON in about 64 KB) is never inflated: the client asks
        for `identity` and refuses any other encoding."""
        fake.handler = answer(gzip_bomb(64 * MIB), **{"Content-Encoding": "gzip"})
        async with AsyncRuleClient(fake.url) as client:
            with pytest.raises(MalformedAnswer, match="gzip"):
                await client.get_registry_info()

    @pytest.mark.parametrize(
        ("call", "status", "body", "named"),
        [
            ("get_registry_info", 200, b"[]", "expected an object, got list"),
            ("get_registry_info", 200, b"{}", "'monitoring_active' is missing"),
            ("get_registry_info", 200, b"null", "expected an object, got null"),
            ("get_registry_info", 200, b"<html>hello</html>", "not a JSON answer"),
            ("get_registry_info", 200, b'{"a": "\xff\xfe"}', "not a JSON answer"),
            ("get_registry_info", 200, b"[" * 100_000, "not a JSON answer"),
            (
                "get_registry_info",
                200,
                json.dumps(
                    VALID_ANSWERS[f"{HOT}/status"] | {"registry": REGISTRY | {"version": "1"}}
                ).encode(),
                "registry.version: expected an integer, got str",
            ),
            (
                "get_registry_info",
                200,
                json.dumps(
                    VALID_ANSWERS[f"{HOT}/status"] | {"registry": REGISTRY | {"version": True}}
                ).encode(),
                "registry.version: expected an integer, got bool",
            ),
            (
                "is_registry_fresh",
                200,
                json.dumps(
                    VALID_ANSWERS[f"{HOT}/status"] | {"last_successful_check_time": "yesterday"}
                ).encode(),
                "yesterday",
            ),
            (
                "is_registry_fresh",
                200,
                json.dumps(
                    VALID_ANSWERS[f"{HOT}/status"]
                    | {"last_successful_check_time": "2026-11-30T10:00:00"}
                ).encode(),
                "without offset",
            ),
            (
                "get_rules_from_registry",
                200,
                b'{"registry_version": 1, "revision": "r", "rules": {}}',
                "rules: expected a list",
            ),
            (
                "get_rules_from_registry",
                200,
                json.dumps(
                    {
                        "registry_version": 1,
                        "revision": "r",
                        "rules": [
                            {
                                "id": "a",
                                "ruleset_id": "b",
                                "name": "a",
                                "condition": "true",
                                "points": 1,
                                "priority": 0,
                                "enabled": "yes",
                            }
                        ],
                    }
                ).encode(),
                "rules[0].enabled: expected true or false, got str",
            ),
            ("execute_rules_from_registry", 200, b"[]", "expected an object, got list"),
            (
                "execute_rules_from_registry",
                200,
                json.dumps(EVALUATION | {"matched": [{"id": "a"}]}).encode(),
                "matched[0]: the field 'name' is missing",
            ),
            (
                "evaluate_many",
                200,
                json.dumps({"registry_version": 1, "revision": "r", "results": "x"}).encode(),
                "results: expected a list, got str",
            ),
            ("health", 503, b"[]", "expected an object, got list"),
            ("reload", 422, b"{}", "'status' is missing"),
        ],
    )
    async def test_a_misshapen_answer_is_malformed(
        self, fake: FakeSidecar, call: str, status: int, body: bytes, named: str
    ):
        """Lists for objects, `{}`, `null`, wrong types, HTML, bad UTF-8, deep nesting, bad
        timestamps: MalformedAnswer (a SidecarError with the answer's status) that names
        the field; never a TypeError, KeyError or JSONDecodeError."""
        fake.handler = answer(body, status, **{"Content-Type": "application/json"})
        arguments: dict[str, tuple[Any, ...]] = {
            "execute_rules_from_registry": ({}, "fraud"),
            "evaluate_many": ([{}], "fraud"),
        }
        async with AsyncRuleClient(fake.url, token="s3cret") as client:
            with pytest.raises(MalformedAnswer) as raised:
                await getattr(client, call)(*arguments.get(call, ()))
        assert named in str(raised.value)
        assert isinstance(raised.value, SidecarError)
        assert isinstance(raised.value, RuleClientError)
        assert raised.value.status == status


def hostile_socket(frames: list[str | bytes]) -> Handler:
    """A WebSocket that sends a valid status, then `frames`, then waits for the client."""

    async def handle(request: web.Request) -> web.StreamResponse:
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        await socket.send_str(envelope("status", 1))
        for frame in frames:
            if isinstance(frame, bytes):
                await socket.send_bytes(frame)
            else:
                await socket.send_str(frame)
        async for _message in socket:
            pass
        return socket

    return handle


class TestHostileEvents:
    """events() raises the client's own errors for frames that are not the sidecar's,
    and for a subscription the sidecar refuses, instead of retrying forever."""

    @pytest.mark.parametrize(
        ("frame", "named"),
        [
            ("not json", "not a JSON answer"),
            ("[]", "expected an object, got list"),
            ("{}", "'event_type' is missing"),
            (envelope("status", 2).replace('"seq": 2', '"seq": "2"'), "seq: expected an integer"),
            (envelope("status", 2).replace('"seq": 2', '"seq": -2'), "seq: negative"),
            (envelope("status", 2).replace('"data": {}', '"data": []'), "data: expected an object"),
            (b"\x00binary", "BINARY"),
            (envelope("status", 2, instance="../x"), "instance: not an instance id"),
            (envelope("status", 2, instance="a" * 10_000), "instance: not an instance id"),
        ],
    )
    async def test_a_malformed_frame_is_malformed_answer(
        self, fake: FakeSidecar, frame: str | bytes, named: str
    ):
        """The status first, then MalformedAnswer naming what was wrong."""
        fake.handler = hostile_socket([frame])
        async with AsyncRuleClient(fake.url) as client:
            events = client.events()
            try:
                assert (await next_event(events)).event_type == "status"
                with pytest.raises(MalformedAnswer) as raised:
                    await asyncio.wait_for(anext(events), 10)
            finally:
                await events.aclose()
        assert named in str(raised.value)

    async def test_a_frame_past_the_limit_is_too_large(self, fake: FakeSidecar):
        """A 1 MiB message to a client that reads at most 64 KiB: AnswerTooLarge."""
        fake.handler = hostile_socket([envelope("status", 2, {"pad": "0" * MIB})])
        async with AsyncRuleClient(fake.url, max_answer_bytes=64 * 1024) as client:
            events = client.events()
            try:
                await next_event(events)
                with pytest.raises(AnswerTooLarge):
                    await asyncio.wait_for(anext(events), 10)
            finally:
                await events.aclose()

    @pytest.mark.parametrize(
        ("status", "error"), [(401, SidecarError), (404, SidecarError), (200, MalformedAnswer)]
    )
    async def test_a_refused_subscription_is_an_error(
        self, fake: FakeSidecar, status: int, error: type[SidecarError]
    ):
        """401 (no or wrong token), 404, or a plain HTTP answer: an error with the status,
        not a silent reconnect loop."""
        body = json.dumps({"error": {"status": status, "message": "a bearer token is required"}})
        fake.handler = answer(body.encode(), status, **{"Content-Type": "application/json"})
        async with AsyncRuleClient(fake.url) as client:
            events = client.events()
            with pytest.raises(error) as raised:
                await asyncio.wait_for(anext(events), 10)
        assert type(raised.value) is error
        assert raised.value.status == status


class TestResync:
    """A stream that cannot say what was missed surfaces `ResyncRequired`, and goes on."""

    @pytest.mark.parametrize(
        "position",
        [{"last_seq": -1}, {"last_seq": True}, {"instance": "9d41c0aa57e2b316"}],
        ids=["negative", "bool", "instance-alone"],
    )
    async def test_a_resume_position_is_checked(
        self, client: AsyncRuleClient, position: dict[str, Any]
    ):
        """A position the sidecar could never have given is a ValueError, not a request."""
        with pytest.raises(ValueError, match="last_seq"):
            await asyncio.wait_for(anext(client.events(**position)), 10)

    async def test_a_gap_older_than_the_buffer(self, sidecar: Sidecar, client: AsyncRuleClient):
        """Away while 1,005 messages went out (the buffer holds 1,000): ResyncRequired
        with the gap, then the status, then new events as usual."""
        events = client.events()
        try:
            hello = await next_event(events)
            await sidecar.state.notifier.close_all()
            for _ in range(1005):
                current = sidecar.state.notifier.broadcast("custom", {})
            resync = await next_event(events)
            assert isinstance(resync, ResyncRequired)
            assert (resync.event_type, resync.seq) == ("resync_required", current)
            assert resync.data["last_seq"] == hello.seq
            status = await next_event(events)
            assert (type(status), status.event_type) == (Event, "status")
            await client.reload(force=True)
            assert (await next_of_type(events, "rules_reloaded")).seq > current
        finally:
            await events.aclose()

    @pytest.mark.parametrize(
        "sent_since", [0, 60], ids=["new-instance-behind", "new-instance-ahead"]
    )
    async def test_a_restarted_sidecar(self, tmp_path: Path, sent_since: int):
        """The sidecar restarts on the same address and counts anew, whether or not its
        new count has passed the client's position by the time the client is back: the
        client resumes with the earlier instance's position and gets ResyncRequired first
        (on main a new instance ahead replayed its own messages as if they were missed)."""
        rules = tmp_path / "rules"
        rules.mkdir()
        (rules / "fraud.yaml").write_text(dump_yaml(fraud_doc()), encoding="utf-8")
        settings = Settings(rules_dirs=(rules,), debounce_ms=20)
        port = free_port()

        def broadcast(server: ThreadedSidecar, count: int) -> int:
            async def burst() -> int:
                assert server.state is not None
                for _ in range(count):
                    server.state.notifier.broadcast("custom", {})
                return server.state.notifier.broadcast("custom", {})

            return server.run(burst())

        first = await asyncio.to_thread(ThreadedSidecar(settings, port=port).start)
        async with AsyncRuleClient(first.url) as client:
            events = client.events()
            try:
                await next_event(events)
                last = await asyncio.to_thread(broadcast, first, 20)
                while (await next_event(events)).seq < last:
                    pass
                # The client is paused at its last event: it reconnects only when asked
                # for the next one, so the new instance sends `sent_since` before that.
                await asyncio.to_thread(first.stop)
                second = await asyncio.to_thread(ThreadedSidecar(settings, port=port).start)
                try:
                    current = await asyncio.to_thread(broadcast, second, sent_since)
                    assert (current > last) is bool(sent_since)
                    resync = await next_event(events)
                    assert isinstance(resync, ResyncRequired)
                    assert second.state is not None
                    assert resync.instance == second.state.notifier.instance
                    assert (resync.seq, resync.data["last_seq"]) == (current, last)
                    assert resync.data["reason"] == "other_instance"
                    status = await next_event(events)
                    assert (status.event_type, status.seq) == ("status", current)
                finally:
                    await asyncio.to_thread(second.stop)
            finally:
                await events.aclose()

    @pytest.mark.parametrize(
        ("before", "after", "seq_after", "reason"),
        [
            (INSTANCE, INSTANCE, 11, None),
            (INSTANCE, OTHER_INSTANCE, 30, "other_instance"),
            (None, None, 3, "seq_went_back"),
        ],
        ids=["same-instance", "other-instance-unannounced", "seq-went-back-unannounced"],
    )
    async def test_it_resumes_from_the_instance_and_seq_it_saw(
        self,
        fake: FakeSidecar,
        before: str | None,
        after: str | None,
        seq_after: int,
        reason: str | None,
    ):
        """Reconnecting, the client gives back the instance and seq of the last message
        (the sidecar's resume position). A server whose next message cannot follow it
        (another instance, or a sequence that went back) without its saying so gets a
        ResyncRequired from the client itself."""
        connections: list[tuple[str | None, str | None]] = []

        async def handle(request: web.Request) -> web.StreamResponse:
            connections.append((request.query.get("last_seq"), request.query.get("instance")))
            socket = web.WebSocketResponse()
            await socket.prepare(request)
            if len(connections) == 1:
                await socket.send_str(envelope("status", 10, instance=before))
                await socket.close(code=WSCloseCode.GOING_AWAY)
                return socket
            await socket.send_str(envelope("status", seq_after, instance=after))
            async for _message in socket:
                pass
            return socket

        fake.handler = handle
        async with AsyncRuleClient(fake.url) as client:
            events = client.events()
            try:
                first = await next_event(events)
                assert (first.seq, first.instance) == (10, before)
                if reason is not None:
                    resync = await next_event(events)
                    assert isinstance(resync, ResyncRequired)
                    assert resync.data == {
                        "reason": reason,
                        "last_seq": 10,
                        "current_seq": seq_after,
                        "detected_by": "client",
                    }
                status = await next_event(events)
                assert (type(status), status.seq, status.instance) == (Event, seq_after, after)
            finally:
                await events.aclose()
        assert connections == [(None, None), ("10", before)]

"""The ConfigMap API source, with the real `kubernetes` client against a fake API server
that speaks the list/watch protocol (tests/kube_support.py)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import subprocess
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import urllib3
from conftest import dump_yaml, fraud_doc, make_ruleset_doc
from kubernetes import client
from server_support import (
    HOT,
    START_SECONDS,
    clean_environment,
    command,
    eventually,
    free_port,
    receive_until,
    spawn,
    wait_sync,
)

from sidecar.api.views import health_view, history_view, status_view, writes_view
from sidecar.errors import LoadError, Problem, ProblemCode
from sidecar.loader import Loader
from sidecar.registry import RuleRegistry
from sidecar.service import HealthStatus, HotReloadService
from sidecar.sources.kubernetes import ConfigMapSource, EventRecorder
from sidecar.testing import FakeKubernetes

# What these services' status says of writes: none without the API's writer.
NO_WRITES = writes_view(None, False)

# Starts processes, browsers or databases: left out of the quick loop (-m 'not slow').
pytestmark = pytest.mark.slow

LABELS = {"rule-sidecar/rules": "true"}
SELECTOR = "rule-sidecar/rules=true"


def api_for(url: str) -> client.ApiClient:
    configuration = client.Configuration()
    configuration.host = url
    return client.ApiClient(configuration)


def source_for(kube: FakeKubernetes, **options: Any) -> ConfigMapSource:
    options.setdefault("max_backoff_seconds", 0.3)
    return ConfigMapSource(
        api_for(kube.url), namespace="default", label_selector=SELECTOR, **options
    )


def names(source: ConfigMapSource) -> list[str]:
    return [file.name for file in source.read()]


def contents(source: ConfigMapSource) -> list[bytes]:
    return [file.content for file in source.read()]


def lists(kube: FakeKubernetes) -> int:
    return sum(1 for query in kube.requests if query.get("watch") != "true")


@contextlib.asynccontextmanager
async def watching(source: ConfigMapSource) -> AsyncIterator[asyncio.Queue[str]]:
    """Run `source.changes()` in a task; its reasons arrive on the queue."""
    reasons: asyncio.Queue[str] = asyncio.Queue()

    async def pump() -> None:
        async for reason in source.changes():
            reasons.put_nowait(reason)

    task = asyncio.create_task(pump())
    try:
        yield reasons
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def next_change(reasons: asyncio.Queue[str], timeout: float = 5.0) -> str:
    return await asyncio.wait_for(reasons.get(), timeout)


async def watch_connected(kube: FakeKubernetes, count: int = 1) -> None:
    await eventually(lambda: len(kube.watches()) >= count, message=f"{count} watch request(s)")


@dataclass(frozen=True)
class Watched:
    """A source that has read ConfigMap `a` (`a.yaml: "a: 1"`) and whose watch is
    connected; the reasons its watch gives for a reload arrive on `reasons`."""

    source: ConfigMapSource
    reasons: asyncio.Queue[str]


@pytest.fixture
async def watched(kube: FakeKubernetes) -> AsyncIterator[Watched]:
    """The starting point of most watch fault tests (see `Watched`)."""
    kube.apply("a", {"a.yaml": "a: 1"}, labels=LABELS)
    source = source_for(kube)
    source.read()
    async with watching(source) as reasons:
        await watch_connected(kube)
        yield Watched(source, reasons)


async def failed_reload(service: HotReloadService) -> dict[str, Any]:
    """The history's newest record once it is a failed reload."""
    record: dict[str, Any] = await eventually(
        lambda: history_view(service, 1)[0]["status"] == "failed" and history_view(service, 1)[0],
        message="failed reload",
    )
    return record


class TestRead:
    def test_reads_rule_keys_of_labelled_configmaps_in_the_namespace(self, kube: FakeKubernetes):
        """Only labelled ConfigMaps of the namespace count, and only their rule-file keys."""
        kube.apply("b", {"b.yaml": "b: 1", "README.md": "docs", ".hidden.yaml": "x"}, labels=LABELS)
        kube.apply("a", {"z.json": "{}", "a.yml": "a: 1"}, labels=LABELS)
        kube.apply("other-label", {"c.yaml": "c: 1"}, labels={"app": "x"})
        kube.apply("other-namespace", {"d.yaml": "d: 1"}, labels=LABELS, namespace="kube-system")
        source = source_for(kube)
        files = source.read()
        assert [file.name for file in files] == [
            "configmap/a/a.yml",
            "configmap/a/z.json",
            "configmap/b/b.yaml",
        ]
        assert files[2].content == b"b: 1"
        assert kube.requests[0]["labelSelector"] == SELECTOR

    def test_without_a_healthy_watch_every_read_lists(self, kube: FakeKubernetes):
        """No watch running: a read cannot trust its cache, so it asks the API again."""
        kube.apply("a", {"a.yaml": "a: 1"}, labels=LABELS)
        source = source_for(kube)
        source.read()
        kube.apply("a", {"a.yaml": "a: 2"}, labels=LABELS)
        assert source.read()[0].content == b"a: 2"
        assert lists(kube) == 2

    def test_forbidden_names_the_fix(self, kube: FakeKubernetes):
        """A 403 is a LoadError naming the source, the API's message and the RBAC hint."""
        kube.forbid()
        source = source_for(kube)
        with pytest.raises(LoadError) as caught:
            source.read()
        (problem,) = caught.value.problems
        assert problem.file == "configmaps:default/rule-sidecar/rules=true"
        assert problem.message.startswith("HTTP 403: configmaps is forbidden")
        assert "rbac.create" in problem.message

    def test_unreachable_api_server(self):
        """Nothing listening: a LoadError that says the connection was refused."""
        source = ConfigMapSource(
            api_for(f"http://127.0.0.1:{free_port()}"), namespace="default", label_selector=""
        )
        with pytest.raises(LoadError, match="Connection refused"):
            source.read()


class TestWatch:
    async def test_a_change_arrives_through_the_watch(self, kube: FakeKubernetes, watched: Watched):
        """After the first list, changes come from the watch: no second list is needed."""
        kube.apply("a", {"a.yaml": "a: 2"}, labels=LABELS)
        kube.apply("b", {"b.yaml": "b: 1"}, labels=LABELS)
        await next_change(watched.reasons)
        await eventually(lambda: len(watched.source.read()) == 2, message="both ConfigMaps")
        assert [file.content for file in watched.source.read()] == [b"a: 2", b"b: 1"]
        assert watched.source.watch_problem() is None
        assert lists(kube) == 1

    async def test_unlabelled_and_deleted_configmaps_leave(self, kube: FakeKubernetes):
        """A ConfigMap that loses its label, or is deleted, takes its files with it."""
        kube.apply("a", {"a.yaml": "a: 1"}, labels=LABELS)
        kube.apply("b", {"b.yaml": "b: 1"}, labels=LABELS)
        source = source_for(kube)
        source.read()
        async with watching(source) as reasons:
            await watch_connected(kube)
            kube.apply("a", {"a.yaml": "a: 1"}, labels={})
            await next_change(reasons)
            assert names(source) == ["configmap/b/b.yaml"]
            kube.delete("b")
            await next_change(reasons)
            assert names(source) == []

    async def test_other_configmaps_do_not_wake_the_service(self, kube: FakeKubernetes):
        """Changes the selector does not match produce no change at all."""
        source = source_for(kube)
        source.read()
        async with watching(source) as reasons:
            await watch_connected(kube)
            kube.apply("unrelated", {"a.yaml": "a: 1"}, labels={"app": "web"})
            kube.apply("mine", {"a.yaml": "a: 1"}, labels=LABELS)
            await next_change(reasons)
            assert names(source) == ["configmap/mine/a.yaml"]
            assert reasons.empty()

    async def test_resumes_from_the_last_resource_version(self, kube: FakeKubernetes):
        """When the server ends a watch (timeoutSeconds), the next one starts from the
        last version seen, not from a new list."""
        source = source_for(kube, watch_timeout_seconds=1)
        source.read()
        async with watching(source) as reasons:
            await watch_connected(kube)
            version = kube.apply("a", {"a.yaml": "a: 1"}, labels=LABELS)
            await next_change(reasons)
            await watch_connected(kube, 2)
        first, second = kube.watches()[:2]
        assert first["timeoutSeconds"] == "1"
        assert first["allowWatchBookmarks"] == "true"
        assert second["resourceVersion"] == str(version)
        assert lists(kube) == 1

    async def test_bookmarks_move_the_resource_version_on(self, kube: FakeKubernetes):
        """A BOOKMARK changes no file but is where the next watch resumes from."""
        kube.bookmark_interval = 0.2
        source = source_for(kube, watch_timeout_seconds=1)
        source.read()
        async with watching(source) as reasons:
            await watch_connected(kube)
            kube.apply("elsewhere", {"a.yaml": "a: 1"}, labels={"app": "web"})
            await watch_connected(kube, 2)
            assert reasons.empty()
        assert kube.watches()[1]["resourceVersion"] == "101"

    @pytest.mark.parametrize("as_event", [True, False], ids=["error-event", "http-status"])
    async def test_410_gone_lists_again(self, kube: FakeKubernetes, as_event: bool):
        """A resourceVersion the server no longer has (410 Gone, as an ERROR event or as
        the HTTP status) makes the source list again and carry on watching from there."""
        kube.gone_as_event = as_event
        kube.apply("a", {"a.yaml": "a: 1"}, labels=LABELS)
        source = source_for(kube)
        source.read()
        async with watching(source):
            await watch_connected(kube)
        # While nobody watched: a change, then compaction of the history.
        kube.apply("a", {"a.yaml": "a: 2"}, labels=LABELS)
        kube.compact()
        async with watching(source) as reasons:
            await next_change(reasons)
            assert source.read()[0].content == b"a: 2"
            await watch_connected(kube, 3)
            assert source.watch_problem() is None
        assert lists(kube) == 2
        resumed_from = [query["resourceVersion"] for query in kube.watches()[:3]]
        assert resumed_from == ["101", "101", "102"]  # resume, 410, list, watch from the list

    async def test_a_watch_stopped_in_flight_does_not_swallow_later_changes(
        self, kube: FakeKubernetes
    ):
        """The race behind `test_410_gone_lists_again`'s timeouts: a watch stopped while
        its request is still being answered (the API server slow to start the response)
        reads on, and used to apply what arrived after the stop. The cache then jumped
        to a version whose change nobody was told of, and the next watch resumed after
        it: the change was never announced. Here the first watch's answer is held until
        the change is made, then let through."""
        kube.apply("a", {"a.yaml": "a: 1"}, labels=LABELS)
        source = source_for(kube)
        source.read()
        answered = threading.Event()
        held: list[threading.Thread] = []
        request = source._core.list_namespaced_config_map

        @functools.wraps(request)  # the watch finds the type of the objects in its doc
        def slow_first_watch(*args: Any, **kwargs: Any) -> Any:
            first = kwargs.get("watch") and not held
            if first:  # noted before the server sees the request, which the test waits for
                held.append(threading.current_thread())
            response = request(*args, **kwargs)
            if first:
                answered.wait(timeout=10)
            return response

        source._core.list_namespaced_config_map = slow_first_watch  # type: ignore[method-assign]
        async with watching(source):
            await watch_connected(kube)
        kube.apply("a", {"a.yaml": "a: 2"}, labels=LABELS)
        answered.set()
        await asyncio.to_thread(held[0].join, 10)
        assert not held[0].is_alive()
        async with watching(source) as reasons:
            await next_change(reasons)
            assert source.read()[0].content == b"a: 2"

    async def test_a_stalled_watch_is_reported_and_recovers(self, kube: FakeKubernetes):
        """A watch that goes silent past the server's timeout is a problem until data
        flows again; meanwhile reads list, so the resync still sees changes."""
        kube.apply("a", {"a.yaml": "a: 1"}, labels=LABELS)
        source = source_for(kube, watch_timeout_seconds=1, stalled_after_seconds=1.5)
        source.read()
        async with watching(source) as reasons:
            await watch_connected(kube)
            kube.stall()
            problem = await eventually(source.watch_problem, message="stall reported")
            assert problem.startswith("stalled")
            kube.apply("a", {"a.yaml": "a: 2"}, labels=LABELS)
            assert source.read()[0].content == b"a: 2"
            assert source.watch_problem() == problem  # a list does not prove the watch
            kube.stall(False)
            await eventually(lambda: source.watch_problem() is None, message="recovered")
            kube.apply("a", {"a.yaml": "a: 3"}, labels=LABELS)
            await next_change(reasons)
            assert source.read()[0].content == b"a: 3"

    async def test_changes_while_stalled_then_recovery(self, kube: FakeKubernetes):
        """Changes made while the watch is stalled are served by reads (which list); the
        watch then resumes from the listed version, and nothing goes back to older rules."""
        kube.bookmark_interval = 0.2  # a quiet watch shows it is alive (a stall clears)
        kube.apply("a", {"a.yaml": "a: 1"}, labels=LABELS)
        source = source_for(kube, watch_timeout_seconds=30, stalled_after_seconds=1.5)
        source.read()
        async with watching(source):
            await watch_connected(kube)
            kube.stall()
            await eventually(source.watch_problem, message="stall reported")
            kube.apply("a", {"a.yaml": "a: 2"}, labels=LABELS)
            listed_at = kube.apply("a", {"a.yaml": "a: 3"}, labels=LABELS)
            assert source.read()[0].content == b"a: 3"
            kube.stall(False)
            await eventually(
                lambda: str(listed_at) in [q["resourceVersion"] for q in kube.watches()],
                message="a watch from the list's version",
            )
            await eventually(lambda: source.watch_problem() is None, message="recovered")
            assert source.read()[0].content == b"a: 3"

    async def test_a_failing_watch_retries_until_it_works(self, kube: FakeKubernetes):
        """A 403 on the watch is reported as the watch's problem and retried with
        backoff; granting access lets it recover by itself."""
        source = source_for(kube)
        source.read()
        kube.forbid()
        async with watching(source) as reasons:
            problem = await eventually(source.watch_problem, message="403 reported")
            assert problem.startswith("HTTP 403")
            kube.forbid(False)
            await eventually(lambda: source.watch_problem() is None, message="recovered")
            kube.apply("a", {"a.yaml": "a: 1"}, labels=LABELS)
            await next_change(reasons)
        assert names(source) == ["configmap/a/a.yaml"]

    async def test_no_watch_problem_while_not_watching(self, kube: FakeKubernetes):
        """Health asks only while monitoring: a source not watched reports nothing."""
        kube.forbid()
        source = source_for(kube)
        async with watching(source):
            await eventually(source.watch_problem, message="403 reported")
        assert source.watch_problem() is None


def rules_configmap(kube: FakeKubernetes, **doc_options: Any) -> None:
    kube.apply("fraud-rules", {"fraud.yaml": dump_yaml(fraud_doc(**doc_options))}, labels=LABELS)


@pytest.fixture
async def fraud_service(kube: FakeKubernetes) -> AsyncIterator[HotReloadService]:
    """A started service serving the `fraud-rules` ConfigMap, its watch connected."""
    service = HotReloadService(RuleRegistry(), [source_for(kube)], loader=Loader())
    try:
        rules_configmap(kube)
        await service.initial_load()
        service.start()
        await watch_connected(kube)
        yield service
    finally:
        await service.stop()


class TestWithTheService:
    @pytest.fixture
    async def service(self, kube: FakeKubernetes) -> AsyncIterator[HotReloadService]:
        loader = Loader()
        source = source_for(kube, watch_timeout_seconds=1, stalled_after_seconds=1.5)
        service = HotReloadService(RuleRegistry(), [source], loader=loader)
        yield service
        await service.stop()

    async def test_a_broken_configmap_is_refused_with_its_location(
        self, kube: FakeKubernetes, service: HotReloadService
    ):
        """A bad rule in a ConfigMap fails the reload at configmap/<name>/<key>:line, and
        the last good rules keep serving; the fix goes live."""
        rules_configmap(kube)
        await service.initial_load()
        service.start()
        version = service.registry.version
        broken = fraud_doc()
        broken["spec"]["rules"][0]["condition"] = "input.amount >"
        kube.apply("fraud-rules", {"fraud.yaml": dump_yaml(broken)}, labels=LABELS)
        record = await failed_reload(service)
        (error,) = record["errors"]
        assert error["file"] == "configmap/fraud-rules/fraud.yaml"
        assert error["line"] > 1
        assert service.registry.version == version
        rules_configmap(kube, large_points=55)
        await eventually(lambda: service.registry.version > version, message="fixed")
        assert service.health().status is HealthStatus.HEALTHY

    async def test_a_stalled_watch_degrades_health(
        self, kube: FakeKubernetes, service: HotReloadService
    ):
        """Health names the stalled watch and says degraded, not unhealthy: the rules
        still serve. It clears when the watch works again."""
        rules_configmap(kube)
        await service.initial_load()
        service.start()
        await watch_connected(kube)
        assert service.health().status is HealthStatus.HEALTHY
        kube.stall()
        body = await eventually(
            lambda: (
                service.health().status is HealthStatus.DEGRADED
                and health_view(service, service.health())
            ),
            message="degraded",
        )
        assert body["checks"]["sources_watched"] is False
        (problem,) = body["watch_problems"].values()
        assert problem.startswith("stalled")
        (reported,) = status_view(service, writes=NO_WRITES)["sources"]
        assert reported["watch_problem"] == problem
        kube.stall(False)
        await eventually(
            lambda: service.health().status is HealthStatus.HEALTHY, message="healthy again"
        )


class TestEvents:
    def test_a_failed_reload_posts_a_warning_on_each_configmap(self, kube: FakeKubernetes):
        """One Warning Event per ConfigMap named in the problems; other sources' problems
        are not ConfigMaps and post nothing."""
        recorder = EventRecorder(api_for(kube.url), namespace="default", instance="pod-1")
        recorder.reload_failed(
            [
                Problem(file="configmap/fraud-rules/fraud.yaml", line=7, message="bad"),
                Problem(file="configmap/fraud-rules/more.yaml", line=2, message="worse"),
                Problem(file="configmap/limits/limits.yaml", line=1, message="odd"),
                Problem(file="/etc/rules/local.yaml", message="not a ConfigMap"),
            ]
        )
        assert [event["involvedObject"]["name"] for event in kube.events] == [
            "fraud-rules",
            "limits",
        ]
        event = kube.events[0]
        assert event["type"] == "Warning"
        assert event["reason"] == "RuleReloadFailed"
        assert event["involvedObject"]["kind"] == "ConfigMap"
        assert event["metadata"]["generateName"] == "fraud-rules."
        assert event["reportingComponent"] == "rule-sidecar"
        assert "configmap/fraud-rules/fraud.yaml:7:1: bad" in event["message"]
        assert "more.yaml:2:1: worse" in event["message"]

    def test_posting_never_raises(self, kube: FakeKubernetes, caplog: pytest.LogCaptureFixture):
        """An API server that cannot take the Event costs a log line, nothing else."""
        kube.close()
        recorder = EventRecorder(api_for(kube.url), namespace="default", instance="pod-1")
        recorder.reload_failed([Problem(file="configmap/a/a.yaml", message="bad")])
        assert "cannot post an Event on ConfigMap a: NewConnectionError" in caplog.text


@pytest.fixture
def kubeconfig(tmp_path: Path, kube: FakeKubernetes) -> Path:
    return kube.write_kubeconfig(tmp_path / "kubeconfig")


@pytest.fixture
def served_from_kubernetes(tmp_path: Path, kube: FakeKubernetes, kubeconfig: Path) -> Iterator[str]:
    rules_configmap(kube)
    env = clean_environment(KUBECONFIG=str(kubeconfig), RULE_SIDECAR_KUBERNETES_EVENTS="true")
    env.pop("KUBERNETES_SERVICE_HOST", None)
    served = spawn(
        tmp_path, "--kubernetes-selector", SELECTOR, "--kubernetes-namespace", "default", env=env
    )
    try:
        served.wait_ready()
        yield served.url
    finally:
        served.stop()


class TestServe:
    async def test_rule_sidecar_serve_follows_configmaps(
        self, kube: FakeKubernetes, served_from_kubernetes: str
    ):
        """`rule-sidecar serve --kubernetes-selector`: the ConfigMap's rules serve, a
        change is announced on the WebSocket, a broken one is refused with an Event on
        the ConfigMap, and the rules keep serving."""
        url = served_from_kubernetes
        async with aiohttp.ClientSession(url) as session:
            async with session.get("/api/v1/rulesets/fraud") as response:
                assert response.status == 200
            async with session.ws_connect("/ws/hot-reload") as ws:
                rules_configmap(kube, large_points=55)
                reloaded, _ = await receive_until(ws, "rules_reloaded")
                assert (reloaded["data"]["trigger"], reloaded["data"]["version_after"]) == (
                    "watch",
                    2,
                )
                broken = fraud_doc()
                broken["spec"]["rules"][0]["condition"] = "input.amount >"
                kube.apply("fraud-rules", {"fraud.yaml": dump_yaml(broken)}, labels=LABELS)
                failed, _ = await receive_until(ws, "reload_failed")
            assert failed["data"]["errors"][0]["file"] == "configmap/fraud-rules/fraud.yaml"
            async with session.post(
                "/api/v1/rulesets/fraud/evaluate",
                json={"input": {"amount": 5000, "country": "US"}},
            ) as response:
                assert response.status == 200
            async with session.get(f"{HOT}/status") as response:
                status = await response.json()
        (source,) = status["sources"]
        assert source["name"] == "configmaps:default/rule-sidecar/rules=true"
        assert source["watch_problem"] is None
        event = await asyncio.to_thread(
            wait_sync, lambda: kube.events and kube.events[0], message="an Event"
        )
        assert event["involvedObject"]["name"] == "fraud-rules"
        assert event["source"]["component"] == "rule-sidecar"

    def test_without_credentials_serve_exits_2_naming_what_is_missing(self, tmp_path: Path):
        """Neither a pod's service account nor a kubeconfig: a one-line settings error
        (exit 2), never the client's traceback."""
        env = clean_environment(RULE_SIDECAR_KUBERNETES_SELECTOR=SELECTOR, HOME=str(tmp_path))
        for name in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"):
            env.pop(name, None)
        result = subprocess.run(
            [*command(), "serve", "--port", str(free_port())],
            env=env,
            capture_output=True,
            text=True,
            timeout=START_SECONDS,
            check=False,
        )
        assert result.returncode == 2
        (line,) = result.stderr.splitlines()
        assert line.startswith("rule-sidecar: --kubernetes-selector: no credentials for the")
        assert "/var/run/secrets/kubernetes.io/serviceaccount" in line
        assert "KUBECONFIG" in line


SOURCE = "configmaps:default/rule-sidecar/rules=true"


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]


class TestLostEvents:
    """A watch is an optimisation, never the only truth: a lost or reordered event is
    found by a list, and an event older than what is held changes nothing."""

    async def test_a_dropped_event_is_read_after_forget(
        self, kube: FakeKubernetes, watched: Watched, caplog: pytest.LogCaptureFixture
    ):
        """One change the watch never delivers leaves the cache stale while the watch
        looks healthy; after `forget()` the next read lists and serves it, and the log
        says a change was never delivered."""
        kube.drop_next_event()
        kube.apply("a", {"a.yaml": "a: 2"}, labels=LABELS)
        kube.apply("b", {"b.yaml": "b: 1"}, labels=LABELS)
        await next_change(watched.reasons)
        assert contents(watched.source) == [b"a: 1", b"b: 1"]  # lost, and the watch is healthy
        assert watched.source.watch_problem() is None
        watched.source.forget()
        assert contents(watched.source) == [b"a: 2", b"b: 1"]
        assert contents(watched.source) == [b"a: 2", b"b: 1"]  # one list per forget()
        assert lists(kube) == 2
        (warning,) = warnings(caplog)
        assert "the list found changes the watch never delivered" in warning
        assert warning.endswith(": a")

    async def test_a_stale_modified_does_not_overwrite_newer_content(
        self, kube: FakeKubernetes, watched: Watched
    ):
        """A MODIFIED delivered out of order, with an older resourceVersion than the one
        held, is ignored: the newer content keeps serving."""
        kube.apply("a", {"a.yaml": "a: 2"}, labels=LABELS)
        await next_change(watched.reasons)
        kube.send_stale("a")  # "a: 1" again, at its old resourceVersion
        kube.apply("b", {"b.yaml": "b: 1"}, labels=LABELS)
        await next_change(watched.reasons)
        assert contents(watched.source) == [b"a: 2", b"b: 1"]
        assert watched.reasons.empty()

    async def test_a_stale_event_does_not_bring_a_deleted_configmap_back(
        self, kube: FakeKubernetes
    ):
        """A MODIFIED from before a deletion, delivered after it, leaves it deleted."""
        kube.apply("a", {"a.yaml": "a: 1"}, labels=LABELS)
        kube.apply("a", {"a.yaml": "a: 2"}, labels=LABELS)
        source = source_for(kube)
        source.read()
        async with watching(source) as reasons:
            await watch_connected(kube)
            kube.delete("a")
            await next_change(reasons)
            kube.send_stale("a")  # "a: 2", older than the deletion
            kube.apply("b", {"b.yaml": "b: 1"}, labels=LABELS)
            await next_change(reasons)
            assert names(source) == ["configmap/b/b.yaml"]

    async def test_versions_too_long_for_int_are_compared(
        self, kube: FakeKubernetes, watched: Watched
    ):
        """resourceVersions are compared as numbers without `int()`, which refuses more
        than 4,300 digits: such an event is newer, not a crash of the watch."""
        huge = {"name": "a", "resourceVersion": "1" + "0" * 5000, "labels": LABELS}
        event = {"type": "MODIFIED", "object": {"metadata": huge, "data": {"a.yaml": "a: 2"}}}
        kube.send_line(json.dumps(event).encode())
        await next_change(watched.reasons)
        assert contents(watched.source) == [b"a: 2"]

    async def test_the_reflector_lists_again_on_its_own(self, kube: FakeKubernetes):
        """Without any `forget()`, the periodic list finds the lost change, serves it and
        announces it."""
        kube.apply("a", {"a.yaml": "a: 1"}, labels=LABELS)
        source = source_for(kube, relist_interval_seconds=1)
        source.read()
        async with watching(source) as reasons:
            await watch_connected(kube)
            kube.drop_next_event()
            kube.apply("a", {"a.yaml": "a: 2"}, labels=LABELS)
            await next_change(reasons)
            assert contents(source) == [b"a: 2"]
        assert lists(kube) >= 2
        assert kube.watches()[0]["timeoutSeconds"] == "1"  # ends when the list is due


class TestBinaryData:
    """`binaryData` keys that look like rule files are rule files, read like files on
    disk: bytes that are not UTF-8 are a problem at their line and column."""

    def test_binary_rule_keys_are_read(self, kube: FakeKubernetes):
        rules = dump_yaml(fraud_doc()).encode()
        kube.apply(
            "a",
            {"a.yaml": "a: 1"},
            binary_data={"b.yaml": rules, "logo.png": b"\x89PNG\r\n"},
            labels=LABELS,
        )
        files = source_for(kube).read()
        assert [(file.name, file.content) for file in files] == [
            ("configmap/a/a.yaml", b"a: 1"),
            ("configmap/a/b.yaml", rules),
        ]

    async def test_a_ruleset_in_binary_data_goes_live_through_the_watch(self, kube: FakeKubernetes):
        source = source_for(kube)
        source.read()
        async with watching(source) as reasons:
            await watch_connected(kube)
            rules = dump_yaml(fraud_doc()).encode()
            kube.apply("fraud-rules", {}, binary_data={"fraud.yaml": rules}, labels=LABELS)
            await next_change(reasons)
            result = Loader().load(source.read())
        assert list(result.snapshot.rulesets) == ["fraud"]

    def test_bytes_that_are_not_utf8_are_a_located_problem(self, kube: FakeKubernetes):
        text = dump_yaml(fraud_doc())
        line = text.splitlines().index(next(x for x in text.splitlines() if "Large" in x)) + 1
        content = text.replace("Large", "Gro\xdf").encode("latin-1")
        kube.apply("fraud-rules", {}, binary_data={"fraud.yaml": content}, labels=LABELS)
        with pytest.raises(LoadError) as caught:
            Loader().load(source_for(kube).read())
        (problem,) = caught.value.problems
        assert (problem.file, problem.line, problem.code) == (
            "configmap/fraud-rules/fraud.yaml",
            line,
            ProblemCode.ENCODING,
        )
        assert problem.message == "not valid UTF-8 (byte 0xdf)"


class TestMalformedWatch:
    """A line of the watch that is not an event is named in words (never a raw
    TypeError), and the watch recovers by listing again."""

    @pytest.mark.parametrize(
        ("line", "cause"),
        [
            (b"<html>502 Bad Gateway</html>", "a line that is not JSON (Expecting value"),
            (b'{"object": {"kind": "ConfigMap"}}', "an event without a type"),
            (b'{"type": "MODIFIED"}', "a MODIFIED event whose object is null"),
            (b'["MODIFIED"]', "a list instead of an event"),
            (b'{"type": "PATCHED", "object": {}}', "an event of unknown type 'PATCHED'"),
            (
                b'{"type": "MODIFIED", "object": {"metadata": {"resourceVersion": "1"}}}',
                "a MODIFIED event has no metadata.name",
            ),
            (b'{"type": "ADDED", "object": {"metadata": []}}', "has no metadata (found a list)"),
            (
                b'{"type": "ERROR", "object": {"reason": "Expired"}}',
                'an ERROR event without a status code: \'{"reason": "Expired"}\'',
            ),
        ],
        ids=[
            "html",
            "no-type",
            "no-object",
            "not-an-object",
            "unknown-type",
            "no-name",
            "meta",
            "error-without-code",
        ],
    )
    async def test_a_malformed_line_is_named_and_the_watch_lists_again(
        self,
        kube: FakeKubernetes,
        watched: Watched,
        caplog: pytest.LogCaptureFixture,
        line: bytes,
        cause: str,
    ):
        kube.send_line(line)
        kube.apply("a", {"a.yaml": "a: 2"}, labels=LABELS)
        await next_change(watched.reasons)
        assert contents(watched.source) == [b"a: 2"]
        await eventually(lambda: watched.source.watch_problem() is None, message="recovered")
        assert lists(kube) == 2
        (warning,) = warnings(caplog)
        assert cause in warning
        assert warning.endswith("listing again in about 0.5 s")
        assert "Error" not in caplog.text  # no TypeError, KeyError, JSONDecodeError

    async def test_a_watch_ended_at_once_is_a_problem_retried_with_backoff(
        self, kube: FakeKubernetes
    ):
        """A server (or proxy) that ends every watch at once, sending nothing, is the
        watch's problem, retried after a backoff from the same version (not listed, not
        hammered); watches that last clear it."""
        kube.apply("a", {"a.yaml": "a: 1"}, labels=LABELS)
        source = source_for(kube)
        source.read()
        kube.end_watches()
        async with watching(source) as reasons:
            problem = await eventually(source.watch_problem, message="problem reported")
            assert (
                problem
                == "the API server ended the watch at once, sending nothing (asked for 300 s)"
            )
            kube.end_watches(False)
            await eventually(lambda: source.watch_problem() is None, message="recovered")
            kube.apply("a", {"a.yaml": "a: 2"}, labels=LABELS)
            await next_change(reasons)
            assert contents(source) == [b"a: 2"]
        assert lists(kube) == 1
        assert {query["resourceVersion"] for query in kube.watches()} == {"101"}

    async def test_an_error_event_is_reported_with_its_status(self, kube: FakeKubernetes):
        """An ERROR event other than 410 is the watch's problem, as its HTTP status would be."""
        source = source_for(kube, max_backoff_seconds=30)
        source.read()
        status = {"kind": "Status", "code": 500, "reason": "InternalError", "message": "etcd"}
        async with watching(source):
            await watch_connected(kube)
            kube.send_line(json.dumps({"type": "ERROR", "object": status}).encode())
            problem = await eventually(source.watch_problem, message="problem reported")
        assert problem == "HTTP 500: InternalError: etcd"


def event(kind: str, name: str, version: str, labels: dict[str, str], **extra: object) -> bytes:
    """One watch line for ConfigMap `name`; `extra` overrides its metadata or adds `data`
    (or, as `object_kind`, claims another kind of object)."""
    metadata = {"name": name, "namespace": "default", "resourceVersion": version, "labels": labels}
    data = extra.pop("data", None)
    object_kind = extra.pop("object_kind", "ConfigMap")
    metadata.update(extra)  # type: ignore[arg-type]
    obj: dict[str, object] = {"kind": object_kind, "apiVersion": "v1", "metadata": metadata}
    if data is not None:
        obj["data"] = data
    return json.dumps({"type": kind, "object": obj}).encode()


class TestOutOfScopeEvents:
    """A watch event the request ruled out (a ConfigMap of another namespace, labels that
    do not match the selector, a resourceVersion that is not a decimal integer) is a
    fault: logged in words, never applied, and answered by a list (the truth)."""

    @pytest.mark.parametrize(
        ("line", "cause"),
        [
            (
                event("DELETED", "a", "900", LABELS, namespace="kube-system"),
                "a DELETED event is ConfigMap a of namespace 'kube-system', not of default",
            ),
            (
                event("ADDED", "b", "900", {"app": "other"}, data={"b.yaml": "b: 1"}),
                'a ADDED event is ConfigMap b, whose labels \'{"app": "other"}\' do not '
                "match the selector rule-sidecar/rules=true",
            ),
            (
                event("MODIFIED", "a", "x", LABELS),
                "a MODIFIED event (ConfigMap a) has resourceVersion 'x', not a decimal integer",
            ),
            (
                event("DELETED", "a", "900", LABELS, object_kind="Secret"),
                "a DELETED event is a 'Secret' named a, not a ConfigMap",
            ),
        ],
        ids=["other-namespace", "labels-not-matching", "version-not-a-number", "not-a-configmap"],
    )
    async def test_is_not_applied_and_the_watch_lists_again(
        self,
        kube: FakeKubernetes,
        watched: Watched,
        caplog: pytest.LogCaptureFixture,
        line: bytes,
        cause: str,
    ):
        kube.send_line(line)
        await eventually(lambda: lists(kube) == 2, message="listed again")
        await eventually(lambda: watched.source.watch_problem() is None, message="recovered")
        assert contents(watched.source) == [b"a: 1"]
        assert watched.reasons.empty()  # the list found nothing new: no reload
        kube.apply("a", {"a.yaml": "a: 2"}, labels=LABELS)
        await next_change(watched.reasons)
        assert names(watched.source) == ["configmap/a/a.yaml"]
        assert contents(watched.source) == [b"a: 2"]
        (warning,) = warnings(caplog)
        assert cause in warning
        assert warning.endswith("listing again in about 0.5 s")

    async def test_a_delete_from_another_namespace_leaves_the_rules_serving(
        self, kube: FakeKubernetes, fraud_service: HotReloadService
    ):
        """The attack: a DELETED of kube-system/fraud-rules must not remove default's."""
        kube.send_line(event("DELETED", "fraud-rules", "900", LABELS, namespace="kube-system"))
        await eventually(lambda: lists(kube) == 2, message="listed again")
        limits = make_ruleset_doc("limits", [{"id": "r", "condition": "true", "points": 1}])
        kube.apply("limits", {"limits.yaml": dump_yaml(limits)}, labels=LABELS)
        await eventually(lambda: fraud_service.registry.version == 2, message="a reload")
        assert fraud_service.log.newest(1)[0].status.value == "success"
        assert fraud_service.registry.get_ruleset("fraud") is not None
        assert fraud_service.registry.get_ruleset("limits") is not None

    @pytest.mark.parametrize(
        ("labels", "selected"),
        [
            ({"tier": "gold", "team": "t", "app": "web"}, True),
            ({"tier": "silver", "team": "t", "app": "web", "env": "prod", "zone": "us"}, True),
            ({"tier": "bronze", "team": "t", "app": "web"}, False),
            ({"tier": "gold", "team": "t", "app": "web", "env": "dev"}, False),
            ({"tier": "gold", "app": "web"}, False),
            ({"tier": "gold", "team": "t", "app": "web", "legacy": ""}, False),
            ({"tier": "gold", "team": "t", "app": "web", "zone": "eu"}, False),
            ({"tier": "gold", "team": "t", "app": "api"}, False),
        ],
        ids=["in", "all", "not-in", "notin", "exists", "absent", "not-equal", "equal"],
    )
    async def test_every_selector_form_is_judged(
        self, kube: FakeKubernetes, labels: dict[str, str], selected: bool
    ):
        """Set-based and equality forms are judged; one that cannot be (`size > 5`) is
        left to the server."""
        selector = "tier in (gold, silver),env notin (dev),team,!legacy,zone!=eu,app==web,size>5"
        source = ConfigMapSource(
            api_for(kube.url), namespace="default", label_selector=selector, max_backoff_seconds=0.3
        )
        source.read()
        async with watching(source) as reasons:
            await watch_connected(kube)
            kube.send_line(event("ADDED", "a", "900", labels, data={"a.yaml": "a: 1"}))
            if selected:
                await next_change(reasons)
                assert contents(source) == [b"a: 1"]
            else:
                await eventually(lambda: lists(kube) == 2, message="listed again")
                assert source.read() == []

    async def test_a_configmap_without_data_is_empty(self, kube: FakeKubernetes, watched: Watched):
        """No `data` and no `binaryData` is a ConfigMap emptied on purpose, not a fault."""
        kube.send_line(event("MODIFIED", "a", "900", LABELS))
        await next_change(watched.reasons)
        assert watched.source.read() == []
        assert watched.source.watch_problem() is None
        assert lists(kube) == 1


class TestListDeadline:
    """A list has a total deadline: a server that trickles its answer (each read gets a
    few bytes, so no read timeout ever fires) fails the read at the deadline."""

    def test_a_trickled_list_fails_at_the_deadline(self, kube: FakeKubernetes):
        kube.apply("a", {"a.yaml": "a: 1", "b.yaml": "#" * 4000}, labels=LABELS)
        kube.trickle_lists(0.05)  # about 4 s for the whole answer
        source = source_for(kube, list_deadline_seconds=0.5)
        with pytest.raises(LoadError) as caught:
            source.read()
        (problem,) = caught.value.problems
        assert (problem.file, problem.code) == (SOURCE, ProblemCode.SOURCE_UNAVAILABLE)
        assert problem.message == (
            "the list of ConfigMaps was not complete within 0.5 s (a slow or overloaded API server)"
        )
        kube.trickle_lists(None)
        assert names(source) == ["configmap/a/a.yaml", "configmap/a/b.yaml"]

    def test_a_list_answered_late_fails_at_the_deadline(self, kube: FakeKubernetes):
        """Headers that do not come within the deadline fail the read once, at the
        deadline: urllib3 does not send the list again (three times more, before)."""
        kube.apply("a", {"a.yaml": "a: 1"}, labels=LABELS)
        kube.trickle_lists(None, headers_after=3)
        source = source_for(kube, list_deadline_seconds=0.5)
        with pytest.raises(LoadError) as caught:
            source.read()
        (problem,) = caught.value.problems
        assert problem.message.startswith("the list of ConfigMaps was not complete within 0.5 s")
        assert lists(kube) == 1

    def test_a_trickled_list_within_the_deadline_is_read(self, kube: FakeKubernetes):
        kube.apply("a", {"a.yaml": "a: 1"}, labels=LABELS)
        kube.trickle_lists(0.01, chunk=32)
        assert names(source_for(kube)) == ["configmap/a/a.yaml"]


def item(data: object, **extra: object) -> dict[str, object]:
    metadata = {"name": "a", "namespace": "default", "resourceVersion": "7", "labels": LABELS}
    return {"metadata": metadata, "data": data, **extra}


def listing(*items: object) -> bytes:
    return json.dumps({"metadata": {"resourceVersion": "9"}, "items": list(items)}).encode()


class TestFaultsBecomeLoadErrors:
    """Whatever the API server answers, a read either gives every rule file or raises a
    `LoadError` whose problem names the ConfigMap (or the source: namespace and
    selector) and the cause in words; the next good answer reads normally."""

    @pytest.mark.parametrize(
        ("answer", "file", "message"),
        [
            (
                b"<html>oops</html>",
                SOURCE,
                "the list answer is not JSON (Expecting value at line 1 column 1): "
                "'<html>oops</html>'",
            ),
            (b"[]", SOURCE, "the list answer is a list, not a ConfigMapList"),
            (b'{"items": []}', SOURCE, "the list answer has no metadata.resourceVersion"),
            (
                b'{"metadata": {"resourceVersion": "9"}, "items": 7}',
                SOURCE,
                "the list answer's items are a number, not a list",
            ),
            (listing("a"), SOURCE, "item 0 of the list is a string, not a ConfigMap"),
            (listing({"data": {}}), SOURCE, "item 0 of the list has no metadata (found null)"),
            (
                listing(item({"a.yaml": 5})),
                "configmap/a/a.yaml",
                "ConfigMap a in namespace default: data.a.yaml is a number, not a string",
            ),
            (
                listing(item(["a.yaml"])),
                "configmap/a",
                "ConfigMap a in namespace default: data is a list, not a map of strings",
            ),
            (
                listing(item({}, binaryData={"b.yaml": "!!not base64"})),
                "configmap/a/b.yaml",
                "ConfigMap a in namespace default: binaryData.b.yaml is not base64: '!!not base64'",
            ),
            (
                listing(item({"a.yaml": "a: 1"}, binaryData={"a.yaml": "YTogMg=="})),
                "configmap/a/a.yaml",
                "ConfigMap a in namespace default: the key a.yaml is in both data and binaryData",
            ),
            (
                listing(item({}, metadata={"name": "a", "resourceVersion": "7"})),
                SOURCE,
                "item 0 of the list is ConfigMap a, whose labels '{}' do not match the "
                "selector rule-sidecar/rules=true",
            ),
            (
                listing(item({}, metadata={**item({})["metadata"], "namespace": "kube-system"})),
                SOURCE,
                "item 0 of the list is ConfigMap a of namespace 'kube-system', not of default",
            ),
            (
                listing(item({}, metadata={**item({})["metadata"], "resourceVersion": "x"})),
                SOURCE,
                "item 0 of the list (ConfigMap a) has resourceVersion 'x', not a decimal integer",
            ),
            (
                b'{"metadata": {"resourceVersion": "9z"}, "items": []}',
                SOURCE,
                "the list answer has resourceVersion '9z', not a decimal integer",
            ),
        ],
        ids=[
            "not-json",
            "not-an-object",
            "no-version",
            "items",
            "item",
            "no-metadata",
            "value",
            "data",
            "base64",
            "both",
            "labels",
            "namespace",
            "item-version",
            "list-version",
        ],
    )
    def test_a_malformed_list_answer_is_named(
        self, kube: FakeKubernetes, answer: bytes, file: str, message: str
    ):
        kube.apply("a", {"a.yaml": "a: 1"}, labels=LABELS)
        kube.answer_next_list(answer)
        source = source_for(kube)
        with pytest.raises(LoadError) as caught:
            source.read()
        (problem,) = caught.value.problems
        assert (problem.file, problem.message) == (file, message)
        assert problem.code is ProblemCode.SOURCE_UNAVAILABLE
        assert contents(source) == [b"a: 1"]

    def test_an_answer_cut_off_halfway(self, kube: FakeKubernetes):
        kube.apply("a", {"a.yaml": "a: 1"}, labels=LABELS)
        kube.break_next_list()
        source = source_for(kube)
        with pytest.raises(LoadError) as caught:
            source.read()
        (problem,) = caught.value.problems
        assert problem.file == SOURCE
        assert problem.message.startswith(
            "the connection broke off in the middle of an answer (Connection broken: "
            "IncompleteRead("
        )
        assert contents(source) == [b"a: 1"]

    @pytest.mark.parametrize(
        "error",
        [
            ValueError("no such value"),
            KeyError("metadata"),
            urllib3.exceptions.ProtocolError("Connection broken: reset by peer"),
            RuntimeError("anything else"),
        ],
        ids=["value-error", "key-error", "urllib3", "runtime-error"],
    )
    def test_any_exception_in_a_read_is_a_load_error(
        self, kube: FakeKubernetes, monkeypatch: pytest.MonkeyPatch, error: Exception
    ):
        source = source_for(kube)

        def failing(*args: Any, **kwargs: Any) -> Any:
            raise error

        monkeypatch.setattr(source._core, "list_namespaced_config_map", failing)
        with pytest.raises(LoadError) as caught:
            source.read()
        (problem,) = caught.value.problems
        assert (problem.file, problem.code) == (SOURCE, ProblemCode.SOURCE_UNAVAILABLE)
        assert str(error).strip("'") in problem.message

    async def test_a_broken_configmap_from_the_watch_fails_the_reload_at_its_name(
        self, kube: FakeKubernetes, fraud_service: HotReloadService
    ):
        """A ConfigMap whose value is not a string, delivered by the watch, fails the
        reload at `configmap/<name>/<key>`; the last good rules keep serving."""
        version = fraud_service.registry.version
        kube.apply("fraud-rules", {"fraud.yaml": 5}, labels=LABELS)  # type: ignore[dict-item]
        record = await failed_reload(fraud_service)
        (error,) = record["errors"]
        assert error["file"] == "configmap/fraud-rules/fraud.yaml"
        assert error["message"].endswith("data.fraud.yaml is a number, not a string")
        assert fraud_service.registry.version == version
        (source,) = fraud_service.sources
        assert source.watch_problem() is None

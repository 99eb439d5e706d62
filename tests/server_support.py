"""Shared helpers for the server tests: ConfigMap-style rule dirs, a real app, polling.

conftest.py loads it as a plugin, so its fixtures serve every test module. Nothing here
is a mock: rule files are real files (swapped the way the kubelet swaps a mounted
ConfigMap), the application is the real aiohttp app built by `build_state`/`create_app`
and served by a real server, and WebSockets are real client connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import BaseTestServer, TestClient, TestServer
from conftest import dump_yaml, fraud_doc, make_ruleset_doc
from prometheus_client.parser import text_string_to_metric_families

from sidecar.api.app import AppState, create_app, open_front_door
from sidecar.api.run import build_state
from sidecar.config import Settings
from sidecar.testing import ConfigMapDir

__all__ = [
    "HOT",
    "ConfigMapDir",
    "Sidecar",
    "ThreadedSidecar",
    "eventually",
    "free_port",
    "metric_value",
    "receive_event",
    "receive_until",
    "serving",
    "start_sidecar",
]

HOT = "/api/v1/rules/hot-reload"
WAIT_SECONDS = 5.0
_T = TypeVar("_T")


# Rule documents

INVALID_RULES = (
    "apiVersion: rule-sidecar/v1\n"
    "kind: RuleSet\n"
    "metadata: {id: fraud}\n"
    "spec:\n"
    "  rules:\n"
    "    - id: large-amount\n"
    "      condition: input.amount >\n"
    "      points: 40\n"
)
"""A document whose only rule's condition does not compile (line 7)."""


# Waiting


async def eventually(
    check: Callable[[], _T | Awaitable[_T]],
    *,
    timeout: float = WAIT_SECONDS,
    interval: float = 0.02,
    message: str = "condition",
) -> _T:
    """Poll `check` (plain or async) until it returns something truthy, or fail."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value  # type: ignore[return-value]
        last = value
        if time.monotonic() > deadline:
            raise AssertionError(f"{message} not met within {timeout} s (last: {last!r})")
        await asyncio.sleep(interval)


def wait_sync(
    check: Callable[[], _T], *, timeout: float = WAIT_SECONDS, message: str = "condition"
) -> _T:
    """Blocking `eventually`, for tests that drive a server in another thread or process."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{message} not met within {timeout} s (last: {value!r})")
        time.sleep(0.02)


async def receive_event(
    ws: aiohttp.ClientWebSocketResponse, timeout: float = WAIT_SECONDS
) -> dict[str, Any]:
    """The next WebSocket message as JSON; fails on a close or after `timeout`."""
    message = await ws.receive(timeout=timeout)
    assert message.type is aiohttp.WSMsgType.TEXT, f"expected a text message, got {message!r}"
    event: dict[str, Any] = json.loads(message.data)
    return event


async def receive_until(
    ws: aiohttp.ClientWebSocketResponse,
    event_type: str,
    timeout: float = WAIT_SECONDS,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Read until a message of `event_type` arrives: (that message, everything before it)."""
    deadline = time.monotonic() + timeout
    seen: list[dict[str, Any]] = []
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            types = [event["event_type"] for event in seen]
            raise AssertionError(f"no {event_type!r} within {timeout} s; saw {types}")
        try:
            event = await receive_event(ws, remaining)
        except TimeoutError:
            continue
        if event["event_type"] == event_type:
            return event, seen
        seen.append(event)


def metric_value(text: str, name: str, labels: Mapping[str, str] | None = None) -> float | None:
    """The value of one sample in Prometheus text output, or None when it is absent."""
    wanted = labels or {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in wanted.items()):
                return float(sample.value)
    return None


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


# A real application behind a real server


@dataclass
class Sidecar:
    """One running application: its test client, its state and its rules directory."""

    client: TestClient
    state: AppState
    rules: Path
    settings: Settings

    @property
    def service(self) -> Any:
        return self.state.service

    @property
    def version(self) -> int:
        return self.state.registry.version

    async def call(
        self, method: str, path: str, *, status: int | None = 200, **kwargs: Any
    ) -> tuple[aiohttp.ClientResponse, Any]:
        """One request: (response, JSON body or None); asserts the status when given."""
        response = await self.client.request(method, path, **kwargs)
        text = await response.text()
        body = json.loads(text) if text and "json" in response.content_type else None
        if status is not None:
            assert response.status == status, f"{method} {path}: {response.status} {text}"
        return response, body

    async def get(self, path: str, *, status: int | None = 200, **kwargs: Any) -> Any:
        return (await self.call("GET", path, status=status, **kwargs))[1]

    async def post(self, path: str, *, status: int | None = 200, **kwargs: Any) -> Any:
        return (await self.call("POST", path, status=status, **kwargs))[1]

    async def evaluate(self, ruleset_id: str, document: Any) -> dict[str, Any]:
        result: dict[str, Any] = await self.post(
            f"/api/v1/rulesets/{ruleset_id}/evaluate", json={"input": document}
        )
        return result

    async def health(self) -> tuple[int, dict[str, Any]]:
        response, body = await self.call("GET", "/health/hot-reload", status=None)
        return response.status, body


def _app_for(state: AppState, settings: Settings) -> web.Application:
    """The application exactly as `serve()` wires it (WebSockets closed at shutdown)."""
    app = create_app(state, max_body_bytes=settings.max_body_bytes)

    async def close_websockets(_app: web.Application) -> None:
        await state.notifier.close_all()

    app.on_shutdown.append(close_websockets)
    return app


def _server_of(test_server: BaseTestServer) -> web.Server:
    """The aiohttp server behind a test server, for `open_front_door` as `serve()` does
    (before the first connection: each connection takes the handler it sees then)."""
    assert test_server.runner is not None
    assert test_server.runner.server is not None
    return test_server.runner.server


StartSidecar = Callable[..., Awaitable[Sidecar]]


@pytest.fixture
async def start_sidecar(
    aiohttp_client: Callable[..., Awaitable[TestClient]],
) -> AsyncIterator[StartSidecar]:
    """Factory: `await start_sidecar(rules_dir, load=True, monitor=False, **settings)`.

    Follows `serve()`: build the state, create the app, load, start watching (only when
    `monitor`), then serve. `prepare(state)` may replace parts of the state before the
    app is created. Every service started here is closed at teardown, its worker
    processes ended (left to the collector, their pipes piled up past select()'s 1,024).
    """
    states: list[AppState] = []

    async def start(
        rules: Path,
        *,
        load: bool = True,
        monitor: bool = False,
        prepare: Callable[[AppState], None] | None = None,
        **options: Any,
    ) -> Sidecar:
        options.setdefault("debounce_ms", 20)
        settings = Settings(rules_dirs=(rules,), **options)
        state = build_state(settings)
        if prepare is not None:
            prepare(state)
        states.append(state)
        app = _app_for(state, settings)
        if load:
            await state.service.initial_load()
        if monitor:
            state.service.start()
            state.metrics.monitoring.set(1)
        client = await aiohttp_client(app)
        open_front_door(_server_of(client.server), app)
        return Sidecar(client=client, state=state, rules=rules, settings=settings)

    yield start
    for state in states:
        # `close`, as `serve` ends: `stop` alone left each sidecar's reload worker process
        # running, and its pipes open here (1,000 descriptors in test_api.py alone, past
        # what select() takes).
        await state.service.close()


@pytest.fixture
def configmap_dir(tmp_path: Path) -> ConfigMapDir:
    """A ConfigMap-style rules directory holding `rules.yaml` with the `fraud` ruleset."""
    mount = ConfigMapDir(tmp_path / "configmap")
    mount.publish({"rules.yaml": dump_yaml(fraud_doc())})
    return mount


@pytest.fixture
def plain_rules(tmp_path: Path) -> Path:
    """A plain rules directory: `fraud.yaml` and `extra.yaml` (ruleset `extra`)."""
    directory = tmp_path / "plain-rules"
    directory.mkdir()
    (directory / "fraud.yaml").write_text(dump_yaml(fraud_doc()), encoding="utf-8")
    (directory / "extra.yaml").write_text(dump_yaml(make_ruleset_doc("extra")), encoding="utf-8")
    return directory


# A real server in a thread of its own (for the synchronous client)


@dataclass
class ThreadedSidecar:
    """The real app served on 127.0.0.1 by a `TestServer` on an event loop in a thread."""

    settings: Settings
    port: int = 0
    state: AppState | None = None
    _loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)
    _thread: threading.Thread | None = None
    _server: TestServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def run(self, coroutine: Awaitable[_T], timeout: float = WAIT_SECONDS) -> _T:
        """Run a coroutine on the server's loop and wait for its result."""
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)  # type: ignore[arg-type]
        return future.result(timeout)

    def start(self) -> ThreadedSidecar:
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.run(self._start())
        return self

    async def _start(self) -> None:
        self.state = build_state(self.settings)
        app = _app_for(self.state, self.settings)
        await self.state.service.initial_load()
        self.state.service.start()
        self._server = TestServer(app, host="127.0.0.1", port=self.port or None)
        await self._server.start_server()
        open_front_door(_server_of(self._server), app)
        self.port = self._server.port or 0

    async def _stop(self) -> None:
        assert self.state is not None
        await self.state.service.close()  # its reload worker too (see `start_sidecar`)
        if self._server is not None:
            await self._server.close()
            self._server = None

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.run(self._stop(), timeout=15)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(5)
        self._loop.close()

    def __enter__(self) -> ThreadedSidecar:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def threaded_sidecar(settings: Settings) -> Iterator[ThreadedSidecar]:
    """`with threaded_sidecar(settings) as server: ... server.url ...`"""
    server = ThreadedSidecar(settings)
    server.start()
    try:
        yield server
    finally:
        server.stop()


# A real `rule-sidecar serve` process

START_SECONDS = 15.0


def command() -> list[str]:
    """The console script next to this interpreter, else `python -m sidecar.cli`."""
    script = Path(sys.executable).with_name("rule-sidecar")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "sidecar.cli"]


def clean_environment(**extra: str) -> dict[str, str]:
    """This environment without any sidecar setting, plus `extra`."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("RULE_SIDECAR_", "HOT_RELOAD_"))
    }
    env.update(extra)
    return env


@dataclass
class Served:
    """A `rule-sidecar serve` process, its port and its stderr log file."""

    process: subprocess.Popen[bytes]
    port: int
    log: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str) -> tuple[int, Any]:
        """GET `path`: (status, JSON body)."""
        try:
            with urllib.request.urlopen(self.url + path, timeout=5) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def wait_ready(self) -> None:
        """Poll /readyz until it answers 200; fail early if the process died."""

        def ready() -> bool:
            assert self.process.poll() is None, f"serve exited: {self.log.read_text()}"
            try:
                return self.get("/readyz")[0] == 200
            except (OSError, ValueError):
                return False

        wait_sync(ready, timeout=START_SECONDS, message="serve ready")

    def log_lines(self) -> list[str]:
        return [line for line in self.log.read_text("utf-8").splitlines() if line.strip()]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def spawn(
    tmp_path: Path,
    *args: str,
    port: int | None = None,
    env: dict[str, str] | None = None,
    before_exec: Callable[[], None] | None = None,
    wrapper: Sequence[str] = (),
) -> Served:
    """Start `rule-sidecar serve --port <port> ARGS...` with stderr to a file.

    `before_exec` runs in the child before the sidecar starts (to set resource limits);
    `wrapper` is a command line the sidecar runs under (`setpriv ... --`)."""
    port = port or free_port()
    log = tmp_path / f"serve-{port}.log"
    env = env if env is not None else clean_environment()
    with log.open("wb") as stderr:
        process = subprocess.Popen(
            [*wrapper, *command(), "serve", "--port", str(port), *args],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env=env,
            preexec_fn=before_exec,  # noqa: PLW1509 (only sets limits, no locks taken)
        )
    return Served(process=process, port=port, log=log, env=env)


@contextlib.contextmanager
def serving(tmp_path: Path, rules: Path, *, port: int | None = None) -> Iterator[Served]:
    """`rule-sidecar serve --rules-dir RULES`, ready; stopped (SIGTERM) on exit. The same
    `port` twice is a restart as a client sees it."""
    served = spawn(tmp_path, "--rules-dir", str(rules), port=port)
    try:
        served.wait_ready()
        yield served
    finally:
        served.stop()

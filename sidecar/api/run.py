"""`rule-sidecar serve`: wire the parts together and run until SIGTERM.

The listeners open first and the rules load behind them: a first load can take long (a
slow Kubernetes list, a database that does not answer), and meanwhile `/livez` answers,
`/readyz` and health answer 503 saying what the load waits for, and registry reads 503.

SIGHUP reloads with every source read from scratch (their caches and fingerprints
forgotten). SIGTERM (or SIGINT) stops watching, closes WebSockets with 1001, lets
in-flight requests finish (aiohttp's graceful shutdown, at most `_DRAIN_SECONDS`) and
returns 0; a source read still waiting on a frozen server is not waited for (it runs in
a daemon thread, see `sidecar.service`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import json
import logging
import math
import os
import resource
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, NoReturn, cast

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_server import Server

try:
    import uvloop
except ImportError:  # optional: the `speed` extra
    uvloop = None  # type: ignore[assignment]

from sidecar.api.app import (
    AppState,
    create_app,
    create_observation_app,
    open_front_door,
    reset,
)
from sidecar.api.decisionlog import DecisionLog
from sidecar.api.limits import BatchTurns, RateBudgets, RequestLimits
from sidecar.api.metrics import Metrics
from sidecar.api.views import status_view, writes_view
from sidecar.api.websocket import ReloadNotificationManager
from sidecar.conditions import ConditionCompiler
from sidecar.config import Settings, SettingsError
from sidecar.loader import Loader, candidate_checker, reload_worker
from sidecar.registry import RuleRegistry
from sidecar.service import HotReloadService, ReloadRecord, ReloadStatus, Trigger
from sidecar.sources import RuleSource
from sidecar.sources.database import DatabaseSource
from sidecar.sources.files import DirectorySource
from sidecar.state import StateStore
from sidecar.writes import RuleWriter

if TYPE_CHECKING:
    from sidecar.sources.kubernetes import ConfigMapSource, EventRecorder

__all__ = ["bundled_rules_dir", "configure_logging", "serve"]

logger = logging.getLogger("sidecar.serve")


def bundled_rules_dir() -> Path:
    """The example rules shipped in the package: what `serve` runs without `--rules-dir`."""
    return Path(str(resources.files("sidecar").joinpath("examples", "rules")))


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log collectors."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class ClientMistakes(logging.Filter):
    """Keeps aiohttp's tracebacks of requests it could not read out of the log.

    aiohttp answers a malformed head, or a body that its Content-Encoding does not fit,
    with a 400 of its own, and logs each one at ERROR with a traceback: any client could
    fill the log at a megabyte a second. Those are the client's mistakes, not the
    sidecar's; they are logged only at DEBUG, as one line without the traceback.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        mistake = _client_mistake(record.exc_info[1] if record.exc_info else None)
        if mistake is None:
            return True
        if not logging.getLogger("sidecar").isEnabledFor(logging.DEBUG):
            return False
        record.msg, record.args = f"{record.getMessage()}: {mistake}", ()
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        record.exc_info = record.exc_text = None
        return True


def _client_mistake(exc: BaseException | None) -> BaseException | None:
    """The client's malformed request behind `exc` (or what caused it), if that is what
    it is."""
    for _ in range(8):  # a chain is short; never follow one for good
        if exc is None or isinstance(exc, HttpProcessingError | web.RequestPayloadError):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("aiohttp.server").addFilter(ClientMistakes())


def _read_token(path: Path | None) -> str | None:
    if path is None:
        return None
    token = path.read_text("utf-8").strip()
    if not token:
        raise ValueError(f"the admin token file {path} is empty")
    return token


def build_state(settings: Settings) -> AppState:
    """Every long-lived part of the sidecar, from settings."""
    directories = settings.rules_dirs
    if not directories and settings.database_url is None and not settings.kubernetes_selector:
        directories = (bundled_rules_dir(),)
        logger.info(
            "no --rules-dir given: serving the bundled example rules from %s", directories[0]
        )
    sources: list[RuleSource] = [
        DirectorySource(directory, debounce_ms=settings.debounce_ms) for directory in directories
    ]
    database = None
    if settings.database_url is not None:
        database = DatabaseSource(
            settings.database_url,
            password_file=settings.database_password_file,
            timeouts=settings.database_timeouts,
        )
        sources.append(database)
    recorder = None
    if settings.kubernetes_selector:
        source, recorder = _kubernetes(settings)
        sources.append(source)

    # One worker process takes large reloads off the serving process, another checks
    # submitted documents (see sidecar.loader).
    loader = Loader(
        compiler=ConditionCompiler(fast_path=settings.fast_path),
        run_checks=settings.validation_enabled,
        executor=reload_worker() if settings.reload_worker else None,
        new_executor=reload_worker if settings.reload_worker else None,
        new_checker=candidate_checker if settings.reload_worker else None,
    )
    registry = RuleRegistry()
    service = HotReloadService(
        registry,
        sources,
        loader=loader,
        interval_seconds=settings.interval_seconds,
        auto_reload=settings.hot_reload_enabled,
        state=StateStore(settings.state_dir) if settings.state_dir else None,
        history_limit=settings.history_limit,
        max_age_seconds=settings.max_age_seconds,
        allow_empty=settings.allow_empty,
        verify_interval_seconds=settings.verify_interval_seconds,
    )
    if recorder is not None:
        service.add_listener(_post_events(recorder))
    metrics = Metrics()
    decisions = None
    if settings.decision_log is not None:
        decisions = DecisionLog.from_settings(
            settings, metrics.decision_log_written, metrics.decision_log_dropped
        )
        decisions.start()
    admin_token = _read_token(settings.admin_token_file)
    # A write waits for its publish as long as one read of the database may take.
    writer = (
        None
        if database is None
        else RuleWriter(service, database, publish_timeout=settings.database_read_timeout_seconds)
    )
    writes = writes_view(writer, admin_token is not None)
    notifier = ReloadNotificationManager(
        functools.partial(status_view, service, writes=writes),
        on_count=metrics.websocket_clients.set,
    )
    return AppState(
        registry=registry,
        service=service,
        metrics=metrics,
        notifier=notifier,
        admin_token=admin_token,
        budgets=RateBudgets.from_settings(settings),
        limits=RequestLimits.from_settings(settings),
        batches=BatchTurns(settings.max_queued_batches),
        allowed_hosts=frozenset(settings.allowed_hosts),
        decisions=decisions,
        writer=writer,
    )


def _kubernetes(settings: Settings) -> tuple[ConfigMapSource, EventRecorder | None]:
    """The ConfigMap API source and, when asked for, Events on failed reloads."""
    # Imported only when used: the Kubernetes client costs 0.4 s and 17 MiB to import.
    from sidecar.sources.kubernetes import (  # noqa: PLC0415
        ConfigMapSource,
        EventRecorder,
        api_client_from_environment,
        pod_namespace,
    )

    try:
        api = api_client_from_environment()
        namespace = settings.kubernetes_namespace or pod_namespace()
    except ValueError as exc:
        raise SettingsError(f"--kubernetes-selector: {exc}") from None
    source = ConfigMapSource(
        api,
        namespace=namespace,
        label_selector=settings.kubernetes_selector or "",
        watch_timeout_seconds=settings.kubernetes_watch_timeout_seconds,
        list_deadline_seconds=settings.kubernetes_list_deadline_seconds,
    )
    if not settings.kubernetes_events:
        return source, None
    return source, EventRecorder(api, namespace=namespace, instance=socket.gethostname())


def _post_events(recorder: EventRecorder) -> Callable[[ReloadRecord], None]:
    """A listener that posts a failed reload's problems as Events, off the event loop."""
    pending: set[asyncio.Future[None]] = set()

    def on_reload(record: ReloadRecord) -> None:
        if record.status is ReloadStatus.FAILED:
            future = asyncio.get_running_loop().run_in_executor(
                None, recorder.reload_failed, record.errors
            )
            pending.add(future)
            future.add_done_callback(pending.discard)

    return on_reload


class HeapFreezer:
    """After each good reload, move what is alive out of the collector's sight.

    A snapshot holds many long-lived objects; without this, every full collection walks
    all of them and stalls requests (the p99). Before freezing, the unfrozen generations
    are collected: what was allocated since the last freeze (the new snapshot's objects,
    a failed reload's traceback cycles), never the frozen heap, so the pause grows with
    the change, not with the registry. Frozen objects are still freed by reference
    counting (a replaced snapshot's are: snapshots hold no cycles); only a cycle that
    dies after it was frozen is not. Such cycles could add up, so the heap is unfrozen
    and collected whole (one pause of 50-150 ms for 1 MiB of rules and its history)
    when the heap has grown to `growth` times what the last full collection left, or
    `every` seconds after it. The heap's size is the interpreter's count of allocated
    blocks, read at no cost: counting the frozen objects walks them (10 ms a million),
    and a running count of what was frozen cannot tell a reload that replaced half the
    heap from one that doubled it. Twice (`growth`), because the registry's history fills
    over the first ten reloads and legitimately grows the heap in steps: at 1.5x, large
    reloads paid a full collection every third time while it filled.
    """

    def __init__(self, growth: float = 2.0, every: float = 600.0) -> None:
        self.growth = growth
        self.every = every
        self._baseline = 0  # allocated blocks after the last full collection
        self._collected = -math.inf  # when (monotonic) that was

    @contextlib.contextmanager
    def receiving(self) -> Iterator[None]:
        """Take in a large load's rulesets (`Loader.receiving`) without the collector.

        Each automatic collection would walk all the new objects made so far, 3-10 ms a
        time in whichever thread allocates, the serving one included. So: the unfrozen
        generations are collected first, while they are small; automatic collection is
        off while the objects arrive; then they are frozen as they are, in one step.
        """
        gc.collect()
        enabled = gc.isenabled()
        gc.disable()
        try:
            yield
        finally:
            gc.freeze()
            if enabled:
                gc.enable()

    def __call__(self, record: ReloadRecord) -> None:
        if record.status not in (ReloadStatus.SUCCESS, ReloadStatus.RESTORED):
            return
        gc.collect()  # the unfrozen generations only: frozen objects are not walked
        gc.freeze()
        now = time.monotonic()
        grown = sys.getallocatedblocks() > self._baseline * self.growth
        if grown or now - self._collected >= self.every:
            gc.unfreeze()
            gc.collect()
            gc.freeze()
            self._baseline = sys.getallocatedblocks()
            self._collected = now


# How often the connection caps look for closed connections whose answers are not read.
_SWEEP_SECONDS: Final = 1.0

_REFUSAL: Final = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"Content-Type: application/json\r\n"
    b"Retry-After: 1\r\n"
    b"Connection: close\r\n"
    b"Content-Length: %d\r\n\r\n%s"
)


class _Refused(asyncio.Protocol):
    """A connection past the cap: one 503, then closed, before any of it is read."""

    def __init__(self, limit: int) -> None:
        self.limit = limit

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        message = (
            f"more than {self.limit} open connections: "
            "RULE_SIDECAR_MAX_CONNECTIONS / RULE_SIDECAR_METRICS_MAX_CONNECTIONS"
        )
        body = json.dumps({"error": {"status": 503, "message": message}}).encode()
        writer = cast(asyncio.WriteTransport, transport)
        writer.write(_REFUSAL % (len(body), body))
        writer.close()


class _Counted(asyncio.Protocol):
    """aiohttp's handler for one connection, counted by the cap from accept to close."""

    def __init__(self, handler: asyncio.Protocol, cap: ConnectionCap) -> None:
        self.handler = handler
        self.cap = cap
        self.made = False
        self.counted = True
        self.transport: asyncio.BaseTransport | None = None
        self.accepted = time.monotonic()
        self.closing_since: float | None = None

    @property
    def busy(self) -> bool:
        """A request is being answered on it (unknown: busy, never evicted)."""
        return bool(getattr(self.handler, "_request_in_progress", True))

    def release(self) -> None:
        if self.counted:
            self.counted = False
            self.cap.open -= 1
            self.cap.live.pop(self, None)

    def evict(self) -> None:
        """Make room for a new connection (this one is idle, or only trickling a head), or
        drop answers that are not read."""
        self.release()
        if self.transport is not None:
            reset(self.transport)

    def unread_for(self, now: float) -> float:
        """How long the connection has been closing on our side with answers the client
        has not read (a transport that closes keeps it open until they are sent)."""
        if self.transport is None or not self.transport.is_closing():
            return 0.0
        if self.closing_since is None:
            self.closing_since = now
        return now - self.closing_since

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.made = True
        self.transport = transport
        self.handler.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.handler.data_received(data)

    def eof_received(self) -> bool | None:
        return self.handler.eof_received()

    def pause_writing(self) -> None:
        self.handler.pause_writing()

    def resume_writing(self) -> None:
        self.handler.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.release()
        self.handler.connection_lost(exc)

    def forget_unless_made(self) -> None:
        """An accepted socket whose transport could not be built never calls back."""
        if not self.made:
            self.release()


class ConnectionCap:
    """The listener's protocol factory: aiohttp's handler while fewer than `limit`
    connections are open. At the limit, the oldest connection that is not being answered
    makes room (as nginx drops idle keep-alive connections), so idle or trickling
    sockets cannot lock the kubelet's probes out; only when every connection is busy
    answering is a new one refused with a 503.

    aiohttp has no connection limit, and every open connection holds a descriptor: 1,100
    idle ones used up `ulimit -n 1024`, after which the rules directory could no longer
    be listed. A connection counts from its accept to its close (aiohttp's own registry
    of connections starts a loop iteration later, which lets a burst of accepts through).
    """

    def __init__(self, server: Server, limit: int, name: str, drain_seconds: float) -> None:
        self.server = server
        self.limit = limit
        self.name = name
        self.drain_seconds = drain_seconds
        self.open = 0
        self.refused = 0
        self.live: dict[_Counted, None] = {}
        self._warned = -math.inf
        self._sweep: asyncio.TimerHandle | None = None

    def _sweep_soon(self) -> None:
        if self._sweep is None:
            self._sweep = asyncio.get_running_loop().call_later(_SWEEP_SECONDS, self._abort_unread)

    def _abort_unread(self) -> None:
        """Abort the connections closed on our side whose answers the client has not read
        within `drain_seconds`. aiohttp closes a connection gracefully (the idle timeout,
        an answer that ends it), and a graceful close waits for every buffered answer to
        be taken: a client that pipelines requests and never reads held its descriptor,
        its slot and up to the transport's high-water mark of answers for good (each
        small answer was handed over without a deadline: `_answer_in_time`)."""
        self._sweep = None
        now = time.monotonic()
        late = [c for c in self.live if c.unread_for(now) >= self.drain_seconds]
        for connection in late:
            connection.evict()
        if late:
            logger.warning(
                "the %s listener aborted %d connection(s) whose answers were not read "
                "within %g s of closing",
                self.name,
                len(late),
                self.drain_seconds,
            )
        if self.live:
            self._sweep_soon()

    def _make_room(self) -> bool:
        """Close the oldest connection that is not being answered, if there is one: a
        client sends its request head as it connects, so one still without a complete
        head (idle, or trickling bytes) is the one to go."""
        waiting = (c for c in self.live if c.made and not c.busy)
        victim = min(waiting, key=lambda c: c.accepted, default=None)
        if victim is None:
            return False
        victim.evict()
        return True

    def __call__(self) -> asyncio.BaseProtocol:
        if self.open >= self.limit and not self._make_room():
            self.refused += 1
            if time.monotonic() - self._warned >= 10.0:  # one line per flood, not per socket
                self._warned = time.monotonic()
                logger.warning(
                    "the %s listener holds %d connections, its limit: %d refused so far",
                    self.name,
                    self.limit,
                    self.refused,
                )
            return _Refused(self.limit)
        self.open += 1
        counted = _Counted(self.server(), self)
        self.live[counted] = None
        asyncio.get_running_loop().call_later(1.0, counted.forget_unless_made)
        self._sweep_soon()
        return counted


async def _listen(
    app: web.Application,
    settings: Settings,
    address: tuple[str, int],
    *,
    limit: int,
    name: str,
    api: bool,
) -> tuple[web.AppRunner, asyncio.Server]:
    """Serve `app` on `address`: its runner (which still drains connections at shutdown),
    the front door (the evaluate route and the browser guard only on the `api` listener,
    as its application has them), and a connection cap that also drops answers not read
    within `body_timeout_seconds` of a close."""
    runner = _runner(app, settings)
    await runner.setup()
    assert runner.server is not None
    open_front_door(runner.server, app, evaluate=api, guard_browsers=api)
    cap = ConnectionCap(runner.server, limit, name, settings.body_timeout_seconds)
    listener = await asyncio.get_running_loop().create_server(cap, *address, reuse_address=True)
    return runner, listener


# How long SIGTERM lets in-flight requests finish (a POST /reload waiting on a frozen
# database among them) before they are cancelled: well inside Kubernetes' default
# 30 s grace period.
_DRAIN_SECONDS: Final = 10.0


def _runner(app: web.Application, settings: Settings) -> web.AppRunner:
    """An aiohttp runner with the connection timeouts.

    aiohttp's keep-alive timer runs from a connection's start and after each answer, and
    closes a connection that has not sent a complete request head by then: it bounds
    idle connections and slow heads (slowloris) alike. Heads are also bounded in size
    (aiohttp's defaults: 8190 bytes a line or header, 128 headers); bodies in time by
    `body_timeout_seconds` (sidecar.api.app) and in size by `max_body_bytes`.
    """
    return web.AppRunner(
        app,
        handle_signals=False,
        access_log=None,
        shutdown_timeout=_DRAIN_SECONDS,
        keepalive_timeout=settings.idle_timeout_seconds,
        lingering_time=min(10.0, settings.body_timeout_seconds),
    )


# Descriptors kept for everything but connections: sources, watches, the worker, logs.
_RESERVED_DESCRIPTORS: Final = 128


def connection_caps(settings: Settings, soft_limit: int | None = None) -> tuple[int, int]:
    """The API's and the probe listener's connection caps, lowered to fit the process's
    descriptor limit (`ulimit -n`): the caps exist so that descriptors never run out,
    which a cap above the limit would not do (under `ulimit -n 40`, 60 idle connections
    left `/livez` unanswered)."""
    if soft_limit is None:
        soft_limit, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    api, probes = settings.max_connections, settings.metrics_max_connections
    if soft_limit == resource.RLIM_INFINITY:
        return api, probes
    room = max(2, soft_limit - _RESERVED_DESCRIPTORS)
    if api + probes <= room:
        return api, probes
    probes_fitted = max(1, min(probes, room // 4))
    fitted = probes_fitted, max(1, min(api, room - probes_fitted))
    logger.warning(
        "the descriptor limit (%d) leaves room for %d connections, not %d + %d: the caps "
        "are lowered to %d (API) and %d (probes); raise `ulimit -n` for more",
        soft_limit,
        room,
        api,
        probes,
        fitted[1],
        fitted[0],
    )
    return fitted[1], fitted[0]


async def _load_and_watch(state: AppState, settings: Settings) -> None:
    """The first load, then watching: behind listeners that already answer."""
    await state.service.initial_load()
    if settings.hot_reload_enabled:
        state.service.start()
        state.metrics.monitoring.set(1)


# How long a thread holds the interpreter before another that waits for it may take it
# (Python's default: 5 ms). A reload takes in and publishes its rulesets in threads while
# the event loop serves; each request waits for the interpreter once or twice, so with
# 5 ms every request during those few hundred ms took 5-15 ms. At 1 ms it takes about
# what it takes idle (bench/http_load.py: p99 at 2,000 requests/s under reloads 14 ms
# with 5 ms, 5.4 ms with 1 ms; idle 2 ms); the threads switch more often, at no
# measurable cost when one thread runs alone.
SWITCH_INTERVAL_SECONDS: Final = 0.001


async def serve(settings: Settings) -> int:
    sys.setswitchinterval(SWITCH_INTERVAL_SECONDS)
    state = build_state(settings)
    app = create_app(state, max_body_bytes=settings.max_body_bytes)
    freezer = HeapFreezer()
    state.service.add_listener(freezer)
    state.service.loader.receiving = freezer.receiving

    async def close_websockets(_app: web.Application) -> None:
        await state.notifier.close_all()

    app.on_shutdown.append(close_websockets)
    api_cap, probe_cap = connection_caps(settings)
    address = (settings.host, settings.port)
    runner, listener = await _listen(app, settings, address, limit=api_cap, name="API", api=True)
    listeners = [listener]
    metrics_runner = await _start_metrics(state, settings, listeners, probe_cap)
    logger.info("serving on http://%s:%d", settings.host, settings.port)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(
        signal.SIGHUP, functools.partial(state.service.request_reload, Trigger.SIGNAL, fresh=True)
    )
    starting = asyncio.create_task(_load_and_watch(state, settings), name="first load")

    # A first load that crashed (not one that failed: that is recorded and served around)
    # ends the process, as it did when it ran before the listeners (raised below).
    def crashed(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            stop.set()

    starting.add_done_callback(crashed)
    try:
        await stop.wait()
    finally:
        logger.info("shutting down: draining requests and closing WebSockets")
        starting.cancel()
        await asyncio.wait([starting])
        await state.service.stop(shutting_down=True)
        for listener in listeners:
            listener.close()
        await state.notifier.close_all()
        await _finish(state.handling, _DRAIN_SECONDS)
        if state.decisions is not None:  # every request has ended: write what is queued
            await asyncio.to_thread(state.decisions.close)
        if metrics_runner is not None:
            await metrics_runner.cleanup()
        await runner.cleanup()
        await state.service.close()  # after the drain: a reload asked for may still run
    if not starting.cancelled() and (crash := starting.exception()) is not None:
        raise crash
    return 0


async def _finish(handling: set[asyncio.Task[Any]], seconds: float) -> None:
    """In-flight requests get `seconds` to finish, then are cancelled (aiohttp's own
    drain cancels only a request's body reads, then waits as long again: a reload
    waiting on a frozen database held SIGTERM for the whole read timeout)."""
    if not handling:
        return
    _, late = await asyncio.wait(set(handling), timeout=seconds)
    for task in late:
        task.cancel()
    if late:
        logger.warning("%d request(s) still running after %g s were cancelled", len(late), seconds)
        await asyncio.wait(late, timeout=1.0)


async def _start_metrics(
    state: AppState, settings: Settings, listeners: list[asyncio.Server], limit: int
) -> web.AppRunner | None:
    """Optionally serve metrics and probes on their own address (Prometheus, kubelet),
    with a connection cap of their own: a flood of the API leaves the probes answering."""
    if settings.metrics_port is None:
        return None
    host = settings.metrics_host or settings.host
    runner, listener = await _listen(
        create_observation_app(state),
        settings,
        (host, settings.metrics_port),
        limit=limit,
        name="metrics",
        api=False,
    )
    listeners.append(listener)
    logger.info("metrics and probes on http://%s:%d", host, settings.metrics_port)
    return runner


def run(settings: Settings) -> NoReturn:
    """Serve until SIGTERM, then exit at once: a reload worker stopped mid-answer can
    leave the process pool's manager thread blocked on a half-written result for good,
    and the interpreter's exit would join it."""
    configure_logging(settings.log_level)
    try:
        code = asyncio.run(serve(settings)) if uvloop is None else uvloop.run(serve(settings))
    finally:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)

"""The aiohttp application: the hot-reload contract's endpoints plus registry reads and evaluation.

`AppState` is the one application state object; handlers reach it through the app.
Errors are JSON `{"error": {"status", "message", ...}}`; 404 for unknown ids, 400 for bad
bodies, 401 without the admin token. A request past one of its limits (`RequestLimits`,
the rate budgets; `sidecar.api.limits`) is refused with the setting named in `limit`: 413
past the body size, the batch size or the answer size, 408 for a body that does not
arrive in time, 503 for a batch that runs out of time or finds the queue full, 429 past
a rate budget.
A reload that fails is not an error of the request: it answers 422 with the reload
record, whose `errors` say what is wrong with the rules (as Prometheus' reload endpoint
returns the reload's error to its caller).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hmac
import ipaddress
import logging
import re
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar, cast
from urllib.parse import urlsplit

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware

from sidecar.api.candidates import BODY, YAML_TYPES, Candidate, json_candidate, yaml_candidate
from sidecar.api.decisionlog import BatchRecorder, DecisionLog, with_problem
from sidecar.api.limits import (
    RATE_SETTINGS,
    Action,
    BatchTurns,
    Caller,
    LimitExceeded,
    RateBudgets,
    RequestLimits,
)
from sidecar.api.metrics import CONTENT_TYPE_LATEST, Metrics
from sidecar.api.renders import RenderCache
from sidecar.api.ui import ui_routes
from sidecar.api.views import (
    NO_DATABASE,
    NO_TOKEN,
    WritesView,
    candidate_view,
    health_view,
    history_view,
    reload_view,
    starting_message,
    status_view,
    validation_view,
    writes_view,
)
from sidecar.api.websocket import ReloadNotificationManager
from sidecar.config import DEFAULT_SETTINGS
from sidecar.documents import yaml_text
from sidecar.engine import Evaluation, evaluate_in_slices, evaluate_ruleset
from sidecar.errors import InputError, NotFoundError
from sidecar.explain import ExplanationTooLarge
from sidecar.jsoncodec import dumpb, loads
from sidecar.model import Rule, RuleSet
from sidecar.registry import ChangeEvent, RuleRegistry, RulesetChanges, diff_snapshots
from sidecar.rulefiles import SourceFile
from sidecar.service import (
    CandidateCheck,
    HealthStatus,
    HotReloadService,
    ReloadRecord,
    ReloadStatus,
)
from sidecar.snapshot import Snapshot
from sidecar.writes import (
    Precondition,
    PreconditionFailed,
    RuleWriter,
    WriteFailed,
    WriteRefused,
    Written,
    actor_problem,
)

__all__ = ["AppState", "create_app", "create_observation_app", "open_front_door", "reset"]

logger = logging.getLogger("sidecar.api")

HOT = "/api/v1/rules/hot-reload"


@dataclass(slots=True, kw_only=True)
class AppState:
    """Everything the handlers share; one per application."""

    registry: RuleRegistry
    service: HotReloadService
    metrics: Metrics
    notifier: ReloadNotificationManager
    admin_token: str | None
    budgets: RateBudgets = field(
        default_factory=lambda: RateBudgets.from_settings(DEFAULT_SETTINGS)
    )
    limits: RequestLimits = field(
        default_factory=lambda: RequestLimits.from_settings(DEFAULT_SETTINGS)
    )
    allowed_hosts: frozenset[str] = frozenset()
    batches: BatchTurns = field(default_factory=BatchTurns)
    renders: RenderCache = field(default_factory=RenderCache)
    decisions: DecisionLog | None = None  # the decision log, when it is on
    writer: RuleWriter | None = None  # writes through the API, with a database source
    # The tasks handling a request now: shutdown gives them a while, then cancels them.
    handling: set[asyncio.Task[Any]] = field(default_factory=set)

    @property
    def writes(self) -> WritesView:
        return writes_view(self.writer, self.admin_token is not None)


STATE: web.AppKey[AppState] = web.AppKey("state", AppState)


def json_response(
    data: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=dumpb(data),
        status=status,
        content_type="application/json",
        charset="utf-8",
        headers=headers,
    )


def error_response(status: int, message: str, **extra: Any) -> web.Response:
    return json_response({"error": {"status": status, "message": message, **extra}}, status)


def _error_answer(exc: Exception, request: web.BaseRequest) -> web.Response:
    """Every error leaves as JSON with a message; nothing leaks a traceback."""
    if isinstance(exc, NotFoundError):
        return error_response(404, str(exc))
    if isinstance(exc, web.RequestPayloadError):
        return _unreadable_body(exc, request)
    if isinstance(exc, InputError):
        return error_response(400, exc.message, path=exc.path)
    if isinstance(exc, LimitExceeded):
        response = error_response(exc.status, exc.message, limit=exc.limit)
        if exc.retry_after:
            response.headers["Retry-After"] = str(exc.retry_after)
        if exc.status == 408:  # the rest of the body may never come: not kept alive
            response.force_close()
        return response
    if isinstance(exc, web.HTTPException):
        kept = ("Allow", "Retry-After", "WWW-Authenticate")
        headers = {k: v for k, v in exc.headers.items() if k in kept}
        message = exc.text if exc.text and exc.text != exc.reason else exc.reason
        response = error_response(exc.status, " ".join(message.split()))
        response.headers.update(headers)
        return response
    logger.error("unexpected error in %s %s", request.method, request.path, exc_info=exc)
    return error_response(500, "internal error; see the sidecar's log")


def _unreadable_body(exc: web.RequestPayloadError, request: web.BaseRequest) -> web.Response:
    """The client's mistake, not the sidecar's: it left mid-body (`_read_body`), or sent
    a body that its Content-Encoding does not fit. 400 (when anyone still reads it), the
    connection closed after it, and the body ended here, so that aiohttp does not try to
    read the rest (and log that failure as its own)."""
    cause = getattr(exc.__cause__, "message", None) or str(exc)
    response = error_response(400, f"the body could not be read: {cause}")
    response.force_close()
    request.content.feed_eof()
    return response


async def _answer_in_time(
    request: web.BaseRequest, response: web.StreamResponse, seconds: float
) -> None:
    """Send the answer within `seconds` (`body_timeout_seconds`).

    aiohttp waits forever for a client that does not read its answer, holding the
    connection (a slot of the connection cap, a descriptor) and the answer's memory. A
    client that has not taken its answer in time has its connection aborted, which ends
    the wait. An answer that aiohttp hands over without waiting (`_handed_over_at_once`)
    needs no timer: almost every answer. (A timer rather than `asyncio.timeout`: a
    third of the cost.)
    """
    timer = None
    if not _handed_over_at_once(request, response):
        timer = asyncio.get_running_loop().call_later(seconds, _abort_slow_reader, request)
    try:
        await response.prepare(request)
        await response.write_eof()
    except ConnectionError:
        pass  # the client left, or was cut off: aiohttp notes it quietly
    finally:
        if timer is not None:
            timer.cancel()


# Room for an answer's head (status line and headers) beside its body.
_HEAD_ROOM: Final = 4096


def _handed_over_at_once(request: web.BaseRequest, response: web.StreamResponse) -> bool:
    """Whether aiohttp will hand this whole answer to the transport without waiting for
    the client to read (`_answer_in_time`): writing is not paused (a transport that went
    above its high-water mark stays paused until it drains below its low one), and the
    answer leaves it below the high-water mark."""
    transport = request.transport
    body = response.body if isinstance(response, web.Response) else None
    if transport is None or not isinstance(body, bytes) or request.protocol.writing_paused:
        return False
    _, high = transport.get_write_buffer_limits()
    return transport.get_write_buffer_size() + len(body) + _HEAD_ROOM <= high


def _abort_slow_reader(request: web.BaseRequest) -> None:
    logger.warning(
        "%s %s: the client did not take its answer in time", request.method, request.path
    )
    if request.transport is not None:
        reset(request.transport)


def reset(transport: asyncio.BaseTransport) -> None:
    """Abort a connection with a reset, so that the kernel also drops what it still holds
    for the client (its send queue, megabytes for a client that never reads); a plain
    close would keep that queue alive, outside any cap, until the client read or the
    kernel gave up."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    cast(asyncio.WriteTransport, transport).abort()


def serving(*, guard_browsers: bool) -> Middleware:
    """What every request goes through (`_serve`), as the application's one middleware."""

    @web.middleware
    async def serve(request: web.Request, handler: Handler) -> web.StreamResponse:
        return await _serve(_state(request), request, handler, guard_browsers=guard_browsers)

    return serve


async def _serve(
    state: AppState,
    request: web.BaseRequest,
    handler: Callable[[Any], Awaitable[web.StreamResponse]],
    *,
    guard_browsers: bool,
) -> web.StreamResponse:
    """What every request goes through, in one frame rather than a chain (the evaluate
    route's overhead): counted among those shutdown waits for (and may cancel); refused
    when only a browser tricked by another site would send it (`guard_browsers`, see
    `_refuse_cross_site`); errors answered as JSON; the answer sent here, in time
    (WebSockets are answered by their handler and are not affected)."""
    task = asyncio.current_task()
    handling = state.handling
    if task is not None:
        handling.add(task)
    try:
        try:
            if guard_browsers:
                _refuse_cross_site(state, request)
            response = await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            response = _error_answer(exc, request)
        except Exception as exc:
            response = _error_answer(exc, request)
        # A body left unread, when it is compressed (refused, or not needed) or when the
        # answer ends the connection anyway (408: it did not come in time): aiohttp would
        # go on reading the rest, up to `lingering_time`, decompressing it (seconds of CPU
        # a megabyte) or waiting on a slow client (SIGTERM waited for it too). The answer
        # closes the connection instead, and says so.
        unread = not request.content.is_eof() and (
            hdrs.CONTENT_ENCODING in request.headers or response.keep_alive is False
        )
        if unread:
            response.force_close()
        if not response.prepared:
            await _answer_in_time(request, response, state.limits.body_timeout_seconds)
        if unread:
            request.protocol.force_close()
        return response
    finally:
        handling.discard(task)


# `POST /api/v1/rulesets/{ruleset_id}/evaluate` with an id as the schema allows it, spelt
# plainly: any other spelling (escapes, dot segments, a full URL) goes to the router.
_EVALUATE_PATH: Final = re.compile(r"/api/v1/rulesets/([a-z0-9][a-z0-9._-]{0,62})/evaluate")

RequestHandler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


def open_front_door(
    server: web.Server, app: web.Application, *, evaluate: bool = True, guard_browsers: bool = True
) -> None:
    """Answer the evaluate route (with `evaluate`) and unmet expectations in front of
    aiohttp's router and middleware chain.

    Evaluation is what applications call on every decision, and resolving its route
    among the others and walking the middleware chain is work it does not need: with
    the door, the route costs what a bare aiohttp handler costs (bench/README.md). The
    door takes `POST /api/v1/rulesets/{id}/evaluate` spelt plainly, without an `Expect`
    header (the router answers `100-continue`), straight to the same handler through
    the same `_serve`; every other request, and any other spelling of this one, goes on
    to `server`'s own handler (the application) unchanged. The application's
    `on_response_prepare` signal does not run for the door's answers (none is used).

    An `Expect` other than `100-continue` is refused here (417), through `_serve`: the
    router would refuse it before any middleware, in plain text, and leave a compressed
    body to be read and decompressed to its end. Call it before the server accepts
    connections: each takes the handler it sees then.
    """
    state = app[STATE]
    behind: RequestHandler = server.request_handler

    async def door(request: web.BaseRequest) -> web.StreamResponse:
        expected = request.headers.get(hdrs.EXPECT)
        if expected is not None and expected.lower() != "100-continue":
            return await _serve(state, request, _unmet, guard_browsers=guard_browsers)
        if evaluate and expected is None and request.method == "POST":
            found = _EVALUATE_PATH.fullmatch(request.raw_path.partition("?")[0])
            if found is not None:
                ruleset_id = found[1]
                return await _serve(
                    state,
                    request,
                    lambda asked: _evaluate(state, asked, ruleset_id),
                    guard_browsers=guard_browsers,
                )
        return await behind(request)

    server.request_handler = door


async def _unmet(request: web.BaseRequest) -> web.StreamResponse:
    raise web.HTTPExpectationFailed(
        text=f"Expect: {request.headers[hdrs.EXPECT]!r} cannot be met; only 100-continue is"
    )


def _state(request: web.Request) -> AppState:
    return request.app[STATE]


@functools.lru_cache(maxsize=256)  # every request asks; the Host values are few
def _host_allowed(authority: str, allowed: frozenset[str]) -> bool:
    """An IP literal or localhost, or a name the operator allowed. DNS rebinding needs a
    name of the attacker's that resolves to this machine; an IP literal cannot be one.
    A Host that is not an authority at all (`[`, `a]b`) is not allowed either."""
    try:
        host = urlsplit(f"//{authority}").hostname or ""
    except ValueError:
        return False
    if host in allowed or host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _refuse_cross_site(state: AppState, request: web.BaseRequest) -> None:
    """Refuse what only a browser tricked by another site would send.

    A page on another site can make a browser on the sidecar's machine (a developer's
    laptop) reach it: by rebinding its own DNS name to 127.0.0.1 (the Host header then
    names that site), or with a simple cross-origin POST or a WebSocket, which browsers
    send without asking (the Origin header then names that site). Clients that are not
    browsers send no Origin and an IP or localhost as Host, and are not affected.
    """
    allowed = state.allowed_hosts
    host = request.headers.get("Host", "")
    if not _host_allowed(host, allowed):
        raise web.HTTPForbidden(
            text=f"Host {host!r} is not an address of this sidecar; "
            "add its name to RULE_SIDECAR_ALLOWED_HOSTS if it is"
        )
    origin = request.headers.get("Origin")
    if origin is None:
        return
    changes_state = request.method not in ("GET", "HEAD", "OPTIONS")
    opens_socket = request.headers.get("Upgrade", "").lower() == "websocket"
    if changes_state or opens_socket:
        try:
            source = urlsplit(origin)
            trusted = source.netloc == host or bool(source.netloc and source.hostname in allowed)
        except ValueError:  # not a URL (`http://[`): no origin of ours
            trusted = False
        if not trusted:
            raise web.HTTPForbidden(text=f"cross-origin request from {origin!r} refused")


# Browsers cannot set headers on a WebSocket; Kubernetes' API server takes the token as
# a subprotocol instead, and so do we: `base64url.bearer.authorization.k8s.io.<token>`,
# the token base64url-encoded without padding.
BEARER_PROTOCOL = "base64url.bearer.authorization.k8s.io."


def _protocol_token(request: web.Request) -> tuple[str, str] | None:
    """The subprotocol carrying a bearer token, and the token, if the client offered one."""
    offered = request.headers.get("Sec-WebSocket-Protocol", "")
    for protocol in (item.strip() for item in offered.split(",")):
        if protocol.startswith(BEARER_PROTOCOL):
            encoded = protocol.removeprefix(BEARER_PROTOCOL)
            try:
                token = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode()
            except (ValueError, UnicodeDecodeError):
                return None
            return protocol, token
    return None


def _bearer_is_admin(request: web.Request, token: str) -> bool:
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.encode(), token.encode())


def _caller(request: web.Request) -> Caller:
    token = _state(request).admin_token
    if token is not None and _bearer_is_admin(request, token):
        return Caller.ADMIN
    return Caller.ANONYMOUS


def _require_admin(request: web.Request, *, websocket: bool = False) -> str | None:
    """Refuse the request without the admin token (when one is configured).

    Returns the WebSocket subprotocol that carried the token, which the answer must
    select for a browser to accept the connection.
    """
    token = _state(request).admin_token
    if token is None or _bearer_is_admin(request, token):
        return None
    carried = _protocol_token(request) if websocket else None
    if carried is not None and hmac.compare_digest(carried[1].encode(), token.encode()):
        return carried[0]
    raise web.HTTPUnauthorized(
        text="a bearer token is required", headers={"WWW-Authenticate": "Bearer"}
    )


def _limit_rate(request: web.Request, action: Action) -> None:
    """Spend one request of the caller class's budget for `action`, or answer 429."""
    caller = _caller(request)
    wait = _state(request).budgets.acquire(caller, action)
    if wait > 0:
        raise LimitExceeded(
            429,
            f"too many {action.value} requests from {caller.value} callers",
            setting=RATE_SETTINGS[action],
            retry_after=max(1, round(wait)),
        )


def _body_seconds(request: web.Request) -> float:
    return _state(request).limits.body_timeout_seconds


async def _read_body(request: web.BaseRequest, seconds: float) -> bytes:
    """The body, or 408 when it does not arrive within `seconds` (`body_timeout_seconds`):
    aiohttp bounds a request's head (the idle timeout) but not its body, which a slow
    client could hold open forever."""
    try:
        if request.content.is_eof():  # all here already (most bodies): nothing to wait for
            return await request.read()
        async with asyncio.timeout(seconds):
            return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise LimitExceeded(
            413,
            f"the body is larger than {request.client_max_size} bytes",
            setting="max_body_bytes",
        ) from None
    except TimeoutError:
        raise LimitExceeded(
            408,
            f"the request body did not arrive within {seconds:g} s",
            setting="body_timeout_seconds",
        ) from None
    except ConnectionError:  # the client's, here: it left before its whole body came
        raise web.RequestPayloadError("the connection ended before the whole body came") from None


async def _json_body(
    request: web.BaseRequest, seconds: float, *, required: bool = True
) -> dict[str, Any]:
    if not request.can_read_body:
        if required:
            raise web.HTTPBadRequest(text="a JSON object body is required")
        return {}
    raw = await _read_body(request, seconds)
    try:
        body = loads(raw)
    except (ValueError, RecursionError) as exc:  # RecursionError: json nests too deep
        raise web.HTTPBadRequest(text=f"body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text="body must be a JSON object")
    return body


def _whole_number(value: Any) -> int | None:
    """`value` as an int if it is a whole JSON number. JSON has one number type: 7.0 is
    the integer 7, and so is 2^64, which a parser may hand over as a float."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _optional_id(body: dict[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is None or isinstance(value, str):
        return value
    number = _whole_number(value)
    if number is None:
        raise web.HTTPBadRequest(text=f"{key} must be a string or a whole number")
    return str(number)


def _flag(body: dict[str, Any], key: str, default: bool) -> bool:
    value = body.get(key, default)
    if not isinstance(value, bool):
        raise web.HTTPBadRequest(text=f"{key} must be true or false")
    return value


def _etag(snapshot: Snapshot, instance: str) -> str:
    """`"<revision>-<version>-<instance>"`. The version alone repeats after a restart, and
    the revision alone leaves out what a read shows besides the rules' content (the
    version, source locations, the version a change came from); within one instance a
    version is one immutable snapshot, so the instance id makes the tag name one body."""
    return f'"{snapshot.revision}-{snapshot.version}-{instance}"'


async def _cached(
    request: web.Request, snapshot: Snapshot, data: Callable[[], Any]
) -> web.Response:
    """Registry reads: ETag names the snapshot in this instance (`_etag`); If-None-Match
    answers 304; a large registry's answer is rendered once per version, off the event
    loop (`RenderCache`)."""
    state = _state(request)
    etag = _etag(snapshot, state.notifier.instance)
    given = {
        tag.strip().removeprefix("W/")
        for tag in request.headers.get("If-None-Match", "").split(",")
    }
    if etag in given or "*" in given:
        return web.Response(status=304, headers={"ETag": etag})
    body = await state.renders.get(
        snapshot.version, request.path_qs, len(snapshot.rules), lambda: dumpb(data())
    )
    return web.Response(body=body, content_type="application/json", headers={"ETag": etag})


def _record_response(record: ReloadRecord) -> web.Response:
    status = 422 if record.status is ReloadStatus.FAILED else 200
    return json_response(reload_view(record), status)


# Hot-reload endpoints (the hot-reload contract's)


async def get_status(request: web.Request) -> web.Response:
    state = _state(request)
    return json_response(status_view(state.service, writes=state.writes))


async def post_reload(request: web.Request) -> web.Response:
    _require_admin(request)
    _limit_rate(request, Action.RELOAD)
    body = await _json_body(request, _body_seconds(request), required=False)
    ruleset_id, rule_id = _optional_id(body, "ruleset_id"), _optional_id(body, "rule_id")
    force, validate = _flag(body, "force", False), _flag(body, "validate", True)
    record = await _state(request).service.reload_rules(
        force=force, validate=validate, ruleset_id=ruleset_id, rule_id=rule_id
    )
    return _record_response(record)


async def post_reload_rule(request: web.Request) -> web.Response:
    _require_admin(request)
    _limit_rate(request, Action.RELOAD)
    record = await _state(request).service.reload_rules(rule_id=request.match_info["rule_id"])
    return _record_response(record)


async def post_reload_ruleset(request: web.Request) -> web.Response:
    _require_admin(request)
    _limit_rate(request, Action.RELOAD)
    record = await _state(request).service.reload_rules(ruleset_id=request.match_info["ruleset_id"])
    return _record_response(record)


async def post_validate(request: web.Request) -> web.Response:
    """Read-only, so open like the reads. Without a body (or with a JSON object without
    `documents`): every source loaded as a reload would. With rule documents: those
    checked as part of the registry (`HotReloadService.validate_candidate`). Each form
    is rate-limited by a budget of its own, per caller class: the sources' validation
    waits for the reload lock, a candidate's compiles what a caller sent."""
    candidate = await _candidate(request)
    if candidate is None:
        _limit_rate(request, Action.VALIDATE)
        return json_response(validation_view(await _state(request).service.validate_reload()))
    _limit_rate(request, Action.CANDIDATE)
    serving = _serving(request)  # 503 while the first load runs: no registry to join yet
    if candidate.problems:
        check = CandidateCheck(
            problems=candidate.problems,
            changes=RulesetChanges(),
            cases_run=0,
            cases_passed=0,
            revision=None,
            current_revision=serving.revision,
        )
    else:
        check = await _while_connected(request, _check_candidate(_state(request), candidate))
    return json_response(candidate_view(check))


# How often a long handler looks whether its client is still there.
_CLIENT_POLL_SECONDS = 0.25


async def _while_connected(request: web.Request, work: Awaitable[_T]) -> _T:
    """`work`, cancelled once the client has left: aiohttp (without its
    `handler_cancellation`, which would cancel every handler, writes included) lets a
    handler run on for a client that is gone, and a candidate check should not compute
    for nobody, holding the one checker."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait([task], timeout=_CLIENT_POLL_SECONDS)
            if done:
                return task.result()
            transport = request.transport
            if transport is None or transport.is_closing():
                raise web.HTTPServiceUnavailable(text="the client left: its check was stopped")
    finally:
        if not task.done():
            task.cancel()
            await asyncio.wait([task])  # its cleanup (the checker killed) done
            if not task.cancelled():
                task.exception()


async def _check_candidate(state: AppState, candidate: Candidate) -> CandidateCheck:
    """The check, within `candidate_timeout_seconds` (503 naming it past that)."""
    seconds = state.limits.candidate_timeout_seconds
    try:
        return await state.service.validate_candidate(
            candidate.files, seconds=seconds, limits=candidate.limits
        )
    except TimeoutError:
        raise LimitExceeded(
            503,
            f"the check of the documents ran out of time ({seconds:g} s, waiting for the "
            "check before it included) and was stopped: send fewer or smaller documents, "
            "or retry later",
            setting="candidate_timeout_seconds",
            retry_after=1,
        ) from None


async def _candidate(request: web.Request) -> Candidate | None:
    """The rule documents of a validate request, or None for the validation of the
    sources; 415 for a body that is neither YAML nor JSON."""
    if not request.can_read_body:
        return None
    content_type = request.content_type
    if content_type not in YAML_TYPES and content_type != "application/json":
        raise web.HTTPUnsupportedMediaType(
            text=f"a body of {content_type} cannot be validated: send rule documents as "
            'application/yaml, or as application/json {"documents": [...]}'
        )
    body = await _read_body(request, _body_seconds(request))
    if not body:
        return None
    if content_type in YAML_TYPES:
        return yaml_candidate(body)
    return json_candidate(body, _state(request).service.loader.file_limits)


async def post_monitoring_start(request: web.Request) -> web.Response:
    _require_admin(request)
    state = _state(request)
    state.service.start()
    state.metrics.monitoring.set(1)
    return json_response({"monitoring_active": True})


async def post_monitoring_stop(request: web.Request) -> web.Response:
    _require_admin(request)
    state = _state(request)
    await state.service.stop()
    state.metrics.monitoring.set(0)
    return json_response({"monitoring_active": False})


def _query_limit(request: web.Request, default: int, name: str = "limit") -> int:
    try:
        limit = int(request.query.get(name, str(default)))
    except ValueError:
        limit = -1
    if limit < 0:
        raise web.HTTPBadRequest(text=f"{name} must be a whole number")
    return limit


async def get_history(request: web.Request) -> web.Response:
    history = history_view(_state(request).service, _query_limit(request, 50))
    return json_response({"history": history, "count": len(history)})


async def post_rollback(request: web.Request) -> web.Response:
    _require_admin(request)
    _limit_rate(request, Action.RELOAD)
    body = await _json_body(request, _body_seconds(request), required=False)
    version = body.get("version")
    if version is not None:
        version = _whole_number(version)
        if version is None:
            raise web.HTTPBadRequest(text="version must be an integer")
    return _record_response(await _state(request).service.rollback(version))


# Health


async def get_health(request: web.Request) -> web.Response:
    state = _state(request)
    service = state.service
    health = service.health()
    if state.decisions is not None:
        health = with_problem(health, state.decisions.problem())
    return json_response(
        health_view(service, health), 503 if health.status is HealthStatus.UNHEALTHY else 200
    )


async def get_livez(request: web.Request) -> web.Response:
    return json_response({"status": "alive"})


async def get_readyz(request: web.Request) -> web.Response:
    """Ready once a snapshot is serving and the first load has ended; stays ready
    through later failed reloads."""
    ready = _state(request).service.ready
    return json_response({"ready": ready}, 200 if ready else 503)


# Registry reads and evaluation


_T = TypeVar("_T")


def _find(items: Mapping[str, _T], kind: str, request: web.Request) -> _T:
    """The item named by the path's `{kind}_id`, or a 404."""
    item_id = request.match_info[f"{kind}_id"]
    item = items.get(item_id)
    if item is None:
        raise NotFoundError(kind, item_id)
    return item


def _serving(request: web.Request) -> Snapshot:
    return _serving_of(_state(request))


def _serving_of(state: AppState) -> Snapshot:
    """What serves, for a registry read; 503 while the first load runs (the listeners
    open before it): an empty answer would say there are no rules. After a first load
    that failed, reads answer what serves (nothing), as health and /readyz say."""
    snapshot = state.registry.current
    starting = state.service.starting() if snapshot.version == 0 else None
    if starting is None:
        return snapshot
    raise web.HTTPServiceUnavailable(text=starting_message(starting), headers={"Retry-After": "1"})


@dataclass(frozen=True, slots=True)
class _Page:
    """`offset` and `limit` of a listing: a dashboard of 5,000 rulesets reads 50 at a time
    instead of every one on every reload. Without them a listing answers everything."""

    offset: int
    limit: int | None

    @classmethod
    def of(cls, request: web.Request) -> _Page:
        offset = _query_limit(request, 0, "offset")
        limit = _query_limit(request, 0, "limit") if "limit" in request.query else None
        return cls(offset, limit)

    def cut(self, items: Sequence[_T]) -> Sequence[_T]:
        end = None if self.limit is None else self.offset + self.limit
        return items[self.offset : end]


def _listing(
    snapshot: Snapshot,
    key: str,
    items: Sequence[_T],
    page: _Page,
    view: Callable[[_T], dict[str, Any]],
) -> dict[str, Any]:
    """The page of `items` asked for, each as `view` shows it; `total` counts them all."""
    shown = [view(item) for item in page.cut(items)]
    return {
        "registry_version": snapshot.version,
        "revision": snapshot.revision,
        "count": len(shown),
        "total": len(items),
        key: shown,
    }


def _rule_mentions(rule: Rule, needle: str) -> bool:
    """Whether `needle` (case-folded) is in what the dashboard's filter searches."""
    where = rule.location.file if rule.location else ""
    fields = (rule.id, rule.name, rule.condition, rule.ruleset_id, *rule.tags, where)
    return any(needle in field.casefold() for field in fields)


async def get_rules(request: web.Request) -> web.Response:
    snapshot = _serving(request)
    ruleset_id = request.query.get("ruleset_id")
    tag = request.query.get("tag")
    needle = request.query.get("q", "").casefold()
    page = _Page.of(request)

    def body() -> dict[str, Any]:
        rules = [
            rule
            for rule in snapshot.rules.values()
            if (ruleset_id is None or rule.ruleset_id == ruleset_id)
            and (tag is None or tag in rule.tags)
            and (not needle or _rule_mentions(rule, needle))
        ]
        return _listing(snapshot, "rules", rules, page, Rule.to_dict)

    return await _cached(request, snapshot, body)


async def get_rule(request: web.Request) -> web.Response:
    snapshot = _serving(request)
    return await _cached(request, snapshot, _find(snapshot.rules, "rule", request).to_dict)


async def get_changes(request: web.Request) -> web.Response:
    """What the current version changed, each change with the rule or ruleset before and
    after it: the diff a person checks after a rollout."""
    limit = _query_limit(request, 1000)
    _serving(request)
    old, new = _state(request).registry.last_change()

    def body() -> dict[str, Any]:
        changes = diff_snapshots(old, new)
        return {
            "from_version": old.version,
            "to_version": new.version,
            "revision": new.revision,
            "count": len(changes),
            "changes": [_change_view(change, old, new) for change in changes[:limit]],
        }

    return await _cached(request, new, body)


def _change_view(change: ChangeEvent, old: Snapshot, new: Snapshot) -> dict[str, Any]:
    return {**change.to_dict(), "before": _changed(old, change), "after": _changed(new, change)}


def _changed(snapshot: Snapshot, change: ChangeEvent) -> dict[str, Any] | None:
    """The changed rule, or ruleset without its rules, as `snapshot` holds it."""
    if change.rule_id is not None:
        rule = snapshot.rules.get(change.rule_id)
        return rule.to_dict() if rule else None
    if change.ruleset_id is not None:
        ruleset = snapshot.rulesets.get(change.ruleset_id)
        return ruleset.to_dict(with_rules=False) if ruleset else None
    return None


def _summary(ruleset: RuleSet) -> dict[str, Any]:
    return ruleset.to_dict(with_rules=False)


async def get_rulesets(request: web.Request) -> web.Response:
    snapshot = _serving(request)

    page = _Page.of(request)

    def body() -> dict[str, Any]:
        rulesets = list(snapshot.rulesets.values())
        return _listing(snapshot, "rulesets", rulesets, page, _summary)

    return await _cached(request, snapshot, body)


async def get_ruleset(request: web.Request) -> web.Response:
    """A ruleset stored in the database also carries its `row_version`, and as its ETag
    (what `If-Match` of a write names), while what serves is what the database holds.
    `Accept: application/yaml` gives its document instead (`_ruleset_document`)."""
    snapshot = _serving(request)
    ruleset = _find(snapshot.rulesets, "ruleset", request)
    version = _state(request).service.row_version(snapshot, ruleset.id)
    if _wants_yaml(request.headers.get("Accept", "")):
        etag = _etag(snapshot, _state(request).notifier.instance) if version is None else None
        return await _ruleset_document(ruleset, f'"{version}"' if etag is None else etag)
    if version is None:
        response = await _cached(request, snapshot, ruleset.to_dict)
    else:
        etag = f'"{version}"'
        if etag in _tags(request.headers.get("If-None-Match", "")):
            response = web.Response(status=304, headers={"ETag": etag})
        else:
            body = {**ruleset.to_dict(), "row_version": version}
            response = json_response(body, headers={"ETag": etag})
    response.headers["Vary"] = "Accept"
    return response


def _wants_yaml(accept: str) -> bool:
    """Whether `Accept` prefers a YAML type to JSON (by its q-values; JSON on a tie)."""
    best = {"yaml": 0.0, "json": 0.0}
    for item in accept.split(","):
        media, *parameters = (part.strip().lower() for part in item.split(";"))
        kind = "yaml" if media in YAML_TYPES else "json" if media == "application/json" else None
        if kind is None:
            continue
        quality = 1.0
        for parameter in parameters:
            name, _, value = parameter.partition("=")
            if name.strip() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        best[kind] = max(best[kind], quality)
    return best["yaml"] > best["json"]


async def _ruleset_document(ruleset: RuleSet, etag: str) -> web.Response:
    """The ruleset's canonical document as YAML text: what a `PUT` takes back, with the
    ETag of its JSON form (for a ruleset of the database, its row version). Never 304
    and never stored by a cache (an editor must start from what the database holds);
    written off the event loop (a ruleset may be megabytes)."""
    text = await asyncio.to_thread(yaml_text, [ruleset.to_document()])
    headers = {"Vary": "Accept", "Cache-Control": "no-store", "ETag": etag}
    return web.Response(
        text=text, content_type="application/yaml", charset="utf-8", headers=headers
    )


# Writes (the database source)

_WRITE_REFUSED = "the write would leave rules that do not load: nothing was written"


def _tags(header: str) -> set[str]:
    return {tag.strip().removeprefix("W/") for tag in header.split(",") if tag.strip()}


def _writer(request: web.Request, allow: Sequence[str]) -> RuleWriter:
    """The writer, once the caller may write: 405 without a database source, 403
    without an admin token configured, 401 without the token, 429 past the budget."""
    state = _state(request)
    if state.writer is None:
        raise web.HTTPMethodNotAllowed(request.method, allow, text=NO_DATABASE)
    if state.admin_token is None:
        raise web.HTTPForbidden(text=NO_TOKEN)
    _require_admin(request)
    _limit_rate(request, Action.RELOAD)
    return state.writer


def _actor(request: web.Request) -> str | None:
    actor = request.headers.get("X-Actor")
    if actor is not None and (problem := actor_problem(actor)) is not None:
        raise web.HTTPBadRequest(text=problem)
    return actor


def _precondition(request: web.Request, *, create: bool, required: bool) -> Precondition | None:
    """`If-Match: "<row_version>"`, or (`create`) `If-None-Match: *`; 428 when
    `required` and neither is given, 400 when one cannot be read."""
    match, none_match = request.headers.get("If-Match"), request.headers.get("If-None-Match")
    if match is not None and none_match is not None:
        raise web.HTTPBadRequest(text="give one of If-Match and If-None-Match, not both")
    if none_match is not None:
        if not create or none_match.strip() != "*":
            raise web.HTTPBadRequest(text="If-None-Match must be * (create only)")
        return Precondition(None)
    if match is None:
        if required:
            raise web.HTTPPreconditionRequired(
                text='a write needs If-Match: "<row_version>" (the ETag of the ruleset read)'
                + (", or If-None-Match: * to create it" if create else "")
            )
        return None
    tag = match.strip()
    version = tag[1:-1] if len(tag) > 2 and tag[0] == tag[-1] == '"' else ""
    # As the ETag writes it: a strong comparison is of the exact tag, so "06" is not "6".
    if not (version.isascii() and version.isdigit() and len(version) <= 19) or (
        version != str(int(version))
    ):
        raise web.HTTPBadRequest(text='If-Match must be one row version, e.g. If-Match: "3"')
    return Precondition(int(version))


async def _write_body(request: web.Request) -> SourceFile:
    """The one ruleset document a PUT carries, as the file the loader checks, named and
    located as validate names a candidate's (`request.yaml`, `request.json`, or
    `request#1.json` for `{"documents": [doc]}`): problems at their line and column."""
    kind = request.content_type
    if kind not in YAML_TYPES and kind != "application/json":
        raise web.HTTPUnsupportedMediaType(
            text="send the ruleset document as application/yaml or application/json"
        )
    raw = await _read_body(request, _body_seconds(request))
    if kind in YAML_TYPES:
        return yaml_candidate(raw).files[0]
    try:
        body = loads(raw)
    except (ValueError, RecursionError):
        return SourceFile(f"{BODY}.json", raw)  # the loader says where and why
    if isinstance(body, dict) and body.keys() == {"documents"}:
        documents = body["documents"]
        if not isinstance(documents, list) or len(documents) != 1:
            raise web.HTTPBadRequest(text="documents must be a list of one ruleset document")
        candidate = json_candidate(raw, _state(request).service.loader.file_limits)
        if candidate is None or candidate.problems or len(candidate.files) != 1:
            problems = "; ".join(p.message for p in candidate.problems) if candidate else ""
            raise web.HTTPBadRequest(text=problems or "documents must hold one ruleset document")
        return candidate.files[0]
    return SourceFile(f"{BODY}.json", raw)


async def _written(request: web.Request, write: Awaitable[Written]) -> web.Response:
    """200 once this sidecar serves the write; 202 when committed and not served yet."""
    try:
        written = await write
    except PreconditionFailed as exc:
        response = error_response(412, str(exc), row_version=exc.current)
        if exc.current is not None:
            response.headers["ETag"] = f'"{exc.current}"'
        return response
    except WriteRefused as exc:
        errors = [problem.to_rule_error() for problem in exc.problems]
        return error_response(422, _WRITE_REFUSED, errors=errors)
    except WriteFailed as exc:
        response = error_response(503, str(exc))
        response.headers["Retry-After"] = "1"
        return response
    headers = {} if written.row_version is None else {"ETag": f'"{written.row_version}"'}
    body: dict[str, Any] = {
        "row_version": written.row_version,
        "registry_version": written.registry_version,
    }
    if written.registry_version is not None:
        return json_response(body, headers=headers)
    return json_response({**body, "committed": True, "message": written.message}, 202, headers)


async def put_ruleset(request: web.Request) -> web.Response:
    writer = _writer(request, ("GET", "HEAD"))
    actor = _actor(request)
    precondition = _precondition(request, create=True, required=True)
    assert precondition is not None
    body = await _write_body(request)
    ruleset_id = request.match_info["ruleset_id"]
    return await _written(request, writer.put(ruleset_id, body, precondition, actor))


async def delete_ruleset(request: web.Request) -> web.Response:
    writer = _writer(request, ("GET", "HEAD"))
    actor = _actor(request)
    precondition = _precondition(request, create=False, required=True)
    assert precondition is not None
    ruleset_id = request.match_info["ruleset_id"]
    return await _written(request, writer.delete(ruleset_id, precondition, actor))


async def _set_enabled(request: web.Request, enabled: bool) -> web.Response:
    """If-Match is optional: enabling an enabled rule changes nothing, and two callers
    setting one flag cannot lose each other's change; when given, it is checked."""
    writer = _writer(request, ())
    actor = _actor(request)
    precondition = _precondition(request, create=False, required=False)
    rule_id = request.match_info["rule_id"]
    return await _written(request, writer.set_enabled(rule_id, enabled, precondition, actor))


async def post_enable_rule(request: web.Request) -> web.Response:
    return await _set_enabled(request, True)


async def post_disable_rule(request: web.Request) -> web.Response:
    return await _set_enabled(request, False)


async def get_ruleset_stats(request: web.Request) -> web.Response:
    """How often the ruleset's rules fired and what it decided, since its current content
    went live and since the sidecar started."""
    snapshot = _serving(request)
    ruleset = _find(snapshot.rulesets, "ruleset", request)
    stats = _state(request).metrics.tallies.stats(ruleset)
    return json_response({"registry_version": snapshot.version, **stats})


async def post_evaluate(request: web.Request) -> web.Response:
    return await _evaluate(_state(request), request, request.match_info["ruleset_id"])


async def _evaluate(state: AppState, request: web.BaseRequest, ruleset_id: str) -> web.Response:
    """`{"input": {...}}` → one result; `{"inputs": [...]}` → all from one version. Also
    answered by the front door (`open_front_door`), which has no route: the state and
    the id are given."""
    snapshot = _serving_of(state)
    ruleset = snapshot.rulesets.get(ruleset_id)
    if ruleset is None:
        raise NotFoundError("ruleset", ruleset_id)
    body = await _json_body(request, state.limits.body_timeout_seconds)
    if ("input" in body) == ("inputs" in body):
        raise web.HTTPBadRequest(text='give exactly one of "input" or "inputs"')
    explain = _explain_asked(request, body)
    if "inputs" in body:
        return await _evaluate_batch(state, snapshot, ruleset, body["inputs"], explain)
    started = time.perf_counter()
    try:
        result = evaluate_ruleset(
            ruleset,
            body["input"],
            version=snapshot.version,
            revision=snapshot.revision,
            explain=explain,
            explain_budget=state.limits.max_response_bytes,
            challenger=snapshot.challengers.get(ruleset.id),
        )
    except InputError as exc:
        raise InputError(exc.message, path=exc.path.replace("$", "$.input", 1)) from None
    except ExplanationTooLarge as exc:
        raise _explanation_too_large(exc) from None
    seconds = time.perf_counter() - started
    state.metrics.evaluation_time.observe(seconds)
    _count(state, snapshot, ruleset, result)
    answer = result.to_dict()
    if state.decisions is not None:
        answer["decision_id"] = state.decisions.record(result, body["input"], seconds)
    return json_response(answer)


def _count(state: AppState, snapshot: Snapshot, ruleset: RuleSet, result: Evaluation) -> None:
    """Count the evaluation (and its challenger's) unless a publish replaced the ruleset
    meanwhile: its counts would be taken for the new content's."""
    serving = state.registry.current
    if serving is snapshot and result.challenger is None:  # nearly always: no lookups
        state.metrics.tallies.count(ruleset, result)
    elif serving.rulesets.get(ruleset.id) is ruleset:
        state.metrics.tallies.count(ruleset, result)
        challenger, challenged = snapshot.challengers.get(ruleset.id), result.challenger
        if (
            challenger is not None
            and challenged is not None
            and serving.rulesets.get(challenger.id) is challenger
        ):
            state.metrics.tallies.count(challenger, challenged)


def _explanation_too_large(exc: ExplanationTooLarge) -> LimitExceeded:
    return LimitExceeded(
        413,
        f"{exc} (max_response_bytes): each rule shows the values it read, so an input "
        "with large fields read by many rules explains large; explain fewer or smaller inputs",
        setting="max_response_bytes",
    )


def _explain_asked(request: web.BaseRequest, body: dict[str, Any]) -> bool:
    """`?explain=true` or `"explain": true` in the body (either asks)."""
    asked = _flag(body, "explain", False) if "explain" in body else False
    if request.query_string:  # most requests have none: not parsed then
        value = request.query.get("explain")
        if value not in (None, "true", "false"):
            raise web.HTTPBadRequest(text="explain must be true or false")
        asked = asked or value == "true"
    return asked


async def _evaluate_batch(
    state: AppState, snapshot: Snapshot, ruleset: RuleSet, documents: Any, explain: bool
) -> web.Response:
    """Evaluate a batch in slices, within the request's limits.

    The batch is bounded three ways, each refusal naming its setting: its size up front
    (413), the wall-clock time it may take, waiting for its turn included (503), and the
    size of its answer (413), serialized slice by slice so that neither the results nor
    their JSON exist twice. One batch evaluates at a time, the others wait their turn:
    the loop then holds at most one slice of batch work between two other events, so
    probes and single evaluations wait one slice, not one per batch in flight (eight
    batches at once made /livez wait 50-200 ms); the total work is the same either way.
    """
    limits = state.limits
    if not isinstance(documents, list) or not documents:
        raise web.HTTPBadRequest(text='"inputs" must be a non-empty list')
    if len(documents) > limits.max_batch_items:
        raise LimitExceeded(
            413,
            f'"inputs" holds {len(documents)} items; at most {limits.max_batch_items} '
            "are evaluated per request: split the batch",
            setting="max_batch_items",
        )
    started = time.perf_counter()
    try:
        async with state.batches.wait(limits.max_evaluation_seconds):
            body = await _render_batch(
                state, snapshot, ruleset, documents, started, explain=explain
            )
    except TimeoutError:
        raise _out_of_time(limits, 0, len(documents)) from None
    state.metrics.evaluation_time.observe(time.perf_counter() - started)
    return web.Response(body=body, content_type="application/json")


def _out_of_time(limits: RequestLimits, done: int, total: int) -> LimitExceeded:
    return LimitExceeded(
        503,
        f"the batch ran out of time ({limits.max_evaluation_seconds:g} s) "
        f"after {done} of {total} inputs: split it, or retry later",
        setting="max_evaluation_seconds",
        retry_after=1,
    )


async def _render_batch(
    state: AppState,
    snapshot: Snapshot,
    ruleset: RuleSet,
    documents: list[Any],
    started: float,
    *,
    explain: bool,
) -> bytes:
    """The answer's JSON, built slice by slice within the time and size limits."""
    limits = state.limits
    deadline = started + limits.max_evaluation_seconds
    head = dumpb({"registry_version": snapshot.version, "revision": snapshot.revision})
    parts = [head[:-1], b',"results":[']
    size = sum(map(len, parts)) + 2
    done = 0

    def counted(evaluation: Evaluation) -> dict[str, Any]:
        _count(state, snapshot, ruleset, evaluation)
        return evaluation.to_dict()

    inputs: Sequence[Any] = documents
    render: Callable[[Evaluation], dict[str, Any]] = counted
    logged = None
    if state.decisions is not None:  # each result gets its decision id
        logged = BatchRecorder(state.decisions, documents, counted)
        inputs, render = logged.documents, logged.render
    slices = evaluate_in_slices(
        ruleset,
        inputs,
        render,
        version=snapshot.version,
        revision=snapshot.revision,
        explain=explain,
        explain_budget=limits.max_response_bytes,
        challenger=snapshot.challengers.get(ruleset.id),
    )
    try:
        async for part in slices:
            if done:
                parts.append(b",")
            parts.append(dumpb(part)[1:-1])
            size += len(parts[-1]) + 1
            done += len(part)
            if size > limits.max_response_bytes:
                raise LimitExceeded(
                    413,
                    f"the answer would exceed {limits.max_response_bytes} bytes "
                    f"({done} of {len(documents)} inputs gave {size}): split the batch",
                    setting="max_response_bytes",
                )
            if time.perf_counter() > deadline and done < len(documents):
                raise _out_of_time(limits, done, len(documents))
    except InputError as exc:
        raise InputError(exc.message, path=exc.path.replace("$", "$.inputs", 1)) from None
    except ExplanationTooLarge as exc:
        raise _explanation_too_large(exc) from None
    finally:
        await slices.aclose()
    if logged is not None:
        logged.submit()
    parts.append(b"]}")
    return b"".join(parts)


async def get_metrics(request: web.Request) -> web.Response:
    state = _state(request)
    service = state.service
    state.metrics.observe_watches((s.name for s in service.sources), service.watch_problems())
    state.metrics.observe_drift(service.drift)
    state.metrics.asyncio_tasks.set(len(asyncio.all_tasks()))
    saved = service.state.status().ok if service.state is not None else None
    if saved is not None:
        state.metrics.state_saved.set(saved)
    return web.Response(body=state.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def websocket(request: web.Request) -> web.StreamResponse:
    protocol = _require_admin(request, websocket=True)
    return await _state(request).notifier.handle(request, protocol=protocol)


def _wire_events(state: AppState) -> None:
    """Reload records, load stages and registry changes become WebSocket messages and
    metrics."""

    def on_reload(record: ReloadRecord) -> None:
        state.metrics.observe_reload(record)
        if record.status is ReloadStatus.FAILED:
            state.notifier.broadcast("reload_failed", reload_view(record))
        elif record.status in (ReloadStatus.SUCCESS, ReloadStatus.RESTORED):
            state.notifier.broadcast("rules_reloaded", reload_view(record))

    def on_publish(snapshot: Snapshot, events: Sequence[ChangeEvent]) -> None:
        state.metrics.tallies.retain(snapshot)
        for change in events:
            state.notifier.broadcast(change.type.value, change.to_dict())

    state.service.add_listener(on_reload)
    state.service.loader.add_stage_listener(state.metrics.observe_load_stages)
    state.registry.subscribe(on_publish)


def _observation_routes() -> list[web.RouteDef]:
    """What the kubelet and Prometheus read: no rules, no admin, nothing that changes."""
    return [
        web.get("/health/hot-reload", get_health),
        web.get("/livez", get_livez),
        web.get("/readyz", get_readyz),
        web.get("/metrics", get_metrics),
    ]


def create_observation_app(state: AppState) -> web.Application:
    """The separate listener for probes and metrics (`--metrics-port`), so that the API
    can stay on loopback while the kubelet and Prometheus reach the pod IP."""
    app = web.Application(middlewares=[serving(guard_browsers=False)], client_max_size=1024)
    app[STATE] = state
    app.add_routes(_observation_routes())
    return app


def create_app(state: AppState, *, max_body_bytes: int = 1024 * 1024) -> web.Application:
    app = web.Application(
        middlewares=[serving(guard_browsers=True)],
        client_max_size=max_body_bytes,
    )
    app[STATE] = state
    _wire_events(state)
    routes = [
        *_observation_routes(),
        web.get(f"{HOT}/status", get_status),
        web.post(f"{HOT}/reload", post_reload),
        web.post(f"{HOT}/reload/rule/{{rule_id}}", post_reload_rule),
        web.post(f"{HOT}/reload/ruleset/{{ruleset_id}}", post_reload_ruleset),
        web.post(f"{HOT}/validate", post_validate),
        web.post(f"{HOT}/monitoring/start", post_monitoring_start),
        web.post(f"{HOT}/monitoring/stop", post_monitoring_stop),
        web.get(f"{HOT}/history", get_history),
        web.get(f"{HOT}/changes", get_changes),
        web.post(f"{HOT}/rollback", post_rollback),
        web.get("/api/v1/rules", get_rules),
        web.get("/api/v1/rules/{rule_id}", get_rule),
        web.get("/api/v1/rulesets", get_rulesets),
        web.get("/api/v1/rulesets/{ruleset_id}", get_ruleset),
        web.put("/api/v1/rulesets/{ruleset_id}", put_ruleset),
        web.delete("/api/v1/rulesets/{ruleset_id}", delete_ruleset),
        web.post("/api/v1/rules/{rule_id}/enable", post_enable_rule),
        web.post("/api/v1/rules/{rule_id}/disable", post_disable_rule),
        web.get("/api/v1/rulesets/{ruleset_id}/stats", get_ruleset_stats),
        web.post("/api/v1/rulesets/{ruleset_id}/evaluate", post_evaluate),
        web.get("/ws/hot-reload", websocket),
        *ui_routes(),
    ]
    app.add_routes(routes)
    return app

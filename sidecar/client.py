"""A small client for applications that query the sidecar over localhost.

It mirrors the hot-reload contract's integration helpers (`execute_rules_from_registry`,
`get_rules_from_registry`, `validate_registry_rules`, `get_registry_info`,
`is_registry_fresh`) over HTTP, and subscribes to reload events over the WebSocket,
reconnecting by itself and resuming from the last sequence number it saw.

Neither what the application passes nor what comes back can steer or flood it:

- A ruleset id is checked against the ruleset schema's own `metadata.id` before anything
  is sent (an id the sidecar could never serve, such as `../rules/hot-reload/monitoring/stop?`,
  is refused), and yarl builds every path segment and query value, escaped.
- The admin token goes only with the calls that need it (the reload POSTs and the
  WebSocket), never with reads, validations or evaluations; no redirect is followed.
- An answer is read up to `max_answer_bytes` and no further, uncompressed (a compressed
  answer could expand past any limit), and checked against the shape this module
  promises (the `TypedDict`s below) before it is returned.

Everything the client raises is a `RuleClientError`:

    RuleClientError
     ├── InvalidId               an id the sidecar's schema refuses; nothing was sent
     │                           (also a ValueError)
     └── SidecarError            an error status (.status, .message, .body), or nothing
          │                      reachable at the address (.status 0)
          ├── PreconditionFailed a write's If-Match is stale (412; .row_version: the stored one)
          ├── WriteRefused       a write the rules would not survive (422; .errors), nothing written
          └── MalformedAnswer    an answer that is not what the API promises: not JSON, a
               │                 wrong shape, a missing field (.status of the answer; 0 on
               │                 the WebSocket)
               └── AnswerTooLarge    longer than `max_answer_bytes`

An application that already handles `SidecarError` (the sidecar cannot help now) handles
a malformed answer the same way, which is the safe reading of one.

`AsyncRuleClient` is the one implementation. `RuleClient` is its synchronous face for
code without an event loop: it runs the same coroutines on a private loop in a
background thread (never a second copy of the logic).
"""

from __future__ import annotations

import asyncio
import functools
import json
import random
import re
import threading
import types
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from typing import (
    Any,
    Final,
    TypedDict,
    TypeVar,
    get_args,
    get_origin,
    get_type_hints,
    is_typeddict,
)

import aiohttp
import jsonschema
from yarl import URL

__all__ = [
    "DEFAULT_MAX_ANSWER_BYTES",
    "AnswerTooLarge",
    "AsyncRuleClient",
    "BatchEvaluation",
    "CandidateValidation",
    "Evaluation",
    "Event",
    "Health",
    "InvalidId",
    "MalformedAnswer",
    "Match",
    "PreconditionFailed",
    "RegistryInfo",
    "ReloadRecord",
    "ResyncRequired",
    "Rule",
    "RuleClient",
    "RuleClientError",
    "SidecarError",
    "Status",
    "Validation",
    "WriteRefused",
    "Written",
]

DEFAULT_URL = "http://localhost:8000"
# Past the largest answer the sidecar gives for a large registry (a listing of 50,000
# rules is about 18 MB) and its batch answers (8 MiB at most); raise it for more.
DEFAULT_MAX_ANSWER_BYTES: Final = 32 * 1024 * 1024
# Decoding and checking an answer past this takes milliseconds: done in a worker thread,
# so that the application's event loop keeps serving meanwhile.
_DECODE_IN_THREAD_BYTES: Final = 1024 * 1024
_HOT: Final = ("api", "v1", "rules", "hot-reload")
_RESYNC: Final = "resync_required"
# What a sidecar's instance id may be (it draws 16 hex digits): it goes back into the URL.
_INSTANCE: Final = re.compile(r"[0-9A-Za-z_-]{1,64}")
_T = TypeVar("_T")


# Errors


class RuleClientError(Exception):
    """Anything the client raises."""


class InvalidId(RuleClientError, ValueError):
    """An id the sidecar's schema refuses (so no ruleset can have it); nothing was sent."""


class SidecarError(RuleClientError):
    """The sidecar answered with an error status (or could not be reached: status 0)."""

    def __init__(self, status: int, message: str, body: Any = None) -> None:
        super().__init__(f"{status}: {message}" if status else message)
        self.status = status
        self.message = message
        self.body = body


class PreconditionFailed(SidecarError):
    """A write's precondition failed (412): the ruleset is at `row_version` (None: absent)."""

    def __init__(self, message: str, body: Any, row_version: int | None) -> None:
        super().__init__(412, message, body)
        self.row_version = row_version


class WriteRefused(SidecarError):
    """A write the rules would not survive (422): `errors`, located; nothing was written."""

    def __init__(self, message: str, body: Any, errors: list[dict[str, Any]]) -> None:
        super().__init__(422, message, body)
        self.errors = errors


class MalformedAnswer(SidecarError):
    """An answer that is not what the API promises; the message says what was wrong."""


class AnswerTooLarge(MalformedAnswer):
    """An answer longer than the client's `max_answer_bytes`: it was not read further."""


# What the client returns: the fields it promises, checked on every answer. The sidecar's
# answers carry more (schemas/openapi.yaml); they are returned too, unchecked.


class Match(TypedDict):
    id: str
    name: str
    points: int
    priority: int


class Evaluation(TypedDict):
    ruleset_id: str
    registry_version: int
    revision: str
    total_points: int
    decision: str | None
    matched: list[Match]
    errors: list[dict[str, Any]]


class BatchEvaluation(TypedDict):
    registry_version: int
    revision: str
    results: list[Evaluation]


class Rule(TypedDict):
    id: str
    ruleset_id: str
    name: str
    condition: str
    points: int
    priority: int
    enabled: bool


class _RuleList(TypedDict):
    registry_version: int
    revision: str
    rules: list[Rule]


class Written(TypedDict):
    """A write's answer: the ruleset's row version after it (None: deleted), and the
    registry version serving it (None: committed, not served yet: HTTP 202)."""

    row_version: int | None
    registry_version: int | None


class _Stale(TypedDict):
    message: str
    row_version: int | None


class _StaleAnswer(TypedDict):
    error: _Stale


class _Refusal(TypedDict):
    message: str
    errors: list[dict[str, Any]]


class _RefusalAnswer(TypedDict):
    error: _Refusal


class RegistryInfo(TypedDict):
    version: int
    revision: str
    rule_count: int
    ruleset_count: int
    last_reload: str | None


class Status(TypedDict):
    monitoring_active: bool
    last_successful_check_time: str | None
    registry: RegistryInfo


class Validation(TypedDict):
    valid: bool
    errors: list[dict[str, Any]]


class CandidateChanges(TypedDict):
    added: list[str]
    changed: list[str]
    unchanged: list[str]
    removed: list[str]
    rules: dict[str, list[str]]


class CandidateTests(TypedDict):
    run: int
    passed: int
    failed: int


class CandidateValidation(TypedDict):
    valid: bool
    errors: list[dict[str, Any]]
    changes: CandidateChanges
    tests: CandidateTests
    revision: str | None
    current_revision: str


class ReloadRecord(TypedDict):
    status: str
    version_before: int
    version_after: int
    errors: list[dict[str, Any]]


class Health(TypedDict):
    status: str
    checks: dict[str, Any]


class _ErrorDetail(TypedDict):
    message: str


class _ErrorAnswer(TypedDict):
    error: _ErrorDetail


class _EnvelopeFields(TypedDict):
    event_type: str
    seq: int
    timestamp: str
    data: dict[str, Any]


class _Envelope(_EnvelopeFields, total=False):
    instance: str  # sidecars before instances did not send it


# Checking an answer against its shape. Each shape is compiled once into a function that
# raises `_Mismatch` on the first thing that does not fit; the path to it is only spelt
# out on the way up, so a 50,000-rule listing costs no string per field.

_Check = Callable[[object], None]


class _Mismatch(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        self.path: list[str] = []  # innermost step first

    def where(self) -> str:
        return "".join(reversed(self.path)).removeprefix(".")


_JSON_TYPES: Final[dict[Any, tuple[tuple[type, ...], str]]] = {
    str: ((str,), "a string"),
    int: ((int,), "an integer"),  # JSON's true is a bool, never an int here
    float: ((int, float), "a number"),
    bool: ((bool,), "true or false"),
    types.NoneType: ((types.NoneType,), "null"),
}


def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


@functools.cache
def _checker(expected: Any) -> _Check:
    """The check of a decoded JSON value against `expected`: a TypedDict (its keys, the
    required ones present), `list[...]`, `dict[str, Any]`, a union of JSON types, a JSON
    type, or Any."""
    origin = get_origin(expected)
    if expected is Any:
        return lambda _value: None
    if is_typeddict(expected):
        return _object_checker(expected)
    if origin is dict:
        return _types_checker((dict,), "an object")
    if origin is list:
        return _list_checker(_checker(get_args(expected)[0]))
    options = get_args(expected) if origin is types.UnionType else (expected,)
    accepted = tuple(kind for option in options for kind in _JSON_TYPES[option][0])
    return _types_checker(accepted, " or ".join(_JSON_TYPES[option][1] for option in options))


def _types_checker(accepted: tuple[type, ...], name: str) -> _Check:
    def check(value: object) -> None:
        if type(value) not in accepted:
            raise _Mismatch(f"expected {name}, got {_type_name(value)}")

    return check


def _object_checker(shape: Any) -> _Check:
    required = shape.__required_keys__
    fields = [(key, _checker(kind), key in required) for key, kind in get_type_hints(shape).items()]

    def check(value: object) -> None:
        if type(value) is not dict:
            raise _Mismatch(f"expected an object, got {_type_name(value)}")
        for key, check_field, needed in fields:
            if key in value:
                try:
                    check_field(value[key])
                except _Mismatch as exc:
                    exc.path.append(f".{key}")
                    raise
            elif needed:
                raise _Mismatch(f"the field {key!r} is missing")

    return check


def _list_checker(check_item: _Check) -> _Check:
    def check(value: object) -> None:
        if type(value) is not list:
            raise _Mismatch(f"expected a list, got {_type_name(value)}")
        for index, item in enumerate(value):
            try:
                check_item(item)
            except _Mismatch as exc:
                exc.path.append(f"[{index}]")
                raise

    return check


def _decode(raw: bytes, shape: Any, where: str) -> Any:
    """The JSON in `raw`, checked against `shape`; MalformedAnswer otherwise."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # not JSON, not UTF-8, nested too deep
        raise MalformedAnswer(0, f"{where}: not a JSON answer ({exc}): {raw[:200]!r}") from None
    try:
        _checker(shape)(data)
    except _Mismatch as exc:
        path = exc.where()
        raise MalformedAnswer(0, f"{where}: {path + ': ' if path else ''}{exc.message}") from None
    return data


# Ids


@functools.cache
def _id_validator() -> Any:
    """The ruleset schema's own rule for `metadata.id` (the id every API path uses)."""
    text = resources.files("sidecar").joinpath("schemas/ruleset.schema.json").read_text("utf-8")
    schema = json.loads(text)["properties"]["metadata"]["properties"]["id"]
    return jsonschema.Draft202012Validator(schema)


def _precondition(row_version: int | None, *, create: bool) -> dict[str, str]:
    """The precondition header of a write: the version expected, or (create) none."""
    if row_version is None and create:
        return {"If-None-Match": "*"}
    if isinstance(row_version, bool) or not isinstance(row_version, int) or row_version < 0:
        raise ValueError(f"row_version must be a whole number, not {_short(row_version)}")
    return {"If-Match": f'"{row_version}"'}


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."


def _ruleset_id(value: object) -> str:
    """`value` as the sidecar spells the id; InvalidId when no ruleset can have it."""
    if not _id_validator().is_valid(value):
        raise InvalidId(
            f"{_short(value)} is not a ruleset id (1-63 of a-z 0-9 . _ -, starting with a letter "
            "or digit, or a whole number): no ruleset has it, so nothing was sent"
        )
    return str(value)


# Events


@dataclass(frozen=True, slots=True)
class Event:
    """One WebSocket message; `event_type` decides the shape of `data`
    (`WebSocketMessage` in schemas/openapi.yaml). `seq` counts in `instance` (the
    sidecar's, drawn at each start; None from sidecars that do not send it): together
    they are the position to resume from."""

    event_type: str
    seq: int
    timestamp: str
    data: dict[str, Any]
    instance: str | None = None


@dataclass(frozen=True, slots=True)
class ResyncRequired(Event):
    """The stream cannot give what was missed: re-read what you keep (the registry, its
    version) now; events go on from here.

    `data` is the sidecar's (`reason`: `too_old`, the gap is older than its replay buffer;
    `other_instance`, it restarted, or another replica answers; `no_instance`, a bare
    `last_seq`; with `last_seq`, `oldest_available`, `current_seq`), or the client's own
    when the sidecar did not say so but its messages cannot follow the last one seen
    (`reason` `other_instance` or `seq_went_back`, `last_seq`, `current_seq`,
    `detected_by: "client"`)."""


def _event(text: str, where: str) -> Event:
    envelope: _Envelope = _decode(text.encode(), _Envelope, where)
    if envelope["seq"] < 0:
        raise MalformedAnswer(0, f"{where}: seq: negative ({envelope['seq']})")
    instance = envelope.get("instance")
    if instance is not None and not _INSTANCE.fullmatch(instance):
        raise MalformedAnswer(0, f"{where}: instance: not an instance id: {instance[:80]!r}")
    kind = ResyncRequired if envelope["event_type"] == _RESYNC else Event
    return kind(
        envelope["event_type"], envelope["seq"], envelope["timestamp"], envelope["data"], instance
    )


def _unannounced_gap(
    instance: str | None, last_seq: int | None, event: Event
) -> dict[str, Any] | None:
    """Why `event` cannot follow the message seen last (`instance`, `last_seq`) although
    the sidecar did not say `resync_required` (a sidecar that counts anew after a restart
    without knowing instances); None when it can."""
    if last_seq is None or isinstance(event, ResyncRequired):
        return None
    if instance is not None and event.instance != instance:
        reason = "other_instance"
    elif event.seq < last_seq:
        reason = "seq_went_back"
    else:
        return None
    return {
        "reason": reason,
        "last_seq": last_seq,
        "current_seq": event.seq,
        "detected_by": "client",
    }


class AsyncRuleClient:
    """Talks to one sidecar. Use as `async with AsyncRuleClient() as client:`.

    `token`: the admin token, sent only with `reload` and `events`. `timeout`: seconds
    per call. `max_answer_bytes`: the longest answer (or WebSocket message) read.
    """

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        token: str | None = None,
        timeout: float = 5.0,
        max_answer_bytes: int = DEFAULT_MAX_ANSWER_BYTES,
    ) -> None:
        url = URL(base_url)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"base_url must be an http(s) URL, not {base_url!r}")
        if url.user is not None or url.password is not None or url.query_string or url.fragment:
            # credentials there would go with every call; a query or fragment, nowhere sane
            raise ValueError("base_url takes no user, password, query or fragment")
        if max_answer_bytes < 1:
            raise ValueError("max_answer_bytes must be at least 1")
        self.base_url = str(url).rstrip("/")
        self.max_answer_bytes = max_answer_bytes
        self._base = URL(self.base_url)
        self._admin = {"Authorization": f"Bearer {token}"} if token else {}
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> AsyncRuleClient:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # Uncompressed only: a compressed answer could expand past any limit.
            self._session = aiohttp.ClientSession(
                timeout=self._timeout,
                auto_decompress=False,
                headers={"Accept-Encoding": "identity"},
                cookie_jar=aiohttp.DummyCookieJar(),  # nothing an answer says is sent back
            )
        return self._session

    def _url(self, *segments: str, **query: str) -> URL:
        url = self._base.joinpath(*segments)
        return url.with_query(query) if query else url

    async def _call(
        self,
        method: str,
        url: URL,
        shape: Any,
        body: Any = None,
        *,
        admin: bool = False,
        answers: frozenset[int] = frozenset(),
        headers: Mapping[str, str] | None = None,
        data: bytes | None = None,
    ) -> Any:
        """The answer, checked against `shape`. `admin`: send the token. `answers`: error
        statuses whose body is the answer itself (a failed reload's record, an unhealthy
        health report), not an error. `data`: a body sent as it is (not `body`'s JSON)."""
        where = f"{method} {url.path}"
        sent = {**(self._admin if admin else {}), **(headers or {})}
        options: dict[str, Any] = {"data": data} if data is not None else {"json": body}
        try:
            async with self._client().request(
                method, url, headers=sent, allow_redirects=False, **options
            ) as response:
                raw = await self._read(response, where)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise SidecarError(0, f"sidecar at {self.base_url} not reachable: {exc!r}") from exc
        status = response.status
        if status >= 400 and status not in answers:
            raise self._error(status, response.reason or "", raw)
        if not 200 <= status < 300 and status not in answers:
            raise MalformedAnswer(status, f"{where}: unexpected status {status}")
        try:
            if len(raw) > _DECODE_IN_THREAD_BYTES:
                return await asyncio.to_thread(_decode, raw, shape, where)
            return _decode(raw, shape, where)
        except MalformedAnswer as exc:
            raise MalformedAnswer(status, exc.message) from None

    async def _read(self, response: aiohttp.ClientResponse, where: str) -> bytes:
        """The body, up to `max_answer_bytes`; never more is read or kept."""
        limit = self.max_answer_bytes
        encoding = response.headers.get("Content-Encoding", "identity").lower()
        if encoding != "identity":
            raise MalformedAnswer(response.status, f"{where}: a {encoding} answer, not asked for")
        declared = response.content_length
        if declared is not None and declared > limit:
            raise AnswerTooLarge(
                response.status, f"{where}: the answer is {declared} bytes, past {limit}"
            )
        body = bytearray()
        async for chunk in response.content.iter_any():
            body += chunk
            if len(body) > limit:
                raise AnswerTooLarge(response.status, f"{where}: the answer is past {limit} bytes")
        return bytes(body)

    def _error(self, status: int, reason: str, raw: bytes) -> SidecarError:
        """The error an error status stands for, with the sidecar's message when it has one."""
        try:
            body: _ErrorAnswer = _decode(raw, _ErrorAnswer, "error")
        except MalformedAnswer:
            return SidecarError(status, reason)
        return SidecarError(status, body["error"]["message"], body)

    # The hot-reload contract's helpers

    async def execute_rules_from_registry(self, data: Any, ruleset_id: str | int) -> Evaluation:
        """Evaluate one input: matched, total_points, decision, registry_version, errors."""
        url = self._url("api", "v1", "rulesets", _ruleset_id(ruleset_id), "evaluate")
        result: Evaluation = await self._call("POST", url, Evaluation, {"input": data})
        return result

    async def evaluate_many(self, inputs: list[Any], ruleset_id: str | int) -> BatchEvaluation:
        """Evaluate a batch against one registry version."""
        url = self._url("api", "v1", "rulesets", _ruleset_id(ruleset_id), "evaluate")
        result: BatchEvaluation = await self._call("POST", url, BatchEvaluation, {"inputs": inputs})
        return result

    async def get_rules_from_registry(
        self, ruleset_id: str | int | None = None, *, include_disabled: bool = False
    ) -> list[Rule]:
        query = {} if ruleset_id is None else {"ruleset_id": _ruleset_id(ruleset_id)}
        listing: _RuleList = await self._call(
            "GET", self._url("api", "v1", "rules", **query), _RuleList
        )
        return [rule for rule in listing["rules"] if include_disabled or rule["enabled"]]

    async def _status(self) -> Status:
        status: Status = await self._call("GET", self._url(*_HOT, "status"), Status)
        return status

    async def get_registry_info(self) -> RegistryInfo:
        """version, revision, rule_count, ruleset_count, last_reload."""
        return (await self._status())["registry"]

    async def is_registry_fresh(self, max_age_seconds: float = 300) -> bool:
        """Whether the sidecar read every source successfully, and confirmed what it
        serves, within `max_age_seconds` (whether or not the rules changed)."""
        last = (await self._status())["last_successful_check_time"]
        if last is None:
            return False
        try:
            checked = datetime.fromisoformat(last)
        except ValueError:
            raise MalformedAnswer(200, f"last_successful_check_time: {last!r}") from None
        if checked.tzinfo is None:
            raise MalformedAnswer(200, f"last_successful_check_time without offset: {last!r}")
        return (datetime.now(UTC) - checked).total_seconds() <= max_age_seconds

    async def validate_registry_rules(self) -> Validation:
        """Load every source as a reload would, without publishing: valid, errors."""
        result: Validation = await self._call("POST", self._url(*_HOT, "validate"), Validation)
        return result

    async def validate_candidate(self, documents: str | list[Any]) -> CandidateValidation:
        """Check rule documents as part of the registry, publishing nothing: each ruleset
        replaces the ruleset of its id (or joins the registry). `documents` is the text of
        one rule file (sent as YAML), or a non-empty list of ruleset documents (dicts) or
        texts of them (sent as JSON). Answers `valid`, every problem located in
        `errors`, `changes` (rulesets and rules added, changed, removed) and `tests`
        (embedded test cases run, passed, failed). Sent without the admin token, as every
        validation is. An empty text is no body: the sources' validation would answer,
        in another shape, so it is refused as a malformed answer."""
        # Nothing here goes into the URL: what the documents hold is the sidecar's to
        # judge (a list it cannot take is a 400, a `SidecarError`).
        if isinstance(documents, str):
            body, data = None, documents.encode("utf-8")
            headers: Mapping[str, str] | None = {"Content-Type": "application/yaml"}
        else:
            body, data, headers = {"documents": documents}, None, None
        result: CandidateValidation = await self._call(
            "POST",
            self._url(*_HOT, "validate"),
            CandidateValidation,
            body,
            headers=headers,
            data=data,
        )
        return result

    async def reload(self, *, force: bool = False, validate: bool = True) -> ReloadRecord:
        """The reload record; a failed reload (HTTP 422) is a record too, with its errors."""
        result: ReloadRecord = await self._call(
            "POST",
            self._url(*_HOT, "reload"),
            ReloadRecord,
            {"force": force, "validate": validate},
            admin=True,
            answers=frozenset({422}),
        )
        return result

    # Writes to the database source (the admin token is sent)

    async def put_ruleset(
        self,
        ruleset_id: str | int,
        document: Mapping[str, Any] | str,
        *,
        row_version: int | None,
        actor: str | None = None,
    ) -> Written:
        """Create (`row_version` None: only if absent) or replace (only while the stored
        version is `row_version`) ruleset `ruleset_id` with `document`, a mapping (sent
        as JSON) or YAML text, whose `metadata.id` must be `ruleset_id`.
        `PreconditionFailed` (412), `WriteRefused` (422)."""
        if isinstance(document, str):
            data, kind = document.encode(), "application/yaml"
        else:
            data, kind = json.dumps(document).encode(), "application/json"
        url = self._url("api", "v1", "rulesets", _ruleset_id(ruleset_id))
        headers = {"Content-Type": kind, **_precondition(row_version, create=True)}
        return await self._write("PUT", url, headers, actor, data)

    async def delete_ruleset(
        self, ruleset_id: str | int, *, row_version: int, actor: str | None = None
    ) -> Written:
        """Delete the ruleset while its stored version is `row_version`."""
        url = self._url("api", "v1", "rulesets", _ruleset_id(ruleset_id))
        return await self._write(
            "DELETE", url, _precondition(row_version, create=False), actor, None
        )

    async def enable_rule(
        self, rule_id: str | int, *, row_version: int | None = None, actor: str | None = None
    ) -> Written:
        """Enable a rule (`row_version`: its ruleset's, checked when given)."""
        return await self._set_enabled(rule_id, "enable", row_version, actor)

    async def disable_rule(
        self, rule_id: str | int, *, row_version: int | None = None, actor: str | None = None
    ) -> Written:
        """Disable a rule (`row_version`: its ruleset's, checked when given)."""
        return await self._set_enabled(rule_id, "disable", row_version, actor)

    async def _set_enabled(
        self, rule_id: str | int, verb: str, row_version: int | None, actor: str | None
    ) -> Written:
        url = self._url("api", "v1", "rules", _ruleset_id(rule_id), verb)
        headers = {} if row_version is None else _precondition(row_version, create=False)
        return await self._write("POST", url, headers, actor, b"")

    async def _write(
        self,
        method: str,
        url: URL,
        headers: Mapping[str, str],
        actor: str | None,
        data: bytes | None,
    ) -> Written:
        if actor is not None:
            headers = {**headers, "X-Actor": actor}
        try:
            written: Written = await self._call(
                method, url, Written, admin=True, headers=headers, data=data
            )
        except SidecarError as exc:
            if exc.status not in (412, 422) or isinstance(exc, MalformedAnswer):
                raise
            where, raw = f"{method} {url.path}", json.dumps(exc.body).encode()
            try:
                if exc.status == 412:
                    stale: _StaleAnswer = _decode(raw, _StaleAnswer, where)
                    version = stale["error"]["row_version"]
                    raise PreconditionFailed(exc.message, exc.body, version) from None
                refusal: _RefusalAnswer = _decode(raw, _RefusalAnswer, where)
            except MalformedAnswer as malformed:
                raise MalformedAnswer(exc.status, malformed.message) from None
            raise WriteRefused(exc.message, exc.body, refusal["error"]["errors"]) from None
        return written

    async def health(self) -> Health:
        """The health report, also when it says unhealthy (HTTP 503)."""
        health: Health = await self._call(
            "GET", self._url("health", "hot-reload"), Health, answers=frozenset({503})
        )
        return health

    # Events

    async def events(
        self,
        *,
        last_seq: int | None = None,
        instance: str | None = None,
        max_backoff: float = 10.0,
    ) -> AsyncIterator[Event]:
        """Every WebSocket message as an `Event`, forever: reconnects with jittered backoff
        and resumes after the last message seen (its `instance` and `seq`; or those given,
        to resume the stream of an earlier call).

        A `ResyncRequired` event says that what was missed cannot be told (the gap is
        older than the sidecar's buffer, or the sidecar restarted and counts anew): re-read
        what you keep; events go on from there. Raises `MalformedAnswer` (or
        `AnswerTooLarge`) for a message that is not the sidecar's, and `SidecarError` when
        the sidecar refuses the subscription (401: the admin token is wrong or missing).
        """
        if last_seq is not None and (isinstance(last_seq, bool) or last_seq < 0):
            raise ValueError(f"last_seq must be a whole number, not {last_seq!r}")
        if instance is not None and (last_seq is None or not _INSTANCE.fullmatch(instance)):
            raise ValueError(f"instance {_short(instance)} needs last_seq, and is an instance id")
        backoff = 0.1
        while True:
            try:
                async for event in self._subscription(instance, last_seq):
                    backoff = 0.1
                    instance, last_seq = event.instance, event.seq
                    yield event
            except aiohttp.WSServerHandshakeError as exc:
                refusal = _handshake_refusal(exc)
                if refusal is not None:
                    raise refusal from exc
            except (aiohttp.ClientError, TimeoutError):
                pass
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, max_backoff)

    async def _subscription(
        self, instance: str | None, last_seq: int | None
    ) -> AsyncIterator[Event]:
        """One connection's events, from after (`instance`, `last_seq`), until it closes;
        a `ResyncRequired` first when a message cannot follow the last one seen although
        the sidecar did not say so."""
        query = {} if last_seq is None else {"last_seq": str(last_seq)}
        if instance is not None:
            query["instance"] = instance
        url = self._url("ws", "hot-reload", **query)
        url = url.with_scheme("wss" if url.scheme == "https" else "ws")
        where = f"WebSocket {url.path}"
        async with self._client().ws_connect(
            url,
            headers=self._admin,
            heartbeat=30.0,
            max_msg_size=self.max_answer_bytes,
            compress=0,
        ) as socket:
            async for message in socket:
                if message.type is aiohttp.WSMsgType.ERROR:
                    raise _frame_error(message.data, where)
                if message.type is not aiohttp.WSMsgType.TEXT:
                    raise MalformedAnswer(0, f"{where}: a {message.type.name} message, not text")
                event = _event(message.data, where)
                gap = _unannounced_gap(instance, last_seq, event)
                if gap is not None:
                    yield ResyncRequired(_RESYNC, event.seq, event.timestamp, gap, event.instance)
                instance, last_seq = event.instance, event.seq
                yield event


def _handshake_refusal(exc: aiohttp.WSServerHandshakeError) -> SidecarError | None:
    """The error a failed WebSocket handshake stands for; None when trying again may
    help (the sidecar busy or restarting: 408, 429, 5xx)."""
    status = exc.status
    if status in (408, 429) or status >= 500:
        return None
    if status >= 400:
        return SidecarError(status, f"WebSocket refused: {exc.message}")
    return MalformedAnswer(status, f"not a WebSocket answer ({exc.message})")


def _frame_error(error: object, where: str) -> Exception:
    """What a broken frame means: too large, not the protocol, or a lost connection."""
    if isinstance(error, aiohttp.WebSocketError):
        if error.code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG:
            return AnswerTooLarge(0, f"{where}: a message past the limit ({error})")
        return MalformedAnswer(0, f"{where}: {error}")
    return aiohttp.ClientConnectionError(f"{where}: {error!r}")


class RuleClient:
    """Synchronous face of `AsyncRuleClient`, for code without an event loop."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        token: str | None = None,
        timeout: float = 5.0,
        max_answer_bytes: int = DEFAULT_MAX_ANSWER_BYTES,
    ) -> None:
        self._async = AsyncRuleClient(
            base_url, token=token, timeout=timeout, max_answer_bytes=max_answer_bytes
        )
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="rule-client", daemon=True
        )
        self._thread.start()

    def __enter__(self) -> RuleClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _run(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def close(self) -> None:
        if self._loop.is_running():
            self._run(self._async.close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
        self._loop.close()

    def execute_rules_from_registry(self, data: Any, ruleset_id: str | int) -> Evaluation:
        return self._run(self._async.execute_rules_from_registry(data, ruleset_id))

    def evaluate_many(self, inputs: list[Any], ruleset_id: str | int) -> BatchEvaluation:
        return self._run(self._async.evaluate_many(inputs, ruleset_id))

    def get_rules_from_registry(
        self, ruleset_id: str | int | None = None, *, include_disabled: bool = False
    ) -> list[Rule]:
        return self._run(
            self._async.get_rules_from_registry(ruleset_id, include_disabled=include_disabled)
        )

    def get_registry_info(self) -> RegistryInfo:
        return self._run(self._async.get_registry_info())

    def is_registry_fresh(self, max_age_seconds: float = 300) -> bool:
        return self._run(self._async.is_registry_fresh(max_age_seconds))

    def validate_registry_rules(self) -> Validation:
        return self._run(self._async.validate_registry_rules())

    def validate_candidate(self, documents: str | list[Any]) -> CandidateValidation:
        return self._run(self._async.validate_candidate(documents))

    def reload(self, *, force: bool = False, validate: bool = True) -> ReloadRecord:
        return self._run(self._async.reload(force=force, validate=validate))

    def health(self) -> Health:
        return self._run(self._async.health())

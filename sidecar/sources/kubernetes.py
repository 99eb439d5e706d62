"""Rule files from labelled ConfigMaps, read through the Kubernetes API (list + watch).

A mounted ConfigMap reaches the pod after the kubelet's sync (60-90 s); a watch on the
API delivers the change in about a second. This is client-go's reflector, kept small:
list once, then watch from the list's resourceVersion; after a clean end or a dropped
connection, resume from the last version seen; when the server answers 410 Gone (as an
HTTP status or as an ERROR event), list again. Both ends time out: the server closes the
watch after `timeoutSeconds`, and the client gives up when no byte arrives for longer
than that, so a stalled watch is noticed, retried, and shown in health meanwhile.

A watch is an optimisation, never the only truth: one lost or reordered event would
otherwise serve stale rules as healthy for as long as the watch lives. So the reflector
lists again every `relist_interval_seconds`, `forget()` makes the next `read()` list,
an event older than what is held is ignored, and anything the server sends that breaks
the protocol (a line that is not an event) is reported in words and answered by a list.

Lists and watches are read as raw JSON and checked here (not through the client's
models): every fault is then a message that says what was wrong and where, and a list
has a total deadline, not only a per-read timeout that a trickling server never trips.

The `kubernetes` client is synchronous, so the reflector runs in a thread of its own and
wakes the event loop when something changed.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import copy
import json
import logging
import math
import random
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, cast

import urllib3
import urllib3.exceptions
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from sidecar.errors import LoadError, Problem, ProblemCode
from sidecar.rulefiles import SourceFile
from sidecar.sources.files import is_rule_file

__all__ = [
    "ConfigMapSource",
    "EventRecorder",
    "api_client_from_environment",
    "describe_error",
    "pod_namespace",
]

logger = logging.getLogger("sidecar.sources.kubernetes")

SERVICE_ACCOUNT_NAMESPACE: Final = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
_CONNECT_TIMEOUT_S: Final = 10.0
_LIST_TIMEOUT_S: Final = 30.0
_LIST_DEADLINE_S: Final = 30.0
_RELIST_INTERVAL_S: Final = 600.0
_MAX_BACKOFF_S: Final = 30.0
_MAX_EVENT_BYTES: Final = 8 * 1024 * 1024  # a ConfigMap holds at most 1 MiB
_EXCERPT_CHARS: Final = 120
_STALLED: Final = "stalled"
_FILE_PREFIX: Final = "configmap/"
_EVENT_TYPES: Final = frozenset({"ADDED", "MODIFIED", "DELETED", "BOOKMARK", "ERROR"})


def pod_namespace(path: Path = SERVICE_ACCOUNT_NAMESPACE) -> str:
    """The namespace of the pod we run in, from its service account (as kubectl does)."""
    try:
        return path.read_text("utf-8").strip()
    except OSError as exc:
        raise ValueError(
            f"cannot tell the pod's namespace ({exc.strerror}: {path}); "
            "set RULE_SIDECAR_KUBERNETES_NAMESPACE"
        ) from None


def api_client_from_environment() -> client.ApiClient:
    """In a pod, its service account; elsewhere the kubeconfig (`KUBECONFIG`), like kubectl.
    Neither there: a `ValueError` that names both, for a one-line settings error."""
    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException as in_pod:
        try:
            config.load_kube_config(client_configuration=configuration)
        except config.ConfigException as kubeconfig:
            raise ValueError(
                "no credentials for the Kubernetes API: not in a pod "
                f"({' '.join(str(in_pod).split())} - the service account files under "
                f"{SERVICE_ACCOUNT_NAMESPACE.parent}) and no usable kubeconfig "
                f"(KUBECONFIG or ~/.kube/config: {' '.join(str(kubeconfig).split())})"
            ) from None
    return client.ApiClient(configuration)


class _Fault(Exception):
    """The API server sent something the protocol does not allow, or too slowly: the
    message says what, in words, for health, logs and the failed reload."""


class _ShortWatch(_Fault):
    """A watch the server ended at once: retried after a backoff, from where it was."""


def _too_slow(seconds: float) -> _Fault:
    return _Fault(
        f"the list of ConfigMaps was not complete within {seconds:g} s "
        "(a slow or overloaded API server)"
    )


def _without_retries(api: client.ApiClient) -> client.ApiClient:
    """A client like `api` that never repeats a request by itself: urllib3 would send a
    list whose answer timed out three more times, far past its deadline. The reflector
    and the reload service retry on their own, with backoff, and report each failure."""
    configuration = copy.deepcopy(api.configuration)
    configuration.retries = False
    return client.ApiClient(configuration)


def describe_error(exc: BaseException) -> str:
    """One line for health and logs: the API's own message, with a hint where one helps."""
    if isinstance(exc, _Fault):
        return str(exc)[:500]
    if isinstance(exc, ApiException):
        message = exc.reason or ""
        with contextlib.suppress(ValueError, KeyError, TypeError):
            message = json.loads(exc.body or "")["message"]
        text = f"HTTP {exc.status}: {message}"
        if exc.status == 403:
            text += " (grant get/list/watch on configmaps: the chart's rbac.create)"
        return text[:500]
    if isinstance(exc, urllib3.exceptions.ReadTimeoutError):
        return f"{_STALLED}: no data from the watch within the read timeout"
    if isinstance(exc, urllib3.exceptions.MaxRetryError) and exc.reason is not None:
        exc = exc.reason
    if isinstance(exc, urllib3.exceptions.ProtocolError):
        cause = exc.args[0] if exc.args and isinstance(exc.args[0], str) else str(exc)
        return f"the connection broke off in the middle of an answer ({cause})"[:500]
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:500]


def _excerpt(data: bytes | str) -> str:
    """A bounded, one-line quote of what the server sent."""
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    text = " ".join(text.split())
    return repr(text if len(text) <= _EXCERPT_CHARS else text[:_EXCERPT_CHARS] + "...")


def _kind(value: object) -> str:
    """A JSON value's type, as messages name it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    names = {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number"}
    return names.get(type(value), type(value).__name__)


def _json_error(exc: ValueError) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} at line {exc.lineno} column {exc.colno}"
    return "not UTF-8" if isinstance(exc, UnicodeDecodeError) else str(exc)


def _not_newer(version: str, than: str | None) -> bool:
    """Whether `version` is no newer than `than` (both checked decimal integers)."""
    if than is None:
        return False
    # Compared as digit strings: int() refuses more than 4,300 digits.
    version, than = version.lstrip("0"), than.lstrip("0")
    return (len(version), version) <= (len(than), than)


def _is_number(version: str) -> bool:
    return version.isascii() and version.isdigit()


def _file_name(configmap: str, key: str) -> str:
    """How a ConfigMap key is named in every message: `configmap/<name>/<key>`."""
    return f"{_FILE_PREFIX}{configmap}/{key}"


def _configmap_of(file: str) -> str | None:
    """The ConfigMap a problem's file names (`configmap/<name>[/<key>]`); None for any
    other file."""
    if not file.startswith(_FILE_PREFIX):
        return None
    return file.removeprefix(_FILE_PREFIX).partition("/")[0] or None


def _checked_version(version: str, what: str) -> str:
    """resourceVersions are opaque to clients in the API's contract, but etcd's, and so
    every API server's, are increasing decimal integers: the reflector orders events by
    them, so one that is not is a fault, never a version to apply."""
    if not _is_number(version):
        raise _Fault(f"{what} has resourceVersion {_excerpt(version)}, not a decimal integer")
    return version


def _version_of(obj: Mapping[str, object], what: str) -> str:
    """The resourceVersion of a list or a BOOKMARK (neither is a whole ConfigMap)."""
    metadata = obj.get("metadata")
    version = metadata.get("resourceVersion") if isinstance(metadata, dict) else None
    if not isinstance(version, str) or not version:
        raise _Fault(f"{what} has no metadata.resourceVersion")
    return _checked_version(version, what)


def _identity(obj: Mapping[str, object], what: str) -> tuple[str, str]:
    """(name, resourceVersion) of an object from the API; `what` names it in messages."""
    metadata = obj.get("metadata")
    if not isinstance(metadata, dict):
        raise _Fault(f"{what} has no metadata (found {_kind(metadata)})")
    name, version = metadata.get("name"), metadata.get("resourceVersion")
    if not isinstance(name, str) or not name:
        raise _Fault(f"{what} has no metadata.name")
    if not isinstance(version, str) or not version:
        raise _Fault(f"{what} (ConfigMap {name}) has no metadata.resourceVersion")
    return name, _checked_version(version, f"{what} (ConfigMap {name})")


@dataclass(frozen=True, slots=True)
class _Requirement:
    """One requirement of a label selector: `operator` is `in` (`=`, `==`, `in (...)`),
    `notin` (`!=`, `notin (...)`), `exists` (`key`) or `absent` (`!key`)."""

    key: str
    operator: str
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, object]) -> bool:
        value = labels.get(self.key)
        if self.operator == "in":
            return value in self.values
        if self.operator == "notin":  # as in Kubernetes: a ConfigMap without the key matches
            return value not in self.values
        return (value is not None) == (self.operator == "exists")


_KEY: Final = r"([A-Za-z0-9][A-Za-z0-9._/-]*)"
_VALUE: Final = r"([A-Za-z0-9._-]*)"
_EQUALITY: Final = re.compile(rf"{_KEY}\s*(==|!=|=)\s*{_VALUE}")
_SET: Final = re.compile(rf"{_KEY}\s+(in|notin)\s*\(([^()]*)\)")
_EXISTS: Final = re.compile(rf"(!?)\s*{_KEY}")


def _requirements(selector: str) -> tuple[_Requirement, ...]:
    """The requirements of a label selector that can be judged here. One of another form
    (`key > 5`, a typo the API server would refuse anyway) is left out: the server
    filtered on it, and a ConfigMap is never refused on a guess."""
    parts, depth, start = [], 0, 0
    for index, char in enumerate(selector + ","):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(selector[start:index].strip())
            start = index + 1
    found: list[_Requirement] = []
    for part in filter(None, parts):
        if match := _SET.fullmatch(part):
            values = frozenset(value.strip() for value in match[3].split(","))
            found.append(_Requirement(match[1], match[2], values - {""}))
        elif match := _EQUALITY.fullmatch(part):
            operator = "notin" if match[2] == "!=" else "in"
            found.append(_Requirement(match[1], operator, frozenset({match[3]})))
        elif match := _EXISTS.fullmatch(part):
            found.append(_Requirement(match[2], "absent" if match[1] else "exists"))
    return tuple(found)


@dataclass(frozen=True, slots=True)
class _ConfigMap:
    """What a ConfigMap contributes: its version, its rule files, and what is wrong with
    it (a value that is not a string, binaryData that is not base64). A broken ConfigMap
    fails the read at its own name; the watch carries on."""

    resource_version: str
    files: tuple[SourceFile, ...]
    problems: tuple[Problem, ...]

    @classmethod
    def from_wire(
        cls, obj: Mapping[str, object], name: str, version: str, namespace: str
    ) -> _ConfigMap:
        """Rule-file keys of `data` (text) and of `binaryData` (base64 of the file's bytes:
        `kubectl create configmap --from-file` puts a file there when it is not UTF-8, so
        the loader reports it as such, at its line and column, like a file on disk)."""
        files: dict[str, SourceFile] = {}
        problems: list[Problem] = []

        def refuse(file: str, message: str) -> None:
            text = f"ConfigMap {name} in namespace {namespace}: {message}"
            problems.append(Problem(file=file, message=text, code=ProblemCode.SOURCE_UNAVAILABLE))

        for field in ("data", "binaryData"):
            section = obj.get(field) or {}
            if not isinstance(section, dict):
                refuse(
                    f"{_FILE_PREFIX}{name}", f"{field} is {_kind(section)}, not a map of strings"
                )
                continue
            for key, value in section.items():
                if not is_rule_file(Path(key)):
                    continue
                file = _file_name(name, key)
                if not isinstance(value, str):
                    refuse(file, f"{field}.{key} is {_kind(value)}, not a string")
                elif file in files:
                    refuse(file, f"the key {key} is in both data and binaryData")
                elif field == "data":  # a lone surrogate becomes bytes the loader refuses
                    files[file] = SourceFile(file, value.encode("utf-8", "surrogatepass"))
                else:
                    try:
                        files[file] = SourceFile(file, base64.b64decode(value, validate=True))
                    except binascii.Error:
                        refuse(file, f"binaryData.{key} is not base64: {_excerpt(value)}")
        return cls(version, tuple(files[file] for file in sorted(files)), tuple(problems))


@dataclass(frozen=True, slots=True)
class _Listing:
    """A whole list: the version a watch resumes from and every ConfigMap by name."""

    resource_version: str
    configmaps: Mapping[str, _ConfigMap]


@dataclass(frozen=True, slots=True)
class _Event:
    """One line of a watch, checked: its type and its object."""

    type: str
    object: Mapping[str, object]

    @classmethod
    def parse(cls, line: bytes) -> _Event:
        try:
            event = json.loads(line)
        except ValueError as exc:
            raise _Fault(
                f"the watch sent a line that is not JSON ({_json_error(exc)}): {_excerpt(line)}"
            ) from None
        if not isinstance(event, dict):
            raise _Fault(f"the watch sent {_kind(event)} instead of an event: {_excerpt(line)}")
        kind, obj = event.get("type"), event.get("object")
        if not isinstance(kind, str) or kind not in _EVENT_TYPES:
            which = "without a type" if kind is None else f"of unknown type {_excerpt(str(kind))}"
            raise _Fault(f"the watch sent an event {which}: {_excerpt(line)}")
        if not isinstance(obj, dict):
            raise _Fault(f"the watch sent a {kind} event whose object is {_kind(obj)}")
        return cls(kind, obj)

    def error(self) -> ApiException:
        """An ERROR event's Status, as the exception the same Status as an HTTP answer gives."""
        code = self.object.get("code")
        if not isinstance(code, int):
            shown = _excerpt(json.dumps(self.object))
            raise _Fault(f"the watch sent an ERROR event without a status code: {shown}")
        reason = f"{self.object.get('reason')}: {self.object.get('message')}"
        return ApiException(status=code, reason=reason[:500])


def _lines(response: urllib3.HTTPResponse) -> Iterator[bytes]:
    """The non-empty lines of a streamed answer, each as soon as it is complete."""
    buffer = bytearray()
    while chunk := response.read1(65536):
        buffer += chunk
        while (end := buffer.find(b"\n")) >= 0:
            line = bytes(buffer[:end])
            del buffer[: end + 1]
            if line.strip():
                yield line
        if len(buffer) > _MAX_EVENT_BYTES:
            raise _Fault(f"the watch sent {len(buffer)} bytes without ending a line")
    if buffer.strip():
        yield bytes(buffer)


def _read_within(response: urllib3.HTTPResponse, deadline: float, seconds: float) -> bytes:
    """The whole body, or a `_Fault` at the `deadline` (monotonic): a per-read timeout
    never fires while a server trickles a byte at a time, so the socket is shut down then."""
    expired = threading.Event()

    def cut() -> None:
        expired.set()
        with contextlib.suppress(Exception):  # finished and handed back: nothing to cut
            response.shutdown()

    timer = threading.Timer(max(0.0, deadline - time.monotonic()), cut)
    timer.daemon = True
    timer.start()
    try:
        return response.read()
    except Exception:
        if expired.is_set():
            raise _too_slow(seconds) from None
        raise
    finally:
        timer.cancel()
        response.close()
        response.release_conn()


class ConfigMapSource:
    """Every ConfigMap matching a label selector in one namespace; each `data` or
    `binaryData` key that looks like a rule file (`.yaml`, `.yml`, `.json`) is one file,
    `configmap/<name>/<key>` in messages.
    """

    def __init__(
        self,
        api: client.ApiClient,
        *,
        namespace: str,
        label_selector: str,
        watch_timeout_seconds: float = 300.0,
        stalled_after_seconds: float | None = None,
        max_backoff_seconds: float = _MAX_BACKOFF_S,
        list_deadline_seconds: float = _LIST_DEADLINE_S,
        relist_interval_seconds: float | None = _RELIST_INTERVAL_S,
    ) -> None:
        self.namespace = namespace
        self.label_selector = label_selector
        self._requirements = _requirements(label_selector)
        self._core = client.CoreV1Api(_without_retries(api))
        self._watch_timeout = max(1, round(watch_timeout_seconds))
        # Silence for longer than the server's own timeout means the watch is stalled.
        self._read_timeout = stalled_after_seconds or self._watch_timeout * 1.1 + 5.0
        self._max_backoff = max_backoff_seconds
        self._list_deadline = list_deadline_seconds
        self._relist_interval = relist_interval_seconds
        self._lock = threading.Lock()
        self._configmaps: dict[str, _ConfigMap] = {}
        # Deletions the watch delivered since the last list, by name: a stale event from
        # before a deletion must not bring the ConfigMap back.
        self._deleted: dict[str, str] = {}
        self._resource_version: str | None = None  # None: the next step is a list
        self._listed_at = -math.inf  # monotonic time of the last list
        # Bumped by every list: a watch opened before it would replay events older than
        # the list into the cache, so it is abandoned and reopened from the list's version.
        self._epoch = 0
        self._forgotten = 0  # `forget()` calls; a read lists until one has listed after them
        self._listed_forgotten = 0
        self._watching = False
        self._problem: str | None = None

    @property
    def name(self) -> str:
        return f"configmaps:{self.namespace}/{self.label_selector}"

    def forget(self) -> None:
        """Trust nothing held: the next `read()` lists (a forced reload, a verification).
        The watch carries on; the list moves it on to the list's version."""
        with self._lock:
            self._forgotten += 1

    def read(self) -> list[SourceFile]:
        """The watched ConfigMaps; a list straight from the API after `forget()` or while
        no watch is healthy. Every failure is a `LoadError` that says why."""
        try:
            with self._lock:
                forgotten = self._forgotten
                current = (
                    self._watching and self._problem is None and self._listed_forgotten == forgotten
                )
            if not current:
                self._relist(forgotten=forgotten)
            with self._lock:
                configmaps = [self._configmaps[name] for name in sorted(self._configmaps)]
        except Exception as exc:
            problem = Problem(
                file=self.name, message=describe_error(exc), code=ProblemCode.SOURCE_UNAVAILABLE
            )
            raise LoadError([problem]) from exc
        problems = [problem for configmap in configmaps for problem in configmap.problems]
        if problems:
            raise LoadError(problems)
        return [file for configmap in configmaps for file in configmap.files]

    def watch_problem(self) -> str | None:
        with self._lock:
            return self._problem if self._watching else None

    async def changes(self) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        changed = asyncio.Event()
        stop = threading.Event()
        current: list[urllib3.HTTPResponse] = []
        thread = threading.Thread(
            target=self._reflect,
            args=(lambda: loop.call_soon_threadsafe(changed.set), stop, current),
            name=f"watch {self.name}",
            daemon=True,
        )
        with self._lock:
            self._watching = True
        thread.start()
        try:
            while True:
                await changed.wait()
                changed.clear()
                yield "configmap watch"
        finally:
            stop.set()
            for running in current:
                with contextlib.suppress(Exception):  # already finished: nothing to shut
                    running.shutdown()  # the blocked read returns now
            with self._lock:
                self._watching = False

    # The reflector (its own thread)

    def _reflect(
        self,
        notify: Callable[[], None],
        stop: threading.Event,
        current: list[urllib3.HTTPResponse],
    ) -> None:
        backoff = 0.5
        while not stop.is_set():
            try:
                if self._list_due() and self._relist(stop):
                    notify()
                self._watch_once(notify, stop, current)
                backoff = 0.5
            except Exception as exc:
                if stop.is_set():
                    return  # the failure is our own stop() shutting the socket
                if isinstance(exc, ApiException) and exc.status == 410:
                    logger.info("%s: watch expired (410 Gone); listing again", self.name)
                    with self._lock:
                        self._resource_version = None
                    continue
                backoff = self._failed(exc, stop, backoff)

    def _list_due(self) -> bool:
        with self._lock:
            return self._resource_version is None or time.monotonic() >= self._next_list()

    def _next_list(self) -> float:
        """When the periodic list is due (monotonic). Call with the lock held."""
        interval = self._relist_interval
        return self._listed_at + interval if interval else math.inf

    def _failed(self, exc: Exception, stop: threading.Event, backoff: float) -> float:
        """Record why the watch is down and wait before the next attempt (jittered).

        A server that could not be reached, refused, or ended the watch at once is tried
        again from the last version seen. After anything else (a line that is not an
        event, an error nobody foresaw) what is held is in doubt, so the next attempt lists.
        """
        reason = describe_error(exc)
        transport = (ApiException, urllib3.exceptions.HTTPError, OSError, _ShortWatch)
        relist = not isinstance(exc, transport)
        with self._lock:
            self._problem = reason
            if relist:
                self._resource_version = None
        logger.warning(
            "%s: watch failed: %s; %s in about %.1f s",
            self.name,
            reason,
            "listing again" if relist else "retrying",
            backoff,
            exc_info=relist and not isinstance(exc, _Fault),
        )
        stop.wait(backoff * (0.5 + random.random()))
        return min(backoff * 2, self._max_backoff)

    def _request(self, **options: Any) -> urllib3.HTTPResponse:
        """A list or watch request whose answer is read here, raw (a non-2xx status is an
        `ApiException`, as with the client's own reading)."""
        response = self._core.list_namespaced_config_map(
            self.namespace,
            label_selector=self.label_selector,
            _preload_content=False,
            **options,
        )
        return cast(urllib3.HTTPResponse, response)

    def _list(self) -> _Listing:
        """One list, complete within the list deadline, checked item by item."""
        deadline = time.monotonic() + self._list_deadline
        try:  # connecting and the headers: within the deadline (urllib3's total)
            response = self._request(_request_timeout=self._list_deadline)
        except urllib3.exceptions.TimeoutError as exc:
            if isinstance(exc, urllib3.exceptions.NewConnectionError):
                raise  # a refused connection, which urllib3 counts as a timeout
            raise _too_slow(self._list_deadline) from None
        body = _read_within(response, deadline, self._list_deadline)
        try:
            listing = json.loads(body)
        except ValueError as exc:
            raise _Fault(
                f"the list answer is not JSON ({_json_error(exc)}): {_excerpt(body)}"
            ) from None
        if not isinstance(listing, dict):
            raise _Fault(f"the list answer is {_kind(listing)}, not a ConfigMapList")
        version = _version_of(listing, "the list answer")
        items = listing.get("items") or []
        if not isinstance(items, list):
            raise _Fault(f"the list answer's items are {_kind(items)}, not a list")
        configmaps: dict[str, _ConfigMap] = {}
        for index, item in enumerate(items):
            if not isinstance(item, dict):
                raise _Fault(f"item {index} of the list is {_kind(item)}, not a ConfigMap")
            name, item_version = _identity(item, f"item {index} of the list")
            self._check_selected(item, name, f"item {index} of the list")
            configmaps[name] = _ConfigMap.from_wire(item, name, item_version, self.namespace)
        return _Listing(version, configmaps)

    def _relist(self, stop: threading.Event | None = None, *, forgotten: int | None = None) -> bool:
        """Replace the cache with a fresh list; True when anything differs. A reflector's
        list (`stop` given) that ends after its watch was stopped is dropped: nobody would
        be told of what it changed. A read's list (`forgotten`: the `forget()` count it
        started under) satisfies the forgets before it."""
        listing = self._list()
        with self._lock:
            if stop is not None and stop.is_set():
                return False
            missed = self._missed(listing)
            if missed:
                logger.warning(
                    "%s: the list found changes the watch never delivered (a lost or "
                    "reordered event), now read: %s",
                    self.name,
                    ", ".join(missed[:10])
                    + (f" and {len(missed) - 10} more" if missed[10:] else ""),
                )
            changed = listing.configmaps != self._configmaps
            self._configmaps = dict(listing.configmaps)
            self._deleted.clear()
            self._resource_version = listing.resource_version
            self._listed_at = time.monotonic()
            self._epoch += 1
            if forgotten is not None:
                self._listed_forgotten = max(self._listed_forgotten, forgotten)
            self._api_answered()
        return changed

    def _missed(self, listing: _Listing) -> list[str]:
        """ConfigMaps listed at a version the watch had already passed, yet held older or
        not at all: the watch lost (or reordered) their event. Call with the lock held."""
        position = self._resource_version
        if not self._watching or position is None:
            return []

        def lost(name: str, version: str) -> bool:
            held = self._configmaps.get(name)
            newer = held is None or not _not_newer(version, held.resource_version)
            return newer and _not_newer(version, position)

        return [
            name
            for name, configmap in sorted(listing.configmaps.items())
            if lost(name, configmap.resource_version)
        ]

    def _check_selected(self, obj: Mapping[str, object], name: str, what: str) -> None:
        """A `_Fault` unless `obj` is one the request asked for: a ConfigMap (a list's
        items carry no kind), of this namespace, with labels that match the selector.
        Anything else would change rules from somewhere this source was never pointed at
        (a DELETED from another namespace removing a same-named ConfigMap's rules); the
        list that follows the fault is the truth."""
        kind = obj.get("kind")
        if kind is not None and kind != "ConfigMap":
            raise _Fault(f"{what} is a {_excerpt(str(kind))} named {name}, not a ConfigMap")
        metadata = cast(Mapping[str, object], obj["metadata"])  # checked by `_identity`
        namespace = metadata.get("namespace")
        if namespace is not None and namespace != self.namespace:
            raise _Fault(
                f"{what} is ConfigMap {name} of namespace {_excerpt(str(namespace))}, "
                f"not of {self.namespace}"
            )
        labels = metadata.get("labels") or {}
        if not isinstance(labels, dict):
            raise _Fault(f"{what} (ConfigMap {name}) has labels that are {_kind(labels)}")
        if not all(requirement.matches(labels) for requirement in self._requirements):
            shown = _excerpt(json.dumps(labels, sort_keys=True))
            raise _Fault(
                f"{what} is ConfigMap {name}, whose labels {shown} do not match "
                f"the selector {self.label_selector}"
            )

    def _api_answered(self) -> None:
        """The API server answered: a failure to reach it is over. A stall is over only
        when the watch itself delivers. Call with the lock held."""
        if self._problem is not None and not self._problem.startswith(_STALLED):
            self._problem = None

    def _watch_once(
        self,
        notify: Callable[[], None],
        stop: threading.Event,
        current: list[urllib3.HTTPResponse],
    ) -> None:
        """One watch request, from the last version seen until the server ends it (at the
        latest when the next periodic list is due). One that ends at once with nothing
        sent is a failure, as in client-go: retried at once, it would hammer the server."""
        with self._lock:
            epoch, since = self._epoch, self._resource_version
            until_list = self._next_list() - time.monotonic()
        timeout = self._watch_timeout
        if until_list < timeout:
            timeout = max(1, math.ceil(until_list))
        response = self._request(
            watch=True,
            resource_version=since,
            timeout_seconds=timeout,
            allow_watch_bookmarks=True,
            _request_timeout=(_CONNECT_TIMEOUT_S, self._read_timeout),
        )
        current[:] = [response]
        opened, delivered = time.monotonic(), False
        try:
            with self._lock:
                self._api_answered()
            if stop.is_set():
                return
            for line in _lines(response):
                delivered = True
                changed = self._apply(_Event.parse(line), epoch, stop)
                if changed is None:
                    break  # stopped, or a read listed meanwhile: resume from its version
                if changed:
                    notify()
        finally:
            response.close()
            response.release_conn()
        if stop.is_set():
            return
        if not delivered and time.monotonic() - opened < min(1.0, timeout / 2):
            raise _ShortWatch(
                f"the API server ended the watch at once, sending nothing (asked for {timeout} s)"
            )
        with self._lock:
            self._problem = None  # the server ended the watch on time: it is alive

    def _apply(self, event: _Event, epoch: int, stop: threading.Event) -> bool | None:
        """Apply one watch event to the cache; True when the rule files changed, None when
        the event is stale: a list since the watch opened, or the watch was stopped.

        A stopped watch can still deliver: shutting the socket down only works once the
        response has started, so a watch stopped while its request was in flight reads
        on. Applied, its events would move the resourceVersion past changes that no one
        was told of, and the next watch would resume after them (never announcing them,
        and never getting the 410 that would make it list). `changes()` sets `stop`
        before it takes the lock to end, so no event is applied after it has ended.

        An event no newer than what is held of its ConfigMap (a MODIFIED delivered out of
        order, one from before a deletion) is ignored: it must not overwrite newer content.
        A BOOKMARK only moves the resourceVersion on.
        """
        if event.type == "ERROR":
            raise event.error()
        name: str | None = None
        configmap: _ConfigMap | None = None
        if event.type == "BOOKMARK":
            version = _version_of(event.object, "a BOOKMARK event")
        else:
            name, version = _identity(event.object, f"a {event.type} event")
            self._check_selected(event.object, name, f"a {event.type} event")
            if event.type != "DELETED":
                configmap = _ConfigMap.from_wire(event.object, name, version, self.namespace)
        with self._lock:
            if stop.is_set() or epoch != self._epoch:
                return None
            self._problem = None
            if not _not_newer(version, self._resource_version):
                self._resource_version = version  # never back: a watch resumes from here
            if name is None:
                return False
            held = self._configmaps.get(name)
            if _not_newer(version, held.resource_version if held else self._deleted.get(name)):
                logger.info(
                    "%s: ignored a %s of ConfigMap %s at resourceVersion %s, older than held",
                    self.name,
                    event.type,
                    name,
                    version,
                )
                return False
            if configmap is None:
                self._deleted[name] = version
                return self._configmaps.pop(name, None) is not None
            self._deleted.pop(name, None)
            self._configmaps[name] = configmap
            return True


class EventRecorder:
    """Posts a Warning Event on each ConfigMap whose rules failed to load, so that
    `kubectl describe configmap` and `kubectl get events` say why a change is not live.

    Blocking (the client is synchronous): call it from a worker thread. It never raises:
    an Event is a courtesy, and the failure is already in health, metrics and logs.
    """

    def __init__(self, api: client.ApiClient, *, namespace: str, instance: str) -> None:
        self.namespace = namespace
        self.instance = instance
        self._core = client.CoreV1Api(api)

    def reload_failed(self, problems: Iterable[Problem]) -> None:
        by_configmap: dict[str, list[Problem]] = {}
        for problem in problems:
            configmap = _configmap_of(problem.file)
            if configmap is not None:
                by_configmap.setdefault(configmap, []).append(problem)
        for name, found in sorted(by_configmap.items()):
            try:
                self._core.create_namespaced_event(
                    self.namespace,
                    client.CoreV1Event.model_validate(self._event(name, found)),
                    _request_timeout=(_CONNECT_TIMEOUT_S, _LIST_TIMEOUT_S),
                )
            except Exception as exc:
                reason = describe_error(exc)
                logger.warning("cannot post an Event on ConfigMap %s: %s", name, reason)

    def _event(self, configmap: str, problems: list[Problem]) -> dict[str, Any]:
        now = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
        shown = "; ".join(str(problem) for problem in problems[:5])
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        return {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{configmap}.", "namespace": self.namespace},
            "involvedObject": {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "name": configmap,
                "namespace": self.namespace,
            },
            "type": "Warning",
            "reason": "RuleReloadFailed",
            "message": f"rules not applied, the last good rules keep serving: {shown}{more}"[:1024],
            "source": {"component": "rule-sidecar", "host": self.instance},
            "reportingComponent": "rule-sidecar",
            "reportingInstance": self.instance,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }

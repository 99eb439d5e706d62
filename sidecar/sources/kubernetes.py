"""Rule files from labelled ConfigMaps, read through the Kubernetes API (list + watch).

A mounted ConfigMap reaches the pod after the kubelet's sync (60-90 s); a watch on the
API delivers the change in about a second. This is client-go's reflector, kept small:
list once, then watch from the list's resourceVersion; after a clean end or a dropped
connection, resume from the last version seen; when the server answers 410 Gone (as an
HTTP status or as an ERROR event), list again. Both ends time out: the server closes the
watch after `timeoutSeconds`, and the client gives up when no byte arrives for longer
than that, so a stalled watch is noticed, retried, and shown in health meanwhile.

The `kubernetes` client is synchronous, so the reflector runs in a thread of its own and
wakes the event loop when something changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import random
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import urllib3.exceptions
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from sidecar.documents import SourceFile
from sidecar.errors import LoadError, Problem, ProblemCode
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
_MAX_BACKOFF_S: Final = 30.0
_STALLED: Final = "stalled"
_FILE_PREFIX: Final = "configmap/"


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
    """In a pod, its service account; elsewhere the kubeconfig (`KUBECONFIG`), like kubectl."""
    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        config.load_kube_config(client_configuration=configuration)
    return client.ApiClient(configuration)


def describe_error(exc: BaseException) -> str:
    """One line for health and logs: the API's own message, with a hint where one helps."""
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
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:500]


def _file_name(configmap: str, key: str) -> str:
    """How a ConfigMap key is named in every message: `configmap/<name>/<key>`."""
    return f"{_FILE_PREFIX}{configmap}/{key}"


def _configmap_of(file: str) -> str | None:
    """The ConfigMap a file name of `_file_name` came from; None for any other file."""
    name, slash, key = file.removeprefix(_FILE_PREFIX).partition("/")
    return name if file.startswith(_FILE_PREFIX) and slash and key else None


@dataclass(frozen=True, slots=True)
class _ConfigMap:
    """What a ConfigMap contributes: its version and its rule files."""

    resource_version: str
    files: tuple[SourceFile, ...]

    @classmethod
    def from_object(cls, configmap: client.V1ConfigMap) -> _ConfigMap:
        metadata = configmap.metadata
        assert metadata is not None  # the API server always sends it
        files = tuple(
            SourceFile(_file_name(str(metadata.name), key), value.encode("utf-8"))
            for key, value in sorted((configmap.data or {}).items())
            if is_rule_file(Path(key))
        )
        return cls(str(metadata.resource_version), files)


class ConfigMapSource:
    """Every ConfigMap matching a label selector in one namespace; each data key that
    looks like a rule file (`.yaml`, `.yml`, `.json`) is one file,
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
    ) -> None:
        self.namespace = namespace
        self.label_selector = label_selector
        self._core = client.CoreV1Api(api)
        self._watch_timeout = max(1, round(watch_timeout_seconds))
        # Silence for longer than the server's own timeout means the watch is stalled.
        self._read_timeout = stalled_after_seconds or self._watch_timeout * 1.1 + 5.0
        self._max_backoff = max_backoff_seconds
        self._lock = threading.Lock()
        self._configmaps: dict[str, _ConfigMap] = {}
        self._resource_version: str | None = None  # None: the next step is a list
        # Bumped by every list: a watch opened before it would replay events older than
        # the list into the cache, so it is abandoned and reopened from the list's version.
        self._epoch = 0
        self._watching = False
        self._problem: str | None = None

    @property
    def name(self) -> str:
        return f"configmaps:{self.namespace}/{self.label_selector}"

    def read(self) -> list[SourceFile]:
        """The watched ConfigMaps; a list straight from the API while no watch is healthy."""
        with self._lock:
            current = self._watching and self._problem is None
        if not current:
            try:
                self._relist()
            except Exception as exc:
                problem = Problem(
                    file=self.name,
                    message=describe_error(exc),
                    code=ProblemCode.SOURCE_UNAVAILABLE,
                )
                raise LoadError([problem]) from exc
        with self._lock:
            configmaps = [self._configmaps[name] for name in sorted(self._configmaps)]
        return [file for configmap in configmaps for file in configmap.files]

    def watch_problem(self) -> str | None:
        with self._lock:
            return self._problem if self._watching else None

    async def changes(self) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        changed = asyncio.Event()
        stop = threading.Event()
        current: list[watch.Watch] = []
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
                running.stop()  # shuts the socket down: the blocked read returns now
            with self._lock:
                self._watching = False

    # The reflector (its own thread)

    def _reflect(
        self, notify: Callable[[], None], stop: threading.Event, current: list[watch.Watch]
    ) -> None:
        backoff = 0.5
        while not stop.is_set():
            try:
                with self._lock:
                    must_list = self._resource_version is None
                if must_list and self._relist(stop):
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

    def _failed(self, exc: Exception, stop: threading.Event, backoff: float) -> float:
        """Record why the watch is down and wait before the next attempt (jittered)."""
        reason = describe_error(exc)
        with self._lock:
            self._problem = reason
        logger.warning("%s: watch failed: %s; retrying in about %.1f s", self.name, reason, backoff)
        stop.wait(backoff * (0.5 + random.random()))
        return min(backoff * 2, self._max_backoff)

    def _relist(self, stop: threading.Event | None = None) -> bool:
        """Replace the cache with a fresh list; True when anything differs. A reflector's
        list (`stop` given) that ends after its watch was stopped is dropped: nobody would
        be told of what it changed."""
        listing = self._core.list_namespaced_config_map(
            self.namespace,
            label_selector=self.label_selector,
            _request_timeout=(_CONNECT_TIMEOUT_S, _LIST_TIMEOUT_S),
        )
        assert listing.metadata is not None  # the API server always sends it
        configmaps = {
            str(item.metadata.name): _ConfigMap.from_object(item)
            for item in listing.items
            if item.metadata is not None
        }
        with self._lock:
            if stop is not None and stop.is_set():
                return False
            changed = configmaps != self._configmaps
            self._configmaps = configmaps
            self._resource_version = str(listing.metadata.resource_version)
            self._epoch += 1
            self._api_answered()
        return changed

    def _api_answered(self) -> None:
        """The API server answered: a failure to reach it is over. A stall is over only
        when the watch itself delivers. Call with the lock held."""
        if self._problem is not None and not self._problem.startswith(_STALLED):
            self._problem = None

    def _watch_once(
        self, notify: Callable[[], None], stop: threading.Event, current: list[watch.Watch]
    ) -> None:
        """One watch request, from the last version seen until the server ends it."""
        running = watch.Watch()
        current[:] = [running]
        if stop.is_set():
            return
        with self._lock:
            epoch, since = self._epoch, self._resource_version
        for event in running.stream(
            self._opened(self._core.list_namespaced_config_map),
            self.namespace,
            label_selector=self.label_selector,
            resource_version=since,
            timeout_seconds=self._watch_timeout,
            allow_watch_bookmarks=True,
            _request_timeout=(_CONNECT_TIMEOUT_S, self._read_timeout),
        ):
            changed = self._apply(event, epoch, stop)
            if changed is None:
                break  # stopped, or a read listed meanwhile: resume from its version
            if changed:
                notify()
        if not stop.is_set():
            with self._lock:
                self._problem = None  # the server ended the watch on time: it is alive

    def _opened(self, request: Callable[..., Any]) -> Callable[..., Any]:
        """`request`, noting that the API server answered (a stall clears only on data)."""

        @functools.wraps(request)
        def opened(*args: Any, **kwargs: Any) -> Any:
            response = request(*args, **kwargs)
            if 200 <= response.status < 300:
                with self._lock:
                    self._api_answered()
            return response

        return opened

    def _apply(self, event: Mapping[str, Any], epoch: int, stop: threading.Event) -> bool | None:
        """Apply one watch event to the cache; True when the rule files changed, None when
        the event is stale: a list since the watch opened, or the watch was stopped.

        A stopped watch can still deliver: `Watch.stop()` only shuts the socket down once
        the response has started, so a watch stopped while its request was in flight
        reads on. Applied, its events would move the resourceVersion past changes that no
        one was told of, and the next watch would resume after them (never announcing
        them, and never getting the 410 that would make it list). `changes()` sets `stop`
        before it takes the lock to end, so no event is applied after it has ended.

        A BOOKMARK only moves the resourceVersion on (its object is not a whole ConfigMap).
        """
        kind: str = event["type"]
        configmap: Any = event["object"]
        raw: Mapping[str, Any] = event["raw_object"]
        with self._lock:
            if stop.is_set() or epoch != self._epoch:
                return None
            self._resource_version = str(raw["metadata"]["resourceVersion"])
            self._problem = None
            if kind == "BOOKMARK":
                return False
            name = str(configmap.metadata.name)
            if kind == "DELETED":
                return self._configmaps.pop(name, None) is not None
            self._configmaps[name] = _ConfigMap.from_object(configmap)
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

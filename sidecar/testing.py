"""Helpers for tests and benchmarks of code that uses rule-sidecar (structlog-style).

`TcpProxy` stands between a client and a server (a database) and can freeze: a peer
that stops answering without closing anything, as a proxy stopped with `kill -STOP`.
`FakeKubernetes` is a small Kubernetes API server for the ConfigMap API source where no
cluster runs (see its docstring). `ConfigMapDir` writes a directory exactly the way the
kubelet's atomic writer updates a ConfigMap volume, so a watcher can be tested against
the real sequence of filesystem events: files go into a new hidden timestamped directory,
a `..data_tmp` symlink to it is renamed over `..data` (the one atomic step), visible names
are symlinks through `..data`, and the previous timestamped directory is removed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import itertools
import json
import os
import shutil
import socket
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import web

__all__ = ["WITHOUT_DAC", "ConfigMapDir", "FakeKubernetes", "TcpProxy"]

# A command line prefix that runs a command without the capabilities that let root read
# any file (setpriv, util-linux): file permissions then count as in a non-root container.
WITHOUT_DAC: tuple[str, ...] = (
    "setpriv",
    "--bounding-set",
    "-dac_override,-dac_read_search",
    "--inh-caps",
    "-dac_override,-dac_read_search",
    "--",
)


class ConfigMapDir:
    """A ConfigMap-style volume at `root`, updated by `write` with one atomic swap."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self._serial = itertools.count()

    @property
    def data(self) -> Path:
        """The `..data` symlink the kubelet swaps."""
        return self.root / "..data"

    def publish(self, files: Mapping[str, str | bytes]) -> Path:
        """Replace the whole content with `files` (name → text); returns the new data dir."""
        stamp = datetime.now(UTC).strftime("%Y_%m_%d_%H_%M_%S")
        data_dir = self.root / f"..{stamp}.{os.getpid()}{next(self._serial):06d}"
        data_dir.mkdir()
        for name, content in files.items():
            target = data_dir / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content.encode() if isinstance(content, str) else content)
        link = self.root / "..data"
        previous = link.resolve() if link.is_symlink() else None
        temporary = self.root / "..data_tmp"
        temporary.unlink(missing_ok=True)
        temporary.symlink_to(data_dir.name)
        os.replace(temporary, link)
        top_level = {name.split("/", 1)[0] for name in files}
        for entry in self.root.iterdir():
            if not entry.name.startswith("..") and entry.name not in top_level:
                entry.unlink()
        for name in top_level:
            visible = self.root / name
            if not visible.is_symlink():
                visible.symlink_to(Path("..data") / name)
        if previous is not None and previous != data_dir.resolve():
            shutil.rmtree(previous, ignore_errors=True)
        return data_dir


@dataclass
class _Change:
    """One entry of the watch history, at its position (`resource_version`). `hidden`:
    made, but never delivered to a watch; `raw`: a line sent as it is, not an event."""

    resource_version: int
    kind: str  # ADDED, MODIFIED, DELETED, or RAW (a line of `raw`)
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    hidden: bool = False
    raw: bytes | None = None


def _selects(selector: str, labels: Mapping[str, str]) -> bool:
    """Equality-based label selectors: `k=v`, `k==v`, `k!=v`, `k`, `!k`, comma = and."""
    for requirement in filter(None, (part.strip() for part in selector.split(","))):
        if "!=" in requirement:
            key, value = requirement.split("!=", 1)
            if labels.get(key.strip()) == value.strip():
                return False
        elif "=" in requirement:
            key, value = requirement.replace("==", "=").split("=", 1)
            if labels.get(key.strip()) != value.strip():
                return False
        elif requirement.startswith("!"):
            if requirement[1:] in labels:
                return False
        elif requirement not in labels:
            return False
    return True


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


class FakeKubernetes:
    """ConfigMaps and Events in memory behind the real list/watch HTTP protocol.

    What the ConfigMap source uses, as a real API server does it: list and watch with
    label selectors (`?watch=true` answers a chunked stream of JSON events, resumes from
    `resourceVersion`, ends after `timeoutSeconds`, sends BOOKMARKs when allowed), 410 Gone
    for a version older than its history (as the ERROR event real servers send on a watch,
    or as the HTTP status), Status objects for errors, and Event creation. It runs on its
    own event loop in a thread, so blocking code and other event loops can use it alike.
    `stall()` makes watches go silent (headers sent, then nothing, the server's timeout
    ignored): what a hung API server or a dead load balancer looks like to a client.

    Faults a watch or a list can bring, one call each: `drop_next_event()` (a change made
    but never delivered), `send_stale()` (an older state of a ConfigMap delivered out of
    order), `send_line()` (a line that is not a proper event), `end_watches()` (each
    watch ended at once), `trickle_lists()` (list answers a few bytes at a time, or
    late), `break_next_list()` (the connection closed halfway through an answer) and
    `answer_next_list()` (any body as the next list's answer).
    """

    def __init__(self) -> None:
        self._objects: dict[tuple[str, str], dict[str, Any]] = {}
        self._history: list[_Change] = []
        self._resource_version = 100
        self._oldest = 0  # watches from before this version get 410 Gone
        self._stalled = False
        self._forbidden = False
        self._closing = False
        self.gone_as_event = True
        self._drop_events = 0
        self._end_watches = False
        self._trickle: float | None = None
        self._trickle_chunk = 64
        self._headers_after = 0.0
        self._list_answers: list[bytes | None] = []  # None: break the answer halfway
        self.bookmark_interval: float | None = None
        self.events: list[dict[str, Any]] = []
        self.requests: list[dict[str, str]] = []
        self._open_watches = 0
        self._loop = asyncio.new_event_loop()
        self._changed: asyncio.Condition | None = None
        self._runner: web.AppRunner | None = None
        self._socket = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    # Lifecycle

    def start(self) -> FakeKubernetes:
        self._thread.start()
        self._call(self._start())
        return self

    def close(self) -> None:
        if self._closing:
            return
        self._call(self._stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    async def _start(self) -> None:
        self._changed = asyncio.Condition()
        app = web.Application()
        app.router.add_get("/api/v1/namespaces/{namespace}/configmaps", self._configmaps)
        app.router.add_post("/api/v1/namespaces/{namespace}/events", self._create_event)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5)
        await self._runner.setup()
        await web.SockSite(self._runner, self._socket).start()

    async def _stop(self) -> None:
        assert self._runner is not None
        assert self._changed is not None
        self._closing = True
        async with self._changed:
            self._changed.notify_all()
        await self._runner.cleanup()
        others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)

    def _call(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=10)

    # What tests do to the "cluster"

    def apply(
        self,
        name: str,
        data: Mapping[str, str],
        *,
        labels: Mapping[str, str] | None = None,
        namespace: str = "default",
        binary_data: Mapping[str, bytes] | None = None,
    ) -> int:
        """Create or replace a ConfigMap (kubectl apply); returns its resourceVersion.
        `binary_data` goes to `binaryData`, base64-encoded as the API server sends it."""
        content: dict[str, Any] = {"data": dict(data)}
        if binary_data is not None:
            content["binaryData"] = {
                key: base64.b64encode(value).decode("ascii") for key, value in binary_data.items()
            }
        return int(self._call(self._apply(namespace, name, content, dict(labels or {}))))

    def delete(self, name: str, *, namespace: str = "default") -> None:
        self._call(self._delete(namespace, name))

    def compact(self) -> None:
        """Forget the history (etcd compaction): older resourceVersions get 410 Gone."""
        self._call(self._compact())

    def stall(self, stalled: bool = True) -> None:
        self._stalled = stalled

    def drop_next_event(self) -> None:
        """The next change is made (lists show it) but no watch ever delivers it."""
        self._drop_events += 1

    def send_stale(self, name: str, *, namespace: str = "default") -> None:
        """Deliver to watches, out of order, the state a ConfigMap had before its last
        change (with that state's older resourceVersion) as a MODIFIED event."""
        self._call(self._send_stale(namespace, name))

    def end_watches(self, ending: bool = True) -> None:
        """End every watch at once, with nothing sent (a proxy that closes streams)."""
        self._end_watches = ending

    def send_line(self, line: bytes) -> None:
        """Send watches `line` as it is, where an event belongs."""
        self._call(self._send_raw(line))

    def trickle_lists(
        self, seconds_per_chunk: float | None, *, chunk: int = 64, headers_after: float = 0.0
    ) -> None:
        """Answer lists `chunk` bytes at a time, `seconds_per_chunk` apart (None: at once):
        each read gets data soon, the whole answer takes long. `headers_after`: send
        nothing at all for that long first."""
        self._trickle = seconds_per_chunk
        self._trickle_chunk = chunk
        self._headers_after = headers_after

    def break_next_list(self) -> None:
        """The next list answer announces its full length, sends half and closes."""
        self._list_answers.append(None)

    def answer_next_list(self, body: bytes) -> None:
        """The next list is answered with `body` (200, JSON), whatever it holds."""
        self._list_answers.append(body)

    def forbid(self, forbidden: bool = True) -> None:
        """Answer 403 as the API server does for a service account without RBAC."""
        self._forbidden = forbidden

    def write_kubeconfig(self, path: Path) -> Path:
        """A kubeconfig for this server, as `kubectl` (and `KUBECONFIG`) would use it."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {"token": "not-checked"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
            "current-context": "fake",
        }
        path.write_text(json.dumps(config), encoding="utf-8")  # JSON is YAML
        return path

    def watches(self) -> list[dict[str, str]]:
        return [query for query in self.requests if query.get("watch") == "true"]

    @property
    def open_watches(self) -> int:
        """Watch streams being served now: what a fleet of watching pods holds open on
        the API server. A client that left is seen (and uncounted) at the next event."""
        return self._open_watches

    async def _apply(
        self, namespace: str, name: str, content: dict[str, Any], labels: dict[str, str]
    ) -> str:
        before = self._objects.get((namespace, name))
        self._resource_version += 1
        after = {
            "kind": "ConfigMap",
            "apiVersion": "v1",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "labels": labels,
                "uid": f"uid-{namespace}-{name}",
                "resourceVersion": str(self._resource_version),
            },
            **content,
        }
        self._objects[(namespace, name)] = after
        kind = "MODIFIED" if before else "ADDED"
        await self._record(_Change(self._resource_version, kind, before, after))
        return str(self._resource_version)

    async def _delete(self, namespace: str, name: str) -> None:
        before = self._objects.pop((namespace, name))
        self._resource_version += 1
        gone = copy.deepcopy(before)
        gone["metadata"]["resourceVersion"] = str(self._resource_version)
        await self._record(_Change(self._resource_version, "DELETED", before, gone))

    async def _send_stale(self, namespace: str, name: str) -> None:
        def is_it(obj: Mapping[str, Any] | None) -> bool:
            return obj is not None and (
                obj["metadata"]["namespace"],
                obj["metadata"]["name"],
            ) == (namespace, name)

        last = next(c for c in reversed(self._history) if is_it(c.after) or is_it(c.before))
        if last.before is None:
            raise ValueError(f"ConfigMap {name} has no state before its last change")
        self._resource_version += 1
        await self._record(_Change(self._resource_version, "MODIFIED", last.before, last.before))

    async def _send_raw(self, line: bytes) -> None:
        self._resource_version += 1
        await self._record(_Change(self._resource_version, "RAW", None, None, raw=line))

    async def _compact(self) -> None:
        self._history.clear()
        self._oldest = self._resource_version + 1

    async def _record(self, change: _Change) -> None:
        assert self._changed is not None
        if self._drop_events and change.raw is None:
            self._drop_events -= 1
            change.hidden = True
        self._history.append(change)
        async with self._changed:
            self._changed.notify_all()

    # The API

    async def _configmaps(self, request: web.Request) -> web.StreamResponse:
        query = dict(request.query)
        self.requests.append(query)
        namespace = request.match_info["namespace"]
        if self._forbidden:
            message = (
                'configmaps is forbidden: User "system:serviceaccount:default:app" cannot '
                f'list resource "configmaps" in API group "" in the namespace "{namespace}"'
            )
            return web.json_response(_status(403, "Forbidden", message), status=403)
        selector = query.get("labelSelector", "")
        if query.get("watch") == "true":
            return await self._watch(request, namespace, selector, query)
        items = [
            obj
            for (space, _), obj in sorted(self._objects.items())
            if space == namespace and _selects(selector, obj["metadata"]["labels"])
        ]
        listing = {
            "kind": "ConfigMapList",
            "apiVersion": "v1",
            "metadata": {"resourceVersion": str(self._resource_version)},
            "items": items,
        }
        body = json.dumps(listing).encode()
        broken = False
        if self._list_answers:
            answer = self._list_answers.pop(0)
            broken = answer is None
            body = body if answer is None else answer
        return await self._answer_list(request, body, broken=broken)

    async def _answer_list(
        self, request: web.Request, body: bytes, *, broken: bool
    ) -> web.StreamResponse:
        """`body` at once, trickled, or (`broken`) cut off halfway."""
        await asyncio.sleep(self._headers_after)
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.content_length = len(body)
        await response.prepare(request)
        if broken:
            await response.write(body[: len(body) // 2])
            assert request.transport is not None
            request.transport.close()
            return response
        step = self._trickle_chunk if self._trickle else len(body)
        with contextlib.suppress(ConnectionResetError):
            for start in range(0, len(body), step):
                await response.write(body[start : start + step])
                if self._trickle and start + step < len(body):
                    await asyncio.sleep(self._trickle)
            await response.write_eof()
        return response

    async def _watch(
        self, request: web.Request, namespace: str, selector: str, query: Mapping[str, str]
    ) -> web.StreamResponse:
        since = int(query.get("resourceVersion") or self._resource_version)
        if since < self._oldest - 1:
            gone = _status(410, "Expired", f"too old resource version: {since} ({self._oldest})")
            if not self.gone_as_event:
                return web.json_response(gone, status=410)
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        if since < self._oldest - 1:
            await self._send(response, {"type": "ERROR", "object": gone})
            return response
        if self._end_watches:
            return response
        timeout = float(query.get("timeoutSeconds", "1800"))
        bookmarks = query.get("allowWatchBookmarks") == "true" and self.bookmark_interval
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        next_bookmark = loop.time() + (self.bookmark_interval or 0)
        assert self._changed is not None
        self._open_watches += 1
        try:
            with contextlib.suppress(ConnectionResetError):
                while not self._closing and (loop.time() < deadline or self._stalled):
                    if self._stalled:
                        await asyncio.sleep(0.05)
                        continue
                    for event in self._events_since(since, namespace, selector):
                        await self._send(response, event)
                    since = self._resource_version
                    if bookmarks and loop.time() >= next_bookmark:
                        await self._send(response, self._bookmark())
                        next_bookmark = loop.time() + (self.bookmark_interval or 0)
                    wait = deadline - loop.time()
                    if bookmarks:
                        wait = min(wait, next_bookmark - loop.time())
                    async with self._changed:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._changed.wait(), max(wait, 0.0))
        finally:
            self._open_watches -= 1
        return response

    def _events_since(
        self, since: int, namespace: str, selector: str
    ) -> Iterator[dict[str, Any] | bytes]:
        """What a watcher sees: an object that stops matching is DELETED, one that starts
        matching is ADDED (as with a real label-selected watch, whose DELETED carries the
        object as it last matched: a watcher never sees an object outside its selector)."""
        for change in self._history:
            if change.resource_version <= since or change.hidden:
                continue
            if change.raw is not None:
                yield change.raw
                continue
            was = change.before if self._visible(change.before, namespace, selector) else None
            obj = change.after
            now = change.kind != "DELETED" and self._visible(obj, namespace, selector)
            if was is not None and not now:  # the last state it matched in, at this version
                gone = copy.deepcopy(was)
                gone["metadata"]["resourceVersion"] = str(change.resource_version)
                yield {"type": "DELETED", "object": gone}
            elif now:
                yield {"type": "ADDED" if was is None else "MODIFIED", "object": obj}

    @staticmethod
    def _visible(obj: Mapping[str, Any] | None, namespace: str, selector: str) -> bool:
        return (
            obj is not None
            and obj["metadata"]["namespace"] == namespace
            and _selects(selector, obj["metadata"]["labels"])
        )

    def _bookmark(self) -> dict[str, Any]:
        return {
            "type": "BOOKMARK",
            "object": {
                "kind": "ConfigMap",
                "apiVersion": "v1",
                "metadata": {"resourceVersion": str(self._resource_version)},
            },
        }

    @staticmethod
    async def _send(response: web.StreamResponse, event: Mapping[str, Any] | bytes) -> None:
        line = event if isinstance(event, bytes) else json.dumps(event).encode()
        await response.write(line + b"\n")

    async def _create_event(self, request: web.Request) -> web.Response:
        body = await request.json()
        if body.get("kind") != "Event" or not body.get("involvedObject"):
            return web.json_response(_status(422, "Invalid", "not an Event"), status=422)
        body["metadata"]["namespace"] = request.match_info["namespace"]
        self.events.append(body)
        return web.json_response(body, status=201)


class TcpProxy:
    """A TCP forwarder on 127.0.0.1 to `target`, one thread per direction.

    `freeze()` stops moving bytes both ways while every connection stays open and the
    kernel keeps acknowledging them: what a peer sees of a proxy stopped with
    `kill -STOP`, or of a hung host. `thaw()` lets the held bytes through again.
    """

    def __init__(self, target: tuple[str, int]) -> None:
        self._target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._flowing = threading.Event()
        self._flowing.set()
        self._sockets: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def freeze(self) -> None:
        self._flowing.clear()

    def thaw(self) -> None:
        self._flowing.set()

    def close(self) -> None:
        """End every connection (frozen or not) and stop listening."""
        self._closed = True
        self._flowing.set()
        for sock in [self._listener, *self._sockets]:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
                server = socket.create_connection(self._target)
            except OSError:
                return
            self._sockets += [client, server]
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                self._flowing.wait()  # frozen: what was read is held, nothing moves on
                if self._closed:
                    return
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)

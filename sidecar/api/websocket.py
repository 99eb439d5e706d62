"""WebSocket fan-out of reload events (the hot-reload contract's ReloadNotificationManager).

Every message has the contract's shape `{"event_type", "timestamp", "data"}` plus `seq`, a
number that grows by one per broadcast, and `instance`, a random id drawn when this
manager (so this server process) starts. `seq` counts anew from 0 in every instance, so
a number means nothing without the instance it counts in: a client that reconnects with
`?instance=I&last_seq=N` gets what it missed from a bounded buffer, or one
`resync_required` message when it cannot: the gap is older than the buffer, `I` is
another instance (the server restarted, or this is another replica), or no instance was
given (a bare `last_seq` from before a restart looks exactly like one from now).

Clients read from that one shared buffer: each has only a cursor (the last `seq` handed
to it) and a small queue of replies (status, pong, error), drained by its own task. So
memory does not grow with the number of clients, a replay of the whole buffer fits
whatever its size, and a client is too slow exactly when the buffer has dropped a
broadcast it has not yet taken: it is then disconnected (close code 1013), logged once,
and never delays reloads or other clients.

One publish can change thousands of rules, all broadcast in one go before any client
can read. The first `changes_per_version` change events of a registry version go out one
by one; after that a single `changes_omitted` message stands for the rest (re-read the
registry; the `rules_reloaded` record that follows has the totals). So one reload puts a
bounded number of messages in the buffer, and a prompt reader survives a change of any
size.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from collections import deque
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Final

from aiohttp import WSCloseCode, WSMsgType, web

from sidecar.registry import EventType

__all__ = ["ReloadNotificationManager", "ResyncReason"]

logger = logging.getLogger("sidecar.websocket")

StatusProvider = Callable[[], Mapping[str, Any]]


_KICK_TIMEOUT: Final = 1.0  # seconds a dropped client gets to take its close frame
_CHANGE_EVENTS: Final = frozenset(event.value for event in EventType)
CHANGES_OMITTED: Final = "changes_omitted"


class ResyncReason(StrEnum):
    """Why a client's position cannot be resumed from (`resync_required`'s `reason`)."""

    TOO_OLD = "too_old"  # the buffer no longer holds what follows it
    OTHER_INSTANCE = "other_instance"  # it counts in another instance: a restart, a replica
    NO_INSTANCE = "no_instance"  # a bare last_seq: which instance it counts in is unknown
    NEVER_SENT = "never_sent"  # ahead of anything this instance has sent


class _Client:
    __slots__ = ("closing", "cursor", "dropped", "replies", "socket", "transport", "wake", "writer")

    def __init__(
        self, socket: web.WebSocketResponse, transport: asyncio.Transport | None, cursor: int
    ) -> None:
        self.socket = socket
        self.transport = transport
        self.cursor = cursor  # seq of the last broadcast handed to the writer
        self.replies: deque[tuple[int, str]] = deque()  # (seq when made, text)
        self.wake = asyncio.Event()
        self.writer: asyncio.Task[None] | None = None
        self.closing: asyncio.Task[None] | None = None
        self.dropped = False

    async def kick(self) -> None:
        """Close a client that does not keep up; one that does not even take the close
        frame has its connection cut, so it holds nothing of ours for long."""
        if self.writer is not None:
            self.writer.cancel()
        try:
            close = self.socket.close(code=WSCloseCode.TRY_AGAIN_LATER, message=b"too slow")
            await asyncio.wait_for(close, _KICK_TIMEOUT)
        except (TimeoutError, ConnectionError, RuntimeError):
            if self.transport is not None:
                self.transport.abort()


class ReloadNotificationManager:
    def __init__(
        self,
        status: StatusProvider,
        *,
        buffer_size: int = 1000,
        queue_size: int = 256,
        max_clients: int = 100,
        changes_per_version: int = 100,
        on_count: Callable[[int], None] | None = None,
    ) -> None:
        """`buffer_size`: broadcasts kept for replay, and how far a client may lag.
        `queue_size`: replies a client that does not read may have waiting.
        `changes_per_version`: change events sent one by one per registry version (at
        most a quarter of the buffer, so that one publish never floods it)."""
        if buffer_size < 1 or queue_size < 1:
            raise ValueError("buffer_size and queue_size must be at least 1")
        self._status = status
        self._buffer: deque[tuple[int, str]] = deque(maxlen=buffer_size)
        self._queue_size = queue_size
        self._max_clients = max_clients
        self._changes_per_version = max(1, min(changes_per_version, buffer_size // 4))
        self._clients: set[_Client] = set()
        self._instance = secrets.token_hex(8)
        self._seq = 0
        self._change_version: object = None
        self._changes_seen = 0
        self._on_count = on_count or (lambda _count: None)

    @property
    def client_count(self) -> int:
        return len(self._clients)

    @property
    def instance(self) -> str:
        """This instance's id: what `seq` counts in (also part of the registry reads' ETag)."""
        return self._instance

    def broadcast(self, event_type: str, data: Mapping[str, Any]) -> int:
        """Send a message to every client; returns the latest seq (a change event past
        the per-version limit takes none). Never waits."""
        if event_type in _CHANGE_EVENTS and self._omitted(data):
            return self._seq
        self._seq += 1
        self._buffer.append((self._seq, self._encode(event_type, data, self._seq)))
        oldest = self._buffer[0][0]
        for client in list(self._clients):
            if client.cursor + 1 < oldest:  # its next broadcast is gone: it cannot keep up
                self._drop_slow(client)
            else:
                client.wake.set()
        return self._seq

    async def handle(
        self, request: web.Request, *, protocol: str | None = None
    ) -> web.WebSocketResponse:
        """Serve one WebSocket client until it leaves or is dropped.

        `protocol`: a subprotocol the client offered that the answer must select.
        """
        socket = web.WebSocketResponse(
            heartbeat=30.0, max_msg_size=64 * 1024, protocols=(protocol,) if protocol else ()
        )
        await socket.prepare(request)
        if len(self._clients) >= self._max_clients:
            await socket.close(code=WSCloseCode.TRY_AGAIN_LATER, message=b"too many clients")
            return socket
        client = _Client(socket, request.transport, self._seq)
        self._clients.add(client)
        self._on_count(len(self._clients))
        client.writer = asyncio.create_task(self._write(client))
        try:
            self._resume(client, request.query)
            self._reply(client, "status", self._status())
            await self._read(client)
        finally:
            self._forget(client)
            if client.writer is not None:
                client.writer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await client.writer
        return socket

    async def close_all(self, code: int = WSCloseCode.GOING_AWAY) -> None:
        """Close every client (SIGTERM drain)."""
        for client in list(self._clients):
            with contextlib.suppress(Exception):
                await client.socket.close(code=code, message=b"server shutdown")

    def _omitted(self, data: Mapping[str, Any]) -> bool:
        """Count a change event of its registry version; True when it is past the limit.
        The first one past it is replaced by one `changes_omitted` broadcast."""
        version = data.get("registry_version")
        if version != self._change_version:
            self._change_version, self._changes_seen = version, 0
        self._changes_seen += 1
        if self._changes_seen <= self._changes_per_version:
            return False
        if self._changes_seen == self._changes_per_version + 1:
            summary = {"registry_version": version, "sent": self._changes_per_version}
            self.broadcast(CHANGES_OMITTED, summary)
        return True

    def _encode(self, event_type: str, data: Mapping[str, Any], seq: int) -> str:
        message = {
            "event_type": event_type,
            "timestamp": datetime.now(UTC).isoformat(),
            "instance": self._instance,
            "seq": seq,
            "data": data,
        }
        return json.dumps(message, default=str)

    def _resume(self, client: _Client, query: Mapping[str, str]) -> None:
        """Start the client's cursor at `last_seq` when it counts in this instance and the
        buffer still holds what follows it (the writer replays from there); otherwise say
        why and start at the latest."""
        last_seq, instance = query.get("last_seq"), query.get("instance")
        if last_seq is None:
            if instance is not None:
                self._reply(client, "error", {"message": "instance needs last_seq"})
            return
        try:
            seen = int(last_seq)
        except ValueError:
            self._reply(client, "error", {"message": "last_seq must be an integer"})
            return
        reason = self._unresumable(seen, instance)
        if reason is not None:
            gap = {
                "reason": reason.value,
                "last_seq": seen,
                "oldest_available": self._oldest(),
                "current_seq": self._seq,
            }
            self._reply(client, "resync_required", gap)
            return
        client.cursor = seen

    def _unresumable(self, seen: int, instance: str | None) -> ResyncReason | None:
        """Why the client cannot resume after `seen` of `instance`; None when it can."""
        if instance is None:
            return ResyncReason.NO_INSTANCE
        if instance != self._instance:
            return ResyncReason.OTHER_INSTANCE
        if seen > self._seq:
            return ResyncReason.NEVER_SENT
        if seen + 1 < self._oldest():
            return ResyncReason.TOO_OLD
        return None

    def _oldest(self) -> int:
        """The oldest seq the buffer holds (the next one while it is empty)."""
        return self._buffer[0][0] if self._buffer else self._seq + 1

    def _reply(self, client: _Client, event_type: str, data: Mapping[str, Any]) -> None:
        """A message for this client only, sent after the broadcasts made before it."""
        if client.dropped:
            return
        if len(client.replies) >= self._queue_size:
            self._drop_slow(client)
            return
        client.replies.append((self._seq, self._encode(event_type, data, self._seq)))
        client.wake.set()

    def _next(self, client: _Client) -> str | None:
        """The client's next message: its replies wait for the broadcasts made before them."""
        if client.replies and client.replies[0][0] <= client.cursor:
            return client.replies.popleft()[1]
        if client.cursor < self._seq:
            index = client.cursor + 1 - self._buffer[0][0]
            if index < 0:
                self._drop_slow(client)
                return None
            client.cursor, text = self._buffer[index]
            return text
        return None

    def _drop_slow(self, client: _Client) -> None:
        """Disconnect a client that cannot keep up: once, with one log line."""
        if client.dropped:
            return
        client.dropped = True
        client.replies.clear()
        logger.warning(
            "dropping a WebSocket client that does not keep up (at seq %d of %d)",
            client.cursor,
            self._seq,
        )
        self._forget(client)
        client.closing = asyncio.ensure_future(client.kick())

    def _forget(self, client: _Client) -> None:
        if client in self._clients:
            self._clients.discard(client)
            self._on_count(len(self._clients))

    async def _write(self, client: _Client) -> None:
        while not client.dropped:
            text = self._next(client)
            if text is None:
                client.wake.clear()
                await client.wake.wait()
                continue
            try:
                await client.socket.send_str(text)
            except (ConnectionError, RuntimeError):
                self._forget(client)
                return

    async def _read(self, client: _Client) -> None:
        async for message in client.socket:
            if message.type is not WSMsgType.TEXT:
                continue
            try:
                request = json.loads(message.data)
                kind = request.get("type") if isinstance(request, dict) else None
            except (ValueError, RecursionError):  # not JSON, or nested too deep
                kind = None
            if kind == "ping":
                self._reply(client, "pong", {})
            elif kind == "status":
                self._reply(client, "status", self._status())
            else:
                error = {"message": 'unknown request; send {"type": "ping"} or {"type": "status"}'}
                self._reply(client, "error", error)

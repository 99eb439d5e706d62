"""WebSocket fan-out of reload events (the seed's ReloadNotificationManager).

Every message has the seed's shape `{"event_type", "timestamp", "data"}` plus `seq`, a
number that grows by one per broadcast. A client that reconnects with `?last_seq=N`
gets what it missed from a bounded buffer, or a `resync_required` message when the gap
is older than the buffer. Each client has a bounded queue drained by its own task: a
slow or stuck client is disconnected (close code 1013) when its queue fills, and never
delays reloads or other clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web

__all__ = ["ReloadNotificationManager"]

logger = logging.getLogger("sidecar.websocket")

StatusProvider = Callable[[], dict[str, Any]]


_KICK_TIMEOUT = 1.0  # seconds a dropped client gets to take its close frame


class _Client:
    __slots__ = ("closing", "queue", "socket", "transport", "writer")

    def __init__(
        self, socket: web.WebSocketResponse, transport: asyncio.Transport | None, queue_size: int
    ) -> None:
        self.socket = socket
        self.transport = transport
        self.queue: asyncio.Queue[str] = asyncio.Queue(maxsize=queue_size)
        self.writer: asyncio.Task[None] | None = None
        self.closing: asyncio.Task[None] | None = None

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
        on_count: Callable[[int], None] | None = None,
    ) -> None:
        self._status = status
        self._buffer: deque[tuple[int, str]] = deque(maxlen=buffer_size)
        self._queue_size = queue_size
        self._max_clients = max_clients
        self._clients: set[_Client] = set()
        self._seq = 0
        self._on_count = on_count or (lambda _count: None)

    @property
    def client_count(self) -> int:
        return len(self._clients)

    def broadcast(self, event_type: str, data: dict[str, Any]) -> int:
        """Queue a message for every client; returns its sequence number. Never waits."""
        self._seq += 1
        text = self._encode(event_type, data, self._seq)
        self._buffer.append((self._seq, text))
        for client in list(self._clients):
            self._offer(client, text)
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
        client = _Client(socket, request.transport, self._queue_size)
        self._clients.add(client)
        self._on_count(len(self._clients))
        client.writer = asyncio.create_task(self._write(client))
        try:
            self._replay(client, request.query.get("last_seq"))
            self._offer(client, self._encode("status", self._status(), self._seq))
            await self._read(client)
        finally:
            self._drop(client)
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

    def _encode(self, event_type: str, data: dict[str, Any], seq: int) -> str:
        message = {
            "event_type": event_type,
            "timestamp": datetime.now(UTC).isoformat(),
            "seq": seq,
            "data": data,
        }
        return json.dumps(message, default=str)

    def _replay(self, client: _Client, last_seq: str | None) -> None:
        if last_seq is None:
            return
        try:
            seen = int(last_seq)
        except ValueError:
            self._offer(
                client, self._encode("error", {"message": "last_seq must be an integer"}, self._seq)
            )
            return
        oldest = self._buffer[0][0] if self._buffer else self._seq + 1
        # Older than the buffer, or ahead of this server (it restarted and counts anew).
        if (seen + 1 < oldest and seen < self._seq) or seen > self._seq:
            gap = {"last_seq": seen, "oldest_available": oldest, "current_seq": self._seq}
            self._offer(client, self._encode("resync_required", gap, self._seq))
            return
        for seq, text in self._buffer:
            if seq > seen:
                self._offer(client, text)

    def _offer(self, client: _Client, text: str) -> None:
        try:
            client.queue.put_nowait(text)
        except asyncio.QueueFull:
            logger.warning("dropping a WebSocket client that does not keep up")
            self._drop(client)
            client.closing = asyncio.ensure_future(client.kick())

    def _drop(self, client: _Client) -> None:
        if client in self._clients:
            self._clients.discard(client)
            self._on_count(len(self._clients))

    async def _write(self, client: _Client) -> None:
        while True:
            text = await client.queue.get()
            try:
                await client.socket.send_str(text)
            except (ConnectionError, RuntimeError):
                self._drop(client)
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
                self._offer(client, self._encode("pong", {}, self._seq))
            elif kind == "status":
                self._offer(client, self._encode("status", self._status(), self._seq))
            else:
                error = {"message": 'unknown request; send {"type": "ping"} or {"type": "status"}'}
                self._offer(client, self._encode("error", error, self._seq))

"""A load generator at a fixed request rate, with latency measured from each request's
scheduled time (not from when it could be sent), so that a server that stalls is
charged for every request it delayed: `wrk` sends as fast as answers come back, which
hides a stall behind fewer requests (coordinated omission).

    python -m bench._fixed_rate URL BODY_FILE --rate 2000 --seconds 10 [--connections 64]

prints one JSON object: requests scheduled and answered, non-2xx answers, errors, and the
latency quantiles in ms. Keep-alive HTTP/1.1 over raw asyncio streams, so that the
client's own cost per request stays far below the server's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from urllib.parse import urlsplit

import uvloop

from bench._common import quantile


class Load:
    """One run: slots handed out in schedule order to whichever connection is free."""

    def __init__(self, rate: float, seconds: float) -> None:
        self.interval = 1.0 / rate
        self.total = int(rate * seconds)
        self.next_slot = 0
        self.start = 0.0
        self.latencies: list[float] = []
        self.sent_at: list[float] = []  # each answered request's scheduled time, from start
        self.statuses: dict[int, int] = {}
        self.errors = 0

    def take(self) -> float | None:
        """The scheduled time of the next request, or None when all are handed out."""
        if self.next_slot >= self.total:
            return None
        slot = self.next_slot
        self.next_slot += 1
        return self.start + slot * self.interval


async def _read_answer(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    await reader.readexactly(length)
    return status


async def _connection(load: Load, host: str, port: int, request: bytes) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while (scheduled := load.take()) is not None:
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            writer.write(request)
            try:
                status = await _read_answer(reader)
            except (OSError, asyncio.IncompleteReadError, ValueError):
                load.errors += 1
                writer.close()
                reader, writer = await asyncio.open_connection(host, port)
                continue
            load.latencies.append((time.perf_counter() - scheduled) * 1000)
            load.sent_at.append(scheduled - load.start)
            load.statuses[status] = load.statuses.get(status, 0) + 1
    finally:
        writer.close()


async def run(url: str, body: bytes, rate: float, seconds: float, connections: int) -> Load:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    request = (
        f"POST {parts.path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    load = Load(rate, seconds)
    load.start = time.perf_counter() + 0.05
    await asyncio.gather(*(_connection(load, host, port, request) for _ in range(connections)))
    return load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("body_file")
    parser.add_argument("--rate", type=float, default=2000)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--trace", help="write 'seconds-from-start latency-ms' lines here")
    args = parser.parse_args()
    with open(args.body_file, "rb") as file:
        body = file.read()
    load = uvloop.run(run(args.url, body, args.rate, args.seconds, args.connections))
    if args.trace:
        with open(args.trace, "w") as trace:
            trace.writelines(
                f"{at:.4f} {ms:.3f}\n" for at, ms in zip(load.sent_at, load.latencies, strict=True)
            )
    latencies = load.latencies or [0.0]
    ok = sum(count for status, count in load.statuses.items() if 200 <= status < 300)
    print(
        json.dumps(
            {
                "scheduled": load.total,
                "answered": len(load.latencies),
                "non_2xx": len(load.latencies) - ok,
                "errors": load.errors,
                "p50": quantile(latencies, 0.5),
                "p90": quantile(latencies, 0.9),
                "p99": quantile(latencies, 0.99),
                "max": max(latencies),
            }
        )
    )


if __name__ == "__main__":
    main()

"""Shared helpers for the benchmark scripts: summaries, formatting, environment notes."""

from __future__ import annotations

import asyncio
import hashlib
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import aiohttp

__all__ = ["code_digest", "describe", "environment", "fmt_ms", "fmt_us", "quantile", "rss_bytes"]


def quantile(values: Sequence[float], q: float) -> float:
    """Nearest-rank-with-interpolation quantile (q in [0, 1])."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def describe(values: Sequence[float]) -> dict[str, float]:
    """Median and spread of repeated measurements."""
    return {
        "n": len(values),
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "p10": quantile(values, 0.10),
        "p90": quantile(values, 0.90),
    }


def fmt_ms(values: Sequence[float], target_s: float | None = None) -> str:
    """Seconds in, one line out: median [min..max] ms (n runs), ratio to target."""
    d = describe(values)
    text = (
        f"median {d['median'] * 1e3:9.1f} ms  [min {d['min'] * 1e3:.1f} .. "
        f"max {d['max'] * 1e3:.1f}; p10 {d['p10'] * 1e3:.1f} p90 {d['p90'] * 1e3:.1f}]  "
        f"n={d['n']}"
    )
    if target_s is not None:
        text += f"  target {target_s * 1e3:.0f} ms -> ratio {d['median'] / target_s:.2f}"
    return text


def fmt_us(values: Sequence[float], target_us: float | None = None) -> str:
    """Microseconds in, one line out: median [p10..p90, min..max] us, ratio to target."""
    d = describe(values)
    text = (
        f"median {d['median']:8.2f} us  [p10 {d['p10']:.2f} p90 {d['p90']:.2f}; "
        f"min {d['min']:.2f} max {d['max']:.2f}]  n={d['n']}"
    )
    if target_us is not None:
        text += f"  target {target_us:.0f} us -> ratio {d['median'] / target_us:.2f}"
    return text


def rss_bytes() -> int:
    """Current resident set size (Linux /proc); 0 where unavailable."""
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def code_digest() -> str:
    """Short digest of sidecar/*.py, so figures can be tied to the code measured."""
    root = Path(__file__).resolve().parent.parent / "sidecar"
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def environment() -> str:
    try:
        load = "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except OSError:
        load = "load average unknown"
    return (
        f"python {platform.python_version()} on {platform.machine()}, "
        f"{os.cpu_count()} CPUs, {load}, sidecar code {code_digest()}, "
        f"argv {' '.join(sys.argv[1:])!r}"
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def wait_ready(session: aiohttp.ClientSession, base: str, deadline: float) -> None:
    """Poll `/readyz` until the sidecar at `base` serves, or fail at `deadline`."""
    while time.monotonic() < deadline:
        try:
            async with session.get(f"{base}/readyz") as response:
                if response.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.05)
    raise RuntimeError("the sidecar did not become ready")


def sidecar_command(
    port: int,
    *arguments: str,
    prefix: Sequence[str] = (),
    module: str = "sidecar.cli",
    **extra_env: str,
) -> tuple[list[str], dict[str, str]]:
    """The command and environment of `rule-sidecar serve --port PORT ARGUMENTS...`, quiet
    and with only the sources given (no periodic resync in the way); `module` runs a
    bench's variant of the command instead."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key
        not in ("RULE_SIDECAR_RULES_DIR", "RULE_SIDECAR_DATABASE_URL", "KUBERNETES_SERVICE_HOST")
    }
    env.update(HOT_RELOAD_INTERVAL_SECONDS="3600", RULE_SIDECAR_LOG_LEVEL="WARNING")
    env.update(extra_env)
    command = [*prefix, sys.executable, "-m", module, "serve", "--port", str(port)]
    return [*command, *arguments], env


@contextmanager
def sidecar_process(
    port: int,
    *arguments: str,
    prefix: Sequence[str] = (),
    module: str = "sidecar.cli",
    **extra_env: str,
) -> Iterator[subprocess.Popen[bytes]]:
    """`sidecar_command` as a separate process, stopped at the end."""
    command, env = sidecar_command(port, *arguments, prefix=prefix, module=module, **extra_env)
    server = subprocess.Popen(command, env=env)
    try:
        yield server
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()

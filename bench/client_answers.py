"""What an answer costs `sidecar.client`: peak RSS and time of the client process.

A server in a process of its own answers `GET /api/v1/rules/hot-reload/status` with a
status padded to 300 MB (streamed from one 1 MiB buffer), and `GET /api/v1/rules` with a
listing of 50,000 rules (about 14 MB, what a large registry answers). For each, a fresh
client process asks once and prints its peak RSS before and after, the time, and the
outcome. `--code DIR` runs another checkout's `sidecar` as the client (e.g. an export
of main: `git -C /work/main archive HEAD | tar -x -C /tmp/main`).

    python -m bench.client_answers [--quick] [--code DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from bench._common import free_port

REPO = Path(__file__).resolve().parent.parent

SERVER = r"""
import json, sys
from aiohttp import web

CHUNK = b"0" * (1024 * 1024)
PADDED_MB, RULES = int(sys.argv[2]), int(sys.argv[3])
REGISTRY = {"version": 1, "revision": "0123456789abcdef", "rule_count": RULES,
            "ruleset_count": RULES // 10, "last_reload": None}
RULE = {"ruleset_id": "s", "name": "A rule", "description": "", "points": 10,
        "condition": "input.amount > 100 && input.country != 'US'", "enabled": True,
        "priority": 0, "tags": ["a"], "metadata": {}, "source": {"file": "/r.yaml", "line": 1}}
LISTING = json.dumps({"registry_version": 1, "revision": "0123456789abcdef", "count": RULES,
                      "rules": [RULE | {"id": f"r{i}"} for i in range(RULES)]}).encode()

async def status(request):
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    await response.prepare(request)
    head = {"monitoring_active": True, "last_successful_check_time": None, "registry": REGISTRY}
    try:  # the pad inside "registry": what get_registry_info() returns
        await response.write(json.dumps(head)[:-2].encode() + b', "pad": "')
        for _ in range(PADDED_MB):
            await response.write(CHUNK)
        await response.write(b'"}}')
    except ConnectionError:
        pass
    return response

async def rules(request):
    return web.Response(body=LISTING, content_type="application/json")

app = web.Application()
app.router.add_get("/api/v1/rules/hot-reload/status", status)
app.router.add_get("/api/v1/rules", rules)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None)
"""

CLIENT = r"""
import asyncio, json, resource, sys, time
from sidecar.client import AsyncRuleClient, SidecarError

def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

async def measure(call):
    before, start = peak_mb(), time.perf_counter()
    try:
        outcome = await call()
    except SidecarError as exc:
        outcome = f"{type(exc).__name__}: {str(exc)[:90]}"
    return {"before_mb": before, "after_mb": peak_mb(),
            "seconds": time.perf_counter() - start, "outcome": outcome}

async def main():
    async with AsyncRuleClient(f"http://127.0.0.1:{sys.argv[1]}", timeout=120) as client:
        async def padded():
            pad = (await client.get_registry_info()).get("pad", "")
            return f"read whole ({len(pad) / 1e6:.0f} MB pad)"
        async def listing():
            return f"{len(await client.get_rules_from_registry())} rules"
        call = {"listing": listing, "padded": padded}[sys.argv[2]]
        print(json.dumps(await measure(call)), flush=True)

asyncio.run(main())
"""


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"the answer server did not listen on {port}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 64 MB answer, 10,000 rules")
    parser.add_argument("--code", type=Path, default=REPO, help="the checkout whose client runs")
    arguments = parser.parse_args()
    padded_mb, rules = (64, 10_000) if arguments.quick else (300, 50_000)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(port), str(padded_mb), str(rules)])
    try:
        wait_for_port(port)
        print(f"client code: {arguments.code.resolve()}")
        env = dict(os.environ, PYTHONPATH=str(arguments.code.resolve()))
        for answer, label in (("listing", f"{rules} rules"), ("padded", f"{padded_mb} MB status")):
            result = subprocess.run(
                [sys.executable, "-c", CLIENT, str(port), answer],
                env=env,
                cwd=arguments.code,
                capture_output=True,
                text=True,
                check=True,
            )
            row = json.loads(result.stdout)
            print(
                f"{label:>16}: peak RSS {row['before_mb']:.0f} -> {row['after_mb']:.0f} MB "
                f"in {row['seconds']:.2f} s; {row['outcome']}"
            )
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()

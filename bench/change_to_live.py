"""Change-to-live latency: a ConfigMap change until the new rules serve.

Starts `rule-sidecar serve` as a separate process, then repeats: change one rule's points
and measure from the change to
  - the `rules_reloaded` WebSocket event announcing the new version, and
  - the first evaluate response that carries the new version and the new points
    (a client polling back to back).

Two ways a ConfigMap change reaches the sidecar:
  --source files       a `..data` swap in a ConfigMap-style directory
                       (`sidecar.testing.ConfigMapDir`, the kubelet's atomic-writer
                       sequence; in a cluster the kubelet's 60-90 s sync comes first);
  --source kubernetes  an update of the ConfigMap on an API server that the sidecar
                       watches (`--kubernetes-selector`), here `sidecar.testing.
                       FakeKubernetes`, which speaks the list/watch protocol over HTTP
                       (a real API server adds its own etcd write and fan-out).

Targets (issue 3, files): p50 < 30 ms, p99 < 100 ms. For comparison, the flagd Python
provider's file mode (mtime polling) measured 262 ms median at its default 500 ms poll.

    /work/venv/bin/python -m bench.change_to_live                       # 200 swaps, files
    /work/venv/bin/python -m bench.change_to_live --source kubernetes   # 200 API updates
    /work/venv/bin/python -m bench.change_to_live --quick               # 20 changes
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp

from bench._common import environment, fmt_ms, free_port, quantile, sidecar_process, wait_ready
from sidecar.testing import ConfigMapDir, FakeKubernetes

RULES = """\
apiVersion: rule-sidecar/v1
kind: RuleSet
metadata: {{id: latency}}
spec:
  rules:
    - {{id: changing, condition: "input.amount > 10", points: {points}}}
    - {{id: steady, condition: "has(input.country) && input.country == 'FR'", points: 5}}
"""


async def poll_live(session: aiohttp.ClientSession, base: str, points: int) -> float:
    """Evaluate back to back until the new points answer; returns when that happened."""
    while True:
        async with session.post(
            f"{base}/api/v1/rulesets/latency/evaluate", json={"input": {"amount": 100}}
        ) as response:
            body = await response.json()
        if body["total_points"] == points:
            return time.perf_counter()


Publish = Callable[[int], object]  # puts rules with these points where the sidecar looks


@contextlib.contextmanager
def files_source(tmp: Path, port: int) -> Iterator[Publish]:
    volume = ConfigMapDir(tmp / "rules")
    volume.publish({"rules.yaml": RULES.format(points=1)})
    with sidecar_process(port, "--rules-dir", str(volume.root)):
        yield lambda points: volume.publish({"rules.yaml": RULES.format(points=points)})


@contextlib.contextmanager
def kubernetes_source(tmp: Path, port: int) -> Iterator[Publish]:
    kube = FakeKubernetes().start()
    labels = {"rule-sidecar/rules": "bench"}

    def publish(points: int) -> int:
        return kube.apply("rules", {"rules.yaml": RULES.format(points=points)}, labels=labels)

    publish(1)
    kubeconfig = kube.write_kubeconfig(tmp / "kubeconfig")
    arguments = ("--kubernetes-selector", "rule-sidecar/rules=bench")
    try:
        with sidecar_process(
            port, *arguments, "--kubernetes-namespace", "default", KUBECONFIG=str(kubeconfig)
        ):
            yield publish
    finally:
        kube.close()


SOURCES = {"files": files_source, "kubernetes": kubernetes_source}


async def run(changes: int, source: str) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp, SOURCES[source](Path(tmp), port) as publish:
        async with aiohttp.ClientSession() as session:
            await wait_ready(session, base, time.monotonic() + 20)
            to_event, to_live = await measure(session, base, publish, changes)
    print(environment())
    print(f"source: {source}; changes: {changes}")
    for label, values in (
        ("change -> rules_reloaded event", to_event),
        ("change -> evaluate answers new", to_live),
    ):
        p99 = quantile(values, 0.99) * 1000
        print(f"{label}: {fmt_ms(values)}; p99 {p99:.1f} ms")
    print("targets: p50 < 30 ms, p99 < 100 ms")


async def measure(
    session: aiohttp.ClientSession, base: str, publish: Publish, changes: int
) -> tuple[list[float], list[float]]:
    to_event: list[float] = []
    to_live: list[float] = []
    async with session.ws_connect(f"{base.replace('http', 'ws')}/ws/hot-reload") as ws:
        await ws.receive_json()  # status on connect
        for i in range(changes):
            points = i + 2
            await asyncio.sleep(0.05)  # let the previous reload settle, as real changes would
            started = time.perf_counter()
            publish(points)
            live = asyncio.create_task(poll_live(session, base, points))
            while True:
                message = await asyncio.wait_for(ws.receive_json(), timeout=10)
                if message["event_type"] == "rules_reloaded":
                    to_event.append(time.perf_counter() - started)
                    break
            to_live.append(await asyncio.wait_for(live, timeout=10) - started)
    return to_event, to_live


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20 changes")
    parser.add_argument("--changes", type=int, default=200)
    parser.add_argument("--source", choices=sorted(SOURCES), default="files")
    args = parser.parse_args()
    asyncio.run(run(20 if args.quick else args.changes, args.source))


if __name__ == "__main__":
    main()

"""Benchmark: a forced full list of the Kubernetes API source (`forget()`, then `read()`).

1,000 labelled ConfigMaps hold 10 rule files each, one ruleset of 10 rules per file
(10,000 rulesets / 100,000 rules), in `sidecar.testing.FakeKubernetes`. Each run is what
a forced reload or a periodic verification costs the source: `forget()`, then `read()`,
which lists every ConfigMap over HTTP, checks every item and decodes every key (the
loader's parse and compile come after and are not counted). The fake's own JSON encoding
of the answer is included, as a real API server's would be.

Run (from the repository root):

    python -m bench.kubernetes_list                  # 1,000 ConfigMaps, 5 runs (~20 s)
    python -m bench.kubernetes_list --quick          # 100 ConfigMaps, 3 runs
    python -m bench.kubernetes_list --configmaps 100 --runs 3
"""

from __future__ import annotations

import argparse
import time

from kubernetes import client

from bench._common import environment, fmt_ms
from bench._gen import generate_file
from sidecar.sources.kubernetes import ConfigMapSource
from sidecar.testing import FakeKubernetes

LABELS = {"rule-sidecar/rules": "bench"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configmaps", type=int, default=1000)
    parser.add_argument("--files-each", type=int, default=10)
    parser.add_argument("--rules-each", type=int, default=10)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="100 ConfigMaps, 3 runs")
    options = parser.parse_args()
    if options.quick:
        options.configmaps, options.runs = 100, 3
    kube = FakeKubernetes().start()
    try:
        for index in range(options.configmaps):
            data = {}
            for slot in range(options.files_each):
                file = generate_file(index * options.files_each + slot, options.rules_each)
                data[f"rules-{slot}.yaml"] = file.content.decode()
            kube.apply(f"rules-{index:04d}", data, labels=LABELS)
        configuration = client.Configuration()
        configuration.host = kube.url
        source = ConfigMapSource(
            client.ApiClient(configuration),
            namespace="default",
            label_selector="rule-sidecar/rules=bench",
        )
        timings = []
        files = []
        for _ in range(options.runs):
            source.forget()
            started = time.perf_counter()
            files = source.read()
            timings.append(time.perf_counter() - started)
        size = sum(len(file.content) for file in files)
        print(environment())
        print(
            f"{options.configmaps} ConfigMaps, {len(files)} files / rulesets, "
            f"{len(files) * options.rules_each} rules, {size / 2**20:.1f} MiB of rule files"
        )
        print(f"forget() + read(), a full list: {fmt_ms(timings)}")
    finally:
        kube.close()


if __name__ == "__main__":
    main()

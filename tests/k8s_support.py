"""The `kube` fixture: a fake Kubernetes API server (`sidecar.testing.FakeKubernetes`).

Import it with `pytest_plugins = ["k8s_support"]`.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from sidecar.testing import FakeKubernetes


@pytest.fixture
def kube() -> Iterator[FakeKubernetes]:
    server = FakeKubernetes().start()
    yield server
    server.close()

"""The `kube` fixture: a fake Kubernetes API server (`sidecar.testing.FakeKubernetes`).

conftest.py loads it as a plugin, so the fixture serves every test module.
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

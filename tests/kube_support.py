"""Support for the Kubernetes tests: the `kube` fixture, a fake Kubernetes API server
(`sidecar.testing.FakeKubernetes`), and the tools that check manifests (helm, kubectl for
`kubectl kustomize`, kubernetes-validate), found the same way by every test module.

conftest.py loads it as a plugin, so the fixture serves every test module.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.testing import FakeKubernetes

REPO = Path(__file__).resolve().parent.parent
OLDEST_KUBERNETES = "1.27"


@pytest.fixture
def kube() -> Iterator[FakeKubernetes]:
    """A fake Kubernetes API server, closed at teardown."""
    server = FakeKubernetes().start()
    yield server
    server.close()


def find_tool(name: str) -> str | None:
    """$NAME (upper case), else the repository's .ci/bin/NAME (`.ci/install-kube-tools`
    puts helm and kubectl there), else NAME on PATH."""
    if os.environ.get(name.upper()):
        return os.environ[name.upper()]
    local = REPO / ".ci" / "bin" / name
    if os.access(local, os.X_OK):
        return str(local)
    return shutil.which(name)


def kubernetes_validate_command() -> list[str] | None:
    """The kubernetes-validate CLI of this interpreter's environment, or None."""
    beside = Path(sys.executable).with_name("kubernetes-validate")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("kubernetes-validate")
    return [found] if found else None


def kubernetes_versions() -> list[str]:
    """The oldest version we support and the newest kubernetes-validate knows."""
    try:
        from kubernetes_validate import utils
    except ImportError:
        return [OLDEST_KUBERNETES]
    newest = ".".join(utils.latest_version().split(".")[:2])
    return [OLDEST_KUBERNETES, newest]


KUBERNETES_VALIDATE = kubernetes_validate_command()


def validate_strict(
    documents: Iterable[dict[str, Any]], version: str, directory: Path, *, without_schema: str = ""
) -> None:
    """`kubernetes-validate --strict` on every document: each one passes, except the kind
    `without_schema` (a CRD kind), which may only be reported as having no schema."""
    assert KUBERNETES_VALIDATE is not None
    documents = list(documents)
    path = directory / "manifests.yaml"
    path.write_text(yaml.safe_dump_all(documents), encoding="utf-8")
    result = subprocess.run(
        [*KUBERNETES_VALIDATE, "--strict", "-k", version, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    passed = [line for line in lines if line.startswith("INFO ")]
    assert len(passed) == sum(doc["kind"] != without_schema for doc in documents), result.stdout
    assert all(line.endswith(f"against version {version}") for line in passed)
    for line in set(lines) - set(passed):
        assert line.startswith("WARN "), line
        assert f"kind {without_schema} with api version" in line

"""schemathesis against `schemas/openapi.yaml` on a real `rule-sidecar serve`: whatever
the schema allows a client to send, the answer is documented, matches its schema, and is
never a 5xx."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import missing_required_header, positive_data_acceptance
from server_support import Served, clean_environment, command, spawn

# Starts processes, browsers or databases: left out of the quick loop (-m 'not slow').
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
# The WebSocket handshake answers 101 and then speaks another protocol, which an HTTP
# fuzzer cannot follow; tests/test_websocket.py sends it garbage, huge frames and floods.
schema = schemathesis.openapi.from_path(REPO / "schemas" / "openapi.yaml").exclude(
    path="/ws/hot-reload"
)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """The bundled example rules, reloads not rate-limited (the fuzzer sends many)."""
    tmp = tmp_path_factory.mktemp("fuzz")
    env = clean_environment(RULE_SIDECAR_RELOAD_RATE_PER_MINUTE="1000000")
    server = spawn(tmp, env=env)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@schema.parametrize()
# derandomize: CI runs the same examples every time (a found failure is reproducible);
# run with more examples by hand to search wider.
@settings(max_examples=30, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_schema(case: schemathesis.Case, served: Served) -> None:
    """Status documented, body valid against the schema, no server error. The served
    sidecar has no database source: its write routes answer 405 (documented) to every
    request, before the token is looked at, which schemathesis's acceptance and
    missing-token checks would call a valid request refused and a missing token
    accepted; tests/test_writes.py checks their answers against the document with a
    database (401 without the token among them)."""
    writes = "writes" in (case.operation.definition.raw.get("tags") or [])
    excluded = [positive_data_acceptance, missing_required_header] if writes else []
    case.call_and_validate(base_url=served.url, excluded_checks=excluded)


@pytest.fixture(scope="module")
def writing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Served, str]]:
    """A sidecar with a SQLite database source and an admin token: its write routes
    take what the fuzzer sends (beside the bundled example rules, in files)."""
    tmp = tmp_path_factory.mktemp("fuzz-writes")
    url = f"sqlite:///{tmp / 'rules.db'}"
    env = clean_environment(RULE_SIDECAR_RELOAD_RATE_PER_MINUTE="1000000")
    subprocess.run([*command(), "db", "init", "--database-url", url], env=env, check=True)
    token = "fuzz-token"
    (tmp / "token").write_text(token)
    server = spawn(
        tmp,
        "--rules-dir",
        str(REPO / "examples" / "rules"),
        "--database-url",
        url,
        "--admin-token-file",
        str(tmp / "token"),
        env=env,
    )
    try:
        server.wait_ready()
        yield server, token
    finally:
        server.stop()


@schema.include(tag="writes").parametrize()
@settings(max_examples=30, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
def test_writes_conform_to_their_schema(
    case: schemathesis.Case, writing: tuple[Served, str]
) -> None:
    """The write routes with a database and the token: every answer documented and valid,
    never a server error. A body the schema allows may still be rules that do not load
    (422) or name a version that is not stored (412), so acceptance is not expected."""
    server, token = writing
    case.call_and_validate(
        base_url=server.url,
        headers={"Authorization": f"Bearer {token}"},
        excluded_checks=[positive_data_acceptance],
    )

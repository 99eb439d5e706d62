"""The OpenAPI document `schemas/openapi.yaml` is valid and every real answer matches it."""

from __future__ import annotations

import base64
import functools
import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import pytest
import yaml
from aiohttp import ClientResponse, ClientWebSocketResponse
from aiohttp.test_utils import TestClient
from conftest import dump_yaml, make_ruleset_doc, rule_doc
from jsonschema import Draft202012Validator
from referencing import Registry
from referencing.jsonschema import DRAFT202012
from server_support import eventually

from sidecar.api.app import AppState, create_app
from sidecar.api.run import build_state
from sidecar.api.views import status_view
from sidecar.api.websocket import ReloadNotificationManager
from sidecar.config import Settings

# Starts processes, browsers or databases: left out of the quick loop (-m 'not slow').
pytestmark = pytest.mark.slow

DOCUMENT_PATH = Path(__file__).resolve().parents[1] / "sidecar" / "schemas" / "openapi.yaml"
DOCUMENT: dict[str, Any] = yaml.safe_load(DOCUMENT_PATH.read_text("utf-8"))
BASE_URI = "urn:rule-sidecar:openapi"
REGISTRY: Registry[Any] = Registry().with_resource(BASE_URI, DRAFT202012.create_resource(DOCUMENT))
METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
HOT = "/api/v1/rules/hot-reload"
TOKEN = "test-admin-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}

# The payments ruleset, with a disabled rule where {LEGACY} stands.
PAYMENTS = """\
apiVersion: rule-sidecar/v1
kind: RuleSet
metadata:
  id: payments
  name: Payments
  description: Scores card payments.
  labels: {team: risk}
spec:
  decisions:
    - {decision: deny, min_points: 70}
    - {decision: review, min_points: 40}
  default_decision: allow
  rules:
    - id: large-amount
      name: Large amount
      condition: input.amount > 1000
      points: 40
      priority: 10
      tags: [amount]
      metadata: {owner: risk, ticket: RISK-1}
    - id: foreign-country
      condition: has(input.country) && input.country != 'US'
      points: 30
{LEGACY}  tests:
    - name: large domestic payment is reviewed
      input: {amount: 5000, country: US}
      expect: {total_points: 40, matched: [large-amount], decision: review}
"""
LEGACY = """\
    - id: legacy
      condition: input.amount > 0
      points: 5
      enabled: false
"""
RULES = PAYMENTS.replace("{LEGACY}", LEGACY)
# Changes the ruleset's name and one rule, removes another; its test still passes.
UPDATED = (
    PAYMENTS.replace("{LEGACY}", "")
    .replace("name: Payments", "name: Card payments")
    .replace("points: 30", "points: 35")
)
BROKEN = RULES.replace("input.amount > 1000", "input.amount >")
SIGNUP = """\
apiVersion: rule-sidecar/v1
kind: RuleSet
metadata: {id: signup}
spec:
  rules:
    - {id: disposable-email, condition: "input.email.endsWith('@mailinator.com')", points: 50}
"""


# Reading the document


def ref_parts(ref: str) -> tuple[str, ...]:
    """The JSON pointer of a local `#/...` reference, as keys."""
    assert ref.startswith("#/"), f"only local references are used: {ref}"
    return tuple(unquote(part).replace("~1", "/").replace("~0", "~") for part in ref[2:].split("/"))


def walk(parts: tuple[str, ...]) -> Any:
    """The document node at `parts`; KeyError when it does not exist."""
    node: Any = DOCUMENT
    for part in parts:
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def follow(parts: tuple[str, ...]) -> tuple[tuple[str, ...], Any]:
    """Follow reference objects (responses, headers, parameters) to the real node."""
    node = walk(parts)
    while isinstance(node, dict) and "$ref" in node:
        parts = ref_parts(node["$ref"])
        node = walk(parts)
    return parts, node


def validator(*parts: str) -> Draft202012Validator:
    """A validator for the schema at `parts`, with every `$ref` resolved in the document."""
    escaped = "/".join(quote(p.replace("~", "~0").replace("/", "~1"), safe="") for p in parts)
    return Draft202012Validator({"$ref": f"{BASE_URI}#/{escaped}"}, registry=REGISTRY)


def assert_valid(instance: Any, *parts: str) -> None:
    """`instance` conforms to the schema at `parts`; every error is shown otherwise."""
    errors = sorted(validator(*parts).iter_errors(instance), key=lambda e: list(e.path))
    details = "\n".join(f"  at {list(e.absolute_path)}: {e.message[:300]}" for e in errors)
    assert not errors, f"does not match {'/'.join(parts)}:\n{details}"


def nodes(node: Any, parts: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Every node of the document with its location."""
    yield parts, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from nodes(value, (*parts, str(key)))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from nodes(value, (*parts, str(index)))


def schema_roots() -> Iterator[tuple[tuple[str, ...], dict[str, Any]]]:
    """Every schema the document holds: components and the inline ones of paths."""
    for name, schema in DOCUMENT["components"]["schemas"].items():
        yield ("components", "schemas", name), schema
    for parts, node in nodes(DOCUMENT):
        if parts[:2] == ("components", "schemas") or not isinstance(node, dict):
            continue
        if "schema" in node and isinstance(node["schema"], dict):
            yield (*parts, "schema"), node["schema"]


def subschemas(schema: Any, parts: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], Any]]:
    """A schema and every schema nested in it."""
    if not isinstance(schema, dict):
        return
    yield parts, schema
    for key in ("properties", "patternProperties", "$defs"):
        for name, sub in schema.get(key, {}).items():
            yield from subschemas(sub, (*parts, key, name))
    for key in ("items", "additionalProperties", "unevaluatedProperties", "not", "contains"):
        if isinstance(schema.get(key), dict):
            yield from subschemas(schema[key], (*parts, key))
    for key in ("oneOf", "anyOf", "allOf", "prefixItems"):
        for index, sub in enumerate(schema.get(key, [])):
            yield from subschemas(sub, (*parts, key, str(index)))


def operations() -> Iterator[tuple[str, str, dict[str, Any]]]:
    """Every documented operation as (path, method, operation)."""
    for path, item in DOCUMENT["paths"].items():
        for method in METHODS:
            if method in item:
                yield path, method, item[method]


def template_for(path: str) -> str:
    """The documented path template a concrete path falls under (fixed segments first)."""
    candidates: list[str] = [
        template
        for template in DOCUMENT["paths"]
        if re.fullmatch(re.sub(r"\\{[^}]+\\}", "[^/]+", re.escape(template)), path)
    ]
    assert candidates, f"{path} is under no documented path"
    return min(candidates, key=lambda template: template.count("{"))


# Checking real answers


async def conform(response: ClientResponse, method: str) -> Any:
    """Check one real answer against the document; return its body (JSON, text or None)."""
    template = template_for(urlsplit(str(response.url)).path)
    path_item = DOCUMENT["paths"][template]
    documented = {m for m in METHODS if m in path_item}
    method = method.lower()
    if method not in path_item:
        # Answered to methods a path does not have; documented on every operation.
        assert response.status == 405, f"{method} {template} is not documented"
        method = min(documented)
    status = str(response.status)
    responses = path_item[method]["responses"]
    assert status in responses, f"{method.upper()} {template} answered {status}: not documented"
    where, spec = follow(("paths", template, method, "responses", status))
    for name in spec.get("headers", {}):
        header_parts, header = follow((*where, "headers", name))
        value: Any = response.headers.get(name)
        if value is None:
            assert not header.get("required"), (
                f"{status} of {method.upper()} {template} lacks {name}"
            )
            continue
        if header["schema"].get("type") == "integer":
            value = int(value)
        assert_valid(value, *header_parts, "schema")
    if status == "405":
        allowed = {m.strip().lower() for m in response.headers["Allow"].split(",")} - {""}
        if method in allowed or method not in documented or response.method != method.upper():
            assert allowed - {"head"} == documented, "Allow differs from the documented methods"
        else:  # a documented write this sidecar cannot do (no database): what it can do
            assert allowed - {"head"} < documented, "Allow names a method it refuses"
    if status == "101":
        return None
    content = spec.get("content")
    if content is None:
        assert await response.read() == b"", f"{status} has a body the document does not give"
        return None
    media = response.content_type
    assert media in content, f"{media} is not documented for {status}"
    body = await response.json() if media == "application/json" else await response.text()
    assert_valid(body, *where, "content", media, "schema")
    if response.status >= 400 and isinstance(body, dict) and "error" in body:
        assert body["error"]["status"] == response.status
    return body


@dataclass
class Api:
    """A running sidecar, a client for it and the rules file it serves."""

    client: TestClient[Any, Any]
    state: AppState
    rules: Path

    async def call(self, method: str, url: str, status: int, **kwargs: Any) -> Any:
        """Send a request, expect `status` and check the answer against the document."""
        response = await self.client.request(method, url, **kwargs)
        text = await response.text()
        assert response.status == status, f"{method} {url}: {response.status} {text[:500]}"
        return await conform(response, method)

    def write(self, text: str, name: str | None = None) -> None:
        """Replace the rules file (or write a sibling named `name`)."""
        target = self.rules if name is None else self.rules.with_name(name)
        target.write_text(text, "utf-8")

    async def connect(self, query: str = "", **kwargs: Any) -> ClientWebSocketResponse:
        """Open the WebSocket."""
        ws: ClientWebSocketResponse = await self.client.ws_connect(
            f"/ws/hot-reload{query}", **kwargs
        )
        return ws

    def after(self, last_seq: int) -> str:
        """The WebSocket query resuming after `last_seq` of this instance."""
        return f"?instance={self.state.notifier.instance}&last_seq={last_seq}"

    def etag(self) -> str:
        """The documented ETag of the snapshot serving now."""
        current = self.state.registry.current
        return f'"{current.revision}-{current.version}-{self.state.notifier.instance}"'


Start = Callable[..., Awaitable[Api]]


@pytest.fixture
async def start(aiohttp_client: Any, tmp_path: Path) -> AsyncIterator[Start]:
    """Start real sidecars on a rules directory; every one is stopped at the end."""
    states: list[AppState] = []

    async def start_sidecar(
        rules: str | None = RULES, *, replay_buffer: int | None = None, **settings: Any
    ) -> Api:
        directory = tmp_path / f"rules-{len(states)}"
        directory.mkdir()
        path = directory / "payments.yaml"
        if rules is not None:
            path.write_text(rules, "utf-8")
        config = Settings(rules_dirs=(directory,), **settings)
        state = build_state(config)
        states.append(state)
        if replay_buffer is not None:
            state.notifier = ReloadNotificationManager(
                functools.partial(status_view, state.service, writes=state.writes),
                buffer_size=replay_buffer,
            )
        app = create_app(state, max_body_bytes=config.max_body_bytes)
        await state.service.initial_load()
        return Api(await aiohttp_client(app), state, path)

    yield start_sidecar
    for state in states:
        await state.service.close()  # its reload worker too (see `start_sidecar`)
        if state.decisions is not None:
            state.decisions.close()


@pytest.fixture
async def api(start: Start) -> Api:
    """A sidecar serving the payments rules, without an admin token or tight limits."""
    return await start()


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    """An admin token file."""
    path = tmp_path / "admin-token"
    path.write_text(f"{TOKEN}\n", "utf-8")
    return path


async def receive(ws: ClientWebSocketResponse) -> dict[str, Any]:
    """The next WebSocket message, checked against the document's message schema."""
    message: dict[str, Any] = await ws.receive_json(timeout=5)
    operation = DOCUMENT["paths"]["/ws/hot-reload"]["get"]
    assert_valid(message, *ref_parts(operation["x-websocket-messages"]["server"]["$ref"]))
    return message


async def receive_until(ws: ClientWebSocketResponse, event_type: str) -> list[dict[str, Any]]:
    """Checked messages up to and including the first of `event_type`."""
    messages = [await receive(ws)]
    while messages[-1]["event_type"] != event_type:
        messages.append(await receive(ws))
    return messages


def handshake_headers() -> dict[str, str]:
    """The headers of a WebSocket upgrade request."""
    return {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
        "Sec-WebSocket-Version": "13",
    }


# The document itself


class TestDocument:
    """The document is valid OpenAPI 3.1 and describes exactly the application's routes."""

    def test_header(self) -> None:
        """OpenAPI 3.1.0 with the 2020-12 dialect, the title, version and access rules."""
        assert DOCUMENT["openapi"] == "3.1.0"
        assert DOCUMENT["jsonSchemaDialect"] == "https://json-schema.org/draft/2020-12/schema"
        info = DOCUMENT["info"]
        assert (info["title"], info["version"]) == ("rule-sidecar", "0.1.0")
        for words in ("127.0.0.1", "Bearer", "/api/v1/rules/hot-reload/", "/ws/hot-reload"):
            assert words in info["description"]
        assert set(DOCUMENT) <= {
            "openapi",
            "jsonSchemaDialect",
            "info",
            "servers",
            "tags",
            "paths",
            "components",
            "security",
            "webhooks",
            "externalDocs",
        }

    def test_with_openapi_spec_validator(self) -> None:
        """openapi-spec-validator accepts the document, where it is installed."""
        validators = pytest.importorskip("openapi_spec_validator")
        validators.validate(DOCUMENT)

    def test_every_reference_resolves(self) -> None:
        """Every `$ref`, extensions included, points at a node of the document."""
        refs = [
            (parts, node["$ref"])
            for parts, node in nodes(DOCUMENT)
            if isinstance(node, dict) and "$ref" in node
        ]
        assert refs
        for parts, ref in refs:
            try:
                walk(ref_parts(ref))
            except (KeyError, IndexError, ValueError):
                pytest.fail(f"{'/'.join(parts)}: {ref} does not resolve")

    def test_schemas_are_json_schema_2020_12(self) -> None:
        """Every schema, in components and inline, passes the 2020-12 meta-schema."""
        roots = list(schema_roots())
        assert len(roots) > 40
        for _parts, schema in roots:
            Draft202012Validator.check_schema(schema)

    def test_every_property_has_a_description(self) -> None:
        """Every component schema and every property of every schema is described."""
        for name, schema in DOCUMENT["components"]["schemas"].items():
            assert schema.get("description"), f"schema {name} has no description"
        for root, schema in schema_roots():
            for parts, sub in subschemas(schema, root):
                for name, prop in sub.get("properties", {}).items():
                    where = "/".join((*parts, "properties", name))
                    assert isinstance(prop.get("description"), str), f"{where}: no description"
                    assert prop["description"].strip(), f"{where}: empty description"

    def test_paths_match_the_routes(self, tmp_path: Path) -> None:
        """Every route of the app (HEAD aside) is a documented operation, and vice versa."""
        state = build_state(Settings(rules_dirs=(tmp_path,), reload_worker=False))
        app = create_app(state)
        routes = {
            (route.resource.canonical, route.method.lower())
            for route in app.router.routes()
            if route.method != "HEAD" and route.resource is not None
        }
        assert routes == {(path, method) for path, method, _ in operations()}

    def test_operations_are_described(self) -> None:
        """Every operation has a unique id, a summary and described responses, 405 among them."""
        ids = [operation["operationId"] for _, _, operation in operations()]
        assert len(ids) == len(set(ids)), "operationIds repeat"
        for path, method, operation in operations():
            assert operation.get("summary"), f"{method} {path} has no summary"
            assert "405" in operation["responses"], f"{method} {path} lacks 405"
            for status in operation["responses"]:
                assert re.fullmatch(r"[1-5][0-9][0-9]", status), f"{method} {path} {status}"
                _, response = follow(("paths", path, method, "responses", status))
                assert response.get("description"), f"{method} {path} {status}"

    def test_parameters_are_declared(self) -> None:
        """Path templates and path parameters agree; every parameter has a schema."""
        for path, method, operation in operations():
            params = [
                follow(("paths", path, method, "parameters", str(index)))[1]
                for index in range(len(operation.get("parameters", [])))
            ]
            declared = {param["name"] for param in params if param["in"] == "path"}
            assert declared == set(re.findall(r"{([^}]+)}", path)), f"{method} {path}"
            for param in params:
                assert param["in"] in {"path", "query", "header", "cookie"}
                assert param.get("description"), f"{method} {path} {param['name']}"
                assert "schema" in param, f"{method} {path} {param['name']}"
                assert param["in"] != "path" or param["required"] is True

    def test_security_matches_the_access_rules(self) -> None:
        """State-changing hot-reload POSTs and the WebSocket take the token; others are open."""
        schemes = DOCUMENT["components"]["securitySchemes"]
        for path, method, operation in operations():
            requirements = operation.get("security", DOCUMENT.get("security", []))
            named = {name for requirement in requirements for name in requirement}
            assert named <= set(schemes)
            changes_state = path.startswith(f"{HOT}/") and path != f"{HOT}/validate"
            if "writes" in operation["tags"]:  # always behind the token (403 without one)
                assert requirements == [{"adminToken": []}], f"{method} {path}"
                assert {"401", "403"} <= operation["responses"].keys(), f"{method} {path}"
            elif (method == "post" and changes_state) or path.startswith("/ws/"):
                assert requirements == [{"adminToken": []}, {}], f"{method} {path}"
                assert "401" in operation["responses"], f"{method} {path} lacks 401"
            else:
                assert not named, f"{method} {path} should be open"


# Real answers


class TestHotReloadEndpoints:
    """The seed's hot-reload endpoints answer as documented, on success and on error."""

    async def test_status(self, api: Api) -> None:
        """The status after the first load."""
        body = await api.call("GET", f"{HOT}/status", 200)
        assert body["last_reload_status"] == "success"
        assert body["last_errors"] == []

    async def test_reload(self, api: Api) -> None:
        """Whole, forced, scoped and numeric-id reloads."""
        assert (await api.call("POST", f"{HOT}/reload", 200))["status"] == "unchanged"
        forced = await api.call("POST", f"{HOT}/reload", 200, json={"force": True})
        assert forced["status"] == "success"
        assert forced["version_after"] == forced["version_before"] + 1
        scoped = await api.call(
            "POST", f"{HOT}/reload", 200, json={"ruleset_id": "payments", "validate": False}
        )
        assert scoped["filtered_by"] == {"ruleset_id": "payments", "rule_id": None}
        body = {"rule_id": "large-amount", "ruleset_id": None, "force": True, "validate": True}
        await api.call("POST", f"{HOT}/reload", 200, json=body)
        await api.call("POST", f"{HOT}/reload", 404, json={"ruleset_id": 7})
        await api.call("POST", f"{HOT}/reload", 404, json={"rule_id": "nope"})

    async def test_reload_bad_bodies(self, api: Api) -> None:
        """Bodies that are not JSON objects or hold mistyped options are 400s."""
        await api.call("POST", f"{HOT}/reload", 400, data=b"{not json")
        await api.call("POST", f"{HOT}/reload", 400, json=["force"])
        await api.call("POST", f"{HOT}/reload", 400, json={"force": "yes"})
        await api.call("POST", f"{HOT}/reload", 400, json={"validate": 1})
        await api.call("POST", f"{HOT}/reload", 400, json={"rule_id": True})
        await api.call("POST", f"{HOT}/reload", 400, json={"ruleset_id": 1.5})

    async def test_reload_rule_and_ruleset(self, api: Api) -> None:
        """Reloads of one rule or ruleset by path; unknown ids are 404s."""
        await api.call("POST", f"{HOT}/reload/rule/large-amount", 200)
        await api.call("POST", f"{HOT}/reload/ruleset/payments", 200)
        await api.call("POST", f"{HOT}/reload/rule/nope", 404)
        await api.call("POST", f"{HOT}/reload/ruleset/nope", 404)

    async def test_validate(self, api: Api) -> None:
        """Validation of valid sources."""
        body = await api.call("POST", f"{HOT}/validate", 200)
        assert body["valid"] is True
        assert body["total_rules"] == 3

    async def test_validate_a_candidate(self, api: Api) -> None:
        """Rule documents as YAML and as JSON, valid and not, and bodies refused."""
        text = "apiVersion: rule-sidecar/v1\nkind: RuleSet\nmetadata: {id: extra}\nspec:\n"
        text += "  rules: [{id: e, condition: 'input.amount > 1', points: 1}]\n"
        yaml_type = {"Content-Type": "application/yaml"}
        body = await api.call("POST", f"{HOT}/validate", 200, data=text, headers=yaml_type)
        assert (body["valid"], body["changes"]["added"]) == (True, ["extra"])
        broken = {"documents": [text.replace("> 1", ">"), {"kind": "RuleSet"}]}
        body = await api.call("POST", f"{HOT}/validate", 200, json=broken)
        assert body["valid"] is False
        await api.call("POST", f"{HOT}/validate", 400, json={"documents": [1]})
        plain = {"Content-Type": "text/plain"}
        await api.call("POST", f"{HOT}/validate", 415, data="x", headers=plain)

    async def test_monitoring(self, api: Api) -> None:
        """Monitoring start and stop, seen in the status."""
        assert (await api.call("POST", f"{HOT}/monitoring/start", 200))["monitoring_active"]
        assert (await api.call("GET", f"{HOT}/status", 200))["monitoring_active"] is True
        assert not (await api.call("POST", f"{HOT}/monitoring/stop", 200))["monitoring_active"]

    async def test_history(self, api: Api) -> None:
        """History with and without a limit; a limit that is not a number is a 400."""
        await api.call("POST", f"{HOT}/reload", 200, json={"force": True})
        body = await api.call("GET", f"{HOT}/history", 200)
        assert [record["trigger"] for record in body["history"]] == ["api", "startup"]
        assert (await api.call("GET", f"{HOT}/history?limit=1", 200))["count"] == 1
        await api.call("GET", f"{HOT}/history?limit=-3", 400)
        await api.call("GET", f"{HOT}/history?limit=many", 400)

    async def test_rollback(self, api: Api) -> None:
        """Rollback to the previous and to a named version; bad and unknown versions."""
        await api.call("POST", f"{HOT}/rollback", 404)
        await api.call("POST", f"{HOT}/reload", 200, json={"force": True})
        body = await api.call("POST", f"{HOT}/rollback", 200)
        assert (body["trigger"], body["filtered_by"]) == ("rollback", {"version": None})
        await api.call("POST", f"{HOT}/rollback", 200, json={"version": 1})
        await api.call("POST", f"{HOT}/rollback", 404, json={"version": 99})
        await api.call("POST", f"{HOT}/rollback", 400, json={"version": "1"})
        await api.call("POST", f"{HOT}/rollback", 400, json={"version": True})
        await api.call("POST", f"{HOT}/rollback", 400, data=b"[]")

    async def test_failed_reload(self, api: Api) -> None:
        """A broken rules file: 422 records, the problems everywhere, the old rules serving."""
        api.write(BROKEN)
        failure = await api.call("POST", f"{HOT}/reload", 422)
        assert failure["version_after"] == failure["version_before"] == 1
        assert failure["errors"][0]["rule_id"] == "large-amount"
        await api.call("POST", f"{HOT}/reload", 422, json={"force": True, "validate": False})
        await api.call("POST", f"{HOT}/reload/rule/large-amount", 422)
        await api.call("POST", f"{HOT}/reload/ruleset/payments", 422)
        # A failed reload answers with its failure, even for an id it cannot know.
        await api.call("POST", f"{HOT}/reload/rule/nope", 422)
        validation = await api.call("POST", f"{HOT}/validate", 200)
        assert validation["valid"] is False
        assert validation["total_rules"] is None
        status = await api.call("GET", f"{HOT}/status", 200)
        assert status["last_reload_status"] == "failed"
        assert status["last_errors"]
        health = await api.call("GET", "/health/hot-reload", 200)
        assert health["status"] == "degraded"
        history = await api.call("GET", f"{HOT}/history", 200)
        assert history["history"][0]["status"] == "failed"
        await api.call("GET", "/api/v1/rules/large-amount", 200)


class TestChanges:
    """What the current version changed, each item before and after."""

    async def test_first_load_then_an_update(self, api: Api) -> None:
        """The first load adds everything; a reload's diff holds old and new items."""
        first = await api.call("GET", f"{HOT}/changes", 200)
        assert (first["from_version"], first["to_version"], first["count"]) == (0, 1, 4)
        assert {c["type"] for c in first["changes"]} == {"ruleset_added", "rule_added"}
        assert all(c["before"] is None for c in first["changes"])

        api.write(UPDATED)
        await api.call("POST", f"{HOT}/reload", 200)
        second = await api.call("GET", f"{HOT}/changes", 200)
        assert (second["from_version"], second["to_version"]) == (1, 2)
        by_type = {change["type"]: change for change in second["changes"]}
        assert set(by_type) == {"ruleset_updated", "rule_removed", "rule_updated"}
        removed, updated = by_type["rule_removed"], by_type["rule_updated"]
        assert (removed["rule_id"], removed["before"]["points"], removed["after"]) == (
            "legacy",
            5,
            None,
        )
        assert updated["rule_id"] == "foreign-country"
        assert (updated["before"]["points"], updated["after"]["points"]) == (30, 35)
        limited = await api.call("GET", f"{HOT}/changes?limit=1", 200)
        assert (limited["count"], len(limited["changes"])) == (3, 1)
        await api.call("GET", f"{HOT}/changes?limit=all", 400)
        renamed = by_type["ruleset_updated"]
        assert (renamed["before"]["name"], renamed["after"]["name"]) == (
            "Payments",
            "Card payments",
        )

    async def test_etag(self, api: Api) -> None:
        """Cached by the registry version like the other registry reads."""
        response = await api.client.get(f"{HOT}/changes")
        etag = response.headers["ETag"]
        await api.call("GET", f"{HOT}/changes", 304, headers={"If-None-Match": etag})


class TestDashboardFiles:
    """The page and its files: typed, locked down by CSP, cacheable by ETag."""

    async def test_page_and_assets(self, api: Api) -> None:
        """/ui/ and every file it links answer 200 with their type and the CSP."""
        response = await api.client.get("/ui/")
        page = await api.call("GET", "/ui/", 200)
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        policy = response.headers["Content-Security-Policy"]
        assert "script-src 'self'" in policy
        assert "frame-ancestors 'none'" in policy
        linked = re.findall(r'(?:src|href)="([a-z]+\.(?:js|css))"', page)
        assert sorted(linked) == ["dashboard.css", "dashboard.js"]
        for name, media in (("dashboard.js", "text/javascript"), ("dashboard.css", "text/css")):
            asset = await api.client.get(f"/ui/{name}")
            assert (asset.status, asset.content_type) == (200, media)
            await api.call(
                "GET", f"/ui/{name}", 304, headers={"If-None-Match": asset.headers["ETag"]}
            )

    async def test_redirect_and_unknown_files(self, api: Api) -> None:
        """/ui goes to /ui/; a file the dashboard does not ship is a 404, paths included."""
        response = await api.call("GET", "/ui", 301, allow_redirects=False)
        redirect = await api.client.get("/ui", allow_redirects=False)
        assert redirect.headers["Location"] == "/ui/"
        assert response is None
        await api.call("GET", "/ui/app.py", 404)
        escape = await api.client.get("/ui/%2E%2E%2Fapp.py")
        assert escape.status == 404


class TestHealth:
    """Probes answer as documented while serving and before anything valid loaded."""

    async def test_serving(self, api: Api) -> None:
        """Health, liveness and readiness while rules serve."""
        assert (await api.call("GET", "/health/hot-reload", 200))["status"] != "unhealthy"
        assert await api.call("GET", "/livez", 200) == {"status": "alive"}
        assert await api.call("GET", "/readyz", 200) == {"ready": True}

    async def test_nothing_valid_loaded(self, start: Start) -> None:
        """Broken sources at startup: 503 probes, empty reads, 404s for ids."""
        api = await start(BROKEN)
        assert await api.call("GET", "/readyz", 503) == {"ready": False}
        assert (await api.call("GET", "/health/hot-reload", 503))["status"] == "unhealthy"
        assert await api.call("GET", "/livez", 200) == {"status": "alive"}
        status = await api.call("GET", f"{HOT}/status", 200)
        assert status["registry"]["last_reload"] is None
        assert (await api.call("GET", "/api/v1/rules", 200))["count"] == 0
        assert (await api.call("GET", "/api/v1/rulesets", 200))["count"] == 0
        await api.call("GET", "/api/v1/rulesets/payments", 404)
        await api.call("POST", "/api/v1/rulesets/payments/evaluate", 404, json={"input": {}})
        await api.call("POST", f"{HOT}/rollback", 404)
        await api.call("POST", f"{HOT}/reload", 422)

    async def test_state_dir_fallback(self, start: Start, tmp_path: Path) -> None:
        """Broken sources with a saved snapshot: serving from the state dir, degraded."""
        await start(state_dir=tmp_path / "state")
        api = await start(BROKEN, state_dir=tmp_path / "state")
        health = await api.call("GET", "/health/hot-reload", 200)
        assert (health["status"], health["serving_from"]) == ("degraded", "state_dir")
        status = await api.call("GET", f"{HOT}/status", 200)
        assert status["last_errors"]
        history = await api.call("GET", f"{HOT}/history", 200)
        assert [record["trigger"] for record in history["history"]] == ["state_dir", "startup"]
        ws = await api.connect(api.after(0))
        replayed = await receive_until(ws, "status")
        await ws.close()
        fallback = [m["data"] for m in replayed if m["event_type"] == "rules_reloaded"]
        assert fallback[0]["trigger"] == "state_dir"
        assert fallback[0]["errors"]

    async def test_no_rule_files(self, start: Start) -> None:
        """An empty rules directory loads an empty registry: ready, but degraded."""
        api = await start(None)
        await api.call("GET", "/readyz", 200)
        health = await api.call("GET", "/health/hot-reload", 200)
        assert health["checks"]["registry_has_rules"] is False


class TestRegistryReads:
    """Registry reads answer as documented, with ETags and 304s."""

    async def test_rules(self, api: Api) -> None:
        """All rules, filtered by ruleset and tag, and not modified."""
        response = await api.client.get("/api/v1/rules")
        body = await conform(response, "GET")
        assert body["count"] == 3
        assert response.headers["ETag"] == api.etag()
        tagged = await api.call("GET", "/api/v1/rules?tag=amount&ruleset_id=payments", 200)
        assert [rule["id"] for rule in tagged["rules"]] == ["large-amount"]
        assert (await api.call("GET", "/api/v1/rules?ruleset_id=nope", 200))["count"] == 0
        etag = response.headers["ETag"]
        await api.call("GET", "/api/v1/rules", 304, headers={"If-None-Match": etag})
        await api.call("GET", "/api/v1/rules", 304, headers={"If-None-Match": f'"0", {etag}'})
        await api.call("POST", f"{HOT}/reload", 200, json={"force": True})
        await api.call("GET", "/api/v1/rules", 200, headers={"If-None-Match": etag})

    async def test_rule(self, api: Api) -> None:
        """One rule, not modified, and an unknown id."""
        body = await api.call("GET", "/api/v1/rules/large-amount", 200)
        assert body["metadata"] == {"owner": "risk", "ticket": "RISK-1"}
        etag = api.etag()
        await api.call("GET", "/api/v1/rules/large-amount", 304, headers={"If-None-Match": etag})
        await api.call("GET", "/api/v1/rules/nope", 404)
        await api.call("GET", "/api/v1/rules/7", 404)

    async def test_rulesets(self, api: Api) -> None:
        """The ruleset list, without rules, and not modified."""
        body = await api.call("GET", "/api/v1/rulesets", 200)
        assert body["rulesets"][0]["enabled_rule_count"] == 2
        await api.call("GET", "/api/v1/rulesets", 304, headers={"If-None-Match": api.etag()})

    async def test_pages_and_search(self, start: Start) -> None:
        """`offset`/`limit` page both listings in id order, `total` counting them all; `q`
        finds rules by any field the dashboard shows; a bad page is a 400."""
        extra = [make_ruleset_doc(f"set-{n}", [rule_doc(f"r-{n}", "true", n)]) for n in range(5)]
        api = await start(RULES + "---\n" + dump_yaml(extra))
        page = await api.call("GET", "/api/v1/rulesets?offset=2&limit=3", 200)
        assert [r["id"] for r in page["rulesets"]] == ["set-1", "set-2", "set-3"]
        assert (page["count"], page["total"]) == (3, 6)
        tail = await api.call("GET", "/api/v1/rulesets?offset=5&limit=3", 200)
        assert [r["id"] for r in tail["rulesets"]] == ["set-4"]
        assert (await api.call("GET", "/api/v1/rulesets?offset=9", 200))["rulesets"] == []
        found = await api.call("GET", "/api/v1/rules?q=COUNTRY", 200)
        assert [r["id"] for r in found["rules"]] == ["foreign-country"]
        by_file = await api.call("GET", "/api/v1/rules?q=payments.yaml&limit=2", 200)
        assert (by_file["count"], by_file["total"]) == (2, 8)
        by_ruleset = await api.call("GET", "/api/v1/rules?q=set-3&offset=0&limit=9", 200)
        assert [r["id"] for r in by_ruleset["rules"]] == ["r-3"]
        for bad in ("limit=-1", "offset=x", "offset=-2", "limit=1.5"):
            await api.call("GET", f"/api/v1/rulesets?{bad}", 400)
            await api.call("GET", f"/api/v1/rules?{bad}", 400)

    async def test_ruleset(self, api: Api) -> None:
        """One ruleset with its rules, not modified, and an unknown id."""
        body = await api.call("GET", "/api/v1/rulesets/payments", 200)
        assert len(body["rules"]) == body["rule_count"] == 3
        etag = api.etag()
        await api.call("GET", "/api/v1/rulesets/payments", 304, headers={"If-None-Match": etag})
        await api.call("GET", "/api/v1/rulesets/nope", 404)


class TestEvaluate:
    """Evaluation answers as documented for single inputs, batches and bad bodies."""

    async def test_single_and_batch(self, api: Api) -> None:
        """One input, a batch, and a condition that errors on its input."""
        url = "/api/v1/rulesets/payments/evaluate"
        single = await api.call("POST", url, 200, json={"input": {"amount": 5000, "country": "FR"}})
        assert (single["total_points"], single["decision"]) == (70, "deny")
        inputs = [{"amount": 10, "country": "US"}, {"amount": "lots"}]
        batch = await api.call("POST", url, 200, json={"inputs": inputs})
        assert [result["decision"] for result in batch["results"]] == ["allow", "allow"]
        assert batch["results"][1]["errors"][0]["rule_id"] == "large-amount"

    async def test_decision_ids(self, start: Start, tmp_path: Path) -> None:
        """With the decision log on, each result carries its decision id, as documented;
        health with a failing decision log is degraded, naming it."""
        api = await start(decision_log=str(tmp_path / "decisions.log"))
        url = "/api/v1/rulesets/payments/evaluate"
        single = await api.call("POST", url, 200, json={"input": {"amount": 5000}})
        batch = await api.call("POST", url, 200, json={"inputs": [{}, {"amount": 1}]})
        ids = [single["decision_id"], *(r["decision_id"] for r in batch["results"])]
        assert len(set(ids)) == 3
        failing = await start(decision_log="/dev/full")
        await failing.call("POST", url, 200, json={"input": {}})

        async def degraded() -> Any:
            body = await failing.call("GET", "/health/hot-reload", 200)
            return body if "decision_log" in body["watch_problems"] else None

        health = await eventually(degraded)
        assert health["status"] == "degraded"
        assert "No space left on device" in health["watch_problems"]["decision_log"]

    async def test_bad_bodies(self, api: Api) -> None:
        """Missing, malformed and ambiguous bodies, and inputs that break a limit."""
        url = "/api/v1/rulesets/payments/evaluate"
        await api.call("POST", url, 400)
        await api.call("POST", url, 400, data=b"nope")
        await api.call("POST", url, 400, json=[{"amount": 1}])
        await api.call("POST", url, 400, json={})
        await api.call("POST", url, 400, json={"input": {}, "inputs": [{}]})
        await api.call("POST", url, 400, json={"inputs": []})
        await api.call("POST", url, 400, json={"inputs": {"amount": 1}})
        deep: Any = 1
        for _ in range(40):
            deep = {"a": deep}
        body = await api.call("POST", url, 400, json={"inputs": [{}, deep]})
        assert body["error"]["path"].startswith("$.inputs[1].a")
        body = await api.call("POST", url, 400, json={"input": {"n": 2**63}})
        assert body["error"]["path"] == "$.input.n"
        await api.call("POST", "/api/v1/rulesets/payments/evaluate", 400, json={})

    async def test_unknown_ruleset(self, api: Api) -> None:
        """An unknown ruleset is a 404, whatever the body."""
        await api.call("POST", "/api/v1/rulesets/nope/evaluate", 404, json={"input": {}})
        await api.call("POST", "/api/v1/rulesets/nope/evaluate", 404, json={})


class TestLimits:
    """Body size, rate limit, methods and unknown paths answer as documented."""

    async def test_body_too_large(self, start: Start) -> None:
        """Bodies past max_body_bytes are 413s wherever a body is read."""
        api = await start(max_body_bytes=1024)
        big = {"input": {"text": "x" * 2000}}
        await api.call("POST", "/api/v1/rulesets/payments/evaluate", 413, json=big)
        await api.call("POST", f"{HOT}/reload", 413, json={"force": False, "pad": "x" * 2000})
        await api.call("POST", f"{HOT}/rollback", 413, json={"pad": "x" * 2000})
        await api.call("POST", "/api/v1/rulesets/payments/evaluate", 200, json={"input": {}})

    async def test_rate_limit(self, start: Start) -> None:
        """Past reload_rate_per_minute, reloads and rollback are 429s with Retry-After; past
        validate_rate_per_minute, validate is."""
        api = await start(reload_rate_per_minute=1, validate_rate_per_minute=1)
        await api.call("POST", f"{HOT}/reload", 200)
        await api.call("POST", f"{HOT}/reload", 429)
        await api.call("POST", f"{HOT}/reload/rule/large-amount", 429)
        await api.call("POST", f"{HOT}/reload/ruleset/payments", 429)
        await api.call("POST", f"{HOT}/rollback", 429)
        await api.call("POST", f"{HOT}/validate", 200)
        await api.call("POST", f"{HOT}/validate", 429)

    async def test_method_not_allowed(self, api: Api) -> None:
        """Every path answers 405 with Allow to a method it does not have."""
        for template, item in DOCUMENT["paths"].items():
            path = (
                template.replace("{rule_id}", "large-amount")
                .replace("{ruleset_id}", "payments")
                .replace("{asset}", "dashboard.js")
            )
            method = "DELETE" if "get" in item else "GET"
            await api.call(method, path, 405)
            await api.call("PUT", path, 405)

    async def test_unknown_path(self, api: Api) -> None:
        """A path that does not exist answers a 404 Error."""
        response = await api.client.get("/api/v2/nothing")
        assert response.status == 404
        assert_valid(await response.json(), "components", "schemas", "Error")


class TestAdminToken:
    """With an admin token file, admin endpoints need it and the rest stay open."""

    ADMIN_CALLS = (
        ("POST", f"{HOT}/reload", 200),
        ("POST", f"{HOT}/reload/rule/large-amount", 200),
        ("POST", f"{HOT}/reload/ruleset/payments", 200),
        ("POST", f"{HOT}/monitoring/start", 200),
        ("POST", f"{HOT}/monitoring/stop", 200),
        ("POST", f"{HOT}/rollback", 404),
    )

    async def test_admin_endpoints(self, start: Start, token_file: Path) -> None:
        """No token or a wrong one is a 401 with WWW-Authenticate; the right one passes."""
        api = await start(admin_token_file=token_file)
        for method, url, status in self.ADMIN_CALLS:
            await api.call(method, url, 401)
            await api.call(method, url, 401, headers={"Authorization": "Bearer wrong"})
            await api.call(method, url, 401, headers={"Authorization": f"Basic {TOKEN}"})
            await api.call(method, url, status, headers=ADMIN)

    async def test_unauthorized_names_the_scheme(self, start: Start, token_file: Path) -> None:
        """A 401 carries WWW-Authenticate: Bearer, as RFC 9110 requires (not yet)."""
        api = await start(admin_token_file=token_file)
        response = await api.client.post(f"{HOT}/reload")
        assert response.status == 401
        assert response.headers.get("WWW-Authenticate") == "Bearer"

    async def test_open_endpoints(self, start: Start, token_file: Path) -> None:
        """Reads, probes and evaluation need no token."""
        api = await start(admin_token_file=token_file)
        for url in (f"{HOT}/status", f"{HOT}/history", "/api/v1/rules", "/api/v1/rulesets"):
            await api.call("GET", url, 200)
        await api.call("GET", "/health/hot-reload", 200)
        await api.call("GET", "/metrics", 200)
        await api.call("POST", "/api/v1/rulesets/payments/evaluate", 200, json={"input": {}})

    async def test_websocket(self, start: Start, token_file: Path) -> None:
        """The WebSocket handshake needs the token too."""
        api = await start(admin_token_file=token_file)
        await api.call("GET", "/ws/hot-reload", 401, headers=handshake_headers())
        ws = await api.connect(headers=ADMIN)
        assert (await receive(ws))["event_type"] == "status"
        await ws.close()


class TestMetrics:
    """The metrics endpoint answers Prometheus text."""

    async def test_metrics(self, api: Api) -> None:
        """The exposition includes the registry version."""
        assert "rule_sidecar_registry_version" in await api.call("GET", "/metrics", 200)


class TestWebSocket:
    """The WebSocket handshake and every message type match the document."""

    async def test_handshake(self, api: Api) -> None:
        """An upgrade is a 101 with the handshake headers; a plain GET is a 400."""
        response = await api.client.get("/ws/hot-reload", headers=handshake_headers())
        assert response.status == 101
        await conform(response, "GET")
        response.close()
        await api.call("GET", "/ws/hot-reload", 400)

    async def test_broadcasts(self, start: Start) -> None:
        """Reloads, failures and every kind of registry change reach subscribers (the
        registry emptied too, which takes RULE_SIDECAR_ALLOW_EMPTY)."""
        api = await start(allow_empty=True)
        ws = await api.connect()
        seen = [await receive(ws)]
        api.write(UPDATED)
        await api.call("POST", f"{HOT}/reload", 200)
        seen += await receive_until(ws, "rules_reloaded")
        api.write(SIGNUP, "signup.yaml")
        await api.call("POST", f"{HOT}/reload", 200)
        seen += await receive_until(ws, "rules_reloaded")
        api.rules.with_name("signup.yaml").unlink()
        await api.call("POST", f"{HOT}/reload", 200)
        seen += await receive_until(ws, "rules_reloaded")
        api.write(BROKEN)
        await api.call("POST", f"{HOT}/reload", 422)
        seen += await receive_until(ws, "reload_failed")
        api.rules.unlink()
        await api.call("POST", f"{HOT}/reload", 200)
        seen += await receive_until(ws, "rules_reloaded")
        await ws.close()
        assert {message["event_type"] for message in seen} == {
            "status",
            "rules_reloaded",
            "reload_failed",
            "rule_added",
            "rule_updated",
            "rule_removed",
            "ruleset_added",
            "ruleset_updated",
            "ruleset_removed",
            "registry_cleared",
        }
        sequence = [message["seq"] for message in seen]
        assert sequence[1:] == list(range(sequence[0] + 1, sequence[0] + len(sequence)))

    async def test_replies(self, start: Start) -> None:
        """Replay, status, pong, error and resync_required answers."""
        api = await start(replay_buffer=2)
        ws = await api.connect(api.after(0))
        replies = await receive_until(ws, "status")
        await ws.send_json({"type": "ping"})
        replies.append(await receive(ws))
        await ws.send_json({"type": "status"})
        replies.append(await receive(ws))
        await ws.send_str("hello")
        replies.append(await receive(ws))
        await ws.close()
        ws = await api.connect("?last_seq=soon")
        replies += await receive_until(ws, "status")
        await ws.close()
        current = replies[-1]["seq"]
        resyncs = []
        for query in (
            f"?last_seq={current}",
            f"?instance=0000000000000000&last_seq={current}",
            api.after(current + 1),
        ):
            ws = await api.connect(query)
            resyncs += await receive_until(ws, "status")
            await ws.close()
        ws = await api.connect(api.after(current - 1))
        replayed = await receive_until(ws, "status")
        await ws.close()
        assert [m["event_type"] for m in replies] == [
            "resync_required",
            "status",
            "pong",
            "status",
            "error",
            "error",
            "status",
        ]
        assert replies[0]["data"]["reason"] == "too_old"
        reasons = [m["data"]["reason"] for m in resyncs if m["event_type"] == "resync_required"]
        assert reasons == ["no_instance", "other_instance", "never_sent"]
        assert [m["event_type"] for m in replayed] == ["rules_reloaded", "status"]

"""Writes through the API to the database source, on real PostgreSQL and SQLite behind a
real server: preconditions, validation before the commit, the audit row, refusals, the
publish, and a second sidecar of the same database serving what the first wrote."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
import pytest
import yaml
from conftest import dump_yaml, make_ruleset_doc, rule_doc, write_rules
from db_support import Database, FreezableProxy
from server_support import HOT, Sidecar, StartSidecar, eventually
from test_openapi import conform

from sidecar.client import AsyncRuleClient, InvalidId, PreconditionFailed, WriteRefused
from sidecar.dbtools import IMPORT_LOCK

# Starts processes, browsers or databases: left out of the quick loop (-m 'not slow').
pytestmark = pytest.mark.slow

TOKEN = "write-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


def ruleset_with_test(ruleset_id: str = "pay", points: int = 10) -> dict[str, Any]:
    """A ruleset whose embedded test expects `points` from its one rule."""
    return make_ruleset_doc(
        ruleset_id,
        [rule_doc(f"{ruleset_id}-big", "input.amount > 100", points)],
        tests=[
            {"name": "big", "input": {"amount": 500}, "expect": {"total_points": points}},
        ],
    )


def yaml_body(doc: dict[str, Any]) -> dict[str, Any]:
    return {"data": dump_yaml(doc), "headers": {"Content-Type": "application/yaml"}}


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text(TOKEN, encoding="utf-8")
    return path


@pytest.fixture
def migrated_db(database: Database) -> Database:
    database.init()
    database.import_docs(ruleset_with_test("pay"))
    return database


async def writing_sidecar(
    start_sidecar: StartSidecar,
    rules_dir: Path,
    database: Database,
    token: Path | None,
    **extra: Any,
) -> Sidecar:
    options: dict[str, Any] = {"database_url": database.url, **extra}
    if token is not None:
        options["admin_token_file"] = token
    return await start_sidecar(rules_dir, monitor=True, **options)


async def put(app: Sidecar, doc: dict[str, Any], *, status: int, headers: dict[str, str]) -> Any:
    body = yaml_body(doc)
    response, answer = await call(
        app,
        "PUT",
        f"/api/v1/rulesets/{doc['metadata']['id']}",
        status=status,
        data=body["data"],
        headers={**ADMIN, **body["headers"], **headers},
    )
    return response, answer


async def call(
    app: Sidecar, method: str, path: str, *, status: int | None = 200, **kwargs: Any
) -> tuple[aiohttp.ClientResponse, Any]:
    """One request; its answer checked against the OpenAPI document."""
    response, body = await app.call(method, path, status=status, **kwargs)
    await conform(response, method)
    return response, body


def audit(database: Database) -> list[tuple[Any, ...]]:
    return database.execute(
        "SELECT actor, action, ruleset_id, rule_id, row_version_before, row_version_after,"
        " document_before, document_after FROM rule_sidecar_writes ORDER BY id"
    )


class TestWrites:
    async def test_create_read_update_delete(
        self, start_sidecar: StartSidecar, rules_dir: Path, migrated_db: Database, token_file: Path
    ):
        app = await writing_sidecar(start_sidecar, rules_dir, migrated_db, token_file)
        response, read = await call(app, "GET", "/api/v1/rulesets/pay")
        first = read["row_version"]
        assert response.headers["ETag"] == f'"{first}"'

        # create
        response, answer = await put(
            app,
            ruleset_with_test("new", 5),
            status=200,
            headers={"If-None-Match": "*", "X-Actor": "ana"},
        )
        assert answer["registry_version"] == app.version
        assert (await app.evaluate("new", {"amount": 500}))["total_points"] == 5
        created = answer["row_version"]
        assert response.headers["ETag"] == f'"{created}"'
        # an update with the version read
        _, answer = await put(
            app, ruleset_with_test("new", 7), status=200, headers={"If-Match": f'"{created}"'}
        )
        assert answer["row_version"] > created
        assert (await app.evaluate("new", {"amount": 500}))["total_points"] == 7
        read = await app.get("/api/v1/rulesets/new")
        assert read["row_version"] == answer["row_version"]
        # the same version again is stale
        _, refused = await put(
            app, ruleset_with_test("new", 9), status=412, headers={"If-Match": f'"{created}"'}
        )
        assert refused["error"]["row_version"] == answer["row_version"]
        # delete
        _, deleted = await call(
            app,
            "DELETE",
            "/api/v1/rulesets/new",
            headers={**ADMIN, "If-Match": f'"{answer["row_version"]}"', "X-Actor": "bo"},
        )
        assert deleted == {"row_version": None, "registry_version": app.version}
        await app.get("/api/v1/rulesets/new", status=404)
        rows = audit(migrated_db)
        assert [(r[0], r[1], r[2]) for r in rows] == [
            ("ana", "create", "new"),
            (None, "replace", "new"),
            ("bo", "delete", "new"),
        ]
        assert rows[0][4] is None
        assert rows[0][6] is None
        assert json.loads(rows[0][7])["metadata"]["id"] == "new"
        assert rows[1][4] == created
        assert rows[1][5] == answer["row_version"]
        assert rows[2][5] is None
        assert rows[2][7] is None
        history = (await app.get(f"{HOT}/history"))["history"]
        writes = [h for h in history if h["trigger"] == "write"]
        assert writes[-1]["filtered_by"] == {
            "action": "create",
            "ruleset_id": "new",
            "rule_id": None,
            "actor": "ana",
        }
        assert all(h["status"] == "success" for h in writes)

    async def test_enable_and_disable(
        self, start_sidecar: StartSidecar, rules_dir: Path, migrated_db: Database, token_file: Path
    ):
        migrated_db.import_docs(make_ruleset_doc("open", [rule_doc("open-a", "true", 3)]))
        app = await writing_sidecar(start_sidecar, rules_dir, migrated_db, token_file)
        _, answer = await call(
            app, "POST", "/api/v1/rules/open-a/disable", status=200, headers=ADMIN
        )
        assert (await app.get("/api/v1/rules/open-a"))["enabled"] is False
        assert (await app.evaluate("open", {}))["total_points"] == 0
        # idempotent: nothing written, the same version
        _, again = await call(
            app, "POST", "/api/v1/rules/open-a/disable", status=200, headers=ADMIN
        )
        assert again["row_version"] == answer["row_version"]
        # If-Match is checked when given
        await app.post(
            "/api/v1/rules/open-a/enable", headers={**ADMIN, "If-Match": '"1"'}, status=412
        )
        await app.post(
            "/api/v1/rules/open-a/enable",
            headers={**ADMIN, "If-Match": f'"{answer["row_version"]}"'},
        )
        assert (await app.evaluate("open", {}))["total_points"] == 3
        await call(app, "POST", "/api/v1/rules/nope/enable", headers=ADMIN, status=404)
        assert [r[1] for r in audit(migrated_db)] == ["disable", "enable"]

    async def test_a_write_that_breaks_an_embedded_test_writes_nothing(
        self, start_sidecar: StartSidecar, rules_dir: Path, migrated_db: Database, token_file: Path
    ):
        app = await writing_sidecar(start_sidecar, rules_dir, migrated_db, token_file)
        read = await app.get("/api/v1/rulesets/pay")
        before, version = migrated_db.dump(), app.version
        broken = ruleset_with_test("pay", 10)
        broken["spec"]["rules"][0]["points"] = 11  # the test still expects 10
        _, refused = await put(
            app, broken, status=422, headers={"If-Match": f'"{read["row_version"]}"'}
        )
        assert refused["error"]["errors"][0]["location"].startswith("request.yaml:")
        assert "total_points" in refused["error"]["errors"][0]["error"]
        assert migrated_db.dump() == before
        assert audit(migrated_db) == []
        assert app.version == version
        assert (await app.evaluate("pay", {"amount": 500}))["total_points"] == 10

    async def test_a_rule_id_of_another_ruleset_is_refused(
        self, start_sidecar: StartSidecar, rules_dir: Path, migrated_db: Database, token_file: Path
    ):
        write_rules(rules_dir, "files.yaml", dump_yaml(make_ruleset_doc("files")))
        app = await writing_sidecar(start_sidecar, rules_dir, migrated_db, token_file)
        before = migrated_db.dump()
        doc = make_ruleset_doc("dup", [rule_doc("files-big", "true", 1)])  # the file's rule id
        _, refused = await put(app, doc, status=422, headers={"If-None-Match": "*"})
        assert any("files-big" in e["error"] for e in refused["error"]["errors"])
        assert migrated_db.dump() == before
        await app.get("/api/v1/rulesets/dup", status=404)

    async def test_path_and_metadata_id_must_agree(
        self, start_sidecar: StartSidecar, rules_dir: Path, migrated_db: Database, token_file: Path
    ):
        app = await writing_sidecar(start_sidecar, rules_dir, migrated_db, token_file)
        _, refused = await call(
            app,
            "PUT",
            "/api/v1/rulesets/other",
            status=422,
            json={"documents": [ruleset_with_test("mine")]},
            headers={**ADMIN, "If-None-Match": "*"},
        )
        assert refused["error"]["errors"][0]["path"] == "$.metadata.id"
        await app.get("/api/v1/rulesets/mine", status=404)

    async def test_refusals_before_anything_is_read(
        self, start_sidecar: StartSidecar, rules_dir: Path, migrated_db: Database, token_file: Path
    ):
        app = await writing_sidecar(start_sidecar, rules_dir, migrated_db, token_file)
        doc = ruleset_with_test("pay")
        before = migrated_db.dump()
        await put(app, doc, status=428, headers={})
        await call(
            app,
            "PUT",
            "/api/v1/rulesets/pay",
            status=401,
            data=dump_yaml(doc),
            headers={"Content-Type": "application/yaml", "If-None-Match": "*"},
        )
        await put(app, doc, status=400, headers={"If-None-Match": "*", "X-Actor": "a\tb"})
        await put(app, doc, status=400, headers={"If-None-Match": "*", "X-Actor": "x" * 201})
        await put(app, doc, status=400, headers={"If-Match": "3"})
        await put(app, doc, status=400, headers={"If-Match": '"01"'})  # the tag is "1"
        await call(
            app,
            "PUT",
            "/api/v1/rulesets/pay",
            status=415,
            data=b"x",
            headers={**ADMIN, "Content-Type": "text/plain", "If-None-Match": "*"},
        )
        await call(app, "DELETE", "/api/v1/rulesets/pay", status=428, headers=ADMIN)
        assert migrated_db.dump() == before

    async def test_without_a_token_writes_are_forbidden(
        self, start_sidecar: StartSidecar, rules_dir: Path, migrated_db: Database
    ):
        app = await writing_sidecar(start_sidecar, rules_dir, migrated_db, None)
        _, answer = await put(
            app, ruleset_with_test("pay"), status=403, headers={"If-None-Match": "*"}
        )
        assert "admin token" in answer["error"]["message"]
        _, status = await call(app, "GET", f"{HOT}/status")
        assert status["writes"] == {
            "available": False,
            "source": status["sources"][-1]["name"],
            "reason": answer["error"]["message"],
        }

    async def test_the_yaml_document_is_what_a_put_takes_back(
        self, start_sidecar: StartSidecar, rules_dir: Path, migrated_db: Database, token_file: Path
    ):
        """`Accept: application/yaml` gives the stored ruleset's document with its row
        version as ETag: put back as it is, nothing changes; edited, the edit serves."""
        app = await writing_sidecar(start_sidecar, rules_dir, migrated_db, token_file)
        _, status = await call(app, "GET", f"{HOT}/status")
        assert status["writes"] == {
            "available": True,
            "source": status["sources"][-1]["name"],
            "reason": None,
        }
        assert status["writes"]["source"].startswith(migrated_db.kind)
        response, _ = await call(
            app, "GET", "/api/v1/rulesets/pay", headers={"Accept": "application/yaml"}
        )
        text = await response.text()
        assert response.content_type == "application/yaml"
        assert response.headers["Vary"] == "Accept"
        assert response.headers["Cache-Control"] == "no-store"
        etag = response.headers["ETag"]
        assert etag == f'"{(await app.get("/api/v1/rulesets/pay"))["row_version"]}"'
        document = yaml.safe_load(text)
        assert list(document) == ["apiVersion", "kind", "metadata", "spec"]
        assert document["metadata"]["id"] == "pay"
        assert document["spec"]["rules"][0]["points"] == 10
        assert document["spec"]["tests"][0]["expect"] == {"total_points": 10}
        version = app.version
        headers = {**ADMIN, "Content-Type": "application/yaml", "If-Match": etag}
        _, same = await call(app, "PUT", "/api/v1/rulesets/pay", data=text, headers=headers)
        assert same == {"row_version": int(etag.strip('"')), "registry_version": version}
        assert audit(migrated_db) == []
        edited = text.replace("points: 10", "points: 12").replace(
            "total_points: 10", "total_points: 12"
        )
        assert edited != text
        await call(app, "PUT", "/api/v1/rulesets/pay", data=edited, headers=headers)
        assert (await app.evaluate("pay", {"amount": 500}))["total_points"] == 12
        # JSON stays the default, and wins a tie
        for accept in (
            "*/*",
            "application/json, application/yaml",
            "application/yaml;q=0.5, application/json",
        ):
            response, _ = await call(app, "GET", "/api/v1/rulesets/pay", headers={"Accept": accept})
            assert response.content_type == "application/json", accept
            assert response.headers["Vary"] == "Accept"


async def test_without_a_database_writes_are_not_allowed(
    start_sidecar: StartSidecar, plain_rules: Path, token_file: Path
):
    app = await start_sidecar(plain_rules, admin_token_file=token_file)
    response, answer = await call(
        app, "PUT", "/api/v1/rulesets/fraud", status=405, json={}, headers=ADMIN
    )
    assert "database" in answer["error"]["message"]
    assert response.headers["Allow"] == "GET,HEAD"
    response, _ = await call(app, "POST", "/api/v1/rules/large-amount/enable", status=405)
    assert response.headers["Allow"] == ""
    assert "row_version" not in await app.get("/api/v1/rulesets/fraud")
    _, status = await call(app, "GET", f"{HOT}/status")
    assert status["writes"] == {
        "available": False,
        "source": None,
        "reason": answer["error"]["message"],
    }
    # a ruleset from files has its document too, read-only
    response, _ = await call(
        app, "GET", "/api/v1/rulesets/fraud", headers={"Accept": "application/yaml"}
    )
    text = await response.text()
    assert (
        response.headers["ETag"]
        == (await app.call("GET", "/api/v1/rulesets/fraud"))[0].headers["ETag"]
    )
    assert yaml.safe_load(text)["metadata"]["id"] == "fraud"


async def test_concurrent_writers_exactly_one_wins(
    start_sidecar: StartSidecar, rules_dir: Path, migrated_db: Database, token_file: Path
):
    app = await writing_sidecar(start_sidecar, rules_dir, migrated_db, token_file)
    version = (await app.get("/api/v1/rulesets/pay"))["row_version"]
    answers = await asyncio.gather(
        *(
            put(
                app,
                ruleset_with_test("pay", points),
                status=None,
                headers={"If-Match": f'"{version}"'},
            )
            for points in range(20, 28)
        )
    )
    statuses = sorted(response.status for response, _ in answers)
    assert statuses == [200] + [412] * 7
    (winner,) = [answer for response, answer in answers if response.status == 200]
    served = await app.get("/api/v1/rulesets/pay")
    assert served["row_version"] == winner["row_version"]
    assert len(audit(migrated_db)) == 1


async def test_writers_of_one_rule_id_in_two_rulesets_exactly_one_wins(
    start_sidecar: StartSidecar, rules_dir: Path, migrated_db: Database, token_file: Path
):
    """Each write alone is valid; together they would hold one rule id twice. Storing a
    rule whose id another ruleset holds would move it out of that ruleset: refused."""
    app = await writing_sidecar(start_sidecar, rules_dir, migrated_db, token_file)
    docs = [
        make_ruleset_doc(
            f"two-{n}", [rule_doc("shared", "true", 1), rule_doc(f"own-{n}", "true", 1)]
        )
        for n in range(4)
    ]
    answers = await asyncio.gather(
        *(put(app, doc, status=None, headers={"If-None-Match": "*"}) for doc in docs)
    )
    statuses = sorted(response.status for response, _ in answers)
    assert statuses == [200] + [422] * 3
    (winner,) = [
        doc for doc, (response, _) in zip(docs, answers, strict=True) if response.status == 200
    ]
    owners = migrated_db.execute("SELECT ruleset_id FROM rule_sidecar_rules WHERE id = 'shared'")
    assert owners == [(winner["metadata"]["id"],)]
    for response, answer in answers:
        if response.status == 422:
            assert any("'shared'" in e["error"] for e in answer["error"]["errors"])
    assert len(audit(migrated_db)) == 1


async def test_a_rule_held_by_a_ruleset_not_read_yet_is_refused(
    start_sidecar: StartSidecar, rules_dir: Path, migrated_db: Database, token_file: Path
):
    """The writing sidecar has not read the ruleset that holds the rule id (another
    writer stored it meanwhile): the check in the write's transaction refuses it, located
    at the rule in the body, and neither ruleset changes."""
    app = await start_sidecar(
        rules_dir, monitor=False, database_url=migrated_db.url, admin_token_file=token_file
    )
    migrated_db.import_docs(
        ruleset_with_test("pay"), make_ruleset_doc("ya", [rule_doc("y-shared", "true", 1)])
    )
    before = migrated_db.dump()
    doc = make_ruleset_doc("yb", [rule_doc("yb-own", "true", 1), rule_doc("y-shared", "true", 2)])
    _, refused = await put(app, doc, status=422, headers={"If-None-Match": "*"})
    (problem,) = refused["error"]["errors"]
    assert problem["location"].startswith("request.yaml:")
    assert "'y-shared' is already used by ruleset 'ya'" in problem["error"]
    assert migrated_db.dump() == before
    assert audit(migrated_db) == []


async def test_two_sidecars_on_one_postgresql(
    start_sidecar: StartSidecar, tmp_path: Path, pg_database: Database, token_file: Path
):
    pg_database.init()
    pg_database.import_docs(ruleset_with_test("pay"))
    dirs = [tmp_path / "a", tmp_path / "b"]
    for directory in dirs:
        directory.mkdir()
    first = await writing_sidecar(start_sidecar, dirs[0], pg_database, token_file)
    second = await writing_sidecar(start_sidecar, dirs[1], pg_database, token_file)
    await eventually(lambda: second.service.sources.statuses[pg_database.url].files == 1 or None)
    await put(first, ruleset_with_test("fresh", 4), status=200, headers={"If-None-Match": "*"})

    async def served() -> Any:
        response, body = await second.call("GET", "/api/v1/rulesets/fresh", status=None)
        return body if response.status == 200 else None

    body = await eventually(served)
    assert body["row_version"] == (await first.get("/api/v1/rulesets/fresh"))["row_version"]


async def test_a_database_that_stops_answering_mid_write(
    start_sidecar: StartSidecar,
    rules_dir: Path,
    pg_database: Database,
    pg_proxy: FreezableProxy,
    token_file: Path,
):
    pg_database.init()
    pg_database.import_docs(ruleset_with_test("pay"))
    url = pg_proxy.url(pg_database.name)
    app = await start_sidecar(
        rules_dir,
        database_url=url,
        admin_token_file=token_file,
        database_statement_timeout_seconds=1.0,
        database_read_timeout_seconds=2.0,
    )
    version = (await app.get("/api/v1/rulesets/pay"))["row_version"]
    before = pg_database.dump()
    with psycopg.connect(pg_database.url) as holder:
        holder.execute("SELECT pg_advisory_xact_lock(%s)", (IMPORT_LOCK,))
        writing = asyncio.create_task(
            put(
                app, ruleset_with_test("pay", 20), status=None, headers={"If-Match": f'"{version}"'}
            )
        )
        await asyncio.sleep(0.3)  # the write waits for the lock the holder has
        pg_proxy.freeze()
        response, answer = await writing
    assert response.status == 503, answer
    assert "nothing was written" in answer["error"]["message"]
    pg_proxy.thaw()
    assert pg_database.dump() == before
    assert (await app.evaluate("pay", {"amount": 500}))["total_points"] == 10
    status, _ = await app.health()
    assert status == 200


async def test_a_schema_3_database_is_written_after_db_init(
    start_sidecar: StartSidecar, rules_dir: Path, migrated_db: Database, token_file: Path
):
    """Schema 4 adds `rule_sidecar_writes`: tables of schema 3 are refused, nothing
    written, until `db init` upgrades them (keeping their rows)."""
    migrated_db.script(
        [("DROP TABLE rule_sidecar_writes", ()), ("UPDATE rule_sidecar_schema SET version = 3", ())]
    )
    app = await writing_sidecar(start_sidecar, rules_dir, migrated_db, token_file)
    before = migrated_db.dump()
    _, refused = await put(
        app, ruleset_with_test("more"), status=422, headers={"If-None-Match": "*"}
    )
    assert "db init" in refused["error"]["errors"][0]["error"]
    assert migrated_db.dump() == before
    migrated_db.init()
    assert migrated_db.execute("SELECT version FROM rule_sidecar_schema") == [(4,)]
    await put(app, ruleset_with_test("more"), status=200, headers={"If-None-Match": "*"})
    assert [row[2] for row in audit(migrated_db)] == ["more"]
    assert (await app.evaluate("pay", {"amount": 500}))["total_points"] == 10


async def test_the_client_writes(
    start_sidecar: StartSidecar, rules_dir: Path, migrated_db: Database, token_file: Path
):
    app = await writing_sidecar(start_sidecar, rules_dir, migrated_db, token_file)
    base = str(app.client.make_url("/")).rstrip("/")
    async with AsyncRuleClient(base, token=TOKEN) as client:
        created = await client.put_ruleset(
            "cli", dump_yaml(ruleset_with_test("cli", 3)), row_version=None, actor="job/7"
        )
        assert created["registry_version"] == app.version
        with pytest.raises(PreconditionFailed) as stale:
            await client.put_ruleset("cli", ruleset_with_test("cli", 4), row_version=None)
        assert stale.value.row_version == created["row_version"]
        broken = ruleset_with_test("cli", 4)
        broken["spec"]["rules"][0]["points"] = 5
        with pytest.raises(WriteRefused) as refused:
            await client.put_ruleset("cli", broken, row_version=created["row_version"])
        assert refused.value.errors
        with pytest.raises(WriteRefused):  # its embedded test expects the rule to match
            await client.disable_rule("cli-big")
        untested = make_ruleset_doc("cli", [rule_doc("cli-big", "true", 3)])
        replaced = await client.put_ruleset("cli", untested, row_version=created["row_version"])
        disabled = await client.disable_rule("cli-big")
        assert disabled["row_version"] > replaced["row_version"]
        await client.enable_rule("cli-big", row_version=disabled["row_version"])
        with pytest.raises(InvalidId):
            await client.delete_ruleset("../x", row_version=1)
        current = (await app.get("/api/v1/rulesets/cli"))["row_version"]
        deleted = await client.delete_ruleset("cli", row_version=current)
        assert deleted["row_version"] is None
    assert [row[1] for row in audit(migrated_db)] == [
        "create",
        "replace",
        "disable",
        "enable",
        "delete",
    ]
    assert audit(migrated_db)[0][0] == "job/7"

"""The database rule source on real SQLite files and a real PostgreSQL server.

`DatabaseSource.read()` and its generation fingerprint first, then the source inside a
real sidecar: NOTIFY and polling, invalid rows, outages, and files and a database
together.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import dump_yaml, fraud_doc, make_ruleset_doc
from db_support import (
    Database,
    pg_admin,
    pg_backends,
    pg_terminate,
    pg_url_for,
    require_postgresql,
)
from server_support import HOT, Sidecar, eventually, metric_value, receive_event, receive_until

from sidecar import dbtools
from sidecar.api.app import AppState
from sidecar.errors import LoadError, Problem
from sidecar.loader import Loader
from sidecar.reading import SourceSet
from sidecar.rulefiles import DEFAULT_FILE_LIMITS
from sidecar.sources.database import APPLICATION_NAME, DatabaseSource
from sidecar.sources.dbschema import SCHEMA_VERSION
from sidecar.sources.files import read_rule_files

# Starts processes, browsers or databases: left out of the quick loop (-m 'not slow').
pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "rules"
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "database"
FOREIGN_LARGE = {"amount": 5000, "country": "FR"}  # fraud: large-amount 40 + foreign 30
URL_SECRET = "url-secret-pw"
FILE_SECRET = "file-secret-pw"
WAIT_SECONDS = 5.0
NOTIFY_SECONDS = 3.0  # NOTIFY must deliver well within this; polling is off (1 h)
LARGE_AMOUNT_TO_45 = "UPDATE rule_sidecar_rules SET points = 45 WHERE id = 'large-amount'"


def set_points(database: Database, points: int, rule_id: str = "large-amount") -> None:
    database.execute("UPDATE rule_sidecar_rules SET points = %s WHERE id = %s", (points, rule_id))


def read_problems(source: DatabaseSource) -> tuple[Problem, ...]:
    """What reading the source and loading it reports (empty when both succeed)."""
    try:
        Loader().load(source.read())
    except LoadError as exc:
        return exc.problems
    return ()


def everything_in(problems: tuple[Problem, ...]) -> str:
    return json.dumps([problem.to_dict() for problem in problems])


def listeners(name: str) -> list[int]:
    """Backends of database `name` that are listening on the sidecar's channel."""
    rows = pg_admin(
        "SELECT pid FROM pg_stat_activity WHERE datname = %s AND query ILIKE 'LISTEN %%'",
        (name,),
    )
    return [pid for (pid,) in rows]


async def total_points(app: Sidecar) -> int:
    points: int = (await app.evaluate("fraud", FOREIGN_LARGE))["total_points"]
    return points


async def history(app: Sidecar) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = (await app.get(f"{HOT}/history"))["history"]
    return records


def points_are(app: Sidecar, expected: int) -> Callable[[], Any]:
    async def check() -> bool:
        return await total_points(app) == expected

    return check


async def failure_naming(ws: Any, text: str) -> dict[str, Any]:
    """The next `reload_failed` event whose first problem's message contains `text`."""
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        failed, _ = await receive_until(ws, "reload_failed", deadline - time.monotonic())
        if text in failed["data"]["errors"][0]["message"]:
            return failed


def healthy(app: Sidecar) -> Callable[[], Any]:
    async def check() -> bool:
        code, body = await app.health()
        return code == 200 and body["status"] == "healthy"

    return check


def no_notify(state: AppState) -> None:
    """Replace the database source by one that does not LISTEN (polling only)."""
    service = state.service
    service.sources = SourceSet(
        [
            DatabaseSource(source.url.url, listen=False)
            if isinstance(source, DatabaseSource)
            else source
            for source in service.sources
        ]
    )


@pytest.fixture
def seeded(migrated: Database) -> Database:
    """Each backend, migrated, holding the `fraud` ruleset (large-amount 40 points)."""
    migrated.import_docs(fraud_doc())
    return migrated


class TestRead:
    """`DatabaseSource.read()`: one document per ruleset, and no full read without a change."""

    def test_unchanged_rulesets_keep_their_source_file_objects(self, migrated: Database):
        """After one ruleset changes, the others are handed over as the very same objects,
        and a loader re-validates only the changed one."""
        migrated.import_docs(fraud_doc(), make_ruleset_doc("extra"))
        source, loader = DatabaseSource(migrated.url), Loader()
        first = {file.name: file for file in source.read()}
        loader.load(first.values())
        set_points(migrated, 41)
        second = {file.name: file for file in source.read()}
        (extra,) = [name for name in second if name.endswith("extra.json")]
        (fraud,) = [name for name in second if name.endswith("fraud.json")]
        assert second[extra] is first[extra]
        assert second[fraud] is not first[fraud]
        assert loader.load(second.values()).files_parsed == 1

    def test_one_document_per_ruleset_named_by_the_redacted_url(self, migrated: Database):
        """Each ruleset is `<redacted url>#rulesets/<id>.json`; they load like the files."""
        dbtools.import_files([EXAMPLES], migrated.url)
        url = pg_url_for(migrated.name, password=URL_SECRET) if migrated.is_postgresql else None
        source = DatabaseSource(url or migrated.url)
        files = source.read()
        ids = ["content-moderation", "loan-prequalification", "payment-fraud"]
        assert [file.name for file in files] == [f"{source.name}#rulesets/{i}.json" for i in ids]
        if migrated.is_postgresql:
            assert "postgres:********@" in source.name
            assert all(URL_SECRET not in file.name for file in files)
        expected = Loader().load(read_rule_files([EXAMPLES])).snapshot.revision
        assert Loader().load(files).snapshot.revision == expected

    def test_after_a_change_only_changed_rulesets_are_read_again(self, migrated: Database):
        """A change to one ruleset re-reads that ruleset only: a row of another ruleset
        changed behind every trigger stays unseen."""
        migrated.import_docs(fraud_doc(), make_ruleset_doc("extra"))
        source = DatabaseSource(migrated.url)
        source.read()
        # No trigger: neither the generation nor the ruleset's change_id moves.
        migrated.change_unseen("UPDATE rule_sidecar_rules SET points = 77 WHERE id = 'extra-big'")
        set_points(migrated, 41)  # a real change, in the other ruleset
        documents = {
            file.name.rsplit("/", 1)[-1]: json.loads(file.content) for file in source.read()
        }
        rules = {r["id"]: r for d in documents.values() for r in d["spec"]["rules"]}
        assert rules["large-amount"]["points"] == 41
        assert rules["extra-big"]["points"] == 10  # the hidden change was not read

    def test_unchanged_generation_returns_the_same_bytes_without_reading_rows(
        self, seeded: Database
    ):
        """A row changed behind the fingerprint is not seen until the generation moves."""
        source = DatabaseSource(seeded.url)
        first = source.read()
        generation = seeded.generation()
        seeded.change_unseen("UPDATE rule_sidecar_rules SET points = 41 WHERE id = 'large-amount'")
        assert seeded.rules()["large-amount"]["points"] == 41
        assert seeded.generation() == generation

        assert source.read() == first  # same bytes: only the generation was read

        set_points(seeded, 30, "foreign-country")  # a real change moves the generation
        assert seeded.generation() > generation
        document = json.loads(next(f for f in source.read() if "fraud" in f.name).content)
        points = {rule["id"]: rule["points"] for rule in document["spec"]["rules"]}
        assert points["large-amount"] == 41

    @pytest.mark.parametrize(
        "statement",
        [
            "INSERT INTO rule_sidecar_rulesets (id) VALUES ('added')",
            "UPDATE rule_sidecar_rulesets SET description = 'changed' WHERE id = 'fraud'",
            "DELETE FROM rule_sidecar_rulesets WHERE id = 'fraud'",
            "INSERT INTO rule_sidecar_rules (id, ruleset_id, condition, points)"
            " VALUES ('added-rule', 'fraud', 'true', 1)",
            "UPDATE rule_sidecar_rules SET points = 41 WHERE id = 'large-amount'",
            "DELETE FROM rule_sidecar_rules WHERE id = 'never-on'",
        ],
        ids=[
            "insert-ruleset",
            "update-ruleset",
            "delete-ruleset",
            "insert-rule",
            "update-rule",
            "delete-rule",
        ],
    )
    def test_every_change_moves_the_generation(self, seeded: Database, statement: str):
        """Insert, update or delete of a ruleset or rule moves the generation; read sees it."""
        source = DatabaseSource(seeded.url)
        before = source.read()
        generation = seeded.generation()
        seeded.execute(statement)
        assert seeded.generation() > generation
        assert source.read() != before

    def test_truncate_moves_the_generation(self, pg_database: Database):
        """PostgreSQL: TRUNCATE of the rules (no row triggers) still moves the generation."""
        pg_database.init().import_docs(fraud_doc())
        source = DatabaseSource(pg_database.url)
        before = source.read()
        generation = pg_database.generation()
        pg_database.execute("TRUNCATE rule_sidecar_rules")
        assert pg_database.generation() > generation
        document = json.loads(source.read()[0].content)
        assert document["spec"]["rules"] == []
        assert source.read() != before

    def test_direct_update_bumps_row_version_and_updated_at(self, seeded: Database):
        """An UPDATE made by any tool gets a new row_version and updated_at from the triggers."""
        if seeded.is_postgresql:
            seeded.change_unseen("UPDATE rule_sidecar_rules SET updated_at = '2001-01-01'")
        else:
            seeded.execute(
                "UPDATE rule_sidecar_rules SET updated_at = '2001-01-01 00:00:00',"
                " row_version = row_version + 1"
            )
        before = seeded.rules()
        set_points(seeded, 41)
        after = seeded.rules()
        assert after["large-amount"]["row_version"] == before["large-amount"]["row_version"] + 1
        assert str(after["large-amount"]["updated_at"]) > str(before["large-amount"]["updated_at"])
        assert after["foreign-country"] == before["foreign-country"]

    @pytest.mark.parametrize("where", ["closed-port", "wrong-database"])
    def test_unreachable_database_raises_load_error_without_the_password(
        self, where: str, tmp_path: Path
    ):
        """LoadError names the source (redacted) and never shows either password."""
        if where == "closed-port":
            url = pg_url_for("rules", password=URL_SECRET, port=1)
        else:
            require_postgresql()
            url = pg_url_for("rs_t_no_such_database", password=URL_SECRET)
        password_file = tmp_path / "password"
        password_file.write_text(f"{FILE_SECRET}\n", encoding="utf-8")
        source = DatabaseSource(url, password_file=password_file)

        with pytest.raises(LoadError) as caught:
            source.read()
        (problem,) = caught.value.problems
        assert problem.file == source.name
        assert "postgres:********@" in problem.file
        assert problem.message.startswith("database unavailable: ")
        if where == "wrong-database":
            assert "rs_t_no_such_database" in problem.message
        text = everything_in(caught.value.problems) + str(caught.value)
        assert URL_SECRET not in text
        assert FILE_SECRET not in text

    def test_missing_tables_say_to_run_db_init(self, database: Database):
        """A database without the tables: LoadError that points at `rule-sidecar db init`."""
        if not database.is_postgresql:
            Path(database.name).touch()  # an empty SQLite file: no tables
        with pytest.raises(LoadError) as caught:
            DatabaseSource(database.url).read()
        assert "rule-sidecar db init" in caught.value.problems[0].message

    def test_reading_never_creates_a_sqlite_file(self, sqlite_database: Database):
        """A SQLite path that does not exist fails to read and is not created."""
        with pytest.raises(LoadError) as caught:
            DatabaseSource(sqlite_database.url).read()
        assert caught.value.problems[0].file == sqlite_database.url
        assert not Path(sqlite_database.name).exists()

    def test_malformed_json_column_is_reported_with_its_rule(self, seeded: Database):
        """A rule whose `tags` column is not JSON text is reported with its ruleset and rule."""
        # SQLite keeps whatever text it is given; PostgreSQL keeps a JSON string as a string.
        bad = "'\"oops\"'::jsonb" if seeded.is_postgresql else "'oops'"
        seeded.execute(f"UPDATE rule_sidecar_rules SET tags = {bad} WHERE id = 'large-amount'")
        problems = read_problems(DatabaseSource(seeded.url))
        assert problems
        assert any((p.ruleset_id, p.rule_id) == ("fraud", "large-amount") for p in problems), (
            problems
        )
        assert all("unavailable" not in p.message for p in problems), problems

    @pytest.mark.parametrize("column", ["decisions", "tests"])
    @pytest.mark.parametrize("value", ["null", "{}", "false", "0", '""'])
    def test_a_json_column_that_is_not_a_list_is_refused(
        self, seeded: Database, column: str, value: str
    ):
        """`decisions` or `tests` set to JSON that is not a list: refused at its field,
        never read as "none" (which took every decision band away as a success)."""
        cast = "::jsonb" if seeded.is_postgresql else ""
        seeded.execute(
            f"UPDATE rule_sidecar_rulesets SET {column} = '{value}'{cast} WHERE id = 'fraud'"
        )
        problems = read_problems(DatabaseSource(seeded.url))
        assert [(p.ruleset_id, p.path) for p in problems] == [("fraud", f"$.spec.{column}")]

    def test_sqlite_enabled_written_as_text_false_is_not_live(self, sqlite_database: Database):
        """SQLite `enabled = 'false'` (text): the load is refused, with the rule and the
        field located, as `enabled: "false"` in a file is. SQLite's own 0/1 are booleans;
        any other text is not guessed at ('false', 'no', 'off'...): it is an error."""
        sqlite_database.init().import_docs(fraud_doc())
        sqlite_database.execute(
            "UPDATE rule_sidecar_rules SET enabled = 'false' WHERE id = 'large-amount'"
        )
        assert sqlite_database.execute(
            "SELECT typeof(enabled) FROM rule_sidecar_rules WHERE id = 'large-amount'"
        ) == [("text",)]
        problems = read_problems(DatabaseSource(sqlite_database.url))
        assert [(p.ruleset_id, p.rule_id, p.path) for p in problems] == [
            ("fraud", "large-amount", "$.spec.rules[0].enabled")
        ], problems
        assert "boolean" in problems[0].message


class TestLiveChanges:
    """A row change reaches the registry: via NOTIFY, or via the periodic resync without it."""

    async def test_notify_reaches_the_registry(
        self, pg_database: Database, start_sidecar, rules_dir: Path
    ):
        """PostgreSQL: an UPDATE of points is live within seconds with polling set to 1 h."""
        pg_database.init().import_docs(fraud_doc())
        app = await start_sidecar(
            rules_dir, database_url=pg_database.url, monitor=True, interval_seconds=3600
        )
        assert await total_points(app) == 70
        await eventually(lambda: listeners(pg_database.name), message="listening")
        set_points(pg_database, 60)
        await eventually(points_are(app, 90), timeout=NOTIFY_SECONDS, message="NOTIFY reload")
        newest = (await history(app))[0]
        assert (newest["status"], newest["trigger"]) == ("success", "watch")

    @pytest.mark.parametrize("backend", ["sqlite", "postgresql-listen-off"])
    async def test_polling_reaches_the_registry_without_notify(
        self, backend: str, request, start_sidecar, rules_dir: Path
    ):
        """SQLite, or PostgreSQL with `listen=False`: the periodic resync picks the change up."""
        if backend != "sqlite":
            require_postgresql()
        fixture = "sqlite_database" if backend == "sqlite" else "pg_database"
        database: Database = request.getfixturevalue(fixture)
        database.init().import_docs(fraud_doc())
        app = await start_sidecar(
            rules_dir,
            database_url=database.url,
            monitor=True,
            interval_seconds=0.2,
            prepare=no_notify,
        )
        assert await total_points(app) == 70
        set_points(database, 60)
        await eventually(points_are(app, 90), message="resync reload")
        newest = (await history(app))[0]
        assert (newest["status"], newest["trigger"]) == ("success", "resync")
        if database.is_postgresql:
            assert listeners(database.name) == []

    @pytest.mark.parametrize(
        "case",
        [("condition", "input.amount >", "input.amount >= 1000"), ("points", 5_000_000, 45)],
        ids=["condition-does-not-compile", "points-beyond-the-schema"],
    )
    async def test_invalid_row_changes_nothing_until_fixed(
        self, seeded: Database, start_sidecar, rules_dir: Path, case: tuple[str, Any, Any]
    ):
        """A bad row is refused and located; old rules serve, degraded; a fix makes it healthy."""
        column, bad, good = case
        app = await start_sidecar(
            rules_dir, database_url=seeded.url, monitor=True, interval_seconds=0.2
        )
        ws = await app.client.ws_connect("/ws/hot-reload")
        await receive_event(ws)
        version = app.version
        update = f"UPDATE rule_sidecar_rules SET {column} = %s WHERE id = 'large-amount'"

        seeded.execute(update, (bad,))
        failed, _ = await receive_until(ws, "reload_failed")
        (error,) = failed["data"]["errors"]
        assert error["file"] == f"{app.service.sources[-1].name}#rulesets/fraud.json"
        assert error["ruleset_id"] == "fraud"
        assert error["path"] == f"$.spec.rules[0].{column}"
        if column == "condition":
            assert error["rule_id"] == "large-amount"
        assert (await total_points(app), app.version) == (70, version)
        code, health = await app.health()
        assert (code, health["status"]) == (200, "degraded")
        status = await app.get(f"{HOT}/status")
        assert status["last_reload_status"] == "failed"
        assert status["last_errors"] == [error]
        newest = (await history(app))[0]
        assert (newest["status"], newest["errors"]) == ("failed", [error])

        seeded.execute(update, (good,))
        await receive_until(ws, "rules_reloaded")
        await eventually(healthy(app), message="healthy again")
        assert await total_points(app) == (70 if column == "condition" else 75)
        assert app.version == version + 1
        await ws.close()

    async def test_row_fixed_back_to_the_served_rules_is_healthy_again(
        self, sqlite_database: Database, start_sidecar, rules_dir: Path
    ):
        """A broken row put back exactly as it was: the sidecar is healthy again."""
        sqlite_database.init().import_docs(fraud_doc())
        app = await start_sidecar(
            rules_dir, database_url=sqlite_database.url, monitor=True, interval_seconds=0.1
        )
        update = "UPDATE rule_sidecar_rules SET condition = %s WHERE id = 'large-amount'"
        sqlite_database.execute(update, ("input.amount >",))

        async def failed() -> bool:
            return (await history(app))[0]["status"] == "failed"

        await eventually(failed, message="failure recorded")
        sqlite_database.execute(update, ("input.amount > 1000",))
        checked = app.service.last_check
        await eventually(lambda: app.service.last_check != checked, message="resync")
        assert await total_points(app) == 70
        await eventually(healthy(app), timeout=2, message="healthy after the fix")

    async def test_row_refused_by_the_schema_names_its_rule(
        self, sqlite_database: Database, start_sidecar, rules_dir: Path
    ):
        """Points beyond the schema's maximum: the recorded problem names the rule id."""
        sqlite_database.init().import_docs(fraud_doc())
        app = await start_sidecar(rules_dir, database_url=sqlite_database.url)
        set_points(sqlite_database, 5_000_000)
        record = await app.post(f"{HOT}/reload", status=422)
        assert record["status"] == "failed"
        (error,) = record["errors"]
        assert (error["ruleset_id"], error["rule_id"]) == ("fraud", "large-amount")


async def watch_ok(app: Sidecar, source: str) -> float | None:
    """The `rule_sidecar_source_watch_ok` gauge of one source."""
    response, _ = await app.call("GET", "/metrics")
    return metric_value(await response.text(), "rule_sidecar_source_watch_ok", {"source": source})


class TestOutage:
    """PostgreSQL goes away: the last good rules keep serving and the sidecar recovers alone."""

    async def test_listener_reconnects_and_resyncs_what_it_missed(
        self, pg_database: Database, start_sidecar, rules_dir: Path, caplog
    ):
        """Every connection killed, a change made meanwhile: picked up after reconnecting."""
        caplog.set_level(logging.WARNING, logger="sidecar.database")
        pg_database.init().import_docs(fraud_doc())
        url = pg_url_for(pg_database.name, password=URL_SECRET)
        app = await start_sidecar(rules_dir, database_url=url, monitor=True, interval_seconds=3600)
        (first,) = await eventually(lambda: listeners(pg_database.name), message="listening")

        def listen_failures() -> int:
            return sum("listening on" in r.getMessage() for r in caplog.records)

        with psycopg.connect(pg_database.url, autocommit=True) as writer:
            pg_admin(f"ALTER DATABASE {pg_database.name} WITH ALLOW_CONNECTIONS false")
            try:
                pg_terminate(pg_database.name, keep=[writer.info.backend_pid])
                # The NOTIFY of this change goes nowhere: nobody is listening.
                writer.execute(LARGE_AMOUNT_TO_45)
                # The listener noticed and has also failed to reconnect at least once.
                await eventually(lambda: listen_failures() >= 2, message="reconnect attempts")
                assert await total_points(app) == 70
                # Health says why changes may be missed (before any resync fails).
                code, health = await app.health()
                assert (code, health["status"]) == (200, "degraded")
                ((source, problem),) = health["watch_problems"].items()
                assert problem.startswith("not listening: ")
                assert URL_SECRET not in problem
                assert await watch_ok(app, source) == 0
            finally:
                pg_admin(f"ALTER DATABASE {pg_database.name} WITH ALLOW_CONNECTIONS true")

        await eventually(points_are(app, 75), timeout=10, message="resync after reconnect")
        (second,) = await eventually(lambda: listeners(pg_database.name), message="relistening")
        assert second != first
        # Picked up by the full read listening again begins with ("watch"); or, when a
        # read met the outage and failed (the read listening began with at startup can
        # still be running when the connections are cut), by that failure's retry
        # ("resync"), whichever comes first once connections are allowed again. Either
        # way a reload after the outage, and the last good rules until then.
        # TestOneConnection kills the listener with no outage: there it is "watch".
        newest = (await history(app))[0]
        assert newest["status"] == "success"
        assert newest["trigger"] in ("watch", "resync")
        assert all(URL_SECRET not in record.getMessage() for record in caplog.records)

        set_points(pg_database, 50)  # and NOTIFY works again
        await eventually(points_are(app, 80), timeout=NOTIFY_SECONDS, message="NOTIFY again")
        code, health = await app.health()
        assert (code, health["status"], health["watch_problems"]) == (200, "healthy", {})
        assert await watch_ok(app, source) == 1

    async def test_database_unavailable_degrades_then_recovers(
        self, pg_database: Database, start_sidecar, rules_dir: Path
    ):
        """No connection allowed: degraded (200), reload_failed naming the database; back: ok."""
        pg_database.init().import_docs(fraud_doc())
        url = pg_url_for(pg_database.name, password=URL_SECRET)
        app = await start_sidecar(rules_dir, database_url=url, monitor=True, interval_seconds=0.2)
        ws = await app.client.ws_connect("/ws/hot-reload")
        await receive_event(ws)
        version = app.version

        with psycopg.connect(pg_database.url, autocommit=True) as writer:
            pg_admin(f"ALTER DATABASE {pg_database.name} WITH ALLOW_CONNECTIONS false")
            try:
                pg_terminate(pg_database.name, keep=[writer.info.backend_pid])
                # (A read cut short by the termination may fail first, with another message.)
                failed = await failure_naming(ws, pg_database.name)
                (error,) = failed["data"]["errors"]
                assert error["file"] == app.service.sources[-1].name
                assert pg_database.name in error["file"]
                assert error["message"].startswith("database unavailable: ")
                assert URL_SECRET not in json.dumps(failed)

                code, health = await app.health()
                assert (code, health["status"]) == (200, "degraded")
                assert (await total_points(app), app.version) == (70, version)
                status = await app.get(f"{HOT}/status")
                (db_status,) = [s for s in status["sources"] if s["name"] == error["file"]]
                assert db_status["errors"] == [error]
                assert (await history(app))[0]["status"] == "failed"
                writer.execute(LARGE_AMOUNT_TO_45)
            finally:
                pg_admin(f"ALTER DATABASE {pg_database.name} WITH ALLOW_CONNECTIONS true")

        reloaded, _ = await receive_until(ws, "rules_reloaded", timeout=10)
        assert reloaded["data"]["status"] == "success"
        await eventually(healthy(app), message="healthy again")
        assert await total_points(app) == 75
        status = await app.get(f"{HOT}/status")
        assert all(source["errors"] == [] for source in status["sources"])
        await ws.close()

    async def test_a_hanging_database_does_not_hang_the_sidecar(
        self, pg_database: Database, start_sidecar, rules_dir: Path
    ):
        """Reads blocked by a lock (a database that hangs): evaluations keep answering at
        once, the read gives up at the statement timeout (10 s) with a clear error, the
        last good rules serve, and the sidecar catches up alone when the lock goes."""
        pg_database.init().import_docs(fraud_doc())
        app = await start_sidecar(
            rules_dir, database_url=pg_database.url, monitor=True, interval_seconds=0.2
        )
        ws = await app.client.ws_connect("/ws/hot-reload")
        await receive_event(ws)
        with psycopg.connect(pg_database.url) as locker:  # holds the lock until it ends
            locker.execute(LARGE_AMOUNT_TO_45)
            locker.execute("LOCK TABLE rule_sidecar_state IN ACCESS EXCLUSIVE MODE")
            slowest = 0.0
            deadline = time.monotonic() + 15
            failed: dict[str, Any] | None = None
            while failed is None and time.monotonic() < deadline:
                started = time.monotonic()
                assert await total_points(app) == 70
                slowest = max(slowest, time.monotonic() - started)
                with contextlib.suppress(TimeoutError):
                    message = await ws.receive_json(timeout=0.05)
                    if message["event_type"] == "reload_failed":
                        failed = message
            assert failed is not None, "the blocked read never gave up"
            (error,) = failed["data"]["errors"]
            assert "statement timeout" in error["message"]
            assert slowest < 1.0
            code, health = await app.health()
            assert (code, health["status"]) == (200, "degraded")
            locker.commit()
        await eventually(points_are(app, 75), timeout=10, message="caught up after the lock")
        await eventually(healthy(app), message="healthy again")
        await ws.close()

    async def test_a_dropped_database_then_recreated(
        self, pg_database: Database, start_sidecar, rules_dir: Path
    ):
        """The database is dropped under a running sidecar: the reload fails naming it,
        the last good rules serve; once it is created and filled again, the sidecar
        serves its rules without being told."""
        pg_database.init().import_docs(fraud_doc())
        app = await start_sidecar(
            rules_dir, database_url=pg_database.url, monitor=True, interval_seconds=0.2
        )
        ws = await app.client.ws_connect("/ws/hot-reload")
        await receive_event(ws)
        pg_admin(f"DROP DATABASE {pg_database.name} WITH (FORCE)")
        failed = await failure_naming(ws, "does not exist")
        assert pg_database.name in failed["data"]["errors"][0]["message"]
        code, health = await app.health()
        assert (code, health["status"], await total_points(app)) == (200, "degraded", 70)
        pg_admin(f"CREATE DATABASE {pg_database.name}")
        pg_database.init().import_docs(fraud_doc(55))
        await eventually(points_are(app, 85), timeout=10, message="the new database's rules")
        await eventually(healthy(app), message="healthy again")
        await ws.close()

    async def test_an_unknown_user_is_named_and_nothing_loads(
        self, pg_database: Database, start_sidecar, rules_dir: Path
    ):
        """Wrong credentials (a role the server does not know; this server trusts every
        password): nothing loads (all or nothing across sources), and the status names
        the server's reason."""
        pg_database.init().import_docs(fraud_doc())
        url = pg_url_for(pg_database.name).replace("postgres@", "nobody_here@")
        app = await start_sidecar(rules_dir, database_url=url)
        code, health = await app.health()
        assert (code, health["status"]) == (503, "unhealthy")
        status = await app.get(f"{HOT}/status")
        (db_status,) = [s for s in status["sources"] if "nobody_here" in s["name"]]
        (error,) = db_status["errors"]
        assert 'role "nobody_here" does not exist' in error["message"]

    async def test_startup_with_the_database_down(
        self, pg_database: Database, start_sidecar, rules_dir: Path, tmp_path: Path
    ):
        """Down at startup: the state dir's copy serves (degraded), else unhealthy; then it
        recovers by itself."""
        pg_database.init().import_docs(fraud_doc())
        state_dir = tmp_path / "state"
        await start_sidecar(rules_dir, database_url=pg_database.url, state_dir=state_dir)
        pg_admin(f"ALTER DATABASE {pg_database.name} WITH ALLOW_CONNECTIONS false")
        try:
            pg_terminate(pg_database.name)
            saved = await start_sidecar(
                rules_dir,
                database_url=pg_database.url,
                state_dir=state_dir,
                monitor=True,
                interval_seconds=0.2,
            )
            code, health = await saved.health()
            assert (code, health["status"], health["serving_from"]) == (
                200,
                "degraded",
                "state_dir",
            )
            assert await total_points(saved) == 70
            nothing = await start_sidecar(rules_dir, database_url=pg_database.url)
            code, health = await nothing.health()
            assert (code, health["status"]) == (503, "unhealthy")
        finally:
            pg_admin(f"ALTER DATABASE {pg_database.name} WITH ALLOW_CONNECTIONS true")
        set_points(pg_database, 45)

        async def from_sources() -> bool:
            _, health = await saved.health()
            return (health["status"], health["serving_from"]) == ("healthy", "sources")

        await eventually(from_sources, message="serving from the database again")
        assert await total_points(saved) == 75


class TestOneConnection:
    """A PostgreSQL source holds one connection: it listens, reads and beats on it."""

    @pytest.fixture
    def seeded_pg(self, pg_database: Database) -> Database:
        pg_database.init().import_docs(fraud_doc())
        return pg_database

    @staticmethod
    async def listening(app: Sidecar, name: str) -> int:
        """The listener's backend, once it is the database's only one (the tests'
        short connections are gone) and has served a read since it listened."""
        await eventually(lambda: len(listeners(name)) == 1, message="listening")
        await app.post(f"{HOT}/reload")  # a read, on the listening connection
        (pid,) = await eventually(lambda: listeners(name), message="listening after the read")
        await eventually(lambda: pg_backends(name) == [pid], message="one connection")
        return pid

    async def test_one_connection_listens_and_reads(
        self, pg_database: Database, start_sidecar, rules_dir: Path
    ):
        """Listening, after reads (a forced one and one per NOTIFY): one backend on the
        database, the listener, named `rule-sidecar`; a change on it is still live."""
        seeded = pg_database.init()
        seeded.import_docs(fraud_doc())
        app = await start_sidecar(
            rules_dir, database_url=seeded.url, monitor=True, interval_seconds=3600
        )
        pid = await self.listening(app, seeded.name)
        set_points(seeded, 60)
        await eventually(points_are(app, 90), timeout=NOTIFY_SECONDS, message="NOTIFY reload")
        assert (await history(app))[0]["trigger"] == "watch"
        assert listeners(seeded.name) == [pid]
        await eventually(lambda: pg_backends(seeded.name) == [pid], message="still one")
        ((name,),) = pg_admin(
            "SELECT application_name FROM pg_stat_activity WHERE pid = %s", (pid,)
        )
        assert name == APPLICATION_NAME

    async def test_a_change_committed_while_a_read_runs_is_not_lost(self, seeded_pg: Database):
        """A read waits on a lock the test holds, on the connection that listens; the
        test commits a change and lets the read go. The read's snapshot is older than
        the change, so only its NOTIFY, which reaches the connection while that read
        runs, can tell: `changes()` yields it."""
        source = DatabaseSource(seeded_pg.url)
        heard: asyncio.Queue[str] = asyncio.Queue()

        async def listen() -> None:
            async for reason in source.changes():
                heard.put_nowait(reason)

        listener = asyncio.create_task(listen())
        try:
            assert await asyncio.wait_for(heard.get(), WAIT_SECONDS) == "listening"
            (pid,) = listeners(seeded_pg.name)
            with psycopg.connect(seeded_pg.url) as locker:
                locker.execute("LOCK TABLE rule_sidecar_state IN ACCESS EXCLUSIVE MODE")
                reading = asyncio.create_task(asyncio.to_thread(source.read))

                def blocked() -> bool:
                    rows = pg_admin(
                        "SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (pid,)
                    )
                    return rows == [("Lock",)]

                await eventually(blocked, message="the read waits on the lock")
                locker.execute(LARGE_AMOUNT_TO_45)
                locker.commit()
            (file,) = await reading
            assert json.loads(file.content)["spec"]["rules"][0]["points"] == 40  # before
            reason = await asyncio.wait_for(heard.get(), NOTIFY_SECONDS)
            assert reason.startswith("notify: "), reason
            assert listeners(seeded_pg.name) == [pid]
            (file,) = await asyncio.to_thread(source.read)
            assert json.loads(file.content)["spec"]["rules"][0]["points"] == 45
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener

    async def test_the_listening_connection_killed_while_idle(
        self, pg_database: Database, start_sidecar, rules_dir: Path
    ):
        """Attack: `pg_terminate_backend` of the source's one connection, idle in LISTEN,
        and a change made at once: the source connects again, resyncs (the change is
        live), listens on its new connection alone, and a later change is live by NOTIFY."""
        pg_database.init().import_docs(fraud_doc())
        app = await start_sidecar(
            rules_dir, database_url=pg_database.url, monitor=True, interval_seconds=3600
        )
        first = await self.listening(app, pg_database.name)
        assert pg_admin("SELECT pg_terminate_backend(%s)", (first,)) == [(True,)]
        set_points(pg_database, 45)
        await eventually(points_are(app, 75), message="resync after reconnecting")
        newest = (await history(app))[0]  # by listening again: nothing else reads meanwhile
        assert (newest["status"], newest["trigger"]) == ("success", "watch")
        (second,) = await eventually(lambda: listeners(pg_database.name), message="relistening")
        assert second != first
        await eventually(lambda: pg_backends(pg_database.name) == [second], message="one again")
        set_points(pg_database, 50)
        await eventually(points_are(app, 80), timeout=NOTIFY_SECONDS, message="NOTIFY again")
        await eventually(healthy(app), message="healthy, no watch problem")
        assert pg_backends(pg_database.name) == [second]


class TestSeveralSources:
    """A rules directory and a database together make one snapshot; ids stay unique."""

    @pytest.fixture
    def extra_rules(self, tmp_path: Path) -> Path:
        """A rules directory with `extra.yaml`: ruleset `extra`, rule `extra-big`."""
        directory = tmp_path / "files"
        directory.mkdir()
        (directory / "extra.yaml").write_text(
            dump_yaml(make_ruleset_doc("extra")), encoding="utf-8"
        )
        return directory

    async def test_files_and_database_are_merged(
        self, seeded: Database, start_sidecar, extra_rules: Path
    ):
        """Rulesets from both sources are served and evaluated; each rule knows its source."""
        app = await start_sidecar(extra_rules, database_url=seeded.url, monitor=True)
        rulesets = await app.get("/api/v1/rulesets")
        assert {r["id"] for r in rulesets["rulesets"]} == {"fraud", "extra"}
        assert await total_points(app) == 70
        assert (await app.evaluate("extra", {"amount": 500}))["total_points"] == 10
        database_rule = await app.get("/api/v1/rules/large-amount")
        assert database_rule["source"]["file"].endswith("#rulesets/fraud.json")
        file_rule = await app.get("/api/v1/rules/extra-big")
        assert file_rule["source"]["file"] == str(extra_rules / "extra.yaml")
        status = await app.get(f"{HOT}/status")
        assert [s["files"] for s in status["sources"]] == [1, 1]

    @pytest.mark.parametrize("duplicate", ["ruleset", "rule"])
    async def test_duplicate_id_across_sources_is_refused(
        self, seeded: Database, start_sidecar, extra_rules: Path, duplicate: str
    ):
        """The same ruleset or rule id in a file and in the database: refused, both named."""
        app = await start_sidecar(
            extra_rules, database_url=seeded.url, monitor=True, interval_seconds=0.2
        )
        ws = await app.client.ws_connect("/ws/hot-reload")
        await receive_event(ws)
        version, revision = app.version, app.state.registry.current.revision
        if duplicate == "ruleset":
            seeded.script(
                [
                    ("INSERT INTO rule_sidecar_rulesets (id) VALUES ('extra')", ()),
                    (
                        "INSERT INTO rule_sidecar_rules (id, ruleset_id, condition, points)"
                        " VALUES ('db-extra', 'extra', 'true', 1)",
                        (),
                    ),
                ]
            )
        else:
            seeded.execute(
                "INSERT INTO rule_sidecar_rules (id, ruleset_id, position, condition, points)"
                " VALUES ('extra-big', 'fraud', 9, 'true', 1)"
            )

        failed, _ = await receive_until(ws, "reload_failed")
        errors = failed["data"]["errors"]
        named = [e["file"] + " " + e["message"] for e in errors if "also" in e["message"]]
        assert named, errors
        database_place = (
            "#rulesets/extra.json" if duplicate == "ruleset" else "#rulesets/fraud.json"
        )
        assert any(
            str(extra_rules / "extra.yaml") in text and database_place in text for text in named
        ), named
        assert f"{duplicate} id 'extra" in named[0]
        assert (app.version, app.state.registry.current.revision) == (version, revision)
        assert "db-extra" not in app.state.registry.current.rules
        assert (await app.evaluate("extra", {"amount": 500}))["total_points"] == 10
        code, health = await app.health()
        assert (code, health["status"]) == (200, "degraded")
        await ws.close()


def points_read(source: DatabaseSource, rule_id: str = "large-amount") -> int:
    """The points of `rule_id` in what `source.read()` hands over now."""
    for file in source.read():
        for rule in json.loads(file.content)["spec"]["rules"]:
            if rule["id"] == rule_id:
                return int(rule["points"])
    raise AssertionError(f"{rule_id} not read")


def refusal(source: DatabaseSource) -> Problem:
    """The one problem `source.read()` raises (fails if it raises none, or another error)."""
    with pytest.raises(LoadError) as caught:
        source.read()
    (problem,) = caught.value.problems
    return problem


FRAUD_AGAIN = [
    ("DELETE FROM rule_sidecar_rulesets WHERE id = 'fraud'", ()),
    ("INSERT INTO rule_sidecar_rulesets (id) VALUES ('fraud')", ()),
    (
        "INSERT INTO rule_sidecar_rules (id, ruleset_id, position, condition, points) VALUES"
        " ('large-amount', 'fraud', 0, 'input.amount > 1000', 45),"
        " ('foreign-country', 'fraud', 1, 'input.country != \"US\"', 30),"
        " ('never-on', 'fraud', 2, 'false', 1)",
        (),
    ),
]


class TestEveryChangeSeen:
    """A change that repeats a version number, or goes behind every trigger, is read."""

    def test_a_ruleset_deleted_and_inserted_again_in_one_transaction(self, seeded: Database):
        """Deleted and inserted again with its three rules in one transaction: its
        row_version comes out as it was (1, and one per rule), yet the change is read."""
        source = DatabaseSource(seeded.url)
        assert points_read(source) == 40
        select = "SELECT row_version FROM rule_sidecar_rulesets WHERE id = 'fraud'"
        before = seeded.execute(select)
        seeded.script(FRAUD_AGAIN)
        assert seeded.execute(select) == before  # the number the reader used to trust
        assert points_read(source) == 45

    def test_a_writer_that_moves_row_version_itself(self, seeded: Database):
        """Optimistic locking (`SET ..., row_version = row_version + 1`): SQLite's
        triggers skipped the ruleset then, and the change was never read."""
        source = DatabaseSource(seeded.url)
        assert points_read(source) == 40
        seeded.execute(
            "UPDATE rule_sidecar_rules SET points = 45, row_version = row_version + 1"
            " WHERE id = 'large-amount'"
        )
        assert points_read(source) == 45
        seeded.execute(
            "UPDATE rule_sidecar_rulesets SET description = 'X', row_version = row_version + 1"
        )
        document = json.loads(source.read()[0].content)
        assert document["metadata"]["description"] == "X"

    def test_a_rule_moved_to_another_ruleset_is_read_from_both(self, seeded: Database):
        """`UPDATE rule_sidecar_rules SET ruleset_id = ...` alone: SQLite touched only the
        ruleset the rule went to, so the one it left kept it too, and every reload failed
        with a duplicate id the database does not hold (found by an outside attack)."""
        seeded.import_docs(make_ruleset_doc("extra"))
        source, loader = DatabaseSource(seeded.url), Loader()
        loader.load(source.read())
        seeded.execute(
            "UPDATE rule_sidecar_rules SET ruleset_id = 'extra' WHERE id = 'large-amount'"
        )
        snapshot = loader.load(source.read()).snapshot
        assert snapshot.rules["large-amount"].ruleset_id == "extra"
        assert "large-amount" not in {rule.id for rule in snapshot.rulesets["fraud"].rules}

    def test_a_rule_without_its_ruleset_is_reported_not_dropped(self, seeded: Database):
        """A rule written with SQLite's foreign keys off (they are per connection) whose
        ruleset does not exist was left out silently: now the read fails naming it, until
        it is removed."""
        source = DatabaseSource(seeded.url)
        source.read()
        if seeded.kind == "sqlite":
            connection = sqlite3.connect(seeded.name)  # foreign keys off: SQLite's default
            with connection:
                connection.execute(
                    "INSERT INTO rule_sidecar_rules (id, ruleset_id, name, condition, points)"
                    " VALUES ('stray', 'gone', 'Stray', 'true', 1)"
                )
            connection.close()
        else:
            seeded.script(
                [
                    ("SET LOCAL session_replication_role = replica", ()),
                    (
                        "INSERT INTO rule_sidecar_rules (id, ruleset_id, name, condition, points)"
                        " VALUES ('stray', 'gone', 'Stray', 'true', 1)",
                        (),
                    ),
                ]
            )
            source.forget()  # behind the triggers: what the verification does
        with pytest.raises(LoadError) as failed:
            source.read()
        (problem,) = failed.value.problems
        assert problem.rule_id == "stray"
        assert "'gone', which does not exist" in problem.message
        seeded.execute("DELETE FROM rule_sidecar_rules WHERE id = 'stray'")
        source.forget()
        assert points_read(source) == 40

    def test_a_change_id_written_back_by_the_writer_is_not_trusted(self, seeded: Database):
        """A tool that copies rows back with their old change_id (a restore, a sync job)
        still gets a new one: the reader's marker is never the writer's to set."""
        source = DatabaseSource(seeded.url)
        source.read()
        (stamp,) = seeded.execute("SELECT change_id FROM rule_sidecar_rulesets")[0]
        seeded.script(
            [
                *FRAUD_AGAIN[:2],
                ("UPDATE rule_sidecar_rulesets SET change_id = %s", (stamp,)),
                *FRAUD_AGAIN[2:],
                ("UPDATE rule_sidecar_rulesets SET change_id = %s", (stamp,)),
            ]
        )
        assert seeded.execute("SELECT change_id FROM rule_sidecar_rulesets")[0] != (stamp,)
        assert points_read(source) == 45

    def test_forget_then_read_reads_every_row_behind_the_triggers(self, seeded: Database):
        """A change behind every trigger (disabled, or dropped and put back) moves no
        number: an ordinary read cannot see it, a read after `forget()` must."""
        source = DatabaseSource(seeded.url)
        assert points_read(source) == 40
        seeded.change_unseen("UPDATE rule_sidecar_rules SET points = 45 WHERE id = 'large-amount'")
        assert points_read(source) == 40  # the fingerprint cannot know
        source.forget()
        assert points_read(source) == 45

    def test_a_dropped_or_disabled_trigger_is_a_watch_problem(self, seeded: Database):
        """Without its triggers nothing moves the numbers: a full read (the first, and
        each after `forget()`) checks them, and health reports any missing or disabled
        (a watch problem: degraded) until `db init` puts them back."""
        source = DatabaseSource(seeded.url)
        source.read()
        assert source.watch_problem() is None
        if seeded.is_postgresql:
            seeded.script(
                [
                    ("DROP TRIGGER rule_sidecar_rulesets_stamp ON rule_sidecar_rulesets", ()),
                    (
                        "ALTER TABLE rule_sidecar_rules DISABLE TRIGGER rule_sidecar_rules_ruleset",
                        (),
                    ),
                ]
            )
            gone = "rule_sidecar_rules_ruleset, rule_sidecar_rulesets_stamp"
        else:
            seeded.execute("DROP TRIGGER rule_sidecar_rulesets_update")
            gone = "rule_sidecar_rulesets_update"
        source.forget()
        source.read()
        assert source.watch_problem() == (
            f"triggers missing or disabled ({gone}): changes may go unseen until a forced"
            " reload; `rule-sidecar db init` puts them back"
        )
        seeded.init()
        source.forget()
        source.read()
        assert source.watch_problem() is None

    def test_replication_role_replica_is_seen_after_forget(self, pg_database: Database):
        """PostgreSQL: `SET LOCAL session_replication_role = replica` (logical replication
        applying, `pg_restore --disable-triggers`) runs no trigger at all."""
        pg_database.init().import_docs(fraud_doc())
        source = DatabaseSource(pg_database.url)
        assert points_read(source) == 40
        generation = pg_database.generation()
        pg_database.script(
            [("SET LOCAL session_replication_role = replica", ()), (LARGE_AMOUNT_TO_45, ())]
        )
        assert pg_database.generation() == generation
        assert points_read(source) == 40
        source.forget()
        assert points_read(source) == 45


def made_by_schema_1(database: Database) -> None:
    """The tables and rows the schema-1 sidecar made (a dump of its `db init` + import)."""
    dump = (FIXTURES / f"schema-1.{database.kind}.sql").read_text(encoding="utf-8")
    if database.is_postgresql:
        with psycopg.connect(database.url, autocommit=True) as connection:
            connection.execute(dump.encode())
    else:
        connection = sqlite3.connect(database.name)
        connection.executescript(dump)
        connection.close()


class TestSchemaUpgrade:
    """`db init` upgrades a database made by the schema-1 sidecar, keeping its rows."""

    def test_schema_1_database_is_upgraded_and_then_reads_every_change(self, database: Database):
        made_by_schema_1(database)
        assert database.execute("SELECT version FROM rule_sidecar_schema") == [(1,)]
        with pytest.raises(LoadError) as caught:
            DatabaseSource(database.url).read()
        assert "upgrade the tables with `rule-sidecar db init`" in str(caught.value)

        database.init()
        assert database.execute("SELECT version FROM rule_sidecar_schema") == [(SCHEMA_VERSION,)]
        source = DatabaseSource(database.url)
        assert points_read(source) == 40
        database.script(FRAUD_AGAIN)
        assert points_read(source) == 45
        database.init()  # idempotent on the upgraded schema
        assert points_read(source) == 45

    def test_import_into_a_schema_1_database_is_refused_until_db_init(
        self, database: Database, tmp_path: Path
    ):
        """The attack: `db import` said OK into schema-1 tables without upgrading them,
        and the sidecar then refused the database."""
        made_by_schema_1(database)
        rows = database.execute("SELECT id, points FROM rule_sidecar_rules ORDER BY id")
        path = tmp_path / "fraud.yaml"
        path.write_text(dump_yaml(fraud_doc(45)), encoding="utf-8")
        with pytest.raises(LoadError, match=r"schema version 1.*db init"):
            dbtools.import_files([path], database.url)
        assert database.execute("SELECT id, points FROM rule_sidecar_rules ORDER BY id") == rows
        database.init()
        dbtools.import_files([path], database.url)
        assert points_read(DatabaseSource(database.url)) == 45

    @pytest.mark.parametrize(
        ("versions", "advice"),
        [((SCHEMA_VERSION + 1,), "upgrade rule-sidecar"), ((SCHEMA_VERSION, 9), "upgrade rule")],
        ids=["newer", "a second, newer row"],
    )
    def test_import_into_newer_tables_says_to_upgrade_the_sidecar(
        self, database: Database, tmp_path: Path, versions: tuple[int, ...], advice: str
    ):
        """The attack: newer tables were told to run `db init`, which refuses them; a
        second row in the version table was not read at all, and the import said OK."""
        database.init()
        database.execute("DELETE FROM rule_sidecar_schema")
        for version in versions:
            database.execute(f"INSERT INTO rule_sidecar_schema (version) VALUES ({version})")
        path = tmp_path / "fraud.yaml"
        path.write_text(dump_yaml(fraud_doc()), encoding="utf-8")
        with pytest.raises(LoadError, match=advice):
            dbtools.import_files([path], database.url)
        assert database.execute("SELECT count(*) FROM rule_sidecar_rules") == [(0,)]


class TestSqliteFileSwapped:
    """The open connection keeps the file it opened: a path given another file is seen."""

    def test_a_file_replaced_by_mv_is_read_in_full(self, sqlite_database: Database):
        """The new file has the very same generation (a copy, changed behind the
        triggers): only noticing that the path names another file can tell."""
        sqlite_database.init().import_docs(fraud_doc())
        source = DatabaseSource(sqlite_database.url)
        assert points_read(source) == 40
        path = Path(sqlite_database.name)
        copy = Database("sqlite", "", str(path.with_name("new.db")), path.parent)
        shutil.copyfile(path, copy.name)
        copy.change_unseen("UPDATE rule_sidecar_rules SET points = 45 WHERE id = 'large-amount'")
        assert copy.generation() == sqlite_database.generation()
        os.replace(copy.name, path)
        assert points_read(source) == 45

    def test_a_deleted_file_fails_the_read_naming_it(self, sqlite_database: Database):
        sqlite_database.init().import_docs(fraud_doc())
        source = DatabaseSource(sqlite_database.url)
        source.read()
        os.unlink(sqlite_database.name)
        problem = refusal(source)
        assert problem.file == source.name
        assert problem.message == (
            f"database unavailable: the SQLite file {sqlite_database.name} does not exist"
            " (deleted or moved away)"
        )


class TestFaultsReported:
    """A value no document can hold is a `LoadError` naming its ruleset, column and why."""

    @pytest.mark.parametrize("table", ["rule", "ruleset"])
    def test_a_blob_in_a_text_column(self, sqlite_database: Database, table: str):
        """Any tool binding Python `bytes` writes a BLOB; json.dumps raised TypeError
        from inside the read, and every reload crashed."""
        sqlite_database.init().import_docs(fraud_doc())
        source = DatabaseSource(sqlite_database.url)
        source.read()
        if table == "rule":
            sqlite_database.execute(
                "UPDATE rule_sidecar_rules SET description = %s WHERE id = 'large-amount'",
                (b"\x00\xffbinary",),
            )
        else:
            sqlite_database.execute(
                "UPDATE rule_sidecar_rulesets SET description = %s", (b"\x00\xffbinary",)
            )
        problem = refusal(source)
        assert problem.file == f"{source.name}#rulesets/fraud.json"
        assert problem.ruleset_id == "fraud"
        if table == "rule":
            assert (problem.rule_id, problem.path) == (
                "large-amount",
                "$.spec.rules[0].description",
            )
            assert problem.message == (
                "the description column of rule 'large-amount' holds a BLOB of 8 bytes"
                " where text is expected"
            )
        else:
            assert problem.path == "$.metadata.description"
            assert "ruleset 'fraud' holds a BLOB of 8 bytes" in problem.message

    def test_text_that_is_not_utf8(self, sqlite_database: Database):
        """SQLite text holding other bytes (a C client): the driver failed the whole
        query, "database unavailable", naming no rule; now the rule and column are named.
        A ruleset id that is such text is named by its row."""
        sqlite_database.init().import_docs(fraud_doc(), make_ruleset_doc("extra"))
        source = DatabaseSource(sqlite_database.url)
        source.read()
        sqlite_database.execute(
            "UPDATE rule_sidecar_rules SET condition = CAST(X'ff3e31' AS TEXT)"
            " WHERE id = 'large-amount'"
        )
        problem = refusal(source)
        assert (problem.ruleset_id, problem.rule_id, problem.path) == (
            "fraud",
            "large-amount",
            "$.spec.rules[0].condition",
        )
        assert problem.message == (
            "the condition column of rule 'large-amount' holds 3 bytes of text that is not UTF-8"
        )
        sqlite_database.execute(
            "UPDATE rule_sidecar_rules SET condition = 'true' WHERE id = 'large-amount'"
        )
        assert len(source.read()) == 2
        sqlite_database.execute(
            "INSERT INTO rule_sidecar_rulesets (id) VALUES (CAST(X'ff41' AS TEXT))"
        )
        problem = refusal(source)
        assert problem.file == source.name
        assert problem.message.endswith(
            "has no usable id: its id is text that is not UTF-8 of 2 bytes"
            " (an id is text of at most 63 characters)"
        )

    def test_the_generation_row_deleted(self, seeded: Database):
        """No `TypeError: 'NoneType' object is not subscriptable`: the cause, in words."""
        source = DatabaseSource(seeded.url)
        seeded.execute("DELETE FROM rule_sidecar_state")
        problem = refusal(source)
        assert problem.message == (
            "database unavailable: the table rule_sidecar_state has lost its row (id 1, the"
            " generation): `rule-sidecar db init` puts it back"
        )
        seeded.init()
        assert points_read(source) == 40

    def test_json_nested_too_deep_is_located(self, sqlite_database: Database):
        """100,000 nested lists in a JSON column: located at its rule, not "database
        unavailable: RecursionError"."""
        sqlite_database.init().import_docs(fraud_doc())
        deep = "[" * 100_000 + "]" * 100_000
        sqlite_database.execute(
            "UPDATE rule_sidecar_rules SET tags = %s WHERE id = 'large-amount'", (deep,)
        )
        problem = refusal(DatabaseSource(sqlite_database.url))
        assert (problem.ruleset_id, problem.rule_id, problem.path) == (
            "fraud",
            "large-amount",
            "$.spec.rules[0].tags",
        )
        assert "nests JSON deeper than can be read" in problem.message

    def test_a_message_quotes_a_bounded_excerpt_of_the_value(self, sqlite_database: Database):
        """3 MB of text in a JSON column: the message shows its start and its size, not
        3 MB (which went to every WebSocket client and into history)."""
        sqlite_database.init().import_docs(fraud_doc())
        sqlite_database.execute(
            "UPDATE rule_sidecar_rules SET tags = %s WHERE id = 'large-amount'", ("x" * 3_000_000,)
        )
        problems = read_problems(DatabaseSource(sqlite_database.url))
        assert [(p.ruleset_id, p.rule_id) for p in problems] == [("fraud", "large-amount")]
        message = problems[0].message
        assert len(message) < 500, len(message)
        assert "3,000,000 characters" in message

    async def test_a_blob_fails_the_reload_instead_of_crashing_it(
        self, sqlite_database: Database, start_sidecar, rules_dir: Path
    ):
        """In the sidecar: a failed reload (422) naming the rule, recorded in history; the
        last good rules serve."""
        sqlite_database.init().import_docs(fraud_doc())
        app = await start_sidecar(rules_dir, database_url=sqlite_database.url)
        sqlite_database.execute(
            "UPDATE rule_sidecar_rules SET name = %s WHERE id = 'large-amount'", (b"x",)
        )
        record = await app.post(f"{HOT}/reload", status=422)
        (error,) = record["errors"]
        assert (error["ruleset_id"], error["rule_id"]) == ("fraud", "large-amount")
        assert "BLOB" in error["message"]
        assert (await history(app))[0]["status"] == "failed"
        assert await total_points(app) == 70


class TestSizes:
    """A ruleset larger than a rule file may be is refused before it is fetched."""

    @pytest.mark.parametrize("where", ["ruleset", "rule"])
    def test_a_row_over_the_limit_is_refused_by_its_size(self, seeded: Database, where: str):
        source = DatabaseSource(seeded.url, max_bytes=100_000)
        assert points_read(source) == 40
        table = "rule_sidecar_rulesets" if where == "ruleset" else "rule_sidecar_rules"
        seeded.execute(f"UPDATE {table} SET description = %s", ("d" * 200_000,))
        problem = refusal(source)
        assert (problem.file, problem.ruleset_id, problem.code) == (
            f"{source.name}#rulesets/fraud.json",
            "fraud",
            "read.too_large",
        )
        assert "more than the 100,000 bytes a rule file may hold: not read" in problem.message
        assert len(problem.message) < 300
        assert refusal(source) == problem  # still refused while nothing changed
        seeded.execute(f"UPDATE {table} SET description = ''")
        assert points_read(source) == 40

    def test_rows_each_within_the_limit_but_over_it_together(self, seeded: Database):
        """Three rules of 2,000 bytes each, the limit 5,000: refused by their sum; the
        other ruleset is not."""
        seeded.import_docs(make_ruleset_doc("extra"))
        source = DatabaseSource(seeded.url, max_bytes=5_000)
        assert len(source.read()) == 2
        seeded.execute(
            "UPDATE rule_sidecar_rules SET description = %s WHERE ruleset_id = 'fraud'",
            ("d" * 2_000,),
        )
        problem = refusal(source)
        assert problem.ruleset_id == "fraud"
        assert "its rules 6," in problem.message

    def test_the_default_limit_is_the_rule_file_limit(self, sqlite_database: Database):
        """5 MiB of description: over the 4 MiB a rule file may hold."""
        sqlite_database.init().import_docs(fraud_doc())
        sqlite_database.execute(
            "UPDATE rule_sidecar_rulesets SET description = %s", ("d" * (5 << 20),)
        )
        problem = refusal(DatabaseSource(sqlite_database.url))
        assert f"more than the {DEFAULT_FILE_LIMITS.max_bytes:,} bytes" in problem.message

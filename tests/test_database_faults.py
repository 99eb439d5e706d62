"""A database that stops answering never holds a reload, a watch or the sidecar.

The server is the real PostgreSQL, reached through a real TCP proxy that can be frozen
(connections stay open, no byte moves either way, the kernel keeps acknowledging: what
a `kill -STOP`ped proxy or a hung host looks like), or a port that accepts and never
answers; SQLite is a real file locked by another process. Every wait is guarded: on code
without client-side deadlines these tests fail at their guard instead of hanging.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import pytest
from conftest import fraud_doc
from db_support import (
    Database,
    FreezableProxy,
    StandbyPair,
    black_hole,
    pg_url_for,
)
from server_support import (
    HOT,
    Served,
    Sidecar,
    clean_environment,
    eventually,
    receive_event,
    receive_until,
    spawn,
)

from sidecar.config import SettingsError, settings_from
from sidecar.errors import LoadError
from sidecar.sources.database import (
    DatabaseSource,
    DatabaseTimeouts,
    in_recovery,
)

# Starts processes, browsers or databases: left out of the quick loop (-m 'not slow').
pytestmark = pytest.mark.slow

FOREIGN_LARGE = {"amount": 5000, "country": "FR"}  # fraud: large-amount 40 + foreign 30
LARGE_AMOUNT_TO_45 = "UPDATE rule_sidecar_rules SET points = 45 WHERE id = 'large-amount'"
# Short deadlines, so that the tests are quick; the guards are far longer.
TIMEOUTS = DatabaseTimeouts(connect=2, statement=10.0, read=1.0)
SETTINGS = {
    "database_connect_timeout_seconds": TIMEOUTS.connect,
    "database_read_timeout_seconds": TIMEOUTS.read,
}
GUARD_SECONDS = 30.0  # "it must not hang": no deadline here is anywhere near it

_T = TypeVar("_T")


def guarded(call: Callable[[], _T]) -> _T:
    """`call()` in a thread; fails (instead of hanging the run) past the guard."""
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        return pool.submit(call).result(timeout=GUARD_SECONDS)
    except concurrent.futures.TimeoutError:
        raise AssertionError(f"still waiting after {GUARD_SECONDS} s: it hangs") from None
    finally:
        pool.shutdown(wait=False)


def read_error(source: DatabaseSource) -> str:
    """The message of the `LoadError` a read raises (fails if the read succeeds)."""

    def read() -> str:
        try:
            source.read()
        except LoadError as exc:
            (problem,) = exc.problems
            assert problem.file == source.name
            return problem.message
        raise AssertionError("the read succeeded")

    return guarded(read)


@pytest.fixture
def seeded_pg(pg_database: Database) -> Database:
    """A migrated PostgreSQL database holding the `fraud` ruleset (large-amount 40)."""
    pg_database.init().import_docs(fraud_doc())
    return pg_database


async def total_points(app: Sidecar) -> int:
    points: int = (await app.evaluate("fraud", FOREIGN_LARGE))["total_points"]
    return points


def points_are(app: Sidecar, expected: int) -> Callable[[], Any]:
    async def check() -> bool:
        return await total_points(app) == expected

    return check


def healthy(app: Sidecar) -> Callable[[], Any]:
    async def check() -> bool:
        code, body = await app.health()
        return code == 200 and body["status"] == "healthy" and body["watch_problems"] == {}

    return check


def watch_problem_with(app: Sidecar, text: str) -> Callable[[], Any]:
    """The watch problem health reports for the database source, once it contains text."""

    async def check() -> str | None:
        _, body = await app.health()
        problem: str | None = body["watch_problems"].get(app.service.sources[-1].name)
        return problem if problem is not None and text in problem else None

    return check


class TestRead:
    """`DatabaseSource.read()` against a server that does not answer."""

    def test_a_frozen_server_fails_the_read_at_the_read_timeout(
        self, seeded_pg: Database, pg_proxy: FreezableProxy
    ):
        """The connection is kept between reads; the server falls silent under it: the
        read gives up with a `LoadError` naming the database and where it waited."""
        source = DatabaseSource(pg_proxy.url(seeded_pg.name), timeouts=TIMEOUTS)
        assert len(guarded(source.read)) == 1
        seeded_pg.execute(LARGE_AMOUNT_TO_45)  # a full read is needed, not just the generation
        pg_proxy.freeze()
        message = read_error(source)
        assert message == (
            f"database unavailable: no answer from 127.0.0.1:{pg_proxy.port} within 1 s"
            " while reading"
        )
        assert seeded_pg.name in source.name
        # Still frozen: a new connection cannot log in either.
        assert read_error(source).endswith(
            f"no answer from 127.0.0.1:{pg_proxy.port} within 2 s while connecting"
        )
        pg_proxy.thaw()
        (file,) = guarded(source.read)
        assert json.loads(file.content)["spec"]["rules"][0]["points"] == 45

    def test_a_server_that_accepts_and_never_answers(self, seeded_pg: Database):
        """Connecting to a port that accepts and never answers gives up at the connect
        timeout, saying so."""
        with black_hole() as port:
            source = DatabaseSource(pg_url_for(seeded_pg.name, port=port), timeouts=TIMEOUTS)
            assert read_error(source) == (
                f"database unavailable: no answer from 127.0.0.1:{port} within 2 s while connecting"
            )

    def test_a_password_file_that_is_a_fifo(self, seeded_pg: Database, tmp_path: Path):
        """Opening a FIFO waits for a writer forever: the password file must be a regular
        file, and anything else fails the read with the reason."""
        fifo = tmp_path / "password"
        os.mkfifo(fifo)
        source = DatabaseSource(seeded_pg.url, password_file=fifo, timeouts=TIMEOUTS)
        assert read_error(source) == (
            f"database unavailable: OSError: the password file {fifo} is not a regular file"
        )

    def test_a_sqlite_file_locked_by_another_process(self, sqlite_database: Database):
        """Another process holds an exclusive lock: the read waits no longer than the
        statement timeout, then fails naming the file; once the lock goes, it reads."""
        sqlite_database.init().import_docs(fraud_doc())
        locker = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sqlite3, sys\n"
                f"c = sqlite3.connect({sqlite_database.name!r}, isolation_level=None)\n"
                "c.execute('BEGIN EXCLUSIVE')\n"
                "print('locked', flush=True)\n"
                "sys.stdin.read()\n",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        try:
            assert locker.stdout is not None
            assert locker.stdout.readline() == b"locked\n"
            source = DatabaseSource(
                sqlite_database.url, timeouts=DatabaseTimeouts(connect=2, statement=0.5, read=1)
            )
            assert (
                read_error(source) == "database unavailable: OperationalError: database is locked"
            )
        finally:
            assert locker.stdin is not None
            locker.stdin.close()
            locker.wait(GUARD_SECONDS)
        assert len(guarded(source.read)) == 1

    def test_a_sqlite_read_that_does_not_finish_is_interrupted(self, sqlite_database: Database):
        """SQLite has no server to time a statement out: a read that runs on (here a view
        counting to 200 million in place of the generation table, about a minute) is
        interrupted at the read timeout."""
        sqlite_database.init().import_docs(fraud_doc())
        sqlite_database.script(
            [
                ("DROP TABLE rule_sidecar_state", ()),
                (
                    "CREATE VIEW rule_sidecar_state AS WITH RECURSIVE n(x) AS"
                    " (SELECT 1 UNION ALL SELECT x + 1 FROM n LIMIT 200000000)"
                    " SELECT max(x) AS generation FROM n",
                    (),
                ),
            ]
        )
        source = DatabaseSource(sqlite_database.url, timeouts=TIMEOUTS)
        assert read_error(source) == (
            f"database unavailable: no answer from {sqlite_database.name} within 1 s while reading"
        )


async def failure_naming(ws: Any, text: str) -> dict[str, Any]:
    """The next `reload_failed` event whose first problem's message contains `text`."""
    deadline = time.monotonic() + GUARD_SECONDS
    while True:
        failed, _ = await receive_until(ws, "reload_failed", deadline - time.monotonic())
        if text in failed["data"]["errors"][0]["message"]:
            return failed


class TestInTheSidecar:
    """A sidecar whose database stops answering keeps serving, says so, and recovers."""

    async def test_a_frozen_server_fails_reloads_and_the_sidecar_recovers_alone(
        self, seeded_pg: Database, start_sidecar, rules_dir: Path, pg_proxy: FreezableProxy
    ):
        """Frozen: each reload fails at the deadline, naming the database; the last good
        rules keep answering; health is degraded with the listener's problem; `/livez`
        answers. Thawed: the change made meanwhile goes live without being asked."""
        app = await start_sidecar(
            rules_dir,
            database_url=pg_proxy.url(seeded_pg.name),
            monitor=True,
            interval_seconds=0.3,
            **SETTINGS,
        )
        ws = await app.client.ws_connect("/ws/hot-reload")
        await receive_event(ws)
        version = app.version
        no_answer = f"no answer from 127.0.0.1:{pg_proxy.port} within"

        pg_proxy.freeze()
        seeded_pg.execute(LARGE_AMOUNT_TO_45)
        failed = await failure_naming(ws, no_answer)
        (error,) = failed["data"]["errors"]
        assert error["file"] == app.service.sources[-1].name
        assert seeded_pg.name in error["file"]
        assert error["message"].startswith("database unavailable: ")
        assert (await total_points(app), app.version) == (70, version)
        problem = await eventually(
            watch_problem_with(app, no_answer), timeout=GUARD_SECONDS, message="watch problem"
        )
        assert problem.startswith("not listening: ")
        code, health = await app.health()
        assert (code, health["status"]) == (200, "degraded")
        assert not health["checks"]["last_reload_successful"]
        response, _ = await app.call("GET", "/livez")
        assert response.status == 200
        assert (await app.get(f"{HOT}/history"))["history"][0]["status"] == "failed"

        pg_proxy.thaw()
        await eventually(points_are(app, 75), timeout=GUARD_SECONDS, message="the new rules")
        await eventually(healthy(app), timeout=GUARD_SECONDS, message="healthy again")
        await ws.close()

    async def test_a_frozen_listener_is_noticed_without_any_reload(
        self, seeded_pg: Database, start_sidecar, rules_dir: Path, pg_proxy: FreezableProxy
    ):
        """No resync runs (1 h): only the listener can notice that the server went
        silent, by its heartbeat. The change whose NOTIFY was held is read after the
        reconnect."""
        app = await start_sidecar(
            rules_dir,
            database_url=pg_proxy.url(seeded_pg.name),
            monitor=True,
            interval_seconds=3600,
            **SETTINGS,
        )
        await eventually(healthy(app), message="listening")
        pg_proxy.freeze()
        seeded_pg.execute(LARGE_AMOUNT_TO_45)
        no_answer = f"no answer from 127.0.0.1:{pg_proxy.port} within"
        problem = await eventually(
            watch_problem_with(app, no_answer), timeout=GUARD_SECONDS, message="watch problem"
        )
        assert problem.startswith("not listening: ")
        code, health = await app.health()
        assert (code, health["status"]) == (200, "degraded")
        assert await total_points(app) == 70

        pg_proxy.thaw()
        await eventually(points_are(app, 75), timeout=GUARD_SECONDS, message="resync on relisten")
        await eventually(healthy(app), timeout=GUARD_SECONDS, message="healthy again")

    async def test_startup_against_a_server_that_never_answers(
        self, pg_database: Database, start_sidecar, rules_dir: Path
    ):
        """The first load fails with the reason (no rules, unhealthy) instead of hanging."""
        with black_hole() as port:
            app = await asyncio.wait_for(
                start_sidecar(
                    rules_dir, database_url=pg_url_for(pg_database.name, port=port), **SETTINGS
                ),
                GUARD_SECONDS,
            )
            code, health = await app.health()
            assert (code, health["status"]) == (503, "unhealthy")
            status = await app.get(f"{HOT}/status")
            (error,) = status["sources"][-1]["errors"]
            assert error["message"] == (
                f"database unavailable: no answer from 127.0.0.1:{port} within 2 s while connecting"
            )


class TestHotStandby:
    """A real hot standby (streaming replication from a primary built for the test)
    refuses LISTEN ("cannot execute LISTEN during recovery"): the source polls it."""

    async def test_a_standby_is_polled_and_not_degraded(
        self, pg_standby: StandbyPair, start_sidecar, rules_dir: Path, tmp_path: Path, caplog
    ):
        """Noticed and said once in the log; health stays healthy with no watch problem
        (it was degraded forever); a change on the primary is served from the standby
        by the periodic resync."""
        caplog.set_level(logging.WARNING, logger="sidecar.database")
        name = pg_standby.create_database()
        primary = Database("postgresql", pg_standby.url(name), name, tmp_path)
        primary.init().import_docs(fraud_doc())
        pg_standby.wait_replayed()
        standby_url = pg_standby.url(name, standby=True)
        with psycopg.connect(standby_url) as connection:
            assert in_recovery(connection)
        with psycopg.connect(primary.url) as connection:
            assert not in_recovery(connection)

        app = await start_sidecar(
            rules_dir, database_url=standby_url, monitor=True, interval_seconds=0.2
        )

        def said() -> list[str]:
            return [r.getMessage() for r in caplog.records if "hot standby" in r.getMessage()]

        (line,) = await eventually(said, message="the standby noticed")
        assert "periodic resync" in line
        code, health = await app.health()
        assert (code, health["status"], health["watch_problems"]) == (200, "healthy", {})
        primary.execute(LARGE_AMOUNT_TO_45)
        await eventually(points_are(app, 75), message="the change, polled from the standby")
        code, health = await app.health()
        assert (code, health["status"], health["watch_problems"]) == (200, "healthy", {})
        assert len(said()) == 1


def request(served: Served, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """One request to a `serve` process, guarded: (status, JSON body)."""
    data = None if body is None else json.dumps(body).encode()
    call = urllib.request.Request(
        served.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(call, timeout=GUARD_SECONDS) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


class TestServe:
    """`rule-sidecar serve`, configured by its environment, over a frozen server (that
    it recovers by itself is shown in-process above)."""

    def test_a_reload_against_a_frozen_server_fails_at_the_configured_timeout(
        self, seeded_pg: Database, rules_dir: Path, tmp_path: Path, pg_proxy: FreezableProxy
    ):
        env = clean_environment(
            RULE_SIDECAR_DATABASE_CONNECT_TIMEOUT_SECONDS="3",
            RULE_SIDECAR_DATABASE_READ_TIMEOUT_SECONDS="1.5",
            HOT_RELOAD_ENABLED="false",  # only the reloads asked for here: no race with a watch
        )
        served = spawn(
            tmp_path,
            "--rules-dir",
            str(rules_dir),
            "--database-url",
            pg_proxy.url(seeded_pg.name),
            env=env,
        )
        try:
            served.wait_ready()
            evaluate = "/api/v1/rulesets/fraud/evaluate"
            assert (
                request(served, "POST", evaluate, {"input": FOREIGN_LARGE})[1]["total_points"] == 70
            )

            pg_proxy.freeze()
            seeded_pg.execute(LARGE_AMOUNT_TO_45)
            code, record = request(served, "POST", f"{HOT}/reload")
            assert (code, record["status"]) == (422, "failed")
            (error,) = record["errors"]
            assert seeded_pg.name in error["file"]
            assert error["message"] == (
                f"database unavailable: no answer from 127.0.0.1:{pg_proxy.port} within 1.5 s"
                " while reading"
            )
            assert request(served, "GET", "/livez")[0] == 200
            assert (
                request(served, "POST", evaluate, {"input": FOREIGN_LARGE})[1]["total_points"] == 70
            )
            code, record = request(served, "POST", f"{HOT}/reload")
            assert record["errors"][0]["message"].endswith(
                f"no answer from 127.0.0.1:{pg_proxy.port} within 3 s while connecting"
            )

            pg_proxy.thaw()
            code, record = request(served, "POST", f"{HOT}/reload")
            assert (code, record["status"]) == (200, "success")
            assert request(served, "GET", "/health/hot-reload")[1]["status"] == "healthy"
            assert (
                request(served, "POST", evaluate, {"input": FOREIGN_LARGE})[1]["total_points"] == 75
            )
        finally:
            served.stop()


class TestSettings:
    """The timeouts are settings with environment variables, checked when parsed."""

    def test_environment_variables_reach_the_source(self):
        settings = settings_from(
            {
                "RULE_SIDECAR_DATABASE_CONNECT_TIMEOUT_SECONDS": "7",
                "RULE_SIDECAR_DATABASE_STATEMENT_TIMEOUT_SECONDS": "2.5",
                "RULE_SIDECAR_DATABASE_READ_TIMEOUT_SECONDS": "4",
            }
        )
        assert settings.database_timeouts == DatabaseTimeouts(connect=7, statement=2.5, read=4.0)
        assert settings_from({}).database_timeouts == DatabaseTimeouts()

    @pytest.mark.parametrize(
        ("variable", "value"),
        [
            ("RULE_SIDECAR_DATABASE_CONNECT_TIMEOUT_SECONDS", "1"),  # libpq's minimum is 2
            ("RULE_SIDECAR_DATABASE_CONNECT_TIMEOUT_SECONDS", "0"),  # libpq: wait forever
            ("RULE_SIDECAR_DATABASE_STATEMENT_TIMEOUT_SECONDS", "0"),
            ("RULE_SIDECAR_DATABASE_READ_TIMEOUT_SECONDS", "inf"),
            ("RULE_SIDECAR_DATABASE_READ_TIMEOUT_SECONDS", "-1"),
        ],
    )
    def test_no_timeout_can_be_turned_off(self, variable: str, value: str):
        with pytest.raises(SettingsError, match=variable):
            settings_from({variable: value})

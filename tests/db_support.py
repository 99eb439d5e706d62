"""Real databases for the database source tests: a fresh one for every test.

conftest.py loads it as a plugin, so its fixtures serve every test module. PostgreSQL is
the server on 127.0.0.1:5432 (trust authentication, user `postgres`): each test gets a
database of its own, `rs_t_<random hex>`, created from the `postgres` database and dropped
at teardown (after its connections are terminated). When the server cannot be reached,
the PostgreSQL tests are skipped with the reason: at collection when they use a PostgreSQL
fixture or run with the `postgresql` backend parameter, else by `require_postgresql()`;
CI starts the server, so there they run.
SQLite databases are real files in the test's `tmp_path`.

`FreezableProxy` puts a real TCP forwarder between a test and the server, to freeze it
(a proxy or host that stops answering without closing anything); `black_hole()` is a
port that accepts connections and never answers.

`pg_standby` builds a real primary and hot standby pair (initdb, pg_basebackup, streaming
replication) in a temporary directory, on two free ports, as the `postgres` user.

`Database` talks to a database with the plain drivers (never through the code under
test), so what a test sees in the tables is what is really there.
"""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
import shutil
import socket
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import dump_yaml

from sidecar import dbtools
from sidecar.testing import TcpProxy

__all__ = [
    "PG_ADMIN_URL",
    "Database",
    "FreezableProxy",
    "StandbyPair",
    "black_hole",
    "pg_admin",
    "pg_backends",
    "pg_listeners",
    "pg_terminate",
    "pg_unavailable_reason",
    "pg_url_for",
    "require_postgresql",
]

PG_HOST = "127.0.0.1"
PG_PORT = 5432
PG_ADMIN_URL = f"postgresql://postgres@{PG_HOST}:{PG_PORT}/postgres"
BACKENDS = ("sqlite", "postgresql")


@functools.cache
def pg_unavailable_reason() -> str | None:
    """None when the PostgreSQL server answers; otherwise why it does not."""
    try:
        with psycopg.connect(PG_ADMIN_URL, connect_timeout=3) as connection:
            connection.execute("SELECT 1")
    except psycopg.Error as exc:
        first_line = " ".join(str(exc).split())[:200]
        return (
            f"PostgreSQL is not reachable at {PG_HOST}:{PG_PORT} ({first_line}); "
            "CI starts it, so these tests run there"
        )
    return None


def require_postgresql() -> None:
    """Skip the calling test, with the reason, when PostgreSQL is not reachable."""
    reason = pg_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)


def pg_url_for(name: str, *, password: str | None = None, port: int = PG_PORT) -> str:
    """The URL of database `name` on the test server, optionally with a password in it."""
    user = f"postgres:{password}" if password else "postgres"
    return f"postgresql://{user}@{PG_HOST}:{port}/{name}"


def pg_admin(sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    """Run one statement on the `postgres` database, outside any transaction."""
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as connection:
        cursor = connection.execute(sql, params)
        return cursor.fetchall() if cursor.description else []


def pg_backends(name: str, *, keep: Sequence[int] = ()) -> list[int]:
    """Process ids of the server backends connected to database `name`, but `keep`."""
    rows = pg_admin(
        "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
        (name,),
    )
    return [pid for (pid,) in rows if pid not in keep]


def pg_listeners(name: str) -> list[int]:
    """Backends of database `name` that listen: their last statement is `LISTEN` (a
    source's one connection says it again after each read and as its heartbeat)."""
    rows = pg_admin(
        "SELECT pid FROM pg_stat_activity WHERE datname = %s AND query ILIKE 'LISTEN %%'",
        (name,),
    )
    return [pid for (pid,) in rows]


def pg_terminate(name: str, *, keep: Sequence[int] = (), timeout: float = 5.0) -> int:
    """`pg_terminate_backend` every connection to `name` but `keep`; wait until gone."""
    killed = 0
    deadline = time.monotonic() + timeout
    while pids := pg_backends(name, keep=keep):
        for pid in pids:
            killed += bool(pg_admin("SELECT pg_terminate_backend(%s)", (pid,))[0][0])
        if time.monotonic() > deadline:
            raise AssertionError(f"backends of {name} still there after {timeout} s: {pids}")
        time.sleep(0.01)
    return killed


class FreezableProxy(TcpProxy):
    """`sidecar.testing.TcpProxy` in front of the test server."""

    def __init__(self) -> None:
        super().__init__((PG_HOST, PG_PORT))

    def url(self, name: str) -> str:
        """The URL of database `name` through this proxy."""
        return pg_url_for(name, port=self.port)


@contextlib.contextmanager
def black_hole() -> Iterator[int]:
    """A port whose connections are accepted (by the kernel) and never answered."""
    with socket.create_server((PG_HOST, 0), backlog=64) as listener:
        yield listener.getsockname()[1]


@dataclass
class Database:
    """One test database: its kind, its URL and plain-driver access to its tables."""

    kind: str  # "sqlite" or "postgresql"
    url: str
    name: str  # the PostgreSQL database name, or the SQLite file path
    workdir: Path

    @property
    def is_postgresql(self) -> bool:
        return self.kind == "postgresql"

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """One statement (`%s` markers) in its own committed transaction; its rows."""
        return self.script([(sql, params)])[0]

    def script(
        self, statements: Sequence[tuple[str, Sequence[Any]]]
    ) -> list[list[tuple[Any, ...]]]:
        """Several statements in one committed transaction; the rows of each."""
        results: list[list[tuple[Any, ...]]] = []
        if self.is_postgresql:
            with psycopg.connect(self.url) as connection:
                for sql, params in statements:
                    cursor = connection.execute(sql, params)
                    results.append(cursor.fetchall() if cursor.description else [])
            return results
        connection = sqlite3.connect(self.name)
        try:
            connection.execute("PRAGMA foreign_keys = ON")
            for sql, params in statements:
                cursor = connection.execute(sql.replace("%s", "?"), params)
                results.append(cursor.fetchall())
            connection.commit()
        finally:
            connection.close()
        return results

    def init(self) -> Database:
        """`db init` through the library; returns self."""
        dbtools.init(self.url)
        return self

    def import_docs(self, *docs: Mapping[str, Any]) -> None:
        """`db import` of these RuleSet documents, written to a YAML file first."""
        path = self.workdir / f"import-{secrets.token_hex(4)}.yaml"
        path.write_text(dump_yaml(docs), encoding="utf-8")
        dbtools.import_files([path], self.url)

    def generation(self) -> int:
        rows = self.execute("SELECT generation FROM rule_sidecar_state")
        assert len(rows) == 1, rows
        return int(rows[0][0])

    def tables(self) -> list[str]:
        """The names of the user tables, sorted."""
        if self.is_postgresql:
            sql = "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
        else:
            sql = "SELECT name FROM sqlite_master WHERE type = 'table'"
        return sorted(name for (name,) in self.execute(sql))

    def rules(self) -> dict[str, dict[str, Any]]:
        """Every rule row by id: ruleset_id, points, condition, row_version, updated_at."""
        rows = self.execute(
            "SELECT id, ruleset_id, points, condition, row_version, updated_at"
            " FROM rule_sidecar_rules ORDER BY id"
        )
        keys = ("ruleset_id", "points", "condition", "row_version", "updated_at")
        return {row[0]: dict(zip(keys, row[1:], strict=True)) for row in rows}

    def dump(self) -> dict[str, list[tuple[Any, ...]]]:
        """Everything in the rule tables and the fingerprint, for "nothing changed"."""
        return {
            table: self.execute(f"SELECT * FROM {table} ORDER BY 1")
            for table in ("rule_sidecar_rulesets", "rule_sidecar_rules", "rule_sidecar_state")
        }

    def change_unseen(self, sql: str, params: Sequence[Any] = ()) -> None:
        """Change rows behind every trigger: neither the generation nor any change_id
        moves (PostgreSQL: triggers disabled; SQLite: dropped and created again, in the
        same transaction). What `SET session_replication_role = replica` or
        `pg_restore --disable-triggers` do; only a full read can notice it.
        """
        if self.is_postgresql:
            self.script(
                [
                    ("ALTER TABLE rule_sidecar_rulesets DISABLE TRIGGER USER", ()),
                    ("ALTER TABLE rule_sidecar_rules DISABLE TRIGGER USER", ()),
                    (sql, params),
                    ("ALTER TABLE rule_sidecar_rulesets ENABLE TRIGGER USER", ()),
                    ("ALTER TABLE rule_sidecar_rules ENABLE TRIGGER USER", ()),
                ]
            )
        else:
            triggers = self.execute("SELECT name, sql FROM sqlite_master WHERE type = 'trigger'")
            self.script(
                [
                    *((f"DROP TRIGGER {name}", ()) for name, _ in triggers),
                    (sql, params),
                    *((create, ()) for _, create in triggers),
                ]
            )


def _needs_postgresql(item: pytest.Item) -> bool:
    """Using a PostgreSQL fixture, or given the `postgresql` backend as a parameter."""
    if {"pg_database", "pg_url"} & set(getattr(item, "fixturenames", ())):
        return True
    callspec = getattr(item, "callspec", None)
    return callspec is not None and "postgresql" in callspec.params.values()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Skip the PostgreSQL tests, with the reason, before any fixture runs."""
    needing = [item for item in items if _needs_postgresql(item)]
    reason = pg_unavailable_reason() if needing else None
    if reason is not None:
        for item in needing:
            item.add_marker(pytest.mark.skip(reason=reason))


def _create_pg_database() -> str:
    name = f"rs_t_{secrets.token_hex(6)}"
    pg_admin(f"CREATE DATABASE {name}")
    return name


def _drop_pg_database(name: str) -> None:
    pg_terminate(name)
    pg_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def pg_database(tmp_path: Path) -> Iterator[Database]:
    """A fresh, empty PostgreSQL database (no tables yet), dropped at teardown."""
    require_postgresql()
    name = _create_pg_database()
    try:
        yield Database("postgresql", pg_url_for(name), name, tmp_path)
    finally:
        _drop_pg_database(name)


@pytest.fixture
def pg_url(pg_database: Database) -> str:
    """The URL of a fresh, empty PostgreSQL database (run `db init` to migrate it)."""
    return pg_database.url


@pytest.fixture
def pg_proxy() -> Iterator[FreezableProxy]:
    """A `FreezableProxy` to the test server, closed (thawed first) at teardown."""
    proxy = FreezableProxy()
    try:
        yield proxy
    finally:
        proxy.close()


@pytest.fixture
def sqlite_database(tmp_path: Path) -> Database:
    """A SQLite database file in tmp_path that does not exist yet (`db init` creates it)."""
    path = tmp_path / "rules.db"
    return Database("sqlite", f"sqlite:///{path.absolute()}", str(path), tmp_path)


@pytest.fixture
def sqlite_url(sqlite_database: Database) -> str:
    """`sqlite:////abs/path/rules.db` of a file that does not exist yet."""
    return sqlite_database.url


@pytest.fixture(params=BACKENDS)
def database(request: pytest.FixtureRequest) -> Database:
    """Each backend in turn, empty: SQLite, then PostgreSQL (skipped when unreachable)."""
    fixture = "pg_database" if request.param == "postgresql" else "sqlite_database"
    return request.getfixturevalue(fixture)  # type: ignore[no-any-return]


@pytest.fixture
def migrated(database: Database) -> Database:
    """Each backend in turn, with the tables created by `db init`."""
    return database.init()


@dataclass
class StandbyPair:
    """A primary and its hot standby (streaming replication), each on its own port."""

    primary_port: int
    standby_port: int

    def url(self, name: str, *, standby: bool = False) -> str:
        return pg_url_for(name, port=self.standby_port if standby else self.primary_port)

    def create_database(self) -> str:
        """A fresh database on the primary (replicated to the standby)."""
        name = f"rs_t_{secrets.token_hex(6)}"
        with psycopg.connect(self.url("postgres"), autocommit=True) as connection:
            connection.execute(f"CREATE DATABASE {name}")
        return name

    def wait_replayed(self, timeout: float = 30.0) -> None:
        """Until the standby has replayed everything the primary has written so far."""
        with psycopg.connect(self.url("postgres"), autocommit=True) as primary:
            (target,) = primary.execute("SELECT pg_current_wal_lsn()::text").fetchone() or ("",)
        deadline = time.monotonic() + timeout
        with psycopg.connect(self.url("postgres", standby=True), autocommit=True) as standby:
            while True:
                row = standby.execute(
                    "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (target,)
                ).fetchone()
                if row is not None and row[0]:
                    return
                if time.monotonic() > deadline:
                    raise AssertionError(f"the standby has not replayed {target} in {timeout} s")
                time.sleep(0.02)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((PG_HOST, 0))
        return int(probe.getsockname()[1])


def _pg_bin() -> Path | None:
    """The server's binaries (initdb, pg_ctl, pg_basebackup), when installed."""
    pg_config = shutil.which("pg_config")
    if pg_config is None:
        return None
    found = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
    directory = Path(found.stdout.strip())
    return directory if (directory / "initdb").exists() else None


@pytest.fixture(scope="module")
def pg_standby() -> Iterator[StandbyPair]:
    """A real primary and hot standby, built for this module and stopped after it (about
    10 s). Skipped, with the reason, where the server's binaries or the `postgres` user
    are missing."""
    binaries = _pg_bin()
    if binaries is None or shutil.which("runuser") is None or os.geteuid() != 0:
        pytest.skip("a standby needs the PostgreSQL binaries, runuser and root (to be postgres)")
    workdir = Path(tempfile.mkdtemp(prefix="rs-standby-"))
    shutil.chown(workdir, "postgres")
    pair = StandbyPair(_free_port(), _free_port())

    def run(*command: str) -> None:
        subprocess.run(
            ["runuser", "-u", "postgres", "--", *command],
            check=True,
            capture_output=True,
            timeout=120,
        )

    def start(directory: str, port: int) -> None:
        options = f"-p {port} -k {workdir} -c listen_addresses={PG_HOST} -c fsync=off"
        log = f"{workdir}/{directory}.log"
        run(
            str(binaries / "pg_ctl"),
            "-D",
            f"{workdir}/{directory}",
            "-o",
            options,
            "-l",
            log,
            "-w",
            "start",
        )

    started: list[str] = []
    try:
        run(
            str(binaries / "initdb"),
            "-D",
            f"{workdir}/primary",
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
        )
        with open(workdir / "primary" / "pg_hba.conf", "a", encoding="utf-8") as hba:
            hba.write(f"host replication all {PG_HOST}/32 trust\n")
        start("primary", pair.primary_port)
        started.append("primary")
        run(
            str(binaries / "pg_basebackup"),
            "-h",
            PG_HOST,
            "-p",
            str(pair.primary_port),
            "-U",
            "postgres",
            "-D",
            f"{workdir}/standby",
            "-R",
            "-X",
            "stream",
        )
        start("standby", pair.standby_port)
        started.append("standby")
        yield pair
    finally:
        for directory in reversed(started):
            run(str(binaries / "pg_ctl"), "-D", f"{workdir}/{directory}", "-m", "immediate", "stop")
        shutil.rmtree(workdir, ignore_errors=True)

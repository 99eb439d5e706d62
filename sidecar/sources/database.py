"""Rules kept in a database: SQLite (a file, the standard library) or PostgreSQL.

Tables (created and upgraded by `rule-sidecar db init`): `rule_sidecar_rulesets` and
`rule_sidecar_rules` carry every field of a `rule-sidecar/v1` document, with a row
version and `updated_at`; `rule_sidecar_state` holds one `generation` number that
triggers bump on every change. Reading the generation is the cheap fingerprint: a read
whose generation has not moved returns the documents it already built, so the periodic
resync costs one single-row query however many rules there are. On PostgreSQL the same
triggers `pg_notify('rule_sidecar', ...)`, and `changes()` listens, so an edit is live
in milliseconds; after a reconnect it asks for a full resync, because notifications sent
while disconnected are lost.

No wait on the database is unbounded (`DatabaseTimeouts`): connecting, each statement
(server side), each read as a whole and each heartbeat of the listener (client side, by
cutting the connection off: a frozen proxy or a hung host never answers, while its kernel
still acknowledges every byte, so neither the server's timeout nor TCP keepalives fire).

Each ruleset becomes one JSON document, handed to the loader like a file, so rows go
through exactly the validation, compilation, tests and all-or-nothing swap that files do,
and an unchanged ruleset is not validated or compiled again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import random
import socket
import sqlite3
import stat
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final
from urllib.parse import unquote, urlsplit, urlunsplit

import psycopg
from psycopg.conninfo import conninfo_to_dict

from sidecar.documents import SourceFile
from sidecar.errors import LoadError, Problem, ProblemCode

__all__ = [
    "SCHEMA_VERSION",
    "DatabaseSource",
    "DatabaseTimeouts",
    "DatabaseURL",
    "NoAnswer",
    "connect",
    "describe_error",
    "migrate",
    "open_connection",
    "password_from",
    "placeholder",
    "read_documents",
]

logger = logging.getLogger("sidecar.database")

SCHEMA_VERSION: Final = 1
CHANNEL: Final = "rule_sidecar"

_MAX_BACKOFF_S: Final = 30.0
_IDS_PER_QUERY: Final = 500
_MAX_PASSWORD_BYTES: Final = 64 * 1024


@dataclass(frozen=True, slots=True)
class DatabaseURL:
    """A parsed `sqlite:///path` or `postgresql://user@host:port/db` URL.

    `redacted` is what logs and messages show: never the password.
    """

    kind: str  # "sqlite" or "postgresql"
    url: str
    path: Path | None = None

    @classmethod
    def parse(cls, url: str) -> DatabaseURL:
        parts = urlsplit(url)
        if parts.scheme == "sqlite":
            # sqlite:///relative/or/absolute (three slashes, then the path as given)
            path = unquote(parts.path.removeprefix("/")) if parts.netloc == "" else ""
            if not path:
                raise ValueError(f"{url!r}: a SQLite URL is sqlite:///path/to/rules.db")
            return cls("sqlite", url, Path(path))
        if parts.scheme in ("postgresql", "postgres"):
            return cls("postgresql", url)
        raise ValueError(
            f"unsupported database URL scheme {parts.scheme!r}: use sqlite or postgresql"
        )

    @property
    def redacted(self) -> str:
        parts = urlsplit(self.url)
        if parts.password is None:
            return self.url
        netloc = parts.netloc.replace(f":{parts.password}@", ":********@", 1)
        return urlunsplit(parts._replace(netloc=netloc))


@dataclass(frozen=True, slots=True, kw_only=True)
class DatabaseTimeouts:
    """How long the sidecar waits on a database, in seconds. `serve` takes them from its
    settings (`RULE_SIDECAR_DATABASE_*_TIMEOUT_SECONDS`); these defaults serve the rest.

    `connect`: connecting and logging in (libpq's `connect_timeout`, whole seconds, at
    least 2). `statement`: each statement, enforced by the server (`statement_timeout`;
    SQLite: how long to wait for a lock). `read`: one read as a whole, and the listener's
    heartbeat, enforced by the sidecar: a server that does not answer within it is cut
    off. Keep it above `statement`, so that a live but slow server says why itself.
    """

    connect: int = 5
    statement: float = 10.0
    read: float = 15.0


class NoAnswer(TimeoutError):
    """The database did not answer within a deadline; the message says where and when."""

    def __init__(self, where: str, seconds: float, doing: str) -> None:
        super().__init__(f"no answer from {where} within {seconds:g} s {doing}")


# Schema

_JSON = {"sqlite": "TEXT", "postgresql": "JSONB"}
_NOW = {"sqlite": "(strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))", "postgresql": "now()"}
_TIME = {"sqlite": "TEXT", "postgresql": "TIMESTAMPTZ"}
_TABLES: Final = ("rule_sidecar_rulesets", "rule_sidecar_rules")


def _schema(kind: str) -> list[str]:
    json_type, now, time_type = _JSON[kind], _NOW[kind], _TIME[kind]
    statements = [
        "CREATE TABLE IF NOT EXISTS rule_sidecar_schema (version INTEGER NOT NULL)",
        "CREATE TABLE IF NOT EXISTS rule_sidecar_state ("
        " id INTEGER PRIMARY KEY CHECK (id = 1), generation BIGINT NOT NULL)",
        "INSERT INTO rule_sidecar_state (id, generation) VALUES (1, 0) ON CONFLICT (id) DO NOTHING",
        f"""CREATE TABLE IF NOT EXISTS rule_sidecar_rulesets (
            id TEXT PRIMARY KEY,
            name TEXT,
            description TEXT NOT NULL DEFAULT '',
            labels {json_type} NOT NULL DEFAULT '{{}}',
            decisions {json_type} NOT NULL DEFAULT '[]',
            default_decision TEXT,
            tests {json_type} NOT NULL DEFAULT '[]',
            row_version BIGINT NOT NULL DEFAULT 1,
            updated_at {time_type} NOT NULL DEFAULT {now})""",
        f"""CREATE TABLE IF NOT EXISTS rule_sidecar_rules (
            id TEXT PRIMARY KEY,
            ruleset_id TEXT NOT NULL REFERENCES rule_sidecar_rulesets (id) ON DELETE CASCADE,
            position INTEGER NOT NULL DEFAULT 0,
            name TEXT,
            description TEXT NOT NULL DEFAULT '',
            condition TEXT NOT NULL,
            points INTEGER NOT NULL,
            enabled BOOLEAN NOT NULL DEFAULT TRUE,
            priority INTEGER NOT NULL DEFAULT 0,
            tags {json_type} NOT NULL DEFAULT '[]',
            metadata {json_type} NOT NULL DEFAULT '{{}}',
            row_version BIGINT NOT NULL DEFAULT 1,
            updated_at {time_type} NOT NULL DEFAULT {now})""",
        "CREATE INDEX IF NOT EXISTS rule_sidecar_rules_by_ruleset"
        " ON rule_sidecar_rules (ruleset_id, position)",
    ]
    return statements + (_pg_triggers() if kind == "postgresql" else _sqlite_triggers())


def _pg_triggers() -> list[str]:
    statements = [
        # One bump and one notification per statement, however many rows it touched.
        f"""CREATE OR REPLACE FUNCTION rule_sidecar_changed() RETURNS trigger
            LANGUAGE plpgsql AS $$
            BEGIN
                UPDATE rule_sidecar_state SET generation = generation + 1 WHERE id = 1;
                PERFORM pg_notify('{CHANNEL}', TG_TABLE_NAME);
                RETURN NULL;
            END $$""",
        """CREATE OR REPLACE FUNCTION rule_sidecar_touch() RETURNS trigger
            LANGUAGE plpgsql AS $$
            BEGIN
                NEW.row_version := OLD.row_version + 1;
                NEW.updated_at := now();
                RETURN NEW;
            END $$""",
        # A ruleset's row_version also moves when one of its rules changes, so a reader
        # can re-read just the rulesets that changed.
        """CREATE OR REPLACE FUNCTION rule_sidecar_rule_moved() RETURNS trigger
            LANGUAGE plpgsql AS $$
            BEGIN
                IF TG_OP = 'TRUNCATE' THEN
                    UPDATE rule_sidecar_rulesets SET row_version = row_version;
                    RETURN NULL;
                END IF;
                IF TG_OP <> 'INSERT' THEN
                    UPDATE rule_sidecar_rulesets SET row_version = row_version
                        WHERE id = OLD.ruleset_id;
                END IF;
                IF TG_OP = 'INSERT' OR (TG_OP = 'UPDATE'
                        AND NEW.ruleset_id IS DISTINCT FROM OLD.ruleset_id) THEN
                    UPDATE rule_sidecar_rulesets SET row_version = row_version
                        WHERE id = NEW.ruleset_id;
                END IF;
                RETURN NULL;
            END $$""",
        "DROP TRIGGER IF EXISTS rule_sidecar_rules_ruleset ON rule_sidecar_rules",
        "CREATE TRIGGER rule_sidecar_rules_ruleset AFTER INSERT OR UPDATE OR DELETE"
        " ON rule_sidecar_rules FOR EACH ROW EXECUTE FUNCTION rule_sidecar_rule_moved()",
        "DROP TRIGGER IF EXISTS rule_sidecar_rules_truncated ON rule_sidecar_rules",
        "CREATE TRIGGER rule_sidecar_rules_truncated AFTER TRUNCATE"
        " ON rule_sidecar_rules FOR EACH STATEMENT EXECUTE FUNCTION rule_sidecar_rule_moved()",
    ]
    for table in _TABLES:
        statements += [
            f"DROP TRIGGER IF EXISTS {table}_changed ON {table}",
            f"CREATE TRIGGER {table}_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE"
            f" ON {table} FOR EACH STATEMENT EXECUTE FUNCTION rule_sidecar_changed()",
            f"DROP TRIGGER IF EXISTS {table}_touch ON {table}",
            f"CREATE TRIGGER {table}_touch BEFORE UPDATE ON {table}"
            " FOR EACH ROW EXECUTE FUNCTION rule_sidecar_touch()",
        ]
    return statements


def _sqlite_triggers() -> list[str]:
    bump = "UPDATE rule_sidecar_state SET generation = generation + 1 WHERE id = 1;"
    touch_set = (
        "UPDATE rule_sidecar_rulesets SET row_version = row_version + 1,"
        f" updated_at = {_NOW['sqlite']} WHERE id"
    )
    statements = [
        # A ruleset's row_version also moves when one of its rules changes.
        "CREATE TRIGGER IF NOT EXISTS rule_sidecar_rules_ruleset_insert AFTER INSERT"
        f" ON rule_sidecar_rules BEGIN {touch_set} = NEW.ruleset_id; END",
        "CREATE TRIGGER IF NOT EXISTS rule_sidecar_rules_ruleset_update AFTER UPDATE"
        " ON rule_sidecar_rules WHEN NEW.row_version = OLD.row_version"
        f" BEGIN {touch_set} IN (OLD.ruleset_id, NEW.ruleset_id); END",
        "CREATE TRIGGER IF NOT EXISTS rule_sidecar_rules_ruleset_delete AFTER DELETE"
        f" ON rule_sidecar_rules BEGIN {touch_set} = OLD.ruleset_id; END",
    ]
    for table in _TABLES:
        for event in ("INSERT", "UPDATE", "DELETE"):
            statements.append(
                f"CREATE TRIGGER IF NOT EXISTS {table}_{event.lower()} AFTER {event} ON {table}"
                f" BEGIN {bump} END"
            )
        # SQLite has no BEFORE-UPDATE assignment: bump the row after, without recursion
        # (recursive triggers are off by default).
        statements.append(
            f"CREATE TRIGGER IF NOT EXISTS {table}_touch AFTER UPDATE ON {table}"
            f" WHEN NEW.row_version = OLD.row_version BEGIN"
            f" UPDATE {table} SET row_version = OLD.row_version + 1,"
            f" updated_at = {_NOW['sqlite']} WHERE id = NEW.id; END"
        )
    return statements


# Connections


def placeholder(url: DatabaseURL) -> str:
    """The driver's query parameter marker: sqlite3 `?`, psycopg `%s`."""
    return "?" if url.kind == "sqlite" else "%s"


def password_from(password_file: Path | None) -> str | None:
    """The password in a file (a mounted Secret). Only a regular file is read: opening a
    FIFO would wait for a writer forever, on every connect."""
    if password_file is None:
        return None
    descriptor = os.open(password_file, os.O_RDONLY | os.O_NONBLOCK)
    with open(descriptor, "rb") as file:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise OSError(f"the password file {password_file} is not a regular file")
        return file.read(_MAX_PASSWORD_BYTES).decode("utf-8").strip()


def _credentials(password_file: Path | None) -> dict[str, Any]:
    """The password from a file (a mounted Secret), kept out of the URL and the logs."""
    password = password_from(password_file)
    return {"password": password} if password else {}


def _location(url: DatabaseURL) -> str:
    """Where the database is, for messages: `host:port`, or the SQLite file."""
    if url.kind == "sqlite":
        return str(url.path)
    try:
        parameters = conninfo_to_dict(url.url)
    except psycopg.Error:  # connecting will say what is wrong with it
        return url.redacted
    return f"{parameters.get('host') or 'localhost'}:{parameters.get('port') or 5432}"


def _pg_parameters(timeouts: DatabaseTimeouts) -> dict[str, Any]:
    """libpq's limits on every wait the kernel can see: connecting, unacknowledged data
    (`tcp_user_timeout`) and a silent idle peer (keepalives)."""
    return {
        "connect_timeout": timeouts.connect,
        "keepalives": 1,
        "keepalives_idle": math.ceil(timeouts.read),
        "keepalives_interval": math.ceil(timeouts.read / 3),
        "keepalives_count": 3,
        "tcp_user_timeout": math.ceil(timeouts.read * 1000),
    }


def open_connection(
    url: DatabaseURL,
    *,
    password_file: Path | None = None,
    create: bool = False,
    timeouts: DatabaseTimeouts = DatabaseTimeouts(),
) -> Any:
    """A DB-API connection (in a transaction until committed or rolled back).

    A SQLite file is created only when asked (`db init`): a reader pointed at a wrong
    path must fail, not leave an empty database behind. Raises `NoAnswer` when the
    server does not complete the login in time.
    """
    if url.kind == "sqlite":
        assert url.path is not None
        mode = "rwc" if create else "rw"
        connection: Any = sqlite3.connect(
            f"{url.path.absolute().as_uri()}?mode={mode}",
            uri=True,
            timeout=timeouts.statement,  # the wait for another process's lock
            isolation_level=None,  # transactions are begun explicitly
            check_same_thread=False,  # the reload service reads from one thread at a time
        )
        connection.execute("PRAGMA foreign_keys = ON")
        return connection
    try:
        return psycopg.connect(
            url.url,
            options=f"-c statement_timeout={math.ceil(timeouts.statement * 1000)}",
            **_pg_parameters(timeouts),
            **_credentials(password_file),
        )
    except psycopg.errors.ConnectionTimeout:
        raise NoAnswer(_location(url), timeouts.connect, "while connecting") from None


class _Deadline:
    """Cuts a connection off when the block it guards outlives `seconds`, and then
    raises `NoAnswer`. A read waits on the server in libpq or SQLite, which no timer
    can interrupt from the outside, but shutting the socket down (or
    `sqlite3.Connection.interrupt`) makes that wait return at once, with an error."""

    def __init__(self, connection: Any, seconds: float, where: str, doing: str) -> None:
        self._cut = _cutter(connection)
        self._error = NoAnswer(where, seconds, doing)
        self._lock = threading.Lock()
        self._armed = True
        self._fired = False
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True

    def __enter__(self) -> _Deadline:
        self._timer.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._timer.cancel()
        with self._lock:  # from here on, the connection is never cut (it may be closed)
            self._armed = False
        if self._fired:
            raise self._error

    def _fire(self) -> None:
        with self._lock:
            if self._armed:
                self._fired = True
                self._cut()


def _cutter(connection: Any) -> Callable[[], None]:
    """What ends any wait on `connection` from another thread."""
    if isinstance(connection, sqlite3.Connection):
        return connection.interrupt
    try:
        descriptor = connection.pgconn.socket
    except psycopg.Error:  # already lost: there is no wait to end
        return lambda: None

    def shut_down() -> None:
        # The connection's own descriptor stays open (its owner closes it); only the
        # TCP stream is ended, which wakes whoever waits on it.
        with contextlib.suppress(OSError), socket.socket(fileno=os.dup(descriptor)) as stream:
            stream.shutdown(socket.SHUT_RDWR)

    return shut_down


@contextmanager
def connect(
    url: DatabaseURL, *, password_file: Path | None = None, create: bool = False
) -> Iterator[Any]:
    """A connection for one unit of work: committed on success, rolled back on error."""
    connection = open_connection(url, password_file=password_file, create=create)
    if url.kind == "sqlite":
        connection.execute("BEGIN")
    try:
        yield connection
        connection.commit()
    except BaseException:
        connection.rollback()
        raise
    finally:
        connection.close()


def migrate(url: DatabaseURL, *, password_file: Path | None = None) -> int:
    """Create or upgrade the tables (idempotent); returns the schema version."""
    with connect(url, password_file=password_file, create=True) as connection:
        for statement in _schema(url.kind):
            connection.execute(statement)
        row = connection.execute("SELECT version FROM rule_sidecar_schema").fetchone()
        if row is None:
            connection.execute(
                f"INSERT INTO rule_sidecar_schema (version) VALUES ({placeholder(url)})",
                (SCHEMA_VERSION,),
            )
        elif row[0] > SCHEMA_VERSION:
            raise ValueError(
                f"the database schema is version {row[0]}, newer than this sidecar's"
                f" {SCHEMA_VERSION}: upgrade rule-sidecar"
            )
    return SCHEMA_VERSION


# Reading

# JSON columns are read as text on both databases (one decoding path, json's C decoder:
# much cheaper than the driver's per-value JSONB conversion).
_RULESET_COLUMNS: Final = (
    "id, name, description, CAST(labels AS TEXT), CAST(decisions AS TEXT), default_decision,"
    " CAST(tests AS TEXT)"
)
_RULE_COLUMNS: Final = (
    "id, ruleset_id, name, description, condition, points, enabled, priority,"
    " CAST(tags AS TEXT), CAST(metadata AS TEXT)"
)


def _json(value: Any) -> Any:
    """A JSON column's text, decoded. Text that does not decode (SQLite stores what it is
    given) is passed on as it is, so the schema reports it at its rule."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError:
        return value


def _boolean(value: Any) -> Any:
    """SQLite stores booleans as 0/1; anything else (`'false'`) goes to the schema."""
    if isinstance(value, int) and not isinstance(value, bool) and value in (0, 1):
        return bool(value)
    return value


def _rule_document(row: tuple[Any, ...]) -> dict[str, Any]:
    rule_id, _, name, description, condition, points, enabled, priority, tags, metadata = row
    document: dict[str, Any] = {"id": rule_id}
    if name is not None:
        document["name"] = name
    document.update(
        description=description,
        condition=condition,
        points=points,
        enabled=_boolean(enabled),
        priority=priority,
        tags=_json(tags),
        metadata=_json(metadata),
    )
    return document


def _ruleset_document(row: tuple[Any, ...], rules: list[dict[str, Any]]) -> dict[str, Any]:
    ruleset_id, name, description, labels, decisions, default_decision, tests = row
    metadata: dict[str, Any] = {"id": ruleset_id}
    if name is not None:
        metadata["name"] = name
    metadata.update(description=description, labels=_json(labels))
    spec: dict[str, Any] = {"rules": rules}
    # Only the columns' default, an empty list, means "none": anything else that is not
    # a list (`null`, `{}`, `false`, `0`) goes to the schema, which refuses it by name,
    # instead of silently taking away every decision band or embedded test.
    if (decisions := _json(decisions)) != []:
        spec["decisions"] = decisions
    if default_decision is not None:
        spec["default_decision"] = default_decision
    if (tests := _json(tests)) != []:
        spec["tests"] = tests
    return {"apiVersion": "rule-sidecar/v1", "kind": "RuleSet", "metadata": metadata, "spec": spec}


def read_documents(
    connection: Any, ids: Sequence[str] | None = None
) -> tuple[int, dict[str, dict[str, Any]]]:
    """The generation and every ruleset (or those of `ids`) as `rule-sidecar/v1`
    documents, read in the caller's transaction."""
    generation = connection.execute("SELECT generation FROM rule_sidecar_state").fetchone()[0]
    rule_filter = ruleset_filter = ""
    parameters: tuple[Any, ...] = ()
    if ids is not None:
        marks = ", ".join(["?" if isinstance(connection, sqlite3.Connection) else "%s"] * len(ids))
        rule_filter, ruleset_filter = f" WHERE ruleset_id IN ({marks})", f" WHERE id IN ({marks})"
        parameters = tuple(ids)
    rules: dict[str, list[dict[str, Any]]] = {}
    for row in connection.execute(
        f"SELECT {_RULE_COLUMNS} FROM rule_sidecar_rules{rule_filter}"
        " ORDER BY ruleset_id, position, id",
        parameters,
    ):
        rules.setdefault(row[1], []).append(_rule_document(row))
    documents = {
        row[0]: _ruleset_document(row, rules.get(row[0], []))
        for row in connection.execute(
            f"SELECT {_RULESET_COLUMNS} FROM rule_sidecar_rulesets{ruleset_filter} ORDER BY id",
            parameters,
        )
    }
    return int(generation), documents


class DatabaseSource:
    """A `RuleSource` over the rule tables of one database."""

    def __init__(
        self,
        url: str,
        *,
        password_file: Path | None = None,
        listen: bool = True,
        timeouts: DatabaseTimeouts = DatabaseTimeouts(),
    ) -> None:
        self.url = DatabaseURL.parse(url)
        self._password_file = password_file
        self._timeouts = timeouts
        self._address = _location(self.url)
        self._listen = listen and self.url.kind == "postgresql"
        self._generation: int | None = None
        self._versions: dict[str, int] = {}
        self._files: dict[str, SourceFile] = {}
        # Bumped by `forget` (from the event loop) so that a read running meanwhile in
        # a worker thread does not trust the generation it saw.
        self._epoch = 0
        # Reads are serialised by the reload service, one thread at a time.
        self._connection: Any = None
        self._watch_problem: str | None = None

    @property
    def name(self) -> str:
        return self.url.redacted

    def read(self) -> list[SourceFile]:
        """Every ruleset as a JSON document. Only the generation is read when it has not
        moved; when it has, only the rulesets whose `row_version` moved are read again.
        Raises `LoadError` naming the database when it cannot be read."""
        epoch = self._epoch
        try:
            try:
                changes = self._read_changes()
            except Exception as exc:
                # A kept connection may have died since the last read: one fresh try. Not
                # after a timeout on a live one, or a cut-off one: that would double the wait.
                kept = self._connection
                if isinstance(exc, NoAnswer) or kept is None or not getattr(kept, "broken", True):
                    raise
                self._disconnect()
                changes = self._read_changes()
        except Exception as exc:  # every driver error means the same: not readable now
            self._disconnect()
            reason = describe_error(exc, self._password(), self.url)
            message = f"database unavailable: {reason}"
            problem = Problem(file=self.name, message=message, code=ProblemCode.SOURCE_UNAVAILABLE)
            raise LoadError([problem]) from None
        if changes is not None:
            generation, versions, documents = changes
            self._files = {
                ruleset_id: self._file(ruleset_id, documents.get(ruleset_id))
                for ruleset_id in sorted(versions)
            }
            current = epoch == self._epoch
            self._generation = generation if current else None
            self._versions = versions if current else {}
        return list(self._files.values())

    def _file(self, ruleset_id: str, document: dict[str, Any] | None) -> SourceFile:
        """The ruleset's file: the same object as before when its content did not change,
        so the loader skips it without even hashing it."""
        previous = self._files.get(ruleset_id)
        if document is None and previous is not None:
            return previous
        name = f"{self.name}#rulesets/{ruleset_id}.json"
        content = json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()
        if previous is not None and previous.content == content:
            return previous
        return SourceFile(name, content, located=False)

    def _read_changes(self) -> tuple[int, dict[str, int], dict[str, dict[str, Any]]] | None:
        """None when the generation has not moved; else the generation, every ruleset's
        row_version, and the documents of the rulesets that are new or changed."""
        connection = self._connect()
        with _Deadline(connection, self._timeouts.read, self._address, "while reading"):
            return self._read_in_transaction(connection)

    def _read_in_transaction(
        self, connection: Any
    ) -> tuple[int, dict[str, int], dict[str, dict[str, Any]]] | None:
        # One consistent view: the generation, the versions and the rows belong together.
        if self.url.kind == "postgresql":
            connection.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        else:
            connection.execute("BEGIN")
        try:
            generation = self._read_generation(connection)
            if generation is not None and generation == self._generation:
                return None
            versions = {
                str(ruleset_id): int(version)
                for ruleset_id, version in connection.execute(
                    "SELECT id, row_version FROM rule_sidecar_rulesets"
                )
            }
            stale = [i for i, v in versions.items() if self._versions.get(i) != v]
            documents: dict[str, dict[str, Any]] = {}
            if len(stale) > len(versions) // 2:
                generation, documents = read_documents(connection)
            else:
                for start in range(0, len(stale), _IDS_PER_QUERY):
                    generation, part = read_documents(
                        connection, stale[start : start + _IDS_PER_QUERY]
                    )
                    documents.update(part)
            return int(generation or 0), versions, documents
        finally:
            connection.rollback()  # read-only: end the transaction, see new rows next time

    def _connect(self) -> Any:
        """The source's one connection, opened on first need and after a failure."""
        if self._connection is None:
            self._connection = open_connection(
                self.url, password_file=self._password_file, timeouts=self._timeouts
            )
        return self._connection

    def _disconnect(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                connection.close()

    def watch_problem(self) -> str | None:
        return self._watch_problem

    def _password(self) -> str | None:
        """The password to keep out of messages; none when its file cannot be read."""
        with contextlib.suppress(OSError, ValueError):
            return password_from(self._password_file)
        return None

    def forget(self) -> None:
        """Make the next read a full one (after a reconnect, say)."""
        self._epoch += 1
        self._generation = None
        self._versions = {}

    def _read_generation(self, connection: Any) -> int | None:
        row = connection.execute("SELECT generation FROM rule_sidecar_state").fetchone()
        return None if row is None else int(row[0])

    async def changes(self) -> AsyncIterator[str]:
        """PostgreSQL: each notification, and a resync after every (re)connect.
        SQLite has no notifications: the periodic resync polls the generation."""
        if not self._listen:
            return
        backoff = 0.5
        while True:
            try:
                async for reason in self._notifications():
                    backoff = 0.5
                    yield reason
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                reason = describe_error(exc, self._password(), self.url)
                self._watch_problem = f"not listening: {reason}"
                logger.warning("listening on %s failed: %s", self.name, reason)
            delay = backoff * (0.5 + random.random())
            backoff = min(backoff * 2, _MAX_BACKOFF_S)
            await asyncio.sleep(delay)

    async def _notifications(self) -> AsyncIterator[str]:
        """Notifications on one connection. A listener only waits, and silence is also
        what a dead or frozen server sends: after `read` seconds of it, `SELECT 1` must
        be answered within `read` seconds, or the connection is given up."""
        seconds = self._timeouts.read
        try:
            connection = await psycopg.AsyncConnection.connect(
                self.url.url,
                autocommit=True,
                **_pg_parameters(self._timeouts),
                **_credentials(self._password_file),
            )
        except psycopg.errors.ConnectionTimeout:
            raise NoAnswer(self._address, self._timeouts.connect, "while connecting") from None
        async with connection:
            with _Deadline(connection, seconds, self._address, "to LISTEN"):
                await connection.execute(f"LISTEN {CHANNEL}")
            # Whatever changed while we were not listening is unknown: resync in full.
            self.forget()
            self._watch_problem = None
            yield "listening"
            while True:
                async for notify in connection.notifies(timeout=seconds):
                    yield f"notify: {notify.payload}"
                # Notifications that arrive meanwhile wait in psycopg's backlog.
                with _Deadline(connection, seconds, self._address, "to a heartbeat"):
                    await connection.execute("SELECT 1")


def describe_error(exc: BaseException, password: str | None, url: DatabaseURL) -> str:
    """A one-line reason that never repeats a password (drivers may quote the DSN)."""
    if isinstance(exc, NoAnswer):
        return str(exc)
    text = " ".join(str(exc).split()) or type(exc).__name__
    for secret in (password, urlsplit(url.url).password):
        if secret:
            text = text.replace(secret, "********")
    if "rule_sidecar_" in text and ("does not exist" in text or "no such table" in text):
        text += " (create the tables with `rule-sidecar db init`)"
    return f"{type(exc).__name__}: {text}"[:500]

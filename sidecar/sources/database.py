"""Rules kept in a database: SQLite (a file, the standard library) or PostgreSQL.

The tables, their triggers and the row <-> document mappings are in
`sidecar.sources.dbschema` (`rule-sidecar db init` creates and upgrades them); this module
connects, listens and reads. `rule_sidecar_state` holds one `generation` number that
triggers bump on every change. Reading the generation is the cheap fingerprint: a read
whose generation has not moved returns the documents it already built, so the periodic
resync costs one single-row query however many rules there are. When it has moved, only
the rulesets whose `change_id` moved are read again: triggers give a ruleset a number
never given before on every write to it or its rules (not `row_version`, which a ruleset
deleted and inserted again repeats). Triggers can be bypassed (replica mode, a restore
without them): `forget()` makes the next read read every row, whatever the numbers say.
On PostgreSQL the same triggers `pg_notify('rule_sidecar', ...)`, and `changes()`
listens, so an edit is live in milliseconds; after a reconnect it asks for a full resync,
because notifications sent while disconnected are lost. A hot standby refuses LISTEN:
there the periodic resync polls.

A source holds one connection, whatever it does: reads (a worker thread) and the
listener (daemon threads, for the event loop) take turns on it under a lock. psycopg
hands every notification it receives to the source's handler, whichever query was
running (a read's ROLLBACK delivers those sent during the read), so none is lost while a
read runs; when the connection is idle, the listener waits for its socket to become
readable and then lets psycopg read it.

A read never fetches a ruleset larger than a rule file may be (its size is measured by
the database first), and every value no document can hold is reported with its ruleset,
column and cause, never raised as whatever the encoder throws.

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
import functools
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
from dataclasses import dataclass, field
from pathlib import Path
from select import POLLIN, poll
from types import TracebackType
from typing import Any, Final
from urllib.parse import unquote, urlsplit, urlunsplit

import psycopg
from psycopg.conninfo import conninfo_to_dict

from sidecar.errors import LoadError, Problem, ProblemCode, format_path
from sidecar.rulefiles import DEFAULT_FILE_LIMITS, SourceFile
from sidecar.sources import in_daemon_thread
from sidecar.sources.dbschema import (
    CHANNEL,
    RULE_COLUMNS,
    RULESET_COLUMNS,
    RULESET_FIELDS,
    Dialect,
    RowFault,
    decode_text,
    dialect_of,
    excerpt,
    marks,
    missing_triggers,
    rule_document,
    rule_field,
    ruleset_document,
    ruleset_file,
    select,
)

__all__ = [
    "APPLICATION_NAME",
    "DatabaseSource",
    "DatabaseTimeouts",
    "DatabaseURL",
    "NoAnswer",
    "Unreadable",
    "connect",
    "deadline",
    "describe_error",
    "in_recovery",
    "open_connection",
    "password_from",
    "read_documents",
    "read_files",
    "ruleset_source_file",
]

logger = logging.getLogger("sidecar.database")

_MAX_BACKOFF_S: Final = 30.0
_IDS_PER_QUERY: Final = 500
_MAX_PASSWORD_BYTES: Final = 64 * 1024
# What every connection says it is (`pg_stat_activity.application_name`), unless the URL
# or PGAPPNAME names it otherwise.
APPLICATION_NAME: Final = "rule-sidecar"
# Listening, and the listener's heartbeat: LISTEN again changes nothing, must be answered,
# and leaves the idle connection showing what it does (`pg_stat_activity.query`).
_LISTEN: Final = f"LISTEN {CHANNEL}"


@dataclass(frozen=True, slots=True)
class DatabaseURL:
    """A parsed `sqlite:///path` or `postgresql://user@host:port/db` URL.

    `redacted` is what logs and messages show: never the password.
    """

    kind: Dialect
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


# Connections


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
    (`tcp_user_timeout`) and a silent idle peer (keepalives); and the program's name."""
    return {
        "fallback_application_name": APPLICATION_NAME,
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


def deadline(connection: Any, url: DatabaseURL, seconds: float, doing: str) -> _Deadline:
    """A block that must end within `seconds`, or the connection is cut off and the block
    raises `NoAnswer` (`doing` says what it was waiting for, in the message)."""
    return _Deadline(connection, seconds, _location(url), doing)


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
    url: DatabaseURL,
    *,
    password_file: Path | None = None,
    create: bool = False,
    write: bool = False,
    timeouts: DatabaseTimeouts = DatabaseTimeouts(),
) -> Iterator[Any]:
    """A connection for one unit of work: committed on success, rolled back on error.
    `write` takes SQLite's write lock before the first read (`BEGIN IMMEDIATE`, which
    waits `timeouts.statement` for another writer, then fails as busy)."""
    connection = open_connection(url, password_file=password_file, create=create, timeouts=timeouts)
    try:
        if url.kind == "sqlite":
            connection.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        yield connection
        connection.commit()
    except BaseException:
        connection.rollback()
        raise
    finally:
        connection.close()


# Reading

# The schema allows 63 characters; a longer SQLite id is never fetched whole.
_MAX_ID_BYTES: Final = 1024


def _size(column: str, *, sqlite: bool) -> str:
    """SQL for the bytes a column's value takes, computed by the database: the value
    itself is not sent (PostgreSQL), or not handed to Python (SQLite)."""
    if sqlite:
        return f"coalesce(length(CAST({column} AS BLOB)), 0)"
    return f"coalesce(octet_length(CAST({column} AS TEXT)), 0)"


class Unreadable(ValueError):
    """The database holds what no document can be made of, or the SQLite file is gone;
    the message says what, in words (it is reported as it is)."""


@dataclass(frozen=True, slots=True)
class _Rulesets:
    """Rulesets read: the documents, and the problems of those that could not be."""

    documents: dict[str, dict[str, Any]]
    refused: dict[str, Problem]


def _chunks(ids: Sequence[str]) -> Iterator[Sequence[str]]:
    for start in range(0, len(ids), _IDS_PER_QUERY):
        yield ids[start : start + _IDS_PER_QUERY]


def _too_large(
    connection: Any, name: str, ids: Sequence[str] | None, max_bytes: int
) -> dict[str, Problem]:
    """The rulesets (of `ids`, or all) whose columns hold more bytes than a rule file
    may: measured by the database, so that such a row is never fetched (a 200 MB
    description would be fetched, decoded and encoded again before any check)."""
    dialect = dialect_of(connection)
    sqlite = dialect == "sqlite"
    own = " + ".join(_size(c, sqlite=sqlite) for c in RULESET_COLUMNS[1:])
    rules = " + ".join(_size(c, sqlite=sqlite) for c in RULE_COLUMNS)
    # SQLite measures text by loading it: rows too large for that are measured apart.
    big_rulesets = _oversized_rows(connection, "rule_sidecar_rulesets", max_bytes)
    big_rules = _oversized_rows(connection, "rule_sidecar_rules", max_bytes)
    if big_rulesets:
        own = f"CASE WHEN rowid IN ({', '.join(map(str, big_rulesets))}) THEN 0 ELSE {own} END"
    skip = f" AND rowid NOT IN ({', '.join(map(str, big_rules))})" if big_rules else ""
    sizes: dict[str, tuple[int, int]] = {}
    for part in [None] if ids is None else _chunks(ids):
        where = "" if part is None else f" WHERE id IN ({marks(dialect, len(part))})"
        for ruleset_id, size, rules_size, rowid in connection.execute(
            f"SELECT id, {own},"
            f" (SELECT coalesce(sum({rules}), 0) FROM rule_sidecar_rules"
            f"  WHERE ruleset_id = rule_sidecar_rulesets.id{skip}),"
            f" {'rowid' if sqlite else '0'}"
            f" FROM rule_sidecar_rulesets{where}",
            tuple(part or ()),
        ):
            if isinstance(ruleset_id, str):  # else reported by its id (_read_stamps)
                sizes[ruleset_id] = int(size) + big_rulesets.get(rowid, 0), int(rules_size)
    for rowid, size in big_rules.items():
        row = connection.execute(
            "SELECT ruleset_id FROM rule_sidecar_rules WHERE rowid = ?", (rowid,)
        ).fetchone()
        if row is not None and row[0] in sizes:
            own_size, rules_size = sizes[row[0]]
            sizes[row[0]] = own_size, rules_size + size
    return {
        ruleset_id: Problem(
            file=ruleset_file(name, ruleset_id),
            message=(
                f"ruleset {ruleset_id!r} holds {own_size + rules_size:,} bytes in the"
                f" database (its own columns {own_size:,}, its rules {rules_size:,}), more"
                f" than the {max_bytes:,} bytes a rule file may hold: not read"
            ),
            ruleset_id=ruleset_id,
            code=ProblemCode.READ_TOO_LARGE,
        )
        for ruleset_id, (own_size, rules_size) in sizes.items()
        if own_size + rules_size > max_bytes
    }


def _oversized_rows(connection: Any, table: str, max_bytes: int) -> dict[int, int]:
    """SQLite: the rows of `table` larger than `max_bytes`, by rowid, with their size,
    found without loading a value (`length()` of a 200 MB text holds all of it).

    `dbstat` gives each leaf page's largest cell; the rows of a page holding one too
    large are measured with incremental BLOB I/O, which reads sizes, not values. A leaf
    page holds consecutive rows: the rows before it are the cells of the leaves before.
    Without `dbstat` (a SQLite built without it), `length()` measures everything.
    """
    if dialect_of(connection) != "sqlite":
        return {}
    (pages,) = connection.execute("PRAGMA page_count").fetchone()
    (page_size,) = connection.execute("PRAGMA page_size").fetchone()
    if pages * page_size <= max_bytes:
        return {}
    try:
        leaves = connection.execute(
            "SELECT ncell, mx_payload FROM dbstat WHERE name = ? AND pagetype = 'leaf'"
            " ORDER BY path",
            (table,),
        ).fetchall()
    except sqlite3.OperationalError:  # no dbstat
        return {}
    # The columns _too_large measures in SQL (a ruleset's id is bounded by _read_stamps).
    columns = RULESET_COLUMNS[1:] if table == "rule_sidecar_rulesets" else RULE_COLUMNS
    types = ", ".join(f"typeof({c})" for c in columns)
    sizes: dict[int, int] = {}
    start = 0
    for cells, largest in leaves:
        if largest > max_bytes:
            for (rowid,) in connection.execute(
                f"SELECT rowid FROM {table} ORDER BY rowid LIMIT ? OFFSET ?", (cells, start)
            ):
                size = _row_bytes(connection, table, columns, types, rowid)
                if size > max_bytes:
                    sizes[rowid] = size
        start += cells
    return sizes


def _row_bytes(
    connection: sqlite3.Connection, table: str, columns: Sequence[str], types: str, rowid: int
) -> int:
    """The bytes of one row's text and BLOB values (8 for a number), none of them read."""
    row = connection.execute(f"SELECT {types} FROM {table} WHERE rowid = ?", (rowid,)).fetchone()
    size = 0
    for column, kind in zip(columns, row or (), strict=False):
        if kind in ("text", "blob"):
            with connection.blobopen(table, column, rowid, readonly=True) as blob:
                size += len(blob)
        elif kind != "null":
            size += 8
    return size


def _read_rulesets(
    connection: Any, name: str, ids: Sequence[str] | None, max_bytes: int | None
) -> _Rulesets:
    """The rulesets of `ids` (or all) as documents, in the caller's transaction. One
    that cannot be made a document is refused with a problem naming it, its column and
    why: it is never left out silently, nor does it fail the others' reading."""
    refused = {} if max_bytes is None else _too_large(connection, name, ids, max_bytes)
    if ids is None and not refused:
        parts: list[Sequence[str] | None] = [None]
    else:
        wanted = [i for i in (ids if ids is not None else _all_ids(connection)) if i not in refused]
        parts = list(_chunks(wanted))
    rules: dict[str, list[dict[str, Any]]] = {}
    documents: dict[str, dict[str, Any]] = {}
    for part in parts:
        wanted_ids = "" if part is None else marks(dialect_of(connection), len(part))
        for row in connection.execute(
            f"SELECT {select(RULE_COLUMNS)} FROM rule_sidecar_rules"
            + ("" if part is None else f" WHERE ruleset_id IN ({wanted_ids})")
            + " ORDER BY ruleset_id, position, id",
            tuple(part or ()),
        ):
            if not isinstance(row[1], str):
                continue  # a rule of no ruleset read
            listed = rules.setdefault(row[1], [])
            try:
                listed.append(rule_document(row))
            except RowFault as fault:
                refused.setdefault(row[1], _rule_problem(name, row, len(listed), fault))
        for row in connection.execute(
            f"SELECT {select(RULESET_COLUMNS)} FROM rule_sidecar_rulesets"
            + ("" if part is None else f" WHERE id IN ({wanted_ids})")
            + " ORDER BY id",
            tuple(part or ()),
        ):
            if not isinstance(row[0], str):
                continue  # reported by its id (_read_stamps)
            try:
                document = ruleset_document(row, rules.get(row[0], []))
            except RowFault as fault:
                refused.setdefault(row[0], _ruleset_problem(name, row[0], fault))
                continue
            if row[0] not in refused:
                documents[row[0]] = document
    return _Rulesets(documents, refused)


def _all_ids(connection: Any) -> list[str]:
    rows = connection.execute("SELECT id FROM rule_sidecar_rulesets ORDER BY id")
    return [i for (i,) in rows if isinstance(i, str)]


def _rule_problem(name: str, row: tuple[Any, ...], index: int, fault: RowFault) -> Problem:
    rule_id, ruleset_id = row[0], row[1]
    shown = excerpt(rule_id) if isinstance(rule_id, str) else "(its id is not text)"
    return Problem(
        file=ruleset_file(name, ruleset_id),
        path=format_path(rule_field(index, fault.column)),
        message=f"the {fault.column} column of rule {shown} {fault.cause}",
        ruleset_id=ruleset_id,
        rule_id=rule_id if isinstance(rule_id, str) else None,
        code=ProblemCode.READ_FAILED,
    )


def _ruleset_problem(name: str, ruleset_id: str, fault: RowFault) -> Problem:
    return Problem(
        file=ruleset_file(name, ruleset_id),
        path=format_path(RULESET_FIELDS[fault.column]),
        message=f"the {fault.column} column of ruleset {ruleset_id!r} {fault.cause}",
        ruleset_id=ruleset_id,
        code=ProblemCode.READ_FAILED,
    )


def _generation(connection: Any) -> int:
    row = connection.execute("SELECT generation FROM rule_sidecar_state").fetchone()
    if row is None:
        raise Unreadable(
            "the table rule_sidecar_state has lost its row (id 1, the generation):"
            " `rule-sidecar db init` puts it back"
        )
    return int(row[0])


def read_documents(
    connection: Any,
    ids: Sequence[str] | None = None,
    *,
    name: str = "database",
    max_bytes: int | None = None,
) -> tuple[int, dict[str, dict[str, Any]]]:
    """The generation and every ruleset (or those of `ids`) as `rule-sidecar/v1`
    documents, read in the caller's transaction. Raises `LoadError` naming each
    ruleset that cannot be read, or is over `max_bytes` when given (`name` is the
    database in its file names); `Unreadable` when the generation row is gone."""
    generation = _generation(connection)
    rulesets = _read_rulesets(connection, name, ids, max_bytes)
    if rulesets.refused:
        raise LoadError(rulesets.refused.values())
    return generation, rulesets.documents


def ruleset_source_file(name: str, ruleset_id: str, document: dict[str, Any] | None) -> SourceFile:
    """A stored ruleset's document as the file the loader is handed: the same bytes for
    the same rows, whoever reads them (the source, or a write validating its result)."""
    content = json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()
    return SourceFile(ruleset_file(name, ruleset_id), content, located=False)


def read_files(connection: Any, *, name: str, max_bytes: int) -> list[SourceFile]:
    """Every ruleset as the source would hand it to the loader, read in the caller's
    transaction (a write validates what it is about to commit). Raises `LoadError`
    naming each ruleset that cannot be read and each rule of no ruleset."""
    rulesets = _read_rulesets(connection, name, None, max_bytes)
    problems = [*rulesets.refused.values(), *_orphans(connection, name)]
    if problems:
        raise LoadError(problems)
    return [
        ruleset_source_file(name, ruleset_id, document)
        for ruleset_id, document in sorted(rulesets.documents.items())
    ]


def _orphans(connection: Any, name: str) -> tuple[Problem, ...]:
    """Rules whose ruleset does not exist: written with SQLite's foreign keys off (they
    are per connection) or behind PostgreSQL's triggers. No document holds them, so
    they would be left out unseen: each is a problem until it is removed or placed."""
    rows = connection.execute(
        "SELECT id, ruleset_id FROM rule_sidecar_rules WHERE ruleset_id NOT IN"
        " (SELECT id FROM rule_sidecar_rulesets) LIMIT 10"
    ).fetchall()
    return tuple(
        Problem(
            file=name,
            message=f"rule {excerpt(str(rule_id))} belongs to ruleset"
            f" {excerpt(str(ruleset_id))}, which does not exist: it is served by no ruleset",
            rule_id=str(rule_id),
            code=ProblemCode.READ_FAILED,
        )
        for rule_id, ruleset_id in rows
    )


@dataclass(frozen=True, slots=True)
class _Changes:
    """What a read found: the generation, every ruleset's change_id, the rulesets read
    again (new or changed), and those refused."""

    generation: int
    stamps: dict[str, object]
    documents: dict[str, dict[str, Any]]
    refused: dict[str, Problem]
    orphans: tuple[Problem, ...] = ()
    row_versions: dict[str, int] = field(default_factory=dict)


def _trigger_problem(connection: Any, dialect: Dialect) -> str | None:
    """Which of the source's triggers are missing or disabled, in words; None if none."""
    missing = missing_triggers(connection, dialect)
    if not missing:
        return None
    return (
        f"triggers missing or disabled ({', '.join(missing)}): changes may go unseen until"
        " a forced reload; `rule-sidecar db init` puts them back"
    )


def _identity(path: Path) -> tuple[int, int]:
    """Which file a path names now; raises `Unreadable` when none."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise Unreadable(f"the SQLite file {path} does not exist (deleted or moved away)") from None
    return info.st_dev, info.st_ino


class DatabaseSource:
    """A `RuleSource` over the rule tables of one database."""

    def __init__(
        self,
        url: str,
        *,
        password_file: Path | None = None,
        listen: bool = True,
        timeouts: DatabaseTimeouts = DatabaseTimeouts(),
        max_bytes: int = DEFAULT_FILE_LIMITS.max_bytes,
    ) -> None:
        self.url = DatabaseURL.parse(url)
        self._password_file = password_file
        self._timeouts = timeouts
        self._max_bytes = max_bytes
        self._address = _location(self.url)
        self._listen = listen and self.url.kind == "postgresql"
        self._generation: int | None = None
        self._stamps: dict[str, object] = {}
        self._files: dict[str, SourceFile] = {}
        self._refused: tuple[Problem, ...] = ()
        # Each ruleset's row_version as of the last read (the API's ETag of its content).
        self._row_versions: dict[str, int] = {}
        # Bumped by `forget` (from the event loop) so that a read running meanwhile in
        # a worker thread does not trust the generation it saw.
        self._epoch = 0
        # The one connection, used by one thread at a time: a read or the listener's.
        self._lock = threading.Lock()
        self._connection: Any = None
        self._listening = False  # the connection LISTENs (a new one does not)
        # Where `changes()` wants each notification's payload while it runs.
        self._heard: Callable[[str], None] | None = None
        self._file_identity: tuple[int, int] | None = None  # SQLite: the file it reads
        self._watch_problem: str | None = None
        self._trigger_problem: str | None = None
        self._on_standby = False

    @property
    def name(self) -> str:
        return self.url.redacted

    @property
    def timeouts(self) -> DatabaseTimeouts:
        return self._timeouts

    @property
    def max_bytes(self) -> int:
        """The most a ruleset's rows may hold (a rule file's limit)."""
        return self._max_bytes

    def open_writer(self) -> Any:
        """A connection of its own for one write (the source's one reads and listens),
        in a transaction until committed or rolled back."""
        return open_connection(self.url, password_file=self._password_file, timeouts=self._timeouts)

    def read(self) -> list[SourceFile]:
        """Every ruleset as a JSON document. Only the generation is read when it has not
        moved; when it has, only the rulesets whose `change_id` moved are read again.
        Raises `LoadError` naming the database when it cannot be read, or each ruleset
        that cannot be made a document (too large, a BLOB, JSON that is not)."""
        epoch = self._epoch
        try:
            with self._lock:
                changes = self._read_retried()
        except Exception as exc:  # every driver error means the same: not readable now
            reason = describe_error(exc, self._password(), self.url)
            message = f"database unavailable: {reason}"
            problem = Problem(file=self.name, message=message, code=ProblemCode.SOURCE_UNAVAILABLE)
            raise LoadError([problem]) from None
        if changes is not None:
            self._take(changes, current=epoch == self._epoch)
        if self._refused:
            raise LoadError(self._refused)
        return list(self._files.values())

    def _take(self, changes: _Changes, *, current: bool) -> None:
        """Keep what a read found. A refused ruleset keeps no change_id, so it is read
        again (and refused again, or taken) on every read until it is fixed."""
        refused = dict(changes.refused)
        files: dict[str, SourceFile] = {}
        for ruleset_id in sorted(changes.stamps):
            if ruleset_id in refused:
                continue
            try:
                files[ruleset_id] = self._file(ruleset_id, changes.documents.get(ruleset_id))
            except Exception as exc:  # whatever it is, it names its ruleset
                refused[ruleset_id] = Problem(
                    file=ruleset_file(self.name, ruleset_id),
                    message=f"ruleset {ruleset_id!r} could not be encoded as JSON:"
                    f" {type(exc).__name__}: {excerpt(str(exc))}",
                    ruleset_id=ruleset_id,
                    code=ProblemCode.READ_FAILED,
                )
        self._files = files
        self._row_versions = {i: v for i, v in changes.row_versions.items() if i in files}
        self._refused = (*refused.values(), *changes.orphans)
        self._generation = changes.generation if current else None
        self._stamps = (
            {i: s for i, s in changes.stamps.items() if i not in refused} if current else {}
        )

    def row_versions(self) -> dict[str, int]:
        """Each ruleset's row_version as of the last read that took its rows."""
        return dict(self._row_versions)

    def _file(self, ruleset_id: str, document: dict[str, Any] | None) -> SourceFile:
        """The ruleset's file: the same object as before when its content did not change,
        so the loader skips it without even hashing it."""
        previous = self._files.get(ruleset_id)
        if document is None and previous is not None:
            return previous
        file = ruleset_source_file(self.name, ruleset_id, document)
        if previous is not None and previous.content == file.content:
            return previous
        return file

    def _read_retried(self) -> _Changes | None:
        """`_read_changes`, once more on a fresh connection when the kept one had died
        since the last read; the connection is closed after a failure (under the lock)."""
        try:
            try:
                return self._read_changes()
            except Exception as exc:
                # Not after a timeout on a live connection, or a cut-off one: that would
                # double the wait; nor when the content is at fault: it would say the same.
                kept = self._connection
                if (
                    isinstance(exc, NoAnswer | Unreadable)
                    or kept is None
                    or not getattr(kept, "broken", True)
                ):
                    raise
                self._disconnect()
                return self._read_changes()
        except Exception:
            self._disconnect()
            raise

    def _read_changes(self) -> _Changes | None:
        """None when the generation has not moved; else what changed."""
        connection = self._connect()
        with _Deadline(connection, self._timeouts.read, self._address, "while reading"):
            changes = self._read_in_transaction(connection)
            if self._listening:  # idle, it shows as the listener it is again
                connection.execute(_LISTEN)
            return changes

    def _read_in_transaction(self, connection: Any) -> _Changes | None:
        # One consistent view: the generation, the change_ids and the rows belong together.
        if self.url.kind == "postgresql":
            connection.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        else:
            connection.execute("BEGIN")
        try:
            generation = _generation(connection)
            if generation == self._generation:
                return None
            if self._generation is None:  # a full read: check what the numbers rely on
                self._trigger_problem = _trigger_problem(connection, self.url.kind)
            try:
                return self._read_rows(connection, generation)
            except sqlite3.OperationalError as exc:
                if "decode to UTF-8" not in str(exc):
                    raise
            # Read again, slower, in the same transaction: each text value is decoded
            # here, so that the one that is not UTF-8 is reported at its rule.
            connection.text_factory = decode_text
            try:
                return self._read_rows(connection, generation)
            finally:
                connection.text_factory = str
        finally:
            connection.rollback()  # read-only: end the transaction, see new rows next time

    def _read_rows(self, connection: Any, generation: int) -> _Changes:
        """What changed since the last read (all of it after `forget`)."""
        stamps, refused, versions = self._read_stamps(connection)
        stale = [i for i, s in stamps.items() if self._stamps.get(i) != s]
        whole = len(stale) > len(stamps) // 2
        rulesets = _read_rulesets(connection, self.name, None if whole else stale, self._max_bytes)
        refused.update(rulesets.refused)
        orphans = _orphans(connection, self.name)
        return _Changes(generation, stamps, rulesets.documents, refused, orphans, versions)

    def _read_stamps(
        self, connection: Any
    ) -> tuple[dict[str, object], dict[str, Problem], dict[str, int]]:
        """Every ruleset's change_id (and row_version). A SQLite id that is not text, or
        is far too long to be one, is reported (never fetched whole): a ruleset cannot be
        left out unseen."""
        if self.url.kind == "postgresql":  # text, and bounded by its index
            rows = connection.execute(
                "SELECT id, change_id, row_version FROM rule_sidecar_rulesets"
            ).fetchall()
            return (
                {str(i): stamp for i, stamp, _ in rows},
                {},
                {str(i): int(version) for i, _, version in rows},
            )
        stamps: dict[str, object] = {}
        refused: dict[str, Problem] = {}
        versions: dict[str, int] = {}
        for ruleset_id, stamp, kind, size, rowid, version in connection.execute(
            f"SELECT CASE WHEN typeof(id) = 'text' AND length(CAST(id AS BLOB)) <= {_MAX_ID_BYTES}"
            " THEN id END, change_id, typeof(id), length(CAST(id AS BLOB)), rowid, row_version"
            " FROM rule_sidecar_rulesets"
        ):
            if isinstance(ruleset_id, str):
                stamps[ruleset_id] = stamp
                if isinstance(version, int):
                    versions[ruleset_id] = version
                continue
            key = f"\0rowid {rowid}"
            stamps[key] = stamp
            what = "text that is not UTF-8" if ruleset_id is not None else f"{kind}"
            refused[key] = Problem(
                file=self.name,
                message=f"the ruleset in row {rowid} has no usable id: its id is {what}"
                f" of {size or 0:,} bytes (an id is text of at most 63 characters)",
                code=ProblemCode.READ_FAILED,
            )
        return stamps, refused, versions

    def _connect(self) -> Any:
        """The source's one connection, opened on first need and after a failure. A
        SQLite file deleted or replaced (`mv`) under it is noticed: an open connection
        would go on reading the old file, unseen."""
        if self.url.kind == "sqlite":
            assert self.url.path is not None
            identity = _identity(self.url.path)
            if self._connection is not None and identity != self._file_identity:
                logger.warning(
                    "the SQLite file %s was replaced: reading the new one in full", self.url.path
                )
                self._disconnect()
                self._generation, self._stamps = None, {}
        if self._connection is None:
            self._connection = self._open()
        return self._connection

    def _open(self) -> Any:
        if self.url.kind == "postgresql":
            connection = open_connection(
                self.url, password_file=self._password_file, timeouts=self._timeouts
            )
            # Out of a transaction between statements: a read begins its own, and
            # notifications reach an idle session only.
            connection.autocommit = True
            connection.add_notify_handler(self._hear)
            return connection
        assert self.url.path is not None
        # The file the connection opened is the one the path named before and after
        # opening it (else it was replaced meanwhile: open again).
        for _ in range(3):
            before = _identity(self.url.path)
            connection = open_connection(self.url, timeouts=self._timeouts)
            if _identity(self.url.path) == before:
                self._file_identity = before
                return connection
            connection.close()
        raise Unreadable(f"the SQLite file {self.url.path} is being replaced over and over")

    def _disconnect(self) -> None:
        """Close the connection (under the lock). A listening one is shut down first:
        that wakes the listener's wait on its socket at once."""
        connection, self._connection = self._connection, None
        if connection is not None:
            if self._listening:
                _cutter(connection)()
            with contextlib.suppress(Exception):
                connection.close()
        self._listening = False

    def watch_problem(self) -> str | None:
        """The listener's problem, or triggers found missing or disabled by the last
        full read (then changes may move no number, and go unseen until a full read)."""
        return self._watch_problem or self._trigger_problem

    def _password(self) -> str | None:
        """The password to keep out of messages; none when its file cannot be read."""
        with contextlib.suppress(OSError, ValueError):
            return password_from(self._password_file)
        return None

    def forget(self) -> None:
        """Drop every fingerprint: the next read reads every row (a forced reload, the
        periodic verification, a reconnect). Triggers can be bypassed (`SET
        session_replication_role = replica`, `pg_restore --disable-triggers`, a dropped
        trigger): then neither the generation nor a change_id moves, and only this sees
        the change."""
        self._epoch += 1
        self._generation = None
        self._stamps = {}

    async def changes(self) -> AsyncIterator[str]:
        """PostgreSQL: each notification, and a resync after every (re)connect.
        SQLite has no notifications, nor has a hot standby (LISTEN is refused during
        recovery): there the periodic resync polls the generation."""
        if not self._listen:
            return
        backoff = 0.5
        while True:
            delay: float | None = None
            try:
                async for reason in self._notifications():
                    backoff = 0.5
                    yield reason
            except asyncio.CancelledError:
                raise
            except _OnStandby:
                if not self._on_standby:
                    logger.warning(
                        "%s is a hot standby (in recovery), where LISTEN is refused: its"
                        " changes are seen by the periodic resync (HOT_RELOAD_INTERVAL_SECONDS)"
                        " instead; checking every %g s whether it was promoted",
                        self.name,
                        _MAX_BACKOFF_S,
                    )
                self._on_standby, self._watch_problem = True, None
                delay = _MAX_BACKOFF_S
            except Exception as exc:
                reason = describe_error(exc, self._password(), self.url)
                self._watch_problem = f"not listening: {reason}"
                logger.warning("listening on %s failed: %s", self.name, reason)
            if delay is None:
                delay = backoff * (0.5 + random.random())
                backoff = min(backoff * 2, _MAX_BACKOFF_S)
            await asyncio.sleep(delay)

    async def _notifications(self) -> AsyncIterator[str]:
        """Notifications on the source's connection; ends when a failed read closed it.
        Raises `_OnStandby` on a hot standby, or what made the connection fail."""
        loop = asyncio.get_running_loop()
        heard: asyncio.Queue[str | Exception | None] = asyncio.Queue()

        def hear(payload: str) -> None:  # in whichever thread holds the connection
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody listens
                loop.call_soon_threadsafe(heard.put_nowait, payload)

        self._heard = hear  # before LISTEN: from then on, nothing is dropped
        try:
            connection = await in_daemon_thread(self._start_listening)
            if self._on_standby:
                logger.warning("%s was promoted: listening for changes again", self.name)
                self._on_standby = False
            # Whatever changed while we were not listening is unknown: resync in full.
            self.forget()
            self._watch_problem = None
            yield "listening"
            waiting = asyncio.create_task(self._keep_waiting(connection, heard))
            try:
                while (item := await heard.get()) is not None:
                    if isinstance(item, Exception):
                        raise item
                    yield f"notify: {item}"
            finally:
                waiting.cancel()
        finally:
            self._heard = None
            threading.Thread(target=self._unlisten, daemon=True).start()

    def _start_listening(self) -> Any:
        """LISTEN on the source's connection (opened if need be), and return it."""
        with self._lock:
            connection = self._connect()
            try:
                with _Deadline(connection, self._timeouts.read, self._address, "to LISTEN"):
                    if in_recovery(connection):
                        raise _OnStandby
                    connection.execute(_LISTEN)
            except _OnStandby:
                raise  # the connection serves the reads (polling)
            except Exception:
                self._disconnect()
                raise
            self._listening = True
            if self._heard is None:  # the listener stopped meanwhile: see `_unlisten`
                self._disconnect()
            return connection

    async def _keep_waiting(
        self, connection: Any, heard: asyncio.Queue[str | Exception | None]
    ) -> None:
        """`_wait` again and again; its end (None) or failure goes to the listener."""
        try:
            while await in_daemon_thread(functools.partial(self._wait, connection)):
                pass
        except Exception as exc:
            heard.put_nowait(exc)
        else:
            heard.put_nowait(None)

    def _wait(self, connection: Any) -> bool:
        """Wait until the server sends something, or for `read` seconds of silence
        (also what a dead or frozen server sends); then LISTEN again, which must be
        answered within `read` seconds or the connection is given up. psycopg reads
        whatever came meanwhile and hands each notification to `_hear`. False when the
        connection was closed under a read that failed (the caller listens anew)."""
        seconds = self._timeouts.read
        poller = poll()
        with contextlib.suppress(psycopg.Error):  # closed: no wait, the check below says so
            poller.register(connection.pgconn.socket, POLLIN)
            poller.poll(seconds * 1000)  # a read's own traffic wakes it too: harmless
        with self._lock:
            if connection is not self._connection:
                return False
            try:
                with _Deadline(connection, seconds, self._address, "to a heartbeat"):
                    connection.execute(_LISTEN)
            except Exception:
                self._disconnect()
                raise
            return True

    def _hear(self, notify: psycopg.Notify) -> None:
        """psycopg's handler of each notification, whichever query received it."""
        heard = self._heard
        if heard is not None:
            heard(notify.payload)

    def _unlisten(self) -> None:
        """After the listener stopped (monitoring stopped, or it failed): a connection
        that LISTENs with nobody to hear would pile notifications up. Closed, unless a
        new listener took it over meanwhile; the next read opens one."""
        with self._lock:
            if self._listening and self._heard is None:
                self._disconnect()


class _OnStandby(Exception):
    """The server is a hot standby: LISTEN would fail there until it is promoted."""


def in_recovery(connection: psycopg.Connection[Any]) -> bool:
    """Whether the server is a hot standby (replaying a primary's changes)."""
    row = connection.execute("SELECT pg_is_in_recovery()").fetchone()
    return bool(row is not None and row[0])


def describe_error(exc: BaseException, password: str | None, url: DatabaseURL) -> str:
    """A one-line reason that never repeats a password (drivers may quote the DSN)."""
    if isinstance(exc, NoAnswer | Unreadable):
        return str(exc)
    text = " ".join(str(exc).split()) or type(exc).__name__
    for secret in (password, urlsplit(url.url).password):
        if secret:
            text = text.replace(secret, "********")
    if "no such column" in text or ("column" in text and "does not exist" in text):  # older tables
        text += " (upgrade the tables with `rule-sidecar db init`)"
    elif "rule_sidecar_" in text and ("does not exist" in text or "no such table" in text):
        text += " (create the tables with `rule-sidecar db init`)"
    return f"{type(exc).__name__}: {text}"[:500]

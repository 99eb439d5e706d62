"""`rule-sidecar db init|import|export`: the only writes the sidecar makes to a database.

Import validates before it writes: the rulesets already in the database, with the
imported ones replacing those of the same id, must load as a whole (schema, compilation,
unique ids across rulesets, embedded tests), and then everything is written in one
transaction. A bad import changes nothing.

Imports are serialised (PostgreSQL: a transaction-scoped advisory lock; SQLite: `BEGIN
IMMEDIATE`), and what is validated is read inside that lock: two imports that each
validated what they read under READ COMMITTED both committed, an upsert moved a rule
between their rulesets, and no sidecar (nor any later import) would load the result.
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import Any, Final

import psycopg

from sidecar.documents import INT_MAX, INT_MIN, yaml_text
from sidecar.errors import LoadError, Problem, ProblemCode, format_path
from sidecar.loader import Loader
from sidecar.model import Location, RuleSet
from sidecar.rulefiles import DEFAULT_FILE_LIMITS, SourceFile
from sidecar.sources.database import DatabaseTimeouts, DatabaseURL, connect, read_documents
from sidecar.sources.dbschema import (
    JSON_COLUMNS,
    RULE_COLUMNS,
    RULESET_COLUMNS,
    RULESET_FIELDS,
    SCHEMA_VERSION,
    rule_field,
    ruleset_file,
    select,
    stored_version,
    upgrade,
    write_ruleset,
)
from sidecar.sources.files import read_rule_files

__all__ = [
    "IMPORT_LOCK",
    "ImportResult",
    "export_documents",
    "import_files",
    "init",
    "require_schema",
    "unstorable_in_postgresql",
]

# The PostgreSQL advisory lock every `db import` (and every write through the API,
# `sidecar.writes`) holds for its whole transaction
# ("ruleside" in ASCII: a key no other application is likely to pick).
IMPORT_LOCK: Final = 0x72756C6573696465


@dataclass(frozen=True, slots=True)
class ImportResult:
    rulesets: int
    rules: int


def init(url: str, *, password_file: Path | None = None) -> int:
    """Create or upgrade the tables and triggers (idempotent, in one transaction);
    returns the schema version."""
    database = DatabaseURL.parse(url)
    with connect(database, password_file=password_file, create=True) as connection:
        return upgrade(connection, database.kind)


def import_files(
    paths: Sequence[str | Path], url: str, *, password_file: Path | None = None
) -> ImportResult:
    """Validate the files together with what the database holds, then write them.

    Raises `LoadError` (nothing written) when the result would not load, or when the
    database would refuse or change a value.
    """
    database = DatabaseURL.parse(url)
    files = read_rule_files(paths)
    loader = Loader()  # one loader: the second load below does not re-check these files
    incoming = loader.load(files).snapshot
    if database.kind == "postgresql":
        refused = [p for r in incoming.rulesets.values() for p in unstorable_in_postgresql(r)]
        if refused:
            raise LoadError(refused)
    with _import_transaction(database, password_file) as connection:
        require_schema(connection, database)
        kept = [
            SourceFile(ruleset_file(database.redacted, ruleset_id), json.dumps(document).encode())
            for ruleset_id, document in _stored_documents(
                connection, database, incoming.rulesets.keys()
            ).items()
        ]
        loader.load([*kept, *files])  # the database as it will be, as a whole
        for ruleset in incoming.rulesets.values():
            write_ruleset(connection, database.kind, ruleset.to_document())
    return ImportResult(len(incoming.rulesets), len(incoming.rules))


def require_schema(connection: Any, database: DatabaseURL) -> None:
    """Rows are written only into tables of this sidecar's schema: written into older
    ones, they would say OK and then not load (`db init` upgrades them)."""
    version = stored_version(connection, database.kind)
    if version is None:
        found, fix = "no rule-sidecar schema version", "run `rule-sidecar db init` first"
    elif version < SCHEMA_VERSION:
        found, fix = f"tables of schema version {version}", "run `rule-sidecar db init` first"
    elif version > SCHEMA_VERSION:
        found, fix = f"tables of schema version {version}", "upgrade rule-sidecar"
    if version != SCHEMA_VERSION:
        message = (
            f"the database has {found}, and this sidecar writes version {SCHEMA_VERSION}: "
            f"{fix} (nothing was written)"
        )
        problem = Problem(
            file=database.redacted, message=message, code=ProblemCode.DATABASE_REFUSES
        )
        raise LoadError([problem])


@contextmanager
def _import_transaction(database: DatabaseURL, password_file: Path | None) -> Iterator[Any]:
    """One transaction that no other import runs beside: it waits for one that does
    (for the statement timeout at most), then commits on success or rolls back."""
    timeouts = DatabaseTimeouts()  # the wait for the lock is a statement's
    with ExitStack() as stack:
        try:
            connection = stack.enter_context(
                connect(database, password_file=password_file, write=True, timeouts=timeouts)
            )
            if database.kind == "postgresql":
                connection.execute("SELECT pg_advisory_xact_lock(%s)", (IMPORT_LOCK,))
        except (sqlite3.OperationalError, psycopg.errors.QueryCanceled) as exc:
            if isinstance(exc, sqlite3.Error) and exc.sqlite_errorcode != sqlite3.SQLITE_BUSY:
                raise  # not the lock: a read-only file, say
            raise TimeoutError(
                f"another writer held {database.redacted} for over {timeouts.statement:g} s"
                " (another `db import`?): nothing was imported, try again"
            ) from None
        yield connection


def unstorable_in_postgresql(ruleset: RuleSet) -> list[Problem]:
    """Values PostgreSQL refuses (NUL, in text and in JSONB) or gives back changed into
    what no sidecar loads (a double of 2^64 or more, which JSONB returns as an integer
    beyond 64 bits), located at their ruleset, rule and field."""
    problems: list[Problem] = []
    document = ruleset.to_document()
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(document, ())]
    while stack:
        value, path = stack.pop()
        if isinstance(value, Mapping):
            for key, item in value.items():
                stack.append((key, path))
                stack.append((item, (*path, key)))
            continue
        if isinstance(value, list):
            stack.extend((item, (*path, index)) for index, item in enumerate(value))
            continue
        if isinstance(value, str) and "\0" in value:
            message = "a NUL character (U+0000), which PostgreSQL cannot store"
        elif isinstance(value, float) and not INT_MIN <= value <= INT_MAX:
            message = (
                f"the number {value!r}: PostgreSQL gives it back as an integer beyond 64 bits,"
                " which no sidecar loads (write it as a string)"
            )
        else:
            continue
        rule = None
        if path[:2] == ("spec", "rules") and len(path) > 2 and isinstance(path[2], int):
            rule = ruleset.rules[path[2]]  # the document lists them in the same order
        where = (rule.location if rule else None) or ruleset.location or Location("<import>")
        problems.append(
            where.problem(
                (f"rule {rule.id!r}: " if rule else f"ruleset {ruleset.id!r}: ") + message,
                path=format_path(path),
                ruleset_id=ruleset.id,
                rule_id=rule.id if rule else None,
                code=ProblemCode.DATABASE_REFUSES,
            )
        )
    return sorted(problems, key=lambda p: (p.file, p.line, p.column, p.path))


def export_documents(url: str, *, password_file: Path | None = None) -> str:
    """Every ruleset of the database as YAML documents, ready for `validate` or `import`.

    Raises `LoadError` naming the ruleset, rule and field of a value nested deeper than
    any sidecar loads (exporting it would overflow the YAML writer's stack)."""
    database = DatabaseURL.parse(url)
    with connect(database, password_file=password_file) as connection:
        documents = _stored_documents(connection, database)
    return yaml_text(list(documents.values()))


def _stored_documents(
    connection: Any, database: DatabaseURL, replaced: Collection[str] = ()
) -> dict[str, dict[str, Any]]:
    """Every stored ruleset but those `replaced` as a document; `LoadError` for one with
    JSON nested deeper than a sidecar loads (deep enough, it overflows the JSON decoder's
    stack). A ruleset being replaced is not read: importing its fix repairs it."""
    problems = _too_deep(connection, database)
    if any(problem.ruleset_id not in replaced for problem in problems):
        raise LoadError(problem for problem in problems if problem.ruleset_id not in replaced)
    if not replaced:
        return read_documents(connection, name=database.redacted)[1]
    ids = [
        str(ruleset_id)
        for (ruleset_id,) in connection.execute("SELECT id FROM rule_sidecar_rulesets")
        if ruleset_id not in replaced
    ]
    return read_documents(connection, ids, name=database.redacted)[1]


_JSON_STRING: Final = re.compile(r'"(?:[^"\\]|\\.)*"')
_RULESET_JSON: Final[tuple[str, ...]] = tuple(c for c in RULESET_COLUMNS if c in JSON_COLUMNS)
_RULE_JSON: Final[tuple[str, ...]] = tuple(c for c in RULE_COLUMNS if c in JSON_COLUMNS)


def _depth(text: str) -> int:
    """How deep JSON text nests, without decoding it (no recursion: any depth)."""
    brackets = (1 if c in "[{" else -1 for c in _JSON_STRING.sub("", text) if c in "[]{}")
    return max(accumulate(brackets, initial=0))


def _too_deep(connection: Any, database: DatabaseURL) -> list[Problem]:
    """Each JSON column nested deeper than the loader's limit, by ruleset, rule and field.
    A cheap scan of text the database already holds: this keeps its stack at any depth."""
    limit = DEFAULT_FILE_LIMITS.max_depth
    problems: list[Problem] = []

    def check(ruleset_id: str, rule_id: str | None, path: tuple[str | int, ...], text: Any) -> None:
        if isinstance(text, str) and _depth(text) > limit - len(path):
            problems.append(
                Problem(
                    file=ruleset_file(database.redacted, ruleset_id),
                    path=format_path(path),
                    message=(f"rule {rule_id!r}: " if rule_id else "")
                    + f"JSON nested deeper than {limit} levels, which no sidecar loads",
                    ruleset_id=ruleset_id,
                    rule_id=rule_id,
                    code=ProblemCode.LIMIT_DEPTH,
                )
            )

    for ruleset_id, *texts in connection.execute(
        f"SELECT {select(('id', *_RULESET_JSON))} FROM rule_sidecar_rulesets ORDER BY id"
    ):
        for column, text in zip(_RULESET_JSON, texts, strict=True):
            check(ruleset_id, None, RULESET_FIELDS[column], text)
    index = 0
    previous = None
    for rule_id, ruleset_id, *texts in connection.execute(
        f"SELECT {select(('id', 'ruleset_id', *_RULE_JSON))} FROM rule_sidecar_rules"
        " ORDER BY ruleset_id, position, id"
    ):
        index = index + 1 if ruleset_id == previous else 0
        previous = ruleset_id
        for column, text in zip(_RULE_JSON, texts, strict=True):
            check(ruleset_id, rule_id, rule_field(index, column), text)
    return problems

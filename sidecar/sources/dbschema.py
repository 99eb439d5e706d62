"""The database table shape: the one place that knows the rule tables.

`rule_sidecar_rulesets` and `rule_sidecar_rules` carry every field of a
`rule-sidecar/v1` document, with a row version and `updated_at`; `rule_sidecar_state`
holds one `generation` number that triggers bump on every change, and they give a
ruleset a `change_id` never given before on every write to it or its rules;
`rule_sidecar_schema` holds the schema version. This module owns their DDL (tables,
triggers, sequence, version and upgrade), both mappings (a row to its document, used by
the database source and `db export`; a document to its rows, used by `db import`), the
name a stored ruleset's document goes by, and what differs between SQLite and
PostgreSQL. Connections, transactions and reading live in `sidecar.sources.database`.
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Sequence
from typing import Any, Final, Literal

from sidecar.model import API_VERSION, KIND

__all__ = [
    "CHANNEL",
    "JSON_COLUMNS",
    "RULESET_COLUMNS",
    "RULESET_FIELDS",
    "RULE_COLUMNS",
    "SCHEMA_VERSION",
    "Dialect",
    "NotUtf8",
    "RowFault",
    "decode_text",
    "dialect_of",
    "excerpt",
    "marks",
    "missing_triggers",
    "rule_document",
    "rule_field",
    "ruleset_document",
    "ruleset_file",
    "select",
    "stored_version",
    "upgrade",
    "write_ruleset",
]

SCHEMA_VERSION: Final = 3
# The channel the triggers notify on and the source listens to.
CHANNEL: Final = "rule_sidecar"

Dialect = Literal["sqlite", "postgresql"]


# Dialects


def dialect_of(connection: Any) -> Dialect:
    """Which database a DB-API connection talks to."""
    return "sqlite" if isinstance(connection, sqlite3.Connection) else "postgresql"


def marks(dialect: Dialect, count: int = 1) -> str:
    """`count` query parameter markers: sqlite3 `?`, psycopg `%s`."""
    return ", ".join(["?" if dialect == "sqlite" else "%s"] * count)


# DDL

_JSON = {"sqlite": "TEXT", "postgresql": "JSONB"}
_NOW = {"sqlite": "(strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))", "postgresql": "now()"}
_TIME = {"sqlite": "TEXT", "postgresql": "TIMESTAMPTZ"}
_TABLES: Final = ("rule_sidecar_rulesets", "rule_sidecar_rules")


_MODE_COLUMN: Final = "mode TEXT NOT NULL DEFAULT 'active'"


def _schema(dialect: Dialect) -> list[str]:
    json_type, now, time_type = _JSON[dialect], _NOW[dialect], _TIME[dialect]
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
            updated_at {time_type} NOT NULL DEFAULT {now},
            change_id BIGINT NOT NULL DEFAULT 0,
            challenger_of TEXT)""",
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
            updated_at {time_type} NOT NULL DEFAULT {now},
            {_MODE_COLUMN})""",
        "CREATE INDEX IF NOT EXISTS rule_sidecar_rules_by_ruleset"
        " ON rule_sidecar_rules (ruleset_id, position)",
    ]
    if dialect == "postgresql":
        # Schema 1 had no change_id (it trusted row_version, which a ruleset deleted and
        # inserted again repeats): its rows start at 0, and every write stamps anew.
        statements.append(
            "ALTER TABLE rule_sidecar_rulesets"
            " ADD COLUMN IF NOT EXISTS change_id BIGINT NOT NULL DEFAULT 0"
        )
        # Schema 2 had no rule modes (every rule it holds is active) and no challengers.
        statements.append(f"ALTER TABLE rule_sidecar_rules ADD COLUMN IF NOT EXISTS {_MODE_COLUMN}")
        statements.append(
            "ALTER TABLE rule_sidecar_rulesets ADD COLUMN IF NOT EXISTS challenger_of TEXT"
        )
    return statements


def _triggers(dialect: Dialect) -> list[str]:
    return _pg_triggers() if dialect == "postgresql" else _sqlite_triggers()


def _pg_triggers() -> list[str]:
    statements = [
        "CREATE SEQUENCE IF NOT EXISTS rule_sidecar_changes",
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
        # Every insert or update of a ruleset (its rules' changes update it too) takes a
        # number never given before, whatever the writer put there: the reader re-reads
        # a ruleset whose change_id is not the one it last read.
        """CREATE OR REPLACE FUNCTION rule_sidecar_stamp() RETURNS trigger
            LANGUAGE plpgsql AS $$
            BEGIN
                NEW.change_id := nextval('rule_sidecar_changes');
                RETURN NEW;
            END $$""",
        "DROP TRIGGER IF EXISTS rule_sidecar_rulesets_stamp ON rule_sidecar_rulesets",
        "CREATE TRIGGER rule_sidecar_rulesets_stamp BEFORE INSERT OR UPDATE"
        " ON rule_sidecar_rulesets FOR EACH ROW EXECUTE FUNCTION rule_sidecar_stamp()",
        # A ruleset is updated when one of its rules changes, so that its change_id moves.
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


# SQLite: the generation is bumped by every row change and never goes back, so its value
# right after a bump is a number never given before: that is a ruleset's change_id.
_SQLITE_BUMP: Final = "UPDATE rule_sidecar_state SET generation = generation + 1 WHERE id = 1;"
_SQLITE_STAMP: Final = "(SELECT generation FROM rule_sidecar_state WHERE id = 1)"
# The trigger's own stamping update (change_id set to the generation) fires no trigger.
_SQLITE_NOT_STAMPING: Final = (
    f"NOT (NEW.change_id IS NOT OLD.change_id AND NEW.change_id = {_SQLITE_STAMP})"
)


def _sqlite_triggers() -> list[str]:
    now = _NOW["sqlite"]
    # A rule's change updates its ruleset (whose change_id then moves) once: either the
    # writer moved row_version, or the rule's touch trigger does, in its own update.
    touch_ruleset = (
        f"UPDATE rule_sidecar_rulesets SET row_version = row_version + 1, updated_at = {now}"
        " WHERE id"
    )
    # SQLite has no BEFORE-UPDATE assignment: the row is updated after, which fires no
    # trigger again (recursive triggers are off by default). A writer that moves
    # row_version itself (optimistic locking) keeps its own value and time.
    touch = (
        "row_version = CASE WHEN NEW.row_version = OLD.row_version"
        " THEN OLD.row_version + 1 ELSE NEW.row_version END,"
        f" updated_at = CASE WHEN NEW.row_version = OLD.row_version THEN {now}"
        " ELSE NEW.updated_at END"
    )
    return [
        # Schema 1's triggers trusted row_version (and are all replaced): drop every one.
        *(
            f"DROP TRIGGER IF EXISTS {name}"
            for name in (
                "rule_sidecar_rules_ruleset_insert",
                "rule_sidecar_rules_ruleset_update",
                "rule_sidecar_rules_ruleset_delete",
                *(f"{t}_{e}" for t in _TABLES for e in ("insert", "update", "delete", "touch")),
            )
        ),
        "CREATE TRIGGER rule_sidecar_rulesets_insert AFTER INSERT ON rule_sidecar_rulesets"
        f" BEGIN {_SQLITE_BUMP} UPDATE rule_sidecar_rulesets SET change_id = {_SQLITE_STAMP}"
        " WHERE id = NEW.id; END",
        "CREATE TRIGGER rule_sidecar_rulesets_update AFTER UPDATE ON rule_sidecar_rulesets"
        f" WHEN {_SQLITE_NOT_STAMPING} BEGIN {_SQLITE_BUMP}"
        f" UPDATE rule_sidecar_rulesets SET change_id = {_SQLITE_STAMP}, {touch}"
        " WHERE id = NEW.id; END",
        "CREATE TRIGGER rule_sidecar_rulesets_delete AFTER DELETE ON rule_sidecar_rulesets"
        f" BEGIN {_SQLITE_BUMP} END",
        "CREATE TRIGGER rule_sidecar_rules_insert AFTER INSERT ON rule_sidecar_rules"
        f" BEGIN {_SQLITE_BUMP} {touch_ruleset} = NEW.ruleset_id; END",
        "CREATE TRIGGER rule_sidecar_rules_update AFTER UPDATE ON rule_sidecar_rules"
        f" BEGIN {_SQLITE_BUMP} END",
        "CREATE TRIGGER rule_sidecar_rules_touch AFTER UPDATE ON rule_sidecar_rules"
        " WHEN NEW.row_version = OLD.row_version BEGIN"
        f" UPDATE rule_sidecar_rules SET row_version = OLD.row_version + 1, updated_at = {now}"
        " WHERE id = NEW.id; END",
        # A rule moved to another ruleset touches both here, in the writer's own update:
        # the touch trigger's update sees the row already moved (OLD.ruleset_id is new).
        "CREATE TRIGGER rule_sidecar_rules_ruleset_update AFTER UPDATE ON rule_sidecar_rules"
        " WHEN NEW.row_version IS NOT OLD.row_version OR NEW.ruleset_id IS NOT OLD.ruleset_id"
        f" BEGIN {touch_ruleset} IN (OLD.ruleset_id, NEW.ruleset_id); END",
        "CREATE TRIGGER rule_sidecar_rules_delete AFTER DELETE ON rule_sidecar_rules"
        f" BEGIN {_SQLITE_BUMP} {touch_ruleset} = OLD.ruleset_id; END",
    ]


_DIALECTS: Final[tuple[Dialect, ...]] = ("sqlite", "postgresql")
_TRIGGERS: Final = {
    dialect: frozenset(re.findall(r"CREATE TRIGGER (\w+)", " ".join(_triggers(dialect))))
    for dialect in _DIALECTS
}


def missing_triggers(connection: Any, dialect: Dialect) -> list[str]:
    """The triggers `upgrade` creates that are missing or disabled, by name."""
    if dialect == "postgresql":
        rows = connection.execute(
            "SELECT tgname FROM pg_trigger WHERE NOT tgisinternal AND tgenabled <> 'D'"
            " AND tgrelid IN ('rule_sidecar_rulesets'::regclass, 'rule_sidecar_rules'::regclass)"
        )
    else:
        rows = connection.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'")
    return sorted(_TRIGGERS[dialect] - {name for (name,) in rows})


def stored_version(connection: Any, dialect: Dialect) -> int | None:
    """The schema version the tables were made or upgraded to (the highest, should the
    table hold more than one row); None: no tables, or no version in them."""
    if dialect == "postgresql":
        found = connection.execute("SELECT to_regclass('rule_sidecar_schema')").fetchone()
    else:
        found = connection.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'rule_sidecar_schema'"
        ).fetchone()
    if found is None or found[0] is None:
        return None
    row = connection.execute("SELECT max(version) FROM rule_sidecar_schema").fetchone()
    return None if row is None or row[0] is None else int(row[0])


def upgrade(connection: Any, dialect: Dialect) -> int:
    """Create or upgrade the tables and triggers (idempotent), in the caller's
    transaction; returns the schema version."""
    for statement in _schema(dialect):
        connection.execute(statement)
    row = connection.execute("SELECT version FROM rule_sidecar_schema").fetchone()
    if row is not None and row[0] > SCHEMA_VERSION:
        raise ValueError(
            f"the database schema is version {row[0]}, newer than this sidecar's"
            f" {SCHEMA_VERSION}: upgrade rule-sidecar"
        )
    if dialect == "sqlite":
        columns = {c[1] for c in connection.execute("PRAGMA table_info(rule_sidecar_rulesets)")}
        if "change_id" not in columns:  # schema 1 (see _schema)
            connection.execute(
                "ALTER TABLE rule_sidecar_rulesets ADD COLUMN change_id BIGINT NOT NULL DEFAULT 0"
            )
        if "challenger_of" not in columns:  # schemas 1 and 2
            connection.execute("ALTER TABLE rule_sidecar_rulesets ADD COLUMN challenger_of TEXT")
        columns = {c[1] for c in connection.execute("PRAGMA table_info(rule_sidecar_rules)")}
        if "mode" not in columns:  # schemas 1 and 2
            connection.execute(f"ALTER TABLE rule_sidecar_rules ADD COLUMN {_MODE_COLUMN}")
    for statement in _triggers(dialect):
        connection.execute(statement)
    mark = marks(dialect)
    if row is None:
        connection.execute(
            f"INSERT INTO rule_sidecar_schema (version) VALUES ({mark})", (SCHEMA_VERSION,)
        )
    elif row[0] < SCHEMA_VERSION:
        connection.execute(f"UPDATE rule_sidecar_schema SET version = {mark}", (SCHEMA_VERSION,))
    return SCHEMA_VERSION


# Rows → documents

# JSON columns are read as text on both databases (one decoding path, json's C decoder:
# much cheaper than the driver's per-value JSONB conversion).
RULESET_COLUMNS: Final = (
    "id",
    "name",
    "description",
    "labels",
    "decisions",
    "default_decision",
    "tests",
    "challenger_of",
)
RULE_COLUMNS: Final = (
    "id",
    "ruleset_id",
    "name",
    "description",
    "condition",
    "points",
    "enabled",
    "priority",
    "tags",
    "metadata",
    "mode",
)
JSON_COLUMNS: Final = frozenset({"labels", "decisions", "tests", "tags", "metadata"})
# Where each ruleset column's value goes in its document (a rule's: `rule_field`).
RULESET_FIELDS: Final[dict[str, tuple[str, ...]]] = {
    "id": ("metadata", "id"),
    "name": ("metadata", "name"),
    "description": ("metadata", "description"),
    "labels": ("metadata", "labels"),
    "decisions": ("spec", "decisions"),
    "default_decision": ("spec", "default_decision"),
    "tests": ("spec", "tests"),
    "challenger_of": ("spec", "challenger_of"),
}
_EXCERPT_CHARS: Final = 200


def rule_field(index: int, column: str) -> tuple[str | int, ...]:
    """Where a rule column's value goes in its ruleset's document."""
    return ("spec", "rules", index, column)


def ruleset_file(name: str, ruleset_id: str) -> str:
    """The name a stored ruleset's document goes by (`name` is the database's, redacted):
    in problems, the API's `source.file`, and `db import`'s messages alike."""
    return f"{name}#rulesets/{ruleset_id}.json"


def select(columns: Sequence[str]) -> str:
    """The SELECT list for `columns`, each JSON column as its text."""
    return ", ".join(f"CAST({c} AS TEXT)" if c in JSON_COLUMNS else c for c in columns)


def excerpt(text: str) -> str:
    """A value for a message: whole when short, else its first 200 characters and its
    size. A message is sent to every WebSocket client and kept in history: never
    megabytes of somebody's column."""
    if len(text) <= _EXCERPT_CHARS:
        return repr(text)
    return f"{text[:_EXCERPT_CHARS]!r}… ({len(text):,} characters in all)"


class RowFault(Exception):
    """A value no document can hold: its column and the cause, in words."""

    def __init__(self, column: str, cause: str) -> None:
        super().__init__(cause)
        self.column = column
        self.cause = cause


class NotUtf8(bytes):
    """SQLite text that does not decode as UTF-8 (C clients write any bytes as text)."""


def decode_text(data: bytes) -> str | NotUtf8:
    """A SQLite text value (a `text_factory`), or what it holds when that is not UTF-8:
    the driver's own decoding fails the whole query, naming neither ruleset nor rule."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return NotUtf8(data)


def _text_only(columns: Sequence[str], row: tuple[Any, ...]) -> None:
    """SQLite keeps whatever a client binds: Python `bytes` become a BLOB, which no JSON
    document holds, and text may be any bytes."""
    for column, value in zip(columns, row, strict=True):
        if isinstance(value, NotUtf8):
            raise RowFault(column, f"holds {len(value):,} bytes of text that is not UTF-8")
        if isinstance(value, bytes):
            raise RowFault(column, f"holds a BLOB of {len(value):,} bytes where text is expected")


def _json(column: str, value: Any) -> Any:
    """A JSON column's text, decoded."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError as exc:
        raise RowFault(column, f"is not JSON ({exc}): it holds {excerpt(value)}") from None
    except RecursionError:
        raise RowFault(column, "nests JSON deeper than can be read") from None


def _boolean(value: Any) -> Any:
    """SQLite stores booleans as 0/1; anything else (`'false'`) goes to the schema."""
    if isinstance(value, int) and not isinstance(value, bool) and value in (0, 1):
        return bool(value)
    return value


def rule_document(row: tuple[Any, ...]) -> dict[str, Any]:
    """A rule's document from its row (`select(RULE_COLUMNS)`); `RowFault` for a value
    no document holds."""
    _text_only(RULE_COLUMNS, row)
    rule_id, _, name, description, condition, points, enabled, priority, tags, metadata, mode = row
    document: dict[str, Any] = {"id": rule_id}
    if name is not None:
        document["name"] = name
    document.update(
        description=description,
        condition=condition,
        points=points,
        enabled=_boolean(enabled),
        priority=priority,
        tags=_json("tags", tags),
        metadata=_json("metadata", metadata),
    )
    if mode in _STORED_SHADOW:  # its `enabled` column is false for older sidecars' sake
        document.update(enabled=_STORED_SHADOW[mode], mode="shadow")
    elif mode != "active":  # the column's default; anything else goes to the schema
        document["mode"] = mode
    return document


# How a shadow rule is stored: `enabled` false, so that a sidecar older than schema 3 (it
# reads no `mode`) never counts a rule on trial, and its own enabled flag in `mode`.
_STORED_SHADOW: Final = {"shadow": True, "shadow-disabled": False}


def _rule_row(ruleset_id: str, position: int, rule: dict[str, Any]) -> tuple[Any, ...]:
    """A rule's row, in `write_ruleset`'s column order (a shadow rule: `_STORED_SHADOW`)."""
    enabled, mode = rule.get("enabled", True), "active"
    if rule.get("mode", "active") != "active":
        enabled, mode = False, "shadow" if enabled else "shadow-disabled"
    return (
        rule["id"],
        ruleset_id,
        position,
        rule.get("name"),
        rule.get("description", ""),
        rule["condition"],
        rule["points"],
        enabled,
        rule.get("priority", 0),
        json.dumps(rule.get("tags", [])),
        json.dumps(rule.get("metadata", {})),
        mode,
    )


def ruleset_document(row: tuple[Any, ...], rules: list[dict[str, Any]]) -> dict[str, Any]:
    """A ruleset's document from its row (`select(RULESET_COLUMNS)`) and its rules'
    documents in order; `RowFault` for a value no document holds."""
    _text_only(RULESET_COLUMNS, row)
    ruleset_id, name, description, labels, decisions, default_decision, tests, challenger = row
    metadata: dict[str, Any] = {"id": ruleset_id}
    if name is not None:
        metadata["name"] = name
    metadata.update(description=description, labels=_json("labels", labels))
    spec: dict[str, Any] = {"rules": rules}
    # Only the columns' default, an empty list, means "none": anything else that is not
    # a list (`null`, `{}`, `false`, `0`) goes to the schema, which refuses it by name,
    # instead of silently taking away every decision band or embedded test.
    if (decisions := _json("decisions", decisions)) != []:
        spec["decisions"] = decisions
    if default_decision is not None:
        spec["default_decision"] = default_decision
    if (tests := _json("tests", tests)) != []:
        spec["tests"] = tests
    if challenger is not None:
        spec["challenger_of"] = challenger
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": metadata, "spec": spec}


# Documents → rows

# SQLite takes at most 32,766 parameters per statement; 12 per rule.
_ROWS_PER_STATEMENT: Final = 1_000


def write_ruleset(connection: Any, dialect: Dialect, document: dict[str, Any]) -> None:
    """Insert or update a ruleset and its rules from its document, and delete its rules
    the document no longer lists, in the caller's transaction."""
    p = marks(dialect)
    metadata, spec = document["metadata"], document["spec"]
    ruleset_id = metadata["id"]
    connection.execute(
        f"""INSERT INTO rule_sidecar_rulesets
            (id, name, description, labels, decisions, default_decision, tests, challenger_of)
            VALUES ({marks(dialect, 8)})
            ON CONFLICT (id) DO UPDATE SET name = excluded.name,
                description = excluded.description, labels = excluded.labels,
                decisions = excluded.decisions, default_decision = excluded.default_decision,
                tests = excluded.tests, challenger_of = excluded.challenger_of""",
        (
            ruleset_id,
            metadata.get("name"),
            metadata.get("description", ""),
            json.dumps(metadata.get("labels", {})),
            json.dumps(spec.get("decisions", [])),
            spec.get("default_decision"),
            json.dumps(spec.get("tests", [])),
            None if spec.get("challenger_of") is None else str(spec["challenger_of"]),
        ),
    )
    rows = [_rule_row(ruleset_id, position, rule) for position, rule in enumerate(spec["rules"])]
    # Many rows per statement: PostgreSQL's statement trigger then bumps the generation
    # once per batch, not once per rule (each bump leaves a row version behind).
    values = f"({marks(dialect, 12)})"
    for start in range(0, len(rows), _ROWS_PER_STATEMENT):
        batch = rows[start : start + _ROWS_PER_STATEMENT]
        connection.execute(
            f"""INSERT INTO rule_sidecar_rules
                (id, ruleset_id, position, name, description, condition, points, enabled,
                 priority, tags, metadata, mode)
                VALUES {", ".join([values] * len(batch))}
                ON CONFLICT (id) DO UPDATE SET ruleset_id = excluded.ruleset_id,
                    position = excluded.position, name = excluded.name,
                    description = excluded.description, condition = excluded.condition,
                    points = excluded.points, enabled = excluded.enabled,
                    priority = excluded.priority, tags = excluded.tags,
                    metadata = excluded.metadata, mode = excluded.mode""",
            [value for row in batch for value in row],
        )
    rule_ids = {row[0] for row in rows}
    stale = connection.execute(
        f"SELECT id FROM rule_sidecar_rules WHERE ruleset_id = {p}", (ruleset_id,)
    ).fetchall()
    for (rule_id,) in stale:
        if rule_id not in rule_ids:
            connection.execute(f"DELETE FROM rule_sidecar_rules WHERE id = {p}", (rule_id,))

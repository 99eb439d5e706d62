"""`rule-sidecar db init|import|export`: the only writes the sidecar makes to a database.

Import validates before it writes: the rulesets already in the database, with the
imported ones replacing those of the same id, must load as a whole (schema, compilation,
unique ids across rulesets, embedded tests), and then everything is written in one
transaction. A bad import changes nothing.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from sidecar.documents import SourceFile
from sidecar.loader import Loader
from sidecar.sources.database import (
    DatabaseURL,
    connect,
    migrate,
    placeholder,
    read_documents,
)
from sidecar.sources.files import read_rule_files

__all__ = ["ImportResult", "export_documents", "import_files", "init"]

# SQLite takes at most 32,766 parameters per statement; 11 per rule.
_ROWS_PER_STATEMENT = 1_000


@dataclass(frozen=True, slots=True)
class ImportResult:
    rulesets: int
    rules: int


def init(url: str, *, password_file: Path | None = None) -> int:
    """Create or upgrade the tables; returns the schema version."""
    return migrate(DatabaseURL.parse(url), password_file=password_file)


def import_files(
    paths: Sequence[str | Path], url: str, *, password_file: Path | None = None
) -> ImportResult:
    """Validate the files together with what the database holds, then write them.

    Raises `LoadError` (nothing written) when the result would not load.
    """
    database = DatabaseURL.parse(url)
    files = read_rule_files(paths)
    loader = Loader()  # one loader: the second load below does not re-check these files
    incoming = loader.load(files).snapshot
    with connect(database, password_file=password_file) as connection:
        _, stored = read_documents(connection)
        kept = [
            SourceFile(
                f"{database.redacted}#rulesets/{ruleset_id}.json", json.dumps(document).encode()
            )
            for ruleset_id, document in stored.items()
            if ruleset_id not in incoming.rulesets
        ]
        loader.load([*kept, *files])  # the database as it will be, as a whole
        for ruleset in incoming.rulesets.values():
            _write_ruleset(connection, database, ruleset.to_document())
    return ImportResult(len(incoming.rulesets), len(incoming.rules))


def _write_ruleset(connection: Any, database: DatabaseURL, document: dict[str, Any]) -> None:
    p = placeholder(database)
    metadata, spec = document["metadata"], document["spec"]
    ruleset_id = metadata["id"]
    connection.execute(
        f"""INSERT INTO rule_sidecar_rulesets
            (id, name, description, labels, decisions, default_decision, tests)
            VALUES ({p}, {p}, {p}, {p}, {p}, {p}, {p})
            ON CONFLICT (id) DO UPDATE SET name = excluded.name,
                description = excluded.description, labels = excluded.labels,
                decisions = excluded.decisions, default_decision = excluded.default_decision,
                tests = excluded.tests""",
        (
            ruleset_id,
            metadata.get("name"),
            metadata.get("description", ""),
            json.dumps(metadata.get("labels", {})),
            json.dumps(spec.get("decisions", [])),
            spec.get("default_decision"),
            json.dumps(spec.get("tests", [])),
        ),
    )
    rows = [
        (
            rule["id"],
            ruleset_id,
            position,
            rule.get("name"),
            rule.get("description", ""),
            rule["condition"],
            rule["points"],
            rule.get("enabled", True),
            rule.get("priority", 0),
            json.dumps(rule.get("tags", [])),
            json.dumps(rule.get("metadata", {})),
        )
        for position, rule in enumerate(spec["rules"])
    ]
    # Many rows per statement: PostgreSQL's statement trigger then bumps the generation
    # once per batch, not once per rule (each bump leaves a row version behind).
    values = "(" + ", ".join([p] * 11) + ")"
    for start in range(0, len(rows), _ROWS_PER_STATEMENT):
        batch = rows[start : start + _ROWS_PER_STATEMENT]
        connection.execute(
            f"""INSERT INTO rule_sidecar_rules
                (id, ruleset_id, position, name, description, condition, points, enabled,
                 priority, tags, metadata)
                VALUES {", ".join([values] * len(batch))}
                ON CONFLICT (id) DO UPDATE SET ruleset_id = excluded.ruleset_id,
                    position = excluded.position, name = excluded.name,
                    description = excluded.description, condition = excluded.condition,
                    points = excluded.points, enabled = excluded.enabled,
                    priority = excluded.priority, tags = excluded.tags,
                    metadata = excluded.metadata""",
            [value for row in batch for value in row],
        )
    rule_ids = {row[0] for row in rows}
    stale = connection.execute(
        f"SELECT id FROM rule_sidecar_rules WHERE ruleset_id = {p}", (ruleset_id,)
    ).fetchall()
    for (rule_id,) in stale:
        if rule_id not in rule_ids:
            connection.execute(f"DELETE FROM rule_sidecar_rules WHERE id = {p}", (rule_id,))


def export_documents(url: str, *, password_file: Path | None = None) -> str:
    """Every ruleset of the database as YAML documents, ready for `validate` or `import`."""
    database = DatabaseURL.parse(url)
    with connect(database, password_file=password_file) as connection:
        _, documents = read_documents(connection)
    return yaml.safe_dump_all(
        documents.values(), sort_keys=False, allow_unicode=True, default_flow_style=False
    )

"""`rule-sidecar db init|import|export` as a real process, on real SQLite and PostgreSQL."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.register_assert_rewrite("db_support", "server_support")

from db_support import Database, pg_url_for, require_postgresql  # noqa: E402
from server_support import fraud_doc, ruleset_doc, to_yaml  # noqa: E402

from sidecar.loader import Loader  # noqa: E402
from sidecar.sources.database import SCHEMA_VERSION  # noqa: E402
from sidecar.sources.files import read_rule_files  # noqa: E402

pytest_plugins = ["db_support"]

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "rules"
PROBLEM_LINE = re.compile(r"^(?P<file>.+?):(?P<line>\d+):(?P<column>\d+): (?P<message>.+)$")
SECRET = "s3cret-pw"
BAD_CONDITION = (
    "apiVersion: rule-sidecar/v1\n"
    "kind: RuleSet\n"
    "metadata: {id: broken}\n"
    "spec:\n"
    "  rules:\n"
    "    - id: broken-rule\n"
    "      condition: input.amount >\n"
    "      points: 40\n"
)


def db(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    """`rule-sidecar db ...` as a real process, with no database settings inherited."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("RULE_SIDECAR_DATABASE_URL", "RULE_SIDECAR_DATABASE_PASSWORD_FILE")
    }
    return subprocess.run(
        [sys.executable, "-m", "sidecar.cli", "db", *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        check=False,
    )


def revision_of(*paths: Path) -> str:
    """The snapshot revision these rule files load to."""
    return Loader().load(read_rule_files(paths)).snapshot.revision


def problem_lines(output: str) -> list[re.Match[str]]:
    return [match for line in output.splitlines() if (match := PROBLEM_LINE.match(line))]


class TestInit:
    """`db init` creates the tables once and can be run again safely."""

    def test_init_twice_is_idempotent(self, database: Database):
        """Two runs exit 0, leave the same tables, one schema row and one generation row."""
        first = db("init", "--database-url", database.url)
        assert first.returncode == 0, first.stderr
        assert f"schema version {SCHEMA_VERSION}" in first.stdout
        tables = database.tables()
        assert {"rule_sidecar_rules", "rule_sidecar_rulesets", "rule_sidecar_schema"} <= set(tables)
        generation = database.generation()

        second = db("init", "--database-url", database.url)
        assert second.returncode == 0, second.stderr
        assert database.tables() == tables
        assert database.execute("SELECT version FROM rule_sidecar_schema") == [(SCHEMA_VERSION,)]
        assert database.generation() == generation

    def test_init_keeps_existing_rules(self, migrated: Database):
        """Running `db init` over a database with rules leaves the rules as they were."""
        migrated.import_docs(fraud_doc())
        before = migrated.dump()
        result = db("init", "--database-url", migrated.url)
        assert result.returncode == 0, result.stderr
        assert migrated.dump() == before

    def test_url_password_is_masked_in_the_output(self, pg_database: Database):
        """A password written in the URL is printed as ********, never in clear."""
        url = pg_url_for(pg_database.name, password=SECRET)
        result = db("init", "--database-url", url)
        assert result.returncode == 0, result.stderr
        assert "postgres:********@" in result.stdout
        assert SECRET not in result.stdout + result.stderr

    def test_password_file_is_accepted(self, pg_database: Database, tmp_path: Path):
        """`--database-password-file` is read and used; the password is never printed."""
        secret = tmp_path / "password"
        secret.write_text(f"{SECRET}\n", encoding="utf-8")
        result = db("init", "--database-url", pg_database.url, "--database-password-file", secret)
        assert result.returncode == 0, result.stderr
        assert SECRET not in result.stdout + result.stderr
        assert "rule_sidecar_rules" in pg_database.tables()


class TestImportExport:
    """`db import` validates everything first and writes all or nothing; export round-trips."""

    def test_import_then_export_round_trips(self, migrated: Database, tmp_path: Path):
        """Examples imported then exported load to the revision of the files themselves."""
        imported = db("import", EXAMPLES, "--database-url", migrated.url)
        assert imported.returncode == 0, imported.stderr
        assert "imported 3 ruleset(s), 44 rule(s)" in imported.stdout
        assert len(migrated.rules()) == 44

        exported = tmp_path / "exported.yaml"
        written = db("export", "--database-url", migrated.url, "--output", exported)
        assert written.returncode == 0, written.stderr
        assert revision_of(exported) == revision_of(EXAMPLES)
        ids = [doc["metadata"]["id"] for doc in yaml.safe_load_all(exported.read_text("utf-8"))]
        assert ids == ["content-moderation", "loan-prequalification", "payment-fraud"]

        printed = db("export", "--database-url", migrated.url)
        assert printed.returncode == 0, printed.stderr
        assert printed.stdout == exported.read_text("utf-8")

    def test_import_with_one_bad_file_writes_nothing(self, migrated: Database, tmp_path: Path):
        """A good file next to a bad one: exit 1, `file:line:col:` problems, rows unchanged."""
        migrated.import_docs(fraud_doc())
        before = migrated.dump()
        good = tmp_path / "good.yaml"
        good.write_text(to_yaml(fraud_doc(60), ruleset_doc("extra")), encoding="utf-8")
        bad = tmp_path / "bad.yaml"
        bad.write_text(BAD_CONDITION, encoding="utf-8")

        result = db("import", good, bad, "--database-url", migrated.url)
        assert result.returncode == 1, result.stdout + result.stderr
        problems = problem_lines(result.stdout)
        assert problems, result.stdout
        assert problems[0]["file"] == str(bad)
        assert problems[0]["line"] == "7"
        assert "condition does not compile" in problems[0]["message"]
        assert "nothing was imported" in result.stdout
        assert migrated.dump() == before

    def test_import_colliding_with_another_ruleset_writes_nothing(
        self, migrated: Database, tmp_path: Path
    ):
        """A rule id already used by another ruleset in the database: exit 1, rows unchanged."""
        migrated.import_docs(fraud_doc())
        before = migrated.dump()
        clash = tmp_path / "clash.yaml"
        clash.write_text(
            to_yaml(
                ruleset_doc("other", [{"id": "large-amount", "condition": "true", "points": 1}])
            ),
            encoding="utf-8",
        )

        result = db("import", clash, "--database-url", migrated.url)
        assert result.returncode == 1, result.stdout + result.stderr
        problems = problem_lines(result.stdout)
        assert problems, result.stdout
        text = "\n".join(match.group(0) for match in problems)
        assert "large-amount" in text
        assert "fraud" in text
        assert str(clash) in text
        assert migrated.dump() == before

    def test_import_of_a_changed_ruleset_replaces_its_rules(
        self, migrated: Database, tmp_path: Path
    ):
        """A rule gone from the file is deleted; a changed one gets a new version and time."""
        migrated.import_docs(fraud_doc())
        assert set(migrated.rules()) == {"large-amount", "foreign-country", "never-on"}
        # Put updated_at in the past (without the triggers resetting it) so a new one shows.
        if migrated.is_postgresql:
            migrated.change_unseen("UPDATE rule_sidecar_rules SET updated_at = '2001-01-01'")
        else:
            migrated.execute(
                "UPDATE rule_sidecar_rules SET updated_at = '2001-01-01 00:00:00',"
                " row_version = row_version + 1"
            )
        before = migrated.rules()["large-amount"]

        changed = tmp_path / "fraud.yaml"
        changed.write_text(to_yaml(fraud_doc(60, disabled_rule=False)), encoding="utf-8")
        result = db("import", changed, "--database-url", migrated.url)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "imported 1 ruleset(s), 2 rule(s)" in result.stdout

        after = migrated.rules()
        assert set(after) == {"large-amount", "foreign-country"}
        assert after["large-amount"]["points"] == 60
        assert after["large-amount"]["row_version"] > before["row_version"]
        assert str(after["large-amount"]["updated_at"]) > str(before["updated_at"])
        assert after["foreign-country"]["points"] == 30


class TestUsageAndFailures:
    """Usage errors exit 2; a database that cannot be reached exits 1 with one line."""

    def test_missing_database_url_exits_2(self, tmp_path: Path):
        """No --database-url and no environment variable: exit 2, saying what is needed."""
        result = db("init")
        assert result.returncode == 2
        assert "--database-url" in result.stderr
        assert "RULE_SIDECAR_DATABASE_URL" in result.stderr

    def test_unknown_scheme_exits_2(self):
        """`mysql://` is refused as a usage error naming the supported schemes."""
        result = db("export", "--database-url", "mysql://root@127.0.0.1/rules")
        assert result.returncode == 2
        assert "unsupported database URL scheme 'mysql'" in result.stderr
        assert "sqlite or postgresql" in result.stderr

    @pytest.mark.parametrize("action", ["init", "import", "export"])
    def test_unreachable_postgresql_exits_1_with_one_line(self, action: str):
        """A closed port: exit 1 and a single `rule-sidecar:` line without the password."""
        url = pg_url_for("rules", password=SECRET, port=1)
        paths = [str(EXAMPLES)] if action == "import" else []
        result = db(action, *paths, "--database-url", url)
        assert result.returncode == 1, result.stdout + result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith("rule-sidecar: OperationalError:")
        assert "Traceback" not in result.stderr
        assert SECRET not in result.stdout + result.stderr

    def test_error_line_never_shows_the_password(self):
        """A password with a bare `%` (libpq quotes the bad token): the error line masks it."""
        url = "postgresql://postgres:50%off-pw@127.0.0.1:1/rules"
        result = db("init", "--database-url", url)
        assert result.returncode == 1
        assert result.stderr.startswith("rule-sidecar: ")
        assert "50%off-pw" not in result.stdout + result.stderr

    def test_wrong_database_name_exits_1(self):
        """A database that does not exist on a live server: exit 1 naming it."""
        require_postgresql()
        result = db("export", "--database-url", pg_url_for("rs_t_no_such_database"))
        assert result.returncode == 1
        assert "rs_t_no_such_database" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1

    def test_missing_password_file_exits_1(self, pg_database: Database, tmp_path: Path):
        """A password file that does not exist is reported, not ignored."""
        missing = tmp_path / "no-such-password"
        result = db("init", "--database-url", pg_database.url, "--database-password-file", missing)
        assert result.returncode == 1
        assert str(missing) in result.stderr
        assert pg_database.tables() == []

    def test_export_never_creates_a_sqlite_file(self, sqlite_database: Database):
        """Exporting from a SQLite path that does not exist fails and creates nothing."""
        result = db("export", "--database-url", sqlite_database.url)
        assert result.returncode == 1
        assert result.stderr.startswith("rule-sidecar: ")
        assert not Path(sqlite_database.name).exists()

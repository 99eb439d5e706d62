"""Tests of the `rule-sidecar validate` and `rule-sidecar test` commands."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FIXTURES, dump_yaml, make_ruleset_doc, write_rules

from sidecar.cli import main

GOOD = str(FIXTURES / "good.yaml")
PROBLEM_LINE_RE = re.compile(r"^(?P<file>.+?):(?P<line>\d+):(?P<column>\d+): (?P<message>.+)$")


def run(*argv: str) -> tuple[int, str]:
    """Run the command in-process; its exit code and what it printed."""
    out = io.StringIO()
    code = main(list(argv), out=out)
    return code, out.getvalue()


def command() -> list[str]:
    """The installed console script, or the module when it is not on PATH."""
    script = shutil.which("rule-sidecar")
    if script is None:
        candidate = Path(sys.executable).with_name("rule-sidecar")
        script = str(candidate) if candidate.exists() else None
    return [script] if script else [sys.executable, "-m", "sidecar.cli"]


def run_process(*argv: str) -> subprocess.CompletedProcess[str]:
    """Run the command as a real process."""
    return subprocess.run(
        [*command(), *argv], capture_output=True, text=True, timeout=60, check=False
    )


def failing_test_file(directory: Path) -> Path:
    """A valid ruleset with one passing and one failing embedded test."""
    doc = make_ruleset_doc(
        "demo",
        [{"id": "big", "condition": "input.amount > 100", "points": 10}],
        tests=[
            {"name": "big passes", "input": {"amount": 500}, "expect": {"total_points": 10}},
            {"name": "small fails", "input": {"amount": 5}, "expect": {"matched": ["big"]}},
        ],
    )
    return write_rules(directory, "rules.yaml", dump_yaml(doc))


class TestValidate:
    """`validate` accepts exactly what the sidecar would load, and says why not."""

    def test_valid_file_exits_0_with_a_summary(self):
        """A good file gives exit 0 and one OK line with counts and the revision."""
        code, output = run("validate", GOOD)

        assert code == 0
        assert re.fullmatch(
            r"OK: 2 ruleset\(s\), 4 rule\(s\) in 1 file\(s\); revision [0-9a-f]{16}\n", output
        )

    def test_directory_counts_every_file(self, rules_dir: Path):
        """A directory of two files is summarised as two files."""
        write_rules(rules_dir, "a.yaml", dump_yaml(make_ruleset_doc("one")))
        write_rules(rules_dir, "b.json", json.dumps(make_ruleset_doc("two")))

        code, output = run("validate", str(rules_dir))

        assert code == 0
        assert "2 ruleset(s), 2 rule(s) in 2 file(s)" in output

    def test_invalid_file_exits_1_with_located_problems(self):
        """Each problem is a `file:line:col: message` line, then a count."""
        path = str(FIXTURES / "misspelt-field.bad.yaml")

        code, output = run("validate", path)

        lines = output.splitlines()
        assert code == 1
        assert lines[-1] == "2 problem(s) found"
        parsed = [PROBLEM_LINE_RE.match(line) for line in lines[:-1]]
        assert all(parsed)
        assert {(m["file"], m["line"], m["column"]) for m in parsed if m} == {
            (path, "8", "7"),
            (path, "9", "7"),
        }
        assert "unknown field 'conditon' (did you mean 'condition'?)" in output

    def test_json_format_on_invalid_file(self):
        """`--format json` prints one JSON object with located problems."""
        path = str(FIXTURES / "points-range.bad.yaml")

        code, output = run("validate", "--format", "json", path)

        report = json.loads(output)
        assert code == 1
        assert report["valid"] is False
        (problem,) = report["problems"]
        assert problem["file"] == path
        assert (problem["line"], problem["column"]) == (10, 15)
        assert problem["path"] == "$.spec.rules[0].points"
        assert "greater than the maximum" in problem["message"]

    def test_json_format_on_valid_file(self):
        """A valid file gives `valid: true`, no problems and the counts."""
        code, output = run("validate", "--format", "json", GOOD)

        report = json.loads(output)
        assert code == 0
        assert report["valid"] is True
        assert report["problems"] == []
        assert (report["files"], report["rulesets"], report["rules"]) == (1, 2, 4)
        assert re.fullmatch(r"[0-9a-f]{16}", report["revision"])

    def test_no_checks_accepts_a_failing_embedded_test(self):
        """`--no-checks` skips embedded tests; without it the same file is refused."""
        path = str(FIXTURES / "failing-test.bad.yaml")

        checked, _ = run("validate", path)
        unchecked, output = run("validate", "--no-checks", path)

        assert (checked, unchecked) == (1, 0)
        assert output.startswith("OK: 1 ruleset(s)")

    def test_no_checks_still_refuses_a_condition_that_does_not_compile(self):
        """`--no-checks` never skips compilation."""
        code, output = run("validate", "--no-checks", str(FIXTURES / "non-boolean.bad.yaml"))

        assert code == 1
        assert "must be a boolean expression" in output

    def test_missing_path_exits_1_with_a_message(self, tmp_path: Path):
        """A path that does not exist is a located problem, not a traceback."""
        missing = str(tmp_path / "nope.yaml")

        code, output = run("validate", missing)

        assert code == 1
        assert f"{missing}:1:1: no such file or directory" in output


class TestTestCommand:
    """`test` runs every embedded case and reports each failure with expected and actual."""

    def test_reports_passed_and_failed_counts(self, rules_dir: Path):
        """One passing and one failing case: a FAIL line with expected/actual, exit 1."""
        path = failing_test_file(rules_dir)

        code, output = run("test", str(path))

        lines = output.splitlines()
        assert code == 1
        assert lines[-1] == "1 passed, 1 failed"
        assert re.fullmatch(rf"FAIL {re.escape(str(path))}:\d+:\d+: demo: small fails", lines[0])
        assert lines[1] == "    matched: expected [big], got []"
        assert "PASS" not in output

    def test_verbose_lists_passing_cases(self, rules_dir: Path):
        """`-v` adds a PASS line for each passing case."""
        path = failing_test_file(rules_dir)

        _, output = run("test", "-v", str(path))

        assert re.search(r"^PASS .+: demo: big passes$", output, re.MULTILINE)
        assert re.search(r"^FAIL .+: demo: small fails$", output, re.MULTILINE)

    def test_all_passing_exits_0(self):
        """A file whose cases all pass gives exit 0."""
        code, output = run("test", GOOD)

        assert code == 0
        assert output.splitlines()[-1] == "3 passed, 0 failed"

    def test_json_format_lists_cases(self, rules_dir: Path):
        """`--format json` gives counts and each case with its failures and result."""
        path = failing_test_file(rules_dir)

        code, output = run("test", "--format", "json", str(path))

        report = json.loads(output)
        assert code == 1
        assert (report["passed"], report["failed"], report["problems"]) == (1, 1, [])
        cases = {case["name"]: case for case in report["cases"]}
        assert cases["big passes"]["passed"] is True
        assert cases["small fails"]["failures"] == ["matched: expected [big], got []"]
        assert cases["small fails"]["result"]["total_points"] == 0

    def test_invalid_file_runs_no_tests(self):
        """A file that does not load is reported as problems and no case runs."""
        code, output = run("test", str(FIXTURES / "kind.bad.yaml"))

        assert code == 1
        assert output.splitlines()[-1] == "1 problem(s) found; no tests ran"

    def test_refuses_what_the_sidecar_would_refuse(self):
        """A file with an unreachable decision band does not pass `test` either."""
        code, _ = run("test", str(FIXTURES / "unreachable-band.bad.yaml"))

        assert code == 1


class TestUsageErrors:
    """Bad command lines exit 2 with argparse's usage message."""

    @pytest.mark.parametrize(
        "argv",
        [
            [],
            ["validate"],
            ["test"],
            ["validate", "--format", "xml", GOOD],
            ["frobnicate", GOOD],
        ],
        ids=["no-command", "validate-no-paths", "test-no-paths", "unknown-format", "unknown"],
    )
    def test_usage_error_exits_2(self, argv: list[str], capsys: pytest.CaptureFixture[str]):
        """argparse stops with exit status 2 and prints usage on stderr."""
        with pytest.raises(SystemExit) as caught:
            run(*argv)

        assert caught.value.code == 2
        assert "usage: rule-sidecar" in capsys.readouterr().err


class TestConsoleScript:
    """The installed `rule-sidecar` command behaves like `main`."""

    def test_validate_good_file(self):
        """A real process validates a good file with exit 0 on stdout."""
        process = run_process("validate", GOOD)

        assert process.returncode == 0, process.stderr
        assert process.stdout.startswith("OK: 2 ruleset(s), 4 rule(s)")

    def test_validate_bad_file(self):
        """A real process exits 1 and prints the located problem."""
        path = str(FIXTURES / "kind.bad.yaml")

        process = run_process("validate", path)

        assert process.returncode == 1
        assert f"{path}:3:7: unknown kind 'Ruleset'" in process.stdout

    def test_usage_error(self):
        """A real process exits 2 with the usage on stderr."""
        process = run_process("validate", "--format", "xml", GOOD)

        assert process.returncode == 2
        assert "invalid choice: 'xml'" in process.stderr

"""Tests of the `rule-sidecar validate` and `rule-sidecar test` commands."""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import socket
import subprocess
import threading
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml
from conftest import FIXTURES, dump_yaml, make_ruleset_doc, write_rules
from server_support import command

from sidecar.cli import main
from sidecar.errors import ProblemCode

# Starts processes, browsers or databases: left out of the quick loop (-m 'not slow').
pytestmark = pytest.mark.slow

ROOT = Path(__file__).parent.parent

GOOD = str(FIXTURES / "good.yaml")
PROBLEM_LINE_RE = re.compile(r"^(?P<file>.+?):(?P<line>\d+):(?P<column>\d+): (?P<message>.+)$")


def run(*argv: str) -> tuple[int, str]:
    """Run the command in-process; its exit code and what it printed."""
    out = io.StringIO()
    code = main(list(argv), out=out)
    return code, out.getvalue()


def run_process(*argv: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run the command as a real process, `stdin` as its standard input."""
    return subprocess.run(
        [*command(), *argv], input=stdin, capture_output=True, text=True, timeout=60, check=False
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


BROKEN = "apiVersion: rule-sidecar/v1\nkind: RuleSet\nmetadata: {id: x\n"
GOOD_TEXT = (FIXTURES / "good.yaml").read_text("utf-8")


def located(output: str) -> set[tuple[str, str, str]]:
    """`(file, line, column)` of every problem line printed."""
    return {
        (m["file"], m["line"], m["column"])
        for m in map(PROBLEM_LINE_RE.match, output.splitlines())
        if m
    }


def run_json(*argv: str, stdin: str | None = None) -> tuple[int, dict]:
    """A real process with `--format json`; its exit code and report."""
    process = run_process(*argv, "--format", "json", stdin=stdin)
    return process.returncode, json.loads(process.stdout)


def codes(report: dict) -> set[str]:
    return {problem["code"] for problem in report["problems"]}


class TestNamedStreams:
    """A path named on the command line is read, whatever it is; `-` is standard input.

    Before, a pipe behind /dev/stdin or /dev/fd/N was refused with a misleading "No such
    file or directory" (or earlier read as an empty directory: "OK: 0 rulesets").
    """

    def test_piped_stdin_through_dev_stdin(self):
        """`cat broken.yaml | rule-sidecar validate /dev/stdin` reports the YAML error."""
        process = run_process("validate", "/dev/stdin", stdin=BROKEN)

        assert process.returncode == 1
        assert located(process.stdout) == {("/dev/stdin", "4", "1")}
        assert "YAML syntax error" in process.stdout

    def test_dash_reads_standard_input(self):
        """`-` reads standard input: good rules pass, broken ones are located `<stdin>`."""
        good = run_process("validate", "-", stdin=GOOD_TEXT)
        code, report = run_json("validate", "-", stdin=BROKEN)

        assert good.returncode == 0, good.stdout
        assert good.stdout.startswith("OK: 2 ruleset(s), 4 rule(s) in 1 file(s)")
        assert code == 1
        (problem,) = report["problems"]
        assert (problem["file"], problem["line"], problem["code"]) == ("<stdin>", 4, "yaml.syntax")

    def test_fifo_fed_by_a_thread(self, tmp_path: Path):
        """A FIFO named explicitly is read to its end, as `cat` would."""
        fifo = tmp_path / "rules.yaml"
        os.mkfifo(fifo)

        def feed() -> None:
            with fifo.open("w", encoding="utf-8") as writer:
                writer.write(BROKEN)

        writer = threading.Thread(target=feed, daemon=True)
        writer.start()
        process = run_process("validate", str(fifo))
        if writer.is_alive():  # the command never opened it: release the writer
            os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))
        writer.join(timeout=60)

        assert process.returncode == 1
        assert located(process.stdout) == {(str(fifo), "4", "1")}

    def test_process_substitution(self, tmp_path: Path):
        """`rule-sidecar validate <(cat f)`: the /dev/fd/N pipe is read."""
        broken = write_rules(tmp_path, "broken.yaml", BROKEN)
        script = " ".join(shlex.quote(part) for part in command())

        process = subprocess.run(
            ["bash", "-c", f"{script} validate <(cat {shlex.quote(str(broken))})"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

        assert process.returncode == 1
        (where,) = located(process.stdout)
        assert re.fullmatch(r"/dev/fd/\d+", where[0])
        assert where[1:] == ("4", "1")

    def test_endless_device_is_read_up_to_the_limit(self):
        """/dev/zero never ends: it is refused at the size limit, not read forever."""
        code, report = run_json("validate", "/dev/zero")

        assert code == 1
        (problem,) = report["problems"]
        assert (problem["file"], problem["code"]) == ("/dev/zero", "read.too_large")

    def test_socket_is_an_error_naming_the_path(self, tmp_path: Path):
        """A path that cannot be opened for reading is an error that names it."""
        path = tmp_path / "rules.sock"
        with socket.socket(socket.AF_UNIX) as server:
            server.bind(str(path))
            code, report = run_json("validate", str(path))

        assert code == 1
        (problem,) = report["problems"]
        assert (problem["file"], problem["code"]) == (str(path), "read.failed")

    def test_fifo_found_in_a_directory_is_still_refused(self, rules_dir: Path):
        """Only named paths are streams: a FIFO met while walking is not read."""
        write_rules(rules_dir, "good.yaml", GOOD_TEXT)
        os.mkfifo(rules_dir / "stuck.yaml")

        code, report = run_json("validate", str(rules_dir))

        assert code == 1
        (problem,) = report["problems"]
        assert problem["code"] == "read.not_regular"
        assert problem["file"] == str(rules_dir / "stuck.yaml")


class TestNothingToValidate:
    """A path that yields no ruleset fails by default; `--allow-empty` accepts it."""

    @pytest.mark.parametrize(
        "content", ["", "# only a comment\n", "---\n", "---\n...\n---\n"], ids=repr
    )
    def test_file_without_a_ruleset_fails(self, rules_dir: Path, content: str):
        """Empty, comment-only and `---`-only files are not "OK: 0 rulesets"."""
        path = write_rules(rules_dir, "rules.yaml", content)

        code, report = run_json("validate", str(path))
        allowed, _ = run_json("validate", "--allow-empty", str(path))

        assert code == 1
        assert [(p["file"], p["code"]) for p in report["problems"]] == [(str(path), "rules.empty")]
        assert allowed == 0

    def test_empty_directory_fails(self, rules_dir: Path):
        """An empty directory (a wrong path, a template that rendered nothing) fails."""
        process = run_process("validate", str(rules_dir))

        assert process.returncode == 1
        assert f"{rules_dir}:1:1: no ruleset in {rules_dir}" in process.stdout

    def test_each_path_must_yield_a_ruleset(self, rules_dir: Path):
        """A good path does not carry an empty one beside it; `test` refuses it too."""
        write_rules(rules_dir, "empty/README.md", "no rules here")

        validated = run_process("validate", GOOD, str(rules_dir / "empty"))
        tested = run_process("test", GOOD, str(rules_dir / "empty"))

        assert (validated.returncode, tested.returncode) == (1, 1)
        assert f"no ruleset in {rules_dir / 'empty'}" in validated.stdout
        assert f"no ruleset in {rules_dir / 'empty'}" in tested.stdout

    def test_empty_standard_input_fails(self):
        """A pipe that brought nothing is not a pass."""
        code, report = run_json("validate", "-", stdin="")

        assert code == 1
        assert codes(report) == {"rules.empty"}

    def test_require_tests(self, rules_dir: Path):
        """`--require-tests` refuses a ruleset without embedded tests, located."""
        untested = write_rules(rules_dir, "a.yaml", dump_yaml(make_ruleset_doc("untested")))

        plain, _ = run_json("validate", str(untested))
        code, report = run_json("validate", "--require-tests", str(untested), GOOD)

        assert plain == 0
        assert code == 1
        (problem,) = report["problems"]
        assert (problem["file"], problem["line"], problem["code"]) == (
            str(untested),
            1,
            "tests.missing",
        )
        assert problem["ruleset_id"] == "untested"


def fine_file(directory: Path) -> Path:
    """A valid ruleset with two passing embedded tests."""
    doc = make_ruleset_doc(
        "fine",
        tests=[
            {"name": "big", "input": {"amount": 500}, "expect": {"total_points": 10}},
            {"name": "small", "input": {"amount": 5}, "expect": {"total_points": 0}},
        ],
    )
    return write_rules(directory, "f-fine.yaml", dump_yaml(doc))


def several_broken_files(directory: Path) -> dict[str, Path]:
    """A directory whose files each have a different kind of problem."""
    schema_and_cel = make_ruleset_doc(
        "mixed",
        [
            {"id": "typo", "conditon": "true", "points": 1},
            {"id": "broken-cel", "condition": "input.amount >> 1", "points": 1},
        ],
    )
    does_not_compile = make_ruleset_doc(
        "twice", [{"id": "twice-r1", "condition": "input.a ==", "points": 1}]
    )
    files = {
        "mixed": write_rules(directory, "a-mixed.yaml", dump_yaml(schema_and_cel)),
        "compile": write_rules(directory, "b-compile.yaml", dump_yaml(does_not_compile)),
        "duplicate": write_rules(directory, "c-dup.yaml", dump_yaml(make_ruleset_doc("twice"))),
        "failing": write_rules(
            directory, "d-failing.yaml", (FIXTURES / "failing-test.bad.yaml").read_text("utf-8")
        ),
    }
    os.mkfifo(directory / "e-stuck.yaml")
    files["stuck"] = directory / "e-stuck.yaml"
    return files


class TestOnePass:
    """Every problem of every file in one run: one CI round per pull request."""

    def test_validate_reports_every_kind_of_problem_together(self, rules_dir: Path):
        """A read error, a schema error beside a CEL error, a duplicate id of a ruleset
        that does not compile and a failing test: all reported, each with its code."""
        files = several_broken_files(rules_dir)

        code, report = run_json("validate", str(rules_dir))

        assert code == 1
        assert report["valid"] is False
        found = {(Path(p["file"]).name, p["code"]) for p in report["problems"]}
        assert found == {
            ("e-stuck.yaml", "read.not_regular"),
            ("a-mixed.yaml", "schema.additional_property"),  # `conditon`
            ("a-mixed.yaml", "schema.required"),  # so no `condition`
            ("a-mixed.yaml", "cel.compile"),  # in the next rule
            ("b-compile.yaml", "cel.compile"),
            ("c-dup.yaml", "id.duplicate"),
            ("d-failing.yaml", "test.failed"),
        }
        assert files["mixed"].name in {Path(p["file"]).name for p in report["problems"]}

    def test_test_counts_a_load_failure_as_failed(self, rules_dir: Path):
        """`test --format json` never says `"failed": 0` when something did not load;
        the rulesets that did load still run their tests."""
        several_broken_files(rules_dir)
        fine_file(rules_dir)

        code, report = run_json("test", str(rules_dir))

        assert code == 1
        assert report["valid"] is False
        assert report["failed"] == 1 + len(report["problems"])
        assert report["passed"] == 2
        assert {case["name"] for case in report["cases"] if not case["passed"]} == {"large payment"}

    def test_human_output_lists_every_file(self, rules_dir: Path):
        """The `file:line:col` lines name every broken file, read errors included."""
        files = several_broken_files(rules_dir)

        process = run_process("validate", str(rules_dir))

        assert process.returncode == 1
        assert {where[0] for where in located(process.stdout)} == {
            str(path) for name, path in files.items() if name != "duplicate"
        } | {str(files["duplicate"])}


REPORT_KEYS = frozenset(
    {
        "valid",
        "files",
        "rulesets",
        "rules",
        "revision",
        "passed",
        "failed",
        "problems",
        "cases",
    }
)


FIXTURE_CODES = {
    "alias-bomb.bad.yaml": {"document.shared_alias"},
    "api-version.bad.yaml": {"schema.api_version"},
    "bad-id.bad.yaml": {"schema.pattern"},
    "cel-cost.bad.yaml": {"cel.too_costly"},
    "condition-syntax.bad.yaml": {"cel.compile"},
    "duplicate-key.bad.yaml": {"document.duplicate_key"},
    "duplicate-rule-id.bad.yaml": {"id.duplicate"},
    "failing-test.bad.yaml": {"test.failed"},
    "kind.bad.yaml": {"schema.kind"},
    "list-document.bad.yaml": {"schema.not_mapping"},
    "missing-field.bad.yaml": {"schema.required"},
    "misspelt-field.bad.yaml": {"schema.additional_property", "schema.required"},
    "non-boolean.bad.yaml": {"cel.compile"},
    "points-range.bad.yaml": {"schema.range"},
    "syntax.bad.yaml": {"yaml.syntax"},
    "undeclared-function.bad.yaml": {"cel.compile"},
    "unknown-rule-in-test.bad.yaml": {"check.unknown_rule", "test.failed"},
    "unreachable-band.bad.yaml": {"check.unreachable_band"},
}


class TestJsonShape:
    """One JSON shape, valid or not, for both commands; every problem has a stable code."""

    def test_same_keys_valid_and_invalid(self, rules_dir: Path):
        """`validate` and `test`, valid and invalid: the same keys every time."""
        broken = write_rules(rules_dir, "broken.yaml", BROKEN)

        reports = [
            run_json(name, path)[1] for name in ("validate", "test") for path in (GOOD, str(broken))
        ]

        assert [set(report) for report in reports] == [REPORT_KEYS] * 4
        assert [report["valid"] for report in reports] == [True, False, True, False]
        assert reports[1]["revision"] is None
        assert reports[3]["failed"] == 1

    @pytest.mark.parametrize(
        "fixture", sorted(FIXTURES.glob("*.bad.yaml")), ids=lambda path: path.name
    )
    def test_every_fixture_problem_has_its_code(self, fixture: Path):
        """Each broken fixture's problems carry the code of their kind, never
        `unclassified` (every fixture is listed, so a new one must say its codes)."""
        code, report = run_json("validate", str(fixture))

        assert code == 1
        assert codes(report) == FIXTURE_CODES[fixture.name]

    @pytest.mark.parametrize(
        ("name", "content", "expected"),
        [
            ("latin1.yaml", b"id: caf\xe9\n", "file.encoding"),
            ("bom.yaml", b"\xff\xfea\x00", "file.encoding"),
            ("syntax.json", b'{"apiVersion": ', "json.syntax"),
            ("nan.json", b'{"a": NaN}', "document.not_json"),
            ("twice.json", b'{"a": 1, "a": 2}', "document.duplicate_key"),
            ("twice.yaml", b"a: 1\na: 2\n", "document.duplicate_key"),
            ("binary.yaml", b"a: !!binary aGk=\n", "document.not_json"),
            ("alias.yaml", b"a: &x {b: 1}\nc: *x\n", "document.shared_alias"),
            ("deep.yaml", b"a: " + b"[" * 80 + b"]" * 80 + b"\n", "limit.depth"),
            ("list.yaml", b"- 1\n", "schema.not_mapping"),
            ("nul.yaml", b"a: \x00\n", "yaml.syntax"),
        ],
        ids=lambda value: value if isinstance(value, str) and "." in value else None,
    )
    def test_codes_name_the_kind(self, rules_dir: Path, name: str, content: bytes, expected: str):
        """Problems found while reading a document are coded by kind, not left unclassified."""
        path = write_rules(rules_dir, name, content)

        code, output = run("validate", "--format", "json", str(path))

        assert code == 1
        assert [problem["code"] for problem in json.loads(output)["problems"]] == [expected]

    def test_codes_are_documented(self):
        """README and schemas/openapi.yaml name every code of the enum."""
        readme = (ROOT / "README.md").read_text("utf-8")
        openapi = yaml.safe_load((ROOT / "schemas" / "openapi.yaml").read_text("utf-8"))
        problem = openapi["components"]["schemas"]["Problem"]

        assert set(problem["properties"]["code"]["enum"]) == {c.value for c in ProblemCode}
        assert "code" in problem["required"]
        for value in ProblemCode:
            assert f"`{value.value}`" in readme, value


JUNIT_ATTRIBUTES = {
    "testsuites": ({"name", "tests", "failures", "errors"}, {"testsuite"}),
    "testsuite": ({"name", "tests", "failures", "errors", "skipped"}, {"testcase"}),
    "testcase": ({"name", "classname", "file"}, {"failure"}),
    "failure": ({"message", "type"}, set()),
}


def check_junit_shape(root: ET.Element) -> None:
    """The shape the JUnit XSD that CI tools read requires: these elements only, each
    with its attributes, at most one failure per case, and counts that add up."""
    for element in root.iter():
        attributes, children = JUNIT_ATTRIBUTES[element.tag]
        assert set(element.attrib) == attributes, element.tag
        assert {child.tag for child in element} <= children, element.tag
    assert root.tag == "testsuites"
    suites = root.findall("testsuite")
    for suite in suites:
        cases = suite.findall("testcase")
        assert int(suite.get("tests", "")) == len(cases)
        assert int(suite.get("failures", "")) == sum(
            1 for c in cases if c.find("failure") is not None
        )
        assert all(len(case.findall("failure")) <= 1 for case in cases)
    assert int(root.get("tests", "")) == sum(int(s.get("tests", "")) for s in suites)
    assert int(root.get("failures", "")) == sum(int(s.get("failures", "")) for s in suites)


class TestJunit:
    """`--format junit`: a testsuite per file, a testcase per ruleset and per embedded test."""

    def test_failures_are_located_and_typed(self, rules_dir: Path):
        """Parsed back: every file a suite, each failure `file:line:col` with its code."""
        files = several_broken_files(rules_dir)
        fine = fine_file(rules_dir)

        process = run_process("test", "--format", "junit", str(rules_dir))

        assert process.returncode == 1
        root = ET.fromstring(process.stdout)
        check_junit_shape(root)
        suites = {suite.get("name"): suite for suite in root.findall("testsuite")}
        assert set(suites) == {str(path) for path in [*files.values(), fine]}
        good = suites[str(fine)]
        assert good.get("failures") == "0"
        assert len(good.findall("testcase")) == 1 + 2  # the ruleset, its two tests
        failing = suites[str(files["failing"])].find("testcase[@name='large payment']")
        assert failing is not None
        failure = failing.find("failure")
        assert failure is not None
        assert failure.get("type") == "test.failed"
        assert re.match(rf"{re.escape(str(files['failing']))}:12:7: ", failure.get("message", ""))
        mixed = suites[str(files["mixed"])].find("testcase[@name='mixed']/failure")
        assert mixed is not None
        assert "schema.additional_property" in (mixed.text or "")
        assert "cel.compile" in (mixed.text or "")
        stuck = suites[str(files["stuck"])].find("testcase[@name='load']/failure")
        assert stuck is not None
        assert stuck.get("type") == "read.not_regular"

    def test_valid_rules_and_hostile_names(self, rules_dir: Path):
        """Passing cases have no failure; a test name no XML can hold still parses."""
        doc = make_ruleset_doc(
            "demo",
            tests=[
                {
                    "name": 'odd \x01 <name> & "quotes"',
                    "input": {"amount": 500},
                    "expect": {"total_points": 10},
                }
            ],
        )
        path = write_rules(rules_dir, "rules.yaml", dump_yaml(doc))

        process = run_process("validate", "--format", "junit", str(path))

        assert process.returncode == 0, process.stdout
        root = ET.fromstring(process.stdout)
        check_junit_shape(root)
        assert root.get("failures") == "0"
        names = {case.get("name") for case in root.iter("testcase")}
        assert names == {"demo", 'odd \ufffd <name> & "quotes"'}


class TestDatabaseImport:
    """`db import` of nothing is not "OK: imported 0 ruleset(s)"."""

    def test_importing_nothing_fails(self, rules_dir: Path, tmp_path: Path):
        """An empty directory imports nothing and exits 1; `--allow-empty` accepts it."""
        url = f"sqlite:///{tmp_path / 'rules.db'}"
        assert run_process("db", "init", "--database-url", url).returncode == 0

        refused = run_process("db", "import", "--database-url", url, str(rules_dir))
        allowed = run_process(
            "db", "import", "--database-url", url, "--allow-empty", str(rules_dir)
        )

        assert refused.returncode == 1
        assert f"no ruleset in {rules_dir}: nothing was imported" in refused.stdout
        assert allowed.returncode == 0

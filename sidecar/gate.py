"""What `rule-sidecar validate` and `test` find in rule files, in one pass, for CI.

Everything that can be read is read, everything read is loaded, and every problem is
reported together: a read error does not hide the other files' problems, a schema error
does not hide a condition that does not compile, a condition that does not compile does
not hide a duplicate id. A pull request gets every problem in one CI round.

Beyond what the sidecar would refuse, a gate refuses what a pipeline never means: a
path that yields no ruleset (an empty directory, a comment-only file, a lone `---`, a
template that rendered nothing) unless empty input is allowed, and, when asked, a
ruleset without embedded tests.

One report, three renderings: `file:line:col: message` lines, one JSON shape whether
valid or not, and JUnit XML (`xml.etree`), which GitLab, Jenkins and GitHub display.
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, TextIO

from sidecar.checks import CaseResult, authoring_problems, case_problem, run_tests
from sidecar.errors import Problem, ProblemCode
from sidecar.loader import Loader
from sidecar.model import Location, RuleSet
from sidecar.snapshot import Snapshot
from sidecar.sources.files import STDIN, collect_rule_files

__all__ = ["Gate", "Report", "examine", "write_human", "write_json", "write_junit"]

_LOAD_CASE: Final = "load"


@dataclass(frozen=True, slots=True, kw_only=True)
class Gate:
    """What the gate checks besides what the sidecar itself would refuse."""

    run_checks: bool = True
    allow_empty: bool = False
    require_tests: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Report:
    """Every problem of the rule files and every embedded test case that ran.

    `problems` holds everything but failing cases, which are in `cases` (each is also a
    `test.failed` problem when the question is whether the sidecar would accept them).
    """

    files: int
    rulesets: tuple[RuleSet, ...]
    problems: tuple[Problem, ...]
    cases: tuple[CaseResult, ...]

    @property
    def failed_cases(self) -> list[CaseResult]:
        return [case for case in self.cases if not case.passed]

    @property
    def valid(self) -> bool:
        return not self.problems and not self.failed_cases

    @property
    def failed(self) -> int:
        """Failing cases plus every other problem: 0 exactly when the report is valid."""
        return len(self.failed_cases) + len(self.problems)

    @property
    def passed(self) -> int:
        return len(self.cases) - len(self.failed_cases)

    def all_problems(self) -> list[Problem]:
        """The problems with each failing case as the `test.failed` problem it is."""
        by_id = {ruleset.id: ruleset for ruleset in self.rulesets}
        failing = [case_problem(by_id[case.ruleset_id], case) for case in self.failed_cases]
        return _sorted([*self.problems, *failing])

    def ruleset(self, ruleset_id: str, where: str) -> RuleSet:
        """The loaded ruleset of that id; ValueError (a usage error) naming the ids `where`
        (e.g. "the candidate") holds."""
        for ruleset in self.rulesets:
            if ruleset.id == ruleset_id:
                return ruleset
        known = ", ".join(sorted(ruleset.id for ruleset in self.rulesets)) or "none"
        raise ValueError(f"no ruleset {ruleset_id!r} in {where} (it holds: {known})")

    def revision(self) -> str | None:
        """The revision the sidecar would serve these rules as; None when invalid."""
        return Snapshot.build(self.rulesets).revision if self.valid else None


def _sorted(problems: Sequence[Problem]) -> list[Problem]:
    return sorted(problems, key=lambda p: (p.file, p.line, p.column, p.code, p.message))


def examine(paths: Sequence[str], gate: Gate) -> Report:
    """Read, load and check every path in one pass (`-` is standard input)."""
    loader = Loader(run_checks=False)  # checks run here, so each case can be reported
    files = []
    read_problems: list[Problem] = []
    names_of: dict[str, set[str]] = {}
    for path in paths:
        read, problems = collect_rule_files([path], read_streams=True)
        files.extend(read)
        read_problems.extend(problems)
        names_of[path] = {f.name for f in read} | {p.file for p in problems}
    examination = loader.examine(files)
    problems = [*read_problems, *examination.problems]
    cases: list[CaseResult] = []
    if gate.run_checks:
        for ruleset in examination.rulesets:
            problems.extend(authoring_problems(ruleset))
            cases.extend(run_tests(ruleset))
    if gate.require_tests:
        problems.extend(_untested(ruleset) for ruleset in examination.rulesets if not ruleset.tests)
    if not gate.allow_empty:
        problems.extend(_empty_paths(paths, names_of, examination.rulesets, problems))
    return Report(
        files=examination.files,
        rulesets=examination.rulesets,
        problems=tuple(_sorted(problems)),
        cases=tuple(cases),
    )


def _untested(ruleset: RuleSet) -> Problem:
    where = ruleset.location or Location("<unknown>")
    message = f"ruleset {ruleset.id!r} has no embedded tests (spec.tests; --require-tests)"
    return where.problem(
        message, path="$.spec", ruleset_id=ruleset.id, code=ProblemCode.TESTS_MISSING
    )


def _empty_paths(
    paths: Sequence[str],
    names_of: dict[str, set[str]],
    rulesets: Sequence[RuleSet],
    problems: Sequence[Problem],
) -> list[Problem]:
    """A problem for each path that yielded no ruleset and no problem either: nothing a
    pipeline means to ship (a wrong path, a template that rendered nothing)."""
    found = {ruleset.location.file for ruleset in rulesets if ruleset.location}
    found.update(problem.file for problem in problems)
    empty: list[Problem] = []
    for path in dict.fromkeys(paths):
        if names_of[path] & found:
            continue
        shown = "<stdin>" if path == STDIN else path
        message = (
            f"no ruleset in {shown}: a path that yields nothing is refused "
            "(--allow-empty accepts it)"
        )
        empty.append(Problem(file=shown, message=message, code=ProblemCode.RULES_EMPTY))
    return empty


def _case_dict(case: CaseResult) -> dict[str, Any]:
    return {
        "ruleset_id": case.ruleset_id,
        "name": case.name,
        "location": str(case.location) if case.location else None,
        "passed": case.passed,
        "failures": list(case.failures),
        "result": case.evaluation.to_dict() if case.evaluation else None,
    }


def _counts(report: Report) -> dict[str, Any]:
    return {
        "valid": report.valid,
        "files": report.files,
        "rulesets": len(report.rulesets),
        "rules": sum(len(ruleset.rules) for ruleset in report.rulesets),
        "revision": report.revision(),
        "passed": report.passed,
        "failed": report.failed,
    }


def write_json(report: Report, out: TextIO, *, cases_as_problems: bool) -> None:
    """One shape, valid or not, for `validate` and `test` alike."""
    problems = report.all_problems() if cases_as_problems else list(report.problems)
    data = {
        **_counts(report),
        "problems": [problem.to_dict() for problem in problems],
        "cases": [_case_dict(case) for case in report.cases],
    }
    json.dump(data, out, indent=2, sort_keys=True)
    out.write("\n")


def write_human(report: Report, out: TextIO, *, cases: bool, verbose: bool = False) -> None:
    """`file:line:col: message` lines, then a summary; with `cases` (the `test` command)
    a FAIL line per failing case (`verbose`: a PASS line per passing case too)."""
    problems = list(report.problems) if cases else report.all_problems()
    for problem in problems:
        print(problem, file=out)
    if cases:
        _write_cases(report, out, verbose=verbose)
    if problems:
        ran = "; no tests ran" if cases and not report.cases else ""
        print(f"{len(problems)} problem(s) found{ran}", file=out)
    if cases and (report.cases or not problems):
        print(f"{report.passed} passed, {len(report.failed_cases)} failed", file=out)
    elif not cases and not problems:
        counts = _counts(report)
        print(
            f"OK: {counts['rulesets']} ruleset(s), {counts['rules']} rule(s) in "
            f"{report.files} file(s); revision {counts['revision']}",
            file=out,
        )


def _write_cases(report: Report, out: TextIO, *, verbose: bool) -> None:
    for case in report.cases:
        if case.passed and not verbose:
            continue
        status = "PASS" if case.passed else "FAIL"
        print(f"{status} {case.location}: {case.ruleset_id}: {case.name}", file=out)
        for failure in case.failures:
            print(f"    {failure}", file=out)


# Characters XML 1.0 cannot hold, even escaped (a test name may be any YAML string).
_NOT_XML: Final = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _xml(text: str) -> str:
    return _NOT_XML.sub("\ufffd", text)


@dataclass(frozen=True, slots=True)
class _Failure:
    message: str  # file:line:col: what
    code: str

    @property
    def line(self) -> str:
        return f"{self.message} [{self.code}]"


@dataclass(slots=True)
class _Case:
    """One JUnit test case being assembled."""

    name: str
    classname: str
    file: str
    failures: list[_Failure]


def write_junit(report: Report, out: TextIO, *, command: str) -> None:
    """JUnit XML: a testsuite per file, a testcase per ruleset (its problems; problems
    outside any ruleset go to a `load` case) and per embedded test, each failure
    located `file:line:col` with its problem code as the failure's type."""
    suites: dict[str, dict[tuple[str, str], _Case]] = {}

    def case(file: str, classname: str, name: str) -> _Case:
        cases = suites.setdefault(file, {})
        return cases.setdefault((classname, name), _Case(name, classname, file, []))

    for ruleset in report.rulesets:
        file = ruleset.location.file if ruleset.location else "<unknown>"
        case(file, file, ruleset.id)
    for problem in report.problems:
        name = problem.ruleset_id if problem.ruleset_id is not None else _LOAD_CASE
        case(problem.file, problem.file, name).failures.append(_Failure(str(problem), problem.code))
    for result in report.cases:
        file = result.location.file if result.location else "<unknown>"
        entry = case(file, f"{file}:{result.ruleset_id}", result.name)
        entry.failures.extend(
            _Failure(f"{result.location}: {failure}", ProblemCode.TEST_FAILED)
            for failure in result.failures
        )
    root = ET.Element("testsuites", name=f"rule-sidecar {command}")
    total = failed = 0
    for file in sorted(suites):
        cases = list(suites[file].values())
        failing = sum(1 for c in cases if c.failures)
        suite = ET.SubElement(root, "testsuite", name=_xml(file), tests=str(len(cases)))
        suite.attrib.update(failures=str(failing), errors="0", skipped="0")
        for entry in cases:
            element = ET.SubElement(
                suite,
                "testcase",
                name=_xml(entry.name),
                classname=_xml(entry.classname),
                file=_xml(entry.file),
            )
            if entry.failures:
                first = entry.failures[0]
                failure = ET.SubElement(element, "failure", message=_xml(first.message))
                failure.set("type", first.code)
                failure.text = _xml("\n".join(f.line for f in entry.failures))
        total += len(cases)
        failed += failing
    root.attrib.update(tests=str(total), failures=str(failed), errors="0")
    ET.indent(root)
    out.write(ET.tostring(root, encoding="unicode", xml_declaration=True))
    out.write("\n")

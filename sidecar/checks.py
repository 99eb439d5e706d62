"""Semantic checks on a compiled ruleset: its embedded tests and authoring mistakes.

These run before a ruleset can go live when validation is enabled
(`HOT_RELOAD_VALIDATION_ENABLED`), in `rule-sidecar validate` and in `rule-sidecar test`.
"""

from __future__ import annotations

from dataclasses import dataclass

from sidecar.engine import Evaluation, evaluate_ruleset
from sidecar.errors import InputError, Problem, ProblemCode, excerpt
from sidecar.model import Location, RuleSet, RuleTest, thaw

__all__ = [
    "CaseResult",
    "authoring_problems",
    "case_problem",
    "checked",
    "ruleset_problems",
    "run_tests",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class CaseResult:
    """The outcome of one embedded test case; `failures` is empty when it passed."""

    ruleset_id: str
    name: str
    location: Location | None
    failures: tuple[str, ...]
    evaluation: Evaluation | None

    @property
    def passed(self) -> bool:
        return not self.failures


def _names(ids: frozenset[str] | set[str]) -> str:
    return "[" + ", ".join(sorted(ids)) + "]"


def _compare(test: RuleTest, result: Evaluation) -> list[str]:
    expect = test.expect
    failures: list[str] = []
    every_error = (*result.errors, *result.shadow_errors)
    errored = {error.rule_id for error in every_error}
    for error in every_error:
        if error.rule_id not in expect.errors:
            failures.append(f"rule {error.rule_id!r} errored: {error.error}")
    missing_errors = expect.errors - errored
    if missing_errors:
        failures.append(f"expected errors from {_names(missing_errors)}, they did not error")
    if expect.total_points is not None and expect.total_points != result.total_points:
        failures.append(f"total_points: expected {expect.total_points}, got {result.total_points}")
    matched = {match.id for match in result.matched}
    if expect.matched is not None and expect.matched != matched:
        failures.append(f"matched: expected {_names(expect.matched)}, got {_names(matched)}")
    shadow_matched = {match.id for match in result.shadow_matched}
    if expect.shadow_matched is not None and expect.shadow_matched != shadow_matched:
        expected, got = _names(expect.shadow_matched), _names(shadow_matched)
        failures.append(f"shadow_matched: expected {expected}, got {got}")
    if expect.checks_decision and expect.decision != result.decision:
        expected, got = excerpt(expect.decision), excerpt(result.decision)
        failures.append(f"decision: expected {expected}, got {got}")
    return failures


def run_tests(ruleset: RuleSet) -> list[CaseResult]:
    """Run every embedded test case of the ruleset against the ruleset itself."""
    results: list[CaseResult] = []
    for test in ruleset.tests:
        try:
            evaluation: Evaluation | None = evaluate_ruleset(ruleset, thaw(test.input))
        except InputError as exc:
            evaluation, failures = None, [f"input {exc}"]
        else:
            assert evaluation is not None
            failures = _compare(test, evaluation)
        results.append(
            CaseResult(
                ruleset_id=ruleset.id,
                name=test.name,
                location=test.location,
                failures=tuple(failures),
                evaluation=evaluation,
            )
        )
    return results


def _problem(
    ruleset: RuleSet, location: Location | None, message: str, code: ProblemCode
) -> Problem:
    where = location or ruleset.location or Location("<unknown>")
    return where.problem(message, ruleset_id=ruleset.id, code=code)


def case_problem(ruleset: RuleSet, case: CaseResult) -> Problem:
    """A failing case as the problem that keeps its ruleset from going live."""
    message = f"test {case.name!r} failed: " + "; ".join(case.failures)
    return _problem(ruleset, case.location, message, ProblemCode.TEST_FAILED)


def ruleset_problems(ruleset: RuleSet) -> list[Problem]:
    """Authoring mistakes and failing embedded tests, each located."""
    return checked(ruleset)[0]


def checked(ruleset: RuleSet) -> tuple[list[Problem], list[CaseResult]]:
    """`ruleset_problems`, with every case's result: how many ran and passed is news
    to whoever asked for the check (a candidate's validation says it)."""
    problems = authoring_problems(ruleset)
    cases = run_tests(ruleset)
    problems.extend(case_problem(ruleset, case) for case in cases if not case.passed)
    return problems, cases


def authoring_problems(ruleset: RuleSet) -> list[Problem]:
    """Mistakes visible without running anything: unreachable bands, test names."""
    problems: list[Problem] = []
    lowest: tuple[int, str] | None = None
    for band in ruleset.decisions:
        if lowest is not None and band.min_points >= lowest[0]:
            problems.append(
                _problem(
                    ruleset,
                    band.location,
                    f"decision band {band.decision!r} (min_points {band.min_points}) can never "
                    f"apply: band {lowest[1]!r} (min_points {lowest[0]}) comes first; "
                    "list bands from the highest min_points down",
                    ProblemCode.CHECK_UNREACHABLE_BAND,
                )
            )
        if lowest is None or band.min_points < lowest[0]:
            lowest = (band.min_points, band.decision)
    rule_ids = {rule.id for rule in ruleset.rules}
    seen_names: set[str] = set()
    for test in ruleset.tests:
        if test.name in seen_names:
            problems.append(
                _problem(
                    ruleset,
                    test.location,
                    f"test name {test.name!r} is used twice",
                    ProblemCode.CHECK_TEST_NAME,
                )
            )
        seen_names.add(test.name)
        named = (
            (test.expect.matched or frozenset())
            | (test.expect.shadow_matched or frozenset())
            | test.expect.errors
        )
        unknown = named - rule_ids
        if unknown:
            problems.append(
                _problem(
                    ruleset,
                    test.location,
                    f"test {test.name!r} names rules this ruleset does not have: {_names(unknown)}",
                    ProblemCode.CHECK_UNKNOWN_RULE,
                )
            )
    return problems

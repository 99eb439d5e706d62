"""The `rule-sidecar` command.

`validate` and `test` are for a GitOps repository's CI (`replay` too: what a change
does to real decisions; `explain` for the person reading why an input got its
decision): they accept exactly what the
sidecar would accept (and, unless told otherwise, no path that yields no ruleset), report
every problem in one pass as `file:line:col: message` (or JSON, or JUnit XML) and exit 0
when everything is good, 1 when something is not, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import psycopg

from sidecar import dbtools
from sidecar.config import (
    DEFAULT_SETTINGS,
    ENVIRONMENT,
    FLAGS,
    Settings,
    SettingsError,
    declaration,
    setting_from,
    settings_from,
)
from sidecar.engine import Evaluation, evaluate_ruleset
from sidecar.errors import InputError, LoadError
from sidecar.explain import RuleOutcome
from sidecar.gate import Gate, Report, examine, write_human, write_json, write_junit
from sidecar.replay import Rules, load_rules, percent, replay
from sidecar.replay import write_human as replay_human
from sidecar.replay import write_json as replay_json
from sidecar.replay import write_markdown as replay_markdown
from sidecar.sources.database import DatabaseURL, describe_error, password_from

__all__ = ["main"]

EXIT_OK = 0
EXIT_INVALID = 1
EXIT_USAGE = 2


def _gate(args: argparse.Namespace, *, run_checks: bool) -> Gate:
    return Gate(
        run_checks=run_checks, allow_empty=args.allow_empty, require_tests=args.require_tests
    )


def _report(report: Report, args: argparse.Namespace, out: TextIO, *, tests: bool) -> int:
    """Print the report as asked; `tests` reports failing cases as cases, not problems."""
    if args.format == "json":
        write_json(report, out, cases_as_problems=not tests)
    elif args.format == "junit":
        write_junit(report, out, command=args.command)
    else:
        write_human(report, out, cases=tests, verbose=getattr(args, "verbose", False))
    return EXIT_OK if report.valid else EXIT_INVALID


def _validate(args: argparse.Namespace, out: TextIO) -> int:
    report = examine(args.paths, _gate(args, run_checks=not args.no_checks))
    return _report(report, args, out, tests=False)


def _test(args: argparse.Namespace, out: TextIO) -> int:
    report = examine(args.paths, _gate(args, run_checks=True))
    return _report(report, args, out, tests=True)


def _explain(args: argparse.Namespace, out: TextIO) -> int:
    """Evaluate one input against a ruleset of rule files, saying what every rule did."""
    report = examine(args.paths, Gate(run_checks=False))
    if report.problems:
        write_human(report, sys.stderr, cases=False)
        return EXIT_INVALID
    ruleset = report.ruleset(args.ruleset, "these files")
    text = sys.stdin.read() if args.input == "-" else Path(args.input).read_text("utf-8")
    try:
        document = json.loads(text)
    except ValueError as exc:
        print(f"{args.input}: not JSON: {exc}", file=sys.stderr)
        return EXIT_INVALID
    try:
        result = evaluate_ruleset(ruleset, document, revision=report.revision() or "", explain=True)
    except InputError as exc:
        print(f"{args.input}: {exc.path}: {exc.message}", file=sys.stderr)
        return EXIT_INVALID
    if args.format == "json":
        _dump(result.to_dict(), out)
    else:
        _write_explanation(result, out)
    return EXIT_OK


def _replay(args: argparse.Namespace, out: TextIO) -> int:
    """A candidate's decisions on a file of inputs against the baseline's or the logged."""
    sides = [("candidate", load_rules(args.candidate))]
    if args.baseline:
        sides.append(("baseline", load_rules(args.baseline)))
    for side, rules in sides:
        if not rules.report.valid:
            write_human(rules.report, sys.stderr, cases=False)
            print(f"the {side} does not load: nothing was replayed", file=sys.stderr)
            return EXIT_INVALID
    baseline: Rules | None = sides[1][1] if args.baseline else None
    result = replay(
        sides[0][1], baseline, args.inputs, ruleset_id=args.ruleset, examples=args.examples
    )
    write = {"json": replay_json, "markdown": replay_markdown}.get(args.format, replay_human)
    write(result, out)
    over = args.fail_if_changed is not None and result.changed_over(args.fail_if_changed)
    return EXIT_INVALID if over else EXIT_OK


def _write_explanation(result: Evaluation, out: TextIO) -> None:
    decision = "no decision" if result.decision is None else result.decision
    out.write(f"{result.ruleset_id}: {decision} ({result.total_points} points)\n")
    rules = result.rules or ()
    width = max((len(rule.rule.id) for rule in rules), default=0)
    for rule in rules:
        points = f"{rule.rule.points:+d}" if rule.outcome is RuleOutcome.MATCHED else ""
        out.write(f"  {rule.outcome.value:<12} {rule.rule.id:<{width}} {points:>6}".rstrip() + "\n")
        for path, value in (rule.reads or {}).items():
            out.write(f"      {path} = {json.dumps(value)}\n")
        for rule_id, outcome in (rule.depends_on or {}).items():
            shown = "error" if outcome is None else json.dumps(outcome)
            out.write(f'      rules["{rule_id}"] = {shown}\n')
        if rule.error is not None:
            out.write(f"      error: {rule.error}\n")


def _serve(args: argparse.Namespace, out: TextIO) -> int:
    # Imported here so that `validate` and `test` never load the server.
    from sidecar.api.run import run  # noqa: PLC0415

    run(flag_settings(args, os.environ))


def flag_settings(args: argparse.Namespace, environ: Mapping[str, str]) -> Settings:
    """The settings of `serve`: its flags over the environment's variables."""
    overrides = {name: getattr(args, name) for name in FLAGS}
    for name, given in overrides.items():
        if isinstance(given, list):  # a repeatable flag: each value is a tuple already
            overrides[name] = tuple(item for value in given for item in value)
    return settings_from(environ, overrides)


def _database(args: argparse.Namespace) -> tuple[str, Path | None]:
    """The `db` commands' database: their flags over the variables `serve` reads."""
    url = args.database_url or setting_from(os.environ, "database_url")
    if not url:
        raise SettingsError(f"--database-url (or {ENVIRONMENT['database_url']}) is required")
    password: Path | None = args.database_password_file or setting_from(
        os.environ, "database_password_file"
    )
    return url, password


def _db_init(args: argparse.Namespace, out: TextIO) -> int:
    url, password = _database(args)
    version = dbtools.init(url, password_file=password)
    print(f"OK: {DatabaseURL.parse(url).redacted} is at schema version {version}", file=out)
    return EXIT_OK


def _db_import(args: argparse.Namespace, out: TextIO) -> int:
    url, password = _database(args)
    try:
        result = dbtools.import_files(args.paths, url, password_file=password)
    except LoadError as exc:
        for problem in exc.problems:
            print(problem, file=out)
        print(f"{len(exc.problems)} problem(s) found; nothing was imported", file=out)
        return EXIT_INVALID
    if not result.rulesets and not args.allow_empty:
        shown = " ".join(args.paths)
        print(f"no ruleset in {shown}: nothing was imported (--allow-empty accepts it)", file=out)
        return EXIT_INVALID
    print(f"OK: imported {result.rulesets} ruleset(s), {result.rules} rule(s)", file=out)
    return EXIT_OK


def _db_export(args: argparse.Namespace, out: TextIO) -> int:
    url, password = _database(args)
    try:
        text = dbtools.export_documents(url, password_file=password)
    except LoadError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        print(f"{len(exc.problems)} problem(s) found; nothing was exported", file=sys.stderr)
        return EXIT_INVALID
    if args.output is None:
        out.write(text)
    else:
        args.output.write_text(text, "utf-8")
    return EXIT_OK


def _dump(data: dict[str, Any], out: TextIO) -> None:
    json.dump(data, out, indent=2, sort_keys=True)
    out.write("\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rule-sidecar", description="Hot-reload rule service for Kubernetes."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_paths(name: str, help_text: str) -> argparse.ArgumentParser:
        command = commands.add_parser(name, help=help_text, description=help_text)
        command.add_argument(
            "paths",
            nargs="+",
            metavar="PATH",
            help="rule files or directories; '-' is standard input, and a FIFO, /dev/stdin "
            "or <(...) named here is read",
        )
        command.add_argument("--format", choices=("human", "json", "junit"), default="human")
        command.add_argument(
            "--allow-empty",
            action="store_true",
            help="accept a PATH that yields no ruleset (refused by default: an empty "
            "directory or a template that rendered nothing is never what CI means)",
        )
        command.add_argument(
            "--require-tests",
            action="store_true",
            help="refuse a ruleset without embedded tests (spec.tests)",
        )
        return command

    validate = with_paths(
        "validate", "Check rule files exactly as the sidecar would before a reload."
    )
    validate.add_argument(
        "--no-checks",
        action="store_true",
        help="skip embedded tests and semantic checks (HOT_RELOAD_VALIDATION_ENABLED=false); "
        "schema and condition compilation are always checked",
    )
    validate.set_defaults(handler=_validate)
    test = with_paths("test", "Run the embedded tests of rule files and report each case.")
    test.add_argument("-v", "--verbose", action="store_true", help="also list passing cases")
    test.set_defaults(handler=_test)

    explain = commands.add_parser(
        "explain",
        help="Evaluate one input offline and say what every rule did.",
        description="Evaluate one input against a ruleset of rule files and say, for every "
        "rule, whether it matched, did not, errored or is disabled, and which input values "
        "its condition read. Exit 0 when evaluated; 1 when the files do not load or the "
        "input is refused; 2 on a usage error (no such ruleset).",
    )
    explain.add_argument("paths", nargs="+", metavar="PATH", help="rule files or directories")
    explain.add_argument("--ruleset", required=True, metavar="ID", help="the ruleset to evaluate")
    explain.add_argument(
        "--input", required=True, metavar="FILE", help="the input document as JSON; '-' is stdin"
    )
    explain.add_argument("--format", choices=("human", "json"), default="human")
    explain.set_defaults(handler=_explain)
    _add_replay(commands)

    serve = commands.add_parser(
        "serve",
        help="Run the sidecar.",
        description="Run the sidecar: load, watch and serve rules over HTTP. Every flag "
        "also has an environment variable (shown in brackets); a flag wins.",
    )
    _add_setting_flags(serve)
    serve.set_defaults(handler=_serve)
    _add_db_commands(commands)
    return parser


def _add_setting_flags(serve: argparse.ArgumentParser) -> None:
    """One flag per setting declared with one (`sidecar.config`), its help from there."""
    for name in sorted(FLAGS, key=list(ENVIRONMENT).index):
        spec = declaration(name)
        assert spec.flag is not None
        default = getattr(DEFAULT_SETTINGS, name)
        shown = f"; default {default}" if default not in (None, ()) else ""
        serve.add_argument(
            spec.flag,
            dest=name,
            type=spec.parse,
            action="append" if isinstance(default, tuple) else "store",
            metavar=spec.flag.removeprefix("--").replace("-", "_").upper(),
            help=f"{spec.help} [{spec.variable}{shown}]",
        )


def _examples(text: str) -> int:
    """`--examples`: how many changed inputs to show, 0 or more."""
    value = int(text)
    if value < 0:
        raise ValueError(f"{text} is negative")
    return value


def _add_replay(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    replay_command = commands.add_parser(
        "replay",
        help="Evaluate real inputs against changed rules and say which decisions change.",
        description="Evaluate a file of inputs (JSON Lines, as the decision log writes "
        "them, optionally gzipped) against the candidate rules and compare each decision "
        "with the baseline rules' or, without --baseline, with the decision logged. Exit 0 "
        "when replayed; 1 when a side does not load or more than --fail-if-changed percent "
        "of the decisions change; 2 on a usage error (no such ruleset, an unreadable "
        "inputs file, nothing to compare).",
    )
    replay_command.add_argument(
        "--candidate", nargs="+", required=True, metavar="PATH", help="the changed rules"
    )
    replay_command.add_argument(
        "--baseline", nargs="+", metavar="PATH", help="the rules before the change"
    )
    replay_command.add_argument(
        "--inputs",
        required=True,
        metavar="FILE",
        help="JSON Lines ('.gz' or gzip too; '-' is stdin)",
    )
    replay_command.add_argument(
        "--ruleset",
        metavar="ID",
        help="the ruleset to replay (default: the first decision-log line's, or the "
        "candidate's only ruleset); lines logged for other rulesets are skipped",
    )
    replay_command.add_argument("--format", choices=("human", "json", "markdown"), default="human")
    replay_command.add_argument(
        "--fail-if-changed",
        type=percent,
        metavar="PERCENT",
        help="exit 1 when more than PERCENT (0 to 100) of the decisions change",
    )
    replay_command.add_argument(
        "--examples",
        type=_examples,
        default=10,
        metavar="N",
        help="show the first N changed inputs (default 10)",
    )
    replay_command.set_defaults(handler=_replay)


def _add_db_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    database = commands.add_parser(
        "db",
        help="Manage rules kept in a database.",
        description="Manage rules kept in a database.",
    )
    actions = database.add_subparsers(dest="action", required=True, metavar="ACTION")

    def action(name: str, help_text: str) -> argparse.ArgumentParser:
        command: argparse.ArgumentParser = actions.add_parser(
            name, help=help_text, description=help_text
        )
        for setting in ("database_url", "database_password_file"):
            spec = declaration(setting)
            assert spec.flag is not None
            command.add_argument(
                spec.flag, dest=setting, type=spec.parse, help=f"{spec.help} [{spec.variable}]"
            )
        return command

    action("init", "Create or upgrade the rule tables (idempotent).").set_defaults(handler=_db_init)
    load = action("import", "Validate rule files, then write them in one transaction.")
    load.add_argument("paths", nargs="+", metavar="PATH", help="rule files or directories")
    load.add_argument(
        "--allow-empty",
        action="store_true",
        help="exit 0 when the paths hold no ruleset (as validate, an error by default)",
    )
    load.set_defaults(handler=_db_import)
    dump = action("export", "Write the database's rulesets as YAML documents.")
    dump.add_argument("--output", type=Path, help="a file to write (default: standard output)")
    dump.set_defaults(handler=_db_export)


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.handler(args, out or sys.stdout)
    except (SettingsError, ValueError) as exc:
        print(f"rule-sidecar: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (sqlite3.Error, psycopg.Error) as exc:
        print(f"rule-sidecar: {_database_error(exc, args)}", file=sys.stderr)
        return EXIT_INVALID
    except OSError as exc:
        print(f"rule-sidecar: {exc}", file=sys.stderr)
        return EXIT_INVALID
    return code


def _database_error(exc: BaseException, args: argparse.Namespace) -> str:
    """The driver's message with every password masked (libpq may quote the URL)."""
    try:
        url, password_file = _database(args)
        password = password_from(password_file)
        database = DatabaseURL.parse(url)
    except (OSError, ValueError):
        return describe_error(exc, None, DatabaseURL("postgresql", ""))
    return f"{describe_error(exc, password, database)} (database {database.redacted})"


if __name__ == "__main__":
    sys.exit(main())

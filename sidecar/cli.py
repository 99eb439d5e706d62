"""The `rule-sidecar` command.

`validate` and `test` are for a GitOps repository's CI: they accept exactly what the
sidecar would accept, print `file:line:col: message` (or JSON with `--format json`) and
exit 0 when everything is good, 1 when something is not, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import psycopg

from sidecar import dbtools
from sidecar.checks import CaseResult, authoring_problems, run_tests
from sidecar.config import ENVIRONMENT, FLAGS, SettingsError, settings_from
from sidecar.errors import LoadError, Problem
from sidecar.loader import Loader, LoadResult
from sidecar.sources.database import DatabaseURL, describe_error, password_from
from sidecar.sources.files import read_rule_files

__all__ = ["main"]

EXIT_OK = 0
EXIT_INVALID = 1
EXIT_USAGE = 2


def _load(paths: Sequence[str], *, run_checks: bool) -> LoadResult:
    return Loader(run_checks=run_checks).load(read_rule_files(paths))


def _print_problems(problems: Sequence[Problem], out: TextIO) -> None:
    for problem in problems:
        print(problem, file=out)


def _validate(args: argparse.Namespace, out: TextIO) -> int:
    try:
        result = _load(args.paths, run_checks=not args.no_checks)
    except LoadError as exc:
        if args.format == "json":
            _dump({"valid": False, "problems": [p.to_dict() for p in exc.problems]}, out)
        else:
            _print_problems(exc.problems, out)
            print(f"{len(exc.problems)} problem(s) found", file=out)
        return EXIT_INVALID
    stats = result.snapshot.stats()
    if args.format == "json":
        _dump({"valid": True, "problems": [], **_counts(result)}, out)
    else:
        print(
            f"OK: {stats['ruleset_count']} ruleset(s), {stats['rule_count']} rule(s) in "
            f"{result.files} file(s); revision {stats['revision']}",
            file=out,
        )
    return EXIT_OK


def _counts(result: LoadResult) -> dict[str, Any]:
    stats = result.snapshot.stats()
    return {
        "files": result.files,
        "rulesets": stats["ruleset_count"],
        "rules": stats["rule_count"],
        "revision": stats["revision"],
    }


def _case_dict(case: CaseResult) -> dict[str, Any]:
    return {
        "ruleset_id": case.ruleset_id,
        "name": case.name,
        "location": str(case.location) if case.location else None,
        "passed": case.passed,
        "failures": list(case.failures),
        "result": case.evaluation.to_dict() if case.evaluation else None,
    }


def _test(args: argparse.Namespace, out: TextIO) -> int:
    # Tests are run and reported here one by one, so the loader does not run them.
    try:
        result = _load(args.paths, run_checks=False)
    except LoadError as exc:
        if args.format == "json":
            _dump(
                {
                    "passed": 0,
                    "failed": 0,
                    "cases": [],
                    "problems": [p.to_dict() for p in exc.problems],
                },
                out,
            )
        else:
            _print_problems(exc.problems, out)
            print(f"{len(exc.problems)} problem(s) found; no tests ran", file=out)
        return EXIT_INVALID
    rulesets = result.snapshot.rulesets.values()
    problems = [problem for ruleset in rulesets for problem in authoring_problems(ruleset)]
    cases = [case for ruleset in rulesets for case in run_tests(ruleset)]
    failed = [case for case in cases if not case.passed]
    if args.format == "json":
        _dump(
            {
                "passed": len(cases) - len(failed),
                "failed": len(failed),
                "cases": [_case_dict(case) for case in cases],
                "problems": [p.to_dict() for p in problems],
            },
            out,
        )
    else:
        _print_problems(problems, out)
        for case in cases:
            if case.passed and not args.verbose:
                continue
            status = "PASS" if case.passed else "FAIL"
            print(f"{status} {case.location}: {case.ruleset_id}: {case.name}", file=out)
            for failure in case.failures:
                print(f"    {failure}", file=out)
        print(f"{len(cases) - len(failed)} passed, {len(failed)} failed", file=out)
    return EXIT_INVALID if failed or problems else EXIT_OK


def _serve(args: argparse.Namespace, out: TextIO) -> int:
    # Imported here so that `validate` and `test` never load the server.
    from sidecar.api.run import run  # noqa: PLC0415

    overrides = {name: getattr(args, name) for name in FLAGS}
    if overrides["rules_dirs"] is not None:
        overrides["rules_dirs"] = tuple(overrides["rules_dirs"])
    return run(settings_from(os.environ, overrides))


def _database(args: argparse.Namespace) -> tuple[str, Path | None]:
    if not args.database_url:
        raise SettingsError(f"--database-url (or {ENVIRONMENT['database_url']}) is required")
    password = Path(args.database_password_file) if args.database_password_file else None
    return args.database_url, password


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
        _print_problems(exc.problems, out)
        print(f"{len(exc.problems)} problem(s) found; nothing was imported", file=out)
        return EXIT_INVALID
    print(f"OK: imported {result.rulesets} ruleset(s), {result.rules} rule(s)", file=out)
    return EXIT_OK


def _db_export(args: argparse.Namespace, out: TextIO) -> int:
    url, password = _database(args)
    text = dbtools.export_documents(url, password_file=password)
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
        command.add_argument("paths", nargs="+", metavar="PATH", help="rule files or directories")
        command.add_argument("--format", choices=("human", "json"), default="human")
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

    serve = commands.add_parser(
        "serve",
        help="Run the sidecar.",
        description="Run the sidecar: load, watch and serve rules over HTTP. Every flag "
        "also has an environment variable (shown in brackets); a flag wins.",
    )
    env = ENVIRONMENT
    serve.add_argument(
        "--rules-dir",
        dest="rules_dirs",
        action="append",
        type=Path,
        help=f"rules directory, repeatable [{env['rules_dirs']}, ':'-separated]; "
        "default: the bundled example rules",
    )
    serve.add_argument("--host", help=f"listen address [{env['host']}; 127.0.0.1]")
    serve.add_argument("--port", type=int, help=f"listen port [{env['port']}; 8000]")
    serve.add_argument("--database-url", help=f"database source [{env['database_url']}]")
    serve.add_argument(
        "--database-password-file",
        type=Path,
        help=f"database password, kept out of the URL [{env['database_password_file']}]",
    )
    serve.add_argument(
        "--kubernetes-selector",
        help="watch ConfigMaps with these labels through the Kubernetes API "
        f"[{env['kubernetes_selector']}]",
    )
    serve.add_argument(
        "--kubernetes-namespace",
        help=f"their namespace [{env['kubernetes_namespace']}; the pod's own]",
    )
    serve.add_argument(
        "--admin-token-file",
        type=Path,
        help=f"bearer token for admin endpoints and the WebSocket [{env['admin_token_file']}]",
    )
    serve.add_argument(
        "--state-dir", type=Path, help=f"keep the last good snapshot here [{env['state_dir']}]"
    )
    serve.add_argument("--metrics-host", help=f"separate metrics address [{env['metrics_host']}]")
    serve.add_argument(
        "--metrics-port", type=int, help=f"separate metrics port [{env['metrics_port']}]"
    )
    serve.add_argument("--log-level", help=f"[{env['log_level']}; INFO]")
    serve.set_defaults(handler=_serve)
    _add_db_commands(commands)
    return parser


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
        command.add_argument(
            "--database-url",
            default=os.environ.get(ENVIRONMENT["database_url"]),
            help=f"sqlite:///path or postgresql://... [{ENVIRONMENT['database_url']}]",
        )
        command.add_argument(
            "--database-password-file",
            type=Path,
            default=os.environ.get(ENVIRONMENT["database_password_file"]),
            help=f"[{ENVIRONMENT['database_password_file']}]",
        )
        return command

    action("init", "Create or upgrade the rule tables (idempotent).").set_defaults(handler=_db_init)
    load = action("import", "Validate rule files, then write them in one transaction.")
    load.add_argument("paths", nargs="+", metavar="PATH", help="rule files or directories")
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
    url = getattr(args, "database_url", None) or ""
    password_file = getattr(args, "database_password_file", None)
    try:
        password = password_from(Path(password_file) if password_file else None)
    except OSError:
        password = None
    return describe_error(exc, password, DatabaseURL("postgresql", url))


if __name__ == "__main__":
    sys.exit(main())

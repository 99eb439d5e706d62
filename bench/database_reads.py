"""Database source reads: a forced full read against the incremental one, and the memory
a read takes with a 200 MB row in the database.

What it measures:

1. Forced vs incremental read at 10k rulesets (2 rules each) on PostgreSQL, rows written
   with `COPY`. Incremental: one rule's points UPDATEd, then `DatabaseSource.read()`
   (the generation moved: every ruleset's change_id is read, one ruleset's rows). Forced:
   `forget()` then `read()`, what a forced reload and the periodic verification do (every
   row read and turned into its document again). Median of 5 each, min and max.
2. Peak RSS of one read (and load, when the read succeeds) in a fresh process, with a
   200 MB description in one ruleset beside the `fraud` ruleset, on PostgreSQL and on a
   SQLite file. The value is made by the database itself (`repeat`, `zeroblob`), so the
   writer never holds it. `--code DIR` measures the sidecar package in DIR instead (an
   older checkout: "before").

Needs PostgreSQL on 127.0.0.1:5432 (trust auth, user `postgres`, or `--admin-url`); uses
a scratch database `rs_bench_<hex>` and drops it at the end.

    python -m bench.database_reads [--quick] [--code DIR]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import psycopg

from bench._common import environment
from bench.database import scratch_database
from sidecar import dbtools
from sidecar.sources.database import DatabaseSource

ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
BIG_BYTES = 200 * 1024 * 1024
RUNS = 5

# Run in a fresh process, so that its peak RSS is this read's alone: VmHWM, the peak of
# this process image (ru_maxrss would carry over the parent's from before the exec).
CHILD = textwrap.dedent(
    """
    import json, sys, time
    from sidecar.errors import LoadError
    from sidecar.loader import Loader
    from sidecar.sources.database import DatabaseSource
    started = time.perf_counter()
    try:
        Loader().load(DatabaseSource(sys.argv[1]).read())
        outcome = "loaded"
    except LoadError as exc:
        outcome = exc.problems[0].message
    seconds = time.perf_counter() - started
    with open("/proc/self/status") as status:
        peak = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM"))
    print(json.dumps({"peak": peak, "seconds": seconds, "outcome": outcome[:160]}))
    """
)


def copy_rulesets(url: str, rulesets: int) -> None:
    """`rulesets` rulesets of 2 rules each, written with COPY (triggers run)."""
    bands = json.dumps([{"decision": "deny", "min_points": 15}])
    rows = io.StringIO()
    for i in range(rulesets):
        rows.write(f"rs-{i:05d}\tRuleset {i}\t{bands}\n")
    rules = io.StringIO()
    for i in range(rulesets):
        for letter, condition in (("a", "input.amount > 1000"), ("b", "input.country == 'FR'")):
            rules.write(f"r-{i:05d}-{letter}\trs-{i:05d}\t{condition}\t10\n")
    with psycopg.connect(url) as connection, connection.cursor() as cursor:
        with cursor.copy("COPY rule_sidecar_rulesets (id, name, decisions) FROM STDIN") as copy:
            copy.write(rows.getvalue())
        columns = "(id, ruleset_id, condition, points)"
        with cursor.copy(f"COPY rule_sidecar_rules {columns} FROM STDIN") as copy:
            copy.write(rules.getvalue())
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute("VACUUM ANALYZE")


def timed_runs(prepare: Callable[[], None], read: Callable[[], object]) -> list[float]:
    times = []
    for _ in range(RUNS):
        prepare()
        started = time.perf_counter()
        read()
        times.append(time.perf_counter() - started)
    return times


def ms(times: list[float]) -> str:
    return (
        f"median {statistics.median(times) * 1000:8.1f} ms"
        f"  [min {min(times) * 1000:.1f}, max {max(times) * 1000:.1f}]  n={len(times)}"
    )


def forced_vs_incremental(url: str, rulesets: int) -> None:
    dbtools.init(url)
    copy_rulesets(url, rulesets)
    source = DatabaseSource(url)
    started = time.perf_counter()
    files = source.read()
    print(f"  first read: {len(files):,} rulesets in {time.perf_counter() - started:.2f} s")
    points = iter(range(11, 11 + RUNS))

    def change_one() -> None:
        with psycopg.connect(url) as connection:
            connection.execute(
                "UPDATE rule_sidecar_rules SET points = %s WHERE id = 'r-00042-a'",
                (next(points),),
            )

    print(f"  incremental read (one rule changed): {ms(timed_runs(change_one, source.read))}")
    print(f"  forced read (forget + read):         {ms(timed_runs(source.forget, source.read))}")


def with_a_big_row(url: str, kind: str) -> None:
    """The rulesets of `tests/fixtures/good.yaml`, and ruleset `big` whose description is
    200 MB."""
    dbtools.init(url)
    dbtools.import_files([Path(__file__).parent.parent / "tests" / "fixtures" / "good.yaml"], url)
    if kind == "postgresql":
        with psycopg.connect(url) as connection:
            connection.execute(
                "INSERT INTO rule_sidecar_rulesets (id, description)"
                " VALUES ('big', repeat('d', %s))",
                (BIG_BYTES,),
            )
    else:
        connection = sqlite3.connect(url.removeprefix("sqlite:///"))
        connection.execute(
            "INSERT INTO rule_sidecar_rulesets (id, description)"
            " VALUES ('big', replace(hex(zeroblob(?)), '0', 'd'))",
            (BIG_BYTES // 2,),
        )
        connection.commit()
        connection.close()


def peak_rss(url: str, code: Path | None) -> dict[str, object]:
    env = dict(os.environ)
    if code is not None:
        env["PYTHONPATH"] = str(code)
    result = subprocess.run(
        [sys.executable, "-c", CHILD, url],
        capture_output=True,
        text=True,
        env=env,
        cwd=code or Path(__file__).parent.parent,
        check=True,
        timeout=600,
    )
    figures: dict[str, object] = json.loads(result.stdout.strip().splitlines()[-1])
    return figures


def report_rss(label: str, figures: dict[str, object]) -> None:
    peak = int(str(figures["peak"])) / 2**20
    print(
        f"  {label}: peak RSS {peak:,.0f} MiB, {float(str(figures['seconds'])):.2f} s;"
        f" {figures['outcome']}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1k rulesets instead of 10k")
    parser.add_argument("--admin-url", default=ADMIN_URL)
    parser.add_argument("--code", type=Path, help="measure the sidecar package in this tree")
    args = parser.parse_args()
    print(environment())
    rulesets = 1_000 if args.quick else 10_000
    if args.code is None:
        print(f"1. forced vs incremental read, {rulesets:,} rulesets (PostgreSQL)")
        with scratch_database(args.admin_url) as url:
            forced_vs_incremental(url, rulesets)
    code = f" (sidecar from {args.code})" if args.code else ""
    print(f"2. one read and load in a fresh process, a 200 MB row present{code}")
    with scratch_database(args.admin_url) as url:
        with_a_big_row(url, "postgresql")
        report_rss("PostgreSQL", peak_rss(url, args.code))
    with tempfile.TemporaryDirectory() as directory:
        sqlite_url = f"sqlite:///{directory}/rules.db"
        with_a_big_row(sqlite_url, "sqlite")
        report_rss("SQLite", peak_rss(sqlite_url, args.code))


if __name__ == "__main__":
    main()

"""Database rule source: NOTIFY to live, poll cost when nothing changed, full load.

What it measures (rules from `bench/_gen.py`, 100 rules per ruleset, no embedded tests):

1. NOTIFY -> new version live. A real `rule-sidecar serve --database-url` process
   (`HOT_RELOAD_INTERVAL_SECONDS=3600`, so only NOTIFY can trigger a reload) on a
   PostgreSQL database holding 300 rules imported with `dbtools.import_files`. Then,
   200 times, a separate psycopg connection UPDATEs one rule's points and commits; the
   clock starts when `commit()` returns, and stops at
     (a) the `rules_reloaded` WebSocket event, and
     (b) the first `GET /api/v1/rules/{id}` answer (a client polling back to back) that
         shows the new points.
   Then 50 updates with no polling client (event only), and an in-process split of one
   such reload: the full `read()` and the loader's incremental load. Part 1b: the same
   with 30 updates on the 10k-rule database of part 2 (every NOTIFY re-reads the whole
   database).                                    Target: p99 < 100 ms.
2. Poll cost when nothing changed, at 10k and 100k rules, PostgreSQL and SQLite (a file):
   `DatabaseSource(url).read()` once (the full read), then repeated `read()` calls with
   nothing changed (the `generation` fingerprint path). For reference: a bare connect +
   close, and the same fingerprint query on a connection kept open. 10k rules are written
   with `dbtools.import_files` (timed, split into validation and row writes); 100k rows
   are written directly (PostgreSQL `COPY`, SQLite `executemany`), because the import is
   too slow at that size (see part 4).                           Target: < 5 ms.
3. Full load of 10k rules from PostgreSQL: `DatabaseSource.read()` (rows -> documents)
   and `Loader().load(files)` (parse, validate, compile) timed separately, with a split of
   the loader's time and, for reference, the same rules cold-loaded from their YAML
   files. Then the service's whole resync when nothing changed: `read()` (fingerprint)
   plus `Loader.load()` of the unchanged documents.                   No target.
4. Why `import_files` is slow on PostgreSQL: 10k single-row INSERTs in one transaction
   (rolled back), ms per INSERT for the first and last 1,000, with the rules table's
   statement trigger (generation bump + pg_notify) on and then off.

Needs PostgreSQL on 127.0.0.1:5432 (trust auth, user `postgres`, or `--admin-url`). Each
run creates a scratch database `rs_bench_<hex>` and drops it at the end; SQLite files go
to a temporary directory. Timings are `time.perf_counter`, medians with min/max, p10/p90
and p99.

    /work/venv/bin/python -m bench.database            # default, about 2.5 minutes
    /work/venv/bin/python -m bench.database --quick    # small sizes, < 30 s
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import json
import statistics
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import psycopg

from bench._common import environment, fmt_ms, free_port, quantile, sidecar_process, wait_ready
from bench._gen import (
    DEFAULT_DECISION,
    TEAMS,
    decision_bands,
    generate_file,
    generate_files,
    generate_rules,
    ruleset_id,
)
from sidecar import dbtools
from sidecar.loader import LOAD_STAGES, Loader
from sidecar.rulefiles import SourceFile
from sidecar.sources.database import (
    DatabaseSource,
    DatabaseURL,
    connect,
    open_connection,
    read_documents,
)

TARGET_LIVE_P99_S = 0.100
TARGET_POLL_S = 0.005
ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
RULES_PER_SET = 100


@dataclass(frozen=True)
class Sizes:
    notify_rules: int  # part 1, imported with import_files
    updates: int
    big_updates: int  # part 1 again on the `small` database (0: skip)
    small: int  # part 2 with import_files; part 3
    large: int  # part 2 with direct writes
    polls: int
    full_reads_small: int
    full_reads_large: int
    load_runs: int
    yaml_runs: int
    split_runs: int
    quiet_updates: int  # part 1 without the polling client
    statement_rows: int  # part 4


DEFAULT = Sizes(300, 200, 30, 10_000, 100_000, 500, 3, 2, 5, 3, 20, 50, 10_000)
QUICK = Sizes(300, 20, 5, 1_000, 10_000, 100, 2, 1, 2, 1, 8, 10, 2_000)


# ---------------------------------------------------------------------------- helpers


def summary(values: Sequence[float], target_s: float | None = None) -> str:
    """Median [min..max; p10 p90] and p99, in ms (µs below 1 ms), with ratios to the target."""
    median, p99 = statistics.median(values), quantile(values, 0.99)
    scale, unit = (1e3, "ms") if median >= 1e-3 else (1e6, "us")
    text = (
        f"median {median * scale:8.2f} {unit}  [min {min(values) * scale:.2f} .. max "
        f"{max(values) * scale:.2f}; p10 {quantile(values, 0.1) * scale:.2f} "
        f"p90 {quantile(values, 0.9) * scale:.2f}]  p99 {p99 * scale:.2f} {unit}  n={len(values)}"
    )
    if target_s is not None:
        text += f"  ratio to target: median {median / target_s:.2f}, p99 {p99 / target_s:.2f}"
    return text


def timed(function: Any, *args: Any) -> tuple[float, Any]:
    started = time.perf_counter()
    result = function(*args)
    return time.perf_counter() - started, result


class StageClock:
    """Accumulates the wall time spent inside wrapped functions."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def wrap(self, name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - started
                self.calls[name] += 1

        return timed


@contextmanager
def wrapped(clock: StageClock, targets: Sequence[tuple[Any, str]]) -> Iterator[StageClock]:
    """Time calls of `owner.name` for each target (this process only); restore after."""
    saved = [(owner, name, getattr(owner, name)) for owner, name in targets]
    try:
        for owner, name, function in saved:
            setattr(owner, name, clock.wrap(name, function))
        yield clock
    finally:
        for owner, name, function in saved:
            setattr(owner, name, function)


@contextmanager
def scratch_database(admin_url: str) -> Iterator[str]:
    """A new PostgreSQL database for this run, dropped at the end whatever happens."""
    name = f"rs_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    parts = urlsplit(admin_url)
    try:
        yield urlunsplit(parts._replace(path=f"/{name}"))
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def clear(url: str) -> None:
    """Remove every ruleset and rule (the schema, triggers and generation stay)."""
    database = DatabaseURL.parse(url)
    with connect(database) as connection:
        if database.kind == "postgresql":
            connection.execute("TRUNCATE rule_sidecar_rules, rule_sidecar_rulesets")
        else:
            connection.execute("DELETE FROM rule_sidecar_rules")
            connection.execute("DELETE FROM rule_sidecar_rulesets")
    if database.kind == "postgresql":
        with psycopg.connect(url, autocommit=True) as connection:
            connection.execute("VACUUM ANALYZE")


def import_generated(url: str, total: int, workdir: Path) -> tuple[float, int]:
    """`dbtools.import_files` of `total` generated rules; returns (seconds, rules)."""
    folder = workdir / f"import-{total}"
    folder.mkdir(exist_ok=True)
    paths = []
    for source in generate_files(total, RULES_PER_SET):
        path = folder / Path(source.name).name
        path.write_bytes(source.content)
        paths.append(path)
    gc.collect()
    clock = StageClock()
    targets = [
        (dbtools, "read_rule_files"),
        (dbtools.Loader, "load"),
        (dbtools, "read_documents"),
        (dbtools, "write_ruleset"),
    ]
    with wrapped(clock, targets):
        seconds, result = timed(dbtools.import_files, paths, url)
    t = clock.seconds
    rest = seconds - sum(t.values())
    print(
        f"  import_files of {result.rules:,} rules into {DatabaseURL.parse(url).kind}:"
        f" {seconds:.2f} s = read files {t['read_rule_files']:.2f} + validate"
        f" ({clock.calls['load']} loads) {t['load']:.2f} + read_documents"
        f" {t['read_documents']:.2f} + write rows {t['write_ruleset']:.2f} + commit, rest"
        f" {rest:.2f}"
    )
    return seconds, result.rules


def generated_rows(total: int) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """The rows `import_files` would write for `generate_files(total)`, built directly."""
    rulesets, rules = [], []
    for index, start in enumerate(range(0, total, RULES_PER_SET)):
        count = min(RULES_PER_SET, total - start)
        team = TEAMS[index % len(TEAMS)]
        labels = {"team": team, "tier": "critical" if index % 3 == 0 else "standard"}
        rulesets.append(
            (
                ruleset_id(index),
                f"Payments risk scoring {index}",
                f"Benchmark ruleset {index}, owned by {team}.",
                json.dumps(labels),
                json.dumps(decision_bands(count)),
                DEFAULT_DECISION,
                "[]",
            )
        )
        for position, rule in enumerate(generate_rules(index, count)):
            rules.append(
                (
                    rule.id,
                    ruleset_id(index),
                    position,
                    rule.name,
                    rule.description,
                    rule.condition,
                    rule.points,
                    True,
                    rule.priority,
                    json.dumps(list(rule.tags)),
                    json.dumps(rule.metadata),
                )
            )
    return rulesets, rules


_RULESET_INSERT = (
    "rule_sidecar_rulesets (id, name, description, labels, decisions, default_decision, tests)"
)
_RULE_INSERT = (
    "rule_sidecar_rules (id, ruleset_id, position, name, description, condition, points,"
    " enabled, priority, tags, metadata)"
)


def write_direct(url: str, total: int) -> tuple[float, int]:
    """Write the generated rows without validation: COPY (PostgreSQL), executemany (SQLite)."""
    rulesets, rules = generated_rows(total)
    database = DatabaseURL.parse(url)
    started = time.perf_counter()
    with connect(database) as connection:
        if database.kind == "postgresql":
            cursor = connection.cursor()
            with cursor.copy(f"COPY {_RULESET_INSERT} FROM STDIN") as copy:
                for row in rulesets:
                    copy.write_row(row)
            with cursor.copy(f"COPY {_RULE_INSERT} FROM STDIN") as copy:
                for row in rules:
                    copy.write_row(row)
        else:
            connection.executemany(
                f"INSERT INTO {_RULESET_INSERT} VALUES (?, ?, ?, ?, ?, ?, ?)", rulesets
            )
            connection.executemany(
                f"INSERT INTO {_RULE_INSERT} VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rules
            )
    seconds = time.perf_counter() - started
    if database.kind == "postgresql":
        with psycopg.connect(url, autocommit=True) as connection:
            connection.execute("VACUUM ANALYZE")
    return seconds, len(rules)


def warm_process() -> None:
    """One small load so one-time process costs (schema check, validator) are not counted."""
    Loader().load([generate_file(99_999, 10, seed=1)])


# ---------------------------------------------------------------------------- part 1


async def poll_live(session: aiohttp.ClientSession, base: str, rule_id: str, points: int) -> float:
    """GET the rule back to back until it shows the new points; returns when it did."""
    while True:
        async with session.get(f"{base}/api/v1/rules/{rule_id}") as response:
            body = await response.json()
        if body["points"] == points:
            return time.perf_counter()


_NEW_POINTS = itertools.count(100_000)


@dataclass
class LiveResult:
    to_event: list[float]
    to_live: list[float]
    reload_ms: list[float]  # the server's own reload_time_ms, from the event
    commits: list[float]  # how long commit() took (not counted above)


async def notify_to_live(
    url: str, rules: int, updates: int, timeout_s: float, *, poll: bool = True
) -> LiveResult:
    """`poll` False: no client polls the rule, only the WebSocket event is awaited."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    result = LiveResult([], [], [], [])
    rulesets = max(1, rules // RULES_PER_SET)
    with (
        sidecar_process(port, "--database-url", url),
        psycopg.connect(url) as writer,
    ):
        async with aiohttp.ClientSession() as session:
            await wait_ready(session, base, time.monotonic() + 60)
            async with session.ws_connect(f"{base.replace('http', 'ws')}/ws/hot-reload") as ws:
                await ws.receive_json()  # status on connect
                warmup = 3
                for i in range(-warmup, updates):
                    # Rules spread over every ruleset; points never used before.
                    rule_id = f"r{(i % rulesets):05d}-{((i * 7) % RULES_PER_SET):04d}"
                    points = next(_NEW_POINTS)
                    await asyncio.sleep(0.05)  # let the previous reload settle
                    writer.execute(
                        "UPDATE rule_sidecar_rules SET points = %s WHERE id = %s",
                        (points, rule_id),
                    )
                    before_commit = time.perf_counter()
                    writer.commit()
                    started = time.perf_counter()
                    if poll:
                        live = asyncio.create_task(poll_live(session, base, rule_id, points))
                    while True:
                        message = await asyncio.wait_for(ws.receive_json(), timeout=timeout_s)
                        if message["event_type"] == "reload_failed":
                            raise RuntimeError(f"reload failed: {message['data']['errors']}")
                        if message["event_type"] == "rules_reloaded":
                            event_at = time.perf_counter()
                            reload_ms = message["data"]["reload_time_ms"]
                            break
                    live_at = await asyncio.wait_for(live, timeout=timeout_s) if poll else 0.0
                    if i < 0:
                        continue  # warm-up
                    result.to_event.append(event_at - started)
                    if poll:
                        result.to_live.append(live_at - started)
                    result.reload_ms.append(reload_ms / 1e3)
                    result.commits.append(started - before_commit)
    return result


def report_live(label: str, result: LiveResult) -> None:
    print(f"  {label}, updates: {len(result.to_event)}")
    print(f"    commit -> rules_reloaded event : {summary(result.to_event, TARGET_LIVE_P99_S)}")
    if result.to_live:
        print(f"    commit -> GET shows new points : {summary(result.to_live, TARGET_LIVE_P99_S)}")
    print(f"    server's reload_time_ms        : {summary(result.reload_ms)}")
    print(f"    commit() itself (not counted)  : {summary(result.commits)}")


def reload_split(url: str, rules: int, runs: int) -> None:
    """What the server's reload does after one NOTIFY, in this process and timed apart:
    the full `read()` (the generation moved) and the loader's incremental load, in which
    one 100-rule document changed."""
    source = DatabaseSource(url, listen=False)
    loader = Loader()
    loader.load(source.read())
    rulesets = max(1, rules // RULES_PER_SET)
    reads, loads = [], []
    with psycopg.connect(url) as writer:
        for i in range(runs):
            writer.execute(
                "UPDATE rule_sidecar_rules SET description = %s WHERE id = %s",
                (f"edited {i}", f"r{(i % rulesets):05d}-0001"),
            )
            writer.commit()
            read_s, files = timed(source.read)
            load_s, result = timed(loader.load, files)
            if result.files_parsed != 1:
                raise RuntimeError(f"expected 1 changed document, got {result.files_parsed}")
            reads.append(read_s)
            loads.append(load_s)
    print(f"    in-process split of one such reload ({runs} edits of a description):")
    print(f"      read(), full                 : {summary(reads)}")
    print(f"      Loader.load, 1 document new  : {summary(loads)}")


# ---------------------------------------------------------------------------- part 2


def fingerprint_query_open(url: str, polls: int) -> list[float]:
    """The fingerprint's statements on a connection kept open: what a pooled read costs."""
    database = DatabaseURL.parse(url)
    times = []
    connection = open_connection(database)
    try:
        for _ in range(polls):
            started = time.perf_counter()
            if database.kind == "postgresql":
                connection.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            else:
                connection.execute("BEGIN")
            connection.execute("SELECT generation FROM rule_sidecar_state").fetchone()
            connection.commit()
            times.append(time.perf_counter() - started)
    finally:
        connection.close()
    return times


def bare_connect(url: str, polls: int) -> list[float]:
    """Open and close a connection the way `read()` does, with no statement."""
    database = DatabaseURL.parse(url)
    times = []
    for _ in range(polls):
        started = time.perf_counter()
        with connect(database):
            pass
        times.append(time.perf_counter() - started)
    return times


def poll_cost(label: str, url: str, rules: int, sizes: Sizes, full_reads: int) -> DatabaseSource:
    source = DatabaseSource(url, listen=False)
    reads = []
    for _ in range(full_reads):
        source.forget()
        gc.collect()
        seconds, files = timed(source.read)
        reads.append(seconds)
    size = sum(len(file.content) for file in files)
    print(
        f"  {label} {rules:,} rules: full read() {fmt_ms(reads)};"
        f" {len(files)} documents, {size / 2**20:.1f} MiB"
    )
    polls = []
    for _ in range(sizes.polls):
        seconds, again = timed(source.read)
        polls.append(seconds)
    if len(again) != len(files):
        raise RuntimeError("a read with nothing changed returned other documents")
    print(f"    read(), nothing changed      : {summary(polls, TARGET_POLL_S)}")
    print(f"    ref: connect + close only    : {summary(bare_connect(url, sizes.polls))}")
    print(f"    ref: fingerprint, open conn. : {summary(fingerprint_query_open(url, sizes.polls))}")
    return source


# ---------------------------------------------------------------------------- part 3


def loader_split(files: Sequence[SourceFile], runs: int) -> tuple[dict[str, float], float]:
    """Median seconds per stage over cold loads (the loader's own stage timings), and the
    median total."""
    per_run: list[dict[str, float]] = []
    totals = []
    for _ in range(runs):
        loader = Loader()
        gc.collect()
        seconds, result = timed(loader.load, files)
        stages = {stage.value: result.timings[stage] for stage in LOAD_STAGES}
        stages["rest of Loader.load (outside the stages)"] = seconds - sum(stages.values())
        per_run.append(stages)
        totals.append(seconds)
    medians = {stage: statistics.median(run[stage] for run in per_run) for stage in per_run[0]}
    return medians, statistics.median(totals)


def encode_all(documents: Iterable[Any], indent: int | None) -> list[bytes]:
    return [json.dumps(d, indent=indent, ensure_ascii=False).encode() for d in documents]


def read_split(url: str, runs: int = 3) -> dict[str, float]:
    """The full read's parts (medians): the query with rows -> dicts, then dicts -> JSON
    bytes as `read()` writes them, and for reference without indentation."""
    database = DatabaseURL.parse(url)
    parts: dict[str, list[float]] = {}
    for _ in range(runs):
        gc.collect()
        with connect(database) as connection:
            query_s, (_, documents) = timed(read_documents, connection)
        dumps_s, _ = timed(encode_all, documents.values(), 1)
        compact_s, _ = timed(encode_all, documents.values(), None)
        for stage, seconds in (
            ("read_documents (query, rows -> dicts)", query_s),
            ("json.dumps(indent=1), as read() does", dumps_s),
            ("  ref: json.dumps without indent (C)", compact_s),
        ):
            parts.setdefault(stage, []).append(seconds)
    return {stage: statistics.median(values) for stage, values in parts.items()}


def full_load(url: str, rules: int, sizes: Sizes) -> None:
    warm_process()
    reads, loads = [], []
    files: list[SourceFile] = []
    loader = Loader()
    for _ in range(sizes.load_runs):
        source = DatabaseSource(url, listen=False)
        gc.collect()
        read_s, files = timed(source.read)
        loader = Loader()
        gc.collect()
        load_s, result = timed(loader.load, files)
        reads.append(read_s)
        loads.append(load_s)
    if len(result.snapshot.rules) != rules:
        raise RuntimeError(f"loaded {len(result.snapshot.rules)} rules, expected {rules}")
    totals = [r + lo for r, lo in zip(reads, loads, strict=True)]
    print(f"  {rules:,} rules from PostgreSQL ({len(files)} rulesets):")
    print(f"    DatabaseSource.read()  : {fmt_ms(reads)}")
    print(f"    Loader().load(files)   : {fmt_ms(loads)}")
    print(f"    together               : {fmt_ms(totals)}")

    yaml_files = generate_files(rules, RULES_PER_SET)
    yaml_loads = []
    for _ in range(sizes.yaml_runs):
        gc.collect()
        yaml_loads.append(timed(Loader().load, yaml_files)[0])
    db_bytes = sum(len(f.content) for f in files)
    yaml_bytes = sum(len(f.content) for f in yaml_files)
    print(
        f"    ref: same rules as YAML files, Loader().load: {fmt_ms(yaml_loads)};"
        f" database documents are {statistics.median(loads) / statistics.median(yaml_loads):.2f}x"
        f" the time, {db_bytes / 2**20:.2f} MiB vs {yaml_bytes / 2**20:.2f} MiB"
    )
    print("    where read()'s time goes (medians of 3):")
    for stage, seconds in read_split(url).items():
        print(f"      {stage:40s} {seconds * 1e3:8.1f} ms")
    stages, total = loader_split(files, sizes.yaml_runs)
    print(
        f"    where Loader().load's time goes (median of {sizes.yaml_runs}"
        f" runs, total {total * 1e3:.0f} ms):"
    )
    for stage, seconds in stages.items():
        print(f"      {stage:48s} {seconds * 1e3:8.1f} ms  {seconds / total * 100:5.1f}%")

    # The service's resync when nothing changed: fingerprint read + unchanged load.
    source = DatabaseSource(url, listen=False)
    source.read()
    loader.load(source.read())
    resync, unchanged = [], []
    for _ in range(sizes.polls // 5):
        started = time.perf_counter()
        same = source.read()
        middle = time.perf_counter()
        loader.load(same)
        ended = time.perf_counter()
        resync.append(ended - started)
        unchanged.append(ended - middle)
    print(f"    service resync, nothing changed (read + load): {summary(resync, TARGET_POLL_S)}")
    print(f"      of which Loader.load of unchanged documents : {summary(unchanged)}")


# ---------------------------------------------------------------------------- part 4


def statement_writes(url: str, rows: int) -> None:
    """One INSERT statement per rule in one transaction (rolled back), with the rules
    table's statement trigger (generation bump + pg_notify) on, then off: ms per INSERT
    for the first and the last 1,000."""
    window = min(1_000, rows // 2)
    with psycopg.connect(url) as connection:
        for trigger in ("on", "off"):
            if trigger == "off":
                connection.execute(
                    "ALTER TABLE rule_sidecar_rules DISABLE TRIGGER rule_sidecar_rules_changed"
                )
            connection.execute("INSERT INTO rule_sidecar_rulesets (id) VALUES ('rs-writes')")
            times = []
            for i in range(rows):
                started = time.perf_counter()
                connection.execute(
                    "INSERT INTO rule_sidecar_rules (id, ruleset_id, condition, points)"
                    " VALUES (%s, 'rs-writes', 'true', 1)",
                    (f"w{i:06d}",),
                )
                times.append(time.perf_counter() - started)
            connection.rollback()
            print(
                f"  {rows:,} INSERTs, statement trigger {trigger:3s}: total {sum(times):.2f} s;"
                f" per INSERT, first {window:,}: {statistics.median(times[:window]) * 1e3:.3f} ms,"
                f" last {window:,}: {statistics.median(times[-window:]) * 1e3:.3f} ms (medians)"
            )


# ---------------------------------------------------------------------------- main


def run(sizes: Sizes, admin_url: str) -> None:
    print(environment())
    print(f"sizes: {sizes}")
    with tempfile.TemporaryDirectory() as tmp, scratch_database(admin_url) as pg:
        workdir = Path(tmp)
        dbtools.init(pg)
        print(f"scratch database {DatabaseURL.parse(pg).redacted}")

        print(f"\n1. NOTIFY -> new version live (target p99 < {TARGET_LIVE_P99_S * 1e3:.0f} ms)")
        _, count = import_generated(pg, sizes.notify_rules, workdir)
        live = asyncio.run(notify_to_live(pg, count, sizes.updates, timeout_s=10))
        report_live(f"{count} rules, a client polling GET back to back", live)
        quiet = asyncio.run(notify_to_live(pg, count, sizes.quiet_updates, 10, poll=False))
        report_live(f"{count} rules, no polling client (event only)", quiet)
        reload_split(pg, count, sizes.split_runs)

        print(f"\n2. Poll cost when nothing changed (target < {TARGET_POLL_S * 1e3:.0f} ms)")
        clear(pg)
        _, count = import_generated(pg, sizes.small, workdir)
        poll_cost("PostgreSQL", pg, count, sizes, sizes.full_reads_small)

        print("\n3. Full load from PostgreSQL")
        full_load(pg, count, sizes)

        if sizes.big_updates:
            print(f"\n1b. NOTIFY -> new version live, {count:,} rules (part 2's database)")
            live = asyncio.run(notify_to_live(pg, count, sizes.big_updates, timeout_s=60))
            report_live(f"{count:,} rules", live)
            reload_split(pg, count, max(3, sizes.split_runs // 4))

        print(f"\n2 (cont.). Poll cost at {sizes.large:,} rules")
        clear(pg)
        seconds, count = write_direct(pg, sizes.large)
        print(f"  PostgreSQL: COPY of {count:,} rows: {seconds:.2f} s")
        poll_cost("PostgreSQL", pg, count, sizes, sizes.full_reads_large)

        sqlite_url = f"sqlite:///{workdir / 'rules.db'}"
        dbtools.init(sqlite_url)
        _, count = import_generated(sqlite_url, sizes.small, workdir)
        poll_cost("SQLite", sqlite_url, count, sizes, sizes.full_reads_small)
        clear(sqlite_url)
        seconds, count = write_direct(sqlite_url, sizes.large)
        print(f"  SQLite: executemany of {count:,} rows: {seconds:.2f} s")
        poll_cost("SQLite", sqlite_url, count, sizes, sizes.full_reads_large)

        print("\n4. Row-at-a-time writes in one transaction, as import_files does (PostgreSQL)")
        statement_writes(pg, sizes.statement_rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, < 30 s")
    parser.add_argument("--admin-url", default=ADMIN_URL, help=f"[{ADMIN_URL}]")
    args = parser.parse_args()
    run(QUICK if args.quick else DEFAULT, args.admin_url)


if __name__ == "__main__":
    main()

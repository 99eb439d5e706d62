"""What a change to rule files does to real decisions: `rule-sidecar replay`.

A pull request's rules (the candidate) evaluate a file of real inputs, JSON Lines as the
decision log writes them (or `{"input": ...}`, or bare input objects), and every
decision is compared with the baseline's: the rules the change started from, or, without
them, the decision each decision-log line logged. The answer is a matrix of decisions
(from, to, count), each rule's matches on both sides, the rules that error where they
did not, and the first changed inputs as examples.

Both rule sets are loaded as `validate` loads them (`sidecar.gate.examine`) and every
input is evaluated by `sidecar.engine.evaluate_ruleset`, so a replay answers what the
sidecar would. Evaluation is the cost (two rulesets per input), so a large file is
evaluated by worker processes, one per core: the file is read in blocks cut at line
ends, each block evaluated by a worker into counts that merge exactly, whatever the
order the blocks finish in. Workers take the loaded rulesets pickled (their conditions
in cel-cpp's serialized form, bound in a tenth of a compile): a rule file read from
standard input or a FIFO can be read only once.
"""

from __future__ import annotations

import gzip
import itertools
import json
import math
import multiprocessing
import os
import pickle
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Final, TextIO

from sidecar.conditions import ConditionCompiler
from sidecar.engine import Evaluation, evaluate_ruleset
from sidecar.errors import InputError
from sidecar.gate import Gate, Report, examine
from sidecar.jsoncodec import loads
from sidecar.model import RuleSet

__all__ = [
    "BLOCK_BYTES",
    "Replay",
    "ReplayError",
    "Rules",
    "load_rules",
    "replay",
    "write_human",
    "write_json",
    "write_markdown",
]

BLOCK_BYTES: Final = 1 << 20
"""How much of the inputs file one worker task takes (cut at a line end): about 1,500
decision-log lines, a tenth of a second of work, so both cores stay busy to the end."""

_GZIP_MAGIC: Final = b"\x1f\x8b"
MAX_LINE_BYTES: Final = 8 * 1024 * 1024
"""A line longer than this is refused (a decision-log line holds an input of at most 1 MiB
of characters, 6 MiB with every one escaped): a file with no line end, /dev/zero or a
gzip bomb, is not read into memory whole."""
_MAX_WORKERS: Final = 8
_LISTED: Final = 10  # line numbers kept of invalid and not comparable lines
_CELL: Final = 120  # characters of a value shown in a Markdown table


class ReplayError(ValueError):
    """A usage error (exit 2): no such ruleset, an unreadable inputs file, nothing to
    compare."""


@dataclass(frozen=True, slots=True)
class Rules:
    """One side of a replay: what `validate` found in its paths."""

    paths: tuple[str, ...]
    report: Report


def load_rules(paths: Sequence[str]) -> Rules:
    """Rule files loaded exactly as `rule-sidecar validate` loads them."""
    return Rules(tuple(paths), examine(paths, Gate()))


# The counts of a replay, merged from every block.


@dataclass(slots=True)
class _Tally:
    """What a block of lines gave; `merge` adds another block's, in any order."""

    lines: int = 0
    inputs: int = 0
    points_changed: int = 0
    skipped: int = 0
    matrix: Counter[tuple[str | None, str | None]] = field(default_factory=Counter)
    baseline_matches: Counter[str] = field(default_factory=Counter)
    candidate_matches: Counter[str] = field(default_factory=Counter)
    # rule id -> [count, first line, its error there]
    new_errors: dict[str, list[Any]] = field(default_factory=dict)
    examples: list[dict[str, Any]] = field(default_factory=list)
    refused: int = 0
    refused_inputs: list[dict[str, Any]] = field(default_factory=list)
    invalid: int = 0
    invalid_lines: list[int] = field(default_factory=list)
    not_comparable: int = 0
    not_comparable_lines: list[int] = field(default_factory=list)

    def merge(self, other: _Tally, keep: int) -> None:
        self.lines += other.lines
        self.inputs += other.inputs
        self.points_changed += other.points_changed
        self.skipped += other.skipped
        self.matrix.update(other.matrix)
        self.baseline_matches.update(other.baseline_matches)
        self.candidate_matches.update(other.candidate_matches)
        for rule_id, (count, line, error) in other.new_errors.items():
            mine = self.new_errors.get(rule_id)
            if mine is None:
                self.new_errors[rule_id] = [count, line, error]
            else:
                mine[0] += count
                if line < mine[1]:
                    mine[1], mine[2] = line, error
        self.examples = _first(self.examples, other.examples, keep)
        self.refused += other.refused
        self.refused_inputs = _first(self.refused_inputs, other.refused_inputs, keep)
        self.invalid += other.invalid
        self.invalid_lines = sorted(self.invalid_lines + other.invalid_lines)[:_LISTED]
        self.not_comparable += other.not_comparable
        self.not_comparable_lines = sorted(self.not_comparable_lines + other.not_comparable_lines)[
            :_LISTED
        ]


def _first(ours: list[dict[str, Any]], theirs: list[dict[str, Any]], keep: int) -> list[Any]:
    return sorted(ours + theirs, key=lambda item: int(item["line"]))[:keep]


@dataclass(frozen=True, slots=True)
class _Setup:
    """What every worker needs: the rulesets, and what to keep."""

    ruleset_id: str
    candidate: RuleSet
    baseline: RuleSet | None
    examples: int


class _Replayer:
    """Evaluates lines against the candidate and the baseline (or the logged decision)."""

    def __init__(self, setup: _Setup) -> None:
        self.setup = setup
        for ruleset in (setup.candidate, setup.baseline):
            if ruleset is not None:
                ruleset.plan.conditions.prepare()  # the fast path from the first input

    def block(self, first_line: int, data: bytes) -> _Tally:
        tally = _Tally()
        for number, raw in enumerate(data.split(b"\n"), first_line):
            if raw.strip():
                tally.lines += 1
                self._line(tally, number, raw)
        return tally

    def _line(self, tally: _Tally, number: int, raw: bytes) -> None:
        setup = self.setup
        line = _parse(raw)
        if line is None or not _well_formed(line):
            tally.invalid += 1
            if len(tally.invalid_lines) < _LISTED:
                tally.invalid_lines.append(number)
            return
        if _other_ruleset(line, setup.ruleset_id):
            tally.skipped += 1
            return
        logged = "input" in line and "decision" in line
        if setup.baseline is None and not logged:
            tally.not_comparable += 1
            if len(tally.not_comparable_lines) < _LISTED:
                tally.not_comparable_lines.append(number)
            return
        document = line.get("input", line)
        try:
            new = evaluate_ruleset(setup.candidate, document)
        except InputError as exc:
            tally.refused += 1
            if len(tally.refused_inputs) < setup.examples:
                error = f"{exc.path}: {exc.message}"
                tally.refused_inputs.append({"line": number, "error": error})
            return
        if setup.baseline is not None:
            old = evaluate_ruleset(setup.baseline, document)
            before: tuple[str | None, Any] = (old.decision, old.total_points)
            old_errors = {e.rule_id for e in (*old.errors, *old.shadow_errors)}
            for rule in (*old.matched, *old.shadow_matched):
                tally.baseline_matches[rule.id] += 1
        else:
            before = (line["decision"], line.get("total_points"))
            old_errors = set(line.get("errors", ()))
            for rule_id in (*line.get("matched", ()), *line.get("shadow_matched", ())):
                tally.baseline_matches[rule_id] += 1
        self._compare(tally, number, line, before, old_errors, new)

    def _compare(  # noqa: PLR0917 (private, one call above)
        self,
        tally: _Tally,
        number: int,
        line: dict[str, Any],
        before: tuple[str | None, Any],
        old_errors: set[str],
        new: Evaluation,
    ) -> None:
        tally.inputs += 1
        for rule in (*new.matched, *new.shadow_matched):
            tally.candidate_matches[rule.id] += 1
        for error in (*new.errors, *new.shadow_errors):
            if error.rule_id in old_errors:
                continue
            found = tally.new_errors.get(error.rule_id)
            if found is None:
                tally.new_errors[error.rule_id] = [1, number, error.error]
            else:
                found[0] += 1
        old_decision, old_points = before
        tally.matrix[old_decision, new.decision] += 1
        if old_points != new.total_points:
            tally.points_changed += 1
        if old_decision != new.decision and len(tally.examples) < self.setup.examples:
            example: dict[str, Any] = {"line": number}
            decision_id = line.get("decision_id")
            if isinstance(decision_id, str):
                example["decision_id"] = decision_id
            example.update(
                {
                    "from": old_decision,
                    "to": new.decision,
                    "total_points": [old_points, new.total_points],
                }
            )
            tally.examples.append(example)


def _parse(raw: bytes) -> dict[str, Any] | None:
    """The line's object, or None when it is not a JSON object."""
    try:
        value = loads(raw)
    except ValueError:
        try:  # orjson refuses integers past 64 bits, which the json module reads
            value = json.loads(raw)
        except (ValueError, RecursionError):  # RecursionError: nested too deep for it
            return None
    return value if isinstance(value, dict) else None


def _well_formed(line: dict[str, Any]) -> bool:
    """Whether a line with an `input` has the other fields in the shapes the decision log
    writes them (a bare input object has none of them to check)."""
    if "input" not in line:
        return True
    decision = line.get("decision")
    if decision is not None and not isinstance(decision, str):
        return False
    for name in ("matched", "shadow_matched", "errors"):
        listed = line.get(name, [])
        if not isinstance(listed, list) or not all(isinstance(item, str) for item in listed):
            return False
    return isinstance(line.get("ruleset_id", ""), str)


def _other_ruleset(line: dict[str, Any], ruleset_id: str) -> bool:
    return "input" in line and line.get("ruleset_id", ruleset_id) != ruleset_id


# Reading the inputs file in blocks.


def _open(path: str) -> BinaryIO:
    """The inputs, decompressed when gzip (by suffix or by its magic bytes)."""
    if path == "-":
        stdin: Any = sys.stdin.buffer  # a BufferedReader: it can peek
        return gzip.GzipFile(fileobj=stdin) if stdin.peek(2)[:2] == _GZIP_MAGIC else stdin  # type: ignore[return-value]
    raw = open(path, "rb")  # noqa: SIM115 (closed by the caller)
    try:
        magic = raw.peek(2)[:2]  # not read: a FIFO or <(...) cannot seek back
    except OSError:
        raw.close()
        raise
    if path.endswith(".gz") or magic == _GZIP_MAGIC:
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    return raw


def _blocks(stream: BinaryIO, size: int) -> Iterator[tuple[int, bytes]]:
    """(first line number, whole lines) about `size` bytes at a time."""
    line = 1
    rest = b""
    while True:
        data = stream.read(size)
        if not data:
            break
        data = rest + data
        cut = data.rfind(b"\n")
        if cut < 0:
            if len(data) > MAX_LINE_BYTES:
                raise ReplayError(f"line {line} is longer than {MAX_LINE_BYTES} bytes")
            rest = data
            continue
        block, rest = data[: cut + 1], data[cut + 1 :]
        yield line, block
        line += block.count(b"\n")
    if rest:
        yield line, rest


def _ruleset_of(blocks: Iterator[tuple[int, bytes]], held: list[tuple[int, bytes]]) -> str | None:
    """The `ruleset_id` of the first decision-log line (one beside its `input`) within the
    first `MAX_LINE_BYTES` of the file; the blocks read to find it are kept in `held`, to
    be evaluated like the rest. Looking no further keeps a file of plain inputs from
    being held whole."""
    kept = 0
    for block in blocks:
        held.append(block)
        for raw in block[1].split(b"\n"):
            line = _parse(raw) if raw.strip() else None
            if line is not None and "input" in line and isinstance(line.get("ruleset_id"), str):
                return str(line["ruleset_id"])
        kept += len(block[1])
        if kept >= MAX_LINE_BYTES:
            break
    return None


# Workers.

_worker: _Replayer | None = None


def _start_worker(setup: bytes) -> None:
    global _worker  # noqa: PLW0603 (one replayer per worker process)
    loaded: _Setup = pickle.loads(setup)  # from the parent process
    compiler = ConditionCompiler()
    for ruleset in (loaded.candidate, loaded.baseline):
        if ruleset is not None:
            ruleset.plan.conditions.bind(compiler)
    _worker = _Replayer(loaded)


def _work(first_line: int, data: bytes) -> _Tally:
    assert _worker is not None
    return _worker.block(first_line, data)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _evaluate(
    setup: _Setup, blocks: Iterator[tuple[int, bytes]], held: list[tuple[int, bytes]]
) -> _Tally:
    """Every block's tally, merged: in this process when the file is one block or there is
    one core, else by a worker process per core, a few blocks in flight each."""
    total = _Tally()
    workers = min(_cores(), _MAX_WORKERS)
    every = itertools.chain(held, blocks)
    opening = list(itertools.islice(every, 2))
    if len(opening) < 2 or workers < 2:  # one block: no process is worth its start
        replayer = _Replayer(setup)
        for block in itertools.chain(opening, every):
            total.merge(replayer.block(*block), setup.examples)
        return total
    context = multiprocessing.get_context("spawn")  # never fork a process that may hold locks
    shipped = pickle.dumps(setup, pickle.HIGHEST_PROTOCOL)
    with ProcessPoolExecutor(
        workers, context, initializer=_start_worker, initargs=(shipped,)
    ) as pool:
        pending: list[Future[_Tally]] = []
        for block in itertools.chain(opening, every):
            pending.append(pool.submit(_work, *block))
            while len(pending) >= 2 * workers:
                total.merge(pending.pop(0).result(), setup.examples)
        for future in pending:
            total.merge(future.result(), setup.examples)
    return total


# The replay.


@dataclass(frozen=True, slots=True, kw_only=True)
class Replay:
    """A replay's outcome; `to_dict` is its JSON."""

    ruleset: str
    inputs_path: str
    compared_with: str  # "baseline" or "log"
    tally: _Tally
    candidate: RuleSet
    baseline: RuleSet | None

    @property
    def changed(self) -> int:
        return sum(count for (old, new), count in self.tally.matrix.items() if old != new)

    def changed_over(self, percent: float) -> bool:
        """Whether more than `percent` % of the inputs compared changed decision."""
        return self.changed * 100 > percent * self.tally.inputs

    def to_dict(self) -> dict[str, Any]:
        tally = self.tally
        inputs = tally.inputs
        percent = round(100 * self.changed / inputs, 2) if inputs else 0.0
        matrix = sorted(
            tally.matrix.items(), key=lambda item: (-item[1], item[0][0] or "", item[0][1] or "")
        )
        return {
            "inputs": inputs,
            "ruleset": self.ruleset,
            "changed": self.changed,
            "changed_percent": percent,
            "matrix": [{"from": old, "to": new, "count": n} for (old, new), n in matrix],
            "rules": self._rules(),
            "new_errors": [
                {"rule": rule_id, "count": count, "example": line, "error": error}
                for rule_id, (count, line, error) in sorted(tally.new_errors.items())
            ],
            "examples": list(tally.examples),
            "compared_with": self.compared_with,
            "inputs_file": self.inputs_path,
            "lines": tally.lines,
            "points_changed": tally.points_changed,
            "skipped_other_rulesets": tally.skipped,
            "refused": tally.refused,
            "refused_inputs": list(tally.refused_inputs),
            "invalid": tally.invalid,
            "invalid_lines": list(tally.invalid_lines),
            "not_comparable": tally.not_comparable,
            "not_comparable_lines": list(tally.not_comparable_lines),
        }

    def _rules(self) -> list[dict[str, Any]]:
        """Every rule of either side by id, candidate's order first; a side without the
        rule says null. Compared with the log, the log's side is every rule id it lists
        (a candidate rule the log never lists matched nothing then: 0)."""
        tally = self.tally
        ids: dict[str, None] = dict.fromkeys(rule.id for rule in self.candidate.rules)
        if self.baseline is not None:
            ids.update(dict.fromkeys(rule.id for rule in self.baseline.rules))
            in_baseline = {rule.id for rule in self.baseline.rules}
        else:
            ids.update(dict.fromkeys(sorted(tally.baseline_matches)))
            in_baseline = set(ids)
        in_candidate = {rule.id for rule in self.candidate.rules}
        return [
            {
                "id": rule_id,
                "baseline_matches": tally.baseline_matches[rule_id]
                if rule_id in in_baseline
                else None,
                "candidate_matches": tally.candidate_matches[rule_id]
                if rule_id in in_candidate
                else None,
            }
            for rule_id in ids
        ]


def replay(
    candidate: Rules,
    baseline: Rules | None,
    inputs: str,
    *,
    ruleset_id: str | None = None,
    examples: int = 10,
    block_bytes: int = BLOCK_BYTES,
) -> Replay:
    """Evaluate every input of the file `inputs` ('-': standard input) against both sides.

    Raises `ValueError` for a usage error: a ruleset missing on a side, or (a
    `ReplayError`) an inputs file that cannot be read, or one with nothing to compare."""
    try:
        stream = _open(inputs)
    except OSError as exc:
        raise ReplayError(f"{inputs}: cannot read the inputs: {exc}") from None
    try:
        blocks = _blocks(stream, block_bytes)
        held: list[tuple[int, bytes]] = []
        chosen = ruleset_id
        if chosen is None:
            chosen = _ruleset_of(blocks, held) or _only_ruleset(candidate)
        setup = _Setup(
            ruleset_id=chosen,
            candidate=candidate.report.ruleset(chosen, "the candidate"),
            baseline=None if baseline is None else baseline.report.ruleset(chosen, "the baseline"),
            examples=examples,
        )
        tally = _evaluate(setup, blocks, held)
    except (OSError, EOFError) as exc:  # a truncated or corrupt gzip stream, a read error
        raise ReplayError(f"{inputs}: cannot read the inputs: {exc}") from None
    finally:
        if stream is not sys.stdin.buffer:
            stream.close()
    _check_compared(inputs, tally, baseline is None)
    return Replay(
        ruleset=chosen,
        inputs_path=inputs,
        compared_with="log" if baseline is None else "baseline",
        tally=tally,
        candidate=setup.candidate,
        baseline=setup.baseline,
    )


def _only_ruleset(candidate: Rules) -> str:
    ids = sorted(ruleset.id for ruleset in candidate.report.rulesets)
    if len(ids) != 1:
        raise ReplayError(
            f"no decision-log line names a ruleset and the candidate holds {len(ids)} "
            f"({', '.join(ids)}): name one with --ruleset"
        )
    return ids[0]


def _check_compared(inputs: str, tally: _Tally, without_baseline: bool) -> None:
    """Nothing compared is never a pass: a wrong file or a wrong ruleset is a usage error."""
    if tally.inputs:
        return
    if not tally.lines:
        raise ReplayError(f"{inputs}: no inputs")
    reasons = [
        f"{count} {what}"
        for count, what in (
            (tally.skipped, "of other rulesets"),
            (tally.refused, "refused by the input limits"),
            (tally.invalid, "not a JSON object"),
            (tally.not_comparable, "without a logged decision"),
        )
        if count
    ]
    hint = " (give --baseline)" if without_baseline and tally.not_comparable else ""
    raise ReplayError(
        f"{inputs}: none of the {tally.lines} lines could be compared: {', '.join(reasons)}{hint}"
    )


# Rendering: JSON, human text and Markdown say the same.


def write_json(result: Replay, out: TextIO) -> None:
    json.dump(result.to_dict(), out, indent=2, sort_keys=True)
    out.write("\n")


def _decision(value: str | None) -> str:
    return "(none)" if value is None else value


def _points(values: list[Any]) -> str:
    old, new = values
    return f"{'?' if old is None else old} → {new} points"


def _changed_rules(data: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in data["rules"] if r["baseline_matches"] != r["candidate_matches"]]


def _notes(data: dict[str, Any]) -> list[str]:
    """The lines not compared, and why, one sentence each."""
    notes = []
    if data["skipped_other_rulesets"]:
        notes.append(f"{data['skipped_other_rulesets']} line(s) of other rulesets skipped")
    if data["refused"]:
        lines = ", ".join(str(item["line"]) for item in data["refused_inputs"])
        shown = f" (line {lines}{', ...' if data['refused'] > len(data['refused_inputs']) else ''})"
        notes.append(
            f"{data['refused']} input(s) refused by the input limits{shown if lines else ''}"
        )
    if data["invalid"]:
        lines = ", ".join(map(str, data["invalid_lines"]))
        notes.append(f"{data['invalid']} line(s) not a JSON object (line {lines})")
    if data["not_comparable"]:
        lines = ", ".join(map(str, data["not_comparable_lines"]))
        notes.append(
            f"{data['not_comparable']} input(s) without a logged decision not compared "
            f"(line {lines}; give --baseline)"
        )
    return notes


def _headline(data: dict[str, Any]) -> str:
    against = "the baseline" if data["compared_with"] == "baseline" else "the logged decisions"
    return (
        f"{data['changed']} of {data['inputs']} decisions change ({data['changed_percent']}%) "
        f"against {against}; total points change on {data['points_changed']}"
    )


def write_human(result: Replay, out: TextIO) -> None:
    data = result.to_dict()
    print(f"replay of {data['ruleset']} on {data['inputs_file']}", file=out)
    print(_headline(data), file=out)
    for note in _notes(data):
        print(f"  {note}", file=out)
    _table(
        out,
        "decisions",
        ("from", "to", "inputs"),
        [(_decision(m["from"]), _decision(m["to"]), m["count"]) for m in data["matrix"]],
    )
    changed = _changed_rules(data)
    _table(
        out,
        f"rules whose matches change ({len(data['rules']) - len(changed)} others match alike)",
        ("rule", "baseline", "candidate"),
        [(r["id"], _count(r["baseline_matches"]), _count(r["candidate_matches"])) for r in changed],
    )
    _table(
        out,
        "rules that error where they did not",
        ("rule", "inputs", "first line", "error"),
        [(e["rule"], e["count"], e["example"], e["error"]) for e in data["new_errors"]],
    )
    _table(
        out,
        "changed decisions (first of them)",
        ("line", "decision_id", "from", "to", "points"),
        [
            (
                e["line"],
                e.get("decision_id", "-"),
                _decision(e["from"]),
                _decision(e["to"]),
                _points(e["total_points"]),
            )
            for e in data["examples"]
        ],
    )


def _count(value: int | None) -> str:
    return "-" if value is None else str(value)


def _table(out: TextIO, title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    if not rows:
        return
    cells = [list(map(str, header)), *([_plain(str(cell)) for cell in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    print(f"\n{title}:", file=out)
    for row in cells:
        print(
            "  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip(),
            file=out,
        )


def _plain(text: str) -> str:
    """Text from a log as it can be shown on a terminal or in a CI log: control
    characters escaped (a newline could start a line of its own there: a CI runner's
    workflow command, an escape sequence)."""
    return text if text.isprintable() else json.dumps(text, ensure_ascii=False)[1:-1]


def _code(value: Any) -> str:
    """A table cell's text as code, clipped: nothing in a decision or a logged id can
    format or mention anything in a pull-request comment, nor make it too long to post."""
    text = _plain(" ".join(str(value).split()))
    if len(text) > _CELL:
        text = text[: _CELL - 1] + "…"
    text = text.replace("`", "'").replace("|", "\\|")
    return f"`{text}`" if text else ""


def write_markdown(result: Replay, out: TextIO) -> None:
    """For a pull-request comment: the headline, then tables (the examples folded)."""
    data = result.to_dict()
    print(f"#### rule-sidecar replay: {_code(data['ruleset'])}", file=out)
    print(f"\n**{_headline(data)}.**", file=out)
    notes = _notes(data)
    if notes:
        print("\n" + "; ".join(notes) + ".", file=out)
    _markdown_table(
        out,
        ("from", "to", "inputs"),
        [
            (
                _code(_decision(m["from"])),
                ("**" + _code(_decision(m["to"])) + "**")
                if m["from"] != m["to"]
                else _code(_decision(m["to"])),
                m["count"],
            )
            for m in data["matrix"]
        ],
    )
    changed = _changed_rules(data)
    if changed:
        print(
            f"\nRules whose matches change ({len(data['rules']) - len(changed)} others "
            "match alike):",
            file=out,
        )
        _markdown_table(
            out,
            ("rule", "baseline", "candidate"),
            [
                (_code(r["id"]), _count(r["baseline_matches"]), _count(r["candidate_matches"]))
                for r in changed
            ],
        )
    if data["new_errors"]:
        print("\nRules that error where they did not:", file=out)
        _markdown_table(
            out,
            ("rule", "inputs", "first line", "error"),
            [
                (_code(e["rule"]), e["count"], e["example"], _code(e["error"]))
                for e in data["new_errors"]
            ],
        )
    if data["examples"]:
        print(
            f"\n<details><summary>First {len(data['examples'])} changed decisions</summary>\n",
            file=out,
        )
        _markdown_table(
            out,
            ("line", "decision_id", "from", "to", "points"),
            [
                (
                    e["line"],
                    _code(e.get("decision_id", "")),
                    _code(_decision(e["from"])),
                    _code(_decision(e["to"])),
                    _points(e["total_points"]),
                )
                for e in data["examples"]
            ],
        )
        print("\n</details>", file=out)


def _markdown_table(out: TextIO, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    print("\n| " + " | ".join(header) + " |", file=out)
    print(
        "|"
        + "|".join(
            "---:" if h in {"inputs", "baseline", "candidate", "line", "first line"} else "---"
            for h in header
        )
        + "|",
        file=out,
    )
    for row in rows:
        print("| " + " | ".join(str(cell) for cell in row) + " |", file=out)


def percent(text: str) -> float:
    """`--fail-if-changed`: a percentage, 0 to 100."""
    value = float(text)
    if not math.isfinite(value) or not 0 <= value <= 100:
        raise ValueError(f"{text} is not a percentage from 0 to 100")
    return value

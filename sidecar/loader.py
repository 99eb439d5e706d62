"""From source files to a validated candidate snapshot, all or nothing.

Stages, per file: parse (YAML/JSON with positions) → apiVersion/kind → JSON Schema →
build rules and compile every condition → semantic checks and embedded tests. Then,
across files: duplicate ruleset and rule ids. Any problem anywhere raises one `LoadError`
listing every problem, and nothing is returned: the caller keeps what it had.

A stage's problems do not hide the next stage's where it can still run, so one pass
reports everything: conditions are compiled in a document that breaks the schema
elsewhere, and the ids of a ruleset whose conditions do not compile still count as
duplicates. `Loader.examine` gives every problem and every ruleset that loads, without
raising (what `rule-sidecar validate` reports).

The loader remembers each file's result by content digest, so a reload re-parses,
re-validates and re-compiles only the files that changed (and re-reports the problems
of unchanged broken files without re-reading them).

Each load times its stages (`LoadStage`) into `LoadResult.timings` and tells the stage
listeners (the sidecar's `rule_sidecar_load_stage_seconds`); reading the sources is not the
loader's (it is given their files), publishing the result is timed by `timed_publish`.

Given an executor (the sidecar gives it one worker process), large changes are loaded
there: parsing a big YAML document and compiling CEL hold the interpreter lock for long
stretches in C, which in a thread would stall the requests being served. The worker
sends back finished rulesets with their programs serialized by cel-cpp; binding them
here costs about a tenth of compiling. Small changes stay in-process: a process hop
would cost more than it saves. Candidates a caller sends (`examine_candidate`) go to a
checker process of their own, never the reload worker, killed when a check runs out of
time or its caller leaves.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import json
import logging
import multiprocessing
import os
import pickle
import select
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import BrokenExecutor, Executor, Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cache
from importlib import resources
from typing import Any, Final, TypeVar

import jsonschema
import yaml

from sidecar.checks import CaseResult, checked
from sidecar.conditions import (
    DEPENDENCY_REFUSED,
    ConditionCompiler,
    ConditionError,
    ConditionSetError,
    located,
)
from sidecar.cost import RULESET_COST_LIMIT
from sidecar.dependencies import DependencyIssue
from sidecar.documents import Document, parse_file, unservable_number
from sidecar.errors import LoadError, Problem, ProblemCode, clip, excerpt, format_path
from sidecar.model import (
    API_VERSION,
    KIND,
    DecisionBand,
    DependencyError,
    EvaluationPlan,
    Expectation,
    Location,
    Rule,
    RuleMode,
    RuleSet,
    RuleTest,
    freeze,
)
from sidecar.rulefiles import DEFAULT_FILE_LIMITS, FileLimits, SourceFile
from sidecar.snapshot import Snapshot

__all__ = [
    "DEFAULT_OFFLOAD_BYTES",
    "LOAD_STAGES",
    "CandidateExamination",
    "Examination",
    "LoadResult",
    "LoadStage",
    "Loader",
    "StageListener",
    "candidate_checker",
    "dependency_problems",
    "ruleset_schema",
]

logger = logging.getLogger("sidecar.loader")

_SCHEMA_FILE: Final = "ruleset.schema.json"
DEFAULT_OFFLOAD_BYTES: Final = 256 * 1024
_MAX_MESSAGE: Final = 400  # characters of a schema message, the value it quotes clipped


@cache
def ruleset_schema() -> dict[str, Any]:
    """The `rule-sidecar/v1` RuleSet JSON Schema shipped in the package."""
    text = resources.files("sidecar").joinpath("schemas", _SCHEMA_FILE).read_text("utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


@cache
def _validator() -> jsonschema.protocols.Validator:
    schema = ruleset_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@cache
def _rule_validator() -> jsonschema.protocols.Validator:
    rule_schema = ruleset_schema()["properties"]["spec"]["properties"]["rules"]["items"]
    return jsonschema.Draft202012Validator(rule_schema)


class LoadStage(StrEnum):
    """A stage of a load, as `LoadResult.timings` and the stage histogram's `stage` label
    name it: dashboards and alerts key on these values, so they do not change."""

    PARSE = "parse"  # content digests (what changed), YAML/JSON parse, the tree's checks
    SCHEMA = "schema"  # apiVersion/kind and the JSON Schema
    COMPILE = "compile"  # rules built, conditions compiled (or bound, after the worker)
    CHECKS = "checks"  # semantic checks, embedded tests, duplicate ids across files
    BUILD = "build"  # Snapshot.build, the compiler's cache pruned
    PUBLISH = "publish"  # not the loader's: its caller times it with `timed_publish`


LOAD_STAGES: Final = (
    LoadStage.PARSE,
    LoadStage.SCHEMA,
    LoadStage.COMPILE,
    LoadStage.CHECKS,
    LoadStage.BUILD,
)
"""The stages a load itself runs, in order: every one is in `LoadResult.timings`."""

StageListener = Callable[[Mapping[LoadStage, float]], None]

_R = TypeVar("_R")

# How often a load waiting on the worker looks whether the loader was closed.
_CLOSED_POLL_SECONDS: Final = 0.25


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadResult:
    """A candidate snapshot (version 0 until published) and what it cost.

    `timings` holds the seconds spent in each of `LOAD_STAGES` (0 for a stage the load did
    not need); together they are at most the load's wall time (with one worker process).
    """

    snapshot: Snapshot
    files: int
    files_parsed: int
    timings: Mapping[LoadStage, float] = field(default_factory=dict)

    @property
    def files_reused(self) -> int:
        return self.files - self.files_parsed


@dataclass(frozen=True, slots=True, kw_only=True)
class Examination:
    """Every problem of a set of files and the rulesets that loaded despite them."""

    files: int
    rulesets: tuple[RuleSet, ...]
    problems: tuple[Problem, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class CandidateExamination:
    """Candidate files checked as part of the registry of the last load (see
    `Loader.examine_candidate`).

    `problems`: every problem of that registry, the candidate's own and those it causes
    across files included. `rulesets`: the candidate's rulesets that loaded, for
    comparing with what serves; they are not bound to the serving compiler, so they are
    never evaluated. `replaced`: the ruleset ids the candidate declares. `cases_run` and
    `cases_passed` count the candidate's embedded test cases (none run without checks).
    `revision`: what the registry would be served as, when there is no problem.
    """

    problems: tuple[Problem, ...]
    rulesets: tuple[RuleSet, ...]
    replaced: frozenset[str]
    cases_run: int
    cases_passed: int
    revision: str | None


@dataclass(frozen=True, slots=True)
class _Declared:
    """The ids a document declares and where, checked for duplicates across files even
    when its conditions do not compile."""

    ruleset_id: str
    location: Location
    rules: tuple[tuple[str, Location], ...]
    challenger_of: tuple[str, Location] | None = None


class _Stopwatch:
    """Seconds per stage of one load, summed over its files and documents. The stages
    never nest, so they never count the same moment twice."""

    __slots__ = ("seconds",)

    def __init__(self) -> None:
        self.seconds: dict[LoadStage, float] = {}

    @contextlib.contextmanager
    def stage(self, stage: LoadStage) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add({stage: time.perf_counter() - started})

    def add(self, seconds: Mapping[LoadStage, float]) -> None:
        for stage, value in seconds.items():
            self.seconds[stage] = self.seconds.get(stage, 0.0) + value

    def timings(self) -> dict[LoadStage, float]:
        return {stage: self.seconds.get(stage, 0.0) for stage in LOAD_STAGES}


@dataclass(frozen=True, slots=True)
class _FileResult:
    digest: str
    rulesets: tuple[RuleSet, ...]
    problems: tuple[Problem, ...]
    declared: tuple[_Declared, ...] = ()
    cases: tuple[int, int] = (0, 0)  # embedded test cases run, passed

    def without(self, replaced: frozenset[str]) -> _FileResult:
        """This file with the rulesets of those ids (and their problems) taken out."""
        if not replaced:
            return self
        return dataclasses.replace(
            self,
            rulesets=tuple(r for r in self.rulesets if r.id not in replaced),
            problems=tuple(p for p in self.problems if p.ruleset_id not in replaced),
            declared=tuple(d for d in self.declared if d.ruleset_id not in replaced),
        )


@dataclass(frozen=True, slots=True)
class _Shipped:
    """A `_FileResult` as the worker sends it: each ruleset pickled on its own."""

    digest: str
    rulesets: tuple[bytes, ...]
    problems: tuple[Problem, ...]
    declared: tuple[_Declared, ...]
    cases: tuple[int, int]

    @classmethod
    def of(cls, result: _FileResult) -> _Shipped:
        """`result` for the trip: each ruleset's digest taken first (it travels with the
        ruleset, so the receiving process never takes it), then pickled on its own."""
        for ruleset in result.rulesets:
            _ = ruleset.digest
        rulesets = tuple(pickle.dumps(r, pickle.HIGHEST_PROTOCOL) for r in result.rulesets)
        return cls(result.digest, rulesets, result.problems, result.declared, result.cases)

    def unpacked(self) -> _FileResult:
        rulesets = tuple(map(pickle.loads, self.rulesets))
        return _FileResult(self.digest, rulesets, self.problems, self.declared, self.cases)


class Loader:
    """Validates and compiles rule files; keeps per-file results for incremental reloads.

    Not thread-safe: one reload at a time (the reload service serialises them).
    """

    def __init__(
        self,
        *,
        compiler: ConditionCompiler | None = None,
        run_checks: bool = True,
        file_limits: FileLimits = DEFAULT_FILE_LIMITS,
        executor: Executor | None = None,
        new_executor: Callable[[], Executor] | None = None,
        offload_bytes: int = DEFAULT_OFFLOAD_BYTES,
        new_checker: Callable[[], ProcessPoolExecutor] | None = None,
        receiving: Callable[[], contextlib.AbstractContextManager[object]] = contextlib.nullcontext,
    ) -> None:
        self.compiler = compiler or ConditionCompiler()
        # Surrounds taking in a worker's rulesets: many long-lived objects made at once
        # (`serve` gives `HeapFreezer.receiving`, which keeps the collector out of it).
        self.receiving = receiving
        self.run_checks = run_checks
        self.file_limits = file_limits
        self.executor = executor
        # Makes a new executor when the current one broke (its worker process was
        # killed, e.g. by the OOM killer): without it every later large load would run
        # in-process, stalling requests, for good.
        self.new_executor = new_executor
        self.offload_bytes = offload_bytes
        # Starts the process candidate checks run in (see `examine_candidate`), made on
        # the first check and again after one was killed; None: checks run in-process.
        self.new_checker = new_checker
        self._checker: ProcessPoolExecutor | None = None
        self._checker_lock = threading.Lock()
        self._files: dict[str, _FileResult] = {}
        # The per-file results of the last load, kept through `forget` (they stand for
        # what serves until the next load) and never changed in place: a candidate check
        # in another thread reads this one reference, a consistent whole (see
        # `examine_candidate`).
        self._base: Mapping[str, _FileResult] = {}
        self._files_checked = run_checks
        # The SourceFile objects of the last load: a source that hands the same object
        # again (the database source does, for unchanged rulesets) is not even hashed.
        self._sources: dict[str, SourceFile] = {}
        self._last: LoadResult | None = None
        self._succeeded = False  # a load succeeded once: the sidecar serves (see `reload_worker`)
        self._closed = False
        self._stage_listeners: list[StageListener] = []

    def add_stage_listener(self, listener: StageListener) -> None:
        """Call `listener` with the seconds of the stages each load ran (a load refused
        for its problems too, without `build`; not a load that changed nothing, which
        reuses the last candidate), and with each `timed_publish`. Called in the thread
        that loads or publishes."""
        self._stage_listeners.append(listener)

    def timed_publish(self, publish: Callable[[Snapshot], _R], candidate: Snapshot) -> _R:
        """`publish(candidate)`, its duration told to the stage listeners as the `publish`
        stage: the caller publishes a load's result, so it is timed there, in one call."""
        started = time.perf_counter()
        try:
            return publish(candidate)
        finally:
            self._tell({LoadStage.PUBLISH: time.perf_counter() - started})

    def _tell(self, seconds: Mapping[LoadStage, float]) -> None:
        for listener in self._stage_listeners:
            try:
                listener(seconds)
            except Exception:
                logger.exception("a load stage listener failed")

    def load(self, files: Iterable[SourceFile], *, run_checks: bool | None = None) -> LoadResult:
        """Build a candidate snapshot from the complete set of files, or raise `LoadError`.

        `run_checks` overrides the loader's setting for this load (the contract's `validate`).
        """
        checks = self.run_checks if run_checks is None else run_checks
        if checks != self._files_checked:
            # Remembered results were built with the other setting: none can be reused,
            # not even the last candidate (it would outlive files deleted since).
            self.forget()
            self._files_checked = checks
        watch = _Stopwatch()
        known: dict[str, _FileResult] = {}
        changed: list[tuple[SourceFile, str]] = []
        order: list[str] = []
        sources: dict[str, SourceFile] = {}
        with watch.stage(LoadStage.PARSE):
            for source in files:
                order.append(source.name)
                sources[source.name] = source
                cached = self._files.get(source.name)
                if cached is not None and self._sources.get(source.name) is source:
                    known[source.name] = cached
                    continue
                digest = hashlib.sha256(source.content).hexdigest()
                if cached is None or cached.digest != digest:
                    changed.append((source, digest))
                else:
                    known[source.name] = cached
        self._sources = sources
        last = self._last
        if not changed and last is not None and list(self._files) == order:
            # Nothing at all changed: the last candidate stands (no re-check, no re-index).
            return LoadResult(
                snapshot=last.snapshot, files=last.files, files_parsed=0, timings=watch.timings()
            )
        known.update(self._load_changed(changed, run_checks=checks, watch=watch))
        # In the sources' order, so that messages about duplicates do not depend on
        # which file happened to change.
        results = {name: known[name] for name in order}
        self._files = results
        self._base = results
        self._last = None
        rulesets = [ruleset for result in results.values() for ruleset in result.rulesets]
        with watch.stage(LoadStage.CHECKS):
            problems = _every_problem(list(results.values()))
        if problems:
            self._tell(watch.seconds)
            raise LoadError(problems)
        with watch.stage(LoadStage.BUILD):
            snapshot = Snapshot.build(rulesets)
            self.compiler.forget_unused({rule.condition for rule in snapshot.rules.values()})
        self._last = LoadResult(
            snapshot=snapshot,
            files=len(results),
            files_parsed=len(changed),
            timings=watch.timings(),
        )
        self._succeeded = True
        self._tell(self._last.timings)
        return self._last

    def examine(self, files: Iterable[SourceFile]) -> Examination:
        """Every problem of `files` and every ruleset that loads, without raising and
        without touching what `load` remembers (files named twice are read once)."""
        sources = {source.name: source for source in files}
        changed = [
            (source, hashlib.sha256(source.content).hexdigest()) for source in sources.values()
        ]
        results = self._load_changed(changed, run_checks=self.run_checks, watch=_Stopwatch())
        ordered = [results[name] for name in sources]
        return Examination(
            files=len(sources),
            rulesets=tuple(ruleset for result in ordered for ruleset in result.rulesets),
            problems=tuple(_every_problem(ordered)),
        )

    def examine_candidate(
        self,
        files: Sequence[SourceFile],
        *,
        limits: FileLimits | None = None,
        deadline: float | None = None,
        stop: threading.Event | None = None,
    ) -> CandidateExamination:
        """Check `files` as part of the registry of the last load: every ruleset they
        declare replaces the ruleset of that id, whichever file (or source) held it, and
        only that document of a file of several; the rest of the registry is the last
        load's files as they were (their problems too: a reload would report them).

        The registry-wide checks (ids used twice, challengers) run over the whole, with
        the candidate's files last, so that a clash is reported in the candidate. The
        candidate's files are loaded, each within `limits` (the loader's by default), in
        the checker process when the loader has one (`new_checker`; never the reload
        worker, so that a check never delays a reload), else in the calling thread,
        with a compiler of their own either way.

        Bounded in time: past `deadline` (`time.monotonic()`), or once `stop` is set (its
        caller left), the checker process is killed, to be replaced by the next check,
        and `TimeoutError` raised. In the calling thread, a check stops only between two
        files (one file's load runs to its end).

        Safe beside a running `load` (in another thread): it reads the last load's results
        through one reference and changes nothing a load remembers, so it sees the
        registry before or after that load, never a mixture, and no candidate file is
        ever taken for a source's. One checker process: callers check one candidate at a
        time (the service does).
        """
        base = self._base
        shipped = self._examine_elsewhere(files, limits or self.file_limits, deadline, stop)
        candidate = [item.unpacked() for item in shipped]
        replaced = frozenset(d.ruleset_id for result in candidate for d in result.declared)
        results = [*(result.without(replaced) for result in base.values()), *candidate]
        problems = _every_problem(results)
        revision = None
        if not problems:
            revision = Snapshot.build(r for result in results for r in result.rulesets).revision
        return CandidateExamination(
            problems=tuple(problems),
            rulesets=tuple(ruleset for result in candidate for ruleset in result.rulesets),
            replaced=replaced,
            cases_run=sum(result.cases[0] for result in candidate),
            cases_passed=sum(result.cases[1] for result in candidate),
            revision=revision,
        )

    def _examine_elsewhere(
        self,
        files: Sequence[SourceFile],
        limits: FileLimits,
        deadline: float | None,
        stop: threading.Event | None,
    ) -> tuple[_Shipped, ...]:
        """The candidate's files loaded in the checker process, or here when the loader
        has none (see `examine_candidate`)."""

        def stopped() -> bool:
            self._stop_if_closed()
            return (stop is not None and stop.is_set()) or (
                deadline is not None and time.monotonic() >= deadline
            )

        if self.new_checker is None:
            return _examine_in_worker(files, self.run_checks, limits, stopped=stopped)
        checker = self._checker_process(self.new_checker)
        try:
            future = checker.submit(_examine_in_worker, files, self.run_checks, limits)
            while not stopped():
                try:
                    return future.result(timeout=_CLOSED_POLL_SECONDS)
                except TimeoutError:
                    continue
            raise TimeoutError("the candidate check was stopped")
        except BaseException:
            # Out of time, its caller gone, the loader closed, or the process broken: a
            # process still computing is killed, not left to finish for nobody.
            self._end_checker(checker)
            raise

    def _checker_process(
        self, new_checker: Callable[[], ProcessPoolExecutor]
    ) -> ProcessPoolExecutor:
        with self._checker_lock:
            if self._checker is None:
                self._checker = new_checker()
            return self._checker

    def _end_checker(self, checker: ProcessPoolExecutor) -> None:
        """Kill `checker`, unless `close` took it first: whoever takes it out of
        `_checker` ends it, once (two shutdowns at once close its queues twice)."""
        with self._checker_lock:
            if self._checker is not checker:
                return
            self._checker = None
        _terminate(checker)

    def trial(self, files: Iterable[SourceFile]) -> LoadResult:
        """What `load` would make of `files`, without touching what it remembers: a
        candidate the caller may never publish (a write validated before it commits)
        must not become the base the next reload is compared with. Files unchanged
        since the last load reuse its results; the rest are loaded (large ones in the
        worker). Raises `LoadError` like `load`; call it where `load` could be called
        (one at a time)."""
        watch = _Stopwatch()
        reusable = self._files if self._files_checked == self.run_checks else {}
        known: dict[str, _FileResult] = {}
        changed: list[tuple[SourceFile, str]] = []
        order: list[str] = []
        for source in files:
            order.append(source.name)
            digest = hashlib.sha256(source.content).hexdigest()
            cached = reusable.get(source.name)
            if cached is not None and cached.digest == digest:
                known[source.name] = cached
            else:
                changed.append((source, digest))
        known.update(self._load_changed(changed, run_checks=self.run_checks, watch=watch))
        ordered = [known[name] for name in order]
        problems = _every_problem(ordered)
        if problems:
            raise LoadError(problems)
        snapshot = Snapshot.build([ruleset for result in ordered for ruleset in result.rulesets])
        return LoadResult(
            snapshot=snapshot,
            files=len(ordered),
            files_parsed=len(changed),
            timings=watch.timings(),
        )

    def forget(self) -> None:
        """Drop every remembered file so the next load re-reads everything."""
        self._files = {}  # a new dict: the one `_base` may share is never changed
        self._sources.clear()
        self._last = None

    def rule_from_mapping(self, data: Mapping[str, Any], *, ruleset_id: str, file: str) -> Rule:
        """Validate and compile one rule given as a document-style mapping."""
        problems = [
            Problem(
                file=file,
                path=format_path(list(error.absolute_path)),
                message=error.message,
                code=_schema_code(error),
            )
            for error in _rule_validator().iter_errors(data)
        ]
        unservable = unservable_number(file, data)
        if unservable is not None:
            problems.append(unservable)
        if problems:
            raise LoadError(problems)
        return self.check_rule(_rule(dict(data), ruleset_id, Location(file)))

    def check_rule(self, rule: Rule) -> Rule:
        """The rule, once its condition is known to compile; else `LoadError`."""
        try:
            self.compiler.compile(rule.condition)
        except ConditionError as exc:
            at = rule.location or Location("<api>")
            problem = _rule_problem(
                rule,
                _condition_message(exc),
                path="$.condition",
                at=at,
                code=_condition_code(exc),
            )
            raise LoadError([problem]) from None
        return rule

    def _load_changed(
        self, changed: list[tuple[SourceFile, str]], *, run_checks: bool, watch: _Stopwatch
    ) -> dict[str, _FileResult]:
        size = sum(len(source.content) for source, _ in changed)
        if self.executor is not None and size >= self.offload_bytes:
            try:
                return self._load_elsewhere(
                    self.executor, changed, run_checks=run_checks, watch=watch
                )
            except Exception as exc:
                self._stop_if_closed()
                if isinstance(exc, BrokenExecutor):
                    logger.error("the reload worker died; loading in-process, and starting anew")
                    self._replace_executor()
                else:
                    logger.exception("the reload worker failed; loading in-process instead")
        results = {}
        for source, digest in changed:
            self._stop_if_closed()
            results[source.name] = self._load_file(
                source, digest, run_checks=run_checks, watch=watch
            )
        return results

    def close(self) -> None:
        """Stop the worker process at once (its current file too) and any load still
        running: the server is shutting down, and nothing waits for a load to finish."""
        self._closed = True
        executor, self.executor, self.new_executor = self.executor, None, None
        with self._checker_lock:
            checker, self._checker, self.new_checker = self._checker, None, None
        if checker is not None:
            _terminate(checker)
        if isinstance(executor, ProcessPoolExecutor):
            _terminate(executor)
        elif executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)

    def _answer(self, future: Future[_R]) -> _R:
        """The worker's answer, waited for only while the loader is open: a worker stopped
        by `close` mid-answer can leave its future unresolved for good."""
        while True:
            try:
                return future.result(timeout=_CLOSED_POLL_SECONDS)
            except TimeoutError:
                self._stop_if_closed()

    def _stop_if_closed(self) -> None:
        if self._closed:
            problem = Problem(
                file="<loader>",
                message="the load was stopped: the sidecar is shutting down",
                code=ProblemCode.INTERNAL,
            )
            raise LoadError([problem])

    def _replace_executor(self) -> None:
        broken, self.executor = self.executor, None
        if broken is not None:
            broken.shutdown(wait=False, cancel_futures=True)
        if self.new_executor is not None:
            try:
                self.executor = self.new_executor()
            except Exception:  # this load goes on in-process, as do the next ones
                logger.exception("could not start a new reload worker")

    def _load_elsewhere(
        self,
        executor: Executor,
        changed: list[tuple[SourceFile, str]],
        *,
        run_checks: bool,
        watch: _Stopwatch,
    ) -> dict[str, _FileResult]:
        """Every file loaded by the worker, then taken in here: only once the worker is
        done, which keeps its stages and ours apart in time, so they add up to the wall
        time. The worker ships each ruleset pickled on its own, so that taking them in
        is many short steps (the serving thread gets the interpreter between two), not
        one call of tens of ms; `receiving` surrounds them all."""
        # Below the serving process once a load succeeded, so something serves.
        niceness = os.nice(0) + WORKER_NICENESS if self._succeeded else None
        limits = self.file_limits
        futures = [
            executor.submit(_load_file_in_worker, source, digest, run_checks, limits, niceness)
            for source, digest in changed
        ]
        answers = [self._answer(future) for future in futures]
        results = {}
        with watch.stage(LoadStage.COMPILE), self.receiving():
            for (source, _), (shipped, _) in zip(changed, answers, strict=True):
                result = shipped.unpacked()
                for ruleset in result.rulesets:
                    ruleset.plan.conditions.bind(self.compiler)
                results[source.name] = result
        for _, seconds in answers:
            watch.add(seconds)
        return results

    def _load_file(
        self, source: SourceFile, digest: str, *, run_checks: bool, watch: _Stopwatch
    ) -> _FileResult:
        with watch.stage(LoadStage.PARSE):
            documents, problems = parse_file(source, self.file_limits)
        rulesets: list[RuleSet] = []
        declared: list[_Declared] = []
        run = passed = 0
        for document in documents:
            ruleset, document_problems, cases = self._load_document(
                document, run_checks=run_checks, watch=watch
            )
            run += len(cases)
            passed += sum(case.passed for case in cases)
            problems.extend(document_problems)
            if ruleset is not None:
                rulesets.append(ruleset)
            if not any(p.code.startswith("schema.") for p in document_problems):
                with watch.stage(LoadStage.CHECKS):  # what the duplicate-id check reads
                    declared.append(_declared(document))
        return _FileResult(digest, tuple(rulesets), tuple(problems), tuple(declared), (run, passed))

    def _load_document(
        self, document: Document, *, run_checks: bool, watch: _Stopwatch
    ) -> tuple[RuleSet | None, list[Problem], list[CaseResult]]:
        """The document's ruleset or its problems, and its embedded test cases that ran."""
        with watch.stage(LoadStage.SCHEMA):
            problems = _schema_problems(document)
        if problems:
            with watch.stage(LoadStage.COMPILE):
                beside = _conditions_beside(document, problems, self.compiler)
            return None, problems + beside, []
        with watch.stage(LoadStage.COMPILE):
            ruleset, problems = _build_ruleset(document, self.compiler)
        if ruleset is None or problems:
            return None, problems, []
        cases: list[CaseResult] = []
        if run_checks:
            with watch.stage(LoadStage.CHECKS):
                problems, cases = checked(ruleset)
            if problems:
                return None, problems, cases
        return ruleset, [], cases


WORKER_NICENESS: Final = 10
# Candidate checks run below the reload worker: a reload takes the CPU they both want.
CHECKER_NICENESS: Final = 19


def _terminate(pool: ProcessPoolExecutor) -> None:
    """Stop the pool's worker at once, its current task too. Python 3.14 has
    `terminate_workers()`; before it, shutdown waits for the worker to finish the task
    it is on (seconds for a large file)."""
    workers = list((getattr(pool, "_processes", None) or {}).values())
    for process in workers:
        process.terminate()
    for process in workers:
        process.join(timeout=_CLOSED_POLL_SECONDS * 4)
    # With the worker gone this is quick; it closes the pool's queues, so their
    # semaphores are released now: `serve` ends with `os._exit`, after which
    # multiprocessing's resource tracker would report them as leaked (a line in
    # the log that is not JSON).
    pool.shutdown(wait=True, cancel_futures=True)


def candidate_checker() -> ProcessPoolExecutor:
    """The process candidate checks run in (`Loader.examine_candidate`), apart from the
    reload worker: a check a caller sent never delays a reload, and killing a check that
    ran out of time never kills a reload. It runs at the lowest priority
    (`CHECKER_NICENESS`: below the reload worker, so a reload takes the CPU first) and
    ends with the serving process. Started on the first check, not with the server."""
    return ProcessPoolExecutor(
        max_workers=1,
        mp_context=multiprocessing.get_context("forkserver"),
        initializer=_check_below,
        initargs=(os.getpid(), os.nice(0) + CHECKER_NICENESS),
    )


def _check_below(serving: int, niceness: int) -> None:
    _yield_to_serving(niceness)
    _end_with(serving)


def reload_worker() -> ProcessPoolExecutor:
    """The one worker process that large loads go to.

    forkserver, because forking a process that runs threads is unsafe. Once the first
    load succeeded (the sidecar serves), the worker runs at a lower priority
    (`WORKER_NICENESS`) than the serving process: a sidecar limited to one CPU shares it
    between the two, and requests should not wait behind a reload (the kernel still
    gives the worker every cycle that serving leaves idle). The first load, which
    nothing waits behind but readiness, runs at full priority. The worker ends with the
    serving process, however that ends.
    """
    pool = ProcessPoolExecutor(
        max_workers=1,
        mp_context=multiprocessing.get_context("forkserver"),
        initializer=_end_with,
        initargs=(os.getpid(),),
    )
    # Started now, not on the first large change: starting the forkserver and the worker
    # costs about a CPU-second of imports, at the serving process's priority, which on a
    # one-CPU sidecar would slow every request for that second. A worker that cannot
    # start (no writable /tmp, a process limit) leaves large loads in-process.
    try:
        pool.submit(os.getpid)
    except (OSError, RuntimeError) as exc:
        logger.warning("the reload worker did not start (%s): large reloads run in-process", exc)
    return pool


def _end_with(serving: int) -> None:
    """Exit when the serving process does: killed (SIGKILL, the OOM killer), it stops
    nothing, and the worker and its forkserver would live on, orphaned, for good."""
    threading.Thread(target=_exit_after, args=(serving,), name="serving", daemon=True).start()


def _exit_after(pid: int) -> None:
    try:
        descriptor = os.pidfd_open(pid)
    except OSError:  # gone already, or a kernel without pidfds (before Linux 5.3)
        descriptor = None
    while True:
        if descriptor is not None:
            select.select([descriptor], [], [])  # readable once the process has exited
            os._exit(0)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            os._exit(0)
        except PermissionError:
            pass  # alive, another user's: a reused pid cannot be ours to signal
        time.sleep(1.0)


def _yield_to_serving(niceness: int) -> None:
    """Lower this worker's priority to `niceness` (it can never be raised again)."""
    try:
        current = os.nice(0)
        if current < niceness:
            os.nice(niceness - current)
    except OSError:  # not allowed here: the worker runs at the serving process's priority
        logger.warning("the reload worker could not lower its priority")


def _load_file_in_worker(
    source: SourceFile,
    digest: str,
    run_checks: bool,
    file_limits: FileLimits,
    niceness: int | None,
) -> tuple[_Shipped, dict[LoadStage, float]]:
    """What the worker process runs: the in-process work, with a compiler of its own;
    the seconds of its stages travel back with the result. Each ruleset travels pickled
    on its own (see `Loader._load_elsewhere`), with its digest taken here, so that the
    serving process does not take it. `niceness`: the priority to yield to, once the
    sidecar serves (see `reload_worker`)."""
    if niceness is not None:
        _yield_to_serving(niceness)
    # No fast path here: a worker never serves, and its sets travel without functions.
    compiler = ConditionCompiler(fast_path=False)
    loader = Loader(compiler=compiler, run_checks=run_checks, file_limits=file_limits)
    watch = _Stopwatch()
    result = loader._load_file(source, digest, run_checks=run_checks, watch=watch)
    with watch.stage(LoadStage.BUILD):
        shipped = _Shipped.of(result)
    return shipped, watch.seconds


def _examine_in_worker(
    files: Sequence[SourceFile],
    run_checks: bool,
    file_limits: FileLimits,
    *,
    stopped: Callable[[], bool] | None = None,
) -> tuple[_Shipped, ...]:
    """A candidate's files loaded as the worker loads a reload's (see
    `_load_file_in_worker`), with one compiler of their own for them all. Also run
    in-process, where there is no checker process: either way the serving loader's
    compiler and its cache never see a candidate's conditions; in-process, `stopped`
    ends the check between two files (`TimeoutError`)."""
    loader = Loader(
        compiler=ConditionCompiler(fast_path=False), run_checks=run_checks, file_limits=file_limits
    )
    shipped = []
    for source in files:
        if stopped is not None and stopped():
            raise TimeoutError("the candidate check was stopped")
        digest = hashlib.sha256(source.content).hexdigest()
        result = loader._load_file(source, digest, run_checks=run_checks, watch=_Stopwatch())
        shipped.append(_Shipped.of(result))
    return tuple(shipped)


def _declared(document: Document) -> _Declared:
    """The ids of a document that passed the schema; a rule id used twice inside it is
    reported by `_build_ruleset`, so only its first use is kept."""
    spec = document.data["spec"]
    rules: dict[str, Location] = {}
    for index, rule in enumerate(spec["rules"]):
        rules.setdefault(str(rule["id"]), document.locate(("spec", "rules", index)))
    target = spec.get("challenger_of")
    challenger_of = None
    if target is not None:
        challenger_of = (str(target), document.locate(("spec", "challenger_of")))
    return _Declared(
        str(document.data["metadata"]["id"]),
        document.locate(()),
        tuple(rules.items()),
        challenger_of,
    )


_NOT_A_RULESET: Final = frozenset(
    {ProblemCode.SCHEMA_NOT_MAPPING, ProblemCode.SCHEMA_API_VERSION, ProblemCode.SCHEMA_KIND}
)


def _conditions_beside(
    document: Document, schema: list[Problem], compiler: ConditionCompiler
) -> list[Problem]:
    """Compile errors of the conditions the schema problems do not touch: one pass
    reports both kinds, not the second only once the first is fixed."""
    if any(problem.code in _NOT_A_RULESET for problem in schema):
        return []  # another kind of document: its fields mean something else
    data = document.data
    spec = data.get("spec") if isinstance(data, dict) else None
    rules = spec.get("rules") if isinstance(spec, dict) else None
    if not isinstance(rules, list):
        return []
    problems: list[Problem] = []
    for index, rule in enumerate(rules):
        condition = rule.get("condition") if isinstance(rule, dict) else None
        where = format_path(("spec", "rules", index, "condition"))
        if not isinstance(condition, str) or any(p.path.startswith(where) for p in schema):
            continue
        try:
            compiler.compile(condition)
        except ConditionError as exc:
            rule_id = rule.get("id")
            problems.append(
                _condition_problem(
                    document,
                    index,
                    exc,
                    ruleset_id=_metadata_id(data),
                    rule_id=str(rule_id) if isinstance(rule_id, str | int) else None,
                )
            )
    return problems


_SCHEMA_CODES: Final = {
    "additionalProperties": ProblemCode.SCHEMA_ADDITIONAL_PROPERTY,
    "required": ProblemCode.SCHEMA_REQUIRED,
    "type": ProblemCode.SCHEMA_TYPE,
    "pattern": ProblemCode.SCHEMA_PATTERN,
    "minLength": ProblemCode.SCHEMA_LENGTH,
    "maxLength": ProblemCode.SCHEMA_LENGTH,
    "minimum": ProblemCode.SCHEMA_RANGE,
    "maximum": ProblemCode.SCHEMA_RANGE,
    "exclusiveMinimum": ProblemCode.SCHEMA_RANGE,
    "exclusiveMaximum": ProblemCode.SCHEMA_RANGE,
    "minItems": ProblemCode.SCHEMA_SIZE,
    "maxItems": ProblemCode.SCHEMA_SIZE,
    "minProperties": ProblemCode.SCHEMA_SIZE,
    "maxProperties": ProblemCode.SCHEMA_SIZE,
    "uniqueItems": ProblemCode.SCHEMA_UNIQUE,
    "const": ProblemCode.SCHEMA_CONST,
    "enum": ProblemCode.SCHEMA_CONST,
}


def _schema_code(error: jsonschema.ValidationError) -> ProblemCode:
    return _SCHEMA_CODES.get(str(error.validator), ProblemCode.SCHEMA_INVALID)


def _schema_problems(document: Document) -> list[Problem]:
    data = document.data
    if not isinstance(data, dict):
        message = f"a document must be a mapping, not {type(data).__name__}"
        return [document.locate(()).problem(message, code=ProblemCode.SCHEMA_NOT_MAPPING)]
    for key, expected, code in (
        ("apiVersion", API_VERSION, ProblemCode.SCHEMA_API_VERSION),
        ("kind", KIND, ProblemCode.SCHEMA_KIND),
    ):
        if key in data and data[key] != expected:
            message = f"unknown {key} {excerpt(data[key])}: this sidecar reads {key} {expected!r}"
            return [document.locate((key,)).problem(message, path=f"$.{key}", code=code)]
    problems = []
    for error in _validator().iter_errors(data):
        path = list(error.absolute_path)
        where = document.locate(path)
        unknown = _unknown_fields(error)
        if unknown:
            where = document.locate_key(path, unknown[0])
        problems.append(
            where.problem(
                _schema_message(error),
                path=format_path(path),
                ruleset_id=_metadata_id(data),
                rule_id=_rule_id_at(data, path),
                code=_schema_code(error),
            )
        )
    return sorted(problems, key=lambda p: (p.line, p.column))


def _rule_id_at(data: dict[str, Any], path: list[str | int]) -> str | None:
    """The id of the rule a problem at `path` is in, when it is in one."""
    if len(path) < 3 or path[:2] != ["spec", "rules"] or not isinstance(path[2], int):
        return None
    try:
        rule_id = data["spec"]["rules"][path[2]]["id"]
    except (KeyError, IndexError, TypeError):
        return None
    return str(rule_id) if isinstance(rule_id, str | int) else None


def _metadata_id(data: dict[str, Any]) -> str | None:
    metadata = data.get("metadata")
    if isinstance(metadata, dict) and isinstance(metadata.get("id"), str | int):
        return str(metadata["id"])
    return None


def _allowed_fields(error: jsonschema.ValidationError) -> set[str]:
    schema = error.schema if isinstance(error.schema, Mapping) else {}
    return set(schema.get("properties", {}))


def _unknown_fields(error: jsonschema.ValidationError) -> list[str]:
    if error.validator != "additionalProperties" or not isinstance(error.instance, dict):
        return []
    return sorted(str(key) for key in set(error.instance) - _allowed_fields(error))


def _schema_message(error: jsonschema.ValidationError) -> str:
    """jsonschema's message, plus a "did you mean" for misspelt field names."""
    unknown = _unknown_fields(error)
    if not unknown:
        return clip(error.message, _MAX_MESSAGE)
    allowed = _allowed_fields(error)
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(str(key), sorted(allowed), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        hints.append(f"unknown field {excerpt(key)}{hint}")
    return "; ".join(hints) + f"; allowed: {', '.join(sorted(allowed))}"


def _integer(value: Any) -> Any:
    """JSON Schema's "integer" admits 10.0 (and JSON's 1e1): keep integers integers."""
    return int(value) if isinstance(value, float) else value


def _rule(data: dict[str, Any], ruleset_id: str, location: Location) -> Rule:
    rule_id = str(data["id"])
    return Rule(
        id=rule_id,
        ruleset_id=ruleset_id,
        name=data.get("name", rule_id),
        description=data.get("description", ""),
        condition=data["condition"],
        points=_integer(data["points"]),
        enabled=data.get("enabled", True),
        priority=_integer(data.get("priority", 0)),
        tags=tuple(data.get("tags", ())),
        metadata=freeze(data.get("metadata", {})),
        mode=RuleMode(data.get("mode", RuleMode.ACTIVE)),
        location=location,
    )


def _test(data: dict[str, Any], location: Location) -> RuleTest:
    expect = data["expect"]
    matched, shadow_matched = expect.get("matched"), expect.get("shadow_matched")
    return RuleTest(
        name=data["name"],
        input=freeze(data["input"]),
        expect=Expectation(
            total_points=_integer(expect.get("total_points")),
            matched=None if matched is None else frozenset(str(m) for m in matched),
            shadow_matched=None
            if shadow_matched is None
            else frozenset(str(m) for m in shadow_matched),
            decision=expect.get("decision"),
            checks_decision="decision" in expect,
            errors=frozenset(str(e) for e in expect.get("errors", ())),
        ),
        location=location,
    )


def _build_ruleset(
    document: Document, compiler: ConditionCompiler
) -> tuple[RuleSet | None, list[Problem]]:
    metadata, spec = document.data["metadata"], document.data["spec"]
    ruleset_id = str(metadata["id"])
    problems: list[Problem] = []
    rules: list[Rule] = []
    first_seen: dict[str, Location] = {}
    for index, data in enumerate(spec["rules"]):
        rule = _rule(data, ruleset_id, document.locate(("spec", "rules", index)))
        if rule.id in first_seen:
            problems.append(
                _rule_problem(
                    rule,
                    f"rule id {excerpt(rule.id)} is also used at {first_seen[rule.id]}",
                    code=ProblemCode.ID_DUPLICATE,
                )
            )
        first_seen.setdefault(rule.id, rule.location or Location(document.file))
        rules.append(rule)
    tests = tuple(
        _test(data, document.locate(("spec", "tests", index)))
        for index, data in enumerate(spec.get("tests", ()))
    )
    try:
        plan = EvaluationPlan.build(rules, compiler)
    except ConditionSetError:
        plan = None
    except DependencyError as exc:
        plan = None
        for issue in exc.issues:
            rule = rules[issue.index]
            problems.append(
                _condition_problem(
                    document,
                    issue.index,
                    dependency_error(rule, issue),
                    ruleset_id=ruleset_id,
                    rule_id=rule.id,
                )
            )
    # Disabled rules are compiled too: enabling one later must never surprise.
    for index, rule in enumerate(rules):
        if plan is not None and rule.enabled:
            continue
        try:
            compiler.compile(rule.condition)
        except ConditionError as exc:
            problems.append(
                _condition_problem(document, index, exc, ruleset_id=ruleset_id, rule_id=rule.id)
            )
    if plan is not None and plan.conditions.worst_cost > RULESET_COST_LIMIT:
        message = (
            f"the ruleset's conditions together may take up to "
            f"{plan.conditions.worst_cost / 1e6:.0f} ms on the worst input, over the "
            f"limit of {RULESET_COST_LIMIT / 1e6:.0f} ms for one evaluation: split the ruleset "
            "or make its costliest conditions cheaper"
        )
        problems.append(
            document.locate(("spec", "rules")).problem(
                message,
                path="$.spec.rules",
                ruleset_id=ruleset_id,
                code=ProblemCode.CEL_TOO_COSTLY,
            )
        )
    if problems or plan is None:
        return None, problems
    ruleset = RuleSet(
        id=ruleset_id,
        name=metadata.get("name", ruleset_id),
        description=metadata.get("description", ""),
        labels=freeze(metadata.get("labels", {})),
        decisions=tuple(
            DecisionBand(
                d["decision"],
                _integer(d["min_points"]),
                location=document.locate(("spec", "decisions", index)),
            )
            for index, d in enumerate(spec.get("decisions", ()))
        ),
        default_decision=spec.get("default_decision"),
        rules=tuple(rules),
        tests=tests,
        challenger_of=None if spec.get("challenger_of") is None else str(spec["challenger_of"]),
        plan=plan,
        location=document.locate(()),
    )
    return ruleset, []


def _rule_problem(
    rule: Rule,
    message: str,
    *,
    code: ProblemCode,
    path: str = "",
    at: Location | None = None,
) -> Problem:
    where = at or rule.location or Location("<unknown>")
    return where.problem(
        message, path=path or "$", ruleset_id=rule.ruleset_id, rule_id=rule.id, code=code
    )


def _condition_message(exc: ConditionError) -> str:
    return f"{exc.reason} (expression {exc.line}:{exc.column}): {exc.message}"


def dependency_error(rule: Rule, issue: DependencyIssue) -> ConditionError:
    """A refused reference of `rule`'s condition to another rule, placed at it."""
    return located(rule.condition, issue.offset, issue.message, DEPENDENCY_REFUSED)


def dependency_problems(rules: Sequence[Rule], exc: DependencyError) -> list[Problem]:
    """`DependencyError`'s issues as problems at their rules (an edit, without a
    document to place them inside the condition)."""
    problems = []
    for issue in exc.issues:
        rule = rules[issue.index]
        error = dependency_error(rule, issue)
        problems.append(
            _rule_problem(
                rule,
                _condition_message(error),
                path="$.condition",
                code=ProblemCode.CHECK_DEPENDENCY,
            )
        )
    return problems


def _condition_code(exc: ConditionError) -> ProblemCode:
    # `reason` is one of three phrases (sidecar.conditions): priced too high, a read of
    # other rules that cannot be, or not compiling.
    if exc.reason == DEPENDENCY_REFUSED:
        return ProblemCode.CHECK_DEPENDENCY
    return ProblemCode.CEL_TOO_COSTLY if "costly" in exc.reason else ProblemCode.CEL_COMPILE


def _condition_problem(
    document: Document,
    index: int,
    exc: ConditionError,
    *,
    ruleset_id: str | None,
    rule_id: str | None,
) -> Problem:
    """Point at the failing character when the expression sits on one line in the file."""
    path = ("spec", "rules", index, "condition")
    node = document.node_at(path)
    at = document.locate(path)
    # The C parser gives plain scalars the style "", the Python one None.
    if isinstance(node, yaml.ScalarNode) and node.style in (None, "", "'", '"') and exc.line == 1:
        quote = 1 if node.style in ("'", '"') else 0
        at = Location(at.file, at.line, at.column + quote + exc.column - 1)
    elif isinstance(node, yaml.ScalarNode) and node.style == "|":
        at = Location(at.file, at.line + exc.line, at.column)
    return at.problem(
        _condition_message(exc),
        path=format_path(path),
        ruleset_id=ruleset_id,
        rule_id=rule_id,
        code=_condition_code(exc),
    )


def _every_problem(results: Sequence[_FileResult]) -> list[Problem]:
    """Every file's problems and what only the whole registry shows (ids used twice,
    challengers without a pair), in file:line:column order."""
    problems = [problem for result in results for problem in result.problems]
    problems.extend(_duplicate_problems(results))
    problems.extend(_challenger_problems(results))
    return sorted(problems, key=lambda p: (p.file, p.line, p.column))


def _challenger_problems(results: Iterable[_FileResult]) -> list[Problem]:
    """`challenger_of` must name another ruleset of the registry (any file, any
    source), one that is not itself a challenger, and a ruleset has one challenger at
    most: every evaluation of it evaluates its challenger too, and no more."""
    declared = [declared for result in results for declared in result.declared]
    targets = {d.ruleset_id: d.challenger_of for d in declared}
    taken: dict[str, str] = {}
    problems: list[Problem] = []
    for challenger in declared:
        if challenger.challenger_of is None:
            continue
        target, location = challenger.challenger_of
        if target == challenger.ruleset_id:
            message = "a ruleset cannot be its own challenger"
        elif target not in targets:
            message = f"challenger_of names ruleset {excerpt(target)}, which is not in the registry"
        elif (chained := targets[target]) is not None:
            message = (
                f"challenger_of names ruleset {excerpt(target)}, itself the challenger of "
                f"{excerpt(chained[0])}: challengers do not chain"
            )
        elif target in taken:
            message = (
                f"ruleset {excerpt(target)} already has a challenger, "
                f"{excerpt(taken[target])}: one challenger per ruleset"
            )
        else:
            taken[target] = challenger.ruleset_id
            continue
        problems.append(
            location.problem(
                message,
                path="$.spec.challenger_of",
                ruleset_id=challenger.ruleset_id,
                code=ProblemCode.CHECK_CHALLENGER,
            )
        )
    return problems


def _duplicate_problems(results: Iterable[_FileResult]) -> list[Problem]:
    """Ruleset and rule ids must be unique across every file (and every source),
    whether or not the documents that declare them compiled."""
    problems: list[Problem] = []
    rulesets_seen: dict[str, Location] = {}
    rules_seen: dict[str, tuple[str, Location]] = {}
    for declared in (declared for result in results for declared in result.declared):
        ruleset_id = declared.ruleset_id
        if ruleset_id in rulesets_seen:
            message = (
                f"ruleset id {excerpt(ruleset_id)} is also defined at {rulesets_seen[ruleset_id]}"
            )
            problems.append(
                declared.location.problem(
                    message, ruleset_id=ruleset_id, code=ProblemCode.ID_DUPLICATE
                )
            )
            continue
        rulesets_seen[ruleset_id] = declared.location
        for rule_id, location in declared.rules:
            if rule_id not in rules_seen:
                rules_seen[rule_id] = (ruleset_id, location)
            else:
                other_ruleset, other = rules_seen[rule_id]
                message = (
                    f"rule id {excerpt(rule_id)} is also used by ruleset {excerpt(other_ruleset)} "
                    f"at {other}"
                )
                problems.append(
                    location.problem(
                        message,
                        ruleset_id=ruleset_id,
                        rule_id=rule_id,
                        code=ProblemCode.ID_DUPLICATE,
                    )
                )
    return problems

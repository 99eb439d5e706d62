"""The hot-reload service: one reload at a time, all or nothing, from every trigger.

Watchers, the periodic resync and verification, SIGHUP (all scheduled by
`sidecar.scheduling`) and the API end in one reload at a time, serialised by one lock.
The heavy part (reading, parsing, validating, compiling, and the publish's diff and
history) runs in worker threads so requests keep being served; readers see the new
snapshot through one reference swap, and subscribers are told on the event loop. A
failed reload changes nothing: the last good snapshot keeps serving and the
failure is recorded with every problem's location.

What a source says about its changes (a watch, a fingerprint, row versions) is an
optimisation, never the only truth: a forced reload and SIGHUP `forget` every source
before reading it, and the periodic verification reads each source twice, as usual and
after `forget`; content the usual read missed is loaded like any change and counted as
drift. Whatever a source's code raises, in any of its methods, is a failed reload or a
watch problem naming the source, never a crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from enum import StrEnum
from typing import Final

from sidecar.decision import Attempt, Memory, Verdict, confirms, decide, refusal
from sidecar.errors import LoadError, NotFoundError, Problem, ProblemCode
from sidecar.loader import Loader, LoadResult
from sidecar.reading import ReadMode, SourceRead, SourceSet
from sidecar.registry import RuleRegistry, RulesetChanges, diff_rulesets
from sidecar.reloads import (
    Filter,
    Outcome,
    ReloadListener,
    ReloadLog,
    ReloadRecord,
    ReloadStatus,
    Trigger,
    Triggers,
    now,
)
from sidecar.rulefiles import FileLimits, SourceFile
from sidecar.scheduling import Scheduler
from sidecar.snapshot import Snapshot
from sidecar.sources import RowVersioned, RuleSource
from sidecar.state import StateError, StateStore

__all__ = [
    "CandidateCheck",
    "Exclusive",
    "Health",
    "HealthChecks",
    "HealthStatus",
    "HotReloadService",
    "ReloadRecord",
    "ReloadStatus",
    "Starting",
    "Trigger",
    "Validation",
]

logger = logging.getLogger("sidecar.service")

# How long an emptied source must stay empty before every rule is taken away.
_CONFIRM_EMPTY_SECONDS: Final = 1.0


class HealthStatus(StrEnum):
    HEALTHY = "healthy"
    DEGRADED = "degraded"  # serving, but the last reload failed or nobody is watching
    UNHEALTHY = "unhealthy"  # nothing valid was ever loaded


@dataclass(frozen=True, slots=True)
class Starting:
    """While the first load has not ended: what it waits for, for how many seconds."""

    waiting_for: str
    seconds: float


@dataclass(frozen=True, slots=True)
class HealthChecks:
    """Each fact health is decided from."""

    monitoring_active: bool
    registry_has_rules: bool
    last_reload_successful: bool
    sources_watched: bool
    fresh: bool


@dataclass(frozen=True, slots=True)
class Health:
    status: HealthStatus
    checks: HealthChecks
    watch_problems: Mapping[str, str]
    starting: Starting | None


@dataclass(frozen=True, slots=True)
class Validation:
    """A load of every source as a reload would do it, not published."""

    problems: tuple[Problem, ...]
    candidate: Snapshot | None
    current_revision: str


@dataclass(frozen=True, slots=True, kw_only=True)
class CandidateCheck:
    """Candidate rule files checked as part of the registry, nothing published.

    `problems`: everything a reload of that registry would refuse. `changes`: what the
    candidate's rulesets that loaded (all of them, when valid) change in what serves.
    `cases_run`/`cases_passed`: the candidate's embedded test cases. `revision`: what
    the registry would be served as (None unless valid); `current_revision`: what serves.
    """

    problems: tuple[Problem, ...]
    changes: RulesetChanges
    cases_run: int
    cases_passed: int
    revision: str | None
    current_revision: str

    @property
    def valid(self) -> bool:
        return not self.problems


@dataclass(frozen=True, slots=True)
class Exclusive:
    """The reload lock, held (`HotReloadService.exclusively`): no reload runs until the
    holder leaves, so what it checks is judged against what serves, and what it then
    publishes is its own change. The seam of a write: check, commit, publish."""

    _service: HotReloadService

    async def check(self, source: str, files: Sequence[SourceFile]) -> Validation:
        """Would the registry load, as a reload would load it, were `source`'s files
        these (every other source as last read)? Nothing is published or remembered."""
        return await self._service._trial(source, files)

    async def publish(self, filtered_by: Filter) -> ReloadRecord:
        """Reload now (trigger `write`): what the sources hold is read, and published
        when it is valid and new, like any reload; `filtered_by` says what was written."""
        request = _Request(frozenset({Trigger.WRITE}), filtered_by=filtered_by)
        return await self._service._reload(request)


@dataclass(frozen=True, slots=True)
class _Request:
    """One reload asked for: why, how the sources are read, and what it may skip."""

    triggers: Triggers
    read: ReadMode = ReadMode.USUAL
    force: bool = False  # publish even an unchanged result; ends a rollback
    validate: bool = True  # False skips embedded tests and semantic checks
    filtered_by: Filter | None = None


class HotReloadService:
    """The hot-reload contract's HotReloadService over any set of `RuleSource`s.

    It reads and compiles (in worker threads), asks `decision.decide` what the result
    means, and carries that out: publish, record, save the state copy.
    """

    def __init__(
        self,
        registry: RuleRegistry,
        sources: Sequence[RuleSource],
        *,
        loader: Loader,
        interval_seconds: float = 30.0,
        auto_reload: bool = True,
        state: StateStore | None = None,
        history_limit: int = 50,
        max_age_seconds: float = 300.0,
        allow_empty: bool = False,
        confirm_empty_seconds: float = _CONFIRM_EMPTY_SECONDS,
        verify_interval_seconds: float = 300.0,
    ) -> None:
        self.registry = registry
        self.sources = SourceSet(sources)
        self.loader = loader
        self.auto_reload = auto_reload
        self.state = state
        self.max_age_seconds = max_age_seconds
        self.allow_empty = allow_empty
        self.confirm_empty_seconds = confirm_empty_seconds
        self.log = ReloadLog(history_limit)
        self._lock = asyncio.Lock()
        self._shutting_down = False
        # One candidate check at a time: there is one checker process.
        self._candidates = asyncio.Lock()
        # What the service waits for now, and since when (monotonic): for health while
        # the first load runs. Set from the reading thread too (one assignment).
        self._activity: tuple[str, float] | None = None
        self._in_initial_load = False
        self._scheduler = Scheduler(
            self._run_background,
            failing=self._failing,
            interval_seconds=interval_seconds,
            verify_interval_seconds=verify_interval_seconds,
        )
        self._last_check: datetime | None = None
        # When a read of every source last succeeded and what serves was known to be
        # right: freshness is measured from here, not from the last content change.
        self._last_verified: datetime | None = None
        # Rulesets per source when what serves was last verified: a source that had some
        # and now has none has been emptied.
        self._held: dict[str, int] = {}
        self._serving_from_state = False
        # The revision the sources held when a rollback went away from it; while they
        # still hold it, background reloads keep the rollback. None: no rollback holds.
        self._rolled_back_from: str | None = None
        # The row versions of the snapshot they describe: set when what serves is known
        # to be what the sources hold, so a version never names content that does not serve.
        self._row_versions: tuple[Snapshot, Mapping[str, int]] | None = None

    # Lifecycle

    @property
    def monitoring_active(self) -> bool:
        return self._scheduler.active

    @property
    def interval_seconds(self) -> float:
        """Between two resyncs, while the last reload did not fail."""
        return self._scheduler.interval_seconds

    @property
    def verify_interval_seconds(self) -> float:
        """Between two verifications (0: never)."""
        return self._scheduler.verify_interval_seconds

    def start(self) -> None:
        """Start watching every source, the periodic resync and verification (idempotent)."""
        self._scheduler.start(self.sources)

    async def stop(self, *, shutting_down: bool = False) -> None:
        """Stop watching (and any requested reload); the registry keeps serving.
        `shutting_down`: the server is ending; health does not count the watches it
        stops as monitoring turned off (a probe or page during the drain would read a
        degradation that is only the shutdown)."""
        self._shutting_down = self._shutting_down or shutting_down
        await self._scheduler.stop()

    async def close(self) -> None:
        """Stop watching and the loader's worker process: the server is shutting down."""
        await self.stop()
        self.loader.close()

    def add_listener(self, listener: ReloadListener) -> None:
        """Called on the event loop after every recorded reload (success or failure)."""
        self.log.add_listener(listener)

    # Reloads

    async def initial_load(self) -> ReloadRecord:
        """First load; when the sources are broken, fall back to the state dir's copy."""
        self._in_initial_load = True
        try:
            async with self._lock:
                record = await self._reload(_Request(frozenset({Trigger.STARTUP})))
            if record.status is ReloadStatus.FAILED and self.state is not None:
                self._activity = ("restoring the state dir's copy", time.monotonic())
                await self._load_saved(self.state, record)
            return record
        finally:
            self._in_initial_load = False
            self._activity = None

    async def reload_rules(
        self,
        *,
        trigger: Trigger = Trigger.API,
        force: bool = False,
        validate: bool = True,
        ruleset_id: str | None = None,
        rule_id: str | None = None,
    ) -> ReloadRecord:
        """Read every source and publish the result if it is valid and differs.

        `force` makes every source forget what it kept (fingerprints, versions, caches)
        and read everything from scratch, re-parses every file and publishes even an
        unchanged result; `validate` False skips embedded tests and semantic checks
        (never schema or compilation).

        With `ruleset_id` or `rule_id` (the contract's scoped reloads) the whole source is
        still reloaded: a file is the unit of change, and unchanged files are not
        re-parsed, so this costs no more than the changed file. The ids are recorded in
        `filtered_by`; `NotFoundError` when an id exists neither before nor after a
        reload that did not fail.
        """
        request = _Request(
            frozenset({trigger}),
            read=ReadMode.FRESH if force else ReadMode.USUAL,
            force=force,
            validate=validate,
            filtered_by={"ruleset_id": ruleset_id, "rule_id": rule_id},
        )
        async with self._lock:
            known = self._knows(ruleset_id, rule_id)
            record = await self._reload(request)
        failed = record.status is ReloadStatus.FAILED
        if not failed and not known and not self._knows(ruleset_id, rule_id):
            kind, missing = ("rule", rule_id) if rule_id is not None else ("ruleset", ruleset_id)
            raise NotFoundError(kind, str(missing))
        return record

    async def reload_ruleset(self, ruleset_id: str, *, force: bool = False) -> ReloadRecord:
        """A scoped reload of the hot-reload contract; see `reload_rules`."""
        return await self.reload_rules(ruleset_id=ruleset_id, force=force)

    async def reload_single_rule(self, rule_id: str, *, force: bool = False) -> ReloadRecord:
        """A scoped reload of the hot-reload contract; see `reload_rules`."""
        return await self.reload_rules(rule_id=rule_id, force=force)

    def _knows(self, ruleset_id: str | None, rule_id: str | None) -> bool:
        snapshot = self.registry.current
        return (ruleset_id is None or ruleset_id in snapshot.rulesets) and (
            rule_id is None or rule_id in snapshot.rules
        )

    async def validate_reload(self) -> Validation:
        """Load every source as a reload would, without publishing anything; a result a
        reload would refuse (an emptied source) is not valid either."""
        async with self._lock:
            attempt, _, _ = await self._attempt(
                _Request(frozenset({Trigger.API})), self.registry.current
            )
        return self._validation(attempt)

    def _validation(self, attempt: Attempt) -> Validation:
        """What an attempt says of validity: its problems, or the refusal a reload would
        give its result (an emptied source)."""
        refused = () if self.allow_empty else refusal(attempt)
        return Validation(attempt.problems or refused, attempt.candidate, attempt.serving.revision)

    async def validate_candidate(
        self, files: Sequence[SourceFile], *, seconds: float, limits: FileLimits | None = None
    ) -> CandidateCheck:
        """Would the registry load with `files` in it? Each ruleset they declare replaces
        the ruleset of that id wherever it is (in whichever file or source), or joins the
        registry; nothing is published, recorded or remembered for the next reload.

        The rest of the registry is what every source held at the last load (see
        `Loader.examine_candidate`), taken without the reload lock: a check never waits
        behind a reload (reading a slow source, compiling thousands of rulesets), and a
        reload never waits behind a check or sees its files. A check that overlaps a
        reload judges the candidate against the registry before or after that reload,
        whole either way. Checks run one at a time, off the event loop, in the loader's
        checker process when it has one, each file within `limits`.

        `TimeoutError` when the check does not end within `seconds`, waiting for the
        previous one included; the checker process is then killed, as it is when the
        caller leaves (this task is cancelled): no check computes for nobody, and the
        next one starts once the killed one has ended.
        """
        deadline = time.monotonic() + seconds
        async with asyncio.timeout(seconds):
            await self._candidates.acquire()
        try:
            stop = threading.Event()
            examine = functools.partial(
                self.loader.examine_candidate, files, limits=limits, deadline=deadline, stop=stop
            )
            work = asyncio.ensure_future(asyncio.to_thread(examine))
            try:
                examination = await asyncio.shield(work)
            except asyncio.CancelledError:
                # The caller left: the thread kills the check within a poll; the next
                # check waits for that, or it could be handed the dying process.
                stop.set()
                await asyncio.wait([work])
                if not work.cancelled():
                    work.exception()  # retrieved: it is why the check stopped
                raise
        finally:
            self._candidates.release()
        problems = examination.problems
        if not problems and not examination.replaced:
            # As `rule-sidecar validate` refuses a path that yields nothing: a check of
            # nothing must not pass for a check of something.
            problems = (_empty_candidate(files[0].name if files else "<candidate>"),)
        serving = self.registry.current
        return CandidateCheck(
            problems=problems,
            changes=diff_rulesets(serving, examination.rulesets),
            cases_run=examination.cases_run,
            cases_passed=examination.cases_passed,
            revision=None if problems else examination.revision,
            current_revision=serving.revision,
        )

    @contextlib.asynccontextmanager
    async def exclusively(self) -> AsyncIterator[Exclusive]:
        """Hold the reload lock (see `Exclusive`); a reload asked for meanwhile waits."""
        async with self._lock:
            yield Exclusive(self)

    async def _trial(self, source: str, files: Sequence[SourceFile]) -> Validation:
        read = self.sources.last_read(source, files)
        request = _Request(frozenset({Trigger.WRITE}))
        attempt, _, _ = await self._judged(read, self.loader.trial, request, self.registry.current)
        return self._validation(attempt)

    def row_version(self, snapshot: Snapshot, ruleset_id: str) -> int | None:
        """The row version of `snapshot`'s ruleset in its database, when the snapshot
        serves what the sources last read (not after a rollback, nor from the state dir)."""
        if self._row_versions is None or self._row_versions[0] is not snapshot:
            return None
        return self._row_versions[1].get(ruleset_id)

    async def rollback(self, version: int | None = None) -> ReloadRecord:
        """Publish an earlier snapshot again (as a new version); raises NotFoundError.

        The rollback holds while the sources still hold what was rolled back from: the
        watcher and the resync do not re-apply it. New content in the sources, or a
        reload with `force`, ends the rollback.
        """
        async with self._lock:
            started, before = time.perf_counter(), self.registry.current
            snapshot, events = self.registry.rollback(version)
            self._rolled_back_from = self._rolled_back_from or before.revision
            await self._save_state(snapshot)
            outcome = Outcome(
                triggers=frozenset({Trigger.ROLLBACK}),
                status=ReloadStatus.SUCCESS,
                before=before,
                after=snapshot,
                changes=events,
                filtered_by={"version": version},
            )
            return self.log.record(outcome, elapsed_ms=_elapsed_ms(started))

    # Status

    def is_fresh(self, max_age_seconds: float | None = None, *, at: datetime | None = None) -> bool:
        """Whether every source was read successfully, and what serves confirmed, within
        the window (`HOT_RELOAD_MAX_AGE_SECONDS` by default), changed or not."""
        verified = self._last_verified
        if verified is None:
            return False
        window = self.max_age_seconds if max_age_seconds is None else max_age_seconds
        return ((at or now()) - verified).total_seconds() <= window

    @property
    def last_check(self) -> datetime | None:
        """When the sources were last read for a reload."""
        return self._last_check

    @property
    def last_verified(self) -> datetime | None:
        """When a read of every source last succeeded and confirmed what serves."""
        return self._last_verified

    @property
    def serving_from_state(self) -> bool:
        """What serves was restored from the state dir, not read from the sources."""
        return self._serving_from_state

    @property
    def rollback_active(self) -> bool:
        return self._rolled_back_from is not None

    def health(self) -> Health:
        """Health for the kubelet: unhealthy only while nothing valid has ever loaded, or
        the first load has not ended.

        Degraded = serving the last known good, or monitoring off (wholly, or for one
        source whose watch is down), or the sources not confirmed within the freshness
        window. An empty registry shows in `registry_has_rules` but is a valid state,
        not a degradation."""
        last = self.log.last
        # Not before the first load has ended: it publishes, then saves the state copy,
        # and only then does watching start (serve() answers probes all along).
        starting = self.starting()
        has_snapshot = self.registry.version > 0 and starting is None
        watch_problems = self.watch_problems()
        last_ok = last is None or last.status is not ReloadStatus.FAILED
        checks = HealthChecks(
            monitoring_active=self.monitoring_active,
            registry_has_rules=bool(self.registry.current.rules),
            last_reload_successful=last_ok and not self._serving_from_state,
            sources_watched=not watch_problems,
            fresh=self.is_fresh(),
        )
        monitoring = checks.monitoring_active or not self.auto_reload or self._shutting_down
        watching = monitoring and not watch_problems
        fresh_enough = checks.fresh or not self.auto_reload
        if not has_snapshot:
            status = HealthStatus.UNHEALTHY
        elif checks.last_reload_successful and watching and fresh_enough:
            status = HealthStatus.HEALTHY
        else:
            status = HealthStatus.DEGRADED
        return Health(status, checks, watch_problems, starting)

    def starting(self) -> Starting | None:
        """While the first load has not ended: what it waits for, and how long it has.
        None once the first load ended, well or not (or any reload was recorded, or a
        snapshot published otherwise)."""
        never_loaded = self.log.last is None and self.registry.version == 0
        if not (self._in_initial_load or never_loaded):
            return None
        activity = self._activity
        if activity is None:
            return Starting("the first load to begin", 0.0)
        doing, since = activity
        return Starting(doing, round(time.monotonic() - since, 1))

    @property
    def ready(self) -> bool:
        """A snapshot serves and the first load has ended; stays true through later
        failed reloads."""
        return self.registry.version > 0 and self.starting() is None

    @property
    def drift(self) -> dict[str, int]:
        """Per source, how many verifications found what its usual read missed."""
        return self.sources.drift

    def watch_problems(self) -> dict[str, str]:
        """Sources whose changes may go unnoticed now; none matter while not watching."""
        return self.sources.watch_problems() if self.monitoring_active else {}

    # Internals

    def request_reload(self, reason: Trigger, *, fresh: bool = False) -> asyncio.Task[None]:
        """Ask for a background reload (see `Scheduler.request`); returns the task that
        carries it out."""
        return self._scheduler.request(reason, fresh=fresh)

    async def _run_background(self, reasons: Triggers, fresh: bool) -> None:
        read = ReadMode.VERIFY if Trigger.VERIFY in reasons else ReadMode.USUAL
        async with self._lock:
            await self._reload(_Request(reasons, read=ReadMode.FRESH if fresh else read))

    def _failing(self) -> bool:
        return self.log.last is not None and self.log.last.status is ReloadStatus.FAILED

    async def _attempt(
        self, request: _Request, serving: Snapshot, *, confirmed: bool = False
    ) -> tuple[Attempt, LoadResult | None, dict[str, int]]:
        """Read every source and compile the result, off the event loop; also how many
        rulesets each source gave."""
        found = await self.sources.read(request.read, on_source=self._reading_source)
        checks = request.validate and self.loader.run_checks
        load = functools.partial(self.loader.load, run_checks=checks)
        return await self._judged(found, load, request, serving, confirmed=confirmed)

    async def _judged(
        self,
        found: SourceRead,
        load: Callable[[Sequence[SourceFile]], LoadResult],
        request: _Request,
        serving: Snapshot,
        *,
        confirmed: bool = False,
    ) -> tuple[Attempt, LoadResult | None, dict[str, int]]:
        """Compile what `found` holds with `load` (a reload's, or a write's trial), off
        the event loop: the attempt, the load's result, how many rulesets each source
        gave. A loader that crashes is a failed load, never an exception."""
        problems = list(found.problems)
        result: LoadResult | None = None
        if not problems:
            files = found.files
            self._activity = (f"compiling {len(files)} rule file(s)", time.monotonic())
            try:
                result = await asyncio.to_thread(load, files)
            except LoadError as exc:
                problems = list(exc.problems)
            except Exception as exc:
                logger.exception("loading the rules failed unexpectedly")
                message = f"internal error while loading: {type(exc).__name__}: {exc}"
                problems = [Problem(file="<loader>", message=message, code=ProblemCode.INTERNAL)]
        counts = self.sources.rulesets_per_source(result.snapshot if result else None, found)
        attempt = Attempt(
            triggers=request.triggers,
            serving=serving,
            candidate=result.snapshot if result else None,
            problems=tuple(problems),
            force=request.force,
            confirmed=confirmed,
            emptied=tuple(
                name for name, count in counts.items() if not count and self._held.get(name)
            ),
        )
        return attempt, result, counts

    def _reading_source(self, name: str) -> None:
        self._activity = (f"reading {name}", time.monotonic())

    def _memory(self) -> Memory:
        return Memory(
            last=self.log.last,
            serving_from_state=self._serving_from_state,
            rolled_back_from=self._rolled_back_from,
        )

    async def _reload(self, request: _Request) -> ReloadRecord:
        """Read, compile, decide, carry out; called holding the lock."""
        try:
            return await self._decide_and_carry_out(request)
        finally:
            self._activity = None  # health's `starting` says what the first load does

    async def _decide_and_carry_out(self, request: _Request) -> ReloadRecord:
        started, before = time.perf_counter(), self.registry.current
        self._last_check = now()
        if request.read is ReadMode.FRESH:
            self.loader.forget()
        if request.force:
            self._rolled_back_from = None
        attempt, result, counts = await self._attempt(request, before)
        verdict = decide(attempt, self._memory(), allow_empty=self.allow_empty)
        if verdict is Verdict.CONFIRM:
            # Every rule gone at once is more often a source in flux (a directory being
            # re-created, a database between `db init` and `db import`) than a decision:
            # read once more after a pause (from scratch, unless reading as usual).
            await asyncio.sleep(self.confirm_empty_seconds)
            if request.read is not ReadMode.USUAL:
                request = replace(request, read=ReadMode.FRESH)
            attempt, result, counts = await self._attempt(request, before, confirmed=True)
            verdict = decide(attempt, self._memory(), allow_empty=self.allow_empty)
        if confirms(verdict):
            self._last_verified = now()
            self._held = counts
        if attempt.candidate is not None and attempt.candidate.revision != self._rolled_back_from:
            # The sources no longer hold what a rollback went away from: it has ended,
            # and whatever they hold next is news, even that content again.
            self._rolled_back_from = None
        if self._save_pending(verdict, attempt):
            await self._save_state(before)  # the last save failed: try again
        if verdict in (Verdict.QUIET, Verdict.REPEATED):
            self._note_row_versions(verdict)
            return self._unrecorded(before, request.triggers)
        outcome = await self._carry_out(verdict, attempt, result, request.filtered_by)
        self._note_row_versions(verdict)
        if outcome.status is ReloadStatus.FAILED:
            self._scheduler.failed()
        return self.log.record(outcome, elapsed_ms=_elapsed_ms(started))

    async def _carry_out(
        self,
        verdict: Verdict,
        attempt: Attempt,
        result: LoadResult | None,
        filtered_by: Filter | None,
    ) -> Outcome:
        failed = Outcome(
            triggers=attempt.triggers,
            status=ReloadStatus.FAILED,
            before=attempt.serving,
            after=attempt.serving,
            errors=attempt.problems,
            filtered_by=filtered_by,
        )
        if verdict is Verdict.EMPTY_REFUSED:
            return replace(failed, errors=refusal(attempt))
        if verdict is Verdict.FAILED or result is None:
            return failed
        loaded = replace(failed, errors=(), files=result.files, files_parsed=result.files_parsed)
        if verdict is Verdict.RECOVERED:
            return replace(loaded, status=ReloadStatus.SUCCESS)
        if verdict is not Verdict.PUBLISH:
            return replace(loaded, status=ReloadStatus.UNCHANGED)
        # Diffing and recording a large change takes tens of ms: in a thread, while the
        # loop serves; the subscribers are told here, on the loop.
        publish = functools.partial(self.registry.publish, deliver=False)
        snapshot, events = await asyncio.to_thread(
            self.loader.timed_publish, publish, result.snapshot
        )
        self.registry.deliver()
        self._serving_from_state = False
        self._rolled_back_from = None
        await self._save_state(snapshot)
        return replace(loaded, status=ReloadStatus.SUCCESS, after=snapshot, changes=events)

    async def _load_saved(self, state: StateStore, failure: ReloadRecord) -> None:
        started, before = time.perf_counter(), self.registry.current
        try:
            saved = await asyncio.to_thread(state.load)
        except LoadError as exc:
            logger.error("the saved snapshot in the state dir is not valid: %s", exc)
            return
        if saved is None:
            return
        try:
            result = await asyncio.to_thread(self.loader.load, saved, run_checks=False)
        except LoadError as exc:
            logger.error("the saved snapshot in the state dir is not valid: %s", exc)
            return
        finally:
            self.loader.forget()  # the next reload must read the live sources in full
        expected = await asyncio.to_thread(state.saved_summary)
        restored = (result.snapshot.revision, len(result.snapshot.rulesets))
        if expected is not None and restored != expected:
            logger.error(
                "the state dir's copy restores %d rulesets of revision %s, not the %d of "
                "%s it was saved with (a file of it was removed or edited): not served",
                restored[1],
                restored[0],
                expected[1],
                expected[0],
            )
            return
        snapshot, events = self.loader.timed_publish(self.registry.publish, result.snapshot)
        self._serving_from_state = True
        outcome = Outcome(
            triggers=frozenset({Trigger.STATE_DIR}),
            status=ReloadStatus.RESTORED,
            before=before,
            after=snapshot,
            changes=events,
            errors=failure.errors,
        )
        self.log.record(outcome, elapsed_ms=_elapsed_ms(started))

    def _note_row_versions(self, verdict: Verdict) -> None:
        """After a reload: the sources' row versions describe what serves now, when it
        is what they hold."""
        if not confirms(verdict) or self._rolled_back_from or self._serving_from_state:
            return
        versions: dict[str, int] = {}
        for source in self.sources:
            if isinstance(source, RowVersioned):
                versions.update(source.row_versions())
        self._row_versions = (self.registry.current, versions)

    def _save_pending(self, verdict: Verdict, attempt: Attempt) -> bool:
        """The copy's last save failed, and what serves is what the sources hold."""
        unchanged = verdict in (Verdict.QUIET, Verdict.UNCHANGED, Verdict.RECOVERED)
        return (
            self.state is not None
            and self.state.status().ok is False
            and unchanged
            and attempt.candidate is not None
            and not self._serving_from_state
        )

    async def _save_state(self, snapshot: Snapshot) -> None:
        if self.state is None:
            return
        try:
            await asyncio.to_thread(self.state.save, snapshot)
        except (OSError, StateError) as exc:
            logger.warning(
                "could not save the last good snapshot to %s: %s", self.state.directory, exc
            )

    def _unrecorded(self, current: Snapshot, triggers: Triggers) -> ReloadRecord:
        """A background check that found nothing new: not worth a history entry."""
        return ReloadRecord(
            id=0,
            triggers=triggers,
            status=ReloadStatus.UNCHANGED,
            timestamp=now(),
            reload_time_ms=0.0,
            rules_loaded=len(current.rules),
            rulesets_loaded=len(current.rulesets),
            reload_count=self.log.successes,
            version_before=current.version,
            version_after=current.version,
            revision=current.revision,
        )


def _empty_candidate(file: str) -> Problem:
    message = "the candidate holds no ruleset document"
    return Problem(file=file, message=message, code=ProblemCode.RULES_EMPTY)


def _elapsed_ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000

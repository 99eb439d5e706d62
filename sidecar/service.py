"""The hot-reload service: one reload at a time, all or nothing, from every trigger.

Watchers, the periodic resync, SIGHUP and the API all end in `reload_rules`. Reloads
are serialised by one lock; background triggers that arrive during a reload coalesce
into a single reload after it. The heavy part (reading, parsing, validating, compiling)
runs in a worker thread so requests keep being served; the publish itself is one
reference swap on the event loop. A failed reload changes nothing: the last good
snapshot keeps serving and the failure is recorded with every problem's location.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sidecar.documents import SourceFile
from sidecar.errors import LoadError, NotFoundError, Problem
from sidecar.loader import Loader
from sidecar.registry import ChangeEvent, RuleRegistry
from sidecar.snapshot import Snapshot
from sidecar.sources import RuleSource
from sidecar.state import StateError, StateStore

__all__ = ["HealthStatus", "HotReloadService", "ReloadRecord", "ReloadStatus", "Trigger"]

logger = logging.getLogger("sidecar.service")


class Trigger(StrEnum):
    STARTUP = "startup"
    WATCH = "watch"
    RESYNC = "resync"
    API = "api"
    SIGNAL = "signal"
    ROLLBACK = "rollback"
    STATE_DIR = "state_dir"


class ReloadStatus(StrEnum):
    SUCCESS = "success"
    FAILED = "failed"
    UNCHANGED = "unchanged"
    # The sources failed at startup and the state dir's copy of the last good snapshot
    # was published instead: rules serve, but the reload itself did not succeed.
    RESTORED = "restored"


class HealthStatus(StrEnum):
    HEALTHY = "healthy"
    DEGRADED = "degraded"  # serving, but the last reload failed or nobody is watching
    UNHEALTHY = "unhealthy"  # nothing valid was ever loaded


_BACKGROUND = frozenset({Trigger.WATCH.value, Trigger.RESYNC.value})


def _is_background(trigger: str) -> bool:
    """Watch and resync triggers (alone or coalesced, e.g. "resync+watch")."""
    return set(str(trigger).split("+")) <= _BACKGROUND


def _now() -> datetime:
    return datetime.now(UTC)


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None


@dataclass(frozen=True, slots=True, kw_only=True)
class ReloadRecord:
    """One reload attempt, as history, the API and the WebSocket report it."""

    id: int
    trigger: str
    status: ReloadStatus
    timestamp: datetime
    reload_time_ms: float
    rules_loaded: int
    rulesets_loaded: int
    reload_count: int
    version_before: int
    version_after: int
    revision: str
    files_parsed: int = 0
    files: int = 0
    errors: tuple[Problem, ...] = ()
    changes: tuple[ChangeEvent, ...] = field(default=(), repr=False)
    filtered_by: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The seed's reload response fields, plus version, revision and errors."""
        return {
            "id": self.id,
            "status": self.status.value,
            "trigger": self.trigger,
            "timestamp": self.timestamp.isoformat(),
            "reload_time_ms": round(self.reload_time_ms, 3),
            "rules_loaded": self.rules_loaded,
            "rulesets_loaded": self.rulesets_loaded,
            "reload_count": self.reload_count,
            "version_before": self.version_before,
            "version_after": self.version_after,
            "revision": self.revision,
            "files": self.files,
            "files_parsed": self.files_parsed,
            "changes": len(self.changes),
            "errors": [problem.to_dict() for problem in self.errors],
            "filtered_by": self.filtered_by,
        }


@dataclass(slots=True)
class SourceStatus:
    """Per-source state, OPA-style: when it was last asked and what it said."""

    name: str
    last_request: datetime | None = None
    last_successful_read: datetime | None = None
    files: int = 0
    message: str | None = None
    errors: tuple[Problem, ...] = ()

    def set_error(self, problems: Sequence[Problem] | None) -> None:
        self.errors = tuple(problems or ())
        self.message = f"{len(self.errors)} problem(s)" if self.errors else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "last_request": _iso(self.last_request),
            "last_successful_read": _iso(self.last_successful_read),
            "files": self.files,
            "message": self.message,
            "errors": [problem.to_dict() for problem in self.errors],
        }


ReloadListener = Callable[[ReloadRecord], None]


class HotReloadService:
    """The seed's HotReloadService over any set of `RuleSource`s."""

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
    ) -> None:
        self.registry = registry
        self.sources = tuple(sources)
        self.loader = loader
        self.interval_seconds = interval_seconds
        self.auto_reload = auto_reload
        self.state = state
        self._source_status = {source.name: SourceStatus(source.name) for source in self.sources}
        self._history: deque[ReloadRecord] = deque(maxlen=history_limit)
        self._listeners: list[ReloadListener] = []
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._wake_reasons: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._records = 0
        self._reload_count = 0
        self._last_check: datetime | None = None
        self._last_record: ReloadRecord | None = None
        self._serving_from_state = False
        # The revision the sources held when a rollback went away from it; while they
        # still hold it, background reloads keep the rollback. None: no rollback holds.
        self._rolled_back_from: str | None = None

    # Lifecycle

    @property
    def monitoring_active(self) -> bool:
        return any(not task.done() for task in self._tasks)

    def start(self) -> None:
        """Start watching every source and the periodic resync (idempotent)."""
        if self.monitoring_active:
            return
        self._tasks = [asyncio.create_task(self._coalescing_worker(), name="reload-worker")]
        self._tasks.append(asyncio.create_task(self._resync_loop(), name="resync"))
        for source in self.sources:
            self._tasks.append(
                asyncio.create_task(self._watch(source), name=f"watch {source.name}")
            )

    async def stop(self) -> None:
        """Stop watching; the registry keeps serving what it has."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def add_listener(self, listener: ReloadListener) -> None:
        """Called on the event loop after every recorded reload (success or failure)."""
        self._listeners.append(listener)

    # Reloads

    async def initial_load(self) -> ReloadRecord:
        """First load; when the sources are broken, fall back to the state dir's copy."""
        record = await self.reload_rules(trigger=Trigger.STARTUP)
        if record.status is ReloadStatus.FAILED and self.state is not None:
            await self._load_saved(self.state, record)
        return record

    async def reload_rules(
        self,
        *,
        trigger: str = Trigger.API,
        force: bool = False,
        validate: bool = True,
        ruleset_id: str | None = None,
        rule_id: str | None = None,
    ) -> ReloadRecord:
        """Read every source and publish the result if it is valid and differs.

        `force` re-parses every file and publishes even an unchanged result; `validate`
        False skips embedded tests and semantic checks (never schema or compilation).

        With `ruleset_id` or `rule_id` (the seed's scoped reloads) the whole source is
        still reloaded: a file is the unit of change, and unchanged files are not
        re-parsed, so this costs no more than the changed file. The ids are recorded in
        `filtered_by`; `NotFoundError` when an id exists neither before nor after a
        reload that did not fail.
        """
        filtered_by = {"ruleset_id": ruleset_id, "rule_id": rule_id}
        async with self._lock:
            known = self._knows(ruleset_id, rule_id)
            record = await self._reload(
                trigger, force=force, validate=validate, filtered_by=filtered_by
            )
        failed = record.status is ReloadStatus.FAILED
        if not failed and not known and not self._knows(ruleset_id, rule_id):
            kind, missing = ("rule", rule_id) if rule_id is not None else ("ruleset", ruleset_id)
            raise NotFoundError(kind, str(missing))
        return record

    async def reload_ruleset(self, ruleset_id: str, *, force: bool = False) -> ReloadRecord:
        """The seed's scoped reload; see `reload_rules`."""
        return await self.reload_rules(ruleset_id=ruleset_id, force=force)

    async def reload_single_rule(self, rule_id: str, *, force: bool = False) -> ReloadRecord:
        """The seed's scoped reload; see `reload_rules`."""
        return await self.reload_rules(rule_id=rule_id, force=force)

    def _knows(self, ruleset_id: str | None, rule_id: str | None) -> bool:
        snapshot = self.registry.current
        return (ruleset_id is None or ruleset_id in snapshot.rulesets) and (
            rule_id is None or rule_id in snapshot.rules
        )

    async def validate_reload(self) -> dict[str, Any]:
        """Load every source as a reload would, without publishing anything.

        Answers in the shape of the seed's `validate_registry_rules`: `valid`,
        `total_rules`, `invalid_rules`, `errors` (`rule_id`, `error`, location).
        """
        async with self._lock:
            files, problems = await asyncio.to_thread(self._read_sources)
            candidate: Snapshot | None = None
            if not problems:
                try:
                    candidate = (await asyncio.to_thread(self.loader.load, files)).snapshot
                except LoadError as exc:
                    problems = list(exc.problems)
        invalid = {p.rule_id or p.ruleset_id or p.file for p in problems}
        return {
            "valid": not problems,
            "total_rules": len(candidate.rules) if candidate else None,
            "total_rulesets": len(candidate.rulesets) if candidate else None,
            "invalid_rules": len(invalid),
            "errors": [problem.to_rule_error() for problem in problems],
            "revision": candidate.revision if candidate else None,
            "current_revision": self.registry.current.revision,
        }

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
            return self._record(
                Trigger.ROLLBACK,
                ReloadStatus.SUCCESS,
                started=started,
                before=before,
                after=snapshot,
                changes=events,
                filtered_by={"version": version},
            )

    # Status

    def get_status(self) -> dict[str, Any]:
        """The seed's status fields, plus sources and the last error."""
        last = self._last_record
        watch_problems = self.watch_problems()
        return {
            "monitoring_active": self.monitoring_active,
            "auto_reload_enabled": self.auto_reload,
            "reload_interval_seconds": self.interval_seconds,
            "validation_enabled": self.loader.run_checks,
            "last_check_time": _iso(self._last_check),
            "last_reload_time": _iso(last.timestamp) if last else None,
            "last_reload_status": last.status.value if last else None,
            "reload_count": self._reload_count,
            "registry": self.registry.get_stats(),
            "serving_from": "state_dir" if self._serving_from_state else "sources",
            "rollback_active": self._rolled_back_from is not None,
            "sources": [
                self._source_status[source.name].to_dict()
                | {"watch_problem": watch_problems.get(source.name)}
                for source in self.sources
            ],
            "last_errors": [p.to_dict() for p in last.errors] if last else [],
            "state_dir": self.state.status().to_dict() if self.state else None,
        }

    def get_reload_history(self, limit: int | None = None) -> list[dict[str, Any]]:
        """Recorded reloads, newest first."""
        records = list(reversed(self._history))
        return [record.to_dict() for record in records[:limit]]

    def health(self) -> tuple[HealthStatus, dict[str, Any]]:
        """Health for the kubelet: unhealthy only while nothing valid has ever loaded."""
        last = self._last_record
        has_snapshot = self.registry.version > 0
        watch_problems = self.watch_problems()
        last_ok = last is None or last.status is not ReloadStatus.FAILED
        checks = {
            "monitoring_active": self.monitoring_active,
            "registry_has_rules": bool(self.registry.current.rules),
            "last_reload_successful": last_ok and not self._serving_from_state,
            "sources_watched": not watch_problems,
        }
        # PRODUCT.md: degraded = serving last known good, or monitoring off (wholly, or
        # for one source whose watch is down). An empty registry shows in
        # `registry_has_rules` but is a valid state, not a degradation.
        watching = (checks["monitoring_active"] or not self.auto_reload) and not watch_problems
        if not has_snapshot:
            status = HealthStatus.UNHEALTHY
        elif checks["last_reload_successful"] and watching:
            status = HealthStatus.HEALTHY
        else:
            status = HealthStatus.DEGRADED
        stats = self.registry.get_stats()
        return status, {
            "status": status.value,
            "monitoring_active": self.monitoring_active,
            "auto_reload_enabled": self.auto_reload,
            "last_reload": stats["last_reload"],
            "reload_count": self._reload_count,
            "last_reload_status": last.status.value if last else None,
            "registry": stats,
            "revision": stats["revision"],
            "serving_from": "state_dir" if self._serving_from_state else "sources",
            "checks": checks,
            "watch_problems": watch_problems,
        }

    def watch_problems(self) -> dict[str, str]:
        """Sources whose changes may go unnoticed now; none matter while not watching."""
        if not self.monitoring_active:
            return {}
        found = {source.name: source.watch_problem() for source in self.sources}
        return {name: problem for name, problem in found.items() if problem is not None}

    # Internals

    def request_reload(self, reason: str) -> None:
        """Ask for a background reload; requests made while one runs become one more."""
        self._wake_reasons.add(reason)
        self._wake.set()

    async def _coalescing_worker(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            reasons, self._wake_reasons = self._wake_reasons, set()
            trigger = "+".join(sorted(reasons)) or Trigger.WATCH
            try:
                await self.reload_rules(trigger=trigger)
            except Exception:
                logger.exception("background reload crashed")

    async def _resync_loop(self) -> None:
        """Safety net for anything a watcher missed; the poll of sources without a watch."""
        while True:
            await asyncio.sleep(self.interval_seconds)
            self.request_reload(Trigger.RESYNC)

    async def _watch(self, source: RuleSource) -> None:
        backoff = 1.0
        while True:
            try:
                async for _reason in source.changes():
                    self.request_reload(Trigger.WATCH)
                    backoff = 1.0
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("watching %s failed; retrying in %.0f s", source.name, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)

    def _read_sources(self) -> tuple[list[SourceFile], list[Problem]]:
        """Every source's files (run in a worker thread); a source that cannot be read
        gives its problems instead."""
        files: list[SourceFile] = []
        problems: list[Problem] = []
        for source in self.sources:
            status = self._source_status[source.name]
            status.last_request = _now()
            try:
                source_files = source.read()
            except LoadError as exc:
                status.set_error(exc.problems)
                problems.extend(exc.problems)
                continue
            except OSError as exc:
                problem = Problem(file=source.name, message=f"cannot read source: {exc}")
                status.set_error([problem])
                problems.append(problem)
                continue
            status.last_successful_read = _now()
            status.files = len(source_files)
            status.set_error(None)
            files.extend(source_files)
        return files, problems

    async def _reload(
        self, trigger: str, *, force: bool, validate: bool, filtered_by: dict[str, Any] | None
    ) -> ReloadRecord:
        started, before = time.perf_counter(), self.registry.current
        self._last_check = _now()
        if force:
            self.loader.forget()
        files, problems = await asyncio.to_thread(self._read_sources)
        if not problems:
            try:
                checks = validate and self.loader.run_checks
                result = await asyncio.to_thread(self.loader.load, files, run_checks=checks)
            except LoadError as exc:
                problems = list(exc.problems)
        if problems:
            if self._repeats_last_failure(trigger, problems):
                return self._unrecorded(before)
            return self._record(
                trigger,
                ReloadStatus.FAILED,
                started=started,
                before=before,
                errors=problems,
                filtered_by=filtered_by,
            )
        candidate = result.snapshot
        if force:
            self._rolled_back_from = None
        unchanged = before.version > 0 and candidate.revision == before.revision
        held_back = candidate.revision == self._rolled_back_from
        if (unchanged or held_back) and not force and not self._serving_from_state:
            last = self._last_record
            recovered = last is not None and last.status is ReloadStatus.FAILED
            if _is_background(trigger) and not recovered:
                return self._unrecorded(before)
            return self._record(
                trigger,
                ReloadStatus.UNCHANGED,
                started=started,
                before=before,
                after=before,
                files=result.files,
                filtered_by=filtered_by,
            )
        snapshot, events = self.registry.publish(candidate)
        self._serving_from_state = False
        self._rolled_back_from = None
        await self._save_state(snapshot)
        return self._record(
            trigger,
            ReloadStatus.SUCCESS,
            started=started,
            before=before,
            after=snapshot,
            changes=events,
            files=result.files,
            files_parsed=result.files_parsed,
            filtered_by=filtered_by,
        )

    def _repeats_last_failure(self, trigger: str, problems: Sequence[Problem]) -> bool:
        """A background check that meets the failure already reported is not news."""
        last = self._last_record
        return (
            _is_background(trigger)
            and last is not None
            and last.status is ReloadStatus.FAILED
            and last.errors == tuple(problems)
        )

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
        snapshot, events = self.registry.publish(result.snapshot)
        self._serving_from_state = True
        self._record(
            Trigger.STATE_DIR,
            ReloadStatus.RESTORED,
            started=started,
            before=before,
            after=snapshot,
            changes=events,
            errors=failure.errors,
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

    def _unrecorded(self, current: Snapshot) -> ReloadRecord:
        """A background check that found nothing new: not worth a history entry."""
        return ReloadRecord(
            id=0,
            trigger=Trigger.RESYNC,
            status=ReloadStatus.UNCHANGED,
            timestamp=_now(),
            reload_time_ms=0.0,
            rules_loaded=len(current.rules),
            rulesets_loaded=len(current.rulesets),
            reload_count=self._reload_count,
            version_before=current.version,
            version_after=current.version,
            revision=current.revision,
        )

    def _record(
        self,
        trigger: str,
        status: ReloadStatus,
        *,
        started: float,
        before: Snapshot,
        after: Snapshot | None = None,
        errors: Sequence[Problem] = (),
        changes: Sequence[ChangeEvent] = (),
        files: int = 0,
        files_parsed: int = 0,
        filtered_by: dict[str, Any] | None = None,
    ) -> ReloadRecord:
        current = after or self.registry.current
        if status is ReloadStatus.SUCCESS:
            self._reload_count += 1
        self._records += 1
        record = ReloadRecord(
            id=self._records,
            trigger=str(trigger),
            status=status,
            timestamp=_now(),
            reload_time_ms=(time.perf_counter() - started) * 1000,
            rules_loaded=len(current.rules),
            rulesets_loaded=len(current.rulesets),
            reload_count=self._reload_count,
            version_before=before.version,
            version_after=current.version,
            revision=current.revision,
            files=files,
            files_parsed=files_parsed,
            errors=tuple(errors),
            changes=tuple(changes),
            filtered_by=filtered_by,
        )
        self._history.append(record)
        self._last_record = record
        log = logger.warning if status is ReloadStatus.FAILED else logger.info
        log(
            "reload %s: trigger=%s version=%d->%d revision=%s errors=%d in %.1f ms",
            status.value,
            trigger,
            before.version,
            current.version,
            current.revision,
            len(errors),
            record.reload_time_ms,
        )
        for listener in self._listeners:
            try:
                listener(record)
            except Exception:
                logger.exception("reload listener %r failed", listener)
        return record

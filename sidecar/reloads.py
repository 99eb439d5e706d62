"""What a reload attempt was and how it ended: triggers, records, and their history.

One `ReloadLog` per service owns the facts every reader asks about (the last record,
the count of successful reloads, the newest records) and calls the listeners (metrics,
the WebSocket, Kubernetes Events) once per record, in order.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum

from sidecar.errors import Problem
from sidecar.registry import ChangeEvent
from sidecar.snapshot import Snapshot

__all__ = [
    "Filter",
    "Outcome",
    "ReloadListener",
    "ReloadLog",
    "ReloadRecord",
    "ReloadStatus",
    "Trigger",
    "Triggers",
    "is_background",
    "now",
]

logger = logging.getLogger("sidecar.service")


class Trigger(StrEnum):
    STARTUP = "startup"
    WATCH = "watch"
    RESYNC = "resync"
    API = "api"
    SIGNAL = "signal"
    ROLLBACK = "rollback"
    STATE_DIR = "state_dir"
    # The periodic verification: every source forgotten and read in full, compared with
    # what its ordinary (cached, fingerprinted) read gave.
    VERIFY = "verify"
    # A write through the API (`sidecar.writes`), published by the sidecar that made it.
    WRITE = "write"


Triggers = frozenset[Trigger]
_BACKGROUND: Triggers = frozenset({Trigger.WATCH, Trigger.RESYNC, Trigger.VERIFY})


def is_background(triggers: Triggers) -> bool:
    """Only watchers, the resync and the verification asked: nobody waits for this
    reload's answer."""
    return bool(triggers) and triggers <= _BACKGROUND


def _wire(triggers: Iterable[Trigger]) -> str:
    """Coalesced triggers as one string, e.g. "resync+watch"."""
    return "+".join(sorted(trigger.value for trigger in triggers))


# What a scoped reload or a rollback was asked for (`ruleset_id`, `rule_id`, `version`).
Filter = Mapping[str, str | int | None]


class ReloadStatus(StrEnum):
    SUCCESS = "success"
    FAILED = "failed"
    UNCHANGED = "unchanged"
    # The sources failed at startup and the state dir's copy of the last good snapshot
    # was published instead: rules serve, but the reload itself did not succeed.
    RESTORED = "restored"


def now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True, kw_only=True)
class ReloadRecord:
    """One reload attempt, as history, the API and the WebSocket report it."""

    id: int
    triggers: Triggers
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
    filtered_by: Filter | None = None

    @property
    def trigger(self) -> str:
        return _wire(self.triggers)


ReloadListener = Callable[[ReloadRecord], None]


@dataclass(frozen=True, slots=True, kw_only=True)
class Outcome:
    """What a reload produced, before it is numbered and timed into a record."""

    triggers: Triggers
    status: ReloadStatus
    before: Snapshot
    after: Snapshot
    errors: Sequence[Problem] = ()
    changes: Sequence[ChangeEvent] = ()
    files: int = 0
    files_parsed: int = 0
    filtered_by: Filter | None = None


class ReloadLog:
    """The recorded reloads, newest last, and who hears of each."""

    def __init__(self, limit: int = 50) -> None:
        self._records: deque[ReloadRecord] = deque(maxlen=limit)
        self._listeners: list[ReloadListener] = []
        self._count = 0
        self.successes = 0
        self.last: ReloadRecord | None = None

    def add_listener(self, listener: ReloadListener) -> None:
        """Called on the event loop after every recorded reload (success or failure)."""
        self._listeners.append(listener)

    def newest(self, limit: int | None = None) -> list[ReloadRecord]:
        return list(reversed(self._records))[:limit]

    def record(self, outcome: Outcome, *, elapsed_ms: float) -> ReloadRecord:
        """Number, store, log and announce one outcome."""
        if outcome.status is ReloadStatus.SUCCESS:
            self.successes += 1
        self._count += 1
        after = outcome.after
        record = ReloadRecord(
            id=self._count,
            triggers=outcome.triggers,
            status=outcome.status,
            timestamp=now(),
            reload_time_ms=elapsed_ms,
            rules_loaded=len(after.rules),
            rulesets_loaded=len(after.rulesets),
            reload_count=self.successes,
            version_before=outcome.before.version,
            version_after=after.version,
            revision=after.revision,
            files=outcome.files,
            files_parsed=outcome.files_parsed,
            errors=tuple(outcome.errors),
            changes=tuple(outcome.changes),
            filtered_by=outcome.filtered_by,
        )
        self._records.append(record)
        self.last = record
        log = logger.warning if record.status is ReloadStatus.FAILED else logger.info
        log(
            "reload %s: trigger=%s version=%d->%d revision=%s errors=%d in %.1f ms",
            record.status.value,
            record.trigger,
            record.version_before,
            record.version_after,
            record.revision,
            len(record.errors),
            record.reload_time_ms,
        )
        for listener in self._listeners:
            try:
                listener(record)
            except Exception:
                logger.exception("reload listener %r failed", listener)
        return record

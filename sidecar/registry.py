"""The registry: publishes snapshots, tells subscribers what changed, keeps history.

Readers call `current` (or the contract's getters) and get an immutable snapshot without
taking any lock: publishing is one reference assignment. Writers are serialised by a
lock; every write (a reload, a rollback, an edit of `sidecar.editing`) is a complete
snapshot built beforehand, so a failed write changes nothing. The registry never
compiles or validates: it publishes what the loader (or an editor) built.

Subscribers are called after each publish, in publish order, with the new snapshot and
the change events computed by diffing it against the previous one. A subscriber that
raises is logged and skipped; it never breaks a publish or the other subscribers.

Subscribers run after the write lock is released, so one may unsubscribe, read
`last_change`, or publish again without deadlocking. Deliveries never overlap: a publish
made while one is under way (by a subscriber, or by another thread) is queued and handed
on by the delivery in progress once the current publish has reached every subscriber.
So every subscriber sees every publish once, in version order, and a nested publish
returns before its own subscribers have run.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from sidecar.errors import NotFoundError
from sidecar.model import Rule, RuleSet
from sidecar.snapshot import Snapshot

__all__ = [
    "ChangeEvent",
    "EventType",
    "RuleRegistry",
    "RuleRevision",
    "RulesetChanges",
    "Subscriber",
    "diff_rulesets",
    "diff_snapshots",
]

logger = logging.getLogger("sidecar.registry")


class EventType(StrEnum):
    """The hot-reload contract's change event types (plus `ruleset_updated`)."""

    RULE_ADDED = "rule_added"
    RULE_UPDATED = "rule_updated"
    RULE_REMOVED = "rule_removed"
    RULESET_ADDED = "ruleset_added"
    RULESET_UPDATED = "ruleset_updated"
    RULESET_REMOVED = "ruleset_removed"
    REGISTRY_CLEARED = "registry_cleared"


@dataclass(frozen=True, slots=True, kw_only=True)
class ChangeEvent:
    type: EventType
    registry_version: int
    ruleset_id: str | None = None
    rule_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.type.value,
            "registry_version": self.registry_version,
            "ruleset_id": self.ruleset_id,
            "rule_id": self.rule_id,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class RuleRevision:
    """One entry of a rule's history: what happened to it in which registry version."""

    registry_version: int
    change: EventType
    at: datetime
    rule: Rule | None  # None once removed


Subscriber = Callable[[Snapshot, Sequence[ChangeEvent]], None]


def _ruleset_header_changed(old: RuleSet, new: RuleSet) -> bool:
    """Anything but the rules' own content: names, bands, tests, or the rules' order
    (added and removed rules have events of their own)."""
    old_ids = [rule.id for rule in old.rules]
    new_ids = [rule.id for rule in new.rules]
    kept_old, kept_new = set(old_ids), set(new_ids)
    if [i for i in old_ids if i in kept_new] != [i for i in new_ids if i in kept_old]:
        return True
    return (
        old.name,
        old.description,
        old.labels,
        old.decisions,
        old.default_decision,
        old.tests,
    ) != (
        new.name,
        new.description,
        new.labels,
        new.decisions,
        new.default_decision,
        new.tests,
    )


def diff_snapshots(old: Snapshot, new: Snapshot) -> list[ChangeEvent]:
    """Typed changes from `old` to `new`; emptying a non-empty registry is one event."""
    version = new.version
    if old.rulesets and not new.rulesets:
        return [ChangeEvent(type=EventType.REGISTRY_CLEARED, registry_version=version)]
    events: list[ChangeEvent] = []
    for ruleset_id in old.rulesets.keys() - new.rulesets.keys():
        events.append(
            ChangeEvent(
                type=EventType.RULESET_REMOVED, registry_version=version, ruleset_id=ruleset_id
            )
        )
    for ruleset_id, ruleset in new.rulesets.items():
        previous = old.rulesets.get(ruleset_id)
        if previous is None:
            events.append(
                ChangeEvent(
                    type=EventType.RULESET_ADDED, registry_version=version, ruleset_id=ruleset_id
                )
            )
        elif previous is not ruleset and _ruleset_header_changed(previous, ruleset):
            events.append(
                ChangeEvent(
                    type=EventType.RULESET_UPDATED, registry_version=version, ruleset_id=ruleset_id
                )
            )
    for rule_id in old.rules.keys() - new.rules.keys():
        events.append(
            ChangeEvent(
                type=EventType.RULE_REMOVED,
                registry_version=version,
                ruleset_id=old.rules[rule_id].ruleset_id,
                rule_id=rule_id,
            )
        )
    for rule_id, rule in new.rules.items():
        previous_rule = old.rules.get(rule_id)
        if previous_rule is None:
            change = EventType.RULE_ADDED
        elif previous_rule != rule:
            change = EventType.RULE_UPDATED
        else:
            continue
        events.append(
            ChangeEvent(
                type=change, registry_version=version, ruleset_id=rule.ruleset_id, rule_id=rule_id
            )
        )
    return events


@dataclass(frozen=True, slots=True, kw_only=True)
class RulesetChanges:
    """What rulesets given to replace or join `serving`'s would change, by id (sorted).

    `changed` and `unchanged` compare content (`RuleSet.digest`: not where it is written).
    `removed` is always empty: replacing rulesets by id can remove none, and the field
    exists so that the answer has the shape of a full diff. The rule lists cover the
    given rulesets: every rule of an added one is added; `rules_removed` are the rules a
    changed ruleset no longer has.
    """

    added: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()
    unchanged: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    rules_added: tuple[str, ...] = ()
    rules_changed: tuple[str, ...] = ()
    rules_removed: tuple[str, ...] = ()


def diff_rulesets(serving: Snapshot, rulesets: Iterable[RuleSet]) -> RulesetChanges:
    """How `rulesets`, each replacing the ruleset of its id (or joining), change `serving`.
    An id given twice (an `id.duplicate` problem of its own) counts once, as first given."""
    seen: set[str] = set()
    added: list[str] = []
    changed: list[str] = []
    unchanged: list[str] = []
    rules_added: list[str] = []
    rules_changed: list[str] = []
    rules_removed: list[str] = []
    for ruleset in rulesets:
        if ruleset.id in seen:
            continue
        seen.add(ruleset.id)
        previous = serving.rulesets.get(ruleset.id)
        if previous is not None and previous.digest == ruleset.digest:
            unchanged.append(ruleset.id)
            continue
        (changed if previous is not None else added).append(ruleset.id)
        before = {rule.id: rule for rule in previous.rules} if previous is not None else {}
        for rule in ruleset.rules:
            if rule.id not in before:
                rules_added.append(rule.id)
            elif before[rule.id] != rule:
                rules_changed.append(rule.id)
        kept = {rule.id for rule in ruleset.rules}
        rules_removed.extend(rule_id for rule_id in before if rule_id not in kept)
    return RulesetChanges(
        added=tuple(sorted(added)),
        changed=tuple(sorted(changed)),
        unchanged=tuple(sorted(unchanged)),
        rules_added=tuple(sorted(rules_added)),
        rules_changed=tuple(sorted(rules_changed)),
        rules_removed=tuple(sorted(rules_removed)),
    )


class RuleRegistry:
    """Versioned, immutable snapshots of rules and rulesets, with change notification."""

    def __init__(
        self,
        *,
        history_limit: int = 10,
        rule_history_limit: int = 20,
        rule_history_ids: int = 100_000,
    ) -> None:
        self._current = Snapshot.empty()
        self._write_lock = threading.Lock()
        self._subscribers: list[Subscriber] = []
        # Publishes not yet handed to the subscribers, in version order; one caller at a
        # time (`_delivering`) empties it, outside the write lock.
        self._delivery_lock = threading.Lock()
        self._deliveries: deque[tuple[Snapshot, list[ChangeEvent]]] = deque()
        self._delivering = False
        if history_limit < 1:
            raise ValueError("history_limit must be at least 1: the last change is diffed")
        self._history: deque[Snapshot] = deque(maxlen=history_limit)
        self._rule_history: OrderedDict[str, deque[RuleRevision]] = OrderedDict()
        self._rule_history_limit = rule_history_limit
        self._rule_history_ids = rule_history_ids
        self._last_publish: datetime | None = None

    # Reads: no lock, one attribute read.

    @property
    def current(self) -> Snapshot:
        return self._current

    @property
    def version(self) -> int:
        return self._current.version

    @property
    def last_publish(self) -> datetime | None:
        """When the current snapshot was published; None while nothing ever was."""
        return self._last_publish

    def get_rule(self, rule_id: str | int) -> Rule | None:
        return self._current.rules.get(str(rule_id))

    def get_rules(self, ruleset_id: str | int | None = None) -> list[Rule]:
        snapshot = self._current
        if ruleset_id is None:
            return list(snapshot.rules.values())
        ruleset = snapshot.rulesets.get(str(ruleset_id))
        return list(ruleset.rules) if ruleset else []

    def get_ruleset(self, ruleset_id: str | int) -> RuleSet | None:
        return self._current.rulesets.get(str(ruleset_id))

    def get_stats(self) -> dict[str, Any]:
        stats = self._current.stats()
        stats["last_reload"] = self._last_publish.isoformat() if self._last_publish else None
        stats["history_size"] = len(self._history)
        stats["subscriber_count"] = len(self._subscribers)
        return stats

    def history(self) -> list[Snapshot]:
        """Earlier snapshots that `rollback` can return to, newest first."""
        return list(reversed(self._history))

    def last_change(self) -> tuple[Snapshot, Snapshot]:
        """The snapshot the current one replaced (empty after the first publish) and the
        current one, read together so that a publish in between cannot mismatch them."""
        with self._write_lock:
            current = self._current
            previous = self._history[-1] if current.version > 1 else Snapshot.empty()
            return previous, current

    def rule_history(self, rule_id: str | int) -> list[RuleRevision]:
        return list(self._rule_history.get(str(rule_id), ()))

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call `callback(snapshot, events)` after every publish; returns an unsubscribe."""
        with self._write_lock:
            self._subscribers = [*self._subscribers, callback]

        def unsubscribe() -> None:
            with self._write_lock:
                self._subscribers = [s for s in self._subscribers if s is not callback]

        return unsubscribe

    # Writes: each publishes a whole snapshot.

    def publish(
        self, candidate: Snapshot, *, deliver: bool = True
    ) -> tuple[Snapshot, list[ChangeEvent]]:
        """Make a loader's candidate the current snapshot, with the next version number.

        `deliver=False` leaves telling the subscribers to `deliver()`: a large change is
        diffed and recorded in a worker thread, while the subscribers (WebSocket
        broadcasts) belong on the event loop.
        """
        with self._writing(deliver=deliver):
            return self._publish(lambda _: candidate)

    def deliver(self) -> None:
        """Hand the publishes not yet delivered to the subscribers, in order."""
        self._deliver()

    def publish_from(
        self, build: Callable[[Snapshot], Snapshot]
    ) -> tuple[Snapshot, list[ChangeEvent]]:
        """Publish what `build` makes of the current snapshot, with no other publish in
        between: `build` runs under the write lock (readers are not held; writers are,
        so keep it short). If it raises, nothing is published."""
        with self._writing():
            return self._publish(build)

    def rollback(self, version: int | None = None) -> tuple[Snapshot, list[ChangeEvent]]:
        """Publish an earlier snapshot's content again, as a new version.

        Without a version, goes back to the one before the current snapshot.
        """
        with self._writing():
            target = self._find_history(version)
            return self._publish(lambda _: target)

    # Internals; callers hold the write lock unless said otherwise.

    @contextlib.contextmanager
    def _writing(self, *, deliver: bool = True) -> Iterator[None]:
        """Hold the write lock for one write, then deliver what it published (unlocked)."""
        try:
            with self._write_lock:
                yield
        finally:
            if deliver:
                self._deliver()

    def _deliver(self) -> None:
        """Hand queued publishes to the subscribers, unless a delivery is under way (it
        hands them on). Called without the write lock."""
        with self._delivery_lock:
            if self._delivering:
                return
            self._delivering = True
        try:
            while (delivery := self._next_delivery()) is not None:
                snapshot, events = delivery
                subscribers = self._subscribers
                for subscriber in subscribers:
                    if not any(s is subscriber for s in self._subscribers):
                        continue  # unsubscribed by an earlier subscriber of this delivery
                    try:
                        subscriber(snapshot, events)
                    except Exception:
                        logger.exception("registry subscriber %r failed", subscriber)
        except BaseException:
            with self._delivery_lock:
                self._delivering = False
            raise

    def _next_delivery(self) -> tuple[Snapshot, list[ChangeEvent]] | None:
        """The oldest undelivered publish; None (and the delivery over) when none is left."""
        with self._delivery_lock:
            if self._deliveries:
                return self._deliveries.popleft()
            self._delivering = False
            return None

    def _find_history(self, version: int | None) -> Snapshot:
        if not self._history:
            raise NotFoundError("snapshot", "previous")
        if version is None:
            return self._history[-1]
        for snapshot in self._history:
            if snapshot.version == version:
                return snapshot
        raise NotFoundError("snapshot", str(version))

    def _publish(self, build: Callable[[Snapshot], Snapshot]) -> tuple[Snapshot, list[ChangeEvent]]:
        old = self._current
        new = build(old).published_as(old.version + 1)
        events = diff_snapshots(old, new)
        if old.version > 0:
            self._history.append(old)
        self._current = new
        self._last_publish = new.created_at
        self._record_rule_history(old, new, events)
        with self._delivery_lock:
            self._deliveries.append((new, events))
        return new, events

    def _record_rule_history(
        self, old: Snapshot, new: Snapshot, events: Sequence[ChangeEvent]
    ) -> None:
        at = new.created_at
        changes: list[tuple[str, EventType, Rule | None]] = []
        for event in events:
            if event.type is EventType.REGISTRY_CLEARED:
                changes.extend((rule_id, EventType.RULE_REMOVED, None) for rule_id in old.rules)
            elif event.rule_id is not None:
                changes.append((event.rule_id, event.type, new.rules.get(event.rule_id)))
        for rule_id, change, rule in changes:
            entries = self._rule_history.pop(rule_id, None) or deque(
                maxlen=self._rule_history_limit
            )
            entries.append(
                RuleRevision(registry_version=new.version, change=change, at=at, rule=rule)
            )
            self._rule_history[rule_id] = entries
        while len(self._rule_history) > self._rule_history_ids:
            self._rule_history.popitem(last=False)

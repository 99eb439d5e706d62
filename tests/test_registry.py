"""The rule registry: publishing, change events, seed edits, history, rollback, concurrency."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from conftest import change_tuples, load_docs, make_ruleset_doc, rule_doc

from sidecar.editing import RegistryEditor
from sidecar.engine import evaluate
from sidecar.errors import NotFoundError
from sidecar.loader import Loader
from sidecar.registry import EventType, RuleRegistry
from sidecar.snapshot import Snapshot


def _two_rulesets() -> list[dict[str, Any]]:
    return [
        make_ruleset_doc(
            "alpha", [rule_doc("a1", "input.x > 1", 5), rule_doc("a2", "input.x > 2", 3)]
        ),
        make_ruleset_doc("beta", [rule_doc("b1", "input.y == 'z'", 2)]),
    ]


def _without_deadlock(write: Callable[[], object]) -> None:
    """Run `write` in a thread; fail (instead of hanging the suite) if it never returns."""
    failures: list[BaseException] = []

    def run() -> None:
        try:
            write()
        except BaseException as exc:  # reported below
            failures.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=10)
    assert not thread.is_alive(), "the write deadlocked"
    assert failures == []


@pytest.fixture
def registry() -> RuleRegistry:
    registry = RuleRegistry()
    registry.publish(load_docs(*_two_rulesets()))
    return registry


class TestPublish:
    """Publishing a candidate makes it current under the next version number."""

    def test_fresh_registry_is_empty_version_zero(self):
        """A new registry holds the empty snapshot at version 0 and no publish time."""
        registry = RuleRegistry()
        assert registry.version == 0
        assert registry.current.rules == {}
        assert registry.last_publish is None
        assert registry.history() == []

    def test_each_publish_bumps_version_by_one(self):
        """Versions go 1, 2, 3 with each publish, and the returned snapshot is current."""
        registry = RuleRegistry()
        loader = Loader()
        for expected in (1, 2, 3):
            snapshot, _ = registry.publish(load_docs(*_two_rulesets(), loader=loader))
            assert snapshot.version == expected
            assert registry.version == expected
            assert registry.current is snapshot

    def test_published_snapshot_keeps_candidate_content(self):
        """The published snapshot has the candidate's rules and revision; the candidate stays 0."""
        candidate = load_docs(*_two_rulesets())
        registry = RuleRegistry()
        snapshot, _ = registry.publish(candidate)
        assert candidate.version == 0
        assert snapshot.revision == candidate.revision
        assert dict(snapshot.rules) == dict(candidate.rules)
        assert registry.last_publish == snapshot.created_at

    def test_swap_is_complete_before_subscribers_run(self, registry):
        """When subscribers run, `current` is already the whole new snapshot."""
        seen: list[tuple[bool, int]] = []

        def subscriber(snapshot, events):
            seen.append((registry.current is snapshot, registry.version))

        registry.subscribe(subscriber)
        new, _ = registry.publish(load_docs(make_ruleset_doc("gamma", [rule_doc("g1")])))
        assert seen == [(True, new.version)]

    def test_old_snapshot_is_unchanged_by_publish(self, registry):
        """A reader's snapshot keeps its version and rules after a newer publish."""
        held = registry.current
        rules_before = dict(held.rules)
        registry.publish(load_docs(make_ruleset_doc("gamma", [rule_doc("g1")])))
        assert held.version == 1
        assert dict(held.rules) == rules_before
        assert registry.get_rule("a1") is None


class TestDiffEvents:
    """Subscribers are told what changed, with ids and the new version."""

    def test_first_publish_adds_everything(self):
        """The first publish reports each ruleset and each rule as added."""
        registry = RuleRegistry()
        _, events = registry.publish(load_docs(*_two_rulesets()))
        assert change_tuples(events) == {
            ("ruleset_added", "alpha", None, 1),
            ("ruleset_added", "beta", None, 1),
            ("rule_added", "alpha", "a1", 1),
            ("rule_added", "alpha", "a2", 1),
            ("rule_added", "beta", "b1", 1),
        }

    def test_changed_rule_is_updated_and_unchanged_rules_give_no_event(self, registry):
        """Changing one rule's points gives one rule_updated event and nothing else."""
        docs = _two_rulesets()
        docs[0]["spec"]["rules"][1]["points"] = 30
        _, events = registry.publish(load_docs(*docs))
        assert change_tuples(events) == {("rule_updated", "alpha", "a2", 2)}

    def test_identical_content_gives_no_events(self, registry):
        """Republishing the same content bumps the version but reports no change."""
        snapshot, events = registry.publish(load_docs(*_two_rulesets()))
        assert events == []
        assert snapshot.version == 2

    def test_rule_added_and_removed(self, registry):
        """A new rule is rule_added; a dropped rule is rule_removed with its old ruleset."""
        docs = _two_rulesets()
        docs[0]["spec"]["rules"] = [docs[0]["spec"]["rules"][0], rule_doc("a3")]
        _, events = registry.publish(load_docs(*docs))
        assert change_tuples(events) == {
            ("rule_added", "alpha", "a3", 2),
            ("rule_removed", "alpha", "a2", 2),
        }

    def test_ruleset_header_change_is_ruleset_updated(self, registry):
        """Changing a ruleset's name or decisions gives ruleset_updated for it alone."""
        docs = _two_rulesets()
        docs[1]["metadata"]["name"] = "Beta renamed"
        docs[1]["spec"]["decisions"] = [{"decision": "deny", "min_points": 1}]
        _, events = registry.publish(load_docs(*docs))
        assert change_tuples(events) == {("ruleset_updated", "beta", None, 2)}

    def test_ruleset_removed_with_its_rules(self, registry):
        """Dropping a ruleset reports it and each of its rules as removed."""
        _, events = registry.publish(load_docs(_two_rulesets()[0]))
        assert change_tuples(events) == {
            ("ruleset_removed", "beta", None, 2),
            ("rule_removed", "beta", "b1", 2),
        }

    def test_ruleset_added_alongside_existing(self, registry):
        """A new ruleset next to unchanged ones reports only the new ruleset and its rules."""
        docs = [*_two_rulesets(), make_ruleset_doc("gamma", [rule_doc("g1")])]
        _, events = registry.publish(load_docs(*docs))
        assert change_tuples(events) == {
            ("ruleset_added", "gamma", None, 2),
            ("rule_added", "gamma", "g1", 2),
        }

    def test_rule_moved_between_rulesets_is_updated(self, registry):
        """A rule that moves to another ruleset is one rule_updated naming the new ruleset."""
        docs = _two_rulesets()
        moved = docs[0]["spec"]["rules"].pop()
        docs[1]["spec"]["rules"].append(moved)
        _, events = registry.publish(load_docs(*docs))
        assert change_tuples(events) == {("rule_updated", "beta", "a2", 2)}

    def test_emptying_the_registry_is_one_cleared_event(self, registry):
        """Publishing the empty snapshot over rules gives exactly registry_cleared."""
        _, events = registry.publish(Snapshot.empty())
        assert [(e.type, e.registry_version, e.ruleset_id, e.rule_id) for e in events] == [
            (EventType.REGISTRY_CLEARED, 2, None, None)
        ]

    def test_empty_to_empty_gives_no_event(self):
        """Publishing empty over empty reports nothing."""
        _, events = RuleRegistry().publish(Snapshot.empty())
        assert events == []

    def test_event_to_dict(self, registry):
        """ChangeEvent.to_dict spells the type as its string value."""
        docs = _two_rulesets()
        docs[1]["spec"]["rules"][0]["points"] = 9
        _, events = registry.publish(load_docs(*docs))
        assert [e.to_dict() for e in events] == [
            {"type": "rule_updated", "registry_version": 2, "ruleset_id": "beta", "rule_id": "b1"}
        ]


class TestSubscribers:
    """Subscribers are called in order; one failing never affects the publish or the others."""

    def test_subscribers_get_snapshot_and_same_events(self, registry):
        """A subscriber receives the published snapshot and the returned events."""
        received = []
        registry.subscribe(lambda snapshot, events: received.append((snapshot, list(events))))
        snapshot, events = registry.publish(load_docs(_two_rulesets()[0]))
        assert received == [(snapshot, events)]

    def test_raising_subscriber_does_not_break_publish_or_others(self, registry, caplog):
        """A subscriber that raises is logged; publish completes and later subscribers run."""
        calls: list[str] = []

        def first(snapshot, events):
            calls.append("first")

        def broken(snapshot, events):
            calls.append("broken")
            raise RuntimeError("boom")

        def last(snapshot, events):
            calls.append("last")

        for subscriber in (first, broken, last):
            registry.subscribe(subscriber)
        with caplog.at_level("ERROR", logger="sidecar.registry"):
            snapshot, _ = registry.publish(load_docs(_two_rulesets()[0]))
        assert calls == ["first", "broken", "last"]
        assert registry.current is snapshot
        assert registry.version == 2
        assert any("subscriber" in r.getMessage() for r in caplog.records)

    def test_unsubscribe_stops_calls(self, registry):
        """After unsubscribing, a subscriber is no longer called; others still are."""
        kept: list[int] = []
        dropped: list[int] = []
        registry.subscribe(lambda s, e: kept.append(s.version))
        unsubscribe = registry.subscribe(lambda s, e: dropped.append(s.version))
        assert registry.get_stats()["subscriber_count"] == 2
        registry.publish(Snapshot.empty())
        unsubscribe()
        registry.publish(Snapshot.empty())
        assert dropped == [2]
        assert kept == [2, 3]
        assert registry.get_stats()["subscriber_count"] == 1

    def test_subscriber_may_unsubscribe_itself(self, registry):
        """A subscriber that unsubscribes from inside its call does not deadlock the
        publish (the lock is not held while subscribers run) and is not called again."""
        calls: list[int] = []

        def once(snapshot, events):
            calls.append(snapshot.version)
            unsubscribe()

        unsubscribe = registry.subscribe(once)
        _without_deadlock(lambda: registry.publish(Snapshot.empty()))
        _without_deadlock(lambda: registry.publish(Snapshot.empty()))
        assert calls == [2]
        assert registry.get_stats()["subscriber_count"] == 0

    def test_subscriber_may_read_the_last_change(self, registry):
        """`last_change` takes the write lock too: a subscriber may call it."""
        seen: list[tuple[int, int]] = []
        registry.subscribe(
            lambda s, e: seen.append(tuple(x.version for x in registry.last_change()))
        )
        _without_deadlock(lambda: registry.publish(Snapshot.empty()))
        assert seen == [(1, 2)]

    def test_subscriber_may_publish_again(self, registry):
        """A subscriber that publishes does not deadlock. The nested publish returns at
        once; its events reach every subscriber after the current publish has reached
        them all, so each subscriber sees the versions in order."""
        seen: list[tuple[str, int]] = []
        nested: list[int] = []

        def first(snapshot, events):
            seen.append(("first", snapshot.version))
            if snapshot.version == 2:
                published, _ = registry.publish(
                    load_docs(make_ruleset_doc("gamma", [rule_doc("g1")]))
                )
                nested.append(published.version)
                assert ("second", 3) not in seen  # delivered later, not from inside this call

        def second(snapshot, events):
            seen.append(("second", snapshot.version))

        registry.subscribe(first)
        registry.subscribe(second)
        _without_deadlock(lambda: registry.publish(Snapshot.empty()))
        assert nested == [3]
        assert seen == [("first", 2), ("second", 2), ("first", 3), ("second", 3)]
        assert registry.version == 3
        assert registry.get_rule("g1") is not None

    def test_subscriber_may_unsubscribe_a_later_one(self, registry):
        """Once `unsubscribe` returns, that subscriber is not called, not even for the
        publish being delivered."""
        calls: list[str] = []

        def first(snapshot, events):
            calls.append("first")
            unsubscribe_later()

        registry.subscribe(first)
        unsubscribe_later = registry.subscribe(lambda s, e: calls.append("later"))
        _without_deadlock(lambda: registry.publish(Snapshot.empty()))
        assert calls == ["first"]


class TestSeedReads:
    """The seed's read methods on the current snapshot."""

    def test_get_rule(self, registry):
        """get_rule returns the rule by id, or None when unknown."""
        rule = registry.get_rule("a1")
        assert rule is not None
        assert (rule.id, rule.ruleset_id, rule.points) == ("a1", "alpha", 5)
        assert registry.get_rule("zzz") is None

    def test_get_rules(self, registry):
        """get_rules lists a ruleset's rules in order, all rules without an id, [] if unknown."""
        assert [r.id for r in registry.get_rules("alpha")] == ["a1", "a2"]
        assert sorted(r.id for r in registry.get_rules()) == ["a1", "a2", "b1"]
        assert registry.get_rules("nope") == []

    def test_numeric_ids_are_read_as_strings(self):
        """A numeric ruleset or rule id is stored as its decimal string and found by int."""
        registry = RuleRegistry()
        registry.publish(load_docs(make_ruleset_doc(7, [rule_doc(12)])))
        assert registry.get_rule(12) is registry.get_rule("12")
        assert registry.get_rule(12) is not None
        assert [r.id for r in registry.get_rules(7)] == ["12"]
        ruleset = registry.get_ruleset(7)
        assert ruleset is not None
        assert ruleset.id == "7"

    def test_get_ruleset(self, registry):
        """get_ruleset returns the ruleset by id, or None when unknown."""
        ruleset = registry.get_ruleset("beta")
        assert ruleset is not None
        assert [r.id for r in ruleset.rules] == ["b1"]
        assert registry.get_ruleset("nope") is None

    def test_get_stats(self, registry):
        """get_stats reports counts, version, revision and last publish time."""
        stats = registry.get_stats()
        assert stats["rule_count"] == 3
        assert stats["ruleset_count"] == 2
        assert stats["version"] == 1
        assert stats["revision"] == registry.current.revision
        assert stats["last_reload"] == registry.last_publish.isoformat()
        assert stats["history_size"] == 0

    def test_get_stats_before_any_publish(self):
        """Before any publish, stats show zero counts and no last reload."""
        stats = RuleRegistry().get_stats()
        assert (stats["rule_count"], stats["ruleset_count"], stats["version"]) == (0, 0, 0)
        assert stats["last_reload"] is None


class TestHistory:
    """Per-rule history and snapshot history are kept, and bounded."""

    def test_rule_history_records_changes(self, registry):
        """A rule's history lists added, updated and removed with their versions."""
        editor = RegistryEditor(registry)
        editor.update_rule({"id": "a1", "condition": "true", "points": 2}, "alpha")
        editor.remove_rule("a1")
        history = registry.rule_history("a1")
        assert [(h.registry_version, h.change) for h in history] == [
            (1, EventType.RULE_ADDED),
            (2, EventType.RULE_UPDATED),
            (3, EventType.RULE_REMOVED),
        ]
        assert history[1].rule is not None
        assert history[1].rule.points == 2
        assert history[2].rule is None

    def test_rule_history_is_bounded(self):
        """Only the last rule_history_limit entries of a rule are kept."""
        registry = RuleRegistry(rule_history_limit=3)
        registry.publish(load_docs(*_two_rulesets()))
        editor = RegistryEditor(registry)
        for points in range(10, 16):
            editor.update_rule({"id": "b1", "condition": "true", "points": points}, "beta")
        history = registry.rule_history("b1")
        assert [h.registry_version for h in history] == [5, 6, 7]
        assert [h.rule.points for h in history] == [13, 14, 15]

    def test_clear_records_removal_in_rule_history(self, registry):
        """Emptying the registry records every rule as removed."""
        registry.publish(Snapshot.empty())
        assert registry.rule_history("b1")[-1].change is EventType.RULE_REMOVED
        assert registry.rule_history("b1")[-1].registry_version == 2

    def test_last_change_pairs_the_replaced_and_the_current_snapshot(self):
        """After the first publish the pair starts from empty; then from the one before,
        also when the history keeps a single snapshot."""
        registry = RuleRegistry(history_limit=1)
        loader = Loader()
        registry.publish(
            load_docs(make_ruleset_doc("rs", [rule_doc("r", points=1)]), loader=loader)
        )
        old, new = registry.last_change()
        assert (old.version, old.rules, new.version) == (0, {}, 1)
        for points in (2, 3):
            registry.publish(
                load_docs(make_ruleset_doc("rs", [rule_doc("r", points=points)]), loader=loader)
            )
        old, new = registry.last_change()
        assert (old.version, new.version) == (2, 3)
        assert (old.rules["r"].points, new.rules["r"].points) == (2, 3)

    def test_history_cannot_be_off(self):
        """The last change needs the snapshot it replaced: a history of 0 is refused."""
        with pytest.raises(ValueError, match="history_limit"):
            RuleRegistry(history_limit=0)

    def test_snapshot_history_is_bounded(self):
        """history() keeps at most history_limit earlier snapshots, newest first."""
        registry = RuleRegistry(history_limit=3)
        loader = Loader()
        for points in range(1, 9):
            registry.publish(
                load_docs(make_ruleset_doc("rs", [rule_doc("r", points=points)]), loader=loader)
            )
        assert registry.version == 8
        assert [s.version for s in registry.history()] == [7, 6, 5]
        assert registry.get_stats()["history_size"] == 3


class TestRollback:
    """Rollback republishes earlier content as a new, higher version."""

    @staticmethod
    def _three_versions() -> tuple[RuleRegistry, list[Snapshot]]:
        registry = RuleRegistry()
        loader = Loader()
        published = []
        for points in (1, 2, 3):
            snapshot, _ = registry.publish(
                load_docs(make_ruleset_doc("rs", [rule_doc("r", points=points)]), loader=loader)
            )
            published.append(snapshot)
        return registry, published

    def test_rollback_to_previous(self):
        """rollback() republishes the previous content with its revision, as version n+1."""
        registry, published = self._three_versions()
        snapshot, events = registry.rollback()
        assert snapshot.version == 4
        assert snapshot.revision == published[1].revision
        assert registry.get_rule("r").points == 2
        assert change_tuples(events) == {("rule_updated", "rs", "r", 4)}
        assert evaluate(registry.current, "rs", {}).registry_version == 4

    def test_rollback_to_version(self):
        """rollback(v) republishes version v's content with its revision."""
        registry, published = self._three_versions()
        snapshot, _ = registry.rollback(1)
        assert snapshot.version == 4
        assert snapshot.revision == published[0].revision
        assert registry.get_rule("r").points == 1
        assert registry.current.revision != published[2].revision

    def test_rollback_after_clear_restores_rules(self, registry):
        """Rolling back a clear brings the rulesets back."""
        revision = registry.current.revision
        registry.publish(Snapshot.empty())
        registry.rollback()
        assert registry.current.revision == revision
        assert sorted(registry.current.rulesets) == ["alpha", "beta"]
        assert registry.version == 3

    def test_rollback_to_unknown_version(self):
        """rollback to a version never published (or the current one) raises NotFoundError."""
        registry, published = self._three_versions()
        for version in (99, 0, 3):
            with pytest.raises(NotFoundError):
                registry.rollback(version)
        assert registry.current is published[2]

    def test_rollback_without_history(self, registry):
        """With only one publish there is nothing to roll back to."""
        with pytest.raises(NotFoundError):
            registry.rollback()
        assert registry.version == 1

    def test_rollback_beyond_bounded_history(self):
        """A version that fell out of the bounded history cannot be rolled back to."""
        registry = RuleRegistry(history_limit=2)
        loader = Loader()
        for points in (1, 2, 3, 4):
            registry.publish(
                load_docs(make_ruleset_doc("rs", [rule_doc("r", points=points)]), loader=loader)
            )
        with pytest.raises(NotFoundError):
            registry.rollback(1)
        snapshot, _ = registry.rollback(2)
        assert snapshot.version == 5
        assert registry.get_rule("r").points == 2


class TestConcurrency:
    """Readers never see a half-published registry while a writer publishes."""

    RULES = 10
    PUBLISHES = 200
    READERS = 4

    def _content(self, points: int) -> Snapshot:
        rules = [rule_doc(f"r{i}", "input.x >= 0", points) for i in range(self.RULES)]
        return load_docs(make_ruleset_doc("rs", rules))

    def test_writers_on_threads_deliver_every_version_once_in_order(self):
        """Four threads publishing at once: subscribers see each version once, in order,
        and never two deliveries at the same time."""
        registry = RuleRegistry()
        seen: list[int] = []
        inside = threading.Lock()

        def subscriber(snapshot, events):
            assert inside.acquire(blocking=False), "two deliveries overlapped"
            try:
                seen.append(snapshot.version)
                time.sleep(0)
            finally:
                inside.release()

        registry.subscribe(subscriber)
        content = self._content(1)

        def writer() -> None:
            for _ in range(50):
                registry.publish(content)

        threads = [threading.Thread(target=writer) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert seen == list(range(1, 201))

    def test_readers_see_one_content_per_result(self):
        """Each result is all-1s or all-2s and names a version published with that content."""
        contents = {1: self._content(1), 2: self._content(2)}
        revisions = {marker: snap.revision for marker, snap in contents.items()}
        assert revisions[1] != revisions[2]
        registry = RuleRegistry()
        published: dict[int, int] = {}
        first, _ = registry.publish(contents[1])
        published[first.version] = 1
        stop = threading.Event()
        observations: list[list[tuple[int, str, int, tuple[int, ...]]]] = [
            [] for _ in range(self.READERS)
        ]
        failures: list[BaseException] = []

        def reader(out: list[tuple[int, str, int, tuple[int, ...]]]) -> None:
            try:
                while not stop.is_set() or not out:
                    result = evaluate(registry.current, "rs", {"x": 1})
                    out.append(
                        (
                            result.registry_version,
                            result.revision,
                            result.total_points,
                            tuple(m.points for m in result.matched),
                        )
                    )
                    time.sleep(0)  # let the writer in between evaluations
            except BaseException as exc:  # reported below, so a reader failure fails the test
                failures.append(exc)

        threads = [threading.Thread(target=reader, args=(out,)) for out in observations]
        for thread in threads:
            thread.start()
        try:
            for i in range(self.PUBLISHES):
                marker = 2 if i % 2 == 0 else 1
                snapshot, _ = registry.publish(contents[marker])
                published[snapshot.version] = marker
                time.sleep(0.0005)  # let readers run against this version
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=30)
        assert failures == []
        assert registry.version == self.PUBLISHES + 1
        assert all(published[v] == (1 if v % 2 else 2) for v in published)
        seen = [obs for out in observations for obs in out]
        assert len({obs[0] for obs in seen}) > 2, "readers never overlapped the writer"
        for version, revision, total, points in seen:
            marker = published[version]
            assert points == (marker,) * self.RULES
            assert total == marker * self.RULES
            assert revision == revisions[marker]

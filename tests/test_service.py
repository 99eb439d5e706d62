"""The reload coordinator on an in-memory source: every case of "never a wrong state".

`StaticSource` stands in for files, a database or the Kubernetes API; a source that
raises stands in for every way a read can break. These run in milliseconds; the same
cases against real directories and servers are in test_hot_reload_e2e.py and
test_faults.py.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from datetime import timedelta

import pytest
from conftest import dump_yaml, make_ruleset_doc

from sidecar.documents import SourceFile
from sidecar.errors import LoadError, Problem
from sidecar.integration import is_registry_fresh
from sidecar.loader import Loader
from sidecar.registry import RuleRegistry
from sidecar.reloads import ReloadRecord, ReloadStatus, Trigger
from sidecar.service import HealthStatus, HotReloadService
from sidecar.sources import StaticSource
from sidecar.state import StateStore


async def wait_for(check: Callable[[], bool], timeout: float = 5.0) -> None:
    """Until `check()` holds (a guard against hanging, not a timing assertion)."""
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.01)


def rules(*ids: str) -> list[SourceFile]:
    return [SourceFile(f"{i}.yaml", dump_yaml(make_ruleset_doc(i)).encode()) for i in ids]


BROKEN = [SourceFile("bad.yaml", b"apiVersion: rule-sidecar/v1\nkind: RuleSet\n")]


class FlakySource(StaticSource):
    """A source whose next reads raise what the test says (then reads normally)."""

    def __init__(self, files: Sequence[SourceFile]) -> None:
        super().__init__(files, name="flaky")
        self.failures: list[BaseException] = []

    def read(self) -> list[SourceFile]:
        if self.failures:
            raise self.failures.pop(0)
        return super().read()


def make_service(source: StaticSource, **options: object) -> HotReloadService:
    """A service that is not watching (`start` it for that): health is then about the
    reloads alone."""
    options.setdefault("auto_reload", False)
    loader = Loader()
    return HotReloadService(RuleRegistry(), [source], loader=loader, **options)  # type: ignore[arg-type]


@pytest.fixture
def heard() -> list[ReloadRecord]:
    return []


async def started(source: StaticSource, heard: list[ReloadRecord], **options: object):
    service = make_service(source, **options)
    service.add_listener(heard.append)
    await service.initial_load()
    return service


class TestReadErrors:
    """A source that cannot be read completely fails the reload; nothing is removed."""

    @pytest.mark.parametrize(
        "error",
        [
            LoadError([Problem(file="rules/team-b", message="cannot list: Permission denied")]),
            PermissionError(13, "Permission denied"),
            OSError(24, "Too many open files"),
            TypeError("Object of type bytes is not JSON serializable"),
            RuntimeError("anything else"),
        ],
        ids=["load-error", "eacces", "emfile", "type-error", "runtime-error"],
    )
    async def test_any_read_error_is_a_recorded_failure(self, heard, error):
        source = FlakySource(rules("a", "b"))
        service = await started(source, heard)
        source.failures.append(error)

        record = await service.reload_rules(trigger=Trigger.WATCH)

        assert record.status is ReloadStatus.FAILED
        assert record.errors[0].file in ("flaky", "rules/team-b")
        assert sorted(service.registry.current.rulesets) == ["a", "b"]
        assert heard[-1] is record
        assert service.health()[0] is HealthStatus.DEGRADED

    async def test_a_crashing_loader_is_a_recorded_failure(self, heard, monkeypatch):
        source = StaticSource(rules("a"))
        service = await started(source, heard)

        def explode(*args: object, **kwargs: object) -> None:
            raise MemoryError("out of memory")

        monkeypatch.setattr(service.loader, "load", explode)
        record = await service.reload_rules(trigger=Trigger.RESYNC)
        assert record.status is ReloadStatus.FAILED
        assert "MemoryError" in record.errors[0].message
        assert list(service.registry.current.rulesets) == ["a"]


class TestRecovery:
    """After a failure, the next good reload is a success and is heard, same content or not."""

    @pytest.mark.parametrize("trigger", [Trigger.WATCH, Trigger.RESYNC, Trigger.API])
    async def test_restoring_what_serves_is_announced(self, heard, trigger):
        source = StaticSource(rules("a"))
        service = await started(source, heard)
        version = service.registry.version
        source.set_files(BROKEN)
        assert (await service.reload_rules(trigger=trigger)).status is ReloadStatus.FAILED
        source.set_files(rules("a"))  # a `git revert`: exactly what serves

        record = await service.reload_rules(trigger=trigger)

        assert record.status is ReloadStatus.SUCCESS
        assert heard[-1] is record
        assert service.registry.version == version  # nothing new to publish
        assert service.health()[0] is HealthStatus.HEALTHY

    async def test_a_repeated_background_failure_is_recorded_once(self, heard):
        source = StaticSource(rules("a"))
        service = await started(source, heard)
        source.set_files(BROKEN)
        await service.reload_rules(trigger=Trigger.WATCH)
        count = len(heard)
        await service.reload_rules(trigger=Trigger.RESYNC)
        assert len(heard) == count

    async def test_an_unchanged_background_check_is_not_recorded(self, heard):
        service = await started(StaticSource(rules("a")), heard)
        count = len(heard)
        record = await service.reload_rules(trigger=Trigger.RESYNC)
        assert (record.status, len(heard)) == (ReloadStatus.UNCHANGED, count)


class TestEmptied:
    """Every rule gone at once must hold across two reads before it is believed."""

    async def test_a_source_in_flux_is_not_published_empty(self, heard):
        source = FlakySource(rules("a", "b"))
        service = await started(source, heard, confirm_empty_seconds=0.05)
        # The first read finds it empty (a `db init`), the second full (`db import`).
        reads = iter([[], rules("a", "b", "c")])
        source.read = lambda: next(reads)  # type: ignore[method-assign]

        record = await service.reload_rules(trigger=Trigger.WATCH)

        assert record.status is ReloadStatus.SUCCESS
        assert sorted(service.registry.current.rulesets) == ["a", "b", "c"]
        assert all(r.rules_loaded > 0 for r in heard)

    async def test_an_emptied_source_is_refused_by_default(self, heard):
        """Every file deleted: a recorded failure naming the setting; rules keep serving."""
        source = StaticSource(rules("a"))
        service = await started(source, heard, confirm_empty_seconds=0.01)
        verified = service.get_status()["last_successful_check_time"]
        source.set_files([])
        record = await service.reload_rules(trigger=Trigger.WATCH)
        assert record.status is ReloadStatus.FAILED
        (problem,) = record.errors
        assert problem.file == "static"
        assert "RULE_SIDECAR_ALLOW_EMPTY" in problem.message
        assert list(service.registry.current.rulesets) == ["a"]
        assert heard[-1] is record
        # What serves is not what the sources hold: not a successful check.
        assert service.get_status()["last_successful_check_time"] == verified
        # The resync meeting the same refusal is not news.
        assert (await service.reload_rules(trigger=Trigger.RESYNC)).id == 0

    async def test_an_emptied_source_that_stays_empty_is_published_if_allowed(self, heard):
        source = StaticSource(rules("a"))
        service = await started(source, heard, confirm_empty_seconds=0.01, allow_empty=True)
        source.set_files([])
        record = await service.reload_rules(trigger=Trigger.WATCH)
        assert (record.status, record.rulesets_loaded) == (ReloadStatus.SUCCESS, 0)
        assert not service.registry.current.rulesets

    async def test_unchecked_then_deleted_rules_are_removed(self, heard):
        """A reload without checks, then every file deleted: nothing may keep serving."""
        source = StaticSource(rules("a", "b"))
        service = await started(source, heard, confirm_empty_seconds=0.01, allow_empty=True)
        await service.reload_rules(validate=False, force=True)
        source.set_files([])
        record = await service.reload_rules(trigger=Trigger.WATCH)
        assert (record.status, record.rules_loaded) == (ReloadStatus.SUCCESS, 0)
        assert not service.registry.current.rules

    async def test_one_source_emptied_beside_another_is_refused(self, heard):
        """Files beside a database that is re-created: the registry keeps the files'
        rulesets, but the database's all went at once."""
        files, database = StaticSource(rules("a"), name="files"), StaticSource(rules("b"))
        service = await two_sources(files, database, heard)
        database.set_files([])
        record = await service.reload_rules(trigger=Trigger.WATCH)
        assert [p.file for p in record.errors] == ["static"]
        assert sorted(service.registry.current.rulesets) == ["a", "b"]
        database.set_files(rules("b", "c"))  # `db import` done
        record = await service.reload_rules(trigger=Trigger.WATCH)
        assert record.status is ReloadStatus.SUCCESS
        assert sorted(service.registry.current.rulesets) == ["a", "b", "c"]

    @pytest.mark.parametrize("leftover", [b"# nothing\n", b"---\n", b"---\n...\n", b"null\n"])
    async def test_a_source_left_holding_no_ruleset_beside_another_is_refused(
        self, heard, leftover: bytes
    ):
        """The re-attack: the directory's files replaced by one that holds no ruleset,
        beside a database that keeps its rules: the source was emptied all the same."""
        files, database = StaticSource(rules("a"), name="files"), StaticSource(rules("b"))
        service = await two_sources(files, database, heard)
        files.set_files([SourceFile("empty.yaml", leftover)])
        record = await service.reload_rules(trigger=Trigger.WATCH)
        assert [p.file for p in record.errors] == ["files"]
        assert sorted(service.registry.current.rulesets) == ["a", "b"]


async def two_sources(
    files: StaticSource, database: StaticSource, heard: list[ReloadRecord]
) -> HotReloadService:
    """A started service on a rules directory and a database (both in memory)."""
    service = HotReloadService(
        RuleRegistry(),
        [files, database],
        loader=Loader(),
        auto_reload=False,
        confirm_empty_seconds=0.01,
    )
    service.add_listener(heard.append)
    await service.initial_load()
    return service


class TestFreshness:
    """Fresh means the sources were checked successfully within the window."""

    async def test_never_checked_is_not_fresh(self):
        service = make_service(StaticSource(rules("a")))
        assert is_registry_fresh(service, max_age_seconds=10**9) is False

    async def test_stable_rules_stay_fresh_through_quiet_checks(self, heard):
        service = await started(StaticSource(rules("a")), heard)
        first = service.get_status()["last_successful_check_time"]
        assert is_registry_fresh(service, 300)
        await service.reload_rules(trigger=Trigger.RESYNC)  # nothing changed, not recorded
        assert service.get_status()["last_successful_check_time"] > first
        assert service.registry.version == 1

    async def test_stale_past_the_window_and_degraded(self, heard):
        service = await started(
            StaticSource(rules("a")), heard, max_age_seconds=60, auto_reload=True
        )
        service.start()
        try:
            later = service._last_verified + timedelta(seconds=61)  # type: ignore[operator]
            assert is_registry_fresh(service, 60, now=later) is False
            assert is_registry_fresh(service, 61, now=later) is True
            service._last_verified -= timedelta(seconds=61)  # type: ignore[operator]
            status, body = service.health()
            assert (status, body["checks"]["fresh"]) == (HealthStatus.DEGRADED, False)
        finally:
            await service.stop()

    async def test_failed_checks_do_not_refresh(self, heard):
        source = StaticSource(rules("a"))
        service = await started(source, heard)
        verified = service.get_status()["last_successful_check_time"]
        source.set_files(BROKEN)
        await service.reload_rules(trigger=Trigger.RESYNC)
        assert service.get_status()["last_successful_check_time"] == verified


class TestRetry:
    async def test_a_repair_without_a_change_event_is_seen_in_seconds(self, heard):
        """A read error repaired silently (a permission put back): the retry after a
        failure finds it long before the resync interval."""
        source = FlakySource(rules("a"))
        service = await started(source, heard, auto_reload=True, interval_seconds=3600)
        service.start()
        try:
            source.failures.append(PermissionError(13, "Permission denied"))
            source.set_files(rules("a", "b"))  # the change event meets the broken read
            await wait_for(lambda: heard[-1].status is ReloadStatus.FAILED)
            # Repaired, with no event: only a retry can see it.
            await wait_for(lambda: heard[-1].status is ReloadStatus.SUCCESS, timeout=10)
            assert sorted(service.registry.current.rulesets) == ["a", "b"]
        finally:
            await service.stop()

    async def test_a_requested_reload_runs_without_monitoring(self, heard):
        """SIGHUP's path reloads even with HOT_RELOAD_ENABLED=false (never started)."""
        source = StaticSource(rules("a"))
        service = await started(source, heard)
        source.set_files(rules("a", "b"))
        service.request_reload(Trigger.SIGNAL)
        service.request_reload(Trigger.API)  # made meanwhile: the same reload
        await wait_for(lambda: heard[-1].triggers == {Trigger.SIGNAL, Trigger.API})
        assert sorted(service.registry.current.rulesets) == ["a", "b"]
        await service.stop()


class TestStateCopy:
    async def test_a_failed_save_is_tried_again_by_the_next_check(self, heard, tmp_path):
        """The copy could not be saved (a file where its directory goes): the next check
        that finds the sources unchanged saves it, without waiting for a new change."""
        blocker = tmp_path / "state"
        blocker.write_text("in the way", encoding="utf-8")
        service = await started(StaticSource(rules("a")), heard, state=StateStore(blocker))
        assert service.state is not None
        assert service.state.status().ok is False
        blocker.unlink()

        await service.reload_rules(trigger=Trigger.RESYNC)  # unchanged: not even recorded

        assert service.state.status().ok is True
        assert service.state.status().revision == service.registry.current.revision

    async def test_a_copy_missing_a_listed_file_is_not_served(self, heard, tmp_path):
        """A file dropped from the manifest by hand: the copy still loads, but not as the
        revision it was saved as, so a restart over broken sources does not serve it."""
        saved = await started(StaticSource(rules(*"abcdefgh")), heard, state=StateStore(tmp_path))
        manifest = tmp_path / "manifest.json"
        data = json.loads(manifest.read_bytes())
        assert len(data["files"]) > 1
        data["files"] = data["files"][1:]
        manifest.write_text(json.dumps(data), encoding="utf-8")

        restarted = await started(StaticSource(BROKEN), [], state=StateStore(tmp_path))

        assert saved.registry.version == 1
        assert restarted.registry.version == 0
        assert restarted.health()[0] is HealthStatus.UNHEALTHY

    async def test_a_forged_manifest_revision_does_not_pass_for_the_copy(self, heard, tmp_path):
        """The re-attack: a file dropped and the manifest's revision set to what the rest
        restores to; the ruleset count it was saved with still tells."""
        await started(StaticSource(rules(*"abcdefgh")), heard, state=StateStore(tmp_path))
        manifest = tmp_path / "manifest.json"
        data = json.loads(manifest.read_bytes())
        data["files"] = data["files"][1:]
        manifest.write_text(json.dumps(data), encoding="utf-8")
        kept = StateStore(tmp_path).load()
        assert kept is not None
        data["revision"] = Loader(run_checks=False).load(kept).snapshot.revision
        manifest.write_text(json.dumps(data), encoding="utf-8")

        restarted = await started(StaticSource(BROKEN), [], state=StateStore(tmp_path))

        assert restarted.registry.version == 0

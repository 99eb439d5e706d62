"""The reload coordinator on an in-memory source: every case of "never a wrong state".

`StaticSource` stands in for files, a database or the Kubernetes API; a source that
raises stands in for every way a read can break. These run in milliseconds; the same
cases against real directories and servers are in test_hot_reload_e2e.py and
test_faults.py.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import timedelta

import pytest
from conftest import dump_yaml, make_ruleset_doc

from sidecar.api.views import status_view, writes_view
from sidecar.config import SettingsError, settings_from
from sidecar.engine import evaluate
from sidecar.errors import LoadError, Problem, ProblemCode
from sidecar.integration import is_registry_fresh
from sidecar.loader import Loader
from sidecar.registry import RuleRegistry
from sidecar.reloads import ReloadRecord, ReloadStatus, Trigger
from sidecar.rulefiles import SourceFile
from sidecar.service import HealthStatus, HotReloadService, Starting
from sidecar.sources import StaticSource
from sidecar.state import StateStore

# What these services' status says of writes: none without the API's writer.
NO_WRITES = writes_view(None, False)


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
        assert service.health().status is HealthStatus.DEGRADED

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
        assert service.health().status is HealthStatus.HEALTHY

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
        verified = service.last_verified
        source.set_files([])
        record = await service.reload_rules(trigger=Trigger.WATCH)
        assert record.status is ReloadStatus.FAILED
        (problem,) = record.errors
        assert problem.file == "static"
        assert "RULE_SIDECAR_ALLOW_EMPTY" in problem.message
        assert list(service.registry.current.rulesets) == ["a"]
        assert heard[-1] is record
        # What serves is not what the sources hold: not a successful check.
        assert service.last_verified == verified
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

    async def test_validate_says_invalid_what_a_reload_would_refuse(self, heard):
        """The attack: validate answered `valid: true` for an emptied source, and the
        reload right after it was refused."""
        files, database = StaticSource(rules("a"), name="files"), StaticSource(rules("b"))
        service = await two_sources(files, database, heard)
        database.set_files([])
        validation = await service.validate_reload()
        assert [(p.file, p.code) for p in validation.problems] == [
            ("static", ProblemCode.RULES_EMPTY)
        ]

    @pytest.mark.parametrize("trigger", [Trigger.RESYNC, Trigger.VERIFY])
    async def test_a_refused_emptying_holds_through_every_retry(self, heard, trigger):
        """The attack: the background retries of a refusal found it again, unrecorded,
        and took that read as confirming what serves, so the next retry no longer saw an
        emptied source and published the registry without it, as a success."""
        files, database = StaticSource(rules("a"), name="files"), StaticSource(rules("b"))
        service = await two_sources(files, database, heard)
        verified = service.last_verified
        database.set_files([])
        for _ in range(4):
            await service.reload_rules(trigger=trigger)
        assert sorted(service.registry.current.rulesets) == ["a", "b"]
        assert [(r.status, [p.file for p in r.errors]) for r in heard[1:]] == [
            (ReloadStatus.FAILED, ["static"])
        ]
        assert service.last_verified == verified  # what serves was not confirmed
        assert service.health().status is HealthStatus.DEGRADED

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
        first = service.last_verified
        assert is_registry_fresh(service, 300)
        await service.reload_rules(trigger=Trigger.RESYNC)  # nothing changed, not recorded
        assert service.last_verified > first
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
            health = service.health()
            assert (health.status, health.checks.fresh) == (HealthStatus.DEGRADED, False)
        finally:
            await service.stop()

    async def test_failed_checks_do_not_refresh(self, heard):
        source = StaticSource(rules("a"))
        service = await started(source, heard)
        verified = service.last_verified
        source.set_files(BROKEN)
        await service.reload_rules(trigger=Trigger.RESYNC)
        assert service.last_verified == verified


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
        assert restarted.health().status is HealthStatus.UNHEALTHY

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


class CachingSource(StaticSource):
    """A source with a fingerprint, as the database has its generation and row versions:
    `read` hands back what it read last while the fingerprint has not moved, and
    `forget` drops that. `changes()` never fires. `change_unseen` changes the content
    under the same fingerprint: a row deleted and inserted again under the same version,
    a trigger bypassed, a lost NOTIFY."""

    def __init__(self, files: Sequence[SourceFile], *, name: str = "caching") -> None:
        super().__init__(files, name=name)
        self.fingerprint = 0
        self._kept: tuple[int, list[SourceFile]] | None = None

    def read(self) -> list[SourceFile]:
        if self._kept is not None and self._kept[0] == self.fingerprint:
            return list(self._kept[1])
        files = super().read()
        self._kept = (self.fingerprint, files)
        return list(files)

    def forget(self) -> None:
        self._kept = None

    def change_unseen(self, files: Sequence[SourceFile]) -> None:
        self._files = list(files)

    async def changes(self) -> AsyncIterator[str]:
        await asyncio.Event().wait()
        yield "never"


def rulesets_of(service: HotReloadService) -> list[str]:
    return sorted(service.registry.current.rulesets)


def recorded(service: HotReloadService, heard: list[ReloadRecord]) -> bool:
    """The reload that published what serves now has been recorded: a publish runs in a
    thread, and readers see the new snapshot a moment before its record exists."""
    return bool(heard) and heard[-1].version_after == service.registry.current.version


class TestForget:
    """A forced reload and SIGHUP read every source from scratch: no fingerprint, version
    or cache of a source is the only truth."""

    async def test_a_forced_reload_reads_past_a_fingerprint(self, heard):
        source = CachingSource(rules("a"))
        service = await started(source, heard)
        source.change_unseen(rules("a", "b"))
        assert (await service.reload_rules()).status is ReloadStatus.UNCHANGED  # blind

        record = await service.reload_rules(force=True)

        assert (record.status, rulesets_of(service)) == (ReloadStatus.SUCCESS, ["a", "b"])

    async def test_sighup_reads_every_source_from_scratch(self, heard):
        source = CachingSource(rules("a"))
        service = await started(source, heard)
        source.change_unseen(rules("a", "b"))

        service.request_reload(Trigger.SIGNAL, fresh=True)

        await wait_for(lambda: rulesets_of(service) == ["a", "b"] and recorded(service, heard))
        assert heard[-1].triggers == {Trigger.SIGNAL}
        await service.stop()


async def verifying(source: StaticSource, heard: list[ReloadRecord]) -> HotReloadService:
    """A started, watching service that verifies every 20 ms and never resyncs."""
    service = await started(
        source, heard, auto_reload=True, interval_seconds=3600, verify_interval_seconds=0.02
    )
    service.start()
    return service


class TestVerification:
    """The periodic verification finds what a source's usual read missed, loads it like
    any change and counts it as drift."""

    async def test_a_change_the_fingerprint_hid_goes_live_and_counts(self, heard, caplog):
        source = CachingSource(rules("a"))
        service = await verifying(source, heard)
        try:
            source.change_unseen(rules("a", "b"))

            await wait_for(lambda: rulesets_of(service) == ["a", "b"] and recorded(service, heard))

            assert (heard[-1].triggers, heard[-1].status) == (
                {Trigger.VERIFY},
                ReloadStatus.SUCCESS,
            )
            assert service.drift == {"caching": 1}
            (status,) = status_view(service, writes=NO_WRITES)["sources"]
            assert status["drift"] == 1
            assert status["last_drift"] == "1 file(s) differ from the usual read: b.yaml (missed)"
            assert any(
                "caching held other content" in r.message and "b.yaml (missed)" in r.message
                for r in caplog.records
                if r.levelname == "WARNING"
            )
            assert service.health().status is HealthStatus.HEALTHY
            # A second hidden change is a second drift; what is live stays live.
            source.change_unseen(rules("b"))
            await wait_for(lambda: rulesets_of(service) == ["b"])
            assert service.drift == {"caching": 2}
        finally:
            await service.stop()

    async def test_a_change_whose_event_was_lost_goes_live_without_drift(self, heard):
        """A source with no fast path (every read is a full one, as for a rules
        directory): what its watch missed is found by the verification's usual read, so
        no fingerprint lied and nothing counts as drift."""
        source = StaticSource(rules("a"))
        service = await verifying(source, heard)
        try:
            source._files = rules("a", "b")  # no set_files: no change event

            await wait_for(lambda: rulesets_of(service) == ["a", "b"] and recorded(service, heard))

            assert heard[-1].triggers == {Trigger.VERIFY}
            assert service.drift == {"static": 0}
        finally:
            await service.stop()

    async def test_a_verification_that_finds_nothing_is_not_recorded(self, heard):
        source = CachingSource(rules("a"))
        service = await verifying(source, heard)
        try:
            checked = service.last_check
            await wait_for(lambda: service.last_check != checked)
            assert [record.triggers for record in heard] == [{Trigger.STARTUP}]
        finally:
            await service.stop()


_UNSET = object()


class Faulty(CachingSource):
    """A source whose methods raise what the test says, or whose `read` answers garbage:
    whatever its code does, the service reports it against the source and goes on."""

    def __init__(self, files: Sequence[SourceFile]) -> None:
        super().__init__(files, name="faulty")
        self.fault: dict[str, BaseException] = {}
        self.answer: object = _UNSET  # read() returns this instead, when set

    def _maybe(self, method: str) -> None:
        if method in self.fault:
            raise self.fault[method]

    def read(self) -> list[SourceFile]:
        self._maybe("read")
        if self.answer is not _UNSET:
            return self.answer  # type: ignore[return-value]
        return super().read()

    def forget(self) -> None:
        self._maybe("forget")
        super().forget()

    def watch_problem(self) -> str | None:
        self._maybe("watch_problem")
        return None

    async def changes(self) -> AsyncIterator[str]:
        self._maybe("changes")
        await asyncio.Event().wait()
        yield "never"


FAULTS = [
    TypeError("Object of type bytes is not JSON serializable"),
    KeyError("generation"),
    RecursionError("maximum recursion depth exceeded"),
    MemoryError(),
    ValueError("x" * 1_000_000),  # a message as long as an offending value
]
FAULT_IDS = ["type-error", "key-error", "recursion", "memory", "huge-message"]


class TestSourceFaults:
    """Every exception from a source's code is a located failure or a watch problem,
    never a crash: history, status and health say so, and the rest goes on."""

    @pytest.mark.parametrize("method", ["read", "forget"])
    @pytest.mark.parametrize("error", FAULTS, ids=FAULT_IDS)
    async def test_a_read_or_forget_that_raises_is_a_located_failure(self, heard, method, error):
        files = StaticSource(rules("a"), name="files")
        source = Faulty(rules("b"))
        service = HotReloadService(
            RuleRegistry(), [files, source], loader=Loader(), auto_reload=False
        )
        service.add_listener(heard.append)
        await service.initial_load()
        source.fault[method] = error
        files.set_files(rules("a", "c"))

        record = await service.reload_rules(force=True)

        assert record.status is ReloadStatus.FAILED
        (problem,) = record.errors
        assert problem.file == "faulty"
        assert problem.message.startswith(f"cannot read source: {type(error).__name__}")
        assert len(problem.message) < 600
        assert heard[-1] is record
        assert service.health().status is HealthStatus.DEGRADED
        assert status_view(service, writes=NO_WRITES)["sources"][1]["errors"][0]["file"] == "faulty"
        assert rulesets_of(service) == ["a", "b"]  # all or nothing: the last good rules
        del source.fault[method]
        assert (await service.reload_rules(force=True)).status is ReloadStatus.SUCCESS
        assert rulesets_of(service) == ["a", "b", "c"]

    @pytest.mark.parametrize(
        ("answer", "message"),
        [
            (None, "read() returned NoneType, not a list of rule files"),
            ("b.yaml", "read() returned str, not a list of rule files"),
            (["b.yaml"], "read() returned a str among its rule files"),
            ({"b.yaml": b""}, "read() returned dict, not a list of rule files"),
        ],
        ids=["none", "str", "list-of-str", "dict"],
    )
    async def test_a_read_that_answers_garbage_is_a_located_failure(self, heard, answer, message):
        source = Faulty(rules("b"))
        service = await started(source, heard)
        source.answer = answer
        record = await service.reload_rules()
        assert record.status is ReloadStatus.FAILED
        assert [(p.file, p.message) for p in record.errors] == [
            ("faulty", f"cannot read source: TypeError: {message}")
        ]

    @pytest.mark.parametrize("method", ["changes", "watch_problem"])
    @pytest.mark.parametrize("error", FAULTS[:3], ids=FAULT_IDS[:3])
    async def test_a_watch_that_raises_is_a_watch_problem(self, heard, method, error):
        """The watch of one source breaking leaves the other source's changes going live."""
        files = StaticSource(rules("a"), name="files")
        source = Faulty(rules("b"))
        source.fault[method] = error
        service = HotReloadService(
            RuleRegistry(), [files, source], loader=Loader(), interval_seconds=3600
        )
        service.add_listener(heard.append)
        await service.initial_load()
        service.start()
        try:
            await wait_for(lambda: "faulty" in service.watch_problems())
            problem = service.watch_problems()["faulty"]
            assert type(error).__name__ in problem
            health = service.health()
            assert (health.status, health.watch_problems) == (
                HealthStatus.DEGRADED,
                {"faulty": problem},
            )
            assert status_view(service, writes=NO_WRITES)["sources"][1]["watch_problem"] == problem

            files.set_files(rules("a", "c"))

            await wait_for(lambda: rulesets_of(service) == ["a", "b", "c"])
        finally:
            await service.stop()


class TestStarting:
    """While the first load runs, health says what it waits for and nothing is ready."""

    async def test_not_ready_until_the_first_load_has_ended(self):
        """The first load publishes, then records (and saves the state copy); watching
        starts only after it: a probe in between must not see a watchless `degraded`."""
        service = make_service(StaticSource(rules("a")), auto_reload=True)
        seen: list[tuple[bool, HealthStatus]] = []
        service.add_listener(lambda _record: seen.append((service.ready, service.health().status)))

        await service.initial_load()

        assert seen == [(False, HealthStatus.UNHEALTHY)]
        assert (service.ready, service.starting()) == (True, None)

    async def test_health_names_the_source_a_first_load_waits_for(self):
        release = threading.Event()

        class Blocking(StaticSource):
            def read(self) -> list[SourceFile]:
                release.wait(10)
                return super().read()

        service = make_service(Blocking(rules("a"), name="slow"))
        assert service.starting() == Starting("the first load to begin", 0.0)
        loading = asyncio.create_task(service.initial_load())
        try:
            waiting = lambda: getattr(service.starting(), "waiting_for", None)  # noqa: E731
            await wait_for(lambda: waiting() == "reading slow")
            health = service.health()
            assert (health.status, getattr(health.starting, "waiting_for", None)) == (
                HealthStatus.UNHEALTHY,
                "reading slow",
            )
            assert not service.ready
        finally:
            release.set()
            await loading
        assert service.health().status is HealthStatus.HEALTHY
        assert service.health().starting is None


class TestVerifySetting:
    def test_zero_turns_it_off_and_a_negative_interval_is_refused(self):
        assert (
            settings_from({"RULE_SIDECAR_VERIFY_INTERVAL_SECONDS": "0"}).verify_interval_seconds
            == 0
        )
        assert settings_from({}).verify_interval_seconds == 300
        for bad in ("-1", "nan", "inf"):
            with pytest.raises(SettingsError, match="RULE_SIDECAR_VERIFY_INTERVAL_SECONDS"):
                settings_from({"RULE_SIDECAR_VERIFY_INTERVAL_SECONDS": bad})


class TestRollback:
    """A rollback holds while the sources hold what it went away from, and no longer."""

    async def test_holds_against_background_reads_of_what_it_left(self, heard):
        source = StaticSource(rules("a"))
        service = await started(source, heard)
        source.set_files(rules("a", "b"))
        await service.reload_rules(trigger=Trigger.WATCH)
        await service.rollback()
        for trigger in (Trigger.WATCH, Trigger.RESYNC, Trigger.VERIFY):
            await service.reload_rules(trigger=trigger)
        assert (sorted(service.registry.current.rulesets), service.rollback_active) == (
            ["a"],
            True,
        )

    async def test_ends_when_the_sources_change_even_back_to_what_it_left(self, heard):
        """The attack: sources reverted to what the rollback serves, then changed back to
        what it went away from. That change was taken for the rollback still holding:
        never served, health healthy, nothing recorded."""
        source = StaticSource(rules("a"))
        service = await started(source, heard)
        source.set_files(rules("a", "b"))
        await service.reload_rules(trigger=Trigger.WATCH)
        await service.rollback()
        source.set_files(rules("a"))  # a `git revert` of the change
        await service.reload_rules(trigger=Trigger.WATCH)
        assert not service.rollback_active
        source.set_files(rules("a", "b"))  # and the change made again
        record = await service.reload_rules(trigger=Trigger.WATCH)
        assert record.status is ReloadStatus.SUCCESS
        assert sorted(service.registry.current.rulesets) == ["a", "b"]


class TestPrepared:
    async def test_a_ruleset_in_use_gets_its_fast_functions_off_the_loop(self, heard):
        """The first request after a reload must not build them on the event loop, and
        a reload must not build them for rulesets nobody evaluates (a 1 MiB change:
        about 0.7 CPU-seconds on the serving core)."""
        source = StaticSource(rules("a", "b"))
        service = await started(source, heard)
        rulesets = service.registry.current.rulesets
        evaluate(service.registry.current, "a", {"amount": 1})
        await wait_for(lambda: rulesets["a"].plan.conditions.prepared)
        assert not rulesets["b"].plan.conditions.prepared


async def test_watches_stopped_by_a_shutdown_are_not_a_degradation():
    """Stopping monitoring (the API's monitoring/stop) degrades health; the watches a
    server's shutdown stops do not: a probe or a page during the drain reads what served."""
    service = make_service(StaticSource(rules("a")), auto_reload=True)
    await service.initial_load()
    service.start()
    assert service.health().status is HealthStatus.HEALTHY
    await service.stop()
    assert service.health().status is HealthStatus.DEGRADED
    service.start()
    await service.stop(shutting_down=True)
    health = service.health()
    assert (health.status, health.checks.monitoring_active) == (HealthStatus.HEALTHY, False)
    await service.close()

"""End to end: rule files change on disk, a real server reloads, clients see it."""

from __future__ import annotations

import json
import os
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from conftest import dump_yaml, fraud_doc, make_ruleset_doc
from db_support import Database, pg_listeners
from server_support import (
    HOT,
    INVALID_RULES,
    ConfigMapDir,
    Sidecar,
    eventually,
    metric_value,
    receive_event,
    receive_until,
)

from sidecar.reading import SourceSet
from sidecar.reloads import Trigger
from sidecar.sources.files import DirectorySource
from sidecar.state import StateStore

# Starts processes, browsers or databases: left out of the quick loop (-m 'not slow').
pytestmark = pytest.mark.slow

FOREIGN_LARGE = {"amount": 5000, "country": "FR"}


async def history(app: Sidecar) -> list[dict[str, Any]]:
    """The reload history, newest first."""
    body = await app.get(f"{HOT}/history")
    records: list[dict[str, Any]] = body["history"]
    return records


class TestConfigMapStory:
    """The issue's story: a ConfigMap swap reloads, a bad one is refused, a fix recovers."""

    async def test_swap_bad_swap_and_fix(self, start_sidecar, configmap_dir: ConfigMapDir):
        """Swap → new points live; invalid swap → old rules kept, degraded; fix → healthy."""
        app = await start_sidecar(configmap_dir.root, monitor=True)
        ws = await app.client.ws_connect("/ws/hot-reload")
        hello = await receive_event(ws)
        assert hello["event_type"] == "status"
        assert hello["data"]["registry"]["version"] == 1
        assert hello["data"]["monitoring_active"] is True
        before = await app.evaluate("fraud", FOREIGN_LARGE)
        assert (before["total_points"], before["registry_version"]) == (70, 1)

        # 1. The kubelet swaps in new content: large-amount is now worth 60 points.
        configmap_dir.publish({"rules.yaml": dump_yaml(fraud_doc(60))})
        reloaded, earlier = await receive_until(ws, "rules_reloaded")
        assert reloaded["data"]["status"] == "success"
        assert reloaded["data"]["trigger"] == "watch"
        assert reloaded["data"]["version_after"] == 2
        updates = [e["data"] for e in earlier if e["event_type"] == "rule_updated"]
        assert updates == [
            {
                "type": "rule_updated",
                "registry_version": 2,
                "ruleset_id": "fraud",
                "rule_id": "large-amount",
            }
        ]
        after = await app.evaluate("fraud", FOREIGN_LARGE)
        assert (after["total_points"], after["decision"]) == (90, "deny")
        assert after["registry_version"] > before["registry_version"]

        # 2. An invalid document is swapped in: refused, located, old rules keep serving.
        configmap_dir.publish({"rules.yaml": INVALID_RULES})
        failed, _ = await receive_until(ws, "reload_failed")
        error = failed["data"]["errors"][0]
        assert error["file"].endswith("rules.yaml")
        assert error["line"] == 7
        assert error["rule_id"] == "large-amount"
        served = await app.evaluate("fraud", FOREIGN_LARGE)
        assert (served["total_points"], served["registry_version"]) == (90, 2)
        code, health = await app.health()
        assert (code, health["status"]) == (200, "degraded")
        assert health["checks"]["last_reload_successful"] is False
        newest = (await history(app))[0]
        assert newest["status"] == "failed"
        assert (newest["errors"][0]["file"], newest["errors"][0]["line"]) == (
            error["file"],
            7,
        )
        status = await app.get(f"{HOT}/status")
        assert status["last_reload_status"] == "failed"
        assert status["last_errors"][0]["line"] == 7

        # 3. The fix is swapped in: healthy again, new content served.
        configmap_dir.publish({"rules.yaml": dump_yaml(fraud_doc(20))})
        await receive_until(ws, "rules_reloaded")
        code, health = await app.health()
        assert (code, health["status"]) == (200, "healthy")
        fixed = await app.evaluate("fraud", FOREIGN_LARGE)
        assert (fixed["total_points"], fixed["registry_version"]) == (50, 3)
        await ws.close()

    async def test_swap_adds_a_file(self, start_sidecar, configmap_dir: ConfigMapDir):
        """A swap that adds a second key to the ConfigMap adds its ruleset."""
        app = await start_sidecar(configmap_dir.root, monitor=True)
        configmap_dir.publish(
            {
                "rules.yaml": dump_yaml(fraud_doc()),
                "extra.yaml": dump_yaml(make_ruleset_doc("extra")),
            }
        )

        async def has_extra() -> bool:
            body = await app.get("/api/v1/rulesets")
            return {r["id"] for r in body["rulesets"]} == {"fraud", "extra"}

        await eventually(has_extra, message="ruleset extra loaded")
        assert (configmap_dir.root / "extra.yaml").is_symlink()

    async def test_swap_removes_a_file(self, start_sidecar, configmap_dir: ConfigMapDir):
        """A swap that drops a key removes its ruleset and says so on the WebSocket."""
        configmap_dir.publish(
            {
                "rules.yaml": dump_yaml(fraud_doc()),
                "extra.yaml": dump_yaml(make_ruleset_doc("extra")),
            }
        )
        app = await start_sidecar(configmap_dir.root, monitor=True)
        ws = await app.client.ws_connect("/ws/hot-reload")
        await receive_event(ws)
        configmap_dir.publish({"rules.yaml": dump_yaml(fraud_doc())})
        removed, _ = await receive_until(ws, "ruleset_removed")
        assert removed["data"]["ruleset_id"] == "extra"
        await receive_until(ws, "rules_reloaded")
        await app.get("/api/v1/rulesets/extra", status=404)
        await ws.close()


class TestPlainDirectory:
    """A plain directory edited in place: editors, deletions, nested directories."""

    async def test_editor_write_temp_and_rename_is_picked_up_once(
        self, start_sidecar, plain_rules: Path
    ):
        """Write a temp file, keep a backup, rename over the original: exactly one reload."""
        app = await start_sidecar(plain_rules, monitor=True)
        ws = await app.client.ws_connect("/ws/hot-reload")
        await receive_event(ws)
        target = plain_rules / "fraud.yaml"
        shutil.copy(target, plain_rules / "fraud.yaml~")
        temporary = plain_rules / ".fraud.yaml.tmp"
        temporary.write_text(dump_yaml(fraud_doc(65)), encoding="utf-8")
        os.replace(temporary, target)

        reloaded, _ = await receive_until(ws, "rules_reloaded")
        assert reloaded["data"]["version_after"] == 2
        assert (await app.evaluate("fraud", FOREIGN_LARGE))["total_points"] == 95
        # Nothing else arrives: the burst of events was one reload.
        late = [e["event_type"] for e in await _drain(ws, seconds=0.3)]
        assert "rules_reloaded" not in late
        assert "reload_failed" not in late
        records = [r for r in await history(app) if r["trigger"] != "startup"]
        assert [(r["trigger"], r["status"]) for r in records] == [("watch", "success")]
        await ws.close()

    async def test_deleting_a_file_removes_its_ruleset(self, start_sidecar, plain_rules: Path):
        """Deleting `extra.yaml` sends ruleset_removed and rule_removed; fraud stays."""
        app = await start_sidecar(plain_rules, monitor=True)
        ws = await app.client.ws_connect("/ws/hot-reload")
        await receive_event(ws)
        (plain_rules / "extra.yaml").unlink()
        reloaded, earlier = await receive_until(ws, "rules_reloaded")
        changes = {(e["event_type"], e["data"]["ruleset_id"]) for e in earlier}
        assert ("ruleset_removed", "extra") in changes
        assert ("rule_removed", "extra") in changes
        assert reloaded["data"]["rulesets_loaded"] == 1
        await app.get("/api/v1/rulesets/extra", status=404)
        assert (await app.evaluate("fraud", FOREIGN_LARGE))["total_points"] == 70
        await ws.close()

    async def test_nested_directory_is_read(self, start_sidecar, plain_rules: Path):
        """A rule file in a new subdirectory is loaded; a hidden subdirectory is not."""
        app = await start_sidecar(plain_rules, monitor=True)
        hidden = plain_rules / ".git"
        hidden.mkdir()
        (hidden / "ignored.yaml").write_text(dump_yaml(make_ruleset_doc("ignored")), "utf-8")
        nested = plain_rules / "team-a" / "scoring"
        nested.mkdir(parents=True)
        (nested / "nested.yaml").write_text(dump_yaml(make_ruleset_doc("nested")), "utf-8")

        async def nested_loaded() -> bool:
            return "nested" in app.state.registry.current.rulesets

        await eventually(nested_loaded, message="nested ruleset loaded")
        result = await app.evaluate("nested", {"amount": 500})
        assert result["total_points"] == 10
        assert "ignored" not in app.state.registry.current.rulesets
        rule = await app.get("/api/v1/rules/nested-big")
        assert rule["source"]["file"].endswith("team-a/scoring/nested.yaml")


class TestBackgroundReloads:
    """The periodic resync and `request_reload` (the path of SIGHUP and watchers)."""

    async def test_periodic_resync_checks_quietly(self, start_sidecar, plain_rules: Path):
        """The resync keeps checking; a check that finds nothing new is not recorded."""
        app = await start_sidecar(plain_rules, monitor=True, interval_seconds=0.05)
        first = (await app.get(f"{HOT}/status"))["last_check_time"]

        async def checked_again() -> bool:
            return (await app.get(f"{HOT}/status"))["last_check_time"] != first

        await eventually(checked_again, message="resync ran")
        assert [r["trigger"] for r in await history(app)] == ["startup"]
        assert app.version == 1

    async def test_repeated_background_failure_is_reported_once(
        self, start_sidecar, plain_rules: Path
    ):
        """A broken file seen by watch and many resyncs is one failure, not one per check."""
        app = await start_sidecar(plain_rules, monitor=True, interval_seconds=0.05)
        (plain_rules / "fraud.yaml").write_text(INVALID_RULES, encoding="utf-8")

        async def failed_once() -> bool:
            return any(r["status"] == "failed" for r in await history(app))

        await eventually(failed_once, message="failure recorded")
        first = (await app.get(f"{HOT}/status"))["last_check_time"]

        async def several_more_checks() -> bool:
            return (await app.get(f"{HOT}/status"))["last_check_time"] != first

        await eventually(several_more_checks, message="more resyncs")
        await eventually(several_more_checks, message="more resyncs")
        failures = [r for r in await history(app) if r["status"] == "failed"]
        assert len(failures) == 1

    async def test_request_reload_coalesces(self, start_sidecar, plain_rules: Path):
        """Requests made together become one reload whose trigger names every reason."""
        app = await start_sidecar(plain_rules, monitor=True)
        app.service.request_reload(Trigger.SIGNAL)
        app.service.request_reload(Trigger.SIGNAL)
        app.service.request_reload(Trigger.API)

        async def recorded() -> list[dict[str, Any]]:
            return [r for r in await history(app) if r["trigger"] != "startup"]

        records = await eventually(recorded, message="background reload recorded")
        assert [(r["trigger"], r["status"]) for r in records] == [("api+signal", "unchanged")]

    async def test_request_reload_publishes_a_change(self, start_sidecar, plain_rules: Path):
        """A requested reload reads the sources and publishes what changed."""
        app = await start_sidecar(plain_rules, monitor=True)
        await app.post(f"{HOT}/monitoring/stop")
        (plain_rules / "fraud.yaml").write_text(dump_yaml(fraud_doc(1)), encoding="utf-8")
        await app.post(f"{HOT}/monitoring/start")
        app.service.request_reload(Trigger.SIGNAL)

        async def points() -> bool:
            return (await app.evaluate("fraud", FOREIGN_LARGE))["total_points"] == 31

        await eventually(points, message="new points served")
        assert (await history(app))[0]["trigger"] == "signal"


def saved_documents(state_dir: Path) -> list[dict[str, Any]]:
    """The ruleset documents of the state dir's copy, read back as a restart reads them."""
    files = StateStore(state_dir).load() or []
    return sorted(
        (document for file in files for document in json.loads(file.content)),
        key=lambda document: document["metadata"]["id"],
    )


class TestStateDir:
    """`--state-dir`: the last good snapshot on disk carries a restart over broken sources."""

    async def test_good_load_writes_the_state_file(
        self, start_sidecar, configmap_dir: ConfigMapDir, tmp_path: Path
    ):
        """After a good load the state dir's copy holds the served rulesets."""
        state_dir = tmp_path / "state"
        await start_sidecar(configmap_dir.root, state_dir=state_dir)
        saved = saved_documents(state_dir)
        assert [doc["metadata"]["id"] for doc in saved] == ["fraud"]
        points = {rule["id"]: rule["points"] for rule in saved[0]["spec"]["rules"]}
        assert points["large-amount"] == 40

    async def test_restart_over_broken_sources_serves_the_saved_copy(
        self, start_sidecar, configmap_dir: ConfigMapDir, tmp_path: Path
    ):
        """Broken sources at start: degraded, served from state_dir; a fix returns to sources."""
        state_dir = tmp_path / "state"
        await start_sidecar(configmap_dir.root, state_dir=state_dir)
        configmap_dir.publish({"rules.yaml": INVALID_RULES})

        restarted = await start_sidecar(configmap_dir.root, state_dir=state_dir, monitor=True)
        code, health = await restarted.health()
        assert (code, health["status"], health["serving_from"]) == (200, "degraded", "state_dir")
        assert health["checks"]["last_reload_successful"] is False
        assert (await restarted.get(f"{HOT}/status"))["serving_from"] == "state_dir"
        assert await restarted.get("/readyz") == {"ready": True}
        result = await restarted.evaluate("fraud", FOREIGN_LARGE)
        assert result["total_points"] == 70
        triggers = [(r["trigger"], r["status"]) for r in await history(restarted)]
        assert triggers == [("state_dir", "restored"), ("startup", "failed")]

        configmap_dir.publish({"rules.yaml": dump_yaml(fraud_doc(45))})

        async def from_sources() -> bool:
            _, health = await restarted.health()
            return health["serving_from"] == "sources" and health["status"] == "healthy"

        await eventually(from_sources, message="serving from sources again")
        assert (await restarted.evaluate("fraud", FOREIGN_LARGE))["total_points"] == 75

        def saved_points() -> bool:
            saved = saved_documents(state_dir)
            return saved[0]["spec"]["rules"][0]["points"] == 45

        await eventually(saved_points, message="state copy updated")

    async def test_fix_with_identical_content_still_leaves_the_state_copy(
        self, start_sidecar, configmap_dir: ConfigMapDir, tmp_path: Path
    ):
        """Sources fixed back to exactly the saved content are served from sources again."""
        state_dir = tmp_path / "state"
        await start_sidecar(configmap_dir.root, state_dir=state_dir)
        configmap_dir.publish({"rules.yaml": INVALID_RULES})
        restarted = await start_sidecar(configmap_dir.root, state_dir=state_dir)
        configmap_dir.publish({"rules.yaml": dump_yaml(fraud_doc())})
        body = await restarted.post(f"{HOT}/reload")
        assert body["status"] == "success"
        assert (await restarted.get(f"{HOT}/status"))["serving_from"] == "sources"

    async def test_state_dir_fallback_is_not_a_successful_reload_metric(
        self, start_sidecar, configmap_dir: ConfigMapDir, tmp_path: Path
    ):
        """Serving the saved copy over broken sources keeps last_reload_successful at 0."""
        state_dir = tmp_path / "state"
        await start_sidecar(configmap_dir.root, state_dir=state_dir)
        configmap_dir.publish({"rules.yaml": INVALID_RULES})
        restarted = await start_sidecar(configmap_dir.root, state_dir=state_dir)
        text = await (await restarted.client.get("/metrics")).text()
        assert metric_value(text, "rule_sidecar_last_reload_successful") == 0

    async def test_nothing_valid_and_no_state_is_unhealthy(
        self, start_sidecar, configmap_dir: ConfigMapDir, tmp_path: Path
    ):
        """Broken sources and an empty state dir: 503 unhealthy, not ready, nothing saved."""
        configmap_dir.publish({"rules.yaml": INVALID_RULES})
        state_dir = tmp_path / "state"
        app = await start_sidecar(configmap_dir.root, state_dir=state_dir, monitor=True)
        code, health = await app.health()
        assert (code, health["status"], health["serving_from"]) == (503, "unhealthy", "sources")
        await app.get("/readyz", status=503)
        await app.post("/api/v1/rulesets/fraud/evaluate", json={"input": {}}, status=404)
        assert StateStore(state_dir).load() is None

    async def test_corrupt_state_copy_is_not_served(
        self, start_sidecar, configmap_dir: ConfigMapDir, tmp_path: Path
    ):
        """A state file that does not load is refused: still unhealthy."""
        configmap_dir.publish({"rules.yaml": INVALID_RULES})
        state_dir = tmp_path / "state"
        state_dir.mkdir()
        (state_dir / "last-good.json").write_text('[{"apiVersion": "nope"}]', "utf-8")
        app = await start_sidecar(configmap_dir.root, state_dir=state_dir)
        code, health = await app.health()
        assert (code, health["status"]) == (503, "unhealthy")


async def _drain(ws: Any, *, seconds: float) -> list[dict[str, Any]]:
    """Every message that arrives within `seconds` (for checking that nothing more comes)."""
    events = []
    while True:
        try:
            events.append(await receive_event(ws, timeout=seconds))
        except TimeoutError:
            return events


class TestRollbackHolds:
    """A rollback is not undone by the watcher or the resync while the sources still hold
    what was rolled back from; new content or a forced reload ends it."""

    async def test_resync_keeps_the_rollback_until_the_sources_change(
        self, start_sidecar, configmap_dir: ConfigMapDir
    ):
        """Roll back from 99 points to 40: resyncs keep 40; a new change (7) goes live."""
        app = await start_sidecar(configmap_dir.root, monitor=True, interval_seconds=0.1)
        configmap_dir.publish({"rules.yaml": dump_yaml(fraud_doc(large_points=99))})
        await eventually(lambda: app.version == 2)
        await app.post(f"{HOT}/rollback")
        assert (await app.evaluate("fraud", FOREIGN_LARGE))["total_points"] == 70
        status = await app.get(f"{HOT}/status")
        assert status["rollback_active"] is True
        checked = status["last_check_time"]
        await eventually(lambda: app.service.last_check not in (None, checked))
        assert (await app.evaluate("fraud", FOREIGN_LARGE))["total_points"] == 70
        assert app.version == 3

        configmap_dir.publish({"rules.yaml": dump_yaml(fraud_doc(large_points=7))})
        await eventually(lambda: app.version == 4)
        assert (await app.evaluate("fraud", FOREIGN_LARGE))["total_points"] == 37
        assert (await app.get(f"{HOT}/status"))["rollback_active"] is False

    async def test_forced_reload_ends_the_rollback(
        self, start_sidecar, configmap_dir: ConfigMapDir
    ):
        """`force: true` re-applies the sources over a rollback."""
        app = await start_sidecar(configmap_dir.root)
        configmap_dir.publish({"rules.yaml": dump_yaml(fraud_doc(large_points=99))})
        await app.post(f"{HOT}/reload")
        await app.post(f"{HOT}/rollback")
        unchanged = await app.post(f"{HOT}/reload")
        assert unchanged["status"] == "unchanged"
        assert (await app.evaluate("fraud", FOREIGN_LARGE))["total_points"] == 70
        forced = await app.post(f"{HOT}/reload", json={"force": True})
        assert forced["status"] == "success"
        assert (await app.evaluate("fraud", FOREIGN_LARGE))["total_points"] == 129


@pytest.fixture
def seeded_pg(pg_database: Database) -> Database:
    """A migrated PostgreSQL database holding the `fraud` ruleset (large-amount 40)."""
    pg_database.init().import_docs(fraud_doc())
    return pg_database


class TestVerification:
    """The periodic verification (`RULE_SIDECAR_VERIFY_INTERVAL_SECONDS`) against real
    sources whose change signal is lost; the resync is an hour away throughout."""

    async def test_a_file_change_no_watch_saw_goes_live(self, start_sidecar, plain_rules: Path):
        """A polling watcher is blind to a rewrite that keeps the size and puts the mtime
        back (as is a watch that lost an event)."""

        def blind(state: Any) -> None:
            state.service.sources = SourceSet(
                [DirectorySource(plain_rules, debounce_ms=20, force_polling=True)]
            )

        app = await start_sidecar(
            plain_rules,
            monitor=True,
            interval_seconds=3600,
            verify_interval_seconds=0.3,
            prepare=blind,
        )
        path = plain_rules / "extra.yaml"
        before = os.stat(path)
        text = path.read_text("utf-8")
        assert "points: 10" in text
        path.write_text(text.replace("points: 10", "points: 20"), encoding="utf-8")
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        assert (os.stat(path).st_size, os.stat(path).st_mtime_ns) == (
            before.st_size,
            before.st_mtime_ns,
        )

        async def points() -> bool:
            return (await app.evaluate("extra", {"amount": 500}))["total_points"] == 20

        await eventually(points, message="the hidden change served")
        newest = (await history(app))[0]
        assert (newest["trigger"], newest["status"]) == ("verify", "success")

    async def test_a_database_change_that_bypassed_the_triggers_goes_live_and_counts(
        self, start_sidecar, rules_dir: Path, seeded_pg: Database
    ):
        """Triggers disabled (as `session_replication_role=replica` or a restore with
        --disable-triggers does): no NOTIFY, no generation bump. The verification finds
        it, serves it and counts it in `rule_sidecar_source_drift_total`."""
        app = await start_sidecar(
            rules_dir,
            database_url=seeded_pg.url,
            monitor=True,
            interval_seconds=3600,
            verify_interval_seconds=0.3,
        )
        assert (await app.evaluate("fraud", FOREIGN_LARGE))["total_points"] == 70
        name = (await app.get(f"{HOT}/status"))["sources"][-1]["name"]
        # The listener, once connected, makes the next read a full one (what changed
        # before it listened is unknown): wait until a read after that has ended.
        await eventually(lambda: len(pg_listeners(seeded_pg.name)) == 1, message="listening")
        for _ in range(2):
            since = datetime.now(UTC).isoformat()

            async def read_since(since: str = since) -> bool:
                status = await app.get(f"{HOT}/status")
                return bool(status["sources"][-1]["last_successful_read"] > since)

            await eventually(read_since, message="a read after the listener's")
        metrics = await app.client.get("/metrics")
        assert (
            metric_value(await metrics.text(), "rule_sidecar_source_drift_total", {"source": name})
            == 0
        )

        seeded_pg.change_unseen(
            "UPDATE rule_sidecar_rules SET points = 45 WHERE id = 'large-amount'"
        )

        async def points() -> bool:
            return (await app.evaluate("fraud", FOREIGN_LARGE))["total_points"] == 75

        await eventually(points, message="the unseen change served")
        metrics = await app.client.get("/metrics")
        text = await metrics.text()
        assert metric_value(text, "rule_sidecar_source_drift_total", {"source": name}) == 1
        (source,) = [s for s in (await app.get(f"{HOT}/status"))["sources"] if s["name"] == name]
        assert source["drift"] == 1
        assert "fraud.json (changed)" in source["last_drift"]
        assert (await history(app))[0]["trigger"] == "verify"
        assert (await app.health())[1]["status"] == "healthy"

"""Faults: a sidecar killed with SIGKILL mid-reload (SIGKILL mid-save of the state copy is
in test_state.py), a state directory that cannot be written, ten thousand files with one
broken, a source whose code answers garbage or raises. In every case the last good rules
survive and keep serving, and the error names its place."""

from __future__ import annotations

import json
import os
import resource
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import dump_yaml, fraud_doc, make_ruleset_doc
from server_support import HOT, clean_environment, eventually, spawn, wait_sync

from sidecar.errors import LoadError
from sidecar.loader import Loader
from sidecar.reading import SourceSet
from sidecar.rulefiles import SourceFile
from sidecar.sources import StaticSource
from sidecar.sources.files import DirectorySource
from sidecar.state import StateStore

# Starts processes, browsers or databases: left out of the quick loop (-m 'not slow').
pytestmark = pytest.mark.slow


class TestKill9:
    def test_during_a_reload_the_restart_serves_the_last_good(self, tmp_path: Path):
        """A sidecar killed with SIGKILL right after a change (while it reloads, or just
        before), restarted on broken sources: it serves good rules from its state dir."""
        rules, state = tmp_path / "rules", tmp_path / "state"
        rules.mkdir()
        (rules / "fraud.yaml").write_text(dump_yaml(fraud_doc()), encoding="utf-8")
        env = clean_environment(RULE_SIDECAR_STATE_DIR=str(state))
        first = spawn(tmp_path, "--rules-dir", str(rules), env=env)
        try:
            first.wait_ready()
            (rules / "fraud.yaml").write_text(dump_yaml(fraud_doc(55)), encoding="utf-8")
            time.sleep(0.01)  # the watcher has seen the change; the reload is under way
            first.process.send_signal(signal.SIGKILL)
            first.process.wait()
        finally:
            first.stop()
        (rules / "fraud.yaml").write_text("spec: [broken", encoding="utf-8")
        second = spawn(tmp_path, "--rules-dir", str(rules), env=env)
        try:
            second.wait_ready()
            _, health = second.get("/health/hot-reload")
            assert (health["status"], health["serving_from"]) == ("degraded", "state_dir")
            status, ruleset = second.get("/api/v1/rulesets/fraud")
            assert (status, ruleset["rule_count"]) == (200, 3)
        finally:
            second.stop()


class TestStateDirectory:
    def test_an_unwritable_state_dir_costs_a_warning_only(self, tmp_path: Path):
        """A state dir that cannot be created (a file is in the way): reloads still
        succeed and serve; the failure to save is logged with the path."""
        blocker = tmp_path / "state"
        blocker.write_text("not a directory", encoding="utf-8")
        rules = tmp_path / "rules"
        rules.mkdir()
        (rules / "fraud.yaml").write_text(dump_yaml(fraud_doc()), encoding="utf-8")
        env = clean_environment(RULE_SIDECAR_STATE_DIR=str(blocker / "nested"))
        served = spawn(tmp_path, "--rules-dir", str(rules), env=env)
        try:
            served.wait_ready()
            _, health = served.get("/health/hot-reload")
            assert health["status"] == "healthy"
            wait_sync(
                lambda: any(
                    "could not save the last good snapshot" in line for line in served.log_lines()
                ),
                message="a warning about the state dir",
            )
            assert str(blocker) in "\n".join(served.log_lines())
        finally:
            served.stop()
        assert os.path.isfile(blocker)


FULL_AT = 256 * 1024  # bytes: the state files of `big_rules()` do not fit, fraud's do


def disk_full_at_256k() -> None:
    """In the child: files cannot grow past FULL_AT (write fails with EFBIG, as a full disk
    fails with ENOSPC: a short write, then an OSError)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (FULL_AT, resource.RLIM_INFINITY))


def big_rules() -> str:
    rules = [
        {"id": f"big-{i}", "condition": f"input.amount > {i}", "points": 1, "description": "x" * 80}
        for i in range(2500)
    ]
    return dump_yaml(make_ruleset_doc("big", rules))


class TestStateDirectoryFull:
    def test_a_full_disk_keeps_the_old_copy_and_recovers(self, tmp_path: Path):
        """A save that runs out of space fails with a warning: the rules still go live, the
        saved copy is the previous one, whole, and no temporary file is left; once there
        is room again the next change is saved."""
        rules, state = tmp_path / "rules", tmp_path / "state"
        rules.mkdir()
        (rules / "fraud.yaml").write_text(dump_yaml(fraud_doc()), encoding="utf-8")
        env = clean_environment(RULE_SIDECAR_STATE_DIR=str(state))
        served = spawn(tmp_path, "--rules-dir", str(rules), env=env, before_exec=disk_full_at_256k)
        saved = state / "manifest.json"
        try:
            served.wait_ready()
            wait_sync(saved.is_file, message="the first copy saved")
            first_copy = saved.read_bytes()
            first_files = sorted(p.name for p in (state / "rulesets").iterdir())

            (rules / "big.yaml").write_text(big_rules(), encoding="utf-8")
            wait_sync(
                lambda: any(
                    "could not save the last good snapshot" in line for line in served.log_lines()
                ),
                timeout=30,
                message="a warning about the full disk",
            )
            assert served.get("/api/v1/rulesets/big")[0] == 200
            assert saved.read_bytes() == first_copy
            assert sorted(p.name for p in state.iterdir()) == ["manifest.json", "rulesets"]
            assert sorted(p.name for p in (state / "rulesets").iterdir()) == first_files
            _, health = served.get("/health/hot-reload")
            assert health["status"] == "healthy"  # serving the new rules; only the copy is old

            # Room again; the next change is saved whole.
            resource.prlimit(served.process.pid, resource.RLIMIT_FSIZE, (-1, -1))
            (rules / "fraud.yaml").write_text(dump_yaml(fraud_doc(55)), encoding="utf-8")
            wait_sync(lambda: saved.read_bytes() != first_copy, timeout=30, message="a new copy")
            copy = [
                doc for file in StateStore(state).load() or [] for doc in json.loads(file.content)
            ]
            assert {document["metadata"]["id"] for document in copy} == {"big", "fraud"}
        finally:
            served.stop()


class TestManyFiles:
    def test_ten_thousand_files_one_broken_then_fixed(self, tmp_path: Path):
        """10,000 rule files, one of them broken: the load fails naming that file and
        line, nothing else; fixed, all 10,000 rulesets load (only it is parsed again)."""
        root = tmp_path / "rules"
        root.mkdir()
        template = (
            "apiVersion: rule-sidecar/v1\nkind: RuleSet\nmetadata: {{id: rs{i}}}\nspec:\n"
            "  rules:\n    - {{id: r{i}, condition: 'input.amount > {i}', points: 1}}\n"
        )
        for i in range(10_000):
            (root / f"r{i:05d}.yaml").write_text(template.format(i=i), encoding="utf-8")
        broken = root / "r04321.yaml"
        broken.write_text(template.format(i=4321).replace("> 4321", ">"), encoding="utf-8")
        source, loader = DirectorySource(root), Loader()
        with pytest.raises(LoadError) as caught:
            loader.load(source.read())
        (problem,) = caught.value.problems
        assert (problem.file, problem.line) == (str(broken), 6)
        broken.write_text(template.format(i=4321), encoding="utf-8")
        result = loader.load(source.read())
        assert len(result.snapshot.rulesets) == 10_000
        assert result.files_parsed == 1


class Hostile(StaticSource):
    """A source beside a real rules directory whose code misbehaves as the test says."""

    def __init__(self) -> None:
        super().__init__([], name="hostile")
        self.answer: object = []
        self.watch_error: Exception | None = None

    def read(self) -> list[SourceFile]:
        return self.answer  # type: ignore[return-value]

    def watch_problem(self) -> str | None:
        if self.watch_error is not None:
            raise self.watch_error
        return None


class TestHostileSource:
    """Whatever a source's code does, the API answers with it, located, never a 500."""

    async def test_garbage_from_read_is_a_failed_reload_not_a_500(self, start_sidecar, rules_dir):
        (rules_dir / "fraud.yaml").write_text(dump_yaml(fraud_doc()), encoding="utf-8")
        hostile = Hostile()

        def add(state: Any) -> None:
            state.service.sources = SourceSet([*state.service.sources, hostile])

        app = await start_sidecar(rules_dir, prepare=add)
        hostile.answer = {"fraud.yaml": "not a list"}

        response, record = await app.call("POST", f"{HOT}/reload", status=None, json={})

        assert (response.status, record["status"]) == (422, "failed")
        assert [(e["file"], e["message"]) for e in record["errors"]] == [
            (
                "hostile",
                "cannot read source: TypeError: read() returned dict, not a list of rule files",
            )
        ]
        newest = (await app.get(f"{HOT}/history"))["history"][0]
        assert (newest["status"], newest["errors"][0]["file"]) == ("failed", "hostile")
        assert (await app.health())[1]["status"] == "degraded"
        assert (await app.evaluate("fraud", {"amount": 5000, "country": "FR"}))[
            "total_points"
        ] == 70

    async def test_a_watch_problem_that_raises_is_reported_not_a_500(
        self, start_sidecar, rules_dir
    ):
        (rules_dir / "fraud.yaml").write_text(dump_yaml(fraud_doc()), encoding="utf-8")
        hostile = Hostile()

        def add(state: Any) -> None:
            state.service.sources = SourceSet([*state.service.sources, hostile])

        app = await start_sidecar(rules_dir, prepare=add, monitor=True)
        hostile.watch_error = KeyError("resourceVersion")

        code, health = await app.health()
        assert (code, health["status"]) == (200, "degraded")
        assert health["watch_problems"] == {
            "hostile": "watch_problem() raised KeyError: 'resourceVersion'"
        }
        metrics = await (await app.client.get("/metrics")).text()
        assert 'rule_sidecar_source_watch_ok{source="hostile"} 0.0' in metrics
        (rules_dir / "extra.yaml").write_text(
            dump_yaml(make_ruleset_doc("extra")), encoding="utf-8"
        )

        async def extra_served() -> bool:
            return "extra" in app.state.registry.current.rulesets

        await eventually(extra_served, message="the other source's change live")

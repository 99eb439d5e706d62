"""The rules directory under attack, against a real `rule-sidecar serve` process.

Each test breaks the directory the way a careless operator or a hostile neighbour can
(permissions, FIFOs, devices, sparse giants, rewrites in place, the directory deleted
and made again, descriptors running out) and checks the promise: the served registry
is the last content that was read completely, every failure is recorded and every
recovery announced. As root every file is readable, so the sidecar runs without
CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH (`setpriv`), as it does in its container.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import socket
import stat
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import dump_yaml, make_ruleset_doc
from server_support import HOT, Served, clean_environment, spawn, wait_sync

from sidecar.state import StateStore
from sidecar.testing import WITHOUT_DAC

# Starts processes, browsers or databases: left out of the quick loop (-m 'not slow').
pytestmark = pytest.mark.slow

needs_setpriv = pytest.mark.skipif(shutil.which("setpriv") is None, reason="no setpriv")


def post(served: Served, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(
        served.url + path,
        data=json.dumps(body or {}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def history(served: Served) -> list[dict[str, Any]]:
    return served.get(f"{HOT}/history")[1]["history"]


def served_rulesets(served: Served) -> list[str]:
    return sorted(r["id"] for r in served.get("/api/v1/rulesets")[1]["rulesets"])


def teams(root: Path) -> Path:
    """rules/team-a/a.yaml and rules/team-b/b.yaml, readable by anyone."""
    for team in ("a", "b"):
        directory = root / f"team-{team}"
        directory.mkdir(parents=True)
        (directory / f"{team}.yaml").write_text(dump_yaml(make_ruleset_doc(team)), encoding="utf-8")
    return root


@pytest.fixture
def sidecar(tmp_path: Path) -> Iterator[Served]:
    rules = teams(tmp_path / "rules")
    env = clean_environment(
        HOT_RELOAD_INTERVAL_SECONDS="3600", RULE_SIDECAR_STATE_DIR=str(tmp_path / "state")
    )
    served = spawn(tmp_path, "--rules-dir", str(rules), env=env, wrapper=WITHOUT_DAC)
    try:
        served.wait_ready()
        yield served
    finally:
        served.stop()
        for path in rules.rglob("*"):  # let pytest clean up
            if path.is_dir() and not path.is_symlink():
                path.chmod(0o755)
        rules.chmod(0o755)


def change(root: Path, points: int) -> None:
    """A real change in team-a, so that the watcher reloads."""
    doc = make_ruleset_doc(
        "a", [{"id": "a-big", "condition": "input.amount > 1", "points": points}]
    )
    (root / "team-a" / "a.yaml").write_text(dump_yaml(doc), encoding="utf-8")


def newest_failure(served: Served) -> dict[str, Any]:
    def failed() -> bool:
        return history(served)[0]["status"] == "failed"

    wait_sync(failed, timeout=15, message="a failed reload recorded")
    return history(served)[0]


def assert_recovered_after(served: Served, failure: dict[str, Any]) -> None:
    """A repair after `failure` is recorded as a success (by the retry that follows a
    failure, or by the reload asked for here, whichever comes first)."""
    post(served, f"{HOT}/reload", {})
    later = [r for r in history(served) if r["id"] > failure["id"]]
    assert "success" in [r["status"] for r in later], later


def assert_no_success_lost_rules(served: Served, count: int) -> None:
    """No recorded success ever served fewer rulesets than the sources hold."""
    successes = [r for r in history(served) if r["status"] == "success"]
    assert all(r["rulesets_loaded"] == count for r in successes), successes


@needs_setpriv
class TestUnreadable:
    @pytest.mark.parametrize("locked", ["rules/team-b", "rules"])
    def test_an_unlistable_directory_fails_the_reload(
        self, sidecar: Served, tmp_path: Path, locked: str
    ):
        """chmod 000 on a subdirectory or the root: the reload fails naming it; every
        ruleset keeps serving; health is degraded; nothing empty is saved as last good."""
        (tmp_path / locked).chmod(0)
        change(tmp_path / "rules", 77)
        if locked == "rules":
            post(sidecar, f"{HOT}/reload", {})  # no watch event reaches a locked directory

        failure = newest_failure(sidecar)

        assert str(tmp_path / locked) in failure["errors"][0]["file"]
        assert "Permission denied" in failure["errors"][0]["message"]
        assert served_rulesets(sidecar) == ["a", "b"]
        assert sidecar.get("/health/hot-reload")[1]["status"] == "degraded"
        assert_no_success_lost_rules(sidecar, 2)
        copy = StateStore(tmp_path / "state").load() or []
        assert {doc["metadata"]["id"] for file in copy for doc in json.loads(file.content)} == {
            "a",
            "b",
        }

        (tmp_path / locked).chmod(0o755)
        assert_recovered_after(sidecar, failure)
        assert sidecar.get("/health/hot-reload")[1]["status"] == "healthy"

    def test_an_unreadable_file_fails_the_reload(self, sidecar: Served, tmp_path: Path):
        path = tmp_path / "rules" / "team-b" / "b.yaml"
        path.chmod(0)
        change(tmp_path / "rules", 78)
        failure = newest_failure(sidecar)
        assert failure["errors"][0]["file"] == str(path)
        assert served_rulesets(sidecar) == ["a", "b"]


class TestSpecialFiles:
    """Only regular files are read: nothing blocks the reload, nothing reads forever."""

    @pytest.mark.parametrize("kind", ["fifo", "device", "socket", "symlink-to-fifo"])
    def test_a_special_file_named_yaml_is_refused(self, sidecar: Served, tmp_path: Path, kind):
        rules = tmp_path / "rules"
        target = rules / "team-b" / "special.yaml"
        if kind == "fifo":
            os.mkfifo(target)
        elif kind == "device":
            os.mknod(target, stat.S_IFCHR | 0o644, os.makedev(1, 5))  # /dev/zero
        elif kind == "socket":
            listener = socket.socket(socket.AF_UNIX)
            listener.bind(str(target))
        else:
            os.mkfifo(rules / "team-b" / ".fifo")
            target.symlink_to(".fifo")

        failure = newest_failure(sidecar)  # the watcher saw the new name

        assert failure["errors"][0]["file"] == str(target)
        assert "not a regular file" in failure["errors"][0]["message"]
        # Nothing hangs: validate and reload answer, with the same failure.
        status, body = post(sidecar, f"{HOT}/validate")
        assert (status, body["valid"]) == (200, False)
        assert served_rulesets(sidecar) == ["a", "b"]

        target.unlink()
        assert_recovered_after(sidecar, failure)

    def test_a_sparse_gigabyte_is_refused_unread(self, sidecar: Served, tmp_path: Path):
        with (tmp_path / "rules" / "team-b" / "huge.yaml").open("wb") as handle:
            handle.truncate(1 << 30)
        failure = newest_failure(sidecar)
        assert "the limit is" in failure["errors"][0]["message"]
        peak_kib = int(
            next(
                line.split()[1]
                for line in Path(f"/proc/{sidecar.process.pid}/status").read_text().splitlines()
                if line.startswith("VmHWM:")
            )
        )
        assert peak_kib < 512 * 1024  # it would be over 1 GiB had the file been read


class TestInFlux:
    def test_rewrites_in_place_never_serve_a_half_file(self, sidecar: Served, tmp_path: Path):
        """Truncate, wait 80 ms (longer than the debounce window: a slow writer, or a
        loaded machine), write; again every 20 ms for 3 s: the ruleset never disappears,
        and once the writes stop, the last content serves."""
        path = tmp_path / "rules" / "team-a" / "a.yaml"
        stop = threading.Event()

        def rewrite() -> None:
            points = 0
            while not stop.is_set():
                points += 1
                with path.open("w", encoding="utf-8") as handle:  # truncates
                    handle.flush()
                    time.sleep(0.08)
                    rule = {"id": "a-big", "condition": "input.amount > 1", "points": points}
                    handle.write(dump_yaml(make_ruleset_doc("a", [rule])))
                time.sleep(0.02)
            change(tmp_path / "rules", 1000)

        writer = threading.Thread(target=rewrite)
        writer.start()
        missing = 0
        deadline = time.monotonic() + 3
        try:
            while time.monotonic() < deadline:
                status, _ = sidecar.get("/api/v1/rulesets/a")
                missing += status != 200
        finally:
            stop.set()
            writer.join()
        assert missing == 0
        assert_no_success_lost_rules(sidecar, 2)

        def final() -> bool:
            return sidecar.get("/api/v1/rules/a-big")[1]["points"] == 1000

        wait_sync(final, timeout=15, message="the last content served")

    def test_a_recreated_directory_is_watched_again(self, sidecar: Served, tmp_path: Path):
        """rm -rf rules; mkdir rules; write: the change goes live by the watch (the
        resync is an hour away), and the emptied moment never served."""
        rules = tmp_path / "rules"
        shutil.rmtree(rules)
        rules.mkdir()
        teams(rules)
        change(rules, 55)

        def live() -> bool:
            return sidecar.get("/api/v1/rules/a-big")[1].get("points") == 55

        wait_sync(live, timeout=15, message="the change after re-creation served")
        assert_no_success_lost_rules(sidecar, 2)
        assert sidecar.get("/health/hot-reload")[1]["checks"]["sources_watched"] is True


class TestDescriptors:
    def test_running_out_of_descriptors_never_loses_rules(self, sidecar: Served, tmp_path: Path):
        """Idle connections eat every descriptor (a low RLIMIT_NOFILE): a reload then
        fails, or is not attempted, but never serves fewer rulesets."""
        soft, hard = resource.prlimit(sidecar.process.pid, resource.RLIMIT_NOFILE)
        resource.prlimit(sidecar.process.pid, resource.RLIMIT_NOFILE, (64, hard))
        idle = []
        try:
            for _ in range(100):
                idle.append(socket.create_connection(("127.0.0.1", sidecar.port), timeout=5))
            change(tmp_path / "rules", 66)
            time.sleep(2)  # the watcher's reload runs, or fails, while no descriptor is free
        finally:
            for connection in idle:
                connection.close()
        resource.prlimit(sidecar.process.pid, resource.RLIMIT_NOFILE, (soft, hard))
        wait_sync(lambda: served_rulesets(sidecar) == ["a", "b"], timeout=15, message="served")
        assert_no_success_lost_rules(sidecar, 2)
        post(sidecar, f"{HOT}/reload", {})
        assert sidecar.get("/api/v1/rules/a-big")[1]["points"] == 66


class TestNeverEmptyByAccident:
    def test_deleting_every_file_is_refused(self, sidecar: Served, tmp_path: Path):
        """Every rule file deleted: refused (the setting named), every ruleset serves."""
        for path in (tmp_path / "rules").rglob("*.yaml"):
            path.unlink()

        failure = newest_failure(sidecar)

        assert "RULE_SIDECAR_ALLOW_EMPTY" in failure["errors"][0]["message"]
        assert served_rulesets(sidecar) == ["a", "b"]
        assert sidecar.get("/health/hot-reload")[1]["status"] == "degraded"

    def test_allowed_the_registry_empties(self, tmp_path: Path):
        rules = teams(tmp_path / "rules")
        env = clean_environment(RULE_SIDECAR_ALLOW_EMPTY="true")
        served = spawn(tmp_path, "--rules-dir", str(rules), env=env)
        try:
            served.wait_ready()
            for path in rules.rglob("*.yaml"):
                path.unlink()
            wait_sync(lambda: served_rulesets(served) == [], timeout=15, message="emptied")
            assert history(served)[0]["status"] == "success"
        finally:
            served.stop()

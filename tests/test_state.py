"""The state dir's copy (`--state-dir`): it restores whatever the sidecar served, however
large, through the loader's own limits; a copy that could not be restored is refused when
it is written, loudly; it is never torn, never mixed, and a damaged copy is never served."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import dump_yaml, make_ruleset_doc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_support import Served, clean_environment, spawn, wait_sync

from sidecar.documents import INT_MAX, INT_MIN
from sidecar.errors import LoadError
from sidecar.loader import Loader
from sidecar.rulefiles import SourceFile
from sidecar.snapshot import Snapshot
from sidecar.state import StateError, StateStore
from sidecar.testing import WITHOUT_DAC

# Starts processes, browsers or databases: left out of the quick loop (-m 'not slow').
pytestmark = pytest.mark.slow

RESTART_SECONDS = 180.0  # generous: 20,000 rules compile twice on a loaded machine


def registry_docs(rulesets: int, rules_each: int, points: int = 1) -> list[dict]:
    """`rulesets` documents of `rules_each` rules, with 200-character descriptions."""
    return [
        make_ruleset_doc(
            f"rs{i}",
            [
                {
                    "id": f"r{i}-{j}",
                    "condition": f"input.amount > {j}",
                    "points": points,
                    "description": "d" * 200,
                }
                for j in range(rules_each)
            ],
        )
        for i in range(rulesets)
    ]


def snapshot_of(docs: list[dict]) -> Snapshot:
    """The snapshot the real loader builds from `docs` (files of 500 documents)."""
    files = [
        SourceFile(f"f{k}.json", json.dumps(docs[k : k + 500]).encode())
        for k in range(0, len(docs), 500)
    ]
    return Loader(run_checks=False).load(files).snapshot


def restored(state: Path) -> Snapshot:
    """What a restart would serve from `state`."""
    files = StateStore(state).load()
    assert files is not None
    return Loader(run_checks=False).load(files).snapshot


def listed_files(state: Path) -> list[str]:
    return sorted(json.loads((state / "manifest.json").read_bytes())["files"])


def files_on_disk(state: Path) -> list[str]:
    return sorted(f"rulesets/{path.name}" for path in (state / "rulesets").iterdir())


def wait_served(served: Served) -> dict:
    """Wait (generously) until `serve` answers its health with its first load ended (it
    listens before that load); the health body."""

    def up() -> bool:
        assert served.process.poll() is None, f"serve exited: {served.log.read_text()}"
        try:
            code, health = served.get("/health/hot-reload")
        except (OSError, ValueError):
            return False
        return code in (200, 503) and health["starting"] is None

    wait_sync(up, timeout=RESTART_SECONDS, message="serve answering")
    return served.get("/health/hot-reload")[1]


class TestRestoresWhatWasServed:
    """Past the loader's per-file limits (1,000 documents, 4 MiB): the copy still restores."""

    def test_a_restart_over_broken_sources_restores_2000_rulesets_of_20000_rules(
        self, tmp_path: Path
    ):
        """2,000 rulesets of 10 rules (6 MB as JSON), served, then the sidecar restarted
        over a broken file: it serves all of them, the same revision, from the state dir."""
        rules, state = tmp_path / "rules", tmp_path / "state"
        rules.mkdir()
        docs = registry_docs(2000, 10)
        for k in range(0, len(docs), 500):
            (rules / f"part-{k}.yaml").write_text(dump_yaml(docs[k : k + 500]), encoding="utf-8")
        env = clean_environment(RULE_SIDECAR_STATE_DIR=str(state))
        first = spawn(tmp_path, "--rules-dir", str(rules), env=env)
        try:
            health = wait_served(first)
            assert health["registry"]["rule_count"] == 20_000
            revision = health["revision"]
            wait_sync((state / "manifest.json").is_file, message="copy saved")
        finally:
            first.stop()
        (rules / "part-0.yaml").write_text("spec: [broken", encoding="utf-8")
        second = spawn(tmp_path, "--rules-dir", str(rules), env=env)
        try:
            health = wait_served(second)
            assert (health["status"], health["serving_from"]) == ("degraded", "state_dir")
            assert health["revision"] == revision
            stats = health["registry"]
            assert (stats["ruleset_count"], stats["rule_count"]) == (2000, 20_000)
            assert second.get("/api/v1/rulesets/rs1999")[0] == 200
        finally:
            second.stop()

    def test_every_file_of_the_copy_is_within_the_loader_limits(self, tmp_path: Path):
        """3,000 rulesets: several files, none over 1,000 documents or 4 MiB, and the copy
        restores to the same revision."""
        snapshot = snapshot_of(registry_docs(3000, 3))
        StateStore(tmp_path).save(snapshot)
        for name in listed_files(tmp_path):
            content = (tmp_path / name).read_bytes()
            assert len(content) <= 4 * 1024 * 1024
            assert len(json.loads(content)) <= 1000
        assert restored(tmp_path).revision == snapshot.revision


class TestSaveFailsLoudly:
    """A copy that could not be restored is known when it is written, not at the restart."""

    @staticmethod
    def unrestorable(rules: Path) -> Snapshot:
        """A ruleset that loads from its YAML (4 MB) but is 6 MB as JSON: a million
        control characters, 4 bytes each as YAML escapes, 6 as JSON's."""
        text = (
            dump_yaml(make_ruleset_doc("wide"))
            + '    metadata:\n      v: "'
            + "\\x01" * 1_000_000
            + '"\n'
        )
        path = rules / "wide.yaml"
        path.write_text(text, encoding="utf-8")
        assert path.stat().st_size < 4 * 1024 * 1024
        return Loader().load([SourceFile(str(path), path.read_bytes())]).snapshot

    def test_the_save_is_refused_and_the_previous_copy_stays(self, tmp_path: Path):
        """`StateError` naming the ruleset; the manifest and files on disk are the
        previous copy's; the status says which revision failed and which is saved."""
        state, rules = tmp_path / "state", tmp_path / "rules"
        rules.mkdir()
        good = snapshot_of(registry_docs(3, 1))
        store = StateStore(state)
        store.save(good)
        before = ((state / "manifest.json").read_bytes(), files_on_disk(state))
        wide = self.unrestorable(rules)

        with pytest.raises(StateError, match=r"ruleset 'wide' is \d+ bytes as JSON"):
            store.save(wide)

        assert ((state / "manifest.json").read_bytes(), files_on_disk(state)) == before
        assert restored(state).revision == good.revision
        status = store.status()
        assert (status.ok, status.revision, status.failed_revision) == (
            False,
            good.revision,
            wide.revision,
        )
        assert "could not be restored" in (status.error or "")

    @contextlib.contextmanager
    def serving_unrestorable(self, tmp_path: Path) -> Iterator[tuple[Served, Path, Path]]:
        """`serve` on rules whose copy cannot be saved: (served, state dir, rules dir)."""
        state, rules = tmp_path / "state", tmp_path / "rules"
        rules.mkdir()
        self.unrestorable(rules)
        env = clean_environment(RULE_SIDECAR_STATE_DIR=str(state))
        served = spawn(tmp_path, "--rules-dir", str(rules), env=env)
        try:
            wait_served(served)
            yield served, state, rules
        finally:
            served.stop()

    def test_the_served_sidecar_warns_and_keeps_serving(self, tmp_path: Path):
        """In `serve`: the rules go live, the warning names the state dir and the reason."""
        with self.serving_unrestorable(tmp_path) as (served, state, _rules):
            wait_sync(
                lambda: any(
                    "could not save the last good snapshot" in line for line in served.log_lines()
                ),
                message="a warning",
            )
            warning = next(line for line in served.log_lines() if "could not save" in line)
            assert str(state) in warning
            assert "ruleset 'wide'" in warning
            assert served.get("/api/v1/rulesets/wide")[0] == 200
            assert not (state / "manifest.json").exists()

    def test_the_status_names_the_failed_save(self, tmp_path: Path):
        """`GET .../status`: `state_dir` says the last save failed, why, and which copy
        is on disk; after a restorable change it says the save succeeded."""
        with self.serving_unrestorable(tmp_path) as (served, _state, rules):

            def saved() -> dict:
                return served.get("/api/v1/rules/hot-reload/status")[1]["state_dir"]

            wait_sync(lambda: saved()["last_save_successful"] is False, message="failure")
            status = saved()
            assert "ruleset 'wide'" in status["last_error"]
            assert (status["saved_revision"], status["files"]) == (None, 0)
            assert status["failed_revision"] == served.get("/health/hot-reload")[1]["revision"]

            (rules / "wide.yaml").write_text(
                dump_yaml(make_ruleset_doc("narrow")), encoding="utf-8"
            )
            wait_sync(lambda: saved()["last_save_successful"] is True, message="a good save")
            status = saved()
            assert (status["last_error"], status["failed_revision"]) == (None, None)
            assert status["saved_revision"] == served.get("/health/hot-reload")[1]["revision"]


# Saves two 600-ruleset snapshots in turn, forever, printing each revision it saved.
WRITER = """
import json, sys
from collections.abc import Iterator
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from test_state import registry_docs, snapshot_of
from sidecar.state import StateStore
snapshots = [snapshot_of(registry_docs(600, 2, points)) for points in (1, 2)]
store = StateStore(Path(sys.argv[1]))
print("ready", flush=True)
while True:
    for snapshot in snapshots:
        store.save(snapshot)
        print(snapshot.revision, flush=True)
"""


class TestNeverTorn:
    """SIGKILL at any moment of a save that rewrites hundreds of files."""

    def test_sigkill_during_saves_leaves_one_whole_copy(self, tmp_path: Path):
        """Every kill leaves a copy that restores to one of the two snapshots, never a
        mix; the next save removes whatever the killed one left behind."""
        state = tmp_path / "state"
        tests_dir = str(Path(__file__).parent)
        # The writer's two snapshots (a save can complete just before the kill, unprinted).
        revisions = {snapshot_of(registry_docs(600, 2, points)).revision for points in (1, 2)}
        rng = random.Random(11)
        for _ in range(6):
            writer = subprocess.Popen(
                [sys.executable, "-c", WRITER, str(state), tests_dir],
                stdout=subprocess.PIPE,
                text=True,
            )
            assert writer.stdout is not None
            assert writer.stdout.readline().strip() == "ready"
            assert writer.stdout.readline().strip() in revisions  # one save done
            time.sleep(rng.uniform(0.0, 0.5))
            writer.send_signal(signal.SIGKILL)
            writer.wait()
            assert restored(state).revision in revisions
        snapshot = snapshot_of(registry_docs(600, 2, 3))
        StateStore(state).save(snapshot)
        assert files_on_disk(state) == listed_files(state)
        assert sorted(path.name for path in state.iterdir()) == ["manifest.json", "rulesets"]
        assert restored(state).revision == snapshot.revision


class TestIncremental:
    """A reload that changes one ruleset of many rewrites one small file, not the copy."""

    def test_one_changed_ruleset_rewrites_one_file(self, tmp_path: Path):
        """Of 1,000 rulesets, one changes: one file goes, one comes, the others are
        untouched (same inode, same modification time)."""
        docs = registry_docs(1000, 1)
        store = StateStore(tmp_path)
        store.save(snapshot_of(docs))
        before = {name: (tmp_path / name).stat() for name in listed_files(tmp_path)}
        docs[500]["spec"]["rules"][0]["points"] = 7
        changed = snapshot_of(docs)

        store.save(changed)

        after = {name: (tmp_path / name).stat() for name in listed_files(tmp_path)}
        assert len(set(before) - set(after)) == len(set(after) - set(before)) == 1
        for name in set(before) & set(after):
            assert (after[name].st_ino, after[name].st_mtime_ns) == (
                before[name].st_ino,
                before[name].st_mtime_ns,
            )
        assert restored(tmp_path).revision == changed.revision

    @pytest.mark.parametrize("fresh_store", [False, True], ids=["same-store", "after-restart"])
    def test_a_file_damaged_since_is_written_again(self, tmp_path: Path, fresh_store: bool):
        """A file of the copy edited in place, same size, then another ruleset changes:
        the next save writes the damaged file again (its name alone says nothing), so
        the copy restores what serves."""
        docs = registry_docs(300, 1)
        store = StateStore(tmp_path)
        store.save(snapshot_of(docs))
        changing = docs[0]["metadata"]["id"]
        path = next(  # a file that the change leaves listed
            tmp_path / name
            for name in listed_files(tmp_path)
            if f'"{changing}"'.encode() not in (tmp_path / name).read_bytes()
        )
        path.write_bytes(path.read_bytes().replace(b'"points":1', b'"points":2', 1))
        docs[0]["spec"]["rules"][0]["points"] = 9
        changed = snapshot_of(docs)

        (StateStore(tmp_path) if fresh_store else store).save(changed)

        assert restored(tmp_path).revision == changed.revision


class TestDamagedCopy:
    """A copy damaged on disk is refused, naming the file: never served in part."""

    @pytest.fixture
    def state(self, tmp_path: Path) -> Path:
        StateStore(tmp_path).save(snapshot_of(registry_docs(300, 1)))
        return tmp_path

    def test_a_changed_file_is_refused(self, state: Path):
        """One byte changed (still valid JSON): the digest tells."""
        name = listed_files(state)[0]
        path = state / name
        path.write_bytes(path.read_bytes().replace(b'"points":1', b'"points":2', 1))
        with pytest.raises(LoadError) as caught:
            StateStore(state).load()
        (problem,) = caught.value.problems
        assert (problem.file, problem.message) == (
            str(path),
            "the saved copy is damaged: its content does not match its digest",
        )

    def test_a_missing_file_is_refused(self, state: Path):
        name = listed_files(state)[-1]
        (state / name).unlink()
        with pytest.raises(LoadError, match="the saved copy is damaged: missing"):
            StateStore(state).load()

    @pytest.mark.parametrize(
        "manifest",
        [b"", b"{", b'{"format": 2, "files": ["../../etc/passwd"]}', b'{"format": 9, "files": []}'],
        ids=["empty", "torn", "escaping", "unknown-format"],
    )
    def test_a_bad_manifest_is_refused(self, state: Path, manifest: bytes):
        """Only names of this copy's own files are followed."""
        (state / "manifest.json").write_bytes(manifest)
        with pytest.raises(LoadError, match="the saved copy is damaged: not a manifest"):
            StateStore(state).load()

    def test_an_oversized_file_is_not_read_whole(self, state: Path):
        """A file grown past the loader's limit is refused by its size."""
        path = state / listed_files(state)[0]
        with path.open("r+b") as file:
            file.truncate(1024 * 1024 * 1024)  # sparse: a gigabyte that takes no room
        with pytest.raises(LoadError, match="more than 4194304 bytes"):
            StateStore(state).load()


class TestEarlierFormat:
    """A state dir written before the copy was split restores, and is then replaced."""

    def test_the_single_file_restores_and_the_next_save_replaces_it(self, tmp_path: Path):
        docs = registry_docs(5, 2)
        (tmp_path / "last-good.json").write_text(json.dumps(docs), encoding="utf-8")
        snapshot = snapshot_of(docs)
        assert restored(tmp_path).revision == snapshot.revision

        StateStore(tmp_path).save(snapshot)

        assert sorted(path.name for path in tmp_path.iterdir()) == ["manifest.json", "rulesets"]
        assert restored(tmp_path).revision == snapshot.revision


class TestSpecialFiles:
    """A FIFO, a device or a directory where the copy's files should be: refused at once,
    never read (a FIFO would block the restart forever, /dev/zero never end)."""

    @pytest.mark.parametrize("name", ["manifest.json", "last-good.json"])
    def test_a_fifo_in_place_of_the_copy_does_not_block_the_restart(
        self, tmp_path: Path, name: str
    ):
        """`serve` over broken sources with a FIFO for the copy: it answers (503, nothing
        valid to serve) instead of hanging in `open()`."""
        rules, state = tmp_path / "rules", tmp_path / "state"
        rules.mkdir()
        state.mkdir()
        (rules / "broken.yaml").write_text("spec: [broken", encoding="utf-8")
        os.mkfifo(state / name)
        env = clean_environment(RULE_SIDECAR_STATE_DIR=str(state))
        served = spawn(tmp_path, "--rules-dir", str(rules), env=env)
        try:
            health = wait_served(served)
            assert (health["status"], health["serving_from"]) == ("unhealthy", "sources")
            assert any("not a regular file" in line for line in served.log_lines())
        finally:
            served.stop()

    @pytest.mark.parametrize("target", ["/dev/zero", "directory"])
    def test_a_file_of_the_copy_that_is_not_a_regular_file_is_refused(
        self, tmp_path: Path, target: str
    ):
        """A listed file replaced by a symlink to a device, or by a directory."""
        StateStore(tmp_path).save(snapshot_of(registry_docs(3, 1)))
        path = tmp_path / listed_files(tmp_path)[0]
        path.unlink()
        if target == "directory":
            path.mkdir()
        else:
            path.symlink_to(target)
        with pytest.raises(LoadError, match="the saved copy is damaged: not a regular file"):
            StateStore(tmp_path).load()

    def test_garbage_that_cannot_be_removed_does_not_fail_the_save(self, tmp_path: Path):
        """A directory among the copy's files (not removable with unlink): the save
        succeeds, the copy restores."""
        store = StateStore(tmp_path)
        store.save(snapshot_of(registry_docs(3, 1)))
        (tmp_path / "rulesets" / "stray").mkdir()
        snapshot = snapshot_of(registry_docs(3, 1, points=2))
        store.save(snapshot)
        assert store.status().ok is True
        assert restored(tmp_path).revision == snapshot.revision


TEXT = st.text(max_size=20)  # any characters but surrogates: controls, NUL, emoji, RTL


@st.composite
def registries(draw: st.DrawFn) -> list[dict]:
    """1-40 rulesets with any text in names, descriptions, labels and rule metadata."""
    count = draw(st.integers(min_value=1, max_value=40))
    return [
        {
            "apiVersion": "rule-sidecar/v1",
            "kind": "RuleSet",
            "metadata": {
                "id": f"s{i}",
                "name": draw(TEXT.filter(bool)),
                "description": draw(TEXT),
                "labels": draw(st.dictionaries(st.text(max_size=8), TEXT, max_size=2)),
            },
            "spec": {
                "rules": [
                    {
                        "id": f"s{i}-r{j}",
                        "condition": "input.amount > 1",
                        "points": draw(st.integers(-1000, 1000)),
                        "description": draw(TEXT),
                        "metadata": draw(
                            st.dictionaries(
                                st.text(max_size=8),
                                st.one_of(
                                    TEXT,
                                    # Beyond 64 bits is refused at load: not servable.
                                    st.integers(min_value=INT_MIN, max_value=INT_MAX),
                                    st.floats(allow_nan=False, allow_infinity=False),
                                    st.none(),
                                ),
                                max_size=3,
                            )
                        ),
                    }
                    for j in range(draw(st.integers(min_value=1, max_value=3)))
                ]
            },
        }
        for i in range(count)
    ]


class TestRoundTrip:
    """Whatever was served is what a restart restores: the same revision."""

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(docs=registries())
    def test_any_served_registry_restores_to_the_same_revision(self, docs: list[dict]):
        """Any text (controls, NUL, emoji, right-to-left), any JSON number in metadata."""
        snapshot = snapshot_of(docs)
        with tempfile.TemporaryDirectory() as directory:
            StateStore(Path(directory)).save(snapshot)
            assert restored(Path(directory)).revision == snapshot.revision


LOAD_AS_UNPRIVILEGED = """
import sys
from collections.abc import Iterator
from pathlib import Path
from sidecar.errors import LoadError
from sidecar.state import StateStore
try:
    StateStore(Path(sys.argv[1])).load()
    print("read")
except LoadError as exc:
    print(exc.problems[0].message)
"""


class TestUnreadableCopy:
    """A copy the process may not read (EACCES) is a bad copy, reported, never a crash of
    the restart. Run without CAP_DAC_OVERRIDE: as root everything is readable."""

    @pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv")
    @pytest.mark.parametrize("name", ["manifest.json", "last-good.json"])
    def test_an_unreadable_copy_is_a_load_error(self, tmp_path: Path, name: str):
        StateStore(tmp_path).save(snapshot_of(registry_docs(3, 1)))
        if name == "last-good.json":  # the earlier format
            (tmp_path / "manifest.json").unlink()
            (tmp_path / name).write_text(json.dumps(registry_docs(3, 1)), encoding="utf-8")
        (tmp_path / name).chmod(0)
        child = subprocess.run(
            [
                *WITHOUT_DAC,
                sys.executable,
                "-c",
                LOAD_AS_UNPRIVILEGED,
                str(tmp_path),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert (
            child.stdout.strip() == "the saved copy is damaged: cannot be read (Permission denied)"
        )

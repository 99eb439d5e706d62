"""Tests of `read_rule_files`: directories and Kubernetes ConfigMap mounts on a real disk."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from conftest import dump_yaml, make_ruleset_doc, write_rules

from sidecar.errors import LoadError, Problem
from sidecar.loader import Loader
from sidecar.sources import files
from sidecar.sources.files import DirectorySource, read_rule_files
from sidecar.testing import ConfigMapDir


def names(root: Path, paths: list[str]) -> list[str]:
    """`paths` relative to `root`, as POSIX strings."""
    return [Path(path).relative_to(root).as_posix() for path in paths]


def read_problems(*paths: Path) -> tuple[Problem, ...]:
    """The problems of a read that must fail."""
    with pytest.raises(LoadError) as caught:
        read_rule_files(paths)
    return caught.value.problems


class TestConfigMapMount:
    """A ConfigMap mount is read once per file, through the visible names."""

    def test_each_file_is_read_once_through_its_visible_name(self, tmp_path: Path):
        """`..data` and the timestamped directory are skipped; the links are read."""
        mount = ConfigMapDir(tmp_path / "rules")
        mount.publish({"a.yaml": "a: 1\n", "b.json": '{"b": 2}'})

        files = read_rule_files([mount.root])

        assert names(mount.root, [f.name for f in files]) == ["a.yaml", "b.json"]
        assert [f.content for f in files] == [b"a: 1\n", b'{"b": 2}']

    def test_swapped_data_is_read_from_the_new_directory(self, tmp_path: Path):
        """After the kubelet swaps `..data`, the same names give the new content."""
        mount = ConfigMapDir(tmp_path / "rules")
        mount.publish({"a.yaml": "version: 1\n"})

        mount.publish({"a.yaml": "version: 2\n"})

        (file,) = read_rule_files([mount.root])
        assert file.content == b"version: 2\n"
        assert names(mount.root, [file.name]) == ["a.yaml"]

    def test_a_swap_is_read_at_once(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
        """The kubelet writes a ConfigMap's files in full before it swaps `..data` to
        them, so a swap is read without waiting for the files to settle (a file
        written in place is waited for), an emptied key included."""
        mount = ConfigMapDir(tmp_path / "rules")
        mount.publish({"a.yaml": "version: 1\n", "b.yaml": "b: 1\n"})
        source = DirectorySource(mount.root, debounce_ms=60_000)
        monkeypatch.setattr(files.time, "sleep", lambda seconds: pytest.fail(f"slept {seconds}"))
        assert [f.content for f in source.read()] == [b"version: 1\n", b"b: 1\n"]
        mount.publish({"a.yaml": "version: 2\n", "b.yaml": ""})
        assert [f.content for f in source.read()] == [b"version: 2\n", b""]

    def test_a_file_written_in_place_in_a_mount_is_waited_for(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ):
        """A file beside the `..data` links (not one of them) settles first."""
        mount = ConfigMapDir(tmp_path / "rules")
        mount.publish({"a.yaml": "version: 1\n"})
        (mount.root / "local.yaml").write_text("x: 1\n")
        slept: list[float] = []
        sleep = time.sleep
        monkeypatch.setattr(files.time, "sleep", lambda s: (slept.append(s), sleep(s)))
        assert len(DirectorySource(mount.root).read()) == 2
        assert slept
        assert 0 < slept[0] <= 0.05

    def test_configmap_rules_load(self, tmp_path: Path):
        """Rules mounted as a ConfigMap load, and problems name the visible file."""
        mount = ConfigMapDir(tmp_path / "rules")
        mount.publish(
            {
                "one.yaml": dump_yaml(make_ruleset_doc("one")),
                "two.yaml": dump_yaml(make_ruleset_doc("two")),
            }
        )

        result = Loader().load(read_rule_files([mount.root]))

        assert list(result.snapshot.rulesets) == ["one", "two"]
        location = result.snapshot.rulesets["one"].location
        assert location is not None
        assert location.file == str(mount.root / "one.yaml")


class TestDirectoryWalk:
    """Directories are walked in order, skipping hidden entries and other suffixes."""

    def test_hidden_files_and_directories_are_skipped(self, rules_dir: Path):
        """Dot-files and everything under dot-directories are not read."""
        write_rules(rules_dir, "visible.yaml", "a: 1\n")
        write_rules(rules_dir, ".hidden.yaml", "b: 1\n")
        write_rules(rules_dir, ".git/config.yaml", "c: 1\n")
        write_rules(rules_dir, "sub/.cache/x.yaml", "d: 1\n")

        files = read_rule_files([rules_dir])

        assert names(rules_dir, [f.name for f in files]) == ["visible.yaml"]

    def test_nested_directories_are_read(self, rules_dir: Path):
        """Files at any depth are read, in sorted order."""
        for name in ("z.yaml", "a/b/c.yml", "a/a.json", "m/n.yaml"):
            write_rules(rules_dir, name, "x: 1\n")

        files = read_rule_files([rules_dir])

        assert names(rules_dir, [f.name for f in files]) == [
            "z.yaml",
            "a/a.json",
            "a/b/c.yml",
            "m/n.yaml",
        ]

    def test_other_suffixes_are_ignored(self, rules_dir: Path):
        """Only .yaml, .yml and .json files are rule files."""
        for name in ("rules.yaml", "rules.yml", "rules.json"):
            write_rules(rules_dir, name, "x: 1\n")
        for name in ("README.md", "notes.txt", "rules.yaml.bak", "rules.yaml~", "yaml"):
            write_rules(rules_dir, name, "not rules")

        files = read_rule_files([rules_dir])

        assert sorted(names(rules_dir, [f.name for f in files])) == [
            "rules.json",
            "rules.yaml",
            "rules.yml",
        ]

    def test_a_file_path_is_read_as_given(self, rules_dir: Path):
        """A path naming a file is read even beside files that are not given."""
        path = write_rules(rules_dir, "one.yaml", "a: 1\n")
        write_rules(rules_dir, "two.yaml", "b: 1\n")

        (file,) = read_rule_files([path])

        assert (file.name, file.content) == (str(path), b"a: 1\n")

    def test_empty_directory_gives_no_files(self, rules_dir: Path):
        """An empty directory is not an error: it holds no rules."""
        assert read_rule_files([rules_dir]) == []

    def test_a_file_over_the_limit_is_refused_unread(self, rules_dir: Path):
        """A 1 GiB sparse file is refused by its size: not a byte of it is read."""
        with (rules_dir / "huge.yaml").open("wb") as handle:
            handle.truncate(1 << 30)

        (problem,) = read_problems(rules_dir)

        assert problem.file.endswith("huge.yaml")
        assert problem.message == f"file is {1 << 30} bytes, the limit is {4 << 20}: not read"

    def test_symlink_loop_reads_each_file_once(self, rules_dir: Path):
        """A directory symlink back to the root does not make files be read again."""
        write_rules(rules_dir, "rules.yaml", "a: 1\n")
        (rules_dir / "loop").symlink_to(".")

        files = read_rule_files([rules_dir])

        assert len(files) == 1


class TestUnreadableFiles:
    """Files that cannot or must not be read are reported, and nothing is returned."""

    def test_symlink_outside_the_directory_is_refused(self, tmp_path: Path):
        """A link to a file outside the directory being read is not followed."""
        rules = tmp_path / "rules"
        write_rules(rules, "good.yaml", "a: 1\n")
        secret = write_rules(tmp_path, "elsewhere/secret.yaml", "password: x\n")
        (rules / "evil.yaml").symlink_to(secret)

        (problem,) = read_problems(rules)

        assert problem.file == str(rules / "evil.yaml")
        assert problem.message == f"symlink leads outside {rules.resolve()}: refused"

    def test_relative_symlink_escaping_with_dotdot_is_refused(self, tmp_path: Path):
        """`../` in a link target cannot escape the directory either."""
        rules = tmp_path / "rules"
        write_rules(tmp_path, "outside.yaml", "a: 1\n")
        rules.mkdir()
        (rules / "link.yaml").symlink_to(Path("..") / "outside.yaml")

        (problem,) = read_problems(rules)

        assert "symlink leads outside" in problem.message

    def test_dangling_symlink_is_reported(self, rules_dir: Path):
        """A link to a file that does not exist is a problem naming the link."""
        write_rules(rules_dir, "good.yaml", "a: 1\n")
        (rules_dir / "gone.yaml").symlink_to("missing.yaml")

        (problem,) = read_problems(rules_dir)

        assert problem.file == str(rules_dir / "gone.yaml")
        assert problem.message == "cannot read: No such file or directory"

    @pytest.mark.skipif(
        hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can read any file"
    )
    def test_permission_denied_is_reported(self, rules_dir: Path):
        """A file the process may not read is a problem naming the file and the reason."""
        path = write_rules(rules_dir, "secret.yaml", "a: 1\n")
        path.chmod(0)
        try:
            (problem,) = read_problems(rules_dir)
        finally:
            path.chmod(0o644)

        assert problem.file == str(path)
        assert problem.message == "cannot read: Permission denied"

    def test_missing_path_is_reported(self, tmp_path: Path):
        """A path that does not exist is a problem, not an empty result."""
        missing = tmp_path / "nope"

        (problem,) = read_problems(missing)

        assert (problem.file, problem.message) == (str(missing), "no such file or directory")

    def test_every_problem_is_reported_together(self, tmp_path: Path):
        """All unreadable paths of one read are listed in one LoadError."""
        rules = tmp_path / "rules"
        rules.mkdir()
        (rules / "a.yaml").symlink_to("missing.yaml")
        (rules / "b.yaml").symlink_to(write_rules(tmp_path, "out.yaml", "a: 1\n"))

        problems = read_problems(rules, tmp_path / "nope")

        assert [Path(p.file).name for p in problems] == ["a.yaml", "b.yaml", "nope"]


@pytest.mark.slow  # each read waits out the window in which an emptied file may refill
class TestEmptiedFiles:
    """A file that had content and is empty now is believed only once it stays so."""

    def test_a_file_emptied_for_good_is_read_empty(self, rules_dir: Path):
        path = write_rules(rules_dir, "a.yaml", dump_yaml(make_ruleset_doc("a")))
        source = DirectorySource(rules_dir)
        source.read()
        path.write_text("", encoding="utf-8")
        os.utime(path, (time.time() - 1, time.time() - 1))  # settled

        (file,) = source.read()

        assert file.content == b""

    def test_a_file_written_after_its_truncate_is_read_whole(self, rules_dir: Path):
        """Truncated, then written 200 ms later (far past the debounce window)."""
        text = dump_yaml(make_ruleset_doc("a"))
        path = write_rules(rules_dir, "a.yaml", text)
        source = DirectorySource(rules_dir)
        source.read()
        path.write_text("", encoding="utf-8")
        os.utime(path, (time.time() - 1, time.time() - 1))
        writer = threading.Timer(0.2, path.write_text, (text + "# again\n",))
        writer.start()

        (file,) = source.read()
        writer.join()

        assert file.content.decode() == text + "# again\n"


class TestDirectorySymlinks:
    def test_a_directory_symlink_out_of_the_directory_is_refused_unwalked(self, rules_dir: Path):
        """`ln -s /sys rules/sys`: refused by name at once, never walked."""
        write_rules(rules_dir, "a.yaml", dump_yaml(make_ruleset_doc("a")))
        (rules_dir / "sys").symlink_to("/sys")

        (problem,) = read_problems(rules_dir)

        assert problem.file == str(rules_dir / "sys")
        assert "symlink leads outside" in problem.message

    def test_a_directory_symlink_inside_is_followed(self, rules_dir: Path):
        write_rules(rules_dir / "real", "a.yaml", dump_yaml(make_ruleset_doc("a")))
        (rules_dir / "alias").symlink_to("real")
        assert [Path(f.name).name for f in read_rule_files([rules_dir])] == ["a.yaml"]

    def test_a_tree_too_deep_to_walk_is_a_located_problem(self, rules_dir: Path):
        """1,100 levels (past the interpreter's recursion limit in os.walk)."""
        levels = [rules_dir]
        for _ in range(1100):
            levels.append(levels[-1] / "d")
            levels[-1].mkdir()
        try:
            (problem,) = read_problems(rules_dir)
        finally:  # from the bottom up: shutil.rmtree (pytest's clean-up) recurses too
            for level in reversed(levels[1:]):
                level.rmdir()
        assert (problem.file, problem.message) == (
            str(rules_dir),
            "cannot list: the directory tree is too deep",
        )

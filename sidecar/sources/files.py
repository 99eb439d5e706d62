"""Read rule files from paths, the way a ConfigMap-mounted directory must be read.

Kubernetes mounts a ConfigMap as `name -> ..data/name` symlinks, with `..data` itself a
symlink to a hidden timestamped directory that the kubelet swaps atomically. Hidden
entries are skipped and visible names are read through their symlinks, so each file is
read once, from the current `..data`. A symlink that leads outside the directory being
read is refused rather than followed.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Final

import watchfiles
from watchfiles import Change

from sidecar.documents import RULE_FILE_SUFFIXES, SourceFile
from sidecar.errors import LoadError, Problem

__all__ = ["DirectorySource", "is_rule_file", "read_rule_files"]


def is_rule_file(path: Path) -> bool:
    return path.suffix.lower() in RULE_FILE_SUFFIXES and not path.name.startswith(".")


def _walk(root: Path) -> Iterable[Path]:
    """Rule files below `root`, following directory symlinks but never into a loop."""
    visited: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        stat = os.stat(dirpath)
        if (stat.st_dev, stat.st_ino) in visited:
            dirnames[:] = []
            continue
        visited.add((stat.st_dev, stat.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for filename in sorted(filenames):
            path = Path(dirpath, filename)
            if is_rule_file(path):
                yield path


def read_rule_files(
    paths: Iterable[str | Path], *, max_bytes: int | None = None
) -> list[SourceFile]:
    """Every rule file under `paths` (files or directories), or `LoadError` naming each
    path that cannot be read."""
    files: list[SourceFile] = []
    problems: list[Problem] = []
    for given in paths:
        root = Path(given)
        if not root.exists():
            problems.append(Problem(file=str(root), message="no such file or directory"))
            continue
        # A file named explicitly is read wherever its symlink leads; files found by
        # walking a directory must stay inside it.
        explicit = root.is_file()
        candidates = [root] if explicit else list(_walk(root))
        boundary = root.resolve()
        for path in candidates:
            try:
                real = path.resolve(strict=True)
                if not explicit and not real.is_relative_to(boundary):
                    problems.append(
                        Problem(
                            file=str(path), message=f"symlink leads outside {boundary}: refused"
                        )
                    )
                    continue
                with open(real, "rb") as handle:
                    limit = -1 if max_bytes is None else max_bytes + 1
                    files.append(SourceFile(str(path), handle.read(limit)))
            except (OSError, RuntimeError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                problems.append(Problem(file=str(path), message=f"cannot read: {reason}"))
    if problems:
        raise LoadError(problems)
    return files


_EDITOR_DEBRIS: Final = (".swp", ".swx", "~", ".tmp")
_STABLE_READ_ATTEMPTS: Final = 5


def _relevant(change: Change, path: str) -> bool:
    """Everything but editor swap files: the kubelet's swap shows up only as `..data`."""
    name = os.path.basename(path)
    return not (name.endswith(_EDITOR_DEBRIS) or name == "4913")


def _fingerprint(paths: Iterable[str]) -> dict[str, tuple[int, int] | None]:
    stamps: dict[str, tuple[int, int] | None] = {}
    for path in paths:
        try:
            stat = os.stat(path)
            stamps[path] = (stat.st_mtime_ns, stat.st_size)
        except OSError:
            stamps[path] = None
    return stamps


class DirectorySource:
    """A rules directory, such as a ConfigMap mount, watched for changes.

    The directory is watched, never the files: a watch on a file dies at the first
    ConfigMap swap. A file being written while it is read is read again (its size or
    mtime moved during the read), so half a file is never handed to the loader.
    """

    def __init__(
        self, root: Path, *, debounce_ms: int = 50, force_polling: bool | None = None
    ) -> None:
        self.root = root
        self._debounce_ms = debounce_ms
        self._force_polling = force_polling

    @property
    def name(self) -> str:
        return f"files:{self.root}"

    def read(self) -> list[SourceFile]:
        files: list[SourceFile] = []
        for _ in range(_STABLE_READ_ATTEMPTS):
            before = _fingerprint(str(path) for path in _walk(self.root))
            files = read_rule_files([self.root])
            if _fingerprint(before) == before:
                return files
            time.sleep(0.02)
        return files

    def watch_problem(self) -> str | None:
        return None if self.root.is_dir() else f"no such directory: {self.root}"

    async def changes(self) -> AsyncIterator[str]:
        while not self.root.exists():
            await asyncio.sleep(1.0)
        async for batch in watchfiles.awatch(
            self.root,
            watch_filter=_relevant,
            debounce=self._debounce_ms,
            step=10,
            force_polling=self._force_polling,
            recursive=True,
        ):
            yield f"watch: {len(batch)} change(s)"

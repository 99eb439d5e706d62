"""Helpers for tests and benchmarks of code that uses rule-sidecar (structlog-style).

`ConfigMapDir` writes a directory exactly the way the kubelet's atomic writer updates a
ConfigMap volume, so a watcher can be tested against the real sequence of filesystem
events: files go into a new hidden timestamped directory, a `..data_tmp` symlink to it is
renamed over `..data` (the one atomic step), visible names are symlinks through `..data`,
and the previous timestamped directory is removed.
"""

from __future__ import annotations

import itertools
import os
import shutil
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path

__all__ = ["ConfigMapDir"]


class ConfigMapDir:
    """A ConfigMap-style volume at `root`, updated by `write` with one atomic swap."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self._serial = itertools.count()

    @property
    def data(self) -> Path:
        """The `..data` symlink the kubelet swaps."""
        return self.root / "..data"

    def publish(self, files: Mapping[str, str | bytes]) -> Path:
        """Replace the whole content with `files` (name → text); returns the new data dir."""
        stamp = datetime.now(UTC).strftime("%Y_%m_%d_%H_%M_%S")
        data_dir = self.root / f"..{stamp}.{os.getpid()}{next(self._serial):06d}"
        data_dir.mkdir()
        for name, content in files.items():
            target = data_dir / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content.encode() if isinstance(content, str) else content)
        link = self.root / "..data"
        previous = link.resolve() if link.is_symlink() else None
        temporary = self.root / "..data_tmp"
        temporary.unlink(missing_ok=True)
        temporary.symlink_to(data_dir.name)
        os.replace(temporary, link)
        top_level = {name.split("/", 1)[0] for name in files}
        for entry in self.root.iterdir():
            if not entry.name.startswith("..") and entry.name not in top_level:
                entry.unlink()
        for name in top_level:
            visible = self.root / name
            if not visible.is_symlink():
                visible.symlink_to(Path("..data") / name)
        if previous is not None and previous != data_dir.resolve():
            shutil.rmtree(previous, ignore_errors=True)
        return data_dir

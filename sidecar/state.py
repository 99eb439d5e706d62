"""The on-disk copy of the last known good snapshot (`--state-dir`).

A restarted sidecar whose sources are broken, or whose database is down, serves this
copy instead of nothing. It is written atomically (temporary file, fsync, rename, fsync
of the directory), so a crash mid-write leaves the previous copy intact, and it is read
back through the loader like any rule file, so it is validated again before it serves.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Final

from sidecar.documents import SourceFile
from sidecar.snapshot import Snapshot

__all__ = ["StateStore"]

_FILE_NAME: Final = "last-good.json"


class StateStore:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @property
    def path(self) -> Path:
        return self.directory / _FILE_NAME

    def save(self, snapshot: Snapshot) -> None:
        """Replace the saved copy with this snapshot's documents; raises OSError."""
        documents = [ruleset.to_document() for ruleset in snapshot.rulesets.values()]
        payload = json.dumps(documents, indent=1, sort_keys=True, ensure_ascii=False).encode()
        self.directory.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=".last-good.", dir=self.directory)
        try:
            with os.fdopen(handle, "wb") as file:
                file.write(payload)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        directory = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    def load(self) -> SourceFile | None:
        """The saved copy as a rule file, or None when there is none."""
        try:
            return SourceFile(str(self.path), self.path.read_bytes())
        except FileNotFoundError:
            return None

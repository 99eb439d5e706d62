"""Read rule files from paths, the way a ConfigMap-mounted directory must be read.

Kubernetes mounts a ConfigMap as `name -> ..data/name` symlinks, with `..data` itself a
symlink to a hidden timestamped directory that the kubelet swaps atomically. Hidden
entries are skipped and visible names are read through their symlinks, so each file is
read once, from the current `..data`. A symlink that leads outside the directory being
read is refused rather than followed.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from sidecar.documents import RULE_FILE_SUFFIXES, SourceFile
from sidecar.errors import LoadError, Problem

__all__ = ["is_rule_file", "read_rule_files"]


def is_rule_file(path: Path) -> bool:
    return path.suffix in RULE_FILE_SUFFIXES and not path.name.startswith(".")


def _walk(root: Path) -> Iterable[Path]:
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
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
        candidates = [root] if root.is_file() else list(_walk(root))
        boundary = (root if root.is_dir() else root.parent).resolve()
        for path in candidates:
            try:
                real = path.resolve(strict=True)
                if not real.is_relative_to(boundary):
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

"""The on-disk copy of the last known good snapshot (`--state-dir`).

A restarted sidecar whose sources are broken, or whose database is down, serves this
copy instead of nothing. The copy is read back through the loader like any rule files,
so it is validated again, under the loader's own per-file limits; it is therefore written
as many files, each well within those limits, and any registry the sidecar can serve
(10,000 rulesets, 100,000 rules and more) can be restored:

    state/
      manifest.json              which files make the copy, with the snapshot's revision
      rulesets/<sha256>.json     a JSON list of ruleset documents, named by its digest

Rulesets go to one of `_BUCKETS` buckets by a hash of their id, and a bucket's rulesets
fill as many files as the size target needs. A file's name is its content's digest, so
an unchanged bucket is the same file again and is not rewritten: a reload that changes
one ruleset of ten thousand writes one small file and the manifest.

Never torn: every new file is written under a temporary name, fsynced and renamed, then
the directory fsynced, and only then does the manifest change, the same way (one rename,
atomic). A crash at any moment leaves the previous manifest, whose files are all still
there (files no manifest names are removed only after the rename). Reading checks each
file against the digest in its name.

A copy that could not be restored (one ruleset larger, as JSON, than the loader accepts
in a file) is refused when it is written, with `StateError`: the previous copy stays, and
`status()` says so until a save succeeds.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import tempfile
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from sidecar.documents import parse_file
from sidecar.errors import LoadError, Problem, ProblemCode
from sidecar.model import RuleSet
from sidecar.rulefiles import DEFAULT_FILE_LIMITS, FileLimits, SourceFile
from sidecar.snapshot import Snapshot

__all__ = ["SaveStatus", "StateError", "StateStore"]

_MANIFEST: Final = "manifest.json"
_RULESETS: Final = "rulesets"
_LEGACY: Final = "last-good.json"  # before 2026-11-30: one file, read back once
_FORMAT: Final = 2
_BUCKETS: Final = 256
_TEMPORARY: Final = ".tmp."
# Files are filled to a quarter of the loader's size limit: small enough that one
# changed ruleset rewrites little, large enough that 100,000 rules are a few dozen files.
_TARGET_SHARE: Final = 4


class StateError(Exception):
    """The snapshot cannot be saved as a copy that would restore (nothing was changed)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SaveStatus:
    """The outcome of the last save, for status and metrics."""

    ok: bool | None = None  # None: nothing saved by this process yet
    revision: str | None = None  # of the copy on disk after the last successful save
    saved_at: datetime | None = None
    files: int = 0
    bytes: int = 0
    error: str | None = None
    failed_revision: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "last_save_successful": self.ok,
            "saved_revision": self.revision,
            "saved_at": self.saved_at.isoformat() if self.saved_at else None,
            "files": self.files,
            "bytes": self.bytes,
            "last_error": self.error,
            "failed_revision": self.failed_revision,
        }


class StateStore:
    """Saves and restores the copy. One writer at a time (the reload service's lock)."""

    def __init__(self, directory: Path, *, limits: FileLimits = DEFAULT_FILE_LIMITS) -> None:
        self.directory = directory
        self.limits = limits
        self._status = SaveStatus()
        # Serialized documents by ruleset digest: an unchanged ruleset is not dumped again.
        self._dumped: dict[str, bytes] = {}
        # Files of the copy as this store last wrote or checked them (see `_intact`).
        self._known: dict[Path, tuple[int, int, int, int]] = {}

    @property
    def manifest(self) -> Path:
        return self.directory / _MANIFEST

    def status(self) -> SaveStatus:
        return self._status

    def save(self, snapshot: Snapshot) -> None:
        """Replace the saved copy with this snapshot; raises `StateError` or `OSError`,
        leaving the previous copy whole either way."""
        try:
            files = self._files(snapshot.rulesets.values())
            self._write(snapshot, files)
        except (StateError, OSError) as exc:
            self._status = SaveStatus(
                ok=False,
                revision=self._status.revision,
                saved_at=self._status.saved_at,
                files=self._status.files,
                bytes=self._status.bytes,
                error=str(exc),
                failed_revision=snapshot.revision,
            )
            raise
        self._status = SaveStatus(
            ok=True,
            revision=snapshot.revision,
            saved_at=datetime.now(UTC),
            files=len(files),
            bytes=sum(len(content) for content in files.values()),
        )

    def load(self) -> list[SourceFile] | None:
        """The saved copy as rule files, or None when there is none; raises `LoadError`
        when the manifest or one of its files is missing, damaged or oversized."""
        try:
            manifest = self._read(self.manifest)
        except FileNotFoundError:
            legacy = self.directory / _LEGACY
            try:
                return [SourceFile(str(legacy), self._read(legacy))]
            except FileNotFoundError:
                return None
        return [self._saved_file(name) for name in self._listed(manifest)]

    def saved_summary(self) -> tuple[str, int] | None:
        """The revision and the number of rulesets the manifest says the copy holds
        (None: no manifest, or the earlier single-file format): a restore that gives
        anything else is not served."""
        try:
            data = json.loads(self._read(self.manifest))
        except (FileNotFoundError, LoadError, ValueError):
            return None
        if not isinstance(data, dict):
            return None
        revision, rulesets = data.get("revision"), data.get("rulesets")
        if not isinstance(revision, str) or not isinstance(rulesets, int):
            return None
        return revision, rulesets

    # Writing

    def _files(self, rulesets: Iterable[RuleSet]) -> dict[str, bytes]:
        """The copy's files by name, each within the loader's limits, or `StateError`."""
        dumped: dict[str, bytes] = {}
        buckets: dict[int, list[tuple[str, bytes]]] = {}
        for ruleset in rulesets:
            document = self._dumped.get(ruleset.digest) or _dump(ruleset)
            dumped[ruleset.digest] = document
            bucket = zlib.crc32(ruleset.id.encode()) % _BUCKETS
            buckets.setdefault(bucket, []).append((ruleset.id, document))
        self._dumped = dumped
        target = max(1, self.limits.max_bytes // _TARGET_SHARE)
        files: dict[str, bytes] = {}
        for bucket in sorted(buckets):
            for content in _pack(sorted(buckets[bucket]), target, self.limits):
                name = f"{_RULESETS}/{hashlib.sha256(content).hexdigest()}.json"
                if not (self.directory / name).exists():
                    _check_restores(content, self.limits)
                files[name] = content
        return files

    def _write(self, snapshot: Snapshot, files: dict[str, bytes]) -> None:
        rulesets_dir = self.directory / _RULESETS
        if not rulesets_dir.is_dir():
            rulesets_dir.mkdir(parents=True)
            _fsync_directory(self.directory)  # the folder is there before any file in it
        manifest = {
            "format": _FORMAT,
            "revision": snapshot.revision,
            "rulesets": len(snapshot.rulesets),
            "rules": len(snapshot.rules),
            "files": sorted(files),
        }
        created: list[Path] = []
        try:
            for name, content in files.items():
                path = self.directory / name
                if self._intact(path, content):
                    continue
                _write_atomically(rulesets_dir, path, content)
                self._remember(path)
                created.append(path)
            if created:
                _fsync_directory(rulesets_dir)
            text = json.dumps(manifest, indent=1).encode() + b"\n"
            _write_atomically(self.directory, self.manifest, text)
        except OSError:
            for path in created:  # a full disk is not made fuller by a copy never used
                path.unlink(missing_ok=True)
            raise
        _fsync_directory(self.directory)
        self._remove_unlisted(set(files))

    def _intact(self, path: Path, content: bytes) -> bool:
        """Whether `path` holds `content`. The name is the content's digest, but a file
        edited, damaged or made unreadable since keeps its name: unless it is exactly as
        this store last wrote or checked it, it is read and compared."""
        try:
            if self._known.get(path) == _stamp(os.stat(path)):
                return True
            if self._read(path) != content:
                return False
        except (OSError, LoadError):
            return False
        self._remember(path)
        return True

    def _remember(self, path: Path) -> None:
        with contextlib.suppress(OSError):
            self._known[path] = _stamp(os.stat(path))

    def _remove_unlisted(self, listed: set[str]) -> None:
        """Files the manifest no longer names, temporary files of a crashed save, and
        the single file of the old format. Best effort: the new copy is already whole,
        and whatever stays is tried again at the next save."""
        unlisted = [
            path
            for path in _entries(self.directory / _RULESETS)
            if f"{_RULESETS}/{path.name}" not in listed
        ]
        unlisted += [
            path
            for path in _entries(self.directory)
            if path.name.startswith(_TEMPORARY) or path.name == _LEGACY
        ]
        for path in unlisted:
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)

    # Reading

    def _read(self, path: Path) -> bytes:
        """A file of the copy: a regular file (a FIFO would block the restart, a device
        never end), refused by its size before it is read. Not there: FileNotFoundError;
        not readable (EACCES, EIO, ...): `LoadError`, like any other bad copy."""
        try:
            handle = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise LoadError([_damaged(path, f"cannot be read ({exc.strerror})")]) from None
        try:
            info = os.fstat(handle)
            if not stat.S_ISREG(info.st_mode):
                raise LoadError([_damaged(path, "not a regular file")])
            if info.st_size > self.limits.max_bytes:
                raise LoadError([_damaged(path, f"more than {self.limits.max_bytes} bytes")])
            with open(handle, "rb", closefd=False) as file:
                content = file.read(self.limits.max_bytes + 1)
        except OSError as exc:
            raise LoadError([_damaged(path, f"cannot be read ({exc.strerror})")]) from None
        finally:
            os.close(handle)
        if len(content) > self.limits.max_bytes:  # grew since the fstat
            raise LoadError([_damaged(path, f"more than {self.limits.max_bytes} bytes")])
        return content

    def _listed(self, manifest: bytes) -> list[str]:
        try:
            data = json.loads(manifest)
            names = data["files"]
            if data["format"] != _FORMAT or not all(
                isinstance(name, str) and _is_file_name(name) for name in names
            ):
                raise ValueError("unknown format")
        except (ValueError, KeyError, TypeError) as exc:
            raise LoadError([_damaged(self.manifest, f"not a manifest ({exc})")]) from None
        return list(names)

    def _saved_file(self, name: str) -> SourceFile:
        path = self.directory / name
        try:
            content = self._read(path)
        except FileNotFoundError:
            raise LoadError([_damaged(path, "missing")]) from None
        if hashlib.sha256(content).hexdigest() != Path(name).stem:
            raise LoadError([_damaged(path, "its content does not match its digest")])
        # Generated text: positions would mean nothing (problems name ruleset and rule).
        return SourceFile(str(path), content, located=False)


def _entries(directory: Path) -> list[Path]:
    try:
        return list(directory.iterdir())
    except OSError:
        return []


def _dump(ruleset: RuleSet) -> bytes:
    return json.dumps(
        ruleset.to_document(), ensure_ascii=False, separators=(",", ":"), sort_keys=True
    ).encode()


def _pack(documents: Sequence[tuple[str, bytes]], target: int, limits: FileLimits) -> list[bytes]:
    """Documents (in id order) as JSON lists of at most `target` bytes each (one larger
    document alone); `StateError` for a document no file could hold."""
    files: list[bytes] = []
    batch: list[bytes] = []
    size = 0
    for ruleset_id, document in documents:
        if batch and (size + len(document) > target or len(batch) >= limits.max_documents):
            files.append(_joined(batch))
            batch, size = [], 0
        batch.append(document)
        size += len(document) + 2
        if len(document) + 4 > limits.max_bytes:
            raise StateError(
                f"ruleset {ruleset_id!r} is {len(document)} bytes as JSON, more than the "
                f"{limits.max_bytes} a rule file may hold: a copy could not be restored"
            )
    if batch:
        files.append(_joined(batch))
    return files


def _check_restores(content: bytes, limits: FileLimits) -> None:
    """What the loader's first stage will say of this file, said now."""
    _, problems = parse_file(SourceFile("state.json", content, located=False), limits)
    if problems:
        raise StateError(f"the copy would not restore: {problems[0].message}")


def _joined(documents: list[bytes]) -> bytes:
    return b"[\n" + b",\n".join(documents) + b"\n]\n"


def _is_file_name(name: str) -> bool:
    folder, _, file = name.partition("/")
    stem, _, suffix = file.partition(".")
    return (
        folder == _RULESETS
        and suffix == "json"
        and len(stem) == 64
        and all(c in "0123456789abcdef" for c in stem)
    )


def _damaged(path: Path, why: str) -> Problem:
    return Problem(
        file=str(path),
        message=f"the saved copy is damaged: {why}",
        code=ProblemCode.STATE_DAMAGED,
    )


def _stamp(info: os.stat_result) -> tuple[int, int, int, int]:
    """What changes when a file is edited, replaced or has its permissions changed."""
    return info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns


def _write_atomically(directory: Path, path: Path, content: bytes) -> None:
    """Whole or not at all under `path` (the directory's own fsync is the caller's)."""
    handle, temporary = tempfile.mkstemp(prefix=_TEMPORARY, dir=directory)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(content)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _fsync_directory(directory: Path) -> None:
    handle = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)

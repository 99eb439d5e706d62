"""Read rule files from paths, the way a ConfigMap-mounted directory must be read.

Kubernetes mounts a ConfigMap as `name -> ..data/name` symlinks, with `..data` itself a
symlink to a hidden timestamped directory that the kubelet swaps atomically. Hidden
entries are skipped and visible names are read through their symlinks, so each file is
read once, from the current `..data`. A symlink that leads outside the directory being
read is refused rather than followed.

A read is complete or it fails. A directory that cannot be listed (permissions, no file
descriptors left, an I/O error) is an error, never an empty directory: only a listing
that succeeded may make a file's rules disappear. Only regular files are read (a FIFO
would block the reader forever, a device never ends), and a file's size is checked
before a byte of it is read.

A command line is different: a path it names is what its user means to be read, even a
FIFO, `/dev/stdin` or a process substitution's `/dev/fd/N`, and `-` is standard input.
`read_streams=True` reads those, bounded by the same size limit; directories named on
a command line are still walked for regular files only.
"""

from __future__ import annotations

import asyncio
import os
import stat
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import watchfiles
from watchfiles import Change

from sidecar.errors import LoadError, Problem, ProblemCode
from sidecar.rulefiles import DEFAULT_FILE_LIMITS, RULE_FILE_SUFFIXES, SourceFile

__all__ = ["STDIN", "DirectorySource", "collect_rule_files", "is_rule_file", "read_rule_files"]

STDIN: Final = "-"
_STDIN_NAME: Final = "<stdin>"
_STDIN_FD: Final = 0
_CHUNK: Final = 64 * 1024

# Opened without blocking (a FIFO swapped in between the check and the open would block
# in open() itself) and without handing the descriptor to child processes.
_OPEN_FLAGS: Final = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC
_KINDS: Final = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


class _Unreadable(Exception):
    """One path that cannot be read completely; collected into a `LoadError`."""

    def __init__(self, path: str, message: str, code: ProblemCode) -> None:
        super().__init__(message)
        self.problem = Problem(file=path, message=message, code=code)


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _failure(path: str | Path, exc: OSError | RuntimeError) -> _Unreadable:
    """A failed open, stat or read (RuntimeError: a symlink loop met by `resolve`)."""
    missing = isinstance(exc, FileNotFoundError)
    code = ProblemCode.READ_NOT_FOUND if missing else ProblemCode.READ_FAILED
    reason = _reason(exc) if isinstance(exc, OSError) else str(exc)
    return _Unreadable(str(path), f"cannot read: {reason}", code)


def is_rule_file(path: Path) -> bool:
    return path.suffix.lower() in RULE_FILE_SUFFIXES and not path.name.startswith(".")


def _walk(root: Path) -> Iterator[Path]:
    """Rule files below `root`, following directory symlinks but never into a loop.

    Raises `_Unreadable` for the first directory that cannot be listed (a skipped
    directory would look like deleted rules) or that a symlink leads out of `root` to.
    """

    def fail(exc: OSError) -> None:
        where = str(exc.filename or root)
        raise _Unreadable(where, f"cannot list: {_reason(exc)}", ProblemCode.READ_FAILED)

    boundary = root.resolve()
    try:
        yield from _walk_below(root, boundary, fail)
    except RecursionError:
        message = "cannot list: the directory tree is too deep"
        raise _Unreadable(str(root), message, ProblemCode.LIMIT_DEPTH) from None


def _walk_below(root: Path, boundary: Path, fail: Callable[[OSError], None]) -> Iterator[Path]:
    visited: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, onerror=fail, followlinks=True):
        try:
            info = os.stat(dirpath)
        except OSError as exc:
            fail(exc)
        if (info.st_dev, info.st_ino) in visited:
            dirnames[:] = []
            continue
        visited.add((info.st_dev, info.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in dirnames:
            _refuse_outside(Path(dirpath, name), boundary)
        for filename in sorted(filenames):
            path = Path(dirpath, filename)
            if is_rule_file(path):
                yield path


def _check_regular(path: Path, info: os.stat_result, max_bytes: int | None) -> None:
    if not stat.S_ISREG(info.st_mode):
        kind = _KINDS.get(stat.S_IFMT(info.st_mode), "not a regular file")
        message = f"cannot read: {kind}, not a regular file"
        raise _Unreadable(str(path), message, ProblemCode.READ_NOT_REGULAR)
    if max_bytes is not None and info.st_size > max_bytes:
        message = f"file is {info.st_size} bytes, the limit is {max_bytes}: not read"
        raise _Unreadable(str(path), message, ProblemCode.READ_TOO_LARGE)


def _refuse_outside(path: Path, boundary: Path) -> None:
    """A directory symlink out of the rules directory is refused, not walked: it could
    lead anywhere (`/sys` took seconds per read) and its files would be refused anyway."""
    if path.is_symlink() and not path.resolve().is_relative_to(boundary):
        message = f"symlink leads outside {boundary}: refused"
        raise _Unreadable(str(path), message, ProblemCode.READ_OUTSIDE_ROOT)


def _read_regular(path: Path, real: Path, max_bytes: int | None) -> SourceFile:
    """The file's bytes, if it is a regular file within the size limit. Checked before
    opening (opening a device can have effects of its own) and again on the open
    descriptor (the name may have been swapped in between)."""
    try:
        _check_regular(path, os.stat(real), max_bytes)
        fd = os.open(real, _OPEN_FLAGS)
    except OSError as exc:
        raise _failure(path, exc) from None
    with os.fdopen(fd, "rb") as handle:
        _check_regular(path, os.fstat(fd), max_bytes)
        try:
            content = handle.read(-1 if max_bytes is None else max_bytes + 1)
        except OSError as exc:
            raise _failure(path, exc) from None
    if max_bytes is not None and len(content) > max_bytes:  # it grew while being read
        message = f"file grew past the limit of {max_bytes} bytes"
        raise _Unreadable(str(path), message, ProblemCode.READ_TOO_LARGE)
    return SourceFile(str(path), content)


def _read_stream(name: str, fd: int, max_bytes: int | None) -> bytes:
    """Everything `fd` gives until its end, refused past `max_bytes` (a device such as
    /dev/zero never ends: it is read up to the limit, not further)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        try:
            chunk = os.read(fd, _CHUNK)
        except OSError as exc:
            raise _failure(name, exc) from None
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if max_bytes is not None and size > max_bytes:
            message = f"more than {max_bytes} bytes, the limit: not read"
            raise _Unreadable(name, message, ProblemCode.READ_TOO_LARGE)
        chunks.append(chunk)


def _read_named(given: str | Path, max_bytes: int | None) -> SourceFile:
    """A path named on a command line, whatever it is but a directory; `-` is standard
    input. Opened blocking: a FIFO waits for its writer, as `cat` would."""
    if str(given) == STDIN:
        return SourceFile(_STDIN_NAME, _read_stream(_STDIN_NAME, _STDIN_FD, max_bytes))
    name = str(given)
    try:
        fd = os.open(given, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        message = "no such file or directory"
        raise _Unreadable(name, message, ProblemCode.READ_NOT_FOUND) from None
    except OSError as exc:
        raise _failure(name, exc) from None
    try:
        info = os.fstat(fd)
        if stat.S_ISREG(info.st_mode):
            _check_regular(Path(name), info, max_bytes)
        return SourceFile(name, _read_stream(name, fd, max_bytes))
    finally:
        os.close(fd)


def _is_directory(path: Path) -> bool:
    """False also when it cannot be told: opening the path then says why."""
    try:
        return stat.S_ISDIR(os.stat(path).st_mode)
    except OSError:
        return False


def _candidates(root: Path) -> tuple[bool, list[Path]]:
    """Whether `root` was named as a file, and the files to read under it."""
    try:
        info = root.stat()
    except FileNotFoundError:
        message = "no such file or directory"
        raise _Unreadable(str(root), message, ProblemCode.READ_NOT_FOUND) from None
    except (OSError, RuntimeError) as exc:
        raise _failure(root, exc) from None
    if stat.S_ISDIR(info.st_mode):
        return False, list(_walk(root))
    return True, [root]


def read_rule_files(
    paths: Iterable[str | Path],
    *,
    max_bytes: int | None = DEFAULT_FILE_LIMITS.max_bytes,
    read_streams: bool = False,
) -> list[SourceFile]:
    """Every rule file under `paths` (files or directories), or `LoadError` naming each
    path that cannot be read completely."""
    files, problems = collect_rule_files(paths, max_bytes=max_bytes, read_streams=read_streams)
    if problems:
        raise LoadError(problems)
    return files


def collect_rule_files(
    paths: Iterable[str | Path],
    *,
    max_bytes: int | None = DEFAULT_FILE_LIMITS.max_bytes,
    read_streams: bool = False,
) -> tuple[list[SourceFile], list[Problem]]:
    """The rule files under `paths` that could be read, and a problem for each path that
    could not be read completely (a caller that serves rules must use neither half alone).

    `read_streams`: the paths were named on a command line, so `-` and any path that is
    not a directory (a FIFO, `/dev/stdin`, `/dev/fd/N`) are read as given.
    """
    files: list[SourceFile] = []
    problems: list[Problem] = []
    for given in paths:
        root = Path(given)
        try:
            if read_streams and (str(given) == STDIN or not _is_directory(root)):
                files.append(_read_named(given, max_bytes))
                continue
            explicit, candidates = _candidates(root)
        except _Unreadable as exc:
            problems.append(exc.problem)
            continue
        # A file named explicitly is read wherever its symlink leads; files found by
        # walking a directory must stay inside it.
        boundary = root.resolve()
        for path in candidates:
            try:
                real = path.resolve(strict=True)
                if not explicit and not real.is_relative_to(boundary):
                    message = f"symlink leads outside {boundary}: refused"
                    raise _Unreadable(str(path), message, ProblemCode.READ_OUTSIDE_ROOT)
                files.append(_read_regular(path, real, max_bytes))
            except _Unreadable as exc:
                problems.append(exc.problem)
            except (OSError, RuntimeError) as exc:
                problems.append(_failure(path, exc).problem)
    return files, problems


_EDITOR_DEBRIS: Final = (".swp", ".swx", "~", ".tmp")
# watchfiles looks for events every `step` ms and yields them once a step passes with
# none new: a change is seen 1-2 steps after it happens. bench/change_to_live.py, a
# ConfigMap swap to the new rules answering: p50 23 ms at 10 ms, 18 at 5, 14 at 3, 11
# at 2; the watcher's thread wakes once a step, an idle sidecar 0.6% of a core at 3-10
# ms, 1.4% at 2.
_WATCH_STEP_MS: Final = 3
_STABLE_READ_ATTEMPTS: Final = 5
_EMPTIED_CONFIRM_SECONDS: Final = 0.5


def _relevant(change: Change, path: str) -> bool:
    """Everything but editor swap files: the kubelet's swap shows up only as `..data`."""
    name = os.path.basename(path)
    return not (name.endswith(_EDITOR_DEBRIS) or name == "4913")


@dataclass(frozen=True, slots=True)
class _Stamp:
    mtime_ns: int
    size: int
    # Reached through the kubelet's `..data` symlink: written in full before the link
    # was swapped to it (its AtomicWriter), so there is no partial write to wait out.
    published: bool = False


_PUBLISHED_LINK: Final = "..data"


def _fingerprint(root: Path) -> dict[str, _Stamp | None]:
    """Every rule file's modification time and size; raises `_Unreadable`."""
    stamps: dict[str, _Stamp | None] = {}
    published = os.path.islink(root / _PUBLISHED_LINK)
    for path in _walk(root):
        try:
            info = os.stat(path)
            stamps[str(path)] = _Stamp(
                info.st_mtime_ns, info.st_size, published and _through_published_link(root, path)
            )
        except OSError:
            stamps[str(path)] = None
    return stamps


def _through_published_link(root: Path, path: Path) -> bool:
    """`path` is reached through a symlink into `root/..data`, as a ConfigMap volume's
    keys are (a key, or the first directory of an item's `path`)."""
    try:
        target = os.readlink(root / path.relative_to(root).parts[0])
    except (OSError, ValueError, IndexError):  # not a symlink: written in place
        return False
    return Path(target).parts[:1] == (_PUBLISHED_LINK,)


def _identity(root: Path) -> tuple[int, int] | None:
    try:
        info = root.stat()
    except OSError:
        return None
    return info.st_dev, info.st_ino


class DirectorySource:
    """A rules directory, such as a ConfigMap mount, watched for changes.

    The directory is watched, never the files: a watch on a file dies at the first
    ConfigMap swap. A file is handed to the loader only once it has settled: a file
    whose size or mtime moves during the read, or that was modified within the debounce
    window, is read again; a file that was not empty at the last read and is empty now
    must still be empty half a second later. So the gap between an in-place rewrite's
    truncate and its write is not read as "this ruleset was deleted", even on a loaded
    machine. A directory that keeps changing fails the read (the next change event
    reads it again).
    """

    def __init__(
        self,
        root: Path,
        *,
        debounce_ms: int = 50,
        force_polling: bool | None = None,
        max_bytes: int = DEFAULT_FILE_LIMITS.max_bytes,
    ) -> None:
        self.root = root
        self._debounce_ms = debounce_ms
        self._settle_ns = max(debounce_ms, 50) * 1_000_000
        self._force_polling = force_polling
        self._max_bytes = max_bytes
        self._replaced = False
        self._nonempty: set[str] = set()  # files that had content at the last read

    @property
    def name(self) -> str:
        return f"files:{self.root}"

    def read(self) -> list[SourceFile]:
        emptied_seen: dict[str, _Stamp | None] = {}
        for _ in range(_STABLE_READ_ATTEMPTS):
            try:
                before = _fingerprint(self.root)
            except _Unreadable as exc:
                raise LoadError([exc.problem]) from None
            unsettled = self._unsettled(before)
            if unsettled:
                time.sleep(unsettled / 1e9)
                continue
            files = read_rule_files([self.root], max_bytes=self._max_bytes)
            try:
                if _fingerprint(self.root) != before:
                    time.sleep(self._settle_ns / 1e9)
                    continue
            except _Unreadable as exc:
                raise LoadError([exc.problem]) from None
            published = {name for name, stamp in before.items() if stamp and stamp.published}
            emptied = {
                f.name: before.get(f.name)
                for f in files
                if not f.content and f.name in self._nonempty and f.name not in published
            }
            if emptied and emptied != emptied_seen:
                # Empty now, not at the last read: the gap between an in-place rewrite's
                # truncate and its write, unless it stays empty and untouched a moment.
                emptied_seen = emptied
                time.sleep(_EMPTIED_CONFIRM_SECONDS)
                continue
            self._nonempty = {f.name for f in files if f.content}
            return files
        problem = Problem(
            file=str(self.root),
            message=f"files kept changing during {_STABLE_READ_ATTEMPTS} reads; "
            "read again at the next change",
            code=ProblemCode.READ_UNSTABLE,
        )
        raise LoadError([problem])

    def _unsettled(self, stamps: dict[str, _Stamp | None]) -> int:
        """Nanoseconds until the most recently modified file has settled (0: all have).

        An mtime in the future (a clock step, an archive's stamps) says nothing about a
        write in progress and is not waited for."""
        now = time.time_ns()
        recent = [
            s.mtime_ns
            for s in stamps.values()
            if s is not None and not s.published and now - self._settle_ns < s.mtime_ns <= now
        ]
        return max(recent, default=now - self._settle_ns) + self._settle_ns - now

    def forget(self) -> None:
        """Nothing to drop: every read reads every file in full (the stamps taken during
        a read only tell whether files settled, and are not kept). What was seen non-empty
        is kept: forgetting it would let a forced read take the gap of an in-place
        rewrite for a deleted ruleset."""

    def watch_problem(self) -> str | None:
        if not self.root.is_dir():
            return f"no such directory: {self.root}"
        if self._replaced:
            return f"{self.root} was replaced; watching the new directory"
        return None

    async def changes(self) -> AsyncIterator[str]:
        """Change events; the watch follows the directory when it is deleted and made
        again (an inotify watch stays on the old, deleted directory). The directory's
        deletion event says so: a new directory can reuse the old one's inode number."""
        root = os.path.abspath(self.root)
        while True:
            while _identity(self.root) is None:
                await asyncio.sleep(0.5)
            watched = _identity(self.root)
            # What changed before this watch was in place (since the startup's read, or
            # while a replaced directory was followed) is covered by one more reload.
            catch_up, self._replaced = True, False
            async for batch in watchfiles.awatch(
                self.root,
                watch_filter=_relevant,
                debounce=self._debounce_ms,
                step=_WATCH_STEP_MS,
                rust_timeout=1_000,
                yield_on_timeout=True,
                force_polling=self._force_polling,
                recursive=True,
            ):
                gone = any(
                    change is Change.deleted and os.path.abspath(path) == root
                    for change, path in batch
                )
                if gone or _identity(self.root) != watched:
                    self._replaced = True
                    yield "the directory was replaced"
                    break
                if batch or catch_up:
                    catch_up = False
                    yield f"watch: {len(batch)} change(s)"

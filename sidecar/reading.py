"""Reading every source of a service: files, per-source status, drift and watch problems.

Whatever a source's code does (raises anything, returns something other than rule
files, hangs), the read ends as files or as problems naming the source: never fewer
files, never a crash. Reads run in a daemon thread of their own, one at a time.

What a source keeps between reads (a watch, a fingerprint, row versions) is an
optimisation, never the only truth: a fresh read makes each source `forget` first, and
a verifying read reads each source twice, as usual and after `forget`, so content the
usual read missed is found and named (drift).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Final, overload

from sidecar.errors import LoadError, Problem, ProblemCode
from sidecar.rulefiles import SourceFile
from sidecar.snapshot import Snapshot
from sidecar.sources import RuleSource, in_daemon_thread

__all__ = ["ReadMode", "SourceRead", "SourceSet", "SourceStatus", "reason"]

logger = logging.getLogger("sidecar.service")

# A message quoting what a source's code raised is cut to this many characters.
_MAX_REASON: Final = 500
# A drift warning names this many files at most.
_NAMED_FILES: Final = 5
# A watch whose code raised restarts after 1 s, doubling up to this.
_MAX_WATCH_BACKOFF: Final = 30.0


class ReadMode(StrEnum):
    """How the sources are read for one reload."""

    USUAL = "usual"  # with whatever each source keeps between reads
    FRESH = "fresh"  # each source forgets first: a forced reload, SIGHUP
    VERIFY = "verify"  # usual, then fresh; a difference between the two is drift


@dataclass(slots=True)
class SourceStatus:
    """Per-source state, OPA-style: when it was last asked and what it said."""

    name: str
    last_request: datetime | None = None
    last_successful_read: datetime | None = None
    files: int = 0
    message: str | None = None
    errors: tuple[Problem, ...] = ()
    drift: int = 0  # verifications that found what the usual read missed
    last_drift: str | None = None

    def set_error(self, problems: Sequence[Problem] | None) -> None:
        self.errors = tuple(problems or ())
        self.message = f"{len(self.errors)} problem(s)" if self.errors else None


@dataclass(frozen=True, slots=True)
class SourceRead:
    """One read of every source: the files, or the problems of the sources that failed."""

    files: tuple[SourceFile, ...]
    problems: tuple[Problem, ...]
    owners: Mapping[str, str]  # file name -> the source that gave it


def reason(exc: BaseException) -> str:
    """What a source's code raised, in one bounded line."""
    text = " ".join(str(exc).split())
    if len(text) > _MAX_REASON:
        text = text[: _MAX_REASON - 1] + "…"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _rule_files(source: RuleSource, files: object) -> list[SourceFile]:
    """`read()`'s answer, checked: a source's bug is its own failure, not the loader's."""
    if not isinstance(files, list | tuple):
        raise TypeError(f"read() returned {type(files).__name__}, not a list of rule files")
    for item in files:
        if not isinstance(item, SourceFile):
            raise TypeError(f"read() returned a {type(item).__name__} among its rule files")
    return list(files)


def _difference(usual: Sequence[SourceFile], full: Sequence[SourceFile]) -> str | None:
    """Which files a full read gives otherwise than the usual one; None: the same."""
    before = {file.name: file.content for file in usual}
    after = {file.name: file.content for file in full}
    changed = sorted(
        [
            f"{name} (changed)"
            for name in before.keys() & after.keys()
            if before[name] != after[name]
        ]
        + [f"{name} (missed)" for name in after.keys() - before.keys()]
        + [f"{name} (gone)" for name in before.keys() - after.keys()]
    )
    if not changed:
        return None
    named = ", ".join(changed[:_NAMED_FILES])
    more = f" and {len(changed) - _NAMED_FILES} more" if len(changed) > _NAMED_FILES else ""
    return f"{len(changed)} file(s) differ from the usual read: {named}{more}"


def _read_one(source: RuleSource, mode: ReadMode) -> tuple[list[SourceFile], str | None]:
    """One source's files, and (verifying) how its usual read differed from a full one."""
    usual: list[SourceFile] | None = None
    if mode is ReadMode.VERIFY:
        usual = _rule_files(source, source.read())
    if mode is not ReadMode.USUAL:
        source.forget()
    files = _rule_files(source, source.read())
    return files, None if usual is None else _difference(usual, files)


class SourceSet(Sequence[RuleSource]):
    """The sources one service reads, with what each said last time."""

    def __init__(self, sources: Sequence[RuleSource]) -> None:
        self._sources = tuple(sources)
        self.statuses = {source.name: SourceStatus(source.name) for source in self._sources}
        # Why a watch is down because the source's own code raised (by source name).
        self._watch_failures: dict[str, str] = {}
        # What each source gave at its last successful read (a write validates its
        # result with the other sources' files as they were last read).
        self._last_files: dict[str, tuple[SourceFile, ...]] = {}
        # One read at a time, also when the reload that started one was cancelled
        # (monitoring stopped, shutdown) while its thread still reads.
        self._reading = threading.Lock()

    @overload
    def __getitem__(self, index: int) -> RuleSource: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[RuleSource]: ...
    def __getitem__(self, index: int | slice) -> RuleSource | Sequence[RuleSource]:
        return self._sources[index]

    def __len__(self) -> int:
        return len(self._sources)

    @property
    def drift(self) -> dict[str, int]:
        """Per source, how many verifications found what its usual read missed."""
        return {name: status.drift for name, status in self.statuses.items()}

    async def read(
        self, mode: ReadMode, *, on_source: Callable[[str], None] = lambda _name: None
    ) -> SourceRead:
        """Every source's files, read in a daemon thread; `on_source` hears each source's
        name as its read begins (the first load's health says what it waits for)."""
        return await in_daemon_thread(functools.partial(self.read_blocking, mode, on_source))

    def read_blocking(self, mode: ReadMode, on_source: Callable[[str], None]) -> SourceRead:
        """`read`, in the calling thread. A source that cannot be read completely, for
        whatever reason, gives its problems instead: never fewer files."""
        files: list[SourceFile] = []
        problems: list[Problem] = []
        owners: dict[str, str] = {}
        with self._reading:
            for source in self._sources:
                status = self.statuses[source.name]
                status.last_request = datetime.now(UTC)
                on_source(source.name)
                try:
                    source_files, drift = _read_one(source, mode)
                except LoadError as exc:
                    status.set_error(exc.problems)
                    problems.extend(exc.problems)
                    continue
                except Exception as exc:
                    if not isinstance(exc, OSError):
                        logger.exception("reading %s failed unexpectedly", source.name)
                    problem = Problem(
                        file=source.name,
                        message=f"cannot read source: {reason(exc)}",
                        code=ProblemCode.SOURCE_UNAVAILABLE,
                    )
                    status.set_error([problem])
                    problems.append(problem)
                    continue
                if drift is not None:
                    self._record_drift(status, drift)
                status.last_successful_read = datetime.now(UTC)
                status.files = len(source_files)
                status.set_error(None)
                self._last_files[source.name] = tuple(source_files)
                files.extend(source_files)
                owners.update((file.name, source.name) for file in source_files)
        return SourceRead(tuple(files), tuple(problems), owners)

    def files_of(self, name: str) -> tuple[SourceFile, ...]:
        """The files source `name` gave at its last successful read."""
        return self._last_files.get(name, ())

    def last_read(self, replacing: str, files: Sequence[SourceFile]) -> SourceRead:
        """Every source as last read, but `replacing`, which gives `files`: the files of
        each one's last successful read, and the problems of those whose last read
        failed (read again, they would fail again)."""
        found: list[SourceFile] = []
        problems: list[Problem] = []
        owners: dict[str, str] = {}
        for source in self._sources:
            if source.name == replacing:
                given = tuple(files)
            else:
                problems.extend(self.statuses[source.name].errors)
                given = self._last_files.get(source.name, ())
            found.extend(given)
            owners.update((file.name, source.name) for file in given)
        return SourceRead(tuple(found), tuple(problems), owners)

    def rulesets_per_source(self, snapshot: Snapshot | None, read: SourceRead) -> dict[str, int]:
        """How many of `snapshot`'s rulesets each source gave in `read`."""
        counts = {source.name: 0 for source in self._sources}
        for ruleset in snapshot.rulesets.values() if snapshot else ():
            owner = read.owners.get(ruleset.location.file if ruleset.location else "")
            if owner is not None:
                counts[owner] += 1
        return counts

    def watch_problems(self) -> dict[str, str]:
        """Sources whose changes may go unnoticed now. A watch that raised, or a
        `watch_problem()` that raises, is a problem too."""
        found: dict[str, str] = {}
        for source in self._sources:
            try:
                problem = source.watch_problem()
            except Exception as exc:
                problem = f"watch_problem() raised {reason(exc)}"
            problem = problem or self._watch_failures.get(source.name)
            if problem is not None:
                found[source.name] = str(problem)
        return found

    async def watch(self, source: RuleSource, on_change: Callable[[], None]) -> None:
        """Call `on_change` at each change of `source`; a watch whose code raises is a
        watch problem until it yields again, and its restart calls `on_change` (whatever
        changed meanwhile went unseen)."""
        backoff = 1.0
        while True:
            try:
                async for _change in source.changes():
                    self._watch_failures.pop(source.name, None)
                    on_change()
                    backoff = 1.0
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.exception("watching %s failed; retrying in %.0f s", source.name, backoff)
                self._watch_failures[source.name] = (
                    f"the watch raised {reason(exc)}; retrying in {backoff:.0f} s"
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _MAX_WATCH_BACKOFF)
                on_change()

    @staticmethod
    def _record_drift(status: SourceStatus, difference: str) -> None:
        status.drift += 1
        status.last_drift = difference
        logger.warning(
            "verification: %s held other content than its usual read gave, so a change "
            "signal was lost; loading what the full read found. %s",
            status.name,
            difference,
        )

"""Rule sources: each produces the complete set of rule files it currently holds.

A source never validates anything: it reads (`read`, blocking, run in a worker thread)
and says when it may have changed (`changes`). The reload service does the rest, the same
way for every source. `in_daemon_thread` runs such blocking work for the event loop.

A source may keep what it read to make the next read cheap (a fingerprint, row versions,
a watch-fed cache). Those are optimisations, never the only truth: `forget` drops them,
and a forced reload, SIGHUP and the periodic verification call it before reading.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Protocol, TypeVar, runtime_checkable

from sidecar.rulefiles import SourceFile

__all__ = ["RowVersioned", "RuleSource", "StaticSource", "in_daemon_thread"]

_T = TypeVar("_T")


@runtime_checkable
class RuleSource(Protocol):
    """What the reload service needs from a source of rule files."""

    @property
    def name(self) -> str: ...

    def read(self) -> list[SourceFile]:
        """Every file the source holds now; raises `LoadError` when it cannot be read."""
        ...

    def changes(self) -> AsyncIterator[str]:
        """Yields a short reason each time the source may have changed; ends when closed."""
        ...

    def watch_problem(self) -> str | None:
        """Why changes may go unnoticed right now (a lost listener, a stalled watch)."""
        ...

    def forget(self) -> None:
        """Drop every cache and fingerprint: the next `read()` reads everything from
        scratch (called in the reading thread, never during a read)."""
        ...


@runtime_checkable
class RowVersioned(Protocol):
    """A source whose rulesets carry a row version (the database): the API's ETag and
    If-Match of a ruleset."""

    def row_versions(self) -> dict[str, int]:
        """Each ruleset's row version as of the last read."""
        ...


class StaticSource:
    """An in-memory source: tests and embedders swap its files with `set_files`.

    Call `set_files` from the event loop's thread: it wakes `changes()` like a watcher.
    """

    def __init__(self, files: Sequence[SourceFile] = (), *, name: str = "static") -> None:
        self._files = list(files)
        self._name = name
        self._changed = asyncio.Event()

    @property
    def name(self) -> str:
        return self._name

    def set_files(self, files: Sequence[SourceFile]) -> None:
        self._files = list(files)
        self._changed.set()

    def read(self) -> list[SourceFile]:
        return list(self._files)

    def watch_problem(self) -> str | None:
        return None

    def forget(self) -> None:
        """Nothing is cached: every read is a full one."""

    async def changes(self) -> AsyncIterator[str]:
        while True:
            await self._changed.wait()
            self._changed.clear()
            yield "set_files"


async def in_daemon_thread(call: Callable[[], _T]) -> _T:
    """`call()` in a daemon thread of its own, awaited.

    Source reads wait on other systems (a frozen database waits until the read's own
    deadline). `asyncio.to_thread` would run them in the loop's executor, whose threads
    are joined when the loop closes and again at interpreter exit: SIGTERM during such
    a read waited for the whole read timeout. Nothing waits for a daemon thread."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[_T] = loop.create_future()

    def settle(outcome: Callable[[], None]) -> None:
        if not future.done():
            outcome()

    def run() -> None:
        outcome: Callable[[], None]
        try:
            result = call()
        except BaseException as exc:  # handed to the awaiting task, which decides
            outcome = functools.partial(future.set_exception, exc)
        else:
            outcome = functools.partial(future.set_result, result)
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody awaits it
            loop.call_soon_threadsafe(settle, outcome)

    threading.Thread(target=run, name="source read", daemon=True).start()
    return await future

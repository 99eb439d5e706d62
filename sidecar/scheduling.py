"""When background reloads run: at each change a watch sees, at each resync (sooner
while the last reload failed), at each verification, and when asked (SIGHUP).

Requests that arrive while a reload runs coalesce into one more reload after it, with
every trigger that asked: a burst of watch events is one reload, not one per event. The
reload itself (reading, deciding, publishing) is the caller's; this only says when.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Final

from sidecar.reading import SourceSet
from sidecar.reloads import Trigger, Triggers

__all__ = ["Scheduler"]

logger = logging.getLogger("sidecar.service")

# The first retry after a failed reload; each next one waits twice as long.
_FIRST_RETRY_SECONDS: Final = 1.0

RunReload = Callable[[Triggers, bool], Awaitable[object]]


class Scheduler:
    """Background reloads for one service: `run(triggers, fresh)` carries each out."""

    def __init__(
        self,
        run: RunReload,
        *,
        failing: Callable[[], bool],
        interval_seconds: float,
        verify_interval_seconds: float,
    ) -> None:
        self._run = run
        self._failing = failing  # whether the last recorded reload failed
        self.interval_seconds = interval_seconds
        self.verify_interval_seconds = verify_interval_seconds  # 0: never
        self._reasons: set[Trigger] = set()
        self._fresh = False  # a requested reload reads every source afresh
        self._requested: asyncio.Task[None] | None = None
        self._failed = asyncio.Event()  # set at each recorded failure: retry soon
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def active(self) -> bool:
        """Whether watching and the periodic resync run."""
        return any(not task.done() for task in self._tasks)

    def start(self, sources: SourceSet) -> None:
        """Watch every source and start the periodic resync and verification (idempotent)."""
        if self.active:
            return
        self._tasks = [asyncio.create_task(self._resync_loop(), name="resync")]
        if self.verify_interval_seconds > 0:
            self._tasks.append(asyncio.create_task(self._verify_loop(), name="verify"))
        for source in sources:
            watch = sources.watch(source, self._changed)
            self._tasks.append(asyncio.create_task(watch, name=f"watch {source.name}"))

    async def stop(self) -> None:
        """Stop watching and any requested reload."""
        tasks, self._tasks = self._tasks, []
        if self._requested is not None:
            tasks.append(self._requested)
            self._requested = None
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def request(self, reason: Trigger, *, fresh: bool = False) -> asyncio.Task[None]:
        """Ask for a background reload; requests made while one runs become one more.
        Returns the task that will carry it out.

        `fresh`: every source forgets what it kept and is read from scratch (SIGHUP, like
        Prometheus' SIGHUP re-reads everything). Watching or not: SIGHUP reloads even
        with HOT_RELOAD_ENABLED=false."""
        self._reasons.add(reason)
        self._fresh = self._fresh or fresh
        if self._requested is None or self._requested.done():
            self._requested = asyncio.create_task(self._run_requested(), name="reload")
        return self._requested

    def _changed(self) -> None:
        self.request(Trigger.WATCH)

    def failed(self) -> None:
        """A reload was recorded as failed: the resync retries soon."""
        self._failed.set()

    async def _run_requested(self) -> None:
        while self._reasons:
            reasons, self._reasons = frozenset(self._reasons), set()
            fresh, self._fresh = self._fresh, False
            try:
                await self._run(reasons, fresh)
            except Exception:
                logger.exception("background reload crashed")

    async def _verify_loop(self) -> None:
        """Every `verify_interval_seconds`: read every source as usual and from scratch.

        A watch can lose an event and a fingerprint can miss a change (a row deleted and
        inserted again under the same version, triggers bypassed); only a full read
        shows it. What it finds goes live like any change and is counted as drift."""
        while True:
            await asyncio.sleep(self.verify_interval_seconds)
            self.request(Trigger.VERIFY)

    async def _resync_loop(self) -> None:
        """Safety net for anything a watcher missed; the poll of sources without a watch.

        While the last reload failed, it comes sooner (1 s, doubling up to the interval):
        a repair that makes no change event (a permission put back, a database back up)
        is then seen in seconds, like OPA's bundle downloads retry with backoff."""
        retry = _FIRST_RETRY_SECONDS
        while True:
            failing = self._failing()
            self._failed.clear()
            try:
                delay = min(retry, self.interval_seconds) if failing else self.interval_seconds
                await asyncio.wait_for(self._failed.wait(), timeout=delay)
            except TimeoutError:
                retry = min(retry * 2, self.interval_seconds) if failing else _FIRST_RETRY_SECONDS
                self.request(Trigger.RESYNC)
            else:
                retry = _FIRST_RETRY_SECONDS  # a new failure: its retries start again

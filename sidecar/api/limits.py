"""What one request may cost, and who may spend which budget.

Every limit is a setting (`sidecar.config`), and every refusal names it: `LimitExceeded`
carries the status and the setting's environment variable, which the API answers in
`error.limit`. The limits of a request (`RequestLimits`), the batch queue (`BatchTurns`)
and the rate budgets per caller class (`RateBudgets`) live here; the connection cap and
timeouts are the listener's (`sidecar.api.run`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from sidecar.config import DEFAULT_SETTINGS, ENVIRONMENT, Settings

__all__ = [
    "RATE_SETTINGS",
    "Action",
    "BatchTurns",
    "Caller",
    "LimitExceeded",
    "RateBudgets",
    "RateLimiter",
    "RequestLimits",
]


@dataclass(slots=True)
class RateLimiter:
    """A token bucket: `per_minute` requests, bursts up to that."""

    per_minute: int
    tokens: float = 0.0
    updated: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.tokens = float(self.per_minute)

    def acquire(self) -> float:
        """0 when allowed, else seconds until the next request would be."""
        now = time.monotonic()
        rate = self.per_minute / 60.0
        self.tokens = min(float(self.per_minute), self.tokens + (now - self.updated) * rate)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / rate


class Caller(StrEnum):
    """Who asks, as far as the sidecar can tell: the admin token is the only identity."""

    ADMIN = "admin"  # presented the admin token
    ANONYMOUS = "anonymous"  # everyone else, and everyone when no token is configured


class Action(StrEnum):
    """What a rate budget pays for."""

    RELOAD = "reload"  # reload, reload of a rule or ruleset, rollback: they publish
    VALIDATE = "validate"  # reads every source, publishes nothing
    CANDIDATE = "candidate"  # validates submitted documents (compiled), publishes nothing


RATE_SETTINGS: dict[Action, str] = {
    Action.RELOAD: "reload_rate_per_minute",
    Action.VALIDATE: "validate_rate_per_minute",
    Action.CANDIDATE: "candidate_rate_per_minute",
}


@dataclass(slots=True)
class RateBudgets:
    """One token bucket per caller class and action.

    A single shared bucket let 70 anonymous validations lock the admin out of reload and
    rollback. Here anonymous callers spend only their own budget, and validations never
    the reloads'. Without an admin token every caller is anonymous: reloads and
    validations still have separate budgets, but one caller can spend another's.
    """

    per_minute: Mapping[Action, int]
    _buckets: dict[tuple[Caller, Action], RateLimiter] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: Settings) -> RateBudgets:
        return cls({action: getattr(settings, name) for action, name in RATE_SETTINGS.items()})

    def acquire(self, caller: Caller, action: Action) -> float:
        """0 when allowed, else seconds until this caller class may do this again."""
        bucket = self._buckets.get((caller, action))
        if bucket is None:
            bucket = self._buckets[caller, action] = RateLimiter(self.per_minute[action])
        return bucket.acquire()


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestLimits:
    """What one request may cost: the batch evaluated, its time, its answer, its body,
    the check of submitted rule documents."""

    max_batch_items: int
    max_evaluation_seconds: float
    max_response_bytes: int
    body_timeout_seconds: float
    candidate_timeout_seconds: float = DEFAULT_SETTINGS.candidate_timeout_seconds

    @classmethod
    def from_settings(cls, settings: Settings) -> RequestLimits:
        return cls(
            max_batch_items=settings.max_batch_items,
            max_evaluation_seconds=settings.max_evaluation_seconds,
            max_response_bytes=settings.max_response_bytes,
            body_timeout_seconds=settings.body_timeout_seconds,
            candidate_timeout_seconds=settings.candidate_timeout_seconds,
        )


@dataclass(slots=True)
class BatchTurns:
    """One batch evaluates at a time; the others wait, at most `max_queued` of them.

    One at a time keeps the loop's batch work between two other events to one slice.
    A waiting batch holds its parsed inputs (up to about 25 MB for a 1 MiB body of tiny
    inputs), so the queue is bounded too: past it, a batch is refused at once (503).
    """

    max_queued: int = DEFAULT_SETTINGS.max_queued_batches
    queued: int = 0
    turn: asyncio.Lock = field(default_factory=asyncio.Lock)

    @contextlib.asynccontextmanager
    async def wait(self, seconds: float) -> AsyncIterator[None]:
        """Hold the turn; raises `TimeoutError` after `seconds`, `LimitExceeded` when the
        queue is full."""
        if self.turn.locked() and self.queued >= self.max_queued:
            raise LimitExceeded(
                503,
                f"{self.queued} batches are already waiting for their turn: retry later",
                setting="max_queued_batches",
                retry_after=1,
            )
        self.queued += 1
        try:
            async with asyncio.timeout(seconds):
                await self.turn.acquire()
        finally:
            self.queued -= 1
        try:
            yield
        finally:
            self.turn.release()


class LimitExceeded(Exception):
    """A request refused by one of its limits; the answer names the setting to change."""

    def __init__(self, status: int, message: str, *, setting: str, retry_after: int = 0):
        super().__init__(message)
        self.status = status
        self.message = message
        self.limit = ENVIRONMENT[setting]
        self.retry_after = retry_after

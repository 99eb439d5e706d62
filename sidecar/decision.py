"""What to do with the result of reading the sources: a pure function, tested alone.

The reload coordinator reads and compiles; this module decides whether that result is
published, recorded, announced, read once more, or dropped as no news. Every rule of
"never a wrong state, never a success that was not one" that depends on what happened
before lives here, with no I/O, so that each case is one line of a table test.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from sidecar.errors import Problem, ProblemCode
from sidecar.reloads import ReloadRecord, ReloadStatus, Triggers, is_background
from sidecar.snapshot import Snapshot

__all__ = ["Attempt", "Memory", "Verdict", "confirms", "decide", "refusal"]

_REFUSED: Final = (
    "refused, the last good rules keep serving (set RULE_SIDECAR_ALLOW_EMPTY=true to "
    "allow a source or the registry to be emptied)"
)


class Verdict(StrEnum):
    PUBLISH = "publish"  # new content goes live: a success, announced
    RECOVERED = "recovered"  # what serves is right again after a failure: a success, announced
    UNCHANGED = "unchanged"  # someone asked and nothing differs: recorded, not announced
    FAILED = "failed"  # recorded and announced; the last good rules keep serving
    QUIET = "quiet"  # a background check found no news: not recorded
    REPEATED = "repeated"  # a background check found the same failure again: not recorded
    CONFIRM = "confirm"  # the sources emptied a non-empty registry: read again first
    EMPTY_REFUSED = "empty_refused"  # ... and still do: a failure (`EMPTIED`) unless allowed


@dataclass(frozen=True, slots=True, kw_only=True)
class Attempt:
    """One read of every source, and what was serving when it started."""

    triggers: Triggers
    serving: Snapshot
    candidate: Snapshot | None
    problems: tuple[Problem, ...] = ()
    force: bool = False
    confirmed: bool = False  # this is the second read of an emptied source
    emptied: tuple[str, ...] = ()  # sources that had rulesets and have none


@dataclass(frozen=True, slots=True, kw_only=True)
class Memory:
    """What the coordinator remembers between reloads."""

    last: ReloadRecord | None = None
    serving_from_state: bool = False
    rolled_back_from: str | None = None  # the revision a rollback holds back


def decide(attempt: Attempt, memory: Memory, *, allow_empty: bool = False) -> Verdict:
    """The verdict for one attempt; see `Verdict` for what each one does.

    A registry that had rules is never emptied by accident (every file deleted, a Helm
    value that renders nothing): that takes two reads agreeing and `allow_empty`."""
    last = memory.last
    after_failure = last is not None and last.status is ReloadStatus.FAILED
    background = is_background(attempt.triggers)

    def repeated(problems: tuple[Problem, ...]) -> bool:
        """The last record already says this (a failure, or a restore it caused)."""
        failing = after_failure or (last is not None and last.status is ReloadStatus.RESTORED)
        return background and failing and last is not None and last.errors == problems

    candidate = attempt.candidate
    if attempt.problems or candidate is None:
        return Verdict.REPEATED if repeated(attempt.problems) else Verdict.FAILED
    if candidate.revision == attempt.serving.revision and attempt.serving.version > 0:
        same = True
    else:
        same = candidate.revision == memory.rolled_back_from
    if refusal(attempt) and not same:
        if not attempt.confirmed:
            return Verdict.CONFIRM
        if not allow_empty:
            return Verdict.REPEATED if repeated(refusal(attempt)) else Verdict.EMPTY_REFUSED
    if attempt.force or memory.serving_from_state or not same:
        return Verdict.PUBLISH
    if after_failure:
        return Verdict.RECOVERED
    return Verdict.QUIET if background else Verdict.UNCHANGED


def confirms(verdict: Verdict) -> bool:
    """Whether what serves is now known to be what the sources hold (or about to be):
    freshness is measured from such a read, and what each source held is remembered."""
    return verdict in (Verdict.PUBLISH, Verdict.RECOVERED, Verdict.UNCHANGED, Verdict.QUIET)


def refusal(attempt: Attempt) -> tuple[Problem, ...]:
    """Why this attempt would empty what served: each emptied source, or the registry
    (a source can keep files that hold no ruleset any more). Empty: nothing emptied."""
    if attempt.emptied:
        return tuple(
            Problem(
                file=name,
                message=f"the source holds no ruleset any more: {_REFUSED}",
                code=ProblemCode.RULES_EMPTY,
            )
            for name in attempt.emptied
        )
    candidate = attempt.candidate
    if candidate is not None and not candidate.rulesets and attempt.serving.rulesets:
        message = f"the sources hold no ruleset any more: {_REFUSED}"
        return (Problem(file="<sources>", message=message, code=ProblemCode.RULES_EMPTY),)
    return ()

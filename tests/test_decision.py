"""`decide`, case by case: what a read means given what happened before."""

from __future__ import annotations

import pytest
from conftest import dump_yaml, make_ruleset_doc

from sidecar.decision import Attempt, Memory, Verdict, confirms, decide, refusal
from sidecar.errors import Problem
from sidecar.loader import Loader
from sidecar.reloads import ReloadRecord, ReloadStatus, Trigger
from sidecar.rulefiles import SourceFile
from sidecar.snapshot import Snapshot

WATCH = frozenset({Trigger.WATCH})
API = frozenset({Trigger.API})
PROBLEM = (Problem(file="a.yaml", line=1, column=1, message="broken"),)
BAD = {"candidate": None, "problems": PROBLEM}


def snapshot(*ids: str, version: int = 1) -> Snapshot:
    files = [SourceFile(f"{i}.yaml", dump_yaml(make_ruleset_doc(i)).encode()) for i in ids]
    return Loader().load(files).snapshot.published_as(version)


A, B, EMPTY = snapshot("a"), snapshot("a", "b"), snapshot(version=0)


def last(status: ReloadStatus, errors: tuple[Problem, ...] = ()) -> ReloadRecord:
    return ReloadRecord(
        id=1,
        triggers=WATCH,
        status=status,
        timestamp=A.created_at,
        reload_time_ms=1.0,
        rules_loaded=1,
        rulesets_loaded=1,
        reload_count=1,
        version_before=0,
        version_after=1,
        revision=A.revision,
        errors=errors,
    )


FAILED = Memory(last=last(ReloadStatus.FAILED, PROBLEM))
OK = Memory(last=last(ReloadStatus.SUCCESS))
FROM_STATE = Memory(serving_from_state=True)
REFUSED = Verdict.EMPTY_REFUSED
HOLDS_B = Memory(rolled_back_from=B.revision)


@pytest.mark.parametrize(
    ("attempt", "memory", "verdict"),
    [
        (Attempt(triggers=WATCH, serving=A, candidate=B), OK, Verdict.PUBLISH),
        (Attempt(triggers=WATCH, serving=A, candidate=A), OK, Verdict.QUIET),
        (Attempt(triggers=API, serving=A, candidate=A), OK, Verdict.UNCHANGED),
        (Attempt(triggers=API, serving=A, candidate=A, force=True), OK, Verdict.PUBLISH),
        (Attempt(triggers=WATCH, serving=A, candidate=A), FAILED, Verdict.RECOVERED),
        (Attempt(triggers=WATCH, serving=A, candidate=B), FAILED, Verdict.PUBLISH),
        (Attempt(triggers=WATCH, serving=A, **BAD), OK, Verdict.FAILED),
        (Attempt(triggers=WATCH, serving=A, **BAD), FAILED, Verdict.REPEATED),
        (
            Attempt(triggers=WATCH, serving=A, **BAD),
            Memory(last=last(ReloadStatus.RESTORED, PROBLEM), serving_from_state=True),
            Verdict.REPEATED,
        ),
        (
            Attempt(triggers=API, serving=A, **BAD),
            FAILED,
            Verdict.FAILED,
        ),
        (Attempt(triggers=WATCH, serving=A, candidate=EMPTY), OK, Verdict.CONFIRM),
        (Attempt(triggers=API, serving=A, candidate=EMPTY, force=True), OK, Verdict.CONFIRM),
        (
            Attempt(triggers=WATCH, serving=A, candidate=EMPTY, confirmed=True),
            OK,
            Verdict.EMPTY_REFUSED,
        ),
        (Attempt(triggers=WATCH, serving=EMPTY, candidate=A), Memory(), Verdict.PUBLISH),
        (
            Attempt(triggers=WATCH, serving=A, candidate=A),
            Memory(serving_from_state=True),
            Verdict.PUBLISH,
        ),
        (
            Attempt(triggers=WATCH, serving=A, candidate=B),
            Memory(rolled_back_from=B.revision),
            Verdict.QUIET,
        ),
        (
            Attempt(triggers=API, serving=A, candidate=B),
            Memory(rolled_back_from=B.revision),
            Verdict.UNCHANGED,
        ),
    ],
    ids=[
        "new-content",
        "background-unchanged",
        "asked-unchanged",
        "forced",
        "recovery-same-content",
        "recovery-new-content",
        "failure",
        "failure-repeated-in-background",
        "failure-repeated-after-a-restore",
        "failure-repeated-when-asked",
        "emptied",
        "emptied-even-forced",
        "emptied-confirmed-refused",
        "first-load",
        "from-state-dir",
        "rollback-holds",
        "rollback-holds-when-asked",
    ],
)
def test_decide(attempt: Attempt, memory: Memory, verdict: Verdict):
    assert decide(attempt, memory) is verdict


def test_an_allowed_empty_registry_is_published():
    attempt = Attempt(triggers=WATCH, serving=A, candidate=EMPTY, confirmed=True)
    assert decide(attempt, OK, allow_empty=True) is Verdict.PUBLISH


def test_a_repeated_refusal_in_the_background_is_not_recorded_again():
    attempt = Attempt(triggers=WATCH, serving=A, candidate=EMPTY, confirmed=True)
    refused = Memory(last=last(ReloadStatus.FAILED, refusal(attempt)))
    assert decide(attempt, refused) is Verdict.REPEATED


@pytest.mark.parametrize("verdict", list(Verdict))
def test_only_a_read_that_was_accepted_confirms_what_serves(verdict: Verdict):
    """A refused emptying, even one not recorded again, confirms nothing: freshness and
    what each source held must not move (else the next read is no longer an emptying)."""
    accepted = {Verdict.PUBLISH, Verdict.RECOVERED, Verdict.UNCHANGED, Verdict.QUIET}
    assert confirms(verdict) is (verdict in accepted)


@pytest.mark.parametrize("confirmed", [False, True])
def test_one_emptied_source_among_several_is_held_then_refused(confirmed: bool):
    """A database between `db init` and `db import` beside a rules directory: the
    registry keeps rules, yet a whole source went empty."""
    attempt = Attempt(
        triggers=WATCH, serving=B, candidate=A, emptied=("postgresql://db",), confirmed=confirmed
    )
    assert decide(attempt, OK) is (REFUSED if confirmed else Verdict.CONFIRM)
    assert decide(attempt, OK, allow_empty=True) is (
        Verdict.PUBLISH if confirmed else Verdict.CONFIRM
    )
    assert [p.file for p in refusal(attempt)] == ["postgresql://db"]

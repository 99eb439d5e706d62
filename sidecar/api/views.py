"""The reload service's facts as wire shapes: status, health, history, validation.

The service knows what happened (records, per-source status, health checks); what a
client reads is decided here, once, with a typed shape per answer. The field names are
the hot-reload contract's, plus what this sidecar adds (sources, freshness, revision);
`sidecar/schemas/openapi.yaml` documents each shape and the API tests check every
answer against it.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any, Final, Literal, TypedDict

from sidecar.reading import SourceStatus
from sidecar.reloads import ReloadRecord
from sidecar.service import CandidateCheck, Health, HotReloadService, Starting, Validation
from sidecar.writes import RuleWriter

__all__ = [
    "NO_DATABASE",
    "NO_TOKEN",
    "CandidateView",
    "HealthView",
    "ReloadView",
    "StatusView",
    "ValidationView",
    "WritesView",
    "candidate_view",
    "health_view",
    "history_view",
    "reload_view",
    "starting_message",
    "status_view",
    "validation_view",
    "writes_view",
]

Serving = Literal["sources", "state_dir"]


class SourceView(TypedDict):
    name: str
    last_request: str | None
    last_successful_read: str | None
    files: int
    message: str | None
    errors: list[dict[str, Any]]
    drift: int
    last_drift: str | None
    watch_problem: str | None


class StartingView(TypedDict):
    waiting_for: str
    seconds: float


class ReloadView(TypedDict):
    id: int
    status: str
    trigger: str
    timestamp: str
    reload_time_ms: float
    rules_loaded: int
    rulesets_loaded: int
    reload_count: int
    version_before: int
    version_after: int
    revision: str
    files: int
    files_parsed: int
    changes: int
    errors: list[dict[str, Any]]
    filtered_by: Mapping[str, object] | None


class WritesView(TypedDict):
    """Whether this sidecar takes writes (`PUT`/`DELETE /api/v1/rulesets/{id}`, ...), to
    which source, and why not: what the dashboard shows its editing controls by."""

    available: bool
    source: str | None
    reason: str | None


NO_DATABASE: Final = "writes need a database source (--database-url): this sidecar has none"
NO_TOKEN: Final = (
    "writes need an admin token (--admin-token-file): a write API open to anything in the"
    " pod is not a default this sidecar ships"
)


def writes_view(writer: RuleWriter | None, token_configured: bool) -> WritesView:
    """Writes go to the writer's database source (None: there is none), and only with
    an admin token configured (405 and 403 otherwise, for these reasons)."""
    reason = NO_DATABASE if writer is None else None if token_configured else NO_TOKEN
    source = None if writer is None else writer.source.name
    return {"available": reason is None, "source": source, "reason": reason}


class StatusView(TypedDict):
    monitoring_active: bool
    auto_reload_enabled: bool
    reload_interval_seconds: float
    verify_interval_seconds: float
    validation_enabled: bool
    last_check_time: str | None
    last_successful_check_time: str | None
    fresh: bool
    max_age_seconds: float
    last_reload_time: str | None
    last_reload_status: str | None
    reload_count: int
    registry: dict[str, Any]
    serving_from: Serving
    rollback_active: bool
    sources: list[SourceView]
    last_errors: list[dict[str, Any]]
    state_dir: dict[str, Any] | None
    starting: StartingView | None
    writes: WritesView


class ChecksView(TypedDict):
    monitoring_active: bool
    registry_has_rules: bool
    last_reload_successful: bool
    sources_watched: bool
    fresh: bool


class HealthView(TypedDict):
    status: str
    monitoring_active: bool
    auto_reload_enabled: bool
    last_reload: str | None
    last_successful_check_time: str | None
    reload_count: int
    last_reload_status: str | None
    registry: dict[str, Any]
    revision: str
    serving_from: Serving
    checks: ChecksView
    watch_problems: dict[str, str]
    starting: StartingView | None


class ValidationView(TypedDict):
    valid: bool
    total_rules: int | None
    total_rulesets: int | None
    invalid_rules: int
    errors: list[dict[str, Any]]
    revision: str | None
    current_revision: str


class RuleChangesView(TypedDict):
    added: list[str]
    changed: list[str]
    removed: list[str]


class ChangesView(TypedDict):
    added: list[str]
    changed: list[str]
    unchanged: list[str]
    removed: list[str]
    rules: RuleChangesView


class CasesView(TypedDict):
    run: int
    passed: int
    failed: int


class CandidateView(TypedDict):
    valid: bool
    errors: list[dict[str, Any]]
    changes: ChangesView
    tests: CasesView
    revision: str | None
    current_revision: str


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None


def _serving(service: HotReloadService) -> Serving:
    return "state_dir" if service.serving_from_state else "sources"


def _starting(starting: Starting | None) -> StartingView | None:
    if starting is None:
        return None
    return {"waiting_for": starting.waiting_for, "seconds": starting.seconds}


def starting_message(starting: Starting) -> str:
    """Why registry reads answer 503 while the first load runs."""
    return (
        f"the rules are not loaded yet: the first load is waiting for "
        f"{starting.waiting_for} ({starting.seconds} s so far)"
    )


def _source(status: SourceStatus, watch_problem: str | None) -> SourceView:
    return {
        "name": status.name,
        "last_request": _iso(status.last_request),
        "last_successful_read": _iso(status.last_successful_read),
        "files": status.files,
        "message": status.message,
        "errors": [problem.to_dict() for problem in status.errors],
        "drift": status.drift,
        "last_drift": status.last_drift,
        "watch_problem": watch_problem,
    }


def reload_view(record: ReloadRecord) -> ReloadView:
    """One reload attempt: the contract's reload fields, plus versions, revision, errors."""
    return {
        "id": record.id,
        "status": record.status.value,
        "trigger": record.trigger,
        "timestamp": record.timestamp.isoformat(),
        "reload_time_ms": round(record.reload_time_ms, 3),
        "rules_loaded": record.rules_loaded,
        "rulesets_loaded": record.rulesets_loaded,
        "reload_count": record.reload_count,
        "version_before": record.version_before,
        "version_after": record.version_after,
        "revision": record.revision,
        "files": record.files,
        "files_parsed": record.files_parsed,
        "changes": len(record.changes),
        "errors": [problem.to_dict() for problem in record.errors],
        "filtered_by": record.filtered_by,
    }


def history_view(service: HotReloadService, limit: int | None) -> list[ReloadView]:
    """Recorded reloads, newest first."""
    return [reload_view(record) for record in service.log.newest(limit)]


def status_view(service: HotReloadService, *, writes: WritesView) -> StatusView:
    """The contract's status fields, plus sources, freshness, the last error and
    whether writes are taken (`writes`: the app's, not the service's, to say)."""
    last = service.log.last
    watch_problems = service.watch_problems()
    return {
        "monitoring_active": service.monitoring_active,
        "auto_reload_enabled": service.auto_reload,
        "reload_interval_seconds": service.interval_seconds,
        "verify_interval_seconds": service.verify_interval_seconds,
        "validation_enabled": service.loader.run_checks,
        "last_check_time": _iso(service.last_check),
        "last_successful_check_time": _iso(service.last_verified),
        "fresh": service.is_fresh(),
        "max_age_seconds": service.max_age_seconds,
        "last_reload_time": _iso(last.timestamp) if last else None,
        "last_reload_status": last.status.value if last else None,
        "reload_count": service.log.successes,
        "registry": service.registry.get_stats(),
        "serving_from": _serving(service),
        "rollback_active": service.rollback_active,
        "sources": [
            _source(service.sources.statuses[source.name], watch_problems.get(source.name))
            for source in service.sources
        ],
        "last_errors": [problem.to_dict() for problem in last.errors] if last else [],
        "state_dir": service.state.status().to_dict() if service.state else None,
        "starting": _starting(service.starting()),
        "writes": writes,
    }


def health_view(service: HotReloadService, health: Health) -> HealthView:
    """Health for the kubelet, with each check that decided it."""
    last = service.log.last
    stats = service.registry.get_stats()
    checks = health.checks
    return {
        "status": health.status.value,
        "monitoring_active": checks.monitoring_active,
        "auto_reload_enabled": service.auto_reload,
        "last_reload": stats["last_reload"],
        "last_successful_check_time": _iso(service.last_verified),
        "reload_count": service.log.successes,
        "last_reload_status": last.status.value if last else None,
        "registry": stats,
        "revision": stats["revision"],
        "serving_from": _serving(service),
        "checks": {
            "monitoring_active": checks.monitoring_active,
            "registry_has_rules": checks.registry_has_rules,
            "last_reload_successful": checks.last_reload_successful,
            "sources_watched": checks.sources_watched,
            "fresh": checks.fresh,
        },
        "watch_problems": dict(health.watch_problems),
        "starting": _starting(health.starting),
    }


def validation_view(validation: Validation) -> ValidationView:
    """In the shape of the contract's `validate_registry_rules`: `valid`, `total_rules`,
    `invalid_rules`, `errors` (`rule_id`, `error`, location), plus revisions."""
    problems, candidate = validation.problems, validation.candidate
    invalid = {p.rule_id or p.ruleset_id or p.file for p in problems}
    return {
        "valid": not problems,
        "total_rules": len(candidate.rules) if candidate else None,
        "total_rulesets": len(candidate.rulesets) if candidate else None,
        "invalid_rules": len(invalid),
        "errors": [problem.to_rule_error() for problem in problems],
        "revision": candidate.revision if candidate else None,
        "current_revision": validation.current_revision,
    }


def candidate_view(check: CandidateCheck) -> CandidateView:
    """Submitted documents checked as part of the registry: each problem located (the
    `Problem` shape, code included), what they would change, their embedded tests."""
    changes = check.changes
    return {
        "valid": check.valid,
        "errors": [problem.to_dict() for problem in check.problems],
        "changes": {
            "added": list(changes.added),
            "changed": list(changes.changed),
            "unchanged": list(changes.unchanged),
            "removed": list(changes.removed),
            "rules": {
                "added": list(changes.rules_added),
                "changed": list(changes.rules_changed),
                "removed": list(changes.rules_removed),
            },
        },
        "tests": {
            "run": check.cases_run,
            "passed": check.cases_passed,
            "failed": check.cases_run - check.cases_passed,
        },
        "revision": check.revision,
        "current_revision": check.current_revision,
    }

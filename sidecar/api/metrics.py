"""Prometheus metrics, in a registry of their own (no process-global state).

Names follow the hot-reload contract's metrics (`rule_reloads`, `rule_reload_time`,
`rules_reloaded`, `monitoring_active`, `registry_version`) under the `rule_sidecar_` prefix, with
Prometheus' own reload pair: `..._last_reload_successful` and
`..._last_reload_success_timestamp_seconds` (set on success only). Where a reload's time
goes is `rule_sidecar_load_stage_seconds{stage}`, by the loader's stage names, as
Prometheus times its own rule groups and config reloads.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from sidecar.loader import LoadStage
from sidecar.service import ReloadRecord, ReloadStatus
from sidecar.tallies import DecisionTallies

__all__ = ["CONTENT_TYPE_LATEST", "DecisionCounts", "EvaluationTimes", "Metrics"]

_EVALUATION_BUCKETS = (0.00001, 0.00003, 0.0001, 0.0003, 0.001, 0.003, 0.01, 0.03, 0.1, 1.0)
# 1 ms (an incremental reload's checks) to 30 s (a cold compile of a very large registry),
# about three buckets a decade.
_LOAD_STAGE_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


class EvaluationTimes(Collector):
    """`rule_sidecar_evaluation_seconds`: how long each evaluate request took.

    A histogram in plain counters, turned into samples when scraped, for the reason
    `DecisionCounts` gives: prometheus_client's takes a lock and walks its buckets in
    Python on every request."""

    def __init__(self) -> None:
        self._counts = [0] * (len(_EVALUATION_BUCKETS) + 1)  # the last: above all bounds
        self._sum = 0.0

    def observe(self, seconds: float) -> None:
        self._counts[bisect.bisect_left(_EVALUATION_BUCKETS, seconds)] += 1
        self._sum += seconds

    def collect(self) -> Iterator[Metric]:
        cumulative = list(itertools.accumulate(self._counts))
        bounds = [*map(floatToGoString, _EVALUATION_BUCKETS), "+Inf"]
        yield HistogramMetricFamily(
            "rule_sidecar_evaluation_seconds",
            "Time to evaluate one request (single input or batch).",
            buckets=list(zip(bounds, cumulative, strict=True)),
            sum_value=self._sum,
        )


class DecisionCounts(Collector):
    """Per-ruleset and per-rule counts of evaluations, from `DecisionTallies`.

    Counted as plain integers on the request path and turned into samples only when
    scraped: a labelled prometheus_client counter costs a `labels()` lookup and a lock
    per update, and an evaluation updates one per matched rule. A rule or decision that
    never counted has no series (a registry of 5,000 rulesets of 100 rules would
    otherwise export a million zeros); a ruleset or rule that leaves the registry stops
    being exported. A decision of none (no band and no default) is the empty label."""

    def __init__(self, tallies: DecisionTallies) -> None:
        self._tallies = tallies

    def collect(self) -> Iterator[Metric]:
        evaluated = CounterMetricFamily(
            "rule_sidecar_evaluations", "Inputs evaluated, by ruleset.", labels=["ruleset"]
        )
        errored = CounterMetricFamily(
            "rule_sidecar_evaluation_rule_errors",
            "Rule conditions that errored on an input.",
            labels=["ruleset"],
        )
        decisions = CounterMetricFamily(
            "rule_sidecar_decisions",
            "Inputs evaluated, by ruleset and the decision they got.",
            labels=["ruleset", "decision"],
        )
        matches = CounterMetricFamily(
            "rule_sidecar_rule_matches",
            "Inputs a rule matched, by ruleset, rule and mode.",
            labels=["ruleset", "rule", "mode"],
        )
        rule_errors = CounterMetricFamily(
            "rule_sidecar_rule_errors",
            "Inputs on which a rule's condition errored.",
            labels=["ruleset", "rule"],
        )
        disagreements = CounterMetricFamily(
            "rule_sidecar_challenger_disagreements",
            "Inputs on which a ruleset's challenger decided otherwise, by both decisions.",
            labels=["ruleset", "challenger", "from", "to"],
        )
        for tally in self._tallies.tallies():
            evaluated.add_metric([tally.ruleset_id], tally.evaluations)
            if tally.errored:
                errored.add_metric([tally.ruleset_id], tally.errored)
            for decision, count in tally.decisions.items():
                if count:
                    decisions.add_metric([tally.ruleset_id, decision or ""], count)
            for (rule_id, mode), count in tally.matches.items():
                if count:
                    matches.add_metric([tally.ruleset_id, rule_id, mode], count)
            for rule_id, count in tally.errors.items():
                if count:
                    rule_errors.add_metric([tally.ruleset_id, rule_id], count)
            for (challenger, ours, theirs), count in tally.versus.items():
                if ours != theirs:
                    labels = [tally.ruleset_id, challenger, ours or "", theirs or ""]
                    disagreements.add_metric(labels, count)
        yield from (evaluated, errored, decisions, matches, rule_errors, disagreements)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.reloads = Counter(
            "rule_sidecar_rule_reloads",
            "Reload attempts by trigger and outcome.",
            ["trigger", "outcome"],
            registry=r,
        )
        self.reload_time = Histogram(
            "rule_sidecar_rule_reload_time_seconds", "Duration of reloads.", registry=r
        )
        self.load_stages = Histogram(
            "rule_sidecar_load_stage_seconds",
            "Time a load of rule files spent in each stage (parse, schema, compile, checks, "
            "build; publish), per load that changed something.",
            ["stage"],
            buckets=_LOAD_STAGE_BUCKETS,
            registry=r,
        )
        for stage in LoadStage:
            self.load_stages.labels(stage=stage.value)
        self.last_success = Gauge(
            "rule_sidecar_last_reload_successful",
            "1 if the last reload succeeded, else 0.",
            registry=r,
        )
        self.last_success_time = Gauge(
            "rule_sidecar_last_reload_success_timestamp_seconds",
            "When a reload last succeeded.",
            registry=r,
        )
        self.rules = Gauge(
            "rule_sidecar_rules_reloaded",
            "Rules the last successful reload loaded: the rules serving now.",
            registry=r,
        )
        self.rulesets = Gauge(
            "rule_sidecar_rulesets_loaded", "Rulesets in the current snapshot.", registry=r
        )
        self.version = Gauge(
            "rule_sidecar_registry_version", "Current registry version.", registry=r
        )
        self.revision = Gauge(
            "rule_sidecar_registry_revision_info",
            "Content revision of the current snapshot.",
            ["revision"],
            registry=r,
        )
        self.monitoring = Gauge(
            "rule_sidecar_monitoring_active", "1 while sources are being watched.", registry=r
        )
        self.tallies = DecisionTallies()
        r.register(DecisionCounts(self.tallies))
        self.evaluation_time = EvaluationTimes()
        r.register(self.evaluation_time)
        self.source_watching = Gauge(
            "rule_sidecar_source_watch_ok",
            "0 while a source's watch is down (a lost LISTEN, a stalled Kubernetes watch).",
            ["source"],
            registry=r,
        )
        self.source_drift = Counter(
            "rule_sidecar_source_drift",
            "Verifications that found content a source's usual read missed (a lost change "
            "signal: a NOTIFY or watch event, a version that did not move); it went live.",
            ["source"],
            registry=r,
        )
        self.websocket_clients = Gauge(
            "rule_sidecar_websocket_clients", "Connected WebSocket clients.", registry=r
        )
        self.asyncio_tasks = Gauge(
            "rule_sidecar_asyncio_tasks",
            "asyncio tasks alive in the server's event loop; like go_goroutines, a count "
            "that keeps growing is a leak.",
            registry=r,
        )
        self.state_saved = Gauge(
            "rule_sidecar_state_save_ok",
            "1 when the last save of the state dir's copy succeeded (the copy can restore "
            "what serves), 0 when it failed; absent without --state-dir.",
            registry=r,
        )
        # Counted by the decision log (`sidecar.api.decisionlog`), from the request path
        # and its writer thread: these counters lock, and are touched once per dropped
        # decision or written batch, not per request.
        self.decision_log_written = Counter(
            "rule_sidecar_decision_log_written",
            "Decision log lines written.",
            registry=r,
        )
        self.decision_log_dropped = Counter(
            "rule_sidecar_decision_log_dropped",
            "Decisions not logged: queue_full (the writer fell behind), write_error (the "
            "sink failed; health says why), shutdown (still queued when the flush ran out "
            "of time).",
            ["reason"],
            registry=r,
        )
        self._revision: str | None = None
        self._drift: dict[str, int] = {}

    def observe_reload(self, record: ReloadRecord) -> None:
        self.reloads.labels(trigger=record.trigger, outcome=record.status.value).inc()
        self.reload_time.observe(record.reload_time_ms / 1000)
        if record.status in (ReloadStatus.FAILED, ReloadStatus.RESTORED):
            self.last_success.set(0)
        else:
            self.last_success.set(1)
            self.last_success_time.set(record.timestamp.timestamp())
        self.rules.set(record.rules_loaded)
        self.rulesets.set(record.rulesets_loaded)
        self.version.set(record.version_after)
        self.set_revision(record.revision)

    def observe_load_stages(self, seconds: Mapping[LoadStage, float]) -> None:
        """A `Loader` stage listener (called in the loading thread; the histogram locks)."""
        for stage, value in seconds.items():
            self.load_stages.labels(stage=stage.value).observe(value)

    def observe_watches(self, sources: Iterable[str], problems: Mapping[str, str]) -> None:
        """Set at scrape time: a watch fails on its own schedule, not at a reload."""
        for source in sources:
            self.source_watching.labels(source=source).set(0 if source in problems else 1)

    def observe_drift(self, counts: Mapping[str, int]) -> None:
        """Set at scrape time from the service's counts (a verification that found nothing
        new is not recorded as a reload, so no reload record carries them)."""
        for source, count in counts.items():
            series = self.source_drift.labels(source=source)
            if count > self._drift.get(source, -1):
                series.inc(count - self._drift.get(source, 0))
                self._drift[source] = count

    def set_revision(self, revision: str) -> None:
        if revision != self._revision:
            if self._revision is not None:
                self.revision.remove(self._revision)
            self.revision.labels(revision=revision).set(1)
            self._revision = revision

    def render(self) -> bytes:
        return generate_latest(self.registry)

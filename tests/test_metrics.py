"""`/metrics` on a real aiohttp server: where a reload's time goes, by stage."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import dump_yaml, fraud_doc
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from server_support import HOT, INVALID_RULES, Sidecar, metric_value

from sidecar.api.metrics import _EVALUATION_BUCKETS, EvaluationTimes
from sidecar.loader import LOAD_STAGES, LoadStage

# Starts processes, browsers or databases: left out of the quick loop (-m 'not slow').
pytestmark = pytest.mark.slow

STAGES = "rule_sidecar_load_stage_seconds"


@pytest.fixture
async def sidecar(start_sidecar, plain_rules: Path) -> Sidecar:
    """The app on `plain_rules`, loaded at startup, not watching."""
    return await start_sidecar(plain_rules)


async def scrape(app: Sidecar) -> str:
    response = await app.client.get("/metrics")
    assert response.status == 200
    return await response.text()


def counts(text: str) -> dict[str, float | None]:
    """Observations per stage label of the stage histogram."""
    return {stage: metric_value(text, f"{STAGES}_count", {"stage": stage}) for stage in LoadStage}


class TestLoadStageMetrics:
    async def test_a_reload_observes_every_stage(self, sidecar: Sidecar):
        """The startup load and a reload that changed a file each observe every stage of
        the loader, into buckets from 1 ms to 30 s; a reload that changed nothing does not."""
        (sidecar.rules / "fraud.yaml").write_text(dump_yaml(fraud_doc(77)), encoding="utf-8")
        await sidecar.post(f"{HOT}/reload")
        await sidecar.post(f"{HOT}/reload")  # nothing changed since
        text = await scrape(sidecar)
        observed = counts(text)
        assert {stage: observed[stage] for stage in LOAD_STAGES} == dict.fromkeys(LOAD_STAGES, 2)
        assert observed[LoadStage.PUBLISH] is not None  # exported before it is observed
        for stage in LOAD_STAGES:
            seconds = metric_value(text, f"{STAGES}_sum", {"stage": stage})
            assert seconds is not None
            assert seconds > 0
            for bound in ("0.001", "30.0", "+Inf"):
                labels = {"stage": stage, "le": bound}
                assert metric_value(text, f"{STAGES}_bucket", labels) is not None

    async def test_a_refused_reload_observes_the_stages_it_ran(self, sidecar: Sidecar):
        """A reload refused for its problems parsed, checked the schema, compiled and
        checked, but built no snapshot."""
        (sidecar.rules / "fraud.yaml").write_text(INVALID_RULES, encoding="utf-8")
        await sidecar.post(f"{HOT}/reload", status=422)
        observed = counts(await scrape(sidecar))
        assert observed[LoadStage.PARSE] == 2
        assert observed[LoadStage.BUILD] == 1


def test_evaluation_times_expose_what_a_prometheus_histogram_would() -> None:
    """The plain-counter histogram (`EvaluationTimes`) gives the same exposition as
    prometheus_client's Histogram with the same buckets, bucket edges included."""
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    times = EvaluationTimes()
    ours.register(times)
    reference = Histogram(
        "rule_sidecar_evaluation_seconds",
        "Time to evaluate one request (single input or batch).",
        buckets=_EVALUATION_BUCKETS,
        registry=theirs,
    )
    for seconds in [0.0, 0.00001, 0.000011, 0.0005, 0.001, 0.2, 1.0, 5.0]:
        times.observe(seconds)
        reference.observe(seconds)
    expected = [
        line for line in generate_latest(theirs).decode().splitlines() if "_created" not in line
    ]
    assert generate_latest(ours).decode().splitlines() == expected

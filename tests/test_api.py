"""The HTTP API on a real aiohttp server: seed endpoints, reads, evaluation, errors, probes."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import dump_yaml, fraud_doc, make_ruleset_doc
from server_support import HOT, INVALID_RULES, Sidecar, eventually, free_port, metric_value, serving

# Starts processes, browsers or databases: left out of the quick loop (-m 'not slow').
pytestmark = pytest.mark.slow

FOREIGN_LARGE = {"amount": 5000, "country": "FR"}


@pytest.fixture
async def sidecar(start_sidecar, plain_rules: Path) -> Sidecar:
    """The app on `plain_rules` (rulesets `fraud` and `extra`), loaded, not watching."""
    return await start_sidecar(plain_rules)


def change_points(rules: Path, points: int) -> None:
    """Rewrite `fraud.yaml` so that `large-amount` is worth `points`."""
    (rules / "fraud.yaml").write_text(dump_yaml(fraud_doc(points)), encoding="utf-8")


def add_numeric_ruleset(rules: Path) -> None:
    """A ruleset with id 7 and a rule with id 42, as a database-backed seed would name them."""
    doc = make_ruleset_doc(7, [{"id": 42, "condition": "input.amount > 1", "points": 5}])
    (rules / "numeric.yaml").write_text(dump_yaml(doc), encoding="utf-8")


class TestStatus:
    """`GET /status` answers every field of the seed's status."""

    async def test_status_has_every_seed_field(self, sidecar: Sidecar):
        """The seed's status fields are present with the right types and values."""
        status = await sidecar.get(f"{HOT}/status")
        assert status["monitoring_active"] is False
        assert status["auto_reload_enabled"] is True
        assert status["reload_interval_seconds"] == 30.0
        assert status["validation_enabled"] is True
        datetime.fromisoformat(status["last_check_time"])
        datetime.fromisoformat(status["last_reload_time"])
        assert status["last_reload_status"] == "success"
        assert status["reload_count"] == 1
        assert status["serving_from"] == "sources"
        assert status["last_errors"] == []

    async def test_status_registry_block(self, sidecar: Sidecar):
        """`registry` carries rule_count, ruleset_count, version and last_reload."""
        registry = (await sidecar.get(f"{HOT}/status"))["registry"]
        assert registry["rule_count"] == 4
        assert registry["ruleset_count"] == 2
        assert registry["version"] == 1
        datetime.fromisoformat(registry["last_reload"])

    async def test_status_reflects_settings(self, start_sidecar, plain_rules: Path):
        """Interval and validation settings show up in the status."""
        app = await start_sidecar(plain_rules, interval_seconds=7.5, validation_enabled=False)
        status = await app.get(f"{HOT}/status")
        assert status["reload_interval_seconds"] == 7.5
        assert status["validation_enabled"] is False


class TestReload:
    """`POST /reload` and its per-rule and per-ruleset forms."""

    async def test_reload_response_fields(self, sidecar: Sidecar):
        """A reload that publishes answers the seed's fields with the new counts."""
        change_points(sidecar.rules, 45)
        body = await sidecar.post(f"{HOT}/reload")
        assert body["status"] == "success"
        datetime.fromisoformat(body["timestamp"])
        assert isinstance(body["reload_time_ms"], float)
        assert body["reload_time_ms"] >= 0
        assert body["rules_loaded"] == 4
        assert body["rulesets_loaded"] == 2
        assert body["reload_count"] == 2
        assert "filtered_by" in body
        assert body["version_after"] == body["version_before"] + 1 == 2

    async def test_unchanged_reload_publishes_nothing(self, sidecar: Sidecar):
        """Without a change the answer is `unchanged` and the version stays."""
        body = await sidecar.post(f"{HOT}/reload")
        assert body["status"] == "unchanged"
        assert body["reload_count"] == 1
        assert sidecar.version == 1

    async def test_force_reload_publishes_a_new_version(self, sidecar: Sidecar):
        """`force` publishes even identical content as a new version."""
        body = await sidecar.post(f"{HOT}/reload", json={"force": True, "validate": True})
        assert body["status"] == "success"
        assert body["reload_count"] == 2
        assert sidecar.version == 2

    @pytest.mark.parametrize("ruleset_id", [7, "7"])
    async def test_reload_filtered_by_ruleset_number_or_string(
        self, sidecar: Sidecar, ruleset_id: int | str
    ):
        """`ruleset_id` given as a number or a string names the ruleset "7"."""
        add_numeric_ruleset(sidecar.rules)
        body = await sidecar.post(f"{HOT}/reload", json={"ruleset_id": ruleset_id})
        assert body["status"] == "success"
        assert body["filtered_by"] == {"ruleset_id": "7", "rule_id": None}
        assert body["rulesets_loaded"] == 3

    @pytest.mark.parametrize("rule_id", [42, "42"])
    async def test_reload_filtered_by_rule_number_or_string(
        self, sidecar: Sidecar, rule_id: int | str
    ):
        """`rule_id` given as a number or a string names the rule "42"."""
        add_numeric_ruleset(sidecar.rules)
        body = await sidecar.post(f"{HOT}/reload", json={"rule_id": rule_id, "force": True})
        assert body["status"] == "success"
        assert body["filtered_by"] == {"ruleset_id": None, "rule_id": "42"}
        rule = await sidecar.get("/api/v1/rules/42")
        assert rule["ruleset_id"] == "7"

    async def test_reload_unknown_ruleset_in_body_is_404(self, sidecar: Sidecar):
        """A `ruleset_id` that exists neither before nor after the reload is a 404."""
        body = await sidecar.post(f"{HOT}/reload", json={"ruleset_id": "nope"}, status=404)
        assert "nope" in body["error"]["message"]

    @pytest.mark.parametrize(
        "payload", [{"ruleset_id": True}, {"rule_id": [1]}, {"force": "yes"}, {"validate": 1}]
    )
    async def test_reload_rejects_badly_typed_fields(self, sidecar: Sidecar, payload: Any):
        """Ids must be strings or numbers and flags booleans: anything else is a 400."""
        body = await sidecar.post(f"{HOT}/reload", json=payload, status=400)
        assert body["error"]["status"] == 400

    async def test_reload_rule_endpoint(self, sidecar: Sidecar):
        """`/reload/rule/{id}` reloads so the rule is current and names it in filtered_by."""
        change_points(sidecar.rules, 55)
        body = await sidecar.post(f"{HOT}/reload/rule/large-amount")
        assert body["status"] == "success"
        assert body["filtered_by"] == {"ruleset_id": None, "rule_id": "large-amount"}
        assert (await sidecar.get("/api/v1/rules/large-amount"))["points"] == 55

    async def test_reload_ruleset_endpoint(self, sidecar: Sidecar):
        """`/reload/ruleset/{id}` reloads so the ruleset is current."""
        change_points(sidecar.rules, 56)
        body = await sidecar.post(f"{HOT}/reload/ruleset/fraud")
        assert body["status"] == "success"
        assert body["filtered_by"] == {"ruleset_id": "fraud", "rule_id": None}

    async def test_reload_rule_picks_up_a_new_rule(self, sidecar: Sidecar):
        """A rule unknown before the reload but present after it answers 200."""
        add_numeric_ruleset(sidecar.rules)
        body = await sidecar.post(f"{HOT}/reload/rule/42")
        assert body["status"] == "success"

    @pytest.mark.parametrize("kind", ["rule", "ruleset"])
    async def test_reload_unknown_id_is_404(self, sidecar: Sidecar, kind: str):
        """An id that exists neither before nor after is a JSON 404."""
        body = await sidecar.post(f"{HOT}/reload/{kind}/does-not-exist", status=404)
        assert body["error"]["status"] == 404
        assert "does-not-exist" in body["error"]["message"]

    async def test_reload_of_a_new_broken_ruleset_reports_the_failure(self, sidecar: Sidecar):
        """A new ruleset whose file is invalid answers 422 with the errors, not 404."""
        broken = INVALID_RULES.replace("{id: fraud}", "{id: fresh}").replace(
            "large-amount", "fresh-rule"
        )
        (sidecar.rules / "fresh.yaml").write_text(broken, encoding="utf-8")
        body = await sidecar.post(f"{HOT}/reload/ruleset/fresh", status=422)
        assert body["errors"][0]["file"].endswith("fresh.yaml")

    async def test_failed_reload_is_422_and_changes_nothing(self, sidecar: Sidecar):
        """An invalid document: 422 with located errors; the old rules keep serving."""
        (sidecar.rules / "fraud.yaml").write_text(INVALID_RULES, encoding="utf-8")
        body = await sidecar.post(f"{HOT}/reload", status=422)
        assert body["status"] == "failed"
        assert body["errors"]
        error = body["errors"][0]
        assert error["file"].endswith("fraud.yaml")
        assert error["line"] == 7
        assert sidecar.version == 1
        result = await sidecar.evaluate("fraud", FOREIGN_LARGE)
        assert result["total_points"] == 70


class TestValidate:
    """`POST /validate` checks the sources without publishing."""

    async def test_valid_sources(self, sidecar: Sidecar):
        """Valid sources: valid, the counts and no errors."""
        body = await sidecar.post(f"{HOT}/validate")
        assert body["valid"] is True
        assert body["total_rules"] == 4
        assert body["invalid_rules"] == 0
        assert body["errors"] == []

    async def test_invalid_sources_are_reported_not_published(self, sidecar: Sidecar):
        """Invalid sources: every error with rule id and location; nothing is published."""
        (sidecar.rules / "fraud.yaml").write_text(INVALID_RULES, encoding="utf-8")
        body = await sidecar.post(f"{HOT}/validate")
        assert body["valid"] is False
        assert body["invalid_rules"] >= 1
        error = body["errors"][0]
        assert error["rule_id"] == "large-amount"
        assert error["error"]
        assert error["location"].split(":")[-2] == "7"
        assert sidecar.version == 1
        status = await sidecar.get(f"{HOT}/status")
        assert status["last_reload_status"] == "success"


class TestMonitoring:
    """`/monitoring/start` and `/monitoring/stop` drive the watchers and show in health."""

    async def test_start_and_stop(self, sidecar: Sidecar):
        """Start makes status and health report monitoring; stop makes health degraded."""
        assert (await sidecar.post(f"{HOT}/monitoring/start")) == {"monitoring_active": True}
        assert (await sidecar.get(f"{HOT}/status"))["monitoring_active"] is True
        code, health = await sidecar.health()
        assert (code, health["status"]) == (200, "healthy")
        assert health["checks"]["monitoring_active"] is True

        assert (await sidecar.post(f"{HOT}/monitoring/stop")) == {"monitoring_active": False}
        assert (await sidecar.get(f"{HOT}/status"))["monitoring_active"] is False
        code, health = await sidecar.health()
        assert (code, health["status"]) == (200, "degraded")
        assert health["checks"]["monitoring_active"] is False

    async def test_start_is_idempotent(self, sidecar: Sidecar):
        """Starting twice keeps one resync loop running."""
        await sidecar.post(f"{HOT}/monitoring/start")
        await sidecar.post(f"{HOT}/monitoring/start")
        loops = [t for t in asyncio.all_tasks() if t.get_name() == "resync"]
        assert len(loops) == 1

    async def test_monitoring_gauge(self, sidecar: Sidecar):
        """`rule_sidecar_monitoring_active` follows start and stop."""
        await sidecar.post(f"{HOT}/monitoring/start")
        text = await (await sidecar.client.get("/metrics")).text()
        assert metric_value(text, "rule_sidecar_monitoring_active") == 1
        await sidecar.post(f"{HOT}/monitoring/stop")
        text = await (await sidecar.client.get("/metrics")).text()
        assert metric_value(text, "rule_sidecar_monitoring_active") == 0

    async def test_healthy_without_monitoring_when_auto_reload_is_off(
        self, start_sidecar, plain_rules: Path
    ):
        """With HOT_RELOAD_ENABLED off, not watching is expected: healthy, not degraded."""
        app = await start_sidecar(plain_rules, hot_reload_enabled=False)
        code, health = await app.health()
        assert (code, health["status"]) == (200, "healthy")
        assert health["auto_reload_enabled"] is False

    async def test_health_fields(self, sidecar: Sidecar):
        """Health carries the seed's fields and checks."""
        await sidecar.post(f"{HOT}/monitoring/start")
        _, health = await sidecar.health()
        for key in ("status", "monitoring_active", "auto_reload_enabled", "last_reload"):
            assert key in health
        assert health["reload_count"] == 1
        assert health["last_reload_status"] == "success"
        assert health["registry"]["rule_count"] == 4
        assert health["checks"] == {
            "monitoring_active": True,
            "registry_has_rules": True,
            "last_reload_successful": True,
            "sources_watched": True,
            "fresh": True,
        }
        assert health["watch_problems"] == {}


class TestHistory:
    """`GET /history` lists reloads, newest first."""

    async def test_history_lists_reloads_newest_first(self, sidecar: Sidecar):
        """Startup, then two API reloads: three records, newest first."""
        await sidecar.post(f"{HOT}/reload")
        change_points(sidecar.rules, 41)
        await sidecar.post(f"{HOT}/reload")
        body = await sidecar.get(f"{HOT}/history")
        assert body["count"] == 3
        statuses = [(r["trigger"], r["status"]) for r in body["history"]]
        assert statuses == [("api", "success"), ("api", "unchanged"), ("startup", "success")]
        assert [r["id"] for r in body["history"]] == [3, 2, 1]

    async def test_history_limit(self, sidecar: Sidecar):
        """`?limit=1` returns only the newest record."""
        await sidecar.post(f"{HOT}/reload")
        body = await sidecar.get(f"{HOT}/history?limit=1")
        assert body["count"] == 1
        assert body["history"][0]["trigger"] == "api"

    @pytest.mark.parametrize("limit", ["ten", "-1", "1.5"])
    async def test_history_bad_limit_is_400(self, sidecar: Sidecar, limit: str):
        """A limit that is not a whole number is a 400."""
        body = await sidecar.get(f"{HOT}/history?limit={limit}", status=400)
        assert "limit" in body["error"]["message"]

    async def test_history_limit_zero(self, sidecar: Sidecar):
        """`?limit=0` returns no records."""
        assert await sidecar.get(f"{HOT}/history?limit=0") == {"history": [], "count": 0}

    async def test_history_records_failure_with_locations(self, sidecar: Sidecar):
        """A failed reload is in history with each error's file and line."""
        (sidecar.rules / "fraud.yaml").write_text(INVALID_RULES, encoding="utf-8")
        await sidecar.post(f"{HOT}/reload", status=422)
        newest = (await sidecar.get(f"{HOT}/history"))["history"][0]
        assert newest["status"] == "failed"
        assert newest["errors"][0]["file"].endswith("fraud.yaml")
        assert newest["errors"][0]["line"] == 7


class TestRollback:
    """`POST /rollback` republishes an earlier snapshot."""

    async def test_rollback_to_previous(self, sidecar: Sidecar):
        """After a change, rollback serves the earlier points as a newer version."""
        change_points(sidecar.rules, 10)
        await sidecar.post(f"{HOT}/reload")
        assert (await sidecar.evaluate("fraud", FOREIGN_LARGE))["total_points"] == 40
        body = await sidecar.post(f"{HOT}/rollback")
        assert body["status"] == "success"
        assert body["trigger"] == "rollback"
        result = await sidecar.evaluate("fraud", FOREIGN_LARGE)
        assert result["total_points"] == 70
        assert result["registry_version"] == 3

    async def test_rollback_to_version(self, sidecar: Sidecar):
        """`{"version": 1}` goes back to exactly that snapshot's content."""
        for points in (11, 12):
            change_points(sidecar.rules, points)
            await sidecar.post(f"{HOT}/reload")
        body = await sidecar.post(f"{HOT}/rollback", json={"version": 1})
        assert body["filtered_by"] == {"version": 1}
        assert (await sidecar.get("/api/v1/rules/large-amount"))["points"] == 40

    async def test_rollback_without_history_is_404(self, sidecar: Sidecar):
        """Nothing to go back to: 404."""
        await sidecar.post(f"{HOT}/rollback", status=404)

    async def test_rollback_unknown_version_is_404(self, sidecar: Sidecar):
        """A version not in history: 404."""
        change_points(sidecar.rules, 13)
        await sidecar.post(f"{HOT}/reload")
        await sidecar.post(f"{HOT}/rollback", json={"version": 99}, status=404)

    @pytest.mark.parametrize("version", ["1", 1.5, True])
    async def test_rollback_version_must_be_an_integer(self, sidecar: Sidecar, version: Any):
        """A version that is not an integer: 400."""
        await sidecar.post(f"{HOT}/rollback", json={"version": version}, status=400)

    async def test_a_whole_float_is_an_integer(self, sidecar: Sidecar):
        """JSON has one number type: 1.0 is version 1 (as JSON Schema says too)."""
        await sidecar.post(f"{HOT}/reload", json={"force": True})
        record = await sidecar.post(f"{HOT}/rollback", json={"version": 1.0})
        assert (record["status"], record["filtered_by"]) == ("success", {"version": 1})


def etag_of(app: Sidecar) -> str:
    """The ETag the current snapshot's reads carry: revision, version and instance."""
    current = app.state.registry.current
    return f'"{current.revision}-{current.version}-{app.state.notifier.instance}"'


class TestRegistryReads:
    """Rules and rulesets, with an ETag per snapshot and instance and 304 on If-None-Match."""

    async def test_rules_list(self, sidecar: Sidecar):
        """Every rule (disabled ones too), with the registry version and revision."""
        body = await sidecar.get("/api/v1/rules")
        assert body["registry_version"] == 1
        assert body["count"] == 4
        ids = {rule["id"] for rule in body["rules"]}
        assert ids == {"large-amount", "foreign-country", "never-on", "extra-big"}
        assert body["revision"] == sidecar.state.registry.current.revision

    async def test_rules_filters(self, sidecar: Sidecar):
        """`ruleset_id` and `tag` narrow the list."""
        by_ruleset = await sidecar.get("/api/v1/rules?ruleset_id=extra")
        assert [rule["id"] for rule in by_ruleset["rules"]] == ["extra-big"]
        by_tag = await sidecar.get("/api/v1/rules?tag=amount")
        assert [rule["id"] for rule in by_tag["rules"]] == ["large-amount"]

    async def test_one_rule(self, sidecar: Sidecar):
        """A rule with its document fields, ruleset and source location."""
        rule = await sidecar.get("/api/v1/rules/large-amount")
        assert rule["id"] == "large-amount"
        assert rule["ruleset_id"] == "fraud"
        assert rule["points"] == 40
        assert rule["enabled"] is True
        assert rule["source"]["file"].endswith("fraud.yaml")

    async def test_rulesets_list_and_one(self, sidecar: Sidecar):
        """The list has no rules inline; one ruleset has its rules."""
        body = await sidecar.get("/api/v1/rulesets")
        assert body["count"] == 2
        assert {r["id"] for r in body["rulesets"]} == {"fraud", "extra"}
        assert all("rules" not in r for r in body["rulesets"])
        fraud = await sidecar.get("/api/v1/rulesets/fraud")
        assert fraud["rule_count"] == 3
        assert fraud["enabled_rule_count"] == 2
        assert [r["id"] for r in fraud["rules"]][:2] == ["large-amount", "foreign-country"]

    @pytest.mark.parametrize(
        "path",
        [
            "/api/v1/rules",
            "/api/v1/rules/large-amount",
            "/api/v1/rulesets",
            "/api/v1/rulesets/fraud",
        ],
    )
    async def test_etag_and_if_none_match(self, sidecar: Sidecar, path: str):
        """ETag names the revision, the version and the instance; sending it back answers
        304 until a publish."""
        first = etag_of(sidecar)
        response, _ = await sidecar.call("GET", path)
        assert response.headers["ETag"] == first
        response, body = await sidecar.call(
            "GET", path, headers={"If-None-Match": first}, status=304
        )
        assert body is None
        assert response.headers["ETag"] == first
        await sidecar.post(f"{HOT}/reload", json={"force": True})
        response, _ = await sidecar.call("GET", path, headers={"If-None-Match": first})
        assert response.headers["ETag"] == etag_of(sidecar) != first

    @pytest.mark.parametrize("old", ['"1"', 'W/"1"'])
    async def test_a_bare_version_is_not_current(self, sidecar: Sidecar, old: str):
        """The version alone (the tag sidecars gave before; every restart repeats it) is
        not a tag of the current version 1: 200."""
        assert sidecar.state.registry.version == 1
        await sidecar.call("GET", "/api/v1/rules", headers={"If-None-Match": old}, status=200)

    async def test_same_rules_in_another_instance_is_another_etag(
        self, start_sidecar, plain_rules: Path
    ):
        """Two instances that loaded the same rules (same revision, same version) give
        different tags: a read also shows what the revision leaves out (source
        locations, the version a change came from), which may differ between them."""
        first, second = await start_sidecar(plain_rules), await start_sidecar(plain_rules)
        assert first.state.registry.current.revision == second.state.registry.current.revision
        response, _ = await first.call("GET", "/api/v1/rules")
        etag = response.headers["ETag"]
        await second.call("GET", "/api/v1/rules", headers={"If-None-Match": etag}, status=200)

    async def test_if_none_match_weak_tag(self, sidecar: Sidecar):
        """A weak validator W/"<etag>" matches the current ETag (weak comparison)."""
        weak = f"W/{etag_of(sidecar)}"
        await sidecar.call("GET", "/api/v1/rules", headers={"If-None-Match": weak}, status=304)

    async def test_if_none_match_star(self, sidecar: Sidecar):
        """`If-None-Match: *` matches any current representation."""
        await sidecar.call(
            "GET", "/api/v1/rulesets/fraud", headers={"If-None-Match": "*"}, status=304
        )

    async def test_if_none_match_list(self, sidecar: Sidecar):
        """A list of tags in If-None-Match matches when one of them is current."""
        tags = f'"0", {etag_of(sidecar)}'
        await sidecar.call("GET", "/api/v1/rulesets", headers={"If-None-Match": tags}, status=304)

    @pytest.mark.parametrize(
        ("path", "kind"), [("/api/v1/rules/nope", "rule"), ("/api/v1/rulesets/nope", "ruleset")]
    )
    async def test_unknown_id_is_json_404(self, sidecar: Sidecar, path: str, kind: str):
        """Unknown ids answer a JSON error naming what was not found."""
        response, body = await sidecar.call("GET", path, status=404)
        assert response.content_type == "application/json"
        assert body["error"] == {"status": 404, "message": f"{kind} 'nope' not found"}


READS = (
    "/api/v1/rules",
    "/api/v1/rules/large-amount",
    "/api/v1/rulesets",
    "/api/v1/rulesets/fraud",
    f"{HOT}/changes",
)


async def conditional_reads(
    url: str, etags: dict[str, str] | None = None
) -> dict[str, tuple[int, str, Any]]:
    """GET every registry read, with `If-None-Match` its tag in `etags` when given:
    path -> (status, ETag, body or None)."""
    answers = {}
    async with aiohttp.ClientSession() as session:
        for path in READS:
            headers = {"If-None-Match": etags[path]} if etags else {}
            async with session.get(url + path, headers=headers) as response:
                body = await response.json() if response.status == 200 else None
                answers[path] = (response.status, response.headers["ETag"], body)
    return answers


class TestEtagAcrossRestart:
    """A real `serve` process stopped and started again on the same port: a tag the
    first one gave never makes the second answer 304 for what it does not serve."""

    async def test_changed_rules_answer_200_to_the_old_etag(self, tmp_path: Path):
        """`large-amount` worth 40, then restarted worth 55 (both at registry version 1):
        every read answers the old tag with 200 and the new rules."""
        rules = tmp_path / "rules"
        rules.mkdir()
        change_points(rules, 40)
        port = free_port()
        with serving(tmp_path, rules, port=port) as first:
            before = await conditional_reads(first.url)
        change_points(rules, 55)
        with serving(tmp_path, rules, port=port) as second:
            after = await conditional_reads(second.url, {p: a[1] for p, a in before.items()})
        assert {path: answer[0] for path, answer in after.items()} == dict.fromkeys(READS, 200)
        assert after["/api/v1/rules/large-amount"][2]["points"] == 55
        assert after["/api/v1/rulesets/fraud"][2]["rules"][0]["points"] == 55
        assert all(after[path][1] != before[path][1] for path in READS)

    async def test_same_rules_from_another_file_answer_200_to_the_old_etag(self, tmp_path: Path):
        """The same rules moved to another file (the same revision, and again version 1):
        the old tag answers 200, with the source the second instance read them from."""
        rules = tmp_path / "rules"
        rules.mkdir()
        change_points(rules, 40)
        port = free_port()
        with serving(tmp_path, rules, port=port) as first:
            before = await conditional_reads(first.url)
        (rules / "fraud.yaml").rename(rules / "payments.yaml")
        with serving(tmp_path, rules, port=port) as second:
            after = await conditional_reads(second.url, {p: a[1] for p, a in before.items()})
        assert after["/api/v1/rules"][2]["revision"] == before["/api/v1/rules"][2]["revision"]
        assert {path: answer[0] for path, answer in after.items()} == dict.fromkeys(READS, 200)
        rule = after["/api/v1/rules/large-amount"][2]
        assert rule["source"]["file"].endswith("payments.yaml")


class TestEvaluate:
    """`POST /api/v1/rulesets/{id}/evaluate`, single and batch."""

    async def test_single_input(self, sidecar: Sidecar):
        """The contract's fields: ruleset, version, total, decision, matched, errors."""
        result = await sidecar.evaluate("fraud", FOREIGN_LARGE)
        assert result["ruleset_id"] == "fraud"
        assert result["registry_version"] == 1
        assert result["total_points"] == 70
        assert result["decision"] == "deny"
        assert [{k: m[k] for k in ("id", "name", "points")} for m in result["matched"]] == [
            {"id": "large-amount", "name": "Large amount", "points": 40},
            {"id": "foreign-country", "name": "Foreign country", "points": 30},
        ]
        assert result["errors"] == []

    async def test_rule_error_is_reported_and_the_rest_answers(self, sidecar: Sidecar):
        """A condition that errors on the input does not match and is listed in errors."""
        result = await sidecar.evaluate("fraud", {"amount": 5000})
        assert result["total_points"] == 40
        assert result["decision"] == "review"
        assert [e["rule_id"] for e in result["errors"]] == ["foreign-country"]
        assert result["errors"][0]["error"]

    async def test_explain(self, sidecar: Sidecar):
        """`?explain=true` or `"explain": true`, single or batch: each result lists every
        rule's outcome and reads; without it, no `rules`; anything but true/false is 400."""
        url = "/api/v1/rulesets/fraud/evaluate"
        plain = await sidecar.evaluate("fraud", {"amount": 5000})
        assert "rules" not in plain
        by_query = await sidecar.post(f"{url}?explain=true", json={"input": {"amount": 5000}})
        assert {k: v for k, v in by_query.items() if k != "rules"} == plain
        assert [(r["id"], r["outcome"]) for r in by_query["rules"]] == [
            ("large-amount", "matched"),
            ("foreign-country", "error"),
            ("never-on", "disabled"),
        ]
        assert by_query["rules"][1]["reads"] == {"input.country": None}
        by_body = await sidecar.post(url, json={"input": {"amount": 5000}, "explain": True})
        assert by_body["rules"] == by_query["rules"]
        batch = await sidecar.post(
            f"{url}?explain=true", json={"inputs": [{"amount": 5000}, FOREIGN_LARGE]}
        )
        assert [len(result["rules"]) for result in batch["results"]] == [3, 3]
        assert batch["results"][1]["rules"][1]["reads"] == {"input.country": "FR"}
        not_asked = await sidecar.post(f"{url}?explain=false", json={"input": {"amount": 5}})
        assert "rules" not in not_asked
        for bad in (f"{url}?explain=yes", url):
            body = {"input": {}} if "?" in bad else {"input": {}, "explain": "yes"}
            error = await sidecar.post(bad, json=body, status=400)
            assert "explain must be true or false" in error["error"]["message"]

    async def test_default_decision(self, sidecar: Sidecar):
        """No band reached: the default decision."""
        result = await sidecar.evaluate("fraud", {"amount": 5, "country": "US"})
        assert (result["total_points"], result["decision"], result["matched"]) == (0, "allow", [])

    async def test_batch(self, sidecar: Sidecar):
        """`inputs` answers one result per input, all from the batch's registry version."""
        inputs = [FOREIGN_LARGE, {"amount": 5, "country": "US"}, {"amount": 5000}]
        body = await sidecar.post("/api/v1/rulesets/fraud/evaluate", json={"inputs": inputs})
        assert body["registry_version"] == 1
        assert [r["total_points"] for r in body["results"]] == [70, 0, 40]
        assert {r["registry_version"] for r in body["results"]} == {1}

    async def test_numeric_ruleset_id_in_path(self, sidecar: Sidecar):
        """A ruleset whose id is the number 7 is evaluated at `/rulesets/7`."""
        add_numeric_ruleset(sidecar.rules)
        await sidecar.post(f"{HOT}/reload")
        result = await sidecar.evaluate("7", {"amount": 2})
        assert (result["ruleset_id"], result["total_points"]) == ("7", 5)

    async def test_unknown_ruleset_is_404(self, sidecar: Sidecar):
        """Evaluating an unknown ruleset: JSON 404."""
        body = await sidecar.post("/api/v1/rulesets/nope/evaluate", json={"input": {}}, status=404)
        assert body["error"]["message"] == "ruleset 'nope' not found"

    async def test_version_follows_reloads(self, sidecar: Sidecar):
        """After a reload the evaluation names the new version and uses the new points."""
        change_points(sidecar.rules, 50)
        await sidecar.post(f"{HOT}/reload")
        result = await sidecar.evaluate("fraud", FOREIGN_LARGE)
        assert (result["registry_version"], result["total_points"]) == (2, 80)


class TestFrontDoor:
    """The evaluate route is answered in front of the router (`open_front_door`, as
    `serve` wires it); any other spelling of the same path goes through the router. Both
    must answer alike, whatever the request."""

    async def test_the_door_is_in_front(self, sidecar: Sidecar):
        assert sidecar.client.server.runner is not None
        server = sidecar.client.server.runner.server
        assert server is not None
        assert "open_front_door" in server.request_handler.__qualname__

    @pytest.mark.parametrize(
        ("ruleset_id", "suffix", "body", "headers"),
        [
            ("fraud", "", {"input": FOREIGN_LARGE}, {}),
            ("fraud", "?explain=true", {"input": {"amount": 5000}}, {}),
            ("fraud", "", {"inputs": [FOREIGN_LARGE, {"amount": 5}]}, {}),
            ("fraud", "?explain=maybe", {"input": {}}, {}),
            ("fraud", "", {"input": {}, "inputs": []}, {}),
            ("fraud", "", {"input": {"amount": float("nan")}}, {}),
            ("fraud", "", "not json", {}),
            ("fraud", "", ["a", "list"], {}),
            ("nope", "", {"input": {}}, {}),
            ("fraud", "", {"input": {}}, {"Host": "rebind.attacker.example"}),
            ("fraud", "", {"input": {}}, {"Origin": "http://attacker.example"}),
        ],
    )
    async def test_door_and_router_answer_alike(
        self, sidecar: Sidecar, ruleset_id: str, suffix: str, body: Any, headers: dict[str, str]
    ):
        """The door takes `/rulesets/fraud/evaluate`; the router takes the same path
        with its first letter escaped (`%66raud`), which the door leaves alone."""
        escaped = f"%{ord(ruleset_id[0]):02x}{ruleset_id[1:]}"
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        answers = []
        for spelt in (ruleset_id, escaped):
            response, answer = await sidecar.call(
                "POST",
                f"/api/v1/rulesets/{spelt}/evaluate{suffix}",
                data=data,
                headers={"Content-Type": "application/json", **headers},
                status=None,
            )
            answers.append((response.status, response.content_type, answer))
        assert answers[0] == answers[1]

    async def test_expect_continue_is_answered(self, sidecar: Sidecar):
        """A client that waits for `100 Continue` before its body (curl does, past 1 KiB)
        gets it: such a request is left to the router, which sends it."""
        port = sidecar.client.server.port
        body = json.dumps({"input": FOREIGN_LARGE}).encode()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(
                b"POST /api/v1/rulesets/fraud/evaluate HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Type: application/json\r\nExpect: 100-continue\r\n"
                b"Content-Length: %d\r\n\r\n" % len(body)
            )
            interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert interim.startswith(b"HTTP/1.1 100 Continue")
            writer.write(body)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200")
        finally:
            writer.close()


class TestStats:
    """`GET /api/v1/rulesets/{id}/stats`: counts since the content went live and since start."""

    async def test_counts_rules_and_decisions(self, sidecar: Sidecar):
        await sidecar.evaluate("fraud", FOREIGN_LARGE)  # 70 points: deny
        inputs = [{"amount": 5, "country": "US"}, {"amount": 5, "country": "FR"}, {}]
        await sidecar.post("/api/v1/rulesets/fraud/evaluate", json={"inputs": inputs})
        stats = await sidecar.get("/api/v1/rulesets/fraud/stats")
        assert stats["ruleset_id"] == "fraud"
        assert stats["registry_version"] == 1
        current = stats["current"]
        assert current["since_version"] == 1
        datetime.fromisoformat(current["since"])
        assert current["evaluations"] == 4
        assert current["decisions"] == [
            {"decision": "deny", "count": 1},
            {"decision": "review", "count": 0},
            {"decision": "allow", "count": 3},
        ]
        by_id = {rule["id"]: rule for rule in current["rules"]}
        assert [rule["id"] for rule in current["rules"]] == [
            "large-amount",
            "foreign-country",
            "never-on",
        ]
        assert by_id["large-amount"] == {
            "id": "large-amount",
            "mode": "active",
            "enabled": True,
            "matches": 1,
            "errors": 1,
            "hit_rate": 0.25,
        }
        assert by_id["foreign-country"]["matches"] == 2
        assert by_id["never-on"] == {
            "id": "never-on",
            "mode": "active",
            "enabled": False,
            "matches": 0,
            "errors": 0,
            "hit_rate": None,
        }
        assert stats["since_start"]["evaluations"] == 4
        assert stats["since_start"]["since_version"] is None

    async def test_a_change_starts_a_new_span(self, sidecar: Sidecar):
        """After the ruleset changes, `current` counts from zero and names the version
        that published the change; `since_start` goes on; another ruleset's change does
        not restart it."""
        await sidecar.evaluate("fraud", FOREIGN_LARGE)
        (sidecar.rules / "extra.yaml").write_text(
            dump_yaml(make_ruleset_doc("extra", [{"id": "x", "condition": "false", "points": 1}])),
            encoding="utf-8",
        )
        await sidecar.post(f"{HOT}/reload")
        stats = await sidecar.get("/api/v1/rulesets/fraud/stats")
        assert (stats["current"]["evaluations"], stats["current"]["since_version"]) == (1, 1)
        change_points(sidecar.rules, 55)
        await sidecar.post(f"{HOT}/reload")
        stats = await sidecar.get("/api/v1/rulesets/fraud/stats")
        assert stats["registry_version"] == 3
        assert (stats["current"]["evaluations"], stats["current"]["since_version"]) == (0, 3)
        assert stats["current"]["rules"][0]["hit_rate"] is None
        await sidecar.evaluate("fraud", FOREIGN_LARGE)  # 85 points: deny
        stats = await sidecar.get("/api/v1/rulesets/fraud/stats")
        assert stats["current"]["evaluations"] == 1
        assert stats["since_start"]["evaluations"] == 2
        large = stats["since_start"]["rules"][0]
        assert (large["id"], large["matches"], large["hit_rate"]) == ("large-amount", 2, 1.0)

    async def test_unknown_ruleset_is_404(self, sidecar: Sidecar):
        await sidecar.get("/api/v1/rulesets/nope/stats", status=404)


class TestErrors:
    """Every error is JSON with the right status."""

    EVALUATE = "/api/v1/rulesets/fraud/evaluate"

    @pytest.mark.parametrize(
        ("data", "fragment"),
        [
            (b"{not json", "not valid JSON"),
            (b"[1, 2]", "JSON object"),
            (b'"text"', "JSON object"),
            (b"\xff\xfe", "not valid JSON"),
        ],
    )
    async def test_bad_bodies_are_400(self, sidecar: Sidecar, data: bytes, fragment: str):
        """Bodies that are not a JSON object: 400 saying so."""
        body = await sidecar.post(
            self.EVALUATE, data=data, headers={"Content-Type": "application/json"}, status=400
        )
        assert body["error"]["status"] == 400
        assert fragment in body["error"]["message"]

    @pytest.mark.parametrize(
        "payload",
        [
            {},
            {"input": {}, "inputs": [{}]},
            {"inputs": []},
            {"inputs": {"amount": 1}},
        ],
    )
    async def test_input_xor_inputs(self, sidecar: Sidecar, payload: dict[str, Any]):
        """Exactly one of input or inputs, and inputs a non-empty list: else 400."""
        await sidecar.post(self.EVALUATE, json=payload, status=400)

    @pytest.mark.parametrize("encoding", ["gzip", "deflate"])
    @pytest.mark.parametrize("path", [EVALUATE, f"{HOT}/validate"])
    async def test_a_body_its_encoding_does_not_fit_is_400(
        self, sidecar: Sidecar, caplog: pytest.LogCaptureFixture, encoding: str, path: str
    ):
        """A body that is not what its Content-Encoding says is the client's mistake: 400
        naming it, the connection closed, and no traceback in the log (any caller could
        fill it that way); the sidecar answers the next request."""
        response, body = await sidecar.call(
            "POST",
            path,
            data=b'{"input": {}}',
            headers={"Content-Type": "application/json", "Content-Encoding": encoding},
            status=400,
        )
        assert f"content-encoding: {encoding}" in body["error"]["message"]
        assert response.headers["Connection"] == "close"
        assert not [r for r in caplog.records if r.exc_info or r.levelname == "ERROR"]
        assert (await sidecar.evaluate("fraud", FOREIGN_LARGE))["total_points"] == 70

    async def test_missing_body_is_400(self, sidecar: Sidecar):
        """Evaluate without a body: 400."""
        body = await sidecar.post(self.EVALUATE, status=400)
        assert "body" in body["error"]["message"]

    async def test_input_too_deep_names_its_path(self, sidecar: Sidecar):
        """An input nested past the depth limit: 400 with the path where it broke."""
        deep: Any = 1
        for _ in range(40):
            deep = {"a": deep}
        body = await sidecar.post(self.EVALUATE, json={"input": deep}, status=400)
        assert body["error"]["path"].startswith("$.input.a.a")

    async def test_batch_limit_path_names_the_input(self, sidecar: Sidecar):
        """In a batch the path names which input broke the string length limit."""
        inputs = [{"amount": 1}, {"country": "x" * 70_000}]
        body = await sidecar.post(self.EVALUATE, json={"inputs": inputs}, status=400)
        assert body["error"]["path"] == "$.inputs[1].country"

    async def test_unknown_route_is_json_404(self, sidecar: Sidecar):
        """A path no route serves: JSON 404."""
        response, body = await sidecar.call("GET", "/no/such/path", status=404)
        assert response.content_type == "application/json"
        assert body["error"]["status"] == 404

    @pytest.mark.parametrize("path", [f"{HOT}/reload", f"{HOT}/validate", EVALUATE])
    async def test_get_on_post_route_is_405(self, sidecar: Sidecar, path: str):
        """GET on a POST route: JSON 405 with an Allow header."""
        response, body = await sidecar.call("GET", path, status=405)
        assert response.headers["Allow"] == "POST"
        assert body["error"]["status"] == 405

    async def test_body_over_limit_is_413(self, start_sidecar, plain_rules: Path):
        """A body past `max_body_bytes`: JSON 413."""
        app = await start_sidecar(plain_rules, max_body_bytes=2048)
        payload = {"input": {"note": "x" * 4096}}
        body = await app.post(self.EVALUATE, json=payload, status=413)
        assert body["error"]["status"] == 413
        small = await app.post(self.EVALUATE, json={"input": FOREIGN_LARGE})
        assert small["total_points"] == 70

    async def test_reload_rate_limit_is_429(self, start_sidecar, plain_rules: Path):
        """Past `reload_rate_per_minute`, reloads and rollbacks answer 429 with Retry-After
        and the setting named; validations have a budget of their own."""
        app = await start_sidecar(plain_rules, reload_rate_per_minute=2, validate_rate_per_minute=1)
        await app.post(f"{HOT}/reload")
        await app.post(f"{HOT}/reload")
        response, body = await app.call("POST", f"{HOT}/reload", status=429)
        assert 1 <= int(response.headers["Retry-After"]) <= 30
        assert body["error"]["status"] == 429
        assert body["error"]["limit"] == "RULE_SIDECAR_RELOAD_RATE_PER_MINUTE"
        await app.post(f"{HOT}/rollback", status=429)
        await app.post(f"{HOT}/validate")
        body = await app.post(f"{HOT}/validate", status=429)
        assert body["error"]["limit"] == "RULE_SIDECAR_VALIDATE_RATE_PER_MINUTE"
        assert len((await app.get(f"{HOT}/history"))["history"]) == 3


class TestAdminToken:
    """With `admin_token_file`, admin endpoints need the bearer token; reads stay open."""

    @pytest.fixture
    async def guarded(self, start_sidecar, plain_rules: Path, tmp_path: Path) -> Sidecar:
        """The app with the token `s3cret` (file with a trailing newline)."""
        token = tmp_path / "token"
        token.write_text("s3cret\n", encoding="utf-8")
        return await start_sidecar(plain_rules, admin_token_file=token)

    ADMIN = (
        f"{HOT}/reload",
        f"{HOT}/reload/rule/large-amount",
        f"{HOT}/reload/ruleset/fraud",
        f"{HOT}/monitoring/start",
        f"{HOT}/monitoring/stop",
        f"{HOT}/rollback",
    )

    @pytest.mark.parametrize("path", ADMIN)
    async def test_without_token_is_401(self, guarded: Sidecar, path: str):
        """No Authorization header: JSON 401."""
        body = await guarded.post(path, status=401)
        assert body["error"]["status"] == 401

    @pytest.mark.parametrize("header", ["Bearer wrong", "Basic s3cret", "Bearer", "s3cret"])
    async def test_wrong_token_is_401(self, guarded: Sidecar, header: str):
        """A wrong token or scheme: 401, and no reload happens."""
        await guarded.post(f"{HOT}/reload", headers={"Authorization": header}, status=401)
        assert len((await guarded.get(f"{HOT}/history"))["history"]) == 1

    async def test_right_token_is_200(self, guarded: Sidecar):
        """The right token (any case of `Bearer`) is accepted."""
        await guarded.post(f"{HOT}/reload", headers={"Authorization": "Bearer s3cret"})
        await guarded.post(
            f"{HOT}/rollback", headers={"Authorization": "bearer s3cret"}, status=404
        )

    async def test_rejected_requests_use_no_reload_budget(
        self, start_sidecar, plain_rules: Path, tmp_path: Path
    ):
        """Unauthenticated reloads are refused before the rate limit counts them."""
        token = tmp_path / "token"
        token.write_text("s3cret", encoding="utf-8")
        app = await start_sidecar(plain_rules, admin_token_file=token, reload_rate_per_minute=2)
        for _ in range(3):
            await app.post(f"{HOT}/reload", status=401)
        for _ in range(2):
            await app.post(f"{HOT}/reload", headers={"Authorization": "Bearer s3cret"})

    async def test_reads_stay_open(self, guarded: Sidecar):
        """Status, history, health, probes, registry reads and evaluation need no token."""
        for path in (
            f"{HOT}/status",
            f"{HOT}/history",
            "/health/hot-reload",
            "/livez",
            "/readyz",
            "/api/v1/rules",
            "/api/v1/rulesets/fraud",
            "/metrics",
        ):
            await guarded.call("GET", path)
        await guarded.evaluate("fraud", FOREIGN_LARGE)
        assert (await guarded.post(f"{HOT}/validate"))["valid"] is True

    async def test_401_challenges_with_www_authenticate(self, guarded: Sidecar):
        """A 401 carries `WWW-Authenticate: Bearer` (RFC 9110 requires a challenge)."""
        response, _ = await guarded.call("POST", f"{HOT}/reload", status=401)
        assert response.headers.get("WWW-Authenticate") == "Bearer"


class TestBrowserGuard:
    """Host and Origin checks: a page of another site, in a browser on the sidecar's
    machine, can neither rebind its name to the sidecar nor post to it cross-origin."""

    @pytest.mark.parametrize(
        "host",
        ["127.0.0.1:8000", "localhost:8000", "[::1]:8000", "10.1.2.3", "app.localhost:8000"],
    )
    async def test_addresses_of_this_machine_pass(self, sidecar: Sidecar, host: str):
        """IP literals and localhost names cannot be an attacker's DNS name."""
        await sidecar.get("/api/v1/rulesets", headers={"Host": host})

    async def test_a_rebound_name_is_refused(self, sidecar: Sidecar):
        """A Host that names another site is refused, saying how to allow a real name."""
        body = await sidecar.get(
            "/api/v1/rulesets", headers={"Host": "rebind.attacker.example:8000"}, status=403
        )
        assert "RULE_SIDECAR_ALLOWED_HOSTS" in body["error"]["message"]

    @pytest.mark.parametrize("host", ["[", "[::1", "a]b", "[zz]:80"])
    async def test_a_host_that_is_no_authority_is_refused(self, sidecar: Sidecar, host: str):
        """Not an authority at all: a 403 like any other name, not a 500 with a
        traceback in the log (which any caller could fill that way)."""
        body = await sidecar.get("/api/v1/rulesets", headers={"Host": host}, status=403)
        assert "RULE_SIDECAR_ALLOWED_HOSTS" in body["error"]["message"]

    @pytest.mark.parametrize("origin", ["http://[", "http://[::1", "http://a]b"])
    async def test_an_origin_that_is_no_url_is_refused(self, sidecar: Sidecar, origin: str):
        body = await sidecar.post(
            f"{HOT}/validate", headers={"Origin": origin}, json={}, status=403
        )
        assert "cross-origin" in body["error"]["message"]

    async def test_an_allowed_name_passes(self, start_sidecar, plain_rules: Path):
        """RULE_SIDECAR_ALLOWED_HOSTS admits the names the operator gives."""
        app = await start_sidecar(plain_rules, allowed_hosts=("rules.internal",))
        await app.get("/api/v1/rulesets", headers={"Host": "rules.internal:8000"})
        await app.get("/api/v1/rulesets", headers={"Host": "other.internal"}, status=403)

    async def test_cross_origin_post_is_refused(self, sidecar: Sidecar):
        """A simple cross-origin POST (no preflight) never reaches the reload."""
        before = len(sidecar.service.log.newest())
        body = await sidecar.post(
            f"{HOT}/reload",
            headers={"Origin": "https://attacker.example", "Content-Type": "text/plain"},
            data="{}",
            status=403,
        )
        assert "cross-origin" in body["error"]["message"]
        assert len(sidecar.service.log.newest()) == before

    async def test_same_origin_post_passes(self, sidecar: Sidecar):
        """A page the sidecar serves itself (the dashboard) posts same-origin."""
        url = sidecar.client.make_url("")
        origin = f"http://{url.host}:{url.port}"
        await sidecar.post(f"{HOT}/reload", headers={"Origin": origin}, json={})

    async def test_cross_origin_websocket_is_refused(self, sidecar: Sidecar):
        """Browsers open WebSockets cross-origin without asking: refused at the handshake."""
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await sidecar.client.ws_connect(
                "/ws/hot-reload", headers={"Origin": "https://attacker.example"}
            )
        assert refused.value.status == 403

    async def test_reads_need_no_origin_check(self, sidecar: Sidecar):
        """A cross-origin GET is harmless (no CORS headers: the page cannot read it)."""
        response, _ = await sidecar.call(
            "GET", "/api/v1/rulesets", headers={"Origin": "https://attacker.example"}
        )
        assert "Access-Control-Allow-Origin" not in response.headers


class TestProbes:
    """`/livez`, `/readyz` and `/health/hot-reload` for the kubelet."""

    @pytest.fixture
    def broken_rules(self, tmp_path: Path) -> Path:
        """A rules directory whose only file is invalid."""
        directory = tmp_path / "broken"
        directory.mkdir()
        (directory / "fraud.yaml").write_text(INVALID_RULES, encoding="utf-8")
        return directory

    async def test_livez(self, sidecar: Sidecar):
        """Alive whenever the process answers."""
        assert await sidecar.get("/livez") == {"status": "alive"}

    async def test_ready_after_load(self, sidecar: Sidecar):
        """Ready once a snapshot serves."""
        assert await sidecar.get("/readyz") == {"ready": True}

    async def test_not_ready_before_any_good_load(self, start_sidecar, broken_rules: Path):
        """Nothing valid ever loaded: readyz 503, health unhealthy 503, livez still 200."""
        app = await start_sidecar(broken_rules)
        assert await app.get("/readyz", status=503) == {"ready": False}
        code, health = await app.health()
        assert (code, health["status"]) == (503, "unhealthy")
        assert await app.get("/livez") == {"status": "alive"}

    async def test_ready_after_the_fix(self, start_sidecar, broken_rules: Path):
        """Fixing the file and reloading makes the app ready and healthy."""
        app = await start_sidecar(broken_rules)
        (broken_rules / "fraud.yaml").write_text(dump_yaml(fraud_doc()), encoding="utf-8")
        await app.post(f"{HOT}/reload")
        assert await app.get("/readyz") == {"ready": True}
        code, _ = await app.health()
        assert code == 200

    async def test_ready_stays_through_a_failed_reload(self, sidecar: Sidecar):
        """A later failed reload leaves readiness alone and health degraded, not 503."""
        (sidecar.rules / "fraud.yaml").write_text(INVALID_RULES, encoding="utf-8")
        await sidecar.post(f"{HOT}/reload", status=422)
        assert await sidecar.get("/readyz") == {"ready": True}
        code, health = await sidecar.health()
        assert (code, health["status"]) == (200, "degraded")
        assert health["checks"]["last_reload_successful"] is False


class TestMetrics:
    """`/metrics` exposes the reload, registry, evaluation and WebSocket series."""

    async def scrape(self, app: Sidecar) -> str:
        response = await app.client.get("/metrics")
        assert response.status == 200
        assert response.content_type == "text/plain"
        return await response.text()

    async def test_reload_and_registry_metrics(self, sidecar: Sidecar):
        """Reload counter by trigger and outcome, success gauge and registry version."""
        await sidecar.post(f"{HOT}/reload", json={"force": True})
        text = await self.scrape(sidecar)
        reloads = "rule_sidecar_rule_reloads_total"
        assert metric_value(text, reloads, {"trigger": "startup", "outcome": "success"}) == 1
        assert metric_value(text, reloads, {"trigger": "api", "outcome": "success"}) == 1
        assert metric_value(text, "rule_sidecar_last_reload_successful") == 1
        assert metric_value(text, "rule_sidecar_registry_version") == 2

    async def test_failed_reload_metrics(self, sidecar: Sidecar):
        """A failure counts as outcome `failed` and sets last_reload_successful to 0."""
        (sidecar.rules / "fraud.yaml").write_text(INVALID_RULES, encoding="utf-8")
        await sidecar.post(f"{HOT}/reload", status=422)
        text = await self.scrape(sidecar)
        failed = {"trigger": "api", "outcome": "failed"}
        assert metric_value(text, "rule_sidecar_rule_reloads_total", failed) == 1
        assert metric_value(text, "rule_sidecar_last_reload_successful") == 0
        assert metric_value(text, "rule_sidecar_registry_version") == 1

    async def test_evaluation_metrics(self, sidecar: Sidecar):
        """Every evaluated input counts, by ruleset, batch inputs each."""
        await sidecar.evaluate("fraud", FOREIGN_LARGE)
        await sidecar.post(
            "/api/v1/rulesets/fraud/evaluate", json={"inputs": [FOREIGN_LARGE, FOREIGN_LARGE]}
        )
        text = await self.scrape(sidecar)
        labels = {"ruleset": "fraud"}
        assert metric_value(text, "rule_sidecar_evaluations_total", labels) == 3

    async def test_rule_errors_count_by_ruleset(self, sidecar: Sidecar):
        """Each condition that errored counts: an input without `amount` or `country`
        errors both fraud rules; a batch counts every input's errors."""
        text = await self.scrape(sidecar)
        errors = "rule_sidecar_evaluation_rule_errors_total"
        assert metric_value(text, errors, {"ruleset": "fraud"}) is None
        await sidecar.evaluate("fraud", {})
        await sidecar.post(
            "/api/v1/rulesets/fraud/evaluate", json={"inputs": [{"amount": 5}, FOREIGN_LARGE]}
        )
        text = await self.scrape(sidecar)
        assert metric_value(text, errors, {"ruleset": "fraud"}) == 3
        assert metric_value(text, "rule_sidecar_evaluations_total", {"ruleset": "fraud"}) == 3

    async def test_removed_ruleset_series_are_dropped(self, sidecar: Sidecar):
        """A ruleset removed by a reload no longer has evaluation series."""
        await sidecar.post("/api/v1/rulesets/extra/evaluate", json={"input": {}})
        text = await self.scrape(sidecar)
        assert metric_value(text, "rule_sidecar_evaluations_total", {"ruleset": "extra"}) == 1
        (sidecar.rules / "extra.yaml").unlink()
        await sidecar.post(f"{HOT}/reload")
        text = await self.scrape(sidecar)
        assert metric_value(text, "rule_sidecar_evaluations_total", {"ruleset": "extra"}) is None

    async def test_rule_and_decision_series(self, sidecar: Sidecar):
        """Each rule's matches and errors and each decision count, only once they happen;
        a decision of none would be the empty label."""
        text = await self.scrape(sidecar)
        matches, decisions = "rule_sidecar_rule_matches_total", "rule_sidecar_decisions_total"
        assert "rule_sidecar_rule_matches_total{" not in text
        await sidecar.evaluate("fraud", FOREIGN_LARGE)  # both rules: 70 points, deny
        inputs = [{"amount": 5, "country": "US"}, {"amount": 5000, "country": "US"}, {}]
        await sidecar.post("/api/v1/rulesets/fraud/evaluate", json={"inputs": inputs})
        text = await self.scrape(sidecar)
        large = {"ruleset": "fraud", "rule": "large-amount", "mode": "active"}
        foreign = {"ruleset": "fraud", "rule": "foreign-country", "mode": "active"}
        assert metric_value(text, matches, large) == 2
        assert metric_value(text, matches, foreign) == 1
        assert metric_value(text, matches, {**large, "rule": "never-on"}) is None  # disabled
        errors = "rule_sidecar_rule_errors_total"
        assert metric_value(text, errors, {"ruleset": "fraud", "rule": "large-amount"}) == 1
        assert metric_value(text, errors, {"ruleset": "fraud", "rule": "foreign-country"}) == 1
        assert metric_value(text, decisions, {"ruleset": "fraud", "decision": "deny"}) == 1
        assert metric_value(text, decisions, {"ruleset": "fraud", "decision": "review"}) == 1
        assert metric_value(text, decisions, {"ruleset": "fraud", "decision": "allow"}) == 2

    async def test_a_removed_rule_stops_being_exported(self, sidecar: Sidecar):
        """A rule a reload removed has no series any more; the others keep counting up."""
        await sidecar.evaluate("fraud", FOREIGN_LARGE)
        doc = fraud_doc()
        doc["spec"]["rules"] = [r for r in doc["spec"]["rules"] if r["id"] != "foreign-country"]
        (sidecar.rules / "fraud.yaml").write_text(dump_yaml(doc), encoding="utf-8")
        await sidecar.post(f"{HOT}/reload")
        await sidecar.evaluate("fraud", FOREIGN_LARGE)
        text = await self.scrape(sidecar)
        matches = "rule_sidecar_rule_matches_total"
        large = {"ruleset": "fraud", "rule": "large-amount", "mode": "active"}
        assert metric_value(text, matches, large) == 2
        assert metric_value(text, matches, {**large, "rule": "foreign-country"}) is None
        assert metric_value(text, "rule_sidecar_evaluations_total", {"ruleset": "fraud"}) == 2

    async def test_websocket_clients_gauge(self, sidecar: Sidecar):
        """The gauge counts connected WebSocket clients, up and down again."""
        ws = await sidecar.client.ws_connect("/ws/hot-reload")
        await ws.receive_json()
        text = await self.scrape(sidecar)
        assert metric_value(text, "rule_sidecar_websocket_clients") == 1
        await ws.close()

        async def back_to_zero() -> bool:
            text = await self.scrape(sidecar)
            return metric_value(text, "rule_sidecar_websocket_clients") == 0

        await eventually(back_to_zero, message="websocket gauge back to 0")

    async def test_asyncio_tasks_gauge(self, sidecar: Sidecar):
        """The gauge counts the event loop's tasks; clients that come and go leave it where
        it was (a count that keeps growing is a leak)."""
        clients = 5

        async def tasks() -> float | None:
            return metric_value(await self.scrape(sidecar), "rule_sidecar_asyncio_tasks")

        before = await tasks()
        assert before is not None
        assert before >= 1
        assert before == int(before)
        sockets = [await sidecar.client.ws_connect("/ws/hot-reload") for _ in range(clients)]
        for ws in sockets:
            await ws.receive_json()  # the status message: the handler and its writer run
        during = await tasks()
        assert during is not None
        assert during >= before + clients
        for ws in sockets:
            await ws.close()

        async def back_where_it_was() -> bool:
            return await tasks() == before

        await eventually(back_where_it_was, message=f"asyncio tasks back to {before}")

    async def test_metrics_are_per_app(self, sidecar: Sidecar, start_sidecar, plain_rules):
        """Two apps in one process keep separate metrics (no global registry)."""
        other = await start_sidecar(plain_rules)
        await sidecar.evaluate("fraud", FOREIGN_LARGE)
        text = await self.scrape(other)
        assert metric_value(text, "rule_sidecar_evaluations_total", {"ruleset": "fraud"}) is None
        text = await self.scrape(sidecar)
        assert metric_value(text, "rule_sidecar_evaluations_total", {"ruleset": "fraud"}) == 1

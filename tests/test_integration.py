"""The seed's in-process integration helpers over a RuleRegistry."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pytest
from conftest import load_docs, make_ruleset_doc, rule_doc

from sidecar.editing import RegistryEditor
from sidecar.errors import InputError, NotFoundError
from sidecar.integration import (
    execute_rules_from_registry,
    get_registry_info,
    get_rules_from_registry,
    registry_age_seconds,
    validate_registry_rules,
)
from sidecar.loader import Loader
from sidecar.registry import RuleRegistry


def _payments() -> dict[str, Any]:
    return make_ruleset_doc(
        "payments",
        [
            rule_doc("big", "input.amount > 1000", 40, name="Big amount", priority=1),
            rule_doc("foreign", "input.country != 'FR'", 25),
            rule_doc("old", "input.amount > 0", 99, enabled=False),
            rule_doc("flagged", "input.flags.exists(f, f == 'fraud')", 50),
        ],
        decisions=[
            {"decision": "deny", "min_points": 60},
            {"decision": "review", "min_points": 30},
        ],
        default_decision="allow",
        tests=[
            {
                "name": "big foreign",
                "input": {"amount": 5000, "country": "DE", "flags": []},
                "expect": {"total_points": 65, "decision": "deny"},
            }
        ],
    )


@pytest.fixture
def registry() -> RuleRegistry:
    registry = RuleRegistry()
    registry.publish(
        load_docs(
            _payments(), make_ruleset_doc("other", [rule_doc("o1"), rule_doc("o2", enabled=False)])
        )
    )
    return registry


class TestExecuteRules:
    """execute_rules_from_registry evaluates the current snapshot and returns a plain dict."""

    def test_returns_result_fields(self, registry):
        """The result names matched rules, total_points, decision and registry_version."""
        result = execute_rules_from_registry(
            registry, {"amount": 5000, "country": "DE", "flags": []}, "payments"
        )
        assert result["ruleset_id"] == "payments"
        assert result["total_points"] == 65
        assert result["decision"] == "deny"
        assert result["registry_version"] == registry.version == 1
        assert result["revision"] == registry.current.revision
        assert [m["id"] for m in result["matched"]] == ["big", "foreign"]
        assert result["matched"][0]["name"] == "Big amount"
        assert result["matched"][0]["points"] == 40
        assert result["errors"] == []

    def test_errors_are_reported_per_rule(self, registry):
        """A rule that errors on the input shows up in errors; the rest still count."""
        result = execute_rules_from_registry(registry, {"amount": 10, "country": "FR"}, "payments")
        assert result["total_points"] == 0
        assert result["decision"] == "allow"
        assert [e["rule_id"] for e in result["errors"]] == ["flagged"]

    def test_follows_new_publishes(self, registry):
        """After a publish the helper evaluates the new version."""
        edit = {"id": "o1", "condition": "true", "points": 26}
        RegistryEditor(registry).update_rule(edit, "other")
        result = execute_rules_from_registry(registry, {}, "other")
        assert result["total_points"] == 26
        assert result["registry_version"] == 2

    def test_numeric_ruleset_id(self):
        """A numeric ruleset id is looked up as its decimal string."""
        registry = RuleRegistry()
        registry.publish(load_docs(make_ruleset_doc(42, [rule_doc("r", points=3)])))
        assert execute_rules_from_registry(registry, {}, 42)["total_points"] == 3

    def test_unknown_ruleset_and_bad_input(self, registry):
        """An unknown ruleset raises NotFoundError; a non-JSON input raises InputError."""
        with pytest.raises(NotFoundError):
            execute_rules_from_registry(registry, {}, "nope")
        with pytest.raises(InputError):
            execute_rules_from_registry(registry, {"amount": {1, 2}}, "payments")


class TestRegistryInfo:
    """get_registry_info reports version, counts and when the registry was last published."""

    def test_info_fields(self, registry):
        """The info carries version, last_reload, rule_count and ruleset_count."""
        info = get_registry_info(registry)
        assert info["version"] == 1
        assert info["rule_count"] == 6
        assert info["ruleset_count"] == 2
        assert info["last_reload"] == registry.last_publish.isoformat()
        assert datetime.fromisoformat(info["last_reload"]) == registry.last_publish

    def test_info_before_any_publish(self):
        """Before any publish the version is 0 and last_reload is None."""
        info = get_registry_info(RuleRegistry())
        assert (info["version"], info["rule_count"], info["ruleset_count"]) == (0, 0, 0)
        assert info["last_reload"] is None

    def test_info_tracks_publishes(self, registry):
        """After an edit the version and counts follow."""
        RegistryEditor(registry).remove_rule("o1")
        info = get_registry_info(registry)
        assert (info["version"], info["rule_count"]) == (2, 5)


class TestRegistryAge:
    """registry_age_seconds: how long the current content has served (freshness, which
    is about the last successful check of the sources, is tested in test_service.py)."""

    def test_no_age_before_any_publish(self):
        assert registry_age_seconds(RuleRegistry()) is None

    def test_republish_resets_the_age(self, registry):
        """A new publish resets the age."""
        first = registry.last_publish
        registry.publish(registry.current)
        assert registry.last_publish >= first
        later = registry.last_publish + timedelta(seconds=5)
        assert registry_age_seconds(registry, now=later) == pytest.approx(5.0)


class TestValidateRegistryRules:
    """validate_registry_rules re-runs every ruleset's checks on the current snapshot."""

    def test_valid_registry(self, registry):
        """A registry whose rulesets pass their checks is valid with no errors."""
        report = validate_registry_rules(registry)
        assert report["valid"] is True
        assert report["total_rules"] == 6
        assert report["invalid_rules"] == 0
        assert report["errors"] == []
        assert report["registry_version"] == 1

    def test_invalid_ruleset_is_reported(self):
        """A ruleset published without checks whose embedded test fails is reported."""
        broken = _payments()
        broken["spec"]["tests"][0]["expect"]["total_points"] = 1
        registry = RuleRegistry()
        registry.publish(
            load_docs(
                broken, make_ruleset_doc("other", [rule_doc("o1")]), loader=Loader(run_checks=False)
            )
        )
        report = validate_registry_rules(registry)
        assert report["valid"] is False
        assert report["total_rules"] == 5
        assert report["invalid_rules"] >= 1
        assert len(report["errors"]) == 1
        error = report["errors"][0]
        assert error["ruleset_id"] == "payments"
        assert "big foreign" in error["error"]
        assert error["location"].startswith("rules.yaml:")

    def test_empty_registry_is_valid(self):
        """An empty registry is trivially valid."""
        report = validate_registry_rules(RuleRegistry())
        assert (report["valid"], report["total_rules"], report["invalid_rules"]) == (True, 0, 0)


class TestGetRules:
    """get_rules_from_registry returns rules as dicts, enabled ones unless asked otherwise."""

    def test_excludes_disabled_by_default(self, registry):
        """Disabled rules are left out unless include_disabled is set."""
        ids = [r["id"] for r in get_rules_from_registry(registry, "payments")]
        assert ids == ["big", "foreign", "flagged"]
        all_ids = [
            r["id"] for r in get_rules_from_registry(registry, "payments", include_disabled=True)
        ]
        assert all_ids == ["big", "foreign", "old", "flagged"]

    def test_all_rulesets_without_id(self, registry):
        """Without a ruleset id, enabled rules of every ruleset are returned."""
        ids = sorted(r["id"] for r in get_rules_from_registry(registry))
        assert ids == ["big", "flagged", "foreign", "o1"]
        every = get_rules_from_registry(registry, include_disabled=True)
        assert len(every) == 6

    def test_rule_dict_fields(self, registry):
        """Each rule dict carries its document fields, ruleset id and source location."""
        [big] = [r for r in get_rules_from_registry(registry, "payments") if r["id"] == "big"]
        assert big["ruleset_id"] == "payments"
        assert big["name"] == "Big amount"
        assert big["condition"] == "input.amount > 1000"
        assert big["points"] == 40
        assert big["priority"] == 1
        assert big["enabled"] is True
        assert big["source"]["file"] == "rules.yaml"
        assert big["source"]["line"] >= 1

    def test_unknown_ruleset_gives_empty_list(self, registry):
        """An unknown ruleset id gives no rules rather than an error."""
        assert get_rules_from_registry(registry, "nope") == []

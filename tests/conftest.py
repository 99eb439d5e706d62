"""Shared helpers for the test suite: build RuleSet documents and write rule files.

This is the one place that builds RuleSet documents (`make_ruleset_doc`, `rule_doc`,
`fraud_doc`) and turns them into YAML (`dump_yaml`); every test module imports them from here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.loader import Loader
from sidecar.registry import ChangeEvent
from sidecar.rulefiles import SourceFile
from sidecar.snapshot import Snapshot

FIXTURES = Path(__file__).parent / "fixtures"

# The support modules: their fixtures serve every test module, and pytest rewrites their
# asserts (as it does for any plugin), so test modules import their helpers like any other.
pytest_plugins = ["db_support", "kube_support", "server_support"]

SLOW_MODULE = re.compile(r"^pytestmark = pytest\.mark\.slow$", re.MULTILINE)


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """The quick loop (`-m "not slow"`) does not even import a module marked slow as a
    whole: importing them (schemathesis, selenium, the Kubernetes client) takes seconds,
    and every one of their tests would be deselected anyway."""
    if " ".join(config.option.markexpr.split()) != "not slow":
        return None
    if collection_path.suffix != ".py" or not collection_path.name.startswith("test_"):
        return None
    return bool(SLOW_MODULE.search(collection_path.read_text("utf-8"))) or None


def make_ruleset_doc(
    ruleset_id: str | int = "demo",
    rules: Iterable[Mapping[str, Any]] | None = None,
    **spec_extra: Any,
) -> dict[str, Any]:
    """A minimal valid `rule-sidecar/v1` RuleSet document as a plain dict.

    Without `rules`, one rule `<ruleset_id>-big` (`input.amount > 100`, 10 points) is used,
    so documents built for different ruleset ids never share a rule id.
    """
    if rules is None:
        rules = [rule_doc(f"{ruleset_id}-big", "input.amount > 100", 10)]
    return {
        "apiVersion": "rule-sidecar/v1",
        "kind": "RuleSet",
        "metadata": {"id": ruleset_id},
        "spec": {"rules": [dict(rule) for rule in rules], **spec_extra},
    }


def rule_doc(
    rule_id: str | int, condition: str = "true", points: int = 1, **extra: Any
) -> dict[str, Any]:
    """One rule of a RuleSet document."""
    return {"id": rule_id, "condition": condition, "points": points, **extra}


def fraud_doc(large_points: int = 40, *, disabled_rule: bool = True) -> dict[str, Any]:
    """The `fraud` ruleset: decision bands, two scoring rules and (optionally) a disabled one."""
    rules: list[dict[str, Any]] = [
        {
            "id": "large-amount",
            "name": "Large amount",
            "condition": "input.amount > 1000",
            "points": large_points,
            "priority": 10,
            "tags": ["amount"],
        },
        {
            "id": "foreign-country",
            "name": "Foreign country",
            "condition": "input.country != 'US'",
            "points": 30,
        },
    ]
    if disabled_rule:
        rules.append(
            {
                "id": "never-on",
                "name": "Disabled rule",
                "condition": "true",
                "points": 99,
                "enabled": False,
            }
        )
    return make_ruleset_doc(
        "fraud",
        rules,
        decisions=[
            {"decision": "deny", "min_points": 70},
            {"decision": "review", "min_points": 40},
        ],
        default_decision="allow",
    )


def load_docs(*docs: Mapping[str, Any], loader: Loader | None = None) -> Snapshot:
    """The snapshot these documents load to, as one YAML file (raises `LoadError`)."""
    text = dump_yaml(docs)
    return (loader or Loader()).load([SourceFile("rules.yaml", text.encode())]).snapshot


def change_tuples(events: Iterable[ChangeEvent]) -> set[tuple[str, str | None, str | None, int]]:
    """Change events as comparable tuples: (type, ruleset, rule, registry version)."""
    return {(e.type.value, e.ruleset_id, e.rule_id, e.registry_version) for e in events}


def dump_yaml(docs: Mapping[str, Any] | Iterable[Mapping[str, Any]]) -> str:
    """One document, or several separated by `---`, as YAML text (key order kept)."""
    if isinstance(docs, Mapping):
        docs = [docs]
    return yaml.safe_dump_all(
        [dict(doc) for doc in docs], sort_keys=False, allow_unicode=True, width=1000
    )


def write_rules(directory: Path, name: str, text: str | bytes) -> Path:
    """Write `text` to `directory/name` (parents created) and return the path."""
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def rules_dir(tmp_path: Path) -> Path:
    """An empty directory to write rule files into."""
    directory = tmp_path / "rules"
    directory.mkdir()
    return directory

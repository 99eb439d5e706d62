"""Shared helpers for the test suite: build RuleSet documents and write rule files."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

FIXTURES = Path(__file__).parent / "fixtures"


def make_ruleset_doc(
    ruleset_id: str | int = "demo",
    rules: Iterable[Mapping[str, Any]] | None = None,
    **spec_extra: Any,
) -> dict[str, Any]:
    """A minimal valid `rule-sidecar/v1` RuleSet document as a plain dict.

    Without `rules`, one rule `<ruleset_id>-r1` (`input.amount > 100`, 10 points) is used,
    so documents built for different ruleset ids never share a rule id.
    """
    if rules is None:
        rules = [{"id": f"{ruleset_id}-r1", "condition": "input.amount > 100", "points": 10}]
    return {
        "apiVersion": "rule-sidecar/v1",
        "kind": "RuleSet",
        "metadata": {"id": ruleset_id},
        "spec": {"rules": [dict(rule) for rule in rules], **spec_extra},
    }


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

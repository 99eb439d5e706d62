"""Property-based tests of the loader: any bytes give a snapshot or clean, located
problems; any valid document survives a load unchanged."""

from __future__ import annotations

import json
import string

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.errors import LoadError, Problem
from sidecar.loader import Loader
from sidecar.rulefiles import SourceFile

IDS = st.from_regex(r"[a-z0-9][a-z0-9._-]{0,20}", fullmatch=True)
CONDITIONS = st.sampled_from(
    [
        "input.amount > 100",
        "has(input.country) && input.country == 'FR'",
        "input.tags.exists(t, t == 'vip')",
        "input.name.lowerAscii().startsWith('a')",
        "true",
        "size(input.tags) >= 2",
    ]
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**40), max_value=2**40),
    st.text(alphabet=string.ascii_letters + " -_.", max_size=12),
)
METADATA = st.dictionaries(
    st.text(alphabet=string.ascii_lowercase, min_size=1, max_size=8), SCALARS, max_size=3
)


@st.composite
def rulesets(draw: st.DrawFn) -> dict[str, object]:
    """A valid RuleSet document with unique rule ids, in canonical form."""
    ruleset_id = draw(IDS)
    rule_ids = draw(st.lists(IDS, min_size=1, max_size=8, unique=True))
    rules = [
        {
            "id": rule_id,
            "name": draw(st.text(alphabet=string.ascii_letters + " ", min_size=1, max_size=20)),
            "description": draw(st.text(alphabet=string.ascii_letters + " ", max_size=30)),
            "condition": draw(CONDITIONS),
            "points": draw(st.integers(min_value=-1000, max_value=1000)),
            "enabled": draw(st.booleans()),
            "priority": draw(st.integers(min_value=-10, max_value=10)),
            "tags": draw(st.lists(IDS, max_size=3, unique=True)),
            "metadata": draw(METADATA),
        }
        for rule_id in rule_ids
    ]
    return {
        "apiVersion": "rule-sidecar/v1",
        "kind": "RuleSet",
        "metadata": {
            "id": ruleset_id,
            "name": draw(st.text(alphabet=string.ascii_letters, min_size=1, max_size=10)),
            "description": "",
            "labels": draw(st.dictionaries(IDS, IDS, max_size=2)),
        },
        "spec": {"rules": rules},
    }


def problems_of(name: str, content: bytes) -> tuple[Problem, ...]:
    """The problems of loading one file; () when it loads. Any other exception escapes."""
    try:
        Loader().load([SourceFile(name, content)])
    except LoadError as exc:
        return exc.problems or (Problem(file="", line=0, message="a LoadError without problems"),)
    return ()


class TestArbitraryInput:
    """Whatever the bytes, loading gives a snapshot or a LoadError with located problems."""

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.binary(max_size=400), st.sampled_from(["rules.yaml", "rules.json"]))
    def test_bytes_load_or_fail_cleanly(self, content: bytes, name: str) -> None:
        """Random bytes never raise anything but LoadError, whose problems name the file."""
        for problem in problems_of(name, content):
            assert (problem.file, problem.line >= 1, problem.column >= 1) == (name, True, True)

    @settings(max_examples=200, deadline=None)
    @given(
        st.recursive(
            SCALARS,
            lambda inner: (
                st.lists(inner, max_size=4)
                | st.dictionaries(st.text(max_size=6), inner, max_size=4)
            ),
            max_leaves=20,
        )
    )
    def test_any_yaml_value_loads_or_fails_cleanly(self, value: object) -> None:
        """Any YAML value as a document gives a snapshot or clean problems."""
        for problem in problems_of("doc.yaml", yaml.safe_dump(value).encode()):
            assert problem.message


class TestRoundTrip:
    """A valid document loads into exactly what it says."""

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(rulesets(), st.sampled_from(["yaml", "json"]))
    def test_document_survives_a_load(self, document: dict[str, object], form: str) -> None:
        """to_document() of the loaded ruleset equals the canonical document written."""
        text = yaml.safe_dump(document) if form == "yaml" else json.dumps(document)
        snapshot = Loader().load([SourceFile(f"r.{form}", text.encode())]).snapshot
        (ruleset,) = snapshot.rulesets.values()
        assert ruleset.to_document() == document

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(rulesets())
    def test_revision_depends_on_content_only(self, document: dict[str, object]) -> None:
        """The same content as YAML or JSON, under any name, has one revision."""
        as_yaml = SourceFile("a.yaml", yaml.safe_dump(document).encode())
        as_json = SourceFile("b/c.json", json.dumps(document, indent=3).encode())
        first = Loader().load([as_yaml]).snapshot.revision
        assert Loader().load([as_json]).snapshot.revision == first

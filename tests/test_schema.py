"""Tests of the RuleSet JSON Schema itself: valid, documented, closed, and where editors look."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from sidecar.documents import parse_file
from sidecar.errors import LoadError, format_path
from sidecar.loader import Loader, ruleset_schema
from sidecar.model import Rule
from sidecar.rulefiles import SourceFile

REPO = Path(__file__).resolve().parent.parent
PACKAGE_SCHEMA = REPO / "sidecar" / "schemas" / "ruleset.schema.json"
TOP_SCHEMA = REPO / "schemas" / "ruleset.schema.json"
EXAMPLES = sorted((REPO / "examples" / "rules").glob("*.y*ml"))
MODELINE_RE = re.compile(r"^# yaml-language-server: \$schema=(\S+)\s*$")

# Object schemas that are free-form on purpose: their keys are the author's, not ours.
FREE_FORM = {
    "#/properties/metadata/properties/labels",
    "#/properties/spec/properties/rules/items/properties/metadata",
    "#/properties/spec/properties/tests/items/properties/input",
}

_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "dependentSchemas")
_SCHEMA_VALUES = ("items", "additionalProperties", "propertyNames", "contains", "not")
_SCHEMA_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems")


def subschemas(schema: dict[str, Any], pointer: str = "#") -> Iterator[tuple[str, dict]]:
    """Every schema nested in `schema` (itself included), with its JSON pointer."""
    yield pointer, schema
    for key, value in schema.items():
        if key in _SCHEMA_MAPS:
            for name, sub in value.items():
                yield from subschemas(sub, f"{pointer}/{key}/{name}")
        elif key in _SCHEMA_VALUES and isinstance(value, dict):
            yield from subschemas(value, f"{pointer}/{key}")
        elif key in _SCHEMA_LISTS:
            for index, sub in enumerate(value):
                yield from subschemas(sub, f"{pointer}/{key}/{index}")


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    """The schema as shipped in the package."""
    return json.loads(PACKAGE_SCHEMA.read_text(encoding="utf-8"))


class TestSchemaIsValid:
    """The schema is a valid Draft 2020-12 schema and is what the loader uses."""

    def test_schema_is_valid_draft_2020_12(self, schema: dict[str, Any]):
        """`check_schema` accepts it and it declares the 2020-12 dialect."""
        jsonschema.Draft202012Validator.check_schema(schema)

        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"

    def test_loader_uses_the_packaged_file(self, schema: dict[str, Any]):
        """`ruleset_schema()` returns the content of `sidecar/schemas/ruleset.schema.json`."""
        assert ruleset_schema() == schema

    def test_schema_pins_api_version_and_kind(self, schema: dict[str, Any]):
        """apiVersion and kind are constants, and both are required."""
        properties = schema["properties"]

        assert properties["apiVersion"]["const"] == "rule-sidecar/v1"
        assert properties["kind"]["const"] == "RuleSet"
        assert {"apiVersion", "kind", "metadata", "spec"} <= set(schema["required"])

    def test_schema_defaults_agree_with_the_model(self, schema: dict[str, Any]):
        """The documented defaults of `enabled` and `priority` are the ones rules get."""
        rule = schema["properties"]["spec"]["properties"]["rules"]["items"]["properties"]
        model = Rule(id="r", ruleset_id="s", name="r", condition="true", points=1)

        assert rule["enabled"]["default"] is model.enabled
        assert rule["priority"]["default"] == model.priority


class TestSchemaIsDocumented:
    """Every property at every level says what it is for."""

    def test_every_property_has_a_description(self, schema: dict[str, Any]):
        """Each entry of every `properties` map has a non-empty description."""
        missing = []
        checked = 0
        for pointer, sub in subschemas(schema):
            for name, prop in sub.get("properties", {}).items():
                checked += 1
                description = prop.get("description")
                if not (isinstance(description, str) and description.strip()):
                    missing.append(f"{pointer}/properties/{name}")

        assert missing == []
        assert checked >= 30  # the walk really went through the whole schema

    def test_root_and_list_items_have_descriptions(self, schema: dict[str, Any]):
        """The root and every list item that is an object are described too."""
        undocumented = [
            pointer
            for pointer, sub in subschemas(schema)
            if (pointer == "#" or pointer.endswith("/items"))
            and sub.get("type") == "object"
            and not sub.get("description")
        ]

        assert undocumented == []


class TestSchemaIsClosed:
    """Misspelt fields are errors: every structured object refuses unknown keys."""

    def test_objects_with_properties_forbid_additional_ones(self, schema: dict[str, Any]):
        """Every object schema with `properties` sets `additionalProperties: false`."""
        open_objects = [
            pointer
            for pointer, sub in subschemas(schema)
            if "properties" in sub and sub.get("additionalProperties") is not False
        ]

        assert open_objects == []

    def test_only_free_form_objects_accept_any_key(self, schema: dict[str, Any]):
        """The objects without `additionalProperties: false` are exactly the free-form ones."""
        free_form = {
            pointer
            for pointer, sub in subschemas(schema)
            if sub.get("type") == "object" and sub.get("additionalProperties") is not False
        }

        assert free_form == FREE_FORM

    def test_labels_values_are_strings(self, schema: dict[str, Any]):
        """Labels are free-form keys with string values."""
        validator = jsonschema.Draft202012Validator(schema)
        document = {
            "apiVersion": "rule-sidecar/v1",
            "kind": "RuleSet",
            "metadata": {"id": "demo", "labels": {"team": "risk", "tier": 1}},
            "spec": {"rules": [{"id": "r", "condition": "true", "points": 1}]},
        }

        errors = list(validator.iter_errors(document))

        assert [list(error.absolute_path) for error in errors] == [["metadata", "labels", "tier"]]


class TestSchemaLocation:
    """Editors find the schema at the repository top and from every example file."""

    def test_top_level_schema_is_the_packaged_file(self):
        """`schemas/ruleset.schema.json` is the same file as the packaged one."""
        assert TOP_SCHEMA.exists()
        assert TOP_SCHEMA.samefile(PACKAGE_SCHEMA)

    @pytest.mark.parametrize("example", EXAMPLES, ids=lambda path: path.name)
    def test_example_names_the_schema_on_its_first_line(self, example: Path):
        """The yaml-language-server modeline's relative path resolves to the schema."""
        first_line = example.read_text(encoding="utf-8").splitlines()[0]

        found = MODELINE_RE.match(first_line)

        assert found, f"{example.name}: first line is {first_line!r}"
        target = example.parent / found[1]
        assert not Path(found[1]).is_absolute()
        assert target.exists()
        assert target.samefile(PACKAGE_SCHEMA)

    @pytest.mark.parametrize("example", EXAMPLES, ids=lambda path: path.name)
    def test_example_documents_are_valid(self, example: Path, schema: dict[str, Any]):
        """Every document of every example file passes the schema."""
        validator = jsonschema.Draft202012Validator(schema)
        documents, problems = parse_file(SourceFile(example.name, example.read_bytes()))

        assert problems == []
        assert documents
        for document in documents:
            assert [error.message for error in validator.iter_errors(document.data)] == []


def _pattern_walk(schema: dict[str, Any]) -> list[tuple[str, str]]:
    """Every (pointer, pattern) of the schema."""
    return [(pointer, sub["pattern"]) for pointer, sub in subschemas(schema) if "pattern" in sub]


ID_FIELDS = {
    "ruleset id": ("metadata", "id"),
    "rule id": ("spec", "rules", 0, "id"),
}
NAME_FIELDS = {
    "decision": ("spec", "decisions", 0, "decision"),
    "default decision": ("spec", "default_decision"),
    "tag": ("spec", "rules", 0, "tags", 0),
}
# Look-alikes of a good value: a final newline ($ in Python's `re` matches before it),
# other whitespace, another case, a Cyrillic a (U+0430), a zero-width space.
ID_LOOKALIKES = [
    "base\n",
    "base\r\n",
    "base\r",
    " base",
    "base ",
    "base\t",
    "Base",
    "b\u0430se",
    "ba\u200bse",
]
NAME_LOOKALIKES = [
    "deny\n",
    "deny\r\n",
    " deny",
    "deny ",
    "de\nny",
    "deny\u2028",
    "\u00a0deny",
    "de\x00ny",
]


def _example_for(pattern: str) -> str:
    """A value each pattern of the schemas accepts (checked by the test that uses it)."""
    examples = {
        "-[0-9]+-": '"0123456789abcdef-1-0123456789abcdef"',
        "{22}==": "A" * 22 + "==",
        '"[0-9]+"': '"3"',
        "{16}": "0123456789abcdef",
        "{64}": "0" * 64,
        "[a-z_]+": "resync+watch",
        "[a-z0-9._-]": "base",
        "RULE_SIDECAR_": "RULE_SIDECAR_MAX_BATCH_ITEMS",
    }
    value = next((v for k, v in examples.items() if k in pattern), "deny")
    assert re.search(pattern, value), (pattern, value)
    return value


def _document_with(path: tuple[str | int, ...], value: str) -> dict[str, Any]:
    document: dict[str, Any] = {
        "apiVersion": "rule-sidecar/v1",
        "kind": "RuleSet",
        "metadata": {"id": "base"},
        "spec": {
            "decisions": [{"decision": "deny", "min_points": 1}],
            "default_decision": "allow",
            "rules": [{"id": "r", "condition": "true", "points": 1, "tags": ["t"]}],
        },
    }
    target: Any = document
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    return document


class TestIdsAreExact:
    """Ids, decisions and tags are exactly what they look like: a trailing newline, other
    whitespace or a look-alike character is refused, by the loader and by an ECMA 262
    engine (editors) alike, so `"base\\n"` can never stand beside `"base"`."""

    @pytest.mark.parametrize("value", ID_LOOKALIKES, ids=repr)
    @pytest.mark.parametrize("field", list(ID_FIELDS))
    def test_an_id_that_only_looks_right_is_refused(self, field: str, value: str, tmp_path: Path):
        """The loader refuses the file and names the field."""
        path = ID_FIELDS[field]
        document = _document_with(path, value)
        rules = tmp_path / "rules.json"
        rules.write_text(json.dumps(document), encoding="utf-8")
        with pytest.raises(LoadError) as caught:
            Loader().load([SourceFile(str(rules), rules.read_bytes())])
        assert [problem.path for problem in caught.value.problems] == [format_path(path)]

    @pytest.mark.parametrize("value", NAME_LOOKALIKES, ids=repr)
    @pytest.mark.parametrize("field", list(NAME_FIELDS))
    def test_a_name_with_edge_whitespace_or_controls_is_refused(
        self, field: str, value: str, tmp_path: Path
    ):
        """Decisions and tags: printable, no whitespace at either end."""
        path = NAME_FIELDS[field]
        rules = tmp_path / "rules.yaml"
        rules.write_text(json.dumps(_document_with(path, value)), encoding="utf-8")
        with pytest.raises(LoadError) as caught:
            Loader().load([SourceFile(str(rules), rules.read_bytes())])
        assert [problem.path for problem in caught.value.problems] == [format_path(path)]

    @pytest.mark.parametrize("field", list(ID_FIELDS) + list(NAME_FIELDS))
    def test_the_good_values_still_load(self, field: str):
        """The same documents with ordinary values load (inner spaces in names too)."""
        path = {**ID_FIELDS, **NAME_FIELDS}[field]
        value = "base-1.x_y" if field in ID_FIELDS else "manual review"
        text = json.dumps(_document_with(path, value)).encode()
        assert Loader().load([SourceFile("ok.json", text)]).snapshot.rulesets

    def test_no_pattern_in_either_schema_lets_a_final_newline_through(self, schema: dict[str, Any]):
        """Every anchored pattern of the ruleset schema and of the OpenAPI document ends
        in `$(?!\\n)`: Python's `$` alone also matches before a final newline."""
        openapi = yaml.safe_load((PACKAGE_SCHEMA.parent / "openapi.yaml").read_text("utf-8"))
        found: list[str] = []

        def walk(node: Any) -> None:
            if isinstance(node, dict):
                for key, value in node.items():
                    if key == "pattern" and isinstance(value, str):
                        found.append(value)
                    else:
                        walk(value)
            elif isinstance(node, list):
                for value in node:
                    walk(value)

        walk(schema)
        walk(openapi)
        assert len(found) >= 11
        assert [p for p in found if "$" in p and not p.endswith("$(?!\\n)")] == []
        assert [p for p in found if re.search(p, _example_for(p) + "\n")] == []

    @pytest.mark.slow  # starts node
    @pytest.mark.skipif(shutil.which("node") is None, reason="needs node for ECMA 262 regexes")
    def test_every_pattern_means_the_same_in_ecma_262(self, schema: dict[str, Any]):
        """Editors validate with ECMA 262 regexes: each pattern gives there the verdict
        Python's `re` gives, on the good values and on every look-alike."""
        samples = ["base", "manual review", "deny", *ID_LOOKALIKES, *NAME_LOOKALIKES]
        cases = [(pattern, sample) for _, pattern in _pattern_walk(schema) for sample in samples]
        script = (
            "const cases = JSON.parse(require('fs').readFileSync(0, 'utf8'));"
            "console.log(JSON.stringify(cases.map(([p, s]) => new RegExp(p, 'u').test(s))));"
        )
        ecma = subprocess.run(
            ["node", "-e", script],
            input=json.dumps(cases),
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        python = [re.search(pattern, sample) is not None for pattern, sample in cases]
        assert json.loads(ecma.stdout) == python
        assert len(_pattern_walk(schema)) == 6  # 3 ids (challenger_of one), decisions x2, tags

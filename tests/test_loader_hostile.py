"""Hostile documents (ATTACKS.md "Documents"): aliases of every kind, huge scalars, deep
nesting, duplicate keys, odd encodings, NUL, YAML tags. Each is refused with its place, or
loads as the JSON value it means: nothing reaches the registry that cannot be served."""

from __future__ import annotations

import codecs
import json
from pathlib import Path

import pytest
from conftest import make_ruleset_doc, write_rules

from sidecar.documents import parse_file
from sidecar.errors import LoadError, Problem
from sidecar.loader import Loader
from sidecar.rulefiles import SourceFile
from sidecar.sources.files import read_rule_files

# Starts processes, browsers or databases: left out of the quick loop (-m 'not slow').
pytestmark = pytest.mark.slow

HEAD = (
    "apiVersion: rule-sidecar/v1\nkind: RuleSet\nmetadata: {id: hostile}\nspec:\n"
    "  rules:\n  - id: r\n    condition: 'true'\n    points: 1\n"
)
JSON_HEAD = (
    '{"apiVersion": "rule-sidecar/v1", "kind": "RuleSet", "metadata": {"id": "hostile"},'
    ' "spec": {"rules": [{"id": "r", "condition": "true", "points": 1, "metadata": {"v": %s}}]}}'
)
LIMIT = 4 * 1024 * 1024


def problem_of(path: Path) -> Problem:
    """The one problem of a load that must fail."""
    with pytest.raises(LoadError) as caught:
        Loader().load(read_rule_files([path]))
    (problem,) = caught.value.problems
    return problem


def loaded_metadata(path: Path) -> dict:
    """The metadata of rule `r`, as the registry serves it (through JSON)."""
    snapshot = Loader().load(read_rule_files([path])).snapshot
    return json.loads(json.dumps(snapshot.rulesets["hostile"].to_document(), allow_nan=False))[
        "spec"
    ]["rules"][0]["metadata"]


def scalar_alias_bomb(copies: int, size: int = 100_000) -> str:
    """One anchored string of `size` characters and `copies` aliases to it."""
    rules = "".join(
        f"  - {{id: r{i}, condition: 'true', points: 1, metadata: {{v: *big}}}}\n"
        for i in range(copies)
    )
    return (
        "apiVersion: rule-sidecar/v1\nkind: RuleSet\nmetadata: {id: hostile}\nspec:\n  rules:\n"
        f"  - {{id: a, condition: 'true', points: 1, metadata: {{v: &big {'x' * size}}}}}\n" + rules
    )


class TestAliasesOfScalars:
    """The expanded text of a file is bounded by the file size limit, every alias counting
    its anchor's text again: a 200 KB file cannot serve as 200 MB."""

    def test_aliases_of_a_big_string_are_refused_at_the_alias(self, rules_dir: Path):
        """2,000 aliases of a 100 KB string: refused at the alias that passes 4 MiB (the
        anchor and 40 aliases make 4.1 million characters, the 41st passes 4,194,304),
        with its line and column."""
        path = write_rules(rules_dir, "bomb.yaml", scalar_alias_bomb(2000))
        problem = problem_of(path)
        line = 7 + 40  # the anchor is on line 6, the aliases start on line 7
        assert (problem.file, problem.line) == (str(path), line)
        assert problem.column == path.read_text().splitlines()[line - 1].index("*big") + 1
        assert "aliases expand the file past 4194304 characters" in problem.message
        assert "*big" in problem.message

    def test_aliases_across_documents_count_together(self, rules_dir: Path):
        """The bound is per file: many documents each under it cannot add up past it."""
        anchor = "x" * 1_000_000
        documents = [
            f"apiVersion: rule-sidecar/v1\nkind: RuleSet\nmetadata: {{id: s{i}}}\nspec:\n"
            f"  rules:\n  - {{id: r{i}, condition: 'true', points: 1,"
            f" metadata: {{a: &a{i} {anchor[:400_000]}, b: *a{i}, c: *a{i}}}}}\n"
            for i in range(5)
        ]
        path = write_rules(rules_dir, "many.yaml", "---\n".join(documents))
        assert "aliases expand the file past" in problem_of(path).message

    def test_small_shared_values_still_load(self, rules_dir: Path):
        """Anchors used the ordinary way (a shared condition, a shared owner) load."""
        rules = "".join(
            f"  - {{id: r{i}, condition: *cond, points: 1, metadata: {{owner: *owner}}}}\n"
            for i in range(1, 500)
        )
        text = (
            "apiVersion: rule-sidecar/v1\nkind: RuleSet\nmetadata: {id: hostile}\nspec:\n"
            "  rules:\n  - {id: r0, condition: &cond 'input.amount > 100', points: 1,"
            " metadata: {owner: &owner team-risk}}\n" + rules
        )
        path = write_rules(rules_dir, "shared.yaml", text)
        snapshot = Loader().load(read_rule_files([path])).snapshot
        assert len(snapshot.rules) == 500

    @pytest.mark.parametrize(
        ("anchor", "alias"),
        [("{a: 1}", "*x"), ("[1, 2]", "*x"), ("{a: 1}", "{<<: *x}")],
        ids=["mapping", "list", "merge"],
    )
    def test_aliases_of_collections_stay_refused(self, rules_dir: Path, anchor: str, alias: str):
        """Mappings, lists and merge keys: refused as before, located."""
        text = HEAD + f"    metadata: {{a: &x {anchor}, b: {alias}}}\n"
        problem = problem_of(write_rules(rules_dir, "c.yaml", text))
        assert "alias may not point at a mapping or a list" in problem.message
        assert problem.line == 9


class TestJsonValuesOnly:
    """YAML's non-JSON values would crash the digest, the API and the state copy: they are
    refused where they are written."""

    @pytest.mark.parametrize(
        "value",
        [
            "!!binary aGVsbG8=",
            "!!set {a, b}",
            "!!omap [a: 1]",
            "!!pairs [a: 1]",
            "!!timestamp 2020-01-01",
        ],
    )
    def test_tags_of_non_json_types_are_refused(self, rules_dir: Path, value: str):
        """Each tag is refused at its position, naming the tag."""
        path = write_rules(rules_dir, "t.yaml", HEAD + f"    metadata: {{v: {value}}}\n")
        problem = problem_of(path)
        assert (problem.line, problem.column) == (9, 19)
        assert problem.message.startswith("not a JSON value: the tag !!")

    @pytest.mark.parametrize("value", [".nan", ".inf", "-.Inf", "!!float .NaN"])
    def test_non_finite_yaml_numbers_are_refused(self, rules_dir: Path, value: str):
        """NaN and infinities are not JSON numbers."""
        path = write_rules(rules_dir, "n.yaml", HEAD + f"    metadata: {{v: {value}}}\n")
        problem = problem_of(path)
        assert (problem.line, "not finite") == (
            9,
            "not finite" if "finite" in problem.message else problem.message,
        )

    @pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
    def test_non_finite_json_numbers_are_refused(self, rules_dir: Path, value: str):
        """Python's `json` reads them; JSON does not have them."""
        path = write_rules(rules_dir, "n.json", JSON_HEAD % value)
        assert f"{value.lstrip('-')} is not a number in JSON" in problem_of(path).message

    @pytest.mark.parametrize("suffix", ["yaml", "json"])
    def test_numbers_too_long_to_read_are_refused(self, rules_dir: Path, suffix: str):
        """5,000 digits: Python will not convert it; a problem, not a crash."""
        digits = "9" * 5000
        text = HEAD + f"    metadata: {{v: {digits}}}\n" if suffix == "yaml" else JSON_HEAD % digits
        problem = problem_of(write_rules(rules_dir, f"big.{suffix}", text))
        assert "digits" in problem.message

    def test_number_keys_become_strings(self, rules_dir: Path):
        """`1: a` is `"1": a`, as Kubernetes reads YAML into JSON."""
        text = HEAD + "    metadata: {1: a, 2.5: b, true: c, null: d, x: e}\n"
        metadata = loaded_metadata(write_rules(rules_dir, "k.yaml", text))
        assert metadata == {"1": "a", "2.5": "b", "true": "c", "null": "d", "x": "e"}

    def test_keys_equal_once_read_are_duplicates(self, rules_dir: Path):
        """`0x10` and `'16'` are written differently but are the same key."""
        text = HEAD + "    metadata: {0x10: a, '16': b}\n"
        problem = problem_of(write_rules(rules_dir, "d.yaml", text))
        assert (problem.line, problem.message) == (9, "not a JSON value: duplicate key '16'")

    def test_merge_keys_keep_their_meaning(self, rules_dir: Path):
        """An inline `<<` merge: the mapping's own keys win over merged ones (YAML's
        rule), and are not taken for duplicates; two own keys still are."""
        text = HEAD + "    metadata: {<<: [{a: 1, b: 1}, {a: 5, c: 3}], a: 2}\n"
        metadata = loaded_metadata(write_rules(rules_dir, "m.yaml", text))
        assert metadata == {"a": 2, "b": 1, "c": 3}
        twice = HEAD + "    metadata: {<<: {a: 1}, a: 2, a: 3}\n"
        assert "duplicate key 'a'" in problem_of(write_rules(rules_dir, "t.yaml", twice)).message

    def test_a_collection_as_key_is_refused(self, rules_dir: Path):
        """A mapping key must be a string (or a number, made a string)."""
        text = HEAD + "    metadata: {[1]: a}\n"
        assert "key must be a string" in problem_of(write_rules(rules_dir, "c.yaml", text)).message


class TestEncodings:
    """Rule files are UTF-8 (a UTF-8 BOM allowed); anything else is named."""

    @pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be", "utf-32", "utf-32-be"])
    def test_utf16_and_utf32_with_a_bom_are_named(self, rules_dir: Path, encoding: str):
        """The BOM tells what the file is: the message says so."""
        bom = {"utf-16": codecs.BOM_UTF16_LE, "utf-16-be": codecs.BOM_UTF16_BE}.get(
            encoding, codecs.BOM_UTF32_LE if encoding == "utf-32" else codecs.BOM_UTF32_BE
        )
        text = HEAD.encode(encoding)
        if not text.startswith(bom):
            text = bom + text
        problem = problem_of(write_rules(rules_dir, "e.yaml", text))
        family = "UTF-32" if "32" in encoding else "UTF-16"
        assert problem.message.startswith(f"the file is {family}")

    @pytest.mark.parametrize("escape", ["\\ud800", "\\uDC00", "x\\udbff"])
    def test_a_lone_surrogate_escape_is_refused_with_its_path(self, rules_dir: Path, escape: str):
        """JSON's `\\ud800` makes a string no UTF-8 answer, digest or copy can encode: it
        used to crash the reload (UnicodeEncodeError); it is a problem at its path."""
        text = JSON_HEAD % f'"{escape}"'
        problem = problem_of(write_rules(rules_dir, "s.json", text))
        assert problem.path == "$.spec.rules[0].metadata.v"
        assert problem.message.endswith("is half of a surrogate pair, not a character")

    def test_a_surrogate_pair_escape_is_a_character(self, rules_dir: Path):
        """`\\ud83d\\ude00` is one emoji, and an escaped backslash is no escape."""
        text = JSON_HEAD % '["\\ud83d\\ude00", "\\\\ud800"]'
        metadata = loaded_metadata(write_rules(rules_dir, "p.json", text))
        assert metadata == {"v": ["\U0001f600", "\\ud800"]}

    def test_a_nul_character_is_located(self, rules_dir: Path):
        """NUL is not allowed in YAML: the problem gives its line and column."""
        text = HEAD.replace("id: hostile", "id: host\0ile")
        problem = problem_of(write_rules(rules_dir, "nul.yaml", text))
        assert (problem.line, problem.column, problem.message) == (
            3,
            20,
            "character U+0000 is not allowed in YAML",
        )


class TestHugeScalars:
    """A string up to the file limit is read once; refused by the schema, it is not quoted
    whole in the problem (which goes to status, history and every WebSocket client)."""

    def test_a_huge_refused_value_gives_a_short_message(self, rules_dir: Path):
        """A 4 MiB description: the problem is located and a few hundred characters."""
        text = HEAD + f"    description: {'x' * (4 * 1024 * 1024 - 200)}\n"
        problem = problem_of(write_rules(rules_dir, "d.yaml", text))
        assert (problem.line, problem.path) == (9, "$.spec.rules[0].description")
        assert problem.message.endswith("is too long")
        assert len(problem.message) <= 400

    def test_a_huge_free_form_value_loads(self, rules_dir: Path):
        """The same string in rule metadata (free-form) loads, once."""
        text = HEAD + f"    metadata: {{v: {'x' * (4 * 1024 * 1024 - 200)}}}\n"
        assert len(loaded_metadata(write_rules(rules_dir, "m.yaml", text))["v"]) > 4_000_000


class TestManySmallValues:
    """Values are bounded per file (400,000) before any node is composed: a composed value
    costs about 500 bytes, and 4 MiB of `1,` was a gigabyte and 20 s."""

    @pytest.mark.parametrize("suffix", ["yaml", "json"])
    def test_a_file_of_450000_values_is_refused_at_the_first_too_many(
        self, rules_dir: Path, suffix: str
    ):
        """The problem points at the 400,001st value."""
        values = "[" + "1," * 449_999 + "1]"
        text = HEAD + f"    metadata: {{v: {values}}}\n" if suffix == "yaml" else JSON_HEAD % values
        problem = problem_of(write_rules(rules_dir, f"many.{suffix}", text))
        assert problem.message == "more than 400000 values in one file"
        line = text.splitlines()[problem.line - 1]
        assert line[problem.column - 1] == "1"
        assert problem.column > 790_000  # well into the list, not at its start

    def test_marks_inside_strings_do_not_count(self, rules_dir: Path):
        """200,000 commas and colons inside one string are one value: the file loads."""
        text = HEAD + f"    metadata: {{v: '{', :' * 100_000}'}}\n"
        assert len(loaded_metadata(write_rules(rules_dir, "commas.yaml", text))["v"]) == 300_000

    def test_the_largest_ruleset_the_schema_allows_is_within_the_bound(self):
        """10,000 rules (the schema's maximum), each with a name, description, two tags
        and two metadata fields, in one file: parsed without a problem."""
        rules = [
            {
                "id": f"r{i}",
                "name": f"Rule {i}",
                "description": "why",
                "condition": f"input.amount > {i}",
                "points": 1,
                "tags": ["a", "b"],
                "metadata": {"owner": "risk", "ticket": i},
            }
            for i in range(10_000)
        ]
        text = json.dumps(make_ruleset_doc("big", rules))
        for name in ("big.json", "big.yaml"):
            documents, problems = parse_file(SourceFile(name, text.encode()))
            assert (len(documents), problems) == (1, [])


class TestDeepNesting:
    """100k levels in every syntax, from a file or from a database row (not located):
    a located problem, never a RecursionError (the db commands crashed on such rows:
    tests/test_db_cli.py::TestDeepJson)."""

    @pytest.mark.parametrize(
        ("name", "text", "code"),
        [
            ("flow.yaml", b"a: " + b"[" * 100_000 + b"]" * 100_000, "yaml.syntax"),
            ("maps.yaml", b"a: " + b"{a: " * 100_000 + b"}" * 100_000, "yaml.syntax"),
            ("block.yaml", b"a:\n- " + b"- " * 100_000 + b"1\n", "yaml.syntax"),
            ("deep.json", b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "limit.depth"),
            ("deeper.json", b'{"a": ' + b"[" * 500 + b"]" * 500 + b"}", "limit.depth"),
        ],
    )
    @pytest.mark.parametrize("located", [True, False], ids=["file", "row"])
    def test_a_located_problem(self, name: str, text: bytes, code: str, located: bool):
        with pytest.raises(LoadError) as info:
            Loader().load([SourceFile(name, text, located)])
        [problem] = info.value.problems
        assert problem.code == code
        assert problem.file == name
        assert "nest" in problem.message

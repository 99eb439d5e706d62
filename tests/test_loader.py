"""Loader tests: documents on disk → validated candidate snapshot, or a located LoadError."""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import pytest
from conftest import FIXTURES, dump_yaml, make_ruleset_doc, write_rules

from sidecar.errors import LoadError, Problem
from sidecar.loader import LOAD_STAGES, Loader, LoadResult, LoadStage
from sidecar.model import thaw
from sidecar.registry import RuleRegistry
from sidecar.rulefiles import FileLimits, SourceFile
from sidecar.sources.files import read_rule_files

BAD_FIXTURES = sorted(FIXTURES.glob("*.bad.yaml"))
EXPECT_RE = re.compile(r"^# expect: (\d+):(\d+): (.+)$")


def load(*paths: Path, loader: Loader | None = None) -> LoadResult:
    """Read `paths` the way the sidecar does and load them."""
    return (loader or Loader()).load(read_rule_files(paths))


def problems_of(*paths: Path, loader: Loader | None = None) -> tuple[Problem, ...]:
    """The problems of a load that must fail."""
    with pytest.raises(LoadError) as caught:
        load(*paths, loader=loader)
    return caught.value.problems


def rule_doc(rule_id: str | int, condition: str = "input.amount > 100", points: int = 10) -> dict:
    """One rule mapping."""
    return {"id": rule_id, "condition": condition, "points": points}


class TestBadFixtures:
    """Every broken fixture is refused with a problem at the line:col its header names."""

    def test_every_kind_of_breakage_has_a_fixture(self):
        """The fixture directory holds the full catalogue of broken documents."""
        names = {path.name.removesuffix(".bad.yaml") for path in BAD_FIXTURES}
        assert names >= {
            "syntax",
            "api-version",
            "kind",
            "misspelt-field",
            "missing-field",
            "bad-id",
            "points-range",
            "condition-syntax",
            "non-boolean",
            "undeclared-function",
            "alias-bomb",
            "duplicate-key",
            "duplicate-rule-id",
            "failing-test",
            "unreachable-band",
            "unknown-rule-in-test",
            "list-document",
        }

    @pytest.mark.parametrize("path", BAD_FIXTURES, ids=lambda path: path.name)
    def test_bad_fixture_is_located(self, path: Path):
        """The LoadError includes a problem at exactly the expected place, naming the file."""
        header = path.read_text(encoding="utf-8").splitlines()[0]
        found = EXPECT_RE.match(header)
        assert found, f"{path.name}: first line must be '# expect: LINE:COL: MESSAGE'"
        line, column, message = int(found[1]), int(found[2]), found[3]

        problems = problems_of(path)

        located = [(p.line, p.column, p.message) for p in problems]
        assert any(
            p.file == str(path) and (p.line, p.column) == (line, column) and message in p.message
            for p in problems
        ), f"expected {line}:{column}: {message!r}, got {located}"


class TestAllOrNothing:
    """One bad file stops the whole load; nothing is half-loaded."""

    def test_directory_with_one_bad_file_gives_no_snapshot(self, rules_dir: Path):
        """A good file next to a bad one does not load on its own: LoadError, no result."""
        shutil.copy(FIXTURES / "good.yaml", rules_dir / "a-good.yaml")
        shutil.copy(FIXTURES / "kind.bad.yaml", rules_dir / "b-bad.yaml")
        loader = Loader()
        result = None

        with pytest.raises(LoadError) as caught:
            result = loader.load(read_rule_files([rules_dir]))

        assert result is None
        assert {Path(p.file).name for p in caught.value.problems} == {"b-bad.yaml"}

    def test_fixing_the_bad_file_loads_both_and_reparses_only_it(self, rules_dir: Path):
        """After the fix the next load succeeds, re-reading only the file that changed."""
        shutil.copy(FIXTURES / "good.yaml", rules_dir / "a-good.yaml")
        bad = write_rules(rules_dir, "b.yaml", "kind: Nope\n")
        loader = Loader()
        problems_of(rules_dir, loader=loader)

        bad.write_text(dump_yaml(make_ruleset_doc("third")), encoding="utf-8")
        result = load(rules_dir, loader=loader)

        assert set(result.snapshot.rulesets) == {"payment-fraud", "signup-abuse", "third"}
        assert result.files_parsed == 1

    def test_problems_from_several_files_are_all_reported_in_order(self, rules_dir: Path):
        """Every broken file is reported in one LoadError, sorted by file, line and column."""
        shutil.copy(FIXTURES / "kind.bad.yaml", rules_dir / "a.yaml")
        shutil.copy(FIXTURES / "points-range.bad.yaml", rules_dir / "b.yaml")

        problems = problems_of(rules_dir)

        assert [(Path(p.file).name, p.line) for p in problems] == [("a.yaml", 3), ("b.yaml", 10)]


class TestGoodFiles:
    """Valid YAML and JSON files load into rulesets, rules and embedded tests."""

    @pytest.mark.parametrize("name", ["good.yaml", "good.json"])
    def test_good_file_loads_two_rulesets(self, name: str):
        """Both documents of the file become rulesets, with their rules and tests."""
        result = load(FIXTURES / name)

        snapshot = result.snapshot
        assert list(snapshot.rulesets) == ["payment-fraud", "signup-abuse"]
        assert set(snapshot.rules) == {
            "large-amount",
            "foreign-country",
            "disposable-email",
            "many-accounts",
        }
        fraud = snapshot.rulesets["payment-fraud"]
        assert [b.decision for b in fraud.decisions] == ["deny", "review"]
        assert fraud.default_decision == "allow"
        assert dict(fraud.labels) == {"team": "risk"}
        assert [t.name for t in fraud.tests] == [
            "large foreign payment is denied",
            "small domestic payment is allowed",
        ]
        assert snapshot.rules["many-accounts"].enabled is False
        assert result.files == 1

    def test_yaml_and_json_with_the_same_content_share_a_revision(self):
        """The revision is a digest of content, not of the syntax it was written in."""
        from_yaml = load(FIXTURES / "good.yaml").snapshot
        from_json = load(FIXTURES / "good.json").snapshot

        assert from_yaml.revision == from_json.revision

    def test_json_locations_point_into_the_json_file(self):
        """A rule read from a JSON list is located at its opening brace."""
        snapshot = load(FIXTURES / "good.json").snapshot

        location = snapshot.rules["foreign-country"].location
        lines = (FIXTURES / "good.json").read_text(encoding="utf-8").splitlines()
        id_line = lines.index('          "id": "foreign-country",') + 1
        assert location is not None
        assert lines[location.line - 1].strip() == "{"
        assert location.line == id_line - 1


class TestEncodingAndNumbers:
    """Bytes are read as UTF-8 (BOM allowed) and JSON numbers keep JSON's meaning."""

    def test_json_exponent_stays_a_number(self, rules_dir: Path):
        """`1e3` in JSON is the number 1000 (YAML 1.1 would have made it a string)."""
        doc = make_ruleset_doc(
            "demo",
            [rule_doc("big", "input.amount > 999")],
            tests=[{"name": "t", "input": {"amount": "X"}, "expect": {"matched": ["big"]}}],
        )
        text = json.dumps(doc).replace('"X"', "1e3")
        path = write_rules(rules_dir, "rules.json", text)

        ruleset = load(path).snapshot.rulesets["demo"]

        amount = thaw(ruleset.tests[0].input)["amount"]
        assert amount == 1000
        assert isinstance(amount, float)

    def test_yaml_exponent_without_a_dot_is_a_string(self, rules_dir: Path):
        """YAML 1.1 reads `points: 1e3` as a string, which the schema refuses, located."""
        text = dump_yaml(make_ruleset_doc("demo", [rule_doc("r1", points=7)]))
        path = write_rules(rules_dir, "rules.yaml", text.replace("points: 7", "points: 1e3"))

        problems = problems_of(path)

        assert [p.path for p in problems] == ["$.spec.rules[0].points"]
        assert "'1e3' is not of type 'integer'" in problems[0].message

    def test_json_exponent_in_integer_field_is_an_int(self, rules_dir: Path):
        """`points: 1e1` in JSON gives the int 10 and the same revision as `points: 10`."""
        doc = make_ruleset_doc("demo", [rule_doc("r1", points=10)])
        plain = write_rules(rules_dir, "a/rules.json", json.dumps(doc))
        exponent = write_rules(
            rules_dir, "b/rules.json", json.dumps(doc).replace('"points": 10', '"points": 1e1')
        )

        from_exponent = load(exponent).snapshot

        assert type(from_exponent.rules["r1"].points) is int
        assert from_exponent.revision == load(plain).snapshot.revision

    @pytest.mark.parametrize("suffix", ["yaml", "json"])
    def test_utf8_bom_is_accepted(self, rules_dir: Path, suffix: str):
        """A leading byte order mark is skipped and does not shift positions."""
        doc = make_ruleset_doc("demo")
        text = dump_yaml(doc) if suffix == "yaml" else json.dumps(doc)
        path = write_rules(rules_dir, f"rules.{suffix}", b"\xef\xbb\xbf" + text.encode())

        ruleset = load(path).snapshot.rulesets["demo"]

        assert ruleset.location is not None
        assert (ruleset.location.line, ruleset.location.column) == (1, 1)

    def test_non_ascii_text_is_kept(self, rules_dir: Path):
        """UTF-8 names and string literals in conditions survive loading and evaluation."""
        doc = make_ruleset_doc(
            "demo",
            [{**rule_doc("city", "input.city == 'Zürich'"), "name": "Größe ✓"}],
            tests=[{"name": "ü", "input": {"city": "Zürich"}, "expect": {"matched": ["city"]}}],
        )
        path = write_rules(rules_dir, "rules.yaml", dump_yaml(doc))

        snapshot = load(path).snapshot

        assert snapshot.rules["city"].name == "Größe ✓"
        assert snapshot.rulesets["demo"].tests[0].name == "ü"

    def test_invalid_utf8_is_located(self, rules_dir: Path):
        """A byte that is not UTF-8 is reported at its line and column, with its value."""
        path = write_rules(rules_dir, "rules.yaml", b"apiVersion: x\nkind: y\nname: ab\xffc\n")

        problems = problems_of(path)

        assert len(problems) == 1
        problem = problems[0]
        assert (problem.file, problem.line, problem.column) == (str(path), 3, 9)
        assert "not valid UTF-8 (byte 0xff)" in problem.message

    def test_invalid_utf8_column_counts_characters(self, rules_dir: Path):
        """After `name: é` the bad byte is character 8 of its line."""
        path = write_rules(rules_dir, "rules.yaml", "name: é".encode() + b"\xff\n")

        (problem,) = problems_of(path)

        assert (problem.line, problem.column) == (1, 8)

    def test_json_duplicate_key_is_located(self, rules_dir: Path):
        """A repeated JSON key is reported at the line of its second occurrence."""
        path = write_rules(
            rules_dir, "rules.json", '{\n  "apiVersion": "rule-sidecar/v1",\n  "apiVersion": "x"\n}'
        )

        (problem,) = problems_of(path)

        assert "duplicate key 'apiVersion'" in problem.message
        assert (problem.line, problem.column) == (3, 3)

    def test_json_syntax_error_is_located(self, rules_dir: Path):
        """json's own line and column are passed on."""
        path = write_rules(rules_dir, "rules.json", '{"apiVersion": "rule-sidecar/v1",\n "kind": }')

        (problem,) = problems_of(path)

        assert (problem.line, problem.column) == (2, 10)
        assert problem.message.startswith("JSON syntax error")


class TestFileLimits:
    """Files over the size or document-count limits are refused before they are parsed."""

    def test_file_over_max_bytes_is_refused(self, rules_dir: Path):
        """One byte over the limit gives a problem naming the size and the limit."""
        path = write_rules(rules_dir, "rules.yaml", dump_yaml(make_ruleset_doc()))
        size = path.stat().st_size
        loader = Loader(file_limits=FileLimits(max_bytes=size - 1))

        (problem,) = problems_of(path, loader=loader)

        assert problem.file == str(path)
        assert problem.message == f"file is {size} bytes, the limit is {size - 1}"

    def test_file_at_max_bytes_is_accepted(self, rules_dir: Path):
        """A file exactly as large as the limit loads."""
        path = write_rules(rules_dir, "rules.yaml", dump_yaml(make_ruleset_doc()))
        loader = Loader(file_limits=FileLimits(max_bytes=path.stat().st_size))

        assert list(load(path, loader=loader).snapshot.rulesets) == ["demo"]

    @pytest.mark.parametrize("suffix", ["yaml", "json"])
    def test_too_many_documents_are_refused(self, rules_dir: Path, suffix: str):
        """Three documents where two are allowed is one problem; two documents load."""
        docs = [make_ruleset_doc(f"set-{i}") for i in range(3)]
        dump = dump_yaml if suffix == "yaml" else json.dumps
        too_many = write_rules(rules_dir, f"a/rules.{suffix}", dump(docs))
        enough = write_rules(rules_dir, f"b/rules.{suffix}", dump(docs[:2]))
        limits = FileLimits(max_documents=2)

        (problem,) = problems_of(too_many, loader=Loader(file_limits=limits))
        result = load(enough, loader=Loader(file_limits=limits))

        assert "more than 2 documents" in problem.message
        assert len(result.snapshot.rulesets) == 2

    @pytest.mark.parametrize("parts", [1, 2, 3, 7, 13, 1000])
    def test_shares_of_one_file_add_up_to_at_most_one_file(self, parts: int):
        """The documents of one validate request: N files cost what one may."""
        whole = FileLimits()
        share = whole.share(parts)
        assert parts * share.max_bytes <= whole.max_bytes
        assert parts * share.max_documents <= whole.max_documents
        assert parts * share.max_values <= whole.max_values
        assert share.max_depth == whole.max_depth  # a bound of one document
        assert share.max_documents >= 1

    def test_the_examination_of_a_candidate_takes_its_share(self):
        """`examine_candidate` reads each file within the limits it is given."""
        text = dump_yaml([make_ruleset_doc(f"set-{i}") for i in range(3)]).encode()
        files = [SourceFile("request#1.yaml", text)]
        loader = Loader()
        assert not loader.examine_candidate(files).problems
        limited = loader.examine_candidate(files, limits=FileLimits().share(500))
        assert [p.code for p in limited.problems] == ["limit.documents"]

    def test_a_check_in_process_stops_between_files(self):
        """Without a checker process, past its deadline or once stopped, a check stops
        before its next file (it cannot stop inside one)."""
        files = [
            SourceFile(f"request#{i}.yaml", dump_yaml(make_ruleset_doc(f"s{i}")).encode())
            for i in (1, 2)
        ]
        loader = Loader()
        with pytest.raises(TimeoutError):
            loader.examine_candidate(files, deadline=time.monotonic() - 1)
        stop = threading.Event()
        stop.set()
        with pytest.raises(TimeoutError):
            loader.examine_candidate(files, stop=stop)


class TestDuplicateIds:
    """Ruleset and rule ids are unique across files, and both places are named."""

    def test_duplicate_ruleset_id_across_files_names_both(self, rules_dir: Path):
        """The second definition is reported, pointing back at the first."""
        first = write_rules(rules_dir, "a.yaml", dump_yaml(make_ruleset_doc("shared")))
        doc = make_ruleset_doc("shared", [rule_doc("other")])
        second = write_rules(rules_dir, "b.yaml", dump_yaml(doc))

        (problem,) = problems_of(rules_dir)

        assert problem.file == str(second)
        assert problem.ruleset_id == "shared"
        assert f"ruleset id 'shared' is also defined at {first}:1:1" in problem.message

    def test_duplicate_rule_id_across_files_names_both(self, rules_dir: Path):
        """A rule id used by two rulesets in two files is reported with both locations."""
        first = write_rules(
            rules_dir, "a.yaml", dump_yaml(make_ruleset_doc("one", [rule_doc("x")]))
        )
        second = write_rules(
            rules_dir, "b.yaml", dump_yaml(make_ruleset_doc("two", [rule_doc("x")]))
        )

        (problem,) = problems_of(rules_dir)

        assert (problem.file, problem.rule_id, problem.ruleset_id) == (str(second), "x", "two")
        assert "rule id 'x' is also used by ruleset 'one'" in problem.message
        assert str(first) in problem.message

    def test_duplicate_ruleset_id_in_two_documents_of_one_file(self, rules_dir: Path):
        """Two documents of one file with the same id are refused too."""
        docs = [
            make_ruleset_doc("same", [rule_doc("a")]),
            make_ruleset_doc("same", [rule_doc("b")]),
        ]
        path = write_rules(rules_dir, "rules.yaml", dump_yaml(docs))

        (problem,) = problems_of(path)

        assert "ruleset id 'same' is also defined at" in problem.message
        assert problem.line > 1


class TestDefaultsAndIds:
    """Optional fields get their documented defaults and numeric ids become strings."""

    def test_integer_ids_become_strings(self, rules_dir: Path):
        """Ruleset id 7 and rule id 12 are "7" and "12", also in a test's `matched`."""
        doc = make_ruleset_doc(
            7,
            [rule_doc(12)],
            tests=[{"name": "t", "input": {"amount": 500}, "expect": {"matched": [12]}}],
        )
        path = write_rules(rules_dir, "rules.yaml", dump_yaml(doc))

        snapshot = load(path).snapshot

        assert list(snapshot.rulesets) == ["7"]
        assert list(snapshot.rules) == ["12"]
        assert snapshot.rules["12"].ruleset_id == "7"
        assert snapshot.rulesets["7"].tests[0].expect.matched == frozenset({"12"})

    def test_defaults(self, rules_dir: Path):
        """name defaults to the id, enabled to true, priority to 0, the rest to empty."""
        path = write_rules(rules_dir, "rules.yaml", dump_yaml(make_ruleset_doc("demo")))

        snapshot = load(path).snapshot

        ruleset = snapshot.rulesets["demo"]
        rule = snapshot.rules["demo-big"]
        assert (ruleset.name, ruleset.description, dict(ruleset.labels)) == ("demo", "", {})
        assert (ruleset.decisions, ruleset.default_decision, ruleset.tests) == ((), None, ())
        assert (rule.name, rule.enabled, rule.priority) == ("demo-big", True, 0)
        assert (rule.description, rule.tags, dict(rule.metadata)) == ("", (), {})

    def test_negative_integer_id_is_refused(self, rules_dir: Path):
        """A numeric id must be a non-negative row id."""
        path = write_rules(rules_dir, "rules.yaml", dump_yaml(make_ruleset_doc(-1)))

        problems = problems_of(path)

        assert any(p.path == "$.metadata.id" for p in problems)


class TestIncrementalReload:
    """The loader remembers files by content and re-reads only what changed."""

    def test_same_files_are_not_parsed_again(self, rules_dir: Path):
        """A second load of unchanged files parses nothing and returns the same objects."""
        write_rules(rules_dir, "a.yaml", dump_yaml(make_ruleset_doc("one")))
        write_rules(rules_dir, "b.yaml", dump_yaml(make_ruleset_doc("two")))
        loader = Loader()
        first = load(rules_dir, loader=loader)

        second = load(rules_dir, loader=loader)

        assert (first.files_parsed, second.files_parsed, second.files_reused) == (2, 0, 2)
        for ruleset_id in ("one", "two"):
            assert second.snapshot.rulesets[ruleset_id] is first.snapshot.rulesets[ruleset_id]
        assert second.snapshot.revision == first.snapshot.revision

    def test_changing_one_file_reparses_only_it(self, rules_dir: Path):
        """The changed file's ruleset is new; the other file's ruleset is reused as is."""
        write_rules(rules_dir, "a.yaml", dump_yaml(make_ruleset_doc("one")))
        changed = write_rules(rules_dir, "b.yaml", dump_yaml(make_ruleset_doc("two")))
        loader = Loader()
        first = load(rules_dir, loader=loader)

        changed.write_text(
            dump_yaml(make_ruleset_doc("two", [rule_doc("two-r1", points=99)])), encoding="utf-8"
        )
        second = load(rules_dir, loader=loader)

        assert second.files_parsed == 1
        assert second.snapshot.rulesets["one"] is first.snapshot.rulesets["one"]
        assert second.snapshot.rulesets["two"] is not first.snapshot.rulesets["two"]
        assert second.snapshot.rules["two-r1"].points == 99

    def test_removed_file_takes_its_rulesets_along(self, rules_dir: Path):
        """The file set passed in is complete: a file no longer given is gone."""
        write_rules(rules_dir, "a.yaml", dump_yaml(make_ruleset_doc("one")))
        removed = write_rules(rules_dir, "b.yaml", dump_yaml(make_ruleset_doc("two")))
        loader = Loader()
        load(rules_dir, loader=loader)

        removed.unlink()
        result = load(rules_dir, loader=loader)

        assert list(result.snapshot.rulesets) == ["one"]
        assert result.files_parsed == 0

    def test_unchanged_broken_file_is_reported_again(self, rules_dir: Path):
        """A cached broken file keeps failing every load until it is fixed."""
        shutil.copy(FIXTURES / "kind.bad.yaml", rules_dir / "bad.yaml")
        loader = Loader()

        first = problems_of(rules_dir, loader=loader)
        second = problems_of(rules_dir, loader=loader)

        assert first == second
        assert len(first) == 1

    def test_forget_makes_the_next_load_parse_everything(self, rules_dir: Path):
        """After `forget` every file is parsed again."""
        write_rules(rules_dir, "a.yaml", dump_yaml(make_ruleset_doc("one")))
        loader = Loader()
        load(rules_dir, loader=loader)

        loader.forget()

        assert load(rules_dir, loader=loader).files_parsed == 1


class TestChecks:
    """Conditions of disabled rules compile; `run_checks` only governs the semantic checks."""

    def test_disabled_rule_condition_must_compile(self, rules_dir: Path):
        """A disabled rule with a broken condition is refused at the condition."""
        rule = {**rule_doc("off", "nosuch(input.amount)"), "enabled": False}
        path = write_rules(rules_dir, "rules.yaml", dump_yaml(make_ruleset_doc("demo", [rule])))

        (problem,) = problems_of(path)

        assert problem.rule_id == "off"
        assert problem.path == "$.spec.rules[0].condition"
        assert "undeclared reference to 'nosuch'" in problem.message

    def test_disabled_rule_is_loaded_but_not_planned(self, rules_dir: Path):
        """A disabled rule is in the registry but not in the evaluation plan."""
        rules = [rule_doc("on"), {**rule_doc("off"), "enabled": False}]
        path = write_rules(rules_dir, "rules.yaml", dump_yaml(make_ruleset_doc("demo", rules)))

        ruleset = load(path).snapshot.rulesets["demo"]

        assert [r.id for r in ruleset.rules] == ["on", "off"]
        assert [r.id for r in ruleset.plan.rules] == ["on"]

    @pytest.mark.parametrize(
        "fixture", ["failing-test.bad.yaml", "unreachable-band.bad.yaml"], ids=str
    )
    def test_run_checks_false_skips_semantic_checks(self, fixture: str):
        """Failing embedded tests and unreachable bands pass when checks are off."""
        result = load(FIXTURES / fixture, loader=Loader(run_checks=False))

        assert list(result.snapshot.rulesets) == ["payments"]

    @pytest.mark.parametrize(
        ("fixture", "expected"),
        [
            ("kind.bad.yaml", "unknown kind"),
            ("points-range.bad.yaml", "greater than the maximum"),
            ("non-boolean.bad.yaml", "must be a boolean expression"),
            ("duplicate-rule-id.bad.yaml", "is also used at"),
        ],
        ids=lambda value: str(value).removesuffix(".bad.yaml"),
    )
    def test_run_checks_false_still_refuses_invalid_documents(self, fixture: str, expected: str):
        """Schema, compile and id errors are reported whatever `run_checks` says."""
        problems = problems_of(FIXTURES / fixture, loader=Loader(run_checks=False))

        assert any(expected in p.message for p in problems)

    def test_unreachable_band_advice_matches_the_schema(self):
        """The advice given for an unreachable band is to list the highest band first."""
        problems = problems_of(FIXTURES / "unreachable-band.bad.yaml")

        assert any("from the highest min_points down" in p.message for p in problems)

    def test_per_load_run_checks_does_not_reuse_unchecked_results(self, rules_dir: Path):
        """A file loaded once without checks is checked when the next load asks for it."""
        shutil.copy(FIXTURES / "failing-test.bad.yaml", rules_dir / "rules.yaml")
        loader = Loader()
        loader.load(read_rule_files([rules_dir]), run_checks=False)

        problems = problems_of(rules_dir, loader=loader)

        assert any("test 'large payment' failed" in p.message for p in problems)


class TestRevision:
    """The snapshot revision depends on rule content only."""

    def test_same_content_from_other_names_and_order_gives_same_revision(self, tmp_path: Path):
        """File names, file order and YAML style do not change the revision."""
        one, two = make_ruleset_doc("one"), make_ruleset_doc("two")
        a = write_rules(tmp_path, "x/a.yaml", dump_yaml(one))
        b = write_rules(tmp_path, "x/b.yaml", dump_yaml(two))
        flow = json.dumps(two)  # JSON is YAML flow style
        c = write_rules(tmp_path, "y/zz-two.yaml", flow)
        d = write_rules(tmp_path, "y/zz-one.yml", "# comment\n" + dump_yaml(one))

        revision = load(a, b).snapshot.revision

        assert load(b, a).snapshot.revision == revision
        assert load(c, d).snapshot.revision == revision

    def test_revision_changes_with_a_point_value(self, rules_dir: Path):
        """Changing one rule's points gives a different revision."""
        path = write_rules(rules_dir, "rules.yaml", dump_yaml(make_ruleset_doc("demo")))
        before = load(path).snapshot.revision

        path.write_text(
            dump_yaml(make_ruleset_doc("demo", [rule_doc("demo-r1", points=11)])), encoding="utf-8"
        )

        assert load(path).snapshot.revision != before


class TestConditionErrorPosition:
    """A condition that does not compile is reported at the failing character."""

    BASE = (
        "apiVersion: rule-sidecar/v1\n"
        "kind: RuleSet\n"
        "metadata: {id: demo}\n"
        "spec:\n"
        "  rules:\n"
        "    - id: r1\n"
        "      points: 1\n"
        "      condition: {condition}\n"
    )

    def condition_problem(self, rules_dir: Path, condition: str) -> Problem:
        """The single problem of a ruleset whose one condition is `condition`."""
        path = write_rules(rules_dir, "rules.yaml", self.BASE.replace("{condition}", condition))
        (problem,) = problems_of(path)
        assert problem.path == "$.spec.rules[0].condition"
        return problem

    @pytest.mark.parametrize("quote", ['"', "'"])
    def test_quoted_scalar_column_is_the_failing_character(self, rules_dir: Path, quote: str):
        """In `'nosuch(1)'` at column 18 the error (at `(`) is column 18 + 1 + 6."""
        problem = self.condition_problem(rules_dir, f"{quote}nosuch(1){quote}")

        assert (problem.line, problem.column) == (8, 25)
        assert "(expression 1:7)" in problem.message

    def test_plain_scalar_column_is_the_failing_character(self, rules_dir: Path):
        """In plain `nosuch(1)` at column 18 the error (at `(`) is column 18 + 6."""
        problem = self.condition_problem(rules_dir, "nosuch(1)")

        assert (problem.line, problem.column) == (8, 24)

    def test_block_scalar_error_line_is_the_failing_line(self, rules_dir: Path):
        """In a `|` block the problem is on the expression line that fails."""
        problem = self.condition_problem(
            rules_dir, "|\n        input.amount > 1 &&\n          nosuch(1)"
        )

        assert problem.line == 10
        assert "(expression 2:" in problem.message


class TestNothingChanged:
    """A load whose files did not change reuses everything, down to the snapshot."""

    def test_same_files_give_the_same_snapshot_object(self):
        """Loading the same files again returns the last candidate itself, parsing nothing."""
        loader = Loader()
        files = [SourceFile("a.yaml", dump_yaml(make_ruleset_doc("a")).encode())]
        first = loader.load(files)
        again = loader.load([SourceFile("a.yaml", files[0].content)])
        assert again.files_parsed == 0
        assert again.snapshot is first.snapshot

    def test_a_removed_file_is_a_change(self):
        """Dropping a file is noticed even though no remaining file changed."""
        loader = Loader()
        a = SourceFile("a.yaml", dump_yaml(make_ruleset_doc("a")).encode())
        b = SourceFile("b.yaml", dump_yaml(make_ruleset_doc("b")).encode())
        assert set(loader.load([a, b]).snapshot.rulesets) == {"a", "b"}
        assert set(loader.load([a]).snapshot.rulesets) == {"a"}

    def test_unlocated_json_problems_name_the_rule(self):
        """Generated JSON (`located=False`) is not located by line, but by path and rule id."""
        document = make_ruleset_doc("gen", rules=[{"id": "r1", "condition": "true", "points": "x"}])
        source = SourceFile("db#rulesets/gen.json", json.dumps(document).encode(), located=False)
        with pytest.raises(LoadError) as raised:
            Loader().load([source])
        (problem,) = raised.value.problems
        assert (problem.line, problem.path, problem.rule_id) == (1, "$.spec.rules[0].points", "r1")


def timed_load(loader: Loader, files: list[SourceFile]) -> tuple[LoadResult, float]:
    """A load and its wall time, as the caller sees it."""
    started = time.perf_counter()
    result = loader.load(files)
    return result, time.perf_counter() - started


def assert_stages_within(timings: Mapping[LoadStage, float], wall: float) -> None:
    """Every stage a load runs is timed, none negative, together within the wall time."""
    assert list(timings) == list(LOAD_STAGES)
    assert all(seconds >= 0 for seconds in timings.values())
    assert sum(timings.values()) <= wall


class TestStageTimings:
    """A load times its own stages, so nothing outside it has to wrap its internals."""

    def test_a_cold_load_times_every_stage(self):
        """Every stage ran and took time; the stages add up to no more than the load."""
        files = read_rule_files([FIXTURES / "good.yaml"])  # with embedded tests
        result, wall = timed_load(Loader(), files)
        assert_stages_within(result.timings, wall)
        assert all(seconds > 0 for seconds in result.timings.values()), result.timings

    def test_an_incremental_and_an_unchanged_load_are_timed_too(self, rules_dir: Path):
        """Reusing files still times every stage; a load that changed nothing only hashed."""
        write_rules(rules_dir, "a.yaml", dump_yaml(make_ruleset_doc("one")))
        changed = write_rules(rules_dir, "b.yaml", dump_yaml(make_ruleset_doc("two")))
        loader = Loader()
        load(rules_dir, loader=loader)
        changed.write_text(dump_yaml(make_ruleset_doc("two", [rule_doc("two-r9")])), "utf-8")
        result, wall = timed_load(loader, read_rule_files([rules_dir]))
        assert result.files_parsed == 1
        assert_stages_within(result.timings, wall)
        same, wall = timed_load(loader, read_rule_files([rules_dir]))
        assert same.files_parsed == 0
        assert_stages_within(same.timings, wall)
        assert {stage for stage, seconds in same.timings.items() if seconds} <= {LoadStage.PARSE}

    def test_listeners_hear_each_load_that_ran_and_each_timed_stage(self, rules_dir: Path):
        """A load (a refused one without `build`) and a timed publish are told; a load
        that changed nothing is not; a failing listener breaks nothing."""
        heard: list[Mapping[LoadStage, float]] = []
        loader = Loader()
        loader.add_stage_listener(lambda seconds: 1 / 0)
        loader.add_stage_listener(heard.append)
        write_rules(rules_dir, "a.yaml", dump_yaml(make_ruleset_doc("one")))
        result = load(rules_dir, loader=loader)
        load(rules_dir, loader=loader)
        assert heard == [result.timings]
        shutil.copy(FIXTURES / "failing-test.bad.yaml", rules_dir / "bad.yaml")
        problems_of(rules_dir, loader=loader)
        assert set(heard[1]) == set(LOAD_STAGES) - {LoadStage.BUILD}
        registry = RuleRegistry()
        published, _ = loader.timed_publish(registry.publish, result.snapshot)
        assert (published.version, registry.current) == (1, published)
        assert list(heard[2]) == [LoadStage.PUBLISH]
        assert heard[2][LoadStage.PUBLISH] >= 0

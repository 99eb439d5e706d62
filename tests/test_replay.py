"""`rule-sidecar replay`: a change's effect on real decisions, from real rule files and
real inputs files (plain and gzip, decision-log lines written by a real sidecar)."""

from __future__ import annotations

import gzip
import io
import json
import os
import random
import re
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import dump_yaml, fraud_doc, make_ruleset_doc, rule_doc
from server_support import command

from sidecar.cli import main
from sidecar.replay import load_rules, replay

PROBLEM_LINE_RE = re.compile(r"^(?P<file>.+?):(?P<line>\d+):(?P<column>\d+): (?P<message>.+)$")


def run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = main(list(argv), out=out)
    return code, out.getvalue()


def run_process(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*command(), *argv], capture_output=True, text=True, timeout=120, check=False
    )


def candidate_doc() -> dict[str, Any]:
    """fraud with `large-amount` at 10 points, a shadow rule worth 1,000 and a rule that
    errors on every input without a card."""
    doc = fraud_doc(large_points=10)
    doc["spec"]["rules"].extend(
        [
            rule_doc("watch-fr", "input.country == 'FR'", 1000, mode="shadow"),
            rule_doc("card-present", "input.card.present", 5),
        ]
    )
    return doc


@pytest.fixture
def sides(tmp_path: Path) -> tuple[Path, Path]:
    baseline = tmp_path / "baseline" / "fraud.yaml"
    candidate = tmp_path / "candidate" / "fraud.yaml"
    for path, doc in ((baseline, fraud_doc()), (candidate, candidate_doc())):
        path.parent.mkdir()
        path.write_text(dump_yaml(doc), encoding="utf-8")
    return baseline, candidate


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return path


CRAFTED = [
    json.dumps({"input": {"amount": 5000, "country": "FR"}}),  # 1: deny -> review
    "",  # 2: blank, not counted
    json.dumps({"amount": 5000, "country": "US"}),  # 3: bare input, review -> allow
    json.dumps({"input": {"amount": 10, "country": "FR"}}),  # 4: allow -> allow
    "not json",  # 5: invalid
    json.dumps({"input": {"amount": 10, "country": "US"}}),  # 6: allow -> allow
    json.dumps({"input": {"tags": list(range(1001))}}),  # 7: refused (max_items)
    json.dumps({"input": {"amount": 1, "country": "FR"}, "ruleset_id": "other"}),  # 8: skipped
    json.dumps({"input": {"amount": 2000, "country": "FR"}}),  # 9: deny -> review
]


class TestCrafted:
    """A crafted case whose every count is known."""

    def test_counts_matrix_rules_and_errors_exactly(self, sides, tmp_path: Path):
        baseline, candidate = sides
        inputs = write_lines(tmp_path / "inputs.jsonl", CRAFTED)
        code, output = run(
            "replay",
            *("--candidate", str(candidate), "--baseline", str(baseline)),
            *("--inputs", str(inputs), "--ruleset", "fraud", "--format", "json"),
        )
        assert code == 0, output
        data = json.loads(output)
        assert (data["ruleset"], data["inputs"], data["lines"]) == ("fraud", 5, 8)
        assert (data["changed"], data["changed_percent"], data["points_changed"]) == (3, 60.0, 3)
        assert data["matrix"] == [
            {"from": "allow", "to": "allow", "count": 2},
            {"from": "deny", "to": "review", "count": 2},
            {"from": "review", "to": "allow", "count": 1},
        ]
        # A shadow rule's matches count as its matches, and change no decision; a rule on
        # one side only is null on the other.
        assert data["rules"] == [
            {"id": "large-amount", "baseline_matches": 3, "candidate_matches": 3},
            {"id": "foreign-country", "baseline_matches": 3, "candidate_matches": 3},
            {"id": "never-on", "baseline_matches": 0, "candidate_matches": 0},
            {"id": "watch-fr", "baseline_matches": None, "candidate_matches": 3},
            {"id": "card-present", "baseline_matches": None, "candidate_matches": 0},
        ]
        ((error),) = data["new_errors"]
        assert (error["rule"], error["count"], error["example"]) == ("card-present", 5, 1)
        assert "card" in error["error"]
        assert data["examples"] == [
            {"line": 1, "from": "deny", "to": "review", "total_points": [70, 40]},
            {"line": 3, "from": "review", "to": "allow", "total_points": [40, 10]},
            {"line": 9, "from": "deny", "to": "review", "total_points": [70, 40]},
        ]
        assert (data["skipped_other_rulesets"], data["invalid"], data["invalid_lines"]) == (
            1,
            1,
            [5],
        )
        assert data["refused"] == 1
        ((refused),) = data["refused_inputs"]
        assert refused["line"] == 7
        assert refused["error"].startswith("$.tags")

    def test_examples_are_the_first_n(self, sides, tmp_path: Path):
        """Without --ruleset and with no line naming one, the candidate's only ruleset."""
        baseline, candidate = sides
        inputs = write_lines(tmp_path / "inputs.jsonl", [*CRAFTED[:7], *CRAFTED[8:]])
        code, output = run(
            "replay",
            *("--candidate", str(candidate), "--baseline", str(baseline)),
            *("--inputs", str(inputs), "--format", "json", "--examples", "1"),
        )
        assert code == 0
        data = json.loads(output)
        assert data["ruleset"] == "fraud"  # the candidate's only ruleset
        assert [example["line"] for example in data["examples"]] == [1]

    def test_human_and_markdown_say_the_same(self, sides, tmp_path: Path):
        baseline, candidate = sides
        inputs = write_lines(tmp_path / "inputs.jsonl", CRAFTED)
        common = ("--candidate", str(candidate), "--baseline", str(baseline), "--ruleset", "fraud")
        code, human = run("replay", *common, "--inputs", str(inputs))
        assert code == 0
        assert "3 of 5 decisions change (60.0%) against the baseline" in human
        assert "1 input(s) refused by the input limits (line 7)" in human
        assert "1 line(s) of other rulesets skipped" in human
        assert re.search(r"^  deny\s+review\s+2$", human, re.MULTILINE)
        assert re.search(r"^  card-present\s+5\s+1\s+", human, re.MULTILINE)
        code, markdown = run("replay", *common, "--inputs", str(inputs), "--format", "markdown")
        assert code == 0
        assert "**3 of 5 decisions change (60.0%) against the baseline" in markdown
        assert "| from | to | inputs |\n|---|---|---:|\n" in markdown
        assert "| `deny` | **`review`** | 2 |" in markdown
        assert "| `allow` | `allow` | 2 |" in markdown
        assert "| `watch-fr` | - | 3 |" in markdown
        assert "<details>" in markdown

    def test_markdown_cannot_be_formatted_by_a_logged_value(self, tmp_path: Path):
        """A logged decision is data: in the comment it is code, its pipes escaped."""
        rules = tmp_path / "fraud.yaml"
        rules.write_text(dump_yaml(fraud_doc()), encoding="utf-8")
        line = {"input": {"amount": 1, "country": "US"}, "decision": "x|`@team` <b>"}
        line.update(ruleset_id="fraud", total_points=0, matched=[])
        long = {**line, "decision": "y" * 500}
        inputs = write_lines(tmp_path / "log.jsonl", [json.dumps(line), json.dumps(long)])
        code, markdown = run(
            "replay", "--candidate", str(rules), "--inputs", str(inputs), "--format", "markdown"
        )
        assert code == 0
        assert "| `x\\|'@team' <b>` | **`allow`** | 1 |" in markdown
        assert f"| `{'y' * 119}…` | **`allow`** | 1 |" in markdown


def generated_inputs(count: int, seed: int = 7) -> list[dict[str, Any]]:
    r = random.Random(seed)
    return [
        {
            "amount": round(r.lognormvariate(5.5, 1.5), 2),
            "country": r.choice(["US", "US", "US", "FR", "DE", "BR"]),
            "user": {"id": f"u-{r.randint(1, 10**6)}", "verified": r.random() < 0.7},
        }
        for _ in range(count)
    ]


class TestFiles:
    def test_plain_gzip_and_gzip_without_suffix_agree(self, sides, tmp_path: Path):
        baseline, candidate = sides
        lines = [json.dumps({"input": doc}) for doc in generated_inputs(2000)]
        plain = write_lines(tmp_path / "inputs.jsonl", lines)
        data = plain.read_bytes()
        (tmp_path / "inputs.jsonl.gz").write_bytes(gzip.compress(data))
        (tmp_path / "inputs.bin").write_bytes(gzip.compress(data))
        answers = []
        for name in ("inputs.jsonl", "inputs.jsonl.gz", "inputs.bin"):
            code, output = run(
                "replay",
                *("--candidate", str(candidate), "--baseline", str(baseline)),
                *("--inputs", str(tmp_path / name), "--format", "json"),
            )
            assert code == 0, output
            answers.append({k: v for k, v in json.loads(output).items() if k != "inputs_file"})
        assert answers[0] == answers[1] == answers[2]
        assert answers[0]["inputs"] == 2000
        assert 0 < answers[0]["changed"] < 2000

    def test_worker_processes_give_what_one_process_gives(self, sides, tmp_path: Path):
        """Blocks evaluated by worker processes merge to exactly the one-process answer."""
        baseline, candidate = sides
        lines = [json.dumps({"input": doc}) for doc in generated_inputs(3000)]
        lines[1234] = "{broken"
        inputs = write_lines(tmp_path / "inputs.jsonl", lines)
        base, cand = load_rules([str(baseline)]), load_rules([str(candidate)])
        whole = replay(cand, base, str(inputs), examples=50).to_dict()
        blocks = replay(cand, base, str(inputs), examples=50, block_bytes=8192).to_dict()
        assert whole == blocks
        assert whole["invalid_lines"] == [1235]
        assert len(whole["examples"]) == 50

    def test_a_truncated_gzip_is_a_usage_error(self, sides, tmp_path: Path):
        _, candidate = sides
        data = gzip.compress(b"".join(b'{"amount": %d}\n' % i for i in range(5000)))
        (tmp_path / "cut.gz").write_bytes(data[: len(data) // 2])
        code, _ = run("replay", "--candidate", str(candidate), "--inputs", str(tmp_path / "cut.gz"))
        assert code == 2


def logged_line(document: dict[str, Any], decision: str | None, points: int, **extra: Any) -> str:
    """A line in the exact shape `sidecar.api.decisionlog` writes."""
    return json.dumps(
        {
            "decision_id": "0193a7c2-5d1e-7b3a-8c41-29f0e3d4a5b6",
            "timestamp": "2024-12-01T10:15:02.123456Z",
            "ruleset_id": "fraud",
            "registry_version": 3,
            "revision": "9f2c",
            "input": document,
            "total_points": points,
            "decision": decision,
            "matched": [],
            "shadow_matched": [],
            "errors": [],
            "duration_us": 12.4,
            **extra,
        }
    )


class TestAgainstTheLog:
    def test_logged_decisions_are_the_baseline(self, sides, tmp_path: Path):
        _, candidate = sides
        lines = [
            logged_line({"amount": 5000, "country": "FR"}, "deny", 70, matched=["large-amount"]),
            logged_line({"amount": 10, "country": "US"}, "allow", 0, matched=["gone-rule"]),
            json.dumps({"input": {"amount": 1, "country": "US"}}),  # nothing logged
            logged_line({"amount": 1}, "allow", 0, ruleset_id="other"),
        ]
        inputs = write_lines(tmp_path / "log.jsonl", lines)
        code, output = run(
            "replay", "--candidate", str(candidate), "--inputs", str(inputs), "--format", "json"
        )
        assert code == 0, output
        data = json.loads(output)
        assert data["compared_with"] == "log"
        assert (data["inputs"], data["changed"]) == (2, 1)
        assert (data["not_comparable"], data["not_comparable_lines"]) == (1, [3])
        assert data["skipped_other_rulesets"] == 1
        assert data["examples"] == [
            {
                "line": 1,
                "decision_id": "0193a7c2-5d1e-7b3a-8c41-29f0e3d4a5b6",
                "from": "deny",
                "to": "review",
                "total_points": [70, 40],
            }
        ]
        rules = {rule["id"]: rule for rule in data["rules"]}
        assert rules["large-amount"] == {
            "id": "large-amount",
            "baseline_matches": 1,
            "candidate_matches": 1,
        }
        assert rules["gone-rule"]["candidate_matches"] is None  # in the log only
        assert rules["card-present"]["baseline_matches"] == 0

    def test_ruleset_is_taken_from_the_first_logged_line(self, tmp_path: Path):
        rules = tmp_path / "rules.yaml"
        other = make_ruleset_doc("other", [rule_doc("o", "true", 1)])
        rules.write_text(dump_yaml([fraud_doc(), other]), encoding="utf-8")
        lines = [
            json.dumps({"amount": 1}),
            logged_line({"amount": 5000, "country": "US"}, "review", 40),
            logged_line({"amount": 1}, None, 1, ruleset_id="other"),
        ]
        inputs = write_lines(tmp_path / "log.jsonl", lines)
        code, output = run(
            "replay", "--candidate", str(rules), "--inputs", str(inputs), "--format", "json"
        )
        assert code == 0, output
        data = json.loads(output)
        assert (data["ruleset"], data["inputs"], data["skipped_other_rulesets"]) == ("fraud", 1, 1)
        assert data["not_comparable"] == 1

    def test_only_lines_without_a_decision_is_a_usage_error(self, sides, tmp_path: Path):
        _, candidate = sides
        inputs = write_lines(tmp_path / "in.jsonl", [json.dumps({"amount": 1})])
        result = run_process("replay", "--candidate", str(candidate), "--inputs", str(inputs))
        assert result.returncode == 2
        assert "without a logged decision" in result.stderr
        assert "--baseline" in result.stderr


@pytest.mark.slow
class TestRealDecisionLog:
    def test_a_sidecar_s_own_log_replays_unchanged(self, tmp_path: Path, sides):
        """Lines a real `serve --decision-log` wrote, replayed against the rules that
        wrote them, change nothing; against the candidate they change as computed."""
        from test_decision_log import logging_sidecar, post, wait_lines

        baseline, candidate = sides
        log = tmp_path / "decisions.log"
        documents = generated_inputs(50)
        with logging_sidecar(tmp_path, baseline.parent, str(log)) as served:
            post(served, {"inputs": documents})
            wait_lines(log, 50)
        same = run_process("replay", "--candidate", str(baseline), "--inputs", str(log))
        assert same.returncode == 0, same.stderr
        assert "0 of 50 decisions change (0.0%) against the logged decisions" in same.stdout
        changed = run_process(
            "replay",
            *("--candidate", str(candidate), "--inputs", str(log), "--format", "json"),
        )
        against_baseline = run_process(
            "replay",
            *("--candidate", str(candidate), "--baseline", str(baseline)),
            *("--inputs", str(log), "--format", "json"),
        )
        from_log, from_rules = json.loads(changed.stdout), json.loads(against_baseline.stdout)
        assert from_log["matrix"] == from_rules["matrix"]
        assert from_log["changed"] > 0


@pytest.mark.slow
class TestExitCodes:
    @pytest.fixture
    def inputs(self, tmp_path: Path) -> Path:
        return write_lines(tmp_path / "inputs.jsonl", CRAFTED)

    @pytest.mark.parametrize(("percent", "code"), [("59.9", 1), ("60", 0), ("100", 0), ("0", 1)])
    def test_fail_if_changed(self, sides, inputs: Path, percent: str, code: int):
        baseline, candidate = sides
        result = run_process(
            "replay",
            *("--candidate", str(candidate), "--baseline", str(baseline)),
            *("--inputs", str(inputs), "--ruleset", "fraud", "--fail-if-changed", percent),
        )
        assert result.returncode == code, result.stderr
        assert "3 of 5 decisions change" in result.stdout

    def test_unchanged_passes_any_threshold(self, sides, inputs: Path):
        baseline, _ = sides
        result = run_process(
            "replay",
            *("--candidate", str(baseline), "--baseline", str(baseline)),
            *("--inputs", str(inputs), "--ruleset", "fraud", "--fail-if-changed", "0"),
        )
        assert result.returncode == 0, result.stderr

    def test_a_candidate_that_does_not_load(self, tmp_path: Path, inputs: Path, sides):
        baseline, _ = sides
        broken = tmp_path / "broken.yaml"
        text = dump_yaml(fraud_doc()).replace("input.amount > 1000", "input.amount >")
        broken.write_text(text, encoding="utf-8")
        result = run_process(
            "replay",
            *("--candidate", str(broken), "--baseline", str(baseline), "--inputs", str(inputs)),
        )
        assert result.returncode == 1
        first = result.stderr.splitlines()[0]
        found = PROBLEM_LINE_RE.match(first)
        assert found is not None, result.stderr
        assert found["file"] == str(broken)
        lines = enumerate(text.splitlines(), 1)
        assert int(found["line"]) == next(n for n, line in lines if "input.amount >" in line)
        assert "the candidate does not load" in result.stderr
        assert result.stdout == ""

    @pytest.mark.parametrize(
        "extra",
        [
            ("--ruleset", "nope"),
            ("--fail-if-changed", "101"),
            ("--fail-if-changed", "-1"),
            ("--fail-if-changed", "nan"),
            ("--examples", "-1"),
            ("--format", "xml"),
        ],
    )
    def test_usage_errors(self, sides, inputs: Path, extra: tuple[str, ...]):
        _, candidate = sides
        result = run_process(
            "replay", "--candidate", str(candidate), "--inputs", str(inputs), *extra
        )
        assert result.returncode == 2, result.stderr
        assert result.stdout == ""

    @pytest.mark.parametrize("name", ["missing.jsonl", "empty.jsonl", "directory"])
    def test_unreadable_or_empty_inputs(self, sides, tmp_path: Path, name: str):
        _, candidate = sides
        (tmp_path / "empty.jsonl").write_text("\n\n", encoding="utf-8")
        (tmp_path / "directory").mkdir()
        result = run_process(
            "replay", "--candidate", str(candidate), "--inputs", str(tmp_path / name)
        )
        assert result.returncode == 2, result.stderr
        assert name in result.stderr

    def test_a_ruleset_missing_from_the_baseline(self, sides, tmp_path: Path, inputs: Path):
        _, candidate = sides
        other = tmp_path / "other.yaml"
        other.write_text(dump_yaml(make_ruleset_doc("other")), encoding="utf-8")
        result = run_process(
            "replay",
            *("--candidate", str(candidate), "--baseline", str(other), "--inputs", str(inputs)),
            *("--ruleset", "fraud"),
        )
        assert result.returncode == 2
        assert "no ruleset 'fraud' in the baseline (it holds: other)" in result.stderr

    def test_a_large_file_through_the_command(self, sides, tmp_path: Path):
        """More than one block: the command's worker processes answer as one process."""
        baseline, candidate = sides
        lines = [json.dumps({"input": doc}) for doc in generated_inputs(20_000)]
        inputs = write_lines(tmp_path / "big.jsonl", lines)
        assert inputs.stat().st_size > 1 << 20
        result = run_process(
            "replay",
            *("--candidate", str(candidate), "--baseline", str(baseline)),
            *("--inputs", str(inputs), "--format", "json"),
        )
        assert result.returncode == 0, result.stderr
        data = json.loads(result.stdout)
        base, cand = load_rules([str(baseline)]), load_rules([str(candidate)])
        assert data == replay(cand, base, str(inputs), block_bytes=1 << 30).to_dict()


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.slow
def test_the_example_ci_replay_step(tmp_path: Path):
    """examples/k8s/ci/rules.yaml's replay step, run as written on the example's rules
    with a baseline that scored high amounts higher: the Markdown for the comment, and the
    status its last step exits with."""
    workflow = yaml.safe_load((EXAMPLES / "k8s" / "ci" / "rules.yaml").read_text("utf-8"))
    job = workflow["jobs"]["replay"]
    assert job["needs"] == "check"
    (script,) = [
        step["run"] for step in job["steps"] if "rule-sidecar replay" in step.get("run", "")
    ]
    rules = (EXAMPLES / "k8s" / "base" / "rules" / "payment-fraud.yaml").read_text("utf-8")
    (tmp_path / "base" / "rules").mkdir(parents=True)
    (tmp_path / "base" / "rules" / "payment-fraud.yaml").write_text(rules, encoding="utf-8")
    baseline = yaml.safe_load(rules)
    (high,) = [rule for rule in baseline["spec"]["rules"] if rule["id"] == "pf.high-amount"]
    high["points"] = 60
    del baseline["spec"]["tests"]  # they pin today's weights
    (tmp_path / "baseline" / "base" / "rules").mkdir(parents=True)
    (tmp_path / "baseline" / "base" / "rules" / "payment-fraud.yaml").write_text(
        dump_yaml(baseline), encoding="utf-8"
    )
    payment = json.loads((EXAMPLES / "app" / "payment.json").read_text("utf-8"))
    lines = [
        logged_line({**payment, "amount": amount}, None, 0, ruleset_id="payment-fraud")
        for amount in (2450.0, 100.0) * 50
    ]
    (tmp_path / "sample").mkdir()
    (tmp_path / "sample" / "decisions.jsonl.gz").write_bytes(
        gzip.compress("".join(f"{line}\n" for line in lines).encode())
    )
    output = tmp_path / "github_output"
    environment = {
        "PATH": f"{Path(command()[0]).parent}:/usr/bin:/bin",
        "GITHUB_OUTPUT": str(output),
    }
    subprocess.run(["bash", "-e", "-c", script], cwd=tmp_path, env=environment, check=True)
    assert output.read_text("utf-8") == "status=1\n"  # 50% changed, more than 5%
    markdown = (tmp_path / "replay.md").read_text("utf-8")
    assert "#### rule-sidecar replay: `payment-fraud`" in markdown
    assert "**50 of 100 decisions change (50.0%) against the baseline" in markdown
    assert "| `deny` | **`review`** | 50 |" in markdown


class TestHostileInputs:
    """What the second outside attack found: a gate fed a file built to hurt."""

    def test_a_line_without_an_end_is_refused_not_held(self, sides, tmp_path: Path):
        """A gzip bomb of zeros (1 GiB in 1 MiB of gzip) has no line end: refused as a
        usage error past 8 MiB, instead of growing to 1 GB of memory for minutes."""
        baseline, candidate = sides
        bomb = tmp_path / "bomb.gz"
        with gzip.open(bomb, "wb", compresslevel=1) as out:
            for _ in range(64):
                out.write(b"\0" * (1 << 20))
        result = run_process(
            "replay", "--candidate", str(candidate), "--baseline", str(baseline),
            "--inputs", str(bomb), "--ruleset", "fraud",
        )  # fmt: skip
        assert result.returncode == 2, result.stderr
        assert "line 1 is longer than 8388608 bytes" in result.stderr

    def test_a_line_nested_past_the_parser_is_invalid_not_a_crash(self, sides, tmp_path: Path):
        baseline, candidate = sides
        deep = '{"input": {"amount": 600}, "x": ' + "[" * 3000 + "]" * 3000 + "}"
        lines = [deep, json.dumps({"input": {"amount": 5000, "country": "FR"}})]
        inputs = write_lines(tmp_path / "deep.jsonl", lines)
        code, output = run(
            "replay", "--candidate", str(candidate), "--baseline", str(baseline),
            "--inputs", str(inputs), "--format", "json",
        )  # fmt: skip
        assert code == 0, output
        data = json.loads(output)
        assert (data["inputs"], data["invalid"], data["invalid_lines"]) == (1, 1, [1])

    def test_a_fifo_is_read(self, sides, tmp_path: Path):
        baseline, candidate = sides
        fifo = tmp_path / "inputs.fifo"
        os.mkfifo(fifo)
        text = "".join(f"{line}\n" for line in CRAFTED)
        writer = threading.Thread(target=fifo.write_text, args=(text,))
        writer.start()
        result = run_process(
            "replay", "--candidate", str(candidate), "--baseline", str(baseline),
            "--inputs", str(fifo), "--format", "json", "--ruleset", "fraud",
        )  # fmt: skip
        writer.join(timeout=10)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["inputs"] > 0

    def test_the_human_form_escapes_what_a_log_says(self, sides, tmp_path: Path):
        """A logged decision or id with a newline could start a line of its own in a CI
        log (`::error ...`, a workflow command); control characters are escaped."""
        _, candidate = sides
        line = logged_line(
            {"amount": 5000, "country": "US"},
            "allow\n::error file=x::PWNED\x1b[31m",
            1,
            decision_id="id\n::add-mask::x",
        )
        inputs = write_lines(tmp_path / "log.jsonl", [line])
        code, output = run("replay", "--candidate", str(candidate), "--inputs", str(inputs))
        assert code == 0, output
        assert not any(text.startswith("::") for text in output.splitlines())
        assert "\x1b" not in output
        assert "allow\\n::error file=x::PWNED\\u001b[31m" in output

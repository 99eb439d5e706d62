"""The decision log of a real `rule-sidecar serve`: lines read back from real files, FIFOs
and standard output, masking and hashing, sampling, rotation, a writer that cannot keep
up, SIGTERM's flush and a sink that fails."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import select
import shutil
import signal
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from conftest import dump_yaml, fraud_doc, make_ruleset_doc
from server_support import (
    Served,
    clean_environment,
    command,
    free_port,
    metric_value,
    spawn,
    wait_sync,
)

# Starts processes: left out of the quick loop (-m 'not slow').
pytestmark = pytest.mark.slow

EVALUATE = "/api/v1/rulesets/fraud/evaluate"
STDOUT_LOG = ("--decision-log", "-", "--log-level", "DEBUG")
UUID7 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
FIELDS = {
    "decision_id",
    "timestamp",
    "ruleset_id",
    "registry_version",
    "revision",
    "input",
    "total_points",
    "decision",
    "matched",
    "shadow_matched",
    "errors",
    "duration_us",
}


@pytest.fixture
def rules(tmp_path: Path) -> Path:
    directory = tmp_path / "rules"
    directory.mkdir()
    (directory / "fraud.yaml").write_text(dump_yaml(fraud_doc()), encoding="utf-8")
    return directory


@contextlib.contextmanager
def logging_sidecar(tmp_path: Path, rules: Path, log: str, **env: str) -> Iterator[Served]:
    """`serve --decision-log LOG` with the decision log variables `env`, ready."""
    served = spawn(
        tmp_path,
        "--rules-dir",
        str(rules),
        "--decision-log",
        log,
        env=clean_environment(**{f"RULE_SIDECAR_DECISION_LOG_{k}": v for k, v in env.items()}),
    )
    try:
        served.wait_ready()
        yield served
    finally:
        served.stop()


def post(served: Served, body: Any) -> dict[str, Any]:
    request = urllib.request.Request(
        served.url + EVALUATE,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200
        answer: dict[str, Any] = json.loads(response.read())
        return answer


def metrics(served: Served) -> str:
    with urllib.request.urlopen(served.url + "/metrics", timeout=5) as response:
        text: str = response.read().decode()
        return text


def dropped(served: Served, reason: str) -> float:
    value = metric_value(
        metrics(served), "rule_sidecar_decision_log_dropped_total", {"reason": reason}
    )
    return value or 0.0


def written(served: Served) -> float:
    return metric_value(metrics(served), "rule_sidecar_decision_log_written_total") or 0.0


def lines_of(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text("utf-8").splitlines()]


def wait_lines(path: Path, count: int) -> list[dict[str, Any]]:
    """The log's lines once it holds `count` of them."""
    return wait_sync(
        lambda: (found := lines_of(path)) and len(found) >= count and found,
        message=f"{count} lines in {path}",
    )


class TestLines:
    def test_every_field_of_a_single_decision(self, tmp_path: Path, rules: Path):
        """One input, one line: each field present and equal to what was decided; the
        response carries the line's id."""
        log = tmp_path / "decisions.log"
        with logging_sidecar(tmp_path, rules, str(log)) as served:
            before = datetime.now(UTC)
            document = {"amount": "lots", "country": "FR", "note": {"x": [1, 2]}}
            answer = post(served, {"input": document})
            (line,) = wait_lines(log, 1)
            after = datetime.now(UTC)
            assert written(served) == 1
        assert set(line) == FIELDS  # no challenger: none runs
        assert UUID7.match(line["decision_id"])
        assert line["decision_id"] == answer["decision_id"]
        assert line["timestamp"].endswith("Z")
        moment = datetime.fromisoformat(line["timestamp"])
        assert before <= moment <= after
        assert line["ruleset_id"] == "fraud"
        assert line["registry_version"] == answer["registry_version"]
        assert line["revision"] == answer["revision"]
        assert line["input"] == document
        assert (line["total_points"], line["decision"]) == (30, "allow")
        assert line["matched"] == ["foreign-country"]
        assert line["shadow_matched"] == []
        assert line["errors"] == ["large-amount"]
        assert isinstance(line["duration_us"], float)
        assert line["duration_us"] > 0

    def test_a_batch_gives_a_line_per_input_with_the_answers_ids(self, tmp_path: Path, rules: Path):
        log = tmp_path / "decisions.log"
        inputs = [{"amount": 5000, "country": "FR"}, {"amount": 1, "country": "US"}, {}]
        with logging_sidecar(tmp_path, rules, str(log)) as served:
            answer = post(served, {"inputs": inputs})
            lines = wait_lines(log, 3)
        ids = [result["decision_id"] for result in answer["results"]]
        assert len(set(ids)) == 3
        assert [line["decision_id"] for line in lines] == ids
        assert sorted(ids) == ids  # UUIDv7 from one process: increasing
        assert [line["input"] for line in lines] == inputs
        assert [line["decision"] for line in lines] == ["deny", "allow", "allow"]
        assert lines[0]["matched"] == ["large-amount", "foreign-country"]

    def test_shadow_matches_and_the_challenger(self, tmp_path: Path, rules: Path):
        """A shadow rule's match is in `shadow_matched`; a challenger's result in
        `challenger`, as the answer has it."""
        doc = fraud_doc()
        doc["spec"]["rules"].append(
            {"id": "trial", "condition": "input.amount > 10", "points": 9, "mode": "shadow"}
        )
        (rules / "fraud.yaml").write_text(dump_yaml(doc), encoding="utf-8")
        v2 = make_ruleset_doc("fraud-v2", challenger_of="fraud", default_decision="hold")
        (rules / "v2.yaml").write_text(dump_yaml(v2), encoding="utf-8")
        log = tmp_path / "decisions.log"
        with logging_sidecar(tmp_path, rules, str(log)) as served:
            answer = post(served, {"input": {"amount": 5000, "country": "US"}})
            (line,) = wait_lines(log, 1)
        assert line["shadow_matched"] == answer["shadow_matched"] == ["trial"]
        assert line["challenger"] == answer["challenger"]
        assert line["challenger"] == {
            "ruleset_id": "fraud-v2",
            "total_points": 10,
            "decision": "hold",
            "matched": ["fraud-v2-big"],
        }

    def test_without_the_log_the_answer_has_no_id(self, tmp_path: Path, rules: Path):
        served = spawn(tmp_path, "--rules-dir", str(rules))
        try:
            served.wait_ready()
            single = post(served, {"input": {"amount": 1}})
            batch = post(served, {"inputs": [{"amount": 1}]})
            text = metrics(served)
        finally:
            served.stop()
        assert "decision_id" not in single
        assert "decision_id" not in batch["results"][0]
        assert metric_value(text, "rule_sidecar_decision_log_written_total") == 0


class TestMasking:
    def test_masked_and_hashed_fields(self, tmp_path: Path, rules: Path):
        """Removed and hashed fields, escapes and array indexes; the engine still decided
        on the whole input (country is masked, yet foreign-country matched)."""
        salt_file = tmp_path / "salt"
        salt_file.write_text("pepper-42\n", "utf-8")
        document = {
            "amount": 5000,
            "country": "FR",
            "customer": {"email": "a@example.com", "name": "Ann"},
            "card": {"bin": "411111", "last4": 1234},
            "items": [{"sku": "S1", "qty": 1}, {"sku": "S2"}],
            "a/b": 1,
            "t~": 2,
        }
        log = tmp_path / "decisions.log"
        with logging_sidecar(
            tmp_path,
            rules,
            str(log),
            MASK="/country,/customer/email,/items/1/sku,/a~1b,/t~0,/absent/field,/items/7",
            HASH="/card/bin,/card/last4,/customer/name",
            SALT_FILE=str(salt_file),
        ) as served:
            answer = post(served, {"input": document})
            (line,) = wait_lines(log, 1)
        assert answer["matched"][1]["id"] == "foreign-country"
        assert line["matched"] == ["large-amount", "foreign-country"]

        def sha(text: str) -> str:
            return hashlib.sha256(b"pepper-42" + text.encode()).hexdigest()

        assert line["input"] == {
            "amount": 5000,
            "customer": {"name": sha("Ann")},
            "card": {"bin": sha("411111"), "last4": sha("1234")},
            "items": [{"sku": "S1", "qty": 1}, {}],
        }

    def test_pointers_into_one_array_name_what_the_application_sent(
        self, tmp_path: Path, rules: Path
    ):
        """The attack: masking `/cards/0` moved `/cards/1` onto the third card, which was
        removed, and the second card's number stayed in the log; a hashed item beside
        masked ones was shifted too. Each pointer names the input as it was sent."""
        salt_file = tmp_path / "salt"
        salt_file.write_text("pepper\n", "utf-8")
        document = {
            "amount": 5,
            "country": "US",
            "cards": ["SECRET-A", "SECRET-B", "public-c"],
            "pans": ["SECRET-0", "SECRET-1", "public-2"],
            "rows": [{"x": "SECRET-X", "y": 1}, {"x": "keep"}],
        }
        log = tmp_path / "decisions.log"
        with logging_sidecar(
            tmp_path,
            rules,
            str(log),
            MASK="/cards/0,/cards/1,/pans/0,/rows/0,/rows/0/x",
            HASH="/pans/1",
            SALT_FILE=str(salt_file),
        ) as served:
            post(served, {"input": document})
            (line,) = wait_lines(log, 1)
        digest = hashlib.sha256(b"pepper" + b"SECRET-1").hexdigest()
        assert line["input"]["cards"] == ["public-c"]
        assert line["input"]["pans"] == [digest, "public-2"]
        assert line["input"]["rows"] == [{"x": "keep"}]
        assert "SECRET" not in json.dumps(line)

    @pytest.mark.parametrize(
        ("variable", "value", "error"),
        [
            ("MASK", "customer/email", "must start with '/'"),
            ("HASH", "/a~2b", "'~' must be followed by 0 or 1"),
        ],
    )
    def test_an_invalid_pointer_stops_serve_naming_the_variable(
        self, tmp_path: Path, rules: Path, variable: str, value: str, error: str
    ):
        env = clean_environment(
            **{f"RULE_SIDECAR_DECISION_LOG_{variable}": value},
            RULE_SIDECAR_DECISION_LOG_SALT_FILE=str(tmp_path),
        )
        done = subprocess.run(
            [*command(), "serve", "--rules-dir", str(rules), "--port", str(free_port())],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert done.returncode == 2
        assert f"RULE_SIDECAR_DECISION_LOG_{variable}" in done.stderr
        assert error in done.stderr

    def test_hashing_without_a_salt_file_stops_serve(self, tmp_path: Path, rules: Path):
        env = clean_environment(RULE_SIDECAR_DECISION_LOG_HASH="/card/bin")
        done = subprocess.run(
            [*command(), "serve", "--rules-dir", str(rules), "--decision-log", "-"],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert done.returncode == 2
        assert "RULE_SIDECAR_DECISION_LOG_SALT_FILE" in done.stderr


class TestSampling:
    def test_sample_zero_logs_nothing(self, tmp_path: Path, rules: Path):
        log = tmp_path / "decisions.log"
        with logging_sidecar(tmp_path, rules, str(log), SAMPLE="0") as served:
            answer = post(served, {"inputs": [{"amount": n} for n in range(500)]})
            post(served, {"input": {"amount": 1}})
            served.stop()  # SIGTERM flushes whatever was queued
        assert all(UUID7.match(result["decision_id"]) for result in answer["results"])
        assert lines_of(log) == []

    def test_sample_half_logs_about_half(self, tmp_path: Path, rules: Path):
        """2,000 inputs at 0.5: 700 to 1,300 lines (13 standard deviations either way)."""
        log = tmp_path / "decisions.log"
        with logging_sidecar(tmp_path, rules, str(log), SAMPLE="0.5") as served:
            ids: list[str] = []
            for _ in range(2):
                answer = post(served, {"inputs": [{"amount": n} for n in range(1000)]})
                ids += [result["decision_id"] for result in answer["results"]]
            served.stop()
        logged = [line["decision_id"] for line in lines_of(log)]
        assert 700 <= len(logged) <= 1300
        assert set(logged) <= set(ids)


class TestRotation:
    def test_rotated_files_never_exceed_keep(self, tmp_path: Path, rules: Path):
        """At 1 KiB a file and KEEP=2: decisions.log, .1 and .2, never .3; each file under
        the limit, each line whole, the newest lines in the newest files."""
        directory = tmp_path / "logs"
        directory.mkdir()
        log = directory / "decisions.log"
        with logging_sidecar(tmp_path, rules, str(log), MAX_BYTES="1024", KEEP="2") as served:
            for n in range(40):
                post(served, {"inputs": [{"amount": n, "k": "x" * 50}] * 3})
            served.stop()
        assert sorted(p.name for p in directory.iterdir()) == [
            "decisions.log",
            "decisions.log.1",
            "decisions.log.2",
        ]
        kept = [lines_of(directory / name) for name in ("decisions.log.2", "decisions.log.1")]
        kept.append(lines_of(log))
        for path in directory.iterdir():
            assert path.stat().st_size <= 1024
        amounts = [line["input"]["amount"] for lines in kept for line in lines]
        assert amounts == sorted(amounts)
        assert amounts[-1] == 39

    def test_a_failed_rotation_counts_what_was_written(self, tmp_path: Path, rules: Path):
        """The attack: a rotation that fails (here `.1` is a directory that cannot be
        replaced) counted the whole batch as dropped, the lines it had written before
        included. Every decision is counted once: written (and in the file) or dropped."""
        directory = tmp_path / "logs"
        (directory / "decisions.log.1").mkdir(parents=True)
        (directory / "decisions.log.1" / "in-the-way").write_text("x")
        log = directory / "decisions.log"
        with logging_sidecar(tmp_path, rules, str(log), MAX_BYTES="2048", KEEP="1") as served:
            for n in range(10):
                post(served, {"inputs": [{"amount": n, "k": "x" * 50}] * 5})
            wait_sync(
                lambda: written(served) + dropped(served, "write_error") == 50,
                message="every decision counted",
            )
            went, lost = written(served), dropped(served, "write_error")
        assert went == len(lines_of(log)) > 0
        assert lost > 0


def open_fifo(path: Path) -> int:
    """A FIFO's read end, opened without waiting for a writer (the sidecar's writer thread
    then opens it for writing without waiting for us)."""
    os.mkfifo(path)
    return os.open(path, os.O_RDONLY | os.O_NONBLOCK)


class TestBackPressure:
    def test_a_writer_that_cannot_write_drops_and_counts(self, tmp_path: Path, rules: Path):
        """A FIFO nobody reads: the pipe fills, the writer blocks in write(), the queue of
        10 fills, and further decisions are dropped and counted while every request is
        still answered (within the client's timeout; the figures are in bench/)."""
        fifo = tmp_path / "decisions.fifo"
        reader = open_fifo(fifo)
        try:
            with logging_sidecar(tmp_path, rules, str(fifo), QUEUE="10") as served:
                for _ in range(5):
                    answer = post(served, {"inputs": [{"amount": n} for n in range(1000)]})
                    assert len(answer["results"]) == 1000
                assert dropped(served, "queue_full") > 0
                assert served.get("/health/hot-reload")[1]["status"] == "healthy"
                os.close(reader)  # the blocked write fails (EPIPE): SIGTERM need not wait
                reader = -1
        finally:
            if reader >= 0:
                os.close(reader)

    def test_sigterm_flushes_what_is_queued(self, tmp_path: Path, rules: Path):
        """2,000 decisions held back by a FIFO not read yet (its 64 KiB hold about 250):
        after SIGTERM, all of them arrive, and the process exits 0."""
        fifo = tmp_path / "decisions.fifo"
        reader = open_fifo(fifo)
        received = bytearray()
        try:
            with logging_sidecar(tmp_path, rules, str(fifo)) as served:
                ids: list[str] = []
                for _ in range(2):
                    answer = post(served, {"inputs": [{"amount": n} for n in range(1000)]})
                    ids += [result["decision_id"] for result in answer["results"]]
                assert select.select([reader], [], [], 10)[0], "nothing written to the FIFO"
                served.process.send_signal(signal.SIGTERM)
                os.set_blocking(reader, True)
                drain = threading.Thread(target=lambda: _read_all(reader, received))
                drain.start()
                assert served.process.wait(30) == 0
                drain.join(10)
        finally:
            os.close(reader)
        logged = [json.loads(line)["decision_id"] for line in received.decode().splitlines()]
        assert logged == ids


def _read_all(fd: int, into: bytearray) -> None:
    while chunk := os.read(fd, 65536):
        into += chunk


class TestFailingSink:
    def test_disk_full_degrades_health_and_evaluations_go_on(self, tmp_path: Path, rules: Path):
        """/dev/full fails every write with ENOSPC, as a full disk does."""
        with logging_sidecar(tmp_path, rules, "/dev/full") as served:
            post(served, {"input": {"amount": 1}})

            def degraded() -> dict[str, Any] | None:
                post(served, {"inputs": [{"amount": 1}, {"amount": 2}]})
                health = served.get("/health/hot-reload")[1]
                return health if health["status"] == "degraded" else None

            health = wait_sync(degraded, message="health degraded")
            problem = health["watch_problems"]["decision_log"]
            assert "/dev/full" in problem
            assert "No space left on device (ENOSPC)" in problem
            assert dropped(served, "write_error") > 0
            assert written(served) == 0

    def test_a_removed_directory_degrades_until_it_is_back(self, tmp_path: Path, rules: Path):
        """The log's directory removed: the next batch notices the file is gone, cannot
        create it again (ENOENT), and health says so; once the directory is back, the
        next write succeeds and health is healthy again."""
        directory = tmp_path / "logs"
        directory.mkdir()
        log = directory / "decisions.log"
        with logging_sidecar(tmp_path, rules, str(log)) as served:
            post(served, {"input": {"amount": 1}})
            wait_lines(log, 1)
            assert served.get("/health/hot-reload")[1]["status"] == "healthy"
            shutil.rmtree(directory)

            def problem() -> str | None:
                post(served, {"input": {"amount": 2}})
                health = served.get("/health/hot-reload")[1]
                return health["watch_problems"].get("decision_log")

            message = wait_sync(problem, message="a decision log problem")
            assert f"decision log {log}: cannot write" in message
            assert "(ENOENT)" in message
            directory.mkdir()

            def healthy() -> bool:
                post(served, {"input": {"amount": 3}})
                health = served.get("/health/hot-reload")[1]
                return health["status"] == "healthy" and not health["watch_problems"]

            wait_sync(healthy, message="healthy again")
            assert dropped(served, "write_error") > 0
            lines = wait_lines(log, 1)
        # Decisions queued while the directory was gone and not yet tried are written too.
        amounts = [line["input"]["amount"] for line in lines]
        assert set(amounts) <= {2, 3}
        assert 3 in amounts


class TestStandardOutput:
    def test_decision_lines_and_log_lines_on_one_pipe_stay_whole(self, tmp_path: Path, rules: Path):
        """`-` with stdout and stderr on one pipe (2>&1), reloads logging meanwhile: every
        line is one JSON object, decisions and log lines alike, and every decision is
        there."""
        port = free_port()
        process = subprocess.Popen(
            [*command(), "serve", "--rules-dir", str(rules), "--port", str(port), *STDOUT_LOG],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=clean_environment(),
        )
        output = bytearray()
        assert process.stdout is not None
        stdout = process.stdout.fileno()
        reader = threading.Thread(target=lambda: _read_all(stdout, output))
        reader.start()
        served = Served(process=process, port=port, log=tmp_path / "unused")
        try:
            wait_sync(lambda: _ready(served), message="serve ready")
            ids: list[str] = []
            for n in range(20):
                answer = post(served, {"inputs": [{"amount": n, "pad": "y" * 200}] * 50})
                ids += [result["decision_id"] for result in answer["results"]]
                process.send_signal(signal.SIGHUP)  # a reload: log lines on stderr
        finally:
            served.stop()
            reader.join(10)
        lines = [json.loads(line) for line in output.decode().splitlines()]
        decisions = [line["decision_id"] for line in lines if "decision_id" in line]
        logs = [line for line in lines if "decision_id" not in line]
        assert decisions == ids
        assert logs
        assert all("level" in line and "message" in line for line in logs)


def _ready(served: Served) -> bool:
    assert served.process.poll() is None, "serve exited"
    try:
        return served.get("/readyz")[0] == 200
    except (OSError, ValueError, urllib.error.URLError):
        return False

"""What validates must be servable, and a problem never carries a huge value to clients.

Through the real HTTP API and real WebSocket clients (`server_support`), on real files
and a real PostgreSQL database (`db_support`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import dump_yaml, fraud_doc
from db_support import Database
from server_support import HOT, WAIT_SECONDS, Sidecar, receive_event

# Starts processes, browsers or databases: left out of the quick loop (-m 'not slow').
pytestmark = pytest.mark.slow

# Every answer and frame about one bad value stays under this, whatever its size.
SMALL = 16 * 1024
HUGE = 3_500_000  # characters: under the 4 MiB file limit, so the file is read

AT_X = "$.spec.rules[0].metadata.x"
READS = ("/api/v1/rules", "/api/v1/rulesets", "/api/v1/rulesets/fraud", f"{HOT}/changes")


def with_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    """The `fraud` ruleset with `metadata` on its first rule."""
    document = fraud_doc()
    document["spec"]["rules"][0]["metadata"] = metadata
    return document


async def assert_reads_answer(app: Sidecar) -> None:
    """Every registry read and `/changes` answers 200 with what still serves."""
    for path in READS:
        await app.get(path)
    rule = await app.get("/api/v1/rules/large-amount")
    assert rule["points"] == 40, rule


@pytest.fixture
def rules_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "rules"
    directory.mkdir()
    (directory / "fraud.yaml").write_text(dump_yaml(fraud_doc()), encoding="utf-8")
    return directory


class TestIntegersBeyond64Bits:
    """orjson answers integers from -2^63 to 2^64-1: anything beyond is refused at load
    (it used to validate, go live and make every read answer 500)."""

    @pytest.mark.parametrize(
        ("name", "text", "path"),
        [
            (
                "fraud.yaml",
                dump_yaml(with_metadata({"x": 123456789012345678901234567890})),
                "$",  # YAML problems found while reading name the line and column
            ),
            ("fraud.json", json.dumps(with_metadata({"x": 18446744073709551616})), AT_X),
            ("fraud.json", json.dumps(with_metadata({"x": -9223372036854775809})), AT_X),
            ("fraud.json", json.dumps(with_metadata({"x": 1})).replace(": 1}", ": 1e400}"), AT_X),
        ],
        ids=["yaml-30-digits", "json-2^64", "json-below--2^63", "json-1e400"],
    )
    async def test_refused_at_load_and_reads_keep_answering(
        self, start_sidecar, rules_dir: Path, name: str, text: str, path: str
    ):
        """The reload fails naming the value's path; every read answers 200 with the old
        rules (on old main the reload succeeded and the reads answered 500)."""
        app = await start_sidecar(rules_dir)
        version = app.version
        (rules_dir / "fraud.yaml").unlink()
        (rules_dir / name).write_text(text, encoding="utf-8")

        record = await app.post(f"{HOT}/reload", json={"force": True}, status=None)
        assert record["status"] == "failed", record
        [error] = record["errors"]
        assert error["path"] == path, error
        assert error["code"] == "document.not_json"
        assert error["file"] == str(rules_dir / name), error
        assert error["line"] > 1 or error["column"] > 1, error  # where the value is written
        assert app.version == version
        await assert_reads_answer(app)

    async def test_the_largest_integers_still_serve(self, start_sidecar, rules_dir: Path):
        """The bounds themselves load and are served exactly."""
        metadata = {"top": 18446744073709551615, "bottom": -9223372036854775808}
        (rules_dir / "fraud.yaml").write_text(dump_yaml(with_metadata(metadata)), encoding="utf-8")
        app = await start_sidecar(rules_dir)
        rule = await app.get("/api/v1/rules/large-amount")
        assert rule["metadata"] == metadata
        await assert_reads_answer(app)

    async def test_postgresql_printing_1e400_as_401_digits_is_refused(
        self, pg_database: Database, start_sidecar, tmp_path: Path
    ):
        """JSONB stores `1e400` as a number and prints it as 401 digits: the row is refused
        naming its rule and path, and the rules from before keep serving."""
        pg_database.init().import_docs(fraud_doc())
        empty = tmp_path / "empty"
        empty.mkdir()
        app = await start_sidecar(empty, database_url=pg_database.url)
        version = app.version
        pg_database.execute(
            "UPDATE rule_sidecar_rules SET metadata = '{\"x\": 1e400}' WHERE id = 'large-amount'"
        )

        record = await app.post(f"{HOT}/reload", json={"force": True}, status=None)
        assert record["status"] == "failed", record
        [error] = record["errors"]
        assert error["path"] == "$.spec.rules[0].metadata.x", error
        assert "beyond 64 bits" in error["message"]
        assert error["file"].endswith("#rulesets/fraud.json"), error
        assert app.version == version
        await assert_reads_answer(app)


def huge_cases() -> dict[str, str]:
    """Rule files each with one 3.5 MB value in a place a problem message quotes."""
    big = "x" * HUGE
    api_version = fraud_doc()
    api_version["apiVersion"] = big
    unknown_key = fraud_doc()
    unknown_key["metadata"][big] = 1
    expected = fraud_doc()
    expected["spec"]["tests"] = [{"name": "t", "input": {"amount": 1}, "expect": {"decision": big}}]
    return {
        "api-version": json.dumps(api_version),
        "unknown-field": json.dumps(unknown_key),
        "duplicate-key": '{"metadata": {"' + big + '": 1, "' + big + '": 2}}',
        "expected-decision": json.dumps(expected),
        "description": dump_yaml(with_metadata({})).replace("name: Large amount", f"name: {big}"),
    }


class TestHugeValuesStaySmall:
    """A 3.5 MB value in a bad file: the validate answer, the reload answer, status,
    history and the WebSocket `reload_failed` frame quote a bounded excerpt (on old main
    each was 3.5 MB for an apiVersion, an unknown field or an expected decision)."""

    @pytest.mark.parametrize("case", sorted(huge_cases()))
    async def test_answers_and_frames_are_small(self, start_sidecar, rules_dir: Path, case: str):
        app = await start_sidecar(rules_dir)
        ws = await app.client.ws_connect("/ws/hot-reload", max_msg_size=0)
        await receive_event(ws)  # the status on connect
        (rules_dir / "bad.json").write_text(huge_cases()[case], encoding="utf-8")

        response, validated = await app.call("POST", f"{HOT}/validate", status=None)
        assert validated["valid"] is False, str(validated)[:500]
        assert response.content_length is not None
        assert response.content_length < SMALL

        reloaded, record = await app.call("POST", f"{HOT}/reload", status=None)
        assert record["status"] == "failed"
        assert reloaded.content_length is not None
        assert reloaded.content_length < SMALL

        frame = await frame_of(ws, "reload_failed")
        assert len(frame) < SMALL, frame[:500]
        for path in (f"{HOT}/status", f"{HOT}/history"):
            answered, _ = await app.call("GET", path)
            assert answered.content_length is not None
            assert answered.content_length < SMALL, path
        await ws.close()


async def frame_of(ws: aiohttp.ClientWebSocketResponse, event_type: str) -> str:
    """The raw text of the next frame of `event_type`: its size is what every client pays."""
    while True:
        message = await ws.receive(timeout=WAIT_SECONDS)
        assert message.type is aiohttp.WSMsgType.TEXT, message
        if json.loads(message.data)["event_type"] == event_type:
            return str(message.data)

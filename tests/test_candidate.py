"""`POST /api/v1/rules/hot-reload/validate` with rule documents: a candidate checked as
part of the registry on a real server (and its reload worker), nothing published."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from conftest import dump_yaml, fraud_doc, make_ruleset_doc, rule_doc
from server_support import (
    HOT,
    Sidecar,
    StartSidecar,
    _app_for,
    eventually,
    free_port,
    receive_event,
)

from sidecar.api.run import _runner
from sidecar.config import DEFAULT_SETTINGS

# Starts processes, browsers or databases: left out of the quick loop (-m 'not slow').
pytestmark = pytest.mark.slow

VALIDATE = f"{HOT}/validate"
YAML = {"Content-Type": "application/yaml"}


def with_test(doc: dict[str, Any], name: str, amount: int, points: int) -> dict[str, Any]:
    """`doc` with one embedded test: `amount` must give `points`."""
    case = {"name": name, "input": {"amount": amount}, "expect": {"total_points": points}}
    return {**doc, "spec": {**doc["spec"], "tests": [*doc["spec"].get("tests", []), case]}}


@pytest.fixture
def multi_rules(tmp_path: Path) -> Path:
    """One file holding two rulesets, `fraud` then `extra`, and `other.yaml` (`other`)."""
    directory = tmp_path / "rules"
    directory.mkdir()
    text = dump_yaml([fraud_doc(), make_ruleset_doc("extra")])
    (directory / "both.yaml").write_text(text, encoding="utf-8")
    (directory / "other.yaml").write_text(dump_yaml(make_ruleset_doc("other")), encoding="utf-8")
    return directory


@pytest.fixture
async def sidecar(start_sidecar: StartSidecar, multi_rules: Path) -> Sidecar:
    return await start_sidecar(multi_rules)


async def check_yaml(sidecar: Sidecar, text: str, status: int = 200) -> Any:
    return await sidecar.post(VALIDATE, data=text.encode(), headers=YAML, status=status)


async def check_json(sidecar: Sidecar, documents: list[Any], status: int = 200) -> Any:
    return await sidecar.post(VALIDATE, json={"documents": documents}, status=status)


def codes(answer: dict[str, Any]) -> list[str]:
    return [error["code"] for error in answer["errors"]]


def alias_bomb(number: int) -> str:
    """The attack's element: a 70 KB YAML file whose 64 embedded tests alias one 64 KB
    string (4 MiB of text through aliases, what one whole rule file may hold)."""
    cases = "".join(
        f"    - {{name: t{i}, input: {{note: *big}}, expect: {{total_points: 1}}}}\n"
        for i in range(64)
    )
    return (
        "apiVersion: rule-sidecar/v1\nkind: RuleSet\n"
        f"metadata: {{id: bomb-{number}, description: &big {'x' * 64 * 1024}}}\n"
        f"spec:\n  rules: [{{id: bomb-{number}-r, condition: 'true', points: 1}}]\n"
        f"  tests:\n{cases}"
    )


def heavy_candidate(rulesets: int, rules: int = 10) -> str:
    """One valid rule file that takes seconds to check: every condition is distinct, so
    each one is compiled (about 5 ms a ruleset of 10 rules)."""
    return dump_yaml(
        [
            make_ruleset_doc(
                f"heavy-{i}",
                [
                    rule_doc(f"h{i}-{j}", f"input.amount > {i * rules + j} && input.n < {j}", 1)
                    for j in range(rules)
                ],
            )
            for i in range(rulesets)
        ]
    )


def checker_pid(sidecar: Sidecar) -> int | None:
    """The pid of the candidate checker process, once it runs."""
    checker = sidecar.service.loader._checker
    processes = getattr(checker, "_processes", None) or {}
    return next(iter(processes), None)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A killed child not yet reaped by its pool is a zombie: gone for what it computes.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0] != "Z"


class TestValid:
    async def test_a_new_ruleset_is_added_with_its_tests_run(self, sidecar: Sidecar):
        doc = with_test(make_ruleset_doc("newcomer"), "big pays", 500, 10)
        doc = with_test(doc, "small does not", 5, 0)
        answer = await check_yaml(sidecar, dump_yaml(doc))
        assert answer["valid"] is True, answer
        assert answer["errors"] == []
        assert answer["changes"] == {
            "added": ["newcomer"],
            "changed": [],
            "unchanged": [],
            "removed": [],
            "rules": {"added": ["newcomer-big"], "changed": [], "removed": []},
        }
        assert answer["tests"] == {"run": 2, "passed": 2, "failed": 0}
        assert answer["current_revision"] == sidecar.state.registry.current.revision
        assert answer["revision"] not in (None, answer["current_revision"])

    async def test_the_same_content_is_unchanged_and_keeps_the_revision(self, sidecar: Sidecar):
        answer = await check_json(sidecar, [make_ruleset_doc("other")])
        assert answer["valid"] is True, answer
        assert answer["changes"]["unchanged"] == ["other"]
        assert answer["changes"]["added"] == answer["changes"]["changed"] == []
        assert answer["revision"] == answer["current_revision"]

    async def test_documents_as_objects_and_as_text_alike(self, sidecar: Sidecar):
        documents = [
            make_ruleset_doc("as-object"),
            dump_yaml(make_ruleset_doc("as-yaml")),
            json.dumps(make_ruleset_doc("as-json")),
        ]
        answer = await check_json(sidecar, documents)
        assert answer["valid"] is True, answer
        assert answer["changes"]["added"] == ["as-json", "as-object", "as-yaml"]


class TestMultiDocumentFile:
    async def test_only_the_named_document_of_a_file_is_replaced(self, sidecar: Sidecar):
        """`extra` lives in `both.yaml` beside `fraud`: replacing it keeps `fraud`, whose
        rule ids still clash, while `extra`'s own old rule id is free for its new content."""
        rules = [
            rule_doc("extra-big", "input.amount > 500", 15),  # its own rule, changed
            rule_doc("extra-new", "input.amount > 5000", 5),
        ]
        answer = await check_yaml(sidecar, dump_yaml(make_ruleset_doc("extra", rules)))
        assert answer["valid"] is True, answer
        assert answer["changes"]["changed"] == ["extra"]
        assert answer["changes"]["rules"] == {
            "added": ["extra-new"],
            "changed": ["extra-big"],
            "removed": [],
        }
        clash = make_ruleset_doc("extra", [rule_doc("large-amount", "true", 1)])
        answer = await check_yaml(sidecar, dump_yaml(clash))
        assert codes(answer) == ["id.duplicate"]
        assert answer["errors"][0]["file"] == "request.yaml"
        assert "ruleset 'fraud'" in answer["errors"][0]["message"]
        assert "both.yaml" in answer["errors"][0]["message"]

    async def test_a_rule_dropped_from_a_replaced_ruleset_is_removed(self, sidecar: Sidecar):
        doc = fraud_doc(disabled_rule=False)
        answer = await check_yaml(sidecar, dump_yaml(doc))
        assert answer["valid"] is True, answer
        assert answer["changes"]["changed"] == ["fraud"]
        assert answer["changes"]["rules"]["removed"] == ["never-on"]
        assert answer["changes"]["removed"] == []


class TestProblemsAreLocated:
    async def test_a_yaml_syntax_error_at_its_line(self, sidecar: Sidecar):
        text = dump_yaml(make_ruleset_doc("ok")) + "---\n" + "metadata: {id: broken\nspec: []\n"
        line = text.splitlines().index("metadata: {id: broken") + 1
        answer = await check_yaml(sidecar, text)
        assert answer["valid"] is False
        [error] = answer["errors"]
        assert error["code"] == "yaml.syntax"
        assert error["file"] == "request.yaml"
        assert line <= error["line"] <= line + 1, (line, error)

    async def test_a_cel_error_at_its_line_and_column(self, sidecar: Sidecar):
        bad = make_ruleset_doc("bad", [rule_doc("bad-rule", "input.amount >", 1)])
        text = dump_yaml(bad)
        line = next(i for i, row in enumerate(text.splitlines(), 1) if "condition" in row)
        answer = await check_yaml(sidecar, text)
        [error] = answer["errors"]
        assert (error["code"], error["file"], error["line"]) == (
            "cel.compile",
            "request.yaml",
            line,
        )
        assert error["path"] == "$.spec.rules[0].condition"
        assert error["rule_id"] == "bad-rule"

    async def test_json_documents_are_located_in_their_own_text(self, sidecar: Sidecar):
        """The second document (an object written over several lines) at its line, the
        third (a string of YAML) in that text."""
        bad = make_ruleset_doc("bad", [rule_doc("bad-rule", "input.amount >", 1)])
        yaml_text = "# a comment\n" + dump_yaml(
            make_ruleset_doc("worse", [rule_doc("w", "1 +", 1)])
        )
        body = json.dumps({"documents": [make_ruleset_doc("fine"), bad, yaml_text]}, indent=2)
        answer = await sidecar.post(
            VALIDATE, data=body, headers={"Content-Type": "application/json"}
        )
        by_file = {error["file"]: error for error in answer["errors"]}
        assert set(by_file) == {"request#2.json", "request#3.yaml"}, answer
        start = body.rindex('{\n      "apiVersion"', 0, body.index('"id": "bad"'))
        element = body[start:]
        condition_line = element[: element.index('"input.amount >"')].count("\n") + 1
        assert by_file["request#2.json"]["line"] == condition_line
        assert by_file["request#2.json"]["code"] == "cel.compile"
        yaml_line = next(i for i, row in enumerate(yaml_text.splitlines(), 1) if "condition" in row)
        assert by_file["request#3.yaml"]["line"] == yaml_line

    async def test_a_failing_embedded_test_fails_it(self, sidecar: Sidecar):
        doc = with_test(make_ruleset_doc("tested"), "right", 500, 10)
        doc = with_test(doc, "wrong", 500, 99)
        text = dump_yaml(doc)
        answer = await check_yaml(sidecar, text)
        assert answer["valid"] is False
        assert answer["tests"] == {"run": 2, "passed": 1, "failed": 1}
        [error] = answer["errors"]
        assert error["code"] == "test.failed"
        assert "'wrong'" in error["message"]
        assert "expected 99, got 10" in error["message"]
        wrong = next(i for i, row in enumerate(text.splitlines(), 1) if "name: wrong" in row)
        assert (error["file"], error["line"]) == ("request.yaml", wrong)
        assert answer["changes"]["added"] == []  # it did not load

    async def test_a_rule_id_of_another_ruleset(self, sidecar: Sidecar):
        doc = make_ruleset_doc("thief", [rule_doc("other-big", "true", 1)])
        text = dump_yaml(doc)
        answer = await check_yaml(sidecar, text)
        [error] = answer["errors"]
        assert error["code"] == "id.duplicate"
        line = next(i for i, row in enumerate(text.splitlines(), 1) if "other-big" in row)
        assert (error["file"], error["line"]) == ("request.yaml", line)
        assert "ruleset 'other'" in error["message"]
        assert "other.yaml" in error["message"]

    async def test_a_ruleset_sent_twice_is_a_duplicate_listed_once(self, sidecar: Sidecar):
        doc = make_ruleset_doc("twice")
        answer = await check_json(sidecar, [doc, doc])
        assert codes(answer) == ["id.duplicate"]
        assert answer["changes"]["added"] == ["twice"]

    async def test_a_challenger_without_its_champion(self, sidecar: Sidecar):
        doc = make_ruleset_doc("pretender", challenger_of="nobody")
        answer = await check_yaml(sidecar, dump_yaml(doc))
        assert codes(answer) == ["check.challenger"]
        assert answer["errors"][0]["path"] == "$.spec.challenger_of"
        champion = await check_yaml(
            sidecar, dump_yaml(make_ruleset_doc("c", challenger_of="other"))
        )
        assert champion["valid"] is True, champion

    async def test_nothing_to_check_is_not_valid(self, sidecar: Sidecar):
        answer = await check_yaml(sidecar, "# only a comment\n---\n")
        assert codes(answer) == ["rules.empty"]


class TestBounds:
    async def test_an_oversized_body_is_413_naming_the_limit(
        self, start_sidecar: StartSidecar, multi_rules: Path
    ):
        sidecar = await start_sidecar(multi_rules, max_body_bytes=4096)
        text = dump_yaml(make_ruleset_doc("big", description="x" * 5000))
        _response, body = await sidecar.call(
            "POST", VALIDATE, data=text.encode(), headers=YAML, status=413
        )
        assert body["error"]["limit"] == "RULE_SIDECAR_MAX_BODY_BYTES"

    async def test_too_many_documents_in_json(self, sidecar: Sidecar):
        limit = sidecar.service.loader.file_limits.max_documents
        answer = await check_json(sidecar, [{}] * (limit + 1))
        assert answer["valid"] is False
        [error] = answer["errors"]
        assert (error["code"], error["file"]) == ("limit.documents", "request")
        assert str(limit) in error["message"]

    async def test_too_many_documents_in_yaml(self, sidecar: Sidecar):
        limit = sidecar.service.loader.file_limits.max_documents
        text = "---\n{}\n" * (limit + 1)
        answer = await check_yaml(sidecar, text)
        assert codes(answer) == ["limit.documents"]

    async def test_a_list_costs_what_the_same_text_as_one_file_costs(self, sidecar: Sidecar):
        """The attack: 13 strings of 70 KB, each aliasing 4 MiB of text, passed as a list
        (each within one file's limits) and took 70 s of worker time. Each element now
        has a 13th of one file's limits: each is refused, at once, with the limit hit."""
        started = time.monotonic()
        answer = await check_json(sidecar, [alias_bomb(n) for n in range(13)])
        elapsed = time.monotonic() - started
        assert answer["valid"] is False
        assert codes(answer) == ["limit.expansion"] * 13
        files = sorted(error["file"] for error in answer["errors"])
        assert files == sorted(f"request#{n}.yaml" for n in range(1, 14))
        assert elapsed < DEFAULT_SETTINGS.candidate_timeout_seconds + 10

    async def test_documents_are_counted_across_the_list(self, sidecar: Sidecar):
        """12 strings of 900 documents validated 10,800 rulesets against the documented
        1,000: each element now holds at most a 12th of them."""
        share = sidecar.service.loader.file_limits.max_documents // 12
        answer = await check_json(sidecar, ["---\n{}\n" * 900] * 12)
        assert codes(answer) == ["limit.documents"] * 12
        assert f"more than {share} documents" in answer["errors"][0]["message"]

    async def test_its_own_rate_budget(self, start_sidecar: StartSidecar, multi_rules: Path):
        sidecar = await start_sidecar(multi_rules, candidate_rate_per_minute=1)
        await check_yaml(sidecar, dump_yaml(make_ruleset_doc("one")))
        response, body = await sidecar.call(
            "POST", VALIDATE, data=dump_yaml(make_ruleset_doc("two")), headers=YAML, status=429
        )
        assert body["error"]["limit"] == "RULE_SIDECAR_CANDIDATE_RATE_PER_MINUTE"
        assert int(response.headers["Retry-After"]) >= 1
        await sidecar.post(VALIDATE)  # the sources' validation has a budget of its own

    async def test_open_like_the_validation_of_the_sources(
        self, start_sidecar: StartSidecar, multi_rules: Path, tmp_path: Path
    ):
        token = tmp_path / "token"
        token.write_text("s3cret")
        sidecar = await start_sidecar(multi_rules, admin_token_file=token)
        answer = await check_yaml(sidecar, dump_yaml(make_ruleset_doc("anyone")))
        assert answer["valid"] is True


class TestBadRequests:
    async def test_a_body_neither_yaml_nor_json_is_415(self, sidecar: Sidecar):
        _, body = await sidecar.call(
            "POST", VALIDATE, data=b"x", headers={"Content-Type": "text/plain"}, status=415
        )
        assert "application/yaml" in body["error"]["message"]

    @pytest.mark.parametrize(
        ("body", "path"),
        [
            ({"documents": "apiVersion: x"}, "$.documents"),
            ({"documents": []}, "$.documents"),
            ({"documents": [make_ruleset_doc("a"), 7]}, "$.documents[1]"),
        ],
    )
    async def test_documents_of_the_wrong_shape_are_400(
        self, sidecar: Sidecar, body: dict[str, Any], path: str
    ):
        answer = await sidecar.post(VALIDATE, json=body, status=400)
        assert answer["error"]["path"] == path

    @pytest.mark.parametrize(("value", "named"), [(None, "null"), (True, "a boolean")])
    async def test_a_document_of_another_json_type_is_named_as_json_names_it(
        self, sidecar: Sidecar, value: Any, named: str
    ):
        answer = await sidecar.post(VALIDATE, json={"documents": [value]}, status=400)
        assert answer["error"]["message"].endswith(f"not {named}")

    async def test_json_that_does_not_parse_is_400(self, sidecar: Sidecar):
        await sidecar.post(
            VALIDATE,
            data=b'{"documents": [',
            headers={"Content-Type": "application/json"},
            status=400,
        )


class TestNothingChanges:
    async def test_nothing_is_published_recorded_or_sent(self, sidecar: Sidecar):
        registry = sidecar.state.registry
        before = (
            registry.version,
            registry.current.revision,
            len(sidecar.service.log.newest(None)),
        )
        async with sidecar.client.ws_connect("/ws/hot-reload") as ws:
            await receive_event(ws)  # the status on connect
            changed = make_ruleset_doc("extra", [rule_doc("extra-big", "true", 1)])
            answer = await check_json(sidecar, [changed, make_ruleset_doc("brand-new")])
            assert answer["valid"] is True, answer
            with pytest.raises(TimeoutError):
                await receive_event(ws, timeout=0.5)
        after = (registry.version, registry.current.revision, len(sidecar.service.log.newest(None)))
        assert after == before
        assert "brand-new" not in registry.current.rulesets

    async def test_the_next_reload_reparses_nothing(self, sidecar: Sidecar):
        """The loader's per-file cache never saw the candidate: a reload of unchanged
        sources afterwards parses no file and changes nothing."""
        await check_yaml(sidecar, dump_yaml(make_ruleset_doc("extra", [rule_doc("e", "true", 1)])))
        record = await sidecar.post(f"{HOT}/reload")
        assert (record["status"], record["files_parsed"]) == ("unchanged", 0)
        assert sidecar.state.registry.current.rulesets["extra"].rules[0].id == "extra-big"

    async def test_the_sources_validation_keeps_its_shape(self, sidecar: Sidecar):
        for kwargs in ({}, {"json": {}}):
            answer = await sidecar.post(VALIDATE, **kwargs)
            assert set(answer) == {
                "valid",
                "total_rules",
                "total_rulesets",
                "invalid_rules",
                "errors",
                "revision",
                "current_revision",
            }
            assert answer["valid"] is True
            assert answer["total_rulesets"] == 3


class TestBesideReloads:
    async def test_a_check_does_not_wait_for_the_reload_lock(self, sidecar: Sidecar):
        async with sidecar.service._lock:  # a reload that takes as long as it likes
            answer = await asyncio.wait_for(
                check_yaml(sidecar, dump_yaml(make_ruleset_doc("meanwhile"))), timeout=10
            )
        assert answer["valid"] is True

    async def test_a_check_during_a_reload_sees_one_registry_or_the_other(self, sidecar: Sidecar):
        """A reload that adds `late` races candidate checks of a ruleset reusing its rule
        id: each check judges against the registry before the reload (valid) or after it
        (the clash), never something between, and the reload publishes only `late`."""
        before = sidecar.state.registry.current.revision
        (sidecar.rules / "late.yaml").write_text(dump_yaml(make_ruleset_doc("late")))
        probe = dump_yaml(make_ruleset_doc("probe", [rule_doc("late-big", "true", 1)]))
        reload = asyncio.create_task(sidecar.post(f"{HOT}/reload"))
        answers = [await check_yaml(sidecar, probe) for _ in range(3)]
        record = await reload
        assert record["status"] == "success"
        after = sidecar.state.registry.current
        assert set(after.rulesets) == {"fraud", "extra", "other", "late"}
        for answer in answers:
            assert answer["current_revision"] in (before, after.revision)
            assert codes(answer) in ([], ["id.duplicate"])
        answer = await check_yaml(sidecar, probe)
        assert codes(answer) == ["id.duplicate"]  # the reload's files are the base now


class TestBoundedInTime:
    """A check runs in a checker process of its own, within
    RULE_SIDECAR_CANDIDATE_TIMEOUT_SECONDS, killed when it runs out of time or its
    client leaves."""

    async def test_past_its_budget_it_is_503_and_the_process_replaced(
        self, start_sidecar: StartSidecar, multi_rules: Path
    ):
        budget = 1.0
        sidecar = await start_sidecar(
            multi_rules, candidate_timeout_seconds=budget, max_body_bytes=8 * 1024 * 1024
        )
        started = time.monotonic()
        response, body = await sidecar.call(
            "POST", VALIDATE, data=heavy_candidate(1000).encode(), headers=YAML, status=503
        )
        assert time.monotonic() - started < budget + 10
        assert body["error"]["limit"] == "RULE_SIDECAR_CANDIDATE_TIMEOUT_SECONDS"
        assert "ran out of time" in body["error"]["message"]
        assert int(response.headers["Retry-After"]) >= 1
        assert checker_pid(sidecar) is None  # killed, not left computing
        sidecar.state.limits = dataclasses.replace(
            sidecar.state.limits, candidate_timeout_seconds=60
        )
        answer = await check_yaml(sidecar, dump_yaml(make_ruleset_doc("after")))
        assert answer["valid"] is True  # a new process took over
        assert checker_pid(sidecar) is not None

    async def test_the_wait_for_the_check_before_counts_in_the_budget(
        self, start_sidecar: StartSidecar, multi_rules: Path
    ):
        """Checks queued behind one that holds the checker do not pile up: each waits at
        most its budget, then is answered 503, and leaves nothing held."""
        budget = 1.0
        sidecar = await start_sidecar(multi_rules, candidate_timeout_seconds=budget)
        small = dump_yaml(make_ruleset_doc("small")).encode()
        async with sidecar.service._candidates:  # a check that never ends
            started = time.monotonic()
            answers = await asyncio.gather(
                *(
                    sidecar.call("POST", VALIDATE, data=small, headers=YAML, status=503)
                    for _ in range(3)
                )
            )
            assert time.monotonic() - started < budget + 10
        for _response, body in answers:
            assert body["error"]["limit"] == "RULE_SIDECAR_CANDIDATE_TIMEOUT_SECONDS"
        answer = await check_yaml(sidecar, small.decode())
        assert answer["valid"] is True

    async def test_a_reload_is_published_while_a_check_runs(
        self, start_sidecar: StartSidecar, multi_rules: Path
    ):
        """Checks used to run in the reload worker: a file change went live 74 s late,
        behind one. The reload (in the reload worker here, whatever its size) now
        publishes while a check still runs."""

        def every_load_in_the_worker(state: Any) -> None:
            state.service.loader.offload_bytes = 0

        sidecar = await start_sidecar(
            multi_rules,
            candidate_timeout_seconds=120,
            max_body_bytes=8 * 1024 * 1024,
            prepare=every_load_in_the_worker,
        )
        check = asyncio.create_task(check_yaml(sidecar, heavy_candidate(1000, 20)))
        await eventually(lambda: checker_pid(sidecar), timeout=30, message="the check runs")
        (sidecar.rules / "late.yaml").write_text(dump_yaml(make_ruleset_doc("late")))
        record = await sidecar.post(f"{HOT}/reload")
        assert record["status"] == "success"
        assert "late" in sidecar.state.registry.current.rulesets
        assert not check.done()  # published before the check ended
        check.cancel()  # its client leaves: the check is killed (see the next test)
        with contextlib.suppress(asyncio.CancelledError):
            await check

    async def test_a_client_that_leaves_frees_the_checker(
        self, start_sidecar: StartSidecar, multi_rules: Path
    ):
        """`curl -m 1` three times made the next check wait 214 s. Served as `serve`
        serves (aiohttp does not cancel the handler of a client that left, unlike its
        test server), the check of a client that leaves is killed, and the next one
        starts at once."""
        sidecar = await start_sidecar(
            multi_rules, candidate_timeout_seconds=120, max_body_bytes=8 * 1024 * 1024
        )
        heavy = heavy_candidate(1000, 20).encode()
        async with served_as_in_production(sidecar) as url, aiohttp.ClientSession() as session:

            async def post(body: bytes) -> Any:
                async with session.post(url + VALIDATE, data=body, headers=YAML) as response:
                    return await response.json()

            check = asyncio.create_task(post(heavy))
            pid = await eventually(lambda: checker_pid(sidecar), timeout=30, message="it runs")
            await asyncio.sleep(0.5)  # well into its compiling
            check.cancel()  # the connection closes, as `curl -m 1` closes it
            with contextlib.suppress(asyncio.CancelledError):
                await check
            await eventually(lambda: not alive(pid), timeout=10, message="the check killed")
            started = time.monotonic()
            answer = await post(dump_yaml(make_ruleset_doc("next")).encode())
            assert answer["valid"] is True
            # At once: not behind the abandoned check (a minute of work at 20 rules a
            # ruleset), only behind a new process's start.
            assert time.monotonic() - started < 30
            assert checker_pid(sidecar) not in (None, pid)


@contextlib.asynccontextmanager
async def served_as_in_production(sidecar: Sidecar) -> AsyncIterator[str]:
    """The sidecar's state served by the runner `serve` uses, on a port of its own."""
    runner = _runner(_app_for(sidecar.state, sidecar.settings), sidecar.settings)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()

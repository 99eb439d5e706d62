"""Loading in the reload worker process gives exactly what loading in-process gives."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import dump_yaml, make_ruleset_doc

from sidecar.engine import evaluate
from sidecar.errors import LoadError
from sidecar.loader import LOAD_STAGES, WORKER_NICENESS, Loader, reload_worker
from sidecar.rulefiles import SourceFile

# Starts processes, browsers or databases: left out of the quick loop (-m 'not slow').
pytestmark = pytest.mark.slow

INPUTS = [{"amount": 5000, "country": "FR"}, {"amount": 10, "country": "US"}, {"amount": 2000}]


@pytest.fixture(scope="module")
def executor() -> Iterator[ProcessPoolExecutor]:
    """One real worker process, as `rule-sidecar serve` runs it."""
    pool = reload_worker()
    yield pool
    pool.shutdown()


class CountingExecutor(ThreadPoolExecutor):
    """A real (thread) executor that counts what it is given."""

    def __init__(self) -> None:
        super().__init__(max_workers=1)
        self.submitted = 0

    def submit(self, fn, /, *args, **kwargs):  # type: ignore[no-untyped-def,override]
        self.submitted += 1
        return super().submit(fn, *args, **kwargs)


def dead_pool() -> ProcessPoolExecutor:
    """An executor that refuses work, as a crashed or shut-down worker pool does."""
    pool = ProcessPoolExecutor(max_workers=1)
    pool.shutdown()
    return pool


def files(points: int = 40, count: int = 3) -> list[SourceFile]:
    """`count` rule files, each a ruleset of 60 rules with tests."""
    result = []
    for index in range(count):
        rules = [
            {
                "id": f"r{index}-{n}",
                "condition": f"has(input.amount) && input.amount > {n * 50}",
                "points": points if n % 2 else -1,
                "metadata": {"owner": "risk", "tags": ["a", {"b": n}]},
            }
            for n in range(60)
        ]
        rules.append({"id": f"r{index}-country", "condition": "input.country != 'US'", "points": 5})
        document = make_ruleset_doc(f"set-{index}", rules=rules)
        document["spec"]["tests"] = [
            {"name": "us", "input": {"amount": 0, "country": "US"}, "expect": {"total_points": 0}}
        ]
        result.append(SourceFile(f"set-{index}.yaml", dump_yaml(document).encode()))
    return result


class TestWorkerLoads:
    """The worker process builds the same snapshot as the serving process would."""

    def test_same_snapshot_and_results_as_in_process(self, executor):
        """Same revision, same rules, same evaluations; the worker really did the parsing."""
        here = Loader().load(files())
        there = Loader(executor=executor, offload_bytes=0).load(files())
        assert there.snapshot.revision == here.snapshot.revision
        assert there.files_parsed == 3
        for ruleset_id, ruleset in here.snapshot.rulesets.items():
            copy = there.snapshot.rulesets[ruleset_id]
            assert copy == ruleset  # every field but the plan and the locations ...
            assert copy.to_dict() == ruleset.to_dict()  # ... which this shows
            assert [rule.location for rule in copy.rules] == [r.location for r in ruleset.rules]
            assert copy.tests == ruleset.tests
            assert copy.digest == replace(copy, name=copy.name).digest  # the worker's, right
        for ruleset_id in here.snapshot.rulesets:
            for document in INPUTS:
                expected = evaluate(here.snapshot, ruleset_id, document).to_dict()
                assert evaluate(there.snapshot, ruleset_id, document).to_dict() == expected

    def test_problems_come_back_located(self, executor):
        """A broken file loaded in the worker gives the same located problems."""
        broken = [
            *files(count=1),
            SourceFile("bad.yaml", b"apiVersion: rule-sidecar/v1\nkind: [\n"),
        ]
        with pytest.raises(LoadError) as here:
            Loader().load(broken)
        with pytest.raises(LoadError) as there:
            Loader(executor=executor, offload_bytes=0).load(broken)
        assert there.value.problems == here.value.problems

    def test_unchanged_files_are_reused_after_a_worker_load(self, executor):
        """The second load of the same files parses nothing and keeps the same objects."""
        loader = Loader(executor=executor, offload_bytes=0)
        first = loader.load(files())
        second = loader.load(files())
        assert second.files_parsed == 0
        assert all(
            second.snapshot.rulesets[key] is ruleset
            for key, ruleset in first.snapshot.rulesets.items()
        )

    def test_the_workers_stage_timings_come_back(self, executor):
        """Every stage is timed, the worker's ones included (only it checked the schema),
        and together they are within the load's wall time."""
        loader = Loader(executor=executor, offload_bytes=0)
        started = time.perf_counter()
        result = loader.load(files())
        wall = time.perf_counter() - started
        assert result.files_parsed == 3
        assert list(result.timings) == list(LOAD_STAGES)
        assert all(seconds > 0 for seconds in result.timings.values()), result.timings
        assert sum(result.timings.values()) <= wall

    def test_small_changes_stay_in_process(self):
        """Under the offload threshold nothing is given to the executor; at the threshold
        everything is. (A broken pool cannot tell: the fallback would hide its use.)"""
        small = files(count=1)
        size = len(small[0].content)
        below = CountingExecutor()
        loaded = Loader(executor=below, offload_bytes=size + 1).load(small)
        assert (below.submitted, loaded.files_parsed) == (0, 1)
        at = CountingExecutor()
        loaded = Loader(executor=at, offload_bytes=size).load(files(count=1))
        assert (at.submitted, loaded.files_parsed) == (1, 1)
        below.shutdown()
        at.shutdown()

    def test_a_dead_pool_falls_back_to_in_process(self):
        """If the worker cannot be used, the load still happens, in-process."""
        pool = ProcessPoolExecutor(
            max_workers=1, mp_context=multiprocessing.get_context("forkserver")
        )
        pool.shutdown()
        loaded = Loader(executor=pool, offload_bytes=0).load(files(count=2))
        assert len(loaded.snapshot.rulesets) == 2


def _forkserver_pool() -> ProcessPoolExecutor:
    return reload_worker()


def test_a_workers_rulesets_are_taken_in_within_receiving(executor: ProcessPoolExecutor) -> None:
    """The serving process takes a worker's rulesets in within `receiving` (`serve`
    keeps the garbage collector out of it there), and only then."""
    entered: list[int] = []

    @contextlib.contextmanager
    def receiving() -> Iterator[None]:
        entered.append(len(entered))
        yield

    Loader(offload_bytes=10**9, executor=executor, receiving=receiving).load(files(count=1))
    assert entered == []
    loaded = Loader(offload_bytes=0, executor=executor, receiving=receiving).load(files(count=2))
    assert entered == [0]
    assert len(loaded.snapshot.rulesets) == 2


def test_the_worker_yields_the_cpu_once_the_sidecar_serves() -> None:
    """A sidecar limited to one CPU shares it between serving and the worker: once a
    load succeeded, the worker runs at a lower priority, so requests do not queue behind
    a reload; the first load, which only readiness waits for, runs at full priority."""
    pool = reload_worker()
    try:
        base = os.nice(0)
        loader = Loader(executor=pool, offload_bytes=0)
        loader.load(files(count=1))
        assert pool.submit(os.nice, 0).result() == base
        loader.load(files(points=7, count=1))
        assert pool.submit(os.nice, 0).result() == min(19, base + WORKER_NICENESS)
    finally:
        pool.shutdown()


_ORPHAN_CHILD = """
import os, sys
from sidecar.loader import reload_worker

if __name__ == "__main__":
    pool = reload_worker()
    print(pool.submit(os.getpid).result(), flush=True)
    sys.stdin.read()
"""


def test_the_worker_ends_with_a_killed_sidecar(tmp_path: Path) -> None:
    """SIGKILL (the OOM killer) stops nothing: the worker notices its sidecar is gone
    and exits, and with it the forkserver, instead of living on, orphaned."""
    script = tmp_path / "serving.py"
    script.write_text(_ORPHAN_CHILD)
    serving = subprocess.Popen(
        [sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert serving.stdout is not None
    worker = int(serving.stdout.readline())
    serving.kill()
    serving.wait()
    deadline = time.monotonic() + 30
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(worker)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_worker_that_cannot_start_leaves_loads_in_process(monkeypatch: pytest.MonkeyPatch):
    """No writable /tmp (the forkserver's socket) or a process limit: the sidecar still
    starts, and large loads run in-process, each one, not fail."""

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise OSError("No usable temporary directory found")

    monkeypatch.setattr(ProcessPoolExecutor, "submit", refuse)
    pool = reload_worker()
    loader = Loader(executor=pool, new_executor=reload_worker, offload_bytes=0)
    first = loader.load(files(count=2))
    assert len(first.snapshot.rulesets) == 2
    second = loader.load(files(points=3, count=2))
    assert second.snapshot.revision != first.snapshot.revision


class TestWorkerDeath:
    def test_a_killed_worker_is_replaced(self):
        """The worker process killed (an OOM kill): that load runs in-process, a new worker
        is started, and the next large load runs there again, not in-process for good."""
        pool = _forkserver_pool()
        pool.submit(int).result()  # the worker process is running
        made: list[ProcessPoolExecutor] = []

        def new_pool() -> ProcessPoolExecutor:
            made.append(_forkserver_pool())
            return made[-1]

        loader = Loader(executor=pool, new_executor=new_pool, offload_bytes=0)
        try:
            for process in list(pool._processes.values()):
                os.kill(process.pid, signal.SIGKILL)
                process.join()
            first = loader.load(files(count=2))
            assert len(first.snapshot.rulesets) == 2
            assert (len(made), loader.executor) == (1, made[0])

            second = loader.load(files(points=41, count=2))
            assert len(second.snapshot.rulesets) == 2
            assert loader.executor is made[0]
            assert list(made[0]._processes)
        finally:
            for executor in [pool, *made]:
                executor.shutdown(cancel_futures=True)


class TestClose:
    def test_close_stops_the_worker_even_mid_file(self):
        """Shutdown asks the loader, which owns the worker: its process is stopped at
        once, not after the file it is on (a large file took seconds: SIGTERM waited)."""
        pool = _forkserver_pool()
        pool.submit(int).result()
        (process,) = pool._processes.values()
        busy = pool.submit(time.sleep, 60)  # the worker is on a long job
        loader = Loader(executor=pool, new_executor=_forkserver_pool, offload_bytes=0)
        started = time.monotonic()

        loader.close()

        process.join(timeout=10)
        assert not process.is_alive()
        assert time.monotonic() - started < 10
        assert busy.done()
        assert (loader.executor, loader.new_executor) == (None, None)

    def test_a_load_after_close_is_refused_not_run_in_process(self):
        """A reload still running at shutdown ends with a failure saying why, instead of
        loading every file in-process while the process waits to exit."""
        loader = Loader(executor=_forkserver_pool(), offload_bytes=0)
        loader.close()
        with pytest.raises(LoadError, match="shutting down"):
            loader.load(files(count=2))


class NeverAnswers(Executor):
    """A worker pool whose answers never come, as when `close` stopped the worker while it
    wrote one: the pool's own thread then waits on the half-written answer for good."""

    def submit(self, fn, /, *args, **kwargs):  # type: ignore[no-untyped-def,override]
        return Future()


def test_a_load_waiting_on_the_worker_ends_when_the_loader_closes():
    """The attack: SIGTERM during a large reload, and the process never exited (the load's
    thread waited on such a future, and the loop's executor joined that thread)."""
    loader = Loader(executor=NeverAnswers(), offload_bytes=0)
    outcome: list[BaseException] = []

    def load() -> None:
        try:
            loader.load(files(count=2))
        except BaseException as exc:
            outcome.append(exc)

    loading = threading.Thread(target=load)
    loading.start()
    loading.join(0.5)
    assert loading.is_alive()  # waiting on the worker
    loader.close()
    loading.join(10)
    assert not loading.is_alive()
    assert isinstance(outcome[0], LoadError)
    assert "shutting down" in str(outcome[0])

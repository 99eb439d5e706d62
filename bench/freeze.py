"""How long the heap freezer holds the event loop after a reload, at 10,000 rules.

`serve` calls `sidecar.api.run.HeapFreezer` after every good reload, on the event loop:
whatever it costs, every request waiting then waits that long too. It collects only what
is not frozen yet, and the whole heap only when what it froze has grown by half (or every
10 minutes); the full collection it did every 5 s before is timed as a reference.

This loads 10,000 generated rules (100 files), then reloads 60 times, each time with one
file changed and every fifth time with a broken file first (a failed reload leaves a
traceback's cycles behind), and times each call of the freezer after a good reload. Also
printed: the frozen object count at the end against the start (garbage kept frozen would
make it grow).

    python -m bench.freeze            # 60 reloads
    python -m bench.freeze --quick    # 15 reloads
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

from bench._common import environment, quantile
from bench._gen import generate_file, generate_files
from sidecar.api.run import HeapFreezer
from sidecar.errors import LoadError
from sidecar.loader import Loader
from sidecar.registry import RuleRegistry
from sidecar.reloads import Outcome, ReloadLog, ReloadRecord, ReloadStatus, Trigger
from sidecar.rulefiles import SourceFile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="15 reloads instead of 60")
    reloads = 15 if parser.parse_args().quick else 60
    print(environment())
    files = generate_files(10_000)
    loader, registry, log = Loader(), RuleRegistry(), ReloadLog()
    freezer = HeapFreezer()
    pauses: list[float] = []

    def timed_freeze(record: ReloadRecord) -> None:
        started = time.perf_counter()
        freezer(record)
        if record.status in good:
            pauses.append(time.perf_counter() - started)

    log.add_listener(timed_freeze)
    good = (ReloadStatus.SUCCESS,)

    def reload(current: list[SourceFile]) -> None:
        before = registry.current
        try:
            result = loader.load(current)
        except LoadError as exc:
            outcome = Outcome(
                triggers=frozenset({Trigger.WATCH}),
                status=ReloadStatus.FAILED,
                before=before,
                after=before,
                errors=exc.problems,
            )
        else:
            after, events = registry.publish(result.snapshot)
            outcome = Outcome(
                triggers=frozenset({Trigger.WATCH}),
                status=ReloadStatus.SUCCESS,
                before=before,
                after=after,
                changes=events,
            )
        log.record(outcome, elapsed_ms=0.0)

    reload(files)
    pauses.clear()
    start_count = gc.get_freeze_count()
    for serial in range(1, reloads + 1):
        index = serial % len(files)
        if serial % 5 == 0:
            broken = SourceFile(files[index].name, files[index].content + b"\n  - {{ broken")
            reload([*files[:index], broken, *files[index + 1 :]])
        files[index] = generate_file(index, revision=serial)
        reload(files)
    ms = [pause * 1e3 for pause in pauses]
    print(
        f"freezer pause per good reload at 10,000 rules ({len(ms)} reloads): median "
        f"{statistics.median(ms):.2f} ms, p90 {quantile(ms, 0.9):.2f}, max {max(ms):.2f}"
    )
    full = []
    for _ in range(5):
        started = time.perf_counter()
        gc.unfreeze()
        gc.collect()
        gc.freeze()
        full.append((time.perf_counter() - started) * 1e3)
    print(
        f"reference, one full collection (unfreeze, collect, freeze), as the freezer did "
        f"every 5 s before: median {statistics.median(full):.2f} ms"
    )
    print(
        f"frozen objects: {start_count} after the first load, {gc.get_freeze_count()} "
        f"after {reloads} reloads ({reloads // 5} of them after a failed one)"
    )


if __name__ == "__main__":
    main()

"""The decision log: one JSON line per evaluated input, written off the request path.

Opt-in (`--decision-log PATH`, `-` for standard output). A request only makes the
decision's id and puts a small tuple on a bounded queue (no JSON, no masking, no I/O);
a writer thread takes the queue in batches, masks and hashes the input, encodes the lines
and writes them with one `write` per batch. The writer never holds up a request: when the
queue is full the decision is dropped and counted (`..._dropped_total{reason="queue_full"}`).

When the sink fails (disk full, EACCES, its directory removed), the batch is dropped and
counted (`reason="write_error"`), health turns `degraded` naming the decision log and the
OS error, and the next batch tries again (reopening the file); the problem clears with
the first write that succeeds. A write that failed part-way leaves a partial line; the
next write begins with a line end, so every later line parses. Evaluations never see any
of this. SIGTERM flushes what is queued (`close`), for at most `_FLUSH_SECONDS`.

A file is rotated by size like Python's `RotatingFileHandler`: `decisions.log` becomes
`decisions.log.1`, `.1` becomes `.2` ... up to `.KEEP`, and the oldest goes; a line is
never split across two files. A file moved or deleted by someone else (logrotate, a
removed directory) is noticed at the next batch and written anew at the path. Only
regular files are rotated: a FIFO or a device is written as it is.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import hashlib
import itertools
import json
import logging
import os
import random
import stat
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final, overload

from prometheus_client import Counter

from sidecar.config import Settings
from sidecar.engine import Evaluation
from sidecar.jsoncodec import dumpb
from sidecar.pointers import Pointer, edited, parse_pointer, removal_order
from sidecar.service import Health, HealthStatus

__all__ = [
    "DECISION_LOG_PROBLEM",
    "BatchRecorder",
    "DecisionIds",
    "DecisionLog",
    "hashed",
    "with_problem",
]

logger = logging.getLogger("sidecar.decisionlog")

DECISION_LOG_PROBLEM: Final = "decision_log"
"""The key of the decision log's problem among health's `watch_problems`."""

_BATCH: Final = 1024  # records encoded and written per write
_IDLE_SECONDS: Final = 0.05  # how often an idle writer looks at the queue
_FLUSH_SECONDS: Final = 5.0  # SIGTERM's flush, inside Kubernetes' 30 s grace period
_PIPE_BUF: Final = 4096  # a pipe write up to this size is never interleaved with another
_MASK_62: Final = (1 << 62) - 1
_VARIANT: Final = 0b10 << 62

# One queued decision: (id, time.time(), the result, the input as given, seconds taken).
_Record = tuple[str, float, Evaluation, Any, float]


class DecisionIds:
    """Decision ids: UUIDv7 (RFC 9562), so that they sort by time.

    48 bits of Unix milliseconds, the version, 12 random bits fixed per process
    (`rand_a`), the variant, then a 62-bit counter that never resets, from a random start
    (`rand_b`). Ids from one process strictly increase (the clock is not let go back);
    those of two processes sort by millisecond. The text up to the counter is made once
    a millisecond: about 0.5 us an id, on the request path.
    """

    def __init__(self) -> None:
        entropy = random.SystemRandom()
        self._node = entropy.getrandbits(12)
        self._count = itertools.count(entropy.getrandbits(60))
        self._ms = -1
        self._prefix = ""

    def __call__(self) -> str:
        ms = time.time_ns() // 1_000_000
        if ms > self._ms:
            self._ms = ms
            h = f"{ms:012x}"
            self._prefix = f"{h[:8]}-{h[8:]}-7{self._node:03x}-"
        tail = f"{_VARIANT | (next(self._count) & _MASK_62):016x}"
        return f"{self._prefix}{tail[:4]}-{tail[4:]}"


class _Timestamps:
    """RFC 3339 UTC with microseconds; the date and time are formatted once a second."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(self, moment: float) -> str:
        second = int(moment)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._prefix}.{int((moment - second) * 1e6):06d}Z"


def hashed(salt: bytes, value: Any) -> str:
    """The salted SHA-256 of a value, hex: sha256(salt + text), where text is a string's
    UTF-8 bytes, and any other value's compact JSON with sorted keys."""
    if isinstance(value, str):
        text = value
    else:
        text = json.dumps(value, separators=(",", ":"), sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(salt + text.encode("utf-8", "surrogatepass")).hexdigest()


class _Sink:
    """Where the lines go. `write` raises OSError, with `.lines` the lines of the call
    written whole before it (a failure may come after some: a rotation, a full disk); the
    caller counts and reports it."""

    name = ""

    def write(self, lines: list[bytes]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Nothing to close by default."""


def _whole_lines(chunk: list[bytes], written: int) -> int:
    """How many lines of `chunk` (maybe led by the end of a torn one) ended within the
    first `written` bytes of it."""
    whole, end = 0, 0
    for part in chunk:
        end += len(part)
        if end > written:
            break
        whole += part != b"\n"
    return whole


def _sending(sent: int, exc: OSError, chunk: list[bytes]) -> OSError:
    """`exc` saying how many lines went: `sent` before `chunk`, and those of it."""
    exc.lines = sent + _whole_lines(chunk, getattr(exc, "written", 0))  # type: ignore[attr-defined]
    return exc


def _write_all(fd: int, data: bytes) -> int:
    """Write everything; OSError after a part went, with the bytes written as `.written`."""
    done = 0
    view = memoryview(data)
    while done < len(data):
        try:
            done += os.write(fd, view[done:])
        except OSError as exc:
            exc.written = done  # type: ignore[attr-defined]
            raise
    return done


class _StreamSink(_Sink):
    """Standard output. Each write is at most `_PIPE_BUF` bytes and ends at a line end, so
    that a log line the sidecar writes to stderr cannot land inside a decision line even
    when both streams go to one pipe (writes up to PIPE_BUF are atomic)."""

    name = "standard output"

    def __init__(self, fd: int = 1) -> None:
        self.fd = fd
        self._torn = False

    def write(self, lines: list[bytes]) -> None:
        chunk: list[bytes] = [b"\n"] if self._torn else []
        size, sent = len(chunk), 0
        try:
            for line in lines:
                if chunk and size + len(line) > _PIPE_BUF:
                    self._send(b"".join(chunk))
                    sent += _whole_lines(chunk, size)
                    chunk, size = [], 0
                chunk.append(line)
                size += len(line)
            if chunk:
                self._send(b"".join(chunk))
        except OSError as exc:
            raise _sending(sent, exc, chunk) from None

    def _send(self, data: bytes) -> None:
        try:
            _write_all(self.fd, data)
        except OSError as exc:
            self._torn = getattr(exc, "written", 0) > 0
            raise
        self._torn = False


class _FileSink(_Sink):
    """A file, appended to and rotated by size (regular files only)."""

    def __init__(self, path: Path, max_bytes: int, keep: int) -> None:
        self.path = path
        self.name = str(path)
        self.max_bytes = max_bytes
        self.keep = keep
        self._fd: int | None = None
        self._size = 0
        self._regular = False
        self._identity = (0, 0)
        self._torn = False

    def _open(self) -> int:
        # A FIFO is opened by the writer thread, where waiting for a reader harms nothing.
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        found = os.fstat(fd)
        self._fd = fd
        self._size = found.st_size
        self._regular = stat.S_ISREG(found.st_mode)
        self._identity = (found.st_dev, found.st_ino)
        return fd

    def _current(self) -> int:
        """The open file, reopened when the path no longer names it (moved or deleted:
        its directory removed, logrotate without copytruncate)."""
        if self._fd is not None and self._regular:
            try:
                found = os.stat(self.path)
                moved = (found.st_dev, found.st_ino) != self._identity
            except FileNotFoundError:
                moved = True
            if moved:
                self.close()
        return self._fd if self._fd is not None else self._open()

    def write(self, lines: list[bytes]) -> None:
        chunk: list[bytes] = [b"\n"] if self._torn else []
        size, sent = len(chunk), 0
        try:
            fd = self._current()
            for line in lines:
                full = self._size + size + len(line) > self.max_bytes
                if full and self._regular and self._size + size > 0:
                    self._send(fd, chunk)
                    sent += _whole_lines(chunk, size)
                    chunk, size = [], 0
                    fd = self._rotate()
                chunk.append(line)
                size += len(line)
            self._send(fd, chunk)
        except OSError as exc:
            raise _sending(sent, exc, chunk) from None

    def _send(self, fd: int, chunk: list[bytes]) -> None:
        if not chunk:
            return
        try:
            self._size += _write_all(fd, b"".join(chunk))
        except OSError as exc:
            written = getattr(exc, "written", 0)
            self._size += written
            self._torn = written > 0
            self.close()  # reopened by the next batch: the failure may be the file's
            raise
        self._torn = False

    def _rotate(self) -> int:
        self.close()
        for number in range(self.keep - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{number}")
            if older.exists():
                os.replace(older, older.with_name(f"{self.path.name}.{number + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        return self._open()

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


class DecisionLog:
    """The queue, the writer thread and the sink. `prepare`/`submit` (or `record`) run on
    the event loop; everything else in the writer thread."""

    def __init__(
        self,
        target: str,
        *,
        written: Counter,
        dropped: Counter,
        mask: Sequence[str],
        hash: Sequence[str],
        salt: bytes,
        sample: float,
        max_bytes: int,
        keep: int,
        queue: int,
    ) -> None:
        """The settings' values (`from_settings`): their defaults are `Settings`'."""
        self.target = target
        self._sink: _Sink = (
            _StreamSink() if target == "-" else _FileSink(Path(target), max_bytes, keep)
        )
        self._mask: tuple[Pointer, ...] = removal_order(map(parse_pointer, mask))
        self._hash: tuple[Pointer, ...] = tuple(map(parse_pointer, hash))
        self._salt = salt
        self._sample = sample
        self._random = random.random
        self._limit = queue
        self._queue: collections.deque[_Record] = collections.deque()
        self.new_id = DecisionIds()
        self._timestamp = _Timestamps()
        self._written = written
        self._queue_full = dropped.labels(reason="queue_full")
        self._write_error = dropped.labels(reason="write_error")
        self._shutdown = dropped.labels(reason="shutdown")
        self._problem: str | None = None
        self._stopping = False
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="decision log", daemon=True)

    @classmethod
    def from_settings(cls, settings: Settings, written: Counter, dropped: Counter) -> DecisionLog:
        """The log `settings` ask for (`decision_log` set); reads the salt file."""
        assert settings.decision_log is not None
        salt = b""
        if settings.decision_log_salt_file is not None:
            salt = settings.decision_log_salt_file.read_bytes().strip()
            if not salt:
                raise ValueError(
                    f"the decision log's salt file {settings.decision_log_salt_file} is empty"
                )
        return cls(
            settings.decision_log,
            written=written,
            dropped=dropped,
            mask=settings.decision_log_mask,
            hash=settings.decision_log_hash,
            salt=salt,
            sample=settings.decision_log_sample,
            max_bytes=settings.decision_log_max_bytes,
            keep=settings.decision_log_keep,
            queue=settings.decision_log_queue,
        )

    # The request path: cheap, never waits.

    def prepare(
        self, evaluation: Evaluation, document: Any, seconds: float
    ) -> tuple[str, _Record | None]:
        """The decision's id, and its record unless sampling leaves it out."""
        decision_id = self.new_id()
        if self._sample < 1.0 and self._random() >= self._sample:
            return decision_id, None
        return decision_id, (decision_id, time.time(), evaluation, document, seconds)

    def submit(self, records: Sequence[_Record | None]) -> None:
        """Queue records for the writer; those that find the queue full are dropped."""
        queue = self._queue
        for record in records:
            if record is None:
                continue
            if len(queue) >= self._limit:
                self._queue_full.inc()
            else:
                queue.append(record)

    def record(self, evaluation: Evaluation, document: Any, seconds: float) -> str:
        """Log one decision; its id."""
        decision_id, record = self.prepare(evaluation, document, seconds)
        if record is not None:
            self.submit((record,))
        return decision_id

    def problem(self) -> str | None:
        """Why decisions are not being written now, or None."""
        return self._problem

    # The writer thread.

    def start(self) -> None:
        self._thread.start()

    def close(self, timeout: float = _FLUSH_SECONDS) -> None:
        """Write what is queued (for at most `timeout` seconds: a sink that blocks, a FIFO
        nobody reads, is given up on and what is left counted as dropped), then close."""
        self._stopping = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self._thread.is_alive():
            left = len(self._queue)
            self._shutdown.inc(left)
            logger.warning("the decision log's flush ran out of time: %d decisions dropped", left)
            return
        self._sink.close()

    def _run(self) -> None:
        while True:
            if not self._queue:
                if self._stopping:
                    return
                self._wake.wait(_IDLE_SECONDS)
                self._wake.clear()
                continue
            batch = [self._queue.popleft() for _ in range(min(_BATCH, len(self._queue)))]
            try:
                lines = [self._line(record) for record in batch]
            except Exception:  # a bug here must not stop the log for good
                logger.exception("the decision log could not encode %d decisions", len(batch))
                self._write_error.inc(len(batch))
                continue
            self._write(lines)

    def _write(self, lines: list[bytes]) -> None:
        try:
            self._sink.write(lines)
        except OSError as exc:
            went = getattr(exc, "lines", 0)
            self._written.inc(went)
            self._write_error.inc(len(lines) - went)
            problem = f"decision log {self._sink.name}: cannot write: {_describe(exc)}"
            if problem != self._problem:
                logger.warning("%s; decisions are dropped until a write succeeds", problem)
            self._problem = problem
            return
        self._written.inc(len(lines))
        if self._problem is not None:
            logger.info("decision log %s: writing again", self._sink.name)
            self._problem = None

    def _line(self, record: _Record) -> bytes:
        decision_id, moment, evaluation, document, seconds = record
        entry: dict[str, Any] = {
            "decision_id": decision_id,
            "timestamp": self._timestamp(moment),
            "ruleset_id": evaluation.ruleset_id,
            "registry_version": evaluation.registry_version,
            "revision": evaluation.revision,
            "input": self._masked(document),
            "total_points": evaluation.total_points,
            "decision": evaluation.decision,
            "matched": [rule.id for rule in evaluation.matched],
            "shadow_matched": [rule.id for rule in evaluation.shadow_matched],
            "errors": [error.rule_id for error in evaluation.errors],
            "duration_us": round(seconds * 1e6, 1),
        }
        challenger = evaluation.challenger_view()
        if challenger is not None:
            entry["challenger"] = challenger
        try:
            return dumpb(entry) + b"\n"
        except TypeError:  # orjson: an integer past 64 bits (the json module took it)
            return json.dumps(entry, separators=(",", ":")).encode() + b"\n"

    def _masked(self, document: Any) -> Any:
        # Every pointer names a place in the input as the application sent it: values are
        # replaced first (nothing moves), then removed in `removal_order`.
        for pointer in self._hash:
            document, _ = edited(document, pointer, self._hashed)
        for pointer in self._mask:
            document, _ = edited(document, pointer, None)
        return document

    def _hashed(self, value: Any) -> str:
        return hashed(self._salt, value)


def _describe(exc: OSError) -> str:
    """`[Errno 28] No space left on device (ENOSPC)`: the message and the errno's name."""
    name = errno.errorcode.get(exc.errno or 0)
    return f"{exc} ({name})" if name else str(exc)


class BatchRecorder:
    """Logs each input of a batch as `evaluate_in_slices` evaluates it.

    `documents` is handed to `evaluate_in_slices` in place of the inputs: it notes when
    each input is taken, just before its evaluation, and `render`, called just after,
    has the input and its time. The records are queued by `submit` once the whole batch
    has answered: a batch refused half-way (an input past the limits, out of time) gave
    no decision to its caller and logs none.
    """

    def __init__(
        self, log: DecisionLog, documents: Sequence[Any], render: Callable[[Evaluation], Any]
    ) -> None:
        self.log = log
        self.documents = _Taken(documents)
        self._render = render
        self._records: list[_Record | None] = []

    def render(self, evaluation: Evaluation) -> dict[str, Any]:
        seconds = time.perf_counter() - self.documents.started
        answer: dict[str, Any] = self._render(evaluation)
        decision_id, record = self.log.prepare(evaluation, self.documents.taken, seconds)
        answer["decision_id"] = decision_id
        self._records.append(record)
        return answer

    def submit(self) -> None:
        self.log.submit(self._records)


class _Taken(Sequence[Any]):
    """A batch's inputs that remember the last one taken, and when."""

    def __init__(self, documents: Sequence[Any]) -> None:
        self._documents = documents
        self.taken: Any = None
        self.started = 0.0

    def __len__(self) -> int:
        return len(self._documents)

    @overload
    def __getitem__(self, index: int) -> Any: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[Any]: ...

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return self._documents[index]
        self.taken = self._documents[index]
        self.started = time.perf_counter()
        return self.taken

    def __iter__(self) -> Iterator[Any]:
        return iter(self._documents)


def with_problem(health: Health, problem: str | None) -> Health:
    """Health with the decision log's problem: `degraded`, the problem among the others."""
    if problem is None:
        return health
    status = HealthStatus.DEGRADED if health.status is HealthStatus.HEALTHY else health.status
    problems = {**health.watch_problems, DECISION_LOG_PROBLEM: problem}
    return dataclasses.replace(health, status=status, watch_problems=problems)

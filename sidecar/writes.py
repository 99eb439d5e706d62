"""Writes through the API to the database source: validated before they commit.

A write (put a ruleset, delete one, enable or disable a rule) runs in one transaction
that no other writer runs beside (PostgreSQL: the advisory lock `db import` takes, and
the ruleset's row `FOR UPDATE`; SQLite: `BEGIN IMMEDIATE`). In it the precondition is
checked against the ruleset's `row_version` (412 when stale), the change applied, and
every ruleset read back as the source would hand it to the loader. The registry that
would result, those files with every other source as last read, is loaded as a reload
loads it (schema, compilation, embedded tests, registry-wide checks), holding the
reload lock and publishing nothing; only when it loads is the write recorded in
`rule_sidecar_writes` and committed. A refused write rolls back: nothing changed.

After the commit the writing sidecar reloads (trigger `write`, still holding the lock,
so the publish is the write's own) and answers once it serves the write, or after
`publish_timeout` seconds (then the write is committed, and served by the reload still
running or the next one). Every other sidecar of the database hears of it like any change
(PostgreSQL's NOTIFY, SQLite's resync). Database work runs in daemon threads, each step
bounded by the database read timeout; loading runs off the event loop (large rulesets in
the loader's worker process).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import sqlite3
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final

import psycopg

from sidecar.dbtools import IMPORT_LOCK, require_schema, unstorable_in_postgresql
from sidecar.errors import LoadError, NotFoundError, Problem, ProblemCode
from sidecar.model import Location
from sidecar.rulefiles import SourceFile
from sidecar.service import HotReloadService
from sidecar.sources import in_daemon_thread
from sidecar.sources.database import (
    DatabaseSource,
    NoAnswer,
    deadline,
    describe_error,
    read_documents,
    read_files,
)
from sidecar.sources.dbschema import (
    marks,
    record_write,
    row_version,
    rule_owners,
    ruleset_file,
    write_ruleset,
)

__all__ = [
    "ACTOR_MAX_CHARS",
    "Precondition",
    "PreconditionFailed",
    "RuleWriter",
    "WriteAction",
    "WriteFailed",
    "WriteRefused",
    "Written",
    "actor_problem",
]

logger = logging.getLogger("sidecar.writes")

# An actor is recorded as given: a name, an e-mail address, a CI job's URL.
ACTOR_MAX_CHARS: Final = 200


class WriteAction(StrEnum):
    CREATE = "create"
    REPLACE = "replace"
    DELETE = "delete"
    ENABLE = "enable"
    DISABLE = "disable"


@dataclass(frozen=True, slots=True)
class Precondition:
    """`If-Match: "<row_version>"` (`row_version`), or `If-None-Match: *` (None: the
    ruleset must not exist)."""

    row_version: int | None


@dataclass(frozen=True, slots=True)
class Written:
    """A committed write: the ruleset's row version after it (None: deleted) and the
    registry version that serves it (None: not served yet; `message` says why)."""

    row_version: int | None
    registry_version: int | None
    message: str | None = None


class PreconditionFailed(Exception):
    """The precondition does not hold: the ruleset is at `current` (None: absent)."""

    def __init__(self, ruleset_id: str, current: int | None) -> None:
        self.current = current
        now = "does not exist" if current is None else f"is at row_version {current}"
        super().__init__(f"ruleset {ruleset_id!r} {now}: read it again and retry")


class WriteRefused(Exception):
    """The write would leave rules that do not load (`problems`): nothing was written."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = tuple(problems)
        super().__init__(
            f"the rules would not load ({len(self.problems)} problem(s)): nothing was written"
        )


class WriteFailed(Exception):
    """The database could not carry the write out (unreachable, busy, silent): the
    message says whether anything was written."""


def actor_problem(actor: str) -> str | None:
    """Why an `X-Actor` value cannot be recorded, or None."""
    if len(actor) > ACTOR_MAX_CHARS:
        return f"X-Actor is longer than {ACTOR_MAX_CHARS} characters"
    if not actor.isprintable():
        return "X-Actor holds characters that are not printable"
    return None


@dataclass(slots=True)
class _Transaction:
    """One write's open transaction, and what it did so far."""

    connection: Any
    action: WriteAction
    ruleset_id: str
    rule_id: str | None
    before: int | None = None
    after: int | None = None
    document_before: dict[str, Any] | None = None
    document_after: dict[str, Any] | None = None
    files: tuple[SourceFile, ...] = ()
    committed: bool = False
    # Where each rule of a put's body is, for the problems the database finds.
    where: Mapping[str, Location] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        return self.document_before != self.document_after


# The writes of a ruleset that must exist (a 404 otherwise); a replace of one that
# does not is a failed precondition (412), as HTTP has it.
_NEEDS_A_RULESET: Final = frozenset({WriteAction.DELETE, WriteAction.ENABLE, WriteAction.DISABLE})

# What a write does to its ruleset's document, inside the transaction: the document as
# stored (None: absent) to the document to store (None: delete).
_Change = Callable[[dict[str, Any] | None], dict[str, Any] | None]


class RuleWriter:
    """Writes to one database source, validated against the whole registry of `service`."""

    def __init__(
        self, service: HotReloadService, source: DatabaseSource, *, publish_timeout: float
    ) -> None:
        self.service = service
        self.source = source
        self.publish_timeout = publish_timeout
        self._publishing: set[asyncio.Task[Any]] = set()

    async def put(
        self, ruleset_id: str, body: SourceFile, precondition: Precondition, actor: str | None
    ) -> Written:
        """Create (`If-None-Match: *`) or replace (`If-Match`) a ruleset with the one
        document `body` holds. `WriteRefused` when it is not one ruleset of that id, or
        the registry would not load with it."""
        document, where = await self._checked_document(ruleset_id, body)
        action = WriteAction.CREATE if precondition.row_version is None else WriteAction.REPLACE
        transaction = _Transaction(None, action, ruleset_id, None, where=where)
        return await self._write(transaction, precondition, actor, lambda _: document)

    async def delete(
        self, ruleset_id: str, precondition: Precondition, actor: str | None
    ) -> Written:
        """Delete a ruleset and its rules; `NotFoundError` when there is none."""
        transaction = _Transaction(None, WriteAction.DELETE, ruleset_id, None)
        return await self._write(transaction, precondition, actor, lambda _: None)

    async def set_enabled(
        self, rule_id: str, enabled: bool, precondition: Precondition | None, actor: str | None
    ) -> Written:
        """Enable or disable one rule (its mode kept); `NotFoundError` when there is none.
        Idempotent: the precondition is optional, and checked when given."""

        def change(document: dict[str, Any] | None) -> dict[str, Any] | None:
            assert document is not None  # the rule's ruleset exists: it was found by it
            rules = [
                {**rule, "enabled": enabled} if rule.get("id") == rule_id else rule
                for rule in document["spec"]["rules"]
            ]
            return {**document, "spec": {**document["spec"], "rules": rules}}

        action = WriteAction.ENABLE if enabled else WriteAction.DISABLE
        ruleset_id = await in_daemon_thread(functools.partial(self._ruleset_of, rule_id))
        transaction = _Transaction(None, action, ruleset_id, rule_id)
        return await self._write(transaction, precondition, actor, change)

    # The steps of a write

    async def _checked_document(
        self, ruleset_id: str, body: SourceFile
    ) -> tuple[dict[str, Any], dict[str, Location]]:
        """The body's ruleset as a canonical document, once the registry is known to
        load with it in place of the stored one (problems located in the body), and
        where each of its rules is in the body."""
        name = ruleset_file(self.source.name, ruleset_id)
        async with self.service.exclusively() as held:
            files = [f for f in self.service.sources.files_of(self.source.name) if f.name != name]
            validation = await held.check(self.source.name, [*files, body])
        if validation.problems:
            raise WriteRefused(validation.problems)
        assert validation.candidate is not None
        located = [
            r
            for r in validation.candidate.rulesets.values()
            if r.location and r.location.file == body.name
        ]
        if len(located) != 1 or located[0].id != ruleset_id:
            ids = ", ".join(repr(r.id) for r in located) or "none"
            message = (
                f"the body must hold one ruleset whose metadata.id is {ruleset_id!r}, the"
                f" id in the path; it holds {ids}"
            )
            path = "$.metadata.id" if len(located) == 1 else "$"
            raise WriteRefused(
                [
                    Problem(
                        file=body.name, path=path, message=message, code=ProblemCode.REQUEST_INVALID
                    )
                ]
            )
        ruleset = located[0]
        if self.source.url.kind == "postgresql":
            refused = unstorable_in_postgresql(ruleset)
            if refused:
                raise WriteRefused(refused)
        where = {rule.id: rule.location for rule in ruleset.rules if rule.location is not None}
        return ruleset.to_document(), where

    async def _write(
        self,
        transaction: _Transaction,
        precondition: Precondition | None,
        actor: str | None,
        change: _Change,
    ) -> Written:
        try:
            await in_daemon_thread(
                functools.partial(self._apply, transaction, precondition, change)
            )
        except BaseException:
            await in_daemon_thread(functools.partial(self._end, transaction))
            raise
        if not transaction.changed:  # nothing to write: say what serves
            await in_daemon_thread(functools.partial(self._end, transaction))
            return self._unchanged(transaction)
        committed = asyncio.Event()
        task = asyncio.create_task(self._commit_and_publish(transaction, actor, committed))
        self._publishing.add(task)
        task.add_done_callback(self._publishing.discard)
        waiting = asyncio.create_task(committed.wait())
        try:
            await asyncio.wait({task, waiting}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiting.cancel()
        if not committed.is_set():
            return task.result()  # raises why it was not committed
        done, _ = await asyncio.wait({task}, timeout=self.publish_timeout)
        if not done:
            return Written(
                transaction.after,
                None,
                f"committed, not served yet after {self.publish_timeout:g} s: the reload"
                " that serves it is still running",
            )
        return task.result()

    async def _commit_and_publish(
        self, transaction: _Transaction, actor: str | None, committed: asyncio.Event
    ) -> Written:
        """Holding the reload lock: validate what the transaction would commit, commit
        it, and reload. Ends the transaction whatever happens."""
        try:
            async with self.service.exclusively() as held:
                validation = await held.check(self.source.name, transaction.files)
                if validation.problems:
                    raise WriteRefused(validation.problems)
                await in_daemon_thread(functools.partial(self._commit, transaction, actor))
                committed.set()
                record = await held.publish(
                    {
                        "action": transaction.action.value,
                        "ruleset_id": transaction.ruleset_id,
                        "rule_id": transaction.rule_id,
                        "actor": actor,
                    }
                )
        finally:
            if not transaction.committed:
                await in_daemon_thread(functools.partial(self._end, transaction))
        if record.errors:
            reason = "; ".join(p.message for p in record.errors[:3])
            return Written(
                transaction.after,
                None,
                f"committed, not served: the reload after it failed ({reason}); the"
                " last good rules keep serving, and the next reload that succeeds serves it",
            )
        return Written(transaction.after, self.service.registry.current.version)

    def _unchanged(self, transaction: _Transaction) -> Written:
        current = self.service.registry.current
        if self.service.row_version(current, transaction.ruleset_id) == transaction.before:
            return Written(transaction.before, current.version)
        return Written(
            transaction.before,
            None,
            "unchanged in the database, which the registry does not serve yet",
        )

    # In a daemon thread

    def _ruleset_of(self, rule_id: str) -> str:
        where = f"WHERE id = {marks(self.source.url.kind)}"
        with self._guarded("to find the rule") as connection:
            row = connection.execute(
                f"SELECT ruleset_id FROM rule_sidecar_rules {where}", (rule_id,)
            ).fetchone()
            connection.rollback()
        if row is None or not isinstance(row[0], str):
            raise NotFoundError("rule", rule_id)
        return row[0]

    def _apply(
        self, transaction: _Transaction, precondition: Precondition | None, change: _Change
    ) -> None:
        """Begin, lock, check the precondition, apply the change, read every ruleset
        back: the transaction stays open for `_commit` or `_end`."""
        url = self.source.url
        connection = self._connect()
        transaction.connection = connection
        ruleset_id = transaction.ruleset_id
        with self._bounded(connection, "to begin the write"):
            if url.kind == "sqlite":
                connection.execute("BEGIN IMMEDIATE")
            else:
                connection.execute("SELECT pg_advisory_xact_lock(%s)", (IMPORT_LOCK,))
            require_schema(connection, url)
            before = row_version(connection, url.kind, ruleset_id)
            if before is None and transaction.action in _NEEDS_A_RULESET:
                if transaction.rule_id is not None:
                    raise NotFoundError("rule", transaction.rule_id)
                raise NotFoundError("ruleset", ruleset_id)
            if precondition is not None and precondition.row_version != before:
                raise PreconditionFailed(ruleset_id, before)
            transaction.before = before
            stored = self._stored(connection, ruleset_id, required=transaction.rule_id is not None)
            transaction.document_before = stored
            wanted = change(stored)
            if wanted is not None:
                self._refuse_rules_held_elsewhere(connection, transaction, wanted)
            if wanted is None:
                connection.execute(
                    f"DELETE FROM rule_sidecar_rulesets WHERE id = {marks(url.kind)}",
                    (ruleset_id,),
                )
            else:
                write_ruleset(connection, url.kind, wanted)
            transaction.after = row_version(connection, url.kind, ruleset_id)
            if wanted is not None:
                transaction.document_after = self._stored(connection, ruleset_id, required=True)
            transaction.files = tuple(
                read_files(connection, name=self.source.name, max_bytes=self.source.max_bytes)
            )
        if not transaction.changed:
            transaction.after = before

    def _refuse_rules_held_elsewhere(
        self, connection: Any, transaction: _Transaction, document: dict[str, Any]
    ) -> None:
        """`WriteRefused` when another stored ruleset holds a rule of one of these ids.
        Storing would move that rule out of it, so the registry read back would load
        while another ruleset silently lost a rule (a writer whose registry is behind
        the database's, or two writes at once, would never see the clash)."""
        rule_ids = [str(rule["id"]) for rule in document["spec"]["rules"]]
        held = rule_owners(
            connection, self.source.url.kind, rule_ids, other_than=transaction.ruleset_id
        )
        if not held:
            return
        problems = []
        for index, rule_id in enumerate(rule_ids):
            if rule_id not in held:
                continue
            at = transaction.where.get(rule_id)
            problems.append(
                Problem(
                    file=at.file if at else ruleset_file(self.source.name, transaction.ruleset_id),
                    line=at.line if at else 1,
                    column=at.column if at else 1,
                    path=f"$.spec.rules[{index}].id",
                    message=f"rule id {rule_id!r} is already used by ruleset"
                    f" {held[rule_id]!r} in {self.source.name}",
                    ruleset_id=transaction.ruleset_id,
                    rule_id=rule_id,
                    code=ProblemCode.ID_DUPLICATE,
                )
            )
        raise WriteRefused(problems)

    def _stored(self, connection: Any, ruleset_id: str, *, required: bool) -> dict[str, Any] | None:
        """The ruleset's document as stored; None when absent, or when it cannot be read
        and the write does not need it (a ruleset broken by hand is replaced or
        deleted through the API all the same)."""
        try:
            documents = read_documents(connection, [ruleset_id], name=self.source.name)[1]
        except LoadError:
            if required:
                raise
            return None
        return documents.get(ruleset_id)

    def _commit(self, transaction: _Transaction, actor: str | None) -> None:
        connection = transaction.connection
        unknown = (
            "the write may or may not have been committed: read the ruleset's row_version to know"
        )
        with self._bounded(connection, "to record and commit the write", unknown):
            record_write(
                connection,
                self.source.url.kind,
                actor=actor,
                action=transaction.action.value,
                ruleset_id=transaction.ruleset_id,
                rule_id=transaction.rule_id,
                versions=(transaction.before, transaction.after),
                documents=(transaction.document_before, transaction.document_after),
            )
            connection.commit()
        transaction.committed = True
        with contextlib.suppress(Exception):
            connection.close()

    def _end(self, transaction: _Transaction) -> None:
        """Roll back what was not committed, and close."""
        connection = transaction.connection
        if connection is None:
            return
        with contextlib.suppress(Exception):
            connection.rollback()
        with contextlib.suppress(Exception):
            connection.close()

    def _connect(self) -> Any:
        try:
            return self.source.open_writer()
        except Exception as exc:
            raise WriteFailed(f"{self._reason(exc)}: nothing was written") from None

    @contextlib.contextmanager
    def _guarded(self, doing: str) -> Iterator[Any]:
        connection = self._connect()
        try:
            with self._bounded(connection, doing):
                yield connection
        finally:
            with contextlib.suppress(Exception):
                connection.close()

    @contextlib.contextmanager
    def _bounded(
        self, connection: Any, doing: str, consequence: str = "nothing was written"
    ) -> Iterator[None]:
        """Database errors and silence become `WriteFailed` saying `consequence`; the
        content's faults become `WriteRefused`; the rest passes."""
        timeouts = self.source.timeouts
        try:
            with deadline(connection, self.source.url, timeouts.read, doing):
                yield
        except (
            sqlite3.OperationalError,
            psycopg.errors.QueryCanceled,
            psycopg.errors.LockNotAvailable,
        ) as exc:
            busy = not isinstance(exc, sqlite3.Error) or exc.sqlite_errorcode == sqlite3.SQLITE_BUSY
            if busy:
                raise WriteFailed(
                    f"another writer held {self.source.name} for over {timeouts.statement:g} s:"
                    f" {consequence}, try again"
                ) from None
            raise WriteFailed(f"{self._reason(exc)}: {consequence}") from None
        except LoadError as exc:
            raise WriteRefused(exc.problems) from None
        except (NoAnswer, psycopg.Error, sqlite3.Error, OSError) as exc:
            raise WriteFailed(f"{self._reason(exc)}: {consequence}") from None

    def _reason(self, exc: BaseException) -> str:
        return f"database unavailable: {describe_error(exc, None, self.source.url)}"

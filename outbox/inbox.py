"""The inbox: remembers which messages a consumer has already processed.

Deduplication is a unique key, ``(consumer, source, message_id)``, written
inside the handler's own transaction, before the handler runs (a batch of
messages in one transaction reads the keys of all of them up front with
:meth:`InboxStore.recorded` and writes them together before it commits with
:meth:`InboxStore.record_many`, which reports a key another transaction took
in between). A message id
is only unique within its source (the producer that assigned it; CloudEvents
promises no more than source + id), so two producers choosing the same id
never swallow each other's messages. A redelivered message
finds the key taken and is skipped; if the handler's transaction rolls back,
the key goes with it and the message will be processed on redelivery. There
is no other dedupe mechanism: no cache, no second connection.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection, Sequence
from datetime import timedelta

from sqlalchemy import delete, select, tuple_
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from outbox.database import db_now_ms, require_configured, translate_db_error, upsert_insert
from outbox.errors import ConfigurationError
from outbox.store import Transaction
from outbox.tables import OutboxTables

__all__ = ["InboxStore", "SqlInboxStore"]

_MAX_ID = 200
_KEYS_PER_STATEMENT = 500


def _check(consumer: str, source: str, message_id: str) -> None:
    if not consumer or len(consumer) > _MAX_ID:
        raise ConfigurationError(f"consumer name must be 1-{_MAX_ID} characters")
    if not source or len(source) > _MAX_ID:
        raise ConfigurationError(f"message source must be 1-{_MAX_ID} characters")
    if not message_id or len(message_id) > _MAX_ID:
        raise ConfigurationError(f"message id must be 1-{_MAX_ID} characters")


class InboxStore(ABC):
    """Records processed message ids, per consumer and message source."""

    @abstractmethod
    async def record(self, tx: Transaction, consumer: str, message_id: str, *, source: str) -> bool:
        """Record ``message_id`` of ``source`` for ``consumer`` inside the open transaction ``tx``.

        ``source`` names whoever assigned the id (a producer, a topic): ids
        are compared only within one source.

        Returns:
            ``True`` the first time; ``False`` when the message was already
            processed (a duplicate the caller must skip).
        """

    async def recorded(
        self, tx: Transaction, consumer: str, keys: Collection[tuple[str, str]]
    ) -> set[tuple[str, str]]:
        """Which of ``keys`` (``(source, message_id)``) ``consumer`` has recorded, as ``tx`` sees.

        With :meth:`record_many`, lets a batch of messages check for
        duplicates in one statement up front and record them all in one
        statement at the end. The default asks :meth:`contains` for each key.
        """
        return {key for key in keys if await self.contains(consumer, key[1], source=key[0])}

    async def record_many(
        self, tx: Transaction, consumer: str, keys: Sequence[tuple[str, str]]
    ) -> set[tuple[str, str]]:
        """Record ``keys`` (``(source, message_id)`` pairs) for ``consumer`` inside ``tx``.

        Returns:
            The keys recorded by this call; a key missing from it was recorded
            already (or by a concurrent transaction that committed first).
        """
        return {key for key in keys if await self.record(tx, consumer, key[1], source=key[0])}

    @abstractmethod
    async def contains(self, consumer: str, message_id: str, *, source: str) -> bool:
        """Whether ``consumer`` has committed the processing of ``message_id`` of ``source``."""

    @abstractmethod
    async def purge(self, older_than: timedelta, limit: int) -> int:
        """Delete up to ``limit`` rows recorded more than ``older_than`` ago."""


class SqlInboxStore(InboxStore):
    """Inbox on PostgreSQL or SQLite.

    Args:
        engine: Engine used for :meth:`contains` and :meth:`purge`
            (:meth:`record` uses the caller's transaction).
        tables: The table definitions.
    """

    def __init__(self, engine: AsyncEngine, tables: OutboxTables) -> None:
        self.engine = engine
        self.tables = tables
        dialect = require_configured(engine)
        # ON CONFLICT DO NOTHING rather than catching IntegrityError: on
        # PostgreSQL a failed statement would poison the caller's transaction.
        # A concurrent insert of the same key waits for the other transaction
        # and then reports the conflict, so two consumers never both "win".
        self._insert = (
            upsert_insert(dialect)(tables.inbox)
            .values(received_at_ms=db_now_ms())
            .on_conflict_do_nothing(index_elements=["consumer", "source", "message_id"])
            .returning(tables.inbox.c.message_id)
        )
        self._insert_many = (
            upsert_insert(dialect)(tables.inbox)
            .values(received_at_ms=db_now_ms())
            .on_conflict_do_nothing(index_elements=["consumer", "source", "message_id"])
            .returning(tables.inbox.c.source, tables.inbox.c.message_id)
        )

    async def record(self, tx: Transaction, consumer: str, message_id: str, *, source: str) -> bool:
        _check(consumer, source, message_id)
        try:
            result = await tx.execute(
                self._insert, {"consumer": consumer, "source": source, "message_id": message_id}
            )
        except SQLAlchemyError as exc:
            raise translate_db_error(exc, "could not record the message in the inbox") from exc
        return result.first() is not None

    async def recorded(
        self, tx: Transaction, consumer: str, keys: Collection[tuple[str, str]]
    ) -> set[tuple[str, str]]:
        if not keys:
            return set()
        inbox = self.tables.inbox
        found: set[tuple[str, str]] = set()
        ordered = list(keys)
        try:
            # Bounded statements: a row-value IN list becomes one index probe per key.
            for start in range(0, len(ordered), _KEYS_PER_STATEMENT):
                chunk = ordered[start : start + _KEYS_PER_STATEMENT]
                query = select(inbox.c.source, inbox.c.message_id).where(
                    inbox.c.consumer == consumer,
                    tuple_(inbox.c.source, inbox.c.message_id).in_(chunk),
                )
                found.update((row[0], row[1]) for row in await tx.execute(query))
        except SQLAlchemyError as exc:
            raise translate_db_error(exc, "could not read the inbox") from exc
        return found

    async def record_many(
        self, tx: Transaction, consumer: str, keys: Sequence[tuple[str, str]]
    ) -> set[tuple[str, str]]:
        if not keys:
            return set()
        for source, message_id in keys:
            _check(consumer, source, message_id)
        rows = [{"consumer": consumer, "source": s, "message_id": m} for s, m in keys]
        try:
            # One multi-row INSERT ... RETURNING (SQLAlchemy's "insertmanyvalues").
            result = await tx.execute(self._insert_many, rows)
        except SQLAlchemyError as exc:
            raise translate_db_error(exc, "could not record the messages in the inbox") from exc
        return {(row[0], row[1]) for row in result}

    async def contains(self, consumer: str, message_id: str, *, source: str) -> bool:
        inbox = self.tables.inbox
        query = select(inbox.c.message_id).where(
            inbox.c.consumer == consumer,
            inbox.c.source == source,
            inbox.c.message_id == message_id,
        )
        try:
            async with self.engine.connect() as conn:
                return (await conn.execute(query)).first() is not None
        except SQLAlchemyError as exc:
            raise translate_db_error(exc, "could not read the inbox") from exc

    async def purge(self, older_than: timedelta, limit: int) -> int:
        inbox = self.tables.inbox
        cutoff = db_now_ms() - int(older_than.total_seconds() * 1000)
        victims = (
            select(inbox.c.consumer, inbox.c.source, inbox.c.message_id)
            .where(inbox.c.received_at_ms < cutoff)
            .order_by(inbox.c.received_at_ms)
            .limit(limit)
        )
        key = tuple_(inbox.c.consumer, inbox.c.source, inbox.c.message_id)
        statement = delete(inbox).where(key.in_(victims))
        try:
            async with self.engine.begin() as conn:
                return int((await conn.execute(statement)).rowcount)
        except SQLAlchemyError as exc:
            raise translate_db_error(exc, "could not purge the inbox") from exc

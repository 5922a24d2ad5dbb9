"""The saga log: one row per observed saga message, and one per saga.

Two tables on a ``MetaData`` you may share with Alembic:

* ``saga_log`` (messages): one row per message, keyed by its id; the stamp
  is stored as JSON text so that ``psql`` and ``sqlite3`` show it, and the
  payload only when the observer keeps payloads;
* ``saga_log_sagas`` (sagas): one row per saga, keyed by (name, id), with
  the merge of every stamp seen (``saga.state.merge``), the time of its last
  message and its highest hop, which is what ``saga status`` counts and lists.

A saga is (name, id): ``place_order`` and ``cancel_order`` of order 7 may
both use the id ``order-7``, and are two sagas here, each with its own row,
status and deadline. Messages are looked up by saga id (or correlation id)
and then told apart by saga name, so the messages' index leads with the saga
id: it serves a lookup by id alone (``saga trace order-7``) as well as one by
name and id. Logs made by earlier versions keyed their sagas by id alone;
:meth:`SagaLog.check_keys` refuses them, giving the SQL that migrates them.

Rows are written by :class:`~saga.observe.observer.SagaObserver` inside the
transaction that records the message in the inbox, so a redelivered message
changes nothing. A saga's messages share a partition (the saga id is the key),
so one observer writes a saga's row at a time; on PostgreSQL the row is also
locked while it is merged. Times are the messages' own (CloudEvents time; a deadline
message's due time), so that a log filled late by a replay still tells how long a saga
has been idle. A deadline message due after its saga ended is logged but leaves the
saga's last message time (its time to end) as it was.

A saga's deadline is the latest one its messages carry (``merge`` keeps the
maximum: a deadline only moves later), so a stale message observed late never
moves it back. The initiator moves the deadline when a suspended saga resumes,
and only the initiator's messages carry the moved one: when the initiator itself
resumed, its ``SagaResumed``; when a participant did, the initiator's next
message, which may be the new deadline message itself, published when due.
Until then the log shows the deadline as it was. A deadline message's own
deadline counts only once the saga has resumed: before that it can only be the
saga's deadline or an earlier saga's of the same name and id
(:func:`~saga.observe.message.deadline_counted`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

from sqlalchemy import (
    BigInteger,
    Column,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    bindparam,
    delete,
    exists,
    func,
    insert,
    inspect,
    literal_column,
    or_,
    select,
    tuple_,
)
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.schema import CreateIndex, CreateTable, DropIndex, DropTable
from sqlalchemy.sql.expression import ClauseElement

from outbox import Transaction
from outbox.database import read_connection, upsert_insert
from outbox.tables import create_tables, validate_identifier
from saga.choreography import DEADLINE_REACHED, SAGA_RESUMED, SAGA_SUSPENDED
from saga.errors import ConfigurationError
from saga.observe.message import (
    ObservedMessage,
    deadline_counted,
    stamp_from_json,
    stamp_to_json,
)
from saga.stamp import SagaStatus, Stamp
from saga.state import merge

__all__ = ["SagaLog", "SagaSummary"]


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def _time(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


@dataclass(frozen=True, kw_only=True)
class SagaSummary:
    """One saga as the log knows it."""

    saga_name: str
    """Saga type."""
    saga_id: str
    """Saga instance id."""
    status: str
    """Merged status (a :class:`~saga.stamp.SagaStatus` value)."""
    reason: str | None
    """Why it is compensating or failed, if it is."""
    started_at: datetime
    """When the saga started."""
    last_message_at: datetime
    """Time of its latest message (not counting a deadline message due after it ended)."""
    messages: int
    """Messages observed."""
    hop: int
    """Highest hop observed."""
    stamp: Stamp
    """Merge of every stamp observed."""


class SagaLog:
    """The saga log's tables and queries, on PostgreSQL or SQLite.

    Args:
        metadata: Where to define the tables (pass your own to manage them
            with Alembic).
        dialect: ``"postgresql"`` or ``"sqlite"``.
        messages: Name of the messages table.
        sagas: Name of the sagas table.
    """

    def __init__(
        self,
        metadata: MetaData | None = None,
        *,
        dialect: str,
        messages: str = "saga_log",
        sagas: str = "saga_log_sagas",
    ) -> None:
        validate_identifier("saga log table", messages)
        validate_identifier("saga log table", sagas)
        self.metadata = MetaData() if metadata is None else metadata
        self._dialect = dialect
        self._insert = upsert_insert(dialect)
        self.messages = Table(
            messages,
            self.metadata,
            Column("message_id", String(200), primary_key=True),
            Column("saga_name", String(100), nullable=False),
            Column("saga_id", String(200), nullable=False),
            Column("event_type", String(300), nullable=False),
            Column("source", String(300), nullable=False),
            Column("service", String(200), nullable=False),
            Column("step", String(100), nullable=True),
            Column("outcome", String(30), nullable=True),
            Column("status", String(20), nullable=False),
            Column("reason", Text, nullable=True),
            Column("hop", BigInteger, nullable=False),
            Column("time_ms", BigInteger, nullable=False),
            Column("causation_id", String(200), nullable=True),
            Column("correlation_id", String(200), nullable=True),
            Column("trace_id", String(32), nullable=True),
            Column("detail", Text, nullable=True),
            Column("topic", String(249), nullable=False),
            Column("kafka_partition", Integer, nullable=False),
            Column("kafka_offset", BigInteger, nullable=False),
            Column("stamp", Text, nullable=False),
            Column("payload", Text, nullable=True),
            # By id first: a trace looks a saga up by its id, its name often unknown.
            Index(f"ix_{messages}_saga", "saga_id", "time_ms"),
            Index(f"ix_{messages}_correlation", "correlation_id"),
            Index(f"ix_{messages}_time", "time_ms"),
        )
        self.sagas = Table(
            sagas,
            self.metadata,
            Column("saga_id", String(200), nullable=False),
            Column("saga_name", String(100), nullable=False),
            Column("status", String(20), nullable=False),
            Column("reason", Text, nullable=True),
            Column("correlation_id", String(200), nullable=False),
            Column("started_at_ms", BigInteger, nullable=False),
            Column("last_message_ms", BigInteger, nullable=False),
            Column("messages", BigInteger, nullable=False),
            Column("hop", BigInteger, nullable=False),
            Column("stamp", Text, nullable=False),
            PrimaryKeyConstraint("saga_name", "saga_id", name=f"pk_{sagas}"),
            Index(f"ix_{sagas}_status", "status", "last_message_ms"),
            Index(f"ix_{sagas}_name", "saga_name", "status"),
        )
        # Built once: a statement built per message costs more than its round trip.
        self._add_message = self._insert(self.messages).on_conflict_do_nothing(
            index_elements=["message_id"]
        )
        key = ["saga_name", "saga_id"]
        saga_row = select(self.sagas).where(*(self.sagas.c[k] == bindparam(k) for k in key))
        self._saga_row = saga_row.with_for_update() if dialect == "postgresql" else saga_row
        m = self.messages.c
        self._resumed = (
            select(m.message_id)
            .where(
                m.saga_name == bindparam("saga_name"),
                m.saga_id == bindparam("saga_id"),
                m.event_type == SAGA_RESUMED,
            )
            .limit(1)
        )
        upsert = self._insert(self.sagas)
        self._merge_saga = upsert.on_conflict_do_update(
            index_elements=key,
            set_={c.name: upsert.excluded[c.name] for c in self.sagas.c if c.name not in key},
        )

    async def create_tables(self, engine: AsyncEngine) -> None:
        """Create both tables if they do not exist, and refuse a log of an earlier version.

        Raises:
            ConfigurationError: See :meth:`check_keys`.
        """
        await create_tables(engine, [self.messages, self.sagas])
        await self.check_keys(engine)

    async def check_keys(self, engine: AsyncEngine) -> None:
        """Refuse a saga log whose sagas table is keyed otherwise than by (name, id).

        Versions before a saga was (name, id) keyed it by the saga id alone: two
        sagas of different names with one id were one row there, and the
        observer's upserts fail on it. A table that does not exist passes.

        Raises:
            ConfigurationError: The sagas table has another primary key; the
                message gives the SQL that migrates it.
        """
        async with read_connection(engine) as conn:
            key = await conn.run_sync(self._sagas_key)
        if key is None or sorted(key[1]) == ["saga_id", "saga_name"]:
            return
        table = self.sagas.name
        raise ConfigurationError(
            f"the saga log table {table} is keyed by ({', '.join(key[1])}), as versions "
            "before a saga was (name, id) made it: stop the observer and give it the key "
            f"(saga_name, saga_id): {self._migration(engine, key[0])}"
        )

    def _sagas_key(self, conn: Connection) -> tuple[str | None, list[str]] | None:
        """The name and columns of the sagas table's primary key; ``None`` without the table."""
        inspector = inspect(conn)
        schema = self.sagas.schema
        if not inspector.has_table(self.sagas.name, schema=schema):
            return None
        key = inspector.get_pk_constraint(self.sagas.name, schema=schema)
        return key.get("name"), list(key["constrained_columns"])

    def _migration(self, engine: AsyncEngine, old_key: str | None) -> str:
        """The SQL that gives a sagas table of an earlier version its key (name, id)."""
        table = self.sagas.name
        quote = engine.dialect.identifier_preparer.quote
        qualified = engine.dialect.identifier_preparer.format_table(self.sagas)
        if self._dialect == "postgresql":
            return (
                f"ALTER TABLE {qualified} DROP CONSTRAINT {quote(old_key or f'{table}_pkey')}; "
                f"ALTER TABLE {qualified} ADD CONSTRAINT {quote(f'pk_{table}')} "
                "PRIMARY KEY (saga_name, saga_id);"
            )

        # SQLite cannot change a primary key: the table is made again and its rows copied.
        def sql(statement: ClauseElement) -> str:
            return " ".join(str(statement.compile(dialect=engine.dialect)).split()) + ";"

        indexes = sorted(self.sagas.indexes, key=lambda index: str(index.name))
        old = Table(f"{table}_old", MetaData(), *(Column(c.name, c.type) for c in self.sagas.c))
        names = [c.name for c in self.sagas.c]
        copy = insert(self.sagas).from_select(
            names, select(*map(literal_column, names)).select_from(old)
        )
        # In one transaction: a statement that fails leaves the table as it was.
        return " ".join(
            [
                "BEGIN IMMEDIATE;",
                f"ALTER TABLE {qualified} RENAME TO {quote(old.name)};",
                *(sql(DropIndex(index, if_exists=True)) for index in indexes),
                sql(CreateTable(self.sagas)),
                *(sql(CreateIndex(index)) for index in indexes),
                sql(copy),
                sql(DropTable(old)),
                "COMMIT;",
            ]
        )

    # -- writing ---------------------------------------------------------------------

    async def record(self, tx: Transaction, message: ObservedMessage) -> None:
        """Store ``message`` and fold its stamp into its saga's row, inside ``tx``.

        A deadline message for a saga the log does not know (forgotten by
        retention after it ended, as the deadline fires however long ago that
        was) is not stored: its start stamp would bring the saga back as running.
        """
        key = {"saga_name": message.saga_name, "saga_id": message.saga_id}
        row = (await tx.execute(self._saga_row, key)).first()
        if row is None and message.event_type == DEADLINE_REACHED:
            return
        await tx.execute(
            self._add_message,
            {
                "message_id": message.message_id,
                "saga_name": message.saga_name,
                "saga_id": message.saga_id,
                "event_type": message.event_type,
                "source": message.source,
                "service": message.service,
                "step": message.step,
                "outcome": message.outcome,
                "status": message.status,
                "reason": message.reason,
                "hop": message.hop,
                "time_ms": _ms(message.time),
                "causation_id": message.causation_id,
                "correlation_id": message.correlation_id,
                "trace_id": message.trace_id,
                "detail": message.detail,
                "topic": message.topic,
                "kafka_partition": message.partition,
                "kafka_offset": message.offset,
                "stamp": message.stamp,
                "payload": message.payload,
            },
        )
        incoming = stamp_from_json(message.stamp)
        if message.event_type == DEADLINE_REACHED:
            resumed = (await tx.execute(self._resumed, key)).first() is not None
            incoming = deadline_counted(incoming, resumed=resumed)
        time_ms = _ms(message.time)
        if row is None:
            merged, last, count = merge(None, incoming), time_ms, 1
        else:
            merged = merge(stamp_from_json(row.stamp), incoming)
            last, count = max(row.last_message_ms, time_ms), row.messages + 1
            if message.event_type == DEADLINE_REACHED:
                # By itself it changes nothing the log can see: due after the saga
                # ended, superseded by a deadline moved on a resume, or held while
                # suspended. One that fires is followed by the initiator's
                # compensation messages. The time to end and the idle time stay.
                last = row.last_message_ms
        merged = _suspension(merged, incoming, message)
        values = {
            "saga_id": merged.saga_id,
            "saga_name": merged.saga_name,
            "status": merged.status.value,
            "reason": merged.reason,
            "correlation_id": merged.correlation_id,
            "started_at_ms": _ms(merged.started_at),
            "last_message_ms": last,
            "messages": count,
            "hop": merged.hop,
            "stamp": stamp_to_json(merged),
        }
        await tx.execute(self._merge_saga, values)

    async def purge(self, engine: AsyncEngine, older_than: timedelta) -> int:
        """Forget sagas whose last message is older than ``older_than``; return how many."""
        cutoff = _ms(datetime.now(UTC) - older_than)
        m, s = self.messages.c, self.sagas.c
        old = select(s.saga_name, s.saga_id).where(s.last_message_ms < cutoff)
        row = exists().where(s.saga_name == m.saga_name, s.saga_id == m.saga_id)
        async with engine.begin() as conn:
            # A saga's messages, not those of another saga with the same id.
            await conn.execute(delete(self.messages).where(tuple_(m.saga_name, m.saga_id).in_(old)))
            # Old messages of no saga: those of a saga that a log of an earlier
            # version (keyed by saga id alone) merged into another saga's row.
            await conn.execute(delete(self.messages).where(m.time_ms < cutoff, ~row))
            result = await conn.execute(
                delete(self.sagas).where(self.sagas.c.last_message_ms < cutoff)
            )
        return int(result.rowcount)

    # -- reading ---------------------------------------------------------------------

    async def find(
        self, engine: AsyncEngine, ref: str, *, saga: str | None = None
    ) -> list[ObservedMessage]:
        """Every message whose saga id, or correlation id, is ``ref`` (of saga ``saga`` if given).

        Sagas of several names may have the id ``ref``, or share it as their
        correlation id: their messages are all returned
        (:func:`~saga.observe.trace.messages_of` picks one saga).
        """
        c = self.messages.c
        query = (
            select(self.messages)
            .where(or_(c.saga_id == ref, c.correlation_id == ref))
            .order_by(c.time_ms, c.hop)
        )
        if saga is not None:
            query = query.where(c.saga_name == saga)
        async with read_connection(engine) as conn:
            rows = (await conn.execute(query)).all()
        return [
            ObservedMessage(
                message_id=r.message_id,
                saga_name=r.saga_name,
                saga_id=r.saga_id,
                event_type=r.event_type,
                source=r.source,
                service=r.service,
                step=r.step,
                outcome=r.outcome,
                status=r.status,
                reason=r.reason,
                hop=r.hop,
                time=_time(r.time_ms),
                causation_id=r.causation_id,
                correlation_id=r.correlation_id,
                trace_id=r.trace_id,
                detail=r.detail,
                stamp=r.stamp,
                topic=r.topic,
                partition=r.kafka_partition,
                offset=r.kafka_offset,
                payload=r.payload,
            )
            for r in rows
        ]

    async def counts(self, engine: AsyncEngine) -> list[tuple[str, str, int]]:
        """``(saga name, status, count)`` for every saga name and status seen."""
        c = self.sagas.c
        query = (
            select(c.saga_name, c.status, func.count())
            .group_by(c.saga_name, c.status)
            .order_by(c.saga_name, c.status)
        )
        async with read_connection(engine) as conn:
            return [(r[0], r[1], int(r[2])) for r in (await conn.execute(query)).all()]

    async def summaries(
        self,
        engine: AsyncEngine,
        *,
        statuses: Sequence[str] | None = None,
        idle_longer_than: timedelta | None = None,
        limit: int = 100,
    ) -> list[SagaSummary]:
        """Sagas with one of ``statuses`` and no message for ``idle_longer_than``, oldest first."""
        c = self.sagas.c
        query = select(self.sagas).order_by(c.last_message_ms).limit(limit)
        if statuses is not None:
            query = query.where(c.status.in_(list(statuses)))
        if idle_longer_than is not None:
            cutoff = _ms(datetime.now(UTC) - idle_longer_than)
            query = query.where(c.last_message_ms < cutoff)
        async with read_connection(engine) as conn:
            rows = (await conn.execute(query)).all()
        return [
            SagaSummary(
                saga_name=r.saga_name,
                saga_id=r.saga_id,
                status=r.status,
                reason=r.reason,
                started_at=_time(r.started_at_ms),
                last_message_at=_time(r.last_message_ms),
                messages=r.messages,
                hop=r.hop,
                stamp=stamp_from_json(r.stamp),
            )
            for r in rows
        ]


NOT_TERMINAL = tuple(s.value for s in SagaStatus if not s.is_terminal)
"""Statuses of sagas that can still move."""


def _suspension(merged: Stamp, incoming: Stamp, message: ObservedMessage) -> Stamp:
    """Where the saga is suspended, as ``SagaSuspended`` and ``SagaResumed`` tell it.

    A service's suspension is its own record, which merging leaves out; the
    log follows the announcements instead.
    """
    held = merged.suspension
    if message.event_type == SAGA_SUSPENDED and incoming.suspension is not None and held is None:
        return replace(merged, suspension=incoming.suspension)
    if message.event_type == SAGA_RESUMED and held is not None and held.service == message.service:
        return replace(merged, suspension=None)
    return merged

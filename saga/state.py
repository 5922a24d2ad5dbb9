"""Each service's view of the sagas it takes part in.

Every message of a saga carries a stamp, but stamps travel along different
paths (a late event may carry an older picture). Each service therefore keeps
one row per saga, its *view*: the merge of every stamp it has seen. A saga is
(name, id): two sagas of different names may share an id (``place_order`` and
``cancel_order`` of order 7), and each has its own view. Merging
is order-independent and never goes back: a status only moves forward
(running < compensating < compensated / failed; completed is final), step
records accumulate, and the deadline is the latest one seen (see :func:`merge`).
That is what keeps a late event from resurrecting a saga that its deadline
already sent into compensation.

The view is read and written inside the handler's transaction, locked
(``FOR UPDATE`` on PostgreSQL; SQLite transactions hold the write lock).

Views of terminal sagas (completed, compensated, failed) are purged once they
have not changed for the service's retention (:meth:`SagaStates.purge`), so
that the table holds the sagas of the last weeks, not of every year. Running,
compensating and suspended sagas are never purged (a suspended saga is not
terminal: see ``Stamp.suspended``). Each purge statement deletes a bounded
batch chosen through the ``(status, updated_at_ms)`` index: the oldest
views of each terminal status, read in index order and no further than the
batch, so a round costs its batch whatever the table holds. Why the
retention must cover the inbox's is told in ``ServiceSettings.saga_retention``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from hashlib import blake2b

from sqlalchemy import (
    BigInteger,
    Column,
    Index,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    bindparam,
    delete,
    func,
    literal_column,
    select,
    true,
    tuple_,
    union_all,
)
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from outbox import Transaction
from outbox.database import db_now_ms, read_connection, translate_db_error, upsert_insert
from outbox.tables import validate_identifier
from saga.codec import AvroCodec
from saga.errors import ConfigurationError
from saga.stamp import STAMP_SCHEMA, SagaStatus, Stamp, StepOutcome

__all__ = ["TERMINAL_STATUSES", "SagaStates", "SagaView", "merge"]

# Once compensation began, a completion reported later is a late step to undo:
# COMPENSATING outranks COMPLETED.
_RANK = {
    SagaStatus.RUNNING: 0,
    SagaStatus.COMPLETED: 1,
    SagaStatus.COMPENSATING: 2,
    SagaStatus.COMPENSATED: 3,
    SagaStatus.FAILED: 4,
}

TERMINAL_STATUSES = tuple(status for status in SagaStatus if status.is_terminal)
"""Statuses whose views :meth:`SagaStates.purge` may delete."""


@dataclass(frozen=True, kw_only=True)
class SagaView:
    """A service's merged view of one saga."""

    stamp: Stamp
    """Merge of every stamp of the saga this service has seen."""

    ended: SagaStatus | None = None
    """Terminal status for which the end handler already ran, if any."""


def merge(view: Stamp | None, incoming: Stamp) -> Stamp:
    """Merge a stamp into a view: statuses only advance, steps accumulate.

    The merged status is then settled against the steps: a saga said to be
    compensated while a done step is still to undo is compensating, and one
    with a compensation that failed ends failed, whoever reported what.

    The deadline is the latest of the two. Only the initiator sets it, and it
    only ever moves later: when a suspended saga resumes, by as long as it was
    held (``saga.choreography``). So of the deadlines seen, the latest is the
    initiator's most recent one, and taking it is order-independent: a stale
    stamp seen late (a participant's, whose view may still hold the old
    deadline; the superseded deadline message, published when the old
    deadline comes) never moves it back, whichever arrives first.
    """
    if view is None:
        # A suspension is this service's own record of where it stopped: one
        # carried in from another service's view is not ours.
        return settle(replace(incoming, suspension=None))
    # A step is (service, name): another service's step of the same name is
    # another step.
    known = {(s.key, s.outcome) for s in view.steps}
    steps = view.steps + tuple(s for s in incoming.steps if (s.key, s.outcome) not in known)
    ahead = _RANK[incoming.status] > _RANK[view.status]
    status = incoming.status if ahead else view.status
    reason = (incoming.reason or view.reason) if ahead else (view.reason or incoming.reason)
    return settle(
        replace(
            view,
            status=status,
            reason=reason,
            steps=steps,
            deadline=_latest(view.deadline, incoming.deadline),
            version=max(view.version, incoming.version),
            hop=max(view.hop, incoming.hop),
        )
    )


def _latest(one: datetime | None, other: datetime | None) -> datetime | None:
    """The later of two deadlines (``None``: none known)."""
    if one is None or other is None:
        return one or other
    return max(one, other)


def settle(stamp: Stamp) -> Stamp:
    """The status a stamp's steps allow (see :func:`merge`)."""
    status = stamp.status
    if status in (SagaStatus.COMPENSATED, SagaStatus.FAILED) and stamp.to_compensate():
        status = SagaStatus.COMPENSATING
    elif status is SagaStatus.COMPENSATED and any(
        s.outcome is StepOutcome.COMPENSATION_FAILED for s in stamp.steps
    ):
        status = SagaStatus.FAILED
    return stamp if status is stamp.status else replace(stamp, status=status)


def lock_key(saga_name: str, saga_id: str) -> int:
    """The key of the advisory lock of a saga without a view (PostgreSQL).

    64 bits of a hash of (name, id), the whole width of an advisory lock key.
    PostgreSQL's ``hashtext`` gives 32, and among some 77 000 sagas two
    already share a key with even odds: those two would wait for each other,
    and two batches that lock them in opposite orders would deadlock.
    """
    digest = blake2b(f"{saga_name}/{saga_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


class SagaStates:
    """The ``saga_state`` table: one merged stamp per saga (name, id).

    Args:
        metadata: Where to define the table (share the service's metadata).
        codec: Codec holding the stamp schema.
        name: Table name.
    """

    def __init__(
        self, metadata: MetaData, codec: AvroCodec, *, dialect: str, name: str = "saga_state"
    ) -> None:
        validate_identifier("saga state table", name)
        self.codec = codec
        self._dialect = dialect
        self._insert = upsert_insert(dialect)
        existing = metadata.tables.get(name)
        self.table = existing if existing is not None else self._define(metadata, name)
        self._statements()

    @staticmethod
    def _define(metadata: MetaData, name: str) -> Table:
        return Table(
            name,
            metadata,
            Column("saga_id", String(200), nullable=False),
            Column("saga_name", String(100), nullable=False),
            Column("status", String(20), nullable=False),
            Column("version", BigInteger, nullable=False),
            Column("stamp", LargeBinary, nullable=False),
            Column("ended", String(20), nullable=True),
            Column("updated_at_ms", BigInteger, nullable=False),
            PrimaryKeyConstraint("saga_name", "saga_id", name=f"pk_{name}"),
            Index(f"ix_{name}_status", "status", "updated_at_ms"),
            Index(f"ix_{name}_saga_id", "saga_id"),
        )

    def _statements(self) -> None:
        # Built once: these run for every saga message.
        table = self.table
        self._select = select(table.c.stamp, table.c.ended).where(
            table.c.saga_name == bindparam("saga_name"), table.c.saga_id == bindparam("saga_id")
        )
        self._select_for_update = self._select.with_for_update()
        advisory_lock = func.pg_advisory_xact_lock(bindparam("lock_key", type_=BigInteger()))
        self._lock = select(advisory_lock)
        # PostgreSQL: one round trip when the view exists (its row lock is
        # enough), see load().
        view = self._select_for_update.cte("saga_view")
        lock = (
            select(advisory_lock)
            .where(~select(literal_column("1")).select_from(view).exists())
            .cte("saga_lock")
        )
        locked = select(func.count()).select_from(lock).scalar_subquery().label("locked")
        one = select(literal_column("1").label("one")).subquery("one")
        self._select_or_lock = select(view.c.stamp, view.c.ended, locked).select_from(
            one.outerjoin(view, true())
        )
        self._by_id = select(table.c.saga_name, table.c.stamp).where(
            table.c.saga_id == bindparam("saga_id")
        )
        columns = ("status", "version", "stamp", "ended")
        upsert = self._insert(table).values(
            saga_name=bindparam("saga_name"),
            saga_id=bindparam("saga_id"),
            **{name: bindparam(name) for name in columns},
            updated_at_ms=db_now_ms(),
        )
        key = ["saga_name", "saga_id"]
        self._create = upsert.on_conflict_do_nothing(index_elements=key).returning(table.c.saga_id)
        self._upsert = upsert.on_conflict_do_update(
            index_elements=key,
            set_={
                **{name: upsert.excluded[name] for name in columns},
                "updated_at_ms": db_now_ms(),
            },
        )

    async def load(
        self, tx: Transaction, saga_name: str, saga_id: str, *, lock: bool = True
    ) -> SagaView | None:
        """Read the view of saga ``saga_name`` ``saga_id`` inside ``tx``, locked until ``tx`` ends.

        On PostgreSQL, ``FOR UPDATE`` alone locks nothing while the row does
        not exist, and two first messages of a saga must not both insert a
        view. So the locked read takes, in the same statement and only when
        it finds no row, a transaction-scoped advisory lock on the saga, and
        the row is then read again: a view that exists (the usual case) costs
        one round trip, a missing one two, as when the lock always came first.
        The second read must be a statement of its own: a statement sees the
        rows committed when it began, and the lock may have waited for the
        transaction that was inserting the view. Every writer of a view holds
        its row lock, or the advisory lock while there is no row (:meth:`create`
        takes it too). (SQLite transactions already hold the database's write
        lock.)
        """
        key = {"saga_name": saga_name, "saga_id": saga_id}
        if lock and self._dialect == "postgresql":
            found = await tx.execute(
                self._select_or_lock, {**key, "lock_key": lock_key(saga_name, saga_id)}
            )
            first = found.one()
            if not first.locked:
                return self._view(first.stamp, first.ended)
            # There was no view: read again, under the advisory lock.
            query = self._select_for_update
        else:
            query = self._select_for_update if lock else self._select
        row = (await tx.execute(query, key)).first()
        return None if row is None else self._view(row.stamp, row.ended)

    def _view(self, stamp: bytes | None, ended: str | None) -> SagaView | None:
        if stamp is None:
            return None
        return SagaView(
            stamp=self._decode(stamp), ended=None if ended is None else SagaStatus(ended)
        )

    async def create(self, tx: Transaction, stamp: Stamp) -> bool:
        """Insert the first view of a new saga; ``False`` if this saga (name, id) exists.

        On PostgreSQL, under the advisory lock that :meth:`load` takes when
        there is no view. Without it, a message of the saga read while the
        view is inserted would find none (the insert is not committed yet)
        and its save would then overwrite the new view; and a view inserted
        while such a message holds the lock would be overwritten the same way,
        with its starter none the wiser. With it, either waits for the other:
        the message merges into the new view, or the starter finds the
        message's view and is told that the saga exists.
        """
        if self._dialect == "postgresql":
            await tx.execute(self._lock, {"lock_key": lock_key(stamp.saga_name, stamp.saga_id)})
        values = self._values(SagaView(stamp=stamp))
        inserted = await tx.execute(self._create, values)
        return inserted.first() is not None

    def _values(self, view: SagaView) -> dict[str, object]:
        stamp = view.stamp
        return {
            "saga_name": stamp.saga_name,
            "saga_id": stamp.saga_id,
            "status": stamp.status.value,
            "version": stamp.version,
            "stamp": self.codec.encode(STAMP_SCHEMA, stamp.to_avro()),
            "ended": None if view.ended is None else view.ended.value,
        }

    async def save(self, tx: Transaction, view: SagaView) -> None:
        """Insert or replace a saga's view inside ``tx``."""
        await tx.execute(self._upsert, self._values(view))

    async def get(
        self, engine: AsyncEngine, saga_id: str, saga_name: str | None = None
    ) -> Stamp | None:
        """Read a saga's merged stamp outside any transaction.

        Without ``saga_name``, the one saga with this id is meant.

        Raises:
            ConfigurationError: ``saga_name`` is omitted and sagas of several
                names have this id.
        """
        async with read_connection(engine) as conn:
            if saga_name is not None:
                view = await self.load(conn, saga_name, saga_id, lock=False)
                return None if view is None else view.stamp
            rows = (await conn.execute(self._by_id, {"saga_id": saga_id})).all()
        if len(rows) > 1:
            names = ", ".join(sorted(row.saga_name for row in rows))
            raise ConfigurationError(
                f"sagas of several names have id {saga_id!r} ({names}): name the saga"
            )
        return self._decode(rows[0].stamp) if rows else None

    async def all(self, engine: AsyncEngine, saga_name: str | None = None) -> list[Stamp]:
        """Every saga's view (optionally of one saga name), oldest update first."""
        query = select(self.table.c.stamp).order_by(self.table.c.updated_at_ms)
        if saga_name is not None:
            query = query.where(self.table.c.saga_name == saga_name)
        async with read_connection(engine) as conn:
            return [self._decode(raw) for raw in (await conn.execute(query)).scalars()]

    async def stuck(self, engine: AsyncEngine, older_than: timedelta) -> list[Stamp]:
        """Sagas not terminal whose view has not changed for ``older_than``."""
        cutoff = bindparam("cutoff", type_=BigInteger())  # a bound, not a volatile: see purge
        query = select(self.table.c.stamp).where(
            self.table.c.status.in_([SagaStatus.RUNNING.value, SagaStatus.COMPENSATING.value]),
            self.table.c.updated_at_ms < cutoff,
        )
        async with read_connection(engine) as conn:
            now = (await conn.execute(select(db_now_ms()))).scalar_one()
            bound = {"cutoff": now - int(older_than.total_seconds() * 1000)}
            return [self._decode(raw) for raw in (await conn.execute(query, bound)).scalars()]

    async def purge(self, engine: AsyncEngine, older_than: timedelta, limit: int) -> int:
        """Delete up to ``limit`` views of terminal sagas unchanged for ``older_than``.

        Running, compensating and suspended sagas are kept whatever their age.
        Returns how many views were deleted: call again while it returns
        ``limit``.

        Raises:
            outbox.StoreError: The database failed (``kind`` tells an outage).
        """
        table = self.table
        # Read the database clock once: db_now_ms() is volatile, and inside the
        # WHERE clause it would be evaluated per row, which keeps PostgreSQL
        # from using it as an index bound.
        cutoff = bindparam("cutoff", type_=BigInteger())
        # The oldest views of each terminal status, each an ordered range of
        # the (status, updated_at_ms) index that stops after ``limit`` rows:
        # one ordered scan over the three statuses at once would read and sort
        # every old view, and a plain LIMIT leaves the planner free to walk
        # the table.
        terminal = [status.value for status in TERMINAL_STATUSES]
        old = table.c.updated_at_ms < cutoff
        oldest = [
            select(table.c.saga_name, table.c.saga_id)
            .where(table.c.status == status, old)
            .order_by(table.c.updated_at_ms)
            .limit(limit)
            .subquery()
            for status in terminal
        ]
        candidates = union_all(*(select(q.c.saga_name, q.c.saga_id) for q in oldest)).subquery()
        victims = select(candidates.c.saga_name, candidates.c.saga_id).limit(limit)
        key = tuple_(table.c.saga_name, table.c.saga_id)
        # The conditions again on the deleted row itself: a view that a handler
        # changed while the purge waited for its lock is checked anew (READ
        # COMMITTED rechecks the target's own conditions) and kept.
        statement = delete(table).where(key.in_(victims), table.c.status.in_(terminal), old)
        try:
            async with engine.begin() as conn:
                now = (await conn.execute(select(db_now_ms()))).scalar_one()
                bound = {"cutoff": now - int(older_than.total_seconds() * 1000)}
                return int((await conn.execute(statement, bound)).rowcount)
        except SQLAlchemyError as exc:
            raise translate_db_error(exc, "could not purge the saga views") from exc

    def decode(self, raw: bytes) -> Stamp:
        """A stamp as stored in the ``stamp`` column."""
        return self._decode(raw)

    def _decode(self, raw: bytes) -> Stamp:
        _, record = self.codec.decode(raw, expected=STAMP_SCHEMA)
        return Stamp.from_avro(record)

"""Outbox storage: the store contract and its SQL implementation.

Writers add rows inside their own transaction (the caller's ``AsyncSession`` or
``AsyncConnection``): no second connection, no dual write. The relay then
reads rows that are committed, due and not parked, in id order, publishes them
and marks them in one statement.

There is no id high-water mark anywhere: a row is pending until it is marked,
so a transaction that took a lower id but committed later is simply picked up
by the next read, and SQLite's reuse of row ids cannot hide a row. Rows are
marked by ``(id, message_id)`` so that a reused id can never mark the wrong row.

Rows of one key are published in id order. On PostgreSQL ids are handed out
when rows are inserted, not when they commit: two transactions that write the
same key concurrently are ordered by their inserts. Writers that need a key's
order to follow their commits must serialise on the key (the saga runtime
does: it locks the saga's row first).
"""

from __future__ import annotations

import asyncio
import contextlib
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    BigInteger,
    Integer,
    String,
    Text,
    all_,
    and_,
    any_,
    bindparam,
    cast,
    delete,
    exists,
    func,
    insert,
    or_,
    select,
    text,
    tuple_,
    union_all,
    update,
)
from sqlalchemy import event as sa_event
from sqlalchemy.dialects.postgresql import ARRAY, INT8RANGE
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession
from sqlalchemy.types import NullType

from outbox.database import db_now_ms, read_connection, require_configured, translate_db_error
from outbox.errors import ConfigurationError
from outbox.lease import ShardLeases, check_shard_count
from outbox.message import (
    OutboxMessage,
    ParkedMessage,
    StoredMessage,
    decode_headers,
    encode_headers,
    shard_of,
    stored_messages,
)
from outbox.notify import PostgresCommitListener
from outbox.tables import OutboxTables, check_tables

__all__ = ["LeaseFence", "OutboxStats", "OutboxStore", "SqlOutboxStore", "Transaction"]

MAX_SHARDS = 4096
"""Most key-hash shards an outbox may be spread over (``SqlOutboxStore(shards=...)``)."""

_ASYNC_COMMIT = text("(SELECT set_config('synchronous_commit', 'off', true)) IS NOT NULL")
"""A condition of the relay's marks on PostgreSQL: see :meth:`SqlOutboxStore.mark_published`."""


def _array_param(name: str, item_type: Any) -> Any:
    """A PostgreSQL array parameter, bound as one array literal such as ``{1,2,3}``.

    psycopg dumps a Python list element by element in Python; the relay binds
    thousands of ids per round (a batch and the rows in flight), and building
    the literal with one ``join`` costs a fraction of that. The parameter is
    left untyped (psycopg sends a ``str`` as "unknown"), so that PostgreSQL
    types it as the array while it parses the statement and reads the literal
    once. A literal bound as ``varchar`` and cast to the array is not folded
    at planning: the read ahead then parsed it for every row it looked at
    (645 ms for a 2,000-row read).
    """
    return cast(bindparam(name, type_=NullType()), ARRAY(item_type))


def _int_array(values: Iterable[int]) -> str:
    """The PostgreSQL array literal of integers ``values`` (see :func:`_array_param`)."""
    return "{" + ",".join(map(str, values)) + "}"


def _text_array(values: Sequence[str]) -> str:
    """The PostgreSQL array literal of strings ``values``, each quoted (see :func:`_array_param`).

    PostgreSQL text cannot hold NUL, so NUL joins the elements while quotes and
    backslashes are escaped in one pass over the whole text.
    """
    if not values:
        return "{}"
    joined = "\0".join(values)
    if '"' in joined or "\\" in joined:
        joined = joined.replace("\\", "\\\\").replace('"', '\\"')
    return '{"' + joined.replace("\0", '","') + '"}'


_MAX_RANGES = 16
"""Most id ranges the relay's read ahead leaves out as ranges (more: as an array of ids)."""

_LARGEST_ID = 2**63 - 1
"""The largest bigint, the last id a PostgreSQL outbox hands out."""


def _id_ranges(ids: list[int]) -> str | None:
    """The ``int8range[]`` literal of ``ids`` as runs of consecutive ids, or None if too many.

    Sorts ``ids`` in place. None as well when a run ends at the largest
    bigint: PostgreSQL stores ``[a,b]`` as ``[a,b+1)``, which is out of range.
    """
    if not ids:
        return "{}"
    ids.sort()
    if ids[-1] >= _LARGEST_ID:
        return None
    ranges: list[str] = []
    start = previous = ids[0]
    for id_ in ids:
        if id_ > previous + 1:
            if len(ranges) == _MAX_RANGES - 1:
                return None
            ranges.append(f'"[{start},{previous}]"')
            start = id_
        previous = id_
    ranges.append(f'"[{start},{previous}]"')
    return "{" + ",".join(ranges) + "}"


_CONVERT_ROWS = 50
"""Rows :meth:`SqlOutboxStore.fetch_due` turns into messages at a time."""


Transaction = AsyncSession | AsyncConnection
"""The caller's open transaction: an ``AsyncSession`` or an ``AsyncConnection``."""

NOTIFY_LATER = "outbox.notify_later"
"""Key of ``tx.info``: when true, :meth:`SqlOutboxStore.add` leaves the PostgreSQL
wake-up (``pg_notify``) to the caller, who sends it once with
:meth:`SqlOutboxStore.notify` before committing (a batch of many adds in one
transaction then pays one round trip instead of one per add)."""

WRITE_LATER = "outbox.write_later"
"""Key of ``tx.info``: a list to which :meth:`SqlOutboxStore.add` appends the
messages instead of writing them; whoever set it writes them, in the order
they were added, with :meth:`SqlOutboxStore.write_deferred` before committing (a
batch of many adds in one transaction then pays one statement). Every add on
``tx`` is deferred, the caller's own included (``Service.publish`` from a
handler): outbox ids, which order a key's messages, then follow the order of
the adds."""


@dataclass(frozen=True, kw_only=True)
class OutboxStats:
    """Row counts of an outbox, for monitoring."""

    pending: int
    """Rows due for publishing now (parked and scheduled rows excluded)."""

    scheduled: int
    """Rows waiting for their due time."""

    parked: int
    """Rows the relay gave up on; see :meth:`OutboxStore.parked`."""

    published: int
    """Published rows not yet removed by cleanup."""


@dataclass(frozen=True, kw_only=True)
class LeaseFence:
    """The shard leases a relay held when it read a batch: its name and their epochs."""

    owner: str
    """Name of the relay."""

    epochs: Mapping[int, int]
    """Epoch (fencing token) of each shard it held."""


class OutboxStore(ABC):
    """Where outgoing messages wait until the relay has published them."""

    shards: int
    """Number of key-hash shards rows are spread over."""

    @abstractmethod
    async def add(self, tx: Transaction, messages: Iterable[OutboxMessage]) -> None:
        """Add messages inside the caller's open transaction ``tx``."""

    @abstractmethod
    async def fetch_due(
        self, shards: Collection[int], limit: int, *, exclude: Collection[int] = ()
    ) -> list[StoredMessage]:
        """Return up to ``limit`` committed, due, unparked rows of ``shards`` in id order.

        A row with an earlier parked row of the same topic and key is held
        back, so that a key's messages on a topic are never published out of
        order; other topics and keys go on. Rows whose id is in ``exclude``
        are skipped: the relay passes the rows it is still publishing or
        marking when it reads the next batch ahead.
        """

    @abstractmethod
    async def next_due_in(self, shards: Collection[int]) -> timedelta | None:
        """Time until the next scheduled row of ``shards`` is due, if there is one."""

    @abstractmethod
    async def mark_published(
        self,
        messages: Sequence[StoredMessage],
        *,
        fence: LeaseFence | None = None,
        delete: bool = False,
    ) -> int:
        """Mark rows as published in one statement; return how many were marked.

        With ``fence``, only rows of shards whose lease still names
        ``fence.owner`` with the same epoch are marked: a relay that lost a
        shard to another (and may have been overtaken by it) marks nothing
        of that shard.

        With ``delete``, the rows are deleted instead of kept as published
        (a relay whose ``RelaySettings.retention`` is zero): the same rows,
        the same fence, the same count.
        """

    def fence(self, owner: str) -> LeaseFence | None:
        """The leases ``owner`` holds now (as of its last claim), to fence its marks with."""
        return None

    @abstractmethod
    async def record_failure(self, message: StoredMessage, error: str, *, park: bool) -> None:
        """Count a failed attempt; ``park`` sets the row aside until retried."""

    @abstractmethod
    async def parked(self, limit: int = 100) -> list[ParkedMessage]:
        """Return parked rows, oldest first."""

    @abstractmethod
    async def retry_parked(self, message_ids: Collection[str] | None = None) -> int:
        """Unpark rows (all of them, or those ids) so the relay tries again."""

    @abstractmethod
    async def discard_parked(self, message_ids: Collection[str]) -> int:
        """Delete these parked rows for good; return how many were deleted.

        Only parked rows are deleted: an id that names a pending or
        published row (or nothing) is ignored. The rows held back behind a
        discarded row go on.
        """

    @abstractmethod
    async def purge_published(self, older_than: timedelta, limit: int) -> int:
        """Delete up to ``limit`` rows published more than ``older_than`` ago."""

    @abstractmethod
    async def stats(self) -> OutboxStats:
        """Count pending, parked and published rows."""

    @abstractmethod
    async def claim_shards(
        self, owner: str, ttl: timedelta, *, rebalance: bool = True
    ) -> frozenset[int]:
        """Renew ``owner``'s shard leases (and rebalance); return the shards it holds."""

    @abstractmethod
    async def release_shards(self, owner: str) -> None:
        """Give back every shard ``owner`` holds."""

    @abstractmethod
    def on_commit(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` after a transaction in this process that added rows commits."""

    async def check_ready(self) -> None:  # noqa: B027 - optional hook
        """Refuse, at start, a store that cannot work (a missing database or table).

        Raises:
            ConfigurationError: A misconfiguration that waiting will not fix.
            StoreError: The database could not be reached (see ``kind``).
        """

    async def watch_commits(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` whenever rows may have been committed; run until cancelled.

        The default only hears commits made in this process; stores whose
        database announces commits to other processes (PostgreSQL NOTIFY)
        hear those too. It is a latency hint, never needed for correctness.
        """
        self.on_commit(callback)
        await asyncio.Future()


class SqlOutboxStore(OutboxStore):
    """Outbox on PostgreSQL or SQLite through SQLAlchemy Core.

    Args:
        engine: Engine the relay reads with (writers use their own transaction).
        tables: The table definitions.
        shards: Number of key-hash shards; fixed for the life of the table.
    """

    def __init__(self, engine: AsyncEngine, tables: OutboxTables, *, shards: int = 16) -> None:
        if not isinstance(shards, int) or not 1 <= shards <= MAX_SHARDS:
            raise ConfigurationError(f"shards must be between 1 and {MAX_SHARDS}")
        self.engine = engine
        self.tables = tables
        self.shards = shards
        self.dialect = require_configured(engine)
        self._callbacks: list[Callable[[], None]] = []
        self._leases: dict[str, ShardLeases] = {}
        self._shards_checked = False
        self._autocommit = (
            engine.execution_options(isolation_level="AUTOCOMMIT")
            if self.dialect == "postgresql"
            else None
        )
        self._added_key = f"outbox-added-{id(self):x}"
        self._committed_key = f"outbox-committed-{id(self):x}"
        t = tables.outbox
        self._insert = insert(t).values(
            created_at_ms=db_now_ms(),
            due_at_ms=func.coalesce(
                db_now_ms() + bindparam("delay_ms", type_=BigInteger()),
                bindparam("due_abs_ms", type_=BigInteger()),
            ),
            attempts=0,
        )
        # On PostgreSQL the wake-up of a lone row rides on its insert (RETURNING
        # pg_notify): no round trip of its own. Many rows take a statement of
        # their own: RETURNING would call pg_notify and return a row for each
        # (PostgreSQL would still deliver one notification per transaction).
        self._wake = select(func.pg_notify(tables.notify_channel, ""))
        self._insert_and_notify = self._insert.returning(func.pg_notify(tables.notify_channel, ""))
        # Rows are identified by id AND message id (a message id names one
        # row): SQLite reuses the ids of deleted rows, and PostgreSQL hands an
        # id out again after TRUNCATE ... RESTART IDENTITY, a sequence reset
        # or a table re-created while a relay has a batch in flight; by id
        # alone, its mark would then mark (or delete) new rows it never
        # published. PostgreSQL gets arrays, so the statement text is the
        # same for every batch size.
        if self.dialect == "postgresql":
            match: list[Any] = [
                t.c.id == any_(_array_param("ids", BigInteger())),
                t.c.message_id == any_(_array_param("message_ids", String())),
                _ASYNC_COMMIT,
            ]
        else:
            match = [
                t.c.id.in_(bindparam("ids", expanding=True)),
                t.c.message_id.in_(bindparam("message_ids", expanding=True)),
            ]
        self._mark = (
            update(t)
            .where(*match, t.c.published_at_ms.is_(None))
            .values(published_at_ms=db_now_ms())
        )
        # Deleting instead of marking (retention zero): a published row then
        # leaves no new row version behind. The mark writes a whole new
        # version of the row (value and headers included) and an entry in
        # two indexes, since its published_at_ms is in the partial indexes'
        # conditions; a delete only flags the version it removes, and costs
        # PostgreSQL a fraction of the mark.
        self._delete = delete(t).where(*match, t.c.published_at_ms.is_(None))
        # The fenced mark checks the lease inside the same statement: the
        # shard must still be leased to this relay under the epoch it held
        # when it read the batch.
        leases = tables.leases
        owner = leases.c.owner == bindparam("owner", type_=String())
        epochs = tuple_(leases.c.shard, leases.c.epoch).in_(bindparam("fences", expanding=True))
        held: Any
        if self.dialect == "postgresql":
            # The shards still held, as one array computed once for the
            # statement. As a join, PostgreSQL expected almost no rows from
            # "id and message id in the batch" and rescanned the batch's ids
            # once per lease row: 16 index scans, 45 ms instead of 15 for
            # 2,000 rows.
            still_held = select(func.array_agg(leases.c.shard)).where(owner, epochs)
            held = t.c.shard == any_(cast(still_held.scalar_subquery(), ARRAY(t.c.shard.type)))
        else:
            held = exists().where(leases.c.shard == t.c.shard, owner, epochs)
        self._mark_fenced = (
            update(t)
            .where(*match, t.c.published_at_ms.is_(None), held)
            .values(published_at_ms=db_now_ms())
        )
        self._delete_fenced = delete(t).where(*match, t.c.published_at_ms.is_(None), held)
        self._relay_queries()

    # -- writing --------------------------------------------------------------

    async def add(self, tx: Transaction, messages: Iterable[OutboxMessage]) -> None:
        later = tx.info.get(WRITE_LATER)
        if later is not None:
            later.extend(messages)
            return
        await self._write(tx, messages)

    async def write_deferred(self, tx: Transaction, *, notify: bool = False) -> None:
        """Write the messages added to ``tx`` so far (see :data:`WRITE_LATER`), in one statement.

        Adds made after it are written at once. With ``notify``, the relays are
        woken as :meth:`notify` would (in the same statement when it writes one
        row).
        """
        wrote = await self._write(tx, tx.info.pop(WRITE_LATER, None) or [], notify=notify)
        if notify and not wrote:
            await self.notify(tx)

    async def _write(
        self, tx: Transaction, messages: Iterable[OutboxMessage], *, notify: bool | None = None
    ) -> bool:
        """Insert ``messages``; return whether there were any. ``notify=None``: unless
        :data:`NOTIFY_LATER` says the caller will."""
        rows = [self._row(m) for m in messages]
        if not rows:
            return False
        if notify is None:
            notify = not tx.info.get(NOTIFY_LATER)
        try:
            if not self._shards_checked:
                tables = self.tables
                self._shards_checked = await check_shard_count(tx, tables.leases, self.shards)
            if notify and self.dialect == "postgresql" and len(rows) == 1:
                await tx.execute(self._insert_and_notify, rows)
            else:
                await tx.execute(self._insert, rows)
                if notify and self.dialect == "postgresql":
                    await tx.execute(self._wake)
        except SQLAlchemyError as exc:
            raise translate_db_error(exc, "could not add outbox rows") from exc
        if self._callbacks:
            self._after_commit(tx)
        return True

    async def notify(self, tx: Transaction) -> None:
        """Wake the relays listening on PostgreSQL once ``tx`` commits (see :data:`NOTIFY_LATER`).

        Send it outside any savepoint that may still roll back: a rolled-back
        savepoint discards its notifications.
        """
        if self.dialect != "postgresql":
            return
        try:
            await tx.execute(self._wake)
        except SQLAlchemyError as exc:
            raise translate_db_error(exc, "could not notify the relays") from exc

    def _row(self, message: OutboxMessage) -> dict[str, Any]:
        delay_ms = None
        due_abs_ms = None
        if message.delay is not None:
            delay_ms = int(message.delay.total_seconds() * 1000)
        elif message.deliver_at is not None:
            due_abs_ms = int(message.deliver_at.timestamp() * 1000)
        return {
            "message_id": message.message_id,
            "topic": message.topic,
            "key": message.key,
            "value": message.value,
            "headers": encode_headers(message.headers),
            "shard": shard_of(message.key, message.message_id, self.shards),
            "delay_ms": delay_ms,
            "due_abs_ms": due_abs_ms,
        }

    async def check_ready(self) -> None:
        self._require_psycopg()
        t = self.tables
        await check_tables(self.engine, [t.outbox, t.leases, t.relays])

    def _require_psycopg(self) -> None:
        """Refuse a PostgreSQL engine of another driver: the relay's statements need psycopg 3.

        They bind id arrays as literals and turn off psycopg's prepared
        statements (see :meth:`_relay_statement`); another driver accepts
        the engine, and the writes, and fails the relay's first read.
        """
        driver = self.engine.dialect.driver
        if self.dialect == "postgresql" and driver != "psycopg":
            raise ConfigurationError(
                f"the outbox relay reads PostgreSQL through psycopg 3, not {driver}: create "
                "the engine with outbox.create_engine(url) or a postgresql+psycopg:// URL"
            )

    def on_commit(self, callback: Callable[[], None]) -> None:
        if callback not in self._callbacks:
            self._callbacks.append(callback)

    async def watch_commits(self, callback: Callable[[], None]) -> None:
        self.on_commit(callback)
        try:
            if self.dialect != "postgresql":
                await asyncio.Future()
            listener = PostgresCommitListener(self.engine.url, self.tables.notify_channel, callback)
            await listener.run()
        finally:
            self._callbacks.remove(callback)

    async def claim_shards(
        self, owner: str, ttl: timedelta, *, rebalance: bool = True
    ) -> frozenset[int]:
        leases = self._leases.get(owner)
        if leases is None or leases.ttl != ttl:
            leases = ShardLeases(self.engine, self.tables, shards=self.shards, owner=owner, ttl=ttl)
            self._leases[owner] = leases
        return await leases.claim(rebalance=rebalance)

    async def release_shards(self, owner: str) -> None:
        leases = self._leases.pop(owner, None)
        if leases is not None:
            await leases.release()

    def _notify(self, *_args: Any) -> None:
        for callback in self._callbacks:
            callback()

    def _after_commit(self, tx: Transaction) -> None:
        if isinstance(tx, AsyncSession):
            session = tx.sync_session
            if not sa_event.contains(session, "after_commit", self._notify):
                sa_event.listen(session, "after_commit", self._notify)
            return
        conn = tx.sync_connection
        if conn is None:
            return
        # Core has no "after commit" event: the "commit" event fires before the
        # database commits. Remember that rows were added; announce them once
        # the connection begins its next transaction or goes back to the pool,
        # which can only happen after the commit completed.
        conn.info[self._added_key] = True
        engine = conn.engine
        if not sa_event.contains(engine, "commit", self._on_engine_commit):
            sa_event.listen(engine, "commit", self._on_engine_commit)
            sa_event.listen(engine, "rollback", self._on_engine_rollback)
            sa_event.listen(engine, "begin", self._on_engine_begin)
            sa_event.listen(engine.pool, "checkin", self._on_checkin)

    def _on_engine_commit(self, conn: Any) -> None:
        if conn.info.pop(self._added_key, False):
            conn.info[self._committed_key] = True

    def _on_engine_rollback(self, conn: Any) -> None:
        conn.info.pop(self._added_key, None)
        conn.info.pop(self._committed_key, None)

    def _on_engine_begin(self, conn: Any) -> None:
        if conn.info.pop(self._committed_key, False):
            self._notify()

    def _on_checkin(self, _dbapi_connection: Any, record: Any) -> None:
        if record is not None and record.info.pop(self._committed_key, False):
            self._notify()

    # -- relaying -------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _begin(self, what: str) -> AsyncIterator[AsyncConnection]:
        try:
            async with self.engine.begin() as conn:
                yield conn
        except SQLAlchemyError as exc:
            raise translate_db_error(exc, what) from exc

    @contextlib.asynccontextmanager
    async def _read(self, what: str) -> AsyncIterator[AsyncConnection]:
        """A transaction that only reads: on SQLite, without the write lock (see
        :func:`~outbox.database.read_connection`)."""
        try:
            async with read_connection(self.engine) as conn:
                yield conn
        except SQLAlchemyError as exc:
            raise translate_db_error(exc, what) from exc

    @contextlib.asynccontextmanager
    async def _relay_statement(self, what: str) -> AsyncIterator[AsyncConnection]:
        """A connection for one of the relay's own statements, each atomic by itself.

        On PostgreSQL: in autocommit, and never prepared by psycopg. A
        transaction cost a BEGIN and a COMMIT round trip around the statement,
        and keeping PostgreSQL off a generic plan (see :meth:`fetch_due`) one
        more; unprepared, the statement is planned for its parameters every
        time, and a round trip to PostgreSQL costs the relay as much CPU as a
        hundred rows. SQLite: a transaction, as elsewhere.
        """
        if self._autocommit is None:
            async with self._begin(what) as conn:
                yield conn
            return
        self._require_psycopg()
        try:
            async with self._autocommit.connect() as conn:
                driver: Any = (await conn.get_raw_connection()).driver_connection
                threshold = driver.prepare_threshold
                driver.prepare_threshold = None
                try:
                    yield conn
                finally:
                    driver.prepare_threshold = threshold
        except SQLAlchemyError as exc:
            raise translate_db_error(exc, what) from exc

    def _pending(self) -> Any:
        t = self.tables.outbox
        return and_(t.c.published_at_ms.is_(None), t.c.parked_at_ms.is_(None))

    def _held_back(self) -> Any:
        """Rows with an earlier parked row of the same topic and key (kept back for order)."""
        t = self.tables.outbox
        earlier = t.alias("earlier")
        return exists().where(
            earlier.c.parked_at_ms.is_not(None),
            earlier.c.published_at_ms.is_(None),
            earlier.c.key == t.c.key,
            earlier.c.topic == t.c.topic,
            earlier.c.id < t.c.id,
        )

    def _relay_queries(self) -> None:
        # Built once: the relay runs them constantly, and a prebuilt statement
        # skips SQLAlchemy's per-call construction and cache-key work.
        t = self.tables.outbox
        shards = self._shards_param()
        # Rows the relay still has in flight (read ahead while publishing).
        # PostgreSQL gets them as id ranges when they form few (a relay that
        # holds every shard reads runs of consecutive ids: a handful of
        # ranges instead of a thousand ids to send, parse and hash, and half
        # the fetch's time in PostgreSQL), otherwise as an array; either way
        # the statement's text does not depend on how many there are.
        if self.dialect == "postgresql":
            self._fetch = self._fetch_statement(
                t.c.id != all_(_array_param("exclude", BigInteger()))
            )
            # The id as bigint: an outbox made by a migration of the
            # application's own may have an integer id, and PostgreSQL has no
            # integer <@ int8range (for a bigint id the cast is no work).
            in_ranges = cast(t.c.id, BigInteger()).op("<@", is_comparison=True)(
                any_(_array_param("exclude", INT8RANGE()))
            )
            self._fetch_ranges = self._fetch_statement(~in_ranges)
        else:
            self._fetch = self._fetch_statement(t.c.id.not_in(bindparam("exclude", expanding=True)))
            self._fetch_ranges = None
        self._next_due = select(func.min(t.c.due_at_ms) - db_now_ms()).where(
            shards,
            self._pending(),
            t.c.due_at_ms.is_not(None),
            ~self._held_back(),
        )

    def _shards_param(self) -> Any:
        """The relay's "row of one of these shards" condition, parameter ``shards``.

        PostgreSQL gets an array (see :func:`_shards_value`): an expanding
        ``IN`` is rendered again by SQLAlchemy on every execution, a
        measurable share of a relay's CPU for a lone row.
        """
        shard = self.tables.outbox.c.shard
        if self.dialect == "postgresql":
            return shard == any_(_array_param("shards", shard.type))
        return shard.in_(bindparam("shards", expanding=True))

    def _shards_value(self, shards: Collection[int]) -> Any:
        """The ``shards`` parameter of :meth:`_shards_param`."""
        ordered = sorted(shards)
        return _int_array(ordered) if self.dialect == "postgresql" else ordered

    def _fetch_statement(self, not_in_flight: Any) -> Any:
        """The relay's read of due rows, leaving out those ``not_in_flight`` refuses."""
        t = self.tables.outbox
        shards = self._shards_param()
        limit = bindparam("limit", type_=Integer())
        columns = (
            t.c.id,
            t.c.message_id,
            t.c.topic,
            t.c.key,
            t.c.value,
            # As text: decoded for the whole batch at once (see stored_messages).
            cast(t.c.headers, Text).label("headers"),
            t.c.shard,
            t.c.attempts,
        )
        # Two halves, each served by its own partial index (see OutboxTables):
        # ready rows in id order, and scheduled rows by due time up to now. A
        # single "ready, or due by now" walk in id order would read past every
        # row scheduled for later, and a busy saga service keeps many. The
        # scheduled half is an index range up to now, walked in due order.
        # "Now" is a scalar subquery, evaluated once: PostgreSQL's clock is
        # volatile, and a volatile bound is checked on every row instead of
        # ending the range. No planner can estimate how many rows are due by
        # now, so only the due order keeps PostgreSQL on that index. When
        # more rows are due than a batch holds, the earliest due go first; a
        # batch is always in id order.
        ready = (
            select(*columns)
            .where(
                shards,
                self._pending(),
                t.c.due_at_ms.is_(None),
                not_in_flight,
                ~self._held_back(),
            )
            .order_by(t.c.id)
            .limit(limit)
            .subquery("ready")
        )
        due = (
            select(*columns)
            .where(
                shards,
                self._pending(),
                t.c.due_at_ms.is_not(None),
                t.c.due_at_ms <= select(db_now_ms()).scalar_subquery(),
                not_in_flight,
                ~self._held_back(),
            )
            .order_by(t.c.due_at_ms, t.c.id)
            .limit(limit)
            .subquery("due")
        )
        both = union_all(select(ready), select(due)).subquery("fetch")
        return select(both).order_by(both.c.id).limit(limit)

    async def fetch_due(
        self, shards: Collection[int], limit: int, *, exclude: Collection[int] = ()
    ) -> list[StoredMessage]:
        if not shards:
            return []
        statement = self._fetch
        in_flight: Any = list(exclude)
        if self.dialect == "postgresql":
            ranges = _id_ranges(in_flight)
            if ranges is None:
                in_flight = _int_array(in_flight)
            else:
                in_flight = ranges
                statement = self._fetch_ranges
        params = {"shards": self._shards_value(shards), "limit": limit, "exclude": in_flight}
        # Unprepared (see _relay_statement): psycopg prepares a statement run
        # often, and PostgreSQL may then switch to a generic plan, one that
        # knows neither the limit nor the rows left out and compares every row
        # with each of those. Planning the fetch each time costs well under a
        # millisecond.
        async with self._relay_statement("could not read the outbox") as conn:
            result = await conn.execute(statement, params)
            # In slices, so that few rows and decoded headers are alive at once
            # whenever the allocations set off a garbage collection (see
            # stored_messages).
            messages: list[StoredMessage] = []
            for rows in result.partitions(_CONVERT_ROWS):
                messages += stored_messages(rows)
            return messages

    async def next_due_in(self, shards: Collection[int]) -> timedelta | None:
        if not shards:
            return None
        async with self._relay_statement("could not read the outbox") as conn:
            millis = (
                await conn.execute(self._next_due, {"shards": self._shards_value(shards)})
            ).scalar()
        if millis is None:
            return None
        return timedelta(milliseconds=max(int(millis), 0))

    async def mark_published(
        self,
        messages: Sequence[StoredMessage],
        *,
        fence: LeaseFence | None = None,
        delete: bool = False,
    ) -> int:
        if not messages:
            return 0
        ids = [m.id for m in messages]
        message_ids = [m.message_id for m in messages]
        params: dict[str, Any]
        if self.dialect == "postgresql":
            params = {"ids": _int_array(ids), "message_ids": _text_array(message_ids)}
        else:
            params = {"ids": ids, "message_ids": message_ids}
        statement = self._delete if delete else self._mark
        if fence is not None:
            fences = sorted(fence.epochs.items())
            if not fences:
                return 0
            statement = self._delete_fenced if delete else self._mark_fenced
            params.update(owner=fence.owner, fences=fences)
        # On PostgreSQL the statement commits without waiting for the WAL
        # flush (_ASYNC_COMMIT: set for the statement's own transaction, before
        # it touches a row): a mark lost to a database crash only makes the
        # relay publish those rows again (at-least-once allows it), and on a
        # busy server that wait was most of the mark's time. Planned for its
        # own parameters (see _relay_statement), "message id in the batch"
        # stays a hash lookup.
        async with self._relay_statement("could not mark outbox rows as published") as conn:
            result = await conn.execute(statement, params)
            return int(result.rowcount)

    def fence(self, owner: str) -> LeaseFence | None:
        leases = self._leases.get(owner)
        return LeaseFence(owner=owner, epochs=dict(leases.epochs if leases else {}))

    async def record_failure(self, message: StoredMessage, error: str, *, park: bool) -> None:
        t = self.tables.outbox
        values: dict[str, Any] = {"attempts": t.c.attempts + 1, "last_error": error[:4000]}
        if park:
            values["parked_at_ms"] = db_now_ms()
        statement = (
            update(t)
            .where(t.c.id == message.id, t.c.message_id == message.message_id)
            .values(**values)
        )
        async with self._begin("could not record a publish failure") as conn:
            await conn.execute(statement)

    async def parked(self, limit: int = 100) -> list[ParkedMessage]:
        t = self.tables.outbox
        query = (
            select(t)
            .where(t.c.parked_at_ms.is_not(None), t.c.published_at_ms.is_(None))
            .order_by(t.c.id)
            .limit(limit)
        )
        async with self._read("could not read parked rows") as conn:
            rows = (await conn.execute(query)).all()
        return [
            ParkedMessage(
                message=_stored(row),
                error=row.last_error or "",
                parked_at=datetime.fromtimestamp(row.parked_at_ms / 1000, tz=UTC),
            )
            for row in rows
        ]

    async def retry_parked(self, message_ids: Collection[str] | None = None) -> int:
        t = self.tables.outbox
        statement = update(t).where(t.c.parked_at_ms.is_not(None), t.c.published_at_ms.is_(None))
        if message_ids is not None:
            if not message_ids:
                return 0
            statement = statement.where(t.c.message_id.in_(list(message_ids)))
        async with self._begin("could not unpark rows") as conn:
            result = await conn.execute(statement.values(parked_at_ms=None, attempts=0))
            return int(result.rowcount)

    async def discard_parked(self, message_ids: Collection[str]) -> int:
        if not message_ids:
            return 0
        t = self.tables.outbox
        statement = delete(t).where(
            t.c.parked_at_ms.is_not(None),
            t.c.published_at_ms.is_(None),
            t.c.message_id.in_(list(message_ids)),
        )
        async with self._begin("could not discard parked rows") as conn:
            result = await conn.execute(statement)
            return int(result.rowcount)

    async def purge_published(self, older_than: timedelta, limit: int) -> int:
        t = self.tables.outbox
        cutoff = db_now_ms() - int(older_than.total_seconds() * 1000)
        victims = (
            select(t.c.id)
            .where(t.c.published_at_ms.is_not(None), t.c.published_at_ms < cutoff)
            .order_by(t.c.published_at_ms)
            .limit(limit)
        )
        statement = delete(t).where(t.c.id.in_(victims.scalar_subquery()))
        async with self._begin("could not purge published rows") as conn:
            result = await conn.execute(statement)
            return int(result.rowcount)

    async def stats(self) -> OutboxStats:
        t = self.tables.outbox
        due = or_(t.c.due_at_ms.is_(None), t.c.due_at_ms <= db_now_ms())
        query = select(
            func.count().filter(self._pending(), due),
            func.count().filter(self._pending(), ~due),
            func.count().filter(t.c.parked_at_ms.is_not(None), t.c.published_at_ms.is_(None)),
            func.count().filter(t.c.published_at_ms.is_not(None)),
        )
        async with self._read("could not count outbox rows") as conn:
            pending, scheduled, parked, published = (await conn.execute(query)).one()
        return OutboxStats(pending=pending, scheduled=scheduled, parked=parked, published=published)


def _stored(row: Any) -> StoredMessage:
    """A stored message from an outbox row."""
    return StoredMessage(
        id=row.id,
        message_id=row.message_id,
        topic=row.topic,
        key=row.key,
        value=row.value,
        headers=decode_headers(row.headers),
        shard=row.shard,
        attempts=row.attempts,
    )

"""The shared transaction of a batch: the records fetched for one partition.

:meth:`saga.processing.Processor.process_batch` runs a partition's records
in one database transaction, each record's work in a savepoint of it (see
:mod:`saga.processing` for what each failure leads to). :class:`Batch`
holds that transaction; :data:`CURRENT` names the batch of the task at hand
(each partition worker is a task), so that the per-record pipeline, called
through its unchanged seam ``Processor.process``, finds it.

The batch also saves each record two round trips: it reads the inbox for
all its records in one statement when its transaction begins
(:meth:`Batch.claim` then answers for each record), and keeps the records'
inbox keys and outbox messages until it commits, to write them in one
statement each (:meth:`Batch.commit`). Every outbox add on the batch's
session or on its connection is kept, a handler's own ``Service.publish``
included (:data:`outbox.store.WRITE_LATER`), so that outbox ids, which order
a key's messages, follow the order of the adds. A record whose savepoint
rolls back takes its deferred rows with it. The inbox write's ``ON CONFLICT
DO NOTHING ... RETURNING`` tells the batch if another transaction recorded
one of its messages since the read (:class:`BatchConflict`).

Each savepoint holds a subtransaction id once it writes. PostgreSQL caches
64 of them per transaction; a batch of more records that write makes the
transaction "overflowed" until it commits, which costs other sessions'
snapshots a lookup in ``pg_subtrans``. Hence the default of 50 records per
batch (``ServiceSettings.batch_max_records``): below the cache, and already
most of the gain of batching (``bench/step_throughput.py``). Batches are
short, so a larger one costs little, but keep it in mind before raising it
into the hundreds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Collection
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, TypeVar

import psycopg
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from outbox import ErrorKind, OutboxMessage, SqlInboxStore, SqlOutboxStore, classify
from outbox.store import NOTIFY_LATER, WRITE_LATER

if TYPE_CHECKING:
    from saga.processing import ServiceStats

__all__ = ["CURRENT", "Batch", "BatchConflict", "BatchGate", "BatchLost"]

log = logging.getLogger(__name__)

T = TypeVar("T")


class BatchLost(Exception):
    """The open transaction of a batch is gone: redo its uncommitted records.

    ``alone``: whether the transaction ran while no other batch of the service
    had one open (see :class:`BatchGate`).
    """

    def __init__(self, error: BaseException, kind: ErrorKind, *, alone: bool = False) -> None:
        super().__init__(str(error))
        self.error = error
        self.kind = kind
        self.alone = alone


class BatchConflict(Exception):
    """Another transaction recorded some of the batch's messages first: redo the batch.

    Only a second consumer of the same partition (one that lost it in a
    rebalance and does not know yet) can do that. The redone batch finds those
    messages recorded, and skips them as duplicates.
    """


InboxKey = tuple[str, str]
"""``(source, message_id)``: a message, as the inbox knows it."""


class BatchGate:
    """Whether a service's batches may hold transactions at the same time.

    Usually they may: each partition's worker opens its batch's transaction
    when it needs one. After a deadlock or a serialization failure the
    service's batches take turns for a while (:meth:`take_turns`): a batch's
    transaction begins only once no other batch of the service has one open,
    and the next waits for it to end. Batches of one process then cannot wait
    for each other in a cycle, and each keeps its records in one transaction.
    Records handled alone (outside a batch) do not take turns.
    """

    def __init__(self) -> None:
        self._turns_until = 0.0
        self._turn = asyncio.Lock()
        self._open = 0
        """Batch transactions open that did not take a turn."""
        self._none_open = asyncio.Event()
        self._none_open.set()

    def taking_turns(self) -> bool:
        """Whether batches take turns now."""
        return asyncio.get_running_loop().time() < self._turns_until

    def take_turns(self, seconds: float) -> None:
        """Batches take turns for ``seconds`` from now."""
        self._turns_until = max(self._turns_until, asyncio.get_running_loop().time() + seconds)

    async def enter(self) -> bool:
        """Wait until a batch may open its transaction; whether it took a turn.

        A batch that takes a turn also waits for the transactions opened before
        batches began to take turns. Should turns end while it waits, it goes
        without one: it does not wait for the batches that began since, which
        need no turn and, overlapping, may never leave none open.
        """
        if self.taking_turns():
            await self._turn.acquire()
            try:
                while self._open and self.taking_turns():
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout_at(self._turns_until):
                            await self._none_open.wait()
            except BaseException:
                self._turn.release()
                raise
            if self.taking_turns():
                return True
            self._turn.release()  # turns ended while it waited
        self._open += 1
        self._none_open.clear()
        return False

    def leave(self, turn: bool) -> None:
        """A batch's transaction ended (``turn``: what :meth:`enter` returned)."""
        if turn:
            self._turn.release()
            return
        self._open -= 1
        if self._open == 0:
            self._none_open.set()


_SAVEPOINT = "SAVEPOINT choreosaga_record"
_ROLLBACK_TO = "ROLLBACK TO SAVEPOINT choreosaga_record"


async def _savepoint_statement(
    connection: AsyncConnection, driver: psycopg.AsyncConnection[Any] | None, statement: str
) -> None:
    """Run ``SAVEPOINT`` or ``ROLLBACK TO`` on the batch's connection.

    Through psycopg itself when the engine uses it: SQLAlchemy's execution path cost
    as much CPU as the round trip itself (a statement per record: 83 against
    36 µs of CPU in a loop of 2,000). A psycopg error is raised as SQLAlchemy
    would have raised it (``DBAPIError``, with ``connection_invalidated`` when
    the connection is gone), so that it is classified the same way. Once
    ``connection`` is closed or invalidated (a handler committed or rolled back
    the session itself, or a disconnect was seen), ``driver`` is no longer the
    batch's: it may be idle in the pool or another session's. The statement
    then goes through SQLAlchemy, which refuses it as it did before.
    """
    if driver is None or connection.closed or connection.invalidated:
        await connection.exec_driver_sql(statement)
        return
    try:
        await driver.execute(statement)
    except psycopg.Error as exc:
        raise DBAPIError.instance(
            statement,
            None,
            exc,
            psycopg.Error,
            connection_invalidated=driver.broken or driver.closed,
        ) from exc


class Batch:
    """The shared transaction of the records of one batch (one per partition worker).

    The transaction opens lazily, when the first record that needs one joins
    it, and a record that must be handled alone ends it (commits the records
    before). ``pending`` holds the counters of the records in the open
    transaction: added to the service's ``stats`` when it commits, forgotten
    if it is lost (the records come again, and are counted then).
    """

    def __init__(
        self,
        engine: AsyncEngine,
        outbox: SqlOutboxStore,
        inbox: SqlInboxStore | None = None,
        consumer: str = "",
        expected: Collection[InboxKey] = (),
        stats: ServiceStats | None = None,
        gate: BatchGate | None = None,
    ) -> None:
        self.engine = engine
        self.gate = gate
        self._entered: bool | None = None
        """What ``gate.enter`` returned for the open transaction (``None``: not entered)."""
        self.stats = stats
        self.outbox = outbox
        self.inbox = inbox
        self.consumer = consumer
        self._expected = set(expected)
        """Inbox keys of the batch's records, read from their headers before they run."""
        self._checked: set[InboxKey] = set()
        """Keys looked up in the inbox in one statement (:meth:`claim` answers for them).

        After a commit, only the keys known to be recorded: the next
        transaction looks the others up again, since a record handled alone
        in between (see ``Processor._leave_batch``) recorded its key outside
        the batch, and a copy of it later in the batch must be found a
        duplicate, not claimed again (a :class:`BatchConflict`)."""
        self._recorded: set[InboxKey] = set()
        """Keys of ``_checked`` in the inbox, or written by a committed transaction of the batch."""
        self._claims: dict[InboxKey, None] = {}
        """Keys claimed in the open transaction, in order: written by :meth:`commit`."""
        self._messages: list[OutboxMessage] = []
        """Outbox messages added in the open transaction, in order: written by :meth:`commit`."""
        self.wrote = False
        """Whether a released savepoint of the open transaction wrote outbox rows."""
        self.session: AsyncSession | None = None
        self.connection: AsyncConnection | None = None
        self._driver: psycopg.AsyncConnection[Any] | None = None
        """The psycopg connection under :attr:`connection` (PostgreSQL through psycopg only)."""
        self._connection_info: dict[Any, Any] | None = None
        self.joinable = False
        """Whether the record in progress may use the batch's transaction."""
        self.pending: dict[str, int] = {}
        self._committed: list[Callable[[], None]] = []

    def after_commit(self, hook: Callable[[], None]) -> None:
        """Call ``hook`` once the record in progress is committed (at once if it is already).

        For what must happen once per record, not once per pass (the
        telemetry's per-record metrics): a batch whose transaction is lost,
        or that rolls back on a conflict (:class:`BatchConflict`), drops its
        hooks, and its records, redone, register them again.
        """
        if self.session is None or not self.joinable:
            hook()
        else:
            self._committed.append(hook)

    @property
    def alone(self) -> bool:
        """Whether the open transaction took its turn: no other batch of the service has one."""
        return bool(self._entered)

    async def join(self) -> AsyncSession:
        if self.session is None:
            if self.gate is not None:
                self._entered = await self.gate.enter()
            session = AsyncSession(self.engine, expire_on_commit=False)
            # One wake-up for the relays per batch, sent before the commit.
            session.info[NOTIFY_LATER] = True
            # Every outbox add of its records (a handler's own Service.publish
            # included) is kept in order and written in one statement at the
            # commit: outbox ids follow the records' order.
            session.info[WRITE_LATER] = self._messages
            try:
                await session.begin()
                self.connection = await session.connection()
                self._driver = None
                if self.connection.dialect.driver == "psycopg":  # PostgreSQL through psycopg 3
                    raw = await self.connection.get_raw_connection()
                    self._driver = raw.driver_connection
                unchecked = self._expected - self._checked
                if unchecked and self.inbox is not None:
                    self._recorded |= await self.inbox.recorded(session, self.consumer, unchecked)
                    self._checked |= unchecked
            except BaseException:
                try:
                    await session.close()
                finally:
                    self._leave_gate()
                raise
            # The same for an add on the session's connection (a handler's
            # ``Service.publish(await ctx.session.connection(), ...)``): it is
            # the same transaction, and a row written at once would take an
            # outbox id ahead of the earlier records' rows. A connection's
            # ``info`` stays with it in the pool: :meth:`_release` takes the
            # key back before the connection goes.
            self._connection_info = self.connection.info
            self._connection_info[WRITE_LATER] = self._messages
            self.session = session
        return self.session

    def _leave_gate(self) -> None:
        entered, self._entered = self._entered, None
        if entered is not None:
            assert self.gate is not None
            self.gate.leave(entered)

    def _release(self) -> None:
        """Stop deferring the adds on the batch's connection (see :meth:`join`)."""
        info, self._connection_info = self._connection_info, None
        if info is not None:
            info.pop(WRITE_LATER, None)

    def claim(self, consumer: str, key: InboxKey) -> bool | None:
        """The inbox's answer for a record of the open transaction, without a statement.

        ``True``: new, recorded in the inbox when the batch commits. ``False``:
        a duplicate (recorded before, or earlier in this batch). ``None``: the
        batch did not look this key up; the caller records it the usual way.
        A concurrent consumer that records a claimed key first is caught when
        the batch writes its claims (:class:`BatchConflict`).
        """
        if consumer != self.consumer or key not in self._checked:
            return None
        if key in self._recorded or key in self._claims:
            return False
        self._claims[key] = None
        return True

    async def savepoint(self, run: Callable[[], Awaitable[T]]) -> T:
        """Run one record's work inside a savepoint of the batch's transaction.

        One plain ``SAVEPOINT`` statement per record, rather than
        ``session.begin_nested()``, whose bookkeeping cost more than the
        statements themselves (measured by ``bench/step_throughput.py``). The
        savepoint is never released: the next record's savepoint of the same
        name nests inside it, ``ROLLBACK TO`` goes back to the latest one, and
        the commit ends them all, one round trip per record less. (A released
        savepoint that wrote keeps its subtransaction id until the commit
        anyway, so nesting costs the server no more.) What the ORM would
        otherwise do for us is done here: the record's pending
        objects are flushed inside its savepoint, and after it, whatever its
        outcome, the identity map is emptied. Each record then starts with an
        empty identity map, as it would in a session of its own: an object an
        earlier record loaded (and that something still references, such as a
        relationship cycle the garbage collector has not freed) would
        otherwise come back from ``session.get`` or a query with the
        attributes that record saw, not the row as it is now (changed since
        by a Core statement, or rolled back), and its next change would
        overwrite the row with them. Every earlier record's objects were
        flushed, so nothing is lost. Should anything leave the session
        unusable (a failed flush), the next statement fails and the batch
        falls back to one transaction per record.
        """
        assert self.session is not None
        assert self.connection is not None
        session, connection = self.session, self.connection
        await _savepoint_statement(connection, self._driver, _SAVEPOINT)
        claims, messages = len(self._claims), len(self._messages)
        try:
            result = await run()
            if session.new or session.dirty or session.deleted:
                await session.flush()
            session.expunge_all()
        except BaseException as exc:
            session.expunge_all()
            # The record's deferred inbox and outbox rows go with its savepoint.
            del self._messages[messages:]
            if len(self._claims) > claims:
                self._claims = dict.fromkeys(list(self._claims)[:claims])
            try:
                await _savepoint_statement(connection, self._driver, _ROLLBACK_TO)
            except Exception as lost:
                # Nothing left to roll back to: the transaction went with its
                # connection (the record's own error says why), or the session
                # gave it up. Either way the batch cannot go on.
                kind = classify(exc)
                if kind is ErrorKind.OUTAGE:
                    raise BatchLost(exc, kind, alone=self.alone) from exc
                raise BatchLost(lost, classify(lost), alone=self.alone) from lost
            raise
        return result

    async def commit(self) -> None:
        """Commit the open transaction (if any); raise :class:`BatchLost` if that fails."""
        session, self.session = self.session, None
        self.connection = self._driver = None
        self._release()
        wrote, self.wrote = self.wrote, False
        hooks, self._committed = self._committed, []
        claims, self._claims = list(self._claims), {}
        self._messages = []
        if session is None:
            self.settle()  # nothing was left uncommitted
            return
        alone = self.alone
        try:
            if claims:
                assert self.inbox is not None
                recorded = await self.inbox.record_many(session, self.consumer, claims)
                if len(recorded) != len(claims):
                    await close_quietly(session)
                    raise BatchConflict(
                        f"{len(claims) - len(recorded)} of the batch's {len(claims)} messages "
                        "were recorded by another transaction first"
                    )
            await self.outbox.write_deferred(session, notify=wrote)
            await session.commit()
        except BatchConflict:
            raise
        except Exception as exc:
            await close_quietly(session)
            raise BatchLost(exc, classify(exc), alone=alone) from exc
        except BaseException:
            # Cancelled while committing: whatever the outcome, the session
            # (no longer the batch's, which ``abandon`` would close) must
            # give its connection back, or it stays checked out in its
            # transaction, holding the batch's locks.
            await close_quietly(session)
            raise
        finally:
            self._leave_gate()
        await session.close()
        self._recorded.update(claims)
        self._checked = set(self._recorded)
        self.settle()
        for hook in hooks:
            hook()

    def settle(self) -> None:
        """Count the records whose work is durable now in the service's stats."""
        if self.stats is not None:
            for name, count in self.pending.items():
                setattr(self.stats, name, getattr(self.stats, name) + count)
        self.pending.clear()

    def take_back(self) -> None:
        """Forget the counters of the records not committed (they come again, and are
        counted then)."""
        self.pending.clear()

    async def abandon(self) -> None:
        session, self.session = self.session, None
        self.connection = self._driver = None
        self._release()
        self.wrote = False
        self._committed = []
        self._claims = {}
        self._messages = []
        try:
            if session is not None:
                await close_quietly(session)
        finally:
            self._leave_gate()  # even if cancelled while closing


async def close_quietly(session: AsyncSession) -> None:
    """Close a session whose transaction failed; its connection may be gone already."""
    try:
        await session.close()
    except Exception as exc:  # the failure that matters is already being handled
        log.debug("closing a failed batch session: %r", exc)


CURRENT: ContextVar[Batch | None] = ContextVar("choreosaga_batch", default=None)
"""The batch the current task's record belongs to (each partition worker is a task)."""

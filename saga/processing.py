"""The per-record pipeline: decode, inbox, handler, outbox, one transaction.

For every record of a subscribed topic:

1. decode the envelope; a record that cannot be decoded (bad input) is
   dead-lettered at once and the partition moves on;
2. open a database transaction and record the message id in the inbox (a
   duplicate ends here, changing nothing);
3. run the handler registered for the event type (for saga topics, the
   choreography decides which: step, compensation, end handler), which
   changes the service's state through ``ctx.session`` and emits events;
4. write the emitted events to the outbox, in the same transaction;
5. commit; only then does the consumer commit the Kafka offset.

What a failure leads to is decided by the error model
(:mod:`outbox.failures`), never by where it happened:

* an **outage** (database unreachable, connection lost, pool timeout) rolls
  back and waits, with backoff, for as long as it lasts, holding the
  partition (nothing behind it could progress anyway). It costs no attempt;
* a **business failure** (``ctx.fail``, a declared business error) rolls
  back the handler's changes and records the step as failed in a new
  transaction: compensation follows;
* anything else (a **transient** error, a **bug**) is retried with the
  handler's :class:`~outbox.RetryPolicy`; once the attempts are spent the
  record goes, byte for byte, to the dead-letter topic (:mod:`saga.deadletter`)
  and a saga is *suspended* at that step, in one transaction. The partition
  moves on; a fix plus a replay continues the saga.

Records arrive in batches: the records fetched for one partition, in offset
order (:meth:`Processor.process_batch`). A batch runs in ONE database
transaction with a savepoint per record, so that many small steps cost one
commit, and one record's failure rolls back only its own savepoint. Each
record still goes through :meth:`Processor.process`, the per-record seam that
telemetry wraps, and each follows the error model as if it were alone:

* the inbox is read once for the whole batch, when its transaction begins
  (the ids come from the records' headers; a key the database would refuse
  is left to its own record), and the batch's inbox rows and outbox rows
  (every outbox add, a handler's own ``Service.publish`` included) are
  written in one statement each just before it commits: per record, only
  its savepoint and its handler's statements go to the database. A batch
  split by a record handled alone reads the keys it does not know to be
  recorded again when its next transaction begins: that record recorded
  its key outside the batch. A duplicate is caught by that first read, or by the batch
  itself when its first copy is earlier in the same batch. A second
  consumer of the partition (one that lost it in a rebalance and does not
  know yet) may record one of the messages first: the batch's inbox write
  then records fewer rows than it claimed, the batch rolls back and is
  redone, and finds those messages to be duplicates;
* a **business failure** rolls back to the record's savepoint; the refusal
  is recorded in a second savepoint of the same transaction;
* a **transient** error or a **bug** first commits the records before it
  (its own savepoint was rolled back), then the record is retried and, if
  need be, dead-lettered in transactions of its own, exactly as a record
  alone: a serialization failure or a deadlock cannot be cured by a retry
  inside a transaction that still holds the locks of the records before it,
  and a dead letter (with its suspension, which updates the saga view) must
  not wait for, or deadlock with, a batch that holds that view's row. The
  rest of the batch then continues in a new transaction. After a deadlock or
  a serialization failure the service's batches take turns for a while
  (:data:`_CONTENTION_WINDOW`, :class:`saga.batch.BatchGate`): concurrent
  batches hold the rows their handlers locked until they commit and can wait
  for each other in a cycle, batches of one process that take turns cannot.
  One met by a batch while it had its turn (its other party is another
  process, or a record outside any batch) sends the service's batches, the
  rest of that one included, one transaction per record for a while: records
  alone cannot deadlock when their handlers lock one row each;
* an **outage** (the connection is lost) takes the whole open transaction
  with it: the records since the last commit are redone, from the first,
  once the database is back. Their counters are taken back first, so that
  :class:`ServiceStats` counts each record once; their telemetry spans show
  both passes (the first one rolled back);
* a transaction that fails for another reason (a commit, or a session
  left unusable by a failed flush: nothing to blame on one record) redoes
  the uncommitted records one transaction each.

A single record is processed alone, without a savepoint: at low load a
batch is whatever has arrived, often one record. The outbox rows of a
batch wake the relays with one ``pg_notify`` sent before the commit
(:data:`outbox.store.NOTIFY_LATER`), not one per record. The batch's
transaction and its savepoints live in :mod:`saga.batch`.

Nothing is dropped silently: every record ends processed, a recognised
duplicate, ignored (an event type this service does not handle: normal on a
shared topic), or dead-lettered. Logs carry ids, sizes and a hash of the
value, never the payload.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from aiokafka import ConsumerRecord
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from outbox import (
    ErrorKind,
    OutboxMessage,
    RetryPolicy,
    SqlInboxStore,
    SqlOutboxStore,
    classify,
)
from outbox.failures import describe, is_lock_conflict
from saga.batch import CURRENT, Batch, BatchConflict, BatchGate, BatchLost, InboxKey
from saga.choreography import Choreography, Participation, invoke
from saga.context import MessageContext, RecordInfo, SagaContext
from saga.deadletter import (
    Failure,
    dead_letter_message,
    dead_letter_topic,
    replayed,
    replayed_for_another_group,
)
from saga.envelope import Envelope, EnvelopeCodec
from saga.errors import BusinessFailure, DecodeError
from saga.stamp import Suspension
from saga.tracecontext import use_trace_headers

__all__ = ["Handler", "Processor", "ServiceStats", "Subscription"]

log = logging.getLogger(__name__)

Handler = Callable[[MessageContext], Awaitable[None]]
"""A plain message handler: an async function of the context."""
H = Handler
T = TypeVar("T")
C = TypeVar("C", bound=MessageContext)

_OUTAGE_BACKOFF = RetryPolicy(
    maximum_attempts=0,
    initial_interval=timedelta(milliseconds=100),
    maximum_interval=timedelta(seconds=5),
)
"""How an outage is waited out: without end, at most 5 s between attempts."""


@dataclass
class ServiceStats:
    """Counters of one running service."""

    processed: int = 0
    """Messages handled and committed. Inside a batch a message is counted when
    it is handled, a moment before the batch commits, and taken back if that
    commit is lost (so per-message telemetry sees its outcome)."""

    duplicates: int = 0
    """Redelivered messages recognised by the inbox and skipped."""

    ignored: int = 0
    """Messages of types this service has no handler for."""

    undecodable: int = 0
    """Records that could not be decoded (dead-lettered)."""

    dead_lettered: int = 0
    """Records sent to a dead-letter topic (undecodable ones included)."""

    suspended: int = 0
    """Sagas suspended at a dead-lettered message."""

    retries: int = 0
    """Attempts repeated after a transient error or a bug."""

    outage_waits: int = 0
    """Attempts repeated because the database was unavailable."""


@dataclass(frozen=True)
class Subscription:
    """A plain handler and its retry policy."""

    handler: H
    retry: RetryPolicy | None


class GaveUp(Exception):
    """A record's retry policy is spent; carries the last failure."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.summary())
        self.failure = failure


def _user_error(exc: BaseException) -> BaseException:
    """The user's own exception behind our wrapper, when there is one."""
    cause = exc.__cause__
    return cause if cause is not None and not isinstance(exc, DecodeError) else exc


def value_digest(value: bytes | None) -> str:
    """Size and short hash of a record value: what logs show instead of the bytes."""
    data = value or b""
    return f"{len(data)} bytes sha256:{hashlib.sha256(data).hexdigest()[:12]}"


class Processor:
    """Runs each consumed record of one service through its transaction.

    Args:
        name: Service name (inbox consumer name, log prefix).
        group: Kafka consumer group (recorded in dead letters).
        engine: The service's database.
        envelopes: Codec of the records.
        inbox: The service's inbox.
        outbox: The service's outbox.
        choreography: The service's part in its sagas.
        source: CloudEvents source of what handlers emit.
        retry: Default retry policy.
        dead_letter_topic: Template of the dead-letter topic (``{topic}`` is
            replaced by the record's topic).
        stats: Counters to update.
        subscriptions: Plain handlers by (topic, event type).
        sagas: The service's sagas by the topic that carries their events.
        longest_saga_schedule: How far ahead a saga handler may schedule a
            message (the saga views' retention), if there is a limit.
    """

    def __init__(
        self,
        *,
        name: str,
        group: str,
        engine: AsyncEngine,
        envelopes: EnvelopeCodec,
        inbox: SqlInboxStore,
        outbox: SqlOutboxStore,
        choreography: Choreography,
        source: str,
        retry: RetryPolicy,
        dead_letter_topic: str,
        stats: ServiceStats,
        subscriptions: Mapping[tuple[str, str], Subscription],
        sagas: Mapping[str, Participation],
        longest_saga_schedule: timedelta | None = None,
    ) -> None:
        self.name = name
        self.group = group
        self.engine = engine
        self.envelopes = envelopes
        self.inbox = inbox
        self.outbox = outbox
        self.choreography = choreography
        self.source = source
        self.retry = retry
        self.dead_letter_template = dead_letter_topic
        self.stats = stats
        self._subscriptions = subscriptions
        self._sagas = sagas
        self.longest_saga_schedule = longest_saga_schedule
        self._contended_until = 0.0
        """Event-loop time until which batches go one transaction per record."""
        self._gate = BatchGate()
        """Whether batches take turns (after a deadlock or a serialization failure)."""

    async def process_batch(self, records: Sequence[ConsumerRecord[bytes, bytes]]) -> None:
        """Handle records of one partition, in offset order, in as few transactions as possible.

        The consumer's callback. Each record goes through :meth:`process`
        (looked up on the instance, so that an interceptor wrapping it sees
        every record); records share one transaction with a savepoint each
        (see the module docstring). Returns once every record is processed,
        a duplicate, ignored or dead-lettered; waits through outages.
        """
        if len(records) == 1:
            await self.process(records[0])
            return
        done = 0
        outages = 0
        conflicts = 0
        alone = False
        expected = self._inbox_keys(records)
        while done < len(records):
            # Lately deadlocked (a batch redone included): records one transaction
            # each, which cannot deadlock each other over rows a handler locks one
            # at a time.
            if alone or self._is_contended():
                for record in records[done:]:
                    await self.process(record)
                return
            batch = Batch(
                self.engine, self.outbox, self.inbox, self.name, expected, self.stats, self._gate
            )
            token = CURRENT.set(batch)
            try:
                for index in range(done, len(records)):
                    batch.joinable = True
                    await self.process(records[index])
                    if batch.session is None:
                        # Handled alone, or needed no transaction: durable already.
                        done = index + 1
                        batch.settle()
                        if self._is_contended():
                            break  # it deadlocked: the rest go one transaction each
                else:
                    batch.joinable = False
                    await batch.commit()
                    return
                alone = True
                continue
            except BatchConflict as conflict:
                await batch.abandon()
                batch.take_back()
                conflicts += 1
                alone = conflicts >= _MAX_CONFLICTS
                log.warning(
                    "%s: %s (another consumer of the partition?); its %d uncommitted record(s) "
                    "again%s",
                    self.name,
                    conflict,
                    len(records) - done,
                    ", one transaction each" if alone else "",
                )
                continue
            except BatchLost as lost:
                await batch.abandon()
                batch.take_back()
                if is_lock_conflict(lost.error):
                    # At its commit (SERIALIZABLE, deferred checks).
                    self._contended(alone=lost.alone)
                if lost.kind is not ErrorKind.OUTAGE:
                    log.warning(
                        "%s: a batch's transaction failed (%s): %s; its %d uncommitted record(s) "
                        "go one transaction each",
                        self.name,
                        lost.kind.value,
                        describe(_user_error(lost.error)),
                        len(records) - done,
                    )
                    alone = True
                    continue
                outages += 1
                self.batch_outage()
                delay = _OUTAGE_BACKOFF.delay(outages)
                log.warning(
                    "%s: database unavailable during a batch (%s); %d record(s) again in %.1fs",
                    self.name,
                    describe(_user_error(lost.error)),
                    len(records) - done,
                    delay,
                )
                await asyncio.sleep(delay)
            except BaseException:  # cancelled: its uncommitted records roll back below
                batch.take_back()
                raise
            finally:
                # A cancelled batch (its partition revoked) rolls back here.
                batch.joinable = False
                await batch.abandon()
                CURRENT.reset(token)

    def _inbox_keys(self, records: Sequence[ConsumerRecord[bytes, bytes]]) -> list[InboxKey]:
        """The inbox keys of ``records`` (as :meth:`_steps` records them), from their headers."""
        keys = []
        for record in records:
            identity = self.envelopes.identity(record.headers)
            if identity is None:
                continue
            key = (_inbox_text(identity[0]), identity[1])
            # A key the inbox refuses (an id over 200 characters, a NUL that
            # PostgreSQL text cannot hold) would fail the batch's read, and so
            # every record of the batch: it is left to its own record's
            # transaction to report.
            if len(key[1]) <= 200 and "\x00" not in key[0] + key[1]:
                keys.append(key)
        return keys

    def batch_outage(self) -> None:
        """Count an outage that took a batch's transaction with it (its records are redone).

        A seam (looked up on the instance): telemetry wrapping :meth:`process` cannot see it.
        """
        self.stats.outage_waits += 1

    async def process(self, record: ConsumerRecord[bytes, bytes]) -> None:
        """Handle one consumed record (alone, or as part of :meth:`process_batch`).

        Returns once the record is processed, recognised as a duplicate,
        ignored or dead-lettered; waits through outages. Raises only when
        the task is cancelled.
        """
        if replayed_for_another_group(record.headers, self.group):
            self._add("ignored")
            return
        try:
            envelope = self.envelopes.decode(record.key, record.value, record.headers)
        except DecodeError as exc:
            await self._bad_input(record, exc)
            return
        info = _info(record)
        part = self._sagas.get(record.topic)
        if part is not None:
            await self._process_saga(record, part, envelope, info)
            return
        subscription = self._subscriptions.get((record.topic, envelope.type))
        if subscription is None:
            self._add("ignored")
            return
        policy = subscription.retry or self.retry
        try:
            processed = await self._attempts(
                policy, lambda: self._transaction(subscription.handler, envelope, info)
            )
        except GaveUp as gave_up:
            await self._dead_letter(record, envelope, None, gave_up.failure)
            return
        self._count(processed)

    async def _process_saga(
        self,
        record: ConsumerRecord[bytes, bytes],
        part: Participation,
        envelope: Envelope,
        info: RecordInfo,
    ) -> None:
        # Its own message dead-lettered by an older version: its replay resumes the saga.
        own_replay = envelope.source == part.source and replayed(record.headers)
        if not part.concerns(envelope) and not own_replay:
            self._add("ignored")
            return
        if envelope.stamp is None:
            # A message this service would act on, without the saga it belongs
            # to: bad input, kept where a person can see and replay it.
            missing = DecodeError(
                f"a {envelope.type} message on saga topic {record.topic} carries no stamp",
                raw=record.value,
            )
            await self._bad_input(record, missing)
            return
        registered = part.handler_for(envelope)
        policy = (registered.retry if registered else None) or self.retry
        try:
            try:
                processed = await self._attempts(
                    policy, lambda: self._saga_transaction(part, envelope, info, None)
                )
            except BusinessFailure as business:
                # The step refused: its changes were rolled back; record the
                # refusal (and start compensation) in a transaction of its own.
                refusal = business
                processed = await self._attempts(
                    policy, lambda: self._saga_transaction(part, envelope, info, refusal)
                )
        except GaveUp as gave_up:
            await self._dead_letter(record, envelope, part, gave_up.failure)
            return
        self._count(processed)

    async def _attempts(self, policy: RetryPolicy, attempt_once: Callable[[], Awaitable[T]]) -> T:
        """Run ``attempt_once`` under the error model.

        Outages are waited out without end and cost no attempt; a business
        failure is raised at once; transient errors and bugs are retried per
        ``policy`` and then raised as :class:`GaveUp`.
        """
        attempts = 0
        outages = 0
        first: datetime | None = None
        while True:
            try:
                return await attempt_once()
            except BusinessFailure:
                raise
            except BatchLost:
                raise
            except Exception as exc:
                kind = classify(exc)
                now = datetime.now(UTC)
                batch = CURRENT.get()
                if is_lock_conflict(exc):
                    self._contended(alone=batch is not None and batch.joinable and batch.alone)
                if batch is not None and batch.joinable:
                    if kind is ErrorKind.OUTAGE:
                        # The batch's transaction went with the connection.
                        raise BatchLost(exc, kind) from exc
                    # Retried (or dead-lettered) alone, after the records before it.
                    await self._leave_batch()
                if kind is ErrorKind.OUTAGE:
                    outages += 1
                    self.stats.outage_waits += 1
                    delay = _OUTAGE_BACKOFF.delay(outages)
                    log.warning(
                        "%s: database unavailable (%s); retry %d in %.1fs",
                        self.name,
                        describe(_user_error(exc)),
                        outages,
                        delay,
                    )
                    await asyncio.sleep(delay)
                    continue
                outages = 0
                attempts += 1
                first = first or now
                limit = policy.maximum_attempts
                if limit and attempts >= limit:
                    raise GaveUp(
                        Failure(error=_user_error(exc), attempts=attempts, first=first, last=now)
                    ) from exc
                self.stats.retries += 1
                delay = policy.delay(attempts)
                log.warning(
                    "%s: attempt %d failed (%s): %s; retry in %.1fs",
                    self.name,
                    attempts,
                    kind.value,
                    describe(_user_error(exc)),
                    delay,
                )
                await asyncio.sleep(delay)

    def _is_contended(self) -> bool:
        return asyncio.get_running_loop().time() < self._contended_until

    def _contended(self, *, alone: bool) -> None:
        """A deadlock or a serialization failure: first batches take turns, then records alone.

        ``alone``: whether it met a batch that had its turn (no other batch of
        the service had a transaction open), whose other party is then another
        process, or a record outside any batch: batches go one transaction per
        record for a while. Otherwise the service's batches take turns a while
        (see :class:`saga.batch.BatchGate`).
        """
        now = asyncio.get_running_loop().time()
        if alone or now < self._contended_until:
            if now >= self._contended_until:
                log.warning(
                    "%s: a transaction deadlocked or conflicted while batches took turns; "
                    "batches go one transaction per record for %.0fs",
                    self.name,
                    _CONTENTION_WINDOW,
                )
            self._contended_until = now + _CONTENTION_WINDOW
        elif not self._gate.taking_turns():
            log.warning(
                "%s: transactions deadlocked or conflicted; batches take turns for %.0fs",
                self.name,
                _CONTENTION_WINDOW,
            )
        self._gate.take_turns(_CONTENTION_WINDOW)

    def _count(self, processed: bool) -> None:
        self._add("processed" if processed else "duplicates")

    def _add(self, counter: str) -> None:
        """Count one record; inside a batch, once the batch commits."""
        batch = CURRENT.get()
        if batch is not None and batch.joinable:
            batch.pending[counter] = batch.pending.get(counter, 0) + 1
            return
        setattr(self.stats, counter, getattr(self.stats, counter) + 1)

    async def _leave_batch(self) -> None:
        """Commit the batch's records so far; the record in progress goes on alone."""
        batch = CURRENT.get()
        if batch is None or not batch.joinable:
            return
        batch.joinable = False
        await batch.commit()

    async def _saga_transaction(
        self,
        part: Participation,
        envelope: Envelope,
        info: RecordInfo,
        business: BusinessFailure | None,
    ) -> bool:
        async def work(ctx: SagaContext) -> list[OutboxMessage]:
            return await self.choreography.handle(ctx, part, business=business)

        def context(session: AsyncSession) -> SagaContext:
            return self._saga_context(session, part, envelope, info)

        return await self._in_transaction(envelope, context, work)

    def _saga_context(
        self, session: AsyncSession, part: Participation, envelope: Envelope, info: RecordInfo
    ) -> SagaContext:
        assert envelope.stamp is not None
        return SagaContext(
            session=session,
            envelope=envelope,
            record=info,
            source=self.source,
            stamp=envelope.stamp,
            step=None,
            topic=part.topic,
            longest_schedule=self.longest_saga_schedule,
        )

    async def _transaction(self, handler: H, envelope: Envelope, info: RecordInfo) -> bool:
        async def work(ctx: MessageContext) -> list[OutboxMessage]:
            await invoke(
                handler, ctx, role="handler", what=f"handler of {envelope.type} in {self.name}"
            )
            return [m for _, m in ctx.envelopes(self.envelopes, envelope.stamp)]

        def context(session: AsyncSession) -> MessageContext:
            return MessageContext(
                session=session, envelope=envelope, record=info, source=self.source
            )

        return await self._in_transaction(envelope, context, work)

    async def _in_transaction(
        self,
        envelope: Envelope,
        context: Callable[[AsyncSession], C],
        work: Callable[[C], Awaitable[list[OutboxMessage]]],
    ) -> bool:
        """Inbox row, ``work`` and its outbox rows in one transaction.

        Returns ``False`` (and changes nothing) for a message already processed.
        Inside a batch, the transaction is the batch's and the record's work a
        savepoint of it.
        """
        batch = CURRENT.get()
        if batch is not None and batch.joinable:
            session = await batch.join()
            processed = await batch.savepoint(lambda: self._steps(session, envelope, context, work))
            batch.wrote = batch.wrote or processed
            return processed
        async with (
            AsyncSession(self.engine, expire_on_commit=False) as session,
            session.begin(),
        ):
            return await self._steps(session, envelope, context, work)

    async def _steps(
        self,
        session: AsyncSession,
        envelope: Envelope,
        context: Callable[[AsyncSession], C],
        work: Callable[[C], Awaitable[list[OutboxMessage]]],
    ) -> bool:
        # A message is its CloudEvents source + id: ids are unique per source only.
        source = _inbox_text(envelope.source)
        batch = CURRENT.get()
        if batch is None or batch.session is not session:
            batch = None
        # In a batch, the inbox was read for all its records in one statement,
        # and its inbox and outbox rows are written in one statement each when
        # it commits: two round trips per record fewer.
        new = None if batch is None else batch.claim(self.name, (source, envelope.id))
        if new is None:
            new = await self.inbox.record(session, self.name, envelope.id, source=source)
        if not new:
            return False
        with use_trace_headers(envelope.traceparent, envelope.tracestate):
            messages = await work(context(session))
        # In a batch, written when it commits (outbox.store.WRITE_LATER).
        await self.outbox.add(session, messages)
        return True

    # -- dead letters ------------------------------------------------------------------

    async def _bad_input(self, record: ConsumerRecord[bytes, bytes], error: DecodeError) -> None:
        """Dead-letter a record at once: retrying bad input cannot help."""
        await self._leave_batch()
        self.stats.undecodable += 1
        now = datetime.now(UTC)
        await self._dead_letter(
            record, None, None, Failure(error=error, attempts=1, first=now, last=now)
        )

    async def _dead_letter(
        self,
        record: ConsumerRecord[bytes, bytes],
        envelope: Envelope | None,
        part: Participation | None,
        failure: Failure,
    ) -> None:
        """Send ``record`` to its dead-letter topic; suspend its saga (one transaction).

        Waits through outages like any transaction. Should the suspension
        itself fail for good (a view that cannot be read), the dead letter is
        still written, without it: a record is never dropped.

        Always in a transaction of its own, after the records of the batch
        before it were committed: the dead letter is durable whatever happens
        to the rest of the batch, and a suspension never waits for the lock
        the batch holds on the same saga's view.
        """
        await self._leave_batch()
        topic = dead_letter_topic(self.dead_letter_template, record.topic)
        role, step = ("decode", None) if envelope is None else ("handler", None)
        stamp = None if envelope is None else envelope.stamp
        if part is not None and envelope is not None and stamp is not None:
            role, step = part.role_of(envelope)
        message = dead_letter_message(
            topic=topic,
            key=record.key,
            value=record.value,
            headers=record.headers,
            origin=(record.topic, record.partition, record.offset),
            failure=failure,
            service=self.name,
            group=self.group,
            role=role,
            saga=None if stamp is None else (stamp.saga_name, stamp.saga_id),
            step=step,
        )
        suspension = None
        if part is not None and envelope is not None and stamp is not None:
            suspension = Suspension(
                service=self.name,
                role=role,
                step=step,
                message_id=envelope.id,
                event_type=envelope.type,
                error=failure.summary(),
                attempts=failure.attempts,
                dead_letter_topic=topic,
                at=failure.last,
            )
        log.error(
            "%s dead-lettered %s[%d]@%d to %s after %d attempt(s): %s (message %s, type %s, "
            "saga %s, step %s, value %s)",
            self.name,
            record.topic,
            record.partition,
            record.offset,
            topic,
            failure.attempts,
            failure.summary(),
            None if envelope is None else envelope.id,
            None if envelope is None else envelope.type,
            None if stamp is None else stamp.saga_id,
            step,
            value_digest(record.value),
        )
        try:
            written = await self._attempts(
                _DEAD_LETTER_WRITES,
                lambda: self._write_dead_letter(record, message, part, envelope, suspension),
            )
        except GaveUp as again:
            log.error(
                "%s could not suspend saga %s (%s); dead-lettering %s[%d]@%d without it",
                self.name,
                None if stamp is None else stamp.saga_id,
                again.failure.summary(),
                record.topic,
                record.partition,
                record.offset,
            )
            written = await self._attempts(
                _DEAD_LETTER_WRITES,
                lambda: self._write_dead_letter(record, message, None, None, None),
            )
        if written:
            self.stats.dead_lettered += 1
            if suspension is not None:
                self.stats.suspended += 1

    async def _write_dead_letter(
        self,
        record: ConsumerRecord[bytes, bytes],
        message: OutboxMessage,
        part: Participation | None,
        envelope: Envelope | None,
        suspension: Suspension | None,
    ) -> bool:
        async with (
            AsyncSession(self.engine, expire_on_commit=False) as session,
            session.begin(),
        ):
            # Keyed by the record's position and content, not its message id:
            # the record itself must stay new to the inbox, so that its replay
            # runs; the content keeps a reused position (a topic created
            # again) from passing for the record dead-lettered there before.
            position = _position_key(record)
            consumer = f"{self.name}.dead-letters"
            source = _inbox_text(record.topic)
            if not await self.inbox.record(session, consumer, position, source=source):
                return False
            messages = [message]
            if part is not None and envelope is not None and suspension is not None:
                ctx = self._saga_context(session, part, envelope, _info(record))
                messages += await self.choreography.suspend(ctx, suspension)
            await self.outbox.add(session, messages)
        return True


_MAX_CONFLICTS = 3
"""Batches redone because another consumer recorded their messages first, before one
transaction per record."""

_CONTENTION_WINDOW = 30.0
"""Seconds after a deadlock or a serialization failure during which the service's batches
take turns (each new one starts the window again), and after one met by a batch that had
its turn, during which they go one transaction per record. Records of a batch share its
transaction, so concurrent batches (other partitions, other instances) hold the rows
their handlers lock until they commit and can wait for each other in a cycle, which
PostgreSQL breaks only after ``deadlock_timeout`` (a second by default) with both
stalled. Batches of one process that take turns cannot; a record alone holds the rows of
one handler: handlers that lock one row each then wait for each other but never
deadlock."""

_DEAD_LETTER_WRITES = RetryPolicy(maximum_attempts=3, initial_interval=timedelta(milliseconds=100))
"""Writing a dead letter: outages are waited out (as always); anything else is tried 3 times."""


def _position_key(record: ConsumerRecord[bytes, bytes]) -> str:
    """Inbox key of a dead-lettered record: its position and a hash of its content."""
    digest = hashlib.sha256()
    for part in (record.key or b"", record.value or b""):
        digest.update(len(part).to_bytes(8, "big") + part)
    for name, value in record.headers:
        raw = name.encode("utf-8", "surrogateescape")
        digest.update(len(raw).to_bytes(8, "big") + raw)
        digest.update(len(value or b"").to_bytes(8, "big") + (value or b""))
    content = digest.hexdigest()[:32]
    return f"{record.partition}/{record.offset}#{content}"


def _inbox_text(text: str) -> str:
    """``text`` as the inbox stores it: at most 200 characters (a digest when longer)."""
    if len(text) <= 200:
        return text
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def _info(record: ConsumerRecord[bytes, bytes]) -> RecordInfo:
    return RecordInfo(topic=record.topic, partition=record.partition, offset=record.offset)

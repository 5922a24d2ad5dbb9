"""The per-record pipeline: decode, inbox, handler, outbox, one transaction.

For every record of a subscribed topic:

1. decode the envelope (an undecodable record is logged with its raw bytes,
   base64, and skipped: it never blocks the partition);
2. open a database transaction and record the message id in the inbox (a
   duplicate ends here, changing nothing);
3. run the handler registered for the event type (for saga topics, the
   choreography decides which: step, compensation, end handler), which
   changes the service's state through ``ctx.session`` and emits events;
4. write the emitted events to the outbox, in the same transaction;
5. commit; only then does the consumer commit the Kafka offset.

Transient failures (lost connection, deadlock, serialization failure, or any
error with ``retriable = True``) roll back and retry the whole transaction
with the handler's retry policy. Once the policy is spent, a saga step fails
(compensation follows), a compensation is recorded as failed, and a plain
message is logged with its bytes and skipped. Only a database that stays
unreachable makes a record wait, retried until the database is back.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from aiokafka import ConsumerRecord
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from outbox import (
    OutboxError,
    OutboxMessage,
    RetryPolicy,
    SqlInboxStore,
    SqlOutboxStore,
    is_transient_db_error,
)
from saga.choreography import Choreography, Participation
from saga.context import MessageContext, RecordInfo, SagaContext
from saga.envelope import Envelope, EnvelopeCodec
from saga.errors import DecodeError, HandlerError
from saga.tracecontext import use_trace_headers

__all__ = ["Handler", "Processor", "ServiceStats", "Subscription"]

log = logging.getLogger(__name__)

Handler = Callable[[MessageContext], Awaitable[None]]
"""A plain message handler: an async function of the context."""
H = Handler


@dataclass
class ServiceStats:
    """Counters of one running service."""

    processed: int = 0
    """Messages handled and committed."""

    duplicates: int = 0
    """Redelivered messages recognised by the inbox and skipped."""

    ignored: int = 0
    """Messages of types this service has no handler for."""

    undecodable: int = 0
    """Records that could not be decoded (logged with their bytes)."""

    failed: int = 0
    """Messages whose handler failed for good (logged with their bytes)."""


@dataclass(frozen=True)
class Subscription:
    """A plain handler and its retry policy."""

    handler: H
    retry: RetryPolicy | None


def _is_transient(exc: BaseException) -> bool:
    """Worth another attempt with the handler's retry policy."""
    return is_transient_db_error(exc) or bool(getattr(exc, "retriable", False))


def _is_outage(exc: BaseException) -> bool:
    """The database is unavailable: retry without end rather than give up on the message.

    A handler's own retriable errors are not outages: once its retry policy is
    spent, the message is given up on (a step fails, a compensation is
    recorded as failed) so that one message cannot block its partition.
    """
    if isinstance(exc, OutboxError):
        return exc.retriable
    cause = exc.__cause__ if isinstance(exc, HandlerError) else exc
    return cause is not None and is_transient_db_error(cause)


class Processor:
    """Runs each consumed record of one service through its transaction.

    Args:
        name: Service name (inbox consumer name, log prefix).
        engine: The service's database.
        envelopes: Codec of the records.
        inbox: The service's inbox.
        outbox: The service's outbox.
        choreography: The service's part in its sagas.
        source: CloudEvents source of what handlers emit.
        retry: Default retry policy.
        stats: Counters to update.
        subscriptions: Plain handlers by (topic, event type).
        sagas: The service's sagas by the topic that carries their events.
    """

    def __init__(
        self,
        *,
        name: str,
        engine: AsyncEngine,
        envelopes: EnvelopeCodec,
        inbox: SqlInboxStore,
        outbox: SqlOutboxStore,
        choreography: Choreography,
        source: str,
        retry: RetryPolicy,
        stats: ServiceStats,
        subscriptions: Mapping[tuple[str, str], Subscription],
        sagas: Mapping[str, Participation],
    ) -> None:
        self.name = name
        self.engine = engine
        self.envelopes = envelopes
        self.inbox = inbox
        self.outbox = outbox
        self.choreography = choreography
        self.source = source
        self.retry = retry
        self.stats = stats
        self._subscriptions = subscriptions
        self._sagas = sagas

    async def process(self, record: ConsumerRecord[bytes, bytes]) -> None:
        """Handle one consumed record (the consumer's callback)."""
        try:
            envelope = self.envelopes.decode(record.key, record.value, record.headers)
        except DecodeError as exc:
            self.stats.undecodable += 1
            log.error(
                "%s skipped an undecodable record %s[%d]@%d: %s; key=%s value(base64)=%s",
                self.name,
                record.topic,
                record.partition,
                record.offset,
                exc,
                record.key,
                base64.b64encode(exc.raw or b"").decode(),
            )
            return
        info = RecordInfo(topic=record.topic, partition=record.partition, offset=record.offset)
        part = self._sagas.get(record.topic)
        if part is not None:
            await self._process_saga(record, part, envelope, info)
            return
        subscription = self._subscriptions.get((record.topic, envelope.type))
        if subscription is None:
            self.stats.ignored += 1
            return
        policy = subscription.retry or self.retry
        try:
            processed = await self._retrying(
                policy, lambda: self._transaction(subscription.handler, envelope, info)
            )
        except Exception as exc:
            if _is_outage(exc):
                raise  # an outage, not bad input: the consumer retries the record
            self._failed(record, envelope, exc)
            return
        self._count(processed)

    async def _process_saga(
        self,
        record: ConsumerRecord[bytes, bytes],
        part: Participation,
        envelope: Envelope,
        info: RecordInfo,
    ) -> None:
        if envelope.stamp is None:
            self.stats.ignored += 1
            log.warning(
                "%s ignored %s on saga topic %s: it carries no stamp",
                self.name,
                envelope.id,
                record.topic,
            )
            return
        if not part.concerns(envelope):
            self.stats.ignored += 1
            return
        registered = part.handler_for(envelope)
        policy = (registered.retry if registered else None) or self.retry
        try:
            processed = await self._retrying(
                policy, lambda: self._saga_transaction(part, envelope, info, None)
            )
        except Exception as exc:
            if _is_outage(exc):
                raise
            # The handler gave up: fail the step (or record the compensation
            # as failed) in a fresh transaction, so that the saga still ends.
            log.error(
                "%s: %s handling %s (%s) of saga %s; failing it",
                self.name,
                exc.__class__.__name__,
                envelope.id,
                envelope.type,
                envelope.stamp.saga_id,
                exc_info=exc,
            )
            broken = exc
            try:
                processed = await self._retrying(
                    self.retry,
                    lambda: self._saga_transaction(part, envelope, info, broken),
                )
            except Exception as again:
                if _is_outage(again):
                    raise
                self._failed(record, envelope, again)
                return
        self._count(processed)

    async def _retrying(
        self, policy: RetryPolicy, attempt_once: Callable[[], Awaitable[bool]]
    ) -> bool:
        async for attempt in policy.retrying(retry_on=_is_transient):
            with attempt:
                return await attempt_once()
        raise AssertionError("unreachable: tenacity re-raises the last error")

    def _count(self, processed: bool) -> None:
        if processed:
            self.stats.processed += 1
        else:
            self.stats.duplicates += 1

    async def _saga_transaction(
        self,
        part: Participation,
        envelope: Envelope,
        info: RecordInfo,
        broken: BaseException | None,
    ) -> bool:
        stamp = envelope.stamp
        assert stamp is not None

        async def work(session: AsyncSession) -> list[OutboxMessage]:
            ctx = SagaContext(
                session=session,
                envelope=envelope,
                record=info,
                source=self.source,
                stamp=stamp,
                step=None,
                topic=part.topic,
            )
            return await self.choreography.handle(ctx, part, broken=broken)

        return await self._in_transaction(envelope, work)

    async def _transaction(self, handler: H, envelope: Envelope, info: RecordInfo) -> bool:
        async def work(session: AsyncSession) -> list[OutboxMessage]:
            ctx = MessageContext(
                session=session, envelope=envelope, record=info, source=self.source
            )
            await handler(ctx)
            return [m for _, m in ctx.envelopes(self.envelopes, envelope.stamp)]

        return await self._in_transaction(envelope, work)

    async def _in_transaction(
        self,
        envelope: Envelope,
        work: Callable[[AsyncSession], Awaitable[list[OutboxMessage]]],
    ) -> bool:
        """Inbox row, ``work`` and its outbox rows in one transaction.

        Returns ``False`` (and changes nothing) for a message already processed.
        """
        async with (
            AsyncSession(self.engine, expire_on_commit=False) as session,
            session.begin(),
        ):
            if not await self.inbox.record(session, self.name, envelope.id):
                return False
            with use_trace_headers(envelope.traceparent, envelope.tracestate):
                messages = await work(session)
            await self.outbox.add(session, messages)
        return True

    def _failed(
        self, record: ConsumerRecord[bytes, bytes], envelope: Envelope, exc: BaseException
    ) -> None:
        self.stats.failed += 1
        log.error(
            "%s gave up on message %s (%s) from %s[%d]@%d: %r; value(base64)=%s",
            self.name,
            envelope.id,
            envelope.type,
            record.topic,
            record.partition,
            record.offset,
            exc,
            base64.b64encode(record.value or b"").decode(),
            exc_info=exc,
        )

"""The typed contexts handlers receive: plain messages and saga steps."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from outbox import OutboxMessage
from saga.envelope import Envelope, EnvelopeCodec
from saga.errors import ConfigurationError, EncodeError
from saga.stamp import Stamp
from saga.tracecontext import current_trace_headers

__all__ = ["MessageContext", "RecordInfo", "SagaContext", "outgoing"]


@dataclass(frozen=True, kw_only=True)
class RecordInfo:
    """Where an incoming message was read from."""

    topic: str
    """Topic of the record."""

    partition: int
    """Partition of the record."""

    offset: int
    """Offset of the record in its partition."""


@dataclass(frozen=True, kw_only=True)
class Emission:
    """An event a handler asked to emit, written to the outbox at commit."""

    event_type: str
    data: Mapping[str, Any]
    topic: str
    key: bytes | None
    delay: timedelta | None = None
    deliver_at: datetime | None = None


class MessageContext:
    """What a handler gets: the transaction, the message, and a way to emit.

    Everything a handler emits is written to the outbox in the same database
    transaction as its own changes and the inbox row, and published only
    after that transaction commits.
    """

    def __init__(
        self,
        *,
        session: AsyncSession,
        envelope: Envelope,
        record: RecordInfo,
        source: str,
    ) -> None:
        self.session = session
        """The database session of the current transaction (already begun).

        In a batch, the batch's session. Add outbox rows of your own with
        ``Service.publish`` on it or on its connection
        (``await ctx.session.connection()``): the batch keeps them and writes
        them, in the order of its messages, when it commits. An ``INSERT``
        into the outbox table written by hand would take an id ahead of the
        rows of earlier messages, and a key's events would be published out
        of order.
        """
        self.envelope = envelope
        """The incoming message."""
        self.record = record
        """Where the incoming message came from."""
        self.source = source
        """CloudEvents source of what this handler emits."""
        self.emissions: list[Emission] = []
        """What the handler emitted so far, in order."""

    @property
    def data(self) -> Mapping[str, Any]:
        """The incoming event's payload."""
        return self.envelope.data

    def _default_topic(self) -> str:
        return self.record.topic

    def _default_key(self) -> bytes | None:
        return self.envelope.key

    def emit(
        self,
        event_type: str,
        data: Mapping[str, Any],
        *,
        topic: str | None = None,
        key: bytes | None = None,
    ) -> None:
        """Emit an event when this transaction commits.

        Args:
            event_type: Avro full name of the event's schema.
            data: The event payload.
            topic: Destination topic; defaults to the incoming message's topic.
            key: Record key; defaults to the incoming message's key.
        """
        self._queue(event_type, data, topic=topic, key=key)

    def schedule(
        self,
        event_type: str,
        data: Mapping[str, Any],
        *,
        delay: timedelta | None = None,
        deliver_at: datetime | None = None,
        topic: str | None = None,
        key: bytes | None = None,
    ) -> None:
        """Emit an event that is published only once due (database clock).

        Give ``delay`` (after the commit) or ``deliver_at`` (aware datetime).

        Raises:
            ConfigurationError: In a saga handler, the event would be due later
                than the service's saga views are kept
                (``ServiceSettings.saga_retention``). By then the saga may have
                ended and its view been purged, and the late event would start
                the saga over as a new one. Raised in a handler, it is a bug:
                the message is dead-lettered and the saga suspended.
        """
        if (delay is None) == (deliver_at is None):
            raise ConfigurationError("schedule() needs exactly one of delay and deliver_at")
        self._check_due(event_type, delay, deliver_at)
        self._queue(event_type, data, topic=topic, key=key, delay=delay, deliver_at=deliver_at)

    def _check_due(
        self, event_type: str, delay: timedelta | None, deliver_at: datetime | None
    ) -> None:
        """Refuse a scheduled event due too late (a plain handler has no limit)."""

    def _queue(
        self,
        event_type: str,
        data: Mapping[str, Any],
        *,
        topic: str | None,
        key: bytes | None,
        delay: timedelta | None = None,
        deliver_at: datetime | None = None,
    ) -> None:
        self.emissions.append(
            Emission(
                event_type=event_type,
                data=dict(data),
                topic=self._default_topic() if topic is None else topic,
                key=self._default_key() if key is None else key,
                delay=delay,
                deliver_at=deliver_at,
            )
        )

    def envelopes(
        self, codec: EnvelopeCodec, stamp: Stamp | None
    ) -> list[tuple[Envelope, OutboxMessage]]:
        """Encode what was emitted, each carrying ``stamp`` (used by the runtime)."""
        incoming = self.envelope
        result = []
        for emission in self.emissions:
            envelope = Envelope(
                type=emission.event_type,
                data=emission.data,
                source=self.source,
                key=emission.key,
                correlation_id=incoming.correlation_id or incoming.id,
                causation_id=incoming.id,
                stamp=stamp,
            )
            result.append(
                outgoing(
                    codec,
                    envelope,
                    topic=emission.topic,
                    delay=emission.delay,
                    deliver_at=emission.deliver_at,
                )
            )
        return result


class SagaContext(MessageContext):
    """What a saga step, compensation or end handler gets.

    Besides the transaction and the message, it holds the saga's stamp as this
    service knows it, and lets the handler record the step's result data,
    fail the saga (a business outcome: compensation follows), or complete it.
    Emitted events go to the saga's topic, keyed by the saga id, and carry
    the updated stamp.
    """

    def __init__(
        self,
        *,
        session: AsyncSession,
        envelope: Envelope,
        record: RecordInfo,
        source: str,
        stamp: Stamp,
        step: str | None,
        topic: str,
        longest_schedule: timedelta | None = None,
    ) -> None:
        super().__init__(session=session, envelope=envelope, record=record, source=source)
        self.longest_schedule = longest_schedule
        """How far ahead :meth:`schedule` may go (the saga views' retention), if limited."""
        self.stamp = stamp
        """The saga's state as of this message (read it; the framework updates it)."""
        self.step = step
        """The step being performed or compensated (``None`` in end handlers)."""
        self.saga_topic = topic
        """Topic of this saga's events."""
        self.results: dict[str, str] = {}
        """Result data recorded for the step so far."""
        self.failure: str | None = None
        """Why the handler failed the saga, if it did."""
        self.completes = False
        """Whether the handler completed the saga."""

    @property
    def saga_id(self) -> str:
        """Id of the saga."""
        return self.stamp.saga_id

    def _check_due(
        self, event_type: str, delay: timedelta | None, deliver_at: datetime | None
    ) -> None:
        """At most the saga retention ahead (see :meth:`MessageContext.schedule`)."""
        limit = self.longest_schedule
        if limit is None:
            return
        if deliver_at is not None and deliver_at.tzinfo is None:
            raise ConfigurationError("deliver_at must be timezone-aware")
        ahead = delay if deliver_at is None else deliver_at - datetime.now(UTC)
        if ahead is not None and ahead > limit:
            raise ConfigurationError(
                f"cannot schedule {event_type} {ahead} ahead: saga views are kept "
                f"for {limit} (ServiceSettings.saga_retention), and an event due "
                "later could find its saga purged and start it over"
            )

    def _default_topic(self) -> str:
        return self.saga_topic

    def _default_key(self) -> bytes | None:
        return self.stamp.saga_id.encode()

    def record_result(self, **data: str) -> None:
        """Record small result data of this step in the stamp (e.g. a payment id)."""
        for name, value in data.items():
            if not isinstance(value, str):
                raise ConfigurationError(f"step result {name!r} must be a string")
        self.results.update(data)

    def emit(
        self,
        event_type: str,
        data: Mapping[str, Any],
        *,
        topic: str | None = None,
        key: bytes | None = None,
    ) -> None:
        """Emit the step's next event (marks the step done when the handler returns)."""
        if self.failure is not None:
            raise ConfigurationError("the saga was failed: a failed step emits nothing")
        super().emit(event_type, data, topic=topic, key=key)

    def fail(self, reason: str) -> None:
        """Fail the saga: the completed steps are compensated in reverse order."""
        if not reason:
            raise ConfigurationError("fail() needs a reason")
        if any(e.delay is None and e.deliver_at is None for e in self.emissions):
            raise ConfigurationError("a step that emitted events cannot also fail the saga")
        if self.completes:
            raise ConfigurationError("a step that completed the saga cannot also fail it")
        self.failure = reason

    def complete(self) -> None:
        """Complete the saga with this step (status ``COMPLETED``)."""
        if self.failure is not None:
            raise ConfigurationError("a step that failed the saga cannot also complete it")
        self.completes = True


def outgoing(
    codec: EnvelopeCodec,
    envelope: Envelope,
    *,
    topic: str,
    delay: timedelta | None = None,
    deliver_at: datetime | None = None,
) -> tuple[Envelope, OutboxMessage]:
    """Stamp ``envelope`` with the current trace context and encode it as an outbox row."""
    if not topic:
        raise EncodeError("an outgoing message needs a topic")
    traceparent, tracestate = current_trace_headers()
    envelope = replace(envelope, traceparent=traceparent, tracestate=tracestate)
    key, value, headers = codec.encode(envelope)
    message = OutboxMessage(
        topic=topic,
        key=key,
        value=value,
        headers=headers,
        message_id=envelope.id,
        delay=delay,
        deliver_at=deliver_at,
    )
    return envelope, message

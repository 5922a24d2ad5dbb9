"""The typed context a message handler receives."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from outbox import OutboxMessage
from saga.envelope import Envelope, EnvelopeCodec
from saga.errors import EncodeError
from saga.tracecontext import current_trace_headers

__all__ = ["MessageContext", "RecordInfo", "outgoing"]


@dataclass(frozen=True, kw_only=True)
class RecordInfo:
    """Where an incoming message was read from."""

    topic: str
    """Topic of the record."""

    partition: int
    """Partition of the record."""

    offset: int
    """Offset of the record in its partition."""


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
        codec: EnvelopeCodec,
    ) -> None:
        self.session = session
        """The database session of the current transaction (already begun)."""
        self.envelope = envelope
        """The incoming message."""
        self.record = record
        """Where the incoming message came from."""
        self._source = source
        self._codec = codec
        self._outgoing: list[tuple[Envelope, OutboxMessage]] = []

    @property
    def data(self) -> Mapping[str, Any]:
        """The incoming event's payload."""
        return self.envelope.data

    @property
    def emitted(self) -> list[Envelope]:
        """Envelopes emitted so far by this handler, in order."""
        return [envelope for envelope, _ in self._outgoing]

    def emit(
        self,
        event_type: str,
        data: Mapping[str, Any],
        *,
        topic: str | None = None,
        key: bytes | None = None,
        delay: timedelta | None = None,
        deliver_at: datetime | None = None,
    ) -> Envelope:
        """Emit an event when this transaction commits.

        Args:
            event_type: Avro full name of the event's schema.
            data: The event payload.
            topic: Destination topic; defaults to the incoming message's topic.
            key: Record key; defaults to the incoming message's key.
            delay: Publish no sooner than this long after the commit.
            deliver_at: Publish no sooner than this time (database clock).

        Raises:
            EncodeError: ``data`` does not fit the schema of ``event_type``.
        """
        incoming = self.envelope
        return self._emit(
            Envelope(
                type=event_type,
                data=data,
                source=self._source,
                key=incoming.key if key is None else key,
                correlation_id=incoming.correlation_id or incoming.id,
                causation_id=incoming.id,
                stamp=incoming.stamp,
            ),
            topic=self.record.topic if topic is None else topic,
            delay=delay,
            deliver_at=deliver_at,
        )

    def _emit(
        self,
        envelope: Envelope,
        *,
        topic: str,
        delay: timedelta | None = None,
        deliver_at: datetime | None = None,
    ) -> Envelope:
        sent, message = outgoing(
            self._codec, envelope, topic=topic, delay=delay, deliver_at=deliver_at
        )
        self._outgoing.append((sent, message))
        return sent

    def outbox_messages(self) -> list[OutboxMessage]:
        """The outbox rows to write for what was emitted (used by the runtime)."""
        return [message for _, message in self._outgoing]


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

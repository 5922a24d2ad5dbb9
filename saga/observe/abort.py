"""``saga abort``: ask a saga's initiator to compensate it.

The request is an ``AbortRequested`` event on the saga's topic, keyed by the
saga id, like every message of the saga; only the initiating service acts on
it, and only while the saga is running: it turns the saga to compensating
with the given reason and asks for the compensation of the completed steps,
most recent first, as its deadline would.

Asking twice is harmless: the message id is derived from the saga (name and
id), so the initiator's inbox takes a second request for the first; and a
saga no longer running ignores it anyway.
"""

from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import UTC, datetime

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from outbox import KafkaSettings
from outbox.kafka import idempotence_refused
from saga.choreography import ABORT_REQUESTED
from saga.codec import AvroCodec
from saga.envelope import Envelope, EnvelopeCodec
from saga.errors import BrokerError
from saga.stamp import SagaStatus, Stamp
from saga.tracecontext import current_trace_headers

__all__ = ["abort_message_id", "request_abort"]

_NAMESPACE = uuid.UUID("9b1d1a52-3f0c-4c55-9d7e-6a2f0f3e0a11")


def abort_message_id(saga_name: str, saga_id: str) -> str:
    """The id of the abort request of a saga: the same every time it is asked."""
    return str(uuid.uuid5(_NAMESPACE, f"abort:{saga_name}:{saga_id}"))


async def request_abort(
    kafka: KafkaSettings,
    codec: AvroCodec,
    *,
    topic: str,
    saga_name: str,
    saga_id: str,
    reason: str,
    requested_by: str | None = None,
    known: Stamp | None = None,
) -> Envelope:
    """Publish the abort request of saga ``saga_id`` on ``topic``; return it.

    Args:
        known: The saga's stamp as last seen (from the saga log), if known; it
            gives the request its correlation id and hop. Otherwise a bare
            stamp is sent, which the initiator's view absorbs unchanged.
    """
    if known is not None:
        stamp = replace(known, hop=known.hop + 1)
    else:
        stamp = Stamp(
            saga_name=saga_name,
            saga_id=saga_id,
            status=SagaStatus.RUNNING,
            correlation_id=saga_id,
            started_at=datetime.now(UTC),
        )
    traceparent, tracestate = current_trace_headers()
    envelope = Envelope(
        type=ABORT_REQUESTED,
        data={"reason": reason, "requested_by": requested_by},
        source="/choreosaga/saga-abort",
        key=saga_id.encode(),
        id=abort_message_id(saga_name, saga_id),
        correlation_id=stamp.correlation_id,
        traceparent=traceparent,
        tracestate=tracestate,
        stamp=stamp,
    )
    key, value, headers = EnvelopeCodec(codec).encode(envelope)
    producer = AIOKafkaProducer(**kafka.producer_kwargs())
    started = False
    try:
        await producer.start()
        started = True
        await producer.send_and_wait(topic, value, key=key, headers=headers)
    except KafkaError as exc:
        refused = None if started else idempotence_refused(kafka, exc)
        raise BrokerError(refused or f"could not publish the abort request: {exc}") from exc
    finally:
        await producer.stop()
    return envelope

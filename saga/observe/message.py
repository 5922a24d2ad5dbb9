"""One observed saga message, as the saga log and ``saga trace`` see it.

The same function turns a decoded Kafka record into an
:class:`ObservedMessage` whether it is read by the observer (and stored) or by
a scan of the topics (``saga trace --from-kafka``), so that both give the
same trace.

Which step a message reports: a handler appends its step record to the stamp
and emits with it, so the step of a message is the stamp's last step record
when that record was made by the emitting service (the last segment of the
CloudEvents source, ``/choreosaga/<service>`` by default). Framework events
whose source is the service itself follow the same rule; a message whose
emitter recorded nothing (the first event, a deadline, a forwarded
compensation request) reports no step.

A deadline message (``DeadlineReached``) is written with the first event but
published only when due: its time is its due time (from its payload), and its
detail says so (``due <time>``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from saga.choreography import (
    COMPENSATE,
    DEADLINE_REACHED,
    FRAMEWORK_EVENTS,
    SAGA_ENDED,
    SAGA_SUSPENDED,
)
from saga.codec import AvroCodec
from saga.envelope import Envelope, EnvelopeCodec, H
from saga.errors import DecodeError
from saga.stamp import Stamp, StepOutcome, StepRecord

__all__ = [
    "ObservedMessage",
    "deadline_counted",
    "observe_envelope",
    "observe_record",
    "service_of",
    "stamp_from_json",
    "stamp_to_json",
    "trace_id_of",
]

_COMPENSATION_OUTCOMES = (StepOutcome.COMPENSATED.value, StepOutcome.COMPENSATION_FAILED.value)


@dataclass(frozen=True, kw_only=True)
class ObservedMessage:
    """What the saga log keeps of one message of a saga."""

    message_id: str
    """CloudEvents id of the message."""
    saga_name: str
    """Saga type."""
    saga_id: str
    """Saga instance id."""
    event_type: str
    """CloudEvents type (the Avro full name of the payload)."""
    source: str
    """CloudEvents source of the producing service."""
    service: str
    """Producing service's name (the last segment of ``source``)."""
    step: str | None
    """Step the producing service reported with this message, if any."""
    outcome: str | None
    """Outcome of that step (``DONE``, ``FAILED``, ``COMPENSATED``...)."""
    status: str
    """Saga status in the message's stamp."""
    reason: str | None
    """Why the saga is compensating or failed, per the stamp."""
    hop: int
    """Position of the message in the saga (see :mod:`saga.stamp`)."""
    time: datetime
    """When the message was emitted (CloudEvents time); for a deadline message,
    scheduled when its saga started, the time it was due."""
    causation_id: str | None
    """Id of the message that caused this one."""
    correlation_id: str | None
    """Correlation id of the message."""
    trace_id: str | None
    """W3C trace id, from ``traceparent``."""
    detail: str | None
    """For framework events, what they ask or announce (``step=...``, ``status=...``)."""
    stamp: str
    """The stamp as JSON text."""
    topic: str
    """Topic it was read from."""
    partition: int
    """Partition it was read from."""
    offset: int
    """Offset in that partition."""
    payload: str | None = None
    """The payload as JSON text, when payloads are kept."""

    @property
    def compensation(self) -> bool:
        """Whether this message belongs to the backward path (asks for or reports an undo)."""
        return self.event_type == COMPENSATE or self.outcome in _COMPENSATION_OUTCOMES


def service_of(source: str) -> str:
    """The service name in a CloudEvents source (its last path segment)."""
    name = source.rstrip("/").rsplit("/", 1)[-1]
    return name.rsplit(":", 1)[-1] or source


def trace_id_of(traceparent: str | None) -> str | None:
    """The trace id of a W3C ``traceparent``, or ``None`` if it is malformed."""
    if not traceparent:
        return None
    parts = traceparent.split("-")
    if len(parts) < 4 or len(parts[1]) != 32:
        return None
    return parts[1]


def _millis(moment: datetime) -> datetime:
    utc = moment.astimezone(UTC)
    return utc.replace(microsecond=utc.microsecond // 1000 * 1000)


def _reported_step(stamp: Stamp, service: str) -> StepRecord | None:
    if stamp.steps and stamp.steps[-1].service == service:
        return stamp.steps[-1]
    return None


def _json_value(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat(timespec="milliseconds")
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, Mapping):
        return {str(k): _json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_value(v) for v in value]
    return value


def stamp_to_json(stamp: Stamp) -> str:
    """The stamp as JSON text (times in ISO 8601 UTC), for people and SQL tools."""
    return json.dumps(_json_value(stamp.to_avro()), sort_keys=True)


def stamp_from_json(text: str) -> Stamp:
    """Read a stamp written by :func:`stamp_to_json`."""
    record = json.loads(text)
    for step in record["steps"]:
        step["at"] = datetime.fromisoformat(step["at"])
    record["started_at"] = datetime.fromisoformat(record["started_at"])
    if record["deadline"] is not None:
        record["deadline"] = datetime.fromisoformat(record["deadline"])
    if record.get("suspension") is not None:
        record["suspension"]["at"] = datetime.fromisoformat(record["suspension"]["at"])
    return Stamp.from_avro(record)


def _detail(event_type: str, data: Mapping[str, Any] | None) -> str | None:
    if data is None:
        return None
    if event_type == COMPENSATE:
        return f"step={data.get('step')}"
    if event_type == SAGA_ENDED:
        return f"status={data.get('status')}"
    if event_type == DEADLINE_REACHED and isinstance(data.get("deadline"), datetime):
        return f"due {_json_value(data['deadline'])}"
    if event_type == SAGA_SUSPENDED:
        return (
            f"at {data.get('service')} {data.get('role')} {data.get('step')}: {data.get('error')}"
        )
    return None


def _header(found: Mapping[str, bytes], name: str) -> str | None:
    value = found.get(name)
    if not value:
        return None
    try:
        return value.decode()
    except UnicodeDecodeError as exc:
        raise DecodeError(f"header {name} is not UTF-8", raw=value) from exc


def observe_record(
    codec: AvroCodec,
    *,
    value: bytes | None,
    headers: Sequence[tuple[str, bytes | None]],
    topic: str,
    partition: int,
    offset: int,
    payloads: bool = False,
) -> ObservedMessage | None:
    """The saga log's view of a Kafka record; ``None`` if it carries no stamp.

    Only the headers and the stamp are needed: the payload is decoded for the
    framework's own events, and for others only when ``payloads`` is asked
    (and then only if ``codec`` knows its schema), so that the observer needs
    no copy of the services' schemas.

    Raises:
        DecodeError: A header or the stamp is unreadable.
    """
    found = {name: raw or b"" for name, raw in headers}
    stamp = EnvelopeCodec(codec).read_stamp(found)
    if stamp is None:
        return None
    event_type = _header(found, H.TYPE)
    source = _header(found, H.SOURCE)
    message_id = _header(found, H.ID)
    sent = _header(found, H.TIME)
    if not event_type or not source or not message_id or not sent:
        raise DecodeError("a CloudEvents header (id, type, source, time) is missing", raw=b"")
    try:
        time = datetime.fromisoformat(sent)
    except ValueError as exc:
        raise DecodeError(f"ce_time is not a time: {sent!r}", raw=b"") from exc
    if time.tzinfo is None:
        raise DecodeError(f"ce_time has no time zone: {sent!r}", raw=b"")
    data: Mapping[str, Any] | None = None
    if payloads or event_type in FRAMEWORK_EVENTS:
        try:
            _, data = codec.decode(value or b"", expected=event_type)
        except DecodeError:
            data = None
    observed = _observed(
        stamp,
        event_type=event_type,
        source=source,
        message_id=message_id,
        time=time,
        causation_id=_header(found, H.CAUSATION_ID),
        correlation_id=_header(found, H.CORRELATION_ID),
        traceparent=_header(found, H.TRACEPARENT),
        data=data,
        payloads=payloads,
        topic=topic,
        partition=partition,
        offset=offset,
    )
    error_type = _header(found, "dlq_error_type")
    if error_type is None:
        return observed
    # A dead letter: the original record with why it failed. Logged as a row
    # of its own (its message id is the original's), so the trace shows it.
    what = _header(found, "dlq_step") or _header(found, "dlq_role") or "?"
    message = (_header(found, "dlq_error_message") or "")[:200]
    return replace(
        observed,
        message_id=f"dlq:{topic}/{partition}/{offset}"[:200],
        service=_header(found, "dlq_service") or observed.service,
        outcome="DEAD_LETTERED",
        detail=f"dead-lettered at {what}: {error_type.rsplit('.', 1)[-1]}: {message}",
        time=_dead_letter_time(found) or observed.time,
    )


def _dead_letter_time(found: Mapping[str, bytes]) -> datetime | None:
    text = _header(found, "dlq_last_failure")
    try:
        return None if text is None else datetime.fromisoformat(text)
    except ValueError:
        return None


def observe_envelope(
    envelope: Envelope, *, topic: str, partition: int, offset: int, payloads: bool = False
) -> ObservedMessage | None:
    """The saga log's view of a decoded message; ``None`` if it carries no stamp."""
    if envelope.stamp is None:
        return None
    return _observed(
        envelope.stamp,
        event_type=envelope.type,
        source=envelope.source,
        message_id=envelope.id,
        time=envelope.time,
        causation_id=envelope.causation_id,
        correlation_id=envelope.correlation_id,
        traceparent=envelope.traceparent,
        data=envelope.data,
        payloads=payloads,
        topic=topic,
        partition=partition,
        offset=offset,
    )


def _observed(
    stamp: Stamp,
    *,
    event_type: str,
    source: str,
    message_id: str,
    time: datetime,
    causation_id: str | None,
    correlation_id: str | None,
    traceparent: str | None,
    data: Mapping[str, Any] | None,
    payloads: bool,
    topic: str,
    partition: int,
    offset: int,
) -> ObservedMessage:
    service = service_of(source)
    reported = _reported_step(stamp, service)
    due = None if data is None else data.get("deadline")
    if event_type == DEADLINE_REACHED and isinstance(due, datetime) and due > time:
        # Written with the first event, published by the relay only when due:
        # it happens then (a trace would otherwise show the deadline firing at once).
        time = due
    return ObservedMessage(
        message_id=message_id,
        saga_name=stamp.saga_name,
        saga_id=stamp.saga_id,
        event_type=event_type,
        source=source,
        service=service,
        step=None if reported is None else reported.name,
        outcome=None if reported is None else reported.outcome.value,
        status=stamp.status.value,
        reason=stamp.reason,
        hop=stamp.hop,
        # Milliseconds, as the log stores them: the same trace from either source.
        time=_millis(time),
        causation_id=causation_id,
        correlation_id=correlation_id,
        trace_id=trace_id_of(traceparent),
        detail=_detail(event_type, data),
        stamp=stamp_to_json(stamp),
        topic=topic,
        partition=partition,
        offset=offset,
        payload=json.dumps(_json_value(dict(data)), sort_keys=True)
        if payloads and data is not None
        else None,
    )


def deadline_counted(stamp: Stamp, *, resumed: bool) -> Stamp:
    """The stamp of a deadline message as far as its deadline may move a saga's.

    Only a resume moves a deadline, and when a participant was the one that
    resumed, the new deadline message is what first carries the moved deadline
    to the log. Before any resume, a deadline message's deadline can only be
    the saga's own or an earlier saga's of the same name and id (forgotten by
    retention, whose deadline fires however long ago it ended): keeping the
    latest deadline, the log would take that one. So it counts only once the
    saga has resumed (then an earlier saga's is still taken: it needs both a
    reused id and a resume).
    """
    return stamp if resumed else replace(stamp, deadline=None)

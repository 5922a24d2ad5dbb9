"""The envelope: one domain event as a Kafka record, with nothing hidden.

Layout of a record (see the message contract in the design):

* key: the saga id (or another partition key chosen by the service);
* value: the event, Avro single-object encoded (schema fingerprint + body);
* headers, CloudEvents Kafka binding in binary mode: ``ce_specversion``,
  ``ce_id``, ``ce_type`` (the Avro full name), ``ce_source``, ``ce_time``,
  ``content-type``, and ``ce_subject`` (the saga id) when stamped; the
  CloudEvents extensions ``ce_correlationid`` and ``ce_causationid``; W3C
  ``traceparent`` and ``tracestate``; and ``saga_stamp``, the state stamp,
  Avro single-object encoded.

Any Kafka tool can read such a record, and any Avro library can decode the
value and the stamp given the schemas in ``schemas/``.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

from saga.codec import AvroCodec
from saga.errors import ConfigurationError, DecodeError
from saga.stamp import STAMP_SCHEMA, Stamp

__all__ = ["CONTENT_TYPE", "Envelope", "EnvelopeCodec", "Headers"]

CONTENT_TYPE = "application/avro"
"""Media type of record values (Avro single-object encoding)."""

SPECVERSION = "1.0"

Headers = list[tuple[str, bytes]]


class H:
    """Header names, in one place."""

    SPECVERSION = "ce_specversion"
    ID = "ce_id"
    TYPE = "ce_type"
    SOURCE = "ce_source"
    TIME = "ce_time"
    SUBJECT = "ce_subject"
    CONTENT_TYPE = "content-type"
    CORRELATION_ID = "ce_correlationid"
    CAUSATION_ID = "ce_causationid"
    TRACEPARENT = "traceparent"
    TRACESTATE = "tracestate"
    STAMP = "saga_stamp"


def new_id() -> str:
    """A fresh message id."""
    return str(uuid.uuid4())


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, kw_only=True)
class Envelope:
    """A domain event with its identity, lineage, trace context and saga stamp."""

    type: str
    """Event type: the Avro full name of the payload's schema."""

    data: Mapping[str, Any]
    """The event payload, as an Avro record (a mapping)."""

    source: str
    """URI-reference of the service that emitted the event."""

    key: bytes | None = None
    """Kafka record key (by default the saga id)."""

    id: str = field(default_factory=new_id)
    """Unique message id; consumers deduplicate on it."""

    time: datetime = field(default_factory=_now)
    """When the event was emitted."""

    correlation_id: str | None = None
    """Id shared by every message of one business transaction."""

    causation_id: str | None = None
    """Id of the message that caused this one."""

    traceparent: str | None = None
    """W3C trace context of the emitter."""

    tracestate: str | None = None
    """W3C vendor trace state."""

    stamp: Stamp | None = None
    """State stamp of the saga this event belongs to."""

    def __post_init__(self) -> None:
        if not self.type or not self.source or not self.id:
            raise ConfigurationError("an envelope needs a type, a source and an id")
        if self.time.tzinfo is None:
            raise ConfigurationError("envelope time must be timezone-aware")
        object.__setattr__(self, "data", MappingProxyType(dict(self.data)))


def _header_map(headers: Sequence[tuple[str, bytes | None]]) -> dict[str, bytes]:
    # Last value wins, as in most Kafka header APIs; absent values count as empty.
    return {name: value or b"" for name, value in headers}


class EnvelopeCodec:
    """Turns envelopes into Kafka records and back.

    Args:
        codec: The Avro codec for values and stamps.
    """

    def __init__(self, codec: AvroCodec) -> None:
        self.codec = codec

    def encode(self, envelope: Envelope) -> tuple[bytes | None, bytes, Headers]:
        """Return ``(key, value, headers)`` for ``envelope``."""
        value = self.codec.encode(envelope.type, envelope.data)
        headers: Headers = [
            (H.SPECVERSION, SPECVERSION.encode()),
            (H.ID, envelope.id.encode()),
            (H.TYPE, envelope.type.encode()),
            (H.SOURCE, envelope.source.encode()),
            (H.TIME, envelope.time.astimezone(UTC).isoformat().encode()),
            (H.CONTENT_TYPE, CONTENT_TYPE.encode()),
        ]
        optional = (
            (H.CORRELATION_ID, envelope.correlation_id),
            (H.CAUSATION_ID, envelope.causation_id),
            (H.TRACEPARENT, envelope.traceparent),
            (H.TRACESTATE, envelope.tracestate),
        )
        headers.extend((name, text.encode()) for name, text in optional if text)
        if envelope.stamp is not None:
            headers.append((H.SUBJECT, envelope.stamp.saga_id.encode()))
            headers.append((H.STAMP, self.codec.encode(STAMP_SCHEMA, envelope.stamp.to_avro())))
        return envelope.key, value, headers

    def decode(
        self,
        key: bytes | None,
        value: bytes | None,
        headers: Sequence[tuple[str, bytes | None]],
    ) -> Envelope:
        """Read an envelope from a record.

        Raises:
            DecodeError: The record is not a valid envelope; ``raw`` holds the
                value exactly as received.
        """
        raw = value if value is not None else b""
        found = _header_map(headers)
        try:
            declared = self._text(found, H.TYPE, raw)
            name, data = self.codec.decode(raw, expected=declared)
            stamp = None
            if H.STAMP in found:
                _, stamp_record = self.codec.decode(found[H.STAMP], expected=STAMP_SCHEMA)
                stamp = Stamp.from_avro(stamp_record)
            return Envelope(
                type=name,
                data=data,
                source=self._text(found, H.SOURCE, raw),
                key=key,
                id=self._text(found, H.ID, raw),
                time=self._time(found, raw),
                correlation_id=self._optional(found, H.CORRELATION_ID, raw),
                causation_id=self._optional(found, H.CAUSATION_ID, raw),
                traceparent=self._optional(found, H.TRACEPARENT, raw),
                tracestate=self._optional(found, H.TRACESTATE, raw),
                stamp=stamp,
            )
        except DecodeError as exc:
            if exc.raw is raw:
                raise
            raise DecodeError(str(exc), raw=raw) from exc
        except (ConfigurationError, KeyError, ValueError, TypeError, AttributeError) as exc:
            raise DecodeError(f"invalid envelope: {exc}", raw=raw) from exc

    @staticmethod
    def _optional(found: Mapping[str, bytes], name: str, raw: bytes) -> str | None:
        value = found.get(name)
        if not value:
            return None
        try:
            return value.decode()
        except UnicodeDecodeError as exc:
            raise DecodeError(f"header {name} is not UTF-8", raw=raw) from exc

    @classmethod
    def _text(cls, found: Mapping[str, bytes], name: str, raw: bytes) -> str:
        text = cls._optional(found, name, raw)
        if text is None:
            raise DecodeError(f"missing header {name}", raw=raw)
        return text

    @classmethod
    def _time(cls, found: Mapping[str, bytes], raw: bytes) -> datetime:
        text = cls._text(found, H.TIME, raw)
        moment = datetime.fromisoformat(text)
        if moment.tzinfo is None:
            raise DecodeError(f"header {H.TIME} has no time zone: {text!r}", raw=raw)
        return moment

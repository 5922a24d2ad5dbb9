"""The envelope: one domain event as a Kafka record, with nothing hidden.

Layout of a record (see the message contract in the design):

* key: the saga id (or another partition key chosen by the service);
* value: the event, Avro single-object encoded (schema fingerprint + body);
* headers, CloudEvents Kafka binding in binary mode: ``ce_specversion``,
  ``ce_id``, ``ce_type`` (the Avro full name), ``ce_source``, ``ce_time``,
  ``content-type``, and ``ce_subject`` (the saga id) when stamped; the
  CloudEvents extensions ``ce_correlationid``, ``ce_causationid`` and
  ``ce_sagastamp`` (the state stamp: base64 of its Avro single-object
  encoding); W3C ``traceparent`` and ``tracestate``.

Every header value is UTF-8 text, so that the CloudEvents SDKs (which decode
every Kafka header as UTF-8) and the usual Kafka tools read the records.
Records written before the stamp became text carry it as raw Avro bytes in a
``saga_stamp`` header; that header is still read.

Any Kafka tool can read such a record, and any Avro library can decode the
value and the stamp given the schemas in ``schemas/``.

Decoding takes untrusted records: :meth:`EnvelopeCodec.decode` raises
:class:`~saga.errors.DecodeError` for anything it cannot vouch for (missing,
non-UTF-8 or oversized headers, a ``ce_type`` other than the value's schema,
a stamp over its bounds...), each bound checked before the bytes it guards
are parsed (:class:`~saga.codec.DecodeLimits`). Malformed trace headers are
the exception: they are dropped and the envelope has no trace context.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

from outbox.message import time_ordered_id
from saga.codec import AvroCodec, DecodeLimits
from saga.errors import ConfigurationError, DecodeError, EncodeError
from saga.stamp import MAX_STEP_DATA_ITEMS, STAMP_SCHEMA, Stamp
from saga.tracecontext import valid_trace_headers

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
    STAMP = "ce_sagastamp"
    """The state stamp, base64 (RFC 4648, padded) of its Avro single-object encoding.

    A CloudEvents extension attribute (``sagastamp``), so SDKs expose it.
    """
    LEGACY_STAMP = "saga_stamp"
    """The state stamp as raw Avro single-object bytes, as written before
    :attr:`STAMP`; read, never written."""


def new_id() -> str:
    """A fresh message id: a UUID version 7, led by the time (``time_ordered_id``)."""
    return time_ordered_id()


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


def _base64_size(size: int) -> int:
    return 4 * ((size + 2) // 3)


class EnvelopeCodec:
    """Turns envelopes into Kafka records and back.

    Args:
        codec: The Avro codec for values and stamps.
        limits: Bounds on decoded records; by default those of ``codec``.
            Encoding refuses what decoding with them would refuse.
    """

    def __init__(self, codec: AvroCodec, *, limits: DecodeLimits | None = None) -> None:
        self.codec = codec
        self.limits = limits or codec.limits
        # The last record decoded, by identity: tracing reads a record's
        # envelope just before the pipeline decodes the very same objects, and
        # a record's Avro payload and stamp are then parsed once, not twice.
        self._last: tuple[object, object, object, Envelope] | None = None

    def encode(self, envelope: Envelope) -> tuple[bytes | None, bytes, Headers]:
        """Return ``(key, value, headers)`` for ``envelope``.

        Raises:
            EncodeError: The payload does not fit its schema, or a header or
                the stamp is over :attr:`limits` (a reader would refuse it).
        """
        value = self.codec.encode(envelope.type, envelope.data)
        headers: Headers = [
            (H.SPECVERSION, SPECVERSION.encode()),
            (H.ID, self._header_text(H.ID, envelope.id)),
            (H.TYPE, self._header_text(H.TYPE, envelope.type)),
            (H.SOURCE, self._header_text(H.SOURCE, envelope.source)),
            (H.TIME, envelope.time.astimezone(UTC).isoformat().encode()),
            (H.CONTENT_TYPE, CONTENT_TYPE.encode()),
        ]
        lineage = (
            (H.CORRELATION_ID, envelope.correlation_id),
            (H.CAUSATION_ID, envelope.causation_id),
        )
        headers.extend((name, self._header_text(name, text)) for name, text in lineage if text)
        # Trace context is best effort: what readers would drop is not written,
        # and never fails a message.
        traceparent, tracestate = valid_trace_headers(
            envelope.traceparent.encode() if envelope.traceparent else None,
            envelope.tracestate.encode() if envelope.tracestate else None,
            max_bytes=self.limits.max_header_bytes,
        )
        if traceparent:
            headers.append((H.TRACEPARENT, traceparent.encode()))
        if tracestate:
            headers.append((H.TRACESTATE, tracestate.encode()))
        if envelope.stamp is not None:
            headers.append((H.SUBJECT, self._header_text(H.SUBJECT, envelope.stamp.saga_id)))
            headers.append((H.STAMP, base64.b64encode(self.encode_stamp(envelope.stamp))))
        return envelope.key, value, headers

    def encode_stamp(self, stamp: Stamp) -> bytes:
        """The stamp in Avro single-object encoding (what :attr:`H.STAMP` carries in base64).

        Raises:
            EncodeError: The stamp has more steps or bytes than :attr:`limits` allow.
        """
        if len(stamp.steps) > self.limits.max_stamp_steps:
            raise EncodeError(
                f"stamp of saga {stamp.saga_id} has {len(stamp.steps)} steps, "
                f"over the limit of {self.limits.max_stamp_steps}"
            )
        data = self.codec.encode(STAMP_SCHEMA, stamp.to_avro())
        if len(data) > self.limits.max_stamp_bytes:
            raise EncodeError(
                f"stamp of saga {stamp.saga_id} takes {len(data)} bytes, "
                f"over the limit of {self.limits.max_stamp_bytes}"
            )
        return data

    def _header_text(self, name: str, text: str) -> bytes:
        data = text.encode()
        if len(data) > self.limits.max_header_bytes:
            raise EncodeError(
                f"header {name} would take {len(data)} bytes, "
                f"over the limit of {self.limits.max_header_bytes}"
            )
        return data

    def decode(
        self,
        key: bytes | None,
        value: bytes | None,
        headers: Sequence[tuple[str, bytes | None]],
    ) -> Envelope:
        """Read an envelope from a record.

        Raises:
            DecodeError: The record is not a valid envelope, and this is the
                only exception raised; ``raw`` holds the value exactly as
                received, the message says what is wrong without quoting it.
        """
        last = self._last
        if last is not None and last[0] is value and last[1] is headers and last[2] is key:
            return last[3]
        raw = value if isinstance(value, bytes) else b""
        try:
            envelope = self._decode(key, raw, headers)
        except DecodeError as exc:
            if exc.raw is raw:
                raise
            raise DecodeError(str(exc), raw=raw) from exc
        except Exception as exc:
            # The record is untrusted: whatever it makes fail (a stamp that
            # breaks an invariant, an odd header list...) is bad input to be
            # dead-lettered, never a crash of the consumer.
            raise DecodeError(f"invalid envelope: {type(exc).__name__}", raw=raw) from exc
        # Only immutable values (bytes) or the same list object can match again.
        self._last = (value, headers, key, envelope)
        return envelope

    def _decode(
        self, key: bytes | None, raw: bytes, headers: Sequence[tuple[str, bytes | None]]
    ) -> Envelope:
        limits = self.limits
        if len(headers) > limits.max_headers:
            raise DecodeError(
                f"{len(headers)} headers, over the limit of {limits.max_headers}", raw=raw
            )
        found = _header_map(headers)
        specversion = self._text(found, H.SPECVERSION, raw)
        if specversion != SPECVERSION:
            raise DecodeError(f"header {H.SPECVERSION} is not {SPECVERSION}", raw=raw)
        declared = self._text(found, H.TYPE, raw)
        name, data = self.codec.decode(
            raw,
            expected=declared,
            max_bytes=limits.max_value_bytes,
            max_items=limits.max_items,
        )
        traceparent, tracestate = valid_trace_headers(
            found.get(H.TRACEPARENT), found.get(H.TRACESTATE), max_bytes=limits.max_header_bytes
        )
        return Envelope(
            type=name,
            data=data,
            source=self._text(found, H.SOURCE, raw),
            key=key,
            id=self._text(found, H.ID, raw),
            time=self._time(found, raw),
            correlation_id=self._optional(found, H.CORRELATION_ID, raw),
            causation_id=self._optional(found, H.CAUSATION_ID, raw),
            traceparent=traceparent,
            tracestate=tracestate,
            stamp=self._stamp(found, raw),
        )

    def identity(self, headers: Sequence[tuple[str, bytes | None]]) -> tuple[str, str] | None:
        """A record's ``(source, id)`` from its headers alone, or ``None`` if they are unreadable.

        Cheap (no payload decoding), for looking up a batch's messages in the
        inbox before they run; :meth:`decode` still validates every record.
        """
        if len(headers) > self.limits.max_headers:
            return None
        found = _header_map(headers)
        try:
            source = self._optional(found, H.SOURCE, b"")
            message_id = self._optional(found, H.ID, b"")
        except DecodeError:
            return None
        if source is None or message_id is None:
            return None
        return source, message_id

    def read_stamp(self, headers: Mapping[str, bytes]) -> Stamp | None:
        """The stamp a record's headers carry (current or legacy form), within the limits.

        For readers that want the stamp without the payload (the saga log).

        Raises:
            DecodeError: The stamp header is unreadable or over the limits.
        """
        return self._stamp(headers, b"")

    def _stamp(self, found: Mapping[str, bytes], raw: bytes) -> Stamp | None:
        limits = self.limits
        if H.STAMP in found:
            text = found[H.STAMP]
            if len(text) > _base64_size(limits.max_stamp_bytes):
                raise DecodeError(
                    f"header {H.STAMP} of {len(text)} bytes is over the "
                    f"{limits.max_stamp_bytes}-byte stamp limit",
                    raw=raw,
                )
            try:
                data = base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError):
                raise DecodeError(f"header {H.STAMP} is not base64", raw=raw) from None
        elif H.LEGACY_STAMP in found:
            data = found[H.LEGACY_STAMP]
        else:
            return None
        _, record = self.codec.decode(
            data,
            expected=STAMP_SCHEMA,
            max_bytes=limits.max_stamp_bytes,
            # Steps and their data entries, so that the check below runs on a
            # record whose size is already bounded.
            max_items=limits.max_stamp_steps * (1 + MAX_STEP_DATA_ITEMS),
        )
        steps = len(record["steps"])
        if steps > limits.max_stamp_steps:
            raise DecodeError(
                f"stamp of {steps} steps, over the limit of {limits.max_stamp_steps}", raw=raw
            )
        try:
            return Stamp.from_avro(record)
        except (ConfigurationError, ValueError, KeyError, TypeError) as exc:
            # Its messages may quote step data: name the kind only.
            raise DecodeError(
                f"the stamp breaks an invariant of Stamp ({type(exc).__name__})", raw=raw
            ) from exc

    def _optional(self, found: Mapping[str, bytes], name: str, raw: bytes) -> str | None:
        value = found.get(name)
        if not value:
            return None
        if len(value) > self.limits.max_header_bytes:
            raise DecodeError(
                f"header {name} of {len(value)} bytes is over the "
                f"{self.limits.max_header_bytes}-byte limit",
                raw=raw,
            )
        try:
            return value.decode()
        except UnicodeDecodeError:
            raise DecodeError(f"header {name} is not UTF-8", raw=raw) from None

    def _text(self, found: Mapping[str, bytes], name: str, raw: bytes) -> str:
        text = self._optional(found, name, raw)
        if text is None:
            raise DecodeError(f"missing header {name}", raw=raw)
        return text

    def _time(self, found: Mapping[str, bytes], raw: bytes) -> datetime:
        text = self._text(found, H.TIME, raw)
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            raise DecodeError(f"header {H.TIME} is not an RFC 3339 time", raw=raw) from None
        if moment.tzinfo is None:
            raise DecodeError(f"header {H.TIME} has no time zone", raw=raw)
        return moment

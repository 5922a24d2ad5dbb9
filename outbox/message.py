"""Messages as written to the outbox and as read back by the relay."""

from __future__ import annotations

import base64
import binascii
import json
import os
import time
import uuid
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from outbox.errors import ConfigurationError

__all__ = [
    "Header",
    "OutboxMessage",
    "ParkedMessage",
    "StoredMessage",
    "shard_of",
    "time_ordered_id",
]

Header = tuple[str, bytes]
"""A Kafka header: a text name and a byte value (names may repeat)."""

_MAX_TOPIC = 249


def time_ordered_id() -> str:
    """A fresh UUID version 7 (RFC 9562): 48 bits of Unix milliseconds, then 74 random bits.

    Message ids are the keys of the outbox and of every consumer's inbox.
    Random (version 4) ids land each insert on a random page of those
    indexes; once the tables hold millions of rows, every insert after a
    checkpoint writes a full page to the WAL. Ids led by the time append
    near the right edge of the index instead, so a year-old inbox costs
    what a new one does. They stay as unique as version 4 ids within a
    millisecond (74 random bits).
    """
    millis = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (
        (millis & 0xFFFF_FFFF_FFFF) << 80
        | 0x7 << 76
        | (rand >> 68) << 64  # rand_a: 12 bits
        | 0b10 << 62  # the RFC variant
        | rand & 0x3FFF_FFFF_FFFF_FFFF  # rand_b: 62 bits
    )
    return str(uuid.UUID(int=value))


@dataclass(frozen=True, kw_only=True)
class OutboxMessage:
    """A record to publish once the surrounding transaction commits."""

    topic: str
    """Kafka topic to publish to."""

    value: bytes | None
    """Record value (``None`` publishes a tombstone)."""

    key: bytes | None = None
    """Record key. Records with the same key are published in commit order."""

    headers: Sequence[Header] = ()
    """Record headers, in order."""

    message_id: str = field(default_factory=time_ordered_id)
    """Unique id of this message (consumers deduplicate on it)."""

    delay: timedelta | None = None
    """Publish no sooner than this long after the commit (database clock)."""

    deliver_at: datetime | None = None
    """Publish no sooner than this time (timezone-aware); exclusive with ``delay``."""

    def __post_init__(self) -> None:
        if not isinstance(self.topic, str) or not 0 < len(self.topic) <= _MAX_TOPIC:
            raise ConfigurationError(f"topic must be 1-{_MAX_TOPIC} characters, not {self.topic!r}")
        if self.value is not None and not isinstance(self.value, bytes):
            raise ConfigurationError("value must be bytes or None")
        if self.key is not None and not isinstance(self.key, bytes):
            raise ConfigurationError("key must be bytes or None")
        if not self.message_id or len(self.message_id) > 200:
            raise ConfigurationError("message_id must be 1-200 characters")
        object.__setattr__(self, "headers", tuple(self.headers))
        for name, value in self.headers:
            if not isinstance(name, str) or not isinstance(value, bytes):
                raise ConfigurationError(f"header {name!r} must be (str, bytes)")
        if self.delay is not None and self.deliver_at is not None:
            raise ConfigurationError("give delay or deliver_at, not both")
        if self.delay is not None and self.delay < timedelta(0):
            raise ConfigurationError("delay must not be negative")
        if self.deliver_at is not None and self.deliver_at.tzinfo is None:
            raise ConfigurationError("deliver_at must be timezone-aware")


@dataclass(frozen=True, kw_only=True, slots=True)
class StoredMessage:
    """An outbox row waiting to be published, as the relay reads it."""

    id: int
    """Row id (only meaningful together with ``message_id``: SQLite reuses ids)."""

    message_id: str
    """The message's unique id."""

    topic: str
    """Kafka topic."""

    key: bytes | None
    """Record key."""

    value: bytes | None
    """Record value."""

    headers: tuple[Header, ...]
    """Record headers."""

    shard: int
    """Key-hash shard the row belongs to."""

    attempts: int
    """Failed publish attempts so far."""


@dataclass(frozen=True, kw_only=True)
class ParkedMessage:
    """A row the relay gave up on, with the reason; it can be retried."""

    message: StoredMessage
    """The parked row."""

    error: str
    """Why it could not be published."""

    parked_at: datetime
    """When it was parked (database clock)."""


def shard_of(key: bytes | None, message_id: str, shards: int) -> int:
    """Return the shard of a record: by key, or by message id for keyless records."""
    data = key if key is not None else message_id.encode()
    return zlib.crc32(data) % shards


def encode_headers(headers: Sequence[Header]) -> list[list[str]]:
    """Encode headers for the JSON ``headers`` column (values in base64)."""
    return [[name, base64.b64encode(value).decode("ascii")] for name, value in headers]


def decode_headers(stored: Any) -> tuple[Header, ...]:
    """Decode the JSON ``headers`` column."""
    # binascii directly: the relay decodes every header of every row it reads.
    return tuple((str(name), binascii.a2b_base64(value)) for name, value in stored)


def decode_headers_texts(texts: Sequence[str]) -> list[tuple[Header, ...]]:
    """Decode the JSON text of many ``headers`` columns, in order.

    The relay reads the headers of every row it publishes: one ``json.loads``
    over the whole batch costs a fraction of one call per row (and of
    psycopg's per-row JSON loader). Each text is a whole JSON value (the
    column's own text: PostgreSQL's ``json`` type refuses anything else, and
    SQLite holds what :func:`encode_headers` wrote).

    Raises:
        ValueError: A text was not one JSON array of headers.
    """
    if not texts:
        return []
    decoded = json.loads("[" + ",".join(texts) + "]")
    if len(decoded) != len(texts):
        raise ValueError(f"{len(texts)} headers columns decoded into {len(decoded)} values")
    a2b = binascii.a2b_base64
    return [tuple([(name, a2b(value)) for name, value in headers]) for headers in decoded]


_new = object.__new__
(
    _set_id,
    _set_message_id,
    _set_topic,
    _set_key,
    _set_value,
    _set_headers,
    _set_shard,
    _set_attempts,
) = (
    getattr(StoredMessage, name).__set__
    for name in ("id", "message_id", "topic", "key", "value", "headers", "shard", "attempts")
)


def stored_messages(rows: Iterable[Sequence[Any]]) -> list[StoredMessage]:
    """Stored messages from the relay's outbox rows, in order.

    Each row is ``(id, message_id, topic, key, value, headers, shard,
    attempts)``, ``headers`` being the column's JSON text. The relay builds
    one message per row it publishes: the fields are set through their slots
    directly, as the frozen dataclass's ``__init__`` does, without its
    keyword arguments (half the time).

    What lives as long as a batch matters to the garbage collector: each
    object still alive when it collects its middle generation moves to the
    oldest, and every 25% more objects there set off a full collection (tens
    of milliseconds in a large process). Hence slots rather than an instance
    dictionary; and the caller converts a batch a slice at a time, since the
    allocations here set off collections while the rows and decoded headers
    are alive.
    """
    rows = list(rows)
    headers = decode_headers_texts([row[5] for row in rows])
    messages = []
    for (id_, message_id, topic, key, value, _, shard, attempts), decoded in zip(
        rows, headers, strict=True
    ):
        message = _new(StoredMessage)
        _set_id(message, id_)
        _set_message_id(message, message_id)
        _set_topic(message, topic)
        _set_key(message, key)
        _set_value(message, value)
        _set_headers(message, decoded)
        _set_shard(message, shard)
        _set_attempts(message, attempts)
        messages.append(message)
    return messages

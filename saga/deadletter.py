"""Dead letters: a record that cannot be processed, kept byte for byte with why.

A dead letter is the original record, unchanged (key, value and headers byte
for byte), published to the dead-letter topic of its topic (``<topic>.dlq``
by default) with these headers appended, all UTF-8 text:

======================== ==================================================
header                   meaning
======================== ==================================================
``dlq_error_type``       qualified name of the error (``builtins.KeyError``)
``dlq_error_message``    its message, at most 1,000 characters
``dlq_error_trace``      the last frames of its traceback, at most 4,000
``dlq_service``          service that gave up on the record
``dlq_group``            its consumer group
``dlq_attempts``         attempts made
``dlq_first_failure``    ISO 8601 time of the first failed attempt
``dlq_last_failure``     ISO 8601 time of the last one
``dlq_topic``            original topic
``dlq_partition``        original partition
``dlq_offset``           original offset
``dlq_saga_name``        saga name, when the record is a saga message
``dlq_saga_id``          saga id, idem
``dlq_step``             step being performed or compensated, if any
``dlq_role``             ``step``, ``compensation``, ``end``, ``deadline``,
                         ``handler`` (plain messages) or ``decode`` (bad input)
======================== ==================================================

A header that had no value at all is kept with an empty value (the outbox
stores bytes). Dead letters are written through the service's outbox in the same
transaction that suspends the saga, so both happen or neither does; the
relay publishes them like any other row. The original record's offset is
committed only after that commit: a crash before it redelivers the record,
and the inbox entry keyed by its topic, partition and offset keeps it from
being dead-lettered twice.

Replaying a dead letter (:mod:`saga.dlq`) sends the original key, value and
headers back to the original topic with a ``dlq_replay`` header and a
``dlq_replay_group`` header naming the consumer group that failed: other
groups reading that topic skip it, and the failing group's inbox makes a
replay apply at most once.
"""

from __future__ import annotations

import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from outbox import OutboxMessage
from outbox.failures import describe
from saga.errors import ConfigurationError

__all__ = [
    "DEAD_LETTER_PREFIX",
    "REPLAY_GROUP_HEADER",
    "REPLAY_HEADER",
    "DeadLetter",
    "Failure",
    "dead_letter_message",
    "dead_letter_topic",
    "replayed",
    "replayed_for_another_group",
]

DEAD_LETTER_PREFIX = "dlq_"
"""Prefix of the headers a dead letter adds to the original record."""

REPLAY_HEADER = "dlq_replay"
"""Header a replayed record carries: ``<dead-letter topic>/<partition>/<offset>``."""

REPLAY_GROUP_HEADER = "dlq_replay_group"
"""Header a replayed record carries: the consumer group it is meant for. Other
groups that read the original topic skip it (they handled the record before)."""


def replayed(headers: Sequence[tuple[str, bytes | None]]) -> bool:
    """Whether a record with ``headers`` is a replayed dead letter (``saga dlq replay``)."""
    return any(name == REPLAY_HEADER for name, _ in headers)


def replayed_for_another_group(headers: Sequence[tuple[str, bytes | None]], group: str) -> bool:
    """Whether a record with ``headers`` is a dead letter replayed for a group not ``group``."""
    for name, value in headers:
        if name == REPLAY_GROUP_HEADER:
            return (value or b"").decode("utf-8", "replace") != group
    return False


_FIELDS = (
    "error_type",
    "error_message",
    "error_trace",
    "service",
    "group",
    "attempts",
    "first_failure",
    "last_failure",
    "topic",
    "partition",
    "offset",
    "role",
    "saga_name",
    "saga_id",
    "step",
)
_ADDED = frozenset(DEAD_LETTER_PREFIX + name for name in _FIELDS)

_MAX_MESSAGE = 1000
_MAX_TRACE = 4000
_TRACE_FRAMES = 8


def dead_letter_topic(template: str, topic: str) -> str:
    """The dead-letter topic of ``topic`` for a template such as ``"{topic}.dlq"``."""
    return template.replace("{topic}", topic)


def check_template(template: str) -> str:
    """Refuse a dead-letter topic template that cannot name a topic."""
    if (
        not template
        or len(template.replace("{topic}", "")) > 100
        or "{" in template.replace("{topic}", "")
    ):
        raise ConfigurationError(
            f"dead-letter topic {template!r} must be a topic name, optionally with {{topic}}"
        )
    return template


@dataclass(frozen=True, kw_only=True)
class Failure:
    """Why and when a record was given up on."""

    error: BaseException
    """The last error (for a handler, the user's own exception when there is one)."""

    attempts: int
    """Attempts made."""

    first: datetime
    """When the first attempt failed."""

    last: datetime
    """When the last attempt failed."""

    @property
    def error_type(self) -> str:
        """Qualified name of the error's class (the driver's, for a database error)."""
        orig = getattr(self.error, "orig", None)  # SQLAlchemy wraps the driver's error
        cls = type(orig) if isinstance(orig, BaseException) else type(self.error)
        return f"{cls.__module__}.{cls.__qualname__}"

    @property
    def message(self) -> str:
        """The error's message, bounded."""
        return str(self.error)[:_MAX_MESSAGE]

    def summary(self) -> str:
        """``Type: message``, the short form kept in a suspension and in logs.

        It never quotes data: a database error keeps its class, SQLSTATE and
        primary message, without the statement or the failing row's values
        (those stay in the dead letter's ``dlq_error_message``).
        """
        return describe(self.error)

    def trace(self) -> str:
        """The last frames of the traceback, bounded."""
        lines = traceback.format_exception(self.error, limit=-_TRACE_FRAMES, chain=False)
        return "".join(lines)[-_MAX_TRACE:]


def dead_letter_message(
    *,
    topic: str,
    key: bytes | None,
    value: bytes | None,
    headers: Sequence[tuple[str, bytes | None]],
    origin: tuple[str, int, int],
    failure: Failure,
    service: str,
    group: str,
    role: str,
    saga: tuple[str, str] | None = None,
    step: str | None = None,
) -> OutboxMessage:
    """The outbox row that publishes a dead letter of the record at ``origin``.

    Args:
        topic: The dead-letter topic.
        key: The original key.
        value: The original value.
        headers: The original headers, kept in order.
        origin: Original (topic, partition, offset).
        failure: What went wrong.
        service: Service giving up.
        group: Its consumer group.
        role: Which handler failed (see the module docstring).
        saga: (saga name, saga id) of a saga message.
        step: The step concerned, if any.
    """
    original_topic, partition, offset = origin
    extra = {
        "error_type": failure.error_type,
        "error_message": failure.message,
        "error_trace": failure.trace(),
        "service": service,
        "group": group,
        "attempts": str(failure.attempts),
        "first_failure": failure.first.astimezone(UTC).isoformat(),
        "last_failure": failure.last.astimezone(UTC).isoformat(),
        "topic": original_topic,
        "partition": str(partition),
        "offset": str(offset),
        "role": role,
    }
    if saga is not None:
        extra["saga_name"], extra["saga_id"] = saga
    if step is not None:
        extra["step"] = step
    kept = [(name, raw or b"") for name, raw in headers]
    added = [
        (DEAD_LETTER_PREFIX + name, text.encode("utf-8", "replace")) for name, text in extra.items()
    ]
    return OutboxMessage(
        topic=topic,
        key=key,
        value=value,
        headers=kept + added,
        # One dead letter per original record, whoever writes it.
        message_id=f"dlq:{original_topic}/{partition}/{offset}"[:200],
    )


@dataclass(frozen=True, kw_only=True)
class DeadLetter:
    """A record read back from a dead-letter topic."""

    topic: str
    """The dead-letter topic."""

    partition: int
    """Its partition."""

    offset: int
    """Its offset there (a selection for replay)."""

    key: bytes | None
    """The original key."""

    value: bytes | None
    """The original value, byte for byte."""

    headers: tuple[tuple[str, bytes], ...]
    """The original headers, without the ones the dead letter added."""

    info: Mapping[str, str]
    """The dead letter's own headers, without their ``dlq_`` prefix."""

    timestamp: datetime
    """When the dead letter was published."""

    @classmethod
    def from_record(
        cls,
        *,
        topic: str,
        partition: int,
        offset: int,
        key: bytes | None,
        value: bytes | None,
        headers: Sequence[tuple[str, bytes | None]],
        timestamp_ms: int,
    ) -> DeadLetter:
        """Split a dead-letter record into the original record and its failure."""
        original: list[tuple[str, bytes]] = []
        info: dict[str, str] = {}
        for name, raw in headers:
            if name in _ADDED:
                info[name[len(DEAD_LETTER_PREFIX) :]] = (raw or b"").decode("utf-8", "replace")
            else:
                original.append((name, raw or b""))
        return cls(
            topic=topic,
            partition=partition,
            offset=offset,
            key=key,
            value=value,
            headers=tuple(original),
            info=info,
            timestamp=datetime.fromtimestamp(timestamp_ms / 1000, tz=UTC),
        )

    def header(self, name: str) -> str | None:
        """An original header as text (``None`` when absent)."""
        for found, raw in self.headers:
            if found == name:
                return raw.decode("utf-8", "replace")
        return None

    @property
    def original_topic(self) -> str:
        """Where the record came from (and where a replay sends it)."""
        return self.info.get("topic", "")

    @property
    def error_type(self) -> str:
        """Qualified name of the error that dead-lettered it."""
        return self.info.get("error_type", "")

    @property
    def saga_id(self) -> str | None:
        """Saga id, for a saga message."""
        return self.info.get("saga_id")

    @property
    def ref(self) -> str:
        """``<dead-letter topic>/<partition>/<offset>``: names this dead letter."""
        return f"{self.topic}/{self.partition}/{self.offset}"

    def to_json(self) -> dict[str, object]:
        """A JSON-ready summary (no payload: its size and hash)."""
        import hashlib

        value = self.value or b""
        return {
            "ref": self.ref,
            "dead_letter_topic": self.topic,
            "partition": self.partition,
            "offset": self.offset,
            "published_at": self.timestamp.isoformat(),
            "key": None if self.key is None else self.key.decode("utf-8", "replace"),
            "ce_id": self.header("ce_id"),
            "ce_type": self.header("ce_type"),
            "value_bytes": len(value),
            "value_sha256": hashlib.sha256(value).hexdigest()[:16],
            **{name: text for name, text in self.info.items() if name != "error_trace"},
        }

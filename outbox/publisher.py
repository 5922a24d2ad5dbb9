"""The publisher seam: what the relay hands records to.

:class:`Publisher` is one small method, ``publish(batch)``, returning one
outcome per record (``None`` for success, a :class:`PublishError` otherwise),
so that a partial failure never hides which records did reach the broker.
:class:`KafkaPublisher <outbox.kafka.KafkaPublisher>` talks to Kafka;
:class:`MemoryPublisher` keeps records in memory for fast tests and can be
told to fail.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from outbox.errors import MessageTooLargeError, PublishError
from outbox.message import Header, StoredMessage

__all__ = ["MemoryPublisher", "PublishedRecord", "Publisher"]


class Publisher(ABC):
    """Publishes batches of outbox rows to a broker."""

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Connect; called once before the first batch."""

    async def stop(self) -> None:  # noqa: B027 - optional hook
        """Flush and disconnect."""

    @abstractmethod
    async def publish(self, batch: Sequence[StoredMessage]) -> list[PublishError | None]:
        """Publish ``batch`` in order and wait for every acknowledgement.

        Returns:
            One entry per record, in order: ``None`` when the broker
            acknowledged it, else the error (``retriable`` tells whether to
            try again later or to park the row).
        """

    async def __aenter__(self) -> Publisher:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


@dataclass(frozen=True, kw_only=True)
class PublishedRecord:
    """A record as the in-memory publisher received it."""

    topic: str
    """Topic it was published to."""

    key: bytes | None
    """Record key."""

    value: bytes | None
    """Record value."""

    headers: tuple[Header, ...]
    """Record headers."""

    message_id: str
    """Outbox message id."""


class MemoryPublisher(Publisher):
    """Keeps published records in memory, per topic, in publish order.

    Args:
        reject: Called for each record before it is "published"; return a
            :class:`PublishError` to fail that record (to simulate an outage
            or an oversized record), or ``None`` to accept it.
        max_value_bytes: Records with a larger value fail with a
            non-retriable error, as a broker's size limit would.
    """

    def __init__(
        self,
        *,
        reject: Callable[[StoredMessage], PublishError | None] | None = None,
        max_value_bytes: int = 1024 * 1024,
    ) -> None:
        self.reject = reject
        self.max_value_bytes = max_value_bytes
        self.records: list[PublishedRecord] = []
        self.published = asyncio.Event()

    def topic(self, name: str) -> list[PublishedRecord]:
        """Return the records published to ``name``, in order."""
        return [r for r in self.records if r.topic == name]

    async def publish(self, batch: Sequence[StoredMessage]) -> list[PublishError | None]:
        outcomes: list[PublishError | None] = []
        for message in batch:
            error = self.reject(message) if self.reject is not None else None
            if error is None and len(message.value or b"") > self.max_value_bytes:
                error = MessageTooLargeError(
                    f"value of {len(message.value or b'')} bytes exceeds {self.max_value_bytes}"
                )
            if error is None:
                self.records.append(
                    PublishedRecord(
                        topic=message.topic,
                        key=message.key,
                        value=message.value,
                        headers=message.headers,
                        message_id=message.message_id,
                    )
                )
            outcomes.append(error)
        if any(outcome is None for outcome in outcomes):
            self.published.set()
        return outcomes

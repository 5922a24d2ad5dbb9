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
import contextlib
import contextvars
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass

from outbox.errors import MessageTooLargeError, PublishError
from outbox.message import Header, StoredMessage

__all__ = [
    "HeldBackError",
    "MemoryPublisher",
    "NotSentError",
    "PublishedRecord",
    "Publisher",
    "current_send_gate",
    "send_gate",
]


class HeldBackError(PublishError):
    """Not sent: an earlier record of the same key in the batch failed.

    Sending it would overtake the failed record and break the key's order.
    The row stays pending; it is not counted as a failed attempt.
    """

    def __init__(self, reason: str = "held back behind a failed record of the same key") -> None:
        super().__init__(reason, retriable=True)


class NotSentError(HeldBackError):
    """Not sent: the caller's send gate closed (the relay may have lost the shard's lease)."""

    def __init__(self) -> None:
        super().__init__("not sent: the relay stopped sending this batch")


_GATE: contextvars.ContextVar[Callable[[StoredMessage], bool] | None] = contextvars.ContextVar(
    "outbox_send_gate", default=None
)


@contextlib.contextmanager
def send_gate(gate: Callable[[StoredMessage], bool]) -> Iterator[None]:
    """Ask ``gate`` before each record :meth:`Publisher.publish` sends in this context.

    A record the gate refuses, and every later record of the batch, is not
    sent; its outcome is :class:`NotSentError`. The relay uses it to stop
    sending a batch once it cannot be sure it still holds the lease. It is a
    context variable, so that it reaches a publisher wrapped in another.
    """
    token = _GATE.set(gate)
    try:
        yield
    finally:
        _GATE.reset(token)


def current_send_gate() -> Callable[[StoredMessage], bool] | None:
    """The gate set by :func:`send_gate` around this call, if any (for publishers)."""
    return _GATE.get()


class Publisher(ABC):
    """Publishes batches of outbox rows to a broker.

    Implementations provide :meth:`send`, which hands one record to the
    broker client and returns an awaitable acknowledgement; :meth:`publish`
    sends a batch in order, holding back the records of a topic and key once one of
    its records was refused.
    """

    pipelines_keys: bool = True
    """Whether a key's next record may be sent before its previous one is acknowledged.

    Safe only when the broker client fails the later records of a partition
    once an earlier one failed, as the idempotent producer does. Otherwise
    (``False``) :meth:`publish` waits for a key's acknowledgement before it
    sends that key's next record, so that a record that never reached the log
    is not overtaken by the next one: a key's first deliveries stay in commit
    order, at the cost of one round trip per record of a key within a batch.
    """

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Connect; called once before the first batch."""

    async def stop(self) -> None:  # noqa: B027 - optional hook
        """Flush and disconnect."""

    @abstractmethod
    async def send(self, message: StoredMessage) -> Awaitable[None]:
        """Hand one record to the broker; return an awaitable of its acknowledgement.

        Raises:
            PublishError: The record was refused before it was sent (the
                awaitable, too, raises PublishError when it fails).
        """

    async def publish(self, batch: Sequence[StoredMessage]) -> list[PublishError | None]:
        """Publish ``batch`` in order and wait for every acknowledgement.

        Returns:
            One entry per record, in order: ``None`` when the broker
            acknowledged it, else the error (``retriable`` tells whether to
            try again later or to park the row; :class:`HeldBackError` means
            it was not sent at all).
        """
        await self.start()
        outcomes: list[PublishError | None] = [None] * len(batch)
        acks: list[tuple[int, Awaitable[None]]] = []
        refused: set[tuple[str, bytes]] = set()
        in_flight: dict[tuple[str, bytes], asyncio.Future[None]] = {}
        gate = current_send_gate()
        stopped = False
        for index, message in enumerate(batch):
            key = (message.topic, message.key) if message.key is not None else None
            previous = in_flight.pop(key, None) if key is not None else None
            if key is not None and previous is not None and not stopped:
                await asyncio.wait([previous])
                if previous.cancelled():
                    raise asyncio.CancelledError
                if previous.exception() is not None:
                    refused.add(key)
            if stopped or (gate is not None and not gate(message)):
                stopped = True
                outcomes[index] = NotSentError()
                continue
            if message.key is not None and (message.topic, message.key) in refused:
                outcomes[index] = HeldBackError()
                continue
            try:
                ack = asyncio.ensure_future(await self.send(message))
                acks.append((index, ack))
                if key is not None and not self.pipelines_keys:
                    in_flight[key] = ack
            except PublishError as exc:
                outcomes[index] = exc
                if message.key is not None:
                    refused.add((message.topic, message.key))
        results = await asyncio.gather(*(ack for _, ack in acks), return_exceptions=True)
        for (index, _), result in zip(acks, results, strict=True):
            if isinstance(result, asyncio.CancelledError):
                raise result
            if isinstance(result, BaseException):
                outcomes[index] = self.translate(result)
        return outcomes

    def translate(self, exc: BaseException) -> PublishError:
        """Map an error raised by an acknowledgement to a :class:`PublishError`.

        Unknown errors count as transient: retrying is safe, parking is not.
        """
        if isinstance(exc, PublishError):
            return exc
        return PublishError(f"{type(exc).__name__}: {exc}", retriable=True)

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
        fail_ack: Called for each record that was sent; return a
            :class:`PublishError` to fail its acknowledgement (the record
            never reached the log, as after a broker's final error), or
            ``None`` to acknowledge it. Later records were sent already,
            unless ``pipelines_keys`` is off.
        max_value_bytes: Records with a larger value fail with a
            non-retriable error, as a broker's size limit would.
        pipelines_keys: See :attr:`Publisher.pipelines_keys` (off: behave
            like a producer without idempotence that keeps keys in order).
    """

    def __init__(
        self,
        *,
        reject: Callable[[StoredMessage], PublishError | None] | None = None,
        fail_ack: Callable[[StoredMessage], PublishError | None] | None = None,
        max_value_bytes: int = 1024 * 1024,
        pipelines_keys: bool = True,
    ) -> None:
        self.pipelines_keys = pipelines_keys
        self.reject = reject
        self.fail_ack = fail_ack
        self.max_value_bytes = max_value_bytes
        self.records: list[PublishedRecord] = []
        self.published = asyncio.Event()

    def topic(self, name: str) -> list[PublishedRecord]:
        """Return the records published to ``name``, in order."""
        return [r for r in self.records if r.topic == name]

    async def send(self, message: StoredMessage) -> Awaitable[None]:
        error = self.reject(message) if self.reject is not None else None
        size = len(message.value or b"")
        if error is None and size > self.max_value_bytes:
            error = MessageTooLargeError(f"value of {size} bytes exceeds {self.max_value_bytes}")
        if error is not None:
            raise error
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        failed = self.fail_ack(message) if self.fail_ack is not None else None
        if failed is not None:
            done.set_exception(failed)
            return done
        self.records.append(
            PublishedRecord(
                topic=message.topic,
                key=message.key,
                value=message.value,
                headers=message.headers,
                message_id=message.message_id,
            )
        )
        self.published.set()
        done.set_result(None)
        return done

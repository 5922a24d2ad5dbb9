"""The Publisher contract, run against the in-memory publisher and real Kafka.

The relay trusts a publisher's outcomes completely: ``None`` means the
broker has the record (the row is marked published), an error means it has
not (the row stays pending or is parked). Each subclass says how to read back
what reached the broker.
"""

from __future__ import annotations

import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from outbox import (
    Header,
    KafkaPublisher,
    KafkaSettings,
    MemoryPublisher,
    MessageTooLargeError,
    Publisher,
    PublishError,
    StoredMessage,
)

Record = tuple[bytes | None, bytes | None, tuple[Header, ...]]
"""What a consumer sees: key, value, headers."""

READ_TIMEOUT = 10.0


def stored(topic: str, key: bytes | None, value: bytes | None, *headers: Header) -> StoredMessage:
    return StoredMessage(
        id=0,
        message_id=str(uuid.uuid4()),
        topic=topic,
        key=key,
        value=value,
        headers=tuple(headers),
        shard=0,
        attempts=0,
    )


def as_record(message: StoredMessage) -> Record:
    return (message.key, message.value, message.headers)


class PublisherContract(ABC):
    """Tests every Publisher implementation must pass.

    Subclasses provide the ``publisher`` (started) and ``topic`` fixtures,
    :meth:`read_back` and :meth:`too_large_value`.
    """

    @abstractmethod
    async def read_back(self, topic: str, count: int) -> list[Record]:
        """Return what reached the broker on ``topic``; at least ``count`` records.

        Waits a little after ``count`` have arrived, so unexpected extra
        records are returned too.
        """

    @abstractmethod
    def too_large_value(self) -> bytes:
        """A value the broker (or the producer in front of it) must refuse."""

    async def test_batch_is_acknowledged_record_by_record(
        self, publisher: Publisher, topic: str
    ) -> None:
        batch = [stored(topic, f"k{i % 3}".encode(), f"v{i}".encode()) for i in range(30)]

        outcomes = await publisher.publish(batch)

        assert outcomes == [None] * 30
        assert sorted(await self.read_back(topic, 30)) == sorted(map(as_record, batch))

    async def test_records_of_one_key_arrive_in_batch_order(
        self, publisher: Publisher, topic: str
    ) -> None:
        keys = [b"order-1", b"order-2", b"order-3", b"order-4"]
        batch = [stored(topic, keys[i % 4], f"{i:03}".encode()) for i in range(40)]

        assert await publisher.publish(batch) == [None] * 40

        received = await self.read_back(topic, 40)
        for key in keys:
            sent = [m.value for m in batch if m.key == key]
            assert [value for k, value, _ in received if k == key] == sent

    async def test_a_keys_order_holds_across_many_record_batches(
        self, publisher: Publisher, topic: str
    ) -> None:
        """A batch far larger than one producer record batch (16 KiB) per partition."""
        keys = [b"order-1", b"order-2", b"order-3", b"order-4"]
        batch = [stored(topic, keys[i % 4], b"%05d:" % i + b"v" * 300) for i in range(2000)]

        assert await publisher.publish(batch) == [None] * 2000

        received = await self.read_back(topic, 2000)
        assert len(received) == 2000
        for key in keys:
            sent = [m.value for m in batch if m.key == key]
            assert [value for k, value, _ in received if k == key] == sent

    async def test_key_value_and_headers_are_preserved(
        self, publisher: Publisher, topic: str
    ) -> None:
        binary = bytes(range(256))
        batch = [
            stored(
                topic,
                b"\x00key\xff",
                binary,
                ("ce_type", b"order.placed"),
                ("dup", b"1"),
                ("dup", b"2"),
                ("empty", b""),
                ("bin", binary),
            ),
            stored(topic, b"\x00key\xff", None),  # tombstone
            stored(topic, None, b"no key"),
        ]

        assert await publisher.publish(batch) == [None, None, None]

        received = await self.read_back(topic, 3)
        assert sorted(received, key=repr) == sorted(map(as_record, batch), key=repr)

    async def test_oversized_record_fails_permanently_and_alone(
        self, publisher: Publisher, topic: str
    ) -> None:
        small_before = stored(topic, b"a", b"before")
        huge = stored(topic, b"b", self.too_large_value())
        small_after = stored(topic, b"c", b"after")

        outcomes = await publisher.publish([small_before, huge, small_after])

        assert outcomes[0] is None
        assert isinstance(outcomes[1], MessageTooLargeError)
        assert outcomes[1].retriable is False
        assert outcomes[2] is None
        received = await self.read_back(topic, 2)
        assert sorted(received) == sorted([as_record(small_before), as_record(small_after)])

    async def test_record_behind_a_failed_record_of_its_key_is_not_published(
        self, publisher: Publisher, topic: str
    ) -> None:
        """Per-key order: once the failed record is retried it must still come first.

        The relay parks the failed row and holds its key back, but only for
        rows it has not already published; so the publisher must not let a
        later record of the same key through in the same batch.
        """
        huge = stored(topic, b"saga-1", self.too_large_value())
        next_of_same_key = stored(topic, b"saga-1", b"next step")
        other_key = stored(topic, b"saga-2", b"unrelated")

        outcomes = await publisher.publish([huge, next_of_same_key, other_key])

        assert isinstance(outcomes[0], MessageTooLargeError)
        assert outcomes[1] is not None, "published ahead of an earlier record of its key"
        assert outcomes[2] is None
        assert await self.read_back(topic, 1) == [as_record(other_key)]

    async def test_failed_record_holds_back_its_key_on_its_own_topic_only(
        self, publisher: Publisher, topic: str, second_topic: str
    ) -> None:
        """A saga's compensation on another topic must not wait behind a refused record."""
        huge = stored(topic, b"saga-1", self.too_large_value())
        same_key_other_topic = stored(second_topic, b"saga-1", b"compensation")

        outcomes = await publisher.publish([huge, same_key_other_topic])

        assert isinstance(outcomes[0], MessageTooLargeError)
        assert outcomes[1] is None
        assert await self.read_back(second_topic, 1) == [as_record(same_key_other_topic)]


class TestMemoryPublisher(PublisherContract):
    @pytest.fixture
    async def publisher(self) -> AsyncIterator[MemoryPublisher]:
        publisher = self.memory = MemoryPublisher(max_value_bytes=1024)
        async with publisher:
            yield publisher

    @pytest.fixture
    def topic(self) -> str:
        return f"memory-{uuid.uuid4().hex}"

    @pytest.fixture
    def second_topic(self) -> str:
        return f"memory-{uuid.uuid4().hex}"

    async def read_back(self, topic: str, count: int) -> list[Record]:
        records = self.memory.topic(topic)
        assert len(records) >= count
        return [(r.key, r.value, r.headers) for r in records]

    def too_large_value(self) -> bytes:
        return b"x" * 1025


class TestKafkaPublisher(PublisherContract):
    @pytest.fixture
    async def publisher(self, kafka_settings: KafkaSettings) -> AsyncIterator[KafkaPublisher]:
        self.settings = kafka_settings
        publisher = KafkaPublisher(kafka_settings)
        async with publisher:
            yield publisher

    @pytest.fixture
    async def topic(self, new_topic: Callable[..., Awaitable[str]]) -> str:
        return await new_topic(partitions=3)

    @pytest.fixture
    async def second_topic(self, new_topic: Callable[..., Awaitable[str]]) -> str:
        return await new_topic(partitions=3)

    async def read_back(self, topic: str, count: int) -> list[Record]:
        consumer = AIOKafkaConsumer(**self.settings.consumer_kwargs(None))
        await consumer.start()
        try:
            partitions = consumer.partitions_for_topic(topic) or set()
            assert partitions, f"topic {topic!r} has no partitions"
            consumer.assign([TopicPartition(topic, p) for p in partitions])
            received: list[Record] = []
            deadline = time.monotonic() + READ_TIMEOUT
            settle_until: float | None = None
            while time.monotonic() < (settle_until or deadline):
                batches = await consumer.getmany(timeout_ms=100)
                for records in batches.values():
                    received.extend((r.key, r.value, tuple(r.headers)) for r in records)
                if settle_until is None and len(received) >= count:
                    settle_until = time.monotonic() + 0.3  # catch unexpected extras
            assert len(received) >= count, f"{len(received)} of {count} records arrived"
            return received
        finally:
            await consumer.stop()

    def too_large_value(self) -> bytes:
        # Above aiokafka's default max_request_size of 1 MiB.
        return b"x" * (2 * 1024 * 1024)


async def test_memory_publisher_reject_hook_fails_only_the_chosen_records() -> None:
    """The in-memory publisher simulates outages per record, as tests of the relay need."""

    def reject(message: StoredMessage) -> PublishError | None:
        return PublishError("broker down", retriable=True) if message.key == b"down" else None

    publisher = MemoryPublisher(reject=reject)
    ok, down = stored("t", b"up", b"1"), stored("t", b"down", b"2")

    outcomes = await publisher.publish([ok, down])

    assert outcomes[0] is None
    assert outcomes[1] is not None
    assert outcomes[1].retriable is True
    assert [r.message_id for r in publisher.topic("t")] == [ok.message_id]
    assert publisher.published.is_set()

"""KafkaPublisher's per-partition lanes against errors a broker reports for a whole record batch.

A broker refuses a record batch larger than its ``message.max.bytes`` (or the
topic's ``max.message.bytes``) as a whole. When that limit is below the
producer's ``max_batch_size``, a batch of small records can be refused
although each record fits: only a record too large on its own may be parked,
never its neighbours of other keys. The embedded broker does not enforce such
a limit, so the publisher's producer enforces one in front of it, exactly
where the broker would answer: in the record batch's acknowledgement.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from aiokafka.errors import CorruptRecordException, MessageSizeTooLargeError
from support import read_topic

from outbox import (
    KafkaPublisher,
    KafkaSettings,
    OutboxMessage,
    OutboxTables,
    Relay,
    RelaySettings,
    SqlOutboxStore,
    StoredMessage,
    create_engine,
)

BROKER_LIMIT = 4_000
"""The simulated broker's message.max.bytes: below the producer's max_batch_size (64 KiB)."""


class LimitedBrokerPublisher(KafkaPublisher):
    """A KafkaPublisher whose broker refuses record batches above BROKER_LIMIT bytes."""

    def __init__(self, settings: KafkaSettings) -> None:
        super().__init__(settings)
        self.refused_batches = 0

    async def start(self) -> None:
        await super().start()
        producer = self._producer
        assert producer is not None
        if getattr(producer, "_limited", False):
            return
        real_send_batch = producer.send_batch

        async def send_batch(builder: Any, topic: str, *, partition: int) -> Any:
            if builder.size() > BROKER_LIMIT:
                self.refused_batches += 1
                refused: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                refused.set_exception(MessageSizeTooLargeError())
                return refused
            return await real_send_batch(builder, topic, partition=partition)

        producer.send_batch = send_batch
        producer._limited = True


@pytest.fixture
async def engine(postgres_url: str) -> AsyncIterator[Any]:
    engine = create_engine(postgres_url)
    await OutboxTables().create_all(engine)
    yield engine
    await engine.dispose()


async def unpublished(engine: Any, tables: OutboxTables) -> list[bytes]:
    """Values of the rows not yet published, in outbox order."""
    t = tables.outbox
    async with engine.connect() as conn:
        rows = await conn.execute(
            sa.select(t.c.value).where(t.c.published_at_ms.is_(None)).order_by(t.c.id)
        )
        return [r.value for r in rows]


async def test_record_batch_refused_as_too_large_parks_only_the_record_too_large_alone(
    engine: Any, kafka_settings: KafkaSettings, new_topic: Any
) -> None:
    topic = await new_topic(partitions=1)
    tables = OutboxTables()
    store = SqlOutboxStore(engine, tables, shards=4)
    keys = [f"k{n}" for n in range(10)]
    items = [(k, f"{k}:{seq}:".encode() + b"." * 300) for seq in range(4) for k in keys]
    big = 17  # k7, seq 1: too large for the broker even alone
    big_key = items[big][0]
    items[big] = (big_key, items[big][1] + b"x" * BROKER_LIMIT)
    async with engine.begin() as conn:
        await store.add(
            conn, [OutboxMessage(topic=topic, key=k.encode(), value=v) for k, v in items]
        )
    publisher = LimitedBrokerPublisher(kafka_settings)
    settings = RelaySettings(batch_size=100, poll_interval=timedelta(milliseconds=100))

    # The big row and the two later rows of its key stay; everything else goes.
    expected_left = [v for k, v in items[big:] if k == big_key]
    async with Relay(store, publisher, settings) as relay:
        for _ in range(100):
            if await unpublished(engine, tables) == expected_left:
                break
            await asyncio.sleep(0.1)
        parked = await store.parked()

    assert publisher.refused_batches >= 1, "the broker never refused a record batch"
    assert [p.message.value for p in parked] == [items[big][1]]
    assert relay.stats.parked == 1
    assert await unpublished(engine, tables) == expected_left
    delivered = len(items) - len(expected_left)
    records = await read_topic(kafka_settings, topic, delivered, timeout=30)
    assert sorted(r.value for r in records) == sorted(
        v for v in (v for _, v in items) if v not in expected_left
    )


class MetadataDroppingPublisher(KafkaPublisher):
    """Loses one topic's metadata while it asks the broker about another, the first time.

    As a metadata refresh does when the broker's answer carries an error for
    that topic (a leader election, for example): aiokafka then forgets the
    topic's partitions until the next refresh.
    """

    def __init__(self, settings: KafkaSettings, *, drop: str, while_checking: str) -> None:
        super().__init__(settings)
        self.drop = drop
        self.while_checking = while_checking
        self.dropped = False

    async def _metadata_error(self, producer: Any, topic: str) -> Any:
        if topic == self.while_checking and not self.dropped:
            producer.client.cluster._partitions.pop(self.drop, None)
            self.dropped = True
        return await super()._metadata_error(producer, topic)


async def test_topic_forgotten_by_a_metadata_refresh_mid_batch_is_looked_up_again(
    kafka_settings: KafkaSettings, new_topic: Any
) -> None:
    first, second = await new_topic(partitions=2), await new_topic(partitions=2)
    publisher = MetadataDroppingPublisher(kafka_settings, drop=first, while_checking=second)

    def message(n: int, topic: str, key: bytes) -> StoredMessage:
        return StoredMessage(
            id=n,
            message_id=f"m{n}",
            topic=topic,
            key=key,
            value=key + b":%d" % n,
            headers=(),
            shard=0,
            attempts=0,
        )

    batch = [message(1, first, b"a"), message(2, second, b"b"), message(3, first, b"c")]
    async with publisher:
        outcomes = await publisher.publish(batch)

    assert publisher.dropped
    assert outcomes == [None, None, None]
    assert sorted(r.value for r in await read_topic(kafka_settings, first, 2, timeout=20)) == [
        b"a:1",
        b"c:3",
    ]


class _Recorded:
    """A record batch builder that remembers the values appended to it."""

    def __init__(self, builder: Any) -> None:
        self.builder = builder
        self.values: list[bytes] = []

    def append(self, **record: Any) -> Any:
        metadata = self.builder.append(**record)
        if metadata is not None:
            self.values.append(record["value"])
        return metadata

    def close(self) -> None:
        self.builder.close()


class PoisonRefusingPublisher(KafkaPublisher):
    """A KafkaPublisher whose broker refuses every record batch holding a "poison" record.

    As Apache Kafka refuses a record without a key on a compacted topic
    (CORRUPT_MESSAGE, or INVALID_RECORD on newer brokers), every time: the
    whole record batch fails, whatever else it holds.
    """

    def __init__(self, settings: KafkaSettings) -> None:
        super().__init__(settings)
        self.refused_batches = 0

    async def start(self) -> None:
        await super().start()
        producer = self._producer
        assert producer is not None
        if getattr(producer, "_poisoned", False):
            return
        real_create, real_send = producer.create_batch, producer.send_batch

        async def send_batch(batch: _Recorded, topic: str, *, partition: int) -> Any:
            if any(v.startswith(b"poison") for v in batch.values):
                self.refused_batches += 1
                refused: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                refused.set_exception(CorruptRecordException())
                return refused
            return await real_send(batch.builder, topic, partition=partition)

        producer.create_batch = lambda: _Recorded(real_create())
        producer.send_batch = send_batch
        producer._poisoned = True


async def test_record_the_broker_always_refuses_holds_back_only_its_own_key(
    engine: Any, kafka_settings: KafkaSettings, new_topic: Any
) -> None:
    topic = await new_topic(partitions=1)
    tables = OutboxTables()
    store = SqlOutboxStore(engine, tables, shards=4)
    keys = [f"k{n}" for n in range(10)]
    items = [(k, f"{k}:{seq}".encode()) for seq in range(5) for k in keys]
    poison = 13  # k3, seq 1
    poison_key = items[poison][0]
    items[poison] = (poison_key, b"poison:" + items[poison][1])
    async with engine.begin() as conn:
        await store.add(
            conn, [OutboxMessage(topic=topic, key=k.encode(), value=v) for k, v in items]
        )
    publisher = PoisonRefusingPublisher(kafka_settings)
    settings = RelaySettings(batch_size=100, poll_interval=timedelta(milliseconds=100))

    # The refused row and the later rows of its key wait; every other key goes.
    expected_left = [v for k, v in items[poison:] if k == poison_key]
    async with Relay(store, publisher, settings):
        for _ in range(100):
            if await unpublished(engine, tables) == expected_left and publisher.renewals:
                break
            await asyncio.sleep(0.1)
        left = await unpublished(engine, tables)

    assert publisher.refused_batches >= 1
    # After a refused batch the producer is replaced (an idempotent one would
    # otherwise refuse the partition's next batches as out of sequence), and
    # publishing goes on with the new one.
    assert publisher.renewals >= 1
    assert left == expected_left
    delivered = sorted(v for k, v in items if v not in expected_left)
    records = await read_topic(kafka_settings, topic, len(delivered), timeout=30)
    assert sorted(r.value for r in records) == delivered

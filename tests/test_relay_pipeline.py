"""The pipelined relay: it reads the next batch while the current one is being published.

Against a real PostgreSQL and the real broker: two pipelined relays keep every
key's order; a relay never publishes a row twice although it reads ahead while
its previous batch is in flight; a failure in the middle of the pipeline (a
parked row, a publish call that fails) loses nothing and keeps every key's order.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Collection, Sequence
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from support import read_topic

from outbox import (
    KafkaPublisher,
    KafkaSettings,
    MemoryPublisher,
    OutboxMessage,
    OutboxTables,
    PublishError,
    Relay,
    RelaySettings,
    RetryPolicy,
    SqlOutboxStore,
    StoredMessage,
    create_engine,
)
from outbox.failures import ErrorKind

SETTINGS = RelaySettings(
    batch_size=50,
    poll_interval=timedelta(milliseconds=100),
    lease_ttl=timedelta(seconds=5),
)


class ReadAheadStore(SqlOutboxStore):
    """The SQL store, remembering every read the relay made while rows were in flight."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reads_ahead: list[tuple[frozenset[int], list[int]]] = []

    async def fetch_due(
        self, shards: Collection[int], limit: int, *, exclude: Collection[int] = ()
    ) -> list[StoredMessage]:
        batch = await super().fetch_due(shards, limit, exclude=exclude)
        if exclude:
            self.reads_ahead.append((frozenset(exclude), [m.id for m in batch]))
        return batch


class Outbox:
    """An outbox with 8 shards on a fresh database."""

    def __init__(self, url: str) -> None:
        self.engine = create_engine(url)
        self.tables = OutboxTables()
        self.writer = SqlOutboxStore(self.engine, self.tables, shards=8)

    def store(self) -> ReadAheadStore:
        return ReadAheadStore(self.engine, self.tables, shards=8)

    async def add(self, topic: str, items: Sequence[tuple[str, bytes]]) -> None:
        """Add (key, value) rows in one transaction; the value is ``key:seq``."""
        async with self.engine.begin() as conn:
            await self.writer.add(
                conn, [OutboxMessage(topic=topic, key=k.encode(), value=v) for k, v in items]
            )

    async def unpublished(self) -> list[bytes]:
        """Values of rows not marked published, in id order."""
        t = self.tables.outbox
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                sa.select(t.c.value).where(t.c.published_at_ms.is_(None)).order_by(t.c.id)
            )
            return [r.value for r in rows]

    async def wait_until(self, done: Any, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not await done():
            assert time.monotonic() < deadline, "the relays did not get there in time"
            await asyncio.sleep(0.1)


@pytest.fixture
async def box(postgres_url: str) -> AsyncIterator[Outbox]:
    outbox = Outbox(postgres_url)
    await outbox.tables.create_all(outbox.engine)
    yield outbox
    await outbox.engine.dispose()


def first_deliveries(records: Sequence[Any]) -> dict[str, list[int]]:
    """Each key's sequence numbers in the order they first reached the topic."""
    seen: set[bytes] = set()
    order: dict[str, list[int]] = defaultdict(list)
    for record in records:
        if record.value in seen:
            continue
        seen.add(record.value)
        key, seq = record.value.decode().split(":")
        assert record.key.decode() == key
        order[key].append(int(seq))
    return order


async def test_two_pipelined_relays_keep_every_keys_order(
    box: Outbox, kafka_settings: KafkaSettings, new_topic: Any
) -> None:
    topic = await new_topic(partitions=6)
    keys = [f"key-{k}" for k in range(20)]
    per_key = 60
    stores = [box.store(), box.store()]
    relays = [
        Relay(store, KafkaPublisher(kafka_settings), SETTINGS, name=f"relay-{n}")
        for n, store in enumerate(stores)
    ]
    async with relays[0], relays[1]:
        leases = box.tables.leases

        async def shared() -> bool:
            async with box.engine.connect() as conn:
                owners = set((await conn.execute(sa.select(leases.c.owner))).scalars())
            return owners == {"relay-0", "relay-1"}

        await box.wait_until(shared)

        async def writer(part: int) -> None:
            mine = keys[part::4]
            for start in range(0, per_key, 5):
                await box.add(
                    topic,
                    [(k, f"{k}:{seq}".encode()) for seq in range(start, start + 5) for k in mine],
                )

        # Four writers, 20 rows per transaction: full batches to read ahead of.
        await asyncio.gather(*(writer(p) for p in range(4)))

        async def drained() -> bool:
            return not await box.unpublished()

        await box.wait_until(drained)
    total = len(keys) * per_key
    assert all(r.stats.published > 0 for r in relays), [r.stats for r in relays]
    assert sum(r.stats.published for r in relays) == total
    assert any(store.reads_ahead for store in stores), "no relay ever read ahead"

    records = await read_topic(kafka_settings, topic, total, timeout=60)
    order = first_deliveries(records)
    assert set(order) == set(keys)
    for key, seqs in order.items():
        assert seqs == list(range(per_key)), f"{key} out of order: {seqs[:20]}..."


class SlowPublisher(KafkaPublisher):
    """Holds every batch a little before sending it, so that reads ahead finish meanwhile."""

    async def publish(self, batch: Sequence[StoredMessage]) -> list[PublishError | None]:
        await asyncio.sleep(0.02)
        return await super().publish(batch)


async def test_a_row_read_ahead_is_never_published_twice_by_one_relay(
    box: Outbox, kafka_settings: KafkaSettings, new_topic: Any
) -> None:
    topic = await new_topic(partitions=4)
    total = 1000
    await box.add(topic, [(f"k{i % 7}", f"k{i % 7}:{i // 7}".encode()) for i in range(total)])
    store = box.store()

    async def drained() -> bool:
        return not await box.unpublished()

    async with Relay(store, SlowPublisher(kafka_settings), SETTINGS) as relay:
        await box.wait_until(drained)

    # It did read ahead, and never a row it still had in flight.
    assert len(store.reads_ahead) >= 5
    for in_flight, read in store.reads_ahead:
        assert not in_flight & set(read)
    assert relay.stats.published == total
    records = await read_topic(kafka_settings, topic, total, timeout=60)
    duplicates = [v for v, n in Counter(r.value for r in records).items() if n > 1]
    assert duplicates == []
    assert len(records) == total


class FlakyPublisher(KafkaPublisher):
    """Fails its third publish call outright, after sending nothing (a broker hiccup)."""

    def __init__(self, settings: KafkaSettings) -> None:
        super().__init__(settings)
        self.calls = 0

    async def publish(self, batch: Sequence[StoredMessage]) -> list[PublishError | None]:
        self.calls += 1
        if self.calls == 3:
            raise PublishError("broker hiccup", retriable=True)
        return await super().publish(batch)


async def test_failures_in_the_middle_of_the_pipeline_lose_nothing_and_keep_order(
    box: Outbox, kafka_settings: KafkaSettings, new_topic: Any
) -> None:
    topic = await new_topic(partitions=4)
    keys = [f"k{n}" for n in range(6)]
    per_key = 40
    items = [(k, f"{k}:{seq}".encode()) for seq in range(per_key) for k in keys]
    # Row 100 (k4, seq 16) is too large for this producer: it is parked, and
    # the later rows of k4 wait behind it; everything else goes through.
    too_large = 100
    big_key, big_seq = items[too_large][0], int(items[too_large][1].split(b":")[1])
    items[too_large] = (big_key, items[too_large][1] + b":" + b"x" * 5000)
    await box.add(topic, items)
    small = kafka_settings.with_options(producer_options={"max_request_size": 4000})
    store = box.store()
    publisher = FlakyPublisher(small)

    async def settled() -> bool:
        return len(await box.unpublished()) == per_key - big_seq

    async with Relay(store, publisher, SETTINGS) as relay:
        await box.wait_until(settled)
        await asyncio.sleep(0.5)  # nothing more goes out while the row is parked
        assert len(await box.unpublished()) == per_key - big_seq
        (parked,) = await store.parked()

    assert parked.message.key == big_key.encode()
    assert relay.stats.parked == 1
    assert relay.stats.failed_attempts >= 1  # the hiccup was retried
    assert store.reads_ahead, "the relay never read ahead"
    published = len(items) - (per_key - big_seq)
    records = await read_topic(kafka_settings, topic, published, timeout=60)
    order = first_deliveries(records)
    for key in keys:
        expected = list(range(big_seq if key == big_key else per_key))
        assert order[key] == expected, f"{key}: {order[key]}"


class ReadAheadSignal(SqlOutboxStore):
    """The SQL store, setting an event whenever a read ahead (one that leaves rows out) starts."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reading = asyncio.Event()

    async def fetch_due(
        self, shards: Collection[int], limit: int, *, exclude: Collection[int] = ()
    ) -> list[StoredMessage]:
        if exclude:
            self.reading.set()
        return await super().fetch_due(shards, limit, exclude=exclude)


class OutagePublisher(MemoryPublisher):
    """Fails its first ``failures`` publish calls while the next batch is being read ahead."""

    def __init__(self, store: ReadAheadSignal, failures: int) -> None:
        super().__init__()
        self.store = store
        self.failures = failures
        self.calls = 0

    async def publish(self, batch: Sequence[StoredMessage]) -> list[PublishError | None]:
        self.calls += 1
        if self.calls <= self.failures:
            # The broker turns out to be unreachable a moment into the read ahead.
            self.store.reading.clear()
            await self.store.reading.wait()
            await asyncio.sleep(self.calls % 7 / 1000)
            raise PublishError("broker unreachable", retriable=True, kind=ErrorKind.OUTAGE)
        return await super().publish(batch)


async def test_publish_failing_while_the_next_batch_is_read_leaves_sqlite_usable(
    sqlite_url: str,
) -> None:
    """A read ahead is never cancelled in the middle of its statement.

    On SQLite a read holds the database's write lock (BEGIN IMMEDIATE); a
    read cancelled half-way left its connection, and the lock, behind: the
    application's next write and the relay's next read waited for good.
    """
    engine = create_engine(sqlite_url)
    tables = OutboxTables()
    await tables.create_all(engine)
    store = ReadAheadSignal(engine, tables, shards=1)
    total = 10_000
    async with engine.begin() as conn:
        await store.add(
            conn, [OutboxMessage(topic="t", key=b"k%d" % (i % 7), value=b"v") for i in range(total)]
        )
    publisher = OutagePublisher(store, failures=60)
    quick = RetryPolicy(
        initial_interval=timedelta(milliseconds=1),
        maximum_interval=timedelta(milliseconds=2),
        maximum_attempts=0,
    )
    settings = RelaySettings(
        batch_size=1000, poll_interval=timedelta(milliseconds=50), backoff=quick
    )
    try:
        async with Relay(store, publisher, settings) as relay:
            async with asyncio.timeout(30):
                while publisher.calls <= publisher.failures:
                    await asyncio.sleep(0.01)
            # The application can still write, and the relay drains the outbox.
            async with asyncio.timeout(10):
                async with engine.begin() as conn:
                    await store.add(conn, [OutboxMessage(topic="t", key=b"x", value=b"v")])
                while (await store.stats()).pending:
                    await asyncio.sleep(0.05)
        assert relay.stats.published == total + 1
        assert len(publisher.topic("t")) == total + 1
    finally:
        await engine.dispose()

"""A commit wakes the relay: a saga hop never waits for the relay's poll interval.

Each hop of a saga is a commit followed by a relay send. The relay polls only
as a fallback; what makes a hop fast is that a commit wakes it: on PostgreSQL
through ``NOTIFY`` (so a writer in another process wakes it too), on SQLite
through the commit hook of the store the writer shares with the relay. Here
the poll interval and the lease (whose renewal also wakes the relay) are an
hour long, so a row that is published at all was published because its
commit woke the relay. No duration is asserted beyond "well before an hour".
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncSession

from outbox import (
    KafkaPublisher,
    KafkaSettings,
    OutboxMessage,
    OutboxTables,
    Relay,
    RelaySettings,
    SqlOutboxStore,
    create_engine,
)
from outbox.store import NOTIFY_LATER, WRITE_LATER, OutboxStore

NEVER = timedelta(hours=1)
SETTINGS = RelaySettings(poll_interval=NEVER, lease_ttl=NEVER)


async def _add(store: OutboxStore, engine: Any, topic: str, value: bytes) -> None:
    async with engine.begin() as conn:
        await store.add(conn, [OutboxMessage(topic=topic, key=b"k", value=value)])


async def _published(relay: Relay, count: int) -> None:
    async with asyncio.timeout(30):  # an hour's poll would not make it
        while relay.stats.published < count:
            await asyncio.sleep(0.02)


@pytest.fixture
async def tables_url(database_url: str) -> str:
    engine = create_engine(database_url)
    await OutboxTables().create_all(engine)
    await engine.dispose()
    return database_url


async def test_a_commit_through_the_relays_store_wakes_it(
    tables_url: str, kafka_settings: KafkaSettings, new_topic: Any
) -> None:
    topic = await new_topic(partitions=1)
    engine = create_engine(tables_url)
    store = SqlOutboxStore(engine, OutboxTables(), shards=4)
    try:
        async with Relay(store, KafkaPublisher(kafka_settings), SETTINGS) as relay:
            await asyncio.sleep(0.3)  # past its first round: idle, waiting
            for number in range(1, 4):
                await _add(store, engine, topic, b"%d" % number)
                await _published(relay, number)
    finally:
        await engine.dispose()


async def test_a_commit_in_another_process_wakes_a_postgresql_relay(
    postgres_url: str, kafka_settings: KafkaSettings, new_topic: Any
) -> None:
    topic = await new_topic(partitions=1)
    relay_engine = create_engine(postgres_url)
    writer_engine = create_engine(postgres_url)  # no commit hook shared with the relay
    await OutboxTables().create_all(relay_engine)
    relay_store = SqlOutboxStore(relay_engine, OutboxTables(), shards=4)
    writer_store = SqlOutboxStore(writer_engine, OutboxTables(), shards=4)
    try:
        async with Relay(relay_store, KafkaPublisher(kafka_settings), SETTINGS) as relay:
            await asyncio.sleep(0.3)
            for number in range(1, 4):
                await _add(writer_store, writer_engine, topic, b"%d" % number)
                await _published(relay, number)
    finally:
        await writer_engine.dispose()
        await relay_engine.dispose()


async def _add_many(store: OutboxStore, engine: Any, topic: str, values: list[bytes]) -> None:
    async with engine.begin() as conn:
        await store.add(conn, [OutboxMessage(topic=topic, key=b"k", value=v) for v in values])


async def _add_deferred(
    store: SqlOutboxStore, engine: Any, topic: str, values: list[bytes]
) -> None:
    """As a consumer batch commits: adds deferred, one wake-up sent with their write."""
    async with AsyncSession(engine) as session, session.begin():
        session.info[NOTIFY_LATER] = True
        session.info[WRITE_LATER] = []
        for value in values:
            await store.add(session, [OutboxMessage(topic=topic, key=b"k", value=value)])
        await store.write_deferred(session, notify=True)


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("deferred", [False, True], ids=["add", "batch"])
async def test_a_commit_of_one_or_many_rows_in_another_process_wakes_a_postgresql_relay(
    postgres_url: str, kafka_settings: KafkaSettings, new_topic: Any, rows: int, deferred: bool
) -> None:
    """A lone row's wake-up rides on its INSERT, many rows' on a statement of their own:
    both, whether added at once or deferred to a batch's commit, wake the relay."""
    topic = await new_topic(partitions=1)
    relay_engine = create_engine(postgres_url)
    writer_engine = create_engine(postgres_url)
    await OutboxTables().create_all(relay_engine)
    relay_store = SqlOutboxStore(relay_engine, OutboxTables(), shards=4)
    writer_store = SqlOutboxStore(writer_engine, OutboxTables(), shards=4)
    write = _add_deferred if deferred else _add_many
    try:
        async with Relay(relay_store, KafkaPublisher(kafka_settings), SETTINGS) as relay:
            await asyncio.sleep(0.3)
            for round_ in range(1, 3):
                await write(writer_store, writer_engine, topic, [b"%d" % n for n in range(rows)])
                await _published(relay, round_ * rows)
    finally:
        await writer_engine.dispose()
        await relay_engine.dispose()

"""Batched consumption on real servers: one transaction per batch, one savepoint per record.

The records fetched for a partition run in one PostgreSQL transaction; a
record that fails rolls back only itself and then follows the error model as
if it had been alone. Handlers write ``txid_current()`` next to their effect,
so the tests see which records shared a transaction.

To get a batch deterministically, records are produced to a one-partition
topic before the service starts (its first fetch brings them all), or while
the service is held up by an earlier record.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from aiokafka import AIOKafkaProducer
from support import core_codec
from test_failure_semantics import OutOfStock, Shop, build_shop

from outbox import KafkaSettings, OutboxTables, RetryPolicy, create_engine, ensure_topics
from saga import SagaContext
from saga.context import MessageContext
from saga.dlq import read_dead_letters
from saga.envelope import Envelope, EnvelopeCodec
from saga.service import Service, ServiceSettings

ITEM = "choreosaga.test.Item"


class Plain:
    """A service with one plain handler on a one-partition topic, on PostgreSQL."""

    def __init__(self, url: str, kafka: KafkaSettings, topic_in: str, topic_out: str) -> None:
        self.kafka = kafka
        self.topic_in = topic_in
        self.topic_out = topic_out
        self.engine = create_engine(url)
        self.codec = core_codec()
        self.envelopes = EnvelopeCodec(self.codec)
        metadata = sa.MetaData()
        self.effects = sa.Table(
            "effects",
            metadata,
            sa.Column("row", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("seq", sa.Integer, nullable=False),
            sa.Column("txid", sa.BigInteger, nullable=False),
        )
        self.metadata = metadata
        self.tables = OutboxTables(sa.MetaData())
        self.producer = AIOKafkaProducer(**kafka.producer_kwargs())
        self.service: Service | None = None
        self.behaviour: dict[int, Callable[[MessageContext], Awaitable[None]]] = {}
        self.calls: dict[int, int] = {}

    async def setup(self) -> None:
        async with self.engine.begin() as conn:
            await conn.run_sync(self.metadata.create_all)
        await self.producer.start()

    async def close(self) -> None:
        if self.service is not None:
            await self.service.stop()
        await self.producer.stop()
        await self.engine.dispose()

    def build(self, **settings: Any) -> Service:
        service = Service(
            "batched",
            engine=self.engine,
            kafka=self.kafka,
            codec=self.codec,
            tables=self.tables,
            settings=ServiceSettings(
                shards=4,
                retry=RetryPolicy(initial_interval=timedelta(milliseconds=20), maximum_attempts=2),
                **settings,
            ),
        )

        @service.subscribe(self.topic_in, ITEM)
        async def handle(ctx: MessageContext) -> None:
            seq = int(ctx.data["seq"])
            self.calls[seq] = self.calls.get(seq, 0) + 1
            behaviour = self.behaviour.get(seq)
            if behaviour is not None:
                await behaviour(ctx)
            txid = (await ctx.session.execute(sa.text("SELECT txid_current()"))).scalar_one()
            await ctx.session.execute(sa.insert(self.effects).values(seq=seq, txid=txid))
            ctx.emit(ITEM, {**ctx.data, "note": "seen"}, topic=self.topic_out)

        self.service = service
        return service

    def item(self, seq: int) -> Envelope:
        return Envelope(type=ITEM, data={"key": "k", "seq": seq, "note": ""}, source="/tests")

    async def produce(self, envelopes: list[Envelope]) -> None:
        """Produce in order to partition 0, all acknowledged before returning."""
        for envelope in envelopes:
            key, value, headers = self.envelopes.encode(envelope)
            await self.producer.send(self.topic_in, value, key=key, headers=headers, partition=0)
        await self.producer.flush()

    async def effects_by_seq(self) -> dict[int, list[int]]:
        """Transaction ids of the effects, by sequence number."""
        async with self.engine.connect() as conn:
            rows = (await conn.execute(sa.select(self.effects.c.seq, self.effects.c.txid))).all()
        found: dict[int, list[int]] = {}
        for seq, txid in rows:
            found.setdefault(seq, []).append(txid)
        return found

    async def outbox_rows(self) -> int:
        outbox = self.tables.outbox
        query = sa.select(sa.func.count()).where(outbox.c.topic == self.topic_out)
        async with self.engine.connect() as conn:
            return int((await conn.execute(query)).scalar_one())


async def until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def fetched(service: Service) -> int:
    """Records the service's consumer fetched and has not finished processing.

    No public counter tells it: this peeks inside the Kafka consumer.
    """
    return sum(part.buffered for part in service._consumer._parts.values())


@pytest.fixture
async def plain(
    postgres_url: str, kafka_settings: KafkaSettings, new_topic: Any
) -> AsyncIterator[Plain]:
    topic_in = await new_topic(partitions=1)
    topic_out = await new_topic(partitions=1)
    await ensure_topics(kafka_settings, {topic_in + ".dlq": 1})
    harness = Plain(postgres_url, kafka_settings, topic_in, topic_out)
    await harness.setup()
    yield harness
    await harness.close()


async def run(plain: Plain, records: int, effects: int, **settings: Any) -> Service:
    """Start the service on what was produced; wait until every record is accounted for.

    The counters move as each record is handled, the batch commits a moment
    later: wait for the committed ``effects`` rows too, then a little longer
    for any that should not be there.
    """
    service = plain.build(**settings)
    await service.create_tables()
    await service.start()
    stats = service.stats
    await until(lambda: stats.processed + stats.duplicates + stats.dead_lettered >= records)
    deadline = time.monotonic() + 30
    while sum(map(len, (await plain.effects_by_seq()).values())) < effects:
        assert time.monotonic() < deadline, "the batch never committed"
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.3)
    return service


async def test_a_batch_is_one_transaction_and_its_size_is_bounded(plain: Plain) -> None:
    await plain.produce([plain.item(seq) for seq in range(60)])
    service = await run(plain, 60, 60, batch_max_records=20)

    effects = await plain.effects_by_seq()
    assert sorted(effects) == list(range(60))
    assert all(len(txids) == 1 for txids in effects.values())
    transactions = {txid for (txid,) in effects.values()}
    # 60 steps, at most 20 per transaction: 3 commits when the first fetch
    # brought everything, a few more if the broker split it; never 60.
    assert 3 <= len(transactions) <= 6
    # Each transaction holds consecutive records (per-partition order kept).
    order = [effects[seq][0] for seq in range(60)]
    assert [txid for i, txid in enumerate(order) if i == 0 or txid != order[i - 1]] == sorted(
        transactions
    )
    assert service.stats.processed == 60
    assert await plain.outbox_rows() == 60


async def test_a_bug_in_the_middle_of_a_batch_dead_letters_only_that_record(plain: Plain) -> None:
    async def bug(ctx: MessageContext) -> None:
        await ctx.session.execute(sa.insert(plain.effects).values(seq=-1, txid=0))  # rolled back
        raise KeyError("amount")

    plain.behaviour[3] = bug
    await plain.produce([plain.item(seq) for seq in range(7)])
    service = await run(plain, 7, 6)

    effects = await plain.effects_by_seq()
    assert sorted(effects) == [0, 1, 2, 4, 5, 6]  # neither the bug's write nor a second copy
    assert all(len(txids) == 1 for txids in effects.values())
    # The records before the bug committed together; those after it, together.
    assert effects[0] == effects[1] == effects[2]
    assert effects[4] == effects[5] == effects[6]
    assert effects[2] != effects[4]
    assert plain.calls == {0: 1, 1: 1, 2: 1, 3: 2, 4: 1, 5: 1, 6: 1}  # the policy's 2 attempts
    assert (service.stats.processed, service.stats.dead_lettered) == (6, 1)
    assert service.stats.retries == 1
    assert await plain.outbox_rows() == 6
    letters = await read_dead_letters(plain.kafka, [plain.topic_in + ".dlq"])
    assert [letter.info["offset"] for letter in letters] == ["3"]
    assert letters[0].error_type == "builtins.KeyError"


async def test_an_outage_in_the_middle_of_a_batch_loses_and_doubles_nothing(plain: Plain) -> None:
    killed: list[int] = []

    async def connection_lost(ctx: MessageContext) -> None:
        if not killed:
            # The server ends this very connection: the batch's transaction is gone.
            pid = (await ctx.session.execute(sa.text("SELECT pg_backend_pid()"))).scalar_one()
            killed.append(pid)
            await ctx.session.execute(sa.text("SELECT pg_terminate_backend(pg_backend_pid())"))

    plain.behaviour[4] = connection_lost
    await plain.produce([plain.item(seq) for seq in range(8)])
    service = await run(plain, 8, 8)

    assert killed
    effects = await plain.effects_by_seq()
    assert sorted(effects) == list(range(8))
    assert all(len(txids) == 1 for txids in effects.values())  # redone, never doubled
    # The records before the outage ran twice (their first run was lost) ...
    assert [plain.calls[seq] for seq in range(8)] == [2, 2, 2, 2, 2, 1, 1, 1]
    # ... and are counted once; the outage cost no attempt.
    assert service.stats.processed == 8
    assert service.stats.outage_waits >= 1
    assert (service.stats.retries, service.stats.dead_lettered) == (0, 0)
    assert await plain.outbox_rows() == 8


async def test_a_duplicate_inside_one_batch_is_processed_once(plain: Plain) -> None:
    items = [plain.item(seq) for seq in range(5)]
    # The same message (same id) twice in a row, and once more later in the batch.
    await plain.produce([items[0], items[1], items[1], items[2], items[3], items[1], items[4]])
    service = await run(plain, 7, 5)

    effects = await plain.effects_by_seq()
    assert sorted(effects) == list(range(5))
    assert all(len(txids) == 1 for txids in effects.values())
    assert len({txid for (txid,) in effects.values()}) == 1  # they were one batch
    assert (service.stats.processed, service.stats.duplicates) == (5, 2)
    assert plain.calls[1] == 1
    assert await plain.outbox_rows() == 5


# -- sagas: a refusal inside a batch compensates that saga only -----------------------------


@pytest.fixture
async def shop(postgres_databases: Any, kafka_settings: KafkaSettings) -> AsyncIterator[Shop]:
    shop = await build_shop(postgres_databases, kafka_settings)
    yield shop
    for service in shop.services.values():
        await service.stop()
    for engine in shop.engines.values():
        await engine.dispose()


async def test_a_business_failure_inside_a_batch_compensates_only_its_saga(shop: Shop) -> None:
    release = asyncio.Event()
    held = asyncio.Event()
    txids: dict[int, int] = {}

    async def hold(ctx: SagaContext) -> None:
        held.set()
        await asyncio.wait_for(release.wait(), 30)

    async def record(ctx: SagaContext) -> None:
        txid = (await ctx.session.execute(sa.text("SELECT txid_current()"))).scalar_one()
        txids[ctx.data["n"]] = txid

    async def refuse(ctx: SagaContext) -> None:
        await record(ctx)
        raise OutOfStock("no stock")

    shop.beta[10] = hold
    shop.beta.update({11: record, 12: refuse, 13: record, 14: record})
    blocker = await shop.start(10)
    await asyncio.wait_for(held.wait(), 30)
    beta = shop.services["beta"]
    held_on = fetched(beta)  # the batch beta is held in
    # While beta is held up, four sagas reach it: its next batch holds all four.
    sagas = {n: await shop.start(n) for n in (11, 12, 13, 14)}
    # Released once its consumer has fetched the eight records behind that batch
    # (each saga's start and alpha's answer), not after a second's sleep for the
    # relay to publish and the consumer to fetch: a loaded machine can need more.
    await until(lambda: fetched(beta) >= held_on + 8)
    release.set()

    assert await shop.ended_as(blocker) == "COMPLETED"
    assert {n: await shop.ended_as(s) for n, s in sagas.items()} == {
        11: "COMPLETED",
        12: "COMPENSATED",
        13: "COMPLETED",
        14: "COMPLETED",
    }
    assert len(set(txids.values())) == 1  # the four steps ran in one transaction
    for n, saga_id in sagas.items():
        if n == 12:
            assert await shop.effects_of("alpha", saga_id) == ["released", "reserved"]
            assert await shop.effects_of("beta", saga_id) == []
        else:
            assert await shop.effects_of("alpha", saga_id) == ["reserved"]
            assert await shop.effects_of("beta", saga_id) == ["charged"]
        assert shop.calls[f"beta {saga_id}"] == 1
    assert shop.services["beta"].stats.dead_lettered == 0

"""A batch's savepoints on both databases, with ``process_batch`` called directly.

No broker: records are built in memory and dead letters land in the outbox
(the relay is not started). On PostgreSQL and on SQLite (the embedded
default), one record's failure must roll back only its own savepoint, inbox
row included, and each record must see the database as it is, not as an
earlier record of the batch saw it.

A batch also reads its records' inbox keys (from their headers) when its
transaction begins and writes their inbox and outbox rows just before it
commits. Each record must still end as if it had been alone: one record's
headers must not fail the others, and the outbox rows must follow the
records' order, whoever wrote them.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from aiokafka import ConsumerRecord
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from support import consumer_record, core_codec, offline_service

from outbox import RetryPolicy, create_engine
from outbox.message import decode_headers
from saga import batch as batch_module
from saga import processing
from saga.context import MessageContext
from saga.envelope import Envelope, EnvelopeCodec
from saga.telemetry import instrument

ITEM = "choreosaga.test.Item"
TOPIC = "items"
OUT = "items.out"


class Direct:
    def __init__(self, url: str) -> None:
        self.engine = create_engine(url)
        self.codec = core_codec()
        self.envelopes = EnvelopeCodec(self.codec)
        metadata = sa.MetaData()
        self.effects = sa.Table(
            "effects",
            metadata,
            sa.Column("row", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("seq", sa.Integer, nullable=False),
        )
        self.metadata = metadata
        self.behaviour: dict[int, Callable[[MessageContext], Awaitable[None]]] = {}
        self.calls: dict[int, int] = {}
        self.service = offline_service(
            "direct",
            self.engine,
            retry=RetryPolicy(initial_interval=timedelta(milliseconds=1), maximum_attempts=2),
        )
        self.tables = self.service.tables

        @self.service.subscribe(TOPIC, ITEM)
        async def handle(ctx: MessageContext) -> None:
            seq = int(ctx.data["seq"])
            self.calls[seq] = self.calls.get(seq, 0) + 1
            await ctx.session.execute(sa.insert(self.effects).values(seq=seq))
            behaviour = self.behaviour.get(seq)
            if behaviour is not None:
                await behaviour(ctx)
            ctx.emit(ITEM, {**ctx.data, "note": "seen"}, topic=OUT)

    async def setup(self) -> None:
        async with self.engine.begin() as conn:
            await conn.run_sync(self.metadata.create_all)
        await self.service.create_tables()

    def records(self, seqs: list[int]) -> list[ConsumerRecord[bytes, bytes]]:
        out = []
        for offset, seq in enumerate(seqs):
            envelope = Envelope(type=ITEM, data={"key": "k", "seq": seq, "note": ""}, source="/t")
            out.append(consumer_record(TOPIC, offset, *self.envelopes.encode(envelope)))
        return out

    async def effects_by_seq(self) -> dict[int, int]:
        async with self.engine.connect() as conn:
            rows = (await conn.execute(sa.select(self.effects.c.seq))).scalars().all()
        found: dict[int, int] = {}
        for seq in rows:
            found[seq] = found.get(seq, 0) + 1
        return found

    async def outbox_topics(self) -> list[str]:
        o = self.tables.outbox
        async with self.engine.connect() as conn:
            return list((await conn.execute(sa.select(o.c.topic).order_by(o.c.id))).scalars())

    async def inbox_count(self) -> int:
        i = self.tables.inbox
        async with self.engine.connect() as conn:
            return int((await conn.execute(sa.select(sa.func.count()).select_from(i))).scalar_one())


@contextlib.asynccontextmanager
async def direct_on(url: str) -> AsyncIterator[Direct]:
    d = Direct(url)
    await d.setup()
    try:
        yield d
    finally:
        await d.engine.dispose()


@pytest.fixture
async def direct(database_url: str) -> AsyncIterator[Direct]:
    async with direct_on(database_url) as d:
        yield d


async def test_a_bug_rolls_back_its_savepoint_only_inbox_row_included(direct: Direct) -> None:
    async def bug(ctx: MessageContext) -> None:
        raise KeyError("x")

    direct.behaviour[2] = bug
    await direct.service.processor.process_batch(direct.records([0, 1, 2, 3, 4]))
    assert await direct.effects_by_seq() == {0: 1, 1: 1, 3: 1, 4: 1}
    topics = await direct.outbox_topics()
    assert topics.count(OUT) == 4
    assert topics.count(TOPIC + ".dlq") == 1
    s = direct.service.stats
    assert (s.processed, s.dead_lettered) == (4, 1)
    # The bug's inbox row went with its savepoint: a replay of it would run.
    assert await direct.inbox_count() == 4 + 1  # four records + the dead letter's position


from sqlalchemy.orm import (  # noqa: E402
    DeclarativeBase,
    Mapped,
    mapped_column,
    relationship,
    selectinload,
)


class Base(DeclarativeBase):
    pass


class Warehouse(Base):
    __tablename__ = "warehouse"
    id: Mapped[int] = mapped_column(primary_key=True)
    stocks: Mapped[list[Stock]] = relationship(back_populates="warehouse")


class Stock(Base):
    __tablename__ = "stock"
    sku: Mapped[str] = mapped_column(sa.String(20), primary_key=True)
    warehouse_id: Mapped[int] = mapped_column(sa.ForeignKey("warehouse.id"))
    qty: Mapped[int]
    warehouse: Mapped[Warehouse] = relationship(back_populates="stocks")


async def one_warehouse(direct: Direct, stock: int | None = None) -> None:
    """Warehouse 1, and ``stock`` of sku "a" in it."""
    async with direct.engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
        await conn.execute(sa.insert(Warehouse.__table__).values(id=1))
        if stock is not None:
            await conn.execute(
                sa.insert(Stock.__table__).values(sku="a", warehouse_id=1, qty=stock)
            )


async def test_a_record_sees_rows_as_they_are_not_as_an_earlier_record_loaded_them(
    direct: Direct,
) -> None:
    await one_warehouse(direct, stock=100)

    async def take(ctx: MessageContext) -> None:
        # The warehouse's stock list, as a handler checking the whole warehouse would load it.
        stock = await ctx.session.get(
            Stock, "a", options=[selectinload(Stock.warehouse).selectinload(Warehouse.stocks)]
        )
        assert stock is not None
        stock.qty -= 1

    async def restock(ctx: MessageContext) -> None:
        table = Stock.__table__
        await ctx.session.execute(
            sa.update(table).where(table.c.sku == "a").values(qty=table.c.qty + 10)
        )

    direct.behaviour.update({0: take, 1: restock, 2: take})
    await direct.service.processor.process_batch(direct.records([0, 1, 2]))
    async with direct.engine.connect() as conn:
        qty = (await conn.execute(sa.select(Stock.__table__.c.qty))).scalar_one()
    assert qty == 108


async def test_a_batch_cancelled_mid_way_counts_nothing_it_rolled_back(direct: Direct) -> None:
    started = asyncio.Event()

    async def hang(ctx: MessageContext) -> None:
        started.set()
        await asyncio.Event().wait()  # the partition is revoked, or the service stops

    direct.behaviour[2] = hang
    task = asyncio.create_task(direct.service.processor.process_batch(direct.records([0, 1, 2])))
    await asyncio.wait_for(started.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert await direct.effects_by_seq() == {}  # rolled back: they come again
    assert direct.service.stats.processed == 0
    assert direct.engine.sync_engine.pool.checkedout() == 0


async def test_stats_count_a_batchs_records_once_they_are_committed(direct: Direct) -> None:
    """A user (or a test) that watches ``stats.processed`` and then reads the
    database must find what was counted: while the batch's records wait for its
    commit they are not counted yet."""
    seen_by_a_watcher: list[int] = []

    async def watched(ctx: MessageContext) -> None:
        seen_by_a_watcher.append(direct.service.stats.processed)
        await asyncio.sleep(0)  # a watcher polling the counters runs now

    direct.behaviour[2] = watched
    await direct.service.processor.process_batch(direct.records([0, 1, 2]))

    assert seen_by_a_watcher == [0]  # records 0 and 1 were handled, not yet committed
    assert direct.service.stats.processed == 3
    assert await direct.effects_by_seq() == {0: 1, 1: 1, 2: 1}


async def test_a_batch_cancelled_in_its_commit_gives_its_connection_back(direct: Direct) -> None:
    committing = asyncio.Event()

    async def slow_commit(ctx: MessageContext) -> None:
        session = ctx.session

        async def commit() -> None:
            committing.set()
            await asyncio.Event().wait()  # a commit the grace period does not wait for

        session.commit = commit  # type: ignore[method-assign]

    direct.behaviour[1] = slow_commit
    task = asyncio.create_task(direct.service.processor.process_batch(direct.records([0, 1])))
    await asyncio.wait_for(committing.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert direct.engine.sync_engine.pool.checkedout() == 0


async def test_a_record_whose_flush_fails_writes_nothing_and_the_others_once(
    direct: Direct,
) -> None:
    await one_warehouse(direct)

    async def taken_key(ctx: MessageContext) -> None:
        ctx.session.add(Warehouse(id=1))  # fails when the savepoint flushes it

    direct.behaviour[2] = taken_key
    await direct.service.processor.process_batch(direct.records([0, 1, 2, 3]))
    assert await direct.effects_by_seq() == {0: 1, 1: 1, 3: 1}
    topics = await direct.outbox_topics()
    assert topics.count(OUT) == 3  # not the failed record's event, no second copy of any
    assert topics.count(TOPIC + ".dlq") == 1
    assert (direct.service.stats.processed, direct.service.stats.dead_lettered) == (3, 1)


@pytest.fixture
async def direct_pg(postgres_url: str) -> AsyncIterator[Direct]:
    """Two transactions at once: PostgreSQL only (SQLite runs one writer at a time)."""
    async with direct_on(postgres_url) as d:
        yield d


async def test_a_message_another_consumer_records_mid_batch_is_not_applied_twice(
    direct_pg: Direct,
) -> None:
    """A zombie consumer of the partition commits one of the batch's messages first.

    The batch looked its messages up in the inbox when it began, so it sees
    that message as new; its handler runs here too. The batch must find out
    when it records its messages, roll back, and redo its records: the
    message is then a duplicate, and every other one is applied once.
    """
    direct = direct_pg
    records = direct.records([0, 1, 2, 3])
    zombie = direct.envelopes.decode(records[2].key, records[2].value, records[2].headers)
    inbox = direct.tables.inbox

    async def zombie_commits_record_2(ctx: MessageContext) -> None:
        if direct.calls[0] == 1:
            async with direct.engine.begin() as conn:
                await conn.execute(
                    sa.insert(inbox).values(
                        consumer="direct", source="/t", message_id=zombie.id, received_at_ms=0
                    )
                )

    direct.behaviour[0] = zombie_commits_record_2
    await direct.service.processor.process_batch(records)

    assert await direct.effects_by_seq() == {0: 1, 1: 1, 3: 1}
    assert (await direct.outbox_topics()).count(OUT) == 3
    stats = direct.service.stats
    assert (stats.processed, stats.duplicates, stats.dead_lettered) == (3, 1, 0)
    assert direct.calls == {0: 2, 1: 2, 2: 1, 3: 2}  # the first pass was rolled back


# -- deferred inbox and outbox writes, attacked ------------------------------------------


async def outbox_notes(direct: Direct) -> list[tuple[int, str]]:
    """``(seq, note)`` of the outbox rows on ``OUT``, in id order (the relay's order per key)."""
    o = direct.tables.outbox
    async with direct.engine.connect() as conn:
        rows = (
            await conn.execute(
                sa.select(o.c.key, o.c.value, o.c.headers).where(o.c.topic == OUT).order_by(o.c.id)
            )
        ).all()
    notes = []
    for key, value, headers in rows:
        envelope = direct.envelopes.decode(key, value, decode_headers(headers))
        notes.append((int(envelope.data["seq"]), str(envelope.data["note"])))
    return notes


async def test_a_record_whose_id_the_database_refuses_fails_alone(direct_pg: Direct) -> None:
    """A NUL in one record's ``ce_id`` (PostgreSQL text cannot hold it) is that record's problem.

    The batch reads every record's inbox key when it begins: that read must
    not fail, and retry, every other record of the batch.
    """
    direct = direct_pg
    direct.service.processor.retry = RetryPolicy(maximum_attempts=1)
    records = direct.records([0, 1, 2, 3])
    records[2].headers[:] = [
        (name, b"bad\x00id" if name == "ce_id" else value) for name, value in records[2].headers
    ]

    await direct.service.processor.process_batch(records)

    assert await direct.effects_by_seq() == {0: 1, 1: 1, 3: 1}
    s = direct.service.stats
    assert (s.processed, s.dead_lettered, s.retries) == (3, 1, 0)
    assert (await direct.outbox_topics()).count(TOPIC + ".dlq") == 1  # record 2's only


async def test_outbox_rows_follow_record_order_when_a_handler_publishes_itself(
    direct: Direct,
) -> None:
    """Record 1 writes to the outbox with ``Service.publish`` in its own transaction.

    Its row must come after record 0's emitted event (same key): the relay
    publishes a key's rows in id order.
    """

    async def publish(ctx: MessageContext) -> None:
        envelope = Envelope(
            type=ITEM, data={"key": "k", "seq": 1, "note": "published"}, source="/t", key=b"k"
        )
        await direct.service.publish(ctx.session, envelope, topic=OUT)

    direct.behaviour[1] = publish
    # Keyed records: what they emit has their key, the key the handler publishes with.
    records = [dataclasses.replace(r, key=b"k") for r in direct.records([0, 1, 2])]
    await direct.service.processor.process_batch(records)

    assert await outbox_notes(direct) == [
        (0, "seen"),
        (1, "published"),
        (1, "seen"),
        (2, "seen"),
    ]


async def test_outbox_rows_follow_record_order_when_a_handler_publishes_on_the_connection(
    direct: Direct,
) -> None:
    """As above, but record 1 publishes on its session's connection, not on the session.

    Same transaction, so the same deferred, ordered write: its row must not
    jump ahead of record 0's.
    """

    def published(seq: int) -> Envelope:
        data = {"key": "k", "seq": seq, "note": "published"}
        return Envelope(type=ITEM, data=data, source="/t", key=b"k")

    async def publish(ctx: MessageContext) -> None:
        await direct.service.publish(await ctx.session.connection(), published(1), topic=OUT)

    direct.behaviour[1] = publish
    records = [dataclasses.replace(r, key=b"k") for r in direct.records([0, 1, 2])]
    await direct.service.processor.process_batch(records)
    # The connection, back in the pool, writes at once again: not into a batch long gone.
    async with direct.engine.begin() as conn:
        await direct.service.publish(conn, published(3), topic=OUT)

    assert await outbox_notes(direct) == [
        (0, "seen"),
        (1, "published"),
        (1, "seen"),
        (2, "seen"),
        (3, "published"),
    ]


async def test_each_records_outbox_write_is_in_its_own_trace(direct: Direct) -> None:
    """With telemetry, a record's ``outbox write`` span is a child of that record's span.

    Not one span for the whole batch, outside every record's trace.
    """
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    instrument(direct.service, tracer_provider=provider)

    await direct.service.processor.process_batch(direct.records([0, 1, 2]))

    finished = spans.get_finished_spans()
    processes = {s.context.span_id for s in finished if s.name == f"{TOPIC} process"}
    writes = [s for s in finished if s.name == "outbox write"]
    assert len(processes) == 3
    assert sorted(s.parent.span_id for s in writes if s.parent) == sorted(processes)
    assert len(writes) == 3


async def test_a_copy_of_a_record_committed_alone_is_a_duplicate_without_redoing_the_batch(
    direct: Direct, caplog: pytest.LogCaptureFixture
) -> None:
    """Record 0 fails once, so it is committed alone; a copy of it comes later in the batch.

    The batch read the inbox before record 0 was committed: the copy must
    still be recognised as a duplicate, without running its handler and
    redoing the records after record 0 as if another consumer had taken it.
    """

    async def fails_once(ctx: MessageContext) -> None:
        if direct.calls[0] == 1:
            raise RuntimeError("first attempt")

    direct.behaviour[0] = fails_once
    first, second = direct.records([0, 1])
    copy = dataclasses.replace(first, offset=2)

    await direct.service.processor.process_batch([first, second, copy])

    assert await direct.effects_by_seq() == {0: 1, 1: 1}
    s = direct.service.stats
    assert (s.processed, s.duplicates, s.dead_lettered) == (2, 1, 0)
    assert direct.calls == {0: 2, 1: 1}  # record 0 twice (its failure), nothing redone
    assert "another consumer" not in caplog.text


async def test_what_a_failing_handler_published_itself_goes_with_its_savepoint(
    direct: Direct,
) -> None:
    async def publish_then_fail(ctx: MessageContext) -> None:
        envelope = Envelope(
            type=ITEM, data={"key": "k", "seq": 1, "note": "published"}, source="/t"
        )
        await direct.service.publish(ctx.session, envelope, topic=OUT)
        raise KeyError("bug")

    direct.behaviour[1] = publish_then_fail
    await direct.service.processor.process_batch(direct.records([0, 1, 2]))

    assert await outbox_notes(direct) == [(0, "seen"), (2, "seen")]
    assert direct.service.stats.dead_lettered == 1


async def test_a_connection_lost_between_records_is_an_outage_and_the_batch_is_redone(
    direct_pg: Direct, caplog: pytest.LogCaptureFixture
) -> None:
    """The next record's SAVEPOINT finds the connection gone: an outage, not a bug.

    The batch's transaction went with its connection, so the records since
    the last commit are redone on a new one, each applied once, none
    dead-lettered (PostgreSQL, where the savepoints go straight to psycopg),
    and the warning says why: the server's own words, not a later error on
    the closed connection.
    """
    direct = direct_pg
    killed: list[int] = []

    async def kill_the_batch_connection(ctx: MessageContext) -> None:
        if killed:
            return  # the redone batch goes through
        pid = (await ctx.session.execute(sa.text("SELECT pg_backend_pid()"))).scalar_one()
        async with direct.engine.connect() as other:
            await other.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        killed.append(pid)

    direct.behaviour[1] = kill_the_batch_connection
    with caplog.at_level(logging.WARNING, logger="saga.processing"):
        await direct.service.processor.process_batch(direct.records([0, 1, 2, 3]))

    assert killed
    assert await direct.effects_by_seq() == {0: 1, 1: 1, 2: 1, 3: 1}
    s = direct.service.stats
    assert (s.processed, s.dead_lettered) == (4, 0)
    assert s.outage_waits >= 1
    outages = [r.getMessage() for r in caplog.records if "database unavailable" in r.getMessage()]
    assert outages, [r.getMessage() for r in caplog.records]
    assert "terminating connection due to administrator command" in outages[0]
    assert (await direct.outbox_topics()).count(OUT) == 4


async def test_a_handler_that_commits_the_session_itself_leaves_no_failed_record_behind(
    direct_pg: Direct,
) -> None:
    """A handler commits the batch's session: the batch's connection goes back to the pool.

    The next records run on whatever connection the session checks out next;
    a record that then fails must still write nothing (it is dead-lettered
    alone), and no statement of the batch may land on a connection it gave
    back (idle in the pool, or another session's).
    """
    direct = direct_pg

    async def commit_itself(ctx: MessageContext) -> None:
        # Another connection in the pool, ahead of the batch's once it is given back.
        async with direct.engine.connect() as other:
            await other.execute(sa.text("SELECT 1"))
        await ctx.session.commit()

    async def bug(ctx: MessageContext) -> None:
        raise KeyError("x")

    direct.behaviour[1] = commit_itself
    direct.behaviour[2] = bug
    await direct.service.processor.process_batch(direct.records([0, 1, 2, 3]))

    assert await direct.effects_by_seq() == {0: 1, 1: 1, 3: 1}
    s = direct.service.stats
    assert s.dead_lettered == 1
    async with direct.engine.connect() as conn:
        stray = await conn.execute(
            sa.text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND state LIKE 'idle in transaction%'"
            )
        )
        assert stray.scalar_one() == 0


async def test_after_a_deadlock_between_two_batches_they_go_one_at_a_time(
    direct_pg: Direct,
) -> None:
    """Two partitions' batches lock the same two rows in opposite orders, twice.

    Each record's handler locks one row, which one message per transaction
    cannot deadlock on; two batches, each holding its first record's row, do
    (PostgreSQL breaks the cycle after ``deadlock_timeout``, a second, with both
    partitions stalled). The first deadlock must be the last: the service then
    runs its batches one at a time for a while (one's transaction ends before
    the next begins), each still one transaction for all its records, and every
    record is applied once, none dead-lettered.
    """
    direct = direct_pg
    rows = sa.Table("hot", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True))
    async with direct.engine.begin() as conn:
        await conn.run_sync(rows.metadata.create_all)
        await conn.execute(sa.insert(rows), [{"id": 1}, {"id": 2}])
    holding = {"a": asyncio.Event(), "b": asyncio.Event()}
    txids: dict[int, int] = {}
    first_txid: dict[str, int] = {}
    others_seen: list[str] = []

    def lock(
        row: int, mine: str | None = None, other: str | None = None, wait: float = 10
    ) -> Callable[[MessageContext], Awaitable[None]]:
        async def behaviour(ctx: MessageContext) -> None:
            txid = (await ctx.session.execute(sa.text("SELECT txid_current()"))).scalar_one()
            txids[int(ctx.data["seq"])] = txid
            await ctx.session.execute(sa.update(rows).where(rows.c.id == row).values(id=row))
            if mine is not None and other is not None:
                if other in first_txid:
                    # The other batch ran first: its transaction must have ended.
                    status = await ctx.session.execute(
                        sa.text("SELECT txid_status(:txid)"), {"txid": first_txid[other]}
                    )
                    others_seen.append(status.scalar_one())
                first_txid[mine] = txid
                # Both batches hold their first row before either asks for its second.
                # The other one gets there at once; the bound only ends the wait for
                # one that never comes (it was 0.5 s, which a loaded machine can take
                # to start the other batch: then nothing deadlocked).
                holding[mine].set()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await holding[other].wait()

        return behaviour

    processor = direct.service.processor
    for first, wait in ((0, 10.0), (10, 0.5)):
        for event in holding.values():
            event.clear()
        first_txid.clear()
        others_seen.clear()
        direct.behaviour.update(
            {
                first: lock(1, "a", "b", wait),
                first + 1: lock(2),
                first + 2: lock(2, "b", "a", wait),
                first + 3: lock(1),
            }
        )
        a = direct.records([first, first + 1])
        b = [
            dataclasses.replace(r, partition=1, offset=r.offset + 100)
            for r in direct.records([first + 2, first + 3])
        ]
        await asyncio.gather(processor.process_batch(a), processor.process_batch(b))

    s = direct.service.stats
    assert s.retries == 1  # the first round's deadlock, and no other
    assert (s.processed, s.dead_lettered) == (8, 0)
    assert await direct.effects_by_seq() == dict.fromkeys((0, 1, 2, 3, 10, 11, 12, 13), 1)
    # The second round: each batch one transaction, the second begun after the first ended.
    assert txids[10] == txids[11]
    assert txids[12] == txids[13]
    assert others_seen == ["committed"]


async def test_a_conflict_while_batches_go_one_at_a_time_sends_records_one_transaction_each(
    direct_pg: Direct,
) -> None:
    """Batches one at a time cannot deadlock each other, but can with another process.

    A serialization failure of a record alone makes the service's batches go one
    at a time, still batched; one met by a batch while it ran alone in the service
    (its other party is outside this process, or a record outside any batch)
    sends the service's records one transaction each, the rest of that batch
    included. Every record is applied once.
    """
    direct = direct_pg
    txids: dict[int, list[int]] = {}
    conflicts = {1, 11}

    async def note_transaction(ctx: MessageContext) -> None:
        seq = int(ctx.data["seq"])
        txid = (await ctx.session.execute(sa.text("SELECT txid_current()"))).scalar_one()
        txids.setdefault(seq, []).append(txid)
        if seq in conflicts:
            conflicts.discard(seq)
            await ctx.session.execute(
                sa.text("DO $$ BEGIN RAISE EXCEPTION 'conflict' USING ERRCODE = '40001'; END $$")
            )

    direct.behaviour.update(dict.fromkeys((1, 2, 3, 10, 11, 12, 13, 20, 21), note_transaction))
    processor = direct.service.processor
    await processor.process_batch(direct.records([1]))  # alone, conflicts once
    await processor.process_batch(direct.records([2, 3]))
    await processor.process_batch(direct.records([10, 11, 12, 13]))  # 11 conflicts once
    await processor.process_batch(direct.records([20, 21]))

    last = {seq: seen[-1] for seq, seen in txids.items()}
    assert last[2] == last[3]  # batched, one at a time
    assert len({last[seq] for seq in (10, 11, 12, 13)}) == 4
    assert last[20] != last[21]
    assert await direct.effects_by_seq() == dict.fromkeys((1, 2, 3, 10, 11, 12, 13, 20, 21), 1)
    s = direct.service.stats
    assert (s.processed, s.retries, s.dead_lettered) == (9, 2, 0)


async def test_a_serialization_failure_at_a_batch_commit_also_makes_batches_take_turns(
    direct_pg: Direct,
) -> None:
    """PostgreSQL may report a conflict only at COMMIT (SERIALIZABLE, deferred checks).

    The batch is then redone one transaction per record, as any failed commit,
    and the contention it met must also make the service's next batches take
    turns, as a deadlock in a handler's statement does: two partitions' batches
    then each keep one transaction, the second begun once the first ended. One
    that fails so while it had its turn sends the next batches one transaction
    per record.
    """
    direct = direct_pg
    async with direct.engine.begin() as conn:
        for statement in (
            "CREATE SEQUENCE fired_1",
            "CREATE SEQUENCE fired_21",
            """CREATE FUNCTION fail_once() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF NEW.seq IN (1, 21) THEN
                    IF nextval(('fired_' || NEW.seq)::regclass) = 1 THEN
                        RAISE EXCEPTION 'could not serialize access due to read/write '
                            'dependencies among transactions' USING ERRCODE = '40001';
                    END IF;
                END IF;
                RETURN NULL;
            END $$""",
            "CREATE CONSTRAINT TRIGGER fail_at_commit AFTER INSERT ON effects "
            "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION fail_once()",
        ):
            await conn.exec_driver_sql(statement)
    transactions: dict[int, int] = {}
    first_of: dict[int, int] = {}
    others_seen: list[str] = []

    async def note_transaction(ctx: MessageContext) -> None:
        seq = int(ctx.data["seq"])
        transactions[seq] = (
            await ctx.session.execute(sa.text("SELECT txid_current()"))
        ).scalar_one()

    async def first_of_its_batch(ctx: MessageContext) -> None:
        await note_transaction(ctx)
        seq = int(ctx.data["seq"])
        for txid in first_of.values():  # the other batch, if it began first
            status = await ctx.session.execute(sa.text("SELECT txid_status(:t)"), {"t": txid})
            others_seen.append(status.scalar_one())
        first_of[seq] = transactions[seq]
        await asyncio.sleep(0.2)  # time for the other batch to begin, were it let

    direct.behaviour.update(dict.fromkeys((0, 1, 2, 11, 13, 20, 21, 22, 30, 31), note_transaction))
    direct.behaviour.update(dict.fromkeys((10, 12), first_of_its_batch))
    processor = direct.service.processor
    await processor.process_batch(direct.records([0, 1, 2]))  # fails at its commit, redone
    other = [
        dataclasses.replace(r, partition=1, offset=r.offset + 100) for r in direct.records([12, 13])
    ]
    await asyncio.gather(
        processor.process_batch(direct.records([10, 11])), processor.process_batch(other)
    )
    await processor.process_batch(direct.records([20, 21, 22]))  # had its turn: fails, redone
    await processor.process_batch(direct.records([30, 31]))

    assert transactions[10] == transactions[11]
    assert transactions[12] == transactions[13]
    assert others_seen == ["committed"]
    assert transactions[30] != transactions[31]
    assert direct.calls == {
        **dict.fromkeys((0, 1, 2, 20, 21, 22), 2),
        **dict.fromkeys((10, 11, 12, 13, 30, 31), 1),
    }
    everything = (0, 1, 2, 10, 11, 12, 13, 20, 21, 22, 30, 31)
    assert await direct.effects_by_seq() == dict.fromkeys(everything, 1)
    assert (direct.service.stats.processed, direct.service.stats.dead_lettered) == (12, 0)


async def test_a_batch_redone_after_an_outage_once_batches_take_turns_takes_its_turn(
    direct_pg: Direct,
) -> None:
    """Another partition's record meets a serialization failure while a batch is open.

    That batch goes on in its transaction (opened before batches took turns),
    then loses its connection: its records are redone from the first. Batches
    now take turns, so the redone batch takes one; the lost transaction must
    not count as still open, or the batch would wait for it for good. Its
    records are redone in one transaction, once each.
    """
    direct = direct_pg
    processor = direct.service.processor
    transactions: dict[int, list[int]] = {}
    conflicted: list[bool] = []
    killed: list[int] = []

    async def note_transaction(ctx: MessageContext) -> int:
        pid, txid = (
            await ctx.session.execute(sa.text("SELECT pg_backend_pid(), txid_current()"))
        ).one()
        transactions.setdefault(int(ctx.data["seq"]), []).append(txid)
        return int(pid)

    async def conflict_once(ctx: MessageContext) -> None:
        if not conflicted:
            conflicted.append(True)
            await ctx.session.execute(
                sa.text("DO $$ BEGIN RAISE EXCEPTION 'conflict' USING ERRCODE = '40001'; END $$")
            )

    async def elsewhere_then_lose_the_connection(ctx: MessageContext) -> None:
        pid = await note_transaction(ctx)
        if killed:
            return  # the redone batch goes through
        other = dataclasses.replace(direct.records([50])[0], partition=1, offset=100)
        # Another partition's worker: a task of its own, in no batch.
        await asyncio.create_task(processor.process(other), context=contextvars.Context())
        async with direct.engine.connect() as conn:
            await conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        killed.append(pid)

    direct.behaviour.update(dict.fromkeys((0, 2, 3), note_transaction))
    direct.behaviour.update({1: elsewhere_then_lose_the_connection, 50: conflict_once})
    await processor.process_batch(direct.records([0, 1, 2, 3]))

    assert conflicted
    assert killed
    assert len({transactions[seq][-1] for seq in (0, 1, 2, 3)}) == 1
    assert len(transactions[0]) == 2  # redone from the first
    assert await direct.effects_by_seq() == dict.fromkeys((0, 1, 2, 3, 50), 1)
    s = direct.service.stats
    assert (s.processed, s.retries, s.dead_lettered) == (5, 1, 0)


async def test_a_batch_cancelled_again_while_closing_still_ends_its_turn(
    direct_pg: Direct, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A partition revoked twice: once in a handler, again while its batch's session closes.

    The batch must still count as ended, or batches that take turns later wait
    for it for good: the partitions' records would never be processed.
    """
    direct = direct_pg
    processor = direct.service.processor
    in_handler = asyncio.Event()
    closing = asyncio.Event()
    conflicted: list[bool] = []

    async def hang(ctx: MessageContext) -> None:
        in_handler.set()
        await asyncio.sleep(30)

    async def conflict_once(ctx: MessageContext) -> None:
        if not conflicted:
            conflicted.append(True)
            await ctx.session.execute(
                sa.text("DO $$ BEGIN RAISE EXCEPTION 'conflict' USING ERRCODE = '40001'; END $$")
            )

    real_close = batch_module.close_quietly

    async def slow_close(session: Any) -> None:
        closing.set()
        try:
            await asyncio.sleep(30)
        finally:
            await real_close(session)

    direct.behaviour.update({1: hang, 5: conflict_once})
    monkeypatch.setattr(batch_module, "close_quietly", slow_close)
    task = asyncio.create_task(processor.process_batch(direct.records([0, 1])))
    await in_handler.wait()
    task.cancel()
    await closing.wait()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    monkeypatch.undo()

    await processor.process_batch(direct.records([5]))  # batches take turns from now
    async with asyncio.timeout(10):
        await processor.process_batch(direct.records([2, 3]))
    assert await direct.effects_by_seq() == {2: 1, 3: 1, 5: 1}


async def test_a_batch_queued_for_a_turn_goes_once_turns_are_over_however_other_batches_overlap(
    direct_pg: Direct, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Turns end while a partition's batch waits for its turn.

    It must then go, as the batches of the other partitions do: not wait until
    no batch of the service has a transaction open, which, while other
    partitions' batches keep overlapping (a service under load, right after the
    deadlock that made its batches take turns), may never come.
    """
    direct = direct_pg
    processor = direct.service.processor
    monkeypatch.setattr(processing, "_CONTENTION_WINDOW", 1.0)
    started = {seq: asyncio.Event() for seq in (10, 30, 40)}
    release = {seq: asyncio.Event() for seq in (10, 30, 40)}
    conflicted: list[bool] = []

    async def conflict_once(ctx: MessageContext) -> None:
        if not conflicted:
            conflicted.append(True)
            await ctx.session.execute(
                sa.text("DO $$ BEGIN RAISE EXCEPTION 'conflict' USING ERRCODE = '40001'; END $$")
            )

    def hold(seq: int) -> Callable[[MessageContext], Awaitable[None]]:
        async def behaviour(ctx: MessageContext) -> None:
            started[seq].set()
            await release[seq].wait()

        return behaviour

    def partition(seqs: list[int], number: int) -> list[ConsumerRecord[bytes, bytes]]:
        return [dataclasses.replace(r, partition=number) for r in direct.records(seqs)]

    direct.behaviour.update({5: conflict_once, 10: hold(10), 30: hold(30), 40: hold(40)})
    await processor.process_batch(direct.records([5]))  # batches take turns for 1 s
    tasks = [asyncio.create_task(processor.process_batch(partition([10, 11], 1)))]
    try:
        await started[10].wait()  # it has its turn
        queued = asyncio.create_task(processor.process_batch(partition([20, 21], 2)))
        tasks.append(queued)
        await asyncio.sleep(1.2)  # turns are over
        # Other partitions' batches, each begun before the one before it ends.
        tasks.append(asyncio.create_task(processor.process_batch(partition([30, 31], 3))))
        await started[30].wait()
        release[10].set()
        await tasks[0]
        tasks.append(asyncio.create_task(processor.process_batch(partition([40, 41], 4))))
        await started[40].wait()
        release[30].set()
        await tasks[2]
        async with asyncio.timeout(5):
            await queued
    finally:
        for event in release.values():
            event.set()
        async with asyncio.timeout(10):
            await asyncio.gather(*tasks, return_exceptions=True)
    assert await direct.effects_by_seq() == dict.fromkeys((5, 10, 11, 20, 21, 30, 31, 40, 41), 1)

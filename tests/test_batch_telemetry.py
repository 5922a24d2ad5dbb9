"""Telemetry of batches: a redone batch counts each record and saga end once, and its outage.

When a batch's transaction is lost (the connection dies), or another
consumer recorded one of its messages first, its records are redone from
the first uncommitted one. Spans show both passes; the per-record metrics
and ``saga.duration``, which counts sagas ending, must count each record
and each end once, when it is committed, and the outage metric must count
the outage.
The gauges are read from the database while no batch holds a connection.
``process_batch`` is driven directly, on PostgreSQL, no broker needed.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from aiokafka import ConsumerRecord
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase
from support import consumer_record, metric_points, offline_service

from outbox import RetryPolicy, create_engine
from saga import SagaContext, SagaStatus
from saga.choreography import SAGA_ENDED
from saga.envelope import Envelope
from saga.service import Service
from saga.stamp import Stamp
from saga.telemetry import instrument

ITEM = "choreosaga.test.Item"


@pytest.fixture
async def initiator(postgres_url: str) -> AsyncIterator[Service]:
    # One connection, as when every connection of the pool is a partition's batch.
    engine = create_engine(postgres_url, pool_size=1, max_overflow=0, pool_timeout=2)
    service = offline_service("alpha", engine)
    yield service
    await engine.dispose()


def ended_record(service: Service, stamp: Stamp, offset: int) -> ConsumerRecord[bytes, bytes]:
    """The end of ``stamp``'s saga as another service announces it."""
    envelope = Envelope(
        type=SAGA_ENDED,
        data={"status": "COMPLETED", "reason": None},
        source="/choreosaga/beta",
        key=stamp.saga_id.encode(),
        correlation_id=stamp.correlation_id,
        stamp=replace(stamp, status=SagaStatus.COMPLETED, version=stamp.version + 1),
    )
    key, value, headers = service.envelopes.encode(envelope)
    return consumer_record(service.saga_topic("s"), offset, key, value, list(headers))


async def test_a_redone_batch_counts_its_saga_ends_once_and_its_outage(initiator: Service) -> None:
    killed: list[str] = []

    @initiator.on_saga_end("s")
    async def end(ctx: SagaContext) -> None:
        if ctx.saga_id == "s-2" and not killed:
            # The server ends this very connection: the batch's transaction is gone.
            killed.append(ctx.saga_id)
            await ctx.session.execute(sa.text("SELECT pg_terminate_backend(pg_backend_pid())"))

    reader = InMemoryMetricReader()
    instrument(initiator, meter_provider=MeterProvider(metric_readers=[reader]))
    await initiator.create_tables()
    records = await ended_sagas(initiator, ("s-1", "s-2"))

    await initiator.processor.process_batch(records)

    assert killed == ["s-2"]
    for saga_id in ("s-1", "s-2"):
        stamp = await initiator.saga_state(saga_id)
        assert stamp is not None
        assert stamp.status is SagaStatus.COMPLETED
    assert initiator.stats.processed == 2
    assert initiator.stats.outage_waits == 1
    data = reader.get_metrics_data()
    assert data is not None
    points: dict[str, list[Any]] = {}
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                points.setdefault(metric.name, []).extend(metric.data.data_points)
    # Two sagas ended, each once, though the first one's end was handled twice.
    assert sum(p.count for p in points["saga.duration"]) == 2
    # The outage the batch waited out (between records) is in the metric too.
    assert sum(p.value for p in points["saga.handler.outage_waits"]) == 1
    # One record through the pipeline each, as committed: s-1's rolled-back pass is not one.
    assert sum(p.count for p in points["saga.handler.duration"]) == 2


async def test_a_batch_redone_after_a_conflict_counts_each_record_once(
    initiator: Service, postgres_url: str
) -> None:
    """Another consumer of the partition records s-2's message while the batch runs.

    The batch's inbox write finds it taken, the batch rolls back and is
    redone: s-1 is handled again, s-2 is a duplicate. The metrics must tell
    one record processed and one duplicate, as the counters do, not the
    four passes the records went through.
    """
    other_consumer = create_engine(postgres_url)
    s2_key: list[tuple[str, str]] = []  # s-2's (source, id) in the inbox, once known
    taken: list[str] = []

    @initiator.on_saga_end("s")
    async def end(ctx: SagaContext) -> None:
        if ctx.saga_id == "s-1" and not taken:
            taken.append(ctx.saga_id)
            (source, message_id) = s2_key[0]
            async with other_consumer.begin() as conn:
                name = initiator.processor.name
                assert await initiator.inbox.record(conn, name, message_id, source=source)

    reader = InMemoryMetricReader()
    instrument(initiator, meter_provider=MeterProvider(metric_readers=[reader]))
    await initiator.create_tables()
    records = await ended_sagas(initiator, ("s-1", "s-2"))
    identity = initiator.envelopes.identity(records[1].headers)
    assert identity is not None
    s2_key.append(identity)

    try:
        await initiator.processor.process_batch(records)
    finally:
        await other_consumer.dispose()

    assert taken == ["s-1"]
    assert (initiator.stats.processed, initiator.stats.duplicates) == (1, 1)
    outcomes = sorted(
        (p.attributes["saga.outcome"], p.count)
        for p in metric_points(reader, "saga.handler.duration")
    )
    assert outcomes == [("duplicate", 1), ("processed", 1)]
    assert sum(p.value for p in metric_points(reader, "saga.inbox.duplicates")) == 1
    assert sum(p.count for p in metric_points(reader, "saga.duration")) == 1  # s-1's end


async def test_the_gauges_are_read_after_the_batch_not_while_it_holds_a_connection(
    initiator: Service, caplog: pytest.LogCaptureFixture
) -> None:
    @initiator.on_saga_end("s")
    async def end(ctx: SagaContext) -> None:
        pass

    reader = InMemoryMetricReader()
    telemetry = instrument(initiator, meter_provider=MeterProvider(metric_readers=[reader]))
    telemetry.refresh_interval = 0.0
    await initiator.create_tables()
    records = await ended_sagas(initiator, ("s-1", "s-2", "s-3"))

    await initiator.processor.process_batch(records)

    assert initiator.stats.processed == 3
    assert "could not refresh its gauges" not in caplog.text
    data = reader.get_metrics_data()
    assert data is not None
    in_flight = [
        point.value
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == "saga.in_flight"
        for point in metric.data.data_points
    ]
    assert sum(in_flight) == 0  # read after the batch committed: all three ended


async def test_an_end_the_initiator_wrote_in_a_rolled_back_record_is_not_counted(
    initiator: Service,
) -> None:
    """A step of the initiator completes saga s-2, then its record's flush fails.

    The initiator counts the ends it announces itself when they are
    committed: s-2's announcement was rolled back with its record's
    savepoint (and its record dead-lettered), so only s-1 ended.
    """
    metadata = sa.MetaData()
    marks = sa.Table("marks", metadata, sa.Column("id", sa.Integer, primary_key=True))

    class Base(DeclarativeBase):
        pass

    class Mark(Base):
        __table__ = marks

    @initiator.on_saga_end("s", retry=RetryPolicy(maximum_attempts=1))
    async def end(ctx: SagaContext) -> None:
        if ctx.saga_id == "s-2":
            ctx.session.add(Mark(id=1))  # taken: fails when the record's savepoint flushes

    @initiator.step("finish", saga="s", on=ITEM, retry=RetryPolicy(maximum_attempts=1))
    async def finish(ctx: SagaContext) -> None:
        ctx.complete()

    reader = InMemoryMetricReader()
    instrument(initiator, meter_provider=MeterProvider(metric_readers=[reader]))
    await initiator.create_tables()
    async with initiator.engine.begin() as conn:
        await conn.run_sync(metadata.create_all)
        await conn.execute(sa.insert(marks).values(id=1))
    records = []
    for offset, saga_id in enumerate(("s-1", "s-2")):
        async with AsyncSession(initiator.engine) as session, session.begin():
            stamp = await initiator.start_saga(
                session,
                "s",
                saga_id=saga_id,
                event_type=ITEM,
                data={"key": saga_id, "seq": 0, "note": ""},
            )
        records.append(step_record(initiator, stamp, offset))

    await initiator.processor.process_batch(records)

    assert (initiator.stats.processed, initiator.stats.dead_lettered) == (1, 1)
    assert sum(p.count for p in metric_points(reader, "saga.duration")) == 1


async def ended_sagas(
    initiator: Service, saga_ids: tuple[str, ...]
) -> list[ConsumerRecord[bytes, bytes]]:
    """Start each saga, and return the records announcing its end, one per saga, in order."""
    stamps = []
    for saga_id in saga_ids:
        async with AsyncSession(initiator.engine) as session, session.begin():
            stamps.append(
                await initiator.start_saga(
                    session,
                    "s",
                    saga_id=saga_id,
                    event_type=ITEM,
                    data={"key": saga_id, "seq": 0, "note": ""},
                )
            )
    return [ended_record(initiator, stamp, offset) for offset, stamp in enumerate(stamps)]


def step_record(service: Service, stamp: Stamp, offset: int) -> ConsumerRecord[bytes, bytes]:
    """The saga's first event, as another service would have sent it."""
    envelope = Envelope(
        type=ITEM,
        data={"key": stamp.saga_id, "seq": 0, "note": ""},
        source="/choreosaga/beta",
        key=stamp.saga_id.encode(),
        correlation_id=stamp.correlation_id,
        stamp=stamp,
    )
    key, value, headers = service.envelopes.encode(envelope)
    return consumer_record(service.saga_topic("s"), offset, key, value, list(headers))


async def test_the_gauges_read_a_sqlite_service_while_another_connection_writes(
    tmp_path: Path,
) -> None:
    """On SQLite, refreshing the gauges only reads: it neither takes the write lock
    nor waits for it (it did, and failed with "database is locked" once the busy
    timeout ran out while the service's own transaction, or a relay's, held it)."""
    path = tmp_path / "alpha.db"
    engine = create_engine(f"sqlite+aiosqlite:///{path}", connect_args={"timeout": 0.5})
    service = offline_service("alpha", engine)
    telemetry = instrument(
        service, meter_provider=MeterProvider(metric_readers=[InMemoryMetricReader()])
    )
    await service.create_tables()
    writer = sqlite3.connect(path, isolation_level=None)
    try:
        writer.execute("BEGIN IMMEDIATE")
        writer.execute(
            "INSERT INTO outbox (message_id, topic, headers, shard, created_at_ms, attempts)"
            " VALUES ('m-1', 't', '[]', 0, 0, 0)"
        )
        # What is committed: an empty outbox, no saga in flight.
        assert await telemetry.metrics.refresh_backlog() == (0, 0.0)
        assert await telemetry.metrics.refresh_in_flight() == {}
        writer.execute("COMMIT")
        count, _age = await telemetry.metrics.refresh_backlog()
        assert count == 1
    finally:
        writer.close()
        await engine.dispose()

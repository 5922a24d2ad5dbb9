"""Helpers shared by integration tests: read topics back, build codecs."""

from __future__ import annotations

import ast
import asyncio
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from sqlalchemy.ext.asyncio import AsyncEngine

from outbox import KafkaSettings, OutboxTables
from outbox.tables import create_tables
from saga.codec import AvroCodec
from saga.observe.log import SagaLog
from saga.observe.message import stamp_to_json
from saga.schemas import SchemaRegistry
from saga.service import Service, ServiceSettings
from saga.stamp import SagaStatus, Stamp

SCHEMAS = Path(__file__).parent / "schemas"


def core_codec() -> AvroCodec:
    """Codec with the test events (``choreosaga.test.Item``) and the project's schemas."""
    registry = SchemaRegistry.from_directory(SCHEMAS / "core")
    project = SchemaRegistry.default()
    for name in project.names():
        # The parsed form: the canonical one drops defaults and logical types.
        registry.register(project.latest(name).parsed)
    return AvroCodec(registry)


def trip_codec(namespace: str) -> AvroCodec:
    """The project's schemas and two one-field events, ``TripRequested`` and ``SeatBooked``."""
    registry = SchemaRegistry.default()
    for name in ("TripRequested", "SeatBooked"):
        registry.register(
            {
                "type": "record",
                "name": name,
                "namespace": namespace,
                "fields": [{"name": "trip_id", "type": "string"}],
            }
        )
    return AvroCodec(registry)


def offline_service(name: str, engine: AsyncEngine, **settings: Any) -> Service:
    """A service whose records a test hands to ``service.processor`` itself: no broker is
    ever contacted. Fresh outbox tables, the test codec, 4 shards unless ``settings`` say."""
    return Service(
        name,
        engine=engine,
        kafka=KafkaSettings(bootstrap_servers="127.0.0.1:1"),
        codec=core_codec(),
        tables=OutboxTables(sa.MetaData()),
        settings=ServiceSettings(**{"shards": 4, **settings}),
    )


def consumer_record(
    topic: str,
    offset: int,
    key: bytes | None,
    value: bytes,
    headers: list[tuple[str, bytes]],
    *,
    partition: int = 0,
) -> ConsumerRecord[bytes, bytes]:
    """A record as the consumer would hand it to a service, built without a broker."""
    return ConsumerRecord(
        topic=topic,
        partition=partition,
        offset=offset,
        timestamp=0,
        timestamp_type=0,
        key=key,
        value=value,
        checksum=None,
        serialized_key_size=len(key or b""),
        serialized_value_size=len(value),
        headers=list(headers),
    )


def metric_points(reader: Any, name: str) -> list[Any]:
    """The data points of metric ``name`` an OpenTelemetry ``InMemoryMetricReader`` holds."""
    data = reader.get_metrics_data()
    assert data is not None
    return [
        point
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == name
        for point in metric.data.data_points
    ]


async def read_topic(
    settings: KafkaSettings, topic: str, count: int, *, timeout: float = 30.0
) -> list[ConsumerRecord[bytes, bytes]]:
    """Read a topic from the beginning until ``count`` records arrived.

    Keeps reading briefly after that, so that unexpected extra records
    (duplicates) are returned too. Fails if fewer than ``count`` arrive in time.
    """
    consumer = AIOKafkaConsumer(**settings.consumer_kwargs(None))
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(topic)
        deadline = time.monotonic() + timeout
        while not partitions:
            if time.monotonic() > deadline:
                raise AssertionError(f"topic {topic} has no partitions")
            await asyncio.sleep(0.05)
            await consumer._client.force_metadata_update()
            partitions = consumer.partitions_for_topic(topic)
        consumer.assign([TopicPartition(topic, p) for p in sorted(partitions)])
        await consumer.seek_to_beginning()
        records: list[ConsumerRecord[bytes, bytes]] = []
        quiet_until: float | None = None
        while True:
            now = time.monotonic()
            if quiet_until is not None and now > quiet_until:
                return records
            if now > deadline:
                raise AssertionError(
                    f"read {len(records)} of {count} records from {topic} in {timeout}s"
                )
            batch = await consumer.getmany(timeout_ms=100)
            for part in batch.values():
                records.extend(part)
            if quiet_until is None and len(records) >= count:
                quiet_until = time.monotonic() + 0.3
    finally:
        await consumer.stop()


def parse_python(path: Path) -> ast.Module:
    """``ast.parse`` of a source file, tried again on CPython 3.11's spurious SystemError.

    CPython 3.11 can leave the AST constructor's recursion count off
    (python/cpython#106905, fixed in later releases) and then fail a correct
    parse with "AST constructor recursion depth mismatch"; it was seen once in
    a full run of this suite. Parsing again is harmless.
    """
    text = path.read_text()
    for _ in range(4):
        try:
            return ast.parse(text)
        except SystemError as exc:
            if "recursion depth mismatch" not in str(exc):
                raise
    return ast.parse(text)


def sagas_keyed_by_id(metadata: sa.MetaData, name: str = "saga_log_sagas") -> sa.Table:
    """The saga log's sagas table as versions before a saga was (name, id) made it (34ca581)."""
    return sa.Table(
        name,
        metadata,
        sa.Column("saga_id", sa.String(200), primary_key=True),
        sa.Column("saga_name", sa.String(100), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("reason", sa.Text, nullable=True),
        sa.Column("correlation_id", sa.String(200), nullable=False),
        sa.Column("started_at_ms", sa.BigInteger, nullable=False),
        sa.Column("last_message_ms", sa.BigInteger, nullable=False),
        sa.Column("messages", sa.BigInteger, nullable=False),
        sa.Column("hop", sa.BigInteger, nullable=False),
        sa.Column("stamp", sa.Text, nullable=False),
        sa.Index(f"ix_{name}_status", "status", "last_message_ms"),
        sa.Index(f"ix_{name}_name", "saga_name", "status"),
    )


async def create_saga_log_keyed_by_id(engine: AsyncEngine) -> None:
    """A saga log as versions before a saga was (name, id) made it: its sagas table keyed
    by the saga id alone, holding one saga (``place_order`` ``order-1``, running)."""
    metadata = sa.MetaData()
    sagas = sagas_keyed_by_id(metadata)
    started = datetime(2026, 1, 1, tzinfo=UTC)
    stamp = Stamp(
        saga_name="place_order",
        saga_id="order-1",
        status=SagaStatus.RUNNING,
        correlation_id="corr-1",
        started_at=started,
    )
    started_ms = int(started.timestamp() * 1000)
    await create_tables(engine, [SagaLog(dialect=engine.dialect.name).messages])
    async with engine.begin() as conn:
        await conn.run_sync(metadata.create_all)
        await conn.execute(
            sagas.insert().values(
                saga_id="order-1",
                saga_name="place_order",
                status="RUNNING",
                correlation_id="corr-1",
                started_at_ms=started_ms,
                last_message_ms=started_ms,
                messages=1,
                hop=0,
                stamp=stamp_to_json(stamp),
            )
        )

"""Processing guarantees of a service, against a real database and broker.

Atomicity (a failed handler leaves nothing behind), effectively-once
processing (redelivered messages change nothing), and bad input that neither
blocks a partition nor disappears silently.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from support import core_codec, read_topic

from outbox import KafkaSettings, OutboxTables, RetryPolicy, create_engine, ensure_topics
from saga.context import MessageContext
from saga.dlq import read_dead_letters
from saga.envelope import Envelope, EnvelopeCodec
from saga.service import Service, ServiceSettings

ITEM = "choreosaga.test.Item"


class Transient(Exception):
    retriable = True


class Harness:
    """A service under test, its database and a producer for its input topic."""

    def __init__(self, url: str, kafka: KafkaSettings, topic_in: str, topic_out: str) -> None:
        self.url = url
        self.kafka = kafka
        self.topic_in = topic_in
        self.topic_out = topic_out
        self.engine = create_engine(url)
        self.codec = core_codec()
        self.envelopes = EnvelopeCodec(self.codec)
        self.metadata = sa.MetaData()
        self.seen = sa.Table(
            "seen",
            self.metadata,
            sa.Column("key", sa.String(50), primary_key=True),
            sa.Column("seq", sa.Integer, primary_key=True),
        )
        self.tables = OutboxTables(self.metadata)
        self.producer = AIOKafkaProducer(**kafka.producer_kwargs())
        self.services: list[Service] = []

    async def setup(self) -> None:
        async with self.engine.begin() as conn:
            await conn.run_sync(self.metadata.create_all)
        await self.producer.start()

    async def close(self) -> None:
        for service in self.services:
            await service.stop()
        await self.producer.stop()
        await self.engine.dispose()

    def service(
        self, handler: Callable[[MessageContext], Any], name: str = "svc", **settings: Any
    ) -> Service:
        service = Service(
            name,
            engine=self.engine,
            kafka=self.kafka,
            codec=self.codec,
            tables=self.tables,
            settings=ServiceSettings(
                shards=4, retry=RetryPolicy(initial_interval=timedelta(milliseconds=20)), **settings
            ),
        )
        service.add_handler(self.topic_in, ITEM, handler)
        self.services.append(service)
        return service

    def item(self, key: str, seq: int) -> Envelope:
        return Envelope(
            type=ITEM,
            data={"key": key, "seq": seq, "note": ""},
            source="/tests",
            key=key.encode(),
        )

    async def send(self, envelope: Envelope, *, partition: int | None = None) -> None:
        key, value, headers = self.envelopes.encode(envelope)
        await self.producer.send_and_wait(
            self.topic_in, value, key=key, headers=headers, partition=partition
        )

    async def send_raw(self, value: bytes, headers: list[tuple[str, bytes]]) -> None:
        await self.producer.send_and_wait(
            self.topic_in, value, key=b"k", headers=headers, partition=0
        )

    async def rows(self, table: sa.Table) -> list[Any]:
        async with self.engine.connect() as conn:
            return list((await conn.execute(sa.select(table))).all())


async def rewind_group(kafka: KafkaSettings, group: str, topic: str) -> None:
    """Seek ``group`` back to the start of ``topic`` (the group must be idle).

    Joins the group as a member and commits offset 0 for every partition:
    the test broker refuses commits from outside the group once it had
    members, as Apache Kafka does while a group is active.
    """
    rewind = AIOKafkaConsumer(**kafka.consumer_kwargs(group))
    await rewind.start()
    try:
        rewind.subscribe([topic])
        deadline = time.monotonic() + 20
        while not rewind.assignment():
            assert time.monotonic() < deadline, "never joined the group"
            await rewind.getmany(timeout_ms=100)
        await rewind.commit(dict.fromkeys(rewind.assignment(), 0))
    finally:
        await rewind.stop()


async def until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


@pytest.fixture
async def harness(
    database_url: str, kafka_settings: KafkaSettings, new_topic: Any
) -> AsyncIterator[Harness]:
    topic_in = await new_topic(partitions=2)
    topic_out = await new_topic(partitions=2)
    await ensure_topics(kafka_settings, {topic_in + ".dlq": 1})
    h = Harness(database_url, kafka_settings, topic_in, topic_out)
    await h.setup()
    yield h
    await h.close()


def bind_out(h: Harness) -> Callable[[MessageContext], Any]:
    async def handler(ctx: MessageContext) -> None:
        await ctx.session.execute(
            sa.insert(h.seen).values(key=ctx.data["key"], seq=ctx.data["seq"])
        )
        ctx.emit(ITEM, {**ctx.data, "note": "seen"}, topic=h.topic_out)

    return handler


async def test_failed_handler_leaves_neither_state_nor_outbox_rows(harness: Harness) -> None:
    h = harness
    good = bind_out(h)

    async def handler(ctx: MessageContext) -> None:
        await good(ctx)
        if ctx.data["seq"] == 1:
            raise ValueError("business rule broken after writing")

    service = h.service(handler)
    async with service:
        await h.send(h.item("a", 1), partition=0)
        await h.send(h.item("a", 2), partition=0)
        await until(lambda: service.stats.processed + service.stats.dead_lettered == 2)
        (published,) = await read_topic(h.kafka, h.topic_out, 1)

    assert service.stats.dead_lettered == 1
    assert [tuple(r) for r in await h.rows(h.seen)] == [("a", 2)]
    outbox_rows = await h.rows(h.tables.outbox)
    assert sorted(r.topic for r in outbox_rows) == sorted([h.topic_out, h.topic_in + ".dlq"])
    inbox_rows = await h.rows(h.tables.inbox)
    # The message that committed, and the dead letter's own entry (by position,
    # so that a replay of the failed message still runs).
    assert sorted(r.consumer for r in inbox_rows) == ["svc", "svc.dead-letters"]
    assert h.envelopes.decode(published.key, published.value, published.headers).data["seq"] == 2


async def test_transient_failure_is_retried_without_leftovers(harness: Harness) -> None:
    h = harness
    good = bind_out(h)
    attempts = 0

    async def handler(ctx: MessageContext) -> None:
        nonlocal attempts
        attempts += 1
        await good(ctx)
        if attempts < 3:
            raise Transient("connection reset")

    service = h.service(handler)
    async with service:
        await h.send(h.item("a", 1))
        await until(lambda: service.stats.processed == 1)

    assert attempts == 3
    assert [tuple(r) for r in await h.rows(h.seen)] == [("a", 1)]
    assert len(await h.rows(h.tables.outbox)) == 1
    records = await read_topic(h.kafka, h.topic_out, 1)
    assert len(records) == 1


async def committed_offset(kafka: KafkaSettings, group: str, tp: TopicPartition) -> int | None:
    """The offset ``group`` committed for ``tp``, as a monitoring tool reads it (no join)."""
    reader = AIOKafkaConsumer(**kafka.consumer_kwargs(group))
    await reader.start()
    try:
        return await reader.committed(tp)
    finally:
        await reader.stop()


async def test_a_running_service_commits_its_offsets_without_being_stopped(
    harness: Harness,
) -> None:
    """Offsets are committed an interval after processing (not per record), and not only at stop:
    a group's lag reaches zero while its service runs on."""
    h = harness
    service = h.service(bind_out(h))
    async with service:
        for seq in range(3):
            await h.send(h.item("k", seq), partition=0)
        await until(lambda: service.stats.processed == 3)
        tp = TopicPartition(h.topic_in, 0)
        deadline = time.monotonic() + 10
        while await committed_offset(h.kafka, "svc", tp) != 3:
            assert time.monotonic() < deadline, "the offset was never committed"
            await asyncio.sleep(0.1)
        assert service.stats.processed == 3  # still running, nothing redone


async def test_a_partition_that_never_drains_still_commits_its_offset(harness: Harness) -> None:
    """Under load a busy partition does not wait for the broker after every batch, but its
    committed offset still moves on while records keep waiting (a crash then redelivers only
    the last second or so of them)."""
    h = harness
    slow = bind_out(h)

    async def handler(ctx: MessageContext) -> None:
        await asyncio.sleep(0.05)
        await slow(ctx)

    records = 80  # about 4 s of work, two records a batch: the partition never drains
    for seq in range(records):
        await h.send(h.item("k", seq), partition=0)
    service = h.service(handler, batch_max_records=2)
    tp = TopicPartition(h.topic_in, 0)
    async with service:
        deadline = time.monotonic() + 30
        while not (await committed_offset(h.kafka, "svc", tp) or 0):
            assert time.monotonic() < deadline, "the offset was never committed"
            await asyncio.sleep(0.2)
        assert service.stats.processed < records  # committed while records were waiting
        await until(lambda: service.stats.processed == records, timeout=30)


async def test_redelivered_messages_change_state_once(harness: Harness) -> None:
    h = harness
    first = h.service(bind_out(h))
    async with first:
        for seq in range(3):
            await h.send(h.item("k", seq), partition=0)
        # The same message published twice (as after a relay crash between
        # publish and mark): same id, so the same message.
        duplicate = h.item("k", 99)
        await h.send(duplicate, partition=0)
        await h.send(duplicate, partition=0)
        await until(lambda: first.stats.processed + first.stats.duplicates == 5)
    assert first.stats.processed == 4
    assert first.stats.duplicates == 1

    # Seek the group back to the start: every record is delivered again.
    await rewind_group(h.kafka, "svc", h.topic_in)

    second = h.service(bind_out(h))
    async with second:
        await until(lambda: second.stats.duplicates == 5)
    assert second.stats.processed == 0
    assert sorted(tuple(r) for r in await h.rows(h.seen)) == [
        ("k", 0),
        ("k", 1),
        ("k", 2),
        ("k", 99),
    ]
    assert len(await h.rows(h.tables.outbox)) == 4


async def test_bad_records_are_dead_lettered_byte_for_byte_without_blocking(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    h = harness
    _, good_value, good_headers = h.envelopes.encode(h.item("g", 0))
    fingerprint_unknown = b"\xc3\x01" + b"\x13" * 8 + good_value[10:]
    bad_values = {
        "garbage": b"\x00garbage\xff",
        "truncated": good_value[:-3],
        "trailing": good_value + b"\x00",
        "unknown-fingerprint": fingerprint_unknown,
    }
    service = h.service(bind_out(h))
    caplog.set_level(logging.INFO)
    async with service:
        await h.send(h.item("g", 1), partition=0)
        for value in bad_values.values():
            await h.send_raw(value, good_headers)
        await h.send_raw(good_value, [])  # valid value, no CloudEvents headers
        await h.send(h.item("g", 2), partition=0)
        await until(lambda: service.stats.processed == 2)
        letters = await read_dead_letters(h.kafka, [h.topic_in + ".dlq"])
        deadline = time.monotonic() + 30
        while len(letters) < 5 and time.monotonic() < deadline:
            letters = await read_dead_letters(h.kafka, [h.topic_in + ".dlq"])

    assert service.stats.undecodable == 5
    assert service.stats.dead_lettered == 5
    assert sorted(tuple(r) for r in await h.rows(h.seen)) == [("g", 1), ("g", 2)]
    # Every bad record is kept byte for byte, with where it came from and why.
    assert sorted(d.value for d in letters) == sorted([*bad_values.values(), good_value])
    for letter in letters:
        assert letter.original_topic == h.topic_in
        assert letter.info["role"] == "decode"
        assert letter.error_type == "saga.errors.DecodeError"
        assert letter.key == b"k"
    # The logs say what happened, without the bytes.
    logged = caplog.text
    assert logged.count("dead-lettered") >= 5
    for value in bad_values.values():
        assert base64.b64encode(value).decode() not in logged


async def test_application_code_publishes_through_the_outbox_in_its_own_transaction(
    harness: Harness,
) -> None:
    h = harness
    service = h.service(bind_out(h))
    kept = service.new_envelope(ITEM, {"key": "app", "seq": 1, "note": ""}, key=b"app")
    dropped = service.new_envelope(ITEM, {"key": "app", "seq": 2, "note": ""}, key=b"app")
    async with service:
        async with h.engine.begin() as conn:
            await conn.execute(sa.insert(h.seen).values(key="app", seq=1))
            await service.publish(conn, kept, topic=h.topic_out)
        with pytest.raises(RuntimeError):
            async with h.engine.begin() as conn:
                await conn.execute(sa.insert(h.seen).values(key="app", seq=2))
                await service.publish(conn, dropped, topic=h.topic_out)
                raise RuntimeError("the request failed after writing")
        (record,) = await read_topic(h.kafka, h.topic_out, 1)

    received = h.envelopes.decode(record.key, record.value, record.headers)
    assert received.id == kept.id
    assert received.correlation_id == kept.id  # a new correlation starts here
    assert received.traceparent is not None
    assert [tuple(r) for r in await h.rows(h.seen)] == [("app", 1)]

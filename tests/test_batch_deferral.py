"""A batch's deferred inbox and outbox writes, attacked (``process_batch`` called directly).

A batch reads its records' inbox keys (from their headers) when its
transaction begins and writes their inbox and outbox rows just before it
commits. Each record must still end as if it had been alone: one record's
headers must not fail the others, and the outbox rows must follow the
records' order, whoever wrote them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

import pytest
import sqlalchemy as sa
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from test_batch_savepoints import ITEM, OUT, TOPIC, Direct

from outbox import RetryPolicy
from outbox.message import decode_headers
from saga.context import MessageContext
from saga.envelope import Envelope
from saga.telemetry import instrument


@pytest.fixture
async def direct(database_url: str) -> AsyncIterator[Direct]:
    d = Direct(database_url)
    await d.setup()
    yield d
    await d.engine.dispose()


@pytest.fixture
async def direct_pg(postgres_url: str) -> AsyncIterator[Direct]:
    d = Direct(postgres_url)
    await d.setup()
    yield d
    await d.engine.dispose()


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

"""The initiator counts the end of a saga it announced itself once, however often it comes back.

A service skips the saga messages it sent itself (``Participation.concerns``),
its ``SagaEnded`` included: skipped, it is not recorded in the inbox, so a
redelivery (a rebalance before the offset commit, the relay publishing
again after a crash) is skipped again. Counting the end in ``saga.duration``
each time it is skipped counted it once per delivery. ``process`` is driven
directly, on PostgreSQL, no broker needed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import sqlalchemy as sa
from aiokafka import ConsumerRecord
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from sqlalchemy.ext.asyncio import AsyncSession
from support import consumer_record, metric_points, offline_service

from outbox import create_engine
from outbox.message import decode_headers
from saga import SagaContext, SagaStatus
from saga.choreography import SAGA_ENDED
from saga.envelope import H
from saga.service import Service
from saga.telemetry import instrument

ITEM = "choreosaga.test.Item"


@pytest.fixture
async def initiator(postgres_url: str) -> AsyncIterator[Service]:
    engine = create_engine(postgres_url)
    service = offline_service("alpha", engine)

    @service.step("finish", saga="s", on=ITEM)
    async def finish(ctx: SagaContext) -> None:
        ctx.complete()

    @service.on_saga_end("s")
    async def end(ctx: SagaContext) -> None:
        pass

    yield service
    await engine.dispose()


async def outbox_records(service: Service, topic: str) -> list[ConsumerRecord[bytes, bytes]]:
    """The outbox rows of ``topic`` as the consumer would receive them."""
    outbox = service.tables.outbox
    async with service.engine.connect() as conn:
        found = (
            await conn.execute(
                sa.select(outbox.c.key, outbox.c.value, outbox.c.headers)
                .where(outbox.c.topic == topic)
                .order_by(outbox.c.id)
            )
        ).all()
    return [
        consumer_record(topic, offset, key, value, list(decode_headers(headers)))
        for offset, (key, value, headers) in enumerate(found)
    ]


def ended(records: list[ConsumerRecord[bytes, bytes]]) -> list[ConsumerRecord[bytes, bytes]]:
    return [r for r in records if (H.TYPE, SAGA_ENDED.encode()) in r.headers]


async def test_its_own_end_delivered_twice_is_counted_once(initiator: Service) -> None:
    reader = InMemoryMetricReader()
    instrument(initiator, meter_provider=MeterProvider(metric_readers=[reader]))
    await initiator.create_tables()
    async with AsyncSession(initiator.engine) as session, session.begin():
        await initiator.start_saga(
            session, "s", saga_id="s-1", event_type=ITEM, data={"key": "s-1", "seq": 0, "note": ""}
        )
    topic = initiator.saga_topic("s")
    (start,) = await outbox_records(initiator, topic)
    await initiator.processor.process(start)  # its own step: completes the saga
    (end,) = ended(await outbox_records(initiator, topic))

    await initiator.processor.process(end)
    await initiator.processor.process(end)  # delivered again

    view = await initiator.saga_state("s-1")
    assert view is not None
    assert view.status is SagaStatus.COMPLETED
    assert sum(p.count for p in metric_points(reader, "saga.duration")) == 1

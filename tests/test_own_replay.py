"""A dead letter of a service's own saga message, replayed, is handled, not skipped.

A service skips the saga messages it sent itself (``Participation.concerns``).
A dead letter is another matter: a message of its own that it dead-lettered
before it skipped them (an earlier version, or a source of its own then)
holds its saga suspended until the replay is handled. Skipping the replay
would leave the saga suspended, and its deadline held, for ever.
``process`` is driven directly, on both databases, no broker needed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
from sqlalchemy.ext.asyncio import AsyncSession
from support import consumer_record, offline_service

from outbox import create_engine
from saga import SagaContext
from saga.context import RecordInfo
from saga.deadletter import REPLAY_GROUP_HEADER, REPLAY_HEADER
from saga.envelope import Envelope
from saga.service import Service
from saga.stamp import Suspension

ITEM = "choreosaga.test.Item"


@pytest.fixture
async def initiator(database_url: str) -> AsyncIterator[Service]:
    engine = create_engine(database_url)
    service = offline_service("alpha", engine)

    @service.on_saga_end("s")
    async def end(ctx: SagaContext) -> None:
        pass

    yield service
    await engine.dispose()


async def test_a_replayed_dead_letter_of_its_own_message_resumes_the_saga(
    initiator: Service,
) -> None:
    await initiator.create_tables()
    async with AsyncSession(initiator.engine) as session, session.begin():
        stamp = await initiator.start_saga(
            session, "s", saga_id="s-1", event_type=ITEM, data={"key": "s-1", "seq": 0, "note": ""}
        )
    # The first event of the saga, as the initiator sent it.
    first = Envelope(
        type=ITEM,
        data={"key": "s-1", "seq": 0, "note": ""},
        source=initiator.source,
        key=b"s-1",
        correlation_id=stamp.correlation_id,
        stamp=stamp,
    )
    topic = initiator.saga_topic("s")
    # Dead-lettered back when the initiator still handled its own messages:
    # the saga is suspended at it.
    part = initiator._sagas["s"]
    async with AsyncSession(initiator.engine) as session, session.begin():
        ctx = initiator.processor._saga_context(
            session, part, first, RecordInfo(topic=topic, partition=0, offset=0)
        )
        suspension = Suspension(
            service="alpha",
            role="initiator",
            step=None,
            message_id=first.id,
            event_type=ITEM,
            error="KeyError: 'x'",
            attempts=5,
            dead_letter_topic=topic + ".dlq",
            at=datetime.now(UTC),
        )
        await initiator.choreography.suspend(ctx, suspension)
    view = await initiator.saga_state("s-1")
    assert view is not None
    assert view.suspension is not None

    key, value, headers = initiator.envelopes.encode(first)
    replayed = [
        *headers,
        (REPLAY_HEADER, b"ref"),
        (REPLAY_GROUP_HEADER, initiator.processor.group.encode()),
    ]
    await initiator.processor.process(consumer_record(topic, 7, key, value, replayed))

    view = await initiator.saga_state("s-1")
    assert view is not None
    assert view.suspension is None
    assert initiator.stats.processed == 1

"""A batch's deferred inbox and outbox writes, attacked (``process_batch`` called directly).

A batch reads its records' inbox keys (from their headers) when its
transaction begins and writes their inbox and outbox rows just before it
commits. Each record must still end as if it had been alone: one record's
headers must not fail the others, and the outbox rows must follow the
records' order, whoever wrote them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from test_batch_savepoints import TOPIC, Direct

from outbox import RetryPolicy


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

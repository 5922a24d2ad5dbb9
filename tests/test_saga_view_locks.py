"""A saga view is read under a lock held until the transaction ends, on real databases.

Two messages of one saga handled at once (two consumers of a partition during
a rebalance, or a batch and a dead letter) must not both start from the same
old view: the second waits for the first transaction and merges into what it
saved. That holds for the first messages of a saga too, when there is no row
to lock yet (on PostgreSQL an advisory lock stands in for it).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
from sqlalchemy import MetaData, text
from sqlalchemy.ext.asyncio import AsyncEngine

from outbox import create_engine
from outbox.tables import create_tables
from saga import AvroCodec, SagaStatus, SchemaRegistry
from saga.stamp import Stamp
from saga.state import SagaStates, SagaView


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[tuple[AsyncEngine, SagaStates]]:
    engine = create_engine(database_url)
    states = SagaStates(
        MetaData(), AvroCodec(SchemaRegistry.default()), dialect=engine.dialect.name
    )
    await create_tables(engine, [states.table])
    try:
        yield engine, states
    finally:
        await engine.dispose()


def stamp(version: int) -> Stamp:
    return Stamp(
        saga_name="book_trip",
        saga_id="trip-1",
        status=SagaStatus.RUNNING,
        correlation_id="c-1",
        started_at=datetime(2026, 1, 1, tzinfo=UTC),
        version=version,
    )


async def second_reader(
    engine: AsyncEngine, states: SagaStates, first_done: asyncio.Event
) -> tuple[bool, SagaView | None]:
    """Load the view in a transaction of its own; also tell whether the first had ended."""
    async with engine.begin() as conn:
        view = await states.load(conn, "book_trip", "trip-1")
        return first_done.is_set(), view


async def saves_while_another_reads(
    engine: AsyncEngine, states: SagaStates, expected: int | None, saves: int
) -> tuple[bool, SagaView | None]:
    """Load the view (expecting version ``expected``) and, while holding it, let a second
    transaction read it; then save version ``saves`` and commit. Returns what the second read
    and whether it read only after the first had committed."""
    first_done = asyncio.Event()
    async with engine.begin() as first:
        view = await states.load(first, "book_trip", "trip-1")
        assert (view and view.stamp.version) == expected
        second = asyncio.create_task(second_reader(engine, states, first_done))
        await asyncio.sleep(0.3)  # the second transaction reads meanwhile, and must wait
        await states.save(first, SagaView(stamp=stamp(version=saves)))
        first_done.set()
    return await second


async def test_a_second_first_message_waits_for_the_view_the_first_creates(
    store: tuple[AsyncEngine, SagaStates],
) -> None:
    engine, states = store
    waited, view = await saves_while_another_reads(engine, states, expected=None, saves=1)
    assert waited
    assert view is not None
    assert view.stamp.version == 1


async def test_an_existing_view_stays_locked_until_its_reader_commits(
    store: tuple[AsyncEngine, SagaStates],
) -> None:
    engine, states = store
    async with engine.begin() as conn:
        await states.save(conn, SagaView(stamp=stamp(version=1)))
    waited, view = await saves_while_another_reads(engine, states, expected=1, saves=2)
    assert waited
    assert view is not None
    assert view.stamp.version == 2


async def test_a_saga_started_while_a_first_message_reads_its_view_waits_for_that_message(
    store: tuple[AsyncEngine, SagaStates],
) -> None:
    engine, states = store
    first_done = asyncio.Event()

    async def start() -> tuple[bool, bool]:
        async with engine.begin() as conn:
            created = await states.create(conn, stamp(version=5))
            return first_done.is_set(), created

    async with engine.begin() as first:
        assert await states.load(first, "book_trip", "trip-1") is None
        starter = asyncio.create_task(start())
        await asyncio.sleep(0.3)  # the saga is started meanwhile, and must wait
        await states.save(first, SagaView(stamp=stamp(version=1)))
        first_done.set()
    waited, created = await starter
    assert waited
    # The starter learns that the saga exists, instead of seeing its view overwritten.
    assert not created
    assert await states.get(engine, "trip-1", "book_trip") == stamp(version=1)


async def test_a_first_message_read_while_its_saga_is_started_waits_for_the_started_view(
    store: tuple[AsyncEngine, SagaStates],
) -> None:
    engine, states = store
    first_done = asyncio.Event()
    async with engine.begin() as starter:
        assert await states.create(starter, stamp(version=5))
        reader = asyncio.create_task(second_reader(engine, states, first_done))
        await asyncio.sleep(0.3)  # the first message is read meanwhile, and must wait
        first_done.set()
    waited, view = await reader
    assert waited
    assert view is not None
    assert view.stamp.version == 5


async def hashtext_collision(engine: AsyncEngine) -> tuple[str, str]:
    """Two trip ids whose ``book_trip/<id>`` keys PostgreSQL's 32-bit ``hashtext`` maps to
    one value: among 500 000 keys some 29 pairs are expected (birthday bound)."""
    query = text(
        "SELECT min(i), max(i) FROM generate_series(1, 500000) AS i "
        "GROUP BY hashtext('book_trip/trip-' || i) HAVING count(*) > 1 LIMIT 1"
    )
    async with engine.connect() as conn:
        one, two = (await conn.execute(query)).one()
    return f"trip-{one}", f"trip-{two}"


async def test_two_new_sagas_whose_keys_collide_in_32_bits_do_not_wait_for_each_other(
    postgres_url: str,
) -> None:
    engine = create_engine(postgres_url)
    states = SagaStates(MetaData(), AvroCodec(SchemaRegistry.default()), dialect="postgresql")
    await create_tables(engine, [states.table])
    try:
        one, two = await hashtext_collision(engine)
        first_done = asyncio.Event()

        async def read_other() -> bool:
            async with engine.begin() as conn:
                assert await states.load(conn, "book_trip", two) is None
                return first_done.is_set()

        async with engine.begin() as first:
            assert await states.load(first, "book_trip", one) is None
            other = asyncio.create_task(read_other())
            # A reader of another saga has nothing to wait for: only a shared
            # lock (a 32-bit key) would hold it until the first commits.
            await asyncio.wait({other}, timeout=5)
            first_done.set()
        assert not await other
    finally:
        await engine.dispose()

"""Retention of saga views: terminal sagas are purged after the retention, others never.

The store's purge runs on real PostgreSQL and on SQLite; the service's purge
loop and its start-up warning run on the in-memory harness (SQLite).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import MetaData, func, select, update
from sqlalchemy.ext.asyncio import AsyncEngine
from support import trip_codec

from outbox import InboxSettings, RelaySettings, RetryPolicy, create_engine
from outbox.tables import create_tables
from saga import AvroCodec, SagaContext, SagaStatus, ServiceSettings
from saga.choreography import COMPENSATE, DEADLINE_REACHED
from saga.errors import ConfigurationError
from saga.stamp import Stamp, Suspension
from saga.state import SagaStates, SagaView
from saga.testing import SagaHarness

DAY_MS = 24 * 3600 * 1000


@pytest.fixture(scope="module")
def codec() -> AvroCodec:
    return trip_codec("example.retention")


@pytest.fixture
async def store(
    database_url: str, codec: AvroCodec
) -> AsyncIterator[tuple[AsyncEngine, SagaStates]]:
    engine = create_engine(database_url)
    states = SagaStates(MetaData(), codec, dialect=engine.dialect.name)
    await create_tables(engine, [states.table])
    try:
        yield engine, states
    finally:
        await engine.dispose()


def stamp(saga_id: str, status: SagaStatus, *, suspended: bool = False) -> Stamp:
    suspension = (
        Suspension(
            service="hotels",
            role="step",
            step="book_room",
            message_id="m-1",
            event_type="example.retention.SeatBooked",
            error="KeyError: 'room'",
            attempts=1,
            dead_letter_topic="saga.book_trip.dlq",
            at=datetime(2026, 1, 1, tzinfo=UTC),
        )
        if suspended
        else None
    )
    return Stamp(
        saga_name="book_trip",
        saga_id=saga_id,
        status=status,
        correlation_id=f"c-{saga_id}",
        started_at=datetime(2026, 1, 1, tzinfo=UTC),
        suspension=suspension,
    )


async def put(
    engine: AsyncEngine, states: SagaStates, views: dict[str, Stamp], *, age_days: float
) -> None:
    """Save ``views`` and date their last change ``age_days`` ago."""
    table = states.table
    async with engine.begin() as conn:
        for view in views.values():
            await states.save(conn, SagaView(stamp=view))
        await conn.execute(
            update(table)
            .where(table.c.saga_id.in_(list(views)))
            .values(updated_at_ms=table.c.updated_at_ms - int(age_days * DAY_MS))
        )


async def left(engine: AsyncEngine, states: SagaStates) -> set[str]:
    async with engine.connect() as conn:
        return set((await conn.execute(select(states.table.c.saga_id))).scalars())


async def test_only_terminal_views_older_than_the_retention_are_purged(
    store: tuple[AsyncEngine, SagaStates],
) -> None:
    engine, states = store
    old = {
        "done": stamp("done", SagaStatus.COMPLETED),
        "undone": stamp("undone", SagaStatus.COMPENSATED),
        "failed": stamp("failed", SagaStatus.FAILED),
        "running": stamp("running", SagaStatus.RUNNING),
        "compensating": stamp("compensating", SagaStatus.COMPENSATING),
        "suspended": stamp("suspended", SagaStatus.RUNNING, suspended=True),
    }
    await put(engine, states, old, age_days=31)
    young = {"recent": stamp("recent", SagaStatus.COMPLETED)}
    await put(engine, states, young, age_days=29)

    deleted = await states.purge(engine, timedelta(days=30), 100)

    assert deleted == 3
    assert await left(engine, states) == {"running", "compensating", "suspended", "recent"}
    # The survivors are intact, suspension included.
    kept = await states.get(engine, "suspended", "book_trip")
    assert kept is not None
    assert kept.suspended


async def test_a_backlog_is_purged_in_rounds_of_at_most_the_batch(
    store: tuple[AsyncEngine, SagaStates],
) -> None:
    engine, states = store
    statuses = [SagaStatus.COMPLETED, SagaStatus.COMPENSATED, SagaStatus.FAILED]
    backlog = {f"s{i}": stamp(f"s{i}", statuses[i % 3]) for i in range(25)}
    await put(engine, states, backlog, age_days=40)
    await put(engine, states, {"live": stamp("live", SagaStatus.RUNNING)}, age_days=40)

    rounds = []
    while not rounds or rounds[-1] == 10:
        rounds.append(await states.purge(engine, timedelta(days=30), 10))
        async with engine.connect() as conn:
            count = (await conn.execute(select(func.count()).select_from(states.table))).scalar()
        assert count == 26 - sum(rounds)

    assert rounds == [10, 10, 5]
    assert await left(engine, states) == {"live"}


async def test_a_view_changed_while_the_purge_waits_for_it_is_kept(
    postgres_url: str, codec: AvroCodec
) -> None:
    engine = create_engine(postgres_url)
    states = SagaStates(MetaData(), codec, dialect=engine.dialect.name)
    await create_tables(engine, [states.table])
    try:
        await put(engine, states, {"late": stamp("late", SagaStatus.COMPLETED)}, age_days=31)
        async with engine.begin() as handler:
            # A late message: its handler holds the view and changes it...
            view = await states.load(handler, "book_trip", "late")
            assert view is not None
            await states.save(
                handler, SagaView(stamp=view.stamp.with_status(SagaStatus.COMPENSATING, "late"))
            )
            purge = asyncio.create_task(states.purge(engine, timedelta(days=30), 100))
            await asyncio.sleep(0.5)  # ...while the purge, which chose the view, waits for it
            assert not purge.done()
        assert await purge == 0
        kept = await states.get(engine, "late", "book_trip")
        assert kept is not None
        assert kept.status is SagaStatus.COMPENSATING
    finally:
        await engine.dispose()


def trips(harness: SagaHarness, ends: list[SagaStatus] | None = None) -> None:
    trips_, flights, hotels = (harness.service(n) for n in ("trips", "flights", "hotels"))

    @flights.step("book_seat", saga="book_trip", on="example.retention.TripRequested")
    async def book_seat(ctx: SagaContext) -> None:
        ctx.emit("example.retention.SeatBooked", {"trip_id": ctx.saga_id})

    @hotels.step("book_room", saga="book_trip", on="example.retention.SeatBooked")
    async def book_room(ctx: SagaContext) -> None:
        ctx.complete()

    @trips_.on_saga_end("book_trip")
    async def ended(ctx: SagaContext) -> None:
        if ends is not None:
            ends.append(ctx.stamp.status)


async def book(harness: SagaHarness, trip: str) -> None:
    await harness.start_saga(
        "trips",
        "book_trip",
        saga_id=trip,
        event_type="example.retention.TripRequested",
        data={"trip_id": trip},
    )


async def suspended_at_hotels(harness: SagaHarness, saga_id: str) -> bool:
    view = (await harness.stamps(saga_id)).get("hotels")
    return view is not None and view.suspended


async def test_a_running_service_purges_ended_sagas_and_keeps_a_suspended_one(
    codec: AvroCodec,
) -> None:
    # run_until_ended reads every service's view once the saga has ended: the
    # first view to end must outlive that read (with 1 s, a loaded machine
    # could purge it first).
    retention = timedelta(seconds=2)
    settings = ServiceSettings(
        relay=RelaySettings(poll_interval=timedelta(milliseconds=20)),
        inbox=InboxSettings(retention=retention, purge_interval=timedelta(milliseconds=100)),
        saga_retention=retention,
        retry=RetryPolicy(maximum_attempts=1),
    )
    async with SagaHarness(codec, settings=settings) as harness:
        trips(harness)
        harness.fail_step("hotels", "book_trip", "book_room", KeyError("room"))
        await harness.start()
        await book(harness, "stuck")
        async with asyncio.timeout(10):
            while not await suspended_at_hotels(harness, "stuck"):
                await asyncio.sleep(0.05)
        await book(harness, "done")
        run = await harness.run_until_ended("done")
        assert run.status is SagaStatus.COMPLETED
        assert set(run.stamps) == {"trips", "flights", "hotels"}

        async with asyncio.timeout(10):
            while await harness.stamps("done"):
                await asyncio.sleep(0.1)
        # Its views are older than those of "done", purged by now; another retention
        # on, the suspended saga is still known everywhere it went.
        await asyncio.sleep(retention.total_seconds())
        stuck = await harness.stamps("stuck")
        assert set(stuck) == {"trips", "flights", "hotels"}
        assert stuck["hotels"].suspended


async def test_a_deadline_that_fires_after_its_saga_was_purged_changes_nothing(
    codec: AvroCodec,
) -> None:
    retention = timedelta(milliseconds=500)
    settings = ServiceSettings(
        relay=RelaySettings(poll_interval=timedelta(milliseconds=20)),
        inbox=InboxSettings(retention=retention, purge_interval=timedelta(milliseconds=100)),
        saga_retention=retention,
    )
    ends: list[SagaStatus] = []
    async with SagaHarness(codec, settings=settings) as harness:
        trips(harness, ends)
        await harness.start()
        await harness.start_saga(
            "trips",
            "book_trip",
            saga_id="early",
            event_type="example.retention.TripRequested",
            data={"trip_id": "early"},
            deadline=timedelta(seconds=2),
        )
        # Completed, as the initiator's end handler says; not through run_until_ended,
        # which must read a view of the saga, and those last only 0.5 s once it ended.
        async with asyncio.timeout(10):
            while not ends:
                await asyncio.sleep(0.05)
        assert ends == [SagaStatus.COMPLETED]
        async with asyncio.timeout(10):
            while await harness.stamps("early"):
                await asyncio.sleep(0.05)
        async with asyncio.timeout(10):
            while not harness.published(DEADLINE_REACHED):
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # time for the deadline to be handled everywhere
        assert await harness.stamps("early") == {}
        assert not harness.published(COMPENSATE)
        assert ends == [SagaStatus.COMPLETED]


async def test_a_saga_retention_shorter_than_the_inbox_is_raised_with_a_warning(
    codec: AvroCodec, caplog: pytest.LogCaptureFixture
) -> None:
    settings = ServiceSettings(
        inbox=InboxSettings(retention=timedelta(days=14)), saga_retention=timedelta(days=3)
    )
    assert settings.effective_saga_retention == timedelta(days=14)
    caplog.set_level(logging.WARNING, logger="saga")
    async with SagaHarness(codec, settings=settings) as harness:
        trips(harness)
        await harness.start()
    warnings = [r.getMessage() for r in caplog.records if "saga_retention" in r.getMessage()]
    assert len(warnings) == 3  # one per service with saga views
    assert "saga_retention (3 days, 0:00:00)" in warnings[0]
    assert "inbox's retention (14 days, 0:00:00)" in warnings[0]
    assert "kept 14 days, 0:00:00 instead" in warnings[0]


async def test_default_retentions_start_without_a_warning(
    codec: AvroCodec, caplog: pytest.LogCaptureFixture
) -> None:
    settings = ServiceSettings()
    assert settings.saga_retention == timedelta(days=30)
    assert settings.effective_saga_retention == timedelta(days=30)
    caplog.set_level(logging.WARNING, logger="saga")
    async with SagaHarness(codec, settings=settings) as harness:
        trips(harness)
        await harness.start()
    assert not [r for r in caplog.records if "saga_retention" in r.getMessage()]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"saga_retention": timedelta(0)}, "saga_retention must be a positive timedelta"),
        ({"saga_retention": timedelta(days=-1)}, "saga_retention must be a positive timedelta"),
        ({"saga_retention": 30}, "saga_retention must be a positive timedelta"),
        ({"saga_purge_batch_size": 0}, "saga_purge_batch_size must be a positive integer"),
    ],
)
def test_a_retention_that_is_not_positive_is_refused(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        ServiceSettings(**fields)


async def test_a_step_scheduling_past_the_saga_retention_is_a_bug_not_a_second_saga(
    codec: AvroCodec,
) -> None:
    # An event due after the views are purged would find no view and start
    # the saga over: the step that schedules it is stopped instead (dead
    # letter, saga suspended), so a person fixes the delay or the retention.
    settings = ServiceSettings(
        relay=RelaySettings(poll_interval=timedelta(milliseconds=20)),
        saga_retention=timedelta(days=30),
        retry=RetryPolicy(maximum_attempts=1),
    )
    booked: list[str] = []
    async with SagaHarness(codec, settings=settings) as harness:
        trips_, flights, hotels = (harness.service(n) for n in ("trips", "flights", "hotels"))

        @trips_.on_saga_end("book_trip")
        async def ended(ctx: SagaContext) -> None:
            pass

        @flights.step("book_seat", saga="book_trip", on="example.retention.TripRequested")
        async def book_seat(ctx: SagaContext) -> None:
            later = timedelta(days=1) if ctx.saga_id == "soon" else timedelta(days=31)
            ctx.schedule("example.retention.SeatBooked", {"trip_id": ctx.saga_id}, delay=later)
            ctx.emit("example.retention.SeatBooked", {"trip_id": ctx.saga_id})

        @hotels.step("book_room", saga="book_trip", on="example.retention.SeatBooked")
        async def book_room(ctx: SagaContext) -> None:
            booked.append(ctx.saga_id)
            ctx.complete()

        await harness.start()
        await book(harness, "soon")
        assert (await harness.run_until_ended("soon")).status is SagaStatus.COMPLETED
        await book(harness, "too-late")
        async with asyncio.timeout(10):
            while not (view := (await harness.stamps("too-late")).get("flights")) or not (
                view.suspended
            ):
                await asyncio.sleep(0.05)
        assert view.suspension is not None
        assert "saga_retention" in view.suspension.error
        assert booked == ["soon"]
        assert not harness.published(COMPENSATE)

"""saga.testing: the README's trips saga as a harness test, in memory and on real servers.

The same test body runs on the in-memory transport with SQLite (where it must
take well under a second) and on the session's Kafka broker with PostgreSQL.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from support import trip_codec

from outbox import KafkaSettings
from saga import (
    AvroCodec,
    BusinessFailure,
    SagaContext,
    SagaStatus,
    StepOutcome,
)
from saga.testing import SagaHarness
from tests.conftest import PostgresDatabases


@pytest.fixture(scope="module")
def codec() -> AvroCodec:
    return trip_codec("example.trips")


@pytest.fixture(params=["memory", "kafka"])
async def harness(
    request: pytest.FixtureRequest, codec: AvroCodec, postgres_databases: PostgresDatabases
) -> AsyncIterator[SagaHarness]:
    if request.param == "memory":
        made = SagaHarness(codec)
    else:
        kafka: KafkaSettings = request.getfixturevalue("kafka_settings")
        urls: dict[str, str] = {}

        def database(name: str) -> str:
            urls[name] = postgres_databases.new()
            return urls[name]

        made = SagaHarness(codec, kafka=kafka, database_url=database)
    async with made:
        book_trips(made)
        yield made


def book_trips(harness: SagaHarness) -> None:
    """The README's saga: flights books a seat, hotels a room (or has none)."""
    trips, flights, hotels = (harness.service(n) for n in ("trips", "flights", "hotels"))

    @flights.step("book_seat", saga="book_trip", on="example.trips.TripRequested")
    async def book_seat(ctx: SagaContext) -> None:
        ctx.record_result(seat="12A")
        ctx.emit("example.trips.SeatBooked", {"trip_id": ctx.saga_id})

    @flights.compensation("book_seat", saga="book_trip")
    async def cancel_seat(ctx: SagaContext) -> None:
        ctx.record_result(cancelled=ctx.stamp.step("book_seat").data["seat"])

    @hotels.step("book_room", saga="book_trip", on="example.trips.SeatBooked")
    async def book_room(ctx: SagaContext) -> None:
        if ctx.data["trip_id"].startswith("full-"):
            ctx.fail("no room left")
        else:
            ctx.record_result(room="301")
            ctx.complete()

    @trips.on_saga_end("book_trip")
    async def trip_ended(ctx: SagaContext) -> None:
        pass


async def book(harness: SagaHarness, trip: str) -> None:
    await harness.start_saga(
        "trips",
        "book_trip",
        saga_id=trip,
        event_type="example.trips.TripRequested",
        data={"trip_id": trip},
    )


def outcomes(stamp: Any) -> list[tuple[str, str, StepOutcome]]:
    return [(s.service, s.name, s.outcome) for s in stamp.steps]


async def test_a_trip_with_a_room_completes(harness: SagaHarness) -> None:
    await harness.start()
    await book(harness, "trip-1")
    run = await harness.run_until_ended("trip-1")

    assert run.status is SagaStatus.COMPLETED
    assert set(run.stamps) == {"trips", "flights", "hotels"}
    assert all(stamp.status is SagaStatus.COMPLETED for stamp in run.stamps.values())
    assert outcomes(run.stamps["trips"]) == [
        ("flights", "book_seat", StepOutcome.DONE),
        ("hotels", "book_room", StepOutcome.DONE),
    ]
    assert run.stamps["hotels"].step("book_room").data == {"room": "301"}
    assert [e.data for e in harness.published("example.trips.SeatBooked")] == [
        {"trip_id": "trip-1"}
    ]


async def test_a_trip_without_a_room_is_compensated(harness: SagaHarness) -> None:
    await harness.start()
    await book(harness, "full-1")
    run = await harness.run_until_ended("full-1")

    assert run.status is SagaStatus.COMPENSATED
    assert run.stamps["trips"].reason == "no room left"
    assert outcomes(run.stamps["trips"]) == [
        ("flights", "book_seat", StepOutcome.DONE),
        ("hotels", "book_room", StepOutcome.FAILED),
        ("flights", "book_seat", StepOutcome.COMPENSATED),
    ]
    assert run.stamps["flights"].status is SagaStatus.COMPENSATED


async def test_an_injected_failure_fails_the_step_and_compensates(harness: SagaHarness) -> None:
    harness.fail_step("hotels", "book_trip", "book_room", BusinessFailure("hotel system down"))
    await harness.start()
    await book(harness, "trip-2")
    run = await harness.run_until_ended("trip-2")

    assert run.status is SagaStatus.COMPENSATED
    assert outcomes(run.stamps["trips"])[-1] == ("flights", "book_seat", StepOutcome.COMPENSATED)
    # The next trip finds the hotel back: the failure was injected once.
    await book(harness, "trip-3")
    assert (await harness.run_until_ended("trip-3")).status is SagaStatus.COMPLETED


class Flaky(Exception):
    retriable = True


async def test_a_retriable_injected_failure_is_retried(harness: SagaHarness) -> None:
    harness.fail_step("hotels", "book_trip", "book_room", Flaky("connection reset"), times=2)
    await harness.start()
    await book(harness, "trip-4")

    assert (await harness.run_until_ended("trip-4")).status is SagaStatus.COMPLETED


async def test_harness_on_kafka_publishes_through_the_kafka_publishers_own_batch_path() -> None:
    """On Kafka the harness records what its KafkaPublisher acknowledged, and nothing else.

    It must publish through the publisher's own ``publish`` (per-partition
    lanes on Kafka), not record by record: without the idempotent producer
    (the embedded broker has none) a key's next record sent before the
    previous one was acknowledged could reach the topic although that one
    never did, and the saga's events would arrive out of order.
    """
    from outbox import MemoryPublisher, PublishError, StoredMessage
    from saga.testing import _Recording

    def message(n: int) -> StoredMessage:
        return StoredMessage(
            id=n,
            message_id=f"m{n}",
            topic="orders",
            key=b"saga-1",
            value=f"step {n}".encode(),
            headers=(),
            shard=0,
            attempts=0,
        )

    # An inner publisher that keeps a key in order without idempotence, and
    # whose broker fails the first record's acknowledgement.
    inner = MemoryPublisher(
        pipelines_keys=False,
        fail_ack=lambda m: PublishError("expired", retriable=True) if m.id == 1 else None,
    )
    log: list[Any] = []
    outcomes = await _Recording(inner, log).publish([message(1), message(2)])

    assert outcomes[0] is not None
    assert outcomes[1] is not None, "the second step went out although the first never did"
    assert [r.value for r in inner.records] == []
    assert log == []


async def test_the_in_memory_consumer_hands_over_batches_of_at_most_the_services_size() -> None:
    from outbox import StoredMessage
    from saga.testing import InMemoryBroker, InMemoryConsumer

    broker = InMemoryBroker()
    for n in range(7):
        await broker.send(
            StoredMessage(
                id=n,
                message_id=f"m{n}",
                topic="t",
                key=None,
                value=b"x",
                headers=(),
                shard=0,
                attempts=0,
            )
        )
    batches: list[list[int]] = []

    async def process(records: Any) -> None:
        batches.append([r.offset for r in records])

    consumer = InMemoryConsumer(broker, frozenset({"t"}), process, batch_max_records=3)
    await consumer.start()
    try:
        while not consumer.caught_up():
            await asyncio.sleep(0.01)
    finally:
        await consumer.stop()
    assert batches == [[0, 1, 2], [3, 4, 5], [6]]

"""A service skips the saga messages it sent itself, and only those.

``Participation.concerns`` recognises a service's own messages by their
CloudEvents source. A source set in ``ServiceSettings`` may be shared by
several services (CloudEvents asks only that source + id be unique, and a
harness or a deployment often gives every service the same settings): the
others' messages must then still reach the initiator, or its view never
moves and the saga's end is decided by its deadline instead of its steps.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from test_testing_harness import codec  # noqa: F401 (the fixture)

from outbox import RelaySettings
from saga import AvroCodec, SagaContext, SagaStatus, StepOutcome
from saga.choreography import DEADLINE_REACHED
from saga.service import ServiceSettings
from saga.testing import SagaHarness


async def test_services_sharing_a_source_still_hear_each_other(
    codec: AvroCodec,  # noqa: F811
) -> None:
    settings = ServiceSettings(
        relay=RelaySettings(poll_interval=timedelta(milliseconds=20)),
        source="https://trips.example.com",
    )
    ends: list[SagaStatus] = []
    async with SagaHarness(codec, settings=settings) as harness:
        trips, flights = harness.service("trips"), harness.service("flights")

        @flights.step("book_seat", saga="book_trip", on="example.trips.TripRequested")
        async def book_seat(ctx: SagaContext) -> None:
            ctx.record_result(seat="12A")
            ctx.complete()

        @trips.on_saga_end("book_trip")
        async def trip_ended(ctx: SagaContext) -> None:
            ends.append(ctx.stamp.status)

        await harness.start()
        await harness.start_saga(
            "trips",
            "book_trip",
            saga_id="trip-1",
            event_type="example.trips.TripRequested",
            data={"trip_id": "trip-1"},
            # Time enough for the step's answer to come back first, even on a loaded
            # machine (1 s left it about 0.9 s).
            deadline=timedelta(seconds=2),
        )
        await harness.run_until_ended("trip-1")
        # The deadline message, once sent and handled, must find the saga completed.
        async with asyncio.timeout(30):
            while not harness.published(DEADLINE_REACHED):
                await asyncio.sleep(0.05)
        await harness.run_until_ended("trip-1")

        view = (await harness.stamps("trip-1"))["trips"]
        assert view.status is SagaStatus.COMPLETED
        assert [(s.service, s.outcome) for s in view.steps] == [("flights", StepOutcome.DONE)]
        assert ends == [SagaStatus.COMPLETED]

"""Saga outcomes under adversarial message orders, delivered deterministically.

A one-partition "topic" in memory stands in for Kafka so that each test can
put messages in exactly the order that makes a race happen: every service
reads every record through its real processing path (decode, inbox, saga
view, handlers, retries), and what its transaction wrote to its outbox is
appended to the partition. Databases are real: SQLite files, and PostgreSQL
databases (each test runs on both). The same behaviours over the real broker
are in test_saga_reference.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession
from support import consumer_record

from outbox.message import decode_headers
from saga import (
    AvroCodec,
    ConfigurationError,
    KafkaSettings,
    RetryPolicy,
    SagaContext,
    SchemaRegistry,
    Service,
    ServiceSettings,
    create_engine,
)
from saga.deadletter import REPLAY_HEADER
from saga.envelope import H
from saga.observe import ObserverSettings, SagaObserver, trace_from_log

EVENTS = ("Start", "A", "B", "C", "D", "E")


def codec() -> AvroCodec:
    registry = SchemaRegistry.default()
    for name in EVENTS:
        registry.register(
            {
                "type": "record",
                "name": name,
                "namespace": "ex",
                "fields": [{"name": "id", "type": "string"}],
            }
        )
    return AvroCodec(registry)


class Partition:
    """One FIFO partition shared by every service of a test."""

    def __init__(self, services: list[Service]) -> None:
        self.services = services
        self.records: list[tuple[bytes | None, bytes, list[tuple[str, bytes]]]] = []
        self.delivered = 0

    async def collect(self, service: Service, *, scheduled: bool = False) -> list[Any]:
        """Move what ``service`` committed to its outbox onto the partition.

        Scheduled rows (deadlines) are held back unless ``scheduled``: the
        test decides where they land.
        """
        table = service.tables.outbox
        query = (
            sa.select(table)
            .where(table.c.published_at_ms.is_(None), table.c.topic == "saga.trip")
            .order_by(table.c.id)
        )
        if not scheduled:
            query = query.where(table.c.due_at_ms.is_(None))
        async with service.engine.begin() as conn:
            rows = (await conn.execute(query)).all()
            await conn.execute(
                sa.update(table)
                .where(table.c.id.in_([r.id for r in rows]))
                .values(published_at_ms=0)
            )
        for row in rows:
            self.records.append((row.key, row.value, list(decode_headers(row.headers))))
        return rows

    async def deliver_next(self) -> None:
        key, value, headers = self.records[self.delivered]
        offset = self.delivered
        self.delivered += 1
        for service in self.services:
            record = consumer_record("saga.trip", offset, key, value, headers)
            await service.processor.process(record)  # what the consumer calls
            await self.collect(service)

    async def drain(self) -> None:
        while self.delivered < len(self.records):
            await self.deliver_next()


@pytest.fixture(params=["sqlite", "postgresql"])
async def make(
    tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[Callable[[str], Service]]:
    shared = codec()
    kafka = KafkaSettings(bootstrap_servers="127.0.0.1:9")  # never contacted here
    made: list[Service] = []
    if request.param == "postgresql":
        databases = request.getfixturevalue("postgres_databases")

    def factory(name: str) -> Service:
        if request.param == "postgresql":
            url = databases.new()
        else:
            url = f"sqlite:///{tmp_path / name}.db"
        engine = create_engine(url)
        settings = ServiceSettings(
            retry=RetryPolicy(initial_interval=timedelta(milliseconds=10), maximum_attempts=2)
        )
        service = Service(name, engine=engine, kafka=kafka, codec=shared, settings=settings)
        made.append(service)
        return service

    yield factory
    for service in made:
        await service.engine.dispose()


async def start(service: Service, saga_id: str, deadline: timedelta | None = None) -> None:
    async with AsyncSession(service.engine) as session, session.begin():
        await service.start_saga(
            session,
            "trip",
            saga_id=saga_id,
            event_type="ex.Start",
            data={"id": saga_id},
            deadline=deadline,
        )


def ended_log(service: Service) -> list[str]:
    ended: list[str] = []

    @service.on_saga_end("trip")
    async def on_end(ctx: SagaContext) -> None:
        ended.append(ctx.stamp.status.value)

    return ended


async def steps(service: Service, saga_id: str) -> list[tuple[str, str]]:
    stamp = await service.saga_state(saga_id)
    assert stamp is not None
    return [(s.name, s.outcome.value) for s in stamp.steps]


async def test_completion_after_the_deadline_fired_is_undone(
    make: Callable[[str], Service],
) -> None:
    trips, flights, hotels = make("trips"), make("flights"), make("hotels")
    ended = ended_log(trips)
    undone: list[str] = []

    @flights.step("book_seat", saga="trip", on="ex.Start")
    async def seat(ctx: SagaContext) -> None:
        ctx.emit("ex.A", {"id": ctx.saga_id})

    @flights.compensation("book_seat", saga="trip")
    async def cancel_seat(ctx: SagaContext) -> None:
        undone.append("seat")

    @hotels.step("book_room", saga="trip", on="ex.A")
    async def room(ctx: SagaContext) -> None:
        ctx.complete()  # the last step completes the saga...

    @hotels.compensation("book_room", saga="trip")
    async def cancel_room(ctx: SagaContext) -> None:
        undone.append("room")

    every = [trips, flights, hotels]
    for service in every:
        await service.create_tables()
    partition = Partition(every)
    await start(trips, "t1", deadline=timedelta(hours=1))
    await partition.collect(trips)  # Start
    await partition.deliver_next()  # flights books the seat: A
    # ... but the deadline message lands before the room was booked.
    await partition.collect(trips, scheduled=True)  # DeadlineReached
    await partition.drain()

    assert ended == ["COMPENSATED"]  # never told "completed"
    assert sorted(undone) == ["room", "seat"]
    assert (await trips.saga_state("t1")).status.value == "COMPENSATED"


async def test_refund_that_fails_for_good_suspends_the_saga_at_the_refund(
    make: Callable[[str], Service],
) -> None:
    order, inventory, payment = make("order"), make("inventory"), make("payment")
    ended = ended_log(order)

    @inventory.step("reserve_stock", saga="trip", on="ex.Start")
    async def reserve(ctx: SagaContext) -> None:
        ctx.emit("ex.A", {"id": ctx.saga_id})

    @inventory.compensation("reserve_stock", saga="trip")
    async def release(ctx: SagaContext) -> None:
        pass

    @payment.step("charge_payment", saga="trip", on="ex.A")
    async def charge(ctx: SagaContext) -> None:
        ctx.emit("ex.B", {"id": ctx.saga_id})

    @payment.compensation("charge_payment", saga="trip")
    async def refund(ctx: SagaContext) -> None:
        raise RuntimeError("the card network refuses the refund")

    @order.step("complete_order", saga="trip", on="ex.B")
    async def complete(ctx: SagaContext) -> None:
        ctx.complete()

    every = [order, inventory, payment]
    for service in every:
        await service.create_tables()
    partition = Partition(every)
    await start(order, "o1", deadline=timedelta(hours=1))
    await partition.collect(order)
    await partition.deliver_next()  # Start -> A (stock reserved)
    # The deadline fires while payment charges the card: A, then the deadline.
    await partition.collect(order, scheduled=True)
    await partition.drain()

    # A refund that raises is a bug, not an outcome: the saga is neither
    # announced compensated nor failed; it waits, suspended at the refund,
    # until the fixed refund is replayed. (The stock was released first here:
    # the deadline compensated it before the late charge reported in.)
    assert ended == []
    held = await payment.saga_state("o1")
    assert held is not None
    assert held.suspension is not None
    assert (held.suspension.role, held.suspension.step) == ("compensation", "charge_payment")
    assert "card network refuses" in held.suspension.error
    assert payment.stats.dead_lettered >= 1
    assert ("charge_payment", "COMPENSATION_FAILED") not in await steps(order, "o1")
    assert ("charge_payment", "COMPENSATED") not in await steps(order, "o1")


async def test_a_branch_the_failing_service_never_saw_is_undone(
    make: Callable[[str], Service],
) -> None:
    order, inventory, payment, shipping = (
        make("order"),
        make("inventory"),
        make("payment"),
        make("shipping"),
    )
    ended = ended_log(order)
    undone: list[str] = []

    @inventory.step("reserve_stock", saga="trip", on="ex.Start")
    async def reserve(ctx: SagaContext) -> None:
        ctx.emit("ex.A", {"id": ctx.saga_id})

    @inventory.compensation("reserve_stock", saga="trip")
    async def release(ctx: SagaContext) -> None:
        undone.append("stock")

    @payment.step("hold_funds", saga="trip", on="ex.Start")  # a parallel branch
    async def hold(ctx: SagaContext) -> None:
        ctx.emit("ex.B", {"id": ctx.saga_id})

    @payment.compensation("hold_funds", saga="trip")
    async def unhold(ctx: SagaContext) -> None:
        undone.append("hold")

    @shipping.step("create_shipment", saga="trip", on="ex.A")
    async def ship(ctx: SagaContext) -> None:
        ctx.fail("no carrier")

    every = [order, inventory, payment, shipping]
    for service in every:
        await service.create_tables()
    partition = Partition(every)
    await start(order, "o1")
    await partition.collect(order)
    await partition.drain()

    assert sorted(undone) == ["hold", "stock"]
    assert ended == ["COMPENSATED"]
    assert (await order.saga_state("o1")).status.value == "COMPENSATED"


async def test_a_compensation_requested_twice_runs_once(
    make: Callable[[str], Service],
) -> None:
    order, inventory, shipping = make("order"), make("inventory"), make("shipping")
    ended = ended_log(order)
    undone: list[str] = []

    @inventory.step("reserve_stock", saga="trip", on="ex.Start")
    async def reserve(ctx: SagaContext) -> None:
        ctx.emit("ex.A", {"id": ctx.saga_id})

    @inventory.compensation("reserve_stock", saga="trip")
    async def release(ctx: SagaContext) -> None:
        undone.append("stock")

    @shipping.step("create_shipment", saga="trip", on="ex.A")
    async def ship(ctx: SagaContext) -> None:
        ctx.fail("no carrier")

    every = [order, inventory, shipping]
    for service in every:
        await service.create_tables()
    partition = Partition(every)
    await start(order, "o1")
    await partition.collect(order)
    await partition.drain()
    compensate = next(
        r for r in partition.records if dict(r[2])["ce_type"] == b"choreosaga.saga.Compensate"
    )
    # The same request again, and the same request under a new message id.
    partition.records.append(compensate)
    envelope = inventory.envelopes.decode(*compensate)
    key, value, headers = inventory.envelopes.encode(replace(envelope, id="another-id"))
    partition.records.append((key, value, headers))
    await partition.drain()

    assert undone == ["stock"]
    assert ended == ["COMPENSATED"]


async def test_starting_the_same_saga_twice_at_once_is_refused(postgres_url: str) -> None:
    service = Service(
        "order",
        engine=create_engine(postgres_url),
        kafka=KafkaSettings(bootstrap_servers="127.0.0.1:9"),
        codec=codec(),
    )
    ended_log(service)
    await service.create_tables()

    async def attempt() -> str:
        try:
            async with AsyncSession(service.engine) as session, session.begin():
                await service.start_saga(
                    session, "trip", saga_id="same", event_type="ex.Start", data={"id": "same"}
                )
                await asyncio.sleep(0.2)  # both transactions open at once
        except ConfigurationError as exc:
            return str(exc)
        return "started"

    results = await asyncio.gather(attempt(), attempt())
    await service.engine.dispose()
    assert sorted(results) == ["saga trip same was already started", "started"]


async def test_a_step_named_like_another_services_step_runs_and_each_is_undone_by_its_owner(
    make: Callable[[str], Service],
) -> None:
    """Inventory and billing both have a step ``validate``: a step is (service, name)."""
    trips, inventory, billing, shipping = (
        make("trips"),
        make("inventory"),
        make("billing"),
        make("shipping"),
    )
    ended = ended_log(trips)
    performed: list[str] = []
    undone: list[str] = []

    @inventory.step("validate", saga="trip", on="ex.Start")
    async def check_stock(ctx: SagaContext) -> None:
        performed.append("inventory")
        ctx.emit("ex.A", {"id": ctx.saga_id})

    @inventory.compensation("validate", saga="trip")
    async def undo_stock_check(ctx: SagaContext) -> None:
        undone.append("inventory")

    @billing.step("validate", saga="trip", on="ex.A")
    async def check_card(ctx: SagaContext) -> None:
        performed.append("billing")
        ctx.emit("ex.B", {"id": ctx.saga_id})

    @billing.compensation("validate", saga="trip")
    async def undo_card_check(ctx: SagaContext) -> None:
        undone.append("billing")

    @shipping.step("ship", saga="trip", on="ex.B")
    async def ship(ctx: SagaContext) -> None:
        ctx.fail("no courier")

    every = [trips, inventory, billing, shipping]
    for service in every:
        await service.create_tables()
    partition = Partition(every)
    await start(trips, "t1")
    await partition.collect(trips)
    await partition.drain()

    assert performed == ["inventory", "billing"]
    assert undone == ["billing", "inventory"]  # each by its owner, most recent first
    assert ended == ["COMPENSATED"]
    stamp = await trips.saga_state("t1")
    assert [(s.service, s.name, s.outcome.value) for s in stamp.steps] == [
        ("inventory", "validate", "DONE"),
        ("billing", "validate", "DONE"),
        ("shipping", "ship", "FAILED"),
        ("billing", "validate", "COMPENSATED"),
        ("inventory", "validate", "COMPENSATED"),
    ]


async def test_undoing_a_step_never_runs_another_services_undo_of_the_same_name(
    make: Callable[[str], Service],
) -> None:
    """Billing has a ``validate`` step too, but did not perform it in this saga."""
    trips, inventory, billing, shipping = (
        make("trips"),
        make("inventory"),
        make("billing"),
        make("shipping"),
    )
    ended = ended_log(trips)
    undone: list[str] = []

    @inventory.step("validate", saga="trip", on="ex.Start")
    async def check_stock(ctx: SagaContext) -> None:
        ctx.emit("ex.A", {"id": ctx.saga_id})

    @inventory.compensation("validate", saga="trip")
    async def undo_stock_check(ctx: SagaContext) -> None:
        undone.append("inventory")

    @billing.step("validate", saga="trip", on="ex.B")  # no ex.B in this saga
    async def check_card(ctx: SagaContext) -> None:
        ctx.emit("ex.B", {"id": ctx.saga_id})

    @billing.compensation("validate", saga="trip")
    async def undo_card_check(ctx: SagaContext) -> None:
        undone.append("billing")

    @shipping.step("ship", saga="trip", on="ex.A")
    async def ship(ctx: SagaContext) -> None:
        ctx.fail("no courier")

    every = [trips, inventory, billing, shipping]
    for service in every:
        await service.create_tables()
    partition = Partition(every)
    await start(trips, "t1")
    await partition.collect(trips)
    await partition.drain()

    assert undone == ["inventory"]
    assert ended == ["COMPENSATED"]
    stamp = await billing.saga_state("t1")
    assert not [s for s in stamp.steps if s.service == "billing"]


async def test_a_participant_whose_clock_is_past_the_deadline_still_performs_its_step(
    make: Callable[[str], Service],
) -> None:
    """The initiator's deadline message decides, not a participant's clock.

    The deadline has passed by the participants' clocks, but the initiator's
    deadline message is not due yet (its database clock is behind, or its
    relay lags): the steps run and the saga completes. The deadline message,
    arriving after that, changes nothing.
    """
    trips, flights, hotels = make("trips"), make("flights"), make("hotels")
    ended = ended_log(trips)

    @flights.step("book_seat", saga="trip", on="ex.Start")
    async def seat(ctx: SagaContext) -> None:
        ctx.emit("ex.A", {"id": ctx.saga_id})

    @hotels.step("book_room", saga="trip", on="ex.A")
    async def room(ctx: SagaContext) -> None:
        ctx.complete()

    every = [trips, flights, hotels]
    for service in every:
        await service.create_tables()
    partition = Partition(every)
    await start(trips, "t1", deadline=timedelta(milliseconds=50))
    await asyncio.sleep(0.1)  # past the deadline by every clock of this process
    await partition.collect(trips)  # Start, not the deadline message
    await partition.drain()

    assert ended == ["COMPLETED"]
    await partition.collect(trips, scheduled=True)  # DeadlineReached, late
    await partition.drain()

    assert ended == ["COMPLETED"]
    assert await steps(trips, "t1") == [("book_seat", "DONE"), ("book_room", "DONE")]


async def test_a_compensation_request_naming_no_service_goes_to_the_step_s_performer(
    make: Callable[[str], Service],
) -> None:
    """A ``Compensate`` from a sender before version 2 names the step only."""
    trips, inventory, billing, shipping = (
        make("trips"),
        make("inventory"),
        make("billing"),
        make("shipping"),
    )
    ended = ended_log(trips)
    undone: list[str] = []

    @inventory.step("validate", saga="trip", on="ex.Start")
    async def check_stock(ctx: SagaContext) -> None:
        ctx.emit("ex.A", {"id": ctx.saga_id})

    @inventory.compensation("validate", saga="trip")
    async def undo_stock_check(ctx: SagaContext) -> None:
        undone.append("inventory")

    @billing.step("validate", saga="trip", on="ex.B")  # no ex.B in this saga
    async def check_card(ctx: SagaContext) -> None:
        ctx.emit("ex.B", {"id": ctx.saga_id})

    @billing.compensation("validate", saga="trip")
    async def undo_card_check(ctx: SagaContext) -> None:
        undone.append("billing")

    @shipping.step("ship", saga="trip", on="ex.A")
    async def ship(ctx: SagaContext) -> None:
        ctx.fail("no courier")

    every = [trips, inventory, billing, shipping]
    for service in every:
        await service.create_tables()
    partition = Partition(every)
    await start(trips, "t1")
    await partition.collect(trips)

    def compensations() -> list[int]:
        return [
            i
            for i, r in enumerate(partition.records)
            if dict(r[2])["ce_type"] == b"choreosaga.saga.Compensate"
        ]

    while not compensations():
        await partition.deliver_next()
    (index,) = compensations()
    envelope = inventory.envelopes.decode(*partition.records[index])
    assert envelope.data["service"] == "inventory"
    unscoped = {"step": envelope.data["step"], "reason": envelope.data["reason"]}
    key, value, headers = inventory.envelopes.encode(replace(envelope, data=unscoped))
    partition.records[index] = (key, value, headers)
    await partition.drain()

    assert undone == ["inventory"]
    assert ended == ["COMPENSATED"]


async def test_parallel_branches_are_each_undone_most_recent_first_each_step_once(
    make: Callable[[str], Service],
) -> None:
    """The compensation order with parallel branches (see saga.choreography).

    Start forks: flights books a seat, then a taxi, then insurance refuses;
    hotels books a room, then a massage. Both branches are done when the
    refusal comes, in the order seat, room, taxi, massage. The failing
    branch is undone by its chain, taxi before seat; the other branch by the
    initiator, massage before room. There is no order between the branches.
    """
    trips, flights, taxis, insurer, hotels, spa = (
        make("trips"),
        make("flights"),
        make("taxis"),
        make("insurer"),
        make("hotels"),
        make("spa"),
    )
    ended = ended_log(trips)
    undone: list[str] = []

    def branch_step(service: Service, step: str, on: str, emits: str) -> None:
        @service.step(step, saga="trip", on=on)
        async def perform(ctx: SagaContext) -> None:
            ctx.emit(emits, {"id": ctx.saga_id})

        @service.compensation(step, saga="trip")
        async def undo(ctx: SagaContext) -> None:
            undone.append(step)

    branch_step(flights, "seat", "ex.Start", "ex.A")
    branch_step(taxis, "taxi", "ex.A", "ex.E")
    branch_step(hotels, "room", "ex.Start", "ex.C")
    branch_step(spa, "massage", "ex.C", "ex.D")

    @insurer.step("insurance", saga="trip", on="ex.E")
    async def insure(ctx: SagaContext) -> None:
        ctx.fail("no cover for this trip")

    every = [trips, flights, taxis, insurer, hotels, spa]
    for service in every:
        await service.create_tables()
    partition = Partition(every)
    await start(trips, "t1")
    await partition.collect(trips)
    await partition.drain()

    assert ended == ["COMPENSATED"]
    assert sorted(undone) == ["massage", "room", "seat", "taxi"]  # each exactly once
    assert undone.index("taxi") < undone.index("seat")
    assert undone.index("massage") < undone.index("room")
    assert undone[:2] == ["taxi", "seat"]  # the failing branch's chain goes first
    done = [(s.name, s.outcome.value) for s in (await trips.saga_state("t1")).steps][:4]
    assert done == [("seat", "DONE"), ("room", "DONE"), ("taxi", "DONE"), ("massage", "DONE")]


async def test_a_branch_still_running_when_the_deadline_fired_is_undone_step_by_step(
    make: Callable[[str], Service],
) -> None:
    """Late steps are undone as the initiator sees them, each exactly once.

    The deadline fires before any step reported in: nothing to undo, the saga
    is announced compensated. Then the room reports in (late: undone at once)
    while the spa, which had not heard of it yet, books a massage on it (late
    too: undone when it reports in). A step still running when compensation
    began can thus be undone after an earlier step of its own branch: the
    rule in saga.choreography's docstring.
    """
    trips, hotels, spa = make("trips"), make("hotels"), make("spa")
    ended = ended_log(trips)
    undone: list[str] = []

    @hotels.step("room", saga="trip", on="ex.Start")
    async def room(ctx: SagaContext) -> None:
        ctx.emit("ex.C", {"id": ctx.saga_id})

    @hotels.compensation("room", saga="trip")
    async def cancel_room(ctx: SagaContext) -> None:
        undone.append("room")

    @spa.step("massage", saga="trip", on="ex.C")
    async def massage(ctx: SagaContext) -> None:
        ctx.emit("ex.D", {"id": ctx.saga_id})  # nobody acts on D: only the deadline ends it

    @spa.compensation("massage", saga="trip")
    async def cancel_massage(ctx: SagaContext) -> None:
        undone.append("massage")

    every = [trips, hotels, spa]
    for service in every:
        await service.create_tables()
    partition = Partition(every)
    await start(trips, "t1", deadline=timedelta(hours=1))
    await partition.collect(trips)  # Start
    await partition.collect(trips, scheduled=True)  # DeadlineReached, right behind it
    await partition.drain()

    # The room was undone before the massage reported in: no order could wait
    # for a step nobody knew was running.
    assert undone == ["room", "massage"]
    assert ended == ["COMPENSATED"]
    assert sorted(await steps(trips, "t1")) == [
        ("massage", "COMPENSATED"),
        ("massage", "DONE"),
        ("room", "COMPENSATED"),
        ("room", "DONE"),
    ]


async def test_the_saga_log_shows_the_deadline_the_initiator_moved_when_the_saga_resumed(
    make: Callable[[str], Service], tmp_path: Path
) -> None:
    """The initiator's own step is a bug: the saga is suspended there, its deadline held.
    Fixed and replayed, the step runs, the saga resumes and the initiator moves the
    deadline by the time it was held. The saga log, fed every message of the saga, shows
    the deadline the initiator now holds, not the one the saga started with."""
    trips, flights, hotels = make("trips"), make("flights"), make("hotels")
    ended_log(trips)
    deployed = {"buggy": True}

    @flights.step("book_seat", saga="trip", on="ex.Start")
    async def seat(ctx: SagaContext) -> None:
        ctx.emit("ex.A", {"id": ctx.saga_id})

    @trips.step("pay", saga="trip", on="ex.A")
    async def pay(ctx: SagaContext) -> None:
        if deployed["buggy"]:
            raise RuntimeError("a bug in pay")
        ctx.emit("ex.B", {"id": ctx.saga_id})

    @hotels.step("book_room", saga="trip", on="ex.B")
    async def room(ctx: SagaContext) -> None:
        ctx.emit("ex.C", {"id": ctx.saga_id})  # nobody acts on C: the saga keeps running

    every = [trips, flights, hotels]
    for service in every:
        await service.create_tables()
    partition = Partition(every)
    await start(trips, "t1", deadline=timedelta(hours=1))
    started = await trips.saga_state("t1")
    assert started is not None
    await partition.collect(trips)  # Start
    await partition.drain()  # A: pay fails twice, is dead-lettered; SagaSuspended
    assert (await trips.saga_state("t1")).suspension is not None
    await asyncio.sleep(0.05)  # held a moment
    deployed["buggy"] = False
    key, value, headers = next(r for r in partition.records if (H.TYPE, b"ex.A") in r[2])
    partition.records.append((key, value, [*headers, (REPLAY_HEADER, b"saga.trip.dlq/0/0")]))
    await partition.drain()  # A again: B, SagaResumed; C
    resumed = await trips.saga_state("t1")
    assert resumed is not None
    assert resumed.suspension is None
    assert started.deadline is not None
    assert resumed.deadline is not None
    assert resumed.deadline > started.deadline  # moved by the time it was held

    engine = create_engine(f"sqlite:///{tmp_path / 'saga_log.db'}")
    observer = SagaObserver(
        engine=engine,
        kafka=KafkaSettings(),
        codec=codec(),
        settings=ObserverSettings(patterns=("saga.*",), group_id="observer"),
    )
    try:
        await observer.create_tables()
        await observer.process_batch(
            [consumer_record("saga.trip", n, *record) for n, record in enumerate(partition.records)]
        )
        (logged,) = await observer.log.summaries(engine)
        assert logged.stamp.deadline == resumed.deadline
        trace = await trace_from_log(engine, "t1")
        assert trace is not None
        assert trace.waiting is not None
        assert trace.waiting.deadline == resumed.deadline
    finally:
        await engine.dispose()


async def test_the_deadline_message_of_an_earlier_saga_of_the_same_id_does_not_move_the_deadline(
    make: Callable[[str], Service],
) -> None:
    """Trip t1 ran once with a 2-hour deadline, completed at once, and its views were
    purged (retention). A new trip t1, with a 10-minute deadline, is suspended by a bug,
    and is still suspended when the first trip's deadline message comes, 2 hours after
    that trip started. That message is not this saga's: the new trip keeps its own
    deadline, and once fixed and replayed it has 10 minutes plus the time it was held,
    not the first trip's 2 hours."""
    trips, flights = make("trips"), make("flights")
    ended_log(trips)
    deployed = {"buggy": False}

    @flights.step("book_seat", saga="trip", on="ex.Start")
    async def seat(ctx: SagaContext) -> None:
        if deployed["buggy"]:
            raise RuntimeError("a bug in book_seat")
        ctx.complete()

    every = [trips, flights]
    for service in every:
        await service.create_tables()
    partition = Partition(every)
    await start(trips, "t1", deadline=timedelta(hours=2))
    first = await trips.saga_state("t1")
    assert first is not None
    assert first.deadline is not None
    await partition.collect(trips)  # Start
    await partition.drain()  # book_seat completes the saga
    assert (await trips.saga_state("t1")).status.value == "COMPLETED"
    (_,) = await partition.collect(trips, scheduled=True)  # its DeadlineReached...
    first_deadline_message = partition.records.pop()  # ... is due in 2 hours
    await asyncio.sleep(0.01)
    for service in every:  # retention: ended sagas' views go
        await service.states.purge(service.engine, timedelta(0), 100)
    assert await trips.saga_state("t1") is None

    deployed["buggy"] = True
    await start(trips, "t1", deadline=timedelta(minutes=10))
    second = await trips.saga_state("t1")
    assert second is not None
    assert second.deadline is not None
    assert second.deadline < first.deadline
    await partition.collect(trips)  # Start
    await partition.drain()  # book_seat fails twice, is dead-lettered; SagaSuspended
    assert (await trips.saga_state("t1")).suspension is not None
    await partition.collect(trips, scheduled=True)  # the new trip's deadline: held
    await partition.drain()
    partition.records.append(first_deadline_message)  # 2 hours after the first trip began
    await partition.drain()
    held = await trips.saga_state("t1")
    assert held is not None
    assert held.status.value == "RUNNING"
    assert held.deadline == second.deadline

    deployed["buggy"] = False
    key, value, headers = [r for r in partition.records if (H.TYPE, b"ex.Start") in r[2]][-1]
    partition.records.append((key, value, [*headers, (REPLAY_HEADER, b"saga.trip.dlq/0/0")]))
    await partition.drain()
    resumed = await trips.saga_state("t1")
    assert resumed is not None
    assert resumed.deadline is not None
    assert resumed.suspension is None
    assert resumed.deadline < first.deadline  # 10 minutes and the time held, not 2 hours


# -- an abort racing other outcomes; deadline messages of an earlier saga of the same id --


def _abort_record(
    saga_id: str, known: Any, reason: str = "customer cancelled"
) -> tuple[bytes | None, bytes, list[tuple[str, bytes]]]:
    """The record ``saga abort`` publishes (see saga.observe.abort.request_abort), with the
    stamp the saga log knew."""
    from saga.choreography import ABORT_REQUESTED
    from saga.envelope import Envelope, EnvelopeCodec
    from saga.observe.abort import abort_message_id

    stamp = replace(known, hop=known.hop + 1)
    envelope = Envelope(
        type=ABORT_REQUESTED,
        data={"reason": reason, "requested_by": None},
        source="/choreosaga/saga-abort",
        key=saga_id.encode(),
        id=abort_message_id("trip", saga_id),
        correlation_id=stamp.correlation_id,
        stamp=stamp,
    )
    key, value, headers = EnvelopeCodec(codec()).encode(envelope)
    return key, value, list(headers)


async def _deliver_to(partition: Partition, index: int, services: list[Service]) -> None:
    """Deliver record ``index`` to ``services`` only (each service is its own consumer
    group: one may lag behind the others)."""
    key, value, headers = partition.records[index]
    for service in services:
        await service.processor.process(consumer_record("saga.trip", index, key, value, headers))
        await partition.collect(service)


async def _trace_of(tmp_path: Path, partition: Partition, saga_id: str) -> Any:
    engine = create_engine(f"sqlite:///{tmp_path / 'saga_log.db'}")
    observer = SagaObserver(
        engine=engine,
        kafka=KafkaSettings(),
        codec=codec(),
        settings=ObserverSettings(patterns=("saga.*",), group_id="observer"),
    )
    try:
        await observer.create_tables()
        await observer.process_batch(
            [consumer_record("saga.trip", n, *record) for n, record in enumerate(partition.records)]
        )
        return await trace_from_log(engine, saga_id)
    finally:
        await engine.dispose()


async def test_a_saga_aborted_while_its_last_step_completes_is_said_aborted(
    make: Callable[[str], Service], tmp_path: Path
) -> None:
    """`saga abort` turns trip t1 back while hotels, whose consumer lags, is about to
    complete it. The initiator takes the abort first (the saga was running): it asks for
    the seat to be undone; hotels completes the saga a moment later, and that late step is
    undone too. The saga ended COMPENSATED because of the abort, and its trace says so.
    (hotels' completion message is no message of the backward path, but its hop is lower
    than that of the initiator's Compensate.)"""
    trips, flights, hotels = make("trips"), make("flights"), make("hotels")
    ended_log(trips)

    @flights.step("book_seat", saga="trip", on="ex.Start")
    async def seat(ctx: SagaContext) -> None:
        ctx.emit("ex.A", {"id": ctx.saga_id})

    @flights.compensation("book_seat", saga="trip")
    async def cancel_seat(ctx: SagaContext) -> None:
        pass

    @hotels.step("book_room", saga="trip", on="ex.A")
    async def room(ctx: SagaContext) -> None:
        ctx.complete()

    @hotels.compensation("book_room", saga="trip")
    async def cancel_room(ctx: SagaContext) -> None:
        pass

    every = [trips, flights, hotels]
    for service in every:
        await service.create_tables()
    partition = Partition(every)
    await start(trips, "t1")
    await partition.collect(trips)  # Start
    await partition.deliver_next()  # flights books the seat: A
    await _deliver_to(partition, 1, [trips, flights])  # A; hotels lags
    known = await trips.saga_state("t1")  # what the saga log showed saga abort
    partition.records.append(_abort_record("t1", known))
    await _deliver_to(partition, 2, [trips, flights])  # the initiator turns the saga back
    await asyncio.sleep(0.01)
    await _deliver_to(partition, 1, [hotels])  # hotels catches up: A completes the saga
    await _deliver_to(partition, 2, [hotels])
    partition.delivered = 3
    await partition.drain()
    final = await trips.saga_state("t1")
    assert final is not None
    assert final.status.value == "COMPENSATED"
    assert final.reason == "customer cancelled"

    trace = await _trace_of(tmp_path, partition, "t1")
    assert trace is not None
    assert trace.explanation() == "COMPENSATED: aborted: customer cancelled"


async def test_a_step_failing_while_the_saga_is_aborted_is_not_given_the_abort_reason(
    make: Callable[[str], Service], tmp_path: Path
) -> None:
    """`saga abort` turns trip t1 back ("customer cancelled") while hotels, lagging, fails
    its step ("no room"). Whatever the trace says ended the saga, it must not say that
    step book_room failed because the customer cancelled."""
    trips, flights, hotels = make("trips"), make("flights"), make("hotels")
    ended_log(trips)

    @flights.step("book_seat", saga="trip", on="ex.Start")
    async def seat(ctx: SagaContext) -> None:
        ctx.emit("ex.A", {"id": ctx.saga_id})

    @flights.compensation("book_seat", saga="trip")
    async def cancel_seat(ctx: SagaContext) -> None:
        pass

    @hotels.step("book_room", saga="trip", on="ex.A")
    async def room(ctx: SagaContext) -> None:
        ctx.fail("no room")

    every = [trips, flights, hotels]
    for service in every:
        await service.create_tables()
    partition = Partition(every)
    await start(trips, "t1")
    await partition.collect(trips)  # Start
    await partition.deliver_next()  # A
    await _deliver_to(partition, 1, [trips, flights])  # hotels lags
    known = await trips.saga_state("t1")
    partition.records.append(_abort_record("t1", known))
    await _deliver_to(partition, 2, [trips, flights])
    await asyncio.sleep(0.01)
    await _deliver_to(partition, 1, [hotels])  # book_room fails: "no room"
    await _deliver_to(partition, 2, [hotels])
    partition.delivered = 3
    await partition.drain()
    assert (await trips.saga_state("t1")).status.value == "COMPENSATED"

    trace = await _trace_of(tmp_path, partition, "t1")
    assert trace is not None
    assert trace.explanation() in (
        "COMPENSATED: aborted: customer cancelled",
        "COMPENSATED: step book_room (hotels) failed: no room",
    )


async def test_an_earlier_saga_s_deadline_does_not_compensate_a_saga_without_one(
    make: Callable[[str], Service],
) -> None:
    """Trip t1 ran once with a 2-hour deadline, completed at once, and its views were
    purged. A new trip t1 has no deadline and is still running when the first trip's
    deadline message comes. That message is not this saga's: the new trip runs on."""
    trips, flights = make("trips"), make("flights")
    ended_log(trips)
    second_run = {"on": False}

    @flights.step("book_seat", saga="trip", on="ex.Start")
    async def seat(ctx: SagaContext) -> None:
        if second_run["on"]:
            ctx.emit("ex.A", {"id": ctx.saga_id})  # nobody acts on A: the trip runs on
        else:
            ctx.complete()

    every = [trips, flights]
    for service in every:
        await service.create_tables()
    partition = Partition(every)
    await start(trips, "t1", deadline=timedelta(hours=2))
    await partition.collect(trips)  # Start
    await partition.drain()  # book_seat completes the saga
    (_,) = await partition.collect(trips, scheduled=True)  # its DeadlineReached...
    first_deadline_message = partition.records.pop()  # ... is due in 2 hours
    await asyncio.sleep(0.01)
    for service in every:
        await service.states.purge(service.engine, timedelta(0), 100)
    assert await trips.saga_state("t1") is None

    second_run["on"] = True
    await start(trips, "t1")  # no deadline
    await partition.collect(trips)
    await partition.drain()
    assert (await trips.saga_state("t1")).status.value == "RUNNING"
    partition.records.append(first_deadline_message)  # 2 hours after the first trip began
    await partition.drain()
    second = await trips.saga_state("t1")
    assert second is not None
    assert second.status.value == "RUNNING"
    assert second.deadline is None


async def test_the_saga_log_keeps_a_new_saga_s_deadline_when_an_earlier_one_s_comes(
    make: Callable[[str], Service], tmp_path: Path
) -> None:
    """The scenario of the 6a824a3 test, seen by the saga log: trip t1 (2-hour deadline)
    completes and is forgotten by the log's retention; a new trip t1 (10 minutes) runs;
    the first trip's deadline message comes. The log's row for t1, and the trace read from
    it, show the new trip's deadline, as its initiator's view does."""
    trips, flights = make("trips"), make("flights")
    ended_log(trips)
    second_run = {"on": False}

    @flights.step("book_seat", saga="trip", on="ex.Start")
    async def seat(ctx: SagaContext) -> None:
        if second_run["on"]:
            ctx.emit("ex.A", {"id": ctx.saga_id})
        else:
            ctx.complete()

    every = [trips, flights]
    for service in every:
        await service.create_tables()
    partition = Partition(every)
    await start(trips, "t1", deadline=timedelta(hours=2))
    await partition.collect(trips)
    await partition.drain()
    (_,) = await partition.collect(trips, scheduled=True)
    first_deadline_message = partition.records.pop()

    engine = create_engine(f"sqlite:///{tmp_path / 'saga_log.db'}")
    observer = SagaObserver(
        engine=engine,
        kafka=KafkaSettings(),
        codec=codec(),
        settings=ObserverSettings(patterns=("saga.*",), group_id="observer"),
    )
    try:
        await observer.create_tables()
        await observer.process_batch(
            [consumer_record("saga.trip", n, *r) for n, r in enumerate(partition.records)]
        )
        await asyncio.sleep(0.01)
        assert await observer.log.purge(engine, timedelta(0)) == 1  # the log's retention
        for service in every:
            await service.states.purge(service.engine, timedelta(0), 100)
        seen = len(partition.records)

        second_run["on"] = True
        await start(trips, "t1", deadline=timedelta(minutes=10))
        second = await trips.saga_state("t1")
        assert second is not None
        await partition.collect(trips)
        await partition.drain()
        partition.records.append(first_deadline_message)
        await partition.drain()
        assert (await trips.saga_state("t1")).deadline == second.deadline
        await observer.process_batch(
            [
                consumer_record("saga.trip", seen + n, *r)
                for n, r in enumerate(partition.records[seen:])
            ]
        )
        (logged,) = await observer.log.summaries(engine)
        trace = await trace_from_log(engine, "t1")
        assert trace is not None
        assert trace.waiting is not None
        assert (logged.stamp.deadline, trace.waiting.deadline) == (
            second.deadline,
            second.deadline,
        )
    finally:
        await engine.dispose()

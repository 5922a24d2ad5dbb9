"""The reference saga end to end: real PostgreSQL databases and a real broker.

One shop (order, inventory, payment, shipping, each with its own database)
runs for the module; one order per outcome goes through it, and each test
checks one outcome in every service's database and in the final stamp.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import pytest_asyncio
from aiokafka import AIOKafkaProducer
from conftest import PostgresDatabases, settings_for_tests
from support import read_topic

from saga import (
    Envelope,
    KafkaSettings,
    RelaySettings,
    SagaStatus,
    ServiceSettings,
    Stamp,
    StepOutcome,
    StepRecord,
    ensure_topics,
)
from saga.envelope import EnvelopeCodec
from services import PAYMENT_CHARGED, SAGA
from services.scenarios import STOCK, OrderRequest, Scenario, order_for, scenario_of
from services.shop import SERVICES, Shop

pytestmark = pytest.mark.asyncio(loop_scope="module")

# Long enough for the other sagas under a loaded CI machine; the slow card
# answers after it.
DEADLINE = timedelta(seconds=6)
AUTHORIZATION_DELAY = timedelta(seconds=8)


@dataclass
class Run:
    """A running shop and the orders that went through it."""

    shop: Shop
    kafka: KafkaSettings
    topic: str
    orders: dict[str, tuple[OrderRequest, Scenario]]

    def order(self, scenario: Scenario) -> OrderRequest:
        return next(r for r, s in self.orders.values() if s is scenario)

    async def stamp(self, order_id: str, service: str = "order") -> Stamp:
        owner = {s.service.name: s for s in self.shop.all}[service]
        stamp = await owner.service.saga_state(order_id)
        assert stamp is not None
        return stamp

    async def rows(self, service: Any, table: Any, order_id: str) -> list[Any]:
        return [r for r in await service.rows(table) if r.order_id == order_id]


def make_shop(
    databases: PostgresDatabases,
    kafka: KafkaSettings,
    prefix: str,
    *,
    payments: int = 1,
    deadline: timedelta = DEADLINE,
    authorization_delay: timedelta = AUTHORIZATION_DELAY,
) -> Shop:
    settings = ServiceSettings(
        saga_topic_prefix=prefix,
        group_prefix=prefix,
        relay=RelaySettings(poll_interval=timedelta(milliseconds=200)),
    )
    return Shop(
        urls={name: databases.new() for name in SERVICES},
        kafka=kafka,
        settings=settings,
        deadline=deadline,
        authorization_delay=authorization_delay,
        payment_instances=payments,
    )


async def until(condition: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def run(kafka_bootstrap: str, postgres_databases: PostgresDatabases) -> AsyncIterator[Run]:
    kafka = settings_for_tests(kafka_bootstrap)
    prefix = f"t{uuid.uuid4().hex[:8]}."
    await ensure_topics(kafka, {prefix + SAGA: 4})
    shop = make_shop(postgres_databases, kafka, prefix)
    await shop.setup()
    await shop.start()
    orders = {}
    for number, scenario in enumerate(Scenario):
        request = order_for(scenario, number)
        orders[request.order_id] = (request, scenario)
    try:
        await asyncio.gather(*(shop.order.place(r) for r, _ in orders.values()))
        async with asyncio.timeout(60):
            await shop.wait_terminal(len(orders))
        # Let the slow card's late authorization arrive and be dealt with.
        await asyncio.sleep(max(0.0, (AUTHORIZATION_DELAY - DEADLINE).total_seconds() + 1.0))
        async with asyncio.timeout(30):
            await shop.wait_quiet()
        yield Run(shop=shop, kafka=kafka, topic=prefix + SAGA, orders=orders)
    finally:
        await shop.stop()


def steps(stamp: Stamp) -> list[tuple[str, str, StepOutcome]]:
    return [(s.name, s.service, s.outcome) for s in stamp.steps]


async def test_completed_order_is_reserved_charged_shipped_and_completed(run: Run) -> None:
    order = run.order(Scenario.COMPLETED)
    shop = run.shop
    stamp = await run.stamp(order.order_id)

    assert (await shop.statuses())[order.order_id] == ("completed", None)
    assert stamp.status is SagaStatus.COMPLETED
    assert steps(stamp) == [
        ("reserve_stock", "inventory", StepOutcome.DONE),
        ("charge_payment", "payment", StepOutcome.DONE),
        ("create_shipment", "shipping", StepOutcome.DONE),
        ("complete_order", "order", StepOutcome.DONE),
    ]
    (reservation,) = await run.rows(shop.inventory, shop.inventory.reservations, order.order_id)
    (payment,) = await run.rows(shop.payments[0], shop.payments[0].payments, order.order_id)
    (shipment,) = await run.rows(shop.shipping, shop.shipping.shipments, order.order_id)
    assert reservation.status == "held"
    assert payment.status == "charged"
    assert payment.amount_cents == order.amount_cents
    assert shipment.status == "booked"
    # The stamp carries each step's result: the ids in the services' own tables.
    assert stamp.step("reserve_stock").data == {"reservation_id": reservation.reservation_id}
    assert stamp.step("charge_payment").data == {"payment_id": payment.payment_id}
    assert stamp.step("create_shipment").data == {"shipment_id": shipment.shipment_id}
    times = [s.at for s in stamp.steps]
    assert times == sorted(times)


async def test_out_of_stock_rejects_the_order_with_nothing_to_compensate(run: Run) -> None:
    order = run.order(Scenario.OUT_OF_STOCK)
    shop = run.shop
    stamp = await run.stamp(order.order_id)

    assert (await shop.statuses())[order.order_id] == ("rejected", "out of stock: GHOST-1")
    assert stamp.status is SagaStatus.COMPENSATED
    assert steps(stamp) == [("reserve_stock", "inventory", StepOutcome.FAILED)]
    assert await run.rows(shop.inventory, shop.inventory.reservations, order.order_id) == []
    assert await run.rows(shop.payments[0], shop.payments[0].payments, order.order_id) == []
    assert await run.rows(shop.shipping, shop.shipping.shipments, order.order_id) == []


async def test_declined_payment_releases_the_stock(run: Run) -> None:
    order = run.order(Scenario.PAYMENT_DECLINED)
    shop = run.shop
    stamp = await run.stamp(order.order_id)

    assert (await shop.statuses())[order.order_id] == ("rejected", "payment declined")
    assert stamp.status is SagaStatus.COMPENSATED
    assert steps(stamp) == [
        ("reserve_stock", "inventory", StepOutcome.DONE),
        ("charge_payment", "payment", StepOutcome.FAILED),
        ("reserve_stock", "inventory", StepOutcome.COMPENSATED),
    ]
    (reservation,) = await run.rows(shop.inventory, shop.inventory.reservations, order.order_id)
    assert reservation.status == "released"
    assert await run.rows(shop.payments[0], shop.payments[0].payments, order.order_id) == []


async def test_impossible_shipment_refunds_then_releases_in_reverse_order(run: Run) -> None:
    order = run.order(Scenario.SHIPMENT_IMPOSSIBLE)
    shop = run.shop
    stamp = await run.stamp(order.order_id)

    status, reason = (await shop.statuses())[order.order_id]
    assert status == "rejected"
    assert reason is not None
    assert reason.startswith("shipment impossible")
    assert steps(stamp) == [
        ("reserve_stock", "inventory", StepOutcome.DONE),
        ("charge_payment", "payment", StepOutcome.DONE),
        ("create_shipment", "shipping", StepOutcome.FAILED),
        ("charge_payment", "payment", StepOutcome.COMPENSATED),
        ("reserve_stock", "inventory", StepOutcome.COMPENSATED),
    ]
    refund, release = stamp.steps[3].at, stamp.steps[4].at
    assert refund <= release
    (payment,) = await run.rows(shop.payments[0], shop.payments[0].payments, order.order_id)
    (reservation,) = await run.rows(shop.inventory, shop.inventory.reservations, order.order_id)
    assert payment.status == "refunded"
    assert reservation.status == "released"
    assert await run.rows(shop.shipping, shop.shipping.shipments, order.order_id) == []


async def test_deadline_undoes_what_was_done_and_the_late_answer_charges_nothing(
    run: Run,
) -> None:
    order = run.order(Scenario.DEADLINE_PASSED)
    shop = run.shop
    stamp = await run.stamp(order.order_id)

    assert (await shop.statuses())[order.order_id] == ("rejected", "deadline passed")
    assert stamp.status is SagaStatus.COMPENSATED
    assert steps(stamp) == [
        ("reserve_stock", "inventory", StepOutcome.DONE),
        ("reserve_stock", "inventory", StepOutcome.COMPENSATED),
    ]
    assert stamp.deadline is not None
    assert stamp.steps[-1].at >= stamp.deadline
    # The card network's answer arrived after the deadline (the fixture waited
    # for it): the payment service did not charge.
    payment_view = await run.stamp(order.order_id, "payment")
    assert payment_view.status is SagaStatus.COMPENSATED
    assert await run.rows(shop.payments[0], shop.payments[0].payments, order.order_id) == []
    (reservation,) = await run.rows(shop.inventory, shop.inventory.reservations, order.order_id)
    assert reservation.status == "released"


async def test_services_agree_with_each_other(run: Run) -> None:
    checks = await run.shop.check(run.orders)
    assert [c for c in checks if not c.ok] == []


async def test_compensation_delivered_twice_runs_once(run: Run) -> None:
    order = run.order(Scenario.SHIPMENT_IMPOSSIBLE)
    shop = run.shop
    payment = shop.payments[0]
    codec = EnvelopeCodec(shop.codec)
    records = await read_topic(run.kafka, run.topic, 1, timeout=30)
    (refund_request,) = [
        r
        for r in records
        if (e := codec.decode(r.key, r.value, r.headers)).type == "choreosaga.saga.Compensate"
        and e.stamp is not None
        and e.stamp.saga_id == order.order_id
        and e.data["step"] == "charge_payment"
    ]
    before = replace(payment.service.stats)
    producer = AIOKafkaProducer(**run.kafka.producer_kwargs())
    await producer.start()
    try:
        # The same record twice more (a redelivery), then the same request
        # under a new message id (a second sender asking for it).
        for _ in range(2):
            await producer.send_and_wait(
                run.topic,
                refund_request.value,
                key=refund_request.key,
                headers=list(refund_request.headers),
            )
        again = codec.decode(refund_request.key, refund_request.value, refund_request.headers)
        key, value, headers = codec.encode(replace(again, id=str(uuid.uuid4())))
        await producer.send_and_wait(run.topic, value, key=key, headers=headers)
    finally:
        await producer.stop()

    async def seen() -> bool:
        stats = payment.service.stats
        return stats.duplicates >= before.duplicates + 2 and stats.processed >= before.processed + 1

    await until(seen)
    await asyncio.sleep(0.5)
    (row,) = await run.rows(payment, payment.payments, order.order_id)
    assert row.status == "refunded"
    view = await run.stamp(order.order_id, "payment")
    assert [s.outcome for s in view.steps if s.name == "charge_payment"] == [
        StepOutcome.DONE,
        StepOutcome.COMPENSATED,
    ]
    stock = {r.sku: r.available for r in await shop.inventory.rows(shop.inventory.stock)}
    completed = run.order(Scenario.COMPLETED)
    expected = dict(STOCK)
    expected[completed.sku] -= completed.quantity
    assert stock == expected


async def test_late_payment_event_does_not_resurrect_the_saga(run: Run) -> None:
    order = run.order(Scenario.DEADLINE_PASSED)
    shop = run.shop
    codec = EnvelopeCodec(shop.codec)
    view = await run.stamp(order.order_id, "payment")
    # What a payment service would have sent had it charged just before the
    # deadline and published just after: its stamp still says RUNNING.
    late_stamp = replace(
        view,
        status=SagaStatus.RUNNING,
        reason=None,
        steps=(
            view.steps[0],
            StepRecord(
                name="charge_payment",
                service="payment",
                outcome=StepOutcome.DONE,
                at=datetime.now(UTC),
                data={"payment_id": "late-payment"},
            ),
        ),
    )
    late = Envelope(
        type=PAYMENT_CHARGED,
        data={
            "order_id": order.order_id,
            "payment_id": "late-payment",
            "amount_cents": order.amount_cents,
            "address": order.address,
        },
        source="/choreosaga/payment",
        key=order.order_id.encode(),
        stamp=late_stamp,
    )
    before = replace(shop.shipping.service.stats)
    producer = AIOKafkaProducer(**run.kafka.producer_kwargs())
    await producer.start()
    try:
        key, value, headers = codec.encode(late)
        await producer.send_and_wait(run.topic, value, key=key, headers=headers)
    finally:
        await producer.stop()

    async def compensated_late_step() -> bool:
        stamp = await run.stamp(order.order_id)
        return any(
            s.name == "charge_payment" and s.outcome is StepOutcome.COMPENSATED for s in stamp.steps
        )

    await until(compensated_late_step)
    assert shop.shipping.service.stats.processed >= before.processed
    assert await run.rows(shop.shipping, shop.shipping.shipments, order.order_id) == []
    assert (await shop.statuses())[order.order_id] == ("rejected", "deadline passed")
    stamp = await run.stamp(order.order_id)
    assert stamp.status is SagaStatus.COMPENSATED
    assert (await run.stamp(order.order_id, "shipping")).status is not SagaStatus.RUNNING


@pytest.mark.slow
async def test_100_concurrent_sagas_with_two_payment_instances(
    kafka_bootstrap: str, postgres_databases: PostgresDatabases
) -> None:
    kafka = settings_for_tests(kafka_bootstrap)
    prefix = f"t{uuid.uuid4().hex[:8]}."
    await ensure_topics(kafka, {prefix + SAGA: 8})
    # Every path but the deadline (tested above): a deadline the 100 sagas
    # are sure to meet, even on a loaded machine.
    shop = make_shop(postgres_databases, kafka, prefix, payments=2, deadline=timedelta(minutes=2))
    await shop.setup()
    await shop.start()
    try:
        orders = {}
        for number in range(100):
            scenario = scenario_of(number)
            if scenario is Scenario.DEADLINE_PASSED:
                scenario = Scenario.COMPLETED
            request = order_for(scenario, number)
            orders[request.order_id] = (request, scenario)
        await asyncio.gather(*(shop.order.place(r) for r, _ in orders.values()))
        async with asyncio.timeout(120):
            statuses = await shop.wait_terminal(len(orders))
        checks = await shop.check(orders)
        assert [c for c in checks if not c.ok] == []
        assert all(status in ("completed", "rejected") for status, _ in statuses.values())
        assert all(p.service.stats.processed > 0 for p in shop.payments), [
            p.service.stats for p in shop.payments
        ]
    finally:
        await shop.stop()

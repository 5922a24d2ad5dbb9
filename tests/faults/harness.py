"""One seeded fault-injection run of the reference saga, and its verdict.

:func:`run` starts the cluster (:mod:`.cluster`), reads every topic with an
independent consumer (:mod:`.wire`), places orders at a steady rate while the
injector (:mod:`.faults`) breaks things, lets the system heal, and checks
(:mod:`.checks`) from the databases and the wire:

* **L**, nothing lost: every saga terminal, no due outbox row unpublished,
  every published row on the wire;
* **D**, no duplicate effect: one reservation, charge and shipment per order
  at most, stock per SKU = initial - units of completed orders;
* **O**, order: per key, first deliveries in outbox id order; each service
  handled each saga's events in wire order;
* **T**, ended: every saga completed, compensated or failed within a bound
  after the faults stop; suspended sagas (dead letters) are listed.
"""

from __future__ import annotations

import asyncio
import logging
import random
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession

from outbox import OutboxError
from saga import KafkaSettings, ServiceSettings, ensure_topics
from services import ORDER_PLACED, SAGA
from services.scenarios import OrderRequest, Scenario, order_for, scenario_of
from services.shop import TERMINAL, Shop

from .checks import Report, collect
from .cluster import SESSION_TIMEOUT_MS, Cluster
from .faults import FaultLog, Injector
from .wire import WireReader

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True, kw_only=True)
class Options:
    """What one run does."""

    seed: int = 1
    orders: int = 200
    faults: int = 20
    rate: float = 10.0
    """Orders placed per second."""
    fault_interval: float | None = None
    """Seconds between faults; default: the placing time spread over the faults."""
    deadline: float = 30.0
    authorization_delay: float = 45.0
    broker_pause: tuple[float, float] = (3.0, 30.0)
    long_transaction: float = 20.0
    """Seconds the long transaction stays open (0: none)."""
    pg_restart: bool = False
    heal_bound: float = 120.0
    """Seconds after the last fault within which every saga must have ended."""
    relays: tuple[tuple[str, int], ...] = (
        ("order", 2),
        ("inventory", 1),
        ("payment", 1),
        ("shipping", 1),
    )
    instances: tuple[tuple[str, int], ...] = (
        ("order", 1),
        ("inventory", 1),
        ("payment", 2),
        ("shipping", 1),
    )
    workdir: Path | None = None


def _orders(count: int) -> dict[str, tuple[OrderRequest, Scenario]]:
    orders = {}
    for number in range(count):
        scenario = scenario_of(number)
        request = order_for(scenario, number)
        orders[request.order_id] = (request, scenario)
    return orders


async def _place(shop: Shop, request: OrderRequest) -> None:
    """Place an order, through outages of the database (idempotent by order id)."""
    for attempt in range(600):
        try:
            await shop.order.place(request)
            return
        except DBAPIError as exc:
            if "duplicate key" in str(exc.orig):
                return  # an earlier attempt committed; its answer was lost
            log.warning("placing %s failed (%s); retrying", request.order_id, exc.orig)
            await asyncio.sleep(min(0.1 * (attempt + 1), 1.0))
    raise RuntimeError(f"could not place {request.order_id}")


async def _place_held(shop: Shop, request: OrderRequest, hold: float) -> None:
    """Place an order in a transaction held open ``hold`` seconds before it commits."""
    order = shop.order
    async with AsyncSession(order.engine) as session, session.begin():
        await session.execute(
            sa.insert(order.orders).values(
                order_id=request.order_id,
                customer=request.customer,
                sku=request.sku,
                quantity=request.quantity,
                amount_cents=request.amount_cents,
                status="pending",
            )
        )
        await order.service.start_saga(
            session,
            SAGA,
            saga_id=request.order_id,
            event_type=ORDER_PLACED,
            data={
                "order_id": request.order_id,
                "customer": request.customer,
                "sku": request.sku,
                "quantity": request.quantity,
                "amount_cents": request.amount_cents,
                "card": request.card,
                "address": request.address,
            },
            deadline=order.deadline,
        )
        await session.execute(sa.text("SELECT txid_current()"))  # hold an xid: xmin horizon
        await asyncio.sleep(hold)


async def _patiently(poll: Callable[[], Awaitable[T]]) -> T:
    """``poll()``, retried through database outages (a terminated connection, a full server)."""
    for attempt in range(1, 600):
        try:
            return await poll()
        except (OutboxError, DBAPIError) as exc:
            log.warning("harness query failed (%s); retrying", exc)
            await asyncio.sleep(min(0.2 * attempt, 2.0))
    return await poll()


async def _terminal(shop: Shop) -> int:
    rows = await shop.statuses()
    return sum(1 for status, _ in rows.values() if status in TERMINAL)


async def _outbox_due(shop: Shop) -> int:
    return sum([(await s.service.outbox.stats()).pending for s in _distinct(shop)])


async def _outbox_waiting(shop: Shop) -> int:
    total = 0
    for s in _distinct(shop):
        stats = await s.service.outbox.stats()
        total += stats.pending + stats.scheduled
    return total


def _distinct(shop: Shop) -> list[object]:
    return [shop.order, shop.inventory, shop.payments[0], shop.shipping]


async def run(options: Options) -> Report:
    """One run: start, place and break, heal, check. Always cleans up."""
    rng = random.Random(options.seed)
    workdir = options.workdir or Path(tempfile.mkdtemp(prefix="choreosaga-faults-"))
    cluster = Cluster(
        workdir,
        deadline=options.deadline,
        authorization_delay=options.authorization_delay,
        relays=dict(options.relays),
        instances=dict(options.instances),
    )
    shop: Shop | None = None
    wire: WireReader | None = None
    try:
        await asyncio.to_thread(cluster.start)
        kafka = KafkaSettings(
            bootstrap_servers=cluster.bootstrap,
            enable_idempotence=False,
            session_timeout_ms=SESSION_TIMEOUT_MS,
            heartbeat_interval_ms=300,
            request_timeout_ms=10000,
        )
        topic = cluster.prefix + SAGA
        await ensure_topics(kafka, {topic: 4, topic + ".dlq": 4})
        urls = {s: cluster.databases.url(s, "fault-harness") for s in cluster.databases.names}
        shop = Shop(
            urls=urls,
            kafka=kafka,
            settings=ServiceSettings(saga_topic_prefix=cluster.prefix, run_relay=False),
            deadline=timedelta(seconds=options.deadline),
            # The server is shared: the harness keeps to a few connections.
            engine_options={"pool_size": 2, "max_overflow": 2, "pool_timeout": 120},
        )
        wire = WireReader(kafka, [topic, topic + ".dlq"])
        await wire.start()
        orders = _orders(options.orders)
        report = await _exercise(options, rng, cluster, shop, wire, orders)
        report.workdir = str(workdir)
        return report
    finally:
        if wire is not None:
            await wire.stop()
        if shop is not None:
            for engine in shop.engines.values():
                await engine.dispose()
        statuses = await asyncio.to_thread(cluster.stop)
        log.info("exit statuses: %s", statuses)
        await asyncio.to_thread(cluster.drop)


async def _exercise(
    options: Options,
    rng: random.Random,
    cluster: Cluster,
    shop: Shop,
    wire: WireReader,
    orders: dict[str, tuple[OrderRequest, Scenario]],
) -> Report:
    requests = [r for r, _ in orders.values()]
    held = requests[len(requests) // 3] if options.long_transaction > 0 else None

    async def place_long(hold: float) -> str:
        assert held is not None
        await _place_held(shop, held, hold)
        return held.order_id

    placing_time = options.orders / options.rate
    interval = options.fault_interval or max(placing_time / max(options.faults, 1), 1.0)
    injector = Injector(cluster, rng, broker_pause=options.broker_pause, place_long=place_long)
    started = time.monotonic()

    slots = asyncio.Semaphore(3)  # few connections, even while the database is slow

    async def place(request: OrderRequest) -> None:
        async with slots:
            await _place(shop, request)

    async def placer() -> None:
        tasks = []
        for number, request in enumerate(requests):
            await asyncio.sleep(max(0.0, started + number / options.rate - time.monotonic()))
            if request is held:
                continue  # the injector places it, in its long transaction
            tasks.append(asyncio.create_task(place(request)))
        await asyncio.gather(*tasks)

    faults_task = asyncio.create_task(
        injector.run(
            options.faults,
            interval,
            long_hold=options.long_transaction,
            pg_restart=options.pg_restart,
        )
    )
    try:
        await placer()
        placed = time.monotonic()
        fault_log: FaultLog = await faults_task
    finally:
        if not faults_task.done():  # interrupted: stop breaking things before cleaning up
            faults_task.cancel()
            await injector.cancel()
    faults_end = max(fault_log.ended, placed)

    # Heal: every saga terminal and every due outbox row published.
    healed_at: float | None = None
    bound = faults_end + options.heal_bound
    while time.monotonic() < bound:
        terminal = await _patiently(lambda: _terminal(shop))
        if terminal >= options.orders and not await _patiently(lambda: _outbox_due(shop)):
            healed_at = time.monotonic()
            break
        await asyncio.sleep(0.25)
    # Scheduled rows (deadlines, late authorizations) fall due later; let them go out.
    waiting_bound = time.monotonic() + options.deadline + options.authorization_delay + 30
    while await _patiently(lambda: _outbox_waiting(shop)) and time.monotonic() < waiting_bound:
        await asyncio.sleep(0.5)
    await asyncio.sleep(2.0)  # the last consumers commit
    await wire.settle(quiet=2.0)
    return await _patiently(
        lambda: collect(
            shop=shop,
            cluster=cluster,
            wire=wire.records,
            orders=orders,
            faults=fault_log,
            options_seed=options.seed,
            heal_seconds=None if healed_at is None else healed_at - faults_end,
            heal_bound=options.heal_bound,
        )
    )

"""The whole shop: four services, their databases, and cross-service checks."""

from __future__ import annotations

import asyncio
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from saga import (
    AvroCodec,
    KafkaSettings,
    SagaStatus,
    SchemaRegistry,
    ServiceSettings,
    Stamp,
    StepOutcome,
    create_engine,
)

from . import SAGA
from .inventory import InventoryService
from .order import OrderService
from .payment import PaymentService
from .scenarios import STOCK, OrderRequest, Scenario
from .shipping import ShippingService

SERVICES = ("order", "inventory", "payment", "shipping")
TERMINAL = ("completed", "rejected", "failed")
FORWARD = ("reserve_stock", "charge_payment", "create_shipment", "complete_order")


@dataclass(frozen=True, kw_only=True)
class Check:
    """One consistency check and its verdict."""

    name: str
    ok: bool
    detail: str


class Shop:
    """The reference services wired together.

    Args:
        urls: Database URL of each service (keys: order, inventory, payment, shipping).
        kafka: Kafka settings shared by all services.
        settings: Runtime settings of every service.
        deadline: Saga deadline set by the order service.
        authorization_delay: How late slow card authorizations answer.
        payment_instances: Instances of the payment service (one consumer group).
        engine_options: Extra keyword arguments of every engine (pool size, ...).
    """

    def __init__(
        self,
        *,
        urls: Mapping[str, str],
        kafka: KafkaSettings,
        settings: ServiceSettings | None = None,
        deadline: timedelta = timedelta(seconds=30),
        authorization_delay: timedelta = timedelta(seconds=45),
        payment_instances: int = 1,
        engine_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.codec = AvroCodec(SchemaRegistry.default())
        options = dict(engine_options or {})
        self.engines = {name: create_engine(urls[name], **options) for name in SERVICES}
        common: dict[str, Any] = {"kafka": kafka, "codec": self.codec, "settings": settings}
        self.order = OrderService(engine=self.engines["order"], deadline=deadline, **common)
        self.inventory = InventoryService(engine=self.engines["inventory"], **common)
        self.payments = [
            PaymentService(
                engine=self.engines["payment"], authorization_delay=authorization_delay, **common
            )
            for _ in range(payment_instances)
        ]
        self.shipping = ShippingService(engine=self.engines["shipping"], **common)
        self.kafka = kafka
        self.stock = dict(STOCK)

    @property
    def all(self) -> list[OrderService | InventoryService | PaymentService | ShippingService]:
        """Every service instance."""
        return [self.order, self.inventory, *self.payments, self.shipping]

    async def setup(self) -> None:
        """Create every table and stock the shelves."""
        for service in self.all:
            await service.create_tables()
        await self.inventory.stock_up(self.stock)

    async def start(self) -> None:
        """Start every service and wait until each has its partitions."""
        for service in self.all:
            await service.service.start()
        await asyncio.gather(*(s.service.wait_assigned() for s in self.all))

    async def stop(self) -> None:
        """Stop every service and close the databases."""
        for service in reversed(self.all):
            await service.service.stop()
        for engine in self.engines.values():
            await engine.dispose()

    async def statuses(self) -> dict[str, tuple[str, str | None]]:
        """Status and reason of every order."""
        rows = await self.order.rows(self.order.orders)
        return {r.order_id: (r.status, r.reason) for r in rows}

    async def wait_terminal(
        self, count: int, *, progress: bool = False
    ) -> dict[str, tuple[str, str | None]]:
        """Wait until ``count`` orders reached a terminal status, then until all is quiet.

        Bound it with ``asyncio.timeout``. With ``progress``, show the counts
        as they change: rewritten in place on a terminal, a line at most every
        two seconds otherwise (logs, CI).
        """
        terminal = sys.stdout.isatty()
        shown_at = 0.0
        last = ""
        while True:
            statuses = await self.statuses()
            done = sum(1 for status, _ in statuses.values() if status in TERMINAL)
            if progress:
                counts = Counter(status for status, _ in statuses.values())
                shown = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
                line = f"  waiting: {done}/{count} sagas ended ({shown})"
                now = time.monotonic()
                if terminal:
                    print(f"\r{line}   ", end="", flush=True)
                elif line != last and (now - shown_at >= 2 or done >= count):
                    print(line, flush=True)
                    shown_at, last = now, line
            if done >= count:
                break
            await asyncio.sleep(0.25)
        if progress and terminal:
            print()
        await self.wait_quiet()
        return await self.statuses()

    async def wait_quiet(self) -> None:
        """Wait until no service has due messages to publish or new ones to process."""
        previous: tuple[int, ...] | None = None
        while True:
            pending = [(await s.service.outbox.stats()).pending for s in self.all]
            processed = tuple(s.service.stats.processed for s in self.all)
            if not any(pending) and processed == previous:
                return
            previous = processed
            await asyncio.sleep(0.5)

    # -- consistency -------------------------------------------------------------------

    async def check(self, orders: Mapping[str, tuple[OrderRequest, Scenario]]) -> list[Check]:
        """Cross-service consistency of a finished run."""
        statuses = await self.statuses()
        reservations = await self.inventory.rows(self.inventory.reservations)
        stock = {r.sku: r.available for r in await self.inventory.rows(self.inventory.stock)}
        payments = await self.payments[0].rows(self.payments[0].payments)
        shipments = await self.shipping.rows(self.shipping.shipments)
        stamps = {
            s.saga_id: s for s in await self.order.service.states.all(self.engines["order"], SAGA)
        }
        completed = {o for o, (status, _) in statuses.items() if status == "completed"}

        checks = [
            _every_saga_terminal(orders, statuses, stamps),
            _outcomes_match_data(orders, statuses),
        ]
        sold: Counter[str] = Counter()
        for order_id in completed:
            request, _ = orders[order_id]
            sold[request.sku] += request.quantity
        wrong_stock = {
            sku: (stock.get(sku), initial - sold[sku])
            for sku, initial in self.stock.items()
            if stock.get(sku) != initial - sold[sku]
        }
        held_wrongly = [
            r.order_id for r in reservations if (r.status == "held") != (r.order_id in completed)
        ]
        checks.append(
            Check(
                name="stock back where it started for every order not completed",
                ok=not wrong_stock and not held_wrongly,
                detail=f"wrong stock (now, expected): {wrong_stock}; "
                f"reservations held wrongly: {held_wrongly[:5]}"
                if wrong_stock or held_wrongly
                else f"{len(self.stock)} products, {len(reservations)} reservations agree",
            )
        )
        shipped = {s.order_id for s in shipments if s.status == "booked"}
        unsettled = [
            p.order_id for p in payments if p.status == "charged" and p.order_id not in shipped
        ]
        checks.append(
            Check(
                name="no charge without either a shipment or a refund",
                ok=not unsettled,
                detail=f"charged, not shipped, not refunded: {unsettled[:5]}"
                if unsettled
                else f"{len(payments)} payments: "
                f"{sum(p.status == 'refunded' for p in payments)} refunded, the rest shipped",
            )
        )
        stray = sorted(shipped - completed)
        checks.append(
            Check(
                name="shipments only for completed orders",
                ok=not stray and shipped == completed,
                detail=f"stray shipments {stray[:5]}, completed without shipment "
                f"{sorted(completed - shipped)[:5]}"
                if stray or shipped != completed
                else f"{len(shipped)} booked shipments, one per completed order",
            )
        )
        checks.append(_stamps_tell_the_story(statuses, stamps))
        return checks


def _every_saga_terminal(
    orders: Mapping[str, tuple[OrderRequest, Scenario]],
    statuses: Mapping[str, tuple[str, str | None]],
    stamps: Mapping[str, Stamp],
) -> Check:
    stuck = [o for o in orders if statuses.get(o, ("missing", None))[0] not in TERMINAL]
    not_final = [o for o in orders if o not in stamps or not stamps[o].status.is_terminal]
    return Check(
        name="every saga ended (completed, compensated or failed)",
        ok=not stuck and not not_final,
        detail=f"orders not terminal: {stuck[:5]}, stamps not terminal: {not_final[:5]}"
        if stuck or not_final
        else f"{len(orders)} orders and their stamps are terminal",
    )


def _outcomes_match_data(
    orders: Mapping[str, tuple[OrderRequest, Scenario]],
    statuses: Mapping[str, tuple[str, str | None]],
) -> Check:
    wrong = []
    for order_id, (_, scenario) in orders.items():
        status, reason = statuses.get(order_id, ("missing", None))
        expected = scenario.expected_status
        if status != expected or (
            scenario is not Scenario.COMPLETED and scenario.value not in (reason or "")
        ):
            wrong.append(f"{order_id}: {status} ({reason}), expected {expected} ({scenario.value})")
    return Check(
        name="each order took the path its data leads to",
        ok=not wrong,
        detail="; ".join(wrong[:5]) if wrong else f"{len(orders)} orders as expected",
    )


def _stamps_tell_the_story(
    statuses: Mapping[str, tuple[str, str | None]], stamps: Mapping[str, Stamp]
) -> Check:
    problems = []
    for order_id, (status, _) in statuses.items():
        stamp = stamps.get(order_id)
        if stamp is None:
            problems.append(f"{order_id}: no stamp")
            continue
        done = [s for s in stamp.steps if s.outcome is StepOutcome.DONE]
        # In the order they ran: a view lists the undos of parallel chains in the
        # order it heard of them, which under load need not be the same.
        undone = sorted(
            (s for s in stamp.steps if s.outcome is StepOutcome.COMPENSATED), key=lambda s: s.at
        )
        if status == "completed":
            names = [s.name for s in done]
            if stamp.status is not SagaStatus.COMPLETED or names != list(FORWARD):
                problems.append(f"{order_id}: completed but stamp {stamp.status.value} {names}")
        elif status == "rejected":
            # Steps done before compensation began are undone in reverse order;
            # a step that reported in later is undone when the initiator sees it
            # (the rule in saga.choreography), possibly between them. Compensation
            # began at the failed step, or at the deadline.
            failed = [s for s in stamp.steps if s.outcome is StepOutcome.FAILED]
            if failed:
                began: datetime | None = failed[0].at
            elif stamp.reason == "deadline passed" and stamp.deadline is not None:
                began = stamp.deadline
            else:
                began = undone[0].at if undone else None
            early = [s.name for s in done if began is None or s.at <= began]
            late = [s.name for s in done if began is not None and s.at > began]
            names = [s.name for s in undone]
            # A step dated after compensation began may still have reached the
            # initiator before its chain started (a deadline message delivered
            # late): then the whole chain is simply in reverse order.
            in_reverse = names == [s.name for s in done][::-1]
            early_undone = [name for name in names if name in early]
            if (
                stamp.status is not SagaStatus.COMPENSATED
                or sorted(names) != sorted(early + late)
                or not (in_reverse or early_undone == early[::-1])
            ):
                problems.append(
                    f"{order_id}: compensated {names}, expected the reverse of {early}"
                    + (f" then {late}" if late else "")
                )
    return Check(
        name="stamps show every step, compensations in reverse order",
        ok=not problems,
        detail="; ".join(problems[:5]) if problems else f"{len(stamps)} stamps consistent",
    )


def describe(stamp: Stamp) -> Sequence[str]:
    """A saga's timeline, one line per event, times relative to its start."""
    lines = [f"  {'+0':>7} ms  {'order':<10} saga {stamp.saga_name} started"]
    for step in stamp.steps:
        at = (step.at - stamp.started_at).total_seconds() * 1000
        data = " ".join(f"{k}={v}" for k, v in sorted(step.data.items()))
        lines.append(
            f"  {'+' + format(at, '.0f'):>7} ms  {step.service:<10} {step.name:<16} "
            f"{step.outcome.value:<12} {data}".rstrip()
        )
    lines.append(f"  {'':>7}     saga {stamp.status.value}: {stamp.reason or 'all steps done'}")
    return lines

"""Order service: takes orders, starts the saga, owns its deadline, completes it."""

from __future__ import annotations

from datetime import timedelta

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from saga import (
    AvroCodec,
    KafkaSettings,
    SagaContext,
    SagaStatus,
    ServiceSettings,
    Trace,
    trace_from_service,
)

from . import ORDER_PLACED, SAGA, SHIPMENT_CREATED
from .base import ShopService
from .scenarios import OrderRequest


class OrderService(ShopService):
    """Initiator of ``place_order``.

    Args:
        deadline: How long an order may take before it is called off.
    """

    def __init__(
        self,
        *,
        engine: AsyncEngine,
        kafka: KafkaSettings,
        codec: AvroCodec,
        settings: ServiceSettings | None = None,
        deadline: timedelta = timedelta(seconds=30),
    ) -> None:
        super().__init__("order", engine=engine, kafka=kafka, codec=codec, settings=settings)
        self.deadline = deadline
        self.codec = codec
        self.orders = sa.Table(
            "orders",
            self.metadata,
            sa.Column("order_id", sa.String(64), primary_key=True),
            sa.Column("customer", sa.String(64), nullable=False),
            sa.Column("sku", sa.String(64), nullable=False),
            sa.Column("quantity", sa.Integer, nullable=False),
            sa.Column("amount_cents", sa.BigInteger, nullable=False),
            sa.Column("status", sa.String(20), nullable=False),
            sa.Column("reason", sa.Text, nullable=True),
        )
        self.service.step("complete_order", saga=SAGA, on=SHIPMENT_CREATED)(self.complete_order)
        self.service.on_saga_end(SAGA)(self.saga_ended)

    async def place(self, order: OrderRequest) -> None:
        """Record an order and start its saga, in one transaction."""
        async with AsyncSession(self.engine) as session, session.begin():
            await session.execute(
                sa.insert(self.orders).values(
                    order_id=order.order_id,
                    customer=order.customer,
                    sku=order.sku,
                    quantity=order.quantity,
                    amount_cents=order.amount_cents,
                    status="pending",
                )
            )
            await self.service.start_saga(
                session,
                SAGA,
                saga_id=order.order_id,
                event_type=ORDER_PLACED,
                data={
                    "order_id": order.order_id,
                    "customer": order.customer,
                    "sku": order.sku,
                    "quantity": order.quantity,
                    "amount_cents": order.amount_cents,
                    "card": order.card,
                    "address": order.address,
                },
                deadline=self.deadline,
            )

    async def trace(self, order_id: str) -> Trace | None:
        """Where is this order? Its saga's steps as this service knows them."""
        return await trace_from_service(
            self.engine, self.codec, order_id, table=self.service.states.table.name
        )

    async def order_status(self, order_id: str) -> dict[str, object] | None:
        """What a "where is my order?" endpoint answers: status, why, and the timeline."""
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(sa.select(self.orders).where(self.orders.c.order_id == order_id))
            ).first()
        if row is None:
            return None
        trace = await self.trace(order_id)
        return {
            "order_id": order_id,
            "status": row.status,
            "reason": row.reason,
            "saga": None if trace is None else trace.explanation(),
            "timeline": [] if trace is None else [e.to_dict() for e in trace.entries],
        }

    async def complete_order(self, ctx: SagaContext) -> None:
        """Step ``complete_order``: the shipment exists, the order is done."""
        await self._set_status(ctx, "completed", None)
        ctx.complete()

    async def saga_ended(self, ctx: SagaContext) -> None:
        """Record how the saga ended on the order."""
        status = {
            SagaStatus.COMPLETED: "completed",
            SagaStatus.COMPENSATED: "rejected",
            SagaStatus.FAILED: "failed",
        }[ctx.stamp.status]
        await self._set_status(ctx, status, ctx.stamp.reason)

    async def _set_status(self, ctx: SagaContext, status: str, reason: str | None) -> None:
        await ctx.session.execute(
            sa.update(self.orders)
            .where(self.orders.c.order_id == ctx.saga_id)
            .values(status=status, reason=reason)
        )

"""Inventory service: reserves stock for an order, releases it on compensation."""

from __future__ import annotations

import uuid
from collections.abc import Mapping

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from saga import AvroCodec, KafkaSettings, SagaContext, ServiceSettings

from . import ORDER_PLACED, SAGA, STOCK_RESERVED
from .base import ShopService


class InventoryService(ShopService):
    """Performs ``reserve_stock``."""

    def __init__(
        self,
        *,
        engine: AsyncEngine,
        kafka: KafkaSettings,
        codec: AvroCodec,
        settings: ServiceSettings | None = None,
    ) -> None:
        super().__init__("inventory", engine=engine, kafka=kafka, codec=codec, settings=settings)
        self.stock = sa.Table(
            "stock",
            self.metadata,
            sa.Column("sku", sa.String(64), primary_key=True),
            sa.Column("available", sa.Integer, nullable=False),
        )
        self.reservations = sa.Table(
            "reservations",
            self.metadata,
            sa.Column("reservation_id", sa.String(64), primary_key=True),
            sa.Column("order_id", sa.String(64), nullable=False, unique=True),
            sa.Column("sku", sa.String(64), nullable=False),
            sa.Column("quantity", sa.Integer, nullable=False),
            sa.Column("status", sa.String(20), nullable=False),
        )
        self.service.step("reserve_stock", saga=SAGA, on=ORDER_PLACED)(self.reserve_stock)
        self.service.compensation("reserve_stock", saga=SAGA)(self.release_stock)

    async def stock_up(self, levels: Mapping[str, int]) -> None:
        """Set the available quantity of products."""
        async with self.engine.begin() as conn:
            await conn.execute(sa.delete(self.stock))
            await conn.execute(
                sa.insert(self.stock), [{"sku": k, "available": v} for k, v in levels.items()]
            )

    async def reserve_stock(self, ctx: SagaContext) -> None:
        """Step ``reserve_stock``: take the ordered quantity out of the available stock."""
        order = ctx.data
        taken = await ctx.session.execute(
            sa.update(self.stock)
            .where(self.stock.c.sku == order["sku"], self.stock.c.available >= order["quantity"])
            .values(available=self.stock.c.available - order["quantity"])
        )
        if taken.rowcount != 1:  # type: ignore[attr-defined]
            ctx.fail(f"out of stock: {order['sku']}")
            return
        reservation_id = str(uuid.uuid4())
        await ctx.session.execute(
            sa.insert(self.reservations).values(
                reservation_id=reservation_id,
                order_id=order["order_id"],
                sku=order["sku"],
                quantity=order["quantity"],
                status="held",
            )
        )
        ctx.record_result(reservation_id=reservation_id)
        ctx.emit(
            STOCK_RESERVED,
            {
                "order_id": order["order_id"],
                "reservation_id": reservation_id,
                "amount_cents": order["amount_cents"],
                "card": order["card"],
                "address": order["address"],
            },
        )

    async def release_stock(self, ctx: SagaContext) -> None:
        """Compensation of ``reserve_stock``: put the reserved quantity back."""
        step = ctx.stamp.step("reserve_stock")
        assert step is not None
        reservation_id = step.data["reservation_id"]
        released = await ctx.session.execute(
            sa.update(self.reservations)
            .where(
                self.reservations.c.reservation_id == reservation_id,
                self.reservations.c.status == "held",
            )
            .values(status="released")
            .returning(self.reservations.c.sku, self.reservations.c.quantity)
        )
        row = released.first()
        if row is None:
            return  # already released: compensation is idempotent
        await ctx.session.execute(
            sa.update(self.stock)
            .where(self.stock.c.sku == row.sku)
            .values(available=self.stock.c.available + row.quantity)
        )

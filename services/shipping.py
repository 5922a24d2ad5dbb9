"""Shipping service: books the delivery of a paid order."""

from __future__ import annotations

import uuid

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from saga import AvroCodec, KafkaSettings, SagaContext, ServiceSettings

from . import PAYMENT_CHARGED, SAGA, SHIPMENT_CREATED
from .base import ShopService

UNSERVED = ("atlantis",)
"""Places no carrier delivers to."""


class ShippingService(ShopService):
    """Performs ``create_shipment``; cancels the booking if the order is called off."""

    def __init__(
        self,
        *,
        engine: AsyncEngine,
        kafka: KafkaSettings,
        codec: AvroCodec,
        settings: ServiceSettings | None = None,
    ) -> None:
        super().__init__("shipping", engine=engine, kafka=kafka, codec=codec, settings=settings)
        self.shipments = sa.Table(
            "shipments",
            self.metadata,
            sa.Column("shipment_id", sa.String(64), primary_key=True),
            sa.Column("order_id", sa.String(64), nullable=False, unique=True),
            sa.Column("address", sa.Text, nullable=False),
            sa.Column("status", sa.String(20), nullable=False),
        )
        self.service.step("create_shipment", saga=SAGA, on=PAYMENT_CHARGED)(self.create_shipment)
        self.service.compensation("create_shipment", saga=SAGA)(self.cancel_shipment)

    async def create_shipment(self, ctx: SagaContext) -> None:
        """Step ``create_shipment``: book a carrier, or fail if none serves the address."""
        order = ctx.data
        address = order["address"]
        if any(place in address.lower() for place in UNSERVED):
            ctx.fail(f"shipment impossible: no carrier delivers to {address}")
            return
        shipment_id = str(uuid.uuid4())
        await ctx.session.execute(
            sa.insert(self.shipments).values(
                shipment_id=shipment_id,
                order_id=order["order_id"],
                address=address,
                status="booked",
            )
        )
        ctx.record_result(shipment_id=shipment_id)
        ctx.emit(SHIPMENT_CREATED, {"order_id": order["order_id"], "shipment_id": shipment_id})

    async def cancel_shipment(self, ctx: SagaContext) -> None:
        """Compensation of ``create_shipment``: cancel the booking (the order was called off)."""
        step = ctx.stamp.step("create_shipment")
        assert step is not None
        await ctx.session.execute(
            sa.update(self.shipments)
            .where(self.shipments.c.shipment_id == step.data["shipment_id"])
            .values(status="cancelled")
        )

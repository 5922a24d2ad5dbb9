"""Payment service: charges the card for an order, refunds it on compensation."""

from __future__ import annotations

import uuid
from datetime import timedelta

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from saga import AvroCodec, KafkaSettings, SagaContext, ServiceSettings

from . import PAYMENT_AUTHORIZED, PAYMENT_CHARGED, SAGA, STOCK_RESERVED
from .base import ShopService
from .scenarios import DECLINED_CARD, SLOW_CARD


class PaymentService(ShopService):
    """Performs ``charge_payment``.

    Args:
        authorization_delay: How long the card network takes to answer for
            cards that need a slow authorization.
    """

    def __init__(
        self,
        *,
        engine: AsyncEngine,
        kafka: KafkaSettings,
        codec: AvroCodec,
        settings: ServiceSettings | None = None,
        authorization_delay: timedelta = timedelta(seconds=45),
    ) -> None:
        super().__init__("payment", engine=engine, kafka=kafka, codec=codec, settings=settings)
        self.authorization_delay = authorization_delay
        self.payments = sa.Table(
            "payments",
            self.metadata,
            sa.Column("payment_id", sa.String(64), primary_key=True),
            sa.Column("order_id", sa.String(64), nullable=False, unique=True),
            sa.Column("amount_cents", sa.BigInteger, nullable=False),
            sa.Column("status", sa.String(20), nullable=False),
        )
        self.service.step("charge_payment", saga=SAGA, on=[STOCK_RESERVED, PAYMENT_AUTHORIZED])(
            self.charge_payment
        )
        self.service.compensation("charge_payment", saga=SAGA)(self.refund_payment)

    async def charge_payment(self, ctx: SagaContext) -> None:
        """Step ``charge_payment``: charge the card, or wait for a slow authorization."""
        order = ctx.data
        if order["card"] == DECLINED_CARD:
            ctx.fail("payment declined")
            return
        if order["card"] == SLOW_CARD and ctx.envelope.type == STOCK_RESERVED:
            # The network answers later; the answer comes back as an event.
            ctx.schedule(
                PAYMENT_AUTHORIZED,
                {k: order[k] for k in ("order_id", "amount_cents", "card", "address")},
                delay=self.authorization_delay,
            )
            return
        payment_id = str(uuid.uuid4())
        await ctx.session.execute(
            sa.insert(self.payments).values(
                payment_id=payment_id,
                order_id=order["order_id"],
                amount_cents=order["amount_cents"],
                status="charged",
            )
        )
        ctx.record_result(payment_id=payment_id)
        ctx.emit(
            PAYMENT_CHARGED,
            {
                "order_id": order["order_id"],
                "payment_id": payment_id,
                "amount_cents": order["amount_cents"],
                "address": order["address"],
            },
        )

    async def refund_payment(self, ctx: SagaContext) -> None:
        """Compensation of ``charge_payment``: refund the charge."""
        step = ctx.stamp.step("charge_payment")
        assert step is not None
        await ctx.session.execute(
            sa.update(self.payments)
            .where(
                self.payments.c.payment_id == step.data["payment_id"],
                self.payments.c.status == "charged",
            )
            .values(status="refunded")
        )

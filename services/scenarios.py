"""Order data that sends an order down each path of the saga.

The services react to the data itself (a SKU with no stock, a card the
network declines, an address no carrier serves, a card whose authorization
comes back too late), as a real shop would.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

OUT_OF_STOCK_SKU = "GHOST-1"
"""A product the shop lists but never has in stock."""

DECLINED_CARD = "4000-0000-0000-0002"
"""A card the card network declines."""

SLOW_CARD = "4000-0000-0000-3155"
"""A card whose authorization answer arrives after the saga's deadline."""

GOOD_CARD = "4242-4242-4242-4242"
"""A card that is charged at once."""

UNSHIPPABLE_ADDRESS = "1 Sunken Road, Atlantis"
"""An address no carrier delivers to."""

GOOD_ADDRESS = "10 Downing Street, London"

STOCK = {"BOOK-1": 100_000, "MUG-1": 100_000, "PEN-1": 100_000, OUT_OF_STOCK_SKU: 0}
"""Initial stock of the demo shop."""


class Scenario(enum.Enum):
    """The paths an order can take, with the order status each ends in."""

    COMPLETED = "completed"
    OUT_OF_STOCK = "out of stock"
    PAYMENT_DECLINED = "payment declined"
    SHIPMENT_IMPOSSIBLE = "shipment impossible"
    DEADLINE_PASSED = "deadline passed"

    @property
    def expected_status(self) -> str:
        """The order status this scenario must end in."""
        return "completed" if self is Scenario.COMPLETED else "rejected"


@dataclass(frozen=True, kw_only=True)
class OrderRequest:
    """What a customer submits."""

    order_id: str
    customer: str
    sku: str
    quantity: int
    amount_cents: int
    card: str
    address: str


def order_for(scenario: Scenario, number: int) -> OrderRequest:
    """An order whose data leads to ``scenario``."""
    skus = [s for s in STOCK if s != OUT_OF_STOCK_SKU]
    sku = OUT_OF_STOCK_SKU if scenario is Scenario.OUT_OF_STOCK else skus[number % len(skus)]
    card = {
        Scenario.PAYMENT_DECLINED: DECLINED_CARD,
        Scenario.DEADLINE_PASSED: SLOW_CARD,
    }.get(scenario, GOOD_CARD)
    address = UNSHIPPABLE_ADDRESS if scenario is Scenario.SHIPMENT_IMPOSSIBLE else GOOD_ADDRESS
    quantity = 1 + number % 3
    return OrderRequest(
        order_id=f"order-{number:05d}",
        customer=f"customer-{number % 17}",
        sku=sku,
        quantity=quantity,
        amount_cents=1250 * quantity,
        card=card,
        address=address,
    )


MIX = (
    [Scenario.COMPLETED] * 6
    + [Scenario.OUT_OF_STOCK, Scenario.PAYMENT_DECLINED]
    + [Scenario.SHIPMENT_IMPOSSIBLE, Scenario.DEADLINE_PASSED]
)
"""The demo's mix: six in ten orders complete, one of each failure."""


def scenario_of(number: int) -> Scenario:
    """The scenario of the ``number``-th demo order."""
    return MIX[number % len(MIX)]

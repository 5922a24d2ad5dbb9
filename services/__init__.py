"""The reference saga: an online shop's ``place_order``, across four services.

order (initiator) -> inventory (reserve_stock) -> payment (charge_payment)
-> shipping (create_shipment) -> order (complete_order). Each service has its
own database and tables and uses only the public API of ``saga``, as an
application would. Which way an order goes is decided by its data (see
:mod:`services.scenarios`), never by switches in the framework.
"""

SAGA = "place_order"
"""Name of the reference saga."""

ORDER_PLACED = "choreosaga.shop.OrderPlaced"
STOCK_RESERVED = "choreosaga.shop.StockReserved"
PAYMENT_AUTHORIZED = "choreosaga.shop.PaymentAuthorized"
PAYMENT_CHARGED = "choreosaga.shop.PaymentCharged"
SHIPMENT_CREATED = "choreosaga.shop.ShipmentCreated"

"""``python -m services``: run one reference service, place orders, count outcomes.

Made for containers (see ``docker-compose.yml``): everything is configured by
environment variables, and each service runs until SIGTERM or SIGINT.

``python -m services order|inventory|payment|shipping``
    Create the service's tables (idempotent), make sure the saga topic exists,
    stock the shelves (inventory, when its stock table is empty), then run.
``python -m services place-orders --count N [--every SECONDS]``
    Place orders through the order service's database; its relay publishes them.
``python -m services status``
    Count the orders in the order service's database by status and reason.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import signal
import sys
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.exc import ArgumentError, DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from saga import (
    AvroCodec,
    ChoreosagaError,
    ConfigurationError,
    DurationArgument,
    KafkaSettings,
    SchemaRegistry,
    ServiceSettings,
    configure_from_env,
    create_engine,
    ensure_topics,
    instrument,
)

from . import SAGA
from .base import ShopService
from .inventory import InventoryService
from .order import OrderService
from .payment import PaymentService
from .scenarios import STOCK, order_for, scenario_of
from .shipping import ShippingService
from .shop import SERVICES

__all__ = ["Environment", "main"]

log = logging.getLogger("services")

_SET_UP_LOCK = 0x63686F72656F  # any fixed key; "choreo" in ASCII

ENVIRONMENT = """\
environment:
  DATABASE_URL                 the service's own database (required), e.g.
                               postgresql+psycopg://user:password@host:5432/order
  KAFKA_BOOTSTRAP_SERVERS      Kafka brokers (default localhost:9092); the other
                               KAFKA_* variables of KafkaSettings.from_env() apply
  SAGA_TOPIC_PREFIX            the saga travels on <prefix>place_order (default saga.)
  SAGA_TOPIC_PARTITIONS        partitions of the saga topic if it is created (default 4)
  RUN_RELAY                    publish the outbox in this process (default true)
  ORDER_DEADLINE_SECONDS       order, place-orders: saga deadline (default 30)
  AUTHORIZATION_DELAY_SECONDS  payment: how late slow cards answer (default 45)
  READY_FILE                   a service touches this file once it has started
"""


@dataclass(frozen=True, kw_only=True)
class Environment:
    """The settings a command reads from environment variables."""

    database_url: str
    """``DATABASE_URL``: the service's own database."""

    kafka: KafkaSettings
    """``KAFKA_BOOTSTRAP_SERVERS`` and the other ``KAFKA_*`` variables."""

    topic_prefix: str = "saga."
    """``SAGA_TOPIC_PREFIX``: the saga's events travel on ``<prefix>place_order``."""

    partitions: int = 4
    """``SAGA_TOPIC_PARTITIONS``: partitions of the saga topic when it is created."""

    run_relay: bool = True
    """``RUN_RELAY``: publish the outbox in this process (off when relays run apart)."""

    deadline: timedelta = timedelta(seconds=30)
    """``ORDER_DEADLINE_SECONDS``: how long an order may take before it is called off."""

    authorization_delay: timedelta = timedelta(seconds=45)
    """``AUTHORIZATION_DELAY_SECONDS``: how late slow card authorizations answer."""

    ready_file: Path | None = None
    """``READY_FILE``: touched once the service has started, removed when it stops."""

    @classmethod
    def read(cls, environ: Mapping[str, str]) -> Environment:
        """Read and check the variables.

        Raises:
            ConfigurationError: A variable is missing or has a bad value.
        """
        url = environ.get("DATABASE_URL", "").strip()
        if not url:
            raise ConfigurationError("DATABASE_URL is not set (the service's own database)")
        try:
            kafka = KafkaSettings.from_env(environ)
        except ValueError as exc:  # outbox's ConfigurationError
            raise ConfigurationError(str(exc)) from exc
        ready = environ.get("READY_FILE", "").strip()
        return cls(
            database_url=url,
            kafka=kafka,
            topic_prefix=environ.get("SAGA_TOPIC_PREFIX", "saga."),
            partitions=_positive_int(environ, "SAGA_TOPIC_PARTITIONS", 4),
            run_relay=_boolean(environ, "RUN_RELAY", True),
            deadline=_seconds(environ, "ORDER_DEADLINE_SECONDS", 30),
            authorization_delay=_seconds(environ, "AUTHORIZATION_DELAY_SECONDS", 45),
            ready_file=Path(ready) if ready else None,
        )

    def service_settings(self) -> ServiceSettings:
        """Runtime settings of a reference service."""
        return ServiceSettings(saga_topic_prefix=self.topic_prefix, run_relay=self.run_relay)

    def engine(self) -> AsyncEngine:
        """An engine on ``DATABASE_URL``.

        Raises:
            ConfigurationError: The URL is malformed or names an unsupported database.
        """
        try:
            return create_engine(self.database_url)
        except (ArgumentError, ValueError) as exc:  # ValueError: outbox's ConfigurationError
            raise ConfigurationError(f"DATABASE_URL is not usable: {exc}") from exc


def _boolean(environ: Mapping[str, str], name: str, default: bool) -> bool:
    raw = environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigurationError(f"{name} must be true or false, not {environ[name]!r}")


def _positive_int(environ: Mapping[str, str], name: str, default: int) -> int:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit() or int(raw) < 1:
        raise ConfigurationError(f"{name} must be a positive integer, not {environ[name]!r}")
    return int(raw)


def _seconds(environ: Mapping[str, str], name: str, default: float) -> timedelta:
    raw = environ.get(name, "").strip()
    if not raw:
        return timedelta(seconds=default)
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise ConfigurationError(f"{name} must be a positive number of seconds, not {raw!r}")
    return timedelta(seconds=value)


def build_service(name: str, env: Environment, engine: AsyncEngine) -> ShopService:
    """The reference service called ``name``, on ``engine``, configured by ``env``."""
    codec = AvroCodec(SchemaRegistry.default())
    kafka = env.kafka
    settings = env.service_settings()
    if name == "order":
        return OrderService(
            engine=engine, kafka=kafka, codec=codec, settings=settings, deadline=env.deadline
        )
    if name == "inventory":
        return InventoryService(engine=engine, kafka=kafka, codec=codec, settings=settings)
    if name == "payment":
        return PaymentService(
            engine=engine,
            kafka=kafka,
            codec=codec,
            settings=settings,
            authorization_delay=env.authorization_delay,
        )
    if name == "shipping":
        return ShippingService(engine=engine, kafka=kafka, codec=codec, settings=settings)
    raise ConfigurationError(f"no reference service called {name!r}; one of {SERVICES}")


async def set_up(shop: ShopService) -> None:
    """Create the service's tables and, for inventory, stock empty shelves.

    On PostgreSQL this runs under an advisory lock: replicas of one service
    start together, and two concurrent ``CREATE TABLE`` of one table make the
    loser fail with a duplicate key in the catalog.
    """
    if shop.engine.dialect.name != "postgresql":
        await _create_and_stock(shop)  # SQLite: one process, one pooled connection
        return
    async with shop.engine.begin() as conn:  # the lock lasts until this transaction ends
        await conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_SET_UP_LOCK)))
        await _create_and_stock(shop)


async def _create_and_stock(shop: ShopService) -> None:
    await shop.create_tables()
    if isinstance(shop, InventoryService) and not await shop.rows(shop.stock):
        await shop.stock_up(STOCK)
        log.info("inventory stocked: %s", ", ".join(f"{k} {v}" for k, v in STOCK.items()))


async def serve(name: str, env: Environment) -> None:
    """Set up the service ``name`` and run it until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    if env.ready_file is not None:
        env.ready_file.unlink(missing_ok=True)  # a restarted container is not ready yet
    engine = env.engine()
    try:
        shop = build_service(name, env, engine)
        if configure_from_env(f"choreosaga-{name}"):  # OTEL_EXPORTER_OTLP_* is set
            instrument(shop.service)
        await set_up(shop)
        topic = shop.service.saga_topic(SAGA)
        await ensure_topics(env.kafka, {topic: env.partitions})
        async with shop.service:
            log.info(
                "%s ready: subscribed to %s at %s, %s",
                name,
                topic,
                env.kafka.bootstrap_servers,
                "with its relay" if env.run_relay else "relay runs separately",
            )
            if env.ready_file is not None:
                env.ready_file.touch()
            # Stop on a signal, or fail as soon as a part of the service died
            # (a consumer task, the relay): never run on while nothing moves.
            await shop.service.wait(until=stop)
            log.info("%s stopping", name)
    finally:
        if env.ready_file is not None:
            env.ready_file.unlink(missing_ok=True)
        await engine.dispose()


async def place_orders(env: Environment, *, count: int, every: float) -> None:
    """Place ``count`` orders, one every ``every`` seconds, with the demo's mix of outcomes.

    Order ids start with a prefix of their own per run, so runs never collide.
    """
    run = uuid.uuid4().hex[:8]
    engine = env.engine()
    try:
        order = build_service("order", env, engine)
        assert isinstance(order, OrderService)
        for number in range(count):
            if number and every:
                await asyncio.sleep(every)
            scenario = scenario_of(number)
            request = replace(order_for(scenario, number), order_id=f"order-{run}-{number:05d}")
            await order.place(request)
            print(
                f"placed {request.order_id}: {request.quantity} x {request.sku}, "
                f"expected {scenario.value}",
                flush=True,
            )
    finally:
        await engine.dispose()


async def status(env: Environment) -> None:
    """Print how many orders there are per status and reason."""
    engine = env.engine()
    try:
        order = build_service("order", env, engine)
        assert isinstance(order, OrderService)
        orders = order.orders
        query = (
            sa.select(orders.c.status, orders.c.reason, sa.func.count())
            .group_by(orders.c.status, orders.c.reason)
            .order_by(orders.c.status, orders.c.reason)
        )
        async with engine.connect() as conn:
            rows = [(s, r, int(n)) for s, r, n in (await conn.execute(query)).all()]
    finally:
        await engine.dispose()
    print(f"{'status':<10} {'orders':>6}  reason")
    for state, reason, number in rows:
        print(f"{state:<10} {number:>6}  {reason or ''}".rstrip())
    print(f"{'total':<10} {sum(n for _, _, n in rows):>6}")


def _at_least_one(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, not {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m services``."""
    parser = argparse.ArgumentParser(
        prog="python -m services",
        description="Run the reference shop saga's services, one process each.",
        epilog=ENVIRONMENT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    for name in SERVICES:
        sub.add_parser(
            name,
            help=f"run the {name} service until SIGTERM/SIGINT",
            epilog=ENVIRONMENT,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    place = sub.add_parser(
        "place-orders",
        help="place orders through the order service's database",
        description="Place orders with the demo's mix of outcomes (six in ten complete). "
        "DATABASE_URL is the order service's database; its relay publishes them.",
    )
    place.add_argument(
        "--count", type=_at_least_one, default=10, help="orders to place (default 10)"
    )
    place.add_argument(
        "--every", type=DurationArgument(), default=0.0, help="seconds between orders (default 0)"
    )
    sub.add_parser(
        "status",
        help="count orders by status and reason",
        description="Count the orders in the order service's database (DATABASE_URL) "
        "by status and reason.",
    )
    return parser


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Run ``python -m services``; return the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    prog = f"python -m services {args.command}"
    try:
        env = Environment.read(os.environ if environ is None else environ)
        if args.command in SERVICES:
            asyncio.run(serve(args.command, env))
        elif args.command == "place-orders":
            asyncio.run(place_orders(env, count=args.count, every=args.every))
        else:
            asyncio.run(status(env))
    except ConfigurationError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    except ChoreosagaError as exc:  # the database, tables or broker refused to start
        print(f"{prog}: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    except DBAPIError as exc:
        first = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
        print(f"{prog}: database error: {first}", file=sys.stderr)
        return 1
    return 0

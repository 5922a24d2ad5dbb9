"""Scoped identities over the real broker, on PostgreSQL and on SQLite.

A message is (CloudEvents source, id) for the inbox, not its id alone; a saga
is (name, id), not its id alone. Each test sets up what the unscoped key got
wrong: two producers choosing the same id, and a service taking part in two
sagas that share the natural id of their order.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from support import core_codec

from saga import (
    ConfigurationError,
    Envelope,
    KafkaSettings,
    MessageContext,
    OutboxTables,
    RelaySettings,
    SagaContext,
    SagaStatus,
    Service,
    ServiceSettings,
    create_engine,
    ensure_topics,
)

ITEM = "choreosaga.test.Item"
STARTED = "choreosaga.test.Started"

NewDatabase = Callable[[str], str]


@pytest.fixture(params=["postgresql", "sqlite"])
def new_database(request: pytest.FixtureRequest, tmp_path: Path) -> NewDatabase:
    """A factory of empty databases of one backend, one per service."""
    if request.param == "postgresql":
        databases = request.getfixturevalue("postgres_databases")
        return lambda name: str(databases.new())
    return lambda name: f"sqlite+aiosqlite:///{tmp_path / name}.db"


class Services:
    """Services of one test, each on its own database, stopped at the end."""

    def __init__(self, kafka: KafkaSettings, new_database: NewDatabase, prefix: str) -> None:
        self.kafka = kafka
        self.new_database = new_database
        self.settings = ServiceSettings(
            saga_topic_prefix=prefix,
            group_prefix=prefix,
            relay=RelaySettings(poll_interval=timedelta(milliseconds=100)),
        )
        self.codec = core_codec()
        self.made: list[Service] = []
        self.engines: list[AsyncEngine] = []

    async def make(self, name: str, metadata: sa.MetaData | None = None) -> Service:
        engine = create_engine(self.new_database(name))
        self.engines.append(engine)
        metadata = metadata or sa.MetaData()
        service = Service(
            name,
            engine=engine,
            kafka=self.kafka,
            codec=self.codec,
            settings=self.settings,
            tables=OutboxTables(metadata),
        )
        async with engine.begin() as conn:
            await conn.run_sync(metadata.create_all)
        await service.create_tables()
        self.made.append(service)
        return service

    async def start(self) -> None:
        for service in self.made:
            await service.start()
        await asyncio.gather(*(s.wait_assigned() for s in self.made if s.topics))

    async def close(self) -> None:
        for service in self.made:
            await service.stop()
        for engine in self.engines:
            await engine.dispose()


@pytest.fixture
async def services(
    kafka_settings: KafkaSettings, new_database: NewDatabase
) -> AsyncIterator[Services]:
    made = Services(kafka_settings, new_database, f"i{uuid.uuid4().hex[:8]}.")
    try:
        yield made
    finally:
        await made.close()


async def eventually(check: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    """Poll ``check`` (a coroutine function) until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_two_producers_sending_the_same_id_are_both_handled(
    services: Services,
) -> None:
    """``/billing`` and ``/shipping`` both send id ``order-42``: neither is a duplicate."""
    prefix = services.settings.group_prefix
    billing, shipping = prefix + "billing", prefix + "shipping"
    await ensure_topics(services.kafka, {billing: 1, shipping: 1})
    metadata = sa.MetaData()
    handled = sa.Table(
        "handled",
        metadata,
        sa.Column("topic", sa.String(200)),
        sa.Column("source", sa.String(200)),
        sa.Column("message_id", sa.String(200)),
    )
    ledger = await services.make("ledger", metadata)

    async def record(ctx: MessageContext) -> None:
        envelope = ctx.envelope
        await ctx.session.execute(
            sa.insert(handled).values(
                topic=ctx.record.topic, source=envelope.source, message_id=envelope.id
            )
        )

    ledger.add_handler(billing, ITEM, record)
    ledger.add_handler(shipping, ITEM, record)
    await services.start()

    def item(source: str) -> Envelope:
        data = {"key": "order-42", "seq": 1, "note": source}
        return Envelope(type=ITEM, data=data, source=source, id="order-42", key=b"order-42")

    async with AsyncSession(ledger.engine) as session, session.begin():
        await ledger.publish(session, item("/billing"), topic=billing)
        await ledger.publish(session, item("/shipping"), topic=shipping)
        # A real duplicate: the same source sends the same id again.
        await ledger.publish(session, item("/billing"), topic=billing)

    async def all_seen() -> bool:
        return ledger.stats.processed + ledger.stats.duplicates >= 3

    await eventually(all_seen, "three deliveries")
    async with ledger.engine.connect() as conn:
        rows = (await conn.execute(sa.select(handled.c.source, handled.c.message_id))).all()
    assert sorted(rows) == [("/billing", "order-42"), ("/shipping", "order-42")]
    assert (ledger.stats.processed, ledger.stats.duplicates) == (2, 1)


async def test_a_service_in_two_sagas_with_the_same_id_completes_both(
    services: Services,
) -> None:
    """``place_order`` and ``cancel_order`` both use id ``order-7``; both complete."""
    prefix = services.settings.saga_topic_prefix
    await ensure_topics(services.kafka, {prefix + "place_order": 2, prefix + "cancel_order": 2})
    orders = await services.make("orders")
    returns = await services.make("returns")
    warehouse = await services.make("warehouse")
    ended: dict[str, list[str]] = {"place_order": [], "cancel_order": []}
    performed: list[str] = []

    @orders.on_saga_end("place_order")
    async def placed(ctx: SagaContext) -> None:
        ended["place_order"].append(ctx.stamp.status.value)

    @returns.on_saga_end("cancel_order")
    async def cancelled(ctx: SagaContext) -> None:
        ended["cancel_order"].append(ctx.stamp.status.value)

    @warehouse.step("reserve", saga="place_order", on=STARTED)
    async def reserve(ctx: SagaContext) -> None:
        performed.append(f"reserve {ctx.saga_id}")
        ctx.complete()

    @warehouse.step("release", saga="cancel_order", on=STARTED)
    async def release(ctx: SagaContext) -> None:
        performed.append(f"release {ctx.saga_id}")
        ctx.complete()

    await services.start()
    for initiator, saga in ((orders, "place_order"), (returns, "cancel_order")):
        async with AsyncSession(initiator.engine) as session, session.begin():
            await initiator.start_saga(
                session, saga, saga_id="order-7", event_type=STARTED, data={"n": 7}
            )

        async def done(saga: str = saga) -> bool:
            return bool(ended[saga])

        await eventually(done, f"{saga} to end")

    assert ended == {"place_order": ["COMPLETED"], "cancel_order": ["COMPLETED"]}
    assert performed == ["reserve order-7", "release order-7"]
    for saga in ("place_order", "cancel_order"):
        stamp = await warehouse.saga_state("order-7", saga=saga)
        assert stamp is not None
        assert stamp.saga_name == saga
        assert stamp.status is SagaStatus.COMPLETED
    # Where one saga has the id, the name may be left out; where two have it, not.
    only = await orders.saga_state("order-7")
    assert only is not None
    assert only.saga_name == "place_order"
    with pytest.raises(ConfigurationError, match="cancel_order"):
        await warehouse.saga_state("order-7")

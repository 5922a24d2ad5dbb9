"""The error model on real servers: outages wait, bugs are dead-lettered, only refusals compensate.

A three-service saga on PostgreSQL and the real broker: ``starter`` starts it
and records how it ended, ``alpha`` performs a step (and can undo it),
``beta`` performs the last step, whose behaviour each test chooses per order
number ``n``. The saga topic has ONE partition, so every saga shares it: a
message that blocked its partition would block every later saga.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from support import consumer_record, core_codec

from saga import (
    BrokerError,
    BusinessFailure,
    KafkaSettings,
    OutboxTables,
    RelaySettings,
    RetryPolicy,
    SagaContext,
    SagaStatus,
    Service,
    ServiceSettings,
    StepOutcome,
    create_engine,
    ensure_topics,
)
from saga import cli as saga_cli
from saga.deadletter import REPLAY_HEADER, Failure, dead_letter_message
from saga.dlq import DeadLetterSelection, read_dead_letters, replay

SAGA = "pay"
ORDER = "choreosaga.test.Order"
ALPHA_DONE = "choreosaga.test.AlphaDone"
CARD = "tok_visa_4242_PAYLOAD_MARKER"


class OutOfStock(Exception):
    """A business error the beta step declares."""


@dataclass
class Shop:
    services: dict[str, Service]
    engines: dict[str, AsyncEngine]
    effects: sa.Table
    ended: sa.Table
    topic: str
    kafka: KafkaSettings
    alpha: dict[int, Callable[[SagaContext], Awaitable[None]]] = field(default_factory=dict)
    beta: dict[int, Callable[[SagaContext], Awaitable[None]]] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)

    async def start(self, n: int, deadline: timedelta | None = None) -> str:
        saga_id = f"order-{n}-{uuid.uuid4().hex[:6]}"
        starter = self.services["starter"]
        async with AsyncSession(self.engines["starter"]) as session, session.begin():
            await starter.start_saga(
                session,
                SAGA,
                saga_id=saga_id,
                event_type=ORDER,
                data={"n": n, "card": CARD},
                deadline=deadline,
            )
        return saga_id

    async def ended_as(self, saga_id: str, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            async with self.engines["starter"].connect() as conn:
                query = sa.select(self.ended.c.status).where(self.ended.c.saga_id == saga_id)
                status = (await conn.execute(query)).scalar()
            if status is not None:
                return str(status)
            assert time.monotonic() < deadline, f"saga {saga_id} did not end"
            await asyncio.sleep(0.05)

    async def effects_of(self, service: str, saga_id: str) -> list[str]:
        async with self.engines[service].connect() as conn:
            query = sa.select(self.effects.c.entry).where(self.effects.c.saga_id == saga_id)
            return sorted((await conn.execute(query)).scalars())

    async def dead_letters(self, saga_id: str, count: int = 1, timeout: float = 30.0) -> list[Any]:
        deadline = time.monotonic() + timeout
        selection = DeadLetterSelection(saga_id=saga_id)
        while True:
            letters = await read_dead_letters(
                self.kafka, [self.topic + ".dlq"], selection=selection
            )
            if len(letters) >= count:
                return letters
            assert time.monotonic() < deadline, f"{len(letters)} dead letters for {saga_id}"
            await asyncio.sleep(0.2)

    async def suspended(self, service: str, saga_id: str, timeout: float = 30.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            stamp = await self.services[service].saga_state(saga_id)
            if stamp is not None and stamp.suspension is not None:
                return stamp
            assert time.monotonic() < deadline, f"saga {saga_id} was not suspended at {service}"
            await asyncio.sleep(0.05)


async def build_shop(
    postgres_databases: Any,
    kafka: KafkaSettings,
    *,
    engine_options: dict[str, dict[str, Any]] | None = None,
) -> Shop:
    prefix = f"fs{uuid.uuid4().hex[:8]}."
    topic = prefix + SAGA
    await ensure_topics(kafka, {topic: 1, topic + ".dlq": 1})
    codec = core_codec()
    settings = ServiceSettings(
        saga_topic_prefix=prefix,
        group_prefix=prefix,
        relay=RelaySettings(poll_interval=timedelta(milliseconds=200)),
        retry=RetryPolicy(initial_interval=timedelta(milliseconds=20), maximum_attempts=3),
    )
    names = ("starter", "alpha", "beta")
    options = engine_options or {}
    engines = {n: create_engine(postgres_databases.new(), **options.get(n, {})) for n in names}
    services: dict[str, Service] = {}
    metadata = sa.MetaData()
    effects = sa.Table(
        "effects",
        metadata,
        sa.Column("saga_id", sa.String(100)),
        sa.Column("entry", sa.String(100)),
    )
    ended = sa.Table(
        "ended", metadata, sa.Column("saga_id", sa.String(100)), sa.Column("status", sa.String(20))
    )
    for name in names:
        services[name] = Service(
            name,
            engine=engines[name],
            kafka=kafka,
            codec=codec,
            settings=settings,
            tables=OutboxTables(sa.MetaData()),
        )
        async with engines[name].begin() as conn:
            await conn.run_sync(metadata.create_all)
        await services[name].create_tables()
    shop = Shop(
        services=services, engines=engines, effects=effects, ended=ended, topic=topic, kafka=kafka
    )

    def count(what: str) -> None:
        shop.calls[what] = shop.calls.get(what, 0) + 1

    async def note(ctx: SagaContext, entry: str) -> None:
        await ctx.session.execute(sa.insert(effects).values(saga_id=ctx.saga_id, entry=entry))

    @services["starter"].on_saga_end(SAGA)
    async def on_end(ctx: SagaContext) -> None:
        await ctx.session.execute(
            sa.insert(ended).values(saga_id=ctx.saga_id, status=ctx.stamp.status.value)
        )

    @services["alpha"].step("alpha", saga=SAGA, on=ORDER)
    async def alpha(ctx: SagaContext) -> None:
        behaviour = shop.alpha.get(ctx.data["n"])
        if behaviour is not None:
            await behaviour(ctx)
        await note(ctx, "reserved")
        ctx.emit(ALPHA_DONE, {"n": ctx.data["n"]})

    @services["alpha"].compensation("alpha", saga=SAGA)
    async def undo_alpha(ctx: SagaContext) -> None:
        await note(ctx, "released")

    @services["beta"].step("beta", saga=SAGA, on=ALPHA_DONE, business_errors=(OutOfStock,))
    async def beta(ctx: SagaContext) -> None:
        count(f"beta {ctx.saga_id}")
        behaviour = shop.beta.get(ctx.data["n"])
        if behaviour is not None:
            await behaviour(ctx)
        await note(ctx, "charged")
        ctx.complete()

    for service in services.values():
        await service.start()
    await asyncio.gather(*(s.wait_assigned() for s in services.values()))
    return shop


@pytest.fixture
async def shop_factory(
    postgres_databases: Any, kafka_settings: KafkaSettings
) -> AsyncIterator[Callable[..., Awaitable[Shop]]]:
    shops: list[Shop] = []

    async def factory(**kwargs: Any) -> Shop:
        shop = await build_shop(postgres_databases, kafka_settings, **kwargs)
        shops.append(shop)
        return shop

    yield factory
    for shop in shops:
        for service in shop.services.values():
            await service.stop()
        for engine in shop.engines.values():
            await engine.dispose()


@pytest.fixture
async def shop(shop_factory: Callable[..., Awaitable[Shop]]) -> Shop:
    return await shop_factory()


# -- item 1: an outage is never a step failure -------------------------------------------


async def test_pool_timeout_waits_instead_of_failing_the_step(
    shop_factory: Callable[..., Awaitable[Shop]],
) -> None:
    """One pooled connection, held by another transaction past the pool timeout."""
    shop = await shop_factory(
        engine_options={"beta": {"pool_size": 1, "max_overflow": 0, "pool_timeout": 0.5}}
    )
    beta = shop.services["beta"]
    async with shop.engines["beta"].connect() as held:
        await held.execute(sa.text("SELECT 1"))
        saga_id = await shop.start(1)
        deadline = time.monotonic() + 20
        while beta.stats.outage_waits == 0:
            assert time.monotonic() < deadline, "the pool timeout never happened"
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.8)
    assert await shop.ended_as(saga_id) == "COMPLETED"
    stamp = await shop.services["starter"].saga_state(saga_id)
    assert stamp is not None
    assert [(s.name, s.outcome) for s in stamp.steps] == [
        ("alpha", StepOutcome.DONE),
        ("beta", StepOutcome.DONE),
    ]
    assert await shop.effects_of("alpha", saga_id) == ["reserved"]
    assert beta.stats.dead_lettered == 0


# -- item 2 and the buggy deploy: a bug suspends, a fix plus a replay continues ----------


async def test_handler_bug_is_dead_lettered_and_suspends_the_saga_instead_of_compensating(
    shop: Shop,
) -> None:
    deployed = {"buggy": True}

    async def charge(ctx: SagaContext) -> None:
        if deployed["buggy"]:
            _ = ctx.data["amount"]  # a wrong field name: KeyError

    shop.beta[2] = charge
    saga_id = await shop.start(2)

    (letter,) = await shop.dead_letters(saga_id)
    stamp = await shop.suspended("beta", saga_id)
    assert stamp.status is SagaStatus.RUNNING
    suspension = stamp.suspension
    assert (suspension.service, suspension.role, suspension.step) == ("beta", "step", "beta")
    assert suspension.attempts == 3
    assert "KeyError" in suspension.error
    assert letter.error_type == "builtins.KeyError"
    assert letter.info["step"] == "beta"
    assert letter.info["attempts"] == "3"
    assert letter.original_topic == shop.topic
    assert shop.calls[f"beta {saga_id}"] == 3
    # Nothing was compensated: the reservation stands, the saga waits.
    await asyncio.sleep(0.5)
    assert await shop.effects_of("alpha", saga_id) == ["reserved"]
    assert (await shop.services["starter"].saga_state(saga_id)).status is SagaStatus.RUNNING

    # A later saga on the same (single) partition is not held up.
    later = await shop.start(0)
    assert await shop.ended_as(later) == "COMPLETED"

    # The fix is deployed; the dead letter is replayed; the saga completes.
    deployed["buggy"] = False
    starter = shop.services["starter"]
    ignored = starter.stats.ignored
    sent = await replay(shop.kafka, [letter])
    assert [d.ref for d in sent] == [letter.ref]
    assert await shop.ended_as(saga_id) == "COMPLETED"
    # The replay was meant for beta's group: the initiator, which handled the
    # message before, skipped it without even looking it up in its inbox.
    assert starter.stats.ignored == ignored + 1
    assert await shop.effects_of("beta", saga_id) == ["charged"]
    assert await shop.effects_of("alpha", saga_id) == ["reserved"]
    resumed = await shop.services["beta"].saga_state(saga_id)
    assert resumed is not None
    assert resumed.suspension is None
    # A second replay of the same dead letter applies nothing again.
    await replay(shop.kafka, [letter])
    await asyncio.sleep(1.0)
    assert await shop.effects_of("beta", saga_id) == ["charged"]
    assert shop.calls[f"beta {saga_id}"] == 4


async def test_a_deadline_is_held_while_the_saga_is_suspended_and_moved_when_it_resumes(
    shop: Shop,
) -> None:
    """A bug must not spend the saga's time: past its deadline, a suspended saga is not
    compensated; fixed and replayed, it completes."""
    deployed = {"buggy": True}

    async def charge(ctx: SagaContext) -> None:
        if deployed["buggy"]:
            _ = ctx.data["amount"]

    shop.beta[13] = charge
    saga_id = await shop.start(13, deadline=timedelta(seconds=3))
    (letter,) = await shop.dead_letters(saga_id)
    starter = shop.services["starter"]
    deadline = time.monotonic() + 20
    while (held := await starter.saga_state(saga_id)) is None or held.suspension is None:
        assert time.monotonic() < deadline, "the initiator never heard of the suspension"
        await asyncio.sleep(0.05)
    assert held.suspension.service == "beta"
    assert held.suspension.step == "beta"
    await asyncio.sleep(4.0)  # well past the deadline
    assert (await starter.saga_state(saga_id)).status is SagaStatus.RUNNING
    assert await shop.effects_of("alpha", saga_id) == ["reserved"]  # nothing undone

    deployed["buggy"] = False
    await replay(shop.kafka, [letter])
    assert await shop.ended_as(saga_id) == "COMPLETED"
    assert await shop.effects_of("beta", saga_id) == ["charged"]
    assert await shop.effects_of("alpha", saga_id) == ["reserved"]
    final = await starter.saga_state(saga_id)
    assert final is not None
    assert final.suspension is None


async def test_emitting_an_unregistered_event_is_a_bug_not_a_business_failure(
    shop: Shop,
) -> None:
    async def emit_unknown(ctx: SagaContext) -> None:
        ctx.emit("choreosaga.test.NoSuchEvent", {"n": 1})

    shop.beta[5] = emit_unknown
    saga_id = await shop.start(5)
    (letter,) = await shop.dead_letters(saga_id)
    assert "Schema" in letter.error_type or "Encode" in letter.error_type
    await shop.suspended("beta", saga_id)
    assert await shop.effects_of("alpha", saga_id) == ["reserved"]


async def test_declared_business_error_compensates(shop: Shop) -> None:
    async def refuse(ctx: SagaContext) -> None:
        await ctx.session.execute(
            sa.insert(shop.effects).values(saga_id=ctx.saga_id, entry="half-done")
        )
        raise OutOfStock("no stock for sku 7")

    async def refuse_plainly(ctx: SagaContext) -> None:
        raise BusinessFailure("card declined")

    shop.beta[6] = refuse
    shop.beta[7] = refuse_plainly
    first, second = await shop.start(6), await shop.start(7)
    assert await shop.ended_as(first) == "COMPENSATED"
    assert await shop.ended_as(second) == "COMPENSATED"
    stamp = await shop.services["starter"].saga_state(first)
    assert stamp is not None
    assert stamp.reason is not None
    assert "OutOfStock: no stock for sku 7" in stamp.reason
    # The refusing step's own changes were rolled back; alpha was undone.
    assert await shop.effects_of("beta", first) == []
    assert await shop.effects_of("alpha", first) == ["released", "reserved"]
    assert shop.calls[f"beta {first}"] == 1  # a refusal is not retried
    second_stamp = await shop.services["starter"].saga_state(second)
    assert second_stamp is not None
    assert second_stamp.reason is not None
    assert "card declined" in second_stamp.reason


# -- item 3: a "transient" error that never clears is bounded ------------------------------


async def test_statement_timeout_is_dead_lettered_after_its_policy_and_the_partition_moves_on(
    shop: Shop,
) -> None:
    async def slow(ctx: SagaContext) -> None:
        await ctx.session.execute(sa.text("SET LOCAL statement_timeout = 50"))
        await ctx.session.execute(sa.text("SELECT pg_sleep(2)"))

    shop.beta[3] = slow
    stuck = await shop.start(3)
    behind = await shop.start(0)

    assert await shop.ended_as(behind) == "COMPLETED"
    (letter,) = await shop.dead_letters(stuck)
    assert letter.error_type.endswith("QueryCanceled")
    assert shop.calls[f"beta {stuck}"] == 3
    await shop.suspended("beta", stuck)


# -- item 4: a handler's CancelledError does not end its partition's worker ----------------


async def test_handler_raising_cancelled_error_does_not_end_its_partition(shop: Shop) -> None:
    async def cancelled(ctx: SagaContext) -> None:
        raise asyncio.CancelledError

    shop.beta[4] = cancelled
    broken = await shop.start(4)
    after = [await shop.start(0) for _ in range(3)]

    for saga_id in after:
        assert await shop.ended_as(saga_id) == "COMPLETED"
    (letter,) = await shop.dead_letters(broken)
    assert letter.info["error_type"] == "asyncio.exceptions.CancelledError"
    assert shop.services["beta"].stats.dead_lettered == 1


# -- item 8: logs carry no payloads -----------------------------------------------------


async def test_logs_of_a_failing_run_carry_no_payload_and_no_password(
    shop: Shop, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "sasl-secret-PASSWORD-MARKER"
    # Everything of ours, down to DEBUG; the client libraries at INFO (aiokafka's
    # own DEBUG output echoes records, which no production setting enables).
    caplog.set_level(logging.INFO)
    for ours in ("saga", "outbox", "services"):
        caplog.set_level(logging.DEBUG, logger=ours)
    with_secret = KafkaSettings(
        bootstrap_servers=shop.kafka.bootstrap_servers,
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-256",
        sasl_username="shop",
        sasl_password=secret,
    )
    logging.getLogger("test").info("settings in use: %r", with_secret)

    async def crash(ctx: SagaContext) -> None:
        raise RuntimeError("the ledger is read-only")

    shop.alpha[8] = crash  # alpha's message carries the card token
    saga_id = await shop.start(8)
    (letter,) = await shop.dead_letters(saga_id)
    await shop.suspended("alpha", saga_id)
    assert letter.value is not None
    assert CARD.encode() in letter.value  # the dead letter keeps the payload...

    text = caplog.text
    assert "dead-lettered" in text  # ...the logs say what failed...
    assert CARD not in text  # ...without the payload, in any form
    assert "PAYLOAD_MARKER" not in text
    assert base64.b64encode(letter.value).decode() not in text
    assert letter.value.hex() not in text
    assert secret not in text


# -- the operator's path: saga dlq list / replay from the command line -------------------


def _saga_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "saga", *args],
        # The test broker cannot do idempotent producers (see BROKER.md).
        env={**os.environ, "KAFKA_ENABLE_IDEMPOTENCE": "false"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_saga_dlq_lists_and_replays_a_suspended_saga_from_the_command_line(
    shop: Shop,
) -> None:
    deployed = {"buggy": True}

    async def charge(ctx: SagaContext) -> None:
        if deployed["buggy"]:
            raise LookupError("no tariff for region EU-9")

    shop.beta[9] = charge
    saga_id = await shop.start(9)
    await shop.dead_letters(saga_id)
    common = [
        "--dlq-topic",
        shop.topic + ".dlq",
        "--bootstrap-servers",
        shop.kafka.bootstrap_servers,
    ]

    listed = await asyncio.to_thread(_saga_cli, "dlq", "list", "--saga", saga_id, *common)
    assert listed.returncode == 0, listed.stderr
    assert "LookupError: no tariff for region EU-9" in listed.stdout
    assert f"saga pay/{saga_id}" in listed.stdout
    assert "1 dead letter(s)" in listed.stdout
    as_json = await asyncio.to_thread(
        _saga_cli, "dlq", "list", "--error", "LookupError", "--json", *common
    )
    (entry,) = json.loads(as_json.stdout)
    assert (entry["saga_id"], entry["step"], entry["attempts"]) == (saga_id, "beta", "3")
    assert CARD not in as_json.stdout  # a listing shows sizes and hashes, not payloads

    refused = await asyncio.to_thread(_saga_cli, "dlq", "replay", *common)
    assert refused.returncode == 2
    assert "say which dead letters" in refused.stderr
    dry = await asyncio.to_thread(
        _saga_cli, "dlq", "replay", "--saga", saga_id, "--dry-run", *common
    )
    assert "would replay 1 dead letter(s)" in dry.stdout
    await asyncio.sleep(1.0)
    assert (await shop.services["starter"].saga_state(saga_id)).status is SagaStatus.RUNNING

    deployed["buggy"] = False
    done = await asyncio.to_thread(_saga_cli, "dlq", "replay", "--saga", saga_id, *common)
    assert done.returncode == 0, done.stderr
    assert "replayed 1 dead letter(s)" in done.stdout
    assert await shop.ended_as(saga_id) == "COMPLETED"
    assert await shop.effects_of("beta", saga_id) == ["charged"]


def _saga_main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run ``saga ARGS`` in this process; return (exit status, stdout, stderr)."""
    aiokafka_level = logging.getLogger("aiokafka").level
    try:
        status = saga_cli.main(list(args))
    finally:
        logging.getLogger("aiokafka").setLevel(aiokafka_level)  # main() quiets it
    out, err = capsys.readouterr()
    return status, out, err


async def test_saga_dlq_refuses_a_malformed_reference_and_names_one_that_matches_nothing(
    kafka_settings: KafkaSettings,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KAFKA_ENABLE_IDEMPOTENCE", "false")  # see BROKER.md
    topic = f"fs{uuid.uuid4().hex[:8]}.{SAGA}"
    dlq = topic + ".dlq"
    await ensure_topics(kafka_settings, {topic: 1, dlq: 1})
    now = datetime.now(UTC)
    row = dead_letter_message(
        topic=dlq,
        key=b"order-1",
        value=b"the original record",
        headers=[("ce_id", b"m-1")],
        origin=(topic, 0, 5),
        failure=Failure(error=LookupError("no tariff"), attempts=3, first=now, last=now),
        service="beta",
        group="beta-group",
        role="step",
        saga=(SAGA, "order-1"),
        step="beta",
    )
    producer = AIOKafkaProducer(**kafka_settings.producer_kwargs())
    await producer.start()
    try:
        await producer.send_and_wait(dlq, value=row.value, key=row.key, headers=list(row.headers))
    finally:
        await producer.stop()
    found, missing = f"{dlq}/0/0", f"{dlq}/0/17"
    common = ("--dlq-topic", dlq, "--bootstrap-servers", kafka_settings.bootstrap_servers)

    for malformed in ("foo/bar", f"{dlq}/0", f"{dlq}/x/1", "-1"):
        status, out, err = await asyncio.to_thread(
            _saga_main, capsys, "dlq", "replay", malformed, *common
        )
        assert (status, out) == (2, ""), malformed
        assert err == (
            f"saga dlq: not a dead-letter reference: {malformed!r}; "
            "give TOPIC/PARTITION/OFFSET (as 'saga dlq list' prints it) or OFFSET\n"
        )

    status, out, err = await asyncio.to_thread(
        _saga_main, capsys, "dlq", "list", found, missing, *common
    )
    assert status == 1
    assert found in out
    assert "1 dead letter(s)" in out
    assert err == f"saga dlq: no dead letter {missing}\n"

    status, out, err = await asyncio.to_thread(
        _saga_main, capsys, "dlq", "replay", missing, found, "--dry-run", *common
    )
    assert status == 1
    assert "would replay 1 dead letter(s)" in out
    assert err == f"saga dlq: no dead letter {missing}\n"

    status, out, err = await asyncio.to_thread(
        _saga_main, capsys, "dlq", "replay", found, missing, *common
    )
    assert status == 1
    assert f"replayed {found} -> {topic}" in out
    assert "replayed 1 dead letter(s)" in out
    assert err == f"saga dlq: no dead letter {missing}\n"
    consumer = AIOKafkaConsumer(topic, **kafka_settings.consumer_kwargs(None))
    await consumer.start()
    try:
        await consumer.seek_to_beginning()
        batch = await consumer.getmany(timeout_ms=5000)
    finally:
        await consumer.stop()
    (sent,) = [record for records in batch.values() for record in records]
    assert (sent.key, sent.value) == (b"order-1", b"the original record")
    assert (REPLAY_HEADER, found.encode()) in sent.headers


# -- what the review of the error model found ---------------------------------------------


async def test_database_error_detail_stays_out_of_logs_and_the_suspension(
    shop: Shop, caplog: pytest.LogCaptureFixture
) -> None:
    """PostgreSQL quotes the failing row in DETAIL: neither logs nor stamps may carry it."""
    caplog.set_level(logging.INFO)
    async with shop.engines["beta"].begin() as conn:
        await conn.execute(
            sa.text("ALTER TABLE effects ADD CONSTRAINT no_tokens CHECK (entry NOT LIKE 'tok%')")
        )

    async def charge(ctx: SagaContext) -> None:
        await ctx.session.execute(sa.insert(shop.effects).values(saga_id=ctx.saga_id, entry=CARD))

    shop.beta[10] = charge
    saga_id = await shop.start(10)
    (letter,) = await shop.dead_letters(saga_id)
    stamp = await shop.suspended("beta", saga_id)
    assert "CheckViolation [23514]" in stamp.suspension.error
    assert CARD not in stamp.suspension.error
    assert CARD not in caplog.text
    assert letter.error_type.endswith("CheckViolation")


async def test_a_statement_the_driver_refuses_before_sending_is_bounded_not_an_outage(
    shop: Shop,
) -> None:
    """psycopg reports it without a SQLSTATE; it is not about the connection."""

    async def charge(ctx: SagaContext) -> None:
        ids = [str(i) for i in range(70_000)]  # more bind parameters than PostgreSQL takes
        await ctx.session.execute(sa.select(shop.effects).where(shop.effects.c.entry.in_(ids)))

    shop.beta[11] = charge
    stuck = await shop.start(11)
    behind = await shop.start(0)
    assert await shop.ended_as(behind) == "COMPLETED"
    (letter,) = await shop.dead_letters(stuck)
    assert letter.info["attempts"] == "3"
    assert shop.services["beta"].stats.outage_waits == 0


async def test_a_stampless_message_a_saga_service_would_act_on_is_dead_lettered(
    shop: Shop,
) -> None:
    from aiokafka import AIOKafkaProducer

    from saga.envelope import Envelope

    beta = shop.services["beta"]
    unstamped = Envelope(type=ALPHA_DONE, data={"n": 12}, source="/forged", key=b"x")
    key, value, headers = beta.envelopes.encode(unstamped)
    producer = AIOKafkaProducer(**shop.kafka.producer_kwargs())
    await producer.start()
    try:
        await producer.send_and_wait(shop.topic, value, key=key, headers=headers)
    finally:
        await producer.stop()
    later = await shop.start(0)
    assert await shop.ended_as(later) == "COMPLETED"
    deadline = time.monotonic() + 30
    while True:
        letters = await read_dead_letters(shop.kafka, [shop.topic + ".dlq"])
        mine = [d for d in letters if d.header("ce_id") == unstamped.id]
        if mine:
            break
        assert time.monotonic() < deadline, "the stamp-less message was not dead-lettered"
        await asyncio.sleep(0.2)
    assert mine[0].info["role"] == "decode"
    assert "carries no stamp" in mine[0].info["error_message"]


async def test_a_different_record_at_a_reused_position_is_dead_lettered_too(
    postgres_url: str,
) -> None:
    """Offsets start again when a topic is created again: position alone is not an identity."""
    from aiokafka import ConsumerRecord

    from saga import MessageContext

    engine = create_engine(postgres_url)
    service = Service(
        "svc",
        engine=engine,
        kafka=KafkaSettings(bootstrap_servers="127.0.0.1:9"),  # never contacted
        codec=core_codec(),
    )

    @service.subscribe("orders", ORDER)
    async def handle(ctx: MessageContext) -> None:
        pass

    def record(value: bytes) -> ConsumerRecord[bytes, bytes]:
        return consumer_record("orders", 7, b"k", value, [])

    try:
        await service.create_tables()
        await service.processor.process(record(b"garbage one"))
        await service.processor.process(record(b"garbage one"))  # a redelivery: once
        await service.processor.process(record(b"another record at the same position"))
        async with engine.connect() as conn:
            table = service.tables.outbox
            values = (await conn.execute(sa.select(table.c.value))).scalars().all()
    finally:
        await engine.dispose()
    assert sorted(values) == [b"another record at the same position", b"garbage one"]
    assert service.stats.dead_lettered == 2


def test_a_handler_retry_policy_without_a_limit_is_refused() -> None:
    from saga import ConfigurationError

    with pytest.raises(ConfigurationError, match="maximum_attempts"):
        ServiceSettings(retry=RetryPolicy(maximum_attempts=0))


_UNPARSABLE_PRODUCER = """
import asyncio, sys
from aiokafka import AIOKafkaProducer

class Key(str):
    def encode(self, *args, **kwargs):
        return b"\\xff\\xfebad"  # a header key that is not UTF-8

async def main():
    producer = AIOKafkaProducer(bootstrap_servers=sys.argv[1], enable_idempotence=False)
    await producer.start()
    await producer.send_and_wait(sys.argv[2], b"x", key=b"k", headers=[(Key("ce_id"), b"1")])
    await producer.stop()

asyncio.run(main())
"""


async def test_a_record_the_client_cannot_parse_stops_the_service_loudly(shop: Shop) -> None:
    """aiokafka fails on a non-UTF-8 header key before we see the bytes: never a silent stall."""
    produced = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", _UNPARSABLE_PRODUCER, shop.kafka.bootstrap_servers, shop.topic],
        env={**os.environ, "AIOKAFKA_NO_EXTENSIONS": "1"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert produced.returncode == 0, produced.stderr
    with pytest.raises(BrokerError, match="cannot read a record"):
        async with asyncio.timeout(60):
            await shop.services["beta"].wait()


async def test_saga_status_lists_a_suspended_saga_until_its_replay_completes_it(
    shop: Shop, tmp_path: Any
) -> None:
    """What a person sees: the saga log shows where a bug stopped the saga, and why."""
    from saga import ObserverSettings, SagaObserver, saga_status, trace_from_log

    engine = create_engine(f"sqlite:///{tmp_path / 'saga_log.db'}")
    observer = SagaObserver(
        engine=engine,
        kafka=shop.kafka,
        codec=core_codec(),
        settings=ObserverSettings(
            patterns=(shop.topic, shop.topic + ".dlq"),
            group_id=shop.topic + ".observer",
            retention=timedelta(days=1),
        ),
    )
    deployed = {"buggy": True}

    async def charge(ctx: SagaContext) -> None:
        if deployed["buggy"]:
            raise LookupError("no tariff for region EU-9")

    shop.beta[14] = charge

    async def suspended_ids() -> list[str]:
        report = await saga_status(engine, stuck_after=timedelta(minutes=5))
        return [s.saga_id for s in report.attention["suspended"]]

    await observer.create_tables()
    try:
        async with observer:
            saga_id = await shop.start(14)
            (letter,) = await shop.dead_letters(saga_id)
            deadline = time.monotonic() + 30
            while saga_id not in await suspended_ids():
                assert time.monotonic() < deadline, "saga status never listed the suspension"
                await asyncio.sleep(0.2)
            report = await saga_status(engine)
            text = report.to_text()
            assert "LookupError: no tariff for region EU-9" in text
            assert "beta" in text
            # The dead letter is observed too: the trace shows where and why.
            while True:
                trace = await trace_from_log(engine, saga_id)
                assert trace is not None
                rows = [m for m in trace.to_dict()["timeline"] if m["outcome"] == "DEAD_LETTERED"]
                if rows:
                    break
                assert time.monotonic() < deadline, "the dead letter never reached the saga log"
                await asyncio.sleep(0.2)
            assert rows[0]["service"] == "beta"
            assert "LookupError" in rows[0]["detail"]

            deployed["buggy"] = False
            await replay(shop.kafka, [letter])
            assert await shop.ended_as(saga_id) == "COMPLETED"
            while saga_id in await suspended_ids():
                assert time.monotonic() < deadline + 30, "the resumed saga stayed listed"
                await asyncio.sleep(0.2)
    finally:
        await engine.dispose()

"""What the relay does when things go wrong, against a real database and broker.

Rows that can never be published are parked at once (and only hold back
their own topic and key); a broker outage never parks anything; a producer
whose sender died is replaced; a relay whose database connection is killed
under it keeps publishing, and a relay that cannot publish at all exits
non-zero and gives its shards back. Logs never carry payloads.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from aiokafka.errors import KafkaError
from sqlalchemy.engine import make_url
from support import read_topic

from outbox import (
    KafkaPublisher,
    KafkaSettings,
    OutboxMessage,
    OutboxTables,
    Relay,
    RelaySettings,
    SqlOutboxStore,
    StoreError,
    create_engine,
    ensure_topics,
)
from saga.embedded import EmbeddedBroker

FAST = RelaySettings(
    batch_size=100,
    poll_interval=timedelta(milliseconds=200),
    lease_ttl=timedelta(seconds=2),
)


class Outbox:
    """An outbox on a fresh database."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = create_engine(url)
        self.tables = OutboxTables()
        self.store = SqlOutboxStore(self.engine, self.tables, shards=8)

    async def add(self, *messages: OutboxMessage) -> None:
        async with self.engine.begin() as conn:
            await self.store.add(conn, messages)

    async def wait(self, what: str, condition: Any, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not await condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} not within {timeout}s: {await self.store.stats()}")
            await asyncio.sleep(0.05)

    async def wait_drained(self, timeout: float = 20.0) -> None:
        async def drained() -> bool:
            stats = await self.store.stats()
            return stats.pending + stats.scheduled == 0

        await self.wait("outbox drained", drained, timeout)


@pytest.fixture
async def pg_outbox(postgres_url: str) -> AsyncIterator[Outbox]:
    box = Outbox(postgres_url)
    await box.tables.create_all(box.engine)
    yield box
    await box.engine.dispose()


def message(topic: str, key: str, value: bytes, **kw: Any) -> OutboxMessage:
    return OutboxMessage(topic=topic, key=key.encode(), value=value, **kw)


def values(records: list[Any]) -> list[bytes]:
    return [r.value for r in records]


# -- item 5: what can never succeed is parked at once; outages never park ---------------


async def test_row_for_an_invalid_topic_is_parked_at_once_and_other_topics_go_on(
    pg_outbox: Outbox, kafka_settings: KafkaSettings, new_topic: Any
) -> None:
    box = pg_outbox
    good = await new_topic(partitions=1)
    settings = kafka_settings.with_options(request_timeout_ms=10_000)
    await box.add(
        message("no such topic!", "saga-1", b"never"),
        message(good, "saga-1", b"same key, other topic"),
        message(good, "saga-2", b"other key"),
    )
    relay = Relay(box.store, KafkaPublisher(settings), FAST)
    started = time.monotonic()
    async with relay:
        await box.wait_drained(timeout=8)
        parked = await box.store.parked()
    took = time.monotonic() - started

    assert [p.message.topic for p in parked] == ["no such topic!"]
    assert "topic" in parked[0].error.lower()
    assert took < 5, f"parking waited {took:.1f}s (the request timeout is 10s)"
    assert relay.stats.parked == 1
    received = values(await read_topic(settings, good, 2))
    assert received == [b"same key, other topic", b"other key"]


async def test_row_for_a_new_topic_during_a_broker_outage_is_not_parked(
    pg_outbox: Outbox, own_broker: EmbeddedBroker
) -> None:
    box = pg_outbox
    settings = own_broker.kafka_settings(request_timeout_ms=2000, linger_ms=2)
    await ensure_topics(settings, {"warm-up": 1})
    relay = Relay(box.store, KafkaPublisher(settings), FAST)
    async with relay:
        await box.add(message("warm-up", "k", b"before"))
        await box.wait_drained()
        own_broker.pause()
        try:
            await box.add(message("fresh", "k", b"during the outage"))
            await asyncio.sleep(5)  # two and a half request timeouts
            assert (await box.store.stats()).parked == 0
            assert relay.stats.failed_attempts > 0  # the outage is felt and retried
        finally:
            own_broker.resume()
        await ensure_topics(settings, {"fresh": 1})
        await box.wait_drained(timeout=30)
    assert relay.stats.parked == 0
    assert values(await read_topic(settings, "fresh", 1)) == [b"during the outage"]


async def test_producer_whose_sender_died_is_replaced(
    pg_outbox: Outbox, kafka_settings: KafkaSettings, new_topic: Any
) -> None:
    box = pg_outbox
    topic = await new_topic(partitions=1)
    publisher = KafkaPublisher(kafka_settings)
    async with Relay(box.store, publisher, FAST):
        await box.add(message(topic, "k", b"before"))
        await box.wait_drained()
        # aiokafka has no public way to crash its sender task; this takes the
        # path an unexpected error inside it takes ("Unexpected error in sender
        # routine"): the task ends, and every later send raises its error.
        producer = publisher._producer
        assert producer is not None
        accumulator = producer._message_accumulator
        accumulator._waiter_future.set_exception(KafkaError("sender crashed"))
        sender = producer._sender.sender_task
        await asyncio.wait([sender], timeout=5)
        assert sender.done()

        await box.add(message(topic, "k", b"after"))
        await box.wait_drained(timeout=15)
    assert values(await read_topic(kafka_settings, topic, 2)) == [b"before", b"after"]


# -- item 6: parked rows hold back their topic and key only; retry and discard ----------


async def test_parked_row_holds_back_neither_other_topics_nor_other_keys(
    pg_outbox: Outbox, kafka_settings: KafkaSettings, new_topic: Any
) -> None:
    box = pg_outbox
    orders, payments = await new_topic(partitions=1), await new_topic(partitions=1)
    small = kafka_settings.with_options(producer_options={"max_request_size": 4000})
    await box.add(
        message(orders, "saga-1", b"x" * 10_000),  # too large: parked
        message(orders, "saga-1", b"held back"),
        message(payments, "saga-1", b"compensation"),
        message(orders, "saga-2", b"other key"),
    )
    async with Relay(box.store, KafkaPublisher(small), FAST) as relay:

        async def settled() -> bool:
            stats = await box.store.stats()
            return stats.parked == 1 and stats.published == 2

        await box.wait("parked and published", settled)
    assert relay.stats.parked == 1
    assert values(await read_topic(kafka_settings, payments, 1)) == [b"compensation"]
    assert values(await read_topic(kafka_settings, orders, 1)) == [b"other key"]
    assert (await box.store.stats()).pending == 1  # "held back" waits behind the parked row


def saga_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "saga", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        input=stdin,
    )


async def park_too_large(box: Outbox, settings: KafkaSettings, topic: str) -> OutboxMessage:
    """Add a record too large for a small producer, and a later one of its key; park the first."""
    small = settings.with_options(producer_options={"max_request_size": 4000})
    big = message(topic, "saga-1", b"x" * 10_000)
    await box.add(big, message(topic, "saga-1", b"next"))
    async with Relay(box.store, KafkaPublisher(small), FAST):

        async def parked() -> bool:
            return (await box.store.stats()).parked == 1

        await box.wait("parked", parked)
    return big


async def test_outbox_retry_really_retries_once_the_cause_is_fixed(
    pg_outbox: Outbox, kafka_settings: KafkaSettings, new_topic: Any
) -> None:
    box = pg_outbox
    topic = await new_topic(partitions=1)
    big = await park_too_large(box, kafka_settings, topic)

    unknown = saga_cli("outbox", "retry", "no-such-id", "--database-url", box.url)
    assert unknown.returncode == 1
    assert "no parked row no-such-id" in unknown.stderr

    # The fix: a producer (and broker) that accept larger records.
    large = kafka_settings.with_options(producer_options={"max_request_size": 100_000})
    async with Relay(box.store, KafkaPublisher(large), FAST):
        retried = saga_cli("outbox", "retry", big.message_id, "--database-url", box.url)
        assert retried.returncode == 0, retried.stderr
        assert "released 1 parked row(s)" in retried.stdout
        await box.wait_drained()
    assert (await box.store.stats()).parked == 0
    assert values(await read_topic(kafka_settings, topic, 2)) == [b"x" * 10_000, b"next"]


async def test_outbox_discard_removes_parked_rows_after_confirmation(
    pg_outbox: Outbox, kafka_settings: KafkaSettings, new_topic: Any
) -> None:
    box = pg_outbox
    topic = await new_topic(partitions=1)
    big = await park_too_large(box, kafka_settings, topic)
    url = ("--database-url", box.url)

    declined = saga_cli("outbox", "discard", big.message_id, *url, stdin="n\n")
    assert declined.returncode == 1
    assert "nothing discarded" in declined.stdout
    assert (await box.store.stats()).parked == 1

    async with Relay(box.store, KafkaPublisher(kafka_settings), FAST):
        confirmed = saga_cli("outbox", "discard", big.message_id, *url, stdin="y\n")
        assert confirmed.returncode == 0, confirmed.stderr
        assert "discarded 1 parked row(s)" in confirmed.stdout
        await box.wait_drained()  # the row behind it goes on
    again = saga_cli("outbox", "discard", "--yes", big.message_id, *url)
    assert again.returncode == 1
    assert f"no parked row {big.message_id}" in again.stderr
    assert (await box.store.stats()).parked == 0
    assert values(await read_topic(kafka_settings, topic, 1)) == [b"next"]


# -- item 8: no payloads in the logs ----------------------------------------------------


async def test_relay_logs_of_a_failing_run_carry_no_payload(
    pg_outbox: Outbox,
    kafka_settings: KafkaSettings,
    new_topic: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    box = pg_outbox
    topic = await new_topic(partitions=1)
    marker = b"PAYLOAD-MARKER-4111111111111111"
    card = b"tok_SECRET_CARD_TOKEN"
    small = kafka_settings.with_options(producer_options={"max_request_size": 4000})
    await box.add(
        message(topic, "saga-1", marker * 300, headers=(("card", card),)),
        message("no such topic!", "saga-2", marker, headers=(("card", card),)),
        message(topic, "saga-1", marker, headers=(("card", card),)),
    )
    caplog.set_level(logging.INFO, logger="outbox")
    async with Relay(box.store, KafkaPublisher(small), FAST):

        async def parked() -> bool:
            return (await box.store.stats()).parked == 2

        await box.wait("parked", parked)
    logged = caplog.text
    assert logged.count("parked message") == 2  # the failures were logged ...
    for secret in (marker, card, base64.b64encode(marker)[:24], base64.b64encode(card)[:16]):
        assert secret.decode() not in logged  # ... without their payloads


# -- item 9: supervised background tasks --------------------------------------------------


def relay_process(url: str, settings: KafkaSettings, name: str, log: Path) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
        "KAFKA_ENABLE_IDEMPOTENCE": "true" if settings.enable_idempotence else "false",
    }
    with log.open("w") as stderr:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "saga",
                "relay",
                "--database-url",
                url,
                "--name",
                name,
                "--shards",
                "8",
                "--lease-ttl",
                "2",
                "--poll-interval",
                "0.2",
                "--stats-json",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )


def stop_process(process: subprocess.Popen[str]) -> tuple[int, dict[str, Any]]:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        out, _ = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()  # never leave a relay running behind a failed test
        process.communicate()
        raise
    lines = out.strip().splitlines()
    return process.returncode, (dict(json.loads(lines[-1])) if lines else {})


def libpq(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


async def terminate_blocked_next_due_query(url: str, timeout: float = 30.0) -> None:
    """Lock the outbox table until the relay's "next due" query waits on it; kill that backend.

    The relay reads due rows, then asks when the next one is due. Taking the
    lock again right after letting a blocked read through makes the lock wait
    behind that read, so that the "next due" query that follows blocks.
    """
    deadline = time.monotonic() + timeout
    locker = await psycopg.AsyncConnection.connect(libpq(url))
    watcher = await psycopg.AsyncConnection.connect(libpq(url), autocommit=True)
    try:
        while time.monotonic() < deadline:
            await locker.execute("LOCK TABLE outbox IN ACCESS EXCLUSIVE MODE")
            for _ in range(40):
                cursor = await watcher.execute(
                    "SELECT pid, query FROM pg_stat_activity WHERE datname = current_database()"
                    " AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
                )
                waiting = await cursor.fetchall()
                next_due = [pid for pid, query in waiting if query.startswith("SELECT min(")]
                if next_due:
                    await watcher.execute("SELECT pg_terminate_backend(%s)", next_due[:1])
                    return
                if waiting:
                    break  # the read of due rows blocked: let it through, lock again
                await asyncio.sleep(0.025)
            await locker.rollback()
    finally:
        await locker.close()  # ends the lock
        await watcher.close()
    raise AssertionError("the relay's next-due query never blocked on the lock")


async def test_relay_whose_next_due_query_is_terminated_keeps_publishing(
    pg_outbox: Outbox, kafka_settings: KafkaSettings, new_topic: Any, tmp_path: Path
) -> None:
    box = pg_outbox
    topic = await new_topic(partitions=1)
    log = tmp_path / "relay.log"
    relay = relay_process(box.url, kafka_settings, "relay-terminated", log)
    try:
        await box.add(message(topic, "k", b"before"))
        await box.wait_drained()
        await terminate_blocked_next_due_query(box.url)

        await box.add(message(topic, "k", b"after"))
        await box.wait_drained(timeout=20)
    finally:
        returncode, stats = stop_process(relay)
    assert returncode == 0, log.read_text()
    assert stats["published"] == 2
    assert stats["failed_attempts"] >= 1  # the lost connection was counted and retried
    assert values(await read_topic(kafka_settings, topic, 2)) == [b"before", b"after"]


async def test_relay_that_cannot_publish_exits_non_zero_and_gives_up_its_shards(
    pg_outbox: Outbox, kafka_settings: KafkaSettings, new_topic: Any, tmp_path: Path
) -> None:
    box = pg_outbox
    topic = await new_topic(partitions=1)
    log = tmp_path / "relay.log"
    relay = relay_process(box.url, kafka_settings, "relay-broken", log)
    try:
        await box.add(message(topic, "k", b"before"))
        await box.wait_drained()
        async with box.engine.begin() as conn:
            await conn.execute(sa.text("DROP TABLE outbox"))  # nothing can be read any more
        try:
            returncode = await asyncio.to_thread(relay.wait, 20)
        except subprocess.TimeoutExpired:
            returncode = None
    finally:
        stop_process(relay)
    assert returncode not in (0, None), log.read_text()
    assert "outbox" in log.read_text()
    async with box.engine.connect() as conn:
        owners = (await conn.execute(sa.select(box.tables.leases.c.owner))).scalars().all()
    assert set(owners) == {None}  # another relay can take every shard at once


async def test_database_error_of_a_write_carries_no_payload_even_in_its_traceback(
    pg_outbox: Outbox,
) -> None:
    """A logged traceback shows the error's causes: none may quote the row's values."""
    box = pg_outbox
    marker = b"PAYLOAD-MARKER-4111111111111111"
    await box.store.claim_shards("relay", timedelta(seconds=5))  # the outbox is set up
    await box.add(message("orders", "saga-0", b"first"))
    with pytest.raises(StoreError) as caught:
        async with box.engine.begin() as conn:
            # The application's own statement failed earlier in the transaction.
            with contextlib.suppress(sa.exc.DBAPIError):
                await conn.execute(sa.text("SELECT 1 / 0"))
            await box.store.add(conn, [message("orders", "saga-1", marker)])
    logged = "".join(traceback.format_exception(caught.value))
    assert "current transaction is aborted" in logged
    assert marker.decode() not in logged

"""Misconfiguration fails fast; outages do not.

A relay (``saga relay``, ``python -m services``, ``Service.start()``) started
against a database or directory that does not exist, tables never created,
an unreachable broker or a broker that refuses idempotent producers says so
in one line and stops with a non-zero exit within seconds. Once it has
started, an outage is waited out, and the relay's counters show it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine
from support import core_codec, read_topic

from outbox import (
    ConfigurationError,
    KafkaPublisher,
    KafkaSettings,
    MemoryPublisher,
    OutboxMessage,
    OutboxTables,
    PublishError,
    Relay,
    RelaySettings,
    SqlOutboxStore,
    StoredMessage,
    create_engine,
)
from outbox.store import LeaseFence
from saga.deadletter import DeadLetter
from saga.dlq import replay
from saga.errors import BrokerError
from saga.observe.abort import request_abort
from saga.service import Service

STARTS_WITHIN = 20.0
"""Seconds within which a misconfigured relay must have exited."""


def run(args: list[str], env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=STARTS_WITHIN + 40,  # a relay that never exits fails the test here
        check=False,
        env={**os.environ, **env},
    )
    took = time.monotonic() - started
    assert took < STARTS_WITHIN, f"took {took:.1f}s: {result.stderr[-2000:]}"
    return result


def relay(url: str, bootstrap: str, *extra: str, **env: str) -> subprocess.CompletedProcess[str]:
    return run(
        ["-m", "saga", "relay", "--database-url", url, "--bootstrap-servers", bootstrap, *extra],
        {"KAFKA_ENABLE_IDEMPOTENCE": "false", **env},
    )


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    """The single line a failed start prints (and nothing else)."""
    assert result.returncode != 0, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def missing_database_url() -> str:
    server = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    name = f"cstest_missing_{uuid.uuid4().hex}"
    return (
        make_url(server)
        .set(drivername="postgresql+psycopg", database=name)
        .render_as_string(hide_password=False)
    )


def closed_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"127.0.0.1:{port}"  # nothing listens there once the socket is closed


def test_relay_against_a_missing_postgres_database_exits_at_once(kafka_bootstrap: str) -> None:
    line = one_line(relay(missing_database_url(), kafka_bootstrap))
    assert "does not exist" in line


def test_relay_against_a_sqlite_file_in_a_missing_directory_exits_at_once(
    tmp_path: Path, kafka_bootstrap: str
) -> None:
    missing = tmp_path / "no" / "such" / "dir"
    line = one_line(relay(f"sqlite:///{missing / 'service.db'}", kafka_bootstrap))
    assert str(missing) in line
    assert not missing.exists()  # nothing was created on the way


def test_relay_without_its_tables_says_how_to_create_them(
    postgres_url: str, kafka_bootstrap: str
) -> None:
    line = one_line(relay(postgres_url, kafka_bootstrap))
    assert "outbox" in line
    assert "create_tables()" in line


def test_relay_against_an_unreachable_broker_exits_after_the_startup_timeout(
    postgres_url: str, tmp_path: Path
) -> None:
    bootstrap = closed_port()
    started = time.monotonic()
    line = one_line(relay(postgres_url, bootstrap, "--create-tables", "--startup-timeout", "3"))
    assert time.monotonic() - started >= 3  # it did wait for the broker
    assert bootstrap in line


def test_relay_against_a_broker_refusing_idempotent_producers_gives_the_fix(
    postgres_url: str, kafka_bootstrap: str
) -> None:
    result = relay(
        postgres_url, kafka_bootstrap, "--create-tables", KAFKA_ENABLE_IDEMPOTENCE="true"
    )
    line = one_line(result)
    assert "set KAFKA_ENABLE_IDEMPOTENCE=false" in line
    assert "idempotent producers" in line


def test_service_process_against_a_broker_refusing_idempotent_producers_exits(
    tmp_path: Path, kafka_bootstrap: str
) -> None:
    result = run(
        ["-m", "services", "order"],
        {
            "DATABASE_URL": f"sqlite:///{tmp_path / 'order.db'}",
            "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
            "KAFKA_ENABLE_IDEMPOTENCE": "true",
            "SAGA_TOPIC_PREFIX": f"startup-{uuid.uuid4().hex[:8]}.",
        },
    )
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("python -m services order:")
    assert "set KAFKA_ENABLE_IDEMPOTENCE=false" in last
    assert "Traceback" not in result.stderr


async def test_service_start_without_its_tables_says_how_to_create_them(
    postgres_url: str, kafka_settings: KafkaSettings
) -> None:
    engine = create_engine(postgres_url)
    try:
        service = Service("orders", engine=engine, kafka=kafka_settings, codec=core_codec())
        with pytest.raises(ConfigurationError, match=r"create_tables\(\)"):
            await service.start()
        await service.stop()
    finally:
        await engine.dispose()


async def test_relay_start_against_a_broker_refusing_idempotent_producers_raises(
    postgres_url: str, kafka_settings: KafkaSettings
) -> None:
    engine = create_engine(postgres_url)
    tables = OutboxTables()
    await tables.create_all(engine)
    settings = kafka_settings.with_options(enable_idempotence=True)
    relay_ = Relay(SqlOutboxStore(engine, tables), KafkaPublisher(settings))
    try:
        with pytest.raises(PublishError, match="KAFKA_ENABLE_IDEMPOTENCE=false"):
            async with asyncio.timeout(STARTS_WITHIN):
                await relay_.start()
    finally:
        await relay_.stop()
        await engine.dispose()


async def test_relay_on_an_engine_of_another_postgres_driver_is_refused_at_start(
    postgres_url: str, kafka_settings: KafkaSettings
) -> None:
    """The relay reads and marks through psycopg 3 (autocommit, unprepared, array literals):
    an engine of another driver is refused at start, saying what to use, not at its first round."""
    engine = create_async_engine(make_url(postgres_url).set(drivername="postgresql+asyncpg"))
    tables = OutboxTables()
    await tables.create_all(engine)
    relay_ = Relay(SqlOutboxStore(engine, tables), KafkaPublisher(kafka_settings))
    try:
        with pytest.raises(ConfigurationError, match="psycopg"):
            async with asyncio.timeout(STARTS_WITHIN):
                await relay_.start()
    finally:
        await relay_.stop()
        await engine.dispose()


class StopFailsPublisher(KafkaPublisher):
    async def stop(self) -> None:
        raise PublishError("the producer would not close", retriable=False)


async def test_a_publisher_that_fails_to_stop_after_a_failed_start_is_logged_not_hidden(
    postgres_url: str, kafka_settings: KafkaSettings, caplog: pytest.LogCaptureFixture
) -> None:
    engine = create_engine(postgres_url)  # no tables: the start fails
    relay_ = Relay(SqlOutboxStore(engine, OutboxTables()), StopFailsPublisher(kafka_settings))
    try:
        with pytest.raises(ConfigurationError, match=r"create_tables\(\)"):
            await relay_.start()
    finally:
        await engine.dispose()
    assert "the producer would not close" in caplog.text
    assert "failed start" in caplog.text


async def kill_blocked_queries(url: str, *, times: int) -> None:
    """Lock the outbox until a relay query waits on it, then terminate that query's backend."""
    conninfo = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    locker = await psycopg.AsyncConnection.connect(conninfo)
    watcher = await psycopg.AsyncConnection.connect(conninfo, autocommit=True)
    try:
        deadline = time.monotonic() + 30
        for _ in range(times):
            await locker.execute("LOCK TABLE outbox IN ACCESS EXCLUSIVE MODE")
            while True:
                assert time.monotonic() < deadline, "no relay query ever waited on the lock"
                cursor = await watcher.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND wait_event_type = 'Lock'"
                    " AND pid <> pg_backend_pid()"
                )
                if await cursor.fetchall():
                    break
                await asyncio.sleep(0.02)
            await locker.rollback()
    finally:
        await locker.close()
        await watcher.close()


async def test_database_outage_after_start_is_retried_and_counted(
    postgres_url: str, kafka_settings: KafkaSettings, new_topic: object, tmp_path: Path
) -> None:
    topic = await new_topic(partitions=1)  # type: ignore[operator]
    engine = create_engine(postgres_url)
    tables = OutboxTables()
    await tables.create_all(engine)
    store = SqlOutboxStore(engine, tables, shards=8)
    log = tmp_path / "relay.log"
    with log.open("w") as stderr:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "saga",
                "relay",
                "--database-url",
                postgres_url,
                "--shards",
                "8",
                "--poll-interval",
                "0.1",
                "--stats-json",
            ],
            env={
                **os.environ,
                "KAFKA_BOOTSTRAP_SERVERS": kafka_settings.bootstrap_servers,
                "KAFKA_ENABLE_IDEMPOTENCE": "false",
            },
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    try:
        async with engine.begin() as conn:
            await store.add(conn, [OutboxMessage(topic=topic, key=b"k", value=b"before")])
        await read_topic(kafka_settings, topic, 1)
        # The outage: three times, the relay's query is killed under it.
        await kill_blocked_queries(postgres_url, times=3)
        async with engine.begin() as conn:
            await store.add(conn, [OutboxMessage(topic=topic, key=b"k", value=b"after")])
        records = await read_topic(kafka_settings, topic, 2)
        assert [r.value for r in records] == [b"before", b"after"]
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=30)
        await engine.dispose()
    assert process.returncode == 0, log.read_text()
    stats = json.loads(out.strip().splitlines()[-1])
    assert stats["published"] == 2
    assert stats["failed_attempts"] > 0, log.read_text()


class StoreWithoutDelete(SqlOutboxStore):
    """A store written before ``mark_published`` took ``delete``."""

    async def mark_published(
        self, messages: Sequence[StoredMessage], *, fence: LeaseFence | None = None
    ) -> int:
        return await super().mark_published(messages, fence=fence)


async def test_a_store_that_cannot_delete_is_refused_before_a_relay_keeping_no_rows_sends(
    sqlite_url: str,
) -> None:
    """Retention zero with a store whose mark cannot delete: refused up front.

    Not found out after the first batch went out (a TypeError that stopped
    the relay with the batch still pending, sent again at every restart).
    The same store still serves a relay that keeps published rows.
    """
    engine = create_engine(sqlite_url)
    try:
        tables = OutboxTables()
        await tables.create_all(engine)
        store = StoreWithoutDelete(engine, tables)
        async with engine.begin() as conn:
            await store.add(conn, [OutboxMessage(topic="orders", key=b"k", value=b"v")])
        publisher = MemoryPublisher()

        with pytest.raises(ConfigurationError, match="delete"):
            async with Relay(store, publisher, RelaySettings(retention=timedelta(0))):
                await asyncio.sleep(1)  # time enough to publish the row
        assert publisher.records == []
        assert (await store.stats()).pending == 1

        async with Relay(store, publisher, RelaySettings()):
            async with asyncio.timeout(10):
                while (await store.stats()).published < 1:
                    await asyncio.sleep(0.05)
        assert [r.value for r in publisher.records] == [b"v"]
    finally:
        await engine.dispose()


async def test_abort_and_dlq_replay_against_a_broker_refusing_idempotent_producers_give_the_fix(
    kafka_settings: KafkaSettings,
) -> None:
    """`saga abort` and `saga dlq replay` publish with a producer of their own: against a
    broker that refuses idempotent producers, they say what to set, as the relay does
    (they said "UnknownError", nothing more)."""
    settings = kafka_settings.with_options(enable_idempotence=True)
    with pytest.raises(BrokerError, match="set KAFKA_ENABLE_IDEMPOTENCE=false"):
        async with asyncio.timeout(STARTS_WITHIN):
            await request_abort(
                settings,
                core_codec(),
                topic="saga.trip",
                saga_name="trip",
                saga_id="t1",
                reason="-",
            )
    letter = DeadLetter(
        topic="trip.dlq",
        partition=0,
        offset=0,
        key=b"t1",
        value=b"v",
        headers=(),
        info={"topic": "saga.trip"},
        timestamp=datetime.now(UTC),
    )
    with pytest.raises(BrokerError, match="set KAFKA_ENABLE_IDEMPOTENCE=false"):
        async with asyncio.timeout(STARTS_WITHIN):
            await replay(settings, [letter])

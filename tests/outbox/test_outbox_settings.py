"""Configuration is refused where it is written, and secrets never leak.

KafkaSettings, OutboxTables names, RelaySettings, RetryPolicy and the engines
the stores accept.
"""

from __future__ import annotations

import sqlite3
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

import outbox
from outbox import (
    ConfigurationError,
    InboxSettings,
    KafkaSettings,
    OutboxMessage,
    OutboxTables,
    RelaySettings,
    RetryPolicy,
    SqlInboxStore,
    SqlOutboxStore,
)
from outbox.database import read_connection

PASSWORD = "s3cr3t-Pa55word"


# -- KafkaSettings --------------------------------------------------------------


def test_sasl_plain_over_plaintext_is_refused_without_echoing_the_password() -> None:
    with pytest.raises(ConfigurationError, match="SASL_SSL") as caught:
        KafkaSettings(
            security_protocol="SASL_PLAINTEXT",
            sasl_mechanism="PLAIN",
            sasl_username="svc",
            sasl_password=PASSWORD,
        )

    assert PASSWORD not in str(caught.value)


def test_sasl_plain_over_tls_is_accepted() -> None:
    settings = KafkaSettings(
        security_protocol="SASL_SSL",
        sasl_mechanism="PLAIN",
        sasl_username="svc",
        sasl_password=PASSWORD,
    )

    assert settings.sasl_mechanism == "PLAIN"
    assert settings.security_protocol == "SASL_SSL"


def test_scram_over_sasl_plaintext_is_accepted() -> None:
    settings = KafkaSettings(
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="svc",
        sasl_password=PASSWORD,
    )

    assert settings.sasl_mechanism == "SCRAM-SHA-512"


@pytest.mark.parametrize(
    "options",
    [
        {"security_protocol": "SASL_SSL", "sasl_mechanism": "GSSAPI"},
        {"security_protocol": "SASL_SSL", "sasl_mechanism": "PLAIN", "sasl_password": None},
        {"security_protocol": "PLAINTEXT", "sasl_mechanism": "PLAIN"},
        {"security_protocol": "TLS"},
    ],
    ids=["unknown mechanism", "no password", "credentials without SASL", "unknown protocol"],
)
def test_inconsistent_security_settings_are_refused(options: dict[str, Any]) -> None:
    values: dict[str, Any] = {"sasl_username": "svc", "sasl_password": PASSWORD, **options}

    with pytest.raises(ConfigurationError):
        KafkaSettings(**values)


def test_password_never_appears_in_repr_or_str() -> None:
    settings = KafkaSettings(
        bootstrap_servers="kafka-1:9093",
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-256",
        sasl_username="svc",
        sasl_password=PASSWORD,
    )

    for text in (repr(settings), str(settings), f"{settings}", repr(settings.with_options())):
        assert PASSWORD not in text
        assert "kafka-1:9093" in text
        assert "svc" in text


def test_from_env_reads_the_conventional_variables() -> None:
    env = {
        "KAFKA_BOOTSTRAP_SERVERS": "kafka-1:9093,kafka-2:9093",
        "KAFKA_CLIENT_ID": "orders",
        "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "KAFKA_SASL_USERNAME": "svc",
        "KAFKA_SASL_PASSWORD": PASSWORD,
        "KAFKA_ENABLE_IDEMPOTENCE": "false",
    }

    settings = KafkaSettings.from_env(env)

    assert settings.bootstrap_servers == "kafka-1:9093,kafka-2:9093"
    assert settings.client_id == "orders"
    assert settings.security_protocol == "SASL_SSL"
    assert settings.sasl_mechanism == "SCRAM-SHA-512"
    assert (settings.sasl_username, settings.sasl_password) == ("svc", PASSWORD)
    assert settings.enable_idempotence is False
    assert settings.producer_kwargs()["enable_idempotence"] is False
    assert PASSWORD not in repr(settings)


def test_from_env_keyword_arguments_override_the_environment() -> None:
    settings = KafkaSettings.from_env(
        {"KAFKA_BOOTSTRAP_SERVERS": "from-env:9092"}, bootstrap_servers="from-code:9092"
    )

    assert settings.bootstrap_servers == "from-code:9092"


def test_from_env_reads_the_consumer_and_producer_tuning() -> None:
    env = {
        "KAFKA_FETCH_MAX_WAIT_MS": "25",
        "KAFKA_SESSION_TIMEOUT_MS": "6000",
        "KAFKA_HEARTBEAT_INTERVAL_MS": "1000",
        "KAFKA_MAX_POLL_RECORDS": "50",
        "KAFKA_REQUEST_TIMEOUT_MS": "9000",
        "KAFKA_LINGER_MS": "0",
        "KAFKA_MAX_BATCH_SIZE": "131072",
        "KAFKA_ACKS": "1",
    }

    settings = KafkaSettings.from_env(env)

    consumer = settings.consumer_kwargs("payments")
    assert consumer["fetch_max_wait_ms"] == 25
    assert consumer["session_timeout_ms"] == 6000
    assert consumer["heartbeat_interval_ms"] == 1000
    assert consumer["max_poll_records"] == 50
    assert consumer["request_timeout_ms"] == 9000
    producer = settings.producer_kwargs()
    assert (producer["linger_ms"], producer["acks"]) == (0, 1)
    assert producer["max_batch_size"] == 131072


def test_the_producer_fills_record_batches_of_64_kib_by_default() -> None:
    """A relay round of 500 small messages over 8 partitions: one record batch per partition."""
    assert KafkaSettings().producer_kwargs()["max_batch_size"] == 65536


@pytest.mark.parametrize(
    ("variable", "raw"),
    [("KAFKA_SESSION_TIMEOUT_MS", "ten"), ("KAFKA_FETCH_MAX_WAIT_MS", "-1"), ("KAFKA_ACKS", "2")],
)
def test_from_env_names_the_variable_with_a_bad_value(variable: str, raw: str) -> None:
    with pytest.raises(ConfigurationError, match=variable):
        KafkaSettings.from_env({variable: raw})


def test_from_env_refuses_an_ambiguous_boolean() -> None:
    with pytest.raises(ConfigurationError, match="KAFKA_ENABLE_IDEMPOTENCE"):
        KafkaSettings.from_env({"KAFKA_ENABLE_IDEMPOTENCE": "maybe"})


def test_defaults_are_the_safe_ones() -> None:
    settings = KafkaSettings()

    assert settings.acks == "all"
    assert settings.enable_idempotence is True
    producer = settings.producer_kwargs()
    assert (producer["acks"], producer["enable_idempotence"]) == ("all", True)
    consumer = settings.consumer_kwargs("orders")
    assert consumer["enable_auto_commit"] is False
    assert consumer["auto_offset_reset"] == "earliest"
    assert consumer["group_id"] == "orders"


@pytest.mark.parametrize(
    "options",
    [{"enable_auto_commit": True}, {"group_id": "sneaky"}, {"bootstrap_servers": "other:9092"}],
    ids=["auto commit", "group id", "bootstrap servers"],
)
def test_consumer_options_may_not_override_what_the_runtime_owns(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError, match="consumer_options"):
        KafkaSettings(consumer_options=options)


def test_pass_through_options_reach_the_clients() -> None:
    settings = KafkaSettings(
        producer_options={"compression_type": "gzip"},
        consumer_options={"isolation_level": "read_committed"},
    )

    assert settings.producer_kwargs()["compression_type"] == "gzip"
    assert settings.consumer_kwargs(None)["isolation_level"] == "read_committed"
    assert settings.consumer_kwargs(None)["enable_auto_commit"] is False


@pytest.mark.parametrize(
    "options",
    [
        {"bootstrap_servers": "  "},
        {"acks": 2},
        {"linger_ms": -1},
        {"session_timeout_ms": 2000, "heartbeat_interval_ms": 2000},
        {"max_poll_records": 0},
        {"max_batch_size": 100},
    ],
    ids=[
        "no brokers",
        "acks 2",
        "negative linger",
        "heartbeat not below session",
        "no records",
        "tiny record batches",
    ],
)
def test_bad_kafka_values_are_refused(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        KafkaSettings(**options)


# -- OutboxTables -------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["outbox; drop table x", "Outbox", "1abc", "", "a" * 41, 'out"box'],
    ids=["injection", "upper case", "leading digit", "empty", "too long", "quote"],
)
def test_unsafe_table_names_are_refused(name: str) -> None:
    with pytest.raises(ConfigurationError):
        OutboxTables(outbox=name)
    with pytest.raises(ConfigurationError):
        OutboxTables(inbox=name)
    with pytest.raises(ConfigurationError):
        OutboxTables(schema=name)


def test_table_names_must_differ() -> None:
    with pytest.raises(ConfigurationError):
        OutboxTables(outbox="messages", inbox="messages")


async def test_custom_table_names_work_end_to_end(sqlite_url: str) -> None:
    tables = OutboxTables(
        outbox="orders_outbox",
        inbox="orders_inbox",
        leases="orders_leases",
        relays="orders_relays",
    )
    engine = outbox.create_engine(sqlite_url)
    try:
        await tables.create_all(engine)
        store = SqlOutboxStore(engine, tables)
        inbox = SqlInboxStore(engine, tables)
        sent = OutboxMessage(topic="orders", key=b"1", value=b"placed")
        async with engine.begin() as conn:
            await store.add(conn, [sent])
            assert await inbox.record(conn, "payments", "m-1", source="/orders") is True

        (fetched,) = await store.fetch_due(set(range(store.shards)), 10)
        assert (fetched.message_id, fetched.value) == (sent.message_id, b"placed")
        assert await store.claim_shards("relay-1", timedelta(seconds=1)) == frozenset(
            range(store.shards)
        )
        async with engine.connect() as conn:
            names = await conn.run_sync(lambda sync: sa.inspect(sync).get_table_names())
        assert set(names) == {"orders_outbox", "orders_inbox", "orders_leases", "orders_relays"}
    finally:
        await engine.dispose()


# -- RelaySettings, InboxSettings, RetryPolicy -------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {"batch_size": 0},
        {"batch_size": 2**63},
        {"batch_size": True},
        {"poll_interval": timedelta(0)},
        {"lease_ttl": timedelta(milliseconds=500)},
        {"retention": timedelta(seconds=-1)},
        {"retention": 0},
        {"cleanup_interval": 60},
        {"cleanup_batch_size": -1},
    ],
    ids=[
        "no batch",
        "batch no database takes",
        "batch size a bool",
        "zero poll",
        "short lease",
        "negative retention",
        "retention not a timedelta",
        "interval not a timedelta",
        "negative cleanup batch",
    ],
)
def test_bad_relay_settings_are_refused(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        RelaySettings(**options)


def test_a_relay_may_keep_no_published_rows() -> None:
    """Retention zero is valid: the relay deletes rows as it publishes them."""
    assert RelaySettings(retention=timedelta(0)).retention == timedelta(0)


def test_relay_settings_defaults_are_valid_and_retry_forever() -> None:
    settings = RelaySettings()

    assert settings.backoff.maximum_attempts == 0  # a relay never gives up on the broker
    assert settings.lease_ttl >= timedelta(seconds=1)


@pytest.mark.parametrize(
    "options",
    [{"retention": timedelta(0)}, {"purge_interval": timedelta(-1)}, {"purge_batch_size": 0}],
    ids=["no retention", "negative interval", "no batch"],
)
def test_bad_inbox_settings_are_refused(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        InboxSettings(**options)


@pytest.mark.parametrize(
    "options",
    [
        {"initial_interval": timedelta(0)},
        {"initial_interval": timedelta(seconds=5), "maximum_interval": timedelta(seconds=1)},
        {"backoff_coefficient": 0.5},
        {"maximum_attempts": -1},
        {"jitter": timedelta(seconds=-1)},
    ],
    ids=["zero interval", "max below initial", "shrinking", "negative attempts", "negative jitter"],
)
def test_bad_retry_policies_are_refused(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        RetryPolicy(**options)


def test_retry_delays_grow_and_are_capped() -> None:
    policy = RetryPolicy(
        initial_interval=timedelta(milliseconds=100),
        backoff_coefficient=2.0,
        maximum_interval=timedelta(milliseconds=350),
    )

    assert [policy.delay(n) for n in (1, 2, 3, 4)] == [0.1, 0.2, 0.35, 0.35]


def test_store_refuses_a_bad_shard_count(sqlite_url: str) -> None:
    engine = outbox.create_engine(sqlite_url)
    for shards in (0, 4097):
        with pytest.raises(ConfigurationError):
            SqlOutboxStore(engine, OutboxTables(), shards=shards)


# -- engines ----------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["sqlite+aiosqlite://", "sqlite+aiosqlite:///:memory:"])
def test_in_memory_sqlite_is_refused_with_a_clear_error(url: str) -> None:
    with pytest.raises(ConfigurationError, match="database file"):
        outbox.create_engine(url)


def test_unsupported_database_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="not supported"):
        outbox.create_engine("mysql+aiomysql://user@localhost/db")


async def test_sqlite_engine_must_be_configured_before_the_stores_accept_it(
    sqlite_url: str,
) -> None:
    engine = create_async_engine(sqlite_url)
    try:
        tables = OutboxTables()
        with pytest.raises(ConfigurationError, match="configure_sqlite"):
            SqlOutboxStore(engine, tables)
        with pytest.raises(ConfigurationError, match="configure_sqlite"):
            SqlInboxStore(engine, tables)

        outbox.configure_sqlite(engine)
        outbox.configure_sqlite(engine)  # idempotent

        await tables.create_all(engine)
        store = SqlOutboxStore(engine, tables)
        sent = OutboxMessage(topic="orders", value=b"placed")
        async with engine.begin() as conn:
            await store.add(conn, [sent])
        fetched = await store.fetch_due(set(range(store.shards)), 10)
        assert [m.message_id for m in fetched] == [sent.message_id]
    finally:
        await engine.dispose()


async def _busy_timeout_ms(engine: Any) -> int:
    try:
        async with engine.connect() as conn:
            return int((await conn.exec_driver_sql("PRAGMA busy_timeout")).scalar_one())
    finally:
        await engine.dispose()


async def test_a_sqlite_engine_waits_for_a_lock_as_long_as_its_timeout_says(
    sqlite_url: str,
) -> None:
    """``connect_args={"timeout": ...}`` is sqlite3's own knob for how long a statement
    waits for another writer before "database is locked"; the library's default (30 s)
    applies only where the caller gave none, and ``configure_sqlite`` takes its own."""
    assert await _busy_timeout_ms(outbox.create_engine(sqlite_url)) == 30_000
    given = outbox.create_engine(sqlite_url, connect_args={"timeout": 0.25})
    assert await _busy_timeout_ms(given) == 250
    other_args = outbox.create_engine(sqlite_url, connect_args={"check_same_thread": False})
    assert await _busy_timeout_ms(other_args) == 30_000
    own = create_async_engine(sqlite_url)
    outbox.configure_sqlite(own, busy_timeout=2.5)
    assert await _busy_timeout_ms(own) == 2_500
    with pytest.raises(ConfigurationError, match="busy_timeout"):
        outbox.configure_sqlite(create_async_engine(sqlite_url), busy_timeout=float("nan"))


async def test_configure_sqlite_keeps_the_timeout_the_engine_was_created_with(
    sqlite_url: str,
) -> None:
    """The README's knob, ``connect_args={"timeout": ...}``, on an engine the user
    makes with ``create_async_engine`` and then ``configure_sqlite``: statements
    wait 2 s for a lock, not the library's 30 s."""
    own = create_async_engine(sqlite_url, connect_args={"timeout": 2})
    outbox.configure_sqlite(own)
    assert await _busy_timeout_ms(own) == 2_000


async def test_a_second_timeout_for_a_configured_engine_is_not_dropped_silently(
    sqlite_url: str,
) -> None:
    """``configure_sqlite(engine, busy_timeout=60)`` on an engine from ``create_engine``
    (timeout 5 s) must not leave the caller believing statements wait 60 s."""
    engine = outbox.create_engine(sqlite_url, connect_args={"timeout": 5})
    with pytest.raises(ConfigurationError, match="busy_timeout"):
        outbox.configure_sqlite(engine, busy_timeout=60)
    assert await _busy_timeout_ms(engine) == 5_000


def test_a_timeout_that_is_not_a_number_names_the_option_given(sqlite_url: str) -> None:
    with pytest.raises(ConfigurationError, match=r'connect_args\["timeout"\]'):
        outbox.create_engine(sqlite_url, connect_args={"timeout": "5"})


async def test_sqlite_reads_neither_wait_for_a_writer_nor_hold_one_up(sqlite_url: str) -> None:
    """A read (the outbox's counts and parked rows, any read_connection) sees what is
    committed while another connection holds the write lock, instead of failing with
    "database is locked" after the busy timeout; a writer commits while a read is open.
    A transaction that may write still takes the write lock as it begins."""
    engine = outbox.create_engine(sqlite_url, connect_args={"timeout": 0.5})
    writer = sqlite3.connect(str(engine.url.database), isolation_level=None, timeout=0)
    try:
        tables = OutboxTables()
        await tables.create_all(engine)
        store = SqlOutboxStore(engine, tables)
        async with engine.begin() as conn:
            await store.add(conn, [OutboxMessage(topic="orders", value=b"placed")])

        writer.execute("BEGIN IMMEDIATE")
        writer.execute("DELETE FROM outbox")
        assert (await store.stats()).pending == 1
        assert await store.parked() == []
        writer.execute("ROLLBACK")

        count = sa.select(sa.func.count()).select_from(tables.outbox)
        async with read_connection(engine) as conn:
            assert (await conn.execute(count)).scalar_one() == 1
            writer.execute("BEGIN IMMEDIATE")
            writer.execute("DELETE FROM outbox")
            writer.execute("COMMIT")
            assert (await conn.execute(count)).scalar_one() == 1  # one snapshot
        assert (await store.stats()).pending == 0

        async with engine.begin():
            with pytest.raises(sqlite3.OperationalError, match="database is locked"):
                writer.execute("BEGIN IMMEDIATE")
    finally:
        writer.close()
        await engine.dispose()


async def test_a_batch_of_the_most_rows_relay_settings_take_is_marked_on_sqlite(
    sqlite_url: str,
) -> None:
    """RelaySettings takes batch_size up to MAX_BATCH_SIZE, said to be below a database's
    limit on a statement's parameters. SQLite's default limit is 32,766 variables (since
    3.32; Debian raises it to 250,000, which is why this machine does not show it): the
    relay's mark binds two per row, so a batch it was allowed to read and publish could
    never be marked (a permanent error: the relay stops, and publishes it again on restart)."""
    from sqlalchemy import event
    from sqlalchemy.util import await_only

    from outbox.settings import MAX_BATCH_SIZE

    engine = outbox.create_engine(sqlite_url)

    @event.listens_for(engine.sync_engine, "connect")
    def default_build(dbapi_connection: Any, _record: Any) -> None:
        raw = dbapi_connection._connection  # aiosqlite's; the sqlite3 one lives in its thread
        await_only(raw._execute(raw._conn.setlimit, sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 32766))

    try:
        assert RelaySettings(batch_size=MAX_BATCH_SIZE).batch_size == MAX_BATCH_SIZE
        tables = OutboxTables()
        await tables.create_all(engine)
        store = SqlOutboxStore(engine, tables)
        messages = [
            OutboxMessage(topic="t", key=b"k%d" % (n % 16), value=b"v")
            for n in range(MAX_BATCH_SIZE)
        ]
        for first in range(0, MAX_BATCH_SIZE, 10_000):
            async with engine.begin() as conn:
                await store.add(conn, messages[first : first + 10_000])
        batch = await store.fetch_due(set(range(store.shards)), MAX_BATCH_SIZE)
        assert len(batch) == MAX_BATCH_SIZE
        assert await store.mark_published(batch) == MAX_BATCH_SIZE
    finally:
        await engine.dispose()

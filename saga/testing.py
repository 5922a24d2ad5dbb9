"""A test harness for your own sagas: in memory in milliseconds, or on real servers.

Register services and handlers as in production, start a saga, and wait for
it to end::

    async with SagaHarness(codec) as harness:
        flights = harness.service("flights")
        ...                                   # @flights.step(...), as in production
        await harness.start()
        await harness.start_saga("trips", "book_trip", saga_id="trip-1", ...)
        run = await harness.run_until_ended("trip-1")
        assert run.status is SagaStatus.COMPLETED
        assert run.stamps["hotels"].step("book_room").data == {"room": "301"}
        assert harness.published("example.trips.SeatBooked")

By default the harness runs without a broker: each service's relay publishes
to an in-memory log (:class:`InMemoryBroker`) and each service's consumer is
an :class:`InMemoryConsumer` (the service's ``consumer=`` seam, where Kafka's
is the default), which hands it every record of its topics, in order and in
batches of what has arrived, through the same pipeline as the Kafka consumer. The services
start and stop exactly as in production. The
databases are SQLite files in a temporary directory. Give ``kafka=`` (and,
for PostgreSQL, ``database_url=``) and the very same test runs on a real
broker and real databases, with each service's own Kafka consumer.

:meth:`SagaHarness.fail_step` makes a step raise, so that tests can check
retries and compensations without writing failing handlers.

What the in-memory transport does not model: partitions (a topic is one
ordered log per consuming service), rebalances and redelivery after a crash.
Those stay the business of the tests against real servers.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

from aiokafka import ConsumerRecord
from sqlalchemy.ext.asyncio import AsyncSession

from outbox import (
    KafkaPublisher,
    KafkaSettings,
    Publisher,
    PublishError,
    RelaySettings,
    ensure_topics,
)
from outbox.message import StoredMessage
from saga.choreography import SagaHandler
from saga.codec import AvroCodec
from saga.consumer import Consumer, Process
from saga.context import SagaContext
from saga.envelope import Envelope, EnvelopeCodec
from saga.errors import ConfigurationError
from saga.service import Service, ServiceSettings
from saga.stamp import SagaStatus, Stamp

__all__ = ["InMemoryBroker", "InMemoryConsumer", "SagaHarness", "SagaRun"]

log = logging.getLogger(__name__)

_POLL = 0.005
"""Seconds between looks at the databases while waiting (in memory)."""

_BATCH_MAX = 50
"""The most records handed to a service at once (in memory)."""


@dataclass(frozen=True)
class _Record:
    topic: str
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]


class InMemoryBroker(Publisher):
    """A publisher that appends records to in-memory topic logs.

    Every consumer reads a topic from its own cursor, in publish order. The
    harness uses it as every service's publisher in place of Kafka.
    """

    def __init__(self) -> None:
        self.topics: dict[str, list[_Record]] = defaultdict(list)
        self.changed = asyncio.Event()

    async def send(self, message: StoredMessage) -> Awaitable[None]:
        headers = tuple((name, value or b"") for name, value in message.headers)
        self.topics[message.topic].append(
            _Record(message.topic, message.key, message.value, headers)
        )
        self.changed.set()
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


class _Recording(Publisher):
    """Passes records on to Kafka and keeps a copy of those acknowledged."""

    def __init__(self, inner: Publisher, log: list[_Record]) -> None:
        self.inner = inner
        self.log = log

    async def start(self) -> None:
        await self.inner.start()

    async def stop(self) -> None:
        await self.inner.stop()

    async def send(self, message: StoredMessage) -> Awaitable[None]:
        ack = await self.inner.send(message)

        async def recorded() -> None:
            await ack
            self.log.append(_record(message))

        return recorded()

    async def publish(self, batch: Sequence[StoredMessage]) -> list[PublishError | None]:
        # The inner publisher's own batch path (per-partition lanes on Kafka):
        # the base class's record-by-record sends would pipeline a key's
        # records, which without the idempotent producer may land a key's
        # next record although the previous one never did.
        outcomes = await self.inner.publish(batch)
        acknowledged = zip(batch, outcomes, strict=True)
        self.log.extend(_record(message) for message, error in acknowledged if error is None)
        return outcomes


def _record(message: StoredMessage) -> _Record:
    return _Record(
        message.topic,
        message.key,
        message.value,
        tuple((name, value or b"") for name, value in message.headers),
    )


@dataclass(frozen=True)
class SagaRun:
    """How a saga ended, as every service that took part saw it."""

    saga_id: str
    """The saga."""

    status: SagaStatus
    """Its terminal status (as the initiator recorded it)."""

    stamps: Mapping[str, Stamp]
    """Each participant's final view of the saga, by service name."""


class InMemoryConsumer(Consumer):
    """Hands a service every record of its topics from an :class:`InMemoryBroker`, in order.

    The in-memory side of :class:`~saga.consumer.Consumer`: the service runs
    exactly as with Kafka (``Service.start`` starts it), one ordered log per
    topic, no partitions and no rebalances. What has arrived on a topic is
    handed over as one batch (at most ``batch_max_records``), as the Kafka
    consumer does.
    """

    def __init__(
        self,
        broker: InMemoryBroker,
        topics: frozenset[str],
        process: Process,
        *,
        batch_max_records: int = _BATCH_MAX,
    ) -> None:
        if batch_max_records < 1:
            raise ConfigurationError("batch_max_records must be positive")
        self.batch_max_records = batch_max_records
        self.broker = broker
        self.topics = topics
        self.process = process
        self.cursors: dict[str, int] = {}
        self.busy = False
        self.assigned = asyncio.Event()
        self.failure: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.failure = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._deliver(), name="in-memory-consumer")
        self._task.add_done_callback(self._watch)
        self.assigned.set()

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def caught_up(self) -> bool:
        """No record is being handled and none waits."""
        return not self.busy and all(
            self.cursors.get(topic, 0) >= len(self.broker.topics.get(topic, ()))
            for topic in self.topics
        )

    def _watch(self, task: asyncio.Task[None]) -> None:
        if task is self._task and not task.cancelled() and self.failure is not None:
            error = task.exception() or RuntimeError("the in-memory consumer stopped")
            if not self.failure.done():
                self.failure.set_exception(error)

    async def _deliver(self) -> None:
        while True:
            self.broker.changed.clear()
            moved = False
            for topic in sorted(self.topics):
                records = self.broker.topics.get(topic, [])
                # What has arrived goes as one batch, as the Kafka consumer does.
                while self.cursors.get(topic, 0) < len(records):
                    start = self.cursors.get(topic, 0)
                    end = min(len(records), start + self.batch_max_records)
                    self.busy = True
                    try:
                        await self._process(records[start:end], start)
                    finally:
                        self.busy = False
                    self.cursors[topic] = end
                    moved = True
            if not moved:
                await self.broker.changed.wait()

    async def _process(self, records: list[_Record], first: int) -> None:
        now = int(time.time() * 1000)
        consumed: list[ConsumerRecord[bytes, bytes]] = [
            ConsumerRecord(
                topic=record.topic,
                partition=0,
                offset=first + index,
                timestamp=now,
                timestamp_type=0,
                key=record.key,
                value=record.value,
                checksum=None,
                serialized_key_size=len(record.key or b""),
                serialized_value_size=len(record.value or b""),
                headers=record.headers,
            )
            for index, record in enumerate(records)
        ]
        while True:  # as the Kafka consumer does: a batch that raised comes again
            try:
                await self.process(consumed)
                return
            except Exception as exc:
                log.warning("records %s@%d.. raised, again: %s", records[0].topic, first, exc)
                await asyncio.sleep(0.05)


class SagaHarness:
    """Services, their databases and a transport, for tests of your own sagas.

    Args:
        codec: The codec with every schema the services read and write.
        kafka: Run on this Kafka (real consumers and producers). Default:
            the in-memory transport.
        database_url: The database of each service, from its name. Default:
            SQLite files in a temporary directory, removed on exit.
        settings: Settings of every service. The default polls fast, and on
            Kafka prefixes topics and groups with a per-harness id, so that
            runs never see each other's records.
    """

    def __init__(
        self,
        codec: AvroCodec,
        *,
        kafka: KafkaSettings | None = None,
        database_url: Callable[[str], str] | None = None,
        settings: ServiceSettings | None = None,
    ) -> None:
        self.codec = codec
        self.kafka = kafka
        self.envelopes = EnvelopeCodec(codec)
        run = uuid.uuid4().hex[:8]
        self.settings = settings or ServiceSettings(
            relay=RelaySettings(poll_interval=timedelta(milliseconds=20)),
            saga_topic_prefix=f"saga.{run}." if kafka else "saga.",
            group_prefix=f"{run}." if kafka else "",
        )
        self._database_url = database_url
        self._folder: tempfile.TemporaryDirectory[str] | None = None
        self._services: dict[str, Service] = {}
        self._broker = InMemoryBroker()
        self._published: list[_Record] = []
        self._consumers: list[InMemoryConsumer] = []
        self._started = False

    @property
    def in_memory(self) -> bool:
        """Whether records travel through the in-memory transport (no Kafka)."""
        return self.kafka is None

    # -- setting up ---------------------------------------------------------------------

    def service(self, name: str) -> Service:
        """A new service named ``name``, with its own database; register handlers on it."""
        if self._started:
            raise ConfigurationError("add services before the harness starts")
        if name in self._services:
            raise ConfigurationError(f"the harness already has a service {name!r}")
        from outbox import create_engine

        engine = create_engine(self._url(name))
        publisher: Publisher = (
            self._broker
            if self.kafka is None
            else _Recording(KafkaPublisher(self.kafka), self._published)
        )
        service = Service(
            name,
            engine=engine,
            kafka=self.kafka or KafkaSettings(),
            codec=self.codec,
            settings=self.settings,
            publisher=publisher,
            consumer=None if self.kafka is not None else self._in_memory_consumer,
        )
        self._services[name] = service
        return service

    def _in_memory_consumer(
        self, _group: str, topics: frozenset[str], process: Process
    ) -> InMemoryConsumer:
        consumer = InMemoryConsumer(
            self._broker, topics, process, batch_max_records=self.settings.batch_max_records
        )
        self._consumers.append(consumer)
        return consumer

    def _url(self, name: str) -> str:
        if self._database_url is not None:
            return self._database_url(name)
        if self._folder is None:
            self._folder = tempfile.TemporaryDirectory(prefix="choreosaga-test-")
        return f"sqlite:///{self._folder.name}/{name}.db"

    def fail_step(
        self, service: str, saga: str, step: str, error: BaseException, *, times: int = 1
    ) -> None:
        """Make ``step`` of ``saga`` in ``service`` raise ``error`` its next ``times`` runs.

        The service treats ``error`` as in production: a
        :class:`~saga.BusinessFailure` (or a type the step declares as a
        business error) fails the step and the saga compensates; a retriable
        error (``error.retriable = True``) is retried; anything else is a bug:
        retried per policy, then dead-lettered, and the saga is suspended.
        Register the step first.
        """
        target = self._services.get(service)
        if target is None:
            raise ConfigurationError(f"the harness has no service {service!r}")
        # Reaches into the service's registrations: a test-only seam, kept here.
        part = target._sagas.get(saga)
        found = False
        for event_type, registered in list(part.steps.items()) if part else []:
            if registered.step == step:
                part.steps[event_type] = replace(  # type: ignore[union-attr]
                    registered, handler=_failing(registered.handler, error, times)
                )
                found = True
        if not found:
            raise ConfigurationError(f"{service} has no step {step!r} in {saga}")

    # -- running --------------------------------------------------------------------

    async def __aenter__(self) -> SagaHarness:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Create every service's tables and start them (and, on Kafka, their topics)."""
        if self._started:
            raise ConfigurationError("the harness has already started")
        self._started = True
        for service in self._services.values():
            await service.create_tables()
        if self.kafka is not None:
            topics = {t: 2 for s in self._services.values() for t in s.topics}
            if topics:
                await ensure_topics(self.kafka, topics)
        for service in self._services.values():
            await service.start()
        for service in self._services.values():
            if service.topics:
                await service.wait_assigned()

    async def stop(self) -> None:
        """Stop the services and remove the temporary databases."""
        for service in self._services.values():
            await service.stop()
            await service.engine.dispose()
        if self._folder is not None:
            self._folder.cleanup()
            self._folder = None

    async def start_saga(
        self,
        service: str,
        saga: str,
        *,
        saga_id: str,
        event_type: str,
        data: Mapping[str, Any],
        deadline: timedelta | None = None,
    ) -> Stamp:
        """Start ``saga`` from ``service`` (its initiator), in a transaction of its own."""
        initiator = self._services[service]
        async with AsyncSession(initiator.engine) as session, session.begin():
            return await initiator.start_saga(
                session, saga, saga_id=saga_id, event_type=event_type, data=data, deadline=deadline
            )

    async def run_until_ended(self, saga_id: str, *, within: float = 30.0) -> SagaRun:
        """Wait until ``saga_id`` has ended and every service has seen the end.

        Raises:
            TimeoutError: It did not end within ``within`` seconds.
        """
        async with asyncio.timeout(within):
            while True:
                stamps = await self.stamps(saga_id)
                ended = [s for s in stamps.values() if s.status.is_terminal]
                if ended and await self._quiet():
                    stamps = await self.stamps(saga_id)
                    return SagaRun(saga_id=saga_id, status=ended[0].status, stamps=stamps)
                await asyncio.sleep(_POLL if self.kafka is None else 0.05)

    async def stamps(self, saga_id: str) -> dict[str, Stamp]:
        """Each service's current view of ``saga_id`` (services that never saw it are left out)."""
        views = {}
        for name, service in self._services.items():
            stamp = await service.saga_state(saga_id)
            if stamp is not None:
                views[name] = stamp
        return views

    def published(self, event_type: str | None = None) -> list[Envelope]:
        """Every event published so far (of ``event_type``), decoded, in publish order."""
        records = (
            [r for log in self._broker.topics.values() for r in log]
            if self.kafka is None
            else list(self._published)
        )
        envelopes = [self.envelopes.decode(r.key, r.value, r.headers) for r in records]
        return [e for e in envelopes if event_type is None or e.type == event_type]

    # -- inside ---------------------------------------------------------------------

    async def _quiet(self) -> bool:
        """No outbox row waits to be published and no record waits to be handled."""
        for service in self._services.values():
            if (await service.outbox.stats()).pending:
                return False
        if self.kafka is not None:
            await asyncio.sleep(0.2)  # the consumers' fetch wait: let the last records land
            return True
        return all(consumer.caught_up() for consumer in self._consumers)


def _failing(handler: SagaHandler, error: BaseException, times: int) -> SagaHandler:
    remaining = [times]

    async def failing(ctx: SagaContext) -> None:
        if remaining[0] > 0:
            remaining[0] -= 1
            raise error
        await handler(ctx)

    return failing

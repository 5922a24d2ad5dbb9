"""The service: what users build, register handlers on, and run.

A :class:`Service` owns its database tables (outbox, inbox, saga views), a
relay that publishes its outbox, and a consumer that feeds every record of
its topics through the pipeline in :mod:`saga.processing`. Handlers are
registered explicitly on the service (decorators register and return the
function unchanged); sagas start from application code inside the caller's
own transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from outbox import (
    InboxSettings,
    KafkaPublisher,
    KafkaSettings,
    OutboxError,
    OutboxTables,
    Publisher,
    Relay,
    RelaySettings,
    RetryPolicy,
    SqlInboxStore,
    SqlOutboxStore,
    Transaction,
    classify,
)
from outbox.database import db_now_ms
from outbox.tables import check_tables, create_tables
from saga.choreography import (
    Choreography,
    Participation,
    Registered,
    SagaHandler,
    check_step_name,
    start_messages,
)
from saga.codec import AvroCodec
from saga.consumer import Consumer, ConsumerFactory, PartitionedConsumer, Process
from saga.context import outgoing
from saga.deadletter import check_template, dead_letter_topic
from saga.envelope import Envelope, EnvelopeCodec
from saga.errors import ConfigurationError
from saga.processing import H, Processor, ServiceStats, Subscription
from saga.stamp import SagaStatus, Stamp
from saga.state import SagaStates

__all__ = ["Service", "ServiceSettings", "ServiceStats"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class ServiceSettings:
    """How a service runs; every field has a production default."""

    relay: RelaySettings = field(default_factory=RelaySettings)
    """Relay behaviour (batching, polling, leases, cleanup)."""

    inbox: InboxSettings = field(default_factory=InboxSettings)
    """How long processed message ids are kept."""

    retry: RetryPolicy = field(default_factory=RetryPolicy)
    """Default retry policy for transient handler failures."""

    shards: int = 16
    """Key-hash shards of the outbox (fixed for the life of the table)."""

    run_relay: bool = True
    """Run a relay in this process (turn off to run relays separately)."""

    max_buffered_records: int = 1000
    """Fetched but unprocessed records per partition before it is paused."""

    batch_max_records: int = 50
    """The most records of one partition processed in one database transaction
    (a savepoint each). A batch is whatever has arrived, up to this many. The
    default keeps a batch's subtransactions within PostgreSQL's per-transaction
    cache of 64 (see :mod:`saga.batch`). After a deadlock, the service's
    batches take turns for 30 s, and after one met by a batch while it had its
    turn, records go one transaction each for 30 s (see :mod:`saga.processing`)."""

    batch_linger: timedelta = timedelta(0)
    """How long a partition's worker waits for more records when a batch is not
    full. The default never waits: low-load latency stays low, and batches grow
    by themselves as load rises (records arrive while the previous batch runs)."""

    offset_commit_interval: timedelta = timedelta(milliseconds=200)
    """How long after processing a partition's records its Kafka offset is committed.

    The offset is always committed after the database commit, and at once when
    a partition is revoked or the service stops; in between, one offset commit
    covers whatever the partition processed during the interval instead of one
    broker request per batch (at low load, per record). A partition with
    records waiting commits a second later than that, between two batches, so
    as not to hold them up for the broker's answer. A crash redelivers at most
    this interval's records (a second more under load), which the inbox
    recognises. ``timedelta(0)`` commits after every batch."""

    source: str | None = None
    """CloudEvents ``source`` of emitted events; defaults to ``/choreosaga/<name>``.

    Several services may share a source set here. A service recognises the
    saga messages it sent itself, and skips them, only by the default source,
    which names it alone: with a source of your own every saga message is
    handled (its own ones change nothing, at the cost of a transaction)."""

    saga_topic_prefix: str = "saga."
    """A saga's events travel on the topic ``<prefix><saga name>``."""

    group_prefix: str = ""
    """The consumer group is ``<prefix><service name>`` (to share one Kafka between
    several deployments or test runs)."""

    dead_letter_topic: str = "{topic}.dlq"
    """Where records that cannot be processed go: ``{topic}`` is replaced by the
    record's topic (one dead-letter topic per topic by default; a name without
    ``{topic}`` collects every topic's dead letters in one)."""

    saga_retention: timedelta = timedelta(days=30)
    """How long the view of a terminal saga (completed, compensated, failed) is
    kept after its last change; running and suspended sagas are never purged.

    Never shorter than ``inbox.retention``: a view purged while a late message
    of its saga may still arrive (the window the inbox covers) would be
    recreated by that message as a new running saga. A shorter value is raised
    to the inbox's, with a warning at start (see :attr:`effective_saga_retention`)."""

    saga_purge_batch_size: int = 1_000
    """Most saga views one purge statement deletes (purged every
    ``inbox.purge_interval``, in as many statements as it takes)."""

    def __post_init__(self) -> None:
        if self.max_buffered_records < 1:
            raise ConfigurationError("max_buffered_records must be positive")
        if not isinstance(self.saga_retention, timedelta) or self.saga_retention <= timedelta(0):
            raise ConfigurationError(
                f"saga_retention must be a positive timedelta, not {self.saga_retention!r}"
            )
        if not isinstance(self.saga_purge_batch_size, int) or self.saga_purge_batch_size < 1:
            raise ConfigurationError(
                f"saga_purge_batch_size must be a positive integer, not "
                f"{self.saga_purge_batch_size!r}"
            )
        if self.batch_max_records < 1:
            raise ConfigurationError("batch_max_records must be positive")
        if self.batch_linger < timedelta(0):
            raise ConfigurationError("batch_linger must not be negative")
        if not isinstance(self.offset_commit_interval, timedelta) or self.offset_commit_interval < (
            timedelta(0)
        ):
            raise ConfigurationError(
                f"offset_commit_interval must be a non-negative timedelta, not "
                f"{self.offset_commit_interval!r}"
            )
        bounded(self.retry)
        check_template(self.dead_letter_topic)

    @property
    def effective_saga_retention(self) -> timedelta:
        """The retention the purge applies: ``saga_retention``, or the inbox's if longer."""
        return max(self.saga_retention, self.inbox.retention)


def bounded(policy: RetryPolicy | None) -> RetryPolicy | None:
    """Refuse a handler retry policy without a limit: a bug would hold its partition forever.

    (Outages are waited out without end anyway; a handler's policy only
    bounds transient errors and bugs.)
    """
    if policy is not None and policy.maximum_attempts == 0:
        raise ConfigurationError(
            "a handler's retry policy needs maximum_attempts >= 1: without a limit, a "
            "message that always fails would hold its partition forever"
        )
    return policy


class _State(enum.Enum):
    UNOPENED = "unopened"
    RUNNING = "running"
    CLOSED = "closed"


class Service:
    """A service that handles events transactionally and publishes through an outbox.

    Register handlers with :meth:`subscribe`, create the tables once with
    :meth:`create_tables`, then run it with ``async with service:``.

    Args:
        name: Service name; also its Kafka consumer group and inbox consumer name.
        engine: The service's own database (``outbox.create_engine(url)``).
        kafka: Kafka connection settings.
        codec: Avro codec holding the schemas of every event it reads or writes.
        settings: Runtime settings.
        tables: Outbox and inbox tables (defaults to the standard names on a
            fresh ``MetaData``).
        publisher: Where the relay publishes (defaults to Kafka).
        consumer: Builds the consumer that feeds the service its records, from
            its group id, topics and per-batch callback (defaults to a Kafka
            :class:`~saga.consumer.PartitionedConsumer`; ``saga.testing``
            passes an in-memory one).
    """

    def __init__(
        self,
        name: str,
        *,
        engine: AsyncEngine,
        kafka: KafkaSettings,
        codec: AvroCodec,
        settings: ServiceSettings | None = None,
        tables: OutboxTables | None = None,
        publisher: Publisher | None = None,
        consumer: ConsumerFactory | None = None,
    ) -> None:
        if not name or len(name) > 100:
            raise ConfigurationError("service name must be 1-100 characters")
        self.name = name
        self.engine = engine
        self.kafka = kafka
        self.settings = settings or ServiceSettings()
        self.tables = tables or OutboxTables()
        self.envelopes = EnvelopeCodec(codec)
        self.source = self.settings.source or f"/choreosaga/{name}"
        self.outbox = SqlOutboxStore(engine, self.tables, shards=self.settings.shards)
        self.inbox = SqlInboxStore(engine, self.tables)
        self.relay = Relay(
            self.outbox,
            publisher or KafkaPublisher(kafka),
            self.settings.relay,
            prefix=name,
        )
        self.states = SagaStates(self.tables.metadata, codec, dialect=engine.dialect.name)
        self.choreography = Choreography(
            service=name, source=self.source, states=self.states, codec=self.envelopes
        )
        self.stats = ServiceStats()
        self._subscriptions: dict[tuple[str, str], Subscription] = {}
        self._sagas: dict[str, Participation] = {}
        self._saga_topics: dict[str, Participation] = {}
        self.processor = Processor(
            name=name,
            group=self.settings.group_prefix + name,
            engine=engine,
            envelopes=self.envelopes,
            inbox=self.inbox,
            outbox=self.outbox,
            choreography=self.choreography,
            source=self.source,
            retry=self.settings.retry,
            dead_letter_topic=self.settings.dead_letter_topic,
            stats=self.stats,
            subscriptions=self._subscriptions,
            sagas=self._saga_topics,
            longest_saga_schedule=self.settings.effective_saga_retention,
        )
        """The per-record pipeline (decode, inbox, handler, outbox, commit)."""
        self._consumer_factory = consumer or self._kafka_consumer
        self._consumer: Consumer | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        self._state = _State.UNOPENED

    # -- registration -------------------------------------------------------------

    def subscribe(
        self, topic: str, event_type: str, *, retry: RetryPolicy | None = None
    ) -> Callable[[H], H]:
        """Register the decorated function as the handler of ``event_type`` on ``topic``.

        The function is returned unchanged. One handler per topic and type.
        """

        def register(handler: H) -> H:
            self.add_handler(topic, event_type, handler, retry=retry)
            return handler

        return register

    def add_handler(
        self, topic: str, event_type: str, handler: H, *, retry: RetryPolicy | None = None
    ) -> None:
        """Register ``handler`` for ``event_type`` on ``topic`` (non-decorator form)."""
        if self._state is not _State.UNOPENED:
            raise ConfigurationError("register handlers before the service starts")
        if not topic or not event_type:
            raise ConfigurationError("a subscription needs a topic and an event type")
        self.envelopes.codec.registry.latest(event_type)  # fail now on an unknown schema
        if (topic, event_type) in self._subscriptions:
            raise ConfigurationError(f"{self.name} already handles {event_type} on {topic}")
        self._subscriptions[(topic, event_type)] = Subscription(handler, bounded(retry))

    def saga_topic(self, saga: str) -> str:
        """The topic that carries the events of ``saga``."""
        return f"{self.settings.saga_topic_prefix}{saga}"

    def _participation(self, saga: str) -> Participation:
        if self._state is not _State.UNOPENED:
            raise ConfigurationError("register handlers before the service starts")
        check_step_name(saga)
        part = self._sagas.get(saga)
        if part is None:
            # Own messages are recognised by the default source only: it names
            # this service alone, whereas a source set in the settings may be
            # shared by several services (see Participation.concerns).
            own = self.source if self.settings.source is None else None
            part = self._sagas[saga] = Participation(
                saga=saga, topic=self.saga_topic(saga), source=own
            )
            self._saga_topics[part.topic] = part
        return part

    def step(
        self,
        name: str,
        *,
        saga: str,
        on: str | Sequence[str],
        retry: RetryPolicy | None = None,
        business_errors: Sequence[type[Exception]] = (),
    ) -> Callable[[SagaHandler], SagaHandler]:
        """Register the decorated function as step ``name`` of ``saga``.

        It runs when an event of type ``on`` (or any of several types) of
        the saga arrives. It may emit the next event (the step is then
        recorded as done in the stamp), schedule one for later (the step stays
        pending until a later trigger), complete the saga, or fail it. The
        function is returned unchanged.

        ``business_errors`` are exception types that mean the step refused
        (for example ``OutOfStock``): the step fails and the saga is
        compensated, as with ``ctx.fail``. Any other exception is a bug: the
        message is retried per ``retry``, then dead-lettered, and the saga is
        suspended at this step, not compensated.
        """
        part = self._participation(saga)
        check_step_name(name)
        triggers = [on] if isinstance(on, str) else list(on)
        business = tuple(business_errors)
        for error in business:
            if not (isinstance(error, type) and issubclass(error, Exception)):
                raise ConfigurationError(f"business_errors takes exception classes, not {error!r}")
        for event_type in triggers:
            self.envelopes.codec.registry.latest(event_type)
            if event_type in part.steps:
                raise ConfigurationError(f"{event_type} already triggers a step of {saga}")

        def register(handler: SagaHandler) -> SagaHandler:
            for event_type in triggers:
                part.steps[event_type] = Registered(handler, name, bounded(retry), business)
            return handler

        return register

    def compensation(
        self, step: str, *, saga: str, retry: RetryPolicy | None = None
    ) -> Callable[[SagaHandler], SagaHandler]:
        """Register the decorated function as the compensation of ``step`` of ``saga``.

        It runs at most once per saga, after ``step`` was done and the saga
        failed later; it must undo the step's effects. Returned unchanged.
        """
        part = self._participation(saga)
        check_step_name(step)
        if step in part.compensations:
            raise ConfigurationError(f"{self.name} already compensates {step} of {saga}")

        def register(handler: SagaHandler) -> SagaHandler:
            part.compensations[step] = Registered(handler, step, bounded(retry))
            return handler

        return register

    def on_saga_end(
        self, saga: str, *, retry: RetryPolicy | None = None
    ) -> Callable[[SagaHandler], SagaHandler]:
        """Register the end handler of ``saga``; this service becomes its initiator.

        The handler runs once per terminal status (``ctx.stamp.status``). The
        initiator starts sagas (:meth:`start_saga`) and owns their deadlines.
        """
        part = self._participation(saga)
        if part.on_end is not None:
            raise ConfigurationError(f"{self.name} already has an end handler for {saga}")

        def register(handler: SagaHandler) -> SagaHandler:
            part.on_end = Registered(handler, None, bounded(retry))
            part.initiator = True
            return handler

        return register

    async def start_saga(
        self,
        tx: Transaction,
        saga: str,
        *,
        saga_id: str,
        event_type: str,
        data: Mapping[str, Any],
        deadline: timedelta | datetime | None = None,
        correlation_id: str | None = None,
    ) -> Stamp:
        """Start a saga inside the caller's transaction ``tx``.

        The first event goes through the outbox like any other: it is
        published once ``tx`` commits, and never if it rolls back. With a
        ``deadline`` (a duration from now, or a time), the saga is compensated
        if it has not completed by then. "Now" is the database's clock, the
        one that fires the deadline.

        Raises:
            ConfigurationError: This service is not the saga's initiator, or
                a saga with this id was already started here.
        """
        part = self._sagas.get(saga)
        if part is None or not part.initiator:
            raise ConfigurationError(
                f"{self.name} does not initiate {saga}: register @on_saga_end({saga!r})"
            )
        # The database clock, which also fires the deadline message: one clock
        # decides whether the saga is late (see saga.choreography).
        now_ms = (await tx.execute(select(db_now_ms()))).scalar_one()
        now = datetime.fromtimestamp(now_ms / 1000, UTC)
        if isinstance(deadline, timedelta):
            deadline = now + deadline
        stamp = Stamp(
            saga_name=saga,
            saga_id=saga_id,
            status=SagaStatus.RUNNING,
            correlation_id=correlation_id or str(uuid.uuid4()),
            started_at=now,
            deadline=deadline,
        )
        if not await self.states.create(tx, stamp):
            raise ConfigurationError(f"saga {saga} {saga_id} was already started")
        messages = start_messages(
            self.envelopes,
            source=self.source,
            topic=part.topic,
            stamp=stamp,
            event_type=event_type,
            data=data,
        )
        await self.outbox.add(tx, messages)
        return stamp

    async def saga_state(self, saga_id: str, saga: str | None = None) -> Stamp | None:
        """This service's view of a saga (the merge of every stamp it saw).

        A saga is (name, id): ``saga`` may be left out while only one saga
        this service knows has the id.

        Raises:
            ConfigurationError: ``saga`` is left out and sagas of several
                names have this id here.
        """
        return await self.states.get(self.engine, saga_id, saga)

    async def stuck_sagas(self, older_than: timedelta) -> list[Stamp]:
        """Sagas still running or compensating here whose view has not moved for
        ``older_than``: candidates for a deadline, an alert, or a person."""
        return await self.states.stuck(self.engine, older_than)

    @property
    def dead_letter_topics(self) -> frozenset[str]:
        """The dead-letter topics of this service's topics (create them with the others)."""
        template = self.settings.dead_letter_topic
        return frozenset(dead_letter_topic(template, topic) for topic in self.topics)

    async def wait(self, until: asyncio.Event | None = None) -> None:
        """Wait while the service runs; raise as soon as one of its parts died.

        Run a service with ``await service.wait(until=stop)``: a consumer
        whose fetch task or partition worker died, or a relay stopped by an
        error it cannot retry, raises here, so the process can exit non-zero
        instead of heartbeating while messages stand still. Returns when
        ``until`` is set or the service is stopped.
        """
        if self._state is not _State.RUNNING:
            raise ConfigurationError(f"cannot wait on a service that is {self._state.value}")
        watched: list[asyncio.Future[object]] = []
        if self._consumer is not None and self._consumer.failure is not None:
            watched.append(asyncio.ensure_future(asyncio.shield(self._consumer.failure)))
        if self.settings.run_relay:
            watched.append(asyncio.ensure_future(self.relay.join()))
        if until is not None:
            watched.append(asyncio.ensure_future(until.wait()))
        if not watched:
            await self._stopping.wait()
            return
        try:
            done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for future in watched:
                future.cancel()
            await asyncio.gather(*watched, return_exceptions=True)
        for future in done:
            future.result()  # raises the failure

    @property
    def topics(self) -> frozenset[str]:
        """Topics this service subscribes to."""
        plain = {topic for topic, _ in self._subscriptions}
        return frozenset(plain | {part.topic for part in self._sagas.values()})

    # -- lifecycle ------------------------------------------------------------------

    async def create_tables(self) -> None:
        """Create the outbox, inbox and saga state tables if they do not exist.

        Safe when several instances of the service start at once.
        """
        t = self.tables
        await create_tables(self.engine, [t.outbox, t.inbox, t.leases, t.relays, self.states.table])

    async def start(self) -> None:
        """Check the tables, start the relay, then join the consumer group.

        Raises:
            outbox.ConfigurationError: The database or some of the service's
                tables are missing (call :meth:`create_tables`).
            outbox.OutboxError: The relay could not start (see ``Relay.start``).
        """
        if self._state is not _State.UNOPENED:
            raise ConfigurationError(f"cannot start a service that is {self._state.value}")
        clash = self._saga_topics.keys() & {topic for topic, _ in self._subscriptions}
        if clash:
            raise ConfigurationError(f"topics used both by sagas and plain handlers: {clash}")
        t = self.tables
        needed = [t.outbox, t.inbox, t.leases, t.relays]
        await check_tables(self.engine, [*needed, self.states.table] if self._sagas else needed)
        self._state = _State.RUNNING
        if self.settings.run_relay:
            await self.relay.start()
        self._tasks.append(asyncio.create_task(self._purge_inbox_loop(), name="inbox-purge"))
        if self._sagas:
            self._warn_short_saga_retention()
            self._tasks.append(
                asyncio.create_task(self._purge_saga_views_loop(), name="saga-view-purge")
            )
        if self.topics:
            self._consumer = self._consumer_factory(
                self.settings.group_prefix + self.name, self.topics, self.processor.process_batch
            )
            try:
                await self._consumer.start()
            except BaseException:
                await self.stop()
                raise

    def _kafka_consumer(self, group: str, topics: frozenset[str], process: Process) -> Consumer:
        return PartitionedConsumer(
            group_id=group,
            topics=topics,
            settings=self.kafka,
            process=process,
            max_buffered=self.settings.max_buffered_records,
            batch_max_records=self.settings.batch_max_records,
            batch_linger=self.settings.batch_linger.total_seconds(),
            commit_interval=self.settings.offset_commit_interval.total_seconds(),
        )

    async def stop(self) -> None:
        """Finish in-flight messages, leave the group, stop the relay."""
        if self._state is not _State.RUNNING:
            self._state = _State.CLOSED
            return
        self._state = _State.CLOSED
        if self._consumer is not None:
            await self._consumer.stop()
        self._stopping.set()  # the purge loop stops between statements, not inside one
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.relay.stop()

    async def __aenter__(self) -> Service:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def wait_assigned(self) -> None:
        """Wait until the consumer group has given this service partitions."""
        if self._consumer is None:
            raise ConfigurationError("the service is not consuming (not started, or no handlers)")
        await self._consumer.assigned.wait()

    # -- publishing from application code -------------------------------------------

    async def publish(
        self,
        tx: Transaction,
        envelope: Envelope,
        *,
        topic: str,
        delay: timedelta | None = None,
        deliver_at: datetime | None = None,
    ) -> Envelope:
        """Write ``envelope`` to the outbox inside the caller's transaction ``tx``.

        It is published after ``tx`` commits, and never if it rolls back.
        """
        sent, message = outgoing(
            self.envelopes, envelope, topic=topic, delay=delay, deliver_at=deliver_at
        )
        await self.outbox.add(tx, [message])
        return sent

    def new_envelope(
        self, event_type: str, data: Mapping[str, Any], *, key: bytes | None = None
    ) -> Envelope:
        """An envelope from this service, starting a new correlation."""
        envelope = Envelope(type=event_type, data=data, source=self.source, key=key)
        return replace(envelope, correlation_id=envelope.id)

    async def _purge_inbox_loop(self) -> None:
        settings = self.settings.inbox
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(settings.purge_interval.total_seconds()):
                    await self._stopping.wait()
            try:
                deleted = settings.purge_batch_size
                while deleted == settings.purge_batch_size and not self._stopping.is_set():
                    deleted = await self.inbox.purge(settings.retention, deleted)
            except Exception as exc:  # an outage or a bug: try again next round, visibly
                log.warning(
                    "%s could not purge its inbox (%s): %s",
                    self.name,
                    classify(exc).value,
                    exc,
                    exc_info=not isinstance(exc, OutboxError),
                )

    def _warn_short_saga_retention(self) -> None:
        settings = self.settings
        if settings.saga_retention < settings.inbox.retention:
            log.warning(
                "%s: saga_retention (%s) is shorter than the inbox's retention (%s): terminal "
                "saga views are kept %s instead, so that a late message the inbox would still "
                "recognise cannot recreate a purged saga",
                self.name,
                settings.saga_retention,
                settings.inbox.retention,
                settings.effective_saga_retention,
            )

    async def _purge_saga_views_loop(self) -> None:
        settings = self.settings
        retention = settings.effective_saga_retention
        limit = settings.saga_purge_batch_size
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(settings.inbox.purge_interval.total_seconds()):
                    await self._stopping.wait()
            try:
                deleted = limit
                while deleted == limit and not self._stopping.is_set():
                    deleted = await self.states.purge(self.engine, retention, limit)
            except Exception as exc:  # an outage or a bug: try again next round, visibly
                log.warning(
                    "%s could not purge its saga views (%s): %s",
                    self.name,
                    classify(exc).value,
                    exc,
                    exc_info=not isinstance(exc, OutboxError),
                )

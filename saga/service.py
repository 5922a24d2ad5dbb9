"""The service runtime: consume, handle in one transaction, relay the outbox.

For every record of a subscribed topic the runtime

1. decodes the envelope (an undecodable record is logged with its raw bytes,
   base64, and skipped: it never blocks the partition);
2. opens a database transaction and records the message id in the inbox (a
   duplicate ends here, changing nothing);
3. runs the handler registered for the event type, which changes the
   service's state through ``ctx.session`` and emits events;
4. writes the emitted events to the outbox, in the same transaction;
5. commits, and only then lets the consumer commit the Kafka offset.

Transient failures (lost connection, deadlock, serialization failure, or any
error with ``retriable = True``) roll back and retry the whole transaction
with the handler's retry policy. A relay in the same process publishes the
outbox; it is woken by each commit.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import enum
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from aiokafka import ConsumerRecord
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

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
    is_transient_db_error,
)
from outbox.tables import create_tables
from saga.choreography import (
    Choreography,
    Participation,
    Registered,
    SagaHandler,
    check_step_name,
    start_messages,
)
from saga.codec import AvroCodec
from saga.consumer import PartitionedConsumer
from saga.context import MessageContext, RecordInfo, SagaContext, outgoing
from saga.envelope import Envelope, EnvelopeCodec
from saga.errors import ConfigurationError, DecodeError, HandlerError
from saga.stamp import SagaStatus, Stamp
from saga.state import SagaStates
from saga.tracecontext import use_trace_headers

__all__ = ["Handler", "Service", "ServiceSettings", "ServiceStats"]

log = logging.getLogger(__name__)


class Handler(Protocol):
    """A message handler: an async function of the context."""

    def __call__(self, ctx: MessageContext, /) -> Awaitable[None]: ...


H = Callable[[MessageContext], Awaitable[None]]


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

    source: str | None = None
    """CloudEvents ``source`` of emitted events; defaults to ``/choreosaga/<name>``."""

    saga_topic_prefix: str = "saga."
    """A saga's events travel on the topic ``<prefix><saga name>``."""

    group_prefix: str = ""
    """The consumer group is ``<prefix><service name>`` (to share one Kafka between
    several deployments or test runs)."""

    def __post_init__(self) -> None:
        if self.max_buffered_records < 1:
            raise ConfigurationError("max_buffered_records must be positive")


@dataclass
class ServiceStats:
    """Counters of one running service."""

    processed: int = 0
    """Messages handled and committed."""

    duplicates: int = 0
    """Redelivered messages recognised by the inbox and skipped."""

    ignored: int = 0
    """Messages of types this service has no handler for."""

    undecodable: int = 0
    """Records that could not be decoded (logged with their bytes)."""

    failed: int = 0
    """Messages whose handler failed for good (logged with their bytes)."""


class _State(enum.Enum):
    UNOPENED = "unopened"
    RUNNING = "running"
    CLOSED = "closed"


@dataclass(frozen=True)
class _Subscription:
    handler: H
    retry: RetryPolicy | None


def _is_transient(exc: BaseException) -> bool:
    """Worth another attempt with the handler's retry policy."""
    return is_transient_db_error(exc) or bool(getattr(exc, "retriable", False))


def _is_outage(exc: BaseException) -> bool:
    """The database is unavailable: retry without end rather than give up on the message.

    A handler's own retriable errors are not outages: once its retry policy is
    spent, the message is given up on (a step fails, a compensation is
    recorded as failed) so that one message cannot block its partition.
    """
    if isinstance(exc, OutboxError):
        return exc.retriable
    cause = exc.__cause__ if isinstance(exc, HandlerError) else exc
    return cause is not None and is_transient_db_error(cause)


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
            name=f"{name}:{id(self):x}",
        )
        self.states = SagaStates(self.tables.metadata, codec, dialect=engine.dialect.name)
        self.choreography = Choreography(
            service=name, source=self.source, states=self.states, codec=self.envelopes
        )
        self.stats = ServiceStats()
        self._subscriptions: dict[tuple[str, str], _Subscription] = {}
        self._sagas: dict[str, Participation] = {}
        self._consumer: PartitionedConsumer | None = None
        self._tasks: list[asyncio.Task[None]] = []
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
        self._subscriptions[(topic, event_type)] = _Subscription(handler, retry)

    def saga_topic(self, saga: str) -> str:
        """The topic that carries the events of ``saga``."""
        return f"{self.settings.saga_topic_prefix}{saga}"

    def _participation(self, saga: str) -> Participation:
        if self._state is not _State.UNOPENED:
            raise ConfigurationError("register handlers before the service starts")
        check_step_name(saga)
        part = self._sagas.get(saga)
        if part is None:
            part = self._sagas[saga] = Participation(saga=saga, topic=self.saga_topic(saga))
        return part

    def step(
        self,
        name: str,
        *,
        saga: str,
        on: str | Sequence[str],
        retry: RetryPolicy | None = None,
    ) -> Callable[[SagaHandler], SagaHandler]:
        """Register the decorated function as step ``name`` of ``saga``.

        It runs when an event of type ``on`` (or any of several types) of
        the saga arrives. It may emit the next event (the step is then
        recorded as done in the stamp), schedule one for later (the step stays
        pending until a later trigger), complete the saga, or fail it. The
        function is returned unchanged.
        """
        part = self._participation(saga)
        check_step_name(name)
        triggers = [on] if isinstance(on, str) else list(on)
        for event_type in triggers:
            self.envelopes.codec.registry.latest(event_type)
            if event_type in part.steps:
                raise ConfigurationError(f"{event_type} already triggers a step of {saga}")

        def register(handler: SagaHandler) -> SagaHandler:
            for event_type in triggers:
                part.steps[event_type] = Registered(handler, name, retry)
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
            part.compensations[step] = Registered(handler, step, retry)
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
            part.on_end = Registered(handler, None, retry)
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
        if it has not completed by then.

        Raises:
            ConfigurationError: This service is not the saga's initiator, or
                a saga with this id was already started here.
        """
        part = self._sagas.get(saga)
        if part is None or not part.initiator:
            raise ConfigurationError(
                f"{self.name} does not initiate {saga}: register @on_saga_end({saga!r})"
            )
        now = datetime.now(UTC)
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
            raise ConfigurationError(f"saga {saga_id} was already started")
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

    async def saga_state(self, saga_id: str) -> Stamp | None:
        """This service's view of a saga (the merge of every stamp it saw)."""
        return await self.states.get(self.engine, saga_id)

    async def stuck_sagas(self, older_than: timedelta) -> list[Stamp]:
        """Sagas still running or compensating here whose view has not moved for
        ``older_than``: candidates for a deadline, an alert, or a person."""
        return await self.states.stuck(self.engine, older_than)

    @property
    def _saga_topics(self) -> dict[str, Participation]:
        return {part.topic: part for part in self._sagas.values()}

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
        """Start the relay, then join the consumer group."""
        if self._state is not _State.UNOPENED:
            raise ConfigurationError(f"cannot start a service that is {self._state.value}")
        clash = self._saga_topics.keys() & {topic for topic, _ in self._subscriptions}
        if clash:
            raise ConfigurationError(f"topics used both by sagas and plain handlers: {clash}")
        self._state = _State.RUNNING
        if self.settings.run_relay:
            await self.relay.start()
        self._tasks.append(asyncio.create_task(self._purge_inbox_loop(), name="inbox-purge"))
        if self.topics:
            self._consumer = PartitionedConsumer(
                group_id=self.settings.group_prefix + self.name,
                topics=self.topics,
                settings=self.kafka,
                process=self._process,
                max_buffered=self.settings.max_buffered_records,
            )
            try:
                await self._consumer.start()
            except BaseException:
                await self.stop()
                raise

    async def stop(self) -> None:
        """Finish in-flight messages, leave the group, stop the relay."""
        if self._state is not _State.RUNNING:
            self._state = _State.CLOSED
            return
        self._state = _State.CLOSED
        if self._consumer is not None:
            await self._consumer.stop()
        for task in self._tasks:
            task.cancel()
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

    # -- processing ---------------------------------------------------------------------

    async def _process(self, record: ConsumerRecord[bytes, bytes]) -> None:
        try:
            envelope = self.envelopes.decode(record.key, record.value, record.headers)
        except DecodeError as exc:
            self.stats.undecodable += 1
            log.error(
                "%s skipped an undecodable record %s[%d]@%d: %s; key=%s value(base64)=%s",
                self.name,
                record.topic,
                record.partition,
                record.offset,
                exc,
                record.key,
                base64.b64encode(exc.raw or b"").decode(),
            )
            return
        info = RecordInfo(topic=record.topic, partition=record.partition, offset=record.offset)
        part = self._saga_topics.get(record.topic)
        if part is not None:
            await self._process_saga(record, part, envelope, info)
            return
        subscription = self._subscriptions.get((record.topic, envelope.type))
        if subscription is None:
            self.stats.ignored += 1
            return
        policy = subscription.retry or self.settings.retry
        try:
            processed = await self._retrying(
                policy, lambda: self._transaction(subscription.handler, envelope, info)
            )
        except Exception as exc:
            if _is_outage(exc):
                raise  # an outage, not bad input: the consumer retries the record
            self._failed(record, envelope, exc)
            return
        self._count(processed)

    async def _process_saga(
        self,
        record: ConsumerRecord[bytes, bytes],
        part: Participation,
        envelope: Envelope,
        info: RecordInfo,
    ) -> None:
        if envelope.stamp is None:
            self.stats.ignored += 1
            log.warning(
                "%s ignored %s on saga topic %s: it carries no stamp",
                self.name,
                envelope.id,
                record.topic,
            )
            return
        if not part.concerns(envelope):
            self.stats.ignored += 1
            return
        registered = part.handler_for(envelope)
        policy = (registered.retry if registered else None) or self.settings.retry
        try:
            processed = await self._retrying(
                policy, lambda: self._saga_transaction(part, envelope, info, None)
            )
        except Exception as exc:
            if _is_outage(exc):
                raise
            # The handler gave up: fail the step (or record the compensation
            # as failed) in a fresh transaction, so that the saga still ends.
            log.error(
                "%s: %s handling %s (%s) of saga %s; failing it",
                self.name,
                exc.__class__.__name__,
                envelope.id,
                envelope.type,
                envelope.stamp.saga_id,
                exc_info=exc,
            )
            broken = exc
            try:
                processed = await self._retrying(
                    self.settings.retry,
                    lambda: self._saga_transaction(part, envelope, info, broken),
                )
            except Exception as again:
                if _is_outage(again):
                    raise
                self._failed(record, envelope, again)
                return
        self._count(processed)

    async def _retrying(
        self, policy: RetryPolicy, attempt_once: Callable[[], Awaitable[bool]]
    ) -> bool:
        async for attempt in policy.retrying(retry_on=_is_transient):
            with attempt:
                return await attempt_once()
        raise AssertionError("unreachable: tenacity re-raises the last error")

    def _count(self, processed: bool) -> None:
        if processed:
            self.stats.processed += 1
        else:
            self.stats.duplicates += 1

    async def _saga_transaction(
        self,
        part: Participation,
        envelope: Envelope,
        info: RecordInfo,
        broken: BaseException | None,
    ) -> bool:
        assert envelope.stamp is not None
        async with (
            AsyncSession(self.engine, expire_on_commit=False) as session,
            session.begin(),
        ):
            if not await self.inbox.record(session, self.name, envelope.id):
                return False
            ctx = SagaContext(
                session=session,
                envelope=envelope,
                record=info,
                source=self.source,
                stamp=envelope.stamp,
                step=None,
                topic=part.topic,
            )
            with use_trace_headers(envelope.traceparent, envelope.tracestate):
                messages = await self.choreography.handle(ctx, part, broken=broken)
            await self.outbox.add(session, messages)
        return True

    async def _transaction(self, handler: H, envelope: Envelope, info: RecordInfo) -> bool:
        async with (
            AsyncSession(self.engine, expire_on_commit=False) as session,
            session.begin(),
        ):
            if not await self.inbox.record(session, self.name, envelope.id):
                return False
            ctx = MessageContext(
                session=session,
                envelope=envelope,
                record=info,
                source=self.source,
            )
            with use_trace_headers(envelope.traceparent, envelope.tracestate):
                await handler(ctx)
            messages = [m for _, m in ctx.envelopes(self.envelopes, envelope.stamp)]
            await self.outbox.add(session, messages)
        return True

    def _failed(
        self, record: ConsumerRecord[bytes, bytes], envelope: Envelope, exc: BaseException
    ) -> None:
        self.stats.failed += 1
        log.error(
            "%s gave up on message %s (%s) from %s[%d]@%d: %r; value(base64)=%s",
            self.name,
            envelope.id,
            envelope.type,
            record.topic,
            record.partition,
            record.offset,
            exc,
            base64.b64encode(record.value or b"").decode(),
            exc_info=exc,
        )

    async def _purge_inbox_loop(self) -> None:
        settings = self.settings.inbox
        while True:
            await asyncio.sleep(settings.purge_interval.total_seconds())
            with contextlib.suppress(OutboxError):
                deleted = settings.purge_batch_size
                while deleted == settings.purge_batch_size:
                    deleted = await self.inbox.purge(settings.retention, deleted)

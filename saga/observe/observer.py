"""``saga observe``: a process that fills the saga log from the saga topics.

It joins its own consumer group (``saga-observer`` by default) on every topic
matching its patterns, and for each record records the message id in the
inbox (a redelivery stops there) and writes the message's row and its saga's
merged row (:mod:`saga.observe.log`), in its own database: the records fetched
for one partition (at most 50) in one transaction.
It runs on the same consumer runtime as the services
(:class:`~saga.consumer.PartitionedConsumer`): partitions in parallel, offsets
committed after the database commit.

Topics are matched when it starts and again every ``topic_refresh``: a saga
topic created later is picked up then (the consumer rejoins the group with
the longer list). While no topic matches at all (an observer started before
the services created their topics), they are listed again every second (each
time a short-lived admin client: a connection and a metadata request), so the
first sagas are not missed for half a minute;
the observer warns once that nothing matches and, at the same level, when it
starts reading. Records without a stamp are not saga messages and are
skipped; undecodable ones are logged with their position, never stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta

from aiokafka import ConsumerRecord
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from outbox import KafkaSettings, OutboxError, OutboxTables, RetryPolicy, SqlInboxStore
from outbox.failures import ErrorKind, classify, describe
from outbox.tables import create_tables
from saga.codec import AvroCodec
from saga.consumer import PartitionedConsumer
from saga.errors import BrokerError, ConfigurationError, DecodeError
from saga.observe.log import SagaLog
from saga.observe.message import ObservedMessage, observe_record
from saga.observe.topics import DEFAULT_PATTERNS, matching_topics

__all__ = ["ObserverSettings", "ObserverStats", "SagaObserver"]

log = logging.getLogger(__name__)

_WAIT = RetryPolicy(maximum_attempts=0, maximum_interval=timedelta(seconds=5))
"""Pauses between tries of a batch the log's database refused (an outage, a transient error)."""
_LOOK_AGAIN = timedelta(seconds=1)
"""How soon the topics are listed again while none matches the patterns."""
_TRANSIENT_TRIES = 5
"""Tries of a batch failing with a transient error (a deadlock, a lock or statement
timeout) before the error goes to the consumer, which reports it: an outage is
waited out without end, but a statement that always times out is not an outage."""


@dataclass(frozen=True, kw_only=True)
class ObserverSettings:
    """How the observer runs."""

    patterns: Sequence[str] = DEFAULT_PATTERNS
    """Glob patterns of the topics to observe."""

    group_id: str = "saga-observer"
    """Consumer group of the observer (and its inbox consumer name)."""

    payloads: bool = False
    """Keep each message's payload (as JSON) in the log."""

    retention: timedelta = timedelta(days=7)
    """Sagas whose last message is older are removed from the log."""

    cleanup_interval: timedelta = timedelta(minutes=10)
    """How often retention is applied."""

    topic_refresh: timedelta = timedelta(seconds=30)
    """How often the topic list is matched again."""

    def __post_init__(self) -> None:
        if not self.patterns:
            raise ConfigurationError("the observer needs at least one topic pattern")
        for name in ("retention", "cleanup_interval", "topic_refresh"):
            if getattr(self, name) <= timedelta(0):
                raise ConfigurationError(f"{name} must be positive")


@dataclass
class ObserverStats:
    """Counters of a running observer."""

    stored: int = 0
    """Messages written to the log."""
    duplicates: int = 0
    """Redelivered messages the inbox recognised."""
    skipped: int = 0
    """Records without a stamp, or undecodable."""
    topics: list[str] = field(default_factory=list)
    """Topics currently observed."""


class SagaObserver:
    """Consumes saga topics and writes the saga log.

    Args:
        engine: The log's database.
        kafka: Kafka connection settings.
        codec: Avro codec holding the stamp schema (and, to keep payloads,
            the schemas of the observed events).
        settings: Observer settings.
        log_tables: The saga log tables (defaults to the standard names).
        inbox_tables: Where the inbox table lives (defaults to ``inbox`` on
            the saga log's metadata).
    """

    def __init__(
        self,
        *,
        engine: AsyncEngine,
        kafka: KafkaSettings,
        codec: AvroCodec,
        settings: ObserverSettings | None = None,
        log_tables: SagaLog | None = None,
        inbox_tables: OutboxTables | None = None,
    ) -> None:
        self.engine = engine
        self.kafka = kafka
        self.settings = settings or ObserverSettings()
        self.codec = codec
        self.log = log_tables or SagaLog(dialect=engine.dialect.name)
        self.tables = inbox_tables or OutboxTables(self.log.metadata)
        self.inbox = SqlInboxStore(engine, self.tables)
        self.stats = ObserverStats()
        self._consumer: PartitionedConsumer | None = None
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._next_look = 0.0
        self._no_topic_warned = False
        self.ready = asyncio.Event()
        """Set once the first consumer has been assigned partitions."""

    async def create_tables(self) -> None:
        """Create the saga log and inbox tables if they do not exist.

        Raises:
            ConfigurationError: The saga log was made by an earlier version
                (:meth:`~saga.observe.log.SagaLog.check_keys`): the message
                gives the SQL that migrates it.
        """
        await create_tables(self.engine, [self.tables.inbox, self.log.messages, self.log.sagas])
        await self.log.check_keys(self.engine)

    async def process_batch(self, records: Sequence[ConsumerRecord[bytes, bytes]]) -> None:
        """Store a partition's records in order, in one transaction (the consumer's callback).

        Should the transaction fail, nothing of the batch is stored. An outage
        (the connection lost, the server restarting) is waited out here, with a
        warning, and the batch tried again; a transient error (a lock
        conflict, a lock or statement timeout) is tried a few times in a row
        before it is raised too. Any other error is raised at once, and the
        consumer logs it and tries the batch again.
        The inbox skips what an earlier try committed.
        """
        observed = [o for o in map(self._observe, records) if o is not None]
        if not observed:
            return
        waits = transient = 0
        while True:
            try:
                stored, duplicates = await self._store(observed)
                break
            except Exception as exc:
                # A bug is the consumer's to report. An outage is waited out
                # here, as a warning; so is a transient error (two partitions
                # merging one saga's row deadlocked) for a few tries in a row.
                kind = classify(exc)
                transient = transient + 1 if kind is ErrorKind.TRANSIENT else 0
                if not kind.retriable or transient >= _TRANSIENT_TRIES:
                    raise
                waits += 1
                delay = _WAIT.delay(waits)
                first = records[0]
                log.warning(
                    "observer could not store %s[%d]@%d..%d (%s: %s); retry %d in %.1fs",
                    first.topic,
                    first.partition,
                    first.offset,
                    records[-1].offset,
                    kind.value,
                    describe(exc),
                    waits,
                    delay,
                )
                await asyncio.sleep(delay)
        self.stats.stored += stored
        self.stats.duplicates += duplicates

    async def _store(self, observed: Sequence[ObservedMessage]) -> tuple[int, int]:
        """Record ``observed`` in one transaction; return (stored, duplicates)."""
        stored = duplicates = 0
        async with self.engine.begin() as conn:
            for message in observed:
                recorded = await self.inbox.record(
                    conn, self.settings.group_id, message.message_id, source=message.source[:200]
                )
                if not recorded:
                    duplicates += 1
                    continue
                await self.log.record(conn, message)
                stored += 1
        return stored, duplicates

    async def process(self, record: ConsumerRecord[bytes, bytes]) -> None:
        """Store one record."""
        await self.process_batch([record])

    def _observe(self, record: ConsumerRecord[bytes, bytes]) -> ObservedMessage | None:
        """What the log keeps of ``record``; ``None`` (counted as skipped) if nothing."""
        try:
            observed = observe_record(
                self.codec,
                value=record.value,
                headers=record.headers,
                topic=record.topic,
                partition=record.partition,
                offset=record.offset,
                payloads=self.settings.payloads,
            )
        except DecodeError as exc:
            self.stats.skipped += 1
            log.warning(
                "observer cannot decode %s[%d]@%d: %s",
                record.topic,
                record.partition,
                record.offset,
                exc,
            )
            return None
        if observed is None:
            self.stats.skipped += 1
        return observed

    async def start(self) -> None:
        """Match the topics, join the group and run until :meth:`stop`.

        Raises:
            ConfigurationError: The saga log is of an earlier version (see
                :meth:`SagaLog.check_keys`), checked here too for tables made
                elsewhere (Alembic) than by :meth:`create_tables`. A database
                that does not answer yet is not checked: outages are waited out.
        """
        try:
            await self.log.check_keys(self.engine)
        except SQLAlchemyError as exc:
            log.warning("observer: could not check the saga log's tables yet: %s", exc)
        await self._subscribe()
        self._task = asyncio.create_task(self._maintain(), name="saga-observer")

    async def _subscribe(self) -> None:
        topics = await matching_topics(self.kafka, self.settings.patterns)
        # Nothing to read yet: look again soon, not at the next (slow) refresh.
        wait = (
            self.settings.topic_refresh if topics else min(_LOOK_AGAIN, self.settings.topic_refresh)
        )
        self._next_look = asyncio.get_running_loop().time() + wait.total_seconds()
        if topics == self.stats.topics and self._consumer is not None:
            return
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None
        self.stats.topics = topics
        if not topics:
            if not self._no_topic_warned:
                log.warning(
                    "observer: no topic matches %s yet; looking again every %gs",
                    list(self.settings.patterns),
                    wait.total_seconds(),
                )
                self._no_topic_warned = True
            return
        consumer = PartitionedConsumer(
            group_id=self.settings.group_id,
            topics=topics,
            settings=self.kafka,
            process=self.process_batch,
        )
        await consumer.start()
        self._consumer = consumer
        # After the warning that nothing matched, its end is worth the same level.
        level = logging.WARNING if self._no_topic_warned else logging.INFO
        self._no_topic_warned = False
        log.log(level, "observer reads %s", ", ".join(topics))

    async def _maintain(self) -> None:
        """Refresh the topics, mark readiness and apply retention until stopped."""
        settings = self.settings
        loop = asyncio.get_running_loop()
        next_cleanup = loop.time()
        while not self._stop.is_set():
            if self._consumer is not None and self._consumer.assigned.is_set():
                self.ready.set()
            if loop.time() >= next_cleanup:
                try:
                    await self.cleanup()
                except (OutboxError, SQLAlchemyError) as exc:
                    # Retention can wait for the next round; observing goes on.
                    log.warning("observer could not apply retention: %s", exc)
                next_cleanup = loop.time() + settings.cleanup_interval.total_seconds()
            # Until the next look for topics or the next cleanup, whichever is first.
            wait = min(next_cleanup, self._next_look) - loop.time()
            if not self.ready.is_set():
                wait = min(wait, 0.2)
            wait = max(0.0, wait)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._stop.wait()
            if self._stop.is_set():
                return
            if loop.time() >= self._next_look:
                try:
                    await self._subscribe()
                except BrokerError as exc:
                    # Listed again at the next refresh: not a warning a second.
                    self._next_look = loop.time() + settings.topic_refresh.total_seconds()
                    log.warning("observer could not refresh its topics: %s", exc)

    async def cleanup(self) -> int:
        """Apply retention to the log and the inbox; return the sagas removed."""
        removed = await self.log.purge(self.engine, self.settings.retention)
        await self.inbox.purge(self.settings.retention, 10_000)
        return removed

    async def stop(self) -> None:
        """Finish the records in progress, commit, and leave the group."""
        self._stop.set()
        if self._task is not None:
            await self._task
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None

    async def __aenter__(self) -> SagaObserver:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

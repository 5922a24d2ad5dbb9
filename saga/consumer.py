"""Kafka consumer loop: partitions in parallel, each partition in order.

One task fetches records for the consumer group and hands each partition's
records to that partition's worker; workers process their records in
batches, in offset order, while different partitions proceed concurrently.
A batch is whatever has arrived for the partition when the worker is free
(at most ``batch_max_records``); the worker does not wait for a batch to
fill unless ``batch_linger`` asks it to, so a lone record at low load is
handled at once. ``process`` runs a batch in one database transaction (see
:mod:`saga.processing`). A worker commits a partition's offset only after
``process`` has returned for the batch, that is after its database
transaction committed, so a crash can only cause redelivery of records
already processed (which the inbox absorbs), never a skipped record.

Offsets are not committed after every batch: an offset commit is a request
to the broker, and at low load a batch is one record, so committing each one
costs the service and the broker about as much CPU as the record's fetch
(measured on the embedded broker: 0.3 ms each side per commit; a saga's five
records meant five commits in each of the reference shop's four services). A
partition's offset is committed ``commit_interval`` after the first batch
processed since its last commit, once the partition has no records waiting;
a partition that stays busy commits a second later than that, between two
batches (waiting for the broker's answer would hold up its records); and at
once when the partition is revoked or the consumer stops. A crash (never a
clean stop or a rebalance) therefore redelivers at most that interval's
records, a second more under load, which the inbox recognises.

On a rebalance, revoked partitions finish the batch in progress, commit
their offset and stop; records already fetched for them are dropped and will
be fetched again by the new owner. A partition whose worker falls behind is
paused at the broker until its backlog drains, so memory stays bounded.

Supervision: ``process`` deals with every failure of a record itself (the
error model in :mod:`saga.processing`); should it raise anyway, the batch is
retried with backoff and logged, never skipped. The fetch task and the
workers are watched: one that ends while the consumer runs (which is a bug)
is logged and reported through :attr:`PartitionedConsumer.failure`, so that
the service stops with an error instead of heartbeating while a partition
stands still. So does a record the Kafka client itself cannot parse (a
header key that is not UTF-8): aiokafka fails on it inside the fetch, before
choreosaga sees any bytes, the same way every time, so it cannot be
dead-lettered from here; after a few tries the consumer fails, saying how to
move the group's offset past it.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import timedelta
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import ConsumerStoppedError, KafkaError

from outbox import KafkaSettings, RetryPolicy
from outbox.crashpoints import crash_point
from saga.errors import BrokerError, ConfigurationError

__all__ = ["Consumer", "ConsumerFactory", "PartitionedConsumer", "Process"]

log = logging.getLogger(__name__)

Process = Callable[[Sequence[ConsumerRecord[bytes, bytes]]], Awaitable[None]]
"""Handles a batch of records of one partition, in order; must deal with its own
errors (the batch is retried if it raises)."""

_BACKOFF = RetryPolicy(maximum_attempts=0, maximum_interval=timedelta(seconds=5))
_COMMIT_RETRY = 1.0
"""Seconds at least between a failed offset commit and the next try."""
_BUSY_COMMIT = 1.0
"""Seconds past its due time that a partition with records waiting commits its offset anyway."""
_UNREADABLE_LIMIT = 5
"""Fetches in a row failing on a record the client cannot parse before the consumer gives up."""


class Consumer(ABC):
    """The consumer side of a transport: hands every record of its topics to ``process``.

    :class:`PartitionedConsumer` is the Kafka one; ``saga.testing`` has one
    in memory. A service builds its consumer through a :data:`ConsumerFactory`.
    """

    assigned: asyncio.Event
    """Set once records can arrive (for Kafka: the group assigned partitions)."""

    failure: asyncio.Future[None] | None
    """Fails with the error of a background task that died while consuming (set by start)."""

    @abstractmethod
    async def start(self) -> None:
        """Start consuming in the background."""

    @abstractmethod
    async def stop(self) -> None:
        """Finish the batch in progress and stop."""


ConsumerFactory = Callable[[str, frozenset[str], "Process"], Consumer]
"""Builds a service's consumer from its group id, its topics and its ``process``."""


class _State(enum.Enum):
    UNOPENED = "unopened"
    RUNNING = "running"
    CLOSED = "closed"


class _Partition:
    """A worker for one assigned partition."""

    def __init__(self, tp: TopicPartition) -> None:
        self.tp = tp
        self.queue: asyncio.Queue[list[ConsumerRecord[bytes, bytes]] | None] = asyncio.Queue()
        self.buffered = 0
        self.paused = False
        self.revoked = False
        self.next_offset: int | None = None
        self.committed: int | None = None
        self.commit_due: float | None = None
        """Event-loop time at which ``next_offset`` is to be committed (None: nothing to commit)."""
        self.task: asyncio.Task[None] | None = None

    def is_revoked(self) -> bool:
        # A method, not the attribute: it changes while the worker awaits.
        return self.revoked


class PartitionedConsumer(Consumer):
    """Consumes topics in a group, calling ``process`` for every record.

    Args:
        group_id: Kafka consumer group (one per service).
        topics: Topics to subscribe to.
        settings: Kafka connection and consumer settings.
        process: Called with each batch of a partition's records, in offset order.
        max_buffered: Records fetched but not processed, per partition, above
            which the partition is paused.
        grace: Seconds a partition's worker may take to finish its current
            batch when the partition is revoked or the consumer stops.
        batch_max_records: The most records handed to ``process`` at once.
        batch_linger: Seconds a worker waits for more records when a batch
            is not full (0: a batch is whatever has arrived).
        commit_interval: Seconds after its first processed batch that a
            partition's offset is committed (0: after every batch). Revoked
            partitions and a stopping consumer commit at once.
    """

    def __init__(
        self,
        *,
        group_id: str,
        topics: Iterable[str],
        settings: KafkaSettings,
        process: Process,
        max_buffered: int = 1000,
        grace: float = 10.0,
        batch_max_records: int = 50,
        batch_linger: float = 0.0,
        commit_interval: float = 0.2,
    ) -> None:
        self.group_id = group_id
        self._grace = grace
        self.topics = sorted(set(topics))
        if not self.topics:
            raise ConfigurationError("a consumer needs at least one topic")
        if max_buffered < 1:
            raise ConfigurationError("max_buffered must be positive")
        if batch_max_records < 1:
            raise ConfigurationError("batch_max_records must be positive")
        if batch_linger < 0:
            raise ConfigurationError("batch_linger must not be negative")
        if commit_interval < 0:
            raise ConfigurationError("commit_interval must not be negative")
        self._commit_interval = commit_interval
        self._batch_max = batch_max_records
        self._linger = batch_linger
        self.settings = settings
        self._process = process
        self._max_buffered = max_buffered
        self._consumer: AIOKafkaConsumer | None = None
        self._parts: dict[TopicPartition, _Partition] = {}
        self._fetcher: asyncio.Task[None] | None = None
        self._commit_lock = asyncio.Lock()
        self._state = _State.UNOPENED
        self.assigned = asyncio.Event()
        """Set once the group has assigned partitions to this consumer."""
        self.failure: asyncio.Future[None] | None = None
        """Fails with the error of a background task that died while consuming (set by start)."""

    @property
    def assignment(self) -> frozenset[TopicPartition]:
        """Partitions currently assigned to this consumer."""
        if self._consumer is None:
            return frozenset()
        return frozenset(self._consumer.assignment())

    async def start(self) -> None:
        """Join the group and start consuming in the background."""
        if self._state is not _State.UNOPENED:
            raise ConfigurationError(f"cannot start a consumer that is {self._state.value}")
        self._state = _State.RUNNING
        self.failure = asyncio.get_running_loop().create_future()
        consumer = AIOKafkaConsumer(**self.settings.consumer_kwargs(self.group_id))
        try:
            await consumer.start()
        except KafkaError as exc:
            await consumer.stop()
            self._state = _State.CLOSED
            raise BrokerError(f"could not connect the consumer: {exc}") from exc
        consumer.subscribe(self.topics, listener=_Listener(self))
        self._consumer = consumer
        self._fetcher = self._supervised(self._fetch_loop(), f"consumer-{self.group_id}")

    async def stop(self) -> None:
        """Finish the records in progress, commit, and leave the group."""
        if self._state is not _State.RUNNING:
            self._state = _State.CLOSED
            return
        self._state = _State.CLOSED
        if self._fetcher is not None:
            self._fetcher.cancel()
            # A fetcher that died already reported its error through ``failure``.
            await asyncio.gather(self._fetcher, return_exceptions=True)
        await self._retire(list(self._parts))
        if self._consumer is not None:
            await self._consumer.stop()

    def _supervised(self, work: Awaitable[None], name: str) -> asyncio.Task[None]:
        task = asyncio.ensure_future(work)
        task.set_name(name)
        task.add_done_callback(self._watch)
        return task

    def _watch(self, task: asyncio.Task[None]) -> None:
        """Report a background task that ended on its own while the consumer runs."""
        if task.cancelled():
            if self._state is _State.RUNNING and not self._expected(task):
                self._fail(task, RuntimeError(f"{task.get_name()} was cancelled"))
            return
        error = task.exception()
        if error is not None:
            self._fail(task, error)
        elif self._state is _State.RUNNING and not self._expected(task):
            self._fail(task, RuntimeError(f"{task.get_name()} ended while consuming"))

    def _expected(self, task: asyncio.Task[None]) -> bool:
        """A worker ends on its own only when its partition was revoked."""
        return task is not self._fetcher and not any(
            part.task is task for part in self._parts.values()
        )

    def _fail(self, task: asyncio.Task[None], error: BaseException) -> None:
        log.critical(
            "consumer %s: %s died: %r; the service must stop",
            self.group_id,
            task.get_name(),
            error,
            exc_info=error,
        )
        if self.failure is not None and not self.failure.done():
            self.failure.set_exception(error)

    # -- fetching -----------------------------------------------------------------

    async def _fetch_loop(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        attempt = 0
        unreadable = 0
        while True:
            try:
                batches = await consumer.getmany(timeout_ms=200)
                attempt = unreadable = 0
            except ConsumerStoppedError:
                return
            except Exception as exc:  # the fetch loop must outlive any failure
                attempt += 1
                if not isinstance(exc, KafkaError | OSError):
                    # Not the broker: the client cannot parse a record (a
                    # header key that is not UTF-8, say). It fails the same
                    # way every time and holds every partition of this
                    # consumer: stop the service, loudly, rather than
                    # heartbeat while nothing moves.
                    unreadable += 1
                    if unreadable >= _UNREADABLE_LIMIT:
                        raise BrokerError(
                            f"consumer {self.group_id} cannot read a record of "
                            f"{', '.join(self.topics)} ({type(exc).__name__}: {exc}); the Kafka "
                            "client fails on it before choreosaga sees it. Skip it by moving "
                            "the group's offset past it (kafka-consumer-groups --reset-offsets)"
                        ) from exc
                delay = _BACKOFF.delay(attempt)
                log.warning(
                    "consumer %s fetch failed (%s); retry in %.1fs", self.group_id, exc, delay
                )
                await asyncio.sleep(delay)
                continue
            for tp, records in batches.items():
                if records:
                    self._dispatch(consumer, tp, records)

    def _dispatch(
        self,
        consumer: AIOKafkaConsumer,
        tp: TopicPartition,
        records: list[ConsumerRecord[bytes, bytes]],
    ) -> None:
        part = self._parts.get(tp)
        if part is None:
            part = self._parts[tp] = _Partition(tp)
            part.task = self._supervised(self._work(part), f"partition-{tp.topic}-{tp.partition}")
        part.queue.put_nowait(records)
        part.buffered += len(records)
        if part.buffered >= self._max_buffered and not part.paused:
            consumer.pause(tp)
            part.paused = True

    # -- processing ---------------------------------------------------------------

    async def _work(self, part: _Partition) -> None:
        pending: list[ConsumerRecord[bytes, bytes]] = []
        loop = asyncio.get_running_loop()
        while True:
            if not pending:
                records = await self._next(part)
                if records is None:
                    return
                pending.extend(records)
            if not await self._gather(part, pending):
                return
            if part.is_revoked():
                return
            batch = pending[: self._batch_max]
            del pending[: self._batch_max]
            await self._process_batch(batch)
            crash_point("consumer.after_commit")
            part.next_offset = batch[-1].offset + 1
            part.buffered -= len(batch)
            if part.commit_due is None:
                part.commit_due = loop.time() + self._commit_interval
            drained = not pending and part.queue.empty()
            # While records wait, waiting for the broker's answer holds up the
            # partition (committing every interval under load cost a fifth of
            # the reference shop's sagas per second at saturation): a busy
            # partition commits only once it is _BUSY_COMMIT late. A partition
            # left idle commits when its commit falls due (``_next``).
            now = loop.time()
            late = now >= part.commit_due + _BUSY_COMMIT or not self._commit_interval
            if now >= part.commit_due and (drained or late):
                await self._commit(part)
            if drained and part.paused and self._consumer is not None and not part.revoked:
                self._consumer.resume(part.tp)
                part.paused = False

    async def _next(self, part: _Partition) -> list[ConsumerRecord[bytes, bytes]] | None:
        """Wait for the next records of ``part``, committing its offset when it falls due."""
        while part.commit_due is not None and part.queue.empty():
            try:
                async with asyncio.timeout_at(part.commit_due):
                    return await part.queue.get()
            except TimeoutError:
                await self._commit(part)
        return await part.queue.get()

    async def _gather(self, part: _Partition, pending: list[ConsumerRecord[bytes, bytes]]) -> bool:
        """Add what has arrived for ``part`` to ``pending`` (lingering if asked to).

        Returns ``False`` when the partition was revoked meanwhile.
        """
        while len(pending) < self._batch_max and not part.queue.empty():
            records = part.queue.get_nowait()
            if records is None:
                return False
            pending.extend(records)
        if self._linger <= 0 or len(pending) >= self._batch_max:
            return True
        deadline = asyncio.get_running_loop().time() + self._linger
        while len(pending) < self._batch_max:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                break
            try:
                records = await asyncio.wait_for(part.queue.get(), remaining)
            except TimeoutError:
                break
            if records is None:
                return False
            pending.extend(records)
        return True

    async def _process_batch(self, batch: list[ConsumerRecord[bytes, bytes]]) -> None:
        attempt = 0
        while True:
            try:
                await self._process(batch)
                return
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise
                # Raised by ``process`` itself, not a cancellation of this
                # worker: retried like any other error, never an end.
                log.error("consumer %s: process raised CancelledError", self.group_id)
                attempt += 1
                await asyncio.sleep(_BACKOFF.delay(attempt))
            except Exception:
                # ``process`` handles every expected failure itself; reaching
                # here is a bug. Never skip the records: retry (the inbox
                # recognises those of the batch already committed).
                attempt += 1
                delay = _BACKOFF.delay(attempt)
                first = batch[0]
                log.exception(
                    "consumer %s could not process %s[%d]@%d..%d; retry in %.1fs",
                    self.group_id,
                    first.topic,
                    first.partition,
                    first.offset,
                    batch[-1].offset,
                    delay,
                )
                await asyncio.sleep(delay)

    async def _commit(self, part: _Partition) -> None:
        offset = part.next_offset
        if offset is None or offset == part.committed or self._consumer is None:
            part.commit_due = None
            return
        async with self._commit_lock:
            try:
                await self._consumer.commit({part.tp: offset})
                part.committed = offset
                part.commit_due = None
            except Exception as exc:
                # Not fatal: the records will be redelivered and the inbox
                # recognises them. Tried again an interval later.
                part.commit_due = asyncio.get_running_loop().time() + max(
                    self._commit_interval, _COMMIT_RETRY
                )
                log.warning(
                    "consumer %s could not commit %s at %d: %s", self.group_id, part.tp, offset, exc
                )

    async def _retire(self, partitions: Iterable[TopicPartition]) -> None:
        """Stop the workers of ``partitions`` after their current batch; commit.

        A worker still busy after the grace period (a record retried through a
        database outage) is cancelled: its transaction rolls back and the
        record, not committed, is delivered again to whoever owns it next.
        """
        parts = [p for tp in partitions if (p := self._parts.pop(tp, None)) is not None]
        for part in parts:
            part.revoked = True
            part.queue.put_nowait(None)
        tasks = [part.task for part in parts if part.task is not None]
        if tasks:
            _, busy = await asyncio.wait(tasks, timeout=self._grace)
            for task in busy:
                log.warning(
                    "consumer %s cancels %s after %.0fs",
                    self.group_id,
                    task.get_name(),
                    self._grace,
                )
                task.cancel()
            await asyncio.gather(*busy, return_exceptions=True)
        for part in parts:
            await self._commit(part)


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, owner: PartitionedConsumer) -> None:
        self._owner = owner

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self._owner._retire(list(revoked))

    async def on_partitions_assigned(self, assigned: Any) -> None:
        if assigned:
            self._owner.assigned.set()

"""The relay: publishes committed outbox rows and marks them published.

One round: read up to ``batch_size`` due rows of the shards this relay holds
(id order), publish them all, wait for every acknowledgement, then mark the
acknowledged ones in one statement (or delete them, when
``RelaySettings.retention`` is zero). A crash between publish and mark only
causes duplicates, never a loss (at-least-once).

Rounds are pipelined while the outbox has a backlog: the next batch is read
while the current one is being published (the read leaves out every row still
in flight here, by id, so that no row is published twice by one relay), and
the current batch is marked while the next one is being published (one mark
at a time). A row is never marked before its acknowledgement. The pipeline
stops after a batch that had any failure, when a rebalance is due or the
relay stops: the batch read ahead is then dropped unsent and read again after
the failed batch was settled, so nothing read before a failure overtakes the
row that failed (parked rows then hold their key back in the read itself).
Per-key order within a batch is the publisher's job (see
:mod:`outbox.kafka`): a batch is published only once the previous one was
wholly acknowledged.

Fencing: the relay asks before each send whether it still holds the shard's
lease with more than a safety margin (a fifth of ``lease_ttl``) left, under
the epoch it read the batch with; once not, it stops sending the batch and
logs that it lost the lease. The mark statement checks the lease rows itself,
so a relay paused past its lease while another took the shard marks nothing.
A row acknowledged after an earlier row of its key failed is not marked
either: it goes out again after that row in the next round.

Start: :meth:`Relay.start` refuses what waiting cannot fix -- a missing
database, directory or table, a broker that refuses the producer -- at once,
and gives an unreachable database or broker ``startup_timeout`` (30 s) before
it fails: at start, silence is more likely a wrong address than an outage.

Failures while running follow :mod:`outbox.failures`:

* outages (broker or database unreachable, a connection killed): the rows
  stay pending, the relay backs off and tries again for as long as it lasts,
  and ``stats.failed_attempts`` counts the failed rounds;
* a row that can never be published (too large, an unknown or invalid
  topic, not authorised) is parked at once with its error, visible through
  :meth:`OutboxStore.parked`; :meth:`OutboxStore.retry_parked` and
  :meth:`OutboxStore.discard_parked` release it. Later rows of the same
  topic and key wait behind it so that their order is kept; other topics and
  keys go on;
* anything else (a dropped table, a bug) stops the relay: it logs the error,
  gives its shards back so that another relay takes them at once, and
  :meth:`Relay.join` raises the error (``saga relay`` exits non-zero).

Every background task (publish, leases, commit notifications, cleanup) runs
under a supervisor: a task that dies is logged and restarted, or the relay
stops as above. The leases are renewed only while the publish task runs:
in a fault run, a publish task that died of a killed connection while its
lease task went on renewing left 16 shards unpublished for good.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import inspect
import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta

from outbox.crashpoints import crash_point
from outbox.errors import ConfigurationError, OutboxError, PublishError, StoreError
from outbox.failures import ErrorKind, classify
from outbox.message import StoredMessage
from outbox.publisher import HeldBackError, Publisher, send_gate
from outbox.settings import RelaySettings
from outbox.store import LeaseFence, OutboxStore

__all__ = ["Relay", "RelayStats"]

log = logging.getLogger(__name__)

MAX_NAME_LENGTH = 200
"""Longest relay name: the owner column of the lease and relay tables holds this many."""

_STOP_GRACE = 15.0
"""Seconds stop() waits for the loops to reach a safe point before cancelling them."""

_TRANSIENT_LIMIT = 10
"""Consecutive transient failures (a statement timeout every time...) before a loop gives up."""


class _State(enum.Enum):
    UNOPENED = "unopened"
    RUNNING = "running"
    CLOSED = "closed"


@dataclass(frozen=True, kw_only=True)
class RelayStats:
    """Counters of one relay since it started."""

    published: int
    """Rows published and marked."""

    parked: int
    """Rows parked after a permanent failure."""

    failed_attempts: int
    """Publish rounds that failed and were retried (an outage, a transient error)."""

    batches: int
    """Non-empty rounds."""

    shards: frozenset[int]
    """Shards currently held."""


class Relay:
    """Publishes an outbox to a broker until stopped.

    Use it as an async context manager (``async with Relay(...) as relay:``)
    or call :meth:`start` and :meth:`stop`. A stopped relay cannot be
    restarted; make a new one.

    Args:
        store: The outbox to publish from.
        publisher: Where to publish (for example :class:`outbox.KafkaPublisher`).
        settings: Batch size, polling, leases, backoff and cleanup.
        name: Unique name of this relay instance; shows up as the owner of
            its shard leases. Two relays with one name would each take the
            other's leases for their own, so leave it out unless it is unique:
            the default is ``prefix``, host, pid and a random part, made again
            in a process forked after the relay was created.
        prefix: What the default name starts with (a service's name).

    Raises:
        ConfigurationError: A name over 200 characters, or a retention of
            zero with a store whose ``mark_published`` cannot delete (one
            written before it took ``delete``).
    """

    def __init__(
        self,
        store: OutboxStore,
        publisher: Publisher,
        settings: RelaySettings | None = None,
        *,
        name: str | None = None,
        prefix: str | None = None,
    ) -> None:
        self.store = store
        self.publisher = publisher
        self.settings = settings or RelaySettings()
        self._given_name = name
        self._prefix = prefix
        self._pid = os.getpid()
        self._name = name or self._unique_name()
        if len(self._name) > MAX_NAME_LENGTH:
            raise ConfigurationError(f"relay name must be at most {MAX_NAME_LENGTH} characters")
        if not self.settings.retention and not _marks_can_delete(store):
            raise ConfigurationError(
                f"RelaySettings.retention zero needs a store whose mark_published takes "
                f"delete=True; {type(store).__name__}.mark_published does not (keep "
                f"retention above zero with this store)"
            )
        self._state = _State.UNOPENED
        self._wake = asyncio.Event()
        self._publishing = asyncio.Lock()
        self._shards: frozenset[int] = frozenset()
        self._lease_valid_until = 0.0
        self._lease_lost = False
        self._epochs: dict[int, int] = {}
        self._rebalance_due = False
        self._tasks: list[asyncio.Task[None]] = []
        self._publish_task: asyncio.Task[None] | None = None
        self._watch: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._ended = asyncio.Event()
        self._failure: BaseException | None = None
        self._published = 0
        self._parked = 0
        self._failed = 0
        self._batches = 0

    def _unique_name(self) -> str:
        parts = [socket.gethostname(), str(os.getpid()), uuid.uuid4().hex[:12]]
        if self._prefix:
            parts.insert(0, self._prefix)
        return ":".join(parts)[-MAX_NAME_LENGTH:]

    @property
    def name(self) -> str:
        """This relay's name: the owner of its shard leases, unique per process."""
        if self._given_name is None and os.getpid() != self._pid:
            # Forked after it was made (a pre-loading server): the parent's
            # name would make both processes take each other's leases.
            self._pid = os.getpid()
            self._name = self._unique_name()
        return self._name

    @property
    def stats(self) -> RelayStats:
        """A snapshot of this relay's counters."""
        return RelayStats(
            published=self._published,
            parked=self._parked,
            failed_attempts=self._failed,
            batches=self._batches,
            shards=self._shards,
        )

    def wake(self) -> None:
        """Look for new rows now instead of at the next poll."""
        self._wake.set()

    async def start(self) -> None:
        """Check the database and the broker, then publish in background tasks.

        Raises:
            ConfigurationError: A missing database, SQLite directory or table.
            OutboxError: The database or broker refused the relay, or could
                not be reached within ``settings.startup_timeout``.
        """
        if self._state is not _State.UNOPENED:
            raise RuntimeError(f"cannot start a relay that is {self._state.value}")
        self._state = _State.RUNNING
        try:
            await self._check_ready()
        except BaseException:
            self._state = _State.CLOSED
            self._ended.set()
            try:
                await self.publisher.stop()
            except Exception as exc:  # the start's own error is the one raised
                log.warning(
                    "relay %s: stopping its publisher after a failed start: %r", self.name, exc
                )
            raise
        self._publish_task = self._supervise("publish", self._publish_loop)
        self._tasks = [
            self._supervise("leases", self._leases_loop),
            self._publish_task,
            self._supervise("cleanup", self._cleanup_loop, essential=False),
        ]
        self._watch = self._supervise(
            "watch", lambda: self.store.watch_commits(self.wake), essential=False
        )

    async def _check_ready(self) -> None:
        """Refuse a misconfiguration at once; give an unreachable server a bounded wait."""
        timeout = self.settings.startup_timeout.total_seconds()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        attempt = 0
        while True:
            try:
                await self.store.check_ready()
                await self.publisher.start()
                return
            except Exception as exc:
                remaining = deadline - loop.time()
                if classify(exc) is ErrorKind.PERMANENT:
                    raise
                if remaining <= 0:
                    error = _gave_up(exc, timeout)
                    if error is exc:
                        raise
                    raise error from exc
                attempt += 1
                log.info(
                    "relay %s cannot start yet (trying %.0fs more): %s", self.name, remaining, exc
                )
                await asyncio.sleep(min(self.settings.backoff.delay(attempt), remaining))

    async def stop(self) -> None:
        """Stop after the current batch, give back the shards, close the publisher.

        The loops stop at their next safe point rather than being cancelled in
        the middle of a database transaction (which, on SQLite, could leave the
        file locked behind a connection that is being thrown away). Only a loop
        still busy after a grace period (a publish stuck on an unreachable
        broker) is cancelled. Stopping a relay that failed does not raise;
        :meth:`join` does.
        """
        if self._state is not _State.RUNNING:
            self._state = _State.CLOSED
            return
        self._state = _State.CLOSED
        self._stopping.set()
        self.wake()
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
        _, busy = await asyncio.wait(self._tasks, timeout=_STOP_GRACE)
        for task in busy:
            log.warning("relay %s cancels %s after %.0fs", self.name, task.get_name(), _STOP_GRACE)
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._release()
        await self.publisher.stop()
        self._ended.set()

    @property
    def failure(self) -> BaseException | None:
        """The error that stopped this relay, if one did."""
        return self._failure

    async def join(self) -> None:
        """Wait until the relay has stopped: after :meth:`stop`, or after a failure.

        Raises:
            Exception: The error that stopped the relay, which could not be
                retried (see :mod:`outbox.failures`); its shards were given back.
        """
        await self._ended.wait()
        if self._failure is not None:
            raise self._failure

    async def _release(self) -> None:
        self._shards = frozenset()
        self._lease_valid_until = 0.0
        try:
            await self.store.release_shards(self.name)
        except OutboxError as exc:
            log.warning("relay %s could not release its shards: %s", self.name, exc)

    # -- supervision ---------------------------------------------------------------

    def _supervise(
        self, what: str, body: Callable[[], Awaitable[None]], *, essential: bool = True
    ) -> asyncio.Task[None]:
        """Run ``body`` in a task that is restarted when it dies.

        An essential task (publish, leases) whose error is not an outage --
        a permanent error, or a transient one its loop gave up on -- stops
        the whole relay instead: restarting it would fail the same way, and
        a relay that holds shards it cannot publish is worse than none.
        """
        return asyncio.create_task(
            self._supervised(what, body, essential=essential), name=f"relay-{what}-{self.name}"
        )

    async def _supervised(
        self, what: str, body: Callable[[], Awaitable[None]], *, essential: bool
    ) -> None:
        restarts = 0
        while not self._stopping.is_set():
            try:
                await body()
                if self._stopping.is_set():
                    return
                raise RuntimeError(f"the {what} loop ended while the relay runs")
            except Exception as exc:
                if self._stopping.is_set():
                    return
                if essential and classify(exc) is not ErrorKind.OUTAGE:
                    log.error(
                        "relay %s stops: its %s task failed: %s",
                        self.name,
                        what,
                        _one_line(exc),
                        exc_info=_trace(exc),
                    )
                    await self._fail(exc)
                    return
                restarts += 1
                log.error(
                    "relay %s: its %s task died, restarting it: %s",
                    self.name,
                    what,
                    _one_line(exc),
                    exc_info=_trace(exc),
                )
                await self._pause(self.settings.backoff.delay(restarts))

    async def _fail(self, exc: BaseException) -> None:
        """Stop every loop, give back the shards, and let :meth:`join` raise ``exc``."""
        if self._failure is not None:
            return  # another task failed first and is stopping the relay
        self._failure = exc
        self._lease_valid_until = 0.0  # publish nothing more, whatever is in flight
        self._stopping.set()
        self.wake()
        if self._watch is not None:
            self._watch.cancel()
        current = asyncio.current_task()
        others = [t for t in self._tasks if t is not current]
        if others:
            await asyncio.wait(others, timeout=_STOP_GRACE)
        await self._release()
        self._ended.set()

    async def __aenter__(self) -> Relay:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _pause(self, seconds: float) -> None:
        """Sleep, but wake up at once when the relay is stopping."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stopping.wait()

    # -- leases ------------------------------------------------------------------

    async def _claim(self, *, rebalance: bool) -> None:
        ttl = self.settings.lease_ttl
        started = asyncio.get_running_loop().time()
        self._shards = await self.store.claim_shards(self.name, ttl, rebalance=rebalance)
        fence = self.store.fence(self.name)
        self._epochs = dict(fence.epochs) if fence is not None else {}
        # Leave a margin: stop using the leases well before the database expires them.
        self._lease_valid_until = started + ttl.total_seconds() * 0.8

    async def _leases_loop(self) -> None:
        period = self.settings.lease_ttl.total_seconds() / 4
        attempt = 0
        transient = 0
        while not self._stopping.is_set():
            if self._publish_task is not None and self._publish_task.done():
                return  # never hold shards that nobody publishes
            try:
                if self._publishing.locked():
                    # A batch is in flight: renew and take free shards, but give
                    # nothing away; the next round rebalances before it reads.
                    await self._claim(rebalance=False)
                    self._rebalance_due = True
                else:
                    async with self._publishing:
                        await self._claim(rebalance=True)
                attempt = transient = 0
                self.wake()
                await self._pause(period)
            except Exception as exc:
                kind = classify(exc)
                transient = transient + 1 if kind is ErrorKind.TRANSIENT else 0
                if kind is ErrorKind.PERMANENT or transient > _TRANSIENT_LIMIT:
                    raise
                attempt += 1
                log.warning(
                    "relay %s could not renew its shard leases: %s",
                    self.name,
                    _one_line(exc),
                    exc_info=_trace(exc),
                )
                await self._pause(min(self.settings.backoff.delay(attempt), period))

    def _held_shards(self) -> frozenset[int]:
        if asyncio.get_running_loop().time() >= self._lease_valid_until:
            return frozenset()
        return self._shards

    # -- publishing --------------------------------------------------------------

    async def publish_once(self) -> int:
        """Publish one batch of due rows of the held shards; return how many were read.

        Raises:
            PublishError: A transient failure left rows unpublished (they stay
                pending; the caller should back off).
            StoreError: The database failed.
        """
        return await self._publish_rounds(pipelined=False)

    async def _publish_rounds(self, *, pipelined: bool) -> int:
        """Publish rounds of due rows; return how many rows the last round read.

        Pipelined, the next batch is read while the current one is being
        published, and the current one is marked while the next one is being
        published. It goes on while batches come back full and every record
        of the previous round was acknowledged; a round with any failure, a
        rebalance that is due, or stop() ends it: the batch read ahead is
        dropped unsent (its rows stay pending, read again next time), so that
        nothing read before a failure overtakes a row that failed.

        A row is never read twice while it is in flight here: the read ahead
        excludes the ids of the batch being published and of the batch being
        marked. A row is marked only after its acknowledgement.
        """
        limit = self.settings.batch_size
        async with self._publishing:
            if self._rebalance_due:
                self._rebalance_due = False
                await self._claim(rebalance=True)
            shards = self._held_shards()
            if not shards:
                return 0
            fence = self.store.fence(self.name)
            batch = await self.store.fetch_due(shards, limit)
            settling: asyncio.Task[None] | None = None
            settling_ids: frozenset[int] = frozenset()
            ahead: asyncio.Task[tuple[list[StoredMessage], LeaseFence | None]] | None = None
            try:
                while batch:
                    ids = frozenset(m.id for m in batch)
                    if pipelined and len(batch) == limit and self._may_read_ahead():
                        ahead = asyncio.create_task(self._read_ahead(ids | settling_ids))
                    outcomes = await self._send(batch, fence)
                    if settling is not None:
                        await settling  # one mark at a time; raises what it raised
                    settling = asyncio.create_task(self._settle(batch, outcomes, fence))
                    settling_ids = ids
                    if ahead is None:
                        break
                    read_ahead, ahead = ahead, None
                    next_batch, next_fence = await read_ahead
                    if any(o is not None for o in outcomes) or not self._may_read_ahead():
                        break  # drop the batch read ahead: read again after settling
                    if not next_batch:
                        break
                    batch, fence = next_batch, next_fence
            except BaseException:
                if ahead is not None:
                    # Let the read ahead finish and drop what it read: cancelled in
                    # the middle of its statement, it could leave its connection
                    # behind with its transaction open (on SQLite, holding the
                    # database's write lock, so that every writer waited).
                    await asyncio.gather(asyncio.shield(ahead), return_exceptions=True)
                if settling is not None:
                    # Its acknowledged rows must still be marked; the first error wins.
                    await asyncio.gather(asyncio.shield(settling), return_exceptions=True)
                raise
            if settling is not None:
                await settling
            return len(batch)

    def _may_read_ahead(self) -> bool:
        """Whether the next batch may be read while this one is published."""
        return not (self._stopping.is_set() or self._rebalance_due or self._lease_lost)

    async def _read_ahead(
        self, in_flight: frozenset[int]
    ) -> tuple[list[StoredMessage], LeaseFence | None]:
        shards = self._held_shards()
        if not shards:
            return [], None
        fence = self.store.fence(self.name)
        batch = await self.store.fetch_due(shards, self.settings.batch_size, exclude=in_flight)
        return batch, fence

    async def _send(
        self, batch: Sequence[StoredMessage], fence: LeaseFence | None
    ) -> list[PublishError | None]:
        self._lease_lost = False
        with send_gate(self._gate(fence)):
            outcomes = await self.publisher.publish(batch)
        crash_point("relay.after_publish")
        return outcomes

    async def _settle(
        self,
        batch: Sequence[StoredMessage],
        outcomes: Sequence[PublishError | None],
        fence: LeaseFence | None,
    ) -> None:
        """Mark the acknowledged rows (one statement), record the failures.

        Raises:
            PublishError: The last transient failure of the batch (the caller backs off).
        """
        done = self._in_order(batch, outcomes)
        if self.settings.retention:
            marked = await self.store.mark_published(done, fence=fence)
        else:  # keeps no published rows: delete them (only then asked, for older stores)
            marked = await self.store.mark_published(done, fence=fence, delete=True)
        if marked < len(done) and fence is not None:
            log.warning(
                "relay %s: %d of %d published rows were not marked: it lost their "
                "shard's lease (their new holder publishes them) or they were marked already",
                self.name,
                len(done) - marked,
                len(done),
            )
        self._published += marked
        self._batches += 1
        transient: PublishError | None = None
        for message, error in zip(batch, outcomes, strict=True):
            if error is None or isinstance(error, HeldBackError):
                continue
            park = not error.retriable
            await self.store.record_failure(message, str(error), park=park)
            if park:
                self._parked += 1
                log.error(
                    "relay %s parked message %s for topic %r: %s",
                    self.name,
                    message.message_id,
                    message.topic,
                    error,
                )
            else:
                transient = error
        if transient is not None:
            raise transient

    def _gate(self, fence: LeaseFence | None) -> Callable[[StoredMessage], bool]:
        """The send gate of one batch: :meth:`_may_send`, with a fast path.

        Asked once per record, so the usual answer (the lease is valid and
        the shard still held under the batch's epoch) takes one clock read
        and two lookups; anything else goes to :meth:`_may_send`, which
        decides and logs.
        """
        clock = asyncio.get_running_loop().time
        fenced = fence.epochs if fence is not None else None

        def gate(message: StoredMessage) -> bool:
            shard = message.shard
            if (
                clock() < self._lease_valid_until
                and shard in self._shards
                and (fenced is None or self._epochs.get(shard) == fenced.get(shard))
            ):
                return True
            return self._may_send(message, fence)

        return gate

    def _may_send(self, message: StoredMessage, fence: LeaseFence | None) -> bool:
        """Whether this relay can still be sure it holds the lease of ``message``'s shard.

        Asked before each send. A relay paused (SIGSTOP, a long GC pause)
        past the safety margin of its lease, or whose shard went to another
        relay meanwhile (a new epoch), stops sending the batch: the rows stay
        pending for the lease holder.
        """
        now = asyncio.get_running_loop().time()
        held = now < self._lease_valid_until and message.shard in self._shards
        if held and fence is not None:
            held = self._epochs.get(message.shard) == fence.epochs.get(message.shard)
        if not held and not self._lease_lost:
            self._lease_lost = True
            log.warning(
                "relay %s lost the lease of shard %d (or has less than the safety margin "
                "left on it): it stops sending this batch and leaves the rest to the holder",
                self.name,
                message.shard,
            )
        return held

    def _in_order(
        self, batch: Sequence[StoredMessage], outcomes: Sequence[PublishError | None]
    ) -> list[StoredMessage]:
        """The acknowledged rows that may be marked: none after a failure of their key.

        Publishers hold back a key's records once one is refused, but a
        failure reported only in the acknowledgement comes after the later
        records were sent. Without the idempotent producer the broker may
        have accepted them. They are neither marked nor counted: they go out
        again, after the failed row, in the next round, so that the key's
        rows are marked (and delivered last) in commit order.
        """
        failed: set[tuple[str, bytes]] = set()
        done: list[StoredMessage] = []
        for message, error in zip(batch, outcomes, strict=True):
            key = (message.topic, message.key) if message.key is not None else None
            if error is not None:
                if key is not None:
                    failed.add(key)
            elif key is not None and key in failed:
                log.warning(
                    "relay %s: message %s of key %r on %r was acknowledged after an earlier "
                    "message of the same key failed: it is sent again after that one (enable "
                    "the idempotent producer to avoid the duplicate)",
                    self.name,
                    message.message_id,
                    message.key,
                    message.topic,
                )
            else:
                done.append(message)
        return done

    async def _idle_wait(self) -> None:
        shards = self._held_shards()
        timeout = self.settings.poll_interval.total_seconds()
        if shards:
            due = await self.store.next_due_in(shards)
            if due is not None:
                timeout = min(timeout, due.total_seconds() + 0.005)
        # asyncio.timeout rather than wait_for: on Python 3.11 wait_for can swallow
        # a cancellation that arrives as the event is set, and stop() would hang.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._wake.wait()
        self._wake.clear()  # stop() sets it too, so a stopping relay does not wait

    async def _publish_loop(self) -> None:
        # The idle wait is inside the retry: its "next due" query can lose its
        # connection too, and a publish task that dies of that would leave the
        # relay holding shards it never publishes.
        failures = 0
        transient = 0
        while not self._stopping.is_set():
            try:
                read = await self._publish_rounds(pipelined=True)
                if read < self.settings.batch_size:
                    await self._idle_wait()
            except Exception as exc:
                if self._stopping.is_set():
                    return
                self._failed += 1
                kind = classify(exc)
                transient = transient + 1 if kind is ErrorKind.TRANSIENT else 0
                if kind is ErrorKind.PERMANENT:
                    raise
                if transient > _TRANSIENT_LIMIT and not isinstance(exc, PublishError):
                    raise  # the same statement fails every time: a bug, not bad luck
                failures += 1
                delay = self.settings.backoff.delay(failures)
                log.warning(
                    "relay %s will retry in %.2fs after: %s",
                    self.name,
                    delay,
                    _one_line(exc),
                    exc_info=_trace(exc),
                )
                await self._pause(delay)
            else:
                failures = transient = 0

    # -- cleanup -----------------------------------------------------------------

    async def _cleanup_loop(self) -> None:
        settings = self.settings
        while not self._stopping.is_set():
            await self._pause(settings.cleanup_interval.total_seconds())
            if self._stopping.is_set():
                return
            try:
                await self.purge_published()
            except Exception as exc:
                # Cleanup only saves space: a failure is reported and tried
                # again at the next interval, never a reason to stop publishing.
                level = logging.WARNING if classify(exc).retriable else logging.ERROR
                log.log(
                    level,
                    "relay %s could not clean up the outbox: %s",
                    self.name,
                    _one_line(exc),
                    exc_info=_trace(exc),
                )

    async def purge_published(self, older_than: timedelta | None = None) -> int:
        """Delete published rows older than the retention, in bounded batches."""
        retention = self.settings.retention if older_than is None else older_than
        limit = self.settings.cleanup_batch_size
        total = 0
        while True:
            deleted = await self.store.purge_published(retention, limit)
            total += deleted
            if deleted < limit:
                return total
            await asyncio.sleep(0)


def _marks_can_delete(store: OutboxStore) -> bool:
    """Whether ``store.mark_published`` takes ``delete`` (a store written before it does not)."""
    try:
        parameters = inspect.signature(store.mark_published).parameters.values()
    except (TypeError, ValueError):  # no signature to read: let the call decide
        return True
    return any(p.name == "delete" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def _one_line(exc: BaseException) -> str:
    """The error's message on one line (database errors span several)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def _trace(exc: BaseException) -> BaseException | None:
    """Log a traceback only for errors that are not ours (ours say what failed).

    Ours never carry a payload; a foreign error's traceback is still needed
    to find a bug.
    """
    return None if isinstance(exc, OutboxError) else exc


def _gave_up(exc: Exception, seconds: float) -> Exception:
    """The error a start that waited ``seconds`` in vain fails with."""
    note = f" (still failing after {seconds:g}s: RelaySettings.startup_timeout)"
    if isinstance(exc, PublishError):
        return PublishError(f"{exc}{note}", retriable=exc.retriable, kind=exc.kind)
    if isinstance(exc, StoreError):
        return StoreError(f"{exc}{note}", kind=exc.kind)
    return exc

"""The relay: publishes committed outbox rows and marks them published.

One round: read up to ``batch_size`` due rows of the shards this relay holds
(id order), publish them all, wait for every acknowledgement, then mark the
acknowledged ones in one statement. A crash between publish and mark only
causes duplicates, never a loss (at-least-once).

Failures:

* transient (broker down, timeouts, database hiccups): the rows stay pending
  and the relay backs off (tenacity-style exponential backoff with jitter)
  and tries again, forever, resuming by itself;
* permanent (a record too large, an invalid topic): the row is parked with
  its error, visible through :meth:`OutboxStore.parked` and retriable with
  :meth:`OutboxStore.retry_parked`; rows of other keys go on, rows of the
  same key wait behind it so that the key's order is kept.

Several relays may run against one database: each publishes only the shards
it leases (see :mod:`outbox.lease`), renewed in the background even while a
batch is in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import socket
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

from tenacity import RetryCallState

from outbox.crashpoints import crash_point
from outbox.errors import ConfigurationError, OutboxError, PublishError
from outbox.message import StoredMessage
from outbox.publisher import HeldBackError, Publisher
from outbox.settings import RelaySettings
from outbox.store import OutboxStore

__all__ = ["Relay", "RelayStats"]

log = logging.getLogger(__name__)

_STOP_GRACE = 15.0
"""Seconds stop() waits for the loops to reach a safe point before cancelling them."""


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
    """Publish attempts that failed transiently (the rows were retried)."""

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
        name: Unique name of this relay instance (defaults to host, pid and a
            random suffix); shows up as the owner of its shard leases.
    """

    def __init__(
        self,
        store: OutboxStore,
        publisher: Publisher,
        settings: RelaySettings | None = None,
        *,
        name: str | None = None,
    ) -> None:
        self.store = store
        self.publisher = publisher
        self.settings = settings or RelaySettings()
        self.name = name or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        if len(self.name) > 200:
            raise ConfigurationError("relay name must be at most 200 characters")
        self._state = _State.UNOPENED
        self._wake = asyncio.Event()
        self._publishing = asyncio.Lock()
        self._shards: frozenset[int] = frozenset()
        self._lease_valid_until = 0.0
        self._rebalance_due = False
        self._tasks: list[asyncio.Task[None]] = []
        self._watch: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._published = 0
        self._parked = 0
        self._failed = 0
        self._batches = 0

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
        """Start publishing in background tasks."""
        if self._state is not _State.UNOPENED:
            raise RuntimeError(f"cannot start a relay that is {self._state.value}")
        self._state = _State.RUNNING
        self._tasks = [
            asyncio.create_task(self._leases_loop(), name=f"relay-leases-{self.name}"),
            asyncio.create_task(self._publish_loop(), name=f"relay-publish-{self.name}"),
            asyncio.create_task(self._cleanup_loop(), name=f"relay-cleanup-{self.name}"),
        ]
        self._watch = asyncio.create_task(self.store.watch_commits(self.wake), name="relay-watch")

    async def stop(self) -> None:
        """Stop after the current batch, give back the shards, close the publisher.

        The loops stop at their next safe point rather than being cancelled in
        the middle of a database transaction (which, on SQLite, could leave the
        file locked behind a connection that is being thrown away). Only a loop
        still busy after a grace period (a publish stuck on an unreachable
        broker) is cancelled.
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
        self._shards = frozenset()
        try:
            await self.store.release_shards(self.name)
        except OutboxError as exc:
            log.warning("relay %s could not release its shards: %s", self.name, exc)
        await self.publisher.stop()

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
        # Leave a margin: stop using the leases well before the database expires them.
        self._lease_valid_until = started + ttl.total_seconds() * 0.8

    async def _leases_loop(self) -> None:
        period = self.settings.lease_ttl.total_seconds() / 4
        attempt = 0
        while not self._stopping.is_set():
            try:
                if self._publishing.locked():
                    # A batch is in flight: renew and take free shards, but give
                    # nothing away; the next round rebalances before it reads.
                    await self._claim(rebalance=False)
                    self._rebalance_due = True
                else:
                    async with self._publishing:
                        await self._claim(rebalance=True)
                attempt = 0
                self.wake()
                await self._pause(period)
            except Exception as exc:
                attempt += 1
                log.warning(
                    "relay %s could not renew its shard leases: %s",
                    self.name,
                    exc,
                    exc_info=not isinstance(exc, OutboxError),
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
        async with self._publishing:
            if self._rebalance_due:
                self._rebalance_due = False
                await self._claim(rebalance=True)
            shards = self._held_shards()
            if not shards:
                return 0
            batch = await self.store.fetch_due(shards, self.settings.batch_size)
            if not batch:
                return 0
            outcomes = await self.publisher.publish(batch)
            crash_point("relay.after_publish")
            self._check_order(batch, outcomes)
            done = [m for m, error in zip(batch, outcomes, strict=True) if error is None]
            marked = await self.store.mark_published(done)
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
                    self._failed += 1
                    transient = error
            if transient is not None:
                raise transient
            return len(batch)

    def _check_order(
        self, batch: Sequence[StoredMessage], outcomes: Sequence[PublishError | None]
    ) -> None:
        """Report a key whose later record was acknowledged after an earlier one failed.

        Publishers hold back a key's records once one is refused, but a
        failure reported only in the acknowledgement comes after the later
        records were sent. The idempotent producer (on by default for Apache
        Kafka) then fails them too; without it, the order of that key is
        broken, and this says so rather than staying silent.
        """
        failed: set[bytes] = set()
        for message, error in zip(batch, outcomes, strict=True):
            if message.key is None or isinstance(error, HeldBackError):
                continue
            if error is not None:
                failed.add(message.key)
            elif message.key in failed:
                log.error(
                    "relay %s: message %s of key %r was published after an earlier message "
                    "of the same key failed: that key is now out of order (enable the "
                    "idempotent producer to prevent this)",
                    self.name,
                    message.message_id,
                    message.key,
                )

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
        while not self._stopping.is_set():
            # Every error is retried: a relay that stops publishing while it
            # keeps renewing its leases would hold its shards hostage.
            retrying = self.settings.backoff.retrying(
                retry_on=lambda exc: isinstance(exc, Exception) and not self._stopping.is_set(),
                before_sleep=self._log_retry,
                sleep=self._pause,
            )
            async for attempt in retrying:
                with attempt:
                    read = await self.publish_once()
            if read < self.settings.batch_size:
                await self._idle_wait()

    def _log_retry(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0.0
        log.warning(
            "relay %s will retry in %.2fs after: %s",
            self.name,
            wait,
            exc,
            exc_info=exc if exc is not None and not isinstance(exc, OutboxError) else None,
        )

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
                log.warning("relay %s could not clean up the outbox: %s", self.name, exc)

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

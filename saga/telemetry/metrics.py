"""Metrics of an instrumented service, through the OpenTelemetry metrics API.

Instruments (meter ``choreosaga``), each with the ``service`` attribute:

* ``saga.handler.duration`` (histogram, s): one record through the
  pipeline, by ``saga.step`` (or event type) and ``saga.outcome``
  (``processed``, ``duplicate``, ``dead_lettered``, ``ignored``);
* ``saga.inbox.duplicates`` (counter): redeliveries the inbox caught;
* ``saga.dead_letters`` (counter): records sent to a dead-letter topic, by
  ``saga.step`` (or event type; ``undecodable`` for bad input);
* ``saga.handler.retries`` (counter) and ``saga.handler.retry_depth``
  (histogram): attempts repeated after a transient error or a bug, and how
  many one record needed (recorded for records that needed any);
* ``saga.handler.outage_waits`` (counter): attempts repeated because the
  database was unavailable, a batch redone after its transaction was lost
  included;
* ``saga.duration`` (histogram, s): start to end of a saga, by ``saga.name``
  and ``saga.status``, recorded at the initiator when it learns the end;
* ``outbox.relay.published`` (counter) and ``outbox.relay.batch_size``
  (histogram): what the relay published;
* ``outbox.backlog`` and ``outbox.oldest_pending_age`` (gauges, rows and
  s): set by :meth:`SagaMetrics.refresh_backlog`, which reads the outbox;
* ``saga.in_flight`` (gauge): sagas this service takes part in that have not
  ended, by ``saga.name`` and ``saga.step`` (the last step it knows of), set
  by :meth:`SagaMetrics.refresh_in_flight`, which reads the saga views.

A record of a batch is counted once its batch commits: a batch redone
(its transaction lost, or another consumer's inbox rows in the way) counts
each record once, as the pass that committed went.

The gauges are refreshed by :meth:`SagaMetrics.refresh`, which the
interceptor calls at most every ``refresh_interval`` while records flow (an
observable callback cannot await a database); call it yourself too if you
want them fresh while the service is idle.
"""

from __future__ import annotations

from opentelemetry import metrics
from opentelemetry.metrics import MeterProvider
from sqlalchemy import func, select

from outbox.database import db_now_ms, read_connection
from saga.service import Service
from saga.stamp import SagaStatus

__all__ = ["RelayMetrics", "SagaMetrics"]


class SagaMetrics:
    """The instruments of one service."""

    def __init__(self, service: Service, *, meter_provider: MeterProvider | None = None) -> None:
        self.service = service
        meter = metrics.get_meter("choreosaga", meter_provider=meter_provider)
        self._base = {"service": service.name}
        self.handler_duration = meter.create_histogram(
            "saga.handler.duration", unit="s", description="Time to process one record"
        )
        self.duplicates = meter.create_counter(
            "saga.inbox.duplicates", description="Redelivered messages caught by the inbox"
        )
        self.dead_letters = meter.create_counter(
            "saga.dead_letters", description="Records sent to a dead-letter topic"
        )
        self.retries = meter.create_counter(
            "saga.handler.retries", description="Attempts repeated after a transient error or bug"
        )
        self.retry_depth = meter.create_histogram(
            "saga.handler.retry_depth", description="Repeated attempts one record needed"
        )
        self.outage_waits = meter.create_counter(
            "saga.handler.outage_waits", description="Attempts repeated during a database outage"
        )
        self.saga_duration = meter.create_histogram(
            "saga.duration", unit="s", description="Time from a saga's start to its end"
        )
        self.relay_published = meter.create_counter(
            "outbox.relay.published", description="Records the relay published"
        )
        self.relay_batch = meter.create_histogram(
            "outbox.relay.batch_size", description="Records per relay publish round"
        )
        self.in_flight = meter.create_gauge(
            "saga.in_flight", description="Sagas not ended, by the last step known here"
        )
        self._in_flight_seen: set[tuple[str, str]] = set()
        self.backlog = meter.create_gauge("outbox.backlog", description="Rows due to publish")
        self.oldest_pending_age = meter.create_gauge(
            "outbox.oldest_pending_age", unit="s", description="Age of the oldest row due"
        )

    def handled(
        self, *, step: str, outcome: str, seconds: float, retries: int = 0, outages: int = 0
    ) -> None:
        """Record one record through the pipeline."""
        attributes = {**self._base, "saga.step": step, "saga.outcome": outcome}
        self.handler_duration.record(seconds, attributes)
        if outcome == "duplicate":
            self.duplicates.add(1, self._base)
        elif outcome == "dead_lettered":
            self.dead_letters.add(1, {**self._base, "saga.step": step})
        if retries:
            self.retries.add(retries, {**self._base, "saga.step": step})
            self.retry_depth.record(retries, {**self._base, "saga.step": step})
        if outages:
            self.outage_waits.add(outages, self._base)

    def outage(self) -> None:
        """Record a batch redone because the database was unavailable."""
        self.outage_waits.add(1, self._base)

    def saga_ended(self, *, saga: str, status: str, seconds: float) -> None:
        """Record a saga's time to its end."""
        self.saga_duration.record(seconds, {**self._base, "saga.name": saga, "saga.status": status})

    def published(self, *, batch: int, published: int) -> None:
        """Record one relay round."""
        self.relay_batch.record(batch, self._base)
        self.relay_published.add(published, self._base)

    async def refresh(self) -> None:
        """Set every gauge from the database (backlog, oldest row, sagas in flight)."""
        await self.refresh_backlog()
        await self.refresh_in_flight()

    async def refresh_in_flight(self, limit: int = 10_000) -> dict[tuple[str, str], int]:
        """Count the sagas not ended here by saga name and last step; set the gauge.

        Reads at most ``limit`` views (the most recently changed).
        """
        states = self.service.states
        c = states.table.c
        query = (
            select(c.stamp)
            .where(c.status.in_([SagaStatus.RUNNING.value, SagaStatus.COMPENSATING.value]))
            .order_by(c.updated_at_ms.desc())
            .limit(limit)
        )
        async with read_connection(self.service.engine) as conn:
            raw = (await conn.execute(query)).scalars().all()
        counts: dict[tuple[str, str], int] = {}
        for value in raw:
            stamp = states.decode(value)
            step = stamp.steps[-1].name if stamp.steps else "(started)"
            key = (stamp.saga_name, step)
            counts[key] = counts.get(key, 0) + 1
        # A step no saga is at any more goes back to zero rather than keep its last value.
        for key in self._in_flight_seen | counts.keys():
            saga, step = key
            self.in_flight.set(
                counts.get(key, 0), {**self._base, "saga.name": saga, "saga.step": step}
            )
        self._in_flight_seen |= counts.keys()
        return counts

    async def refresh_backlog(self) -> tuple[int, float]:
        """Read the outbox backlog (rows due) and its oldest row's age, for the gauges."""
        outbox = self.service.tables.outbox
        c = outbox.c
        due = (c.published_at_ms.is_(None)) & (c.parked_at_ms.is_(None))
        due = due & ((c.due_at_ms.is_(None)) | (c.due_at_ms <= db_now_ms()))
        query = select(func.count(), func.min(c.created_at_ms), db_now_ms()).where(due)
        async with read_connection(self.service.engine) as conn:
            count, oldest, now = (await conn.execute(query)).one()
        age = 0.0 if oldest is None else max(0.0, (now - oldest) / 1000)
        self.backlog.set(int(count), self._base)
        self.oldest_pending_age.set(age, self._base)
        return int(count), age


class RelayMetrics:
    """The relay instruments of a standalone relay (attribute ``relay``)."""

    def __init__(self, name: str, *, meter_provider: MeterProvider | None = None) -> None:
        meter = metrics.get_meter("choreosaga", meter_provider=meter_provider)
        self._base = {"relay": name}
        self.relay_published = meter.create_counter(
            "outbox.relay.published", description="Records the relay published"
        )
        self.relay_batch = meter.create_histogram(
            "outbox.relay.batch_size", description="Records per relay publish round"
        )

    def published(self, *, batch: int, published: int) -> None:
        """Record one relay round."""
        self.relay_batch.record(batch, self._base)
        self.relay_published.add(published, self._base)
